//! The operations: reads and writes generated from the seed (alignment, length,
//! buffers, flags, sync or async), batches of concurrent calls, truncates, hole
//! punches and preallocations, and how each call reaches the file.

use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dio::{AlignedBuf, CompletionMode, Flags, Result};

use crate::run::{Fsx, Step};

/// How long one async call may take before fsx calls it a hang.
const HANG: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Fs,
    Sector,
    Byte,
}

/// One read or write.
#[derive(Debug, Clone)]
pub(crate) struct Io {
    pub(crate) write: bool,
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) align: Align,
    pub(crate) flags: Flags,
    /// Offset of the buffer's start from a page boundary (sync calls).
    pub(crate) skew: usize,
    /// Lengths of the buffers.
    pub(crate) pieces: Vec<usize>,
    /// Async (owned buffers, callback) rather than sync.
    pub(crate) async_: bool,
}

impl fmt::Display for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:#x}+{:#x} ({}..{}) {} {}",
            if self.write { "write" } else { "read " },
            self.off,
            self.len,
            self.off,
            self.off + self.len,
            if self.async_ { "async" } else { "sync " },
            match self.align {
                Align::Fs => "fs-aligned",
                Align::Sector => "sector",
                Align::Byte => "byte",
            }
        )?;
        if self.pieces.len() > 1 {
            write!(f, " iov={:?}", self.pieces)?;
        }
        if self.skew != 0 {
            write!(f, " mem+{}", self.skew)?;
        }
        for (flag, name) in [
            (Flags::LOCKING, "locking"),
            (Flags::DSYNC, "dsync"),
            (Flags::ASYNC_EXTEND, "async-extend"),
            (Flags::NOWAIT, "nowait"),
            (Flags::UNALIGNED, "unaligned"),
        ] {
            if self.flags.contains(flag) {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

/// The flags of `flags` that are among `keep`.
fn keep_flags(flags: Flags, keep: &[Flags]) -> Flags {
    keep.iter()
        .filter(|&&f| flags.contains(f))
        .fold(Flags::NONE, |acc, &f| acc | f)
}

pub(crate) fn show(r: &Result<usize>) -> String {
    match r {
        Ok(n) => format!("-> {n}"),
        Err(e) => format!("-> error ({e})"),
    }
}

impl Fsx<'_> {
    pub(crate) fn gen_io(&mut self, write: bool) -> Io {
        let rng = &mut self.rng;
        let align = match rng.below(100) {
            0..=34 => Align::Fs,
            35..=69 => Align::Sector,
            _ if self.o.unaligned => Align::Byte,
            _ => Align::Sector,
        };
        let unit = match align {
            Align::Fs => self.fs,
            Align::Sector => self.lb,
            Align::Byte => 1,
        };
        let max = self.o.max_len.max(unit).min(self.span);
        let mut len = match rng.below(100) {
            0..=49 => 1 + rng.below(4 * self.fs),
            50..=89 => 1 + rng.below(64 << 10),
            _ => 1 + rng.below(max),
        }
        .min(max);
        len = len.div_ceil(unit) * unit;
        let size = self.model.size.min(self.span);
        let off = if size > 0 && rng.percent(if write { 55 } else { 75 }) {
            rng.below(size)
        } else {
            rng.below(self.span)
        };
        let mut off = off / unit * unit;
        if off + len > self.span {
            len = (self.span - off) / unit * unit;
            if len == 0 {
                len = unit;
                off = (self.span - unit) / unit * unit;
            }
        }
        let mut flags = Flags::NONE;
        if align == Align::Byte || rng.percent(15) {
            flags |= Flags::UNALIGNED;
        }
        if rng.percent(30) {
            flags |= Flags::LOCKING;
        }
        if write && rng.percent(15) {
            flags |= Flags::DSYNC;
        }
        let async_ = rng.percent(40);
        if write && async_ && rng.percent(30) {
            flags |= Flags::ASYNC_EXTEND;
        }
        let skew = match align {
            _ if async_ || rng.percent(50) => 0,
            Align::Byte => rng.below(4096) as usize,
            _ => {
                let ma = self.mem_align.max(1) as u64;
                (rng.below((4096 / ma).max(1)) * ma) as usize
            }
        };
        let mut pieces = Vec::new();
        let mut rest = len;
        let nparts = if rng.percent(60) { 1 } else { 2 + rng.below(2) };
        for _ in 1..nparts {
            let cut = rng.below(rest / unit) * unit;
            if cut > 0 && cut < rest {
                pieces.push(cut as usize);
                rest -= cut;
            }
        }
        pieces.push(rest as usize);
        Io {
            write,
            off,
            len,
            align,
            flags,
            skew,
            pieces,
            async_,
        }
    }

    pub(crate) fn single(&mut self, io: Io) -> Step {
        let data = if io.write {
            Some(self.data_for(&io))
        } else {
            None
        };
        let (result, got) = if io.async_ {
            let (tx, rx) = mpsc::channel();
            self.submit_async(&io, data.as_deref(), 0, &tx);
            match self.wait_async(&rx, 1) {
                Ok(mut v) => {
                    let (_, r, b) = v.pop().expect("one completion");
                    (r, b)
                }
                Err(what) => {
                    self.note(format!("{:>6} {io} -> no completion", self.op));
                    return Err(self.diverge(what, None));
                }
            }
        } else {
            self.sync_call(&io, data.as_deref())
        };
        self.report.calls += 1;
        self.note(format!("{:>6} {io} {}", self.op, show(&result)));
        if io.write {
            self.report.writes += 1;
            self.apply_write(&io, data.as_deref().unwrap_or(&[]), &result)?;
            self.check_size("the write")?;
        } else {
            self.report.reads += 1;
            let size = self.model.size;
            self.check_read(&io, &result, &got, size, size, None)?;
        }
        Ok(())
    }

    /// A sync call from one buffer, split into the pieces.
    fn sync_call(&self, io: &Io, data: Option<&[u8]>) -> (Result<usize>, Vec<u8>) {
        let file = &self.t.file;
        let len = io.len as usize;
        let mut buf = AlignedBuf::new(io.skew + len, 4096);
        let region = &mut buf[io.skew..io.skew + len];
        if let Some(d) = data {
            region.copy_from_slice(d);
            let mut slices = Vec::new();
            let mut rest: &[u8] = region;
            for &p in &io.pieces {
                let (a, b) = rest.split_at(p);
                slices.push(IoSlice::new(a));
                rest = b;
            }
            (file.write(io.off, &slices, io.flags), Vec::new())
        } else {
            let r = {
                let mut slices = Vec::new();
                let mut rest: &mut [u8] = region;
                for &p in &io.pieces {
                    let (a, b) = rest.split_at_mut(p);
                    slices.push(IoSliceMut::new(a));
                    rest = b;
                }
                file.read(io.off, &mut slices, io.flags)
            };
            (r, buf[io.skew..io.skew + len].to_vec())
        }
    }

    fn submit_async(
        &self,
        io: &Io,
        data: Option<&[u8]>,
        idx: usize,
        tx: &mpsc::Sender<(usize, Result<usize>, Vec<u8>)>,
    ) {
        let file = &self.t.file;
        let align = self.mem_align.max(1);
        let mut bufs = Vec::new();
        let mut at = 0;
        for &p in &io.pieces {
            let mut b = AlignedBuf::new(p, align);
            if let Some(d) = data {
                b.copy_from_slice(&d[at..at + p]);
            }
            at += p;
            bufs.push(b);
        }
        let tx = tx.clone();
        if io.write {
            file.write_async(io.off, bufs, io.flags, move |c| {
                let _ = tx.send((idx, c.result, Vec::new()));
            });
        } else {
            file.read_async(io.off, bufs, io.flags, move |c| {
                let bytes: Vec<u8> = c.bufs.iter().flat_map(|b| b.iter().copied()).collect();
                let _ = tx.send((idx, c.result, bytes));
            });
        }
    }

    /// Wait for `n` completions, bounded; drives devices whose completions need
    /// polling.
    #[allow(clippy::type_complexity)]
    fn wait_async(
        &self,
        rx: &mpsc::Receiver<(usize, Result<usize>, Vec<u8>)>,
        n: usize,
    ) -> std::result::Result<Vec<(usize, Result<usize>, Vec<u8>)>, String> {
        let polled = self.t.file.device().completion_mode() == CompletionMode::Polled;
        let deadline = Instant::now() + HANG;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {n} async calls did not complete within {} s (dio_count {})",
                    n - out.len(),
                    HANG.as_secs(),
                    self.t.file.state().dio_count()
                ));
            }
            if polled {
                let _ = self.t.file.poll(false);
                match rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(c) => out.push(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("async completion channel closed".into())
                    }
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => out.push(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("async completion channel closed".into())
                    }
                }
            }
        }
        out.sort_by_key(|c| c.0);
        Ok(out)
    }

    /// Several calls in flight at once: writes to disjoint bytes, reads anywhere
    /// (they may see each byte before or after the batch's writes).
    pub(crate) fn batch(&mut self) -> Step {
        let n = 2 + self.rng.below(self.o.max_batch.max(2) as u64 - 1) as usize;
        let mut ios: Vec<Io> = Vec::with_capacity(n);
        for _ in 0..n {
            let write = self.rng.percent(50);
            let mut io = self.gen_io(write);
            io.async_ = true;
            io.skew = 0;
            if io.write {
                let clash = ios
                    .iter()
                    .any(|o| o.write && o.off < io.off + io.len && io.off < o.off + o.len);
                if clash {
                    io.write = false;
                    io.flags = keep_flags(io.flags, &[Flags::LOCKING, Flags::UNALIGNED]);
                } else if self.rng.percent(10) {
                    io.flags |= Flags::NOWAIT;
                }
            }
            ios.push(io);
        }
        let datas: Vec<Option<Vec<u8>>> = ios
            .iter()
            .map(|io| io.write.then(|| self.data_for(io)))
            .collect();
        let before_size = self.model.size;
        let (tx, rx) = mpsc::channel();
        for (i, io) in ios.iter().enumerate() {
            self.submit_async(io, datas[i].as_deref(), i, &tx);
        }
        let done = match self.wait_async(&rx, ios.len()) {
            Ok(d) => d,
            Err(what) => {
                for io in &ios {
                    self.note(format!("{:>6}   {io} (batch)", self.op));
                }
                return Err(self.diverge(what, None));
            }
        };
        self.report.batches += 1;
        self.report.calls += ios.len() as u64;
        let first_op = self.op;
        for (i, r, _) in &done {
            self.note(format!("{:>6}   {} (batch) {}", first_op, ios[*i], show(r)));
        }
        // The model after the batch: every write applied.
        let before = self.model.clone();
        for (i, r, _) in &done {
            let io = &ios[*i];
            if io.write {
                self.report.writes += 1;
                let d = datas[*i].as_deref().unwrap_or(&[]);
                self.apply_write(io, d, r)?;
            }
        }
        self.check_size("the batch")?;
        let after = std::mem::replace(&mut self.model, before);
        let after_size = after.size;
        for (i, r, got) in &done {
            let io = &ios[*i];
            if !io.write {
                self.report.reads += 1;
                self.check_read(io, r, got, before_size, after_size, Some(&after))?;
            }
        }
        self.model = after;
        // A batch counts as one op per call, so the log numbers stay unique.
        self.op += ios.len() as u64 - 1;
        Ok(())
    }

    pub(crate) fn truncate(&mut self) -> Step {
        let size = self.model.size;
        let new = if self.rng.percent(50) {
            self.rng.below(size + 1)
        } else {
            size + self.rng.below(self.span - size + 1)
        };
        let new = match self.rng.below(3) {
            0 => new / self.fs * self.fs,
            _ => new,
        };
        self.t.arm(false);
        let r = (self.t.resize.as_ref().expect("resizable"))(new);
        self.t.arm(true);
        self.report.truncates += 1;
        self.note(format!(
            "{:>6} truncate {size} -> {new} {}",
            self.op,
            show(&r.as_ref().map(|_| 0).map_err(|e| e.clone()))
        ));
        if let Err(e) = r {
            return Err(self.diverge(format!("truncate to {new}: {e}"), None));
        }
        if new < size {
            self.model.zero(new, self.span);
        }
        self.model.size = new;
        Ok(())
    }

    fn block_range(&mut self) -> (u64, u64) {
        let blocks = self.span / self.fs;
        let first = self.rng.below(blocks);
        let n = (1 + self.rng.below(16)).min(blocks - first);
        (first, first + n)
    }

    pub(crate) fn punch(&mut self) -> Step {
        let (a, b) = self.block_range();
        let map = self.t.map.as_ref().expect("test map");
        map.punch(a..b);
        self.report.punches += 1;
        self.note(format!(
            "{:>6} punch blocks {a}..{b} ({}..{})",
            self.op,
            a * self.fs,
            b * self.fs
        ));
        self.model.zero(a * self.fs, b * self.fs);
        Ok(())
    }

    pub(crate) fn prealloc(&mut self) -> Step {
        let (a, b) = self.block_range();
        let map = self.t.map.as_ref().expect("test map");
        let r = map.preallocate(a..b);
        self.report.preallocs += 1;
        self.note(format!(
            "{:>6} preallocate blocks {a}..{b} ({}..{})",
            self.op,
            a * self.fs,
            b * self.fs
        ));
        if let Err(e) = r {
            return Err(self.diverge(format!("preallocate {a}..{b}: {e}"), None));
        }
        Ok(())
    }
}
