//! The `dio` binary, run as a user runs it: copies and cats compared byte for byte,
//! holes kept, no page cache left behind, exit codes, bench JSON, Ctrl-C clean-up,
//! and (as root) block devices through loop devices.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`), never /tmp: tmpfs may
//! refuse O_DIRECT.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dio_testkit::{bytes, LoopDev};
use tempfile::TempDir;

const SIZES: [usize; 5] = [0, 1, 511, 4097, (1 << 20) + 1];

fn scratch() -> TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

fn dio(args: &[&str]) -> Output {
    dio_in(None, args)
}

fn dio_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dio"));
    cmd.args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().expect("run dio")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}, stderr:\n{}",
        o.status.code(),
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{what}: {}", stderr(o));
}

fn same_bytes(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
fn cp_and_cat_copy_every_size_byte_for_byte() {
    let dir = scratch();
    for engine in ["auto", "sync"] {
        for (i, &len) in SIZES.iter().enumerate() {
            let src = dir.path().join(format!("src-{engine}-{len}"));
            let dst = dir.path().join(format!("dst-{engine}-{len}"));
            let data = bytes(len, i as u64 + 1);
            fs::write(&src, &data).unwrap();

            let o = dio(&["cp", "--engine", engine, s(&src), s(&dst)]);
            assert_ok(&o, &format!("cp {len} bytes ({engine})"));
            same_bytes(
                &fs::read(&dst).unwrap(),
                &data,
                &format!("cp {len} ({engine})"),
            );

            let o = dio(&["cat", "--engine", engine, s(&src)]);
            assert_ok(&o, &format!("cat {len} bytes ({engine})"));
            same_bytes(&o.stdout, &data, &format!("cat {len} ({engine})"));
        }
    }
}

#[test]
fn cp_with_small_requests_and_depth_one_still_copies_exactly() {
    let dir = scratch();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let data = bytes((3 << 20) + 4095, 9);
    fs::write(&src, &data).unwrap();
    let o = dio(&["cp", "--bs", "64k", "--qd", "1", s(&src), s(&dst)]);
    assert_ok(&o, "cp --bs 64k --qd 1");
    same_bytes(&fs::read(&dst).unwrap(), &data, "cp --bs 64k --qd 1");
}

#[test]
fn cp_truncates_a_longer_destination() {
    let dir = scratch();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let data = bytes(10_000, 3);
    fs::write(&src, &data).unwrap();
    fs::write(&dst, vec![0xAB; 3 << 20]).unwrap();
    assert_ok(&dio(&["cp", s(&src), s(&dst)]), "cp over a longer file");
    same_bytes(&fs::read(&dst).unwrap(), &data, "cp over a longer file");
}

#[test]
fn cp_into_a_directory_uses_the_source_name() {
    let dir = scratch();
    let src = dir.path().join("named");
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let data = bytes(5000, 4);
    fs::write(&src, &data).unwrap();
    assert_ok(&dio(&["cp", s(&src), s(&sub)]), "cp into a directory");
    same_bytes(
        &fs::read(sub.join("named")).unwrap(),
        &data,
        "cp into a directory",
    );
}

/// A 48 MiB + 123 byte file with three small islands of data.
fn sparse_source(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let len = (48 << 20) + 123;
    let f = fs::File::create(path).unwrap();
    f.set_len(len as u64).unwrap();
    let mut image = vec![0u8; len];
    for (at, n, seed) in [(0, 4096, 1), (20 << 20, 100_003, 2), (len - 5000, 5000, 3)] {
        let island = bytes(n, seed);
        f.write_all_at(&island, at as u64).unwrap();
        image[at..at + n].copy_from_slice(&island);
    }
    f.sync_all().unwrap();
    image
}

#[test]
fn cp_keeps_the_holes_of_a_sparse_source() {
    let dir = scratch();
    let src = dir.path().join("sparse");
    let dst = dir.path().join("copy");
    let image = sparse_source(&src);
    let src_bytes = fs::metadata(&src).unwrap().blocks() * 512;
    if src_bytes > 8 << 20 {
        println!("skipped: this file system does not keep holes ({src_bytes} bytes allocated)");
        return;
    }
    assert_ok(&dio(&["cp", s(&src), s(&dst)]), "cp sparse");
    let dst_bytes = fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(
        dst_bytes <= src_bytes + (64 << 10),
        "copy allocated {dst_bytes} bytes, source {src_bytes}"
    );
    same_bytes(&fs::read(&dst).unwrap(), &image, "cp sparse");
}

fn fincore_resident(path: &Path) -> Option<u64> {
    let o = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES", s(path)])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

#[test]
fn cp_leaves_no_destination_pages_in_the_page_cache() {
    let dir = scratch();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    fs::write(&src, bytes((4 << 20) + 17, 5)).unwrap();
    if fincore_resident(&src).is_none() {
        println!("skipped: fincore (util-linux) is missing or does not work here");
        return;
    }
    assert_ok(&dio(&["cp", s(&src), s(&dst)]), "cp");
    assert_eq!(
        fincore_resident(&dst),
        Some(0),
        "pages of DST in the page cache"
    );
}

#[test]
fn missing_file_exits_1_with_a_dio_message() {
    let dir = scratch();
    let missing = dir.path().join("no-such-file");
    for args in [
        vec!["cat", s(&missing)],
        vec!["cp", s(&missing), s(dir.path())],
        vec!["bench", s(dir.path()), "--runtime", "0.1"],
    ] {
        let o = dio(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.starts_with("dio: "), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        vec!["cat", "--bogus", "x"],
        vec!["bench", "--rw", "sideways"],
        vec!["bench", "--bs", "4q"],
        vec!["frobnicate"],
        vec![],
    ] {
        let o = dio(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn copying_a_file_onto_itself_is_refused() {
    let dir = scratch();
    let f = dir.path().join("f");
    let data = bytes(9000, 6);
    fs::write(&f, &data).unwrap();
    let o = dio(&["cp", s(&f), s(&f)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("same file"));
    same_bytes(&fs::read(&f).unwrap(), &data, "the file is untouched");
}

#[test]
fn help_teaches_each_command_and_version_prints() {
    let o = dio(&["--help"]);
    assert_ok(&o, "--help");
    let help = String::from_utf8_lossy(&o.stdout);
    for word in ["cat", "cp", "bench", "Examples"] {
        assert!(help.contains(word), "help lacks {word}:\n{help}");
    }
    let o = dio(&["--version"]);
    assert_ok(&o, "--version");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("dio "));
}

#[test]
fn cat_into_a_closed_pipe_exits_quietly() {
    let dir = scratch();
    let src = dir.path().join("big");
    fs::write(&src, bytes(16 << 20, 7)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(["cat", s(&src)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // stdout is dropped here: the reader is gone, as with `| head -c1`.
    let o = child.wait_with_output().unwrap();
    assert_ok(&o, "cat into a closed pipe");
    assert!(
        stderr(&o).lines().all(|l| l.starts_with("dio: note:")),
        "{}",
        stderr(&o)
    );
}

fn json(o: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.trim().lines().count(), 1, "one JSON line: {text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad JSON {e}: {text}"))
}

#[test]
fn bench_json_reports_iops_bandwidth_latency_and_cpu() {
    let dir = scratch();
    let target = dir.path().join("bench.dat");
    for (rw, engine) in [
        ("randread", "auto"),
        ("randwrite", "sync"),
        ("read", "auto"),
    ] {
        let o = dio(&[
            "bench",
            s(&target),
            "--rw",
            rw,
            "--bs",
            "4k",
            "--qd",
            "4",
            "--size",
            "4M",
            "--runtime",
            "0.3",
            "--engine",
            engine,
            "--json",
        ]);
        assert_ok(&o, &format!("bench {rw} {engine}"));
        let v = json(&o);
        for key in ["iops", "bw_bytes", "cpu_usr", "cpu_sys"] {
            assert!(v[key].as_f64().is_some(), "{key} missing: {v}");
        }
        assert!(v["iops"].as_f64().unwrap() > 0.0, "{v}");
        for key in ["p50", "p99", "p999"] {
            assert!(
                v["lat_ns"][key].as_u64().is_some_and(|n| n > 0),
                "lat_ns.{key}: {v}"
            );
        }
        assert!(v["lat_ns"]["p50"].as_u64() <= v["lat_ns"]["p999"].as_u64());
    }
    // The missing target was created and laid out to --size.
    assert_eq!(fs::metadata(&target).unwrap().len(), 4 << 20);
}

#[test]
fn bench_buffered_json_works_too() {
    let dir = scratch();
    let target = dir.path().join("bench.dat");
    let o = dio(&[
        "bench",
        s(&target),
        "--rw",
        "randread",
        "--size",
        "2M",
        "--qd",
        "2",
        "--runtime",
        "0.2",
        "--buffered",
        "--json",
    ]);
    assert_ok(&o, "bench --buffered");
    assert_eq!(json(&o)["mode"], "buffered");
}

#[test]
fn bench_with_fixed_buffers_runs_on_both_back_ends() {
    let dir = scratch();
    let target = dir.path().join("bench.dat");
    for (engine, rw) in [
        ("auto", "randwrite"),
        ("auto", "read"),
        ("sync", "randread"),
    ] {
        let o = dio(&[
            "bench",
            s(&target),
            "--rw",
            rw,
            "--bs",
            "4k",
            "--qd",
            "4",
            "--size",
            "4M",
            "--runtime",
            "0.2",
            "--engine",
            engine,
            "--fixed-bufs",
            "--json",
        ]);
        assert_ok(&o, &format!("bench --fixed-bufs {engine} {rw}"));
        assert!(json(&o)["iops"].as_f64().unwrap() > 0.0);
        if engine == "sync" {
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("needs io_uring"),
                "no note on the sync back end"
            );
        }
    }
}

#[test]
fn default_bench_prints_a_table_and_removes_its_scratch_file() {
    let dir = scratch();
    let o = dio_in(
        Some(dir.path()),
        &["bench", "--runtime", "0.2", "--size", "16M"],
    );
    assert_ok(&o, "dio bench");
    let out = String::from_utf8_lossy(&o.stdout);
    for w in [
        "randread 4k qd32",
        "randwrite 4k qd32",
        "read 1M qd8",
        "write 1M qd8",
    ] {
        for mode in ["direct", "buffered"] {
            let rows = out
                .lines()
                .filter(|l| l.starts_with(w) && l.split_whitespace().any(|m| m == mode))
                .count();
            assert!(rows >= 1, "a {mode} row for {w}:\n{out}");
        }
    }
    assert!(
        !dir.path().join("dio-bench.tmp").exists(),
        "scratch file left behind"
    );
}

#[test]
fn ctrl_c_stops_the_default_bench_and_removes_its_scratch_file() {
    let dir = scratch();
    let child = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(["bench", "--runtime", "5", "--size", "16M"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let scratch_file = dir.path().join("dio-bench.tmp");
    let t0 = Instant::now();
    while !scratch_file.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(
        !scratch_file.exists(),
        "scratch file left behind after Ctrl-C"
    );
}

#[test]
fn block_devices_copy_to_and_from_a_loop_device() {
    let dir = scratch();
    let backing = dir.path().join("backing");
    let dev_len = 8usize << 20;
    fs::write(&backing, vec![0xAB; dev_len]).unwrap();
    let dev = match LoopDev::attach(&backing, 4096) {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: no loop device ({why})");
            return;
        }
    };

    // File to device: the unaligned tail keeps the device's own bytes after it.
    let src = dir.path().join("src");
    let data = bytes((3 << 20) + 1234, 8);
    fs::write(&src, &data).unwrap();
    assert_ok(&dio(&["cp", s(&src), s(dev.path())]), "cp file -> loop");
    let o = dio(&["cat", s(dev.path())]);
    assert_ok(&o, "cat loop");
    assert_eq!(o.stdout.len(), dev_len);
    same_bytes(&o.stdout[..data.len()], &data, "device prefix");
    assert!(
        o.stdout[data.len()..].iter().all(|&b| b == 0xAB),
        "device past the copy changed"
    );

    // Device to file: the whole device.
    let back = dir.path().join("back");
    assert_ok(
        &dio(&["cp", "--engine", "sync", s(dev.path()), s(&back)]),
        "cp loop -> file",
    );
    same_bytes(&fs::read(&back).unwrap(), &o.stdout, "device copied back");

    // A sparse source onto a device: its holes arrive as zeros.
    let sparse = dir.path().join("sparse");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data[..5000], 300_000).unwrap();
    let mut image = vec![0u8; 1 << 20];
    image[300_000..305_000].copy_from_slice(&data[..5000]);
    assert_ok(
        &dio(&["cp", s(&sparse), s(dev.path())]),
        "cp sparse -> loop",
    );
    let o = dio(&["cat", s(dev.path())]);
    same_bytes(&o.stdout[..1 << 20], &image, "sparse source on the device");

    // Too small a device, and a write bench without --force, are refused.
    let huge = dir.path().join("huge");
    fs::File::create(&huge).unwrap().set_len(16 << 20).unwrap();
    assert_eq!(dio(&["cp", s(&huge), s(dev.path())]).status.code(), Some(1));
    let o = dio(&["bench", s(dev.path()), "--rw", "write", "--runtime", "0.1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = dio(&[
        "bench",
        s(dev.path()),
        "--rw",
        "randread",
        "--runtime",
        "0.2",
        "--json",
    ]);
    assert_ok(&o, "bench on the loop device");
    assert!(json(&o)["iops"].as_f64().unwrap() > 0.0);
}

/// Every example of the library is named in the README, with the command that runs
/// it on its built-in default (no arguments).
#[test]
fn readme_names_every_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let mut n = 0;
    for e in fs::read_dir(root.join("crates/dio/examples")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".rs") else {
            continue;
        };
        n += 1;
        assert!(
            readme.contains(&format!("--example {stem} ")),
            "README does not name the example {stem}"
        );
    }
    assert!(n >= 5);
}
