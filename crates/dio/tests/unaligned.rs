//! Byte-granular direct I/O (Flags::UNALIGNED): a model-checked property test of
//! random unaligned reads and writes, sync and async, many in flight and some
//! overlapping, on the RAM device and on a host file; and a stress test of
//! concurrent overlapping unaligned writes.

mod common;

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{rig_with, STALE};
use dio::MemDeviceConfig;
use dio::{AlignedBuf, DirectFile, Flags, OwnedBuf, TestMapConfig, Window};
use proptest::prelude::*;

const SPAN: u64 = 256 * 1024;
const U: Flags = Flags::UNALIGNED;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, val: u8 },
    Read { off: u64, len: u64 },
}

#[derive(Debug, Clone)]
struct Batch {
    ops: Vec<Op>,
    async_: bool,
    /// Misalign the memory of sync calls by this much.
    skew: usize,
    /// Split sync buffers into two iovecs at this fraction.
    split: bool,
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly small requests (bounced whole), some long enough for the zero-copy
    // middle.
    let range = (
        0..SPAN,
        prop_oneof![4 => 1..9000u64, 1 => 65000..200_000u64],
    );
    prop_oneof![
        (range.clone(), 1..0xA0u8).prop_map(|((off, len), val)| Op::Write { off, len, val }),
        range.prop_map(|(off, len)| Op::Read { off, len }),
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        prop::collection::vec(op(), 1..6),
        any::<bool>(),
        0..9usize,
        any::<bool>(),
    )
        .prop_map(|(ops, async_, skew, split)| Batch {
            ops,
            async_,
            skew,
            split,
        })
}

/// The model: for each byte, the set of values it may hold.
struct Model {
    bytes: Vec<Vec<u8>>,
    size: u64,
    size_max: u64,
}

impl Model {
    fn new(span: usize) -> Model {
        Model {
            bytes: vec![vec![0]; span],
            size: 0,
            size_max: 0,
        }
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn check_read(
    m: &Model,
    off: u64,
    len: u64,
    pending: &[(u64, u64, u8)],
    n: usize,
    data: &[u8],
) -> Result<(), TestCaseError> {
    // The size may move with in-flight extending writes of the same batch.
    let lo = if off >= m.size {
        0
    } else {
        (m.size - off).min(len)
    } as usize;
    let hi = if off >= m.size_max {
        0
    } else {
        (m.size_max - off).min(len)
    } as usize;
    if n < lo || n > hi {
        return Err(fail(format!(
            "read {off}+{len}: returned {n}, expected {lo}..={hi}"
        )));
    }
    for (i, &b) in data[..n].iter().enumerate() {
        let p = off + i as u64;
        let ok = m.bytes[p as usize].contains(&b)
            || pending.iter().any(|&(s, e, v)| s <= p && p < e && v == b);
        if !ok {
            return Err(fail(format!(
                "read {off}+{len}: byte {p} = {b:#x}, allowed {:?}",
                m.bytes[p as usize]
            )));
        }
    }
    Ok(())
}

/// An owned buffer for `len` bytes at file offset `off`: at the offset's phase
/// within a 4 KiB page when `skew` is 0, else `skew` bytes past it.
fn window(off: u64, len: u64, skew: usize) -> Window<AlignedBuf> {
    let phase = (off % 4096) as usize + skew;
    Window::new(
        AlignedBuf::new(phase + len as usize, 4096),
        phase,
        len as usize,
    )
    .unwrap()
}

fn run_batches(file: &DirectFile, batches: Vec<Batch>) -> Result<(), TestCaseError> {
    let mut m = Model::new((SPAN + 200_000) as usize);
    for b in batches {
        let writes: Vec<(u64, u64, u8)> = b
            .ops
            .iter()
            .filter_map(|o| match *o {
                Op::Write { off, len, val } => Some((off, off + len, val)),
                Op::Read { .. } => None,
            })
            .collect();
        m.size_max = writes.iter().map(|w| w.1).fold(m.size, u64::max);
        if b.async_ {
            let futs: Vec<_> = b
                .ops
                .iter()
                .map(|o| match *o {
                    // With skew 0 the memory sits at the offset's phase (the
                    // zero-copy middle), otherwise anywhere (bounced).
                    Op::Write { off, len, val } => {
                        let mut w = window(off, len, b.skew);
                        w.as_mut_slice().fill(val);
                        (
                            o.clone(),
                            file.write_future(off, vec![w], U | Flags::ASYNC_EXTEND),
                        )
                    }
                    Op::Read { off, len } => (
                        o.clone(),
                        file.read_future(off, vec![window(off, len, b.skew)], U),
                    ),
                })
                .collect();
            for (o, f) in futs {
                let mut c = f.wait();
                match o {
                    Op::Write { off, len, .. } => {
                        let n = c
                            .result
                            .map_err(|e| fail(format!("write {off}+{len}: {e}")))?;
                        prop_assert_eq!(n as u64, len);
                    }
                    Op::Read { off, len } => {
                        let n = c
                            .result
                            .map_err(|e| fail(format!("read {off}+{len}: {e}")))?;
                        check_read(&m, off, len, &writes, n, c.bufs[0].as_mut_slice())?;
                    }
                }
            }
        } else {
            for o in &b.ops {
                let len = match *o {
                    Op::Write { len, .. } | Op::Read { len, .. } => len as usize,
                };
                let mut mem = vec![0u8; len + b.skew];
                let cut = if b.split { len / 3 } else { len };
                match *o {
                    Op::Write { off, val, .. } => {
                        mem[b.skew..].fill(val);
                        let (x, y) = mem[b.skew..].split_at(cut);
                        let n = file
                            .write(off, &[IoSlice::new(x), IoSlice::new(y)], U)
                            .map_err(|e| fail(format!("write {off}+{len}: {e}")))?;
                        prop_assert_eq!(n, len);
                        // Sync ops are ordered: apply at once.
                        for p in off..off + len as u64 {
                            m.bytes[p as usize] = vec![val];
                        }
                        m.size = m.size.max(off + len as u64);
                    }
                    Op::Read { off, .. } => {
                        let (x, y) = mem[b.skew..].split_at_mut(cut);
                        let n = file
                            .read(off, &mut [IoSliceMut::new(x), IoSliceMut::new(y)], U)
                            .map_err(|e| fail(format!("read {off}+{len}: {e}")))?;
                        check_read(&m, off, len as u64, &[], n, &mem[b.skew..])?;
                    }
                }
            }
        }
        if b.async_ {
            // Overlapping writes of one batch may land in any order, but each byte
            // ends as one of them (or what it was).
            for &(s, e, v) in &writes {
                for p in s..e {
                    let slot = &mut m.bytes[p as usize];
                    if !slot.contains(&v) {
                        slot.push(v);
                    }
                }
            }
            m.size = m.size_max;
            // Resolve the model by reading the file back, checking each byte.
            let mut all = AlignedBuf::new(m.size as usize, 4096);
            let n = file
                .read_at(0, &mut all, U)
                .map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(n as u64, m.size);
            for p in 0..n {
                let b = all[p];
                if !m.bytes[p].contains(&b) {
                    return Err(fail(format!(
                        "after batch byte {p} = {b:#x}, allowed {:?}",
                        m.bytes[p]
                    )));
                }
                m.bytes[p] = vec![b];
            }
        }
        m.size_max = m.size;
    }
    Ok(())
}

fn ram_file(seed: u64) -> (common::Rig, DirectFile) {
    let r = rig_with(
        MemDeviceConfig::new(4 << 20, 512).fill(STALE).threaded(
            Some(Duration::from_micros(3)),
            true,
            seed,
        ),
        TestMapConfig::new(4096, 1024),
        0,
    );
    let f = r.file.clone();
    (r, f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn unaligned_io_matches_model_on_ram_device(batches in prop::collection::vec(batch(), 1..12), seed in 1..500u64) {
        let (_rig, file) = ram_file(seed);
        run_batches(&file, batches)?;
    }
}

fn host_file() -> Option<(tempfile::TempDir, dio::RawFile)> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).ok()?;
    let path = dir.path().join("unaligned.img");
    std::fs::File::create(&path).ok()?.set_len(0).ok()?;
    let opts = dio::RawOptions {
        write: true,
        ..Default::default()
    };
    match dio::RawFile::open(&path, &opts) {
        Ok(f) => Some((dir, f)),
        Err(e) => {
            eprintln!("skipping: cannot open a host file for direct I/O: {e}");
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(24), ..ProptestConfig::default() })]

    #[test]
    fn unaligned_io_matches_model_on_host_file(batches in prop::collection::vec(batch(), 1..8)) {
        if let Some((_dir, raw)) = host_file() {
            run_batches(raw.direct(), batches)?;
        }
    }
}

/// Concurrent overlapping unaligned writes: every byte ends as one of the writers'
/// bytes for that position, and when a write reports success none of its bytes
/// holds a value from a write that had finished before it began.
fn stress(file: &DirectFile, threads: u64, per_thread: u64, region: u64) {
    let clock = Arc::new(AtomicU64::new(1));
    // value -> (start, end, range start, range end)
    type WriteLog = HashMap<u8, (u64, u64, u64, u64)>;
    let log: Arc<Mutex<WriteLog>> = Arc::new(Mutex::new(HashMap::new()));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (clock, log, file) = (clock.clone(), log.clone(), file.clone());
            s.spawn(move || {
                let mut rng = t * 7919 + 17;
                for i in 0..per_thread {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let off = rng % region;
                    let len = 1 + (rng >> 20) % 6000;
                    let mut val = (1 + t * per_thread + i) as u8;
                    if val == STALE {
                        val = 0xFF;
                    }
                    let start = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().insert(val, (start, u64::MAX, off, off + len));
                    let n = file.write_at(off, &vec![val; len as usize], U).unwrap();
                    assert_eq!(n as u64, len);
                    let mut back = vec![0u8; len as usize];
                    let got = file.read_at(off, &mut back, U).unwrap();
                    assert_eq!(got as u64, len);
                    {
                        let log = log.lock().unwrap();
                        for (k, &b) in back.iter().enumerate() {
                            if b == val {
                                continue;
                            }
                            let p = off + k as u64;
                            let (_, other_end, s0, e0) = *log.get(&b).unwrap_or_else(|| panic!("byte {p} = {b:#x}: never written"));
                            assert!(s0 <= p && p < e0, "byte {p} = {b:#x} from a write elsewhere");
                            assert!(other_end > start, "byte {p}: write {b:#x} finished before {val:#x} began, yet overwrote it");
                        }
                    }
                    let end = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().get_mut(&val).unwrap().1 = end;
                }
            });
        }
    });
    let log = log.lock().unwrap();
    let size = file.size() as usize;
    let mut all = vec![0u8; size];
    assert_eq!(file.read_at(0, &mut all, U).unwrap(), size);
    for (p, &b) in all.iter().enumerate() {
        let p = p as u64;
        let covered = log.values().any(|&(_, _, s, e)| s <= p && p < e);
        match log.get(&b) {
            Some(&(_, _, s, e)) => {
                assert!(s <= p && p < e, "byte {p} = {b:#x} from a write elsewhere")
            }
            None => assert!(b == 0 && !covered, "byte {p} = {b:#x} was never written"),
        }
    }
}

#[test]
fn concurrent_overlapping_unaligned_writes_lose_nothing_on_ram_device() {
    for seed in 1..4 {
        let (_rig, file) = ram_file(seed);
        stress(&file, 6, 40, 20000);
    }
}

#[test]
fn concurrent_overlapping_unaligned_writes_lose_nothing_on_host_file() {
    if let Some((_dir, raw)) = host_file() {
        stress(raw.direct(), 6, 40, 20000);
    }
}

#[test]
fn misaligned_memory_alone_is_bounced_without_read_modify_write() {
    let r = rig_with(
        MemDeviceConfig::new(1 << 20, 512).log(),
        TestMapConfig::new(4096, 256),
        0,
    );
    let data: Vec<u8> = (0..8193).map(|i| (i % 200) as u8 + 1).collect();
    // Aligned offset and length, memory off by one byte.
    let n = r.file.write_at(4096, &data[1..8193], U).unwrap();
    assert_eq!(n, 8192);
    assert!(
        r.dev.log().iter().all(|l| l.op == dio::Op::Write),
        "no read-modify-write reads: {:?}",
        r.dev.log()
    );
    let mut back = vec![0u8; 8193];
    assert_eq!(r.file.read_at(4096, &mut back[1..], U).unwrap(), 8192);
    assert_eq!(&back[1..], &data[1..]);
}

#[test]
fn unaligned_middle_goes_zero_copy_in_one_request() {
    let r = rig_with(
        MemDeviceConfig::new(8 << 20, 512).log(),
        TestMapConfig::new(4096, 2048),
        0,
    );
    r.map.map_written(0..512).unwrap();
    r.file.truncate(2 << 20).unwrap();
    r.dev.reset_stats();
    // 1 MiB at offset 100: head and tail bounced, middle straight from the buffer
    // (placed so its aligned part is memory-aligned).
    let mut mem = AlignedBuf::new((1 << 20) + 4096, 4096);
    let n = r
        .file
        .read_at(100, &mut mem[100..100 + (1 << 20)], U)
        .unwrap();
    assert_eq!(n, 1 << 20);
    let log = r.dev.log();
    assert_eq!(
        log.len(),
        2,
        "split only at the device's 1 MiB limit: {log:?}"
    );
}

#[test]
fn without_the_flag_misaligned_requests_are_still_einval() {
    let (_rig, file) = ram_file(1);
    let e = file.write_at(3, &[1, 2, 3], Flags::NONE).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
}
