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

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use super::alloc::Alloc;
use super::inode::{self, Inode};
use super::superblock::compat;
use super::Fs;
use crate::error::Feature;
use crate::{Error, Result};

/// Write stages, in the order they reach the disk with a flush between them.
pub(crate) const FRESH: usize = 0;
/// Blocks that link fresh ones in.
pub(crate) const LINK: usize = 1;
/// Blocks that drop what unlinked names pointed to (an unlinked inode's own
/// changes), after the names are gone.
pub(crate) const UNLINK: usize = 2;

/// The set of whole fs blocks changed by one operation (see the module docs).
#[derive(Default)]
pub(crate) struct Tx {
    /// Per stage, blocks in the order first put.
    stages: [Vec<(u64, Vec<u8>)>; 3],
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
        })
    }

    /// The allocator (read from disk on first use).
    pub(crate) fn alloc(&mut self) -> Result<&mut Alloc> {
        if self.alloc.is_none() {
            *self.alloc = Some(Alloc::load(self.fs)?);
        }
        Ok(self.alloc.as_mut().expect("loaded above"))
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
                self.fs
                    .sb
                    .has_ro_compat(super::superblock::ro_compat::HUGE_FILE),
                self.fs.sb.block_size,
            );
        }
        self.fs.read_inode(ino)
    }

    /// Put `inode` (with its checksum) into its inode-table block, linked.
    pub(crate) fn put_inode(&mut self, inode: &mut Inode) -> Result<()> {
        self.put_inode_at(LINK, inode)
    }

    /// Put `inode` at write stage `stage` (a new inode is fresh: nothing names
    /// it yet; an unlinked one goes after its name is gone).
    pub(crate) fn put_inode_at(&mut self, stage: usize, inode: &mut Inode) -> Result<()> {
        if self.fs.sb.metadata_csum() {
            inode::update_checksum(self.fs.sb.checksum_seed, inode.ino, &mut inode.raw);
        }
        let (block, off) = self.fs.inode_place(inode.ino)?;
        let mut b = self.read(block, "inode table block")?;
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
    None
}
