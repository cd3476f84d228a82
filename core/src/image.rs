//! The image: open (with validation), mapping queries and reads.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use crate::backing::{Backing, FileRole, Opener};
use crate::bitmap::{self, Bitmap};
use crate::bytes::{be64, to_u64, to_usize};
use crate::cache::TableCache;
use crate::compress;
use crate::header::{self, CryptMethod, Header};
use crate::l2::{self, EntryFormat, Subcluster};
use crate::snapshot::{self, Snapshot};
use crate::{BlockRead, Error};

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
    backing: Option<Backing<R>>,
    snapshots: Vec<Snapshot>,
    pub(crate) snapshot_table_len: u64,
    bitmaps: Vec<Bitmap>,
    pub(crate) file_len: u64,
    name: String,
    decompressed: Option<(u64, Vec<u8>)>,
    decompressor: compress::Decompressor,
    pub(crate) refcounts: crate::rctable::Refcounts,
    pub(crate) metadata_prealloc: Option<bool>,
    pub(crate) writer: crate::write::Writer,
}

type Res<T, R> = Result<T, Error<<R as BlockRead>::Error>>;

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

    fn open_inner(
        mut io: R,
        name: String,
        mut opener: Option<&mut dyn Opener<R>>,
        opts: &OpenOptions,
        seen: &mut Vec<String>,
    ) -> Res<Self, R> {
        let file_len = io.len().map_err(Error::Io)?;
        let mut first = [0u8; 112];
        io.read_at(0, &mut first).map_err(Error::Io)?;
        let cluster_bits = Header::peek_cluster_bits(&first)?;
        let cluster_size = 1u64 << cluster_bits;
        // Read a small prefix first (frugal heaps); the whole first cluster
        // only when the extensions or the backing name reach beyond it.
        let mut buf = alloc::vec![0u8; to_usize(cluster_size.min(4096)).unwrap_or(0)];
        io.read_at(0, &mut buf).map_err(Error::Io)?;
        if !Header::fits_in(&buf) && to_u64(buf.len()) < cluster_size {
            buf = alloc::vec![0u8; to_usize(cluster_size).unwrap_or(0)];
            io.read_at(0, &mut buf).map_err(Error::Io)?;
        }
        let header = Header::parse(&buf)?;
        drop(buf);
        if header.refcount_table_clusters == 0 && !opts.check_mode {
            return Err(Error::field(
                "refcount_table_clusters",
                0,
                "image does not contain a reference count table",
            ));
        }
        match header.crypt_method {
            CryptMethod::None => {}
            CryptMethod::Aes => return Err(Error::Encrypted { method: "aes" }),
            CryptMethod::Luks => return Err(Error::Encrypted { method: "luks" }),
        }
        let fmt = EntryFormat {
            cluster_bits,
            extended: header.extended_l2(),
            data_file: header.has_data_file(),
        };

        // L1 table (size validated against QEMU's 32 MiB limit).
        let l1_len = to_usize(header.l1_size.into()).unwrap_or(0);
        let mut raw = alloc::vec![0u8; l1_len * 8];
        io.read_at(header.l1_table_offset, &mut raw)
            .map_err(Error::Io)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        drop(raw);

        let l2_cache_bytes = opts.l2_cache_bytes.unwrap_or_else(|| {
            let tables = header.size.div_ceil(header.l2_coverage());
            tables
                .saturating_mul(cluster_size)
                .min(DEFAULT_L2_CACHE_MAX)
        });
        let entry_size = fmt.entry_size() as u64;
        let l2_slice = match opts.l2_slice_bytes {
            Some(b) => b,
            None if l2_cache_bytes < cluster_size => l2_cache_bytes.max(entry_size),
            None => cluster_size,
        };
        // A power of two between one entry and one cluster.
        let l2_slice = (1u64 << (63 - l2_slice.max(entry_size).leading_zeros())).min(cluster_size);
        let capacity = to_usize(l2_cache_bytes / l2_slice).unwrap_or(usize::MAX);
        let rc_bytes = opts.refcount_cache_bytes.unwrap_or(l2_cache_bytes / 4);
        let rc_capacity = to_usize(rc_bytes / cluster_size).unwrap_or(usize::MAX);

        let (snapshots, snapshot_table_len) = read_snapshots(&mut io, &header)?;
        let bitmaps = read_bitmaps(&mut io, &header)?;

        let data_file = if header.has_data_file() && !opts.no_data_file {
            let df_name = header.data_file.clone().ok_or(Error::MissingDataFile)?;
            let op = opener.as_deref_mut().ok_or(Error::MissingDataFile)?;
            let opened = op
                .open(&name, &df_name, FileRole::DataFile)
                .map_err(|source| Error::Open {
                    name: df_name.clone(),
                    source,
                })?;
            Some(opened.io)
        } else {
            None
        };

        let backing = match (&header.backing_file, opts.no_backing) {
            (Some(bname), false) => {
                let op = opener.ok_or_else(|| Error::BackingNotAllowed {
                    name: bname.clone(),
                })?;
                let depth = u32::try_from(seen.len()).unwrap_or(u32::MAX);
                if depth > opts.max_chain_depth {
                    return Err(Error::BackingTooDeep {
                        limit: opts.max_chain_depth,
                    });
                }
                let opened =
                    op.open(&name, bname, FileRole::Backing)
                        .map_err(|source| Error::Open {
                            name: bname.clone(),
                            source,
                        })?;
                if seen.contains(&opened.identity) {
                    return Err(Error::BackingLoop {
                        name: opened.resolved,
                    });
                }
                seen.push(opened.identity.clone());
                let resolved = opened.resolved.clone();
                let b = open_backing(opened.io, opened.resolved, &header, op, opts, seen).map_err(
                    |e| match e {
                        e @ (Error::BackingLoop { .. } | Error::BackingTooDeep { .. }) => e,
                        e => Error::Backing {
                            name: resolved,
                            source: Box::new(e),
                        },
                    },
                )?;
                Some(b)
            }
            _ => None,
        };

        Ok(Image {
            io,
            fmt,
            l1,
            l2_cache: TableCache::new(capacity),
            l2_slice,
            data_file,
            backing,
            snapshots,
            snapshot_table_len,
            bitmaps,
            file_len,
            name,
            decompressed: None,
            decompressor: compress::Decompressor::default(),
            refcounts: crate::rctable::Refcounts::new(rc_capacity),
            metadata_prealloc: None,
            writer: crate::write::Writer::default(),
            header,
        })
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

    /// Number of refcount blocks held by the cache now.
    pub fn refcount_cache_len(&self) -> usize {
        self.refcounts.blocks.len()
    }

    /// Number of L2 tables read from storage so far.
    pub fn l2_cache_misses(&self) -> u64 {
        self.l2_cache.misses
    }

    /// Gives the storage back.
    pub fn into_inner(self) -> R {
        self.io
    }

    /// Mutable access to the image file's storage.
    pub fn io_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// Mutable access to the external data file's storage, if any.
    pub fn data_file_mut(&mut self) -> Option<&mut R> {
        self.data_file.as_mut()
    }

    /// Says what the guest range starting at `offset` holds at this layer
    /// (not looking into the backing file), for up to `max_len` bytes.
    /// Returns the mapping and the length of the run it covers (at least 1
    /// byte when `max_len > 0` and `offset` is inside the disk; 0 otherwise).
    pub fn map_shallow(&mut self, offset: u64, max_len: u64) -> Res<(Mapping, u64), R> {
        let size = self.header.size;
        if offset >= size || max_len == 0 {
            return Ok((Mapping::Unallocated { host_offset: None }, 0));
        }
        let cb = self.fmt.cluster_bits;
        let l2_entries = self.header.l2_entries();
        let coverage_bits = cb + l2_entries.trailing_zeros();
        let l1_index = offset >> coverage_bits;
        let coverage_end = (l1_index + 1)
            .checked_shl(coverage_bits)
            .unwrap_or(u64::MAX);
        let limit = offset.saturating_add(max_len).min(size).min(coverage_end);
        let unalloc = Mapping::Unallocated { host_offset: None };
        let Some(&l1e) = to_usize(l1_index).and_then(|i| self.l1.get(i)) else {
            return Ok((unalloc, limit - offset));
        };
        let l2_offset = l2::l1_offset(l1e);
        if l2_offset == 0 {
            return Ok((unalloc, limit - offset));
        }
        let cluster_size = 1u64 << cb;
        if l2_offset & (cluster_size - 1) != 0 {
            return Err(Error::corrupt(
                "L1 entry points to an unaligned L2 table",
                offset,
                l2_offset,
            ));
        }
        let fmt = self.fmt;
        let entry_size = fmt.entry_size();
        // Which slice of the table holds the entry (the whole table unless frugal).
        let slice = self.l2_slice;
        let slice_entries = slice / entry_size as u64;
        let slice_bits = cb + slice_entries.trailing_zeros();
        let first_idx = (offset >> cb) & (l2_entries - 1);
        let slice_off = l2_offset + (first_idx / slice_entries) * slice;
        let slice_end = ((offset >> slice_bits) + 1)
            .checked_shl(slice_bits)
            .unwrap_or(u64::MAX);
        let limit = limit.min(slice_end);
        let table = self.l2_cache.get(&mut self.io, slice_off, slice)?;
        let sc_bits = if fmt.extended { cb - 5 } else { cb };
        let classify = |pos: u64| -> Result<(Subcluster, u64), Error<R::Error>> {
            let idx = to_usize((pos >> cb) & (slice_entries - 1)).unwrap_or(0);
            let at = idx * entry_size;
            let entry = be64(table, at);
            let bitmap = if fmt.extended { be64(table, at + 8) } else { 0 };
            let sc = u32::try_from((pos >> sc_bits) & 31).unwrap_or(0);
            let sub = fmt
                .subcluster(entry, bitmap, sc)
                .map_err(|e| Error::corrupt(e.what(), pos, e.value()))?;
            // End of this subcluster (or cluster).
            let end = ((pos >> sc_bits) + 1) << sc_bits;
            Ok((sub, end))
        };
        let in_cluster = |pos: u64| pos & (cluster_size - 1);
        let (first, mut end) = classify(offset)?;
        let mapping = match first {
            Subcluster::Unallocated => unalloc,
            Subcluster::Zero => Mapping::Zero { host_offset: None },
            Subcluster::UnallocatedAlloc { host } => Mapping::Unallocated {
                host_offset: Some(host + in_cluster(offset)),
            },
            Subcluster::ZeroAlloc { host } => Mapping::Zero {
                host_offset: Some(host + in_cluster(offset)),
            },
            Subcluster::Normal { host } => {
                if fmt.data_file && host != offset & !(cluster_size - 1) {
                    return Err(Error::corrupt(
                        "external data file offset does not match the guest offset",
                        offset,
                        host,
                    ));
                }
                Mapping::Data {
                    host_offset: host + in_cluster(offset),
                    external: fmt.data_file,
                }
            }
            Subcluster::Compressed(d) => {
                if fmt.data_file {
                    return Err(Error::corrupt(
                        "compressed cluster in an image with an external data file",
                        offset,
                        d.offset,
                    ));
                }
                let cluster_end = (offset | (cluster_size - 1)).saturating_add(1);
                return Ok((
                    Mapping::Compressed {
                        host_offset: d.offset,
                        size: d.size,
                        cluster_start: offset & !(cluster_size - 1),
                    },
                    cluster_end.min(limit) - offset,
                ));
            }
        };
        // Extend the run while the following subclusters continue it.
        while end < limit {
            let (next, next_end) = classify(end)?;
            let expected = |host: Option<u64>| host.map(|h| h + (end - offset));
            let continues = match (mapping, next) {
                (Mapping::Unallocated { host_offset: None }, Subcluster::Unallocated) => true,
                (Mapping::Zero { host_offset: None }, Subcluster::Zero) => true,
                (
                    Mapping::Unallocated {
                        host_offset: h @ Some(_),
                    },
                    Subcluster::UnallocatedAlloc { host },
                )
                | (
                    Mapping::Zero {
                        host_offset: h @ Some(_),
                    },
                    Subcluster::ZeroAlloc { host },
                ) => expected(h) == Some(host + in_cluster(end)),
                (Mapping::Data { host_offset, .. }, Subcluster::Normal { host }) => {
                    expected(Some(host_offset)) == Some(host + in_cluster(end))
                        && !(fmt.data_file && host != end & !(cluster_size - 1))
                }
                _ => false,
            };
            if !continues {
                break;
            }
            end = next_end;
        }
        Ok((mapping, end.min(limit) - offset))
    }

    /// Reads `buf.len()` guest bytes at `offset`, following the backing chain.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Res<(), R> {
        let len = to_u64(buf.len());
        let size = self.header.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + to_u64(done);
            let remaining = to_u64(buf.len() - done);
            let (mapping, run) = self.map_shallow(pos, remaining)?;
            let run_usize = to_usize(run).unwrap_or(0).min(buf.len() - done);
            if run_usize == 0 {
                return Err(Error::Internal("mapping made no progress"));
            }
            let out = &mut buf[done..done + run_usize];
            match mapping {
                Mapping::Data {
                    host_offset,
                    external,
                } => {
                    let io = if external {
                        self.data_file.as_mut().ok_or(Error::MissingDataFile)?
                    } else {
                        &mut self.io
                    };
                    io.read_at(host_offset, out).map_err(Error::Io)?;
                }
                Mapping::Zero { .. } => out.fill(0),
                Mapping::Unallocated { .. } => read_backing(self.backing.as_mut(), pos, out)?,
                Mapping::Compressed {
                    host_offset,
                    size,
                    cluster_start,
                } => {
                    let cluster = self.decompress(host_offset, size)?;
                    let skip = to_usize(pos - cluster_start).unwrap_or(0);
                    let src = cluster.get(skip..skip + out.len()).ok_or(Error::corrupt(
                        "compressed read outside the cluster",
                        pos,
                        host_offset,
                    ))?;
                    out.copy_from_slice(src);
                }
            }
            done += run_usize;
        }
        Ok(())
    }

    /// Forgets the cached decompressed cluster (its host space may be reused).
    pub(crate) fn invalidate_decompressed(&mut self) {
        self.decompressed = None;
    }

    /// Decompresses the cluster at `host_offset` (caching the last one).
    fn decompress(&mut self, host_offset: u64, size: u64) -> Res<&[u8], R> {
        let hit = matches!(&self.decompressed, Some((o, _)) if *o == host_offset);
        if !hit {
            let cluster_size = to_usize(self.cluster_size()).unwrap_or(0);
            let mut input = alloc::vec![0u8; to_usize(size).unwrap_or(0)];
            self.io
                .read_at(host_offset, &mut input)
                .map_err(Error::Io)?;
            let mut out = match self.decompressed.take() {
                Some((_, mut b)) => {
                    b.resize(cluster_size, 0);
                    b
                }
                None => alloc::vec![0u8; cluster_size],
            };
            self.decompressor
                .decompress(self.header.compression_type, &input, &mut out)
                .map_err(|reason| Error::Decompress {
                    host_offset,
                    reason,
                })?;
            self.decompressed = Some((host_offset, out));
        }
        match &self.decompressed {
            Some((_, b)) => Ok(b),
            None => Err(Error::Internal("decompression cache lost")),
        }
    }
}

/// Reads guest bytes from the backing layer, zeros past its end or without one.
fn read_backing<R: BlockRead>(
    backing: Option<&mut Backing<R>>,
    pos: u64,
    out: &mut [u8],
) -> Res<(), R> {
    let Some(b) = backing else {
        out.fill(0);
        return Ok(());
    };
    let bsize = b.size();
    let avail = to_usize(bsize.saturating_sub(pos))
        .unwrap_or(usize::MAX)
        .min(out.len());
    let (inside, past) = out.split_at_mut(avail);
    past.fill(0);
    if inside.is_empty() {
        return Ok(());
    }
    match b {
        Backing::Qcow2(img) => {
            let name = String::from(img.name());
            img.read_at(pos, inside).map_err(|e| Error::Backing {
                name,
                source: Box::new(e),
            })
        }
        Backing::Raw { io, .. } => io.read_at(pos, inside).map_err(Error::Io),
    }
}

fn open_backing<R: BlockRead>(
    mut io: R,
    name: String,
    parent: &Header,
    opener: &mut dyn Opener<R>,
    opts: &OpenOptions,
    seen: &mut Vec<String>,
) -> Res<Backing<R>, R> {
    let is_qcow2 = match parent.backing_format.as_deref() {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => return Err(Error::UnsupportedBackingFormat(String::from(other))),
        None => {
            // Probe like QEMU does when no format is recorded.
            let mut magic = [0u8; 4];
            io.read_at(0, &mut magic).map_err(Error::Io)?;
            u32::from_be_bytes(magic) == header::MAGIC
        }
    };
    if is_qcow2 {
        let child_opts = OpenOptions {
            no_backing: false,
            ..opts.clone()
        };
        let img = Image::open_inner(io, name, Some(opener), &child_opts, seen)?;
        Ok(Backing::Qcow2(Box::new(img)))
    } else {
        let size = io.len().map_err(Error::Io)?;
        Ok(Backing::Raw { io, size, name })
    }
}

fn read_snapshots<R: BlockRead>(io: &mut R, h: &Header) -> Res<(Vec<Snapshot>, u64), R> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    let mut total = 0usize;
    for _ in 0..h.nb_snapshots {
        let mut fixed = [0u8; snapshot::FIXED_LEN];
        io.read_at(off, &mut fixed).map_err(Error::Io)?;
        let lens = snapshot::EntryLengths::from_fixed(&fixed);
        if lens.extra > snapshot::MAX_EXTRA {
            return Err(Error::field(
                "snapshot extra_data_size",
                lens.extra.into(),
                "more than 1024 bytes of extra data",
            ));
        }
        total = total.saturating_add(lens.total());
        if to_u64(total) > 64 * 1024 * 1024 {
            return Err(Error::field(
                "nb_snapshots",
                h.nb_snapshots.into(),
                "snapshot table larger than 64 MiB",
            ));
        }
        let mut var = alloc::vec![0u8; lens.variable()];
        io.read_at(off + to_u64(snapshot::FIXED_LEN), &mut var)
            .map_err(Error::Io)?;
        // Snapshot L1 tables are validated by the check (like QEMU, which
        // opens such images and reports them in `qemu-img check`).
        out.push(Snapshot::decode(&fixed, &var));
        off = off.checked_add(to_u64(lens.total())).ok_or(Error::field(
            "snapshots_offset",
            h.snapshots_offset,
            "overflow",
        ))?;
    }
    Ok((out, to_u64(total)))
}

fn read_bitmaps<R: BlockRead>(io: &mut R, h: &Header) -> Res<Vec<Bitmap>, R> {
    let Some(ext) = h.bitmaps else {
        return Ok(Vec::new());
    };
    let len = to_usize(ext.directory_size).unwrap_or(0);
    let mut dir = alloc::vec![0u8; len];
    io.read_at(ext.directory_offset, &mut dir)
        .map_err(Error::Io)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let (b, next) = bitmap::decode_entry(&dir, pos).ok_or(Error::field(
            "bitmap_directory_size",
            ext.directory_size,
            "bitmap directory entry does not fit in the directory",
        ))?;
        out.push(b);
        pos = next;
    }
    Ok(out)
}
