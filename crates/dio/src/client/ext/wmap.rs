//! Allocating writes to extent files: the block map's `create` side, as the
//! kernel's ext4 direct-I/O path does it, and [`ExtWriter`], the handle that
//! grows, fills and truncates a file.
//!
//! - `map(block, n, create = true)` on a hole allocates up to `n` blocks near the
//!   goal (the physical block that continues the previous extent, else the start
//!   of the inode's group), records them as an **unwritten** extent (allocation
//!   bitmaps and descriptors first, a flush, then the tree and the inode) and
//!   returns them as new: the engine zeroes what the write does not cover and
//!   writes the data. Unwritten extents met by a write are returned as new too.
//! - `end_io` of a write that wrote `n` bytes converts exactly the blocks written
//!   to written extents in the map's tree (splitting and merging extents), so
//!   this handle reads them back at once; a failed or short write leaves the
//!   rest unwritten (they read as zeros, and `e2fsck` accepts unwritten blocks
//!   past i_size). The converted tree goes to disk with the next change of the
//!   file's metadata ([`ExtWriter::commit_size`], [`ExtWriter::sync`], the next
//!   allocation, a truncate), always after a device flush: a crash before that
//!   leaves the blocks unwritten (zeros), never stale bytes. So a large copy
//!   costs one flush and one tree write at its end, not one per request.
//! - i_size moves on disk only after that, when [`ExtWriter::write_at`] returns
//!   (or [`ExtWriter::commit_size`] after async writes through
//!   [`ExtWriter::direct`]).
//! - truncate down cuts the extents and sets the size in one inode write, and
//!   frees the blocks after; truncate up only sets the size (a hole).
//!
//! Every metadata change goes through one [`Op`] and its commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::alloc::cluster_ratio;
use super::imap::IndW;
use super::inode::{flags, Inode};
use super::map::{map_extents, FileExtent};
use super::tree::{self, ExtTree, MAX_UNWRITTEN};
use super::tx::{Op, LATE};
use super::Fs;
use crate::device::{Device, Op as IoOp};
use crate::error::Feature;
use crate::map::{BlockMap, Extent, Mapping, Private};
use crate::{DirectFile, Error, FileState, Flags, Result};

/// What the map keeps of its file.
pub(crate) struct FileW {
    pub(crate) inode: Inode,
    pub(crate) tree: ExtTree,
    /// The indirect-block map, for files without extents.
    pub(crate) ind: Option<IndW>,
    /// The tree in memory has conversions whose data has not been flushed yet:
    /// the next store flushes the device first.
    pub(crate) converted: bool,
    /// Why queued conversions could not be applied (they stay queued): no
    /// metadata change until they are.
    queued_err: Option<Error>,
}

/// The allocating block map of one extent file.
pub(crate) struct AllocMap {
    fs: Arc<Fs>,
    st: Mutex<FileW>,
    bs: u32,
    /// The file is mapped by indirect blocks (fixed for the map's life).
    indirect: bool,
    /// File blocks written while `st` was held, to convert (see `end_io`).
    queued: Mutex<Vec<(u64, u64)>>,
    /// A write failed since the last size commit (see [`ExtWriter::commit_size`]).
    write_failed: AtomicBool,
    /// Blocks were allocated at or past the size on disk since the last size
    /// commit.
    grew: AtomicBool,
}

/// The file's state, locked. The lock is held across device I/O (metadata
/// reads and writes of an allocation, a truncate, a commit), and that I/O may
/// reap other requests of this file on this very thread (io_uring reaps
/// inline; so does the sync engine), whose completions call the map again
/// (`end_io`, or a read-modify-write that starts and maps its write): engine
/// completions wait until the lock is released (see
/// [`crate::engine::DeferCompletions`]).
pub(crate) struct Locked<'a> {
    // Declared first: released before the deferred completions run.
    guard: MutexGuard<'a, FileW>,
    _defer: crate::engine::DeferCompletions,
}

impl std::ops::Deref for Locked<'_> {
    type Target = FileW;
    fn deref(&self) -> &FileW {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut FileW {
        &mut self.guard
    }
}

impl AllocMap {
    /// Lock the file's state, with the conversions of writes that completed
    /// while it was held (see [`AllocMap::end_io`]) applied.
    fn lock(&self) -> Locked<'_> {
        let defer = crate::engine::DeferCompletions::new();
        let mut st = Locked {
            guard: self.st.lock().unwrap_or_else(|e| e.into_inner()),
            _defer: defer,
        };
        self.drain(&mut st);
        st
    }

    /// The lock if it is free (never waits).
    fn try_lock(&self) -> Option<Locked<'_>> {
        let defer = crate::engine::DeferCompletions::new();
        let guard = match self.st.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let mut st = Locked {
            guard,
            _defer: defer,
        };
        self.drain(&mut st);
        Some(st)
    }

    /// Apply the queued conversions.
    fn drain(&self, st: &mut FileW) {
        let queued = std::mem::take(&mut *self.queued());
        let mut left = queued.into_iter();
        while let Some((b0, b1)) = left.next() {
            match self.convert(st, b0, b1) {
                Ok(()) => {}
                Err(e) => {
                    // Kept for the next lock; until then no metadata change
                    // (which could free these blocks as never written).
                    let mut q = self.queued();
                    q.push((b0, b1));
                    q.extend(left);
                    st.queued_err = Some(e);
                    return;
                }
            }
        }
        st.queued_err = None;
    }

    fn queued(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Written blocks `[b0, b1)` become written extents (or pointers) in memory.
    fn convert(&self, st: &mut FileW, b0: u64, b1: u64) -> Result<()> {
        let ino = st.inode.ino;
        let changed = match &mut st.ind {
            Some(ind) => ind.written(&self.fs, ino, b0, b1)?,
            None => st.tree.convert(b0, b1),
        };
        if changed {
            st.converted = true;
        }
        Ok(())
    }
}

impl AllocMap {
    /// The first block of the inode's group: the goal of a file's first blocks.
    fn group_goal(fs: &Fs, ino: u32) -> u64 {
        fs.sb.group_first_block((ino - 1) / fs.sb.inodes_per_group)
    }

    /// Where blocks for file block `block` should go.
    fn goal(fs: &Fs, st: &FileW, block: u64) -> u64 {
        let i = st.tree.exts.partition_point(|e| e.logical <= block);
        match i.checked_sub(1).map(|j| &st.tree.exts[j]) {
            Some(e) => (e.physical + e.len + (block - (e.logical + e.len).min(block)))
                .min(fs.sb.blocks_count - 1),
            None => Self::group_goal(fs, st.inode.ino),
        }
    }

    /// Blocks for the hole at file block `block`, up to `want` of them (not past
    /// the hole): near the goal; with bigalloc, in the physical cluster the
    /// block's logical cluster already has, else in new clusters at the
    /// block's offset in its cluster (the kernel's rule: a file's blocks share
    /// clusters only with their logical neighbours, at the same offsets).
    fn alloc_run(op: &mut Op<'_>, st: &FileW, block: u64, want: u64) -> Result<(u64, u64)> {
        let fs = op.fs;
        let r = cluster_ratio(&fs.sb);
        let goal = Self::goal(fs, st, block);
        if r == 1 {
            return op.alloc()?.alloc_blocks(fs, goal, want);
        }
        let off = block % r;
        if let Some(p) = st.tree.cluster_slot(block, r) {
            return Ok((p, want.min(r - off)));
        }
        // A hole that ends inside a logical cluster the file has stops before it.
        let end = block + want;
        let want = if end % r != 0 && st.tree.cluster_slot(end - 1, r).is_some() {
            end - end % r - block
        } else {
            want
        };
        let (c, got) = op.alloc()?.alloc_blocks(fs, goal, off + want)?;
        Ok((c + off, (got - off).min(want)))
    }

    /// Write the tree, i_blocks and the inode through `op`; the caller commits.
    /// The inode goes at the late stage, after the tree or indirect blocks
    /// (linked): a crash between them leaves pointers to written blocks past
    /// the old size, never a size over pointers that did not land (holes or
    /// unwritten extents reading as zeros where data was written).
    pub(crate) fn store(op: &mut Op<'_>, st: &mut FileW, goal: u64) -> Result<()> {
        let mut inode = st.inode.clone();
        if inode.links == 0 {
            // An unnamed orphan (`Ext::put_file` with a journal): its i_dtime
            // is the orphan list's link, which other operations may have
            // moved since this copy was read.
            let now = op.inode(inode.ino)?;
            inode.raw[0x14..0x18].copy_from_slice(&now.raw[0x14..0x18]);
        }
        if let Some(ind) = &mut st.ind {
            ind.store(op, &mut inode);
            op.put_inode_at(LATE, &mut inode)?;
            st.inode = inode;
            return Ok(());
        }
        st.tree.write(op, &mut inode, goal)?;
        let ib = st.tree.i_blocks(&inode, &op.fs.sb);
        tree::set_i_blocks(&mut inode, ib);
        op.put_inode_at(LATE, &mut inode)?;
        st.inode = inode;
        Ok(())
    }

    /// Run `change` on the file's state and store it in one operation; on any
    /// error the state is as before and nothing was written.
    fn change<T>(
        &self,
        st: &mut FileW,
        goal: u64,
        change: impl FnOnce(&mut Op<'_>, &mut FileW) -> Result<T>,
    ) -> Result<T> {
        if let Some(e) = &st.queued_err {
            return Err(e.clone());
        }
        let backup_tree = st.tree.clone();
        let backup_inode = st.inode.clone();
        let backup_dirty = st.ind.as_ref().map(IndW::dirty_tables);
        let r = (|| {
            if st.converted && !self.fs.data_flush_in_commit() {
                // Written extents reach the disk only after their data (with a
                // journal, the commit's flush before its commit block does it; a
                // batch flushes before it writes them).
                super::tx::data_barrier(&self.fs)?;
            }
            let mut op = Op::begin(&self.fs)?;
            let t = change(&mut op, st)?;
            Self::store(&mut op, st, goal)?;
            op.commit()?;
            Ok(t)
        })();
        match &r {
            Ok(_) => st.converted = false,
            Err(_) => {
                st.tree = backup_tree;
                st.inode = backup_inode;
                if let (Some(ind), Some(dirty)) = (&mut st.ind, backup_dirty) {
                    ind.restore_dirty(dirty);
                }
            }
        }
        r
    }

    /// An allocation at file block `block`: past the size on disk, a failed
    /// write's blocks there are given back at the next size commit.
    fn note_growth(&self, st: &FileW, block: u64) {
        if block.saturating_mul(u64::from(self.bs)) >= st.inode.size {
            self.grew.store(true, Ordering::Relaxed);
        }
    }

    /// [`AllocMap::change`] for a change of an indirect file's pointers (an
    /// allocation, a cut): on any error the in-memory map is as before too.
    fn change_ind<T>(
        &self,
        st: &mut FileW,
        goal: u64,
        change: impl FnOnce(&mut Op<'_>, &mut FileW) -> Result<T>,
    ) -> Result<T> {
        let backup = st.ind.clone();
        let r = self.change(st, goal, change);
        if r.is_err() {
            st.ind = backup;
        }
        r
    }
}

impl AllocMap {
    /// The mapping of `block` (allocating with `create`).
    fn map_locked(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        let max = max_blocks.max(1);
        let mut st = self.lock();
        if st.ind.is_some() {
            return self.map_indirect(&mut st, block, max, create);
        }
        let e = map_extents(&st.tree.exts, block, max);
        if !create {
            return Ok(e);
        }
        match e.mapping {
            Mapping::Mapped(_) => return Ok(e),
            Mapping::Unwritten(p) => return Ok(Extent::unwritten(p, e.len).new_blocks(true)),
            Mapping::Hole => {}
        }
        if block >= 1 << 32 {
            return Err(Error::TooLarge {
                end: block * u64::from(self.bs),
                max: self.max_file_size(),
            });
        }
        let want = e.len.min(MAX_UNWRITTEN).min((1 << 32) - block);
        let goal = Self::goal(&self.fs, &st, block);
        let got = self.change(&mut st, goal, |op, st| {
            let (p, n) = Self::alloc_run(op, st, block, want)?;
            st.tree.insert(FileExtent {
                logical: block,
                physical: p,
                len: n,
                unwritten: true,
            });
            Ok((p, n))
        })?;
        self.note_growth(&st, block);
        Ok(Extent::unwritten(got.0, got.1).new_blocks(true))
    }
}

impl BlockMap for AllocMap {
    fn block_size(&self) -> u32 {
        self.bs
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        // Every call completes on the engine's completion worker (as ext4
        // converts unwritten extents in a workqueue): its end_io and whatever
        // its callback starts (a read-modify-write maps its write) may wait for
        // the lock, whose holder may be waiting for a metadata read that a
        // device completion thread must deliver; that thread must not be the
        // one waiting.
        Ok(self
            .map_locked(block, max_blocks, create)?
            .defer_completion(true))
    }

    fn end_io(
        &self,
        op: IoOp,
        offset: u64,
        result: Result<usize>,
        _private: Option<&Private>,
    ) -> Result<usize> {
        let n = match (op, &result) {
            (IoOp::Write, Ok(n)) if *n > 0 => *n as u64,
            (IoOp::Write, Err(_)) => {
                self.write_failed.store(true, Ordering::Relaxed);
                return result;
            }
            _ => return result,
        };
        // Converted in memory now (this handle maps the blocks as written from
        // here on); on disk at the next store, after a flush of the data.
        //
        // Never waits for the lock: its holder may be waiting for a metadata
        // read that this thread (a device's completion thread) has to deliver.
        // When it is held, the conversion is queued, and whoever takes the lock
        // next (every map lookup does) applies it first.
        let bs = u64::from(self.bs);
        let (b0, b1) = (offset / bs, (offset + n).div_ceil(bs));
        match self.try_lock() {
            Some(mut st) => self.convert(&mut st, b0, b1)?,
            None => {
                self.queued().push((b0, b1));
                // The holder may have let go before the push: apply it now if
                // the lock is free, so it is not left waiting.
                drop(self.try_lock());
            }
        }
        result
    }

    fn end_io_dsync(
        &self,
        dev: &dyn Device,
        offset: u64,
        result: Result<usize>,
        private: Option<&Private>,
        size: Option<u64>,
        flush: bool,
    ) -> Result<usize> {
        let n = match self.end_io(IoOp::Write, offset, result, private) {
            Ok(n) if n > 0 => n,
            r => return r,
        };
        let flush_dev = || dev.flush().map_err(|e| Error::io(offset, e));
        let mut st = self.lock();
        let grows = size.is_some_and(|s| s > st.inode.size);
        if !st.converted && !grows {
            // No metadata of this file waits in memory: the data alone.
            if flush {
                flush_dev()?;
            }
            return Ok(n);
        }
        // The converted extents (or pointers) and the size, after the data (the
        // change flushes first), in one operation: a journal transaction that is
        // committed when it returns, or ordered stages that the flush below
        // makes durable.
        let goal = Self::group_goal(&self.fs, st.inode.ino);
        self.change(&mut st, goal, |_, st| {
            if let Some(s) = size {
                if st.inode.size < s {
                    tree::set_size(&mut st.inode, s);
                }
            }
            stamp(&mut st.inode, true);
            Ok(())
        })?;
        if !self.fs.journaled() {
            flush_dev()?;
        }
        Ok(n)
    }

    fn can_resize(&self, size: u64) -> Result<()> {
        if size > self.max_file_size() {
            return Err(Error::TooLarge {
                end: size,
                max: self.max_file_size(),
            });
        }
        Ok(())
    }

    fn truncate(&self, size: u64) -> Result<()> {
        let bs = u64::from(self.bs);
        let mut st = self.lock();
        let from = size.div_ceil(bs);
        let goal = Self::group_goal(&self.fs, st.inode.ino);
        let fs = &self.fs;
        self.change_ind(&mut st, goal, |op, st| {
            cut_blocks(fs, op, st, from)?;
            tree::set_size(&mut st.inode, size);
            stamp(&mut st.inode, true);
            Ok(())
        })
    }

    fn max_file_size(&self) -> u64 {
        // Without the lock: the engine asks on submit paths, which may run
        // inside a completion on a thread that holds it.
        let bs = u64::from(self.bs);
        let blocks = if self.indirect {
            let p = bs / 4;
            12 + p + p * p + p * p * p
        } else {
            1u64 << 32
        };
        blocks.saturating_mul(bs).min(i64::MAX as u64)
    }
}

impl AllocMap {
    fn map_indirect(&self, st: &mut FileW, block: u64, max: u64, create: bool) -> Result<Extent> {
        let fs = &self.fs;
        let ino = st.inode.ino;
        let ind = st.ind.as_mut().expect("an indirect file");
        let e = ind.map(fs, ino, block, max)?;
        if let (true, Mapping::Unwritten(_)) = (create, e.mapping) {
            // Pending blocks (a write in flight): new to this write too, as
            // unwritten extents are.
            return Ok(e.new_blocks(true));
        }
        if !create || e.mapping != Mapping::Hole {
            return Ok(e);
        }
        if block.saturating_mul(u64::from(self.bs)) >= self.max_file_size_of(st) {
            return Err(Error::TooLarge {
                end: block * u64::from(self.bs),
                max: self.max_file_size_of(st),
            });
        }
        let goal = Self::group_goal(fs, ino);
        // The whole write's blocks in one operation (bounded as an extent
        // file's allocation is); where that does not fit, the hole at `block`
        // alone, so that a write to an almost full image gets what there is.
        let last = self.max_file_size_of(st) / u64::from(self.bs);
        let span = max.min(MAX_UNWRITTEN).min(last - block);
        let first_run = e.len.min(span);
        let alloc = |end: u64, st: &mut FileW| {
            self.change_ind(st, goal, |op, st| {
                let ind = st.ind.as_mut().expect("an indirect file");
                let e = ind.allocate_range(op, ino, block, end, goal)?;
                Ok(e.expect("a hole at the first block"))
            })
        };
        let e = match alloc(block + span, st) {
            Err(Error::NoSpace(_)) if span > first_run => alloc(block + first_run, st),
            r => r,
        }?;
        self.note_growth(st, block);
        Ok(e)
    }

    fn max_file_size_of(&self, st: &FileW) -> u64 {
        let bs = u64::from(self.bs);
        let blocks = if st.ind.is_some() {
            let p = bs / 4;
            12 + p + p * p + p * p * p
        } else {
            1u64 << 32
        };
        blocks.saturating_mul(bs).min(i64::MAX as u64)
    }
}

/// Free every block of the file from file block `from` on (data, indirect
/// blocks, extent tree entries) through `op`.
fn cut_blocks(fs: &Fs, op: &mut Op<'_>, st: &mut FileW, from: u64) -> Result<()> {
    if let Some(ind) = &mut st.ind {
        let n = ind.cut(fs, st.inode.ino, from, op)?;
        ind.owned -= n;
    }
    let mut freed = st.tree.cut(from);
    let r = cluster_ratio(&fs.sb);
    if let Some(p) = st.tree.cluster_slot(from.saturating_sub(1), r) {
        // The cluster of the new last block stays the file's.
        freed = keep_cluster(freed, p / r, r);
    }
    op.tx.freed.extend(freed);
    Ok(())
}

/// `runs` without the blocks of cluster `keep` (of `r` blocks).
fn keep_cluster(runs: Vec<(u64, u64)>, keep: u64, r: u64) -> Vec<(u64, u64)> {
    let (k0, k1) = (keep * r, keep * r + r);
    let mut out = Vec::with_capacity(runs.len() + 1);
    for (s, n) in runs {
        let e = s + n;
        if e <= k0 || s >= k1 {
            out.push((s, n));
            continue;
        }
        if s < k0 {
            out.push((s, k0 - s));
        }
        if e > k1 {
            out.push((k1, e - k1));
        }
    }
    out
}

/// Set mtime and ctime (and, with `both` false, only ctime) to now.
pub(crate) fn stamp(inode: &mut Inode, mtime: bool) {
    let t = super::now();
    inode.set_time(super::inode::OFF_CTIME, super::inode::OFF_CTIME_EXTRA, t);
    inode.ctime = t;
    if mtime {
        inode.set_time(super::inode::OFF_MTIME, super::inode::OFF_MTIME_EXTRA, t);
        inode.mtime = t;
    }
}

/// A regular extent file open for allocating writes: grow it, fill its holes,
/// truncate it. One writer per inode at a time (see [`super::Ext::writer`]).
pub struct ExtWriter {
    fs: Arc<Fs>,
    map: Arc<AllocMap>,
    file: DirectFile,
    ino: u32,
    /// Every [`ExtWriter::write_at`] is a dsync write.
    dsync: AtomicBool,
}

/// The inode flag of `chattr +S` (synchronous updates).
const SYNC_FL: u32 = 0x8;

impl std::fmt::Debug for ExtWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtWriter")
            .field("ino", &self.ino)
            .field("size", &self.file.size())
            .finish()
    }
}

impl ExtWriter {
    pub(crate) fn open(fs: &Arc<Fs>, inode: Inode) -> Result<ExtWriter> {
        if let Some(e) = super::tx::alloc_refusal(fs) {
            return Err(e);
        }
        let (exts, blocks, ind) = if inode.has_flag(flags::EXTENTS) {
            let (e, b) = super::map::read_extent_tree_blocks(fs, &inode)?;
            (e, b, None)
        } else {
            (Vec::new(), Vec::new(), Some(IndW::load(fs, &inode)))
        };
        let ino = inode.ino;
        let size = inode.size;
        let dsync = inode.has_flag(SYNC_FL);
        let indirect = ind.is_some();
        let map = Arc::new(AllocMap {
            fs: Arc::clone(fs),
            indirect,
            st: Mutex::new(FileW {
                inode,
                tree: ExtTree::new(exts, blocks),
                ind,
                converted: false,
                queued_err: None,
            }),
            queued: Mutex::new(Vec::new()),
            write_failed: AtomicBool::new(false),
            grew: AtomicBool::new(false),
            bs: fs.sb.block_size,
        });
        let dev: Arc<dyn Device> = Arc::clone(fs.io.device());
        let file = DirectFile::new(
            dev,
            Arc::clone(&map) as Arc<dyn BlockMap>,
            Arc::new(FileState::new(size)),
        )
        .map_err(|e| match e {
            Error::Invalid(m) => Error::incompatible(Feature::BlockSize, m),
            e => e,
        })?;
        Ok(ExtWriter {
            fs: Arc::clone(fs),
            map,
            file,
            ino,
            dsync: AtomicBool::new(dsync),
        })
    }

    /// Make every [`ExtWriter::write_at`] a dsync write (`O_DSYNC`): when it
    /// returns, its data, the blocks allocated or converted for it and the
    /// size it reached are on stable storage (without a journal: ordered
    /// writes and flushes; with one: its transaction committed). On by default
    /// for an inode with the sync flag (`chattr +S`). Writes through
    /// [`ExtWriter::direct`] get the same with [`Flags::DSYNC`].
    pub fn set_dsync(&self, on: bool) {
        self.dsync.store(on, Ordering::Relaxed);
    }

    /// Whether writes are dsync writes (see [`ExtWriter::set_dsync`]).
    pub fn is_dsync(&self) -> bool {
        self.dsync.load(Ordering::Relaxed)
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// The inode as last written.
    pub fn inode(&self) -> Inode {
        self.map.lock().inode.clone()
    }

    /// The engine handle (async and vectored writes, any flags). Writes through it
    /// allocate and convert as [`ExtWriter::write_at`] does; the size they reach
    /// goes to disk with [`ExtWriter::commit_size`] (or [`ExtWriter::sync`]).
    pub fn direct(&self) -> &DirectFile {
        &self.file
    }

    /// Write `data` at `offset` (any offset and length): fills holes, grows the
    /// file, then records the new size. Like write(2), a file system that fills up
    /// mid-way gives a short count (the bytes before it are written and
    /// recorded); ENOSPC before the first byte is [`Error::NoSpace`].
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let mut flags = Flags::UNALIGNED;
        if self.is_dsync() {
            flags |= Flags::DSYNC;
        }
        let n = match self.file.write_at(offset, data, flags) {
            Ok(n) => n,
            Err(e) => {
                // A failed write converted nothing, and the bitmaps on disk
                // count the blocks it took: give them back now (its own error
                // is the one to report).
                let _ = self.discard_failed();
                return Err(e);
            }
        };
        // A dsync write stored its size in its completion.
        if !self.is_dsync() || self.map.lock().inode.size < self.file.size() {
            self.commit_size()?;
        }
        Ok(n)
    }

    /// Record the engine's size (after extending writes) and mtime on disk. Call
    /// it with no write in flight: on files mapped by indirect blocks it frees
    /// the blocks of writes that failed (call it, or [`ExtWriter::sync`], after a
    /// write through [`ExtWriter::direct`] fails, or the image keeps them counted
    /// as used).
    pub fn commit_size(&self) -> Result<()> {
        self.record(true)
    }

    /// After a write through [`ExtWriter::direct`] failed: give back the blocks
    /// it took (data blocks it allocated and never wrote, and the blocks it
    /// allocated past the size), and record the size the writes before it
    /// reached. Writes nothing where the failed write took nothing (a write
    /// refused before it allocated leaves the image as it was), and does not
    /// touch the file's times. Call it with no write in flight.
    pub fn discard_failed(&self) -> Result<()> {
        if !self.map.write_failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let took = {
            let st = self.map.lock();
            st.ind.as_ref().is_some_and(IndW::has_pending)
                || self.map.grew.load(Ordering::Relaxed)
                || st.inode.size < self.file.size()
        };
        if !took {
            self.map.write_failed.store(false, Ordering::Relaxed);
            return Ok(());
        }
        self.record(false)
    }

    /// Record the size (and with `touch` the mtime), giving back what failed
    /// writes took.
    fn record(&self, touch: bool) -> Result<()> {
        let size = self.file.size();
        let mut st = self.map.lock();
        let goal = AllocMap::group_goal(&self.fs, self.ino);
        let fs = &self.fs;
        // A failed write that allocated past the size leaves blocks there that
        // hold nothing of the file (unwritten extents, or pending blocks and
        // empty indirect blocks): given back, as the kernel's ext4 truncates
        // after a failed extending direct write.
        let failed = self.map.write_failed.swap(false, Ordering::Relaxed);
        let failed = self.map.grew.swap(false, Ordering::Relaxed) && failed;
        let bs = u64::from(fs.sb.block_size);
        let change = |op: &mut Op<'_>, st: &mut FileW| {
            let ino = st.inode.ino;
            if let Some(ind) = &mut st.ind {
                // Blocks a failed write allocated and never wrote.
                let n = ind.drop_pending(fs, ino, op)?;
                ind.owned -= n;
            }
            if failed {
                cut_blocks(fs, op, st, size.div_ceil(bs))?;
            }
            if st.inode.size < size {
                tree::set_size(&mut st.inode, size);
            }
            if touch {
                stamp(&mut st.inode, true);
            }
            Ok(())
        };
        if !failed {
            return self.map.change(&mut st, goal, change);
        }
        // A cut walks the pointers: the map is kept to be put back on an error.
        let r = self.map.change_ind(&mut st, goal, change);
        if r.is_err() {
            self.map.write_failed.store(true, Ordering::Relaxed);
            self.map.grew.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Change the size: down frees the blocks past it, up leaves a hole.
    pub fn set_len(&self, size: u64) -> Result<()> {
        self.file.truncate(size)?;
        let mut st = self.map.lock();
        if st.inode.size != size {
            let goal = AllocMap::group_goal(&self.fs, self.ino);
            self.map.change(&mut st, goal, |_, st| {
                tree::set_size(&mut st.inode, size);
                stamp(&mut st.inode, true);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Allocate `[offset, offset + len)` as unwritten extents (fallocate with
    /// KEEP_SIZE): a later write there only converts. Blocks already mapped stay.
    /// The whole range is one operation (one set of bitmap, tree and inode
    /// writes), in runs as long as the free space allows: ENOSPC allocates
    /// nothing.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.fs.sb.block_size);
        let (b0, end) = (offset / bs, (offset + len).div_ceil(bs));
        let mut st = self.map.lock();
        if st.ind.is_some() {
            // Indirect files: blocks pending until written (a later write
            // converts nothing: its end_io drops them from the pending list).
            if end.saturating_mul(bs) > self.map.max_file_size_of(&st) {
                return Err(Error::TooLarge {
                    end: offset + len,
                    max: self.map.max_file_size_of(&st),
                });
            }
            let goal = AllocMap::group_goal(&self.fs, self.ino);
            let ino = self.ino;
            self.map.change_ind(&mut st, goal, |op, st| {
                let ind = st.ind.as_mut().expect("an indirect file");
                ind.allocate_range(op, ino, b0, end, goal).map(drop)
            })?;
            return Ok(());
        }
        if end > 1 << 32 {
            return Err(Error::TooLarge {
                end: offset + len,
                max: self.map.max_file_size_of(&st),
            });
        }
        let fs = &self.fs;
        let goal = AllocMap::goal(fs, &st, b0);
        self.map.change(&mut st, goal, |op, st| {
            let mut b = b0;
            while b < end {
                let e = map_extents(&st.tree.exts, b, end - b);
                let n = e.len.max(1).min(end - b);
                if e.mapping != Mapping::Hole {
                    b += n;
                    continue;
                }
                let mut left = n;
                while left > 0 {
                    let (p, got) = AllocMap::alloc_run(op, st, b, left.min(MAX_UNWRITTEN))?;
                    st.tree.insert(FileExtent {
                        logical: b,
                        physical: p,
                        len: got,
                        unwritten: true,
                    });
                    b += got;
                    left -= got;
                }
            }
            Ok(())
        })
    }

    /// Free the blocks past the file's size (an orphan's truncate left part
    /// way: see `orphan.rs`).
    pub(crate) fn cut_past_size(&self) -> Result<()> {
        BlockMap::truncate(&*self.map, self.size())
    }

    /// Record the size and flush: everything written is durable (while the
    /// file system batches, see [`super::Ext::begin_batch`], durable with the
    /// batch).
    pub fn sync(&self) -> Result<()> {
        self.commit_size()?;
        super::tx::data_barrier(&self.fs)
    }

    /// Set the owner, mode bits (permission bits only) and times.
    pub fn set_attrs(&self, attrs: &super::ops::Attrs) -> Result<()> {
        let mut st = self.map.lock();
        let goal = AllocMap::group_goal(&self.fs, self.ino);
        self.map.change(&mut st, goal, |_, st| {
            super::ops::apply_attrs(&mut st.inode, attrs);
            Ok(())
        })
    }
}

impl Drop for ExtWriter {
    fn drop(&mut self) {
        // Blocks that failed writes (ENOSPC part-way, an I/O error) or an
        // unwritten `allocate` of an indirect file took are still counted in
        // the bitmaps while no pointer on disk names them: a writer dropped
        // without `discard_failed` or `sync` (a caller's error path) gives them
        // back, or e2fsck finds them leaked.
        let pending = self.map.lock().ind.as_ref().is_some_and(IndW::has_pending);
        if pending || self.map.write_failed.load(Ordering::Relaxed) {
            let _ = self.record(false);
        }
        super::lock(&self.fs.writers).remove(&self.ino);
    }
}
