//! Encrypted images: the LUKS1 header QEMU keeps inside a qcow2 image (the
//! full disk encryption header extension points at it), unlocking it with
//! a passphrase, and the sector cipher that encrypts guest data, plus the
//! legacy qcow2 AES method. Pure: the header is decoded from bytes, key
//! material is read through a caller's closure.
//!
//! Guest data is encrypted in 512-byte sectors; the IV of a sector is made
//! from its number: for LUKS the host offset of the data divided by 512,
//! for the legacy AES method the guest offset. Keys are wiped when dropped.

mod cipher;
mod hash;
mod header;

pub use cipher::{legacy_aes, CipherMode, IvGen, SectorCipher};
pub use hash::HashAlg;
pub use header::{KeyMaterialReader, KeySlot, LuksHeader, LuksOptions};

use alloc::vec::Vec;

use zeroize::Zeroize;

/// Size of the units guest data is encrypted in.
pub const SECTOR: usize = 512;
/// Size of the LUKS1 header (before the key material).
pub const HEADER_LEN: usize = 592;
/// Anti-forensic stripes of every key slot (QEMU requires 4000).
pub const STRIPES: u32 = 4000;
/// Key slots of a LUKS1 header.
pub const SLOTS: usize = 8;
pub(crate) const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
pub(crate) const SLOT_ACTIVE: u32 = 0x00ac_71f3;
pub(crate) const SLOT_INACTIVE: u32 = 0x0000_dead;
/// Length of the master key digest.
pub(crate) const DIGEST_LEN: usize = 20;

/// A passphrase or key, wiped from memory when dropped and never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for Secret {
    fn from(b: &[u8]) -> Self {
        Secret(b.to_vec())
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Secret(v)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Sectors of one key slot's material for a key of `key_bytes` bytes
/// (rounded up to 4 KiB, as QEMU lays slots out).
pub fn split_sectors(key_bytes: u32) -> u64 {
    (u64::from(key_bytes) * u64::from(STRIPES))
        .div_ceil(SECTOR as u64)
        .div_ceil(8)
        * 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn xts_matches_ieee_1619_vector_1() {
        // IEEE P1619 XTS-AES-128 test vector 1: keys and plaintext zero,
        // tweak 0 (one 32-byte data unit; here the first two blocks of a
        // sector).
        let c = SectorCipher::new(&[0u8; 32], CipherMode::Xts, IvGen::Plain64).unwrap();
        let mut s = [0u8; SECTOR];
        c.encrypt(0, &mut s);
        assert_eq!(
            &s[..32],
            &[
                0x91, 0x7c, 0xf6, 0x9e, 0xbd, 0x68, 0xb2, 0xec, 0x9b, 0x9f, 0xe9, 0xa3, 0xea, 0xdd,
                0xa6, 0x92, 0xcd, 0x43, 0xd2, 0xf5, 0x95, 0x98, 0xed, 0x85, 0x8c, 0x02, 0xc2, 0x65,
                0x2f, 0xbf, 0x92, 0x2e
            ]
        );
        c.decrypt(0, &mut s);
        assert_eq!(s, [0u8; SECTOR]);
    }

    #[test]
    fn every_mode_round_trips() {
        for mode in [
            CipherMode::Ecb,
            CipherMode::Cbc,
            CipherMode::Xts,
            CipherMode::Ctr,
        ] {
            for iv in [IvGen::Plain, IvGen::Plain64, IvGen::Essiv(HashAlg::Sha256)] {
                let key = if mode == CipherMode::Xts {
                    [7u8; 64].to_vec()
                } else {
                    [7u8; 32].to_vec()
                };
                let c = SectorCipher::new(&key, mode, iv).unwrap();
                let plain: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
                let mut b = plain.clone();
                c.encrypt(99, &mut b);
                assert_ne!(b, plain);
                c.decrypt(99, &mut b);
                assert_eq!(b, plain, "{mode:?} {iv:?}");
            }
        }
    }

    #[test]
    fn essiv_needs_an_aes_sized_digest() {
        assert!(
            SectorCipher::new(&[1; 32], CipherMode::Cbc, IvGen::Essiv(HashAlg::Sha1)).is_none()
        );
        assert!(
            SectorCipher::new(&[1; 16], CipherMode::Cbc, IvGen::Essiv(HashAlg::Sha256)).is_some()
        );
    }

    #[test]
    fn a_built_header_unlocks_with_its_passphrase_only() {
        let mut seed = 1u64;
        let mut random = |b: &mut [u8]| {
            for x in b.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *x = (seed >> 33) as u8;
            }
        };
        for (mode, ivgen, key) in [
            (CipherMode::Xts, IvGen::Plain64, 32),
            (CipherMode::Cbc, IvGen::Essiv(HashAlg::Sha256), 16),
            (CipherMode::Xts, IvGen::Plain, 24),
        ] {
            let o = LuksOptions {
                key_bytes: key,
                mode,
                ivgen,
                ..LuksOptions::new(Secret::from("abc"))
            };
            let bytes = o.build(&mut random).unwrap();
            assert_eq!(bytes.len() as u64, o.header_len());
            let h = LuksHeader::decode(&bytes).unwrap();
            let mut read = |at: u64, buf: &mut [u8]| -> Result<(), ()> {
                let at = at as usize;
                buf.copy_from_slice(&bytes[at..at + buf.len()]);
                Ok(())
            };
            assert!(h.unlock(&Secret::from("abc"), &mut read).is_ok());
            assert!(matches!(
                h.unlock(&Secret::from("abd"), &mut read),
                Err(Error::InvalidPassphrase)
            ));
        }
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut b = [0u8; HEADER_LEN];
        assert!(LuksHeader::decode(&b).is_err());
        b[..6].copy_from_slice(&MAGIC);
        b[7] = 1;
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        // Every slot inactive, but stripes 0: refused.
        for i in 0..SLOTS {
            b[208 + 48 * i..212 + 48 * i].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
        }
        assert!(LuksHeader::decode(&b).is_err());
        b[7] = 2;
        assert!(LuksHeader::decode(&b).is_err());
    }
}
