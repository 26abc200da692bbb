//! A custom block map: a tiny record store, read and written through the engine.
//!
//! The format: a device holds fixed-size 4 KiB records. Record slots are handed
//! out on demand from a free list, and an index (here in memory) maps a record
//! number to its slot. That index *is* a block map: file block N of the "record
//! file" is record N, and `map` returns where its slot lives, allocating one on a
//! write. The engine then does the rest: merging neighbouring records that sit in
//! neighbouring slots into one device request, zeroing a new slot's unwritten part,
//! reading never-written records as zeros.
//!
//! Run: `cargo run --example custom_map`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dio::{
    AlignedBuf, BlockMap, DirectFile, Extent, FileState, Flags, MemDevice, MemDeviceConfig, Result,
};

const RECORD: u32 = 4096;

/// The index: record number -> slot on the device.
struct RecordIndex {
    slots: Mutex<(BTreeMap<u64, u64>, u64)>,
    capacity: u64,
}

impl BlockMap for RecordIndex {
    fn block_size(&self) -> u32 {
        RECORD
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        let mut guard = self.slots.lock().unwrap();
        let (index, next_free) = &mut *guard;
        if let Some(&slot) = index.get(&block) {
            // As many following records as sit in following slots.
            let mut len = 1;
            while len < max_blocks && index.get(&(block + len)) == Some(&(slot + len)) {
                len += 1;
            }
            return Ok(Extent::mapped(slot, len));
        }
        if !create {
            return Ok(Extent::hole(1));
        }
        if *next_free >= self.capacity {
            return Err(dio::Error::Invalid("record store is full".into()));
        }
        let slot = *next_free;
        *next_free += 1;
        index.insert(block, slot);
        // A fresh slot: the engine zeroes whatever the write does not cover.
        Ok(Extent::mapped(slot, 1).new_blocks(true))
    }
}

fn main() -> Result<()> {
    let capacity = 256;
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(capacity * u64::from(RECORD), 512).log(),
    ));
    let index = Arc::new(RecordIndex {
        slots: Mutex::new((BTreeMap::new(), 0)),
        capacity,
    });
    let file = DirectFile::new(dev.clone(), index.clone(), Arc::new(FileState::new(0)))?;
    let align = file.geometry().buffer_align();

    // Write records 10, 11 and 12 in one call: three slots allocated, adjacent.
    let mut recs = AlignedBuf::new(3 * RECORD as usize, align);
    for (i, chunk) in recs.chunks_mut(RECORD as usize).enumerate() {
        chunk.fill(b'a' + i as u8);
    }
    file.write_at(10 * u64::from(RECORD), &recs, Flags::NONE)?;
    // Then record 3 alone, 512 bytes of it (sub-block: the rest of its slot is zeroed).
    file.write_at(
        3 * u64::from(RECORD),
        &AlignedBuf::from_slice(&[b'z'; 512], align),
        Flags::NONE,
    )?;

    // Read records 0..13 back in one call: holes read as zeros, and records 10..13
    // come from one device request because their slots are contiguous.
    dev.reset_stats();
    let mut all = AlignedBuf::new(13 * RECORD as usize, align);
    let n = file.read_at(0, &mut all, Flags::NONE)?;
    println!("read {n} bytes of {} records", n / RECORD as usize);
    for r in [0usize, 3, 10, 11, 12] {
        let rec = &all[r * RECORD as usize..(r + 1) * RECORD as usize];
        println!(
            "record {r:2}: first byte {:?}, last byte {:?}",
            rec[0] as char,
            rec[RECORD as usize - 1] as char
        );
    }
    println!(
        "device requests for the read: {:?}",
        dev.log()
            .iter()
            .map(|l| (l.offset, l.len))
            .collect::<Vec<_>>()
    );
    assert_eq!(&all[10 * RECORD as usize..], &recs[..]);
    assert_eq!(
        all[3 * RECORD as usize + 600],
        0,
        "the unwritten part of a new slot reads as zeros"
    );
    Ok(())
}
