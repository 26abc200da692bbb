//! The reader of an NBD connection: one thread reads every reply (simple replies
//! and structured chunks), checks it against the request it answers, moves read
//! data straight into request memory, and completes requests; it also watches for
//! a silent or starving server.
//!
//! Nothing the server sends is trusted: every length is checked against what was
//! asked before a byte is read, and nothing is allocated by a server's say-so
//! beyond small fixed bounds.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Incoming, Link, Patience};
use super::proto::{self, *};
use super::table::{errno, lock, pieces, Dead, Entry, Shared, Table, Target};
use crate::buf::{MemRef, Segments};
/// How often the reader checks for stalls and shutdown.
pub(super) fn tick(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(500))
}

/// A request waiting longer than the timeout, though the server is not silent
/// (it answers others): a starved request ends the connection like a stall.
pub(super) fn starved(s: &Shared, t: &Table) -> io::Result<()> {
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
pub(super) struct Watch<'a> {
    pub(super) shared: &'a Shared,
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

pub(super) fn reader_main(shared: &Arc<Shared>, stream: Link) {
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
pub(super) struct Peek {
    pub(super) command: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) segments: Segments,
}

pub(super) fn peek(shared: &Shared, cookie: u64) -> std::result::Result<Peek, Dead> {
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
pub(super) fn entry(t: &mut Table, cookie: u64) -> std::result::Result<&mut Entry, Dead> {
    t.entries
        .get_mut(&cookie)
        .ok_or_else(|| Dead::protocol(format!("reply for unknown cookie {cookie:#x}")))
}

/// Read one reply (a simple reply or one structured chunk) and act on it. `Err`
/// means the connection is over.
pub(super) fn read_reply(
    shared: &Arc<Shared>,
    inc: &mut Incoming,
) -> std::result::Result<(), Dead> {
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
                    } else if e.command == CMD_READ && e.covered.bytes() != u64::from(e.len) {
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

pub(super) enum Chunk {
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
pub(super) fn read_chunk(
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
                if let Err(why) = e.covered.add(start, start + n) {
                    return Err(bad(why).into());
                }
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
            // Read piecewise: nothing is allocated by the length field, and at most
            // MAX_EXTENTS descriptors are kept (block status may answer a prefix).
            let mut id = [0u8; 4];
            inc.read_exact(&mut id, false, watch)?;
            let mut left = (length - 4) as usize;
            if Some(be32(&id, 0)) != shared.export.allocation_context {
                // Some other context: not ours to read.
                skip(inc, watch, left)?;
                return Ok(());
            }
            let mut list = Vec::new();
            let mut sum = 0u64;
            let mut b = [0u8; 4096];
            while left > 0 {
                let n = left.min(b.len());
                inc.read_exact(&mut b[..n], false, watch)?;
                left -= n;
                for d in b[..n].chunks_exact(8) {
                    let n = be32(d, 0);
                    if n == 0 {
                        return Err(bad("block status descriptor of length 0").into());
                    }
                    sum += u64::from(n);
                    if sum > end {
                        return Err(bad("block status past the requested range").into());
                    }
                    if list.len() < MAX_EXTENTS {
                        list.push((n, be32(d, 4)));
                    }
                }
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
            let mut b = [0u8; 6];
            inc.read_exact(&mut b, false, watch)?;
            let msg_len = usize::from(be16(&b, 4));
            let tail = if t == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if 6 + msg_len + tail > length as usize {
                return Err(bad("error message longer than its chunk").into());
            }
            // The message (and offset) are for people; the errno is what counts.
            skip(inc, watch, length as usize - 6)?;
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

/// Block status descriptors kept of one reply; the rest is read and checked, and
/// the caller asks again from where the kept ones end.
const MAX_EXTENTS: usize = 1 << 16;

/// Read and drop `n` bytes.
fn skip(inc: &mut Incoming, watch: &mut Watch<'_>, mut n: usize) -> io::Result<()> {
    let mut b = [0u8; 4096];
    while n > 0 {
        let k = n.min(b.len());
        inc.read_exact(&mut b[..k], false, watch)?;
        n -= k;
    }
    Ok(())
}

/// Read `len` bytes of payload into `[start, start + len)` of `segs`.
pub(super) fn read_into(
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
