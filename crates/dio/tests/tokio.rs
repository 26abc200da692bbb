//! The streams as tokio I/O (feature `tokio`): results equal to the bytes on a
//! multi-thread runtime, futures dropped mid-flight lose or duplicate nothing, and
//! no runtime thread waits for the device (a one-thread runtime whose device
//! completes requests only when another task of that runtime says so).

use std::future::Future;
use std::io::SeekFrom;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use dio::stream::{DioReader, DioWriter, StreamOptions};
use dio::{
    Device, DirectFile, FileState, Flags, Geometry, IdentityMap, MemDevice, MemDeviceConfig, Op,
    Request,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const DEV: u64 = 16 << 20;

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A file over a threaded RAM device whose completions arrive late and out of
/// order, on the device's own threads.
fn slow_file(size: u64, seed: u64) -> (Arc<MemDevice>, DirectFile) {
    let cfg = MemDeviceConfig::new(DEV, 512).threaded(Some(Duration::from_micros(200)), true, seed);
    let dev = Arc::new(MemDevice::new(cfg));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, DEV)),
        Arc::new(FileState::new(size)),
    )
    .unwrap();
    (dev, file)
}

fn opts(buffers: usize, buffer_size: usize) -> StreamOptions {
    StreamOptions {
        buffers,
        buffer_size,
        ..StreamOptions::default()
    }
}

fn file_bytes(file: &DirectFile) -> Vec<u8> {
    let mut out = vec![0u8; file.size() as usize];
    assert_eq!(
        file.read_at(0, &mut out, Flags::UNALIGNED).unwrap(),
        out.len()
    );
    out
}

#[test]
fn async_streams_give_the_bytes_on_a_multi_thread_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..6u64 {
            tasks.push(tokio::spawn(async move {
                let (_dev, file) = slow_file(0, t);
                let data = bytes(1_500_000 + t as usize * 977, t);
                let mut w = DioWriter::with_options(file.clone(), &opts(3, 64 << 10));
                // Pieces of many sizes, some crossing buffers.
                let mut at = 0;
                let mut k = 1usize;
                while at < data.len() {
                    let n = (k * 7919 % 150_000).min(data.len() - at);
                    w.write_all(&data[at..at + n]).await.unwrap();
                    at += n;
                    k += 1;
                }
                w.shutdown().await.unwrap();
                assert_eq!(file.size(), data.len() as u64);
                assert!(file_bytes(&file) == data);

                let mut r = DioReader::with_options(&file, &opts(4, 128 << 10));
                let mut back = Vec::new();
                r.read_to_end(&mut back).await.unwrap();
                assert!(back == data, "task {t}: read_to_end differs");

                // Seek and read exact pieces; lines through AsyncBufRead.
                for &(off, len) in &[(1_000_001u64, 70_000usize), (3, 5), (900_000, 300_000)] {
                    assert_eq!(r.seek(SeekFrom::Start(off)).await.unwrap(), off);
                    let mut b = vec![0u8; len];
                    r.read_exact(&mut b).await.unwrap();
                    assert!(b[..] == data[off as usize..off as usize + len]);
                }
                r.seek(SeekFrom::Start(17)).await.unwrap();
                let mut line = Vec::new();
                r.read_until(b'\n', &mut line).await.unwrap();
                let rest = &data[17..];
                let end = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |i| i + 1);
                assert!(line[..] == rest[..end]);

                // An async seek of the writer waits for the writes before it.
                let mut w = DioWriter::with_options(file.clone(), &opts(2, 8192));
                w.write_all(b"start").await.unwrap();
                assert_eq!(
                    w.seek(SeekFrom::End(-4)).await.unwrap(),
                    data.len() as u64 - 4
                );
                w.write_all(b"END!").await.unwrap();
                w.shutdown().await.unwrap();
                let got = file_bytes(&file);
                assert_eq!(&got[..5], b"start");
                assert_eq!(&got[got.len() - 4..], b"END!");
                assert!(got[5..got.len() - 4] == data[5..data.len() - 4]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Poll a future once with a waker that does nothing, then drop it: a future
/// abandoned after its first poll, as `select!` or a timeout abandons one.
fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
    let mut f = pin!(f);
    f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn futures_dropped_mid_flight_lose_and_duplicate_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let data = bytes(2_000_000, 5);
        let (dev, file) = slow_file(0, 9);

        // Writes: each piece first polled once and dropped; what a Ready poll took
        // counts, a Pending one took nothing; then the rest is written properly.
        let mut w = DioWriter::with_options(file.clone(), &opts(2, 32 << 10));
        let (mut at, mut dropped) = (0usize, 0u32);
        while at < data.len() {
            let n = (40_000).min(data.len() - at);
            match poll_once(w.write(&data[at..at + n])) {
                Poll::Ready(r) => at += r.unwrap(),
                Poll::Pending => {
                    dropped += 1;
                    let k = w.write(&data[at..at + n]).await.unwrap();
                    at += k;
                }
            }
        }
        // A shutdown dropped mid-way, then done again.
        if poll_once(w.shutdown()).is_pending() {
            dropped += 1;
        }
        w.shutdown().await.unwrap();
        assert!(
            file_bytes(&file) == data,
            "dropped write futures changed the file"
        );

        // Reads: the same with read futures.
        let mut r = DioReader::with_options(&file, &opts(3, 64 << 10));
        let mut back = Vec::new();
        let mut buf = vec![0u8; 50_000];
        loop {
            let n = match poll_once(r.read(&mut buf)) {
                Poll::Ready(n) => n.unwrap(),
                Poll::Pending => {
                    dropped += 1;
                    r.read(&mut buf).await.unwrap()
                }
            };
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
        assert!(back == data, "dropped read futures changed the stream");
        eprintln!("{dropped} futures dropped while pending");

        // Whole streams dropped with requests in flight (tasks aborted): their
        // buffers go with the requests; the device drains and the file stays usable.
        for i in 0..10u64 {
            let f = file.clone();
            let reader = tokio::spawn(async move {
                let mut r = DioReader::with_options(&f, &opts(8, 64 << 10));
                let mut sink = Vec::new();
                r.read_to_end(&mut sink).await.unwrap();
            });
            let f = file.clone();
            let writer = tokio::spawn(async move {
                let mut w = DioWriter::with_options(f, &opts(8, 64 << 10));
                w.seek(SeekFrom::Start(i * 100_000)).await.unwrap();
                w.write_all(&bytes(500_000, i)).await.unwrap();
                w.shutdown().await.unwrap();
            });
            tokio::task::yield_now().await;
            reader.abort();
            writer.abort();
            let _ = reader.await;
            let _ = writer.await;
        }
        while dev.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
        let mut w = DioWriter::new(file.clone());
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        let mut back = Vec::new();
        DioReader::new(&file).read_to_end(&mut back).await.unwrap();
        assert!(back[..data.len()] == data[..]);
    });
}

/// A RAM device that holds every request until `release` is called.
struct Gate {
    data: Mutex<Vec<u8>>,
    held: Mutex<Vec<Request>>,
}

impl Gate {
    fn release(&self) -> usize {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        let n = held.len();
        for mut req in held {
            let (at, end) = (req.offset() as usize, (req.offset() + req.len()) as usize);
            let mut data = self.data.lock().unwrap();
            match req.op() {
                Op::Read => req.copy_in(0, &data[at..end]),
                Op::Write => req.copy_out(0, &mut data[at..end]),
            }
            drop(data);
            req.complete(Ok(()));
        }
        n
    }
}

impl Device for Gate {
    fn geometry(&self) -> Geometry {
        Geometry::new(512, DEV)
    }
    fn submit(&self, req: Request) {
        self.held.lock().unwrap().push(req);
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "gate"
    }
}

#[test]
fn no_runtime_thread_waits_for_the_device() {
    // One runtime thread; the device completes requests only when the releasing
    // task (on that same thread) runs. A stream that blocked the thread while
    // waiting for the device would hang here; the watchdog turns a hang into a
    // failure.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let gate = Arc::new(Gate {
            data: Mutex::new(vec![0; DEV as usize]),
            held: Mutex::new(Vec::new()),
        });
        let file = DirectFile::new(
            gate.clone(),
            Arc::new(IdentityMap::new(4096, DEV)),
            Arc::new(FileState::new(0)),
        )
        .unwrap();
        let data = bytes(1_000_000, 77);
        let released = rt.block_on(async {
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (d2, g2) = (done.clone(), gate.clone());
            let releaser = tokio::spawn(async move {
                let mut n = 0;
                while !d2.load(std::sync::atomic::Ordering::Acquire) {
                    n += g2.release();
                    tokio::task::yield_now().await;
                }
                n
            });
            let mut w = DioWriter::with_options(file.clone(), &opts(4, 64 << 10));
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
            let mut back = Vec::new();
            DioReader::with_options(&file, &opts(4, 64 << 10))
                .read_to_end(&mut back)
                .await
                .unwrap();
            assert!(back == data);
            done.store(true, std::sync::atomic::Ordering::Release);
            releaser.await.unwrap()
        });
        tx.send(released).unwrap();
    });
    let released = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the streams blocked the runtime's only thread (or panicked)");
    assert!(
        released >= 2 * 16,
        "requests went through the gate: {released}"
    );
}

/// A host file of `len` bytes under the target dir, for io_uring.
fn host_file(name: &str, data: &[u8]) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("tokio-{name}-{}.bin", std::process::id()));
    std::fs::write(&path, data).unwrap();
    path
}

/// Removes a scratch file, also when the test fails.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn uring_or_skip() -> bool {
    match dio::probe::uring_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: io_uring unavailable here ({e})");
            false
        }
    }
}

/// A file on io_uring with the default polled completions (no reaper thread).
fn uring_file(path: &std::path::Path) -> dio::RawFile {
    let raw = dio::RawFile::open(
        path,
        &dio::RawOptions {
            backend: dio::Backend::Uring,
            ..dio::RawOptions::default()
        },
    )
    .unwrap();
    assert_eq!(raw.backend_name(), "uring");
    assert_eq!(
        raw.direct().device().completion_mode(),
        dio::CompletionMode::Polled
    );
    raw
}

/// A waker that records wakeups and unparks the executor's thread.
struct Flag {
    woken: std::sync::atomic::AtomicBool,
    thread: std::thread::Thread,
}

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Run `f` on this thread, polling it only after a wakeup; returns its output
/// and how many times it was polled.
fn block_on_counting<F: Future>(f: F) -> (F::Output, u32) {
    let flag = Arc::new(Flag {
        woken: std::sync::atomic::AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = Waker::from(Arc::clone(&flag));
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return (v, polls);
        }
        let start = std::time::Instant::now();
        while !flag.woken.swap(false, std::sync::atomic::Ordering::SeqCst) {
            std::thread::park_timeout(Duration::from_secs(1));
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "a pending future was never woken"
            );
        }
    }
}

#[test]
fn a_pending_future_on_io_uring_is_woken_by_its_completion() {
    // io_uring's default completions need polling. A future that re-polled itself
    // while pending (waking its own task) would be polled thousands of times while
    // a 4 MiB direct read is in flight; woken by its completion it is polled twice.
    if !uring_or_skip() {
        return;
    }
    const PIECE: usize = 4 << 20;
    let data = bytes(8 * PIECE, 31);
    let scratch = Scratch(host_file("woken", &data));
    let raw = uring_file(&scratch.0);
    let file = raw.direct();
    let align = file.geometry().buffer_align();
    let mut pending = 0;
    for i in 0..8 {
        let fut = file.read_future(
            (i * PIECE) as u64,
            vec![dio::AlignedBuf::new(PIECE, align)],
            Flags::NONE,
        );
        let (done, polls) = block_on_counting(fut);
        assert_eq!(done.result.unwrap(), PIECE);
        assert!(done.bufs[0][..] == data[i * PIECE..(i + 1) * PIECE]);
        assert!(polls <= 3, "read {i}: polled {polls} times while pending");
        if polls > 1 {
            pending += 1;
        }
    }
    eprintln!("{pending} of 8 reads were pending at their first poll");
    // Eight 4 MiB direct reads that all completed before their first poll would
    // prove nothing: the device is never that fast.
    assert!(pending > 0, "no read was pending at its first poll");

    // The stream through tokio on a one-thread runtime: the runtime's thread
    // sleeps while reads are in flight, and each wakeup comes from a completion
    // (a few polls per 1 MiB buffer, not one per trip around the runtime).
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let polls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let back = rt.block_on(async {
        let mut r = DioReader::with_options(&raw, &opts(4, 1 << 20));
        let mut back = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let read = std::future::poll_fn(|cx| {
                polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut rb = tokio::io::ReadBuf::new(&mut buf);
                match tokio::io::AsyncRead::poll_read(Pin::new(&mut r), cx, &mut rb) {
                    Poll::Ready(r) => Poll::Ready(r.map(|()| rb.filled().len())),
                    Poll::Pending => Poll::Pending,
                }
            });
            let n = read.await.unwrap();
            if n == 0 {
                break back;
            }
            back.extend_from_slice(&buf[..n]);
        }
    });
    assert!(back == data, "the stream's bytes differ from the file's");
    let calls = data.len() / (64 << 10);
    let polls = polls.load(std::sync::atomic::Ordering::Relaxed) as usize;
    eprintln!("{polls} polls for {calls} reads of 64 KiB");
    // One poll per read, plus at most two per 1 MiB buffer waited for.
    assert!(
        polls <= calls + 1 + 2 * (data.len() >> 20),
        "{polls} polls for {calls} reads: the reads re-polled while pending"
    );
}

#[test]
fn tokio_streams_on_io_uring_are_cancel_safe() {
    // Readers over io_uring (polled completions, reaped by the device's watcher
    // while a task waits) aborted with reads in flight, futures polled once and
    // dropped: the bytes read afterwards are the file's, and every request ends.
    if !uring_or_skip() {
        return;
    }
    let data = bytes(6 << 20, 41);
    let scratch = Scratch(host_file("cancel", &data));
    let raw = Arc::new(uring_file(&scratch.0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..10 {
            let f = Arc::clone(&raw);
            let reader = tokio::spawn(async move {
                let mut r = DioReader::with_options(&*f, &opts(8, 256 << 10));
                let mut sink = Vec::new();
                r.read_to_end(&mut sink).await.unwrap();
            });
            tokio::task::yield_now().await;
            reader.abort();
            let _ = reader.await;
        }
        let mut r = DioReader::with_options(&*raw, &opts(3, 128 << 10));
        let mut back = Vec::new();
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = match poll_once(r.read(&mut buf)) {
                Poll::Ready(n) => n.unwrap(),
                Poll::Pending => r.read(&mut buf).await.unwrap(),
            };
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
        assert!(back == data, "dropped futures changed the stream");
    });
    // The readers' requests still in flight end when the device drops (it drains
    // them): their buffers were theirs all along.
    drop(rt);
    drop(raw);
}

/// Throughput, not a check: with `DIO_STREAM_BENCH=1`, a cold 1 GiB host file read
/// in 64 KiB calls through the tokio adapter (multi-thread runtime) and through the
/// sync stream, both with `StreamOptions::default()`, three alternated pairs per
/// back end (io_uring with its default polled completions, reaped by the device's
/// watcher thread while a task waits, and the pread pool, whose completions wake
/// the task); prints the median ratios.
/// Needs root (drop_caches).
#[test]
fn tokio_stream_speed_against_the_sync_stream() {
    if std::env::var_os("DIO_STREAM_BENCH").is_none() {
        eprintln!("skipped: set DIO_STREAM_BENCH=1 to measure stream throughput");
        return;
    }
    use std::io::{Read, Write};
    use std::time::Instant;
    const SIZE: usize = 1 << 30;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("bench.bin");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let block = bytes(1 << 20, 1);
        for _ in 0..SIZE >> 20 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let cold = || {
        std::process::Command::new("sync").status().unwrap();
        std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache (root)");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    for backend in [dio::Backend::Auto, dio::Backend::Sync] {
        let ropts = dio::RawOptions {
            backend,
            ..dio::RawOptions::default()
        };
        let mut ratios = Vec::new();
        for round in 0..3 {
            cold();
            let t = Instant::now();
            let raw = dio::RawFile::open(&path, &ropts).unwrap();
            let mut r = DioReader::new(&raw);
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0;
            loop {
                let k = Read::read(&mut r, &mut buf).unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            assert_eq!(n, SIZE);
            let sync = t.elapsed().as_secs_f64();
            cold();
            let t = Instant::now();
            let n = rt.block_on(async {
                let raw = dio::RawFile::open(&path, &ropts).unwrap();
                let mut r = DioReader::new(&raw);
                let mut buf = vec![0u8; 64 << 10];
                let mut n = 0;
                loop {
                    let k = AsyncReadExt::read(&mut r, &mut buf).await.unwrap();
                    if k == 0 {
                        break n;
                    }
                    n += k;
                }
            });
            assert_eq!(n, SIZE);
            let asy = t.elapsed().as_secs_f64();
            let g = |s: f64| SIZE as f64 / s / (1u64 << 30) as f64;
            eprintln!(
                "{backend:?} round {round}: sync stream {:.2} GiB/s, tokio stream {:.2} GiB/s",
                g(sync),
                g(asy)
            );
            ratios.push(sync / asy);
        }
        ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
        eprintln!(
            "{backend:?}: median speed ratio tokio/sync stream: {:.2}x",
            ratios[1]
        );
    }
}
