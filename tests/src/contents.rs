//! Disks with partition tables and file systems made by the real tools
//! (sfdisk, sgdisk, mkfs.*, mkswap, genisoimage, cryptsetup), and what
//! those tools (blkid, sfdisk --json, dumpe2fs, cryptsetup luksDump) say
//! about them, for the tests of what `qcow2-info` and the core's
//! `partition`/`signature` modules report.
//!
//! A missing tool fails the test with the package to install (the top of
//! `scripts/test-all.sh` installs them all).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::{ok_in, output_text, run_in};

/// The Debian package that provides each tool the tests drive.
const PACKAGES: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("fdisk", "fdisk"),
    ("sgdisk", "gdisk"),
    ("blkid", "util-linux"),
    ("mkswap", "util-linux"),
    ("mkfs.ext4", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mkfs.exfat", "exfatprogs"),
    ("mkfs.ntfs", "ntfs-3g"),
    ("mkfs.xfs", "xfsprogs"),
    ("xfs_db", "xfsprogs"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("genisoimage", "genisoimage"),
    ("cryptsetup", "cryptsetup-bin"),
    ("qemu-img", "qemu-utils"),
    ("mkfs.ext2", "e2fsprogs"),
    ("mkfs.ext3", "e2fsprogs"),
];

/// The path to run `tool` by: its name when it is on the PATH, else its
/// place in /usr/sbin or /sbin (root's tools, when the PATH lacks them).
/// Panics, naming the package to install, when it is nowhere.
pub fn require(tool: &str) -> String {
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if on_path {
        return tool.to_string();
    }
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    let package = PACKAGES
        .iter()
        .find(|p| p.0 == tool)
        .map(|p| p.1)
        .unwrap_or("?");
    panic!(
        "{tool} is missing: install it with `apt-get install {package}` (scripts/test-all.sh does)"
    );
}

/// Runs `tool ARGS` in `cwd` (found by [`require`]), which must succeed;
/// returns its standard output.
pub fn tool(cwd: &Path, tool: &str, args: &[&str]) -> String {
    ok_in(cwd, &require(tool), args)
}

/// Runs `tool ARGS` with `input` on its standard input, which must succeed.
pub fn tool_with_input(cwd: &Path, tool: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(require(tool))
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}",
        out.status,
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sparse file of `size` bytes (replacing any file of that name).
pub fn sparse_file(cwd: &Path, name: &str, size: u64) {
    let f = std::fs::File::create(cwd.join(name)).expect("create file");
    f.set_len(size).expect("set length");
}

/// Writes the file `src` into `disk` at byte `offset`, keeping holes
/// (`dd conv=notrunc,sparse`).
pub fn place(cwd: &Path, disk: &str, offset: u64, src: &str) {
    assert_eq!(offset % 512, 0, "{offset} is not a multiple of 512");
    let (i, o, seek) = (
        format!("if={src}"),
        format!("of={disk}"),
        format!("seek={}", offset / 512),
    );
    ok_in(
        cwd,
        "dd",
        &[
            &i,
            &o,
            "bs=512",
            &seek,
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
}

/// `blkid -p -o export` of `len` bytes at `offset` of `file` (low-level
/// probing, no cache), as a map; empty when blkid finds nothing.
pub fn blkid(cwd: &Path, file: &str, offset: u64, len: u64) -> BTreeMap<String, String> {
    let blkid = require("blkid");
    let (o, s) = (offset.to_string(), len.to_string());
    let out = run_in(
        cwd,
        &blkid,
        &["-p", "-o", "export", "-O", &o, "-S", &s, file],
    );
    // Exit status 2: nothing found.
    let mut map = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.split_once('=') {
            // blkid escapes spaces and specials with backslashes.
            map.insert(k.to_string(), v.replace("\\ ", " ").replace("\\\\", "\\"));
        }
    }
    map
}

/// `sfdisk --json FILE`'s partition table.
pub fn sfdisk_json(cwd: &Path, file: &str) -> serde_json::Value {
    let out = tool(cwd, "sfdisk", &["--json", file]);
    crate::json(&out)["partitiontable"].clone()
}

/// Util-linux's names of the GPT partition types (`sfdisk --label gpt -T`),
/// uppercase GUID -> name.
pub fn gpt_type_names(cwd: &Path) -> BTreeMap<String, String> {
    let out = tool(cwd, "sfdisk", &["--label", "gpt", "-T"]);
    out.lines()
        .filter_map(|l| {
            let (g, n) = l.split_once(char::is_whitespace)?;
            (g.len() == 36).then(|| (g.to_ascii_uppercase(), n.trim().to_string()))
        })
        .collect()
}

/// The "Filesystem features:" of `dumpe2fs -h FILE`, as words.
pub fn ext_features(cwd: &Path, file: &str) -> Vec<String> {
    let out = tool(cwd, "dumpe2fs", &["-h", file]);
    out.lines()
        .find_map(|l| l.strip_prefix("Filesystem features:"))
        .unwrap_or_else(|| panic!("dumpe2fs -h {file}: no features line:\n{out}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// A field of `cryptsetup luksDump FILE` (the first line starting with
/// `key` after trimming), e.g. `Cipher name:` or `cipher:`.
pub fn luks_dump_field(cwd: &Path, file: &str, key: &str) -> String {
    let out = tool(cwd, "cryptsetup", &["luksDump", file]);
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("cryptsetup luksDump {file}: no {key:?}:\n{out}"))
}

/// An LVM2 physical volume label made from the specification's layout
/// (pvcreate needs a block device): sector 1 holds `LABELONE`, its own
/// sector number, the CRC32 of bytes 20..512 (LVM's seed 0xf597a6cf, no
/// final inversion), the offset 32 of the PV header and `LVM2 001`; the PV
/// header holds the 32-character UUID and the device size. Returns the
/// first 4 KiB of the volume.
pub fn lvm2_pv_label(uuid: &[u8; 32], device_size: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    let l = &mut v[512..1024];
    l[0..8].copy_from_slice(b"LABELONE");
    l[8..16].copy_from_slice(&1u64.to_le_bytes());
    l[20..24].copy_from_slice(&32u32.to_le_bytes());
    l[24..32].copy_from_slice(b"LVM2 001");
    l[32..64].copy_from_slice(uuid);
    l[64..72].copy_from_slice(&device_size.to_le_bytes());
    // One data area from 1 MiB (offset, size 0 = to the end), then a zero
    // terminator; one metadata area at 4 KiB of 1020 KiB, then a terminator.
    l[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes());
    l[104..112].copy_from_slice(&4096u64.to_le_bytes());
    l[112..120].copy_from_slice(&(1020u64 << 10).to_le_bytes());
    let mut crc = 0xf597_a6cfu32;
    for &b in &l[20..512] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    l[16..20].copy_from_slice(&crc.to_le_bytes());
    v
}
