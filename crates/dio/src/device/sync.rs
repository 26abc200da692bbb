//! The pread/pwrite back end: `preadv2`/`pwritev2` on an `O_DIRECT` descriptor
//! (`RWF_DSYNC` for FUA writes). With workers, `submit` queues the request to a
//! small thread pool that completes it ([`CompletionMode::Interrupt`]); without,
//! `submit` does the I/O and completes inline (for synchronous use).
//!
//! The fallback where io_uring is unavailable; it knows nothing of files or maps.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use super::{check_request, CompletionMode, Device, Geometry, Op, Request};
use crate::{Error, Result};

/// Most iovecs passed to one `preadv2`/`pwritev2` (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// How a [`SyncDevice`] runs requests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncConfig {
    /// Worker threads; 0 completes every request inline in `submit`.
    pub workers: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { workers: 4 }
    }
}

struct Queue {
    jobs: VecDeque<Request>,
    stop: bool,
}

struct Inner {
    file: File,
    geometry: Geometry,
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// An `O_DIRECT` file or block device driven by positioned reads and writes.
pub struct SyncDevice {
    inner: Arc<Inner>,
    workers: Vec<thread::JoinHandle<()>>,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
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
        let inner = Arc::new(Inner {
            file,
            geometry,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                stop: false,
            }),
            ready: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(cfg.workers);
        for n in 0..cfg.workers {
            let i = Arc::clone(&inner);
            let spawned = thread::Builder::new()
                .name(format!("dio-sync-{n}"))
                .spawn(move || worker(&i));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let dev = SyncDevice { inner, workers };
                    drop(dev);
                    return Err(Error::os("spawn pread/pwrite worker", e));
                }
            }
        }
        Ok(SyncDevice { inner, workers })
    }

    /// The file or block device.
    pub fn file(&self) -> &File {
        &self.inner.file
    }
}

fn worker(inner: &Inner) {
    loop {
        let req = {
            let mut q = lock(&inner.queue);
            loop {
                if let Some(r) = q.jobs.pop_front() {
                    break r;
                }
                if q.stop {
                    return;
                }
                q = inner.ready.wait(q).unwrap_or_else(|e| e.into_inner());
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
        if self.workers.is_empty() {
            let r = self.inner.execute(&req);
            req.complete(r);
            return;
        }
        if let Err(e) = check_request(&self.inner.geometry, &req) {
            req.complete(Err(e));
            return;
        }
        lock(&self.inner.queue).jobs.push_back(req);
        self.inner.ready.notify_one();
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
        lock(&self.inner.queue).stop = true;
        self.inner.ready.notify_all();
        // The last reference may go away on a worker itself (a completion dropped
        // the last handle to the file): that worker ends by itself once the queue
        // is drained; joining it from itself would fail.
        let me = std::thread::current().id();
        for h in self.workers.drain(..) {
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
            .field("workers", &self.workers.len())
            .finish()
    }
}
