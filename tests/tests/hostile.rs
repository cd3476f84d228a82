//! Hostile images, in the spirit of QEMU's iotest 080.
//!
//! Every image starts as a valid one made by qemu-img at test time; single
//! fields are then patched to values the format (or QEMU's limits) forbid.
//! Refusals must be errors naming the field and its value, reads through
//! corrupt metadata must fail cleanly, and nothing may panic or hang.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use qcowkit_core::{Error, Image, OpenOptions};
use qcowkit_std::{Disk, DiskOptions};
use qcowkit_tests::{
    announce_seed, code, env_seed, get16, get32, get64, ours, put16, put32, put64, qemu_compressed,
    qemu_create, qemu_image, qemu_img, qemu_overlay, run_in, set_bits64, stderr_of, stdout_of, Rng,
    Scratch, XorShift64,
};

// Header field offsets (big-endian).
const MAGIC: usize = 0;
const VERSION: usize = 4;
const BACKING_FILE_OFFSET: usize = 8;
const BACKING_FILE_SIZE: usize = 16;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT_METHOD: usize = 32;
const L1_SIZE: usize = 36;
const L1_TABLE_OFFSET: usize = 40;
const REFCOUNT_TABLE_OFFSET: usize = 48;
const REFCOUNT_TABLE_CLUSTERS: usize = 56;
const NB_SNAPSHOTS: usize = 60;
const SNAPSHOTS_OFFSET: usize = 64;
const INCOMPATIBLE_FEATURES: usize = 72;
const AUTOCLEAR_FEATURES: usize = 88;
const REFCOUNT_ORDER: usize = 96;
const HEADER_LENGTH: usize = 100;
const COMPRESSION_TYPE: usize = 104;

// Header extension types.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;

// Feature bits.
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

// Table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// Longest time any single hostile open/read may take.
const QUICK: Duration = Duration::from_secs(5);

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

/// The fields of a (valid) image's header the tests navigate with.
#[derive(Debug, Clone, Copy)]
struct Geom {
    cluster_bits: u32,
    cluster_size: u64,
    size: u64,
    header_length: usize,
    l1_offset: u64,
    l1_size: u32,
    rt_offset: u64,
    snapshots_offset: u64,
}

impl Geom {
    fn of(b: &[u8]) -> Geom {
        let cluster_bits = get32(b, CLUSTER_BITS);
        Geom {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            size: get64(b, SIZE),
            header_length: get32(b, HEADER_LENGTH) as usize,
            l1_offset: get64(b, L1_TABLE_OFFSET),
            l1_size: get32(b, L1_SIZE),
            rt_offset: get64(b, REFCOUNT_TABLE_OFFSET),
            snapshots_offset: get64(b, SNAPSHOTS_OFFSET),
        }
    }

    /// File offset of L1 entry `i`.
    fn l1_entry(&self, i: usize) -> usize {
        to_usize(self.l1_offset) + 8 * i
    }

    /// Host offset of the L2 table L1 entry `i` points at.
    fn l2_table(&self, b: &[u8], i: usize) -> usize {
        to_usize(get64(b, self.l1_entry(i)) & OFFSET_MASK)
    }

    /// Host offset of the first refcount block.
    fn refcount_block(&self, b: &[u8]) -> usize {
        to_usize(get64(b, to_usize(self.rt_offset)) & OFFSET_MASK)
    }

    /// File offset of the 16-bit refcount of the cluster at `host`.
    fn refcount_of(&self, b: &[u8], host: u64) -> usize {
        self.refcount_block(b) + 2 * to_usize(host >> self.cluster_bits)
    }
}

/// The header extensions of `b`, in order (without the end marker).
fn extensions(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let g = Geom::of(b);
    let mut out = Vec::new();
    let mut off = g.header_length;
    while off + 8 <= to_usize(g.cluster_size) {
        let kind = get32(b, off);
        let len = get32(b, off + 4) as usize;
        if kind == 0 {
            break;
        }
        out.push((kind, b[off + 8..off + 8 + len].to_vec()));
        off += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// Rewrites the extension area of `b` (which must have no backing file
/// name) to hold `exts`, followed by the end marker.
fn set_extensions(b: &mut [u8], exts: &[(u32, Vec<u8>)]) {
    let start = Geom::of(b).header_length;
    b[start..4096].fill(0);
    let mut off = start;
    for (kind, data) in exts {
        put32(b, off, *kind);
        put32(b, off + 4, data.len() as u32);
        b[off + 8..off + 8 + data.len()].copy_from_slice(data);
        off += 8 + data.len().div_ceil(8) * 8;
    }
    assert!(off + 8 <= 4096, "extensions do not fit");
}

/// Appends an extension after the existing ones.
fn add_extension(b: &mut [u8], kind: u32, data: Vec<u8>) {
    let mut exts = extensions(b);
    exts.push((kind, data));
    set_extensions(b, &exts);
}

/// A feature name table entry.
fn feature_entry(kind: u8, bit: u8, name: &str) -> Vec<u8> {
    let mut e = vec![0u8; 48];
    e[0] = kind;
    e[1] = bit;
    e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    e
}

/// The data of a bitmaps extension.
fn bitmaps_ext(nb_bitmaps: u32, reserved: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
    let mut d = vec![0u8; 24];
    put32(&mut d, 0, nb_bitmaps);
    put32(&mut d, 4, reserved);
    put64(&mut d, 8, dir_size);
    put64(&mut d, 16, dir_offset);
    d
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

/// Runs `f`; a panic in it fails the test with a message naming `what`
/// and quoting the panic.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| panic!("{what}: panicked: {}", panic_text(&*p)))
}

/// What `Image::open` did with some bytes.
#[derive(Debug)]
enum Outcome {
    Opened,
    Refused(String),
    Panicked(String),
}

fn open_outcome(bytes: Vec<u8>) -> Outcome {
    let r = catch_unwind(AssertUnwindSafe(|| {
        Image::open(bytes, &OpenOptions::default()).map(|_| ())
    }));
    match r {
        Ok(Ok(())) => Outcome::Opened,
        Ok(Err(e)) => Outcome::Refused(e.to_string()),
        Err(p) => Outcome::Panicked(panic_text(&*p)),
    }
}

/// Opens `file` read-only with qemu-io and reads its first sector: a full
/// open, unlike `qemu-img info`, which skips some checks (no I/O mode).
fn qemu_open(d: &Path, file: &str) -> std::process::Output {
    run_in(
        d,
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read 0 512", file],
    )
}

/// A 1 MiB image with 64 KiB clusters, 128 KiB of data at offset 0 (two
/// data clusters in one L2 table).
fn plain_image(d: &Path) -> Vec<u8> {
    qemu_image(d, "plain.qcow2", "", "1M", &["write -P 0x5a 0 128k"])
}

/// The plain image with one internal snapshot.
fn snapshot_image(d: &Path) -> Vec<u8> {
    std::fs::copy(d.join("plain.qcow2"), d.join("snap.qcow2")).unwrap();
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    std::fs::read(d.join("snap.qcow2")).unwrap()
}

/// A 1 MiB image with extended L2 entries and 64 KiB of data at offset 0.
fn extl2_image(d: &Path) -> Vec<u8> {
    qemu_image(
        d,
        "extl2.qcow2",
        "extended_l2=on",
        "1M",
        &["write -P 0x11 0 64k"],
    )
}

/// Compressible but not trivial guest data.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect()
}

/// A 256 KiB image whose clusters are all compressed with `ctype`.
fn compressed_image(d: &Path, ctype: &str) -> (Vec<u8>, Vec<u8>) {
    let raw = pattern(256 * 1024);
    std::fs::write(d.join("src.raw"), &raw).unwrap();
    let name = format!("c-{ctype}.qcow2");
    qemu_compressed(d, "src.raw", &name, &format!("compression_type={ctype}"));
    (std::fs::read(d.join(&name)).unwrap(), raw)
}

/// Host offset and maximum length of the compressed data of an L2 entry.
fn compressed_extent(entry: u64, cluster_bits: u32) -> (usize, usize) {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (to_usize(offset), to_usize(sectors * 512 - (offset & 511)))
}

// ---------------------------------------------------------------------------
// Header validation: one row per rule.

type Patch = Box<dyn Fn(&mut Vec<u8>)>;

struct Row {
    name: &'static str,
    snapshot_base: bool,
    patch: Patch,
    want: Vec<String>,
}

fn row(name: &'static str, patch: impl Fn(&mut Vec<u8>) + 'static, want: &[&str]) -> Row {
    Row {
        name,
        snapshot_base: false,
        patch: Box::new(patch),
        want: want.iter().map(|s| s.to_string()).collect(),
    }
}

impl Row {
    fn on_snapshot_image(mut self) -> Row {
        self.snapshot_base = true;
        self
    }
}

fn rows(g: Geom, snap: Geom) -> Vec<Row> {
    let cs = g.cluster_size;
    let hl = g.header_length;
    let rt_limit_clusters = (8 * 1024 * 1024 / cs) as u32 + 1;
    vec![
        row(
            "bad-magic",
            |b| put32(b, MAGIC, 0x5146_49fa),
            &["not a qcow2 image", "magic 0x514649fa"],
        ),
        row(
            "version-1",
            |b| put32(b, VERSION, 1),
            &["unsupported qcow2 version 1"],
        ),
        row(
            "version-4",
            |b| put32(b, VERSION, 4),
            &["unsupported qcow2 version 4"],
        ),
        row(
            "cluster-bits-8",
            |b| put32(b, CLUSTER_BITS, 8),
            &["invalid cluster_bits 8", "512 bytes"],
        ),
        row(
            "cluster-bits-22",
            |b| put32(b, CLUSTER_BITS, 22),
            &["invalid cluster_bits 22", "2 MiB"],
        ),
        row(
            "header-length-100",
            |b| put32(b, HEADER_LENGTH, 100),
            &["invalid header_length 100", "at least 104"],
        ),
        row(
            "header-length-past-cluster",
            move |b| put32(b, HEADER_LENGTH, cs as u32 + 8),
            &[
                &format!("invalid header_length {}", cs + 8),
                "exceeds the cluster size",
            ],
        ),
        row(
            "refcount-order-7",
            |b| put32(b, REFCOUNT_ORDER, 7),
            &["invalid refcount_order 7", "64 bits"],
        ),
        row(
            "unknown-incompatible-bit-unnamed",
            |b| set_bits64(b, INCOMPATIBLE_FEATURES, 1 << 20),
            &["unsupported incompatible features 0x100000"],
        ),
        row(
            "unknown-incompatible-bits-named",
            |b| {
                set_bits64(b, INCOMPATIBLE_FEATURES, (1 << 20) | (1 << 33));
                let mut exts = extensions(b);
                let table = exts
                    .iter_mut()
                    .find(|(k, _)| *k == EXT_FEATURE_TABLE)
                    .expect("qemu-img writes a feature name table");
                table
                    .1
                    .extend(feature_entry(0, 20, "hostile future feature"));
                set_extensions(b, &exts);
            },
            &[
                "unsupported incompatible features 0x200100000",
                "hostile future feature",
            ],
        ),
        row(
            "compression-type-2",
            |b| b[COMPRESSION_TYPE] = 2,
            &["invalid compression_type 2", "unknown compression type"],
        ),
        row(
            "compression-bit-with-zlib",
            |b| set_bits64(b, INCOMPATIBLE_FEATURES, INCOMPAT_COMPRESSION),
            &["invalid compression_type 0", "bit is set"],
        ),
        row(
            "zstd-without-compression-bit",
            |b| b[COMPRESSION_TYPE] = 1,
            &[
                "invalid compression_type 1",
                "without the compression type bit",
            ],
        ),
        row(
            "extended-l2-with-8k-clusters",
            |b| {
                set_bits64(b, INCOMPATIBLE_FEATURES, INCOMPAT_EXTL2);
                put32(b, CLUSTER_BITS, 13);
            },
            &["invalid cluster_bits 13", "extended L2"],
        ),
        row(
            "data-file-raw-without-data-file",
            |b| set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_DATA_FILE_RAW),
            &["invalid autoclear_features 2", "data-file-raw"],
        ),
        row(
            "backing-file-size-1024",
            |b| {
                put64(b, BACKING_FILE_OFFSET, 0x1000);
                put32(b, BACKING_FILE_SIZE, 1024);
                b[0x1000..0x1400].fill(b'a');
            },
            &["invalid backing_file_size 1024", "1023"],
        ),
        row(
            "backing-name-past-first-cluster",
            move |b| {
                put64(b, BACKING_FILE_OFFSET, cs - 4);
                put32(b, BACKING_FILE_SIZE, 10);
            },
            &[
                &format!("invalid backing_file_offset {}", cs - 4),
                "first cluster",
            ],
        ),
        row(
            "backing-name-offset-huge",
            |b| {
                put64(b, BACKING_FILE_OFFSET, 1 << 40);
                put32(b, BACKING_FILE_SIZE, 4);
            },
            &["invalid backing_file_offset 1099511627776", "first cluster"],
        ),
        row(
            "l1-size-over-32mib",
            |b| put32(b, L1_SIZE, 4 * 1024 * 1024 + 1),
            &["invalid l1_size 4194305", "too large"],
        ),
        row(
            "l1-size-too-small-for-size",
            |b| put64(b, SIZE, 1 << 40),
            &[
                &format!("invalid l1_size {}", g.l1_size),
                "too small for the virtual size",
            ],
        ),
        row(
            "size-too-big",
            |b| put64(b, SIZE, 1 << 62),
            &["invalid size 4611686018427387904", "too big"],
        ),
        row(
            "size-u64-max",
            |b| put64(b, SIZE, u64::MAX),
            &["invalid size 18446744073709551615", "too big"],
        ),
        row(
            "l1-size-zero",
            |b| put32(b, L1_SIZE, 0),
            &["invalid l1_size 0", "too small for the virtual size"],
        ),
        row(
            "l1-offset-unaligned",
            move |b| put64(b, L1_TABLE_OFFSET, g.l1_offset + 512),
            &[
                &format!("invalid l1_table_offset {}", g.l1_offset + 512),
                "not aligned",
            ],
        ),
        row(
            "l1-past-i64-max",
            |b| {
                put64(b, L1_TABLE_OFFSET, 0x7fff_ffff_ffff_0000);
                put32(b, L1_SIZE, 0x1_0000);
            },
            &[
                "invalid l1_table_offset 9223372036854710272",
                "past the largest file offset",
            ],
        ),
        row(
            "refcount-table-over-8mib",
            move |b| put32(b, REFCOUNT_TABLE_CLUSTERS, rt_limit_clusters),
            &[
                &format!("invalid refcount_table_clusters {rt_limit_clusters}"),
                "8 MiB",
            ],
        ),
        row(
            "refcount-table-clusters-0",
            |b| put32(b, REFCOUNT_TABLE_CLUSTERS, 0),
            &["invalid refcount_table_clusters 0"],
        ),
        row(
            "refcount-table-clusters-u32-max",
            |b| put32(b, REFCOUNT_TABLE_CLUSTERS, u32::MAX),
            &["invalid refcount_table_clusters 4294967295"],
        ),
        row(
            "refcount-table-offset-unaligned",
            move |b| put64(b, REFCOUNT_TABLE_OFFSET, g.rt_offset + 8),
            &[
                &format!("invalid refcount_table_offset {}", g.rt_offset + 8),
                "not aligned",
            ],
        ),
        row(
            "nb-snapshots-65537",
            |b| put32(b, NB_SNAPSHOTS, 65537),
            &["invalid nb_snapshots 65537", "65536"],
        ),
        row(
            "snapshots-offset-unaligned",
            |b| {
                put32(b, NB_SNAPSHOTS, 1);
                put64(b, SNAPSHOTS_OFFSET, 0x5_0008);
            },
            &["invalid snapshots_offset 327688", "not aligned"],
        ),
        row(
            "snapshot-extra-data-1025",
            move |b| put32(b, to_usize(snap.snapshots_offset) + 36, 1025),
            &["invalid snapshot extra_data_size 1025", "1024"],
        )
        .on_snapshot_image(),
        row(
            "extension-longer-than-header-area",
            move |b| {
                set_extensions(b, &[]);
                put32(b, hl, 0x1234_5678);
                put32(b, hl + 4, cs as u32);
            },
            &[
                &format!("invalid header extension length {cs}"),
                "too large",
            ],
        ),
        row(
            "backing-format-extension-16-bytes",
            |b| add_extension(b, EXT_BACKING_FORMAT, b"qcow2qcow2qcow2q".to_vec()),
            &["invalid backing format extension length 16"],
        ),
        row(
            "bitmaps-extension-length-16",
            |b| add_extension(b, EXT_BITMAPS, vec![0; 16]),
            &["invalid bitmaps extension length 16", "24"],
        ),
        row(
            "bitmaps-extension-reserved-nonzero",
            |b| {
                set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
                add_extension(b, EXT_BITMAPS, bitmaps_ext(1, 7, 64, 0x5_0000));
            },
            &["invalid bitmaps extension reserved field 7", "zero"],
        ),
        row(
            "bitmaps-extension-zero-bitmaps",
            |b| {
                set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
                add_extension(b, EXT_BITMAPS, bitmaps_ext(0, 0, 0, 0x5_0000));
            },
            &["invalid nb_bitmaps 0"],
        ),
        row(
            "bitmap-directory-unaligned",
            |b| {
                set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
                add_extension(b, EXT_BITMAPS, bitmaps_ext(1, 0, 64, 0x5_0008));
            },
            &["invalid bitmap_directory_offset 327688", "not aligned"],
        ),
        row(
            "crypto-extension-length-8",
            |b| add_extension(b, EXT_CRYPTO, vec![0; 8]),
            &["invalid encryption header extension length 8", "16"],
        ),
        row(
            "crypt-method-aes",
            |b| put32(b, CRYPT_METHOD, 1),
            &["encrypted with aes"],
        ),
        row(
            "crypt-method-luks",
            |b| put32(b, CRYPT_METHOD, 2),
            &["encrypted with luks"],
        ),
        row(
            "crypt-method-3",
            |b| put32(b, CRYPT_METHOD, 3),
            &["invalid crypt_method 3", "encryption method"],
        ),
    ]
}

#[test]
fn hostile_headers_are_refused_naming_field_and_value() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let snap = snapshot_image(d);
    let g = Geom::of(&plain);
    let sg = Geom::of(&snap);
    assert_eq!(get32(&snap, NB_SNAPSHOTS), 1);
    assert!(matches!(open_outcome(plain.clone()), Outcome::Opened));
    assert!(matches!(open_outcome(snap.clone()), Outcome::Opened));

    let mut failures = Vec::new();
    for r in rows(g, sg) {
        let mut bytes = if r.snapshot_base {
            snap.clone()
        } else {
            plain.clone()
        };
        (r.patch)(&mut bytes);
        let file = format!("{}.qcow2", r.name);
        std::fs::write(s.path(&file), &bytes).unwrap();

        let started = Instant::now();
        let msg = match open_outcome(bytes) {
            Outcome::Refused(m) => m,
            Outcome::Opened => {
                failures.push(format!("{}: Image::open accepted the image", r.name));
                continue;
            }
            Outcome::Panicked(p) => {
                failures.push(format!("{}: Image::open panicked: {p}", r.name));
                continue;
            }
        };
        if started.elapsed() > QUICK {
            failures.push(format!("{}: open took {:?}", r.name, started.elapsed()));
        }
        for w in &r.want {
            if !msg.contains(w.as_str()) {
                failures.push(format!("{}: message {msg:?} lacks {w:?}", r.name));
            }
        }

        // The CLI reports the same message on stderr and exits 1.
        let out = ours(d, &["info", "-f", "qcow2", &file]);
        let err = stderr_of(&out);
        if code(&out) != 1
            || !err.starts_with("qcow2: ")
            || !err.contains(&msg)
            || err.contains("panicked")
        {
            failures.push(format!(
                "{}: `qcow2 info` exited {} with stderr {err:?} (want 1 and {msg:?})",
                r.name,
                code(&out)
            ));
        }

        // QEMU refuses to open it too.
        let q = qemu_open(d, &file);
        if q.status.success() {
            failures.push(format!(
                "{}: qemu-io opens it ({}) but we refuse it with {msg:?}",
                r.name,
                stdout_of(&q).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// QEMU ignores a bitmaps extension whose autoclear bit is clear (it was
/// left behind by a program without bitmap support) after checking only its
/// length: such an image must open.
#[test]
fn stale_bitmaps_extension_is_ignored_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    for (name, ext) in [
        ("stale-zero-bitmaps.qcow2", bitmaps_ext(0, 0, 0, 0)),
        ("stale-reserved.qcow2", bitmaps_ext(1, 7, 64, 0x5_0008)),
    ] {
        let mut b = plain.clone();
        add_extension(&mut b, EXT_BITMAPS, ext);
        std::fs::write(s.path(name), &b).unwrap();
        let q = qemu_open(d, name);
        assert!(q.status.success(), "{name}: qemu-io refuses it: {q:?}");
        match open_outcome(b) {
            Outcome::Opened => {}
            Outcome::Refused(m) => panic!("{name}: qemu-io opens it, Image::open refuses: {m}"),
            Outcome::Panicked(p) => panic!("{name}: Image::open panicked: {p}"),
        }
    }
}

#[test]
fn luks_images_are_refused_naming_luks() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "x.qcow2",
            "1M",
        ],
    );
    let bytes = std::fs::read(s.path("x.qcow2")).unwrap();
    assert_eq!(get32(&bytes, CRYPT_METHOD), 2);
    let err = Image::open(bytes, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Encrypted { method: "luks" }),
        "{err:?}"
    );
    assert!(err.to_string().contains("luks"), "{err}");

    let out = ours(d, &["convert", "-O", "raw", "x.qcow2", "x.raw"]);
    let stderr = stderr_of(&out);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(
        stderr.starts_with("qcow2: ") && stderr.contains("luks") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Reading through corrupt metadata.

/// Opens `bytes` (which must open) and reads `len` bytes at `offset`,
/// expecting an error whose message contains every string of `want`.
fn expect_read_error(name: &str, bytes: Vec<u8>, offset: u64, len: usize, want: &[&str]) {
    let r = no_panic(&format!("{name}: read"), || {
        let mut img = Image::open(bytes, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{name}: open failed: {e}"));
        let mut buf = vec![0u8; len];
        img.read_at(offset, &mut buf).map(|_| buf)
    });
    let err = match r {
        Ok(_) => panic!("{name}: read through corrupt metadata succeeded"),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(err.contains(w), "{name}: error {err:?} lacks {w:?}");
    }
}

#[test]
fn unaligned_l2_table_is_a_read_error() {
    let s = Scratch::new();
    let plain = plain_image(s.dir());
    let g = Geom::of(&plain);
    let l2 = g.l2_table(&plain, 0) as u64;
    let mut b = plain.clone();
    put64(&mut b, g.l1_entry(0), COPIED | (l2 + 512));
    expect_read_error(
        "unaligned L2 table",
        b,
        0,
        512,
        &["unaligned L2 table", &format!("{:#x}", l2 + 512)],
    );
}

#[test]
fn unaligned_data_cluster_is_a_read_error() {
    let s = Scratch::new();
    let plain = plain_image(s.dir());
    let g = Geom::of(&plain);
    let l2 = g.l2_table(&plain, 0);
    let data = get64(&plain, l2) & OFFSET_MASK;
    let mut b = plain.clone();
    put64(&mut b, l2, COPIED | (data + 512));
    expect_read_error(
        "unaligned data cluster",
        b,
        0,
        512,
        &["not aligned", &format!("{:#x}", data + 512)],
    );
}

#[test]
fn subcluster_both_allocated_and_zero_is_a_read_error() {
    let s = Scratch::new();
    let e = extl2_image(s.dir());
    let g = Geom::of(&e);
    assert_ne!(get64(&e, INCOMPATIBLE_FEATURES) & INCOMPAT_EXTL2, 0);
    let l2 = g.l2_table(&e, 0);
    assert_eq!(
        get64(&e, l2 + 8),
        0xffff_ffff,
        "all 32 subclusters allocated"
    );
    let mut b = e.clone();
    let bitmap = 0x0000_0001_ffff_ffffu64;
    put64(&mut b, l2 + 8, bitmap);
    expect_read_error(
        "allocated and zero subcluster",
        b,
        0,
        512,
        &["subcluster bitmap", &format!("{bitmap:#x}")],
    );
}

#[test]
fn garbage_compressed_clusters_are_decompression_errors() {
    let s = Scratch::new();
    let d = s.dir();
    for ctype in ["zlib", "zstd"] {
        let (mut b, raw) = compressed_image(d, ctype);
        let g = Geom::of(&b);
        let cs = to_usize(g.cluster_size);
        let l2 = g.l2_table(&b, 0);
        let entry = get64(&b, l2);
        assert_ne!(entry & COMPRESSED, 0, "{ctype}: cluster 0 is compressed");
        let mut img = Image::open(b.clone(), &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; cs];
        img.read_at(0, &mut buf).unwrap();
        assert!(buf == raw[..cs], "{ctype}: valid image reads back");

        let (off, len) = compressed_extent(entry, g.cluster_bits);
        let end = (off + len).min(b.len());
        b[off..end].fill(0xff);
        let file = format!("garbage-{ctype}.qcow2");
        std::fs::write(s.path(&file), &b).unwrap();
        let r = no_panic(&format!("{ctype}: decompressing garbage"), || {
            let mut img = Image::open(b, &OpenOptions::default()).unwrap();
            let mut buf = vec![0u8; cs];
            img.read_at(0, &mut buf)
        });
        let err = match r {
            Ok(()) => panic!("{ctype}: garbage decompressed without error"),
            Err(e) => e,
        };
        assert!(
            matches!(err, Error::Decompress { host_offset, .. } if host_offset == off as u64),
            "{ctype}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("decompress") && msg.contains(&format!("{off:#x}")),
            "{ctype}: {msg}"
        );

        let out = ours(d, &["convert", "-O", "raw", &file, "garbage.raw"]);
        let stderr = stderr_of(&out);
        assert_eq!(code(&out), 1, "{ctype}: {stderr}");
        assert!(
            stderr.contains("decompress") && !stderr.contains("panicked"),
            "{ctype}: {stderr}"
        );
    }
}

#[test]
fn l2_table_past_end_of_file_does_not_panic() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let g = Geom::of(&plain);
    let mut b = plain.clone();
    put64(&mut b, g.l1_entry(0), COPIED | (1 << 40));
    std::fs::write(s.path("far-l2.qcow2"), &b).unwrap();
    let started = Instant::now();
    let (read, check) = no_panic("L2 table past EOF", || {
        let mut img = Image::open(b, &OpenOptions::default()).unwrap();
        let mut buf = vec![0x77u8; to_usize(g.size)];
        let read = img.read_at(0, &mut buf).map(|_| buf);
        (read, img.check())
    });
    if let Ok(buf) = read {
        assert!(
            buf.iter().all(|&x| x == 0),
            "a missing L2 table reads zeros"
        );
    }
    match check {
        Ok(rep) => assert!(rep.corruptions > 0, "check must flag it: {rep:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    assert!(started.elapsed() < QUICK);

    // The same through files and the CLI.
    let mut disk = Disk::open(&s.path("far-l2.qcow2"), &DiskOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    if disk.read_at(0, &mut buf).is_ok() {
        assert!(buf.iter().all(|&x| x == 0));
    }
    let out = ours(d, &["convert", "-O", "raw", "far-l2.qcow2", "far.raw"]);
    assert!(
        matches!(code(&out), 0 | 1) && !stderr_of(&out).contains("panicked"),
        "{out:?}"
    );
}

#[test]
fn truncated_images_fail_cleanly() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let g = Geom::of(&plain);
    let cs = to_usize(g.cluster_size);
    let l2 = g.l2_table(&plain, 0);
    let data = to_usize(get64(&plain, l2) & OFFSET_MASK);
    let lens = [
        0,
        50,
        100,
        104,
        g.header_length,
        cs,
        to_usize(g.rt_offset) + 4,
        g.refcount_block(&plain) + 10,
        to_usize(g.l1_offset),
        to_usize(g.l1_offset) + 4,
        l2 + 100,
        data + 1000,
    ];
    for len in lens {
        let bytes = plain[..len].to_vec();
        let started = Instant::now();
        let r = no_panic(&format!("truncated at {len}"), || {
            let mut img = match Image::open(bytes, &OpenOptions::default()) {
                Ok(img) => img,
                Err(e) => return Err(e.to_string()),
            };
            let mut buf = vec![0u8; to_usize(g.size)];
            let read = img.read_at(0, &mut buf).map_err(|e| e.to_string());
            let check = img.check().map_err(|e| e.to_string());
            Ok((read.map(|_| buf), check))
        });
        match r {
            Err(msg) => assert!(!msg.is_empty()),
            Ok((read, _check)) => {
                assert!(len >= 104, "truncated at {len}: opened");
                // Whatever was read matches the original where the file is intact.
                if let Ok(buf) = read {
                    if len > data + 512 {
                        assert!(buf[..512].iter().all(|&x| x == 0x5a), "truncated at {len}");
                    }
                }
            }
        }
        assert!(started.elapsed() < QUICK, "truncated at {len}: too slow");
    }

    // The CLI on a 50-byte file.
    std::fs::write(s.path("short.qcow2"), &plain[..50]).unwrap();
    let out = ours(d, &["info", "-f", "qcow2", "short.qcow2"]);
    let stderr = stderr_of(&out);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(
        stderr.starts_with("qcow2: ") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Backing chains.

fn expect_open_error(path: &Path, opts: &DiskOptions, want: &str) {
    let started = Instant::now();
    let r = no_panic(&path.display().to_string(), || {
        Disk::open(path, opts).map(|_| ())
    });
    let elapsed = started.elapsed();
    match r {
        Ok(()) => panic!("{}: opened", path.display()),
        Err(e) => assert!(
            e.to_string().contains(want),
            "{}: {e} lacks {want:?}",
            path.display()
        ),
    }
    assert!(elapsed < QUICK, "{}: took {elapsed:?}", path.display());
}

#[test]
fn backing_loops_are_errors() {
    let s = Scratch::new();
    let d = s.dir();
    // A -> A
    qemu_create(d, "self.qcow2", "", "1M");
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    // B -> A -> B
    qemu_create(d, "a.qcow2", "", "1M");
    qemu_overlay(d, "b.qcow2", "", ("a.qcow2", "qcow2"), Some("1M"));
    qemu_img(
        d,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );

    // C -> link -> C, where link.qcow2 is a symbolic link to C: loops are
    // found by file identity, not by name.
    qemu_create(d, "c.qcow2", "", "1M");
    std::os::unix::fs::symlink("c.qcow2", s.path("link.qcow2")).unwrap();
    qemu_img(
        d,
        &["rebase", "-u", "-b", "link.qcow2", "-F", "qcow2", "c.qcow2"],
    );

    let opts = DiskOptions::default();
    for name in ["self.qcow2", "a.qcow2", "b.qcow2", "c.qcow2"] {
        expect_open_error(&s.path(name), &opts, "loop");
        // Without following backing files the images are fine.
        let no_backing = DiskOptions {
            qcow2: OpenOptions {
                no_backing: true,
                ..OpenOptions::default()
            },
            ..DiskOptions::default()
        };
        Disk::open(&s.path(name), &no_backing).unwrap();
    }

    for name in ["self.qcow2", "b.qcow2"] {
        let started = Instant::now();
        let out = ours(d, &["convert", "-O", "raw", name, "out.raw"]);
        let stderr = stderr_of(&out);
        assert_eq!(code(&out), 1, "{name}: {stderr}");
        assert!(
            stderr.starts_with("qcow2: ")
                && stderr.contains("loop")
                && !stderr.contains("panicked"),
            "{name}: {stderr}"
        );
        let out = ours(d, &["info", "--backing-chain", name]);
        let q = run_in(d, "qemu-img", &["info", "--backing-chain", name]);
        assert_eq!(code(&out), code(&q), "{name}: info --backing-chain");
        assert!(stderr_of(&out).contains("loop"), "{name}: {out:?}");
        assert!(started.elapsed() < QUICK);
    }
}

#[test]
fn backing_chains_deeper_than_the_limit_are_errors() {
    let s = Scratch::new();
    let d = s.dir();
    let name = |i: usize| format!("c{i:03}.qcow2");
    qemu_image(d, &name(0), "", "1M", &["write -P 0x42 0 4k"]);
    qemu_overlay(d, &name(1), "", (&name(0), "qcow2"), Some("1M"));
    let template = std::fs::read(s.path(&name(1))).unwrap();
    let bfo = to_usize(get64(&template, BACKING_FILE_OFFSET));
    assert_eq!(&template[bfo..bfo + 10], name(0).as_bytes());
    let depth = qcowkit_core::DEFAULT_MAX_CHAIN_DEPTH as usize;
    for i in 2..=depth + 2 {
        let mut b = template.clone();
        b[bfo..bfo + 10].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(s.path(&name(i)), &b).unwrap();
    }

    // A small limit: three backing files below the top are fine, four are not.
    let limited = DiskOptions {
        qcow2: OpenOptions {
            max_chain_depth: 3,
            ..OpenOptions::default()
        },
        ..DiskOptions::default()
    };
    let mut disk = Disk::open(&s.path(&name(3)), &limited).unwrap();
    let mut buf = [0u8; 512];
    disk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x42; 512], "data read through three backing files");
    expect_open_error(
        &s.path(&name(4)),
        &limited,
        "backing chain is deeper than the limit of 3",
    );

    // The default limit.
    Disk::open(&s.path(&name(depth)), &DiskOptions::default()).unwrap();
    expect_open_error(
        &s.path(&name(depth + 1)),
        &DiskOptions::default(),
        &format!("deeper than the limit of {depth}"),
    );
    let out = ours(d, &["convert", "-O", "raw", &name(depth + 2), "deep.raw"]);
    let stderr = stderr_of(&out);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(
        stderr.contains("deeper than the limit") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// `qcow2 check` exit codes against `qemu-img check`.

/// Writes `bytes` as `file` in `d`, then runs `qemu-img check` and `qcow2
/// check` on it (format qcow2): (qemu-img's output, ours).
fn both_checks(d: &Path, file: &str, bytes: &[u8]) -> (Output, Output) {
    std::fs::write(d.join(file), bytes).unwrap();
    let args = ["check", "-f", "qcow2", file];
    (run_in(d, "qemu-img", &args), ours(d, &args))
}

#[test]
fn check_exit_codes_match_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let ext = extl2_image(d);
    let g = Geom::of(&plain);
    let l2 = g.l2_table(&plain, 0);
    let data0 = get64(&plain, l2) & OFFSET_MASK;
    let data1 = get64(&plain, l2 + 8) & OFFSET_MASK;
    assert_ne!(data1, 0, "the second cluster is allocated");
    let rc0 = g.refcount_of(&plain, data0);
    assert_eq!(get16(&plain, rc0), 1);
    let ge = Geom::of(&ext);
    let el2 = ge.l2_table(&ext, 0);

    // (name, image, our expected exit code, whether qemu-img check agrees)
    type Case = (&'static str, Vec<u8>, i32, bool);
    let mut cases: Vec<Case> = Vec::new();
    let mut patched = |name, base: &Vec<u8>, f: &dyn Fn(&mut Vec<u8>), want, like_qemu| {
        let mut b = base.clone();
        f(&mut b);
        cases.push((name, b, want, like_qemu));
    };
    patched("clean", &plain, &|_| {}, 0, true);
    // The second data cluster is no longer referenced: a leak.
    patched("leaked-cluster", &plain, &|b| put64(b, l2 + 8, 0), 3, true);
    // A referenced cluster with refcount 0.
    patched("refcount-too-low", &plain, &|b| put16(b, rc0, 0), 2, true);
    // Refcount 2 on a cluster referenced once with the COPIED flag.
    patched(
        "refcount-too-high-copied",
        &plain,
        &|b| put16(b, rc0, 2),
        2,
        true,
    );
    patched(
        "l2-entry-unaligned",
        &plain,
        &|b| put64(b, l2, COPIED | (data0 + 512)),
        2,
        true,
    );
    patched(
        "l1-entry-unaligned",
        &plain,
        &|b| put64(b, g.l1_entry(0), COPIED | (l2 as u64 + 512)),
        2,
        true,
    );
    patched(
        "l2-table-past-eof",
        &plain,
        &|b| put64(b, g.l1_entry(0), COPIED | (1 << 30)),
        2,
        true,
    );
    patched(
        "extl2-allocated-and-zero",
        &ext,
        &|b| put64(b, el2 + 8, 0x0000_0001_ffff_ffff),
        2,
        true,
    );
    let rt = to_usize(g.rt_offset);
    let rb = g.refcount_block(&plain) as u64;
    // qemu-img check exits 1 here: after reporting the corruption its own
    // refcount lookups fail ("Can't get refcount for cluster N: Input/output
    // error"). Reporting corruptions (2) is the meaningful answer.
    patched(
        "refcount-block-unaligned",
        &plain,
        &|b| put64(b, rt, rb + 512),
        2,
        false,
    );
    patched(
        "refcount-block-past-eof",
        &plain,
        &|b| put64(b, rt, 1 << 30),
        2,
        true,
    );

    let mut failures = Vec::new();
    for (name, bytes, want, like_qemu) in cases {
        let (q, o) = both_checks(d, &format!("{name}.qcow2"), &bytes);
        let stderr = stderr_of(&o);
        if stderr.contains("panicked") {
            failures.push(format!("{name}: qcow2 check panicked: {stderr}"));
        }
        if code(&o) != want || (like_qemu && code(&q) != want) {
            failures.push(format!(
                "{name}: qcow2 check exited {} (stdout {:?}, stderr {stderr:?}); qemu-img check exited {} ({:?} {:?}); expected {want}",
                code(&o),
                stdout_of(&o),
                code(&q),
                stdout_of(&q),
                stderr_of(&q),
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A broken snapshot table entry is something `qemu-img check` reports (exit
/// 2, "snapshot table entry corrupted"); QEMU opens such images (it only
/// validates snapshot L1 tables when it uses them), so `qcow2 check` must be
/// able to open them too.
#[test]
fn check_reports_broken_snapshot_l1_tables_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    plain_image(d);
    let snap = snapshot_image(d);
    let so = to_usize(Geom::of(&snap).snapshots_offset);
    let cases: [(&str, Patch); 2] = [
        (
            "snapshot-l1-unaligned",
            Box::new(move |b| {
                let off = get64(b, so);
                put64(b, so, off + 512);
            }),
        ),
        (
            "snapshot-l1-too-large",
            Box::new(move |b| put32(b, so + 8, 5_000_000)),
        ),
    ];
    let mut failures = Vec::new();
    for (name, patch) in cases {
        let mut b = snap.clone();
        patch(&mut b);
        let (q, o) = both_checks(d, &format!("{name}.qcow2"), &b);
        if code(&q) != 2 || code(&o) != code(&q) {
            failures.push(format!(
                "{name}: qemu-img check exited {} ({}), qcow2 check exited {} ({})",
                code(&q),
                stderr_of(&q).lines().next().unwrap_or(""),
                code(&o),
                stderr_of(&o).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// `qemu-img check` only flags a reference that extends past the end of the
/// file by a whole cluster or more (a file may end inside its last cluster,
/// reading zeros there): a fresh image cut just before its 8-byte L1 table
/// checks clean.
#[test]
fn check_tolerates_tables_less_than_a_cluster_past_eof_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "fresh.qcow2", "", "1M");
    let b = std::fs::read(s.path("fresh.qcow2")).unwrap();
    let g = Geom::of(&b);
    assert_eq!(
        b.len(),
        to_usize(g.l1_offset) + 8,
        "the L1 table ends the file"
    );
    let (q, o) = both_checks(d, "cut.qcow2", &b[..to_usize(g.l1_offset)]);
    assert_eq!(
        code(&o),
        code(&q),
        "qcow2 check: {} {}\nqemu-img check: {}",
        stdout_of(&o),
        stderr_of(&o),
        stdout_of(&q)
    );
}

// ---------------------------------------------------------------------------
// Random mutations.

/// A base image for mutation and the byte ranges worth mutating.
struct FuzzBase {
    name: &'static str,
    bytes: Vec<u8>,
    regions: Vec<std::ops::Range<usize>>,
}

fn fuzz_base(name: &'static str, bytes: Vec<u8>) -> FuzzBase {
    let g = Geom::of(&bytes);
    let cs = to_usize(g.cluster_size);
    let v3 = get32(&bytes, VERSION) == 3;
    let fixed_end = if v3 { g.header_length } else { 72 };
    let ext_end = {
        let used: usize = if v3 {
            extensions(&bytes)
                .iter()
                .map(|(_, d)| 8 + d.len().div_ceil(8) * 8)
                .sum()
        } else {
            0
        };
        fixed_end + used + 8
    };
    let l1 = to_usize(g.l1_offset);
    let l1_end = l1 + 8 * g.l1_size as usize;
    // Ranges are repeated to weight them: header fields and tables matter
    // more than the feature names.
    let mut regions = vec![
        0..fixed_end,
        0..fixed_end,
        0..fixed_end,
        0..fixed_end,
        fixed_end..ext_end,
        0..cs,
        l1..l1_end,
        l1..l1_end,
    ];
    let entry = if v3 && get64(&bytes, INCOMPATIBLE_FEATURES) & INCOMPAT_EXTL2 != 0 {
        16
    } else {
        8
    };
    let used_entries = to_usize(g.size.div_ceil(g.cluster_size)).min(cs / entry);
    let mut l2_regions = Vec::new();
    for i in 0..g.l1_size as usize {
        let l2 = g.l2_table(&bytes, i);
        if l2 != 0 {
            l2_regions.push(l2..l2 + used_entries * entry);
        }
    }
    while !l2_regions.is_empty() && l2_regions.len() < 3 {
        l2_regions.extend(l2_regions.clone());
    }
    regions.extend(l2_regions);
    let rt = to_usize(g.rt_offset);
    regions.push(rt..rt + 16);
    let rb = g.refcount_block(&bytes);
    regions.push(rb..rb + 64);
    if get32(&bytes, NB_SNAPSHOTS) > 0 {
        let so = to_usize(g.snapshots_offset);
        regions.push(so..so + 64);
        regions.push(so..so + 64);
    }
    FuzzBase {
        name,
        bytes,
        regions,
    }
}

/// Applies one random mutation inside `region` and describes it.
fn mutate(rng: &mut XorShift64, bytes: &mut [u8], region: &std::ops::Range<usize>) -> String {
    let at = region.start + rng.index(region.len());
    match rng.index(4) {
        0 => {
            let old = bytes[at];
            bytes[at] ^= 1 << rng.index(8);
            format!("[{at:#x}] {old:#04x}->{:#04x}", bytes[at])
        }
        1 => {
            let old = bytes[at];
            bytes[at] = rng.next_u64() as u8;
            format!("[{at:#x}] {old:#04x}->{:#04x}", bytes[at])
        }
        2 => {
            let at = (at & !3).min(bytes.len() - 4);
            let values = [
                0,
                1,
                0x7fff_ffff,
                0x8000_0000,
                u32::MAX,
                rng.next_u64() as u32 & 0xffff,
            ];
            let v = values[rng.index(values.len())];
            let old = get32(bytes, at);
            put32(bytes, at, v);
            format!("u32[{at:#x}] {old:#x}->{v:#x}")
        }
        _ => {
            let at = (at & !7).min(bytes.len() - 8);
            let values = [
                0,
                COPIED,
                COMPRESSED | rng.next_u64() >> 2,
                u64::MAX,
                i64::MAX as u64,
                (rng.next_u64() % (1 << 20)) << 9,
                COPIED | ((rng.next_u64() % 64) << 16),
            ];
            let v = values[rng.index(values.len())];
            let old = get64(bytes, at);
            put64(bytes, at, v);
            format!("u64[{at:#x}] {old:#x}->{v:#x}")
        }
    }
}

/// Opens, reads every cluster of (the first 4 MiB of) the disk and checks.
fn exercise(bytes: Vec<u8>) {
    let Ok(mut img) = Image::open(bytes, &OpenOptions::default()) else {
        return;
    };
    let limit = img.size().min(4 << 20);
    let chunk = img.cluster_size().max(64 * 1024);
    let mut buf = vec![0u8; to_usize(chunk)];
    let mut pos = 0;
    while pos < limit {
        let n = chunk.min(limit - pos);
        let _ = img.read_at(pos, &mut buf[..to_usize(n)]);
        pos += n;
    }
    let _ = img.check();
}

#[test]
fn random_mutations_never_panic() {
    let seed = env_seed("HOSTILE_SEED")
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_nanos() as u64)
                .unwrap_or(1)
        })
        .max(1);
    announce_seed("random_mutations_never_panic", "HOSTILE_SEED", seed);

    let s = Scratch::new();
    let d = s.dir();
    let small = qemu_image(
        d,
        "small.qcow2",
        "cluster_size=512",
        "256k",
        &[
            "write -P 0x33 0 40k",
            "write -z 100k 8k",
            "write -P 0x44 200k 4k",
        ],
    );
    let (zlib, _) = compressed_image(d, "zlib");
    let v2 = qemu_image(
        d,
        "v2.qcow2",
        "compat=0.10,cluster_size=4k",
        "1M",
        &["write -P 0x55 0 12k", "write -P 0x66 600k 4k"],
    );
    let bases = [
        fuzz_base("plain", plain_image(d)),
        fuzz_base("512-byte clusters", small),
        fuzz_base("extended L2", extl2_image(d)),
        fuzz_base("compressed", zlib),
        fuzz_base("snapshot", snapshot_image(d)),
        fuzz_base("version 2", v2),
    ];
    for b in &bases {
        exercise(b.bytes.clone());
    }

    let mut rng = XorShift64(seed);
    let started = Instant::now();
    let mut slowest = (Duration::ZERO, 0usize);
    for iter in 0..2000 {
        let base = &bases[iter % bases.len()];
        let mut bytes = base.bytes.clone();
        let mut mutations = Vec::new();
        for _ in 0..1 + rng.index(3) {
            let region = &base.regions[rng.index(base.regions.len())];
            mutations.push(mutate(&mut rng, &mut bytes, region));
        }
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| exercise(bytes)));
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, iter);
        }
        if let Err(p) = r {
            panic!(
                "seed {seed}, iteration {iter}, base {}: mutations {} panicked: {}",
                base.name,
                mutations.join(", "),
                panic_text(&*p)
            );
        }
        assert!(
            took < QUICK,
            "seed {seed}, iteration {iter}, base {}: mutations {} took {took:?}",
            base.name,
            mutations.join(", ")
        );
    }
    let total = started.elapsed();
    println!(
        "2000 mutations in {total:?}, slowest {:?} (iteration {})",
        slowest.0, slowest.1
    );
    assert!(
        total < Duration::from_secs(20),
        "seed {seed}: 2000 mutations took {total:?}"
    );
}
