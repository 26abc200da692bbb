//! Shared set-up for the engine tests: a RAM device, a test map and a file over them.
#![allow(dead_code)]

use std::sync::Arc;

use dio::device::mem::MemDeviceConfig;
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
