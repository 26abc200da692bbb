//! What a run did, and what it found.

use std::fmt;
use std::time::Duration;

use dio::FaultStats;
use dio_testkit::STALE;

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Operations run (a batch counts once per call in it).
    pub ops: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Engine calls (reads and writes).
    pub calls: u64,
    /// Reads checked.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Truncates.
    pub truncates: u64,
    /// Holes punched.
    pub punches: u64,
    /// Preallocations.
    pub preallocs: u64,
    /// Batches of concurrent calls.
    pub batches: u64,
    /// Whole-file read-backs.
    pub verifies: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Calls that returned an error (only with faults).
    pub errors: u64,
    /// Calls that returned a short count not explained by EOF (only with faults).
    pub partials: u64,
    /// Faults the device injected.
    pub faults: FaultStats,
}

impl Report {
    /// Operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops in {:.1} s ({:.0} ops/s): {} calls ({} reads, {} writes, {} batches), {} truncates, {} punches, {} preallocs, {} verifies; {} MiB read, {} MiB written",
            self.ops,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec(),
            self.calls,
            self.reads,
            self.writes,
            self.batches,
            self.truncates,
            self.punches,
            self.preallocs,
            self.verifies,
            self.bytes_read >> 20,
            self.bytes_written >> 20,
        )?;
        if self.faults.requests > 0 && self.faults.injected() > 0 {
            write!(
                f,
                "; faults: {} of {} requests ({} before the data moved, {} after), {} calls failed, {} short counts",
                self.faults.injected(),
                self.faults.requests,
                self.faults.failed,
                self.faults.torn,
                self.errors,
                self.partials
            )?;
        }
        Ok(())
    }
}

/// The first byte a read got wrong.
#[derive(Debug, Clone)]
pub struct WrongByte {
    /// File offset.
    pub offset: u64,
    /// What the read returned.
    pub got: u8,
    /// What the model allows there.
    pub expected: Vec<u8>,
    /// Wrong bytes in that read.
    pub wrong: u64,
}

/// A divergence between the file and the model.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// Seed of the run.
    pub seed: u64,
    /// Operation number (from 1).
    pub op: u64,
    /// What went wrong.
    pub what: String,
    /// The first wrong byte, for a data mismatch.
    pub first_wrong: Option<WrongByte>,
    /// The last operations, oldest first, the failing one last.
    pub log: Vec<String>,
    /// What the run had done until then.
    pub report: Report,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "divergence at op {} (seed {}): {}",
            self.op, self.seed, self.what
        )?;
        if let Some(w) = &self.first_wrong {
            let exp: Vec<String> = w.expected.iter().map(|b| format!("{b:#04x}")).collect();
            let stale = if w.got == STALE {
                " (0xAA: the device's fill, never written)"
            } else {
                ""
            };
            writeln!(
                f,
                "first wrong byte at file offset {} ({:#x}): got {:#04x}{stale}, expected {}; {} wrong bytes in this read",
                w.offset,
                w.offset,
                w.got,
                exp.join(" or "),
                w.wrong
            )?;
        }
        writeln!(f, "operation log (last {} ops):", self.log.len())?;
        for l in &self.log {
            writeln!(f, "  {l}")?;
        }
        write!(f, "after {}", self.report)
    }
}

impl std::error::Error for Divergence {}
