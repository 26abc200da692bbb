//! Orphan processing: what the kernel (`ext4_orphan_cleanup`) and e2fsck
//! (`release_orphan_inodes`) do with the orphan list a crash leaves behind.
//!
//! The kernel puts an inode on the orphan list while an operation that spans
//! transactions is under way: an unlinked inode still open (freed at its last
//! close), and a truncate (its blocks past the new size freed over several
//! transactions). The list's head is the superblock's `s_last_orphan`; each
//! orphan's `i_dtime` holds the next one. After a crash the list says what is
//! left to do:
//!
//! - an orphan with no links is released: its blocks and the inode freed;
//! - an orphan with links is truncated to its `i_size` (blocks past it freed).
//!
//! A writable open does that after the journal replay, head first, each orphan
//! its own transaction: a released orphan leaves the list in the transaction
//! that frees it; a truncated one leaves it in the transaction after its
//! truncate (a crash in between truncates it again, which changes nothing).
//! Read-only opens leave the image alone: an unlinked orphan has no name, and a
//! truncated one's size already hides the blocks past it, so reads see what the
//! kernel shows.
//!
//! dio's own unlink and truncate never need the list: each is one journal
//! transaction (all of it or none survives a crash), and without a journal the
//! kernel keeps no orphan list either. The new inode `Ext::put_file` fills
//! before naming it spans transactions: with a journal it is an orphan with no
//! links until the operation that names it takes it off the list
//! ([`add_unnamed`], [`take_off`]), as the kernel keeps an `O_TMPFILE` inode.
//!
//! The `orphan_file` feature (orphans in a file rather than a chain) is not
//! processed: a writable open refuses an image whose orphan file has entries
//! (`orphan_present`), and mke2fs 1.47 does not make it by default.

use std::collections::HashSet;
use std::sync::Arc;

use super::bytes::{le32, put16, put32};
use super::inode::FileType;
use super::inode::Inode;
use super::superblock::{SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use super::tx::{Op, UNLINK};
use super::Fs;
use crate::error::CorruptKind;
use crate::{Error, Result};

/// `s_last_orphan` in the superblock.
const LAST_ORPHAN: usize = 0xE8;
/// `i_dtime` in an inode: the next orphan while on the list.
const DTIME: usize = 0x14;

/// Make new inode `inode` (named nowhere yet) an orphan with no links, at the
/// head of the list, in the operation that creates it: a crash (or SIGKILL)
/// before it is named leaves it for the kernel's mount, e2fsck or dio's next
/// writable open to free, as the kernel does for an `O_TMPFILE` inode. Only
/// with a journal (the kernel keeps no orphan list without one).
pub(crate) fn add_unnamed(op: &mut Op<'_>, inode: &mut Inode) -> Result<()> {
    let head = op.alloc()?.last_orphan();
    put32(&mut inode.raw, DTIME, head);
    inode.links = 0;
    put16(&mut inode.raw, 0x1A, 0);
    op.alloc()?.set_last_orphan(inode.ino);
    Ok(())
}

/// Take `ino` off the orphan list in `op` (its predecessor, or the
/// superblock's head, skips it); `false` if it is not on the list. The caller
/// rewrites `ino` itself (links, `i_dtime`).
pub(crate) fn take_off(op: &mut Op<'_>, ino: u32) -> Result<bool> {
    let head = op.alloc()?.last_orphan();
    if head == 0 {
        return Ok(false);
    }
    let next = le32(&op.inode(ino)?.raw, DTIME);
    if head == ino {
        op.alloc()?.set_last_orphan(next);
        return Ok(true);
    }
    let mut seen = HashSet::new();
    let mut cur = head;
    while cur != 0 && seen.insert(cur) {
        let mut i = op.inode(cur)?;
        let n = le32(&i.raw, DTIME);
        if n == ino {
            put32(&mut i.raw, DTIME, next);
            op.put_inode(&mut i)?;
            return Ok(true);
        }
        cur = n;
    }
    Ok(false)
}

/// What orphan processing did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Orphans {
    /// Unlinked inodes freed.
    pub(crate) released: u32,
    /// Inodes truncated to their size.
    pub(crate) truncated: u32,
}

/// The head of the orphan list, as the superblock has it now.
pub(crate) fn head(fs: &Fs) -> Result<u32> {
    let sb = fs
        .io
        .read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "superblock")?;
    Ok(le32(&sb, LAST_ORPHAN))
}

/// Orphans left by a crash: process the list, then set the superblock's free
/// counts from the group descriptors, as the kernel's mount does (it keeps
/// them in memory and writes them back; a crash leaves the superblock's
/// stale, and freeing the orphans moves them from there). Without orphans the
/// superblock's counts stay as the journal replay left them (as `e2fsck -E
/// journal_only` leaves them; `e2fsck -fn` accepts stale ones).
pub(crate) fn after_crash(fs: &Arc<Fs>) -> Result<Orphans> {
    let done = process(fs)?;
    let mut op = Op::begin(fs)?;
    if op.alloc()?.recount_super(fs) {
        op.commit()?;
    }
    Ok(done)
}

/// Process the orphan list of `fs` (opened writable, its journal replayed).
pub(crate) fn process(fs: &Arc<Fs>) -> Result<Orphans> {
    let mut done = Orphans::default();
    let mut seen = HashSet::new();
    loop {
        let ino = head(fs)?;
        if ino == 0 {
            return Ok(done);
        }
        let bad = |why: String| Error::corrupt(CorruptKind::Inode, format!("orphan list: {why}"));
        if ino < fs.sb.first_ino.max(11) || ino > fs.sb.inodes_count {
            return Err(bad(format!("inode {ino} cannot be an orphan")));
        }
        if !seen.insert(ino) {
            return Err(bad(format!("inode {ino} is on it twice (a loop)")));
        }
        let inode = fs.read_inode(ino)?;
        let next = le32(&inode.raw, DTIME);
        if inode.links == 0 {
            // Released and off the list in one transaction.
            let mut op = Op::begin(fs)?;
            let mut inode = op.inode(ino)?;
            let dir = inode.file_type() == FileType::Directory;
            if inode.mode != 0 {
                super::ops::release(&mut op, &mut inode)?;
                op.tx.freed_inodes.push((ino, dir));
                op.put_inode_at(UNLINK, &mut inode)?;
            }
            op.alloc()?.set_last_orphan(next);
            op.commit()?;
            done.released += 1;
        } else {
            if matches!(inode.file_type(), FileType::Regular) {
                let w = super::wmap::ExtWriter::open(fs, inode)?;
                w.cut_past_size()?;
                drop(w);
            }
            let mut op = Op::begin(fs)?;
            let mut inode = op.inode(ino)?;
            put32(&mut inode.raw, DTIME, 0);
            op.put_inode(&mut inode)?;
            op.alloc()?.set_last_orphan(next);
            op.commit()?;
            done.truncated += 1;
        }
    }
}
