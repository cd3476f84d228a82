//! # qcowkit-core
//!
//! QEMU's qcow2 disk image format in `#![no_std]` Rust (with `alloc`): the
//! header and its extensions, L1/L2 tables (normal and extended L2 with
//! subclusters), refcounts of every width, compressed clusters (zlib and
//! zstd), backing chains, external data files, snapshots and bitmaps.
//!
//! The core does no I/O of its own: images live on any storage implementing
//! [`BlockRead`] (and [`BlockWrite`]), and files an image names (backing
//! files, external data files) are opened through an [`Opener`] the caller
//! supplies.
//!
//! ```
//! use qcowkit_core::{Image, OpenOptions};
//!
//! fn first_sector(image_bytes: &[u8]) -> Result<[u8; 512], qcowkit_core::Error<qcowkit_core::MemError>> {
//!     let mut img = Image::open(image_bytes, &OpenOptions::default())?;
//!     let mut sector = [0u8; 512];
//!     img.read_at(0, &mut sector)?;
//!     Ok(sector)
//! }
//! # assert!(first_sector(b"not an image").is_err());
//! ```
//!
//! ## Errors
//! Every malformed field produces an [`Error`] naming the field and its value;
//! no input makes the crate panic, allocate without a bound, or loop forever.
//!
//! ## Heap
//! What reading needs besides the caller's buffers:
//! - opening: a 4 KiB header buffer (the whole first cluster only when the
//!   header extensions reach beyond 4 KiB), the active L1 table (8 bytes per
//!   entry: 1 KiB for a 64 GiB image with 64 KiB clusters), the snapshot
//!   and bitmap directories when present;
//! - the L2 cache ([`OpenOptions::l2_cache_bytes`]); below one cluster the
//!   core reads L2 tables in slices of that size (frugal mode), down to one
//!   entry (8 or 16 bytes). A 64 KiB-cluster image opens with about 5 KiB
//!   and reads with about 1 KiB of heap with a 512-byte budget;
//! - compressed clusters: one cluster-sized output buffer plus the
//!   compressed bytes (up to a cluster), and the decoder state (zstd keeps a
//!   window of at most 8 MiB as the frame declares; QEMU's frames use one
//!   cluster);
//! - a backing chain: the same again for every image in it;
//! - writing: whole L2 tables, refcount blocks and the refcount table.
//!
//! ## Features
//! - `embedded-io`: `EmbeddedIo`, a storage over `embedded_io` devices.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod allocate;
mod amend;
pub mod backing;
pub mod bitmap;
mod bitmap_read;
mod bitmap_write;
mod bytes;
mod cache;
pub mod check;
pub mod commit;
pub mod compress;
mod compressed;
pub mod contents;
pub mod copy;
pub mod create;
mod error;
pub mod header;
mod heap;
mod image;
mod io;
pub mod l2;
pub mod layout;
pub mod luks;
pub mod map;
pub mod measure;
pub mod overlap;
pub mod partition;
mod prealloc;
mod rctable;
mod rebase;
pub mod refcount;
pub mod repair;
pub mod report;
mod resize;
pub mod signature;
pub mod snapshot;
mod snapshot_write;
mod writable;
mod write;
mod zero;

pub use backing::{FileRole, Opened, Opener};
pub use check::CheckReport;
pub use compress::Codec;
pub use create::{CreateOptions, Preallocation};
pub use error::{Error, FormatError};
pub use image::{
    Backing, Chunk, Extent, Image, Mapping, OpenOptions, Run, Source, DEFAULT_L2_CACHE_MAX,
    DEFAULT_MAX_CHAIN_DEPTH,
};
pub use io::{BlockRead, BlockWrite, MemError};
#[cfg(feature = "embedded-io")]
pub use io::{EmbeddedIo, EmbeddedIoError};
pub use map::BlockStatus;
pub use partition::{PartitionTable, ReadAt};
pub use repair::{RepairMode, RepairReport};
pub use writable::WritableImage;
