//! Preallocation of a whole disk (`preallocation=metadata|falloc|full`).

use crate::bytes::to_usize;
use crate::error::Error;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2::{self, COPIED};
use crate::writable::WritableImage;

impl<R: BlockWrite> WritableImage<R> {
    /// Preallocates the whole disk (for `preallocation=metadata|falloc|full`):
    /// every guest cluster gets an L2 entry and a host cluster (contiguous
    /// runs, one L2 table at a time). With a backing file and extended L2,
    /// the subclusters stay unallocated so the backing file still shows
    /// through. `Full` writes zeros into the data clusters; `Falloc`
    /// reserves them with [`BlockWrite::preallocate`].
    pub fn preallocate(&mut self, mode: crate::create::Preallocation) -> Res<(), R> {
        let size = self.img.header.size;
        self.preallocate_range(mode, 0, size)
    }

    /// [`WritableImage::preallocate`] of the clusters of guest
    /// `[start, end)` only (a grown range).
    pub(crate) fn preallocate_range(
        &mut self,
        mode: crate::create::Preallocation,
        start: u64,
        end: u64,
    ) -> Res<(), R> {
        self.require_intact()?;
        use crate::create::Preallocation;
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cs = self.cluster_size();
        let size = end.min(self.img.header.size);
        let per_table = self.img.header.l2_coverage();
        let mut pos = start - start % cs;
        while pos < size {
            let table_end = (pos - pos % per_table + per_table).min(size);
            let l2_off = self.writable_l2(pos)?;
            // Clusters of this table that are still unallocated.
            let mut c = pos;
            while c < table_end {
                let (entry, bitmap) = self.l2_entry(l2_off, c)?;
                let unallocated = entry & l2::OFFSET_MASK == 0
                    && entry & l2::COMPRESSED == 0
                    && !(self.img.fmt.data_file && entry & COPIED != 0);
                if !unallocated {
                    c += cs;
                    continue;
                }
                // A run of unallocated clusters gets one contiguous allocation.
                let mut n = 1u64;
                while c + n * cs < table_end {
                    let (e, _) = self.l2_entry(l2_off, c + n * cs)?;
                    if e != 0 {
                        break;
                    }
                    n += 1;
                }
                let host = if self.img.fmt.data_file {
                    c
                } else {
                    self.alloc_clusters(n)?
                };
                let bytes = n * cs;
                let data_len = bytes.min(size - c);
                match mode {
                    Preallocation::Full => {
                        let zeros = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
                        for i in 0..n {
                            let len = cs.min(size - (c + i * cs));
                            self.write_data(host + i * cs, &zeros[..to_usize(len).unwrap_or(0)])?;
                        }
                    }
                    Preallocation::Falloc => {
                        if !self.img.fmt.data_file {
                            self.guard(host, data_len, 0)?;
                        }
                        let io = if self.img.fmt.data_file {
                            self.img.data_file.as_mut().ok_or(Error::MissingDataFile)?
                        } else {
                            &mut self.img.io
                        };
                        io.preallocate(host, data_len).map_err(Error::Io)?;
                    }
                    _ => {}
                }
                for i in 0..n {
                    // Like QEMU, subclusters stay unallocated (they read as
                    // zeros, or from the backing file).
                    let bm = if self.img.fmt.extended {
                        bitmap & (0xffff_ffff << 32)
                    } else {
                        0
                    };
                    self.set_l2_entry(l2_off, c + i * cs, (host + i * cs) | COPIED, bm)?;
                }
                c += bytes;
            }
            pos = table_end;
            self.flush_if_over_budget()?;
        }
        if self.img.fmt.data_file {
            // The data file covers the whole disk.
            if let Some(df) = self.img.data_file.as_mut() {
                if df.len().map_err(Error::Io)? < size {
                    df.set_len(size).map_err(Error::Io)?;
                }
            }
        } else if mode == Preallocation::Metadata || mode == Preallocation::Off {
            // The file must reach the end of the last data cluster.
            let end = self.file_end;
            if self.img.io.len().map_err(Error::Io)? < end {
                self.img.io.set_len(end).map_err(Error::Io)?;
            }
        }
        self.flush()
    }
}
