//! The hashes of LUKS: PBKDF2 of passphrases and of the master key, the
//! anti-forensic diffusion of key material, ESSIV keys.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use zeroize::Zeroize;

/// A hash QEMU's LUKS uses for PBKDF2, the anti-forensic split and ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// MD5 (with the `luks-more-hashes` feature).
    #[cfg(feature = "luks-more-hashes")]
    Md5,
    /// RIPEMD-160 (with the `luks-more-hashes` feature).
    #[cfg(feature = "luks-more-hashes")]
    Ripemd160,
    /// SM3 (with the `luks-more-hashes` feature).
    #[cfg(feature = "luks-more-hashes")]
    Sm3,
}

impl HashAlg {
    /// The name in LUKS headers and qemu-img's options.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Md5 => "md5",
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Ripemd160 => "ripemd160",
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Sm3 => "sm3",
        }
    }

    /// The hash named `name`.
    pub fn parse(name: &str) -> Option<HashAlg> {
        Some(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            #[cfg(feature = "luks-more-hashes")]
            "md5" => HashAlg::Md5,
            #[cfg(feature = "luks-more-hashes")]
            "ripemd160" => HashAlg::Ripemd160,
            #[cfg(feature = "luks-more-hashes")]
            "sm3" => HashAlg::Sm3,
            _ => return None,
        })
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Md5 => 16,
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Ripemd160 => 20,
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Sm3 => 32,
        }
    }

    /// Digest of the concatenation of `parts`, into `out` (its length at
    /// most the digest length).
    pub(crate) fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            let h = d.finalize();
            let n = out.len().min(h.len());
            out[..n].copy_from_slice(&h[..n]);
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts, out),
            HashAlg::Sha224 => run::<Sha224>(parts, out),
            HashAlg::Sha256 => run::<Sha256>(parts, out),
            HashAlg::Sha384 => run::<Sha384>(parts, out),
            HashAlg::Sha512 => run::<Sha512>(parts, out),
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Md5 => run::<md5::Md5>(parts, out),
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Ripemd160 => run::<ripemd::Ripemd160>(parts, out),
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Sm3 => run::<sm3::Sm3>(parts, out),
        }
    }

    /// PBKDF2-HMAC with this hash.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, rounds, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, rounds, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, rounds, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, rounds, out),
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Md5 => pbkdf2_hmac::<md5::Md5>(password, salt, rounds, out),
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, rounds, out),
            #[cfg(feature = "luks-more-hashes")]
            HashAlg::Sm3 => pbkdf2_hmac::<sm3::Sm3>(password, salt, rounds, out),
        }
    }
}

/// The anti-forensic diffusion of a stripe: each hash-sized piece `i`
/// replaced by the hash of `be32(i)` and the piece (truncated to it).
pub(crate) fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    let mut out = [0u8; 64];
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let idx = (i as u32).to_be_bytes();
        hash.digest_into(&[&idx, piece], &mut out[..piece.len()]);
        piece.copy_from_slice(&out[..piece.len()]);
    }
    out.zeroize();
}
