//! The crash model on hand-written logs: what is durable, what a flush covers,
//! which of two overlapping writes lands last, torn writes, the plan's states.

mod common;

use std::path::Path;
use std::sync::Arc;

use dio_crash::log::{Entry, Header, LogWriter};
use dio_crash::{Base, Kept, Log, ReplayOptions, Replayer, StateSpec};

const SIZE: u64 = 64 << 10;

fn write(log: &LogWriter, submitted: u64, offset: u64, fua: bool, byte: u8, len: usize) {
    log.append(&Entry::Write {
        submitted,
        offset,
        fua,
        failed: false,
        data: &vec![byte; len],
    })
    .unwrap();
}

fn open(path: &Path) -> Arc<Log> {
    Arc::new(Log::open(path).unwrap())
}

fn new_log(dir: &Path) -> LogWriter {
    LogWriter::create(
        dir.join("log"),
        Header {
            logical_block: 512,
            device_size: SIZE,
        },
    )
    .unwrap()
}

fn byte_at(rep: &mut Replayer, spec: &str, at: u64) -> u8 {
    let view = rep.state(&spec.parse::<StateSpec>().unwrap()).unwrap();
    let mut b = [0u8; 1];
    view.read_at(at, &mut b).unwrap();
    b[0]
}

#[test]
fn durability_flush_coverage_and_landing_order() {
    let dir = common::scratch("model-order");
    let log = new_log(&dir);
    write(&log, 0, 0, false, 1, 1024); // 0: volatile until the flush
    log.append(&Entry::Flush { covers: 1 }).unwrap(); // 1: covers record 0
    write(&log, 2, 0, false, 2, 512); // 2: overwrites sector 0, never flushed
    write(&log, 2, 512, false, 3, 512); // 3: issued after records 0 and 1 completed
    write(&log, 4, 4096, false, 4, 512); // 4: A
    write(&log, 4, 4096, false, 5, 512); // 5: B, in flight with A (submitted before A completed)
    write(&log, 6, 4096, true, 6, 512); // 6: FUA over the same sector, issued after both
    write(&log, 7, 8192, false, 7, 2048); // 7: four sectors, never durable
    drop(log);
    let log = open(&dir.join("log"));
    let mut rep = Replayer::new(Arc::clone(&log), Base::Zeros, &dir).unwrap();
    // Before the flush, record 0 may be missing; after it, it is there.
    assert_eq!(byte_at(&mut rep, "1:0", 0), 0);
    assert_eq!(byte_at(&mut rep, "1:0:0", 0), 1);
    assert_eq!(byte_at(&mut rep, "2:0", 600), 1);
    // Record 2 landed or not.
    assert_eq!(byte_at(&mut rep, "3:0", 0), 1);
    assert_eq!(byte_at(&mut rep, "3:0:2", 0), 2);
    // A completed record cannot be kept where it is durable, nor an unissued one.
    for bad in ["3:0:0", "3:0:7"] {
        assert!(rep.state(&bad.parse().unwrap()).is_err(), "{bad}");
    }
    // A and B in flight together: with both landed, either may win, by seed.
    let mut seen = [false; 2];
    for seed in 0..64 {
        let mut rep = Replayer::new(Arc::clone(&log), Base::Zeros, &dir).unwrap();
        let b = byte_at(&mut rep, &format!("6:{seed}:4,5"), 4096);
        assert!(b == 4 || b == 5);
        seen[usize::from(b - 4)] = true;
        // The FUA write issued after both completed always wins once durable.
        assert_eq!(byte_at(&mut rep, &format!("8:{seed}:4,5"), 4096), 6);
    }
    assert!(seen[0] && seen[1], "both landing orders occur");
    // Torn: sectors 1 and 3 of record 7 only.
    let mut rep = Replayer::new(Arc::clone(&log), Base::Zeros, &dir).unwrap();
    let spec = StateSpec {
        at: 8,
        seed: 0,
        kept: vec![Kept {
            record: 7,
            sectors: Some(vec![(1, 2), (3, 4)]),
        }],
    };
    assert_eq!(spec.to_string(), "8:0:7/1-2.3-4");
    let view = rep.state(&spec).unwrap();
    let mut b = vec![0u8; 2048];
    view.read_at(8192, &mut b).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0));
    assert!(b[512..1024].iter().all(|&x| x == 7));
    assert!(b[1024..1536].iter().all(|&x| x == 0));
    assert!(b[1536..].iter().all(|&x| x == 7));
}

#[test]
fn the_plan_covers_every_barrier_and_respects_its_bounds() {
    let dir = common::scratch("model-plan");
    let log = new_log(&dir);
    let mut n = 0u64;
    for k in 0..30u64 {
        for j in 0..5u64 {
            write(&log, n, (k * 5 + j) * 1024 % SIZE, false, k as u8, 1024);
            n += 1;
        }
        log.append(&Entry::Flush { covers: n }).unwrap();
        n += 1;
    }
    drop(log);
    let log = open(&dir.join("log"));
    let opts = ReplayOptions {
        max_per_window: 6,
        ..ReplayOptions::default()
    };
    let plan = dio_crash::plan_for(&log, &opts);
    // The durable prefix right after each of the 30 flushes (and the start).
    for k in 0..30u64 {
        let after = (k + 1) * 6;
        assert!(
            plan.iter().any(|s| s.at == after && s.kept.is_empty()),
            "after flush {k}"
        );
    }
    assert!(plan.iter().any(|s| s.at == 0));
    assert!(plan.len() <= 31 * 6);
    assert!(
        plan.iter()
            .any(|s| s.kept.iter().any(|k| k.sectors.is_some())),
        "some torn"
    );
    assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
    let capped = dio_crash::plan_for(
        &log,
        &ReplayOptions {
            max_states: Some(20),
            ..opts.clone()
        },
    );
    assert_eq!(capped.len(), 20);
    let again = dio_crash::plan_for(&log, &opts);
    assert_eq!(plan, again, "the same seed, the same plan");
    let other = dio_crash::plan_for(&log, &ReplayOptions { seed: 9, ..opts });
    assert_ne!(plan, other);
}
