//! Allocating writes to files mapped by ext2/3 indirect blocks (12 direct
//! pointers, then single, double and triple indirect blocks).
//!
//! There is no unwritten state in this format, so new data blocks are kept out of
//! the on-disk pointers until their data is written: `map(create)` allocates data
//! blocks (and zeroed indirect blocks, committed at once with the bitmaps, linked
//! by nothing yet) and sets the pointers in memory only, with the blocks listed
//! as pending; the engine zeroes the parts of the new blocks a write does not
//! cover (the seed's `dio_zero_block`) and writes; `end_io` drops the written
//! blocks from the pending list; the next store (after a device flush) writes
//! the changed indirect blocks and the inode with every still-pending pointer
//! as 0. Pending blocks left by a failed write are freed when the writer records
//! its size. A mapping that ends at the last pointer of an indirect block
//! carries the boundary flag.
//!
//! A range is allocated in one operation, table after table ([`IndW::allocate_range`]):
//! one set of bitmap writes and one commit for a whole write or preallocation,
//! not one per indirect block (with 1 KiB blocks a table maps only 256 KiB). A
//! store writes only the tables that changed since the last one; a table whose
//! pending pointers are written later is written again then, with them.

use std::collections::{BTreeSet, HashMap};

use super::bytes::{le32, put32};
use super::inode::Inode;
use super::tx::Op;
use super::Fs;
use crate::map::{Extent, Mapping};
use crate::{Error, Result};

/// Where a pointer lives: in the inode (`table` 0) or in an indirect block.
type Slot = (u64, usize);

/// The indirect-block map of one file, in memory.
#[derive(Clone)]
pub(crate) struct IndW {
    ptrs: [u32; 15],
    tables: HashMap<u64, Vec<u32>>,
    /// Tables changed in memory since the last store (a pointer set, or a pending
    /// pointer written).
    dirty: BTreeSet<u64>,
    /// Data blocks allocated and not written yet: slot -> device block.
    pending: HashMap<Slot, u64>,
    per: u64,
    /// Blocks the file owns (data and indirect), pending ones included.
    pub(crate) owned: u64,
}

impl IndW {
    pub(crate) fn load(fs: &Fs, inode: &Inode) -> IndW {
        let mut ptrs = [0u32; 15];
        for (i, p) in ptrs.iter_mut().enumerate() {
            *p = le32(inode.i_block(), i * 4);
        }
        IndW {
            ptrs,
            tables: HashMap::new(),
            dirty: BTreeSet::new(),
            pending: HashMap::new(),
            per: u64::from(fs.sb.block_size / 4),
            owned: (inode.blocks_512 / u64::from(fs.sb.block_size / 512))
                .saturating_sub(u64::from(inode.file_acl != 0)),
        }
    }

    fn table(&mut self, fs: &Fs, ino: u32, b: u64) -> Result<&mut Vec<u32>> {
        use std::collections::hash_map::Entry;
        match self.tables.entry(b) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(v) => {
                fs.check_blocks(b, 1, ino)?;
                let raw = fs.read_block(b, "indirect block")?;
                Ok(v.insert((0..raw.len() / 4).map(|i| le32(&raw, i * 4)).collect()))
            }
        }
    }

    fn get(&mut self, fs: &Fs, ino: u32, s: Slot) -> Result<u32> {
        Ok(if s.0 == 0 {
            self.ptrs[s.1]
        } else {
            self.table(fs, ino, s.0)?[s.1]
        })
    }

    fn set(&mut self, fs: &Fs, ino: u32, s: Slot, v: u32) -> Result<()> {
        if s.0 == 0 {
            // The inode (and its pointers) is written with every store.
            self.ptrs[s.1] = v;
        } else {
            self.table(fs, ino, s.0)?[s.1] = v;
            self.dirty.insert(s.0);
        }
        Ok(())
    }

    /// The root slot and the indices below it for file block `block`.
    fn path(&self, block: u64) -> Option<(usize, Vec<u64>)> {
        let p = self.per;
        if block < 12 {
            Some((block as usize, vec![]))
        } else if block - 12 < p {
            Some((12, vec![block - 12]))
        } else if block - 12 - p < p * p {
            let r = block - 12 - p;
            Some((13, vec![r / p, r % p]))
        } else if block - 12 - p - p * p < p * p * p {
            let r = block - 12 - p - p * p;
            Some((14, vec![r / (p * p), (r / p) % p, r % p]))
        } else {
            None
        }
    }

    /// The slot holding file block `block`'s pointer; with `op`, missing indirect
    /// blocks are allocated (zeroed, near `goal`).
    fn leaf_slot(
        &mut self,
        fs: &Fs,
        ino: u32,
        block: u64,
        mut op: Option<&mut Op<'_>>,
        goal: u64,
        new_meta: &mut u64,
    ) -> Result<Option<Slot>> {
        let Some((root, idx)) = self.path(block) else {
            return Err(Error::TooLarge {
                end: block.saturating_mul(self.per * 4),
                max: 0,
            });
        };
        let mut slot: Slot = (0, root);
        for &i in &idx {
            let mut t = u64::from(self.get(fs, ino, slot)?);
            if t == 0 {
                let Some(op) = op.as_deref_mut() else {
                    return Ok(None);
                };
                let (b, _) = op.alloc()?.alloc_blocks(fs, goal, 1)?;
                op.tx.put_fresh(b, vec![0u8; fs.sb.block_size as usize]);
                self.tables.insert(b, vec![0u32; self.per as usize]);
                self.set(fs, ino, slot, b as u32)?;
                *new_meta += 1;
                t = b;
            }
            slot = (t, i as usize);
        }
        Ok(Some(slot))
    }

    /// How many slots from `s` on share its table (the run limit), and the
    /// pointers there.
    fn run_room(&mut self, fs: &Fs, ino: u32, s: Slot) -> Result<Vec<u32>> {
        Ok(if s.0 == 0 {
            self.ptrs[s.1..12].to_vec()
        } else {
            self.table(fs, ino, s.0)?[s.1..].to_vec()
        })
    }

    /// Map without allocating.
    pub(crate) fn map(&mut self, fs: &Fs, ino: u32, block: u64, max: u64) -> Result<Extent> {
        let mut meta = 0;
        let Some(s) = self.leaf_slot(fs, ino, block, None, 0, &mut meta)? else {
            return Ok(Extent::hole(1));
        };
        let room = self.run_room(fs, ino, s)?;
        let limit = (room.len() as u64).min(max.max(1)) as usize;
        let first = u64::from(room[0]);
        if first == 0 {
            let n = room[..limit].iter().take_while(|&&p| p == 0).count().max(1);
            return Ok(Extent::hole(n as u64));
        }
        // A pending block (allocated, its write in flight) reads as zeros until
        // that write completes: a run is all pending or all written.
        let pending = |k: usize| self.pending.contains_key(&(s.0, s.1 + k));
        let unwritten = pending(0);
        let mut n = 1;
        while n < limit && u64::from(room[n]) == first + n as u64 && pending(n) == unwritten {
            n += 1;
        }
        fs.check_blocks(first, n as u64, ino)?;
        if unwritten {
            return Ok(Extent::unwritten(first, n as u64));
        }
        Ok(Extent::mapped(first, n as u64).boundary(s.0 != 0 && n == room.len()))
    }

    /// Allocate data blocks for the hole at `block` (up to `max`), pointers in
    /// memory and pending. Returns the extent and the blocks taken (data and
    /// indirect).
    pub(crate) fn allocate(
        &mut self,
        op: &mut Op<'_>,
        ino: u32,
        block: u64,
        max: u64,
        goal: u64,
    ) -> Result<(Extent, u64)> {
        let fs = op.fs;
        let mut meta = 0;
        let s = self
            .leaf_slot(fs, ino, block, Some(op), goal, &mut meta)?
            .expect("allocated");
        let room = self.run_room(fs, ino, s)?;
        let want = room
            .iter()
            .take(max.max(1) as usize)
            .take_while(|&&p| p == 0)
            .count()
            .max(1) as u64;
        let goal = if s.1 > 0 {
            match self.get(fs, ino, (s.0, s.1 - 1))? {
                0 => goal,
                p => u64::from(p) + 1,
            }
        } else {
            goal
        };
        let (p, n) = op.alloc()?.alloc_blocks(fs, goal, want)?;
        for k in 0..n as usize {
            let slot = (s.0, s.1 + k);
            self.set(fs, ino, slot, (p + k as u64) as u32)?;
            self.pending.insert(slot, p + k as u64);
        }
        let boundary = s.0 != 0 && n as usize == room.len();
        Ok((
            Extent::mapped(p, n).new_blocks(true).boundary(boundary),
            n + meta,
        ))
    }

    /// Allocate every hole in file blocks `[b0, end)` through `op` (one operation:
    /// all of it or, on an error, the caller drops `op` and this map's copy from
    /// before), a run per table, each run's goal the block after the last. Returns
    /// the extent of the run at `b0` if `b0` was a hole.
    pub(crate) fn allocate_range(
        &mut self,
        op: &mut Op<'_>,
        ino: u32,
        b0: u64,
        end: u64,
        mut goal: u64,
    ) -> Result<Option<Extent>> {
        let fs = op.fs;
        let mut first = None;
        let mut b = b0;
        while b < end {
            let e = self.map(fs, ino, b, end - b)?;
            if e.mapping != Mapping::Hole {
                b += e.len.max(1);
                continue;
            }
            // `end - b`, not the hole's length: a missing table reads as a hole of
            // one block, and `allocate` takes only the empty slots of its table.
            let (run, taken) = self.allocate(op, ino, b, end - b, goal)?;
            self.owned += taken;
            if let Mapping::Mapped(p) = run.mapping {
                goal = p + run.len;
            }
            let at = b;
            b += run.len.max(1);
            if at == b0 {
                first = Some(run);
            }
        }
        Ok(first)
    }

    /// Blocks allocated and not written yet.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The data of file blocks `[b0, b1)` is on the device: no longer pending.
    pub(crate) fn written(&mut self, fs: &Fs, ino: u32, b0: u64, b1: u64) -> Result<bool> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let mut any = false;
        for b in b0..b1 {
            let mut meta = 0;
            if let Some(s) = self.leaf_slot(fs, ino, b, None, 0, &mut meta)? {
                if self.pending.remove(&s).is_some() {
                    // Its pointer goes to disk with the next store (an inode
                    // slot's with the inode, always written).
                    any = true;
                    if s.0 != 0 {
                        self.dirty.insert(s.0);
                    }
                }
            }
        }
        Ok(any)
    }

    /// Free the pending blocks (a failed write's): pointers cleared in memory.
    /// Returns how many.
    pub(crate) fn drop_pending(&mut self, fs: &Fs, ino: u32, op: &mut Op<'_>) -> Result<u64> {
        let pending: Vec<(Slot, u64)> = self.pending.drain().collect();
        for (s, b) in &pending {
            self.set(fs, ino, *s, 0)?;
            op.tx.freed.push((*b, 1));
        }
        Ok(pending.len() as u64)
    }

    /// Cut every block at or past file block `from`: data and indirect blocks
    /// freed through `op`. Returns the blocks freed.
    pub(crate) fn cut(&mut self, fs: &Fs, ino: u32, from: u64, op: &mut Op<'_>) -> Result<u64> {
        let p = self.per;
        let mut freed = 0u64;
        for r in 0..15usize {
            let (base, level) = match r {
                0..=11 => (r as u64, 0u32),
                12 => (12, 1),
                13 => (12 + p, 2),
                _ => (12 + p + p * p, 3),
            };
            let s: Slot = (0, r);
            freed += self.cut_slot(fs, ino, s, base, level, from, op)?;
        }
        Ok(freed)
    }

    /// Cut under slot `s`, which maps file blocks from `base` (`level` levels of
    /// tables below it). Returns the blocks freed.
    #[allow(clippy::too_many_arguments)]
    fn cut_slot(
        &mut self,
        fs: &Fs,
        ino: u32,
        s: Slot,
        base: u64,
        level: u32,
        from: u64,
        op: &mut Op<'_>,
    ) -> Result<u64> {
        let b = u64::from(self.get(fs, ino, s)?);
        if b == 0 {
            return Ok(0);
        }
        let span = self.per.pow(level);
        if base + span <= from {
            return Ok(0);
        }
        let mut freed = 0;
        if level > 0 {
            let sub = self.per.pow(level - 1);
            for i in 0..self.per as usize {
                freed +=
                    self.cut_slot(fs, ino, (b, i), base + i as u64 * sub, level - 1, from, op)?;
            }
        }
        if base >= from {
            // The whole subtree goes.
            if let Some(x) = self.pending.remove(&s) {
                debug_assert_eq!(x, b);
            }
            op.tx.freed.push((b, 1));
            self.tables.remove(&b);
            self.dirty.remove(&b);
            self.set(fs, ino, s, 0)?;
            freed += 1;
        }
        Ok(freed)
    }

    /// Write the changed tables (pending pointers as 0) and the pointers and
    /// i_blocks (pending blocks left out) into the inode.
    pub(crate) fn store(&mut self, op: &mut Op<'_>, inode: &mut Inode) {
        let bs = op.fs.sb.block_size as usize;
        let acl = u64::from(inode.file_acl != 0);
        let counted = self.owned - self.pending.len() as u64 + acl;
        super::tree::set_i_blocks(inode, counted * (bs as u64 / 512));
        let dirty = std::mem::take(&mut self.dirty);
        for t in dirty {
            let Some(ptrs) = self.tables.get(&t) else {
                continue;
            };
            let mut data = vec![0u8; bs];
            for (i, &p) in ptrs.iter().enumerate() {
                let v = if self.pending.contains_key(&(t, i)) {
                    0
                } else {
                    p
                };
                put32(&mut data, i * 4, v);
            }
            op.tx.put(t, data);
        }
        for (i, &p) in self.ptrs.iter().enumerate() {
            let v = if self.pending.contains_key(&(0, i)) {
                0
            } else {
                p
            };
            put32(&mut inode.raw, 0x28 + i * 4, v);
        }
    }

    /// The tables a store would write: kept by a caller whose operation may fail
    /// after the store (its writes then never happen), and given back with
    /// [`IndW::restore_dirty`].
    pub(crate) fn dirty_tables(&self) -> BTreeSet<u64> {
        self.dirty.clone()
    }

    /// Mark `tables` changed again (their store's operation failed).
    pub(crate) fn restore_dirty(&mut self, tables: BTreeSet<u64>) {
        self.dirty.extend(tables);
    }
}
