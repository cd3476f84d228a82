//! Fallible allocation of buffers whose size comes from the image (tables,
//! clusters): on a small heap (firmware, wasm) a table larger than the
//! memory available is an [`Error::OutOfMemory`], not an abort.

use alloc::vec::Vec;

use crate::bytes::be64;
use crate::error::Error;

/// `len` default values (zeros) in a new vector, or
/// [`Error::OutOfMemory`] naming `what`.
pub(crate) fn zeroed<T: Clone + Default, E>(
    len: u64,
    what: &'static str,
) -> Result<Vec<T>, Error<E>> {
    let oom = || Error::OutOfMemory {
        what,
        bytes: len.saturating_mul(core::mem::size_of::<T>() as u64),
    };
    let n = usize::try_from(len).map_err(|_| oom())?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| oom())?;
    v.resize(n, T::default());
    Ok(v)
}

/// The big-endian 64-bit entries of `raw` (a table read from the image)
/// in a new vector, or [`Error::OutOfMemory`] naming `what`.
pub(crate) fn entries<E>(raw: &[u8], what: &'static str) -> Result<Vec<u64>, Error<E>> {
    let n = raw.len() / 8;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        what,
        bytes: (n as u64).saturating_mul(8),
    })?;
    v.extend(raw.chunks_exact(8).map(|c| be64(c, 0)));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_the_heap_are_errors() {
        let e = zeroed::<u8, ()>(u64::MAX, "a test table").unwrap_err();
        assert!(matches!(
            e,
            Error::OutOfMemory {
                what: "a test table",
                bytes: u64::MAX
            }
        ));
        let e = zeroed::<u16, ()>(1 << 62, "counts").unwrap_err();
        assert!(
            matches!(e, Error::OutOfMemory { bytes, .. } if bytes == 1 << 63),
            "{e:?}"
        );
        assert_eq!(zeroed::<u8, ()>(3, "x").unwrap(), [0, 0, 0]);
        assert_eq!(
            entries::<()>(&[0, 0, 0, 0, 0, 0, 1, 2, 9], "x").unwrap(),
            [0x102]
        );
    }
}
