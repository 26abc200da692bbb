//! The raw client: a host file or block device opened for direct I/O, as a
//! [`DirectFile`] over the identity map. It picks the back end (io_uring, or
//! pread/pwrite when io_uring is unavailable, with a note saying why), probes the
//! geometry, and keeps the file's size in step with `ftruncate`.
//!
//! It holds no I/O logic of its own: bytes move through the engine and a device.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::probe::{self, Probed};
use crate::device::sync::{SyncConfig, SyncDevice};
#[cfg(feature = "io-uring")]
use crate::device::uring::{UringConfig, UringDevice};
use crate::device::{Device, Geometry};
use crate::map::RawMap;
use crate::{DirectFile, Error, FileState, Flags, IdentityMap, Result};

/// Which device back end a [`RawFile`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring if available, else pread/pwrite (with a note saying why).
    Auto,
    /// io_uring, or fail.
    Uring,
    /// pread/pwrite (`preadv2`/`pwritev2`) on a small thread pool.
    Sync,
}

/// How to open a [`RawFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOptions {
    /// Open read-write (else read-only; writes fail with EBADF).
    pub write: bool,
    /// Create the file if missing (needs `write`).
    pub create: bool,
    /// The device back end.
    pub backend: Backend,
    /// io_uring queue depth.
    pub queue_depth: u32,
    /// Open with `O_DSYNC`: every write is durable when it completes.
    pub dsync: bool,
    /// Ask for busy-polled completions (`IORING_SETUP_IOPOLL`); falls back with a
    /// note where the device refuses.
    pub iopoll: bool,
    /// Let a kernel thread poll the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Every call on this file comes from the thread that opens it: io_uring then
    /// runs completion work only when that thread reaps (single issuer, deferred task
    /// run), which saves interrupts and wakeups per I/O. Calls from other threads
    /// fail (EEXIST).
    pub single_thread: bool,
    /// A ring per submitting thread (io_uring back end): N threads doing I/O on
    /// this file share no ring and no lock, each reaping its own completions (see
    /// [`UringConfig::ring_per_thread`]). A thread waits only for its own calls.
    /// Overrides `single_thread`. On the pread/pwrite back end: a worker set per
    /// submitting thread ([`SyncConfig::per_thread`]).
    pub ring_per_thread: bool,
    /// Create the file unnamed (`O_TMPFILE`) in the directory `path` names:
    /// nothing refers to it until the caller gives it a name (`linkat` of
    /// [`RawFile::fd`] through `/proc/self/fd`), so a crash or a kill before that
    /// leaves nothing behind. Needs `write`. A file system without `O_TMPFILE`
    /// fails the open (EOPNOTSUPP, or EISDIR on old kernels): create it by name
    /// then.
    pub unnamed: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            write: false,
            create: false,
            backend: Backend::Auto,
            queue_depth: 128,
            dsync: false,
            iopoll: false,
            sqpoll: false,
            single_thread: false,
            ring_per_thread: false,
            unnamed: false,
        }
    }
}

enum Dev {
    #[cfg(feature = "io-uring")]
    Uring(Arc<UringDevice>),
    Sync(Arc<SyncDevice>),
}

/// A host file or block device open for direct I/O. See the module docs.
pub struct RawFile {
    direct: DirectFile,
    dev: Dev,
    path: PathBuf,
    block_device: bool,
    write: bool,
    notes: Vec<String>,
}

impl std::fmt::Debug for RawFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFile")
            .field("path", &self.path)
            .field("backend", &self.backend_name())
            .field("size", &self.size())
            .field("block_device", &self.block_device)
            .finish()
    }
}

/// Why io_uring cannot be used, as a short phrase for notes and errors.
#[cfg(feature = "io-uring")]
fn uring_unavailable_reason(e: &Error) -> String {
    match e.errno() {
        libc::ENOSYS => "ENOSYS: the kernel has no io_uring".into(),
        libc::EPERM => "EPERM: blocked by seccomp or the sysctl kernel.io_uring_disabled".into(),
        libc::ENOMEM => {
            "ENOMEM at ring setup: raise RLIMIT_MEMLOCK or lower the queue depth".into()
        }
        _ => e.to_string(),
    }
}

/// Build the device for `file`: io_uring where `opts.backend` allows and the kernel
/// agrees, else pread/pwrite, with a note saying why io_uring was not used.
fn choose_device(
    file: File,
    path: &Path,
    geometry: Geometry,
    opts: &RawOptions,
    notes: &mut Vec<String>,
) -> Result<Dev> {
    let sync = |file: File| -> Result<Dev> {
        Ok(Dev::Sync(Arc::new(SyncDevice::new(
            file,
            geometry,
            &SyncConfig {
                per_thread: opts.ring_per_thread,
                ..SyncConfig::default()
            },
        )?)))
    };
    if opts.backend == Backend::Sync {
        return sync(file);
    }
    #[cfg(not(feature = "io-uring"))]
    #[allow(clippy::needless_return)] // the io_uring attempt follows when built with it
    {
        let _ = notes;
        if opts.backend == Backend::Uring {
            let why = "dio was built without its io-uring feature";
            return Err(Error::os(
                format!("{}: io_uring unavailable ({why})", path.display()),
                std::io::Error::from_raw_os_error(libc::ENOSYS),
            ));
        }
        return sync(file);
    }
    #[cfg(feature = "io-uring")]
    let cfg = UringConfig {
        queue_depth: opts.queue_depth.max(1),
        iopoll: opts.iopoll,
        sqpoll: opts.sqpoll,
        single_issuer: opts.single_thread,
        ring_per_thread: opts.ring_per_thread,
        ..UringConfig::default()
    };
    #[cfg(feature = "io-uring")]
    let dup = file
        .try_clone()
        .map_err(|e| Error::os(format!("dup {}", path.display()), e))?;
    #[cfg(feature = "io-uring")]
    match UringDevice::new(dup, geometry, &cfg) {
        Ok(d) => Ok(Dev::Uring(Arc::new(d))),
        // Only an OS refusal (no io_uring, seccomp, memlock) falls back.
        Err(e @ Error::Os { .. }) => {
            let why = uring_unavailable_reason(&e);
            if opts.backend == Backend::Uring {
                return Err(Error::os(
                    format!("{}: io_uring unavailable ({why})", path.display()),
                    std::io::Error::from_raw_os_error(e.errno()),
                ));
            }
            notes.push(format!("io_uring unavailable ({why}): using pread/pwrite"));
            sync(file)
        }
        Err(e) => Err(e),
    }
}

/// A character device, FIFO or socket has no blocks to address: refuse it by what
/// it is (EINVAL), before an open that could block on a FIFO or blame the file
/// system of `/dev` for refusing `O_DIRECT`.
fn refuse_stream(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = m.file_type();
    let what = if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        return Ok(());
    };
    Err(Error::os(
        format!(
            "{}: is {what}, not a regular file or block device: no direct I/O",
            path.display()
        ),
        std::io::Error::from_raw_os_error(libc::EINVAL),
    ))
}

impl RawFile {
    /// Open `path` (a regular file or a block device) for direct I/O.
    ///
    /// Errors name the path: a missing file, a file system that refuses `O_DIRECT`
    /// ("this file system (tmpfs) does not support O_DIRECT"), io_uring unavailable
    /// with [`Backend::Uring`].
    pub fn open(path: impl AsRef<Path>, opts: &RawOptions) -> Result<RawFile> {
        let path = path.as_ref();
        refuse_stream(path)?;
        let mut extra = if opts.dsync { libc::O_DSYNC } else { 0 };
        if opts.unnamed {
            if !opts.write {
                return Err(Error::Invalid(format!(
                    "{}: an unnamed file is created for writing",
                    path.display()
                )));
            }
            extra |= libc::O_TMPFILE;
        }
        let create = opts.create && !opts.unnamed;
        let file = probe::open_direct_with(path, opts.write, create, extra)?;
        let probed = probe::probe(file.as_fd(), path)?;
        let geometry = device_geometry(&probed, opts.write, path);
        let mut notes = Vec::new();

        let dev = choose_device(file, path, geometry, opts, &mut notes)?;
        let device: Arc<dyn Device> = match &dev {
            #[cfg(feature = "io-uring")]
            Dev::Uring(d) => {
                notes.extend(d.notes().iter().cloned());
                Arc::clone(d) as Arc<dyn Device>
            }
            Dev::Sync(d) => {
                if opts.iopoll || opts.sqpoll {
                    notes.push("IOPOLL and SQPOLL need io_uring: ignored".into());
                }
                Arc::clone(d) as Arc<dyn Device>
            }
        };
        let lb = geometry.logical_block;
        // A writable regular file shrinks inside the engine's truncate (under its
        // exclusion of every write), not after it: a write that slipped in between
        // would be cut off by a late ftruncate.
        let resize = if opts.write && !probed.block_device {
            let file = match &dev {
                #[cfg(feature = "io-uring")]
                Dev::Uring(d) => d.file().try_clone(),
                Dev::Sync(d) => d.file().try_clone(),
            };
            Some(file.map_err(|e| Error::os(format!("dup {}", path.display()), e))?)
        } else {
            None
        };
        let map = Arc::new(RawMap {
            identity: IdentityMap::new(lb, geometry.size),
            blocks: geometry.size / u64::from(lb),
            block_size: lb,
            path: path.to_path_buf(),
            resize,
        });
        let state = Arc::new(FileState::new(probed.size));
        let mut direct = DirectFile::new(device, map, state)?;
        if !opts.write {
            direct = direct.read_only();
        }
        Ok(RawFile {
            direct,
            dev,
            path: path.to_path_buf(),
            block_device: probed.block_device,
            write: opts.write,
            notes,
        })
    }

    /// Read up to `buf.len()` bytes at any `offset` into any memory: the engine
    /// bounces what is not aligned (the way `pread` on a file without `O_DIRECT`
    /// would accept it). Short at the end of the file; 0 at or past it. Use
    /// [`RawFile::direct`] for the strict zero-copy calls.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.direct.read_at(offset, buf, Flags::UNALIGNED)
    }

    /// Write `data` at any `offset` from any memory (a regular file grows; a block
    /// device refuses past its end). Unaligned heads and tails are
    /// read-modify-written under the engine's range lock. A partial last block goes
    /// to the device whole, and a regular file it grew is cut back before the call
    /// returns: the file ends where `pwrite` would leave it ([`RawFile::size`]).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        self.direct.write_at(offset, data, Flags::UNALIGNED)
    }

    /// The file as a [`DirectFile`]: identity map over the device, fs block = the
    /// device's logical block, size = the file or device size.
    pub fn direct(&self) -> &DirectFile {
        &self.direct
    }

    /// Current size in bytes (the file's, kept up to date by writes and
    /// [`RawFile::set_len`]; a block device's).
    pub fn size(&self) -> u64 {
        self.direct.size()
    }

    /// Whether it is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether it was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.write
    }

    /// The back end in use: "uring" or "sync".
    pub fn backend_name(&self) -> &'static str {
        match self.dev {
            #[cfg(feature = "io-uring")]
            Dev::Uring(_) => "uring",
            Dev::Sync(_) => "sync",
        }
    }

    /// One-line notes about fallbacks taken at open.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The descriptor (for `SEEK_DATA`/`SEEK_HOLE`, `fadvise`, ...). Do not change
    /// the file size through it; use [`RawFile::set_len`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.dev {
            #[cfg(feature = "io-uring")]
            Dev::Uring(d) => d.file().as_fd(),
            Dev::Sync(d) => d.file().as_fd(),
        }
    }

    /// Set the file size (`ftruncate`) and tell the engine (waiting for direct I/O
    /// in flight when shrinking).
    pub fn set_len(&self, size: u64) -> Result<()> {
        if self.block_device {
            return Err(Error::Invalid(format!(
                "{}: cannot change the size of a block device",
                self.path.display()
            )));
        }
        if !self.write {
            return Err(Error::ReadOnly);
        }
        let ftruncate = || -> Result<()> {
            let len = libc::off_t::try_from(size).map_err(|_| Error::TooLarge {
                end: size,
                max: i64::MAX as u64,
            })?;
            crate::device::ftruncate(self.fd(), len as u64)
                .map_err(|e| Error::os(format!("truncate {} to {size}", self.path.display()), e))
        };
        if size < self.size() {
            // Shrink: the engine drains direct I/O, and its block map (RawMap)
            // shrinks the file under the same exclusion.
            self.direct.truncate(size)
        } else {
            ftruncate()?;
            self.direct.truncate(size)
        }
    }

    /// Register an arena with the io_uring ring (see
    /// [`UringDevice::register_arena`]): requests on its slots then use fixed-buffer
    /// I/O. `Ok(false)` on the pread/pwrite back end, where the arena is plain
    /// memory; an error if the kernel refuses (e.g. `RLIMIT_MEMLOCK`).
    pub fn register_arena(&self, arena: &Arc<crate::BufArena>) -> Result<bool> {
        #[cfg(not(feature = "io-uring"))]
        let _ = arena;
        match &self.dev {
            #[cfg(feature = "io-uring")]
            Dev::Uring(d) => d
                .register_arena(arena)
                .map(|()| true)
                .map_err(|e| Error::os("register buffers with io_uring", e)),
            Dev::Sync(_) => Ok(false),
        }
    }

    /// The io_uring device under this file, if that is the back end.
    #[cfg(feature = "io-uring")]
    pub fn uring(&self) -> Option<&Arc<UringDevice>> {
        match &self.dev {
            Dev::Uring(d) => Some(d),
            Dev::Sync(_) => None,
        }
    }
}

/// The device geometry a raw file is served with: a writable regular file may
/// grow, so its device reaches to the largest file offset (reads past EOF come
/// back short and zero-filled; the engine clips them at the file size).
fn device_geometry(p: &Probed, write: bool, path: &Path) -> Geometry {
    let mut g = p.geometry;
    if write && !p.block_device {
        let lb = u64::from(g.logical_block);
        g.size = (i64::MAX as u64) / lb * lb;
    }
    if p.block_device && g.mem_align < g.logical_block && is_zram(path) {
        // zram announces the default DMA alignment (512) but reads and writes
        // wrong bytes, silently, for memory that does not start on a page (its
        // 4 KiB logical block) (seen on Linux 6.18; tests/raw_audit.rs).
        g = g.with_mem_align(g.logical_block);
    }
    g
}

/// Whether the block device at `path` is a zram device (its sysfs name).
fn is_zram(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    let rdev = m.rdev();
    let sys = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    );
    std::fs::canonicalize(sys)
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("zram"))
        })
        .unwrap_or(false)
}

/// The data runs `[start, end)` of a file up to `end`, in order, asked of the kernel
/// lazily with `SEEK_DATA`/`SEEK_HOLE` (a huge sparse file costs no memory). Where
/// the file system does not know `SEEK_DATA`, the rest is one run.
pub struct DataRuns<'fd> {
    fd: Option<BorrowedFd<'fd>>,
    pos: u64,
    end: u64,
}

impl<'fd> DataRuns<'fd> {
    /// The data runs of the file behind `fd`, up to `end`.
    pub fn of(fd: BorrowedFd<'fd>, end: u64) -> Self {
        DataRuns {
            fd: Some(fd),
            pos: 0,
            end,
        }
    }
}

impl Iterator for DataRuns<'_> {
    type Item = Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        use rustix::fs::{seek, SeekFrom};
        use rustix::io::Errno;
        if self.pos >= self.end {
            return None;
        }
        let Some(fd) = self.fd else {
            let run = (self.pos, self.end);
            self.pos = self.end;
            return Some(Ok(run));
        };
        let fail = |e: Errno| Error::os("SEEK_DATA/SEEK_HOLE", e.into());
        let start = match seek(fd, SeekFrom::Data(self.pos)) {
            Ok(d) => d,
            // No data after pos: the rest is a hole.
            Err(Errno::NXIO) => {
                self.pos = self.end;
                return None;
            }
            // SEEK_DATA unknown here: everything is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                self.fd = None;
                return self.next();
            }
            Err(e) => return Some(Err(fail(e))),
        };
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = match seek(fd, SeekFrom::Hole(start)) {
            Ok(h) => h.min(self.end),
            Err(e) => return Some(Err(fail(e))),
        };
        // A hole reported at `start` itself would loop forever; take one byte.
        let stop = stop.max(start + 1);
        self.pos = stop;
        Some(Ok((start, stop)))
    }
}
