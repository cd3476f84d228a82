//! Interoperability with qemu-img / qemu-io 10: images are made by QEMU at
//! test time, then `qcow2 convert`, `info`, `map`, `check`, `compare`, `dd`
//! and `qcow2-info` must agree with what qemu-img reports for the same image.
//!
//! Every check of one variant is run and all differences are collected, so
//! a failure message lists everything that differs, prefixed with the
//! variant's name.

use std::fs::File;
use std::path::{Path, PathBuf};

use qcowkit_tests::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Top-level keys of `info --output=json` shared by qemu-img and us.
const INFO_KEYS: &[&str] = &[
    "virtual-size",
    "filename",
    "format",
    "cluster-size",
    "dirty-flag",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
];

/// Keys of `format-specific.data` for qcow2 images.
const DATA_KEYS: &[&str] = &[
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "bitmaps",
    "data-file",
    "data-file-raw",
];

// ---------------------------------------------------------------------------
// qemu-io command builders

/// `write -P pat off len`.
fn w(pat: u8, off: u64, len: u64) -> String {
    format!("write -P {pat:#x} {off} {len}")
}

/// `write -c -P pat off len` (compressed; cluster aligned).
fn wc(pat: u8, off: u64, len: u64) -> String {
    format!("write -c -P {pat:#x} {off} {len}")
}

/// `write -z off len`.
fn wz(off: u64, len: u64) -> String {
    format!("write -z {off} {len}")
}

/// `write -z -u off len` (zero write that may unmap).
fn wzu(off: u64, len: u64) -> String {
    format!("write -z -u {off} {len}")
}

/// `discard off len`.
fn disc(off: u64, len: u64) -> String {
    format!("discard {off} {len}")
}

/// Image geometry that decides where the varied writes land.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cluster: u64,
    ext_l2: bool,
    compressed: bool,
}

impl Shape {
    fn plain(cluster: u64) -> Self {
        Shape {
            cluster,
            ext_l2: false,
            compressed: false,
        }
    }

    /// Virtual size: a few MiB, or enough clusters for every slot of the layout.
    fn size(&self) -> u64 {
        let slots = if self.compressed {
            30
        } else if self.ext_l2 {
            26
        } else {
            21
        };
        (4 * MIB).max(slots * self.cluster)
    }

    /// Bytes of guest disk one L2 table covers.
    fn l2_coverage(&self) -> u64 {
        let entry = if self.ext_l2 { 16 } else { 8 };
        self.cluster * (self.cluster / entry)
    }

    /// Varied qemu-io commands for an image of this shape and `size`.
    fn cmds(&self, size: u64) -> Vec<String> {
        let c = self.cluster;
        let mut v = vec![
            w(0x11, 0, 1),
            w(0x12, 513, 1000),
            // Across the boundary of clusters 0 and 1.
            w(0x13, c - 100, 300),
            // Several clusters, unaligned at both ends.
            w(0x14, 3 * c + 7, 2 * c + 5),
            // Zero writes over data: unaligned, then a whole cluster.
            w(0x15, 6 * c, 3 * c),
            wz(6 * c + c / 2, c),
            wz(8 * c, c),
            // Discards: one whole cluster, one unaligned piece (ignored by qemu).
            w(0x16, 10 * c, 2 * c),
            disc(10 * c, c),
            disc(11 * c + c / 2, 256.min(c / 2)),
            // Zero writes into unallocated clusters.
            wz(13 * c, 2 * c),
            // Zero write allowed to unmap.
            w(0x17, 15 * c, 2 * c),
            wzu(15 * c, c),
        ];
        // Across L2-table boundaries where the disk is big enough.
        let l2 = self.l2_coverage();
        let mut k = 1;
        while k <= 2 && k * l2 + 1000 <= size - 2 * c {
            v.push(w(0x18 + k as u8, k * l2 - 1000, 2000));
            k += 1;
        }
        if self.ext_l2 {
            let s = c / 32;
            v.extend([
                // Inside one subcluster, then across two.
                w(0x21, 18 * c + s + 10, 100),
                w(0x22, 18 * c + 3 * s - 5, s + 10),
                // A full cluster with one zeroed and some discarded subclusters.
                w(0x23, 19 * c, c),
                wz(19 * c + 2 * s, s),
                disc(19 * c + 5 * s, s),
                disc(19 * c + 7 * s, 2 * s),
                // One zero subcluster in an unallocated cluster.
                wz(20 * c + 4 * s, s),
                // The last subcluster of a cluster.
                w(0x24, 21 * c + 31 * s, s),
                // The middle subcluster of three discarded.
                w(0x25, 22 * c + 8 * s, 3 * s),
                disc(22 * c + 9 * s, s),
                // An unaligned zero write inside one subcluster.
                w(0x26, 23 * c, 4 * s),
                wz(23 * c + s + 3, 20.min(s - 3)),
            ]);
        }
        if self.compressed {
            v.extend([
                wc(0x31, 24 * c, c),
                // A compressed cluster partly overwritten.
                wc(0x32, 25 * c, c),
                w(0x33, 25 * c + 100, 200),
                // A compressed cluster zeroed.
                wc(0x34, 26 * c, c),
                wz(26 * c, c),
                // A compressed cluster discarded.
                wc(0x35, 27 * c, c),
                disc(27 * c, c),
                // Compressed next to the last cluster.
                wc(0x36, size - 2 * c, c),
            ]);
        }
        // The last cluster: its first bytes and the disk's last 700 bytes.
        v.push(w(0x1a, size - c, 10));
        v.push(w(0x1b, size - 700, 700));
        v
    }
}

// ---------------------------------------------------------------------------
// Comparisons

fn show(v: Option<&Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => v.to_string(),
    }
}

/// Differences of two `info --output=json` objects on the shared keys.
fn info_diffs(what: &str, q: &Value, o: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for k in INFO_KEYS {
        if q.get(k) != o.get(k) {
            out.push(format!(
                "{what}: info {k:?}: qemu-img {} / ours {}",
                show(q.get(k)),
                show(o.get(k))
            ));
        }
    }
    let (qf, of) = (q.get("format-specific"), o.get("format-specific"));
    if qf.is_some() != of.is_some() {
        out.push(format!(
            "{what}: info \"format-specific\": qemu-img {} / ours {}",
            show(qf),
            show(of)
        ));
        return out;
    }
    if let (Some(qf), Some(of)) = (qf, of) {
        if qf.get("type") != of.get("type") {
            out.push(format!(
                "{what}: info format-specific.type: qemu-img {} / ours {}",
                show(qf.get("type")),
                show(of.get("type"))
            ));
        }
        let empty = serde_json::Map::new();
        let qd = qf.get("data").and_then(Value::as_object).unwrap_or(&empty);
        let od = of.get("data").and_then(Value::as_object).unwrap_or(&empty);
        let mut keys: Vec<&str> = DATA_KEYS.to_vec();
        for k in qd.keys().chain(od.keys()) {
            if !keys.contains(&k.as_str()) {
                keys.push(k);
            }
        }
        for k in keys {
            if qd.get(k) != od.get(k) {
                out.push(format!(
                    "{what}: info format-specific.data.{k}: qemu-img {} / ours {}",
                    show(qd.get(k)),
                    show(od.get(k))
                ));
            }
        }
    }
    out
}

/// Differences of two `map --output=json` arrays.
fn map_diffs(what: &str, q: &Value, o: &Value) -> Vec<String> {
    if q == o {
        return Vec::new();
    }
    let (Some(qa), Some(oa)) = (q.as_array(), o.as_array()) else {
        return vec![format!(
            "{what}: map is not an array: qemu-img {q} / ours {o}"
        )];
    };
    let mut out = vec![format!(
        "{what}: map differs: qemu-img has {} entries, ours {}",
        qa.len(),
        oa.len()
    )];
    let first = (0..qa.len().max(oa.len()))
        .find(|&i| qa.get(i) != oa.get(i))
        .unwrap_or(0);
    for i in first..(first + 3).min(qa.len().max(oa.len())) {
        out.push(format!(
            "{what}:   map entry #{i}: qemu-img {} / ours {}",
            show(qa.get(i)),
            show(oa.get(i))
        ));
    }
    out
}

/// Where and how to run both tools on one image.
struct Target<'a> {
    /// Variant name, prefixed to every message.
    variant: &'a str,
    /// Working directory for qemu-img.
    qemu_cwd: &'a Path,
    /// Working directory for our tool.
    ours_cwd: &'a Path,
    /// Image name, valid from both working directories.
    img: &'a str,
    /// Directory for the raw outputs.
    out: &'a Path,
    /// The check exit code both must give, when known (0 for clean images).
    check: Option<i32>,
}

impl Target<'_> {
    /// Convert, info, map and check against qemu-img; returns the differences.
    fn diffs(&self) -> Vec<String> {
        let v = self.variant;
        let img = self.img;
        let mut f = Vec::new();

        // 1. convert -O raw.
        let qraw = self.out.join("qemu-convert.raw");
        let oraw = self.out.join("ours-convert.raw");
        let (qs, os) = (qraw.to_str().unwrap(), oraw.to_str().unwrap());
        qemu_img(self.qemu_cwd, &["convert", "-O", "raw", img, qs]);
        let o = ours(self.ours_cwd, &["convert", "-O", "raw", img, os]);
        if !o.status.success() {
            f.push(format!(
                "{v}: qcow2 convert {img} failed ({}): {}",
                o.status,
                stderr_of(&o).trim()
            ));
        } else if let Some(d) = file_difference(&qraw, &oraw) {
            f.push(format!(
                "{v}: convert -O raw of {img} (qemu-img / ours): {d}"
            ));
        }
        let _ = std::fs::remove_file(&qraw);
        let _ = std::fs::remove_file(&oraw);

        // 2. info --output=json, 3. map --output=json.
        type Diffs = fn(&str, &Value, &Value) -> Vec<String>;
        for (cmd, diffs) in [("info", info_diffs as Diffs), ("map", map_diffs)] {
            let q = json(&qemu_img(self.qemu_cwd, &[cmd, "--output=json", img]));
            let o = ours(self.ours_cwd, &[cmd, "--output=json", img]);
            if o.status.success() {
                f.extend(diffs(&format!("{v} ({img})"), &q, &json(&stdout_of(&o))));
            } else {
                f.push(format!(
                    "{v}: qcow2 {cmd} {img} failed: {}",
                    stderr_of(&o).trim()
                ));
            }
        }

        // 4. check exit codes.
        let q = run_in(self.qemu_cwd, "qemu-img", &["check", img]);
        let o = ours(self.ours_cwd, &["check", img]);
        if code(&q) != code(&o) {
            f.push(format!(
                "{v}: check {img} exit code: qemu-img {} / ours {} (qemu-img said: {} {}; ours said: {} {})",
                code(&q),
                code(&o),
                stdout_of(&q).trim(),
                stderr_of(&q).trim(),
                stdout_of(&o).trim(),
                stderr_of(&o).trim()
            ));
        }
        if let Some(want) = self.check {
            if code(&q) != want {
                f.push(format!(
                    "{v}: qemu-img check {img} exited {} (test expected {want}): {}",
                    code(&q),
                    stdout_of(&q)
                ));
            }
        }
        f
    }

    fn assert_same(&self) {
        let f = self.diffs();
        assert!(
            f.is_empty(),
            "{}: {} difference(s) from qemu-img:\n{}",
            self.variant,
            f.len(),
            f.join("\n")
        );
    }
}

/// Compares image `img` in `d` (both tools run there, outputs go there),
/// whose check exit code is `check` when known.
fn assert_same_in(variant: &str, d: &Path, img: &str, check: Option<i32>) {
    Target {
        variant,
        qemu_cwd: d,
        ours_cwd: d,
        img,
        out: d,
        check,
    }
    .assert_same();
}

/// Compares a clean image in `s`'s directory (both tools run there).
fn assert_clean(variant: &str, s: &Scratch, img: &str) {
    assert_same_in(variant, s.dir(), img, Some(0));
}

/// Creates `img.qcow2` with `opts`, fills it with the layout of `shape`
/// and compares everything with qemu-img.
fn standard(variant: &str, opts: &str, shape: Shape) {
    let s = Scratch::new();
    let d = s.dir();
    let size = shape.size();
    qemu_create(d, "img.qcow2", opts, size);
    qemu_io(d, "img.qcow2", &shape.cmds(size));
    assert_clean(variant, &s, "img.qcow2");
}

// ---------------------------------------------------------------------------
// Variants: versions, cluster sizes, refcount widths

#[test]
fn v2_compat_0_10() {
    standard("v2 (compat=0.10)", "compat=0.10", Shape::plain(64 * KIB));
}

#[test]
fn v2_compat_0_10_small_clusters() {
    standard(
        "v2 (compat=0.10, cluster_size=4k)",
        "compat=0.10,cluster_size=4096",
        Shape::plain(4 * KIB),
    );
}

macro_rules! cluster_size_tests {
    ($($name:ident: $cs:expr,)*) => {$(
        #[test]
        fn $name() {
            let cs: u64 = $cs;
            standard(
                &format!("cluster_size={cs}"),
                &format!("cluster_size={cs}"),
                Shape::plain(cs),
            );
        }
    )*};
}

cluster_size_tests! {
    cluster_size_512: 512,
    cluster_size_1k: KIB,
    cluster_size_2k: 2 * KIB,
    cluster_size_4k: 4 * KIB,
    cluster_size_8k: 8 * KIB,
    cluster_size_16k: 16 * KIB,
    cluster_size_32k: 32 * KIB,
    cluster_size_64k: 64 * KIB,
    cluster_size_128k: 128 * KIB,
    cluster_size_256k: 256 * KIB,
    cluster_size_512k: 512 * KIB,
    cluster_size_1m: MIB,
    cluster_size_2m: 2 * MIB,
}

#[test]
fn unaligned_virtual_size() {
    for cs in [512, 64 * KIB] {
        let variant = format!("virtual size 4M+1536, cluster_size={cs}");
        let s = Scratch::new();
        let d = s.dir();
        let size = 4 * MIB + 1536;
        qemu_create(d, "img.qcow2", &format!("cluster_size={cs}"), size);
        let mut cmds = Shape::plain(cs).cmds(size);
        cmds.push(w(0x5c, size - 1536, 1536));
        cmds.push(wz(size - 1024, 512));
        qemu_io(d, "img.qcow2", &cmds);
        assert_clean(&variant, &s, "img.qcow2");
    }
}

macro_rules! refcount_tests {
    ($($name:ident: $bits:expr,)*) => {$(
        #[test]
        fn $name() {
            let bits: u32 = $bits;
            standard(
                &format!("refcount_bits={bits}"),
                &format!("refcount_bits={bits}"),
                Shape::plain(64 * KIB),
            );
        }
    )*};
}

refcount_tests! {
    refcount_bits_1: 1,
    refcount_bits_2: 2,
    refcount_bits_4: 4,
    refcount_bits_8: 8,
    refcount_bits_16: 16,
    refcount_bits_32: 32,
    refcount_bits_64: 64,
}

#[test]
fn refcount_bits_1_small_clusters() {
    standard(
        "refcount_bits=1, cluster_size=512",
        "refcount_bits=1,cluster_size=512",
        Shape::plain(512),
    );
}

// ---------------------------------------------------------------------------
// Extended L2 entries

macro_rules! ext_l2_tests {
    ($($name:ident: $cs:expr,)*) => {$(
        #[test]
        fn $name() {
            let cs: u64 = $cs;
            standard(
                &format!("extended_l2=on, cluster_size={cs}"),
                &format!("extended_l2=on,cluster_size={cs}"),
                Shape { cluster: cs, ext_l2: true, compressed: false },
            );
        }
    )*};
}

ext_l2_tests! {
    extended_l2_16k: 16 * KIB,
    extended_l2_64k: 64 * KIB,
    extended_l2_2m: 2 * MIB,
}

#[test]
fn extended_l2_with_compressed_clusters() {
    standard(
        "extended_l2=on, cluster_size=64k, zstd compressed clusters",
        "extended_l2=on,compression_type=zstd",
        Shape {
            cluster: 64 * KIB,
            ext_l2: true,
            compressed: true,
        },
    );
}

// ---------------------------------------------------------------------------
// Compression

/// Seed of the pseudo-random (incompressible) parts of raw sources.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A raw disk of `len` bytes in 64 KiB blocks of varied kinds: zeros,
/// repeated text, pseudo-random bytes (incompressible), half zeros, a ramp.
fn patterned_raw(len: u64) -> Vec<u8> {
    println!("patterned_raw: xorshift seed {SEED:#x}");
    let mut rng = XorShift64(SEED);
    let text = b"qcow2 interop test data; the quick brown fox jumps over the lazy dog. ";
    let mut v = vec![0u8; len as usize];
    for (bi, block) in v.chunks_mut(64 * KIB as usize).enumerate() {
        match bi % 6 {
            0 => {}
            1 => {
                for (i, b) in block.iter_mut().enumerate() {
                    *b = text[(i + bi) % text.len()];
                }
            }
            2 => {
                for b in block.iter_mut() {
                    *b = rng.next_u64() as u8;
                }
            }
            3 => {
                let h = block.len() / 2;
                for (i, b) in block[h..].iter_mut().enumerate() {
                    *b = (i / 7) as u8 ^ bi as u8;
                }
            }
            4 => {
                for (i, b) in block.iter_mut().enumerate() {
                    *b = (i % 251) as u8;
                }
            }
            _ => {
                // Mostly zeros with a few scattered bytes.
                for i in (0..block.len()).step_by(4093) {
                    block[i] = (rng.next_u64() as u8) | 1;
                }
            }
        }
    }
    v
}

fn whole_image_compressed(variant: &str, opts: &str, len: u64) {
    let s = Scratch::new();
    let d = s.dir();
    std::fs::write(s.path("src.raw"), patterned_raw(len)).unwrap();
    qemu_compressed(d, "src.raw", "img.qcow2", opts);
    assert_clean(variant, &s, "img.qcow2");
    // Our output must also equal the source itself.
    ours_ok(d, &["convert", "-O", "raw", "img.qcow2", "back.raw"]);
    assert_eq!(
        file_difference(&s.path("src.raw"), &s.path("back.raw")),
        None,
        "{variant}: convert output differs from the raw source"
    );
}

#[test]
fn compressed_whole_image_zlib() {
    whole_image_compressed(
        "whole image compressed (zlib)",
        "compression_type=zlib",
        4 * MIB,
    );
}

#[test]
fn compressed_whole_image_zstd() {
    whole_image_compressed(
        "whole image compressed (zstd)",
        "compression_type=zstd",
        4 * MIB,
    );
}

#[test]
fn compressed_whole_image_small_clusters_partial_tail() {
    whole_image_compressed(
        "whole image compressed (zstd, cluster_size=4k, size 2M+1536)",
        "compression_type=zstd,cluster_size=4096",
        2 * MIB + 1536,
    );
    whole_image_compressed(
        "whole image compressed (zlib, cluster_size=512)",
        "compression_type=zlib,cluster_size=512",
        MIB,
    );
}

#[test]
fn compressed_mixed_zlib() {
    standard(
        "compressed and plain clusters (zlib)",
        "compression_type=zlib",
        Shape {
            cluster: 64 * KIB,
            ext_l2: false,
            compressed: true,
        },
    );
}

#[test]
fn compressed_mixed_zstd() {
    standard(
        "compressed and plain clusters (zstd)",
        "compression_type=zstd",
        Shape {
            cluster: 64 * KIB,
            ext_l2: false,
            compressed: true,
        },
    );
}

#[test]
fn compressed_mixed_v2_small_clusters() {
    standard(
        "compressed and plain clusters (compat=0.10, cluster_size=2k)",
        "compat=0.10,cluster_size=2048",
        Shape {
            cluster: 2 * KIB,
            ext_l2: false,
            compressed: true,
        },
    );
}

// ---------------------------------------------------------------------------
// Preallocation and lazy refcounts

#[test]
fn preallocation() {
    for mode in ["metadata", "falloc", "full"] {
        standard(
            &format!("preallocation={mode}"),
            &format!("preallocation={mode}"),
            Shape::plain(64 * KIB),
        );
    }
}

#[test]
fn lazy_refcounts_clean() {
    standard(
        "lazy_refcounts=on (clean)",
        "lazy_refcounts=on",
        Shape::plain(64 * KIB),
    );
}

#[test]
fn lazy_refcounts_dirty() {
    let variant = "lazy_refcounts=on, dirty (qemu-io abort)";
    let s = Scratch::new();
    let d = s.dir();
    let shape = Shape::plain(64 * KIB);
    let size = shape.size();
    qemu_create(d, "img.qcow2", "lazy_refcounts=on", size);
    qemu_io(d, "img.qcow2", &shape.cmds(size)[..6]);
    // qemu-io dies by SIGABRT here, leaving the dirty bit set.
    let out = run_in(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &w(0x66, 5 * MIB / 2, 100 * KIB),
            "-c",
            &w(0x67, 64 * KIB + 3, 5000),
            "-c",
            "abort",
            "img.qcow2",
        ],
    );
    assert!(!out.status.success(), "{variant}: qemu-io abort succeeded?");
    let info = qemu_info(d, "img.qcow2");
    assert_eq!(
        info["dirty-flag"],
        Value::Bool(true),
        "{variant}: qemu-img does not see the image as dirty"
    );
    assert_same_in(variant, d, "img.qcow2", None);
}

// ---------------------------------------------------------------------------
// Backing files

/// base <- mid <- top in `sub/`, with relative backing names.
fn make_chain(s: &Scratch) {
    let d = s.dir();
    std::fs::create_dir(s.path("sub")).unwrap();
    std::fs::create_dir(s.path("other")).unwrap();
    let c = 64 * KIB;
    qemu_create(d, "sub/base.qcow2", "", 4 * MIB);
    qemu_io(
        d,
        "sub/base.qcow2",
        &[
            w(0x01, 0, 4 * c),
            w(0x02, 6 * c + 5, 3 * c),
            w(0x03, 20 * c, 8 * c),
            w(0x04, 4 * MIB - c, c),
        ],
    );
    qemu_overlay(d, "sub/mid.qcow2", "", ("base.qcow2", "qcow2"), None);
    qemu_io(
        d,
        "sub/mid.qcow2",
        &[
            // Partly over base data (copy-on-write of the rest).
            w(0x11, c + 100, 500),
            // Zero and discard over base data: the base must stay hidden.
            wz(2 * c, c),
            disc(3 * c, c),
            w(0x12, 21 * c, 2 * c),
            wz(24 * c + 1000, 3000),
            w(0x13, 40 * c, c),
        ],
    );
    qemu_overlay(
        d,
        "sub/top.qcow2",
        "cluster_size=32768",
        ("mid.qcow2", "qcow2"),
        None,
    );
    qemu_io(
        d,
        "sub/top.qcow2",
        &[
            w(0x21, 7, 10),
            w(0x22, 21 * c + 7000, 100),
            disc(40 * c, c),
            w(0x23, 50 * c, c / 2),
            wz(20 * c, c),
            w(0x24, 4 * MIB - 300, 300),
        ],
    );
}

#[test]
fn backing_chain_relative_names() {
    let s = Scratch::new();
    make_chain(&s);
    let d = s.dir();
    let other = s.path("other");
    let mut f = Vec::new();
    // From the scratch root and from a sibling directory: neither is the
    // images' directory, so the relative backing names must be resolved
    // against the naming image's directory.
    for (cwd, prefix) in [(d, "sub/"), (other.as_path(), "../sub/")] {
        for layer in ["top", "mid", "base"] {
            let img = format!("{prefix}{layer}.qcow2");
            let variant = format!(
                "3-deep relative backing chain, {layer} from {}",
                cwd.display()
            );
            f.extend(
                Target {
                    variant: &variant,
                    qemu_cwd: cwd,
                    ours_cwd: cwd,
                    img: &img,
                    out: d,
                    check: Some(0),
                }
                .diffs(),
            );
        }
    }
    assert!(f.is_empty(), "{} difference(s):\n{}", f.len(), f.join("\n"));
}

#[test]
fn info_backing_chain_json() {
    let s = Scratch::new();
    make_chain(&s);
    let other = s.path("other");
    let variant = "info --backing-chain (3-deep relative chain)";
    for (cwd, img) in [
        (s.dir(), "sub/top.qcow2"),
        (other.as_path(), "../sub/top.qcow2"),
    ] {
        let q = json(&qemu_img(
            cwd,
            &["info", "--backing-chain", "--output=json", img],
        ));
        let o = json(&ours_ok(
            cwd,
            &["info", "--backing-chain", "--output=json", img],
        ));
        let (qa, oa) = (q.as_array().unwrap(), o.as_array());
        let oa = oa.unwrap_or_else(|| panic!("{variant}: ours is not a JSON array: {o}"));
        assert_eq!(qa.len(), 3, "{variant}: qemu-img chain length");
        assert_eq!(qa.len(), oa.len(), "{variant}: chain length from {img}");
        let mut f = Vec::new();
        for (i, (qe, oe)) in qa.iter().zip(oa).enumerate() {
            f.extend(info_diffs(&format!("{variant} [{i}] from {img}"), qe, oe));
        }
        assert!(f.is_empty(), "{}", f.join("\n"));
    }
}

#[test]
fn raw_backing_file() {
    let s = Scratch::new();
    let d = s.dir();
    // A raw base with data in places and holes elsewhere.
    let base = patterned_raw(3 * MIB);
    std::fs::write(s.path("base.raw"), &base[..2 * MIB as usize]).unwrap();
    let f = File::options()
        .write(true)
        .open(s.path("base.raw"))
        .unwrap();
    f.set_len(4 * MIB).unwrap();
    drop(f);
    qemu_overlay(d, "img.qcow2", "", ("base.raw", "raw"), None);
    let c = 64 * KIB;
    qemu_io(
        d,
        "img.qcow2",
        &[
            w(0x41, 100, 1000),
            wz(2 * c, c),
            disc(5 * c, c),
            w(0x42, 2 * MIB - 500, 1000),
            w(0x43, 3 * MIB, c),
        ],
    );
    assert_clean("raw backing file (-F raw)", &s, "img.qcow2");
}

#[test]
fn backing_file_shorter_than_overlay() {
    for base_size in [MIB, MIB + 1536] {
        let variant = format!("backing file of {base_size} bytes under a 4M overlay");
        let s = Scratch::new();
        let d = s.dir();
        qemu_create(d, "base.qcow2", "", base_size);
        qemu_io(d, "base.qcow2", &[w(0x51, 0, base_size)]);
        qemu_overlay(d, "img.qcow2", "", ("base.qcow2", "qcow2"), Some("4M"));
        qemu_io(
            d,
            "img.qcow2",
            &[
                w(0x52, 1000, 100),
                // Across the end of the backing file.
                w(0x53, base_size - 1000, 3000),
                // Just beyond it, unaligned (copy-on-write past its end).
                w(0x54, base_size + 64 * KIB + 100, 50),
                w(0x55, 4 * MIB - 10, 10),
            ],
        );
        assert_clean(&variant, &s, "img.qcow2");
    }
}

#[test]
fn backing_file_with_extended_l2() {
    for overlay_opts in ["extended_l2=on", "", "extended_l2=on,cluster_size=32768"] {
        let variant = format!("extended-L2 backing file, overlay options {overlay_opts:?}");
        let s = Scratch::new();
        let d = s.dir();
        let c = 64 * KIB;
        let sc = c / 32;
        qemu_create(d, "base.qcow2", "extended_l2=on", 4 * MIB);
        qemu_io(
            d,
            "base.qcow2",
            &[
                w(0x61, sc, sc),
                w(0x62, 3 * sc + 10, 100),
                w(0x63, 2 * c, c),
                wz(2 * c + 4 * sc, sc),
                w(0x64, 5 * c + 30 * sc, 4 * sc),
            ],
        );
        qemu_overlay(d, "img.qcow2", overlay_opts, ("base.qcow2", "qcow2"), None);
        qemu_io(
            d,
            "img.qcow2",
            &[
                w(0x65, 2 * sc + 3, 10),
                wz(2 * c + sc, 2 * sc),
                disc(2 * c + 6 * sc, sc),
                w(0x66, 5 * c + 31 * sc, 100),
                w(0x67, 9 * c, 3 * sc),
            ],
        );
        assert_clean(&variant, &s, "img.qcow2");
    }
}

// ---------------------------------------------------------------------------
// External data files

/// An image with an external data file named `data_file` (relative to
/// `df/` or absolute), written and compared with qemu-img run inside `df/`
/// and ours run from the scratch root with an absolute image path.
fn external_data_file(variant: &str, data_file: &str, raw: bool) {
    let s = Scratch::new();
    let dfdir = s.path("df");
    std::fs::create_dir(&dfdir).unwrap();
    let mut opts = format!("data_file={data_file}");
    if raw {
        opts += ",data_file_raw=on";
    }
    let shape = Shape::plain(64 * KIB);
    let size = shape.size();
    qemu_create(&dfdir, "img.qcow2", &opts, size);
    qemu_io(&dfdir, "img.qcow2", &shape.cmds(size));
    let img = dfdir.join("img.qcow2");
    Target {
        variant,
        qemu_cwd: &dfdir,
        ours_cwd: s.dir(),
        img: img.to_str().unwrap(),
        out: s.dir(),
        check: Some(0),
    }
    .assert_same();
}

#[test]
fn data_file_relative() {
    external_data_file("external data file (relative name)", "img.data", false);
}

#[test]
fn data_file_relative_raw() {
    external_data_file(
        "external data file (relative name, data_file_raw=on)",
        "img.data",
        true,
    );
}

#[test]
fn data_file_absolute() {
    let s = Scratch::new();
    let abs: PathBuf = s.path("elsewhere.data");
    external_data_file(
        "external data file (absolute name)",
        abs.to_str().unwrap(),
        false,
    );
}

// ---------------------------------------------------------------------------
// Snapshots and bitmaps

#[test]
fn internal_snapshots() {
    let variant = "two internal snapshots";
    let s = Scratch::new();
    let d = s.dir();
    let c = 64 * KIB;
    qemu_create(d, "img.qcow2", "", 4 * MIB);
    qemu_io(
        d,
        "img.qcow2",
        &[w(0x71, 0, 3 * c), w(0x72, 10 * c + 5, 2 * c), wz(20 * c, c)],
    );
    qemu_img(d, &["snapshot", "-c", "s1", "img.qcow2"]);
    qemu_io(
        d,
        "img.qcow2",
        &[w(0x73, c + 100, 200), disc(10 * c, c), w(0x74, 30 * c, c)],
    );
    qemu_img(d, &["snapshot", "-c", "s2", "img.qcow2"]);
    qemu_io(
        d,
        "img.qcow2",
        &[
            wz(0, c),
            w(0x75, 30 * c + 7, 7),
            w(0x76, 4 * MIB - 512, 512),
        ],
    );
    let q = qemu_info(d, "img.qcow2");
    assert_eq!(
        q["snapshots"].as_array().map(Vec::len),
        Some(2),
        "{variant}: qemu-img sees {}",
        q["snapshots"]
    );
    assert_clean(variant, &s, "img.qcow2");
}

#[test]
fn persistent_bitmaps() {
    let variant = "persistent bitmaps (default, 128k granularity, disabled)";
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "img.qcow2", "", 4 * MIB);
    qemu_img(d, &["bitmap", "--add", "img.qcow2", "bm0"]);
    qemu_img(
        d,
        &[
            "bitmap",
            "--add",
            "--granularity",
            "128k",
            "img.qcow2",
            "bm1",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "--disable", "img.qcow2", "bm2"]);
    qemu_img(d, &["bitmap", "--add", "-g", "1M", "img.qcow2", "bm3"]);
    qemu_io(d, "img.qcow2", &Shape::plain(64 * KIB).cmds(4 * MIB));
    let q = qemu_info(d, "img.qcow2");
    assert_eq!(
        q.pointer("/format-specific/data/bitmaps")
            .and_then(Value::as_array)
            .map(Vec::len),
        Some(4),
        "{variant}: qemu-img sees {q}"
    );
    assert_clean(variant, &s, "img.qcow2");
}

// ---------------------------------------------------------------------------
// compare, dd, qcow2-info

/// A 4M image with varied contents (compressed clusters included).
fn rich_image(s: &Scratch) {
    let shape = Shape {
        cluster: 64 * KIB,
        ext_l2: false,
        compressed: true,
    };
    let size = shape.size();
    qemu_create(s.dir(), "img.qcow2", "compression_type=zstd", size);
    qemu_io(s.dir(), "img.qcow2", &shape.cmds(size));
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

/// Runs `compare ARGS` with both tools in `d`; returns a difference in
/// exit code or stdout, and checks qemu-img's exit code is `want`.
fn compare_diff(d: &Path, args: &[&str], want: i32) -> Option<String> {
    let mut qargs = vec!["compare"];
    qargs.extend_from_slice(args);
    let q = run_in(d, "qemu-img", &qargs);
    let o = ours(d, &qargs);
    let (qo, oo) = (stdout_of(&q), stdout_of(&o));
    if code(&q) != want {
        return Some(format!(
            "qemu-img compare {args:?} exited {} (test expected {want}): {qo}",
            code(&q)
        ));
    }
    if code(&q) != code(&o) || qo.trim() != oo.trim() {
        return Some(format!(
            "compare {args:?}: qemu-img exit {} stdout {:?} / ours exit {} stdout {:?} stderr {:?}",
            code(&q),
            qo.trim(),
            code(&o),
            oo.trim(),
            stderr_of(&o).trim()
        ));
    }
    None
}

#[test]
fn compare_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    rich_image(&s);
    ours_ok(d, &["convert", "-O", "raw", "img.qcow2", "ours.raw"]);
    qemu_img(d, &["convert", "-O", "qcow2", "img.qcow2", "copy.qcow2"]);
    let mut f = Vec::new();

    for args in [
        ["img.qcow2", "ours.raw"],
        ["ours.raw", "img.qcow2"],
        ["img.qcow2", "copy.qcow2"],
    ] {
        f.extend(compare_diff(d, &args, 0));
    }
    let o = ours(d, &["compare", "img.qcow2", "ours.raw"]);
    assert_eq!(
        stdout_of(&o).trim(),
        "Images are identical.",
        "qcow2 compare of the image and our own convert output"
    );

    // One changed byte: in data, in a zeroed cluster, in an unallocated
    // cluster, in a compressed cluster, in the last byte and the first.
    let c = 64 * KIB;
    for at in [
        3 * c + 5000,
        8 * c + 77,
        40 * c + 1,
        24 * c + 999,
        4 * MIB - 1,
        0,
    ] {
        std::fs::copy(s.path("ours.raw"), s.path("changed.raw")).unwrap();
        flip_byte(&s.path("changed.raw"), at);
        for args in [["img.qcow2", "changed.raw"], ["changed.raw", "img.qcow2"]] {
            f.extend(compare_diff(d, &args, 1).map(|e| format!("byte {at} changed: {e}")));
        }
        let o = ours(d, &["compare", "img.qcow2", "changed.raw"]);
        let want = format!("Content mismatch at offset {}!", at & !511);
        if stdout_of(&o).trim() != want {
            f.push(format!(
                "byte {at} changed: ours says {:?}, want {want:?}",
                stdout_of(&o).trim()
            ));
        }
    }

    // A changed qcow2 copy (written by qemu-io).
    qemu_io(d, "copy.qcow2", &[w(0xee, 2 * MIB + 3333, 1)]);
    f.extend(compare_diff(d, &["img.qcow2", "copy.qcow2"], 1));
    f.extend(compare_diff(d, &["copy.qcow2", "img.qcow2"], 1));

    // Different sizes: a zero tail is fine unless strict; data in it is not.
    std::fs::copy(s.path("ours.raw"), s.path("longer.raw")).unwrap();
    let lf = File::options()
        .write(true)
        .open(s.path("longer.raw"))
        .unwrap();
    lf.set_len(5 * MIB).unwrap();
    drop(lf);
    f.extend(compare_diff(d, &["img.qcow2", "longer.raw"], 0));
    f.extend(compare_diff(d, &["-s", "img.qcow2", "longer.raw"], 1));
    flip_byte(&s.path("longer.raw"), 4 * MIB + 70000);
    f.extend(compare_diff(d, &["img.qcow2", "longer.raw"], 1));
    f.extend(compare_diff(d, &["longer.raw", "img.qcow2"], 1));

    assert!(
        f.is_empty(),
        "compare: {} difference(s) from qemu-img:\n{}",
        f.len(),
        f.join("\n")
    );
}

#[test]
fn dd_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    rich_image(&s);
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        ("512", None, None),
        ("1M", Some("2"), None),
        ("3000", Some("5"), None),
        ("4096", None, Some("100")),
        ("64k", Some("10"), Some("3")),
        ("512", Some("7"), Some("1000")),
        ("3000", Some("5"), Some("11")),
        ("1M", Some("100"), Some("3")),
    ];
    let mut f = Vec::new();
    for (i, (bs, count, skip)) in cases.iter().enumerate() {
        let qout = format!("qemu-dd-{i}.raw");
        let oout = format!("ours-dd-{i}.raw");
        let mut args = vec![format!("bs={bs}"), "if=img.qcow2".to_string()];
        if let Some(c) = count {
            args.push(format!("count={c}"));
        }
        if let Some(k) = skip {
            args.push(format!("skip={k}"));
        }
        let mut qargs: Vec<String> = vec!["dd".into(), "-O".into(), "raw".into()];
        qargs.extend(args.iter().cloned());
        qargs.push(format!("of={qout}"));
        let mut oargs: Vec<String> = vec!["dd".into()];
        oargs.extend(args.iter().cloned());
        oargs.push(format!("of={oout}"));
        let qargs: Vec<&str> = qargs.iter().map(String::as_str).collect();
        let oargs: Vec<&str> = oargs.iter().map(String::as_str).collect();
        qemu_img(d, &qargs);
        let what = format!("dd {}", args.join(" "));
        let o = ours(d, &oargs);
        if !o.status.success() {
            f.push(format!("{what}: ours failed: {}", stderr_of(&o).trim()));
            continue;
        }
        if skip.is_none() {
            assert!(
                std::fs::metadata(s.path(&qout)).unwrap().len() > 0,
                "{what}: qemu-img wrote nothing"
            );
        }
        if let Some(e) = file_difference(&s.path(&qout), &s.path(&oout)) {
            let (q, o) = (
                std::fs::read(s.path(&qout)).unwrap(),
                std::fs::read(s.path(&oout)).unwrap(),
            );
            let n = q.len().min(o.len());
            let prefix = if q[..n] == o[..n] {
                "the shorter is a prefix of the longer"
            } else {
                "contents differ too"
            };
            f.push(format!(
                "{what}: outputs differ (qemu-img / ours): {e}; {prefix}"
            ));
        }
    }
    assert!(
        f.is_empty(),
        "dd: {} difference(s) from qemu-img dd:\n{}",
        f.len(),
        f.join("\n")
    );
}

fn qcow2_info(cwd: &Path, args: &[&str]) -> String {
    ok_in(cwd, bin("qcow2-info").to_str().unwrap(), args)
}

/// The text of `qcow2-info IMG` in `cwd`, which must mention each of `wants`.
fn qcow2_info_mentions(cwd: &Path, img: &str, wants: &[&str]) -> String {
    let t = qcow2_info(cwd, &[img]);
    for want in wants {
        assert!(t.contains(want), "qcow2-info {img}: no {want:?} in:\n{t}");
    }
    t
}

#[test]
fn qcow2_info_reports_facts() {
    let s = Scratch::new();
    let d = s.dir();
    make_chain(&s);
    qemu_create(d, "ext.qcow2", "extended_l2=on,cluster_size=16384", 3 * MIB);
    qemu_io(d, "ext.qcow2", &[w(0x11, 512, 512)]);
    qemu_create(
        d,
        "zstd.qcow2",
        "compression_type=zstd,cluster_size=4096",
        5 * MIB,
    );
    qemu_io(d, "zstd.qcow2", &[wc(0x22, 0, 4096)]);
    qemu_create(d, "v2.qcow2", "compat=0.10", 4 * MIB + 512);
    qemu_create(d, "snap.qcow2", "", MIB);
    qemu_img(d, &["snapshot", "-c", "first", "snap.qcow2"]);
    qemu_img(d, &["bitmap", "--add", "snap.qcow2", "dirtymap"]);

    qcow2_info_mentions(
        d,
        "ext.qcow2",
        &[
            "virtual size:  3 MiB (3145728 bytes)",
            "cluster size:  16 KiB (16384 bytes)",
            "extended L2",
            "zlib compression",
        ],
    );

    let t = qcow2_info_mentions(
        d,
        "zstd.qcow2",
        &[
            "virtual size:  5 MiB (5242880 bytes)",
            "cluster size:  4 KiB (4096 bytes)",
            "zstd compression",
        ],
    );
    assert!(!t.contains("extended L2"), "qcow2-info zstd.qcow2:\n{t}");

    qcow2_info_mentions(
        d,
        "v2.qcow2",
        &["4194816 bytes", "compat 0.10", "65536 bytes"],
    );
    qcow2_info_mentions(
        d,
        "snap.qcow2",
        &["first", "dirtymap", "1 MiB (1048576 bytes)"],
    );
    let t = qcow2_info_mentions(
        d,
        "sub/top.qcow2",
        &[
            "virtual size:  4 MiB (4194304 bytes)",
            "cluster size:  32 KiB (32768 bytes)",
            "mid.qcow2",
            "base.qcow2",
        ],
    );
    let chain_line = t
        .lines()
        .find(|l| l.contains("backing chain"))
        .unwrap_or_else(|| panic!("qcow2-info sub/top.qcow2: no backing chain line:\n{t}"));
    let (m, b) = (
        chain_line.find("mid.qcow2").unwrap_or(usize::MAX),
        chain_line.find("base.qcow2").unwrap_or(0),
    );
    assert!(
        m < b,
        "qcow2-info sub/top.qcow2: chain not in order top -> mid -> base: {chain_line}"
    );

    // Several images at once, and JSON.
    let j = json(&qcow2_info(
        d,
        &[
            "--json",
            "ext.qcow2",
            "zstd.qcow2",
            "sub/top.qcow2",
            "v2.qcow2",
        ],
    ));
    let a = j.as_array().expect("qcow2-info --json: an array");
    assert_eq!(a.len(), 4, "qcow2-info --json: {j}");
    assert_eq!(
        a[0]["virtual-size"],
        3 * MIB,
        "qcow2-info --json ext: {}",
        a[0]
    );
    assert_eq!(
        a[0]["cluster-size"], 16384,
        "qcow2-info --json ext: {}",
        a[0]
    );
    assert_eq!(
        a[1]["cluster-size"], 4096,
        "qcow2-info --json zstd: {}",
        a[1]
    );
    let chain = a[2]["backing-chain"].to_string();
    assert!(
        chain.contains("mid.qcow2") && chain.contains("base.qcow2"),
        "qcow2-info --json top: {}",
        a[2]
    );
    assert_eq!(a[3]["version"], 2, "qcow2-info --json v2: {}", a[3]);
}

/// The comparison helpers must notice differences, or the tests above
/// could pass without comparing anything.
#[test]
fn harness_detects_differences() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "a.qcow2", "", 4 * MIB);
    qemu_create(d, "b.qcow2", "compat=0.10,cluster_size=4096", 2 * MIB);
    qemu_io(d, "a.qcow2", &[w(0x11, 5000, 10)]);
    let info = |img: &str| qemu_info(d, img);
    let diffs = info_diffs("a/b", &info("a.qcow2"), &info("b.qcow2")).join("\n");
    for key in [
        "\"virtual-size\"",
        "\"filename\"",
        "\"cluster-size\"",
        "data.compat",
        "data.lazy-refcounts",
        "data.extended-l2",
    ] {
        assert!(diffs.contains(key), "info_diffs misses {key}:\n{diffs}");
    }
    assert!(info_diffs("a/a", &info("a.qcow2"), &info("a.qcow2")).is_empty());

    let map = |img: &str| json(&qemu_img(d, &["map", "--output=json", img]));
    assert!(!map_diffs("a/b", &map("a.qcow2"), &map("b.qcow2")).is_empty());
    assert!(map_diffs("a/a", &map("a.qcow2"), &map("a.qcow2")).is_empty());

    qemu_img(d, &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    std::fs::copy(s.path("a.raw"), s.path("c.raw")).unwrap();
    assert_eq!(file_difference(&s.path("a.raw"), &s.path("c.raw")), None);
    flip_byte(&s.path("c.raw"), 3 * MIB + 5);
    let e = file_difference(&s.path("a.raw"), &s.path("c.raw")).unwrap_or_default();
    assert!(e.contains("offset 3145733"), "file_difference: {e:?}");
}

/// `-f`, `-p` and raw sources.
#[test]
fn convert_options_and_raw_source() {
    let s = Scratch::new();
    let d = s.dir();
    rich_image(&s);
    qemu_img(d, &["convert", "-O", "raw", "img.qcow2", "qemu.raw"]);
    ours_ok(
        d,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-p",
            "img.qcow2",
            "p.raw",
        ],
    );
    assert_eq!(
        file_difference(&s.path("qemu.raw"), &s.path("p.raw")),
        None,
        "convert -f qcow2 -p (qemu-img / ours)"
    );
    let o = ours(d, &["info", "-f", "qcow2", "--output=json", "img.qcow2"]);
    assert!(
        o.status.success(),
        "info -f qcow2: {}",
        stderr_of(&o).trim()
    );
    let q = json(&qemu_img(
        d,
        &["info", "-f", "qcow2", "--output=json", "img.qcow2"],
    ));
    let f = info_diffs("info -f qcow2", &q, &json(&stdout_of(&o)));
    assert!(f.is_empty(), "{}", f.join("\n"));

    // A raw image with data and holes as the source.
    let mut raw = patterned_raw(3 * MIB);
    raw.resize(4 * MIB as usize, 0);
    std::fs::write(s.path("src.raw"), &raw).unwrap();
    assert_same_in("raw source image", d, "src.raw", None);
}

/// A check that finds more problems than a report keeps prints every one
/// of them, as qemu-img does (the CLI streams them), and the same summary.
#[test]
fn check_prints_every_problem_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    // Two L2 tables (64 KiB clusters) whose 16,384 entries all have a
    // reserved bit set; the two data clusters become leaks.
    let mut b = qemu_image(
        d,
        "many.qcow2",
        "",
        "1G",
        &["write 0 512", "write 512M 512"],
    );
    let l1 = get64(&b, 40) as usize;
    for i in 0..2 {
        let l2 = (get64(&b, l1 + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        for e in 0..8192 {
            put64(&mut b, l2 + 8 * e, 2);
        }
    }
    std::fs::write(s.path("many.qcow2"), &b).unwrap();
    let q = run_in(d, "qemu-img", &["check", "many.qcow2"]);
    let o = ours(d, &["check", "many.qcow2"]);
    assert_eq!((code(&o), code(&q)), (2, 2));
    let lines = stderr_of(&o).lines().count();
    assert_eq!(lines, 16_386, "every problem printed");
    assert_eq!(stderr_of(&o), stderr_of(&q));
    assert_eq!(stdout_of(&o), stdout_of(&q));
}
