//! The qcow2 header and its extensions: pure decoding and encoding, no I/O.

use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{align8, be32, be64, put32, put64, to_u64, to_usize};
use crate::Error;

/// `QFI\xfb`, the first four bytes of every qcow2 image.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header in bytes.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of the version 3 header in bytes.
pub const V3_HEADER_MIN_LEN: u32 = 104;
/// Smallest supported `cluster_bits` (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported `cluster_bits` (2 MiB clusters, QEMU's limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the active L1 table size in bytes.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// QEMU's limit on the refcount table size in bytes.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the number of persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory size in bytes.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// Highest host offset a mapping may use (56 bits).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is corrupt and must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A non-zlib compression type is used.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTL2: u64 = 1 << 4;
    /// All bits this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// All bits this implementation knows.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// The compression method of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (zlib without header), 4 KiB window.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses (`zlib` / `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Encryption method from `crypt_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptMethod {
    /// Not encrypted.
    None,
    /// Legacy AES-CBC.
    Aes,
    /// LUKS.
    Luks,
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number within the feature bitmap.
    pub bit: u8,
    /// Name (up to 46 bytes).
    pub name: String,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Reserved field (must be zero).
    pub reserved: u32,
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The full disk encryption header pointer extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    /// Host offset of the encryption header.
    pub offset: u64,
    /// Length of the encryption header in bytes.
    pub length: u64,
}

/// A header extension this implementation does not interpret, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

/// A decoded and validated qcow2 header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version: 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 when there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method.
    pub crypt_method: CryptMethod,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format name extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Feature name table extension.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension (present and consistent).
    pub bitmaps: Option<BitmapsExt>,
    /// True when a bitmaps extension exists but its autoclear bit is clear.
    pub bitmaps_inconsistent: bool,
    /// Full disk encryption header pointer.
    pub crypto: Option<CryptoExt>,
    /// Extensions kept verbatim.
    pub unknown_extensions: Vec<UnknownExtension>,
}

/// Checks that a table of `entries` entries of `entry_len` bytes at `offset`
/// is cluster aligned, at most `max_bytes` long, and does not overflow.
pub(crate) fn validate_table<E>(
    field_offset: &'static str,
    field_size: &'static str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), Error<E>> {
    let bytes = entries
        .checked_mul(entry_len)
        .filter(|b| *b <= max_bytes)
        .ok_or(Error::field(field_size, entries, "table too large"))?;
    if offset % cluster_size != 0 {
        return Err(Error::field(
            field_offset,
            offset,
            "not aligned to a cluster boundary",
        ));
    }
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(Error::field(
            field_offset,
            offset,
            "table extends past the largest file offset",
        ));
    }
    Ok(())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }

    /// Whether L2 entries are extended (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// Whether an external data file holds the guest data.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the external data file is a consistent raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Whether the dirty bit (lazy refcounts) is set.
    pub fn dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Number of L2 entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Bytes of guest data covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Number of L1 entries needed to map the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage())
    }

    /// Whether `buf` (a prefix of the first cluster) holds the whole header:
    /// its extensions up to the end marker and the backing file name. When
    /// it does not (or the fields are odd), read the whole first cluster.
    pub fn fits_in(buf: &[u8]) -> bool {
        let version = be32(buf, 4);
        let mut off = if version >= 3 {
            be32(buf, 100) as usize
        } else {
            V2_HEADER_LEN as usize
        };
        let backing_end = be64(buf, 8).saturating_add(u64::from(be32(buf, 16)));
        if be64(buf, 8) != 0 && backing_end > to_u64(buf.len()) {
            return false;
        }
        loop {
            let Some(hdr_end) = off.checked_add(8).filter(|e| *e <= buf.len()) else {
                return false;
            };
            let kind = be32(buf, off);
            if kind == EXT_END {
                return true;
            }
            let len = be32(buf, off + 4) as usize;
            off = match align8(len).and_then(|l| hdr_end.checked_add(l)) {
                Some(o) => o,
                None => return false,
            };
        }
    }

    /// Reads the fixed fields from the start of the image and validates the
    /// geometry (`cluster_bits`, `header_length`), so that the caller knows how
    /// many bytes to read for [`Header::parse`]. `buf` must hold at least 104
    /// bytes (missing bytes read as zero).
    pub fn peek_cluster_bits<E>(buf: &[u8]) -> Result<u32, Error<E>> {
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::field(
                "cluster_bits",
                cluster_bits.into(),
                "cluster size must be between 512 bytes (9) and 2 MiB (21)",
            ));
        }
        Ok(cluster_bits)
    }

    /// Decodes and validates the header from the image's first cluster
    /// (`buf` holds the first `min(cluster size, file length)` bytes; missing
    /// bytes read as zero).
    pub fn parse<E>(buf: &[u8]) -> Result<Header, Error<E>> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = be32(buf, 4);
        let crypt = be32(buf, 32);
        let crypt_method = match crypt {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            v => {
                return Err(Error::field(
                    "crypt_method",
                    v.into(),
                    "unknown encryption method",
                ))
            }
        };
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method,
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            bitmaps_inconsistent: false,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_MIN_LEN {
                return Err(Error::field(
                    "header_length",
                    h.header_length.into(),
                    "version 3 header must be at least 104 bytes",
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(Error::field(
                    "header_length",
                    h.header_length.into(),
                    "header exceeds the cluster size",
                ));
            }
            if h.header_length > V3_HEADER_MIN_LEN {
                h.compression_type = match buf.get(104).copied().unwrap_or(0) {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    v => {
                        return Err(Error::field(
                            "compression_type",
                            v.into(),
                            "unknown compression type (0 zlib, 1 zstd)",
                        ))
                    }
                };
            }
        }
        let has_type_bit = h.incompatible_features & incompat::COMPRESSION != 0;
        if has_type_bit != (h.compression_type != CompressionType::Zlib) {
            return Err(Error::field(
                "compression_type",
                match h.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                },
                if has_type_bit {
                    "compression type bit is set but the type is zlib"
                } else {
                    "non-zlib compression type without the compression type bit"
                },
            ));
        }
        if h.refcount_order > 6 {
            return Err(Error::field(
                "refcount_order",
                h.refcount_order.into(),
                "refcount width may not exceed 64 bits (order 6)",
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::field(
                "cluster_bits",
                cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB (14)",
            ));
        }
        if h.data_file_raw() && !h.has_data_file() {
            return Err(Error::field(
                "autoclear_features",
                h.autoclear_features,
                "data-file-raw bit set without an external data file",
            ));
        }

        // Header extensions.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        h.parse_extensions(buf, u64::from(h.header_length), ext_end)?;

        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::UnknownIncompatibleFeatures {
                bits: unknown,
                names: h.feature_names_for(0, unknown),
            });
        }

        // Backing file name.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(Error::field(
                    "backing_file_size",
                    h.backing_file_size.into(),
                    "backing file name longer than 1023 bytes",
                ));
            }
            let end = h
                .backing_file_offset
                .checked_add(h.backing_file_size.into())
                .filter(|e| *e <= cluster_size)
                .ok_or(Error::field(
                    "backing_file_offset",
                    h.backing_file_offset,
                    "backing file name does not fit in the first cluster",
                ))?;
            let (start, end) = (to_usize(h.backing_file_offset), to_usize(end));
            let name = start
                .zip(end)
                .and_then(|(s, e)| buf.get(s..e))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            h.backing_file = Some(name);
        }

        // Tables.
        validate_table(
            "l1_table_offset",
            "l1_size",
            h.l1_table_offset,
            h.l1_size.into(),
            8,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return Err(Error::field(
                "l1_table_offset",
                0,
                "L1 table overlaps the header",
            ));
        }
        let needed = h.l1_entries_needed();
        if needed > u64::from(i32::MAX as u32) {
            return Err(Error::field("size", h.size, "image is too big"));
        }
        if u64::from(h.l1_size) < needed {
            return Err(Error::field(
                "l1_size",
                h.l1_size.into(),
                "L1 table is too small for the virtual size",
            ));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters).saturating_mul(cluster_size);
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::field(
                "refcount_table_clusters",
                h.refcount_table_clusters.into(),
                "refcount table larger than 8 MiB",
            ));
        }
        validate_table(
            "refcount_table_offset",
            "refcount_table_clusters",
            h.refcount_table_offset,
            rt_bytes / 8,
            8,
            MAX_REFCOUNT_TABLE_BYTES,
            cluster_size,
        )?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::field(
                "nb_snapshots",
                h.nb_snapshots.into(),
                "more than 65536 snapshots",
            ));
        }
        validate_table(
            "snapshots_offset",
            "nb_snapshots",
            h.snapshots_offset,
            h.nb_snapshots.into(),
            40,
            64 * 1024 * 1024,
            cluster_size,
        )?;
        Ok(h)
    }

    fn parse_extensions<E>(&mut self, buf: &[u8], start: u64, end: u64) -> Result<(), Error<E>> {
        let mut off = start;
        let mut bitmaps_seen = None;
        while off < end {
            let ext_hdr_end = off
                .checked_add(8)
                .filter(|e| *e <= end)
                .ok_or(Error::field(
                    "header extension offset",
                    off,
                    "header extension does not fit in the header area",
                ))?;
            let pos = to_usize(off).unwrap_or(usize::MAX);
            let kind = be32(buf, pos);
            let len = be32(buf, pos.saturating_add(4));
            if u64::from(len) > end - ext_hdr_end {
                return Err(Error::field(
                    "header extension length",
                    len.into(),
                    "header extension too large",
                ));
            }
            let data_start = to_usize(ext_hdr_end).unwrap_or(usize::MAX);
            let data = data_start
                .checked_add(len as usize)
                .and_then(|e| buf.get(data_start..e))
                .unwrap_or(&[]);
            match kind {
                EXT_END => return self.finish_extensions(bitmaps_seen),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(Error::field(
                            "backing format extension length",
                            len.into(),
                            "backing format name too long (must be < 16)",
                        ));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let raw = &e[2..48];
                        let n = raw.iter().position(|c| *c == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                EXT_DATA_FILE => {
                    if len > MAX_BACKING_NAME {
                        return Err(Error::field(
                            "data file extension length",
                            len.into(),
                            "external data file name longer than 1023 bytes",
                        ));
                    }
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(Error::field(
                            "encryption header extension length",
                            len.into(),
                            "must be 16",
                        ));
                    }
                    self.crypto = Some(CryptoExt {
                        offset: be64(data, 0),
                        length: be64(data, 8),
                    });
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(Error::field(
                            "bitmaps extension length",
                            len.into(),
                            "must be 24",
                        ));
                    }
                    bitmaps_seen = Some(BitmapsExt {
                        reserved: be32(data, 4),
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                _ => self.unknown_extensions.push(UnknownExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off = ext_hdr_end.saturating_add(u64::from(len).div_ceil(8) * 8);
        }
        self.finish_extensions(bitmaps_seen)
    }

    fn finish_extensions<E>(&mut self, bitmaps: Option<BitmapsExt>) -> Result<(), Error<E>> {
        let Some(b) = bitmaps else {
            return Ok(());
        };
        if self.autoclear_features & autoclear::BITMAPS == 0 {
            // Written by a program without bitmap support: the bitmaps are stale.
            self.bitmaps_inconsistent = true;
            return Ok(());
        }
        if b.reserved != 0 {
            return Err(Error::field(
                "bitmaps extension reserved field",
                b.reserved.into(),
                "must be zero",
            ));
        }
        if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
            return Err(Error::field(
                "nb_bitmaps",
                b.nb_bitmaps.into(),
                "must be between 1 and 65535",
            ));
        }
        if b.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::field(
                "bitmap_directory_size",
                b.directory_size,
                "bitmap directory too large",
            ));
        }
        if b.directory_offset % self.cluster_size() != 0 || b.directory_offset == 0 {
            return Err(Error::field(
                "bitmap_directory_offset",
                b.directory_offset,
                "not aligned to a cluster boundary",
            ));
        }
        self.bitmaps = Some(b);
        Ok(())
    }

    /// Names of the feature bits in `bits` of feature type `kind`, from the
    /// image's feature name table (bits without a name are shown as `bit N`).
    pub fn feature_names_for(&self, kind: u8, bits: u64) -> String {
        let mut out = String::new();
        for bit in 0..64u8 {
            if bits & (1u64 << bit) == 0 {
                continue;
            }
            if !out.is_empty() {
                out.push_str(", ");
            }
            match self
                .feature_names
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
            {
                Some(f) => out.push_str(&f.name),
                None => {
                    out.push_str("bit ");
                    push_decimal(&mut out, bit.into());
                }
            }
        }
        out
    }

    /// Encodes the fixed header fields (72 bytes for v2, `header_length`
    /// bytes for v3) into a new buffer. Extensions are encoded by
    /// [`Header::encode_extensions`].
    pub fn encode_fixed(&self) -> Vec<u8> {
        let len = if self.version == 2 {
            V2_HEADER_LEN as usize
        } else {
            (self.header_length as usize).max(V3_HEADER_MIN_LEN as usize)
        };
        let mut b = alloc::vec![0u8; len];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(
            &mut b,
            32,
            match self.crypt_method {
                CryptMethod::None => 0,
                CryptMethod::Aes => 1,
                CryptMethod::Luks => 2,
            },
        );
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, len as u32);
            if len > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        b
    }

    /// Encodes the header extensions (ending with the end marker).
    pub fn encode_extensions(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let mut push = |kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            let padded = align8(b.len()).unwrap_or(b.len());
            b.resize(padded, 0);
        };
        if let Some(f) = &self.backing_format {
            push(EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push(EXT_DATA_FILE, d.as_bytes());
        }
        if let Some(c) = &self.crypto {
            let mut d = [0u8; 16];
            put64(&mut d, 0, c.offset);
            put64(&mut d, 8, c.length);
            push(EXT_CRYPTO, &d);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = [0u8; 24];
            put32(&mut d, 0, bm.nb_bitmaps);
            put64(&mut d, 8, bm.directory_size);
            put64(&mut d, 16, bm.directory_offset);
            push(EXT_BITMAPS, &d);
        }
        for u in &self.unknown_extensions {
            push(u.kind, &u.data);
        }
        if !self.feature_names.is_empty() {
            let mut d = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            push(EXT_FEATURE_TABLE, &d);
        }
        push(EXT_END, &[]);
        let _ = to_u64(0);
        b
    }
}

/// Appends the decimal form of `v` to `out` (no_std, no `format!` needed).
pub(crate) fn push_decimal(out: &mut String, v: u64) {
    let mut digits = [0u8; 20];
    let mut n = v;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        out.push(char::from(*d));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::string::ToString;

    type E = Error<core::convert::Infallible>;
    type P = core::convert::Infallible;

    /// A valid v3 header for a 1 MiB image with 64 KiB clusters.
    pub(crate) fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: CryptMethod::None,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            bitmaps_inconsistent: false,
            crypto: None,
            unknown_extensions: Vec::new(),
        }
    }

    fn encode(h: &Header) -> Vec<u8> {
        let mut b = h.encode_fixed();
        b.extend(h.encode_extensions());
        b
    }

    #[test]
    fn round_trip_v3_with_extensions() {
        let mut h = sample();
        h.backing_format = Some("qcow2".into());
        h.feature_names.push(FeatureName {
            kind: 0,
            bit: 4,
            name: "extended L2 entries".into(),
        });
        h.unknown_extensions.push(UnknownExtension {
            kind: 0x1234,
            data: alloc::vec![1, 2, 3],
        });
        let b = encode(&h);
        assert_eq!(Header::parse::<P>(&b).unwrap(), h);
    }

    #[test]
    fn round_trip_v2() {
        let mut h = sample();
        h.version = 2;
        h.header_length = 72;
        let b = encode(&h);
        assert_eq!(Header::parse::<P>(&b).unwrap(), h);
    }

    #[test]
    fn rejects_bad_fields() {
        type Mutation = fn(&mut Header);
        let cases: &[(Mutation, &str)] = &[
            (|h| h.cluster_bits = 22, "invalid cluster_bits 22"),
            (|h| h.cluster_bits = 8, "invalid cluster_bits 8"),
            (|h| h.refcount_order = 7, "invalid refcount_order 7"),
            (|h| h.l1_table_offset = 0x30001, "invalid l1_table_offset"),
            (|h| h.l1_size = 0, "invalid l1_size 0"),
            (|h| h.l1_size = 5_000_000, "invalid l1_size 5000000"),
            (
                |h| h.refcount_table_clusters = 200,
                "invalid refcount_table_clusters 200",
            ),
            (|h| h.nb_snapshots = 70000, "invalid nb_snapshots 70000"),
            (
                |h| h.incompatible_features = 1 << 40,
                "unsupported incompatible features 0x10000000000",
            ),
            (|h| h.incompatible_features = incompat::EXTL2, "invalid"),
        ];
        for (mutate, want) in cases {
            let mut h = sample();
            mutate(&mut h);
            if want == &"invalid" {
                // extended L2 with 64 KiB clusters is valid
                assert!(Header::parse::<P>(&encode(&h)).is_ok());
                continue;
            }
            let err = Header::parse::<P>(&encode(&h)).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn unknown_feature_named_from_table() {
        let mut h = sample();
        h.incompatible_features = 1 << 9;
        h.feature_names.push(FeatureName {
            kind: 0,
            bit: 9,
            name: "future thing".into(),
        });
        let err = Header::parse::<P>(&encode(&h)).unwrap_err().to_string();
        assert!(err.contains("future thing"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn random_headers_never_panic(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1024), cb in 9u32..=21, version in 2u32..=3) {
            // Mostly-valid prefix so that parsing goes deep, random rest.
            if bytes.len() >= 24 {
                bytes[0..4].copy_from_slice(&MAGIC.to_be_bytes());
                bytes[4..8].copy_from_slice(&version.to_be_bytes());
                bytes[20..24].copy_from_slice(&cb.to_be_bytes());
            }
            let _ = Header::parse::<P>(&bytes);
        }

        #[test]
        fn mutated_valid_headers_never_panic(pos in 0usize..200, val: u8) {
            let mut h = sample();
            h.backing_format = Some("qcow2".into());
            let mut b = encode(&h);
            b.resize(4096, 0);
            b[pos] = val;
            if let Ok(parsed) = Header::parse::<P>(&b) {
                // Whatever is accepted re-encodes and parses the same.
                let again = Header::parse::<P>(&encode(&parsed));
                proptest::prop_assert!(again.is_ok());
            }
        }
    }

    #[test]
    fn push_decimal_works() {
        let mut s = String::new();
        push_decimal(&mut s, 0);
        s.push(' ');
        push_decimal(&mut s, u64::MAX);
        assert_eq!(s, "0 18446744073709551615");
        let _: Option<E> = None;
        assert_eq!(1.to_string(), "1");
    }
}
