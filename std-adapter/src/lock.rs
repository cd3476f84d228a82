//! Image locking compatible with QEMU's file driver, so that our tools and
//! QEMU (qemu-img, qemu-io, a running VM) exclude each other in both
//! directions: open file description (OFD) byte-range locks on the bytes
//! QEMU uses, one per block permission: byte 100 + bit for each permission
//! held, byte 200 + bit for each permission not shared with others.
//! Before relying on its locks, an opener tests the other side's bytes: a
//! permission it needs that someone does not share, or a permission someone
//! holds that it does not share, is a conflict.

use std::fs::File;
use std::io;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

/// First byte of the "permission held" locks.
const PERM_BASE: libc::off_t = 100;
/// First byte of the "permission not shared" locks.
const SHARED_BASE: libc::off_t = 200;

/// QEMU's block permissions, in bit order.
const PERMS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1;
const WRITE: u32 = 2;
const WRITE_UNCHANGED: u32 = 4;
const RESIZE: u32 = 8;
const ALL: u32 = 0xf;

/// How an image file is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading a consistent image: nobody else may write it (like
    /// qemu-img without `-U`).
    Read,
    /// Writing: nobody else may write or resize it, or read it while
    /// needing it consistent without sharing writes.
    Write,
}

impl Access {
    /// (permissions held, permissions shared), as QEMU's qcow2 driver asks
    /// of its file.
    fn perms(self) -> (u32, u32) {
        match self {
            Access::Read => (CONSISTENT_READ, ALL & !WRITE),
            Access::Write => (
                CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE,
                CONSISTENT_READ | WRITE_UNCHANGED,
            ),
        }
    }
}

fn flock(kind: i16, byte: libc::off_t) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file description holds a lock on `byte`.
fn held_elsewhere(file: &File, byte: libc::off_t) -> io::Result<bool> {
    let mut l = flock(libc::F_WRLCK as i16, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut l)).map_err(io::Error::from)?;
    Ok(l.l_type != libc::F_UNLCK as i16)
}

fn conflict(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("{what}: is another process using the image? (-U reads it anyway)"),
    )
}

/// Takes QEMU's locks for `access` on `file` (held as long as the file is
/// open), after checking that nobody holds a conflicting one.
pub fn lock(file: &File, access: Access) -> io::Result<()> {
    let (perm, shared) = access.perms();
    for (i, name) in PERMS.iter().enumerate() {
        let bit = 1u32 << i;
        let i = i as libc::off_t;
        if perm & bit != 0 && held_elsewhere(file, SHARED_BASE + i)? {
            return Err(conflict(format!("Failed to get \"{name}\" lock")));
        }
        if shared & bit == 0 && held_elsewhere(file, PERM_BASE + i)? {
            return Err(conflict(format!("Failed to get shared \"{name}\" lock")));
        }
    }
    for (i, _) in PERMS.iter().enumerate() {
        let bit = 1u32 << i;
        let i = i as libc::off_t;
        if perm & bit != 0 {
            fcntl(
                file,
                FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK as i16, PERM_BASE + i)),
            )
            .map_err(io::Error::from)?;
        }
        if shared & bit == 0 {
            fcntl(
                file,
                FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK as i16, SHARED_BASE + i)),
            )
            .map_err(io::Error::from)?;
        }
    }
    Ok(())
}

/// Whether another open file description holds any of QEMU's lock bytes
/// on `file` (the image is in use by QEMU or one of our tools).
pub fn in_use(file: &File) -> io::Result<bool> {
    for i in 0..PERMS.len() as libc::off_t {
        if held_elsewhere(file, PERM_BASE + i)? || held_elsewhere(file, SHARED_BASE + i)? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_readers_and_writers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let open = || File::options().read(true).write(true).open(&p).unwrap();
        let (a, b, c) = (open(), open(), open());
        lock(&a, Access::Read).unwrap();
        lock(&b, Access::Read).unwrap();
        let e = lock(&c, Access::Write).unwrap_err();
        assert!(
            e.to_string().contains("Failed to get \"write\" lock"),
            "{e}"
        );
        assert!(in_use(&c).unwrap());
        drop((a, b));
        assert!(!in_use(&c).unwrap());
        lock(&c, Access::Write).unwrap();
        let d = open();
        let e = lock(&d, Access::Read).unwrap_err();
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
        assert!(lock(&open(), Access::Write).is_err());
    }
}
