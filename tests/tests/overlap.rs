//! A damaged image is never made worse: a corrupted pointer that would make
//! a write land on metadata is refused (the image is marked corrupt, as
//! QEMU does), and the allocator never hands out metadata, whatever the
//! refcounts on disk say. Every case is compared with what qemu-io does.

use std::path::Path;

use qcowkit_core::{Error, OpenOptions};
use qcowkit_tests::*;

const CS: u64 = 65536;
/// qemu-img's layout of a new 1 MiB image with 64 KiB clusters.
const REFCOUNT_TABLE: u64 = 0x10000;
const REFCOUNT_BLOCK: u64 = 0x20000;
const L1_TABLE: u64 = 0x30000;
/// After the first write: guest cluster 0's L2 table and data.
const L2_TABLE: u64 = 0x40000;

/// A 1 MiB image whose guest cluster 0 is written (L2 table at 0x40000,
/// data at 0x50000), plus `extra` qemu-img commands run before the pointer
/// is patched.
fn base_image(d: &Path, name: &str, extra: &[&[&str]]) -> Vec<u8> {
    let bytes = qemu_image(d, name, "", "1M", &["write -P 0x11 0 64k"]);
    assert_eq!(get64(&bytes, L1_TABLE as usize) & !(1 << 63), L2_TABLE);
    for args in extra {
        qemu_img(d, args);
    }
    std::fs::read(d.join(name)).unwrap()
}

fn incompat(bytes: &[u8]) -> u64 {
    get64(bytes, 72)
}

/// The bytes of `bytes` outside the header's incompatible-features field.
fn outside_feature_bits(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[72..80].fill(0);
    b
}

/// How a write through one of our paths went.
#[derive(Debug)]
enum Path_ {
    Write,
    Zeroes,
    Discard,
    Bench,
}

/// Runs one write of guest cluster 0 through `path`; returns the error text.
fn write_through(d: &Path, name: &str, path: &Path_) -> String {
    if let Path_::Bench = path {
        let out = ours(d, &["bench", "-q", "-w", "-c", "1", "-s", "4k", name]);
        assert_ne!(code(&out), 0, "bench -w succeeded");
        return stderr_of(&out);
    }
    let mut img = qcowkit_std::open_qcow2_rw(&d.join(name), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{name}: open for writing: {e}"));
    let r = match path {
        Path_::Write => img.write_at(0, &[0x5a; 4096]),
        Path_::Zeroes => img.write_zeroes(0, CS),
        Path_::Discard => img.discard(0, CS),
        Path_::Bench => unreachable!(),
    };
    let r = r.and_then(|()| img.flush());
    let err = r.expect_err("the write was refused");
    assert!(
        matches!(err, Error::MetadataOverlap { .. }),
        "{name} {path:?}: {err}"
    );
    assert!(img.is_corrupt());
    // Nothing more is written once the image is marked corrupt.
    assert!(img.write_at(CS * 8, &[1; 512]).is_err());
    err.to_string()
}

/// Patches one 8-byte pointer of a fresh copy of the image, runs every
/// write path on copies, and checks the outcome.
fn refused_everywhere(case: &str, extra: &[&[&str]], at: u64, value: u64, structure: &str) {
    refused_by_us(case, extra, at, value, structure, true)
}

/// [`refused_everywhere`], where `qemu_refuses` says whether qemu-io (with
/// its default "cached" overlap checks) refuses the same write too.
fn refused_by_us(
    case: &str,
    extra: &[&[&str]],
    at: u64,
    value: u64,
    structure: &str,
    qemu_refuses: bool,
) {
    let s = Scratch::new();
    let d = s.dir();
    let mut bytes = base_image(d, "orig.qcow2", extra);
    put64(&mut bytes, at as usize, value);
    for (i, path) in [Path_::Write, Path_::Zeroes, Path_::Discard, Path_::Bench]
        .iter()
        .enumerate()
    {
        let name = format!("{case}-{i}.qcow2");
        std::fs::write(d.join(&name), &bytes).unwrap();
        let msg = write_through(d, &name, path);
        assert!(
            msg.contains(structure),
            "{case} {path:?}: {msg} should name {structure}"
        );
        let after = std::fs::read(d.join(&name)).unwrap();
        assert_eq!(
            incompat(&after),
            incompat(&bytes) | 2,
            "{case} {path:?}: the corrupt bit is set"
        );
        assert!(
            outside_feature_bits(&after) == outside_feature_bits(&bytes),
            "{case} {path:?}: nothing else changed (first difference at {:?})",
            first_difference(&outside_feature_bits(&after), &outside_feature_bits(&bytes))
        );
        let info = qemu_info(d, &name);
        assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{case}");
        // Marked corrupt: opening for writing is refused from now on.
        let again = qcowkit_std::open_qcow2_rw(&d.join(&name), &OpenOptions::default());
        assert!(matches!(again, Err(Error::ReadOnly(_))), "{case}");
    }
    // What qemu-io does with the same write.
    std::fs::write(d.join("qemu.qcow2"), &bytes).unwrap();
    let out = run_in(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 4k", "qemu.qcow2"],
    );
    let text = output_text(&out);
    let info = qemu_info(d, "qemu.qcow2");
    let corrupt = info["format-specific"]["data"]["corrupt"] == true;
    if qemu_refuses {
        assert!(
            text.contains("failed") && corrupt,
            "{case}: qemu-io said {text}"
        );
    } else {
        // QEMU's default checks leave this structure out: it writes over it.
        assert!(
            !text.contains("failed") && !corrupt,
            "{case}: qemu-io said {text}"
        );
        let after = std::fs::read(d.join("qemu.qcow2")).unwrap();
        assert!(after != bytes, "{case}: qemu-io changed the file");
    }
}

/// The L2 entry of guest cluster 0 (COPIED: "owned, write in place").
const L2_ENTRY0: u64 = L2_TABLE;
const COPIED: u64 = 1 << 63;

#[test]
fn data_over_the_l1_table_is_refused() {
    refused_everywhere("l1", &[], L2_ENTRY0, COPIED | L1_TABLE, "active L1 table");
}

#[test]
fn data_over_the_refcount_table_is_refused() {
    refused_everywhere(
        "rt",
        &[],
        L2_ENTRY0,
        COPIED | REFCOUNT_TABLE,
        "refcount table",
    );
}

#[test]
fn data_over_a_refcount_block_is_refused() {
    refused_everywhere(
        "rb",
        &[],
        L2_ENTRY0,
        COPIED | REFCOUNT_BLOCK,
        "refcount block",
    );
}

#[test]
fn data_over_an_l2_table_is_refused() {
    refused_everywhere("l2", &[], L2_ENTRY0, COPIED | L2_TABLE, "active L2 table");
}

#[test]
fn an_l2_table_over_a_refcount_block_is_refused() {
    refused_everywhere(
        "l1-to-rb",
        &[],
        L1_TABLE,
        COPIED | REFCOUNT_BLOCK,
        "refcount block",
    );
}

#[test]
fn data_over_the_snapshot_table_and_inactive_l1_is_refused() {
    let s = Scratch::new();
    let bytes = base_image(
        s.dir(),
        "snap.qcow2",
        &[&["snapshot", "-c", "s1", "snap.qcow2"]],
    );
    let table = get64(&bytes, 64);
    let snap_l1 = get64(&bytes, table as usize);
    // After the snapshot, guest cluster 0's L2 table is shared (refcount
    // 2, no COPIED flag): point its L1 entry's table at the snapshot's
    // structures instead, flagged as owned.
    refused_everywhere(
        "snaptable",
        &[&["snapshot", "-c", "s1", "orig.qcow2"]],
        L1_TABLE,
        COPIED | table,
        "snapshot table",
    );
    // Stricter than QEMU: its default ("cached") overlap checks leave
    // inactive L1 tables out, so qemu-io writes over the snapshot's table.
    refused_by_us(
        "snapl1",
        &[&["snapshot", "-c", "s1", "orig.qcow2"]],
        L1_TABLE,
        COPIED | snap_l1,
        "inactive L1 table",
        false,
    );
}

#[test]
fn data_over_the_bitmap_directory_is_refused() {
    let s = Scratch::new();
    // A disabled bitmap: opening for writing leaves its directory as it is.
    let add: &[&str] = &["bitmap", "--add", "--disable", "bm.qcow2", "b0"];
    let bytes = base_image(s.dir(), "bm.qcow2", &[add]);
    // The bitmaps extension (after the fixed header): its directory offset.
    let dir = find_bitmap_directory(&bytes);
    refused_everywhere(
        "bitmapdir",
        &[&["bitmap", "--add", "--disable", "orig.qcow2", "b0"]],
        L2_ENTRY0,
        COPIED | dir,
        "bitmap directory",
    );
}

/// The bitmap directory offset from the bitmaps header extension.
fn find_bitmap_directory(bytes: &[u8]) -> u64 {
    let mut off = get32(bytes, 100) as usize;
    loop {
        let kind = get32(bytes, off);
        let len = get32(bytes, off + 4) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return get64(bytes, off + 8 + 16);
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn the_allocator_never_hands_out_metadata_whatever_the_refcounts_say() {
    let s = Scratch::new();
    let d = s.dir();
    let mut bytes = base_image(d, "rc.qcow2", &[]);
    // Refcounts 0 for the header, refcount table, refcount block and L1
    // table (16-bit entries of the block at 0x20000).
    for cluster in 0..4usize {
        put16(&mut bytes, REFCOUNT_BLOCK as usize + cluster * 2, 0);
    }
    std::fs::write(d.join("rc.qcow2"), &bytes).unwrap();
    let mut img = qcowkit_std::open_qcow2_rw(&d.join("rc.qcow2"), &OpenOptions::default()).unwrap();
    // New data clusters and an L2 table: none may land on those clusters.
    img.write_at(CS, &[0x77; 4096]).unwrap();
    img.write_at(9 * CS, &[0x78; 4096]).unwrap();
    img.flush().unwrap();
    assert!(!img.is_corrupt());
    drop(img);
    let after = std::fs::read(d.join("rc.qcow2")).unwrap();
    let cs = CS as usize;
    assert!(
        after[..2 * cs] == bytes[..2 * cs],
        "header and refcount table unchanged"
    );
    assert!(
        after[3 * cs..4 * cs] == bytes[3 * cs..4 * cs],
        "L1 table unchanged"
    );
    for cluster in 0..4usize {
        assert_eq!(
            get16(&after, 2 * cs + cluster * 2),
            0,
            "refcount of {cluster} untouched"
        );
    }
    // The new clusters went past the ones in use (data at 0x50000).
    assert!(after.len() as u64 >= 8 * CS);
    // qemu-img still opens it and reads our data.
    let raw = qemu_contents(d, "rc.qcow2");
    assert!(raw[CS as usize..CS as usize + 4096]
        .iter()
        .all(|b| *b == 0x77));
    assert!(raw[9 * CS as usize..9 * CS as usize + 4096]
        .iter()
        .all(|b| *b == 0x78));
}

#[test]
fn an_image_naming_itself_as_its_data_file_is_refused() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "self.qcow2", "data_file=x.raw", "1M");
    // Rename the data file in the header extension to the image itself
    // (same length: x.raw -> s.raw would not do; use a symlink-free rename).
    let mut bytes = std::fs::read(d.join("self.qcow2")).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"x.raw")
        .expect("data file name in the header");
    bytes[at..at + 5].copy_from_slice(b"y.raw");
    std::fs::write(d.join("self.qcow2"), &bytes).unwrap();
    std::os::unix::fs::symlink("self.qcow2", d.join("y.raw")).unwrap();
    // Opened for writing, the image's own write lock already refuses the
    // second open; without locks (-U), the core refuses it by identity.
    let r = qcowkit_std::open_qcow2_rw(&d.join("self.qcow2"), &OpenOptions::default());
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("names itself") || msg.contains("lock"),
        "{msg}"
    );
    let unlocked = qcowkit_std::DiskOptions {
        force_share: true,
        ..qcowkit_std::DiskOptions::default()
    };
    let r = qcowkit_std::Disk::open(&d.join("self.qcow2"), &unlocked);
    assert!(
        matches!(r, Err(Error::NamesItself { .. })),
        "{:?}",
        r.err().map(|e| e.to_string())
    );
    let out = ours(d, &["bench", "-q", "-w", "-c", "1", "self.qcow2"]);
    assert_ne!(code(&out), 0);
    let err = stderr_of(&out);
    assert!(
        err.contains("names itself") || err.contains("lock"),
        "{err}"
    );
    assert!(
        std::fs::read(d.join("self.qcow2")).unwrap() == bytes,
        "unchanged"
    );
}
