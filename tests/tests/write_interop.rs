//! Interoperability of the write path with qemu-img / qemu-io 10.
//!
//! * `qcow2 create` with every option must make the image `qemu-img create`
//!   makes (same guest contents, same `info`), and refuse what qemu-img
//!   refuses;
//! * `qcow2 convert -O qcow2` (with `-o`, `-c`, `-B`) from raw and from
//!   qcow2 images made by QEMU must give images `qemu-img check` accepts
//!   and `qemu-img compare` finds identical to the source;
//! * seeded random workloads alternate between qemu-io and our write path
//!   on the same image, against a byte model of the guest disk;
//! * overlays made by one side are used by the other;
//! * `qcow2 dd -O qcow2` and `qcow2 bench -w` leave valid images.
//!
//! Random workloads print their seed; `WRITE_INTEROP_SEED=N` replays one.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use qcowkit_core::{OpenOptions, WritableImage};
use qcowkit_std::{open_qcow2_rw, Disk, DiskOptions, FileIo};
use qcowkit_tests::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

// ---------------------------------------------------------------------------
// Small helpers

/// Failures of a matrix test, reported together at the end.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, ctx: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("[{ctx}] {msg}"));
    }

    fn check(&mut self, ctx: &str, r: Result<(), String>) {
        if let Err(e) = r {
            self.add(ctx, e);
        }
    }

    /// Whether the command `out` came from exited 0; a failure otherwise.
    fn ran(&mut self, ctx: &str, out: &Output) -> bool {
        if code(out) != 0 {
            self.add(ctx, format!("exit {}: {}", code(out), output_text(out)));
        }
        code(out) == 0
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} failure(s):\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Guest contents of an image, read by us.
fn our_contents(path: &Path) -> Result<Vec<u8>, String> {
    let mut disk = Disk::open(path, &DiskOptions::default()).map_err(|e| format!("open: {e}"))?;
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut buf)
        .map_err(|e| format!("read: {e}"))?;
    Ok(buf)
}

/// `qemu-img map --output=json`.
fn map(cwd: &Path, img: &str) -> Vec<Value> {
    match json(&qemu_img(cwd, &["map", "--output=json", img])) {
        Value::Array(v) => v,
        other => panic!("map output is not an array: {other}"),
    }
}

/// Map entries overlapping `[start, end)`.
fn entries_in(map: &[Value], start: u64, end: u64) -> Vec<&Value> {
    map.iter()
        .filter(|e| {
            let s = e["start"].as_u64().unwrap();
            let l = e["length"].as_u64().unwrap();
            s < end && start < s + l
        })
        .collect()
}

/// Seeds of the random workloads: `WRITE_INTEROP_SEED` replaces them.
const SEED_VAR: &str = "WRITE_INTEROP_SEED";

/// Compressible text: numbered lines, `len` bytes starting at line `from`.
fn text_bytes(len: usize, from: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = from;
    while v.len() < len {
        v.extend_from_slice(
            format!("{i:08} the quick brown fox jumps over the lazy dog\n").as_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

/// Creates the directory `dir` (and parents).
fn mkdir(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create directory");
}

/// Runs qemu-io on a qcow2 image with discards enabled (`-d unmap`); the
/// commands must all succeed.
fn qio<S: AsRef<str>>(cwd: &Path, img: &str, cmds: &[S]) -> Result<(), String> {
    for chunk in cmds.chunks(200) {
        let mut args = vec!["-f", "qcow2", "-d", "unmap"];
        for c in chunk {
            args.push("-c");
            args.push(c.as_ref());
        }
        args.push(img);
        let out = run_in(cwd, "qemu-io", &args);
        let t = output_text(&out);
        if code(&out) != 0 || t.contains("error") || t.contains("failed") || t.contains("Error") {
            return Err(format!("qemu-io {img} exited {}: {t}", code(&out)));
        }
    }
    Ok(())
}

/// Opens `path` with our write path (default options), runs `f` on the
/// image, then flushes and closes it.
fn write_ours(path: &Path, f: impl FnOnce(&mut WritableImage<FileIo>)) {
    let mut img = open_qcow2_rw(path, &OpenOptions::default()).unwrap();
    f(&mut img);
    img.flush().unwrap();
}

/// Like [`qio`], panicking on failure.
fn qio_ok<S: AsRef<str> + std::fmt::Debug>(cwd: &Path, img: &str, cmds: &[S]) {
    if let Err(e) = qio(cwd, img, cmds) {
        panic!("{e}\ncommands: {cmds:?}");
    }
}

// ---------------------------------------------------------------------------
// A raw source with varied contents

/// Size of the varied raw source: a partial last 64 KiB cluster.
const RAW_SIZE: u64 = 3 * MIB + 20 * KIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Random,
    Zero,
    Text,
}

/// Regions of the varied raw source.
const LAYOUT: &[(u64, u64, Fill)] = &[
    (0, 512 * KIB, Fill::Random),
    (512 * KIB, 576 * KIB, Fill::Zero),
    (576 * KIB, MIB, Fill::Random),
    (MIB, MIB + 256 * KIB, Fill::Zero),
    (MIB + 256 * KIB, 2 * MIB + 512 * KIB, Fill::Text),
    (2 * MIB + 512 * KIB, 2 * MIB + 768 * KIB, Fill::Zero),
    (2 * MIB + 768 * KIB, RAW_SIZE, Fill::Random),
];

/// Unaligned patches over the layout.
const PATCHES: &[(u64, u64, Fill)] = &[
    (200_000, 290_000, Fill::Zero),
    (700_001, 703_334, Fill::Zero),
    (
        2 * MIB + 800 * KIB + 100,
        2 * MIB + 805 * KIB + 100,
        Fill::Text,
    ),
    (RAW_SIZE - 700, RAW_SIZE - 300, Fill::Zero),
];

/// What `[start, end)` of the varied source holds, when it is all one kind.
fn fill_of(start: u64, end: u64) -> Option<Fill> {
    if PATCHES.iter().any(|(s, e, _)| *s < end && start < *e) {
        return None;
    }
    LAYOUT
        .iter()
        .find(|(s, e, _)| *s <= start && end <= *e)
        .map(|(_, _, f)| *f)
}

fn varied_raw(rng: &mut SplitMix64) -> Vec<u8> {
    let mut v = vec![0u8; RAW_SIZE as usize];
    for (s, e, f) in LAYOUT.iter().chain(PATCHES) {
        let (s, e) = (*s as usize, *e as usize);
        match f {
            Fill::Random => v[s..e].copy_from_slice(&rng.bytes(e - s)),
            Fill::Zero => v[s..e].fill(0),
            Fill::Text => v[s..e].copy_from_slice(&text_bytes(e - s, s as u64)),
        }
    }
    v
}

// ---------------------------------------------------------------------------
// 1. qcow2 create

/// A `create` invocation: `-o` options, `-b`/`-F`, size.
struct CreateCase {
    opts: String,
    backing: Option<(&'static str, &'static str)>,
    size: Option<&'static str>,
}

fn cc(opts: &str) -> CreateCase {
    CreateCase {
        opts: opts.to_string(),
        backing: None,
        size: Some("4M"),
    }
}

fn ccb(opts: &str, b: &'static str, f: &'static str, size: Option<&'static str>) -> CreateCase {
    CreateCase {
        opts: opts.to_string(),
        backing: Some((b, f)),
        size,
    }
}

impl CreateCase {
    fn args(&self) -> Vec<&str> {
        let mut a = vec!["create", "-f", "qcow2"];
        if !self.opts.is_empty() {
            a.extend(["-o", self.opts.as_str()]);
        }
        if let Some((b, f)) = self.backing {
            a.extend(["-b", b, "-F", f]);
        }
        a.push("img.qcow2");
        a.extend(self.size);
        a
    }
}

/// Every creation option alone, and a few combinations (backing files
/// live two directories up).
fn create_cases() -> Vec<CreateCase> {
    let mut v = vec![cc("")];
    for cs in [
        "512", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M", "2M",
    ] {
        v.push(cc(&format!("cluster_size={cs}")));
    }
    v.push(cc("compat=0.10"));
    for rb in ["1", "2", "4", "8", "16", "32", "64"] {
        v.push(cc(&format!("refcount_bits={rb}")));
    }
    v.extend([
        cc("extended_l2=on,cluster_size=16k"),
        cc("extended_l2=on,cluster_size=64k"),
        cc("extended_l2=on,cluster_size=2M"),
        cc("compression_type=zstd"),
        cc("preallocation=metadata"),
        cc("preallocation=falloc"),
        cc("preallocation=full"),
        // A few combinations with preallocation.
        cc("preallocation=metadata,extended_l2=on"),
        cc("preallocation=full,cluster_size=512,refcount_bits=1"),
        cc("preallocation=metadata,compat=0.10,cluster_size=4k"),
        cc("preallocation=full,data_file=img.data"),
        cc("lazy_refcounts=on"),
        cc("data_file=img.data"),
        cc("data_file=img.data,data_file_raw=on"),
        CreateCase {
            opts: "size=3M".into(),
            backing: None,
            size: None,
        },
        ccb("", "../../base.qcow2", "qcow2", Some("4M")),
        ccb("cluster_size=512", "../../base.qcow2", "qcow2", Some("4M")),
        ccb("", "../../base.raw", "raw", Some("4M")),
        ccb("", "../../base.qcow2", "qcow2", None),
        ccb("", "../../base.raw", "raw", None),
        ccb("compat=0.10", "../../base.qcow2", "qcow2", None),
        ccb("extended_l2=on", "../../base.qcow2", "qcow2", None),
        ccb(
            "extended_l2=on,preallocation=metadata",
            "../../base.qcow2",
            "qcow2",
            None,
        ),
        cc("backing_file=../../base.qcow2,backing_fmt=qcow2"),
        CreateCase {
            opts: "backing_file=../../base.raw,backing_fmt=raw".into(),
            backing: None,
            size: None,
        },
    ]);
    v
}

/// Backing files for the create tests: `base.qcow2` (3 MiB, data written by
/// qemu-io) and `base.raw` (3 MiB + 512, random).
fn make_bases(dir: &Path, rng: &mut SplitMix64) {
    qemu_create(dir, "base.qcow2", "", "3M");
    qio_ok(
        dir,
        "base.qcow2",
        &[
            "write -P 0x61 0 100k",
            "write -P 0x62 1M 64k",
            "write -P 0x63 3000000 145728",
        ],
    );
    std::fs::write(dir.join("base.raw"), rng.bytes((3 * MIB + 512) as usize)).unwrap();
}

/// Keys of `info` compared between our image and qemu-img's.
const INFO_KEYS: &[&str] = &[
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
];

#[test]
fn create_matches_qemu_img_for_every_option() {
    let s = Scratch::new();
    let mut rng = SplitMix64::new(1);
    make_bases(s.dir(), &mut rng);
    let mut f = Failures::default();
    for (i, case) in create_cases().iter().enumerate() {
        let args = case.args();
        let ctx = format!("create {}", args[3..].join(" "));
        let ours_dir = s.path(&format!("c{i}/o"));
        let qemu_dir = s.path(&format!("c{i}/q"));
        mkdir(&ours_dir);
        mkdir(&qemu_dir);
        let out = ours(&ours_dir, &args);
        if code(&out) != 0 {
            f.add(
                &ctx,
                format!("ours exited {}: {}", code(&out), output_text(&out)),
            );
            continue;
        }
        let q = run_in(&qemu_dir, "qemu-img", &args);
        assert_eq!(code(&q), 0, "{ctx}: qemu-img failed: {}", output_text(&q));
        let ours_line = stdout_of(&out).trim().to_string();
        let qemu_line = stdout_of(&q).trim().to_string();
        if ours_line != qemu_line {
            f.add(
                &ctx,
                format!("Formatting line differs:\n  ours: {ours_line}\n  qemu: {qemu_line}"),
            );
        }
        f.check(&ctx, qemu_img_check(&ours_dir, "img.qcow2"));
        if case.opts.contains("data_file") {
            // QEMU opens data files relative to its working directory, so
            // each image is read from its own directory.
            if qemu_contents(&ours_dir, "img.qcow2") != qemu_contents(&qemu_dir, "img.qcow2") {
                f.add(&ctx, "guest contents differ from qemu-img's image");
            }
        } else {
            f.check(
                &ctx,
                qemu_img_compare(
                    s.dir(),
                    &format!("c{i}/o/img.qcow2"),
                    "qcow2",
                    &format!("c{i}/q/img.qcow2"),
                    "qcow2",
                ),
            );
        }
        let oi = qemu_info(&ours_dir, "img.qcow2");
        let qi = qemu_info(&qemu_dir, "img.qcow2");
        for k in INFO_KEYS {
            if oi[k] != qi[k] {
                f.add(&ctx, format!("info {k}: ours {} qemu {}", oi[k], qi[k]));
            }
        }
        let (od, qd) = (
            &oi["format-specific"]["data"],
            &qi["format-specific"]["data"],
        );
        if od != qd {
            f.add(
                &ctx,
                format!("info format-specific.data:\n  ours {od}\n  qemu {qd}"),
            );
        }
        // Preallocation: the same allocation status as qemu-img's image.
        if case.opts.contains("preallocation") {
            // Runs of equal (present, data), merged across host offsets.
            let strip = |m: Vec<Value>| -> Vec<(u64, u64, bool, bool)> {
                let mut v: Vec<(u64, u64, bool, bool)> = Vec::new();
                for e in &m {
                    let (start, len) =
                        (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                    let (p, dt) = (e["present"] == true, e["data"] == true);
                    match v.last_mut() {
                        Some(last) if last.2 == p && last.3 == dt => last.1 += len,
                        _ => v.push((start, len, p, dt)),
                    }
                }
                v
            };
            let om = strip(map(&ours_dir, "img.qcow2"));
            let qm = strip(map(&qemu_dir, "img.qcow2"));
            if om != qm {
                f.add(
                    &ctx,
                    format!("map (start, length, present, data):\n  ours {om:?}\n  qemu {qm:?}"),
                );
            }
        }
    }
    f.finish();
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    let s = Scratch::new();
    let mut rng = SplitMix64::new(2);
    make_bases(s.dir(), &mut rng);
    let cases = [
        cc("extended_l2=on,cluster_size=8k"),
        cc("data_file_raw=on"),
        cc("compat=0.10,lazy_refcounts=on"),
        cc("refcount_bits=3"),
        cc("cluster_size=3000"),
        ccb("preallocation=metadata", "base.qcow2", "qcow2", Some("4M")),
        ccb("preallocation=full", "base.raw", "raw", None),
        ccb(
            "data_file=img.data,data_file_raw=on",
            "base.qcow2",
            "qcow2",
            Some("4M"),
        ),
    ];
    let mut f = Failures::default();
    for (i, case) in cases.iter().enumerate() {
        let args = case.args();
        let ctx = format!("create {}", args[3..].join(" "));
        let dir = s.path(&format!("r{i}"));
        mkdir(&dir);
        std::fs::copy(s.path("base.qcow2"), dir.join("base.qcow2")).unwrap();
        std::fs::copy(s.path("base.raw"), dir.join("base.raw")).unwrap();
        let q = run_in(&dir, "qemu-img", &args);
        assert_ne!(code(&q), 0, "{ctx}: qemu-img accepted it");
        let _ = std::fs::remove_file(dir.join("img.qcow2"));
        let out = ours(&dir, &args);
        let err = stderr_of(&out);
        if code(&out) != 1 {
            f.add(
                &ctx,
                format!("exit {} instead of 1: {}", code(&out), output_text(&out)),
            );
        } else if !err.starts_with("qcow2: ") {
            f.add(&ctx, format!("no 'qcow2: ...' message: {err:?}"));
        }
    }
    f.finish();
}

// ---------------------------------------------------------------------------
// 2. qcow2 convert -O qcow2

/// `-o` options of the convert matrix (`{}` is replaced by a unique stem)
/// and whether `-c` is given.
const CONVERT_VARIANTS: &[(&str, bool)] = &[
    ("", false),
    ("cluster_size=512", false),
    ("cluster_size=1k", false),
    ("cluster_size=2k", false),
    ("cluster_size=4k", false),
    ("cluster_size=8k", false),
    ("cluster_size=16k", false),
    ("cluster_size=32k", false),
    ("cluster_size=128k", false),
    ("cluster_size=256k", false),
    ("cluster_size=512k", false),
    ("cluster_size=1M", false),
    ("cluster_size=2M", false),
    ("compat=0.10", false),
    ("refcount_bits=1", false),
    ("refcount_bits=2", false),
    ("refcount_bits=4", false),
    ("refcount_bits=8", false),
    ("refcount_bits=32", false),
    ("refcount_bits=64", false),
    ("extended_l2=on,cluster_size=16k", false),
    ("extended_l2=on,cluster_size=64k", false),
    ("extended_l2=on,cluster_size=2M", false),
    ("compression_type=zstd", false),
    ("preallocation=metadata", false),
    ("preallocation=falloc", false),
    ("preallocation=full", false),
    ("lazy_refcounts=on", false),
    ("data_file={}.data", false),
    ("data_file={}.data,data_file_raw=on", false),
    ("", true),
    ("compression_type=zstd", true),
    ("cluster_size=4k", true),
    ("compat=0.10", true),
    ("extended_l2=on", true),
    ("refcount_bits=1", true),
    ("refcount_bits=2,cluster_size=4k", true),
];

/// Converts `src` (format `fmt`) with every variant; each result must pass
/// `qemu-img check` and compare equal to the source.
fn convert_matrix(dir: &Path, src: &str, fmt: &str, f: &mut Failures) {
    for (i, (opts, compress)) in CONVERT_VARIANTS.iter().enumerate() {
        let stem = format!("{src}.v{i}");
        let dst = format!("{stem}.qcow2");
        let opts = opts.replace("{}", &stem);
        let mut args = vec!["convert", "-f", fmt, "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts.as_str()]);
        }
        if *compress {
            args.push("-c");
        }
        args.extend([src, dst.as_str()]);
        let ctx = args.join(" ");
        if !f.ran(&ctx, &ours(dir, &args)) {
            continue;
        }
        f.check(&ctx, qemu_img_check(dir, &dst));
        f.check(&ctx, qemu_img_compare(dir, src, fmt, &dst, "qcow2"));
    }
}

#[test]
fn convert_raw_source_with_every_option() {
    let s = Scratch::new();
    let seed = seed_or("convert_raw_source", SEED_VAR, 11);
    std::fs::write(s.path("src.raw"), varied_raw(&mut SplitMix64::new(seed))).unwrap();
    // A size that is not a multiple of 512.
    std::fs::write(
        s.path("odd.raw"),
        SplitMix64::new(seed + 1).bytes(100_000 + 77),
    )
    .unwrap();
    let mut f = Failures::default();
    convert_matrix(s.dir(), "src.raw", "raw", &mut f);
    for args in [
        vec![
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "odd.raw",
            "odd.qcow2",
        ],
        vec![
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "odd.raw",
            "oddc.qcow2",
        ],
    ] {
        let ctx = args.join(" ");
        if !f.ran(&ctx, &ours(s.dir(), &args)) {
            continue;
        }
        let dst = args.last().unwrap();
        f.check(&ctx, qemu_img_check(s.dir(), dst));
        f.check(
            &ctx,
            qemu_img_compare(s.dir(), "odd.raw", "raw", dst, "qcow2"),
        );
        let want = std::fs::read(s.path("odd.raw")).unwrap();
        let got = qemu_contents(s.dir(), dst);
        if got.len() != 100_352
            || got[..want.len()] != want[..]
            || got[want.len()..].iter().any(|b| *b != 0)
        {
            f.add(&ctx, "contents differ from the source padded to 512 bytes");
        }
    }
    f.finish();
}

/// qcow2 images made by QEMU, in `dir`: `chain.qcow2` (over `base.qcow2`),
/// `extl2.qcow2` (extended L2 over `base.qcow2`), `comp.qcow2` (compressed
/// clusters), `snaps.qcow2` (internal snapshots).
fn qemu_sources(dir: &Path, rng: &mut SplitMix64) {
    qemu_create(dir, "base.qcow2", "", "3M");
    qio_ok(
        dir,
        "base.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 1M 512k",
            "write -P 0x13 2500000 200000",
            "write -z 200k 64k",
        ],
    );
    qemu_overlay(
        dir,
        "chain.qcow2",
        "cluster_size=32k",
        ("base.qcow2", "qcow2"),
        Some("3M"),
    );
    qio_ok(
        dir,
        "chain.qcow2",
        &[
            "write -P 0x21 100000 5000",
            "write -z 500k 100k",
            "write -P 0x22 2M 300k",
            "write -P 0x23 3140000 5000",
            "discard 0 32k",
        ],
    );
    qemu_overlay(
        dir,
        "extl2.qcow2",
        "extended_l2=on,cluster_size=64k",
        ("base.qcow2", "qcow2"),
        Some("3M"),
    );
    qio_ok(
        dir,
        "extl2.qcow2",
        &[
            "write -P 0x31 0 2k",
            "write -P 0x32 6k 3k",
            "write -z 64k 4k",
            "write -P 0x33 1100k 100",
            "write -z 1200k 64k",
            "write -P 0x34 2000k 130k",
        ],
    );
    std::fs::write(dir.join("comp-src.raw"), varied_raw(rng)).unwrap();
    qemu_compressed(dir, "comp-src.raw", "comp.qcow2", "");
    qio_ok(
        dir,
        "comp.qcow2",
        &["write -P 0x41 1400000 3000", "write -z 1500000 100000"],
    );
    qemu_create(dir, "snaps.qcow2", "", "3M");
    qio_ok(
        dir,
        "snaps.qcow2",
        &["write -P 0x51 0 1M", "write -P 0x52 2M 512k"],
    );
    qemu_img(dir, &["snapshot", "-c", "s1", "snaps.qcow2"]);
    qio_ok(
        dir,
        "snaps.qcow2",
        &["write -P 0x53 100k 200k", "write -z 2M 64k"],
    );
    qemu_img(dir, &["snapshot", "-c", "s2", "snaps.qcow2"]);
    qio_ok(
        dir,
        "snaps.qcow2",
        &["write -P 0x54 500k 10", "discard 1M 1M"],
    );
}

#[test]
fn convert_qemu_sources_with_every_option() {
    let s = Scratch::new();
    let seed = seed_or("convert_qemu_sources", SEED_VAR, 12);
    qemu_sources(s.dir(), &mut SplitMix64::new(seed));
    let mut f = Failures::default();
    for src in ["chain.qcow2", "extl2.qcow2", "comp.qcow2", "snaps.qcow2"] {
        convert_matrix(s.dir(), src, "qcow2", &mut f);
    }
    f.finish();
}

#[test]
fn convert_compressed_has_compressed_clusters() {
    let s = Scratch::new();
    let seed = seed_or("convert_compressed", SEED_VAR, 13);
    std::fs::write(s.path("src.raw"), varied_raw(&mut SplitMix64::new(seed))).unwrap();
    let mut f = Failures::default();
    for (opts, cs) in [
        ("compression_type=zlib", 64 * KIB),
        ("compression_type=zstd", 64 * KIB),
        ("compression_type=zstd,cluster_size=4k", 4 * KIB),
    ] {
        let dst = format!("{}.qcow2", opts.replace([',', '='], "-"));
        let args = [
            "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", opts, "src.raw", &dst,
        ];
        let ctx = args.join(" ");
        if !f.ran(&ctx, &ours(s.dir(), &args)) {
            continue;
        }
        f.check(&ctx, qemu_img_check(s.dir(), &dst));
        f.check(
            &ctx,
            qemu_img_compare(s.dir(), "src.raw", "raw", &dst, "qcow2"),
        );
        let want_type = if opts.contains("zstd") {
            "zstd"
        } else {
            "zlib"
        };
        let i = qemu_info(s.dir(), &dst);
        if i["format-specific"]["data"]["compression-type"] != want_type {
            f.add(
                &ctx,
                format!(
                    "compression type {}",
                    i["format-specific"]["data"]["compression-type"]
                ),
            );
        }
        let m = map(s.dir(), &dst);
        let (mut text_clusters, mut random_clusters) = (0, 0);
        let mut c = 0;
        while c < RAW_SIZE {
            let end = (c + cs).min(RAW_SIZE);
            match fill_of(c, end) {
                Some(Fill::Text) => {
                    text_clusters += 1;
                    for e in entries_in(&m, c, end) {
                        if e["compressed"] != true {
                            f.add(&ctx, format!("text cluster at {c} not compressed: {e}"));
                        }
                    }
                }
                Some(Fill::Random) => {
                    random_clusters += 1;
                    for e in entries_in(&m, c, end) {
                        if e["compressed"] != false || e["data"] != true {
                            f.add(&ctx, format!("random cluster at {c} not plain data: {e}"));
                        }
                    }
                }
                _ => {}
            }
            c = end;
        }
        assert!(text_clusters > 10 && random_clusters > 10);
    }
    f.finish();
}

/// Compressed clusters are packed as densely as qemu-img packs them (a
/// compressed cluster runs on into the next host cluster): with zstd, where
/// both use libzstd at level 3, the files are within two clusters of each
/// other on text that compresses to about 40% (packing whole clusters only
/// would take about a quarter more).
#[test]
fn compressed_clusters_are_packed_like_qemu_img() {
    let s = Scratch::new();
    let words = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "table ",
        "entry ",
        "the ",
        "image ",
        "of ",
        "a ",
        "disk ",
    ];
    let mut rng = SplitMix64::new(7);
    let mut text = Vec::new();
    while text.len() < 4 << 20 {
        text.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
        if rng.below(12) == 0 {
            text.extend_from_slice(format!("{}\n", rng.next_u64()).as_bytes());
        }
    }
    text.truncate(4 << 20);
    std::fs::write(s.path("text.raw"), &text).unwrap();
    let mut f = Failures::default();
    for opts in [
        "compression_type=zstd",
        "compression_type=zstd,cluster_size=16k",
    ] {
        let ctx = format!("convert -c -o {opts}");
        let args = |dst| {
            [
                "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", opts, "text.raw", dst,
            ]
        };
        ours_ok(s.dir(), &args("ours.qcow2"));
        qemu_img(s.dir(), &args("qemu.qcow2"));
        f.check(&ctx, qemu_img_check(s.dir(), "ours.qcow2"));
        f.check(
            &ctx,
            qemu_img_compare(s.dir(), "text.raw", "raw", "ours.qcow2", "qcow2"),
        );
        let len = |n: &str| std::fs::metadata(s.path(n)).unwrap().len();
        let cs = qemu_info(s.dir(), "qemu.qcow2")["cluster-size"]
            .as_u64()
            .unwrap();
        let (ours, theirs) = (len("ours.qcow2"), len("qemu.qcow2"));
        if ours > theirs + 2 * cs || theirs * 10 > (4 << 20) * 6 {
            f.add(&ctx, format!("{ours} bytes, qemu-img's {theirs}"));
        }
    }
    f.finish();
}

/// Cluster by cluster: where `src` equals `base`, `dst` must not allocate
/// (map depth >= 1); elsewhere it must (depth 0).
fn check_only_differences(
    dir: &Path,
    dst: &str,
    src: &[u8],
    base: &[u8],
    f: &mut Failures,
    ctx: &str,
) {
    let cs = qemu_info(dir, dst)["cluster-size"].as_u64().unwrap();
    let m = map(dir, dst);
    let mut c = 0u64;
    let mut allocated = 0;
    while c < src.len() as u64 {
        let end = (c + cs).min(src.len() as u64);
        let (a, b) = (c as usize, end as usize);
        let base_part: Vec<u8> = (a..b).map(|i| base.get(i).copied().unwrap_or(0)).collect();
        let same = src[a..b] == base_part[..];
        allocated += usize::from(!same);
        for e in entries_in(&m, c, end) {
            let depth = e["depth"].as_u64().unwrap();
            if same && depth == 0 {
                f.add(
                    ctx,
                    format!("cluster {c} equals the backing file but is allocated: {e}"),
                );
            } else if !same && depth != 0 {
                f.add(
                    ctx,
                    format!("cluster {c} differs from the backing file but is not allocated: {e}"),
                );
            }
        }
        c = end;
    }
    assert!(allocated > 0, "{ctx}: test source equals its backing file");
}

#[test]
fn convert_with_backing_writes_only_differences() {
    let s = Scratch::new();
    let d = s.dir();
    let seed = seed_or("convert_backing", SEED_VAR, 14);
    let mut rng = SplitMix64::new(seed);
    qemu_sources(d, &mut rng);
    let base_q = qemu_contents(d, "base.qcow2");
    let base_raw = varied_raw(&mut rng);
    std::fs::write(s.path("base.raw"), &base_raw).unwrap();
    // A raw source: the raw base with a few changes.
    let mut src = base_raw.clone();
    src[5000..9000].fill(0x77);
    src[MIB as usize..MIB as usize + 200_000].fill(0);
    src[(MIB + 300 * KIB) as usize..(MIB + 400 * KIB) as usize]
        .copy_from_slice(&rng.bytes(100 * 1024));
    let n = src.len();
    src[n - 10..].fill(0x99);
    std::fs::write(s.path("mod.raw"), &src).unwrap();
    // A raw source over the qcow2 base.
    let mut src2 = base_q.clone();
    src2.resize(3 * MIB as usize, 0);
    src2[2 * MIB as usize..(2 * MIB + 4096) as usize].fill(0x55);
    src2[0..100].fill(0);
    std::fs::write(s.path("mod2.raw"), &src2).unwrap();
    let chain = qemu_contents(d, "chain.qcow2");
    let extl2 = qemu_contents(d, "extl2.qcow2");
    let cases: Vec<(Vec<&str>, &Vec<u8>, &Vec<u8>)> = vec![
        (
            vec![
                "-f",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "chain.qcow2",
                "o1.qcow2",
            ],
            &chain,
            &base_q,
        ),
        (
            vec![
                "-f",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "extl2.qcow2",
                "o2.qcow2",
            ],
            &extl2,
            &base_q,
        ),
        (
            vec![
                "-f",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-p",
                "chain.qcow2",
                "o3.qcow2",
            ],
            &chain,
            &base_q,
        ),
        (
            vec![
                "-f", "raw", "-B", "base.raw", "-F", "raw", "mod.raw", "o4.qcow2",
            ],
            &src,
            &base_raw,
        ),
        (
            vec![
                "-f",
                "raw",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "mod2.raw",
                "o5.qcow2",
            ],
            &src2,
            &base_q,
        ),
        (
            vec![
                "-f", "raw", "-B", "base.raw", "-F", "raw", "-c", "mod.raw", "o6.qcow2",
            ],
            &src,
            &base_raw,
        ),
        (
            vec![
                "-f",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "compat=0.10",
                "chain.qcow2",
                "o7.qcow2",
            ],
            &chain,
            &base_q,
        ),
        (
            vec![
                "-f",
                "qcow2",
                "-B",
                "base.qcow2",
                "-o",
                "extended_l2=on",
                "extl2.qcow2",
                "o8.qcow2",
            ],
            &extl2,
            &base_q,
        ),
    ];
    let mut f = Failures::default();
    for (extra, want, base) in cases {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(&extra);
        let ctx = args.join(" ");
        if !f.ran(&ctx, &ours(d, &args)) {
            continue;
        }
        let (src_name, dst) = (extra[extra.len() - 2], extra[extra.len() - 1]);
        let src_fmt = extra[1];
        f.check(&ctx, qemu_img_check(d, dst));
        f.check(&ctx, qemu_img_compare(d, src_name, src_fmt, dst, "qcow2"));
        let i = qemu_info(d, dst);
        let bf = extra[extra.iter().position(|a| *a == "-B").unwrap() + 1];
        if i["backing-filename"] != bf {
            f.add(&ctx, format!("backing-filename {}", i["backing-filename"]));
        }
        if let Some(d2) = byte_diff(&qemu_contents(d, dst), want) {
            f.add(&ctx, format!("contents: {d2}"));
        }
        check_only_differences(d, dst, want, base, &mut f, &ctx);
    }
    f.finish();
}

// ---------------------------------------------------------------------------
// 3. Random workloads alternating between qemu-io and us

/// One operation on the guest disk.
#[derive(Clone)]
enum Op {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Compressed { off: u64, data: Vec<u8> },
    Flush,
    Read { off: u64, len: u64 },
}

impl Op {
    fn describe(&self) -> String {
        let data_desc = |data: &[u8]| {
            if data.iter().all(|b| *b == data[0]) {
                format!("pattern {:#04x}", data[0])
            } else {
                "varied data".to_string()
            }
        };
        match self {
            Op::Write { off, data } => format!("write {off} +{} ({})", data.len(), data_desc(data)),
            Op::Zero { off, len } => format!("write_zeroes {off} +{len}"),
            Op::Discard { off, len } => format!("discard {off} +{len}"),
            Op::Compressed { off, data } => {
                format!(
                    "write_compressed {off} +{} ({})",
                    data.len(),
                    data_desc(data)
                )
            }
            Op::Flush => "flush".to_string(),
            Op::Read { off, len } => format!("read {off} +{len}"),
        }
    }

    /// The qemu-io command (data writes must be one pattern).
    fn qemu_io(&self) -> String {
        match self {
            Op::Write { off, data } => format!("write -P {} {off} {}", data[0], data.len()),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Compressed { off, data } => format!("write -c -P {} {off} {}", data[0], data.len()),
            Op::Flush => "flush".to_string(),
            Op::Read { off, len } => format!("read {off} {len}"),
        }
    }
}

/// Disk geometry for generating operations.
#[derive(Debug, Clone, Copy)]
struct Geo {
    size: u64,
    cluster: u64,
    /// Subcluster size (the cluster size without extended L2).
    sub: u64,
}

fn geo_of(dir: &Path, img: &str) -> Geo {
    let i = qemu_info(dir, img);
    let cluster = i["cluster-size"].as_u64().unwrap();
    let ext = i["format-specific"]["data"]["extended-l2"] == true;
    Geo {
        size: i["virtual-size"].as_u64().unwrap(),
        cluster,
        sub: if ext { cluster / 32 } else { cluster },
    }
}

fn gen_off(rng: &mut SplitMix64, g: Geo) -> u64 {
    let off = match rng.below(4) {
        0 => rng.below(g.size),
        1 => rng.below(g.size / g.cluster + 1) * g.cluster,
        2 => rng.below(g.size / g.sub + 1) * g.sub,
        _ => (rng.below(g.size / g.cluster + 1) * g.cluster + rng.below(1024)).saturating_sub(512),
    };
    off.min(g.size - 1)
}

fn gen_len(rng: &mut SplitMix64, g: Geo, off: u64) -> u64 {
    let len = match rng.below(5) {
        0 => rng.range(1, 600),
        1 => g.sub * rng.range(1, 5),
        2 => g.cluster * rng.range(1, 3),
        3 => rng.range(1, 3 * g.cluster),
        _ => rng.range(1, 200 * KIB),
    };
    len.clamp(1, g.size - off)
}

/// `n` random operations; qemu-io ones write patterns and do not read.
fn gen_ops(rng: &mut SplitMix64, g: Geo, n: usize, by_qemu: bool, compressed: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    while ops.len() < n {
        let r = rng.below(100);
        let op = if r < 45 {
            let off = gen_off(rng, g);
            let len = gen_len(rng, g, off) as usize;
            let data = if by_qemu || rng.chance(20, 100) {
                vec![rng.range(1, 256) as u8; len]
            } else {
                rng.bytes(len)
            };
            Op::Write { off, data }
        } else if r < 60 {
            let off = gen_off(rng, g);
            Op::Zero {
                off,
                len: gen_len(rng, g, off),
            }
        } else if r < 75 {
            let off = gen_off(rng, g);
            Op::Discard {
                off,
                len: gen_len(rng, g, off),
            }
        } else if r < 83 {
            // qemu-io's compressed writes fail (EIO) on allocated clusters.
            if !compressed || by_qemu {
                continue;
            }
            let off = rng.below(g.size.div_ceil(g.cluster)) * g.cluster;
            let len = g.cluster.min(g.size - off) as usize;
            let data = if rng.chance(70, 100) {
                let mut d = text_bytes(len, rng.below(1000));
                for _ in 0..8 {
                    let i = rng.below(len as u64) as usize;
                    d[i] = rng.next_u64() as u8;
                }
                d
            } else {
                rng.bytes(len)
            };
            Op::Compressed { off, data }
        } else if r < 90 {
            Op::Flush
        } else {
            if by_qemu {
                continue;
            }
            let off = gen_off(rng, g);
            Op::Read {
                off,
                len: gen_len(rng, g, off),
            }
        };
        ops.push(op);
    }
    ops
}

/// The expected guest contents. Discards act on whole clusters only
/// (partial clusters are unchanged): a discarded cluster reads as zeros on
/// version 3 images, and from the backing file (zeros without one) on
/// version 2 images.
struct Model {
    disk: Vec<u8>,
    /// Contents of the backing chain (empty: none).
    backing: Vec<u8>,
    v3: bool,
    cluster: u64,
}

impl Model {
    /// Applies `op` as done by us, or by qemu-io when `by_qemu`: QEMU
    /// ignores discards on version 2 images with a backing file.
    fn apply(&mut self, op: &Op, by_qemu: bool) {
        match op {
            Op::Write { off, data } | Op::Compressed { off, data } => {
                let o = *off as usize;
                self.disk[o..o + data.len()].copy_from_slice(data);
            }
            Op::Zero { off, len } => self.disk[*off as usize..(off + len) as usize].fill(0),
            Op::Discard { .. } if by_qemu && !self.v3 && !self.backing.is_empty() => {}
            Op::Discard { off, len } => {
                // Whole clusters only (the last one may end at the disk end).
                let size = self.disk.len() as u64;
                let end = off + len;
                let mut c = off.div_ceil(self.cluster) * self.cluster;
                while c < end {
                    let ce = (c + self.cluster).min(size);
                    if ce <= end {
                        for i in c..ce {
                            self.disk[i as usize] = if self.v3 {
                                0
                            } else {
                                self.backing.get(i as usize).copied().unwrap_or(0)
                            };
                        }
                    }
                    c += self.cluster;
                }
            }
            Op::Flush | Op::Read { .. } => {}
        }
    }
}

fn describe_ops(ops: &[Op]) -> String {
    ops.iter()
        .enumerate()
        .map(|(i, o)| format!("  {i}: {}", o.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn apply_ours(img: &mut WritableImage<FileIo>, op: &Op, model: &Model) -> Result<(), String> {
    let r = match op {
        Op::Write { off, data } => img.write_at(*off, data),
        Op::Zero { off, len } => img.write_zeroes(*off, *len),
        Op::Discard { off, len } => img.discard(*off, *len),
        Op::Compressed { off, data } => img.write_compressed(*off, data).map(|_| ()),
        Op::Flush => img.flush(),
        Op::Read { off, len } => {
            let mut buf = vec![0u8; *len as usize];
            img.read_at(*off, &mut buf).map_err(|e| format!("{e}"))?;
            let want = &model.disk[*off as usize..(off + len) as usize];
            return match byte_diff(&buf, want) {
                None => Ok(()),
                Some(d) => Err(format!(
                    "read back differs from the model (offsets relative to {off}): {d}"
                )),
            };
        }
    };
    r.map_err(|e| format!("{e}"))
}

/// Runs `ops` through our write path (then flushes and closes).
fn run_ours(path: &Path, opts: &OpenOptions, ops: &[Op], model: &mut Model) -> Result<(), String> {
    let mut img = open_qcow2_rw(path, opts).map_err(|e| format!("open_qcow2_rw: {e}"))?;
    for (i, op) in ops.iter().enumerate() {
        apply_ours(&mut img, op, model).map_err(|e| format!("op {i} ({}): {e}", op.describe()))?;
        model.apply(op, false);
    }
    img.flush().map_err(|e| format!("final flush: {e}"))
}

/// Runs `ops` through qemu-io.
fn run_qemu(dir: &Path, img: &str, ops: &[Op], model: &mut Model) -> Result<(), String> {
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    qio(dir, img, &cmds)?;
    for op in ops {
        model.apply(op, true);
    }
    Ok(())
}

/// `qemu-img check` passes and qemu reads the model's contents.
fn verify_with_qemu(dir: &Path, img: &str, model: &Model) -> Result<(), String> {
    qemu_img_check(dir, img)?;
    match byte_diff(&qemu_contents(dir, img), &model.disk) {
        None => Ok(()),
        Some(d) => Err(format!(
            "qemu-img convert -O raw differs from the model: {d}"
        )),
    }
}

/// We read the model's contents.
fn verify_with_ours(path: &Path, model: &Model) -> Result<(), String> {
    match byte_diff(&our_contents(path)?, &model.disk) {
        None => Ok(()),
        Some(d) => Err(format!("our reads differ from the model: {d}")),
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Qemu,
    Ours,
    Snap(&'static str),
    Apply(&'static str),
}

const ALTERNATE: &[Step] = &[Step::Qemu, Step::Ours, Step::Qemu, Step::Ours, Step::Ours];

/// A workload image: how it is made, and the steps run on it.
struct Workload {
    name: &'static str,
    seed: u64,
    /// `qemu-img create` options of the image (and `-b`/`-F`).
    create: &'static [&'static str],
    size: u64,
    /// Makes `base.qcow2` / `base.raw` first (the backing file's contents
    /// are returned).
    base: Option<fn(&Path, &mut SplitMix64) -> Vec<u8>>,
    /// Made by `qemu-img convert -c` of a varied raw file instead of create.
    from_compressed: bool,
    compressed_ops: bool,
    steps: &'static [Step],
    ops_per_step: usize,
    /// Open with the smallest L2 and refcount block caches (one table each).
    tiny_caches: bool,
}

impl Workload {
    fn open_options(&self) -> OpenOptions {
        if self.tiny_caches {
            OpenOptions {
                l2_cache_bytes: Some(1),
                refcount_cache_bytes: Some(1),
                ..OpenOptions::default()
            }
        } else {
            OpenOptions::default()
        }
    }
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            name: "",
            seed: 0,
            create: &[],
            size: 3 * MIB,
            base: None,
            from_compressed: false,
            compressed_ops: true,
            steps: ALTERNATE,
            ops_per_step: 60,
            tiny_caches: false,
        }
    }
}

/// A qcow2 base (64 KiB clusters, 3 MiB) written by qemu-io.
fn qcow2_base(dir: &Path, rng: &mut SplitMix64) -> Vec<u8> {
    qemu_create(dir, "base.qcow2", "", "3M");
    let g = geo_of(dir, "base.qcow2");
    let mut m = Model {
        disk: vec![0; g.size as usize],
        backing: Vec::new(),
        v3: true,
        cluster: g.cluster,
    };
    let ops = gen_ops(rng, g, 30, true, true);
    run_qemu(dir, "base.qcow2", &ops, &mut m).unwrap();
    assert!(byte_diff(&qemu_contents(dir, "base.qcow2"), &m.disk).is_none());
    m.disk
}

/// A raw base (3 MiB - 4 KiB: shorter than the overlays) with varied data.
fn raw_base(dir: &Path, rng: &mut SplitMix64) -> Vec<u8> {
    let mut v = varied_raw(rng);
    v.truncate((3 * MIB - 4 * KIB) as usize);
    std::fs::write(dir.join("base.raw"), &v).unwrap();
    v
}

/// Copies of the files of `dir` (not directories).
fn save_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Debugging aid (`WRITE_INTEROP_MINIMIZE=1`): shrinks the operations of a
/// failing step of ours, replaying them on copies of the files as they were
/// before the step, and prints the smallest failing list.
fn minimize(
    dir: &Path,
    saved: &[(std::path::PathBuf, Vec<u8>)],
    opts: &OpenOptions,
    model: &mut Model,
    ops: &[Op],
) {
    let fails = |ops: &[Op], model: &mut Model| -> Option<String> {
        for (p, b) in saved {
            std::fs::write(p, b).unwrap();
        }
        let before = model.disk.clone();
        let r = run_ours(&dir.join("img.qcow2"), opts, ops, model)
            .and_then(|()| verify_with_qemu(dir, "img.qcow2", model));
        model.disk = before;
        r.err()
    };
    let mut cur = ops.to_vec();
    let mut chunk = cur.len() / 2;
    while chunk >= 1 {
        let mut i = 0;
        while i < cur.len() {
            let mut cand = cur.clone();
            cand.drain(i..(i + chunk).min(cand.len()));
            if fails(&cand, model).is_some() {
                cur = cand;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    let err = fails(&cur, model).unwrap_or_default();
    println!("minimal failing ops:\n{}\nerror: {err}", describe_ops(&cur));
}

fn run_workload(w: &Workload) {
    let s = Scratch::new();
    let d = s.dir();
    let seed = seed_or(w.name, SEED_VAR, w.seed);
    let mut rng = SplitMix64::new(seed);
    let backing = w.base.map(|b| b(d, &mut rng)).unwrap_or_default();
    let img = "img.qcow2";
    if w.from_compressed {
        let mut src = varied_raw(&mut rng);
        src.truncate(w.size as usize);
        std::fs::write(s.path("src.raw"), &src).unwrap();
        let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
        args.extend(w.create);
        args.extend(["src.raw", img]);
        qemu_img(d, &args);
        let m = map(d, img);
        assert!(
            m.iter().any(|e| e["compressed"] == true),
            "no compressed clusters: {m:?}"
        );
    } else {
        let size = w.size.to_string();
        let mut args = vec!["create", "-f", "qcow2", "-q"];
        args.extend(w.create);
        args.extend([img, size.as_str()]);
        qemu_img(d, &args);
    }
    let g = geo_of(d, img);
    let v3 = qemu_info(d, img)["format-specific"]["data"]["compat"] == "1.1";
    let mut model = Model {
        disk: if w.from_compressed {
            std::fs::read(s.path("src.raw")).unwrap()
        } else {
            (0..g.size as usize)
                .map(|i| backing.get(i).copied().unwrap_or(0))
                .collect()
        },
        backing,
        v3,
        cluster: g.cluster,
    };
    assert_eq!(model.disk.len() as u64, g.size);
    println!("{}: {g:?} v3={v3}", w.name);
    let path = s.path(img);
    let mut snaps: HashMap<&str, Vec<u8>> = HashMap::new();
    for (i, step) in w.steps.iter().enumerate() {
        let ctx = format!("{} (seed {seed}) step {i} {step:?}", w.name);
        let mut ops = Vec::new();
        let r = match step {
            Step::Qemu => {
                ops = gen_ops(&mut rng, g, w.ops_per_step, true, w.compressed_ops);
                run_qemu(d, img, &ops, &mut model)
                    .and_then(|()| qemu_img_check(d, img))
                    .and_then(|()| verify_with_ours(&path, &model))
            }
            Step::Ours => {
                ops = gen_ops(&mut rng, g, w.ops_per_step, false, w.compressed_ops);
                let saved = save_files(d);
                let before = model.disk.clone();
                let r = run_ours(&path, &w.open_options(), &ops, &mut model)
                    .and_then(|()| verify_with_qemu(d, img, &model));
                if r.is_err() && std::env::var_os("WRITE_INTEROP_MINIMIZE").is_some() {
                    model.disk = before;
                    minimize(d, &saved, &w.open_options(), &mut model, &ops);
                }
                r
            }
            Step::Snap(name) => {
                qemu_img(d, &["snapshot", "-c", name, img]);
                snaps.insert(name, model.disk.clone());
                Ok(())
            }
            Step::Apply(name) => {
                qemu_img(d, &["snapshot", "-a", name, img]);
                model.disk = snaps[name].clone();
                verify_with_qemu(d, img, &model).and_then(|()| verify_with_ours(&path, &model))
            }
        };
        if let Err(e) = r {
            panic!("{ctx}: {e}\nops of this step:\n{}", describe_ops(&ops));
        }
    }
}

#[test]
fn workload_plain_4k_clusters() {
    run_workload(&Workload {
        name: "plain_4k",
        seed: 101,
        create: &["-o", "cluster_size=4k"],
        size: 3 * MIB + 2560,
        ..Workload::default()
    });
}

#[test]
fn workload_plain_tiny_caches() {
    run_workload(&Workload {
        name: "plain_tiny_caches",
        seed: 115,
        create: &["-o", "cluster_size=2k"],
        size: 2 * MIB,
        tiny_caches: true,
        ..Workload::default()
    });
}

#[test]
fn workload_small_clusters_refcount_bits_64() {
    // 512-byte refcount blocks of 64-bit entries cover 32 KiB each: the
    // refcount table grows.
    run_workload(&Workload {
        name: "refcount64_512",
        seed: 116,
        create: &["-o", "cluster_size=512,refcount_bits=64"],
        size: 2 * MIB,
        ..Workload::default()
    });
}

#[test]
fn workload_snapshots_refcount_bits_2_tiny_caches() {
    run_workload(&Workload {
        name: "snapshots_refcount2",
        seed: 117,
        create: &[
            "-o",
            "cluster_size=4k,refcount_bits=2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        base: Some(qcow2_base),
        compressed_ops: false,
        tiny_caches: true,
        // Two snapshots sharing a cluster with the active layer already use
        // the largest refcount (3): QEMU could not apply one of them.
        steps: &[
            Step::Qemu,
            Step::Snap("s1"),
            Step::Ours,
            Step::Qemu,
            Step::Apply("s1"),
            Step::Ours,
            Step::Apply("s1"),
        ],
        ..Workload::default()
    });
}

#[test]
fn workload_snapshots_extended_l2_v2() {
    run_workload(&Workload {
        name: "snapshots_extl2",
        seed: 118,
        create: &["-o", "extended_l2=on,cluster_size=32k"],
        tiny_caches: true,
        steps: &[
            Step::Qemu,
            Step::Snap("s1"),
            Step::Ours,
            Step::Snap("s2"),
            Step::Ours,
            Step::Apply("s1"),
            Step::Ours,
            Step::Apply("s2"),
        ],
        ..Workload::default()
    });
    run_workload(&Workload {
        name: "snapshots_v2",
        seed: 119,
        create: &["-o", "compat=0.10,cluster_size=8k"],
        steps: &[
            Step::Qemu,
            Step::Snap("s1"),
            Step::Ours,
            Step::Qemu,
            Step::Apply("s1"),
            Step::Ours,
        ],
        ..Workload::default()
    });
}

#[test]
fn workload_plain_v2() {
    run_workload(&Workload {
        name: "plain_v2",
        seed: 102,
        create: &["-o", "compat=0.10,cluster_size=16k"],
        size: 2 * MIB + 1536,
        ..Workload::default()
    });
}

#[test]
fn workload_small_clusters_refcount_bits_1() {
    run_workload(&Workload {
        name: "refcount1_512",
        seed: 103,
        create: &["-o", "cluster_size=512,refcount_bits=1"],
        size: MIB,
        compressed_ops: false,
        ..Workload::default()
    });
}

#[test]
fn workload_qcow2_backing() {
    run_workload(&Workload {
        name: "qcow2_backing",
        seed: 104,
        create: &["-o", "cluster_size=32k", "-b", "base.qcow2", "-F", "qcow2"],
        size: 3 * MIB + 512 * KIB,
        base: Some(qcow2_base),
        ..Workload::default()
    });
}

#[test]
fn workload_v2_raw_backing() {
    run_workload(&Workload {
        name: "v2_raw_backing",
        seed: 105,
        create: &[
            "-o",
            "compat=0.10,cluster_size=8k",
            "-b",
            "base.raw",
            "-F",
            "raw",
        ],
        base: Some(raw_base),
        ..Workload::default()
    });
}

#[test]
fn workload_v2_qcow2_backing() {
    run_workload(&Workload {
        name: "v2_qcow2_backing",
        seed: 106,
        create: &["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
        base: Some(qcow2_base),
        ..Workload::default()
    });
}

#[test]
fn workload_extended_l2_backing() {
    run_workload(&Workload {
        name: "extl2_backing",
        seed: 107,
        create: &[
            "-o",
            "extended_l2=on,cluster_size=32k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        base: Some(qcow2_base),
        ..Workload::default()
    });
}

#[test]
fn workload_extended_l2() {
    run_workload(&Workload {
        name: "extl2",
        seed: 108,
        create: &["-o", "extended_l2=on,cluster_size=16k"],
        ..Workload::default()
    });
}

#[test]
fn workload_internal_snapshots() {
    run_workload(&Workload {
        name: "snapshots",
        seed: 109,
        create: &["-o", "cluster_size=16k"],
        steps: &[
            Step::Qemu,
            Step::Snap("s1"),
            Step::Qemu,
            Step::Snap("s2"),
            Step::Ours,
            Step::Qemu,
            Step::Ours,
            Step::Apply("s2"),
            Step::Ours,
            Step::Apply("s1"),
            Step::Ours,
            Step::Apply("s2"),
        ],
        ..Workload::default()
    });
}

#[test]
fn workload_compressed_clusters() {
    run_workload(&Workload {
        name: "compressed",
        seed: 110,
        create: &["-o", "cluster_size=16k"],
        from_compressed: true,
        steps: &[Step::Ours, Step::Qemu, Step::Ours],
        ..Workload::default()
    });
}

#[test]
fn workload_compressed_zstd() {
    run_workload(&Workload {
        name: "compressed_zstd",
        seed: 111,
        create: &["-o", "compression_type=zstd"],
        from_compressed: true,
        steps: &[Step::Ours, Step::Qemu, Step::Ours],
        ..Workload::default()
    });
}

#[test]
fn workload_external_data_file() {
    run_workload(&Workload {
        name: "data_file",
        seed: 112,
        create: &["-o", "data_file=img.data"],
        compressed_ops: false,
        ..Workload::default()
    });
}

#[test]
fn workload_external_data_file_raw() {
    run_workload(&Workload {
        name: "data_file_raw",
        seed: 113,
        create: &["-o", "data_file=img.data,data_file_raw=on,cluster_size=16k"],
        compressed_ops: false,
        ..Workload::default()
    });
}

#[test]
fn workload_lazy_refcounts() {
    run_workload(&Workload {
        name: "lazy_refcounts",
        seed: 114,
        create: &["-o", "lazy_refcounts=on,cluster_size=8k"],
        ..Workload::default()
    });
}

// ---------------------------------------------------------------------------
// 3b. Both directions, spelled out

#[test]
fn qemu_writes_then_we_write_then_qemu_reads() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "img.qcow2", "", "4M");
    qio_ok(
        d,
        "img.qcow2",
        &[
            "write -P 0x11 0 200k",
            "write -P 0x22 1M 100000",
            "write -P 0x33 3M 64k",
        ],
    );
    write_ours(&s.path("img.qcow2"), |img| {
        img.write_at(100_000, &[0x44; 150_000]).unwrap(); // over qemu's data and past it
        img.write_at(1_000_000, &[0x55; 100]).unwrap(); // unaligned, partly before 1M
        img.write_zeroes(1_050_000, 10_000).unwrap();
        img.discard(3 * MIB, 64 * KIB).unwrap();
        img.write_at(4 * MIB - 10, &[0x66; 10]).unwrap();
    });
    assert_qemu_img_check(d, "img.qcow2");
    qio_ok(
        d,
        "img.qcow2",
        &[
            "read -P 0x11 0 100000",
            "read -P 0x44 100000 150000",
            "read -P 0 250000 750000",
            "read -P 0x55 1000000 100",
            "read -P 0 1000100 48476",
            "read -P 0x22 1048576 1424",
            "read -P 0 1050000 10000",
            "read -P 0x22 1060000 88576",
            "read -P 0 3M 64k",
            "read -P 0x66 4194294 10",
        ],
    );
    // The same through qemu-img convert.
    let mut want = vec![0u8; 4 * MIB as usize];
    want[..200 * 1024].fill(0x11);
    want[MIB as usize..MIB as usize + 100_000].fill(0x22);
    want[100_000..250_000].fill(0x44);
    want[1_000_000..1_000_100].fill(0x55);
    want[1_050_000..1_060_000].fill(0);
    want[4 * MIB as usize - 10..].fill(0x66);
    assert_eq!(byte_diff(&qemu_contents(d, "img.qcow2"), &want), None);
}

#[test]
fn we_write_then_qemu_writes_then_we_read() {
    let s = Scratch::new();
    let d = s.dir();
    ours_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "img.qcow2",
            "2M",
        ],
    );
    let mut want = vec![0u8; 2 * MIB as usize];
    write_ours(&s.path("img.qcow2"), |img| {
        let data = SplitMix64::new(5).bytes(300_000);
        img.write_at(1234, &data).unwrap();
        want[1234..301_234].copy_from_slice(&data);
        img.write_at(MIB, &[7; 8192]).unwrap();
        want[MIB as usize..MIB as usize + 8192].fill(7);
    });
    assert_qemu_img_check(d, "img.qcow2");
    qio_ok(
        d,
        "img.qcow2",
        &[
            "write -P 0x99 100000 5000",
            "write -z 200000 50000",
            "discard 1M 4k",
            "write -P 0x98 2093056 4096",
        ],
    );
    want[100_000..105_000].fill(0x99);
    want[200_000..250_000].fill(0);
    want[MIB as usize..MIB as usize + 4096].fill(0);
    want[2_093_056..].fill(0x98);
    assert_eq!(
        byte_diff(&our_contents(&s.path("img.qcow2")).unwrap(), &want),
        None
    );
    // And we keep writing on what qemu wrote.
    write_ours(&s.path("img.qcow2"), |img| {
        img.write_at(102_000, &[0x12; 10_000]).unwrap();
        want[102_000..112_000].fill(0x12);
    });
    assert_qemu_img_check(d, "img.qcow2");
    assert_eq!(byte_diff(&qemu_contents(d, "img.qcow2"), &want), None);
}

// ---------------------------------------------------------------------------
// 4. Overlays

#[test]
fn overlays_we_create_work_in_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    let mut rng = SplitMix64::new(seed_or("overlays_ours", SEED_VAR, 21));
    let base_q = qcow2_base(d, &mut rng);
    let base_r = raw_base(d, &mut rng);
    mkdir(&s.path("sub"));
    let mut f = Failures::default();
    let cases: [(&[&str], &str, &Vec<u8>); 4] = [
        (
            &["-b", "base.qcow2", "-F", "qcow2", "top1.qcow2"],
            "top1.qcow2",
            &base_q,
        ),
        (
            &[
                "-b",
                "base.raw",
                "-F",
                "raw",
                "-o",
                "cluster_size=4k",
                "top2.qcow2",
            ],
            "top2.qcow2",
            &base_r,
        ),
        (
            &["-b", "../base.qcow2", "-F", "qcow2", "sub/top3.qcow2"],
            "sub/top3.qcow2",
            &base_q,
        ),
        (
            &[
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "extended_l2=on",
                "top4.qcow2",
            ],
            "top4.qcow2",
            &base_q,
        ),
    ];
    for (extra, top, base) in cases {
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend(extra);
        let ctx = args.join(" ");
        if !f.ran(&ctx, &ours(d, &args)) {
            continue;
        }
        f.check(&ctx, qemu_img_check(d, top));
        let i = qemu_info(d, top);
        if i["virtual-size"].as_u64() != Some(base.len().div_ceil(512) as u64 * 512) {
            f.add(
                &ctx,
                format!(
                    "virtual-size {} for a base of {}",
                    i["virtual-size"],
                    base.len()
                ),
            );
        }
        // qemu reads the backing data through the overlay.
        let mut want: Vec<u8> = base.clone();
        want.resize(i["virtual-size"].as_u64().unwrap() as usize, 0);
        if let Some(e) = byte_diff(&qemu_contents(d, top), &want) {
            f.add(&ctx, format!("qemu reads before writing: {e}"));
        }
        // qemu writes into it.
        let r = qio(
            d,
            top,
            &[
                "write -P 0x71 1000 3000",
                "write -P 0x72 64k 64k",
                "write -z 1M 10000",
            ],
        );
        f.check(&ctx, r);
        want[1000..4000].fill(0x71);
        want[64 * 1024..128 * 1024].fill(0x72);
        want[MIB as usize..MIB as usize + 10_000].fill(0);
        f.check(&ctx, qemu_img_check(d, top));
        if let Some(e) = byte_diff(&qemu_contents(d, top), &want) {
            f.add(&ctx, format!("qemu reads after qemu writes: {e}"));
        }
        match our_contents(&s.path(top)) {
            Ok(got) => {
                if let Some(e) = byte_diff(&got, &want) {
                    f.add(&ctx, format!("our reads after qemu writes: {e}"));
                }
            }
            Err(e) => f.add(&ctx, e),
        }
        // The base is untouched.
        let base_fmt = if extra.contains(&"raw") {
            "raw"
        } else {
            "qcow2"
        };
        let base_name = if base_fmt == "raw" {
            "base.raw"
        } else {
            "base.qcow2"
        };
        let bytes = if base_fmt == "raw" {
            std::fs::read(s.path(base_name)).unwrap()
        } else {
            qemu_contents(d, base_name)
        };
        if bytes != *base {
            f.add(&ctx, "the backing file changed");
        }
    }
    // A chain of our overlays: base <- top1 (above) <- mid <- leaf.
    ours_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top1.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    );
    ours_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=1k",
            "leaf.qcow2",
        ],
    );
    write_ours(&s.path("mid.qcow2"), |img| {
        img.write_at(2000, &[0x81; 100]).unwrap();
    });
    write_ours(&s.path("leaf.qcow2"), |img| {
        img.write_at(2050, &[0x82; 1000]).unwrap();
    });
    f.check("chain", qemu_img_check(d, "mid.qcow2"));
    f.check("chain", qemu_img_check(d, "leaf.qcow2"));
    let mut want = base_q.clone();
    want[1000..4000].fill(0x71);
    want[64 * 1024..128 * 1024].fill(0x72);
    want[MIB as usize..MIB as usize + 10_000].fill(0);
    want[2000..2100].fill(0x81);
    want[2050..3050].fill(0x82);
    if let Some(e) = byte_diff(&qemu_contents(d, "leaf.qcow2"), &want) {
        f.add("chain", format!("qemu reads of leaf.qcow2: {e}"));
    }
    f.check(
        "chain",
        qio(
            d,
            "leaf.qcow2",
            &[
                "read -P 0x71 1000 1000",
                "read -P 0x81 2000 50",
                "read -P 0x82 2050 1000",
                "read -P 0x71 3050 950",
            ],
        ),
    );
    f.finish();
}

#[test]
fn overlays_qemu_creates_work_in_ours() {
    let s = Scratch::new();
    let d = s.dir();
    let mut rng = SplitMix64::new(seed_or("overlays_qemu", SEED_VAR, 22));
    let base_q = qcow2_base(d, &mut rng);
    let base_r = raw_base(d, &mut rng);
    let mut f = Failures::default();
    let cases: [(&[&str], &Vec<u8>); 4] = [
        (&["-b", "base.qcow2", "-F", "qcow2"], &base_q),
        (
            &["-b", "base.raw", "-F", "raw", "-o", "cluster_size=2k"],
            &base_r,
        ),
        (
            &[
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=32k",
            ],
            &base_q,
        ),
        (
            &[
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=4k",
            ],
            &base_q,
        ),
    ];
    for (i, (extra, base)) in cases.iter().enumerate() {
        let top = format!("top{i}.qcow2");
        let mut args = vec!["create", "-f", "qcow2", "-q"];
        args.extend(*extra);
        args.push(&top);
        qemu_img(d, &args);
        let ctx = args.join(" ");
        let size = qemu_info(d, &top)["virtual-size"].as_u64().unwrap() as usize;
        let mut want = base.to_vec();
        want.resize(size, 0);
        // Partial-cluster writes: the rest of the cluster comes from the base.
        let ops: Vec<(u64, Vec<u8>)> = vec![
            (100, vec![0xa1; 200]),
            (40_000, rng.bytes(70_000)),
            (MIB + 1, vec![0xa2; 1]),
            (size as u64 - 3000, vec![0xa3; 3000]),
        ];
        let r = (|| -> Result<(), String> {
            let mut img = open_qcow2_rw(&s.path(&top), &OpenOptions::default())
                .map_err(|e| format!("open: {e}"))?;
            for (off, data) in &ops {
                img.write_at(*off, data)
                    .map_err(|e| format!("write {off}: {e}"))?;
            }
            img.write_zeroes(2 * MIB + 100, 5000)
                .map_err(|e| format!("write_zeroes: {e}"))?;
            img.flush().map_err(|e| format!("flush: {e}"))
        })();
        if let Err(e) = r {
            f.add(&ctx, e);
            continue;
        }
        for (off, data) in &ops {
            want[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        want[2 * MIB as usize + 100..2 * MIB as usize + 5100].fill(0);
        f.check(&ctx, qemu_img_check(d, &top));
        if let Some(e) = byte_diff(&qemu_contents(d, &top), &want) {
            f.add(&ctx, format!("qemu reads: {e}"));
        }
        let r = qio(
            d,
            &top,
            &[
                "read -P 0xa1 100 200".to_string(),
                "read -P 0xa2 1048577 1".to_string(),
                format!("read -P 0xa3 {} 3000", size - 3000),
                "read -P 0 2097252 5000".to_string(),
            ],
        );
        f.check(&ctx, r);
    }
    f.finish();
}

// ---------------------------------------------------------------------------
// 5. dd

#[test]
fn dd_to_qcow2_matches_qemu_img_dd() {
    let s = Scratch::new();
    let d = s.dir();
    let seed = seed_or("dd", SEED_VAR, 31);
    let mut rng = SplitMix64::new(seed);
    std::fs::write(s.path("src.raw"), varied_raw(&mut rng)).unwrap();
    qemu_sources(d, &mut rng);
    let mut f = Failures::default();
    let params: [&[&str]; 6] = [
        &[],
        &["bs=64k"],
        &["bs=4k", "count=100"],
        &["bs=1M", "count=2", "skip=1"],
        &["bs=512", "skip=3", "count=1000"],
        &["bs=3000", "count=7"],
    ];
    for (src, fmt) in [
        ("src.raw", "raw"),
        ("chain.qcow2", "qcow2"),
        ("comp.qcow2", "qcow2"),
    ] {
        for (i, p) in params.iter().enumerate() {
            let ours_out = format!("{src}.{i}.ours.qcow2");
            let qemu_out = format!("{src}.{i}.qemu.qcow2");
            let iff = format!("if={src}");
            let mut a = vec!["dd", "-f", fmt, "-O", "qcow2", iff.as_str()];
            a.extend(*p);
            let of = format!("of={ours_out}");
            let mut ours_args = a.clone();
            ours_args.push(&of);
            let ctx = ours_args.join(" ");
            let oq = format!("of={qemu_out}");
            let mut qemu_args = a.clone();
            qemu_args.push(&oq);
            qemu_img(d, &qemu_args);
            if !f.ran(&ctx, &ours(d, &ours_args)) {
                continue;
            }
            f.check(&ctx, qemu_img_check(d, &ours_out));
            f.check(
                &ctx,
                qemu_img_compare(d, &ours_out, "qcow2", &qemu_out, "qcow2"),
            );
            let (oi, qi) = (qemu_info(d, &ours_out), qemu_info(d, &qemu_out));
            if oi["virtual-size"] != qi["virtual-size"] {
                f.add(
                    &ctx,
                    format!(
                        "virtual-size {} (qemu-img dd: {})",
                        oi["virtual-size"], qi["virtual-size"]
                    ),
                );
            }
        }
    }
    f.finish();
}

// ---------------------------------------------------------------------------
// 6. bench -w

#[test]
fn bench_writes_leave_valid_images() {
    let s = Scratch::new();
    let d = s.dir();
    let mut f = Failures::default();
    // Sequential, with a wrap at the end of the disk.
    qemu_create(d, "seq.qcow2", "", "4M");
    qio_ok(d, "seq.qcow2", &["write -P 0x11 0 4M"]);
    std::fs::copy(s.path("seq.qcow2"), s.path("seq-qemu.qcow2")).unwrap();
    std::fs::copy(s.path("seq.qcow2"), s.path("seq43.qcow2")).unwrap();
    let args = [
        "bench",
        "-w",
        "-c",
        "60",
        "-s",
        "4k",
        "-o",
        "3M",
        "-S",
        "24k",
        "--pattern=165",
        "-d",
        "1",
        "--flush-interval=7",
    ];
    // The flush interval is refused below the depth (64 by default) and
    // for reads, as qemu-img refuses it.
    for bad in [
        &["bench", "-w", "-c", "1", "--flush-interval=7", "seq.qcow2"][..],
        &[
            "bench",
            "-c",
            "1",
            "-d",
            "1",
            "--flush-interval=7",
            "seq.qcow2",
        ][..],
    ] {
        let (o, q) = (ours(d, bad), run_in(d, "qemu-img", bad));
        assert_eq!((code(&o), code(&q)), (1, 1), "{bad:?}");
        let want = stderr_of(&q)
            .trim()
            .trim_start_matches("qemu-img: ")
            .to_string();
        assert!(stderr_of(&o).contains(&want), "{bad:?}: {}", stderr_of(&o));
    }
    ours_ok(d, &[&args[..], &["seq.qcow2"]].concat());
    f.check("sequential", qemu_img_check(d, "seq.qcow2"));
    // Offsets wrap modulo (size - request size), the rule of qemu-img's
    // bench since its 2025 fix (qemu-img 10.0 wraps modulo the size, which
    // can run a request past the end).
    let mut want = vec![0x11u8; 4 * MIB as usize];
    let mut written = Vec::new();
    let mut pos = 3 * MIB;
    for _ in 0..60 {
        written.push(pos);
        want[pos as usize..pos as usize + 4096].fill(165);
        pos = (pos + 24 * KIB) % (4 * MIB - 4 * KIB);
    }
    assert!(written.iter().any(|&o| o < 3 * MIB), "the run wraps");
    written.sort();
    written.dedup();
    let cmds: Vec<String> = written
        .iter()
        .map(|o| format!("read -P 165 {o} 4096"))
        .collect();
    f.check("sequential", qio(d, "seq.qcow2", &cmds));
    if let Some(e) = byte_diff(&qemu_contents(d, "seq.qcow2"), &want) {
        f.add("sequential", e);
    }
    // qemu-img's own bench is the judge of the offsets up to the wrap.
    let mut args = args.to_vec();
    args[3] = "43";
    ours_ok(d, &[&args[..], &["seq43.qcow2"]].concat());
    let q = run_in(
        d,
        "qemu-img",
        &[&args[..], &["-q", "seq-qemu.qcow2"]].concat(),
    );
    assert_eq!(code(&q), 0, "qemu-img bench: {}", output_text(&q));
    f.check(
        "sequential, against qemu-img bench",
        qemu_img_compare(d, "seq43.qcow2", "qcow2", "seq-qemu.qcow2", "qcow2"),
    );

    // Random offsets, seed 7, unaligned request size over a backing file.
    qemu_create(d, "base.qcow2", "", "2M");
    qio_ok(d, "base.qcow2", &["write -P 0x22 0 2M"]);
    qemu_overlay(
        d,
        "rnd.qcow2",
        "cluster_size=4k",
        ("base.qcow2", "qcow2"),
        None,
    );
    let out = ours(
        d,
        &[
            "bench",
            "-w",
            "-c",
            "150",
            "-s",
            "3000",
            "--random",
            "--seed",
            "7",
            "--pattern=90",
            "rnd.qcow2",
        ],
    );
    assert_eq!(code(&out), 0, "{}", output_text(&out));
    assert!(
        output_text(&out).contains("seed 7"),
        "{}",
        output_text(&out)
    );
    f.check("random", qemu_img_check(d, "rnd.qcow2"));
    // The offsets come from the generator bench documents (xorshift64*).
    let mut rng = qcowkit_std::cli::bench::Rng::new(7);
    let slots = 2 * MIB / 3000;
    let mut want = vec![0x22u8; 2 * MIB as usize];
    let mut cmds = Vec::new();
    for _ in 0..150 {
        let at = (rng.next_u64() % slots) * 3000;
        want[at as usize..at as usize + 3000].fill(90);
        cmds.push(format!("read -P 90 {at} 3000"));
    }
    f.check("random", qio(d, "rnd.qcow2", &cmds));
    if let Some(e) = byte_diff(&qemu_contents(d, "rnd.qcow2"), &want) {
        f.add("random", e);
    }
    // Independently of the generator: every 3000-byte slot is all base or
    // all pattern.
    let got = qemu_contents(d, "rnd.qcow2");
    let mut hits = 0;
    for slot in got.chunks(3000) {
        if slot.iter().all(|b| *b == 90) {
            hits += 1;
        } else if !slot.iter().all(|b| *b == 0x22) {
            f.add("random", "a slot mixes the pattern and the base");
            break;
        }
    }
    if hits == 0 || hits > 150 {
        f.add("random", format!("{hits} slots hold the pattern"));
    }

    // Random 64k requests on an image we create.
    ours_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k,refcount_bits=2",
            "r2.qcow2",
            "3M",
        ],
    );
    ours_ok(
        d,
        &[
            "bench",
            "-w",
            "-c",
            "40",
            "-s",
            "64k",
            "--random",
            "--seed",
            "7",
            "--pattern=7",
            "r2.qcow2",
        ],
    );
    f.check("random 64k", qemu_img_check(d, "r2.qcow2"));
    let mut rng = qcowkit_std::cli::bench::Rng::new(7);
    let mut cmds = Vec::new();
    for _ in 0..40 {
        let at = (rng.next_u64() % (3 * MIB / (64 * KIB))) * 64 * KIB;
        cmds.push(format!("read -P 7 {at} 64k"));
    }
    f.check("random 64k", qio(d, "r2.qcow2", &cmds));
    // Independently of the generator: every 64k slot is all pattern or all
    // zeros, and as many hold the pattern as the requests had distinct
    // offsets.
    let mut offsets: Vec<&String> = cmds.iter().collect();
    offsets.sort();
    offsets.dedup();
    let got = qemu_contents(d, "r2.qcow2");
    let mut hits = 0;
    for slot in got.chunks(64 * KIB as usize) {
        if slot.iter().all(|b| *b == 7) {
            hits += 1;
        } else if !slot.iter().all(|b| *b == 0) {
            f.add("random 64k", "a slot mixes the pattern and zeros");
            break;
        }
    }
    if hits != offsets.len() {
        f.add(
            "random 64k",
            format!("{hits} slots hold the pattern, {} offsets", offsets.len()),
        );
    }
    f.finish();
}

/// A compressed cluster written where a freed compressed cluster was: our
/// reads, and the copy-on-write of a later partial write, must see the new
/// data (found by the v2_qcow2_backing workload, seed 3).
#[test]
fn compressed_cluster_at_reused_host_offset() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "img.qcow2", "", "1M");
    let cs = 64 * KIB as usize;
    let mut want = vec![0u8; MIB as usize];
    let t1 = text_bytes(cs, 0);
    let t2 = text_bytes(cs, 5000);
    let mut img = open_qcow2_rw(&s.path("img.qcow2"), &OpenOptions::default()).unwrap();
    // Cluster 0 compressed, then rewritten as a normal cluster: its
    // compressed host cluster is freed at the flush.
    img.write_compressed(0, &t1).unwrap();
    img.write_at(100, &[1; 10]).unwrap();
    img.flush().unwrap();
    want[..cs].copy_from_slice(&t1);
    want[100..110].fill(1);
    // Cluster 4 compressed: it reuses the freed host cluster.
    img.write_compressed(4 * cs as u64, &t2).unwrap();
    want[4 * cs..5 * cs].copy_from_slice(&t2);
    let mut back = vec![0u8; cs];
    img.read_at(4 * cs as u64, &mut back).unwrap();
    let read_diff = byte_diff(&back, &want[4 * cs..5 * cs]);
    // A partial write into cluster 4 copies the rest of it.
    img.write_at(4 * cs as u64 + 100, &[2; 10]).unwrap();
    want[4 * cs + 100..4 * cs + 110].fill(2);
    img.flush().unwrap();
    drop(img);
    assert_qemu_img_check(d, "img.qcow2");
    let disk_diff = byte_diff(&qemu_contents(d, "img.qcow2"), &want);
    assert!(
        read_diff.is_none() && disk_diff.is_none(),
        "our read of the new compressed cluster: {read_diff:?}\n\
         qemu's read after the partial write: {disk_diff:?}"
    );
}

/// Compressed clusters share host clusters; when the shared cluster's
/// refcount is at the maximum of a narrow refcount width, the next one
/// must go to a new host cluster (as in QEMU), not fail.
#[test]
fn compressed_writes_with_narrow_refcounts() {
    let mut f = Failures::default();
    for rb in [1, 2] {
        let ctx = format!("refcount_bits={rb}");
        let s = Scratch::new();
        let d = s.dir();
        let o = format!("refcount_bits={rb},cluster_size=4k");
        qemu_create(d, "img.qcow2", &o, "1M");
        let cs = 4096usize;
        let mut want = vec![0u8; MIB as usize];
        write_ours(&s.path("img.qcow2"), |img| {
            for i in 0..8 {
                let t = text_bytes(cs, i as u64 * 100);
                match img.write_compressed((i * cs) as u64, &t) {
                    Ok(_) => want[i * cs..(i + 1) * cs].copy_from_slice(&t),
                    Err(e) => {
                        f.add(&ctx, format!("write_compressed of cluster {i}: {e}"));
                        break;
                    }
                }
            }
        });
        f.check(&ctx, qemu_img_check(d, "img.qcow2"));
        if let Some(e) = byte_diff(&qemu_contents(d, "img.qcow2"), &want) {
            f.add(&ctx, e);
        }
    }
    f.finish();
}

/// An image QEMU left dirty (lazy refcounts, killed before closing): our
/// read-write open repairs the refcounts, and our writes keep it valid.
#[test]
fn dirty_lazy_refcounts_image_from_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "img.qcow2", "lazy_refcounts=on,cluster_size=4k", "2M");
    let out = run_in(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x31 0 100k",
            "-c",
            "write -P 0x32 1M 10k",
            "-c",
            "sigraise 9",
            "img.qcow2",
        ],
    );
    assert_ne!(
        code(&out),
        0,
        "qemu-io was not killed: {}",
        output_text(&out)
    );
    let i = qemu_info(d, "img.qcow2");
    assert_eq!(
        i["dirty-flag"], true,
        "qemu-io did not leave the image dirty: {i}"
    );
    write_ours(&s.path("img.qcow2"), |img| {
        img.write_at(50_000, &[0x33; 100_000]).unwrap();
    });
    let mut want = vec![0u8; 2 * MIB as usize];
    want[..100 * 1024].fill(0x31);
    want[MIB as usize..MIB as usize + 10 * 1024].fill(0x32);
    want[50_000..150_000].fill(0x33);
    assert_qemu_img_check(d, "img.qcow2");
    assert_eq!(qemu_info(d, "img.qcow2")["dirty-flag"], false);
    assert_eq!(byte_diff(&qemu_contents(d, "img.qcow2"), &want), None);
}

/// Numbers are read as qemu-img reads them: sizes with suffixes, fractions
/// (rounded), hexadecimal; `--pattern` in decimal, hex or octal; the same
/// refusals and exit codes.
#[test]
fn numbers_are_read_as_qemu_img_reads_them() {
    let s = Scratch::new();
    let d = s.dir();
    let mut f = Failures::default();
    for size in [
        "0x100000",
        "12.345M",
        "1.0001k",
        "1000",
        "08k",
        "+5k",
        ".5k",
        "1.k",
        "5B",
        "64kB",
        "0x10k",
        "1e3",
        "1.5",
        "64k ",
        "16E",
        "8E",
        "18446744073709551615",
    ] {
        let args = ["create", "-f", "qcow2", "img.qcow2", size];
        let (o, q) = (ours(d, &args), run_in(d, "qemu-img", &args));
        let ctx = format!("create {size:?}");
        if code(&o) != code(&q) {
            f.add(&ctx, format!("exit {} (qemu-img: {})", code(&o), code(&q)));
        } else if code(&q) == 0 && stdout_of(&o) != stdout_of(&q) {
            f.add(
                &ctx,
                format!("{} (qemu-img: {})", stdout_of(&o), stdout_of(&q)),
            );
        }
        let _ = std::fs::remove_file(s.path("img.qcow2"));
    }
    // The same byte through each notation, written by both benches.
    qemu_create(d, "base.qcow2", "", "1M");
    for (i, pattern) in ["0xa5", "0245", "165"].iter().enumerate() {
        for tool in ["qcow2", "qemu-img"] {
            let name = format!("{tool}-{i}.qcow2");
            std::fs::copy(s.path("base.qcow2"), s.path(&name)).unwrap();
            let args = [
                "bench",
                "-w",
                "-c",
                "4",
                "-d",
                "1",
                "-s",
                "0x1000",
                "-S",
                "8k",
                &format!("--pattern={pattern}"),
                &name,
            ];
            let out = if tool == "qcow2" {
                ours(d, &args)
            } else {
                run_in(d, "qemu-img", &args)
            };
            assert_eq!(code(&out), 0, "{tool} {pattern}: {}", output_text(&out));
        }
        f.check(
            pattern,
            qio(
                d,
                &format!("qcow2-{i}.qcow2"),
                &["read -P 165 0 4k", "read -P 165 24k 4k"],
            ),
        );
        f.check(
            pattern,
            qemu_img_compare(
                d,
                &format!("qcow2-{i}.qcow2"),
                "qcow2",
                &format!("qemu-img-{i}.qcow2"),
                "qcow2",
            ),
        );
    }
    for bad in ["256", "abc", "0x"] {
        let args = [
            "bench",
            "-w",
            "-c",
            "1",
            &format!("--pattern={bad}"),
            "base.qcow2",
        ];
        let (o, q) = (ours(d, &args), run_in(d, "qemu-img", &args));
        assert_eq!((code(&o), code(&q)), (1, 1), "--pattern={bad}");
        let want = stderr_of(&q)
            .trim()
            .trim_start_matches("qemu-img: ")
            .to_string();
        assert!(
            stderr_of(&o).contains(&want),
            "--pattern={bad}: {}",
            stderr_of(&o)
        );
    }
    f.finish();
}

/// Runs our `qcow2` with `args` under strace (the test script installs it)
/// and returns the trace of its opens and syncs.
fn traced(d: &Path, args: &[&str]) -> String {
    let bin = bin("qcow2");
    let mut all = vec![
        "-f",
        "-e",
        "trace=openat,fsync,fdatasync",
        "-o",
        "trace.txt",
    ];
    all.push(bin.to_str().unwrap());
    all.extend_from_slice(args);
    let out = run_in(d, "strace", &all);
    assert_eq!(code(&out), 0, "strace {args:?}: {}", output_text(&out));
    std::fs::read_to_string(d.join("trace.txt")).unwrap()
}

/// `convert -t` takes qemu-img's cache modes: the default (`unsafe`, like
/// qemu-img) never syncs, `writeback` syncs, `none`/`off` and
/// `directsync` open the target with O_DIRECT; every mode writes the same
/// image, and `bench -t` and dd follow suit.
#[test]
fn cache_modes_are_qemu_img_s() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_image(
        d,
        "src.qcow2",
        "",
        "64M",
        &[
            "write -P 0x33 0 10M",
            "write -P 0x44 33M 3M",
            "write -P 0x55 63M 1000k",
        ],
    );
    let mut f = Failures::default();
    for mode in [
        None,
        Some("unsafe"),
        Some("writeback"),
        Some("none"),
        Some("off"),
        Some("directsync"),
        Some("writethrough"),
    ] {
        for fmt in ["raw", "qcow2"] {
            let out = format!("out-{}.{fmt}", mode.unwrap_or("default"));
            let mut args = vec!["convert", "-O", fmt];
            if let Some(m) = mode {
                args.extend(["-t", m]);
            }
            args.extend(["src.qcow2", &out]);
            let trace = traced(d, &args);
            let ctx = format!("convert -O {fmt} -t {mode:?}");
            let syncs = trace.matches("fdatasync(").count() + trace.matches("fsync(").count();
            let direct = trace
                .lines()
                .any(|l| l.contains(&out) && l.contains("O_DIRECT"));
            let m = mode.unwrap_or("unsafe");
            let want_syncs = m != "unsafe";
            let want_direct = matches!(m, "none" | "off" | "directsync");
            if (syncs > 0) != want_syncs || direct != want_direct {
                f.add(&ctx, format!("{syncs} syncs, O_DIRECT {direct}"));
            }
            f.check(&ctx, qemu_img_compare(d, "src.qcow2", "qcow2", &out, fmt));
            if fmt == "qcow2" {
                f.check(&ctx, qemu_img_check(d, &out));
            }
        }
    }
    // An unknown mode is refused.
    let bad = ours(
        d,
        &["convert", "-O", "raw", "-t", "fast", "src.qcow2", "x.raw"],
    );
    assert_ne!(code(&bad), 0);
    // bench -t none writes through O_DIRECT; the default syncs.
    qemu_create(d, "b.qcow2", "", "4M");
    for (mode, want_direct) in [("none", true), ("writeback", false)] {
        let trace = traced(
            d,
            &[
                "bench",
                "-w",
                "-c",
                "8",
                "-t",
                mode,
                "--pattern=7",
                "b.qcow2",
            ],
        );
        let direct = trace
            .lines()
            .any(|l| l.contains("b.qcow2") && l.contains("O_DIRECT"));
        if direct != want_direct || !trace.contains("fdatasync(") {
            f.add(
                &format!("bench -t {mode}"),
                format!("O_DIRECT {direct}:\n{trace}"),
            );
        }
        f.check(&format!("bench -t {mode}"), qemu_img_check(d, "b.qcow2"));
        f.check(
            &format!("bench -t {mode}"),
            qio(d, "b.qcow2", &["read -P 7 0 32k"]),
        );
    }
    // dd syncs its target once, when complete.
    for fmt in ["raw", "qcow2"] {
        let of = format!("of=dd.{fmt}");
        let trace = traced(d, &["dd", "-O", fmt, "if=src.qcow2", &of, "bs=1M"]);
        let syncs = trace.matches("fdatasync(").count();
        if syncs != 1 {
            f.add(&format!("dd -O {fmt}"), format!("{syncs} syncs"));
        }
        f.check(
            &format!("dd -O {fmt}"),
            qemu_img_compare(d, "src.qcow2", "qcow2", &format!("dd.{fmt}"), fmt),
        );
    }
    f.finish();
}
