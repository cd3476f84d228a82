//! Changing an image's options in place (`qemu-img amend`): the refcount
//! width (the refcount structure rewritten beside the old one and switched
//! to with one header write) and lazy refcounts.

use crate::check::{CheckReport, Findings};
use crate::error::Error;
use crate::header::compat;
use crate::image::Res;
use crate::io::BlockWrite;
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
        self.flush()?;
        let mut quiet = |_: &str| {};
        let mut found = Findings::new(CheckReport::default(), Some(&mut quiet));
        let end = self.file_end;
        let (refs, blocks) = self.img.walk_references(&mut found, end)?;
        if found.corruptions > 0 || found.check_errors > 0 {
            return Err(Error::Unsupported(
                "the image has errors: repair it first (check -r all)",
            ));
        }
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
