//! Names: create regular files, directories and symlinks (fast and slow), unlink
//! files and symlinks, remove empty directories.
//!
//! Each is one [`Op`]: a new inode and its blocks are written first (fresh), a
//! flush, then the directory entry and the parent's inode (linked); a removal
//! drops the name first, then clears the inode (dtime set, no blocks), and frees
//! its blocks and inode last.
//!
//! Directories, as the kernel keeps them:
//! - **Linear**: entries in blocks mapped by extents or by direct and indirect
//!   blocks (ext2/3, past 12 blocks through new indirect blocks). When the one
//!   block of a linear directory is full and the file system has dir_index, it
//!   becomes an htree (`make_indexed_dir`).
//! - **Hashed (htree)**: a name goes into the leaf the index picks for its hash;
//!   a full leaf is split (entries sorted by hash, half the bytes to a new
//!   block, its index entry added, with the collision bit when the halves share
//!   a hash, as `do_split`). A full index block is split when its parent has
//!   room; a full root gets a level below it, up to two index levels, three with
//!   `large_dir`; past that the name is refused with ENOSPC ("directory index
//!   full", as the kernel). Link counts follow `dir_nlink` (1 past 65,000).
//! - **Inline** (`inline_data`): new directories are made inline when the
//!   inode has room for the `system.data` xattr, as the kernel does; entries go
//!   into i_block and the xattr's value; a name that fits in neither turns the
//!   directory into a one-block directory (`ext4_convert_inline_dir`; the
//!   kernel would first grow the xattr value).
//!
//! Removing a name merges its entry into the one before it, else marks it
//! unused (the kernel's `ext4_generic_delete_entry`), which keeps a hash index
//! valid.

use std::sync::Arc;

use super::bytes::{crc32c, le16, le32, put16, put32, u8at};
use super::inode::{flags, FileType, Inode, Timestamp};
use super::map::{read_extent_tree_blocks, FileExtent};
use super::superblock::{compat, incompat};
use super::tree::{self, ExtTree};
use super::tx::{Op, FRESH, LATE, LINK, UNLINK};
use super::wmap::{stamp, ExtWriter};
use super::{Ext, Fs};
use crate::error::{CorruptKind, Feature, PathErrorKind};
use crate::map::Mapping;
use crate::{Error, Result};

/// One new regular file for [`Ext::put_files`]: where it goes, its owner,
/// mode and times, and all its bytes.
#[derive(Debug, Clone, Copy)]
pub struct NewFile<'a> {
    /// The new file's path (its parent directory exists).
    pub path: &'a [u8],
    /// Mode, owner and times (`None`s as for [`Ext::create`]).
    pub attrs: &'a Attrs,
    /// The file's bytes.
    pub data: &'a [u8],
}

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
    /// Change time (else now).
    pub ctime: Option<Timestamp>,
    /// Creation time (where the inode has room for it; else now).
    pub crtime: Option<Timestamp>,
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
    /// With change and creation times (as `mke2fs -d` keeps them).
    pub fn change_times(mut self, ctime: Timestamp, crtime: Option<Timestamp>) -> Attrs {
        self.ctime = Some(ctime);
        self.crtime = crtime;
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
    if let Some(t) = attrs.ctime {
        inode.set_time(super::inode::OFF_CTIME, super::inode::OFF_CTIME_EXTRA, t);
        inode.ctime = t;
    }
    if let Some(t) = attrs.crtime {
        // i_crtime and its extra word: only inside the inode's extra space.
        if inode.raw.len() >= 0x98 && 0x98 <= 128 + usize::from(le16(&inode.raw, 0x80)) {
            inode.set_time(0x90, 0x94, t);
        }
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
        if inode.has_flag(flags::ENCRYPT) || inode.has_flag(flags::CASEFOLD) {
            return Err(Error::incompatible(
                Feature::Encryption,
                format!("directory inode {}: encrypted or case-folded", inode.ino),
            ));
        }
        let tree = if inode.has_flag(flags::EXTENTS) && !inode.has_flag(flags::INLINE_DATA) {
            let (e, b) = read_extent_tree_blocks(fs, &inode)?;
            Some(ExtTree::new(e, b))
        } else {
            None
        };
        Ok(DirW { inode, tree })
    }

    /// The device block of directory block `b`, as `op` sees the tables.
    fn block_at(&self, op: &Op<'_>, b: u64) -> Result<Option<u64>> {
        if self.inode.has_flag(flags::INLINE_DATA) {
            return Ok(None);
        }
        match &self.tree {
            Some(t) => Ok(match super::map::map_extents(&t.exts, b, 1).mapping {
                Mapping::Mapped(p) => Some(p),
                _ => None,
            }),
            None => ind_map(op, &self.inode, b),
        }
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
/// by the caller). An inline directory takes it in the inode while there is
/// room, else becomes a block directory first; a linear directory whose one
/// block is full becomes an htree (dir_index), as the kernel's
/// `make_indexed_dir`; a full htree leaf is split.
fn dir_add(op: &mut Op<'_>, d: &mut DirW, name: &[u8], ino: u32, t: u8) -> Result<()> {
    if d.inode.has_flag(flags::INLINE_DATA) {
        if inline_add(op, d, name, ino, t)? {
            return Ok(());
        }
        inline_to_block(op, d)?;
    }
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    let need = rec_size(name.len());
    let tail = if fs.sb.metadata_csum() { 12 } else { 0 };
    for round in 0.. {
        let blocks: Vec<u64> = if indexed(fs, &d.inode) {
            // The one leaf the hash index sends this name to.
            vec![dx_path(op, d, name)?.leaf]
        } else {
            (0..d.nblocks(bs)).collect()
        };
        for b in blocks.iter().copied() {
            let Some(p) = d.block_at(op, b)? else {
                continue;
            };
            let mut block = op.read(p, "directory block")?;
            let limit = block.len() - tail;
            if insert_in_area(fs, d.inode.ino, b, &mut block[..limit], name, ino, t, need)? {
                seal_leaf(fs, &d.inode, &mut block);
                put_dir_block(op, p, block);
                return Ok(());
            }
        }
        if indexed(fs, &d.inode) {
            if round >= 3 {
                return Err(Error::incompatible(
                    Feature::HtreeInsert,
                    format!(
                        "directory inode {}: no room for the name in its htree leaf after splits",
                        d.inode.ino
                    ),
                ));
            }
            dx_split(op, d, name)?;
            continue;
        }
        if d.nblocks(bs) == 1 && make_indexed(op, d)? {
            continue;
        }
        // A new block at the end.
        let b = d.nblocks(bs);
        let goal = dir_goal(op, d)?;
        let p = tree::block_for(op, d.tree.as_ref(), b, goal)?;
        let block = new_leaf(fs, &d.inode, &[(ino, name, t)]);
        op.tx.put_fresh(p, block);
        link_block(op, d, b, p)?;
        tree::set_size(&mut d.inode, (b + 1) * bs);
        return Ok(());
    }
    unreachable!("the loop returns")
}

/// Put directory block `p` (a leaf or an index block changed in place) into
/// `op`: linked, or at the later stage at which this operation or the open
/// batch already holds it (a block a split trims, see [`dx_split`]: bytes
/// changed on top of the trimmed ones must not reach the disk before the
/// trim's stage, when the entries it drops are reachable elsewhere). A block
/// still fresh (new in this operation or batch: nothing on disk points to it)
/// stays fresh: what it holds counts only once it is linked.
fn put_dir_block(op: &mut Op<'_>, p: u64, block: Vec<u8>) {
    put_dir_at(op, LINK, p, block);
}

/// Put directory block `p` at `stage` or later, as [`put_dir_block`].
fn put_dir_at(op: &mut Op<'_>, stage: usize, p: u64, block: Vec<u8>) {
    let stage = match op.stage_of(p) {
        Some(FRESH) => FRESH,
        Some(s) => s.max(stage),
        None => stage,
    };
    op.tx.put_at(stage, p, block);
}

/// Put the entry into the first entry of `area` with room for it (a free
/// entry, or the slack behind a live one). Returns false when none has room.
#[allow(clippy::too_many_arguments)]
fn insert_in_area(
    fs: &Fs,
    dino: u32,
    b: u64,
    area: &mut [u8],
    name: &[u8],
    ino: u32,
    t: u8,
    need: usize,
) -> Result<bool> {
    for e in entries_of(fs, dino, b, area)? {
        let used = if e.ino == 0 {
            0
        } else {
            rec_size(e.name.len())
        };
        if e.rec >= used + need {
            if e.ino == 0 {
                write_entry(fs, area, e.pos, ino, name, t, e.rec);
            } else {
                put16(area, e.pos + 4, used as u16);
                write_entry(fs, area, e.pos + used, ino, name, t, e.rec - used);
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Where a new block of `d` goes: after its last block (the kernel's goal for
/// `ext4_append`), else at the start of its inode's group.
fn dir_goal(op: &Op<'_>, d: &DirW) -> Result<u64> {
    let fs = op.fs;
    let n = d.nblocks(u64::from(fs.sb.block_size));
    if let Some(last) = n.checked_sub(1) {
        if let Some(p) = d.block_at(op, last)? {
            return Ok(p + 1);
        }
    }
    Ok(fs
        .sb
        .group_first_block((d.inode.ino - 1) / fs.sb.inodes_per_group))
}

/// The type byte of the entry at `pos` of a block.
fn entry_type(fs: &Fs, block: &[u8], pos: usize) -> u8 {
    if fs.sb.has_incompat(incompat::FILETYPE) {
        block[pos + 7]
    } else {
        0
    }
}

/// The highest htree index level (below the root) the file system allows:
/// 2 with large_dir, else 1 (the kernel's `ext4_dir_htree_level` - 1).
fn max_indirect_levels(fs: &Fs) -> u8 {
    if fs.sb.has_incompat(incompat::LARGEDIR) {
        2
    } else {
        1
    }
}

/// Turn the full one-block linear directory `d` into an htree, as the
/// kernel's `make_indexed_dir`: block 0 becomes the dx root (`.`, `..`
/// spanning the rest, the root info and one index entry), its other entries
/// move to a new leaf, block 1. The caller then splits that leaf as needed.
/// Returns false (the directory stays linear) without dir_index, or with a
/// default hash the kernel does not index with.
///
/// **Write order without a journal** (the stages of `tx`; this one and
/// [`dx_split`] and [`dx_make_room`] follow one rule: a block never loses an
/// entry before a copy of it is reachable elsewhere). Fresh: the new leaf with
/// copies of block 0's entries. Linked: the inode (INDEX flag, size, the
/// pointer to block 1). Late: block 0 rewritten as the root. A crash before
/// the late stage leaves every name in block 0 (and maybe in block 1 too);
/// `e2fsck -fy` (1.47) then says "HTREE directory inode has an invalid root
/// node. Clear HTree index", rebuilds the directory (pass 3A) and clears the
/// duplicate entries ("Duplicate entry ... found. Clear", link counts fixed):
/// every name once. The INDEX flag goes with the inode, not with the root, on
/// purpose: a linear directory holding a name twice is not rebuilt by
/// e2fsck, which would keep both and raise the link count. A name must never
/// be in three places either: e2fsck clears one duplicate of a name and
/// renames the third ("~0"); so a block still fresh (here block 1, when the
/// caller splits it in the same operation or batch) is changed in place at
/// the fresh stage instead of trimmed late (see [`put_dir_at`]). The crash
/// tests in `dio-crash/tests/ext_dirgrow.rs` replay every stage.
fn make_indexed(op: &mut Op<'_>, d: &mut DirW) -> Result<bool> {
    let fs = op.fs;
    if !fs.sb.has_compat(compat::DIR_INDEX) || fs.sb.def_hash_version > super::hash::TEA {
        return Ok(false);
    }
    let bs = fs.sb.block_size as usize;
    let tail = if fs.sb.metadata_csum() { 12 } else { 0 };
    let p0 = d.block_at(op, 0)?.ok_or_else(|| {
        Error::corrupt(
            CorruptKind::Directory,
            format!("directory inode {}: block 0 is a hole", d.inode.ino),
        )
    })?;
    let block = op.read(p0, "directory block")?;
    let ents = entries_of(fs, d.inode.ino, 0, &block[..bs - tail])?;
    if ents.len() < 2 || ents[0].name != b"." || ents[1].name != b".." {
        return Err(Error::corrupt(
            CorruptKind::Directory,
            format!(
                "directory inode {}: block 0 does not start with . and ..",
                d.inode.ino
            ),
        ));
    }
    let rest: Vec<(u32, Vec<u8>, u8)> = ents[2..]
        .iter()
        .filter(|e| e.ino != 0)
        .map(|e| (e.ino, e.name.clone(), entry_type(fs, &block, e.pos)))
        .collect();
    let leaf = new_leaf(
        fs,
        &d.inode,
        &rest
            .iter()
            .map(|(i, n, t)| (*i, &n[..], *t))
            .collect::<Vec<_>>(),
    );
    let mut root = vec![0u8; bs];
    write_entry(
        fs,
        &mut root,
        0,
        ents[0].ino,
        b".",
        entry_type(fs, &block, 0),
        12,
    );
    write_entry(
        fs,
        &mut root,
        12,
        ents[1].ino,
        b"..",
        entry_type(fs, &block, ents[1].pos),
        bs - 12,
    );
    if bs >= 65536 {
        put16(&mut root, 16, 65535);
    }
    root[0x1C] = fs.sb.def_hash_version;
    root[0x1D] = 8;
    let csum_tail = if fs.sb.metadata_csum() { 8 } else { 0 };
    put16(&mut root, 0x20, ((bs - 0x20 - csum_tail) / 8) as u16);
    put16(&mut root, 0x22, 1);
    put32(&mut root, 0x24, 1);
    d.inode.flags |= flags::INDEX;
    put32(&mut d.inode.raw, 0x20, d.inode.flags);
    seal_dx(fs, &d.inode, &mut root, 0x20);
    let goal = dir_goal(op, d)?;
    let p1 = tree::block_for(op, d.tree.as_ref(), 1, goal)?;
    op.tx.put_fresh(p1, leaf);
    link_block(op, d, 1, p1)?;
    tree::set_size(&mut d.inode, 2 * bs as u64);
    put_dir_at(op, LATE, p0, root);
    Ok(true)
}

/// One index block on a name's path through an htree: its logical block,
/// where its limit and count sit, the entry taken, its count and limit.
struct DxLevel {
    b: u64,
    at: usize,
    pos: usize,
    count: usize,
    limit: usize,
}

/// A name's path through an htree: the index blocks from the root down, and
/// the leaf (logical).
struct DxPath {
    levels: Vec<DxLevel>,
    leaf: u64,
}

fn dx_bad(d: &DirW, m: &str) -> Error {
    Error::corrupt(
        CorruptKind::HtreeIndex,
        format!("directory inode {}: {m}", d.inode.ino),
    )
}

/// Read index or leaf block `b` of htree `d`: its device block and bytes.
fn dx_read(op: &Op<'_>, d: &DirW, b: u64) -> Result<(u64, Vec<u8>)> {
    let p = d
        .block_at(op, b)?
        .ok_or_else(|| dx_bad(d, "htree block is a hole"))?;
    Ok((p, op.read(p, "htree block")?))
}

/// The path of `name` down the htree of `d`: at each level the last entry
/// whose hash is at most the name's (the kernel's `dx_probe`).
fn dx_path(op: &Op<'_>, d: &DirW, name: &[u8]) -> Result<DxPath> {
    let fs = op.fs;
    let nblocks = d.nblocks(u64::from(fs.sb.block_size));
    let (_, root) = dx_read(op, d, 0)?;
    let version = u8at(&root, 0x1C);
    let info_len = usize::from(u8at(&root, 0x1D));
    let indirect = u8at(&root, 0x1E);
    if info_len != 8 || le32(&root, 0x18) != 0 {
        return Err(dx_bad(d, "htree root info is damaged"));
    }
    if indirect > max_indirect_levels(fs) {
        return Err(dx_bad(
            d,
            &format!(
                "htree has {} index levels, more than the file system allows",
                indirect + 1
            ),
        ));
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
    let pick = |b: u64, block: &[u8], at: usize| -> Result<(DxLevel, u64)> {
        let limit = usize::from(le16(block, at));
        let count = usize::from(le16(block, at + 2));
        if count == 0 || count > limit || at + limit * 8 > block.len() {
            return Err(dx_bad(d, "htree index counts are damaged"));
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
            return Err(dx_bad(d, "htree points outside the directory"));
        }
        Ok((
            DxLevel {
                b,
                at,
                pos,
                count,
                limit,
            },
            c,
        ))
    };
    let mut levels = Vec::new();
    let (lvl, mut child) = pick(0, &root, 0x18 + info_len)?;
    levels.push(lvl);
    for _ in 0..indirect {
        let (_, node) = dx_read(op, d, child)?;
        if le32(&node, 0) != 0 {
            return Err(dx_bad(d, "htree node is not an index block"));
        }
        let (lvl, c) = pick(child, &node, 8)?;
        levels.push(lvl);
        child = c;
    }
    Ok(DxPath {
        levels,
        leaf: child,
    })
}

/// Put the index entry (`hash`, `child`) into index block `block` after
/// position `pos` (the caller checked there is room).
fn dx_insert(block: &mut [u8], at: usize, pos: usize, hash: u32, child: u64) {
    let count = usize::from(le16(block, at + 2));
    let e0 = at + (pos + 1) * 8;
    block.copy_within(e0..at + count * 8, e0 + 8);
    put32(block, e0, hash);
    put32(block, e0 + 4, child as u32);
    put16(block, at + 2, (count + 1) as u16);
}

/// Split the full htree leaf on `name`'s path in two (entries sorted by hash,
/// the upper half by bytes to a new block at the end of the directory, with
/// the collision bit when the halves share a hash, as the kernel's
/// `do_split`), and add the new leaf to its index block, making room in the
/// index first when that block is full.
///
/// Write order without a journal (see [`make_indexed`]): fresh, the new leaf
/// with copies of the upper half; linked, the inode (size, pointer or extent
/// of the new block) and the index entry for it (lookups find the upper half
/// in the new leaf from then on); late, the old leaf without the upper half.
/// Between the linked and late stages the upper half is in both leaves:
/// `e2fsck -fy` says "block #N has bad max hash", clears the index, rebuilds
/// the directory and drops the duplicates. A crash inside the linked stage
/// (index entry without the inode: "bad block number N"; the inode without the
/// entry: "block #N not referenced") is rebuilt the same way, with the old
/// leaf still whole. Names are never only in a block nothing reaches.
fn dx_split(op: &mut Op<'_>, d: &mut DirW, name: &[u8]) -> Result<()> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    // Each round either splits the leaf or makes room one level up; a tree
    // has at most three index levels.
    for _ in 0..8 {
        let path = dx_path(op, d, name)?;
        let bottom = path.levels.last().expect("the root is a level");
        if bottom.count >= bottom.limit {
            dx_make_room(op, d, &path)?;
            continue;
        }
        let (_, root) = dx_read(op, d, 0)?;
        let version = u8at(&root, 0x1C);
        let (pp, mut index) = dx_read(op, d, bottom.b)?;
        let (lp, leaf) = dx_read(op, d, path.leaf)?;
        let tail = if fs.sb.metadata_csum() { 12 } else { 0 };
        let mut ents: Vec<(u32, u32, Vec<u8>, u8)> = Vec::new();
        for e in entries_of(fs, d.inode.ino, path.leaf, &leaf[..leaf.len() - tail])? {
            if e.ino == 0 {
                continue;
            }
            let h = super::hash::dirhash(&e.name, version, &fs.sb.hash_seed, fs.sb.unsigned_hash())
                .unwrap_or(0);
            let t = entry_type(fs, &leaf, e.pos);
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
        // Split by bytes, not count (the kernel's dx_make_map/do_split): half
        // the space in each leaf.
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
        let leaf_of = |v: &[(u32, u32, Vec<u8>, u8)]| {
            let list: Vec<(u32, &[u8], u8)> =
                v.iter().map(|(_, i, n, t)| (*i, &n[..], *t)).collect();
            new_leaf(fs, &d.inode, &list)
        };
        let (lo_b, hi_b) = (leaf_of(&ents[..mid]), leaf_of(&ents[mid..]));
        // The new leaf: a fresh block at the end of the directory.
        let nb = d.nblocks(bs);
        let goal = dir_goal(op, d)?;
        let p = tree::block_for(op, d.tree.as_ref(), nb, goal)?;
        op.tx.put_fresh(p, hi_b);
        link_block(op, d, nb, p)?;
        tree::set_size(&mut d.inode, (nb + 1) * bs);
        put_dir_at(op, LATE, lp, lo_b);
        // Its index entry, after the old leaf's.
        dx_insert(
            &mut index,
            bottom.at,
            bottom.pos,
            split_hash | u32::from(continued),
            nb,
        );
        seal_dx(fs, &d.inode, &mut index, bottom.at);
        put_dir_block(op, pp, index);
        return Ok(());
    }
    Err(dx_bad(d, "htree index keeps needing room"))
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

/// Room in the full bottom index block on `path`, as the kernel's
/// `ext4_dx_add_entry`: the deepest full index node whose parent has room is
/// split in two (the upper half of its entries to a new node, added to the
/// parent); when every level up to the root is full, the root's entries move
/// to a new node below it (one more level), unless the tree has as many
/// levels as the file system allows (two, or three with large_dir): then
/// ENOSPC, "directory index full", as the kernel says.
///
/// Write order without a journal (see [`make_indexed`]): the new node (a
/// copy of the moved index entries) fresh; the inode and the parent's (or the
/// root's) entry for it linked; the split node's shortened count late. Between
/// them leaves are indexed twice: e2fsck says "referenced twice" or "bad max
/// hash", clears the index and rebuilds the directory from its leaves, which
/// an index change never touches, so no name is at stake.
fn dx_make_room(op: &mut Op<'_>, d: &mut DirW, path: &DxPath) -> Result<()> {
    let fs = op.fs;
    let bs = u64::from(fs.sb.block_size);
    let csum_tail = if fs.sb.metadata_csum() { 8 } else { 0 };
    let node_limit = (fs.sb.block_size as usize - 8 - csum_tail) / 8;
    let new_node = |entries: &[u8], count: usize| {
        let mut n = vec![0u8; bs as usize];
        put16(&mut n, 4, bs.min(65535) as u16);
        n[8..8 + entries.len()].copy_from_slice(entries);
        // The first entry's hash field holds limit and count.
        put16(&mut n, 8, node_limit as u16);
        put16(&mut n, 10, count as u16);
        n
    };
    let full = |l: &DxLevel| l.count >= l.limit;
    let mut k = path.levels.len() - 1;
    while k > 0 && full(&path.levels[k]) {
        k -= 1;
    }
    let nb = d.nblocks(bs);
    if full(&path.levels[k]) {
        // Every level is full, the root too: one more level, if allowed.
        let indirect = path.levels.len() - 1;
        if indirect >= usize::from(max_indirect_levels(fs)) {
            return Err(Error::NoSpace(format!(
                "directory inode {}: directory index full ({} htree levels{})",
                d.inode.ino,
                indirect + 1,
                if fs.sb.has_incompat(incompat::LARGEDIR) {
                    ""
                } else {
                    "; a third needs large_dir"
                }
            )));
        }
        let root_l = &path.levels[0];
        let (rp, mut root) = dx_read(op, d, 0)?;
        let mut node = new_node(&root[root_l.at..root_l.at + root_l.count * 8], root_l.count);
        seal_dx(fs, &d.inode, &mut node, 8);
        let goal = dir_goal(op, d)?;
        let p = tree::block_for(op, d.tree.as_ref(), nb, goal)?;
        op.tx.put_fresh(p, node);
        link_block(op, d, nb, p)?;
        tree::set_size(&mut d.inode, (nb + 1) * bs);
        put16(&mut root, root_l.at + 2, 1);
        put32(&mut root, root_l.at + 4, nb as u32);
        root[0x1E] = (indirect + 1) as u8;
        seal_dx(fs, &d.inode, &mut root, root_l.at);
        put_dir_block(op, rp, root);
        return Ok(());
    }
    // Level k has room and the node below it on the path is full: split it.
    let parent = &path.levels[k];
    let child = &path.levels[k + 1];
    let (cp, mut node) = dx_read(op, d, child.b)?;
    let count = child.count;
    let mid = count / 2;
    let moved = node[8 + mid * 8..8 + count * 8].to_vec();
    let split_hash = le32(&moved, 0);
    let mut upper = new_node(&moved, count - mid);
    seal_dx(fs, &d.inode, &mut upper, 8);
    put16(&mut node, 10, mid as u16);
    seal_dx(fs, &d.inode, &mut node, 8);
    let goal = dir_goal(op, d)?;
    let p = tree::block_for(op, d.tree.as_ref(), nb, goal)?;
    op.tx.put_fresh(p, upper);
    link_block(op, d, nb, p)?;
    tree::set_size(&mut d.inode, (nb + 1) * bs);
    put_dir_at(op, LATE, cp, node);
    let (pp, mut pblock) = dx_read(op, d, parent.b)?;
    dx_insert(&mut pblock, parent.at, parent.pos, split_hash, nb);
    seal_dx(fs, &d.inode, &mut pblock, parent.at);
    put_dir_block(op, pp, pblock);
    Ok(())
}

/// Map logical block `b` of `d` to new device block `p` (written): an extent,
/// or a pointer in the inode or an indirect block (new indirect blocks are
/// allocated near `p`, zeroed but for the pointer).
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
            let new_tables = ind_link(op, &mut d.inode, b, p)?;
            let ib = d.inode.blocks_512 + (1 + new_tables) * u64::from(fs.sb.block_size / 512);
            tree::set_i_blocks(&mut d.inode, ib);
        }
    }
    Ok(())
}

/// The i_block slot and the table indices below it of file block `b` of an
/// indirect-mapped inode (`per` pointers a table).
fn ind_path(b: u64, per: u64) -> Option<(usize, Vec<usize>)> {
    if b < 12 {
        return Some((b as usize, vec![]));
    }
    let r = b - 12;
    if r < per {
        return Some((12, vec![r as usize]));
    }
    let r = r - per;
    if r < per * per {
        return Some((13, vec![(r / per) as usize, (r % per) as usize]));
    }
    let r = r - per * per;
    if r < per * per * per {
        return Some((
            14,
            vec![
                (r / (per * per)) as usize,
                ((r / per) % per) as usize,
                (r % per) as usize,
            ],
        ));
    }
    None
}

/// The device block of file block `b` of an indirect-mapped inode, as `op`
/// sees the tables.
fn ind_map(op: &Op<'_>, inode: &Inode, b: u64) -> Result<Option<u64>> {
    let fs = op.fs;
    let per = u64::from(fs.sb.block_size / 4);
    let Some((slot, idx)) = ind_path(b, per) else {
        return Ok(None);
    };
    let mut ptr = u64::from(le32(inode.i_block(), slot * 4));
    for i in idx {
        if ptr == 0 {
            return Ok(None);
        }
        fs.check_blocks(ptr, 1, inode.ino)?;
        let t = op.read(ptr, "indirect block")?;
        ptr = u64::from(le32(&t, i * 4));
    }
    if ptr == 0 {
        return Ok(None);
    }
    fs.check_blocks(ptr, 1, inode.ino)?;
    Ok(Some(ptr))
}

/// Point file block `b` of indirect-mapped `inode` at `p`, allocating the
/// missing indirect blocks (fresh). Returns how many were allocated.
fn ind_link(op: &mut Op<'_>, inode: &mut Inode, b: u64, p: u64) -> Result<u64> {
    let fs = op.fs;
    let per = u64::from(fs.sb.block_size / 4);
    let Some((slot, idx)) = ind_path(b, per) else {
        return Err(Error::NoSpace(format!(
            "directory inode {}: block {b} is past what indirect blocks map",
            inode.ino
        )));
    };
    // The tables on the path: (device block, bytes, new).
    let mut tables: Vec<(u64, Vec<u8>, bool)> = Vec::new();
    let mut ptr = u64::from(le32(inode.i_block(), slot * 4));
    let mut new = 0;
    let bs = fs.sb.block_size as usize;
    for (level, &i) in idx.iter().enumerate() {
        if ptr == 0 {
            let (t, _) = op.alloc()?.alloc_blocks(fs, p, 1)?;
            new += 1;
            match level {
                0 => put32(&mut inode.raw, 0x28 + slot * 4, t as u32),
                _ => {
                    let up = tables.last_mut().expect("a level above");
                    put32(&mut up.1, idx[level - 1] * 4, t as u32);
                }
            }
            tables.push((t, vec![0u8; bs], true));
        } else {
            fs.check_blocks(ptr, 1, inode.ino)?;
            let t = op.read(ptr, "indirect block")?;
            tables.push((ptr, t, false));
        }
        let cur = tables.last().expect("pushed");
        ptr = u64::from(le32(&cur.1, i * 4));
    }
    match tables.last_mut() {
        Some(t) => put32(&mut t.1, idx[idx.len() - 1] * 4, p as u32),
        None => put32(&mut inode.raw, 0x28 + slot * 4, p as u32),
    }
    for (t, bytes, fresh) in tables {
        if fresh {
            op.tx.put_fresh(t, bytes);
        } else {
            op.tx.put(t, bytes);
        }
    }
    Ok(new)
}

/// Put the indirect blocks of new inode `inode` (made by [`ind_link`] in this
/// operation) fresh with all their pointers: a later pointer into a table
/// went in as a linked change.
fn refresh_tables(op: &mut Op<'_>, inode: &Inode) -> Result<()> {
    let mut todo: Vec<(u64, u32)> = (12..15)
        .map(|s| (u64::from(le32(inode.i_block(), s * 4)), (s - 11) as u32))
        .filter(|&(p, _)| p != 0)
        .collect();
    while let Some((t, level)) = todo.pop() {
        let bytes = op.read(t, "indirect block")?;
        if level > 1 {
            for k in 0..bytes.len() / 4 {
                let p = u64::from(le32(&bytes, k * 4));
                if p != 0 {
                    todo.push((p, level - 1));
                }
            }
        }
        op.tx.put_fresh(t, bytes);
    }
    Ok(())
}

/// Write the data of `files` at the device blocks `runs` give (device block,
/// file, file block, blocks): neighbouring runs as one stretch, written in
/// pieces of [`GATHER`] bytes (a buffer each thread keeps for them: no fresh
/// memory per piece), the tail of each file's last block zeroed.
fn write_gathered(
    fs: &Fs,
    files: &[NewFile<'_>],
    runs: &mut [(u64, usize, u64, u64)],
) -> Result<()> {
    thread_local! {
        static SPARE: std::cell::RefCell<Option<crate::AlignedBuf>> = const { std::cell::RefCell::new(None) };
    }
    let bs = u64::from(fs.sb.block_size);
    let align = fs.io.align().max(1);
    let per = (GATHER as u64 / bs).max(1);
    runs.sort_unstable_by_key(|r| r.0);
    let mut i = 0;
    while i < runs.len() {
        // A stretch of neighbouring runs: runs[i..j], device blocks [start, end).
        let start = runs[i].0;
        let mut end = start + runs[i].3;
        let mut j = i + 1;
        while j < runs.len() && runs[j].0 == end {
            end += runs[j].3;
            j += 1;
        }
        let mut k = i;
        let mut p0 = start;
        while p0 < end {
            let p1 = (p0 + per).min(end);
            let len = ((p1 - p0) * bs) as usize;
            let spare = SPARE.with(|c| c.borrow_mut().take());
            let mut buf = match spare {
                Some(b) if b.len() == len && b.align() == align => b,
                _ => crate::AlignedBuf::new(len, align),
            };
            while k < j && runs[k].0 + runs[k].3 <= p0 {
                k += 1;
            }
            for &(p, f, l, n) in &runs[k..j] {
                if p >= p1 {
                    break;
                }
                // The part of this run inside [p0, p1).
                let (a, b) = (p.max(p0), (p + n).min(p1));
                let data = files[f].data;
                let from = (((l + (a - p)) * bs) as usize).min(data.len());
                let to = (((l + (b - p)) * bs) as usize).min(data.len());
                let at = ((a - p0) * bs) as usize;
                let stop = ((b - p0) * bs) as usize;
                buf[at..at + (to - from)].copy_from_slice(&data[from..to]);
                buf[at + (to - from)..stop].fill(0);
            }
            fs.io.write_aligned(p0 * bs, &mut buf, "file data")?;
            if buf.len() == (per * bs) as usize {
                SPARE.with(|c| *c.borrow_mut() = Some(buf));
            }
            p0 = p1;
        }
        i = j;
    }
    Ok(())
}

/// The piece of gathered file data written at a time.
const GATHER: usize = 4 << 20;

/// Where a directory's entries sit: a leaf block (device block), or a range of
/// the inode's raw bytes (inline data: the rest of i_block, or the
/// `system.data` value).
enum Area {
    Block(u64),
    Inline(usize, usize),
}

/// The raw byte range of the `system.data` value of inline inode `inode`
/// (empty when it has none), and where its xattr entry sits.
fn inline_value(inode: &Inode) -> Result<Option<(usize, usize)>> {
    let start = 128 + inode.extra_isize();
    let raw = &inode.raw;
    if start + 4 > raw.len() || le32(raw, start) != 0xEA02_0000 {
        return Ok(None);
    }
    let first = start + 4;
    let mut pos = first;
    let bad = || {
        Error::corrupt(
            CorruptKind::Inode,
            format!("inode {}: in-inode xattrs are damaged", inode.ino),
        )
    };
    while pos + 4 <= raw.len() && le32(raw, pos) != 0 {
        if pos + 16 > raw.len() {
            return Err(bad());
        }
        let name_len = usize::from(u8at(raw, pos));
        let entry_len = (16 + name_len + 3) & !3;
        if pos + entry_len > raw.len() {
            return Err(bad());
        }
        if u8at(raw, pos + 1) == 7 && &raw[pos + 16..pos + 16 + name_len] == b"data" {
            if le32(raw, pos + 4) != 0 {
                return Err(Error::incompatible(
                    Feature::EaInode,
                    format!("inode {}: inline data kept in an EA inode", inode.ino),
                ));
            }
            let v0 = first + usize::from(le16(raw, pos + 2));
            let size = le32(raw, pos + 8) as usize;
            if size == 0 {
                return Ok(Some((v0, 0)));
            }
            if v0 + size > raw.len() || v0 < pos + entry_len {
                return Err(bad());
            }
            return Ok(Some((v0, size)));
        }
        pos += entry_len;
    }
    Ok(None)
}

/// The entry areas of `d`, with their bytes, in the order a name is looked
/// for: for an htree, `name`'s leaf first (then every block, for names that
/// spilled over a hash collision).
fn areas(op: &Op<'_>, d: &DirW, name: Option<&[u8]>) -> Result<Vec<Area>> {
    let fs = op.fs;
    if d.inode.has_flag(flags::INLINE_DATA) {
        let mut v = vec![Area::Inline(0x2C, 56)];
        if let Some((off, len)) = inline_value(&d.inode)? {
            if len > 0 {
                v.push(Area::Inline(off, len));
            }
        }
        return Ok(v);
    }
    let bs = u64::from(fs.sb.block_size);
    let mut out = Vec::new();
    let mut first = None;
    if let (Some(name), true) = (name, indexed(fs, &d.inode)) {
        let leaf = dx_path(op, d, name)?.leaf;
        if let Some(p) = d.block_at(op, leaf)? {
            out.push(Area::Block(p));
            first = Some(p);
        }
    }
    for b in 0..d.nblocks(bs) {
        if let Some(p) = d.block_at(op, b)? {
            if Some(p) != first {
                out.push(Area::Block(p));
            }
        }
    }
    Ok(out)
}

/// The bytes of an area as `op` sees them.
fn area_bytes(op: &Op<'_>, d: &DirW, a: &Area) -> Result<Vec<u8>> {
    match *a {
        Area::Block(p) => op.read(p, "directory block"),
        Area::Inline(off, len) => Ok(d.inode.raw[off..off + len].to_vec()),
    }
}

/// Store the changed bytes of an area (an inline area into the inode, which
/// the caller puts).
fn area_store(op: &mut Op<'_>, d: &mut DirW, a: &Area, mut bytes: Vec<u8>) {
    match *a {
        Area::Block(p) => {
            seal_leaf(op.fs, &d.inode, &mut bytes);
            put_dir_block(op, p, bytes);
        }
        Area::Inline(off, len) => d.inode.raw[off..off + len].copy_from_slice(&bytes),
    }
}

/// A live entry found: its area, the area's bytes and entries, and which one.
type Found = (Area, Vec<u8>, Vec<Ent>, usize);

/// Find the live entry `name` of `d`.
fn find_entry(op: &Op<'_>, d: &DirW, name: &[u8]) -> Result<Option<Found>> {
    // The leaf the index picks holds the name but after a hash collision
    // spilled over: look there before reading every block.
    if indexed(op.fs, &d.inode) && !d.inode.has_flag(flags::INLINE_DATA) {
        if let Some(p) = d.block_at(op, dx_path(op, d, name)?.leaf)? {
            let a = Area::Block(p);
            let bytes = area_bytes(op, d, &a)?;
            let ents = entries_of(op.fs, d.inode.ino, 0, &bytes)?;
            if let Some(i) = ents.iter().position(|e| e.ino != 0 && e.name == name) {
                return Ok(Some((a, bytes, ents, i)));
            }
        }
    }
    for a in areas(op, d, Some(name))? {
        let bytes = area_bytes(op, d, &a)?;
        let ents = entries_of(op.fs, d.inode.ino, 0, &bytes)?;
        if let Some(i) = ents.iter().position(|e| e.ino != 0 && e.name == name) {
            return Ok(Some((a, bytes, ents, i)));
        }
    }
    Ok(None)
}

/// Find `name` in `d` and drop it (merged into the entry before it, else
/// marked unused, as the kernel's `ext4_generic_delete_entry`); returns its
/// inode.
fn dir_remove(op: &mut Op<'_>, d: &mut DirW, name: &[u8]) -> Result<Option<u32>> {
    let Some((a, mut bytes, ents, i)) = find_entry(op, d, name)? else {
        return Ok(None);
    };
    let e = &ents[i];
    match i.checked_sub(1).map(|j| &ents[j]) {
        Some(prev) => put16(&mut bytes, prev.pos + 4, (prev.rec + e.rec) as u16),
        None => put32(&mut bytes, e.pos, 0),
    }
    let ino = e.ino;
    area_store(op, d, &a, bytes);
    Ok(Some(ino))
}

/// Point the entry `name` of `d` at inode `ino` (type byte `t`).
fn dir_retarget(op: &mut Op<'_>, d: &mut DirW, name: &[u8], ino: u32, t: u8) -> Result<bool> {
    let Some((a, mut bytes, ents, i)) = find_entry(op, d, name)? else {
        return Ok(false);
    };
    let pos = ents[i].pos;
    put32(&mut bytes, pos, ino);
    if op.fs.sb.has_incompat(incompat::FILETYPE) {
        bytes[pos + 7] = t;
    }
    area_store(op, d, &a, bytes);
    Ok(true)
}

/// Whether directory `d` has only `.` and `..`.
fn dir_is_empty(op: &Op<'_>, d: &DirW) -> Result<bool> {
    for a in areas(op, d, None)? {
        let bytes = area_bytes(op, d, &a)?;
        for e in entries_of(op.fs, d.inode.ino, 0, &bytes)? {
            if e.ino != 0 && e.name != b"." && e.name != b".." {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Add the entry to inline directory `d` where one of its areas has room
/// (the inode's i_block, then the `system.data` value). Returns false when
/// neither has: the directory must become a block directory. The value is
/// not grown (the kernel grows it first; here the directory goes to a block
/// at once).
fn inline_add(op: &mut Op<'_>, d: &mut DirW, name: &[u8], ino: u32, t: u8) -> Result<bool> {
    let fs = op.fs;
    let need = rec_size(name.len());
    for a in areas(op, d, None)? {
        let mut bytes = area_bytes(op, d, &a)?;
        if insert_in_area(fs, d.inode.ino, 0, &mut bytes, name, ino, t, need)? {
            area_store(op, d, &a, bytes);
            return Ok(true);
        }
    }
    Ok(false)
}

/// Rebuild the in-inode xattr area of `inode` without the entry `system.data`
/// (entries packed after the header, values packed at the end of the inode,
/// each entry keeping its hash), as the kernel's
/// `ext4_destroy_inline_data_nolock` removes it.
fn drop_inline_xattr(inode: &mut Inode) -> Result<()> {
    let start = 128 + inode.extra_isize();
    let end = inode.raw.len();
    if start + 4 > end || le32(&inode.raw, start) != 0xEA02_0000 {
        return Ok(());
    }
    let first = start + 4;
    // (entry header and name bytes, value bytes)
    let mut keep: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut pos = first;
    while pos + 4 <= end && le32(&inode.raw, pos) != 0 {
        let raw = &inode.raw;
        let name_len = usize::from(u8at(raw, pos));
        let entry_len = (16 + name_len + 3) & !3;
        if pos + entry_len > end {
            return Err(Error::corrupt(
                CorruptKind::Inode,
                format!("inode {}: in-inode xattrs are damaged", inode.ino),
            ));
        }
        let is_data = u8at(raw, pos + 1) == 7 && &raw[pos + 16..pos + 16 + name_len] == b"data";
        if !is_data {
            let size = le32(raw, pos + 8) as usize;
            let value = if le32(raw, pos + 4) == 0 && size > 0 {
                let v0 = first + usize::from(le16(raw, pos + 2));
                raw.get(v0..v0 + size)
                    .ok_or_else(|| {
                        Error::corrupt(
                            CorruptKind::Inode,
                            format!("inode {}: an in-inode xattr value runs past it", inode.ino),
                        )
                    })?
                    .to_vec()
            } else {
                Vec::new()
            };
            keep.push((raw[pos..pos + entry_len].to_vec(), value));
        }
        pos += entry_len;
    }
    inode.raw[first..end].fill(0);
    let mut epos = first;
    let mut vend = end;
    for (mut entry, value) in keep {
        if !value.is_empty() {
            vend -= (value.len() + 3) & !3;
            inode.raw[vend..vend + value.len()].copy_from_slice(&value);
            put16(&mut entry, 2, (vend - first) as u16);
        }
        inode.raw[epos..epos + entry.len()].copy_from_slice(&entry);
        epos += entry.len();
    }
    Ok(())
}

/// Turn full inline directory `d` into a block directory, as the kernel's
/// `ext4_convert_inline_dir`: one new leaf holds `.`, `..` (the parent kept
/// in i_block) and every inline entry; the inline-data flag and the
/// `system.data` xattr go, and the inode maps the block (an extent where the
/// file system has them).
fn inline_to_block(op: &mut Op<'_>, d: &mut DirW) -> Result<()> {
    let fs = op.fs;
    let bs = fs.sb.block_size as usize;
    let parent = le32(&d.inode.raw, 0x28);
    let mut list: Vec<(u32, Vec<u8>, u8)> =
        vec![(d.inode.ino, b".".to_vec(), 2), (parent, b"..".to_vec(), 2)];
    for a in areas(op, d, None)? {
        let bytes = area_bytes(op, d, &a)?;
        for e in entries_of(fs, d.inode.ino, 0, &bytes)? {
            if e.ino != 0 {
                list.push((e.ino, e.name, entry_type(fs, &bytes, e.pos)));
            }
        }
    }
    let tail = if fs.sb.metadata_csum() { 12 } else { 0 };
    let used: usize = list.iter().map(|(_, n, _)| rec_size(n.len())).sum();
    if used > bs - tail {
        return Err(Error::incompatible(
            Feature::InlineData,
            format!(
                "directory inode {}: its inline entries do not fit one block",
                d.inode.ino
            ),
        ));
    }
    let leaf = new_leaf(
        fs,
        &d.inode,
        &list
            .iter()
            .map(|(i, n, t)| (*i, &n[..], *t))
            .collect::<Vec<_>>(),
    );
    drop_inline_xattr(&mut d.inode)?;
    d.inode.raw[0x28..0x28 + 60].fill(0);
    d.inode.flags &= !flags::INLINE_DATA;
    if fs.sb.has_incompat(incompat::EXTENTS) {
        d.inode.flags |= flags::EXTENTS;
        put16(&mut d.inode.raw, 0x28, 0xF30A);
        put16(&mut d.inode.raw, 0x2C, 4);
        d.tree = Some(ExtTree::default());
    } else {
        d.inode.flags &= !flags::EXTENTS;
        d.tree = None;
    }
    put32(&mut d.inode.raw, 0x20, d.inode.flags);
    tree::set_size(&mut d.inode, 0);
    let goal = fs
        .sb
        .group_first_block((d.inode.ino - 1) / fs.sb.inodes_per_group);
    let (p, _) = op.alloc()?.alloc_blocks(fs, goal, 1)?;
    op.tx.put_fresh(p, leaf);
    link_block(op, d, 0, p)?;
    tree::set_size(&mut d.inode, bs as u64);
    Ok(())
}

/// Make new directory `inode` (child of `parent`) inline, as the kernel's
/// `ext4_try_create_inline_dir`: the parent in i_block, one unused entry over
/// the other 56 bytes, an empty `system.data` xattr in the inode, i_size 60.
/// Returns false (nothing changed) when the inode has no room for the xattr.
fn make_inline_dir(inode: &mut Inode, parent: u32) -> bool {
    let start = 128 + inode.extra_isize();
    // Header, the entry (16 + "data"), the terminating zero word.
    if inode.raw.len() <= 128 || start + 4 + 20 + 4 > inode.raw.len() {
        return false;
    }
    let raw = &mut inode.raw;
    raw[0x28..0x28 + 60].fill(0);
    put32(raw, 0x28, parent);
    put16(raw, 0x2C + 4, 56);
    raw[start..].fill(0);
    put32(raw, start, 0xEA02_0000);
    let e = start + 4;
    raw[e] = 4;
    raw[e + 1] = 7;
    raw[e + 16..e + 20].copy_from_slice(b"data");
    inode.flags = (inode.flags & !flags::EXTENTS) | flags::INLINE_DATA;
    put32(&mut inode.raw, 0x20, inode.flags);
    tree::set_size(inode, 60);
    tree::set_i_blocks(inode, 0);
    true
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
pub(crate) fn release(op: &mut Op<'_>, inode: &mut Inode) -> Result<()> {
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

/// The kernel's link-count limit of a directory (`EXT4_LINK_MAX`).
const LINK_MAX: u16 = 65000;

/// Refuse a new subdirectory of `d` with EMLINK where the kernel does
/// (`EXT4_DIR_LINK_MAX`): at 65,000 links, unless the file system has
/// dir_nlink and `d` is hashed (then its count goes to 1, "many").
fn check_dir_links(fs: &Fs, d: &DirW, path: &[u8]) -> Result<()> {
    let nlink_ok = fs.sb.has_ro_compat(super::superblock::ro_compat::DIR_NLINK);
    if d.inode.links >= LINK_MAX && !(nlink_ok && indexed(fs, &d.inode)) {
        return Err(Error::path(PathErrorKind::TooManyLinks, path));
    }
    Ok(())
}

/// One more subdirectory in `dir`, as the kernel's `ext4_inc_count`: a hashed
/// directory past 65,000 links (or at 1 already) counts 1.
fn inc_dir_links(fs: &Fs, dir: &mut Inode) {
    let mut n = u32::from(dir.links) + 1;
    if indexed(fs, dir) && (n > u32::from(LINK_MAX) || n == 2) {
        n = 1;
    }
    let n = n.min(u32::from(u16::MAX)) as u16;
    dir.links = n;
    put16(&mut dir.raw, 0x1A, n);
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
        uid: Some(attrs.uid.unwrap_or(0)),
        gid: Some(attrs.gid.unwrap_or(0)),
        ..attrs.clone()
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
        let ino = op.new_inode_no(pg, is_dir)?;
        let default_mode = match kind {
            S_IFDIR => 0o755,
            S_IFLNK => 0o777,
            _ => 0o644,
        };
        let extents = fs.sb.has_incompat(incompat::EXTENTS);
        let mut inode = new_inode(fs, ino, kind | default_mode, attrs, extents)?;
        fill(&mut op, &mut inode, &d.inode)?;
        op.put_inode_at(FRESH, &mut inode)?;
        if is_dir {
            check_dir_links(fs, &d, path)?;
        }
        dir_add(&mut op, &mut d, &name, ino, type_byte(inode.file_type()))?;
        if is_dir {
            inc_dir_links(fs, &mut d.inode);
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

    /// Make directory `path` (its parent must exist). On an `inline_data` file
    /// system it is made inline (its entries in the inode) when the inode has
    /// room for the `system.data` xattr, as the kernel does; it becomes a
    /// block directory when a name no longer fits. A parent at 65,000 links
    /// refuses it ([`PathErrorKind::TooManyLinks`], EMLINK) unless the file
    /// system has `dir_nlink` and the parent is hashed (its count becomes 1).
    pub fn mkdir(&self, path: &[u8], attrs: &Attrs) -> Result<Inode> {
        let fs = Arc::clone(&self.fs);
        self.make(path, S_IFDIR, attrs, &move |op, inode, parent| {
            if fs.sb.has_incompat(incompat::INLINE_DATA) && make_inline_dir(inode, parent.ino) {
                inode.links = 2;
                put16(&mut inode.raw, 0x1A, 2);
                return Ok(());
            }
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

    /// Make a hard link: the new name `path` for the inode `existing` names
    /// (not followed if a symlink). Directories are refused
    /// ([`PathErrorKind::IsADirectory`]), as is an existing `path`. The link
    /// count goes up (and ctime moves) before the name is written, so a crash
    /// leaves at worst a count one too high (e2fsck fixes it).
    pub fn link(&self, existing: &[u8], path: &[u8]) -> Result<Inode> {
        let fs = &self.fs;
        let src = self.lookup(existing, false)?;
        if src.file_type() == FileType::Directory {
            return Err(Error::path(PathErrorKind::IsADirectory, existing));
        }
        let (parent, name) = self.parent_of(path)?;
        let mut op = Op::begin(fs)?;
        let parent = op.inode(parent.ino)?;
        if self.exists_in(&parent, &name)?.is_some() {
            return Err(Error::path(PathErrorKind::AlreadyExists, path));
        }
        let mut target = op.inode(src.ino)?;
        if target.links >= 65000 {
            return Err(Error::Invalid(format!(
                "{}: too many links ({})",
                String::from_utf8_lossy(existing),
                target.links
            )));
        }
        target.links += 1;
        put16(&mut target.raw, 0x1A, target.links);
        stamp(&mut target, false);
        op.put_inode_at(FRESH, &mut target)?;
        let mut d = DirW::load(fs, parent)?;
        dir_add(
            &mut op,
            &mut d,
            &name,
            target.ino,
            type_byte(target.file_type()),
        )?;
        stamp(&mut d.inode, true);
        op.put_inode(&mut d.inode)?;
        op.commit()?;
        Ok(target)
    }

    /// Make a special file at `path`: a fifo, a socket, or a character or block
    /// device `major:minor` (stored as the kernel and `mke2fs -d` store it: the
    /// old 16-bit form when both fit in a byte, else the new form). Other types
    /// are refused ([`Error::Invalid`]).
    pub fn mknod(
        &self,
        path: &[u8],
        kind: FileType,
        major: u32,
        minor: u32,
        attrs: &Attrs,
    ) -> Result<Inode> {
        let bits: u16 = match kind {
            FileType::Fifo => 0o010000,
            FileType::CharDevice => 0o020000,
            FileType::BlockDevice => 0o060000,
            FileType::Socket => 0o140000,
            _ => {
                return Err(Error::Invalid(format!(
                    "mknod makes fifos, sockets and device nodes, not a {}",
                    kind.name()
                )))
            }
        };
        let device = matches!(kind, FileType::CharDevice | FileType::BlockDevice);
        self.make(path, bits, attrs, &move |_, inode, _| {
            inode.flags &= !flags::EXTENTS;
            put32(&mut inode.raw, 0x20, inode.flags);
            inode.raw[0x28..0x28 + 60].fill(0);
            if device {
                if major < 256 && minor < 256 {
                    put32(&mut inode.raw, 0x28, major * 256 + minor);
                } else {
                    let v = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                    put32(&mut inode.raw, 0x2C, v);
                }
            }
            Ok(())
        })
    }

    /// Set the mode bits, owner and times of inode `ino` (any type; ctime is
    /// now unless `attrs` gives it): e.g. a directory's times after its entries
    /// are in.
    pub fn set_attrs(&self, ino: u32, attrs: &Attrs) -> Result<Inode> {
        let mut op = Op::begin(&self.fs)?;
        let mut inode = op.inode(ino)?;
        apply_attrs(&mut inode, attrs);
        op.put_inode(&mut inode)?;
        op.commit()?;
        Ok(inode)
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
        if dir_remove(&mut op, &mut d, &name)?.is_none() {
            return Err(Error::path(PathErrorKind::NotFound, path));
        }
        if is_dir {
            // As the kernel's ext4_dec_count: a count of 1 (dir_nlink) stays.
            let links = d.inode.links;
            if links > 2 {
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

        // The new inode, named nowhere yet: with a journal an orphan with no
        // links (a crash leaves it for the kernel's mount, e2fsck or dio's next
        // writable open to free); without one a crash leaves it for e2fsck.
        let inode = {
            let mut op = Op::begin(fs)?;
            let pg = (parent.ino - 1) / fs.sb.inodes_per_group;
            let ino = op.new_inode_no(pg, false)?;
            let extents = fs.sb.has_incompat(incompat::EXTENTS);
            let mut inode = new_inode(fs, ino, S_IFREG | 0o644, attrs, extents)?;
            if fs.journaled() {
                super::orphan::add_unnamed(&mut op, &mut inode)?;
            }
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

    /// Create many small regular files in one operation: each `files[i]` a new
    /// inode with `data` as its bytes and `attrs` applied, named `path`. The
    /// files' blocks are allocated side by side and their data goes to the
    /// device in as few writes as the runs allow, before any metadata that
    /// points at it; the inodes (and their tree or indirect blocks) are fresh
    /// blocks, the names and the parents' inodes linked ones, as for
    /// [`Ext::create`], so a crash leaves no name claiming bytes that were not
    /// written. All or nothing: an existing or repeated name
    /// ([`PathErrorKind::AlreadyExists`]; this call replaces nothing), a
    /// missing parent, ENOSPC or an I/O error leaves every name as it was. The
    /// parents must exist before the call. Inside a batch
    /// ([`Ext::begin_batch`]) the operation joins the batch; with a journal it
    /// is (part of) one transaction. Meant for copying trees of small files
    /// (`dio cp -r`): the data is in memory, so callers bound the total.
    pub fn put_files(&self, files: &[NewFile<'_>]) -> Result<Vec<Inode>> {
        let fs = &self.fs;
        if files.is_empty() {
            return Ok(Vec::new());
        }
        // Group the names by parent directory (each loaded once).
        // Per parent: its inode, and the files (index, name) going into it.
        type Group = (Inode, Vec<(usize, Vec<u8>)>);
        let mut groups: Vec<Group> = Vec::new();
        let mut by_dir: std::collections::HashMap<u32, usize> = Default::default();
        let mut seen: std::collections::HashSet<(u32, Vec<u8>)> = Default::default();
        // Parents by path: most files of a group share one.
        let mut parents: std::collections::HashMap<Vec<u8>, Inode> = Default::default();
        for (i, f) in files.iter().enumerate() {
            let (parent_path, name) = parent_and_name(f.path)?;
            let parent = match parents.get(&parent_path) {
                Some(p) => p.clone(),
                None => {
                    let (p, _) = self.parent_of(f.path)?;
                    parents.insert(parent_path, p.clone());
                    p
                }
            };
            if !seen.insert((parent.ino, name.clone())) {
                return Err(Error::path(PathErrorKind::AlreadyExists, f.path));
            }
            let g = *by_dir.entry(parent.ino).or_insert_with(|| {
                groups.push((parent, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push((i, name));
        }
        let mut op = Op::begin(fs)?;
        for (parent, names) in &mut groups {
            *parent = op.inode(parent.ino)?;
            let taken = |name: &[u8]| self.exists_in(parent, name).map(|e| e.is_some());
            let clash = if names.len() < 8 {
                names.iter().find_map(|(i, name)| match taken(name) {
                    Ok(false) => None,
                    Ok(true) => Some(Ok(*i)),
                    Err(e) => Some(Err(e)),
                })
            } else {
                // One pass over the directory instead of a lookup per name.
                let mut all: std::collections::HashSet<Vec<u8>> = Default::default();
                super::dir::Dir::new(fs, parent)?.for_each(&mut |e| {
                    all.insert(e.name);
                    false
                })?;
                names
                    .iter()
                    .find(|(_, name)| all.contains(name))
                    .map(|(i, _)| Ok(*i))
            };
            if let Some(i) = clash {
                return Err(Error::path(PathErrorKind::AlreadyExists, files[i?].path));
            }
        }
        let extents = fs.sb.has_incompat(incompat::EXTENTS);
        let bs = u64::from(fs.sb.block_size);
        let ipg = fs.sb.inodes_per_group;
        // The new inodes and where their data goes: (device block, file,
        // file block, blocks).
        let mut made: Vec<Option<Inode>> = vec![None; files.len()];
        let mut runs: Vec<(u64, usize, u64, u64)> = Vec::new();
        let mut goal: Option<u64> = None;
        for (parent, names) in &groups {
            let pg = (parent.ino - 1) / ipg;
            for (i, _) in names {
                let f = &files[*i];
                let ino = op.new_inode_no(pg, false)?;
                let mut inode = new_inode(fs, ino, S_IFREG | 0o644, f.attrs, extents)?;
                let n = (f.data.len() as u64).div_ceil(bs);
                let mut g = goal.unwrap_or_else(|| fs.sb.group_first_block((ino - 1) / ipg));
                let mut tree = ExtTree::default();
                let mut l = 0u64;
                let mut tables = 0u64;
                while l < n {
                    let (p, got) = op.alloc()?.alloc_blocks(fs, g, n - l)?;
                    let used = got.min(n - l);
                    runs.push((p, *i, l, used));
                    if extents {
                        let mut k = 0;
                        while k < used {
                            let len = (used - k).min(tree::MAX_INIT);
                            tree.insert(FileExtent {
                                logical: l + k,
                                physical: p + k,
                                len,
                                unwritten: false,
                            });
                            k += len;
                        }
                    } else {
                        for k in 0..used {
                            tables += ind_link(&mut op, &mut inode, l + k, p + k)?;
                        }
                    }
                    l += used;
                    g = p + got;
                }
                if extents {
                    tree.write(&mut op, &mut inode, g)?;
                    let ib = tree.i_blocks(&inode, &fs.sb);
                    tree::set_i_blocks(&mut inode, ib);
                } else {
                    refresh_tables(&mut op, &inode)?;
                    let acl = u64::from(inode.file_acl != 0);
                    tree::set_i_blocks(&mut inode, (n + tables + acl) * (bs / 512));
                }
                goal = Some(g);
                tree::set_size(&mut inode, f.data.len() as u64);
                made[*i] = Some(inode);
            }
        }
        // The data, before anything that points at it reaches the disk.
        write_gathered(fs, files, &mut runs)?;
        // Every new inode fresh first, then the names and the parents (linked):
        // no parent's change rides in a fresh copy of a shared inode-table block.
        for inode in made.iter_mut().flatten() {
            op.put_inode_at(FRESH, inode)?;
        }
        for (parent, names) in groups {
            let mut d = DirW::load(fs, parent)?;
            for (i, name) in &names {
                let ino = made[*i].as_ref().expect("made above").ino;
                dir_add(&mut op, &mut d, name, ino, type_byte(FileType::Regular))?;
            }
            stamp(&mut d.inode, true);
            op.put_inode(&mut d.inode)?;
        }
        op.commit()?;
        Ok(made.into_iter().flatten().collect())
    }

    /// Name `path` inode `ino` (of type `t`), replacing a non-directory of that
    /// name (freed when that was its last name).
    fn link_in(&self, path: &[u8], ino: u32, t: FileType) -> Result<()> {
        let fs = &self.fs;
        let (parent, name) = self.parent_of(path)?;
        let mut op = Op::begin(fs)?;
        if super::orphan::take_off(&mut op, ino)? {
            // An unnamed orphan named in this same operation: an inode with
            // its one link.
            let mut me = op.inode(ino)?;
            put32(&mut me.raw, 0x14, 0);
            me.links = 1;
            put16(&mut me.raw, 0x1A, 1);
            op.put_inode(&mut me)?;
        }
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
                if !dir_retarget(&mut op, &mut d, &name, ino, type_byte(t))? {
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
        super::orphan::take_off(&mut op, ino)?;
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
