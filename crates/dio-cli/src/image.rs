//! `dio cat` and `dio cp` where a side is not a plain whole host file: a file inside
//! an ext image (`IMAGE:/PATH`), an NBD export, or a byte range (`cat --offset
//! --length`). Reads run as a pipeline of `--qd` byte-granular requests
//! (`Flags::UNALIGNED`, chunks aligned to `--bs` in the file so only the ends
//! bounce); writes into an image overwrite in place after the whole range was
//! checked (no allocation, no growth).

use std::collections::VecDeque;
use std::io::Write;

use dio::fs::ext::ExtFile;
use dio::nbd_file::NbdFile;
use dio::{AlignedBuf, DioFuture, DirectFile, Flags};

use crate::copy::PipeArgs;
use crate::fail::Failure;
use crate::location::{Image, Location, Opened};

/// Most bytes of buffers in flight.
const MAX_BUFFERED: u64 = 32 << 20;

fn check(args: &PipeArgs) -> Result<(), Failure> {
    if args.bs < 512 || args.bs > 16 << 20 {
        return Err(Failure::msg("--bs must be between 512 bytes and 16 MiB"));
    }
    if args.bs * u64::from(args.qd) > MAX_BUFFERED {
        return Err(Failure::msg(format!(
            "--bs x --qd must stay within {} MiB of buffers",
            MAX_BUFFERED >> 20
        )));
    }
    Ok(())
}

/// What a read comes from: a file through the engine, or bytes in memory
/// (inline data).
pub enum Reader<'a> {
    Engine(&'a DirectFile),
    Memory(&'a ExtFile),
}

/// Receives the bytes read, in order, with their offset.
pub type Sink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), Failure> + 'a;

/// Read `[start, end)` and hand each piece, in order, to `sink(offset, bytes)`.
pub fn pump(
    what: &Location,
    from: &Reader<'_>,
    start: u64,
    end: u64,
    args: &PipeArgs,
    sink: &mut Sink<'_>,
) -> Result<(), Failure> {
    check(args)?;
    let file = match from {
        Reader::Engine(f) => *f,
        Reader::Memory(f) => {
            let mut pos = start;
            let mut buf = vec![0u8; (end - start).min(args.bs) as usize];
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                let got = f.read_at(pos, &mut buf[..n]).map_err(|e| what.fail(e))?;
                if got != n {
                    return Err(what.fail(format!("short read at offset {pos}")));
                }
                sink(pos, &buf[..n])?;
                pos += n as u64;
            }
            return Ok(());
        }
    };
    let bs = args.bs;
    let align = file.geometry().mem_align.max(512) as usize;
    let mut inflight: VecDeque<(u64, usize, DioFuture<AlignedBuf>)> = VecDeque::new();
    // Full-size buffers are recycled: a fresh 1 MiB allocation per request costs
    // page faults and zeroing, and grows the heap (RSS) as they come and go.
    let mut free: Vec<AlignedBuf> = Vec::new();
    let mut pos = start;
    let result = (|| {
        loop {
            while inflight.len() < args.qd as usize && pos < end {
                // Chunks end at multiples of --bs, so only the first and last are
                // unaligned in the file.
                let next = ((pos / bs + 1) * bs).min(end);
                let len = (next - pos) as usize;
                let buf = match free.pop() {
                    Some(b) if b.len() == len => b,
                    _ => AlignedBuf::new(len, align),
                };
                let fut = file.read_future(pos, vec![buf], Flags::UNALIGNED);
                inflight.push_back((pos, len, fut));
                pos = next;
            }
            let Some((off, len, fut)) = inflight.pop_front() else {
                return Ok(());
            };
            let mut done = fut.wait();
            match done.result {
                Ok(n) if n == len => {}
                Ok(n) => {
                    return Err(what.fail(format!(
                        "short read at offset {off}: {n} of {len} bytes (did it change size?)"
                    )))
                }
                Err(e) => return Err(what.fail(format!("read at offset {off}: {e}"))),
            }
            let buf = done.bufs.pop().expect("one buffer per request");
            sink(off, &buf[..len])?;
            if buf.len() as u64 == bs {
                free.push(buf);
            }
        }
    })();
    // On an error, let the requests in flight finish before their buffers go.
    for (_, _, fut) in inflight {
        fut.wait();
    }
    result
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

fn stdout_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Failure::BrokenPipe
    } else {
        Failure::msg(format!("stdout: {e}"))
    }
}

/// `dio cat LOCATION [--offset N] [--length N]`.
pub fn cat(
    loc: &Location,
    offset: Option<u64>,
    length: Option<u64>,
    args: &PipeArgs,
) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let mut sink = |_: u64, b: &[u8]| out.write_all(b).map_err(stdout_failure);
    if loc.inner.is_some() {
        let img = Image::open(loc, false, true, args.engine)?;
        let file = img.file(loc)?;
        let (start, end) = range(file.size(), offset, length);
        let reader = match file.direct() {
            Some(d) => Reader::Engine(d),
            None => Reader::Memory(&file),
        };
        pump(loc, &reader, start, end, args, &mut sink)?;
    } else {
        let src = loc.source.open(false, false, args.engine)?;
        let (start, end) = range(src.size, offset, length);
        pump(
            loc,
            &Reader::Engine(&src.direct),
            start,
            end,
            args,
            &mut sink,
        )?;
    }
    std::io::stdout().lock().flush().map_err(stdout_failure)
}

/// Data runs of a source to copy: the written extents of an image file (holes and
/// unwritten extents are skipped), or the whole range.
fn image_runs(img: &Image, file: &ExtFile) -> Result<Vec<(u64, u64)>, Failure> {
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

/// Data runs of an NBD export: what its block status (`base:allocation`) does not
/// report as zeros, as nbdcopy skips them. Without block status, the whole export.
fn nbd_runs(nbd: &NbdFile) -> Result<Vec<(u64, u64)>, Failure> {
    crate::fail::print_notes(nbd.notes());
    let extents = nbd
        .extents(0, nbd.size())
        .map_err(|e| Failure::msg(e.to_string()))?;
    Ok(extents
        .iter()
        .filter(|e| !e.zero)
        .map(|e| (e.offset, e.offset + e.len))
        .collect())
}

/// `dio cp SRC DST` where either side is an image path or an NBD export.
pub fn cp(src: &Location, dst: &Location, args: &PipeArgs) -> Result<(), Failure> {
    // The source: an image file or a whole device source.
    let src_img;
    let src_file;
    let src_open: Opened;
    let (reader, size, runs) = if src.inner.is_some() {
        src_img = Image::open(src, false, true, args.engine)?;
        src_file = src_img.file(src)?;
        let runs = image_runs(&src_img, &src_file)?;
        let reader = match src_file.direct() {
            Some(d) => Reader::Engine(d),
            None => Reader::Memory(&src_file),
        };
        (reader, src_file.size(), runs)
    } else {
        src_open = src.source.open(false, false, args.engine)?;
        let runs = match &src_open.nbd {
            Some(nbd) => nbd_runs(nbd)?,
            None => vec![(0, src_open.size)],
        };
        (Reader::Engine(&src_open.direct), src_open.size, runs)
    };
    if dst.inner.is_some() {
        // Overwrite in place: check the whole range first, so a refusal writes
        // nothing.
        let img = Image::open(dst, true, true, args.engine)?;
        let file = img.file(dst)?;
        file.check_write(0, size).map_err(|e| dst.fail(e))?;
        if size < file.size() {
            crate::fail::say(format!(
                "note: {} is {size} bytes, {} is {}: the bytes past {size} are unchanged",
                src.display(),
                dst.display(),
                file.size()
            ));
        }
        // Holes of the source must land as zeros: copy the whole range.
        pump(src, &reader, 0, size, args, &mut |off, b| {
            file.write_at(off, b).map(|_| ()).map_err(|e| dst.fail(e))
        })?;
        file.touch().map_err(|e| dst.fail(e))?;
        return Ok(());
    }
    // A host file, a block device or an NBD export as a whole.
    let mut dst = dst.clone();
    if let crate::location::Source::Host(p) = &dst.source {
        if p.is_dir() {
            let name = src
                .file_name()
                .ok_or_else(|| src.fail("has no file name to copy into a directory"))?;
            dst.source = crate::location::Source::Host(p.join(name));
        }
    }
    let out = dst.source.open(true, true, args.engine)?;
    let file = &out.direct;
    let is_file = out.raw.as_ref().is_some_and(|r| !r.is_block_device());
    let set_len = |len: u64| match &out.raw {
        Some(r) => r.set_len(len).map_err(|e| dst.fail(e)),
        None => Ok(()),
    };
    let runs = if is_file {
        set_len(0)?;
        runs
    } else {
        if out.size < size {
            return Err(dst.fail(format!(
                "holds {} bytes, less than the {size} to copy",
                out.size
            )));
        }
        vec![(0, size)]
    };
    for (s, e) in runs {
        pump(
            src,
            &reader,
            s,
            e,
            args,
            &mut |off, b| match file.write_at(off, b, Flags::UNALIGNED) {
                Ok(n) if n == b.len() => Ok(()),
                Ok(n) => Err(dst.fail(format!("short write at offset {off}: {n} bytes"))),
                Err(e) => Err(dst.fail(format!("write at offset {off}: {e}"))),
            },
        )?;
    }
    if is_file {
        set_len(size)?;
    }
    Ok(())
}
