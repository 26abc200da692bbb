//! `dio fsx` as a user runs it: every target for a few seconds (the CI's short soak,
//! about 25 s in all), the figures at the end, and exit 1 with the operation log and
//! the first wrong byte on a divergence. Loop devices need root; ext images need
//! mkfs.ext4: those parts skip with a printed reason.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`), never /tmp: tmpfs may
//! refuse O_DIRECT.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dio_testkit::{assert_fsck_clean, have, is_root, mke2fs, LoopDev};
use tempfile::TempDir;

fn scratch() -> TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

/// Run dio, killed after `secs` (no test hangs).
fn dio_bounded(secs: u64, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dio");
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().expect("wait for dio").is_some() {
            return child.wait_with_output().expect("dio output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("dio output");
            panic!(
                "dio {args:?} ran past {secs} s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Assert a clean run and return its stdout.
fn clean(args: &[&str], secs: u64) -> String {
    let o = dio_bounded(secs, args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success(),
        "dio {args:?}: exit {:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status.code()
    );
    assert!(
        out.contains("0 divergences") && out.contains("ops/s"),
        "{out}"
    );
    eprintln!(
        "dio {}: {}",
        args.join(" "),
        out.lines().next().unwrap_or("")
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn ram_device_run_is_clean_and_reports_ops_per_second() {
    let out = clean(&["fsx", "mem", "--seed", "1", "--ops", "3000"], 120);
    assert!(out.contains("seed 1: 30"), "{out}");
}

#[test]
fn same_seed_same_operations() {
    let a = clean(&["fsx", "mem:1M", "--seed", "42", "--ops", "500"], 120);
    let b = clean(&["fsx", "mem:1M", "--seed", "42", "--ops", "500"], 120);
    // Timing differs; the operation mix does not.
    let mix = |o: &str| {
        o.split(" calls")
            .nth(1)
            .map(|r| r.split(';').next().unwrap_or("").to_string())
    };
    assert_eq!(mix(&a), mix(&b));
}

#[test]
fn divergence_exits_1_with_the_op_log_and_the_first_wrong_byte() {
    let o = dio_bounded(
        120,
        &[
            "fsx",
            "mem:1M",
            "--seed",
            "3",
            "--ops",
            "2000",
            "--corrupt-model-at",
            "200",
            "--log",
            "8",
        ],
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("divergence at op"), "{out}");
    assert!(out.contains("first wrong byte at file offset"), "{out}");
    assert!(out.contains("operation log (last 8 ops)"), "{out}");
    assert!(err.contains("repeat with --seed 3"), "{err}");
}

#[test]
fn usage_errors_are_refused() {
    let o = dio_bounded(30, &["fsx", "somefile", "--faults", "0.1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("--faults needs the RAM device"));
    let o = dio_bounded(30, &["fsx", "mem", "--ops", "1", "--duration", "1"]);
    assert_eq!(o.status.code(), Some(2));
}

fn ext_image(dir: &Path) -> Result<std::path::PathBuf, String> {
    if !have("mke2fs") {
        return Err("mke2fs is not installed".into());
    }
    let src = dir.join("ext-src");
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    // A size that is not a multiple of any block: the span ends mid-sector.
    let data: Vec<u8> = (0..(2u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("data.bin"), data).map_err(|e| e.to_string())?;
    let img = dir.join("ext.img");
    mke2fs(&img, &["-t", "ext4", "-b", "4096", "-d", s(&src)], 16);
    Ok(img)
}

/// The CI's short soak: every target for a few seconds with zero divergences.
#[test]
fn short_soak_on_every_target() {
    let dir = scratch();
    // Seed 203's request limits (6 KiB on 4 KiB blocks) cut inside fs blocks.
    let mem = "fsx mem --faults 0.01 --seed 203 --duration 4";
    clean(&mem.split(' ').collect::<Vec<_>>(), 60);
    let small = "fsx mem:1M --block 1K --seed 16 --duration 2";
    clean(&small.split(' ').collect::<Vec<_>>(), 60);
    let f = dir.path().join("host.bin");
    clean(
        &[
            "fsx",
            s(&f),
            "--engine",
            "sync",
            "--seed",
            "12",
            "--duration",
            "4",
        ],
        60,
    );
    clean(
        &[
            "fsx",
            s(&f),
            "--engine",
            "auto",
            "--seed",
            "13",
            "--duration",
            "4",
        ],
        60,
    );

    let backing = dir.path().join("loop.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(16 << 20))
        .expect("loop backing file");
    if !is_root() {
        eprintln!("skip loop device: not root");
    } else {
        match LoopDev::attach(&backing, 512) {
            Err(e) => eprintln!("skip loop device: {e}"),
            Ok(dev) => {
                let dev = s(dev.path());
                let o = dio_bounded(30, &["fsx", dev, "--ops", "10"]);
                assert_eq!(o.status.code(), Some(1), "block device needs --force");
                clean(
                    &["fsx", dev, "--force", "--seed", "14", "--duration", "4"],
                    60,
                );
            }
        }
    }

    match ext_image(dir.path()) {
        Err(e) => eprintln!("skip ext image: {e}"),
        Ok(img) => {
            let loc = format!("{}:/data.bin", s(&img));
            clean(&["fsx", &loc, "--seed", "15", "--duration", "4"], 60);
            assert_fsck_clean(&img);
        }
    }
}

/// `dio fsx IMG:/file` on an allocating writer: the file grows, shrinks (truncates)
/// and has its holes filled, on ext4 without and with a journal, on ext3 (indirect
/// blocks and a journal) and on ext2, with io_uring and the sync engine (async
/// unaligned writes start their writes from completions while allocations read
/// metadata: this hung before), and on an ext4 image served over NBD by qemu-nbd
/// (skipped with a reason where qemu-nbd is missing). Then e2fsck -fn is clean and
/// the kernel reads the file as fsx's model says.
#[test]
fn ext_allocating_writer_matches_the_model_fsck_and_kernel() {
    use dio_testkit::{debugfs_w, kernel_mount, qemu_nbd_unix, skip};
    if !have("mke2fs") || !have("debugfs") {
        skip("mke2fs and debugfs are needed");
        return;
    }
    let dir = scratch();
    // (name, mke2fs arguments, engine or "nbd", operations)
    let cases: [(&str, &[&str], &str, &str); 6] = [
        (
            "ext4-nj",
            &["-t", "ext4", "-O", "^has_journal"],
            "auto",
            "800",
        ),
        (
            "ext4-nj-sync",
            &["-t", "ext4", "-O", "^has_journal"],
            "sync",
            "800",
        ),
        ("ext4-j", &["-t", "ext4"], "auto", "600"),
        ("ext3", &["-t", "ext3"], "auto", "400"),
        ("ext2", &["-t", "ext2"], "auto", "600"),
        ("ext4-j-nbd", &["-t", "ext4"], "nbd", "400"),
    ];
    for (i, (name, mkfs, engine, ops)) in cases.into_iter().enumerate() {
        if engine == "nbd" && !have("qemu-nbd") {
            skip(format!(
                "{name}: qemu-nbd is not installed (apt-get install qemu-utils)"
            ));
            continue;
        }
        let img = dir.path().join(format!("{name}.img"));
        mke2fs(&img, mkfs, 64);
        debugfs_w(&img, "write /dev/null f");
        let model = dir.path().join(format!("{name}.model"));
        let seed = (40 + i).to_string();
        let mut args = vec!["fsx"];
        // The image on a host file, or served over NBD (a Unix socket) while fsx
        // runs; the server stops before the checks below read the image.
        let (loc, server) = if engine == "nbd" {
            let sock = dir.path().join(format!("{name}.sock"));
            let server = qemu_nbd_unix(&img, "raw", &sock);
            (
                format!("nbd+unix:///disk?socket={}:/f", s(&sock)),
                Some(server),
            )
        } else {
            args.extend(["--engine", engine]);
            (format!("{}:/f", s(&img)), None)
        };
        args.extend(["--seed", &seed, "--ops", ops, "--dump", s(&model)]);
        args.insert(1, &loc);
        let out = clean(&args, 120);
        drop(server);
        // Growing, shrinking and hole-filling all happened.
        assert!(
            out.contains("allocating") || out.contains("truncates"),
            "{out}"
        );
        let truncates: u64 = out
            .split(", ")
            .find_map(|p| p.strip_suffix(" truncates"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(truncates > 0, "{name}: no truncates in {out}");
        assert_fsck_clean(&img);
        let want = std::fs::read(&model).expect("the model dump");
        assert!(!want.is_empty(), "{name}: the file ended empty");
        if let Some(m) = kernel_mount(&img, "ro") {
            let got = std::fs::read(m.path().join("f")).expect("read through the kernel");
            assert_eq!(got.len(), want.len(), "{name}: size as the kernel sees it");
            if let Some(at) = (0..got.len()).find(|&k| got[k] != want[k]) {
                panic!(
                    "{name}: byte {at}: the kernel reads {:#x}, the model says {:#x}",
                    got[at], want[at]
                );
            }
        }
        let _ = std::fs::remove_file(&img);
    }
}
