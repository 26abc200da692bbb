//! Async calls reuse their call state: a thread keeps the states of finished async
//! calls for its next ones. A reused state must never carry the last call's error,
//! outcome or private data into the next call. Two threads run async reads and
//! writes, several in flight each, over blocks that alternate between good ones,
//! ones whose device request fails (EIO, by device offset) and ones the block map
//! refuses; every call is checked against a model of the file: the exact result
//! (bytes, or which error at which offset), the data read, and the private data the
//! map's end_io receives. On an inline device (the submitter finishes the call) and
//! on a threaded, reordering one (the device's thread finishes it), with a map that
//! has no end_io (the async fast path) and one that has (the general path).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dio::{
    AlignedBuf, BlockMap, CorruptKind, DirectFile, Error, Extent, FileState, Flags, MemDevice,
    MemDeviceConfig, Op, Private, Result,
};

const FS: u64 = 4096;
const BLOCKS: u64 = 512;
const THREADS: u64 = 2;
const OPS: u64 = 3000;
const IN_FLIGHT: usize = 8;

/// Blocks the map refuses.
fn bad_map(b: u64) -> bool {
    b % 5 == 1
}

/// Blocks whose device requests fail.
fn bad_dev(b: u64) -> bool {
    b % 7 == 3 && !bad_map(b)
}

/// Identity mapping, one block per extent; refuses `bad_map` blocks; attaches the
/// block number as private data to even blocks. With end_io, checks that the private
/// data it gets belongs to the call's own block (none for odd blocks).
struct CheckedMap {
    end_io: bool,
    stale: AtomicU64,
    end_ios: AtomicU64,
}

impl BlockMap for CheckedMap {
    fn block_size(&self) -> u32 {
        FS as u32
    }

    fn map(&self, block: u64, _max: u64, _create: bool) -> Result<Extent> {
        if bad_map(block) {
            return Err(Error::corrupt(
                CorruptKind::ExtentTree,
                format!("block {block} refused by the test map"),
            ));
        }
        let e = Extent::mapped(block, 1);
        Ok(if block % 2 == 0 {
            e.private(Arc::new(block))
        } else {
            e
        })
    }

    fn end_io(
        &self,
        _op: Op,
        offset: u64,
        result: Result<usize>,
        private: Option<&Private>,
    ) -> Result<usize> {
        self.end_ios.fetch_add(1, Ordering::Relaxed);
        let block = offset / FS;
        let seen = private.and_then(|p| p.downcast_ref::<u64>().copied());
        // A call whose map refused its block has no mapping, so no private data.
        let want = (block % 2 == 0 && !bad_map(block)).then_some(block);
        if seen != want {
            self.stale.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn max_file_size(&self) -> u64 {
        BLOCKS * FS
    }

    fn has_end_io(&self) -> bool {
        self.end_io
    }
}

/// The bytes thread `t`'s `seq`th write puts in a block.
fn fill(buf: &mut [u8], t: u64, seq: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        w.copy_from_slice(&((t << 48) | (seq << 16) | i as u64).to_le_bytes());
    }
}

/// What a call must return.
#[derive(Debug)]
enum Want {
    Bytes,
    Corrupt,
    Eio { offset: u64 },
}

fn want(b: u64) -> Want {
    if bad_map(b) {
        Want::Corrupt
    } else if bad_dev(b) {
        Want::Eio { offset: b * FS }
    } else {
        Want::Bytes
    }
}

/// Whether `r` is what a call on block `b` must return.
fn verdict(what: &str, b: u64, r: &Result<usize>) -> std::result::Result<(), String> {
    match (want(b), r) {
        (Want::Bytes, Ok(n)) if *n == FS as usize => Ok(()),
        (Want::Corrupt, Err(Error::Corrupt(c))) if c.kind == CorruptKind::ExtentTree => Ok(()),
        (Want::Eio { offset }, Err(Error::Io { offset: at, source }))
            if *at == offset && source.raw_os_error() == Some(libc::EIO) =>
        {
            Ok(())
        }
        (w, r) => Err(format!("{what} of block {b}: want {w:?}, got {r:?}")),
    }
}

fn check(what: &str, b: u64, r: &Result<usize>) {
    if let Err(m) = verdict(what, b, r) {
        panic!("{m}");
    }
}

fn run(threaded: bool, end_io: bool) {
    let mut cfg = MemDeviceConfig::new(BLOCKS * FS, 512);
    if threaded {
        cfg = cfg.threaded(None, true, 7);
    }
    let (map, file) = rig(cfg, end_io);
    // The model: each block's bytes (all zero at first); thread t owns the blocks
    // b with b % THREADS == t, so no two calls in flight share a block.
    let model: Vec<Mutex<Vec<u8>>> = (0..BLOCKS)
        .map(|_| Mutex::new(vec![0u8; FS as usize]))
        .collect();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (file, model) = (file.clone(), &model);
            s.spawn(move || {
                let mut rng = dio_testkit::Rng::new(t + 1);
                let own = BLOCKS / THREADS;
                let mut flight = VecDeque::new();
                let settle =
                    |(op, b, expect, fut): (Op, u64, Vec<u8>, dio::DioFuture<AlignedBuf>)| {
                        let c = fut.wait();
                        match op {
                            Op::Read => {
                                check("read", b, &c.result);
                                if c.result.is_ok() {
                                    assert!(
                                        c.bufs[0][..] == model[b as usize].lock().unwrap()[..],
                                        "read of block {b}: bytes differ from the model"
                                    );
                                }
                            }
                            Op::Write => {
                                check("write", b, &c.result);
                                if c.result.is_ok() {
                                    *model[b as usize].lock().unwrap() = expect;
                                }
                            }
                        }
                    };
                for seq in 0..OPS {
                    // Consecutive blocks of this thread: good, refused and failing
                    // ones interleave; IN_FLIGHT in a row are distinct.
                    let b = (seq % own) * THREADS + t;
                    let op = if rng.percent(50) { Op::Read } else { Op::Write };
                    let mut buf = AlignedBuf::new(FS as usize, FS as usize);
                    let at = b * FS;
                    let entry = match op {
                        Op::Read => (
                            op,
                            b,
                            Vec::new(),
                            file.read_future(at, vec![buf], Flags::NONE),
                        ),
                        Op::Write => {
                            fill(&mut buf, t, seq);
                            let expect = buf.to_vec();
                            (op, b, expect, file.write_future(at, vec![buf], Flags::NONE))
                        }
                    };
                    flight.push_back(entry);
                    if flight.len() >= IN_FLIGHT {
                        settle(flight.pop_front().unwrap());
                    }
                }
                flight.into_iter().for_each(settle);
            });
        }
    });
    // Every block as the model has it, read sync.
    check_model(&file, &model);
    assert_eq!(
        map.stale.load(Ordering::Relaxed),
        0,
        "end_io saw private data of another call"
    );
    if end_io {
        assert!(map.end_ios.load(Ordering::Relaxed) >= THREADS * OPS);
    }
}

/// Every block the model knows, read sync, is as the model has it.
fn check_model(file: &DirectFile, model: &[Mutex<Vec<u8>>]) {
    let mut buf = AlignedBuf::new(FS as usize, FS as usize);
    for b in (0..BLOCKS).filter(|&b| matches!(want(b), Want::Bytes)) {
        assert_eq!(
            file.read_at(b * FS, &mut buf, Flags::NONE).unwrap(),
            FS as usize
        );
        assert!(
            buf[..] == model[b as usize].lock().unwrap()[..],
            "block {b} differs from the model at the end"
        );
    }
}

/// The device of `cfg` failing the bad blocks, a checked map and the file.
fn rig(cfg: MemDeviceConfig, end_io: bool) -> (Arc<CheckedMap>, DirectFile) {
    let dev = Arc::new(MemDevice::new(cfg));
    for b in (0..BLOCKS).filter(|&b| bad_dev(b)) {
        dev.fail_range(b * FS..(b + 1) * FS, None);
    }
    let map = Arc::new(CheckedMap {
        end_io,
        stale: AtomicU64::new(0),
        end_ios: AtomicU64::new(0),
    });
    let file = DirectFile::new(dev, map.clone(), Arc::new(FileState::new(BLOCKS * FS))).unwrap();
    (map, file)
}

/// Chains of async calls, each call started by the previous one's completion: on a
/// threaded device they all run on the device's thread after the first, so the call
/// states that thread recycles (finished by a completion, their outcome handed over
/// by the submitter) are the ones it reuses.
fn run_chains(end_io: bool) {
    const CHAINS: u64 = 8;
    let (map, file) = rig(
        MemDeviceConfig::new(BLOCKS * FS, 512).threaded(None, true, 9),
        end_io,
    );
    struct Ctx {
        file: DirectFile,
        model: Vec<Mutex<Vec<u8>>>,
        failures: Mutex<Vec<String>>,
        finished: Mutex<std::sync::mpsc::Sender<()>>,
    }
    /// Call `seq` of chain `c`, whose blocks are those b with b % CHAINS == c.
    fn step(ctx: Arc<Ctx>, c: u64, seq: u64) {
        if seq == OPS {
            let _ = ctx.finished.lock().unwrap().send(());
            return;
        }
        let b = (seq % (BLOCKS / CHAINS)) * CHAINS + c;
        let write = (seq * 7 + c) % 3 == 0;
        let mut buf = AlignedBuf::new(FS as usize, FS as usize);
        let at = b * FS;
        let ctx2 = Arc::clone(&ctx);
        if write {
            fill(&mut buf, c, seq);
            let expect = buf.to_vec();
            ctx.file
                .write_async(at, vec![buf], Flags::NONE, move |done| {
                    if let Err(m) = verdict("write", b, &done.result) {
                        ctx2.failures.lock().unwrap().push(m);
                    } else if done.result.is_ok() {
                        *ctx2.model[b as usize].lock().unwrap() = expect;
                    }
                    step(ctx2, c, seq + 1);
                });
        } else {
            ctx.file
                .read_async(at, vec![buf], Flags::NONE, move |done| {
                    if let Err(m) = verdict("read", b, &done.result) {
                        ctx2.failures.lock().unwrap().push(m);
                    } else if done.result.is_ok()
                        && done.bufs[0][..] != ctx2.model[b as usize].lock().unwrap()[..]
                    {
                        ctx2.failures
                            .lock()
                            .unwrap()
                            .push(format!("read of block {b}: bytes differ from the model"));
                    }
                    step(ctx2, c, seq + 1);
                });
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let ctx = Arc::new(Ctx {
        file: file.clone(),
        model: (0..BLOCKS)
            .map(|_| Mutex::new(vec![0u8; FS as usize]))
            .collect(),
        failures: Mutex::new(Vec::new()),
        finished: Mutex::new(tx),
    });
    // Two threads start the chains.
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let ctx = &ctx;
            s.spawn(move || {
                for c in (0..CHAINS).filter(|c| c % THREADS == t) {
                    step(Arc::clone(ctx), c, 0);
                }
            });
        }
    });
    for _ in 0..CHAINS {
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("every chain of async calls finishes");
    }
    let failures = ctx.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} calls wrong, first: {}",
        failures.len(),
        failures[0]
    );
    check_model(&ctx.file, &ctx.model);
    assert_eq!(
        map.stale.load(Ordering::Relaxed),
        0,
        "end_io saw private data of another call"
    );
}

#[test]
fn recycled_async_calls_inline_fast_path() {
    run(false, false);
}

#[test]
fn recycled_async_calls_inline_end_io() {
    run(false, true);
}

#[test]
fn recycled_async_calls_threaded_fast_path() {
    run(true, false);
}

#[test]
fn recycled_async_calls_threaded_end_io() {
    run(true, true);
}

#[test]
fn recycled_async_calls_chained_on_the_device_thread_fast_path() {
    run_chains(false);
}

#[test]
fn recycled_async_calls_chained_on_the_device_thread_end_io() {
    run_chains(true);
}
