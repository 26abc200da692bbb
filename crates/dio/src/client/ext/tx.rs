//! Transactions: the whole fs blocks one operation changes, and the one place they
//! are written ([`Op::commit`]).
//!
//! An operation (create a file, allocate blocks for a write, store converted
//! extents, truncate, remove a name) runs as one [`Op`]: it holds the allocator and
//! the metadata lock, reads through its own changes ([`Op::read`], [`Op::inode`]),
//! and collects what it changes in a [`Tx`], each whole fs block at a write stage:
//!
//! - [`FRESH`]: blocks nothing points to yet, or that only record allocations
//!   (bitmaps, descriptors, the superblock, new extent-tree, indirect, directory
//!   and symlink blocks, a new inode);
//! - [`LINK`]: blocks that point at others (inodes, existing tree, indirect and
//!   directory blocks, which may now name the fresh ones);
//! - [`LATE`]: blocks that must reach the disk only once the linked ones are
//!   there: a directory block losing the entries a split copied to a block
//!   made reachable at `LINK` (so a crash in between leaves a name twice,
//!   never nowhere: `e2fsck -fy` rebuilds the index and drops the copy); a
//!   file's inode whose size covers blocks that indirect or extent-tree blocks
//!   linked at `LINK` point to (data, then pointers, then the size);
//! - [`UNLINK`]: what a removed name pointed to (the inode cleared, dtime set),
//!   after the name is gone;
//! - `freed`, `freed_inodes`: blocks and inodes to give back once nothing points
//!   to them.
//!
//! Without a journal the commit ([`Op::commit`]) writes the stages in order with a
//! device flush between two non-empty ones, then (only when something is freed) a
//! flush and the bitmaps, descriptors and superblock that free. A crash at any
//! point leaves at worst blocks or inodes marked used that nothing points to
//! (`e2fsck -fy` reclaims them), never a block owned twice or a name pointing at
//! a cleared inode. File data is written by the engine before the operation
//! that links it (see `wmap`: unwritten extents, and a flush before written
//! extents or indirect pointers are stored). With a journal the frees are
//! applied first and every block of the operation goes into one jbd2
//! transaction (`Fs::commit_metadata`), with revoke records for the freed
//! single blocks.
//!
//! An [`Op`] dropped without a commit (an error, ENOSPC) drops the allocator's
//! in-memory state, so the next operation reads the unchanged disk again.
//!
//! **Batches** ([`Batch`], `Ext::begin_batch`): many operations share one write
//! cycle. A committed operation's blocks are merged into the batch instead of
//! written, and every metadata read sees them (`MetaIo`'s pending blocks), so
//! the next operation builds on them. The batch keeps, per block, one copy per
//! stage: an operation's change to a block at stage `s` (the bytes it changed
//! against what it read) is applied to the batch's copies at `s` and later, so
//! the copy written at stage `s` holds exactly the changes of all operations
//! made at stages up to `s` (a new inode put fresh into an inode-table block
//! whose neighbour an earlier operation linked goes out fresh, without that
//! neighbour's change). Frees wait for the end of the batch, so nothing freed
//! is reused inside it. Writing the batch without a journal: the fresh copies,
//! a flush (the file data written so far with them), the linked copies, a
//! flush, the trimmed ones, a flush, the unlinked ones, then (after a flush)
//! the frees: the per-operation order, for all at once, with two to five
//! flushes per batch instead of two to five per operation. With a journal a batch is one transaction (bounded to a
//! quarter of the journal). A failed operation inside a batch drops only its
//! own changes (the allocator reloads through the pending blocks).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, MutexGuard};

use super::alloc::Alloc;
use super::inode::{self, Inode};
use super::superblock::{compat, ro_compat};
use super::Fs;
use crate::error::{CorruptKind, Feature};
use crate::{Error, Result};

/// Write stages, in the order they reach the disk with a flush between them.
pub(crate) const FRESH: usize = 0;
/// Blocks that link fresh ones in.
pub(crate) const LINK: usize = 1;
/// Blocks written after the linked ones (see the module docs): a directory
/// block losing the entries a split moved to a block linked at [`LINK`] (see
/// `dx_split` in `ops`), a file's inode (its size) after the tree or
/// indirect blocks that map its new blocks (see `wmap`).
pub(crate) const LATE: usize = 2;
/// Blocks that drop what unlinked names pointed to (an unlinked inode's own
/// changes), after the names are gone.
pub(crate) const UNLINK: usize = 3;
/// How many write stages there are.
const STAGES: usize = 4;

/// The set of whole fs blocks changed by one operation (see the module docs).
#[derive(Default)]
pub(crate) struct Tx {
    /// Per stage, blocks in the order first put.
    stages: [Vec<(u64, Vec<u8>)>; STAGES],
    /// The latest bytes of every block put.
    latest: HashMap<u64, Vec<u8>>,
    /// Block runs to free after everything else is on disk.
    pub(crate) freed: Vec<(u64, u64)>,
    /// Inodes to free (number, is a directory).
    pub(crate) freed_inodes: Vec<(u32, bool)>,
}

impl Tx {
    /// Put a fresh block (see the module docs).
    pub(crate) fn put_fresh(&mut self, block: u64, data: Vec<u8>) {
        self.put_at(FRESH, block, data);
    }

    /// Put a linked block.
    pub(crate) fn put(&mut self, block: u64, data: Vec<u8>) {
        self.put_at(LINK, block, data);
    }

    /// Put `block`'s full new bytes at `stage`. A copy of the block at a later
    /// stage gets these bytes too, so the last write of a block is its latest
    /// bytes.
    pub(crate) fn put_at(&mut self, stage: usize, block: u64, data: Vec<u8>) {
        for (s, list) in self.stages.iter_mut().enumerate() {
            if s < stage {
                continue;
            }
            match list.iter_mut().find(|(b, _)| *b == block) {
                Some(x) => x.1 = data.clone(),
                None if s == stage => list.push((block, data.clone())),
                None => {}
            }
        }
        self.latest.insert(block, data);
    }

    /// The operation's copy of `block`, if it changed it.
    pub(crate) fn get(&self, block: u64) -> Option<&Vec<u8>> {
        self.latest.get(&block)
    }

    fn is_empty(&self) -> bool {
        self.latest.is_empty() && self.freed.is_empty() && self.freed_inodes.is_empty()
    }
}

/// One metadata operation: the allocator and the metadata lock held, and its
/// transaction.
pub(crate) struct Op<'a> {
    pub(crate) fs: &'a Arc<Fs>,
    alloc: MutexGuard<'a, Option<Alloc>>,
    _meta: MutexGuard<'a, ()>,
    pub(crate) tx: Tx,
    done: bool,
    /// New inodes whose table slot was used before: checked to hold no live
    /// inode when they are first put (see [`Op::new_inode_no`]).
    unchecked: Vec<u32>,
}

impl<'a> Op<'a> {
    /// Start an operation: refused when the file system is read-only or has a
    /// journal (allocating writes need the journal writer).
    pub(crate) fn begin(fs: &'a Arc<Fs>) -> Result<Op<'a>> {
        if let Some(e) = alloc_refusal(fs) {
            return Err(e);
        }
        let alloc = super::lock(&fs.alloc);
        let meta = super::lock(&fs.meta);
        Ok(Op {
            fs,
            alloc,
            _meta: meta,
            tx: Tx::default(),
            done: false,
            unchecked: Vec::new(),
        })
    }

    /// The allocator (read from disk on first use).
    pub(crate) fn alloc(&mut self) -> Result<&mut Alloc> {
        if self.alloc.is_none() {
            *self.alloc = Some(Alloc::load(self.fs)?);
        }
        Ok(self.alloc.as_mut().expect("loaded above"))
    }

    /// A new inode from the bitmaps ([`Alloc::alloc_inode`]). When it is first
    /// put, its slot in the inode table must not hold a live inode (a mode and
    /// links), or the bitmap is corrupt and taking the slot would destroy that
    /// file: the operation is refused before anything is written. Slots never
    /// used (`bg_itable_unused`) may hold anything and are not looked at.
    pub(crate) fn new_inode_no(&mut self, goal_group: u32, dir: bool) -> Result<u32> {
        let fs = self.fs;
        let ino = self.alloc()?.alloc_inode(fs, goal_group, dir)?;
        if !self.alloc()?.fresh_slot {
            self.unchecked.push(ino);
        }
        Ok(ino)
    }

    /// Read fs block `block` as this operation sees it.
    pub(crate) fn read(&self, block: u64, what: &str) -> Result<Vec<u8>> {
        match self.tx.get(block) {
            Some(d) => Ok(d.clone()),
            None => self.fs.read_block(block, what),
        }
    }

    /// Read inode `ino` as this operation sees it.
    pub(crate) fn inode(&self, ino: u32) -> Result<Inode> {
        let (block, off) = self.fs.inode_place(ino)?;
        if let Some(b) = self.tx.get(block) {
            let isz = usize::from(self.fs.sb.inode_size);
            let raw = b[off..off + isz].to_vec();
            return Inode::parse(
                ino,
                raw,
                self.fs.sb.has_ro_compat(ro_compat::HUGE_FILE),
                self.fs.sb.block_size,
            );
        }
        self.fs.read_inode(ino)
    }

    /// Put `inode` (with its checksum) into its inode-table block, linked.
    pub(crate) fn put_inode(&mut self, inode: &mut Inode) -> Result<()> {
        self.put_inode_at(LINK, inode)
    }

    /// The latest write stage at which this operation, or the open batch, holds
    /// `block` (`None`: neither changed it). A directory block one of them
    /// trims is changed again only at that stage or later (see `ops`).
    pub(crate) fn stage_of(&self, block: u64) -> Option<usize> {
        let mine = (0..STAGES)
            .rev()
            .find(|&s| self.tx.stages[s].iter().any(|(b, _)| *b == block));
        let batch = super::lock(&self.fs.batch).as_ref().and_then(|b| {
            (0..STAGES)
                .rev()
                .find(|&s| b.stages[s].contains_key(&block))
        });
        mine.max(batch)
    }

    /// Put `inode` at write stage `stage` (a new inode is fresh: nothing names
    /// it yet; an unlinked one goes after its name is gone).
    pub(crate) fn put_inode_at(&mut self, stage: usize, inode: &mut Inode) -> Result<()> {
        if self.fs.sb.metadata_csum() {
            inode::update_checksum(self.fs.sb.checksum_seed, inode.ino, &mut inode.raw);
        }
        let (block, off) = self.fs.inode_place(inode.ino)?;
        let mut b = self.read(block, "inode table block")?;
        if let Some(i) = self.unchecked.iter().position(|&n| n == inode.ino) {
            self.unchecked.swap_remove(i);
            let mode = u16::from_le_bytes([b[off], b[off + 1]]);
            let links = u16::from_le_bytes([b[off + 0x1A], b[off + 0x1B]]);
            if mode != 0 && links != 0 {
                return Err(Error::corrupt(
                    CorruptKind::Bitmap,
                    format!(
                        "the inode bitmap shows inode {} free, but it is in use (mode {mode:o}, {links} links)",
                        inode.ino
                    ),
                ));
            }
        }
        b[off..off + inode.raw.len()].copy_from_slice(&inode.raw);
        self.tx.put_at(stage, block, b);
        Ok(())
    }

    /// Write the transaction (see the module docs).
    pub(crate) fn commit(mut self) -> Result<()> {
        let r = self.commit_inner();
        if r.is_ok() {
            self.done = true;
        }
        r
    }

    fn commit_inner(&mut self) -> Result<()> {
        let fs = self.fs;
        if self.alloc.is_some() {
            let mut tx = std::mem::take(&mut self.tx);
            self.alloc()?.flush_into(fs, &mut tx);
            self.tx = tx;
        }
        if self.tx.is_empty() {
            return Ok(());
        }
        let mut batch = super::lock(&fs.batch);
        if let Some(b) = batch.as_mut() {
            let tx = std::mem::take(&mut self.tx);
            b.merge(fs, tx)?;
            if fs.io.pending_len() >= b.max_blocks {
                let full = std::mem::replace(b, Batch::new(fs));
                drop(batch);
                return self.write_batch(full);
            }
            return Ok(());
        }
        drop(batch);
        if fs.journaled() {
            return self.commit_journaled();
        }
        let flush = || {
            fs.io
                .device()
                .flush()
                .map_err(|e| Error::os("flush the image", e))
        };
        let bs = u64::from(fs.sb.block_size);
        let mut wrote = false;
        for stage in &self.tx.stages {
            if stage.is_empty() {
                continue;
            }
            if wrote {
                flush()?;
            }
            for (b, d) in stage {
                fs.io.write(b * bs, d, "metadata block")?;
            }
            wrote = true;
        }
        if self.tx.freed.is_empty() && self.tx.freed_inodes.is_empty() {
            return Ok(());
        }
        flush()?;
        let freed = std::mem::take(&mut self.tx.freed);
        let freed_inodes = std::mem::take(&mut self.tx.freed_inodes);
        let mut tx = Tx::default();
        {
            let alloc = self.alloc()?;
            for (s, n) in freed {
                alloc.free_blocks_run(fs, s, n)?;
            }
            for (ino, dir) in freed_inodes {
                alloc.free_inode(fs, ino, dir)?;
            }
            alloc.flush_into(fs, &mut tx);
        }
        for (b, d) in tx.stages.iter().flatten() {
            fs.io.write(b * bs, d, "bitmap block")?;
        }
        Ok(())
    }
}

impl Op<'_> {
    /// With a journal: the frees applied first, then every block of the
    /// operation (its latest bytes) in one journal transaction, with revoke
    /// records for the freed single blocks (tree, indirect and directory blocks:
    /// earlier journal copies of them must not be replayed over their next use).
    fn commit_journaled(&mut self) -> Result<()> {
        let fs = self.fs;
        let freed = std::mem::take(&mut self.tx.freed);
        let freed_inodes = std::mem::take(&mut self.tx.freed_inodes);
        let mut tx = std::mem::take(&mut self.tx);
        {
            let alloc = self.alloc()?;
            for &(s, n) in &freed {
                alloc.free_blocks_run(fs, s, n)?;
            }
            for &(ino, dir) in &freed_inodes {
                alloc.free_inode(fs, ino, dir)?;
            }
            alloc.flush_into(fs, &mut tx);
        }
        let mut blocks: Vec<(u64, &[u8])> = tx.latest.iter().map(|(b, d)| (*b, &d[..])).collect();
        blocks.sort_unstable_by_key(|b| b.0);
        let mut revoked: Vec<u64> = freed.iter().filter(|r| r.1 == 1).map(|r| r.0).collect();
        // Freed blocks still logged (in a multi-block run too) are revoked.
        revoked.extend(fs.logged_in(&freed));
        fs.commit_metadata(&blocks, &revoked)
    }
}

/// Operations committed together (see the module docs).
pub(crate) struct Batch {
    /// Per stage, the copy of each block to write at that stage.
    stages: [HashMap<u64, Vec<u8>>; STAGES],
    freed: Vec<(u64, u64)>,
    freed_inodes: Vec<(u32, bool)>,
    /// Write the batch once this many blocks are pending.
    pub(crate) max_blocks: usize,
}

impl Batch {
    pub(crate) fn new(fs: &Fs) -> Batch {
        // A journal takes the batch as one transaction: a quarter of it at most
        // (descriptor and revoke blocks, and room for the next), else a bound on
        // memory (16 MiB of 4 KiB blocks).
        let bs = u64::from(fs.sb.block_size);
        let mut max = (16 << 20) / bs as usize;
        if fs.sb.has_compat(compat::HAS_JOURNAL) {
            let jblocks = fs
                .read_inode(fs.sb.journal_inum)
                .map(|i| i.size / bs)
                .unwrap_or(1024);
            max = max.min((jblocks / 4) as usize).max(16);
        }
        Batch {
            stages: Default::default(),
            freed: Vec::new(),
            freed_inodes: Vec::new(),
            max_blocks: max,
        }
    }

    /// Take in one committed operation's transaction.
    fn merge(&mut self, fs: &Fs, tx: Tx) -> Result<()> {
        let bs = fs.sb.block_size;
        self.freed.extend(tx.freed);
        self.freed_inodes.extend(tx.freed_inodes);
        let mut tstages: [HashMap<u64, Vec<u8>>; STAGES] = Default::default();
        for (s, list) in tx.stages.into_iter().enumerate() {
            tstages[s].extend(list);
        }
        for (block, latest) in tx.latest {
            let batch_top = (0..STAGES)
                .rev()
                .find(|&s| self.stages[s].contains_key(&block));
            let tx_low = (0..STAGES).find(|&s| tstages[s].contains_key(&block));
            let in_order = match (batch_top, tx_low) {
                (None, _) => true,
                (Some(b), Some(t)) => b <= t,
                (Some(_), None) => false,
            };
            if in_order {
                // Nothing in the batch sits at a later stage than this
                // operation's first copy: its copies are the copies.
                for (mine, theirs) in self.stages.iter_mut().zip(tstages.iter_mut()) {
                    if let Some(d) = theirs.remove(&block) {
                        mine.insert(block, d);
                    }
                }
                fs.io.pending_put(bs, block, latest);
                continue;
            }
            match fs.io.pending_get(block) {
                None => {
                    // New to the batch: the operation's own copies.
                    for (mine, theirs) in self.stages.iter_mut().zip(tstages.iter_mut()) {
                        if let Some(d) = theirs.remove(&block) {
                            mine.insert(block, d);
                        }
                    }
                }
                Some(base) => {
                    let mut disk: Option<Vec<u8>> = None;
                    for t in 0..STAGES {
                        let here =
                            self.stages[t].contains_key(&block) || tstages[t].contains_key(&block);
                        // The operation's change up to stage t.
                        let Some(tx_t) = (0..=t).rev().find_map(|s| tstages[s].get(&block)) else {
                            continue;
                        };
                        if !here {
                            continue;
                        }
                        let mut copy = match (0..=t).rev().find_map(|s| self.stages[s].get(&block))
                        {
                            Some(p) => p.clone(),
                            None => match &disk {
                                Some(d) => d.clone(),
                                None => {
                                    let d = fs.io.read_plain(
                                        block * u64::from(bs),
                                        bs as usize,
                                        "metadata block",
                                    )?;
                                    disk = Some(d.clone());
                                    d
                                }
                            },
                        };
                        for ((c, n), o) in copy.iter_mut().zip(tx_t).zip(&base) {
                            if n != o {
                                *c = *n;
                            }
                        }
                        self.stages[t].insert(block, copy);
                    }
                }
            }
            fs.io.pending_put(bs, block, latest);
        }
        Ok(())
    }
}

impl Op<'_> {
    /// Write a batch (see the module docs) and forget its pending blocks.
    pub(crate) fn write_batch(&mut self, batch: Batch) -> Result<()> {
        let r = self.write_batch_inner(batch);
        if r.is_err() {
            // The disk may hold part of it: forget what memory holds.
            let _ = self.fs.io.pending_take();
            *self.alloc = None;
        }
        r
    }

    fn write_batch_inner(&mut self, batch: Batch) -> Result<()> {
        let fs = self.fs;
        let Batch {
            stages,
            freed,
            freed_inodes,
            ..
        } = batch;
        if fs.journaled() {
            {
                let alloc = self.alloc()?;
                for &(s, n) in &freed {
                    alloc.free_blocks_run(fs, s, n)?;
                }
                for &(ino, dir) in &freed_inodes {
                    alloc.free_inode(fs, ino, dir)?;
                }
            }
            let mut tx = Tx::default();
            if self.alloc.is_some() {
                self.alloc()?.flush_into(fs, &mut tx);
            }
            // The pending blocks stay readable until the journal holds them.
            let mut all: BTreeMap<u64, Vec<u8>> = fs.io.pending_clone();
            all.extend(tx.latest);
            let blocks: Vec<(u64, &[u8])> = all.iter().map(|(b, d)| (*b, &d[..])).collect();
            let revoked: Vec<u64> = freed.iter().filter(|r| r.1 == 1).map(|r| r.0).collect();
            if !blocks.is_empty() || !revoked.is_empty() {
                fs.commit_metadata(&blocks, &revoked)?;
            }
            let _ = fs.io.pending_take();
            return Ok(());
        }
        let flush = || {
            fs.io
                .device()
                .flush()
                .map_err(|e| Error::os("flush the image", e))
        };
        // Fresh blocks, then one flush for them and the file data written so far,
        // then what links them, then what unlinked names dropped.
        let mut wrote = false;
        for stage in stages {
            if stage.is_empty() {
                continue;
            }
            if wrote {
                flush()?;
            }
            let mut list: Vec<(u64, Vec<u8>)> = stage.into_iter().collect();
            list.sort_unstable_by_key(|b| b.0);
            write_runs(fs, &list)?;
            wrote = true;
        }
        let _ = fs.io.pending_take();
        if freed.is_empty() && freed_inodes.is_empty() {
            return Ok(());
        }
        flush()?;
        let mut tx = Tx::default();
        {
            let alloc = self.alloc()?;
            for (s, n) in freed {
                alloc.free_blocks_run(fs, s, n)?;
            }
            for (ino, dir) in freed_inodes {
                alloc.free_inode(fs, ino, dir)?;
            }
            alloc.flush_into(fs, &mut tx);
        }
        let mut list: Vec<(u64, Vec<u8>)> = tx.latest.into_iter().collect();
        list.sort_unstable_by_key(|b| b.0);
        write_runs(fs, &list)
    }
}

/// Write sorted whole blocks, neighbours as one write (up to 1 MiB).
fn write_runs(fs: &Fs, list: &[(u64, Vec<u8>)]) -> Result<()> {
    let bs = u64::from(fs.sb.block_size);
    let mut run: Vec<u8> = Vec::new();
    let mut start = 0u64;
    for (b, d) in list {
        if !run.is_empty() && (start + run.len() as u64 / bs != *b || run.len() >= 1 << 20) {
            fs.io.write(start * bs, &run, "metadata blocks")?;
            run.clear();
        }
        if run.is_empty() {
            start = *b;
        }
        run.extend_from_slice(d);
    }
    if !run.is_empty() {
        fs.io.write(start * bs, &run, "metadata blocks")?;
    }
    Ok(())
}

/// Whether operations are being batched (their blocks pending in memory).
pub(crate) fn batching(fs: &Fs) -> bool {
    super::lock(&fs.batch).is_some()
}

/// The flush that puts file data before the metadata pointing at it: skipped
/// while batching (the batch's write flushes before any linking block).
pub(crate) fn data_barrier(fs: &Fs) -> Result<()> {
    if batching(fs) {
        return Ok(());
    }
    fs.io
        .device()
        .flush()
        .map_err(|e| Error::os("flush the image", e))
}

impl super::Ext {
    /// Start batching: from now on allocating operations (create, mkdir,
    /// put_file, writes that allocate, remove, ...) are merged in memory and
    /// written together, in the same crash-safe order as one operation (see the
    /// module docs of the transactions), when [`Ext::commit_batch`] or
    /// [`Ext::end_batch`] is called or the batch grows past its bound (16 MiB of
    /// metadata, or a quarter of the journal). Reads through this `Ext` see the
    /// batched changes; the image does not until the batch is written, and
    /// [`ExtWriter::sync`](super::ExtWriter::sync) does not flush while a batch
    /// is open. No-op when already batching.
    pub fn begin_batch(&self) -> Result<()> {
        if let Some(e) = alloc_refusal(&self.fs) {
            return Err(e);
        }
        let mut b = super::lock(&self.fs.batch);
        if b.is_none() {
            *b = Some(Batch::new(&self.fs));
            self.fs.io.cache_on(self.fs.sb.block_size);
        }
        Ok(())
    }

    /// Write what the batch holds (and keep batching). Not durable until a
    /// device flush (`sync`) without a journal; committed with one.
    pub fn commit_batch(&self) -> Result<()> {
        let mut op = Op::begin(&self.fs)?;
        let full = {
            let mut b = super::lock(&self.fs.batch);
            match b.as_mut() {
                Some(b) => std::mem::replace(b, Batch::new(&self.fs)),
                None => return Ok(()),
            }
        };
        op.done = true;
        op.write_batch(full)
    }

    /// Write what the batch holds and stop batching.
    pub fn end_batch(&self) -> Result<()> {
        let r = self.commit_batch();
        *super::lock(&self.fs.batch) = None;
        self.fs.io.cache_off();
        r
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Nothing (or not all) was written: forget what the allocator holds in
            // memory, the disk is the truth.
            *self.alloc = None;
        }
    }
}

/// Why allocating operations are refused on this file system, if they are (a
/// journal refuses them only when the journal writer is not open).
pub(crate) fn alloc_refusal(fs: &Fs) -> Option<Error> {
    if !fs.writable {
        return Some(Error::ReadOnly);
    }
    if fs.sb.has_compat(compat::HAS_JOURNAL) && !fs.journaled() {
        return Some(Error::incompatible(
            Feature::JournalWrite,
            "has_journal: creating, growing and removing files on an image with a journal needs the journal writer (in-place overwrites work)",
        ));
    }
    if fs.sb.has_ro_compat(ro_compat::QUOTA) {
        // Every block and inode allocated or freed changes the usage the quota
        // files record; left stale, e2fsck reports the image inconsistent.
        return Some(Error::incompatible(
            Feature::Quota,
            "quota: dio does not update quota files, so it does not create, grow or remove files on this image (in-place overwrites work; `tune2fs -O ^quota` first)",
        ));
    }
    None
}
