//! Firmware for the MPS2 AN386 board (Cortex-M4) under qemu-system-arm:
//! opens a qcow2 disk image on the host through ARM semihosting (following
//! its backing files), prints its partition table and what each partition
//! holds (the core's `partition` and `signature` modules: MBR with logical
//! partitions, GPT from the primary or the backup header; file systems by
//! their superblocks), then exactly
//!
//! ```text
//! virtual-size: <bytes>
//! sha256-disk: <hex of the whole guest disk>
//! ```
//!
//! and exits with status 0 (non-zero, with the error printed, on failure).
//! The image name comes from the semihosting command line (`-append NAME`),
//! relative to the emulator's working directory.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use core::fmt::Write as _;

use alloc::vec::Vec;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln, nr, syscall};
use embedded_alloc::LlffHeap as Heap;
use qcowkit_core::backing::resolve_name;
use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, CopyOptions, Sink};
use qcowkit_core::partition::{self, GptHeader, PartitionTable, Scheme, TableError};
use qcowkit_core::signature;
use qcowkit_core::{BlockRead, FileRole, Image, OpenOptions, Opened, Opener};
use sha2::{Digest, Sha256};

#[global_allocator]
static HEAP: Heap = Heap::empty();

/// Heap size: 16 KiB in the small-RAM configuration, 1 MiB otherwise
/// (room for cluster-sized buffers of compressed clusters).
#[cfg(feature = "small-heap")]
const HEAP_SIZE: usize = 16 * 1024;
#[cfg(not(feature = "small-heap"))]
const HEAP_SIZE: usize = 1024 * 1024;

/// L2 cache budget: a 2 KiB slice at a time in the small configuration.
#[cfg(feature = "small-heap")]
const L2_BUDGET: Option<u64> = Some(2048);
#[cfg(not(feature = "small-heap"))]
const L2_BUDGET: Option<u64> = None;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

/// A host file opened through semihosting.
struct HostFile {
    fd: usize,
    len: u64,
}

/// Semihosting errors: what failed and where.
#[derive(Debug)]
struct HostError(&'static str, u64);

impl core::fmt::Display for HostError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.0, self.1)
    }
}

impl HostFile {
    fn open(name: &str) -> Result<HostFile, HostError> {
        let mut z = String::from(name);
        z.push('\0');
        // SAFETY: SYS_OPEN reads `len` bytes from a NUL-terminated buffer
        // that stays alive for the call.
        let fd = unsafe { syscall!(OPEN, z.as_ptr(), nr::open::R_BINARY, name.len()) };
        if fd as isize == -1 {
            return Err(HostError("cannot open file", 0));
        }
        // SAFETY: SYS_FLEN takes the handle returned by SYS_OPEN.
        let len = unsafe { syscall!(FLEN, fd) };
        if len as isize == -1 {
            return Err(HostError("cannot get the file length", 0));
        }
        Ok(HostFile {
            fd,
            len: len as u64,
        })
    }
}

impl BlockRead for HostFile {
    type Error = HostError;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), HostError> {
        buf.fill(0);
        if offset >= self.len || buf.is_empty() {
            return Ok(());
        }
        let n = buf.len().min((self.len - offset) as usize);
        // Semihosting offsets are 32-bit: files up to 4 GiB.
        let off = usize::try_from(offset)
            .ok()
            .filter(|o| *o <= u32::MAX as usize)
            .ok_or(HostError("offset beyond 4 GiB", offset))?;
        // SAFETY: SYS_SEEK takes the handle and an absolute offset.
        let r = unsafe { syscall!(SEEK, self.fd, off) };
        if r != 0 {
            return Err(HostError("seek failed", offset));
        }
        // SAFETY: SYS_READ writes at most `n` bytes into `buf`, which is
        // at least `n` bytes long and borrowed mutably for the call.
        // It returns the number of bytes NOT read: anything but 0 is an
        // error (the length was checked above, so a short read means the
        // file changed or the host failed).
        let left = unsafe { syscall!(READ, self.fd, buf.as_mut_ptr(), n) };
        if left > n {
            return Err(HostError("read failed", offset));
        }
        if left != 0 {
            return Err(HostError("short read", offset));
        }
        Ok(())
    }

    fn len(&mut self) -> Result<u64, HostError> {
        Ok(self.len)
    }
}

/// Opens backing files relative to the directory of the image naming them.
struct HostOpener;

impl Opener<HostFile> for HostOpener {
    fn open(
        &mut self,
        parent: &str,
        name: &str,
        _role: FileRole,
    ) -> Result<Opened<HostFile>, HostError> {
        let resolved = resolve_name(parent, name);
        let io = HostFile::open(&resolved)?;
        Ok(Opened {
            io,
            identity: resolved.clone(),
            resolved,
        })
    }
}

/// The image name: the last word of the semihosting command line.
fn image_name() -> Option<String> {
    let mut buf = [0u8; 256];
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    // SAFETY: SYS_GET_CMDLINE writes at most block[1] bytes into buf and
    // stores the length in block[1].
    let r = unsafe { cortex_m_semihosting::syscall1(nr::GET_CMDLINE, block.as_mut_ptr() as usize) };
    if r != 0 {
        return None;
    }
    let line = core::str::from_utf8(&buf[..block[1].min(buf.len())]).ok()?;
    line.split_whitespace().last().map(String::from)
}

/// Prints what `probe` finds in `len` bytes at `offset` of the guest disk,
/// as `<what> filesystem: ...` (nothing when it finds nothing).
fn print_filesystem<R: BlockRead>(
    img: &mut Image<R>,
    what: &str,
    offset: u64,
    len: u64,
) -> Result<(), qcowkit_core::Error<R::Error>> {
    let Some(c) = signature::probe(img, offset, len)? else {
        return Ok(());
    };
    let mut line = String::new();
    let _ = write!(line, "{what} filesystem: {}", c.kind);
    if let Some(v) = c.version {
        let _ = write!(line, " version {v}");
    }
    if !c.label.is_empty() {
        let _ = write!(line, " label \"{}\"", c.label);
    }
    if let Some(id) = c.id {
        let _ = write!(line, " uuid {id}");
    }
    if let Some(b) = c.block_size {
        let _ = write!(line, " block-size {b}");
    }
    if let Some(size) = c.size {
        let _ = write!(line, " size {size}");
    }
    if let Some(cipher) = &c.cipher {
        let _ = write!(line, " cipher {}-{}", cipher.name, cipher.mode);
    }
    hprintln!("{}", line);
    Ok(())
}

/// Prints the partition table (through the core's `partition` module) and
/// what the disk and each partition hold.
fn print_partitions<R: BlockRead>(img: &mut Image<R>) -> Result<(), qcowkit_core::Error<R::Error>> {
    let size = img.size();
    let table = match PartitionTable::read(img, size) {
        Ok(t) => t,
        Err(TableError::Io(e)) => return Err(e),
        Err(e) => {
            // A broken table is reported; the disk is still hashed.
            hprintln!("partition table: {}", e);
            None
        }
    };
    print_filesystem(img, "disk", 0, size)?;
    let Some(table) = table else {
        hprintln!("partition table: none");
        return Ok(());
    };
    let gpt = match &table.scheme {
        Scheme::Mbr { disk_id } => {
            hprintln!("partition table: mbr, disk id {:#010x}", disk_id);
            false
        }
        Scheme::Gpt(g) => {
            let header = match g.header {
                GptHeader::Primary => "primary",
                GptHeader::Backup => "backup",
            };
            hprintln!(
                "partition table: gpt, {} header, {}-byte sectors, disk guid {:X}",
                header,
                g.sector_size,
                g.disk_guid
            );
            if let Some(p) = g.primary_problem {
                hprintln!("primary gpt header damaged: {}", p);
            }
            if let Some(p) = g.backup_problem {
                hprintln!("backup gpt header damaged: {}", p);
            }
            true
        }
    };
    let sector = match &table.scheme {
        Scheme::Gpt(g) => u64::from(g.sector_size),
        Scheme::Mbr { .. } => partition::SECTOR_SIZE,
    };
    for p in &table.partitions {
        let first = p.start / sector;
        let sectors = p.size / sector;
        if gpt {
            hprintln!(
                "gpt partition {}: first {} last {} name {} type {}",
                p.number,
                first,
                (first + sectors).saturating_sub(1),
                p.name,
                p.kind
            );
        } else {
            hprintln!(
                "mbr partition {}: type {} start {} sectors {}{}",
                p.number,
                p.kind,
                first,
                sectors,
                if p.bootable { " bootable" } else { "" }
            );
        }
        if !p.kind.is_extended() {
            let (offset, len) = p.region(size);
            let mut what = String::new();
            let _ = write!(what, "partition {}", p.number);
            print_filesystem(img, &what, offset, len)?;
        }
    }
    if table.omitted > 0 {
        hprintln!("{} more partitions not listed", table.omitted);
    }
    Ok(())
}

/// A copy's sink that hashes the guest bytes (zero runs included).
struct HashSink(Sha256);

impl Sink for HashSink {
    type Error = qcowkit_core::Error<HostError>;

    fn data(&mut self, _offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), Self::Error> {
        self.0.update(&buf[..len]);
        Ok(())
    }

    fn zeroes(&mut self, _offset: u64, len: u64) -> Result<(), Self::Error> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64);
            self.0.update(&ZEROS[..n as usize]);
            left -= n;
        }
        Ok(())
    }
}

fn run() -> Result<(), String> {
    let name = image_name().ok_or_else(|| String::from("no image name on the command line"))?;
    let io = HostFile::open(&name).map_err(|e| alloc::format!("{name}: {e}"))?;
    let opts = OpenOptions {
        l2_cache_bytes: L2_BUDGET,
        refcount_cache_bytes: Some(0),
        ..OpenOptions::default()
    };
    let mut img = Image::open_with(io, &name, &name, &mut HostOpener, &opts)
        .map_err(|e| alloc::format!("{name}: {e}"))?;
    print_partitions(&mut img).map_err(|e| alloc::format!("{e}"))?;
    // The whole guest disk, across every L2 table.
    let mut hasher = HashSink(Sha256::new());
    let opts = CopyOptions {
        chunk: 4096,
        align: 1,
    };
    let size = img.size();
    copy(
        &mut img,
        0,
        size,
        opts,
        &mut Decompressor::default(),
        &mut hasher,
    )
    .map_err(|e| alloc::format!("{e}"))?;
    let digest = hasher.0.finalize();
    let mut hex = String::new();
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hprintln!("virtual-size: {}", img.size());
    hprintln!("sha256-disk: {}", hex);
    Ok(())
}

#[entry]
fn main() -> ! {
    {
        use core::mem::MaybeUninit;
        static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
        // SAFETY: called once, before any allocation; the static buffer is
        // used only by the allocator from here on.
        unsafe { HEAP.init(core::ptr::addr_of_mut!(HEAP_MEM) as usize, HEAP_SIZE) }
    }
    match run() {
        Ok(()) => debug::exit(debug::EXIT_SUCCESS),
        Err(e) => {
            hprintln!("error: {}", e);
            debug::exit(debug::EXIT_FAILURE);
        }
    }
    loop {
        cortex_m::asm::wfi();
    }
}
