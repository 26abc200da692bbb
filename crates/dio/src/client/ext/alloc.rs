//! The block and inode allocator: block and inode bitmaps, group descriptors (free
//! counts, used directories, `BLOCK_UNINIT`/`INODE_UNINIT`/`ITABLE_ZEROED`,
//! `bg_itable_unused`), the superblock's free counts, and every checksum that
//! covers them (bitmap checksums and descriptor checksums with `metadata_csum`,
//! crc16 descriptor checksums with `gdt_csum`, the superblock's).
//!
//! The allocator keeps its own copy of the descriptor table, of the primary
//! superblock's fs block and of every bitmap it has touched. A change edits that
//! copy and puts the whole changed fs blocks into the operation's transaction
//! ([`Tx`]); nothing is written here. When an operation fails before its commit,
//! the caller drops the allocator ([`super::Fs::reset_alloc`]) and the next one
//! reads the disk again, so a refused operation (ENOSPC) leaves nothing behind.
//!
//! Uninitialised groups (`uninit_bg`, `metadata_csum`): a `BLOCK_UNINIT` group's
//! bitmap is built from the group's metadata (superblock backup, descriptor blocks,
//! reserved descriptor blocks, and every group's bitmaps and inode table that lie
//! in it, which covers `flex_bg`), with the padding past the group's last cluster
//! set, as the kernel's `ext4_init_block_bitmap` builds it; an `INODE_UNINIT`
//! group's inode bitmap starts empty (padding set).

use std::collections::HashMap;

use super::bytes::{crc16, crc32c, le16, le32, put16, put32};
use super::group::descriptor_block;
use super::superblock::{incompat, ro_compat, Superblock, SUPERBLOCK_OFFSET};
use super::tx::Tx;
use super::Fs;
use crate::error::CorruptKind;
use crate::{Error, Result};

const INODE_UNINIT: u16 = 0x1;
const BLOCK_UNINIT: u16 = 0x2;

fn le16_hi(d: &[u8], lo: usize, hi: usize, wide: bool) -> u64 {
    u64::from(le16(d, lo))
        | if wide {
            u64::from(le16(d, hi)) << 16
        } else {
            0
        }
}

fn le32_hi(d: &[u8], lo: usize, hi: usize, wide: bool) -> u64 {
    u64::from(le32(d, lo))
        | if wide {
            u64::from(le32(d, hi)) << 32
        } else {
            0
        }
}

/// The allocator's state (see the module docs).
pub(crate) struct Alloc {
    /// The descriptor table's fs blocks: device block and bytes.
    gdt: Vec<(u64, Vec<u8>)>,
    /// The fs block holding the primary superblock, and the superblock's offset in it.
    sb_block: (u64, Vec<u8>),
    sb_off: usize,
    /// Bitmaps read or built so far, by group.
    bbitmap: HashMap<u32, Vec<u8>>,
    ibitmap: HashMap<u32, Vec<u8>>,
    /// Groups whose descriptor, block bitmap or inode bitmap changed since the last
    /// `flush_into`.
    dirty_desc: Vec<u32>,
    dirty_bb: Vec<u32>,
    dirty_ib: Vec<u32>,
    sb_dirty: bool,
    wide: bool,
    ds: usize,
    per_block: u32,
    /// Blocks per cluster (1 unless bigalloc).
    ratio: u64,
    /// Clusters freed by the operation being committed (bigalloc: blocks of one
    /// file share clusters, so two freed runs may name the same one).
    freed_clusters: std::collections::HashSet<u64>,
    /// Whether the inode `alloc_inode` gave out last lies past the part of its
    /// group's table that was ever used (`bg_itable_unused`), where the table
    /// may hold anything (lazy_itable_init).
    pub(crate) fresh_slot: bool,
}

impl Alloc {
    /// Read the descriptor table and the superblock block.
    pub(crate) fn load(fs: &Fs) -> Result<Alloc> {
        let sb = &fs.sb;
        let bs = sb.block_size as usize;
        let ds = usize::from(sb.desc_size);
        let per_block = (bs / ds) as u32;
        let nblocks = sb.groups.div_ceil(per_block);
        let mut gdt = Vec::new();
        for nr in 0..nblocks {
            let b = descriptor_block(sb, nr, per_block);
            gdt.push((b, fs.read_block(b, "group descriptor block")?));
        }
        let sbb = SUPERBLOCK_OFFSET / bs as u64;
        let sb_off = (SUPERBLOCK_OFFSET % bs as u64) as usize;
        let sb_block = (sbb, fs.read_block(sbb, "superblock block")?);
        Ok(Alloc {
            gdt,
            sb_block,
            sb_off,
            bbitmap: HashMap::new(),
            ibitmap: HashMap::new(),
            dirty_desc: Vec::new(),
            dirty_bb: Vec::new(),
            dirty_ib: Vec::new(),
            sb_dirty: false,
            wide: ds >= 64,
            ds,
            per_block,
            ratio: cluster_ratio(sb),
            freed_clusters: std::collections::HashSet::new(),
            fresh_slot: false,
        })
    }

    fn desc(&self, g: u32) -> &[u8] {
        let (nr, i) = ((g / self.per_block) as usize, (g % self.per_block) as usize);
        &self.gdt[nr].1[i * self.ds..(i + 1) * self.ds]
    }

    fn desc_mut(&mut self, g: u32) -> &mut [u8] {
        if !self.dirty_desc.contains(&g) {
            self.dirty_desc.push(g);
        }
        let (nr, i) = ((g / self.per_block) as usize, (g % self.per_block) as usize);
        &mut self.gdt[nr].1[i * self.ds..(i + 1) * self.ds]
    }

    fn block_bitmap_at(&self, g: u32) -> u64 {
        le32_hi(self.desc(g), 0x0, 0x20, self.wide)
    }
    fn inode_bitmap_at(&self, g: u32) -> u64 {
        le32_hi(self.desc(g), 0x4, 0x24, self.wide)
    }
    fn inode_table_at(&self, g: u32) -> u64 {
        le32_hi(self.desc(g), 0x8, 0x28, self.wide)
    }
    fn flags(&self, g: u32) -> u16 {
        le16(self.desc(g), 0x12)
    }
    fn set_flags(&mut self, g: u32, f: u16) {
        put16(self.desc_mut(g), 0x12, f);
    }
    pub(crate) fn free_blocks_in(&self, g: u32) -> u64 {
        le16_hi(self.desc(g), 0xC, 0x2C, self.wide)
    }
    fn free_inodes_in(&self, g: u32) -> u64 {
        le16_hi(self.desc(g), 0xE, 0x2E, self.wide)
    }
    fn used_dirs_in(&self, g: u32) -> u64 {
        le16_hi(self.desc(g), 0x10, 0x30, self.wide)
    }
    fn itable_unused(&self, g: u32) -> u64 {
        le16_hi(self.desc(g), 0x1C, 0x32, self.wide)
    }
    fn set16(&mut self, g: u32, lo: usize, hi: usize, v: u64) {
        let wide = self.wide;
        let d = self.desc_mut(g);
        put16(d, lo, v as u16);
        if wide {
            put16(d, hi, (v >> 16) as u16);
        }
    }

    fn sb_get_free_blocks(&self, sb: &Superblock) -> u64 {
        let b = &self.sb_block.1[self.sb_off..];
        u64::from(le32(b, 0x0C))
            | if sb.has_incompat(incompat::BIT64) {
                u64::from(le32(b, 0x158)) << 32
            } else {
                0
            }
    }
    fn sb_set_free_blocks(&mut self, sb: &Superblock, v: u64) {
        let off = self.sb_off;
        let b = &mut self.sb_block.1[off..];
        put32(b, 0x0C, v as u32);
        if sb.has_incompat(incompat::BIT64) {
            put32(b, 0x158, (v >> 32) as u32);
        }
        self.sb_dirty = true;
    }
    fn sb_free_inodes(&self) -> u32 {
        le32(&self.sb_block.1[self.sb_off..], 0x10)
    }
    fn sb_set_free_inodes(&mut self, v: u32) {
        let off = self.sb_off;
        put32(&mut self.sb_block.1[off..], 0x10, v);
        self.sb_dirty = true;
    }

    /// Blocks at the start of group `g` taken by the superblock backup and the
    /// descriptor table (with its reserved blocks), as e2fsprogs'
    /// `ext2fs_super_and_bgd_loc2` counts them.
    fn base_meta_blocks(sb: &Superblock, g: u32, per_block: u32) -> u64 {
        let has_super = u64::from(sb.group_has_super(g));
        let desc_blocks = u64::from(sb.groups.div_ceil(per_block));
        let meta_bg = sb.has_incompat(incompat::META_BG);
        let old_desc = if meta_bg {
            u64::from(sb.first_meta_bg)
        } else {
            desc_blocks + u64::from(sb.reserved_gdt_blocks)
        };
        let mbg = g / per_block;
        if !meta_bg || mbg < sb.first_meta_bg {
            if has_super != 0 {
                1 + old_desc
            } else {
                0
            }
        } else {
            let r = g % per_block;
            let has_desc = r == 0 || r == 1 || r == per_block - 1;
            has_super + u64::from(has_desc)
        }
    }

    /// The block bitmap of group `g` (read, or built for a `BLOCK_UNINIT` group).
    fn bb(&mut self, fs: &Fs, g: u32) -> Result<&mut Vec<u8>> {
        if !self.bbitmap.contains_key(&g) {
            let sb = &fs.sb;
            let bs = sb.block_size as usize;
            let bm = if self.flags(g) & BLOCK_UNINIT != 0 && sb.csum_groups() {
                let mut bm = vec![0u8; bs];
                let first = sb.group_first_block(g);
                let in_group = self.blocks_in_group(sb, g);
                let r = self.ratio;
                let base = Self::base_meta_blocks(sb, g, self.per_block);
                for i in 0..base.min(in_group) {
                    set_bit(&mut bm, i / r);
                }
                let itable = itable_blocks(sb);
                for h in 0..sb.groups {
                    let mut mark = |b: u64, n: u64| {
                        for x in b..b + n {
                            if x >= first && x < first + in_group {
                                set_bit(&mut bm, (x - first) / r);
                            }
                        }
                    };
                    mark(self.block_bitmap_at(h), 1);
                    mark(self.inode_bitmap_at(h), 1);
                    mark(self.inode_table_at(h), itable);
                }
                for i in in_group.div_ceil(r)..(bs as u64 * 8) {
                    set_bit(&mut bm, i);
                }
                let f = self.flags(g) & !BLOCK_UNINIT;
                self.set_flags(g, f);
                if !self.dirty_bb.contains(&g) {
                    self.dirty_bb.push(g);
                }
                bm
            } else {
                let at = self.block_bitmap_at(g);
                fs.check_blocks(at, 1, 0)
                    .map_err(|_| bad_desc(g, "block bitmap lies outside the file system"))?;
                let bm = fs.read_block(at, "block bitmap")?;
                self.check_block_bitmap(sb, g, &bm)?;
                bm
            };
            self.bbitmap.insert(g, bm);
        }
        Ok(self.bbitmap.get_mut(&g).expect("inserted above"))
    }

    /// The inode bitmap of group `g` (read, or empty for an `INODE_UNINIT` group).
    fn ib(&mut self, fs: &Fs, g: u32) -> Result<&mut Vec<u8>> {
        if !self.ibitmap.contains_key(&g) {
            let sb = &fs.sb;
            let bs = sb.block_size as usize;
            let bm = if self.flags(g) & INODE_UNINIT != 0 && sb.csum_groups() {
                let mut bm = vec![0u8; bs];
                for i in u64::from(sb.inodes_per_group)..(bs as u64 * 8) {
                    set_bit(&mut bm, i);
                }
                let f = self.flags(g) & !INODE_UNINIT;
                self.set_flags(g, f);
                if !self.dirty_ib.contains(&g) {
                    self.dirty_ib.push(g);
                }
                bm
            } else {
                let at = self.inode_bitmap_at(g);
                fs.check_blocks(at, 1, 0)
                    .map_err(|_| bad_desc(g, "inode bitmap lies outside the file system"))?;
                let bm = fs.read_block(at, "inode bitmap")?;
                if sb.metadata_csum() {
                    let n = (sb.inodes_per_group / 8) as usize;
                    let c = crc32c(sb.checksum_seed, &bm[..n]);
                    let lo = le16(self.desc(g), 0x1A);
                    let hi = if self.wide {
                        le16(self.desc(g), 0x3A)
                    } else {
                        0
                    };
                    let (want, got) = if self.wide {
                        (u32::from(lo) | u32::from(hi) << 16, c)
                    } else {
                        (u32::from(lo), c & 0xFFFF)
                    };
                    if want != got {
                        return Err(bad_bitmap(g, "inode", want, got));
                    }
                }
                bm
            };
            self.ibitmap.insert(g, bm);
        }
        Ok(self.ibitmap.get_mut(&g).expect("inserted above"))
    }

    /// Refuse a block bitmap read from disk that cannot be right, before anything
    /// is allocated from it (a block it shows free that is in use would end up
    /// in two files): its checksum with `metadata_csum`, and, as the kernel's
    /// `ext4_valid_block_bitmap`, the bits of the group's own metadata (superblock
    /// backup, descriptors and their reserve, the bitmaps and inode tables that
    /// lie in it) must be set.
    fn check_block_bitmap(&self, sb: &Superblock, g: u32, bm: &[u8]) -> Result<()> {
        if sb.metadata_csum() {
            let n = (sb.clusters_per_group / 8) as usize;
            let c = crc32c(sb.checksum_seed, &bm[..n]);
            let lo = le16(self.desc(g), 0x18);
            let (want, got) = if self.wide && sb.desc_size >= 64 {
                (u32::from(lo) | u32::from(le16(self.desc(g), 0x38)) << 16, c)
            } else {
                (u32::from(lo), c & 0xFFFF)
            };
            if want != got {
                return Err(bad_bitmap(g, "block", want, got));
            }
        }
        let first = sb.group_first_block(g);
        let in_group = self.blocks_in_group(sb, g);
        let r = self.ratio;
        let end = first + in_group;
        // The first block of `[start, start + n)` within this group whose bit
        // is clear (only the part inside the group is looked at, so a group
        // costs O(1) per other group plus its own metadata).
        let unset = |start: u64, n: u64| {
            (start.max(first)..start.saturating_add(n).min(end))
                .find(|&b| !get_bit(bm, (b - first) / r))
        };
        let base = Self::base_meta_blocks(sb, g, self.per_block).min(in_group);
        let itable = itable_blocks(sb);
        let mut missing = unset(first, base);
        for h in 0..sb.groups {
            if missing.is_some() {
                break;
            }
            missing = unset(self.block_bitmap_at(h), 1)
                .or_else(|| unset(self.inode_bitmap_at(h), 1))
                .or_else(|| unset(self.inode_table_at(h), itable));
        }
        match missing {
            Some(b) => Err(Error::corrupt(
                CorruptKind::Bitmap,
                format!("group {g}: the block bitmap shows metadata block {b} free"),
            )),
            None => Ok(()),
        }
    }

    fn blocks_in_group(&self, sb: &Superblock, g: u32) -> u64 {
        let first = sb.group_first_block(g);
        (sb.blocks_count - first).min(u64::from(sb.blocks_per_group))
    }

    /// Allocate up to `want` contiguous blocks, the first free one at or after
    /// `goal` (wrapping around the file system). ENOSPC when none is free.
    /// With bigalloc, whole clusters: the run starts on a cluster and its
    /// length is a multiple of the cluster (`want` rounded up).
    pub(crate) fn alloc_blocks(&mut self, fs: &Fs, goal: u64, want: u64) -> Result<(u64, u64)> {
        let sb = &fs.sb;
        let r = self.ratio;
        let want = want.max(1).div_ceil(r);
        let fdb = u64::from(sb.first_data_block);
        let goal = if goal < fdb || goal >= sb.blocks_count {
            fdb
        } else {
            goal
        };
        let bpg = u64::from(sb.blocks_per_group);
        let g0 = ((goal - fdb) / bpg) as u32;
        for k in 0..=sb.groups {
            let g = (g0 + k) % sb.groups;
            if self.free_blocks_in(g) == 0 {
                continue;
            }
            let start_bit = if k == 0 { (goal - fdb) % bpg / r } else { 0 };
            let n = self.blocks_in_group(sb, g).div_ceil(r);
            let bm = self.bb(fs, g)?;
            let Some(first) = (start_bit..n).find(|&i| !get_bit(bm, i)) else {
                continue;
            };
            let mut len = 1;
            while len < want && first + len < n && !get_bit(bm, first + len) {
                len += 1;
            }
            for i in first..first + len {
                set_bit(bm, i);
            }
            self.take_blocks(sb, g, len as i64);
            return Ok((sb.group_first_block(g) + first * r, len * r));
        }
        Err(Error::NoSpace(format!(
            "no free block left for {want} more block(s)"
        )))
    }

    /// Count `n` clusters (blocks unless bigalloc) taken (negative: given back)
    /// in group `g`: the descriptor counts clusters, the superblock blocks.
    fn take_blocks(&mut self, sb: &Superblock, g: u32, n: i64) {
        let free = self.free_blocks_in(g) as i64 - n;
        self.set16(g, 0xC, 0x2C, free.max(0) as u64);
        if !self.dirty_bb.contains(&g) {
            self.dirty_bb.push(g);
        }
        let total = self.sb_get_free_blocks(sb) as i64 - n * self.ratio as i64;
        self.sb_set_free_blocks(sb, total.max(0) as u64);
    }

    /// Give back `len` blocks from `start`. A block already free is corruption.
    /// With bigalloc, the clusters the run touches (each once per operation:
    /// the caller frees only clusters the file no longer uses).
    pub(crate) fn free_blocks_run(&mut self, fs: &Fs, start: u64, len: u64) -> Result<()> {
        if self.ratio > 1 {
            return self.free_clusters_run(fs, start, len);
        }
        let sb = &fs.sb;
        let fdb = u64::from(sb.first_data_block);
        let bpg = u64::from(sb.blocks_per_group);
        let mut b = start;
        let end = start + len;
        fs.check_blocks(start, len, 0)?;
        while b < end {
            let g = ((b - fdb) / bpg) as u32;
            let first = sb.group_first_block(g);
            let stop = end.min(first + bpg);
            let bm = self.bb(fs, g)?;
            for x in b..stop {
                if !get_bit(bm, x - first) {
                    return Err(Error::corrupt(
                        CorruptKind::Bitmap,
                        format!("block {x} is freed but its bitmap bit is already clear"),
                    ));
                }
                clear_bit(bm, x - first);
            }
            self.take_blocks(sb, g, -((stop - b) as i64));
            b = stop;
        }
        Ok(())
    }

    fn free_clusters_run(&mut self, fs: &Fs, start: u64, len: u64) -> Result<()> {
        let sb = &fs.sb;
        let r = self.ratio;
        let fdb = u64::from(sb.first_data_block);
        let cpg = u64::from(sb.clusters_per_group);
        fs.check_blocks(start, len, 0)?;
        if len == 0 {
            return Ok(());
        }
        for c in (start - fdb) / r..=(start + len - 1 - fdb) / r {
            if !self.freed_clusters.insert(c) {
                continue;
            }
            let g = (c / cpg) as u32;
            let bm = self.bb(fs, g)?;
            if !get_bit(bm, c % cpg) {
                return Err(Error::corrupt(
                    CorruptKind::Bitmap,
                    format!(
                        "cluster {c} (block {}) is freed but its bitmap bit is already clear",
                        c * r + fdb
                    ),
                ));
            }
            clear_bit(bm, c % cpg);
            self.take_blocks(sb, g, -1);
        }
        Ok(())
    }

    /// Allocate an inode: in `goal` group or the next with a free one; for a
    /// directory, in the group with the most free inodes (spreading directories as
    /// Orlov does, without its refinements).
    pub(crate) fn alloc_inode(&mut self, fs: &Fs, goal: u32, dir: bool) -> Result<u32> {
        let sb = &fs.sb;
        let ipg = sb.inodes_per_group;
        let mut order: Vec<u32> = (0..sb.groups).map(|k| (goal + k) % sb.groups).collect();
        if dir {
            order.sort_by_key(|&g| std::cmp::Reverse(self.free_inodes_in(g)));
        }
        for g in order {
            if self.free_inodes_in(g) == 0 {
                continue;
            }
            let first_ino = if g == 0 { sb.first_ino - 1 } else { 0 };
            // A group with inodes but no initialised block bitmap gets one, as the
            // kernel's ext4_new_inode does.
            if self.flags(g) & BLOCK_UNINIT != 0 && sb.csum_groups() {
                self.bb(fs, g)?;
            }
            let bm = self.ib(fs, g)?;
            let Some(i) = (u64::from(first_ino)..u64::from(ipg)).find(|&i| !get_bit(bm, i)) else {
                continue;
            };
            set_bit(bm, i);
            if !self.dirty_ib.contains(&g) {
                self.dirty_ib.push(g);
            }
            let free = self.free_inodes_in(g) - 1;
            self.set16(g, 0xE, 0x2E, free);
            if dir {
                let d = self.used_dirs_in(g) + 1;
                self.set16(g, 0x10, 0x30, d);
            }
            self.fresh_slot = false;
            if sb.csum_groups() {
                let unused = self.itable_unused(g);
                let used_upto = u64::from(ipg).saturating_sub(unused);
                self.fresh_slot = i >= used_upto;
                if i + 1 > used_upto {
                    self.set16(g, 0x1C, 0x32, u64::from(ipg) - (i + 1));
                }
            }
            let total = self.sb_free_inodes().saturating_sub(1);
            self.sb_set_free_inodes(total);
            return Ok(g * ipg + i as u32 + 1);
        }
        Err(Error::NoSpace("no free inode left".into()))
    }

    /// Give back inode `ino`.
    pub(crate) fn free_inode(&mut self, fs: &Fs, ino: u32, dir: bool) -> Result<()> {
        let ipg = fs.sb.inodes_per_group;
        let (g, i) = ((ino - 1) / ipg, u64::from((ino - 1) % ipg));
        let bm = self.ib(fs, g)?;
        if !get_bit(bm, i) {
            return Err(Error::corrupt(
                CorruptKind::Bitmap,
                format!("inode {ino} is freed but its bitmap bit is already clear"),
            ));
        }
        clear_bit(bm, i);
        if !self.dirty_ib.contains(&g) {
            self.dirty_ib.push(g);
        }
        let free = self.free_inodes_in(g) + 1;
        self.set16(g, 0xE, 0x2E, free);
        if dir {
            let d = self.used_dirs_in(g).saturating_sub(1);
            self.set16(g, 0x10, 0x30, d);
        }
        let total = self.sb_free_inodes() + 1;
        self.sb_set_free_inodes(total);
        Ok(())
    }

    /// Set the superblock's free block and inode counts to the sums of the group
    /// descriptors' (the kernel recounts them at mount, e2fsck checks them): a
    /// kernel that crashed leaves the superblock's stale. Whether they changed.
    pub(crate) fn recount_super(&mut self, fs: &Fs) -> bool {
        let sb = &fs.sb;
        let (mut blocks, mut inodes) = (0u64, 0u64);
        for g in 0..sb.groups {
            blocks += self.free_blocks_in(g);
            inodes += self.free_inodes_in(g);
        }
        let changed =
            self.sb_get_free_blocks(sb) != blocks || u64::from(self.sb_free_inodes()) != inodes;
        if changed {
            self.sb_set_free_blocks(sb, blocks);
            self.sb_set_free_inodes(inodes as u32);
            self.sb_dirty = true;
        }
        changed
    }

    /// Set the superblock's `s_last_orphan` (the orphan list's head) in this
    /// operation (see `orphan.rs`).
    /// The head of the orphan list (`s_last_orphan`), as this allocator has it.
    pub(crate) fn last_orphan(&self) -> u32 {
        le32(&self.sb_block.1[self.sb_off..], 0xE8)
    }

    pub(crate) fn set_last_orphan(&mut self, ino: u32) {
        let off = self.sb_off;
        put32(&mut self.sb_block.1[off..], 0xE8, ino);
        self.sb_dirty = true;
    }

    /// Put every changed bitmap, descriptor block and the superblock block into
    /// `tx` (bitmaps first), with their checksums.
    pub(crate) fn flush_into(&mut self, fs: &Fs, tx: &mut Tx) {
        self.freed_clusters.clear();
        let sb = &fs.sb;
        let csum = sb.metadata_csum();
        let bb = std::mem::take(&mut self.dirty_bb);
        for g in bb {
            let Some(bm) = self.bbitmap.get(&g) else {
                continue;
            };
            tx.put_fresh(self.block_bitmap_at(g), bm.clone());
            if csum {
                let n = (sb.clusters_per_group / 8) as usize;
                let c = crc32c(sb.checksum_seed, &bm[..n]);
                let wide = self.wide && sb.desc_size >= 64;
                let d = self.desc_mut(g);
                put16(d, 0x18, c as u16);
                if wide {
                    put16(d, 0x38, (c >> 16) as u16);
                }
            } else {
                self.desc_mut(g);
            }
        }
        let ib = std::mem::take(&mut self.dirty_ib);
        for g in ib {
            let Some(bm) = self.ibitmap.get(&g) else {
                continue;
            };
            tx.put_fresh(self.inode_bitmap_at(g), bm.clone());
            if csum {
                let n = (sb.inodes_per_group / 8) as usize;
                let c = crc32c(sb.checksum_seed, &bm[..n]);
                let wide = self.wide;
                let d = self.desc_mut(g);
                put16(d, 0x1A, c as u16);
                if wide {
                    put16(d, 0x3A, (c >> 16) as u16);
                }
            } else {
                self.desc_mut(g);
            }
        }
        let dd = std::mem::take(&mut self.dirty_desc);
        let mut blocks: Vec<usize> = Vec::new();
        for g in dd {
            let c = desc_checksum(sb, g, self.desc(g));
            if let Some(c) = c {
                put16(self.desc_mut(g), 0x1E, c);
            }
            let nr = (g / self.per_block) as usize;
            if !blocks.contains(&nr) {
                blocks.push(nr);
            }
        }
        self.dirty_desc.clear();
        for nr in blocks {
            let (b, data) = &self.gdt[nr];
            tx.put_fresh(*b, data.clone());
        }
        if self.sb_dirty {
            let off = self.sb_off;
            if csum {
                let c = crc32c(!0, &self.sb_block.1[off..off + 0x3FC]);
                put32(&mut self.sb_block.1[off..], 0x3FC, c);
            }
            tx.put_fresh(self.sb_block.0, self.sb_block.1.clone());
            self.sb_dirty = false;
        }
    }
}

fn bad_bitmap(g: u32, which: &str, want: u32, got: u32) -> Error {
    Error::corrupt(
        CorruptKind::Bitmap,
        format!("group {g}: {which} bitmap checksum {got:#x}, the descriptor says {want:#x}"),
    )
}

fn bad_desc(g: u32, m: &str) -> Error {
    Error::corrupt(CorruptKind::GroupDescriptor, format!("group {g}: {m}"))
}

/// Blocks per cluster (1 unless bigalloc).
pub(crate) fn cluster_ratio(sb: &Superblock) -> u64 {
    u64::from(sb.cluster_size / sb.block_size).max(1)
}

/// Inode-table blocks per group.
pub(crate) fn itable_blocks(sb: &Superblock) -> u64 {
    (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(u64::from(sb.block_size))
}

/// The checksum a descriptor should carry, if the file system has one.
pub(crate) fn desc_checksum(sb: &Superblock, g: u32, d: &[u8]) -> Option<u16> {
    if sb.metadata_csum() {
        let mut c = crc32c(sb.checksum_seed, &g.to_le_bytes());
        c = crc32c(c, &d[..0x1E]);
        c = crc32c(c, &[0, 0]);
        if d.len() > 0x20 {
            c = crc32c(c, &d[0x20..]);
        }
        Some((c & 0xFFFF) as u16)
    } else if sb.has_ro_compat(ro_compat::GDT_CSUM) {
        let mut c = crc16(!0, &sb.uuid);
        c = crc16(c, &g.to_le_bytes());
        c = crc16(c, &d[..0x1E]);
        if d.len() > 0x20 {
            c = crc16(c, &d[0x20..]);
        }
        Some(c)
    } else {
        None
    }
}

fn get_bit(bm: &[u8], i: u64) -> bool {
    bm.get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}
fn set_bit(bm: &mut [u8], i: u64) {
    if let Some(b) = bm.get_mut((i / 8) as usize) {
        *b |= 1 << (i % 8);
    }
}
fn clear_bit(bm: &mut [u8], i: u64) {
    if let Some(b) = bm.get_mut((i / 8) as usize) {
        *b &= !(1 << (i % 8));
    }
}
