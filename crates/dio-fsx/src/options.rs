//! How one run goes.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// How one run goes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Seed of the operations.
    pub seed: u64,
    /// Stop after this many operations.
    pub ops: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Largest file size for resizable targets; at most this much of a fixed-size
    /// target is exercised.
    pub span: u64,
    /// Largest read or write.
    pub max_len: u64,
    /// Most calls in flight in one batch.
    pub max_batch: usize,
    /// Use byte-granular calls ([`dio::Flags::UNALIGNED`]) too.
    pub unaligned: bool,
    /// Operations kept for the log of a divergence.
    pub log_len: usize,
    /// Read the whole file back every this many operations.
    pub verify_every: u64,
    /// Corrupt the model at this operation (proves the checker; for tests).
    pub corrupt_model_at: Option<u64>,
    /// Stop when this becomes true (Ctrl-C).
    pub stop: Option<Arc<AtomicBool>>,
    /// After a clean run, write the model's final bytes (the file as fsx
    /// expects it, `size` bytes) to this host file.
    pub dump: Option<std::path::PathBuf>,
}

impl Options {
    /// `ops` operations from `seed` with the defaults: 4 MiB span, calls up to
    /// 256 KiB, batches of up to 16, byte-granular calls included.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            ops: Some(10_000),
            duration: None,
            span: 4 << 20,
            max_len: 256 << 10,
            max_batch: 16,
            unaligned: true,
            log_len: 64,
            verify_every: 1000,
            corrupt_model_at: None,
            stop: None,
            dump: None,
        }
    }
    /// Run this many operations.
    pub fn ops(mut self, n: u64) -> Options {
        self.ops = Some(n);
        self.duration = None;
        self
    }
    /// Run this long.
    pub fn duration(mut self, d: Duration) -> Options {
        self.duration = Some(d);
        self.ops = None;
        self
    }
    /// Set the span.
    pub fn span(mut self, span: u64) -> Options {
        self.span = span;
        self
    }
}
