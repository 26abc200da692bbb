//! `dio cp` never loses data: SRC and DST sharing storage is refused before DST is
//! touched; a copy stopped by a signal or a full file system leaves DST holding
//! exactly the copied prefix (checked against the source with the kernel's view
//! of the file), and says so. Also `-`, streams, sparse copies and progress.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`), never /tmp: tmpfs may
//! refuse O_DIRECT. Tests that need loop devices or mounts skip, saying why, when
//! not root.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use dio_testkit::{bytes, have, is_root, mke2fs, output_with_stdin, skip, LoopDev, Mount};
use tempfile::TempDir;

fn scratch() -> TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

fn dio_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dio"));
    c.args(args);
    c
}

fn dio(args: &[&str]) -> Output {
    dio_cmd(args).output().expect("run dio")
}

fn dio_stdin(args: &[&str], input: &[u8]) -> Output {
    output_with_stdin(&mut dio_cmd(args), Some(input))
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
}

fn unpack(dir: &Path, name: &str) -> PathBuf {
    let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dio/tests/fixtures/ext")
        .join(format!("{name}.img.gz"));
    let mut b = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(gz).unwrap())
        .read_to_end(&mut b)
        .unwrap();
    let p = dir.join(format!("{name}.img"));
    fs::write(&p, b).unwrap();
    p
}

/// "holds the first N of M bytes" -> (N, M).
fn held(err: &str) -> (u64, Option<u64>) {
    let i = err
        .find("holds the first ")
        .unwrap_or_else(|| panic!("{err}"));
    let rest = &err[i + "holds the first ".len()..];
    let mut w = rest.split_whitespace();
    let n = w.next().unwrap().parse().unwrap();
    let m = match (w.next(), w.next()) {
        (Some("of"), Some(m)) => m.parse().ok(),
        _ => None,
    };
    (n, m)
}

// ---- 1. shared storage ----

#[test]
fn cp_refuses_a_source_inside_its_destination_and_touches_nothing() {
    let dir = scratch();
    let img = unpack(dir.path(), "ext4-1k");
    let before = fs::read(&img).unwrap();
    let inner = format!("{}:/hello.txt", s(&img));
    for (src, dst, says) in [
        (inner.as_str(), s(&img), "lives inside"),
        (s(&img), inner.as_str(), "lives inside"),
        (inner.as_str(), inner.as_str(), "same file"),
    ] {
        let o = dio(&["cp", src, dst]);
        assert_eq!(o.status.code(), Some(1), "cp {src} {dst}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "cp {src} {dst}: {}", stderr(&o));
        assert!(
            fs::read(&img).unwrap() == before,
            "cp {src} {dst} changed the image"
        );
    }
    // A hard link is the same inode.
    let a = dir.path().join("a");
    fs::write(&a, b"keep me").unwrap();
    let b = dir.path().join("b");
    fs::hard_link(&a, &b).unwrap();
    let o = dio(&["cp", s(&a), s(&b)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(fs::read(&a).unwrap(), b"keep me");
    // Two files of one image are fine.
    let o = dio(&["cp", &inner, &format!("{}:/frag", s(&img))]);
    assert_ok(&o, "cp between files of one image");
}

#[test]
fn cp_refuses_an_export_and_a_file_inside_it_before_connecting() {
    // Nothing listens on port 1: the refusal comes first.
    for (src, dst) in [
        ("nbd://127.0.0.1:1/x:/etc/passwd", "nbd://127.0.0.1:1/x"),
        ("nbd://127.0.0.1:1/x", "nbd://127.0.0.1:1/x:/f"),
    ] {
        let o = dio(&["cp", src, dst]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("inside"), "{}", stderr(&o));
    }
}

#[test]
fn cp_refuses_a_loop_device_and_its_backing_file() {
    if !is_root() {
        return skip("not root: no loop devices");
    }
    let dir = scratch();
    let img = unpack(dir.path(), "ext4-1k");
    let before = fs::read(&img).unwrap();
    let lo = match LoopDev::attach(&img, 512) {
        Ok(l) => l,
        Err(e) => return skip(format!("losetup: {e}")),
    };
    let lo = s(lo.path());
    let dev_inner = format!("{lo}:/hello.txt");
    let img_inner = format!("{}:/hello.txt", s(&img));
    for (src, dst) in [
        (s(&img), lo),
        (lo, s(&img)),
        (dev_inner.as_str(), s(&img)),
        (img_inner.as_str(), lo),
    ] {
        let o = dio(&["cp", src, dst]);
        assert_eq!(o.status.code(), Some(1), "cp {src} {dst}: {}", stderr(&o));
        assert!(stderr(&o).contains("refusing"), "{}", stderr(&o));
        drop(fs::File::open(&img).unwrap().sync_all());
        assert!(
            fs::read(&img).unwrap() == before,
            "cp {src} {dst} changed the image"
        );
    }
}

// ---- 2. interrupted and failed copies ----

fn kill(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Ctrl-C in the middle of a host-file copy: exit 130, the message, and DST cut
/// to exactly the bytes copied (compared with the source), not left at full size
/// with holes.
#[test]
fn ctrl_c_mid_copy_leaves_dst_holding_only_the_copied_prefix() {
    let dir = scratch();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let size = 96usize << 20;
    let data = bytes(size, 42);
    fs::write(&src, &data).unwrap();
    // Under way once DST (unnamed while it is written) has blocks.
    let o = interrupt_copy(&src, &dst, |pid| {
        dio_testkit::writes_unnamed_under(pid, dir.path())
    });
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: "), "{err}");
    let (n, m) = held(&err);
    assert_eq!(m, Some(size as u64), "{err}");
    assert!(n < size as u64, "{err}");
    let got = fs::read(&dst).unwrap();
    assert_eq!(got.len() as u64, n, "DST's length is the prefix it claims");
    assert!(
        got[..] == data[..n as usize],
        "DST's bytes are the source's"
    );
}

/// Ctrl-C in the middle of a slow copy (`--engine sync --bs 64k --qd 1`) of `src`
/// to `dst`: once `started` says it is under way, dio is stopped, sent SIGINT and
/// continued, so the signal lands mid-copy whatever the speed of the disk.
fn interrupt_copy(src: &Path, dst: &Path, mut started: impl FnMut(u32) -> bool) -> Output {
    let mut child = dio_cmd(&[
        "cp",
        "--engine",
        "sync",
        "--bs",
        "64k",
        "--qd",
        "1",
        s(src),
        s(dst),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("dio finished ({st}) before it could be interrupted");
        }
        if started(child.id()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    kill("-STOP", child.id());
    kill("-INT", child.id());
    kill("-CONT", child.id());
    child.wait_with_output().unwrap()
}

/// Ctrl-C in the middle of a copy to a block device: it says how far it got, and
/// those bytes are on the device (read back through the backing file).
#[test]
fn ctrl_c_mid_copy_to_a_device_reports_how_far_it_got() {
    if !is_root() {
        return skip("not root: no loop devices");
    }
    let dir = scratch();
    let back = dir.path().join("dev");
    fs::File::create(&back).unwrap().set_len(64 << 20).unwrap();
    let lo = match LoopDev::attach(&back, 512) {
        Ok(l) => l,
        Err(e) => return skip(format!("losetup: {e}")),
    };
    let src = dir.path().join("src");
    let size = 48usize << 20;
    let data = bytes(size, 11);
    fs::write(&src, &data).unwrap();
    // Under way once the first bytes are on the device.
    let mut first = vec![0u8; 4096];
    let o = interrupt_copy(&src, lo.path(), |_| {
        let mut f = fs::File::open(lo.path()).unwrap();
        f.read_exact(&mut first).unwrap();
        first[..] == data[..4096]
    });
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let (n, m) = held(&err);
    assert_eq!(m, Some(size as u64), "{err}");
    assert!(n > 0 && n < size as u64, "{err}");
    assert!(err.contains("what it held before"), "{err}");
    drop(lo);
    let got = fs::read(&back).unwrap();
    assert!(
        got[..n as usize] == data[..n as usize],
        "the prefix is on the device"
    );
}

/// Ctrl-C during a copy from a pipe: the same, with the bytes that arrived.
#[test]
fn ctrl_c_during_a_stream_copy_cuts_dst_to_what_was_written() {
    let dir = scratch();
    let dst = dir.path().join("dst");
    let data = bytes(3 << 20, 7);
    let mut child = dio_cmd(&["cp", "-", s(&dst)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The pipe holds 64 KiB: once this returns, dio has read most of it.
    stdin.write_all(&data[..2 << 20]).unwrap();
    kill("-INT", child.id());
    // Wake dio's read; it stops before taking more than this.
    let _ = stdin.write_all(&data[2 << 20..]);
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let (n, _) = held(&err);
    let got = fs::read(&dst).unwrap();
    assert_eq!(got.len() as u64, n, "{err}");
    assert!(got[..] == data[..n as usize]);
}

/// A small loop-mounted ext4 (`IMG.mnt`), unmounted and detached on drop.
fn small_fs(dir: &Path, mib: u64) -> Result<Mount, String> {
    if !have("mke2fs") {
        return Err("mke2fs is not installed".into());
    }
    let img = dir.join("small.ext4");
    mke2fs(&img, &["-t", "ext4"], mib);
    Mount::new(&img, "rw")
}

#[test]
fn a_full_file_system_leaves_the_copied_prefix_and_exits_1() {
    if !is_root() {
        return skip("not root: cannot loop-mount a small ext4");
    }
    let dir = scratch();
    let fsys = match small_fs(dir.path(), 16) {
        Ok(f) => f,
        Err(e) => return skip(format!("no small ext4: {e}")),
    };
    let src = dir.path().join("src");
    let size = 64usize << 20;
    let data = bytes(size, 3);
    fs::write(&src, &data).unwrap();
    for engine in ["auto", "sync"] {
        let dst = fsys.path().join(format!("dst-{engine}"));
        let o = dio(&["cp", "--engine", engine, s(&src), s(&dst)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        let (n, m) = held(&err);
        assert_eq!(m, Some(size as u64), "{err}");
        assert!(n > 0 && n < size as u64, "{err}");
        let got = fs::read(&dst).unwrap();
        assert_eq!(got.len() as u64, n, "{err}");
        assert!(
            got[..] == data[..n as usize],
            "{engine}: DST's bytes are the source's"
        );
        fs::remove_file(&dst).unwrap();
        // Let ext4 hand the freed blocks back before the next run.
        let _ = Command::new("sync").arg("-f").arg(fsys.path()).status();
    }
}

// ---- 7. `-` and streams ----

#[test]
fn dash_is_stdin_and_stdout_and_streams_use_plain_io() {
    let dir = scratch();
    let data = bytes((1 << 20) + 4097, 9);
    let f = dir.path().join("f");
    fs::write(&f, &data).unwrap();
    // cat - and cp - FILE
    let o = dio_stdin(&["cat", "-"], &data);
    assert_ok(&o, "cat -");
    assert!(o.stdout == data);
    let o = dio_stdin(&["cat", "-", "--offset", "5", "--length", "10"], &data);
    assert_eq!(o.stdout, &data[5..15]);
    let g = dir.path().join("g");
    let o = dio_stdin(&["cp", "-", s(&g)], &data);
    assert_ok(&o, "cp - g");
    assert!(fs::read(&g).unwrap() == data);
    // cp FILE -
    let o = dio(&["cp", s(&f), "-"]);
    assert_ok(&o, "cp f -");
    assert!(o.stdout == data);
    // /dev/null: a character device, written with plain I/O.
    let o = dio(&["cp", s(&f), "/dev/null"]);
    assert_ok(&o, "cp f /dev/null");
    assert!(stderr(&o).contains("character device"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("tmpfs"), "{}", stderr(&o));
    // A FIFO as the source.
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (fifo2, d2) = (fifo.clone(), data.clone());
    let writer = std::thread::spawn(move || fs::write(&fifo2, &d2).unwrap());
    let h = dir.path().join("h");
    let o = dio(&["cp", s(&fifo), s(&h)]);
    writer.join().unwrap();
    assert_ok(&o, "cp fifo h");
    assert!(stderr(&o).contains("pipe or FIFO"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("ext2"), "{}", stderr(&o));
    assert!(fs::read(&h).unwrap() == data);
    // Into an image file (with a journal), from a pipe: the file is replaced
    // by what the pipe held, through the journal.
    let img = unpack(dir.path(), "ext4-1k");
    let hello = format!("{}:/hello.txt", s(&img));
    let o = dio_stdin(&["cp", "-", &hello], b"HELLO");
    assert_ok(&o, "cp - img:/hello.txt");
    assert_eq!(dio(&["cat", &hello]).stdout, b"HELLO");
    if dio_testkit::have("e2fsck") {
        let o = Command::new("e2fsck")
            .args(["-fn", s(&img)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
}

// ---- 8. sparse ----

fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn zero_blocks_become_holes_unless_sparse_never() {
    let dir = scratch();
    let src = dir.path().join("zeros");
    let mut data = vec![0u8; 8 << 20];
    data[3 << 20..4 << 20].copy_from_slice(&bytes(1 << 20, 5));
    fs::write(&src, &data).unwrap();
    assert!(
        allocated(&src) >= 8 << 20,
        "the source's zeros are written blocks"
    );
    let dst = dir.path().join("dst");
    assert_ok(&dio(&["cp", s(&src), s(&dst)]), "cp");
    assert!(fs::read(&dst).unwrap() == data);
    assert!(
        allocated(&dst) <= (1 << 20) + (64 << 10),
        "{} allocated",
        allocated(&dst)
    );
    let full = dir.path().join("full");
    assert_ok(
        &dio(&["cp", "--sparse=never", s(&src), s(&full)]),
        "cp never",
    );
    assert!(fs::read(&full).unwrap() == data);
    assert!(
        allocated(&full) >= 8 << 20,
        "{} allocated",
        allocated(&full)
    );
}

#[test]
fn a_mostly_empty_device_copies_to_a_sparse_file() {
    if !is_root() {
        return skip("not root: no loop devices");
    }
    let dir = scratch();
    let back = dir.path().join("dev");
    let mut data = vec![0u8; 64 << 20];
    data[10 << 20..14 << 20].copy_from_slice(&bytes(4 << 20, 8));
    fs::write(&back, &data).unwrap();
    let lo = match LoopDev::attach(&back, 512) {
        Ok(l) => l,
        Err(e) => return skip(format!("losetup: {e}")),
    };
    let out = dir.path().join("out");
    assert_ok(&dio(&["cp", s(lo.path()), s(&out)]), "cp dev file");
    assert!(fs::read(&out).unwrap() == data);
    assert!(
        allocated(&out) <= (4 << 20) + (64 << 10),
        "{}",
        allocated(&out)
    );
}

// ---- 12. progress ----

#[test]
fn progress_flags_force_or_silence_the_final_line() {
    let dir = scratch();
    let src = dir.path().join("src");
    fs::write(&src, bytes(100_000, 1)).unwrap();
    let dst = dir.path().join("dst");
    let o = dio(&["cp", "--progress", s(&src), s(&dst)]);
    assert_ok(&o, "cp --progress");
    let e = stderr(&o);
    assert!(
        e.contains("100000 bytes") && e.contains(" s, ") && e.contains("/s"),
        "{e}"
    );
    let o = dio(&["cat", "--progress", s(&src)]);
    assert!(stderr(&o).contains("100000 bytes"), "{}", stderr(&o));
    for args in [vec!["cp", "--no-progress"], vec!["cp"]] {
        let mut a = args.clone();
        a.extend([s(&src), s(&dst)]);
        let o = dio(&a);
        assert_ok(&o, "cp");
        assert_eq!(stderr(&o), "", "{a:?}");
    }
}

/// Issue 15, item 3: when dio exits, no file stays referenced (io_uring tears its
/// ring down in a kernel worker a moment after the process closed it; dio releases
/// its registered file first), so the file system it wrote to unmounts at once.
#[test]
fn the_file_system_unmounts_right_after_dio_exits() {
    if !is_root() {
        return skip("not root: cannot loop-mount a small ext4");
    }
    let dir = scratch();
    let fsys = match small_fs(dir.path(), 32) {
        Ok(f) => f,
        Err(e) => return skip(format!("no small ext4: {e}")),
    };
    let img = dir.path().join("small.ext4");
    let src = dir.path().join("src");
    fs::write(&src, bytes(1 << 20, 5)).unwrap();
    for round in 0..20 {
        let dst = fsys.path().join(format!("x{round}"));
        let o = dio(&["cp", "--engine", "uring", s(&src), s(&dst)]);
        if round == 0 && !o.status.success() && stderr(&o).contains("io_uring") {
            return skip(format!("no io_uring here: {}", stderr(&o)));
        }
        assert!(o.status.success(), "round {round}: {}", stderr(&o));
        let u = Command::new("umount").arg(fsys.path()).output().unwrap();
        assert!(
            u.status.success(),
            "round {round}: umount right after dio exited: {}",
            String::from_utf8_lossy(&u.stderr)
        );
        let m = Command::new("mount")
            .args(["-o", "loop", s(&img), s(fsys.path())])
            .output()
            .unwrap();
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
        assert_eq!(
            fs::read(&dst).unwrap(),
            fs::read(&src).unwrap(),
            "round {round}"
        );
    }
}

/// A copy killed where it cannot clean up (SIGKILL, as a crash) leaves no new DST:
/// the file is made unnamed and takes its name only once it holds what it will
/// hold. Caught signals still leave the named prefix (tests above); a finished
/// copy has its name, its bytes and the mode a plain create gives.
#[test]
fn a_killed_copy_leaves_no_new_dst() {
    let dir = scratch();
    let dst = dir.path().join("new");
    // Bytes in, the stream left open: the copy is under way, not done.
    let (mut child, stdin) =
        dio_testkit::cp_from_open_pipe(env!("CARGO_BIN_EXE_dio"), &dst, &bytes(4 << 20, 3));
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    assert!(
        fs::symlink_metadata(&dst).is_err(),
        "a killed copy left {} ({} bytes) that claims bytes it never got",
        dst.display(),
        fs::metadata(&dst).map(|m| m.len()).unwrap_or(0)
    );
    let src = dir.path().join("src");
    fs::write(&src, bytes(3 << 20, 4)).unwrap();
    assert_ok(&dio(&["cp", "--no-progress", s(&src), s(&dst)]), "cp");
    assert!(fs::read(&dst).unwrap() == fs::read(&src).unwrap());
    let umask = {
        let probe = dir.path().join("umask-probe");
        fs::write(&probe, b"").unwrap();
        0o666 & !fs::metadata(&probe).unwrap().mode() & 0o777
    };
    assert_eq!(fs::metadata(&dst).unwrap().mode() & 0o777, 0o666 & !umask);
}
