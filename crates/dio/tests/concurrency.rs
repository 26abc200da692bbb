//! The engine under concurrency (issue 13): async calls chained from completion
//! callbacks on every back end, truncate against byte-granular writes, exclusive
//! hole fills under LOCKING, request cuts that respect memory alignment, truncate
//! through the map's submit_io hook, and POLL on interrupt-driven devices.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{bounded, have, Rng};
use dio::nbd::{NbdConfig, NbdDevice, NbdUri};
use dio::{
    AlignedBuf, BlockMap, Completion, CompletionMode, Device, DirectFile, Extent, FileState,
    Finished, Flags, Geometry, IdentityMap, MemDevice, MemDeviceConfig, Op, Request, Result,
};
use dio::{SyncConfig, SyncDevice, UringConfig, UringDevice};
use dio_testkit::{Listen, ServerProcess};

const FS: u32 = 4096;

fn scratch_file(name: &str, size: u64) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = dir.join(format!("conc-{name}-{}-{n}.bin", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

/// nbdkit's memory plugin on a Unix socket, killed on drop (its directory goes
/// too).
struct Nbdkit {
    proc: ServerProcess,
    dir: PathBuf,
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nbdkit(size: &str) -> Option<(Nbdkit, NbdUri)> {
    if !have("nbdkit") {
        eprintln!("skipping the NBD case: nbdkit is not installed (apt-get install nbdkit)");
        return None;
    }
    let dir = scratch_file("nbd", 0).with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(["memory", size]);
    let proc = ServerProcess::start(cmd, Listen::Unix(&sock));
    Some((Nbdkit { proc, dir }, NbdUri::unix(sock, "")))
}

/// Every back end, as (name, device, keep-alive).
type Backend = (String, Arc<dyn Device>, Option<Nbdkit>);

fn backends(size: u64) -> Vec<Backend> {
    let mut v: Vec<Backend> = Vec::new();
    let ram = MemDeviceConfig::new(size, 512).threaded(None, true, 3);
    v.push(("ram-threaded".into(), Arc::new(MemDevice::new(ram)), None));
    for reaper in [true, false] {
        if reaper && common::under_valgrind() {
            // The reaper waits in io_uring_enter, which valgrind runs holding its lock.
            eprintln!("skipping io_uring (reaper true) under valgrind");
            continue;
        }
        let path = scratch_file("uring", size);
        let mut cfg = UringConfig::default();
        cfg.reaper = reaper;
        let dev = UringDevice::open(&path, true, &cfg);
        let _ = std::fs::remove_file(&path);
        match dev {
            Ok(d) => v.push((format!("uring-reaper-{reaper}"), Arc::new(d), None)),
            Err(e) => eprintln!("skipping io_uring (reaper {reaper}): {e}"),
        }
    }
    let path = scratch_file("pool", size);
    let mut cfg = SyncConfig::default();
    cfg.workers = 1;
    let dev = SyncDevice::open(&path, true, &cfg);
    let _ = std::fs::remove_file(&path);
    match dev {
        Ok(d) => v.push(("pread-1-worker".into(), Arc::new(d), None)),
        Err(e) => eprintln!("skipping pread: {e}"),
    }
    if let Some((srv, uri)) = nbdkit(&format!("{size}")) {
        let mut cfg = NbdConfig::default();
        cfg = cfg.timeout(Duration::from_secs(20));
        match NbdDevice::connect(&uri, &cfg) {
            Ok(d) => v.push(("nbd".into(), Arc::new(d), Some(srv))),
            Err(e) => eprintln!("skipping NBD: {e}"),
        }
    }
    v
}

/// An identity map whose extents are one block each, each sent alone (boundary):
/// a call over N blocks is N device requests.
struct OneBlockAtATime(IdentityMap);

impl BlockMap for OneBlockAtATime {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn map(&self, block: u64, _max: u64, create: bool) -> Result<Extent> {
        Ok(self.0.map(block, 1, create)?.boundary(true))
    }
    fn max_file_size(&self) -> u64 {
        self.0.max_file_size()
    }
}

/// Start `left` async reads one after the other, each from the previous one's
/// callback, each of `blocks` blocks; report the total bytes when the last is done.
fn chain(file: DirectFile, at: u64, blocks: usize, left: usize, total: u64, tx: mpsc::Sender<u64>) {
    if left == 0 {
        let _ = tx.send(total);
        return;
    }
    let len = blocks * FS as usize;
    let next = file.clone();
    file.read_async(
        at,
        vec![AlignedBuf::new(len, 4096)],
        Flags::NONE,
        move |c| match c.result {
            Ok(n) => {
                let at = (at + n as u64) % (64 * FS as u64);
                chain(next, at, blocks, left - 1, total + n as u64, tx)
            }
            Err(e) => panic!("chained read failed: {e}"),
        },
    );
}

/// Wait for `rx`, polling the file's device meanwhile (a polled io_uring ring
/// completes only when someone polls).
fn wait_polling<T>(file: &DirectFile, rx: &mpsc::Receiver<T>, secs: u64) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match rx.recv_timeout(Duration::from_millis(1)) {
            Ok(v) => return v,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "the chain never finished");
                if file.device().completion_mode() == CompletionMode::Polled {
                    let _ = file.poll(false);
                }
            }
            Err(e) => panic!("the chain was dropped: {e}"),
        }
    }
}

#[test]
fn async_calls_chained_from_callbacks_never_hang_on_any_back_end() {
    let size = 64 << 20;
    for (name, dev, _srv) in backends(size) {
        eprintln!("chain backend {name}");
        let file = DirectFile::new(
            dev,
            Arc::new(OneBlockAtATime(IdentityMap::new(FS, size))),
            Arc::new(FileState::new(size)),
        )
        .unwrap();
        // 10,000 calls of one request each, then 50 calls of 1,000 requests each
        // (over the 64 in flight a call may have: the rest queue, and go out as
        // completions arrive on the thread that delivers them).
        for (calls, blocks) in [(10_000usize, 1usize), (50, 1000)] {
            let (tx, rx) = mpsc::channel();
            let f = file.clone();
            chain(f, 0, blocks, calls, 0, tx);
            let total = wait_polling(&file, &rx, 120);
            assert_eq!(total, (calls * blocks) as u64 * u64::from(FS), "{name}");
        }
        assert_eq!(file.state().dio_count(), 0, "{name}");
    }
}

#[test]
fn appends_started_from_callbacks_complete() {
    let size = 16 << 20;
    for (name, dev, _srv) in backends(size) {
        // The file starts empty: every write extends it (without ASYNC_EXTEND).
        let file = DirectFile::new(
            dev,
            Arc::new(IdentityMap::new(FS, size)),
            Arc::new(FileState::new(0)),
        )
        .unwrap();
        fn append(file: DirectFile, n: u64, tx: mpsc::Sender<u64>) {
            if n == 200 {
                let _ = tx.send(file.size());
                return;
            }
            let next = file.clone();
            let data = AlignedBuf::from_slice(&[n as u8 + 1; 4096], 4096);
            // From a read's callback (a device thread), an appending write.
            file.read_async(
                0,
                vec![AlignedBuf::new(4096, 4096)],
                Flags::NONE,
                move |_| {
                    let after = next.clone();
                    next.write_async(n * 4096, vec![data], Flags::NONE, move |c| {
                        assert_eq!(c.result.unwrap(), 4096);
                        append(after, n + 1, tx);
                    });
                },
            );
        }
        let (tx, rx) = mpsc::channel();
        append(file.clone(), 0, tx);
        assert_eq!(wait_polling(&file, &rx, 60), 200 * 4096, "{name}");
        let mut back = AlignedBuf::new(200 * 4096, 4096);
        assert_eq!(file.read_at(0, &mut back, Flags::NONE).unwrap(), 200 * 4096);
        for (i, chunk) in back.chunks(4096).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8 + 1), "{name}: block {i}");
        }
    }
}

/// One round of the truncate-against-RMW race: a file of `old` bytes of 0x11, a
/// truncate to `to` racing a byte-granular write of `len` bytes at `at`. The result
/// must be one of the two orders.
/// How a test truncates its file (the engine's truncate, or a host file's set_len).
type Truncate = Arc<dyn Fn(u64) -> Result<()> + Send + Sync>;

fn truncate_vs_rmw_round(
    file: &DirectFile,
    trunc: &Truncate,
    old: u64,
    to: u64,
    at: u64,
    len: usize,
    seed: u8,
) {
    trunc(0).unwrap();
    file.write_at(0, &vec![0x11; old as usize], Flags::UNALIGNED)
        .unwrap();
    let data = vec![seed | 0x80; len];
    let (f1, t2) = (file.clone(), trunc.clone());
    let d = data.clone();
    let w = thread::spawn(move || f1.write_at(at, &d, Flags::UNALIGNED).unwrap());
    let t = thread::spawn(move || t2(to).unwrap());
    assert_eq!(w.join().unwrap(), len);
    t.join().unwrap();
    // Model: write then truncate, or truncate then write.
    let mut a = vec![0x11; old as usize];
    if a.len() < (at as usize + len) {
        a.resize(at as usize + len, 0);
    }
    a[at as usize..at as usize + len].copy_from_slice(&data);
    a.truncate(to as usize);
    let mut b = vec![0x11; old as usize];
    b.truncate(to as usize);
    if b.len() < at as usize + len {
        b.resize(at as usize + len, 0);
    }
    b[at as usize..at as usize + len].copy_from_slice(&data);
    let size = file.size() as usize;
    let mut got = vec![0; size];
    assert_eq!(file.read_at(0, &mut got, Flags::UNALIGNED).unwrap(), size);
    assert!(
        got == a || got == b,
        "old {old} truncate {to} write {at}+{len}: size {size}, neither order (first diff vs write-first at {:?}, vs truncate-first at {:?})",
        got.iter().zip(&a).position(|(x, y)| x != y).or((got.len() != a.len()).then_some(usize::MAX)),
        got.iter().zip(&b).position(|(x, y)| x != y).or((got.len() != b.len()).then_some(usize::MAX)),
    );
}

fn race_rounds(file: &DirectFile, trunc: Truncate, rounds: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    // The case first: 8 KiB of 0x11, truncate to 0, 3 bytes at 100.
    truncate_vs_rmw_round(file, &trunc, 8192, 0, 100, 3, 1);
    for r in 0..rounds {
        let old = 1 + rng.next_u64() % 12288;
        let to = rng.next_u64() % (old + 1);
        let at = rng.next_u64() % 12288;
        let len = 1 + (rng.next_u64() % 700) as usize;
        truncate_vs_rmw_round(file, &trunc, old, to, at, len, r as u8);
    }
}

#[test]
fn truncate_and_read_modify_write_exclude_each_other_on_ram() {
    let size = 1 << 20;
    let dev = MemDeviceConfig::new(size, 512).fill(0xAA).threaded(
        Some(Duration::from_micros(20)),
        true,
        9,
    );
    let file = DirectFile::new(
        Arc::new(MemDevice::new(dev)),
        Arc::new(dio::TestMap::new(dio::TestMapConfig::new(
            FS,
            size / u64::from(FS),
        ))),
        Arc::new(FileState::new(0)),
    )
    .unwrap();
    let rounds = std::env::var("DIO_RACE_ROUNDS").map_or(10_000, |v| v.parse().unwrap());
    let f = file.clone();
    let trunc: Truncate = Arc::new(move |size| f.truncate(size));
    bounded(600, move || race_rounds(&file, trunc, rounds, 0x5eed));
}

#[test]
fn truncate_and_read_modify_write_exclude_each_other_on_a_host_file() {
    let path = scratch_file("race", 0);
    let opts = dio::RawOptions {
        write: true,
        ..Default::default()
    };
    let raw = match dio::RawFile::open(&path, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let _ = std::fs::remove_file(&path);
    // The raw map is an identity map over a fixed-size file: make room first.
    raw.set_len(1 << 20).unwrap();
    let file = raw.direct().clone();
    let rounds = std::env::var("DIO_RACE_ROUNDS").map_or(10_000, |v| v.parse().unwrap());
    let raw = Arc::new(raw);
    let trunc: Truncate = Arc::new(move |size| raw.set_len(size));
    bounded(600, move || race_rounds(&file, trunc, rounds, 0xf11e));
}

/// A file system that allocates holes as mapped (not unwritten) new blocks, the way
/// the trait allows: block i lives at device block i once allocated.
struct AllocMapped {
    allocated: Mutex<Vec<bool>>,
}

impl BlockMap for AllocMapped {
    fn block_size(&self) -> u32 {
        FS
    }
    fn map(&self, block: u64, max: u64, create: bool) -> Result<Extent> {
        let mut a = self.allocated.lock().unwrap();
        let b = block as usize;
        let run = |a: &Vec<bool>, v: bool| {
            (b..a.len().min(b + max as usize))
                .take_while(|&i| a[i] == v)
                .count() as u64
        };
        if a[b] {
            return Ok(Extent::mapped(block, run(&a, true)));
        }
        let n = run(&a, false);
        if !create {
            return Ok(Extent::hole(n));
        }
        for i in b..b + n as usize {
            a[i] = true;
        }
        Ok(Extent::mapped(block, n).new_blocks(true))
    }
    fn max_file_size(&self) -> u64 {
        self.allocated.lock().unwrap().len() as u64 * u64::from(FS)
    }
}

/// Completes writes late: each waits a while before it reaches the device, while
/// reads go at once.
struct SlowWrites(Arc<MemDevice>);

impl Device for SlowWrites {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn submit(&self, req: Request) {
        if req.op() == Op::Write {
            let dev = self.0.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(30));
                dev.submit(req);
            });
        } else {
            self.0.submit(req);
        }
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn name(&self) -> &str {
        "slow-writes"
    }
}

#[test]
fn locking_readers_never_see_a_hole_being_filled_before_its_data() {
    let blocks = 256u64;
    let size = blocks * u64::from(FS);
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512).fill(0xAA)));
    let dev = Arc::new(SlowWrites(mem));
    let map = Arc::new(AllocMapped {
        allocated: Mutex::new(vec![false; blocks as usize]),
    });
    let file = DirectFile::new(dev, map, Arc::new(FileState::new(size))).unwrap();
    bounded(120, move || {
        for b in 0..64u64 {
            let at = b * u64::from(FS);
            let done = Arc::new(AtomicBool::new(false));
            let (r, d) = (file.clone(), done.clone());
            let reader = thread::spawn(move || {
                let mut buf = AlignedBuf::new(FS as usize, 4096);
                let mut reads = 0;
                while !d.load(Ordering::SeqCst) || reads < 3 {
                    assert_eq!(
                        r.read_at(at, &mut buf, Flags::LOCKING).unwrap(),
                        FS as usize
                    );
                    let x = buf[0];
                    assert!(
                        x == 0 || x == 0x77,
                        "block {b}: read {x:#x}: stale device data"
                    );
                    assert!(buf.iter().all(|&y| y == x), "block {b}: mixed");
                    reads += 1;
                }
            });
            thread::sleep(Duration::from_millis(2));
            let data = AlignedBuf::from_slice(&[0x77; FS as usize], 4096);
            assert_eq!(
                file.write_at(at, &data, Flags::LOCKING).unwrap(),
                FS as usize
            );
            done.store(true, Ordering::SeqCst);
            reader.join().unwrap();
        }
    });
}

#[test]
fn cuts_at_the_request_limit_respect_memory_alignment() {
    // The case: 512-byte sectors, 4096-byte memory alignment, 8 KiB
    // requests, a 15,872-byte write at 512.
    let check = |lb: u32, align: u32, segs: u32, max: u32, off: u64, lens: &[usize]| {
        let size = 1u64 << 20;
        let g = Geometry::new(lb, size)
            .with_mem_align(align)
            .with_limits(segs, max);
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, lb).geometry(g)));
        let file = DirectFile::new(
            dev,
            Arc::new(IdentityMap::new(lb, size)),
            Arc::new(FileState::new(size)),
        )
        .unwrap();
        let total: usize = lens.iter().sum();
        let bufs: Vec<AlignedBuf> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let mut b = AlignedBuf::new(l, align.max(4096) as usize);
                for (j, x) in b.iter_mut().enumerate() {
                    *x = (i * 31 + j / 512 + 1) as u8;
                }
                b
            })
            .collect();
        let slices: Vec<std::io::IoSlice> = bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
        let what = format!("lb {lb} align {align} segs {segs} max {max} off {off} lens {lens:?}");
        assert_eq!(
            file.write(off, &slices, Flags::NONE).unwrap(),
            total,
            "{what}"
        );
        let mut back = AlignedBuf::new(total, 4096);
        assert_eq!(
            file.read_at(off, &mut back, Flags::NONE).unwrap(),
            total,
            "{what}"
        );
        let want: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(back[..] == want[..], "{what}: data differs");
    };
    check(512, 4096, 256, 8192, 512, &[15872]);
    // A seeded property run over random geometries and well-formed requests.
    let mut rng = Rng::new(0x9e37_79b9);
    for _ in 0..400 {
        let lb = 512u32 << (rng.next_u64() % 4); // 512..4096
        let align = 512u32 << (rng.next_u64() % 4);
        let segs = 1 + (rng.next_u64() % 8) as u32;
        let max_blocks = (align / lb).max(1) * (1 + (rng.next_u64() % 8) as u32);
        let max = lb * max_blocks;
        let off = u64::from(lb) * (rng.next_u64() % 64);
        let n = 1 + rng.next_u64() % 4;
        let lens: Vec<usize> = (0..n)
            .map(|_| lb as usize * (1 + (rng.next_u64() % 40) as usize))
            .collect();
        check(lb, align, segs, max, off, &lens);
    }
}

/// A map that keeps data XORed on the device, through its submit_io hook: writes
/// are encrypted into a buffer of the hook's own, reads decrypted into the caller's
/// memory once the device filled the hook's buffer.
struct Xor(IdentityMap);

const KEY: u8 = 0x5c;

struct Finish(Mutex<Option<Request>>);

impl Completion for Finish {
    fn complete(self: Arc<Self>, mut inner: Finished, result: std::io::Result<()>) {
        let mut parent = self.0.lock().unwrap().take().expect("once");
        if let (Some(mut buf), Op::Read, Ok(())) =
            (inner.take_buf::<AlignedBuf>(), parent.op(), &result)
        {
            buf.iter_mut().for_each(|b| *b ^= KEY);
            parent.copy_in(0, &buf);
        }
        parent.complete(result);
    }
}

impl BlockMap for Xor {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn map(&self, block: u64, max: u64, create: bool) -> Result<Extent> {
        self.0.map(block, max, create)
    }
    fn max_file_size(&self) -> u64 {
        self.0.max_file_size()
    }
    fn submit_io(&self, dev: &dyn Device, req: Request, _file_offset: u64) {
        let len = req.len() as usize;
        let mut buf = AlignedBuf::new(len, 4096);
        if req.op() == Op::Write {
            req.copy_out(0, &mut buf);
            buf.iter_mut().for_each(|b| *b ^= KEY);
        }
        let (op, at, fua) = (req.op(), req.offset(), req.fua());
        let finish = Arc::new(Finish(Mutex::new(Some(req))));
        dev.submit(Request::with_buf(op, at, buf, fua, finish, 0));
    }
}

#[test]
fn truncate_goes_through_the_maps_submit_io_hook() {
    let size = 1 << 20;
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512)));
    let file = DirectFile::new(
        mem.clone(),
        Arc::new(Xor(IdentityMap::new(FS, size))),
        Arc::new(FileState::new(8192)),
    )
    .unwrap();
    let data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8 + 1).collect();
    assert_eq!(
        file.write_at(0, &AlignedBuf::from_slice(&data, 4096), Flags::NONE)
            .unwrap(),
        8192
    );
    // On the device, the data is encrypted.
    assert_eq!(mem.read_raw(0, 1)[0], data[0] ^ KEY);
    file.truncate(100).unwrap();
    file.truncate(8192).unwrap();
    let mut back = AlignedBuf::new(8192, 4096);
    assert_eq!(file.read_at(0, &mut back, Flags::NONE).unwrap(), 8192);
    assert_eq!(&back[..100], &data[..100], "the kept bytes");
    // The engine zeroes the rest of the new last block (the identity map frees no
    // blocks, so what lies past that block is the map's business).
    assert!(
        back[100..4096].iter().all(|&b| b == 0),
        "the truncated tail of the last block does not read as zeros"
    );
}

/// Counts how often it is polled.
struct CountPolls(Arc<MemDevice>, AtomicU64);

impl Device for CountPolls {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn submit(&self, req: Request) {
        self.0.submit(req)
    }
    fn poll(&self, wait: bool) -> std::io::Result<usize> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.poll(wait)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn name(&self) -> &str {
        "count-polls"
    }
}

#[test]
fn poll_flag_does_not_spin_on_an_interrupt_driven_device() {
    let size = 1 << 20;
    let cfg = MemDeviceConfig::new(size, 512).threaded(Some(Duration::from_millis(50)), false, 1);
    let dev = Arc::new(CountPolls(Arc::new(MemDevice::new(cfg)), AtomicU64::new(0)));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(FS, size)),
        Arc::new(FileState::new(size)),
    )
    .unwrap();
    let mut buf = AlignedBuf::new(65536, 4096);
    assert_eq!(file.read_at(0, &mut buf, Flags::POLL).unwrap(), 65536);
    let polls = dev.1.load(Ordering::SeqCst);
    assert!(polls < 50, "{polls} polls in 50 ms: the waiter spins");
}

/// Issue 12: the last handle of an NBD device dropped on its own reader thread (by
/// a completion), with requests still in flight: the device must not join its own
/// thread, and every request still completes, exactly once.
#[test]
fn nbd_device_dropped_from_its_own_completion_completes_every_request_once() {
    let Some((_srv, uri)) = nbdkit("16M") else {
        return;
    };
    struct Count {
        hits: Arc<Mutex<Vec<u64>>>,
        drop_dev: Mutex<Option<Arc<NbdDevice>>>,
        tx: Mutex<mpsc::Sender<()>>,
    }
    impl Completion for Count {
        fn complete(self: Arc<Self>, req: Finished, _r: std::io::Result<()>) {
            self.hits.lock().unwrap().push(req.tag());
            // The first completion drops the last handle of the device, here, on
            // the device's reader thread.
            drop(self.drop_dev.lock().unwrap().take());
            let _ = self.tx.lock().unwrap().send(());
        }
    }
    let before = dio::callback_panics();
    let mut cfg = NbdConfig::default();
    cfg = cfg.timeout(Duration::from_secs(10));
    let dev = Arc::new(NbdDevice::connect(&uri, &cfg).unwrap());
    let hits = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let c = Arc::new(Count {
        hits: hits.clone(),
        drop_dev: Mutex::new(Some(dev.clone())),
        tx: Mutex::new(tx),
    });
    for i in 0..8u64 {
        let buf = AlignedBuf::new(1 << 20, 4096);
        dev.submit(Request::with_buf(
            Op::Read,
            i << 20,
            buf,
            false,
            c.clone(),
            i,
        ));
    }
    // Only the completion holds the device now.
    drop(dev);
    for _ in 0..8 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a request never completed");
    }
    thread::sleep(Duration::from_millis(100));
    let mut got = hits.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, (0..8).collect::<Vec<_>>(), "each request exactly once");
    assert_eq!(dio::callback_panics(), before, "a completion panicked");
}
