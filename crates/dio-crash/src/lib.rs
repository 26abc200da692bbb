//! dio-crash: crash-consistency testing for dio, in user space (the method of
//! dm-log-writes with fstests generic/482, and of CrashMonkey).
//!
//! 1. **Record.** [`Recorder`] wraps any [`dio::Device`] and logs, in completion
//!    order, every write (offset, bytes, FUA), every flush, and the workload's
//!    marks ([`Recorder::mark`]) and claims ([`Recorder::claim`]: "these bytes are
//!    durable now", what a completed dsync write or fsync promised) to a log file
//!    ([`log`] describes the format; a torn tail is ignored).
//! 2. **Replay.** [`Replayer`] builds crash states from the log over the initial
//!    image ([`replay`] describes the crash model): the durable prefix at every
//!    flush and FUA point, and seeded subsets, reorderings and tears of the
//!    volatile writes in each window between barriers, bounded per window.
//! 3. **Check.** Each state goes to [`Checker`]s: the [`ModelChecker`] (claims and
//!    durable writes), [`E2fsckChecker`] (journal replay, then `e2fsck -fn`),
//!    [`MountChecker`] (kernel loop mount reading expected files),
//!    [`FilesChecker`] (the same through dio's ext reader), [`CommandChecker`]
//!    (any command).
//!
//! [`run`] does 2 and 3 and returns a [`Summary`] naming the first failing state
//! by its [`StateSpec`], which rebuilds it.
//!
//! ```
//! use std::sync::Arc;
//! use dio::{DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
//! use dio_crash::{run, Base, Checker, Log, ModelChecker, Recorder, ReplayOptions};
//!
//! let dir = std::env::temp_dir().join(format!("dio-crash-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let dev = MemDevice::new(MemDeviceConfig::new(1 << 20, 512));
//! let rec = Arc::new(Recorder::create(dev, dir.join("log")).unwrap());
//! let file = DirectFile::new(rec.clone(), Arc::new(IdentityMap::new(512, 1 << 20)),
//!                            Arc::new(FileState::new(1 << 20))).unwrap();
//! file.write_at(1000, b"durable", Flags::UNALIGNED | Flags::DSYNC).unwrap();
//! rec.claim(1000, b"durable").unwrap();
//! file.write_at(9000, b"volatile", Flags::UNALIGNED).unwrap();
//!
//! let log = Arc::new(Log::open(dir.join("log")).unwrap());
//! let model = ModelChecker::new();
//! let checkers: Vec<&dyn Checker> = vec![&model];
//! let sum = run(&log, Base::Zeros, &checkers, &ReplayOptions::default(), &dir).unwrap();
//! assert!(sum.states > 1);
//! assert_eq!(sum.failed, 0);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod check;
pub mod log;
pub mod recorder;
pub mod replay;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use check::{
    Checker, CommandChecker, E2fsckChecker, ExpectedFile, FilesChecker, ModelChecker, MountChecker,
    Verdict,
};
pub use log::{Header, Log, Record, WriteRec};
pub use recorder::Recorder;
pub use replay::{plan, Analysis, Base, Kept, ReplayOptions, Replayer, StateSpec, StateView};

/// What went wrong in the harness itself (not in a state: that is a
/// [`Verdict::Fail`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum CrashError {
    /// An OS call failed.
    Io {
        /// What was being done, with the path.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The log file is not a log this crate can read.
    BadLog {
        /// The log.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A state spec that does not parse or does not fit the log.
    BadSpec(String),
    /// Anything else the caller asked for that cannot be done.
    Invalid(String),
}

impl CrashError {
    pub(crate) fn io(context: String, source: std::io::Error) -> CrashError {
        CrashError::Io { context, source }
    }
}

impl std::fmt::Display for CrashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrashError::Io { context, source } => write!(f, "{context}: {source}"),
            CrashError::BadLog { path, detail } => write!(f, "{}: {detail}", path.display()),
            CrashError::BadSpec(s) => write!(f, "bad crash state: {s}"),
            CrashError::Invalid(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for CrashError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CrashError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, CrashError>;

/// One failed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The state.
    pub spec: StateSpec,
    /// The checker that failed it.
    pub checker: String,
    /// Its message.
    pub message: String,
    /// The last mark before the crash position (record index, name).
    pub mark: Option<(u64, String)>,
}

/// What a replay found.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Records in the log.
    pub records: u64,
    /// Bytes at the log's end ignored (a torn last record).
    pub ignored_tail: u64,
    /// States built and checked.
    pub states: u64,
    /// States some checker failed.
    pub failed: u64,
    /// (checker, reason) of checks skipped, once per distinct pair.
    pub skipped: Vec<(String, String)>,
    /// The first failures (at most [`Summary::KEEP`]), in crash-position order.
    pub failures: Vec<Failure>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Summary {
    /// Failures kept in [`Summary::failures`].
    pub const KEEP: usize = 20;

    /// States per second.
    pub fn rate(&self) -> f64 {
        self.states as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Plan the states of `log` over `base` ([`plan`]), build each, and run every
/// checker on it. Image files for checkers go to `scratch` (removed after use).
/// Every state is checked (a failure does not stop the run); the summary keeps
/// the first failures.
pub fn run(
    log: &Arc<Log>,
    base: Base,
    checkers: &[&dyn Checker],
    opts: &ReplayOptions,
    scratch: &Path,
) -> Result<Summary> {
    run_specs(log, base, checkers, &plan_for(log, opts), scratch)
}

/// The plan [`run`] follows.
pub fn plan_for(log: &Log, opts: &ReplayOptions) -> Vec<StateSpec> {
    plan(log, &Analysis::new(log), opts)
}

/// [`run`] over given states.
pub fn run_specs(
    log: &Arc<Log>,
    base: Base,
    checkers: &[&dyn Checker],
    specs: &[StateSpec],
    scratch: &Path,
) -> Result<Summary> {
    let start = Instant::now();
    std::fs::create_dir_all(scratch)
        .map_err(|e| CrashError::io(format!("mkdir {}", scratch.display()), e))?;
    let mut rep = Replayer::new(Arc::clone(log), base, scratch)?;
    let mut sum = Summary {
        records: log.records().len() as u64,
        ignored_tail: log.ignored_tail(),
        ..Summary::default()
    };
    for spec in specs {
        let view = rep.state(spec)?;
        sum.states += 1;
        let mut failed = false;
        for c in checkers {
            match c.check(&view)? {
                Verdict::Pass => {}
                Verdict::Skip(why) => {
                    let entry = (c.name(), why);
                    if !sum.skipped.contains(&entry) {
                        sum.skipped.push(entry);
                    }
                }
                Verdict::Fail(message) => {
                    failed = true;
                    if sum.failures.len() < Summary::KEEP {
                        sum.failures.push(Failure {
                            spec: spec.clone(),
                            checker: c.name(),
                            message,
                            mark: log.mark_before(spec.at).map(|(i, m)| (i, m.to_string())),
                        });
                    }
                }
            }
        }
        if failed {
            sum.failed += 1;
        }
    }
    sum.elapsed = start.elapsed();
    Ok(sum)
}
