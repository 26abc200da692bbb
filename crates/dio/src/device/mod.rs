//! Devices: where bytes go. The [`Device`] trait (geometry, submit, poll, flush) and
//! its back ends. A device knows nothing of files or block maps; it moves one
//! contiguous device range to or from a list of memory segments per request.
//!
//! All `unsafe` of dio lives here and in [`crate::buf`].

use std::io;
use std::sync::{Arc, Condvar, Mutex};

use crate::buf::{MemRef, Segments};

mod fault;
mod mem;
#[cfg(feature = "nbd")]
pub(crate) mod nbd;
pub mod probe;
mod stats;
pub(crate) mod sync;
#[cfg(feature = "io-uring")]
pub(crate) mod uring;
mod wrapper;

pub use fault::{FaultConfig, FaultDevice, FaultStats};
pub use mem::{LoggedRequest, MemDevice, MemDeviceConfig, MemStats};
pub use stats::{IoStats, LatencyHistogram, StatsDevice, LATENCY_BUCKETS};
pub use sync::{SyncConfig, SyncDevice};
#[cfg(feature = "io-uring")]
pub use uring::{UringConfig, UringDevice, UringPlug};
pub use wrapper::DeviceWrapper;

/// Direction of a device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Device to memory.
    Read,
    /// Memory to device.
    Write,
}

/// What a device can do, and what requests it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Geometry {
    /// Logical block size: the unit of offsets and lengths (512 or 4096 usually).
    pub logical_block: u32,
    /// Physical block size (a hint for writes; at least `logical_block`).
    pub physical_block: u32,
    /// Required alignment of memory addresses (and segment lengths' granularity is
    /// `logical_block`).
    pub mem_align: u32,
    /// Most memory segments in one request.
    pub max_segments: u32,
    /// Most bytes in one request (a multiple of `logical_block`).
    pub max_bytes: u32,
    /// Device size in bytes.
    pub size: u64,
    /// Smallest untorn (atomic) write in bytes, 0 if the device offers none (see
    /// [`Geometry::atomic_write_units`]).
    pub atomic_unit_min: u32,
    /// Largest untorn (atomic) write in bytes, 0 if the device offers none.
    pub atomic_unit_max: u32,
    /// Most memory segments in one atomic write (0: no limit beyond `max_segments`).
    pub atomic_segments_max: u32,
}

impl Geometry {
    /// A geometry with the given logical block and size, and generous defaults for
    /// the rest (memory alignment = logical block, 256 segments, 1 MiB requests).
    pub fn new(logical_block: u32, size: u64) -> Geometry {
        Geometry {
            logical_block,
            physical_block: logical_block,
            mem_align: logical_block,
            max_segments: 256,
            max_bytes: 1 << 20,
            size,
            atomic_unit_min: 0,
            atomic_unit_max: 0,
            atomic_segments_max: 0,
        }
    }

    /// Declare untorn (atomic) writes: a write request flagged atomic
    /// ([`Request::set_atomic`]) whose length is a power of two from `unit_min` to
    /// `unit_max` bytes, at an offset that is a multiple of its length, in at most
    /// `segments_max` memory segments (0: any number the request allows), lands
    /// whole or not at all, even across a power loss. `(0, 0, 0)` declares none.
    ///
    /// ```
    /// let g = dio::Geometry::new(512, 1 << 20).with_atomic_write(4096, 65536, 1);
    /// assert_eq!(g.atomic_write_units(), Some((4096, 65536)));
    /// assert!(g.allows_atomic_write(8192, 8192));
    /// assert!(!g.allows_atomic_write(4096, 8192)); // not aligned to its length
    /// assert!(!g.allows_atomic_write(0, 12288)); // not a power of two
    /// ```
    pub fn with_atomic_write(
        mut self,
        unit_min: u32,
        unit_max: u32,
        segments_max: u32,
    ) -> Geometry {
        self.atomic_unit_min = unit_min;
        self.atomic_unit_max = unit_max;
        self.atomic_segments_max = segments_max;
        self
    }

    /// The sizes of untorn writes the device offers, `(unit_min, unit_max)` in
    /// bytes, or `None` where it offers none.
    pub fn atomic_write_units(&self) -> Option<(u32, u32)> {
        (self.atomic_unit_min > 0 && self.atomic_unit_max >= self.atomic_unit_min)
            .then_some((self.atomic_unit_min, self.atomic_unit_max))
    }

    /// Whether a write of `len` bytes at device (or, through an identity map, file)
    /// byte `offset` can be untorn: a power of two within the units, aligned to its
    /// length.
    pub fn allows_atomic_write(&self, offset: u64, len: u64) -> bool {
        self.atomic_write_units().is_some_and(|(min, max)| {
            len.is_power_of_two()
                && (u64::from(min)..=u64::from(max)).contains(&len)
                && offset & (len - 1) == 0
        })
    }

    /// Set the memory alignment.
    pub fn with_mem_align(mut self, align: u32) -> Geometry {
        self.mem_align = align;
        self
    }

    /// Set the request limits.
    pub fn with_limits(mut self, max_segments: u32, max_bytes: u32) -> Geometry {
        self.max_segments = max_segments.max(1);
        self.max_bytes = max_bytes.max(self.logical_block);
        self
    }

    /// Set the physical block size.
    pub fn with_physical_block(mut self, physical: u32) -> Geometry {
        self.physical_block = physical;
        self
    }

    /// The alignment to allocate I/O buffers at: the required memory alignment,
    /// but at least a page, so a block-sized buffer never straddles two pages (two
    /// DMA segments and two page pins per request instead of one).
    pub fn buffer_align(&self) -> usize {
        (self.mem_align as usize).max(4096)
    }

    /// Check that the geometry is usable (powers of two, limits not below a block).
    pub fn validate(&self) -> crate::Result<()> {
        let ok = self.logical_block.is_power_of_two()
            && self.logical_block >= 512
            && self.mem_align.is_power_of_two()
            && self.max_segments >= 1
            && self.max_bytes >= self.logical_block
            && self.max_bytes % self.logical_block == 0
            && self.atomic_write_units().is_none_or(|(min, max)| {
                min.is_power_of_two()
                    && max.is_power_of_two()
                    && min >= self.logical_block
                    && max <= self.max_bytes
            });
        if ok {
            Ok(())
        } else {
            Err(crate::Error::Invalid(format!(
                "unusable device geometry {self:?}"
            )))
        }
    }
}

/// Receives completed requests. The engine implements it; so do the one-shot waits
/// behind [`read_device`] and [`write_device`], and device wrappers that intercept their
/// requests' completions ([`Request::forward`]).
pub trait Completion: Send + Sync {
    /// A request finished with `result`. Called exactly once per request, on whatever
    /// thread the device completes on. The request's memory is no longer the device's:
    /// `req` keeps only what a completion needs (offset, length, tag, and an owned
    /// buffer or forwarded request to take back), never anything to submit again.
    ///
    /// A panic here is caught by [`Request::complete`] (and reported by the panic
    /// hook), so it never kills the device thread that delivered the completion.
    fn complete(self: Arc<Self>, req: Finished, result: io::Result<()>);
}

/// What keeps a request's memory valid while the request lives.
pub(crate) enum Keep {
    /// Nothing owned: the creator vouched for the memory (the unsafe constructor), or
    /// it is static (the shared zero buffer).
    Vouched,
    /// Borrowed memory lent by an I/O scope, which waits for this ticket.
    Lent(
        #[allow(dead_code, reason = "held for its Drop: the scope waits for it")]
        crate::buf::Ticket,
    ),
    /// An owned buffer, moved into the request.
    Owned(Box<dyn std::any::Any + Send>),
    /// The request this one stands in for (its memory is this one's).
    Parent(Box<Request>),
}

/// One device request: a contiguous device range and the memory it moves to or from
/// (the seed's bio).
///
/// A request is a promise that its memory is valid until it completes: the device
/// may read it (writes) or fill it (reads) from any thread until it calls
/// [`Request::complete`], which hands a [`Finished`] (no memory) to the completion.
/// Safe code builds requests only over memory the request owns
/// ([`Request::with_buf`]), memory of a request it stands in for
/// ([`Request::forward`]), or through the engine, whose borrowed memory is lent in a
/// scope that waits for every request; raw memory needs the `unsafe`
/// [`Request::from_raw_parts`]. A request dropped without completing completes
/// itself with `ECANCELED`, so every request completes exactly once.
pub struct Request {
    op: Op,
    offset: u64,
    segments: Segments,
    fua: bool,
    atomic: bool,
    tag: u64,
    completion: Option<Arc<dyn Completion>>,
    keep: Keep,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("len", &self.len())
            .field("segments", &self.segments.len())
            .field("fua", &self.fua)
            .field("atomic", &self.atomic)
            .finish()
    }
}

impl Request {
    /// A request over raw memory segments.
    ///
    /// # Safety
    /// Every segment must stay valid until the request completes (the completion is
    /// called) or is dropped: allocated, writable and not accessed through any Rust
    /// reference for a read request, readable and not written for a write request.
    pub unsafe fn from_raw_parts(
        op: Op,
        offset: u64,
        segments: Segments,
        fua: bool,
        completion: Arc<dyn Completion>,
        tag: u64,
    ) -> Request {
        Request::build(op, offset, segments, fua, completion, tag, Keep::Vouched)
    }

    /// A request over an owned buffer, which moves into it: the device fills it
    /// (read) or writes it out (write), and the completion gets it back with
    /// [`Finished::take_buf`].
    pub fn with_buf<B: crate::buf::OwnedBuf>(
        op: Op,
        offset: u64,
        mut buf: B,
        fua: bool,
        completion: Arc<dyn Completion>,
        tag: u64,
    ) -> Request {
        let seg = crate::buf::lend_one(&mut buf);
        Request::build(
            op,
            offset,
            seg.into(),
            fua,
            completion,
            tag,
            Keep::Owned(Box::new(buf)),
        )
    }

    #[inline]
    pub(crate) fn build(
        op: Op,
        offset: u64,
        segments: Segments,
        fua: bool,
        completion: Arc<dyn Completion>,
        tag: u64,
        keep: Keep,
    ) -> Request {
        Request {
            op,
            offset,
            segments,
            fua,
            atomic: false,
            tag,
            completion: Some(completion),
            keep,
        }
    }

    /// A request that stands in for this one (same direction, range, memory, FUA and
    /// tag) and completes to `completion`, which takes this one back with
    /// [`Finished::take_parent`] and completes it, for device wrappers that act when
    /// the inner request is done. If the completion drops it instead, it completes
    /// with `ECANCELED`.
    pub fn forward(self, completion: Arc<dyn Completion>) -> Request {
        let (op, offset, fua, tag) = (self.op, self.offset, self.fua, self.tag);
        let atomic = self.atomic;
        let segments = self.segments.clone();
        let mut req = Request::build(
            op,
            offset,
            segments,
            fua,
            completion,
            tag,
            Keep::Parent(Box::new(self)),
        );
        req.atomic = atomic;
        req
    }

    /// Direction.
    pub fn op(&self) -> Op {
        self.op
    }
    /// Device byte offset (a multiple of the logical block).
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Move the request to another device offset (a remapping layer).
    pub fn set_offset(&mut self, offset: u64) {
        self.offset = offset;
    }
    /// Force unit access: the data is durable when the request completes.
    pub fn fua(&self) -> bool {
        self.fua
    }
    /// Set or clear force unit access.
    pub fn set_fua(&mut self, fua: bool) {
        self.fua = fua;
    }
    /// Untorn write (`RWF_ATOMIC`): the device writes the whole request or none of
    /// it, even across a power loss. Only for writes the geometry allows
    /// ([`Geometry::allows_atomic_write`]); [`check_request`] refuses others with
    /// `EINVAL`, so a device that offers no atomic writes never sees one.
    pub fn atomic(&self) -> bool {
        self.atomic
    }
    /// Set or clear the untorn-write flag (see [`Request::atomic`]).
    pub fn set_atomic(&mut self, atomic: bool) {
        self.atomic = atomic;
    }
    /// The tag its creator gave it (the engine: the file offset).
    pub fn tag(&self) -> u64 {
        self.tag
    }
    /// Memory segments, in order; their lengths add up to the request's length.
    /// Addresses are for back ends that hand them to the kernel (in `unsafe` code,
    /// while they hold the request); safe code moves data with
    /// [`Request::copy_out`] and [`Request::copy_in`].
    pub fn segments(&self) -> &[MemRef] {
        &self.segments
    }
    /// Total bytes moved.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len() as u64).sum()
    }
    /// Whether the request moves nothing.
    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.is_empty())
    }

    /// Copy `dst.len()` bytes of the request's memory, from byte `at` of the request
    /// on, into `dst` (a device serving a write).
    ///
    /// # Panics
    /// If the range does not lie inside the request.
    pub fn copy_out(&self, at: usize, dst: &mut [u8]) {
        let mut dst = dst;
        self.each_piece(at, dst.len(), |seg| {
            let (head, rest) = std::mem::take(&mut dst).split_at_mut(seg.len());
            // SAFETY: the request is live, so its memory is valid for reads (the
            // constructors' contract); `head` is a distinct &mut of the same length.
            unsafe { seg.copy_to(head) };
            dst = rest;
        });
    }

    /// Copy `src` into the request's memory from byte `at` of the request on (a
    /// device serving a read).
    ///
    /// # Panics
    /// If the request is a write (its memory may be the caller's shared data), or the
    /// range does not lie inside the request.
    pub fn copy_in(&mut self, at: usize, src: &[u8]) {
        assert_eq!(self.op, Op::Read, "copy_in into a write request's memory");
        let mut src = src;
        self.each_piece(at, src.len(), |seg| {
            let (head, rest) = src.split_at(seg.len());
            // SAFETY: the request is a live read, so its memory is valid for writes
            // and no Rust reference reaches it (the constructors' contract).
            unsafe { seg.copy_from(head) };
            src = rest;
        });
    }

    /// The pieces of the request's memory covering `[at, at + len)`.
    fn each_piece(&self, at: usize, len: usize, mut f: impl FnMut(MemRef)) {
        let total = self.len();
        assert!(
            at.checked_add(len).is_some_and(|end| end as u64 <= total),
            "range {at}+{len} outside a request of {total} bytes"
        );
        let (mut skip, mut left) = (at, len);
        for seg in self.segments.iter() {
            if left == 0 {
                break;
            }
            if skip >= seg.len() {
                skip -= seg.len();
                continue;
            }
            let n = (seg.len() - skip).min(left);
            f(seg.slice(skip, n));
            skip = 0;
            left -= n;
        }
    }

    /// Hand the request back to its completion with `result`. A panic in the
    /// completion is caught here (the panic hook reports it), so the calling device
    /// thread goes on completing other requests.
    #[inline]
    pub fn complete(mut self, result: io::Result<()>) {
        self.complete_here(result);
    }

    /// [`Request::complete`], for a device that completes a request where it holds
    /// it: no copy of the request is made to move it into the call (a copy of a
    /// request built a moment ago stalls on store forwarding). The request is left
    /// completed: dropping it does nothing more.
    #[inline]
    pub(crate) fn complete_here(&mut self, result: io::Result<()>) {
        let Some(c) = self.completion.take() else {
            return;
        };
        let done = Finished {
            op: self.op,
            offset: self.offset,
            len: self.len(),
            fua: self.fua,
            tag: self.tag,
            keep: std::mem::replace(&mut self.keep, Keep::Vouched),
        };
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.complete(done, result);
        }));
        if caught.is_err() {
            note_callback_panic();
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.completion.is_some() {
            let req = Request {
                op: self.op,
                offset: self.offset,
                segments: std::mem::take(&mut self.segments),
                fua: self.fua,
                atomic: self.atomic,
                tag: self.tag,
                completion: self.completion.take(),
                keep: std::mem::replace(&mut self.keep, Keep::Vouched),
            };
            req.complete(Err(io::Error::from_raw_os_error(libc::ECANCELED)));
        }
    }
}

static CALLBACK_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn note_callback_panic() {
    CALLBACK_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many completion callbacks have panicked in this process (each was caught and
/// reported by the panic hook; the device went on).
pub fn callback_panics() -> u64 {
    CALLBACK_PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A completed request, as its [`Completion`] sees it: what it was, and what it owned,
/// but no memory to submit again.
pub struct Finished {
    op: Op,
    offset: u64,
    len: u64,
    fua: bool,
    tag: u64,
    keep: Keep,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished")
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("fua", &self.fua)
            .field("tag", &self.tag)
            .finish()
    }
}

impl Finished {
    /// Direction.
    pub fn op(&self) -> Op {
        self.op
    }
    /// Device byte offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Bytes the request moved (or was to move).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it moved nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether it was a force-unit-access write.
    pub fn fua(&self) -> bool {
        self.fua
    }
    /// The creator's tag.
    pub fn tag(&self) -> u64 {
        self.tag
    }
    /// Give up what the request kept (a ticket on lent memory, an owned buffer, a
    /// forwarded request), in place: what dropping it does, without moving it.
    #[inline]
    pub(crate) fn release(&mut self) {
        self.keep = Keep::Vouched;
    }
    /// The owned buffer of a [`Request::with_buf`] request, if it is a `B`.
    pub fn take_buf<B: 'static>(&mut self) -> Option<B> {
        match std::mem::replace(&mut self.keep, Keep::Vouched) {
            Keep::Owned(b) => match b.downcast::<B>() {
                Ok(b) => Some(*b),
                Err(b) => {
                    self.keep = Keep::Owned(b);
                    None
                }
            },
            other => {
                self.keep = other;
                None
            }
        }
    }
    /// The request a [`Request::forward`] request stood in for, to complete now.
    pub fn take_parent(&mut self) -> Option<Request> {
        match std::mem::replace(&mut self.keep, Keep::Vouched) {
            Keep::Parent(p) => Some(*p),
            other => {
                self.keep = other;
                None
            }
        }
    }
}

/// How a device delivers completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionMode {
    /// Completions arrive by themselves (another thread, or inline in `submit`).
    Interrupt,
    /// Completions arrive only while someone calls [`Device::poll`]; a waiter must poll.
    Polled,
}

/// A block device: the one trait every back end implements (RAM, io_uring, pread,
/// NBD). Small on purpose, like redb's storage backend.
pub trait Device: Send + Sync {
    /// Geometry and limits.
    fn geometry(&self) -> Geometry;

    /// Start a request. The device must call `req.complete(..)` exactly once, now or
    /// later, on any thread; errors of the request itself go there, never lost.
    /// Requests that break the geometry (misaligned, too long, past the end)
    /// complete with `EINVAL`.
    fn submit(&self, req: Request);

    /// Push out requests a batching device holds back (the seed's unplug). Devices
    /// that submit at once need not implement it.
    fn unplug(&self) {}

    /// Reap completions. With `wait`, block until at least one completion was
    /// delivered or a short while passed. Returns how many were delivered; may return
    /// 0, so callers loop and re-check their own condition.
    fn poll(&self, wait: bool) -> io::Result<usize> {
        let _ = wait;
        Ok(0)
    }

    /// How completions arrive.
    fn completion_mode(&self) -> CompletionMode {
        CompletionMode::Interrupt
    }

    /// For a waiter that cannot poll ([`crate::DioFuture`] in an async task, whose
    /// thread belongs to the executor): ask a [`CompletionMode::Polled`] device to
    /// reap and complete its requests by itself (on a thread of its own, asleep in
    /// the kernel until a completion arrives) until the matching
    /// [`Device::unwatch`]. Returns whether it will; `false` (the default) leaves
    /// the completions to [`Device::poll`]. Watches nest: the device reaps while
    /// any is held.
    fn watch(&self) -> bool {
        false
    }

    /// End one [`Device::watch`] that returned `true`.
    fn unwatch(&self) {}

    /// Make every completed write durable (a cache flush).
    fn flush(&self) -> io::Result<()>;

    /// Short human-readable name ("mem", "uring", "sync", "nbd").
    fn name(&self) -> &str;
}

impl<D: Device + ?Sized> Device for Arc<D> {
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }
    fn submit(&self, req: Request) {
        (**self).submit(req)
    }
    fn unplug(&self) {
        (**self).unplug()
    }
    fn poll(&self, wait: bool) -> io::Result<usize> {
        (**self).poll(wait)
    }
    fn completion_mode(&self) -> CompletionMode {
        (**self).completion_mode()
    }
    fn watch(&self) -> bool {
        (**self).watch()
    }
    fn unwatch(&self) {
        (**self).unwatch()
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

/// fdatasync(2) on a file or block device: the flush of the back ends over file
/// descriptors.
pub(crate) fn fdatasync(file: &std::fs::File) -> io::Result<()> {
    file.sync_data()
}

/// ftruncate(2) on a descriptor the caller keeps open for the call.
pub(crate) fn ftruncate(fd: std::os::fd::BorrowedFd<'_>, len: u64) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(fd, len)?)
}

/// Check a request against a geometry; back ends call it before doing anything.
pub fn check_request(geo: &Geometry, req: &Request) -> io::Result<()> {
    check_request_len(geo, req, req.len())
}

/// [`check_request`] for a request whose length the caller has computed already.
#[inline]
pub(crate) fn check_request_len(geo: &Geometry, req: &Request, len: u64) -> io::Result<()> {
    let lb = u64::from(geo.logical_block);
    // Geometry sizes are powers of two (Geometry::validate).
    let bad = req.offset & (lb - 1) != 0
        || len & (lb - 1) != 0
        || len > u64::from(geo.max_bytes)
        || req.segments.len() > geo.max_segments as usize
        || req.offset.checked_add(len).is_none_or(|end| end > geo.size)
        || req
            .segments
            .iter()
            .any(|s| s.addr() & (geo.mem_align as usize - 1) != 0);
    let bad_atomic = req.atomic
        && (req.op != Op::Write
            || !geo.allows_atomic_write(req.offset, len)
            || (geo.atomic_segments_max != 0
                && req.segments.len() > geo.atomic_segments_max as usize));
    if bad || bad_atomic {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        Ok(())
    }
}

/// A completion that a synchronous caller waits on (one request at a time; used for
/// metadata reads and by tools). It keeps the request's owned buffer for the waiter.
struct OneShot {
    done: Mutex<Option<(Finished, io::Result<()>)>>,
    cv: Condvar,
}

impl Completion for OneShot {
    fn complete(self: Arc<Self>, req: Finished, result: io::Result<()>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some((req, result));
        self.cv.notify_all();
    }
}

/// Submit `req` (whose completion is `shot`) and wait for it, polling if the device
/// needs it. A poll error is not the request's end: the wait goes on until the
/// request itself completes (its memory is the device's until then), and the poll
/// error is returned only if the request did not fail by itself.
fn submit_and_wait(
    dev: &dyn Device,
    submit: &dyn Fn(Request),
    shot: &OneShot,
    req: Request,
) -> (Finished, io::Result<()>) {
    submit(req);
    dev.unplug();
    let polled = dev.completion_mode() == CompletionMode::Polled;
    let mut poll_error = None;
    let mut done = shot.done.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some((fin, r)) = done.take() {
            let r = match (r, poll_error) {
                (Ok(()), Some(e)) => Err(e),
                (r, _) => r,
            };
            return (fin, r);
        }
        if polled {
            drop(done);
            if let Err(e) = dev.poll(true) {
                // A transient error (EINTR, say): back off a little and poll again.
                poll_error.get_or_insert(e);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            done = shot.done.lock().unwrap_or_else(|e| e.into_inner());
        } else {
            done = shot.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Read `buf.len()` bytes at device `offset` into an aligned buffer, splitting at the
/// device's request limit. For metadata and tools; file data goes through the engine.
pub fn read_device(dev: &dyn Device, offset: u64, buf: &mut crate::AlignedBuf) -> io::Result<()> {
    transfer_via(dev, &|r| dev.submit(r), Op::Read, offset, buf, false)
}

/// Write an aligned buffer at device `offset`, splitting at the request limit.
pub fn write_device(
    dev: &dyn Device,
    offset: u64,
    buf: &mut crate::AlignedBuf,
    fua: bool,
) -> io::Result<()> {
    transfer_via(dev, &|r| dev.submit(r), Op::Write, offset, buf, fua)
}

/// Move `buf` to or from device `offset`, a request of at most the device's limit at
/// a time, each handed to `submit` (the device itself, or a block map's submit_io
/// hook), waiting for each.
///
/// The buffer moves into each request (a window of it per chunk) and comes back with
/// the completion: even if the device or this thread panics, no request ever holds
/// memory that someone else owns. On a panic the caller's buffer is left empty.
pub(crate) fn transfer_via(
    dev: &dyn Device,
    submit: &dyn Fn(Request),
    op: Op,
    offset: u64,
    buf: &mut crate::AlignedBuf,
    fua: bool,
) -> io::Result<()> {
    let max = dev.geometry().max_bytes as usize;
    let shot = Arc::new(OneShot {
        done: Mutex::new(None),
        cv: Condvar::new(),
    });
    let mut owned = std::mem::replace(buf, crate::AlignedBuf::new(0, 1));
    let total = owned.len();
    let mut done = 0;
    let mut result = Ok(());
    while done < total {
        let n = (total - done).min(max);
        let window = crate::buf::Window::new(owned, done, n).expect("chunk inside the buffer");
        let req = Request::with_buf(op, offset + done as u64, window, fua, shot.clone(), 0);
        let (mut fin, r) = submit_and_wait(dev, submit, &shot, req);
        owned = fin
            .take_buf::<crate::buf::Window<crate::AlignedBuf>>()
            .expect("the request gives its buffer back")
            .into_inner();
        if r.is_err() {
            result = r;
            break;
        }
        done += n;
    }
    *buf = owned;
    result
}
