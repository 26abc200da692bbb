//! The one copy pipeline of `cat` and `cp`: up to `--qd` chunks of at most `--bs`
//! bytes in flight, read from an input (a file through the engine, an inline image
//! file, bytes in memory, or a plain stream such as a pipe) and written to an output
//! (a file through the engine, a file inside an image, or a plain stream).
//!
//! Chunks end at multiples of `--bs` in the file, so with `Flags::UNALIGNED` only
//! the ends of a run are unaligned. Memory is bounded: at most `qd` buffers of `bs`
//! bytes, recycled, plus copies of the non-zero parts of partly zero chunks.
//!
//! The pipeline tracks the *copied prefix*: the lowest offset whose chunk has not
//! been written yet (holes skipped in a sparse copy count as copied: the
//! destination reads zeros there). A caller that fails or is interrupted cuts a
//! host-file destination to that prefix, so it never claims bytes that were not
//! copied.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dio::ext::ExtFile;

use dio::Window;
use dio::{AlignedBuf, Completed, DioFuture, DirectFile, Flags};
use indicatif::ProgressBar;

use crate::fail::Failure;

/// Granularity of zero detection in a sparse copy: runs of zero blocks of this
/// size (aligned in the file) become holes.
pub const ZERO_BLOCK: u64 = 4096;

type Buf = Window<AlignedBuf>;

/// Data runs `[start, end)` of a source, in order.
pub type Runs<'a> = Box<dyn Iterator<Item = io::Result<(u64, u64)>> + 'a>;

/// Where bytes come from.
pub enum Input<'a> {
    /// A file through the engine (async reads).
    Direct(&'a DirectFile),
    /// A file of an image whose data lives in its inode (inline data).
    Memory(&'a ExtFile),
    /// Bytes already in memory (a spooled stream).
    Bytes(&'a [u8]),
    /// A stream read to its end (pipe, FIFO, character device): plain reads.
    Stream(&'a mut dyn Read),
}

/// Where bytes go.
pub enum Output<'a> {
    /// A file or device through the engine (async writes). `grow`: the host file
    /// to lengthen as a stream source's bytes arrive (size unknown up front);
    /// `limit`: the most bytes it may take (a device's or export's size).
    Direct {
        file: &'a DirectFile,
        grow: Option<&'a dyn dio::Source>,
        limit: Option<u64>,
    },
    /// A file inside an image, overwritten in place (checked by the caller).
    Ext(&'a ExtFile),
    /// A plain stream (stdout, a pipe, a FIFO, a character device).
    Stream(&'a mut dyn Write),
}

/// A signal that stops a pipeline between requests: SIGINT, SIGTERM and SIGHUP
/// are caught (a second one ends the process at once).
#[derive(Clone)]
pub struct Stop {
    signal: Arc<AtomicUsize>,
}

impl Stop {
    /// A stop that no signal fires.
    pub fn never() -> Stop {
        Stop {
            signal: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Catch SIGINT, SIGTERM and SIGHUP from now on.
    pub fn on_signals() -> Stop {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let stop = Stop::never();
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            // The first signal sets `armed` (below); the second finds it set and
            // exits with the signal's status without clean-up.
            let _ = signal_hook::flag::register_conditional_shutdown(
                sig,
                128 + sig,
                Arc::clone(&armed),
            );
            let _ = signal_hook::flag::register(sig, Arc::clone(&armed));
            let _ = signal_hook::flag::register_usize(sig, Arc::clone(&stop.signal), sig as usize);
        }
        stop
    }

    /// The signal that fired, if any.
    pub fn fired(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    fn check(&self) -> Result<(), Failure> {
        match self.fired() {
            None => Ok(()),
            Some(signal) => Err(Failure::Signal {
                signal,
                message: match signal {
                    libc::SIGINT => "interrupted".to_string(),
                    libc::SIGTERM => "terminated (SIGTERM)".to_string(),
                    s => format!("stopped by signal {s}"),
                },
            }),
        }
    }
}

/// What to move and how.
pub struct Job<'a> {
    /// The data runs to read, in order, within `[0, size)`. Ignored for a stream
    /// input.
    pub runs: Runs<'a>,
    /// Bytes of the source; `None` for a stream (read to its end).
    pub size: Option<u64>,
    /// Leave all-zero blocks unwritten (the output reads zeros there already).
    pub skip_zeros: bool,
    pub bs: u64,
    pub qd: usize,
    /// Memory alignment of the buffers.
    pub align: usize,
    /// Logical block of the output (a stream source's host file grows in these).
    pub block: u64,
}

/// How far a pipeline got.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Every byte below this offset is in the output.
    pub prefix: u64,
    /// Bytes of the source (known at the end for a stream).
    pub total: Option<u64>,
    /// Bytes read and handed to the output.
    pub moved: u64,
    pub started: Instant,
}

enum Stage {
    /// A read in flight.
    Read(DioFuture<Buf>),
    /// Bytes read (the first `len` of the buffer), waiting to be written.
    Data(AlignedBuf),
    /// Writes in flight (one per non-zero run of the chunk) and the spare buffer.
    Write(Vec<DioFuture<Buf>>),
}

struct Slot {
    off: u64,
    len: usize,
    stage: Stage,
}

/// The chunks of the runs: each run cut at multiples of `bs`.
struct Cutter<'a> {
    runs: Runs<'a>,
    bs: u64,
    size: u64,
    pos: u64,
    end: u64,
}

impl Iterator for Cutter<'_> {
    type Item = io::Result<(u64, usize)>;
    fn next(&mut self) -> Option<Self::Item> {
        while self.pos >= self.end {
            let (s, e) = match self.runs.next()? {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            // Runs in order; overlapping or empty ones are clipped away.
            self.pos = s.max(self.end);
            self.end = e.min(self.size);
        }
        let next = ((self.pos / self.bs + 1) * self.bs).min(self.end);
        let off = self.pos;
        self.pos = next;
        Some(Ok((off, (next - off) as usize)))
    }
}

/// Buffers of `bs` bytes, recycled.
struct Pool {
    free: Vec<AlignedBuf>,
    bs: usize,
    align: usize,
}

impl Pool {
    fn take(&mut self) -> AlignedBuf {
        self.free
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(self.bs, self.align))
    }
    fn give(&mut self, b: AlignedBuf) {
        if b.len() == self.bs {
            self.free.push(b);
        }
    }
}

/// The copied prefix: chunks issued and not yet written, by offset.
struct Tracker {
    pending: BTreeMap<u64, u64>,
    /// End of the last chunk issued (everything up to it is issued).
    issued: u64,
}

impl Tracker {
    fn prefix(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.issued)
    }
}

/// Non-zero runs `[start, end)` (relative to the chunk) of `data` at file offset
/// `off`, at `ZERO_BLOCK` granularity aligned in the file.
fn nonzero_runs(off: u64, data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0usize;
    while i < data.len() {
        let abs = off + i as u64;
        let end = (((abs / ZERO_BLOCK) + 1) * ZERO_BLOCK - off).min(data.len() as u64) as usize;
        let zero = data[i..end].iter().fold(0u8, |a, &b| a | b) == 0;
        if !zero {
            match runs.last_mut() {
                Some(r) if r.1 == i => r.1 = end,
                _ => runs.push((i, end)),
            }
        }
        i = end;
    }
    runs
}

fn fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Names for messages.
pub struct Names<'a> {
    pub src: &'a str,
    pub dst: &'a str,
}

fn write_failure(dst: &str, off: u64, e: impl std::fmt::Display) -> Failure {
    Failure::msg(format!("{dst}: write at offset {off}: {e}"))
}

fn check_done(
    what: &str,
    name: &str,
    off: u64,
    want: usize,
    mut done: Completed<Buf>,
) -> Result<Buf, Failure> {
    let buf = done.bufs.pop().expect("one buffer per request");
    match done.result {
        Ok(n) if n == want => Ok(buf),
        Ok(n) => Err(Failure::msg(format!(
            "{name}: short {what} at offset {off}: {n} of {want} bytes (did it change size?)"
        ))),
        Err(e) => Err(Failure::msg(format!("{name}: {what} at offset {off}: {e}"))),
    }
}

/// Run a job. On success, the progress (prefix = total); on failure, the failure
/// and the progress so far (every request in flight has finished).
pub fn run(
    mut input: Input<'_>,
    mut output: Output<'_>,
    job: Job<'_>,
    names: &Names<'_>,
    stop: &Stop,
    bar: &ProgressBar,
) -> Result<Progress, (Failure, Progress)> {
    let started = Instant::now();
    let mut pool = Pool {
        free: Vec::new(),
        bs: job.bs as usize,
        align: job.align,
    };
    let mut cutter = Cutter {
        runs: job.runs,
        bs: job.bs,
        size: job.size.unwrap_or(u64::MAX),
        pos: 0,
        end: 0,
    };
    let mut tracker = Tracker {
        pending: BTreeMap::new(),
        issued: 0,
    };
    let mut q: VecDeque<Slot> = VecDeque::new();
    let mut moved = 0u64;
    let mut stream_pos = 0u64;
    let mut exhausted = false;
    let mut grown = 0u64;
    let skip_zeros = job.skip_zeros && matches!(output, Output::Direct { .. });

    let result: Result<(), Failure> = (|| {
        loop {
            stop.check()?;
            // Start reads up to the queue depth.
            while q.len() < job.qd && !exhausted {
                stop.check()?;
                let (off, len) = if let Input::Stream(_) = input {
                    (stream_pos, job.bs as usize)
                } else {
                    match cutter.next() {
                        None => {
                            exhausted = true;
                            break;
                        }
                        Some(c) => c.map_err(|e| Failure::msg(format!("{}: {e}", names.src)))?,
                    }
                };
                let mut buf = pool.take();
                let stage = match &mut input {
                    Input::Direct(f) => {
                        let w = Window::new(buf, 0, len).expect("a chunk fits its buffer");
                        Stage::Read(f.read_future(off, vec![w], Flags::UNALIGNED))
                    }
                    Input::Memory(f) => {
                        let n = f
                            .read_at(off, &mut buf[..len])
                            .map_err(|e| Failure::msg(format!("{}: {e}", names.src)))?;
                        if n != len {
                            return Err(Failure::msg(format!(
                                "{}: short read at offset {off}",
                                names.src
                            )));
                        }
                        Stage::Data(buf)
                    }
                    Input::Bytes(b) => {
                        buf[..len].copy_from_slice(&b[off as usize..off as usize + len]);
                        Stage::Data(buf)
                    }
                    Input::Stream(r) => {
                        let n = fill(*r, &mut buf[..len])
                            .map_err(|e| Failure::msg(format!("{}: {e}", names.src)))?;
                        if n < len {
                            exhausted = true;
                        }
                        if n == 0 {
                            pool.give(buf);
                            break;
                        }
                        stream_pos += n as u64;
                        tracker.pending.insert(off, off + n as u64);
                        tracker.issued = off + n as u64;
                        q.push_back(Slot {
                            off,
                            len: n,
                            stage: Stage::Data(buf),
                        });
                        continue;
                    }
                };
                tracker.pending.insert(off, off + len as u64);
                tracker.issued = off + len as u64;
                q.push_back(Slot { off, len, stage });
            }
            if exhausted && q.is_empty() {
                return Ok(());
            }
            let Some(slot) = q.pop_front() else {
                // Nothing in flight and nothing more: done.
                return Ok(());
            };
            let Slot { off, len, stage } = slot;
            match stage {
                Stage::Read(_) | Stage::Data(_) => {
                    let buf = match stage {
                        Stage::Read(fut) => {
                            check_done("read", names.src, off, len, fut.wait())?.into_inner()
                        }
                        Stage::Data(buf) => buf,
                        _ => unreachable!("matched above"),
                    };
                    moved += len as u64;
                    if let Some(s) = handle(
                        &mut output,
                        &mut pool,
                        &mut tracker,
                        names,
                        off,
                        len,
                        buf,
                        skip_zeros,
                        &mut grown,
                        job.block,
                    )? {
                        q.push_back(Slot { off, len, stage: s });
                    }
                }
                Stage::Write(futs) => {
                    let mut first_err = None;
                    for fut in futs {
                        let done = fut.wait();
                        let want = done.bufs.first().map_or(0, dio::OwnedBuf::len);
                        match check_done("write", names.dst, off, want, done) {
                            Ok(b) => pool.give(b.into_inner()),
                            Err(e) => {
                                first_err.get_or_insert(e);
                            }
                        }
                    }
                    if let Some(e) = first_err {
                        return Err(e);
                    }
                    tracker.pending.remove(&off);
                }
            }
            bar.set_position(tracker.prefix());
        }
    })();
    // Let every request in flight finish before its buffer goes; count the writes
    // that made it.
    for slot in q.drain(..) {
        match slot.stage {
            Stage::Read(f) => {
                f.wait();
            }
            Stage::Data(_) => {}
            Stage::Write(futs) => {
                let mut ok = true;
                for f in futs {
                    let done = f.wait();
                    let want = done.bufs.first().map_or(0, dio::OwnedBuf::len);
                    ok &= matches!(done.result, Ok(n) if n == want);
                }
                if ok {
                    tracker.pending.remove(&slot.off);
                }
            }
        }
    }
    let total = match (&input, job.size) {
        (Input::Stream(_), _) => exhausted.then_some(stream_pos),
        (_, s) => s,
    };
    match result {
        Ok(()) => {
            let total = total.unwrap_or(stream_pos);
            Ok(Progress {
                prefix: total,
                total: Some(total),
                moved,
                started,
            })
        }
        Err(f) => Err((
            f,
            Progress {
                prefix: tracker.prefix(),
                total,
                moved,
                started,
            },
        )),
    }
}

/// Hand a chunk's bytes to the output: written at once (streams, image files,
/// all-zero chunks of a sparse copy), or a write stage to wait for.
#[allow(clippy::too_many_arguments)]
fn handle(
    output: &mut Output<'_>,
    pool: &mut Pool,
    tracker: &mut Tracker,
    names: &Names<'_>,
    off: u64,
    len: usize,
    buf: AlignedBuf,
    skip_zeros: bool,
    grown: &mut u64,
    block: u64,
) -> Result<Option<Stage>, Failure> {
    match output {
        Output::Stream(w) => {
            w.write_all(&buf[..len]).map_err(|e| {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    Failure::BrokenPipe
                } else {
                    Failure::msg(format!("{}: {e}", names.dst))
                }
            })?;
            pool.give(buf);
            tracker.pending.remove(&off);
            Ok(None)
        }
        Output::Ext(f) => {
            f.write_at(off, &buf[..len])
                .map_err(|e| write_failure(names.dst, off, e))?;
            pool.give(buf);
            tracker.pending.remove(&off);
            Ok(None)
        }
        Output::Direct { file, grow, limit } => {
            let end = off + len as u64;
            if let Some(limit) = *limit {
                if end > limit {
                    return Err(Failure::msg(format!(
                        "{}: holds {limit} bytes, less than the source",
                        names.dst
                    )));
                }
            }
            if let Some(raw) = grow {
                // A stream source: lengthen the file ahead of the write, so that no
                // write extends it.
                let want = end.div_ceil(block) * block;
                if want > *grown {
                    raw.set_len(want)
                        .map_err(|e| Failure::msg(format!("{}: {e}", names.dst)))?;
                    *grown = want;
                }
            }
            let runs = if skip_zeros {
                nonzero_runs(off, &buf[..len])
            } else {
                vec![(0, len)]
            };
            if runs.is_empty() {
                pool.give(buf);
                tracker.pending.remove(&off);
                return Ok(None);
            }
            let mut futs = Vec::with_capacity(runs.len());
            let align = pool.align;
            let mut whole = Some(buf);
            for (i, &(s, e)) in runs.iter().enumerate() {
                let piece = if i + 1 == runs.len() {
                    // The last run takes the chunk's own buffer, as a window.
                    let inner = whole.take().expect("buffer");
                    Window::new(inner, s, e - s).expect("run fits")
                } else {
                    let src = whole.as_ref().expect("buffer");
                    let copy = AlignedBuf::from_slice(&src[s..e], align);
                    Window::new(copy, 0, e - s).expect("fits")
                };
                futs.push(file.write_future(off + s as u64, vec![piece], Flags::UNALIGNED));
            }
            Ok(Some(Stage::Write(futs)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_are_block_aligned_in_the_file() {
        let mut d = vec![0u8; 3 * 4096];
        assert!(nonzero_runs(0, &d).is_empty());
        d[5000] = 1;
        assert_eq!(nonzero_runs(0, &d), vec![(4096, 8192)]);
        d[0] = 1;
        assert_eq!(nonzero_runs(0, &d), vec![(0, 8192)]);
        // At offset 1000, the first block of the file ends at chunk byte 3096.
        let mut d = vec![0u8; 5000];
        d[4000] = 7;
        assert_eq!(nonzero_runs(1000, &d), vec![(3096, 5000)]);
    }

    #[test]
    fn runs_are_cut_at_multiples_of_bs() {
        let runs: Runs<'_> = Box::new(vec![Ok((100, 5000)), Ok((9000, 9001))].into_iter());
        let c: Vec<_> = Cutter {
            runs,
            bs: 4096,
            size: 9001,
            pos: 0,
            end: 0,
        }
        .map(|c| c.unwrap())
        .collect();
        assert_eq!(c, vec![(100, 3996), (4096, 904), (9000, 1)]);
    }
}
