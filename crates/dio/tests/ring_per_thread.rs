//! The io_uring device with a ring per thread (issue 20): sync reads and writes from
//! many threads on one file, checked byte for byte against the file as the kernel
//! reads it back through the page cache; async chains started from completion
//! callbacks, which run on the submitting thread; rings released when their thread
//! exits (idle, or after draining requests in flight) and when the device drops
//! while other threads hold rings. Skipped where io_uring is unavailable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dio::{AlignedBuf, Flags, RawFile, RawOptions};

const BLOCK: usize = 4096;

fn uring_or_skip() -> bool {
    match dio::probe::uring_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: io_uring unavailable here ({e})");
            false
        }
    }
}

fn scratch(name: &str, size: u64) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ring-{name}-{}-{n}.bin", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

fn open(path: &Path, write: bool) -> RawFile {
    let raw = RawFile::open(
        path,
        &RawOptions {
            write,
            ring_per_thread: true,
            backend: dio::Backend::Uring,
            queue_depth: 32,
            ..RawOptions::default()
        },
    )
    .unwrap();
    assert!(raw.uring().unwrap().is_ring_per_thread());
    raw
}

/// The bytes of block `b` as written by thread `t` in round `r`: every 8-byte word
/// names them, so a misplaced or torn block shows.
fn block_bytes(t: u64, b: u64, r: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(BLOCK, BLOCK);
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = (t << 56) ^ (r << 48) ^ (b << 16) ^ i as u64;
        w.copy_from_slice(&v.to_le_bytes());
    }
    buf
}

/// Counts this process's open descriptors that point at `path`.
fn fds_on(path: &Path) -> usize {
    let target = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| *l == target)
        .count()
}

#[test]
fn threads_read_and_write_one_file_each_on_its_own_ring() {
    if !uring_or_skip() {
        return;
    }
    const THREADS: u64 = 4;
    const BLOCKS: u64 = 256;
    const ROUNDS: u64 = 3;
    let path = scratch("sync", BLOCKS * BLOCK as u64);
    let raw = open(&path, true);
    let dev = Arc::clone(raw.uring().unwrap());
    let file = raw.direct().clone();
    let all_done = Arc::new(Barrier::new(THREADS as usize + 1));
    let checked = Arc::new(Barrier::new(THREADS as usize + 1));
    let counted = Arc::new(Barrier::new(THREADS as usize + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let file = file.clone();
            let (all_done, checked) = (Arc::clone(&all_done), Arc::clone(&checked));
            let counted = Arc::clone(&counted);
            thread::spawn(move || {
                // Each thread owns the blocks b with b % THREADS == t; it rewrites
                // them over several rounds, reading each back at once, in an order
                // that interleaves with the other threads' blocks.
                for r in 0..ROUNDS {
                    for k in 0..BLOCKS / THREADS {
                        let b = (k * 7 + r) % (BLOCKS / THREADS) * THREADS + t;
                        let data = block_bytes(t, b, r);
                        let off = b * BLOCK as u64;
                        assert_eq!(file.write_at(off, &data, Flags::NONE).unwrap(), BLOCK);
                        let mut back = AlignedBuf::new(BLOCK, BLOCK);
                        assert_eq!(file.read_at(off, &mut back, Flags::NONE).unwrap(), BLOCK);
                        assert!(back[..] == data[..], "thread {t} block {b} round {r}");
                    }
                }
                all_done.wait();
                // Everyone's last round is on the disk: read the whole file.
                let mut whole = AlignedBuf::new(BLOCKS as usize * BLOCK, BLOCK);
                let n = file.read_at(0, &mut whole, Flags::NONE).unwrap();
                assert_eq!(n, whole.len());
                for b in 0..BLOCKS {
                    let want = block_bytes(b % THREADS, b, ROUNDS - 1);
                    let at = b as usize * BLOCK;
                    assert!(
                        whole[at..at + BLOCK] == want[..],
                        "thread {t} sees block {b}"
                    );
                }
                checked.wait();
                // Alive (ring held) until the rings are counted.
                counted.wait();
            })
        })
        .collect();
    all_done.wait();
    checked.wait();
    // The opener's ring and one per worker.
    assert_eq!(dev.rings(), THREADS as usize + 1);
    counted.wait();
    for h in handles {
        h.join().unwrap();
    }
    // Each worker's ring went with its thread.
    assert_eq!(dev.rings(), 1);
    assert_eq!(dev.in_flight(), 0);
    // The kernel's view, through the page cache, independent of dio.
    let disk = std::fs::read(&path).unwrap();
    for b in 0..BLOCKS {
        let want = block_bytes(b % THREADS, b, ROUNDS - 1);
        let at = b as usize * BLOCK;
        assert!(disk[at..at + BLOCK] == want[..], "file block {b}");
    }
    drop((file, dev, raw));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn async_chains_from_callbacks_stay_on_their_thread() {
    if !uring_or_skip() {
        return;
    }
    const BLOCKS: u64 = 64;
    const CHAIN: u64 = 200;
    let path = scratch("chain", BLOCKS * BLOCK as u64);
    {
        let mut content = Vec::new();
        for b in 0..BLOCKS {
            content.extend_from_slice(&block_bytes(9, b, 0));
        }
        std::fs::write(&path, content).unwrap();
    }
    let raw = open(&path, false);
    let file = raw.direct().clone();

    /// Read block `i % BLOCKS`, check it, and from the callback start the next read
    /// (on the callback's thread), until `left` runs out.
    fn step(
        file: dio::DirectFile,
        i: u64,
        left: u64,
        home: thread::ThreadId,
        done: Arc<AtomicU64>,
        errors: Arc<Mutex<Vec<String>>>,
    ) {
        let b = i % BLOCKS;
        let f2 = file.clone();
        file.read_async(
            b * BLOCK as u64,
            vec![AlignedBuf::new(BLOCK, BLOCK)],
            Flags::NONE,
            move |c| {
                let mut errs = errors.lock().unwrap();
                if thread::current().id() != home {
                    errs.push(format!("read {i} completed on another thread"));
                }
                match c.result {
                    Ok(n) if n == BLOCK && c.bufs[0][..] == block_bytes(9, b, 0)[..] => {}
                    other => errs.push(format!("read {i}: {other:?} or wrong bytes")),
                }
                drop(errs);
                done.fetch_add(1, Ordering::SeqCst);
                if left > 1 {
                    step(f2, i + 1, left - 1, home, done, errors);
                }
            },
        );
    }

    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let file = file.clone();
            thread::spawn(move || {
                let done = Arc::new(AtomicU64::new(0));
                let errors = Arc::new(Mutex::new(Vec::new()));
                let home = thread::current().id();
                // Four chains in flight on this thread's ring.
                for c in 0..4 {
                    step(
                        file.clone(),
                        t * 1000 + c * 17,
                        CHAIN,
                        home,
                        Arc::clone(&done),
                        Arc::clone(&errors),
                    );
                }
                let deadline = Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::SeqCst) < 4 * CHAIN {
                    file.poll(true).unwrap();
                    assert!(Instant::now() < deadline, "chains stalled");
                }
                let errors = errors.lock().unwrap();
                assert!(errors.is_empty(), "{errors:?}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop((file, raw));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_thread_exiting_drains_and_releases_its_ring() {
    if !uring_or_skip() {
        return;
    }
    let path = scratch("exit", 64 * BLOCK as u64);
    std::fs::write(&path, vec![0x5a; 64 * BLOCK]).unwrap();
    let raw = open(&path, false);
    let dev = Arc::clone(raw.uring().unwrap());
    let file = raw.direct().clone();
    // Idle: one read, then the thread exits.
    {
        let file = file.clone();
        thread::spawn(move || {
            let mut b = AlignedBuf::new(BLOCK, BLOCK);
            assert_eq!(file.read_at(0, &mut b, Flags::NONE).unwrap(), BLOCK);
        })
        .join()
        .unwrap();
    }
    assert_eq!(dev.rings(), 1);
    // Busy: async reads left in flight (never polled by the thread): its exit
    // completes them on the way out, with the right bytes.
    let seen = Arc::new(AtomicUsize::new(0));
    {
        let (file, seen) = (file.clone(), Arc::clone(&seen));
        thread::spawn(move || {
            for i in 0..8u64 {
                let seen = Arc::clone(&seen);
                file.read_async(
                    i * BLOCK as u64,
                    vec![AlignedBuf::new(BLOCK, BLOCK)],
                    Flags::NONE,
                    move |c| {
                        assert_eq!(c.result.unwrap(), BLOCK);
                        assert!(c.bufs[0].iter().all(|&x| x == 0x5a));
                        seen.fetch_add(1, Ordering::SeqCst);
                    },
                );
            }
            file.device().unplug();
        })
        .join()
        .unwrap();
    }
    assert_eq!(seen.load(Ordering::SeqCst), 8);
    assert_eq!(dev.rings(), 1);
    assert_eq!(dev.in_flight(), 0);
    drop((file, dev, raw));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn device_dropped_while_other_threads_hold_rings() {
    if !uring_or_skip() {
        return;
    }
    let path = scratch("drop", 16 * BLOCK as u64);
    std::fs::write(&path, vec![0x33; 16 * BLOCK]).unwrap();
    let other = scratch("drop-other", 16 * BLOCK as u64);
    let raw = open(&path, false);
    let file = raw.direct().clone();
    let (used_tx, used_rx) = mpsc::channel();
    let (dropped_tx, dropped_rx) = mpsc::channel::<()>();
    let (probe_tx, probe_rx) = mpsc::channel::<()>();
    let (probed_tx, probed_rx) = mpsc::channel::<()>();
    let other2 = other.clone();
    let worker = thread::spawn(move || {
        let mut b = AlignedBuf::new(BLOCK, BLOCK);
        assert_eq!(file.read_at(0, &mut b, Flags::NONE).unwrap(), BLOCK);
        assert!(b.iter().all(|&x| x == 0x33));
        // This thread keeps its (idle) ring of the device, not the device.
        drop(file);
        used_tx.send(()).unwrap();
        dropped_rx.recv().unwrap();
        // The device is gone; this thread's next ring setup releases the stale one.
        let raw2 = open(&other2, false);
        let mut b = AlignedBuf::new(BLOCK, BLOCK);
        raw2.direct().read_at(0, &mut b, Flags::NONE).unwrap();
        probe_tx.send(()).unwrap();
        probed_rx.recv().unwrap();
        drop(raw2);
    });
    used_rx.recv().unwrap();
    let dev = Arc::clone(raw.uring().unwrap());
    assert_eq!(dev.rings(), 2);
    drop(dev);
    drop(raw);
    // The worker's ring still holds the file open (it is only released by its own
    // thread), and nothing hung or crashed.
    assert_eq!(fds_on(&path), 1, "the worker's idle ring keeps the file");
    dropped_tx.send(()).unwrap();
    probe_rx.recv().unwrap();
    assert_eq!(fds_on(&path), 0, "the stale ring went at the next setup");
    probed_tx.send(()).unwrap();
    worker.join().unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&other).unwrap();
}

#[test]
fn registered_arena_serves_every_threads_ring() {
    if !uring_or_skip() {
        return;
    }
    let path = scratch("arena", 64 * BLOCK as u64);
    std::fs::write(&path, vec![0x77; 64 * BLOCK]).unwrap();
    let raw = open(&path, false);
    let dev = Arc::clone(raw.uring().unwrap());
    let arena = dio::BufArena::new(8, BLOCK, BLOCK);
    if let Err(e) = raw.register_arena(&arena) {
        eprintln!("skipped: the kernel refuses buffer registration ({e})");
        return;
    }
    let before = dev.fixed_requests();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (file, arena) = (raw.direct().clone(), Arc::clone(&arena));
            thread::spawn(move || {
                for i in 0..4u64 {
                    let buf = arena.take().unwrap();
                    let done = file
                        .read_future(i * BLOCK as u64, vec![buf], Flags::NONE)
                        .wait();
                    assert_eq!(done.result.unwrap(), BLOCK);
                    assert!(done.bufs[0].iter().all(|&x| x == 0x77));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Both threads' rings registered the arena and used fixed-buffer reads (the
    // count survives their rings, released at thread exit).
    assert_eq!(dev.fixed_requests() - before, 8);
    drop((dev, raw));
    std::fs::remove_file(&path).unwrap();
}

/// The pread/pwrite pool with a worker set per thread: four threads write and read
/// back their own blocks (sync calls) and run async chains whose next read starts
/// from the completion callback, on a worker; then the file is checked as the
/// kernel reads it through the page cache. Each thread got a set of its own, and
/// the workers' own submissions made none; without `per_thread`, one set serves all.
#[test]
fn pread_pool_gives_each_submitting_thread_its_worker_set() {
    use dio::{Device, DirectFile, FileState, IdentityMap, SyncConfig, SyncDevice};
    const THREADS: u64 = 4;
    const BLOCKS: u64 = 128;
    const CHAIN: u64 = 50;
    for per_thread in [false, true] {
        let path = scratch("pread", BLOCKS * BLOCK as u64);
        let mut cfg = SyncConfig::default();
        cfg.workers = 2;
        cfg.per_thread = per_thread;
        let dev = Arc::new(SyncDevice::open(&path, true, &cfg).unwrap());
        let geo = dev.geometry();
        let file = DirectFile::new(
            Arc::clone(&dev) as Arc<dyn Device>,
            Arc::new(IdentityMap::new(geo.logical_block, geo.size)),
            Arc::new(FileState::new(BLOCKS * BLOCK as u64)),
        )
        .unwrap();
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let file = file.clone();
                thread::spawn(move || {
                    for k in 0..BLOCKS / THREADS {
                        let b = k * THREADS + t;
                        let data = block_bytes(t, b, 1);
                        let off = b * BLOCK as u64;
                        assert_eq!(file.write_at(off, &data, Flags::NONE).unwrap(), BLOCK);
                        let mut back = AlignedBuf::new(BLOCK, BLOCK);
                        assert_eq!(file.read_at(off, &mut back, Flags::NONE).unwrap(), BLOCK);
                        assert!(back[..] == data[..], "thread {t} block {b}");
                    }
                    // A chain of reads of this thread's blocks, each started by the
                    // previous one's callback (on a worker).
                    let (tx, rx) = mpsc::channel();
                    fn step(
                        file: DirectFile,
                        t: u64,
                        i: u64,
                        tx: mpsc::Sender<Result<(), String>>,
                    ) {
                        let b = i % (BLOCKS / THREADS) * THREADS + t;
                        let f2 = file.clone();
                        file.read_async(
                            b * BLOCK as u64,
                            vec![AlignedBuf::new(BLOCK, BLOCK)],
                            Flags::NONE,
                            move |c| {
                                let ok = matches!(c.result, Ok(n) if n == BLOCK)
                                    && c.bufs[0][..] == block_bytes(t, b, 1)[..];
                                if !ok {
                                    let _ = tx.send(Err(format!("thread {t} chain read {i}")));
                                } else if i + 1 < CHAIN {
                                    step(f2, t, i + 1, tx);
                                } else {
                                    let _ = tx.send(Ok(()));
                                }
                            },
                        );
                    }
                    step(file.clone(), t, 0, tx);
                    rx.recv_timeout(Duration::from_secs(60))
                        .expect("chain stalled")
                        .unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let want_sets = if per_thread { THREADS as usize } else { 1 };
        assert_eq!(dev.worker_sets(), want_sets, "per_thread {per_thread}");
        drop(file);
        drop(dev);
        // The kernel's view, independent of dio.
        let disk = std::fs::read(&path).unwrap();
        for b in 0..BLOCKS {
            let want = block_bytes(b % THREADS, b, 1);
            let at = b as usize * BLOCK;
            assert!(disk[at..at + BLOCK] == want[..], "file block {b}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
