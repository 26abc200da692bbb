//! Metadata I/O: reads and writes of byte ranges of the device for superblocks,
//! descriptors, inodes, extent-tree and indirect blocks and directories, widened to
//! the device's logical block and bounced through aligned buffers. File data never
//! comes through here: it goes through the engine.
//!
//! Every range is checked against the device size first, so a hostile block number
//! becomes a "corrupt" error, never a read outside the image.
//!
//! While a batch of operations runs (`Ext::begin_batch`: `cp -r`, `rm -r`), the
//! device blocks read here are kept ([`MetaIo::cache_on`]): a batch looks the same
//! directories, inode tables and bitmaps up again and again, and without a cache
//! every lookup went back to the device (removing 10,000 names from one linear
//! directory took two minutes). Writes through here update what is kept; the
//! cache is only on where the device's logical block is no larger than an fs
//! block, so a kept block never mixes metadata with file data (which the engine
//! writes around this layer) and no write here reads around its own bytes.

use crate::error::{CorruptKind, Feature};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::journal::{Copy, Replay};
use crate::device::{self, Device};
use crate::{AlignedBuf, Error, Result};

/// The device an ext file system lives on, for metadata.
pub(crate) struct MetaIo {
    dev: Arc<dyn Device>,
    /// Blocks replayed from the journal in memory, and the fs block size they are
    /// counted in: reads see them in place of the image's blocks.
    replay: Option<(Arc<Replay>, u64)>,
    /// Blocks whose latest contents are only in the journal (committed, not yet
    /// checkpointed: see [`super::jwrite`]), and the fs block size: reads see
    /// their journal copies.
    logged: Mutex<(u64, BTreeMap<u64, Copy>)>,
    /// Blocks changed by a batch of operations not yet written (see
    /// `tx::Batch`), with the fs block size: reads see them last.
    pending: Mutex<(u64, BTreeMap<u64, Vec<u8>>)>,
    /// Counts the times pending blocks were taken (written): a read that
    /// started on the device before and patches after must start again.
    pending_gen: std::sync::atomic::AtomicU64,
    /// Device logical block (power of two).
    lb: u64,
    /// Device blocks read while a batch runs (see the module docs).
    cache: Mutex<Option<ReadCache>>,
    align: usize,
    /// Usable size in bytes (what the caller says the image holds).
    size: u64,
}

impl MetaIo {
    pub(crate) fn new(dev: Arc<dyn Device>, size: u64) -> Result<MetaIo> {
        let g = dev.geometry();
        g.validate()?;
        Ok(MetaIo {
            dev,
            replay: None,
            logged: Mutex::default(),
            pending: Mutex::default(),
            pending_gen: Default::default(),
            lb: u64::from(g.logical_block),
            cache: Mutex::default(),
            align: g.mem_align.max(1) as usize,
            size: size.min(g.size),
        })
    }

    /// The same device, with `replay`'s blocks (of `block_size` bytes) patched
    /// into every read.
    pub(crate) fn with_replay(&self, replay: Arc<Replay>, block_size: u32) -> MetaIo {
        MetaIo {
            dev: Arc::clone(&self.dev),
            replay: Some((replay, u64::from(block_size))),
            logged: Mutex::default(),
            pending: Mutex::default(),
            pending_gen: Default::default(),
            lb: self.lb,
            cache: Mutex::default(),
            align: self.align,
            size: self.size,
        }
    }

    pub(crate) fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The aligned range covering `[offset, offset + len)`, checked against the size.
    fn widen(&self, offset: u64, len: usize, what: &str) -> Result<(u64, usize)> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::corrupt(
                    CorruptKind::OutOfImage,
                    format!(
                    "{what} at byte {offset} (+{len}) lies past the end of the image ({} bytes)",
                    self.size
                ),
                )
            })?;
        let a0 = offset & !(self.lb - 1);
        let a1 = end.div_ceil(self.lb) * self.lb;
        // The device size is a multiple of its logical block in practice; a final
        // partial block of a regular file image reads back short-free through the
        // device's own zero-fill.
        Ok((a0, (a1 - a0) as usize))
    }

    fn read_aligned(&self, a0: u64, alen: usize) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::new(alen, self.align);
        let gen = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.as_ref() {
                Some(c) if c.fill(self.lb, a0, &mut buf) => return Ok(buf),
                Some(c) => Some(c.gen),
                None => None,
            }
        };
        device::read_device(&*self.dev, a0, &mut buf).map_err(|e| Error::Io {
            offset: a0,
            source: std::sync::Arc::new(e),
        })?;
        if let Some(gen) = gen {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Kept only if no write here came between (it may have changed
            // these blocks after the device read them).
            if let Some(c) = cache.as_mut().filter(|c| c.gen == gen) {
                c.keep(self.lb, a0, &buf);
            }
        }
        Ok(buf)
    }

    /// Keep the device blocks read from now on, until [`MetaIo::cache_off`]
    /// (a batch of `block_size`-byte fs blocks starts). Not where a device block
    /// is larger than an fs block (see the module docs).
    pub(crate) fn cache_on(&self, block_size: u32) {
        if self.lb > u64::from(block_size) || self.replay.is_some() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.is_none() {
            *cache = Some(ReadCache::default());
        }
    }

    /// Drop what was kept and keep nothing more (the batch ended).
    pub(crate) fn cache_off(&self) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The device blocks of `[a0, a0 + data.len())` now hold `data` (`ok`), or
    /// are unknown after a failed write: kept copies follow.
    fn wrote(&self, a0: u64, data: &[u8], ok: bool) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_mut() {
            c.wrote(self.lb, a0, data, ok);
        }
    }

    /// Read `len` bytes at device byte `offset`; `what` names the structure for
    /// errors.
    pub(crate) fn read(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        use std::sync::atomic::Ordering;
        if let Some(out) = self.read_pending(offset, len) {
            return Ok(out);
        }
        let gen = self.pending_gen.load(Ordering::Acquire);
        let mut out = self.read_plain(offset, len, what)?;
        if let Some((replay, bs)) = &self.replay {
            self.patch(&replay.blocks, *bs, offset, &mut out)?;
        }
        let logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if !logged.1.is_empty() {
            self.patch(&logged.1, logged.0, offset, &mut out)?;
        }
        drop(logged);
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if self.pending_gen.load(Ordering::Acquire) != gen {
            // A batch was written (and its blocks dropped from memory) while
            // this read was on the device: read again.
            drop(pending);
            return self.read(offset, len, what);
        }
        if !pending.1.is_empty() && !out.is_empty() {
            let bs = pending.0;
            let end = offset + out.len() as u64;
            for (&block, data) in pending.1.range(offset / bs..=(end - 1) / bs) {
                let b0 = block * bs;
                let (s, e) = (offset.max(b0), end.min(b0 + bs));
                out[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&data[(s - b0) as usize..(e - b0) as usize]);
            }
        }
        Ok(out)
    }

    /// `[offset, offset + len)` when it lies inside one pending block (no
    /// device read: the pending copy is the newest).
    fn read_pending(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.1.is_empty() || len == 0 {
            return None;
        }
        let bs = p.0;
        let block = offset / bs;
        if (offset + len as u64 - 1) / bs != block {
            return None;
        }
        let d = p.1.get(&block)?;
        let at = (offset - block * bs) as usize;
        Some(d[at..at + len].to_vec())
    }

    /// The pending (batched, unwritten) copy of fs block `block`.
    pub(crate) fn pending_get(&self, block: u64) -> Option<Vec<u8>> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.1.get(&block).cloned()
    }

    /// Set the pending copy of fs block `block` (of `bs` bytes).
    pub(crate) fn pending_put(&self, bs: u32, block: u64, data: Vec<u8>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.0 = u64::from(bs);
        p.1.insert(block, data);
    }

    /// How many blocks are pending.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .len()
    }

    /// A copy of every pending block.
    pub(crate) fn pending_clone(&self) -> BTreeMap<u64, Vec<u8>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Take every pending block (they are written, or dropped after a failure).
    pub(crate) fn pending_take(&self) -> BTreeMap<u64, Vec<u8>> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.pending_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        std::mem::take(&mut p.1)
    }

    /// Replace the bytes of `out` (read at `offset`) that fall in `blocks` (of
    /// `bs` bytes) with their journal copies.
    fn patch(
        &self,
        blocks: &BTreeMap<u64, Copy>,
        bs: u64,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let end = offset + out.len() as u64;
        let (first, last) = (offset / bs, (end - 1) / bs);
        for (&block, copy) in blocks.range(first..=last) {
            let mut data = self.read_plain(copy.at * bs, bs as usize, "journal block")?;
            if copy.escaped {
                Replay::unescape(&mut data);
            }
            // The overlap of [offset, end) and this block.
            let b0 = block * bs;
            let s = offset.max(b0);
            let e = end.min(b0 + bs);
            out[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - b0) as usize..(e - b0) as usize]);
        }
        Ok(())
    }

    /// Set the blocks whose latest contents are only in the journal.
    pub(crate) fn set_logged(&self, block_size: u32, blocks: &BTreeMap<u64, Copy>) {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        *logged = (u64::from(block_size), blocks.clone());
    }

    /// Read from the image itself, without the journal's blocks.
    pub(crate) fn read_plain(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let (a0, alen) = self.widen(offset, len, what)?;
        let buf = self.read_aligned(a0, alen)?;
        let skip = (offset - a0) as usize;
        Ok(buf[skip..skip + len].to_vec())
    }

    /// The alignment device writes need (offset, length and memory).
    pub(crate) fn align(&self) -> usize {
        self.align
    }

    /// Write `buf` at device byte `offset` as it is: `offset` and the length
    /// must be multiples of [`MetaIo::align`] and `buf` allocated with it (file
    /// data gathered by `Ext::put_files`, no copy and no read first).
    pub(crate) fn write_aligned(
        &self,
        offset: u64,
        buf: &mut AlignedBuf,
        what: &str,
    ) -> Result<()> {
        if self.replay.is_some()
            || offset % self.align as u64 != 0
            || buf.len() % self.align != 0
            || offset + buf.len() as u64 > self.size
        {
            return self.write(offset, &buf[..], what);
        }
        let r = device::write_device(&*self.dev, offset, buf, false);
        self.wrote(offset, buf, r.is_ok());
        r.map_err(|e| Error::Io {
            offset,
            source: std::sync::Arc::new(e),
        })
    }

    /// Write `data` at device byte `offset`, reading and patching partial logical
    /// blocks first.
    pub(crate) fn write(&self, offset: u64, data: &[u8], what: &str) -> Result<()> {
        if self.replay.is_some() {
            // Never reached: images whose journal needs recovery open read-only.
            return Err(Error::incompatible(
                Feature::JournalRecovery,
                format!(
                "{what}: the journal was replayed in memory only; writing needs it replayed on disk"
            ),
            ));
        }
        let (a0, alen) = self.widen(offset, data.len(), what)?;
        let skip = (offset - a0) as usize;
        let mut buf = if skip == 0 && alen == data.len() {
            AlignedBuf::new(alen, self.align)
        } else {
            self.read_aligned(a0, alen)?
        };
        buf[skip..skip + data.len()].copy_from_slice(data);
        let r = device::write_device(&*self.dev, a0, &mut buf, false);
        self.wrote(a0, &buf, r.is_ok());
        r.map_err(|e| Error::Io {
            offset: a0,
            source: std::sync::Arc::new(e),
        })
    }
}

/// Device blocks kept while a batch runs: device byte offset -> contents.
#[derive(Default)]
struct ReadCache {
    blocks: std::collections::HashMap<u64, Box<[u8]>>,
    /// Counts the writes: a device read that a write overtook is not kept.
    gen: u64,
}

impl ReadCache {
    /// At most this many bytes are kept; past it, everything is dropped.
    const MAX_BYTES: u64 = 64 << 20;

    /// Fill `buf` (device bytes from `a0`) from kept blocks, if all are kept.
    fn fill(&self, lb: u64, a0: u64, buf: &mut [u8]) -> bool {
        let lbs = lb as usize;
        let kept: Option<Vec<&[u8]>> = (0..buf.len() / lbs)
            .map(|i| self.blocks.get(&(a0 + (i * lbs) as u64)).map(|b| &b[..]))
            .collect();
        let Some(kept) = kept else {
            return false;
        };
        for (chunk, b) in buf.chunks_mut(lbs).zip(kept) {
            chunk.copy_from_slice(b);
        }
        true
    }

    /// Keep the blocks of `buf`, read from device byte `a0`.
    fn keep(&mut self, lb: u64, a0: u64, buf: &[u8]) {
        if (self.blocks.len() as u64 + buf.len() as u64 / lb) * lb > Self::MAX_BYTES {
            self.blocks.clear();
        }
        for (i, chunk) in buf.chunks(lb as usize).enumerate() {
            self.blocks
                .insert(a0 + i as u64 * lb, chunk.to_vec().into_boxed_slice());
        }
    }

    /// A write of `data` at `a0`: kept blocks it covers take its bytes (or are
    /// dropped when it failed); blocks not kept stay so (file data is not
    /// kept).
    fn wrote(&mut self, lb: u64, a0: u64, data: &[u8], ok: bool) {
        self.gen += 1;
        for (i, chunk) in data.chunks(lb as usize).enumerate() {
            let at = a0 + i as u64 * lb;
            if !ok {
                self.blocks.remove(&at);
            } else if let Some(b) = self.blocks.get_mut(&at) {
                if chunk.len() == b.len() {
                    b.copy_from_slice(chunk);
                } else {
                    self.blocks.remove(&at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MetaIo;
    use crate::device::Device;
    use crate::{MemDevice, MemDeviceConfig};
    use std::sync::Arc;

    fn io(lb: u32) -> (Arc<MemDevice>, MetaIo) {
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, lb)));
        let io = MetaIo::new(Arc::clone(&dev) as Arc<dyn Device>, 1 << 20).unwrap();
        (dev, io)
    }

    /// Requests the device saw (reads and writes).
    fn reads(dev: &MemDevice) -> u64 {
        dev.stats().requests
    }

    /// While on, a block read once is served from memory; a write through this
    /// layer is seen by the next read; a write that fails drops the kept copy;
    /// off, every read goes to the device again.
    #[test]
    fn kept_blocks_follow_the_writes_made_here() {
        let (dev, io) = io(512);
        dev.write_raw(4096, &[7u8; 1024]);
        io.cache_on(1024);
        assert_eq!(io.read(4096, 1024, "t").unwrap(), vec![7u8; 1024]);
        let n = reads(&dev);
        assert_eq!(io.read(4096 + 100, 200, "t").unwrap(), vec![7u8; 200]);
        assert_eq!(reads(&dev), n, "a kept block was read again");
        io.write(4096 + 512, &[9u8; 512], "t").unwrap();
        let n = reads(&dev);
        let got = io.read(4096, 1024, "t").unwrap();
        assert_eq!(&got[..512], &[7u8; 512][..]);
        assert_eq!(&got[512..], &[9u8; 512][..]);
        assert_eq!(reads(&dev), n, "a written block was read again");
        // A write here of blocks never read keeps nothing (file data).
        io.write(8192, &[1u8; 1024], "t").unwrap();
        let n = reads(&dev);
        let _ = io.read(8192, 1024, "t").unwrap();
        assert!(reads(&dev) > n);
        io.cache_off();
        let n = reads(&dev);
        let _ = io.read(4096, 1024, "t").unwrap();
        assert!(reads(&dev) > n, "off, yet served from memory");
    }

    /// A device block larger than an fs block could hold file data next to
    /// metadata: nothing is kept then.
    #[test]
    fn nothing_is_kept_where_a_device_block_spans_fs_blocks() {
        let (dev, io) = io(4096);
        io.cache_on(1024);
        let _ = io.read(4096, 1024, "t").unwrap();
        let n = reads(&dev);
        let _ = io.read(4096, 1024, "t").unwrap();
        assert!(reads(&dev) > n);
    }
}
