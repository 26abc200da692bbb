//! What recording costs: 64 MiB of 64 KiB writes (a flush every 1 MiB) through a
//! `DirectFile` over a RAM device, without and with the recorder (log under
//! `target/`), alternated, 5 pairs; prints each pair and the median ratio.
//!
//! `cargo run --release -p dio-crash --example record_overhead`

use std::sync::Arc;
use std::time::Instant;

use dio::{
    AlignedBuf, Device, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig,
};
use dio_crash::Recorder;

const SIZE: u64 = 64 << 20;

fn workload(dev: Arc<dyn Device>) -> f64 {
    let file = DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(4096, SIZE)),
        Arc::new(FileState::new(SIZE)),
    )
    .unwrap();
    let mut buf = AlignedBuf::new(64 << 10, 4096);
    buf.fill(7);
    let t = Instant::now();
    for k in 0..SIZE / (64 << 10) {
        file.write_at(k * (64 << 10), &buf, Flags::NONE).unwrap();
        if k % 16 == 15 {
            file.sync_data().unwrap();
        }
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/record-overhead");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("log");
    let mut ratios = Vec::new();
    for pair in 0..5 {
        let plain = workload(Arc::new(MemDevice::new(MemDeviceConfig::new(SIZE, 512))));
        let mem = MemDevice::new(MemDeviceConfig::new(SIZE, 512));
        let rec = Arc::new(Recorder::create(mem, &log).unwrap());
        let recorded = workload(rec);
        println!(
            "pair {pair}: plain {:.0} MiB/s, recorded {:.0} MiB/s, ratio {:.2}",
            64.0 / plain,
            64.0 / recorded,
            recorded / plain
        );
        ratios.push(recorded / plain);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median time ratio recorded/plain: {:.2}",
        ratios[ratios.len() / 2]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
