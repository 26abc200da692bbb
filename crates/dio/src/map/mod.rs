//! Block maps: the file system side of direct I/O (the seed's `get_block`). A block
//! map answers "where on the device is file block N, and for how many blocks?" and
//! may allocate on writes. It owns no I/O policy: the engine decides what to do with
//! holes, new blocks and boundaries.

use std::any::Any;
use std::sync::Arc;

use crate::device::{Device, Op, Request};
use crate::Result;

mod raw;
mod test_map;

pub(crate) use raw::RawMap;
pub use test_map::{TestMap, TestMapConfig};

/// Opaque data a block map attaches to a mapping, handed back to its
/// [`BlockMap::end_io`] hook (the seed's `b_private`).
pub type Private = Arc<dyn Any + Send + Sync>;

/// Where a run of file blocks lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// No device blocks: reads see zeros, writes must allocate.
    Hole,
    /// Written blocks starting at this device block (in fs blocks).
    Mapped(u64),
    /// Allocated but never written (preallocated) blocks at this device block: reads
    /// see zeros; a write fills them and the map converts them in `end_io`.
    Unwritten(u64),
}

/// The answer of a block map: a run of `len` file blocks and where they live.
#[derive(Clone)]
#[non_exhaustive]
pub struct Extent {
    /// Hole, mapped or unwritten.
    pub mapping: Mapping,
    /// Length in fs blocks (at least 1).
    pub len: u64,
    /// The blocks were allocated by this call: parts a write does not cover must be
    /// zeroed so no stale device data shows.
    pub new: bool,
    /// The block after this extent needs a metadata read: send the request now.
    pub boundary: bool,
    /// Complete the request in a worker, not in the device's completion context.
    pub defer_completion: bool,
    /// Handed back to `end_io`.
    pub private: Option<Private>,
}

impl std::fmt::Debug for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extent")
            .field("mapping", &self.mapping)
            .field("len", &self.len)
            .field("new", &self.new)
            .field("boundary", &self.boundary)
            .field("defer_completion", &self.defer_completion)
            .field("private", &self.private.is_some())
            .finish()
    }
}

impl Extent {
    /// A hole of `len` blocks.
    pub fn hole(len: u64) -> Extent {
        Extent::with(Mapping::Hole, len)
    }
    /// `len` written blocks at device block `block`.
    pub fn mapped(block: u64, len: u64) -> Extent {
        Extent::with(Mapping::Mapped(block), len)
    }
    /// `len` unwritten blocks at device block `block`.
    pub fn unwritten(block: u64, len: u64) -> Extent {
        Extent::with(Mapping::Unwritten(block), len)
    }
    fn with(mapping: Mapping, len: u64) -> Extent {
        Extent {
            mapping,
            len,
            new: false,
            boundary: false,
            defer_completion: false,
            private: None,
        }
    }
    /// Mark as freshly allocated.
    pub fn new_blocks(mut self, new: bool) -> Extent {
        self.new = new;
        self
    }
    /// Mark the boundary.
    pub fn boundary(mut self, boundary: bool) -> Extent {
        self.boundary = boundary;
        self
    }
    /// Ask for deferred completion.
    pub fn defer_completion(mut self, defer: bool) -> Extent {
        self.defer_completion = defer;
        self
    }
    /// Attach private data.
    pub fn private(mut self, private: Private) -> Extent {
        self.private = Some(private);
        self
    }
    /// The device block, if the extent has one.
    pub fn device_block(&self) -> Option<u64> {
        match self.mapping {
            Mapping::Hole => None,
            Mapping::Mapped(b) | Mapping::Unwritten(b) => Some(b),
        }
    }
}

/// The file system side of direct I/O.
pub trait BlockMap: Send + Sync {
    /// The fs block size in bytes (a power of two, at least the device's logical
    /// block, at most 64 KiB).
    fn block_size(&self) -> u32;

    /// Map file block `block` for up to `max_blocks` blocks. With `create`, a hole
    /// may be allocated (and the extent marked `new`). Errors pass through to the
    /// caller of the request.
    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent>;

    /// Called once a request is done, with its file offset, its result and the
    /// private data of the last mapping; may replace the result (the seed's
    /// `end_io`): convert unwritten extents, update metadata.
    fn end_io(
        &self,
        op: Op,
        offset: u64,
        result: Result<usize>,
        private: Option<&Private>,
    ) -> Result<usize> {
        let _ = (op, offset, private);
        result
    }

    /// The [`BlockMap::end_io`] of a write made with [`crate::Flags::DSYNC`]:
    /// the write completes (returns, or has its completion delivered) only once
    /// this returns, and must then be durable. `size` is the file size the
    /// write reaches when it extends the file (the engine records it after this
    /// hook); `flush` says whether durability needs a device flush (the write
    /// allocated blocks, extended the file, or its data went without FUA).
    ///
    /// The default calls `end_io` and then, when `flush` and the write wrote
    /// bytes, flushes `dev`. A file system that keeps metadata changes in memory
    /// until a later commit (converted extents, the size) overrides it to put
    /// them on stable storage here, flushing `dev` itself as its ordering needs:
    /// the engine sends no flush of its own after this hook.
    fn end_io_dsync(
        &self,
        dev: &dyn Device,
        offset: u64,
        result: Result<usize>,
        private: Option<&Private>,
        size: Option<u64>,
        flush: bool,
    ) -> Result<usize> {
        let _ = size;
        let r = self.end_io(Op::Write, offset, result, private);
        match r {
            Ok(n) if n > 0 && flush => match dev.flush() {
                Ok(()) => Ok(n),
                Err(e) => Err(crate::Error::io(offset, e)),
            },
            r => r,
        }
    }

    /// Whether [`BlockMap::end_io`] does anything. A map that keeps the default
    /// `end_io` may answer false, and the engine then skips the call (one dynamic
    /// call and a move of the result less per direct-I/O call). Asked once, when a
    /// [`crate::DirectFile`] is opened; the default, true, is always correct.
    fn has_end_io(&self) -> bool {
        true
    }

    /// Submit one device request (the seed's `submit_io`): the default sends it to
    /// the device. A file system may submit it itself (checksums, RAID mapping), and
    /// must then complete it exactly once with [`Request::complete`].
    fn submit_io(&self, dev: &dyn Device, req: Request, file_offset: u64) {
        let _ = file_offset;
        dev.submit(req);
    }

    /// Whether the file may change size to `size` (grow or shrink): asked by
    /// [`crate::DirectFile::truncate`] before it changes anything (it zeroes the new
    /// last block's tail, sets the size, and calls [`BlockMap::truncate`] when
    /// shrinking). A file system that cannot change sizes refuses here.
    fn can_resize(&self, size: u64) -> Result<()> {
        let _ = size;
        Ok(())
    }

    /// The file was truncated to `size`: drop the blocks past it.
    fn truncate(&self, size: u64) -> Result<()> {
        let _ = size;
        Ok(())
    }

    /// The largest file size this file system supports.
    fn max_file_size(&self) -> u64 {
        i64::MAX as u64
    }

    /// Whether a byte-granular write ([`crate::Flags::UNALIGNED`]) whose padded last
    /// block reaches past the file size must be followed by
    /// [`BlockMap::trim_padding`]: true for a map whose storage keeps a size of its
    /// own that the padding grows (a host file under the raw client). The default,
    /// false, costs nothing: the padding stays inside the last block, past i_size.
    fn trims_padding(&self) -> bool {
        false
    }

    /// A byte-granular write padded its last logical block to a whole block past
    /// where its bytes end, and grew the storage beyond `size`, the file size with
    /// this write counted: cut the storage back to `size`. Called only when
    /// [`BlockMap::trims_padding`] answers true, before the write completes, while
    /// the engine keeps every other write at or past the write's first block out
    /// (it holds their block range) and no truncate runs: nothing but this write's
    /// padding lies past `size`. It must never grow the storage. An error fails the
    /// write (its bytes are on the device; the size is not).
    fn trim_padding(&self, size: u64) -> Result<()> {
        let _ = size;
        Ok(())
    }
}

/// The identity map of a raw file or block device: file block N is device block N.
#[derive(Debug, Clone)]
pub struct IdentityMap {
    block_size: u32,
    blocks: u64,
}

impl IdentityMap {
    /// An identity map over a device of `device_size` bytes with `block_size`-byte
    /// blocks.
    pub fn new(block_size: u32, device_size: u64) -> IdentityMap {
        IdentityMap {
            block_size,
            blocks: device_size.div_ceil(u64::from(block_size.max(1))),
        }
    }
}

impl BlockMap for IdentityMap {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&self, block: u64, max_blocks: u64, _create: bool) -> Result<Extent> {
        if block >= self.blocks {
            return Ok(Extent::hole(max_blocks.max(1)));
        }
        Ok(Extent::mapped(block, max_blocks.min(self.blocks - block)))
    }

    fn max_file_size(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }

    fn has_end_io(&self) -> bool {
        false
    }
}
