//! Names: create regular files, directories and symlinks (fast and slow), unlink
//! files and symlinks, remove empty directories, on linear directories.
//!
//! Each is one [`Op`]: a new inode and its blocks are written first (fresh), a
//! flush, then the directory entry and the parent's inode (linked); a removal
//! drops the name first, then clears the inode (dtime set, no blocks), and frees
//! its blocks and inode last. A name goes into the leaf of a hashed (htree)
//! directory that the index picks for its hash; a full leaf is split (entries
//! sorted by hash, the upper half to a new block, its index entry added, with
//! the collision bit when the halves share a hash, as the kernel's `do_split`);
//! a full root gets a level of index nodes below it, a full node under it is
//! split. Only a full two-level index (a third level needs `large_dir`) refuses
//! a name ("incompatible"), as does any change to an inline-data directory,
//! with nothing written. Removing a name works in linear
//! and htree directories (a leaf entry is merged into the one before it, as the
//! kernel does, which keeps the hash index valid).

use std::sync::Arc;

use super::bytes::{crc32c, le16, le32, put16, put32, u8at};
use super::inode::{flags, FileType, Inode, Timestamp};
use super::map::{read_extent_tree_blocks, FileExtent, Layout};
use super::superblock::{compat, incompat};
use super::tree::{self, ExtTree};
use super::tx::{Op, FRESH, UNLINK};
use super::wmap::{stamp, ExtWriter};
use super::{Ext, Fs};
use crate::error::{CorruptKind, Feature, PathErrorKind};
use crate::map::Mapping;
use crate::{Error, Result};

/// Owner, permissions and times for a new or changed inode; `None` keeps the
/// default (root, 0644 files / 0755 directories / 0777 symlinks, now).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Attrs {
    /// Permission bits (including setuid, setgid, sticky).
    pub mode: Option<u16>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Access time.
    pub atime: Option<Timestamp>,
    /// Modification time.
    pub mtime: Option<Timestamp>,
}

impl Attrs {
    /// No changes: defaults.
    pub fn new() -> Attrs {
        Attrs::default()
    }
    /// With permission bits.
    pub fn mode(mut self, mode: u16) -> Attrs {
        self.mode = Some(mode & 0o7777);
        self
    }
    /// With an owner and group.
    pub fn owner(mut self, uid: u32, gid: u32) -> Attrs {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }
    /// With access and modification times.
    pub fn times(mut self, atime: Timestamp, mtime: Timestamp) -> Attrs {
        self.atime = Some(atime);
        self.mtime = Some(mtime);
        self
    }
}

/// Apply `attrs` to `inode` (ctime becomes now).
pub(crate) fn apply_attrs(inode: &mut Inode, attrs: &Attrs) {
    if let Some(m) = attrs.mode {
        inode.mode = (inode.mode & 0xF000) | (m & 0o7777);
        put16(&mut inode.raw, 0, inode.mode);
    }
    if let Some(u) = attrs.uid {
        inode.uid = u;
        put16(&mut inode.raw, 0x2, u as u16);
        put16(&mut inode.raw, 0x78, (u >> 16) as u16);
    }
    if let Some(g) = attrs.gid {
        inode.gid = g;
        put16(&mut inode.raw, 0x18, g as u16);
        put16(&mut inode.raw, 0x7A, (g >> 16) as u16);
    }
    stamp(inode, false);
    if let Some(t) = attrs.atime {
        inode.set_time(0x8, 0x8C, t);
        inode.atime = t;
    }
    if let Some(t) = attrs.mtime {
        inode.set_time(super::inode::OFF_MTIME, super::inode::OFF_MTIME_EXTRA, t);
        inode.mtime = t;
    }
}

const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;

/// The directory-entry type byte of a file type.
fn type_byte(t: FileType) -> u8 {
    match t {
        FileType::Regular => 1,
        FileType::Directory => 2,
        FileType::CharDevice => 3,
        FileType::BlockDevice => 4,
        FileType::Fifo => 5,
        FileType::Socket => 6,
        FileType::Symlink => 7,
        FileType::Unknown => 0,
    }
}

/// The bytes an entry with a name of `len` bytes takes.
fn rec_size(len: usize) -> usize {
    (8 + len + 3) & !3
}

fn check_name(path: &[u8], name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&0) {
        return Err(Error::path(PathErrorKind::BadName, path));
    }
    if name.len() > 255 {
        return Err(Error::path(PathErrorKind::NameTooLong, path));
    }
    Ok(())
}

/// Split `path` into its parent directory and last name.
fn parent_and_name(path: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let trimmed: &[u8] = {
        let mut p = path;
        while p.len() > 1 && p.last() == Some(&b'/') {
            p = &p[..p.len() - 1];
        }
        p
    };
    let cut = trimmed.iter().rposition(|&c| c == b'/');
    let (parent, name) = match cut {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (&b""[..], trimmed),
    };
    check_name(path, name)?;
    let parent = if parent.is_empty() {
        b"/".to_vec()
    } else {
        parent.to_vec()
    };
    Ok((parent, name.to_vec()))
}

/// A directory being changed: its inode and (extent directories) its tree.
struct DirW {
    inode: Inode,
    tree: Option<ExtTree>,
}

impl DirW {
    fn load(fs: &Arc<Fs>, inode: Inode) -> Result<DirW> {
        if inode.has_flag(flags::INLINE_DATA) {
            return Err(Error::incompatible(
                Feature::InlineData,
                format!(
                    "directory inode {}: changing inline-data directories is not implemented",
                    inode.ino
                ),
            ));
        }
        if inode.has_flag(flags::ENCRYPT) || inode.has_flag(flags::CASEFOLD) {
            return Err(Error::incompatible(
                Feature::Encryption,
                format!("directory inode {}: encrypted or case-folded", inode.ino),
            ));
        }
        let tree = if inode.has_flag(flags::EXTENTS) {
            let (e, b) = read_extent_tree_blocks(fs, &inode)?;
            Some(ExtTree::new(e, b))
        } else {
            None
        };
        Ok(DirW { inode, tree })
    }

    /// The device block of directory block `b`.
    fn block_at(&self, fs: &Arc<Fs>, b: u64) -> Result<Option<u64>> {
        let e = match &self.tree {
            Some(t) => super::map::map_extents(&t.exts, b, 1),
            None => Layout::of(fs, &self.inode)?.map(b, 1)?,
        };
        Ok(match e.mapping {
            Mapping::Mapped(p) => Some(p),
            _ => None,
        })
    }

    fn nblocks(&self, bs: u64) -> u64 {
        self.inode.size / bs
    }
}

/// Recompute a leaf block's checksum tail (metadata_csum), if it has one.
fn seal_leaf(fs: &Fs, dir: &Inode, block: &mut [u8]) {
    if !fs.sb.metadata_csum() {
        return;
    }
    let t = block.len() - 12;
    if le32(block, t) == 0 && le16(block, t + 4) == 12 && u8at(block, t + 7) == 0xDE {
        let c = crc32c(fs.inode_seed(dir), &block[..t]);
        put32(block, t + 8, c);
    }
}

/// A fresh leaf block: `entries` then one empty entry spanning the rest, and the
/// checksum tail.
fn new_leaf(fs: &Fs, dir: &Inode, entries: &[(u32, &[u8], u8)]) -> Vec<u8> {
    let bs = fs.sb.block_size as usize;
    let limit = if fs.sb.metadata_csum() { bs - 12 } else { bs };
    let mut b = vec![0u8; bs];
    let mut pos = 0;
    for (i, (ino, name, t)) in entries.iter().enumerate() {
        let len = if i + 1 == entries.len() {
            limit - pos
        } else {
            rec_size(name.len())
        };
        write_entry(fs, &mut b, pos, *ino, name, *t, len);
        pos += len;
    }
    if entries.is_empty() {
        put16(&mut b, 4, limit as u16);
    }
    if fs.sb.metadata_csum() {
        put16(&mut b, limit + 4, 12);
        b[limit + 7] = 0xDE;
        let c = crc32c(fs.inode_seed(dir), &b[..limit]);
        put32(&mut b, limit + 8, c);
    }
    b
}

fn write_entry(fs: &Fs, b: &mut [u8], pos: usize, ino: u32, name: &[u8], t: u8, len: usize) {
    put32(b, pos, ino);
    put16(b, pos + 4, len as u16);
    if fs.sb.has_incompat(incompat::FILETYPE) {
        b[pos + 6] = name.len() as u8;
        b[pos + 7] = t;
    } else {
        put16(b, pos + 6, name.len() as u16);
    }
    b[pos + 8..pos + 8 + name.len()].copy_from_slice(name);
}

/// One entry as parsed for changing: position, inode, rec_len, name.
struct Ent {
    pos: usize,
    ino: u32,
    rec: usize,
    name: Vec<u8>,
}

fn entries_of(fs: &Fs, ino: u32, b: u64, block: &[u8]) -> Result<Vec<Ent>> {
    let filetype = fs.sb.has_incompat(incompat::FILETYPE);
    let bs = block.len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bs {
        let rec = usize::from(le16(block, pos + 4));
        let rec = if rec == 0 || rec == 65535 {
            65536.min(bs)
        } else {
            rec
        };
        let name_len = if filetype {
            usize::from(u8at(block, pos + 6))
        } else {
            usize::from(le16(block, pos + 6))
        };
        if pos + 8 > bs || rec < 8 || rec % 4 != 0 || pos + rec > bs || 8 + name_len > rec {
            return Err(Error::corrupt(
                CorruptKind::Directory,
                format!("directory inode {ino} block {b}: bad entry at byte {pos}"),
            ));
        }
        out.push(Ent {
            pos,
            ino: le32(block, pos),
            rec,
            name: block[pos + 8..pos + 8 + name_len].to_vec(),
        });
        pos += rec;
    }
    Ok(out)
}

/// Whether `dir` is hashed (htree) as far as writers must care.
fn indexed(fs: &Fs, dir: &Inode) -> bool {
    dir.has_flag(flags::INDEX) && fs.sb.has_compat(compat::DIR_INDEX)
}

/// Add the entry `name` -> `ino` to directory `d` through `op` (its inode is put
/// by the caller).
fn dir_add(op: &mut Op<'_>, d: &mut DirW, name: &[u8], ino: u32, t: u8) -> Result<()> {
    dir_add_in(op, d, name, ino, t, 0)
}

fn dir_add_in(
    op: &mut Op<'_>,
    d: &mut DirW,
    name: &[u8],
    ino: u32,
    t: u8,
    split_done: u32,
) -> Result<()> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    let need = rec_size(name.len());
    let tail = if fs.sb.metadata_csum() { 12 } else { 0 };
    let blocks: Vec<u64> = if indexed(fs, &d.inode) {
        // The one leaf the hash index sends this name to.
        vec![dx_leaf(op, d, name)?]
    } else {
        (0..d.nblocks(bs)).collect()
    };
    for b in blocks.iter().copied() {
        let Some(p) = d.block_at(fs, b)? else {
            continue;
        };
        let mut block = op.read(p, "directory block")?;
        let limit = block.len() - tail;
        for e in entries_of(fs, d.inode.ino, b, &block[..limit])? {
            let used = if e.ino == 0 {
                0
            } else {
                rec_size(e.name.len())
            };
            if e.rec >= used + need {
                if e.ino == 0 {
                    write_entry(fs, &mut block, e.pos, ino, name, t, e.rec);
                } else {
                    put16(&mut block, e.pos + 4, used as u16);
                    write_entry(fs, &mut block, e.pos + used, ino, name, t, e.rec - used);
                }
                seal_leaf(fs, &d.inode, &mut block);
                op.tx.put(p, block);
                return Ok(());
            }
        }
    }
    if indexed(fs, &d.inode) {
        if split_done >= 3 {
            return Err(Error::incompatible(
                Feature::HtreeInsert,
                format!(
                    "directory inode {}: no room for the name in its htree leaf after splits",
                    d.inode.ino
                ),
            ));
        }
        dx_split(op, d, name)?;
        return dir_add_in(op, d, name, ino, t, split_done + 1);
    }
    // A new block at the end.
    let b = d.nblocks(bs);
    let goal = match b.checked_sub(1).map(|x| d.block_at(fs, x)) {
        Some(Ok(Some(p))) => p + 1,
        _ => fs
            .sb
            .group_first_block((d.inode.ino - 1) / fs.sb.inodes_per_group),
    };
    let p = tree::block_for(op, d.tree.as_ref(), b, goal)?;
    let block = new_leaf(fs, &d.inode, &[(ino, name, t)]);
    op.tx.put_fresh(p, block);
    link_block(op, d, b, p)?;
    tree::set_size(&mut d.inode, (b + 1) * bs);
    Ok(())
}

/// The leaf block (logical) of htree directory `d` that holds names hashing
/// like `name`: down the index from the root, the last entry whose hash is at
/// most the name's at each level (the kernel's `dx_probe`).
fn dx_leaf(op: &Op<'_>, d: &DirW, name: &[u8]) -> Result<u64> {
    dx_path(op, d, name).map(|p| p.leaf)
}

/// Where a name's leaf hangs in an htree: the leaf, the index block holding
/// its entry (logical), where that block's count/limit sit, the entry's
/// position, and the name's hash.
struct DxPath {
    leaf: u64,
    parent: u64,
    at: usize,
    pos: usize,
    /// The position taken in the root, and the tree's levels below it.
    root_pos: usize,
    levels: u8,
}

fn dx_path(op: &Op<'_>, d: &DirW, name: &[u8]) -> Result<DxPath> {
    let fs = op.fs;
    let bad = |m: &str| {
        Error::corrupt(
            CorruptKind::HtreeIndex,
            format!("directory inode {}: {m}", d.inode.ino),
        )
    };
    let nblocks = d.nblocks(u64::from(fs.sb.block_size));
    let read = |b: u64| -> Result<Vec<u8>> {
        let p = d
            .block_at(fs, b)?
            .ok_or_else(|| bad("htree block is a hole"))?;
        op.read(p, "htree block")
    };
    let root = read(0)?;
    let version = u8at(&root, 0x1C);
    let info_len = usize::from(u8at(&root, 0x1D));
    let levels = u8at(&root, 0x1E);
    if levels > 2 || info_len != 8 {
        return Err(bad("htree root info is damaged"));
    }
    let Some(target) = super::hash::dirhash(name, version, &fs.sb.hash_seed, fs.sb.unsigned_hash())
    else {
        return Err(Error::incompatible(
            Feature::HtreeHash,
            format!(
                "directory inode {}: htree hash version {version}",
                d.inode.ino
            ),
        ));
    };
    let pick = |block: &[u8], at: usize| -> Result<(u64, usize)> {
        let count = usize::from(le16(block, at + 2));
        let limit = usize::from(le16(block, at));
        if count == 0 || count > limit || at + limit * 8 > block.len() {
            return Err(bad("htree index counts are damaged"));
        }
        let mut pos = 0;
        for i in 1..count {
            if le32(block, at + i * 8) > target {
                break;
            }
            pos = i;
        }
        let c = u64::from(le32(block, at + pos * 8 + 4) & 0x0FFF_FFFF);
        if c == 0 || c >= nblocks {
            return Err(bad("htree points outside the directory"));
        }
        Ok((c, pos))
    };
    let at0 = 0x18 + info_len;
    let (mut b, mut pos) = pick(&root, at0)?;
    let root_pos = pos;
    let (mut parent, mut at) = (0u64, at0);
    for _ in 0..levels {
        let node = read(b)?;
        parent = b;
        at = 8;
        (b, pos) = pick(&node, 8)?;
    }
    Ok(DxPath {
        leaf: b,
        parent,
        at,
        pos,
        root_pos,
        levels,
    })
}

/// Split the full htree leaf on `name`'s path in two (entries sorted by hash,
/// the upper half to a new block at the end of the directory), and add the new
/// leaf to its index block. Refused when that index block is full.
fn dx_split(op: &mut Op<'_>, d: &mut DirW, name: &[u8]) -> Result<()> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    let path = dx_path(op, d, name)?;
    let root = {
        let p = d
            .block_at(fs, 0)?
            .ok_or_else(|| Error::corrupt(CorruptKind::HtreeIndex, "htree root is a hole"))?;
        op.read(p, "htree root")?
    };
    let version = u8at(&root, 0x1C);
    let pp = d
        .block_at(fs, path.parent)?
        .ok_or_else(|| Error::corrupt(CorruptKind::HtreeIndex, "htree index block is a hole"))?;
    let mut index = op.read(pp, "htree index block")?;
    let (limit, count) = (
        usize::from(le16(&index, path.at)),
        usize::from(le16(&index, path.at + 2)),
    );
    if count >= limit {
        // Make room in the index first, then start again from the root.
        dx_grow_index(op, d, &path)?;
        return dx_split(op, d, name);
    }
    let lp = d
        .block_at(fs, path.leaf)?
        .ok_or_else(|| Error::corrupt(CorruptKind::HtreeIndex, "htree leaf is a hole"))?;
    let leaf = op.read(lp, "htree leaf")?;
    let tail = if fs.sb.metadata_csum() { 12 } else { 0 };
    let mut ents: Vec<(u32, u32, Vec<u8>, u8)> = Vec::new();
    for e in entries_of(fs, d.inode.ino, path.leaf, &leaf[..leaf.len() - tail])? {
        if e.ino == 0 {
            continue;
        }
        let h = super::hash::dirhash(&e.name, version, &fs.sb.hash_seed, fs.sb.unsigned_hash())
            .unwrap_or(0);
        let t = if fs.sb.has_incompat(incompat::FILETYPE) {
            leaf[e.pos + 7]
        } else {
            0
        };
        ents.push((h, e.ino, e.name, t));
    }
    if ents.len() < 2 {
        return Err(Error::incompatible(
            Feature::HtreeInsert,
            format!(
                "directory inode {}: an htree leaf too full to split",
                d.inode.ino
            ),
        ));
    }
    ents.sort_by_key(|e| e.0);
    // Split by bytes, not count (the kernel's dx_make_map/do_split): half the
    // space in each leaf.
    let total: usize = ents.iter().map(|e| rec_size(e.2.len())).sum();
    let mut acc = 0;
    let mut mid = ents.len() / 2;
    for (i, e) in ents.iter().enumerate() {
        acc += rec_size(e.2.len());
        if acc * 2 >= total {
            mid = (i + 1).clamp(1, ents.len() - 1);
            break;
        }
    }
    let split_hash = ents[mid].0;
    let continued = ents[mid - 1].0 == split_hash;
    let to_list = |v: &[(u32, u32, Vec<u8>, u8)]| -> Vec<(u32, Vec<u8>, u8)> {
        v.iter().map(|(_, i, n, t)| (*i, n.clone(), *t)).collect()
    };
    let (lo, hi) = (to_list(&ents[..mid]), to_list(&ents[mid..]));
    let refs = |v: &Vec<(u32, Vec<u8>, u8)>| -> Vec<(u32, Vec<u8>, u8)> { v.clone() };
    let lo_b = new_leaf(
        fs,
        &d.inode,
        &refs(&lo)
            .iter()
            .map(|(i, n, t)| (*i, &n[..], *t))
            .collect::<Vec<_>>(),
    );
    let hi_b = new_leaf(
        fs,
        &d.inode,
        &refs(&hi)
            .iter()
            .map(|(i, n, t)| (*i, &n[..], *t))
            .collect::<Vec<_>>(),
    );
    // The new leaf: a fresh block at the end of the directory.
    let nb = d.nblocks(bs);
    let p = tree::block_for(op, d.tree.as_ref(), nb, lp)?;
    op.tx.put_fresh(p, hi_b);
    link_block(op, d, nb, p)?;
    tree::set_size(&mut d.inode, (nb + 1) * bs);
    op.tx.put(lp, lo_b);
    // Its index entry, after the old leaf's.
    let at = path.at;
    let e0 = at + (path.pos + 1) * 8;
    index.copy_within(e0..at + count * 8, e0 + 8);
    put32(&mut index, e0, split_hash | u32::from(continued));
    put32(&mut index, e0 + 4, nb as u32);
    put16(&mut index, at + 2, (count + 1) as u16);
    seal_dx(fs, &d.inode, &mut index, at);
    op.tx.put(pp, index);
    Ok(())
}

/// Recompute an index block's checksum tail (metadata_csum); `at` is where its
/// limit and count sit.
fn seal_dx(fs: &Fs, dir: &Inode, block: &mut [u8], at: usize) {
    if !fs.sb.metadata_csum() {
        return;
    }
    let limit = usize::from(le16(block, at));
    let count = usize::from(le16(block, at + 2));
    let t = at + limit * 8;
    if t + 8 <= block.len() {
        let mut c = crc32c(fs.inode_seed(dir), &block[..at + count * 8]);
        c = crc32c(c, &block[t..t + 4]);
        c = crc32c(c, &[0; 4]);
        put32(block, t + 4, c);
    }
}

/// Room in a full index block on `path`: a full root gets a level below it (its
/// entries move to a new index node); a full node under a root with room is
/// split in two. Deeper trees (large_dir) are refused.
fn dx_grow_index(op: &mut Op<'_>, d: &mut DirW, path: &DxPath) -> Result<()> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    let tail = if fs.sb.metadata_csum() { 8 } else { 0 };
    let node_limit = (fs.sb.block_size as usize - 8 - tail) / 8;
    let full = || {
        Error::incompatible(
            Feature::HtreeInsert,
            format!(
                "directory inode {}: the htree index is full (a third level needs large_dir)",
                d.inode.ino
            ),
        )
    };
    let rp = d
        .block_at(fs, 0)?
        .ok_or_else(|| Error::corrupt(CorruptKind::HtreeIndex, "htree root is a hole"))?;
    let mut root = op.read(rp, "htree root")?;
    let rat = 0x18 + usize::from(u8at(&root, 0x1D));
    let rcount = usize::from(le16(&root, rat + 2));
    let rlimit = usize::from(le16(&root, rat));
    let new_node = |entries: &[u8], count: usize| {
        let mut n = vec![0u8; bs as usize];
        put16(&mut n, 4, bs.min(65535) as u16);
        n[8..8 + entries.len()].copy_from_slice(entries);
        put16(&mut n, 8, node_limit as u16);
        put16(&mut n, 10, count as u16);
        n
    };
    let nb = d.nblocks(bs);
    if path.parent == 0 {
        if path.levels > 0 {
            return Err(full());
        }
        // A new level: the root's entries move to one node.
        let mut node = new_node(&root[rat..rat + rcount * 8], rcount);
        seal_dx(fs, &d.inode, &mut node, 8);
        let p = tree::block_for(op, d.tree.as_ref(), nb, rp)?;
        op.tx.put_fresh(p, node);
        link_block(op, d, nb, p)?;
        tree::set_size(&mut d.inode, (nb + 1) * bs);
        put16(&mut root, rat + 2, 1);
        put32(&mut root, rat + 4, nb as u32);
        root[0x1E] = 1;
        seal_dx(fs, &d.inode, &mut root, rat);
        op.tx.put(rp, root);
        return Ok(());
    }
    // Split the full node under the root.
    if rcount >= rlimit || path.levels != 1 {
        return Err(full());
    }
    let pp = d
        .block_at(fs, path.parent)?
        .ok_or_else(|| Error::corrupt(CorruptKind::HtreeIndex, "htree node is a hole"))?;
    let mut node = op.read(pp, "htree node")?;
    let count = usize::from(le16(&node, 10));
    let mid = count / 2;
    let moved = node[8 + mid * 8..8 + count * 8].to_vec();
    let split_hash = le32(&moved, 0);
    let mut upper = new_node(&moved, count - mid);
    // The first entry's hash field holds limit and count.
    put16(&mut upper, 8, node_limit as u16);
    put16(&mut upper, 10, (count - mid) as u16);
    seal_dx(fs, &d.inode, &mut upper, 8);
    put16(&mut node, 10, mid as u16);
    seal_dx(fs, &d.inode, &mut node, 8);
    let p = tree::block_for(op, d.tree.as_ref(), nb, pp)?;
    op.tx.put_fresh(p, upper);
    link_block(op, d, nb, p)?;
    tree::set_size(&mut d.inode, (nb + 1) * bs);
    op.tx.put(pp, node);
    let e0 = rat + (path.root_pos + 1) * 8;
    root.copy_within(e0..rat + rcount * 8, e0 + 8);
    put32(&mut root, e0, split_hash);
    put32(&mut root, e0 + 4, nb as u32);
    put16(&mut root, rat + 2, (rcount + 1) as u16);
    seal_dx(fs, &d.inode, &mut root, rat);
    op.tx.put(rp, root);
    Ok(())
}

/// Map logical block `b` of `d` to new device block `p` (written).
fn link_block(op: &mut Op<'_>, d: &mut DirW, b: u64, p: u64) -> Result<()> {
    let fs = op.fs;
    match &mut d.tree {
        Some(t) => {
            t.insert(FileExtent {
                logical: b,
                physical: p,
                len: 1,
                unwritten: false,
            });
            let mut inode = d.inode.clone();
            t.write(op, &mut inode, p)?;
            let ib = t.i_blocks(&inode, &fs.sb);
            tree::set_i_blocks(&mut inode, ib);
            d.inode = inode;
        }
        None => {
            if b >= 12 {
                return Err(Error::incompatible(
                    Feature::IndirectAlloc,
                    format!(
                        "inode {}: growing past 12 blocks through indirect blocks is not implemented",
                        d.inode.ino
                    ),
                ));
            }
            put32(&mut d.inode.raw, 0x28 + 4 * b as usize, p as u32);
            let ib = d.inode.blocks_512 + u64::from(fs.sb.block_size / 512);
            tree::set_i_blocks(&mut d.inode, ib);
        }
    }
    Ok(())
}

/// Find `name` in `d` and drop it; returns its inode.
fn dir_remove(op: &mut Op<'_>, d: &DirW, name: &[u8]) -> Result<Option<u32>> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    for b in 0..d.nblocks(bs) {
        let Some(p) = d.block_at(fs, b)? else {
            continue;
        };
        let mut block = op.read(p, "directory block")?;
        let ents = entries_of(fs, d.inode.ino, b, &block)?;
        for (i, e) in ents.iter().enumerate() {
            if e.ino == 0 || e.name != name {
                continue;
            }
            match i.checked_sub(1).map(|j| &ents[j]) {
                Some(prev) => put16(&mut block, prev.pos + 4, (prev.rec + e.rec) as u16),
                None => put32(&mut block, e.pos, 0),
            }
            seal_leaf(fs, &d.inode, &mut block);
            op.tx.put(p, block);
            return Ok(Some(e.ino));
        }
    }
    Ok(None)
}

/// Point the entry `name` of `d` at inode `ino` (type byte `t`).
fn dir_retarget(op: &mut Op<'_>, d: &DirW, name: &[u8], ino: u32, t: u8) -> Result<bool> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    for b in 0..d.nblocks(bs) {
        let Some(p) = d.block_at(fs, b)? else {
            continue;
        };
        let mut block = op.read(p, "directory block")?;
        for e in entries_of(fs, d.inode.ino, b, &block)? {
            if e.ino != 0 && e.name == name {
                put32(&mut block, e.pos, ino);
                if fs.sb.has_incompat(incompat::FILETYPE) {
                    block[e.pos + 7] = t;
                }
                seal_leaf(fs, &d.inode, &mut block);
                op.tx.put(p, block);
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether directory `d` has only `.` and `..`.
fn dir_is_empty(op: &Op<'_>, d: &DirW) -> Result<bool> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    for b in 0..d.nblocks(bs) {
        let Some(p) = d.block_at(fs, b)? else {
            continue;
        };
        let block = op.read(p, "directory block")?;
        for e in entries_of(fs, d.inode.ino, b, &block)? {
            if e.ino != 0 && e.name != b"." && e.name != b".." {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Every block an indirect-mapped inode owns: data and indirect blocks.
fn indirect_blocks(fs: &Arc<Fs>, inode: &Inode) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |b: u64| match out.last_mut() {
        Some(l) if l.0 + l.1 == b => l.1 += 1,
        _ => out.push((b, 1)),
    };
    let ib = inode.i_block();
    fn walk(
        fs: &Arc<Fs>,
        ino: u32,
        b: u64,
        level: u32,
        push: &mut dyn FnMut(u64),
        budget: &mut u64,
    ) -> Result<()> {
        if b == 0 {
            return Ok(());
        }
        fs.check_blocks(b, 1, ino)?;
        *budget = budget.checked_sub(1).ok_or_else(|| {
            Error::corrupt(
                CorruptKind::IndirectBlock,
                format!("inode {ino}: more blocks than the file system has"),
            )
        })?;
        push(b);
        if level == 0 {
            return Ok(());
        }
        let t = fs.read_block(b, "indirect block")?;
        for i in 0..t.len() / 4 {
            walk(fs, ino, u64::from(le32(&t, i * 4)), level - 1, push, budget)?;
        }
        Ok(())
    }
    let mut budget = fs.sb.blocks_count;
    for i in 0..15usize {
        let level = i.saturating_sub(11) as u32;
        walk(
            fs,
            inode.ino,
            u64::from(le32(ib, i * 4)),
            level,
            &mut push,
            &mut budget,
        )?;
    }
    Ok(out)
}

/// Free everything `inode` owns and mark it deleted (the caller frees the inode
/// number with the transaction).
fn release(op: &mut Op<'_>, inode: &mut Inode) -> Result<()> {
    let fs = op.fs;
    let has_blocks = super::map::has_blocks(fs, inode) && !inode.has_flag(flags::INLINE_DATA);
    if has_blocks {
        if inode.has_flag(flags::EXTENTS) {
            let (exts, tblocks) = read_extent_tree_blocks(fs, inode)?;
            for e in exts {
                op.tx.freed.push((e.physical, e.len));
            }
            for b in tblocks {
                op.tx.freed.push((b, 1));
            }
            let mut t = ExtTree::default();
            t.write(op, inode, 0)?;
        } else {
            let runs = indirect_blocks(fs, inode)?;
            op.tx.freed.extend(runs);
            inode.raw[0x28..0x28 + 60].fill(0);
        }
    }
    if inode.file_acl != 0 {
        // The extended-attribute block: freed with its last user, else one
        // reference less (and its checksum again).
        let b = inode.file_acl;
        fs.check_blocks(b, 1, inode.ino)?;
        let mut x = op.read(b, "extended-attribute block")?;
        if le32(&x, 0) != 0xEA02_0000 {
            return Err(Error::corrupt(
                CorruptKind::Inode,
                format!(
                    "inode {}: extended-attribute block {b} has no magic",
                    inode.ino
                ),
            ));
        }
        let refs = le32(&x, 4);
        if refs <= 1 {
            op.tx.freed.push((b, 1));
        } else {
            put32(&mut x, 4, refs - 1);
            if fs.sb.metadata_csum() {
                let mut c = crc32c(fs.sb.checksum_seed, &b.to_le_bytes());
                c = crc32c(c, &x[..0x10]);
                c = crc32c(c, &[0; 4]);
                c = crc32c(c, &x[0x14..]);
                put32(&mut x, 0x10, c);
            }
            op.tx.put_at(UNLINK, b, x);
        }
        inode.file_acl = 0;
        put32(&mut inode.raw, 0x68, 0);
        put16(&mut inode.raw, 0x76, 0);
    }
    tree::set_i_blocks(inode, 0);
    tree::set_size(inode, 0);
    inode.links = 0;
    put16(&mut inode.raw, 0x1A, 0);
    let t = super::now();
    put32(&mut inode.raw, 0x14, t.secs as u32);
    stamp(inode, true);
    Ok(())
}

/// A new inode's bytes.
fn new_inode(fs: &Fs, ino: u32, mode: u16, attrs: &Attrs, extents: bool) -> Result<Inode> {
    let isz = usize::from(fs.sb.inode_size);
    let mut raw = vec![0u8; isz];
    put16(&mut raw, 0, mode);
    put16(&mut raw, 0x1A, 1);
    if isz > 128 {
        put16(&mut raw, 0x80, 32);
    }
    let generation = {
        let t = super::now();
        (t.nsecs ^ (t.secs as u32).rotate_left(13) ^ ino.wrapping_mul(0x9E37_79B9)) | 1
    };
    put32(&mut raw, 0x64, generation);
    let mut flags_v = 0u32;
    if extents {
        flags_v |= flags::EXTENTS;
        put16(&mut raw, 0x28, 0xF30A);
        put16(&mut raw, 0x2A, 0);
        put16(&mut raw, 0x2C, 4);
        put16(&mut raw, 0x2E, 0);
    }
    put32(&mut raw, 0x20, flags_v);
    let mut inode = Inode::parse(ino, raw, false, fs.sb.block_size)?;
    let t = super::now();
    for (off, extra) in [(0x8, 0x8C), (0xC, 0x84), (0x10, 0x88), (0x90, 0x94)] {
        inode.set_time(off, extra, t);
    }
    let a = Attrs {
        mode: attrs.mode,
        uid: Some(attrs.uid.unwrap_or(0)),
        gid: Some(attrs.gid.unwrap_or(0)),
        atime: attrs.atime,
        mtime: attrs.mtime,
    };
    apply_attrs(&mut inode, &a);
    Ok(inode)
}

impl Ext {
    /// The parent directory of `path` (symlinks followed) and the new name.
    fn parent_of(&self, path: &[u8]) -> Result<(Inode, Vec<u8>)> {
        let (parent, name) = parent_and_name(path)?;
        let dir = self.lookup(&parent, true)?;
        if dir.file_type() != FileType::Directory {
            return Err(Error::path(PathErrorKind::NotADirectory, path));
        }
        Ok((dir, name))
    }

    fn exists_in(&self, dir: &Inode, name: &[u8]) -> Result<Option<u32>> {
        Ok(super::dir::Dir::new(&self.fs, dir)?
            .lookup(name)?
            .map(|e| e.inode))
    }

    /// Make a new inode of type `mode` named `path`, with `fill` writing its
    /// blocks; the common part of create, mkdir and symlink.
    fn make(
        &self,
        path: &[u8],
        kind: u16,
        attrs: &Attrs,
        fill: &dyn Fn(&mut Op<'_>, &mut Inode, &Inode) -> Result<()>,
    ) -> Result<Inode> {
        let fs = &self.fs;
        let (parent, name) = self.parent_of(path)?;
        let mut op = Op::begin(fs)?;
        let parent = op.inode(parent.ino)?;
        if self.exists_in(&parent, &name)?.is_some() {
            return Err(Error::path(PathErrorKind::AlreadyExists, path));
        }
        let mut d = DirW::load(fs, parent)?;
        let is_dir = kind == S_IFDIR;
        let pg = (d.inode.ino - 1) / fs.sb.inodes_per_group;
        let ino = op.alloc()?.alloc_inode(fs, pg, is_dir)?;
        let default_mode = match kind {
            S_IFDIR => 0o755,
            S_IFLNK => 0o777,
            _ => 0o644,
        };
        let extents = fs.sb.has_incompat(incompat::EXTENTS);
        let mut inode = new_inode(fs, ino, kind | default_mode, attrs, extents)?;
        fill(&mut op, &mut inode, &d.inode)?;
        op.put_inode_at(FRESH, &mut inode)?;
        dir_add(&mut op, &mut d, &name, ino, type_byte(inode.file_type()))?;
        if is_dir {
            let links = d.inode.links;
            if links < 65000 {
                d.inode.links = links + 1;
                put16(&mut d.inode.raw, 0x1A, links + 1);
            }
        }
        stamp(&mut d.inode, true);
        op.put_inode(&mut d.inode)?;
        op.commit()?;
        Ok(inode)
    }

    /// Create an empty regular file at `path` (an error if the name exists).
    pub fn create(&self, path: &[u8], attrs: &Attrs) -> Result<Inode> {
        self.make(path, S_IFREG, attrs, &|_, _, _| Ok(()))
    }

    /// Make directory `path` (its parent must exist).
    pub fn mkdir(&self, path: &[u8], attrs: &Attrs) -> Result<Inode> {
        let fs = Arc::clone(&self.fs);
        self.make(path, S_IFDIR, attrs, &move |op, inode, parent| {
            let g = (inode.ino - 1) / fs.sb.inodes_per_group;
            let (p, _) = op
                .alloc()?
                .alloc_blocks(&fs, fs.sb.group_first_block(g), 1)?;
            let block = new_leaf(&fs, inode, &[(inode.ino, b".", 2), (parent.ino, b"..", 2)]);
            op.tx.put_fresh(p, block);
            inode.links = 2;
            put16(&mut inode.raw, 0x1A, 2);
            let mut d = DirW {
                inode: inode.clone(),
                tree: inode.has_flag(flags::EXTENTS).then(ExtTree::default),
            };
            link_block(op, &mut d, 0, p)?;
            tree::set_size(&mut d.inode, u64::from(fs.sb.block_size));
            *inode = d.inode;
            Ok(())
        })
    }

    /// Make a symlink at `path` pointing to `target` (fast, in the inode, when
    /// shorter than 60 bytes; else in a block).
    pub fn symlink(&self, target: &[u8], path: &[u8], attrs: &Attrs) -> Result<Inode> {
        let fs = Arc::clone(&self.fs);
        let bs = fs.sb.block_size as usize;
        if target.is_empty() || target.len() >= bs.min(4096) || target.contains(&0) {
            return Err(Error::path(PathErrorKind::NameTooLong, target));
        }
        let target = target.to_vec();
        self.make(path, S_IFLNK, attrs, &move |op, inode, _| {
            if target.len() < 60 {
                inode.flags &= !flags::EXTENTS;
                put32(&mut inode.raw, 0x20, inode.flags);
                let ib = &mut inode.raw[0x28..0x28 + 60];
                ib.fill(0);
                ib[..target.len()].copy_from_slice(&target);
            } else {
                let g = (inode.ino - 1) / fs.sb.inodes_per_group;
                let (p, _) = op
                    .alloc()?
                    .alloc_blocks(&fs, fs.sb.group_first_block(g), 1)?;
                let mut block = vec![0u8; bs];
                block[..target.len()].copy_from_slice(&target);
                op.tx.put_fresh(p, block);
                let mut d = DirW {
                    inode: inode.clone(),
                    tree: inode.has_flag(flags::EXTENTS).then(ExtTree::default),
                };
                link_block(op, &mut d, 0, p)?;
                *inode = d.inode;
            }
            tree::set_size(inode, target.len() as u64);
            Ok(())
        })
    }

    /// Remove the name `path`: with `dir` false a file, symlink or other
    /// non-directory (unlink); with `dir` true an empty directory (rmdir). The
    /// inode and its blocks are freed when its last name goes.
    pub fn remove(&self, path: &[u8], dir: bool) -> Result<()> {
        let fs = &self.fs;
        let (parent, name) = self.parent_of(path)?;
        let mut op = Op::begin(fs)?;
        let parent = op.inode(parent.ino)?;
        let Some(ino) = self.exists_in(&parent, &name)? else {
            return Err(Error::path(PathErrorKind::NotFound, path));
        };
        let mut target = op.inode(ino)?;
        let is_dir = target.file_type() == FileType::Directory;
        match (dir, is_dir) {
            (false, true) => return Err(Error::path(PathErrorKind::IsADirectory, path)),
            (true, false) => return Err(Error::path(PathErrorKind::NotADirectory, path)),
            _ => {}
        }
        if super::lock(&fs.writers).contains(&ino) {
            return Err(Error::Invalid(format!(
                "{}: the file is open for writing",
                String::from_utf8_lossy(path)
            )));
        }
        let mut d = DirW::load(fs, parent)?;
        if is_dir {
            let td = DirW::load(fs, target.clone())?;
            if !dir_is_empty(&op, &td)? {
                return Err(Error::path(PathErrorKind::NotEmpty, path));
            }
        }
        if dir_remove(&mut op, &d, &name)?.is_none() {
            return Err(Error::path(PathErrorKind::NotFound, path));
        }
        if is_dir {
            let links = d.inode.links;
            if links > 2 && links < 65000 {
                d.inode.links = links - 1;
                put16(&mut d.inode.raw, 0x1A, links - 1);
            }
        }
        stamp(&mut d.inode, true);
        op.put_inode(&mut d.inode)?;
        let last = is_dir || target.links <= 1;
        if last {
            release(&mut op, &mut target)?;
            op.tx.freed_inodes.push((ino, is_dir));
        } else {
            target.links -= 1;
            put16(&mut target.raw, 0x1A, target.links);
            stamp(&mut target, false);
        }
        op.put_inode_at(UNLINK, &mut target)?;
        op.commit()
    }

    /// Write a new regular file and name it `path` once its bytes are written:
    /// `fill` gets a writer on a new inode that no directory names yet; when it
    /// returns Ok, the size is synced and the inode takes the name `path`,
    /// replacing a file or symlink of that name (whose inode and blocks are then
    /// freed). When `fill` or anything else fails (ENOSPC), the new inode and its
    /// blocks are freed and `path` is as it was: nothing half-written shows.
    pub fn put_file(
        &self,
        path: &[u8],
        attrs: &Attrs,
        fill: impl FnOnce(&ExtWriter) -> Result<()>,
    ) -> Result<Inode> {
        let fs = &self.fs;
        let (parent, name) = self.parent_of(path)?;
        if let Some(old) = self.exists_in(&parent, &name)? {
            if fs.read_inode(old)?.file_type() == FileType::Directory {
                return Err(Error::path(PathErrorKind::IsADirectory, path));
            }
        }

        // The new inode, named nowhere yet (a crash leaves it for e2fsck's
        // lost+found).
        let inode = {
            let mut op = Op::begin(fs)?;
            let pg = (parent.ino - 1) / fs.sb.inodes_per_group;
            let ino = op.alloc()?.alloc_inode(fs, pg, false)?;
            let extents = fs.sb.has_incompat(incompat::EXTENTS);
            let mut inode = new_inode(fs, ino, S_IFREG | 0o644, attrs, extents)?;
            op.put_inode_at(FRESH, &mut inode)?;
            op.commit()?;
            inode
        };
        let written = (|| {
            let w = self.writer(&inode)?;
            fill(&w)?;
            w.sync()?;
            if attrs.mtime.is_some() || attrs.atime.is_some() {
                w.set_attrs(attrs)?;
            }
            Ok(w.inode())
        })();
        let linked = written.and_then(|inode| {
            self.link_in(path, inode.ino, FileType::Regular)?;
            Ok(inode)
        });
        if linked.is_err() {
            let _ = self.discard(inode.ino);
        }
        linked
    }

    /// Name `path` inode `ino` (of type `t`), replacing a non-directory of that
    /// name (freed when that was its last name).
    fn link_in(&self, path: &[u8], ino: u32, t: FileType) -> Result<()> {
        let fs = &self.fs;
        let (parent, name) = self.parent_of(path)?;
        let mut op = Op::begin(fs)?;
        let parent = op.inode(parent.ino)?;
        let mut d = DirW::load(fs, parent)?;
        match self.exists_in(&d.inode, &name)? {
            Some(old) => {
                let mut old_inode = op.inode(old)?;
                if old_inode.file_type() == FileType::Directory {
                    return Err(Error::path(PathErrorKind::IsADirectory, path));
                }
                if super::lock(&fs.writers).contains(&old) {
                    return Err(Error::Invalid(format!(
                        "{}: the file is open for writing",
                        String::from_utf8_lossy(path)
                    )));
                }
                if !dir_retarget(&mut op, &d, &name, ino, type_byte(t))? {
                    return Err(Error::path(PathErrorKind::NotFound, path));
                }
                if old_inode.links <= 1 {
                    release(&mut op, &mut old_inode)?;
                    op.tx.freed_inodes.push((old, false));
                } else {
                    old_inode.links -= 1;
                    put16(&mut old_inode.raw, 0x1A, old_inode.links);
                    stamp(&mut old_inode, false);
                }
                op.put_inode_at(UNLINK, &mut old_inode)?;
            }
            None => dir_add(&mut op, &mut d, &name, ino, type_byte(t))?,
        }
        stamp(&mut d.inode, true);
        op.put_inode(&mut d.inode)?;
        op.commit()
    }

    /// Free an inode no directory names (and its blocks).
    fn discard(&self, ino: u32) -> Result<()> {
        let fs = &self.fs;
        let mut op = Op::begin(fs)?;
        let mut inode = op.inode(ino)?;
        release(&mut op, &mut inode)?;
        op.tx.freed_inodes.push((ino, false));
        op.put_inode_at(UNLINK, &mut inode)?;
        op.commit()
    }

    /// Open regular file `inode` (extents or indirect blocks) for allocating
    /// writes (grow, fill holes,
    /// truncate). One writer per inode at a time, and not while handles from
    /// [`Ext::open_file`] of it are open (nor can those open while it is).
    pub fn writer(&self, inode: &Inode) -> Result<ExtWriter> {
        let fs = &self.fs;
        let inode = fs.read_inode(inode.ino)?;
        if let Some(e) = super::write_refusal(fs, &inode) {
            return Err(e);
        }
        let open = super::lock(&fs.open)
            .get(&inode.ino)
            .is_some_and(|w| w.strong_count() > 0);
        if open {
            return Err(Error::Invalid(format!(
                "inode {} is open through Ext::open_file: close those handles before writing with Ext::writer",
                inode.ino
            )));
        }
        if !super::lock(&fs.writers).insert(inode.ino) {
            return Err(Error::Invalid(format!(
                "inode {} is already open for writing",
                inode.ino
            )));
        }
        let ino = inode.ino;
        ExtWriter::open(fs, inode).inspect_err(|_| {
            super::lock(&fs.writers).remove(&ino);
        })
    }

    /// Whether allocating changes (create, grow, remove) work on this file
    /// system: `Err` says why not ([`Error::ReadOnly`], or
    /// [`Feature::JournalWrite`] for a journal the writer cannot use).
    pub fn can_allocate(&self) -> Result<()> {
        match super::tx::alloc_refusal(&self.fs) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Free blocks and inodes, as the superblock counts them.
    pub fn free_counts(&self) -> (u64, u32) {
        let raw = self
            .fs
            .io
            .read(
                super::superblock::SUPERBLOCK_OFFSET,
                super::superblock::SUPERBLOCK_SIZE,
                "superblock",
            )
            .unwrap_or_default();
        let hi = if self.fs.sb.has_incompat(incompat::BIT64) {
            u64::from(le32(&raw, 0x158)) << 32
        } else {
            0
        };
        (u64::from(le32(&raw, 0x0C)) | hi, le32(&raw, 0x10))
    }
}
