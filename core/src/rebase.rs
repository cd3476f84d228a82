//! Giving an image a new backing file (`qemu-img rebase`): the safe way
//! first copies into the image every cluster it does not hold whose
//! contents differ between the old chain and the new backing file, so the
//! guest sees the same disk, then names the new file in the header (one
//! write of the first cluster). A crash during the copy leaves the old
//! chain reading as before (the copied clusters hold what it read), at
//! worst with leaked clusters.

use alloc::vec::Vec;

use crate::bytes::{to_u64, to_usize};
use crate::copy::ChunkRead;
use crate::error::Error;
use crate::image::{Chunk, Res};
use crate::io::BlockWrite;
use crate::writable::WritableImage;
use crate::Codec;

/// Reads `buf.len()` guest bytes of `src` at `pos` (zeros past its end).
fn read_exact<D: ChunkRead + ?Sized>(
    src: &mut D,
    pos: u64,
    buf: &mut [u8],
    codec: &mut dyn Codec,
) -> Result<(), D::Error> {
    let size = src.disk_size();
    let mut done = 0usize;
    while done < buf.len() {
        let at = pos + to_u64(done);
        if at >= size {
            buf[done..].fill(0);
            break;
        }
        let want = to_u64(buf.len() - done).min(size - at);
        match src.read_chunk(at, want, 1, &mut buf[done..], codec)? {
            Chunk::Zero(n) => {
                let n = to_usize(n).unwrap_or(usize::MAX).min(buf.len() - done);
                buf[done..done + n].fill(0);
                done += n.max(1);
            }
            Chunk::Data(n) => done += n.max(1),
        }
    }
    Ok(())
}

impl<R: BlockWrite> WritableImage<R> {
    /// Writes into the image every cluster it does not hold itself whose
    /// contents differ between what the guest reads today (through the
    /// backing chain) and `new` (zeros where `new` is `None` or shorter):
    /// the first half of a safe rebase onto `new`. Nothing the guest reads
    /// changes. `codec` decodes `new`'s compressed clusters; `progress` is
    /// told the guest offset reached and the disk size as the walk goes.
    pub fn copy_backing_differences<D>(
        &mut self,
        mut new: Option<&mut D>,
        codec: &mut dyn Codec,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Res<(), R>
    where
        D: ChunkRead + ?Sized,
        Error<R::Error>: From<D::Error>,
    {
        self.require_intact()?;
        let size = self.size();
        let cs = self.cluster_size();
        let mut old: Vec<u8> = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
        let mut other: Vec<u8> = old.clone();
        let mut pos = 0u64;
        while pos < size {
            let (held, run) = self.img.allocated_above(pos, size - pos, 1)?;
            let end = pos + run.clamp(1, size - pos);
            if held {
                pos = end;
                progress(pos, size);
                continue;
            }
            // Cluster by cluster over the range the image does not hold.
            while pos < end {
                let n = to_usize((cs - pos % cs).min(end - pos)).unwrap_or(0);
                self.img.read_at(pos, &mut old[..n])?;
                match new.as_deref_mut() {
                    Some(d) => read_exact(d, pos, &mut other[..n], codec)?,
                    None => other[..n].fill(0),
                }
                if old[..n] != other[..n] {
                    self.write_at(pos, &old[..n])?;
                }
                pos += to_u64(n);
            }
            progress(pos, size);
        }
        self.flush()
    }

    /// Names `file` (format `format`) as the image's backing file, or none
    /// (`qemu-img rebase -u`): the header, its extensions and the name are
    /// rewritten in the first cluster with one write. Only the name
    /// changes: the guest sees the new backing file where the image has
    /// no data (a safe rebase copies what differs first). The backing file
    /// opened with the image stays in use until it is opened again.
    pub fn set_backing_name(&mut self, file: Option<&str>, format: Option<&str>) -> Res<(), R> {
        self.require_intact()?;
        if file.is_some_and(|f| f.len() > crate::header::MAX_BACKING_NAME as usize) {
            return Err(Error::Unsupported(
                "backing file name longer than 1023 bytes",
            ));
        }
        self.flush()?;
        let mut h = self.img.header.clone();
        h.backing_file = file.map(alloc::string::String::from);
        h.backing_format = file.and(format).map(alloc::string::String::from);
        self.write_header_cluster(h)
    }
}
