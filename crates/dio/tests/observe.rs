//! Observability: the counts of a `StatsDevice` against the RAM device's own
//! request log and counters (an independent record of the same requests), its
//! latency histogram against the device's configured delay and a sorted-list
//! model of percentiles, and the engine's merges and splits against the requests
//! the device saw.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use dio::{
    AlignedBuf, Device, DirectFile, FileState, Flags, Geometry, IdentityMap, LatencyHistogram,
    MemDevice, MemDeviceConfig, Op, StatsDevice,
};
use dio_testkit::Rng;

const MIB: u64 = 1 << 20;

fn buf(len: usize, byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, 4096);
    b.fill(byte);
    b
}

#[test]
fn stats_device_counts_what_the_device_logged() {
    let delay = Duration::from_millis(2);
    let mem = Arc::new(MemDevice::new(
        MemDeviceConfig::new(4 * MIB, 512)
            .threaded(Some(delay), true, 7)
            .log(),
    ));
    let dev = Arc::new(StatsDevice::new(mem.clone()));
    let map = Arc::new(IdentityMap::new(4096, 4 * MIB));
    let file = DirectFile::new(dev.clone(), map, Arc::new(FileState::new(4 * MIB))).unwrap();
    let mut rng = Rng::new(5);
    for _ in 0..40 {
        let at = rng.below(64) * 16384;
        let len = (1 + rng.below(8) as usize) * 4096;
        if rng.percent(50) {
            file.write_at(at, &buf(len, 1), Flags::NONE).unwrap();
        } else {
            file.read_at(at, &mut buf(len, 0), Flags::NONE).unwrap();
        }
    }
    // Eight async reads in flight at once.
    let futures: Vec<_> = (0..8u64)
        .map(|i| file.read_future(i * 65536, vec![buf(4096, 0)], Flags::NONE))
        .collect();
    for f in futures {
        f.wait().result.unwrap();
    }
    file.sync_data().unwrap();
    // A failing request.
    mem.fail_range(0..4096, Some(Op::Read));
    assert!(file.read_at(0, &mut buf(4096, 0), Flags::NONE).is_err());

    let s = dev.stats();
    let log = mem.log();
    let count = |op| log.iter().filter(|r| r.op == op).count() as u64;
    let bytes = |op| {
        log.iter()
            .filter(|r| r.op == op)
            .map(|r| r.len)
            .sum::<u64>()
    };
    assert_eq!(s.reads, count(Op::Read));
    assert_eq!(s.writes, count(Op::Write));
    assert_eq!(s.bytes_read, bytes(Op::Read));
    assert_eq!(s.bytes_written, bytes(Op::Write));
    assert_eq!(s.requests(), mem.stats().requests);
    assert_eq!(s.flushes, mem.stats().flushes);
    assert_eq!(s.flushes, 1);
    assert_eq!(s.errors, 1);
    assert_eq!(s.in_flight, 0);
    assert_eq!(s.max_in_flight, 8);
    assert_eq!(s.read_latency.count(), s.reads);
    assert_eq!(s.write_latency.count(), s.writes);
    // Every request took at least the device's delay: nothing in the buckets
    // below it, and every percentile at or above it.
    let below = (63 - (delay.as_nanos() as u64).leading_zeros()) as usize;
    let h = s.latency();
    assert!(h.buckets()[..below].iter().all(|&c| c == 0), "{h:?}");
    assert!(h.percentile(0.0) >= delay);
    assert!(h.mean() >= delay);
    eprintln!("{s}");
    // Reset starts from zero.
    dev.reset();
    let z = dev.stats();
    assert_eq!((z.requests(), z.errors, z.read_latency.count()), (0, 0, 0));
}

/// Percentiles against a sorted list of the same latencies: the answer is the end
/// of the bucket that holds the true value, so within a factor of two above it.
#[test]
fn percentiles_bound_the_true_value_within_its_bucket() {
    let mut rng = Rng::new(11);
    for round in 0..50 {
        let n = 1 + rng.below(500) as usize;
        let mut h = LatencyHistogram::default();
        let mut all: Vec<u64> = (0..n)
            .map(|_| {
                let shift = rng.below(30);
                rng.below(1 << shift)
            })
            .collect();
        for &ns in &all {
            h.record(Duration::from_nanos(ns));
        }
        all.sort_unstable();
        assert_eq!(h.count(), n as u64);
        for p in [0.0, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
            let truth = all[rank - 1];
            let got = h.percentile(p).as_nanos() as u64;
            assert!(
                got >= truth && got <= truth.max(1) * 2,
                "round {round}, p{p}: {got} ns for a true {truth} ns"
            );
        }
        let mean = all.iter().sum::<u64>() / n as u64;
        assert_eq!(h.mean(), Duration::from_nanos(mean));
    }
    assert_eq!(LatencyHistogram::default().percentile(50.0), Duration::ZERO);
}

/// Merges and splits: a call of many small buffers at consecutive offsets merges
/// into one request; one big buffer splits at the device's request limit. The
/// device's log is the oracle for how many requests went out.
#[test]
fn merges_and_splits_match_the_requests_the_device_saw() {
    let geo = Geometry::new(512, 4 * MIB).with_limits(8, 64 << 10);
    let mem = Arc::new(MemDevice::new(
        MemDeviceConfig::new(4 * MIB, 512).geometry(geo).log(),
    ));
    let map = Arc::new(IdentityMap::new(4096, 4 * MIB));
    let file = DirectFile::new(mem.clone(), map, Arc::new(FileState::new(4 * MIB))).unwrap();
    // One 256 KiB buffer: four requests of 64 KiB, three splits, no merge.
    file.write_at(0, &buf(256 << 10, 1), Flags::NONE).unwrap();
    assert_eq!(mem.log().len(), 4);
    assert_eq!((file.stats().merges(), file.stats().splits()), (0, 3));
    // Eight separate 4 KiB buffers: one request of eight segments, seven merges.
    mem.reset_stats();
    let bufs: Vec<AlignedBuf> = (0..8).map(|i| buf(4096, i)).collect();
    let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    file.write(MIB, &slices, Flags::NONE).unwrap();
    let log = mem.log();
    assert_eq!((log.len(), log[0].segments), (1, 8), "{log:?}");
    assert_eq!((file.stats().merges(), file.stats().splits()), (7, 3));
    // Twelve: the segment limit (8) cuts them into two requests; 10 merges.
    mem.reset_stats();
    let bufs: Vec<AlignedBuf> = (0..12).map(|i| buf(4096, i)).collect();
    let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    file.write(2 * MIB, &slices, Flags::NONE).unwrap();
    assert_eq!(mem.log().len(), 2);
    assert_eq!((file.stats().merges(), file.stats().splits()), (17, 3));
    // Requests = pieces - merges + splits, over everything so far: 1 + 8 + 12
    // pieces; 4 + 1 + 2 requests.
    assert_eq!(21 - file.stats().merges() + file.stats().splits(), 7);
}

#[test]
fn with_device_takes_only_a_device_of_the_same_geometry() {
    let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(MIB, 512)));
    let map = Arc::new(IdentityMap::new(4096, MIB));
    let file = DirectFile::new(mem, map, Arc::new(FileState::new(MIB))).unwrap();
    let other = Arc::new(MemDevice::new(MemDeviceConfig::new(2 * MIB, 512)));
    let e = file.with_device(other).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let counted = Arc::new(StatsDevice::new(file.device().clone()));
    let observed = file.with_device(counted.clone()).unwrap();
    observed.write_at(0, &buf(8192, 3), Flags::NONE).unwrap();
    let mut back = buf(8192, 0);
    file.read_at(0, &mut back, Flags::NONE).unwrap();
    assert!(back.iter().all(|&b| b == 3));
    assert_eq!((counted.stats().writes, counted.stats().reads), (1, 0));
    assert_eq!(counted.name(), "mem");
}
