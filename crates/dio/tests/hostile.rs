//! The public entry points with hostile arguments: any offset, length, buffer
//! address, flags, size and geometry. Every call returns Ok or an Err; none panics,
//! hangs or touches memory it does not own.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use common::STALE;
use dio::MemDeviceConfig;
use dio::{
    AlignedBuf, DirectFile, FileState, Flags, Geometry, IdentityMap, MemDevice, TestMap,
    TestMapConfig,
};
use proptest::prelude::*;

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..(1u64 << 20),
        any::<u64>(),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        (0..64u64).prop_map(|k| u64::MAX - k),
        (0..64u64).prop_map(|k| (i64::MAX as u64) - k * 512),
    ]
}

#[derive(Debug, Clone)]
enum Call {
    Read {
        off: u64,
        len: usize,
        skew: usize,
        flags: u32,
        split: bool,
    },
    Write {
        off: u64,
        len: usize,
        skew: usize,
        flags: u32,
        split: bool,
    },
    ReadAsync {
        off: u64,
        len: usize,
        flags: u32,
    },
    WriteAsync {
        off: u64,
        len: usize,
        flags: u32,
    },
    Truncate(u64),
}

fn call() -> impl Strategy<Value = Call> {
    let args = || {
        (
            offset(),
            0..20000usize,
            0..4097usize,
            any::<u32>(),
            any::<bool>(),
        )
    };
    prop_oneof![
        args().prop_map(|(off, len, skew, flags, split)| Call::Read {
            off,
            len,
            skew,
            flags,
            split
        }),
        args().prop_map(|(off, len, skew, flags, split)| Call::Write {
            off,
            len,
            skew,
            flags,
            split
        }),
        (offset(), 0..20000usize, any::<u32>()).prop_map(|(off, len, flags)| Call::ReadAsync {
            off,
            len,
            flags
        }),
        (offset(), 0..20000usize, any::<u32>()).prop_map(|(off, len, flags)| Call::WriteAsync {
            off,
            len,
            flags
        }),
        offset().prop_map(Call::Truncate),
    ]
}

/// Flags from hostile bits (unknown bits are ignored by the engine).
fn flags(bits: u32) -> Flags {
    let all = [
        Flags::LOCKING,
        Flags::SKIP_HOLES,
        Flags::ASYNC_EXTEND,
        Flags::DSYNC,
        Flags::POLL,
        Flags::NOWAIT,
        Flags::UNALIGNED,
    ];
    let mut f = Flags::NONE;
    for (i, x) in all.iter().enumerate() {
        if bits & (1 << i) != 0 {
            f |= *x;
        }
    }
    f
}

fn run(file: &DirectFile, calls: Vec<Call>) {
    let mut mem = AlignedBuf::new(20000 + 8192, 4096);
    for c in calls {
        match c {
            Call::Read {
                off,
                len,
                skew,
                flags: b,
                split,
            } => {
                let buf = &mut mem[skew..skew + len];
                let (x, y) = buf.split_at_mut(if split { len / 2 } else { len });
                let _ = file.read(off, &mut [IoSliceMut::new(x), IoSliceMut::new(y)], flags(b));
            }
            Call::Write {
                off,
                len,
                skew,
                flags: b,
                split,
            } => {
                let buf = &mem[skew..skew + len];
                let (x, y) = buf.split_at(if split { len / 3 } else { len });
                let _ = file.write(off, &[IoSlice::new(x), IoSlice::new(y)], flags(b));
            }
            Call::ReadAsync { off, len, flags: b } => {
                let _ = file.read_future(off, vec![vec![0u8; len]], flags(b)).wait();
            }
            Call::WriteAsync { off, len, flags: b } => {
                let _ = file
                    .write_future(off, vec![vec![1u8; len]], flags(b))
                    .wait();
            }
            Call::Truncate(size) => {
                let _ = file.truncate(size);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    #[test]
    fn hostile_calls_on_a_test_map_never_panic(calls in prop::collection::vec(call(), 1..20), lb in prop_oneof![Just(512u32), Just(4096u32)], fs_shift in 0..4u32) {
        let fs = (lb << fs_shift).min(65536);
        let size = 4u64 << 20;
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, lb).fill(STALE)));
        let map = Arc::new(TestMap::new(TestMapConfig::new(fs, size / u64::from(fs))));
        let file = DirectFile::new(dev, map, Arc::new(FileState::new(0))).unwrap();
        run(&file, calls);
    }

    #[test]
    fn hostile_calls_on_an_identity_map_never_panic(calls in prop::collection::vec(call(), 1..20), start_size in offset()) {
        let size = 1u64 << 20;
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512)));
        let file = DirectFile::new(dev, Arc::new(IdentityMap::new(4096, size)), Arc::new(FileState::new(start_size))).unwrap();
        run(&file, calls);
    }

    #[test]
    fn hostile_geometries_are_refused_or_work(lb in any::<u32>(), mem_align in any::<u32>(), segs in any::<u32>(), max_bytes in any::<u32>(), fs in any::<u32>()) {
        let geo = Geometry::new(lb, 1 << 20).with_mem_align(mem_align).with_limits(segs, max_bytes);
        if geo.validate().is_err() {
            return Ok(());
        }
        let size = 1u64 << 20;
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512).geometry(geo)));
        if let Ok(file) = DirectFile::new(dev, Arc::new(IdentityMap::new(fs, size)), Arc::new(FileState::new(size))) {
            let mut b = AlignedBuf::new(8192, 4096);
            let _ = file.read_at(0, &mut b, Flags::NONE);
            let _ = file.write_at(0, &b, Flags::UNALIGNED);
        }
    }
}
