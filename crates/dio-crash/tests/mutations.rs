//! The harness must pass clean workloads in every state and catch broken
//! durability: a dropped flush after a dsync write into new blocks, and a write
//! acknowledged before it is written.

mod common;

use std::sync::Arc;

use common::{raw_workload, scratch, DropFlush, EarlyAck, Rng, StripFua};
use dio::{
    BlockMap, Device, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig,
    SyncConfig, SyncDevice, TestMap, TestMapConfig,
};
use dio_crash::{run, Base, Checker, Log, ModelChecker, Recorder, ReplayOptions, Summary};

const SIZE: u64 = 4 << 20;

fn opts(seed: u64) -> ReplayOptions {
    ReplayOptions {
        max_per_window: if common::long() { 64 } else { 8 },
        seed,
        ..ReplayOptions::default()
    }
}

fn replay_model(log_path: &std::path::Path, base: Base, seed: u64) -> Summary {
    let log = Arc::new(Log::open(log_path).unwrap());
    let model = ModelChecker::new();
    let checkers: Vec<&dyn Checker> = vec![&model];
    let dir = log_path.parent().unwrap().join("states");
    let sum = run(&log, base, &checkers, &opts(seed), &dir).unwrap();
    eprintln!(
        "{}: {} records, {} states, {} failed, {:.0} states/s",
        log_path.display(),
        sum.records,
        sum.states,
        sum.failed,
        sum.rate()
    );
    sum
}

fn identity_file(dev: Arc<dyn Device>, block: u32) -> DirectFile {
    let size = dev.geometry().size;
    DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(block, size)),
        Arc::new(FileState::new(size)),
    )
    .unwrap()
}

#[test]
fn clean_dsync_and_fsync_workload_on_ram_passes_every_state() {
    let dir = scratch("clean-mem");
    let ops = if common::long() { 2000 } else { 150 };
    for seed in [1u64, 2] {
        let log_path = dir.join(format!("log{seed}"));
        let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512)));
        let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
        let file = identity_file(rec.clone(), 4096);
        let model = raw_workload(&rec, &file, seed, ops, vec![0; SIZE as usize]);
        // The recorder passed every byte through.
        assert!(mem.read_raw(0, SIZE as usize) == model);
        let sum = replay_model(&log_path, Base::Zeros, seed);
        assert!(sum.states > 100, "only {} states", sum.states);
        assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
    }
}

#[test]
fn clean_workload_on_a_host_file_passes_every_state() {
    let dir = scratch("clean-host");
    let img = dir.join("disk.img");
    let mut rng = Rng::new(9);
    let base: Vec<u8> = (0..SIZE).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&img, &base).unwrap();
    let base_copy = dir.join("base.img");
    std::fs::copy(&img, &base_copy).unwrap();
    let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
    let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
    let log_path = dir.join("log");
    let rec = Arc::new(Recorder::create(dev, &log_path).unwrap());
    let file = identity_file(rec.clone(), 4096);
    let ops = if common::long() { 1000 } else { 100 };
    let model = raw_workload(&rec, &file, 5, ops, base.clone());
    drop(file);
    drop(rec);
    assert!(std::fs::read(&img).unwrap() == model);
    let sum = replay_model(&log_path, Base::File(base_copy), 5);
    assert!(sum.states > 50, "only {} states", sum.states);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}

/// dsync writes that allocate (appends to a file over an allocating map), each
/// claimed once it returns: on a device without FUA, only the engine's flush
/// after an allocating dsync write makes them durable.
fn allocating_dsync_appends(dev: Arc<dyn Device>, rec: &Recorder<Arc<MemDevice>>, n: u64) {
    let map = Arc::new(TestMap::new(TestMapConfig::new(4096, SIZE / 4096)));
    let file = DirectFile::new(dev, map.clone(), Arc::new(FileState::new(0))).unwrap();
    for k in 0..n {
        let data = vec![(k % 250) as u8 + 1; 8192];
        let off = k * 8192;
        rec.mark(&format!("append {k}")).unwrap();
        let mut buf = dio::AlignedBuf::new(8192, 4096);
        buf.copy_from_slice(&data);
        assert_eq!(file.write_at(off, &buf, Flags::DSYNC).unwrap(), 8192);
        // Where the map put it (the claim is about device bytes).
        for b in 0..2 {
            let e = map.map(off / 4096 + b, 1, false).unwrap();
            let dev_block = e.device_block().expect("allocated");
            rec.claim(dev_block * 4096, &data[(b * 4096) as usize..][..4096])
                .unwrap();
        }
    }
}

#[test]
fn control_allocating_dsync_writes_on_a_device_without_fua_pass() {
    let dir = scratch("control-nofua");
    let log_path = dir.join("log");
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512)));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let dev: Arc<dyn Device> = Arc::new(StripFua(rec.clone()));
    allocating_dsync_appends(dev, &rec, 40);
    let sum = replay_model(&log_path, Base::Zeros, 3);
    assert!(sum.states > 40);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}

#[test]
fn mutation_dropped_flush_after_allocating_dsync_write_is_caught() {
    let dir = scratch("mut-dropflush");
    let log_path = dir.join("log");
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512)));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let dev: Arc<dyn Device> = Arc::new(StripFua(DropFlush(rec.clone())));
    allocating_dsync_appends(dev, &rec, 40);
    let sum = replay_model(&log_path, Base::Zeros, 3);
    assert!(sum.failed > 0, "the dropped flush went unnoticed");
    let f = &sum.failures[0];
    assert_eq!(f.checker, "model");
    eprintln!("first failure: {} {}: {}", f.spec, f.checker, f.message);
}

#[test]
fn mutation_write_acknowledged_before_it_is_written_is_caught() {
    let dir = scratch("mut-earlyack");
    let log_path = dir.join("log");
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512)));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let early = Arc::new(EarlyAck::new(rec.clone()));
    let file = identity_file(early.clone(), 4096);
    let mut rng = Rng::new(4);
    for k in 0..40u64 {
        rec.mark(&format!("write {k}")).unwrap();
        let off = rng.below(SIZE / 4096) * 4096;
        let data = vec![(k % 250) as u8 + 1; 4096];
        let mut buf = dio::AlignedBuf::new(4096, 4096);
        buf.copy_from_slice(&data);
        assert_eq!(file.write_at(off, &buf, Flags::DSYNC).unwrap(), 4096);
        rec.claim(off, &data).unwrap();
    }
    early.drain();
    let sum = replay_model(&log_path, Base::Zeros, 4);
    assert!(sum.failed > 0, "the early acknowledgement went unnoticed");
    eprintln!(
        "first failure: {} {}: {}",
        sum.failures[0].spec, sum.failures[0].checker, sum.failures[0].message
    );
}

#[test]
fn a_torn_log_tail_is_ignored_and_the_rest_replays() {
    let dir = scratch("torn-tail");
    let log_path = dir.join("log");
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512)));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let file = identity_file(rec.clone(), 4096);
    raw_workload(&rec, &file, 11, 30, vec![0; SIZE as usize]);
    drop(file);
    drop(rec);
    let full = Log::open(&log_path).unwrap();
    let n = full.records().len();
    assert_eq!(full.ignored_tail(), 0);
    // Cut the file in the middle of its last record, then flip a byte of the
    // one before: the log ends before the damage.
    let len = std::fs::metadata(&log_path).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&log_path)
        .unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let cut = Log::open(&log_path).unwrap();
    assert_eq!(cut.records().len(), n - 1);
    assert!(cut.ignored_tail() > 0);
    let sum = replay_model(&log_path, Base::Zeros, 1);
    assert_eq!(sum.failed, 0);
    // A damaged record in the middle ends the log there.
    let mut bytes = std::fs::read(&log_path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&log_path, &bytes).unwrap();
    let damaged = Log::open(&log_path).unwrap();
    assert!(damaged.records().len() < n - 1);
    assert!(damaged.ignored_tail() > 0);
}

#[test]
fn a_state_spec_rebuilds_the_same_image() {
    let dir = scratch("spec");
    let log_path = dir.join("log");
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512)));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let file = identity_file(rec.clone(), 4096);
    raw_workload(&rec, &file, 21, 60, vec![0; SIZE as usize]);
    let log = Arc::new(Log::open(&log_path).unwrap());
    let specs = dio_crash::plan_for(&log, &opts(8));
    let torn = specs
        .iter()
        .find(|s| s.kept.iter().any(|k| k.sectors.is_some()))
        .expect("some state tears a write");
    let text = torn.to_string();
    let parsed: dio_crash::StateSpec = text.parse().unwrap();
    assert_eq!(&parsed, torn);
    let mut a = dio_crash::Replayer::new(Arc::clone(&log), Base::Zeros, &dir).unwrap();
    // Build some states first, so the second build starts from another point.
    for s in specs.iter().take(5) {
        a.state(s).unwrap();
    }
    let one = a.state(torn).unwrap();
    let mut b = dio_crash::Replayer::new(Arc::clone(&log), Base::Zeros, &dir).unwrap();
    let two = b.state(&parsed).unwrap();
    let (p1, p2) = (dir.join("one.img"), dir.join("two.img"));
    one.write_image(&p1).unwrap();
    two.write_image(&p2).unwrap();
    let (i1, i2) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
    assert!(i1 == i2);
    let mut via = vec![0u8; SIZE as usize];
    one.read_at(0, &mut via).unwrap();
    assert!(via == i1, "the overlay and the image file agree");
    // The torn write landed only in part: its state differs from the one that
    // keeps it whole.
    let mut whole = torn.clone();
    for k in &mut whole.kept {
        k.sectors = None;
    }
    let three = b.state(&whole).unwrap();
    let mut w = vec![0u8; SIZE as usize];
    three.read_at(0, &mut w).unwrap();
    assert!(w != i1);
    // Specs that do not fit the log are refused.
    for bad in ["x", "1:2:3/4", &format!("{}:0", log.records().len() + 1)] {
        let r = bad
            .parse::<dio_crash::StateSpec>()
            .and_then(|s| b.state(&s));
        assert!(matches!(r, Err(dio_crash::CrashError::BadSpec(_))), "{bad}");
    }
}
