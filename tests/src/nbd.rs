//! A small NBD client for the tests, written from the protocol
//! specification (`doc/proto.md` of NetworkBlockDevice/nbd): fixed newstyle
//! negotiation, the options a test needs, and the transmission phase with
//! simple and structured replies. It sends well-formed messages through
//! its high-level calls and anything at all through its raw ones, so tests
//! can also send deliberately malformed messages and see how a server
//! answers.
//!
//! Nothing here panics on what a server sends: every call returns an
//! `io::Result`, where a server breaking the protocol gives an error of
//! kind [`io::ErrorKind::InvalidData`] (see [`is_protocol_violation`]), a
//! server hanging up gives one [`is_hangup`] recognises and a server that
//! does not answer within the client's timeout ([`DEFAULT_TIMEOUT`]) gives
//! [`io::ErrorKind::TimedOut`]. Calls that a server may refuse return an
//! inner `Result`: the NBD error number of a refused command (one of the
//! `NBD_E*` constants), or the server's error reply to a refused option
//! ([`OptReply`]).
//!
//! The client does no TLS; [`make_tls_dirs`] makes certificates in the
//! layout QEMU's `tls-creds-x509` object reads, for tests that run
//! qemu-img or qemu-io as the TLS client.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::be::{get16, get32, get64};

// ---------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes of a newstyle greeting, and the first
/// 8 bytes of every option the client sends.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The second 8 bytes of an oldstyle greeting (`cliserv_magic`).
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request (the experimental `EXTENDED_HEADERS`
/// extension; never valid unless negotiated).
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply (the experimental `EXTENDED_HEADERS`
/// extension).
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------
// Handshake flags (16 bits, from the server) and client flags (32 bits).

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zeroes after
/// `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zeroes after `NBD_OPT_EXPORT_NAME`, please (only
/// valid when the server set [`NBD_FLAG_NO_ZEROES`]).
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------
// Transmission flags (16 bits).

/// Transmission flag: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`)
/// is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported on reads.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may share the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag of the experimental `RESIZE` extension.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Transmission flag of the experimental `EXTENDED_HEADERS` extension.
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------
// Options.

/// Option: choose an export and enter transmission (no error possible).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation (soft disconnect).
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option of the withdrawn `PEEK_EXPORT` extension.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Option: upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option of the experimental `EXTENDED_HEADERS` extension.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------
// Option reply types.

/// Option reply: done (or accepted).
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Error reply: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR + 1;
/// Error reply: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR + 2;
/// Error reply: syntactically or semantically invalid option.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR + 3;
/// Error reply: not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR + 4;
/// Error reply: TLS must be negotiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR + 5;
/// Error reply: no such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR + 6;
/// Error reply: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR + 7;
/// Error reply: the client must ask for `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR + 8;
/// Error reply: request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR + 9;
/// Error reply of the experimental `EXTENDED_HEADERS` extension.
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR + 10;

// ---------------------------------------------------------------------
// Information types (NBD_OPT_INFO / NBD_OPT_GO).

/// Info: export size and transmission flags (always sent on success).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info: the export's canonical name.
pub const NBD_INFO_NAME: u16 = 1;
/// Info: a description of the export for humans.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------
// Commands.

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (followed by `length` bytes of payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes (no payload).
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: query metadata contexts over a range.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Command of the experimental `RESIZE` extension.
pub const NBD_CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------
// Command flags.

/// Command flag: force unit access (persist before replying).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`NBD_CMD_WRITE_ZEROES`): do not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`NBD_CMD_READ`): at most one content chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`NBD_CMD_BLOCK_STATUS`): one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`NBD_CMD_WRITE_ZEROES`): fail fast unless fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag of the experimental `EXTENDED_HEADERS` extension.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------
// Structured replies.

/// Structured reply flag: last chunk of this reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (only as the final chunk).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: zeroes at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status extents of one metadata context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type of the experimental `EXTENDED_HEADERS` extension.
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk type: an error.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR + 1;
/// Chunk type: an error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR + 2;

/// `base:allocation` extent flag: a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` extent flag: reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// The metadata context every server with block status offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------
// Errors of the transmission phase.

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------
// Limits of this client.

/// How long one read or write on a [`Client`]'s socket may block before
/// it fails with [`io::ErrorKind::TimedOut`] (change with
/// [`Client::set_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option reply payload the client accepts (longer ones are a
/// protocol violation here: the spec bounds strings to 4096 bytes).
pub const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest structured chunk payload the client accepts: twice the 32 MiB
/// the spec says a server may always send, plus room for the headers.
pub const MAX_CHUNK_PAYLOAD: u32 = (64 << 20) + 64;
/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;

// ---------------------------------------------------------------------
// Names, for messages.

/// Name of option `opt` (`"?"` when unknown).
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "?",
    }
}

/// Name of option reply type `t` (`"?"` when unknown).
pub fn reply_type_name(t: u32) -> &'static str {
    match t {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        NBD_REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "?",
    }
}

/// Name of command `cmd` (`"?"` when unknown).
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_CACHE => "NBD_CMD_CACHE",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        NBD_CMD_RESIZE => "NBD_CMD_RESIZE",
        _ => "?",
    }
}

/// Name of NBD error number `e` (`"?"` when not one the spec defines).
pub fn error_name(e: u32) -> &'static str {
    match e {
        0 => "OK",
        NBD_EPERM => "NBD_EPERM",
        NBD_EIO => "NBD_EIO",
        NBD_ENOMEM => "NBD_ENOMEM",
        NBD_EINVAL => "NBD_EINVAL",
        NBD_ENOSPC => "NBD_ENOSPC",
        NBD_EOVERFLOW => "NBD_EOVERFLOW",
        NBD_ENOTSUP => "NBD_ENOTSUP",
        NBD_ESHUTDOWN => "NBD_ESHUTDOWN",
        _ => "?",
    }
}

// ---------------------------------------------------------------------
// Errors.

/// An [`io::ErrorKind::InvalidData`] error: the server broke the protocol.
fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Whether `e` says the server broke the protocol (an error of kind
/// [`io::ErrorKind::InvalidData`], which is what this client returns for
/// every malformed or unexpected message).
pub fn is_protocol_violation(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
}

/// Whether `e` says the other end closed the connection (end of stream,
/// reset, broken pipe or aborted connection).
pub fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// A socket timeout (which Unix sockets report as `WouldBlock`) as a
/// [`io::ErrorKind::TimedOut`] error saying what was awaited.
fn timed_out(e: io::Error, what: &str) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, format!("timed out {what}"))
        }
        _ => e,
    }
}

/// `bytes` as UTF-8, or a protocol violation naming `what`.
fn utf8(bytes: &[u8], what: &str) -> io::Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| violation(format!("{what} is not UTF-8")))
}

// ---------------------------------------------------------------------
// The connection.

/// The socket under a [`Client`]: a Unix stream or a TCP stream.
#[derive(Debug)]
pub enum Stream {
    /// A Unix domain socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    /// Sets the read and write timeouts (`None`: block forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Shuts down reading, writing or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// Another handle to the same socket (e.g. to write from one thread
    /// while reading on another).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// One option reply (`NBD_REP_*`), as received.
#[derive(Clone, PartialEq, Eq)]
pub struct OptReply {
    /// The option it answers, as the server echoed it.
    pub opt: u32,
    /// The reply type (`NBD_REP_*`; bit 31 set for errors).
    pub reply_type: u32,
    /// The reply's data (for an error, an optional message).
    pub data: Vec<u8>,
}

impl OptReply {
    /// Whether this is an error reply (bit 31 of the type set).
    pub fn is_error(&self) -> bool {
        self.reply_type & NBD_REP_FLAG_ERROR != 0
    }

    /// The data as text (lossy): an error reply's message.
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

impl fmt::Debug for OptReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OptReply {{ opt: {} ({}), reply_type: {:#x} ({}), data: {:?} }}",
            self.opt,
            option_name(self.opt),
            self.reply_type,
            reply_type_name(self.reply_type),
            self.message()
        )
    }
}

/// What `NBD_OPT_INFO`/`NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) said about
/// an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes (`NBD_INFO_EXPORT`).
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`, from `NBD_INFO_EXPORT`).
    pub transmission_flags: u16,
    /// Minimum block size (`NBD_INFO_BLOCK_SIZE`), when sent.
    pub min_block: Option<u32>,
    /// Preferred block size (`NBD_INFO_BLOCK_SIZE`), when sent.
    pub preferred_block: Option<u32>,
    /// Maximum payload size (`NBD_INFO_BLOCK_SIZE`), when sent.
    pub max_block: Option<u32>,
    /// Canonical name (`NBD_INFO_NAME`), when sent.
    pub name: Option<String>,
    /// Description (`NBD_INFO_DESCRIPTION`), when sent.
    pub description: Option<String>,
    /// Every `NBD_INFO_*` type received, in the order received, unknown
    /// ones included (empty after `NBD_OPT_EXPORT_NAME`).
    pub received: Vec<u16>,
}

impl ExportInfo {
    /// Checks the block sizes against the spec's rules (minimum a power of
    /// two at most 64 KiB; preferred a power of two at least the minimum
    /// and 512; maximum at least the preferred): `Err` names the broken
    /// rule. Ok when no `NBD_INFO_BLOCK_SIZE` was sent.
    pub fn check_block_sizes(&self) -> Result<(), String> {
        let (Some(min), Some(pref), Some(max)) =
            (self.min_block, self.preferred_block, self.max_block)
        else {
            return Ok(());
        };
        if !min.is_power_of_two() || min > 65536 {
            return Err(format!("minimum block size {min}"));
        }
        if !pref.is_power_of_two() || pref < min.max(512) {
            return Err(format!("preferred block size {pref} (minimum {min})"));
        }
        if max < pref {
            return Err(format!("maximum payload {max} < preferred {pref}"));
        }
        Ok(())
    }
}

/// One message of the transmission phase from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply. For a successful `NBD_CMD_READ` the data follows:
    /// read it with [`Client::read_simple_data`].
    Simple {
        /// The request's cookie, as echoed.
        cookie: u64,
        /// NBD error number (0: success).
        error: u32,
    },
    /// A structured reply chunk.
    Chunk {
        /// Chunk flags (`NBD_REPLY_FLAG_DONE`).
        flags: u16,
        /// Chunk type (`NBD_REPLY_TYPE_*`).
        reply_type: u16,
        /// The request's cookie, as echoed.
        cookie: u64,
        /// The chunk's payload.
        payload: Vec<u8>,
    },
}

impl Reply {
    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// Whether this ends its request's reply (a simple reply, or a chunk
    /// with `NBD_REPLY_FLAG_DONE`).
    pub fn is_done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & NBD_REPLY_FLAG_DONE != 0,
        }
    }
}

/// The fields of an error chunk (`NBD_REPLY_TYPE_ERROR`,
/// `NBD_REPLY_TYPE_ERROR_OFFSET` or an unknown type with bit 15 set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// NBD error number (never 0).
    pub error: u32,
    /// The message (lossy UTF-8; empty when none).
    pub message: String,
    /// The offset of `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Parses the payload of an error chunk of type `reply_type`: a protocol
/// violation when it is too short, its message overruns it or its error
/// is 0.
pub fn parse_error_chunk(reply_type: u16, payload: &[u8]) -> io::Result<ChunkError> {
    if payload.len() < 6 {
        return Err(violation(format!(
            "error chunk type {reply_type:#x} with a {}-byte payload (at least 6)",
            payload.len()
        )));
    }
    let error = get32(payload, 0);
    if error == 0 {
        return Err(violation(format!(
            "error chunk type {reply_type:#x} with error 0"
        )));
    }
    let mlen = get16(payload, 4) as usize;
    let fixed = if reply_type == NBD_REPLY_TYPE_ERROR_OFFSET {
        14
    } else {
        6
    };
    if payload.len() < fixed || mlen > payload.len() - fixed {
        return Err(violation(format!(
            "error chunk type {reply_type:#x}: message of {mlen} bytes in a {}-byte payload",
            payload.len()
        )));
    }
    let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
    let offset = (reply_type == NBD_REPLY_TYPE_ERROR_OFFSET).then(|| get64(payload, 6 + mlen));
    Ok(ChunkError {
        error,
        message,
        offset,
    })
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name's length and
/// bytes, the number of information requests and the `NBD_INFO_*` types.
pub fn encode_info_request(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`: the
/// export name's length and bytes, the number of queries and each query's
/// length and bytes.
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// An option as sent on the wire: `IHAVEOPT`, the option, the data's
/// length and the data.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A request header as sent on the wire (28 bytes): magic, command flags,
/// type, cookie, offset, length.
pub fn encode_request(
    cmd_flags: u16,
    cmd_type: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&cmd_flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd_type.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Block status of one request: per metadata context id, its extents as
/// (length, flags), in the order the server sent them.
pub type BlockStatus = Vec<(u32, Vec<(u32, u32)>)>;

/// A test's NBD connection. Every read and write on the socket times out
/// after [`DEFAULT_TIMEOUT`] unless changed with [`Client::set_timeout`].
///
/// The client remembers what the high-level calls negotiated (structured
/// replies, the selected metadata contexts, the export) to check the
/// replies against it; the raw calls ([`Client::send`],
/// [`Client::send_option`], [`Client::request`], ...) change nothing of
/// that, and [`Client::set_structured_replies`] and
/// [`Client::set_contexts`] say what was negotiated through them.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    handshake_flags: Option<u16>,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
    export: Option<ExportInfo>,
    cookie: u64,
    last_error_message: Option<String>,
}

impl Client {
    /// Connects to the server listening on the Unix socket `path`.
    pub fn unix(path: impl AsRef<Path>) -> io::Result<Client> {
        Client::over(Stream::Unix(UnixStream::connect(path)?))
    }

    /// Connects to the server listening at TCP address `addr`.
    pub fn tcp(addr: impl ToSocketAddrs) -> io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Client::over(Stream::Tcp(s))
    }

    /// Connects to the Unix socket `path`, retrying (every 2 ms) while it
    /// does not exist yet or refuses, for at most `limit`: for a server
    /// just started.
    pub fn unix_within(path: impl AsRef<Path>, limit: Duration) -> io::Result<Client> {
        let path = path.as_ref();
        retry_connect(limit, || Client::unix(path))
    }

    /// Connects to TCP address `addr`, retrying (every 2 ms) while it
    /// refuses, for at most `limit`: for a server just started.
    pub fn tcp_within(addr: impl ToSocketAddrs + Copy, limit: Duration) -> io::Result<Client> {
        retry_connect(limit, || Client::tcp(addr))
    }

    /// A client over an already connected stream.
    pub fn over(stream: Stream) -> io::Result<Client> {
        stream.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            stream,
            handshake_flags: None,
            no_zeroes: false,
            structured: false,
            contexts: Vec::new(),
            export: None,
            cookie: 0x5eed_0000_0000_0000,
            last_error_message: None,
        })
    }

    /// Sets the timeout of every later socket read and write.
    pub fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.stream.set_timeout(Some(t))
    }

    /// The socket, to read or write anything at all.
    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// Shuts down both directions of the socket (a hard disconnect).
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Both)
    }

    /// Shuts down the writing half only: the server sees end of stream
    /// while the client can still read what it answers.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// Sends `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream
            .write_all(bytes)
            .map_err(|e| timed_out(e, "sending to the server"))
    }

    /// Receives exactly `n` bytes (an [`io::ErrorKind::UnexpectedEof`]
    /// error if the server closes first).
    pub fn recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.stream
            .read_exact(&mut b)
            .map_err(|e| timed_out(e, &format!("waiting for {n} bytes from the server")))?;
        Ok(b)
    }

    /// Reads until the server closes the connection (a reset counts as
    /// closing) and returns what it sent before: empty when it just hung
    /// up. At most 16 MiB, or the server's sending goes on for longer than
    /// the timeout: a protocol violation.
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > 16 << 20 || start.elapsed() > DEFAULT_TIMEOUT {
                        return Err(violation(format!(
                            "the server sent {} bytes and did not close",
                            out.len()
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(out)
                }
                Err(e) => return Err(timed_out(e, "waiting for the server to close")),
            }
        }
    }

    // -----------------------------------------------------------------
    // Handshake.

    /// Reads the newstyle greeting (`NBDMAGIC`, `IHAVEOPT`, handshake
    /// flags) and returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let b = self.recv_exact(18)?;
        let magic = get64(&b, 0);
        if magic != NBD_MAGIC {
            return Err(violation(format!(
                "greeting starts with {magic:#018x}, not NBDMAGIC"
            )));
        }
        let second = get64(&b, 8);
        if second == NBD_CLISERV_MAGIC {
            return Err(violation("oldstyle greeting"));
        }
        if second != NBD_IHAVEOPT {
            return Err(violation(format!(
                "greeting's second magic {second:#018x}, not IHAVEOPT"
            )));
        }
        let flags = get16(&b, 16);
        self.handshake_flags = Some(flags);
        Ok(flags)
    }

    /// Sends the client flags as they are (remembering whether they ask
    /// for no zeroes after `NBD_OPT_EXPORT_NAME`).
    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.send(&flags.to_be_bytes())?;
        self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// The fixed newstyle handshake: reads the greeting, checks the server
    /// sets `NBD_FLAG_FIXED_NEWSTYLE`, answers `NBD_FLAG_C_FIXED_NEWSTYLE`
    /// plus `NBD_FLAG_C_NO_ZEROES` when the server offers
    /// `NBD_FLAG_NO_ZEROES` (the spec forbids it otherwise), and returns
    /// the handshake flags.
    pub fn handshake(&mut self) -> io::Result<u16> {
        let flags = self.read_greeting()?;
        if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(violation(format!(
                "handshake flags {flags:#x} without FIXED_NEWSTYLE"
            )));
        }
        let mut c = NBD_FLAG_C_FIXED_NEWSTYLE;
        if flags & NBD_FLAG_NO_ZEROES != 0 {
            c |= NBD_FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(c)?;
        Ok(flags)
    }

    /// The handshake flags the server sent, once read.
    pub fn handshake_flags(&self) -> Option<u16> {
        self.handshake_flags
    }

    // -----------------------------------------------------------------
    // Options.

    /// Sends option `opt` with `data` (see [`encode_option`]).
    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        if u32::try_from(data.len()).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "option data over 4 GiB",
            ));
        }
        self.send(&encode_option(opt, data))
    }

    /// Reads one option reply, checking its magic and bounding its length
    /// by [`MAX_OPTION_REPLY`].
    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let h = self.recv_exact(20)?;
        let magic = get64(&h, 0);
        if magic != NBD_REP_MAGIC {
            return Err(violation(format!("option reply magic {magic:#018x}")));
        }
        let (opt, reply_type, len) = (get32(&h, 8), get32(&h, 12), get32(&h, 16));
        if len > MAX_OPTION_REPLY {
            return Err(violation(format!(
                "option reply {reply_type:#x} of {len} bytes (more than {MAX_OPTION_REPLY})"
            )));
        }
        let data = self.recv_exact(len as usize)?;
        Ok(OptReply {
            opt,
            reply_type,
            data,
        })
    }

    /// Sends option `opt` with `data` and reads its replies up to the
    /// final one (`NBD_REP_ACK` or an error): returns the intermediate
    /// replies and the final one. Each must echo `opt`, and an ACK must
    /// carry no data.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<(Vec<OptReply>, OptReply)> {
        self.send_option(opt, data)?;
        let mut partial = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            if r.opt != opt {
                return Err(violation(format!(
                    "reply to {} ({opt}) names option {}: {r:?}",
                    option_name(opt),
                    r.opt
                )));
            }
            if r.reply_type == NBD_REP_ACK && !r.data.is_empty() {
                return Err(violation(format!(
                    "NBD_REP_ACK with {} bytes of data",
                    r.data.len()
                )));
            }
            if r.reply_type == NBD_REP_ACK || r.is_error() {
                return Ok((partial, r));
            }
            partial.push(r);
        }
    }

    /// `NBD_OPT_LIST`: the export names, or the error reply.
    pub fn list(&mut self) -> io::Result<Result<Vec<String>, OptReply>> {
        let (parts, last) = self.option(NBD_OPT_LIST, &[])?;
        if last.is_error() {
            return Ok(Err(last));
        }
        let mut names = Vec::new();
        for r in parts {
            if r.reply_type != NBD_REP_SERVER {
                return Err(violation(format!("{r:?} in the reply to NBD_OPT_LIST")));
            }
            if r.data.len() < 4 {
                return Err(violation("NBD_REP_SERVER shorter than 4 bytes"));
            }
            let n = get32(&r.data, 0) as usize;
            if n > r.data.len() - 4 {
                return Err(violation(format!(
                    "NBD_REP_SERVER name of {n} bytes in {} bytes",
                    r.data.len()
                )));
            }
            names.push(utf8(&r.data[4..4 + n], "an export name")?);
        }
        Ok(Ok(names))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: whether the server acknowledged it (an
    /// error reply gives `false`; only an ACK ends the option).
    pub fn structured_reply(&mut self) -> io::Result<bool> {
        let (parts, last) = self.option(NBD_OPT_STRUCTURED_REPLY, &[])?;
        if let Some(r) = parts.first() {
            return Err(violation(format!(
                "{r:?} in the reply to NBD_OPT_STRUCTURED_REPLY"
            )));
        }
        let ok = last.reply_type == NBD_REP_ACK;
        if ok {
            self.structured = true;
        }
        Ok(ok)
    }

    /// Says whether structured replies were negotiated (for a negotiation
    /// done through the raw calls).
    pub fn set_structured_replies(&mut self, on: bool) {
        self.structured = on;
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Sends a metadata context option and parses the contexts replied.
    fn meta_context(
        &mut self,
        opt: u32,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, OptReply>> {
        let (parts, last) = self.option(opt, &encode_meta_context_request(export, queries))?;
        if last.is_error() {
            return Ok(Err(last));
        }
        let mut out: Vec<(u32, String)> = Vec::new();
        for r in parts {
            if r.reply_type != NBD_REP_META_CONTEXT || r.data.len() < 4 {
                return Err(violation(format!(
                    "{r:?} in the reply to {}",
                    option_name(opt)
                )));
            }
            let id = get32(&r.data, 0);
            let name = utf8(&r.data[4..], "a metadata context name")?;
            if opt == NBD_OPT_SET_META_CONTEXT && out.iter().any(|(i, _)| *i == id) {
                return Err(violation(format!("metadata context id {id} given twice")));
            }
            out.push((id, name));
        }
        Ok(Ok(out))
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `export` with `queries`: the
    /// (id, name) pairs selected, or the error reply. The client then
    /// checks block status replies against the ids.
    pub fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, OptReply>> {
        let r = self.meta_context(NBD_OPT_SET_META_CONTEXT, export, queries)?;
        self.contexts = r.as_ref().ok().cloned().unwrap_or_default();
        Ok(r)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` for `export` with `queries`: the
    /// (id, name) pairs listed (ids should be 0), or the error reply.
    pub fn list_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, OptReply>> {
        self.meta_context(NBD_OPT_LIST_META_CONTEXT, export, queries)
    }

    /// Says which metadata contexts were selected (for a negotiation done
    /// through the raw calls); block status replies are checked against
    /// them (none: not checked).
    pub fn set_contexts(&mut self, contexts: Vec<(u32, String)>) {
        self.contexts = contexts;
    }

    /// The metadata contexts selected by the last
    /// [`Client::set_meta_context`].
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    /// Sends `NBD_OPT_INFO` or `NBD_OPT_GO` and parses the replies.
    fn info_or_go(
        &mut self,
        opt: u32,
        export: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, OptReply>> {
        let (parts, last) = self.option(opt, &encode_info_request(export, infos))?;
        if last.is_error() {
            return Ok(Err(last));
        }
        let mut info = ExportInfo::default();
        for r in parts {
            if r.reply_type != NBD_REP_INFO || r.data.len() < 2 {
                return Err(violation(format!(
                    "{r:?} in the reply to {}",
                    option_name(opt)
                )));
            }
            let t = get16(&r.data, 0);
            if info.received.contains(&t) {
                return Err(violation(format!("NBD_INFO type {t} sent twice")));
            }
            info.received.push(t);
            let d = &r.data;
            let want = |len: usize| {
                if d.len() == len {
                    Ok(())
                } else {
                    Err(violation(format!(
                        "NBD_INFO type {t} of {} bytes, not {len}",
                        d.len()
                    )))
                }
            };
            match t {
                NBD_INFO_EXPORT => {
                    want(12)?;
                    info.size = get64(d, 2);
                    info.transmission_flags = get16(d, 10);
                }
                NBD_INFO_NAME => info.name = Some(utf8(&d[2..], "NBD_INFO_NAME")?),
                NBD_INFO_DESCRIPTION => {
                    info.description = Some(utf8(&d[2..], "NBD_INFO_DESCRIPTION")?)
                }
                NBD_INFO_BLOCK_SIZE => {
                    want(14)?;
                    info.min_block = Some(get32(d, 2));
                    info.preferred_block = Some(get32(d, 6));
                    info.max_block = Some(get32(d, 10));
                }
                _ => {}
            }
        }
        if !info.received.contains(&NBD_INFO_EXPORT) {
            return Err(violation(format!(
                "{} acknowledged without NBD_INFO_EXPORT",
                option_name(opt)
            )));
        }
        if opt == NBD_OPT_GO {
            self.export = Some(info.clone());
        }
        Ok(Ok(info))
    }

    /// `NBD_OPT_INFO` for `export`, asking for the `NBD_INFO_*` types
    /// `infos`: what the server said, or its error reply.
    pub fn info(
        &mut self,
        export: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, OptReply>> {
        self.info_or_go(NBD_OPT_INFO, export, infos)
    }

    /// `NBD_OPT_GO` for `export`, asking for the `NBD_INFO_*` types
    /// `infos`: what the server said (transmission has begun), or its
    /// error reply (still negotiating).
    pub fn go(&mut self, export: &str, infos: &[u16]) -> io::Result<Result<ExportInfo, OptReply>> {
        self.info_or_go(NBD_OPT_GO, export, infos)
    }

    /// `NBD_OPT_EXPORT_NAME`: enters transmission and returns the export's
    /// size and transmission flags, reading the 124 zeroes unless the
    /// client flags asked for none (nonzero padding is a violation). A
    /// server refusing the export just hangs up: see [`is_hangup`].
    pub fn export_name(&mut self, name: &str) -> io::Result<(u64, u16)> {
        self.send_option(NBD_OPT_EXPORT_NAME, name.as_bytes())?;
        let b = self.recv_exact(10)?;
        let (size, flags) = (get64(&b, 0), get16(&b, 8));
        if !self.no_zeroes {
            let z = self.recv_exact(124)?;
            if z.iter().any(|&b| b != 0) {
                return Err(violation("nonzero padding after NBD_OPT_EXPORT_NAME"));
            }
        }
        self.export = Some(ExportInfo {
            size,
            transmission_flags: flags,
            ..ExportInfo::default()
        });
        Ok((size, flags))
    }

    /// `NBD_OPT_ABORT`: the server's reply (`None` when it closed without
    /// one, which the spec allows).
    pub fn abort(&mut self) -> io::Result<Option<OptReply>> {
        self.send_option(NBD_OPT_ABORT, &[])?;
        match self.read_option_reply() {
            Ok(r) => Ok(Some(r)),
            Err(e) if is_hangup(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The export entered by [`Client::go`] or [`Client::export_name`].
    pub fn export(&self) -> Option<&ExportInfo> {
        self.export.as_ref()
    }

    // -----------------------------------------------------------------
    // Transmission: raw messages.

    /// A new cookie (distinct from every earlier one of this client, with
    /// high bits set to catch servers that truncate cookies).
    pub fn next_cookie(&mut self) -> u64 {
        self.cookie = self.cookie.wrapping_add(1);
        self.cookie
    }

    /// Sends a request header (see [`encode_request`]) and nothing else,
    /// whatever `len` says.
    pub fn request(
        &mut self,
        cmd_flags: u16,
        cmd_type: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        self.send(&encode_request(cmd_flags, cmd_type, cookie, offset, len))
    }

    /// Sends a request header whose length is `payload`'s, then `payload`
    /// (for a header whose length differs from the payload sent, use
    /// [`Client::request`] then [`Client::send`]).
    pub fn request_with_payload(
        &mut self,
        cmd_flags: u16,
        cmd_type: u16,
        cookie: u64,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "payload over 4 GiB"))?;
        let h = encode_request(cmd_flags, cmd_type, cookie, offset, len);
        if payload.len() <= 65536 {
            let mut m = h.to_vec();
            m.extend_from_slice(payload);
            self.send(&m)
        } else {
            self.send(&h)?;
            self.send(payload)
        }
    }

    /// Reads one simple reply or structured reply chunk (its payload
    /// bounded by [`MAX_CHUNK_PAYLOAD`]). A simple reply's read data is
    /// not read: see [`Client::read_simple_data`].
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let m = self.recv_exact(4)?;
        match get32(&m, 0) {
            NBD_SIMPLE_REPLY_MAGIC => {
                let r = self.recv_exact(12)?;
                Ok(Reply::Simple {
                    error: get32(&r, 0),
                    cookie: get64(&r, 4),
                })
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let r = self.recv_exact(16)?;
                let len = get32(&r, 12);
                if len > MAX_CHUNK_PAYLOAD {
                    return Err(violation(format!("chunk payload of {len} bytes")));
                }
                Ok(Reply::Chunk {
                    flags: get16(&r, 0),
                    reply_type: get16(&r, 2),
                    cookie: get64(&r, 4),
                    payload: self.recv_exact(len as usize)?,
                })
            }
            other => Err(violation(format!("reply magic {other:#010x}"))),
        }
    }

    /// Reads the `len` data bytes following a successful simple reply to
    /// `NBD_CMD_READ`.
    pub fn read_simple_data(&mut self, len: usize) -> io::Result<Vec<u8>> {
        self.recv_exact(len)
    }

    /// The message of the last error chunk a high-level call received
    /// (`None` after a simple error reply, which has none).
    pub fn last_error_message(&self) -> Option<&str> {
        self.last_error_message.as_deref()
    }

    /// Reads the next reply, which must answer `cookie`.
    fn reply_to(&mut self, cookie: u64, what: &str) -> io::Result<Reply> {
        let r = self.read_reply()?;
        if r.cookie() != cookie {
            return Err(violation(format!(
                "reply to {what} with cookie {:#x}, not {cookie:#x}",
                r.cookie()
            )));
        }
        if matches!(r, Reply::Chunk { .. }) && !self.structured {
            return Err(violation(format!(
                "structured chunk in the reply to {what} without structured replies"
            )));
        }
        Ok(r)
    }

    /// Records an error chunk (its message, and its error when the first).
    fn note_error(&mut self, e: ChunkError, first: &mut Option<u32>) {
        self.last_error_message = Some(e.message);
        first.get_or_insert(e.error);
    }

    /// Reads the reply to the request `cookie` of a command that returns no
    /// data: a simple reply, or chunks of type NONE or errors up to the
    /// one with `NBD_REPLY_FLAG_DONE`. Ok(Err(error)) on an error.
    pub fn finish_command(&mut self, cookie: u64, cmd_type: u16) -> io::Result<Result<(), u32>> {
        let what = command_name(cmd_type);
        let mut err = None;
        let mut first = true;
        loop {
            match self.reply_to(cookie, what)? {
                Reply::Simple { error, .. } => {
                    if !first {
                        return Err(violation(format!("simple reply after chunks to {what}")));
                    }
                    self.last_error_message = None;
                    return Ok(if error == 0 { Ok(()) } else { Err(error) });
                }
                Reply::Chunk {
                    flags,
                    reply_type,
                    payload,
                    ..
                } => {
                    match reply_type {
                        NBD_REPLY_TYPE_NONE => check_none(flags, &payload)?,
                        t if t & NBD_REPLY_TYPE_FLAG_ERROR != 0 => {
                            let e = parse_error_chunk(t, &payload)?;
                            self.note_error(e, &mut err);
                        }
                        t => {
                            return Err(violation(format!("chunk type {t} in the reply to {what}")))
                        }
                    }
                    if flags & NBD_REPLY_FLAG_DONE != 0 {
                        return Ok(err.map_or(Ok(()), Err));
                    }
                }
            }
            first = false;
        }
    }

    // -----------------------------------------------------------------
    // Transmission: commands.

    /// Sends a command without payload or reply data (flush, trim, cache,
    /// write zeroes, or anything else such as an unknown type) and reads
    /// its reply: Ok(Err(error)) when the server refuses it.
    pub fn command(
        &mut self,
        cmd_flags: u16,
        cmd_type: u16,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<(), u32>> {
        let cookie = self.next_cookie();
        self.request(cmd_flags, cmd_type, cookie, offset, len)?;
        self.finish_command(cookie, cmd_type)
    }

    /// `NBD_CMD_READ` of `len` bytes at `offset`: the data, or the NBD
    /// error. With structured replies the chunks are assembled and checked:
    /// each inside the request, none overlapping, together covering it all
    /// on success, ended by `NBD_REPLY_FLAG_DONE`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.read_with_flags(0, offset, len)
    }

    /// [`Client::read`] with command flags (`NBD_CMD_FLAG_DF`: then at
    /// most one content chunk is accepted).
    pub fn read_with_flags(
        &mut self,
        cmd_flags: u16,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let cookie = self.next_cookie();
        self.request(cmd_flags, NBD_CMD_READ, cookie, offset, len)?;
        self.finish_read(cookie, cmd_flags, offset, len)
    }

    /// Reads and checks the reply to the read request `cookie` (flags
    /// `cmd_flags`, `len` bytes at `offset`), as [`Client::read`] does.
    pub fn finish_read(
        &mut self,
        cookie: u64,
        cmd_flags: u16,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let what = "NBD_CMD_READ";
        let start = u128::from(offset);
        let end = start + u128::from(len);
        // Allocated at the first content chunk: not for a refused request.
        let mut buf: Vec<u8> = Vec::new();
        // Content chunks received: start -> end (absolute, disjoint).
        let mut covered: BTreeMap<u128, u128> = BTreeMap::new();
        let mut error_offsets: Vec<u128> = Vec::new();
        let mut content_chunks = 0usize;
        let mut err = None;
        let mut first = true;
        loop {
            match self.reply_to(cookie, what)? {
                Reply::Simple { error, .. } => {
                    if self.structured {
                        return Err(violation(
                            "simple reply to NBD_CMD_READ after structured replies were negotiated",
                        ));
                    }
                    if !first {
                        return Err(violation("simple reply after chunks to NBD_CMD_READ"));
                    }
                    self.last_error_message = None;
                    if error != 0 {
                        return Ok(Err(error));
                    }
                    return self.read_simple_data(len as usize).map(Ok);
                }
                Reply::Chunk {
                    flags,
                    reply_type,
                    payload,
                    ..
                } => {
                    match reply_type {
                        NBD_REPLY_TYPE_NONE => check_none(flags, &payload)?,
                        NBD_REPLY_TYPE_OFFSET_DATA | NBD_REPLY_TYPE_OFFSET_HOLE => {
                            let (at, n) = if reply_type == NBD_REPLY_TYPE_OFFSET_DATA {
                                if payload.len() < 9 {
                                    return Err(violation(format!(
                                        "NBD_REPLY_TYPE_OFFSET_DATA of {} bytes",
                                        payload.len()
                                    )));
                                }
                                (get64(&payload, 0), payload.len() as u128 - 8)
                            } else {
                                if payload.len() != 12 {
                                    return Err(violation(format!(
                                        "NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes",
                                        payload.len()
                                    )));
                                }
                                let n = get32(&payload, 8);
                                if n == 0 {
                                    return Err(violation("empty NBD_REPLY_TYPE_OFFSET_HOLE"));
                                }
                                (get64(&payload, 0), u128::from(n))
                            };
                            let (a, b) = (u128::from(at), u128::from(at) + n);
                            if a < start || b > end {
                                return Err(violation(format!(
                                    "content chunk [{a}, {b}) outside the read [{start}, {end})"
                                )));
                            }
                            if let Some((&s, &e)) = covered.range(..b).next_back() {
                                if e > a {
                                    return Err(violation(format!(
                                        "content chunk [{a}, {b}) overlaps [{s}, {e})"
                                    )));
                                }
                            }
                            if let Some(eo) = error_offsets.iter().find(|&&o| o >= a && o < b) {
                                return Err(violation(format!(
                                    "content chunk [{a}, {b}) after an error at {eo}"
                                )));
                            }
                            covered.insert(a, b);
                            content_chunks += 1;
                            if cmd_flags & NBD_CMD_FLAG_DF != 0 && content_chunks > 1 {
                                return Err(violation(
                                    "several content chunks despite NBD_CMD_FLAG_DF",
                                ));
                            }
                            let rel = (a - start) as usize;
                            if reply_type == NBD_REPLY_TYPE_OFFSET_DATA {
                                if buf.is_empty() {
                                    buf = vec![0u8; len as usize];
                                }
                                buf[rel..rel + n as usize].copy_from_slice(&payload[8..]);
                            }
                        }
                        t if t & NBD_REPLY_TYPE_FLAG_ERROR != 0 => {
                            let e = parse_error_chunk(t, &payload)?;
                            if let Some(o) = e.offset {
                                let o = u128::from(o);
                                if o < start || o >= end {
                                    return Err(violation(format!(
                                        "error offset {o} outside the read [{start}, {end})"
                                    )));
                                }
                                error_offsets.push(o);
                            }
                            self.note_error(e, &mut err);
                        }
                        t => {
                            return Err(violation(format!("chunk type {t} in the reply to {what}")))
                        }
                    }
                    if flags & NBD_REPLY_FLAG_DONE != 0 {
                        if let Some(e) = err {
                            return Ok(Err(e));
                        }
                        let total: u128 = covered.iter().map(|(s, e)| e - s).sum();
                        if total != u128::from(len) {
                            return Err(violation(format!(
                                "successful read of {len} bytes whose chunks cover {total}"
                            )));
                        }
                        buf.resize(len as usize, 0);
                        return Ok(Ok(buf));
                    }
                }
            }
            first = false;
        }
    }

    /// `NBD_CMD_WRITE` of `data` at `offset` (with `NBD_CMD_FLAG_FUA` when
    /// `fua`).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<Result<(), u32>> {
        let cookie = self.next_cookie();
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.request_with_payload(flags, NBD_CMD_WRITE, cookie, offset, data)?;
        self.finish_command(cookie, NBD_CMD_WRITE)
    }

    /// `NBD_CMD_WRITE_ZEROES` of `len` bytes at `offset` with command flags
    /// `cmd_flags` (`NBD_CMD_FLAG_NO_HOLE`, `NBD_CMD_FLAG_FAST_ZERO`,
    /// `NBD_CMD_FLAG_FUA`).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        cmd_flags: u16,
    ) -> io::Result<Result<(), u32>> {
        self.command(cmd_flags, NBD_CMD_WRITE_ZEROES, offset, len)
    }

    /// `NBD_CMD_TRIM` of `len` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<Result<(), u32>> {
        self.command(0, NBD_CMD_TRIM, offset, len)
    }

    /// `NBD_CMD_FLUSH`.
    pub fn flush(&mut self) -> io::Result<Result<(), u32>> {
        self.command(0, NBD_CMD_FLUSH, 0, 0)
    }

    /// `NBD_CMD_CACHE` of `len` bytes at `offset`.
    pub fn cache(&mut self, offset: u64, len: u32) -> io::Result<Result<(), u32>> {
        self.command(0, NBD_CMD_CACHE, offset, len)
    }

    /// `NBD_CMD_BLOCK_STATUS` of `len` bytes at `offset` with command flags
    /// `cmd_flags` (`NBD_CMD_FLAG_REQ_ONE`): per context, the extents as
    /// (length, flags), or the NBD error. Checked: a structured reply on
    /// success, each chunk 4 + 8k bytes with k >= 1 nonzero extents, the
    /// ids among the selected contexts (when known) and each once, one
    /// chunk per selected context, with `NBD_CMD_FLAG_REQ_ONE` a single
    /// extent no longer than `len`, without it all but the last extent
    /// inside the request.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        cmd_flags: u16,
    ) -> io::Result<Result<BlockStatus, u32>> {
        let what = "NBD_CMD_BLOCK_STATUS";
        let cookie = self.next_cookie();
        self.request(cmd_flags, NBD_CMD_BLOCK_STATUS, cookie, offset, len)?;
        let mut out: BlockStatus = Vec::new();
        let mut err = None;
        let mut first = true;
        loop {
            match self.reply_to(cookie, what)? {
                Reply::Simple { error, .. } => {
                    if !first {
                        return Err(violation(format!("simple reply after chunks to {what}")));
                    }
                    if error == 0 {
                        return Err(violation(format!("successful {what} as a simple reply")));
                    }
                    self.last_error_message = None;
                    return Ok(Err(error));
                }
                Reply::Chunk {
                    flags,
                    reply_type,
                    payload,
                    ..
                } => {
                    match reply_type {
                        NBD_REPLY_TYPE_NONE => check_none(flags, &payload)?,
                        NBD_REPLY_TYPE_BLOCK_STATUS => {
                            out.push(self.parse_block_status(&payload, &out, len, cmd_flags)?);
                        }
                        t if t & NBD_REPLY_TYPE_FLAG_ERROR != 0 => {
                            let e = parse_error_chunk(t, &payload)?;
                            self.note_error(e, &mut err);
                        }
                        t => {
                            return Err(violation(format!("chunk type {t} in the reply to {what}")))
                        }
                    }
                    if flags & NBD_REPLY_FLAG_DONE != 0 {
                        if let Some(e) = err {
                            return Ok(Err(e));
                        }
                        if !self.contexts.is_empty() && out.len() != self.contexts.len() {
                            return Err(violation(format!(
                                "{} block status chunks for {} contexts",
                                out.len(),
                                self.contexts.len()
                            )));
                        }
                        if out.is_empty() {
                            return Err(violation("successful block status without extents"));
                        }
                        return Ok(Ok(out));
                    }
                }
            }
            first = false;
        }
    }

    /// Parses and checks one `NBD_REPLY_TYPE_BLOCK_STATUS` payload.
    fn parse_block_status(
        &self,
        p: &[u8],
        earlier: &BlockStatus,
        len: u32,
        cmd_flags: u16,
    ) -> io::Result<(u32, Vec<(u32, u32)>)> {
        if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
            return Err(violation(format!(
                "block status chunk of {} bytes",
                p.len()
            )));
        }
        let id = get32(p, 0);
        if !self.contexts.is_empty() && !self.contexts.iter().any(|(i, _)| *i == id) {
            return Err(violation(format!(
                "block status for unselected context id {id}"
            )));
        }
        if earlier.iter().any(|(i, _)| *i == id) {
            return Err(violation(format!(
                "two block status chunks for context id {id}"
            )));
        }
        let extents: Vec<(u32, u32)> = (4..p.len())
            .step_by(8)
            .map(|o| (get32(p, o), get32(p, o + 4)))
            .collect();
        if extents.iter().any(|&(l, _)| l == 0) {
            return Err(violation(format!(
                "empty extent for context id {id}: {extents:?}"
            )));
        }
        if cmd_flags & NBD_CMD_FLAG_REQ_ONE != 0 {
            if extents.len() != 1 || extents[0].0 > len {
                return Err(violation(format!(
                    "NBD_CMD_FLAG_REQ_ONE of {len} bytes answered with {extents:?}"
                )));
            }
        } else {
            let before_last: u64 = extents[..extents.len() - 1]
                .iter()
                .map(|&(l, _)| u64::from(l))
                .sum();
            if extents.len() > 1 && before_last >= u64::from(len) {
                return Err(violation(format!(
                    "extents before the last reach {before_last} of a {len}-byte request"
                )));
            }
        }
        Ok((id, extents))
    }

    /// `NBD_CMD_DISC`, then waits for the server to close the connection:
    /// anything it sends before closing is a protocol violation.
    pub fn disconnect(&mut self) -> io::Result<()> {
        let cookie = self.next_cookie();
        self.request(0, NBD_CMD_DISC, cookie, 0, 0)?;
        let rest = self.read_to_eof()?;
        if !rest.is_empty() {
            return Err(violation(format!(
                "{} bytes after NBD_CMD_DISC",
                rest.len()
            )));
        }
        Ok(())
    }
}

/// Checks an `NBD_REPLY_TYPE_NONE` chunk: no payload, and the last one.
fn check_none(flags: u16, payload: &[u8]) -> io::Result<()> {
    if !payload.is_empty() {
        return Err(violation(format!(
            "NBD_REPLY_TYPE_NONE with {} bytes",
            payload.len()
        )));
    }
    if flags & NBD_REPLY_FLAG_DONE == 0 {
        return Err(violation("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE"));
    }
    Ok(())
}

/// Runs `connect` until it succeeds, retrying every 2 ms for at most
/// `limit` while it fails because nobody listens yet.
fn retry_connect(
    limit: Duration,
    mut connect: impl FnMut() -> io::Result<Client>,
) -> io::Result<Client> {
    let deadline = Instant::now() + limit;
    loop {
        match connect() {
            Ok(c) => return Ok(c),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------
// TLS certificates for QEMU's tls-creds-x509.

/// Certificate directories in the layout of QEMU's `tls-creds-x509`
/// object, made by [`make_tls_dirs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDirs {
    /// For `endpoint=server`: `ca-cert.pem`, `server-cert.pem` (for DNS
    /// name `localhost` and IP 127.0.0.1) and `server-key.pem`.
    pub server: PathBuf,
    /// For `endpoint=client`: `ca-cert.pem`, `client-cert.pem` and
    /// `client-key.pem`.
    pub client: PathBuf,
    /// The CA certificate (the same as both directories' `ca-cert.pem`).
    pub ca_cert: PathBuf,
    /// The CA's private key (in neither directory).
    pub ca_key: PathBuf,
}

/// The openssl configuration: the subject and the extensions of each kind
/// of certificate, as QEMU checks them (CA: basic constraints CA and
/// keyCertSign; peers: not a CA, digitalSignature and keyEncipherment,
/// server or client auth).
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = qcowkit test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Runs `openssl ARGS` in `cwd`: an error with its output unless it
/// succeeds.
fn openssl(cwd: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Path as text for a command line (these are temporary directories: a
/// path that is not UTF-8 is an error).
fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path not UTF-8"))
}

/// Makes a self-signed EC P-256 CA (subject `CN=qcowkit test CA`, valid
/// ten years) in `root`: `NAME-cert.pem` and `NAME-key.pem`.
fn make_ca(root: &Path, cnf: &str, name: &str) -> io::Result<(PathBuf, PathBuf)> {
    let cert = root.join(format!("{name}-cert.pem"));
    let key = root.join(format!("{name}-key.pem"));
    openssl(
        root,
        &[
            "req",
            "-x509",
            "-config",
            cnf,
            "-extensions",
            "ca",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&cert)?,
            "-days",
            "3650",
            "-set_serial",
            "1",
        ],
    )?;
    Ok((cert, key))
}

/// Makes an EC P-256 key `dir/ROLE-key.pem` and certificate
/// `dir/ROLE-cert.pem` for subject `cn` with the extensions of section
/// `role` of the configuration, signed by the CA `ca` (cert, key).
fn make_peer(
    root: &Path,
    cnf: &str,
    dir: &Path,
    role: &str,
    cn: &str,
    serial: u32,
    ca: &(PathBuf, PathBuf),
) -> io::Result<()> {
    let key = dir.join(format!("{role}-key.pem"));
    let cert = dir.join(format!("{role}-cert.pem"));
    let csr = root.join(format!("{role}-{serial}.csr"));
    let subj = format!("/CN={cn}");
    openssl(
        root,
        &[
            "req",
            "-new",
            "-config",
            cnf,
            "-subj",
            &subj,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
        ],
    )?;
    openssl(
        root,
        &[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&ca.0)?,
            "-CAkey",
            path_str(&ca.1)?,
            "-set_serial",
            &serial.to_string(),
            "-days",
            "3650",
            "-extfile",
            cnf,
            "-extensions",
            role,
            "-out",
            path_str(&cert)?,
        ],
    )?;
    std::fs::remove_file(csr)
}

/// Writes the openssl configuration into `root` and returns its path.
fn write_cnf(root: &Path) -> io::Result<String> {
    let cnf = root.join("qcowkit-openssl.cnf");
    std::fs::write(&cnf, OPENSSL_CNF)?;
    Ok(path_str(&cnf)?.to_owned())
}

/// Makes, with the `openssl` command, a test CA and the two directories
/// QEMU's `tls-creds-x509` object reads, under `root` (created if
/// needed): `root/server` (`ca-cert.pem`, `server-cert.pem` for DNS name
/// `localhost` and IP 127.0.0.1, `server-key.pem`) and `root/client`
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`); the CA's key stays
/// in `root`. Keys are EC P-256, certificates valid for ten years.
///
/// With qemu-img as the client over a Unix socket, give the host name the
/// certificate is for: `tls-hostname=localhost` (QEMU has no name to check
/// otherwise and refuses); over TCP to 127.0.0.1 the IP address matches.
pub fn make_tls_dirs(root: &Path) -> io::Result<TlsDirs> {
    let server = root.join("server");
    let client = root.join("client");
    std::fs::create_dir_all(&server)?;
    std::fs::create_dir_all(&client)?;
    let cnf = write_cnf(root)?;
    let ca = make_ca(root, &cnf, "ca")?;
    make_peer(root, &cnf, &server, "server", "localhost", 2, &ca)?;
    make_peer(root, &cnf, &client, "client", "qcowkit test client", 3, &ca)?;
    std::fs::copy(&ca.0, server.join("ca-cert.pem"))?;
    std::fs::copy(&ca.0, client.join("ca-cert.pem"))?;
    Ok(TlsDirs {
        server,
        client,
        ca_cert: ca.0,
        ca_key: ca.1,
    })
}

/// Makes `root/foreign-client`, a client directory for `endpoint=client`
/// whose `client-cert.pem`/`client-key.pem` come from a second CA made
/// here, unrelated to `tls`'s (its own key, so nothing it signs verifies
/// against `tls`'s CA): for tests that a server refuses a client
/// certificate from the wrong CA.
///
/// Two details make the refusal the server's and not the client's: the
/// second CA has the same subject name as the test CA, so a GnuTLS client
/// (QEMU) does present the certificate when the server asks for one
/// issued by `CN=qcowkit test CA` (with another name it presents none and
/// the server sees no certificate at all); and the directory's
/// `ca-cert.pem` holds both CAs, the second one first, so that QEMU
/// accepts its own certificate and still trusts the server's. qemu-nbd
/// refuses such a client with "The certificate hasn't got a known issuer".
pub fn make_foreign_client_dir(root: &Path, tls: &TlsDirs) -> io::Result<PathBuf> {
    let dir = root.join("foreign-client");
    std::fs::create_dir_all(&dir)?;
    let cnf = write_cnf(root)?;
    let ca = make_ca(root, &cnf, "foreign-ca")?;
    make_peer(root, &cnf, &dir, "client", "qcowkit foreign client", 4, &ca)?;
    let mut both = std::fs::read(&ca.0)?;
    both.extend(std::fs::read(&tls.ca_cert)?);
    std::fs::write(dir.join("ca-cert.pem"), both)?;
    Ok(dir)
}

/// The `--object` argument of a QEMU tool for `tls-creds-x509` with id
/// `id` reading `dir` as `endpoint` (`"server"` or `"client"`), commas in
/// the path doubled as QEMU's option syntax wants.
pub fn tls_creds_object(id: &str, dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint={endpoint}",
        dir.display().to_string().replace(',', ",,")
    )
}
