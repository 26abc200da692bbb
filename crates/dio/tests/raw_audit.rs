//! Defects found by driving the raw and NBD clients with real tools (rawaudit):
//!
//! - an NBD export whose size is not a multiple of the block size took writes past
//!   its end and dropped the bytes past it (the server clips them) while the call
//!   reported them written, and its size grew (byte-granular and aligned writes
//!   alike); a truncate "resized" it too. Judged
//!   against the file nbdkit serves (`nbdkit file`), read with `std::fs`;
//! - `RawFile::open` on a FIFO blocked in `open(2)` until a peer came (a FIFO cannot
//!   do direct I/O anyway), and called /dev's file system unable to do O_DIRECT for
//!   a character device: both now fail at once with `EINVAL`.
//!
//! Scratch files live under the target dir (`CARGO_TARGET_TMPDIR`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use dio::nbd::{NbdConfig, NbdFile, NbdUri};
use dio::{Flags, RawFile, RawOptions};
use dio_testkit::{bytes, need, Listen, ServerProcess};

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir under target/")
}

/// `nbdkit file BACKING` on a Unix socket in `dir`: the export is the file, byte
/// for byte, so the file is the oracle of what the server holds.
fn nbdkit_file(dir: &Path, backing: &Path) -> (ServerProcess, NbdUri) {
    let sock = dir.join("s");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(backing);
    let srv = ServerProcess::start(cmd, Listen::Unix(&sock));
    (srv, NbdUri::unix(&sock, ""))
}

fn cfg() -> NbdConfig {
    NbdConfig::default().timeout(Duration::from_secs(10))
}

/// An export of 1,000,001 bytes (the last 512-byte block holds 65 of them): writes
/// inside it land byte-exact; a write past its end, byte-granular or aligned, fails
/// with ENOSPC, never counts bytes the server dropped, and leaves the size alone;
/// truncate cannot resize it.
#[test]
fn nbd_export_of_odd_size_refuses_writes_past_its_end() {
    if !need(&["nbdkit"]) {
        return;
    }
    let dir = scratch("nbd-odd");
    let backing = dir.path().join("export.bin");
    const SIZE: usize = 1_000_001;
    let mut model = bytes(SIZE, 7);
    std::fs::write(&backing, &model).expect("write backing file");
    let (_srv, uri) = nbdkit_file(dir.path(), &backing);
    let f = NbdFile::open(&uri, true, &cfg()).expect("open export");
    let d = f.direct();
    assert_eq!(d.size(), SIZE as u64);

    // Inside the partial last block, up to the very last byte: fine.
    let n = d
        .write_at(SIZE as u64 - 3, b"xyz", Flags::UNALIGNED)
        .expect("write the last 3 bytes");
    assert_eq!(n, 3);
    model[SIZE - 3..].copy_from_slice(b"xyz");
    d.sync_data().expect("flush");

    // Across the end (byte-granular), at the end, aligned blocks across the end and
    // wholly past it.
    for (off, len) in [
        (SIZE as u64 - 1, 3usize),
        (SIZE as u64, 1),
        (999_936, 512),
        (999_936 - 4096, 8192),
        (1_000_448, 512),
    ] {
        let flags = if off % 512 == 0 && len % 512 == 0 {
            Flags::NONE
        } else {
            Flags::UNALIGNED
        };
        let buf = dio::AlignedBuf::from_slice(&vec![0x5a; len], 4096);
        let r = d.write_at(off, &buf, flags);
        let e = r.expect_err(&format!(
            "a write of {len} at {off} passes the export's end"
        ));
        // ENOSPC from the export's map; an aligned request wholly past the last
        // block meets the engine's size limit first (EFBIG).
        assert!(
            [libc::ENOSPC, libc::EFBIG].contains(&e.errno()),
            "write of {len} at {off}: {e}"
        );
        assert_eq!(
            d.size(),
            SIZE as u64,
            "size after a write of {len} at {off}"
        );
        // A write refused by the export's end (ENOSPC, found once the request was
        // done) left the bytes that fit inside it (as a short write on a block
        // device does); one refused up front (EFBIG) wrote nothing.
        if off < SIZE as u64 && e.errno() == libc::ENOSPC {
            let inside = SIZE - off as usize;
            model[off as usize..].copy_from_slice(&vec![0x5a; inside]);
        }
    }
    d.sync_data().expect("flush");
    assert_eq!(
        std::fs::metadata(&backing).expect("stat").len(),
        SIZE as u64,
        "the backing file keeps its size"
    );
    let got = std::fs::read(&backing).expect("read backing");
    let first = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(got == model, "export bytes: first difference at {first:?}");

    // The size is the export's.
    let e = d.truncate(SIZE as u64 + 1).expect_err("grow an export");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    let e = d.truncate(4096).expect_err("shrink an export");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert_eq!(d.size(), SIZE as u64);
    // Reads stop at the end, whole.
    let mut tail = vec![0u8; 100];
    let n = d
        .read_at(SIZE as u64 - 10, &mut tail, Flags::UNALIGNED)
        .expect("read the tail");
    assert_eq!(&tail[..n], &model[SIZE - 10..]);
}

/// Open `path` on another thread; the answer within 20 s (None: it hung, and the
/// thread is left blocked for the caller to release).
fn open_bounded(path: PathBuf, write: bool) -> Option<dio::Result<RawFile>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let opts = RawOptions {
            write,
            ..RawOptions::default()
        };
        let _ = tx.send(RawFile::open(&path, &opts));
    });
    rx.recv_timeout(Duration::from_secs(20)).ok()
}

/// A FIFO with nobody at the other end, and /dev/null: refused at once with EINVAL
/// (before the fix, the FIFO's open blocked until a peer came).
#[test]
fn fifos_and_character_devices_are_refused_without_blocking() {
    if !need(&["mkfifo"]) {
        return;
    }
    let dir = scratch("fifo");
    let fifo = dir.path().join("f");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    for write in [false, true] {
        match open_bounded(fifo.clone(), write) {
            Some(Err(e)) => assert_eq!(e.errno(), libc::EINVAL, "{e}"),
            Some(Ok(_)) => panic!("a FIFO opened for direct I/O (write {write})"),
            None => {
                // Release the blocked open before failing.
                let _ = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&fifo);
                panic!("opening a FIFO with no peer hung (write {write})");
            }
        }
    }
    for write in [false, true] {
        match open_bounded(PathBuf::from("/dev/null"), write) {
            Some(Err(e)) => assert_eq!(e.errno(), libc::EINVAL, "{e}"),
            Some(Ok(_)) => panic!("/dev/null opened for direct I/O"),
            None => panic!("opening /dev/null hung"),
        }
    }
}

/// A zram device made for a test (`/sys/class/zram-control/hot_add`), removed on
/// drop.
struct Zram {
    id: String,
}

impl Zram {
    fn add(size: u64) -> Result<Zram, String> {
        let id = std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .map_err(|e| format!("zram hot_add: {e}"))?
            .trim()
            .to_string();
        let z = Zram { id };
        std::fs::write(
            format!("/sys/block/zram{}/disksize", z.id),
            size.to_string(),
        )
        .map_err(|e| format!("zram disksize: {e}"))?;
        Ok(z)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/zram{}", self.id))
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = std::fs::write("/sys/class/zram-control/hot_remove", &self.id);
    }
}

/// zram takes memory that starts 512 bytes into a page for O_DIRECT (its DMA
/// alignment says so) and then moves the wrong bytes, both ways. Through dio,
/// reads and writes from such memory land byte-exact, judged by plain (page
/// cache) reads and writes of the device.
#[test]
fn zram_reads_and_writes_from_memory_off_a_page_are_byte_exact() {
    use std::io::{Read, Seek, SeekFrom, Write};
    if !dio_testkit::is_root() {
        return dio_testkit::skip("not root: no zram devices");
    }
    if !Path::new("/sys/class/zram-control/hot_add").exists() {
        return dio_testkit::skip("no zram module (/sys/class/zram-control)");
    }
    let z = match Zram::add(8 << 20) {
        Ok(z) => z,
        Err(e) => return dio_testkit::skip(e),
    };
    let opts = RawOptions {
        write: true,
        ..RawOptions::default()
    };
    let f = RawFile::open(z.path(), &opts).expect("open zram");
    let d = f.direct();
    let align = d.geometry().buffer_align();
    let len = 64 << 10;

    // dio writes from memory 512 bytes into a page; the kernel reads it back.
    let data = bytes(len, 11);
    let mut mem = dio::AlignedBuf::new(len + 4096, align.max(4096));
    mem[512..512 + len].copy_from_slice(&data);
    let n = d
        .write_at(1 << 20, &mem[512..512 + len], Flags::UNALIGNED)
        .expect("write");
    assert_eq!(n, len);
    d.sync_data().expect("sync");
    let mut back = vec![0u8; len];
    let mut plain = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(z.path())
        .expect("open zram plainly");
    plain.seek(SeekFrom::Start(1 << 20)).unwrap();
    plain.read_exact(&mut back).unwrap();
    assert!(back == data, "bytes written from memory off a page");

    // The kernel writes; dio reads into memory 512 bytes into a page.
    let data = bytes(len, 12);
    plain.seek(SeekFrom::Start(2 << 20)).unwrap();
    plain.write_all(&data).unwrap();
    plain.sync_all().unwrap();
    let mut mem = dio::AlignedBuf::new(len + 4096, align.max(4096));
    let n = d
        .read_at(2 << 20, &mut mem[512..512 + len], Flags::UNALIGNED)
        .expect("read");
    assert_eq!(n, len);
    assert!(
        mem[512..512 + len] == data[..],
        "bytes read into memory off a page"
    );
}

/// An export whose size is not a multiple of the minimum block size the server
/// announces (nbdkit's blocksize-policy filter, 4096): its tail can only be
/// reached with requests the server refuses, and every read touching it (a whole
/// `cat`) failed with EINVAL from the server. Now the open refuses it by name; the
/// same export rounded to the block opens and reads byte-exact.
#[test]
fn nbd_export_with_an_unreachable_tail_is_refused_at_open() {
    if !need(&["nbdkit"]) {
        return;
    }
    let has_filter = Command::new("nbdkit")
        .args(["--filter=blocksize-policy", "null", "--dump-plugin"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_filter {
        return dio_testkit::skip("nbdkit has no blocksize-policy filter");
    }
    let dir = scratch("nbd-minblock");
    for (size, opens) in [(1_000_001usize, false), (1_003_520, true)] {
        let backing = dir.path().join(format!("e{size}"));
        let data = bytes(size, 9);
        std::fs::write(&backing, &data).unwrap();
        let sock = dir.path().join(format!("s{size}"));
        let mut cmd = Command::new("nbdkit");
        cmd.args([
            "-f",
            "--exit-with-parent",
            "--filter=blocksize-policy",
            "-U",
        ])
        .arg(&sock)
        .arg("file")
        .arg(&backing)
        .args([
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ]);
        let _srv = ServerProcess::start(cmd, Listen::Unix(&sock));
        let r = NbdFile::open(&NbdUri::unix(&sock, ""), false, &cfg());
        if !opens {
            let e = r.expect_err("an export with an unreachable tail opened");
            assert!(
                matches!(
                    &e,
                    dio::Error::Incompatible(i) if i.feature == dio::Feature::Nbd
                ),
                "{e}"
            );
            continue;
        }
        let f = r.expect("open an export of whole blocks");
        let mut back = vec![0u8; size];
        let mut at = 0;
        while at < size {
            let n = f
                .direct()
                .read_at(at as u64, &mut back[at..], Flags::UNALIGNED)
                .expect("read");
            assert!(n > 0, "read stopped at {at}");
            at += n;
        }
        assert!(back == data, "export bytes");
    }
}
