//! `dio cat --stats` and `dio cp --stats`: after the copy, the source device's
//! request counts go to stderr. On a host file, a loop block device, an NBD export
//! (qemu-nbd) and a file inside an ext4 image (mkfs.ext4 -d): the bytes read equal
//! what was asked (plus, for an image, its metadata), the request count fits the
//! block size, and stdout holds the data, byte for byte, and nothing else.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dio_testkit::{have, skip};

fn dio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cat-stats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What `--stats` printed about the device.
#[derive(Debug)]
struct Seen {
    reads: u64,
    bytes_read: u64,
    writes: u64,
    errors: u64,
    max_in_flight: u64,
    merges: u64,
    splits: u64,
}

/// The numbers in `s` (digits runs), in order.
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap())
        .collect()
}

/// Parse the stats block on stderr (and check its shape).
fn seen(o: &Output) -> Seen {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "dio failed: {err}");
    let line = |tag: &str| {
        err.lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("no `{tag}` line in: {err}"))
            .to_string()
    };
    assert!(err.contains("dio: stats: "), "{err}");
    // requests: R reads (B bytes), W writes (X bytes); F flushes, E errors; in flight I (max M)
    let n = numbers(line("requests: ").split_once("requests: ").unwrap().1);
    assert_eq!(n.len(), 8, "{err}");
    assert!(line("read latency: ").contains("p99 <= "), "{err}");
    let e = numbers(&line("merges"));
    Seen {
        reads: n[0],
        bytes_read: n[1],
        writes: n[2],
        errors: n[5],
        max_in_flight: n[7],
        merges: e[0],
        splits: e[1],
    }
}

/// A read of `len` bytes in `bs` requests at queue depth `qd`: the bytes, no
/// writes, no errors, at least one request per `bs`, and not more than one per
/// `bs` plus the engine's splits.
fn plausible(s: &Seen, len: u64, bs: u64, qd: u64) {
    let per_bs = len.div_ceil(bs);
    assert_eq!(s.bytes_read, len, "{s:?}");
    assert_eq!((s.writes, s.errors), (0, 0), "{s:?}");
    assert!(
        s.reads >= per_bs,
        "{} reads for {len} bytes at --bs {bs}: {s:?}",
        s.reads
    );
    assert!(s.reads <= per_bs + s.splits, "{s:?}");
    assert!(s.max_in_flight >= 1 && s.max_in_flight <= qd, "{s:?}");
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = dio_testkit::bytes(len, seed);
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn cat_stats_on_a_host_file_counts_the_reads_and_leaves_stdout_alone() {
    let dir = scratch("host");
    let f = dir.join("data.bin");
    let size = (3 << 20) + 5 * 4096;
    let data = random_file(&f, size, 1);
    let path = f.to_str().unwrap();
    // auto: io_uring where the kernel allows it; sync: the pread pool.
    for engine in ["auto", "sync"] {
        for (bs, bs_s) in [(65536u64, "64k"), (16384, "16k")] {
            let o = dio(&[
                "cat", path, "--stats", "--bs", bs_s, "--qd", "4", "--engine", engine,
            ]);
            let s = seen(&o);
            assert!(o.stdout == data, "{engine} {bs_s}: stdout is not the file");
            plausible(&s, size as u64, bs, 4);
            assert_eq!(s.merges, 0, "{s:?}");
        }
    }
    // A byte range: whole aligned blocks around it are read.
    let o = dio(&[
        "cat", path, "--stats", "--offset", "1000", "--length", "9000",
    ]);
    let s = seen(&o);
    assert!(o.stdout[..] == data[1000..10_000]);
    assert!(
        s.bytes_read >= 9000 && s.bytes_read <= 9000 + 2 * 4096,
        "{s:?}"
    );
    assert_eq!(s.reads, 1, "{s:?}");
    // cp --stats: the same block on stderr, the copy unchanged.
    let dst = dir.join("copy.bin");
    let o = dio(&["cp", "--stats", "--bs", "64k", path, dst.to_str().unwrap()]);
    let s = seen(&o);
    assert!(o.stdout.is_empty());
    plausible(&s, size as u64, 65536, 16);
    assert!(std::fs::read(&dst).unwrap() == data);
    // Without --stats: nothing on stderr.
    let o = dio(&["cat", path]);
    assert!(o.status.success() && o.stderr.is_empty() && o.stdout == data);
    // Where --stats does not apply: a usage error, nothing copied.
    let o = dio(&["cp", "--stats", "-r", path, dir.join("t").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!dir.join("t").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cat_stats_on_a_loop_block_device() {
    if !have("losetup") {
        skip("losetup is not installed");
        return;
    }
    let dir = scratch("loop");
    let f = dir.join("backing.img");
    let size = 2 << 20;
    let data = random_file(&f, size, 2);
    let dev = match dio_testkit::LoopDev::attach(&f, 512) {
        Ok(d) => d,
        Err(why) => {
            skip(why);
            return;
        }
    };
    let o = dio(&[
        "cat",
        dev.path().to_str().unwrap(),
        "--stats",
        "--bs",
        "128k",
        "--qd",
        "8",
    ]);
    let s = seen(&o);
    assert!(o.stdout == data, "stdout is not the device's bytes");
    plausible(&s, size as u64, 128 << 10, 8);
    drop(dev);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// qemu-nbd serving a raw file on a Unix socket, killed on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cat_stats_on_an_nbd_export() {
    if !have("qemu-nbd") {
        skip("qemu-nbd is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = scratch("nbd");
    let f = dir.join("export.img");
    let size = 2 << 20;
    let data = random_file(&f, size, 3);
    let sock = dir.join("s");
    let child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--shared=4",
            "-x",
            "disk",
            "-f",
            "raw",
            "-k",
        ])
        .arg(&sock)
        .arg(&f)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut srv = QemuNbd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(srv.0.try_wait().unwrap().is_none(), "qemu-nbd exited");
        assert!(Instant::now() < deadline, "qemu-nbd did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let o = dio(&["cat", &uri, "--stats", "--bs", "64k", "--qd", "4"]);
    let s = seen(&o);
    assert!(o.stdout == data, "stdout is not the export's bytes");
    plausible(&s, size as u64, 64 << 10, 4);
    drop(srv);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cat_stats_on_a_file_inside_an_ext4_image_counts_data_and_metadata() {
    if !have("mkfs.ext4") {
        skip("mkfs.ext4 is not installed");
        return;
    }
    let dir = scratch("ext");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let size = (1 << 20) + 3 * 4096;
    let data = random_file(&dir.join("src/data.bin"), size, 4);
    let img = dir.join("disk.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(dir.join("src"))
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let before = std::fs::read(&img).unwrap();
    let loc = format!("{}:/data.bin", img.display());
    let o = dio(&["cat", &loc, "--stats", "--bs", "64k", "--qd", "4"]);
    let s = seen(&o);
    assert!(o.stdout == data, "stdout is not the file's bytes");
    // The file's data, plus the superblock, group descriptors, inode table block
    // and directory blocks the lookup read.
    let size = size as u64;
    assert!(
        s.bytes_read > size && s.bytes_read <= size + (256 << 10),
        "{s:?}"
    );
    assert!(s.reads > size.div_ceil(64 << 10), "{s:?}");
    assert!(s.reads <= size.div_ceil(64 << 10) + s.splits + 32, "{s:?}");
    assert_eq!((s.writes, s.errors), (0, 0), "{s:?}");
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    std::fs::remove_dir_all(&dir).unwrap();
}
