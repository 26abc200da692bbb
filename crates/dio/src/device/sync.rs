//! The pread/pwrite back end: `preadv2`/`pwritev2` on an `O_DIRECT` descriptor
//! (`RWF_DSYNC` for FUA writes). With workers, `submit` queues the request to a
//! small thread pool that completes it ([`CompletionMode::Interrupt`]); without,
//! `submit` does the I/O and completes inline (for synchronous use).
//!
//! With [`SyncConfig::per_thread`], every thread that submits gets a worker set of
//! its own (its queue, its lock, [`SyncConfig::workers`] threads), made at its first
//! request, up to [`MAX_SETS`] sets; threads past that share them. N threads doing
//! I/O at once then take no lock in common and each has `workers` requests in
//! flight, as each has its own ring with io_uring's ring per thread. A worker's
//! own submissions (from completion callbacks) go to its set.
//!
//! The fallback where io_uring is unavailable; it knows nothing of files or maps.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use super::{check_request, CompletionMode, Device, Geometry, Op, Request};
use crate::{Error, Result};

/// Most iovecs passed to one `preadv2`/`pwritev2` (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Most worker sets of a per-thread device; later threads share them.
pub(crate) const MAX_SETS: usize = 8;

/// How a [`SyncDevice`] runs requests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncConfig {
    /// Worker threads (per set with `per_thread`); 0 completes every request
    /// inline in `submit`.
    pub workers: usize,
    /// A worker set per submitting thread: each thread that submits gets a queue
    /// and `workers` threads of its own at its first request (up to 8 sets; later
    /// threads share them), so threads doing I/O at once share no lock and each
    /// has `workers` requests in flight. Requests submitted from a worker (by a
    /// completion callback) go to its own set.
    pub per_thread: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            workers: 4,
            per_thread: false,
        }
    }
}

struct Queue {
    jobs: VecDeque<Request>,
    stop: bool,
    /// Workers asleep on `ready`: a submit wakes one only if there is one (a
    /// condvar notify is a system call even with nobody waiting).
    idle: usize,
}

/// A queue and the workers that serve it.
struct Set {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Set {
    fn new() -> Set {
        Set {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                stop: false,
                idle: 0,
            }),
            ready: Condvar::new(),
        }
    }

    fn push(&self, req: Request) {
        let mut q = lock(&self.queue);
        q.jobs.push_back(req);
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.ready.notify_one();
        }
    }

    fn stop(&self) {
        lock(&self.queue).stop = true;
        self.ready.notify_all();
    }
}

struct Inner {
    file: File,
    geometry: Geometry,
}

/// The sets of a device and their workers; locked to add a set and at drop.
struct Pool {
    sets: Vec<Arc<Set>>,
    workers: Vec<thread::JoinHandle<()>>,
    /// Threads given a set so far (the next one gets set number `assigned`).
    /// Counted under the lock: a thread numbered past the sets that exist gets a
    /// new one, in the order the threads take the lock.
    assigned: usize,
}

/// An `O_DIRECT` file or block device driven by positioned reads and writes.
pub struct SyncDevice {
    inner: Arc<Inner>,
    /// Worker threads per set (0: inline).
    per_set: usize,
    per_thread: bool,
    /// Names the device in the threads' tables (never reused).
    id: u64,
    /// The first set: every thread's without `per_thread`.
    first: Option<Arc<Set>>,
    pool: Mutex<Pool>,
}

/// Device ids for the threads' tables.
static NEXT_DEVICE: AtomicU64 = AtomicU64::new(1);

/// How many devices a thread remembers its set of.
const REMEMBERED: usize = 8;

thread_local! {
    /// This thread's worker set on the per-thread devices it used last (device
    /// id, set), the most recent first. A worker finds its own set here.
    static SETS: RefCell<Vec<(u64, Arc<Set>)>> = const { RefCell::new(Vec::new()) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SyncDevice {
    /// Open `path` with `O_DIRECT` and probe its geometry.
    pub fn open(path: &Path, write: bool, cfg: &SyncConfig) -> Result<SyncDevice> {
        let (file, geometry) = super::probe::open_probed(path, write)?;
        SyncDevice::new(file, geometry, cfg)
    }

    /// A device over an already opened `O_DIRECT` file with the given geometry.
    pub fn new(file: File, geometry: Geometry, cfg: &SyncConfig) -> Result<SyncDevice> {
        geometry.validate()?;
        let mut dev = SyncDevice {
            inner: Arc::new(Inner { file, geometry }),
            per_set: cfg.workers,
            per_thread: cfg.per_thread && cfg.workers > 0,
            id: NEXT_DEVICE.fetch_add(1, Ordering::Relaxed),
            first: None,
            pool: Mutex::new(Pool {
                sets: Vec::new(),
                assigned: 0,
                workers: Vec::new(),
            }),
        };
        if cfg.workers > 0 {
            // The first set now, so that a failure to spawn shows at open.
            let set = {
                let mut pool = lock(&dev.pool);
                dev.add_set(&mut pool)
                    .map_err(|e| Error::os("spawn pread/pwrite worker", e))?
            };
            dev.first = Some(set);
        }
        Ok(dev)
    }

    /// The file or block device.
    pub fn file(&self) -> &File {
        &self.inner.file
    }

    /// How many worker sets the device runs (1 without `per_thread`, 0 inline).
    pub fn worker_sets(&self) -> usize {
        lock(&self.pool).sets.len()
    }

    /// Start a set of `per_set` workers. On a failed spawn the set's workers that
    /// started are stopped (they end by themselves) and the error returned.
    fn add_set(&self, pool: &mut Pool) -> io::Result<Arc<Set>> {
        let set = Arc::new(Set::new());
        let mut started = Vec::with_capacity(self.per_set);
        for n in 0..self.per_set {
            let (inner, s) = (Arc::clone(&self.inner), Arc::clone(&set));
            let (id, per_thread) = (self.id, self.per_thread);
            let spawned = thread::Builder::new()
                .name(format!("dio-sync-{}-{n}", pool.sets.len()))
                .spawn(move || {
                    if per_thread {
                        // What this worker submits (from completions) stays here.
                        let _ = SETS.try_with(|t| t.borrow_mut().push((id, Arc::clone(&s))));
                    }
                    worker(&inner, &s)
                });
            match spawned {
                Ok(h) => started.push(h),
                Err(e) => {
                    set.stop();
                    pool.workers.extend(started);
                    return Err(e);
                }
            }
        }
        pool.workers.extend(started);
        pool.sets.push(Arc::clone(&set));
        Ok(set)
    }

    /// The calling thread's set (per-thread mode): found in its table, or given
    /// now: a new set while there are fewer than [`MAX_SETS`], else a shared one.
    fn my_set(&self) -> Arc<Set> {
        let found = SETS.try_with(|t| {
            let mut t = t.borrow_mut();
            let at = t.iter().position(|(d, _)| *d == self.id)?;
            t[..=at].rotate_right(1);
            Some(Arc::clone(&t[0].1))
        });
        match found {
            Ok(Some(set)) => set,
            Ok(None) => self.assign(),
            // The thread is exiting: the first set serves it.
            Err(_) => Arc::clone(self.first.as_ref().expect("workers")),
        }
    }

    #[cold]
    fn assign(&self) -> Arc<Set> {
        let set = {
            let mut pool = lock(&self.pool);
            let n = pool.assigned;
            pool.assigned += 1;
            if n < pool.sets.len() {
                Arc::clone(&pool.sets[n])
            } else if pool.sets.len() < MAX_SETS {
                match self.add_set(&mut pool) {
                    Ok(s) => s,
                    // No thread to spare: share a set that runs.
                    Err(_) => Arc::clone(&pool.sets[n % pool.sets.len()]),
                }
            } else {
                Arc::clone(&pool.sets[n % pool.sets.len()])
            }
        };
        let _ = SETS.try_with(|t| {
            let mut t = t.borrow_mut();
            t.insert(0, (self.id, Arc::clone(&set)));
            t.truncate(REMEMBERED);
        });
        set
    }
}

fn worker(inner: &Inner, set: &Set) {
    loop {
        let req = {
            let mut q = lock(&set.queue);
            loop {
                if let Some(r) = q.jobs.pop_front() {
                    break r;
                }
                if q.stop {
                    return;
                }
                q.idle += 1;
                q = set.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                q.idle -= 1;
            }
        };
        let r = inner.execute(&req);
        req.complete(r);
    }
}

impl Inner {
    /// Move the whole request, resuming after short transfers; a read that meets end
    /// of file zero-fills the rest.
    fn execute(&self, req: &Request) -> io::Result<()> {
        check_request(&self.geometry, req)?;
        let total = req.len();
        let lb = u64::from(self.geometry.logical_block);
        let mut flags = if req.op == Op::Write && req.fua {
            libc::RWF_DSYNC
        } else {
            0
        };
        if req.atomic {
            // Untorn: the kernel writes it whole or fails it (check_request has
            // held it to the geometry's atomic units).
            flags |= libc::RWF_ATOMIC;
        }
        let mut iov: Vec<libc::iovec> = Vec::new();
        let mut done = 0u64;
        let mut retries = 0;
        while done < total {
            // The iovecs for the rest of the request: the segments themselves at
            // first, a copy from where a short transfer stopped after that.
            let whole = done == 0 && req.segments.len() <= IOV_MAX;
            if !whole {
                iov.clear();
                let mut skip = done as usize;
                for seg in &req.segments {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    let s = seg.slice(skip, seg.len() - skip);
                    skip = 0;
                    iov.push(libc::iovec {
                        iov_base: s.as_ptr().cast(),
                        iov_len: s.len(),
                    });
                    if iov.len() == IOV_MAX {
                        break;
                    }
                }
            }
            let iov = if whole {
                crate::buf::as_iovecs(&req.segments)
            } else {
                &iov[..]
            };
            let fd = self.file.as_raw_fd();
            let off = (req.offset + done) as libc::off_t;
            let n = match req.op {
                // SAFETY: the iovecs describe request memory that is valid (and, for
                // reads, writable and unaliased) until the request completes, which
                // is after this call.
                Op::Read => unsafe {
                    libc::preadv2(fd, iov.as_ptr(), iov.len() as i32, off, flags)
                },
                // SAFETY: as above; the kernel only reads the memory.
                Op::Write => unsafe {
                    libc::pwritev2(fd, iov.as_ptr(), iov.len() as i32, off, flags)
                },
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) && retries < 16 {
                    retries += 1;
                    continue;
                }
                return Err(e);
            }
            let n = n as u64;
            done += n;
            let at = req.offset + done;
            if done >= total {
                break;
            }
            if req.op == Op::Read && (n == 0 || at % lb != 0) {
                // End of file: the rest reads as zeros.
                let mut skip = done as usize;
                for seg in &req.segments {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    seg.slice(skip, seg.len() - skip).zero();
                    skip = 0;
                }
                break;
            }
            if n == 0 || at % lb != 0 || req.atomic {
                // An untorn write is never resumed piecewise either.
                // Never report bytes not written as written.
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(())
    }
}

impl Device for SyncDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    fn submit(&self, req: Request) {
        let Some(first) = &self.first else {
            let r = self.inner.execute(&req);
            req.complete(r);
            return;
        };
        if let Err(e) = check_request(&self.inner.geometry, &req) {
            req.complete(Err(e));
            return;
        }
        if self.per_thread {
            self.my_set().push(req);
        } else {
            first.push(req);
        }
    }

    fn completion_mode(&self) -> CompletionMode {
        CompletionMode::Interrupt
    }

    fn flush(&self) -> io::Result<()> {
        super::fdatasync(&self.inner.file)
    }

    fn name(&self) -> &str {
        "sync"
    }
}

impl Drop for SyncDevice {
    fn drop(&mut self) {
        // Workers finish what is queued (it owns caller memory until completed).
        let (sets, workers) = {
            let mut pool = lock(&self.pool);
            (
                std::mem::take(&mut pool.sets),
                std::mem::take(&mut pool.workers),
            )
        };
        for s in &sets {
            s.stop();
        }
        // The last reference may go away on a worker itself (a completion dropped
        // the last handle to the file): that worker ends by itself once the queue
        // is drained; joining it from itself would fail.
        let me = std::thread::current().id();
        for h in workers {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

impl std::fmt::Debug for SyncDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncDevice")
            .field("geometry", &self.inner.geometry)
            .field("workers", &self.per_set)
            .field("per_thread", &self.per_thread)
            .field("sets", &self.worker_sets())
            .finish()
    }
}
