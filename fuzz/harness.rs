//! The fuzz harnesses, shared by the cargo-fuzz targets (`fuzz/fuzz_targets`)
//! and the corpus replay test (`tests/tests/fuzz_replay.rs`): each takes any
//! bytes, must never panic, hang or allocate without bound, and checks what
//! it can (the writer never touches the header's fixed fields).

use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, CopyOptions, Sink};
use qcowkit_core::map::merged_map;
use qcowkit_core::{BlockRead, BlockWrite, Image, MemError, OpenOptions, WritableImage};

/// Guest bytes a harness looks at, at most (bounds the work per input).
const WINDOW: u64 = 256 << 10;
/// Largest storage a write workload may grow to.
const MAX_STORAGE: usize = 64 << 20;

fn options() -> OpenOptions {
    OpenOptions {
        l2_cache_bytes: Some(256 << 10),
        refcount_cache_bytes: Some(64 << 10),
        ..OpenOptions::default()
    }
}

/// The guest ranges a harness visits: the start and the end of the disk.
fn windows(size: u64) -> [(u64, u64); 2] {
    let w = WINDOW.min(size);
    [(0, w), (size - w, w)]
}

/// A sink that only counts (the copy's routing is what is exercised).
struct Count(u64);

impl Sink for Count {
    type Error = qcowkit_core::Error<MemError>;
    fn data(&mut self, _: u64, _: &mut Vec<u8>, len: usize) -> Result<(), Self::Error> {
        self.0 += len as u64;
        Ok(())
    }
    fn zeroes(&mut self, _: u64, len: u64) -> Result<(), Self::Error> {
        self.0 += len;
        Ok(())
    }
}

/// Open, then read and copy the start and end of the disk.
pub fn open_read(data: &[u8]) {
    let Ok(mut img) = Image::open(data, &options()) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 65536];
    for (start, len) in windows(size) {
        let n = len.min(65536) as usize;
        let _ = img.read_at(start, &mut buf[..n]);
        let mut sink = Count(0);
        let opts = CopyOptions {
            chunk: 1 << 20,
            align: 1,
        };
        if copy(
            &mut img,
            start,
            start + len,
            opts,
            &mut Decompressor::default(),
            &mut sink,
        )
        .is_ok()
        {
            assert_eq!(sink.0, len, "a copy covers its range");
        }
        let mut ext = Vec::new();
        let _ = img.extents(start, len, &mut ext);
    }
}

/// Open as the check does, then check.
pub fn open_check(data: &[u8]) {
    let opts = OpenOptions {
        check_mode: true,
        ..options()
    };
    if let Ok(mut img) = Image::open(data, &opts) {
        let _ = img.check();
    }
}

/// Open, then map the start and end of the disk as `qemu-img map` does.
pub fn open_map(data: &[u8]) {
    let Ok(mut img) = Image::open(data, &options()) else {
        return;
    };
    for (start, len) in windows(img.size()) {
        if let Ok(map) = merged_map(start, start + len, |p, l| img.block_status(p, l)) {
            let covered: u64 = map.iter().map(|e| e.1).sum();
            assert_eq!(covered, len, "a map covers its range");
        }
    }
}

/// A byte vector that refuses to grow past [`MAX_STORAGE`].
struct Bounded(Vec<u8>);

impl BlockRead for Bounded {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        BlockRead::read_at(&mut self.0, offset, buf)
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(self.0.len() as u64)
    }
}

impl BlockWrite for Bounded {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
        let err = MemError {
            offset,
            len: buf.len(),
        };
        let end = offset.checked_add(buf.len() as u64).ok_or(err)?;
        if end > MAX_STORAGE as u64 {
            return Err(err);
        }
        BlockWrite::write_at(&mut self.0, offset, buf)
    }
    fn set_len(&mut self, len: u64) -> Result<(), MemError> {
        if len > MAX_STORAGE as u64 {
            return Err(MemError {
                offset: len,
                len: 0,
            });
        }
        BlockWrite::set_len(&mut self.0, len)
    }
    fn flush(&mut self) -> Result<(), MemError> {
        Ok(())
    }
}

/// The header fields no write may change: magic, version, backing file
/// name, cluster size, virtual size, encryption, L1 table size and offset
/// (bytes 0-47), snapshot count and table (60-71).
fn fixed_fields(storage: &[u8]) -> Vec<u8> {
    let mut out = storage.get(..48).unwrap_or(storage).to_vec();
    out.extend_from_slice(storage.get(60..72).unwrap_or(&[]));
    out
}

/// Open for writing, then run a script of writes, zero writes, discards,
/// compressed writes and flushes. The first 64 bytes of `data` are the
/// script (4 bytes an operation), the rest the image.
pub fn open_write(data: &[u8]) {
    if data.len() < 64 {
        return;
    }
    let (script, image) = data.split_at(64);
    let Ok(mut img) = WritableImage::open(Bounded(image.to_vec()), &options()) else {
        return;
    };
    let fixed = fixed_fields(&img.storage().0);
    let size = img.size();
    if size == 0 {
        return;
    }
    let cs = img.cluster_size();
    for op in script.chunks_exact(4) {
        let at = (u64::from(u16::from_be_bytes([op[1], op[2]])) * 4096) % size;
        let len = (u64::from(op[3]) * 512 + 1).min(size - at);
        let r = match op[0] % 6 {
            0 | 1 => img.write_at(at, &vec![op[3] | 1; len as usize]),
            2 => img.write_zeroes(at, len),
            3 => img.discard(at, len),
            4 => {
                let start = at - at % cs;
                let n = cs.min(size - start) as usize;
                img.write_compressed(start, &vec![op[3]; n]).map(|_| ())
            }
            _ => img.flush(),
        };
        assert!(
            fixed_fields(&img.storage().0) == fixed,
            "a write changed the header's fixed fields"
        );
        if r.is_err() {
            break;
        }
    }
    let _ = img.flush();
    assert!(fixed_fields(&img.storage().0) == fixed);
}
