//! The fsx model run under the recorder: fsx sees no difference (its reads match
//! its model with the recorder in the stack), and after a final flush every
//! replayed state after the claim holds the file as fsx left it, every earlier one
//! passes the durability check.

mod common;

use std::sync::Arc;

use dio::fsx::{Options, Target};
use dio::{DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
use dio_crash::{run, Base, Checker, Log, ModelChecker, Recorder, ReplayOptions};

#[test]
fn fsx_on_ram_under_the_recorder_then_every_state_replays_clean() {
    let dir = common::scratch("fsx");
    let size = 2u64 << 20;
    let log_path = dir.join("log");
    // Threaded completions: requests of a batch complete out of order, so the log
    // holds writes that were in flight together.
    let mem = Arc::new(MemDevice::new(
        MemDeviceConfig::new(size, 512).threaded(None, true, 3),
    ));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let file = DirectFile::new(
        rec.clone(),
        Arc::new(IdentityMap::new(4096, size)),
        Arc::new(FileState::new(size)),
    )
    .unwrap();
    let target = Target::file("ram under the crash recorder", file, None, None);
    let ops = if common::long() { 20_000 } else { 1500 };
    let opts = Options::new(17).ops(ops).span(size);
    let report = dio::fsx::run(&target, &opts, &mut |_| {}).unwrap_or_else(|d| panic!("{d}"));
    assert!(report.ops >= ops);
    // As a command would end: flush, then the whole file is promised.
    let f = target.direct();
    f.sync_data().unwrap();
    let mut now = vec![0u8; size as usize];
    assert_eq!(
        f.read_at(0, &mut now, Flags::UNALIGNED).unwrap(),
        size as usize
    );
    rec.claim(0, &now).unwrap();
    let log = Arc::new(Log::open(&log_path).unwrap());
    let concurrent = log
        .records()
        .iter()
        .enumerate()
        .filter(|(i, r)| matches!(r, dio_crash::Record::Write(w) if w.submitted < *i as u64))
        .count();
    let opts = ReplayOptions {
        max_per_window: 4,
        max_states: Some(if common::long() { 20_000 } else { 600 }),
        seed: 2,
        ..ReplayOptions::default()
    };
    let model = ModelChecker::new();
    let checkers: Vec<&dyn Checker> = vec![&model];
    let sum = run(&log, Base::Zeros, &checkers, &opts, &dir.join("states")).unwrap();
    eprintln!(
        "fsx: {} ops, {} records ({} writes with other records completing while they were in flight), {} states, {} failed, {:.0} states/s",
        report.ops,
        sum.records,
        concurrent,
        sum.states,
        sum.failed,
        sum.rate()
    );
    assert!(concurrent > 0, "no writes were in flight together");
    assert!(sum.states >= 100);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}
