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
//! It knows nothing of files or block maps; [`crate::nbd::NbdFile`] puts a file on it.

mod conn;
mod handshake;
mod proto;
mod uri;

use crate::error::Feature;
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use self::conn::{Incoming, Patience, Stream};
use self::handshake::Export;
use self::proto::*;
use super::{check_request, CompletionMode, Device, Geometry, Op, Request};
use crate::buf::{MemRef, Segments};
use crate::{Error, Result};

pub use uri::{Address, NbdUri, DEFAULT_PORT};

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
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            timeout: Duration::from_secs(30),
            structured_replies: true,
            block_status: true,
            max_request: MAX_REQUEST,
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
}

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

/// Why the connection died; every request that meets it gets this error.
#[derive(Debug, Clone)]
struct Dead {
    kind: io::ErrorKind,
    msg: String,
}

impl Dead {
    fn new(kind: io::ErrorKind, msg: impl Into<String>) -> Dead {
        Dead {
            kind,
            msg: msg.into(),
        }
    }
    fn protocol(msg: impl std::fmt::Display) -> Dead {
        Dead::new(
            io::ErrorKind::InvalidData,
            format!("NBD protocol violation: {msg}"),
        )
    }
    fn error(&self) -> io::Error {
        io::Error::new(self.kind, self.msg.clone())
    }
}

/// A finished synchronous command (flush, trim, write zeroes, block status).
type Outcome = io::Result<Vec<(u32, u32)>>;

#[derive(Default)]
struct Waiter {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

impl Waiter {
    fn set(&self, r: Outcome) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.cv.notify_all();
    }
    fn wait(&self) -> Outcome {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = d.take() {
                return r;
            }
            d = self.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Who hears of a finished command.
enum Target {
    /// A device request; with `flush_after`, a write that wanted FUA from a server
    /// without it is flushed before it completes.
    Request { req: Request, flush_after: bool },
    /// A synchronous caller.
    Waiter(Arc<Waiter>),
}

/// One command in flight.
struct Entry {
    command: u16,
    /// When it was queued: a request the server leaves unanswered for the timeout,
    /// while it answers others, ends the connection.
    since: Instant,
    /// Wire offset and length.
    offset: u64,
    len: u32,
    target: Target,
    /// The sender still uses the request's memory: a reply that arrives meanwhile
    /// (only a broken server sends one) is parked in `early` and the sender
    /// completes the request once its send is over.
    sending: bool,
    early: Option<io::Result<()>>,
    /// First error chunk of a structured reply.
    error: Option<io::Error>,
    /// Ranges (relative to `offset`) a structured read reply covered so far.
    covered: Vec<(u64, u64)>,
    /// Block status descriptors (length, flags).
    extents: Vec<(u32, u32)>,
}

struct Table {
    next_cookie: u64,
    entries: HashMap<u64, Entry>,
    dead: Option<Dead>,
    /// When the table last went from empty to busy: the stall clock starts there
    /// if the server was quiet before.
    busy_since: Instant,
}

struct Shared {
    /// Where the server is, for messages.
    uri: String,
    export: Export,
    geometry: Geometry,
    timeout: Duration,
    writer: Mutex<Stream>,
    /// A handle to shut the socket down with (wakes reader and writer).
    control: Stream,
    table: Mutex<Table>,
    closing: AtomicBool,
}

/// A block device on an NBD server. See the module docs.
pub struct NbdDevice {
    shared: Arc<Shared>,
    reader: Option<thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The pieces of `segs` (as if concatenated) that cover `[start, start + len)`.
fn pieces(segs: &[MemRef], mut start: u64, mut len: u64, mut f: impl FnMut(MemRef)) {
    for s in segs {
        if len == 0 {
            break;
        }
        let sl = s.len() as u64;
        if start >= sl {
            start -= sl;
            continue;
        }
        let n = (sl - start).min(len);
        f(s.slice(start as usize, n as usize));
        start = 0;
        len -= n;
    }
}

impl NbdDevice {
    /// Connect to the export named by `uri`, negotiate, and start the reader.
    ///
    /// Errors: the server unreachable ([`Error::Os`]), no such export
    /// ([`Error::Invalid`]), a server dio cannot talk to ([`Error::Incompatible`]).
    pub fn connect(uri: &NbdUri, cfg: &NbdConfig) -> Result<NbdDevice> {
        let timeout = cfg.timeout.max(Duration::from_millis(1));
        let name = uri.to_string();
        let ctx = |e: Error| match e {
            Error::Os { context, source } => Error::Os {
                context: format!("{name}: {context}"),
                source,
            },
            Error::Incompatible(m) => {
                Error::incompatible(m.feature, format!("{name}: {}", m.detail))
            }
            Error::Invalid(m) => Error::Invalid(format!("{name}: {m}")),
            e => e,
        };
        let mut stream = Stream::connect(uri, timeout).map_err(ctx)?;
        let setup = |s: &Stream| -> io::Result<()> {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        };
        setup(&stream).map_err(|e| ctx(Error::os("socket timeouts", e)))?;
        let export = handshake::negotiate(
            &mut stream,
            &handshake::Wants {
                export: &uri.export,
                structured: cfg.structured_replies,
                block_status: cfg.block_status,
            },
        )
        .map_err(ctx)?;
        let geometry = geometry(&export, cfg.max_request).map_err(ctx)?;

        let tick = tick(timeout);
        let clone = |s: &Stream| s.try_clone().map_err(|e| ctx(Error::os("dup socket", e)));
        let reader_stream = clone(&stream)?;
        let control = clone(&stream)?;
        reader_stream
            .set_read_timeout(Some(tick))
            .map_err(|e| ctx(Error::os("socket timeouts", e)))?;
        let shared = Arc::new(Shared {
            uri: name,
            export,
            geometry,
            timeout,
            writer: Mutex::new(stream),
            control,
            table: Mutex::new(Table {
                next_cookie: 1,
                entries: HashMap::new(),
                dead: None,
                busy_since: Instant::now(),
            }),
            closing: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let reader = thread::Builder::new()
            .name("dio-nbd-reader".into())
            .spawn(move || reader_main(&s, reader_stream))
            .map_err(|e| Error::os("spawn NBD reader", e))?;
        Ok(NbdDevice {
            shared,
            reader: Some(reader),
        })
    }

    /// The export size in bytes (the device size is rounded up to a whole block;
    /// the tail past the export reads as zeros and writes there are dropped).
    pub fn export_size(&self) -> u64 {
        self.shared.export.size
    }

    /// The block sizes the server announced: minimum, preferred, maximum.
    pub fn block_sizes(&self) -> Option<(u32, u32, u32)> {
        self.shared.export.block_sizes
    }

    fn has(&self, flag: u16) -> bool {
        self.shared.export.flags & flag != 0
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
        self.shared.export.structured
    }
    /// Whether `base:allocation` block status was negotiated.
    pub fn can_block_status(&self) -> bool {
        self.shared.export.allocation_context.is_some()
    }

    /// Why the connection died, if it did (every later request fails with it).
    pub fn dead(&self) -> Option<String> {
        lock(&self.shared.table)
            .dead
            .as_ref()
            .map(|d| d.msg.clone())
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
        let step = u64::from(u32::MAX) / u64::from(self.shared.geometry.logical_block)
            * u64::from(self.shared.geometry.logical_block);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(step) as u32;
            self.command(command, flags, at, n)?;
            at += u64::from(n);
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let lb = u64::from(self.shared.geometry.logical_block);
        let ok = offset % lb == 0
            && len % lb == 0
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.shared.geometry.size);
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
        if self.shared.export.allocation_context.is_none() {
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
        self.shared.start(
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

impl Shared {
    /// Register a command and send it (with `payload` for writes). The reply, or the
    /// connection's death, completes `target` exactly once.
    fn start(
        self: &Arc<Self>,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        target: Target,
        payload: &[MemRef],
    ) {
        let cookie = {
            let mut t = lock(&self.table);
            if let Some(d) = &t.dead {
                let e = d.error();
                drop(t);
                return self.finish(target, Err(e), Vec::new());
            }
            let cookie = t.next_cookie;
            t.next_cookie = t.next_cookie.wrapping_add(1);
            if t.entries.is_empty() {
                t.busy_since = Instant::now();
            }
            t.entries.insert(
                cookie,
                Entry {
                    command,
                    since: Instant::now(),
                    offset,
                    len,
                    target,
                    sending: true,
                    early: None,
                    error: None,
                    covered: Vec::new(),
                    extents: Vec::new(),
                },
            );
            cookie
        };
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            len,
        }
        .encode();
        let sent = {
            let mut iov = Vec::with_capacity(1 + payload.len());
            iov.push(IoSlice::new(&header));
            pieces(payload, 0, u64::from(len), |p| {
                // SAFETY: the request that owns this memory is in the table with
                // `sending` set, so nothing completes it (and hands the memory back)
                // until this send is over; writes only read the memory.
                iov.push(IoSlice::new(unsafe {
                    std::slice::from_raw_parts(p.as_ptr(), p.len())
                }));
            });
            let mut w = lock(&self.writer);
            w.write_all_vectored(&mut iov)
        };
        let early = {
            let mut t = lock(&self.table);
            let early = match t.entries.get_mut(&cookie) {
                Some(e) => {
                    e.sending = false;
                    e.early.is_some()
                }
                None => false,
            };
            if early {
                t.entries.remove(&cookie)
            } else {
                None
            }
        };
        if let Err(e) = sent {
            let kind = e.kind();
            let msg = if matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                format!(
                    "NBD server {} took no data for {:?}: connection dropped",
                    self.uri, self.timeout
                )
            } else {
                format!("send to NBD server {}: {e}", self.uri)
            };
            self.kill(Dead::new(kind, msg));
        }
        if let Some(mut e) = early {
            let r = e.early.take().unwrap_or(Ok(()));
            self.finish(e.target, r, e.extents);
        }
    }

    /// Mark the connection dead and shut the socket: the reader wakes, fails every
    /// request in flight and exits.
    fn kill(&self, why: Dead) {
        {
            let mut t = lock(&self.table);
            if t.dead.is_none() {
                t.dead = Some(why);
            }
        }
        self.control.shutdown();
    }

    /// Hand a finished command to whoever waits for it.
    fn finish(self: &Arc<Self>, target: Target, r: io::Result<()>, extents: Vec<(u32, u32)>) {
        match target {
            Target::Request { req, flush_after } if flush_after && r.is_ok() => {
                // The server has no FUA: the write is durable after a flush, which
                // must be sent after this reply and waited for, off the reader.
                let s = Arc::clone(self);
                let slot = Arc::new(Mutex::new(Some(req)));
                let theirs = Arc::clone(&slot);
                let spawned = thread::Builder::new()
                    .name("dio-nbd-fua".into())
                    .spawn(move || {
                        let w = Arc::new(Waiter::default());
                        s.start(CMD_FLUSH, 0, 0, 0, Target::Waiter(Arc::clone(&w)), &[]);
                        let r = w.wait().map(drop);
                        if let Some(req) = lock(&theirs).take() {
                            req.complete(r);
                        }
                    });
                if let Err(e) = spawned {
                    if let Some(req) = lock(&slot).take() {
                        req.complete(Err(e));
                    }
                }
            }
            Target::Request { req, .. } => req.complete(r),
            Target::Waiter(w) => w.set(r.map(|()| extents)),
        }
    }

    /// The reply for `cookie` is complete with `r`: complete its command, or park
    /// the result if the sender is still busy with its memory.
    fn settle(self: &Arc<Self>, cookie: u64, r: io::Result<()>) {
        let done = {
            let mut t = lock(&self.table);
            match t.entries.get_mut(&cookie) {
                Some(e) if e.sending => {
                    e.early = Some(r);
                    return;
                }
                Some(_) => t.entries.remove(&cookie).map(|e| (e, r)),
                None => None,
            }
        };
        if let Some((e, r)) = done {
            self.finish(e.target, r, e.extents);
        }
    }

    /// The connection is over: record why, and fail every command in flight.
    fn drain(self: &Arc<Self>, why: Dead) {
        let (dead, gone) = {
            let mut t = lock(&self.table);
            if t.dead.is_none() {
                t.dead = Some(why);
            }
            let dead = t.dead.clone().expect("set above");
            let mut gone = Vec::new();
            let cookies: Vec<u64> = t.entries.keys().copied().collect();
            for c in cookies {
                let sending = t.entries.get(&c).is_some_and(|e| e.sending);
                if sending {
                    if let Some(e) = t.entries.get_mut(&c) {
                        e.early = Some(Err(dead.error()));
                    }
                } else if let Some(e) = t.entries.remove(&c) {
                    gone.push(e);
                }
            }
            (dead, gone)
        };
        self.control.shutdown();
        for e in gone {
            self.finish(e.target, Err(dead.error()), Vec::new());
        }
    }
}

/// How often the reader checks for stalls and shutdown.
fn tick(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(500))
}

/// A request waiting longer than the timeout, though the server is not silent
/// (it answers others): a starved request ends the connection like a stall.
fn starved(s: &Shared, t: &Table) -> io::Result<()> {
    let Some(e) = t
        .entries
        .values()
        .filter(|e| !e.sending)
        .min_by_key(|e| e.since)
    else {
        return Ok(());
    };
    let waited = e.since.elapsed();
    if waited < s.timeout {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "NBD server {} left a {} of {} bytes at offset {} unanswered for {:?} \
             (timeout {:?}): connection dropped",
            s.uri,
            proto::command_name(e.command),
            e.len,
            e.offset,
            waited,
            s.timeout
        ),
    ))
}

/// The reader's stall watch: between replies a quiet server is fine; with requests
/// waiting (or a reply half read), `timeout` of silence kills the connection.
struct Watch<'a> {
    shared: &'a Shared,
}

impl Patience for Watch<'_> {
    fn on_idle(&mut self, idle: Duration, mid_message: bool) -> io::Result<()> {
        let s = self.shared;
        let t = lock(&s.table);
        if let Some(d) = &t.dead {
            return Err(d.error());
        }
        let waiting = t.entries.len();
        if waiting == 0 && !mid_message {
            if s.closing.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "NBD connection closed",
                ));
            }
            return Ok(());
        }
        let quiet = idle.min(t.busy_since.elapsed());
        if quiet >= s.timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "NBD server {} sent nothing for {:?} with {waiting} request(s) waiting: connection dropped",
                    s.uri, s.timeout
                ),
            ));
        }
        // Not silent long enough, but one request may still be starved.
        starved(s, &t)
    }
}

fn reader_main(shared: &Arc<Shared>, stream: Stream) {
    let mut inc = Incoming::new(stream);
    // A completion callback that panics must not leave the requests behind it
    // waiting forever: the connection ends and they fail.
    let tick = tick(shared.timeout);
    let mut checked = Instant::now();
    let run = std::panic::AssertUnwindSafe(|| loop {
        if let Err(d) = read_reply(shared, &mut inc) {
            break d;
        }
        // A busy server never leaves the reader idle: look for starved requests
        // between replies too, once a tick.
        if checked.elapsed() >= tick {
            checked = Instant::now();
            if let Err(e) = starved(shared, &lock(&shared.table)) {
                break Dead::new(e.kind(), e.to_string());
            }
        }
    });
    let why = std::panic::catch_unwind(run).unwrap_or_else(|_| {
        Dead::new(
            io::ErrorKind::Other,
            "NBD reader stopped: a completion panicked",
        )
    });
    shared.drain(why);
}

/// What the reader needs of an entry while it reads a reply's payload, copied out
/// under the table lock.
struct Peek {
    command: u16,
    offset: u64,
    len: u32,
    segments: Segments,
}

fn peek(shared: &Shared, cookie: u64) -> std::result::Result<Peek, Dead> {
    let t = lock(&shared.table);
    let e = t
        .entries
        .get(&cookie)
        .ok_or_else(|| Dead::protocol(format!("reply for unknown cookie {cookie:#x}")))?;
    if e.early.is_some() {
        return Err(Dead::protocol(format!(
            "reply for cookie {cookie:#x} after its final chunk"
        )));
    }
    let segments = match &e.target {
        Target::Request { req, .. } if e.command == CMD_READ => req.segments.clone(),
        _ => Segments::new(),
    };
    Ok(Peek {
        command: e.command,
        offset: e.offset,
        len: e.len,
        segments,
    })
}

/// The entry for `cookie`; a broken server can make it vanish between chunks (a
/// reply after the final one, while the sender finished), which ends the connection.
fn entry(t: &mut Table, cookie: u64) -> std::result::Result<&mut Entry, Dead> {
    t.entries
        .get_mut(&cookie)
        .ok_or_else(|| Dead::protocol(format!("reply for unknown cookie {cookie:#x}")))
}

/// Read one reply (a simple reply or one structured chunk) and act on it. `Err`
/// means the connection is over.
fn read_reply(shared: &Arc<Shared>, inc: &mut Incoming) -> std::result::Result<(), Dead> {
    let mut watch = Watch { shared };
    let io_dead = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Dead::new(
                io::ErrorKind::UnexpectedEof,
                format!("NBD server {} closed the connection", shared.uri),
            )
        } else {
            Dead::new(e.kind(), e.to_string())
        }
    };
    let mut magic = [0u8; 4];
    inc.read_exact(&mut magic, true, &mut watch)
        .map_err(io_dead)?;
    match be32(&magic, 0) {
        SIMPLE_REPLY_MAGIC => {
            let mut h = [0u8; SIMPLE_REPLY_LEN - 4];
            inc.read_exact(&mut h, false, &mut watch).map_err(io_dead)?;
            let error = be32(&h, 0);
            let cookie = be64(&h, 4);
            let p = peek(shared, cookie)?;
            if p.command == CMD_READ && shared.export.structured {
                return Err(Dead::protocol(
                    "simple reply to a read after structured replies were negotiated",
                ));
            }
            let r = if error != 0 {
                Err(proto::error(error))
            } else if p.command == CMD_READ {
                read_into(inc, &mut watch, &p.segments, 0, u64::from(p.len)).map_err(io_dead)?;
                Ok(())
            } else if p.command == CMD_BLOCK_STATUS {
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "NBD block status answered without extents",
                ))
            } else {
                Ok(())
            };
            shared.settle(cookie, r);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC if shared.export.structured => {
            let mut h = [0u8; STRUCTURED_REPLY_LEN - 4];
            inc.read_exact(&mut h, false, &mut watch).map_err(io_dead)?;
            let flags = be16(&h, 0);
            let ty = be16(&h, 2);
            let cookie = be64(&h, 4);
            let length = be32(&h, 12);
            let p = peek(shared, cookie)?;
            read_chunk(shared, inc, &mut watch, &p, cookie, ty, length).map_err(|e| match e {
                Chunk::Dead(d) => d,
                Chunk::Io(e) => io_dead(e),
            })?;
            if flags & REPLY_FLAG_DONE != 0 {
                let r = {
                    let mut t = lock(&shared.table);
                    let e = entry(&mut t, cookie)?;
                    if let Some(err) = e.error.take() {
                        Err(err)
                    } else if e.command == CMD_READ
                        && e.covered.iter().map(|(a, b)| b - a).sum::<u64>() != u64::from(e.len)
                    {
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "NBD read reply did not cover the whole request",
                        ))
                    } else if e.command == CMD_BLOCK_STATUS && e.extents.is_empty() {
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "NBD block status answered without extents",
                        ))
                    } else {
                        Ok(())
                    }
                };
                shared.settle(cookie, r);
            } else if ty == REPLY_TYPE_NONE {
                return Err(Dead::protocol("NBD_REPLY_TYPE_NONE without the DONE flag"));
            }
            Ok(())
        }
        m => Err(Dead::protocol(format!("bad reply magic {m:#x}"))),
    }
}

enum Chunk {
    Dead(Dead),
    Io(io::Error),
}

impl From<Dead> for Chunk {
    fn from(d: Dead) -> Chunk {
        Chunk::Dead(d)
    }
}

impl From<io::Error> for Chunk {
    fn from(e: io::Error) -> Chunk {
        Chunk::Io(e)
    }
}

/// Read the payload of one structured chunk and record it in the entry.
fn read_chunk(
    shared: &Shared,
    inc: &mut Incoming,
    watch: &mut Watch<'_>,
    p: &Peek,
    cookie: u64,
    ty: u16,
    length: u32,
) -> std::result::Result<(), Chunk> {
    let bad = |what: &str| Dead::protocol(format!("{what} (chunk type {ty}, {length} bytes)"));
    let end = u64::from(p.len);
    match ty {
        REPLY_TYPE_NONE => {
            if length != 0 {
                return Err(bad("NBD_REPLY_TYPE_NONE with a payload").into());
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            if p.command != CMD_READ {
                return Err(bad("read data in reply to a command that is not a read").into());
            }
            let hole = ty == REPLY_TYPE_OFFSET_HOLE;
            if (hole && length != 12) || (!hole && length < 9) {
                return Err(bad("content chunk of impossible length").into());
            }
            let mut b = [0u8; 12];
            let head = if hole { 12 } else { 8 };
            inc.read_exact(&mut b[..head], false, watch)?;
            let off = be64(&b, 0);
            let n = if hole {
                u64::from(be32(&b, 8))
            } else {
                u64::from(length) - 8
            };
            let start = off.wrapping_sub(p.offset);
            if off < p.offset || n == 0 || start > end || n > end - start {
                return Err(bad("content chunk outside the request").into());
            }
            {
                let mut t = lock(&shared.table);
                let e = entry(&mut t, cookie)?;
                if e.covered.iter().any(|&(a, b)| start < b && a < start + n) {
                    return Err(bad("overlapping content chunks").into());
                }
                e.covered.push((start, start + n));
            }
            if hole {
                pieces(&p.segments, start, n, |m| m.zero());
            } else {
                read_into(inc, watch, &p.segments, start, n)?;
            }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if p.command != CMD_BLOCK_STATUS {
                return Err(bad("block status in reply to another command").into());
            }
            if length < 12 || (length - 4) % 8 != 0 || length > (16 << 20) {
                return Err(bad("block status chunk of impossible length").into());
            }
            let mut b = vec![0u8; length as usize];
            inc.read_exact(&mut b, false, watch)?;
            if Some(be32(&b, 0)) != shared.export.allocation_context {
                // Some other context: not ours to read.
                return Ok(());
            }
            let mut list = Vec::with_capacity((b.len() - 4) / 8);
            let mut sum = 0u64;
            for d in b[4..].chunks_exact(8) {
                let n = be32(d, 0);
                if n == 0 {
                    return Err(bad("block status descriptor of length 0").into());
                }
                sum += u64::from(n);
                list.push((n, be32(d, 4)));
            }
            if sum > end {
                return Err(bad("block status past the requested range").into());
            }
            let mut t = lock(&shared.table);
            let e = entry(&mut t, cookie)?;
            if !e.extents.is_empty() {
                return Err(bad("block status sent twice for one context").into());
            }
            e.extents = list;
        }
        t if t & REPLY_TYPE_ERROR_BIT != 0 => {
            if !(6..=6 + 0xffff + 8).contains(&length) {
                return Err(bad("error chunk of impossible length").into());
            }
            let mut b = vec![0u8; length as usize];
            inc.read_exact(&mut b, false, watch)?;
            let msg_len = usize::from(be16(&b, 4));
            let tail = if t == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if 6 + msg_len + tail > b.len() {
                return Err(bad("error message longer than its chunk").into());
            }
            let error = be32(&b, 0);
            let mut t = lock(&shared.table);
            let e = entry(&mut t, cookie)?;
            if e.error.is_none() {
                // Keep the errno (the engine reports it); unknown error types and
                // an error of 0 count as EIO.
                e.error = Some(if error == 0 {
                    errno(libc::EIO)
                } else {
                    proto::error(error)
                });
            }
        }
        _ => return Err(bad("unknown structured reply chunk").into()),
    }
    Ok(())
}

/// Read `len` bytes of payload into `[start, start + len)` of `segs`.
fn read_into(
    inc: &mut Incoming,
    watch: &mut Watch<'_>,
    segs: &[MemRef],
    start: u64,
    len: u64,
) -> io::Result<()> {
    let mut r = Ok(());
    pieces(segs, start, len, |m| {
        if r.is_err() {
            return;
        }
        // SAFETY: `m` is memory of a read request still in the table: only the
        // reader (this thread) completes requests, so the memory stays valid and
        // unaliased until it does, after this read.
        let dst = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
        r = inc.read_exact(dst, false, watch);
    });
    r
}

impl Device for NbdDevice {
    fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    fn submit(&self, req: Request) {
        let geo = &self.shared.geometry;
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
        self.shared.start(
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

impl Drop for NbdDevice {
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
            let _ = lock(&s.writer).write_all_vectored(&mut [IoSlice::new(&disc)]);
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
            .field("uri", &self.shared.uri)
            .field("export", &self.shared.export)
            .field("geometry", &self.shared.geometry)
            .finish()
    }
}
