//! The transmission phase: a few worker threads per connection take turns
//! reading requests, and each carries out the request it read and writes
//! its reply (NBD replies may come in any order). A client has at most
//! [`WORKERS`] requests being carried out and [`CONNECTION_BUDGET`] bytes
//! of request data in flight; past that its next request is not read, so
//! a client sending faster than it reads replies only slows itself.

use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex};

use super::export::{lock, Export, OpError, MAX_REQUEST};
use super::handshake::{Context, Session};
use super::proto::{self, Request};
use super::stream::Writer;

/// Bytes of request and reply data one connection may have in flight:
/// two requests of the largest size.
pub const CONNECTION_BUDGET: u64 = 2 * MAX_REQUEST as u64;
/// Threads carrying out one connection's requests.
pub const WORKERS: usize = 4;
/// The most extents one block status reply carries per context.
pub const MAX_EXTENTS: usize = 2048;

/// A counted budget: `take` waits until the amount fits.
pub struct Budget {
    /// Bytes and requests taken, and whether someone waits.
    used: Mutex<(u64, usize, bool)>,
    freed: Condvar,
    bytes: u64,
    count: usize,
}

impl Budget {
    /// A budget of `bytes` and `count` requests.
    pub fn new(bytes: u64, count: usize) -> Budget {
        Budget {
            used: Mutex::new((0, 0, false)),
            freed: Condvar::new(),
            bytes,
            count,
        }
    }

    /// Takes `n` bytes and one request, waiting while they do not fit (a
    /// request larger than the whole budget waits until nothing else is
    /// in flight).
    pub fn take(&self, n: u64) {
        let mut g = lock(&self.used);
        while g.1 > 0 && (g.0 + n > self.bytes || g.1 >= self.count) {
            g.2 = true;
            g = self.freed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.0 += n;
        g.1 += 1;
    }

    /// Gives back what `take(n)` took.
    pub fn give(&self, n: u64) {
        let mut g = lock(&self.used);
        g.0 = g.0.saturating_sub(n);
        g.1 = g.1.saturating_sub(1);
        if g.2 {
            g.2 = false;
            self.freed.notify_all();
        }
    }
}

struct Job {
    req: Request,
    payload: Vec<u8>,
    /// Set when the request was refused before it was read in full.
    refused: Option<OpError>,
    cost: u64,
}

/// Why transmission ended.
#[derive(Debug)]
pub enum End {
    /// `NBD_CMD_DISC`, or the client closed the connection.
    Disconnected,
    /// The client broke the protocol (named), and was disconnected.
    Protocol(String),
    /// The socket failed.
    Io(io::Error),
}

/// The reading half of a connection, taken in turn by its workers.
struct Input {
    reader: Box<dyn Read + Send>,
    /// Set by the worker that met the end; the others stop at it.
    end: Option<End>,
}

/// Serves requests of `session` on `export` until the client leaves.
/// `close` is called to wake the reader when a reply cannot be written.
///
/// [`WORKERS`] threads (this one among them) take turns at reading: the
/// one holding the reading half reads the next request, lets go of it and
/// carries the request out itself, writing its reply, while the next one
/// reads on. A request thus never waits for a hand-over between threads,
/// and up to [`WORKERS`] run at once.
pub fn serve(session: Session, export: &Export, close: &(dyn Fn() + Sync)) -> End {
    let Session {
        reader,
        writer,
        structured,
        contexts,
    } = session;
    let budget = Budget::new(CONNECTION_BUDGET, WORKERS);
    let input = Mutex::new(Input { reader, end: None });
    let ctx = Ctx {
        export,
        writer: &writer,
        structured,
        contexts: &contexts,
    };
    std::thread::scope(|s| {
        for _ in 1..WORKERS {
            s.spawn(|| ctx.work(&input, &budget, close));
        }
        ctx.work(&input, &budget, close);
    });
    let end = input.into_inner().unwrap_or_else(|p| p.into_inner()).end;
    end.unwrap_or(End::Disconnected)
}

impl Ctx<'_> {
    /// One worker: reads a request when its turn comes, then runs it.
    fn work(&self, input: &Mutex<Input>, budget: &Budget, close: &(dyn Fn() + Sync)) {
        loop {
            let job = {
                let mut inp = lock(input);
                if inp.end.is_some() {
                    return;
                }
                match next_job(&mut inp.reader, self, budget) {
                    Ok(j) => j,
                    Err(end) => {
                        inp.end = Some(end);
                        return;
                    }
                }
            };
            let cost = job.cost;
            let ok = self.run(job);
            budget.give(cost);
            if !ok {
                // The client is gone: stop reading its requests too.
                close();
            }
        }
    }
}

/// Reads the next request (its payload too), taking its share of the
/// budget first.
fn next_job(reader: &mut Box<dyn Read + Send>, ctx: &Ctx<'_>, budget: &Budget) -> Result<Job, End> {
    let mut h = [0u8; proto::REQUEST_LEN];
    match read_full(reader, &mut h) {
        Ok(true) => {}
        Ok(false) => return Err(End::Disconnected),
        Err(e) => return Err(End::Io(e)),
    }
    let req = Request::decode(&h).map_err(|e| End::Protocol(e.0))?;
    if req.command == proto::CMD_DISC {
        return Err(End::Disconnected);
    }
    let refused = ctx.validate(&req).err();
    let mut payload = Vec::new();
    let mut cost = 0;
    if req.command == proto::CMD_WRITE {
        if req.len > MAX_REQUEST {
            // The payload is skipped, not stored.
            io::copy(&mut reader.take(u64::from(req.len)), &mut io::sink()).map_err(End::Io)?;
        } else {
            cost = u64::from(req.len);
            budget.take(cost);
            payload = vec![0u8; req.len as usize];
            if let Err(e) = reader.read_exact(&mut payload) {
                budget.give(cost);
                return Err(End::Io(e));
            }
        }
    } else {
        if refused.is_none() && matches!(req.command, proto::CMD_READ | proto::CMD_CACHE) {
            cost = u64::from(req.len).min(u64::from(MAX_REQUEST));
        }
        budget.take(cost);
    }
    Ok(Job {
        req,
        payload,
        refused,
        cost,
    })
}

/// Reads exactly `buf`; `Ok(false)` on a clean end of stream before its
/// first byte.
fn read_full(r: &mut Box<dyn Read + Send>, buf: &mut [u8]) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if at == 0 && is_reset(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

fn too_big(structured: bool, len: u32) -> OpError {
    OpError::new(
        if structured {
            proto::EOVERFLOW
        } else {
            proto::EINVAL
        },
        format!("request of {len} bytes, larger than the maximum block size {MAX_REQUEST}"),
    )
}

struct Ctx<'a> {
    export: &'a Export,
    writer: &'a Writer,
    structured: bool,
    contexts: &'a [Context],
}

impl Ctx<'_> {
    /// Checks a request's command and flags.
    fn validate(&self, r: &Request) -> Result<(), OpError> {
        let allowed = match r.command {
            proto::CMD_READ if self.structured => proto::CMD_FLAG_FUA | proto::CMD_FLAG_DF,
            proto::CMD_READ => proto::CMD_FLAG_FUA,
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_FLUSH | proto::CMD_CACHE => {
                proto::CMD_FLAG_FUA
            }
            proto::CMD_WRITE_ZEROES => {
                proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
            }
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            c => return Err(OpError::new(proto::EINVAL, format!("unknown command {c}"))),
        };
        if r.flags & !allowed != 0 {
            return Err(OpError::new(
                proto::EINVAL,
                format!("flags {:#x} not valid for command {}", r.flags, r.command),
            ));
        }
        let len = u64::from(r.len);
        match r.command {
            proto::CMD_READ | proto::CMD_CACHE | proto::CMD_WRITE if r.len > MAX_REQUEST => {
                Err(too_big(self.structured, r.len))
            }
            proto::CMD_BLOCK_STATUS if self.contexts.is_empty() => Err(OpError::new(
                proto::EINVAL,
                "no metadata context was negotiated",
            )),
            proto::CMD_BLOCK_STATUS if r.len == 0 => {
                Err(OpError::new(proto::EINVAL, "block status of 0 bytes"))
            }
            proto::CMD_FLUSH => Ok(()),
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
                if self.export.read_only() =>
            {
                Err(OpError::new(proto::EPERM, "the export is read-only"))
            }
            _ => self.export.check_range(r.offset, len),
        }
    }

    fn send(&self, parts: &[&[u8]]) -> bool {
        let mut w = lock(self.writer);
        parts.iter().all(|p| w.write_all(p).is_ok())
    }

    /// Carries out one request and sends its reply; false when the reply
    /// could not be written.
    fn run(&self, job: Job) -> bool {
        let r = job.req;
        if let Some(e) = job.refused {
            return self.reply_error(&r, &e);
        }
        let fua = r.flags & proto::CMD_FLAG_FUA != 0;
        let len = u64::from(r.len);
        let done = match r.command {
            proto::CMD_READ => return self.read(&r),
            proto::CMD_BLOCK_STATUS => return self.block_status(&r),
            proto::CMD_WRITE => self.export.write(r.offset, &job.payload, fua),
            proto::CMD_FLUSH => self.export.flush(),
            proto::CMD_TRIM => self.export.trim(r.offset, len, fua),
            proto::CMD_CACHE => self.export.cache(r.offset, len),
            proto::CMD_WRITE_ZEROES => self.export.write_zeroes(
                r.offset,
                len,
                r.flags & proto::CMD_FLAG_NO_HOLE == 0,
                r.flags & proto::CMD_FLAG_FAST_ZERO != 0,
                fua,
            ),
            c => Err(OpError::new(proto::EINVAL, format!("unknown command {c}"))),
        };
        match done {
            Ok(()) => self.send(&[&proto::simple_reply(r.cookie, 0)]),
            Err(e) => self.reply_error(&r, &e),
        }
    }

    fn reply_error(&self, r: &Request, e: &OpError) -> bool {
        let structured_only = matches!(r.command, proto::CMD_READ | proto::CMD_BLOCK_STATUS);
        if self.structured && structured_only {
            self.send(&[&proto::error_chunk(r.cookie, e.errno, &e.message)])
        } else {
            self.send(&[&proto::simple_reply(r.cookie, e.errno)])
        }
    }

    fn read(&self, r: &Request) -> bool {
        let len = r.len as usize;
        if !self.structured {
            let mut buf = vec![0u8; len];
            return match self.export.read(r.offset, &mut buf) {
                Ok(()) => self.send(&[&proto::simple_reply(r.cookie, 0), &buf]),
                Err(e) => self.reply_error(r, &e),
            };
        }
        if len == 0 {
            return self.send(&[&proto::done_chunk(r.cookie)]);
        }
        let df = r.flags & proto::CMD_FLAG_DF != 0;
        let mut buf = vec![0u8; len];
        // Zero ranges become holes, unless the client wants one chunk.
        let pieces = if df {
            match self.export.read(r.offset, &mut buf) {
                Ok(()) => vec![(0, u64::from(r.len), false)],
                Err(e) => return self.reply_error(r, &e),
            }
        } else {
            match self.export.read_sparse(r.offset, &mut buf, MAX_EXTENTS) {
                Ok(p) => p,
                Err(e) => return self.reply_error(r, &e),
            }
        };
        let last = pieces.len() - 1;
        let mut w = lock(self.writer);
        for (i, &(at, n, zero)) in pieces.iter().enumerate() {
            let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
            let offset = r.offset + at;
            let sent = if zero {
                w.write_all(&proto::hole_chunk(r.cookie, flags, offset, n as u32))
            } else {
                let head = proto::data_chunk_header(r.cookie, flags, offset, n as u32);
                w.write_all(&head)
                    .and_then(|()| w.write_all(&buf[at as usize..(at + n) as usize]))
            };
            if sent.is_err() {
                return false;
            }
        }
        true
    }

    fn block_status(&self, r: &Request) -> bool {
        let max = if r.flags & proto::CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let extents = match self.export.extents(r.offset, u64::from(r.len), max) {
            Ok(x) => x,
            Err(e) => return self.reply_error(r, &e),
        };
        let last = self.contexts.len() - 1;
        let mut chunks = Vec::new();
        for (i, c) in self.contexts.iter().enumerate() {
            let mut out: Vec<(u32, u32)> = Vec::new();
            let values: Vec<(u64, u32)> = match c {
                Context::Allocation => extents.iter().map(|e| (e.len, e.flags())).collect(),
                Context::Depth => extents.iter().map(|e| (e.len, e.depth)).collect(),
                Context::Bitmap(b) => {
                    match self.export.dirty_runs(*b, r.offset, u64::from(r.len), max) {
                        Ok(runs) => runs.iter().map(|&(n, d)| (n, u32::from(d))).collect(),
                        Err(e) => return self.reply_error(r, &e),
                    }
                }
            };
            for (len, value) in values {
                match out.last_mut() {
                    Some(l) if l.1 == value => l.0 += len as u32,
                    _ => out.push((len as u32, value)),
                }
            }
            let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
            chunks.push(proto::block_status_chunk(r.cookie, flags, c.id(), &out));
        }
        let parts: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        self.send(&parts)
    }
}
