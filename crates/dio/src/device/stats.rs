//! An observed device: [`StatsDevice`] wraps any [`Device`] and counts what goes
//! through it (requests, bytes, requests in flight, flushes, errors) with a latency
//! histogram per direction, readable at any time as an [`IoStats`] (glommio's
//! `IoStats` is the precedent). The engine counts merges and splits per file in
//! [`crate::Stats`].
//!
//! Nothing is counted unless a device is wrapped: the engine and the back ends
//! keep no counters of their own for this. Wrapped, a request costs one small
//! allocation (its forwarding completion, which carries the start time), one clock
//! read at each end and a few relaxed atomic additions.

#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Completion, Device, DeviceWrapper, Finished, Op, Request};

/// Buckets of a [`LatencyHistogram`]: bucket `i` counts latencies in
/// `[2^i, 2^(i+1))` nanoseconds (bucket 0 also counts 0 ns).
pub const LATENCY_BUCKETS: usize = 64;

/// A log2 latency histogram (a snapshot): counts per power-of-two nanosecond
/// bucket, with percentile queries.
///
/// ```
/// use std::time::Duration;
/// let mut h = dio::LatencyHistogram::default();
/// for us in [10u64, 12, 15, 900] {
///     h.record(Duration::from_micros(us));
/// }
/// assert_eq!(h.count(), 4);
/// // The median lies in [8192, 16384) ns; percentiles answer a bucket's upper end.
/// assert_eq!(h.percentile(50.0), Duration::from_nanos(16383));
/// assert!(h.percentile(99.0) >= Duration::from_micros(900));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: [u64; LATENCY_BUCKETS],
    sum_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
            sum_ns: 0,
        }
    }
}

/// The bucket of a latency of `ns` nanoseconds.
fn bucket(ns: u64) -> usize {
    (63 - (ns | 1).leading_zeros()) as usize
}

impl LatencyHistogram {
    /// Count one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The counts per bucket (bucket `i`: `[2^i, 2^(i+1))` ns).
    pub fn buckets(&self) -> &[u64; LATENCY_BUCKETS] {
        &self.buckets
    }

    /// Mean latency (zero when nothing was counted).
    pub fn mean(&self) -> Duration {
        match self.count() {
            0 => Duration::ZERO,
            n => Duration::from_nanos(self.sum_ns / n),
        }
    }

    /// The latency under which `p` percent of the counted ones lie, rounded up to
    /// the end of its bucket (so within a factor of two above the truth; zero when
    /// nothing was counted). `p` is clamped to `[0, 100]`.
    pub fn percentile(&self, p: f64) -> Duration {
        let n = self.count();
        if n == 0 {
            return Duration::ZERO;
        }
        let p = if p.is_nan() {
            100.0
        } else {
            p.clamp(0.0, 100.0)
        };
        // The rank of the p-th percentile, 1-based: at least the first.
        let rank = ((p / 100.0 * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let end = if i == 63 { u64::MAX } else { (2u64 << i) - 1 };
                return Duration::from_nanos(end);
            }
        }
        Duration::from_nanos(u64::MAX)
    }

    /// Add another histogram's counts to this one.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }
}

/// What a [`StatsDevice`] counted (a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IoStats {
    /// Read requests submitted.
    pub reads: u64,
    /// Write requests submitted.
    pub writes: u64,
    /// Bytes in read requests submitted.
    pub bytes_read: u64,
    /// Bytes in write requests submitted.
    pub bytes_written: u64,
    /// Requests submitted and not completed yet.
    pub in_flight: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
    /// Flushes (completed or failed).
    pub flushes: u64,
    /// Requests and flushes that failed.
    pub errors: u64,
    /// Time from submit to completion of read requests.
    pub read_latency: LatencyHistogram,
    /// Time from submit to completion of write requests.
    pub write_latency: LatencyHistogram,
}

impl IoStats {
    /// Requests submitted, both directions.
    pub fn requests(&self) -> u64 {
        self.reads + self.writes
    }

    /// The read and write latencies together.
    pub fn latency(&self) -> LatencyHistogram {
        let mut h = self.read_latency.clone();
        h.merge(&self.write_latency);
        h
    }
}

impl std::fmt::Display for IoStats {
    /// A few lines for people: counts, bytes, and the latency percentiles.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests: {} reads ({} bytes), {} writes ({} bytes); {} flushes, {} errors; \
             in flight {} (max {})",
            self.reads,
            self.bytes_read,
            self.writes,
            self.bytes_written,
            self.flushes,
            self.errors,
            self.in_flight,
            self.max_in_flight
        )?;
        for (name, h) in [("read", &self.read_latency), ("write", &self.write_latency)] {
            if h.count() > 0 {
                writeln!(
                    f,
                    "{name} latency: mean {:?}, p50 <= {:?}, p99 <= {:?}, p99.9 <= {:?}, max <= {:?}",
                    h.mean(),
                    h.percentile(50.0),
                    h.percentile(99.0),
                    h.percentile(99.9),
                    h.percentile(100.0)
                )?;
            }
        }
        Ok(())
    }
}

struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
    fn record(&self, ns: u64) {
        self.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
    fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
    fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.sum_ns.store(0, Ordering::Relaxed);
    }
}

struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
    read_latency: Histogram,
    write_latency: Histogram,
}

/// The completion of one forwarded request: when it started.
struct Timed {
    counters: Arc<Counters>,
    start: Instant,
}

impl Completion for Timed {
    fn complete(self: Arc<Self>, mut req: Finished, result: io::Result<()>) {
        let c = &self.counters;
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        match req.op() {
            Op::Read => c.read_latency.record(ns),
            Op::Write => c.write_latency.record(ns),
        }
        if result.is_err() {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(parent) = req.take_parent() {
            parent.complete(result);
        }
    }
}

/// Any [`Device`], counted: requests, bytes, requests in flight, flushes, errors
/// and latency histograms ([`IoStats`]), read with [`StatsDevice::stats`] while it
/// runs. It forwards everything else unchanged (geometry, completion mode,
/// polling), so it goes wherever the device went.
///
/// ```
/// use std::sync::Arc;
/// use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig, StatsDevice};
///
/// let dev = Arc::new(StatsDevice::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512))));
/// let file = DirectFile::new(dev.clone(), Arc::new(IdentityMap::new(4096, 1 << 20)),
///                            Arc::new(FileState::new(1 << 20))).unwrap();
/// let mut buf = AlignedBuf::new(8192, 4096);
/// file.write_at(0, &buf, Flags::NONE).unwrap();
/// file.read_at(0, &mut buf, Flags::NONE).unwrap();
/// let s = dev.stats();
/// assert_eq!((s.reads, s.writes, s.bytes_read, s.bytes_written), (1, 1, 8192, 8192));
/// assert_eq!(s.read_latency.count(), 1);
/// println!("{s}");
/// ```
///
/// Over a [`RawFile`](crate::RawFile): `raw.direct().with_device(Arc::new(
/// StatsDevice::new(raw.direct().device().clone())))` gives the same file through
/// the counted device.
pub struct StatsDevice<D> {
    inner: D,
    counters: Arc<Counters>,
}

impl<D: std::fmt::Debug> std::fmt::Debug for StatsDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsDevice")
            .field("inner", &self.inner)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<D: Device> StatsDevice<D> {
    /// Count what goes through `inner`.
    pub fn new(inner: D) -> StatsDevice<D> {
        StatsDevice {
            inner,
            counters: Arc::new(Counters {
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                max_in_flight: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                read_latency: Histogram::new(),
                write_latency: Histogram::new(),
            }),
        }
    }
}

impl<D> StatsDevice<D> {
    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The counts so far.
    pub fn stats(&self) -> IoStats {
        let c = &self.counters;
        IoStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            max_in_flight: c.max_in_flight.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            read_latency: c.read_latency.snapshot(),
            write_latency: c.write_latency.snapshot(),
        }
    }

    /// Start counting from zero (requests in flight stay counted as in flight).
    pub fn reset(&self) {
        let c = &self.counters;
        for n in [
            &c.reads,
            &c.writes,
            &c.bytes_read,
            &c.bytes_written,
            &c.flushes,
            &c.errors,
        ] {
            n.store(0, Ordering::Relaxed);
        }
        c.max_in_flight
            .store(c.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        c.read_latency.reset();
        c.write_latency.reset();
    }
}

impl<D: Device> DeviceWrapper for StatsDevice<D> {
    type Inner = D;

    fn inner(&self) -> &D {
        &self.inner
    }

    fn submit(&self, req: Request) {
        let c = &self.counters;
        let len = req.len();
        match req.op() {
            Op::Read => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
            }
            Op::Write => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(len, Ordering::Relaxed);
            }
        }
        let now_in = c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        if now_in > c.max_in_flight.load(Ordering::Relaxed) {
            c.max_in_flight.fetch_max(now_in, Ordering::Relaxed);
        }
        let timed = Arc::new(Timed {
            counters: Arc::clone(c),
            start: Instant::now(),
        });
        self.inner.submit(req.forward(timed));
    }

    fn flush(&self) -> io::Result<()> {
        let r = self.inner.flush();
        let c = &self.counters;
        c.flushes.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}
