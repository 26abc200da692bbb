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
use crate::device::uring::{UringConfig, UringDevice};
use crate::device::{Device, Geometry};
use crate::map::{BlockMap, Extent};
use crate::{DirectFile, Error, FileState, IdentityMap, Result};

/// Environment variable that makes [`Backend::Auto`] behave as if io_uring were
/// unavailable (`DIO_DISABLE_URING=1`).
pub const DISABLE_URING_ENV: &str = "DIO_DISABLE_URING";

/// Which device back end a [`RawFile`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring if available, else pread/pwrite (with a note).
    Auto,
    /// io_uring, or fail.
    Uring,
    /// pread/pwrite (`preadv2`/`pwritev2`) on a small thread pool.
    Sync,
}

/// How to open a [`RawFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
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
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            write: false,
            create: false,
            backend: Backend::Auto,
            queue_depth: 128,
            dsync: false,
            iopoll: false,
            sqpoll: false,
            single_thread: false,
        }
    }
}

enum Dev {
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

/// Whether `DIO_DISABLE_URING` asks to pretend io_uring is missing.
fn uring_disabled_by_env() -> bool {
    std::env::var_os(DISABLE_URING_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

impl RawFile {
    /// Open `path` (a regular file or a block device) for direct I/O.
    ///
    /// Errors name the path: a missing file, a file system that refuses `O_DIRECT`
    /// ("this file system (tmpfs) does not support O_DIRECT"), io_uring unavailable
    /// with [`Backend::Uring`].
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<RawFile> {
        let extra = if opts.dsync { libc::O_DSYNC } else { 0 };
        let file = probe::open_direct_with(path, opts.write, opts.create, extra)?;
        let probed = probe::probe(file.as_fd(), path)?;
        let geometry = device_geometry(&probed, opts.write);
        let mut notes = Vec::new();

        let uring_cfg = UringConfig {
            queue_depth: opts.queue_depth.max(1),
            iopoll: opts.iopoll,
            sqpoll: opts.sqpoll,
            single_issuer: opts.single_thread,
            ..UringConfig::default()
        };
        let try_uring = |file: &File| -> Result<UringDevice> {
            let dup = file
                .try_clone()
                .map_err(|e| Error::os(format!("dup {}", path.display()), e))?;
            UringDevice::new(dup, geometry, &uring_cfg)
        };
        let dev = match opts.backend {
            Backend::Uring => {
                let d = try_uring(&file).map_err(|e| match e {
                    Error::Os { .. } => Error::os(
                        format!(
                            "{}: io_uring unavailable ({})",
                            path.display(),
                            uring_unavailable_reason(&e)
                        ),
                        std::io::Error::from_raw_os_error(e.errno()),
                    ),
                    e => e,
                })?;
                Dev::Uring(Arc::new(d))
            }
            Backend::Auto if uring_disabled_by_env() => {
                notes.push(format!(
                    "io_uring disabled by {DISABLE_URING_ENV}: using pread/pwrite"
                ));
                Dev::Sync(Arc::new(SyncDevice::new(
                    file,
                    geometry,
                    &SyncConfig::default(),
                )?))
            }
            Backend::Auto => match try_uring(&file) {
                Ok(d) => Dev::Uring(Arc::new(d)),
                Err(e @ Error::Os { .. }) => {
                    notes.push(format!(
                        "io_uring unavailable ({}): using pread/pwrite",
                        uring_unavailable_reason(&e)
                    ));
                    Dev::Sync(Arc::new(SyncDevice::new(
                        file,
                        geometry,
                        &SyncConfig::default(),
                    )?))
                }
                Err(e) => return Err(e),
            },
            Backend::Sync => Dev::Sync(Arc::new(SyncDevice::new(
                file,
                geometry,
                &SyncConfig::default(),
            )?)),
        };
        let device: Arc<dyn Device> = match &dev {
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

    /// The back end in use: "uring" or "sync".
    pub fn backend_name(&self) -> &'static str {
        match self.dev {
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
        match &self.dev {
            Dev::Uring(d) => d
                .register_arena(arena)
                .map(|()| true)
                .map_err(|e| Error::os("register buffers with io_uring", e)),
            Dev::Sync(_) => Ok(false),
        }
    }

    /// The io_uring device under this file, if that is the back end.
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
fn device_geometry(p: &Probed, write: bool) -> Geometry {
    let mut g = p.geometry;
    if write && !p.block_device {
        let lb = u64::from(g.logical_block);
        g.size = (i64::MAX as u64) / lb * lb;
    }
    g
}

/// The identity map of a raw file or device, with the file semantics at its end:
/// reads past the end are short (not an error), and a write past the end of a block
/// device fails with `ENOSPC`.
struct RawMap {
    identity: IdentityMap,
    blocks: u64,
    block_size: u32,
    path: PathBuf,
    /// The file, to shrink it (regular files open for writing).
    resize: Option<std::fs::File>,
}

impl BlockMap for RawMap {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        if create && block >= self.blocks {
            return Err(Error::os(
                format!("write past the end of {}", self.path.display()),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        self.identity.map(block, max_blocks, create)
    }

    fn max_file_size(&self) -> u64 {
        (i64::MAX as u64) / u64::from(self.block_size) * u64::from(self.block_size)
    }

    fn has_end_io(&self) -> bool {
        false
    }

    fn truncate(&self, size: u64) -> Result<()> {
        match &self.resize {
            Some(f) => crate::device::ftruncate(f.as_fd(), size)
                .map_err(|e| Error::os(format!("truncate {} to {size}", self.path.display()), e)),
            None => Ok(()),
        }
    }
}

/// Whether `path` (an image file or a block device) is in use by a mounted file
/// system, so that writing it behind the kernel's back would corrupt it: `Some`
/// names the holder. A block device counts as in use when the kernel refuses an
/// exclusive open (`EBUSY`, as mount holds it); a regular file when a loop device
/// backed by it is (checked through `/sys/block/loop*/loop/backing_file`).
///
/// A file attached to a loop device that nothing mounted is not in use. Errors
/// reading sysfs count as "not in use": this is a guard, not a lock.
pub fn in_use(path: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let busy = |dev: &Path| {
        matches!(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(dev),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY)
        )
    };
    let meta = std::fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() {
        return busy(path)
            .then(|| format!("{} is mounted or held open exclusively", path.display()));
    }
    if !meta.is_file() {
        return None;
    }
    for entry in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let Ok(b) = std::fs::metadata(backing.trim_end()) else {
            continue;
        };
        let dev = PathBuf::from("/dev").join(name);
        if b.dev() == meta.dev() && b.ino() == meta.ino() && busy(&dev) {
            return Some(format!(
                "{} is attached to {} and mounted",
                path.display(),
                dev.display()
            ));
        }
    }
    None
}
