//! The RAM device: a block device in memory for tests, benchmarks and fsx. It can
//! complete on another thread, late, and out of order; fail chosen requests; count
//! what it sees; and simulate a crash that keeps only durable data (flushed or
//! written with FUA), the way redb's crash-consistency backend does.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::{check_request_len, Device, Geometry, Op, Request};

/// How a [`MemDevice`] behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemDeviceConfig {
    /// Geometry (size, logical block, limits).
    pub geometry: Geometry,
    /// Byte the device is filled with at creation (0xAA makes stale reads visible).
    pub fill: u8,
    /// Complete requests on a separate thread (true) or inline in `submit` (false).
    pub threaded: bool,
    /// Delay before a request completes (threaded only).
    pub latency: Option<Duration>,
    /// Complete the requests waiting at the completion thread in shuffled order.
    pub reorder: bool,
    /// Seed of the shuffle.
    pub seed: u64,
    /// No storage: reads leave memory alone, writes are dropped (benchmarks).
    pub null: bool,
    /// Track durable data for [`MemDevice::crash`].
    pub crash_mode: bool,
    /// Also keep every write since the last flush, for [`MemDevice::crash_torn`]
    /// (implies `crash_mode`).
    pub torn_crash: bool,
    /// Keep a log of every request (see [`MemDevice::log`]).
    pub log: bool,
    /// Count requests, bytes, segments and requests in flight ([`MemDevice::stats`],
    /// [`MemDevice::in_flight`]); on by default. Off, a submit touches no shared
    /// counter (five atomic read-modify-writes fewer), so a null device costs what
    /// fio's null engine does: nothing. Faults armed by request number count
    /// requests only while armed.
    pub stats: bool,
}

impl MemDeviceConfig {
    /// A device of `size` bytes with `logical_block`-byte blocks, zero-filled,
    /// completing inline.
    pub fn new(size: u64, logical_block: u32) -> Self {
        MemDeviceConfig {
            geometry: Geometry::new(logical_block, size),
            fill: 0,
            threaded: false,
            latency: None,
            reorder: false,
            seed: 1,
            null: false,
            crash_mode: false,
            torn_crash: false,
            log: false,
            stats: true,
        }
    }
    /// Set the geometry.
    pub fn geometry(mut self, g: Geometry) -> Self {
        self.geometry = g;
        self
    }
    /// Set the fill byte.
    pub fn fill(mut self, b: u8) -> Self {
        self.fill = b;
        self
    }
    /// Complete on another thread, optionally late and shuffled.
    pub fn threaded(mut self, latency: Option<Duration>, reorder: bool, seed: u64) -> Self {
        self.threaded = true;
        self.latency = latency;
        self.reorder = reorder;
        self.seed = seed;
        self
    }
    /// No storage, no copying.
    pub fn null(mut self) -> Self {
        self.null = true;
        self
    }
    /// Keep no statistics (see [`MemDeviceConfig::stats`]).
    pub fn without_stats(mut self) -> Self {
        self.stats = false;
        self
    }
    /// Track durability for crash simulation.
    pub fn crash_mode(mut self) -> Self {
        self.crash_mode = true;
        self
    }
    /// Track durability and keep the writes since the last flush, so that
    /// [`MemDevice::crash_torn`] can simulate a power loss that tears them.
    pub fn torn_crash(mut self) -> Self {
        self.crash_mode = true;
        self.torn_crash = true;
        self
    }
    /// Offer untorn writes ([`crate::Flags::ATOMIC`]) of powers of two from
    /// `unit_min` to `unit_max` bytes ([`Geometry::with_atomic_write`], any number of
    /// segments). The device writes each whole, and [`MemDevice::crash_torn`] never
    /// tears one.
    ///
    /// ```
    /// use dio::{MemDevice, MemDeviceConfig, Device};
    /// let dev = MemDevice::new(MemDeviceConfig::new(1 << 20, 512).atomic_write(4096, 65536));
    /// assert_eq!(dev.geometry().atomic_write_units(), Some((4096, 65536)));
    /// ```
    pub fn atomic_write(mut self, unit_min: u32, unit_max: u32) -> Self {
        self.geometry = self.geometry.with_atomic_write(unit_min, unit_max, 0);
        self
    }
    /// Log every request.
    pub fn log(mut self) -> Self {
        self.log = true;
        self
    }
}

/// Counters of a [`MemDevice`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    /// Requests submitted.
    pub requests: u64,
    /// Bytes in submitted requests.
    pub bytes: u64,
    /// Memory segments in submitted requests.
    pub segments: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
    /// Flushes.
    pub flushes: u64,
}

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// Direction.
    pub op: Op,
    /// Device byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Number of memory segments.
    pub segments: usize,
    /// FUA flag.
    pub fua: bool,
    /// Untorn-write flag ([`Request::atomic`]).
    pub atomic: bool,
}

#[derive(Default)]
struct Faults {
    /// Requests touching any of these device byte ranges fail with EIO.
    ranges: Vec<(Range<u64>, Option<Op>)>,
    /// Fail the request with this 1-based sequence number.
    nth: Option<u64>,
}

struct Store {
    data: Vec<u8>,
    /// Durable image (crash mode): what survives a crash.
    durable: Vec<u8>,
    /// Torn-crash mode: the writes since the last flush, in the order they were
    /// done, each with how it may land.
    pending: Vec<(u64, Vec<u8>, Landing)>,
}

/// How a write done since the last flush survives a torn crash.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// Durable already (FUA): always.
    Durable,
    /// Untorn: whole or not at all.
    Whole,
    /// Any subset of its sectors.
    Sectors,
}

/// The unit a non-atomic write tears at in [`MemDevice::crash_torn`].
const TEAR_SECTOR: usize = 512;

struct Shared {
    cfg: MemDeviceConfig,
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    /// Whether any fault is armed (saves the lock on the fast path).
    armed: std::sync::atomic::AtomicBool,
    log: Mutex<Vec<LoggedRequest>>,
    seq: AtomicU64,
    bytes: AtomicU64,
    segments: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    flushes: AtomicU64,
}

/// A request waiting at the completion thread: due time and whether it fails.
type Queued = (Request, Instant, bool);

/// A block device in RAM. See the module docs.
pub struct MemDevice {
    shared: Arc<Shared>,
    worker: Option<(mpsc::Sender<Queued>, thread::JoinHandle<()>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemDevice {
    /// A device as `cfg` describes.
    pub fn new(cfg: MemDeviceConfig) -> MemDevice {
        let size = if cfg.null {
            0
        } else {
            usize::try_from(cfg.geometry.size).expect("RAM device size fits in memory")
        };
        let data = vec![cfg.fill; size];
        let durable = if cfg.crash_mode {
            data.clone()
        } else {
            Vec::new()
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                data,
                durable,
                pending: Vec::new(),
            }),
            faults: Mutex::new(Faults::default()),
            armed: std::sync::atomic::AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            cfg,
        });
        let worker = if shared.cfg.threaded {
            let (tx, rx) = mpsc::channel();
            let s = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name("dio-mem-complete".into())
                .spawn(move || completion_thread(&s, &rx))
                .expect("spawn RAM device completion thread");
            Some((tx, handle))
        } else {
            None
        };
        MemDevice { shared, worker }
    }

    /// Fail (EIO) every request that touches device bytes `range`, of direction `op`
    /// or of both when `None`.
    pub fn fail_range(&self, range: Range<u64>, op: Option<Op>) {
        lock(&self.shared.faults).ranges.push((range, op));
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Fail the `n`th request from now (1 = the next one).
    pub fn fail_nth(&self, n: u64) {
        let now = self.shared.seq.load(Ordering::SeqCst);
        lock(&self.shared.faults).nth = Some(now + n);
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Remove all injected faults.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
        self.shared.armed.store(false, Ordering::SeqCst);
    }

    /// Counters so far.
    pub fn stats(&self) -> MemStats {
        let s = &self.shared;
        MemStats {
            requests: s.seq.load(Ordering::SeqCst),
            bytes: s.bytes.load(Ordering::SeqCst),
            segments: s.segments.load(Ordering::SeqCst),
            max_in_flight: s.max_in_flight.load(Ordering::SeqCst),
            flushes: s.flushes.load(Ordering::SeqCst),
        }
    }

    /// Reset the counters and the request log.
    pub fn reset_stats(&self) {
        let s = &self.shared;
        for c in [&s.seq, &s.bytes, &s.segments, &s.max_in_flight, &s.flushes] {
            c.store(0, Ordering::SeqCst);
        }
        lock(&s.log).clear();
    }

    /// The requests logged so far (needs [`MemDeviceConfig::log`]).
    pub fn log(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).clone()
    }

    /// A copy of device bytes `[offset, offset + len)`.
    pub fn read_raw(&self, offset: u64, len: usize) -> Vec<u8> {
        let st = lock(&self.shared.store);
        let o = offset as usize;
        st.data[o..o + len].to_vec()
    }

    /// Overwrite device bytes directly (test setup).
    pub fn write_raw(&self, offset: u64, bytes: &[u8]) {
        let mut st = lock(&self.shared.store);
        let o = offset as usize;
        st.data[o..o + bytes.len()].copy_from_slice(bytes);
        if self.shared.cfg.crash_mode {
            st.durable[o..o + bytes.len()].copy_from_slice(bytes);
        }
        if self.shared.cfg.torn_crash {
            st.pending.push((offset, bytes.to_vec(), Landing::Durable));
        }
    }

    /// Simulate a power loss: everything not flushed and not written with FUA is
    /// lost. Needs [`MemDeviceConfig::crash_mode`].
    pub fn crash(&self) {
        assert!(self.shared.cfg.crash_mode, "crash() needs crash_mode");
        let mut st = lock(&self.shared.store);
        st.data = st.durable.clone();
        st.pending.clear();
    }

    /// Simulate a power loss that tears writes, as a disk with a volatile write
    /// cache may: every write completed since the last flush (FUA writes excepted,
    /// they are durable) survives in any subset of its 512-byte sectors, except an
    /// untorn write ([`crate::Flags::ATOMIC`], [`Request::atomic`]), which survives
    /// whole or not at all. `seed` picks the subset; each sector (or untorn write)
    /// survives with probability one half. Needs [`MemDeviceConfig::torn_crash`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
    /// let dev = Arc::new(MemDevice::new(
    ///     MemDeviceConfig::new(1 << 20, 512).atomic_write(4096, 65536).torn_crash(),
    /// ));
    /// let map = Arc::new(IdentityMap::new(4096, 1 << 20));
    /// let file = DirectFile::new(dev.clone(), map, Arc::new(FileState::new(1 << 20))).unwrap();
    /// let mut buf = AlignedBuf::new(16384, 4096);
    /// buf.fill(1);
    /// file.write_at(0, &buf, Flags::ATOMIC).unwrap();
    /// dev.crash_torn(7);
    /// let after = dev.read_raw(0, 16384);
    /// assert!(after.iter().all(|&b| b == 1) || after.iter().all(|&b| b == 0));
    /// ```
    pub fn crash_torn(&self, seed: u64) {
        self.tear(seed, true);
    }

    /// [`MemDevice::crash_torn`] on a device that breaks its promise: untorn writes
    /// tear like any other. For testing the tests: a check of the untorn guarantee
    /// must catch the damage this does.
    pub fn crash_torn_all(&self, seed: u64) {
        self.tear(seed, false);
    }

    fn tear(&self, seed: u64, honour_atomic: bool) {
        assert!(
            self.shared.cfg.torn_crash,
            "crash_torn() needs MemDeviceConfig::torn_crash"
        );
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut coin = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng & 1 == 1
        };
        let mut st = lock(&self.shared.store);
        let Store {
            data,
            durable,
            pending,
        } = &mut *st;
        for (at, bytes, landing) in pending.drain(..) {
            let at = at as usize;
            match landing {
                // Durable already, but put back over any older write kept above.
                Landing::Durable => durable[at..at + bytes.len()].copy_from_slice(&bytes),
                Landing::Whole if honour_atomic => {
                    if coin() {
                        durable[at..at + bytes.len()].copy_from_slice(&bytes);
                    }
                }
                Landing::Whole | Landing::Sectors => {
                    for (i, sector) in bytes.chunks(TEAR_SECTOR).enumerate() {
                        if coin() {
                            let o = at + i * TEAR_SECTOR;
                            durable[o..o + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
        data.copy_from_slice(durable);
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

impl Shared {
    #[inline]
    fn injected_fault(&self, seq: u64, req: &Request, len: u64) -> bool {
        self.armed.load(Ordering::SeqCst) && self.armed_fault(seq, req, len)
    }

    fn armed_fault(&self, seq: u64, req: &Request, len: u64) -> bool {
        let f = lock(&self.faults);
        if f.nth == Some(seq) {
            return true;
        }
        let r = req.offset..req.offset + len;
        f.ranges.iter().any(|(range, op)| {
            op.is_none_or(|o| o == req.op) && r.start < range.end && range.start < r.end
        })
    }

    /// Move the data of `req` (`len` bytes) and return its result.
    #[inline(always)]
    fn execute(&self, req: &mut Request, len: u64, fail: bool) -> io::Result<()> {
        check_request_len(&self.cfg.geometry, req, len)?;
        if fail {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.cfg.null {
            return Ok(());
        }
        // Safe code, through the request's own copies: a device needs no `unsafe`.
        let mut st = lock(&self.store);
        let start = req.offset() as usize;
        let pos = start + len as usize;
        match req.op() {
            Op::Read => req.copy_in(0, &st.data[start..pos]),
            Op::Write => req.copy_out(0, &mut st.data[start..pos]),
        }
        if self.cfg.crash_mode && req.op() == Op::Write && req.fua() {
            let Store { data, durable, .. } = &mut *st;
            durable[start..pos].copy_from_slice(&data[start..pos]);
        }
        if self.cfg.torn_crash && req.op() == Op::Write {
            let landing = if req.fua() {
                Landing::Durable
            } else if req.atomic() {
                Landing::Whole
            } else {
                Landing::Sectors
            };
            let bytes = st.data[start..pos].to_vec();
            st.pending.push((req.offset(), bytes, landing));
        }
        Ok(())
    }

    /// Complete `req`. Inlined into `submit`, so that the request is completed
    /// where it arrived instead of being copied into another frame first (a copy of
    /// a freshly built request stalls on store forwarding).
    #[inline(always)]
    fn finish(&self, req: &mut Request, len: u64, fail: bool) {
        let result = self.execute(req, len, fail);
        if self.cfg.stats {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        req.complete_here(result);
    }
}

fn completion_thread(s: &Shared, rx: &mpsc::Receiver<Queued>) {
    let mut rng = s.cfg.seed | 1;
    let mut batch: VecDeque<Queued> = VecDeque::new();
    while let Ok(first) = rx.recv() {
        batch.push_back(first);
        if s.cfg.reorder {
            // Give the submitter a moment to queue more, then complete what is
            // waiting in a shuffled order.
            thread::yield_now();
            while let Ok(more) = rx.try_recv() {
                batch.push_back(more);
            }
        }
        while !batch.is_empty() {
            let i = if s.cfg.reorder {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % batch.len() as u64) as usize
            } else {
                0
            };
            let (mut req, due, fail) = batch.remove(i).expect("index in range");
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            let len = req.len();
            s.finish(&mut req, len, fail);
        }
    }
}

impl Device for MemDevice {
    fn geometry(&self) -> Geometry {
        self.shared.cfg.geometry
    }

    fn submit(&self, mut req: Request) {
        let s = &self.shared;
        let len = req.len();
        let seq = if s.cfg.stats {
            let seq = s.seq.fetch_add(1, Ordering::SeqCst) + 1;
            s.bytes.fetch_add(len, Ordering::Relaxed);
            s.segments
                .fetch_add(req.segments.len() as u64, Ordering::Relaxed);
            let now_in = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            // The maximum rarely moves: look before the read-modify-write.
            if now_in > s.max_in_flight.load(Ordering::SeqCst) {
                s.max_in_flight.fetch_max(now_in, Ordering::SeqCst);
            }
            seq
        } else if s.armed.load(Ordering::SeqCst) {
            s.seq.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            0
        };
        if s.cfg.log {
            lock(&s.log).push(LoggedRequest {
                op: req.op,
                offset: req.offset,
                len,
                segments: req.segments.len(),
                fua: req.fua,
                atomic: req.atomic,
            });
        }
        let fail = s.injected_fault(seq, &req, len);
        match &self.worker {
            Some((tx, _)) => {
                let due = Instant::now() + s.cfg.latency.unwrap_or_default();
                if let Err(mpsc::SendError((mut req, _, fail))) = tx.send((req, due, fail)) {
                    s.finish(&mut req, len, fail);
                }
            }
            // Inline: completed in place, in the caller's request.
            None => s.finish(&mut req, len, fail),
        }
    }

    fn flush(&self) -> io::Result<()> {
        let s = &self.shared;
        s.flushes.fetch_add(1, Ordering::SeqCst);
        if s.cfg.crash_mode {
            // Every write completed so far becomes durable.
            let mut st = lock(&s.store);
            let Store {
                data,
                durable,
                pending,
            } = &mut *st;
            durable.copy_from_slice(data);
            pending.clear();
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "mem"
    }
}

impl Drop for MemDevice {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.worker.take() {
            drop(tx);
            // The last reference may go away on the completion thread itself (a
            // completion dropped the last file handle): it then ends by itself.
            if handle.thread().id() != thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}
