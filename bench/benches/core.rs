//! Criterion benchmarks of the core's hot paths, on images built in memory
//! with the core itself (`create::format` + `WritableImage` writes):
//!
//! - `l2`: mapping guest offsets (`Image::map_shallow`, `map_range`,
//!   `extents`) with the L2 tables cached, and a lookup that misses a
//!   one-table cache (an L2 table read and decoded each time);
//! - `read`: `Image::read_at` over an in-memory `BlockRead` (`&[u8]`): a
//!   plain cluster, a zero cluster, 1 MiB of mixed mappings, a compressed
//!   cluster (zlib, zstd) through the core's codecs and `NativeCodec`;
//! - `codec`: one 64 KiB cluster compressed and decompressed by the core's
//!   no_std codecs (miniz_oxide, ruzstd) and the std host's `NativeCodec`
//!   (libdeflate, libzstd) on one thread;
//! - `zero`: `copy::is_zero` over a 64 KiB cluster.
//!
//! `cargo bench --bench core` (from bench/); short measurement times, so a
//! full run takes about a minute. Filter with `cargo bench --bench core -- l2`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcowkit_core::compress::{self, Codec, Decompressor};
use qcowkit_core::copy::is_zero;
use qcowkit_core::header::CompressionType;
use qcowkit_core::{create, CreateOptions, Extent, Image, OpenOptions, Run, WritableImage};
use qcowkit_std::NativeCodec;

const CLUSTER: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

/// xorshift64*: deterministic inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// A cluster of text-like bytes (words over a small alphabet), which
/// compresses about as well as the text clusters of `scripts/bench-peers.sh`.
fn text_cluster(rng: &mut Rng) -> Vec<u8> {
    let words: Vec<Vec<u8>> = (0..2000)
        .map(|_| {
            let len = 2 + rng.below(8) as usize;
            (0..len).map(|_| b'a' + rng.below(16) as u8).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(CLUSTER + 16);
    while out.len() < CLUSTER {
        out.extend_from_slice(&words[rng.below(words.len() as u64) as usize]);
        out.push(b' ');
    }
    out.truncate(CLUSTER);
    out
}

/// A new empty image of `size` bytes in memory, opened for writing.
fn new_image(size: u64, compression_type: CompressionType) -> WritableImage<Vec<u8>> {
    let opts = CreateOptions {
        size,
        compression_type,
        ..CreateOptions::default()
    };
    let mut io = Vec::new();
    create::format(&mut io, &opts).expect("create image");
    WritableImage::open(io, &OpenOptions::default()).expect("open new image")
}

/// A 1 GiB image (64 KiB clusters, two L2 tables) with mixed mappings: per
/// cluster 1/16 data, 1/4 zero clusters, the rest unallocated. Returns the
/// image's bytes and the guest offsets of its data and zero clusters.
struct Mixed {
    bytes: Vec<u8>,
    data: Vec<u64>,
    zero: Vec<u64>,
}

fn mixed_image() -> Mixed {
    let size = 1 << 30;
    let mut w = new_image(size, CompressionType::Zlib);
    let mut rng = Rng(0x5eed_0001);
    let mut data = Vec::new();
    let mut zero = Vec::new();
    let payload = rng.bytes(CLUSTER);
    for c in 0..size / CLUSTER as u64 {
        let off = c * CLUSTER as u64;
        match rng.below(16) {
            0 => {
                w.write_at(off, &payload).expect("write data cluster");
                data.push(off);
            }
            1..=4 => {
                w.write_zeroes(off, CLUSTER as u64)
                    .expect("write zero cluster");
                zero.push(off);
            }
            _ => {}
        }
    }
    w.flush().expect("flush");
    Mixed {
        bytes: w.into_inner(),
        data,
        zero,
    }
}

/// A 64 MiB image whose every cluster is text stored compressed with
/// `kind` (by the core's encoders).
fn compressed_image(kind: CompressionType) -> Vec<u8> {
    let size = 64 * MIB;
    let mut w = new_image(size, kind);
    let mut rng = Rng(0x5eed_0002);
    let text = text_cluster(&mut rng);
    for c in 0..size / CLUSTER as u64 {
        // Vary the clusters a little so they are not byte-identical.
        let mut cluster = text.clone();
        cluster.rotate_left(rng.below(CLUSTER as u64) as usize);
        assert!(
            w.write_compressed(c * CLUSTER as u64, &cluster)
                .expect("compressed write"),
            "text cluster stored uncompressed"
        );
    }
    w.flush().expect("flush");
    w.into_inner()
}

fn open(bytes: &[u8]) -> Image<&[u8]> {
    Image::open(bytes, &OpenOptions::default()).expect("open image")
}

/// Offsets cycled through by a benchmark, one per iteration.
struct Cycle {
    offsets: Vec<u64>,
    at: usize,
}

impl Cycle {
    /// `n` offsets drawn from `pool` (shuffled, with repeats).
    fn new(pool: &[u64], n: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let offsets = (0..n)
            .map(|_| pool[rng.below(pool.len() as u64) as usize])
            .collect();
        Cycle { offsets, at: 0 }
    }

    fn next(&mut self) -> u64 {
        let o = self.offsets[self.at];
        self.at = (self.at + 1) % self.offsets.len();
        o
    }
}

fn bench_l2(c: &mut Criterion) {
    let m = mixed_image();
    let every_cluster: Vec<u64> = (0..(1u64 << 30) / CLUSTER as u64)
        .map(|i| i * CLUSTER as u64)
        .collect();
    let every_mib: Vec<u64> = (0..1024).map(|i| i * MIB).collect();
    let mut g = c.benchmark_group("l2");
    g.throughput(Throughput::Elements(1));

    let mut img = open(&m.bytes);
    let mut at = Cycle::new(&every_cluster, 4096, 1);
    g.bench_function("map_shallow (cached L2)", |b| {
        b.iter(|| black_box(img.map_shallow(at.next(), CLUSTER as u64).expect("map")))
    });

    let mut runs: Vec<Run> = Vec::new();
    let mut at = Cycle::new(&every_mib, 1024, 2);
    g.bench_function("map_range 1 MiB (cached L2)", |b| {
        b.iter(|| {
            runs.clear();
            img.map_range(at.next(), MIB, &mut runs).expect("map_range");
            black_box(runs.len())
        })
    });

    let mut ext: Vec<Extent> = Vec::new();
    let mut at = Cycle::new(&every_mib, 1024, 3);
    g.bench_function("extents 1 MiB (cached L2)", |b| {
        b.iter(|| {
            ext.clear();
            img.extents(at.next(), MIB, &mut ext).expect("extents");
            black_box(ext.len())
        })
    });

    // A cache of one L2 table, and lookups alternating between the image's
    // two tables: every lookup reads and decodes a table.
    let mut small = Image::open(
        &m.bytes[..],
        &OpenOptions {
            l2_cache_bytes: Some(CLUSTER as u64),
            ..OpenOptions::default()
        },
    )
    .expect("open image");
    let half = 1u64 << 29;
    let mut rng = Rng(4);
    let mut flip = 0u64;
    g.bench_function("map_shallow (L2 cache miss)", |b| {
        b.iter(|| {
            flip ^= half;
            let off = flip + rng.below(half / CLUSTER as u64) * CLUSTER as u64;
            black_box(small.map_shallow(off, CLUSTER as u64).expect("map"))
        })
    });
    g.finish();
}

fn bench_read(c: &mut Criterion) {
    let m = mixed_image();
    let mut g = c.benchmark_group("read");
    let mut buf = vec![0u8; MIB as usize];

    let mut img = open(&m.bytes);
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    let mut at = Cycle::new(&m.data, 1024, 5);
    g.bench_function("read_at plain cluster", |b| {
        b.iter(|| {
            img.read_at(at.next(), &mut buf[..CLUSTER]).expect("read");
            black_box(buf[0])
        })
    });
    let mut at = Cycle::new(&m.zero, 1024, 6);
    g.bench_function("read_at zero cluster", |b| {
        b.iter(|| {
            img.read_at(at.next(), &mut buf[..CLUSTER]).expect("read");
            black_box(buf[0])
        })
    });
    g.throughput(Throughput::Bytes(MIB));
    let every_mib: Vec<u64> = (0..1024).map(|i| i * MIB).collect();
    let mut at = Cycle::new(&every_mib, 1024, 7);
    g.bench_function("read_at 1 MiB mixed", |b| {
        b.iter(|| {
            img.read_at(at.next(), &mut buf).expect("read");
            black_box(buf[0])
        })
    });

    g.throughput(Throughput::Bytes(CLUSTER as u64));
    for (name, kind) in [
        ("zlib", CompressionType::Zlib),
        ("zstd", CompressionType::Zstd),
    ] {
        let bytes = compressed_image(kind);
        let clusters: Vec<u64> = (0..64 * MIB / CLUSTER as u64)
            .map(|i| i * CLUSTER as u64)
            .collect();
        let mut img = open(&bytes);
        let mut at = Cycle::new(&clusters, 1024, 8);
        g.bench_function(format!("read_at {name} cluster (core codec)"), |b| {
            b.iter(|| {
                img.read_at(at.next(), &mut buf[..CLUSTER]).expect("read");
                black_box(buf[0])
            })
        });
        img.set_codec(Box::new(NativeCodec::new(1)));
        g.bench_function(format!("read_at {name} cluster (NativeCodec)"), |b| {
            b.iter(|| {
                img.read_at(at.next(), &mut buf[..CLUSTER]).expect("read");
                black_box(buf[0])
            })
        });
    }
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let mut rng = Rng(0x5eed_0003);
    let text = text_cluster(&mut rng);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    for (name, kind) in [
        ("zlib", CompressionType::Zlib),
        ("zstd", CompressionType::Zstd),
    ] {
        g.bench_function(format!("compress {name} text (core)"), |b| {
            b.iter(|| black_box(compress::compress(kind, black_box(&text))).map(|v| v.len()))
        });
        let mut native = NativeCodec::new(1);
        let mut out = Vec::new();
        g.bench_function(format!("compress {name} text (NativeCodec)"), |b| {
            b.iter(|| {
                let packed = native.compress(kind, black_box(&text), &mut out);
                black_box((packed, out.len()))
            })
        });

        // Both decoders decode the same stream (the core's encoding).
        let packed = compress::compress(kind, &text).expect("compress");
        let mut cluster = vec![0u8; CLUSTER];
        let mut dec = Decompressor::default();
        dec.decompress(kind, &packed, &mut cluster)
            .expect("decompress");
        assert_eq!(cluster, text, "{name} round trip");
        g.bench_function(format!("decompress {name} text (core)"), |b| {
            b.iter(|| {
                dec.decompress(kind, black_box(&packed), &mut cluster)
                    .expect("decompress");
                black_box(cluster[0])
            })
        });
        g.bench_function(format!("decompress {name} text (NativeCodec)"), |b| {
            b.iter(|| {
                Codec::decompress(&mut native, kind, black_box(&packed), &mut cluster)
                    .expect("decompress");
                black_box(cluster[0])
            })
        });
    }
    g.finish();
}

fn bench_zero(c: &mut Criterion) {
    let zeros = vec![0u8; CLUSTER];
    let mut last = vec![0u8; CLUSTER];
    last[CLUSTER - 1] = 1;
    let mut g = c.benchmark_group("zero");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    g.bench_function("is_zero 64 KiB zeros", |b| {
        b.iter(|| black_box(is_zero(black_box(&zeros))))
    });
    g.bench_function("is_zero 64 KiB, last byte set", |b| {
        b.iter(|| black_box(is_zero(black_box(&last))))
    });
    g.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = quick();
    targets = bench_l2, bench_read, bench_codec, bench_zero
}
criterion_main!(benches);
