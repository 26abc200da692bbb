//! The engine: direct reads and writes of one file, given its block map, its device
//! and its state. Sync calls borrow the caller's buffers; async calls own them and
//! complete through a callback or a [`DioFuture`].
//!
//! Layers: `request` (validation, locks, sync/async), `walk` (buffers against the
//! block map), `bio` (pieces into device requests), `complete` (counting, waiting,
//! result rules). The commonest call, a sync read of one aligned buffer that one
//! extent maps and one request carries, takes a short way through `request` (no
//! walk, no builder); anything else, or a lookup that answers less, goes the whole
//! way. Per-file counters that every call writes (the in-flight count, the byte
//! counters) are sharded by thread (`shard`), so threads on one file share no
//! written cache line.

mod atomic;
mod bio;
mod complete;
mod request;
mod shard;
mod state;
mod unaligned;
mod walk;

use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::buf::{self, MemRef, OwnedBuf};
use crate::device::{CompletionMode, Device, Geometry, Op};
use crate::map::{BlockMap, Mapping};
use crate::AlignedBuf;
use crate::{Error, Result};

pub use bio::{MAX_IN_FLIGHT, MAX_SEGMENTS};
pub(crate) use complete::DeferCompletions;
pub(crate) use state::{Begin, Held, Job, LockKind};
pub use state::{FileLockGuard, FileState};

/// Per-request flags (the seed's DIO_* flags and iocb flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(u32);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Hold the file lock (shared) while blocks are looked up.
    pub const LOCKING: Flags = Flags(1);
    /// Never allocate inside i_size: a write that meets a hole stops there.
    pub const SKIP_HOLES: Flags = Flags(1 << 1);
    /// Let an async write that extends the file finish in the device's completion
    /// context (without it, the finish, which moves the size and calls the map's
    /// `end_io`, runs on dio's completion worker, where it may block).
    pub const ASYNC_EXTEND: Flags = Flags(1 << 2);
    /// Do not count the call in the file's in-flight count (the caller excludes
    /// truncate itself).
    pub const SKIP_DIO_COUNT: Flags = Flags(1 << 3);
    /// O_DSYNC: the data is durable when the call completes (FUA writes, plus a
    /// flush when metadata changed).
    pub const DSYNC: Flags = Flags(1 << 4);
    /// High priority: a sync call polls the device for completions before it sleeps
    /// (a device whose completions come by polling is always polled); when a poll
    /// finds nothing it sleeps until a completion wakes it, so it never spins.
    pub const POLL: Flags = Flags(1 << 5);
    /// Fail with [`Error::WouldBlock`] instead of waiting for another write that
    /// shares a block.
    pub const NOWAIT: Flags = Flags(1 << 6);
    /// Byte-granular I/O: accept any offset, length and buffer address.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use dio::{DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
    /// # let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
    /// # let file = DirectFile::new(dev, Arc::new(IdentityMap::new(4096, 1 << 20)), Arc::new(FileState::new(1 << 20))).unwrap();
    /// file.write_at(1000, b"hello", Flags::UNALIGNED).unwrap();
    /// let mut back = [0u8; 5];
    /// file.read_at(1000, &mut back, Flags::UNALIGNED).unwrap();
    /// assert_eq!(&back, b"hello");
    /// // Without the flag the kernel's answer: EINVAL.
    /// assert_eq!(file.read_at(1000, &mut back, Flags::NONE).unwrap_err().errno(), libc::EINVAL);
    /// ```
    ///
    /// The aligned
    /// middle still goes straight from the caller's memory; partial blocks go
    /// through bounce buffers, and writes read-modify-write them under the block
    /// range lock. Without it, misaligned requests fail with EINVAL.
    pub const UNALIGNED: Flags = Flags(1 << 7);
    /// Untorn write (the kernel's `RWF_ATOMIC`): the write lands whole or not at
    /// all, even across a power loss. The engine sends it as exactly one device
    /// request flagged [`Request::atomic`](crate::Request::atomic) (passed to the
    /// kernel as `RWF_ATOMIC` by the io_uring and pread back ends), and refuses,
    /// before a byte moves, with [`Error::Incompatible`] for
    /// [`Feature::AtomicWrite`](crate::Feature::AtomicWrite) naming the rule and the
    /// sizes the device takes, any write that cannot be untorn: on a device without
    /// atomic write units ([`DirectFile::atomic_write_units`]), of a length that is
    /// not a power of two within them, at an offset (file or device) that is not a
    /// multiple of its length, over a range the block map does not map as one run
    /// of written blocks, or one that would need [`Flags::UNALIGNED`]'s padding.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use dio::{AlignedBuf, DirectFile, FileState, Flags, Geometry, IdentityMap, MemDevice, MemDeviceConfig};
    /// let geo = Geometry::new(512, 1 << 20).with_atomic_write(4096, 65536, 0);
    /// let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512).geometry(geo)));
    /// let file = DirectFile::new(dev, Arc::new(IdentityMap::new(4096, 1 << 20)), Arc::new(FileState::new(1 << 20))).unwrap();
    /// assert_eq!(file.atomic_write_units(), Some((4096, 65536)));
    /// let buf = AlignedBuf::new(16384, 4096);
    /// assert_eq!(file.write_at(16384, &buf, Flags::ATOMIC).unwrap(), 16384);
    /// // 16 KiB at 4 KiB is not aligned to its length: refused, nothing written.
    /// let e = file.write_at(4096, &buf, Flags::ATOMIC).unwrap_err();
    /// assert!(matches!(e, dio::Error::Incompatible(ref i) if i.feature == dio::Feature::AtomicWrite));
    /// ```
    pub const ATOMIC: Flags = Flags(1 << 8);

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Flags {
    type Output = Flags;
    fn bitand(self, rhs: Flags) -> Flags {
        Flags(self.0 & rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

/// Bytes moved through one [`DirectFile`] (the seed's per-task I/O accounting),
/// and how its calls were cut into device requests. For counts per device request
/// (requests, in flight, latency), wrap the device in a
/// [`StatsDevice`](crate::StatsDevice).
///
/// Every completed call adds to them: each counter is sharded by thread (a line
/// per shard), so threads doing I/O on one file do not all write one cache line;
/// reading one sums the shards.
#[derive(Debug, Default)]
pub struct Stats {
    read: shard::Sharded,
    written: shard::Sharded,
    merges: shard::Sharded,
    splits: shard::Sharded,
}

impl Stats {
    /// Bytes read by completed calls.
    pub fn bytes_read(&self) -> u64 {
        self.read.sum(Ordering::Relaxed)
    }
    /// Bytes written by completed calls.
    pub fn bytes_written(&self) -> u64 {
        self.written.sum(Ordering::Relaxed)
    }
    /// Merges: pieces of calls (a buffer, or the part of one in a block-map
    /// extent) that joined a device request already under way rather than starting
    /// one (the block layer's back merges).
    pub fn merges(&self) -> u64 {
        self.merges.sum(Ordering::Relaxed)
    }
    /// Splits: extra device requests a piece needed because it did not fit in one
    /// (the device's byte or segment limit, or an alignment cut).
    pub fn splits(&self) -> u64 {
        self.splits.sum(Ordering::Relaxed)
    }
    /// Add one call's merges and splits (counted locally, published once).
    pub(crate) fn add_cuts(&self, merges: u64, splits: u64) {
        if merges != 0 {
            self.merges.add(merges);
        }
        if splits != 0 {
            self.splits.add(splits);
        }
    }
}

/// What an I/O scope does while it waits for the requests over its memory: poll a
/// device whose completions need it (nothing else delivers them), else nothing.
pub(crate) fn drain(file: &Shared) -> impl FnMut() + '_ {
    // Asked only when the scope has to wait (after a panic): not on every call.
    move || {
        if file.dev.completion_mode() == CompletionMode::Polled {
            let _ = file.dev.poll(true);
        }
    }
}

/// What every call on one file shares, read by every call.
///
/// Aligned to 128 bytes, so that in its `Arc` allocation the reference count has
/// lines of its own: an async call that no [`DirectFile`] handle started (the
/// byte-granular layer's, a parked retry) clones the `Arc` (its completion needs
/// the file), and that write must not evict these fields from the other cores.
/// Calls a handle starts carry the handle's own reference instead ([`Handle`]).
#[repr(align(128))]
pub(crate) struct Shared {
    pub(crate) dev: Arc<dyn Device>,
    pub(crate) map: Arc<dyn BlockMap>,
    pub(crate) state: Arc<FileState>,
    pub(crate) geometry: Geometry,
    pub(crate) fs_block: u32,
    pub(crate) read_only: bool,
    /// Whether the map's end_io does anything ([`BlockMap::has_end_io`], asked once).
    pub(crate) end_io: bool,
    pub(crate) stats: Stats,
}

/// A file open for direct I/O: a block map, a device and the file's state.
pub struct DirectFile {
    shared: Arc<Shared>,
    /// This handle's own reference to the file, for the calls it starts to carry.
    handle: Arc<Handle>,
}

/// One [`DirectFile`] handle's reference to the file, which its async calls and
/// futures clone instead of the file's `Arc` (the reference count every handle of
/// the file shares): threads that each use a handle of their own (a clone) then
/// write no common line per call. Aligned to 128 bytes, so that its count has its
/// lines to itself.
#[repr(align(128))]
pub(crate) struct Handle(pub(crate) Arc<Shared>);

impl DirectFile {
    fn from_shared(shared: Arc<Shared>) -> DirectFile {
        DirectFile {
            handle: Arc::new(Handle(Arc::clone(&shared))),
            shared,
        }
    }
}

/// A clone is a new handle on the same file (sharing everything of it); give each
/// thread its own clone, so that the async calls of one thread and another touch no
/// reference count in common.
impl Clone for DirectFile {
    fn clone(&self) -> DirectFile {
        DirectFile::from_shared(Arc::clone(&self.shared))
    }
}

impl std::fmt::Debug for DirectFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFile")
            .field("device", &self.shared.dev.name())
            .field("fs_block", &self.shared.fs_block)
            .field("size", &self.shared.state.size())
            .finish()
    }
}

/// The outcome of an async call: the result and the caller's buffers back.
#[derive(Debug)]
pub struct Completed<B> {
    /// Bytes transferred, or the error.
    pub result: Result<usize>,
    /// The buffers given to the call.
    pub bufs: Vec<B>,
}

impl DirectFile {
    /// Open a file for direct I/O over `dev` with block map `map` and state `state`.
    ///
    /// Fails if the device geometry is unusable or the map's block size is not a
    /// power of two between the device's logical block and 64 KiB.
    pub fn new(
        dev: Arc<dyn Device>,
        map: Arc<dyn BlockMap>,
        state: Arc<FileState>,
    ) -> Result<DirectFile> {
        let geometry = dev.geometry();
        geometry.validate()?;
        let fs_block = map.block_size();
        if !fs_block.is_power_of_two()
            || fs_block < geometry.logical_block
            || fs_block as usize > buf::ZERO_LEN
        {
            return Err(Error::Invalid(format!(
                "fs block size {fs_block} must be a power of two from the device's logical block ({}) to 64 KiB",
                geometry.logical_block
            )));
        }
        let end_io = map.has_end_io();
        Ok(DirectFile::from_shared(Arc::new(Shared {
            dev,
            end_io,
            map,
            state,
            geometry,
            fs_block,
            read_only: false,
            stats: Stats::default(),
        })))
    }

    /// The same file, refusing writes with [`Error::ReadOnly`] (EBADF).
    pub fn read_only(self) -> DirectFile {
        let s = &self.shared;
        DirectFile::from_shared(Arc::new(Shared {
            dev: Arc::clone(&s.dev),
            map: Arc::clone(&s.map),
            state: Arc::clone(&s.state),
            geometry: s.geometry,
            fs_block: s.fs_block,
            read_only: true,
            end_io: s.end_io,
            stats: Stats::default(),
        }))
    }

    /// The same file (block map, state, read-only or not) over `dev`, a wrapper of
    /// this file's device such as a [`StatsDevice`](crate::StatsDevice). Both
    /// handles may be used at once; their [`Stats`] are separate. Fails with
    /// [`Error::Invalid`] unless `dev` has this device's geometry.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use dio::{DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig, StatsDevice};
    /// # let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
    /// # let file = DirectFile::new(dev, Arc::new(IdentityMap::new(4096, 1 << 20)), Arc::new(FileState::new(1 << 20))).unwrap();
    /// let counted = Arc::new(StatsDevice::new(file.device().clone()));
    /// let observed = file.with_device(counted.clone()).unwrap();
    /// observed.write_at(0, &[0u8; 4096], Flags::UNALIGNED).unwrap();
    /// assert_eq!(counted.stats().writes, 1);
    /// ```
    pub fn with_device(&self, dev: Arc<dyn Device>) -> Result<DirectFile> {
        let s = &self.shared;
        if dev.geometry() != s.geometry {
            return Err(Error::Invalid(format!(
                "with_device: device \"{}\" has geometry {:?}, the file's device {:?}",
                dev.name(),
                dev.geometry(),
                s.geometry
            )));
        }
        Ok(DirectFile::from_shared(Arc::new(Shared {
            dev,
            map: Arc::clone(&s.map),
            state: Arc::clone(&s.state),
            geometry: s.geometry,
            fs_block: s.fs_block,
            read_only: s.read_only,
            end_io: s.end_io,
            stats: Stats::default(),
        })))
    }

    /// The file's state (size, locks, in-flight count).
    pub fn state(&self) -> &Arc<FileState> {
        &self.shared.state
    }
    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.shared.dev
    }
    /// The device geometry.
    pub fn geometry(&self) -> Geometry {
        self.shared.geometry
    }
    /// The fs block size.
    pub fn block_size(&self) -> u32 {
        self.shared.fs_block
    }
    /// Current file size.
    pub fn size(&self) -> u64 {
        self.shared.state.size()
    }
    /// Bytes moved so far, merges and splits.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The sizes of untorn writes ([`Flags::ATOMIC`]) the device offers,
    /// `(unit_min, unit_max)` in bytes (powers of two; a write must also be aligned
    /// to its length), or `None` where it offers none. For a host file or block
    /// device these are what statx (`STATX_WRITE_ATOMIC`) reports for it.
    pub fn atomic_write_units(&self) -> Option<(u32, u32)> {
        self.shared.geometry.atomic_write_units()
    }

    /// The alignment a caller needs, as statx(STATX_DIOALIGN) reports it: memory
    /// address alignment and file offset/length alignment.
    pub fn dio_align(&self) -> (u32, u32) {
        (
            self.shared.geometry.mem_align,
            self.shared.geometry.logical_block,
        )
    }

    /// Read at `offset` into `bufs`, synchronously. Returns the bytes read (short at
    /// EOF, 0 at or past it).
    pub fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>], flags: Flags) -> Result<usize> {
        let file = &self.shared;
        if flags.contains(Flags::UNALIGNED)
            && !unaligned::is_aligned(
                file,
                offset,
                bufs.iter().map(|b| (b.as_ptr() as usize, b.len())),
            )
        {
            if flags.contains(Flags::ATOMIC) {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                return Err(atomic::refuse_unaligned(file, Op::Read, offset, len));
            }
            return unaligned::read(file, offset, bufs, flags);
        }
        buf::io_scope(drain(file), |scope| {
            let mem = scope.lend_mut(bufs);
            if let Some(r) = request::read_one(file, offset, mem, scope.lender(), flags) {
                return r;
            }
            request::run(
                file,
                Op::Read,
                offset,
                mem,
                scope.lender(),
                flags,
                None,
                None,
                request::Extra::default(),
            )
            .expect("a sync call returns its result")
        })
        .map_err(|e| *e)
    }

    /// Write `bufs` at `offset`, synchronously. Returns the bytes written (short if
    /// a hole needing allocation stopped it, see [`Error::Hole`]).
    pub fn write(&self, offset: u64, bufs: &[IoSlice<'_>], flags: Flags) -> Result<usize> {
        self.write_with(offset, bufs, flags, None)
    }

    /// Write with a pin step: `pin` is called on every piece of memory before the
    /// device sees it (as the kernel pins user pages) and may refuse it, e.g. when
    /// memory cannot be locked or registered. A refusal is a memory fault: blocks
    /// already mapped for the write get zeros, never their old contents, and the
    /// call returns the bytes before the fault or [`Error::MemoryFault`].
    pub fn write_pinned(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
        flags: Flags,
        mut pin: impl FnMut(MemRef) -> bool,
    ) -> Result<usize> {
        self.write_with(offset, bufs, flags, Some(&mut pin))
    }

    /// A sync write, with a pin step or none.
    fn write_with(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
        flags: Flags,
        pin: Option<&mut dyn FnMut(MemRef) -> bool>,
    ) -> Result<usize> {
        let file = &self.shared;
        if flags.contains(Flags::UNALIGNED)
            && !unaligned::is_aligned(
                file,
                offset,
                bufs.iter().map(|b| (b.as_ptr() as usize, b.len())),
            )
        {
            if flags.contains(Flags::ATOMIC) {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                return Err(atomic::refuse_unaligned(file, Op::Write, offset, len));
            }
            return unaligned::write(file, offset, bufs, flags);
        }
        buf::io_scope(drain(file), |scope| {
            let mem = scope.lend(bufs);
            request::run(
                file,
                Op::Write,
                offset,
                mem,
                scope.lender(),
                flags,
                pin,
                None,
                request::Extra::default(),
            )
            .expect("a sync call returns its result")
        })
        .map_err(|e| *e)
    }

    /// Read into a single buffer.
    pub fn read_at(&self, offset: u64, buf: &mut [u8], flags: Flags) -> Result<usize> {
        self.read(offset, &mut [IoSliceMut::new(buf)], flags)
    }

    /// Write a single buffer.
    pub fn write_at(&self, offset: u64, buf: &[u8], flags: Flags) -> Result<usize> {
        self.write(offset, &[IoSlice::new(buf)], flags)
    }

    /// Start an async read into owned buffers; `done` gets the result and the
    /// buffers back, on whatever thread completes the call.
    pub fn read_async<B: OwnedBuf>(
        &self,
        offset: u64,
        bufs: Vec<B>,
        flags: Flags,
        done: impl FnOnce(Completed<B>) + Send + 'static,
    ) {
        self.start_async(Op::Read, offset, bufs, flags, done);
    }

    /// Start an async write from owned buffers; see [`DirectFile::read_async`]. A
    /// write that extends the file moves the size once its data is on the device,
    /// and finishes on the completion worker unless [`Flags::ASYNC_EXTEND`] is set.
    pub fn write_async<B: OwnedBuf>(
        &self,
        offset: u64,
        bufs: Vec<B>,
        flags: Flags,
        done: impl FnOnce(Completed<B>) + Send + 'static,
    ) {
        self.start_async(Op::Write, offset, bufs, flags, done);
    }

    /// An async read as a future (works with any executor, or [`DioFuture::wait`]).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
    /// # let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
    /// # let file = DirectFile::new(dev, Arc::new(IdentityMap::new(4096, 1 << 20)), Arc::new(FileState::new(1 << 20))).unwrap();
    /// // Eight reads in flight, then collect them in order.
    /// let futures: Vec<_> = (0..8u64)
    ///     .map(|i| file.read_future(i * 4096, vec![AlignedBuf::new(4096, 4096)], Flags::NONE))
    ///     .collect();
    /// for f in futures {
    ///     let done = f.wait();
    ///     assert_eq!(done.result.unwrap(), 4096);
    /// }
    /// ```
    pub fn read_future<B: OwnedBuf>(
        &self,
        offset: u64,
        bufs: Vec<B>,
        flags: Flags,
    ) -> DioFuture<B> {
        let (fut, slot) = DioFuture::new(Arc::clone(&self.handle));
        self.read_async(offset, bufs, flags, move |c| slot.fill(c));
        fut
    }

    /// An async write as a future.
    pub fn write_future<B: OwnedBuf>(
        &self,
        offset: u64,
        bufs: Vec<B>,
        flags: Flags,
    ) -> DioFuture<B> {
        let (fut, slot) = DioFuture::new(Arc::clone(&self.handle));
        self.write_async(offset, bufs, flags, move |c| slot.fill(c));
        fut
    }

    fn start_async<B: OwnedBuf>(
        &self,
        op: Op,
        offset: u64,
        mut bufs: Vec<B>,
        flags: Flags,
        done: impl FnOnce(Completed<B>) + Send + 'static,
    ) {
        let file = &self.shared;
        if flags.contains(Flags::UNALIGNED) {
            let aligned = unaligned::is_aligned(
                file,
                offset,
                bufs.iter_mut().map(|b| (b.as_mut_ptr() as usize, b.len())),
            );
            if !aligned && flags.contains(Flags::ATOMIC) {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                let result = Err(atomic::refuse_unaligned(file, op, offset, len));
                return done(Completed { result, bufs });
            }
            if !aligned {
                return match op {
                    Op::Read => unaligned::read_async(file, offset, bufs, flags, done),
                    Op::Write => unaligned::write_async(file, offset, bufs, flags, done),
                };
            }
        }
        let mem = buf::lend_owned(&mut bufs);
        // The buffers travel with the completion: their memory (stable across moves,
        // per OwnedBuf) stays alive until every request is done.
        let done: complete::Done = Box::new(move |result| done(Completed { result, bufs }));
        let done = match op {
            Op::Read => match request::read_one_async(&self.handle, offset, &mem, flags, done) {
                Some(done) => done,
                None => return,
            },
            Op::Write => done,
        };
        request::run_async_handle(
            &self.handle,
            op,
            offset,
            &mem,
            flags,
            done,
            request::Extra::default(),
        );
    }

    /// Change the file size: waits for in-flight direct I/O to drain (new calls with
    /// [`Flags::LOCKING`] wait on the file lock), tells the block map, then sets the
    /// size.
    pub fn truncate(&self, size: u64) -> Result<()> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        let max = self.shared.map.max_file_size();
        if size > max {
            return Err(Error::TooLarge { end: size, max });
        }
        // The file system decides first whether the size may change at all.
        self.shared.map.can_resize(size)?;
        let state = &self.shared.state;
        // Byte-granular writes read-modify-write their partial blocks under the block
        // range lock, from their reads to their write: truncate locks the range it
        // changes (from the block that holds the lower of the old and new ends, to
        // the end of any file) first, so the two exclude each other and no write
        // puts back bytes truncate removed.
        let fs = u64::from(self.shared.fs_block);
        let from = size.min(state.size()) & !(fs - 1);
        request::lock_write_range(&self.shared, (from, u64::MAX), Flags::NONE)?;
        let excl = state.lock_exclusive();
        // New calls without the file lock wait too, until the size is set.
        let gate = state.close_gate();
        let r = self.truncate_locked(size);
        // The file lock first: the gate runs the async calls that waited for it,
        // and those may take the file lock.
        drop(excl);
        drop(gate);
        state.ranges().unlock(from, u64::MAX);
        r
    }

    /// Truncate's work, under the file lock and the gate.
    fn truncate_locked(&self, size: u64) -> Result<()> {
        let state = &self.shared.state;
        let dev = &self.shared.dev;
        if dev.completion_mode() == CompletionMode::Polled {
            // In-flight async calls complete only when someone polls: drive them.
            while state.dio_count() != 0 {
                dev.poll(true)
                    .map_err(|e| Error::os("poll device during truncate", e))?;
            }
        } else {
            state.wait_dio_zero();
        }
        if size < state.size() {
            // Zero the new last block's tail first: if that fails, nothing changed.
            self.zero_eof_block_tail(size)?;
            self.shared.map.truncate(size)?;
        }
        state.set_size(size);
        Ok(())
    }

    /// Bytes past EOF in the last block must read as zeros if the file grows again
    /// (the kernel's block_truncate_page): zero the tail on the device.
    fn zero_eof_block_tail(&self, size: u64) -> Result<()> {
        let fs = u64::from(self.shared.fs_block);
        if size % fs == 0 {
            return Ok(());
        }
        let ext = self.shared.map.map(size / fs, 1, false)?;
        let Mapping::Mapped(block) = ext.mapping else {
            return Ok(());
        };
        let at = block * fs;
        if at + fs > self.shared.geometry.size {
            return Ok(());
        }
        // Through the map's submit_io hook, like every device access of the file (a
        // map may remap, encrypt or checksum there).
        let (dev, map) = (&*self.shared.dev, &self.shared.map);
        let file_off = size - size % fs;
        let submit = |req| map.submit_io(dev, req, file_off);
        let mut b = AlignedBuf::new(fs as usize, self.shared.geometry.buffer_align());
        let io = |source| Error::io(at, source);
        crate::device::transfer_via(dev, &submit, Op::Read, at, &mut b, false).map_err(io)?;
        b[(size % fs) as usize..].fill(0);
        crate::device::transfer_via(dev, &submit, Op::Write, at, &mut b, false).map_err(io)
    }

    /// Reap device completions (for devices whose completions need polling, when
    /// async calls are in flight and nobody waits on them).
    pub fn poll(&self, wait: bool) -> Result<usize> {
        self.shared
            .dev
            .poll(wait)
            .map_err(|e| Error::os("poll device", e))
    }

    /// Make completed writes durable (flush the device).
    pub fn sync_data(&self) -> Result<()> {
        self.shared.dev.flush().map_err(|e| Error::os("flush", e))
    }
}

struct FutureState<B> {
    result: Option<Completed<B>>,
    waker: Option<Waker>,
}

struct FutureSlot<B> {
    state: Mutex<FutureState<B>>,
    ready: Condvar,
}

/// The completion side of a [`DioFuture`].
struct Filler<B>(Arc<FutureSlot<B>>);

impl<B> Filler<B> {
    fn fill(self, c: Completed<B>) {
        let waker = {
            let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            st.result = Some(c);
            st.waker.take()
        };
        self.0.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A direct-I/O call in flight, as a `Future`. Needs no particular executor: any
/// executor polls it, and [`DioFuture::wait`] blocks without one.
///
/// A pending future is woken by its completion, never by polling itself again:
/// on a device whose completions come by themselves the completion calls the
/// waker; on one whose completions need polling (io_uring's default) the future
/// asks the device to reap them on a thread of its own while it waits
/// ([`Device::watch`]). Only a device that cannot (a single-issuer or per-thread
/// ring, IOPOLL: only the submitting thread may reap, or reaping is busy polling)
/// leaves the future to poll it, each time the executor polls.
///
/// Dropping a pending future does not cancel the call: its buffers stay with the
/// request until the device is done with them.
pub struct DioFuture<B> {
    slot: Arc<FutureSlot<B>>,
    /// The handle that started the call (its device is polled): not the device's
    /// own `Arc`, whose count every file on the device shares.
    handle: Arc<Handle>,
    /// A watch of the polled device is held ([`Device::watch`]).
    watching: bool,
}

impl<B> DioFuture<B> {
    fn new(handle: Arc<Handle>) -> (DioFuture<B>, Filler<B>) {
        let slot = Arc::new(FutureSlot {
            state: Mutex::new(FutureState {
                result: None,
                waker: None,
            }),
            ready: Condvar::new(),
        });
        (
            DioFuture {
                slot: Arc::clone(&slot),
                handle,
                watching: false,
            },
            Filler(slot),
        )
    }

    /// Block the thread until the call completes (polling the device if its
    /// completions need polling).
    pub fn wait(self) -> Completed<B> {
        let polled = self.handle.0.dev.completion_mode() == CompletionMode::Polled;
        let mut st = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = st.result.take() {
                return c;
            }
            if polled {
                drop(st);
                let _ = self.handle.0.dev.poll(true);
                st = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
            } else {
                st = self.slot.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Whether the call has completed.
    pub fn is_done(&self) -> bool {
        self.slot
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .result
            .is_some()
    }
}

impl<B> DioFuture<B> {
    fn unwatch(&mut self) {
        if std::mem::take(&mut self.watching) {
            self.handle.0.dev.unwatch();
        }
    }
}

impl<B> Drop for DioFuture<B> {
    fn drop(&mut self) {
        self.unwatch();
    }
}

impl<B> Future for DioFuture<B> {
    type Output = Completed<B>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completed<B>> {
        let this = self.get_mut();
        let polled = this.handle.0.dev.completion_mode() == CompletionMode::Polled;
        // A device whose completions need polling is reaped here, unless its
        // watcher does it (then a wakeup means the result is in).
        if polled && !this.watching {
            let _ = this.handle.0.dev.poll(false);
        }
        {
            let mut st = this.slot.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = st.result.take() {
                drop(st);
                this.unwatch();
                return Poll::Ready(c);
            }
            // Stored before the device is watched: a completion reaped from now
            // on finds the waker.
            match &st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.waker = Some(cx.waker().clone()),
            }
        }
        if polled && !this.watching {
            this.watching = this.handle.0.dev.watch();
            if !this.watching {
                // Nobody else reaps this device: the task polls it again (the
                // executor runs other tasks in between).
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}
