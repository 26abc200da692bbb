//! The NBD client under a hostile server. An input is a script for a fake server on
//! the other end of a socketpair: its handshake (greeting, answers to each option the
//! client sends: right, refused, malformed, or raw bytes) and then its replies to
//! the client's requests (simple replies, structured chunks of every type with
//! fields right or wrong, raw bytes), after which it hangs up.
//!
//! The client side connects, submits a fixed set of requests that fit the export it
//! was told of (reads of 4 KiB and 64 KiB, a write, block status) and waits
//! for all of them. Whatever the bytes, every request must complete exactly once,
//! with data or an error: never a panic, a hang, or an allocation sized by the
//! server.
//!
//! Used by the libFuzzer target `nbd_server` and replayed by dio's tests
//! (`crates/dio/tests/nbd.rs`), which include this file by path.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use dio::nbd::{NbdConfig, NbdDevice};
use dio::{AlignedBuf, Completion, Device, Finished, Op, Request};

const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERRORS: [u32; 6] = [
    (1 << 31) + 1,
    (1 << 31) + 2,
    (1 << 31) + 3,
    (1 << 31) + 5,
    (1 << 31) + 6,
    (1 << 31) + 9,
];
const CHUNK_TYPES: [u16; 7] = [0, 1, 2, 5, (1 << 15) + 1, (1 << 15) + 2, 3];
const READ_CMD: u16 = 0;
const WRITE_CMD: u16 = 1;

/// The input, read front to back; zeros once it runs out.
struct Script<'a> {
    data: &'a [u8],
}

impl Script<'_> {
    fn done(&self) -> bool {
        self.data.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) << 16 | u32::from(self.u16())
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) << 32 | u64::from(self.u32())
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a.to_vec()
    }
}

/// A request as the fake server saw it.
#[derive(Clone, Copy)]
struct Seen {
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

fn opt_reply(out: &mut Vec<u8>, option: u32, ty: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The fake server's handshake: the `base:allocation` context id it gave, or
/// `None` when it hung up.
fn handshake(s: &mut UnixStream, sc: &mut Script<'_>, mode: u8) -> Option<u32> {
    let mut context = 0;
    let mut out = Vec::new();
    out.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    out.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    // Fixed newstyle, and no-zeroes as the script says; rarely, raw flags.
    let flags = if mode & 0x40 != 0 {
        sc.u16()
    } else {
        1 | u16::from(mode & 2)
    };
    out.extend_from_slice(&flags.to_be_bytes());
    s.write_all(&out).ok()?;
    // The client answers at once or not at all (a reply the script left short
    // keeps it waiting for the rest): a quiet client means hang up.
    s.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).ok()?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).ok()?;
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len.min(1 << 16)];
        if len > payload.len() {
            return None;
        }
        s.read_exact(&mut payload).ok()?;
        let mut out = Vec::new();
        match sc.u8() % 8 {
            0..=3 => match option {
                OPT_STRUCTURED_REPLY => opt_reply(&mut out, option, REP_ACK, &[]),
                OPT_SET_META_CONTEXT => {
                    context = sc.u32();
                    let mut d = context.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    opt_reply(&mut out, option, REP_META_CONTEXT, &d);
                    opt_reply(&mut out, option, REP_ACK, &[]);
                }
                OPT_GO => {
                    let mut d = vec![0, 0];
                    // Size: at most 1 MiB, so requests fit it.
                    d.extend_from_slice(&u64::from(sc.u32() % (1 << 20)).to_be_bytes());
                    d.extend_from_slice(&(sc.u16() | 1).to_be_bytes());
                    opt_reply(&mut out, option, REP_INFO, &d);
                    if sc.u8() & 1 != 0 {
                        let mut d = vec![0, 3];
                        for _ in 0..3 {
                            d.extend_from_slice(&(1u32 << (sc.u8() % 24)).to_be_bytes());
                        }
                        opt_reply(&mut out, option, REP_INFO, &d);
                    }
                    opt_reply(&mut out, option, REP_ACK, &[]);
                    s.write_all(&out).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                    return Some(context);
                }
                OPT_EXPORT_NAME => {
                    out.extend_from_slice(&u64::from(sc.u32() % (1 << 20)).to_be_bytes());
                    out.extend_from_slice(&(sc.u16() | 1).to_be_bytes());
                    if flags & 2 == 0 {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&out).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                    return Some(context);
                }
                _ => opt_reply(&mut out, option, REP_ERRORS[0], &[]),
            },
            4 => {
                let ty = REP_ERRORS[usize::from(sc.u8()) % REP_ERRORS.len()];
                let n = usize::from(sc.u8());
                let msg = sc.bytes(n);
                opt_reply(&mut out, option, ty, &msg);
            }
            5 => {
                // A reply with raw type, option echo and length fields.
                out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
                let echo = if sc.u8() & 1 != 0 { sc.u32() } else { option };
                out.extend_from_slice(&echo.to_be_bytes());
                out.extend_from_slice(&sc.u32().to_be_bytes());
                let n = usize::from(sc.u8());
                out.extend_from_slice(&(sc.u32() % 4096).to_be_bytes());
                out.extend(sc.bytes(n));
            }
            6 => {
                let n = usize::from(sc.u8());
                out.extend(sc.bytes(n));
            }
            _ => return None,
        }
        s.write_all(&out).ok()?;
        if sc.done() {
            return None;
        }
    }
}

/// The fake server's replies to `seen` requests, until the script ends.
fn replies(s: &mut UnixStream, sc: &mut Script<'_>, seen: &[Seen], context: u32) {
    let pick = |sc: &mut Script<'_>| -> Seen {
        let i = usize::from(sc.u8());
        if seen.is_empty() || i == 255 {
            Seen {
                cmd: 0,
                cookie: sc.u64(),
                offset: 0,
                len: 0,
            }
        } else {
            seen[i % seen.len()]
        }
    };
    while !sc.done() {
        let mut out = Vec::new();
        let kind = sc.u8();
        let raw_len = kind & 0x80 != 0;
        match kind % 6 {
            0 => {
                let r = pick(sc);
                out.extend_from_slice(&SIMPLE_MAGIC.to_be_bytes());
                let err = if kind & 0x40 != 0 { sc.u32() } else { 0 };
                out.extend_from_slice(&err.to_be_bytes());
                out.extend_from_slice(&r.cookie.to_be_bytes());
                let n = if raw_len {
                    usize::from(sc.u16())
                } else if r.cmd == READ_CMD {
                    r.len as usize
                } else {
                    0
                };
                out.resize(out.len() + n, 0xa5);
            }
            1 | 2 => {
                let r = pick(sc);
                let hole = kind % 6 == 2;
                let flags = u16::from(sc.u8() & 1);
                let off = r.offset + u64::from(sc.u32()) % (u64::from(r.len) + 1);
                let n = u64::from(sc.u32()) % (2 * u64::from(r.len) + 2);
                let payload_len = if hole { 12 } else { 8 + n };
                let length = if raw_len {
                    sc.u32()
                } else {
                    payload_len as u32
                };
                out.extend_from_slice(&STRUCTURED_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&(if hole { 2u16 } else { 1 }).to_be_bytes());
                out.extend_from_slice(&r.cookie.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(&off.to_be_bytes());
                if hole {
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                } else {
                    out.resize(out.len() + n as usize, 0x5a);
                }
            }
            3 => {
                let r = pick(sc);
                let flags = u16::from(sc.u8() & 1);
                let id = if sc.u8() & 1 != 0 { sc.u32() } else { context };
                let count = usize::from(sc.u8() % 8);
                let mut d = id.to_be_bytes().to_vec();
                for _ in 0..count {
                    d.extend_from_slice(&(sc.u32() % (r.len + 2)).to_be_bytes());
                    d.extend_from_slice(&u32::from(sc.u8() % 4).to_be_bytes());
                }
                let length = if raw_len { sc.u32() } else { d.len() as u32 };
                out.extend_from_slice(&STRUCTURED_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&5u16.to_be_bytes());
                out.extend_from_slice(&r.cookie.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                out.extend(d);
            }
            4 => {
                let r = pick(sc);
                let flags = u16::from(sc.u8() & 1);
                let ty = CHUNK_TYPES[usize::from(sc.u8()) % CHUNK_TYPES.len()];
                let mut d = sc.u32().to_be_bytes().to_vec();
                let msg = usize::from(sc.u8());
                d.extend_from_slice(&(msg as u16).to_be_bytes());
                d.extend(sc.bytes(msg));
                if ty == (1 << 15) + 2 {
                    d.extend_from_slice(&sc.u64().to_be_bytes());
                }
                let length = if raw_len { sc.u32() } else { d.len() as u32 };
                out.extend_from_slice(&STRUCTURED_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&ty.to_be_bytes());
                out.extend_from_slice(&r.cookie.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                out.extend(d);
            }
            _ => {
                let n = usize::from(sc.u8());
                out.extend(sc.bytes(n));
            }
        }
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// Read `count` request headers (and write payloads) from the client.
fn requests(s: &mut UnixStream, count: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let mut h = [0u8; 28];
        if s.read_exact(&mut h).is_err() {
            break;
        }
        if u32::from_be_bytes(h[0..4].try_into().unwrap()) != REQUEST_MAGIC {
            break;
        }
        let cmd = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let r = Seen {
            cmd,
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
        };
        if cmd == WRITE_CMD {
            let mut left = r.len as usize;
            let mut b = [0u8; 4096];
            while left > 0 {
                let n = left.min(b.len());
                if s.read_exact(&mut b[..n]).is_err() {
                    return seen;
                }
                left -= n;
            }
        }
        seen.push(r);
    }
    seen
}

/// Counts completions; each request must complete exactly once.
struct Counter {
    done: Mutex<(usize, usize)>,
    cv: Condvar,
}

impl Completion for Counter {
    fn complete(self: Arc<Self>, _req: Finished, result: std::io::Result<()>) {
        let mut d = self.done.lock().unwrap();
        d.0 += 1;
        d.1 += usize::from(result.is_ok());
        self.cv.notify_all();
    }
}

/// What became of one input (for tests of the seeds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The handshake succeeded.
    pub connected: bool,
    /// Reads and writes submitted, and how many succeeded.
    pub submitted: usize,
    pub succeeded: usize,
    /// Block status was asked, and answered.
    pub status: Option<bool>,
}

/// Run one input. Panics (the fuzzer's crash) if the client panics, or a request
/// completes twice or never.
pub fn nbd_server(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::default();
    };
    let (client, mut server) = UnixStream::pair().expect("socketpair");
    // The server learns from the client side how many requests to wait for.
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let script = rest.to_vec();
    let srv = thread::spawn(move || {
        let mut sc = Script { data: &script };
        let _ = server.set_read_timeout(Some(Duration::from_secs(5)));
        if let Some(context) = handshake(&mut server, &mut sc, mode) {
            if let Ok(count) = rx.recv() {
                let seen = requests(&mut server, count);
                replies(&mut server, &mut sc, &seen, context);
            }
        }
        // Hang up: the client must fail what is left, at once.
    });
    let cfg = NbdConfig::default()
        .timeout(Duration::from_secs(5))
        .structured_replies(mode & 1 != 0)
        .block_status(mode & 4 != 0);
    let dev = match NbdDevice::connect_socket(client, "", &cfg) {
        Ok(d) => Arc::new(d),
        Err(_) => {
            drop(tx);
            srv.join().expect("fake server");
            return Outcome::default();
        }
    };
    let geo = dev.geometry();
    let counter = Arc::new(Counter {
        done: Mutex::new((0, 0)),
        cv: Condvar::new(),
    });
    let lb = u64::from(geo.logical_block);
    let mut submitted = 0;
    for (op, off, len) in [
        (Op::Read, 0u64, 4096usize),
        (Op::Read, 8192, 64 * 1024),
        (Op::Write, 4096, 4096),
    ] {
        let fits = off % lb == 0
            && len as u64 % lb == 0
            && off + len as u64 <= dev.export_size()
            && len as u64 <= u64::from(geo.max_bytes);
        if !fits || (op == Op::Write && dev.is_read_only()) {
            continue;
        }
        let mut buf = AlignedBuf::new(len, 4096);
        buf.fill(0x11);
        let c: Arc<dyn Completion> = Arc::clone(&counter) as Arc<dyn Completion>;
        dev.submit(Request::with_buf(op, off, buf, false, c, 0));
        submitted += 1;
    }
    let status = dev.can_block_status() && dev.export_size() > 0;
    let _ = tx.send(submitted + usize::from(status));
    let sync = {
        let dev = Arc::clone(&dev);
        thread::spawn(move || status.then(|| dev.block_status(0, dev.export_size()).is_ok()))
    };
    {
        let mut d = counter.done.lock().unwrap();
        while d.0 < submitted {
            d = counter.cv.wait(d).unwrap();
        }
    }
    let status = sync.join().expect("block status");
    drop(dev);
    srv.join().expect("fake server");
    let (done, succeeded) = *counter.done.lock().unwrap();
    assert_eq!(done, submitted, "a request completed twice");
    Outcome {
        connected: true,
        submitted,
        succeeded,
        status,
    }
}
