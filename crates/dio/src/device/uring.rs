//! The io_uring back end: an `O_DIRECT` regular file or block device behind one
//! ring. `submit` only queues submission entries; the ring is entered in
//! [`Device::unplug`] (or when the submission queue is full), so a call's requests go
//! to the kernel in one `io_uring_enter` (the seed's plugging). Completions are reaped
//! by [`Device::poll`] (the default, [`CompletionMode::Polled`]) or by a reaper thread
//! ([`UringConfig::reaper`], [`CompletionMode::Interrupt`]).
//!
//! Requests in flight live in a slab indexed by the entry's `user_data`, together
//! with the iovec array the kernel reads; the slab and both queues sit behind one
//! mutex that is never held across a blocking wait or a completion callback.
//!
//! With [`UringConfig::ring_per_thread`] every thread that submits gets a ring of its
//! own (single issuer, deferred task run, the file registered with it), made at its
//! first request and kept in a thread-local table keyed by the device: the submit and
//! reap paths take no lock another thread takes (each ring's mutex is its thread's
//! alone), and a thread reaps, and runs the callbacks of, only the requests it
//! submitted. A thread that exits drains and releases its rings; a ring is never
//! dropped with requests in flight (they own memory the kernel writes).
//!
//! A [`UringPlug`] held by a thread keeps its calls' entries in the submission
//! queue (up to its limit) until the thread polls or the plug drops: a loop that
//! starts a call per completion of a round then submits the round in one enter.
//! A waiting poll of a single-issuer ring is one enter: it submits what is queued,
//! runs the deferred completion work and sleeps until a completion arrives.
//!
//! It knows nothing of files, block maps or the engine: it moves device ranges.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::{check_request, CompletionMode, Device, Geometry, Op, Request};
use crate::buf::{BufArena, MemRef};
use crate::{Error, Result};

/// `user_data` of the no-op that wakes the reaper thread at shutdown.
const WAKE: u64 = u64::MAX;
/// How long a polling waiter sleeps in the kernel before it returns empty-handed.
/// Another thread may reap the completion it waits for; that thread then posts a
/// no-op to wake the sleepers, so this is only a safety net.
const POLL_WAIT: Duration = Duration::from_millis(10);
/// How long the reaper thread waits before it checks for shutdown.
const REAPER_WAIT: Duration = Duration::from_millis(100);
/// How long the watcher thread sleeps in the kernel before it re-checks its watches.
const WATCH_WAIT: Duration = Duration::from_millis(100);
/// How often a request is resubmitted after `EAGAIN`/`EINTR` before it fails.
const MAX_RETRIES: u8 = 16;

/// How a [`UringDevice`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UringConfig {
    /// Submission queue entries (the completion queue has twice as many, and that
    /// many requests may be in flight).
    pub queue_depth: u32,
    /// Complete on a reaper thread ([`CompletionMode::Interrupt`]) instead of in
    /// [`Device::poll`]: async callback users then need no poller.
    pub reaper: bool,
    /// Let a kernel thread poll the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Busy-poll for completions (`IORING_SETUP_IOPOLL`), if the device supports it;
    /// probed at open, with a fallback to interrupt completions and a note.
    pub iopoll: bool,
    /// Register the file with the ring (fixed file: saves a lookup per request).
    pub registered_file: bool,
    /// One thread submits and reaps everything (as fio's jobs do): the ring runs
    /// completion work only when that thread enters the kernel
    /// (`IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`), which saves
    /// the interrupts and wakeups of the default mode. Only for a device used from
    /// the thread that opened it; ignored with a reaper thread or SQPOLL.
    pub single_issuer: bool,
    /// A ring per submitting thread (see the module docs): N threads doing I/O on
    /// one file share no lock and no ring. Each thread reaps only what it submitted,
    /// so a thread must not wait for another thread's I/O (the engine's waits poll
    /// the waiting thread's own ring). Completions are polled; a reaper thread,
    /// SQPOLL and IOPOLL are ignored with a note.
    pub ring_per_thread: bool,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            queue_depth: 128,
            reaper: false,
            sqpoll: false,
            iopoll: false,
            registered_file: true,
            single_issuer: false,
            ring_per_thread: false,
        }
    }
}

/// One request in flight (or a free slot).
struct Slot {
    req: Option<Request>,
    /// Total bytes of the request.
    len: u64,
    /// Bytes already moved (after short transfers, the rest is resubmitted).
    done: u64,
    retries: u8,
    /// The iovecs of a vectored request; the kernel may read them until the entry
    /// is consumed, so they live here, not on a stack. Capacity is kept for reuse.
    iov: Vec<libc::iovec>,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Registered buffers: (start address, length), index = buffer index.
    fixed_bufs: Vec<(usize, usize)>,
    /// The arena whose memory is registered, kept alive as long as that lasts.
    fixed_owner: Option<Arc<BufArena>>,
    /// Per-thread rings: the generation of the device's registration applied here.
    fixed_gen: u64,
}

// SAFETY: the raw pointers in the iovecs point into request memory whose owner
// guarantees validity until completion, from any thread (the MemRef contract); State
// is only touched under its mutex.
unsafe impl Send for State {}

struct Inner {
    ring: IoUring,
    /// Keeps the descriptor open as long as the ring may use it.
    file: Arc<File>,
    fixed_file: bool,
    geometry: Geometry,
    state: Mutex<State>,
    /// Entries pushed but maybe not yet submitted (a hint that saves a lock).
    pending: AtomicUsize,
    in_flight: AtomicUsize,
    fixed_requests: AtomicU64,
    /// Pollers asleep in the kernel, waiting for a completion.
    sleepers: AtomicUsize,
    /// Completion work is deferred to GETEVENTS enters by the one issuing thread.
    defer: bool,
    /// The thread that opened the ring (the only one that may use a `defer` ring).
    owner: thread::ThreadId,
    iopoll: bool,
    ext_arg: bool,
    stop: AtomicBool,
    /// Per-thread rings: the device's buffer registration, which each ring's thread
    /// applies to its ring itself (only the issuer may register).
    fixed_set: Option<Arc<FixedSet>>,
}

/// A completed request and its result, delivered after the lock is dropped.
type Batch = Vec<(Request, io::Result<()>)>;

/// An `O_DIRECT` file or block device driven through io_uring. See the module docs.
pub struct UringDevice {
    rings: Rings,
    mode: CompletionMode,
    reaper: Option<thread::JoinHandle<()>>,
    notes: Vec<String>,
    /// Completions for waiters that cannot poll ([`Device::watch`]); only on a
    /// shared ring that any thread may reap and that can wait with a timeout.
    watcher: Option<Arc<Watcher>>,
}

/// One ring for every thread, or one ring per thread.
enum Rings {
    Shared(Arc<Inner>),
    PerThread(Arc<PerThread>),
}

/// A device's buffer registration in per-thread mode: each ring's thread applies it
/// to its own ring at its next request (generation `gen`).
#[derive(Default)]
struct FixedSet {
    gen: AtomicU64,
    bufs: Mutex<FixedBufs>,
    /// Fixed-buffer requests of rings already released.
    retired: AtomicU64,
}

#[derive(Default, Clone)]
struct FixedBufs {
    /// (start address, length) of each buffer.
    ranges: Vec<(usize, usize)>,
    /// The arena whose memory it is, kept alive while registered.
    owner: Option<Arc<BufArena>>,
}

/// The per-thread mode's device: what its rings share (read-mostly) and the list of
/// rings, which is locked only when a thread adds a ring and by whole-device queries.
struct PerThread {
    id: u64,
    file: Arc<File>,
    geometry: Geometry,
    depth: u32,
    /// Rings are single-issuer with deferred task run (the kernel accepted it).
    defer: bool,
    registered_file: bool,
    fixed: Arc<FixedSet>,
    /// Set when the device drops: other threads' idle rings of it are released at
    /// their thread's next ring setup or exit.
    gone: Arc<AtomicBool>,
    rings: Mutex<Vec<Weak<Inner>>>,
}

/// Device ids for the thread-local ring tables (never reused).
static NEXT_DEVICE: AtomicU64 = AtomicU64::new(1);

/// One thread's ring for one device, in that thread's table.
struct LocalRing {
    device: u64,
    gone: Arc<AtomicBool>,
    ring: Arc<Inner>,
}

impl Drop for LocalRing {
    fn drop(&mut self) {
        // Requests in flight own memory the kernel may still write: complete them
        // first (this thread is the ring's issuer, the only one that can reap it).
        if !self.ring.drain() {
            // The ring keeps failing: leak it, with what it holds, rather than free
            // memory the kernel may write.
            std::mem::forget(Arc::clone(&self.ring));
            return;
        }
        self.ring.release();
        if let Some(set) = &self.ring.fixed_set {
            set.retired.fetch_add(
                self.ring.fixed_requests.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
    }
}

thread_local! {
    /// This thread's rings, one per per-thread device it has used. Dropped (each
    /// ring drained, then closed) when the thread exits.
    static RINGS: RefCell<Vec<LocalRing>> = const { RefCell::new(Vec::new()) };
}

impl PerThread {
    /// This thread's ring, made at its first request. `ESHUTDOWN` while the thread
    /// is exiting (its table is being torn down).
    #[inline]
    fn local(self: &Arc<Self>) -> io::Result<Arc<Inner>> {
        let found = RINGS.try_with(|t| {
            t.borrow()
                .iter()
                .find(|l| l.device == self.id)
                .map(|l| Arc::clone(&l.ring))
        });
        match found {
            Ok(Some(ring)) => Ok(ring),
            Ok(None) => self.add_ring(),
            Err(_) => Err(errno(libc::ESHUTDOWN)),
        }
    }

    /// This thread's ring if it has one (no setup).
    fn existing(&self) -> Option<Arc<Inner>> {
        RINGS
            .try_with(|t| {
                t.borrow()
                    .iter()
                    .find(|l| l.device == self.id)
                    .map(|l| Arc::clone(&l.ring))
            })
            .ok()
            .flatten()
    }

    #[cold]
    fn add_ring(self: &Arc<Self>) -> io::Result<Arc<Inner>> {
        let ring = build_ring(self.depth, false, false, self.defer)?;
        let fixed_file = self.registered_file
            && ring
                .submitter()
                .register_files(&[self.file.as_raw_fd()])
                .is_ok();
        let inner = Arc::new(Inner::from_ring(
            ring,
            Arc::clone(&self.file),
            self.geometry,
            self.defer,
            false,
            fixed_file,
            Some(Arc::clone(&self.fixed)),
        ));
        self.adopt(Arc::clone(&inner))?;
        Ok(inner)
    }

    /// Put `ring` (made on this thread) in this thread's table and the device's list;
    /// release this thread's rings of dropped devices on the way.
    fn adopt(&self, ring: Arc<Inner>) -> io::Result<()> {
        {
            let mut list = lock_any(&self.rings);
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&ring));
        }
        let stale = RINGS
            .try_with(|t| {
                let mut t = t.borrow_mut();
                t.push(LocalRing {
                    device: self.id,
                    gone: Arc::clone(&self.gone),
                    ring,
                });
                let (stale, keep): (Vec<_>, Vec<_>) =
                    t.drain(..).partition(|l| l.gone.load(Ordering::Acquire));
                *t = keep;
                stale
            })
            .map_err(|_| errno(libc::ESHUTDOWN))?;
        // Drained and closed outside the borrow: their callbacks may submit.
        drop(stale);
        Ok(())
    }

    fn rings(&self) -> Vec<Arc<Inner>> {
        lock_any(&self.rings)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Replace the registration; the calling thread's ring applies it at once (so
    /// that the kernel's refusal comes back here), the others at their next request.
    fn set_fixed(self: &Arc<Self>, bufs: FixedBufs) -> io::Result<()> {
        {
            let mut b = lock_any(&self.fixed.bufs);
            *b = bufs;
            self.fixed.gen.fetch_add(1, Ordering::AcqRel);
        }
        if bufs_empty(&self.fixed) {
            if let Some(ring) = self.existing() {
                let mut st = lock(&ring.state);
                ring.sync_fixed(&mut st)?;
            }
            return Ok(());
        }
        let ring = self.local()?;
        let r = {
            let mut st = lock(&ring.state);
            ring.sync_fixed(&mut st)
        };
        if r.is_err() {
            // Refused here: no other ring tries it either.
            *lock_any(&self.fixed.bufs) = FixedBufs::default();
            self.fixed.gen.fetch_add(1, Ordering::AcqRel);
        }
        r
    }
}

thread_local! {
    /// This thread's open plugs ([`UringPlug`]) and the rings whose submission
    /// they held back.
    static PLUG: RefCell<PlugState> = const {
        RefCell::new(PlugState {
            depth: 0,
            limit: usize::MAX,
            held: Vec::new(),
        })
    };
}

struct PlugState {
    depth: u32,
    /// Requests a ring holds back at most (the smallest limit of the open plugs).
    limit: usize,
    held: Vec<Arc<Inner>>,
}

/// Holds back the io_uring submissions of this thread's calls while it lives (the
/// block layer's plug, across calls): each call's requests stay queued in the
/// submission ring instead of going to the kernel at the call's end, and go in one
/// `io_uring_enter` with the others at the thread's next [`Device::poll`] (which
/// then also waits for completions, one system call for both) or when the last
/// plug of the thread drops. A loop that reaps a batch of completions and starts a
/// call for each saves a system call (and on virtio disks a doorbell) per call.
///
/// [`UringPlug::with_limit`] bounds what a ring holds back: the call that brings
/// its queue to the limit submits it (fio's `iodepth_batch_submit`), so that a
/// long round does not keep the first requests of the round from the device while
/// the last ones are started.
///
/// For a thread that polls its device ([`CompletionMode::Polled`]): an
/// interrupt-mode device (reaper thread) submits at once regardless, and the other
/// back ends ignore plugs. Plugs nest (the smallest limit holds); a plug belongs to
/// the thread that made it.
///
/// ```no_run
/// # fn main() -> dio::Result<()> {
/// # let raw = dio::RawFile::open("f.dat", &dio::RawOptions::default())?;
/// let file = raw.direct();
/// let _plug = dio::UringPlug::new();
/// // ... start async calls; poll with file.poll(true) to submit and reap ...
/// # Ok(())
/// # }
/// ```
#[must_use = "the plug lasts as long as the value"]
pub struct UringPlug {
    /// The limit of the enclosing plugs, restored at drop.
    outer_limit: usize,
    /// Not `Send`: the plug is this thread's.
    _thread: std::marker::PhantomData<*const ()>,
}

impl UringPlug {
    /// Plug this thread's submissions until the value drops.
    pub fn new() -> UringPlug {
        UringPlug::with_limit(usize::MAX)
    }

    /// The same, holding back at most `limit` requests per ring (at least 1;
    /// 1 submits every call's requests at its end, as without a plug).
    pub fn with_limit(limit: usize) -> UringPlug {
        let outer_limit = PLUG
            .try_with(|p| {
                let mut p = p.borrow_mut();
                p.depth += 1;
                let outer = p.limit;
                p.limit = outer.min(limit.max(1));
                outer
            })
            .unwrap_or(usize::MAX);
        UringPlug {
            outer_limit,
            _thread: std::marker::PhantomData,
        }
    }
}

impl Default for UringPlug {
    fn default() -> Self {
        UringPlug::new()
    }
}

impl Drop for UringPlug {
    fn drop(&mut self) {
        let held = PLUG
            .try_with(|p| {
                let mut p = p.borrow_mut();
                p.depth = p.depth.saturating_sub(1);
                p.limit = self.outer_limit;
                if p.depth == 0 {
                    std::mem::take(&mut p.held)
                } else {
                    Vec::new()
                }
            })
            .unwrap_or_default();
        for ring in held {
            ring.flush();
        }
    }
}

impl std::fmt::Debug for UringPlug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringPlug")
    }
}

/// Whether a plug on this thread takes over the submission of `ring`'s queue.
#[inline]
fn hold_for_plug(ring: &Arc<Inner>) -> bool {
    PLUG.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.depth == 0 {
            return false;
        }
        if ring.pending.load(Ordering::Relaxed) >= p.limit {
            // Enough for one enter: submit them now.
            return false;
        }
        if !p.held.iter().any(|r| Arc::ptr_eq(r, ring)) {
            p.held.push(Arc::clone(ring));
        }
        true
    })
    .unwrap_or(false)
}

fn bufs_empty(set: &FixedSet) -> bool {
    lock_any(&set.bufs).ranges.is_empty()
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock_any<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Whether io_uring can be set up here at all (a tiny ring). `Err` carries the
/// setup error: `ENOSYS` (no io_uring), `EPERM` (seccomp or the sysctl
/// `kernel.io_uring_disabled`), `ENOMEM` (locked-memory limit).
pub fn available() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

impl UringDevice {
    /// Open `path` with `O_DIRECT`, probe its geometry and set up a ring.
    pub fn open(path: &Path, write: bool, cfg: &UringConfig) -> Result<UringDevice> {
        let (file, geometry) = super::probe::open_probed(path, write)?;
        UringDevice::new(file, geometry, cfg)
    }

    /// A device over an already opened `O_DIRECT` file with the given geometry.
    ///
    /// Ring setup errors come back as [`Error::Os`] with the kernel's errno (see
    /// [`available`]). An IOPOLL ring the device refuses is replaced by an ordinary
    /// one, with a note (see [`UringDevice::notes`]).
    pub fn new(file: File, geometry: Geometry, cfg: &UringConfig) -> Result<UringDevice> {
        geometry.validate()?;
        if cfg.ring_per_thread {
            return UringDevice::per_thread(file, geometry, cfg);
        }
        let depth = cfg.queue_depth.clamp(1, 32768);
        let mut notes = Vec::new();
        let mut ring = None;
        if cfg.iopoll {
            match build_ring(depth, cfg.sqpoll, true, false) {
                Ok(r) => match probe_iopoll(&r, &file, &geometry) {
                    Ok(()) => ring = Some(r),
                    Err(e) => notes.push(format!(
                        "IOPOLL refused by this device ({}): using interrupt completions",
                        describe(&e)
                    )),
                },
                Err(e) => notes.push(format!(
                    "IOPOLL ring setup failed ({}): using interrupt completions",
                    describe(&e)
                )),
            }
        }
        let iopoll = ring.is_some();
        let mut defer = false;
        let ring = match ring {
            Some(r) => r,
            None => {
                let single = cfg.single_issuer && !cfg.reaper && !cfg.sqpoll;
                match build_ring(depth, cfg.sqpoll, false, single) {
                    Ok(r) => {
                        defer = single;
                        r
                    }
                    Err(e) if single => {
                        notes.push(format!(
                            "single-issuer io_uring refused ({}): using a shared ring",
                            describe(&e)
                        ));
                        build_ring(depth, cfg.sqpoll, false, false)
                            .map_err(|e| Error::os("io_uring setup", e))?
                    }
                    Err(e) => return Err(Error::os("io_uring setup", e)),
                }
            }
        };
        let mut fixed_file = false;
        if cfg.registered_file {
            match ring.submitter().register_files(&[file.as_raw_fd()]) {
                Ok(()) => fixed_file = true,
                Err(e) => notes.push(format!(
                    "io_uring file registration failed ({}): using the plain descriptor",
                    describe(&e)
                )),
            }
        }
        let inner = Arc::new(Inner::from_ring(
            ring,
            Arc::new(file),
            geometry,
            defer,
            iopoll,
            fixed_file,
            None,
        ));
        // A reaper thread would spin on an IOPOLL ring; busy polling is the caller's.
        let reaper = if cfg.reaper && !iopoll {
            let i = Arc::clone(&inner);
            let handle = thread::Builder::new()
                .name("dio-uring-reap".into())
                .spawn(move || {
                    while !i.stop.load(Ordering::Acquire) {
                        i.wait_unlocked(REAPER_WAIT, false);
                        i.reap_and_complete();
                    }
                })
                .map_err(|e| Error::os("spawn io_uring reaper thread", e))?;
            Some(handle)
        } else {
            if cfg.reaper && iopoll {
                notes.push("IOPOLL completions are polled: no reaper thread".into());
            }
            None
        };
        let mode = if reaper.is_some() {
            CompletionMode::Interrupt
        } else {
            CompletionMode::Polled
        };
        let watcher = (mode == CompletionMode::Polled && !iopoll && !defer && inner.ext_arg)
            .then(|| Arc::new(Watcher::default()));
        Ok(UringDevice {
            rings: Rings::Shared(inner),
            mode,
            reaper,
            notes,
            watcher,
        })
    }

    /// The per-thread mode: this thread's ring is made now (so that a kernel without
    /// io_uring, or refusing single-issuer rings, is found at open), the others at
    /// each thread's first request.
    fn per_thread(file: File, geometry: Geometry, cfg: &UringConfig) -> Result<UringDevice> {
        let depth = cfg.queue_depth.clamp(1, 32768);
        let mut notes = Vec::new();
        if cfg.reaper || cfg.sqpoll || cfg.iopoll {
            notes.push(
                "a ring per thread is polled by its own thread: reaper thread, SQPOLL and IOPOLL ignored"
                    .into(),
            );
        }
        let (ring, defer) = match build_ring(depth, false, false, true) {
            Ok(r) => (r, true),
            Err(e) => {
                notes.push(format!(
                    "single-issuer io_uring refused ({}): per-thread rings without deferred task run",
                    describe(&e)
                ));
                let r = build_ring(depth, false, false, false)
                    .map_err(|e| Error::os("io_uring setup", e))?;
                (r, false)
            }
        };
        let mut fixed_file = false;
        if cfg.registered_file {
            match ring.submitter().register_files(&[file.as_raw_fd()]) {
                Ok(()) => fixed_file = true,
                Err(e) => notes.push(format!(
                    "io_uring file registration failed ({}): using the plain descriptor",
                    describe(&e)
                )),
            }
        }
        let file = Arc::new(file);
        let pt = Arc::new(PerThread {
            id: NEXT_DEVICE.fetch_add(1, Ordering::Relaxed),
            file: Arc::clone(&file),
            geometry,
            depth,
            defer,
            registered_file: fixed_file,
            fixed: Arc::new(FixedSet::default()),
            gone: Arc::new(AtomicBool::new(false)),
            rings: Mutex::new(Vec::new()),
        });
        let inner = Arc::new(Inner::from_ring(
            ring,
            file,
            geometry,
            defer,
            false,
            fixed_file,
            Some(Arc::clone(&pt.fixed)),
        ));
        pt.adopt(inner)
            .map_err(|e| Error::os("io_uring setup (thread exiting)", e))?;
        Ok(UringDevice {
            rings: Rings::PerThread(pt),
            mode: CompletionMode::Polled,
            reaper: None,
            notes,
            // Each ring is reaped by its own thread only.
            watcher: None,
        })
    }

    /// One-line notes about fallbacks taken at setup (IOPOLL refused, file
    /// registration failed, ...).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether the ring busy-polls for completions (IOPOLL accepted).
    pub fn is_iopoll(&self) -> bool {
        match &self.rings {
            Rings::Shared(i) => i.iopoll,
            Rings::PerThread(_) => false,
        }
    }

    /// Whether each submitting thread has a ring of its own
    /// ([`UringConfig::ring_per_thread`]).
    pub fn is_ring_per_thread(&self) -> bool {
        matches!(self.rings, Rings::PerThread(_))
    }

    /// How many threads hold a ring of this device now (per-thread mode; 1 for the
    /// shared ring).
    pub fn rings(&self) -> usize {
        match &self.rings {
            Rings::Shared(_) => 1,
            Rings::PerThread(pt) => pt.rings().len(),
        }
    }

    /// The file or block device.
    pub fn file(&self) -> &File {
        match &self.rings {
            Rings::Shared(i) => &i.file,
            Rings::PerThread(pt) => &pt.file,
        }
    }

    /// Register memory with the ring: requests whose memory is one segment inside a
    /// registered buffer use the fixed-buffer opcodes (no page pinning per request).
    /// Replaces an earlier registration. With a ring per thread, each thread's ring
    /// registers it at the thread's next request.
    ///
    /// # Safety
    /// Every buffer must stay allocated, at its address, until the device is dropped
    /// or [`UringDevice::unregister_buffers`] is called: the kernel keeps the pages
    /// it pinned now, so memory freed and reused meanwhile would receive the data.
    pub unsafe fn register_buffers(&self, bufs: &[MemRef]) -> io::Result<()> {
        match &self.rings {
            Rings::Shared(inner) => {
                let mut st = lock(&inner.state);
                // SAFETY: forwarded from the caller.
                unsafe { inner.register_locked(&mut st, bufs) }?;
                st.fixed_owner = None;
                Ok(())
            }
            Rings::PerThread(pt) => pt.set_fixed(FixedBufs {
                ranges: bufs.iter().map(|b| (b.addr(), b.len())).collect(),
                owner: None,
            }),
        }
    }

    /// Register an arena's memory with the ring, safely: the device keeps the
    /// arena alive as long as the registration lasts. Requests whose memory is one
    /// segment in it (an [`crate::ArenaBuf`] passed to an async call) then use
    /// fixed-buffer I/O: no page pinning per request. Replaces an earlier
    /// registration. Fails with the kernel's error, e.g. `ENOMEM` past
    /// `RLIMIT_MEMLOCK`, or `EINVAL` for an arena over 1 GiB. With a ring per
    /// thread, the calling thread's ring registers it now, the others at their
    /// thread's next request (a refusal there means plain I/O on that ring).
    pub fn register_arena(&self, arena: &Arc<BufArena>) -> io::Result<()> {
        let mem = arena.memory();
        match &self.rings {
            Rings::Shared(inner) => {
                let mut st = lock(&inner.state);
                // SAFETY: the arena's memory stays allocated while the Arc stored
                // below lives, which is until the registration is replaced or the
                // device drops (its ring, declared first in Inner, goes before the
                // state).
                unsafe { inner.register_locked(&mut st, &[mem]) }?;
                st.fixed_owner = Some(Arc::clone(arena));
                Ok(())
            }
            Rings::PerThread(pt) => pt.set_fixed(FixedBufs {
                ranges: vec![(mem.addr(), mem.len())],
                owner: Some(Arc::clone(arena)),
            }),
        }
    }

    /// Drop the buffer registration.
    pub fn unregister_buffers(&self) -> io::Result<()> {
        match &self.rings {
            Rings::Shared(inner) => {
                let mut st = lock(&inner.state);
                if st.fixed_bufs.is_empty() {
                    return Ok(());
                }
                inner.ring.submitter().unregister_buffers()?;
                st.fixed_bufs.clear();
                st.fixed_owner = None;
                Ok(())
            }
            Rings::PerThread(pt) => pt.set_fixed(FixedBufs::default()),
        }
    }

    /// Requests sent with fixed-buffer opcodes so far.
    pub fn fixed_requests(&self) -> u64 {
        match &self.rings {
            Rings::Shared(i) => i.fixed_requests.load(Ordering::Relaxed),
            Rings::PerThread(pt) => {
                pt.fixed.retired.load(Ordering::Relaxed)
                    + pt.rings()
                        .iter()
                        .map(|r| r.fixed_requests.load(Ordering::Relaxed))
                        .sum::<u64>()
            }
        }
    }

    /// Requests submitted and not yet completed (on every thread's ring).
    pub fn in_flight(&self) -> usize {
        match &self.rings {
            Rings::Shared(i) => i.in_flight.load(Ordering::Acquire),
            Rings::PerThread(pt) => pt
                .rings()
                .iter()
                .map(|r| r.in_flight.load(Ordering::Acquire))
                .sum(),
        }
    }
}

fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ETIME) => "timed out".into(),
        _ => e.to_string(),
    }
}

fn build_ring(depth: u32, sqpoll: bool, iopoll: bool, single_issuer: bool) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(depth.saturating_mul(2)).setup_clamp();
    if sqpoll {
        b.setup_sqpoll(50);
    }
    if iopoll {
        b.setup_iopoll();
    }
    if single_issuer {
        b.setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun();
    }
    b.build(depth)
}

/// Read the first logical block through an IOPOLL ring: devices without poll queues
/// fail it (`EOPNOTSUPP`). Bounded to a second.
fn probe_iopoll(ring: &IoUring, file: &File, geo: &Geometry) -> io::Result<()> {
    let lb = geo.logical_block as usize;
    // Dropped only once the read completed: on every other way out (an error of
    // io_uring_enter such as EINTR, the timeout) the read may still be in flight, and
    // the buffer is leaked so the kernel can never write into freed memory.
    let mut buf =
        std::mem::ManuallyDrop::new(crate::AlignedBuf::new(lb, (geo.mem_align as usize).max(lb)));
    let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), lb as u32)
        .offset(0)
        .build()
        .user_data(1);
    // SAFETY: `buf` is never freed while the entry may be in flight (see above).
    unsafe {
        let mut sq = ring.submission_shared();
        sq.push(&sqe).map_err(|_| errno(libc::EBUSY))?;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let entered = ring.submitter().submit_and_wait(0);
        // SAFETY: nobody else uses this ring yet.
        let cqe = unsafe { ring.completion_shared() }.next();
        if let Some(cqe) = cqe {
            // SAFETY: the read completed; the kernel no longer uses the buffer, and
            // it is dropped once, here.
            unsafe { std::mem::ManuallyDrop::drop(&mut buf) };
            let res = cqe.result();
            return if res < 0 { Err(errno(-res)) } else { Ok(()) };
        }
        match entered {
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                return Err(e);
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(errno(libc::ETIME));
        }
        thread::yield_now();
    }
}

impl Inner {
    fn from_ring(
        ring: IoUring,
        file: Arc<File>,
        geometry: Geometry,
        defer: bool,
        iopoll: bool,
        fixed_file: bool,
        fixed_set: Option<Arc<FixedSet>>,
    ) -> Inner {
        let slots = ring.params().cq_entries().max(ring.params().sq_entries()) as usize;
        let ext_arg = ring.params().is_feature_ext_arg();
        Inner {
            ext_arg,
            fixed_file,
            geometry,
            state: Mutex::new(State {
                slots: (0..slots)
                    .map(|_| Slot {
                        req: None,
                        len: 0,
                        done: 0,
                        retries: 0,
                        iov: Vec::new(),
                    })
                    .collect(),
                free: (0..slots as u32).rev().collect(),
                fixed_bufs: Vec::new(),
                fixed_owner: None,
                fixed_gen: 0,
            }),
            pending: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            fixed_requests: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            iopoll,
            defer,
            owner: thread::current().id(),
            stop: AtomicBool::new(false),
            fixed_set,
            ring,
            file,
        }
    }

    /// Per-thread rings: apply the device's buffer registration if it changed since
    /// this ring last did (caller holds the state mutex, on the ring's thread).
    #[inline]
    fn sync_fixed(&self, st: &mut State) -> io::Result<()> {
        let Some(set) = &self.fixed_set else {
            return Ok(());
        };
        let gen = set.gen.load(Ordering::Acquire);
        if gen == st.fixed_gen {
            return Ok(());
        }
        self.sync_fixed_slow(st, set, gen)
    }

    #[cold]
    fn sync_fixed_slow(&self, st: &mut State, set: &FixedSet, gen: u64) -> io::Result<()> {
        let bufs = lock_any(&set.bufs).clone();
        st.fixed_gen = gen;
        if !st.fixed_bufs.is_empty() {
            self.ring.submitter().unregister_buffers()?;
            st.fixed_bufs.clear();
            st.fixed_owner = None;
        }
        if bufs.ranges.is_empty() {
            return Ok(());
        }
        let iov: Vec<libc::iovec> = bufs
            .ranges
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: the memory is an arena kept alive by `fixed_owner` (stored below,
        // dropped only after the registration goes), or raw memory whose registrant
        // promised it stays allocated until it unregisters or the device drops
        // (`UringDevice::register_buffers`); the pinned pages stay the kernel's.
        unsafe { self.ring.submitter().register_buffers(&iov)? };
        st.fixed_bufs = bufs.ranges;
        st.fixed_owner = bufs.owner;
        Ok(())
    }

    /// Replace the registration with `bufs` (shared ring).
    ///
    /// # Safety
    /// As for [`UringDevice::register_buffers`].
    unsafe fn register_locked(&self, st: &mut State, bufs: &[MemRef]) -> io::Result<()> {
        if !st.fixed_bufs.is_empty() {
            self.ring.submitter().unregister_buffers()?;
            st.fixed_bufs.clear();
        }
        let iov = crate::buf::as_iovecs(bufs);
        // SAFETY: the caller guarantees the memory outlives the registration.
        unsafe { self.ring.submitter().register_buffers(iov)? };
        st.fixed_bufs = bufs.iter().map(|b| (b.addr(), b.len())).collect();
        Ok(())
    }

    /// Queue `req` on this ring (entered at unplug, poll, or when the queue is full).
    fn submit(&self, req: Request) {
        if let Err(e) = check_request(&self.geometry, &req) {
            req.complete(Err(e));
            return;
        }
        let len = req.len();
        if len == 0 {
            req.complete(Ok(()));
            return;
        }
        let mut batch = Batch::new();
        let failed = {
            let mut st = lock(&self.state);
            // A registration the kernel refuses on this ring means plain I/O here.
            let _ = self.sync_fixed(&mut st);
            // Every slot in flight: reap (waiting in the kernel) until one frees up.
            let mut failure = None;
            while st.free.is_empty() {
                let r = self.ring.submitter().submit_and_wait(1);
                self.pending.store(0, Ordering::Release);
                if let Err(e) = r {
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                    ) {
                        failure = Some(e);
                        break;
                    }
                }
                self.reap_locked(&mut st, &mut batch);
            }
            match failure {
                Some(e) => Some((req, e)),
                None => {
                    let idx = st.free.pop().expect("a free slot");
                    let slot = &mut st.slots[idx as usize];
                    slot.req = Some(req);
                    slot.len = len;
                    slot.done = 0;
                    slot.retries = 0;
                    self.in_flight.fetch_add(1, Ordering::AcqRel);
                    match self.push_locked(&mut st, idx) {
                        Ok(()) => None,
                        Err(e) => {
                            let req = st.slots[idx as usize].req.take().expect("just stored");
                            st.free.push(idx);
                            self.in_flight.fetch_sub(1, Ordering::AcqRel);
                            Some((req, e))
                        }
                    }
                }
            }
        };
        if let Some((req, e)) = failed {
            batch.push((req, Err(e)));
        }
        complete_all(batch);
    }

    /// Submit what is queued, unless a [`UringPlug`] on this thread holds it back
    /// (then the plug's end, or this thread's next poll, submits it).
    fn unplug(self: &Arc<Self>) {
        if self.pending.load(Ordering::Acquire) == 0 || hold_for_plug(self) {
            return;
        }
        self.flush();
    }

    /// Submit what is queued now (plug or not).
    fn flush(&self) {
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let st = lock(&self.state);
        // Errors here resurface at the next enter (poll or submit), which reaps.
        let _ = self.submit_locked();
        drop(st);
    }

    fn poll(&self, wait: bool) -> io::Result<usize> {
        if self.defer && !self.iopoll && wait {
            return Ok(self.poll_single_issuer());
        }
        if self.defer && !wait {
            // Deferred completion work runs only in an enter with GETEVENTS, which
            // a plain submit carries when the kernel flags pending work.
            let _st = lock(&self.state);
            self.submit_locked()?;
        }
        self.flush();
        let n = self.reap_and_complete();
        if n > 0 || !wait {
            return Ok(n);
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            // Nothing of ours in the kernel: a completion may be on its way to a
            // waiter through another thread's batch.
            thread::yield_now();
            return Ok(0);
        }
        self.wait_unlocked(POLL_WAIT, true);
        Ok(self.reap_and_complete())
    }

    /// A waiting poll of a ring only this thread enters (single issuer, deferred
    /// task run): its completion queue fills only in this thread's enters, so what
    /// is there is reaped first without a system call; if nothing is, one enter
    /// submits what is queued (also what a plug held back), runs the deferred
    /// completion work and sleeps until a completion arrives (as fio's
    /// submit-and-wait does): one system call per round, not a submit and then a
    /// wait.
    fn poll_single_issuer(&self) -> usize {
        let n = self.reap_and_complete();
        if n > 0 {
            return n;
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            // Nothing of ours in the kernel or queued: a completion may be on its
            // way through another thread (a parked call restarted there).
            thread::yield_now();
            return 0;
        }
        // Everything queued goes in this enter (only this thread pushes).
        self.pending.store(0, Ordering::Release);
        self.wait_unlocked(POLL_WAIT, false);
        self.reap_and_complete()
    }

    /// Complete every request in flight (polling). False if the ring keeps failing
    /// (its requests may still be in the kernel).
    fn drain(&self) -> bool {
        let mut errors = 0;
        while self.in_flight.load(Ordering::Acquire) > 0 {
            match self.poll(true) {
                Ok(_) => errors = 0,
                Err(_) => {
                    errors += 1;
                    if errors > 1000 {
                        return false;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        true
    }

    /// The kernel tears a closed ring down in a worker, a moment later, and until
    /// then the registered file stays open: a file system it lives on is "busy" for
    /// umount right after dio exits. Release the file now, synchronously.
    fn release(&self) {
        if self.fixed_file {
            let _ = self.ring.submitter().unregister_files();
        }
        let _ = self.ring.submitter().unregister_buffers();
    }
    fn fd(&self) -> types::Fixed {
        types::Fixed(0)
    }

    /// Build the entry for the rest of the request in slot `idx`.
    fn build_sqe(&self, st: &mut State, idx: u32) -> squeue::Entry {
        let State {
            slots, fixed_bufs, ..
        } = st;
        let slot = &mut slots[idx as usize];
        let req = slot.req.as_ref().expect("slot in use");
        let offset = req.offset + slot.done;
        let mut rw_flags = if req.op == Op::Write && req.fua {
            libc::RWF_DSYNC
        } else {
            0
        };
        if req.atomic {
            // Untorn write (check_request held it to the geometry's atomic units).
            rw_flags |= libc::RWF_ATOMIC;
        }
        // Skip the bytes already moved.
        let mut skip = slot.done as usize;
        let mut first = 0;
        while first < req.segments.len() && skip >= req.segments[first].len() {
            skip -= req.segments[first].len();
            first += 1;
        }
        let rest = &req.segments[first.min(req.segments.len())..];
        let entry = if rest.len() == 1 {
            let seg = rest[0].slice(skip, rest[0].len() - skip);
            let (ptr, len) = (seg.as_ptr(), seg.len() as u32);
            let fixed = fixed_bufs
                .iter()
                .position(|&(start, n)| seg.addr() >= start && seg.addr() + seg.len() <= start + n);
            if fixed.is_some() {
                self.fixed_requests.fetch_add(1, Ordering::Relaxed);
            }
            macro_rules! rw {
                ($fd:expr) => {
                    match (req.op, fixed) {
                        (Op::Read, None) => opcode::Read::new($fd, ptr, len).offset(offset).build(),
                        (Op::Write, None) => opcode::Write::new($fd, ptr, len)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .build(),
                        (Op::Read, Some(i)) => opcode::ReadFixed::new($fd, ptr, len, i as u16)
                            .offset(offset)
                            .build(),
                        (Op::Write, Some(i)) => opcode::WriteFixed::new($fd, ptr, len, i as u16)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .build(),
                    }
                };
            }
            if self.fixed_file {
                rw!(self.fd())
            } else {
                rw!(types::Fd(self.file.as_raw_fd()))
            }
        } else {
            let iov = if skip == 0 {
                // The segments are an iovec array already, and they stay in the slot
                // (on the heap: more than one segment) until the entry is reaped.
                crate::buf::as_iovecs(rest)
            } else {
                slot.iov.clear();
                for (i, seg) in rest.iter().enumerate() {
                    let seg = if i == 0 {
                        seg.slice(skip, seg.len() - skip)
                    } else {
                        *seg
                    };
                    slot.iov.push(libc::iovec {
                        iov_base: seg.as_ptr().cast(),
                        iov_len: seg.len(),
                    });
                }
                &slot.iov[..]
            };
            let (iov, n) = (iov.as_ptr(), iov.len() as u32);
            macro_rules! rwv {
                ($fd:expr) => {
                    match req.op {
                        Op::Read => opcode::Readv::new($fd, iov, n).offset(offset).build(),
                        Op::Write => opcode::Writev::new($fd, iov, n)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .build(),
                    }
                };
            }
            if self.fixed_file {
                rwv!(self.fd())
            } else {
                rwv!(types::Fd(self.file.as_raw_fd()))
            }
        };
        entry.user_data(u64::from(idx))
    }

    /// Queue the entry for slot `idx`; enters the ring only if the queue is full.
    fn push_locked(&self, st: &mut State, idx: u32) -> io::Result<()> {
        let sqe = self.build_sqe(st, idx);
        loop {
            // SAFETY: we hold the state mutex, the only place that touches the
            // submission queue. The entry's memory (request segments, the slot's
            // iovecs) stays valid until its completion is reaped: the request is
            // not completed before then, and the slot is not reused.
            let pushed = unsafe { self.ring.submission_shared().push(&sqe).is_ok() };
            if pushed {
                self.pending.fetch_add(1, Ordering::Release);
                return Ok(());
            }
            self.submit_locked()?;
        }
    }

    /// Enter the ring to submit queued entries (caller holds the state mutex).
    fn submit_locked(&self) -> io::Result<()> {
        self.pending.store(0, Ordering::Release);
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is backed up: the caller reaps, then retries.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reap every completion queued now into `batch` (caller holds the state mutex);
    /// short transfers are resubmitted.
    fn reap_locked(&self, st: &mut State, batch: &mut Batch) {
        let lb = u64::from(self.geometry.logical_block);
        let mut resubmit = false;
        loop {
            // SAFETY: we hold the state mutex, the only place that touches the
            // completion queue.
            let cqe = unsafe { self.ring.completion_shared() }.next();
            let Some(cqe) = cqe else { break };
            let ud = cqe.user_data();
            if ud == WAKE {
                continue;
            }
            let idx = ud as usize;
            let res = cqe.result();
            let Some(slot) = st.slots.get_mut(idx) else {
                continue;
            };
            let Some(req) = slot.req.as_ref() else {
                continue;
            };
            let outcome: Option<io::Result<()>> = if res < 0 {
                let e = -res;
                if matches!(e, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
                    slot.retries += 1;
                    None
                } else {
                    Some(Err(errno(e)))
                }
            } else {
                slot.done += res as u64;
                let at = req.offset + slot.done;
                if slot.done >= slot.len {
                    Some(Ok(()))
                } else if req.op == Op::Read && (res == 0 || at % lb != 0) {
                    // End of file: the rest of the request reads as zeros.
                    zero_from(req, slot.done);
                    Some(Ok(()))
                } else if res == 0 || at % lb != 0 || req.atomic {
                    // A write that moved nothing (or an unaligned part, or part of
                    // an untorn write): never report bytes not written as written.
                    Some(Err(errno(libc::EIO)))
                } else {
                    None
                }
            };
            match outcome {
                Some(result) => {
                    let req = slot.req.take().expect("checked above");
                    st.free.push(idx as u32);
                    self.in_flight.fetch_sub(1, Ordering::AcqRel);
                    batch.push((req, result));
                }
                None => {
                    // Resubmit the rest (a short transfer, or EAGAIN).
                    if let Err(e) = self.push_locked(st, idx as u32) {
                        let slot = &mut st.slots[idx];
                        let req = slot.req.take().expect("checked above");
                        st.free.push(idx as u32);
                        self.in_flight.fetch_sub(1, Ordering::AcqRel);
                        batch.push((req, Err(e)));
                    } else {
                        resubmit = true;
                    }
                }
            }
        }
        if resubmit {
            let _ = self.submit_locked();
        }
    }

    /// Wait in the kernel for at least one completion, at most `timeout`, without the
    /// lock (another thread may reap it first; the caller re-checks). A `poller`
    /// counts as a sleeper whom a thread that reaps completions wakes.
    fn wait_unlocked(&self, timeout: Duration, poller: bool) {
        if self.iopoll {
            // IOPOLL ignores wait timeouts: poll without blocking, briefly.
            let _ = self.ring.submitter().submit_and_wait(0);
            if self.ring_cq_empty() {
                thread::yield_now();
            }
            return;
        }
        if self.ext_arg {
            let ts = types::Timespec::new()
                .sec(timeout.as_secs())
                .nsec(timeout.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            if poller {
                self.sleepers.fetch_add(1, Ordering::SeqCst);
            }
            let _ = self.ring.submitter().submit_with_args(1, &args);
            if poller {
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        } else {
            // No timed wait on this kernel: do not risk sleeping forever on a
            // completion another thread takes.
            let _ = self.ring.submitter().submit();
            thread::sleep(Duration::from_micros(50));
        }
    }

    fn ring_cq_empty(&self) -> bool {
        let st = lock(&self.state);
        // SAFETY: we hold the state mutex, the only place that touches the
        // completion queue.
        let empty = unsafe { self.ring.completion_shared() }.is_empty();
        drop(st);
        empty
    }

    /// Reap under the lock, then complete outside it. Returns how many completed.
    fn reap_and_complete(&self) -> usize {
        let mut batch = Batch::new();
        {
            let mut st = lock(&self.state);
            if self.iopoll {
                let _ = self.ring.submitter().submit_and_wait(0);
            }
            self.reap_locked(&mut st, &mut batch);
            if !batch.is_empty() && self.sleepers.load(Ordering::SeqCst) > 0 {
                // Some of these may be what a sleeping poller waits for: wake it
                // with a no-op completion so it re-checks.
                let nop = opcode::Nop::new().build().user_data(WAKE);
                // SAFETY: we hold the state mutex; a no-op references no memory.
                if unsafe { self.ring.submission_shared().push(&nop) }.is_ok() {
                    let _ = self.submit_locked();
                }
            }
        }
        complete_all(batch)
    }
}

/// How deep completions may nest on one thread before they are deferred. A
/// callback that submits can land in `submit` with every slot busy, which reaps and
/// completes others inline, whose callbacks submit again: without a bound, a long
/// chain of calls started from callbacks grows the stack without end.
const MAX_NESTED_COMPLETIONS: u32 = 4;

thread_local! {
    /// Completion batches running on this thread, one inside another.
    static NESTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Completions reaped too deep to run at once: the outermost batch on this
    /// thread runs them, or the next poll here (a waiter never waits on them).
    static DEFERRED: std::cell::RefCell<std::collections::VecDeque<(Request, io::Result<()>)>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// Leaves one nesting level, also when a completion unwinds. (The thread-locals
/// are reached with `try_with`: a ring released at thread exit completes its
/// requests while this thread's locals may already be gone; then completions run
/// inline.)
struct Nest;

impl Nest {
    fn enter() -> Nest {
        let _ = NESTED.try_with(|n| n.set(n.get() + 1));
        Nest
    }
}

impl Drop for Nest {
    fn drop(&mut self) {
        let _ = NESTED.try_with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Run the completions this thread deferred; how many ran.
fn drain_deferred() -> usize {
    let mut n = 0;
    while let Some((req, result)) = DEFERRED
        .try_with(|d| d.borrow_mut().pop_front())
        .ok()
        .flatten()
    {
        let _nest = Nest::enter();
        req.complete(result);
        n += 1;
    }
    n
}

/// Complete a reaped batch: inline, unless completions already nest deep on this
/// thread, in which case they queue for the outermost batch (or the next poll).
fn complete_all(batch: Batch) -> usize {
    let n = batch.len();
    let depth = NESTED.try_with(|d| d.get()).unwrap_or(0);
    let mut batch = Some(batch);
    if depth >= MAX_NESTED_COMPLETIONS {
        let queued = DEFERRED.try_with(|d| {
            if let Some(b) = batch.take() {
                d.borrow_mut().extend(b);
            }
        });
        if queued.is_ok() {
            return n;
        }
    }
    if let Some(batch) = batch {
        let _nest = Nest::enter();
        for (req, result) in batch {
            req.complete(result);
        }
    }
    if NESTED.try_with(|d| d.get()).unwrap_or(0) == 0 {
        drain_deferred();
    }
    n
}

/// Zero the request's memory from byte `from` on (a read that met end of file).
fn zero_from(req: &Request, from: u64) {
    let mut skip = from as usize;
    for seg in &req.segments {
        if skip >= seg.len() {
            skip -= seg.len();
            continue;
        }
        seg.slice(skip, seg.len() - skip).zero();
        skip = 0;
    }
}

impl Device for UringDevice {
    fn geometry(&self) -> Geometry {
        match &self.rings {
            Rings::Shared(i) => i.geometry,
            Rings::PerThread(pt) => pt.geometry,
        }
    }

    #[inline]
    fn submit(&self, req: Request) {
        match &self.rings {
            Rings::Shared(inner) => inner.submit(req),
            Rings::PerThread(pt) => match pt.local() {
                Ok(ring) => ring.submit(req),
                Err(e) => req.complete(Err(e)),
            },
        }
    }

    fn unplug(&self) {
        if self.mode == CompletionMode::Interrupt {
            // Completions come on the reaper thread, which no plug may delay.
            if let Rings::Shared(inner) = &self.rings {
                inner.flush();
            }
            return;
        }
        match &self.rings {
            Rings::Shared(inner) => inner.unplug(),
            Rings::PerThread(pt) => {
                if let Some(ring) = pt.existing() {
                    ring.unplug();
                }
            }
        }
    }

    fn poll(&self, wait: bool) -> io::Result<usize> {
        // Completions deferred on this thread first: a sync call made deep in a
        // chain of callbacks may be waiting on one of them.
        let deferred = drain_deferred();
        if deferred > 0 {
            return Ok(deferred);
        }
        match &self.rings {
            Rings::Shared(inner) => inner.poll(wait),
            // A thread reaps its own ring only: its requests are there, and only
            // it may enter a single-issuer ring.
            Rings::PerThread(pt) => match pt.existing() {
                Some(ring) => ring.poll(wait),
                None => {
                    if wait {
                        thread::yield_now();
                    }
                    Ok(0)
                }
            },
        }
    }

    fn completion_mode(&self) -> CompletionMode {
        self.mode
    }

    /// A shared polled ring (not single-issuer, not IOPOLL): a watcher thread,
    /// started at the first watch, reaps while watches are held. Per-thread,
    /// single-issuer and IOPOLL rings refuse (only their own thread may reap, or
    /// reaping means busy polling).
    fn watch(&self) -> bool {
        match (&self.watcher, &self.rings) {
            (Some(w), Rings::Shared(inner)) => w.watch(inner),
            _ => false,
        }
    }

    fn unwatch(&self) {
        if let Some(w) = &self.watcher {
            w.unwatch();
        }
    }

    fn flush(&self) -> io::Result<()> {
        super::fdatasync(self.file())
    }

    fn name(&self) -> &str {
        "uring"
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        let inner = match &self.rings {
            Rings::Shared(inner) => inner,
            Rings::PerThread(pt) => {
                pt.gone.store(true, Ordering::Release);
                // This thread's ring goes now (drained first); other threads' rings
                // go when those threads exit or next set up a ring: only a ring's own
                // thread may reap it, and its requests own memory until reaped.
                let mine = RINGS
                    .try_with(|t| {
                        let mut t = t.borrow_mut();
                        let at = t.iter().position(|l| l.device == pt.id);
                        at.map(|i| t.swap_remove(i))
                    })
                    .ok()
                    .flatten();
                drop(mine);
                return;
            }
        };
        if let Some(w) = &self.watcher {
            w.stop(inner);
        }
        if let Some(handle) = self.reaper.take() {
            inner.stop.store(true, Ordering::Release);
            {
                let _st = lock(&inner.state);
                let nop = opcode::Nop::new().build().user_data(WAKE);
                // SAFETY: we hold the state mutex; a no-op references no memory.
                let _ = unsafe { inner.ring.submission_shared().push(&nop) };
                let _ = inner.submit_locked();
            }
            // Dropped on the reaper itself (a completion held the last handle): it
            // stops by itself; it cannot join itself.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
        // Requests still in flight own caller memory until they complete: drain.
        if inner.defer && thread::current().id() != inner.owner {
            // Only the owner may reap a single-issuer ring. Leak the ring and what
            // it holds rather than free memory the kernel may still write.
            if inner.in_flight.load(Ordering::Acquire) > 0 {
                std::mem::forget(Arc::clone(inner));
            }
            return;
        }
        if !inner.drain() {
            std::mem::forget(Arc::clone(inner));
            return;
        }
        inner.release();
    }
}

/// The watcher of a shared polled ring ([`Device::watch`]): a thread that, while
/// any watch is held, sleeps in the kernel until a completion arrives, reaps it and
/// runs its callbacks (which wake the async tasks waiting for it). With no watch
/// held it sleeps on a condition variable: it never spins, and a ring nobody
/// watches is reaped by its pollers only, as before.
#[derive(Default)]
struct Watcher {
    state: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Default)]
struct WatchState {
    watches: usize,
    stop: bool,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watcher {
    fn watch(self: &Arc<Self>, inner: &Arc<Inner>) -> bool {
        let mut st = lock_any(&self.state);
        if st.stop {
            return false;
        }
        if st.thread.is_none() {
            let (w, i) = (Arc::clone(self), Arc::clone(inner));
            match thread::Builder::new()
                .name("dio-uring-watch".into())
                .spawn(move || w.run(&i))
            {
                Ok(h) => st.thread = Some(h),
                // No thread: the waiter polls.
                Err(_) => return false,
            }
        }
        st.watches += 1;
        if st.watches == 1 {
            self.cv.notify_all();
        }
        true
    }

    fn unwatch(&self) {
        let mut st = lock_any(&self.state);
        st.watches = st.watches.saturating_sub(1);
    }

    fn run(&self, inner: &Inner) {
        loop {
            {
                let mut st = lock_any(&self.state);
                while st.watches == 0 && !st.stop {
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stop {
                    return;
                }
            }
            // What is there already, then sleep until the next completion (or
            // WATCH_WAIT: the watches are checked again).
            if inner.reap_and_complete() > 0 {
                continue;
            }
            let ts = types::Timespec::new()
                .sec(WATCH_WAIT.as_secs())
                .nsec(WATCH_WAIT.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            let waited = Instant::now();
            match inner.ring.submitter().submit_with_args(1, &args) {
                Err(e)
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) =>
                {
                    // A ring that refuses to wait: back off rather than spin.
                    thread::sleep(Duration::from_millis(1));
                }
                Err(_) if waited.elapsed() < Duration::from_micros(100) => {
                    // Interrupted or busy at once: a short back-off, never a spin.
                    thread::sleep(Duration::from_micros(50));
                }
                _ => {}
            }
            inner.reap_and_complete();
        }
    }

    /// Stop the thread (the device is going away): it leaves its kernel wait on a
    /// no-op completion.
    fn stop(&self, inner: &Inner) {
        let handle = {
            let mut st = lock_any(&self.state);
            st.stop = true;
            self.cv.notify_all();
            st.thread.take()
        };
        let Some(handle) = handle else { return };
        {
            let _st = lock(&inner.state);
            let nop = opcode::Nop::new().build().user_data(WAKE);
            // SAFETY: we hold the state mutex; a no-op references no memory.
            let _ = unsafe { inner.ring.submission_shared().push(&nop) };
            let _ = inner.submit_locked();
        }
        // Dropped on the watcher itself (a completion held the last handle): it
        // stops by itself; it cannot join itself.
        if handle.thread().id() != thread::current().id() {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("geometry", &self.geometry())
            .field("mode", &self.mode)
            .field("iopoll", &self.is_iopoll())
            .field("ring_per_thread", &self.is_ring_per_thread())
            .field("notes", &self.notes)
            .finish()
    }
}
