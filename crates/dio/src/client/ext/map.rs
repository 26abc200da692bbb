//! The block map of one file: extent trees (any depth, unwritten extents, checksummed
//! tree blocks) and ext2/3 indirect blocks (single, double, triple), served to the
//! engine as its `get_block`.
//!
//! Extent trees are read whole when the file is opened: one pass with every tree
//! block checked (magic, counts, depth, order, checksum), a cycle or shared block
//! caught, and then `map` is a binary search with no I/O. Indirect blocks are read
//! on demand, as ext2's `get_block` does, and a mapping that ends at the last pointer
//! of its indirect block carries the `boundary` flag: the next block needs another
//! metadata read, so the engine sends what it has first.

use crate::error::{CorruptKind, Feature};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};

use super::bytes::{crc32c, le16, le32};
use super::inode::{flags, Inode};
use super::journal::Replay;
use super::Fs;
use crate::device::{Device, Op, Request};
use crate::map::{BlockMap, Extent, Mapping};
use crate::{Error, Result};

const EXTENT_MAGIC: u16 = 0xF30A;
/// The kernel's EXT4_MAX_EXTENT_DEPTH.
const MAX_DEPTH: u16 = 5;
/// Longest initialized extent; longer lengths encode unwritten extents.
const INIT_MAX_LEN: u16 = 32768;

/// One leaf extent: `len` file blocks from `logical` at device block `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    /// First file block.
    pub logical: u64,
    /// First fs block on the device.
    pub physical: u64,
    /// Blocks.
    pub len: u64,
    /// Allocated but not written: reads see zeros.
    pub unwritten: bool,
}

/// How a file's blocks are found.
pub(crate) enum Layout {
    /// Leaf extents in logical order, non-overlapping.
    Extents(Vec<FileExtent>),
    /// ext2/3 block pointers.
    Indirect(Indirect),
    /// No blocks at all (inline data, fast symlinks, devices).
    Empty,
}

impl Layout {
    /// Read the layout of `inode`'s blocks.
    pub(crate) fn of(fs: &Arc<Fs>, inode: &Inode) -> Result<Layout> {
        if inode.has_flag(flags::INLINE_DATA) || !has_blocks(fs, inode) {
            return Ok(Layout::Empty);
        }
        if inode.has_flag(flags::EXTENTS) {
            return Ok(Layout::Extents(read_extent_tree(fs, inode)?));
        }
        let mut ptrs = [0u32; 15];
        for (i, p) in ptrs.iter_mut().enumerate() {
            *p = le32(inode.i_block(), i * 4);
        }
        Ok(Layout::Indirect(Indirect {
            fs: Arc::clone(fs),
            ino: inode.ino,
            ptrs,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// Map file block `block` for up to `max` blocks (no allocation).
    pub(crate) fn map(&self, block: u64, max: u64) -> Result<Extent> {
        let max = max.max(1);
        match self {
            Layout::Empty => Ok(Extent::hole(max)),
            Layout::Extents(list) => Ok(map_extents(list, block, max)),
            Layout::Indirect(ind) => ind.map(block, max),
        }
    }

    /// Every mapped run, in logical order (for `filefrag`-style listings), up to
    /// file block `end`.
    pub(crate) fn runs(&self, end: u64) -> Result<Vec<FileExtent>> {
        match self {
            Layout::Empty => Ok(Vec::new()),
            Layout::Extents(list) => Ok(list.clone()),
            Layout::Indirect(_) => {
                let mut out: Vec<FileExtent> = Vec::new();
                let mut b = 0;
                while b < end {
                    let e = self.map(b, end - b)?;
                    let len = e.len.min(end - b);
                    if let Some(p) = e.device_block() {
                        match out.last_mut() {
                            Some(last)
                                if last.logical + last.len == b
                                    && last.physical + last.len == p =>
                            {
                                last.len += len;
                            }
                            _ => out.push(FileExtent {
                                logical: b,
                                physical: p,
                                len,
                                unwritten: false,
                            }),
                        }
                    }
                    b += len;
                }
                Ok(out)
            }
        }
    }
}

/// Whether `i_block` maps blocks at all: device files keep device numbers there,
/// fast symlinks their target (the kernel's `ext4_inode_is_fast_symlink`).
pub(crate) fn has_blocks(fs: &Fs, inode: &Inode) -> bool {
    use super::inode::FileType;
    match inode.file_type() {
        FileType::Regular | FileType::Directory | FileType::Unknown => true,
        FileType::Symlink => !is_fast_symlink(fs, inode),
        _ => false,
    }
}

/// A symlink whose target lives in `i_block`.
pub(crate) fn is_fast_symlink(fs: &Fs, inode: &Inode) -> bool {
    if inode.has_flag(flags::INLINE_DATA) {
        return false;
    }
    if inode.has_flag(flags::EA_INODE) {
        return inode.size > 0 && inode.size < 60;
    }
    let ea_blocks = if inode.file_acl != 0 {
        u64::from(fs.sb.block_size / 512)
    } else {
        0
    };
    inode.blocks_512.saturating_sub(ea_blocks) == 0
}

pub(crate) fn map_extents(list: &[FileExtent], block: u64, max: u64) -> Extent {
    // The first extent ending after `block`.
    let i = list.partition_point(|e| e.logical + e.len <= block);
    match list.get(i) {
        Some(e) if e.logical <= block => {
            let off = block - e.logical;
            let len = (e.len - off).min(max);
            if e.unwritten {
                Extent::unwritten(e.physical + off, len)
            } else {
                Extent::mapped(e.physical + off, len)
            }
        }
        Some(e) => Extent::hole((e.logical - block).min(max)),
        None => Extent::hole(max),
    }
}

/// Parse one extent node (header and entries) of `ino`; `area` is the node's bytes.
struct Node<'a> {
    area: &'a [u8],
    entries: usize,
    depth: u16,
}

fn parse_node<'a>(area: &'a [u8], ino: u32, where_: &str) -> Result<Node<'a>> {
    let bad = |m: String| {
        Error::corrupt(
            CorruptKind::ExtentTree,
            format!("inode {ino}: extent {where_}: {m}"),
        )
    };
    if le16(area, 0) != EXTENT_MAGIC {
        return Err(bad(format!("bad magic {:#06x}", le16(area, 0))));
    }
    let entries = usize::from(le16(area, 2));
    let max = usize::from(le16(area, 4));
    let depth = le16(area, 6);
    if entries > max || 12 + max * 12 > area.len() {
        return Err(bad(format!(
            "{entries} entries, room for {max}, in {} bytes",
            area.len()
        )));
    }
    if depth > MAX_DEPTH {
        return Err(bad(format!("depth {depth} exceeds {MAX_DEPTH}")));
    }
    Ok(Node {
        area,
        entries,
        depth,
    })
}

fn read_extent_tree(fs: &Arc<Fs>, inode: &Inode) -> Result<Vec<FileExtent>> {
    read_extent_tree_blocks(fs, inode).map(|(e, _)| e)
}

/// The leaf extents of `inode`, and the tree blocks holding them (in no order).
pub(crate) fn read_extent_tree_blocks(
    fs: &Arc<Fs>,
    inode: &Inode,
) -> Result<(Vec<FileExtent>, Vec<u64>)> {
    let ino = inode.ino;
    let root = parse_node(inode.i_block(), ino, "root")?;
    let mut out = Vec::new();
    let mut visited = HashSet::new();
    let seed = fs.inode_seed(inode);
    walk_node(
        fs,
        ino,
        seed,
        &root,
        0,
        u64::from(u32::MAX) + 1,
        &mut visited,
        &mut out,
    )?;
    Ok((out, visited.into_iter().collect()))
}

/// Walk `node`, whose entries must cover logical blocks within `[lo, hi)`.
#[allow(clippy::too_many_arguments)]
fn walk_node(
    fs: &Arc<Fs>,
    ino: u32,
    seed: u32,
    node: &Node<'_>,
    lo: u64,
    hi: u64,
    visited: &mut HashSet<u64>,
    out: &mut Vec<FileExtent>,
) -> Result<()> {
    let bad = |m: String| {
        Error::corrupt(
            CorruptKind::ExtentTree,
            format!("inode {ino}: extent tree: {m}"),
        )
    };
    let mut prev_start: Option<u64> = None;
    for i in 0..node.entries {
        let e = &node.area[12 + i * 12..24 + i * 12];
        let start = u64::from(le32(e, 0));
        if start < lo || start >= hi || prev_start.is_some_and(|p| start <= p) {
            return Err(bad(format!(
                "entry for block {start} out of order (node covers {lo}..{hi})"
            )));
        }
        prev_start = Some(start);
        if node.depth == 0 {
            let raw_len = le16(e, 4);
            let (len, unwritten) = if raw_len > INIT_MAX_LEN {
                (raw_len - INIT_MAX_LEN, true)
            } else {
                (raw_len, false)
            };
            let len = u64::from(len);
            let physical = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
            if len == 0 {
                return Err(bad(format!("empty extent at block {start}")));
            }
            if start + len > hi {
                return Err(bad(format!("extent {start}+{len} overlaps the next one")));
            }
            if let Some(last) = out.last() {
                if last.logical + last.len > start {
                    return Err(bad(format!(
                        "extent {start}+{len} overlaps the previous one"
                    )));
                }
            }
            fs.check_blocks(physical, len, ino)?;
            out.push(FileExtent {
                logical: start,
                physical,
                len,
                unwritten,
            });
        } else {
            let next_start = if i + 1 < node.entries {
                u64::from(le32(&node.area[24 + i * 12..], 0))
            } else {
                hi
            };
            let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
            fs.check_blocks(child, 1, ino)?;
            if !visited.insert(child) {
                return Err(bad(format!(
                    "tree block {child} is referenced twice (a cycle or a shared block)"
                )));
            }
            let block = fs.read_block(child, "extent tree block")?;
            let where_ = format!("block {child}");
            let n = parse_node(&block, ino, &where_)?;
            if n.depth + 1 != node.depth {
                return Err(bad(format!(
                    "block {child} has depth {}, its parent {}",
                    n.depth, node.depth
                )));
            }
            if fs.sb.metadata_csum() {
                let tail = 12 + usize::from(le16(&block, 4)) * 12;
                if tail + 4 > block.len() {
                    return Err(bad(format!("block {child} has no room for its checksum")));
                }
                let want = le32(&block, tail);
                let got = crc32c(seed, &block[..tail]);
                if want != got {
                    return Err(Error::corrupt(CorruptKind::ExtentTree, format!(
                        "inode {ino}: extent tree block {child} checksum {want:#010x} does not match its contents ({got:#010x})"
                    )));
                }
            }
            walk_node(fs, ino, seed, &n, start, next_start.min(hi), visited, out)?;
        }
    }
    Ok(())
}

/// ext2/3 block pointers: 12 direct, then single, double and triple indirect.
pub(crate) struct Indirect {
    fs: Arc<Fs>,
    ino: u32,
    ptrs: [u32; 15],
    /// Indirect blocks read so far (bounded; cleared when full).
    cache: Mutex<HashMap<u64, Arc<Vec<u32>>>>,
}

const CACHE_BLOCKS: usize = 64;

impl Indirect {
    fn table(&self, block: u64) -> Result<Arc<Vec<u32>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&block) {
            return Ok(Arc::clone(t));
        }
        drop(cache);
        self.fs.check_blocks(block, 1, self.ino)?;
        let raw = self.fs.read_block(block, "indirect block")?;
        let t: Arc<Vec<u32>> = Arc::new((0..raw.len() / 4).map(|i| le32(&raw, i * 4)).collect());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_BLOCKS {
            cache.clear();
        }
        cache.insert(block, Arc::clone(&t));
        Ok(t)
    }

    fn map(&self, block: u64, max: u64) -> Result<Extent> {
        let p = u64::from(self.fs.sb.block_size / 4);
        // The path: the table holding the pointer, and the index in it; `span` is
        // how many file blocks one pointer of each level covers.
        let (mut table_ptr, mut path): (Option<u32>, Vec<u64>) = if block < 12 {
            (None, vec![block])
        } else if block - 12 < p {
            (Some(self.ptrs[12]), vec![block - 12])
        } else if block - 12 - p < p * p {
            let r = block - 12 - p;
            (Some(self.ptrs[13]), vec![r / p, r % p])
        } else if block - 12 - p - p * p < p * p * p {
            let r = block - 12 - p - p * p;
            (Some(self.ptrs[14]), vec![r / (p * p), (r / p) % p, r % p])
        } else {
            return Ok(Extent::hole(max));
        };
        let leaf_index = path.pop().expect("a path has a leaf index");
        // Walk down the intermediate levels.
        for level in 0..path.len() {
            let ptr = table_ptr.expect("intermediate levels come from a table");
            if ptr == 0 {
                // Everything under this pointer is a hole: up to the end of the
                // region it covers.
                let digits = path[level..].iter().chain(std::iter::once(&leaf_index));
                let off = digits.fold(0u64, |a, &d| a * p + d);
                let span = p.pow((path.len() - level + 1) as u32);
                return Ok(Extent::hole((span - off).min(max)));
            }
            let t = self.table(u64::from(ptr))?;
            table_ptr = Some(t[path[level] as usize]);
        }
        let table: Arc<Vec<u32>> = match table_ptr {
            None => Arc::new(self.ptrs[..12].to_vec()),
            Some(0) => return Ok(Extent::hole((p - leaf_index).min(max))),
            Some(ptr) => self.table(u64::from(ptr))?,
        };
        let first = leaf_index;
        let first = first as usize;
        let start = u64::from(table[first]);
        let mut n = 1usize;
        let limit = (table.len() - first).min(usize::try_from(max).unwrap_or(usize::MAX));
        if start == 0 {
            while n < limit && table[first + n] == 0 {
                n += 1;
            }
            return Ok(Extent::hole(n as u64));
        }
        while n < limit && u64::from(table[first + n]) == start + n as u64 {
            n += 1;
        }
        self.fs.check_blocks(start, n as u64, self.ino)?;
        // The run reached the last pointer of its table: the next block's pointer
        // is in another indirect block (ext2's get_block sets the boundary here).
        let boundary = first + n == table.len();
        Ok(Extent::mapped(start, n as u64).boundary(boundary))
    }
}

/// The engine's view of one file: its layout, with the in-place writes the ext
/// client supports and nothing more. It never allocates, converts or truncates:
///
/// - `map` with `create` (a write) refuses holes, unwritten extents and blocks past
///   i_size with [`Error::Invalid`], before the engine writes anything;
/// - `submit_io` sends a write request to the device only if it covers written
///   blocks of this very file (the device offsets the layout gives for the
///   request's file offset) and leaves every byte past i_size as it is on disk
///   (a read-modify-write of the last block writes back what it read); anything
///   else completes with an error and never reaches the device;
/// - `truncate` is refused ([`Error::Incompatible`]), and so is the write of the
///   engine's truncate that comes first (zeroing the tail of the new EOF block),
///   so a truncate changes nothing on disk.
///
/// The engine files over this map sit on a [`Fence`](super::fence::Fence)
/// device, which refuses any write that does not come through `submit_io`.
///
/// Blocks the journal replay holds (data=journal) map to their journal copy, so
/// the engine reads the replayed bytes from the device (such images are never
/// writable).
pub(crate) struct ExtMap {
    pub(crate) fs: Arc<Fs>,
    pub(crate) ino: u32,
    pub(crate) layout: Arc<Layout>,
    pub(crate) block_size: u32,
    /// i_size: writes stay inside it.
    pub(crate) i_size: u64,
    /// What the engine may address (see [`BlockMap::max_file_size`]).
    pub(crate) max_size: u64,
    /// Whether in-place writes are allowed at all (a writable file system and a
    /// file that may be written).
    pub(crate) writes: bool,
    pub(crate) replay: Option<Arc<Replay>>,
}

impl ExtMap {
    /// The layout's answer, split at blocks the journal replay holds: those map
    /// one at a time to their journal copy.
    fn map_replayed(&self, e: Extent) -> Extent {
        let Some(replay) = &self.replay else {
            return e;
        };
        let Mapping::Mapped(p) = e.mapping else {
            return e;
        };
        if let Some(copy) = replay.get(p) {
            return Extent::mapped(copy.at, 1);
        }
        match replay.first_in(p, p.saturating_add(e.len)) {
            Some(j) => Extent::mapped(p, j - p),
            None => e,
        }
    }

    /// Blocks holding bytes below i_size.
    fn size_blocks(&self) -> u64 {
        self.i_size.div_ceil(u64::from(self.block_size))
    }

    /// Whether write request `req` (its device offset, length and bytes), for
    /// file byte `file_off`, is an in-place overwrite of this file's written
    /// blocks inside i_size (see the type's doc).
    fn check_write_request(&self, req: &Request, file_off: u64) -> Result<()> {
        let ino = self.ino;
        if !self.writes {
            return Err(Error::Invalid(format!(
                "inode {ino}: this file is not open for in-place writes"
            )));
        }
        if self.replay.is_some() {
            return Err(Error::incompatible(
                Feature::JournalRecovery,
                format!("inode {ino}: the journal was replayed in memory only"),
            ));
        }
        let (dev_off, len) = (req.offset(), req.len());
        let bs = u64::from(self.block_size);
        let end = file_off
            .checked_add(len)
            .ok_or_else(|| Error::Invalid(format!("inode {ino}: write request past 2^64")))?;
        let mut pos = file_off;
        while pos < end {
            let b = pos / bs;
            if b >= self.size_blocks() {
                return Err(Error::Invalid(format!(
                    "inode {ino}: a write at offset {pos} lies past i_size ({}): in-place writes do not grow files",
                    self.i_size
                )));
            }
            let e = self.layout.map(b, (end - 1) / bs - b + 1)?;
            let Mapping::Mapped(p) = e.mapping else {
                return Err(Error::Invalid(format!(
                    "inode {ino}: a write at offset {pos} meets a hole or an unwritten extent: in-place writes do not allocate or convert"
                )));
            };
            let want = p * bs + pos % bs;
            if want != dev_off + (pos - file_off) {
                return Err(Error::Invalid(format!(
                    "inode {ino}: a write for offset {pos} goes to device byte {}, the file's block is at {want}",
                    dev_off + (pos - file_off)
                )));
            }
            pos = ((b + e.len.max(1)) * bs).min(end);
        }
        // Bytes past i_size (the last block's tail) must stay as they are: a
        // read-modify-write writes back what it read, a write past EOF does not.
        if end > self.i_size {
            let from = self.i_size.max(file_off);
            let n = (end - from) as usize;
            let mut new = vec![0u8; n];
            req.copy_out((from - file_off) as usize, &mut new);
            let at = dev_off + (from - file_off);
            let old = self.fs.io.read_plain(at, n, "the EOF block's tail")?;
            if old != new {
                return Err(Error::Invalid(format!(
                    "inode {ino}: a write changes bytes past i_size ({}): in-place writes do not grow files",
                    self.i_size
                )));
            }
        }
        Ok(())
    }
}

impl BlockMap for ExtMap {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        let e = self.map_replayed(self.layout.map(block, max_blocks)?);
        if !create {
            return Ok(e);
        }
        // A write: only written blocks inside i_size.
        let bs = u64::from(self.block_size);
        let ino = self.ino;
        if block >= self.size_blocks() {
            return Err(Error::Invalid(format!(
                "inode {ino}: writing at offset {} would grow the file past its {} bytes: in-place writes do not allocate",
                block * bs,
                self.i_size
            )));
        }
        match e.mapping {
            Mapping::Mapped(_) => Ok(e),
            Mapping::Hole => Err(Error::Invalid(format!(
                "inode {ino}: offset {} is in a hole: in-place writes do not allocate",
                block * bs
            ))),
            Mapping::Unwritten(_) => Err(Error::Invalid(format!(
                "inode {ino}: offset {} is in an unwritten (preallocated) extent: in-place writes do not convert extents",
                block * bs
            ))),
        }
    }

    fn submit_io(&self, dev: &dyn Device, req: Request, file_offset: u64) {
        if req.op() == Op::Write {
            if let Err(e) = self.check_write_request(&req, file_offset) {
                req.complete(Err(io::Error::new(io::ErrorKind::Unsupported, e)));
                return;
            }
            // Past the fence: this is the one way a write reaches the device.
            self.fs.io.device().submit(req);
            return;
        }
        dev.submit(req);
    }

    fn can_resize(&self, size: u64) -> Result<()> {
        Err(Error::incompatible(
            Feature::Resize,
            format!(
                "inode {}: resize to {size} bytes: the ext client does not change file sizes",
                self.ino
            ),
        ))
    }

    fn truncate(&self, size: u64) -> Result<()> {
        Err(Error::incompatible(
            Feature::Resize,
            format!(
                "inode {}: truncate to {size} bytes: the ext client does not change file sizes",
                self.ino
            ),
        ))
    }

    fn max_file_size(&self) -> u64 {
        self.max_size
    }

    fn has_end_io(&self) -> bool {
        false
    }
}
