//! The run: the loop, the checks of every result against the model, and the
//! whole-file verify.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dio::{AlignedBuf, Error, Flags, Result};
use dio_testkit::{pattern, Rng};

use crate::model::{first_wrong, Model};
use crate::ops::{show, Align, Io};
use crate::options::Options;
use crate::report::{Divergence, Report, WrongByte};
use crate::target::Target;

/// The exerciser: a target, a model and a generator.
pub(crate) struct Fsx<'a> {
    pub(crate) t: &'a Target,
    pub(crate) o: &'a Options,
    pub(crate) rng: Rng,
    pub(crate) model: Model,
    pub(crate) span: u64,
    pub(crate) fixed: bool,
    pub(crate) fs: u64,
    pub(crate) lb: u64,
    pub(crate) mem_align: usize,
    pub(crate) log: VecDeque<String>,
    pub(crate) op: u64,
    pub(crate) next_verify: u64,
    pub(crate) corrupted: bool,
    pub(crate) report: Report,
    pub(crate) start: Instant,
}

pub(crate) type Step = std::result::Result<(), Box<Divergence>>;

/// Run `opts` against `target`. `progress` is called about twice a second.
pub fn run(
    target: &Target,
    opts: &Options,
    progress: &mut dyn FnMut(&Report),
) -> std::result::Result<Report, Box<Divergence>> {
    let file = &target.file;
    let fixed = target.resize.is_none();
    let span = if fixed {
        file.size().min(opts.span)
    } else {
        opts.span
    };
    let (mem_align, lb) = file.dio_align();
    let mut x = Fsx {
        t: target,
        o: opts,
        rng: Rng::new(opts.seed),
        model: Model::new(span),
        span,
        fixed,
        fs: u64::from(file.block_size()),
        lb: u64::from(lb),
        mem_align: mem_align as usize,
        log: VecDeque::new(),
        op: 0,
        next_verify: opts.verify_every,
        corrupted: false,
        report: Report::default(),
        start: Instant::now(),
    };
    x.setup()?;
    let mut last = Instant::now();
    loop {
        if opts.ops.is_some_and(|n| x.op >= n)
            || opts.duration.is_some_and(|d| x.start.elapsed() >= d)
            || opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            break;
        }
        x.step()?;
        if last.elapsed() >= Duration::from_millis(500) {
            last = Instant::now();
            progress(&x.snapshot());
        }
    }
    x.op += 1;
    x.verify()?;
    x.op -= 1;
    if let Some(path) = &opts.dump {
        let bytes = &x.model.data[..x.model.size as usize];
        if let Err(e) = std::fs::write(path, bytes) {
            return Err(x.diverge(
                format!("writing the model to {}: {e}", path.display()),
                None,
            ));
        }
    }
    Ok(x.snapshot())
}

impl Fsx<'_> {
    fn snapshot(&self) -> Report {
        let mut r = self.report.clone();
        r.ops = self.op;
        r.elapsed = self.start.elapsed();
        if let Some(f) = &self.t.faults {
            r.faults = f.stats();
        }
        r
    }

    pub(crate) fn note(&mut self, line: String) {
        if self.log.len() == self.o.log_len.max(1) {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    pub(crate) fn diverge(
        &mut self,
        what: String,
        first_wrong: Option<WrongByte>,
    ) -> Box<Divergence> {
        self.t.arm(false);
        Box::new(Divergence {
            seed: self.o.seed,
            op: self.op,
            what,
            first_wrong,
            log: self.log.iter().cloned().collect(),
            report: self.snapshot(),
        })
    }

    /// Start from a known file: resizable targets are truncated to 0, fixed ones
    /// are read once.
    fn setup(&mut self) -> Step {
        self.t.arm(false);
        if let Some(resize) = &self.t.resize {
            if let Err(e) = resize(0) {
                return Err(self.diverge(format!("truncate to 0 at start: {e}"), None));
            }
            self.model.size = 0;
        } else {
            // The file may be larger than the span: only the span is exercised.
            self.model.size = self.t.file.size();
            let mut at = 0;
            while at < self.span {
                let len = (self.span - at).min(1 << 20) as usize;
                let mut b = AlignedBuf::new(len, self.mem_align.max(4096));
                // The span may end anywhere (a file of any size): byte-granular.
                match self.t.file.read_at(at, &mut b, Flags::UNALIGNED) {
                    Ok(n) if n == len => self.model.set(at, &b),
                    r => {
                        return Err(self.diverge(format!("load read {at}+{len} {}", show(&r)), None))
                    }
                }
                at += len as u64;
            }
        }
        self.note(format!(
            "      start: {} span {} size {}",
            self.t.name, self.span, self.model.size
        ));
        self.t.arm(true);
        Ok(())
    }

    fn step(&mut self) -> Step {
        self.op += 1;
        if self.o.corrupt_model_at.is_some_and(|n| self.op >= n)
            && !self.corrupted
            && self.model.size > 0
        {
            self.corrupted = true;
            let at = self.rng.below(self.model.size.min(self.span)) as usize;
            self.model.data[at] ^= 0x5A;
            self.model.cut(at as u64, at as u64 + 1);
            self.note(format!("{:>6} corrupt the model at {at} (test)", self.op));
            return self.verify();
        }
        if self.o.verify_every > 0 && self.op >= self.next_verify {
            self.next_verify = self.op + self.o.verify_every;
            return self.verify();
        }
        let has_map = self.t.map.is_some();
        let r = self.rng.below(100);
        match r {
            0..=29 => {
                let io = self.gen_io(false);
                self.single(io)
            }
            30..=62 => {
                let io = self.gen_io(true);
                self.single(io)
            }
            63..=82 => self.batch(),
            83..=90 if !self.fixed => self.truncate(),
            91..=95 if has_map => self.punch(),
            96..=99 if has_map => self.prealloc(),
            _ => {
                let io = self.gen_io(false);
                self.single(io)
            }
        }
    }

    pub(crate) fn data_for(&self, io: &Io) -> Vec<u8> {
        let mut d = vec![0; io.len as usize];
        pattern(&mut d, self.op, io.off);
        d
    }

    /// Whether a short count or an error may happen (faults armed).
    pub(crate) fn may_fail(&self) -> bool {
        self.t.faults_active()
    }

    /// Check a result's count, and for an error whether one was allowed.
    pub(crate) fn check_count(&mut self, io: &Io, r: &Result<usize>, lo: u64, hi: u64) -> Step {
        let may_fail = self.may_fail();
        match r {
            Ok(n) => {
                let n = *n as u64;
                if n > hi || (n < lo && !may_fail) {
                    let what = if lo == hi {
                        format!("{io}: returned {n}, expected {lo}")
                    } else {
                        format!("{io}: returned {n}, expected {lo}..={hi}")
                    };
                    return Err(self.diverge(what, None));
                }
                if n < lo {
                    self.report.partials += 1;
                    // A short read ends where a device request ended: on a sector
                    // boundary, unless the call itself was byte-granular. A short
                    // write reports whole fs blocks only (a half-written fresh block
                    // must not be converted), whatever the call's alignment.
                    let (unit, what) = if io.write {
                        (self.fs, "an fs block")
                    } else {
                        (self.lb, "a sector")
                    };
                    if (io.write || io.align != Align::Byte) && (io.off + n) % unit != 0 {
                        return Err(self.diverge(
                            format!("{io}: short count {n} does not end on {what}"),
                            None,
                        ));
                    }
                }
                Ok(())
            }
            Err(Error::WouldBlock) if io.flags.contains(Flags::NOWAIT) => Ok(()),
            Err(e) if may_fail && e.errno() == libc::EIO => {
                self.report.errors += 1;
                Ok(())
            }
            Err(e) => Err(self.diverge(format!("{io}: unexpected error: {e}"), None)),
        }
    }

    /// Check a read: its count against the sizes it may have seen, its bytes
    /// against the model (and, in a batch, the model after the batch), then settle
    /// the model on what it read.
    pub(crate) fn check_read(
        &mut self,
        io: &Io,
        r: &Result<usize>,
        got: &[u8],
        size_lo: u64,
        size_hi: u64,
        after: Option<&Model>,
    ) -> Step {
        let clip = |s: u64| {
            if io.off >= s {
                0
            } else {
                io.len.min(s - io.off)
            }
        };
        self.check_count(io, r, clip(size_lo), clip(size_hi))?;
        let n = *r.as_ref().unwrap_or(&0);
        self.report.bytes_read += n as u64;
        let got = &got[..n];
        let wrong = match after {
            Some(a) => first_wrong(&[&self.model, a], io.off, got),
            None => first_wrong(&[&self.model], io.off, got),
        };
        if let Some(w) = wrong {
            return Err(self.diverge(format!("{io}: read back wrong data"), Some(w)));
        }
        if after.is_none() {
            self.model.set(io.off, got);
        }
        Ok(())
    }

    /// Apply a write's result to the model: bytes before the count are new, the
    /// rest of the range (after a fault) may be old or new.
    pub(crate) fn apply_write(&mut self, io: &Io, data: &[u8], r: &Result<usize>) -> Step {
        self.check_count(io, r, io.len, io.len)?;
        let n = match r {
            Ok(n) => *n,
            Err(Error::WouldBlock) => return Ok(()),
            Err(_) => 0,
        };
        self.report.bytes_written += n as u64;
        self.model.set(io.off, &data[..n]);
        self.model.might_be(io.off + n as u64, &data[n..]);
        if n > 0 {
            self.model.size = self.model.size.max(io.off + n as u64);
        }
        Ok(())
    }

    pub(crate) fn check_size(&mut self, after: &str) -> Step {
        let size = self.t.file.size();
        if size != self.model.size {
            return Err(self.diverge(
                format!("file size {size} after {after}, model {}", self.model.size),
                None,
            ));
        }
        Ok(())
    }

    /// Read the whole file back, with faults off, and compare.
    pub(crate) fn verify(&mut self) -> Step {
        self.t.arm(false);
        self.report.verifies += 1;
        let size = self.model.size.min(self.span);
        self.note(format!("{:>6} verify 0..{size}", self.op));
        let chunk = 1u64 << 20;
        let mut at = 0;
        let mut buf = AlignedBuf::new(chunk as usize, self.mem_align.max(4096));
        while at < size {
            let len = (size - at).min(chunk);
            let want = len as usize;
            // Whole sectors: the read is clipped at EOF.
            let ask = len.div_ceil(self.lb) * self.lb;
            let r = self
                .t
                .file
                .read_at(at, &mut buf[..ask as usize], Flags::NONE);
            match r {
                Ok(n) if n == want => {}
                r => {
                    return Err(self.diverge(
                        format!("verify read {at}+{len} {}, expected {want}", show(&r)),
                        None,
                    ))
                }
            }
            if let Some(w) = first_wrong(&[&self.model], at, &buf[..want]) {
                return Err(self.diverge(format!("verify of {at}+{len}"), Some(w)));
            }
            self.model.set(at, &buf[..want]);
            at += len;
        }
        self.t.arm(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::MemTarget;

    #[test]
    fn short_run_on_ram_target_has_no_divergence() {
        let t = Target::mem(&MemTarget::new(1 << 20, 7)).unwrap();
        let r = run(&t, &Options::new(7).ops(500).span(1 << 20), &mut |_| {}).unwrap();
        assert!(r.ops >= 500);
        assert!(r.reads > 0 && r.writes > 0);
    }
}
