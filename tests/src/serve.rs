//! `qcow2 serve` (and `qemu-nbd`) run as child processes for the NBD
//! tests: started on a Unix socket in the test's directory or on a free
//! loopback port, known to listen before a client connects, and killed
//! when the guard goes away.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bin;

/// The environment variable that makes `qcow2 serve` write one byte to its
/// standard output once it listens (what `--fork` waits for).
const READY_ENV: &str = "QCOWKIT_SERVE_READY_PIPE";

/// A running server.
pub struct Served {
    child: Child,
    /// The export's URI for qemu-img, qemu-io and libnbd (`nbd+unix://` or
    /// `nbd://127.0.0.1:PORT/`).
    pub uri: String,
    /// The Unix socket, when listening on one.
    pub socket: Option<PathBuf>,
    /// The TCP port, when listening on loopback.
    pub port: Option<u16>,
    /// Where the server's standard error goes.
    pub stderr: PathBuf,
}

/// Where a server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// A Unix socket `NAME.sock` in the directory.
    Unix,
    /// A free TCP port on 127.0.0.1.
    Tcp,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    l.local_addr().expect("its address").port()
}

impl Served {
    /// Starts `qcow2 serve ARGS -x EXPORT IMAGE` in `dir` on `on` and waits
    /// until it listens (at most 60 s). A TCP port taken by another test in
    /// the meantime is replaced by a new one.
    pub fn ours(dir: &Path, on: On, export: &str, args: &[&str], image: &str) -> Served {
        for _attempt in 0..5 {
            let (listen, socket, port) = match on {
                On::Unix => {
                    let s = dir.join(format!(
                        "{}.sock",
                        if export.is_empty() { "default" } else { export }
                    ));
                    (
                        vec!["-k".to_string(), s.display().to_string()],
                        Some(s),
                        None,
                    )
                }
                On::Tcp => {
                    let p = free_port();
                    (
                        vec!["-b".into(), "127.0.0.1".into(), "-p".into(), p.to_string()],
                        None,
                        Some(p),
                    )
                }
            };
            let stderr = dir.join(format!("serve-{}.err", std::process::id()));
            let mut cmd = Command::new(bin("qcow2"));
            cmd.current_dir(dir)
                .arg("serve")
                .args(&listen)
                .args(["-x", export])
                .args(args)
                .arg(image)
                .env(READY_ENV, "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&stderr).expect("stderr file"));
            let mut child = cmd.spawn().expect("qcow2 serve starts");
            let mut out = child.stdout.take().expect("stdout");
            let mut b = [0u8; 1];
            if matches!(out.read(&mut b), Ok(1)) {
                let uri = match (&socket, port) {
                    (Some(s), _) => format!("nbd+unix:///{export}?socket={}", s.display()),
                    (None, Some(p)) => format!("nbd://127.0.0.1:{p}/{export}"),
                    _ => unreachable!(),
                };
                return Served {
                    child,
                    uri,
                    socket,
                    port,
                    stderr,
                };
            }
            let status = child.wait().expect("wait");
            let err = std::fs::read_to_string(&stderr).unwrap_or_default();
            if on == On::Tcp && err.contains("Address already in use") {
                continue;
            }
            panic!("qcow2 serve did not start ({status}): {err}");
        }
        panic!("no free loopback port after 5 attempts");
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits at most `limit` for the server to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::yield_now();
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM and waits for the exit (at most 60 s).
    pub fn stop(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(Duration::from_secs(60))
            .expect("the server exits on SIGTERM")
    }

    /// SIGKILL, as a crash, and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills process `0` (SIGKILL) when dropped, if it is still running: for
/// daemons a test started with `--fork`.
pub struct Reap(pub u32);

impl Drop for Reap {
    fn drop(&mut self) {
        if Path::new(&format!("/proc/{}", self.0)).exists() {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}

/// Starts `qemu-nbd --fork --pid-file ... ARGS` in `dir` (it returns once
/// listening) and returns the guard that kills the daemon.
pub fn qemu_nbd_daemon(dir: &Path, args: &[&str]) -> Reap {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid_file = dir.join(format!("qemu-nbd-{n}.pid"));
    let out = Command::new("qemu-nbd")
        .current_dir(dir)
        .arg("--fork")
        .arg("--pid-file")
        .arg(&pid_file)
        .args(args)
        .output()
        .expect("qemu-nbd runs");
    assert!(
        out.status.success(),
        "qemu-nbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .expect("qemu-nbd's pid file");
    Reap(pid)
}
