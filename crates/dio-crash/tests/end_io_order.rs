//! The 2025 iomap bug shape, for real: a block map whose `end_io` persists its
//! allocation (as ext4's unwritten-extent conversion does). A dsync write into a
//! new block claims its data and the allocation durable when it returns.
//!
//! dio's engine flushes for a dsync write *after* it calls the map's `end_io`
//! (engine/complete.rs), so metadata written there is covered by that flush, as
//! generic_write_sync follows end_io in the kernel. (The engine once flushed before
//! end_io; this test then found 89 of 274 states without the allocation.) A map
//! needs no flush of its own; one that drops the engine's flush is caught.

mod common;

use std::sync::{Arc, Mutex};

use dio::{
    AlignedBuf, BlockMap, Device, DirectFile, Extent, FileState, Flags, MemDevice, MemDeviceConfig,
    Op, Private,
};
use dio_crash::{run, Base, Checker, Log, ModelChecker, Recorder, ReplayOptions};

struct MetaMap {
    dev: Arc<dyn Device>,
    /// Flush after persisting the table (the fix).
    flush: bool,
    table: Mutex<Vec<u64>>, // file block -> device block + 1
    next: Mutex<u64>,
}

impl BlockMap for MetaMap {
    fn block_size(&self) -> u32 {
        4096
    }
    fn map(&self, block: u64, _max: u64, create: bool) -> dio::Result<Extent> {
        let mut t = self.table.lock().unwrap();
        if t[block as usize] != 0 {
            return Ok(Extent::mapped(t[block as usize] - 1, 1));
        }
        if !create {
            return Ok(Extent::hole(1));
        }
        let mut n = self.next.lock().unwrap();
        let dev = *n;
        *n += 1;
        t[block as usize] = dev + 1;
        Ok(Extent::mapped(dev, 1)
            .new_blocks(true)
            .private(Arc::new(block) as Private))
    }
    fn end_io(
        &self,
        op: Op,
        _offset: u64,
        result: dio::Result<usize>,
        _private: Option<&Private>,
    ) -> dio::Result<usize> {
        if op == Op::Write && result.is_ok() {
            // Persist the table (block 0 of the device).
            let t = self.table.lock().unwrap().clone();
            let mut b = AlignedBuf::new(4096, 4096);
            for (i, v) in t.iter().enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            dio::write_device(self.dev.as_ref(), 0, &mut b, false)
                .map_err(|e| dio::Error::io(0, e))?;
            if self.flush {
                self.dev.flush().map_err(|e| dio::Error::io(0, e))?;
            }
        }
        result
    }
}

/// Dsync appends through a `MetaMap`; returns the replay's summary.
/// `drop_flushes`: the device under the map and the engine ignores flushes (the
/// mutation: nothing written without FUA is ever durable).
fn appends(name: &str, flush: bool, drop_flushes: bool) -> dio_crash::Summary {
    let dir = common::scratch(name);
    let log_path = dir.join("log");
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(4 << 20, 512)));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let dev: Arc<dyn Device> = if drop_flushes {
        Arc::new(common::DropFlush(rec.clone()))
    } else {
        rec.clone()
    };
    let map = Arc::new(MetaMap {
        dev: Arc::clone(&dev),
        flush,
        table: Mutex::new(vec![0; 512]),
        next: Mutex::new(1),
    });
    let file = DirectFile::new(dev, map.clone(), Arc::new(FileState::new(0))).unwrap();
    for k in 0..20u64 {
        rec.mark(&format!("append {k}")).unwrap();
        let mut buf = AlignedBuf::new(4096, 4096);
        buf.fill(k as u8 + 1);
        assert_eq!(file.write_at(k * 4096, &buf, Flags::DSYNC).unwrap(), 4096);
        let devb = map.table.lock().unwrap()[k as usize] - 1;
        rec.claim(devb * 4096, &buf).unwrap();
        rec.claim(k * 8, &(devb + 1).to_le_bytes()).unwrap();
    }
    let log = Arc::new(Log::open(&log_path).unwrap());
    let model = ModelChecker::new();
    let sum = run(
        &log,
        Base::Zeros,
        &[&model as &dyn Checker],
        &ReplayOptions::default(),
        &dir.join("states"),
    )
    .unwrap();
    eprintln!("{name}: {} states, {} failed", sum.states, sum.failed);
    for f in sum.failures.iter().take(1) {
        eprintln!("  first: {} {}", f.spec, f.message);
    }
    sum
}

#[test]
fn the_engines_dsync_flush_covers_what_end_io_wrote() {
    let sum = appends("end-io-noflush", false, false);
    assert!(sum.states > 50);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}

#[test]
fn mutation_allocation_persisted_in_end_io_with_flushes_dropped_is_caught() {
    let sum = appends("end-io-dropped", false, true);
    assert!(sum.failed > 0, "the unflushed allocation went unnoticed");
}

#[test]
fn allocation_persisted_and_flushed_in_end_io_passes_every_state() {
    let sum = appends("end-io-flush", true, false);
    assert!(sum.states > 50);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}
