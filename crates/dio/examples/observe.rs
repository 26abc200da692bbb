//! Counters and untorn writes.
//!
//! With no argument, on a RAM device that offers untorn writes of 4 KiB to 64 KiB:
//! counts requests, bytes and latency through a `StatsDevice`, writes a record
//! untorn (`Flags::ATOMIC`) and a plain one, pulls the plug with a crash that tears
//! unflushed writes, and shows that the untorn record survived whole or not at all.
//!
//! With a path (a file or block device), reads its first MiB through a counted
//! device and says which untorn writes it offers:
//!
//! ```text
//! cargo run --release -p dio --example observe
//! cargo run --release -p dio --example observe -- /path/to/file
//! ```

use std::sync::Arc;

use dio::{
    AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig, RawFile,
    RawOptions, StatsDevice,
};

fn main() -> dio::Result<()> {
    if let Some(path) = std::env::args().nth(1) {
        return on_file(&path);
    }
    let size = 4 << 20;
    let mem = Arc::new(MemDevice::new(
        MemDeviceConfig::new(size, 512)
            .threaded(Some(std::time::Duration::from_micros(200)), false, 1)
            .atomic_write(4096, 64 << 10)
            .torn_crash(),
    ));
    let dev = Arc::new(StatsDevice::new(mem.clone()));
    let map = Arc::new(IdentityMap::new(4096, size));
    let file = DirectFile::new(dev.clone(), map, Arc::new(FileState::new(size)))?;
    println!("untorn write units: {:?}", file.atomic_write_units());

    let mut record = AlignedBuf::new(64 << 10, 4096);
    let mut rounds = [0u32; 2];
    for seed in 0..20 {
        // An old version of both records, durable.
        record.fill(b'o');
        file.write_at(0, &record, Flags::NONE)?;
        file.write_at(1 << 20, &record, Flags::NONE)?;
        file.sync_data()?;
        // The new versions, one untorn, one plain; then the power goes.
        record.fill(b'N');
        file.write_at(0, &record, Flags::ATOMIC)?;
        file.write_at(1 << 20, &record, Flags::NONE)?;
        mem.crash_torn(seed);
        let whole = |at| {
            let b = mem.read_raw(at, 64 << 10);
            b.iter().all(|&x| x == b'o') || b.iter().all(|&x| x == b'N')
        };
        assert!(whole(0), "an untorn write tore");
        rounds[usize::from(!whole(1 << 20))] += 1;
    }
    println!(
        "20 torn crashes: the untorn record always whole; the plain one torn {} times",
        rounds[1]
    );
    // Something that does not fit the units is refused, before any byte moves.
    let e = file.write_at(4096, &record, Flags::ATOMIC).unwrap_err();
    println!("refused: {e}");
    let s = file.stats();
    println!(
        "engine: {} bytes written, {} merges, {} splits",
        s.bytes_written(),
        s.merges(),
        s.splits()
    );
    print!("device: {}", dev.stats());
    Ok(())
}

fn on_file(path: &str) -> dio::Result<()> {
    let raw = RawFile::open(path, &RawOptions::default())?;
    let counted = Arc::new(StatsDevice::new(raw.direct().device().clone()));
    let file = raw.direct().with_device(counted.clone())?;
    match file.atomic_write_units() {
        Some((min, max)) => println!("{path}: untorn writes of {min} to {max} bytes"),
        None => println!("{path}: no untorn writes (statx reports no atomic write units)"),
    }
    // The first MiB (or the file, rounded up to a block: the read is short at EOF).
    let len = (file.size().min(1 << 20) as usize)
        .next_multiple_of(4096)
        .max(4096);
    let mut buf = AlignedBuf::new(len, file.geometry().buffer_align());
    let n = file.read_at(0, &mut buf, Flags::NONE)?;
    println!("read {n} bytes through {}", raw.backend_name());
    print!("{}", counted.stats());
    Ok(())
}
