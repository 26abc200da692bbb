//! How much of a file sits in the page cache, without `unsafe` (no mmap+mincore
//! here): util-linux `fincore` (which does the mincore) where it is installed, else
//! the change of `Cached` in /proc/meminfo across the run (machine-wide, so noisy).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Page cache a run filled: the most seen while it ran (sampled every 50 ms) and
/// what it left behind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cache {
    pub peak: Option<u64>,
    pub left: Option<u64>,
}

/// How page cache is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Fincore,
    Meminfo,
}

impl Probe {
    /// `fincore` if it answers for `file`, else /proc/meminfo.
    pub fn pick(file: &Path) -> Probe {
        if fincore(file).is_some() {
            Probe::Fincore
        } else {
            Probe::Meminfo
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Probe::Fincore => "fincore (mincore) of the file",
            Probe::Meminfo => "/proc/meminfo Cached deltas, machine-wide",
        }
    }

    /// Run `f`, sampling the page cache it fills meanwhile, and what it leaves.
    pub fn measure<T>(self, file: &Path, f: impl FnOnce() -> T) -> (T, Cache) {
        let before = self.before();
        let stop = AtomicBool::new(false);
        let (out, peak) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut peak: Option<u64> = None;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(v) = self.left(file, before) {
                        peak = Some(peak.unwrap_or(0).max(v));
                    }
                    std::thread::park_timeout(Duration::from_millis(50));
                }
                peak
            });
            let out = f();
            stop.store(true, Ordering::Relaxed);
            sampler.thread().unpark();
            (out, sampler.join().unwrap_or(None))
        });
        let left = self.left(file, before);
        let peak = match (peak, left) {
            (Some(p), Some(l)) => Some(p.max(l)),
            (p, l) => p.or(l),
        };
        (out, Cache { peak, left })
    }

    /// A reading before a run.
    pub fn before(self) -> u64 {
        match self {
            Probe::Fincore => 0,
            Probe::Meminfo => meminfo_cached().unwrap_or(0),
        }
    }

    /// Bytes of page cache the run left behind, given the reading before it.
    pub fn left(self, file: &Path, before: u64) -> Option<u64> {
        match self {
            Probe::Fincore => fincore(file),
            Probe::Meminfo => Some(meminfo_cached()?.saturating_sub(before)),
        }
    }
}

/// Bytes of `file` resident in the page cache, from `fincore --bytes`.
fn fincore(file: &Path) -> Option<u64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn meminfo_cached() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("Cached:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
