//! ext2/3/4: the superblock at 1024, and the feature flags that tell the
//! three apart.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use core::fmt;

use crate::partition::{bytes, le16, le32, sub, ReadAt, Uuid};

use super::{label_utf8, Content, Kind, VolumeId, Window};

/// The feature flags of an ext2/3/4 superblock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtFeatures {
    /// `s_feature_compat`.
    pub compat: u32,
    /// `s_feature_incompat`.
    pub incompat: u32,
    /// `s_feature_ro_compat`.
    pub ro_compat: u32,
}

/// One ext feature flag: which word and which bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtFeature {
    /// 0: compatible, 1: incompatible, 2: read-only compatible.
    pub set: u8,
    /// The bit (0-31).
    pub bit: u8,
}

const EXT_COMPAT: &[(u8, &str)] = &[
    (0, "dir_prealloc"),
    (1, "imagic_inodes"),
    (2, "has_journal"),
    (3, "ext_attr"),
    (4, "resize_inode"),
    (5, "dir_index"),
    (6, "lazy_bg"),
    (8, "snapshot_bitmap"),
    (9, "sparse_super2"),
    (10, "fast_commit"),
    (11, "stable_inodes"),
    (12, "orphan_file"),
];
const EXT_INCOMPAT: &[(u8, &str)] = &[
    (0, "compression"),
    (1, "filetype"),
    (2, "needs_recovery"),
    (3, "journal_dev"),
    (4, "meta_bg"),
    (6, "extent"),
    (7, "64bit"),
    (8, "mmp"),
    (9, "flex_bg"),
    (10, "ea_inode"),
    (12, "dirdata"),
    (13, "metadata_csum_seed"),
    (14, "large_dir"),
    (15, "inline_data"),
    (16, "encrypt"),
    (17, "casefold"),
];
const EXT_RO_COMPAT: &[(u8, &str)] = &[
    (0, "sparse_super"),
    (1, "large_file"),
    (3, "huge_file"),
    (4, "uninit_bg"),
    (5, "dir_nlink"),
    (6, "extra_isize"),
    (7, "snapshot"),
    (8, "quota"),
    (9, "bigalloc"),
    (10, "metadata_csum"),
    (11, "replica"),
    (12, "read-only"),
    (13, "project"),
    (14, "shared_blocks"),
    (15, "verity"),
    (16, "orphan_present"),
];

impl ExtFeature {
    /// e2fsprogs' name of the feature (`"has_journal"`, `"extent"`,
    /// `"metadata_csum"`, ...), `None` for a bit it does not name.
    pub fn name(&self) -> Option<&'static str> {
        let table = match self.set {
            0 => EXT_COMPAT,
            1 => EXT_INCOMPAT,
            _ => EXT_RO_COMPAT,
        };
        table.iter().find(|t| t.0 == self.bit).map(|t| t.1)
    }
}

impl fmt::Display for ExtFeature {
    /// The name, or e2fsprogs' `FEATURE_C12` / `FEATURE_I20` / `FEATURE_R30`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => {
                let c = match self.set {
                    0 => 'C',
                    1 => 'I',
                    _ => 'R',
                };
                write!(f, "FEATURE_{c}{}", self.bit)
            }
        }
    }
}

impl ExtFeatures {
    /// The features set, in dumpe2fs's order (compatible, incompatible,
    /// read-only compatible; each by bit).
    pub fn iter(&self) -> impl Iterator<Item = ExtFeature> + '_ {
        let words = [self.compat, self.incompat, self.ro_compat];
        (0u8..3).flat_map(move |set| {
            let w = words.get(usize::from(set)).copied().unwrap_or(0);
            (0u8..32)
                .filter(move |b| w & (1u32 << b) != 0)
                .map(move |bit| ExtFeature { set, bit })
        })
    }
}

/// ext2/3/4: superblock at 1024, magic 0xef53; which of the three from the
/// feature flags, as blkid decides.
pub(super) fn ext<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
    let mut s = [0u8; 512];
    if !w.read(1024, &mut s)? || le16(&s, 0x38) != 0xef53 {
        return Ok(None);
    }
    let log = le32(&s, 0x18);
    if log > 6 {
        return Ok(None);
    }
    let f = if le32(&s, 0x4c) >= 1 {
        ExtFeatures {
            compat: le32(&s, 0x5c),
            incompat: le32(&s, 0x60),
            ro_compat: le32(&s, 0x64),
        }
    } else {
        ExtFeatures::default()
    };
    const HAS_JOURNAL: u32 = 0x4;
    const JOURNAL_DEV: u32 = 0x8;
    const EXT23_RO: u32 = 0x7; // sparse_super, large_file, btree_dir
    const EXT2_INCOMPAT: u32 = 0x12; // filetype, meta_bg
    const EXT3_INCOMPAT: u32 = 0x16; // filetype, needs_recovery, meta_bg
    let ext23 = f.ro_compat & !EXT23_RO == 0;
    let kind = if f.incompat & JOURNAL_DEV != 0 {
        Kind::ExtJournal
    } else if f.compat & HAS_JOURNAL == 0 && ext23 && f.incompat & !EXT2_INCOMPAT == 0 {
        Kind::Ext2
    } else if f.compat & HAS_JOURNAL != 0 && ext23 && f.incompat & !EXT3_INCOMPAT == 0 {
        Kind::Ext3
    } else {
        Kind::Ext4
    };
    let block = 1024u32.checked_shl(log);
    let mut blocks = u64::from(le32(&s, 4));
    if f.incompat & 0x80 != 0 {
        blocks |= u64::from(le32(&s, 0x150)) << 32;
    }
    let mut c = Content::new(kind);
    c.block_size = block;
    c.size = block.and_then(|b| blocks.checked_mul(u64::from(b)));
    c.id = Some(VolumeId::Uuid(Uuid(bytes(&s, 0x68))));
    c.label = label_utf8(sub(&s, 0x78, 16));
    c.ext_features = Some(f);
    Ok(Some(c))
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
pub(super) mod tests {
    use super::super::tests::{at, probe_all, U};
    use super::*;
    use alloc::string::{String, ToString};
    use alloc::vec;
    use alloc::vec::Vec;

    pub(in crate::signature) fn ext_sb(compat: u32, incompat: u32, ro: u32) -> Vec<u8> {
        let mut d = vec![0u8; 8192];
        let s = 1024;
        at(&mut d, s + 4, &1000u32.to_le_bytes());
        at(&mut d, s + 0x18, &2u32.to_le_bytes());
        at(&mut d, s + 0x38, &0xef53u16.to_le_bytes());
        at(&mut d, s + 0x4c, &1u32.to_le_bytes());
        at(&mut d, s + 0x5c, &compat.to_le_bytes());
        at(&mut d, s + 0x60, &incompat.to_le_bytes());
        at(&mut d, s + 0x64, &ro.to_le_bytes());
        at(&mut d, s + 0x68, &U);
        at(&mut d, s + 0x78, b"rootfs\0\0garbage!");
        at(&mut d, s + 0x150, &1u32.to_le_bytes());
        d
    }

    #[test]
    fn ext_versions_and_features() {
        let c = probe_all(&ext_sb(0x38, 0x2, 0x3)).unwrap();
        assert_eq!(c.kind, Kind::Ext2);
        assert_eq!(c.label.as_str(), "rootfs");
        assert_eq!(
            c.id.unwrap().to_string(),
            "01234567-89ab-cdef-1032-547698badcfe"
        );
        assert_eq!((c.block_size, c.size), (Some(4096), Some(4096 * 1000)));
        let c = probe_all(&ext_sb(0x3c, 0x6, 0x3)).unwrap();
        assert_eq!(c.kind, Kind::Ext3);
        // extent + 64bit: ext4, and the high half of the block count counts.
        let c = probe_all(&ext_sb(0x3c, 0x2c2, 0x46b)).unwrap();
        assert_eq!(c.kind, Kind::Ext4);
        assert_eq!(c.size, Some(4096 * ((1u64 << 32) + 1000)));
        let names: Vec<String> = c
            .ext_features
            .unwrap()
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(
            names.join(" "),
            "has_journal ext_attr resize_inode dir_index filetype extent 64bit flex_bg \
             sparse_super large_file huge_file dir_nlink extra_isize metadata_csum"
        );
        // Unknown bits in e2fsprogs' form.
        let f = ExtFeatures {
            compat: 1 << 30,
            incompat: 1 << 20,
            ro_compat: 1 << 31,
        };
        let names: Vec<String> = f.iter().map(|f| f.to_string()).collect();
        assert_eq!(names, ["FEATURE_C30", "FEATURE_I20", "FEATURE_R31"]);
        // No journal but ext4 features: ext4; a journal device.
        assert_eq!(probe_all(&ext_sb(0, 0x40, 0)).unwrap().kind, Kind::Ext4);
        assert_eq!(
            probe_all(&ext_sb(0, 0x8, 0)).unwrap().kind,
            Kind::ExtJournal
        );
        // An absurd block size is not ext.
        let mut d = ext_sb(0, 0, 0);
        d[1024 + 0x18] = 40;
        assert_eq!(probe_all(&d), None);
    }
}
