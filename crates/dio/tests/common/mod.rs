//! Shared set-up for the engine tests: a RAM device, a test map and a file over them,
//! and what a test needs (root, io_uring, tools) with a printed reason when it skips.
//! The generator, the data pattern and the probes come from `dio-testkit`, the one
//! copy the whole workspace's tests share.
#![allow(dead_code, unused_imports)]

use std::sync::{Arc, OnceLock};

use dio::MemDeviceConfig;
use dio::{DirectFile, FileState, MemDevice, TestMap, TestMapConfig};

pub struct Rig {
    pub dev: Arc<MemDevice>,
    pub map: Arc<TestMap>,
    pub file: DirectFile,
}

pub use dio_testkit::{have, is_root, skip, Rng, STALE};

/// A 0xAA-filled device of `dev_size` bytes with `lb`-byte sectors, a test map with
/// `fs`-byte blocks, and a file of `size` bytes.
pub fn rig_with(cfg: MemDeviceConfig, map_cfg: TestMapConfig, size: u64) -> Rig {
    let dev = Arc::new(MemDevice::new(cfg));
    let map = Arc::new(TestMap::new(map_cfg));
    let file = DirectFile::new(dev.clone(), map.clone(), Arc::new(FileState::new(size))).unwrap();
    Rig { dev, map, file }
}

pub fn rig(fs: u32, lb: u32, dev_size: u64, size: u64) -> Rig {
    rig_with(
        MemDeviceConfig::new(dev_size, lb).fill(STALE).log(),
        TestMapConfig::new(fs, dev_size / u64::from(fs)),
        size,
    )
}

/// A buffer aligned to 4096 holding `len` bytes of [`dio_testkit::pattern`] for
/// `seed`: never 0, never the stale byte, different for every seed.
pub fn pattern(len: usize, seed: u8) -> dio::AlignedBuf {
    let mut b = dio::AlignedBuf::new(len, 4096);
    dio_testkit::pattern(&mut b, u64::from(seed), 0);
    b
}

/// Whether io_uring can be set up here, probed once per test binary; `Err` says why
/// not (the setup errno).
pub fn uring() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| dio::probe::uring_available().map_err(|e| e.to_string()))
        .clone()
}

/// [`uring`], or [`skip`] saying `what` needs io_uring and why it is missing.
pub fn require_uring(what: &str) -> bool {
    match uring() {
        Ok(()) => true,
        Err(why) => {
            skip(format_args!(
                "{what} needs io_uring, which is unavailable: {why}"
            ));
            false
        }
    }
}

/// Whether the tests run under valgrind (`DIO_VALGRIND=1`, set by `.ci/valgrind`):
/// time bounds stretch and cases valgrind cannot run (a thread blocked in
/// `io_uring_enter` holds valgrind's one lock, so no other thread runs) are skipped.
pub fn under_valgrind() -> bool {
    std::env::var_os("DIO_VALGRIND").is_some_and(|v| !v.is_empty() && v != "0")
}

/// `secs`, stretched 30 times under valgrind (which runs code 20-50 times slower).
pub fn time_scaled(secs: u64) -> u64 {
    if under_valgrind() {
        secs * 30
    } else {
        secs
    }
}

/// A proptest case count: `n`, or `PROPTEST_CASES` when set (an explicit `cases`
/// in a config otherwise hides that variable; `.ci/valgrind --ci` lowers it).
pub fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}

/// Run `f` on a thread and fail if it takes longer than `secs` (stretched under
/// valgrind).
pub fn bounded<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::mpsc;
    let secs = time_scaled(secs);
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        // The closure panicked: re-raise its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sent nothing yet returned"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within {secs} s"),
    }
}

/// `len` pseudo-random bytes from `seed` (any value, 0 and the stale byte included).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `data` in a page-aligned buffer.
pub fn aligned(data: &[u8]) -> dio::AlignedBuf {
    dio::AlignedBuf::from_slice(data, 4096)
}
