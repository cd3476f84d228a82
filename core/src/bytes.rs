//! Big-endian field access on byte slices (qcow2 is big-endian only).
//!
//! Callers pass in-bounds positions; out-of-range reads yield zero instead of
//! panicking so that a logic slip can never turn hostile input into a crash.

/// Reads a big-endian `u16` at `pos`.
pub(crate) fn be16(b: &[u8], pos: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = pos.checked_add(2).and_then(|end| b.get(pos..end)) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

/// Reads a big-endian `u32` at `pos`.
pub(crate) fn be32(b: &[u8], pos: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = pos.checked_add(4).and_then(|end| b.get(pos..end)) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

/// Reads a big-endian `u64` at `pos`.
pub(crate) fn be64(b: &[u8], pos: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = pos.checked_add(8).and_then(|end| b.get(pos..end)) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Writes `v` big-endian at `pos` (ignored if out of range).
pub(crate) fn put16(b: &mut [u8], pos: usize, v: u16) {
    if let Some(s) = pos.checked_add(2).and_then(|end| b.get_mut(pos..end)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes `v` big-endian at `pos` (ignored if out of range).
pub(crate) fn put32(b: &mut [u8], pos: usize, v: u32) {
    if let Some(s) = pos.checked_add(4).and_then(|end| b.get_mut(pos..end)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes `v` big-endian at `pos` (ignored if out of range).
pub(crate) fn put64(b: &mut [u8], pos: usize, v: u64) {
    if let Some(s) = pos.checked_add(8).and_then(|end| b.get_mut(pos..end)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Rounds `v` up to a multiple of 8, or `None` on overflow.
pub(crate) fn align8(v: usize) -> Option<usize> {
    v.checked_add(7).map(|x| x & !7)
}

/// Converts a `u64` to `usize`, or `None` when it does not fit (32-bit hosts).
pub(crate) fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

/// Converts a `usize` to `u64` (lossless on every supported target).
pub(crate) fn to_u64(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let mut b = [0u8; 16];
        put16(&mut b, 0, 0x1234);
        put32(&mut b, 2, 0xdead_beef);
        put64(&mut b, 8, 0x0102_0304_0506_0708);
        assert_eq!(be16(&b, 0), 0x1234);
        assert_eq!(be32(&b, 2), 0xdead_beef);
        assert_eq!(be64(&b, 8), 0x0102_0304_0506_0708);
        assert_eq!(be64(&b, 12), 0);
        assert_eq!(be32(&b, usize::MAX), 0);
        put64(&mut b, usize::MAX, 1);
        assert_eq!(align8(9), Some(16));
        assert_eq!(align8(usize::MAX), None);
    }
}
