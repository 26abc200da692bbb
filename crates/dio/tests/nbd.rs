//! The NBD device and client against real servers on loopback, started here:
//! qemu-nbd serving raw and qcow2 images, nbdkit's memory plugin with its error,
//! delay, fua and blocksize-policy filters for fault injection, and a scripted fake
//! server (in this file) for protocol violations no real server commits.
//!
//! Tests skip with a printed reason when a server is not installed (`.ci/run`
//! installs them). Every test is bounded in time, and every server it starts is
//! killed by a guard, also when the test fails.

mod common;

use common::{aligned, bounded, have, random_bytes as pattern};
use dio_testkit::{free_port, qemu_nbd_tcp, qemu_nbd_unix, Listen, ServerProcess};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dio::nbd::NbdFile;
use dio::nbd::{NbdConfig, NbdDevice, NbdUri};
use dio::{AlignedBuf, CompletionMode, Device, Error, Flags};

const MIB: usize = 1 << 20;

/// A fresh scratch directory under the target dir (unix socket paths must stay
/// short, so the name is compact).
fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "nbd-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Skip (return from the test) with a printed reason if `tool` is missing.
macro_rules! need {
    ($tool:expr) => {
        if !have($tool) {
            eprintln!(
                "skipped: {} is not installed (apt-get install {})",
                $tool,
                match $tool {
                    "qemu-nbd" | "qemu-img" => "qemu-utils",
                    t => t,
                }
            );
            return;
        }
    };
}

/// A server process, killed and reaped on drop; its scratch directory goes too.
struct Server {
    proc: ServerProcess,
    uri: NbdUri,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Start `cmd` (which listens on `uri`) and wait until it accepts connections.
    fn start(cmd: Command, uri: NbdUri, dir: PathBuf) -> Server {
        let proc = match &uri.address {
            dio::nbd::Address::Unix(p) => ServerProcess::start(cmd, Listen::Unix(p)),
            dio::nbd::Address::Tcp { port, .. } => ServerProcess::start(cmd, Listen::Tcp(*port)),
        };
        Server { proc, uri, dir }
    }

    /// qemu-nbd serving `image` (format `fmt`) as export "disk", on a Unix socket or
    /// on TCP 127.0.0.1. `--persistent` keeps it up across connections (the
    /// readiness probe is one); `--shared=8` lets tests open several.
    fn qemu(dir: PathBuf, image: &Path, fmt: &str, tcp: bool) -> Server {
        let (proc, uri) = if tcp {
            let (proc, port) = qemu_nbd_tcp(image, fmt);
            (proc, NbdUri::tcp("127.0.0.1", port, "disk"))
        } else {
            let sock = dir.join("s");
            (qemu_nbd_unix(image, fmt, &sock), NbdUri::unix(sock, "disk"))
        };
        Server { proc, uri, dir }
    }

    /// nbdkit with `filters`, the memory plugin of `size` and `args`, on a Unix
    /// socket.
    fn nbdkit(dir: PathBuf, filters: &[&str], size: &str, args: &[&str]) -> Server {
        Server::nbdkit_with(dir, &[], filters, size, args)
    }

    fn nbdkit_with(
        dir: PathBuf,
        flags: &[&str],
        filters: &[&str],
        size: &str,
        args: &[&str],
    ) -> Server {
        let sock = dir.join("s");
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "-U"]).arg(&sock);
        cmd.args(flags);
        for f in filters {
            cmd.arg(format!("--filter={f}"));
        }
        cmd.arg("memory").arg(size).args(args);
        Server::start(cmd, NbdUri::unix(sock, ""), dir)
    }

    fn kill(&mut self) {
        self.proc.kill();
    }
}

fn cfg() -> NbdConfig {
    NbdConfig::default().timeout(Duration::from_secs(10))
}

fn read_all(f: &NbdFile) -> Vec<u8> {
    let size = f.size() as usize;
    let mut buf = AlignedBuf::new(size.div_ceil(4096) * 4096, 4096);
    let mut done = 0;
    while done < size {
        let n = f
            .direct()
            .read_at(
                done as u64,
                &mut buf[done..(done + 4 * MIB).min(size.div_ceil(512) * 512)],
                Flags::NONE,
            )
            .unwrap();
        assert!(n > 0);
        done += n;
    }
    buf[..size].to_vec()
}

fn errno_of(e: &Error) -> i32 {
    e.errno()
}

// ---- qemu-nbd ----

#[test]
fn qemu_raw_image_reads_writes_and_flushes_over_unix_and_tcp() {
    need!("qemu-nbd");
    for tcp in [false, true] {
        let dir = scratch("raw");
        let img = dir.join("disk.raw");
        let data = pattern(8 * MIB, 1);
        std::fs::write(&img, &data).unwrap();
        let srv = Server::qemu(dir, &img, "raw", tcp);
        let uri = srv.uri.clone();
        let img2 = img.clone();
        bounded(60, move || {
            let f = NbdFile::open(&uri, true, &cfg()).unwrap();
            assert_eq!(f.size(), 8 * MIB as u64);
            assert_eq!(f.direct().device().name(), "nbd");
            assert_eq!(
                f.direct().device().completion_mode(),
                CompletionMode::Interrupt
            );
            assert!(read_all(&f) == data, "read back differs from the image");

            // Writes, one with FUA (DSYNC), then a flush; the image file has them.
            let w1 = pattern(3 * 4096, 2);
            let w2 = pattern(MIB, 3);
            assert_eq!(
                f.direct()
                    .write_at(4096, &aligned(&w1), Flags::NONE)
                    .unwrap(),
                w1.len()
            );
            assert_eq!(
                f.direct()
                    .write_at(5 * MIB as u64, &aligned(&w2), Flags::DSYNC)
                    .unwrap(),
                w2.len()
            );
            f.direct().sync_data().unwrap();
            let mut back = AlignedBuf::new(w1.len(), 4096);
            f.direct().read_at(4096, &mut back, Flags::NONE).unwrap();
            assert!(back[..] == w1[..]);
            let on_disk = std::fs::read(&img2).unwrap();
            assert!(on_disk[4096..4096 + w1.len()] == w1[..]);
            assert!(on_disk[5 * MIB..6 * MIB] == w2[..]);
            assert!(on_disk[..4096] == data[..4096]);
        });
        drop(srv);
    }
}

#[test]
fn qemu_qcow2_holes_show_in_block_status_and_read_as_zeros() {
    need!("qemu-nbd");
    need!("qemu-img");
    let dir = scratch("qcow2");
    let img = dir.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let srv = Server::qemu(dir, &img, "qcow2", true);
    let uri = srv.uri.clone();
    bounded(60, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        let dev = f.device();
        assert!(dev.structured_replies());
        assert!(dev.can_block_status());
        assert_eq!(f.size(), 64 * MIB as u64);
        // A fresh qcow2 is one hole.
        let ext = f.extents(0, f.size()).unwrap();
        assert_eq!(ext.len(), 1, "{ext:?}");
        assert!(ext[0].hole && ext[0].zero);
        assert_eq!(ext[0].len, 64 * MIB as u64);

        // Two data runs (qcow2 clusters are 64 KiB).
        let a = pattern(128 * 1024, 4);
        let b = pattern(64 * 1024, 5);
        f.direct()
            .write_at(MIB as u64, &aligned(&a), Flags::NONE)
            .unwrap();
        f.direct()
            .write_at(40 * MIB as u64, &aligned(&b), Flags::NONE)
            .unwrap();
        let ext = f.extents(0, f.size()).unwrap();
        let data: Vec<(u64, u64)> = ext
            .iter()
            .filter(|e| !e.zero)
            .map(|e| (e.offset, e.len))
            .collect();
        assert_eq!(
            data,
            vec![(MIB as u64, 128 * 1024), (40 * MIB as u64, 64 * 1024)],
            "{ext:?}"
        );
        // Extents tile the export.
        let mut at = 0;
        for e in &ext {
            assert_eq!(e.offset, at);
            at += e.len;
        }
        assert_eq!(at, f.size());
        // A sub-range query is clipped to it.
        let part = f.extents(MIB as u64 + 4096, 8192).unwrap();
        assert_eq!(part.len(), 1);
        assert_eq!(
            (part[0].offset, part[0].len, part[0].zero),
            (MIB as u64 + 4096, 8192, false)
        );

        // A read across data and hole: structured replies carry the hole as a hole.
        let mut buf = AlignedBuf::new(2 * MIB, 4096);
        buf.fill(0xee);
        f.direct()
            .read_at(MIB as u64, &mut buf, Flags::NONE)
            .unwrap();
        assert!(buf[..a.len()] == a[..]);
        assert!(buf[a.len()..].iter().all(|&x| x == 0));
    });
}

#[test]
fn many_async_requests_in_flight_complete_with_their_own_data() {
    need!("qemu-nbd");
    let dir = scratch("async");
    let img = dir.join("disk.raw");
    let data = pattern(4 * MIB, 6);
    std::fs::write(&img, &data).unwrap();
    let srv = Server::qemu(dir, &img, "raw", false);
    let uri = srv.uri.clone();
    bounded(60, move || {
        let f = NbdFile::open(&uri, false, &cfg()).unwrap();
        // 256 reads of mixed sizes in flight at once, waited for in reverse.
        let mut futs = Vec::new();
        for i in 0..256u64 {
            let len = 4096 * (1 + (i % 5)) as usize;
            let off = (i * 12288) % (4 * MIB as u64 - 32768);
            futs.push((
                off,
                len,
                f.direct()
                    .read_future(off, vec![AlignedBuf::new(len, 4096)], Flags::NONE),
            ));
        }
        for (off, len, fut) in futs.into_iter().rev() {
            let c = fut.wait();
            assert_eq!(c.result.unwrap(), len);
            assert!(
                c.bufs[0][..] == data[off as usize..off as usize + len],
                "read at {off}"
            );
        }
        // A read-only file refuses writes.
        let e = f
            .direct()
            .write_at(0, &aligned(&[0u8; 4096]), Flags::NONE)
            .unwrap_err();
        assert_eq!(errno_of(&e), libc::EBADF);
    });
}

#[test]
fn unknown_export_and_missing_server_fail_with_clear_errors() {
    need!("qemu-nbd");
    let dir = scratch("noexport");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; MIB]).unwrap();
    let srv = Server::qemu(dir.clone(), &img, "raw", false);
    let uri = srv.uri.clone();
    let dead = dir.join("nobody");
    bounded(30, move || {
        let mut wrong = uri.clone();
        wrong.export = "nope".into();
        let e = NbdFile::open(&wrong, false, &cfg()).unwrap_err();
        // The server's refusal (NBD_REP_ERR_UNKNOWN) is an invalid argument.
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert_eq!(errno_of(&e), libc::EINVAL, "{e}");
        let e = NbdFile::open(&NbdUri::unix(dead, "x"), false, &cfg()).unwrap_err();
        assert!(matches!(e, Error::Os { .. }), "{e}");
        assert_eq!(errno_of(&e), libc::ENOENT, "{e}");
        // A closed TCP port, on loopback.
        let e =
            NbdFile::open(&NbdUri::tcp("127.0.0.1", free_port(), "x"), false, &cfg()).unwrap_err();
        assert_eq!(errno_of(&e), libc::ECONNREFUSED, "{e}");
    });
}

// ---- nbdkit ----

#[test]
fn nbdkit_block_sizes_become_the_geometry() {
    need!("nbdkit");
    let srv = Server::nbdkit(
        scratch("bs"),
        &["blocksize-policy"],
        "16M",
        &[
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1048576",
        ],
    );
    let uri = srv.uri.clone();
    bounded(30, move || {
        let dev = NbdDevice::connect(&uri, &cfg()).unwrap();
        assert_eq!(dev.block_sizes(), Some((4096, 65536, 1 << 20)));
        let g = dev.geometry();
        assert_eq!(g.logical_block, 4096);
        assert_eq!(g.physical_block, 65536);
        assert_eq!(g.max_bytes, 1 << 20);
        assert_eq!(g.size, 16 << 20);
        // A large read goes through the engine in max_bytes pieces.
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        let d = pattern(3 * MIB, 7);
        f.direct().write_at(0, &aligned(&d), Flags::NONE).unwrap();
        let mut back = AlignedBuf::new(3 * MIB, 4096);
        f.direct().read_at(0, &mut back, Flags::NONE).unwrap();
        assert!(back[..] == d[..]);
        // Sub-block I/O is refused (EINVAL), or done with UNALIGNED.
        let e = f
            .direct()
            .read_at(512, &mut AlignedBuf::new(512, 4096), Flags::NONE)
            .unwrap_err();
        assert_eq!(errno_of(&e), libc::EINVAL);
        let mut small = vec![0u8; 100];
        f.direct()
            .read_at(4000, &mut small, Flags::UNALIGNED)
            .unwrap();
        assert!(small[..] == d[4000..4100]);
    });
}

#[test]
fn server_errors_fail_only_their_request_with_the_servers_errno() {
    need!("nbdkit");
    // Structured replies (nbdkit's default) and simple replies (--no-sr).
    for flags in [&[][..], &["--no-sr"][..]] {
        let dir = scratch("err");
        let trigger = dir.join("fail");
        let srv = Server::nbdkit_with(
            dir,
            flags,
            &["error"],
            "8M",
            &[
                "error-pread=ENOSPC",
                "error-pread-rate=1",
                &format!("error-pread-file={}", trigger.display()),
            ],
        );
        let uri = srv.uri.clone();
        bounded(30, move || {
            let f = NbdFile::open(&uri, true, &cfg()).unwrap();
            assert_eq!(f.device().structured_replies(), flags.is_empty());
            let d = pattern(64 * 1024, 8);
            f.direct().write_at(0, &aligned(&d), Flags::NONE).unwrap();
            std::fs::write(&trigger, b"").unwrap();
            let e = f
                .direct()
                .read_at(0, &mut AlignedBuf::new(8192, 4096), Flags::NONE)
                .unwrap_err();
            assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
            // The connection lives on: writes work, and reads once the fault clears.
            f.direct()
                .write_at(8192, &aligned(&d[..4096]), Flags::NONE)
                .unwrap();
            std::fs::remove_file(&trigger).unwrap();
            let mut back = AlignedBuf::new(8192, 4096);
            f.direct().read_at(0, &mut back, Flags::NONE).unwrap();
            assert!(back[..] == d[..8192]);
            assert!(f.device().dead().is_none());
        });
    }
}

#[test]
fn a_stalled_server_fails_requests_within_the_timeout() {
    need!("nbdkit");
    let dir = scratch("stall");
    let srv = Server::nbdkit(dir, &["delay"], "8M", &["delay-read=30"]);
    let uri = srv.uri.clone();
    bounded(30, move || {
        let c = cfg().timeout(Duration::from_millis(800));
        let f = NbdFile::open(&uri, true, &c).unwrap();
        // Writes are not delayed: the connection is healthy.
        f.direct()
            .write_at(0, &aligned(&[1u8; 4096]), Flags::NONE)
            .unwrap();
        let t = Instant::now();
        let futs: Vec<_> = (0..4)
            .map(|i| {
                f.direct()
                    .read_future(i * 4096, vec![AlignedBuf::new(4096, 4096)], Flags::NONE)
            })
            .collect();
        for fut in futs {
            let e = fut.wait().result.unwrap_err();
            assert_eq!(errno_of(&e), libc::EIO, "{e}");
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(5),
            "{took:?}"
        );
        let why = f.device().dead().expect("connection is dead");
        assert!(why.contains("sent nothing"), "{why}");
        // Later requests fail at once.
        let t = Instant::now();
        assert!(f
            .direct()
            .write_at(0, &aligned(&[1u8; 4096]), Flags::NONE)
            .is_err());
        assert!(f.direct().sync_data().is_err());
        assert!(t.elapsed() < Duration::from_millis(500));
    });
}

#[test]
fn a_server_that_dies_mid_request_fails_it_at_once() {
    need!("nbdkit");
    let dir = scratch("die");
    let mut srv = Server::nbdkit(dir, &["delay"], "8M", &["delay-read=20"]);
    let uri = srv.uri.clone();
    let f = bounded(30, move || NbdFile::open(&uri, false, &cfg()).unwrap());
    let fut = f
        .direct()
        .read_future(0, vec![AlignedBuf::new(65536, 4096)], Flags::NONE);
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    srv.kill();
    let c = bounded(10, move || fut.wait());
    assert!(c.result.is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
    let why = f.device().dead().expect("connection is dead");
    assert!(why.contains("closed"), "{why}");
}

#[test]
fn fua_writes_flush_when_the_server_has_no_fua() {
    need!("nbdkit");
    let dir = scratch("fua");
    let log = dir.join("log");
    let srv = Server::nbdkit(
        dir,
        &["log", "fua"],
        "8M",
        // The fua filter's default mode: no FUA advertised.
        &[&format!("logfile={}", log.display())],
    );
    let uri = srv.uri.clone();
    bounded(30, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        assert!(!f.device().can_fua());
        assert!(f.device().can_flush());
        let d = pattern(8192, 9);
        f.direct().write_at(0, &aligned(&d), Flags::DSYNC).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let write = text.find("Write").expect("write logged");
        assert!(
            text[write..].contains("Flush"),
            "no flush after the FUA write:\n{text}"
        );
    });
}

#[test]
fn fua_flag_is_sent_when_the_server_takes_it() {
    need!("nbdkit");
    let dir = scratch("fua2");
    let log = dir.join("log");
    let srv = Server::nbdkit(
        dir,
        &["log", "fua"],
        "8M",
        &[&format!("logfile={}", log.display()), "fuamode=native"],
    );
    let uri = srv.uri.clone();
    bounded(30, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        assert!(f.device().can_fua());
        f.direct()
            .write_at(0, &aligned(&[7u8; 4096]), Flags::DSYNC)
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("fua=1"), "no FUA write logged:\n{text}");
        assert!(!text.contains("Flush"), "needless flush:\n{text}");
    });
}

#[test]
fn trim_and_write_zeroes_read_back_as_zeros_and_show_as_holes() {
    need!("nbdkit");
    let srv = Server::nbdkit(scratch("trim"), &[], "8M", &[]);
    let uri = srv.uri.clone();
    bounded(30, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        let dev = f.device();
        assert!(dev.can_trim() && dev.can_write_zeroes());
        let d = pattern(MIB, 10);
        f.direct().write_at(0, &aligned(&d), Flags::NONE).unwrap();
        dev.trim(0, 65536).unwrap();
        dev.write_zeroes(131072, 65536, true).unwrap();
        let mut back = AlignedBuf::new(MIB, 4096);
        f.direct().read_at(0, &mut back, Flags::NONE).unwrap();
        assert!(back[..65536].iter().all(|&x| x == 0));
        assert!(back[65536..131072] == d[65536..131072]);
        assert!(back[131072..196608].iter().all(|&x| x == 0));
        assert!(back[196608..] == d[196608..]);
        let ext = f.extents(0, MIB as u64).unwrap();
        assert!(ext[0].zero && ext[0].offset == 0, "{ext:?}");
        assert!(ext.iter().any(|e| !e.zero && e.offset == 65536), "{ext:?}");
        // Misaligned ranges are refused before they reach the server.
        assert_eq!(
            dev.trim(100, 512).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    });
}

#[test]
fn an_export_of_odd_size_reads_its_tail_and_zeros_past_it() {
    need!("nbdkit");
    let srv = Server::nbdkit(scratch("odd"), &[], "1000000", &[]);
    let uri = srv.uri.clone();
    bounded(30, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        assert_eq!(f.size(), 1_000_000);
        let d = pattern(1_000_000, 11);
        f.direct().write_at(0, &d, Flags::UNALIGNED).unwrap();
        let back = read_all(&f);
        assert!(back == d);
        // The last block, read whole: the bytes past the export are zeros and the
        // read is short at EOF.
        let mut last = AlignedBuf::new(512, 4096);
        last.fill(0xff);
        let n = f.direct().read_at(999_936, &mut last, Flags::NONE).unwrap();
        assert_eq!(n, 64);
        assert!(last[..64] == d[999_936..]);
    });
}

#[test]
fn nbdkit_without_structured_replies_or_block_status_still_copies() {
    need!("nbdkit");
    let srv = Server::nbdkit_with(scratch("nosr"), &["--no-sr"], &[], "4M", &[]);
    let uri = srv.uri.clone();
    bounded(30, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        assert!(!f.device().structured_replies());
        assert!(!f.device().can_block_status());
        assert!(!f.notes().is_empty());
        let ext = f.extents(0, f.size()).unwrap();
        assert_eq!(ext.len(), 1);
        assert!(!ext[0].zero && ext[0].len == f.size());
        let d = pattern(MIB, 12);
        f.direct()
            .write_at(MIB as u64, &aligned(&d), Flags::NONE)
            .unwrap();
        let back = read_all(&f);
        assert!(back[MIB..2 * MIB] == d[..]);
    });
}

// ---- A scripted server for protocol violations ----

/// What the fake server does with the first read request it gets.
#[derive(Clone, Copy, Debug)]
enum Misdeed {
    UnknownCookie,
    BadMagic,
    /// A simple reply while structured replies were negotiated.
    SimpleReplyToRead,
    /// A data chunk outside the request.
    ChunkOutsideRequest,
    /// Two data chunks over the same bytes.
    OverlappingChunks,
    /// DONE without covering the whole read.
    ShortRead,
    /// An unknown non-error chunk type.
    UnknownChunk,
    /// The connection closes halfway through the data.
    HangUpMidReply,
    /// Nothing at all (a stall).
    Silence,
    /// Not a violation: a write acknowledged before its data is read (the client
    /// is still sending when the reply arrives). Reads are answered honestly.
    EarlyWriteReply,
    /// The first read is never answered; everything else is, at once.
    StarveFirstRead,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(std::iter::repeat_n(0x5a, len));
    chunk(flags, 1, cookie, &p)
}

/// Serve one connection: a minimal fixed-newstyle handshake (structured replies
/// yes, meta contexts no, a 1 MiB export), honest replies to writes and flushes,
/// and `misdeed` on the first read.
fn fake_server(mut s: UnixStream, misdeed: Misdeed) {
    let mut w = Vec::new();
    w.extend_from_slice(b"NBDMAGIC");
    w.extend_from_slice(b"IHAVEOPT");
    w.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&w).unwrap();
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).unwrap();
    let reply = |s: &mut UnixStream, opt: u32, ty: u32, data: &[u8]| {
        let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        r.extend_from_slice(&opt.to_be_bytes());
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        s.write_all(&r).unwrap();
    };
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let opt = be32(&h[8..]);
        let mut data = vec![0u8; be32(&h[12..]) as usize];
        s.read_exact(&mut data).unwrap();
        match opt {
            8 => reply(&mut s, opt, 1, &[]),
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(MIB as u64).to_be_bytes());
                info.extend_from_slice(&(1u16 | 4).to_be_bytes());
                reply(&mut s, opt, 3, &info);
                reply(&mut s, opt, 1, &[]);
                break;
            }
            _ => reply(&mut s, opt, (1 << 31) + 1, &[]),
        }
    }
    let mut starved = false;
    loop {
        let mut h = [0u8; 28];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let ty = u16::from_be_bytes([h[6], h[7]]);
        let cookie = be64(&h[8..]);
        let offset = be64(&h[16..]);
        let len = be32(&h[24..]) as usize;
        match ty {
            1 => {
                let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
                r.extend_from_slice(&0u32.to_be_bytes());
                r.extend_from_slice(&cookie.to_be_bytes());
                let mut d = vec![0u8; len];
                if matches!(misdeed, Misdeed::EarlyWriteReply) {
                    let _ = s.write_all(&r);
                    thread::sleep(Duration::from_millis(200));
                    s.read_exact(&mut d).unwrap();
                } else {
                    s.read_exact(&mut d).unwrap();
                    let _ = s.write_all(&r);
                }
            }
            2 => return,
            0 if matches!(misdeed, Misdeed::StarveFirstRead) && !starved => starved = true,
            0 if matches!(misdeed, Misdeed::EarlyWriteReply | Misdeed::StarveFirstRead) => {
                let _ = s.write_all(&data_chunk(1, cookie, offset, len));
            }
            0 => {
                let msg = match misdeed {
                    Misdeed::UnknownCookie => data_chunk(1, cookie ^ 0xdead, offset, len),
                    Misdeed::BadMagic => vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0],
                    Misdeed::SimpleReplyToRead => {
                        let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
                        r.extend_from_slice(&0u32.to_be_bytes());
                        r.extend_from_slice(&cookie.to_be_bytes());
                        r.extend(std::iter::repeat_n(0, len));
                        r
                    }
                    Misdeed::ChunkOutsideRequest => data_chunk(1, cookie, offset + 512, len),
                    Misdeed::OverlappingChunks => {
                        let mut v = data_chunk(0, cookie, offset, len / 2 + 512);
                        v.extend(data_chunk(1, cookie, offset + (len / 2) as u64, len / 2));
                        v
                    }
                    Misdeed::ShortRead => data_chunk(1, cookie, offset, len / 2),
                    Misdeed::UnknownChunk => chunk(1, 77, cookie, &[0; 8]),
                    Misdeed::HangUpMidReply => {
                        let mut v = data_chunk(1, cookie, offset, len);
                        v.truncate(v.len() / 2);
                        let _ = s.write_all(&v);
                        return;
                    }
                    Misdeed::EarlyWriteReply | Misdeed::StarveFirstRead => {
                        unreachable!("answered above")
                    }
                    // Say nothing; the client's hang-up ends the read below.
                    Misdeed::Silence => Vec::new(),
                };
                let _ = s.write_all(&msg);
                // Keep the socket open: the client must hang up by itself.
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
            _ => {
                let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
                r.extend_from_slice(&0u32.to_be_bytes());
                r.extend_from_slice(&cookie.to_be_bytes());
                let _ = s.write_all(&r);
            }
        }
    }
}

#[test]
fn protocol_violations_fail_requests_and_kill_the_connection_without_panics() {
    use Misdeed::*;
    for misdeed in [
        UnknownCookie,
        BadMagic,
        SimpleReplyToRead,
        ChunkOutsideRequest,
        OverlappingChunks,
        ShortRead,
        UnknownChunk,
        HangUpMidReply,
        Silence,
    ] {
        let (uri, server, dir) = fake(misdeed);
        let outcome = bounded(20, move || {
            let c = cfg().timeout(Duration::from_millis(500));
            let f = NbdFile::open(&uri, true, &c).unwrap();
            f.direct()
                .write_at(0, &aligned(&[3u8; 4096]), Flags::NONE)
                .unwrap();
            let r = f
                .direct()
                .read_at(0, &mut AlignedBuf::new(8192, 4096), Flags::NONE);
            let short_read_is_request_error = matches!(misdeed, ShortRead);
            let dead = f.device().dead();
            // Every later request fails too (except after a per-request error).
            let later = f.direct().write_at(0, &aligned(&[3u8; 4096]), Flags::NONE);
            (
                r.map_err(|e| e.to_string()),
                dead,
                later.is_err(),
                short_read_is_request_error,
            )
        });
        let (r, dead, later_failed, request_only) = outcome;
        assert!(r.is_err(), "{misdeed:?}: read succeeded");
        if request_only {
            assert!(r.unwrap_err().contains("did not cover"), "{misdeed:?}");
        } else {
            assert!(dead.is_some(), "{misdeed:?}: connection not marked dead");
            assert!(later_failed, "{misdeed:?}: later request succeeded");
        }
        // The client hung up (or timed out); the server thread ends.
        let _ = server.join();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Listen on a fresh Unix socket and serve one connection with `misdeed`.
fn fake(misdeed: Misdeed) -> (NbdUri, thread::JoinHandle<()>, PathBuf) {
    let dir = scratch("fake");
    let sock = dir.join("s");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        fake_server(s, misdeed);
    });
    (NbdUri::unix(&sock, ""), server, dir)
}

/// A server that answers everything but one request: the connection is never
/// silent, yet the starved request fails within about the timeout (as the kernel's
/// nbd driver times out each request) instead of waiting forever.
#[test]
fn a_request_the_server_starves_fails_within_the_timeout() {
    let (uri, server, dir) = fake(Misdeed::StarveFirstRead);
    let (waited, err, dead) = bounded(20, move || {
        let c = cfg().timeout(Duration::from_millis(500));
        let f = NbdFile::open(&uri, true, &c).unwrap();
        let start = std::time::Instant::now();
        let read = f
            .direct()
            .read_future(0, vec![AlignedBuf::new(4096, 4096)], Flags::NONE);
        // Keep the server busy answering writes, more often than the reader's
        // idle tick, until the starved read ends (or 10 s pass).
        while !read.is_done() && start.elapsed() < Duration::from_secs(10) {
            let _ = f
                .direct()
                .write_at(8192, &aligned(&[7u8; 4096]), Flags::NONE);
            thread::sleep(Duration::from_millis(20));
        }
        let done = read.wait();
        (
            start.elapsed(),
            done.result.map_err(|e| e.to_string()),
            f.device().dead(),
        )
    });
    let e = err.expect_err("the starved read succeeded");
    assert!(e.contains("unanswered"), "{e}");
    assert!(dead.is_some(), "connection not marked dead");
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_acknowledged_while_still_sending_completes_after_the_send() {
    let (uri, server, dir) = fake(Misdeed::EarlyWriteReply);
    bounded(20, move || {
        let f = NbdFile::open(&uri, true, &cfg()).unwrap();
        // Larger than the socket buffers: the send is still going when the reply
        // is read.
        let d = pattern(MIB, 13);
        assert_eq!(
            f.direct().write_at(0, &aligned(&d), Flags::NONE).unwrap(),
            MIB
        );
        let mut back = AlignedBuf::new(8192, 4096);
        f.direct().read_at(0, &mut back, Flags::NONE).unwrap();
        assert!(back.iter().all(|&x| x == 0x5a));
        assert!(f.device().dead().is_none());
    });
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_threads_share_one_connection() {
    need!("qemu-nbd");
    let dir = scratch("threads");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 8 * MIB]).unwrap();
    let srv = Server::qemu(dir, &img, "raw", false);
    let uri = srv.uri.clone();
    bounded(60, move || {
        let f = Arc::new(NbdFile::open(&uri, true, &cfg()).unwrap());
        let hs: Vec<_> = (0..8u64)
            .map(|t| {
                let f = Arc::clone(&f);
                thread::spawn(move || {
                    for i in 0..32u64 {
                        let off = t * MIB as u64 + i * 32768;
                        let d = pattern(32768, t * 100 + i);
                        f.direct().write_at(off, &aligned(&d), Flags::NONE).unwrap();
                        let mut back = AlignedBuf::new(32768, 4096);
                        f.direct().read_at(off, &mut back, Flags::NONE).unwrap();
                        assert!(back[..] == d[..], "thread {t} block {i}");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

// ---- hostile servers: the fuzz corpus ----

#[path = "../../../fuzz/src/nbd.rs"]
mod nbd_fuzz;

/// Every input of the `nbd_server` fuzz target's corpus (fuzz/corpus/nbd_server:
/// seeds and what fuzz runs kept) through the fake server over a socketpair: no
/// panic, every request completes exactly once, no hang (bounded).
#[test]
fn hostile_server_fuzz_corpus_replays_without_panics_or_hangs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_server");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/nbd_server")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the corpus has its seeds");
    // The seeds are well-behaved servers: they prove the harness drives the whole
    // path (handshake, every request answered), so mutations reach it too.
    let seed = |name: &str| nbd_fuzz::nbd_server(&std::fs::read(dir.join(name)).unwrap());
    let all_ok = nbd_fuzz::Outcome {
        connected: true,
        submitted: 3,
        succeeded: 3,
        status: Some(true),
    };
    assert_eq!(seed("seed-structured"), all_ok);
    let o = seed("seed-structured-errors");
    assert_eq!((o.succeeded, o.status), (1, Some(true)), "{o:?}");
    for s in ["seed-simple", "seed-export-name"] {
        let o = seed(s);
        assert_eq!(
            (o.submitted, o.succeeded, o.status),
            (3, 3, None),
            "{s}: {o:?}"
        );
    }
    assert!(!seed("seed-refused").connected);
    let n = files.len();
    let t = Instant::now();
    bounded(300, move || {
        for f in files {
            // (A fuzzer running on the corpus may remove entries meanwhile.)
            if let Ok(data) = std::fs::read(&f) {
                nbd_fuzz::nbd_server(&data);
            }
        }
    });
    eprintln!("replayed {n} inputs in {:?}", t.elapsed());
}

// ---- several connections (multi-conn) ----

/// The connections (nbdkit's ids) that carried reads or writes, from nbdkit's log
/// filter output; and how many connections were made at all.
fn logged_connections(log: &Path) -> (std::collections::BTreeSet<u32>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut busy = std::collections::BTreeSet::new();
    let mut connects = 0;
    for line in text.lines() {
        let Some(rest) = line.split("connection=").nth(1) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let id: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        match words.next() {
            Some("Connect") => connects += 1,
            Some("Read" | "Write") => {
                busy.insert(id);
            }
            _ => {}
        }
    }
    (busy, connects)
}

/// `threads` threads each write their own 1 MiB region (32 KiB at a time, read
/// back at once), then every thread reads every other thread's region: what one
/// connection wrote, another reads back.
fn threads_write_and_cross_read(f: &Arc<NbdFile>, threads: u64) {
    let region = |t: u64| t * MIB as u64;
    let data = |t: u64, i: u64| pattern(32768, 0xc0 + t * 1000 + i);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let f = Arc::clone(f);
            thread::spawn(move || {
                for i in 0..32u64 {
                    let off = region(t) + i * 32768;
                    let d = data(t, i);
                    f.direct().write_at(off, &aligned(&d), Flags::NONE).unwrap();
                    let mut back = AlignedBuf::new(32768, 4096);
                    f.direct().read_at(off, &mut back, Flags::NONE).unwrap();
                    assert!(back[..] == d[..], "thread {t} block {i}");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let f = Arc::clone(f);
            thread::spawn(move || {
                for other in (0..threads).filter(|&o| o != t) {
                    for i in 0..32u64 {
                        let mut back = AlignedBuf::new(32768, 4096);
                        let off = region(other) + i * 32768;
                        f.direct().read_at(off, &mut back, Flags::NONE).unwrap();
                        assert!(
                            back[..] == data(other, i)[..],
                            "thread {t} reading {other}/{i}"
                        );
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    f.direct().sync_data().unwrap();
}

#[test]
fn nbdkit_multi_conn_spreads_threads_over_connections() {
    need!("nbdkit");
    let dir = scratch("mconn");
    let log = dir.join("log");
    let srv = Server::nbdkit(
        dir,
        &["log"],
        "8M",
        &[&format!("logfile={}", log.display())],
    );
    let uri = srv.uri.clone();
    let log2 = log.clone();
    bounded(60, move || {
        let f = Arc::new(NbdFile::open(&uri, true, &cfg().connections(4)).unwrap());
        assert!(f.device().can_multi_conn());
        assert_eq!(f.device().connections(), 4);
        assert!(f.notes().is_empty(), "{:?}", f.notes());
        threads_write_and_cross_read(&f, 4);
        assert!(f.device().dead().is_none());
        drop(f);
        // Counted by the server: four connections, and each of the four threads
        // (a connection each, round robin) sent on its own.
        let (busy, connects) = logged_connections(&log2);
        assert_eq!(connects, 4, "connections the server saw");
        assert_eq!(busy.len(), 4, "connections that carried I/O: {busy:?}");
    });
    drop(srv);
}

#[test]
fn a_server_without_multi_conn_gets_one_connection() {
    need!("nbdkit");
    let dir = scratch("mconn1");
    let log = dir.join("log");
    // The log filter outermost, so it sees what the client does.
    let srv = Server::nbdkit(
        dir,
        &["log", "multi-conn"],
        "8M",
        &[
            &format!("logfile={}", log.display()),
            "multi-conn-mode=disable",
        ],
    );
    let uri = srv.uri.clone();
    let log2 = log.clone();
    bounded(60, move || {
        let f = Arc::new(NbdFile::open(&uri, true, &cfg().connections(4)).unwrap());
        assert!(!f.device().can_multi_conn());
        assert_eq!(f.device().connections(), 1);
        assert_eq!(f.notes().len(), 1, "{:?}", f.notes());
        threads_write_and_cross_read(&f, 4);
        drop(f);
        let (busy, connects) = logged_connections(&log2);
        assert_eq!((busy.len(), connects), (1, 1));
    });
    drop(srv);
}

/// Sockets a process holds open (its listening socket and its connections).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn qemu_nbd_shared_export_takes_several_connections() {
    need!("qemu-nbd");
    let dir = scratch("mconnq");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 8 * MIB]).unwrap();
    // --shared=8: qemu-nbd advertises multi-conn.
    let srv = Server::qemu(dir, &img, "raw", false);
    let pid = srv.proc.id().unwrap();
    let uri = srv.uri.clone();
    bounded(60, move || {
        let idle = open_sockets(pid);
        let f = Arc::new(NbdFile::open(&uri, true, &cfg().connections(4)).unwrap());
        assert!(f.device().can_multi_conn());
        assert_eq!(f.device().connections(), 4);
        // Counted on the server's side: four more sockets.
        assert_eq!(open_sockets(pid), idle + 4);
        threads_write_and_cross_read(&f, 4);
        drop(f);
    });
    // What the four connections wrote is in the image, read without NBD.
    let on_disk = std::fs::read(&img).unwrap();
    for t in 0..4u64 {
        for i in [0u64, 31] {
            let at = (t * MIB as u64 + i * 32768) as usize;
            assert!(on_disk[at..at + 32768] == pattern(32768, 0xc0 + t * 1000 + i)[..]);
        }
    }
    drop(srv);
}

#[test]
fn qemu_nbd_capped_below_the_connections_asked_opens_what_it_takes() {
    need!("qemu-nbd");
    let dir = scratch("mconncap");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 4 * MIB]).unwrap();
    let sock = dir.join("s");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "--persistent",
        "--shared=2",
        "-x",
        "disk",
        "-f",
        "raw",
        "-k",
    ])
    .arg(&sock)
    .arg(&img);
    let srv = Server::start(cmd, NbdUri::unix(sock, "disk"), dir);
    let uri = srv.uri.clone();
    bounded(60, move || {
        // The third connection waits in the server's backlog, unanswered: opening
        // gives up on it after a short handshake limit, not the I/O timeout.
        let f = Arc::new(NbdFile::open(&uri, true, &cfg().connections(4)).unwrap());
        assert_eq!(f.device().connections(), 2);
        assert_eq!(f.notes().len(), 1, "{:?}", f.notes());
        threads_write_and_cross_read(&f, 2);
    });
    drop(srv);
}
