//! The qcow2 header: the fixed fields, their validation against QEMU's
//! limits, and their encoding. Pure decoding and encoding, no I/O; feature
//! bits live in `features`, header extensions in `extensions`.

use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{be32, be64, put32, put64, to_usize};
use crate::error::FormatError;

mod extensions;
mod features;
#[cfg(test)]
mod tests;

pub use extensions::{
    BitmapsExt, CryptoExt, UnknownExtension, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO,
    EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE,
};
#[cfg(test)]
use features::push_decimal;
pub use features::{autoclear, compat, default_feature_names, incompat, FeatureName};

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

/// Byte offset of `refcount_table_offset`, followed by `refcount_table_clusters`.
const REFCOUNT_TABLE_FIELDS: u64 = 48;
/// Byte offset of the three feature bitmaps of a version 3 header.
const FEATURE_FIELDS: u64 = 72;

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
pub(crate) fn validate_table(
    field_offset: &'static str,
    field_size: &'static str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    let bytes = entries
        .checked_mul(entry_len)
        .filter(|b| *b <= max_bytes)
        .ok_or(FormatError::field(field_size, entries, "table too large"))?;
    if !offset.is_multiple_of(cluster_size) {
        return Err(FormatError::field(
            field_offset,
            offset,
            "not aligned to a cluster boundary",
        ));
    }
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(FormatError::field(
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

    /// Reads the fixed fields from the start of the image and validates the
    /// geometry (`cluster_bits`, `header_length`), so that the caller knows how
    /// many bytes to read for [`Header::parse`]. `buf` must hold at least 104
    /// bytes (missing bytes read as zero).
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32, FormatError> {
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::field(
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
    pub fn parse(buf: &[u8]) -> Result<Header, FormatError> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = be32(buf, 4);
        let crypt = be32(buf, 32);
        let crypt_method = match crypt {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            v => {
                return Err(FormatError::field(
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
                return Err(FormatError::field(
                    "header_length",
                    h.header_length.into(),
                    "version 3 header must be at least 104 bytes",
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(FormatError::field(
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
                        return Err(FormatError::field(
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
            return Err(FormatError::field(
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
            return Err(FormatError::field(
                "refcount_order",
                h.refcount_order.into(),
                "refcount width may not exceed 64 bits (order 6)",
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(FormatError::field(
                "cluster_bits",
                cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB (14)",
            ));
        }
        if h.data_file_raw() && !h.has_data_file() {
            return Err(FormatError::field(
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
            return Err(FormatError::UnknownIncompatibleFeatures {
                bits: unknown,
                names: h.feature_names_for(0, unknown),
            });
        }

        // Backing file name.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(FormatError::field(
                    "backing_file_size",
                    h.backing_file_size.into(),
                    "backing file name longer than 1023 bytes",
                ));
            }
            let end = h
                .backing_file_offset
                .checked_add(h.backing_file_size.into())
                .filter(|e| *e <= cluster_size)
                .ok_or(FormatError::field(
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
            return Err(FormatError::field(
                "l1_table_offset",
                0,
                "L1 table overlaps the header",
            ));
        }
        let needed = h.l1_entries_needed();
        if needed > u64::from(i32::MAX as u32) {
            return Err(FormatError::field("size", h.size, "image is too big"));
        }
        if u64::from(h.l1_size) < needed {
            return Err(FormatError::field(
                "l1_size",
                h.l1_size.into(),
                "L1 table is too small for the virtual size",
            ));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters).saturating_mul(cluster_size);
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(FormatError::field(
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
            return Err(FormatError::field(
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

    /// The header bytes that point at the refcount table
    /// (`refcount_table_offset` and `refcount_table_clusters`): their
    /// position in the image and their contents, for switching to a new
    /// table with one write.
    pub fn encode_refcount_table_fields(&self) -> (u64, [u8; 12]) {
        let mut b = [0u8; 12];
        put64(&mut b, 0, self.refcount_table_offset);
        put32(&mut b, 8, self.refcount_table_clusters);
        (REFCOUNT_TABLE_FIELDS, b)
    }

    /// The feature bitmaps (incompatible, compatible, autoclear) of a
    /// version 3 header: their position in the image and their contents.
    /// `None` for version 2, which has none.
    pub fn encode_feature_fields(&self) -> Option<(u64, [u8; 24])> {
        if self.version < 3 {
            return None;
        }
        let mut b = [0u8; 24];
        put64(&mut b, 0, self.incompatible_features);
        put64(&mut b, 8, self.compatible_features);
        put64(&mut b, 16, self.autoclear_features);
        Some((FEATURE_FIELDS, b))
    }

    /// Whether `first_bytes` (the start of a file) begin with the qcow2 magic.
    pub fn has_magic(first_bytes: &[u8]) -> bool {
        be32(first_bytes, 0) == MAGIC
    }
}
