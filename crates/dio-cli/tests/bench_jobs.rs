//! `dio bench --jobs N` (issue 20): N jobs at once, each with a ring of its own
//! (counted from outside, in /proc/PID/fd, while the run goes), one combined report
//! whose I/Os are the jobs' sum, per-job figures in --json, and a usage error where
//! jobs make no sense. No timed asserts.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`): tmpfs may refuse
//! O_DIRECT.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

fn dio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .output()
        .expect("run dio")
}

fn uring() -> bool {
    match dio::probe::uring_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: io_uring unavailable here ({e})");
            false
        }
    }
}

fn data_file(dir: &Path, size: usize) -> String {
    let p = dir.join("jobs.dat");
    std::fs::write(&p, vec![0x42u8; size]).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn jobs_report_each_job_and_their_sum() {
    let dir = scratch();
    let f = data_file(dir.path(), 8 << 20);
    for rw in ["randread", "randwrite"] {
        let o = dio(&[
            "bench",
            &f,
            "--rw",
            rw,
            "--jobs",
            "3",
            "--qd",
            "4",
            "--runtime",
            "0.3",
            "--json",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{rw}: {err}");
        let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
        assert_eq!(v["numjobs"], 3, "{v}");
        let jobs = v["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 3);
        let mut sum = 0;
        for (i, j) in jobs.iter().enumerate() {
            assert_eq!(j["job"], i);
            assert_eq!(j["qd"], 4);
            assert!(j["ios"].as_u64().unwrap() > 0, "job {i} did nothing: {j}");
            assert!(j["lat_ns"]["p99"].is_u64() && j["cpu_sys"].is_number());
            sum += j["ios"].as_u64().unwrap();
        }
        assert_eq!(v["ios"].as_u64().unwrap(), sum, "{v}");
        assert!(v["lat_ns"]["p999"].is_u64());
    }
    // The text report says it too.
    let o = dio(&[
        "bench",
        &f,
        "--rw",
        "randread",
        "--jobs",
        "2",
        "--qd",
        "2",
        "--runtime",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("jobs       2 x qd2: "), "{out}");
    // Writes through the jobs left the file's size alone.
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 8 << 20);
}

#[test]
fn every_job_gets_a_ring_of_its_own() {
    if !uring() {
        return;
    }
    let dir = scratch();
    let f = data_file(dir.path(), 8 << 20);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args([
            "bench",
            &f,
            "--rw",
            "randread",
            "--jobs",
            "3",
            "--qd",
            "2",
            "--runtime",
            "2",
            "--engine",
            "uring",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fd_dir = format!("/proc/{}/fd", child.id());
    let mut most = 0;
    while child.try_wait().unwrap().is_none() {
        let rings = std::fs::read_dir(&fd_dir)
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|l| l.to_string_lossy().contains("io_uring"))
                    .count()
            })
            .unwrap_or(0);
        most = most.max(rings);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The opener's ring and one per job.
    assert_eq!(most, 4, "io_uring instances seen at once");
}

#[test]
fn jobs_need_a_single_workload() {
    let dir = scratch();
    let o = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(["bench", "--jobs", "2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--jobs"));
    // Out of range: refused by the argument parser (its usage exit code).
    let o = dio(&["bench", "x", "--jobs", "0"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// `io_uring_enter` calls of a traced `dio bench` run, and the I/Os it reports.
fn enters_and_ios(dir: &Path, f: &str, extra: &[&str]) -> (u64, u64) {
    let trace = dir.join("strace.txt");
    let o = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=io_uring_enter", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_dio"))
        .args([
            "bench",
            f,
            "--rw",
            "randread",
            "--qd",
            "32",
            "--runtime",
            "0.5",
            "--engine",
            "uring",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("run strace");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let ios = v["ios"].as_u64().unwrap();
    let summary = std::fs::read_to_string(&trace).unwrap();
    // "% time  seconds  usecs/call  calls  errors  syscall": the calls column.
    let enters = summary
        .lines()
        .find(|l| l.trim_end().ends_with(" io_uring_enter"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or_else(|| panic!("no io_uring_enter line in:\n{summary}"));
    (enters, ios)
}

/// By default the I/Os started for a round of completions go to the kernel
/// together (a plug; at most a quarter of --qd per enter, the last of a round in
/// the enter that also waits for the next round): fewer enters than I/Os, as
/// counted by strace. (The first 32 go in 4 enters; every later enter submits 8 or
/// returns at least one completion, unless it times out after 10 ms, which 28
/// times in half a second would need a stalled disk.) With --batch 1 every call
/// enters the ring at its end: at least one enter per I/O.
#[test]
fn a_round_of_ios_goes_to_the_kernel_in_one_enter() {
    if !uring() {
        return;
    }
    if !dio_testkit::have("strace") {
        dio_testkit::skip("strace is not installed");
        return;
    }
    let dir = scratch();
    let f = data_file(dir.path(), 8 << 20);
    let (enters, ios) = enters_and_ios(dir.path(), &f, &[]);
    assert!(ios > 32, "{ios} I/Os");
    assert!(enters < ios, "batched: {enters} enters for {ios} I/Os");
    let (enters, ios) = enters_and_ios(dir.path(), &f, &["--batch", "1"]);
    assert!(ios > 32, "{ios} I/Os");
    assert!(enters >= ios, "--batch 1: {enters} enters for {ios} I/Os");
}
