//! Crash safety on the RAM device's crash mode: random writes (sync and async, fs
//! block, sector and byte aligned, into holes, preallocated and written blocks),
//! some with DSYNC, some followed by a flush, and crashes at random points. After
//! each crash, every byte whose last write completed with DSYNC (or was flushed
//! since) must read back as written.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dio::MemDeviceConfig;
use dio::{AlignedBuf, DirectFile, FileState, Flags, MemDevice, TestMap, TestMapConfig};
use dio_testkit::{pattern, Rng};

const SPAN: u64 = 1 << 20;

struct Figures {
    writes: u64,
    dsync_writes: u64,
    flushes: u64,
    crashes: u64,
    durable_bytes_checked: u64,
}

fn run(seed: u64, threaded: bool) -> Figures {
    let mut rng = Rng::new(seed);
    let mut cfg = MemDeviceConfig::new(4 << 20, 512).fill(0xAA).crash_mode();
    if threaded {
        cfg = cfg.threaded(Some(Duration::from_micros(20)), true, seed);
    }
    let dev = Arc::new(MemDevice::new(cfg));
    let map = Arc::new(TestMap::new(TestMapConfig::new(4096, 1024)));
    let file = DirectFile::new(dev.clone(), map.clone(), Arc::new(FileState::new(SPAN))).unwrap();
    // A third of the file written and flushed, a third preallocated, a third holes.
    let mut first = AlignedBuf::new((SPAN / 3) as usize / 4096 * 4096, 4096);
    pattern(&mut first, 1, 0);
    file.write_at(0, &first, Flags::NONE).unwrap();
    file.sync_data().unwrap();
    map.preallocate(SPAN / 3 / 4096..2 * SPAN / 3 / 4096)
        .unwrap();

    let mut model = vec![0u8; SPAN as usize];
    model[..first.len()].copy_from_slice(&first);
    let mut durable = vec![true; SPAN as usize];
    let mut f = Figures {
        writes: 0,
        dsync_writes: 0,
        flushes: 0,
        crashes: 0,
        durable_bytes_checked: 0,
    };
    for op in 2..1500u64 {
        match rng.below(100) {
            0..=84 => {
                let unit = [4096u64, 512, 1][rng.below(3) as usize];
                let len = (1 + rng.below(32 << 10)).div_ceil(unit) * unit;
                let off = rng.below(SPAN - len) / unit * unit;
                let mut data = AlignedBuf::new(len as usize, 4096);
                pattern(&mut data, op, off);
                let dsync = rng.percent(40);
                let mut flags = if dsync { Flags::DSYNC } else { Flags::NONE };
                if unit == 1 {
                    flags |= Flags::UNALIGNED;
                }
                let n = if rng.percent(50) {
                    file.write_future(off, vec![data.clone()], flags)
                        .wait()
                        .result
                } else {
                    file.write_at(off, &data, flags)
                }
                .unwrap();
                assert_eq!(n as u64, len);
                let r = off as usize..(off + len) as usize;
                model[r.clone()].copy_from_slice(&data);
                if dsync {
                    durable[r].fill(true);
                } else {
                    // The write may also have zeroed the rest of fresh blocks, and
                    // rewritten whole sectors: none of that is durable yet.
                    let a = (off / 4096 * 4096) as usize;
                    let b = ((off + len).div_ceil(4096) * 4096) as usize;
                    durable[a..b.min(SPAN as usize)].fill(false);
                }
                f.writes += 1;
                f.dsync_writes += u64::from(dsync);
            }
            85..=92 => {
                file.sync_data().unwrap();
                durable.fill(true);
                f.flushes += 1;
            }
            _ => {
                dev.crash();
                f.crashes += 1;
                let mut back = AlignedBuf::new(SPAN as usize, 4096);
                assert_eq!(
                    file.read_at(0, &mut back, Flags::NONE).unwrap() as u64,
                    SPAN
                );
                for i in 0..SPAN as usize {
                    if durable[i] {
                        f.durable_bytes_checked += 1;
                        assert_eq!(
                            back[i], model[i],
                            "seed {seed} op {op}: byte {i} was written durably ({:#04x}) but reads {:#04x} after the crash",
                            model[i], back[i]
                        );
                    }
                }
                // What survived is the file now, and it is all on the medium.
                model.copy_from_slice(&back);
                durable.fill(true);
            }
        }
    }
    f
}

#[test]
fn every_dsync_or_flushed_write_survives_a_crash() {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut all = Vec::new();
        for seed in 1..=6 {
            all.push(run(seed, seed % 2 == 0));
        }
        let _ = tx.send(all);
    });
    let all = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("crash runs finished in time (or one panicked)");
    let sum = |g: fn(&Figures) -> u64| all.iter().map(g).sum::<u64>();
    eprintln!(
        "crash: {} writes ({} dsync), {} flushes, {} crashes, {} durable bytes checked, 0 lost",
        sum(|f| f.writes),
        sum(|f| f.dsync_writes),
        sum(|f| f.flushes),
        sum(|f| f.crashes),
        sum(|f| f.durable_bytes_checked)
    );
    assert!(sum(|f| f.crashes) > 0);
}
