//! Panic safety and "every request completes exactly once": user code (block map,
//! submit_io hook, end_io, pin closure, completion callbacks) panics mid-call, on the
//! threaded RAM device, io_uring (polled and with a reaper) and the pread pool; devices
//! that poll with errors or drop requests. After each, no request is in flight, no
//! lock or count is held, and the file goes on working.

mod common;

use std::io::IoSlice;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::bounded;
use dio::Private;
use dio::{
    AlignedBuf, BlockMap, Completion, CompletionMode, Device, DirectFile, Extent, FileState,
    Finished, Flags, Geometry, IdentityMap, MemDevice, MemDeviceConfig, Op, Request, Result,
};
use dio::{SyncConfig, SyncDevice, UringConfig, UringDevice};

const FS: u32 = 4096;
const SIZE: u64 = 1 << 20;

/// A device wrapper that counts requests in flight, in safe code: each request is
/// forwarded, and its stand-in's completion completes it.
struct Counting {
    inner: Arc<dyn Device>,
    live: Arc<AtomicUsize>,
}

struct Uncount(Arc<AtomicUsize>);

impl Completion for Uncount {
    fn complete(self: Arc<Self>, mut req: Finished, result: std::io::Result<()>) {
        let parent = req.take_parent().expect("a forwarded request");
        self.0.fetch_sub(1, Ordering::SeqCst);
        parent.complete(result);
    }
}

impl Device for Counting {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn submit(&self, req: Request) {
        self.live.fetch_add(1, Ordering::SeqCst);
        self.inner
            .submit(req.forward(Arc::new(Uncount(self.live.clone()))));
    }
    fn unplug(&self) {
        self.inner.unplug()
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
        "counting"
    }
}

/// Where the map panics.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hook {
    Map,
    SubmitIo,
    EndIo,
    Pin,
}

/// An identity map that answers one block at a time with the boundary flag (so each
/// block is its own request, sent at once), and panics at its `panic_at`-th call of
/// the chosen hook.
struct Hooked {
    inner: IdentityMap,
    hook: Hook,
    panic_at: usize,
    calls: AtomicUsize,
    armed: std::sync::atomic::AtomicBool,
    /// The device's requests in flight, and how many there were at the panic.
    live: Arc<AtomicUsize>,
    live_at_panic: AtomicUsize,
}

impl Hooked {
    fn hit(&self, hook: Hook) {
        if self.hook == hook
            && self.armed.load(Ordering::SeqCst)
            && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.panic_at
        {
            self.live_at_panic
                .store(self.live.load(Ordering::SeqCst), Ordering::SeqCst);
            panic!("injected panic in {hook:?}");
        }
    }
}

impl BlockMap for Hooked {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn map(&self, block: u64, _max: u64, create: bool) -> Result<Extent> {
        self.hit(Hook::Map);
        Ok(self.inner.map(block, 1, create)?.boundary(true))
    }
    fn end_io(
        &self,
        op: Op,
        offset: u64,
        result: Result<usize>,
        private: Option<&Private>,
    ) -> Result<usize> {
        self.hit(Hook::EndIo);
        self.inner.end_io(op, offset, result, private)
    }
    fn submit_io(&self, dev: &dyn Device, req: Request, file_offset: u64) {
        self.hit(Hook::SubmitIo);
        self.inner.submit_io(dev, req, file_offset)
    }
    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }
}

struct Rig {
    file: DirectFile,
    live: Arc<AtomicUsize>,
    map: Arc<Hooked>,
}

fn rig(dev: Arc<dyn Device>, hook: Hook, panic_at: usize) -> Rig {
    let live = Arc::new(AtomicUsize::new(0));
    let dev: Arc<dyn Device> = Arc::new(Counting {
        inner: dev,
        live: live.clone(),
    });
    let map = Arc::new(Hooked {
        inner: IdentityMap::new(FS, SIZE),
        hook,
        panic_at,
        calls: AtomicUsize::new(0),
        armed: std::sync::atomic::AtomicBool::new(true),
        live: live.clone(),
        live_at_panic: AtomicUsize::new(0),
    });
    let file = DirectFile::new(dev, map.clone(), Arc::new(FileState::new(SIZE))).unwrap();
    Rig { file, live, map }
}

fn ram() -> Arc<dyn Device> {
    let cfg = MemDeviceConfig::new(SIZE, 512).fill(0x55).threaded(
        Some(Duration::from_millis(200)),
        true,
        7,
    );
    Arc::new(MemDevice::new(cfg))
}

/// A scratch file on a real file system (O_DIRECT), filled with 0x55.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = dir.join(format!("panics-{name}-{}-{n}.bin", std::process::id()));
    std::fs::write(&path, vec![0x55u8; SIZE as usize]).unwrap();
    path
}

fn uring(reaper: bool) -> Option<Arc<dyn Device>> {
    if reaper && common::under_valgrind() {
        // The reaper waits in io_uring_enter, which valgrind runs holding its lock.
        eprintln!("skipping the io_uring reaper case under valgrind");
        return None;
    }
    let path = scratch(if reaper { "reaper" } else { "polled" });
    let mut cfg = UringConfig::default();
    cfg.reaper = reaper;
    let dev = UringDevice::open(&path, true, &cfg);
    let _ = std::fs::remove_file(&path);
    match dev {
        Ok(d) => Some(Arc::new(d)),
        Err(e) => {
            eprintln!("skipping the io_uring case: {e}");
            None
        }
    }
}

fn pool(workers: usize) -> Option<Arc<dyn Device>> {
    let path = scratch(&format!("pool{workers}"));
    let mut cfg = SyncConfig::default();
    cfg.workers = workers;
    let dev = SyncDevice::open(&path, true, &cfg);
    let _ = std::fs::remove_file(&path);
    match dev {
        Ok(d) => Some(Arc::new(d)),
        Err(e) => {
            eprintln!("skipping the pread case: {e}");
            None
        }
    }
}

fn devices() -> Vec<(&'static str, Arc<dyn Device>)> {
    let mut v = vec![("ram", ram())];
    if let Some(d) = uring(false) {
        v.push(("uring-polled", d));
    }
    if let Some(d) = uring(true) {
        v.push(("uring-reaper", d));
    }
    if let Some(d) = pool(1) {
        v.push(("pread-1", d));
    }
    v
}

/// After a call that panicked: nothing in flight, no count, no lock; the file works.
fn check_clean(r: &Rig, what: &str) {
    assert_eq!(
        r.live.load(Ordering::SeqCst),
        0,
        "{what}: a request outlived the call"
    );
    assert_eq!(
        r.file.state().dio_count(),
        0,
        "{what}: in-flight count left behind"
    );
    r.map.armed.store(false, Ordering::SeqCst);
    let file = r.file.clone();
    bounded(20, move || {
        // The range lock of a panicking write is free, and truncate finishes.
        let data = AlignedBuf::from_slice(&[0x77; 16384], 4096);
        assert_eq!(file.write_at(0, &data, Flags::NONE).unwrap(), 16384);
        let mut back = AlignedBuf::new(16384, 4096);
        assert_eq!(file.read_at(0, &mut back, Flags::NONE).unwrap(), 16384);
        assert!(back.iter().all(|&b| b == 0x77));
        file.truncate(SIZE).unwrap();
    });
}

#[test]
fn a_panic_in_sync_calls_leaves_nothing_in_flight_and_no_lock_held() {
    for (name, dev) in devices() {
        for hook in [Hook::Map, Hook::SubmitIo, Hook::EndIo, Hook::Pin] {
            for op in [Op::Read, Op::Write] {
                if hook == Hook::Pin && op == Op::Read {
                    continue; // only writes take a pin closure
                }
                let what = format!("{name} {hook:?} {op:?}");
                // End_io runs once per call; the others panic on their second call,
                // with the first block's request in flight.
                let at = if hook == Hook::EndIo { 1 } else { 2 };
                let r = rig(dev.clone(), hook, at);
                let mut buf = AlignedBuf::from_slice(&[0x33; 16384], 4096);
                let file = r.file.clone();
                let pins = AtomicUsize::new(0);
                let got = catch_unwind(AssertUnwindSafe(|| match op {
                    Op::Read => file.read_at(0, &mut buf, Flags::NONE),
                    Op::Write if hook == Hook::Pin => {
                        file.write_pinned(0, &[IoSlice::new(&buf)], Flags::NONE, |_| {
                            if pins.fetch_add(1, Ordering::SeqCst) == 1 {
                                panic!("injected panic in the pin closure");
                            }
                            true
                        })
                    }
                    Op::Write => file.write_at(0, &buf, Flags::NONE),
                }));
                assert!(got.is_err(), "{what}: the panic did not reach the caller");
                if hook != Hook::EndIo && hook != Hook::Pin {
                    // The case that matters: a request was in flight at the panic.
                    assert!(
                        r.map.live_at_panic.load(Ordering::SeqCst) >= 1 || name != "ram",
                        "{what}: nothing was in flight when the map panicked"
                    );
                }
                let snapshot = buf.to_vec();
                check_clean(&r, &what);
                std::thread::sleep(Duration::from_millis(250));
                assert_eq!(
                    &buf[..],
                    &snapshot[..],
                    "{what}: the buffer changed after the call"
                );
            }
        }
    }
}

#[test]
fn a_panic_in_an_async_call_completes_it_with_an_error_and_returns_the_buffers_once() {
    for (name, dev) in devices() {
        for hook in [Hook::Map, Hook::SubmitIo, Hook::EndIo] {
            for op in [Op::Read, Op::Write] {
                let what = format!("{name} {hook:?} {op:?}");
                let at = if hook == Hook::EndIo { 1 } else { 2 };
                let r = rig(dev.clone(), hook, at);
                let (tx, rx) = mpsc::channel();
                let bufs = vec![AlignedBuf::from_slice(&[0x33; 16384], 4096)];
                let file = r.file.clone();
                let started = catch_unwind(AssertUnwindSafe(|| {
                    let done = move |c: dio::Completed<AlignedBuf>| {
                        tx.send((c.result.map_err(|e| e.errno()), c.bufs.len()))
                            .unwrap();
                    };
                    match op {
                        Op::Read => file.read_async(0, bufs, Flags::NONE, done),
                        Op::Write => file.write_async(0, bufs, Flags::NONE, done),
                    }
                }));
                let poller = r.file.clone();
                let (result, nbufs) = bounded(20, move || loop {
                    match rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(v) => break v,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = poller.poll(false);
                        }
                        Err(e) => panic!("callback never ran: {e}"),
                    }
                });
                assert_eq!(nbufs, 1, "{what}");
                assert!(result.is_err(), "{what}: {result:?}");
                if hook != Hook::EndIo {
                    // The panic happened on this thread, in the call: it goes on.
                    assert!(
                        started.is_err(),
                        "{what}: the panic did not reach the caller"
                    );
                }
                check_clean(&r, &what);
            }
        }
    }
}

#[test]
fn a_panicking_completion_callback_does_not_stop_the_device_thread() {
    for (name, dev) in devices() {
        let file = DirectFile::new(
            dev.clone(),
            Arc::new(IdentityMap::new(FS, SIZE)),
            Arc::new(FileState::new(SIZE)),
        )
        .unwrap();
        let before = dio::callback_panics();
        let (tx, rx) = mpsc::channel();
        let n = 40;
        for i in 0..n {
            let tx = tx.clone();
            file.read_async(
                i * 4096,
                vec![AlignedBuf::new(4096, 4096)],
                Flags::NONE,
                move |c| {
                    if i % 4 == 0 {
                        panic!("injected panic in callback {i}");
                    }
                    tx.send(c.result.unwrap()).unwrap();
                },
            );
        }
        drop(tx);
        let poller = file.clone();
        let got = bounded(20, move || {
            let mut got = 0;
            loop {
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(n) => {
                        assert_eq!(n, 4096);
                        got += 1;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = poller.poll(false);
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break got,
                }
            }
        });
        assert_eq!(
            got,
            n - n / 4,
            "{name}: completions behind a panicking callback were lost"
        );
        // The last panicking callback drops its sender while it unwinds, a moment
        // before the device counts its panic.
        let deadline = std::time::Instant::now() + Duration::from_secs(common::time_scaled(5));
        while dio::callback_panics() < before + n / 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: panics not counted"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(file.state().dio_count(), 0, "{name}");
    }
}

/// A polled device (in safe code) whose `poll` fails with EINTR every other time, as
/// a signal would make io_uring_enter do; requests complete only while polled.
struct Interrupted {
    data: Mutex<Vec<u8>>,
    queue: Mutex<Vec<Request>>,
    polls: AtomicUsize,
}

impl Device for Interrupted {
    fn geometry(&self) -> Geometry {
        Geometry::new(512, SIZE)
    }
    fn submit(&self, req: Request) {
        self.queue.lock().unwrap().push(req);
    }
    fn poll(&self, _wait: bool) -> std::io::Result<usize> {
        if self.polls.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINTR));
        }
        let reqs: Vec<Request> = std::mem::take(&mut *self.queue.lock().unwrap());
        let n = reqs.len();
        for mut req in reqs {
            let at = req.offset() as usize;
            let end = at + req.len() as usize;
            let mut data = self.data.lock().unwrap();
            match req.op() {
                Op::Read => req.copy_in(0, &data[at..end]),
                Op::Write => req.copy_out(0, &mut data[at..end]),
            }
            drop(data);
            req.complete(Ok(()));
        }
        Ok(n)
    }
    fn completion_mode(&self) -> CompletionMode {
        CompletionMode::Polled
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "interrupted"
    }
}

#[test]
fn a_poll_error_does_not_end_the_wait_for_a_request_in_flight() {
    let dev = Arc::new(Interrupted {
        data: Mutex::new((0..SIZE).map(|i| (i % 251) as u8).collect()),
        queue: Mutex::new(Vec::new()),
        polls: AtomicUsize::new(0),
    });
    // The metadata helpers: the buffer comes back filled, with the poll error.
    let mut buf = AlignedBuf::new(8192, 4096);
    let r = dio::read_device(&*dev, 4096, &mut buf);
    assert_eq!(buf.len(), 8192);
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((4096 + i) % 251) as u8));
    assert!(
        dev.queue.lock().unwrap().is_empty(),
        "returned with the request queued"
    );
    assert!(r.is_err() || r.is_ok());
    // The engine's sync calls.
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(FS, SIZE)),
        Arc::new(FileState::new(SIZE)),
    )
    .unwrap();
    let mut buf = AlignedBuf::new(65536, 4096);
    assert_eq!(file.read_at(8192, &mut buf, Flags::NONE).unwrap(), 65536);
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((8192 + i) % 251) as u8));
    assert!(dev.queue.lock().unwrap().is_empty());
}

/// A device that loses every request it is given (drops it).
struct Lossy;

impl Device for Lossy {
    fn geometry(&self) -> Geometry {
        Geometry::new(512, SIZE)
    }
    fn submit(&self, req: Request) {
        drop(req);
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "lossy"
    }
}

#[test]
fn a_request_a_device_drops_completes_with_ecanceled_instead_of_hanging() {
    let file = DirectFile::new(
        Arc::new(Lossy),
        Arc::new(IdentityMap::new(FS, SIZE)),
        Arc::new(FileState::new(SIZE)),
    )
    .unwrap();
    let e = bounded(10, move || {
        let mut buf = AlignedBuf::new(4096, 4096);
        file.read_at(0, &mut buf, Flags::NONE).unwrap_err()
    });
    assert_eq!(e.errno(), libc::ECANCELED, "{e}");
}

/// An identity map without end_io, for the engine's fast path of a one-buffer sync
/// read (one lookup, one request, no walk): it answers the whole range asked
/// (`whole`) or one block at a time with the boundary flag (the fast path then
/// hands its answer to the walk), and panics at its `panic_at`-th lookup, or in submit_io once the request
/// is out.
struct Plain {
    inner: IdentityMap,
    hook: Hook,
    panic_at: usize,
    whole: bool,
    calls: AtomicUsize,
    armed: std::sync::atomic::AtomicBool,
    live: Arc<AtomicUsize>,
    live_at_panic: AtomicUsize,
}

impl Plain {
    fn hit(&self, hook: Hook) {
        if self.hook == hook
            && self.armed.load(Ordering::SeqCst)
            && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.panic_at
        {
            self.live_at_panic
                .store(self.live.load(Ordering::SeqCst), Ordering::SeqCst);
            panic!("injected panic in {hook:?}");
        }
    }
}

impl BlockMap for Plain {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn map(&self, block: u64, max: u64, create: bool) -> Result<Extent> {
        self.hit(Hook::Map);
        if self.whole {
            self.inner.map(block, max, create)
        } else {
            // One block, sent at once: in flight when the next lookup panics.
            Ok(self.inner.map(block, 1, create)?.boundary(true))
        }
    }
    fn submit_io(&self, dev: &dyn Device, req: Request, file_offset: u64) {
        self.inner.submit_io(dev, req, file_offset);
        self.hit(Hook::SubmitIo);
    }
    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }
    fn has_end_io(&self) -> bool {
        false
    }
}

#[test]
fn a_panic_in_a_one_buffer_read_on_the_fast_path_leaves_nothing_behind() {
    for (name, dev) in devices() {
        // (hook, panic at, whole extents, read length): a panic in the one lookup;
        // in submit_io with the request out; in the walk's second lookup after the
        // fast path handed it a one-block answer, with the first block's request out.
        for (hook, at, whole, len) in [
            (Hook::Map, 1, true, 4096),
            (Hook::SubmitIo, 1, true, 4096),
            (Hook::SubmitIo, 1, true, 65536),
            (Hook::Map, 2, false, 8192),
        ] {
            // The locking mode holds the shared file lock over the lookup: a panic
            // must give it back (the truncate below takes it exclusively).
            for flags in [Flags::NONE, Flags::LOCKING] {
                let what =
                    format!("{name} {hook:?} at {at}, whole {whole}, {len} bytes, {flags:?}");
                let live = Arc::new(AtomicUsize::new(0));
                let counting: Arc<dyn Device> = Arc::new(Counting {
                    inner: dev.clone(),
                    live: live.clone(),
                });
                let map = Arc::new(Plain {
                    inner: IdentityMap::new(FS, SIZE),
                    hook,
                    panic_at: at,
                    whole,
                    calls: AtomicUsize::new(0),
                    armed: std::sync::atomic::AtomicBool::new(true),
                    live: live.clone(),
                    live_at_panic: AtomicUsize::new(0),
                });
                let file =
                    DirectFile::new(counting, map.clone(), Arc::new(FileState::new(SIZE))).unwrap();
                let mut buf = AlignedBuf::from_slice(&vec![0x33; len], 4096);
                let got = catch_unwind(AssertUnwindSafe(|| file.read_at(0, &mut buf, flags)));
                assert!(got.is_err(), "{what}: the panic did not reach the caller");
                if hook == Hook::SubmitIo || at == 2 {
                    assert!(
                        map.live_at_panic.load(Ordering::SeqCst) >= 1 || name != "ram",
                        "{what}: nothing was in flight at the panic"
                    );
                }
                assert_eq!(
                    live.load(Ordering::SeqCst),
                    0,
                    "{what}: a request outlived the call"
                );
                assert_eq!(
                    file.state().dio_count(),
                    0,
                    "{what}: in-flight count left behind"
                );
                let snapshot = buf.to_vec();
                map.armed.store(false, Ordering::SeqCst);
                let f = file.clone();
                bounded(20, move || {
                    let mut back = AlignedBuf::new(4096, 4096);
                    assert_eq!(f.read_at(0, &mut back, Flags::NONE).unwrap(), 4096);
                    f.truncate(SIZE).unwrap();
                });
                std::thread::sleep(Duration::from_millis(250));
                assert_eq!(
                    &buf[..],
                    &snapshot[..],
                    "{what}: the buffer changed after the call"
                );
            }
        }
    }
}
