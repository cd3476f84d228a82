//! Listening and accepting: a Unix socket or TCP addresses, at most
//! `shared` clients at once (further connections wait in the listen
//! backlog, as with qemu-nbd), a time limit on each handshake, and the
//! end of serving when the last client leaves (unless persistent).

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::export::{lock, Export};
use super::handshake::{self, Ended};
use super::stream::Socket;
use super::transmit::{self, End};

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A Unix domain socket (its path is removed when serving ends).
    Unix(UnixListener, PathBuf),
    /// TCP sockets (one per address the name resolved to).
    Tcp(Vec<TcpListener>),
}

/// How connections are handled.
#[derive(Clone)]
pub struct ServerConfig {
    /// Clients served at once; 0: no limit but [`MAX_CLIENTS`].
    pub shared: u32,
    /// Keep serving after the last client leaves.
    pub persistent: bool,
    /// Time a client has to finish the handshake; `None`: no limit.
    pub handshake_limit: Option<Duration>,
    /// TLS, mandatory when given.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Print each client's end on stderr.
    pub verbose: bool,
}

/// The most clients served at once, even with `--shared=0`.
pub const MAX_CLIENTS: u32 = 128;

/// The connection count, and whether serving is over.
struct State {
    active: u32,
    served: u64,
    over: bool,
}

/// Counts a client out when its thread ends, however it ends.
struct Leave<'a>(&'a Server);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.left();
    }
}

/// A running server's shared state.
pub struct Server {
    export: Arc<Export>,
    config: ServerConfig,
    state: Mutex<State>,
    changed: Condvar,
}

impl Server {
    /// A server of `export`.
    pub fn new(export: Arc<Export>, config: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            export,
            config,
            state: Mutex::new(State {
                active: 0,
                served: 0,
                over: false,
            }),
            changed: Condvar::new(),
        })
    }

    /// The export served.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    fn limit(&self) -> u32 {
        match self.config.shared {
            0 => MAX_CLIENTS,
            n => n.min(MAX_CLIENTS),
        }
    }

    /// Starts accepting on `listener` (one thread per listening socket).
    pub fn start(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        match listener {
            Listener::Unix(l, _) => {
                let me = self.clone();
                std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || me.accept_loop(|| l.accept().map(|(s, _)| Socket::Unix(s))))?;
            }
            Listener::Tcp(ls) => {
                for l in ls {
                    let me = self.clone();
                    std::thread::Builder::new()
                        .name("nbd-accept".into())
                        .spawn(move || {
                            me.accept_loop(|| {
                                l.accept().map(|(s, _)| {
                                    let _ = s.set_nodelay(true);
                                    Socket::Tcp(s)
                                })
                            })
                        })?;
                }
            }
        }
        Ok(())
    }

    /// Waits until serving is over: the last client left (unless
    /// persistent) or [`Server::stop`] was called.
    pub fn wait(&self) {
        let mut s = lock(&self.state);
        while !s.over {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends serving (a signal).
    pub fn stop(&self) {
        lock(&self.state).over = true;
        self.changed.notify_all();
    }

    fn accept_loop(self: Arc<Self>, accept: impl Fn() -> io::Result<Socket>) {
        loop {
            // A free slot first: further clients wait in the backlog.
            {
                let mut s = lock(&self.state);
                while s.active >= self.limit() && !s.over {
                    s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                if s.over {
                    return;
                }
            }
            let sock = match accept() {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: try again after
                    // the next client leaves, or now.
                    if self.config.verbose {
                        eprintln!("qcow2 serve: accept: {e}");
                    }
                    let s = lock(&self.state);
                    if s.active > 0 {
                        let _unused = self
                            .changed
                            .wait_timeout(s, Duration::from_millis(100))
                            .unwrap_or_else(|p| p.into_inner());
                    }
                    continue;
                }
            };
            {
                let mut s = lock(&self.state);
                s.active += 1;
                s.served += 1;
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-client".into())
                .spawn(move || {
                    // Counted out even if serving the client panics (a bug).
                    let _leave = Leave(&me);
                    me.client(sock);
                });
            if spawned.is_err() {
                self.left();
            }
        }
    }

    fn left(&self) {
        let mut s = lock(&self.state);
        s.active -= 1;
        if s.active == 0 && !self.config.persistent {
            s.over = true;
        }
        self.changed.notify_all();
    }

    fn client(&self, sock: Socket) {
        let _ = sock.set_read_timeout(self.config.handshake_limit);
        let session = handshake::negotiate(&sock, &self.export, self.config.tls.as_ref());
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                if self.config.verbose {
                    match e {
                        Ended::Closed => eprintln!("qcow2 serve: client left during the handshake"),
                        Ended::Protocol(m) => eprintln!("qcow2 serve: handshake: {m}"),
                        Ended::Io(e) => eprintln!("qcow2 serve: handshake: {e}"),
                    }
                }
                sock.shutdown();
                return;
            }
        };
        let _ = sock.set_read_timeout(None);
        let end = transmit::serve(session, &self.export, &|| sock.shutdown());
        if self.config.verbose {
            match end {
                End::Disconnected => eprintln!("qcow2 serve: client disconnected"),
                End::Protocol(m) => eprintln!("qcow2 serve: client dropped: {m}"),
                End::Io(e) => eprintln!("qcow2 serve: client dropped: {e}"),
            }
        }
        sock.shutdown();
    }
}
