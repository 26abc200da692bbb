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

use std::sync::{Arc, Mutex, MutexGuard};

use super::imap::IndW;
use super::inode::{flags, Inode};
use super::map::{map_extents, FileExtent};
use super::tree::{self, ExtTree, MAX_UNWRITTEN};
use super::tx::Op;
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
}

/// The allocating block map of one extent file.
pub(crate) struct AllocMap {
    fs: Arc<Fs>,
    st: Mutex<FileW>,
    bs: u32,
}

fn lock(m: &Mutex<FileW>) -> MutexGuard<'_, FileW> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Write the tree, i_blocks and the inode through `op`; the caller commits.
    pub(crate) fn store(op: &mut Op<'_>, st: &mut FileW, goal: u64) -> Result<()> {
        let mut inode = st.inode.clone();
        if let Some(ind) = &mut st.ind {
            ind.store(op, &mut inode);
            op.put_inode(&mut inode)?;
            st.inode = inode;
            return Ok(());
        }
        st.tree.write(op, &mut inode, goal)?;
        let ib = st.tree.i_blocks(&inode, op.fs.sb.block_size);
        tree::set_i_blocks(&mut inode, ib);
        op.put_inode(&mut inode)?;
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
        let backup_tree = st.tree.clone();
        let backup_inode = st.inode.clone();
        let r = (|| {
            if st.converted {
                // Written extents reach the disk only after their data (a batch
                // flushes before it writes them).
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
            }
        }
        r
    }
}

impl BlockMap for AllocMap {
    fn block_size(&self) -> u32 {
        self.bs
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        let max = max_blocks.max(1);
        let mut st = lock(&self.st);
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
            let (p, n) = op.alloc()?.alloc_blocks(&self.fs, goal, want)?;
            st.tree.insert(FileExtent {
                logical: block,
                physical: p,
                len: n,
                unwritten: true,
            });
            Ok((p, n))
        })?;
        Ok(Extent::unwritten(got.0, got.1).new_blocks(true))
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
            _ => return result,
        };
        // Converted in memory now (this handle maps the blocks as written from
        // here on); on disk at the next store, after a flush of the data.
        let bs = u64::from(self.bs);
        let (b0, b1) = (offset / bs, (offset + n).div_ceil(bs));
        let mut st = lock(&self.st);
        let ino = st.inode.ino;
        let changed = match &mut st.ind {
            Some(ind) => ind.written(&self.fs, ino, b0, b1)?,
            None => st.tree.convert(b0, b1),
        };
        if changed {
            st.converted = true;
        }
        result
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
        let mut st = lock(&self.st);
        let from = size.div_ceil(bs);
        let goal = Self::group_goal(&self.fs, st.inode.ino);
        let fs = &self.fs;
        self.change(&mut st, goal, |op, st| {
            let ino = st.inode.ino;
            if let Some(ind) = &mut st.ind {
                let n = ind.cut(fs, ino, from, op)?;
                ind.owned -= n;
            }
            let freed = st.tree.cut(from);
            op.tx.freed.extend(freed);
            tree::set_size(&mut st.inode, size);
            stamp(&mut st.inode, true);
            Ok(())
        })
    }

    fn max_file_size(&self) -> u64 {
        let bs = u64::from(self.bs);
        let blocks = if lock(&self.st).ind.is_some() {
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
        self.change(st, goal, |op, st| {
            let ind = st.ind.as_mut().expect("an indirect file");
            let (e, taken) = ind.allocate(op, ino, block, e.len.min(max), goal)?;
            ind.owned += taken;
            Ok(e)
        })
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
}

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
        let map = Arc::new(AllocMap {
            fs: Arc::clone(fs),
            st: Mutex::new(FileW {
                inode,
                tree: ExtTree::new(exts, blocks),
                ind,
                converted: false,
            }),
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
        })
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// The inode as last written.
    pub fn inode(&self) -> Inode {
        lock(&self.map.st).inode.clone()
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
        let n = self.file.write_at(offset, data, Flags::UNALIGNED)?;
        self.commit_size()?;
        Ok(n)
    }

    /// Record the engine's size (after extending writes) and mtime on disk. Call
    /// it with no write in flight: on files mapped by indirect blocks it frees
    /// the blocks of writes that failed.
    pub fn commit_size(&self) -> Result<()> {
        let size = self.file.size();
        let mut st = lock(&self.map.st);
        let goal = AllocMap::group_goal(&self.fs, self.ino);
        let fs = &self.fs;
        self.map.change(&mut st, goal, |op, st| {
            let ino = st.inode.ino;
            if let Some(ind) = &mut st.ind {
                // Blocks a failed write allocated and never wrote.
                let n = ind.drop_pending(fs, ino, op)?;
                ind.owned -= n;
            }
            if st.inode.size < size {
                tree::set_size(&mut st.inode, size);
            }
            stamp(&mut st.inode, true);
            Ok(())
        })
    }

    /// Change the size: down frees the blocks past it, up leaves a hole.
    pub fn set_len(&self, size: u64) -> Result<()> {
        self.file.truncate(size)?;
        let mut st = lock(&self.map.st);
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
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.fs.sb.block_size);
        let (mut b, end) = (offset / bs, (offset + len).div_ceil(bs));
        while b < end {
            let e = self.map.map(b, end - b, false)?;
            let n = e.len.max(1).min(end - b);
            if e.mapping == Mapping::Hole {
                let got = self.map.map(b, n, true)?;
                b += got.len.max(1);
            } else {
                b += n;
            }
        }
        Ok(())
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
        let mut st = lock(&self.map.st);
        let goal = AllocMap::group_goal(&self.fs, self.ino);
        self.map.change(&mut st, goal, |_, st| {
            super::ops::apply_attrs(&mut st.inode, attrs);
            Ok(())
        })
    }
}

impl Drop for ExtWriter {
    fn drop(&mut self) {
        super::lock(&self.fs.writers).remove(&self.ino);
    }
}
