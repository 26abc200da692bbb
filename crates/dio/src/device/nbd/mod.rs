//! The NBD back end: a block device served over the Network Block Device protocol
//! (qemu-nbd, nbdkit, rbd-nbd, ...) on a TCP or Unix-domain socket.
//!
//! One connection carries many requests at once, told apart by a cookie. Callers
//! send under one writer lock (a request header, then a write's data straight from
//! request memory); a reader thread reads every reply, moves read data straight
//! into request memory, and completes requests ([`CompletionMode::Interrupt`]).
//! Structured replies are used where the server offers them (data chunks, holes,
//! errors with messages, block status), and `base:allocation` block status tells
//! data from holes for sparse copies ([`NbdDevice::allocation`]).
//!
//! Nothing the server sends is trusted: a reply with an unknown cookie, a bad magic
//! number, an impossible length or chunk, a server that closes the socket, stays
//! silent for [`NbdConfig::timeout`] while requests wait, or leaves one request
//! unanswered that long while it answers others, each ends the connection:
//! every request in flight completes with an error, later ones fail at once. No
//! reply can make the device panic or hang.
//!
//! With [`NbdConfig::connections`] above one and a server that allows it
//! (`NBD_FLAG_CAN_MULTI_CONN`), the device opens several connections to the export,
//! each with its own writer lock and reader thread, and every submitting thread
//! keeps to one of them: threads doing I/O at once share no lock and no socket. A
//! server without multi-conn gets one connection. A connection that dies fails
//! what it had in flight; later requests go to the connections still up.
//!
//! It knows nothing of files or block maps; [`crate::nbd::NbdFile`] puts a file on it.

mod conn;
mod handshake;
mod proto;
mod reader;
mod table;
mod tls;
mod uri;

use crate::error::Feature;
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use self::conn::{Link, Stream};
use self::handshake::Export;
use self::proto::*;
use self::reader::{reader_main, tick};
use self::table::{errno, lock, pieces, Dead, Outcome, Shared, Table, Target, Waiter};
use super::{check_request, CompletionMode, Device, Geometry, Op, Request};
use crate::buf::Segments;
use crate::{Error, Result};

pub use uri::{Address, NbdUri, TlsOptions, DEFAULT_PORT};

/// Largest request dio sends, whatever the server allows (qemu's limit too).
pub const MAX_REQUEST: u32 = 32 << 20;

/// How an [`NbdDevice`] connects and behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdConfig {
    /// How long the server may stay silent while requests wait for it, or leave
    /// any one request unanswered (and how long a connect, a handshake step or a
    /// blocked send may take) before the connection is declared dead and every
    /// request in flight fails.
    pub timeout: Duration,
    /// Ask for structured replies (holes in reads, error messages, block status).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (needs structured replies).
    pub block_status: bool,
    /// Cap on request size in bytes (also capped by the server and [`MAX_REQUEST`]).
    pub max_request: u32,
    /// Connections to open to the export when the server allows several
    /// (`NBD_FLAG_CAN_MULTI_CONN`); each submitting thread uses one of them. One
    /// (the default) without multi-conn, or if the extra connections fail (see
    /// [`NbdDevice::connections`]).
    pub connections: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            timeout: Duration::from_secs(30),
            structured_replies: true,
            block_status: true,
            max_request: MAX_REQUEST,
            connections: 1,
        }
    }
}

impl NbdConfig {
    /// Set the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Ask for structured replies or not (block status needs them).
    pub fn structured_replies(mut self, on: bool) -> Self {
        self.structured_replies = on;
        self
    }
    /// Ask for `base:allocation` block status or not.
    pub fn block_status(mut self, on: bool) -> Self {
        self.block_status = on;
        self
    }
    /// Cap the request size.
    pub fn max_request(mut self, bytes: u32) -> Self {
        self.max_request = bytes;
        self
    }
    /// Open up to `n` connections where the server allows several.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }
}

/// How long an extra connection's handshake may take: a server that advertises
/// multi-conn but caps its clients (qemu-nbd's `--shared=N`) leaves the surplus ones
/// unanswered in its listen backlog, and opening must not wait the full timeout.
const EXTRA_HANDSHAKE: Duration = Duration::from_secs(2);

/// A run of the export and its allocation state (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// No storage is allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The range reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// A block device on an NBD server. See the module docs.
pub struct NbdDevice {
    /// One or more connections to the export; the first one answered the
    /// device's questions (export, flags, geometry) and the others agreed.
    conns: Vec<Conn>,
    /// Names the device in the threads' connection choices (never reused).
    id: u64,
    /// The connection the next new thread gets (round robin).
    next: AtomicUsize,
}

/// One connection: its shared state and its reader thread.
struct Conn {
    shared: Arc<Shared>,
    reader: Option<thread::JoinHandle<()>>,
}

/// Device ids (for the threads' choices of connection).
static NEXT_DEVICE: AtomicU64 = AtomicU64::new(1);

/// How many devices a thread remembers its connection of.
const CHOICES: usize = 8;

thread_local! {
    /// This thread's connection on the devices with several it used last: (device
    /// id, connection index), the most recent first. A device forgotten here
    /// gives the thread the next connection in its round robin again.
    static CHOSEN: std::cell::RefCell<Vec<(u64, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl NbdDevice {
    /// Connect to the export named by `uri`, negotiate, and start the reader.
    ///
    /// With TLS settings in `uri` (`nbds://`), the connection is upgraded with
    /// `NBD_OPT_STARTTLS` right after the greeting and everything else goes over
    /// TLS; a server that refuses TLS fails the connect.
    ///
    /// Errors: the server unreachable ([`Error::Os`]), no such export
    /// ([`Error::Invalid`]), a server dio cannot talk to ([`Error::Incompatible`];
    /// [`Feature::Tls`] for a server without TLS, or one that requires it from an
    /// `nbd://` URI), a TLS connection refused ([`Error::Tls`]: its kind says why).
    ///
    /// With [`NbdConfig::connections`] above one and a server that allows
    /// multi-conn, more connections are opened the same way; one that fails, or
    /// whose export differs, ends the opening of more (the device works with those
    /// it has: [`NbdDevice::connections`]).
    pub fn connect(uri: &NbdUri, cfg: &NbdConfig) -> Result<NbdDevice> {
        let timeout = cfg.timeout.max(Duration::from_millis(1));
        let first = NbdDevice::open_conn(uri, cfg, timeout)?;
        let mut conns = vec![first];
        let primary = &conns[0].shared.export;
        if cfg.connections > 1 && primary.flags & TFLAG_CAN_MULTI_CONN != 0 {
            let (size, flags) = (primary.size, primary.flags);
            let handshake = timeout.min(EXTRA_HANDSHAKE);
            for _ in 1..cfg.connections.min(64) {
                match NbdDevice::open_conn(uri, cfg, handshake) {
                    Ok(c) if c.shared.export.size == size && c.shared.export.flags == flags => {
                        conns.push(c)
                    }
                    // Dropped (disconnected) right away.
                    Ok(_) | Err(_) => break,
                }
            }
        }
        Ok(NbdDevice::with(conns))
    }

    fn with(conns: Vec<Conn>) -> NbdDevice {
        NbdDevice {
            conns,
            id: NEXT_DEVICE.fetch_add(1, Ordering::Relaxed),
            next: AtomicUsize::new(0),
        }
    }

    /// One connection to `uri`: connect, negotiate (each step within `handshake`),
    /// start its reader.
    fn open_conn(uri: &NbdUri, cfg: &NbdConfig, handshake: Duration) -> Result<Conn> {
        let name = uri.to_string();
        let ctx = |e: Error| context(&name, e);
        // Certificates are read (and unsupported TLS modes refused) before any
        // byte goes to the server.
        let tls = match &uri.tls {
            Some(opts) => Some(tls::client(uri, opts).map_err(ctx)?),
            None => None,
        };
        let stream = Stream::connect(uri, handshake).map_err(ctx)?;
        NbdDevice::start(stream, tls, &uri.export, name, cfg, handshake)
    }

    /// Run NBD over a socket already connected to a server (a socketpair, an
    /// inherited descriptor), in plaintext, for `export`.
    pub fn connect_socket(
        socket: std::os::unix::net::UnixStream,
        export: &str,
        cfg: &NbdConfig,
    ) -> Result<NbdDevice> {
        let name = format!("NBD socket (export {export:?})");
        let timeout = cfg.timeout.max(Duration::from_millis(1));
        let conn = NbdDevice::start(Stream::Unix(socket), None, export, name, cfg, timeout)?;
        Ok(NbdDevice::with(vec![conn]))
    }

    /// Negotiate on a connected `stream` (with TLS when `tls` is given, each step
    /// within `handshake`) and start the reader; `name` names the server in
    /// messages.
    fn start(
        mut stream: Stream,
        tls: Option<tls::Client>,
        export: &str,
        name: String,
        cfg: &NbdConfig,
        handshake: Duration,
    ) -> Result<Conn> {
        let timeout = cfg.timeout.max(Duration::from_millis(1));
        let ctx = |e: Error| context(&name, e);
        let setup = |s: &Stream, t: Duration| -> io::Result<()> {
            s.set_read_timeout(Some(t))?;
            s.set_write_timeout(Some(t))
        };
        setup(&stream, handshake).map_err(|e| ctx(Error::os("socket timeouts", e)))?;
        let greeting = handshake::greet(&mut stream).map_err(ctx)?;
        let mut link = match tls {
            None => Link::Plain(stream),
            Some(client) => {
                // TLS required: a server that refuses it is an error, never a
                // plaintext connection.
                handshake::starttls(&mut stream).map_err(ctx)?;
                Link::Tls(Box::new(tls::handshake(stream, client).map_err(ctx)?))
            }
        };
        let export = handshake::options(
            &mut link,
            &handshake::Wants {
                export,
                structured: cfg.structured_replies,
                block_status: cfg.block_status,
            },
            greeting,
        )
        .map_err(ctx)?;
        let geometry = geometry(&export, cfg.max_request).map_err(ctx)?;

        let tick = tick(timeout);
        let control = link
            .socket()
            .try_clone()
            .map_err(|e| ctx(Error::os("dup socket", e)))?;
        let (reader_link, writer) = link.split().map_err(|e| ctx(Error::os("dup socket", e)))?;
        // The handshake's limit was its own; sends get the I/O timeout.
        setup(writer.socket(), timeout).map_err(|e| ctx(Error::os("socket timeouts", e)))?;
        reader_link
            .socket()
            .set_read_timeout(Some(tick))
            .map_err(|e| ctx(Error::os("socket timeouts", e)))?;
        let shared = Arc::new(Shared {
            uri: name,
            export,
            geometry,
            timeout,
            writer: Mutex::new(writer),
            control,
            table: Mutex::new(Table {
                next_cookie: 1,
                entries: HashMap::new(),
                dead: None,
                busy_since: Instant::now(),
            }),
            closing: AtomicBool::new(false),
            down: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let reader = thread::Builder::new()
            .name("dio-nbd-reader".into())
            .spawn(move || reader_main(&s, reader_link))
            .map_err(|e| Error::os("spawn NBD reader", e))?;
        Ok(Conn {
            shared,
            reader: Some(reader),
        })
    }

    /// The first connection: its export and geometry are the device's.
    fn shared(&self) -> &Arc<Shared> {
        &self.conns[0].shared
    }

    /// The connection of the calling thread (one that is still up, if any is).
    #[inline]
    fn pick(&self) -> &Arc<Shared> {
        let n = self.conns.len();
        if n == 1 {
            return &self.conns[0].shared;
        }
        let slot = self.slot();
        (0..n)
            .map(|i| &self.conns[(slot + i) % n].shared)
            .find(|s| !s.down.load(Ordering::Acquire))
            .unwrap_or(&self.conns[slot % n].shared)
    }

    /// The calling thread's connection index (not reduced modulo the count):
    /// given at its first request, each new thread the next one.
    fn slot(&self) -> usize {
        let found = CHOSEN.try_with(|c| {
            let mut c = c.borrow_mut();
            if let Some(at) = c.iter().position(|&(d, _)| d == self.id) {
                let hit = c[at];
                // Most recent first: a thread on one device finds it at once.
                c[..=at].rotate_right(1);
                return hit.1;
            }
            let slot = self.next.fetch_add(1, Ordering::Relaxed);
            c.insert(0, (self.id, slot));
            c.truncate(CHOICES);
            slot
        });
        // A thread being torn down: any connection will do.
        found.unwrap_or(0)
    }

    /// How many connections the device has to the export (see
    /// [`NbdConfig::connections`]), counting any that died since.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The export size in bytes (the device size is rounded up to a whole block;
    /// the tail past the export reads as zeros and writes there are dropped).
    pub fn export_size(&self) -> u64 {
        self.shared().export.size
    }

    /// The block sizes the server announced: minimum, preferred, maximum.
    pub fn block_sizes(&self) -> Option<(u32, u32, u32)> {
        self.shared().export.block_sizes
    }

    fn has(&self, flag: u16) -> bool {
        self.shared().export.flags & flag != 0
    }

    /// Whether the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.has(TFLAG_READ_ONLY)
    }
    /// Whether the server takes FUA writes (else dio flushes after them).
    pub fn can_fua(&self) -> bool {
        self.has(TFLAG_SEND_FUA)
    }
    /// Whether the server takes flushes (a server without a write cache has none).
    pub fn can_flush(&self) -> bool {
        self.has(TFLAG_SEND_FLUSH)
    }
    /// Whether the server takes trims.
    pub fn can_trim(&self) -> bool {
        self.has(TFLAG_SEND_TRIM)
    }
    /// Whether the server takes write-zeroes commands.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(TFLAG_SEND_WRITE_ZEROES)
    }
    /// Whether the server allows several connections to one export.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TFLAG_CAN_MULTI_CONN)
    }
    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.shared().export.structured
    }
    /// Whether `base:allocation` block status was negotiated.
    pub fn can_block_status(&self) -> bool {
        self.shared().export.allocation_context.is_some()
    }

    /// Why the connection died, if it did (every later request fails with it).
    /// With several connections: why the first one died, once all of them have
    /// (until then, requests go to those still up).
    pub fn dead(&self) -> Option<String> {
        let mut first = None;
        for c in &self.conns {
            let why = lock(&c.shared.table).dead.as_ref().map(|d| d.msg.clone());
            match why {
                Some(w) => {
                    first.get_or_insert(w);
                }
                None => return None,
            }
        }
        first
    }

    /// Discard `[offset, offset + len)` (`NBD_CMD_TRIM`); the range may read back
    /// as anything. Fails with `EOPNOTSUPP` if the server does not take trims.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_trim() {
            return Err(errno(libc::EOPNOTSUPP));
        }
        self.ranged(CMD_TRIM, 0, offset, len)
    }

    /// Write zeros to `[offset, offset + len)` without sending them
    /// (`NBD_CMD_WRITE_ZEROES`), durably with `fua`. Fails with `EOPNOTSUPP` if the
    /// server does not take them.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if !self.can_write_zeroes() {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let flags = if fua && self.can_fua() {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)?;
        if fua && !self.can_fua() {
            self.flush()?;
        }
        Ok(())
    }

    /// A trim or write-zeroes over a range, split into commands the length field
    /// holds. The range must be block-aligned and inside the export.
    fn ranged(&self, command: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if self.is_read_only() {
            return Err(errno(libc::EROFS));
        }
        let end = (offset + len).min(self.export_size());
        let step = u64::from(u32::MAX) / u64::from(self.shared().geometry.logical_block)
            * u64::from(self.shared().geometry.logical_block);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(step) as u32;
            self.command(command, flags, at, n)?;
            at += u64::from(n);
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let lb = u64::from(self.shared().geometry.logical_block);
        let ok = offset % lb == 0
            && len % lb == 0
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.shared().geometry.size);
        if ok {
            Ok(())
        } else {
            Err(errno(libc::EINVAL))
        }
    }

    /// One `NBD_CMD_BLOCK_STATUS` round trip from `offset` (block-aligned) for up
    /// to `len` bytes: the allocation of a prefix of the range, at least one
    /// extent. Without `base:allocation`, the whole range as data.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Allocation>> {
        let size = self.export_size();
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let len = len.min(size - offset);
        if self.shared().export.allocation_context.is_none() {
            return Ok(vec![Allocation {
                offset,
                len,
                hole: false,
                zero: false,
            }]);
        }
        // At most 1 GiB a query: servers answer in pieces anyway.
        let ask = len.min(1 << 30) as u32;
        let descriptors = self.command(CMD_BLOCK_STATUS, 0, offset, ask)?;
        let mut out: Vec<Allocation> = Vec::with_capacity(descriptors.len());
        let mut at = offset;
        for (n, flags) in descriptors {
            let n = u64::from(n).min(offset + len - at);
            if n == 0 {
                break;
            }
            let hole = flags & STATE_HOLE != 0;
            let zero = flags & STATE_ZERO != 0;
            match out.last_mut() {
                Some(l) if l.hole == hole && l.zero == zero => l.len += n,
                _ => out.push(Allocation {
                    offset: at,
                    len: n,
                    hole,
                    zero,
                }),
            }
            at += n;
        }
        Ok(out)
    }

    /// The allocation of `[offset, offset + len)` (clipped to the export), as
    /// adjacent extents with merged flags: what a sparse copy reads and what it
    /// skips. Without `base:allocation`, one data extent.
    pub fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Allocation>> {
        let end = offset.saturating_add(len).min(self.export_size());
        let mut out: Vec<Allocation> = Vec::new();
        let mut at = offset;
        while at < end {
            let part = self.block_status(at, end - at)?;
            if part.is_empty() {
                break;
            }
            for a in part {
                at = a.offset + a.len;
                match out.last_mut() {
                    Some(l) if l.hole == a.hole && l.zero == a.zero => l.len += a.len,
                    _ => out.push(a),
                }
            }
        }
        Ok(out)
    }

    /// Send a command and wait for its reply.
    fn command(&self, command: u16, flags: u16, offset: u64, len: u32) -> Outcome {
        let w = Arc::new(Waiter::default());
        // A flush on any one connection covers the writes completed on all of
        // them: that is what multi-conn promises.
        self.pick().start(
            command,
            flags,
            offset,
            len,
            Target::Waiter(Arc::clone(&w)),
            &[],
        );
        w.wait()
    }
}

/// `e` with the server's name in front.
fn context(name: &str, e: Error) -> Error {
    match e {
        Error::Os { context, source } => Error::Os {
            context: format!("{name}: {context}"),
            source,
        },
        Error::Incompatible(m) => Error::incompatible(m.feature, format!("{name}: {}", m.detail)),
        Error::Invalid(m) => Error::Invalid(format!("{name}: {m}")),
        Error::Tls(t) => Error::tls(t.kind, format!("{name}: {}", t.detail)),
        e => e,
    }
}

/// The device geometry for an export (see the module docs of [`Geometry`]): the
/// logical block is the server's minimum block (at least 512), requests are at
/// most the server's maximum (and [`MAX_REQUEST`]), memory needs no alignment.
fn geometry(export: &Export, max_request: u32) -> Result<Geometry> {
    let (min, preferred, max) = export.block_sizes.unwrap_or((1, 4096, MAX_REQUEST));
    let lb = min.max(512).next_power_of_two();
    if lb > 64 * 1024 {
        return Err(Error::incompatible(
            Feature::Nbd,
            format!("minimum block size {min} is above 64 KiB"),
        ));
    }
    let max_bytes = (max.min(max_request).min(MAX_REQUEST) / lb * lb).max(lb);
    let size = export.size.div_ceil(u64::from(lb)) * u64::from(lb);
    let g = Geometry::new(lb, size)
        .with_mem_align(1)
        .with_limits(1024, max_bytes)
        .with_physical_block(preferred.clamp(lb, 64 * 1024));
    g.validate()?;
    Ok(g)
}

impl Device for NbdDevice {
    fn geometry(&self) -> Geometry {
        self.shared().geometry
    }

    fn submit(&self, req: Request) {
        let geo = &self.shared().geometry;
        if let Err(e) = check_request(geo, &req) {
            req.complete(Err(e));
            return;
        }
        if req.is_empty() {
            req.complete(Ok(()));
            return;
        }
        if req.op == Op::Write && self.is_read_only() {
            req.complete(Err(errno(libc::EROFS)));
            return;
        }
        let size = self.export_size();
        // Only the tail of the last block can lie past the export; it reads as
        // zeros and writes there go nowhere. check_request bounds len by max_bytes.
        let len = req.len().min(size.saturating_sub(req.offset)) as u32;
        if req.op == Op::Read && u64::from(len) < req.len() {
            pieces(
                &req.segments,
                u64::from(len),
                req.len() - u64::from(len),
                |m| m.zero(),
            );
        }
        let (command, mut flags, mut flush_after) = match req.op {
            Op::Read => (CMD_READ, 0, false),
            Op::Write => (CMD_WRITE, 0, false),
        };
        if req.op == Op::Write && req.fua {
            if self.can_fua() {
                flags |= CMD_FLAG_FUA;
            } else {
                flush_after = self.can_flush();
            }
        }
        let offset = req.offset;
        // The payload pieces are the request's own segments; they are copied out
        // (as MemRefs, not bytes) because the request moves into the table.
        let payload = if req.op == Op::Write {
            req.segments.clone()
        } else {
            Segments::new()
        };
        self.pick().start(
            command,
            flags,
            offset,
            len,
            Target::Request { req, flush_after },
            &payload,
        );
    }

    fn completion_mode(&self) -> CompletionMode {
        CompletionMode::Interrupt
    }

    fn flush(&self) -> io::Result<()> {
        if !self.can_flush() {
            // No write cache on the server: completed writes are durable.
            return Ok(());
        }
        self.command(CMD_FLUSH, 0, 0, 0).map(drop)
    }

    fn name(&self) -> &str {
        "nbd"
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let s = &self.shared;
        s.closing.store(true, Ordering::Release);
        let healthy = lock(&s.table).dead.is_none();
        if healthy {
            // Soft disconnect: the server finishes what it has and closes.
            let disc = RequestHeader {
                flags: 0,
                command: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode();
            let mut w = lock(&s.writer);
            if w.write_all_vectored(&mut [IoSlice::new(&disc)]).is_ok() {
                let _ = w.close_notify();
            }
        }
        s.kill(Dead::new(
            io::ErrorKind::ConnectionAborted,
            format!("NBD connection to {} closed", s.uri),
        ));
        if let Some(h) = self.reader.take() {
            // The last handle may go away on the reader thread itself (a completion
            // callback dropped it): that thread then ends by itself once this
            // callback returns, completing what is left in the table; joining it
            // here would wait for itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl std::fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDevice")
            .field("uri", &self.shared().uri)
            .field("export", &self.shared().export)
            .field("geometry", &self.shared().geometry)
            .field("connections", &self.conns.len())
            .finish()
    }
}
