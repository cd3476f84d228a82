//! The image opened for reading: its state, open options and accessors.
//! Opening lives in `open`, mapping guest ranges in `mapping`, reading
//! guest data in `read`. Writing is a separate type
//! ([`crate::WritableImage`]) that exists only when an image is opened for
//! writing.

use alloc::string::String;
use alloc::vec::Vec;

use crate::backing::Opener;
use crate::bitmap::Bitmap;
use crate::cache::TableCache;
use crate::compress;
use crate::error::Error;
use crate::header::Header;
use crate::io::BlockRead;
use crate::l2::EntryFormat;
use crate::rctable::Refcounts;
use crate::snapshot::Snapshot;

mod mapping;
mod open;
mod read;

pub use mapping::Run;
pub use read::{Chunk, Extent, Source};

/// QEMU's default cap on the L2 cache (32 MiB).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 * 1024 * 1024;
/// Default limit on the depth of a backing chain.
pub const DEFAULT_MAX_CHAIN_DEPTH: u32 = 64;

/// Options for opening an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// L2 cache budget in bytes. `None`: enough to cover the whole image,
    /// capped at 32 MiB (QEMU's default). At least one L2 table is cached.
    pub l2_cache_bytes: Option<u64>,
    /// Bytes of an L2 table read and cached at a time (a power of two, at
    /// least 16, at most the cluster size). `None`: whole tables, unless
    /// `l2_cache_bytes` is smaller than a cluster, in which case slices of
    /// that budget are used (frugal mode for small heaps). Like QEMU's
    /// `l2-cache-entry-size`. Writing always uses whole tables.
    pub l2_slice_bytes: Option<u64>,
    /// Refcount block cache budget in bytes. `None`: a quarter of the L2
    /// cache (QEMU's ratio), at least one block.
    pub refcount_cache_bytes: Option<u64>,
    /// Do not open the backing file: unallocated clusters read as zeros
    /// (like QEMU's `BDRV_O_NO_BACKING`, used by `qemu-img info`).
    pub no_backing: bool,
    /// Maximum depth of the backing chain below this image.
    pub max_chain_depth: u32,
    /// Do not open the external data file (metadata-only work such as
    /// `info`); reading data that lives there then fails.
    pub no_data_file: bool,
    /// Open for a consistency check: accept images without a refcount
    /// table (QEMU's check mode), so that the check can report them.
    pub check_mode: bool,
    /// The passphrase of an encrypted image (LUKS or the legacy AES
    /// method). Without it an encrypted image opens for its metadata only
    /// (info, check, map); reading its data fails.
    pub passphrase: Option<crate::luks::Secret>,
    /// Passphrases of encrypted backing files, by the name the image
    /// naming them stores (or their resolved name); an empty name stands
    /// for the image's own backing file.
    pub backing_passphrases: Vec<(String, crate::luks::Secret)>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            l2_cache_bytes: None,
            l2_slice_bytes: None,
            refcount_cache_bytes: None,
            no_backing: false,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            no_data_file: false,
            check_mode: false,
            passphrase: None,
            backing_passphrases: Vec::new(),
        }
    }
}

/// What a guest range holds at one layer of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Data stored uncompressed at `host_offset` (contiguous for the whole run).
    Data {
        /// Host offset of the run's first byte.
        host_offset: u64,
        /// True when the data lives in the external data file.
        external: bool,
    },
    /// Reads as zeros at this layer.
    Zero {
        /// Host offset of a preallocated cluster, if any.
        host_offset: Option<u64>,
    },
    /// Not allocated at this layer: read from the backing file (zeros without one).
    Unallocated {
        /// Host offset of the (extended L2) cluster whose subcluster is unallocated.
        host_offset: Option<u64>,
    },
    /// Inside one compressed cluster.
    Compressed {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// Upper bound of the compressed data's length.
        size: u64,
        /// Guest offset of the start of the cluster.
        cluster_start: u64,
    },
}

/// A host's codec, held by an [`Image`].
pub(crate) struct HostCodec(pub(crate) alloc::boxed::Box<dyn compress::Codec + Send>);

impl core::fmt::Debug for HostCodec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HostCodec")
    }
}

/// A qcow2 image opened for reading.
#[derive(Debug)]
pub struct Image<R: BlockRead> {
    pub(crate) io: R,
    pub(crate) header: Header,
    pub(crate) fmt: EntryFormat,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2_cache: TableCache,
    /// Bytes of an L2 table cached at a time (the cluster size unless frugal).
    pub(crate) l2_slice: u64,
    pub(crate) data_file: Option<R>,
    pub(crate) backing: Option<Backing<R>>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) snapshot_table_len: u64,
    pub(crate) bitmaps: Vec<Bitmap>,
    pub(crate) file_len: u64,
    pub(crate) name: String,
    pub(crate) decompressed: Option<(u64, Vec<u8>)>,
    pub(crate) decompressor: compress::Decompressor,
    /// A host's codec for reads (see [`Image::set_codec`]).
    pub(crate) codec: Option<HostCodec>,
    /// Refcount blocks a writer may cache (from the open options).
    pub(crate) refcount_cache_blocks: usize,
    /// How guest data is encrypted, if it is.
    pub(crate) crypt: Crypt,
    /// The LUKS header of a LUKS-encrypted image (read with or without
    /// the passphrase).
    pub(crate) luks: Option<crate::luks::LuksHeader>,
    metadata_prealloc: Option<bool>,
    /// Reused buffers of the read path.
    extent_scratch: Vec<Extent>,
    run_scratch: Vec<Run>,
    input_scratch: Vec<u8>,
}

pub(crate) type Res<T, R> = Result<T, Error<<R as BlockRead>::Error>>;

/// How an image's guest data is encrypted.
#[derive(Debug, Clone)]
pub(crate) enum Crypt {
    /// Not encrypted.
    None,
    /// Encrypted, opened without its passphrase (`"aes"` or `"luks"`):
    /// metadata only.
    Locked(&'static str),
    /// Encrypted, unlocked: data sectors go through the cipher, numbered by
    /// their host offset (LUKS) or their guest offset (legacy AES).
    Open {
        cipher: alloc::boxed::Box<crate::luks::SectorCipher>,
        host_sectors: bool,
    },
}

impl Crypt {
    /// Reads `dst.len()` bytes of guest data at `host` in `io` (guest
    /// offset `guest`), decrypted: whole sectors are read (and the part
    /// asked for copied out).
    pub(crate) fn read<R: BlockRead>(
        &self,
        io: &mut R,
        host: u64,
        guest: u64,
        dst: &mut [u8],
    ) -> Result<(), Error<R::Error>> {
        let (cipher, host_sectors) = match self {
            Crypt::None => return io.read_at(host, dst).map_err(Error::Io),
            Crypt::Locked(method) => return Err(Error::Encrypted { method }),
            Crypt::Open {
                cipher,
                host_sectors,
            } => (cipher, *host_sectors),
        };
        let sector = crate::luks::SECTOR as u64;
        let len = crate::bytes::to_u64(dst.len());
        let start = host - host % sector;
        let end = (host + len).div_ceil(sector) * sector;
        let first = if host_sectors {
            start
        } else {
            guest - host % sector
        } / sector;
        if start == host && end == host + len {
            io.read_at(host, dst).map_err(Error::Io)?;
            cipher.decrypt(first, dst);
            return Ok(());
        }
        let mut tmp = crate::heap::zeroed(end - start, "a decryption buffer")?;
        io.read_at(start, &mut tmp).map_err(Error::Io)?;
        cipher.decrypt(first, &mut tmp);
        let skip = crate::bytes::to_usize(host - start).unwrap_or(0);
        dst.copy_from_slice(&tmp[skip..skip + dst.len()]);
        Ok(())
    }

    /// Whether data is encrypted (unlocked or not).
    pub(crate) fn is_some(&self) -> bool {
        !matches!(self, Crypt::None)
    }
}

impl<R: BlockRead> Image<R> {
    /// Opens a standalone image: fails if it needs a backing file (unless
    /// `opts.no_backing`) or an external data file, since there is no opener.
    pub fn open(io: R, opts: &OpenOptions) -> Res<Self, R> {
        Self::open_inner(io, String::new(), None, opts, &mut Vec::new())
    }

    /// Opens an image named `name`, opening its backing chain and external
    /// data file through `opener`. `identity` identifies the file for loop
    /// detection.
    pub fn open_with(
        io: R,
        name: &str,
        identity: &str,
        opener: &mut dyn Opener<R>,
        opts: &OpenOptions,
    ) -> Res<Self, R> {
        let mut seen = alloc::vec![String::from(identity)];
        Self::open_inner(io, String::from(name), Some(opener), opts, &mut seen)
    }

    /// The LUKS header of a LUKS-encrypted image (its algorithms, key
    /// slots and iterations; no secret).
    pub fn luks_header(&self) -> Option<&crate::luks::LuksHeader> {
        self.luks.as_ref()
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The resolved name this image was opened under (empty for [`Image::open`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length of the image file in bytes at open time.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The backing layer, if one was opened.
    pub fn backing(&self) -> Option<&Backing<R>> {
        self.backing.as_ref()
    }

    /// The backing layer, mutable.
    pub fn backing_mut(&mut self) -> Option<&mut Backing<R>> {
        self.backing.as_mut()
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The persistent bitmaps (empty when the extension is absent or stale).
    pub fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }

    /// The active L1 table.
    pub fn l1_table(&self) -> &[u64] {
        &self.l1
    }

    /// Number of L2 tables the cache may hold.
    pub fn l2_cache_capacity(&self) -> usize {
        self.l2_cache.capacity()
    }

    /// Number of L2 tables held by the cache now (dirty ones included).
    pub fn l2_cache_len(&self) -> usize {
        self.l2_cache.len()
    }

    /// Number of L2 tables read from storage so far.
    pub fn l2_cache_misses(&self) -> u64 {
        self.l2_cache.misses
    }

    /// Gives the storage back.
    pub fn into_inner(self) -> R {
        self.io
    }

    /// Bytes the image file occupies on its storage, when the storage can
    /// tell (e.g. `st_blocks * 512`); `None` otherwise.
    pub fn allocated_size(&mut self) -> Res<Option<u64>, R> {
        self.io.allocated_size().map_err(Error::Io)
    }

    /// Length of the image file's storage now (it grows as a writer
    /// allocates).
    pub fn storage_len(&mut self) -> Res<u64, R> {
        self.io.len().map_err(Error::Io)
    }

    /// Decodes compressed clusters read with [`Image::read_at`] through
    /// `codec` (and its [`compress::Codec::decompress_many`], which a host
    /// may spread over threads) instead of the core's no_std decoders. The
    /// std host plugs in its native codec this way.
    pub fn set_codec(&mut self, codec: alloc::boxed::Box<dyn compress::Codec + Send>) {
        self.codec = Some(HostCodec(codec));
    }

    /// Reads the disk as internal snapshot `id_or_name` saved it (its ID
    /// first, else its name; `qemu-img convert -l`): its L1 table replaces
    /// the active one in this read-only view. The disk keeps its current
    /// size, as in qemu-img (what the snapshot's table does not cover reads
    /// as zeros). Returns false when there is no such snapshot.
    pub fn load_snapshot(&mut self, id_or_name: &str) -> Res<bool, R> {
        let Some(index) = self.find_snapshot(id_or_name) else {
            return Ok(false);
        };
        self.l1 = self.snapshot_l1(index, self.file_len)?;
        self.l2_cache = crate::cache::TableCache::new(self.l2_cache.capacity());
        self.invalidate_decompressed();
        Ok(true)
    }

    /// The snapshot with ID `id_or_name`, else the first one with that
    /// name (QEMU's lookup).
    pub(crate) fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        let by = |f: &dyn Fn(&crate::snapshot::Snapshot) -> bool| self.snapshots.iter().position(f);
        by(&|s| s.id == id_or_name).or_else(|| by(&|s| s.name == id_or_name))
    }

    /// The L1 table of snapshot `index`, read after checking it is
    /// cluster-aligned, within QEMU's size limit and inside a file of
    /// `file_len` bytes.
    pub(crate) fn snapshot_l1(&mut self, index: usize, file_len: u64) -> Res<Vec<u64>, R> {
        let sn = self
            .snapshots
            .get(index)
            .ok_or(Error::Internal("snapshot index"))?;
        let (offset, entries) = (sn.l1_table_offset, sn.l1_size);
        let bytes = u64::from(entries) * 8;
        let cs = self.cluster_size();
        if bytes > crate::header::MAX_L1_BYTES
            || (bytes > 0 && (offset % cs != 0 || offset == 0))
            || offset.saturating_add(bytes) > file_len
        {
            return Err(Error::corrupt(
                "snapshot L1 table offset or size invalid",
                offset,
                u64::from(entries),
            ));
        }
        let mut raw = crate::heap::zeroed(bytes, "a snapshot's L1 table")?;
        self.io.read_at(offset, &mut raw).map_err(Error::Io)?;
        crate::heap::entries(&raw, "a snapshot's L1 table")
    }

    /// The image file's storage.
    pub fn storage(&self) -> &R {
        &self.io
    }

    /// Whether the image looks preallocated with `preallocation=metadata`
    /// (QEMU's heuristic: clearly more clusters in use per the refcounts than
    /// the file really occupies). Such images' data ranges are checked for
    /// holes by [`Image::block_status`], as QEMU does.
    pub fn metadata_preallocated(&mut self) -> Res<bool, R> {
        if let Some(v) = self.metadata_prealloc {
            return Ok(v);
        }
        let cs = self.cluster_size();
        let v = match self.io.allocated_size().map_err(Error::Io)? {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters + 2);
                let end = self.file_len.div_ceil(cs);
                let mut refcounts = Refcounts::load(&mut self.io, &self.header, 1)?;
                let mut used = 0u64;
                let mut i = 0u64;
                while i < end && used < threshold {
                    if refcounts.get(&mut self.io, i)? > 0 {
                        used += 1;
                    }
                    i += 1;
                }
                used >= threshold
            }
        };
        self.metadata_prealloc = Some(v);
        Ok(v)
    }
}

/// The layer below an image: another qcow2 image or a raw file.
#[derive(Debug)]
pub enum Backing<R: BlockRead> {
    /// A qcow2 backing image (with its own chain).
    Qcow2(alloc::boxed::Box<Image<R>>),
    /// A raw backing file.
    Raw {
        /// The storage.
        io: R,
        /// Its length in bytes (its virtual size).
        size: u64,
        /// Its resolved name.
        name: String,
    },
}

impl<R: BlockRead> Backing<R> {
    /// Virtual size of the backing layer.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Resolved name of the backing layer.
    pub fn name(&self) -> &str {
        match self {
            Backing::Qcow2(img) => img.name(),
            Backing::Raw { name, .. } => name,
        }
    }

    /// Format name (`qcow2` or `raw`).
    pub fn format(&self) -> &'static str {
        match self {
            Backing::Qcow2(_) => "qcow2",
            Backing::Raw { .. } => "raw",
        }
    }
}
