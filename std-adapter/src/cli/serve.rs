//! `qcow2 serve`: an image served over NBD, with qemu-nbd's flags.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use super::{open_options, parse_format};
use crate::nbd::export::{Backend, DetectZeroes, Discard, Export, ExportConfig};
use crate::nbd::server::{Listener, Server, ServerConfig};
use crate::{CacheMode, Disk, DiskOptions, FileIo, Follow, Format};

/// Set in the environment of the server `--fork` starts (`fork`): it
/// writes one byte to its standard output once it listens, then lets go
/// of stdout and stderr. Any other value only writes the byte (tests use
/// it to know when the server listens).
const READY_ENV: &str = "QCOWKIT_SERVE_READY_PIPE";

/// Arguments of `qcow2 serve` (qemu-nbd's).
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 serve -k /run/vm.sock -x vm -t vm.qcow2\n      qemu-img info 'nbd+unix:///vm?socket=/run/vm.sock'\n  qcow2 serve -b 127.0.0.1 -p 10809 -r -e 4 vm.qcow2\n      nbd-client 127.0.0.1 10809 /dev/nbd0 -N ''\n  qcow2 serve --object tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server --tls-creds tls0 vm.qcow2"
)]
pub struct Args {
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// Address to listen on (default 0.0.0.0).
    #[arg(short = 'b', long = "bind")]
    pub bind: Option<String>,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", conflicts_with_all = ["port", "bind"])]
    pub socket: Option<PathBuf>,
    /// The export's name (default: empty).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    pub export_name: String,
    /// The export's description.
    #[arg(short = 'D', long = "description")]
    pub description: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Clients served at once (default 1; 0: up to 128).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    pub shared: u32,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,
    /// Image format, qcow2 or raw (probed when omitted).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Writes go to a temporary overlay, deleted at exit; the image is
    /// not changed (with `-r`, nothing to write: no overlay).
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,
    /// Serve this internal snapshot (ID or name), read-only.
    #[arg(short = 'l', long = "load-snapshot")]
    pub load_snapshot: Option<String>,
    /// The same as `--cache=none`.
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// Cache mode: writeback (default), none, writethrough, directsync,
    /// unsafe.
    #[arg(long = "cache", value_enum)]
    pub cache: Option<CacheMode>,
    /// Accepted for qemu-nbd compatibility (threads, native, io_uring):
    /// I/O is positional reads and writes from worker threads.
    #[arg(long = "aio")]
    pub aio: Option<String>,
    /// What trims do: ignore (default) or unmap (`on` is unmap, `off`
    /// ignore).
    #[arg(long = "discard")]
    pub discard: Option<String>,
    /// Writes of zeros become zero writes: off (default), on, unmap.
    #[arg(long = "detect-zeroes")]
    pub detect_zeroes: Option<String>,
    /// Offer the `qemu:allocation-depth` metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Offer the persistent bitmap NAME as `qemu:dirty-bitmap:NAME`
    /// (repeatable); it must be consistent (not flagged in use).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    pub bitmaps: Vec<String>,
    /// TLS with the `--object tls-creds-x509` of this id (clients must
    /// use TLS).
    #[arg(long = "tls-creds")]
    pub tls_creds: Option<String>,
    /// Seconds a client has for the handshake (0: no limit; default 10).
    #[arg(long = "handshake-limit", default_value_t = 10)]
    pub handshake_limit: u64,
    /// Write the server's process id to this file (removed at exit).
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Run in the background once listening; the command returns then.
    #[arg(long = "fork")]
    pub fork: bool,
    /// Report each client's end on stderr.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// The image.
    pub filename: String,
}

/// Runs `qcow2 serve`.
pub fn run(a: &Args) -> u8 {
    if a.fork && std::env::var_os(READY_ENV).is_none() {
        return fork();
    }
    match serve(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

/// `--fork`: starts this command again without `--fork` in its own
/// process group, relays what it prints on stderr until it listens, and
/// returns then (0), or when it fails (1).
fn fork() -> u8 {
    let args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .collect();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("qcow2: cannot start the server: {e}");
            return 1;
        }
    };
    let child = Command::new(exe)
        .args(&args)
        .env(READY_ENV, "fork")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qcow2: cannot start the server: {e}");
            return 1;
        }
    };
    let relay = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::stderr());
        })
    });
    let mut byte = [0u8; 1];
    let ready = child
        .stdout
        .take()
        .is_some_and(|mut out| matches!(out.read(&mut byte), Ok(1)));
    // The server lets go of its stderr once it listens (or exits).
    if let Some(r) = relay {
        let _ = r.join();
    }
    if ready {
        0
    } else {
        let _ = child.wait();
        1
    }
}

/// Tells whoever started this server that it listens: one byte on
/// stdout; a daemon of `--fork` then lets go of stdout and stderr.
fn notify_ready() {
    let Some(how) = std::env::var_os(READY_ENV) else {
        return;
    };
    let mut out = std::io::stdout();
    let _ = out.write_all(b"1").and_then(|()| out.flush());
    if how == "fork" {
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
    }
}

fn parse_discard(s: Option<&str>) -> Result<Discard, String> {
    match s {
        None | Some("ignore" | "off") => Ok(Discard::Ignore),
        Some("unmap" | "on") => Ok(Discard::Unmap),
        Some(o) => Err(format!("Invalid discard option '{o}'")),
    }
}

fn parse_detect_zeroes(s: Option<&str>, discard: Discard) -> Result<DetectZeroes, String> {
    match s {
        None | Some("off") => Ok(DetectZeroes::Off),
        Some("on") => Ok(DetectZeroes::On),
        Some("unmap") if discard == Discard::Unmap => Ok(DetectZeroes::Unmap),
        Some("unmap") => Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into()),
        Some(o) => Err(format!("Invalid detect-zeroes option '{o}'")),
    }
}

/// Read handles of a read-only export: reads run in parallel on them.
fn pool_size() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(2, 8)
}

fn open_backend(a: &Args, format: Option<Format>, cache: CacheMode) -> Result<Backend, String> {
    let path = Path::new(&a.filename);
    let could_not = |e: &dyn std::fmt::Display| format!("Could not open '{}': {e}", a.filename);
    let read_only = a.read_only || a.load_snapshot.is_some();
    if a.snapshot && !read_only {
        return snapshot_overlay(a, format, cache);
    }
    if read_only {
        let opts = DiskOptions {
            format,
            qcow2: open_options(),
            // Clients ask for what they want, several requests at once:
            // a window per handle would read the same data ahead twice.
            read_ahead: 0,
            ..DiskOptions::default()
        };
        let mut disks = Vec::new();
        for _ in 0..pool_size() {
            let mut d = Disk::open_with_cache(path, &opts, cache).map_err(|e| could_not(&e))?;
            if let Some(name) = &a.load_snapshot {
                let crate::DiskImage::Qcow2(img) = d.image_mut() else {
                    return Err(format!(
                        "'{}' is a raw image: it has no snapshots",
                        a.filename
                    ));
                };
                let found = img.load_snapshot(name).map_err(|e| could_not(&e))?;
                if !found {
                    return Err(format!(
                        "Failed to load snapshot: Can't find snapshot '{name}'"
                    ));
                }
            }
            disks.push(d);
        }
        return Ok(Backend::ReadOnly(disks));
    }
    let format = match format {
        Some(f) => f,
        None => FileIo::open(path)
            .and_then(|mut io| crate::probe(&mut io))
            .map_err(|e| could_not(&e))?,
    };
    match format {
        Format::Qcow2 => {
            let img = crate::open_qcow2_rw_with(path, &open_options(), Follow::Any, cache)
                .map_err(|e| could_not(&e))?;
            Ok(Backend::Qcow2(Box::new(img)))
        }
        Format::Raw => {
            let mut io = FileIo::open_rw_with(path, cache).map_err(|e| could_not(&e))?;
            crate::lock::lock(io.file(), crate::lock::Access::Write).map_err(|e| could_not(&e))?;
            let size = qcowkit_core::BlockRead::len(&mut io).map_err(|e| could_not(&e))?;
            Ok(Backend::Raw(io, size))
        }
    }
}

/// `-s`: a new qcow2 overlay over the image in the temporary directory,
/// opened and then unlinked (it goes away with the server).
fn snapshot_overlay(a: &Args, format: Option<Format>, cache: CacheMode) -> Result<Backend, String> {
    let path = Path::new(&a.filename);
    let could_not = |e: &dyn std::fmt::Display| format!("Could not open '{}': {e}", a.filename);
    let absolute = std::fs::canonicalize(path).map_err(|e| could_not(&e))?;
    let base = Disk::open(
        path,
        &DiskOptions {
            format,
            qcow2: open_options(),
            ..DiskOptions::default()
        },
    )
    .map_err(|e| could_not(&e))?;
    let (size, fmt) = (base.size(), base.format());
    drop(base);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let overlay = std::env::temp_dir().join(format!(
        "qcow2-serve-snapshot-{}-{nanos:08x}.qcow2",
        std::process::id()
    ));
    let opts = qcowkit_core::CreateOptions {
        size,
        backing_file: Some(absolute.to_string_lossy().into_owned()),
        backing_format: Some(fmt.name().to_string()),
        ..qcowkit_core::CreateOptions::default()
    };
    let created = crate::create_qcow2_with(&overlay, &opts, cache);
    let _ = std::fs::remove_file(&overlay);
    let img = created.map_err(|e| format!("Could not create the temporary overlay: {e}"))?;
    Ok(Backend::Qcow2(Box::new(img)))
}

fn listen(a: &Args) -> Result<Listener, String> {
    if let Some(path) = &a.socket {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(format!(
                    "Failed to bind socket to {}: the path exists and is not a socket",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path)
            .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
        return Ok(Listener::Unix(l, path.clone()));
    }
    let host = a.bind.as_deref().unwrap_or("0.0.0.0");
    let port = a.port.unwrap_or(10809);
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("address resolution failed for {host}:{port}: {e}"))?;
    let mut ls = Vec::new();
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr) {
            Ok(l) => ls.push(l),
            Err(e) => last = Some(format!("Failed to bind socket to {addr}: {e}")),
        }
    }
    if ls.is_empty() {
        return Err(last.unwrap_or(format!("no address for {host}:{port}")));
    }
    Ok(Listener::Tcp(ls))
}

/// Signals that end serving: blocked in every thread, taken by one.
fn block_signals() -> Result<nix::sys::signal::SigSet, String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    Ok(set)
}

fn serve(a: &Args) -> Result<(), String> {
    // Before any thread starts, so that all of them inherit the mask.
    let signals = block_signals()?;
    let format = parse_format(&a.format)?;
    let cache = if a.nocache {
        CacheMode::None
    } else {
        a.cache.unwrap_or(CacheMode::Writeback)
    };
    let discard = parse_discard(a.discard.as_deref())?;
    let detect_zeroes = parse_detect_zeroes(a.detect_zeroes.as_deref(), discard)?;
    if let Some(aio) = &a.aio {
        if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
            return Err(format!("Invalid aio mode '{aio}'"));
        }
    }
    let tls = match &a.tls_creds {
        Some(id) => Some(super::tls_creds(id)?.server_config()?),
        None => None,
    };
    let backend = open_backend(a, format, cache)?;
    let config = ExportConfig {
        name: a.export_name.clone(),
        description: a.description.clone(),
        discard,
        detect_zeroes,
        allocation_depth: a.allocation_depth,
        // One image object behind every connection: a flush on any of
        // them makes every completed write durable.
        multi_conn: a.shared != 1,
        bitmaps: a.bitmaps.clone(),
    };
    let export = Arc::new(Export::new(config, backend)?);
    export.check_bitmaps()?;
    let listener = listen(a)?;
    let socket_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    let server = Server::new(
        export.clone(),
        ServerConfig {
            shared: a.shared,
            persistent: a.persistent,
            handshake_limit: (a.handshake_limit > 0)
                .then(|| Duration::from_secs(a.handshake_limit)),
            tls,
            verbose: a.verbose,
        },
    );
    server
        .start(listener)
        .map_err(|e| format!("cannot start serving: {e}"))?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file '{}': {e}", p.display()))?;
    }
    {
        let me = server.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.wait().is_ok() {
                    me.stop();
                }
            })
            .map_err(|e| format!("cannot start serving: {e}"))?;
    }
    notify_ready();
    server.wait();
    let closed = export.close();
    if let Some(p) = &socket_path {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    closed.map_err(|e| format!("Failed to flush '{}': {}", a.filename, e.message))
}
