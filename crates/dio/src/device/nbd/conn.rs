//! The byte stream under an NBD connection: a TCP or Unix-domain socket, with
//! timeouts; the link over it, plain or TLS; and the reader's buffered side that
//! can resume a read across timeouts (so a quiet but healthy server is told apart
//! from a stalled one).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::tls::TlsLink;
use super::uri::{Address, NbdUri};
use crate::{Error, Result};

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connect to the server named by `uri`, within `timeout` per address tried.
    pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Stream> {
        match &uri.address {
            Address::Unix(path) => UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|e| Error::os(format!("connect to NBD socket {}", path.display()), e)),
            Address::Tcp { host, port } => {
                let what = || format!("connect to NBD server {host}:{port}");
                let addrs = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| Error::os(format!("resolve {host}"), e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            // Requests are small and latency-bound: never wait to
                            // coalesce them.
                            s.set_nodelay(true).map_err(|e| Error::os(what(), e))?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(Error::os(what(), last))
            }
        }
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Receive timeout of blocking reads (`SO_RCVTIMEO`).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Send timeout of blocking writes (`SO_SNDTIMEO`).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Shut both directions down: wakes a thread blocked reading or writing.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Write every byte of `bufs`, in order.
    pub fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        send(fd, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `sendmsg` with `MSG_NOSIGNAL`: a server that hung up is an `EPIPE` error, not a
/// `SIGPIPE` that kills a host program which did not ignore it (Rust's `main`
/// ignores it; C's does not).
fn send(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads the iovecs
    // and the memory they point to, which `bufs` borrows for the call.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    // SAFETY: `msg` points to `msg_iovlen` valid iovecs over live memory.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The connection after the handshake's greeting: the socket itself, or TLS over it.
pub enum Link {
    Plain(Stream),
    Tls(Box<TlsLink>),
}

impl Link {
    /// The socket under the link (timeouts, shutdown).
    pub fn socket(&self) -> &Stream {
        match self {
            Link::Plain(s) => s,
            Link::Tls(t) => t.socket(),
        }
    }

    /// Split into the end that reads (this one, with whatever it has buffered)
    /// and an end that sends.
    pub fn split(self) -> io::Result<(Link, Link)> {
        let sender = match &self {
            Link::Plain(s) => Link::Plain(s.try_clone()?),
            Link::Tls(t) => Link::Tls(Box::new(t.sender()?)),
        };
        Ok((self, sender))
    }

    /// Write every byte of `bufs`, in order.
    pub fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.write_all_vectored(bufs),
            Link::Tls(t) => {
                IoSlice::advance_slices(&mut bufs, 0);
                while !bufs.is_empty() {
                    match t.write_vectored(bufs) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    }

    /// End the TLS session politely (nothing to do in plaintext).
    pub fn close_notify(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(_) => Ok(()),
            Link::Tls(t) => t.close_notify(),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(t) => t.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write_vectored(bufs),
            Link::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a read that timed out should do: keep waiting, or give up with an error.
pub trait Patience {
    /// Called after `idle` without a byte; `mid_message` says whether a reply is
    /// partly read. `Err` ends the read.
    fn on_idle(&mut self, idle: Duration, mid_message: bool) -> io::Result<()>;
}

/// The receiving side of the connection: a small buffer for headers, direct reads
/// into request memory for payloads, and progress tracking across the socket's
/// receive timeout ticks.
pub struct Incoming {
    stream: Link,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    last_byte: Instant,
}

/// Payloads at least this long skip the buffer and land in request memory.
const DIRECT_MIN: usize = 16 * 1024;

impl Incoming {
    pub fn new(stream: Link) -> Incoming {
        Incoming {
            stream,
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            last_byte: Instant::now(),
        }
    }

    /// Fill `dst` completely. `first` says whether `dst` starts a new message (a
    /// quiet socket between messages is only idle, not stalled).
    pub fn read_exact(
        &mut self,
        dst: &mut [u8],
        first: bool,
        patience: &mut dyn Patience,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                done += n;
                continue;
            }
            let want = dst.len() - done;
            let got = if want >= DIRECT_MIN {
                self.stream.read(&mut dst[done..])
            } else {
                self.start = 0;
                self.end = 0;
                self.stream.read(&mut self.buf)
            };
            match got {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "NBD server closed the connection",
                    ))
                }
                Ok(n) => {
                    self.last_byte = Instant::now();
                    if want >= DIRECT_MIN {
                        done += n;
                    } else {
                        self.end = n;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let mid = !first || done > 0;
                    patience.on_idle(self.last_byte.elapsed(), mid)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
