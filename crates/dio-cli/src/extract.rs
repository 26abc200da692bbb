//! `dio cp -r IMAGE:/DIR HOSTDIR`: copy a directory tree out of an ext2/3/4 image
//! (a host file or an NBD export), faithfully and safely.
//!
//! Faithful: regular files byte for byte with their holes (holes and unwritten
//! extents stay holes, `--sparse=never` writes them as zeros), inline-data and
//! empty files, directories, symlinks as symlinks, hard links as hard links (one
//! host inode per image inode), FIFOs and sockets, and device nodes where the
//! host lets us make them (root; else skipped with a note). `--preserve` keeps
//! mode, owner and group (where allowed) and atime/mtime to the nanosecond.
//!
//! Safe: an image is untrusted input. Every entry name is checked before use
//! (`names::check`: no `/`, NUL, empty, or extra `.`/`..`); a bad one is
//! reported, quoted and escaped with its inode number, and skipped. Nothing is
//! ever resolved by joining strings: every host file is created relative to its
//! parent's directory descriptor, one checked component at a time, and every
//! directory is opened with `O_NOFOLLOW | O_DIRECTORY`, so a symlink already in
//! HOSTDIR, or one the copy made itself, is never followed. A directory that a
//! corrupt image links twice (or into itself) is copied once and reported.
//!
//! Data moves through the engine: many files' reads are in flight at once
//! (`--qd` chunks of at most `--bs` bytes, across files), written to the host
//! with plain `pwrite` (page cache) as they complete. Metadata (directories,
//! inodes) is read synchronously between issues.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use dio::ext::{inode_flags, DirEntry, Ext, FileType, Inode, Timestamp};
use dio::{AlignedBuf, DioFuture, DirectFile, Flags, Window};
use indicatif::{ProgressBar, ProgressStyle};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::copy::{PipeArgs, Sparse};
use crate::fail::{say, Failure};
use crate::location::{Image, Location};
use crate::names::{self, show};
use crate::pipeline::Stop;
use crate::size::human;

type Buf = Window<AlignedBuf>;

/// What one copy did, for the summary and the exit status.
#[derive(Default)]
struct Tally {
    files: u64,
    bytes: u64,
    dirs: u64,
    symlinks: u64,
    hard_links: u64,
    special: u64,
    /// Entries not copied on purpose (device nodes without the right to make them).
    skipped: u64,
    /// Problems reported (bad names, unreadable entries, failed host calls).
    errors: u64,
}

/// A directory being walked: its host descriptor, where it is beneath the
/// destination (for hard links and the final attributes), and its entries.
struct Dir {
    fd: Arc<OwnedFd>,
    /// Components beneath the destination root.
    rel: Arc<Vec<Vec<u8>>>,
    entries: Vec<DirEntry>,
    next: usize,
    /// Names already seen here (a corrupt directory may repeat one).
    seen: HashSet<Vec<u8>>,
}

/// A regular file whose data is being copied.
struct Out {
    host: File,
    /// The engine handle (None: inline data, copied at once).
    direct: DirectFile,
    inode: Inode,
    runs: Vec<(u64, u64)>,
    run: usize,
    pos: u64,
    /// Reads issued and not yet written.
    pending: usize,
    failed: bool,
    shown: String,
}

/// One chunk read in flight.
struct Chunk {
    id: u64,
    off: u64,
    len: usize,
    fut: DioFuture<Buf>,
}

/// `dio cp -r SRC DST`: SRC must be a directory inside an image (a file falls
/// back to the single-file copy).
pub fn cp_r(
    src: &OsStr,
    dst: &OsStr,
    preserve: bool,
    sparse: Sparse,
    args: &PipeArgs,
) -> Result<(), Failure> {
    let loc = Location::parse(src)?;
    if loc.inner.is_none() {
        return Err(Failure::msg(format!(
            "{}: -r copies directory trees out of ext images: name one as IMAGE:/DIR (e.g. {}:/)",
            loc.display(),
            loc.display()
        )));
    }
    let img = Image::open(&loc, false, true, args.engine)?;
    if img.inode.file_type() != FileType::Directory {
        drop(img);
        return crate::copy::cp(src, dst, sparse, args);
    }
    let top = loc
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .filter(|n| matches!(names::check(n, usize::MAX), Ok(true)));
    let root = destination(Path::new(dst), top.as_deref())?;
    let mut tree = Tree {
        ext: img.ext.clone(),
        src: loc,
        root: Arc::new(root),
        preserve,
        umask: umask(),
        sparse: sparse != Sparse::Never,
        stack: Vec::new(),
        dirs_seen: HashMap::new(),
        links: HashMap::new(),
        fixups: Vec::new(),
        tally: Tally::default(),
    };
    let started = Instant::now();
    let stop = Stop::on_signals();
    let bar = bar(args);
    let top_path = tree.shown(&[], None);
    tree.dirs_seen.insert(img.inode.ino, top_path);
    tree.fixups.push((Arc::new(Vec::new()), img.inode.clone()));
    let root_fd = Arc::clone(&tree.root);
    match img.ext.read_dir(&img.inode) {
        Ok(entries) => tree.stack.push(Dir {
            fd: root_fd,
            rel: Arc::new(Vec::new()),
            entries,
            next: 0,
            seen: HashSet::new(),
        }),
        Err(e) => tree.error(format!("{}: {e}", tree.src.display())),
    }
    let qd = args.qd as usize;
    let result = copy_all(&mut tree, qd, args.bs as usize, &stop, &bar);
    bar.finish_and_clear();
    tree.finish_dirs();
    let t = &tree.tally;
    if !args.no_progress || args.progress {
        say(format_args!(
            "{} files ({}), {} directories, {} symlinks, {} hard links, {} special; {} skipped, {} errors; {:.3} s",
            t.files,
            human(t.bytes),
            t.dirs,
            t.symlinks,
            t.hard_links,
            t.special,
            t.skipped,
            t.errors,
            started.elapsed().as_secs_f64()
        ));
    }
    result?;
    if t.errors > 0 {
        return Err(Failure::Quiet);
    }
    Ok(())
}

fn bar(args: &PipeArgs) -> ProgressBar {
    use std::io::IsTerminal;
    if args.no_progress || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::no_length();
    if let Ok(style) =
        ProgressStyle::with_template("{bytes:>10} {binary_bytes_per_sec} {elapsed} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// The process's umask, from /proc (0o022 where it cannot be read): what the
/// kernel applies to new files, and what `cp` without `-p` applies to the modes
/// it sets afterwards.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// The host directory the tree's entries go into: DST/NAME when DST is an
/// existing directory and SRC has a NAME (as `cp -r` does), else DST itself
/// (created when missing).
fn destination(dst: &Path, top: Option<&[u8]>) -> Result<OwnedFd, Failure> {
    let fail = |e: io::Error| Failure::at(dst, e);
    match std::fs::metadata(dst) {
        Ok(m) if m.is_dir() => {
            // The user's own path is opened as given (symlinks in it are theirs).
            let parent =
                rustix::fs::open(dst, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| fail(e.into()))?;
            let Some(name) = top else {
                return Ok(parent);
            };
            match rustix::fs::mkdirat(&parent, name, Mode::RWXU) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(fail(e.into())),
            }
            rustix::fs::openat(&parent, name, dir_flags(), Mode::empty()).map_err(|e| {
                Failure::msg(format!(
                    "{}/{}: {}",
                    dst.display(),
                    show(name),
                    not_followed(e.into())
                ))
            })
        }
        Ok(_) => Err(Failure::at(
            dst,
            "exists and is not a directory (cp -r copies a directory into a directory)",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(dst).map_err(fail)?;
            rustix::fs::open(dst, dir_flags(), Mode::empty()).map_err(|e| fail(e.into()))
        }
        Err(e) => Err(fail(e)),
    }
}

/// An open error on a directory, in words when it met a symlink or a file.
fn not_followed(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
            "exists and is not a directory (a symlink is never followed): not copied into".to_string()
        }
        _ => e.to_string(),
    }
}

fn ts(t: Timestamp) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: t.secs,
        tv_nsec: i64::from(t.nsecs.min(999_999_999)) as _,
    }
}

fn times(inode: &Inode) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: ts(inode.atime),
        last_modification: ts(inode.mtime),
    }
}

fn owner(inode: &Inode) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    // -1 means "leave unchanged" to chown: never pass it on.
    (
        (inode.uid != u32::MAX).then(|| rustix::fs::Uid::from_raw_unchecked(inode.uid)),
        (inode.gid != u32::MAX).then(|| rustix::fs::Gid::from_raw_unchecked(inode.gid)),
    )
}

/// Whether a host error only says we may not do it (not root).
fn denied(e: rustix::io::Errno) -> bool {
    matches!(e, rustix::io::Errno::PERM | rustix::io::Errno::ACCESS)
}

struct Tree {
    ext: Ext,
    src: Location,
    root: Arc<OwnedFd>,
    preserve: bool,
    umask: u32,
    sparse: bool,
    stack: Vec<Dir>,
    /// Directory inodes copied, and where (a second path to one is reported).
    dirs_seen: HashMap<u32, String>,
    /// Inodes with several links already created: where their first name is.
    links: HashMap<u32, (Arc<Vec<Vec<u8>>>, Vec<u8>)>,
    /// Directories whose mode (and with -p owner and times) is set at the end,
    /// once nothing more is created in them.
    fixups: Vec<(Arc<Vec<Vec<u8>>>, Inode)>,
    tally: Tally,
}

/// What the walk hands the copier: a created host file and its source.
struct FileJob {
    host: OwnedFd,
    inode: Inode,
    shown: String,
}

impl Tree {
    fn error(&mut self, m: impl std::fmt::Display) {
        say(m);
        self.tally.errors += 1;
    }

    /// How to name an entry of the image in messages: `IMAGE:/a/b` with each
    /// component escaped.
    fn shown(&self, rel: &[Vec<u8>], name: Option<&[u8]>) -> String {
        let base = self.src.inner.clone().unwrap_or_default();
        let base = String::from_utf8_lossy(&base);
        let base = base.trim_end_matches('/');
        let mut parts: Vec<&[u8]> = rel.iter().map(Vec::as_slice).collect();
        if let Some(n) = name {
            parts.push(n);
        }
        let tail = if parts.is_empty() {
            String::new()
        } else {
            names::show_path(&parts)
        };
        let src = match &self.src.source {
            crate::location::Source::Host(p) => p.display().to_string(),
            crate::location::Source::Nbd(u) => u.clone(),
        };
        let path = format!("{base}{tail}");
        format!("{src}:{}", if path.is_empty() { "/" } else { &path })
    }

    /// Open the directory `rel` beneath the root, one component at a time,
    /// never following a symlink.
    fn beneath(&self, rel: &[Vec<u8>]) -> io::Result<OwnedFd> {
        let mut fd = rustix::fs::openat(&*self.root, ".", dir_flags(), Mode::empty())?;
        for c in rel {
            fd = rustix::fs::openat(&fd, c.as_slice(), dir_flags(), Mode::empty())?;
        }
        Ok(fd)
    }

    /// Run `make` to create `name` in `dir`; if something is in the way that is
    /// not a directory, remove it (the link itself, never what a symlink points
    /// to) and try once more, as `cp --remove-destination` does.
    fn create<T>(
        dir: &OwnedFd,
        name: &[u8],
        mut make: impl FnMut() -> rustix::io::Result<T>,
    ) -> io::Result<T> {
        match make() {
            Err(rustix::io::Errno::EXIST) => {
                let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a directory of that name is in the way",
                    ));
                }
                rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
                Ok(make()?)
            }
            r => Ok(r?),
        }
    }

    /// Walk on until the next regular file is created (directories, symlinks,
    /// hard links and special files are made on the way); `None` at the end.
    fn next_file(&mut self, stop: &Stop) -> Option<FileJob> {
        loop {
            if stop.fired().is_some() {
                return None;
            }
            let top = self.stack.last_mut()?;
            if top.next >= top.entries.len() {
                self.stack.pop();
                continue;
            }
            let index = top.next;
            top.next += 1;
            let entry = std::mem::replace(
                &mut top.entries[index],
                DirEntry {
                    inode: 0,
                    name: Vec::new(),
                    file_type: 0,
                },
            );
            let (fd, rel) = (Arc::clone(&top.fd), Arc::clone(&top.rel));
            match names::check(&entry.name, index) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(bad) => {
                    let m = format!(
                        "{} (inode {}): {}: not copied",
                        self.shown(&rel, Some(&entry.name)),
                        entry.inode,
                        bad.why()
                    );
                    self.error(m);
                    continue;
                }
            }
            let top = self.stack.last_mut().expect("the directory walked");
            if !top.seen.insert(entry.name.clone()) {
                let m = format!(
                    "{} (inode {}): a second entry of the same name (corrupt directory): not copied",
                    self.shown(&rel, Some(&entry.name)),
                    entry.inode
                );
                self.error(m);
                continue;
            }
            let shown = self.shown(&rel, Some(&entry.name));
            let inode = match self.ext.inode(entry.inode) {
                Ok(i) => i,
                Err(e) => {
                    self.error(format!("{shown} (inode {}): {e}", entry.inode));
                    continue;
                }
            };
            let name = entry.name;
            let r = match inode.file_type() {
                FileType::Directory => self.enter(&fd, &rel, name, inode, &shown),
                FileType::Regular => match self.regular(&fd, &rel, name, inode, &shown) {
                    Ok(Some(job)) => return Some(job),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                },
                FileType::Symlink => self.symlink(&fd, &rel, name, &inode),
                FileType::Unknown => {
                    say(format_args!(
                        "{shown} (inode {}): mode {:#o} is no file type (corrupt inode): not copied",
                        inode.ino, inode.mode
                    ));
                    self.tally.errors += 1;
                    Ok(())
                }
                _ => self.special(&fd, &rel, name, &inode, &shown),
            };
            if let Err(e) = r {
                self.error(format!("{shown}: {e}"));
            }
        }
    }

    fn enter(
        &mut self,
        parent: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: Vec<u8>,
        inode: Inode,
        shown: &str,
    ) -> io::Result<()> {
        if let Some(first) = self.dirs_seen.get(&inode.ino).cloned() {
            self.error(format!(
                "{shown}: directory inode {} is reached again (already copied from {first}): a corrupt image links a directory twice; not copied again",
                inode.ino
            ));
            return Ok(());
        }
        self.dirs_seen.insert(inode.ino, shown.to_string());
        // Owner-writable while the copy fills it; the mode is set at the end.
        let mode = Mode::from_raw_mode(u32::from(inode.permissions() & 0o777) | 0o700);
        match rustix::fs::mkdirat(parent, name.as_slice(), mode) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(parent, name.as_slice(), dir_flags(), Mode::empty())
            .map_err(|e| io::Error::other(not_followed(e.into())))?;
        self.tally.dirs += 1;
        let mut child = (**rel).clone();
        child.push(name);
        let child = Arc::new(child);
        let entries = match self.ext.read_dir(&inode) {
            Ok(e) => e,
            Err(e) => {
                self.error(format!("{shown}: {e}"));
                Vec::new()
            }
        };
        self.fixups.push((Arc::clone(&child), inode));
        self.stack.push(Dir {
            fd: Arc::new(fd),
            rel: child,
            entries,
            next: 0,
            seen: HashSet::new(),
        });
        Ok(())
    }

    /// Link `name` to the inode's first name when it has one already.
    fn hard_link(
        &mut self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: &[u8],
        inode: &Inode,
    ) -> io::Result<bool> {
        if inode.links < 2 {
            return Ok(false);
        }
        let Some((first_rel, first_name)) = self.links.get(&inode.ino).cloned() else {
            self.links
                .insert(inode.ino, (Arc::clone(rel), name.to_vec()));
            return Ok(false);
        };
        let from = self.beneath(&first_rel)?;
        Tree::create(dir, name, || {
            rustix::fs::linkat(&from, first_name.as_slice(), dir, name, AtFlags::empty())
        })?;
        self.tally.hard_links += 1;
        Ok(true)
    }

    fn regular(
        &mut self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: Vec<u8>,
        inode: Inode,
        shown: &str,
    ) -> io::Result<Option<FileJob>> {
        if self.hard_link(dir, rel, &name, &inode)? {
            return Ok(None);
        }
        // Created with the source's permission bits (the kernel applies the
        // umask); -p sets the exact mode once the data is in.
        let mode = Mode::from_raw_mode(u32::from(inode.permissions() & 0o777));
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let host = Tree::create(dir, &name, || {
            rustix::fs::openat(dir, name.as_slice(), flags, mode)
        })?;
        Ok(Some(FileJob {
            host,
            inode,
            shown: shown.to_string(),
        }))
    }

    fn symlink(
        &mut self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: Vec<u8>,
        inode: &Inode,
    ) -> io::Result<()> {
        if self.hard_link(dir, rel, &name, inode)? {
            return Ok(());
        }
        let target = self
            .ext
            .read_link(inode)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if target.is_empty() || target.contains(&0) {
            return Err(io::Error::other(format!(
                "symlink inode {}: its target {} cannot be a host symlink's (corrupt symlink): not copied",
                inode.ino,
                show(&target)
            )));
        }
        Tree::create(dir, &name, || {
            rustix::fs::symlinkat(target.as_slice(), dir, name.as_slice())
        })?;
        self.tally.symlinks += 1;
        if self.preserve {
            self.attrs_at(dir, &name, inode, false)?;
        }
        Ok(())
    }

    fn special(
        &mut self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: Vec<u8>,
        inode: &Inode,
        shown: &str,
    ) -> io::Result<()> {
        use rustix::fs::FileType as Ft;
        let (kind, dev) = match inode.file_type() {
            FileType::Fifo => (Ft::Fifo, 0),
            FileType::Socket => (Ft::Socket, 0),
            FileType::CharDevice | FileType::BlockDevice => {
                let (ma, mi) = crate::ls::device_numbers(inode).unwrap_or((0, 0));
                let k = if inode.file_type() == FileType::CharDevice {
                    Ft::CharacterDevice
                } else {
                    Ft::BlockDevice
                };
                (k, rustix::fs::makedev(ma, mi))
            }
            _ => unreachable!("only special files come here"),
        };
        if self.hard_link(dir, rel, &name, inode)? {
            return Ok(());
        }
        let mode = Mode::from_raw_mode(u32::from(inode.permissions() & 0o777));
        match Tree::create(dir, &name, || {
            rustix::fs::mknodat(dir, name.as_slice(), kind, mode, dev)
        }) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                say(format_args!(
                    "note: {shown}: a {} is made only by root: skipped",
                    inode.file_type().name()
                ));
                self.tally.skipped += 1;
                // Not there: a later name of it must not link to it.
                self.links.remove(&inode.ino);
                return Ok(());
            }
            r => r?,
        }
        self.tally.special += 1;
        if self.preserve {
            self.attrs_at(dir, &name, inode, true)?;
        }
        Ok(())
    }

    /// -p on an entry that cannot be opened for it (symlinks, special files):
    /// owner (where allowed), mode (`chmod`: not for symlinks) and times, none
    /// of them following a symlink.
    fn attrs_at(&self, dir: &OwnedFd, name: &[u8], inode: &Inode, chmod: bool) -> io::Result<()> {
        let (u, g) = owner(inode);
        match rustix::fs::chownat(dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW) {
            Err(e) if !denied(e) => return Err(e.into()),
            _ => {}
        }
        if chmod {
            // The entry was made just now by this copy, and is not a symlink.
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Symlink {
                rustix::fs::chmodat(
                    dir,
                    name,
                    Mode::from_raw_mode(u32::from(inode.permissions())),
                    AtFlags::empty(),
                )?;
            }
        }
        rustix::fs::utimensat(dir, name, &times(inode), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    /// Owner, mode and times on an open file or directory (`-p`), or just the
    /// mode (`final_mode`, without `-p`).
    fn attrs_fd(&self, fd: impl AsFd, inode: &Inode, final_mode: Option<u32>) -> io::Result<()> {
        let fd = fd.as_fd();
        if !self.preserve {
            if let Some(m) = final_mode {
                rustix::fs::fchmod(fd, Mode::from_raw_mode(m))?;
            }
            return Ok(());
        }
        let (u, g) = owner(inode);
        match rustix::fs::fchown(fd, u, g) {
            Err(e) if !denied(e) => return Err(e.into()),
            _ => {}
        }
        // After chown, which clears setuid and setgid.
        rustix::fs::fchmod(fd, Mode::from_raw_mode(u32::from(inode.permissions())))?;
        rustix::fs::futimens(fd, &times(inode))?;
        Ok(())
    }

    /// Directory modes (and with -p owners and times), deepest first, once
    /// nothing more is created in them.
    fn finish_dirs(&mut self) {
        let fixups = std::mem::take(&mut self.fixups);
        for (rel, inode) in fixups.iter().rev() {
            let perm = u32::from(inode.permissions() & 0o777);
            // Without -p, only directories created owner-writable against their
            // mode need a change (cp: the source's mode less the umask).
            let final_mode = (!self.preserve && perm & 0o700 != 0o700 && !rel.is_empty())
                .then_some(perm & !self.umask);
            if !self.preserve && final_mode.is_none() {
                continue;
            }
            let r = self
                .beneath(rel)
                .and_then(|fd| self.attrs_fd(&fd, inode, final_mode));
            if let Err(e) = r {
                let m = format!("{}: setting its attributes: {e}", self.shown(rel, None));
                self.error(m);
            }
        }
    }

    /// A file's data runs: written extents, clipped to i_size (holes and
    /// unwritten extents are left out: the host file reads zeros there).
    fn runs(&self, inode: &Inode, bs: u64) -> dio::Result<Vec<(u64, u64)>> {
        let size = inode.size;
        if !self.sparse || inode.has_flag(inode_flags::INLINE_DATA) {
            return Ok(if size > 0 { vec![(0, size)] } else { Vec::new() });
        }
        let mut runs = Vec::new();
        let b = u64::from(self.ext.block_size());
        for e in self.ext.extents(inode)? {
            if e.unwritten {
                continue;
            }
            let s = e.logical.saturating_mul(b);
            let end = e.logical.saturating_add(e.len).saturating_mul(b).min(size);
            if s < end {
                runs.push((s, end));
            }
        }
        let _ = bs;
        Ok(runs)
    }
}

/// Copy data until the walk is done: up to `qd` chunk reads in flight across
/// files, each written out as it completes (in issue order).
fn copy_all(
    tree: &mut Tree,
    qd: usize,
    bs: usize,
    stop: &Stop,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let mut outs: HashMap<u64, Out> = HashMap::new();
    let mut issuing: VecDeque<u64> = VecDeque::new();
    let mut flight: VecDeque<Chunk> = VecDeque::new();
    let mut pool: Vec<AlignedBuf> = Vec::new();
    let mut next_id = 0u64;
    let mut walked = false;
    loop {
        if stop.fired().is_some() {
            break;
        }
        // Issue reads up to the queue depth, walking on for more files.
        while flight.len() < qd {
            if let Some(&id) = issuing.front() {
                let out = outs.get_mut(&id).expect("an open file");
                match next_chunk(out, bs as u64) {
                    Some((off, len)) => {
                        let buf = pool
                            .pop()
                            .unwrap_or_else(|| AlignedBuf::new(bs, out.direct.geometry().buffer_align().max(4096)));
                        let w = Window::new(buf, 0, len).expect("a chunk fits its buffer");
                        let fut = out.direct.read_future(off, vec![w], Flags::UNALIGNED);
                        out.pending += 1;
                        flight.push_back(Chunk { id, off, len, fut });
                    }
                    None => {
                        issuing.pop_front();
                        if out.pending == 0 {
                            let out = outs.remove(&id).expect("an open file");
                            done(tree, &out.host, &out.inode, &out.shown, out.failed, bar);
                        }
                    }
                }
                continue;
            }
            if walked {
                break;
            }
            let Some(job) = tree.next_file(stop) else {
                walked = true;
                break;
            };
            if let Some(out) = start(tree, job, bs) {
                let id = next_id;
                next_id += 1;
                outs.insert(id, out);
                issuing.push_back(id);
            }
        }
        let Some(chunk) = flight.pop_front() else {
            if walked && issuing.is_empty() {
                break;
            }
            continue;
        };
        let Chunk { id, off, len, fut } = chunk;
        let mut c = fut.wait();
        let out = outs.get_mut(&id).expect("an open file");
        out.pending -= 1;
        let buf = c.bufs.pop().expect("one buffer per read").into_inner();
        if !out.failed {
            let r = match c.result {
                Ok(n) if n == len => out
                    .host
                    .write_all_at(&buf[..len], off)
                    .map_err(|e| format!("writing at offset {off}: {e}")),
                Ok(n) => Err(format!(
                    "short read at offset {off}: {n} of {len} bytes"
                )),
                Err(e) => Err(format!("read at offset {off}: {e}")),
            };
            match r {
                Ok(()) => bar.inc(len as u64),
                Err(m) => {
                    out.failed = true;
                    tree.error(format!("{}: {m}; its copy is left empty", out.shown));
                }
            }
        }
        if buf.len() == bs {
            pool.push(buf);
        }
        let finished = out.pending == 0 && !issuing.contains(&id);
        if finished {
            let out = outs.remove(&id).expect("an open file");
            done(tree, &out.host, &out.inode, &out.shown, out.failed, bar);
        }
    }
    // Stopped by a signal: let every read in flight finish before its buffer goes.
    for c in flight.drain(..) {
        c.fut.wait();
    }
    if let Some(signal) = stop.fired() {
        return Err(Failure::Signal {
            signal,
            message: format!(
                "interrupted: {} files copied; files being copied were left incomplete",
                tree.tally.files
            ),
        });
    }
    Ok(())
}

/// The next chunk of a file: within a run, ending at a multiple of `bs`.
fn next_chunk(out: &mut Out, bs: u64) -> Option<(u64, usize)> {
    loop {
        let &(s, e) = out.runs.get(out.run)?;
        let pos = out.pos.max(s);
        if pos >= e {
            out.run += 1;
            continue;
        }
        let end = ((pos / bs + 1) * bs).min(e);
        out.pos = end;
        if out.failed {
            // Nothing more is read for a file whose copy failed.
            return None;
        }
        return Some((pos, (end - pos) as usize));
    }
}

/// Size the new host file and work out what to read; files without an engine
/// handle (inline data) are copied here at once. `None`: finished (or failed).
fn start(tree: &mut Tree, job: FileJob, bs: usize) -> Option<Out> {
    let FileJob { host, inode, shown } = job;
    let host = File::from(host);
    let size = inode.size;
    let opened = tree.ext.open_file(&inode);
    let fail = |tree: &mut Tree, m: String| {
        tree.error(format!("{shown}: {m}"));
        None
    };
    let file = match opened {
        Ok(f) => f,
        Err(e) => return fail(tree, format!("{e}; its copy is left empty")),
    };
    if let Err(e) = host.set_len(size) {
        return fail(tree, format!("sizing the copy: {e}"));
    }
    let runs = match tree.runs(&inode, bs as u64) {
        Ok(r) => r,
        Err(e) => {
            let _ = host.set_len(0);
            return fail(tree, format!("{e}; its copy is left empty"));
        }
    };
    let Some(direct) = file.direct().cloned() else {
        // Inline data (or a journal copy that only read_at un-escapes): read
        // here, skipping zero blocks so that a sparse tail stays a hole.
        let mut buf = vec![0u8; bs];
        for (s, e) in runs {
            let mut off = s;
            while off < e {
                let n = ((e - off) as usize).min(bs);
                let r = file
                    .read_at(off, &mut buf[..n])
                    .map_err(|e| e.to_string())
                    .and_then(|got| {
                        if got != n {
                            return Err(format!("short read at offset {off}"));
                        }
                        if buf[..n].iter().any(|&b| b != 0) {
                            host.write_all_at(&buf[..n], off).map_err(|e| e.to_string())
                        } else {
                            Ok(())
                        }
                    });
                if let Err(m) = r {
                    let _ = host.set_len(0);
                    return fail(tree, format!("{m}; its copy is left empty"));
                }
                off += n as u64;
            }
        }
        done(tree, &host, &inode, &shown, false, &ProgressBar::hidden());
        return None;
    };
    Some(Out {
        host,
        direct,
        inode,
        runs,
        run: 0,
        pos: 0,
        pending: 0,
        failed: false,
        shown,
    })
}

/// A file whose reads are all written: set its attributes, count it (a failed
/// one is cut to nothing, so it claims no bytes that were not copied).
fn done(tree: &mut Tree, host: &File, inode: &Inode, shown: &str, failed: bool, bar: &ProgressBar) {
    if failed {
        let _ = host.set_len(0);
        return;
    }
    if let Err(e) = tree.attrs_fd(host, inode, None) {
        tree.error(format!("{shown}: setting its attributes: {e}"));
    }
    tree.tally.files += 1;
    tree.tally.bytes += inode.size;
    bar.set_message(format!("{} files", tree.tally.files));
}
