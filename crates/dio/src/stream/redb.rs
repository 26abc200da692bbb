//! redb on direct I/O (feature `redb`): [`RedbBackend`], with a block cache that
//! reads ahead and a write-back buffer ([`RedbOptions`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::{Mutex, MutexGuard};

use crate::{AlignedBuf, DioFuture, DirectFile, Flags, RawFile};

/// Most bytes in one device request the backend makes.
const MAX_IO: usize = 1 << 20;
/// Write-back requests in flight at once, and their most bytes.
const MAX_FLIGHT: usize = 32;
const MAX_FLIGHT_BYTES: usize = 4 << 20;
/// Readahead outcomes (blocks read ahead and then asked for, or evicted unasked)
/// between two window adjustments.
const ADAPT_EVERY: u32 = 32;

/// Memory a [`RedbBackend`] may use for its own blocks, besides redb's cache
/// (`redb::Builder::set_cache_size`).
///
/// Clean and dirty blocks share `cache`, as clean and dirty pages share the page
/// cache: dirty blocks evict clean ones, and are written back when they exceed
/// `write_back`. The backend holds at most `max(cache, write_back)` bytes of
/// blocks, plus, while it writes back, up to 4 MiB of requests in flight, and a
/// staging and a readahead buffer of at most 1 MiB each. Where redb on its file
/// backend would use the page cache, give the backend that memory as `cache`:
/// redb's cache plus it is then the same budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedbOptions {
    /// Bytes of blocks kept, clean (read ahead, read, or written and synced) and
    /// dirty together. 0 keeps no clean block and reads nothing ahead.
    pub cache: usize,
    /// Bytes of dirty blocks held before they are all written out (the
    /// write-back buffer, within `cache` unless larger). 0 writes every call
    /// through (still aligned, with one read-modify-write per partial block).
    pub write_back: usize,
    /// Largest readahead window, in bytes (rounded down to blocks; at most a
    /// quarter of `cache`).
    pub readahead: usize,
}

impl Default for RedbOptions {
    /// 32 MiB of cache, of which up to 16 MiB dirty, readahead up to 128 KiB
    /// (the kernel's default window).
    fn default() -> RedbOptions {
        RedbOptions {
            cache: 32 << 20,
            write_back: 16 << 20,
            readahead: 128 << 10,
        }
    }
}

impl RedbOptions {
    /// These options with `cache` bytes of clean blocks.
    pub fn cache(mut self, cache: usize) -> RedbOptions {
        self.cache = cache;
        self
    }

    /// These options with up to `write_back` bytes dirty.
    pub fn write_back(mut self, write_back: usize) -> RedbOptions {
        self.write_back = write_back;
        self
    }

    /// These options with a readahead window of at most `readahead` bytes.
    pub fn readahead(mut self, readahead: usize) -> RedbOptions {
        self.readahead = readahead;
        self
    }
}

enum Target {
    Direct(DirectFile),
    Raw(RawFile),
}

/// A `redb::StorageBackend` over a dio file: a [`RawFile`] (a host file or block
/// device, via [`RedbBackend::raw`]) or any [`DirectFile`] (RAM, NBD, an ext
/// overwriter, via [`RedbBackend::new`]).
///
/// redb keeps its own page cache, so the kernel's would be a second copy of
/// every page; over dio the database's I/O goes straight to the device, through
/// a block cache with adaptive readahead and a write-back buffer that turns
/// redb's many small writes into few large aligned ones at each `sync_data`
/// ([`RedbOptions`] sets the memory it takes).
///
/// redb calls its backend with byte ranges that are not aligned for direct I/O
/// (page-aligned offsets in unaligned heap buffers, 320-byte header updates) and
/// many small writes between two `sync_data` calls. The backend keeps its own
/// aligned blocks of `B` bytes (4 KiB, or the device's block if larger):
///
/// - **Reads** are served from written-but-unsynced blocks, then from the block
///   cache, and the rest from the device in one aligned request per call, widened
///   to an aligned readahead window. The window adapts as the kernel's does: it
///   doubles while most blocks read ahead are then asked for, and halves while most
///   are evicted unasked, down to no readahead for truly random access over more
///   data than the cache holds. Blocks handed to redb are evicted before blocks
///   read ahead (redb keeps its own copy of what it read), though blocks read
///   ahead hold at most half the cache and age out unasked.
/// - **Writes** go to dirty blocks in memory: a block only partly written is read
///   once (from the cache if there), and later writes to it merge in memory. Dirty
///   blocks go to the device in block order, as few requests of up to 1 MiB as
///   their runs allow (several in flight), when they exceed
///   [`RedbOptions::write_back`] and at every `sync_data`, which then flushes the
///   device. A read sees every write before it.
/// - **Growth** of a [`RedbBackend::new`] file writes no zeros at `set_len`: the
///   new bytes read as zeros and are written, with the dirty blocks among them, at
///   the next write-back. A [`RedbBackend::raw`] host file grows by `ftruncate`.
///
/// Durability is redb's contract: everything written before `sync_data` is on the
/// device and flushed when it returns; writes between two syncs may reach the
/// device in any order (as through the page cache). Dropping the backend (or
/// redb's `close`) writes what is dirty.
///
/// Over a host file: `RedbBackend::raw(RawFile::open(path, &RawOptions { write: true,
/// create: true, ..RawOptions::default() })?)`. Here over the RAM device:
///
/// ```
/// use std::sync::Arc;
/// use dio::{DirectFile, FileState, IdentityMap, MemDevice, MemDeviceConfig, RedbBackend, RedbOptions};
/// use redb::{Database, ReadableDatabase, TableDefinition};
///
/// const TABLE: TableDefinition<u64, &str> = TableDefinition::new("t");
/// let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(64 << 20, 512)));
/// let map = Arc::new(IdentityMap::new(4096, 64 << 20));
/// let file = DirectFile::new(dev, map, Arc::new(FileState::new(0))).unwrap();
/// // 4 MiB of blocks (up to 2 MiB dirty) beside redb's 8 MiB cache.
/// let backend = RedbBackend::new(file)
///     .with_options(RedbOptions::default().cache(4 << 20).write_back(2 << 20));
/// let db = Database::builder().set_cache_size(8 << 20).create_with_backend(backend).unwrap();
/// let tx = db.begin_write().unwrap();
/// tx.open_table(TABLE).unwrap().insert(1, "one").unwrap();
/// tx.commit().unwrap();
/// let rx = db.begin_read().unwrap();
/// assert_eq!(rx.open_table(TABLE).unwrap().get(1).unwrap().unwrap().value(), "one");
/// ```
///
/// The file seen through [`RedbBackend::file`] lags the backend by what is
/// still in the write-back buffer until the next `sync_data` (or drop).
///
/// Locking: the backend implements none of redb's range locks, so redb runs in its
/// default `ExclusiveWriter` concurrency mode and does not itself stop a second
/// process from opening the same storage; open each database from one process.
pub struct RedbBackend {
    target: Target,
    /// Block size: a power of two, a multiple of the device's logical block.
    block: u64,
    /// Memory alignment of device buffers.
    align: usize,
    /// Largest readahead window, in blocks.
    max_window: u64,
    /// Dirty blocks held before a write-back.
    write_back_blocks: usize,
    inner: Mutex<Inner>,
}

/// The backend's state, under its lock.
struct Inner {
    /// The storage's length as redb sees it.
    len: u64,
    /// [`RedbBackend::new`] files: blocks from this index on that are not dirty
    /// read as zeros (growth not yet written); the device file holds every block
    /// below it. [`RedbBackend::raw`] files: the end of the storage's blocks.
    zero_from: u64,
    /// Written blocks not yet on the device, by block index.
    dirty: BTreeMap<u64, Box<[u8]>>,
    cache: Cache,
    /// Readahead window, in blocks (1: none).
    window: u64,
    /// Bumped whenever the device's bytes change under the lock (write-back,
    /// shrink): a read that fetched with the lock released retries if it moved.
    epoch: u64,
    /// Nothing written or resized since the last device flush.
    synced: bool,
    /// Reusable aligned buffers: write-back staging and fetches.
    stage: Option<AlignedBuf>,
    fetch: Option<AlignedBuf>,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file();
        let g = self.lock();
        f.debug_struct("RedbBackend")
            .field("device", &file.device().name())
            .field("len", &g.len)
            .field("block", &self.block)
            .field("dirty_blocks", &g.dirty.len())
            .field("cached_blocks", &g.cache.map.len())
            .field("window", &g.window)
            .finish()
    }
}

/// A short transfer as an error naming where.
fn short(what: &str, offset: u64, want: usize, got: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{what} at {offset}: {got} of {want} bytes"),
    )
}

impl RedbBackend {
    /// A backend over `file` with [`RedbOptions::default`]. Growing the storage
    /// makes the new bytes read as zeros, written (with redb's data among them)
    /// at the next write-back, as the device may hold anything there (so growth
    /// the file cannot hold fails there, at `sync_data`, not at `set_len`);
    /// shrinking truncates the file.
    pub fn new(file: DirectFile) -> RedbBackend {
        RedbBackend::build(Target::Direct(file))
    }

    /// A backend over a host file or block device with [`RedbOptions::default`]:
    /// growing and shrinking a file go through `ftruncate` (new bytes are zeros
    /// without being written).
    pub fn raw(file: RawFile) -> RedbBackend {
        RedbBackend::build(Target::Raw(file))
    }

    fn build(target: Target) -> RedbBackend {
        let (align, block, len) = {
            let file = match &target {
                Target::Direct(f) => f,
                Target::Raw(r) => r.direct(),
            };
            let geo = file.geometry();
            let block = u64::from(geo.logical_block)
                .max(u64::from(file.block_size()))
                .max(4096)
                .next_power_of_two();
            (geo.buffer_align(), block, file.size())
        };
        let mut b = RedbBackend {
            target,
            block,
            align,
            max_window: 1,
            write_back_blocks: 0,
            inner: Mutex::new(Inner {
                len,
                zero_from: len.div_ceil(block),
                dirty: BTreeMap::new(),
                cache: Cache::new(0),
                window: 1,
                epoch: 0,
                // Another backend may have written without a flush.
                synced: false,
                stage: None,
                fetch: None,
            }),
        };
        b.set_options(RedbOptions::default());
        b
    }

    /// This backend with `options` (before redb uses it).
    pub fn with_options(mut self, options: RedbOptions) -> RedbBackend {
        self.set_options(options);
        self
    }

    fn set_options(&mut self, o: RedbOptions) {
        let b = self.block as usize;
        let cap = o.cache / b;
        self.max_window = ((o.readahead / b).min(cap / 4).min(MAX_IO / b) as u64).max(1);
        self.write_back_blocks = o.write_back / b;
        let g = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        g.cache = Cache::new(cap);
        g.window = (self.max_window / 4).max(1);
    }

    /// The file.
    pub fn file(&self) -> &DirectFile {
        match &self.target {
            Target::Direct(f) => f,
            Target::Raw(r) => r.direct(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether growth is deferred (zeros not yet written) rather than `ftruncate`.
    fn deferred_growth(&self) -> bool {
        matches!(self.target, Target::Direct(_))
    }

    /// An aligned buffer of at least `len` bytes, reused from `slot`.
    fn buffer(&self, slot: &mut Option<AlignedBuf>, len: usize) -> AlignedBuf {
        match slot.take() {
            Some(b) if b.len() >= len => b,
            _ => AlignedBuf::new(len.max(self.block as usize), self.align),
        }
    }

    /// Put `buf` back in `slot` for the next call, unless it is larger than one
    /// request (a rare large read) and would hold memory for nothing.
    fn keep(slot: &mut Option<AlignedBuf>, buf: AlignedBuf) {
        if buf.len() <= MAX_IO {
            *slot = Some(buf);
        }
    }

    /// Read blocks `[first, first + n)` from the device into `buf` (aligned, one
    /// request), zeros past the device file's end.
    fn fetch(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = first * self.block;
        let got = self.file().read_at(off, buf, Flags::NONE)?;
        buf[got..].fill(0);
        Ok(())
    }

    /// The current bytes of block `blk`, for a partial write: from the cache,
    /// zeros, or the device.
    fn load_block(&self, g: &mut Inner, blk: u64) -> io::Result<Box<[u8]>> {
        if let Some(d) = g.cache.take(blk) {
            return Ok(d);
        }
        let b = self.block as usize;
        let mut d = vec![0u8; b].into_boxed_slice();
        if self.deferred_growth() && blk >= g.zero_from {
            return Ok(d);
        }
        let mut buf = self.buffer(&mut g.fetch, b);
        let r = self.fetch(blk, &mut buf[..b]);
        if r.is_ok() {
            d.copy_from_slice(&buf[..b]);
        }
        Self::keep(&mut g.fetch, buf);
        r.map(|()| d)
    }

    /// Zero the bytes of `d` (block `blk`) at or past `len`.
    fn clip(&self, d: &mut [u8], blk: u64, len: u64) {
        let start = blk * self.block;
        if start + self.block > len {
            d[len.saturating_sub(start) as usize..].fill(0);
        }
    }

    /// Grow the storage to `len`.
    fn grow(&self, g: &mut Inner, len: u64) -> io::Result<()> {
        match &self.target {
            Target::Raw(r) => r.set_len(len)?,
            Target::Direct(_) => {
                // The old last block, if partial, becomes dirty with its tail zeroed,
                // so every block from `zero_from` on is either dirty or all zeros.
                let old = g.len;
                let blk = old / self.block;
                if old % self.block != 0 && blk < g.zero_from && !g.dirty.contains_key(&blk) {
                    let mut d = self.load_block(g, blk)?;
                    self.clip(&mut d, blk, old);
                    g.dirty.insert(blk, d);
                }
                g.zero_from = g.zero_from.min(old.div_ceil(self.block));
            }
        }
        g.len = len;
        g.synced = false;
        Ok(())
    }

    /// Shrink the storage to `len`.
    fn shrink(&self, g: &mut Inner, len: u64) -> io::Result<()> {
        match &self.target {
            Target::Raw(r) => r.set_len(len)?,
            Target::Direct(f) => {
                if len < f.size() {
                    f.truncate(len)?;
                }
            }
        }
        let keep = len.div_ceil(self.block);
        drop(g.dirty.split_off(&keep));
        if let Some(d) = g.dirty.get_mut(&(len / self.block)) {
            d[(len % self.block) as usize..].fill(0);
        }
        g.cache.remove_from(len / self.block);
        g.zero_from = g.zero_from.min(keep);
        g.len = len;
        g.epoch += 1;
        g.synced = false;
        Ok(())
    }

    /// Write every dirty block (and, for deferred growth, the zeros up to the
    /// end) to the device in block order, in requests of up to 1 MiB. Blocks
    /// written move to the cache; on an error the blocks not yet written stay
    /// dirty.
    fn write_out(&self, g: &mut Inner) -> io::Result<()> {
        let end = g.len.div_ceil(self.block);
        let zeros_from = if self.deferred_growth() {
            g.zero_from.min(end)
        } else {
            end
        };
        if g.dirty.is_empty() && zeros_from >= end {
            return Ok(());
        }
        g.epoch += 1;
        g.synced = false;
        let per_io = (MAX_IO as u64 / self.block).max(1);
        // Runs of consecutive blocks: the dirty ones below the zero region, then
        // the whole zero region.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let push = |blk: u64, runs: &mut Vec<(u64, u64)>| match runs.last_mut() {
            Some((s, n)) if *s + *n == blk && *n < per_io => *n += 1,
            _ => runs.push((blk, 1)),
        };
        for &blk in g.dirty.range(..zeros_from).map(|(b, _)| b) {
            push(blk, &mut runs);
        }
        for blk in zeros_from..end {
            push(blk, &mut runs);
        }
        let b = self.block as usize;
        let size = self.file().size();
        let mut flight: VecDeque<((u64, u64), DioFuture<AlignedBuf>)> = VecDeque::new();
        let mut flight_bytes = 0;
        let mut result = Ok(());
        // A finished run: its blocks move to the cache, or the error is kept (the
        // first one) and its blocks stay dirty.
        let finish = |g: &mut Inner,
                      (start, n): (u64, u64),
                      r: io::Result<()>,
                      result: &mut io::Result<()>| {
            if let Err(e) = r {
                if result.is_ok() {
                    *result = Err(e);
                }
                return;
            }
            for blk in start..start + n {
                if let Some(d) = g.dirty.remove(&blk) {
                    let dirty = g.dirty.len();
                    g.cache.insert(blk, d, true, dirty);
                }
            }
            if start + n > zeros_from {
                g.zero_from = start + n;
            }
        };
        let done = |c: crate::Completed<AlignedBuf>, off: u64, want: usize| match c.result {
            Ok(n) if n == want => Ok(()),
            Ok(n) => Err(short("write", off, want, n)),
            Err(e) => Err(io::Error::from(e)),
        };
        for (start, n) in runs {
            let off = start * self.block;
            let want = (n * self.block).min(g.len - off) as usize;
            // Runs inside the file go in parallel, several requests in flight;
            // those that extend it (deferred growth) or end unaligned, in order.
            let parallel =
                start + n <= zeros_from && want == n as usize * b && off + want as u64 <= size;
            while let Some((run, fut)) = flight.pop_front() {
                if parallel
                    && flight.len() + 1 < MAX_FLIGHT
                    && flight_bytes + want <= MAX_FLIGHT_BYTES
                {
                    flight.push_front((run, fut));
                    break;
                }
                let r = done(fut.wait(), run.0 * self.block, run.1 as usize * b);
                flight_bytes -= run.1 as usize * b;
                finish(g, run, r, &mut result);
            }
            if result.is_err() {
                break;
            }
            let mut buf = if parallel {
                AlignedBuf::new(want, self.align)
            } else {
                self.buffer(&mut g.stage, want)
            };
            for i in 0..n as usize {
                let dst = &mut buf[i * b..((i + 1) * b).min(want)];
                match g.dirty.get(&(start + i as u64)) {
                    Some(d) => dst.copy_from_slice(&d[..dst.len()]),
                    None => dst.fill(0),
                }
            }
            if parallel {
                flight.push_back((
                    (start, n),
                    self.file().write_future(off, vec![buf], Flags::NONE),
                ));
                flight_bytes += want;
                continue;
            }
            // A run ending at an unaligned length: the engine pads its last block.
            let mut r = match self.file().write_at(off, &buf[..want], Flags::UNALIGNED) {
                Ok(done) if done == want => Ok(()),
                Ok(done) => Err(short("write", off, want, done)),
                Err(e) => Err(e.into()),
            };
            Self::keep(&mut g.stage, buf);
            if r.is_ok() && want % b != 0 {
                if let Target::Raw(raw) = &self.target {
                    // The engine pads an unaligned end to the device's block, and
                    // a host file's size follows the padded write: put it back.
                    r = raw.set_len(g.len).map_err(io::Error::from);
                }
            }
            finish(g, (start, n), r, &mut result);
            if result.is_err() {
                break;
            }
        }
        // Every request in flight finishes before the lock is released.
        while let Some((run, fut)) = flight.pop_front() {
            let r = done(fut.wait(), run.0 * self.block, run.1 as usize * b);
            finish(g, run, r, &mut result);
        }
        if result.is_ok() && self.deferred_growth() {
            g.zero_from = end;
        }
        result
    }

    /// Copy what memory holds of `[offset, offset + out.len())` into `out` and
    /// return the blocks it does not hold.
    fn copy_held(&self, g: &mut Inner, offset: u64, out: &mut [u8], missing: &mut Vec<u64>) {
        let b = self.block;
        let end = offset + out.len() as u64;
        let deferred = self.deferred_growth();
        for blk in offset / b..end.div_ceil(b) {
            let (s, e) = ((blk * b).max(offset), ((blk + 1) * b).min(end));
            let dst = &mut out[(s - offset) as usize..(e - offset) as usize];
            let src = (s - blk * b) as usize..(e - blk * b) as usize;
            if let Some(d) = g.dirty.get(&blk) {
                dst.copy_from_slice(&d[src]);
            } else if deferred && blk >= g.zero_from {
                dst.fill(0);
            } else if let Some(d) = g.cache.get(blk) {
                dst.copy_from_slice(&d[src]);
            } else {
                missing.push(blk);
            }
        }
    }

    /// The blocks to fetch for `missing` (sorted, nonempty): their span, widened
    /// to the aligned readahead window, within the stored blocks, trimmed of
    /// blocks memory holds at either end.
    fn plan(&self, g: &mut Inner, missing: &[u64]) -> (u64, u64) {
        let (m0, m1) = (missing[0], missing[missing.len() - 1] + 1);
        let stored = if self.deferred_growth() {
            g.zero_from.min(g.len.div_ceil(self.block))
        } else {
            g.len.div_ceil(self.block)
        };
        // Adapt the window to how the last blocks read ahead fared.
        let c = &mut g.cache;
        if c.hits + c.waste >= ADAPT_EVERY {
            if c.hits * 2 >= c.hits + c.waste {
                g.window = (g.window * 2).min(self.max_window);
            } else if c.hits * 4 < c.hits + c.waste {
                g.window = (g.window / 2).max(1);
            }
            (c.hits, c.waste) = (0, 0);
        }
        let w = g.window;
        let mut start = m0 - m0 % w;
        let mut end = (start + w).max(m1).min(stored.max(m1));
        let held =
            |g: &Inner, blk: u64| g.dirty.contains_key(&blk) || g.cache.map.contains_key(&blk);
        while start < m0 && held(g, start) {
            start += 1;
        }
        while end > m1 && held(g, end - 1) {
            end -= 1;
        }
        (start, end)
    }
}

/// Clean blocks: those handed to redb (least recently used first out), and
/// those read ahead and not yet asked for (oldest first out). Blocks handed to
/// redb go first, as redb keeps its own copy of them; but blocks read ahead take
/// at most half the cache, and leave once they have waited unasked through
/// twice the cache's worth of accesses.
struct Cache {
    map: HashMap<u64, Entry>,
    /// `(block, stamp)` in use order; entries whose stamp no longer matches the
    /// block's are stale and skipped.
    used: VecDeque<(u64, u64)>,
    fresh: VecDeque<(u64, u64)>,
    /// Blocks read ahead and not yet asked for.
    fresh_count: usize,
    cap: usize,
    /// Accesses so far.
    stamp: u64,
    /// Blocks read ahead then asked for, and read ahead then evicted unasked,
    /// since the window last changed.
    hits: u32,
    waste: u32,
}

struct Entry {
    data: Box<[u8]>,
    used: bool,
    stamp: u64,
}

impl Cache {
    fn new(cap: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            used: VecDeque::new(),
            fresh: VecDeque::new(),
            fresh_count: 0,
            cap,
            stamp: 0,
            hits: 0,
            waste: 0,
        }
    }

    /// Block `blk`, marked used.
    fn get(&mut self, blk: u64) -> Option<&[u8]> {
        let e = self.map.get_mut(&blk)?;
        self.stamp += 1;
        if !e.used {
            e.used = true;
            self.hits += 1;
            self.fresh_count -= 1;
        }
        e.stamp = self.stamp;
        self.used.push_back((blk, self.stamp));
        self.compact();
        self.map.get(&blk).map(|e| &*e.data)
    }

    /// Remove block `blk` (it is being written).
    fn take(&mut self, blk: u64) -> Option<Box<[u8]>> {
        let e = self.map.remove(&blk)?;
        if !e.used {
            self.hits += 1;
            self.fresh_count -= 1;
        }
        Some(e.data)
    }

    /// Keep block `blk`, within the capacity left by `dirty` dirty blocks (or
    /// not at all).
    fn insert(&mut self, blk: u64, data: Box<[u8]>, used: bool, dirty: usize) {
        drop(self.take(blk));
        while self.map.len() + dirty >= self.cap {
            if !self.evict() {
                return;
            }
        }
        self.stamp += 1;
        let stamp = self.stamp;
        self.map.insert(blk, Entry { data, used, stamp });
        if used {
            self.used.push_back((blk, stamp));
        } else {
            self.fresh.push_back((blk, stamp));
            self.fresh_count += 1;
        }
        self.compact();
    }

    /// Whether a queue entry is the block's current one.
    fn live(map: &HashMap<u64, Entry>, (blk, stamp): (u64, u64), used: bool) -> bool {
        map.get(&blk)
            .is_some_and(|e| e.used == used && e.stamp == stamp)
    }

    /// Drop stale queue entries once they outnumber the blocks.
    fn compact(&mut self) {
        let limit = 2 * self.map.len() + 64;
        let map = &self.map;
        if self.used.len() > limit {
            self.used.retain(|&q| Cache::live(map, q, true));
        }
        if self.fresh.len() > limit {
            self.fresh.retain(|&q| Cache::live(map, q, false));
        }
    }

    /// Evict one block (see [`Cache`] for which).
    fn evict(&mut self) -> bool {
        while let Some(&q) = self.fresh.front() {
            if Cache::live(&self.map, q, false) {
                break;
            }
            self.fresh.pop_front();
        }
        let stale_fresh = self
            .fresh
            .front()
            .is_some_and(|&(_, s)| s + 2 * (self.cap as u64) < self.stamp);
        if !(stale_fresh || self.fresh_count > self.cap / 2) {
            while let Some(q) = self.used.pop_front() {
                if Cache::live(&self.map, q, true) {
                    self.map.remove(&q.0);
                    return true;
                }
            }
        }
        if let Some((blk, _)) = self.fresh.pop_front() {
            // Live: the loop above left a live entry in front.
            self.map.remove(&blk);
            self.fresh_count -= 1;
            self.waste += 1;
            return true;
        }
        false
    }

    /// Evict clean blocks until they fit beside `dirty` dirty blocks.
    fn trim(&mut self, dirty: usize) {
        while self.map.len() + dirty > self.cap && self.evict() {}
    }

    /// Drop every block from `first` on.
    fn remove_from(&mut self, first: u64) {
        self.map.retain(|&b, _| b < first);
        self.fresh_count = self.map.values().filter(|e| !e.used).count();
        let map = &self.map;
        self.used.retain(|&q| Cache::live(map, q, true));
        self.fresh.retain(|&q| Cache::live(map, q, false));
    }
}

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let mut missing = Vec::new();
        // First with the lock released during the device read; if the device
        // changed meanwhile (a write-back or shrink), again holding it.
        let mut release = true;
        loop {
            let mut g = self.lock();
            let len = g.len;
            let end = offset.checked_add(out.len() as u64);
            if end.is_none_or(|e| e > len) {
                let got = len.saturating_sub(offset) as usize;
                return Err(short("read", offset, out.len(), got.min(out.len())));
            }
            if out.is_empty() {
                return Ok(());
            }
            missing.clear();
            self.copy_held(&mut g, offset, out, &mut missing);
            if missing.is_empty() {
                return Ok(());
            }
            let (start, end) = self.plan(&mut g, &missing);
            let bytes = ((end - start) * self.block) as usize;
            let mut buf = self.buffer(&mut g.fetch, bytes);
            let epoch = g.epoch;
            let fetched = if release {
                drop(g);
                let r = self.fetch(start, &mut buf[..bytes]);
                g = self.lock();
                r
            } else {
                self.fetch(start, &mut buf[..bytes])
            };
            if fetched.is_err() || g.epoch != epoch {
                Self::keep(&mut g.fetch, buf);
                fetched?;
                release = false;
                continue;
            }
            let b = self.block;
            let block_of = |blk: u64| {
                let i = ((blk - start) * b) as usize;
                &buf[i..i + b as usize]
            };
            let stop = offset + out.len() as u64;
            for &blk in &missing {
                let (s, e) = ((blk * b).max(offset), ((blk + 1) * b).min(stop));
                let dst = &mut out[(s - offset) as usize..(e - offset) as usize];
                let src = (s - blk * b) as usize..(e - blk * b) as usize;
                // Written while the lock was released: the newer bytes.
                match g.dirty.get(&blk) {
                    Some(d) => dst.copy_from_slice(&d[src]),
                    None => dst.copy_from_slice(&block_of(blk)[src]),
                }
            }
            let asked = offset / b..stop.div_ceil(b);
            for blk in start..end {
                if g.dirty.contains_key(&blk) || g.cache.map.contains_key(&blk) {
                    continue;
                }
                let dirty = g.dirty.len();
                g.cache
                    .insert(blk, block_of(blk).into(), asked.contains(&blk), dirty);
            }
            Self::keep(&mut g.fetch, buf);
            return Ok(());
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut g = self.lock();
        if len >= g.len {
            self.grow(&mut g, len)
        } else {
            self.shrink(&mut g, len)
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut g = self.lock();
        self.write_out(&mut g)?;
        if !g.synced {
            self.file().sync_data()?;
            g.synced = true;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past 2^64"))?;
        let mut g = self.lock();
        if end > g.len {
            self.grow(&mut g, end)?;
        }
        let b = self.block;
        for blk in offset / b..end.div_ceil(b) {
            let (s, e) = ((blk * b).max(offset), ((blk + 1) * b).min(end));
            let src = &data[(s - offset) as usize..(e - offset) as usize];
            let at = (s - blk * b) as usize..(e - blk * b) as usize;
            if let Some(d) = g.dirty.get_mut(&blk) {
                d[at].copy_from_slice(src);
                continue;
            }
            // A block written whole (or up to the storage's end) needs no old bytes.
            let whole = at.start == 0 && (at.end == b as usize || e >= g.len);
            let d = if whole && src.len() == b as usize {
                drop(g.cache.take(blk));
                Box::from(src)
            } else {
                let mut d = if whole {
                    drop(g.cache.take(blk));
                    vec![0u8; b as usize].into_boxed_slice()
                } else {
                    self.load_block(&mut g, blk)?
                };
                d[at].copy_from_slice(src);
                d
            };
            g.dirty.insert(blk, d);
            let dirty = g.dirty.len();
            g.cache.trim(dirty);
            if dirty > self.write_back_blocks {
                self.write_out(&mut g)?;
            }
        }
        Ok(())
    }

    /// Writes what is dirty (redb syncs before it closes a database it wrote).
    fn close(&self) -> Result<(), io::Error> {
        self.write_out(&mut self.lock())
    }
}

impl Drop for RedbBackend {
    /// Writes what is still dirty (an error is lost here: `sync_data` or redb's
    /// `close` report it).
    fn drop(&mut self) {
        let mut g = self.lock();
        let _ = self.write_out(&mut g);
    }
}
