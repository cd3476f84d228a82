//! An NBD server (`qcow2 serve`): an image served as a block device to
//! kernels (`nbd-client`), VMs (QEMU's `nbd:` drives), and tools
//! (`qemu-img`, `qemu-io`, libnbd's `nbdinfo` and `nbdcopy`), speaking the
//! fixed newstyle protocol of the NBD specification.
//!
//! - [`proto`]: the wire format, pure encoding and decoding;
//! - [`handshake`]: the greeting and the options (`NBD_OPT_GO`, `INFO`,
//!   `LIST`, `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST`/`SET_META_CONTEXT`,
//!   `STARTTLS`);
//! - [`transmit`]: requests and replies (READ with holes, WRITE with FUA,
//!   FLUSH, TRIM, WRITE_ZEROES with NO_HOLE and FAST_ZERO, BLOCK_STATUS
//!   for `base:allocation`, `qemu:allocation-depth` and
//!   `qemu:dirty-bitmap:NAME`, CACHE, DISC);
//! - [`export`]: the image behind the export (qcow2 through the core's
//!   writer, or raw), the one place requests touch it;
//! - [`stream`]: sockets and TLS sessions split into reading and writing
//!   halves;
//! - [`tls`]: QEMU's `tls-creds-x509` directory read into rustls;
//! - [`server`]: listening, accepting, client limits.
//!
//! Memory: each connection has at most [`transmit::WORKERS`] requests
//! and [`transmit::CONNECTION_BUDGET`] bytes of request data in flight (requests longer than [`export::MAX_REQUEST`] are refused
//! without being stored), and at most [`server::MAX_CLIENTS`] clients are
//! served at once, so request buffers stay under 64 MiB per client
//! whatever clients send.

pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod stream;
pub mod tls;
pub mod transmit;
