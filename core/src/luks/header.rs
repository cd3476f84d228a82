//! The LUKS1 header inside qcow2: decoding and checking it as QEMU does,
//! unlocking a key slot, and building a new header with one slot.

use alloc::string::String;
use alloc::vec::Vec;

use zeroize::Zeroizing;

use super::hash::diffuse;
use super::{
    split_sectors, CipherMode, HashAlg, IvGen, Secret, SectorCipher, DIGEST_LEN, HEADER_LEN, MAGIC,
    SECTOR, SLOTS, SLOT_ACTIVE, SLOT_INACTIVE, STRIPES,
};
use crate::bytes::{be16, be32, to_u64, to_usize};
use crate::error::{Error, FormatError};

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
