//! Property test of the write path against a byte model of the guest disk.
//!
//! Random sequences of writes, zero writes, discards, compressed writes,
//! flushes and reopens run on small images (cluster sizes 512 / 4k / 64k,
//! extended L2 on/off, version 2 and 3, refcount widths 1/16/64, small
//! caches, with or without a qcow2 or raw backing file; new images of ours,
//! or images made and filled by qemu-img, optionally with an internal
//! snapshot) and on a plain byte array; the whole guest disk must match
//! after every operation. At the end our `check()` must find neither
//! corruptions nor leaks, `qemu-img check` must pass and `qemu-img compare`
//! must find the image equal to the model.
//!
//! Model semantics: writes and zero writes as expected; a discard changes
//! only the whole clusters it covers, which then read as zeros on v3 images
//! and from the backing file (zeros without one) on v2 images.
//!
//! `PROPTEST_CASES` sets the number of cases (default 64) and
//! `PROPTEST_RNG_SEED` the seed (random by default, printed). Failures print
//! the shrunk setup and operation sequence. The plain tests at the end pin
//! bugs the property found.

use std::fmt;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use qcowkit_core::{create, CreateOptions, Image, OpenOptions, WritableImage};
use qcowkit_tests::*;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Backing files (made once)

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackingKind {
    None,
    /// A qcow2 file made by qemu-img (64k clusters, 4 MiB, with data, zero
    /// clusters and holes).
    Qcow2,
    /// A raw file shorter than the disk (3 MiB + 777 bytes).
    Raw,
}

struct Bases {
    qcow2_file: Vec<u8>,
    qcow2_guest: Vec<u8>,
    raw: Vec<u8>,
}

fn bases() -> &'static Bases {
    static BASES: OnceLock<Bases> = OnceLock::new();
    BASES.get_or_init(|| {
        let s = Scratch::new();
        let qcow2_file = qemu_image(
            s.dir(),
            "base.qcow2",
            "",
            "4M",
            &[
                "write -P 0x11 0 300k",
                "write -P 0x22 1M 64k",
                "write -P 0x33 1100000 5000",
                "write -P 0x44 2M 1M",
                "write -z 2200k 128k",
                "write -P 0x55 4128768 65536",
            ],
        );
        let mut raw = vec![0u8; (3 * MIB + 777) as usize];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = ((i / 512) as u8).wrapping_mul(29) ^ (i as u8) | 0x80;
        }
        Bases {
            qcow2_guest: qemu_contents(s.dir(), "base.qcow2"),
            qcow2_file,
            raw,
        }
    })
}

impl BackingKind {
    fn name(self) -> Option<(&'static str, &'static str)> {
        match self {
            BackingKind::None => None,
            BackingKind::Qcow2 => Some(("base.qcow2", "qcow2")),
            BackingKind::Raw => Some(("base.raw", "raw")),
        }
    }
    fn file(self) -> &'static [u8] {
        match self {
            BackingKind::None => &[],
            BackingKind::Qcow2 => &bases().qcow2_file,
            BackingKind::Raw => &bases().raw,
        }
    }
    /// Guest contents the backing file gives to the top image.
    fn guest(self) -> &'static [u8] {
        match self {
            BackingKind::None => &[],
            BackingKind::Qcow2 => &bases().qcow2_guest,
            BackingKind::Raw => &bases().raw,
        }
    }

    /// An opener handing out the backing file by name.
    fn opener(self) -> Files {
        match self.name() {
            Some((n, _)) => Files::new().with(n, self.file().to_vec()),
            None => Files::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Cases

#[derive(Clone, Debug)]
struct Setup {
    cluster_size: u64,
    v3: bool,
    extended_l2: bool,
    refcount_bits: u32,
    backing: BackingKind,
    size: u64,
    small_caches: bool,
    origin: Origin,
}

/// Who made the image the operations start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// `create::format`, empty.
    Ours,
    /// qemu-img, then filled by qemu-io (data, compressed and zero clusters).
    Qemu,
    /// Like `Qemu`, plus an internal snapshot and more writes after it, so
    /// that clusters and L2 tables are shared (copy-on-write paths).
    QemuSnapshot,
}

impl Setup {
    /// Granularity of allocation: subclusters with extended L2.
    fn sc(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size / 32
        } else {
            self.cluster_size
        }
    }

    fn create_options(&self) -> CreateOptions {
        let (backing_file, backing_format) = match self.backing.name() {
            Some((n, f)) => (Some(n.to_string()), Some(f.to_string())),
            None => (None, None),
        };
        CreateOptions {
            size: self.size,
            cluster_size: self.cluster_size,
            v3: self.v3,
            refcount_bits: self.refcount_bits,
            extended_l2: self.extended_l2,
            backing_file,
            backing_format,
            ..CreateOptions::default()
        }
    }

    fn open_options(&self) -> OpenOptions {
        if self.small_caches {
            OpenOptions {
                l2_cache_bytes: Some(2 * self.cluster_size),
                refcount_cache_bytes: Some(self.cluster_size),
                ..OpenOptions::default()
            }
        } else {
            OpenOptions::default()
        }
    }

    fn open_rw(&self, disk: Vec<u8>) -> Result<WritableImage<Vec<u8>>, String> {
        let opts = self.open_options();
        let r = if self.backing == BackingKind::None {
            WritableImage::open(disk, &opts)
        } else {
            WritableImage::open_with(disk, "top.qcow2", "top", &mut self.backing.opener(), &opts)
        };
        r.map_err(|e| format!("open_rw: {e}"))
    }

    fn open_ro(&self, disk: Vec<u8>) -> Result<Image<Vec<u8>>, String> {
        let opts = OpenOptions::default();
        let r = if self.backing == BackingKind::None {
            Image::open(disk, &opts)
        } else {
            Image::open_with(disk, "top.qcow2", "top", &mut self.backing.opener(), &opts)
        };
        r.map_err(|e| format!("open: {e}"))
    }
}

#[derive(Clone)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Compressed { off: u64, pat: u8 },
    Flush,
    Reopen,
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Write { off, len, pat } => {
                write!(f, "write({off:#x}, {len:#x}, pat {pat:#04x})")
            }
            Op::Zero { off, len } => write!(f, "write_zeroes({off:#x}, {len:#x})"),
            Op::Discard { off, len } => write!(f, "discard({off:#x}, {len:#x})"),
            Op::Compressed { off, pat } => {
                write!(f, "write_compressed({off:#x}, pat {pat:#04x})")
            }
            Op::Flush => write!(f, "flush()"),
            Op::Reopen => write!(f, "reopen()"),
        }
    }
}

/// Compressible contents of a compressed write: one value per sector.
fn compressible(pat: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|x| pat ^ ((x >> 9) as u8).wrapping_mul(0x3b))
        .collect()
}

/// Bytes written by a write with pattern `pat`: they depend on the guest
/// offset too, so that data landing at the wrong place is noticed.
fn pattern(pat: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|x| pat ^ (x as u8) ^ ((x >> 9) as u8).wrapping_mul(0x3b))
        .collect()
}

fn setup_strategy() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(512u64), Just(4096), Just(65536)],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(16u32), Just(1), Just(64)],
        prop_oneof![
            Just(BackingKind::None),
            Just(BackingKind::Qcow2),
            Just(BackingKind::Raw)
        ],
        prop_oneof![Just(4 * MIB), Just(4 * MIB - 1536), Just(4 * MIB + 512)],
        prop::bool::weighted(0.25),
        prop_oneof![
            2 => Just(Origin::Ours),
            1 => Just(Origin::Qemu),
            1 => Just(Origin::QemuSnapshot)
        ],
    )
        .prop_map(
            |(cluster_size, v3, ext, rb, backing, size, small_caches, origin)| Setup {
                cluster_size,
                v3,
                extended_l2: ext && v3 && cluster_size >= 16384,
                // Snapshots need refcounts of 2: not with 1-bit refcounts.
                refcount_bits: if !v3 || (rb == 1 && origin == Origin::QemuSnapshot) {
                    16
                } else {
                    rb
                },
                backing,
                size,
                small_caches,
                origin,
            },
        )
}

/// Guest ranges biased towards cluster and subcluster boundaries.
fn range_strategy(s: &Setup) -> impl Strategy<Value = (u64, u64)> {
    let size = s.size;
    let cs = s.cluster_size;
    let sc = s.sc();
    let off = prop_oneof![
        0..size,
        (0..size.div_ceil(cs)).prop_map(move |c| c * cs),
        (0..size.div_ceil(sc)).prop_map(move |c| c * sc),
        ((1..size / cs), -700i64..700).prop_map(move |(c, d)| (c * cs).saturating_add_signed(d)),
    ];
    let len = prop_oneof![
        3 => 0..=3 * cs,
        3 => (1..=3u64).prop_map(move |n| n * cs),
        3 => (1..=6u64).prop_map(move |n| n * sc),
        3 => 1..=1024u64,
        // Large: many clusters, new L2 tables and refcount blocks (and with
        // small clusters and wide refcounts, a larger refcount table).
        1 => (1..=24u64).prop_map(|n| n * 65536),
    ];
    (off, len).prop_map(move |(off, len)| {
        let off = off.min(size - 1);
        (off, len.min(size - off))
    })
}

fn op_strategy(s: &Setup) -> impl Strategy<Value = Op> {
    let cs = s.cluster_size;
    prop_oneof![
        5 => (range_strategy(s), any::<u8>())
            .prop_map(|((off, len), pat)| Op::Write { off, len, pat }),
        2 => range_strategy(s).prop_map(|(off, len)| Op::Zero { off, len }),
        2 => range_strategy(s).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (0..s.size.div_ceil(s.cluster_size), any::<u8>())
            .prop_map(move |(c, pat)| Op::Compressed { off: c * cs, pat }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn case_strategy() -> impl Strategy<Value = (Setup, Vec<Op>)> {
    setup_strategy().prop_flat_map(|s| {
        let ops = prop::collection::vec(op_strategy(&s), 1..40);
        (Just(s), ops)
    })
}

// ---------------------------------------------------------------------------
// Running a case

/// An image made and filled by qemu-img/qemu-io, and its guest contents.
fn filled_by_qemu(s: &Setup) -> (Vec<u8>, Vec<u8>) {
    let dir = Scratch::new();
    let d = dir.dir();
    let cs = s.cluster_size;
    let opts = format!(
        "cluster_size={cs},compat={},refcount_bits={},extended_l2={}",
        if s.v3 { "1.1" } else { "0.10" },
        s.refcount_bits,
        if s.extended_l2 { "on" } else { "off" }
    );
    let size = s.size.to_string();
    let mut args = vec!["create", "-f", "qcow2", "-o", &opts];
    if let Some((name, format)) = s.backing.name() {
        std::fs::write(dir.path(name), s.backing.file()).unwrap();
        args.extend(["-b", name, "-F", format]);
    }
    args.extend(["top.qcow2", &size]);
    qemu_img(d, &args);
    let cmds = [
        format!("write -P 0x61 0 {}", 2 * cs + 700),
        format!("write -c -P 0x62 {} {cs}", 4 * cs),
        format!("write -c -P 0x63 {} {cs}", 5 * cs),
        format!("write -z {} {}", 8 * cs, 2 * cs),
        format!("write -P 0x64 {} 5000", MIB + 300),
        format!("write -P 0x65 {} 1000", s.size - 1000),
    ];
    qemu_io(d, "top.qcow2", &cmds);
    if s.origin == Origin::QemuSnapshot {
        qemu_img(d, &["snapshot", "-c", "s1", "top.qcow2"]);
        let cmds = [
            format!("write -P 0x66 {cs} {}", cs / 2 + 512),
            format!("write -z {} {cs}", 5 * cs),
            format!("write -P 0x67 {} 3000", 2 * MIB),
        ];
        qemu_io(d, "top.qcow2", &cmds);
    }
    (
        std::fs::read(dir.path("top.qcow2")).unwrap(),
        qemu_contents(d, "top.qcow2"),
    )
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn run_case(s: &Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let size = s.size as usize;
    let cs = s.cluster_size;
    let mut base = vec![0u8; size];
    let g = s.backing.guest();
    let n = g.len().min(size);
    base[..n].copy_from_slice(&g[..n]);

    let (disk, mut model) = match s.origin {
        Origin::Ours => {
            let mut disk = Vec::new();
            create::format(&mut disk, &s.create_options())
                .map_err(|e| fail(format!("create: {e}")))?;
            (disk, base.clone())
        }
        Origin::Qemu | Origin::QemuSnapshot => filled_by_qemu(s),
    };
    let mut img = s.open_rw(disk).map_err(fail)?;
    let mut got = vec![0u8; size];

    for (i, op) in ops.iter().enumerate() {
        let at = |e: String| fail(format!("op {i} {op:?}: {e}"));
        match *op {
            Op::Write { off, len, pat } => {
                let data = pattern(pat, off, len);
                img.write_at(off, &data).map_err(|e| at(e.to_string()))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len } => {
                img.write_zeroes(off, len).map_err(|e| at(e.to_string()))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                img.discard(off, len).map_err(|e| at(e.to_string()))?;
                // Whole clusters only (the last one may be short).
                let mut c = off.div_ceil(cs) * cs;
                while c < off + len {
                    let end = (c + cs).min(s.size);
                    if end > off + len {
                        break;
                    }
                    let r = c as usize..end as usize;
                    if s.v3 {
                        model[r].fill(0);
                    } else {
                        model[r.clone()].copy_from_slice(&base[r]);
                    }
                    c += cs;
                }
            }
            Op::Compressed { off, pat } => {
                let len = cs.min(s.size - off);
                let data = compressible(pat, off, len);
                img.write_compressed(off, &data)
                    .map_err(|e| at(e.to_string()))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Flush => img.flush().map_err(|e| at(e.to_string()))?,
            Op::Reopen => {
                img.flush().map_err(|e| at(e.to_string()))?;
                img = s.open_rw(img.into_inner()).map_err(at)?;
            }
        }
        img.read_at(0, &mut got)
            .map_err(|e| at(format!("read of the whole disk: {e}")))?;
        if got != model {
            let x = first_difference(&got, &model).unwrap_or(0);
            return Err(at(format!(
                "guest byte {x:#x} (cluster {}) reads {:#04x}, model says {:#04x}",
                x as u64 / cs,
                got[x],
                model[x]
            )));
        }
    }

    img.flush().map_err(|e| fail(format!("final flush: {e}")))?;
    let disk = img.into_inner();
    let mut ro = s.open_ro(disk.clone()).map_err(fail)?;
    let rep = ro.check().map_err(|e| fail(format!("check: {e}")))?;
    if rep.corruptions != 0 || rep.leaks != 0 || rep.check_errors != 0 {
        return Err(fail(format!(
            "check after the final flush: {} corruptions, {} leaks: {:?}",
            rep.corruptions, rep.leaks, rep.messages
        )));
    }
    ro.read_at(0, &mut got)
        .map_err(|e| fail(format!("read after reopening: {e}")))?;
    if got != model {
        return Err(fail("reopened image differs from the model".to_string()));
    }

    // QEMU must agree: consistent metadata, same guest contents.
    let dir = Scratch::new();
    if let Some((name, _)) = s.backing.name() {
        std::fs::write(dir.path(name), s.backing.file()).unwrap();
    }
    std::fs::write(dir.path("top.qcow2"), &disk).unwrap();
    std::fs::write(dir.path("model.raw"), &model).unwrap();
    qemu_img_check(dir.dir(), "top.qcow2").map_err(fail)?;
    qemu_img_compare(dir.dir(), "top.qcow2", "qcow2", "model.raw", "raw")
        .map_err(|e| fail(format!("with the model: {e}")))
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seed = env_seed("PROPTEST_RNG_SEED").unwrap_or_else(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        h.finish()
    });
    announce_seed("model", "PROPTEST_RNG_SEED", seed);
    println!("model: {cases} cases");
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // No regression files are written next to the sources.
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn writes_match_a_byte_model((setup, ops) in case_strategy()) {
        run_case(&setup, &ops)?;
    }
}

/// qemu-img creates version 3 images with 512-byte clusters and a backing
/// file (the header extensions then leave out the feature name table, which
/// does not fit in the first cluster); so must we.
#[test]
fn v3_512_byte_clusters_with_a_backing_file_can_be_created() {
    let s = Scratch::new();
    qemu_create(s.dir(), "base.qcow2", "", "4M");
    qemu_overlay(
        s.dir(),
        "qemu.qcow2",
        "cluster_size=512",
        ("base.qcow2", "qcow2"),
        None,
    );
    let mut disk = Vec::new();
    let opts = CreateOptions {
        size: 4 * MIB,
        cluster_size: 512,
        backing_file: Some("base.qcow2".to_string()),
        backing_format: Some("qcow2".to_string()),
        ..CreateOptions::default()
    };
    create::format(&mut disk, &opts)
        .expect("create a v3 image with 512-byte clusters and a backing file");
    std::fs::write(s.path("ours.qcow2"), &disk).unwrap();
    assert_qemu_img_check(s.dir(), "ours.qcow2");
}

/// With 1-bit refcounts a host cluster cannot hold two compressed clusters
/// (its refcount would be 2): like QEMU, the allocator must then start a
/// new host cluster instead of failing with a refcount overflow.
#[test]
fn compressed_writes_with_1_bit_refcounts() {
    let mut img = new_image(&CreateOptions {
        size: 4 * MIB,
        cluster_size: 512,
        refcount_bits: 1,
        ..CreateOptions::default()
    });
    for (i, pat) in [1u8, 2, 3].into_iter().enumerate() {
        let off = i as u64 * 512;
        let stored = img
            .write_compressed(off, &[pat; 512])
            .unwrap_or_else(|e| panic!("compressed write {i} at {off:#x}: {e}"));
        assert!(stored, "a constant sector compresses");
    }
    img.flush().unwrap();
    let mut back = vec![0u8; 1536];
    img.read_at(0, &mut back).unwrap();
    assert!(back[..512].iter().all(|b| *b == 1));
    assert!(back[512..1024].iter().all(|b| *b == 2));
    assert!(back[1024..].iter().all(|b| *b == 3));
    let rep = img.check().unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    // qemu-img is the judge too.
    let s = Scratch::new();
    std::fs::write(s.path("c1.qcow2"), img.into_inner()).unwrap();
    assert_qemu_img_check(s.dir(), "c1.qcow2");
    qemu_io(
        s.dir(),
        "c1.qcow2",
        &["read -P 1 0 512", "read -P 2 512 512", "read -P 3 1024 512"],
    );
}

/// A compressed cluster is freed (discard + flush) and a new compressed
/// cluster lands at the same host offset: reads must return the new data,
/// not the previous cluster's (decompressed data cached by host offset).
#[test]
fn compressed_data_at_a_reused_host_offset_reads_back() {
    let mut img = new_image(&CreateOptions {
        size: 4 * MIB,
        ..CreateOptions::default()
    });
    let cs = 65536u64;
    assert!(img
        .write_compressed(7 * cs, &vec![0x11; cs as usize])
        .unwrap());
    let mut buf = vec![0u8; 16];
    img.read_at(7 * cs, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 16]);
    img.discard(7 * cs, cs).unwrap();
    img.flush().unwrap();
    assert!(img.write_compressed(0, &vec![0x22; cs as usize]).unwrap());
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(
        buf, [0x22; 16],
        "guest offset 0 after the second compressed write"
    );
    // The bytes on disk are right: a fresh open reads the new data.
    img.flush().unwrap();
    let mut fresh = Image::open(img.into_inner(), &OpenOptions::default()).unwrap();
    fresh.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x22; 16], "after reopening");
}
