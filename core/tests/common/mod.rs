//! Helpers of the core's own tests: the checked-in images of `tests/data`
//! (made by `tests/data/make-fixtures.sh` with qemu-img), an in-memory
//! opener for their backing files, and a small seeded RNG.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;

use qcowkit_core::{FileRole, Image, MemError, OpenOptions, Opened, Opener, WritableImage};

/// The fixtures: (image name, has a backing file).
pub const FIXTURES: &[&str] = &[
    "plain-512",
    "v2-4k",
    "extl2-16k",
    "zlib-4k",
    "zstd-4k",
    "base-4k",
    "top-4k",
    "snap-4k",
];

fn unzstd(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}.zst", env!("CARGO_MANIFEST_DIR"));
    let packed = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    ruzstd::decoding::StreamingDecoder::new(&packed[..])
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    out
}

/// The bytes of fixture `name` (`NAME.qcow2`).
pub fn image(name: &str) -> Vec<u8> {
    unzstd(&format!("{name}.qcow2"))
}

/// The guest contents of fixture `name`, as `qemu-img convert -O raw` made them.
pub fn guest(name: &str) -> Vec<u8> {
    unzstd(&format!("{name}.raw"))
}

/// Files an image may name, by name, in memory.
#[derive(Debug, Default, Clone)]
pub struct Files(pub HashMap<String, Vec<u8>>);

impl Opener<Vec<u8>> for Files {
    fn open(
        &mut self,
        _parent: &str,
        name: &str,
        _role: FileRole,
    ) -> Result<Opened<Vec<u8>>, MemError> {
        let io = self
            .0
            .get(name)
            .cloned()
            .ok_or(MemError { offset: 0, len: 0 })?;
        Ok(Opened {
            io,
            resolved: name.to_string(),
            identity: name.to_string(),
        })
    }
}

/// The fixtures' backing files.
pub fn files() -> Files {
    let mut f = Files::default();
    f.0.insert("base-4k.qcow2".into(), image("base-4k"));
    f
}

/// Opens `bytes` (fixture `name`) read-only, with its backing chain.
pub fn open(name: &str, bytes: Vec<u8>) -> Image<Vec<u8>> {
    Image::open_with(bytes, name, name, &mut files(), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Opens `bytes` (fixture `name`) for writing, with its backing chain.
pub fn open_rw(name: &str, bytes: Vec<u8>, opts: &OpenOptions) -> WritableImage<Vec<u8>> {
    WritableImage::open_with(bytes, name, name, &mut files(), opts)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A small xorshift generator for reproducible random workloads.
pub struct Rng(pub u64);

impl Rng {
    /// A generator from the `QCOWKIT_SEED` environment variable, or `default`;
    /// prints the seed so that a failure can be replayed.
    pub fn seeded(test: &str, default: u64) -> Rng {
        // A value that does not parse is an error, not a silent fallback.
        let seed = match std::env::var("QCOWKIT_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("QCOWKIT_SEED={s:?} is not a u64")),
            Err(_) => default,
        };
        println!("{test}: seed {seed} (set QCOWKIT_SEED to replay)");
        Rng(seed.max(1))
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
