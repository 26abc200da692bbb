//! Directories: entry blocks (linear), inline directories, and hashed (htree)
//! lookup through the dx root and index nodes. Leaf blocks with metadata_csum end in
//! a checksummed tail entry; index blocks carry their own tail; both are verified.

use super::bytes::{crc32c, le16, le32, u8at};
use super::hash;
use super::inode::{flags, Inode};
use super::map::Layout;
use super::superblock::{compat, incompat};
use super::Fs;
use crate::error::{CorruptKind, Feature};
use crate::map::Mapping;
use crate::{Error, Result};

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub inode: u32,
    /// Name bytes (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// The type byte of the entry (0 when the file system has no `filetype`).
    pub file_type: u8,
}

/// The size of the checksum tail entry at the end of a leaf block.
const TAIL: usize = 12;

/// How a directory block is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Leaf,
    DxRoot,
    DxNode,
}

/// Decode an on-disk rec_len (64 KiB blocks store 65536 as 0 or 65535).
fn rec_len(raw: u16, bs: usize) -> usize {
    if bs >= 65536 && (raw == 65535 || raw == 0) {
        65536
    } else {
        usize::from(raw)
    }
}

/// A directory being read: its inode, layout and checksum seed.
pub(crate) struct Dir<'a> {
    fs: &'a Fs,
    inode: &'a Inode,
    layout: Layout,
    seed: u32,
    bs: usize,
}

impl<'a> Dir<'a> {
    pub(crate) fn new(fs: &'a std::sync::Arc<Fs>, inode: &'a Inode) -> Result<Dir<'a>> {
        if inode.has_flag(flags::ENCRYPT) || inode.has_flag(flags::CASEFOLD) {
            return Err(Error::incompatible(
                Feature::Encryption,
                format!(
                    "directory inode {}: encrypted or case-folded directories",
                    inode.ino
                ),
            ));
        }
        Ok(Dir {
            fs,
            inode,
            layout: Layout::of(fs, inode)?,
            seed: fs.inode_seed(inode),
            bs: fs.sb.block_size as usize,
        })
    }

    fn indexed(&self) -> bool {
        self.inode.has_flag(flags::INDEX) && self.fs.sb.has_compat(compat::DIR_INDEX)
    }

    fn blocks(&self) -> u64 {
        self.inode.size / self.bs as u64
    }

    /// Read directory block `b` (logical); `None` for a hole.
    fn block(&self, b: u64) -> Result<Option<Vec<u8>>> {
        let e = self.layout.map(b, 1)?;
        match e.mapping {
            Mapping::Mapped(p) => Ok(Some(self.fs.read_block(p, "directory block")?)),
            Mapping::Hole | Mapping::Unwritten(_) => Ok(None),
        }
    }

    fn kind(&self, b: u64, block: &[u8]) -> Kind {
        if !self.indexed() {
            return Kind::Leaf;
        }
        if b == 0 {
            return Kind::DxRoot;
        }
        if le32(block, 0) == 0 && rec_len(le16(block, 4), self.bs) == self.bs {
            return Kind::DxNode;
        }
        Kind::Leaf
    }

    fn bad(&self, b: u64, m: impl std::fmt::Display) -> Error {
        Error::corrupt(
            CorruptKind::Directory,
            format!("directory inode {} block {b}: {m}", self.inode.ino),
        )
    }

    /// Check a leaf block's checksum tail; returns where its entries end.
    fn leaf_limit(&self, b: u64, block: &[u8]) -> Result<usize> {
        if !self.fs.sb.metadata_csum() {
            return Ok(block.len());
        }
        let t = block.len() - TAIL;
        let tail = &block[t..];
        if le32(tail, 0) != 0
            || le16(tail, 4) != TAIL as u16
            || u8at(tail, 6) != 0
            || u8at(tail, 7) != 0xDE
        {
            return Err(self.bad(b, "no checksum tail"));
        }
        let want = le32(tail, 8);
        let got = crc32c(self.seed, &block[..t]);
        if want != got {
            return Err(self.bad(
                b,
                format!("checksum {want:#010x} does not match its contents ({got:#010x})"),
            ));
        }
        Ok(t)
    }

    /// Parse the entries of `area` (a leaf block, or inline data), calling `f` on
    /// each live one; `f` returns true to stop.
    fn entries(&self, b: u64, area: &[u8], f: &mut dyn FnMut(DirEntry) -> bool) -> Result<bool> {
        let filetype = self.fs.sb.has_incompat(incompat::FILETYPE);
        let mut pos = 0;
        while pos < area.len() {
            if pos + 8 > area.len() {
                return Err(self.bad(b, format!("entry at byte {pos} runs past the block")));
            }
            let ino = le32(area, pos);
            let len = rec_len(le16(area, pos + 4), self.bs);
            let name_len = if filetype {
                usize::from(u8at(area, pos + 6))
            } else {
                usize::from(le16(area, pos + 6))
            };
            if len < 8 || len % 4 != 0 || pos + len > area.len() || 8 + name_len > len {
                return Err(self.bad(
                    b,
                    format!("bad entry at byte {pos} (rec_len {len}, name_len {name_len})"),
                ));
            }
            if ino != 0 {
                if ino > self.fs.sb.inodes_count {
                    return Err(self.bad(b, format!("entry names inode {ino}, past the last")));
                }
                let e = DirEntry {
                    inode: ino,
                    name: area[pos + 8..pos + 8 + name_len].to_vec(),
                    file_type: if filetype { u8at(area, pos + 7) } else { 0 },
                };
                if f(e) {
                    return Ok(true);
                }
            }
            pos += len;
        }
        Ok(false)
    }

    /// Visit every entry (including `.` and `..`), in on-disk order.
    pub(crate) fn for_each(&self, f: &mut dyn FnMut(DirEntry) -> bool) -> Result<()> {
        if self.inode.has_flag(flags::INLINE_DATA) {
            return self.inline_entries(f).map(|_| ());
        }
        // Walk the mapped runs, not every block number: a hostile i_size may name
        // billions of blocks, and holes are skipped a run at a time. Written blocks
        // of one directory never outnumber the file system's.
        let nblocks = self.blocks();
        let mut next = 0u64;
        let mut mapped = 0u64;
        while next < nblocks {
            let run = self.layout.map(next, nblocks - next)?;
            let len = run.len.clamp(1, nblocks - next);
            let b = next;
            if !matches!(run.mapping, Mapping::Mapped(_)) {
                next += len;
                continue;
            }
            next += 1;
            mapped += 1;
            if mapped > self.fs.sb.blocks_count {
                return Err(self.bad(b, "the directory maps more blocks than the file system has"));
            }
            let Some(block) = self.block(b)? else {
                continue;
            };
            match self.kind(b, &block) {
                Kind::Leaf => {
                    let limit = self.leaf_limit(b, &block)?;
                    if self.entries(b, &block[..limit], f)? {
                        return Ok(());
                    }
                }
                Kind::DxRoot => {
                    self.dx_counts(b, &block, 0x18 + usize::from(u8at(&block, 0x1D)))?;
                    // `.` and `..` are real entries of the root block.
                    let dot = rec_len(le16(&block, 4), self.bs).min(block.len());
                    let dotdot_len = rec_len(le16(&block, dot + 4), self.bs);
                    let end = (dot + dotdot_len).min(block.len());
                    let mut area = block[..end].to_vec();
                    // Cut `..` down to its name so the index behind it is not parsed.
                    if dot + 8 <= area.len() {
                        let l = ((8 + usize::from(u8at(&area, dot + 6))) + 3) & !3;
                        let l = l.min(area.len() - dot);
                        area.truncate(dot + l);
                        let bytes = (l as u16).to_le_bytes();
                        area[dot + 4] = bytes[0];
                        area[dot + 5] = bytes[1];
                    }
                    if self.entries(b, &area, f)? {
                        return Ok(());
                    }
                }
                Kind::DxNode => {
                    // Without checksums an empty leaf looks the same (one unused
                    // entry spanning the block): it has no entries either way.
                    if self.fs.sb.metadata_csum() {
                        self.dx_counts(b, &block, 8)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn inline_entries(&self, f: &mut dyn FnMut(DirEntry) -> bool) -> Result<bool> {
        let ib = self.inode.i_block();
        let parent = le32(ib, 0);
        let dot = DirEntry {
            inode: self.inode.ino,
            name: b".".to_vec(),
            file_type: 2,
        };
        let dotdot = DirEntry {
            inode: parent,
            name: b"..".to_vec(),
            file_type: 2,
        };
        if f(dot) || f(dotdot) {
            return Ok(true);
        }
        if self.entries(0, &ib[4..], f)? {
            return Ok(true);
        }
        if let Some(more) = self.inode.inline_xattr(7, b"data")? {
            if !more.is_empty() && self.entries(0, &more, f)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Check an index block's count/limit and (metadata_csum) its tail checksum;
    /// returns its entries as (hash, block) with the first hash 0.
    fn dx_counts(&self, b: u64, block: &[u8], at: usize) -> Result<Vec<(u32, u32)>> {
        let limit = usize::from(le16(block, at));
        let count = usize::from(le16(block, at + 2));
        if count == 0 || count > limit || at + limit * 8 > block.len() {
            return Err(self.bad(b, format!("index has count {count}, limit {limit}")));
        }
        if self.fs.sb.metadata_csum() {
            let t = at + limit * 8;
            if t + 8 > block.len() {
                return Err(self.bad(b, "index has no room for its checksum"));
            }
            let mut c = crc32c(self.seed, &block[..at + count * 8]);
            // The tail's reserved word, then its checksum field as zeros.
            c = crc32c(c, &block[t..t + 4]);
            c = crc32c(c, &[0; 4]);
            let want = le32(block, t + 4);
            if want != c {
                return Err(self.bad(
                    b,
                    format!("index checksum {want:#010x} does not match its contents ({c:#010x})"),
                ));
            }
        }
        Ok((0..count)
            .map(|i| {
                let e = at + i * 8;
                let h = if i == 0 { 0 } else { le32(block, e) };
                (h, le32(block, e + 4) & 0x0FFF_FFFF)
            })
            .collect())
    }

    /// Find `name`.
    pub(crate) fn lookup(&self, name: &[u8]) -> Result<Option<DirEntry>> {
        if self.indexed() && !self.inode.has_flag(flags::INLINE_DATA) {
            return self.dx_lookup(name);
        }
        let mut found = None;
        self.for_each(&mut |e| {
            if e.name == name {
                found = Some(e);
                true
            } else {
                false
            }
        })?;
        Ok(found)
    }

    fn search_leaf(&self, b: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        let Some(block) = self.block(b)? else {
            return Err(self.bad(b, "htree points at a hole"));
        };
        // The index says this is a leaf: without checksums an emptied leaf (one
        // unused entry over the block) looks like an index node, and is read
        // as the empty leaf it is; with them the tail tells them apart.
        let limit = self.leaf_limit(b, &block)?;
        let mut found = None;
        self.entries(b, &block[..limit], &mut |e| {
            if e.name == name {
                found = Some(e);
                true
            } else {
                false
            }
        })?;
        Ok(found)
    }

    fn dx_lookup(&self, name: &[u8]) -> Result<Option<DirEntry>> {
        let root = self
            .block(0)?
            .ok_or_else(|| self.bad(0, "htree root is a hole"))?;
        let info = 0x18;
        let version = u8at(&root, info + 4);
        let info_len = usize::from(u8at(&root, info + 5));
        let levels = usize::from(u8at(&root, info + 6));
        let max_levels = if self.fs.sb.has_incompat(incompat::LARGEDIR) {
            3
        } else {
            2
        };
        if le32(&root, info) != 0 || info_len != 8 {
            return Err(self.bad(0, "htree root info is damaged"));
        }
        if levels >= max_levels {
            return Err(self.bad(0, format!("htree has {} levels", levels + 1)));
        }
        if version > hash::TEA {
            return Err(Error::incompatible(
                Feature::HtreeHash,
                format!(
                    "directory inode {}: htree hash version {version}",
                    self.inode.ino
                ),
            ));
        }
        let target = hash::dirhash(
            name,
            version,
            &self.fs.sb.hash_seed,
            self.fs.sb.unsigned_hash(),
        )
        .expect("known hash version");
        let nblocks = self.blocks();
        // The path from the root: each level's entries and the chosen position.
        let mut path: Vec<(Vec<(u32, u32)>, usize)> = Vec::new();
        let mut entries = self.dx_counts(0, &root, info + info_len)?;
        let mut blk = 0u64;
        loop {
            let pos = entries
                .partition_point(|&(h, _)| h <= target)
                .saturating_sub(1);
            let child = u64::from(entries[pos].1);
            if child >= nblocks || child == blk {
                return Err(self.bad(blk, format!("htree points at block {child}")));
            }
            path.push((entries, pos));
            if path.len() > levels {
                blk = child;
                break;
            }
            let node = self
                .block(child)?
                .ok_or_else(|| self.bad(child, "htree node is a hole"))?;
            if self.kind(child, &node) != Kind::DxNode {
                return Err(self.bad(child, "htree node is not an index block"));
            }
            entries = self.dx_counts(child, &node, 8)?;
            blk = child;
        }
        // Search the leaf; on a miss, go on while the next leaf starts with the same
        // hash (a collision spilled over), as the kernel's htree_next_block does.
        let mut visited = 0u64;
        loop {
            if let Some(e) = self.search_leaf(blk, name)? {
                return Ok(Some(e));
            }
            visited += 1;
            if visited > nblocks {
                return Err(self.bad(blk, "htree collision chain does not end"));
            }
            // Climb to the deepest level that has a next entry.
            let mut level = path.len();
            loop {
                if level == 0 {
                    return Ok(None);
                }
                level -= 1;
                let (ents, pos) = &path[level];
                if pos + 1 < ents.len() {
                    break;
                }
            }
            path[level].1 += 1;
            let (ents, pos) = &path[level];
            let next_hash = ents[*pos].0;
            if next_hash & 1 == 0 || next_hash & !1 != target {
                return Ok(None);
            }
            let mut child = u64::from(ents[*pos].1);
            path.truncate(level + 1);
            while path.len() <= levels {
                if child >= nblocks {
                    return Err(self.bad(child, "htree points past the directory"));
                }
                let node = self
                    .block(child)?
                    .ok_or_else(|| self.bad(child, "htree node is a hole"))?;
                if self.kind(child, &node) != Kind::DxNode {
                    return Err(self.bad(child, "htree node is not an index block"));
                }
                let ents = self.dx_counts(child, &node, 8)?;
                let next = u64::from(ents[0].1);
                path.push((ents, 0));
                child = next;
            }
            if child >= nblocks {
                return Err(self.bad(child, "htree points past the directory"));
            }
            blk = child;
        }
    }
}
