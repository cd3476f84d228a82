//! The image opened for writing: [`WritableImage`] owns the read state
//! (an [`Image`]) and the write state (refcounts, allocation, pending frees,
//! dirty tables), and makes writes durable in a crash-safe order.
//!
//! Write order (each arrow is a flush of the storage):
//! 1. guest data and new refcount blocks/increments are written,
//! 2. → refcount table entries pointing at new refcount blocks,
//! 3. → L2 tables (new or changed),
//! 4. → L1 entries pointing at new L2 tables,
//! 5. → refcount decrements of clusters no longer referenced,
//!    → done.
//!
//! A crash anywhere leaves every durable reference pointing at a cluster
//! whose refcount is durable and whose contents were written before it.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};

use crate::backing::Opener;
use crate::bytes::{to_u64, to_usize};
use crate::error::Error;
use crate::header::{autoclear, incompat};
use crate::image::{Image, OpenOptions, Res};
use crate::io::{BlockRead, BlockWrite};
use crate::l2;
use crate::overlap::{self, MetadataMap};
use crate::rctable::Refcounts;
use crate::refcount;

/// A qcow2 image opened for reading and writing.
///
/// It reads like an [`Image`] (it dereferences to one) and adds writes,
/// zero writes, discards, compressed writes, preallocation and
/// [`WritableImage::flush`]. Only this type carries write state: an image
/// opened for reading never does.
#[derive(Debug)]
pub struct WritableImage<R: BlockWrite> {
    pub(crate) img: Image<R>,
    /// Refcount table and cached refcount blocks.
    pub(crate) refcounts: Refcounts,
    /// First cluster index worth searching for free space.
    pub(crate) free_hint: u64,
    /// End of the host file as far as allocations know.
    pub(crate) file_end: u64,
    /// Byte ranges whose clusters lose one reference once the L2/L1
    /// changes that dropped them are durable.
    pub(crate) pending_frees: Vec<(u64, u64)>,
    /// The same ranges as a map: still referenced on disk until the next
    /// flush, so never handed out before it (even where a damaged image's
    /// refcounts already read 0).
    pub(crate) pending_map: MetadataMap,
    /// Where the next compressed cluster may be packed.
    pub(crate) compressed_next: Option<u64>,
    /// L1 entries changed in memory, not yet written.
    pub(crate) dirty_l1: BTreeSet<usize>,
    /// Guest data was written since the last flush.
    pub(crate) data_dirty: bool,
    /// Where the image's metadata is; every write is checked against it.
    pub(crate) metadata: MetadataMap,
    /// Enabled persistent bitmaps were flagged in use (before the first
    /// change of guest data since the last flush).
    pub(crate) bitmaps_marked: bool,
    /// The enabled bitmaps kept up to date until the next flush.
    pub(crate) tracked: Vec<crate::bitmap_write::Tracked>,
    /// A write was refused as an overlap: nothing more is written.
    pub(crate) corrupt: bool,
    /// While a dirty image's refcounts are rebuilt: the references counted.
    pub(crate) rebuilding: Option<crate::check::Refs>,
}

/// Snapshot L1 entries read at most when the metadata map is built (32 MiB
/// of tables, QEMU's limit for one): bounds the work on hostile snapshot
/// tables; tables past it are protected by their refcounts only.
const MAX_INACTIVE_L1_ENTRIES: u64 = 4 << 20;

/// The metadata of `img` as QEMU's overlap checks see it (header, active
/// L1 and L2 tables, refcount table and blocks, snapshot table, inactive
/// L1 tables, bitmap directory, encryption header), plus the snapshots' L2
/// tables, which QEMU checks only in its slowest mode: a damaged image
/// whose refcounts miss a snapshot's table must not lose it to guest data.
pub(crate) fn metadata_of<R: BlockRead>(
    img: &mut Image<R>,
    refcounts: &Refcounts,
) -> Res<MetadataMap, R> {
    let h = &img.header;
    let cs = h.cluster_size();
    let mut m = MetadataMap::new();
    m.insert(0, cs, overlap::HEADER);
    m.insert(
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        overlap::ACTIVE_L1,
    );
    for &e in &img.l1 {
        let off = l2::l1_offset(e);
        if off != 0 {
            m.insert(off, cs, overlap::ACTIVE_L2);
        }
    }
    m.insert(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        overlap::REFCOUNT_TABLE,
    );
    for &e in &refcounts.table {
        let off = refcount::table_entry_offset(e);
        if off != 0 {
            m.insert(off, cs, overlap::REFCOUNT_BLOCK);
        }
    }
    if h.nb_snapshots > 0 {
        m.insert(
            h.snapshots_offset,
            img.snapshot_table_len,
            overlap::SNAPSHOT_TABLE,
        );
    }
    for s in &img.snapshots {
        m.insert(
            s.l1_table_offset,
            u64::from(s.l1_size) * 8,
            overlap::INACTIVE_L1,
        );
    }
    if let Some(b) = h.bitmaps {
        m.insert(
            b.directory_offset,
            b.directory_size,
            overlap::BITMAP_DIRECTORY,
        );
    }
    if let Some(c) = h.crypto {
        m.insert(c.offset, c.length, overlap::CRYPTO_HEADER);
    }
    // The snapshots' L2 tables, each distinct L1 table read once and only
    // as far as the file holds it.
    let mut seen: alloc::collections::BTreeSet<(u64, u32)> = alloc::collections::BTreeSet::new();
    let mut budget = MAX_INACTIVE_L1_ENTRIES;
    let tables: Vec<(u64, u32)> = img
        .snapshots
        .iter()
        .map(|s| (s.l1_table_offset, s.l1_size))
        .collect();
    let mut raw = alloc::vec![0u8; 64 << 10];
    for (off, size) in tables {
        if !seen.insert((off, size)) || off % cs != 0 {
            continue;
        }
        let bytes = (u64::from(size) * 8).min(img.file_len.saturating_sub(off));
        let mut done = 0u64;
        while done < bytes && budget > 0 {
            let n = (bytes - done).min(to_u64(raw.len())).min(budget * 8);
            let piece = &mut raw[..to_usize(n).unwrap_or(0)];
            img.io.read_at(off + done, piece).map_err(Error::Io)?;
            for e in piece.chunks_exact(8) {
                let l2 = l2::l1_offset(crate::bytes::be64(e, 0));
                if l2 != 0 && l2.is_multiple_of(cs) {
                    m.insert(l2, cs, overlap::INACTIVE_L2);
                }
            }
            done += n;
            budget = budget.saturating_sub(n / 8);
        }
    }
    Ok(m)
}

impl<R: BlockWrite> Deref for WritableImage<R> {
    type Target = Image<R>;
    fn deref(&self) -> &Image<R> {
        &self.img
    }
}

impl<R: BlockWrite> DerefMut for WritableImage<R> {
    fn deref_mut(&mut self) -> &mut Image<R> {
        &mut self.img
    }
}

impl<R: BlockWrite> WritableImage<R> {
    /// Opens a standalone image for reading and writing.
    pub fn open(io: R, opts: &OpenOptions) -> Res<Self, R> {
        Self::new(Image::open(io, opts)?)
    }

    /// Opens an image for reading and writing, with backing files and an
    /// external data file opened through `opener` (the data file must be
    /// opened writable by it).
    pub fn open_with(
        io: R,
        name: &str,
        identity: &str,
        opener: &mut dyn Opener<R>,
        opts: &OpenOptions,
    ) -> Res<Self, R> {
        Self::new(Image::open_with(io, name, identity, opener, opts)?)
    }

    /// Prepares an opened image for writing, as QEMU does on a read-write
    /// open: refuses corrupt images, rebuilds refcounts of dirty (lazy
    /// refcount) images, and clears autoclear bits this implementation does
    /// not maintain (unknown ones). Enabled persistent bitmaps are kept up to
    /// date as QEMU keeps them: flagged in use before guest data changes,
    /// their bits set for every change, stored (and the flag cleared) at
    /// each [`WritableImage::flush`].
    pub fn new(img: Image<R>) -> Res<Self, R> {
        match &img.crypt {
            crate::image::Crypt::None => {}
            crate::image::Crypt::Locked(method) => return Err(Error::Encrypted { method }),
            crate::image::Crypt::Open {
                host_sectors: false,
                ..
            } => {
                return Err(Error::Unsupported(
                    "writing images encrypted with the legacy AES method (convert them to LUKS)",
                ))
            }
            crate::image::Crypt::Open { .. } => {}
        }
        if img.header.corrupt() {
            return Err(Error::ReadOnly(
                "the image is marked corrupt; repair it first",
            ));
        }
        if img.header.has_data_file() && img.data_file.is_none() {
            return Err(Error::MissingDataFile);
        }
        let mut w = Self::assemble(img)?;
        let mut header_changed = w.clear_unknown_autoclear();
        if w.img.header.dirty() {
            w.rebuild_refcounts()?;
            w.img.header.incompatible_features &= !incompat::DIRTY;
            header_changed = true;
        }
        if header_changed {
            w.write_header_fields()?;
        }
        Ok(w)
    }

    /// Opens an image for [`WritableImage::repair`], as `qemu-img check -r`
    /// does: a corrupt or dirty image is accepted (the repair decides what
    /// to do with it), no data file is needed (guest data is not written),
    /// and bitmaps are left as they are (they stay consistent: no guest
    /// write happens).
    pub fn for_repair(img: Image<R>) -> Res<Self, R> {
        let mut w = Self::assemble(img)?;
        if w.clear_unknown_autoclear() {
            w.write_header_fields()?;
        }
        Ok(w)
    }

    /// Clears the autoclear bits this implementation does not maintain
    /// (unknown ones; bitmaps stay); returns whether any was set.
    fn clear_unknown_autoclear(&mut self) -> bool {
        let keep = autoclear::DATA_FILE_RAW | autoclear::BITMAPS;
        let set = self.img.header.autoclear_features & !keep != 0;
        self.img.header.autoclear_features &= keep;
        set
    }

    /// The write state over `img`: whole L2 tables cached, the refcount
    /// table loaded, the metadata map built.
    fn assemble(mut img: Image<R>) -> Res<Self, R> {
        let cs = img.cluster_size();
        if img.l2_slice != cs {
            // Writing works on whole L2 tables: leave frugal slice mode.
            let cap = img.l2_cache.capacity();
            img.l2_slice = cs;
            img.l2_cache = crate::cache::TableCache::new(cap);
        }
        let refcounts = Refcounts::load(&mut img.io, &img.header, img.refcount_cache_blocks)?;
        let metadata = metadata_of(&mut img, &refcounts)?;
        let file_end = img.file_len;
        let w = WritableImage {
            img,
            refcounts,
            free_hint: 0,
            file_end,
            pending_frees: Vec::new(),
            pending_map: MetadataMap::new(),
            compressed_next: None,
            dirty_l1: BTreeSet::new(),
            data_dirty: false,
            metadata,
            bitmaps_marked: false,
            tracked: Vec::new(),
            corrupt: false,
            rebuilding: None,
        };
        Ok(w)
    }

    /// The image, for reading (writes not yet flushed are visible to it).
    pub fn image(&self) -> &Image<R> {
        &self.img
    }

    /// Gives the read-only image back (call [`WritableImage::flush`] first).
    pub fn into_image(self) -> Image<R> {
        self.img
    }

    /// Gives the storage back (call [`WritableImage::flush`] first).
    pub fn into_inner(self) -> R {
        self.img.into_inner()
    }

    /// The refcount of host cluster `cluster`, including changes not yet
    /// flushed (0 when no refcount block covers it).
    pub fn refcount(&mut self, cluster: u64) -> Res<u64, R> {
        self.refcounts.get(&mut self.img.io, cluster)
    }

    /// Checks the image's metadata as [`Image::check`] does, including the
    /// clusters allocated since it was opened (call
    /// [`WritableImage::flush`] first: the check reads what is on disk).
    pub fn check(&mut self) -> Res<crate::check::CheckReport, R> {
        let end = self.file_end;
        self.img.check_file(end, None, true)
    }

    /// Refuses an image whose metadata has errors (corruptions or check
    /// errors; leaked clusters are harmless) before an operation that
    /// restructures it, which could spread the damage: repair it first.
    pub(crate) fn require_consistent(&mut self) -> Res<(), R> {
        self.flush()?;
        let r = self.check()?;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(Error::Unsupported(
                "the image has errors: repair it first (check -r all)",
            ));
        }
        Ok(())
    }

    /// Number of refcount blocks held by the cache now.
    pub fn refcount_cache_len(&self) -> usize {
        self.refcounts.blocks.len()
    }

    /// Makes `h` the image's header: the header, its extensions and the
    /// backing file name encoded and written in the first cluster with one
    /// write, then flushed (call [`WritableImage::flush`] first for what
    /// the new header relies on).
    pub(crate) fn write_header_cluster(&mut self, mut h: crate::header::Header) -> Res<(), R> {
        let bytes = crate::create::encode_header_cluster(&mut h).map_err(Error::Format)?;
        self.put(0, &bytes, overlap::HEADER)?;
        self.img.io.flush().map_err(Error::Io)?;
        self.img.header = h;
        Ok(())
    }

    /// Rewrites the feature fields of the header (v3 only; v2 has none).
    pub(crate) fn write_header_fields(&mut self) -> Res<(), R> {
        if let Some((at, bytes)) = self.img.header.encode_feature_fields() {
            self.put(at, &bytes, overlap::HEADER)?;
            self.img.io.flush().map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Refuses every write once an overlap was refused (the image is then
    /// marked corrupt).
    pub(crate) fn require_intact(&self) -> Res<(), R> {
        if self.corrupt {
            Err(Error::ReadOnly(
                "the image is marked corrupt; repair it first",
            ))
        } else {
            Ok(())
        }
    }

    /// Whether a write was refused because it would have overwritten
    /// metadata (the image is then marked corrupt and refuses all writes).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// Refuses a write of `len` bytes at host `offset` of the image file
    /// that would land on metadata other than `allowed` kinds: marks the
    /// image corrupt (as QEMU does) and returns the overlap.
    pub(crate) fn guard(&mut self, offset: u64, len: u64, allowed: u16) -> Res<(), R> {
        self.require_intact()?;
        let hit = self.metadata.kinds(offset, len) & !allowed;
        if hit == 0 {
            return Ok(());
        }
        Err(self.overlap_error(hit, offset, len))
    }

    /// Marks the image corrupt and returns the error of a write refused
    /// because `[offset, offset + len)` holds metadata of `kinds`.
    pub(crate) fn overlap_error(&mut self, kinds: u16, offset: u64, len: u64) -> Error<R::Error> {
        self.mark_corrupt();
        Error::MetadataOverlap {
            structure: overlap::name(kinds),
            offset,
            len,
        }
    }

    /// Writes `bytes` at host `offset` of the image file after checking
    /// that only metadata of the `allowed` kinds is there.
    pub(crate) fn put(&mut self, offset: u64, bytes: &[u8], allowed: u16) -> Res<(), R> {
        self.guard(offset, to_u64(bytes.len()), allowed)?;
        self.img.io.write_at(offset, bytes).map_err(Error::Io)
    }

    /// Reserves the space of a metadata structure of `allowed` kind placed
    /// at host `offset` (written only at the next flush), so that a full
    /// disk fails the allocation, not the flush that makes completed
    /// writes durable.
    pub(crate) fn reserve(&mut self, offset: u64, len: u64, allowed: u16) -> Res<(), R> {
        self.guard(offset, len, allowed)?;
        self.img.io.preallocate(offset, len).map_err(Error::Io)
    }

    /// Sets the corrupt bit (version 3; version 2 images have no feature
    /// bits, so they are only refused for the rest of this session) and
    /// refuses every further write.
    fn mark_corrupt(&mut self) {
        self.corrupt = true;
        self.img.header.incompatible_features |= incompat::CORRUPT;
        if let Some((at, bytes)) = self.img.header.encode_feature_fields() {
            // Best effort: the overlap is reported either way.
            let _ = self.img.io.write_at(at, &bytes);
            let _ = self.img.io.flush();
        }
    }

    /// Sets every refcount to the number of references found by walking the
    /// metadata (repair of a dirty image), then makes it durable.
    fn rebuild_refcounts(&mut self) -> Res<(), R> {
        let refs = self.img.count_references(self.file_end)?;
        let cb = self.img.header.cluster_bits;
        let cs = 1u64 << cb;
        let end = refs.clusters().max(self.img.file_len.div_ceil(cs));
        // While the refcounts on disk are wrong, referenced clusters are not
        // free: new refcount blocks must not land on them.
        self.rebuilding = Some(refs);
        // Raising first, then lowering, keeps every intermediate state safe.
        let mut result = Ok(());
        for pass in 0..2 {
            for c in 0..end {
                let counted = self.rebuilding.as_ref().map_or(0, |r| r.get(c));
                // Refcount blocks (and tables) created by this rebuild were
                // not there when counting: they hold one reference.
                let own = self.metadata.kinds(c * cs, cs)
                    & (overlap::REFCOUNT_BLOCK | overlap::REFCOUNT_TABLE)
                    != 0;
                let want = if own { counted.max(1) } else { counted };
                let have = match self.refcount(c) {
                    Ok(h) => h,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                let delta = i64::try_from(want).unwrap_or(i64::MAX)
                    - i64::try_from(have).unwrap_or(i64::MAX);
                if (pass == 0 && delta > 0) || (pass == 1 && delta < 0) {
                    if let Err(e) = self.change_refcount(c, delta) {
                        result = Err(e);
                        break;
                    }
                }
            }
            result = result.and_then(|()| self.write_refcounts());
            if result.is_err() {
                break;
            }
        }
        self.rebuilding = None;
        result
    }

    /// Flushes early when dirty tables keep a cache above its budget.
    pub(crate) fn flush_if_over_budget(&mut self) -> Res<(), R> {
        if self.img.l2_cache.over_capacity() || self.refcounts.blocks.over_capacity() {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes everything written so far durable, in crash-safe order.
    pub fn flush(&mut self) -> Res<(), R> {
        self.require_intact()?;
        if let Some(df) = self.img.data_file.as_mut() {
            if self.data_dirty {
                df.flush().map_err(Error::Io)?;
            }
        }
        // 1-2: data and refcount increments, then table entries.
        self.write_refcounts()?;
        // 3: L2 tables.
        let dirty_l2 = self.img.l2_cache.dirty_offsets();
        if !dirty_l2.is_empty() {
            self.img.io.flush().map_err(Error::Io)?;
            for off in dirty_l2 {
                if let Some(t) = self.img.l2_cache.peek(off) {
                    let t = t.to_vec();
                    self.put(off, &t, overlap::ACTIVE_L2)?;
                }
                self.img.l2_cache.mark_clean(off);
            }
        }
        // 4: L1 entries (after the tables they point at are durable).
        if !self.dirty_l1.is_empty() {
            self.img.io.flush().map_err(Error::Io)?;
            let dirty: Vec<usize> = core::mem::take(&mut self.dirty_l1).into_iter().collect();
            let base = self.img.header.l1_table_offset;
            for i in dirty {
                let e = self.img.l1.get(i).copied().unwrap_or(0);
                self.put(base + to_u64(i) * 8, &e.to_be_bytes(), overlap::ACTIVE_L1)?;
            }
        }
        self.img.io.flush().map_err(Error::Io)?;
        self.data_dirty = false;
        // 5: frees, now that nothing durable refers to those clusters.
        self.apply_pending_frees()?;
        // 6: the bitmaps' bits, then their in-use flags cleared.
        self.store_bitmaps()
    }
}
