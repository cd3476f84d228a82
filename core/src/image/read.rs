//! Reading guest data: one layer's mapping of a guest range, then the
//! data from the image, the data file, a compressed cluster or the backing
//! chain.

use alloc::boxed::Box;
use alloc::string::String;

use super::{Backing, Image, Mapping, Res};
use crate::bytes::{to_u64, to_usize};
use crate::error::Error;
use crate::io::BlockRead;

impl<R: BlockRead> Image<R> {
    /// Reads `buf.len()` guest bytes at `offset`, following the backing chain.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Res<(), R> {
        let len = to_u64(buf.len());
        let size = self.header.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + to_u64(done);
            let remaining = to_u64(buf.len() - done);
            let (mapping, run) = self.map_shallow(pos, remaining)?;
            let run_usize = to_usize(run).unwrap_or(0).min(buf.len() - done);
            if run_usize == 0 {
                return Err(Error::Internal("mapping made no progress"));
            }
            let out = &mut buf[done..done + run_usize];
            match mapping {
                Mapping::Data {
                    host_offset,
                    external,
                } => {
                    let io = if external {
                        self.data_file.as_mut().ok_or(Error::MissingDataFile)?
                    } else {
                        &mut self.io
                    };
                    io.read_at(host_offset, out).map_err(Error::Io)?;
                }
                Mapping::Zero { .. } => out.fill(0),
                Mapping::Unallocated { .. } => read_backing(self.backing.as_mut(), pos, out)?,
                Mapping::Compressed {
                    host_offset,
                    size,
                    cluster_start,
                } => {
                    let cluster = self.decompress(host_offset, size)?;
                    let skip = to_usize(pos - cluster_start).unwrap_or(0);
                    let src = cluster.get(skip..skip + out.len()).ok_or(Error::corrupt(
                        "compressed read outside the cluster",
                        pos,
                        host_offset,
                    ))?;
                    out.copy_from_slice(src);
                }
            }
            done += run_usize;
        }
        Ok(())
    }

    /// Forgets the cached decompressed cluster (its host space may be reused).
    pub(crate) fn invalidate_decompressed(&mut self) {
        self.decompressed = None;
    }

    /// Decompresses the cluster at `host_offset` (caching the last one).
    fn decompress(&mut self, host_offset: u64, size: u64) -> Res<&[u8], R> {
        let hit = matches!(&self.decompressed, Some((o, _)) if *o == host_offset);
        if !hit {
            let cluster_size = to_usize(self.cluster_size()).unwrap_or(0);
            let mut input = alloc::vec![0u8; to_usize(size).unwrap_or(0)];
            self.io
                .read_at(host_offset, &mut input)
                .map_err(Error::Io)?;
            let mut out = match self.decompressed.take() {
                Some((_, mut b)) => {
                    b.resize(cluster_size, 0);
                    b
                }
                None => alloc::vec![0u8; cluster_size],
            };
            self.decompressor
                .decompress(self.header.compression_type, &input, &mut out)
                .map_err(|reason| Error::Decompress {
                    host_offset,
                    reason,
                })?;
            self.decompressed = Some((host_offset, out));
        }
        match &self.decompressed {
            Some((_, b)) => Ok(b),
            None => Err(Error::Internal("decompression cache lost")),
        }
    }
}

/// Reads guest bytes from the backing layer, zeros past its end or without one.
fn read_backing<R: BlockRead>(
    backing: Option<&mut Backing<R>>,
    pos: u64,
    out: &mut [u8],
) -> Res<(), R> {
    let Some(b) = backing else {
        out.fill(0);
        return Ok(());
    };
    let bsize = b.size();
    let avail = to_usize(bsize.saturating_sub(pos))
        .unwrap_or(usize::MAX)
        .min(out.len());
    let (inside, past) = out.split_at_mut(avail);
    past.fill(0);
    if inside.is_empty() {
        return Ok(());
    }
    match b {
        Backing::Qcow2(img) => {
            let name = String::from(img.name());
            img.read_at(pos, inside).map_err(|e| Error::Backing {
                name,
                source: Box::new(e),
            })
        }
        Backing::Raw { io, .. } => io.read_at(pos, inside).map_err(Error::Io),
    }
}
