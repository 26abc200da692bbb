//! `dio bench --stats`: the device requests counted through `dio::StatsDevice`
//! equal the I/Os the bench itself counted (each aligned 4 KiB I/O is one device
//! request), and the human report shows them. No timed asserts.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_stats_counts_one_device_request_per_io() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = dir.path().join("bench.img");
    let file = file.to_str().unwrap();
    for rw in ["randread", "randwrite"] {
        let out = Command::new(env!("CARGO_BIN_EXE_dio"))
            .args(["bench", file, "--size", "8M", "--rw", rw, "--bs", "4k"])
            .args(["--qd", "4", "--runtime", "0.3", "--stats", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ios = v["ios"].as_u64().unwrap();
        let d = &v["device_stats"];
        let (reads, writes) = (d["reads"].as_u64().unwrap(), d["writes"].as_u64().unwrap());
        assert!(ios > 0);
        if rw == "randread" {
            assert_eq!((reads, writes), (ios, 0), "{v}");
            assert_eq!(d["bytes_read"].as_u64(), Some(ios * 4096));
        } else {
            assert_eq!((reads, writes), (0, ios), "{v}");
            assert_eq!(d["bytes_written"].as_u64(), Some(ios * 4096));
        }
        assert!(d["max_in_flight"].as_u64().unwrap() <= 4, "{v}");
        assert_eq!(d["errors"].as_u64(), Some(0));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args([
            "bench",
            file,
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--runtime",
            "0.2",
            "--stats",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("device     requests: "), "{text}");
    assert!(text.contains("read latency: mean"), "{text}");
    assert!(text.contains("merges"), "{text}");
}

/// `--ramp`: the device serves the ramp's requests too, the report counts only
/// those after it, and the measured time is --runtime, not ramp plus runtime.
#[test]
fn bench_ramp_is_run_but_not_counted() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = dir.path().join("bench.img");
    let file = file.to_str().unwrap();
    for jobs in ["1", "2"] {
        let out = Command::new(env!("CARGO_BIN_EXE_dio"))
            .args([
                "bench", file, "--size", "8M", "--rw", "randread", "--qd", "4",
            ])
            .args(["--runtime", "0.3", "--ramp", "0.3", "--stats", "--json"])
            .args(["--jobs", jobs])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ios = v["ios"].as_u64().unwrap();
        let reads = v["device_stats"]["reads"].as_u64().unwrap();
        assert!(ios > 0, "{v}");
        // The ramp's reads reached the device (about as many as the run's; at
        // least some), and none of them is in the report.
        assert!(reads > ios, "ramp reads not sent or counted: {v}");
        assert_eq!(v["ramp_s"].as_f64(), Some(0.3));
        let runtime = v["runtime_s"].as_f64().unwrap();
        assert!(runtime < 0.55, "the ramp is in the measured time: {v}");
    }
    for bad in ["-1", "nan", "x"] {
        let out = Command::new(env!("CARGO_BIN_EXE_dio"))
            .args(["bench", file, "--rw", "randread", "--runtime", "0.1"])
            .arg(format!("--ramp={bad}"))
            .output()
            .unwrap();
        // A usage error, as clap's own (exit 2).
        assert_eq!(out.status.code(), Some(2), "--ramp={bad}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
}
