//! Compressed writes: whole guest clusters compressed with the image's
//! compression type and packed into host clusters as QEMU packs them
//! (`write_compressed`), or compressed by the host's codec and only placed
//! here (`place_compressed`).

use alloc::vec::Vec;

use crate::bytes::{to_u64, to_usize};
use crate::compress::Codec;
use crate::error::Error;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::writable::WritableImage;

impl<R: BlockWrite> WritableImage<R> {
    /// Writes one whole guest cluster compressed with the image's
    /// compression type; keeps it uncompressed when compression does not
    /// make it smaller (like qemu-img). `data` is the cluster's contents
    /// (shorter only for the last cluster of the disk). Returns whether the
    /// cluster was stored compressed.
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Res<bool, R> {
        self.write_compressed_with(&mut crate::compress::Decompressor::default(), offset, data)
    }

    /// [`WritableImage::write_compressed`] with the encoders of `codec`.
    pub fn write_compressed_with(
        &mut self,
        codec: &mut dyn Codec,
        offset: u64,
        data: &[u8],
    ) -> Res<bool, R> {
        self.check_compressed(offset, data.len())?;
        let cs = self.cluster_size();
        let mut full = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
        full[..data.len()].copy_from_slice(data);
        let mut packed = Vec::new();
        if codec.compress(self.img.header.compression_type, &full, &mut packed) {
            self.place_compressed(offset, &packed)?;
            Ok(true)
        } else {
            self.write_at(offset, data)?;
            Ok(false)
        }
    }

    /// Refuses a compressed write that is not one whole cluster (the last
    /// one of the disk may be shorter) of an image that can hold it.
    fn check_compressed(&self, offset: u64, len: usize) -> Res<(), R> {
        self.require_intact()?;
        if self.img.crypt.is_some() {
            return Err(Error::Unsupported(
                "Compression and encryption not supported at the same time",
            ));
        }
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) || to_u64(len) > cs || len == 0 {
            return Err(Error::Unsupported(
                "compressed writes cover exactly one cluster",
            ));
        }
        self.check_range(offset, to_u64(len))?;
        if self.img.fmt.data_file {
            return Err(Error::Unsupported(
                "compressed clusters with an external data file",
            ));
        }
        Ok(())
    }

    /// Places the guest cluster at `offset` compressed: `packed` is the
    /// cluster compressed with the image's compression type (smaller than a
    /// cluster), e.g. by [`Codec::compress_many`] on several threads; the
    /// host packs consecutive compressed clusters like QEMU.
    pub fn place_compressed(&mut self, offset: u64, packed: &[u8]) -> Res<(), R> {
        self.check_compressed(offset, 1)?;
        let cs = self.cluster_size();
        let len = cs.min(self.img.header.size - offset);
        self.begin_guest_change(offset, len)?;
        if packed.is_empty() || to_u64(packed.len()) >= cs {
            return Err(Error::Unsupported(
                "compressed data must be smaller than a cluster",
            ));
        }
        let len = to_u64(packed.len());
        let host = self.alloc_bytes(len)?;
        let desc = self
            .img
            .fmt
            .encode_compressed(host, len)
            .ok_or(Error::corrupt(
                "compressed cluster offset not representable",
                offset,
                host,
            ))?;
        self.write_data(host, packed)?;
        let l2_off = self.writable_l2(offset)?;
        let (entry, bitmap) = self.l2_entry(l2_off, offset)?;
        self.release(entry, bitmap, offset)?;
        self.set_l2_entry(l2_off, offset, desc, 0)?;
        self.flush_if_over_budget()
    }
}
