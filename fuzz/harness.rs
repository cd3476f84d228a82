//! The fuzz harnesses, shared by the cargo-fuzz targets (`fuzz/fuzz_targets`)
//! and the corpus replay test (`tests/tests/fuzz_replay.rs`): each takes any
//! bytes, must never panic, hang or allocate without bound, and checks what
//! it can (the writer never touches the header's fixed fields).

use std::collections::BTreeMap;

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

/// Open as the check does, then check; then repair (`check -r all`),
/// which must not change a guest byte of the start and end of the disk.
pub fn open_check(data: &[u8]) {
    let opts = OpenOptions {
        check_mode: true,
        ..options()
    };
    if let Ok(mut img) = Image::open(data, &opts) {
        let _ = img.check();
    }
    let before = guest_windows(data, &opts);
    let Ok(img) = Image::open(Bounded::new(data.to_vec()), &opts) else {
        return;
    };
    let Ok(mut w) = WritableImage::for_repair(img) else {
        return;
    };
    let _ = w.repair(qcowkit_core::RepairMode::All, &mut |_| {});
    let after = guest_windows(&w.into_inner().data, &opts);
    if let (Some(b), Some(a)) = (before, after) {
        assert!(b == a, "the repair changed guest data");
    }
}

/// L1 entries an image may have for [`maintain`] (1 MiB of table).
const MAX_MAINTAIN_L1: u32 = 1 << 17;

/// Maintenance on any image: growing and shrinking the disk, taking,
/// applying and deleting a snapshot, each on a fresh copy. Never a panic,
/// a hang or an unbounded allocation; on an image that checks clean, a
/// successful operation leaves it without corruption, and taking a
/// snapshot or growing the disk leaves the guest bytes of the start and
/// end windows (of the old size) as they were.
pub fn maintain(data: &[u8]) {
    let check_opts = OpenOptions {
        check_mode: true,
        ..options()
    };
    let clean = match Image::open(data, &check_opts) {
        // Five operations each copy the L1 table a few times: large tables
        // (up to QEMU's 32 MiB) are bounded by the core, but would make one
        // input cost hundreds of MiB here.
        Ok(img) if img.header().l1_size > MAX_MAINTAIN_L1 => return,
        Ok(mut img) => {
            matches!(img.check(), Ok(r) if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0)
        }
        Err(_) => return,
    };
    let before = guest_windows(data, &check_opts);
    for op in 0..8 {
        let Ok(img) = Image::open(Bounded::new(data.to_vec()), &options()) else {
            return;
        };
        let Ok(mut w) = WritableImage::new(img) else {
            return;
        };
        let size = w.size();
        let first = w
            .snapshots()
            .first()
            .map(|s| (s.id.clone(), s.name.clone()));
        let r = match op {
            0 => w.resize((size + (1 << 20)) & !511, qcowkit_core::Preallocation::Off),
            1 => w.resize(
                ((size / 2) & !511).max(512),
                qcowkit_core::Preallocation::Off,
            ),
            2 => w.create_snapshot("fuzz", 0, 0).map(|_| ()),
            3 => match &first {
                Some((id, _)) => w.apply_snapshot(id).map(|_| ()),
                None => continue,
            },
            4 => match &first {
                Some((_, name)) => w.delete_snapshot(name).map(|_| ()),
                None => continue,
            },
            5 => {
                let other = if w.header().version == 2 { 3 } else { 2 };
                w.set_version(other)
            }
            6 => {
                let bits = if w.header().refcount_order == 4 {
                    64
                } else {
                    16
                };
                w.set_refcount_bits(bits)
            }
            _ => w.make_empty(),
        }
        .and_then(|()| w.flush());
        if !clean || r.is_err() {
            continue;
        }
        let out = w.into_inner().data;
        let mut img = Image::open(&out[..], &check_opts).expect("an image we maintained opens");
        let rep = img.check().expect("an image we maintained checks");
        assert!(
            rep.corruptions == 0 && rep.check_errors == 0,
            "operation {op} left {} corruptions on a clean image: {:?}",
            rep.corruptions,
            rep.messages
        );
        // Growing, taking a snapshot and changing the version or the
        // refcount width keep what the guest reads.
        if matches!(op, 0 | 2 | 5 | 6) {
            let mut old = 0u64;
            if let (Some(b), Ok(mut now)) = (&before, Image::open(&out[..], &check_opts)) {
                let w = 256u64 << 10;
                let mut buf = Vec::new();
                for (start, len) in windows(size) {
                    let mut piece = vec![0u8; len.min(w) as usize];
                    if now.read_at(start, &mut piece).is_ok() {
                        buf.extend(piece);
                    }
                    old += len;
                }
                if buf.len() as u64 == old {
                    assert!(*b == buf, "operation {op} changed guest data");
                }
            }
        }
    }
}

/// The guest bytes of the start and end of the disk, when they read.
fn guest_windows(data: &[u8], opts: &OpenOptions) -> Option<Vec<u8>> {
    let mut img = Image::open(data, opts).ok()?;
    let mut out = Vec::new();
    for (start, len) in windows(img.size()) {
        let mut buf = vec![0u8; len as usize];
        img.read_at(start, &mut buf).ok()?;
        out.extend(buf);
    }
    Some(out)
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

/// A byte vector that refuses to grow past [`MAX_STORAGE`], and watches
/// for guest data landing on metadata: while a guest write of `fill` bytes
/// runs, a storage write made only of that byte must not touch any of
/// `ranges` (the metadata the harness found on disk before the operation).
struct Bounded {
    data: Vec<u8>,
    watch: std::cell::RefCell<Watch>,
}

#[derive(Default)]
struct Watch {
    fill: Option<u8>,
    ranges: Vec<(u64, u64, &'static str)>,
    hit: Option<String>,
}

impl Bounded {
    fn new(data: Vec<u8>) -> Self {
        Bounded {
            data,
            watch: Default::default(),
        }
    }
}

impl BlockRead for Bounded {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        BlockRead::read_at(&mut self.data, offset, buf)
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(self.data.len() as u64)
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
        let w = self.watch.get_mut();
        if let Some(fill) = w.fill {
            if w.hit.is_none() && !buf.is_empty() && buf.iter().all(|b| *b == fill) {
                if let Some((at, len, what)) = w
                    .ranges
                    .iter()
                    .find(|(at, len, _)| offset < at.saturating_add(*len) && *at < end)
                {
                    w.hit = Some(format!(
                        "guest data ({} bytes of {fill:#x}) written at {offset:#x} over the {what} at {at:#x}+{len:#x}",
                        buf.len()
                    ));
                }
            }
        }
        BlockWrite::write_at(&mut self.data, offset, buf)
    }
    fn set_len(&mut self, len: u64) -> Result<(), MemError> {
        if len > MAX_STORAGE as u64 {
            return Err(MemError {
                offset: len,
                len: 0,
            });
        }
        BlockWrite::set_len(&mut self.data, len)
    }
    fn flush(&mut self) -> Result<(), MemError> {
        Ok(())
    }
}

/// The metadata of the image in `b`, found by the harness's own reading
/// of the on-disk pointers (independent of the writer's bookkeeping): the
/// header cluster, the active and snapshot L1 tables and the L2 tables
/// they point to, the refcount table and blocks, the snapshot table.
/// Entries are read only as far as the file holds them.
fn metadata_ranges(b: &[u8]) -> Vec<(u64, u64, &'static str)> {
    let be = |at: u64, n: usize| -> u64 {
        let at = at as usize;
        b.get(at..at.saturating_add(n))
            .map_or(0, |s| s.iter().fold(0u64, |a, x| a << 8 | u64::from(*x)))
    };
    let cluster_bits = be(20, 4);
    if !(9..=21).contains(&cluster_bits) {
        return Vec::new();
    }
    let cs = 1u64 << cluster_bits;
    let file = b.len() as u64;
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let mut out = vec![(0, cs, "header")];
    let tables = |out: &mut Vec<(u64, u64, &'static str)>, l1: u64, entries: u64, what| {
        out.push((l1, entries.saturating_mul(8), what));
        let n = entries.min(file.saturating_sub(l1) / 8);
        for i in 0..n {
            let l2 = be(l1 + 8 * i, 8) & mask;
            if l2 != 0 {
                out.push((l2, cs, "L2 table"));
            }
        }
    };
    tables(&mut out, be(40, 8), be(36, 4), "active L1 table");
    let (rt, rt_clusters) = (be(48, 8), be(56, 4));
    out.push((rt, rt_clusters.saturating_mul(cs), "refcount table"));
    let n = (rt_clusters.saturating_mul(cs) / 8).min(file.saturating_sub(rt) / 8);
    for i in 0..n {
        let block = be(rt + 8 * i, 8) & !(cs - 1);
        if block != 0 {
            out.push((block, cs, "refcount block"));
        }
    }
    let (nb, mut at) = (be(60, 4), be(64, 8));
    let start = at;
    for _ in 0..nb.min(file / 40) {
        if at.saturating_add(40) > file {
            break;
        }
        tables(&mut out, be(at, 8), be(at + 8, 4), "snapshot L1 table");
        let len = 40 + be(at + 36, 4) + be(at + 12, 2) + be(at + 14, 2);
        at = at.saturating_add(len.div_ceil(8) * 8);
    }
    if nb > 0 {
        out.push((start, at - start, "snapshot table"));
    }
    out
}

/// The header fields no write may change: magic, version, backing file
/// name, cluster size, virtual size, encryption, L1 table size and offset
/// (bytes 0-47), snapshot count and table (60-71).
fn fixed_fields(storage: &[u8]) -> Vec<u8> {
    let mut out = storage.get(..48).unwrap_or(storage).to_vec();
    out.extend_from_slice(storage.get(60..72).unwrap_or(&[]));
    out
}

/// What the guest disk should hold after a script, cluster by cluster,
/// for the clusters the script touched (read from the original image on
/// first touch).
struct Model<'a> {
    orig: Image<&'a [u8]>,
    cs: u64,
    size: u64,
    clusters: BTreeMap<u64, Vec<u8>>,
}

impl<'a> Model<'a> {
    fn new(image: &'a [u8], cs: u64, size: u64) -> Option<Self> {
        let orig = Image::open(image, &options()).ok()?;
        Some(Model {
            orig,
            cs,
            size,
            clusters: BTreeMap::new(),
        })
    }

    /// The model of cluster `c` (None when the original cannot be read).
    fn cluster(&mut self, c: u64) -> Option<&mut Vec<u8>> {
        if !self.clusters.contains_key(&c) {
            let start = c * self.cs;
            let mut buf = vec![0u8; (self.cs.min(self.size - start)) as usize];
            self.orig.read_at(start, &mut buf).ok()?;
            self.clusters.insert(c, buf);
        }
        self.clusters.get_mut(&c)
    }

    /// Applies `f(cluster_bytes, from, to, whole)` to every cluster piece
    /// of `[at, at + len)`; false when an original cluster cannot be read.
    fn apply(&mut self, at: u64, len: u64, mut f: impl FnMut(&mut [u8], bool)) -> bool {
        let mut pos = at;
        while pos < at + len {
            let c = pos / self.cs;
            let start = c * self.cs;
            let end = (start + self.cs).min(self.size);
            let n = end.min(at + len) - pos;
            let whole = pos == start && n == end - start;
            let Some(buf) = self.cluster(c) else {
                return false;
            };
            let from = (pos - start) as usize;
            f(&mut buf[from..from + n as usize], whole);
            pos += n;
        }
        true
    }
}

/// Open for writing, then run a script of writes, zero writes, discards,
/// compressed writes and flushes. The first 64 bytes of `data` are the
/// script (4 bytes an operation), the rest the image.
///
/// On any image: the header's fixed fields never change, and guest data
/// never lands on metadata the harness finds on disk (see [`Bounded`]).
/// On an image whose
/// check finds no corruption: no write is refused as an overlap, and after
/// the script the image reopens, checks without corruption, reads back
/// what the script wrote (a byte model of every cluster it touched), and
/// the start and end of the disk are unchanged elsewhere. Returns whether
/// that model was checked (the script ran through on a clean image).
pub fn open_write(data: &[u8]) -> bool {
    if data.len() < 64 {
        return false;
    }
    let (script, image) = data.split_at(64);
    let Ok(mut img) = WritableImage::open(Bounded::new(image.to_vec()), &options()) else {
        return false;
    };
    let fixed = fixed_fields(&img.storage().data);
    let size = img.size();
    if size == 0 {
        return false;
    }
    let cs = img.cluster_size();
    let clean = matches!(img.check(), Ok(r) if r.corruptions == 0 && r.check_errors == 0);
    // The image as the writer's open left it (a dirty image was rebuilt).
    let opened = img.storage().data.clone();
    let mut model = if clean {
        Model::new(&opened, cs, size)
    } else {
        None
    };
    let mut failed = false;
    for op in script.chunks_exact(4) {
        let at = (u64::from(u16::from_be_bytes([op[1], op[2]])) * 4096) % size;
        let len = (u64::from(op[3]) * 512 + 1).min(size - at);
        let (r, range) = match op[0] % 6 {
            0 | 1 => {
                let fill = op[3] | 1;
                let ranges = metadata_ranges(&img.storage().data);
                *img.storage().watch.borrow_mut() = Watch {
                    fill: Some(fill),
                    ranges,
                    hit: None,
                };
                let r = img.write_at(at, &vec![fill; len as usize]);
                let watch = img.storage().watch.take();
                if let Some(hit) = watch.hit {
                    panic!("{hit}");
                }
                (r, Some((at, len, 0u8, fill)))
            }
            2 => (img.write_zeroes(at, len), Some((at, len, 1, 0))),
            3 => (img.discard(at, len), Some((at, len, 2, 0))),
            4 => {
                let start = at - at % cs;
                let n = cs.min(size - start);
                let r = img.write_compressed(start, &vec![op[3]; n as usize]);
                (r.map(|_| ()), Some((start, n, 0, op[3])))
            }
            _ => (img.flush(), None),
        };
        assert!(
            fixed_fields(&img.storage().data) == fixed,
            "a write changed the header's fixed fields"
        );
        if let Err(e) = &r {
            assert!(
                !(clean && matches!(e, qcowkit_core::Error::MetadataOverlap { .. })),
                "a write into an image that checks clean was refused: {e}"
            );
        }
        if let (Some(m), Some((at, len, kind, fill))) = (&mut model, range) {
            let known = r.is_ok()
                && m.apply(at, len, |b, whole| match kind {
                    0 => b.fill(fill),
                    1 => b.fill(0),
                    _ if whole => b.fill(0),
                    _ => {}
                });
            if !known {
                // What a failed operation left is not known.
                model = None;
            }
        }
        if r.is_err() {
            failed = true;
            break;
        }
    }
    let flushed = img.flush();
    assert!(fixed_fields(&img.storage().data) == fixed);
    let (Some(mut m), false, Ok(())) = (model, failed, flushed) else {
        return false;
    };
    let after = img.into_inner().data;
    let mut back = Image::open(&after[..], &options())
        .unwrap_or_else(|e| panic!("an image that checked clean no longer opens: {e}"));
    let r = back.check().expect("check after the script");
    assert!(
        r.corruptions == 0 && r.check_errors == 0,
        "an image that checked clean has {} corruptions now: {:?}",
        r.corruptions,
        r.messages
    );
    let mut buf = Vec::new();
    for (&c, want) in &m.clusters {
        buf.resize(want.len(), 0);
        back.read_at(c * cs, &mut buf).expect("read back");
        assert!(
            buf == *want,
            "guest cluster {c} does not read back as written"
        );
    }
    for (start, len) in windows(size) {
        let mut pos = start;
        while pos < start + len {
            let c = pos / cs;
            let n = ((c + 1) * cs).min(start + len) - pos;
            if !m.clusters.contains_key(&c) {
                let mut want = vec![0u8; n as usize];
                buf.resize(n as usize, 0);
                if m.orig.read_at(pos, &mut want).is_ok() {
                    back.read_at(pos, &mut buf).expect("read back");
                    assert!(buf == want, "untouched guest cluster {c} changed");
                }
            }
            pos += n;
        }
    }
    true
}
