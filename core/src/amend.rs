//! Changing an image's options in place (`qemu-img amend`): the refcount
//! width (the refcount structure rewritten beside the old one and switched
//! to with one header write) and lazy refcounts.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::bytes::be64;
use crate::check::{CheckReport, Findings};
use crate::error::Error;
use crate::header::{compat, incompat, CompressionType};
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2;
use crate::overlap;
use crate::refcount;
use crate::writable::WritableImage;

impl<R: BlockWrite> WritableImage<R> {
    /// Rewrites the refcount structure with `bits`-bit refcounts (a power
    /// of two from 1 to 64; other than 16 only for version 3 images), as
    /// `qemu-img amend -o refcount_bits=N`. The new table and blocks are
    /// written past the end of the file and the header switches to them
    /// (offset, size and width) with one write; the old ones are then free.
    /// Refused when a cluster has more references than the new width holds
    /// or the image has errors to repair first.
    pub fn set_refcount_bits(&mut self, bits: u32) -> Res<(), R> {
        self.require_intact()?;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::Unsupported(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.img.header.version < 3 && bits != 16 {
            return Err(Error::Unsupported(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        let order = bits.trailing_zeros();
        if order == self.img.header.refcount_order {
            return Ok(());
        }
        self.require_consistent()?;
        let mut quiet = |_: &str| {};
        let mut found = Findings::new(CheckReport::default(), Some(&mut quiet));
        let end = self.file_end;
        let (refs, blocks) = self.img.walk_references(&mut found, end)?;
        drop(found);
        let max = refcount::max_refcount(order);
        if (0..refs.clusters()).any(|c| refs.get(c) > max) {
            return Err(Error::Unsupported(
                "a cluster has more references than the new refcount width holds",
            ));
        }
        self.rebuild_structure_with(&refs, &blocks, order)
    }

    /// Turns lazy refcounts on or off (version 3 images; the compatible
    /// feature bit). This implementation keeps refcounts exact either way.
    pub fn set_lazy_refcounts(&mut self, on: bool) -> Res<(), R> {
        self.require_intact()?;
        if self.img.header.version < 3 {
            if on {
                return Err(Error::Unsupported(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            return Ok(());
        }
        let was = self.img.header.compatible_features;
        if on {
            self.img.header.compatible_features |= compat::LAZY_REFCOUNTS;
        } else {
            self.img.header.compatible_features &= !compat::LAZY_REFCOUNTS;
        }
        if self.img.header.compatible_features != was {
            self.flush()?;
            self.write_header_fields()?;
        }
        Ok(())
    }
}

/// Length of the version 3 header QEMU writes (with the compression type).
const V3_HEADER_LEN: u32 = 112;

impl<R: BlockWrite> WritableImage<R> {
    /// Changes the image's version (`qemu-img amend -o compat=0.10|1.1`):
    /// 3 upgrades a version 2 image (snapshot entries given the extra data
    /// version 3 requires, then the header), 2 downgrades, as QEMU does:
    /// refused for refcount widths other than 16, external data files,
    /// extended L2 entries, snapshots of another disk size, zstd-compressed
    /// clusters and (here) persistent bitmaps, which version 2 cannot hold;
    /// otherwise zero clusters become unallocated (no backing file) or
    /// clusters of zeros, then the header is rewritten. The header switches
    /// with one write; a crash before it leaves the old version, reading
    /// the same.
    pub fn set_version(&mut self, version: u32) -> Res<(), R> {
        self.require_intact()?;
        match (self.img.header.version, version) {
            (a, b) if a == b => Ok(()),
            (2, 3) => self.upgrade(),
            (3, 2) => self.downgrade(),
            _ => Err(Error::Unsupported("Unknown compatibility level")),
        }
    }

    fn upgrade(&mut self) -> Res<(), R> {
        self.require_consistent()?;
        let size = self.img.header.size;
        if self.img.snapshots.iter().any(|s| s.disk_size.is_none()) {
            let mut snapshots = self.img.snapshots.clone();
            for s in &mut snapshots {
                s.disk_size.get_or_insert(size);
            }
            self.write_snapshot_table(snapshots)?;
        }
        let mut h = self.img.header.clone();
        h.version = 3;
        h.header_length = V3_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.refcount_order = 4;
        h.compression_type = CompressionType::Zlib;
        if h.cluster_size() > 4096 {
            h.feature_names = crate::header::default_feature_names();
        }
        self.write_header_cluster(h)
    }

    fn downgrade(&mut self) -> Res<(), R> {
        let h = &self.img.header;
        let size = h.size;
        if h.refcount_order != 4 {
            return Err(Error::Unsupported("compat=0.10 requires refcount_bits=16"));
        }
        if h.has_data_file() {
            return Err(Error::Unsupported(
                "Cannot downgrade an image with a data file",
            ));
        }
        if self
            .img
            .snapshots
            .iter()
            .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size.unwrap_or(size) != size)
        {
            return Err(Error::Unsupported(
                "Internal snapshots prevent downgrade of image",
            ));
        }
        let other = h.incompatible_features & !(incompat::COMPRESSION | incompat::DIRTY);
        if other == incompat::EXTL2 {
            return Err(Error::Unsupported(
                "Cannot downgrade an image with incompatible features 0x10 set",
            ));
        } else if other != 0 {
            return Err(Error::Unsupported(
                "Cannot downgrade an image with incompatible features set",
            ));
        }
        if h.bitmaps.is_some() {
            return Err(Error::Unsupported(
                "Cannot downgrade an image with persistent bitmaps: version 2 cannot hold them (remove them first)",
            ));
        }
        let zstd = h.compression_type == CompressionType::Zstd;
        self.require_consistent()?;
        let tables = self.every_l2_table()?;
        if zstd && self.any_compressed(&tables)? {
            return Err(Error::Unsupported(
                "Cannot downgrade an image with zstd compression type and existing compressed clusters",
            ));
        }
        self.flush()?;
        self.expand_zero_clusters(&tables)?;
        let mut h = self.img.header.clone();
        h.version = 2;
        h.header_length = 72;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = CompressionType::Zlib;
        h.feature_names.clear();
        self.write_header_cluster(h)
    }

    /// The L2 tables of the active L1 table and of every snapshot's, each
    /// once, in file order.
    fn every_l2_table(&mut self) -> Res<BTreeSet<u64>, R> {
        let cs = self.cluster_size();
        let end = self.file_end;
        let mut l1: Vec<u64> = self.img.l1.clone();
        for i in 0..self.img.snapshots.len() {
            l1.extend(self.img.snapshot_l1(i, end)?);
        }
        let mut tables = BTreeSet::new();
        for e in l1 {
            let t = l2::l1_offset(e);
            if t == 0 {
                continue;
            }
            if !t.is_multiple_of(cs) || t.saturating_add(cs) > end {
                return Err(Error::corrupt("L1 entry points outside the image", t, e));
            }
            tables.insert(t);
        }
        Ok(tables)
    }

    /// Whether an entry of `tables` is a compressed cluster.
    fn any_compressed(&mut self, tables: &BTreeSet<u64>) -> Res<bool, R> {
        let cs = self.cluster_size();
        for &t in tables {
            let table = self.img.l2_cache.get(&mut self.img.io, t, cs)?;
            if table
                .chunks_exact(8)
                .any(|e| be64(e, 0) & l2::COMPRESSED != 0)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Rewrites the zero clusters of `tables` (standard L2 entries) the way
    /// version 2 can hold them: unallocated where nothing shows through
    /// (no backing file, no host cluster of its own), otherwise a host
    /// cluster of zeros (a new one, with the table's refcount, where the
    /// entry had none). A preallocated zero cluster that other tables also
    /// reference (e.g. as a snapshot's data) is never written: the entry
    /// lets go of it and is rewritten as one without a host cluster (QEMU 10
    /// writes the zeros into it, changing the snapshot). New clusters are
    /// zeroed and durable before any table changes; each table is then
    /// rewritten in place; the references let go of drop last.
    fn expand_zero_clusters(&mut self, tables: &BTreeSet<u64>) -> Res<(), R> {
        let cs = self.cluster_size();
        let cb = self.img.header.cluster_bits;
        let backing = self.img.header.backing_file.is_some();
        let zeros = alloc::vec![0u8; crate::bytes::to_usize(cs).unwrap_or(0)];
        let mut changes: Vec<(u64, usize, u64)> = Vec::new();
        let mut drops: Vec<(u64, u64)> = Vec::new();
        for &t in tables {
            let table = self.img.l2_cache.get(&mut self.img.io, t, cs)?.to_vec();
            let table_refs = self.refcount(t >> cb)?.max(1);
            let more = i64::try_from(table_refs - 1)
                .map_err(|_| Error::Internal("refcount beyond i64"))?;
            for (j, e) in table.chunks_exact(8).enumerate() {
                let entry = be64(e, 0);
                if entry & l2::COMPRESSED != 0 || entry & l2::ZERO == 0 {
                    continue;
                }
                let mut host = entry & l2::OFFSET_MASK;
                if !host.is_multiple_of(cs) {
                    return Err(Error::corrupt(
                        "zero cluster with an unaligned host offset",
                        t,
                        entry,
                    ));
                }
                if host != 0 && self.refcount(host >> cb)? > table_refs {
                    drops.push((host, table_refs));
                    host = 0;
                }
                if host == 0 && !backing {
                    changes.push((t, j, 0));
                    continue;
                }
                if host == 0 {
                    host = self.alloc_clusters(1)?;
                    if more > 0 {
                        self.change_refcount(host >> cb, more)?;
                    }
                }
                self.write_data(host, &zeros)?;
                let copied = if self.refcount(host >> cb)? == 1 {
                    l2::COPIED
                } else {
                    0
                };
                changes.push((t, j, host | copied));
                self.flush_if_over_budget()?;
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        // The zeroed clusters and their refcounts first.
        self.flush()?;
        let mut i = 0;
        while i < changes.len() {
            let t = changes[i].0;
            let mut table = self.img.l2_cache.get(&mut self.img.io, t, cs)?.to_vec();
            while i < changes.len() && changes[i].0 == t {
                let (_, j, entry) = changes[i];
                table[j * 8..j * 8 + 8].copy_from_slice(&entry.to_be_bytes());
                i += 1;
            }
            self.put(t, &table, overlap::ACTIVE_L2 | overlap::INACTIVE_L2)?;
            self.img.l2_cache.forget(t);
        }
        self.img.io.flush().map_err(Error::Io)?;
        for (host, n) in drops {
            let n = i64::try_from(n).map_err(|_| Error::Internal("refcount beyond i64"))?;
            self.change_refcount(host >> cb, -n)?;
        }
        self.flush()
    }
}

impl<R: BlockWrite> WritableImage<R> {
    /// Renames the external data file (`qemu-img amend -o data_file=NAME`;
    /// an empty name leaves it unnamed, as QEMU does: it must then be given
    /// when the image is opened). The header is rewritten with one write;
    /// the data file in use stays open.
    pub fn set_data_file_name(&mut self, name: &str) -> Res<(), R> {
        self.require_intact()?;
        if !self.img.header.has_data_file() {
            return Err(Error::Unsupported(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if name.len() > crate::header::MAX_BACKING_NAME as usize {
            return Err(Error::Unsupported("data file name longer than 1023 bytes"));
        }
        self.flush()?;
        let mut h = self.img.header.clone();
        h.data_file = (!name.is_empty()).then(|| alloc::string::String::from(name));
        self.write_header_cluster(h)
    }

    /// Clears the "data file is raw" bit (`amend -o data_file_raw=off`);
    /// setting it on an existing image is refused, as by QEMU.
    pub fn set_data_file_raw(&mut self, raw: bool) -> Res<(), R> {
        self.require_intact()?;
        let now = self.img.header.data_file_raw();
        if raw && !now {
            return Err(Error::Unsupported(
                "data-file-raw cannot be set on existing images",
            ));
        }
        if !raw && now {
            self.flush()?;
            self.img.header.autoclear_features &= !crate::header::autoclear::DATA_FILE_RAW;
            self.write_header_fields()?;
        }
        Ok(())
    }
}
