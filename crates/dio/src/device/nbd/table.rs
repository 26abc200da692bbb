//! The request table of an NBD connection: every command in flight, keyed by its
//! cookie, with who hears of its end; how commands are sent (under the writer
//! lock) and finished, and how the connection dies (every command in flight
//! fails with the reason).

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::conn::{Link, Stream};
use super::handshake::Export;
use super::proto::*;
use crate::buf::MemRef;
use crate::device::{Geometry, Request};

/// Why the connection died; every request that meets it gets this error.
#[derive(Debug, Clone)]
pub(super) struct Dead {
    pub(super) kind: io::ErrorKind,
    pub(super) msg: String,
}

impl Dead {
    pub(super) fn new(kind: io::ErrorKind, msg: impl Into<String>) -> Dead {
        Dead {
            kind,
            msg: msg.into(),
        }
    }
    pub(super) fn protocol(msg: impl std::fmt::Display) -> Dead {
        Dead::new(
            io::ErrorKind::InvalidData,
            format!("NBD protocol violation: {msg}"),
        )
    }
    pub(super) fn error(&self) -> io::Error {
        io::Error::new(self.kind, self.msg.clone())
    }
}

/// A finished synchronous command (flush, trim, write zeroes, block status).
pub(super) type Outcome = io::Result<Vec<(u32, u32)>>;

#[derive(Default)]
pub(super) struct Waiter {
    pub(super) done: Mutex<Option<Outcome>>,
    pub(super) cv: Condvar,
}

impl Waiter {
    pub(super) fn set(&self, r: Outcome) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.cv.notify_all();
    }
    pub(super) fn wait(&self) -> Outcome {
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
pub(super) enum Target {
    /// A device request; with `flush_after`, a write that wanted FUA from a server
    /// without it is flushed before it completes.
    Request { req: Request, flush_after: bool },
    /// A synchronous caller.
    Waiter(Arc<Waiter>),
}

/// One command in flight.
pub(super) struct Entry {
    pub(super) command: u16,
    /// When it was queued: a request the server leaves unanswered for the timeout,
    /// while it answers others, ends the connection.
    pub(super) since: Instant,
    /// Wire offset and length.
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) target: Target,
    /// The sender still uses the request's memory: a reply that arrives meanwhile
    /// (only a broken server sends one) is parked in `early` and the sender
    /// completes the request once its send is over.
    pub(super) sending: bool,
    pub(super) early: Option<io::Result<()>>,
    /// First error chunk of a structured reply.
    pub(super) error: Option<io::Error>,
    /// Ranges (relative to `offset`) a structured read reply covered so far.
    pub(super) covered: Covered,
    /// Block status descriptors (length, flags).
    pub(super) extents: Vec<(u32, u32)>,
}

pub(super) struct Table {
    pub(super) next_cookie: u64,
    pub(super) entries: HashMap<u64, Entry>,
    pub(super) dead: Option<Dead>,
    /// When the table last went from empty to busy: the stall clock starts there
    /// if the server was quiet before.
    pub(super) busy_since: Instant,
}

pub(super) struct Shared {
    /// Where the server is, for messages.
    pub(super) uri: String,
    pub(super) export: Export,
    pub(super) geometry: Geometry,
    pub(super) timeout: Duration,
    pub(super) writer: Mutex<Link>,
    /// A handle to shut the socket down with (wakes reader and writer).
    pub(super) control: Stream,
    pub(super) table: Mutex<Table>,
    pub(super) closing: AtomicBool,
    /// The connection is dead (`table.dead` is set): a hint, read without the
    /// table lock, that steers new requests to another connection of the device.
    pub(super) down: AtomicBool,
}

/// The ranges of a read that content chunks covered: disjoint, adjacent ones
/// merged, found in logarithmic time, and at most [`Covered::MAX_RANGES`] of them
/// (a server cannot make the client keep or search a list it grows at will).
#[derive(Default)]
pub(super) struct Covered {
    /// Start to end of each range.
    ranges: std::collections::BTreeMap<u64, u64>,
    bytes: u64,
}

impl Covered {
    /// Separate ranges one reply may leave (qemu sends one chunk per data or hole
    /// extent: 65536 for a 32 MiB read in 512-byte extents).
    pub(super) const MAX_RANGES: usize = 1 << 17;

    /// Add `[start, end)`; `Err` says why it cannot be: it overlaps, or too many.
    pub(super) fn add(&mut self, start: u64, end: u64) -> std::result::Result<(), &'static str> {
        if let Some((_, &e)) = self.ranges.range(..end).next_back() {
            if e > start {
                return Err("overlapping content chunks");
            }
        }
        let mut start2 = start;
        let mut end2 = end;
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e == start {
                start2 = s;
                self.ranges.remove(&s);
            }
        }
        if let Some(e) = self.ranges.remove(&end) {
            end2 = e;
        }
        if self.ranges.len() >= Covered::MAX_RANGES {
            return Err("too many separate content chunks in one reply");
        }
        self.ranges.insert(start2, end2);
        self.bytes += end - start;
        Ok(())
    }

    /// Bytes covered.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The pieces of `segs` (as if concatenated) that cover `[start, start + len)`.
pub(super) fn pieces(segs: &[MemRef], mut start: u64, mut len: u64, mut f: impl FnMut(MemRef)) {
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

impl Shared {
    /// Register a command and send it (with `payload` for writes). The reply, or the
    /// connection's death, completes `target` exactly once.
    pub(super) fn start(
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
                    covered: Covered::default(),
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
    pub(super) fn kill(&self, why: Dead) {
        {
            let mut t = lock(&self.table);
            if t.dead.is_none() {
                t.dead = Some(why);
            }
        }
        self.down.store(true, Ordering::Release);
        self.control.shutdown();
    }

    /// Hand a finished command to whoever waits for it.
    pub(super) fn finish(
        self: &Arc<Self>,
        target: Target,
        r: io::Result<()>,
        extents: Vec<(u32, u32)>,
    ) {
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
    pub(super) fn settle(self: &Arc<Self>, cookie: u64, r: io::Result<()>) {
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
    pub(super) fn drain(self: &Arc<Self>, why: Dead) {
        let (dead, gone) = {
            let mut t = lock(&self.table);
            if t.dead.is_none() {
                t.dead = Some(why);
            }
            let dead = t.dead.clone().expect("set above");
            self.down.store(true, Ordering::Release);
            let mut gone = Vec::new();
            let cookies: Vec<u64> = t.entries.keys().copied().collect();
            for c in cookies {
                let sending = t.entries.get(&c).is_some_and(|e| e.sending);
                if sending {
                    // A reply already parked for the sender stands: the server
                    // answered before the connection died.
                    if let Some(e) = t.entries.get_mut(&c) {
                        e.early.get_or_insert_with(|| Err(dead.error()));
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

#[cfg(test)]
mod tests {
    use super::Covered;

    #[test]
    fn covered_ranges_match_a_bitmap_model() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200 {
            let mut c = Covered::default();
            let mut model = [false; 256];
            for _ in 0..64 {
                let start = rnd(256);
                let end = (start + 1 + rnd(16)).min(256);
                let overlaps = model[start as usize..end as usize].iter().any(|&b| b);
                assert_eq!(c.add(start, end).is_err(), overlaps, "[{start}, {end})");
                if !overlaps {
                    model[start as usize..end as usize].fill(true);
                }
                assert_eq!(c.bytes(), model.iter().filter(|&&b| b).count() as u64);
                // Adjacent ranges are merged: as many ranges as runs in the model.
                let runs = model
                    .iter()
                    .enumerate()
                    .filter(|&(i, &b)| b && (i == 0 || !model[i - 1]))
                    .count();
                assert_eq!(c.ranges.len(), runs);
            }
        }
    }
}
