//! The `dio` command: cat, copy, list, stat, write and benchmark host files, block
//! devices, NBD exports and files inside ext2/3/4 images (`IMAGE:/PATH`) through the
//! direct-I/O engine.
//!
//! This crate owns argument parsing, progress bars, output formats and exit codes.
//! It holds no engine logic: every byte moves through `dio::RawFile` and its
//! `DirectFile`.

mod bench;
mod copy;
mod crash;
mod extract;
mod fail;
mod fsx;
mod location;
mod ls;
mod names;
mod pipeline;
mod put;
mod segments;
mod size;
mod stat;
mod storage;
mod write;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fail::Failure;
use crate::location::Location;

/// Every async I/O allocates a few small objects (its completion record, its
/// request's segment list) and frees them on completion, up to the queue depth at
/// once: more than glibc's per-thread cache holds, so glibc takes its slow path.
/// mimalloc's free lists keep that cost near zero (`dio bench`: about 3% of the CPU
/// time of 4 KiB random I/O at QD32 went to glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AFTER_HELP: &str = "\
Examples:
  dio cat /dev/nvme0n1p1 | sha256sum         read a device or file, bypassing the page cache
  dio cp disk.img /dev/loop0                 copy a file to a block device (and back)
  dio cat disk.img:/etc/passwd               a file inside an ext2/3/4 image
  dio ls -l disk.img:/var/log                list a directory inside an image
  dio write disk.img:/data --offset 100 < x  write bytes at an offset (grows, fills holes)
  dio cp file disk.img:/dir/                 create or replace a file in an image
  dio mkdir -p disk.img:/a/b                 make directories (also rm -r, ln -s, truncate -s)
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
    /// Write a file, block device or image file to stdout, read with direct I/O.
    #[command(after_help = "\
Examples:
  dio cat /dev/loop0 | sha256sum
  dio cat disk.img:/etc/passwd                a file inside an ext2/3/4 image (symlinks followed)
  dio cat disk.img --offset 1024 --length 1024  any byte range
  some-command | dio cat - --offset 10        `-` is stdin (pipes are read with plain I/O)
  dio cat disk.img --bs 64k --stats > /dev/null  then the device's request counts on stderr

A LOCATION is a host file or block device, IMAGE:/PATH for a file inside an ext2/3/4 image,
or nbd://HOST[:PORT]/EXPORT (nbd+unix:///EXPORT?socket=PATH), optionally followed by :/PATH.")]
    Cat(CatArgs),
    /// Copy a file, block device or image file to another, with direct I/O; holes stay holes.
    #[command(after_help = "\
Examples:
  dio cp disk.img copy.img
  dio cp disk.img /dev/loop0
  dio cp disk.img:/var/log/syslog ./syslog    out of an ext image
  dio cp new.conf disk.img:/etc/app.conf      create or replace a file in an image
  dio cp --mode 600 --owner 1000:1000 key disk.img:/home/me/.ssh/
  dio cp -r disk.img:/etc ./out               a directory tree out of an image (into ./out/etc)
  dio cp -rp disk.img:/ ./root                the whole image, keeping modes, owners, times
  dio cp --stats /dev/sdb disk.img            then SRC's device request counts on stderr

`-` is stdin (as SRC) or stdout (as DST). Pipes, FIFOs and character devices (e.g.
/dev/null) are read or written with plain I/O, the other side still direct. A file
DST is sparse: SRC's holes and runs of zero blocks become holes (--sparse=never
writes every byte).

Into an image, DST is created or replaced (a directory DST gets SRC's name in it): the
bytes go to a new inode, which takes the name only once they are all written, so a
failure (no space left, a read error) leaves DST as it was. On an image with a journal
the changes go through it. --mode and --owner set the new file's permissions and owner.
Where dio cannot allocate (bigalloc images), an existing DST's bytes are overwritten in
place: no allocation, no growth; a shorter source leaves the rest of the file as it was.

With -r and SRC a host directory, DST IMAGE:/DIR gets a copy of the tree (the `mke2fs -d`
use case, on an existing image, with or without a journal): DIR/NAME when DIR exists
(SRC/. copies SRC's contents), else DIR itself. Regular files, directories, symlinks,
hard links (one inode), fifos, sockets and device nodes are created as mke2fs -d
creates them; existing non-directories are replaced. Without -p: the source's permission
bits, owner root (or --mode/--owner); with -p: mode, owner, atime, mtime, ctime and
crtime of the source (--mode/--owner still override). Operations are batched (a few
flushes or one journal transaction per few thousand names) in the crash-safe order of
single operations. A failing entry is reported and skipped (exit 1 at the end); a full
image stops the copy with `No space left on device` (exit 1), keeping what was copied
before it consistent. Progress on stderr on a terminal (or --progress); a summary line
ends the copy.

Refused, with nothing touched: SRC and DST sharing storage (the same file, an image
and a file inside it, a loop device and its backing file, an export and a file
inside it).

With -r, SRC is a directory inside an image (on a host file or an NBD export): the
tree is copied into DST (DST/NAME when DST is an existing directory and SRC is not the
image's root). Holes stay holes, symlinks stay symlinks (never followed), hard links stay
hard links; device nodes need root (else skipped with a note). Names the host cannot
take (`..`, containing `/`, ...) and directories a corrupt image links twice are
reported and skipped: nothing is created outside DST, and the exit status is 1. A
summary line ends the copy. The tree is written through the page cache, like cp (not
synced: run `sync` for durability). With -r, --qd files are copied at once, and only
the image's holes and unwritten extents become holes (--sparse=never: none).

On success DST is durable (fdatasync or device flush). On an error or a signal
(Ctrl-C: exit 130), a file DST is cut to the bytes copied so far from its start
(never removed) and synced, and dio says so: `dio: interrupted: DST holds the first
N of M bytes`; a device, export or image file DST reports how far it got.")]
    Cp(CpArgs),
    /// List a directory inside an ext2/3/4 image.
    #[command(
        after_help = "Examples:\n  dio ls disk.img:/\n  dio ls -lh disk.img:/etc disk.img:/var\n  dio ls -la disk.img:/root\n\nAn entry that cannot be read is reported and the rest still listed (exit 1 at the end)."
    )]
    Ls(LsArgs),
    /// Show an inode of an ext2/3/4 image: size, mode, links, times, extent map.
    #[command(
        after_help = "Examples:\n  dio stat disk.img:/var/log/syslog\n  dio stat --json disk.img:/big"
    )]
    Stat(StatArgs),
    /// Write stdin (or --input) at a byte offset of a file, device or image file.
    #[command(after_help = "\
Examples:
  printf 'new' | dio write disk.img:/etc/motd --offset 7
  dio write /dev/loop0 --offset 512 --input sector.bin

Inside an image the write may grow the file and fill holes (blocks are allocated; the
size moves once the data is on the image; with a journal, through it). Where dio cannot
allocate (bigalloc images) the write is in place: it is refused, with nothing written, if
it would need allocation (a hole, an unwritten extent) or grow the file. An image whose journal
needs recovery is recovered first, as e2fsck would.

Exit status 0 means the bytes are durable: the file's data (fdatasync), the device or the
image (a device flush after the inode update) were flushed before dio exits.")]
    Write(WriteArgs),
    /// Measure IOPS, bandwidth, latency and CPU; without TARGET: direct vs buffered.
    #[command(after_help = "\
Examples:
  dio bench                                   the default suite on ./dio-bench.tmp (removed after)
  dio bench data.bin --rw randread --bs 4k --qd 32 --runtime 5
  dio bench /dev/nvme0n1 --rw read --bs 1M --qd 8 --json
  dio bench data.bin --rw randread --qd 64 --jobs 2   two threads, a ring each (fio --numjobs=2)
  dio bench data.bin --rw randread --qd 64 --batch 1  one io_uring_enter per I/O (fio's default submission)
  dio bench nbd://host/disk --jobs 2 --qd 32          two threads, an NBD connection each (multi-conn)

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
    /// Record a workload's writes and flushes, then check every crash state it allows.
    #[command(after_help = "\
Examples:
  cp disk.img base.img
  dio crash record run.log disk.img write:4096:new.bin flush dfill:8k:4k:0xab
  dio crash replay run.log --base base.img --check model --check e2fsck
  dio crash state run.log --base base.img --at 17:1:12 --out state.img")]
    Crash(crash::CrashArgs),
    /// Make directories inside an ext2/3/4 image.
    #[command(after_help = "\
Examples:
  dio mkdir disk.img:/srv
  dio mkdir -p --mode 700 --owner 1000:1000 disk.img:/home/me/.ssh

On images with a journal each change is one journal transaction.")]
    Mkdir(put::MkdirArgs),
    /// Remove files, symlinks and (with -r) directories inside an ext2/3/4 image.
    #[command(after_help = "\
Examples:
  dio rm disk.img:/tmp/old.log
  dio rm -r disk.img:/var/cache/app

Blocks and inodes are freed (through the journal on images with one).")]
    Rm(put::RmArgs),
    /// Make a symbolic or hard link inside an ext2/3/4 image.
    #[command(after_help = "\
Examples:
  dio ln -s /usr/bin/python3 disk.img:/usr/local/bin/python
  dio ln disk.img:/etc/passwd disk.img:/etc/passwd.link     a hard link (same inode)

Symlink targets shorter than 60 bytes live in the inode, longer ones in a block. A hard
link (without -s) names an existing non-directory again: its link count goes up and its
ctime moves; directories are refused.")]
    Ln(put::LnArgs),
    /// Set the size of a file inside an ext2/3/4 image (created if missing).
    #[command(after_help = "\
Examples:
  dio truncate -s 0 disk.img:/var/log/big.log
  dio truncate -s 1G disk.img:/sparse          a hole up to 1 GiB

Shrinking frees the blocks past the new size; growing leaves a hole.")]
    Truncate(put::TruncateArgs),
}

/// Which I/O back end `RawFile` uses (`auto` falls back to pread/pwrite where io_uring
/// is unavailable, or when `DIO_DISABLE_URING=1` is set).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring where the kernel allows it, else pread/pwrite.
    Auto,
    /// io_uring (fails if the kernel refuses it).
    Uring,
    /// pread/pwrite on an O_DIRECT descriptor.
    Sync,
}

/// Whether `DIO_DISABLE_URING` (non-empty, not `0`) asks the CLI to use pread/pwrite.
fn uring_disabled_by_env() -> bool {
    std::env::var_os("DIO_DISABLE_URING").is_some_and(|v| !v.is_empty() && v != "0")
}

impl Engine {
    /// The library back end; `auto` honours `DIO_DISABLE_URING=1` (the library
    /// itself reads no environment), which asks for pread/pwrite.
    pub fn backend(self) -> dio::Backend {
        match self {
            Engine::Auto if uring_disabled_by_env() => dio::Backend::Sync,
            Engine::Auto => dio::Backend::Auto,
            Engine::Uring => dio::Backend::Uring,
            Engine::Sync => dio::Backend::Sync,
        }
    }
}

#[derive(Args, Debug)]
struct CatArgs {
    /// File, block device, IMAGE:/PATH, NBD URI, or `-` for stdin.
    #[arg(value_name = "LOCATION")]
    path: OsString,
    /// First byte to write out (K/M/G suffixes).
    #[arg(long, value_parser = size::parse_offset, allow_hyphen_values = true)]
    offset: Option<u64>,
    /// Bytes to write out at most (K/M/G suffixes).
    #[arg(long, value_parser = size::parse_offset, allow_hyphen_values = true)]
    length: Option<u64>,
    #[command(flatten)]
    pipe: copy::PipeArgs,
}

#[derive(Args, Debug)]
struct CpArgs {
    /// Source: file, block device, IMAGE:/PATH, NBD URI, or `-` for stdin.
    #[arg(value_name = "SRC")]
    src: OsString,
    /// Destination file (created or truncated), directory, block device, or
    /// IMAGE:/PATH (created or replaced; -r: a host directory's copy).
    #[arg(value_name = "DST")]
    dst: OsString,
    /// Holes in a file DST: `auto` (and `always`) keeps SRC's holes and turns runs
    /// of zero blocks into holes; `never` writes every byte.
    #[arg(long, value_enum, default_value_t = copy::Sparse::Auto, value_name = "WHEN")]
    sparse: copy::Sparse,
    /// Copy a directory tree out of an image (SRC: IMAGE:/DIR, IMAGE:/ for all).
    #[arg(short = 'r', visible_short_alias = 'R', long = "recursive")]
    recursive: bool,
    /// With -r: keep mode, owner and group (where allowed), atime and mtime.
    #[arg(short = 'p', long = "preserve", requires = "recursive")]
    preserve: bool,
    #[command(flatten)]
    pipe: copy::PipeArgs,
    #[command(flatten)]
    put: put::PutArgs,
}

#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct LsArgs {
    /// Long listing: type and mode, links, owner, group, size, mtime, name.
    #[arg(short = 'l')]
    pub long: bool,
    /// With -l, sizes as 1.5K, 20M (powers of 1024).
    #[arg(short = 'h', long = "human-readable")]
    pub human: bool,
    /// Show entries whose names start with `.`, `.` and `..` included.
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// One name per line (the default).
    #[arg(short = '1')]
    pub one: bool,
    /// Print each entry's inode number first.
    #[arg(short = 'i', long = "inode")]
    pub inode: bool,
    /// IMAGE:/DIR (or IMAGE:/FILE) to list; several may be given.
    #[arg(value_name = "IMAGE:/DIR", required = true)]
    pub dirs: Vec<OsString>,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

#[derive(Args, Debug)]
struct StatArgs {
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// IMAGE:/PATH to describe (a symlink itself, not its target).
    #[arg(value_name = "IMAGE:/PATH")]
    path: OsString,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

#[derive(Args, Debug)]
struct WriteArgs {
    /// File, block device, IMAGE:/PATH or NBD URI to write into.
    #[arg(value_name = "TARGET")]
    target: OsString,
    /// Byte offset to write at (K/M/G suffixes).
    #[arg(long, value_parser = size::parse_offset, allow_hyphen_values = true)]
    offset: u64,
    /// Read the bytes from this file instead of stdin (`-`: stdin).
    #[arg(long)]
    input: Option<PathBuf>,
    /// I/O back end.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Cat(a) => copy::cat(&a.path, a.offset, a.length, &a.pipe),
        Command::Cp(a) if a.pipe.stats && (a.recursive || into_image(&a.dst)) => {
            Err(Failure::usage(
                "--stats counts the source of `dio cat` and of `dio cp` into a file, device \
                 or export; not with -r, not into an image",
            ))
        }
        Command::Cp(a) if a.recursive && into_image(&a.dst) && put::is_host_dir(&a.src) => {
            put::cp_tree(
                &a.src,
                &a.dst,
                &put::TreeArgs {
                    preserve: a.preserve,
                    put: &a.put,
                    progress: !a.pipe.no_progress
                        && (a.pipe.progress
                            || std::io::IsTerminal::is_terminal(&std::io::stderr())),
                    engine: a.pipe.engine,
                },
            )
        }
        Command::Cp(a) if a.recursive => {
            extract::cp_r(&a.src, &a.dst, a.preserve, a.sparse, &a.pipe)
        }
        Command::Cp(a) => into_image(&a.dst)
            .then(|| put::cp(&a.src, &a.dst, &a.put, a.pipe.engine))
            .flatten()
            .unwrap_or_else(|| copy::cp(&a.src, &a.dst, a.sparse, &a.pipe)),
        Command::Ls(a) => ls::run(&a),
        Command::Stat(a) => stat::run(&Location::parse(&a.path)?, a.json, a.engine),
        Command::Write(a) => into_image(&a.target)
            .then(|| put::write(&a.target, a.offset, &a.input, a.engine))
            .flatten()
            .unwrap_or_else(|| write::run(&a.target, a.offset, &a.input, a.engine)),
        Command::Mkdir(a) => put::mkdir(&a),
        Command::Rm(a) => put::rm(&a),
        Command::Ln(a) => put::ln(&a),
        Command::Truncate(a) => put::truncate(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Fsx(a) => fsx::run(&a),
        Command::Crash(a) => crash::run(&a),
    }
}

/// Whether a destination names a path inside an image (IMAGE:/PATH).
fn into_image(arg: &std::ffi::OsStr) -> bool {
    arg != "-" && Location::parse(arg).is_ok_and(|l| l.inner.is_some())
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
        Err(Failure::Quiet) => ExitCode::from(1),
        Err(Failure::Usage(m)) => {
            fail::say(m);
            ExitCode::from(2)
        }
        Err(Failure::Signal { signal, message }) => {
            fail::say(message);
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
    }
}
