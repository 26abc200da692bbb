//! `dio cat` and `dio cp`: a read pipeline at queue depth over the source's data
//! chunks, feeding stdout or direct writes to the destination. Memory is bounded:
//! at most `qd` buffers of `bs` bytes exist at once.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use clap::Args;
use dio::raw::{OpenOptions, RawFile};
use dio::{AlignedBuf, Completed, DioFuture, DirectFile, Flags};
use indicatif::{ProgressBar, ProgressStyle};

use crate::fail::{print_notes, Failure};
use crate::segments::{Chunk, Chunks, DataSegments};
use crate::size::parse_size;
use crate::Engine;

/// Most bytes of buffers a copy may hold (keeps peak RSS far below 64 MiB).
const MAX_BUFFERED: u64 = 32 << 20;

/// Pipeline settings shared by `cat` and `cp`.
#[derive(Args, Debug)]
pub struct PipeArgs {
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Requests in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub qd: u32,
    /// Bytes per request (K/M suffixes; a multiple of the device's logical block).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub bs: u64,
}

impl PipeArgs {
    fn check(&self) -> Result<(), Failure> {
        if self.bs == 0 || self.bs > 16 << 20 {
            return Err(Failure::msg("--bs must be between 512 bytes and 16 MiB"));
        }
        if self.bs * u64::from(self.qd) > MAX_BUFFERED {
            return Err(Failure::msg(format!(
                "--bs x --qd must stay within {} MiB of buffers",
                MAX_BUFFERED >> 20
            )));
        }
        Ok(())
    }
}

/// Open through dio, printing the back end's notes. dio's open errors name the path
/// already.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<RawFile, Failure> {
    if path.is_dir() {
        return Err(Failure::at(path, "is a directory"));
    }
    if opts.write {
        if let Some(holder) = dio::raw::in_use(path) {
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

/// Buffers of `bs` bytes, recycled; other lengths (a segment's last chunk) are made
/// as needed and dropped after use.
struct Pool {
    free: Vec<AlignedBuf>,
    bs: usize,
    align: usize,
}

impl Pool {
    fn new(bs: usize, align: usize) -> Self {
        Pool {
            free: Vec::new(),
            bs,
            align,
        }
    }
    fn take(&mut self, len: usize) -> AlignedBuf {
        if len == self.bs {
            if let Some(b) = self.free.pop() {
                return b;
            }
        }
        AlignedBuf::new(len, self.align)
    }
    fn give(&mut self, buf: AlignedBuf) {
        if buf.len() == self.bs {
            self.free.push(buf);
        }
    }
}

enum Stage {
    Read(DioFuture<AlignedBuf>),
    Write(DioFuture<AlignedBuf>),
}

/// Requests in flight, oldest first. Dropping it (an error path) waits for every
/// one, so nothing is left running when the files close.
struct InFlight(VecDeque<(Chunk, Stage)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for (_, stage) in self.0.drain(..) {
            match stage {
                Stage::Read(f) | Stage::Write(f) => {
                    f.wait();
                }
            }
        }
    }
}

/// The buffer of a completed request whose result must be `want` bytes.
fn finished(
    path: &Path,
    what: &str,
    chunk: &Chunk,
    want: usize,
    mut done: Completed<AlignedBuf>,
) -> Result<AlignedBuf, Failure> {
    match done.result {
        Ok(n) if n == want => Ok(done.bufs.pop().expect("one buffer per request")),
        Ok(n) => Err(Failure::at(
            path,
            format!(
                "short {what} at offset {}: {n} of {want} bytes (did the file change size?)",
                chunk.off
            ),
        )),
        Err(e) => Err(Failure::at(
            path,
            format!("{what} at offset {}: {e}", chunk.off),
        )),
    }
}

fn start_read(file: &DirectFile, pool: &mut Pool, c: &Chunk) -> Stage {
    Stage::Read(file.read_future(c.off, vec![pool.take(c.len)], Flags::NONE))
}

fn stdout_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Failure::BrokenPipe
    } else {
        Failure::msg(format!("stdout: {e}"))
    }
}

fn open_options(args: &PipeArgs) -> OpenOptions {
    OpenOptions {
        backend: args.engine.backend(),
        // cat and cp submit and reap on this thread only.
        single_thread: true,
        ..OpenOptions::default()
    }
}

fn block_and_align(files: &[&DirectFile], bs: u64) -> Result<(u64, usize), Failure> {
    let block = files
        .iter()
        .map(|f| u64::from(f.geometry().logical_block))
        .max()
        .unwrap_or(512);
    let align = files
        .iter()
        .map(|f| f.geometry().buffer_align())
        .max()
        .unwrap_or(512);
    if bs % block != 0 {
        return Err(Failure::msg(format!(
            "--bs {bs} is not a multiple of the device's logical block ({block} bytes)"
        )));
    }
    Ok((block, align))
}

/// `dio cat PATH`.
pub fn cat(path: &Path, args: &PipeArgs) -> Result<(), Failure> {
    args.check()?;
    let src = open(path, &open_options(args))?;
    let file = src.direct();
    let size = src.size();
    let (block, align) = block_and_align(&[file], args.bs)?;
    let mut chunks = Chunks::new(DataSegments::whole(size), block, args.bs, size);
    let mut pool = Pool::new(args.bs as usize, align);
    let mut inflight = InFlight(VecDeque::new());
    let mut out = std::io::stdout().lock();
    loop {
        while inflight.0.len() < args.qd as usize {
            let Some(c) = chunks.next() else { break };
            let c = c.map_err(|e| Failure::at(path, e))?;
            let stage = start_read(file, &mut pool, &c);
            inflight.0.push_back((c, stage));
        }
        let Some((c, Stage::Read(fut))) = inflight.0.pop_front() else {
            break;
        };
        let buf = finished(path, "read", &c, c.want, fut.wait())?;
        out.write_all(&buf[..c.want]).map_err(stdout_failure)?;
        pool.give(buf);
    }
    out.flush().map_err(stdout_failure)
}

/// Where `dio cp SRC DST` writes: DST itself, or DST/name-of-SRC for a directory.
fn destination(src: &Path, dst: &Path) -> Result<PathBuf, Failure> {
    if dst.is_dir() {
        let name = src
            .file_name()
            .ok_or_else(|| Failure::at(src, "has no file name to copy into a directory"))?;
        Ok(dst.join(name))
    } else {
        Ok(dst.to_path_buf())
    }
}

fn refuse_same_file(src: &Path, dst: &Path) -> Result<(), Failure> {
    let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) else {
        return Ok(());
    };
    let same_inode = a.dev() == b.dev() && a.ino() == b.ino();
    let same_device =
        a.file_type().is_block_device() && b.file_type().is_block_device() && a.rdev() == b.rdev();
    if same_inode || same_device {
        return Err(Failure::msg(format!(
            "{} and {} are the same file",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{bytes:>10}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `dio cp SRC DST`.
pub fn cp(src_path: &Path, dst_path: &Path, args: &PipeArgs) -> Result<(), Failure> {
    args.check()?;
    let dst_path = destination(src_path, dst_path)?;
    let dst_path = dst_path.as_path();
    refuse_same_file(src_path, dst_path)?;
    let src = open(src_path, &open_options(args))?;
    let dst = open(
        dst_path,
        &OpenOptions {
            write: true,
            create: true,
            ..open_options(args)
        },
    )?;
    let (sf, df) = (src.direct(), dst.direct());
    let size = src.size();
    let (block, align) = block_and_align(&[sf, df], args.bs)?;
    let to_device = dst.is_block_device();
    let set_len = |len: u64| dst.set_len(len).map_err(|e| Failure::at(dst_path, e));
    let segments = if to_device {
        if dst.size() < size {
            return Err(Failure::at(
                dst_path,
                format!(
                    "device holds {} bytes, less than the {size} to copy",
                    dst.size()
                ),
            ));
        }
        // A device keeps whatever it had where SRC has holes: write them as zeros.
        DataSegments::whole(size)
    } else {
        // Empty first, so that DST's old data never shows through SRC's holes; then
        // the padded size, so that the tail block's write does not extend the file.
        set_len(0)?;
        set_len(size.div_ceil(block) * block)?;
        DataSegments::of(src.fd(), size)
    };
    let mut chunks = Chunks::new(segments, block, args.bs, size);
    let mut pool = Pool::new(args.bs as usize, align);
    let mut inflight = InFlight(VecDeque::new());
    let bar = progress_bar(size);
    loop {
        while inflight.0.len() < args.qd as usize {
            let Some(c) = chunks.next() else { break };
            let c = c.map_err(|e| Failure::at(src_path, e))?;
            let stage = start_read(sf, &mut pool, &c);
            inflight.0.push_back((c, stage));
        }
        let Some((c, stage)) = inflight.0.pop_front() else {
            break;
        };
        match stage {
            Stage::Read(fut) => {
                let mut buf = finished(src_path, "read", &c, c.want, fut.wait())?;
                if c.want < c.len {
                    pad_tail(&mut buf, &c, df, to_device, block, align)
                        .map_err(|e| Failure::at(dst_path, e))?;
                }
                let fut = df.write_future(c.off, vec![buf], Flags::NONE);
                inflight.0.push_back((c, Stage::Write(fut)));
            }
            Stage::Write(fut) => {
                let buf = finished(dst_path, "write", &c, c.len, fut.wait())?;
                pool.give(buf);
                bar.set_position(c.off + c.want as u64);
            }
        }
    }
    if !to_device {
        set_len(size)?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Fill the bytes of the last block past SRC's end: zeros for a file (cut off by the
/// final `set_len`), the device's own bytes for a device (read, modify, write).
fn pad_tail(
    buf: &mut AlignedBuf,
    c: &Chunk,
    dst: &DirectFile,
    to_device: bool,
    block: u64,
    align: usize,
) -> dio::Result<()> {
    buf[c.want..].fill(0);
    if to_device {
        let block = block as usize;
        let tail = c.want / block * block;
        let mut old = AlignedBuf::new(block, align);
        dst.read_at(c.off + tail as u64, &mut old, Flags::NONE)?;
        let keep = c.want - tail;
        buf[c.want..tail + block].copy_from_slice(&old[keep..]);
    }
    Ok(())
}
