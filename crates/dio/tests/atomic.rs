//! Untorn (atomic) writes: the statx limits are exposed, and a request for atomic
//! writes where the file reports none (or not the size asked) is refused with
//! `Feature::AtomicWrite`. The oracle for the limits is the kernel's own statx
//! answer through `xfs_io -c statx` when that tool is present.

use dio::probe::{atomic_write_limits, require_atomic_writes};
use dio::{Error, Feature, Incompatible, RawFile, RawOptions};

fn feature(e: &Error) -> Option<Feature> {
    match e {
        Error::Incompatible(Incompatible { feature, .. }) => Some(*feature),
        _ => None,
    }
}

#[test]
fn atomic_writes_are_granted_only_where_statx_reports_units() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("atomic.bin");
    let opts = RawOptions {
        write: true,
        create: true,
        ..RawOptions::default()
    };
    let raw = RawFile::open(&path, &opts).unwrap();
    raw.set_len(1 << 20).unwrap();
    let limits = atomic_write_limits(raw.fd()).unwrap();
    eprintln!("atomic write limits of {}: {limits:?}", path.display());
    if limits.supported() {
        assert!(limits.unit_min.is_power_of_two() && limits.unit_max.is_power_of_two());
        require_atomic_writes(raw.fd(), &path, u64::from(limits.unit_min)).unwrap();
        require_atomic_writes(raw.fd(), &path, u64::from(limits.unit_max)).unwrap();
        let too_big = u64::from(limits.unit_max) * 2;
        let e = require_atomic_writes(raw.fd(), &path, too_big).unwrap_err();
        assert_eq!(feature(&e), Some(Feature::AtomicWrite));
    } else {
        for unit in [512u64, 4096, 65536] {
            let e = require_atomic_writes(raw.fd(), &path, unit).unwrap_err();
            assert_eq!(feature(&e), Some(Feature::AtomicWrite), "{e}");
            assert_eq!(e.errno(), libc::EOPNOTSUPP);
        }
    }
    // Sizes that are never atomic: not a power of two, zero.
    for unit in [0u64, 3000] {
        let e = require_atomic_writes(raw.fd(), &path, unit).unwrap_err();
        assert_eq!(feature(&e), Some(Feature::AtomicWrite));
    }
    // The kernel's answer through another tool, where it is installed.
    match std::process::Command::new("xfs_io")
        .args(["-c", "statx -r -m 0x10000"])
        .arg(&path)
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("stat.{name} = ")))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            };
            if let Some(min) = field("atomic_write_unit_min") {
                assert_eq!(min, limits.unit_min);
                assert_eq!(field("atomic_write_unit_max"), Some(limits.unit_max));
            } else {
                eprintln!("skipped the xfs_io comparison: it prints no atomic write fields");
            }
        }
        _ => eprintln!("skipped the xfs_io comparison: xfs_io not installed"),
    }
}

// ---- The engine's untorn writes (Flags::ATOMIC) on the RAM device ----

use std::io::IoSlice;
use std::sync::Arc;

use dio::{
    AlignedBuf, Device, DirectFile, FileState, Flags, Geometry, IdentityMap, MemDevice,
    MemDeviceConfig, Op, TestMap, TestMapConfig,
};

const MIB: u64 = 1 << 20;

fn ram(cfg: MemDeviceConfig) -> (Arc<MemDevice>, DirectFile) {
    let size = cfg.geometry.size;
    let dev = Arc::new(MemDevice::new(cfg));
    let map = Arc::new(IdentityMap::new(4096, size));
    let file = DirectFile::new(dev.clone(), map, Arc::new(FileState::new(size))).unwrap();
    (dev, file)
}

fn filled(len: usize, byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, 4096);
    b.fill(byte);
    b
}

fn assert_atomic_refusal(e: &Error) {
    assert_eq!(feature(e), Some(Feature::AtomicWrite), "{e}");
    assert_eq!(e.errno(), libc::EOPNOTSUPP, "{e}");
}

#[test]
fn an_untorn_write_goes_out_as_exactly_one_flagged_request() {
    let cfg = MemDeviceConfig::new(MIB, 512)
        .geometry(Geometry::new(512, MIB).with_limits(256, 64 << 10))
        .atomic_write(4096, 64 << 10)
        .log();
    let (dev, file) = ram(cfg);
    assert_eq!(file.atomic_write_units(), Some((4096, 64 << 10)));
    // 64 KiB from sixteen separate 4 KiB buffers: one request of 64 KiB.
    let bufs: Vec<AlignedBuf> = (0..16).map(|i| filled(4096, i as u8 + 1)).collect();
    let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    assert_eq!(
        file.write(128 << 10, &slices, Flags::ATOMIC).unwrap(),
        64 << 10
    );
    let log = dev.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(
        (log[0].op, log[0].offset, log[0].len),
        (Op::Write, 128 << 10, 64 << 10)
    );
    assert!(log[0].atomic);
    let back = dev.read_raw(128 << 10, 64 << 10);
    for (i, chunk) in back.chunks(4096).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 + 1));
    }
    // A plain write of the same shape is not flagged; an async untorn one is.
    dev.reset_stats();
    file.write(128 << 10, &slices, Flags::NONE).unwrap();
    let done = file
        .write_future(0, vec![filled(8192, 9)], Flags::ATOMIC | Flags::DSYNC)
        .wait();
    assert_eq!(done.result.unwrap(), 8192);
    let log = dev.log();
    assert!(!log[..log.len() - 1].iter().any(|r| r.atomic), "{log:?}");
    let last = log.last().unwrap();
    assert!(last.atomic && last.fua && last.len == 8192, "{last:?}");
}

#[test]
fn writes_that_cannot_be_untorn_are_refused_before_a_byte_moves() {
    let (dev, file) = ram(MemDeviceConfig::new(MIB, 512)
        .atomic_write(4096, 64 << 10)
        .log());
    let cases: [(u64, usize, &str); 5] = [
        (0, 12288, "not a power of two"),
        (0, 128 << 10, "above unit_max"),
        (0, 2048, "below unit_min"),
        (4096, 16384, "not aligned to its length"),
        (
            MIB - 4096,
            8192,
            "past the end (the map has no blocks there)",
        ),
    ];
    for (at, len, why) in cases {
        let r = file.write_at(at, &filled(len, 5), Flags::ATOMIC);
        let e = r.expect_err(why);
        assert!(
            matches!(e, Error::Incompatible(_) | Error::TooLarge { .. }),
            "{why}: {e}"
        );
        if let Error::Incompatible(_) = e {
            assert_atomic_refusal(&e);
        }
    }
    // Padding would be needed: refused, not read-modify-written.
    let e = file
        .write_at(1000, &[1u8; 4096], Flags::ATOMIC | Flags::UNALIGNED)
        .unwrap_err();
    assert_atomic_refusal(&e);
    let c = file
        .write_future(100, vec![vec![1u8; 4096]], Flags::ATOMIC | Flags::UNALIGNED)
        .wait();
    assert_atomic_refusal(&c.result.unwrap_err());
    // Reads are never untorn.
    let mut b = AlignedBuf::new(4096, 4096);
    assert_atomic_refusal(&file.read_at(0, &mut b, Flags::ATOMIC).unwrap_err());
    assert!(
        dev.log().is_empty(),
        "refused calls sent requests: {:?}",
        dev.log()
    );
    assert!(dev.read_raw(0, MIB as usize).iter().all(|&b| b == 0));

    // A device without atomic units: refused, and the message says it has none.
    let (dev, file) = ram(MemDeviceConfig::new(MIB, 512).log());
    assert_eq!(file.atomic_write_units(), None);
    let e = file
        .write_at(0, &filled(4096, 1), Flags::ATOMIC)
        .unwrap_err();
    assert_atomic_refusal(&e);
    assert!(dev.log().is_empty());
}

#[test]
fn untorn_writes_need_one_run_of_written_blocks() {
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(4 * MIB, 512)
            .atomic_write(4096, 64 << 10)
            .log(),
    ));
    // Extents of at most two blocks: a 16 KiB write spans two of them.
    let map = Arc::new(TestMap::new(TestMapConfig::new(4096, 1024).max_extent(2)));
    let file = DirectFile::new(dev.clone(), map.clone(), Arc::new(FileState::new(0))).unwrap();
    // A hole (the write would allocate): refused.
    let e = file
        .write_at(0, &filled(8192, 1), Flags::ATOMIC)
        .unwrap_err();
    assert_atomic_refusal(&e);
    // Unwritten (preallocated) blocks: refused.
    map.preallocate(4..6).unwrap();
    let e = file
        .write_at(16384, &filled(8192, 1), Flags::ATOMIC)
        .unwrap_err();
    assert_atomic_refusal(&e);
    assert!(dev.log().is_empty());
    // Written blocks in one extent: accepted; across two extents: refused.
    file.write_at(0, &filled(32768, 2), Flags::NONE).unwrap();
    dev.reset_stats();
    assert_eq!(
        file.write_at(0, &filled(8192, 3), Flags::ATOMIC).unwrap(),
        8192
    );
    assert_eq!(dev.log().len(), 1);
    let e = file
        .write_at(16384, &filled(16384, 3), Flags::ATOMIC)
        .unwrap_err();
    assert_atomic_refusal(&e);
    assert_eq!(dev.log().len(), 1);
}

/// One round of writes for the torn-crash checks: untorn writes of several sizes
/// and plain writes, none flushed. Returns the untorn and the plain regions.
/// Device byte ranges: (offset, length).
type Regions = Vec<(u64, usize)>;

fn torn_round(file: &DirectFile, byte: u8) -> (Regions, Regions) {
    let atomic = [
        (0u64, 4096usize),
        (8192, 8192),
        (16384, 16384),
        (65536, 65536),
    ];
    let plain = [(131072u64, 16384usize), (196608, 65536)];
    for &(at, len) in &atomic {
        assert_eq!(
            file.write_at(at, &filled(len, byte), Flags::ATOMIC)
                .unwrap(),
            len
        );
    }
    for &(at, len) in &plain {
        assert_eq!(
            file.write_at(at, &filled(len, byte), Flags::NONE).unwrap(),
            len
        );
    }
    (atomic.to_vec(), plain.to_vec())
}

/// Regions that hold neither all old (zero) nor all new bytes.
fn torn(dev: &MemDevice, regions: &[(u64, usize)], byte: u8) -> usize {
    regions
        .iter()
        .filter(|&&(at, len)| {
            let b = dev.read_raw(at, len);
            !(b.iter().all(|&x| x == 0) || b.iter().all(|&x| x == byte))
        })
        .count()
}

/// Over many torn crashes: untorn writes survive whole or not at all, while plain
/// writes do tear (so the crash mode is not vacuous); and a device that tears
/// untorn writes too is caught by the same check (the mutation).
#[test]
fn torn_crashes_never_tear_an_untorn_write_and_the_check_catches_one_that_does() {
    let (dev, file) = ram(MemDeviceConfig::new(MIB, 512)
        .atomic_write(4096, 64 << 10)
        .torn_crash());
    let zeros = vec![0u8; MIB as usize];
    let (mut torn_plain, mut torn_atomic_mutant) = (0, 0);
    for seed in 0..64u64 {
        for honour in [true, false] {
            dev.write_raw(0, &zeros);
            dev.flush().unwrap();
            let byte = (seed as u8) | 1;
            let (atomic, plain) = torn_round(&file, byte);
            if honour {
                dev.crash_torn(seed);
                assert_eq!(
                    torn(&dev, &atomic, byte),
                    0,
                    "seed {seed}: an untorn write tore"
                );
                torn_plain += torn(&dev, &plain, byte);
            } else {
                dev.crash_torn_all(seed);
                torn_atomic_mutant += torn(&dev, &atomic, byte);
            }
        }
    }
    assert!(
        torn_plain > 0,
        "no plain write ever tore: the crash mode tears nothing"
    );
    assert!(
        torn_atomic_mutant > 0,
        "the check missed untorn writes that tore"
    );
    // What was flushed survives every crash whole.
    dev.write_raw(0, &zeros);
    dev.flush().unwrap();
    torn_round(&file, 7);
    dev.flush().unwrap();
    dev.crash_torn_all(3);
    assert!(dev.read_raw(0, 4096).iter().all(|&b| b == 7));
}

// ---- The kernel path: RWF_ATOMIC on a file system that offers untorn writes ----

/// An XFS image on a loop device, mounted; unmounted and detached on drop.
struct XfsMount {
    dir: tempfile::TempDir,
    loopdev: String,
}

impl XfsMount {
    fn new() -> Result<XfsMount, String> {
        use std::process::Command;
        let run = |cmd: &mut Command| -> Result<String, String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(320 << 20))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&img))?;
        let loopdev = run(Command::new("losetup").args(["-f", "--show"]).arg(&img))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        if let Err(e) = run(Command::new("mount").arg(&loopdev).arg(&mnt)) {
            let _ = Command::new("losetup").args(["-d", &loopdev]).status();
            return Err(e);
        }
        Ok(XfsMount { dir, loopdev })
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("mnt").join(name)
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path().join("mnt"))
            .status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.loopdev])
            .status();
    }
}

/// Untorn writes through both back ends where the kernel offers them (XFS with
/// reflink does, in software, on Linux 6.16+), and the proof that the flag reaches
/// the kernel: a write the kernel's atomic rules refuse (EINVAL) goes through
/// without the flag. On this machine's own disk (above) the engine refuses.
#[test]
fn untorn_writes_pass_rwf_atomic_to_the_kernel_where_it_offers_them() {
    use dio::{Backend, SyncConfig, SyncDevice};
    use std::os::unix::fs::OpenOptionsExt;
    // Here, first: the target dir's file system.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let here = dir.path().join("here.bin");
    std::fs::File::create(&here).unwrap().set_len(MIB).unwrap();
    let opts = RawOptions {
        write: true,
        ..RawOptions::default()
    };
    let raw = RawFile::open(&here, &opts).unwrap();
    match raw.direct().atomic_write_units() {
        None => {
            let e = raw
                .direct()
                .write_at(0, &filled(4096, 1), Flags::ATOMIC)
                .unwrap_err();
            assert_atomic_refusal(&e);
            eprintln!("the target dir's file system offers no untorn writes: refused ({e})");
        }
        Some(u) => eprintln!("the target dir's file system offers untorn writes {u:?}"),
    }
    if !dio_testkit::is_root() || !dio_testkit::have("mkfs.xfs") || !dio_testkit::have("losetup") {
        return dio_testkit::skip("the kernel path needs root, mkfs.xfs and losetup");
    }
    let mount = match XfsMount::new() {
        Ok(m) => m,
        Err(e) => return dio_testkit::skip(format!("no XFS loop mount: {e}")),
    };
    let path = mount.path("db");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let limits = atomic_write_limits(RawFile::open(&path, &opts).unwrap().fd()).unwrap();
    eprintln!("XFS atomic write limits: {limits:?}");
    for backend in [Backend::Uring, Backend::Sync] {
        if backend == Backend::Uring && dio::probe::uring_available().is_err() {
            dio_testkit::skip("io_uring unavailable: the uring half");
            continue;
        }
        let opts = RawOptions {
            write: true,
            backend,
            ..RawOptions::default()
        };
        let raw = RawFile::open(&path, &opts).unwrap();
        let Some((min, max)) = raw.direct().atomic_write_units() else {
            let e = raw
                .direct()
                .write_at(0, &filled(4096, 1), Flags::ATOMIC)
                .unwrap_err();
            assert_atomic_refusal(&e);
            return dio_testkit::skip(format!(
                "XFS here reports no atomic write units ({limits:?}): refused ({e})"
            ));
        };
        let (min, max) = (min as usize, max as usize);
        let n = raw
            .direct()
            .write_at(min as u64, &filled(min, 0x5A), Flags::ATOMIC)
            .unwrap();
        assert_eq!(n, min, "{backend:?}");
        let n = raw
            .direct()
            .write_at(0, &filled(max, 0x5B), Flags::ATOMIC | Flags::DSYNC)
            .unwrap();
        assert_eq!(n, max, "{backend:?}");
        let mut back = AlignedBuf::new(max, 4096);
        raw.direct().read_at(0, &mut back, Flags::NONE).unwrap();
        assert!(back.iter().all(|&b| b == 0x5B), "{backend:?}");
        let e = raw
            .direct()
            .write_at(0, &filled(max * 2, 1), Flags::ATOMIC)
            .unwrap_err();
        assert_atomic_refusal(&e);
    }
    // The kernel's own check: a device whose geometry claims more than the file
    // offers passes an untorn write twice the real maximum to pwritev2; the kernel
    // refuses it with EINVAL, and takes the same write without the flag.
    let max = limits.unit_max;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let geo = Geometry::new(4096, 4 * MIB)
        .with_limits(256, 4 << 20)
        .with_atomic_write(limits.unit_min, (max * 2).min(4 << 20), 0);
    let len = (max as usize * 2).min(4 << 20);
    assert!(
        len > max as usize,
        "unit_max {max} leaves no room to overstep"
    );
    let mut cfg = SyncConfig::default();
    cfg.workers = 0;
    let sync = SyncDevice::new(file.try_clone().unwrap(), geo, &cfg).unwrap();
    #[cfg_attr(not(feature = "io-uring"), allow(unused_mut))]
    let mut devs: Vec<Box<dyn Device>> = vec![Box::new(sync)];
    #[cfg(feature = "io-uring")]
    if dio::probe::uring_available().is_ok() {
        let uring = dio::UringDevice::new(file, geo, &dio::UringConfig::default()).unwrap();
        devs.push(Box::new(uring));
    }
    #[cfg(not(feature = "io-uring"))]
    drop(file);
    for dev in devs {
        // Plain requests of that size are fine.
        dio::write_device(&*dev, 0, &mut filled(len, 3), false).unwrap();
        let e = atomic_request(&*dev, 0, len).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{}: {e}", dev.name());
        // And one within the real limits is taken.
        atomic_request(&*dev, 0, max as usize).unwrap();
    }
}

/// Submit one untorn write of `len` bytes at `at` and wait for it.
fn atomic_request(dev: &dyn Device, at: u64, len: usize) -> std::io::Result<()> {
    use std::sync::Mutex;
    struct Wait(Mutex<Option<std::io::Result<()>>>);
    impl dio::Completion for Wait {
        fn complete(self: Arc<Self>, _: dio::Finished, r: std::io::Result<()>) {
            *self.0.lock().unwrap() = Some(r);
        }
    }
    let w = Arc::new(Wait(Mutex::new(None)));
    let mut req = dio::Request::with_buf(Op::Write, at, filled(len, 4), false, w.clone(), 0);
    req.set_atomic(true);
    dev.submit(req);
    loop {
        if let Some(r) = w.0.lock().unwrap().take() {
            return r;
        }
        if dev.poll(true).unwrap() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
