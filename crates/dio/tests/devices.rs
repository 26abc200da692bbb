//! Real devices: the io_uring and pread/pwrite back ends on files under `target/`,
//! geometry discovery, the raw client's fallbacks, and (as root) loop devices with
//! 512- and 4096-byte sectors. Results are checked against `std::fs`, independently
//! of dio. Every wait is bounded: a test that would hang fails instead.

mod common;

use common::{aligned, bounded, is_root, random_bytes as pattern, require_uring, uring};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use dio::{probe, SyncConfig, SyncDevice, UringConfig, UringDevice};
use dio::{AlignedBuf, CompletionMode, Device, DirectFile, Error, FileState, Flags, IdentityMap};
use dio::{Backend, RawFile, RawOptions};
use dio_testkit::LoopDev;

const KIB: usize = 1024;

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

fn file_with(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn opts(backend: Backend, write: bool) -> RawOptions {
    RawOptions {
        write,
        backend,
        ..RawOptions::default()
    }
}

/// The back ends `test` runs on: io_uring where it can be set up (probed once; the
/// test says so when it cannot), and pread/pwrite.
fn backends(test: &str) -> Vec<Backend> {
    let mut v = Vec::new();
    if require_uring(&format!("the io_uring half of {test}")) {
        v.push(Backend::Uring);
    }
    v.push(Backend::Sync);
    v
}

/// io_uring where it can be set up, else pread/pwrite: for tests of something
/// else that run on the best back end.
fn best_backend() -> Backend {
    if uring().is_ok() {
        Backend::Uring
    } else {
        Backend::Sync
    }
}

// ---- Round trips ----

#[test]
fn aligned_writes_and_reads_round_trip_and_match_std_fs() {
    bounded(60, || {
        for backend in backends("aligned_writes_and_reads_round_trip_and_match_std_fs") {
            let dir = tmpdir();
            let orig = pattern(1 << 20, 1);
            let path = file_with(dir.path(), "f", &orig);
            let raw = RawFile::open(&path, &opts(backend, true)).unwrap();
            let name = match backend {
                Backend::Uring => "uring",
                _ => "sync",
            };
            assert_eq!(raw.backend_name(), name);
            assert_eq!(raw.size(), 1 << 20);
            assert!(!raw.is_block_device());
            let f = raw.direct();

            // Read what std::fs wrote.
            let mut back = AlignedBuf::new(64 * KIB, 4096);
            assert_eq!(f.read_at(4096, &mut back, Flags::NONE).unwrap(), 64 * KIB);
            assert_eq!(&back[..], &orig[4096..4096 + 64 * KIB], "{name}");

            // Write with dio, read with std::fs.
            let data = pattern(128 * KIB, 2);
            assert_eq!(
                f.write_at(8192, &aligned(&data), Flags::NONE).unwrap(),
                data.len()
            );
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(&disk[8192..8192 + data.len()], &data[..], "{name}");
            assert_eq!(&disk[..8192], &orig[..8192]);

            // Vectored: two separate buffers make a two-segment request.
            let (a, b) = (aligned(&pattern(4096, 3)), aligned(&pattern(8192, 4)));
            let n = f
                .write(65536, &[IoSlice::new(&a), IoSlice::new(&b)], Flags::NONE)
                .unwrap();
            assert_eq!(n, 12288);
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(&disk[65536..69632], &a[..]);
            assert_eq!(&disk[69632..77824], &b[..]);
            let (mut x, mut y) = (AlignedBuf::new(8192, 4096), AlignedBuf::new(4096, 4096));
            let n = f
                .read(
                    65536,
                    &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
                    Flags::NONE,
                )
                .unwrap();
            assert_eq!(n, 12288);
            assert_eq!(&x[..], &disk[65536..73728]);
            assert_eq!(&y[..], &disk[73728..77824]);

            // A request larger than one device request may carry: split by the
            // engine, whole on disk.
            let big_len = f.geometry().max_bytes as usize + (1 << 20);
            let big = pattern(big_len, 5);
            assert_eq!(
                f.write_at(0, &aligned(&big), Flags::NONE).unwrap(),
                big.len()
            );
            let mut back = AlignedBuf::new(big_len, 4096);
            assert_eq!(f.read_at(0, &mut back, Flags::NONE).unwrap(), big.len());
            assert_eq!(&back[..], &big[..]);
            assert_eq!(
                std::fs::read(&path).unwrap(),
                big,
                "{name}: file grew to {big_len} bytes"
            );
            assert_eq!(raw.size(), big_len as u64);
        }
    });
}

#[test]
fn short_read_at_eof_returns_the_bytes_before_eof() {
    bounded(60, || {
        for backend in backends("short_read_at_eof_returns_the_bytes_before_eof") {
            for size in [300usize, 4097] {
                let dir = tmpdir();
                let data = pattern(size, size as u64);
                let path = file_with(dir.path(), "f", &data);
                for write in [false, true] {
                    let raw = RawFile::open(&path, &opts(backend, write)).unwrap();
                    let mut back = AlignedBuf::new(8192, 4096);
                    back.fill(0xee);
                    let n = raw.direct().read_at(0, &mut back, Flags::NONE).unwrap();
                    assert_eq!(n, size, "{backend:?} size {size} write {write}");
                    assert_eq!(&back[..size], &data[..]);
                    // Past EOF at a block boundary: nothing.
                    let eof_block = size.div_ceil(4096) * 4096;
                    let mut tail = AlignedBuf::new(4096, 4096);
                    let n = raw
                        .direct()
                        .read_at(eof_block as u64, &mut tail, Flags::NONE)
                        .unwrap();
                    assert_eq!(n, 0);
                }
            }
        }
    });
}

#[test]
fn device_zero_fills_the_part_of_a_read_past_eof() {
    bounded(30, || {
        let dir = tmpdir();
        let data = pattern(300, 9);
        let path = file_with(dir.path(), "f", &data);
        let file = probe::open_direct(&path, false, false).unwrap();
        let p = probe::probe(file.as_fd(), &path).unwrap();
        let lb = p.geometry.logical_block as usize;
        let mut devs: Vec<Arc<dyn Device>> = Vec::new();
        if require_uring("the io_uring half of device_zero_fills_the_part_of_a_read_past_eof") {
            let cfg = UringConfig::default();
            let f = file.try_clone().unwrap();
            devs.push(Arc::new(UringDevice::new(f, p.geometry, &cfg).unwrap()));
        }
        devs.push(Arc::new(
            SyncDevice::new(file, p.geometry, &SyncConfig::default()).unwrap(),
        ));
        for dev in devs {
            let mut b = AlignedBuf::new(lb, 4096);
            b.fill(0xee);
            dio::read_device(&*dev, 0, &mut b).unwrap();
            assert_eq!(&b[..300], &data[..], "{}", dev.name());
            assert!(
                b[300..].iter().all(|&x| x == 0),
                "{}: tail zeroed",
                dev.name()
            );
            // Past the device end: EINVAL from check_request.
            let mut b = AlignedBuf::new(lb, 4096);
            let e = dio::read_device(&*dev, p.geometry.size, &mut b).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        }
    });
}

// ---- Async ----

fn many_async_reads(f: &DirectFile, data: &[u8]) {
    let futs: Vec<_> = (0..64u64)
        .map(|i| f.read_future(i * 4096, vec![AlignedBuf::new(4096, 4096)], Flags::NONE))
        .collect();
    for (i, fut) in futs.into_iter().enumerate() {
        let c = fut.wait();
        assert_eq!(c.result.unwrap(), 4096);
        assert_eq!(&c.bufs[0][..], &data[i * 4096..(i + 1) * 4096], "block {i}");
    }
}

#[test]
fn many_async_reads_in_flight_complete_on_both_back_ends() {
    bounded(60, || {
        for backend in backends("many_async_reads_in_flight_complete_on_both_back_ends") {
            let dir = tmpdir();
            let data = pattern(256 * KIB, 11);
            let path = file_with(dir.path(), "f", &data);
            let raw = RawFile::open(&path, &opts(backend, false)).unwrap();
            many_async_reads(raw.direct(), &data);
            // Async writes too, then check with std::fs.
            let futs: Vec<_> = (0..64u64)
                .map(|i| {
                    let b = aligned(&pattern(4096, 100 + i));
                    raw.direct().write_future(i * 4096, vec![b], Flags::NONE)
                })
                .collect();
            for fut in futs {
                // The file is read-only: every write fails with EBADF.
                assert!(matches!(fut.wait().result, Err(Error::ReadOnly)));
            }
            let raw = RawFile::open(&path, &opts(backend, true)).unwrap();
            let futs: Vec<_> = (0..64u64)
                .map(|i| {
                    let b = aligned(&pattern(4096, 100 + i));
                    raw.direct().write_future(i * 4096, vec![b], Flags::NONE)
                })
                .collect();
            for fut in futs {
                assert_eq!(fut.wait().result.unwrap(), 4096);
            }
            let disk = std::fs::read(&path).unwrap();
            for i in 0..64 {
                assert_eq!(
                    &disk[i * 4096..(i + 1) * 4096],
                    &pattern(4096, 100 + i as u64)[..]
                );
            }
        }
    });
}

#[test]
fn uring_reaper_thread_completes_callbacks_without_a_poller() {
    if !require_uring("uring_reaper_thread_completes_callbacks_without_a_poller") {
        return;
    }
    bounded(60, || {
        let dir = tmpdir();
        let data = pattern(256 * KIB, 12);
        let path = file_with(dir.path(), "f", &data);
        let file = probe::open_direct(&path, false, false).unwrap();
        let p = probe::probe(file.as_fd(), &path).unwrap();
        let mut cfg = UringConfig::default();
        cfg.reaper = true;
        cfg.queue_depth = 16; // fewer slots than requests: submit must wait for some
        let dev = Arc::new(UringDevice::new(file, p.geometry, &cfg).unwrap());
        assert_eq!(dev.completion_mode(), CompletionMode::Interrupt);
        let f = DirectFile::new(
            dev,
            Arc::new(IdentityMap::new(p.geometry.logical_block, p.geometry.size)),
            Arc::new(FileState::new(p.size)),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..64u64 {
            let (tx, done) = (tx.clone(), Arc::clone(&done));
            f.read_async(
                i * 4096,
                vec![AlignedBuf::new(4096, 4096)],
                Flags::NONE,
                move |c| {
                    done.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send((i, c));
                },
            );
        }
        for _ in 0..64 {
            // Nobody polls: the reaper thread must deliver.
            let (i, c) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("completion");
            assert_eq!(c.result.unwrap(), 4096);
            let i = i as usize;
            assert_eq!(&c.bufs[0][..], &data[i * 4096..(i + 1) * 4096]);
        }
        assert_eq!(done.load(Ordering::SeqCst), 64);
        many_async_reads(&f, &data);
    });
}

#[test]
fn sync_device_inline_mode_completes_in_submit() {
    bounded(30, || {
        let dir = tmpdir();
        let data = pattern(256 * KIB, 13);
        let path = file_with(dir.path(), "f", &data);
        let file = probe::open_direct(&path, true, false).unwrap();
        let p = probe::probe(file.as_fd(), &path).unwrap();
        let mut cfg = SyncConfig::default();
        cfg.workers = 0;
        let dev = Arc::new(SyncDevice::new(file, p.geometry, &cfg).unwrap());
        let f = DirectFile::new(
            dev,
            Arc::new(IdentityMap::new(p.geometry.logical_block, p.geometry.size)),
            Arc::new(FileState::new(p.size)),
        )
        .unwrap();
        many_async_reads(&f, &data);
    });
}

// ---- Durability ----

#[test]
fn fua_writes_through_dsync_open_and_dsync_flag() {
    bounded(60, || {
        for backend in backends("fua_writes_through_dsync_open_and_dsync_flag") {
            let dir = tmpdir();
            let path = file_with(dir.path(), "f", &vec![0u8; 64 * KIB]);
            let mut o = opts(backend, true);
            o.dsync = true;
            let raw = RawFile::open(&path, &o).unwrap();
            let data = pattern(16 * KIB, 21);
            assert_eq!(
                raw.direct()
                    .write_at(0, &aligned(&data), Flags::NONE)
                    .unwrap(),
                data.len()
            );
            // Per-call durability: FUA requests (RWF_DSYNC) on a plain open.
            let raw2 = RawFile::open(&path, &opts(backend, true)).unwrap();
            let data2 = pattern(16 * KIB, 22);
            assert_eq!(
                raw2.direct()
                    .write_at(16 * KIB as u64, &aligned(&data2), Flags::DSYNC)
                    .unwrap(),
                data2.len()
            );
            raw2.direct().sync_data().unwrap();
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(&disk[..16 * KIB], &data[..]);
            assert_eq!(&disk[16 * KIB..32 * KIB], &data2[..]);
        }
    });
}

// ---- Geometry ----

#[test]
fn regular_file_geometry_comes_from_statx() {
    let dir = tmpdir();
    let path = file_with(dir.path(), "f", &pattern(4097, 1));
    let file = probe::open_direct(&path, false, false).unwrap();
    let p = probe::probe(file.as_fd(), &path).unwrap();
    let g = p.geometry;
    assert!(!p.block_device);
    assert!(p.exact, "this kernel (6.1+) reports STATX_DIOALIGN");
    assert!(g.logical_block.is_power_of_two() && g.logical_block >= 512);
    assert!(g.mem_align.is_power_of_two());
    assert_eq!(p.size, 4097);
    let lb = u64::from(g.logical_block);
    assert_eq!(
        g.size,
        4097u64.div_ceil(lb) * lb,
        "size rounded up to the logical block"
    );
    g.validate().unwrap();
    eprintln!(
        "statx geometry of a file under target/: {g:?}, read align {}",
        p.read_offset_align
    );
    // The dio alignment the engine reports matches.
    let raw = RawFile::open(&path, &RawOptions::default()).unwrap();
    assert_eq!(raw.direct().dio_align(), (g.mem_align, g.logical_block));
}

#[test]
fn set_len_grows_and_shrinks_the_file() {
    bounded(30, || {
        for backend in backends("set_len_grows_and_shrinks_the_file") {
            let dir = tmpdir();
            let path = file_with(dir.path(), "f", &pattern(8192, 1));
            let raw = RawFile::open(&path, &opts(backend, true)).unwrap();
            raw.set_len(20000).unwrap();
            assert_eq!(raw.size(), 20000);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 20000);
            let mut b = AlignedBuf::new(32768, 4096);
            assert_eq!(raw.direct().read_at(0, &mut b, Flags::NONE).unwrap(), 20000);
            assert!(b[8192..20000].iter().all(|&x| x == 0));
            raw.set_len(4096).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
            assert_eq!(raw.direct().read_at(0, &mut b, Flags::NONE).unwrap(), 4096);
            let ro = RawFile::open(&path, &opts(backend, false)).unwrap();
            assert!(matches!(ro.set_len(0), Err(Error::ReadOnly)));
        }
    });
}

#[test]
fn create_makes_a_new_file_that_writes_extend() {
    bounded(30, || {
        let dir = tmpdir();
        let path = dir.path().join("new");
        let mut o = opts(best_backend(), true);
        o.create = true;
        let raw = RawFile::open(&path, &o).unwrap();
        assert_eq!(raw.size(), 0);
        let data = pattern(12288, 5);
        assert_eq!(
            raw.direct()
                .write_at(0, &aligned(&data), Flags::NONE)
                .unwrap(),
            data.len()
        );
        assert_eq!(raw.size(), 12288);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let missing =
            RawFile::open(dir.path().join("missing"), &RawOptions::default()).unwrap_err();
        assert!(matches!(missing, Error::Os { .. }), "{missing}");
        assert_eq!(missing.errno(), libc::ENOENT, "{missing}");
    });
}

// ---- Fallbacks ----

#[test]
fn sync_backend_serves_async_calls_and_auto_prefers_uring() {
    bounded(30, || {
        let dir = tmpdir();
        let data = pattern(256 * KIB, 31);
        let path = file_with(dir.path(), "f", &data);
        let raw = RawFile::open(
            &path,
            &RawOptions {
                backend: Backend::Sync,
                ..RawOptions::default()
            },
        )
        .unwrap();
        assert_eq!(raw.backend_name(), "sync");
        assert!(raw.notes().is_empty(), "{:?}", raw.notes());
        many_async_reads(raw.direct(), &data);
        if require_uring("the auto half of sync_backend_serves_async_calls_and_auto_prefers_uring")
        {
            let auto = RawFile::open(&path, &RawOptions::default()).unwrap();
            assert_eq!(auto.backend_name(), "uring");
            assert!(auto.notes().is_empty(), "{:?}", auto.notes());
        }
        let forced = RawFile::open(&path, &opts(Backend::Sync, false)).unwrap();
        assert_eq!(forced.backend_name(), "sync");
    });
}

#[test]
fn iopoll_request_falls_back_with_a_note_or_works() {
    if !require_uring("iopoll_request_falls_back_with_a_note_or_works") {
        return;
    }
    bounded(30, || {
        let dir = tmpdir();
        let data = pattern(256 * KIB, 41);
        let path = file_with(dir.path(), "f", &data);
        let mut o = opts(Backend::Uring, false);
        o.iopoll = true;
        let raw = RawFile::open(&path, &o).unwrap();
        eprintln!("IOPOLL notes: {:?}", raw.notes());
        if raw.notes().is_empty() {
            eprintln!("this device accepted IOPOLL");
        } else {
            assert!(raw.notes()[0].contains("IOPOLL"), "{:?}", raw.notes());
            assert_eq!(raw.notes().len(), 1);
        }
        many_async_reads(raw.direct(), &data);
    });
}

#[test]
fn sqpoll_and_registered_buffers_round_trip() {
    if !require_uring("sqpoll_and_registered_buffers_round_trip") {
        return;
    }
    bounded(30, || {
        let dir = tmpdir();
        let data = pattern(256 * KIB, 51);
        let path = file_with(dir.path(), "f", &data);
        let mut o = opts(Backend::Uring, true);
        o.sqpoll = true;
        let raw = RawFile::open(&path, &o).unwrap();
        let arena = dio::BufArena::new(1, 128 * KIB, 4096);
        assert!(raw.register_arena(&arena).unwrap());
        let buf = arena.take().unwrap();
        let mut done = raw.direct().read_future(0, vec![buf], Flags::NONE).wait();
        assert_eq!(done.result.unwrap(), 128 * KIB);
        let mut buf = done.bufs.pop().unwrap();
        assert_eq!(&buf[..], &data[..128 * KIB]);
        buf.copy_from_slice(&pattern(128 * KIB, 52));
        let want = buf.to_vec();
        let done = raw
            .direct()
            .write_future(128 * KIB as u64, vec![buf], Flags::NONE)
            .wait();
        assert_eq!(done.result.unwrap(), 128 * KIB);
        assert_eq!(raw.uring().unwrap().fixed_requests(), 2);
        drop(raw);
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(&disk[128 * KIB..], &want[..]);
    });
}

#[test]
fn misaligned_requests_fail_cleanly() {
    bounded(30, || {
        let dir = tmpdir();
        let path = file_with(dir.path(), "f", &pattern(64 * KIB, 1));
        for backend in backends("misaligned_requests_fail_cleanly") {
            let raw = RawFile::open(&path, &opts(backend, true)).unwrap();
            let mut b = AlignedBuf::new(8192, 4096);
            let e = raw
                .direct()
                .read_at(100, &mut b[..4096], Flags::NONE)
                .unwrap_err();
            assert!(matches!(e, Error::Misaligned { .. }), "{e}");
            let e = raw
                .direct()
                .read_at(0, &mut b[1..4097], Flags::NONE)
                .unwrap_err();
            assert!(matches!(e, Error::Misaligned { .. }), "{e}");
            // The device itself refuses a misaligned request with EINVAL.
            let dev = raw.direct().device();
            let mut small = AlignedBuf::new(100, 4096);
            let e = dio::read_device(&**dev, 0, &mut small).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        }
    });
}

// ---- File systems without O_DIRECT ----

#[test]
fn direct_io_refusal_names_the_path_and_file_system() {
    let e = probe::direct_io_unsupported(Path::new("/tmp/x"), Some("tmpfs"));
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(
        e.to_string()
            .starts_with("/tmp/x: this file system (tmpfs) does not support O_DIRECT"),
        "{e}"
    );
    assert_eq!(probe::fs_type_name(0x0102_1994), Some("tmpfs"));
    assert_eq!(probe::fs_type_name(0x794c_7630), Some("overlayfs"));
    assert_eq!(
        probe::fs_type_of(Path::new("/proc/self")).as_deref(),
        Some("proc")
    );

    // A file system that really refuses O_DIRECT: ramfs, mounted under target/ (root
    // only). /dev/shm's tmpfs accepts O_DIRECT on kernels since 6.6.
    if !is_root() {
        eprintln!("skipping the ramfs part: not root");
        return;
    }
    let dir = tmpdir();
    let mnt = dir.path().join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "ramfs", "-o", "size=1m", "dio-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping the ramfs part: mount -t ramfs failed");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let path = file_with(&mnt, "x", b"hello");
    let e = RawFile::open(&path, &RawOptions::default()).unwrap_err();
    let want = format!(
        "{}: this file system (ramfs) does not support O_DIRECT",
        path.display()
    );
    assert!(e.to_string().starts_with(&want), "{e}");
    assert_eq!(e.errno(), libc::EINVAL);
}

// ---- Loop devices (root) ----

#[test]
fn loop_devices_with_512_and_4096_byte_sectors() {
    bounded(120, || {
        for sector in [512u32, 4096] {
            let dir = tmpdir();
            let size = 8usize << 20;
            let orig = pattern(size, u64::from(sector));
            let backing = file_with(dir.path(), "backing", &orig);
            let lo = match LoopDev::attach(&backing, sector) {
                Ok(l) => l,
                Err(why) => {
                    eprintln!("skipping loop device test ({sector}-byte sectors): {why}");
                    return;
                }
            };
            for backend in backends("loop_devices_with_512_and_4096_byte_sectors") {
                let raw = RawFile::open(lo.path(), &opts(backend, true)).unwrap();
                assert!(raw.is_block_device());
                assert_eq!(raw.size(), size as u64);
                let g = raw.direct().geometry();
                assert_eq!(g.logical_block, sector, "{}", lo.path().display());
                assert_eq!(g.size, size as u64);
                assert!(g.physical_block >= sector);
                assert!(raw.set_len(4096).is_err(), "block devices keep their size");
                let f = raw.direct();
                let mut back = AlignedBuf::new(64 * KIB, 4096);
                assert_eq!(
                    f.read_at(1 << 20, &mut back, Flags::NONE).unwrap(),
                    back.len()
                );
                assert_eq!(&back[..], &orig[1 << 20..(1 << 20) + 64 * KIB]);
                let data = pattern(256 * KIB, 7 + u64::from(sector));
                assert_eq!(
                    f.write_at(2 << 20, &aligned(&data), Flags::NONE).unwrap(),
                    data.len()
                );
                // Sub-4K writes work only on the 512-byte device.
                let small = aligned(&pattern(512, 8));
                let r = f.write_at(4 << 20, &small, Flags::NONE);
                if sector == 512 {
                    assert_eq!(r.unwrap(), 512);
                } else {
                    assert!(matches!(r, Err(Error::Misaligned { .. })), "{r:?}");
                }
                // Past the end: nothing read.
                let mut past = AlignedBuf::new(4096, 4096);
                assert_eq!(f.read_at(size as u64, &mut past, Flags::NONE).unwrap(), 0);
                f.sync_data().unwrap();
                drop(raw);
                // The loop device writes through to its backing file.
                let disk = std::fs::read(&backing).unwrap();
                assert_eq!(
                    &disk[2 << 20..(2 << 20) + data.len()],
                    &data[..],
                    "{backend:?}"
                );
                if sector == 512 {
                    assert_eq!(&disk[4 << 20..(4 << 20) + 512], &small[..]);
                }
            }
        }
    });
}

#[test]
fn threads_sharing_a_polled_ring_all_get_their_completions() {
    if !require_uring("threads_sharing_a_polled_ring_all_get_their_completions") {
        return;
    }
    bounded(60, || {
        let dir = tmpdir();
        let data = Arc::new(pattern(1 << 20, 61));
        let path = file_with(dir.path(), "f", &data);
        let mut o = opts(Backend::Uring, false);
        o.queue_depth = 8;
        let raw = Arc::new(RawFile::open(&path, &o).unwrap());
        assert_eq!(
            raw.direct().device().completion_mode(),
            CompletionMode::Polled
        );
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (raw, data) = (Arc::clone(&raw), Arc::clone(&data));
                thread::spawn(move || {
                    let mut b = AlignedBuf::new(8192, 4096);
                    for i in 0..200u64 {
                        let off = ((i * 7 + t * 13) % 120) * 8192;
                        let n = raw.direct().read_at(off, &mut b, Flags::NONE).unwrap();
                        assert_eq!(n, 8192);
                        let o = off as usize;
                        assert_eq!(&b[..], &data[o..o + 8192]);
                    }
                    // Async ones too, waited on by this thread while others poll.
                    let futs: Vec<_> = (0..16u64)
                        .map(|i| {
                            let buf = vec![AlignedBuf::new(4096, 4096)];
                            raw.direct()
                                .read_future((i + t * 16) * 4096, buf, Flags::NONE)
                        })
                        .collect();
                    for (i, f) in futs.into_iter().enumerate() {
                        let c = f.wait();
                        let o = (i + t as usize * 16) * 4096;
                        assert_eq!(c.result.unwrap(), 4096);
                        assert_eq!(&c.bufs[0][..], &data[o..o + 4096]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
}

/// The smallest executor: poll on this thread until ready (no waker needed: a
/// single-issuer ring's future reaps the ring itself when polled).
fn poll_to_end<F: std::future::Future>(fut: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[test]
fn single_thread_ring_reads_writes_and_polls_on_its_own_thread() {
    if !require_uring("single_thread_ring_reads_writes_and_polls_on_its_own_thread") {
        return;
    }
    bounded(60, || {
        let dir = tmpdir();
        let data = pattern(256 * KIB, 21);
        let path = file_with(dir.path(), "f", &data);
        let o = RawOptions {
            single_thread: true,
            ..opts(Backend::Uring, true)
        };
        let raw = RawFile::open(&path, &o).unwrap();
        // Waits (DioFuture::wait) reap with GETEVENTS enters.
        many_async_reads(raw.direct(), &data);
        // Future::poll reaps without waiting: the deferred completion work must
        // still run.
        let done = poll_to_end(raw.direct().read_future(
            8192,
            vec![AlignedBuf::new(4096, 4096)],
            Flags::NONE,
        ));
        assert_eq!(&done.bufs[0][..], &data[8192..12288]);
        let b = aligned(&pattern(8192, 5));
        assert_eq!(raw.direct().write_at(4096, &b, Flags::NONE).unwrap(), 8192);
        assert_eq!(&std::fs::read(&path).unwrap()[4096..12288], &b[..]);
    });
}

/// An arena registered with the ring: async calls on its slots go out as
/// fixed-buffer requests and move the right bytes; slots come back when dropped;
/// the arena outlives the file safely. On the pread back end it is plain memory.
#[test]
fn arena_slots_use_fixed_buffers_and_round_trip() {
    bounded(30, || {
        for backend in backends("arena_slots_use_fixed_buffers_and_round_trip") {
            let dir = tmpdir();
            let data = pattern(512 * KIB, 61);
            let path = file_with(dir.path(), "f", &data);
            let raw = RawFile::open(&path, &opts(backend, true)).unwrap();
            let arena = dio::BufArena::new(4, 64 * KIB, 4096);
            let registered = raw.register_arena(&arena).unwrap();
            assert_eq!(registered, backend == Backend::Uring);
            // Read four slots' worth at once, then write them back shifted.
            let futs: Vec<_> = (0..4u64)
                .map(|i| {
                    let b = arena.take().expect("a free slot");
                    raw.direct()
                        .read_future(i * 64 * KIB as u64, vec![b], Flags::NONE)
                })
                .collect();
            assert!(arena.take().is_none(), "all four slots are lent out");
            let mut bufs = Vec::new();
            for (i, f) in futs.into_iter().enumerate() {
                let mut done = f.wait();
                assert_eq!(done.result.unwrap(), 64 * KIB);
                let b = done.bufs.pop().unwrap();
                assert_eq!(&b[..], &data[i * 64 * KIB..(i + 1) * 64 * KIB]);
                bufs.push(b);
            }
            for (i, b) in bufs.into_iter().enumerate() {
                let at = 256 * KIB as u64 + i as u64 * 64 * KIB as u64;
                let done = raw.direct().write_future(at, vec![b], Flags::NONE).wait();
                assert_eq!(done.result.unwrap(), 64 * KIB);
            }
            // Every slot is free again once the buffers dropped.
            let again: Vec<_> = (0..4).map(|_| arena.take().unwrap()).collect();
            assert_eq!(again.len(), 4);
            if let Some(u) = raw.uring() {
                assert_eq!(u.fixed_requests(), 8, "reads and writes went out fixed");
            }
            drop(raw);
            let disk = std::fs::read(&path).unwrap();
            assert_eq!(&disk[256 * KIB..], &data[..256 * KIB]);
            // The arena outlives the device that registered it.
            drop(again);
            assert_eq!(arena.take().unwrap().len(), 64 * KIB);
        }
    });
}
