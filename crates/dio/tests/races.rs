//! Races, repeatable by seed (the seed fixes every offset, length and the device's
//! completion shuffle; thread timing still varies): truncate during in-flight direct
//! reads and writes, readers of a hole being filled (LTP dio_sparse), an appender
//! and EOF readers (LTP dio_append), concurrent sub-block writes into one block, and
//! concurrent async writes to disjoint ranges. The RAM device is pre-filled with
//! 0xAA, so any stale byte shows.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use common::{bounded, rig_with, Rig, STALE};
use dio::MemDeviceConfig;
use dio::Private;
use dio::{AlignedBuf, BlockMap, DirectFile, Extent, FileState, Flags, MemDevice, Op};
use dio::{TestMap, TestMapConfig};
use dio_testkit::{pattern, Rng};

const SEEDS: [u64; 4] = [1, 2, 3, 0xD10];

/// The bytes of the idempotent pattern at `off`: a function of the offset only.
fn fixed(off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    pattern(&mut v, 0, off);
    v
}

fn aligned(data: &[u8]) -> AlignedBuf {
    AlignedBuf::from_slice(data, 4096)
}

fn threaded_rig(seed: u64, latency_us: u64, size: u64) -> Rig {
    rig_with(
        MemDeviceConfig::new(8 << 20, 512).fill(STALE).threaded(
            Some(Duration::from_micros(latency_us)),
            true,
            seed,
        ),
        TestMapConfig::new(4096, 2048),
        size,
    )
}

/// Every byte read is the pattern at its offset or zero; never 0xAA.
fn check_fixed_or_zero(what: &str, off: u64, got: &[u8]) {
    let want = fixed(off, got.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i] && got[i] != 0) {
        panic!(
            "{what}: byte {} is {:#04x}, expected {:#04x} or 0{}",
            off + i as u64,
            got[i],
            want[i],
            if got[i] == STALE { " (stale 0xAA)" } else { "" }
        );
    }
}

/// A test map that records, when truncate reaches it, how much direct I/O was
/// still in flight.
struct Watch {
    inner: TestMap,
    state: Mutex<Option<(Arc<FileState>, Arc<MemDevice>)>>,
    seen: AtomicU64,
    truncates: AtomicU64,
}

impl BlockMap for Watch {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn map(&self, block: u64, max: u64, create: bool) -> dio::Result<Extent> {
        self.inner.map(block, max, create)
    }
    fn end_io(
        &self,
        op: Op,
        offset: u64,
        result: dio::Result<usize>,
        private: Option<&Private>,
    ) -> dio::Result<usize> {
        self.inner.end_io(op, offset, result, private)
    }
    fn truncate(&self, size: u64) -> dio::Result<()> {
        if let Some((st, dev)) = &*self.state.lock().unwrap() {
            self.seen
                .fetch_add(st.dio_count() + dev.in_flight(), Ordering::SeqCst);
        }
        self.truncates.fetch_add(1, Ordering::SeqCst);
        self.inner.truncate(size)
    }
}

#[test]
fn truncate_waits_for_in_flight_async_reads_and_writes() {
    for seed in SEEDS {
        bounded(60, move || {
            let mut rng = Rng::new(seed);
            let dev = Arc::new(MemDevice::new(
                MemDeviceConfig::new(8 << 20, 512).fill(STALE).threaded(
                    Some(Duration::from_micros(500)),
                    true,
                    seed,
                ),
            ));
            let map = Arc::new(Watch {
                inner: TestMap::new(TestMapConfig::new(4096, 2048)),
                state: Mutex::new(None),
                seen: AtomicU64::new(0),
                truncates: AtomicU64::new(0),
            });
            let state = Arc::new(FileState::new(0));
            *map.state.lock().unwrap() = Some((state.clone(), dev.clone()));
            let file = DirectFile::new(dev.clone(), map.clone(), state).unwrap();
            let span = 1u64 << 20;
            file.write_at(0, &aligned(&fixed(0, span as usize)), Flags::NONE)
                .unwrap();
            // Reads of the first half, new data into the second half, all in flight
            // when truncate cuts into the second half.
            let mut model = fixed(0, span as usize);
            let mut reads = Vec::new();
            let mut writes = Vec::new();
            for i in 0..24u64 {
                let len = 512 * (1 + rng.below(64));
                if i % 2 == 0 {
                    let off = rng.below(span / 2 - len) / 512 * 512;
                    let f = file.read_future(
                        off,
                        vec![AlignedBuf::new(len as usize, 512)],
                        Flags::NONE,
                    );
                    reads.push((off, len, f));
                } else {
                    let slot = span / 2 + (i / 2) * (span / 32);
                    let len = len.min(span / 32);
                    let mut data = vec![0; len as usize];
                    pattern(&mut data, seed * 100 + i, slot);
                    model[slot as usize..(slot + len) as usize].copy_from_slice(&data);
                    let f = file.write_future(slot, vec![aligned(&data)], Flags::NONE);
                    writes.push((slot, len, f));
                }
            }
            let cut = span / 2 + rng.below(span / 2);
            file.truncate(cut).unwrap();
            assert_eq!(map.truncates.load(Ordering::SeqCst), 1);
            assert_eq!(
                map.seen.load(Ordering::SeqCst),
                0,
                "seed {seed}: truncate reached the map with direct I/O in flight"
            );
            for (off, len, f) in reads {
                let c = f.wait();
                assert_eq!(
                    c.result.unwrap() as u64,
                    len,
                    "seed {seed}: read {off}+{len}"
                );
                assert_eq!(&c.bufs[0][..], &model[off as usize..(off + len) as usize]);
            }
            for (off, len, f) in writes {
                assert_eq!(
                    f.wait().result.unwrap() as u64,
                    len,
                    "seed {seed}: write {off}"
                );
            }
            assert_eq!(file.size(), cut);
            // Grow again: everything past the cut reads as zeros.
            file.truncate(span).unwrap();
            let mut back = AlignedBuf::new(span as usize, 4096);
            assert_eq!(
                file.read_at(0, &mut back, Flags::NONE).unwrap() as u64,
                span
            );
            model[cut as usize..].fill(0);
            if let Some(i) = (0..span as usize).find(|&i| back[i] != model[i]) {
                panic!(
                    "seed {seed}: byte {i} is {:#04x}, expected {:#04x} (cut at {cut})",
                    back[i], model[i]
                );
            }
        });
    }
}

#[test]
fn truncates_racing_sync_readers_and_writers_show_only_data_or_zeros() {
    for seed in SEEDS {
        bounded(60, move || {
            let r = threaded_rig(seed, 50, 0);
            let file = r.file.clone();
            let span = 512u64 << 10;
            let stop = Arc::new(AtomicBool::new(false));
            let mut workers = Vec::new();
            for t in 0..3u64 {
                let file = file.clone();
                let stop = stop.clone();
                workers.push(thread::spawn(move || {
                    let mut rng = Rng::new(seed * 31 + t);
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) || n < 50 {
                        n += 1;
                        let unit = [512u64, 4096, 1][rng.below(3) as usize];
                        let len = (1 + rng.below(32 << 10)).div_ceil(unit) * unit;
                        let off = rng.below(span - len) / unit * unit;
                        let flags = if unit == 1 {
                            Flags::UNALIGNED
                        } else {
                            Flags::NONE
                        } | if rng.percent(50) {
                            Flags::LOCKING
                        } else {
                            Flags::NONE
                        };
                        if t == 0 {
                            // The writer: the same bytes at the same offsets, always.
                            let data = aligned(&fixed(off, len as usize));
                            let w = file.write_at(off, &data, flags).unwrap();
                            assert_eq!(w as u64, len);
                        } else {
                            let mut b = AlignedBuf::new(len as usize, 4096);
                            let got = file.read_at(off, &mut b, flags).unwrap();
                            assert!(got as u64 <= len);
                            check_fixed_or_zero(&format!("seed {seed}"), off, &b[..got]);
                        }
                    }
                    n
                }));
            }
            let mut rng = Rng::new(seed);
            for _ in 0..200 {
                let to = rng.below(span);
                file.truncate(to).unwrap();
                thread::sleep(Duration::from_micros(200));
            }
            stop.store(true, Ordering::SeqCst);
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(file.state().dio_count(), 0);
        });
    }
}

#[test]
fn readers_of_a_hole_being_filled_see_zeros_or_new_data_dio_sparse() {
    for seed in SEEDS {
        for async_writes in [false, true] {
            bounded(60, move || {
                let span = 1u64 << 20;
                let r = threaded_rig(seed, 20, span);
                let file = r.file.clone();
                let done = Arc::new(AtomicBool::new(false));
                let mut readers = Vec::new();
                for t in 0..2u64 {
                    let file = file.clone();
                    let done = done.clone();
                    readers.push(thread::spawn(move || {
                        let mut rng = Rng::new(seed ^ (t + 7));
                        let mut reads = 0u64;
                        // At least one read, however fast the writer is.
                        while reads == 0 || !done.load(Ordering::SeqCst) {
                            let len = 512 * (1 + rng.below(256));
                            let off = rng.below(span - len) / 512 * 512;
                            let mut b = AlignedBuf::new(len as usize, 512);
                            let got = file.read_at(off, &mut b, Flags::NONE).unwrap();
                            assert_eq!(got as u64, len, "reads inside i_size are whole");
                            check_fixed_or_zero(&format!("seed {seed} reader"), off, &b);
                            reads += 1;
                        }
                        reads
                    }));
                }
                // The writer fills the hole front to back in pieces of mixed
                // alignment.
                let mut rng = Rng::new(seed);
                let mut off = 0u64;
                let mut futs = Vec::new();
                while off < span {
                    let unit = [512u64, 4096, 1][rng.below(3) as usize];
                    let len = ((1 + rng.below(24 << 10)).div_ceil(unit) * unit).min(span - off);
                    let flags = if unit == 1 || len % 512 != 0 || off % 512 != 0 {
                        Flags::UNALIGNED
                    } else {
                        Flags::NONE
                    };
                    let data = aligned(&fixed(off, len as usize));
                    if async_writes {
                        futs.push((len, file.write_future(off, vec![data], flags)));
                        if futs.len() >= 8 {
                            let (l, f) = futs.remove(0);
                            assert_eq!(f.wait().result.unwrap() as u64, l);
                        }
                    } else {
                        assert_eq!(file.write_at(off, &data, flags).unwrap() as u64, len);
                    }
                    off += len;
                }
                for (l, f) in futs {
                    assert_eq!(f.wait().result.unwrap() as u64, l);
                }
                done.store(true, Ordering::SeqCst);
                for h in readers {
                    assert!(h.join().unwrap() > 0);
                }
                let mut b = AlignedBuf::new(span as usize, 4096);
                file.read_at(0, &mut b, Flags::NONE).unwrap();
                assert!(
                    b[..] == fixed(0, span as usize)[..],
                    "seed {seed}: final contents"
                );
            });
        }
    }
}

#[test]
fn eof_readers_never_see_past_what_the_appender_wrote_dio_append() {
    for seed in SEEDS {
        bounded(60, move || {
            let r = threaded_rig(seed, 20, 0);
            let file = r.file.clone();
            let limit = 2u64 << 20;
            let done = Arc::new(AtomicBool::new(false));
            let mut readers = Vec::new();
            for t in 0..2u64 {
                let file = file.clone();
                let done = done.clone();
                readers.push(thread::spawn(move || {
                    let mut rng = Rng::new(seed * 3 + t);
                    let mut seen = 0u64;
                    while !done.load(Ordering::SeqCst) {
                        let size = file.size();
                        // Straddle EOF: some bytes below it, some past it.
                        let back = rng.below(16 << 10).min(size) / 512 * 512;
                        let off = size / 512 * 512 - back.min(size / 512 * 512);
                        let len = back + 512 * (1 + rng.below(32));
                        let mut b = AlignedBuf::new(len as usize, 512);
                        let flags = if t == 0 { Flags::LOCKING } else { Flags::NONE };
                        let got = file.read_at(off, &mut b, flags).unwrap();
                        let now = file.size();
                        assert!(
                            off + got as u64 <= now,
                            "seed {seed}: read {off}+{len} returned {got}, size {now}"
                        );
                        // Everything under i_size was written: no zeros, no 0xAA.
                        let want = fixed(off, got);
                        if let Some(i) = (0..got).find(|&i| b[i] != want[i]) {
                            panic!(
                                "seed {seed}: byte {} is {:#04x}, appended {:#04x}",
                                off + i as u64,
                                b[i],
                                want[i]
                            );
                        }
                        seen = seen.max(off + got as u64);
                    }
                    seen
                }));
            }
            let mut rng = Rng::new(seed);
            let mut size = 0u64;
            while size < limit {
                let len = if rng.percent(30) {
                    1 + rng.below(5000)
                } else {
                    512 * (1 + rng.below(32))
                };
                let data = aligned(&fixed(size, len as usize));
                let flags = if size % 512 != 0 || len % 512 != 0 {
                    Flags::UNALIGNED
                } else {
                    Flags::NONE
                };
                assert_eq!(file.write_at(size, &data, flags).unwrap() as u64, len);
                size += len;
                assert_eq!(file.size(), size);
            }
            done.store(true, Ordering::SeqCst);
            for h in readers {
                h.join().unwrap();
            }
        });
    }
}

#[test]
fn concurrent_sub_block_writes_into_one_new_block_keep_every_writer_s_bytes() {
    for seed in SEEDS {
        bounded(60, move || {
            let r = threaded_rig(seed, 30, 64 << 10);
            let file = r.file.clone();
            let map = r.map.clone();
            let threads = 6usize;
            let rounds = 40u64;
            let barrier = Arc::new(Barrier::new(threads + 1));
            // Each round: the slices of blocks 1 and 2 (one fresh block each round,
            // plus one straddling slice), cut at seeded byte or sector boundaries.
            let cuts: Arc<Vec<Vec<u64>>> = Arc::new(
                (0..rounds)
                    .map(|round| {
                        let mut rng = Rng::new(seed * 1000 + round);
                        let sector = round % 2 == 0;
                        let mut c: Vec<u64> = (1..threads)
                            .map(|_| {
                                let x = 4096 + rng.below(8192);
                                if sector {
                                    x / 512 * 512
                                } else {
                                    x
                                }
                            })
                            .collect();
                        c.push(4096);
                        c.push(12288);
                        c.sort_unstable();
                        c.dedup();
                        c
                    })
                    .collect(),
            );
            let mut hs = Vec::new();
            for t in 0..threads {
                let file = file.clone();
                let barrier = barrier.clone();
                let cuts = cuts.clone();
                hs.push(thread::spawn(move || {
                    for round in 0..rounds {
                        barrier.wait();
                        let c = &cuts[round as usize];
                        if t + 1 < c.len() {
                            let (a, b) = (c[t], c[t + 1]);
                            let mut data = vec![0; (b - a) as usize];
                            pattern(&mut data, round * 100 + t as u64, a);
                            let flags = if a % 512 != 0 || b % 512 != 0 {
                                Flags::UNALIGNED
                            } else {
                                Flags::NONE
                            };
                            let n = if round % 3 == 0 {
                                file.write_future(a, vec![aligned(&data)], flags)
                                    .wait()
                                    .result
                            } else {
                                file.write_at(a, &aligned(&data), flags)
                            };
                            assert_eq!(n.unwrap() as u64, b - a);
                        }
                        barrier.wait();
                    }
                }));
            }
            for round in 0..rounds {
                // Fresh blocks for every round: the writes zero what they do not cover.
                map.punch(1..3);
                barrier.wait();
                barrier.wait();
                let c = &cuts[round as usize];
                let mut back = AlignedBuf::new(8192, 4096);
                assert_eq!(file.read_at(4096, &mut back, Flags::NONE).unwrap(), 8192);
                for t in 0..c.len() - 1 {
                    let (a, b) = (c[t], c[t + 1]);
                    let mut want = vec![0; (b - a) as usize];
                    pattern(&mut want, round * 100 + t as u64, a);
                    let got = &back[(a - 4096) as usize..(b - 4096) as usize];
                    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                        panic!(
                            "seed {seed} round {round}: writer {t}'s byte {} is {:#04x}, wrote {:#04x}",
                            a + i as u64,
                            got[i],
                            want[i]
                        );
                    }
                }
            }
            for h in hs {
                h.join().unwrap();
            }
        });
    }
}

#[test]
fn concurrent_async_writes_to_disjoint_ranges_all_land() {
    for seed in SEEDS {
        bounded(60, move || {
            let r = threaded_rig(seed, 100, 0);
            let file = r.file.clone();
            let span = 2u64 << 20;
            let mut rng = Rng::new(seed);
            // Disjoint ranges of mixed alignment, some sharing fs blocks, many past
            // EOF (async extension allowed), all in flight at once from two threads.
            let mut cuts: Vec<u64> = (0..120).map(|_| rng.below(span)).collect();
            cuts.push(0);
            cuts.push(span);
            cuts.sort_unstable();
            cuts.dedup();
            let ranges: Vec<(u64, u64)> = cuts
                .windows(2)
                .enumerate()
                .filter(|(i, _)| i % 3 != 2) // leave some holes
                .map(|(_, w)| (w[0], w[1]))
                .collect();
            let ranges = Arc::new(ranges);
            let mut hs = Vec::new();
            for t in 0..2usize {
                let file = file.clone();
                let ranges = ranges.clone();
                hs.push(thread::spawn(move || {
                    let mut futs = Vec::new();
                    for (i, &(a, b)) in ranges.iter().enumerate().filter(|(i, _)| i % 2 == t) {
                        let data = aligned(&fixed(a, (b - a) as usize));
                        let mut flags = Flags::ASYNC_EXTEND;
                        if a % 512 != 0 || b % 512 != 0 {
                            flags |= Flags::UNALIGNED;
                        }
                        if i % 5 == 0 {
                            flags |= Flags::DSYNC;
                        }
                        futs.push((a, b, file.write_future(a, vec![data], flags)));
                    }
                    for (a, b, f) in futs {
                        assert_eq!(f.wait().result.unwrap() as u64, b - a, "write {a}..{b}");
                    }
                }));
            }
            for h in hs {
                h.join().unwrap();
            }
            let end = ranges.iter().map(|r| r.1).max().unwrap();
            assert_eq!(file.size(), end, "seed {seed}: size is the furthest end");
            let mut want = vec![0u8; end as usize];
            for &(a, b) in ranges.iter() {
                want[a as usize..b as usize].copy_from_slice(&fixed(a, (b - a) as usize));
            }
            let mut back = AlignedBuf::new(end.div_ceil(512) as usize * 512, 4096);
            assert_eq!(file.read_at(0, &mut back, Flags::NONE).unwrap() as u64, end);
            if let Some(i) = (0..end as usize).find(|&i| back[i] != want[i]) {
                panic!(
                    "seed {seed}: byte {i} is {:#04x}, expected {:#04x}",
                    back[i], want[i]
                );
            }
        });
    }
}

/// A map whose truncate stops halfway until the test lets it go.
struct StallTruncate {
    inner: dio::IdentityMap,
    entered: Barrier,
    release: Barrier,
}

impl BlockMap for StallTruncate {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn map(&self, block: u64, max_blocks: u64, create: bool) -> dio::Result<Extent> {
        self.inner.map(block, max_blocks, create)
    }
    fn truncate(&self, _size: u64) -> dio::Result<()> {
        self.entered.wait();
        self.release.wait();
        Ok(())
    }
}

/// A call that starts while truncate is dropping blocks, without the file lock,
/// waits for it and then sees the new size (LTP dio_truncate: it must not map a
/// block truncate is freeing); with NOWAIT it returns WouldBlock at once.
#[test]
fn calls_starting_during_truncate_wait_for_it_and_see_the_new_size() {
    bounded(60, || {
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
        let map = Arc::new(StallTruncate {
            inner: dio::IdentityMap::new(4096, 1 << 20),
            entered: Barrier::new(2),
            release: Barrier::new(2),
        });
        let file = DirectFile::new(dev, map.clone(), Arc::new(FileState::new(64 << 10))).unwrap();
        let truncator = {
            let file = file.clone();
            thread::spawn(move || file.truncate(4096).unwrap())
        };
        map.entered.wait();
        let mut b = AlignedBuf::new(4096, 4096);
        assert!(matches!(
            file.read_at(8192, &mut b, Flags::NOWAIT),
            Err(dio::Error::WouldBlock)
        ));
        let started = Arc::new(Barrier::new(2));
        let reader = {
            let (file, started) = (file.clone(), started.clone());
            thread::spawn(move || {
                let mut b = AlignedBuf::new(4096, 4096);
                started.wait();
                file.read_at(8192, &mut b, Flags::NONE).unwrap()
            })
        };
        started.wait();
        thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "a read ran during truncate");
        map.release.wait();
        truncator.join().unwrap();
        // Offset 8192 is past the new size: the read sampled i_size after truncate.
        assert_eq!(reader.join().unwrap(), 0);
        assert_eq!(file.state().dio_count(), 0);
    });
}

/// Chains of async reads, each started from the previous one's completion callback
/// on the device's completion thread, while truncate runs again and again: a call
/// that meets a truncate must not block that thread (the truncate waits for the
/// thread's other completions), so none hangs and every read completes whole.
#[test]
fn async_calls_started_from_callbacks_during_truncate_neither_hang_nor_fail() {
    bounded(60, || {
        let r = threaded_rig(9, 100, 0);
        let file = r.file.clone();
        let span = 1u64 << 20;
        file.write_at(0, &aligned(&fixed(0, span as usize)), Flags::NONE)
            .unwrap();
        let finished = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(Mutex::new(Vec::<String>::new()));
        const CHAINS: u64 = 6;
        const LINKS: u64 = 150;
        fn link(
            file: DirectFile,
            chain: u64,
            n: u64,
            finished: Arc<AtomicU64>,
            bad: Arc<Mutex<Vec<String>>>,
        ) {
            let off = ((chain * 7919 + n * 104729) % 256) * 4096;
            let f2 = file.clone();
            file.read_async(
                off,
                vec![AlignedBuf::new(4096, 4096)],
                Flags::NONE,
                move |c| {
                    match c.result {
                        Ok(4096) if c.bufs[0][..] == fixed(off, 4096)[..] => {}
                        other => bad
                            .lock()
                            .unwrap()
                            .push(format!("chain {chain} link {n} at {off}: {other:?}")),
                    }
                    if n + 1 < LINKS {
                        link(f2, chain, n + 1, finished, bad);
                    } else {
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                },
            );
        }
        for chain in 0..CHAINS {
            link(file.clone(), chain, 0, finished.clone(), bad.clone());
        }
        let mut truncates = 0;
        while finished.load(Ordering::SeqCst) < CHAINS {
            file.truncate(span).unwrap();
            truncates += 1;
            thread::sleep(Duration::from_micros(300));
        }
        assert!(
            truncates > 10,
            "only {truncates} truncates overlapped the chains"
        );
        let bad = bad.lock().unwrap();
        assert!(bad.is_empty(), "{} bad reads, first: {}", bad.len(), bad[0]);
        assert_eq!(file.state().dio_count(), 0);
    });
}
