//! The engine's own cost per request: a loop of one-block 4 KiB sync reads (or
//! writes) on the null RAM device (no storage, no copy, no counters, completes
//! inline), the counterpart of `fio --ioengine=null --bs=4k --rw=randread --iodepth=1`.
//!
//! `cargo run --release -p dio --example null_loop -- [OPS] [THREADS] [shared|own] [read|write] [sync|async|locking] [seq|rand|randall]`
//!
//! - `OPS`: calls per thread (default 5000000).
//! - `THREADS`: a count, or a comma list for a sweep (`1,2,4,8`); default 1.
//! - `shared` (default): every thread on one file; `own`: a file each (one device).
//! - `read` (default) or `write`: 4 KiB calls at aligned, non-overlapping offsets
//!   (each thread its own part of the file); writes overwrite, so the file never grows.
//! - `sync` (default): `read_at`/`write_at`; `async`: `read_async`/`write_async` with an
//!   owned buffer (the null device completes inline, so one call at a time, each
//!   through the async path: the call's state, its callback, the file handle it
//!   carries); `locking`: sync calls with `Flags::LOCKING` (the file lock, shared).
//! - `seq` (default): each thread sweeps its part of the file in order; `rand`: at
//!   random 4 KiB-aligned offsets in its part; `randall`: at random offsets in the
//!   whole file (threads on one file then meet everywhere).
//!
//! With one thread it prints ns per call. With more, for each thread count it prints
//! the calls per second of all threads, the CPU time per call (the sum of the threads'
//! CPU time over all calls) and two ratios against one thread: by wall time (needs as
//! many idle cores as threads) and by CPU per call (THREADS x one thread's rate at the
//! CPU per call measured: a cache line that bounces between cores costs CPU time per
//! call, so it shows a shared hot spot on a loaded machine too, where wall time
//! cannot).
//!
//! On a loaded machine the threads seldom run at the same moment, so a line they
//! share seldom bounces and neither ratio shows it. Run under a real-time policy
//! (as root: `chrt -f 10 target/release/examples/null_loop 3000000 2,4 shared write`)
//! and the threads get the cores for the few seconds of the run: both ratios are
//! then meaningful even while other work waits.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};

const SIZE: u64 = 1 << 30;

fn device() -> Arc<MemDevice> {
    Arc::new(MemDevice::new(
        MemDeviceConfig::new(SIZE, 512).null().without_stats(),
    ))
}

fn open(dev: &Arc<MemDevice>) -> DirectFile {
    DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, SIZE)),
        Arc::new(FileState::new(SIZE)),
    )
    .expect("open the null file")
}

/// The calling thread's CPU time in seconds.
fn thread_cpu() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// How each call is made.
#[derive(Clone, Copy, PartialEq)]
enum Call {
    Sync,
    Async,
    Locking,
}

/// `ops` 4 KiB calls on `f` in `[start, start + span)`; returns the seconds taken,
/// wall and the thread's CPU.
fn run(
    f: &DirectFile,
    ops: u64,
    start: u64,
    span: u64,
    write: bool,
    call: Call,
    rand: Option<u64>,
) -> (f64, f64) {
    let mut buf = AlignedBuf::new(4096, 4096);
    // Async calls: the buffer goes with the call and comes back in the callback.
    let slot = Arc::new(Mutex::new(Some(AlignedBuf::new(4096, 4096))));
    let flags = if call == Call::Locking {
        Flags::LOCKING
    } else {
        Flags::NONE
    };
    let mut at = 0;
    // xorshift64, from the seed of `rand`.
    let mut x = rand.unwrap_or(1) | 1;
    let (t0, c0) = (Instant::now(), thread_cpu());
    for _ in 0..ops {
        at = if rand.is_some() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % (span / 4096) * 4096
        } else {
            (at + 4096) % span
        };
        if call == Call::Async {
            let b = slot
                .lock()
                .unwrap()
                .take()
                .expect("the null device completes inline");
            let back = Arc::clone(&slot);
            let done = move |mut c: dio::Completed<AlignedBuf>| {
                assert_eq!(c.result.expect("null call"), 4096);
                *back.lock().unwrap() = c.bufs.pop();
            };
            if write {
                f.write_async(start + at, vec![b], flags, done);
            } else {
                f.read_async(start + at, vec![b], flags, done);
            }
            continue;
        }
        let n = if write {
            f.write_at(start + at, &buf, flags)
        } else {
            f.read_at(start + at, &mut buf, flags)
        }
        .expect("null call");
        debug_assert_eq!(n, 4096);
    }
    (t0.elapsed().as_secs_f64(), thread_cpu() - c0)
}

/// Where a thread's calls go.
#[derive(Clone, Copy, PartialEq)]
enum Rand {
    /// In order through its part of the file.
    Seq,
    /// At random in its part.
    Part,
    /// At random in the whole file.
    All,
}

impl Rand {
    /// The random seed of thread `t`, if random.
    fn seed(self, t: u64) -> Option<u64> {
        (self != Rand::Seq).then(|| (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

/// Calls per second of `threads` threads together, each doing `ops` calls (wall
/// time: a loaded machine lowers it), and the CPU time per call.
fn rate(threads: usize, ops: u64, own: bool, write: bool, call: Call, rand: Rand) -> (f64, f64) {
    // One device; one file on it, or one file each (own state, map, counters).
    let dev = device();
    let shared = open(&dev);
    let files: Vec<DirectFile> = (0..threads)
        .map(|_| if own { open(&dev) } else { shared.clone() })
        .collect();
    let span = if rand == Rand::All {
        SIZE
    } else {
        (SIZE / threads as u64) & !4095
    };
    let start = std::sync::Barrier::new(threads);
    let t0 = std::sync::Mutex::new(None);
    let cpu: f64 = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(t, f)| {
                let (start, t0) = (&start, &t0);
                s.spawn(move || {
                    let base = if rand == Rand::All {
                        0
                    } else {
                        t as u64 * span
                    };
                    let rand = rand.seed(t as u64);
                    run(f, ops / 10, base, span, write, call, rand); // warm up
                    if start.wait().is_leader() {
                        *t0.lock().unwrap() = Some(Instant::now());
                    }
                    run(f, ops, base, span, write, call, rand).1
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker")).sum()
    });
    let wall = t0.lock().unwrap().expect("started").elapsed().as_secs_f64();
    let total = (threads as u64 * ops) as f64;
    (total / wall, cpu * 1e9 / total)
}

fn main() {
    let (mut ops, mut threads, mut own, mut write) = (5_000_000u64, vec![1usize], false, false);
    let mut call = Call::Sync;
    let mut rand = Rand::Seq;
    let mut numbers = 0;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "shared" => own = false,
            "own" => own = true,
            "read" => write = false,
            "write" => write = true,
            "sync" => call = Call::Sync,
            "async" => call = Call::Async,
            "locking" => call = Call::Locking,
            "seq" => rand = Rand::Seq,
            "rand" => rand = Rand::Part,
            "randall" => rand = Rand::All,
            _ if numbers == 0 => {
                ops = a.parse().expect("OPS: a number");
                numbers += 1;
            }
            _ if numbers == 1 => {
                threads = a
                    .split(',')
                    .map(|t| t.parse().expect("THREADS: a number or a comma list"))
                    .collect();
                numbers += 1;
            }
            _ => panic!(
                "usage: null_loop [OPS] [THREADS[,THREADS..]] [shared|own] [read|write] \
                 [sync|async|locking] [seq|rand|randall]"
            ),
        }
    }
    let what = if write { "write" } else { "read" };
    if threads == [1] {
        let f = open(&device());
        run(&f, ops / 10, 0, SIZE, write, call, rand.seed(0)); // warm up
        let (secs, cpu) = run(&f, ops, 0, SIZE, write, call, rand.seed(0));
        println!(
            "{:.1} ns/{what} ({:.1} ns of CPU)",
            secs * 1e9 / ops as f64,
            cpu * 1e9 / ops as f64
        );
        return;
    }
    let (one, cpu1) = rate(1, ops, own, write, call, rand);
    println!(
        "{what}s, {}: 1 thread: {:.2} M/s, {cpu1:.1} ns of CPU per {what}",
        if own { "a file each" } else { "one file" },
        one / 1e6
    );
    for &n in threads.iter().filter(|&&n| n > 1) {
        let (many, cpun) = rate(n, ops, own, write, call, rand);
        println!(
            "  {n} threads: {:.2} M/s, {cpun:.1} ns of CPU per {what}; ratio to 1 thread \
             {:.2}x by wall time, {:.2}x by CPU per {what}",
            many / 1e6,
            many / one,
            n as f64 * cpu1 / cpun
        );
    }
}
