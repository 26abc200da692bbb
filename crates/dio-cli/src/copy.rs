//! `dio cat` and `dio cp`: what the two ends are, how they open, and what happens
//! to DST when a copy ends. The bytes move through the one pipeline in
//! `pipeline.rs`.
//!
//! An end is `-` (stdin or stdout), a plain stream (a pipe, FIFO, socket or
//! character device: plain I/O, no O_DIRECT), or a location: a host file or block
//! device, an NBD export, or a file inside an ext image on either.
//!
//! DST never claims bytes that were not copied: on an error or a signal, a host-file
//! DST is cut to the copied prefix and made durable, a device, export or image file
//! reports how far it got; success means durable (fdatasync / flush).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use dio::ext::ExtFile;
use dio::DirectFile;
use dio::{RawFile, RawOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::fail::{print_notes, say, Failure};
use crate::location::{counted, Counter, Image, Location, Opened, Source};
use crate::pipeline::{self, Input, Job, Names, Output, Progress, Runs, Stop};
use crate::size::{human, parse_size};
use crate::Engine;

/// Most bytes of buffers a copy may hold (keeps peak RSS far below 64 MiB).
const MAX_BUFFERED: u64 = 32 << 20;

/// `--bs`: 512 bytes to 16 MiB (a usage error otherwise).
fn parse_bs(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if !(512..=16 << 20).contains(&v) {
        return Err(format!("`{s}`: --bs must be between 512 bytes and 16 MiB"));
    }
    Ok(v)
}

/// Pipeline settings shared by `cat` and `cp`.
#[derive(Args, Debug)]
pub struct PipeArgs {
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Requests in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub qd: u32,
    /// Bytes per request (K/M suffixes; 512 bytes to 16 MiB).
    #[arg(long, default_value = "1M", value_parser = parse_bs)]
    pub bs: u64,
    /// Show the progress bar even when stderr is not a terminal (then only the final
    /// line: bytes, time, rate), and keep that final line.
    #[arg(long, overrides_with = "no_progress")]
    pub progress: bool,
    /// Never show progress.
    #[arg(long)]
    pub no_progress: bool,
    /// After the copy, print the source device's request counts to stderr:
    /// requests and bytes, flushes, errors, most in flight, latency percentiles,
    /// and the engine's merges and splits (for IMAGE:/PATH, the image's metadata
    /// reads count too). Not with cp -r or into an image.
    #[arg(long)]
    pub stats: bool,
}

impl PipeArgs {
    fn check(&self) -> Result<(), Failure> {
        if self.bs * u64::from(self.qd) > MAX_BUFFERED {
            return Err(Failure::usage(format!(
                "--bs x --qd must stay within {} MiB of buffers",
                MAX_BUFFERED >> 20
            )));
        }
        Ok(())
    }
}

/// `--sparse`, as GNU cp spells it.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparse {
    /// Holes of SRC and runs of zero blocks become holes in a file DST.
    Auto,
    /// The same as auto.
    Always,
    /// Write every byte, zeros too.
    Never,
}

/// Open through dio, printing the back end's notes. dio's open errors name the path
/// already.
pub fn open(path: &Path, opts: &RawOptions) -> Result<RawFile, Failure> {
    if path.is_dir() {
        return Err(Failure::at(path, "is a directory"));
    }
    if opts.write {
        if let Some(holder) = dio::probe::in_use(path) {
            return Err(Failure::msg(format!(
                "refusing to write: {holder} (writing under a mounted file system corrupts \
                 it; unmount it first)"
            )));
        }
    }
    let raw = RawFile::open(path, opts).map_err(|e| Failure::msg(e.to_string()))?;
    print_notes(raw.notes());
    Ok(raw)
}

/// One end of a copy, as the user named it.
enum End {
    /// `-`: stdin or stdout.
    Stdio,
    /// A pipe, FIFO, socket or character device: plain I/O.
    Plain(PathBuf),
    /// A host file or device, an export, or a file inside an image.
    Loc(Location),
}

impl End {
    fn parse(arg: &OsStr) -> Result<End, Failure> {
        if arg == "-" {
            return Ok(End::Stdio);
        }
        let loc = Location::parse(arg)?;
        if let (Source::Host(p), None) = (&loc.source, &loc.inner) {
            if let Ok(m) = std::fs::metadata(p) {
                let t = m.file_type();
                if t.is_fifo() || t.is_char_device() || t.is_socket() {
                    let what = if t.is_char_device() {
                        "a character device"
                    } else if t.is_fifo() {
                        "a pipe or FIFO"
                    } else {
                        "a socket"
                    };
                    say(format_args!(
                        "note: {} is {what}, which cannot do direct I/O: plain I/O for it",
                        p.display()
                    ));
                    return Ok(End::Plain(p.clone()));
                }
            }
        }
        Ok(End::Loc(loc))
    }

    fn name(&self, stdio: &str) -> String {
        match self {
            End::Stdio => stdio.to_string(),
            End::Plain(p) => p.display().to_string(),
            End::Loc(l) => l.display(),
        }
    }
}

/// An opened source, holding what its input borrows.
enum Held {
    Stream(Box<dyn Read>),
    Image {
        _img: Box<Image>,
        file: ExtFile,
        runs: Vec<(u64, u64)>,
    },
    Whole(Opened),
}

impl Held {
    /// Open a source; with `stats`, its device requests are counted (the one
    /// place `--stats` hooks in: raw files, block devices, exports and images
    /// are all opened here), and the counter is returned.
    fn open(
        end: &End,
        engine: Engine,
        stats: bool,
    ) -> Result<(Held, Option<Arc<Counter>>), Failure> {
        let open = |loc: &Location| -> Result<(Opened, Option<Arc<Counter>>), Failure> {
            let o = loc.source.open(false, false, engine)?;
            if stats {
                let (o, c) = counted(o)?;
                Ok((o, Some(c)))
            } else {
                Ok((o, None))
            }
        };
        let (held, counter) = match end {
            End::Stdio => (Held::Stream(Box::new(io::stdin())), None),
            End::Plain(p) => (
                Held::Stream(Box::new(File::open(p).map_err(|e| Failure::at(p, e))?)),
                None,
            ),
            End::Loc(loc) if loc.inner.is_some() => {
                let (o, c) = open(loc)?;
                let img = Image::open_on(loc, o, false, true)?;
                let file = img.file(loc)?;
                let runs = image_runs(&img, &file)?;
                let held = Held::Image {
                    _img: Box::new(img),
                    file,
                    runs,
                };
                (held, c)
            }
            End::Loc(loc) => {
                let (o, c) = open(loc)?;
                (Held::Whole(o), c)
            }
        };
        if stats && counter.is_none() {
            say(format_args!(
                "note: --stats: {} is not read through dio (no device to count)",
                end.name("stdin")
            ));
        }
        Ok((held, counter))
    }

    fn size(&self) -> Option<u64> {
        match self {
            Held::Stream(_) => None,
            Held::Image { file, .. } => Some(file.size()),
            Held::Whole(o) => Some(o.size()),
        }
    }

    fn direct(&self) -> Option<&DirectFile> {
        match self {
            Held::Stream(_) => None,
            Held::Image { file, .. } => file.direct(),
            Held::Whole(o) => Some(o.direct()),
        }
    }

    fn input(&mut self) -> Input<'_> {
        match self {
            Held::Stream(r) => Input::Stream(r.as_mut()),
            Held::Image { file, .. } => match file.direct() {
                Some(d) => Input::Direct(d),
                None => Input::Memory(file),
            },
            Held::Whole(o) => Input::Direct(o.direct()),
        }
    }

    /// The data runs within `[0, size)`: SEEK_DATA of a host file, written extents
    /// of an image file, block status of an export, else everything.
    fn data_runs(&self, size: u64) -> Result<Runs<'_>, Failure> {
        Ok(match self {
            Held::Stream(_) => Box::new(std::iter::empty()),
            Held::Image { runs, .. } => Box::new(runs.clone().into_iter().map(Ok)),
            Held::Whole(o) => {
                print_notes(o.notes());
                Box::new(o.data_runs(size).map(|r| r.map_err(io::Error::from)))
            }
        })
    }
}

fn whole<'a>(start: u64, end: u64) -> Runs<'a> {
    Box::new(std::iter::once(Ok((start, end))).filter(|r| matches!(r, Ok((s, e)) if s < e)))
}

/// Data runs of an image file: its written extents (holes and unwritten extents
/// are skipped), or the whole file when its data is inline.
pub(crate) fn image_runs(img: &Image, file: &ExtFile) -> Result<Vec<(u64, u64)>, Failure> {
    let bs = u64::from(img.ext.block_size());
    let size = file.size();
    if file.direct().is_none() {
        return Ok(vec![(0, size)]);
    }
    let extents = img
        .ext
        .extents(&img.inode)
        .map_err(|e| Failure::msg(e.to_string()))?;
    Ok(extents
        .iter()
        .filter(|e| !e.unwritten)
        .map(|e| (e.logical * bs, ((e.logical + e.len) * bs).min(size)))
        .filter(|(s, e)| s < e)
        .collect())
}

/// How progress shows.
#[derive(Clone, Copy)]
struct Shown {
    bar: bool,
    final_line: bool,
}

fn shown(args: &PipeArgs) -> Shown {
    let tty = io::stderr().is_terminal();
    if args.no_progress && !args.progress {
        return Shown {
            bar: false,
            final_line: false,
        };
    }
    Shown {
        bar: tty,
        final_line: args.progress,
    }
}

fn progress_bar(total: Option<u64>, show: Shown) -> ProgressBar {
    if !show.bar {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::no_length(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{bytes:>10}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The final line: bytes, time, rate.
fn final_line(p: &Progress) {
    let secs = p.started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        human((p.moved as f64 / secs) as u64)
    } else {
        "-".to_string()
    };
    say(format_args!(
        "{} bytes ({}) in {secs:.3} s, {rate}/s",
        p.moved,
        human(p.moved)
    ));
}

fn align_of(files: &[Option<&DirectFile>]) -> usize {
    files
        .iter()
        .flatten()
        .map(|f| f.geometry().buffer_align())
        .max()
        .unwrap_or(512)
        .max(4096)
}

fn stdout_failure(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::BrokenPipe
    } else {
        Failure::msg(format!("stdout: {e}"))
    }
}

/// `--stats`: what the source's device was asked, on stderr, after the copy
/// (also after a failed one: what was done until then).
fn print_stats(src: &str, counter: &Counter, file: Option<&DirectFile>) {
    let s = counter.stats();
    let mut text = format!("stats: {src}\n");
    for line in s.to_string().lines() {
        text += &format!("  device  {line}\n");
    }
    if let Some(f) = file {
        let e = f.stats();
        text += &format!("  engine  {} merges, {} splits\n", e.merges(), e.splits());
    }
    let _ = write!(io::stderr().lock(), "dio: {text}");
}

/// The byte range `--offset`/`--length` selects in a file of `size` bytes.
pub fn range(size: u64, offset: Option<u64>, length: Option<u64>) -> (u64, u64) {
    let start = offset.unwrap_or(0).min(size);
    let end = match length {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    (start, end)
}

/// `dio cat LOCATION [--offset N] [--length N]`.
pub fn cat(
    arg: &OsStr,
    offset: Option<u64>,
    length: Option<u64>,
    args: &PipeArgs,
) -> Result<(), Failure> {
    args.check()?;
    let end = End::parse(arg)?;
    refuse_shared_ends(&end, &End::Stdio, args.engine)?;
    let src_name = end.name("stdin");
    let (mut held, counter) = Held::open(&end, args.engine, args.stats)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let show = shown(args);
    let align = align_of(&[held.direct()]);
    let (runs, size, mut skip_reader);
    let input = match &mut held {
        Held::Stream(r) => {
            // Skip `offset` bytes, then take at most `length`.
            let r: &mut dyn Read = r.as_mut();
            if let Some(off) = offset {
                let got = io::copy(&mut r.take(off), &mut io::sink())
                    .map_err(|e| Failure::msg(format!("{src_name}: {e}")))?;
                if got < off {
                    return Ok(());
                }
            }
            skip_reader = r.take(length.unwrap_or(u64::MAX));
            runs = whole(0, 0);
            size = None;
            Input::Stream(&mut skip_reader)
        }
        h => {
            let total = h.size().unwrap_or(0);
            let (start, stop) = range(total, offset, length);
            runs = whole(start, stop);
            size = Some(stop);
            h.input()
        }
    };
    let bar = progress_bar(size, show);
    let job = Job {
        runs,
        size,
        skip_zeros: false,
        bs: args.bs,
        qd: args.qd as usize,
        align,
        block: 512,
    };
    let names = Names {
        src: &src_name,
        dst: "stdout",
    };
    let result = pipeline::run(
        input,
        Output::Stream(&mut out),
        job,
        &names,
        &Stop::never(),
        &bar,
    );
    bar.finish_and_clear();
    if let Some(c) = &counter {
        print_stats(&src_name, c, held.direct());
    }
    let result = result.and_then(|p| match shrank(&end, held.size()) {
        Some(now) => Err((shrank_failure(&src_name, held.size(), now), p)),
        None => Ok(p),
    });
    match result {
        Ok(p) => {
            out.flush().map_err(stdout_failure)?;
            if show.final_line {
                final_line(&p);
            }
            Ok(())
        }
        Err((f, _)) => Err(f),
    }
}

/// The size of a host-file source that is now smaller than `size`, the size it
/// had when opened: the copy read past its new end, and those reads came back as
/// zeros (the size is sampled at open, as the kernel's i_size is for one call).
fn shrank(src: &End, size: Option<u64>) -> Option<u64> {
    let (End::Loc(loc), Some(size)) = (src, size) else {
        return None;
    };
    let (Source::Host(p), None) = (&loc.source, &loc.inner) else {
        return None;
    };
    let m = std::fs::metadata(p).ok()?;
    (m.is_file() && m.len() < size).then_some(m.len())
}

fn shrank_failure(src: &str, size: Option<u64>, now: u64) -> Failure {
    Failure::msg(format!(
        "{src} shrank while it was copied, from {} to {now} bytes: the bytes past its new end are not what it held",
        size.unwrap_or(0)
    ))
}

/// Where `cp` writes: DST, or DST/NAME for a directory (NAME: SRC's last
/// component).
fn destination(src: &End, dst: End) -> Result<End, Failure> {
    let End::Loc(mut loc) = dst else {
        return Ok(dst);
    };
    if let (Source::Host(p), None) = (&loc.source, &loc.inner) {
        if p.is_dir() {
            let name = match src {
                End::Stdio => None,
                End::Plain(p) => p.file_name().map(OsStr::to_os_string),
                End::Loc(l) => l.file_name(),
            }
            .ok_or_else(|| {
                Failure::msg(format!(
                    "{}: has no file name to copy into the directory {}",
                    src.name("stdin"),
                    p.display()
                ))
            })?;
            loc.source = Source::Host(p.join(name));
        }
    }
    Ok(End::Loc(loc))
}

/// Refuse (exit 1, nothing touched) when the two ends share storage, also when an
/// end is `-` and the shell redirected stdin or stdout to a file or device
/// (`dio cp - f < f` would truncate its own source; `dio cat f >> f` would
/// never end).
fn refuse_shared_ends(src: &End, dst: &End, engine: Engine) -> Result<(), Failure> {
    let loc = |end: &End, fd: u8, stdio: &str| match end {
        End::Loc(l) => Some((l.clone(), l.display())),
        End::Stdio => crate::storage::stdio_location(fd).map(|l| (l, stdio.to_string())),
        End::Plain(_) => None,
    };
    if let (Some((s, sn)), Some((d, dn))) = (loc(src, 0, "stdin"), loc(dst, 1, "stdout")) {
        crate::storage::refuse_shared_as((&s, &sn), (&d, &dn), "copy", engine)?;
    }
    Ok(())
}

/// What DST is, once open; decides what a failure leaves behind.
enum Dst {
    Stream(Box<dyn Write>),
    /// A host file (`is_file`), block device or export as a whole.
    Whole {
        out: Opened,
        is_file: bool,
        /// A new host file, unnamed until it is done (see [`Unnamed`]).
        unnamed: Option<Unnamed>,
    },
    /// A file inside an image, overwritten in place.
    Image {
        img: Box<Image>,
        file: ExtFile,
    },
}

/// `dio cp SRC DST`.
pub fn cp(
    src_arg: &OsStr,
    dst_arg: &OsStr,
    sparse: Sparse,
    args: &PipeArgs,
) -> Result<(), Failure> {
    args.check()?;
    let src_end = End::parse(src_arg)?;
    let dst_end = destination(&src_end, End::parse(dst_arg)?)?;
    refuse_shared_ends(&src_end, &dst_end, args.engine)?;
    let (src_name, dst_name) = (src_end.name("stdin"), dst_end.name("stdout"));
    let stop = Stop::on_signals();
    let (mut held, counter) = Held::open(&src_end, args.engine, args.stats)?;
    let mut size = held.size();
    // A stream into an image file: spool it (at most one byte more than fits),
    // so the whole range is checked before anything is written.
    let mut spooled: Option<Vec<u8>> = None;

    let mut dst = match &dst_end {
        End::Stdio => Dst::Stream(Box::new(io::stdout())),
        End::Plain(p) => Dst::Stream(Box::new(
            File::options()
                .write(true)
                .open(p)
                .map_err(|e| Failure::at(p, e))?,
        )),
        End::Loc(loc) if loc.inner.is_some() => {
            let img = Image::open(loc, true, true, args.engine)?;
            let file = img.file(loc)?;
            if let Held::Stream(r) = &mut held {
                let mut data = Vec::new();
                r.take(file.size().saturating_add(1))
                    .read_to_end(&mut data)
                    .map_err(|e| Failure::msg(format!("{src_name}: {e}")))?;
                size = Some(data.len() as u64);
                spooled = Some(data);
            }
            let n = size.unwrap_or(0);
            file.check_write(0, n).map_err(|e| loc.fail(e))?;
            if n < file.size() {
                say(format_args!(
                    "note: {src_name} is {n} bytes, {dst_name} is {}: the bytes past {n} are unchanged",
                    file.size()
                ));
            }
            Dst::Image {
                img: Box::new(img),
                file,
            }
        }
        End::Loc(loc) => {
            let (out, unnamed) = match open_unnamed(loc, args.engine) {
                Some((out, u)) => (out, Some(u)),
                None => (loc.source.open(true, true, args.engine)?, None),
            };
            let is_file = out.resizable();
            if !is_file {
                if let Some(n) = size {
                    if out.size() < n {
                        return Err(loc.fail(format!(
                            "holds {} bytes, less than the {n} to copy",
                            out.size()
                        )));
                    }
                }
            }
            Dst::Whole {
                out,
                is_file,
                unnamed,
            }
        }
    };

    let show = shown(args);
    let bar = progress_bar(size, show);
    let align = align_of(&[
        held.direct(),
        match &dst {
            Dst::Whole { out, .. } => Some(out.direct()),
            Dst::Image { file, .. } => file.direct(),
            Dst::Stream(_) => None,
        },
    ]);
    let names = Names {
        src: &src_name,
        dst: &dst_name,
    };
    let qd = args.qd as usize;
    let n = size.unwrap_or(0);
    let keep_holes = sparse != Sparse::Never;

    let result = match &mut dst {
        Dst::Stream(w) => {
            let runs = whole(0, n);
            let job = Job {
                runs,
                size,
                skip_zeros: false,
                bs: args.bs,
                qd,
                align,
                block: 512,
            };
            pipeline::run(
                held.input(),
                Output::Stream(w.as_mut()),
                job,
                &names,
                &stop,
                &bar,
            )
        }
        Dst::Image { file, .. } => {
            // Holes of the source land as zeros: the whole range.
            let job = Job {
                runs: whole(0, n),
                size,
                skip_zeros: false,
                bs: args.bs,
                qd,
                align,
                block: 512,
            };
            let input = match &spooled {
                Some(b) => Input::Bytes(b),
                None => held.input(),
            };
            pipeline::run(input, Output::Ext(file), job, &names, &stop, &bar)
        }
        Dst::Whole { out, is_file, .. } => {
            let block = u64::from(out.direct().geometry().logical_block).max(512);
            let set_len = |len: u64| {
                out.set_len(len)
                    .map_err(|e| Failure::msg(format!("{dst_name}: {e}")))
            };
            if *is_file {
                // Empty first, so that DST's old data never shows through SRC's
                // holes; then the padded size, so that no write extends the file.
                set_len(0)?;
                if let Some(n) = size {
                    set_len(n.div_ceil(block) * block)?;
                }
            }
            let runs = if *is_file && keep_holes {
                held_runs(&held, n)?
            } else {
                whole(0, n)
            };
            let job = Job {
                runs,
                size,
                skip_zeros: *is_file && keep_holes,
                bs: args.bs,
                qd,
                align,
                block,
            };
            let output = Output::Direct {
                file: out.direct(),
                grow: if *is_file && size.is_none() {
                    Some(&**out)
                } else {
                    None
                },
                limit: (!*is_file).then_some(out.size()),
            };
            // The runs were collected above, so the source can lend its input.
            let input = held.input();
            pipeline::run(input, output, job, &names, &stop, &bar)
        }
    };
    bar.finish_and_clear();
    if let Some(c) = &counter {
        print_stats(&src_name, c, held.direct());
    }
    // What was copied below SRC's new end is SRC's; past it, zeros it never held.
    let result = result.and_then(|mut p| match shrank(&src_end, size) {
        Some(now) => {
            p.prefix = p.prefix.min(now);
            Err((shrank_failure(&src_name, size, now), p))
        }
        None => Ok(p),
    });
    match result {
        Ok(p) => {
            finish(&mut dst, p.total.unwrap_or(0), &dst_name)?;
            if show.final_line {
                final_line(&p);
            }
            Ok(())
        }
        Err((f, p)) => Err(f.with_note(&left_behind(&mut dst, &p, &dst_name))),
    }
}

/// A new host file DST is made unnamed in its directory (`O_TMPFILE`) and named
/// only once it holds what it will hold (see [`Unnamed`]): a copy killed where it
/// cannot clean up (SIGKILL, a crash) leaves no DST claiming bytes it never got.
/// None where DST exists or is not a host path, or where the file system cannot
/// (DST is then created by name).
fn open_unnamed(loc: &Location, engine: Engine) -> Option<(Opened, Unnamed)> {
    let Source::Host(path) = &loc.source else {
        return None;
    };
    if loc.inner.is_some() || path.symlink_metadata().is_ok() {
        return None;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let opts = RawOptions {
        write: true,
        unnamed: true,
        backend: engine.backend(),
        ..RawOptions::default()
    };
    let raw = RawFile::open(dir, &opts).ok()?;
    let fd = raw.fd().try_clone_to_owned().ok()?;
    print_notes(raw.notes());
    Some((
        Box::new(raw),
        Unnamed {
            fd,
            path: path.clone(),
        },
    ))
}

/// An unnamed DST file and the name it takes when done.
struct Unnamed {
    fd: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Unnamed {
    /// Give the file its name (EEXIST if something took it meanwhile) and make
    /// the name durable: its directory is synced.
    fn link(&self) -> io::Result<()> {
        use rustix::fs::{linkat, AtFlags, CWD};
        use std::os::fd::AsRawFd;
        let proc = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        match linkat(CWD, proc.as_str(), CWD, &self.path, AtFlags::SYMLINK_FOLLOW) {
            // No /proc: the same by the descriptor (needs CAP_DAC_READ_SEARCH).
            Err(rustix::io::Errno::NOENT) => {
                linkat(&self.fd, "", CWD, &self.path, AtFlags::EMPTY_PATH)?
            }
            r => r?,
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

fn held_runs(held: &Held, n: u64) -> Result<Runs<'static>, Failure> {
    // The runs are collected so that the source can be borrowed mutably for its
    // input afterwards; SEEK_DATA is asked lazily for host files up to here.
    let runs: Vec<_> = held
        .data_runs(n)?
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::msg(format!("reading the data map of the source: {e}")))?;
    Ok(Box::new(runs.into_iter().map(Ok)))
}

/// Success: DST at its exact size and durable.
fn finish(dst: &mut Dst, total: u64, name: &str) -> Result<(), Failure> {
    let fail = |e: dio::Error| Failure::msg(format!("{name}: {e}"));
    match dst {
        Dst::Stream(w) => w.flush().map_err(stdout_failure),
        Dst::Whole {
            out,
            is_file,
            unnamed,
        } => {
            if *is_file {
                out.set_len(total).map_err(fail)?;
            }
            out.direct().sync_data().map_err(fail)?;
            match unnamed {
                Some(u) => u
                    .link()
                    .map_err(|e| Failure::msg(format!("{name}: giving the copy its name: {e}"))),
                None => Ok(()),
            }
        }
        Dst::Image { img, file } => {
            file.touch().map_err(fail)?;
            img.sync().map_err(fail)
        }
    }
}

/// After a failure: cut a host-file DST to the copied prefix and make it durable;
/// say what DST holds.
fn left_behind(dst: &mut Dst, p: &Progress, name: &str) -> String {
    let of = match p.total {
        Some(t) => format!("{} of {t} bytes", p.prefix),
        None => format!("{} bytes (of a stream that did not end)", p.prefix),
    };
    match dst {
        Dst::Stream(w) => {
            let _ = w.flush();
            format!("{name} got the first {of}")
        }
        Dst::Whole {
            out,
            is_file: true,
            unnamed,
        } => {
            let cut = out.set_len(p.prefix);
            let synced = out.direct().sync_data();
            match (cut, synced) {
                (Err(e), _) | (_, Err(e)) => {
                    format!("{name} could not be cut to the {of} copied: {e}")
                }
                // A new DST takes its name now, with the copied prefix.
                _ => match unnamed.as_ref().map(Unnamed::link) {
                    Some(Err(e)) => format!("{name} was not created ({e}): nothing is left"),
                    _ => format!("{name} holds the first {of}"),
                },
            }
        }
        Dst::Whole {
            out,
            is_file: false,
            ..
        } => {
            let _ = out.direct().sync_data();
            format!("{name} holds the first {of}; past that it holds what it held before")
        }
        Dst::Image { img, file } => {
            let _ = file.touch();
            let _ = img.sync();
            format!(
                "{name}: its first {of} were overwritten; past that it holds what it held before"
            )
        }
    }
}
