//! Creating new images: option validation (qemu-img's rules) and the
//! initial layout (header, refcount table, refcount blocks, L1 table).

use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{put64, to_u64, to_usize};
use crate::error::Error;
use crate::error::FormatError;
use crate::header::{
    self, autoclear, compat, default_feature_names, incompat, CompressionType, CryptMethod, Header,
};
use crate::io::BlockWrite;
use crate::refcount;

/// How much of the image to allocate when creating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the metadata needed for an empty image.
    #[default]
    Off,
    /// L2 tables and refcounts for every cluster (data not written).
    Metadata,
    /// Like `Metadata`, and the file is extended to its full length.
    Falloc,
    /// Like `Metadata`, and every data cluster is written with zeros.
    Full,
}

/// Options of a new image, named after qemu-img's `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512, like qemu-img).
    pub size: u64,
    /// Cluster size in bytes (512 to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// `compat=0.10` (version 2) when false, `1.1` (version 3) when true.
    pub v3: bool,
    /// Refcount width in bits (1 to 64, a power of two).
    pub refcount_bits: u32,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Compression type for compressed clusters.
    pub compression_type: CompressionType,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format name.
    pub backing_format: Option<String>,
    /// External data file name, stored as given.
    pub data_file: Option<String>,
    /// The data file is a consistent raw image.
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Encrypt guest data with LUKS (created with
    /// [`format_with_random`]).
    pub encrypt: Option<crate::luks::LuksOptions>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            v3: true,
            refcount_bits: 16,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            lazy_refcounts: false,
            encrypt: None,
        }
    }
}

fn refuse(option: &'static str, reason: &'static str) -> FormatError {
    FormatError::InvalidOption { option, reason }
}

impl CreateOptions {
    /// Checks the combination like qemu-img does, returning the header
    /// geometry (`cluster_bits`, `refcount_order`).
    pub fn validate(&self) -> Result<(u32, u32), FormatError> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 * 1024 * 1024).contains(&cs) {
            return Err(refuse(
                "cluster_size",
                "cluster size must be a power of two between 512 and 2048k",
            ));
        }
        let cluster_bits = cs.trailing_zeros();
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(refuse(
                "refcount_bits",
                "refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if !self.v3 {
            if self.lazy_refcounts {
                return Err(refuse("lazy_refcounts", "lazy refcounts need compat=1.1"));
            }
            if rb != 16 {
                return Err(refuse(
                    "refcount_bits",
                    "refcount widths other than 16 need compat=1.1",
                ));
            }
            if self.extended_l2 {
                return Err(refuse("extended_l2", "extended L2 entries need compat=1.1"));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(refuse(
                    "compression_type",
                    "compression types other than zlib need compat=1.1",
                ));
            }
            if self.data_file.is_some() {
                return Err(refuse("data_file", "external data files need compat=1.1"));
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(refuse(
                "extended_l2",
                "extended L2 entries need a cluster size of at least 16384 bytes",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(refuse("data_file_raw", "data_file_raw requires data_file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(refuse(
                "data_file_raw",
                "a backing file and data_file_raw cannot be used at the same time",
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(refuse(
                "preallocation",
                "a backing file and preallocation can only be used together with extended_l2=on",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(refuse("backing_fmt", "backing_fmt needs backing_file"));
        }
        if let Some(b) = &self.backing_file {
            if b.len() > header::MAX_BACKING_NAME as usize {
                return Err(refuse(
                    "backing_file",
                    "backing file name longer than 1023 bytes",
                ));
            }
        }
        if let Some(f) = &self.backing_format {
            if f.len() >= 16 {
                return Err(refuse("backing_fmt", "backing format name too long"));
            }
        }
        if let Some(d) = &self.data_file {
            if d.len() > header::MAX_BACKING_NAME as usize {
                return Err(refuse("data_file", "data file name longer than 1023 bytes"));
            }
        }
        let size = self
            .rounded_size()
            .ok_or(refuse("size", "image size too large"))?;
        let l2_entries = cs / if self.extended_l2 { 16 } else { 8 };
        let l1 = size.div_ceil(l2_entries * cs);
        if l1 * 8 > header::MAX_L1_BYTES {
            return Err(refuse("size", "image size too large for the cluster size"));
        }
        if size > i64::MAX as u64 - 512 {
            return Err(refuse("size", "image size too large"));
        }
        Ok((cluster_bits, rb.trailing_zeros()))
    }

    /// The virtual size rounded up to 512 bytes.
    pub fn rounded_size(&self) -> Option<u64> {
        self.size.checked_add(511).map(|s| s & !511)
    }
}

/// Writes a new, empty image (no preallocation) to `io` and returns its
/// header. Preallocation is done afterwards through the write path. An
/// encrypted image needs random bytes: see [`format_with_random`].
pub fn format<W: BlockWrite>(io: &mut W, opts: &CreateOptions) -> Result<Header, Error<W::Error>> {
    if opts.encrypt.is_some() {
        return Err(Error::Format(refuse(
            "encrypt.format",
            "an encrypted image needs random bytes (create::format_with_random)",
        )));
    }
    format_with_random(io, opts, &mut |_| {})
}

/// [`format`], with `random` filling buffers with random bytes for an
/// encrypted image's LUKS header (master key, salts, UUID, key material),
/// which is placed after the L1 table, as QEMU places it.
pub fn format_with_random<W: BlockWrite>(
    io: &mut W,
    opts: &CreateOptions,
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<Header, Error<W::Error>> {
    let (cluster_bits, refcount_order) = opts.validate()?;
    let luks = match &opts.encrypt {
        Some(e) => Some(e.build(random)?),
        None => None,
    };
    let cs = 1u64 << cluster_bits;
    let size = opts.rounded_size().unwrap_or(0);
    let l2_entries = cs / if opts.extended_l2 { 16 } else { 8 };
    let l1_size = size.div_ceil(l2_entries * cs);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let per_block = refcount::block_entries(cluster_bits, refcount_order);

    // Layout: header, refcount table, refcount blocks, L1 table, LUKS
    // header. Grow the table and block counts until they cover everything
    // they describe.
    let luks_clusters = luks.as_ref().map_or(0, |l| to_u64(l.len()).div_ceil(cs));
    let mut table_clusters = 1u64;
    let mut blocks = 1u64;
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters + luks_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks <= blocks && need_table <= table_clusters {
            break;
        }
        blocks = blocks.max(need_blocks);
        table_clusters = table_clusters.max(need_table);
    }
    let rt_offset = cs;
    let blocks_offset = rt_offset + table_clusters * cs;
    let l1_offset = blocks_offset + blocks * cs;
    let luks_offset = l1_offset + l1_clusters * cs;
    let used = 1 + table_clusters + blocks + l1_clusters + luks_clusters;

    let mut incompatible = 0;
    let mut autoclear_bits = 0;
    if opts.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    if opts.compression_type != CompressionType::Zlib {
        incompatible |= incompat::COMPRESSION;
    }
    if opts.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    if opts.data_file_raw {
        autoclear_bits |= autoclear::DATA_FILE_RAW;
    }
    let mut h = Header {
        version: if opts.v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: if luks.is_some() {
            CryptMethod::Luks
        } else {
            CryptMethod::None
        },
        l1_size: u32::try_from(l1_size).map_err(|_| refuse("size", "image size too large"))?,
        l1_table_offset: if l1_size > 0 { l1_offset } else { 0 },
        refcount_table_offset: rt_offset,
        refcount_table_clusters: u32::try_from(table_clusters).unwrap_or(u32::MAX),
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if opts.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: autoclear_bits,
        refcount_order,
        header_length: if opts.v3 { 112 } else { header::V2_HEADER_LEN },
        compression_type: opts.compression_type,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        feature_names: if opts.v3 {
            default_feature_names()
        } else {
            Vec::new()
        },
        bitmaps: None,
        bitmaps_inconsistent: false,
        crypto: luks.as_ref().map(|l| header::CryptoExt {
            offset: luks_offset,
            length: to_u64(l.len()),
        }),
        unknown_extensions: Vec::new(),
    };
    let first = encode_header_cluster(&mut h)?;

    // Refcount table and blocks: clusters 0..used have refcount 1.
    let mut table = alloc::vec![0u8; to_usize(table_clusters * cs).unwrap_or(0)];
    for b in 0..blocks {
        put64(
            &mut table,
            to_usize(b * 8).unwrap_or(0),
            blocks_offset + b * cs,
        );
    }
    let mut block_bytes = alloc::vec![0u8; to_usize(blocks * cs).unwrap_or(0)];
    for c in 0..used {
        let blk = c / per_block;
        let start = to_usize(blk * cs).unwrap_or(0);
        let end = to_usize((blk + 1) * cs).unwrap_or(0);
        refcount::set(
            &mut block_bytes[start..end],
            refcount_order,
            c % per_block,
            1,
        );
    }
    io.write_at(rt_offset, &table).map_err(Error::Io)?;
    io.write_at(blocks_offset, &block_bytes)
        .map_err(Error::Io)?;
    if l1_size > 0 {
        let l1 = alloc::vec![0u8; to_usize(l1_size * 8).unwrap_or(0)];
        io.write_at(l1_offset, &l1).map_err(Error::Io)?;
    }
    if let Some(l) = &luks {
        // Whole clusters (zeros after the header's length, as QEMU's).
        let mut padded = l.clone();
        padded.resize(to_usize(luks_clusters * cs).unwrap_or(0), 0);
        io.write_at(luks_offset, &padded).map_err(Error::Io)?;
    }
    io.flush().map_err(Error::Io)?;
    // The header last: until it is written the file is not an image.
    io.write_at(0, &first).map_err(Error::Io)?;
    io.flush().map_err(Error::Io)?;
    Ok(h)
}

/// Encodes the first cluster's contents: header, extensions and backing
/// file name (which is placed after the extensions, updating the header's
/// `backing_file_offset`/`backing_file_size`).
pub fn encode_header_cluster(h: &mut Header) -> Result<Vec<u8>, FormatError> {
    let out = encode_header_cluster_as_is(h);
    if out.is_err() && !h.feature_names.is_empty() {
        // Like QEMU, leave out the (optional) feature name table when the
        // header would not fit in the first cluster otherwise.
        h.feature_names.clear();
        return encode_header_cluster_as_is(h);
    }
    out
}

fn encode_header_cluster_as_is(h: &mut Header) -> Result<Vec<u8>, FormatError> {
    let cs = h.cluster_size();
    let ext = h.encode_extensions();
    let fixed_len = h.encode_fixed().len();
    let name = h.backing_file.clone().unwrap_or_default();
    let name_off = fixed_len + ext.len();
    if h.backing_file.is_some() {
        h.backing_file_offset = to_u64(name_off);
        h.backing_file_size = u32::try_from(name.len()).unwrap_or(u32::MAX);
    } else {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    }
    let mut out = h.encode_fixed();
    out.extend_from_slice(&ext);
    out.extend_from_slice(name.as_bytes());
    if to_u64(out.len()) > cs {
        return Err(refuse(
            "backing_file",
            "header, extensions and backing file name do not fit in the first cluster",
        ));
    }
    Ok(out)
}
