//! Changing the tree of an ext2/3/4 image, e2tools-style, on `IMAGE:/PATH`
//! locations: `cp SRC IMG:/f` (create or replace), `write IMG:/f --offset N`
//! (extend, fill holes), `mkdir [-p]`, `rm [-r]`, `ln -s`, `truncate -s`.
//!
//! `cp` writes the new bytes into a new inode that no directory names yet and
//! gives it the name only once every byte is on the image: a failure (ENOSPC, a
//! read error) frees it again and leaves DST as it was. On an image with a
//! journal every change goes through the journal (one transaction each; `cp -r`
//! batches many). Where the library refuses allocation (a feature it cannot
//! allocate on), `cp` and `write` keep the in-place overwrite of an existing
//! file. `cp -r DIR IMG:/DIR` copies a host tree in (`mke2fs -d` on an existing
//! image), batching its operations (`Ext::begin_batch`).

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use dio::ext::{Attrs, Ext, FileType};
use dio::{Error, Flags};

use crate::fail::{say, Failure};
use crate::location::{Location, Opened, Source};
use crate::Engine;

/// Bytes moved per write call.
const CHUNK: usize = 8 << 20;

/// `--mode` and `--owner` of commands that make inodes.
#[derive(Args, Debug, Clone, Default)]
pub struct PutArgs {
    /// Permission bits of what is created, in octal (e.g. 644, 0755).
    #[arg(long, value_parser = parse_mode, value_name = "OCTAL")]
    pub mode: Option<u16>,
    /// Owner of what is created: UID or UID:GID (numbers).
    #[arg(long, value_parser = parse_owner, value_name = "UID[:GID]")]
    pub owner: Option<(u32, Option<u32>)>,
}

fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("`{s}` is not an octal mode (0 to 7777)"))
}

fn parse_owner(s: &str) -> Result<(u32, Option<u32>), String> {
    let bad = || format!("`{s}` is not UID or UID:GID (numbers)");
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let u = u.parse().map_err(|_| bad())?;
    let g = match g {
        Some(g) => Some(g.parse().map_err(|_| bad())?),
        None => None,
    };
    Ok((u, g))
}

impl PutArgs {
    fn attrs(&self) -> Attrs {
        let mut a = Attrs::new();
        if let Some(m) = self.mode {
            a = a.mode(m);
        }
        if let Some((u, g)) = self.owner {
            a = a.owner(u, g.unwrap_or(u));
        }
        a
    }
}

/// An image opened for changes, and the path inside it.
struct Target {
    _opened: Opened,
    ext: Ext,
    loc: Location,
}

impl Target {
    fn open(arg: &OsStr, engine: Engine) -> Result<Target, Failure> {
        let loc = Location::parse(arg)?;
        if loc.inner.is_none() {
            return Err(Failure::usage(format!(
                "{}: not a path inside an image (IMAGE:/PATH)",
                arg.to_string_lossy()
            )));
        }
        let opened = loc.source.open(true, false, engine)?;
        let ext = Ext::open_writable(Arc::clone(opened.device()), opened.size())
            .map_err(|e| Failure::msg(format!("{}: {e}", source_name(&loc.source))))?;
        Ok(Target {
            _opened: opened,
            ext,
            loc,
        })
    }

    fn path(&self) -> &[u8] {
        self.loc.inner.as_deref().expect("checked at open")
    }

    fn fail(&self, e: impl std::fmt::Display) -> Failure {
        self.loc.fail(e)
    }

    /// Whether the library refuses allocating writes here (a feature it cannot
    /// allocate on): cp and write then keep their in-place overwrite.
    fn journal_refused(&self) -> bool {
        matches!(self.ext.can_allocate(), Err(Error::Incompatible(_)))
    }

    /// Write an open batch (if any) and make everything durable.
    fn end_batch_and_sync(&self) -> Result<(), Failure> {
        self.ext.end_batch().map_err(|e| self.fail(e))?;
        self.sync()
    }

    fn sync(&self) -> Result<(), Failure> {
        self._opened
            .direct()
            .sync_data()
            .map_err(|e| self.fail(e))?;
        // Committed is durable already; checkpointing now leaves a clean journal
        // for the next tool (debugfs does not replay one) and reports its errors
        // instead of dropping them at close.
        self.ext.checkpoint().map_err(|e| self.fail(e))
    }
}

fn source_name(s: &Source) -> String {
    match s {
        Source::Host(p) => p.display().to_string(),
        Source::Nbd(u) => u.clone(),
    }
}

/// What `cp` reads from.
enum Input {
    Stream(Box<dyn Read + Send>),
    Image {
        _img: Box<crate::location::Image>,
        file: dio::ext::ExtFile,
    },
    Direct(Opened),
}

impl Input {
    fn open(src: &OsStr, engine: Engine) -> Result<(Input, Option<u64>, String), Failure> {
        if src == "-" {
            return Ok((
                Input::Stream(Box::new(std::io::stdin())),
                None,
                "stdin".into(),
            ));
        }
        let loc = Location::parse(src)?;
        let name = loc.display();
        if loc.inner.is_some() {
            let img = crate::location::Image::open(&loc, false, true, engine)?;
            let f = img.file(&loc)?;
            let n = f.size();
            return Ok((
                Input::Image {
                    _img: Box::new(img),
                    file: f,
                },
                Some(n),
                name,
            ));
        }
        if let Source::Host(p) = &loc.source {
            let meta = std::fs::metadata(p).map_err(|e| Failure::at(p, e))?;
            if meta.is_dir() {
                return Err(Failure::at(
                    p,
                    "is a directory (cp -r is not supported into images)",
                ));
            }
            if !meta.is_file() {
                let f = std::fs::File::open(p).map_err(|e| Failure::at(p, e))?;
                return Ok((Input::Stream(Box::new(f)), None, name));
            }
        }
        let opened = loc.source.open(false, false, engine)?;
        let n = opened.size();
        Ok((Input::Direct(opened), Some(n), name))
    }

    /// The runs of `[0, size)` that hold data, in order: a host file's
    /// SEEK_DATA, an export's block status, an image file's written extents. A
    /// stream (`size` unknown) is one run, read to its end.
    fn runs(&self, size: Option<u64>) -> Result<Vec<(u64, u64)>, Failure> {
        let Some(n) = size else {
            return Ok(vec![(0, u64::MAX)]);
        };
        match self {
            Input::Stream(_) => Ok(vec![(0, n)]),
            Input::Image { _img, file } => crate::copy::image_runs(_img, file),
            Input::Direct(o) => o
                .data_runs(n)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::msg(format!("reading the data map of the source: {e}"))),
        }
    }

    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Input::Stream(r) => {
                let mut n = 0;
                while n < buf.len() {
                    match r.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(n)
            }
            Input::Image { file, .. } => file.read_at(pos, buf).map_err(std::io::Error::other),
            Input::Direct(o) => {
                let n = buf.len().min(o.size().saturating_sub(pos) as usize);
                o.direct()
                    .read_at(pos, &mut buf[..n], Flags::UNALIGNED)
                    .map_err(std::io::Error::other)
            }
        }
    }
}

/// `dio cp SRC IMG:/PATH`: create or replace. `None`: the library cannot
/// allocate on this image; the caller overwrites in place instead.
pub fn cp(src: &OsStr, dst: &OsStr, put: &PutArgs, engine: Engine) -> Option<Result<(), Failure>> {
    // Sources sharing storage with DST are refused before anything is opened
    // (stdin too, when the shell redirected it from the image).
    let shared = if src != "-" {
        Location::parse(src).and_then(|s| {
            let d = Location::parse(dst)?;
            crate::storage::refuse_shared(&s, &d, engine)
        })
    } else if let Some(s) = crate::storage::stdio_location(0) {
        Location::parse(dst).and_then(|d| {
            crate::storage::refuse_shared_as((&s, "stdin"), (&d, &d.display()), "copy", engine)
        })
    } else {
        Ok(())
    };
    if let Err(e) = shared {
        return Some(Err(e));
    }
    let t = match Target::open(dst, engine) {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    if t.journal_refused() {
        // In place into a file that exists; a new one (a name that is not there,
        // or a directory to copy into) cannot be made, and the reason is the
        // refusal, not the name.
        let new_file = match t.ext.lookup(t.path(), true) {
            Err(Error::Path(p)) => p.kind == dio::PathErrorKind::NotFound,
            Ok(i) => i.file_type() == FileType::Directory,
            Err(_) => false,
        };
        if let (true, Err(e)) = (new_file, t.ext.can_allocate()) {
            return Some(Err(t.fail(e)));
        }
        return None;
    }
    Some(cp_into(src, &t, put, engine))
}

fn cp_into(src: &OsStr, t: &Target, put: &PutArgs, engine: Engine) -> Result<(), Failure> {
    let (mut input, size, in_name) = Input::open(src, engine)?;
    // cp into an existing directory: DIR/NAME.
    let mut path = t.path().to_vec();
    if let Ok(i) = t.ext.lookup(&path, true) {
        if i.file_type() == FileType::Directory {
            let name = std::path::Path::new(src)
                .file_name()
                .filter(|_| src != "-")
                .ok_or_else(|| t.fail("is a directory, and stdin has no name to copy into it"))?;
            if path.last() != Some(&b'/') {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
        }
    }
    // Only the source's data runs are allocated and written: its holes stay
    // holes (a size past the last run is set at the end).
    let runs = input.runs(size)?;
    // A signal stops the copy between chunks; the new inode is then given back.
    let stop = crate::pipeline::Stop::on_signals();
    let mut read_err = None;
    let r = t.ext.put_file(&path, &put.attrs(), |w| {
        for &(start, end) in &runs {
            if size.is_some() {
                w.allocate(start, end - start)?;
            }
        }
        // A reader thread fills buffers while this one writes the previous.
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(dio::AlignedBuf, u64, usize)>(2);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<dio::AlignedBuf>();
        for _ in 0..3 {
            let _ = empty_tx.send(dio::AlignedBuf::new(CHUNK, 4096));
        }
        std::thread::scope(|scope| {
            let input = &mut input;
            let runs = &runs;
            // Where the source ended: its size, or less if it shrank under us.
            let reader = scope.spawn(move || -> Result<Option<u64>, String> {
                for &(start, end) in runs {
                    let mut pos = start;
                    while pos < end {
                        let Ok(mut buf) = empty_rx.recv() else {
                            return Ok(None);
                        };
                        let want = (end - pos).min(buf.len() as u64) as usize;
                        let n = input
                            .read_at(pos, &mut buf[..want])
                            .map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Ok(Some(pos));
                        }
                        if full_tx.send((buf, pos, n)).is_err() {
                            return Ok(None);
                        }
                        pos += n as u64;
                    }
                }
                Ok(size)
            });
            let mut top = 0u64;
            let written = (|| {
                while let Ok((buf, pos, n)) = full_rx.recv() {
                    if stop.fired().is_some() {
                        return Err(Error::Invalid("interrupted".into()));
                    }
                    let k = w.direct().write_at(pos, &buf[..n], Flags::UNALIGNED)?;
                    if k < n {
                        return Err(Error::NoSpace(format!(
                            "only {} of {} bytes fit",
                            pos + k as u64,
                            size.unwrap_or(pos + n as u64)
                        )));
                    }
                    top = pos + n as u64;
                    let _ = empty_tx.send(buf);
                }
                Ok(())
            })();
            // Stop the reader (it ends when its channels close).
            drop(full_rx);
            drop(empty_tx);
            let end = match reader.join() {
                Ok(Err(e)) => {
                    read_err = Some(format!("{in_name}: {e}"));
                    return Err(Error::Invalid("the source could not be read".into()));
                }
                Err(_) => return Err(Error::Invalid("the reader thread panicked".into())),
                Ok(Ok(end)) => end,
            };
            written?;
            // The source's size (holes at its end included), or what was read of
            // a stream or of a file that shrank.
            let end = end.unwrap_or(top);
            if w.size() != end {
                w.set_len(end)?;
            }
            Ok(())
        })
    });
    if let Some(signal) = stop.fired() {
        if r.is_err() {
            return Err(Failure::Signal {
                signal,
                message: format!("interrupted: nothing was written to {}", t.loc.display()),
            });
        }
    }
    if let Some(m) = read_err {
        return Err(Failure::msg(format!(
            "{m} (nothing was written to {})",
            t.loc.display()
        )));
    }
    r.map_err(|e| {
        t.fail(format!(
            "{e}{}",
            if matches!(e, Error::NoSpace(_)) {
                " (nothing was written)"
            } else {
                ""
            }
        ))
    })?;
    t.sync()
}

/// `dio write IMG:/PATH --offset N`: grows the file and fills holes. `None`:
/// the library cannot allocate on this image (the caller overwrites in place).
pub fn write(
    target: &OsStr,
    offset: u64,
    input: &Option<PathBuf>,
    engine: Engine,
) -> Option<Result<(), Failure>> {
    let t = match Target::open(target, engine) {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    if t.journal_refused() {
        return None;
    }
    Some((|| {
        let inode = t.ext.lookup(t.path(), true).map_err(|e| t.fail(e))?;
        if inode.file_type() != FileType::Regular {
            return Err(t.fail(format!(
                "is a {}, not a regular file",
                inode.file_type().name()
            )));
        }
        let w = t.ext.writer(&inode).map_err(|e| t.fail(e))?;
        let (mut r, name): (Box<dyn Read>, String) = match input {
            Some(p) if p.as_os_str() != "-" => (
                Box::new(std::fs::File::open(p).map_err(|e| Failure::at(p, e))?),
                p.display().to_string(),
            ),
            _ => (Box::new(std::io::stdin().lock()), "stdin".into()),
        };
        let mut buf = vec![0u8; CHUNK];
        let mut pos = offset;
        loop {
            let mut n = 0;
            while n < buf.len() {
                match r.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Failure::msg(format!("{name}: {e}"))),
                }
            }
            if n == 0 {
                break;
            }
            let k =
                match w.direct().write_at(pos, &buf[..n], Flags::UNALIGNED) {
                    Ok(k) => k,
                    Err(e) => {
                        // Give back the blocks of the failed chunk and keep what
                        // earlier chunks wrote (durable, with the size that covers
                        // it). A write refused before it took anything changes
                        // nothing.
                        let settled = w.discard_failed().and_then(|()| {
                            if pos > offset {
                                w.sync()
                            } else {
                                Ok(())
                            }
                        });
                        let kept = match settled {
                            Ok(()) if pos > offset => {
                                format!(" (the file keeps the bytes written before offset {pos})")
                            }
                            Ok(()) => " (nothing was written)".to_string(),
                            Err(e2) => format!(" (and recording what was written failed: {e2})"),
                        };
                        return Err(t.fail(format!("writing at offset {pos}: {e}{kept}")));
                    }
                };
            pos += k as u64;
            if k < n {
                w.sync().map_err(|e| t.fail(e))?;
                return Err(t.fail(format!(
                    "no space left on device: the file holds the bytes up to offset {pos}"
                )));
            }
        }
        w.sync().map_err(|e| t.fail(e))?;
        t.sync()
    })())
}

#[derive(Args, Debug)]
pub struct MkdirArgs {
    /// Make missing parents too; an existing directory is no error.
    #[arg(short = 'p', long)]
    parents: bool,
    /// IMAGE:/DIR to make (several may be given).
    #[arg(value_name = "IMAGE:/DIR", required = true)]
    dirs: Vec<std::ffi::OsString>,
    #[command(flatten)]
    put: PutArgs,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

pub fn mkdir(a: &MkdirArgs) -> Result<(), Failure> {
    each_path(&a.dirs, a.engine, |t| mkdir_one(a, t))
}

/// Make `t`'s directory as `a` says.
fn mkdir_one(a: &MkdirArgs, t: &Target) -> Result<(), Failure> {
    let path = t.path();
    if !a.parents {
        return t
            .ext
            .mkdir(path, &a.put.attrs())
            .map(drop)
            .map_err(|e| t.fail(e));
    }
    let mut cur = Vec::new();
    for part in path.split(|&c| c == b'/').filter(|p| !p.is_empty()) {
        cur.push(b'/');
        cur.extend_from_slice(part);
        match t.ext.lookup(&cur, true) {
            Ok(i) if i.file_type() == FileType::Directory => continue,
            Ok(_) => {
                return Err(t.fail(format!(
                    "{} exists and is not a directory",
                    String::from_utf8_lossy(&cur)
                )))
            }
            Err(_) => {
                t.ext.mkdir(&cur, &a.put.attrs()).map_err(|e| t.fail(e))?;
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Remove directories and everything in them.
    #[arg(short = 'r', short_alias = 'R', long)]
    recursive: bool,
    /// No error for a missing path.
    #[arg(short = 'f', long)]
    force: bool,
    /// IMAGE:/PATH to remove (several may be given).
    #[arg(value_name = "IMAGE:/PATH", required = true)]
    paths: Vec<std::ffi::OsString>,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

fn remove_tree(ext: &Ext, path: &[u8]) -> dio::Result<()> {
    let inode = ext.lookup(path, false)?;
    if inode.file_type() != FileType::Directory {
        return ext.remove(path, false);
    }
    for e in ext.read_dir(&inode)? {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let mut p = path.to_vec();
        if p.last() != Some(&b'/') {
            p.push(b'/');
        }
        p.extend_from_slice(&e.name);
        remove_tree(ext, &p)?;
    }
    ext.remove(path, true)
}

pub fn rm(a: &RmArgs) -> Result<(), Failure> {
    each_path(&a.paths, a.engine, |t| rm_one(a, t))
}

/// Run `each` on every `IMAGE:/PATH` of `paths`. Paths in one image (one after
/// another on the command line) share one open and one batch: their changes go
/// out together (one ordered write, or one journal transaction, per batch) and
/// are synced once, not one or two flushes and an open per name. As GNU rm and
/// mkdir, a path that fails is reported and the others still run (exit 1 at the
/// end); what was done before a failure is written and synced too.
fn each_path(
    paths: &[std::ffi::OsString],
    engine: Engine,
    mut each: impl FnMut(&Target) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut open: Option<Target> = None;
    let mut failed = false;
    // A message is reported and the next path taken; anything else (a usage
    // mistake, a signal) stops the command.
    let mut report = |f: Failure| match f {
        Failure::Message(m) => {
            say(m);
            failed = true;
            Ok(())
        }
        other => Err(other),
    };
    let r = (|| {
        for p in paths {
            let loc = Location::parse(p)?;
            match open.as_mut() {
                Some(t) if t.loc.source == loc.source && loc.inner.is_some() => t.loc = loc,
                _ => {
                    if let Some(t) = open.take() {
                        t.end_batch_and_sync()?;
                    }
                    match Target::open(p, engine) {
                        Ok(t) => {
                            // Where the library cannot batch, one operation a name.
                            let _ = t.ext.begin_batch();
                            open = Some(t);
                        }
                        Err(f) => {
                            report(f)?;
                            continue;
                        }
                    }
                }
            }
            if let Err(f) = each(open.as_ref().expect("opened above")) {
                report(f)?;
            }
        }
        Ok(())
    })();
    let ended = match open {
        Some(t) => t.end_batch_and_sync(),
        None => Ok(()),
    };
    r.and(ended)?;
    if failed {
        return Err(Failure::Quiet);
    }
    Ok(())
}

/// Remove `t`'s path as `a` says.
fn rm_one(a: &RmArgs, t: &Target) -> Result<(), Failure> {
    let path = t.path();
    let r = match t.ext.lookup(path, false) {
        Err(Error::Path(e)) if a.force && e.kind == dio::PathErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(i) if i.ino == dio::ext::ROOT_INO => {
            // As GNU rm's --preserve-root: checked before anything goes.
            return Err(t.fail(
                "is the root directory, which cannot be removed (name what is in it instead)",
            ));
        }
        Ok(i) if i.file_type() == FileType::Directory && !a.recursive => {
            return Err(t.fail("is a directory (use -r)"))
        }
        Ok(_) if a.recursive => remove_tree(&t.ext, path),
        Ok(_) => t.ext.remove(path, false),
    };
    r.map_err(|e| t.fail(e))
}

#[derive(Args, Debug)]
pub struct LnArgs {
    /// Make a symbolic link (else a hard link: TARGET is IMAGE:/PATH in the
    /// same image, not a directory).
    #[arg(short = 's', long)]
    symbolic: bool,
    /// What the link points to: for -s stored as given; else the existing
    /// IMAGE:/PATH.
    #[arg(value_name = "TARGET")]
    target: std::ffi::OsString,
    /// IMAGE:/LINK to create.
    #[arg(value_name = "IMAGE:/LINK")]
    link: std::ffi::OsString,
    #[command(flatten)]
    put: PutArgs,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

pub fn ln(a: &LnArgs) -> Result<(), Failure> {
    if !a.symbolic {
        return hard_link(a);
    }
    let t = Target::open(&a.link, a.engine)?;
    t.ext
        .symlink(a.target.as_bytes(), t.path(), &a.put.attrs())
        .map_err(|e| t.fail(e))?;
    t.sync()
}

/// `dio ln IMG:/EXISTING IMG:/NEW`: a second name for an inode.
fn hard_link(a: &LnArgs) -> Result<(), Failure> {
    if a.put.mode.is_some() || a.put.owner.is_some() {
        return Err(Failure::usage(
            "--mode and --owner make no sense for a hard link (it shares the inode)",
        ));
    }
    let from = Location::parse(&a.target)?;
    let to = Location::parse(&a.link)?;
    let Some(existing) = from.inner.as_deref() else {
        return Err(Failure::usage(format!(
            "{}: a hard link needs IMAGE:/PATH (or ln -s for a symbolic link)",
            a.target.to_string_lossy()
        )));
    };
    if to.inner.is_some() && from.source != to.source {
        return Err(Failure::usage(format!(
            "{} and {}: a hard link stays inside one image",
            from.display(),
            to.display()
        )));
    }
    let t = Target::open(&a.link, a.engine)?;
    t.ext.link(existing, t.path()).map_err(|e| match &e {
        Error::Path(p) if p.kind == dio::PathErrorKind::IsADirectory => Failure::msg(format!(
            "{}: is a directory (hard links to directories are not allowed)",
            from.display()
        )),
        Error::Path(p)
            if p.kind == dio::PathErrorKind::NotFound && t.ext.lookup(existing, false).is_err() =>
        {
            from.fail(e)
        }
        _ => t.fail(e),
    })?;
    t.sync()
}

#[derive(Args, Debug)]
pub struct TruncateArgs {
    /// New size (K/M/G suffixes); the file is created if missing.
    #[arg(short = 's', long, value_parser = crate::size::parse_offset)]
    size: u64,
    /// IMAGE:/FILE to resize.
    #[arg(value_name = "IMAGE:/FILE", required = true)]
    files: Vec<std::ffi::OsString>,
    #[command(flatten)]
    put: PutArgs,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

pub fn truncate(a: &TruncateArgs) -> Result<(), Failure> {
    for f in &a.files {
        let t = Target::open(f, a.engine)?;
        let inode = match t.ext.lookup(t.path(), true) {
            Ok(i) => i,
            Err(Error::Path(e)) if e.kind == dio::PathErrorKind::NotFound => t
                .ext
                .create(t.path(), &a.put.attrs())
                .map_err(|e| t.fail(e))?,
            Err(e) => return Err(t.fail(e)),
        };
        let w = t.ext.writer(&inode).map_err(|e| t.fail(e))?;
        w.set_len(a.size).map_err(|e| t.fail(e))?;
        w.sync().map_err(|e| t.fail(e))?;
        t.sync()?;
    }
    Ok(())
}

/// `dio cp -r DIR IMG:/DIR`: what to keep and how to report.
pub struct TreeArgs<'a> {
    /// -p: mode, owner and times of the sources.
    pub preserve: bool,
    pub put: &'a PutArgs,
    /// Show progress (a terminal or --progress, not --no-progress).
    pub progress: bool,
    pub engine: Engine,
}

/// Counts of a tree copy, for the summary line.
#[derive(Default)]
struct Tally {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hard_links: u64,
    special: u64,
    bytes: u64,
    failed: u64,
    /// Names and data bytes since the batch was last written.
    since_names: u64,
    since_bytes: u64,
    last_shown: Option<std::time::Instant>,
}

/// Write the batch every this many names or data bytes (and at the end).
const BATCH_NAMES: u64 = 5000;
const BATCH_BYTES: u64 = 1 << 30;
/// Threads copying files: each reads a group of small files (or one large
/// file) while another's group is being written.
const TREE_WORKERS: usize = 3;
/// Regular files up to this size are read whole and created in groups
/// (`Ext::put_files`: one operation, their data in few large writes).
const SMALL_FILE: u64 = 1 << 20;
/// A group closes at this many files or data bytes.
const GROUP_FILES: usize = 1024;
const GROUP_BYTES: u64 = 8 << 20;

/// What a worker copies: one file through `Ext::put_file`, or a group of small
/// files through `Ext::put_files`.
enum Job {
    One(FileJob),
    Group(Vec<FileJob>),
}

/// A regular file for a worker to copy.
struct FileJob {
    host: PathBuf,
    img: Vec<u8>,
    size: u64,
    attrs: Attrs,
}

/// What the walk and the workers share.
struct TreeCopy<'a> {
    ext: &'a Ext,
    image: String,
    a: &'a TreeArgs<'a>,
    tally: std::sync::Mutex<Tally>,
    /// Set by the first failure that stops the copy (ENOSPC, a batch write).
    fatal: std::sync::Mutex<Option<Failure>>,
    stop: std::sync::atomic::AtomicBool,
    /// SIGINT, SIGTERM, SIGHUP: the copy stops between files and chunks, and
    /// what was copied stays consistent (a file cut short is given back).
    signal: crate::pipeline::Stop,
    /// The image's own host file (never copied into itself).
    image_id: Option<(u64, u64)>,
}

/// Whether `src` is a host directory (then `cp -r SRC IMG:/DIR` copies it in).
pub fn is_host_dir(src: &OsStr) -> bool {
    matches!(Location::parse(src), Ok(Location { source: Source::Host(ref p), inner: None }) if p.is_dir())
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn stamp_of(secs: i64, nsecs: i64) -> dio::ext::Timestamp {
    dio::ext::Timestamp {
        secs,
        nsecs: nsecs.clamp(0, 999_999_999) as u32,
    }
}

fn human(n: u64) -> String {
    if n >= 10 << 20 {
        format!("{} MiB", n >> 20)
    } else if n >= 10 << 10 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// `dio cp -r DIR IMG:/DIR`.
pub fn cp_tree(src: &OsStr, dst: &OsStr, a: &TreeArgs) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    let src_path = PathBuf::from(src);
    let shared = Location::parse(src).and_then(|s| {
        let d = Location::parse(dst)?;
        crate::storage::refuse_shared(&s, &d, a.engine)
    });
    shared?;
    let t = Target::open(dst, a.engine)?;
    t.ext.can_allocate().map_err(|e| t.fail(e))?;
    let image_id = match &t.loc.source {
        Source::Host(p) => std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino())),
        Source::Nbd(_) => None,
    };
    // GNU cp: into an existing directory as DIR/NAME; else DST is the copy.
    // `SRC/.` copies SRC's contents into DST.
    let contents_only = src.as_bytes().ends_with(b"/.") || src == ".";
    let dst_path = t.path().to_vec();
    let root = match t.ext.lookup(&dst_path, true) {
        Ok(i) if i.file_type() == FileType::Directory => {
            if contents_only {
                dst_path
            } else {
                let name = src_path.file_name().ok_or_else(|| {
                    Failure::at(&src_path, "has no name to copy into a directory")
                })?;
                join(&dst_path, name.as_bytes())
            }
        }
        Ok(_) => return Err(t.fail("exists and is not a directory")),
        Err(Error::Path(e)) if e.kind == dio::PathErrorKind::NotFound => dst_path,
        Err(e) => return Err(t.fail(e)),
    };
    let meta = std::fs::symlink_metadata(&src_path).map_err(|e| Failure::at(&src_path, e))?;
    if !meta.is_dir() {
        return Err(Failure::at(&src_path, "is not a directory"));
    }
    t.ext.begin_batch().map_err(|e| t.fail(e))?;
    let c = TreeCopy {
        ext: &t.ext,
        image: source_name(&t.loc.source),
        a,
        tally: Default::default(),
        fatal: Default::default(),
        stop: Default::default(),
        signal: crate::pipeline::Stop::on_signals(),
        image_id,
    };
    let mut dir_times = Vec::new();
    let mut links = std::collections::HashMap::new();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(TREE_WORKERS * 2);
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..TREE_WORKERS {
            let (c, rx) = (&c, &rx);
            scope.spawn(move || {
                let (mut buf, mut store) = (Vec::new(), Vec::new());
                loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    };
                    if c.stopped() {
                        continue;
                    }
                    match job {
                        Job::One(job) => {
                            let r = c.file(&job, &mut buf);
                            c.finish(&job.img, r.map(|n| (Kind::File, n)));
                        }
                        Job::Group(jobs) => c.group(jobs, &mut store, &mut buf),
                    }
                }
            });
        }
        let mut w = Walk {
            c: &c,
            jobs: tx,
            links: &mut links,
            dir_times: &mut dir_times,
            group: Vec::new(),
            group_bytes: 0,
        };
        w.dir(&src_path, &meta, &root);
        w.send_group();
        // Dropping the sender ends the workers once the queue is empty.
    });
    if a.preserve && !c.stopped() {
        // The entries moved the directories' times: set them last, deepest
        // first (a directory's own change touches nothing above it).
        for (ino, img, attrs) in dir_times.iter().rev() {
            if let Err(e) = t.ext.set_attrs(*ino, attrs) {
                c.finish(img, Err(e));
            }
        }
    }
    // What was copied is written and flushed whatever happened after it.
    let ended = t.ext.end_batch().map_err(|e| t.fail(e));
    c.show(true);
    let synced = ended.and_then(|_| t.sync());
    let tl = c.tally.lock().unwrap_or_else(|e| e.into_inner());
    say(format_args!(
        "copied {} files ({}), {} directories, {} symlinks, {} hard links, {} special files into {}{}",
        tl.files,
        human(tl.bytes),
        tl.dirs,
        tl.symlinks,
        tl.hard_links,
        tl.special,
        t.loc.display(),
        if tl.failed > 0 {
            format!("; {} failed", tl.failed)
        } else {
            String::new()
        }
    ));
    let failed = tl.failed;
    drop(tl);
    if let Some(f) = c.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(f);
    }
    synced?;
    if let Some(signal) = c.signal.fired() {
        return Err(Failure::Signal {
            signal,
            message: format!(
                "interrupted: what was copied before it is kept in {}",
                t.loc.display()
            ),
        });
    }
    if failed > 0 {
        return Err(Failure::Quiet);
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Special,
}

impl TreeCopy<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed) || self.signal.fired().is_some()
    }

    fn attrs(&self, m: &std::fs::Metadata, default_mode: Option<u16>) -> Attrs {
        use std::os::unix::fs::MetadataExt;
        let mut at = Attrs::new();
        if self.a.preserve {
            at = at
                .mode((m.mode() & 0o7777) as u16)
                .owner(m.uid(), m.gid())
                .times(
                    stamp_of(m.atime(), m.atime_nsec()),
                    stamp_of(m.mtime(), m.mtime_nsec()),
                );
            let crtime = m.created().ok().and_then(|t| {
                let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                Some(stamp_of(d.as_secs() as i64, i64::from(d.subsec_nanos())))
            });
            at = at.change_times(stamp_of(m.ctime(), m.ctime_nsec()), crtime);
        } else if let Some(dm) = default_mode {
            at = at.mode(dm);
        }
        if let Some(md) = self.a.put.mode {
            at = at.mode(md);
        }
        if let Some((u, g)) = self.a.put.owner {
            at = at.owner(u, g.unwrap_or(u));
        }
        at
    }

    /// Count one entry done (or report its failure: the copy goes on, except
    /// when the image is full or a batch could not be written).
    fn finish(&self, img: &[u8], r: dio::Result<(Kind, u64)>) {
        let where_ = format!("{}:{}", self.image, String::from_utf8_lossy(img));
        let mut tl = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok((kind, bytes)) => {
                match kind {
                    Kind::File => tl.files += 1,
                    Kind::Dir => tl.dirs += 1,
                    Kind::Symlink => tl.symlinks += 1,
                    Kind::HardLink => tl.hard_links += 1,
                    Kind::Special => tl.special += 1,
                }
                tl.bytes += bytes;
                tl.since_names += 1;
                tl.since_bytes += bytes;
                if tl.since_names >= BATCH_NAMES || tl.since_bytes >= BATCH_BYTES {
                    tl.since_names = 0;
                    tl.since_bytes = 0;
                    drop(tl);
                    if let Err(e) = self.ext.commit_batch() {
                        self.fail_all(Failure::msg(format!("{}: {e}", self.image)));
                    }
                    self.show(false);
                    return;
                }
            }
            Err(e @ Error::NoSpace(_)) => {
                drop(tl);
                self.fail_all(Failure::msg(format!(
                    "{where_}: No space left on device ({e}); what was copied before it is kept"
                )));
                return;
            }
            Err(e) => {
                tl.failed += 1;
                say(format_args!("{where_}: {e}"));
            }
        }
        drop(tl);
        self.show(false);
    }

    fn fail_all(&self, f: Failure) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(f);
        }
    }

    fn show(&self, last: bool) {
        if !self.a.progress {
            return;
        }
        let now = std::time::Instant::now();
        let mut tl = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        if !last
            && tl
                .last_shown
                .is_some_and(|t| now.duration_since(t).as_millis() < 200)
        {
            return;
        }
        tl.last_shown = Some(now);
        let line = format!(
            "\r{} files, {} directories, {} copied   {}",
            tl.files + tl.hard_links + tl.symlinks + tl.special,
            tl.dirs,
            human(tl.bytes),
            if last { "\n" } else { "" }
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }

    /// Copy one regular file (a new inode named once its bytes are in). Only its
    /// data runs are allocated and written: its holes stay holes.
    fn file(&self, job: &FileJob, buf: &mut Vec<u8>) -> dio::Result<u64> {
        use std::os::fd::AsFd as _;
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::File::open(&job.host).map_err(|e| Error::os("open the source", e))?;
        let runs = dio::DataRuns::of(f.as_fd(), job.size).collect::<dio::Result<Vec<_>>>()?;
        let mut written = job.size;
        self.ext.put_file(&job.img, &job.attrs, |w| {
            for &(start, end) in &runs {
                w.allocate(start, end - start)?;
            }
            buf.resize(CHUNK, 0);
            'runs: for &(start, end) in &runs {
                let mut pos = start;
                while pos < end {
                    if self.stopped() {
                        return Err(Error::Invalid("the copy was stopped".into()));
                    }
                    let want = (end - pos).min(CHUNK as u64) as usize;
                    let n = match f.read_at(&mut buf[..want], pos) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Error::os("read the source", e)),
                    };
                    if n == 0 {
                        // The file shrank since the walk saw it: keep what was read.
                        written = pos;
                        break 'runs;
                    }
                    let k = w.direct().write_at(pos, &buf[..n], Flags::UNALIGNED)?;
                    if k < n {
                        return Err(Error::NoSpace(format!(
                            "only {} of {} bytes fit",
                            pos + k as u64,
                            job.size
                        )));
                    }
                    pos += n as u64;
                }
            }
            if w.size() != written {
                w.set_len(written)?;
            }
            Ok(())
        })?;
        Ok(written)
    }

    /// Copy a group of small files: each read whole, then all created in one
    /// operation. A file that cannot be read is reported and left out (nothing
    /// names it); when the group cannot be created as one (a name exists,
    /// ENOSPC, ...), each file goes through [`TreeCopy::file`], which replaces
    /// what is in the way and reports each failure on its own.
    fn group(&self, jobs: Vec<FileJob>, store: &mut Vec<u8>, buf: &mut Vec<u8>) {
        use std::io::Read as _;
        // Every file's bytes one after the other in `store` (kept by the
        // worker: no fresh memory per group).
        store.clear();
        // Room for a whole group up front (no copies as it grows).
        store.reserve((GROUP_BYTES + SMALL_FILE) as usize + 1);
        let mut read: Vec<(FileJob, std::ops::Range<usize>)> = Vec::with_capacity(jobs.len());
        // Files that grew past SMALL_FILE since the walk saw them.
        let mut grown = Vec::new();
        for job in jobs {
            let start = store.len();
            let r = std::fs::File::open(&job.host).and_then(|f| {
                store.reserve(job.size as usize + 1);
                f.take(SMALL_FILE + 1).read_to_end(store)
            });
            match r {
                Ok(n) if n as u64 > SMALL_FILE => {
                    store.truncate(start);
                    grown.push(job);
                }
                Ok(_) => read.push((job, start..store.len())),
                Err(e) => {
                    store.truncate(start);
                    self.finish(&job.img, Err(Error::os("read the source", e)))
                }
            }
        }
        let files: Vec<dio::ext::NewFile<'_>> = read
            .iter()
            .map(|(job, r)| dio::ext::NewFile {
                path: &job.img,
                attrs: &job.attrs,
                data: &store[r.clone()],
            })
            .collect();
        for job in &grown {
            let r = self.file(job, buf);
            self.finish(&job.img, r.map(|n| (Kind::File, n)));
        }
        match self.ext.put_files(&files) {
            Ok(_) => {
                for (job, r) in &read {
                    self.finish(&job.img, Ok((Kind::File, r.len() as u64)));
                }
            }
            Err(_) => {
                for (job, _) in &read {
                    if self.stopped() {
                        return;
                    }
                    let r = self.file(job, buf);
                    self.finish(&job.img, r.map(|n| (Kind::File, n)));
                }
            }
        }
    }

    /// GNU cp replaces a non-directory DST: remove one in the way of a name
    /// the library will not replace itself.
    fn remove_existing(&self, img: &[u8]) {
        if let Ok(i) = self.ext.lookup(img, false) {
            if i.file_type() != FileType::Directory {
                let _ = self.ext.remove(img, false);
            }
        }
    }
}

/// The walk of the host tree (one thread): directories, links and special
/// files in order, regular files handed to the workers.
struct Walk<'a, 'b> {
    c: &'a TreeCopy<'b>,
    jobs: std::sync::mpsc::SyncSender<Job>,
    /// Small files gathered for the next group, and their bytes.
    group: Vec<FileJob>,
    group_bytes: u64,
    /// Host (dev, ino) of files with several links -> their path in the image.
    links: &'a mut std::collections::HashMap<(u64, u64), Vec<u8>>,
    /// Directories whose attributes -p sets at the end.
    dir_times: &'a mut Vec<(u32, Vec<u8>, Attrs)>,
}

impl Walk<'_, '_> {
    /// Hand the gathered small files to a worker.
    fn send_group(&mut self) {
        self.group_bytes = 0;
        if !self.group.is_empty() {
            let _ = self.jobs.send(Job::Group(std::mem::take(&mut self.group)));
        }
    }

    fn dir(&mut self, host: &std::path::Path, meta: &std::fs::Metadata, img: &[u8]) {
        use std::os::unix::fs::MetadataExt;
        let c = self.c;
        if c.stopped() {
            return;
        }
        let ino = match c.ext.lookup(img, true) {
            Ok(i) if i.file_type() == FileType::Directory => i.ino,
            Ok(_) => {
                c.finish(
                    img,
                    Err(Error::path(dio::PathErrorKind::NotADirectory, img)),
                );
                return;
            }
            Err(_) => {
                let perm = Some((meta.mode() & 0o777) as u16);
                match c.ext.mkdir(img, &c.attrs(meta, perm)) {
                    Ok(i) => {
                        c.finish(img, Ok((Kind::Dir, 0)));
                        i.ino
                    }
                    Err(e) => return c.finish(img, Err(e)),
                }
            }
        };
        if c.a.preserve {
            self.dir_times
                .push((ino, img.to_vec(), c.attrs(meta, None)));
        }
        let mut entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(host) {
            Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
            Err(e) => {
                say(format_args!("{}: {e}", host.display()));
                c.tally.lock().unwrap_or_else(|e| e.into_inner()).failed += 1;
                return;
            }
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if c.stopped() {
                return;
            }
            let path = e.path();
            let target = join(img, e.file_name().as_bytes());
            let m = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(err) => {
                    say(format_args!("{}: {err}", path.display()));
                    c.tally.lock().unwrap_or_else(|e| e.into_inner()).failed += 1;
                    continue;
                }
            };
            if c.image_id == Some((m.dev(), m.ino())) {
                say(format_args!(
                    "{}: skipped: it is the image being written",
                    path.display()
                ));
                c.tally.lock().unwrap_or_else(|e| e.into_inner()).failed += 1;
                continue;
            }
            self.entry(&path, &m, &target);
        }
    }

    fn entry(&mut self, host: &std::path::Path, m: &std::fs::Metadata, img: &[u8]) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let c = self.c;
        let ft = m.file_type();
        if ft.is_dir() {
            return self.dir(host, m, img);
        }
        let perm = Some((m.mode() & 0o777) as u16);
        let key = (m.dev(), m.ino());
        if m.nlink() > 1 {
            // A second name of an inode already copied: a hard link.
            if let Some(first) = self.links.get(&key) {
                c.remove_existing(img);
                let r = c.ext.link(first, img).map(|_| (Kind::HardLink, 0));
                return c.finish(img, r);
            }
        }
        let r = if ft.is_file() {
            let job = FileJob {
                host: host.to_path_buf(),
                img: img.to_vec(),
                size: m.len(),
                attrs: c.attrs(m, perm),
            };
            if m.nlink() == 1 {
                // Nothing waits for it: a worker copies it, a small one in a
                // group with others.
                if job.size <= SMALL_FILE {
                    self.group_bytes += job.size;
                    self.group.push(job);
                    if self.group.len() >= GROUP_FILES || self.group_bytes >= GROUP_BYTES {
                        self.send_group();
                    }
                } else {
                    let _ = self.jobs.send(Job::One(job));
                }
                return;
            }
            // Its later names link to it: copied here, before them.
            c.file(&job, &mut Vec::new()).map(|n| (Kind::File, n))
        } else if ft.is_symlink() {
            match std::fs::read_link(host) {
                Ok(target) => {
                    c.remove_existing(img);
                    c.ext
                        .symlink(target.as_os_str().as_bytes(), img, &c.attrs(m, None))
                        .map(|_| (Kind::Symlink, 0))
                }
                Err(e) => Err(Error::os("read the symlink", e)),
            }
        } else {
            let kind = if ft.is_fifo() {
                FileType::Fifo
            } else if ft.is_socket() {
                FileType::Socket
            } else if ft.is_char_device() {
                FileType::CharDevice
            } else {
                FileType::BlockDevice
            };
            let rdev = m.rdev() as libc::dev_t;
            c.remove_existing(img);
            c.ext
                .mknod(
                    img,
                    kind,
                    libc::major(rdev),
                    libc::minor(rdev),
                    &c.attrs(m, perm),
                )
                .map(|_| (Kind::Special, 0))
        };
        if r.is_ok() && m.nlink() > 1 {
            self.links.insert(key, img.to_vec());
        }
        c.finish(img, r);
    }
}
