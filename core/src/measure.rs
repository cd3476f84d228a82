//! `qemu-img measure`: the file size a new qcow2 image needs, computed as
//! QEMU computes it (pure arithmetic, no I/O): the fully allocated size of
//! a disk (header, L1 and L2 tables, refcount structure, every cluster),
//! and the required size (the same metadata plus only the clusters that
//! hold data), with the space persistent bitmaps would take.

use crate::bitmap::Bitmap;

/// What a new image would need, in bytes (`qemu-img measure`'s keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct Measure {
    /// Bitmaps' clusters, tables and directory (only when both images can
    /// hold bitmaps); first, as qemu-img prints its JSON.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub bitmaps: Option<u64>,
    /// The file size the image's data needs (metadata counted as for a
    /// fully allocated image).
    pub required: u64,
    /// The file size with every cluster allocated.
    pub fully_allocated: u64,
}

/// Refcount table and blocks, in bytes, that count `clusters` clusters and
/// themselves (the fixed point QEMU computes).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters
            .saturating_add(table)
            .saturating_add(blocks)
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters.saturating_add(blocks).saturating_add(table);
        if n == last {
            break;
        }
    }
    (blocks + table).saturating_mul(cluster_size)
}

/// The file size of a fully allocated image of `size` guest bytes: header,
/// L2 and L1 tables, refcount structure and every data cluster.
pub fn fully_allocated_size(
    size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let entry = if extended_l2 { 16 } else { 8 };
    let total = size.div_ceil(cluster_size).saturating_mul(cluster_size);
    let mut meta = cluster_size;
    let l2_entries = (total / cluster_size).div_ceil(cluster_size / entry) * (cluster_size / entry);
    meta = meta.saturating_add(l2_entries.saturating_mul(entry));
    let l1_entries =
        (l2_entries * entry / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta = meta.saturating_add(l1_entries.saturating_mul(8));
    meta = meta.saturating_add(refcount_metadata_size(
        meta.saturating_add(total) / cluster_size,
        cluster_size,
        refcount_order,
    ));
    meta.saturating_add(total)
}

/// Bytes the persistent `bitmaps` of a disk of `size` bytes take in an
/// image with `cluster_size` clusters (whole bitmaps, their tables, and
/// the directory), as QEMU estimates them.
pub fn bitmaps_size(bitmaps: &[Bitmap], size: u64, cluster_size: u64) -> u64 {
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in bitmaps {
        let bits = size.div_ceil(b.granularity().max(1));
        let clusters = bits.div_ceil(8).div_ceil(cluster_size);
        total = total
            .saturating_add(clusters.saturating_mul(cluster_size))
            .saturating_add((clusters * 8).div_ceil(cluster_size) * cluster_size);
        dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    total.saturating_add(dir.div_ceil(cluster_size) * cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_qemu_img_measure() {
        // `qemu-img measure -O qcow2 --size 1G`: 1074135040 fully allocated.
        assert_eq!(
            fully_allocated_size(1 << 30, 65536, 4, false),
            1_074_135_040
        );
        // A 1 MiB image: 1376256.
        assert_eq!(fully_allocated_size(1 << 20, 65536, 4, false), 1_376_256);
        // --size 1P: 1126071731945472.
        assert_eq!(
            fully_allocated_size(1 << 50, 65536, 4, false),
            1_126_071_731_945_472
        );
        // One bitmap "bm0" of a 1 MiB disk, 64 KiB granularity: 196608.
        let b = Bitmap {
            table_offset: 0,
            table_size: 1,
            flags: 0,
            kind: 1,
            granularity_bits: 16,
            name: "bm0".into(),
        };
        assert_eq!(bitmaps_size(&[b], 1 << 20, 65536), 196_608);
    }
}
