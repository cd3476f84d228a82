//! The fixed newstyle handshake: the greeting, then the options a client
//! sends until it starts transmission (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`)
//! or gives up. Every option's data is read in full before it is judged,
//! and its length is bounded, whatever the client claims.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::export::{lock, Export};
use super::proto::{self, Malformed, OptionHeader};
use super::stream::{self, Reader, Socket, Writer};

/// The longest option data read (an export name, information requests,
/// meta context queries all fit many times over); longer options are
/// skipped and refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION: u32 = 64 * 1024;

/// A metadata context a client may select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:allocation-depth`.
    Depth,
    /// `qemu:dirty-bitmap:NAME`, the export's bitmap number N (`-B`).
    Bitmap(usize),
}

/// The prefix of QEMU's dirty bitmap contexts.
pub const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

impl Context {
    /// The context's id in replies.
    pub fn id(self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::Depth => 2,
            Context::Bitmap(i) => 3u32.saturating_add(i as u32),
        }
    }

    /// The context's name (`bitmaps`: the export's).
    pub fn name(self, bitmaps: &[String]) -> String {
        match self {
            Context::Allocation => proto::CONTEXT_BASE_ALLOCATION.into(),
            Context::Depth => proto::CONTEXT_ALLOCATION_DEPTH.into(),
            Context::Bitmap(i) => format!(
                "{DIRTY_BITMAP}{}",
                bitmaps.get(i).map(String::as_str).unwrap_or("")
            ),
        }
    }
}

/// What the handshake agreed on.
pub struct Session {
    /// The reading half (plain or TLS).
    pub reader: Reader,
    /// The writing half.
    pub writer: Writer,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected.
    pub contexts: Vec<Context>,
}

/// Why a handshake ended without transmission.
#[derive(Debug)]
pub enum Ended {
    /// The client aborted or disconnected.
    Closed,
    /// The client broke the protocol (the message names how).
    Protocol(String),
    /// The socket failed.
    Io(io::Error),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Ended {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Ended::Closed
        } else {
            Ended::Io(e)
        }
    }
}

impl From<Malformed> for Ended {
    fn from(e: Malformed) -> Ended {
        Ended::Protocol(e.0)
    }
}

fn send(w: &Writer, bytes: &[u8]) -> io::Result<()> {
    lock(w).write_all(bytes)
}

fn reply(w: &Writer, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    send(w, &proto::option_reply(option, kind, data))
}

/// Reads and drops `n` bytes.
fn skip(r: &mut Reader, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// An option's decoded data naming an export: `Some` when it decoded and
/// names `export`; otherwise the refusal (`NBD_REP_ERR_INVALID`,
/// `NBD_REP_ERR_UNKNOWN`) is sent and `None` returned.
fn for_export<T>(
    w: &Writer,
    option: u32,
    export: &str,
    decoded: Result<(String, T), Malformed>,
) -> io::Result<Option<T>> {
    match decoded {
        Err(e) => reply(w, option, proto::REP_ERR_INVALID, e.0.as_bytes()).map(|()| None),
        Ok((name, _)) if name != export => {
            let msg = format!("export '{name}' not present");
            reply(w, option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).map(|()| None)
        }
        Ok((_, r)) => Ok(Some(r)),
    }
}

/// The contexts a query names, for an export offering
/// `qemu:allocation-depth` (`depth`) and the dirty bitmaps `bitmaps`.
/// Namespace-wide queries (`base:`, `qemu:`, `qemu:dirty-bitmap:`) list
/// every context they cover but select none, as QEMU answers.
fn matching(query: &str, listing: bool, depth: bool, bitmaps: &[String]) -> Vec<Context> {
    let mut v = Vec::new();
    match query {
        proto::CONTEXT_BASE_ALLOCATION => v.push(Context::Allocation),
        "base:" if listing => v.push(Context::Allocation),
        proto::CONTEXT_ALLOCATION_DEPTH if depth => v.push(Context::Depth),
        "qemu:" if listing => {
            if depth {
                v.push(Context::Depth);
            }
            v.extend((0..bitmaps.len()).map(Context::Bitmap));
        }
        DIRTY_BITMAP if listing => v.extend((0..bitmaps.len()).map(Context::Bitmap)),
        q => {
            if let Some(name) = q.strip_prefix(DIRTY_BITMAP) {
                v.extend(bitmaps.iter().position(|b| b == name).map(Context::Bitmap));
            }
        }
    }
    v
}

/// Runs the handshake on `sock` for `export`. `tls` makes TLS mandatory
/// (every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused
/// with `NBD_REP_ERR_TLS_REQD` until it is done).
pub fn negotiate(
    sock: &Socket,
    export: &Export,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Session, Ended> {
    let (mut reader, mut writer) = stream::plain(sock)?;
    send(&writer, &proto::greeting())?;
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & proto::CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(Ended::Protocol(
            "the client does not speak fixed newstyle".into(),
        ));
    }
    let known = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
    if flags & !known != 0 {
        return Err(Ended::Protocol(format!("unknown client flags {flags:#x}")));
    }
    let no_zeroes = flags & proto::CLIENT_NO_ZEROES != 0;
    let mut tls_done = tls.is_none();
    let mut encrypted = false;
    let mut structured = false;
    let mut contexts: Vec<Context> = Vec::new();
    let name = export.config().name.clone();
    let depth_offered = export.config().allocation_depth;
    loop {
        let mut h = [0u8; 16];
        reader.read_exact(&mut h)?;
        let OptionHeader { option, len } = OptionHeader::decode(&h)?;
        if len > MAX_OPTION {
            if option == proto::OPT_EXPORT_NAME {
                return Err(Ended::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME with {len} bytes of data"
                )));
            }
            skip(&mut reader, u64::from(len))?;
            reply(&writer, option, proto::REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data)?;
        if !tls_done && option != proto::OPT_STARTTLS && option != proto::OPT_ABORT {
            if option == proto::OPT_EXPORT_NAME {
                return Err(Ended::Protocol(
                    "NBD_OPT_EXPORT_NAME before TLS was negotiated".into(),
                ));
            }
            reply(&writer, option, proto::REP_ERR_TLS_REQD, b"TLS is required")?;
            continue;
        }
        let invalid =
            |w: &Writer, why: &str| reply(w, option, proto::REP_ERR_INVALID, why.as_bytes());
        match option {
            proto::OPT_EXPORT_NAME => {
                let asked = String::from_utf8_lossy(&data);
                if asked != name {
                    return Err(Ended::Protocol(format!("no export named '{asked}'")));
                }
                send(
                    &writer,
                    &proto::export_name_reply(
                        export.size(),
                        export.transmission_flags(),
                        no_zeroes,
                    ),
                )?;
                return Ok(Session {
                    reader,
                    writer,
                    structured,
                    contexts,
                });
            }
            proto::OPT_ABORT => {
                let _ = reply(&writer, option, proto::REP_ACK, &[]);
                return Err(Ended::Closed);
            }
            proto::OPT_LIST => {
                if len != 0 {
                    invalid(&writer, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                reply(
                    &writer,
                    option,
                    proto::REP_SERVER,
                    &proto::rep_server(&name),
                )?;
                reply(&writer, option, proto::REP_ACK, &[])?;
            }
            proto::OPT_STARTTLS => {
                let Some(config) = tls else {
                    reply(
                        &writer,
                        option,
                        proto::REP_ERR_POLICY,
                        b"TLS is not offered",
                    )?;
                    continue;
                };
                if encrypted || len != 0 {
                    invalid(&writer, "TLS is already negotiated or data was sent")?;
                    continue;
                }
                reply(&writer, option, proto::REP_ACK, &[])?;
                let conn = rustls::ServerConnection::new(config.clone())
                    .map_err(|e| Ended::Protocol(format!("TLS: {e}")))?;
                (reader, writer) = stream::tls(sock, conn)?;
                tls_done = true;
                encrypted = true;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let decoded = proto::InfoRequest::decode(&data).map(|r| (r.name.clone(), r));
                let Some(req) = for_export(&writer, option, &name, decoded)? else {
                    continue;
                };
                let info = proto::info_export(export.size(), export.transmission_flags());
                reply(&writer, option, proto::REP_INFO, &info)?;
                if req.infos.contains(&proto::INFO_NAME) {
                    let info = proto::info_text(proto::INFO_NAME, &name);
                    reply(&writer, option, proto::REP_INFO, &info)?;
                }
                if let Some(d) = &export.config().description {
                    if req.infos.contains(&proto::INFO_DESCRIPTION) {
                        let info = proto::info_text(proto::INFO_DESCRIPTION, d);
                        reply(&writer, option, proto::REP_INFO, &info)?;
                    }
                }
                let (min, preferred, max) = export.block_sizes();
                let info = proto::info_block_size(min, preferred, max);
                reply(&writer, option, proto::REP_INFO, &info)?;
                reply(&writer, option, proto::REP_ACK, &[])?;
                if option == proto::OPT_GO {
                    return Ok(Session {
                        reader,
                        writer,
                        structured,
                        contexts,
                    });
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if len != 0 || structured {
                    invalid(
                        &writer,
                        "structured replies are already negotiated or data was sent",
                    )?;
                    continue;
                }
                structured = true;
                reply(&writer, option, proto::REP_ACK, &[])?;
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let listing = option == proto::OPT_LIST_META_CONTEXT;
                if !listing && !structured {
                    invalid(
                        &writer,
                        "NBD_OPT_SET_META_CONTEXT needs structured replies first",
                    )?;
                    continue;
                }
                let decoded = proto::MetaRequest::decode(&data).map(|r| (r.name.clone(), r));
                let Some(req) = for_export(&writer, option, &name, decoded)? else {
                    continue;
                };
                let bitmaps = &export.config().bitmaps;
                let mut found: Vec<Context> = Vec::new();
                if listing && req.queries.is_empty() {
                    found.push(Context::Allocation);
                    if depth_offered {
                        found.push(Context::Depth);
                    }
                    found.extend((0..bitmaps.len()).map(Context::Bitmap));
                }
                for q in &req.queries {
                    for c in matching(q, listing, depth_offered, bitmaps) {
                        if !found.contains(&c) {
                            found.push(c);
                        }
                    }
                }
                for c in &found {
                    let d = proto::rep_meta_context(c.id(), &c.name(bitmaps));
                    reply(&writer, option, proto::REP_META_CONTEXT, &d)?;
                }
                if !listing {
                    contexts = found;
                }
                reply(&writer, option, proto::REP_ACK, &[])?;
            }
            _ => {
                let msg = format!("{} is not supported", proto::option_name(option));
                reply(&writer, option, proto::REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_queries_list_but_do_not_select() {
        let none: &[String] = &[];
        let two = ["b0".to_string(), "b1".to_string()];
        assert_eq!(
            matching("base:", true, false, none),
            vec![Context::Allocation]
        );
        assert!(matching("base:", false, false, none).is_empty());
        assert_eq!(
            matching("base:allocation", false, false, none),
            vec![Context::Allocation]
        );
        assert!(matching("qemu:allocation-depth", false, false, none).is_empty());
        assert_eq!(
            matching("qemu:allocation-depth", false, true, none),
            vec![Context::Depth]
        );
        assert_eq!(matching("qemu:", true, true, none), vec![Context::Depth]);
        assert!(matching("qemu:dirty-bitmap:x", true, true, none).is_empty());
        assert_eq!(
            matching("qemu:dirty-bitmap:b1", false, false, &two),
            vec![Context::Bitmap(1)]
        );
        assert_eq!(
            matching("qemu:dirty-bitmap:", true, false, &two),
            vec![Context::Bitmap(0), Context::Bitmap(1)]
        );
        assert!(matching("qemu:dirty-bitmap:", false, false, &two).is_empty());
        assert_eq!(Context::Bitmap(1).name(&two), "qemu:dirty-bitmap:b1");
        assert_eq!(Context::Bitmap(1).id(), 4);
    }
}
