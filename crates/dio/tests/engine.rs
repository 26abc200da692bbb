//! The direct-I/O contract (SEMANTICS.md), one test per rule, on the RAM device.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{pattern, rig, rig_with, STALE};
use dio::MemDeviceConfig;
use dio::{
    AlignPart, AlignedBuf, BlockMap, Device, DirectFile, Error, Extent, FileState, Flags, Geometry,
    IdentityMap, MemDevice, Op, TestMap, TestMapConfig, MAX_IN_FLIGHT,
};

const MIB: u64 = 1 << 20;

fn read_all(file: &DirectFile, offset: u64, len: usize) -> (dio::Result<usize>, AlignedBuf) {
    let mut b = AlignedBuf::new(len, 4096);
    let r = file.read_at(offset, &mut b, Flags::NONE);
    (r, b)
}

// ---- Units and alignment ----

#[test]
fn fs_block_aligned_request_round_trips() {
    let r = rig(4096, 512, 4 * MIB, 0);
    let data = pattern(64 * 1024, 3);
    assert_eq!(r.file.write_at(0, &data, Flags::NONE).unwrap(), data.len());
    let (n, back) = read_all(&r.file, 0, data.len());
    assert_eq!(n.unwrap(), data.len());
    assert_eq!(&back[..], &data[..]);
}

#[test]
fn sub_block_512_on_4k_alignment_is_accepted() {
    let r = rig(4096, 512, 4 * MIB, 0);
    r.map.map_written(0..4).unwrap();
    r.file.truncate(16384).unwrap();
    let data = pattern(1536, 9);
    assert_eq!(r.file.write_at(512, &data, Flags::NONE).unwrap(), 1536);
    let (n, back) = read_all(&r.file, 512, 1536);
    assert_eq!(n.unwrap(), 1536);
    assert_eq!(&back[..], &data[..]);
    // A 512-byte read in the middle of a block.
    let (n, back) = read_all(&r.file, 1024, 512);
    assert_eq!(n.unwrap(), 512);
    assert_eq!(&back[..], &data[512..1024]);
}

#[test]
fn misaligned_offset_buffer_or_length_is_einval_and_transfers_nothing() {
    let r = rig(4096, 512, 4 * MIB, MIB);
    r.map.map_written(0..256).unwrap();
    r.dev.reset_stats();
    let mut b = AlignedBuf::new(8192, 4096);
    // Offset.
    let e = r
        .file
        .read_at(100, &mut b[..4096], Flags::NONE)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                part: AlignPart::Offset,
                value: 100,
                required: 512
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EINVAL);
    // Length.
    let e = r.file.read_at(0, &mut b[..1000], Flags::NONE).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                part: AlignPart::Length,
                ..
            }
        ),
        "{e}"
    );
    // Buffer address.
    let e = r.file.write_at(0, &b[1..513], Flags::NONE).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                part: AlignPart::Buffer,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(r.dev.stats().requests, 0, "nothing may reach the device");
    assert_eq!(r.dev.read_raw(0, 8192), vec![STALE; 8192]);
}

#[test]
fn dio_align_reports_memory_and_offset_alignment() {
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(MIB, 4096).geometry(Geometry::new(4096, MIB).with_mem_align(512)),
    ));
    let file = DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(4096, MIB)),
        Arc::new(FileState::new(MIB)),
    )
    .unwrap();
    assert_eq!(file.dio_align(), (512, 4096));
}

// ---- One request, start to finish ----

#[test]
fn zero_length_read_returns_zero_at_once() {
    let r = rig(4096, 512, MIB, MIB);
    assert_eq!(r.file.read(0, &mut [], Flags::NONE).unwrap(), 0);
    assert_eq!(r.dev.stats().requests, 0);
    assert_eq!(r.map.calls(), 0);
}

#[test]
fn read_at_or_past_eof_returns_zero() {
    let r = rig(4096, 512, MIB, 8192);
    r.map.map_written(0..2).unwrap();
    for off in [8192, 12288, 1 << 30] {
        let (n, _) = read_all(&r.file, off, 4096);
        assert_eq!(n.unwrap(), 0, "offset {off}");
    }
    assert_eq!(r.dev.stats().requests, 0);
}

#[test]
fn file_of_300_bytes_reads_300_generic_210() {
    let r = rig(4096, 512, MIB, 0);
    let data = pattern(4096, 1);
    r.file.write_at(0, &data, Flags::NONE).unwrap();
    r.file.truncate(300).unwrap();
    let (n, back) = read_all(&r.file, 0, 8192);
    assert_eq!(n.unwrap(), 300);
    assert_eq!(&back[..300], &data[..300]);
}

#[test]
fn read_past_eof_in_same_block_returns_zero_generic_450() {
    let r = rig(4096, 512, MIB, 0);
    r.file.write_at(0, &pattern(4096, 1), Flags::NONE).unwrap();
    r.file.truncate(300).unwrap();
    let (n, _) = read_all(&r.file, 512, 512);
    assert_eq!(n.unwrap(), 0);
}

#[test]
fn holes_read_as_zeros_and_stop_at_eof() {
    let r = rig(4096, 512, MIB, 20000);
    r.map.map_written(1..2).unwrap();
    r.dev.write_raw(0, &[7u8; 4096]);
    let (n, back) = read_all(&r.file, 0, 32768);
    // EOF 20000 rounds up to the dio block (fs block here): 20480, clipped to 20000.
    assert_eq!(n.unwrap(), 20000);
    assert!(back[..4096].iter().all(|&b| b == 0), "hole reads zeros");
    assert!(back[4096..8192].iter().all(|&b| b == 7));
    assert!(back[8192..20000].iter().all(|&b| b == 0));
}

#[test]
fn unwritten_extents_read_as_zeros() {
    let r = rig(4096, 512, MIB, 16384);
    r.map.preallocate(0..4).unwrap();
    let (n, back) = read_all(&r.file, 0, 16384);
    assert_eq!(n.unwrap(), 16384);
    assert!(
        back.iter().all(|&b| b == 0),
        "unwritten blocks must not show stale 0xAA"
    );
    assert_eq!(r.dev.stats().requests, 0);
}

#[test]
fn write_into_hole_with_skip_holes_stops_with_partial_result() {
    let r = rig(4096, 512, MIB, 16384);
    r.map.map_written(0..2).unwrap();
    let data = pattern(16384, 5);
    let n = r.file.write_at(0, &data, Flags::SKIP_HOLES).unwrap();
    assert_eq!(n, 8192, "stops at the hole at block 2");
    assert_eq!(r.map.lookup(2), None, "no allocation inside i_size");
    // Starting at the hole: nothing written, the caller is told why.
    let e = r
        .file
        .write_at(8192, &data[..4096], Flags::SKIP_HOLES)
        .unwrap_err();
    assert!(matches!(e, Error::Hole { offset: 8192 }));
    assert_eq!(e.errno(), libc::ENOTBLK);
}

#[test]
fn skip_holes_on_empty_file_still_allocates_underflow_trap() {
    // The seed computed (i_size - 1) >> bits, which underflows for an empty file and
    // made every direct write to it fall back.
    let r = rig(4096, 512, MIB, 0);
    let data = pattern(8192, 2);
    assert_eq!(r.file.write_at(0, &data, Flags::SKIP_HOLES).unwrap(), 8192);
    assert_eq!(r.file.size(), 8192);
    let (_, back) = read_all(&r.file, 0, 8192);
    assert_eq!(&back[..], &data[..]);
}

#[test]
fn write_past_i_size_allocates_with_skip_holes() {
    let r = rig(4096, 512, MIB, 4096);
    r.map.map_written(0..1).unwrap();
    let data = pattern(8192, 4);
    assert_eq!(
        r.file.write_at(4096, &data, Flags::SKIP_HOLES).unwrap(),
        8192
    );
    assert_eq!(r.file.size(), 12288);
}

#[test]
fn partial_write_of_new_block_zeroes_the_rest_of_it() {
    let r = rig(4096, 512, MIB, 0);
    // Blocks come from a device full of 0xAA.
    let data = pattern(1024, 7);
    assert_eq!(r.file.write_at(1024, &data, Flags::NONE).unwrap(), 1024);
    assert_eq!(r.file.size(), 2048);
    r.file.truncate(4096).unwrap();
    let (n, back) = read_all(&r.file, 0, 4096);
    assert_eq!(n.unwrap(), 4096);
    assert!(
        back[..1024].iter().all(|&b| b == 0),
        "head of the new block zeroed"
    );
    assert_eq!(&back[1024..2048], &data[..]);
    assert!(
        back[2048..].iter().all(|&b| b == 0),
        "tail of the new block zeroed"
    );
    let (dev_block, unwritten) = r.map.lookup(0).unwrap();
    assert!(!unwritten);
    assert!(!r.dev.read_raw(dev_block * 4096, 4096).contains(&STALE));
}

#[test]
fn partial_write_into_unwritten_extent_zeroes_the_rest_generic_250() {
    let r = rig(4096, 512, MIB, 8192);
    r.map.preallocate(0..2).unwrap();
    let data = pattern(512, 3);
    r.file.write_at(512, &data, Flags::NONE).unwrap();
    let (_, back) = read_all(&r.file, 0, 8192);
    assert!(back[..512].iter().all(|&b| b == 0));
    assert_eq!(&back[512..1024], &data[..]);
    assert!(back[1024..].iter().all(|&b| b == 0));
    assert!(!back.contains(&STALE));
}

#[test]
fn failed_write_into_unwritten_extent_reveals_no_old_data_generic_252() {
    let r = rig(4096, 512, MIB, 8192);
    r.map.preallocate(0..2).unwrap();
    r.dev.fail_range(0..MIB, Some(Op::Write));
    let e = r
        .file
        .write_at(0, &pattern(8192, 1), Flags::NONE)
        .unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    r.dev.clear_faults();
    let (_, back) = read_all(&r.file, 0, 8192);
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn two_sub_block_writes_into_different_halves_of_one_new_block_both_survive_generic_240() {
    for round in 0..50u64 {
        let r = rig_with(
            MemDeviceConfig::new(MIB, 512).fill(STALE).threaded(
                Some(Duration::from_micros(200)),
                true,
                round + 1,
            ),
            TestMapConfig::new(4096, 256),
            8192,
        );
        let a = pattern(2048, 11);
        let b = pattern(2048, 77);
        let fa = r.file.write_future(0, vec![a.clone()], Flags::NONE);
        let fb = r.file.write_future(2048, vec![b.clone()], Flags::NONE);
        assert_eq!(fa.wait().result.unwrap(), 2048);
        assert_eq!(fb.wait().result.unwrap(), 2048);
        let (_, back) = read_all(&r.file, 0, 4096);
        assert_eq!(&back[..2048], &a[..], "round {round}: first half lost");
        assert_eq!(&back[2048..], &b[..], "round {round}: second half lost");
    }
}

#[test]
fn one_mib_aligned_read_of_one_contiguous_extent_is_one_device_request() {
    let r = rig(4096, 512, 8 * MIB, MIB);
    r.map.map_written(0..256).unwrap();
    r.dev.reset_stats();
    let (n, _) = read_all(&r.file, 0, MIB as usize);
    assert_eq!(n.unwrap(), MIB as usize);
    let log = r.dev.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].len, log[0].segments), (MIB, 1));
}

/// A map with a fixed table of (file block -> device block), holes elsewhere.
struct TableMap(Vec<Option<u64>>);

impl BlockMap for TableMap {
    fn block_size(&self) -> u32 {
        4096
    }
    fn map(&self, block: u64, _max: u64, _create: bool) -> dio::Result<Extent> {
        Ok(match self.0.get(block as usize).copied().flatten() {
            Some(d) => Extent::mapped(d, 1),
            None => Extent::hole(1),
        })
    }
}

fn table_rig(table: Vec<Option<u64>>) -> (Arc<MemDevice>, DirectFile) {
    let size = table.len() as u64 * 4096;
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(MIB, 512).fill(3).log()));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(TableMap(table)),
        Arc::new(FileState::new(size)),
    )
    .unwrap();
    (dev, file)
}

#[test]
fn physical_discontinuity_splits_the_request() {
    let (dev, file) = table_rig(vec![Some(0), Some(1), Some(5), Some(6)]);
    let (n, _) = read_all(&file, 0, 16384);
    assert_eq!(n.unwrap(), 16384);
    let log = dev.log();
    assert_eq!(
        log.iter().map(|l| (l.offset, l.len)).collect::<Vec<_>>(),
        vec![(0, 8192), (5 * 4096, 8192)]
    );
}

#[test]
fn logical_discontinuity_splits_even_when_device_contiguous() {
    // Logical: [0-4095][HOLE][8192-12287]; physical: [0-4095][4096-8191].
    let (dev, file) = table_rig(vec![Some(0), None, Some(1)]);
    let (n, back) = read_all(&file, 0, 12288);
    assert_eq!(n.unwrap(), 12288);
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert!(back[8192..].iter().all(|&b| b == 3));
    let log = dev.log();
    assert_eq!(
        log.iter().map(|l| (l.offset, l.len)).collect::<Vec<_>>(),
        vec![(0, 4096), (4096, 4096)]
    );
}

#[test]
fn boundary_sends_at_once_and_is_never_lost() {
    for (len_blocks, max_bytes) in [(16u64, MIB as u32), (16, 8192), (13, 12288)] {
        let dev = Arc::new(MemDevice::new(
            MemDeviceConfig::new(4 * MIB, 512)
                .geometry(Geometry::new(512, 4 * MIB).with_limits(256, max_bytes))
                .log(),
        ));
        let map = Arc::new(TestMap::new(
            TestMapConfig::new(4096, 1024).boundary_every(4),
        ));
        map.map_written(0..64).unwrap();
        let file = DirectFile::new(
            dev.clone(),
            map.clone(),
            Arc::new(FileState::new(64 * 4096)),
        )
        .unwrap();
        let (n, _) = read_all(&file, 0, (len_blocks * 4096) as usize);
        assert_eq!(n.unwrap(), (len_blocks * 4096) as usize);
        let log = dev.log();
        // No request crosses a boundary (every 4 blocks) and the bytes add up.
        for l in &log {
            let first = l.offset / 4096;
            let last = (l.offset + l.len - 1) / 4096;
            assert_eq!(first / 4, last / 4, "request {l:?} crosses a boundary");
            assert!(l.len <= u64::from(max_bytes));
        }
        assert_eq!(log.iter().map(|l| l.len).sum::<u64>(), len_blocks * 4096);
        if max_bytes as u64 >= 4 * 4096 {
            assert_eq!(
                log.len() as u64,
                len_blocks.div_ceil(4),
                "one request per boundary run: {log:?}"
            );
        }
    }
}

#[test]
fn segment_and_byte_limits_hold() {
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(4 * MIB, 512)
            .geometry(Geometry::new(512, 4 * MIB).with_limits(4, 65536))
            .log(),
    ));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, 4 * MIB)),
        Arc::new(FileState::new(4 * MIB)),
    )
    .unwrap();
    // 16 separate 4 KiB buffers that are not contiguous in memory.
    let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(4096, 4096)).collect();
    let mut slices: Vec<IoSliceMut<'_>> = bufs
        .iter_mut()
        .map(|b| IoSliceMut::new(&mut b[..]))
        .collect();
    assert_eq!(file.read(0, &mut slices, Flags::NONE).unwrap(), 65536);
    let log = dev.log();
    assert!(log.iter().all(|l| l.segments <= 4), "{log:?}");
    assert_eq!(log.len(), 4);
    dev.reset_stats();
    let (n, _) = read_all(&file, 0, MIB as usize);
    assert_eq!(n.unwrap(), MIB as usize);
    let log = dev.log();
    assert!(log.iter().all(|l| l.len <= 65536));
    assert_eq!(log.len(), 16);
}

#[test]
fn reaping_bounds_requests_held_during_a_1_gib_request() {
    let size = 1u64 << 30;
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(size, 512)
            .null()
            .threaded(Some(Duration::from_micros(20)), false, 1),
    ));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, size)),
        Arc::new(FileState::new(size)),
    )
    .unwrap();
    // 1 GiB from 1024 slices of one 1 MiB buffer (a write only reads memory).
    let chunk = AlignedBuf::new(MIB as usize, 4096);
    let slices: Vec<IoSlice<'_>> = (0..1024).map(|_| IoSlice::new(&chunk)).collect();
    assert_eq!(file.write(0, &slices, Flags::NONE).unwrap(), size as usize);
    let st = dev.stats();
    assert_eq!(st.requests, 1024);
    assert!(
        st.max_in_flight <= MAX_IN_FLIGHT as u64,
        "held {} requests",
        st.max_in_flight
    );
}

#[test]
fn eio_on_a_chosen_request_gives_the_error_or_the_exact_partial_count() {
    let geo = Geometry::new(512, 4 * MIB).with_limits(256, 65536);
    let mk = || {
        let dev = Arc::new(MemDevice::new(
            MemDeviceConfig::new(4 * MIB, 512).geometry(geo).fill(STALE),
        ));
        let file = DirectFile::new(
            dev.clone(),
            Arc::new(IdentityMap::new(4096, 4 * MIB)),
            Arc::new(FileState::new(4 * MIB)),
        )
        .unwrap();
        (dev, file)
    };
    // The third 64 KiB request of a 256 KiB read fails: exactly two requests' worth.
    let (dev, file) = mk();
    dev.fail_nth(3);
    let (n, _) = read_all(&file, 0, 262144);
    assert_eq!(n.unwrap(), 131072);
    // The first fails: the error, with errno EIO.
    let (dev, file) = mk();
    dev.fail_nth(1);
    let e = read_all(&file, 0, 262144).0.unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // Writes: a reported count means the bytes are there.
    let (dev, file) = mk();
    dev.fail_range(200_000..200_001, Some(Op::Write));
    let data = pattern(262144, 9);
    let n = file.write_at(0, &data, Flags::NONE).unwrap();
    assert_eq!(n, 196608);
    assert_eq!(dev.read_raw(0, n), data[..n].to_vec());
}

#[test]
fn memory_fault_during_write_leaves_zeros_not_old_data_in_mapped_blocks() {
    let r = rig(4096, 512, MIB, 0);
    // Make the device blocks the file will get hold old data: 0xAA everywhere.
    let data = pattern(32768, 4);
    // The second buffer cannot be pinned.
    let second = data[8192..].as_ptr() as usize;
    let n = r
        .file
        .write_pinned(
            0,
            &[IoSlice::new(&data[..8192]), IoSlice::new(&data[8192..])],
            Flags::NONE,
            |m| m.addr() < second,
        )
        .unwrap();
    assert_eq!(n, 8192, "the bytes before the fault");
    r.file.truncate(32768).unwrap();
    let (_, back) = read_all(&r.file, 0, 32768);
    assert_eq!(&back[..8192], &data[..8192]);
    assert!(
        back[8192..].iter().all(|&b| b == 0),
        "mapped blocks after the fault hold zeros"
    );
    // The device blocks themselves were overwritten with zeros, not left stale.
    for fb in 2..8 {
        let (d, _) = r.map.lookup(fb).unwrap();
        assert_eq!(
            r.dev.read_raw(d * 4096, 4096),
            vec![0; 4096],
            "file block {fb}"
        );
    }
    // A fault before any byte: EFAULT.
    let e = r
        .file
        .write_pinned(0, &[IoSlice::new(&data)], Flags::NONE, |_| false)
        .unwrap_err();
    assert_eq!(e.errno(), libc::EFAULT);
}

#[test]
fn async_completion_in_any_order() {
    let r = rig_with(
        MemDeviceConfig::new(4 * MIB, 512).fill(STALE).threaded(
            Some(Duration::from_micros(50)),
            true,
            7,
        ),
        TestMapConfig::new(4096, 1024),
        0,
    );
    let data = pattern(256 * 1024, 8);
    r.file.write_at(0, &data, Flags::NONE).unwrap();
    let futs: Vec<_> = (0..64u64)
        .map(|i| {
            (
                i,
                r.file
                    .read_future(i * 4096, vec![AlignedBuf::new(4096, 4096)], Flags::NONE),
            )
        })
        .collect();
    for (i, f) in futs {
        let c = f.wait();
        assert_eq!(c.result.unwrap(), 4096);
        let i = i as usize;
        assert_eq!(&c.bufs[0][..], &data[i * 4096..(i + 1) * 4096]);
    }
    // Callbacks too.
    let hits = Arc::new(AtomicU64::new(0));
    for i in 0..32u64 {
        let hits = hits.clone();
        r.file.read_async(
            i * 8192,
            vec![AlignedBuf::new(8192, 512)],
            Flags::NONE,
            move |c| {
                assert_eq!(c.result.unwrap(), 8192);
                hits.fetch_add(1, Ordering::SeqCst);
            },
        );
    }
    // A misaligned owned buffer is refused through the callback.
    let refused = Arc::new(AtomicBool::new(false));
    let rf = refused.clone();
    let mut odd = vec![0u8; 4097];
    odd.remove(0);
    let odd = if odd.as_ptr() as usize % 512 == 0 {
        odd[..4095].to_vec()
    } else {
        odd
    };
    r.file.read_async(0, vec![odd], Flags::NONE, move |c| {
        assert_eq!(c.result.unwrap_err().errno(), libc::EINVAL);
        rf.store(true, Ordering::SeqCst);
    });
    assert!(refused.load(Ordering::SeqCst));
    while hits.load(Ordering::SeqCst) < 32 {
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn dsync_makes_data_durable_before_completion() {
    let mk = || {
        rig_with(
            MemDeviceConfig::new(MIB, 512)
                .crash_mode()
                .threaded(None, false, 1)
                .log(),
            TestMapConfig::new(4096, 256),
            16384,
        )
    };
    // Overwrite of written blocks: FUA requests, no flush needed.
    let r = mk();
    r.map.map_written(0..4).unwrap();
    r.dev.flush().unwrap();
    let data = pattern(16384, 12);
    let c = r
        .file
        .write_future(0, vec![data.clone()], Flags::DSYNC)
        .wait();
    assert_eq!(c.result.unwrap(), 16384);
    assert!(r.dev.log().iter().all(|l| l.fua));
    r.dev.crash();
    let (_, back) = read_all(&r.file, 0, 16384);
    assert_eq!(&back[..], &data[..]);
    // Allocating write: metadata changed, so a flush before completion too.
    let r = mk();
    let before = r.dev.stats().flushes;
    let c = r
        .file
        .write_future(0, vec![data.clone()], Flags::DSYNC)
        .wait();
    assert_eq!(c.result.unwrap(), 16384);
    assert!(r.dev.stats().flushes > before);
    r.dev.crash();
    let (_, back) = read_all(&r.file, 0, 16384);
    assert_eq!(&back[..], &data[..]);
    // Without dsync the crash loses it.
    let r = mk();
    r.map.map_written(0..4).unwrap();
    r.dev.flush().unwrap();
    r.file.write_at(0, &data, Flags::NONE).unwrap();
    r.dev.crash();
    let (_, back) = read_all(&r.file, 0, 16384);
    assert_ne!(&back[..], &data[..]);
}

#[test]
fn truncate_waits_for_in_flight_io() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512).threaded(Some(Duration::from_millis(150)), false, 1),
        TestMapConfig::new(4096, 256),
        65536,
    );
    r.map.map_written(0..16).unwrap();
    let read_done = Arc::new(AtomicBool::new(false));
    let rd = read_done.clone();
    r.file.read_async(
        0,
        vec![AlignedBuf::new(65536, 4096)],
        Flags::NONE,
        move |c| {
            assert_eq!(c.result.unwrap(), 65536);
            rd.store(true, Ordering::SeqCst);
        },
    );
    assert_eq!(r.file.state().dio_count(), 1);
    r.file.truncate(0).unwrap();
    assert!(
        read_done.load(Ordering::SeqCst),
        "truncate returned while I/O was in flight"
    );
    assert_eq!(r.file.size(), 0);
}

#[test]
fn extending_async_write_stays_async_and_finishes_on_the_worker_unless_allowed() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512).threaded(Some(Duration::from_millis(20)), false, 1),
        TestMapConfig::new(4096, 256),
        0,
    );
    // Without ASYNC_EXTEND the call still returns at once (it may be started from a
    // device thread, which must never wait); the size moves only once the data is
    // on the device, and the finish runs on the completion worker, where it may
    // block, not in the device's completion context.
    let (tx, rx) = std::sync::mpsc::channel();
    r.file
        .write_async(0, vec![pattern(4096, 1)], Flags::NONE, move |c| {
            c.result.unwrap();
            let name = std::thread::current().name().map(str::to_string);
            tx.send(name).unwrap();
        });
    let on = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(on.as_deref(), Some("dio-complete"), "finished on {on:?}");
    assert_eq!(r.file.size(), 4096);
    let f = r
        .file
        .write_future(4096, vec![pattern(4096, 2)], Flags::ASYNC_EXTEND);
    assert!(!f.is_done(), "allowed to stay async");
    assert_eq!(f.wait().result.unwrap(), 4096);
    assert_eq!(r.file.size(), 8192);
}

#[test]
fn map_errors_pass_through() {
    let r = rig(4096, 512, MIB, 65536);
    r.map.map_written(0..16).unwrap();
    r.map.fail_blocks(4..5);
    let e = read_all(&r.file, 0, 65536).0.unwrap_err();
    // The map's own error (an OS error, EIO), not one the engine made up.
    assert!(matches!(e, Error::Os { .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
}

#[test]
fn end_io_sees_offset_result_and_private_data() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512),
        TestMapConfig::new(4096, 256).private(),
        0,
    );
    r.file
        .write_at(8192, &pattern(8192, 1), Flags::NONE)
        .unwrap();
    let calls = r.map.end_io_calls();
    assert_eq!(calls, vec![(Op::Write, 8192, Ok(8192), Some(2))]);
}

#[test]
fn deferred_completion_runs_off_the_device_thread() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512).threaded(None, false, 1),
        TestMapConfig::new(4096, 256).defer_completion(),
        65536,
    );
    r.map.map_written(0..16).unwrap();
    let name = Arc::new(Mutex::new(String::new()));
    let n2 = name.clone();
    let f = r
        .file
        .read_future(0, vec![AlignedBuf::new(4096, 4096)], Flags::NONE);
    r.file.read_async(
        0,
        vec![AlignedBuf::new(4096, 4096)],
        Flags::NONE,
        move |_| {
            *n2.lock().unwrap() = thread::current().name().unwrap_or("").to_string();
        },
    );
    f.wait();
    for _ in 0..1000 {
        if !name.lock().unwrap().is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*name.lock().unwrap(), "dio-complete");
}

/// A map whose submission hook counts requests and submits them itself.
struct HookMap {
    inner: IdentityMap,
    submitted: AtomicU64,
}

impl BlockMap for HookMap {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn map(&self, b: u64, n: u64, c: bool) -> dio::Result<Extent> {
        self.inner.map(b, n, c)
    }
    fn submit_io(&self, dev: &dyn dio::Device, req: dio::Request, _file_offset: u64) {
        self.submitted.fetch_add(1, Ordering::SeqCst);
        let dev_ok = req.offset() < dev.geometry().size;
        assert!(dev_ok);
        dev.submit(req);
    }
}

#[test]
fn submission_hook_sees_every_request_and_completion_flows_back() {
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(MIB, 512)));
    let map = Arc::new(HookMap {
        inner: IdentityMap::new(4096, MIB),
        submitted: AtomicU64::new(0),
    });
    let file = DirectFile::new(dev.clone(), map.clone(), Arc::new(FileState::new(MIB))).unwrap();
    let data = pattern(MIB as usize, 3);
    assert_eq!(file.write_at(0, &data, Flags::NONE).unwrap(), MIB as usize);
    assert_eq!(map.submitted.load(Ordering::SeqCst), dev.stats().requests);
}

#[test]
fn accounting_counts_bytes_read_and_written() {
    let r = rig(4096, 512, MIB, 0);
    r.file.write_at(0, &pattern(8192, 1), Flags::NONE).unwrap();
    read_all(&r.file, 0, 4096).0.unwrap();
    assert_eq!(
        (r.file.stats().bytes_written(), r.file.stats().bytes_read()),
        (8192, 4096)
    );
}

#[test]
fn polling_mode_completes() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512).threaded(Some(Duration::from_micros(100)), false, 1),
        TestMapConfig::new(4096, 256),
        0,
    );
    let data = pattern(65536, 5);
    assert_eq!(r.file.write_at(0, &data, Flags::POLL).unwrap(), 65536);
    let mut b = AlignedBuf::new(65536, 4096);
    assert_eq!(
        r.file
            .read_at(0, &mut b, Flags::POLL | Flags::LOCKING)
            .unwrap(),
        65536
    );
    assert_eq!(&b[..], &data[..]);
}

// ---- Bad input ----

#[test]
fn write_on_read_only_file_is_ebadf() {
    let r = rig(4096, 512, MIB, MIB);
    let ro = r.file.clone().read_only();
    let e = ro.write_at(0, &pattern(4096, 1), Flags::NONE).unwrap_err();
    assert!(matches!(e, Error::ReadOnly));
    assert_eq!(e.errno(), libc::EBADF);
}

#[test]
fn offsets_past_the_largest_file_size_are_refused() {
    let r = rig(4096, 512, MIB, MIB);
    let e = r
        .file
        .read_at(
            u64::MAX - 4095,
            &mut AlignedBuf::new(8192, 4096),
            Flags::NONE,
        )
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = r
        .file
        .write_at(i64::MAX as u64 - 4095, &pattern(8192, 1), Flags::NONE)
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

struct Liar;
impl BlockMap for Liar {
    fn block_size(&self) -> u32 {
        4096
    }
    fn map(&self, block: u64, max: u64, _c: bool) -> dio::Result<Extent> {
        Ok(Extent::mapped(block + 250, max))
    }
}

#[test]
fn block_map_pointing_past_the_device_is_an_error_and_writes_nothing() {
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(MIB, 512).fill(STALE).log(),
    ));
    let file = DirectFile::new(dev.clone(), Arc::new(Liar), Arc::new(FileState::new(MIB))).unwrap();
    let e = file
        .write_at(0, &pattern(65536, 1), Flags::NONE)
        .unwrap_err();
    assert!(matches!(e, Error::BeyondDevice { .. }), "{e}");
    assert!(dev.log().is_empty());
    assert_eq!(dev.read_raw(0, MIB as usize), vec![STALE; MIB as usize]);
}

struct Empty;
impl BlockMap for Empty {
    fn block_size(&self) -> u32 {
        4096
    }
    fn map(&self, _b: u64, _m: u64, _c: bool) -> dio::Result<Extent> {
        Ok(Extent::mapped(0, 0))
    }
}

#[test]
fn a_map_that_makes_no_progress_ends_with_an_error_not_a_spin() {
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(MIB, 512)));
    let file = DirectFile::new(dev, Arc::new(Empty), Arc::new(FileState::new(MIB))).unwrap();
    let e = read_all(&file, 0, 8192).0.unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
}

#[test]
fn short_transfer_resumes_from_an_aligned_position() {
    let r = rig(4096, 512, MIB, 0);
    r.map.map_written(0..3).unwrap();
    r.file.truncate(16384).unwrap();
    let data = pattern(16384, 6);
    let n = r.file.write_at(0, &data, Flags::SKIP_HOLES).unwrap();
    assert_eq!(n % 512, 0);
    // The caller fills the hole (here: lets the map allocate) and resumes at n.
    let m = r.file.write_at(n as u64, &data[n..], Flags::NONE).unwrap();
    assert_eq!(n + m, 16384);
    let (_, back) = read_all(&r.file, 0, 16384);
    assert_eq!(&back[..], &data[..]);
}

#[test]
fn bad_geometry_or_block_size_is_refused() {
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(MIB, 4096)));
    let e = DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(512, MIB)),
        Arc::new(FileState::new(MIB)),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert_eq!(e.errno(), libc::EINVAL);
}

/// An identity map whose lookups take a while, recording when they end.
struct SlowMap {
    inner: IdentityMap,
    entered: std::sync::mpsc::SyncSender<()>,
    done_at: Mutex<Option<std::time::Instant>>,
}

impl BlockMap for SlowMap {
    fn block_size(&self) -> u32 {
        4096
    }
    fn map(&self, b: u64, n: u64, c: bool) -> dio::Result<Extent> {
        let _ = self.entered.try_send(());
        thread::sleep(Duration::from_millis(100));
        *self.done_at.lock().unwrap() = Some(std::time::Instant::now());
        self.inner.map(b, n, c)
    }
}

#[test]
fn locking_read_holds_the_file_lock_during_lookups_and_drops_it_before_waiting() {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(MIB, 512).threaded(
        Some(Duration::from_millis(300)),
        false,
        1,
    )));
    let map = Arc::new(SlowMap {
        inner: IdentityMap::new(4096, MIB),
        entered: tx,
        done_at: Mutex::new(None),
    });
    let file = DirectFile::new(dev, map.clone(), Arc::new(FileState::new(MIB))).unwrap();
    let f2 = file.clone();
    let reader = thread::spawn(move || {
        let mut b = AlignedBuf::new(4096, 4096);
        let r = f2.read_at(0, &mut b, Flags::LOCKING);
        (r, std::time::Instant::now())
    });
    rx.recv().unwrap();
    // The lookup is running: the exclusive lock must wait for it to end...
    let got_lock = {
        let _g = file.state().lock_exclusive();
        std::time::Instant::now()
    };
    let (r, read_done) = reader.join().unwrap();
    assert_eq!(r.unwrap(), 4096);
    let lookup_done = map.done_at.lock().unwrap().unwrap();
    assert!(
        got_lock >= lookup_done,
        "the file lock was free during the lookup"
    );
    // ...but not for the I/O, which takes 300 ms after it.
    assert!(
        got_lock < read_done,
        "the file lock was held while waiting for I/O"
    );
}

#[test]
fn skip_dio_count_leaves_the_in_flight_count_alone() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512).threaded(Some(Duration::from_millis(100)), false, 1),
        TestMapConfig::new(4096, 256),
        65536,
    );
    r.map.map_written(0..16).unwrap();
    let counted = r
        .file
        .read_future(0, vec![AlignedBuf::new(4096, 4096)], Flags::NONE);
    assert_eq!(r.file.state().dio_count(), 1);
    let skipped = r.file.read_future(
        4096,
        vec![AlignedBuf::new(4096, 4096)],
        Flags::SKIP_DIO_COUNT,
    );
    assert_eq!(
        r.file.state().dio_count(),
        1,
        "the skipped call is not counted"
    );
    counted.wait().result.unwrap();
    skipped.wait().result.unwrap();
    assert_eq!(r.file.state().dio_count(), 0);
}

#[test]
fn nowait_write_answers_would_block_instead_of_waiting_for_a_shared_block() {
    let r = rig_with(
        MemDeviceConfig::new(MIB, 512).threaded(Some(Duration::from_millis(100)), false, 1),
        TestMapConfig::new(4096, 256),
        65536,
    );
    r.map.map_written(0..16).unwrap();
    let first = r.file.write_future(0, vec![pattern(4096, 1)], Flags::NONE);
    let e = r
        .file
        .write_at(1024, &pattern(512, 2), Flags::NOWAIT)
        .unwrap_err();
    assert!(matches!(e, Error::WouldBlock), "{e}");
    assert_eq!(e.errno(), libc::EAGAIN);
    // A write to another block goes ahead.
    assert_eq!(
        r.file
            .write_at(8192, &pattern(4096, 3), Flags::NOWAIT)
            .unwrap(),
        4096
    );
    first.wait().result.unwrap();
}

#[test]
fn truncate_that_fails_to_zero_the_eof_block_changes_nothing() {
    let r = rig(4096, 512, MIB, 0);
    let data = pattern(16384, 5);
    r.file.write_at(0, &data, Flags::NONE).unwrap();
    let (dev_block, _) = r.map.lookup(1).unwrap();
    r.dev
        .fail_range(dev_block * 4096..dev_block * 4096 + 4096, None);
    assert_eq!(r.file.truncate(5000).unwrap_err().errno(), libc::EIO);
    r.dev.clear_faults();
    assert_eq!(r.file.size(), 16384);
    assert!(
        r.map.lookup(3).is_some(),
        "the blocks past the new EOF are still there"
    );
    let (n, back) = read_all(&r.file, 0, 16384);
    assert_eq!(n.unwrap(), 16384);
    assert_eq!(&back[..], &data[..]);
}
