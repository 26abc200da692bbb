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
//! How it moves: one thread walks the directories, reading each directory's
//! inodes in batches (`Ext::inodes`: one device read per run of inode table)
//! and creating host directories as it goes, and hands every other entry to
//! `--qd` workers. A worker creates the entry and copies a file's data through
//! the engine (its block map on the image's device, several chunks of at most
//! `--bs` bytes in flight per file), writing to the host with plain `pwrite`
//! (page cache, as cp does). Workers rather than one queue of async reads
//! because the ext client's metadata reads (extent trees, inline data) are
//! synchronous, and because host file creation is a system call per file:
//! with one thread, each file would wait on the device and the host in turn.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dio::ext::{inode_flags, DirEntry, Ext, ExtFile, FileType, Inode, Timestamp};
use dio::{AlignedBuf, Flags, Window};
use indicatif::{ProgressBar, ProgressStyle};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::copy::{PipeArgs, Sparse};
use crate::fail::{say, Failure};
use crate::location::{Image, Location, Source};
use crate::names::{self, show};
use crate::pipeline::Stop;
use crate::size::human;

/// Most bytes of read buffers a copy holds at once (as `cp`'s pipeline).
const MAX_BUFFERED: usize = 32 << 20;

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
    /// The entries' inodes, read a batch at a time ahead of `next`.
    inodes: Vec<Option<dio::Result<Inode>>>,
    next: usize,
    /// Names already seen here (a corrupt directory may repeat one).
    seen: HashSet<Vec<u8>>,
}

/// Components of a host directory beneath the destination root.
type Rel = Arc<Vec<Vec<u8>>>;

/// Where an inode with several links got its first host name: its directory
/// (beneath the root) and the name.
type FirstName = (Rel, Vec<u8>);

/// An entry handed to a worker.
struct Task {
    dir: Arc<OwnedFd>,
    rel: Arc<Vec<Vec<u8>>>,
    name: Vec<u8>,
    inode: Inode,
}

/// Inodes read at once for a directory's entries (one read per run of inode
/// table: entries made together have neighbouring inodes).
const INODE_BATCH: usize = 512;

impl Dir {
    fn new(fd: Arc<OwnedFd>, rel: Arc<Vec<Vec<u8>>>, entries: Vec<DirEntry>) -> Dir {
        Dir {
            fd,
            rel,
            inodes: Vec::new(),
            entries,
            next: 0,
            seen: HashSet::new(),
        }
    }

    /// The inode `ino` of entry `index` (taken out of `entries` already),
    /// reading the next batch when needed.
    fn inode(&mut self, ext: &Ext, index: usize, ino: u32) -> dio::Result<Inode> {
        if index >= self.inodes.len() {
            let end = (index + INODE_BATCH).min(self.entries.len());
            let inos: Vec<u32> = std::iter::once(ino)
                .chain(self.entries[index + 1..end].iter().map(|e| e.inode))
                .collect();
            self.inodes.resize_with(index, || None);
            self.inodes.extend(ext.inodes(&inos).into_iter().map(Some));
        }
        self.inodes[index]
            .take()
            .unwrap_or_else(|| Err(dio::Error::Invalid("inode read twice".into())))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    let perm = u32::from(img.inode.permissions());
    let (root, root_made) = destination(Path::new(dst), top.as_deref(), perm)?;
    let workers = args.qd.max(1) as usize;
    let bs = args.bs as usize;
    let shared = Arc::new(Shared {
        ext: img.ext.clone(),
        // Files read through their block maps straight off the device, when
        // nothing stands between the image's blocks and a file's bytes (no
        // journal replayed in memory).
        device: img
            .ext
            .journal_replay()
            .is_none()
            .then(|| Arc::clone(img.device())),
        src: loc,
        root: Arc::new(root),
        preserve,
        umask: umask(),
        sparse: sparse != Sparse::Never,
        links: Mutex::new(HashMap::new()),
        tally: Mutex::new(Tally::default()),
        bar: bar(args),
        stop: Stop::on_signals(),
        bs,
        per_file: (MAX_BUFFERED / bs.max(1) / workers).clamp(1, 8),
    });
    let started = Instant::now();
    let mut walk = Walk {
        shared: Arc::clone(&shared),
        stack: Vec::new(),
        dirs_seen: HashMap::new(),
        fixups: Vec::new(),
        root_made,
    };
    walk.dirs_seen
        .insert(img.inode.ino, shared.shown(&[], None));
    walk.fixups.push((Arc::new(Vec::new()), img.inode.clone()));
    match img.ext.read_dir(&img.inode) {
        Ok(entries) => walk.stack.push(Dir::new(
            Arc::clone(&shared.root),
            Arc::new(Vec::new()),
            entries,
        )),
        Err(e) => shared.error(format!("{}: {e}", shared.src.display())),
    }
    // A bounded queue: the walk stays a little ahead of the workers.
    let (tx, rx) = sync_channel::<Task>(workers * 4);
    let rx = Arc::new(Mutex::new(rx));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (shared, rx) = (Arc::clone(&shared), Arc::clone(&rx));
            std::thread::spawn(move || work(&shared, &rx))
        })
        .collect();
    walk.run(&tx);
    drop(tx);
    for h in handles {
        if h.join().is_err() {
            shared.error("a worker thread panicked");
        }
    }
    shared.bar.finish_and_clear();
    walk.finish_dirs();
    let t = lock(&shared.tally);
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
    if let Some(signal) = shared.stop.fired() {
        return Err(Failure::Signal {
            signal,
            message: format!("interrupted: {} files copied; the rest were not", t.files),
        });
    }
    if t.errors > 0 {
        return Err(Failure::Quiet);
    }
    Ok(())
}

/// A worker: entries from the queue until it closes.
fn work(shared: &Shared, rx: &Mutex<Receiver<Task>>) {
    // Read buffers of `bs` bytes, reused from file to file.
    let mut pool = Vec::new();
    loop {
        let task = lock(rx).recv();
        let Ok(task) = task else { return };
        if shared.stop.fired().is_some() {
            continue;
        }
        shared.entry(task, &mut pool);
    }
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
/// `perm`: the source directory's permission bits (a directory made here gets
/// them, owner-writable while the copy fills it; the kernel applies the umask).
/// Also says whether the directory was made here.
fn destination(dst: &Path, top: Option<&[u8]>, perm: u32) -> Result<(OwnedFd, bool), Failure> {
    let mode = Mode::from_raw_mode((perm & 0o777) | 0o700);
    let fail = |e: io::Error| Failure::at(dst, e);
    match std::fs::metadata(dst) {
        Ok(m) if m.is_dir() => {
            // The user's own path is opened as given (symlinks in it are theirs).
            let parent = rustix::fs::open(
                dst,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail(e.into()))?;
            let Some(name) = top else {
                return Ok((parent, false));
            };
            let made = match rustix::fs::mkdirat(&parent, name, mode) {
                Ok(()) => true,
                Err(rustix::io::Errno::EXIST) => false,
                Err(e) => return Err(fail(e.into())),
            };
            let fd =
                rustix::fs::openat(&parent, name, dir_flags(), Mode::empty()).map_err(|e| {
                    Failure::msg(format!(
                        "{}/{}: {}",
                        dst.display(),
                        show(name),
                        not_followed(e.into())
                    ))
                })?;
            Ok((fd, made))
        }
        Ok(_) => Err(Failure::at(
            dst,
            "exists and is not a directory (cp -r copies a directory into a directory)",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            rustix::fs::mkdir(dst, mode).map_err(|e| fail(e.into()))?;
            let fd =
                rustix::fs::open(dst, dir_flags(), Mode::empty()).map_err(|e| fail(e.into()))?;
            Ok((fd, true))
        }
        Err(e) => Err(fail(e)),
    }
}

/// An open error on a directory, in words when it met a symlink or a file.
fn not_followed(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
            "exists and is not a directory (a symlink is never followed): not copied into"
                .to_string()
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
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
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

/// What the walker and the workers share.
struct Shared {
    ext: Ext,
    device: Option<Arc<dyn dio::Device>>,
    src: Location,
    root: Arc<OwnedFd>,
    preserve: bool,
    umask: u32,
    sparse: bool,
    /// Inodes with several links already created: where their first name is.
    /// Held while such an inode's first name is created, so that a second name
    /// never links to a name not made yet.
    links: Mutex<HashMap<u32, FirstName>>,
    tally: Mutex<Tally>,
    bar: ProgressBar,
    stop: Stop,
    bs: usize,
    /// Chunk reads in flight per file.
    per_file: usize,
}

/// The walk over the image's directories (one thread).
struct Walk {
    shared: Arc<Shared>,
    stack: Vec<Dir>,
    /// Directory inodes copied, and where (a second path to one is reported).
    dirs_seen: HashMap<u32, String>,
    /// Directories whose mode (and with -p owner and times) is set at the end,
    /// once nothing more is created in them.
    fixups: Vec<(Arc<Vec<Vec<u8>>>, Inode)>,
    /// The destination directory was made by this copy (its mode is then the
    /// source's, as its subdirectories').
    root_made: bool,
}

impl Walk {
    /// Walk every directory, creating it on the host, handing other entries to
    /// the workers.
    fn run(&mut self, tx: &std::sync::mpsc::SyncSender<Task>) {
        let shared = Arc::clone(&self.shared);
        loop {
            if shared.stop.fired().is_some() {
                return;
            }
            let Some(top) = self.stack.last_mut() else {
                return;
            };
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
                    shared.error(format!(
                        "{} (inode {}): {}: not copied",
                        shared.shown(&rel, Some(&entry.name)),
                        entry.inode,
                        bad.why()
                    ));
                    continue;
                }
            }
            if !top.seen.insert(entry.name.clone()) {
                shared.error(format!(
                    "{} (inode {}): a second entry of the same name (corrupt directory): not copied",
                    shared.shown(&rel, Some(&entry.name)),
                    entry.inode
                ));
                continue;
            }
            let shown = shared.shown(&rel, Some(&entry.name));
            let inode = match top.inode(&shared.ext, index, entry.inode) {
                Ok(i) => i,
                Err(e) => {
                    shared.error(format!("{shown} (inode {}): {e}", entry.inode));
                    continue;
                }
            };
            // Directories are the walk's; the rest goes to the workers.
            if inode.file_type() != FileType::Directory {
                let task = Task {
                    dir: fd,
                    rel,
                    name: entry.name,
                    inode,
                };
                if tx.send(task).is_err() {
                    return;
                }
                continue;
            }
            let ino = inode.ino;
            if let Err(e) = self.enter(&fd, &rel, entry.name, inode, &shown) {
                shared.error(format!("{shown} (inode {ino}): {e}"));
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
        let shared = Arc::clone(&self.shared);
        if let Some(first) = self.dirs_seen.get(&inode.ino) {
            shared.error(format!(
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
        lock(&shared.tally).dirs += 1;
        let mut child = (**rel).clone();
        child.push(name);
        let child = Arc::new(child);
        let entries = match shared.ext.read_dir(&inode) {
            Ok(e) => e,
            Err(e) => {
                shared.error(format!("{shown}: {e}"));
                Vec::new()
            }
        };
        self.fixups.push((Arc::clone(&child), inode));
        self.stack.push(Dir::new(Arc::new(fd), child, entries));
        Ok(())
    }

    /// Directory modes (and with -p owners and times), deepest first, once
    /// nothing more is created in them.
    fn finish_dirs(&mut self) {
        let shared = &self.shared;
        for (rel, inode) in std::mem::take(&mut self.fixups).iter().rev() {
            let perm = u32::from(inode.permissions() & 0o777);
            // Without -p, only directories created owner-writable against their
            // mode need a change (cp: the source's mode less the umask).
            let made = !rel.is_empty() || self.root_made;
            let final_mode =
                (!shared.preserve && perm & 0o700 != 0o700 && made).then_some(perm & !shared.umask);
            if !shared.preserve && final_mode.is_none() {
                continue;
            }
            let r = shared
                .beneath(rel)
                .and_then(|fd| shared.attrs_fd(&fd, inode, final_mode));
            if let Err(e) = r {
                shared.error(format!(
                    "{}: setting its attributes: {e}",
                    shared.shown(rel, None)
                ));
            }
        }
    }
}

impl Shared {
    fn error(&self, m: impl std::fmt::Display) {
        say(m);
        lock(&self.tally).errors += 1;
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
            Source::Host(p) => p.display().to_string(),
            Source::Nbd(u) => u.clone(),
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

    /// One entry that is not a directory.
    fn entry(&self, task: Task, pool: &mut Vec<AlignedBuf>) {
        let Task {
            dir,
            rel,
            name,
            inode,
        } = task;
        let ino = inode.ino;
        let shown = self.shown(&rel, Some(&name));
        let r = match inode.file_type() {
            FileType::Regular => self.regular(&dir, &rel, &name, &inode, &shown, pool),
            FileType::Symlink => self.symlink(&dir, &rel, &name, &inode),
            // Directories stay with the walk.
            FileType::Directory | FileType::Unknown => Err(io::Error::other(format!(
                "mode {:#o} is no file type (corrupt inode): not copied",
                inode.mode
            ))),
            _ => self.special(&dir, &rel, &name, &inode, &shown),
        };
        if let Err(e) = r {
            self.error(format!("{shown} (inode {ino}): {e}"));
        }
    }

    /// Create `name` in `dir` (with `make`), or link it to the inode's first
    /// name when it has one already. `Ok(None)`: linked; `Ok(Some(x))`: made.
    fn make_or_link<T>(
        &self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: &[u8],
        inode: &Inode,
        make: impl FnMut() -> rustix::io::Result<T>,
    ) -> io::Result<Option<T>> {
        if inode.links < 2 {
            return create(dir, name, make).map(Some);
        }
        let mut links = lock(&self.links);
        if let Some((first_rel, first_name)) = links.get(&inode.ino).cloned() {
            drop(links);
            let from = self.beneath(&first_rel)?;
            create(dir, name, || {
                rustix::fs::linkat(&from, first_name.as_slice(), dir, name, AtFlags::empty())
            })?;
            lock(&self.tally).hard_links += 1;
            return Ok(None);
        }
        let made = create(dir, name, make)?;
        links.insert(inode.ino, (Arc::clone(rel), name.to_vec()));
        Ok(Some(made))
    }

    fn regular(
        &self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: &[u8],
        inode: &Inode,
        shown: &str,
        pool: &mut Vec<AlignedBuf>,
    ) -> io::Result<()> {
        // Created with the source's permission bits (the kernel applies the
        // umask); -p sets the exact mode once the data is in.
        let mode = Mode::from_raw_mode(u32::from(inode.permissions() & 0o777));
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Some(host) = self.make_or_link(dir, rel, name, inode, || {
            rustix::fs::openat(dir, name, flags, mode)
        })?
        else {
            return Ok(());
        };
        let host = File::from(host);
        if let Err(m) = self.data(&host, inode, pool) {
            // A copy that claims no byte it did not get.
            let _ = host.set_len(0);
            return Err(io::Error::other(format!("{m}; its copy is left empty")));
        }
        if let Err(e) = self.attrs_fd(&host, inode, None) {
            self.error(format!("{shown}: setting its attributes: {e}"));
        }
        let mut t = lock(&self.tally);
        t.files += 1;
        t.bytes += inode.size;
        if t.files % 64 == 0 {
            self.bar.set_message(format!("{} files", t.files));
        }
        Ok(())
    }

    /// Copy a file's data: its written runs, several chunks in flight.
    fn data(&self, host: &File, inode: &Inode, pool: &mut Vec<AlignedBuf>) -> Result<(), String> {
        if inode.size == 0 {
            return Ok(());
        }
        host.set_len(inode.size)
            .map_err(|e| format!("sizing the copy: {e}"))?;
        let runs = self.runs(inode).map_err(|e| e.to_string())?;
        let bs = self.bs as u64;
        let chunks = runs.iter().flat_map(|&(s, e)| {
            let mut pos = s;
            std::iter::from_fn(move || {
                (pos < e).then(|| {
                    let end = ((pos / bs + 1) * bs).min(e);
                    let c = (pos, (end - pos) as usize);
                    pos = end;
                    c
                })
            })
        });
        // A file with data blocks is read through its block map on a handle of
        // its own (the inode as read once by the worker); inline data,
        // encrypted files and images with a replayed journal through the ext
        // client's file handles.
        let plain =
            !inode.has_flag(inode_flags::INLINE_DATA) && !inode.has_flag(inode_flags::ENCRYPT);
        let own = match (&self.device, plain) {
            (Some(dev), true) => {
                let map = self.ext.block_map(inode).map_err(|e| e.to_string())?;
                let state = Arc::new(dio::FileState::new(inode.size));
                Some(
                    dio::DirectFile::new(Arc::clone(dev), map, state)
                        .map_err(|e| e.to_string())?
                        .read_only(),
                )
            }
            _ => None,
        };
        let file;
        let direct = match &own {
            Some(d) => d,
            None => {
                file = self.ext.open_file(inode).map_err(|e| e.to_string())?;
                match file.direct() {
                    Some(d) => d,
                    None => return self.data_inline(host, &file, chunks),
                }
            }
        };
        let align = direct.geometry().buffer_align().max(4096);
        let mut flight = std::collections::VecDeque::new();
        let mut chunks = chunks.peekable();
        let mut result = Ok(());
        while chunks.peek().is_some() || !flight.is_empty() {
            while flight.len() < self.per_file && result.is_ok() {
                let Some((off, len)) = chunks.next() else {
                    break;
                };
                let buf = pool
                    .pop()
                    .filter(|b| b.len() == self.bs)
                    .unwrap_or_else(|| AlignedBuf::new(self.bs, align));
                let buf = Window::new(buf, 0, len).expect("a chunk fits its buffer");
                flight.push_back((
                    off,
                    len,
                    direct.read_future(off, vec![buf], Flags::UNALIGNED),
                ));
            }
            let Some((off, len, fut)) = flight.pop_front() else {
                break;
            };
            // Every read in flight is waited for, also after a failure.
            let mut done = fut.wait();
            let buf = done.bufs.pop().expect("one buffer per read").into_inner();
            if result.is_err() {
                pool.push(buf);
                continue;
            }
            result = match done.result {
                Ok(n) if n == len => {
                    self.bar.inc(len as u64);
                    host.write_all_at(&buf[..len], off)
                        .map_err(|e| format!("writing at offset {off}: {e}"))
                }
                Ok(n) => Err(format!("short read at offset {off}: {n} of {len} bytes")),
                Err(e) => Err(format!("read at offset {off}: {e}")),
            };
            pool.push(buf);
            if result.is_err() {
                // Nothing more is started; the rest in flight is drained.
                chunks.by_ref().for_each(drop);
            }
        }
        result
    }

    /// Inline data (or a journal copy only `read_at` un-escapes): read in
    /// memory, zero blocks skipped so that a sparse tail stays a hole.
    fn data_inline(
        &self,
        host: &File,
        file: &ExtFile,
        chunks: impl Iterator<Item = (u64, usize)>,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; self.bs];
        for (off, n) in chunks {
            let got = file
                .read_at(off, &mut buf[..n])
                .map_err(|e| e.to_string())?;
            if got != n {
                return Err(format!("short read at offset {off}: {got} of {n} bytes"));
            }
            if buf[..n].iter().any(|&b| b != 0) {
                host.write_all_at(&buf[..n], off)
                    .map_err(|e| format!("writing at offset {off}: {e}"))?;
            }
            self.bar.inc(n as u64);
        }
        Ok(())
    }

    /// A file's data runs: written extents, clipped to i_size (holes and
    /// unwritten extents are left out: the host file reads zeros there).
    fn runs(&self, inode: &Inode) -> dio::Result<Vec<(u64, u64)>> {
        let size = inode.size;
        if !self.sparse || inode.has_flag(inode_flags::INLINE_DATA) {
            return Ok(vec![(0, size)]);
        }
        let b = u64::from(self.ext.block_size());
        Ok(self
            .ext
            .extents(inode)?
            .iter()
            .filter(|e| !e.unwritten)
            .map(|e| {
                let s = e.logical.saturating_mul(b);
                let end = e.logical.saturating_add(e.len).saturating_mul(b).min(size);
                (s, end)
            })
            .filter(|(s, e)| s < e)
            .collect())
    }

    fn symlink(
        &self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: &[u8],
        inode: &Inode,
    ) -> io::Result<()> {
        let target = self
            .ext
            .read_link(inode)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if target.is_empty() || target.contains(&0) {
            return Err(io::Error::other(format!(
                "symlink inode {}: its target {} cannot be a host symlink's (corrupt symlink): not copied",
                inode.ino,
                names::show_target(&target)
            )));
        }
        if self
            .make_or_link(dir, rel, name, inode, || {
                rustix::fs::symlinkat(target.as_slice(), dir, name)
            })?
            .is_none()
        {
            return Ok(());
        }
        lock(&self.tally).symlinks += 1;
        if self.preserve {
            self.attrs_at(dir, name, inode, false)?;
        }
        Ok(())
    }

    fn special(
        &self,
        dir: &OwnedFd,
        rel: &Arc<Vec<Vec<u8>>>,
        name: &[u8],
        inode: &Inode,
        shown: &str,
    ) -> io::Result<()> {
        use rustix::fs::FileType as Ft;
        let (kind, dev) = match inode.file_type() {
            FileType::Fifo => (Ft::Fifo, 0),
            FileType::Socket => (Ft::Socket, 0),
            t => {
                let (ma, mi) = crate::ls::device_numbers(inode).unwrap_or((0, 0));
                let k = if t == FileType::CharDevice {
                    Ft::CharacterDevice
                } else {
                    Ft::BlockDevice
                };
                (k, rustix::fs::makedev(ma, mi))
            }
        };
        let mode = Mode::from_raw_mode(u32::from(inode.permissions() & 0o777));
        match self.make_or_link(dir, rel, name, inode, || {
            rustix::fs::mknodat(dir, name, kind, mode, dev)
        }) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                say(format_args!(
                    "note: {shown}: a {} is made only by root: skipped",
                    inode.file_type().name()
                ));
                lock(&self.tally).skipped += 1;
                // Not there: a later name of it must not link to it.
                lock(&self.links).remove(&inode.ino);
                return Ok(());
            }
            Ok(None) => return Ok(()),
            r => r?,
        };
        lock(&self.tally).special += 1;
        if self.preserve {
            self.attrs_at(dir, name, inode, true)?;
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
}
