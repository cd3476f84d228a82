//! Read-ahead through `Disk::read_at`: sequential walks in small steps
//! (4 KiB, odd sizes that straddle clusters and windows, whole clusters)
//! and random jumps mixed in return exactly what qemu-img reads, on
//! plain, zlib, zstd and extended-L2 images and a backing chain; the heap
//! grows by one window at most.

use qcowkit_std::{Disk, DiskOptions, DEFAULT_READ_AHEAD};
use qcowkit_tests::heap::{self, reset_peak};
use qcowkit_tests::*;

#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

const MIB: usize = 1 << 20;

/// A raw disk of `size` bytes, cluster by cluster (64 KiB): random, text,
/// or zeros.
fn mixed_raw(rng: &mut SplitMix64, size: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(size);
    while raw.len() < size {
        match rng.below(10) {
            0..=5 => raw.extend(rng.bytes(65536)),
            6 => raw.extend(
                b"a line of text that compresses well, again and again\n"
                    .iter()
                    .cycle()
                    .take(65536),
            ),
            _ => raw.extend(std::iter::repeat_n(0u8, 65536)),
        }
    }
    raw.truncate(size);
    raw
}

/// Reads all of `name` through a `Disk` opened with `opts` in the request sizes of
/// `steps` (cycled), jumping to a random offset every `jump_every`
/// requests, and compares every request with `want`. Returns the heap's
/// growth while reading.
fn walk(
    s: &Scratch,
    name: &str,
    opts: &DiskOptions,
    want: &[u8],
    steps: &[usize],
    rng: &mut SplitMix64,
) -> usize {
    let mut disk = Disk::open(&s.path(name), opts).unwrap();
    let size = disk.size();
    assert_eq!(size, want.len() as u64, "{name}");
    let mut buf = vec![0u8; steps.iter().copied().fold(100, usize::max)];
    let base = reset_peak();
    let mut pos = 0u64;
    for i in 0.. {
        if pos >= size {
            break;
        }
        if i % 37 == 36 {
            // A random read elsewhere, then back to the walk.
            let at = rng.below(size - 100);
            let n = 1 + rng.index(99);
            disk.read_at(at, &mut buf[..n]).unwrap();
            let at = at as usize;
            assert!(buf[..n] == want[at..at + n], "{name}: jump to {at}");
        }
        let n = (steps[i % steps.len()] as u64).min(size - pos) as usize;
        disk.read_at(pos, &mut buf[..n]).unwrap();
        let p = pos as usize;
        if let Some(d) = first_mismatch(&buf[..n], &want[p..p + n]) {
            panic!("{name}: steps {steps:?}, request of {n} at {pos}: {d}");
        }
        pos += n as u64;
    }
    heap::peak() - base
}

#[test]
fn sequential_small_reads_match_qemu_on_every_kind_of_image() {
    let seed = seed_or(
        "sequential_small_reads_match_qemu_on_every_kind_of_image",
        "QCOWKIT_SEED",
        7,
    );
    let mut rng = SplitMix64::new(seed);
    let s = Scratch::new();
    let d = s.dir();
    // 12 MiB + 1.5 KiB: three windows and a short tail.
    let raw = mixed_raw(&mut rng, 12 * MIB + 1536);
    std::fs::write(s.path("disk.raw"), &raw).unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "disk.raw",
            "plain.qcow2",
        ],
    );
    qemu_compressed(d, "disk.raw", "zlib.qcow2", "");
    qemu_compressed(d, "disk.raw", "zstd.qcow2", "compression_type=zstd");
    qemu_compressed(
        d,
        "disk.raw",
        "ext.qcow2",
        "extended_l2=on,cluster_size=128k,compression_type=zstd",
    );
    // A chain: compressed base, an overlay writing 1000 bytes every 3 MiB.
    qemu_overlay(d, "top.qcow2", "", ("zlib.qcow2", "qcow2"), None);
    let writes: Vec<String> = (0..4)
        .map(|i| format!("write -P 0x5a {} 1000", i * 3 * MIB + 700))
        .collect();
    qemu_io(d, "top.qcow2", &writes);
    let top = qemu_contents(d, "top.qcow2");
    let cases: [(&str, &[u8]); 5] = [
        ("plain.qcow2", &raw),
        ("zlib.qcow2", &raw),
        ("zstd.qcow2", &raw),
        ("ext.qcow2", &raw),
        ("top.qcow2", &top),
    ];
    let patterns: [&[usize]; 3] = [&[4096], &[3000, 512, 70_000, 1, 7], &[65536]];
    let no_window = DiskOptions {
        read_ahead: 0,
        ..DiskOptions::default()
    };
    for (name, want) in cases {
        for steps in patterns {
            let on = walk(&s, name, &DiskOptions::default(), want, steps, &mut rng);
            let off = walk(&s, name, &no_window, want, steps, &mut rng);
            println!("{name} {steps:?}: heap grew by {on} bytes ({off} without read-ahead)");
            // The window, and the compressed input of a window that the
            // core reads before decoding it (at most a window again).
            assert!(
                on <= off + 2 * DEFAULT_READ_AHEAD,
                "{name} {steps:?}: heap grew by {on} bytes ({off} without read-ahead)"
            );
        }
    }
}

#[test]
fn read_ahead_off_reads_the_same() {
    let s = Scratch::new();
    let d = s.dir();
    let mut rng = SplitMix64::new(3);
    let raw = mixed_raw(&mut rng, 3 * MIB);
    std::fs::write(s.path("disk.raw"), &raw).unwrap();
    qemu_compressed(d, "disk.raw", "zlib.qcow2", "");
    let off = DiskOptions {
        read_ahead: 0,
        ..DiskOptions::default()
    };
    let mut disk = Disk::open(&s.path("zlib.qcow2"), &off).unwrap();
    let mut buf = vec![0u8; 4096];
    let base = reset_peak();
    for pos in (0..raw.len()).step_by(4096) {
        disk.read_at(pos as u64, &mut buf).unwrap();
        assert!(buf[..] == raw[pos..pos + 4096], "4 KiB at {pos}");
    }
    // No window: well under one.
    let grew = heap::peak() - base;
    assert!(grew < MIB, "heap grew by {grew} bytes");
}
