//! The fsx model run under the recorder: fsx sees no difference (its reads match
//! its model with the recorder in the stack), and after a final flush every
//! replayed state after the claim holds the file as fsx left it, every earlier one
//! passes the durability check.

mod common;

use std::sync::Arc;

use dio::{Device, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
use dio_crash::{run, Base, Checker, Log, ModelChecker, Recorder, ReplayOptions};
use dio_fsx::{Options, Target};

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
    let report = dio_fsx::run(&target, &opts, &mut |_| {}).unwrap_or_else(|d| panic!("{d}"));
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

fn fsx_ops() -> u64 {
    if common::long() {
        10_000
    } else {
        600
    }
}

#[test]
fn fsx_on_a_host_file_under_the_recorder_then_every_state_replays_clean() {
    let dir = common::scratch("fsx-host");
    let size = 1u64 << 20;
    let img = dir.join("file.bin");
    let mut rng = common::Rng::new(3);
    let base: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&img, &base).unwrap();
    std::fs::write(dir.join("base.bin"), &base).unwrap();
    let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
    let dev = dio::SyncDevice::new(f, geo, &dio::SyncConfig::default()).unwrap();
    let log_path = dir.join("log");
    let rec = Arc::new(Recorder::create(dev, &log_path).unwrap());
    let file = DirectFile::new(
        rec.clone(),
        Arc::new(IdentityMap::new(geo.logical_block, size)),
        Arc::new(FileState::new(size)),
    )
    .unwrap();
    let target = Target::file("host file under the crash recorder", file, None, None);
    let opts = Options::new(5).ops(fsx_ops()).span(size);
    dio_fsx::run(&target, &opts, &mut |_| {}).unwrap_or_else(|d| panic!("{d}"));
    let f = target.direct();
    f.sync_data().unwrap();
    let mut now = vec![0u8; size as usize];
    assert_eq!(
        f.read_at(0, &mut now, Flags::UNALIGNED).unwrap(),
        size as usize
    );
    rec.claim(0, &now).unwrap();
    let log = Arc::new(Log::open(&log_path).unwrap());
    let opts = ReplayOptions {
        max_per_window: 4,
        max_states: Some(if common::long() { 5000 } else { 300 }),
        seed: 4,
        ..ReplayOptions::default()
    };
    let model = ModelChecker::new();
    let sum = run(
        &log,
        Base::File(dir.join("base.bin")),
        &[&model],
        &opts,
        &dir.join("states"),
    )
    .unwrap();
    eprintln!(
        "fsx host: {} records, {} states, {} failed, {:.0} states/s",
        sum.records,
        sum.states,
        sum.failed,
        sum.rate()
    );
    assert!(sum.states >= 100);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}

#[test]
fn fsx_on_a_file_inside_ext4_under_the_recorder_passes_e2fsck_and_the_model() {
    use std::process::Command;
    if !dio_testkit::have("mkfs.ext4") {
        dio_testkit::skip("mkfs.ext4 is not installed");
        return;
    }
    let dir = common::scratch("fsx-ext");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/data.bin"), vec![0x11u8; 1 << 20]).unwrap();
    let img = dir.join("disk.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(dir.join("src"))
        .arg(&img)
        .arg("8M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::copy(&img, dir.join("base.img")).unwrap();
    let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
    let dev = dio::SyncDevice::new(f, geo, &dio::SyncConfig::default()).unwrap();
    let log_path = dir.join("log");
    let rec = Arc::new(Recorder::create(dev, &log_path).unwrap());
    let fs = dio::ext::Ext::open_writable(rec.clone(), geo.size).unwrap();
    let inode = fs.lookup(b"/data.bin", true).unwrap();
    let file = fs.open_file(&inode).unwrap();
    let extents = fs.extents(&inode).unwrap();
    let bs = u64::from(fs.block_size());
    let target = Target::file(
        "ext4 file under the crash recorder",
        file.overwriter().unwrap(),
        None,
        None,
    );
    let opts = Options::new(6).ops(fsx_ops()).span(1 << 20);
    dio_fsx::run(&target, &opts, &mut |_| {}).unwrap_or_else(|d| panic!("{d}"));
    file.touch().unwrap();
    rec.flush().unwrap();
    // The file as fsx left it, claimed where its blocks are.
    let mut now = vec![0u8; 1 << 20];
    assert_eq!(file.read_at(0, &mut now).unwrap(), 1 << 20);
    for e in &extents {
        let (lo, hi) = (e.logical * bs, ((e.logical + e.len) * bs).min(1 << 20));
        if lo < hi {
            rec.claim(e.physical * bs, &now[lo as usize..hi as usize])
                .unwrap();
        }
    }
    let log = Arc::new(Log::open(&log_path).unwrap());
    let opts = ReplayOptions {
        max_per_window: 4,
        max_states: Some(if common::long() { 2000 } else { 40 }),
        seed: 5,
        // The journal sets and clears needs_recovery in the 1 KiB superblock,
        // which ext4 counts on being written whole (4 KiB physical sectors).
        atomic_unit: 4096,
        ..ReplayOptions::default()
    };
    let model = ModelChecker::new();
    let e2fsck = dio_crash::E2fsckChecker;
    let sum = run(
        &log,
        Base::File(dir.join("base.img")),
        &[&model, &e2fsck],
        &opts,
        &dir.join("states"),
    )
    .unwrap();
    eprintln!(
        "fsx ext4: {} records, {} states, {} failed, {:.1} states/s, skipped {:?}",
        sum.records,
        sum.states,
        sum.failed,
        sum.rate(),
        sum.skipped
    );
    assert!(sum.states >= 20);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}
