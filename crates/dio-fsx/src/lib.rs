//! fsx: a file-system exerciser in the spirit of fstests' fsx, for the dio engine.
//!
//! It runs random operations through a [`dio::DirectFile`] (direct reads and writes
//! at fs-block, logical-block and byte alignments, from one or several buffers, sync
//! and async with many calls in flight, truncates up and down, and on test maps hole
//! punching and preallocation) and checks every byte read against an in-memory
//! model of the file. The operations come from a seed, so a run is repeatable; on a
//! divergence it returns the operation log and the first wrong byte.
//!
//! A [`Target`] is what the operations go to: the RAM device under a test map (with
//! EIO injected on random requests by a [`dio::FaultDevice`], and the device
//! pre-filled with 0xAA so stale data shows), a host file or block device through
//! [`dio::RawFile`], or any other [`dio::DirectFile`] (a file inside an image,
//! overwrites only).
//!
//! With faults, the model knows what a call may do: an error or a short count is
//! allowed, but bytes before a reported count must be the new ones, and bytes of a
//! failed part may be old or new, never anything else. fsx owns no engine logic: it
//! only calls dio's public API. The `dio fsx` command runs it; dio's tests
//! (`tests/faults.rs`) run it on the RAM device with faults.
//!
//! ```
//! use dio_fsx::{run, MemTarget, Options, Target};
//!
//! let target = Target::mem(&MemTarget::new(1 << 20, 7)).unwrap();
//! let report = run(&target, &Options::new(7).ops(200).span(1 << 20), &mut |_| {}).unwrap();
//! assert!(report.reads > 0 && report.writes > 0);
//! ```
//!
//! | module | what it holds |
//! |---|---|
//! | `options` | [`Options`]: how one run goes |
//! | `target` | [`Target`], [`MemTarget`]: what the operations go to |
//! | `model` | the byte model of the file, with the bytes a failed write may have left |
//! | `ops` | the operations: generated reads and writes, batches, truncates, punches |
//! | `run` | [`run`]: the loop, the checks against the model, the whole-file verify |
//! | `report` | [`Report`], [`Divergence`], [`WrongByte`]: what a run did or found |
//!
//! The seeded generator and the data pattern are [`dio_testkit::Rng`] and
//! [`dio_testkit::pattern`], shared with the tests of the workspace.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod model;
mod ops;
mod options;
mod report;
mod run;
mod target;

pub use options::Options;
pub use report::{Divergence, Report, WrongByte};
pub use run::run;
pub use target::{MemTarget, Resize, Target};

/// The byte the RAM target's device is filled with: a read that shows it returned
/// data the file never wrote.
pub use dio_testkit::STALE;
