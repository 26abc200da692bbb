//! fsx: a file-system exerciser in the spirit of fstests' fsx, for the engine.
//!
//! It runs random operations through a [`DirectFile`] (direct reads and writes at
//! fs-block, logical-block and byte alignments, from one or several buffers, sync and
//! async with many calls in flight, truncates up and down, and on test maps hole
//! punching and preallocation) and checks every byte read against an in-memory
//! model of the file. The operations come from a seed, so a run is repeatable; on a
//! divergence it returns the operation log and the first wrong byte.
//!
//! A [`Target`] is what the operations go to: the RAM device under a test map (with
//! EIO injected on random requests, and the device pre-filled with 0xAA so stale data
//! shows), a host file or block device through [`crate::RawFile`], or any other
//! [`DirectFile`] (a file inside an image, overwrites only).
//!
//! With faults, the model knows what a call may do: an error or a short count is
//! allowed, but bytes before a reported count must be the new ones, and bytes of a
//! failed part may be old or new, never anything else. It owns no engine logic: it
//! only calls the public API.

use std::collections::VecDeque;
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::RawFile;
use crate::device::{
    Completion, CompletionMode, Device, Finished, Geometry, MemDevice, MemDeviceConfig, Request,
};
use crate::map::{TestMap, TestMapConfig};
use crate::{AlignedBuf, DirectFile, Error, FileState, Flags, Result};

/// The byte the RAM target's device is filled with: a read that shows it returned
/// data the file never wrote.
pub const STALE: u8 = 0xAA;

/// How long one async call may take before fsx calls it a hang.
const HANG: Duration = Duration::from_secs(60);

/// A small seeded generator (splitmix64): the same seed gives the same operations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fill `buf` with the data of operation `op` at file offset `at`: different for
/// every operation and offset, never 0 and never [`STALE`].
pub fn pattern(buf: &mut [u8], op: u64, at: u64) {
    let h = mix(op.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66);
    let mut word = 0;
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = at + i as u64;
        if i == 0 || pos & 7 == 0 {
            word = mix(h ^ (pos >> 3));
        }
        let v = (word >> ((pos & 7) * 8)) as u8;
        *b = match v {
            0 => 1,
            STALE => 0x55,
            v => v,
        };
    }
}

/// Counters of a [`FaultyDevice`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests seen.
    pub requests: u64,
    /// Requests failed with EIO without touching the medium.
    pub failed: u64,
    /// Requests that moved their data and then reported EIO anyway.
    pub torn: u64,
}

impl FaultStats {
    /// Faults injected, of both kinds.
    pub fn injected(&self) -> u64 {
        self.failed + self.torn
    }
}

/// A device that fails random requests with EIO: half of the failures happen before
/// the data moves, half after (the data landed, the device still says EIO). The
/// choice follows a seeded generator in submission order.
pub struct FaultyDevice {
    inner: Arc<dyn Device>,
    rate_ppm: AtomicU64,
    armed: AtomicBool,
    rng: Mutex<Rng>,
    requests: AtomicU64,
    failed: AtomicU64,
    torn: AtomicU64,
}

impl fmt::Debug for FaultyDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyDevice")
            .field("inner", &self.inner.name())
            .field("rate_ppm", &self.rate_ppm.load(Ordering::Relaxed))
            .finish()
    }
}

impl FaultyDevice {
    /// Wrap `inner`, failing a fraction `rate` (0..=1) of requests.
    pub fn new(inner: Arc<dyn Device>, rate: f64, seed: u64) -> FaultyDevice {
        FaultyDevice {
            inner,
            rate_ppm: AtomicU64::new((rate.clamp(0.0, 1.0) * 1e6) as u64),
            armed: AtomicBool::new(true),
            rng: Mutex::new(Rng::new(seed ^ 0xFA17)),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            torn: AtomicU64::new(0),
        }
    }

    /// Inject faults (true) or pass everything through (false).
    pub fn set_armed(&self, armed: bool) {
        self.armed.store(armed, Ordering::SeqCst);
    }

    /// Whether faults may be injected now.
    pub fn active(&self) -> bool {
        self.armed.load(Ordering::SeqCst) && self.rate_ppm.load(Ordering::Relaxed) > 0
    }

    /// Counters so far.
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            requests: self.requests.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            torn: self.torn.load(Ordering::SeqCst),
        }
    }
}

/// Reports EIO for a request whose data the inner device moved.
struct FailAfter;

impl Completion for FailAfter {
    fn complete(self: Arc<Self>, mut inner: Finished, _result: std::io::Result<()>) {
        if let Some(outer) = inner.take_parent() {
            outer.complete(Err(std::io::Error::from_raw_os_error(libc::EIO)));
        }
    }
}

impl Device for FaultyDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn submit(&self, req: Request) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.active() {
            let rate = self.rate_ppm.load(Ordering::Relaxed);
            let (fail, land) = {
                let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                (rng.below(1_000_000) < rate, rng.percent(50))
            };
            if fail && land {
                self.torn.fetch_add(1, Ordering::SeqCst);
                // The inner request stands in for the outer one, which completes
                // (with EIO) only after the inner one moved the data.
                return self.inner.submit(req.forward(Arc::new(FailAfter)));
            }
            if fail {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return req.complete(Err(std::io::Error::from_raw_os_error(libc::EIO)));
            }
        }
        self.inner.submit(req);
    }

    fn unplug(&self) {
        self.inner.unplug();
    }

    fn poll(&self, wait: bool) -> std::io::Result<usize> {
        self.inner.poll(wait)
    }

    fn completion_mode(&self) -> CompletionMode {
        self.inner.completion_mode()
    }

    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

/// How the RAM target is built.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemTarget {
    /// Largest file size (the model's span); the device is a little larger.
    pub span: u64,
    /// fs block of the test map.
    pub fs_block: u32,
    /// Device logical block (and memory alignment).
    pub logical_block: u32,
    /// Fraction of device requests failed with EIO.
    pub fault_rate: f64,
    /// Complete requests on the device's own thread, shuffled.
    pub threaded: bool,
    /// Seed of the device limits, boundaries, shuffle and faults.
    pub seed: u64,
    /// Request limits of the device (segments, bytes); random from the seed when
    /// `None`.
    pub limits: Option<(u32, u32)>,
}

impl MemTarget {
    /// A RAM target of `span` bytes: 4 KiB fs blocks on 512-byte sectors, threaded,
    /// no faults.
    pub fn new(span: u64, seed: u64) -> MemTarget {
        MemTarget {
            span,
            fs_block: 4096,
            logical_block: 512,
            fault_rate: 0.0,
            threaded: true,
            seed,
            limits: None,
        }
    }
    /// Set the device's request limits: most segments and bytes per request.
    pub fn limits(mut self, segments: u32, bytes: u32) -> MemTarget {
        self.limits = Some((segments, bytes));
        self
    }
    /// Fail this fraction of requests.
    pub fn faults(mut self, rate: f64) -> MemTarget {
        self.fault_rate = rate;
        self
    }
    /// Set the fs block size.
    pub fn fs_block(mut self, fs: u32) -> MemTarget {
        self.fs_block = fs;
        self
    }
    /// Complete inline (false) or on the device thread (true).
    pub fn threaded(mut self, threaded: bool) -> MemTarget {
        self.threaded = threaded;
        self
    }
}

type Resize = Box<dyn Fn(u64) -> Result<()> + Send + Sync>;

/// What fsx runs against: a file, how to resize it, and the knobs it may turn.
pub struct Target {
    name: String,
    file: DirectFile,
    resize: Option<Resize>,
    map: Option<Arc<TestMap>>,
    faults: Option<Arc<FaultyDevice>>,
    mem: Option<Arc<MemDevice>>,
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish()
    }
}

impl Target {
    /// The RAM device (0xAA-filled, random request limits) under a test map
    /// (random boundaries), behind a [`FaultyDevice`].
    pub fn mem(cfg: &MemTarget) -> Result<Target> {
        let mut rng = Rng::new(cfg.seed ^ 0x3E3);
        let fs = u64::from(cfg.fs_block);
        let span = cfg.span.div_ceil(fs) * fs;
        let dev_size = span + (1 << 20);
        // Some limits cut requests inside an fs block (6 KiB on 4 KiB blocks), so a
        // failed request can leave a block half written.
        let segs = [4u32, 16, 256][rng.below(3) as usize];
        let bytes = [6u32 << 10, 16 << 10, 64 << 10, 1 << 20][rng.below(4) as usize];
        let (segs, bytes) = cfg.limits.unwrap_or((segs, bytes));
        let bytes = (bytes / cfg.logical_block * cfg.logical_block).max(cfg.logical_block);
        let geo = Geometry::new(cfg.logical_block, dev_size).with_limits(segs, bytes);
        let mut dcfg = MemDeviceConfig::new(dev_size, cfg.logical_block)
            .geometry(geo)
            .fill(STALE)
            .crash_mode();
        if cfg.threaded {
            dcfg = dcfg.threaded(None, true, cfg.seed | 1);
        }
        let mem = Arc::new(MemDevice::new(dcfg));
        let faults = Arc::new(FaultyDevice::new(
            mem.clone() as Arc<dyn Device>,
            cfg.fault_rate,
            cfg.seed,
        ));
        let mut mcfg = TestMapConfig::new(cfg.fs_block, dev_size / fs);
        if rng.percent(30) {
            mcfg = mcfg.boundary_every(1 + rng.below(8));
        }
        if rng.percent(30) {
            mcfg = mcfg.max_extent(1 + rng.below(16));
        }
        let map = Arc::new(TestMap::new(mcfg));
        let file = DirectFile::new(
            faults.clone() as Arc<dyn Device>,
            map.clone(),
            Arc::new(FileState::new(0)),
        )?;
        let f = file.clone();
        Ok(Target {
            name: format!(
                "mem ({} KiB span, fs {}, sector {}, {} segs x {} KiB per request, faults {})",
                span >> 10,
                cfg.fs_block,
                cfg.logical_block,
                segs,
                bytes >> 10,
                cfg.fault_rate
            ),
            file,
            resize: Some(Box::new(move |s| f.truncate(s))),
            map: Some(map),
            faults: Some(faults),
            mem: Some(mem),
            _keep: None,
        })
    }

    /// A host file (resizable) or block device (overwrites only) through the raw
    /// client.
    pub fn raw(raw: RawFile) -> Target {
        let raw = Arc::new(raw);
        let name = format!(
            "{} ({})",
            if raw.is_block_device() {
                "block device"
            } else {
                "host file"
            },
            raw.backend_name()
        );
        let resize: Option<Resize> = if raw.is_block_device() {
            None
        } else {
            let r = Arc::clone(&raw);
            Some(Box::new(move |s| r.set_len(s)))
        };
        Target {
            name,
            file: raw.direct().clone(),
            resize,
            map: None,
            faults: None,
            mem: None,
            _keep: Some(Box::new(raw)),
        }
    }

    /// Any file; without `resize` fsx only overwrites it within its size. `keep`
    /// holds whatever must outlive the file (an image, a device).
    pub fn file(
        name: impl Into<String>,
        file: DirectFile,
        resize: Option<Resize>,
        keep: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Target {
        Target {
            name: name.into(),
            file,
            resize,
            map: None,
            faults: None,
            mem: None,
            _keep: keep,
        }
    }

    /// A description for reports.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The file under test.
    pub fn direct(&self) -> &DirectFile {
        &self.file
    }
    /// The test map, for the RAM target.
    pub fn test_map(&self) -> Option<&Arc<TestMap>> {
        self.map.as_ref()
    }
    /// The RAM device, for the RAM target.
    pub fn mem_device(&self) -> Option<&Arc<MemDevice>> {
        self.mem.as_ref()
    }
    /// The fault injector, for the RAM target.
    pub fn faulty_device(&self) -> Option<&Arc<FaultyDevice>> {
        self.faults.as_ref()
    }

    fn faults_active(&self) -> bool {
        self.faults.as_ref().is_some_and(|f| f.active())
    }

    fn arm(&self, armed: bool) {
        if let Some(f) = &self.faults {
            f.set_armed(armed);
        }
    }
}

/// How one run goes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Seed of the operations.
    pub seed: u64,
    /// Stop after this many operations.
    pub ops: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Largest file size for resizable targets; at most this much of a fixed-size
    /// target is exercised.
    pub span: u64,
    /// Largest read or write.
    pub max_len: u64,
    /// Most calls in flight in one batch.
    pub max_batch: usize,
    /// Use byte-granular calls ([`Flags::UNALIGNED`]) too.
    pub unaligned: bool,
    /// Operations kept for the log of a divergence.
    pub log_len: usize,
    /// Read the whole file back every this many operations.
    pub verify_every: u64,
    /// Corrupt the model at this operation (proves the checker; for tests).
    pub corrupt_model_at: Option<u64>,
    /// Stop when this becomes true (Ctrl-C).
    pub stop: Option<Arc<AtomicBool>>,
}

impl Options {
    /// `ops` operations from `seed` with the defaults: 4 MiB span, calls up to
    /// 256 KiB, batches of up to 16, byte-granular calls included.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            ops: Some(10_000),
            duration: None,
            span: 4 << 20,
            max_len: 256 << 10,
            max_batch: 16,
            unaligned: true,
            log_len: 64,
            verify_every: 1000,
            corrupt_model_at: None,
            stop: None,
        }
    }
    /// Run this many operations.
    pub fn ops(mut self, n: u64) -> Options {
        self.ops = Some(n);
        self.duration = None;
        self
    }
    /// Run this long.
    pub fn duration(mut self, d: Duration) -> Options {
        self.duration = Some(d);
        self.ops = None;
        self
    }
    /// Set the span.
    pub fn span(mut self, span: u64) -> Options {
        self.span = span;
        self
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Operations run (a batch counts once per call in it).
    pub ops: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Engine calls (reads and writes).
    pub calls: u64,
    /// Reads checked.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Truncates.
    pub truncates: u64,
    /// Holes punched.
    pub punches: u64,
    /// Preallocations.
    pub preallocs: u64,
    /// Batches of concurrent calls.
    pub batches: u64,
    /// Whole-file read-backs.
    pub verifies: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Calls that returned an error (only with faults).
    pub errors: u64,
    /// Calls that returned a short count not explained by EOF (only with faults).
    pub partials: u64,
    /// Faults the device injected.
    pub faults: FaultStats,
}

impl Report {
    /// Operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops in {:.1} s ({:.0} ops/s): {} calls ({} reads, {} writes, {} batches), {} truncates, {} punches, {} preallocs, {} verifies; {} MiB read, {} MiB written",
            self.ops,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec(),
            self.calls,
            self.reads,
            self.writes,
            self.batches,
            self.truncates,
            self.punches,
            self.preallocs,
            self.verifies,
            self.bytes_read >> 20,
            self.bytes_written >> 20,
        )?;
        if self.faults.requests > 0 && self.faults.injected() > 0 {
            write!(
                f,
                "; faults: {} of {} requests ({} before the data moved, {} after), {} calls failed, {} short counts",
                self.faults.injected(),
                self.faults.requests,
                self.faults.failed,
                self.faults.torn,
                self.errors,
                self.partials
            )?;
        }
        Ok(())
    }
}

/// The first byte a read got wrong.
#[derive(Debug, Clone)]
pub struct WrongByte {
    /// File offset.
    pub offset: u64,
    /// What the read returned.
    pub got: u8,
    /// What the model allows there.
    pub expected: Vec<u8>,
    /// Wrong bytes in that read.
    pub wrong: u64,
}

/// A divergence between the file and the model.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// Seed of the run.
    pub seed: u64,
    /// Operation number (from 1).
    pub op: u64,
    /// What went wrong.
    pub what: String,
    /// The first wrong byte, for a data mismatch.
    pub first_wrong: Option<WrongByte>,
    /// The last operations, oldest first, the failing one last.
    pub log: Vec<String>,
    /// What the run had done until then.
    pub report: Report,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "divergence at op {} (seed {}): {}",
            self.op, self.seed, self.what
        )?;
        if let Some(w) = &self.first_wrong {
            let exp: Vec<String> = w.expected.iter().map(|b| format!("{b:#04x}")).collect();
            let stale = if w.got == STALE {
                " (0xAA: the device's fill, never written)"
            } else {
                ""
            };
            writeln!(
                f,
                "first wrong byte at file offset {} ({:#x}): got {:#04x}{stale}, expected {}; {} wrong bytes in this read",
                w.offset,
                w.offset,
                w.got,
                exp.join(" or "),
                w.wrong
            )?;
        }
        writeln!(f, "operation log (last {} ops):", self.log.len())?;
        for l in &self.log {
            writeln!(f, "  {l}")?;
        }
        write!(f, "after {}", self.report)
    }
}

impl std::error::Error for Divergence {}

/// The model of the file: its size and bytes, plus the bytes a failed write may or
/// may not have left (each one is either the model's byte or one of these).
#[derive(Clone)]
struct Model {
    size: u64,
    data: Vec<u8>,
    maybe: Vec<(u64, Vec<u8>)>,
}

impl Model {
    fn new(span: u64) -> Model {
        Model {
            size: 0,
            data: vec![0; span as usize],
            maybe: Vec::new(),
        }
    }

    fn accepts(&self, at: u64, b: u8) -> bool {
        self.data[at as usize] == b
            || self
                .maybe
                .iter()
                .any(|(s, v)| at >= *s && at < s + v.len() as u64 && v[(at - s) as usize] == b)
    }

    fn candidates(&self, at: u64) -> Vec<u8> {
        let mut c = vec![self.data[at as usize]];
        for (s, v) in &self.maybe {
            if at >= *s && at < s + v.len() as u64 {
                let b = v[(at - s) as usize];
                if !c.contains(&b) {
                    c.push(b);
                }
            }
        }
        c
    }

    /// Forget the alternatives over `[a, b)`.
    fn cut(&mut self, a: u64, b: u64) {
        if self.maybe.is_empty() {
            return;
        }
        let mut out = Vec::new();
        for (s, v) in self.maybe.drain(..) {
            let e = s + v.len() as u64;
            if e <= a || s >= b {
                out.push((s, v));
                continue;
            }
            if s < a {
                out.push((s, v[..(a - s) as usize].to_vec()));
            }
            if e > b {
                out.push((b, v[(b - s) as usize..].to_vec()));
            }
        }
        self.maybe = out;
    }

    fn set(&mut self, at: u64, bytes: &[u8]) {
        self.data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        self.cut(at, at + bytes.len() as u64);
    }

    fn zero(&mut self, a: u64, b: u64) {
        let b = b.min(self.data.len() as u64);
        if a < b {
            self.data[a as usize..b as usize].fill(0);
            self.cut(a, b);
        }
    }

    fn might_be(&mut self, at: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.maybe.push((at, bytes.to_vec()));
        }
    }
}

/// First byte of `got` (read at `off`) that no model allows.
fn first_wrong(models: &[&Model], off: u64, got: &[u8]) -> Option<WrongByte> {
    let ok = |i: usize| models.iter().any(|m| m.accepts(off + i as u64, got[i]));
    let first = (0..got.len()).find(|&i| !ok(i))?;
    let wrong = (first..got.len()).filter(|&i| !ok(i)).count() as u64;
    let at = off + first as u64;
    let mut expected = Vec::new();
    for m in models {
        for b in m.candidates(at) {
            if !expected.contains(&b) {
                expected.push(b);
            }
        }
    }
    Some(WrongByte {
        offset: at,
        got: got[first],
        expected,
        wrong,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Fs,
    Sector,
    Byte,
}

/// One read or write.
#[derive(Debug, Clone)]
struct Io {
    write: bool,
    off: u64,
    len: u64,
    align: Align,
    flags: Flags,
    /// Offset of the buffer's start from a page boundary (sync calls).
    skew: usize,
    /// Lengths of the buffers.
    pieces: Vec<usize>,
    /// Async (owned buffers, callback) rather than sync.
    async_: bool,
}

impl fmt::Display for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:#x}+{:#x} ({}..{}) {} {}",
            if self.write { "write" } else { "read " },
            self.off,
            self.len,
            self.off,
            self.off + self.len,
            if self.async_ { "async" } else { "sync " },
            match self.align {
                Align::Fs => "fs-aligned",
                Align::Sector => "sector",
                Align::Byte => "byte",
            }
        )?;
        if self.pieces.len() > 1 {
            write!(f, " iov={:?}", self.pieces)?;
        }
        if self.skew != 0 {
            write!(f, " mem+{}", self.skew)?;
        }
        for (flag, name) in [
            (Flags::LOCKING, "locking"),
            (Flags::DSYNC, "dsync"),
            (Flags::ASYNC_EXTEND, "async-extend"),
            (Flags::NOWAIT, "nowait"),
            (Flags::UNALIGNED, "unaligned"),
        ] {
            if self.flags.contains(flag) {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

/// The flags of `flags` that are among `keep`.
fn keep_flags(flags: Flags, keep: &[Flags]) -> Flags {
    keep.iter()
        .filter(|&&f| flags.contains(f))
        .fold(Flags::NONE, |acc, &f| acc | f)
}

fn show(r: &Result<usize>) -> String {
    match r {
        Ok(n) => format!("-> {n}"),
        Err(e) => format!("-> error ({e})"),
    }
}

/// The exerciser: a target, a model and a generator.
struct Fsx<'a> {
    t: &'a Target,
    o: &'a Options,
    rng: Rng,
    model: Model,
    span: u64,
    fixed: bool,
    fs: u64,
    lb: u64,
    mem_align: usize,
    log: VecDeque<String>,
    op: u64,
    next_verify: u64,
    corrupted: bool,
    report: Report,
    start: Instant,
}

type Step = std::result::Result<(), Box<Divergence>>;

/// Run `opts` against `target`. `progress` is called about twice a second.
pub fn run(
    target: &Target,
    opts: &Options,
    progress: &mut dyn FnMut(&Report),
) -> std::result::Result<Report, Box<Divergence>> {
    let file = &target.file;
    let fixed = target.resize.is_none();
    let span = if fixed {
        file.size().min(opts.span)
    } else {
        opts.span
    };
    let (mem_align, lb) = file.dio_align();
    let mut x = Fsx {
        t: target,
        o: opts,
        rng: Rng::new(opts.seed),
        model: Model::new(span),
        span,
        fixed,
        fs: u64::from(file.block_size()),
        lb: u64::from(lb),
        mem_align: mem_align as usize,
        log: VecDeque::new(),
        op: 0,
        next_verify: opts.verify_every,
        corrupted: false,
        report: Report::default(),
        start: Instant::now(),
    };
    x.setup()?;
    let mut last = Instant::now();
    loop {
        if opts.ops.is_some_and(|n| x.op >= n)
            || opts.duration.is_some_and(|d| x.start.elapsed() >= d)
            || opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            break;
        }
        x.step()?;
        if last.elapsed() >= Duration::from_millis(500) {
            last = Instant::now();
            progress(&x.snapshot());
        }
    }
    x.op += 1;
    x.verify()?;
    x.op -= 1;
    Ok(x.snapshot())
}

impl Fsx<'_> {
    fn snapshot(&self) -> Report {
        let mut r = self.report.clone();
        r.ops = self.op;
        r.elapsed = self.start.elapsed();
        if let Some(f) = &self.t.faults {
            r.faults = f.stats();
        }
        r
    }

    fn note(&mut self, line: String) {
        if self.log.len() == self.o.log_len.max(1) {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    fn diverge(&mut self, what: String, first_wrong: Option<WrongByte>) -> Box<Divergence> {
        self.t.arm(false);
        Box::new(Divergence {
            seed: self.o.seed,
            op: self.op,
            what,
            first_wrong,
            log: self.log.iter().cloned().collect(),
            report: self.snapshot(),
        })
    }

    /// Start from a known file: resizable targets are truncated to 0, fixed ones
    /// are read once.
    fn setup(&mut self) -> Step {
        self.t.arm(false);
        if let Some(resize) = &self.t.resize {
            if let Err(e) = resize(0) {
                return Err(self.diverge(format!("truncate to 0 at start: {e}"), None));
            }
            self.model.size = 0;
        } else {
            // The file may be larger than the span: only the span is exercised.
            self.model.size = self.t.file.size();
            let mut at = 0;
            while at < self.span {
                let len = (self.span - at).min(1 << 20) as usize;
                let mut b = AlignedBuf::new(len, self.mem_align.max(4096));
                // The span may end anywhere (a file of any size): byte-granular.
                match self.t.file.read_at(at, &mut b, Flags::UNALIGNED) {
                    Ok(n) if n == len => self.model.set(at, &b),
                    r => {
                        return Err(self.diverge(format!("load read {at}+{len} {}", show(&r)), None))
                    }
                }
                at += len as u64;
            }
        }
        self.note(format!(
            "      start: {} span {} size {}",
            self.t.name, self.span, self.model.size
        ));
        self.t.arm(true);
        Ok(())
    }

    fn step(&mut self) -> Step {
        self.op += 1;
        if self.o.corrupt_model_at.is_some_and(|n| self.op >= n)
            && !self.corrupted
            && self.model.size > 0
        {
            self.corrupted = true;
            let at = self.rng.below(self.model.size.min(self.span)) as usize;
            self.model.data[at] ^= 0x5A;
            self.model.cut(at as u64, at as u64 + 1);
            self.note(format!("{:>6} corrupt the model at {at} (test)", self.op));
            return self.verify();
        }
        if self.o.verify_every > 0 && self.op >= self.next_verify {
            self.next_verify = self.op + self.o.verify_every;
            return self.verify();
        }
        let has_map = self.t.map.is_some();
        let r = self.rng.below(100);
        match r {
            0..=29 => {
                let io = self.gen_io(false);
                self.single(io)
            }
            30..=62 => {
                let io = self.gen_io(true);
                self.single(io)
            }
            63..=82 => self.batch(),
            83..=90 if !self.fixed => self.truncate(),
            91..=95 if has_map => self.punch(),
            96..=99 if has_map => self.prealloc(),
            _ => {
                let io = self.gen_io(false);
                self.single(io)
            }
        }
    }

    fn gen_io(&mut self, write: bool) -> Io {
        let rng = &mut self.rng;
        let align = match rng.below(100) {
            0..=34 => Align::Fs,
            35..=69 => Align::Sector,
            _ if self.o.unaligned => Align::Byte,
            _ => Align::Sector,
        };
        let unit = match align {
            Align::Fs => self.fs,
            Align::Sector => self.lb,
            Align::Byte => 1,
        };
        let max = self.o.max_len.max(unit).min(self.span);
        let mut len = match rng.below(100) {
            0..=49 => 1 + rng.below(4 * self.fs),
            50..=89 => 1 + rng.below(64 << 10),
            _ => 1 + rng.below(max),
        }
        .min(max);
        len = len.div_ceil(unit) * unit;
        let size = self.model.size.min(self.span);
        let off = if size > 0 && rng.percent(if write { 55 } else { 75 }) {
            rng.below(size)
        } else {
            rng.below(self.span)
        };
        let mut off = off / unit * unit;
        if off + len > self.span {
            len = (self.span - off) / unit * unit;
            if len == 0 {
                len = unit;
                off = (self.span - unit) / unit * unit;
            }
        }
        let mut flags = Flags::NONE;
        if align == Align::Byte || rng.percent(15) {
            flags |= Flags::UNALIGNED;
        }
        if rng.percent(30) {
            flags |= Flags::LOCKING;
        }
        if write && rng.percent(15) {
            flags |= Flags::DSYNC;
        }
        let async_ = rng.percent(40);
        if write && async_ && rng.percent(30) {
            flags |= Flags::ASYNC_EXTEND;
        }
        let skew = match align {
            _ if async_ || rng.percent(50) => 0,
            Align::Byte => rng.below(4096) as usize,
            _ => {
                let ma = self.mem_align.max(1) as u64;
                (rng.below((4096 / ma).max(1)) * ma) as usize
            }
        };
        let mut pieces = Vec::new();
        let mut rest = len;
        let nparts = if rng.percent(60) { 1 } else { 2 + rng.below(2) };
        for _ in 1..nparts {
            let cut = rng.below(rest / unit) * unit;
            if cut > 0 && cut < rest {
                pieces.push(cut as usize);
                rest -= cut;
            }
        }
        pieces.push(rest as usize);
        Io {
            write,
            off,
            len,
            align,
            flags,
            skew,
            pieces,
            async_,
        }
    }

    fn data_for(&self, io: &Io) -> Vec<u8> {
        let mut d = vec![0; io.len as usize];
        pattern(&mut d, self.op, io.off);
        d
    }

    /// Whether a short count or an error may happen (faults armed).
    fn may_fail(&self) -> bool {
        self.t.faults_active()
    }

    fn single(&mut self, io: Io) -> Step {
        let data = if io.write {
            Some(self.data_for(&io))
        } else {
            None
        };
        let (result, got) = if io.async_ {
            let (tx, rx) = mpsc::channel();
            self.submit_async(&io, data.as_deref(), 0, &tx);
            match self.wait_async(&rx, 1) {
                Ok(mut v) => {
                    let (_, r, b) = v.pop().expect("one completion");
                    (r, b)
                }
                Err(what) => {
                    self.note(format!("{:>6} {io} -> no completion", self.op));
                    return Err(self.diverge(what, None));
                }
            }
        } else {
            self.sync_call(&io, data.as_deref())
        };
        self.report.calls += 1;
        self.note(format!("{:>6} {io} {}", self.op, show(&result)));
        if io.write {
            self.report.writes += 1;
            self.apply_write(&io, data.as_deref().unwrap_or(&[]), &result)?;
            self.check_size("the write")?;
        } else {
            self.report.reads += 1;
            let size = self.model.size;
            self.check_read(&io, &result, &got, size, size, None)?;
        }
        Ok(())
    }

    /// A sync call from one buffer, split into the pieces.
    fn sync_call(&self, io: &Io, data: Option<&[u8]>) -> (Result<usize>, Vec<u8>) {
        let file = &self.t.file;
        let len = io.len as usize;
        let mut buf = AlignedBuf::new(io.skew + len, 4096);
        let region = &mut buf[io.skew..io.skew + len];
        if let Some(d) = data {
            region.copy_from_slice(d);
            let mut slices = Vec::new();
            let mut rest: &[u8] = region;
            for &p in &io.pieces {
                let (a, b) = rest.split_at(p);
                slices.push(IoSlice::new(a));
                rest = b;
            }
            (file.write(io.off, &slices, io.flags), Vec::new())
        } else {
            let r = {
                let mut slices = Vec::new();
                let mut rest: &mut [u8] = region;
                for &p in &io.pieces {
                    let (a, b) = rest.split_at_mut(p);
                    slices.push(IoSliceMut::new(a));
                    rest = b;
                }
                file.read(io.off, &mut slices, io.flags)
            };
            (r, buf[io.skew..io.skew + len].to_vec())
        }
    }

    fn submit_async(
        &self,
        io: &Io,
        data: Option<&[u8]>,
        idx: usize,
        tx: &mpsc::Sender<(usize, Result<usize>, Vec<u8>)>,
    ) {
        let file = &self.t.file;
        let align = self.mem_align.max(1);
        let mut bufs = Vec::new();
        let mut at = 0;
        for &p in &io.pieces {
            let mut b = AlignedBuf::new(p, align);
            if let Some(d) = data {
                b.copy_from_slice(&d[at..at + p]);
            }
            at += p;
            bufs.push(b);
        }
        let tx = tx.clone();
        if io.write {
            file.write_async(io.off, bufs, io.flags, move |c| {
                let _ = tx.send((idx, c.result, Vec::new()));
            });
        } else {
            file.read_async(io.off, bufs, io.flags, move |c| {
                let bytes: Vec<u8> = c.bufs.iter().flat_map(|b| b.iter().copied()).collect();
                let _ = tx.send((idx, c.result, bytes));
            });
        }
    }

    /// Wait for `n` completions, bounded; drives devices whose completions need
    /// polling.
    #[allow(clippy::type_complexity)]
    fn wait_async(
        &self,
        rx: &mpsc::Receiver<(usize, Result<usize>, Vec<u8>)>,
        n: usize,
    ) -> std::result::Result<Vec<(usize, Result<usize>, Vec<u8>)>, String> {
        let polled = self.t.file.device().completion_mode() == CompletionMode::Polled;
        let deadline = Instant::now() + HANG;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {n} async calls did not complete within {} s (dio_count {})",
                    n - out.len(),
                    HANG.as_secs(),
                    self.t.file.state().dio_count()
                ));
            }
            if polled {
                let _ = self.t.file.poll(false);
                match rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(c) => out.push(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("async completion channel closed".into())
                    }
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => out.push(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("async completion channel closed".into())
                    }
                }
            }
        }
        out.sort_by_key(|c| c.0);
        Ok(out)
    }

    /// Check a result's count, and for an error whether one was allowed.
    fn check_count(&mut self, io: &Io, r: &Result<usize>, lo: u64, hi: u64) -> Step {
        let may_fail = self.may_fail();
        match r {
            Ok(n) => {
                let n = *n as u64;
                if n > hi || (n < lo && !may_fail) {
                    let what = if lo == hi {
                        format!("{io}: returned {n}, expected {lo}")
                    } else {
                        format!("{io}: returned {n}, expected {lo}..={hi}")
                    };
                    return Err(self.diverge(what, None));
                }
                if n < lo {
                    self.report.partials += 1;
                    // A short read ends where a device request ended: on a sector
                    // boundary, unless the call itself was byte-granular. A short
                    // write reports whole fs blocks only (a half-written fresh block
                    // must not be converted), whatever the call's alignment.
                    let (unit, what) = if io.write {
                        (self.fs, "an fs block")
                    } else {
                        (self.lb, "a sector")
                    };
                    if (io.write || io.align != Align::Byte) && (io.off + n) % unit != 0 {
                        return Err(self.diverge(
                            format!("{io}: short count {n} does not end on {what}"),
                            None,
                        ));
                    }
                }
                Ok(())
            }
            Err(Error::WouldBlock) if io.flags.contains(Flags::NOWAIT) => Ok(()),
            Err(e) if may_fail && e.errno() == libc::EIO => {
                self.report.errors += 1;
                Ok(())
            }
            Err(e) => Err(self.diverge(format!("{io}: unexpected error: {e}"), None)),
        }
    }

    /// Check a read: its count against the sizes it may have seen, its bytes
    /// against the model (and, in a batch, the model after the batch), then settle
    /// the model on what it read.
    fn check_read(
        &mut self,
        io: &Io,
        r: &Result<usize>,
        got: &[u8],
        size_lo: u64,
        size_hi: u64,
        after: Option<&Model>,
    ) -> Step {
        let clip = |s: u64| {
            if io.off >= s {
                0
            } else {
                io.len.min(s - io.off)
            }
        };
        self.check_count(io, r, clip(size_lo), clip(size_hi))?;
        let n = *r.as_ref().unwrap_or(&0);
        self.report.bytes_read += n as u64;
        let got = &got[..n];
        let wrong = match after {
            Some(a) => first_wrong(&[&self.model, a], io.off, got),
            None => first_wrong(&[&self.model], io.off, got),
        };
        if let Some(w) = wrong {
            return Err(self.diverge(format!("{io}: read back wrong data"), Some(w)));
        }
        if after.is_none() {
            self.model.set(io.off, got);
        }
        Ok(())
    }

    /// Apply a write's result to the model: bytes before the count are new, the
    /// rest of the range (after a fault) may be old or new.
    fn apply_write(&mut self, io: &Io, data: &[u8], r: &Result<usize>) -> Step {
        self.check_count(io, r, io.len, io.len)?;
        let n = match r {
            Ok(n) => *n,
            Err(Error::WouldBlock) => return Ok(()),
            Err(_) => 0,
        };
        self.report.bytes_written += n as u64;
        self.model.set(io.off, &data[..n]);
        self.model.might_be(io.off + n as u64, &data[n..]);
        if n > 0 {
            self.model.size = self.model.size.max(io.off + n as u64);
        }
        Ok(())
    }

    fn check_size(&mut self, after: &str) -> Step {
        let size = self.t.file.size();
        if size != self.model.size {
            return Err(self.diverge(
                format!("file size {size} after {after}, model {}", self.model.size),
                None,
            ));
        }
        Ok(())
    }

    /// Several calls in flight at once: writes to disjoint bytes, reads anywhere
    /// (they may see each byte before or after the batch's writes).
    fn batch(&mut self) -> Step {
        let n = 2 + self.rng.below(self.o.max_batch.max(2) as u64 - 1) as usize;
        let mut ios: Vec<Io> = Vec::with_capacity(n);
        for _ in 0..n {
            let write = self.rng.percent(50);
            let mut io = self.gen_io(write);
            io.async_ = true;
            io.skew = 0;
            if io.write {
                let clash = ios
                    .iter()
                    .any(|o| o.write && o.off < io.off + io.len && io.off < o.off + o.len);
                if clash {
                    io.write = false;
                    io.flags = keep_flags(io.flags, &[Flags::LOCKING, Flags::UNALIGNED]);
                } else if self.rng.percent(10) {
                    io.flags |= Flags::NOWAIT;
                }
            }
            ios.push(io);
        }
        let datas: Vec<Option<Vec<u8>>> = ios
            .iter()
            .map(|io| io.write.then(|| self.data_for(io)))
            .collect();
        let before_size = self.model.size;
        let (tx, rx) = mpsc::channel();
        for (i, io) in ios.iter().enumerate() {
            self.submit_async(io, datas[i].as_deref(), i, &tx);
        }
        let done = match self.wait_async(&rx, ios.len()) {
            Ok(d) => d,
            Err(what) => {
                for io in &ios {
                    self.note(format!("{:>6}   {io} (batch)", self.op));
                }
                return Err(self.diverge(what, None));
            }
        };
        self.report.batches += 1;
        self.report.calls += ios.len() as u64;
        let first_op = self.op;
        for (i, r, _) in &done {
            self.note(format!("{:>6}   {} (batch) {}", first_op, ios[*i], show(r)));
        }
        // The model after the batch: every write applied.
        let before = self.model.clone();
        for (i, r, _) in &done {
            let io = &ios[*i];
            if io.write {
                self.report.writes += 1;
                let d = datas[*i].as_deref().unwrap_or(&[]);
                self.apply_write(io, d, r)?;
            }
        }
        self.check_size("the batch")?;
        let after = std::mem::replace(&mut self.model, before);
        let after_size = after.size;
        for (i, r, got) in &done {
            let io = &ios[*i];
            if !io.write {
                self.report.reads += 1;
                self.check_read(io, r, got, before_size, after_size, Some(&after))?;
            }
        }
        self.model = after;
        // A batch counts as one op per call, so the log numbers stay unique.
        self.op += ios.len() as u64 - 1;
        Ok(())
    }

    fn truncate(&mut self) -> Step {
        let size = self.model.size;
        let new = if self.rng.percent(50) {
            self.rng.below(size + 1)
        } else {
            size + self.rng.below(self.span - size + 1)
        };
        let new = match self.rng.below(3) {
            0 => new / self.fs * self.fs,
            _ => new,
        };
        self.t.arm(false);
        let r = (self.t.resize.as_ref().expect("resizable"))(new);
        self.t.arm(true);
        self.report.truncates += 1;
        self.note(format!(
            "{:>6} truncate {size} -> {new} {}",
            self.op,
            show(&r.as_ref().map(|_| 0).map_err(|e| e.clone()))
        ));
        if let Err(e) = r {
            return Err(self.diverge(format!("truncate to {new}: {e}"), None));
        }
        if new < size {
            self.model.zero(new, self.span);
        }
        self.model.size = new;
        Ok(())
    }

    fn block_range(&mut self) -> (u64, u64) {
        let blocks = self.span / self.fs;
        let first = self.rng.below(blocks);
        let n = (1 + self.rng.below(16)).min(blocks - first);
        (first, first + n)
    }

    fn punch(&mut self) -> Step {
        let (a, b) = self.block_range();
        let map = self.t.map.as_ref().expect("test map");
        map.punch(a..b);
        self.report.punches += 1;
        self.note(format!(
            "{:>6} punch blocks {a}..{b} ({}..{})",
            self.op,
            a * self.fs,
            b * self.fs
        ));
        self.model.zero(a * self.fs, b * self.fs);
        Ok(())
    }

    fn prealloc(&mut self) -> Step {
        let (a, b) = self.block_range();
        let map = self.t.map.as_ref().expect("test map");
        let r = map.preallocate(a..b);
        self.report.preallocs += 1;
        self.note(format!(
            "{:>6} preallocate blocks {a}..{b} ({}..{})",
            self.op,
            a * self.fs,
            b * self.fs
        ));
        if let Err(e) = r {
            return Err(self.diverge(format!("preallocate {a}..{b}: {e}"), None));
        }
        Ok(())
    }

    /// Read the whole file back, with faults off, and compare.
    fn verify(&mut self) -> Step {
        self.t.arm(false);
        self.report.verifies += 1;
        let size = self.model.size.min(self.span);
        self.note(format!("{:>6} verify 0..{size}", self.op));
        let chunk = 1u64 << 20;
        let mut at = 0;
        let mut buf = AlignedBuf::new(chunk as usize, self.mem_align.max(4096));
        while at < size {
            let len = (size - at).min(chunk);
            let want = len as usize;
            // Whole sectors: the read is clipped at EOF.
            let ask = len.div_ceil(self.lb) * self.lb;
            let r = self
                .t
                .file
                .read_at(at, &mut buf[..ask as usize], Flags::NONE);
            match r {
                Ok(n) if n == want => {}
                r => {
                    return Err(self.diverge(
                        format!("verify read {at}+{len} {}, expected {want}", show(&r)),
                        None,
                    ))
                }
            }
            if let Some(w) = first_wrong(&[&self.model], at, &buf[..want]) {
                return Err(self.diverge(format!("verify of {at}+{len}"), Some(w)));
            }
            self.model.set(at, &buf[..want]);
            at += len;
        }
        self.t.arm(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_never_yields_zero_or_stale_and_differs_between_ops() {
        let mut a = vec![0; 4096];
        let mut b = vec![0; 4096];
        pattern(&mut a, 1, 100);
        pattern(&mut b, 2, 100);
        assert!(a.iter().all(|&x| x != 0 && x != STALE));
        assert!(a.iter().zip(&b).filter(|(x, y)| x == y).count() < 64);
        let mut c = vec![0; 4000];
        pattern(&mut c, 1, 196);
        assert_eq!(&c[..], &a[96..]);
    }

    #[test]
    fn model_alternatives_are_cut_by_writes() {
        let mut m = Model::new(100);
        m.might_be(10, &[1; 20]);
        assert!(m.accepts(15, 1) && m.accepts(15, 0));
        m.set(12, &[2; 4]);
        assert!(!m.accepts(13, 1));
        assert!(m.accepts(11, 1) && m.accepts(16, 1));
        m.zero(0, 100);
        assert!(!m.accepts(11, 1));
    }

    #[test]
    fn short_run_on_ram_target_has_no_divergence() {
        let t = Target::mem(&MemTarget::new(1 << 20, 7)).unwrap();
        let r = run(&t, &Options::new(7).ops(500).span(1 << 20), &mut |_| {}).unwrap();
        assert!(r.ops >= 500);
        assert!(r.reads > 0 && r.writes > 0);
    }
}
