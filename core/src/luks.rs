//! Encrypted images: the LUKS1 header QEMU keeps inside a qcow2 image (the
//! full disk encryption header extension points at it), unlocking it with
//! a passphrase, and the sector cipher that encrypts guest data, plus the
//! legacy qcow2 AES method. Pure: the header is decoded from bytes, key
//! material is read through a caller's closure.
//!
//! Guest data is encrypted in 512-byte sectors; the IV of a sector is made
//! from its number: for LUKS the host offset of the data divided by 512,
//! for the legacy AES method the guest offset. Keys are wiped when dropped.

use alloc::string::String;
use alloc::vec::Vec;

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use zeroize::{Zeroize, Zeroizing};

use crate::bytes::{be16, be32, to_u64, to_usize};
use crate::error::{Error, FormatError};

/// Size of the units guest data is encrypted in.
pub const SECTOR: usize = 512;
/// Size of the LUKS1 header (before the key material).
pub const HEADER_LEN: usize = 592;
/// Anti-forensic stripes of every key slot (QEMU requires 4000).
pub const STRIPES: u32 = 4000;
/// Key slots of a LUKS1 header.
pub const SLOTS: usize = 8;
const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_INACTIVE: u32 = 0x0000_dead;
/// Length of the master key digest.
const DIGEST_LEN: usize = 20;

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
    fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
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

/// How a block cipher encrypts a sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CipherMode {
    /// Each block alone (no IV).
    Ecb,
    /// Cipher block chaining from the sector's IV.
    Cbc,
    /// XTS with the sector's IV as tweak (the key is two keys).
    Xts,
    /// Counter mode from the sector's IV (128-bit big-endian counter).
    Ctr,
}

impl CipherMode {
    /// The name in LUKS headers and qemu-img's options.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    /// The mode named `name`.
    pub fn parse(name: &str) -> Option<CipherMode> {
        Some(match name {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            "ctr" => CipherMode::Ctr,
            _ => return None,
        })
    }
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IvGen {
    /// The low 32 bits, little-endian.
    Plain,
    /// The 64-bit number, little-endian.
    Plain64,
    /// The 64-bit number encrypted with a key hashed from the data key.
    Essiv(HashAlg),
}

impl IvGen {
    /// The name in qemu-img's options (`plain`, `plain64`, `essiv`).
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// An AES key schedule of one of the three key sizes.
#[derive(Clone)]
enum Aes {
    A128(aes::Aes128),
    A192(aes::Aes192),
    A256(aes::Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Option<Aes> {
        Some(match key.len() {
            16 => Aes::A128(aes::Aes128::new_from_slice(key).ok()?),
            24 => Aes::A192(aes::Aes192::new_from_slice(key).ok()?),
            32 => Aes::A256(aes::Aes256::new_from_slice(key).ok()?),
            _ => return None,
        })
    }

    fn encrypt(&self, b: &mut [u8; 16]) {
        let b = aes::Block::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }

    fn decrypt(&self, b: &mut [u8; 16]) {
        let b = aes::Block::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.decrypt_block(b),
            Aes::A192(c) => c.decrypt_block(b),
            Aes::A256(c) => c.decrypt_block(b),
        }
    }

    /// Encrypts or decrypts many blocks at once (pipelined where the CPU
    /// has AES instructions).
    fn blocks(&self, b: &mut [aes::Block], enc: bool) {
        match (self, enc) {
            (Aes::A128(c), true) => c.encrypt_blocks(b),
            (Aes::A128(c), false) => c.decrypt_blocks(b),
            (Aes::A192(c), true) => c.encrypt_blocks(b),
            (Aes::A192(c), false) => c.decrypt_blocks(b),
            (Aes::A256(c), true) => c.encrypt_blocks(b),
            (Aes::A256(c), false) => c.decrypt_blocks(b),
        }
    }
}

/// Blocks of a sector.
const SECTOR_BLOCKS: usize = SECTOR / 16;

/// Multiplies an XTS tweak by x in GF(2^128) (little-endian convention).
fn xts_next(t: &mut [u8; 16]) {
    let mut carry = 0u8;
    for b in t.iter_mut() {
        let out = *b >> 7;
        *b = (*b << 1) | carry;
        carry = out;
    }
    if carry != 0 {
        t[0] ^= 0x87;
    }
}

fn xor16(a: &mut [u8; 16], b: &[u8; 16]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// The cipher that encrypts guest data sectors (AES in one of QEMU's
/// modes, with one of its IV generators). Its key schedules are wiped
/// when dropped.
#[derive(Clone)]
pub struct SectorCipher {
    mode: CipherMode,
    ivgen: IvGen,
    /// The data key (the first half of an XTS key).
    data: Aes,
    /// The tweak key of XTS.
    tweak: Option<Aes>,
    /// The ESSIV key.
    essiv: Option<Aes>,
}

impl core::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("mode", &self.mode)
            .field("ivgen", &self.ivgen)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// The cipher for AES with `key` (twice the AES key size for XTS) in
    /// `mode` with `ivgen`; `None` for key sizes AES does not have, or an
    /// ESSIV hash whose digest is not an AES key size (as QEMU refuses).
    pub fn new(key: &[u8], mode: CipherMode, ivgen: IvGen) -> Option<SectorCipher> {
        let (data, tweak) = if mode == CipherMode::Xts {
            if !key.len().is_multiple_of(2) {
                return None;
            }
            let (a, b) = key.split_at(key.len() / 2);
            (Aes::new(a)?, Some(Aes::new(b)?))
        } else {
            (Aes::new(key)?, None)
        };
        let essiv = match ivgen {
            IvGen::Essiv(h) => {
                let mut k = Zeroizing::new(alloc::vec![0u8; h.digest_len()]);
                h.digest_into(&[key], &mut k);
                Some(Aes::new(&k)?)
            }
            _ => None,
        };
        Some(SectorCipher {
            mode,
            ivgen,
            data,
            tweak,
            essiv,
        })
    }

    /// The IV of sector `n`.
    fn iv(&self, n: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(n as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&n.to_le_bytes()),
            IvGen::Essiv(_) => {
                iv[..8].copy_from_slice(&n.to_le_bytes());
                if let Some(e) = &self.essiv {
                    e.encrypt(&mut iv);
                }
            }
        }
        iv
    }

    /// Decrypts `buf` (whole sectors) whose first sector is number `first`.
    pub fn decrypt(&self, first: u64, buf: &mut [u8]) {
        self.run(first, buf, false);
    }

    /// Encrypts `buf` (whole sectors) whose first sector is number `first`.
    pub fn encrypt(&self, first: u64, buf: &mut [u8]) {
        self.run(first, buf, true);
    }

    fn run(&self, first: u64, buf: &mut [u8], enc: bool) {
        for (k, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(first.wrapping_add(to_u64(k)));
            self.sector(sector, iv, enc);
        }
    }

    fn sector(&self, s: &mut [u8], iv: [u8; 16], enc: bool) {
        // XTS and ECB (and CBC decryption) have no chain between blocks:
        // a sector's 32 blocks go through the cipher at once.
        let batch = matches!(
            (self.mode, enc),
            (CipherMode::Xts | CipherMode::Ecb, _) | (CipherMode::Cbc, false)
        );
        if batch && s.len() == SECTOR {
            let mut blocks = [aes::Block::default(); SECTOR_BLOCKS];
            for (b, c) in blocks.iter_mut().zip(s.chunks_exact(16)) {
                b.copy_from_slice(c);
            }
            let mut masks = [[0u8; 16]; SECTOR_BLOCKS];
            match self.mode {
                CipherMode::Xts => {
                    let mut t = iv;
                    if let Some(k) = &self.tweak {
                        k.encrypt(&mut t);
                    }
                    for m in masks.iter_mut() {
                        *m = t;
                        xts_next(&mut t);
                    }
                    for (b, m) in blocks.iter_mut().zip(&masks) {
                        for (x, y) in b.iter_mut().zip(m) {
                            *x ^= y;
                        }
                    }
                }
                CipherMode::Cbc => {
                    // Each block's plaintext is its decryption XOR the
                    // ciphertext before it (the IV for the first).
                    masks[0] = iv;
                    for (m, c) in masks[1..].iter_mut().zip(s.chunks_exact(16)) {
                        m.copy_from_slice(c);
                    }
                }
                _ => {}
            }
            self.data.blocks(&mut blocks, enc);
            if self.mode != CipherMode::Ecb {
                for (b, m) in blocks.iter_mut().zip(&masks) {
                    for (x, y) in b.iter_mut().zip(m) {
                        *x ^= y;
                    }
                }
            }
            for (c, b) in s.chunks_exact_mut(16).zip(&blocks) {
                c.copy_from_slice(b);
            }
            return;
        }
        let mut chain = iv;
        let mut tweak = iv;
        if let Some(t) = &self.tweak {
            t.encrypt(&mut tweak);
        }
        for chunk in s.chunks_exact_mut(16) {
            let mut b = [0u8; 16];
            b.copy_from_slice(chunk);
            match (self.mode, enc) {
                (CipherMode::Ecb, true) => self.data.encrypt(&mut b),
                (CipherMode::Ecb, false) => self.data.decrypt(&mut b),
                (CipherMode::Cbc, true) => {
                    xor16(&mut b, &chain);
                    self.data.encrypt(&mut b);
                    chain = b;
                }
                (CipherMode::Cbc, false) => {
                    let c = b;
                    self.data.decrypt(&mut b);
                    xor16(&mut b, &chain);
                    chain = c;
                }
                (CipherMode::Xts, _) => {
                    xor16(&mut b, &tweak);
                    if enc {
                        self.data.encrypt(&mut b);
                    } else {
                        self.data.decrypt(&mut b);
                    }
                    xor16(&mut b, &tweak);
                    xts_next(&mut tweak);
                }
                (CipherMode::Ctr, _) => {
                    let mut ks = chain;
                    self.data.encrypt(&mut ks);
                    xor16(&mut b, &ks);
                    // The counter: a 128-bit big-endian integer.
                    for x in chain.iter_mut().rev() {
                        *x = x.wrapping_add(1);
                        if *x != 0 {
                            break;
                        }
                    }
                }
            }
            chunk.copy_from_slice(&b);
        }
    }
}

/// Reads key material at an offset from the start of the LUKS header.
pub type KeyMaterialReader<'a, E> = dyn FnMut(u64, &mut [u8]) -> Result<(), E> + 'a;

/// One key slot of a LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations of the slot's key.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 32],
    /// Start of the key material, in 512-byte sectors from the header.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes (4000).
    pub stripes: u32,
}

/// A LUKS1 header, as QEMU keeps it inside qcow2 images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher family (`aes`, `serpent`, ...).
    pub cipher_name: String,
    /// Mode and IV generator, e.g. `xts-plain64`, `cbc-essiv:sha256`.
    pub cipher_mode: String,
    /// Hash of PBKDF2 and the anti-forensic split.
    pub hash_spec: String,
    /// Where the payload would start (sectors); unused inside qcow2.
    pub payload_offset_sector: u32,
    /// Length of the master key (both keys for XTS).
    pub key_bytes: u32,
    /// PBKDF2 of the master key (20 bytes).
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_salt: [u8; 32],
    /// Its iterations.
    pub mk_iterations: u32,
    /// The volume's UUID, as text.
    pub uuid: String,
    /// The eight key slots.
    pub slots: [KeySlot; SLOTS],
}

fn field(field: &'static str, value: u64, reason: &'static str) -> FormatError {
    FormatError::field(field, value, reason)
}

/// A NUL-terminated string of a 32 or 40-byte field.
fn text(b: &[u8], name: &'static str) -> Result<String, FormatError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(field(name, 0, "not NUL terminated"))?;
    core::str::from_utf8(&b[..end])
        .map(String::from)
        .map_err(|_| field(name, 0, "not text"))
}

impl LuksHeader {
    /// Decodes and checks a LUKS1 header (the first [`HEADER_LEN`] bytes),
    /// as QEMU checks it before it tries a key.
    pub fn decode(b: &[u8]) -> Result<LuksHeader, FormatError> {
        if b.len() < HEADER_LEN || b[..6] != MAGIC {
            return Err(field("LUKS magic", 0, "Volume is not in LUKS format"));
        }
        let version = be16(b, 6);
        if version != 1 {
            return Err(field(
                "LUKS version",
                version.into(),
                "only LUKS version 1 is supported (as QEMU)",
            ));
        }
        let payload = be32(b, 104);
        let mut slots: [KeySlot; SLOTS] = core::array::from_fn(|_| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; 32],
            key_offset_sector: 0,
            stripes: 0,
        });
        let key_bytes = be32(b, 108);
        if key_bytes == 0 || key_bytes > 256 {
            return Err(field("LUKS key_bytes", key_bytes.into(), "out of range"));
        }
        let split = split_sectors(key_bytes);
        for (i, s) in slots.iter_mut().enumerate() {
            let at = 208 + 48 * i;
            let state = be32(b, at);
            s.active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                v => return Err(field("LUKS key slot state", v.into(), "corrupted")),
            };
            s.iterations = be32(b, at + 4);
            s.salt.copy_from_slice(&b[at + 8..at + 40]);
            s.key_offset_sector = be32(b, at + 40);
            s.stripes = be32(b, at + 44);
            if s.stripes != STRIPES {
                return Err(field(
                    "LUKS key slot stripes",
                    s.stripes.into(),
                    "must be 4000",
                ));
            }
            if s.active && s.iterations == 0 {
                return Err(field(
                    "LUKS key slot iterations",
                    0,
                    "iteration count is zero",
                ));
            }
            if s.key_offset_sector < 8 {
                return Err(field(
                    "LUKS key slot key offset",
                    s.key_offset_sector.into(),
                    "overlaps the LUKS header",
                ));
            }
            if u64::from(s.key_offset_sector) + split > u64::from(payload) {
                return Err(field(
                    "LUKS key slot key offset",
                    s.key_offset_sector.into(),
                    "overlaps the encrypted payload",
                ));
            }
        }
        for i in 0..SLOTS {
            for j in i + 1..SLOTS {
                let (a, c) = (
                    u64::from(slots[i].key_offset_sector),
                    u64::from(slots[j].key_offset_sector),
                );
                if a < c + split && c < a + split {
                    return Err(field(
                        "LUKS key slot key offset",
                        c,
                        "key slots overlap in the header",
                    ));
                }
            }
        }
        if payload < 8 {
            return Err(field(
                "LUKS payload offset",
                payload.into(),
                "overlaps the header",
            ));
        }
        let mk_iterations = be32(b, 164);
        if mk_iterations == 0 {
            return Err(field(
                "LUKS master key iterations",
                0,
                "iteration count is zero",
            ));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; 32];
        mk_salt.copy_from_slice(&b[132..164]);
        Ok(LuksHeader {
            cipher_name: text(&b[8..40], "LUKS cipher name")?,
            cipher_mode: text(&b[40..72], "LUKS cipher mode")?,
            hash_spec: text(&b[72..104], "LUKS hash spec")?,
            payload_offset_sector: payload,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid: text(&b[168..208], "LUKS uuid").unwrap_or_default(),
            slots,
        })
    }

    /// The header's algorithms: the PBKDF2/split hash, the cipher mode and
    /// IV generator. Refused (naming the header field) for ciphers other
    /// than AES and for combinations QEMU does not create.
    pub fn algorithms(&self) -> Result<(HashAlg, CipherMode, IvGen), FormatError> {
        let hash = HashAlg::parse(&self.hash_spec).ok_or(field(
            "LUKS hash spec",
            0,
            "hash algorithm not supported (sha1, sha224, sha256, sha384, sha512)",
        ))?;
        if self.cipher_name != "aes" {
            return Err(field("LUKS cipher name", 0, "cipher not supported (aes)"));
        }
        let (mode, rest) = self.cipher_mode.split_once('-').ok_or(field(
            "LUKS cipher mode",
            0,
            "unexpected format",
        ))?;
        let mode = CipherMode::parse(mode).ok_or(field("LUKS cipher mode", 0, "not supported"))?;
        let (iv, ivhash) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let ivgen = match iv {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv(ivhash.and_then(HashAlg::parse).ok_or(field(
                "LUKS cipher mode",
                0,
                "ESSIV hash missing or not supported",
            ))?),
            _ => return Err(field("LUKS cipher mode", 0, "IV generator not supported")),
        };
        Ok((hash, mode, ivgen))
    }

    /// Unlocks the header with `passphrase`: each active slot's key is
    /// derived, its key material (read through `read`, at offsets from the
    /// header's start) decrypted and merged, and the result checked
    /// against the master key digest. Returns the sector cipher of the
    /// master key; [`Error::InvalidPassphrase`] when no slot opens.
    pub fn unlock<E>(
        &self,
        passphrase: &Secret,
        read: &mut KeyMaterialReader<'_, E>,
    ) -> Result<SectorCipher, Error<E>> {
        let (hash, mode, ivgen) = self.algorithms().map_err(Error::Format)?;
        let n = to_usize(u64::from(self.key_bytes)).unwrap_or(0);
        let mut slot_key = Zeroizing::new(alloc::vec![0u8; n]);
        let mut master = Zeroizing::new(alloc::vec![0u8; n]);
        let mut sector = Zeroizing::new([0u8; SECTOR]);
        let mut stripe = Zeroizing::new(alloc::vec![0u8; n]);
        for slot in self.slots.iter().filter(|s| s.active) {
            hash.pbkdf2(
                passphrase.bytes(),
                &slot.salt,
                slot.iterations,
                &mut slot_key,
            );
            let cipher = SectorCipher::new(&slot_key, mode, ivgen).ok_or(Error::Format(field(
                "LUKS key_bytes",
                self.key_bytes.into(),
                "not a key size of the cipher",
            )))?;
            // The stripes, decrypted sector by sector and merged as they
            // come (the material is key_bytes * 4000 bytes).
            let total = u64::from(self.key_bytes) * u64::from(slot.stripes);
            let base = u64::from(slot.key_offset_sector) * SECTOR as u64;
            master.fill(0);
            let mut filled = 0usize;
            let mut index = 0u32;
            let mut done = 0u64;
            while done < total {
                read(base + done, &mut sector[..]).map_err(Error::Io)?;
                cipher.decrypt(done / SECTOR as u64, &mut sector[..]);
                let take = to_usize((total - done).min(SECTOR as u64)).unwrap_or(0);
                let mut p = 0;
                while p < take {
                    let k = (n - filled).min(take - p);
                    stripe[filled..filled + k].copy_from_slice(&sector[p..p + k]);
                    filled += k;
                    p += k;
                    if filled == n {
                        if index + 1 < slot.stripes {
                            for (d, s) in master.iter_mut().zip(stripe.iter()) {
                                *d ^= s;
                            }
                            diffuse(hash, &mut master);
                        } else {
                            for (d, s) in master.iter_mut().zip(stripe.iter()) {
                                *d ^= s;
                            }
                        }
                        index += 1;
                        filled = 0;
                    }
                }
                done += SECTOR as u64;
            }
            let mut digest = [0u8; DIGEST_LEN];
            hash.pbkdf2(&master, &self.mk_salt, self.mk_iterations, &mut digest);
            if digest == self.mk_digest {
                return SectorCipher::new(&master, mode, ivgen)
                    .ok_or(Error::Internal("master key"));
            }
        }
        Err(Error::InvalidPassphrase)
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

/// The anti-forensic diffusion of a stripe: each hash-sized piece `i`
/// replaced by the hash of `be32(i)` and the piece (truncated to it).
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    let mut out = [0u8; 64];
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let idx = (i as u32).to_be_bytes();
        hash.digest_into(&[&idx, piece], &mut out[..piece.len()]);
        piece.copy_from_slice(&out[..piece.len()]);
    }
    out.zeroize();
}

/// The cipher of the legacy qcow2 AES method: AES-128-CBC with the first
/// 16 bytes of the passphrase (zero-padded) as key and the guest sector
/// number as plain64 IV. There is no key check: a wrong passphrase reads
/// garbage, as with QEMU.
pub fn legacy_aes(passphrase: &Secret) -> SectorCipher {
    let mut key = Zeroizing::new([0u8; 16]);
    let p = passphrase.bytes();
    let n = p.len().min(16);
    key[..n].copy_from_slice(&p[..n]);
    SectorCipher {
        mode: CipherMode::Cbc,
        ivgen: IvGen::Plain64,
        data: Aes::A128(aes::Aes128::new(
            aes::cipher::generic_array::GenericArray::from_slice(&key[..]),
        )),
        tweak: None,
        essiv: None,
    }
}

/// How a new LUKS header is made (qemu-img's `encrypt.*` options): AES of
/// `key_bytes` (16, 24 or 32) in `mode` with `ivgen`, PBKDF2 and the
/// anti-forensic split with `hash`, and the iteration counts (a host
/// derives them from an iteration time, as qemu-img's `encrypt.iter-time`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksOptions {
    /// The passphrase of key slot 0.
    pub passphrase: Secret,
    /// AES key size in bytes (16, 24 or 32; XTS uses two such keys).
    pub key_bytes: u32,
    /// Cipher mode.
    pub mode: CipherMode,
    /// IV generator.
    pub ivgen: IvGen,
    /// Hash of PBKDF2 and the anti-forensic split.
    pub hash: HashAlg,
    /// PBKDF2 iterations of key slot 0 (at least 1000, QEMU's floor).
    pub slot_iterations: u32,
    /// PBKDF2 iterations of the master key digest (at least 1000).
    pub mk_iterations: u32,
}

impl LuksOptions {
    /// qemu-img's defaults (aes-256, xts, plain64, sha256) with
    /// `passphrase` and QEMU's minimum iterations (hosts set more).
    pub fn new(passphrase: Secret) -> LuksOptions {
        LuksOptions {
            passphrase,
            key_bytes: 32,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
            hash: HashAlg::Sha256,
            slot_iterations: 1000,
            mk_iterations: 1000,
        }
    }

    /// Length of the master key (twice the AES key for XTS).
    pub fn master_key_len(&self) -> u32 {
        self.key_bytes * if self.mode == CipherMode::Xts { 2 } else { 1 }
    }

    /// Bytes of the header with its key slots' material (QEMU's layout).
    pub fn header_len(&self) -> u64 {
        (8 + 8 * split_sectors(self.master_key_len())) * SECTOR as u64
    }

    /// Checks the combination as qemu-img does (and refuses the 24-byte
    /// keys without XTS that make qemu-img abort).
    pub fn validate(&self) -> Result<(), FormatError> {
        let opt = |reason| FormatError::InvalidOption {
            option: "encrypt.cipher-alg",
            reason,
        };
        if ![16, 24, 32].contains(&self.key_bytes) {
            return Err(opt("AES keys are 128, 192 or 256 bits"));
        }
        if self.key_bytes == 24 && self.mode != CipherMode::Xts {
            return Err(opt(
                "aes-192 needs cipher-mode=xts (its key material does not fill whole sectors)",
            ));
        }
        if let IvGen::Essiv(h) = self.ivgen {
            if ![16, 24, 32].contains(&h.digest_len()) {
                return Err(FormatError::InvalidOption {
                    option: "encrypt.ivgen-hash-alg",
                    reason: "no AES cipher with a key of that hash's size for essiv",
                });
            }
        }
        if self.slot_iterations < 1000 || self.mk_iterations < 1000 {
            return Err(FormatError::InvalidOption {
                option: "encrypt.iter-time",
                reason: "PBKDF2 iterations below QEMU's minimum of 1000",
            });
        }
        Ok(())
    }

    /// The header with key slot 0 holding the passphrase: [`Self::header_len`]
    /// bytes, as QEMU lays them out (the 592-byte header, zeros, slot 0's
    /// encrypted key material at sector 8). `random` fills buffers with
    /// random bytes (master key, salts, UUID, anti-forensic stripes).
    pub fn build(&self, random: &mut dyn FnMut(&mut [u8])) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        let mkl = self.master_key_len();
        let n = to_usize(u64::from(mkl)).unwrap_or(0);
        let split = split_sectors(mkl);
        let len = to_usize(self.header_len()).unwrap_or(0);
        let mut out = alloc::vec![0u8; len];
        let mut master = Zeroizing::new(alloc::vec![0u8; n]);
        random(&mut master);
        let mut mk_salt = [0u8; 32];
        random(&mut mk_salt);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(&master, &mk_salt, self.mk_iterations, &mut digest);
        // Slot 0: the master key split into 4000 stripes, encrypted with
        // the passphrase's key.
        let mut salt = [0u8; 32];
        random(&mut salt);
        let mut slot_key = Zeroizing::new(alloc::vec![0u8; n]);
        self.hash.pbkdf2(
            self.passphrase.bytes(),
            &salt,
            self.slot_iterations,
            &mut slot_key,
        );
        let material_len = n * STRIPES as usize;
        let base = 8 * SECTOR;
        let material = &mut out[base..base + material_len];
        random(&mut material[..n * (STRIPES as usize - 1)]);
        let mut d = Zeroizing::new(alloc::vec![0u8; n]);
        for stripe in material[..n * (STRIPES as usize - 1)].chunks(n) {
            for (x, y) in d.iter_mut().zip(stripe) {
                *x ^= y;
            }
            diffuse(self.hash, &mut d);
        }
        let last = &mut material[n * (STRIPES as usize - 1)..];
        for ((o, x), m) in last.iter_mut().zip(d.iter()).zip(master.iter()) {
            *o = x ^ m;
        }
        let cipher = SectorCipher::new(&slot_key, self.mode, self.ivgen).ok_or(
            FormatError::InvalidOption {
                option: "encrypt.cipher-alg",
                reason: "key size not supported",
            },
        )?;
        let sectors = material_len.div_ceil(SECTOR) * SECTOR;
        cipher.encrypt(0, &mut out[base..base + sectors]);
        // The header.
        let h = &mut out[..HEADER_LEN];
        h[..6].copy_from_slice(&MAGIC);
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[8..11].copy_from_slice(b"aes");
        let mode = match self.ivgen {
            IvGen::Essiv(hash) => alloc::format!("{}-essiv:{}", self.mode.name(), hash.name()),
            iv => alloc::format!("{}-{}", self.mode.name(), iv.name()),
        };
        h[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        let hs = self.hash.name();
        h[72..72 + hs.len()].copy_from_slice(hs.as_bytes());
        let payload = u32::try_from(8 + 8 * split).unwrap_or(u32::MAX);
        h[104..108].copy_from_slice(&payload.to_be_bytes());
        h[108..112].copy_from_slice(&mkl.to_be_bytes());
        h[112..132].copy_from_slice(&digest);
        h[132..164].copy_from_slice(&mk_salt);
        h[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        let mut u = [0u8; 16];
        random(&mut u);
        u[6] = (u[6] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| alloc::format!("{x:02x}"))
                .collect::<String>()
        };
        let uuid = alloc::format!(
            "{}-{}-{}-{}-{}",
            hex(&u[..4]),
            hex(&u[4..6]),
            hex(&u[6..8]),
            hex(&u[8..10]),
            hex(&u[10..])
        );
        h[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        for i in 0..SLOTS {
            let at = 208 + 48 * i;
            let active = i == 0;
            let state = if active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            h[at..at + 4].copy_from_slice(&state.to_be_bytes());
            if active {
                h[at + 4..at + 8].copy_from_slice(&self.slot_iterations.to_be_bytes());
                h[at + 8..at + 40].copy_from_slice(&salt);
            }
            let offset = u32::try_from(8 + to_u64(i) * split).unwrap_or(u32::MAX);
            h[at + 40..at + 44].copy_from_slice(&offset.to_be_bytes());
            h[at + 44..at + 48].copy_from_slice(&STRIPES.to_be_bytes());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
