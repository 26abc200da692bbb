//! Devices: where bytes go. The [`Device`] trait (geometry, submit, poll, flush) and
//! its back ends. A device knows nothing of files or block maps; it moves one
//! contiguous device range to or from a list of memory segments per request.
//!
//! All `unsafe` of dio lives here and in [`crate::buf`].

use std::io;
use std::sync::{Arc, Condvar, Mutex};

use crate::buf::{MemRef, Segments};

pub mod mem;
pub mod nbd;
pub mod probe;
pub mod sync;
pub mod uring;

pub use mem::{MemDevice, MemDeviceConfig};
pub use sync::{SyncConfig, SyncDevice};
pub use uring::{UringConfig, UringDevice};

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
        }
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
            && self.max_bytes % self.logical_block == 0;
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
/// behind [`read_at`] and [`write_at`].
pub trait Completion: Send + Sync {
    /// `req` finished with `result`. Called exactly once per submitted request, on
    /// whatever thread the device completes on.
    fn complete(self: Arc<Self>, req: Request, result: io::Result<()>);
}

/// One device request: a contiguous device range and the memory it moves to or from
/// (the seed's bio).
pub struct Request {
    /// Direction.
    pub op: Op,
    /// Device byte offset (a multiple of the logical block).
    pub offset: u64,
    /// Memory segments, in order; their lengths add up to the request's length.
    pub segments: Segments,
    /// Force unit access: the data is durable when the request completes.
    pub fua: bool,
    /// Who is told when the request completes.
    pub completion: Arc<dyn Completion>,
    /// A tag for the completion's own use.
    pub tag: u64,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("len", &self.len())
            .field("segments", &self.segments.len())
            .field("fua", &self.fua)
            .finish()
    }
}

impl Request {
    /// Total bytes moved.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len() as u64).sum()
    }
    /// Whether the request moves nothing.
    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.is_empty())
    }
    /// Hand the request back to its completion with `result`.
    pub fn complete(self, result: io::Result<()>) {
        let c = Arc::clone(&self.completion);
        c.complete(self, result);
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
    use std::os::fd::AsRawFd;
    // SAFETY: fdatasync on a descriptor that `file` keeps open for the call.
    let r = unsafe { libc::fdatasync(file.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// ftruncate(2) on a descriptor the caller keeps open for the call.
pub(crate) fn ftruncate(fd: std::os::fd::BorrowedFd<'_>, len: libc::off_t) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: ftruncate on a descriptor that `fd` borrows for the call.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Check a request against a geometry; back ends call it before doing anything.
pub fn check_request(geo: &Geometry, req: &Request) -> io::Result<()> {
    let lb = u64::from(geo.logical_block);
    let len = req.len();
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
    if bad {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        Ok(())
    }
}

/// A completion that a synchronous caller waits on (one request at a time; used for
/// metadata reads and by tools).
struct OneShot {
    done: Mutex<Option<io::Result<()>>>,
    cv: Condvar,
}

impl Completion for OneShot {
    fn complete(self: Arc<Self>, _req: Request, result: io::Result<()>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.cv.notify_all();
    }
}

/// Submit one request built from `op`, `offset`, `segments`, `fua` and wait for it,
/// polling if the device needs it.
fn submit_and_wait(
    dev: &dyn Device,
    op: Op,
    offset: u64,
    segments: Segments,
    fua: bool,
) -> io::Result<()> {
    let shot = Arc::new(OneShot {
        done: Mutex::new(None),
        cv: Condvar::new(),
    });
    dev.submit(Request {
        op,
        offset,
        segments,
        fua,
        completion: shot.clone(),
        tag: 0,
    });
    dev.unplug();
    let polled = dev.completion_mode() == CompletionMode::Polled;
    let mut done = shot.done.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(r) = done.take() {
            return r;
        }
        if polled {
            drop(done);
            dev.poll(true)?;
            done = shot.done.lock().unwrap_or_else(|e| e.into_inner());
        } else {
            done = shot.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Read `buf.len()` bytes at device `offset` into an aligned buffer, splitting at the
/// device's request limit. For metadata and tools; file data goes through the engine.
pub fn read_at(dev: &dyn Device, offset: u64, buf: &mut crate::AlignedBuf) -> io::Result<()> {
    transfer_at(dev, Op::Read, offset, buf, false)
}

/// Write an aligned buffer at device `offset`, splitting at the request limit.
pub fn write_at(
    dev: &dyn Device,
    offset: u64,
    buf: &mut crate::AlignedBuf,
    fua: bool,
) -> io::Result<()> {
    transfer_at(dev, Op::Write, offset, buf, fua)
}

fn transfer_at(
    dev: &dyn Device,
    op: Op,
    offset: u64,
    buf: &mut crate::AlignedBuf,
    fua: bool,
) -> io::Result<()> {
    let max = dev.geometry().max_bytes as usize;
    let mut done = 0;
    while done < buf.len() {
        let n = (buf.len() - done).min(max);
        let chunk = &mut buf[done..done + n];
        // SAFETY: `chunk` is exclusively borrowed for this loop iteration, and
        // submit_and_wait returns only after the request completed, so the memory
        // outlives the request and nothing else touches it meanwhile.
        let seg = unsafe { MemRef::from_raw(chunk.as_mut_ptr(), n) };
        submit_and_wait(dev, op, offset + done as u64, seg.into(), fua)?;
        done += n;
    }
    Ok(())
}
