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
