//! Opening an image: header, L1 table, snapshot and bitmap directories,
//! the external data file and the backing chain (through the caller's
//! [`Opener`]).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use super::Backing;
use super::Crypt;
use super::{Image, OpenOptions, Res, DEFAULT_L2_CACHE_MAX};
use crate::backing::{FileRole, Opener};
use crate::bitmap::{self, Bitmap};
use crate::bytes::{to_u64, to_usize};
use crate::cache::TableCache;
use crate::compress;
use crate::error::Error;
use crate::header::{CryptMethod, Header};
use crate::heap;
use crate::io::BlockRead;
use crate::l2::EntryFormat;
use crate::snapshot::{self, Snapshot};

impl<R: BlockRead> Image<R> {
    pub(crate) fn open_inner(
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
        let mut buf = heap::zeroed(cluster_size.min(4096), "the image header")?;
        io.read_at(0, &mut buf).map_err(Error::Io)?;
        if !Header::fits_in(&buf) && to_u64(buf.len()) < cluster_size {
            buf = heap::zeroed(cluster_size, "the image header")?;
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
        let (crypt, luks) = open_crypt(&mut io, &header, opts.passphrase.as_ref())?;
        let fmt = EntryFormat {
            cluster_bits,
            extended: header.extended_l2(),
            data_file: header.has_data_file(),
        };

        // L1 table (size validated against QEMU's 32 MiB limit).
        let mut raw = heap::zeroed(u64::from(header.l1_size) * 8, "the L1 table")?;
        io.read_at(header.l1_table_offset, &mut raw)
            .map_err(Error::Io)?;
        let l1 = heap::entries(&raw, "the L1 table")?;
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
            // A data file that is this image (or another image of its
            // chain) would have guest data written over metadata.
            if seen.contains(&opened.identity) {
                return Err(Error::NamesItself { name: df_name });
            }
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
            codec: None,
            refcount_cache_blocks: rc_capacity,
            crypt,
            luks,
            metadata_prealloc: None,
            extent_scratch: Vec::new(),
            run_scratch: Vec::new(),
            input_scratch: Vec::new(),
            header,
        })
    }
}

/// The encryption of an image: none, locked (no passphrase) or unlocked.
/// A LUKS header is read from where the crypto header extension says,
/// never past its length.
fn open_crypt<R: BlockRead>(
    io: &mut R,
    header: &Header,
    passphrase: Option<&crate::luks::Secret>,
) -> Res<(Crypt, Option<crate::luks::LuksHeader>), R> {
    use crate::luks::{legacy_aes, LuksHeader, HEADER_LEN};
    match header.crypt_method {
        CryptMethod::None => Ok((Crypt::None, None)),
        CryptMethod::Aes => Ok((
            match passphrase {
                None => Crypt::Locked("aes"),
                Some(p) => Crypt::Open {
                    cipher: Box::new(legacy_aes(p)),
                    host_sectors: false,
                },
            },
            None,
        )),
        CryptMethod::Luks => {
            let ext = header.crypto.ok_or(Error::field(
                "crypt_method",
                2,
                "Missing CRYPTO header for crypt method 2",
            ))?;
            if ext.offset % header.cluster_size() != 0 {
                return Err(Error::field(
                    "encryption header offset",
                    ext.offset,
                    "not a multiple of the cluster size",
                ));
            }
            if ext.length < to_u64(HEADER_LEN) {
                return Err(Error::field(
                    "encryption header length",
                    ext.length,
                    "shorter than a LUKS header",
                ));
            }
            let mut raw = [0u8; HEADER_LEN];
            io.read_at(ext.offset, &mut raw).map_err(Error::Io)?;
            let luks = LuksHeader::decode(&raw).map_err(Error::Format)?;
            let Some(p) = passphrase else {
                return Ok((Crypt::Locked("luks"), Some(luks)));
            };
            let mut read = |at: u64, buf: &mut [u8]| -> Result<(), Error<R::Error>> {
                if at.saturating_add(to_u64(buf.len())) > ext.length {
                    return Err(Error::field(
                        "encryption header length",
                        ext.length,
                        "Request for data outside of extension header",
                    ));
                }
                io.read_at(ext.offset + at, buf).map_err(Error::Io)
            };
            let cipher = luks.unlock(p, &mut read).map_err(flatten)?;
            Ok((
                Crypt::Open {
                    cipher: Box::new(cipher),
                    host_sectors: true,
                },
                Some(luks),
            ))
        }
    }
}

/// An error of a reader that itself returns core errors.
fn flatten<E>(e: Error<Error<E>>) -> Error<E> {
    match e {
        Error::Io(inner) => inner,
        Error::Format(f) => Error::Format(f),
        Error::InvalidPassphrase => Error::InvalidPassphrase,
        _ => Error::Internal("unlocking the LUKS header"),
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
            Header::has_magic(&magic)
        }
    };
    if is_qcow2 {
        // Its own passphrase (by the name the parent stores, or its
        // resolved name), never the parent's.
        let stored = parent.backing_file.as_deref().unwrap_or("");
        // (An empty name: the image's own backing file, qemu-img's
        // `backing.encrypt.key-secret`.)
        let first = seen.len() == 2;
        let passphrase = opts
            .backing_passphrases
            .iter()
            .find(|(n, _)| n == stored || *n == name || (n.is_empty() && first))
            .map(|(_, p)| p.clone());
        let child_opts = OpenOptions {
            no_backing: false,
            passphrase,
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
    let mut dir = heap::zeroed(ext.directory_size, "the bitmap directory")?;
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
