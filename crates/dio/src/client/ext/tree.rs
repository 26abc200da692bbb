//! Writing extent trees: a file's leaf extents kept in memory, and the tree that
//! holds them rebuilt into the inode and its tree blocks after every change.
//!
//! The tree is always as shallow and narrow as the extents allow: up to 4 extents
//! in the inode (depth 0), else full leaves of `(block size - 12) / 12` extents
//! under index levels of as many entries, the root's 4 in the inode. Tree blocks
//! the file already has are reused in order, more are allocated near the file's
//! data, spare ones are freed; each carries its checksum tail with
//! `metadata_csum`. Blocks whose bytes did not change are not written again.

use std::collections::HashMap;

use super::alloc::cluster_ratio;
use super::bytes::{crc32c, put16, put32};
use super::inode::Inode;
use super::map::FileExtent;
use super::superblock::Superblock;
use super::tx::Op;
use crate::error::CorruptKind;
use crate::{Error, Result};

const MAGIC: u16 = 0xF30A;
/// Longest initialized extent.
pub(crate) const MAX_INIT: u64 = 32768;
/// Longest unwritten extent.
pub(crate) const MAX_UNWRITTEN: u64 = 32767;

/// A file's extents and the tree blocks holding them.
#[derive(Clone, Default)]
pub(crate) struct ExtTree {
    /// Leaf extents in logical order.
    pub(crate) exts: Vec<FileExtent>,
    /// The tree's blocks (besides the root in the inode).
    pub(crate) blocks: Vec<u64>,
    /// What each tree block last held on disk.
    written: HashMap<u64, Vec<u8>>,
}

fn max_len(unwritten: bool) -> u64 {
    if unwritten {
        MAX_UNWRITTEN
    } else {
        MAX_INIT
    }
}

impl ExtTree {
    pub(crate) fn new(exts: Vec<FileExtent>, blocks: Vec<u64>) -> ExtTree {
        ExtTree {
            exts,
            blocks,
            written: HashMap::new(),
        }
    }

    /// Blocks the file's data takes.
    pub(crate) fn data_blocks(&self) -> u64 {
        self.exts.iter().map(|e| e.len).sum()
    }

    /// Insert `e` (which must not overlap any extent), merging with neighbours.
    pub(crate) fn insert(&mut self, e: FileExtent) {
        let i = self.exts.partition_point(|x| x.logical < e.logical);
        self.exts.insert(i, e);
        self.merge_around(i);
    }

    fn mergeable(a: &FileExtent, b: &FileExtent) -> bool {
        a.unwritten == b.unwritten
            && a.logical + a.len == b.logical
            && a.physical + a.len == b.physical
            && a.len + b.len <= max_len(a.unwritten)
    }

    fn merge_around(&mut self, i: usize) {
        let mut i = i;
        if i > 0 && Self::mergeable(&self.exts[i - 1], &self.exts[i]) {
            self.exts[i - 1].len += self.exts[i].len;
            self.exts.remove(i);
            i -= 1;
        }
        if i + 1 < self.exts.len() && Self::mergeable(&self.exts[i], &self.exts[i + 1]) {
            self.exts[i].len += self.exts[i + 1].len;
            self.exts.remove(i + 1);
        }
    }

    /// Mark file blocks `[b0, b1)` written where they are unwritten (splitting
    /// extents). Returns whether anything changed.
    pub(crate) fn convert(&mut self, b0: u64, b1: u64) -> bool {
        let mut out: Vec<FileExtent> = Vec::with_capacity(self.exts.len() + 2);
        let mut changed = false;
        for e in &self.exts {
            let (s, t) = (e.logical, e.logical + e.len);
            if !e.unwritten || t <= b0 || s >= b1 {
                out.push(*e);
                continue;
            }
            changed = true;
            let (m0, m1) = (s.max(b0), t.min(b1));
            let piece = |from: u64, to: u64, unwritten: bool| FileExtent {
                logical: from,
                physical: e.physical + (from - s),
                len: to - from,
                unwritten,
            };
            if s < m0 {
                out.push(piece(s, m0, true));
            }
            out.push(piece(m0, m1, false));
            if m1 < t {
                out.push(piece(m1, t, true));
            }
        }
        if changed {
            // Merge what the split made adjacent.
            let mut merged: Vec<FileExtent> = Vec::with_capacity(out.len());
            for e in out {
                match merged.last_mut() {
                    Some(l) if Self::mergeable(l, &e) => l.len += e.len,
                    _ => merged.push(e),
                }
            }
            self.exts = merged;
        }
        changed
    }

    /// Drop every block at or past file block `from`; returns the freed runs.
    pub(crate) fn cut(&mut self, from: u64) -> Vec<(u64, u64)> {
        let mut freed = Vec::new();
        self.exts.retain_mut(|e| {
            if e.logical >= from {
                freed.push((e.physical, e.len));
                false
            } else {
                if e.logical + e.len > from {
                    let keep = from - e.logical;
                    freed.push((e.physical + keep, e.len - keep));
                    e.len = keep;
                }
                true
            }
        });
        freed
    }

    /// Rebuild the tree into `inode` and its blocks (see the module docs).
    /// New tree blocks are allocated near `goal`; spare ones go to the freed list.
    pub(crate) fn write(&mut self, op: &mut Op<'_>, inode: &mut Inode, goal: u64) -> Result<()> {
        let fs = op.fs;
        let bs = fs.sb.block_size as usize;
        let per = (bs - 12) / 12;
        let entry = |e: &FileExtent| {
            let mut x = [0u8; 12];
            put32(&mut x, 0, e.logical as u32);
            let len = if e.unwritten { e.len + MAX_INIT } else { e.len };
            put16(&mut x, 4, len as u16);
            put16(&mut x, 6, (e.physical >> 32) as u16);
            put32(&mut x, 8, e.physical as u32);
            x
        };
        if self.exts.iter().any(|e| e.logical + e.len > 1 << 32) {
            return Err(Error::corrupt(
                CorruptKind::ExtentTree,
                format!("inode {}: an extent past block 2^32", inode.ino),
            ));
        }
        // Levels of nodes, leaves first: each node its first logical block and
        // its entries.
        let mut levels: Vec<Vec<(u64, Vec<[u8; 12]>)>> = Vec::new();
        let mut cur: Vec<(u64, [u8; 12])> =
            self.exts.iter().map(|e| (e.logical, entry(e))).collect();
        while cur.len() > 4 {
            let nodes: Vec<(u64, Vec<[u8; 12]>)> = cur
                .chunks(per)
                .map(|c| (c[0].0, c.iter().map(|x| x.1).collect()))
                .collect();
            levels.push(nodes);
            // The next level up: one index entry per node, its block filled in below.
            cur = levels
                .last()
                .expect("pushed")
                .iter()
                .map(|(first, _)| {
                    let mut x = [0u8; 12];
                    put32(&mut x, 0, *first as u32);
                    (*first, x)
                })
                .collect();
        }
        let depth = levels.len();
        if depth > 5 {
            return Err(Error::corrupt(
                CorruptKind::ExtentTree,
                format!("inode {}: too many extents for a tree", inode.ino),
            ));
        }
        // Copy on write: a node whose bytes differ from what its block held goes
        // to a new block, so the old tree stays whole until the inode (one
        // sector) switches to the new one; the blocks left behind are freed after.
        let seed = fs.inode_seed(inode);
        let csum = fs.sb.metadata_csum();
        let old = std::mem::take(&mut self.blocks);
        let mut assigned: Vec<u64> = Vec::new();
        let mut k = 0usize;
        // Blocks of the level below, to fill index entries.
        let mut below: Vec<u64> = Vec::new();
        for (lvl, nodes) in levels.iter().enumerate() {
            let mut these = Vec::with_capacity(nodes.len());
            let mut child = 0usize;
            for (_, ents) in nodes {
                let mut data = vec![0u8; bs];
                put16(&mut data, 0, MAGIC);
                put16(&mut data, 2, ents.len() as u16);
                put16(&mut data, 4, per as u16);
                put16(&mut data, 6, lvl as u16);
                for (i, x) in ents.iter().enumerate() {
                    let at = 12 + i * 12;
                    data[at..at + 12].copy_from_slice(x);
                    if lvl > 0 {
                        let c = below[child];
                        child += 1;
                        put32(&mut data, at + 4, c as u32);
                        put16(&mut data, at + 8, (c >> 32) as u16);
                        put16(&mut data, at + 10, 0);
                    }
                }
                if csum {
                    let t = 12 + per * 12;
                    let c = crc32c(seed, &data[..t]);
                    put32(&mut data, t, c);
                }
                let b = match old.get(k) {
                    Some(&o) if self.written.get(&o) == Some(&data) => o,
                    _ => {
                        let (b, _) = op.alloc()?.alloc_blocks(fs, goal, 1)?;
                        op.tx.put_fresh(b, data.clone());
                        self.written.insert(b, data);
                        b
                    }
                };
                k += 1;
                assigned.push(b);
                these.push(b);
            }
            below = these;
        }
        for o in old {
            if !assigned.contains(&o) {
                op.tx.freed.push((o, 1));
                self.written.remove(&o);
            }
        }
        self.blocks = assigned;
        // The root, in the inode.
        let root = &mut inode.raw[0x28..0x28 + 60];
        root.fill(0);
        put16(root, 0, MAGIC);
        put16(root, 2, cur.len() as u16);
        put16(root, 4, 4);
        put16(root, 6, depth as u16);
        for (i, (_, x)) in cur.iter().enumerate() {
            let at = 12 + i * 12;
            root[at..at + 12].copy_from_slice(x);
            if depth > 0 {
                let c = below[i];
                put32(root, at + 4, c as u32);
                put16(root, at + 8, (c >> 32) as u16);
                put16(root, at + 10, 0);
            }
        }
        Ok(())
    }

    /// i_blocks (512-byte units) for these extents and tree blocks, plus the
    /// inode's extended-attribute block. With bigalloc, whole clusters: the
    /// distinct clusters the data touches, one per tree block and one for the
    /// attribute block.
    pub(crate) fn i_blocks(&self, inode: &Inode, sb: &Superblock) -> u64 {
        let acl = u64::from(inode.file_acl != 0);
        let r = cluster_ratio(sb);
        let units = if r == 1 {
            self.data_blocks() + self.blocks.len() as u64 + acl
        } else {
            self.data_clusters(r) + self.blocks.len() as u64 + acl
        };
        units * (u64::from(sb.block_size) / 512) * r
    }

    /// Distinct clusters of `r` blocks the data touches.
    fn data_clusters(&self, r: u64) -> u64 {
        let mut runs: Vec<(u64, u64)> = self
            .exts
            .iter()
            .map(|e| (e.physical / r, (e.physical + e.len - 1) / r))
            .collect();
        runs.sort_unstable();
        let mut n = 0;
        let mut last: Option<u64> = None;
        for (a, b) in runs {
            let a = match last {
                Some(l) if a <= l => l + 1,
                _ => a,
            };
            if a <= b {
                n += b - a + 1;
            }
            last = Some(last.map_or(b, |l| l.max(b)));
        }
        n
    }

    /// With bigalloc: the device block for file block `logical` when its logical
    /// cluster already has a physical cluster (blocks of one logical cluster
    /// share one physical cluster, at the same offsets).
    pub(crate) fn cluster_slot(&self, logical: u64, r: u64) -> Option<u64> {
        if r == 1 {
            return None;
        }
        let (lo, hi) = (logical - logical % r, logical - logical % r + r);
        let i = self.exts.partition_point(|e| e.logical + e.len <= lo);
        let e = self.exts.get(i).filter(|e| e.logical < hi)?;
        let l = e.logical.max(lo);
        let p = e.physical + (l - e.logical);
        Some(p - p % r + logical % r)
    }
}

/// A new block for file block `logical` of a file mapped by `tree` (None:
/// indirect blocks), near `goal`: with bigalloc, in the physical cluster of the
/// block's logical cluster if the file has it, else at the block's offset in a
/// new cluster.
pub(crate) fn block_for(
    op: &mut Op<'_>,
    tree: Option<&ExtTree>,
    logical: u64,
    goal: u64,
) -> Result<u64> {
    let fs = op.fs;
    let r = cluster_ratio(&fs.sb);
    if let Some(p) = tree.and_then(|t| t.cluster_slot(logical, r)) {
        return Ok(p);
    }
    let (c, _) = op.alloc()?.alloc_blocks(fs, goal, 1)?;
    Ok(c + logical % r)
}

/// Set i_blocks in the raw inode (512-byte units; the huge_file flag is kept off,
/// so at most 2^48 units).
pub(crate) fn set_i_blocks(inode: &mut Inode, v: u64) {
    put32(&mut inode.raw, 0x1C, v as u32);
    put16(&mut inode.raw, 0x74, (v >> 32) as u16);
    inode.blocks_512 = v;
    inode.flags &= !super::inode::flags::HUGE_FILE;
    put32(&mut inode.raw, 0x20, inode.flags);
}

/// Set i_size in the raw inode.
pub(crate) fn set_size(inode: &mut Inode, size: u64) {
    put32(&mut inode.raw, 0x4, size as u32);
    put32(&mut inode.raw, 0x6C, (size >> 32) as u32);
    inode.size = size;
}
