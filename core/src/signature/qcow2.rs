//! A qcow2 image inside the disk (its header's magic, version and size).
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::sub;

use super::{be32, be64, pow2, Content, Kind};

/// A nested qcow2 image: magic `QFI\xfb`, version 2 or 3.
pub(super) fn qcow2(s: &[u8]) -> Option<Content> {
    if sub(s, 0, 4) != b"QFI\xfb" {
        return None;
    }
    let version = be32(s, 4);
    let cluster_bits = be32(s, 20);
    if !matches!(version, 2 | 3) || !(9..=21).contains(&cluster_bits) {
        return None;
    }
    let mut c = Content::new(Kind::Qcow2);
    c.version = Some(version);
    c.block_size = pow2(cluster_bits);
    c.size = Some(be64(s, 24));
    Some(c)
}
