//! A client connection's byte streams: a Unix or TCP socket, plain or
//! wrapped in TLS after `NBD_OPT_STARTTLS`, split into a reading half
//! (the connection's request reader) and a writing half shared by the
//! threads that send replies.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::export::lock;

/// A connected socket.
#[derive(Debug)]
pub enum Socket {
    /// A Unix domain socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Socket {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    /// Sets the timeout of reads (`None`: wait for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Closes both directions (wakes a thread blocked reading it).
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading half of a connection.
pub type Reader = Box<dyn Read + Send>;

/// The writing half of a connection, shared by the threads replying.
pub type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// The two halves of a plain connection.
pub fn plain(sock: &Socket) -> io::Result<(Reader, Writer)> {
    let r: Reader = Box::new(sock.try_clone()?);
    let w: Box<dyn Write + Send> = Box::new(sock.try_clone()?);
    Ok((r, Arc::new(Mutex::new(w))))
}

/// The two halves of a TLS connection over `sock` (the TLS handshake runs
/// as the reading half is first read).
pub fn tls(sock: &Socket, conn: rustls::ServerConnection) -> io::Result<(Reader, Writer)> {
    let conn = Arc::new(Mutex::new(conn));
    let r = TlsReader {
        conn: conn.clone(),
        sock: sock.try_clone()?,
        out: sock.try_clone()?,
        pending: Vec::new(),
        at: 0,
    };
    let w = TlsWriter {
        conn,
        sock: sock.try_clone()?,
    };
    let w: Box<dyn Write + Send> = Box::new(w);
    Ok((Box::new(r), Arc::new(Mutex::new(w))))
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// Reads plaintext: records are read from the socket without holding the
/// session's lock, then fed to it; whatever the session must send back
/// (handshake messages, alerts) is written under the lock, so it keeps
/// its order with the replies.
struct TlsReader {
    conn: Arc<Mutex<rustls::ServerConnection>>,
    sock: Socket,
    out: Socket,
    /// Bytes read from the socket not yet taken by the session.
    pending: Vec<u8>,
    at: usize,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut c = lock(&self.conn);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.at < self.pending.len() {
                    let mut rd = &self.pending[self.at..];
                    let before = rd.len();
                    c.read_tls(&mut rd)?;
                    self.at += before - rd.len();
                    let state = c.process_new_packets();
                    // An alert for the peer goes out even on failure.
                    while c.wants_write() {
                        c.write_tls(&mut self.out)?;
                    }
                    state.map_err(tls_error)?;
                    continue;
                }
            }
            self.pending.resize(16 * 1024 + 5, 0);
            self.at = 0;
            let n = self.sock.read(&mut self.pending)?;
            self.pending.truncate(n);
            if n == 0 {
                return Ok(0);
            }
        }
    }
}

/// Writes plaintext into the session and its records to the socket.
struct TlsWriter {
    conn: Arc<Mutex<rustls::ServerConnection>>,
    sock: Socket,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut c = lock(&self.conn);
        // The session takes as much plaintext as its buffer holds: encrypt
        // and send that, then take more.
        let mut done = 0;
        while done < buf.len() {
            let n = c.writer().write(&buf[done..])?;
            while c.wants_write() {
                c.write_tls(&mut self.sock)?;
            }
            if n == 0 && !c.wants_write() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
