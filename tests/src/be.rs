//! Big-endian fields of a byte buffer (qcow2 headers and tables), read and
//! patched in place at a byte offset. Out-of-range offsets panic.

/// The u16 at `off`.
pub fn get16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(b[off..off + 2].try_into().unwrap())
}

/// The u32 at `off`.
pub fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// The u64 at `off`.
pub fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// Writes `v` as the u16 at `off`.
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` as the u32 at `off`.
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` as the u64 at `off`.
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Sets `bits` in the u64 at `off` (feature bit fields).
pub fn set_bits64(b: &mut [u8], off: usize, bits: u64) {
    let v = get64(b, off);
    put64(b, off, v | bits);
}
