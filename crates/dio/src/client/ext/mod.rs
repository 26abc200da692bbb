//! ext2, ext3 and ext4 images: read any file, list directories, overwrite files in
//! place, through the engine; on images without a journal, also create, grow,
//! fill, truncate and remove files, directories and symlinks.
//!
//! This module owns the on-disk format: the superblock and its features, group
//! descriptors, inodes, extent trees and indirect blocks (the block map the engine
//! uses as its `get_block`), directories (linear, inline and htree) and symlinks.
//! Metadata is read through the [`Device`] in whole logical blocks; file data moves
//! through a [`DirectFile`] over the same device.
//!
//! Two write paths. [`ExtFile`] writes in place: it never allocates blocks or
//! changes sizes, and touches only a file's written blocks, its mtime, ctime and
//! inode checksum (any image, journal or not). Allocating changes
//! ([`Ext::create`], [`Ext::mkdir`], [`Ext::symlink`], [`Ext::remove`],
//! [`Ext::put_file`], and [`ExtWriter`] from [`Ext::writer`], whose block map
//! allocates as the kernel's ext4 direct I/O does: unwritten extents converted
//! at completion) go through one transaction type and its commit (`tx`), ordered
//! for crashes (data, then pointers, then sizes; allocations before links, frees
//! last; on images with a journal each operation is one jbd2 transaction
//! through the journal writer); they are refused with [`Feature::JournalWrite`]
//! when a journal is there but not open for writing (bigalloc images allocate
//! whole clusters); inline-data directories, and htree directories whose
//! two-level index is full, refuse new names.
//!
//! What a handle can do is what the client supports, whichever way it is asked:
//! the block map refuses writes to holes, unwritten extents and bytes past i_size
//! (and checks every write request against the file's blocks before it reaches
//! the device) and refuses truncate; engine handles sit on a device view that lets
//! writes through only from that map (`fence`), so a truncate changes nothing on
//! disk. [`ExtFile::direct`] is read-only; [`ExtFile::overwriter`] is the checked
//! writable handle. Every [`Ext::open_file`] of one inode shares one state (range
//! locks, size, inode), and every metadata write (an inode's read-modify-write)
//! runs under one file-system lock: inodes share inode-table blocks.
//!
//! An image whose journal needs recovery is read as the kernel reads it after
//! recovery: opened read-only, the journal's committed transactions are replayed
//! in memory (see [`Ext::journal_replay`] and [`Ext::notes`]), never on the
//! image; opened for writing, they are replayed on disk first, as e2fsck does.
//! With a journal (ext3, ext4), every metadata write goes through it: a jbd2
//! transaction committed, then checkpointed (see `jwrite`).
//!
//! Every number on disk is hostile input: a bad image gives [`Error::Corrupt`]
//! ("corrupt: ..."), a feature this reader does not support gives
//! [`Error::Incompatible`] ("incompatible: FEATURE"), never a panic, a hang, an
//! unbounded allocation or a read outside the image.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dio::ext::Ext;
//! use dio::{RawOptions, RawFile};
//!
//! let raw = RawFile::open("disk.img", &RawOptions::default()).unwrap();
//! let ext = Ext::open(Arc::clone(raw.direct().device()), raw.size()).unwrap();
//! let inode = ext.lookup(b"/etc/passwd", true).unwrap();
//! let file = ext.open_file(&inode).unwrap();
//! let mut buf = vec![0; file.size() as usize];
//! file.read_at(0, &mut buf).unwrap();
//! ```

#![forbid(unsafe_code)]

mod alloc;
mod bytes;
mod dir;
mod fence;
mod group;
mod hash;
mod imap;
mod inode;
mod io;
mod journal;
mod jwrite;
mod map;
mod ops;
mod orphan;
mod superblock;
mod tree;
mod tx;
mod wmap;

use crate::error::{CorruptKind, Feature, PathErrorKind};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

pub use dir::DirEntry;
pub use inode::{flags as inode_flags, FileType, Inode, Timestamp, ROOT_INO};
pub use map::FileExtent;
pub use ops::{Attrs, NewFile};
pub use superblock::{compat, incompat, ro_compat, Superblock};
pub use wmap::ExtWriter;

use crate::device::Device;
use crate::map::Mapping;
use crate::{DirectFile, Error, FileState, Flags, Result};
use fence::Fence;
use group::GroupDesc;
use io::MetaIo;
use map::{ExtMap, Layout};

/// Symlinks followed in one lookup before giving up (the kernel's 40).
const MAX_SYMLINKS: u32 = 40;

/// What every open file of one file system shares.
pub(crate) struct Fs {
    io: MetaIo,
    pub(crate) sb: Superblock,
    groups: Vec<GroupDesc>,
    writable: bool,
    /// The journal replayed in memory (when it needed recovery).
    replay: Option<Arc<journal::Replay>>,
    /// The journal replayed on disk at a writable open (when it needed recovery).
    recovered: Option<Arc<journal::Replay>>,
    /// The journal writer of a writable file system with a journal: every
    /// metadata write goes through it.
    journal: Mutex<Option<jwrite::Writer>>,
    /// The open inodes: every [`Ext::open_file`] of one inode shares its node
    /// (range locks, size, the inode as last written).
    open: Mutex<HashMap<u32, Weak<Node>>>,
    /// Held around every metadata read-modify-write (an inode-table block is
    /// shared by many inodes, and a device logical block by several): two updates
    /// of neighbouring inodes must not write back each other's stale bytes.
    meta: Mutex<()>,
    /// The block and inode allocator of allocating operations (taken before
    /// `meta`; `None` until first used, and again after a failed operation).
    alloc: Mutex<Option<alloc::Alloc>>,
    /// Inodes with an open [`ExtWriter`].
    writers: Mutex<HashSet<u32>>,
    /// Operations committed together (see [`Ext::begin_batch`]), when on.
    pub(crate) batch: Mutex<Option<tx::Batch>>,
}

/// Now, as an inode timestamp.
pub(crate) fn now() -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        nsecs: now.subsec_nanos(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fs {
    /// Check that `len` blocks from `start` lie inside the file system.
    pub(crate) fn check_blocks(&self, start: u64, len: u64, ino: u32) -> Result<()> {
        let ok = start >= u64::from(self.sb.first_data_block).max(1)
            && start
                .checked_add(len)
                .is_some_and(|e| e <= self.sb.blocks_count);
        if ok {
            Ok(())
        } else {
            Err(Error::corrupt(
                CorruptKind::Inode,
                format!(
                    "inode {ino}: blocks {start}+{len} lie outside the file system's {} blocks",
                    self.sb.blocks_count
                ),
            ))
        }
    }

    /// Read fs block `block` (a metadata block).
    pub(crate) fn read_block(&self, block: u64, what: &str) -> Result<Vec<u8>> {
        if block >= self.sb.blocks_count {
            return Err(Error::corrupt(
                CorruptKind::BlockMap,
                format!(
                    "{what} {block} is past the file system's {} blocks",
                    self.sb.blocks_count
                ),
            ));
        }
        let bs = u64::from(self.sb.block_size);
        self.io.read(block * bs, bs as usize, what)
    }

    /// The checksum seed of one inode's metadata (extent and directory blocks).
    pub(crate) fn inode_seed(&self, inode: &Inode) -> u32 {
        inode::inode_seed(self.sb.checksum_seed, inode.ino, inode.generation)
    }

    fn inode_offset(&self, ino: u32) -> Result<u64> {
        if ino == 0 || ino > self.sb.inodes_count {
            return Err(Error::corrupt(
                CorruptKind::Inode,
                format!(
                    "inode number {ino} is out of range (1..={})",
                    self.sb.inodes_count
                ),
            ));
        }
        let ipg = self.sb.inodes_per_group;
        let g = (ino - 1) / ipg;
        let idx = u64::from((ino - 1) % ipg);
        let table = self
            .groups
            .get(g as usize)
            .ok_or_else(|| {
                Error::corrupt(
                    CorruptKind::Inode,
                    format!("inode {ino} is in missing group {g}"),
                )
            })?
            .inode_table;
        Ok(table * u64::from(self.sb.block_size) + idx * u64::from(self.sb.inode_size))
    }

    /// The fs block holding inode `ino` and the inode's byte offset in it.
    pub(crate) fn inode_place(&self, ino: u32) -> Result<(u64, usize)> {
        let at = self.inode_offset(ino)?;
        let bs = u64::from(self.sb.block_size);
        Ok((at / bs, (at % bs) as usize))
    }

    pub(crate) fn read_inode(&self, ino: u32) -> Result<Inode> {
        let at = self.inode_offset(ino)?;
        let raw = self.io.read(at, usize::from(self.sb.inode_size), "inode")?;
        if self.sb.metadata_csum() {
            inode::verify(self.sb.checksum_seed, ino, &raw)?;
        }
        Inode::parse(
            ino,
            raw,
            self.sb.has_ro_compat(ro_compat::HUGE_FILE),
            self.sb.block_size,
        )
    }

    /// Read inode `ino` from disk, let `change` edit it, and write it back with
    /// its checksum, all under the metadata lock: the one way the ext client
    /// writes metadata. Returns the inode as written.
    ///
    /// While a batch is open (`Ext::begin_batch`) the change goes into the
    /// batch as an operation of its own: written in place, it could be
    /// overwritten by the batch's older copy of the inode's table block (a
    /// lost update), and it would write (with a journal: commit) the batch's
    /// pending changes to that block early.
    fn update_inode(self: &Arc<Self>, ino: u32, change: impl FnOnce(&mut Inode)) -> Result<Inode> {
        if tx::batching(self) {
            let mut op = tx::Op::begin(self)?;
            let mut inode = op.inode(ino)?;
            change(&mut inode);
            op.put_inode(&mut inode)?;
            op.commit()?;
            return Ok(inode);
        }
        let _meta = lock(&self.meta);
        let mut inode = self.read_inode(ino)?;
        change(&mut inode);
        if self.sb.metadata_csum() {
            inode::update_checksum(self.sb.checksum_seed, inode.ino, &mut inode.raw);
        }
        let at = self.inode_offset(inode.ino)?;
        self.write_meta(at, &inode.raw, "inode")?;
        Ok(inode)
    }

    fn new(
        io: MetaIo,
        sb: Superblock,
        groups: Vec<GroupDesc>,
        writable: bool,
        replay: Option<Arc<journal::Replay>>,
    ) -> Fs {
        Fs {
            io,
            sb,
            groups,
            writable,
            replay,
            recovered: None,
            journal: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            meta: Mutex::new(()),
            alloc: Mutex::new(None),
            writers: Mutex::new(HashSet::new()),
            batch: Mutex::new(None),
        }
    }

    fn max_file_size(&self, inode: &Inode) -> u64 {
        let bs = u64::from(self.sb.block_size);
        let blocks = if inode.has_flag(inode::flags::EXTENTS) {
            1u64 << 32
        } else {
            let p = bs / 4;
            12 + p + p * p + p * p * p
        };
        blocks.saturating_mul(bs).min(i64::MAX as u64)
    }
}

/// An ext2/3/4 file system on a device.
#[derive(Clone)]
pub struct Ext {
    fs: Arc<Fs>,
}

impl std::fmt::Debug for Ext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ext")
            .field("block_size", &self.fs.sb.block_size)
            .field("blocks", &self.fs.sb.blocks_count)
            .field("writable", &self.fs.writable)
            .finish()
    }
}

fn not_found(path: &[u8], kind: PathErrorKind) -> Error {
    Error::path(kind, path)
}

impl Ext {
    /// Open the file system on `dev`, whose first `size` bytes hold the image, for
    /// reading. Checks the superblock, its features and every group descriptor.
    pub fn open(dev: Arc<dyn Device>, size: u64) -> Result<Ext> {
        Ext::open_inner(dev, size, false)
    }

    /// Open for reading and in-place writes. A journal that needs recovery is
    /// replayed on disk first (as e2fsck does; see [`Ext::notes`]). Refused
    /// ("incompatible: ...") with multiple-mount protection, a ro_compat
    /// feature that in-place writes are not known to be safe with, an external
    /// journal device or a fast-commit journal.
    pub fn open_writable(dev: Arc<dyn Device>, size: u64) -> Result<Ext> {
        Ext::open_inner(dev, size, true)
    }

    fn open_inner(dev: Arc<dyn Device>, size: u64, writable: bool) -> Result<Ext> {
        let io = MetaIo::new(dev, size)?;
        let raw = io.read(
            superblock::SUPERBLOCK_OFFSET,
            superblock::SUPERBLOCK_SIZE,
            "superblock",
        )?;
        let mut sb = Superblock::parse(&raw)?;
        let mut raw = raw;
        let mut recovered = None;
        if writable {
            if let Some(e) = sb.feature_refusal() {
                return Err(e);
            }
            if sb.has_incompat(incompat::RECOVER) {
                // Replay the journal on disk, then read the superblock again.
                check_size(&io, &sb)?;
                let groups = group::read_table(&io, &sb)?;
                let plain = MetaIo::new(Arc::clone(io.device()), io.size())?;
                let fs = Arc::new(Fs::new(plain, sb, groups, writable, None));
                recovered = journal::recover_on_disk(&fs, &raw)?.map(Arc::new);
                drop(fs);
                raw = io.read(
                    superblock::SUPERBLOCK_OFFSET,
                    superblock::SUPERBLOCK_SIZE,
                    "superblock",
                )?;
                sb = Superblock::parse(&raw)?;
            }
            if let Some(e) = sb.write_refusal() {
                return Err(e);
            }
        }
        check_size(&io, &sb)?;
        let groups = group::read_table(&io, &sb)?;
        let mut fs = Fs::new(io, sb, groups, writable, None);
        fs.recovered = recovered;
        let fs = Arc::new(fs);
        if writable && jwrite::wants_journal(&fs) {
            let w = jwrite::Writer::open(&fs, &raw)?;
            *lock(&fs.journal) = Some(w);
        }
        if writable && orphan::head(&fs)? != 0 && tx::alloc_refusal(&fs).is_none() {
            // After a crash: finish what the orphan list says was under way
            // (mid-unlink, mid-truncate) and recount the superblock's free
            // counts, as the kernel's mount and e2fsck do.
            orphan::after_crash(&fs)?;
        }
        // A journal that needs recovery: replay it in memory (writable opens
        // replayed it on disk above), then read the superblock and descriptors
        // again through it, as the kernel sees them after recovery.
        let Some(replay) = journal::replay(&fs, &raw)? else {
            return Ok(Ext { fs });
        };
        let replay = Arc::new(replay);
        let io = fs.io.with_replay(Arc::clone(&replay), fs.sb.block_size);
        let raw = io.read(
            superblock::SUPERBLOCK_OFFSET,
            superblock::SUPERBLOCK_SIZE,
            "superblock",
        )?;
        let sb = Superblock::parse(&raw)?;
        if sb.block_size != fs.sb.block_size {
            return Err(Error::corrupt(
                CorruptKind::Journal,
                format!(
                    "the journal's copy of the superblock says {}-byte blocks, the image {}",
                    sb.block_size, fs.sb.block_size
                ),
            ));
        }
        check_size(&io, &sb)?;
        let groups = group::read_table(&io, &sb)?;
        Ok(Ext {
            fs: Arc::new(Fs::new(io, sb, groups, writable, Some(replay))),
        })
    }

    /// What the reader noticed that a user should hear of (e.g. that the journal
    /// needed recovery and was replayed in memory): one line each, for the CLI's
    /// `dio: note: ...`.
    pub fn notes(&self) -> Vec<String> {
        self.fs
            .replay
            .as_ref()
            .or(self.fs.recovered.as_ref())
            .map(|r| r.notes.clone())
            .unwrap_or_default()
    }

    /// The journal replay done at open, if the journal needed recovery: in
    /// memory for a read-only open, on disk for a writable one.
    pub fn journal_replay(&self) -> Option<JournalReplay> {
        let (r, on_disk) = match (&self.fs.replay, &self.fs.recovered) {
            (Some(r), _) => (r, false),
            (None, Some(r)) => (r, true),
            (None, None) => return None,
        };
        Some(JournalReplay {
            transactions: r.transactions,
            blocks: r.blocks.len() as u64,
            revoked: r.revoked,
            on_disk,
        })
    }

    /// Write whole fs blocks through the journal as one transaction, with revoke
    /// records for the fs blocks in `revoked` (whose earlier journal copies must
    /// not be replayed), like debugfs's `journal_write`: a low-level tool for
    /// metadata changes made elsewhere and for crash tests. Each of `blocks` is
    /// (fs block, its new contents, one block long). With `checkpoint` true the
    /// journal is checkpointed and the image left clean before the call
    /// returns; with `checkpoint` false the transaction stays committed in the
    /// journal, the image needing recovery, as a crash right after the commit
    /// would leave it: not even closing the file system checkpoints it (as
    /// [`Ext::set_journal_checkpoint`]`(false)`).
    ///
    /// Errors: [`Error::ReadOnly`]; [`Error::Invalid`] without a journal, for a
    /// block past the file system or given twice; [`Error::NoSpace`] when the
    /// transaction does not fit the journal.
    pub fn journal_write(
        &self,
        blocks: &[(u64, &[u8])],
        revoked: &[u64],
        checkpoint: bool,
    ) -> Result<()> {
        if !self.fs.writable {
            return Err(Error::ReadOnly);
        }
        let _meta = lock(&self.fs.meta);
        self.fs.journal_commit(blocks, revoked, checkpoint)
    }

    /// Whether the journal is checkpointed (lazily: when the log runs short of
    /// space, and when the file system is closed; the default). Off, every
    /// transaction committed from then on stays in the journal, even at close,
    /// and the image needs recovery: for crash tests. No effect without a
    /// journal.
    pub fn set_journal_checkpoint(&self, on: bool) {
        if let Some(w) = lock(&self.fs.journal).as_mut() {
            w.checkpoint = on;
        }
    }

    /// Whether metadata writes go through a journal (a writable file system with
    /// has_journal).
    pub fn is_journaled(&self) -> bool {
        self.fs.journaled()
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.fs.sb
    }

    /// The fs block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.fs.sb.block_size
    }

    /// Whether the file system was opened for in-place writes.
    pub fn is_writable(&self) -> bool {
        self.fs.writable
    }

    /// Read inode `ino` (checksum verified with metadata_csum).
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        self.fs.read_inode(ino)
    }

    /// Resolve an absolute `path` (relative paths start at the root too) to its
    /// inode. Symlinks in the middle are always followed; the last component's
    /// only with `follow`. Errors: [`Error::Path`] naming the path, of kind
    /// `NotFound`, `NotADirectory` or `TooManySymlinks`.
    pub fn lookup(&self, path: &[u8], follow: bool) -> Result<Inode> {
        let root = self.fs.read_inode(ROOT_INO)?;
        if root.file_type() != FileType::Directory {
            return Err(Error::corrupt(
                CorruptKind::Inode,
                "the root inode is not a directory",
            ));
        }
        let mut parts: VecDeque<Vec<u8>> = split(path);
        let mut cur = root.clone();
        let mut links = 0;
        while let Some(name) = parts.pop_front() {
            if cur.file_type() != FileType::Directory {
                return Err(not_found(path, PathErrorKind::NotADirectory));
            }
            let entry = dir::Dir::new(&self.fs, &cur)?.lookup(&name)?;
            let Some(entry) = entry else {
                return Err(not_found(path, PathErrorKind::NotFound));
            };
            let next = self.fs.read_inode(entry.inode)?;
            if next.file_type() == FileType::Symlink && (follow || !parts.is_empty()) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(not_found(path, PathErrorKind::TooManySymlinks));
                }
                let target = self.read_link(&next)?;
                let mut t = split(&target);
                while let Some(p) = t.pop_back() {
                    parts.push_front(p);
                }
                if target.first() == Some(&b'/') {
                    cur = root.clone();
                }
                continue;
            }
            cur = next;
        }
        Ok(cur)
    }

    /// The entries of directory `dir`, in on-disk order, including `.` and `..`.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        if dir.file_type() != FileType::Directory {
            return Err(not_found(
                format!("inode {}", dir.ino).as_bytes(),
                PathErrorKind::NotADirectory,
            ));
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let limit = self.fs.io.size();
        let mut err = None;
        dir::Dir::new(&self.fs, dir)?.for_each(&mut |e| {
            bytes += 8 + e.name.len() as u64;
            if bytes > limit {
                err = Some(Error::corrupt(
                    CorruptKind::Directory,
                    format!(
                        "directory inode {} lists more than the image holds",
                        dir.ino
                    ),
                ));
                return true;
            }
            out.push(e);
            false
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The target of symlink `inode` (fast, inline or in a block).
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.file_type() != FileType::Symlink {
            return Err(Error::Invalid(format!(
                "inode {} is not a symlink",
                inode.ino
            )));
        }
        let size = inode.size;
        if size > u64::from(self.fs.sb.block_size).min(4096) {
            return Err(Error::corrupt(
                CorruptKind::Symlink,
                format!("symlink inode {} is {size} bytes long", inode.ino),
            ));
        }
        let size = size as usize;
        if inode.has_flag(inode_flags::INLINE_DATA) {
            let data = self.inline_data(inode)?;
            if data.len() != size {
                return Err(Error::corrupt(
                    CorruptKind::Symlink,
                    format!(
                        "symlink inode {}: {} bytes of inline data, i_size {size}",
                        inode.ino,
                        data.len()
                    ),
                ));
            }
            return Ok(data);
        }
        if map::is_fast_symlink(&self.fs, inode) {
            // A fast symlink: the target is in i_block.
            if size > 60 {
                return Err(Error::corrupt(
                    CorruptKind::Symlink,
                    format!("fast symlink inode {} is {size} bytes long", inode.ino),
                ));
            }
            return Ok(inode.i_block()[..size].to_vec());
        }
        let layout = Layout::of(&self.fs, inode)?;
        match layout.map(0, 1)?.mapping {
            Mapping::Mapped(b) => {
                let block = self.fs.read_block(b, "symlink block")?;
                Ok(block[..size].to_vec())
            }
            _ if size == 0 => Ok(Vec::new()),
            _ => Err(Error::corrupt(
                CorruptKind::Symlink,
                format!("symlink inode {} has no block for its target", inode.ino),
            )),
        }
    }

    /// The inline data of an inode (i_block, then `system.data`), cut at i_size.
    /// A file may be longer than its inline area (a sparse file made by
    /// truncate): the bytes past it read as zeros, as the kernel reads them, and
    /// are not returned here.
    fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut data = inode.i_block().to_vec();
        if let Some(more) = inode.inline_xattr(7, b"data")? {
            data.extend_from_slice(&more);
        }
        if inode.size < data.len() as u64 {
            data.truncate(inode.size as usize);
        }
        Ok(data)
    }

    /// The file's mapped extents, as `filefrag -v` lists them (written and
    /// unwritten, in logical order; holes are gaps).
    pub fn extents(&self, inode: &Inode) -> Result<Vec<FileExtent>> {
        let bs = u64::from(self.fs.sb.block_size);
        let layout = Layout::of(&self.fs, inode)?;
        layout.runs(inode.size.div_ceil(bs))
    }

    /// The block map of a file, as the engine sees it (no allocation; ext2/3
    /// mappings that end at the last pointer of an indirect block carry the
    /// boundary flag). It serves reads only: writes through it are refused (the
    /// ext client writes through [`ExtFile`]), and so is truncate.
    pub fn block_map(&self, inode: &Inode) -> Result<Arc<dyn crate::BlockMap>> {
        Ok(Arc::new(ExtMap {
            fs: Arc::clone(&self.fs),
            ino: inode.ino,
            layout: Arc::new(Layout::of(&self.fs, inode)?),
            block_size: self.fs.sb.block_size,
            i_size: inode.size,
            max_size: self.fs.max_file_size(inode),
            writes: false,
            replay: self.fs.replay.clone(),
        }))
    }

    /// Open a file's data: regular files (and anything else with data blocks) read
    /// through the engine; inline data from the inode.
    ///
    /// Every open of one inode on one open file system (this [`Ext`] and its
    /// clones) shares one state: the inode as read from disk when the first
    /// handle opened it (only `inode.ino` of the argument is used), its block map,
    /// the engine's range locks (sub-block writes from two handles to one block
    /// are serialised) and the size.
    pub fn open_file(&self, inode: &Inode) -> Result<ExtFile> {
        let node = self.node(inode.ino)?;
        let view = match &node.data {
            Data::Blocks { view_map, .. } => {
                // A handle of its own for `ExtFile::direct`: read-only, on a
                // state of its own, so nothing done through it reaches the
                // shared state (see there).
                let dev: Arc<dyn Device> = Arc::new(Fence::new(Arc::clone(self.fs.io.device())));
                let map: Arc<dyn crate::BlockMap> = Arc::clone(view_map) as _;
                Some(DirectFile::new(dev, map, Arc::new(FileState::new(node.size)))?.read_only())
            }
            Data::Inline(_) => None,
        };
        Ok(ExtFile {
            fs: Arc::clone(&self.fs),
            node,
            view,
        })
    }

    /// The shared node of inode `ino`: the open one, or a new one read from disk.
    fn node(&self, ino: u32) -> Result<Arc<Node>> {
        let mut open = lock(&self.fs.open);
        if let Some(node) = open.get(&ino).and_then(Weak::upgrade) {
            return Ok(node);
        }
        open.retain(|_, w| w.strong_count() > 0);
        if lock(&self.fs.writers).contains(&ino) {
            return Err(Error::Invalid(format!(
                "inode {ino} is open for writing through Ext::writer"
            )));
        }
        let inode = self.fs.read_inode(ino)?;
        if inode.has_flag(inode_flags::ENCRYPT) {
            return Err(Error::incompatible(
                Feature::Encryption,
                format!("inode {}: encrypted file", inode.ino),
            ));
        }
        if inode.file_type() == FileType::Directory {
            return Err(not_found(
                format!("inode {}", inode.ino).as_bytes(),
                PathErrorKind::IsADirectory,
            ));
        }
        let data = if inode.has_flag(inode_flags::INLINE_DATA) {
            Data::Inline(self.inline_data(&inode)?)
        } else {
            self.block_data(&inode)?
        };
        let node = Arc::new(Node {
            size: inode.size,
            inode: Mutex::new(inode),
            data,
        });
        open.insert(ino, Arc::downgrade(&node));
        Ok(node)
    }

    /// The engine side of a file with data blocks: its maps and the shared
    /// engine handle.
    fn block_data(&self, inode: &Inode) -> Result<Data> {
        let fs = &self.fs;
        let max_size = fs.max_file_size(inode);
        if inode.size > max_size {
            return Err(Error::corrupt(
                CorruptKind::Inode,
                format!(
                    "inode {}: size {} exceeds the format's limit",
                    inode.ino, inode.size
                ),
            ));
        }
        let layout = Arc::new(Layout::of(fs, inode)?);
        let dev = Arc::clone(fs.io.device());
        let writes = write_refusal(fs, inode).is_none();
        // The shared handle writes in place: no call on it may address bytes past
        // the logical block holding EOF (so it cannot grow the file or its size),
        // and a read-modify-write of that block stays inside it.
        let lb = u64::from(dev.geometry().logical_block.max(1));
        let engine_max = if writes {
            inode.size.div_ceil(lb).saturating_mul(lb)
        } else {
            max_size
        };
        let state = Arc::new(FileState::new(inode.size));
        let ext_map = |max_size, writes: bool| {
            Arc::new(ExtMap {
                fs: Arc::clone(fs),
                ino: inode.ino,
                layout: Arc::clone(&layout),
                block_size: fs.sb.block_size,
                i_size: inode.size,
                max_size,
                writes,
                replay: fs.replay.clone(),
            })
        };
        let map = ext_map(engine_max, writes);
        let view_map = ext_map(max_size, false);
        let fenced: Arc<dyn Device> = Arc::new(Fence::new(dev));
        let engine_map: Arc<dyn crate::BlockMap> = Arc::clone(&map) as _;
        let engine =
            DirectFile::new(fenced, engine_map, Arc::clone(&state)).map_err(|e| match e {
                Error::Invalid(m) => Error::incompatible(Feature::BlockSize, m),
                e => e,
            })?;
        let engine = if writes { engine } else { engine.read_only() };
        Ok(Data::Blocks {
            engine,
            map,
            view_map,
        })
    }
}

/// Why in-place writes to `inode` are refused, if they are.
fn write_refusal(fs: &Fs, inode: &Inode) -> Option<Error> {
    let ino = inode.ino;
    if !fs.writable {
        return Some(Error::ReadOnly);
    }
    if inode.file_type() != FileType::Regular {
        return Some(Error::Invalid(format!(
            "inode {ino} is a {}, not a regular file",
            inode.file_type().name()
        )));
    }
    if inode.has_flag(inode_flags::IMMUTABLE) || inode.has_flag(inode_flags::APPEND) {
        return Some(Error::os(
            format!("inode {ino} is immutable or append-only"),
            std::io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    if inode.has_flag(inode_flags::VERITY) {
        return Some(Error::incompatible(
            Feature::Verity,
            format!("inode {ino} is an fs-verity file: its data cannot change"),
        ));
    }
    if inode.has_flag(inode_flags::INLINE_DATA) {
        return Some(Error::incompatible(
            Feature::InlineData,
            format!("inode {ino} keeps its data inline: in-place writes need data blocks"),
        ));
    }
    None
}

/// What a journal replay did (see [`Ext::journal_replay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalReplay {
    /// Committed transactions replayed.
    pub transactions: u64,
    /// Distinct fs blocks whose journal copy stands in for the image's (in
    /// memory) or was written in place (on disk).
    pub blocks: u64,
    /// Journal copies skipped because a revoke record cancels them.
    pub revoked: u64,
    /// Replayed on disk (a writable open), not in memory.
    pub on_disk: bool,
}

fn check_size(io: &MetaIo, sb: &Superblock) -> Result<()> {
    let bs = u64::from(sb.block_size);
    let image_blocks = io.size() / bs;
    if sb.blocks_count > image_blocks {
        return Err(Error::corrupt(
            CorruptKind::Superblock,
            format!(
                "the file system has {} blocks of {bs} bytes, the image holds only {image_blocks}",
                sb.blocks_count
            ),
        ));
    }
    Ok(())
}

fn split(path: &[u8]) -> VecDeque<Vec<u8>> {
    path.split(|&c| c == b'/')
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// One open inode, shared by every [`ExtFile`] of it on one open file system.
struct Node {
    /// The inode as last read or written.
    inode: Mutex<Inode>,
    /// i_size (the ext client never changes it).
    size: u64,
    data: Data,
}

enum Data {
    Blocks {
        /// The shared engine handle: reads, and writes when the file may be
        /// written (its map then checks every write), on the shared state.
        engine: DirectFile,
        /// Its block map.
        map: Arc<ExtMap>,
        /// The map of read-only views (writes refused, the format's size limit).
        view_map: Arc<ExtMap>,
    },
    Inline(Vec<u8>),
}

/// One open file of an ext image. Handles of one inode share their state (see
/// [`Ext::open_file`]).
pub struct ExtFile {
    fs: Arc<Fs>,
    node: Arc<Node>,
    /// What [`ExtFile::direct`] hands out.
    view: Option<DirectFile>,
}

impl std::fmt::Debug for ExtFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtFile")
            .field("size", &self.node.size)
            .field("inline", &matches!(self.node.data, Data::Inline(_)))
            .finish()
    }
}

impl ExtFile {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.node.size
    }

    /// The inode as last read or written.
    pub fn inode(&self) -> Inode {
        lock(&self.node.inode).clone()
    }

    /// The file as a read-only [`DirectFile`] over the ext block map (for
    /// pipelines of async reads); `None` for inline data.
    ///
    /// Read-only: writes fail with [`Error::ReadOnly`] (in-place writes go through
    /// [`ExtFile::write_at`], or [`ExtFile::overwriter`]), and a truncate fails
    /// without changing a byte on disk. It has a state of its own (its size
    /// starts at i_size), so nothing done through it reaches the file's shared
    /// state.
    ///
    /// Also `None` when the journal replayed in memory holds an escaped copy of
    /// some block (one that began with the journal's magic number, stored with
    /// those four bytes zeroed): the engine would read the copy as stored, and
    /// only [`ExtFile::read_at`] puts the magic back.
    pub fn direct(&self) -> Option<&DirectFile> {
        if self.fs.replay.as_ref().is_some_and(|r| r.escaped > 0) {
            return None;
        }
        self.view.as_ref()
    }

    /// A [`DirectFile`] for in-place overwrites (fsx and other users of the
    /// engine's full API), on the file's shared state: its calls exclude the
    /// sub-block writes of every other handle of the inode.
    ///
    /// It does what the ext client supports and nothing else: no call may address
    /// bytes past the logical block holding EOF ([`Error::TooLarge`]); a write
    /// that meets a hole, an unwritten extent or a byte past i_size fails
    /// ([`Error::Invalid`], or [`Error::Io`] when the engine found it at
    /// submission) and those blocks are never written; truncate fails without
    /// changing a byte on disk. Timestamps are not updated: call
    /// [`ExtFile::touch`] when done.
    ///
    /// Refused as [`ExtFile::check_write`] refuses any write to this file.
    pub fn overwriter(&self) -> Result<DirectFile> {
        self.check_write(0, 0)?;
        match &self.node.data {
            Data::Blocks { engine, .. } => Ok(engine.clone()),
            Data::Inline(_) => Err(Error::incompatible(
                Feature::InlineData,
                format!(
                    "inode {} keeps its data inline: in-place writes need data blocks",
                    self.inode().ino
                ),
            )),
        }
    }

    /// Read at any offset into any buffer (byte-granular through the engine);
    /// short at EOF.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.node.size;
        if offset >= size {
            return Ok(0);
        }
        let n = usize::try_from(size - offset)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let buf = &mut buf[..n];
        match &self.node.data {
            Data::Blocks { engine, map, .. } => {
                let n = engine.read_at(offset, buf, Flags::UNALIGNED)?;
                self.unescape(map, offset, &mut buf[..n])?;
                Ok(n)
            }
            Data::Inline(data) => {
                // Inline bytes, then zeros up to i_size.
                let from = usize::try_from(offset).unwrap_or(usize::MAX);
                let head = data.get(from..).unwrap_or(&[]);
                let k = head.len().min(n);
                buf[..k].copy_from_slice(&head[..k]);
                buf[k..].fill(0);
                Ok(n)
            }
        }
    }

    /// Put back the journal magic at the start of every block of `buf` (read at
    /// `offset`) whose replayed copy the journal keeps escaped.
    fn unescape(&self, map: &ExtMap, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(replay) = self.fs.replay.as_ref().filter(|r| r.escaped > 0) else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.fs.sb.block_size);
        let end = offset + buf.len() as u64;
        let (mut b, last) = (offset / bs, (end - 1) / bs);
        let mut magic = [0u8; 4];
        journal::Replay::unescape(&mut magic);
        while b <= last {
            let e = map.layout.map(b, last - b + 1)?;
            let len = e.len.clamp(1, last - b + 1);
            if let Mapping::Mapped(p) = e.mapping {
                for (&jb, copy) in replay.blocks.range(p..p + len) {
                    if !copy.escaped {
                        continue;
                    }
                    let at = (b + (jb - p)) * bs;
                    for (i, &m) in magic.iter().enumerate() {
                        let x = at + i as u64;
                        if (offset..end).contains(&x) {
                            buf[(x - offset) as usize] = m;
                        }
                    }
                }
            }
            b += len;
        }
        Ok(())
    }

    /// Check that `len` bytes at `offset` can be overwritten in place: the file
    /// system is writable, the file is a regular file that may be written, the
    /// range is inside i_size and every block under it is written (no hole, no
    /// unwritten extent). Nothing is written.
    pub fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(e) = write_refusal(&self.fs, &self.inode()) {
            return Err(e);
        }
        let size = self.node.size;
        let end = offset.saturating_add(len);
        if end > size {
            return Err(Error::Invalid(format!(
                "writing {len} bytes at offset {offset} would grow the file past its {size} bytes: in-place writes do not allocate"
            )));
        }
        let Data::Blocks { map, .. } = &self.node.data else {
            return Err(Error::incompatible(
                Feature::InlineData,
                format!(
                    "inode {} keeps its data inline: in-place writes need data blocks",
                    self.inode().ino
                ),
            ));
        };
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.fs.sb.block_size);
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut b = first;
        while b <= last {
            let e = map.layout.map(b, last - b + 1)?;
            match e.mapping {
                Mapping::Mapped(_) => b += e.len,
                Mapping::Hole => {
                    return Err(Error::Invalid(format!(
                        "offset {} is in a hole: in-place writes do not allocate",
                        b * bs
                    )))
                }
                Mapping::Unwritten(_) => {
                    return Err(Error::Invalid(format!(
                        "offset {} is in an unwritten (preallocated) extent: in-place writes do not convert extents",
                        b * bs
                    )))
                }
            }
        }
        Ok(())
    }

    /// Overwrite `data` at `offset` in place, after [`ExtFile::check_write`] of the
    /// whole range (a refused write changes nothing). Does not update the
    /// timestamps: call [`ExtFile::touch`] once the writes are done, or use
    /// [`ExtFile::overwrite`].
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        self.check_write(offset, data.len() as u64)?;
        let Data::Blocks { engine, .. } = &self.node.data else {
            unreachable!("check_write refuses inline data");
        };
        let n = engine.write_at(offset, data, Flags::UNALIGNED)?;
        if n != data.len() {
            return Err(Error::corrupt(
                CorruptKind::BlockMap,
                format!("short in-place write: {n} of {} bytes", data.len()),
            ));
        }
        Ok(n)
    }

    /// Set mtime and ctime to now and rewrite the inode (with its checksum),
    /// starting from the inode as it is on disk now, under the file system's
    /// metadata lock. With a journal (ext3, ext4) the inode's block is committed
    /// as a jbd2 transaction (after a flush, so data written before is durable
    /// first) and then written in place: on return it survives a crash. While a
    /// batch is open ([`Ext::begin_batch`]) the change joins the batch and is
    /// written with it.
    pub fn touch(&self) -> Result<()> {
        if !self.fs.writable {
            return Err(Error::ReadOnly);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t = Timestamp {
            secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nsecs: now.subsec_nanos(),
        };
        let mut guard = lock(&self.node.inode);
        let fresh = self.fs.update_inode(guard.ino, |i| {
            i.set_time(inode::OFF_MTIME, inode::OFF_MTIME_EXTRA, t);
            i.set_time(inode::OFF_CTIME, inode::OFF_CTIME_EXTRA, t);
            i.mtime = t;
            i.ctime = t;
        })?;
        *guard = fresh;
        Ok(())
    }

    /// [`ExtFile::write_at`], then [`ExtFile::touch`].
    pub fn overwrite(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let n = self.write_at(offset, data)?;
        self.touch()?;
        Ok(n)
    }
}
