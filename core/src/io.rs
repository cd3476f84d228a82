//! Block I/O traits: positional, synchronous, exact-length reads and writes.
//!
//! The core never touches files itself. Every storage the image lives on (a
//! `std::fs::File`, a browser `Blob`, an OPFS handle, a byte slice in ROM, an
//! `embedded-io` device) implements [`BlockRead`], and [`BlockWrite`] when it
//! can be written.

use alloc::vec::Vec;
use core::fmt;

/// Positional read access to a storage.
pub trait BlockRead {
    /// The storage's own error type.
    type Error: fmt::Debug + fmt::Display;

    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// Bytes past the end of the storage read as zeros: a storage never
    /// returns a short read.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;

    /// Returns the current length of the storage in bytes.
    fn len(&mut self) -> Result<u64, Self::Error>;

    /// Returns whether the storage is empty.
    fn is_empty(&mut self) -> Result<bool, Self::Error> {
        Ok(self.len()? == 0)
    }

    /// Says whether `[offset, offset + len)` starts with data (`true`) or a
    /// hole that reads as zeros (`false`), and how many bytes share that
    /// state. `None` when the storage cannot tell (the default): callers
    /// treat everything as data. Hosts with sparse files (`SEEK_DATA`)
    /// implement it so that `map` reports holes as qemu-img does.
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Option<(bool, u64)>, Self::Error> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Bytes the storage really occupies (e.g. `st_blocks * 512`), if known.
    fn allocated_size(&mut self) -> Result<Option<u64>, Self::Error> {
        Ok(None)
    }
}

/// Positional write access to a storage.
pub trait BlockWrite: BlockRead {
    /// Writes all of `buf` at `offset`, growing the storage when needed.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error>;

    /// Truncates or extends the storage to `len` bytes (new bytes read as zeros).
    fn set_len(&mut self, len: u64) -> Result<(), Self::Error>;

    /// Makes everything written before this call durable.
    fn flush(&mut self) -> Result<(), Self::Error>;

    /// Reserves space for `[offset, offset + len)` (e.g. `fallocate`),
    /// extending the storage if needed. The default only extends it.
    fn preallocate(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let end = offset.saturating_add(len);
        if end > self.len()? {
            self.set_len(end)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros, extending the storage
    /// when needed. The default writes zeros, 64 KiB at a time; storage that
    /// can zero cheaply (a file system's `fallocate`, extending a sparse
    /// file) overrides it.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        const CHUNK: u64 = 64 * 1024;
        let zeros = alloc::vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(offset.saturating_add(done), &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

impl<T: BlockRead + ?Sized> BlockRead for &mut T {
    type Error = T::Error;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read_at(offset, buf)
    }
    fn len(&mut self) -> Result<u64, Self::Error> {
        (**self).len()
    }
    fn allocation(&mut self, offset: u64, len: u64) -> Result<Option<(bool, u64)>, Self::Error> {
        (**self).allocation(offset, len)
    }
    fn allocated_size(&mut self) -> Result<Option<u64>, Self::Error> {
        (**self).allocated_size()
    }
}

impl<T: BlockWrite + ?Sized> BlockWrite for &mut T {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        (**self).write_at(offset, buf)
    }
    fn set_len(&mut self, len: u64) -> Result<(), Self::Error> {
        (**self).set_len(len)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        (**self).flush()
    }
    fn preallocate(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        (**self).preallocate(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        (**self).write_zeroes(offset, len)
    }
}

/// The error of the in-memory storages: an access beyond what fits in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemError {
    /// Offset of the access.
    pub offset: u64,
    /// Length of the access.
    pub len: usize,
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "in-memory access of {} bytes at offset {:#x} does not fit in memory",
            self.len, self.offset
        )
    }
}

impl core::error::Error for MemError {}

/// Copies the part of `src` that overlaps `[offset, offset + buf.len())` into
/// `buf` and zero-fills the rest.
fn read_from_slice(src: &[u8], offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let avail = &src[start..];
    let n = avail.len().min(buf.len());
    buf[..n].copy_from_slice(&avail[..n]);
}

impl BlockRead for &[u8] {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        read_from_slice(self, offset, buf);
        Ok(())
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(u64::try_from(<[u8]>::len(self)).unwrap_or(u64::MAX))
    }
}

impl BlockRead for Vec<u8> {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        read_from_slice(self, offset, buf);
        Ok(())
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(u64::try_from(Vec::len(self)).unwrap_or(u64::MAX))
    }
}

impl BlockWrite for Vec<u8> {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
        let err = MemError {
            offset,
            len: buf.len(),
        };
        let start = usize::try_from(offset).map_err(|_| err)?;
        let end = start.checked_add(buf.len()).ok_or(err)?;
        if end > Vec::len(self) {
            // Growing past what memory holds is an error, not an abort.
            self.try_reserve(end - Vec::len(self)).map_err(|_| err)?;
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> Result<(), MemError> {
        let err = MemError {
            offset: len,
            len: 0,
        };
        let n = usize::try_from(len).map_err(|_| err)?;
        if n > Vec::len(self) {
            self.try_reserve(n - Vec::len(self)).map_err(|_| err)?;
        }
        self.resize(n, 0);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), MemError> {
        Ok(())
    }
}

#[cfg(feature = "embedded-io")]
mod embedded {
    //! Adapters for `embedded_io` devices (`Read + Seek`, plus `Write`).
    use super::{BlockRead, BlockWrite};
    use embedded_io::{ErrorType, Read, Seek, SeekFrom, Write};

    /// A storage over an `embedded_io` device that can read and seek
    /// (and write, for [`BlockWrite`]).
    #[derive(Debug)]
    pub struct EmbeddedIo<T>(pub T);

    /// Errors of [`EmbeddedIo`].
    #[derive(Debug)]
    pub enum EmbeddedIoError<E> {
        /// The device reported an error.
        Device(E),
        /// The device could not write all bytes.
        WriteZero {
            /// Offset of the failed write.
            offset: u64,
        },
    }

    impl<E: core::fmt::Debug> core::fmt::Display for EmbeddedIoError<E> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                Self::Device(e) => write!(f, "device error: {e:?}"),
                Self::WriteZero { offset } => write!(f, "device wrote nothing at {offset:#x}"),
            }
        }
    }

    impl<T: Read + Seek> BlockRead for EmbeddedIo<T>
    where
        T::Error: core::fmt::Debug,
    {
        type Error = EmbeddedIoError<<T as ErrorType>::Error>;
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
            self.0
                .seek(SeekFrom::Start(offset))
                .map_err(EmbeddedIoError::Device)?;
            let mut done = 0;
            while done < buf.len() {
                let n = self
                    .0
                    .read(&mut buf[done..])
                    .map_err(EmbeddedIoError::Device)?;
                if n == 0 {
                    buf[done..].fill(0);
                    break;
                }
                done += n;
            }
            Ok(())
        }
        fn len(&mut self) -> Result<u64, Self::Error> {
            self.0
                .seek(SeekFrom::End(0))
                .map_err(EmbeddedIoError::Device)
        }
    }

    impl<T: Read + Write + Seek> BlockWrite for EmbeddedIo<T>
    where
        T::Error: core::fmt::Debug,
    {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
            self.0
                .seek(SeekFrom::Start(offset))
                .map_err(EmbeddedIoError::Device)?;
            let mut done = 0;
            while done < buf.len() {
                let n = self
                    .0
                    .write(&buf[done..])
                    .map_err(EmbeddedIoError::Device)?;
                if n == 0 {
                    return Err(EmbeddedIoError::WriteZero { offset });
                }
                done += n;
            }
            Ok(())
        }
        fn set_len(&mut self, len: u64) -> Result<(), Self::Error> {
            // embedded-io has no truncate: extending writes a zero byte at the end.
            let cur = self.len()?;
            if len > cur {
                self.write_at(len.saturating_sub(1), &[0])?;
            }
            Ok(())
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            self.0.flush().map_err(EmbeddedIoError::Device)
        }
    }
}

#[cfg(feature = "embedded-io")]
pub use embedded::{EmbeddedIo, EmbeddedIoError};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_zeros_past_end() {
        let data = [1u8, 2, 3];
        let mut s: &[u8] = &data;
        let mut buf = [9u8; 5];
        s.read_at(1, &mut buf).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0]);
        s.read_at(u64::MAX, &mut buf).unwrap();
        assert_eq!(buf, [0; 5]);
    }

    #[test]
    fn vec_write_grows() {
        let mut v = Vec::new();
        v.write_at(4, &[7, 8]).unwrap();
        assert_eq!(v, [0, 0, 0, 0, 7, 8]);
        assert!(v.write_at(u64::MAX, &[1]).is_err());
        // More than memory can hold: an error, not an abort.
        assert!(v.write_at(1 << 62, &[1]).is_err());
        assert!(BlockWrite::set_len(&mut v, 1 << 62).is_err());
    }
}
