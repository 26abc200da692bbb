//! Whether two locations share storage, so that writing one destroys the other while
//! it is read: the same inode, an image file and a file inside it (either way
//! round), a loop device and its backing file, a partition and its disk, an NBD
//! export and a file inside it. `cp` asks before DST is created, truncated or
//! written.
//!
//! Storage is named by keys: what a location *is* (its inode, its block device,
//! its export; a loop device is also its backing file) and what it lies *inside*
//! (a partition's disk, a host file's file-system device, an image file's image).
//! Two locations overlap when one is what the other is or lies inside.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use dio::nbd::NbdUri;

use crate::fail::Failure;
use crate::location::{Image, Location, Source};
use crate::Engine;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// A host inode (st_dev, st_ino).
    Inode(u64, u64),
    /// A block device (st_rdev).
    Block(u64),
    /// An NBD export.
    Nbd(NbdUri),
}

#[derive(Debug, Default)]
struct Keys {
    is: Vec<Key>,
    inside: Vec<Key>,
}

impl Keys {
    fn overlap(&self, other: &Keys) -> bool {
        let meets = |a: &[Key], b: &[Key]| a.iter().any(|k| b.contains(k));
        meets(&self.is, &other.is)
            || meets(&self.is, &other.inside)
            || meets(&self.inside, &other.is)
    }
}

fn dev_of(major_minor: &str) -> Option<u64> {
    let (ma, mi) = major_minor.trim().split_once(':')?;
    Some(rustix::fs::makedev(ma.parse().ok()?, mi.parse().ok()?))
}

/// The sysfs directory of a block device, and its parent disk's when it is a
/// partition.
fn sysfs_dirs(rdev: u64) -> (PathBuf, Option<PathBuf>) {
    let dir = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    ));
    let parent = if dir.join("partition").exists() {
        fs::canonicalize(&dir)
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf))
    } else {
        None
    };
    (dir, parent)
}

/// The inode a loop device reads and writes (from sysfs), if `dir` is a loop device.
fn loop_backing(dir: &Path) -> Option<Key> {
    let name = fs::read_to_string(dir.join("loop/backing_file")).ok()?;
    let name = name.trim_end_matches('\n');
    let name = name.strip_suffix(" (deleted)").unwrap_or(name);
    let m = fs::metadata(name).ok()?;
    Some(Key::Inode(m.dev(), m.ino()))
}

/// What a block device is (itself; a loop device also its backing file) and lies
/// inside (a partition: its disk and the disk's backing file).
fn block_keys(rdev: u64, keys: &mut Keys, inside_only: bool) {
    let (dir, parent) = sysfs_dirs(rdev);
    let is = if inside_only {
        &mut keys.inside
    } else {
        &mut keys.is
    };
    is.push(Key::Block(rdev));
    if let Some(k) = loop_backing(&dir) {
        is.push(k);
    }
    if let Some(p) = parent {
        if let Some(d) = fs::read_to_string(p.join("dev"))
            .ok()
            .and_then(|s| dev_of(&s))
        {
            keys.inside.push(Key::Block(d));
        }
        if let Some(k) = loop_backing(&p) {
            keys.inside.push(k);
        }
    }
}

fn source_keys(src: &Source) -> Keys {
    let mut keys = Keys::default();
    match src {
        Source::Nbd(uri) => {
            if let Ok(u) = NbdUri::parse(uri) {
                keys.is.push(Key::Nbd(u));
            }
        }
        Source::Host(p) => {
            let Ok(m) = fs::metadata(p) else {
                return keys;
            };
            if m.file_type().is_block_device() {
                block_keys(m.rdev(), &mut keys, false);
            } else if m.file_type().is_file() || m.file_type().is_dir() {
                keys.is.push(Key::Inode(m.dev(), m.ino()));
                // The file system holding it: a device, maybe a loop device over
                // an image file.
                block_keys(m.dev(), &mut keys, true);
            }
        }
    }
    keys
}

/// What stdin (fd 0) or stdout (fd 1) is when a shell redirection made it a
/// regular file or a block device (`< FILE`, `> FILE`, `1<> FILE`): a location to
/// check like a named one. Pipes, terminals and character devices: None.
pub fn stdio_location(fd: u8) -> Option<Location> {
    let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
    let m = fs::metadata(&path).ok()?;
    (m.is_file() || m.file_type().is_block_device()).then_some(Location {
        source: Source::Host(path),
        inner: None,
    })
}

/// Refuse (exit 1, nothing touched) when SRC and DST share storage.
pub fn refuse_shared(src: &Location, dst: &Location, engine: Engine) -> Result<(), Failure> {
    refuse_shared_as((src, &src.display()), (dst, &dst.display()), "copy", engine)
}

/// [`refuse_shared`] with the names to print (`stdin` for a redirected stdin) and
/// what is refused (`copy`, `write`).
pub fn refuse_shared_as(
    (src, s): (&Location, &str),
    (dst, d): (&Location, &str),
    action: &str,
    engine: Engine,
) -> Result<(), Failure> {
    let (a, b) = (source_keys(&src.source), source_keys(&dst.source));
    if !a.overlap(&b) {
        return Ok(());
    }
    let why = match (&src.inner, &dst.inner) {
        (None, None) if a.is.iter().any(|k| b.is.contains(k)) => {
            format!("{s} and {d} are the same file or device")
        }
        (None, None) => format!("{s} and {d} share storage: one lies inside the other"),
        (Some(_), None) => format!("{s} lives inside {d}: writing {d} would destroy it"),
        (None, Some(_)) => format!("{d} lives inside {s}, which is being read"),
        (Some(_), Some(_)) => {
            // Two files of one image: fine unless they are one inode.
            let same_image = a.is.iter().any(|k| b.is.contains(k));
            if same_image {
                let ino = |l: &Location| Image::open(l, false, true, engine).map(|i| i.inode.ino);
                match (ino(src), ino(dst)) {
                    (Ok(x), Ok(y)) if x != y => return Ok(()),
                    (Err(_), _) | (_, Err(_)) => return Ok(()),
                    _ => format!("{s} and {d} are the same file"),
                }
            } else {
                format!("{s} and {d} live on the same storage")
            }
        }
    };
    Err(Failure::msg(format!(
        "refusing to {action}: {why} (nothing was written)"
    )))
}
