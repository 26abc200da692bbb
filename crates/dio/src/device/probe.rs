//! Geometry discovery for real files and block devices: open with `O_DIRECT`, ask
//! the kernel how direct I/O must be aligned (statx `STATX_DIOALIGN` for regular
//! files; `BLKSSZGET`, `BLKPBSZGET`, `BLKGETSIZE64` and sysfs queue limits for block
//! devices), and turn a refusal of `O_DIRECT` into an error that names the file
//! system.
//!
//! It does no I/O and keeps no state: the back ends (`uring`, `sync`) and the raw
//! client call it once at open.

use crate::error::Feature;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::Geometry;
use crate::{Error, Result};

/// What [`probe`] found out about an open file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probed {
    /// Geometry: for a regular file its size is the file size rounded up to the
    /// logical block (the last partial block can be read; the read comes back short
    /// and the back end zero-fills the rest).
    pub geometry: Geometry,
    /// Whether it is a block device (else a regular file).
    pub block_device: bool,
    /// The exact file or device size in bytes.
    pub size: u64,
    /// File offset alignment for reads when the kernel reports a separate one
    /// (statx `stx_dio_read_offset_align`), else the logical block.
    pub read_offset_align: u32,
    /// Whether the alignment came from the kernel (statx or ioctls) rather than a
    /// conservative fallback.
    pub exact: bool,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`; libc does not export it.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272u32 as libc::Ioctl;
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl = 0x4008_1272u32 as libc::Ioctl;

/// Most bytes one request may carry when the device does not say.
const DEFAULT_MAX_BYTES: u32 = 1 << 20;
/// Most bytes one request to a regular file carries. The file system splits it for
/// its disk itself, so this only bounds one system call; it is large enough that
/// a widened byte-granular request (1 MiB plus a block at each end) stays whole.
const FILE_MAX_BYTES: u32 = 16 << 20;
/// Largest request size dio ever asks for, whatever sysfs says.
const CAP_MAX_BYTES: u64 = 64 << 20;
/// Most iovecs in one request when nothing smaller is known (`UIO_MAXIOV` is 1024).
const DEFAULT_MAX_SEGMENTS: u32 = 256;

/// Open `path` for direct I/O (`O_DIRECT | O_CLOEXEC`), read-only or read-write,
/// creating a regular file (mode 0644) with `create`.
///
/// A file system that refuses `O_DIRECT` gives the error of
/// [`direct_io_unsupported`], naming the path and the file system type.
pub fn open_direct(path: &Path, write: bool, create: bool) -> Result<File> {
    open_direct_with(path, write, create, 0)
}

/// [`open_direct`] with extra `open(2)` flags (`O_DSYNC`, `O_EXCL`, ...).
pub fn open_direct_with(path: &Path, write: bool, create: bool, flags: i32) -> Result<File> {
    if create && !write {
        return Err(Error::Invalid(format!(
            "{}: creating a file needs write access",
            path.display()
        )));
    }
    let mut o = std::fs::OpenOptions::new();
    o.read(true)
        .write(write)
        .create(create)
        .mode(0o644)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | flags);
    match o.open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err(direct_io_unsupported(path, fs_type_of(path).as_deref()))
        }
        Err(e) => Err(Error::os(
            format!("open {} for direct I/O", path.display()),
            e,
        )),
    }
}

/// The error for a file system that refuses direct I/O:
/// "PATH: this file system (tmpfs) does not support O_DIRECT" (errno EINVAL, as the
/// kernel's `open` reports it).
pub fn direct_io_unsupported(path: &Path, fs_type: Option<&str>) -> Error {
    let fs = fs_type.unwrap_or("unknown");
    Error::os(
        format!(
            "{}: this file system ({fs}) does not support O_DIRECT",
            path.display()
        ),
        io::Error::from_raw_os_error(libc::EINVAL),
    )
}

/// Name of a file system from its `statfs` magic number (`f_type`), for the common
/// ones.
pub fn fs_type_name(magic: u64) -> Option<&'static str> {
    Some(match magic & 0xffff_ffff {
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x9584_58f6 => "hugetlbfs",
        0x794c_7630 => "overlayfs",
        0xef53 => "ext2/ext3/ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0xf2f5_2010 => "f2fs",
        0xca45_1a4e => "bcachefs",
        0x2fc1_2fc1 => "zfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x0102_1997 => "9p",
        0xff53_4d42 => "cifs",
        0xfe53_4d42 => "smb2",
        0x00c3_6400 => "ceph",
        0x7371_7368 => "squashfs",
        0xe0f5_e1e2 => "erofs",
        0x4d44 => "vfat",
        0x2011_bab0 => "exfat",
        0x5346_544e => "ntfs",
        0x7366_746e => "ntfs3",
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        0x1cd1 => "devpts",
        0x7275 => "romfs",
        0x2468 => "nilfs",
        _ => return None,
    })
}

/// The file system type of `path` (or of its parent directory when `path` does not
/// exist yet): its name, or its magic number in hex when unknown.
pub fn fs_type_of(path: &Path) -> Option<String> {
    let try_one = |p: &Path| -> Option<u64> {
        let st = rustix::fs::statfs(p).ok()?;
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_type as u64)
    };
    let parent: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let magic = try_one(path).or_else(|| try_one(&parent))?;
    Some(match fs_type_name(magic) {
        Some(n) => n.to_string(),
        None => format!("{:#x}", magic & 0xffff_ffff),
    })
}

/// statx of an open file with the basic fields and the direct-I/O alignment.
fn statx_fd(fd: BorrowedFd<'_>) -> io::Result<rustix::fs::Statx> {
    use rustix::fs::{AtFlags, StatxFlags};
    let mask = StatxFlags::BASIC_STATS
        | StatxFlags::DIOALIGN
        | StatxFlags::from_bits_retain(libc::STATX_DIO_READ_ALIGN);
    Ok(rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, mask)?)
}

/// Round `v` to a power of two within `[lo, hi]` (down to the largest power of two
/// not above it), or `fallback` when `v` is 0.
fn pow2_within(v: u64, lo: u32, hi: u32, fallback: u32) -> u32 {
    if v == 0 {
        return fallback;
    }
    let v = v.clamp(u64::from(lo), u64::from(hi));
    let p = 1u64 << (63 - v.leading_zeros());
    p as u32
}

/// Open `path` with `O_DIRECT` and probe its geometry: what a back end's `open`
/// needs.
pub fn open_probed(path: &Path, write: bool) -> Result<(File, Geometry)> {
    let file = open_direct(path, write, false)?;
    let probed = probe(std::os::fd::AsFd::as_fd(&file), path)?;
    Ok((file, probed.geometry))
}

/// Find out the geometry of an open file or block device. `path` is only used in
/// error messages.
pub fn probe(fd: BorrowedFd<'_>, path: &Path) -> Result<Probed> {
    let mut probed = probe_layout(fd, path)?;
    probed.geometry = with_atomic_limits(fd, probed.geometry);
    Ok(probed)
}

/// The geometry with the untorn-write units statx reports for `fd`, clamped to the
/// geometry's request limit (none where statx reports none or they do not fit).
fn with_atomic_limits(fd: BorrowedFd<'_>, geometry: Geometry) -> Geometry {
    let Ok(limits) = atomic_write_limits(fd) else {
        return geometry;
    };
    let max = limits.unit_max.min(geometry.max_bytes);
    let max = if max == 0 { 0 } else { 1 << max.ilog2() };
    let usable = limits.supported()
        && limits.unit_min.is_power_of_two()
        && limits.unit_min >= geometry.logical_block
        && limits.unit_min <= max;
    if !usable {
        return geometry;
    }
    geometry.with_atomic_write(limits.unit_min, max, limits.segments_max)
}

/// The geometry of a file or block device, without the atomic-write units.
fn probe_layout(fd: BorrowedFd<'_>, path: &Path) -> Result<Probed> {
    let stx = statx_fd(fd).map_err(|e| Error::os(format!("statx {}", path.display()), e))?;
    let mode = u32::from(stx.stx_mode) & libc::S_IFMT;
    if mode == libc::S_IFBLK {
        return probe_block_device(fd, path, &stx);
    }
    if mode != libc::S_IFREG {
        return Err(Error::Invalid(format!(
            "{}: not a regular file or block device",
            path.display()
        )));
    }
    let has_dio = stx.stx_mask & libc::STATX_DIOALIGN != 0;
    if has_dio && stx.stx_dio_offset_align == 0 {
        return Err(direct_io_unsupported(path, fs_type_of(path).as_deref()));
    }
    let (logical, mem_align, exact) = if has_dio {
        (
            pow2_within(u64::from(stx.stx_dio_offset_align), 512, 65536, 4096),
            pow2_within(u64::from(stx.stx_dio_mem_align), 1, 65536, 4096),
            true,
        )
    } else {
        // No STATX_DIOALIGN (kernel before 6.1 or a file system that does not say):
        // the preferred I/O size is a safe alignment for both.
        let b = pow2_within(u64::from(stx.stx_blksize), 512, 65536, 4096);
        (b, b, false)
    };
    let read_align =
        if stx.stx_mask & libc::STATX_DIO_READ_ALIGN != 0 && stx.stx_dio_read_offset_align != 0 {
            pow2_within(
                u64::from(stx.stx_dio_read_offset_align),
                512,
                65536,
                logical,
            )
        } else {
            logical
        };
    let size = stx.stx_size;
    let lb = u64::from(logical);
    let rounded = size.checked_next_multiple_of(lb).unwrap_or(size / lb * lb);
    let geometry = Geometry::new(logical, rounded)
        .with_mem_align(mem_align)
        .with_physical_block(logical.max(pow2_within(
            u64::from(stx.stx_blksize),
            512,
            65536,
            logical,
        )))
        .with_limits(DEFAULT_MAX_SEGMENTS, FILE_MAX_BYTES.max(logical));
    Ok(Probed {
        geometry,
        block_device: false,
        size,
        read_offset_align: read_align,
        exact,
    })
}

fn ioctl_u64(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: `req` is a read ioctl that stores at most 8 bytes into the pointed-to
    // u64, which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

fn ioctl_u32(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<u32> {
    let mut v: u32 = 0;
    // SAFETY: `req` is a read ioctl that stores a 4-byte int into the pointed-to u32,
    // which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// A number from a sysfs queue attribute of the block device `maj:min` (for a
/// partition, from its parent disk's queue).
fn sysfs_queue(major: u32, minor: u32, attr: &str) -> Option<u64> {
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition has no queue directory; `..` after the symlink is its disk.
    for dir in [format!("{base}/queue"), format!("{base}/../queue")] {
        if let Ok(s) = std::fs::read_to_string(format!("{dir}/{attr}")) {
            return s.trim().parse().ok();
        }
    }
    None
}

fn probe_block_device(fd: BorrowedFd<'_>, path: &Path, stx: &rustix::fs::Statx) -> Result<Probed> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    let logical = ioctl_u32(fd, libc::BLKSSZGET).map_err(|e| Error::os(ctx("BLKSSZGET"), e))?;
    let physical = ioctl_u32(fd, libc::BLKPBSZGET).unwrap_or(logical);
    let size = ioctl_u64(fd, BLKGETSIZE64).map_err(|e| Error::os(ctx("BLKGETSIZE64"), e))?;
    if !logical.is_power_of_two() || logical < 512 {
        return Err(Error::incompatible(
            Feature::BlockSize,
            format!(
                "{}: logical block size {logical} is not supported",
                path.display()
            ),
        ));
    }
    let (maj, min) = (stx.stx_rdev_major, stx.stx_rdev_minor);
    // Memory alignment: statx knows it on newer kernels (6.11+ for block devices),
    // else the queue's DMA alignment, else the logical block.
    let mem_align = if stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_mem_align != 0 {
        pow2_within(u64::from(stx.stx_dio_mem_align), 1, logical, logical)
    } else {
        match sysfs_queue(maj, min, "dma_alignment") {
            Some(a) => pow2_within(a + 1, 1, logical, logical),
            None => logical,
        }
    };
    let lb = u64::from(logical);
    let max_bytes = sysfs_queue(maj, min, "max_sectors_kb")
        .map(|kb| (kb * 1024).min(CAP_MAX_BYTES) / lb * lb)
        .filter(|&b| b >= lb)
        .unwrap_or(u64::from(DEFAULT_MAX_BYTES).max(lb));
    let max_segments = sysfs_queue(maj, min, "max_segments")
        .map(|s| s.clamp(1, 1024) as u32)
        .unwrap_or(DEFAULT_MAX_SEGMENTS);
    let geometry = Geometry::new(logical, size / lb * lb)
        .with_mem_align(mem_align)
        .with_physical_block(physical.max(logical))
        .with_limits(max_segments, max_bytes as u32);
    Ok(Probed {
        geometry,
        block_device: true,
        size,
        read_offset_align: logical,
        exact: true,
    })
}

/// Whether the file at `meta` is a block device.
pub fn is_block_device(file: &File) -> bool {
    file.metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
}

/// Whether `path` (an image file or a block device) is in use by a mounted file
/// system, so that writing it behind the kernel's back would corrupt it: `Some`
/// names the holder. A block device counts as in use when the kernel refuses an
/// exclusive open (`EBUSY`, as mount holds it); a regular file when a loop device
/// backed by it is (checked through `/sys/block/loop*/loop/backing_file`).
///
/// A file attached to a loop device that nothing mounted is not in use. Errors
/// reading sysfs count as "not in use": this is a guard, not a lock.
pub fn in_use(path: &std::path::Path) -> Option<String> {
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
        let dev = std::path::PathBuf::from("/dev").join(name);
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

#[cfg(feature = "io-uring")]
pub use super::uring::available as uring_available;

/// Whether io_uring can be set up here: never, in a dio built without its
/// `io-uring` feature (an `Unsupported` error saying so).
#[cfg(not(feature = "io-uring"))]
pub fn uring_available() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "dio was built without its io-uring feature",
    ))
}

/// What untorn (atomic) writes a file or block device supports, as statx
/// (`STATX_WRITE_ATOMIC`, Linux 6.11+) reports it: a write of a power-of-two size
/// from `unit_min` to `unit_max` bytes, aligned to its size, lands whole or not at
/// all. All zero where the kernel, the file system or the device reports none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AtomicWriteLimits {
    /// Smallest atomic write, in bytes (0: none).
    pub unit_min: u32,
    /// Largest atomic write, in bytes (0: none).
    pub unit_max: u32,
    /// Most memory segments in one atomic write.
    pub segments_max: u32,
}

impl AtomicWriteLimits {
    /// Whether any atomic write is supported.
    pub fn supported(&self) -> bool {
        self.unit_min > 0 && self.unit_max >= self.unit_min
    }

    /// Whether a write of `len` bytes can be atomic.
    pub fn allows(&self, len: u64) -> bool {
        self.supported()
            && len.is_power_of_two()
            && (u64::from(self.unit_min)..=u64::from(self.unit_max)).contains(&len)
    }
}

/// The atomic write limits of an open file or block device (all zero where statx
/// reports none, e.g. on kernels before 6.11).
pub fn atomic_write_limits(fd: BorrowedFd<'_>) -> io::Result<AtomicWriteLimits> {
    use rustix::fs::{AtFlags, StatxFlags};
    const STATX_WRITE_ATOMIC: u32 = 0x0001_0000;
    let stx = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::from_bits_retain(STATX_WRITE_ATOMIC),
    )?;
    if stx.stx_mask & STATX_WRITE_ATOMIC == 0 {
        return Ok(AtomicWriteLimits::default());
    }
    Ok(AtomicWriteLimits {
        unit_min: stx.stx_atomic_write_unit_min,
        unit_max: stx.stx_atomic_write_unit_max,
        segments_max: stx.stx_atomic_write_segments_max,
    })
}

/// The atomic write limits of `fd` (the file at `path`) if they allow untorn writes
/// of `unit` bytes; else [`Error::Incompatible`] with [`Feature::AtomicWrite`],
/// naming the sizes supported or their absence.
pub fn require_atomic_writes(
    fd: BorrowedFd<'_>,
    path: &Path,
    unit: u64,
) -> Result<AtomicWriteLimits> {
    let limits =
        atomic_write_limits(fd).map_err(|e| Error::os(format!("statx {}", path.display()), e))?;
    if limits.allows(unit) {
        return Ok(limits);
    }
    let why = if limits.supported() {
        format!(
            "atomic writes of {unit} bytes: {} takes powers of two from {} to {} bytes",
            path.display(),
            limits.unit_min,
            limits.unit_max
        )
    } else {
        format!(
            "atomic writes: {} reports no atomic write units (statx STATX_WRITE_ATOMIC; \
             needs Linux 6.11+ and a file system and device that support them)",
            path.display()
        )
    };
    Err(Error::incompatible(Feature::AtomicWrite, why))
}
