//! The `dio` command: cat, copy and benchmark host files and block devices through
//! the direct-I/O engine.
//!
//! This crate owns argument parsing, progress bars, output formats and exit codes.
//! It holds no engine logic: every byte moves through `dio::raw::RawFile` and its
//! `DirectFile`.

mod bench;
mod copy;
mod fail;
mod fsx;
mod segments;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fail::Failure;

const AFTER_HELP: &str = "\
Examples:
  dio cat /dev/nvme0n1p1 | sha256sum         read a device or file, bypassing the page cache
  dio cp disk.img /dev/loop0                 copy a file to a block device (and back)
  dio bench                                  direct vs buffered on a scratch file here
  dio bench data.bin --rw randread --bs 4k --qd 32 --runtime 5 --json

Exit status: 0 success, 1 error (a one-line `dio: ...` message on stderr), 2 usage.";

/// dio: direct I/O from user space, through dio's engine (io_uring or pread/pwrite).
#[derive(Parser, Debug)]
#[command(name = "dio", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a file or block device to stdout, read with direct I/O.
    #[command(after_help = "Example:\n  dio cat /dev/loop0 | sha256sum")]
    Cat(CatArgs),
    /// Copy a file or block device to another, with direct I/O; holes stay holes.
    #[command(after_help = "Examples:\n  dio cp disk.img copy.img\n  dio cp disk.img /dev/loop0")]
    Cp(CpArgs),
    /// Measure IOPS, bandwidth, latency and CPU; without TARGET: direct vs buffered.
    #[command(after_help = "\
Examples:
  dio bench                                   the default suite on ./dio-bench.tmp (removed after)
  dio bench data.bin --rw randread --bs 4k --qd 32 --runtime 5
  dio bench /dev/nvme0n1 --rw read --bs 1M --qd 8 --json

Without TARGET and without --rw, runs randread 4k qd32, randwrite 4k qd32, read 1M qd8 and
write 1M qd8, each through dio (direct) and through the page cache (buffered pread/pwrite, one
thread per queue slot, cache dropped before reads, writes timed up to their fdatasync).
A TARGET that is missing or smaller than --size is created and laid out first.")]
    Bench(bench::BenchArgs),
    /// Random direct I/O checked byte for byte against a model (fstests' fsx).
    #[command(after_help = "\
Examples:
  dio fsx mem --faults 0.01 --duration 60     RAM device, EIO on 1% of requests
  dio fsx scratch.bin --engine sync --seed 7  a host file (created; contents destroyed)
  dio fsx disk.img:/data.bin                  overwrites of a file in an ext image

Exit status 1 on a divergence, with the operation log and the first wrong byte.")]
    Fsx(fsx::FsxArgs),
}

/// Which I/O back end `RawFile` uses.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring where the kernel allows it, else pread/pwrite.
    Auto,
    /// io_uring (fails if the kernel refuses it).
    Uring,
    /// pread/pwrite on an O_DIRECT descriptor.
    Sync,
}

impl Engine {
    pub fn backend(self) -> dio::raw::Backend {
        match self {
            Engine::Auto => dio::raw::Backend::Auto,
            Engine::Uring => dio::raw::Backend::Uring,
            Engine::Sync => dio::raw::Backend::Sync,
        }
    }
}

#[derive(Args, Debug)]
struct CatArgs {
    /// File or block device to read.
    path: PathBuf,
    #[command(flatten)]
    pipe: copy::PipeArgs,
}

#[derive(Args, Debug)]
struct CpArgs {
    /// Source file or block device.
    src: PathBuf,
    /// Destination file (created or truncated), directory, or block device.
    dst: PathBuf,
    #[command(flatten)]
    pipe: copy::PipeArgs,
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Cat(a) => copy::cat(&a.path, &a.pipe),
        Command::Cp(a) => copy::cp(&a.src, &a.dst, &a.pipe),
        Command::Bench(a) => bench::run(&a),
        Command::Fsx(a) => fsx::run(&a),
    }
}

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2.
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our stdout went away (`dio cat x | head -c1`): not an error.
        Err(Failure::BrokenPipe) => ExitCode::SUCCESS,
        Err(Failure::Interrupted) => {
            fail::say("interrupted");
            ExitCode::from(130)
        }
        Err(Failure::Message(m)) => {
            fail::say(m);
            ExitCode::from(1)
        }
    }
}
