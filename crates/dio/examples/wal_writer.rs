//! A write-ahead log through the engine, with durable (dsync) appends.
//!
//! Each append writes one or more 4 KiB log pages with [`Flags::DSYNC`]. What that
//! buys: when `write_at` returns (or an async write completes), the page is on stable
//! storage. dio sends the pages of an overwrite with FUA, so no cache flush is needed;
//! when the write allocates blocks or grows the file (metadata changes), it also
//! flushes the device before completing. A page written without DSYNC may be lost in
//! a power cut even after the call returned.
//!
//! This example shows it on the RAM device's crash mode, which keeps only what was
//! flushed or written with FUA when `crash()` simulates the power cut: the dsync
//! appends survive, the last plain append does not.
//!
//! Run: `cargo run --example wal_writer`

use std::sync::Arc;

use dio::{
    AlignedBuf, DirectFile, FileState, Flags, MemDevice, MemDeviceConfig, Result, TestMap,
    TestMapConfig,
};

const PAGE: usize = 4096;

struct Wal {
    file: DirectFile,
    next: u64,
}

impl Wal {
    /// Append one record in its own page; durable when `durable` is set.
    fn append(&mut self, record: &[u8], durable: bool) -> Result<u64> {
        let mut page = AlignedBuf::new(PAGE, self.file.geometry().buffer_align());
        let len = record.len().min(PAGE - 4);
        page[..4].copy_from_slice(&(len as u32).to_le_bytes());
        page[4..4 + len].copy_from_slice(&record[..len]);
        let flags = if durable { Flags::DSYNC } else { Flags::NONE };
        let at = self.next;
        self.file.write_at(at, &page, flags)?;
        self.next += PAGE as u64;
        Ok(at)
    }

    /// Read the records back until the first empty page.
    fn replay(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut page = AlignedBuf::new(PAGE, self.file.geometry().buffer_align());
        let mut at = 0;
        while self.file.read_at(at, &mut page, Flags::NONE)? == PAGE {
            let len = u32::from_le_bytes(page[..4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            out.push(String::from_utf8_lossy(&page[4..4 + len]).into_owned());
            at += PAGE as u64;
        }
        Ok(out)
    }
}

fn main() -> Result<()> {
    let size = 1 << 20;
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512).crash_mode()));
    let map = Arc::new(TestMap::new(TestMapConfig::new(4096, size / 4096)));
    // The log file: preallocated (like fallocate) so appends are overwrites.
    map.preallocate(0..64)?;
    let file = DirectFile::new(dev.clone(), map, Arc::new(FileState::new(64 * PAGE as u64)))?;
    dio::Device::flush(&*dev).map_err(|e| dio::Error::os("flush", e))?;
    let mut wal = Wal { file, next: 0 };

    for i in 0..3 {
        wal.append(format!("commit {i}").as_bytes(), true)?;
    }
    wal.append(b"commit 3 (not durable)", false)?;
    println!("before the crash: {:?}", wal.replay()?);
    dev.crash();
    let after = wal.replay()?;
    println!("after the crash:  {after:?}");
    assert_eq!(after, ["commit 0", "commit 1", "commit 2"]);
    Ok(())
}
