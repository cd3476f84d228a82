//! The sector cipher: AES in QEMU's modes (xts, cbc, ctr, ecb) with its IV
//! generators (plain, plain64, essiv), one 512-byte sector at a time, and
//! the legacy qcow2 AES method.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use zeroize::Zeroizing;

use super::{HashAlg, Secret, SECTOR};
use crate::bytes::to_u64;

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
pub(crate) enum Aes {
    A128(aes::Aes128),
    A192(aes::Aes192),
    A256(aes::Aes256),
}

impl Aes {
    pub(crate) fn new(key: &[u8]) -> Option<Aes> {
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
