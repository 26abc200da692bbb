//! Shared set-up for the engine tests: a RAM device, a test map and a file over them.
#![allow(dead_code)]

use std::sync::Arc;

use dio::MemDeviceConfig;
use dio::{DirectFile, FileState, MemDevice, TestMap, TestMapConfig};

pub struct Rig {
    pub dev: Arc<MemDevice>,
    pub map: Arc<TestMap>,
    pub file: DirectFile,
}

pub const STALE: u8 = 0xAA;

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

/// A buffer aligned to 4096 holding `len` bytes of a pattern that never contains
/// the stale byte.
pub fn pattern(len: usize, seed: u8) -> dio::AlignedBuf {
    let mut b = dio::AlignedBuf::new(len, 4096);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (((i / 7) as u8).wrapping_add(seed) % 0xA0) + 1;
    }
    b
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

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `data` in a page-aligned buffer.
pub fn aligned(data: &[u8]) -> dio::AlignedBuf {
    dio::AlignedBuf::from_slice(data, 4096)
}
