//! The NBD protocol's wire format (the fixed newstyle handshake and the
//! transmission phase, as the NBD specification's `proto.md` states them):
//! constants, and pure encoding and decoding of the messages the server
//! reads and writes. No I/O here, so every message can be tested alone.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the fixed newstyle protocol.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`'s reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent export.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: select an export, old style (no reply on failure).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and start transmission on it.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: forbidden by the server's policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: the option's data is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: the export's name.
pub const INFO_NAME: u16 = 1;
/// Information: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (read ahead).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: zeroes must stay allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: a read's data in one chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail zeroing that would not be fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk: nothing (the end).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: zeros at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply chunk: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Error: operation not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space left.
pub const ENOSPC: u32 = 28;
/// Error: value too large (a request longer than the maximum block size).
pub const EOVERFLOW: u32 = 75;
/// Error: not supported (a zeroing that would not be fast).
pub const ENOTSUP: u32 = 95;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Block status flag (`base:allocation`): not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// Block status flag (`base:allocation`): reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata context of allocation (holes and zeros).
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's metadata context of the backing chain layer holding each range.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// The longest name or string the specification allows.
pub const MAX_STRING: usize = 4096;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// An option's header: `IHAVEOPT`, the option and its data's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

/// Why a message is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl core::fmt::Display for Malformed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

impl OptionHeader {
    /// Decodes the 16 bytes of an option's header.
    pub fn decode(b: &[u8; 16]) -> Result<OptionHeader, Malformed> {
        let magic = be64(b, 0);
        if magic != IHAVEOPT {
            return Err(Malformed(format!(
                "option magic {magic:#018x}, expected IHAVEOPT"
            )));
        }
        Ok(OptionHeader {
            option: be32(b, 8),
            len: be32(b, 12),
        })
    }
}

/// An option reply: the header and `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A reader of an option's data that never reads past it.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| {
            Malformed(format!(
                "{what}: {n} bytes past the option's data ({} bytes)",
                self.b.len()
            ))
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self, what: &str) -> Result<u16, Malformed> {
        Ok(be16(self.take(2, what)?, 0))
    }

    fn u32(&mut self, what: &str) -> Result<u32, Malformed> {
        Ok(be32(self.take(4, what)?, 0))
    }

    fn string(&mut self, what: &str) -> Result<String, Malformed> {
        let n = self.u32(what)? as usize;
        if n > MAX_STRING {
            return Err(Malformed(format!(
                "{what} of {n} bytes (at most {MAX_STRING})"
            )));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed(format!("{what} is not UTF-8")))
    }

    fn end(&self) -> Result<(), Malformed> {
        if self.at != self.b.len() {
            return Err(Malformed(format!(
                "{} bytes after the option's fields",
                self.b.len() - self.at
            )));
        }
        Ok(())
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the
/// information requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name.
    pub name: String,
    /// The `NBD_INFO_*` types asked for.
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option's data.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, Malformed> {
        let mut f = Fields { b: data, at: 0 };
        let name = f.string("export name")?;
        let n = f.u16("number of information requests")?;
        let mut infos = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            infos.push(f.u16("information request")?);
        }
        f.end()?;
        Ok(InfoRequest { name, infos })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export's name.
    pub name: String,
    /// The queries.
    pub queries: Vec<String>,
}

impl MetaRequest {
    /// Decodes the option's data.
    pub fn decode(data: &[u8]) -> Result<MetaRequest, Malformed> {
        let mut f = Fields { b: data, at: 0 };
        let name = f.string("export name")?;
        let n = f.u32("number of queries")?;
        // Each query takes at least its 4-byte length: the count is
        // bounded by the data actually sent.
        if n as usize > data.len() / 4 {
            return Err(Malformed(format!(
                "{n} queries in {} bytes of data",
                data.len()
            )));
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(f.string("query")?);
        }
        f.end()?;
        Ok(MetaRequest { name, queries })
    }
}

/// `NBD_REP_INFO`'s `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_REP_INFO` with a text (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_text(info: u16, text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + text.len());
    v.extend_from_slice(&info.to_be_bytes());
    v.extend_from_slice(text.as_bytes());
    v
}

/// `NBD_REP_INFO`'s `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_SERVER`'s data: one export's name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_REP_META_CONTEXT`'s data: a context's id and name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and the 124 zero bytes
/// unless the client said `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.resize(134, 0);
    }
    v
}

/// A request's header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Decodes a request header.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, Malformed> {
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(Malformed(format!(
                "request magic {magic:#010x}, expected {REQUEST_MAGIC:#010x}"
            )));
        }
        Ok(Request {
            flags: be16(b, 4),
            command: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len: be32(b, 24),
        })
    }

    /// Encodes the header (for tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply (16 bytes; a read's data follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk's header (20 bytes) for `len` bytes of payload.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured `NBD_REPLY_TYPE_ERROR` chunk (the last one) with a message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A structured `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(cookie: u64, flags: u16, offset: u64, len: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&chunk_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `len`
/// bytes of data at `offset` (the data follows).
pub fn data_chunk_header(cookie: u64, flags: u16, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&chunk_header(
        cookie,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        len.saturating_add(8),
    ));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: `extents` (length, flags) of
/// context `id`.
pub fn block_status_chunk(cookie: u64, flags: u16, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = Vec::with_capacity(20 + len);
    v.extend_from_slice(&chunk_header(
        cookie,
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        len as u32,
    ));
    v.extend_from_slice(&id.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn done_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
}

/// The name of an option, for messages.
pub fn option_name(option: u32) -> String {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        o => format!("option {o}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    proptest::proptest! {
        /// Whatever a client sends, decoding answers (a value or a reason)
        /// without panicking, and what decodes re-encodes to the same
        /// bytes.
        #[test]
        fn decoders_take_any_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = InfoRequest::decode(&data);
            let _ = MetaRequest::decode(&data);
            let mut h = [0u8; 16];
            let n = data.len().min(16);
            h[..n].copy_from_slice(&data[..n]);
            let _ = OptionHeader::decode(&h);
            let mut r = [0u8; REQUEST_LEN];
            let n = data.len().min(REQUEST_LEN);
            r[..n].copy_from_slice(&data[..n]);
            r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let req = Request::decode(&r).unwrap();
            proptest::prop_assert_eq!(req.encode(), r);
        }
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn option_header_checks_the_magic() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            OptionHeader::decode(&b),
            Ok(OptionHeader { option: 7, len: 9 })
        );
        b[0] = b'X';
        let e = OptionHeader::decode(&b).unwrap_err();
        assert!(e.0.contains("option magic 0x5848"), "{e}");
    }

    #[test]
    fn info_request_decodes_and_refuses_short_or_trailing_data() {
        let mut d = string("disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = InfoRequest::decode(&d).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(InfoRequest::decode(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(InfoRequest::decode(&long)
            .unwrap_err()
            .0
            .contains("1 bytes after"));
        // A name length past the data.
        let mut bad = 5000u32.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0; 10]);
        assert!(InfoRequest::decode(&bad).unwrap_err().0.contains("5000"));
    }

    #[test]
    fn meta_request_bounds_the_query_count_by_the_data() {
        let mut d = string("");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&string("base:allocation"));
        d.extend_from_slice(&string("qemu:"));
        let r = MetaRequest::decode(&d).unwrap();
        assert_eq!(r.queries, vec!["base:allocation", "qemu:"]);
        let mut huge = string("x");
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let e = MetaRequest::decode(&huge).unwrap_err();
        assert!(e.0.contains("4294967295 queries"), "{e}");
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_named() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] = 0;
        assert!(Request::decode(&b).unwrap_err().0.contains("request magic"));
    }

    #[test]
    fn replies_have_the_specified_layout() {
        let s = simple_reply(9, EINVAL);
        assert_eq!(be32(&s, 0), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&s, 4), 22);
        assert_eq!(be64(&s, 8), 9);
        let h = hole_chunk(3, REPLY_FLAG_DONE, 4096, 512);
        assert_eq!(be32(&h, 0), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&h, 4), 1);
        assert_eq!(be16(&h, 6), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(be32(&h, 16), 12);
        assert_eq!(be64(&h, 20), 4096);
        assert_eq!(be32(&h, 28), 512);
        let d = data_chunk_header(3, 0, 8192, 100);
        assert_eq!(be32(&d, 16), 108);
        let e = error_chunk(3, EIO, "boom");
        assert_eq!(be16(&e, 6), REPLY_TYPE_ERROR);
        assert_eq!(be32(&e, 16), 10);
        assert_eq!(be32(&e, 20), EIO);
        assert_eq!(be16(&e, 24), 4);
        assert_eq!(&e[26..], b"boom");
        let b = block_status_chunk(3, REPLY_FLAG_DONE, 1, &[(4096, 3), (512, 0)]);
        assert_eq!(be32(&b, 16), 20);
        assert_eq!(be32(&b, 20), 1);
        assert_eq!(be32(&b, 24), 4096);
        assert_eq!(be32(&b, 28), 3);
        let x = export_name_reply(1 << 30, TF_HAS_FLAGS, false);
        assert_eq!(x.len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(be64(&o, 0), OPT_REPLY_MAGIC);
        assert_eq!(be32(&o, 12), REP_ACK);
    }
}
