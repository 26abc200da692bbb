//! One workload, timed: through dio (requests kept in flight at queue depth, refilled
//! as each completes) or through the page cache (pread/pwrite, one thread per queue
//! slot). Latency is submit to completion of each I/O.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dio::RawFile;
use dio::{ArenaBuf, BufArena, Completed, CompletionMode, DirectFile, Flags, OwnedBuf, Window};
use rustix::fs::{fadvise, Advice};

use super::cpu::CpuTime;
use super::hist::Histogram;
use super::interrupted;
use crate::fail::Failure;

/// The access pattern.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random offsets (aligned to the block size).
    Randread,
    /// Writes at random offsets (aligned to the block size).
    Randwrite,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
        }
    }
    pub fn is_write(self) -> bool {
        matches!(self, Rw::Write | Rw::Randwrite)
    }
    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

/// What to run: pattern, block size, queue depth, how many bytes of the target
/// (`span`, a multiple of `bs`), for how long.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub rw: Rw,
    pub bs: u64,
    pub qd: u32,
    pub span: u64,
    pub runtime: Duration,
    /// Run this long before measuring (fio's `ramp_time`): the I/Os of the ramp
    /// are not counted, and the clocks start at its end.
    pub ramp: Duration,
    /// Bytes added to every offset (0: aligned I/O; else byte-granular).
    pub skew: u64,
    /// Direct runs: I/Os submitted together at most ([`dio::UringPlug`] with this
    /// limit: the I/Os started for a round of completions go to the kernel in one
    /// enter, or in enters of this many); 1 submits each at its call's end.
    pub batch: u32,
}

impl Workload {
    pub fn label(&self) -> String {
        format!(
            "{} {} qd{}",
            self.rw.name(),
            crate::size::short(self.bs),
            self.qd
        )
    }
}

/// What a run measured.
#[derive(Clone)]
pub struct Report {
    pub ios: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub lat: Histogram,
    pub cpu_usr: f64,
    pub cpu_sys: f64,
    /// The process's CPU time when the measured part began (after a ramp): where
    /// the CPU of several jobs together is counted from.
    pub started_cpu: CpuTime,
}

impl Report {
    /// What `ios` I/Os of `bs` bytes measured, timed from `t0` and `cpu0` to now.
    fn since(t0: Instant, cpu0: CpuTime, ios: u64, bs: u64, lat: Histogram) -> Report {
        Report::between(t0, cpu0, CpuTime::now(), ios, bs, lat, cpu0)
    }

    /// The same, with the CPU time at the end given (a thread's, or the process's).
    fn between(
        t0: Instant,
        cpu0: CpuTime,
        cpu1: CpuTime,
        ios: u64,
        bs: u64,
        lat: Histogram,
        started_cpu: CpuTime,
    ) -> Report {
        let elapsed = t0.elapsed();
        let (cpu_usr, cpu_sys) = cpu0.percent_until(&cpu1, elapsed);
        Report {
            ios,
            bytes: ios * bs,
            elapsed,
            lat,
            cpu_usr,
            cpu_sys,
            started_cpu,
        }
    }

    /// The jobs' reports as one (fio's group reporting): I/Os and bytes added,
    /// latencies merged, over the longest job's time; CPU of the whole process
    /// from `cpu0` to now (percent of one core: above 100 with several busy).
    pub fn combine(jobs: &[Report], cpu0: CpuTime) -> Report {
        let cpu1 = CpuTime::now();
        let elapsed = jobs.iter().map(|r| r.elapsed).max().unwrap_or_default();
        let mut lat = Histogram::default();
        for r in jobs {
            lat.merge(&r.lat);
        }
        let (cpu_usr, cpu_sys) = cpu0.percent_until(&cpu1, elapsed);
        Report {
            ios: jobs.iter().map(|r| r.ios).sum(),
            bytes: jobs.iter().map(|r| r.bytes).sum(),
            elapsed,
            lat,
            cpu_usr,
            cpu_sys,
            started_cpu: cpu0,
        }
    }

    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn bw_bytes(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Offsets of a workload: sequential with wrap-around, or uniformly random blocks
/// from xorshift64* (cheap, and good enough to defeat read-ahead).
pub struct Offsets {
    random: bool,
    bs: u64,
    blocks: u64,
    next: u64,
    state: u64,
}

impl Offsets {
    pub fn new(w: &Workload, seed: u64) -> Offsets {
        Offsets {
            random: w.rw.is_random(),
            bs: w.bs,
            // A skewed run keeps one block spare at the end for the shift.
            blocks: ((w.span - w.span.min(w.skew.div_ceil(w.bs) * w.bs)) / w.bs).max(1),
            next: 0,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn random(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn next_offset(&mut self) -> u64 {
        let block = if self.random {
            self.random() % self.blocks
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        block * self.bs
    }
}

/// Bytes to write: not zeros (a device may special-case those) and not the same
/// every time from one run to another.
pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut o = Offsets {
        random: true,
        bs: 1,
        blocks: 1,
        next: 0,
        state: seed | 1,
    };
    for chunk in buf.chunks_mut(8) {
        let r = o.random().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
}

/// Which blocks have a write in flight: one bit per block (a 256 MiB span of 4 KiB
/// blocks is 8 KiB of bits, which stays in cache; a byte per block did not).
struct Busy {
    bits: Vec<u64>,
    bs: u64,
}

impl Busy {
    fn new(blocks: u64, bs: u64) -> Busy {
        Busy {
            bits: vec![0; blocks.div_ceil(64) as usize],
            bs,
        }
    }
    fn slot(&self, off: u64) -> (usize, u64) {
        let block = off / self.bs;
        ((block / 64) as usize, 1 << (block % 64))
    }
    /// Mark the block at `off`; false if it was marked already.
    fn insert(&mut self, off: u64) -> bool {
        let (word, bit) = self.slot(off);
        let was = self.bits[word] & bit != 0;
        self.bits[word] |= bit;
        !was
    }
    fn remove(&mut self, off: u64) {
        let (word, bit) = self.slot(off);
        self.bits[word] &= !bit;
    }
}

struct Done {
    off: u64,
    buf: Window<ArenaBuf>,
    result: dio::Result<usize>,
    /// Submission and completion times (the completion time also serves the
    /// deadline check: two clock reads per I/O).
    start: Instant,
    end: Instant,
}

/// Completed I/Os on their way from the completion callbacks (on whatever thread
/// completes) to the bench loop, which takes them all at once: one lock per batch
/// on its side, no allocation per I/O.
#[derive(Default)]
struct Inbox {
    done: Mutex<Vec<Done>>,
    ready: Condvar,
    /// The loop sleeps on `ready` (only in interrupt mode).
    sleeping: AtomicBool,
}

impl Inbox {
    fn push(&self, d: Done) {
        let mut q = self.done.lock().unwrap_or_else(|e| e.into_inner());
        q.push(d);
        if self.sleeping.load(Ordering::Relaxed) {
            self.ready.notify_one();
        }
    }

    /// Swap everything completed into `into` (which must be empty); wait for at
    /// least one if `block`.
    fn take(&self, into: &mut Vec<Done>, block: bool) {
        let mut q = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while block && q.is_empty() {
            self.sleeping.store(true, Ordering::Relaxed);
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            self.sleeping.store(false, Ordering::Relaxed);
        }
        std::mem::swap(&mut *q, into);
    }
}

/// Run `w` through dio on `file`; with `fixed`, the buffers are registered with
/// that file's io_uring ring first.
pub fn direct(file: &DirectFile, w: &Workload, fixed: Option<&RawFile>) -> Result<Report, Failure> {
    check_bs(file, w)?;
    let arena = arena_for(file, w, 1);
    register_fixed(fixed, &arena)?;
    direct_job(file, w, &arena, 0x5eed, false)
}

/// The block size must be a multiple of the device's logical block.
pub fn check_bs(file: &DirectFile, w: &Workload) -> Result<(), Failure> {
    let geo = file.geometry();
    if w.bs % u64::from(geo.logical_block) != 0 {
        return Err(Failure::usage(format!(
            "--bs {} is not a multiple of the device's logical block ({} bytes)",
            w.bs, geo.logical_block
        )));
    }
    Ok(())
}

/// I/Os one job keeps in flight: the queue depth, but no more than there are blocks.
fn job_depth(w: &Workload) -> u64 {
    u64::from(w.qd).min((w.span / w.bs).max(1))
}

/// One arena for the buffers of `jobs` jobs (one registration covers them all).
/// A skewed run places its data at the offset's phase within a page, so the
/// aligned middle of each request goes straight from (to) it.
pub fn arena_for(file: &DirectFile, w: &Workload, jobs: u32) -> Arc<BufArena> {
    let phase = (w.skew % 4096) as usize;
    let slots = job_depth(w) as usize * jobs.max(1) as usize;
    BufArena::new(slots, phase + w.bs as usize, file.geometry().buffer_align())
}

/// Register `arena` with the io_uring ring(s) of `fixed`, if given.
pub fn register_fixed(fixed: Option<&RawFile>, arena: &Arc<BufArena>) -> Result<(), Failure> {
    if let Some(raw) = fixed {
        let registered = raw
            .register_arena(arena)
            .map_err(|e| Failure::msg(format!("--fixed-bufs: {e}")))?;
        if !registered {
            crate::fail::say("--fixed-bufs needs io_uring: ignored on this back end");
        }
    }
    Ok(())
}

/// One job: `w` through dio on `file`, buffers from `arena` (`w.qd` of its slots),
/// offsets from `seed`; CPU of this thread only with `thread_cpu` (a job among
/// several), else of the process.
pub fn direct_job(
    file: &DirectFile,
    w: &Workload,
    arena: &Arc<BufArena>,
    seed: u64,
    thread_cpu: bool,
) -> Result<Report, Failure> {
    let polled = file.device().completion_mode() == CompletionMode::Polled;
    let inbox = Arc::new(Inbox::default());
    let mut offsets = Offsets::new(w, seed);
    // Two writes to one block must not be in flight at once: the engine would make
    // the second wait (a range lock) in this very thread, which also has to reap
    // the first one's completion when the device is polled. Draw again instead, as
    // often as needed: with no more I/Os in flight than blocks, one is free.
    let qd = job_depth(w);
    let mut busy = Busy::new(w.span / w.bs + 1, w.bs);
    let mut next_offset = |busy: &mut Busy| loop {
        let off = offsets.next_offset();
        if !w.rw.is_write() || busy.insert(off) {
            return off;
        }
    };
    let issue = |buf: Window<ArenaBuf>, off: u64, start: Instant| {
        let inbox = Arc::clone(&inbox);
        let done = move |mut c: Completed<Window<ArenaBuf>>| {
            let end = Instant::now();
            let buf = c.bufs.pop().expect("one buffer per request");
            inbox.push(Done {
                off,
                buf,
                result: c.result,
                start,
                end,
            });
        };
        // A skewed run shifts every I/O by `skew` bytes, byte-granular; the
        // offsets stay one block short of the end so the shift fits.
        let (at, flags) = if w.skew == 0 {
            (off, Flags::NONE)
        } else {
            (off + w.skew, Flags::UNALIGNED)
        };
        if w.rw.is_write() {
            file.write_async(at, vec![buf], flags, done);
        } else {
            file.read_async(at, vec![buf], flags, done);
        }
    };

    let mut lat = Histogram::default();
    let mut failure: Option<Failure> = None;
    let mut in_flight = 0u32;
    let mut ios = 0u64;
    let phase = (w.skew % 4096) as usize;
    let cpu_now = || {
        if thread_cpu {
            CpuTime::thread()
        } else {
            CpuTime::now()
        }
    };
    let mut cpu0 = cpu_now();
    let mut started_cpu = CpuTime::now();
    // The calls started for a batch of completions go to the kernel together, in
    // the enter that waits for the next ones (io_uring; other back ends ignore it).
    let plug = (w.batch > 1).then(|| dio::UringPlug::with_limit(w.batch as usize));
    // Measured from the ramp's end: only I/Os that complete after it count.
    let t0 = Instant::now() + w.ramp;
    let deadline = t0 + w.runtime;
    let mut measuring = w.ramp.is_zero();
    for i in 0..qd {
        let slot = arena.take().expect("one arena slot per queue entry");
        let mut buf = Window::new(slot, phase, w.bs as usize).expect("the window fits");
        if w.rw.is_write() {
            pattern(buf.as_mut_slice(), i + 1);
        }
        issue(buf, next_offset(&mut busy), Instant::now());
        in_flight += 1;
    }
    // Completions come from the inbox a batch at a time; the batch vector keeps
    // its capacity, so the loop allocates nothing.
    let mut batch: Vec<Done> = Vec::with_capacity(qd as usize);
    while in_flight > 0 {
        inbox.take(&mut batch, !polled);
        if batch.is_empty() {
            if let Err(e) = file.poll(true) {
                // Nothing more will complete; report what broke.
                return Err(Failure::msg(format!("polling completions: {e}")));
            }
            continue;
        }
        for done in batch.drain(..) {
            in_flight -= 1;
            busy.remove(done.off);
            match done.result {
                Ok(n) if n as u64 == w.bs => {}
                Ok(n) => {
                    failure.get_or_insert(Failure::msg(format!(
                        "short I/O: {n} of {} bytes (is the target smaller than --size?)",
                        w.bs
                    )));
                }
                Err(e) => {
                    failure.get_or_insert(Failure::msg(e.to_string()));
                }
            }
            if !measuring && done.end >= t0 {
                measuring = true;
                cpu0 = cpu_now();
                started_cpu = CpuTime::now();
            }
            if measuring {
                lat.record(done.end.saturating_duration_since(done.start));
                ios += 1;
            }
            if failure.is_none() && !interrupted() && done.end < deadline {
                issue(done.buf, next_offset(&mut busy), Instant::now());
                in_flight += 1;
            }
        }
    }
    drop(plug);
    let cpu1 = cpu_now();
    let report = Report::between(t0, cpu0, cpu1, ios, w.bs, lat, started_cpu);
    match failure {
        Some(f) => Err(f),
        None => Ok(report),
    }
}

/// Flush the file's dirty pages and drop its page cache, so that a buffered read
/// starts cold.
pub fn drop_cache(file: &File) -> std::io::Result<()> {
    file.sync_data()?;
    fadvise(file, 0, None, Advice::DontNeed)?;
    Ok(())
}

/// A bijection of `[0, blocks)` that scatters consecutive indices (odd multipliers
/// and xor-shifts on the next power of two, cycle-walked back into range): the
/// buffered random reads visit every block once per pass, in random order.
struct Permutation {
    blocks: u64,
    mask: u64,
    shift: u32,
}

impl Permutation {
    fn new(blocks: u64) -> Permutation {
        let bits = 64 - blocks.max(1).saturating_sub(1).leading_zeros();
        Permutation {
            blocks: blocks.max(1),
            mask: if bits >= 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            },
            shift: bits / 2 + 1,
        }
    }
    fn mix(&self, mut x: u64) -> u64 {
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & self.mask;
        x ^= x >> self.shift;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9) & self.mask;
        x ^ (x >> self.shift)
    }
    fn at(&self, i: u64) -> u64 {
        let mut x = i;
        loop {
            x = self.mix(x);
            if x < self.blocks {
                return x;
            }
        }
    }
}

/// Run `w` through the page cache: `qd` threads doing pread/pwrite on `file`.
/// Reads start with the file's cache dropped; writes are timed up to their
/// fdatasync. With `cold_passes` the run compares like with like, every I/O going
/// to the disk as a direct one does: I/Os go over the span in passes (random ones
/// visit each block once a pass, in random order, with read-ahead off:
/// POSIX_FADV_RANDOM), and at the start of every pass the file's pages are
/// written back (fdatasync) and dropped (posix_fadvise DONTNEED).
pub fn buffered(file: &File, w: &Workload, cold_passes: bool) -> Result<Report, Failure> {
    let read = !w.rw.is_write();
    let advise = |advice| {
        fadvise(file, 0, None, advice).map_err(|e| Failure::msg(format!("posix_fadvise: {e}")))
    };
    if read {
        drop_cache(file).map_err(|e| Failure::msg(format!("dropping the page cache: {e}")))?;
    }
    if cold_passes && w.rw.is_random() {
        advise(Advice::Random)?;
    }
    let cursor = AtomicU64::new(0);
    let blocks = (w.span / w.bs).max(1);
    let perm = Permutation::new(blocks);
    // Measured from the ramp's end (see `Workload::ramp`): the CPU from the first
    // I/O started after it.
    let ramp_cpu = std::sync::OnceLock::new();
    if w.ramp.is_zero() {
        let _ = ramp_cpu.set(CpuTime::now());
    }
    let t0 = Instant::now() + w.ramp;
    let deadline = t0 + w.runtime;
    let worker = |id: u32| -> std::io::Result<(u64, Histogram)> {
        let mut buf = vec![0u8; w.bs as usize];
        pattern(&mut buf, u64::from(id) + 1);
        let mut offsets = Offsets::new(w, u64::from(id) + 7);
        let mut lat = Histogram::default();
        let mut ios = 0;
        while !interrupted() && Instant::now() < deadline {
            let off = if cold_passes {
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                let block = i % blocks;
                if block == 0 && i > 0 {
                    // A new pass: what the last one wrote goes to the disk, and
                    // what it cached goes.
                    if !read {
                        file.sync_data()?;
                    }
                    fadvise(file, 0, None, Advice::DontNeed)?;
                }
                if w.rw.is_random() {
                    perm.at(block) * w.bs
                } else {
                    block * w.bs
                }
            } else if w.rw.is_random() {
                offsets.next_offset()
            } else {
                cursor.fetch_add(1, Ordering::Relaxed) % blocks * w.bs
            };
            let start = Instant::now();
            let measured = start >= t0;
            if measured {
                ramp_cpu.get_or_init(CpuTime::now);
            }
            if w.rw.is_write() {
                file.write_all_at(&buf, off)?;
            } else {
                file.read_exact_at(&mut buf, off)?;
            }
            if measured {
                lat.record(start.elapsed());
                ios += 1;
            }
        }
        Ok((ios, lat))
    };
    let worker = &worker;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..w.qd).map(|id| s.spawn(move || worker(id))).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    if cold_passes && w.rw.is_random() {
        advise(Advice::Normal)?;
    }
    let mut lat = Histogram::default();
    let mut ios = 0;
    for r in results {
        let (n, h) = r
            .map_err(|_| Failure::msg("a buffered worker thread panicked"))?
            .map_err(|e| Failure::msg(format!("buffered {}: {e}", w.rw.name())))?;
        ios += n;
        lat.merge(&h);
    }
    if w.rw.is_write() {
        file.sync_data()
            .map_err(|e| Failure::msg(format!("fdatasync: {e}")))?;
    }
    let cpu0 = ramp_cpu.get().copied().unwrap_or_else(CpuTime::now);
    Ok(Report::since(t0, cpu0, ios, w.bs, lat))
}

/// A buffered writer loading the machine while a read run is measured: 1 MiB
/// writes through the page cache to `path` at up to `rate` bytes/s, wrapping at
/// `size`, with an fdatasync every 64 MiB (a log or a checkpoint), until `stop`. Returns the bytes written
/// and the CPU time the writer thread used.
pub fn pressure_writer(
    path: &Path,
    size: u64,
    rate: u64,
    stop: &AtomicBool,
) -> std::io::Result<(u64, CpuTime)> {
    let cpu0 = CpuTime::thread();
    const CHUNK: u64 = 1 << 20;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut buf = vec![0u8; CHUNK as usize];
    pattern(&mut buf, 0xfeed);
    let mut written = 0u64;
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) && !interrupted() {
        // Paced, so that it loads the page cache and the disk, not the CPU.
        let due = t0 + Duration::from_secs_f64(written as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        file.write_all_at(&buf, written % size.max(CHUNK))?;
        written += CHUNK;
        if written % (64 * CHUNK) == 0 {
            file.sync_data()?;
        }
    }
    let cpu = CpuTime::thread();
    Ok((
        written,
        CpuTime {
            user: cpu.user.saturating_sub(cpu0.user),
            system: cpu.system.saturating_sub(cpu0.system),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::Permutation;

    #[test]
    fn permutation_visits_every_block_once() {
        for blocks in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let p = Permutation::new(blocks);
            let mut seen = vec![false; blocks as usize];
            for i in 0..blocks {
                let b = p.at(i) as usize;
                assert!(!seen[b], "blocks={blocks} i={i}");
                seen[b] = true;
            }
        }
        // Neighbours do not stay neighbours (read-ahead gets nothing).
        let p = Permutation::new(65536);
        let near = (0..1000)
            .filter(|&i| p.at(i).abs_diff(p.at(i + 1)) < 32)
            .count();
        assert!(near < 20, "{near}");
    }
}
