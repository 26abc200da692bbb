//! Fault injection: EIO on random device requests through fsx on the RAM device
//! (pre-filled with 0xAA). Every call returns an error or an exact partial count, a
//! reported success means the data is there, and no read shows bytes never written.

use std::time::Duration;

use dio::fsx::{self, MemTarget, Options, Target};

fn fsx_with_faults(seed: u64, rate: f64, ops: u64, fs: u32, threaded: bool) -> fsx::Report {
    let t = Target::mem(
        &MemTarget::new(2 << 20, seed)
            .faults(rate)
            .fs_block(fs)
            .threaded(threaded),
    )
    .unwrap();
    let o = Options::new(seed).ops(ops).span(2 << 20);
    match fsx::run(&t, &o, &mut |_| {}) {
        Ok(r) => r,
        Err(d) => panic!("{d}"),
    }
}

#[test]
fn eio_on_random_requests_gives_errors_or_exact_counts_and_no_stale_data() {
    let mut total = fsx::Report::default();
    let seeds: Vec<u64> = std::env::var("FSX_SEEDS")
        .ok()
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or_else(|| (1..=8).collect());
    for &seed in &seeds {
        for (fs, threaded) in [(4096, true), (1024, false)] {
            let r = fsx_with_faults(seed, 0.02, 3000, fs, threaded);
            total.ops += r.ops;
            total.calls += r.calls;
            total.errors += r.errors;
            total.partials += r.partials;
            total.faults.requests += r.faults.requests;
            total.faults.failed += r.faults.failed;
            total.faults.torn += r.faults.torn;
        }
    }
    eprintln!(
        "faults: {} ops, {} calls, {} requests, {} faults injected ({} before the data moved, {} after), {} calls failed, {} exact short counts, 0 divergences",
        total.ops,
        total.calls,
        total.faults.requests,
        total.faults.injected(),
        total.faults.failed,
        total.faults.torn,
        total.errors,
        total.partials
    );
    assert!(total.faults.injected() > 0);
    let _ = Duration::ZERO;
}
