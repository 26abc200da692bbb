//! The engine's own cost per request: a loop of one-block 4 KiB sync reads on the
//! null RAM device (no storage, no copy, no counters, completes inline), the
//! counterpart of `fio --ioengine=null --bs=4k --rw=randread --iodepth=1`.
//!
//! `cargo run --release -p dio --example null_loop -- [READS] [THREADS] [shared|own]`
//!
//! Prints ns per read (one thread), or with THREADS > 1 the reads per second of all
//! threads against one thread's, on one shared file (`shared`, the default) or one
//! file per thread (`own`, one device). The wall-time ratio needs as many idle cores
//! as threads; the CPU-time ratio (THREADS x one thread's CPU per read / the CPU per
//! read with THREADS) shows a shared hot spot on a loaded machine too, since cache
//! lines that bounce between cores cost CPU time per read.

use std::sync::Arc;
use std::time::Instant;

use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};

const SIZE: u64 = 1 << 30;

fn file() -> DirectFile {
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(SIZE, 512).null().without_stats(),
    ));
    DirectFile::new(
        dev,
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

/// `reads` 4 KiB reads on `f` from offset `start` on; returns the seconds taken,
/// wall and the thread's CPU.
fn run(f: &DirectFile, reads: u64, start: u64) -> (f64, f64) {
    let mut buf = AlignedBuf::new(4096, 4096);
    let mut off = start;
    let (t0, c0) = (Instant::now(), thread_cpu());
    for _ in 0..reads {
        off = (off + 4096) % SIZE;
        let n = f.read_at(off, &mut buf, Flags::NONE).expect("null read");
        debug_assert_eq!(n, 4096);
    }
    (t0.elapsed().as_secs_f64(), thread_cpu() - c0)
}

/// Reads per second of `threads` threads together, each doing `reads` reads (wall
/// time: a loaded machine lowers it), and the mean CPU time per read of a thread.
fn rate(threads: usize, reads: u64, own: bool) -> (f64, f64) {
    // One device; one file on it, or one file each (own state, map, counters).
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(SIZE, 512).null().without_stats(),
    ));
    let open = || {
        DirectFile::new(
            dev.clone(),
            Arc::new(IdentityMap::new(4096, SIZE)),
            Arc::new(FileState::new(SIZE)),
        )
        .expect("open the null file")
    };
    let shared = open();
    let files: Vec<DirectFile> = (0..threads)
        .map(|_| if own { open() } else { shared.clone() })
        .collect();
    let start = std::sync::Barrier::new(threads);
    let t0 = Instant::now();
    let cpu: f64 = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(t, f)| {
                let start = &start;
                s.spawn(move || {
                    run(f, reads / 10, 0); // warm up
                    start.wait();
                    run(f, reads, t as u64 * (SIZE / threads as u64)).1
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("reader")).sum()
    });
    let wall = t0.elapsed().as_secs_f64();
    let total = (threads as u64 * reads) as f64;
    (total / wall, cpu * 1e9 / total)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let reads: u64 = args.next().map_or(5_000_000, |a| a.parse().expect("READS"));
    let threads: usize = args.next().map_or(1, |a| a.parse().expect("THREADS"));
    let own = args.next().is_some_and(|a| a == "own");
    if threads <= 1 {
        let f = file();
        run(&f, reads / 10, 0); // warm up
        let (secs, cpu) = run(&f, reads, 0);
        println!(
            "{:.1} ns/read ({:.1} ns of CPU)",
            secs * 1e9 / reads as f64,
            cpu * 1e9 / reads as f64
        );
        return;
    }
    let (one, cpu1) = rate(1, reads, own);
    let (many, cpun) = rate(threads, reads, own);
    println!(
        "1 thread: {:.2} M reads/s ({cpu1:.1} ns of CPU per read); {threads} threads ({}): \
         {:.2} M reads/s ({cpun:.1} ns of CPU per read); ratio {:.2}x (by CPU per read: {:.2}x)",
        one / 1e6,
        if own { "a file each" } else { "one file" },
        many / 1e6,
        many / one,
        threads as f64 * cpu1 / cpun
    );
}
