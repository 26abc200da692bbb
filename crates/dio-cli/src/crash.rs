//! `dio crash`: record a workload's device traffic, then replay every crash state
//! it could leave and check each (the `dio_crash` crate does the work).
//!
//! - `dio crash record LOG TARGET OP...`: run OPs (writes, flushes, marks) on a host
//!   file or block device, or on a file inside an ext image (`IMAGE:/PATH`, in
//!   place), through a recording device, and end as every dio command ends: with
//!   a flush, the written bytes claimed durable.
//! - `dio crash replay LOG --base IMAGE --check CHECK...`: build the crash states and
//!   check them; a summary and a command that rebuilds the first failing state.
//! - `dio crash state LOG --base IMAGE --at SPEC --out FILE`: rebuild one state.
//! - `dio crash log LOG`: list the records.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use dio::{Device, DirectFile, FileState, Flags, IdentityMap, SyncConfig, SyncDevice};
use dio_crash::{
    Base, Checker, CommandChecker, E2fsckChecker, ExpectedFile, FilesChecker, Log, ModelChecker,
    MountChecker, Record, Recorder, ReplayOptions, StateSpec,
};

use crate::fail::Failure;
use crate::location::{Location, Source};
use crate::size;

/// Print a line on stdout; a reader that went away ends the command quietly.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        match writeln!(std::io::stdout().lock(), $($t)*) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(Failure::BrokenPipe),
            Err(e) => return Err(Failure::msg(format!("writing to stdout: {e}"))),
        }
    }};
}

/// `dio crash` arguments.
#[derive(Args, Debug)]
pub struct CrashArgs {
    #[command(subcommand)]
    cmd: CrashCmd,
}

#[derive(Subcommand, Debug)]
enum CrashCmd {
    /// Run write/flush operations on TARGET through a device that logs every write,
    /// flush and mark to LOG.
    #[command(after_help = "\
Examples:
  cp disk.img base.img
  dio crash record run.log disk.img write:4096:new.bin fill:0:1M:0xab flush mark:half dfill:8k:512:7
  dio crash record run.log disk.img:/etc/motd write:0:motd.txt     in place, inside an ext image

OPERATIONS (one argument each; OFFSET and LEN take K/M/G suffixes):
  write:OFFSET:FILE     write FILE's bytes at OFFSET (any offset: partial blocks are
                        read, patched and written back)
  fill:OFFSET:LEN:BYTE  write LEN copies of BYTE (decimal or 0x..)
  dwrite:..., dfill:... the same with O_DSYNC (inside an image: followed by a flush);
                        the bytes are claimed durable as soon as it returns
  flush                 flush the device (fdatasync)
  sync                  flush, then claim every byte written since the last claim
  mark:NAME             a named position in the log (shown by replay)

TARGET is a host file or block device (written in place: it does not grow), or
IMAGE:/PATH, a regular file inside an ext2/3/4 image (overwritten in place, as
`dio write` does; mtime and ctime are updated). After the last operation, record
ends as every dio command that changes a target does: `sync` (durable before exit 0).

Keep a copy of TARGET from before the run (or use --save-base): replay needs it.")]
    Record(RecordArgs),
    /// Build every crash state LOG allows over the base image and check each.
    #[command(after_help = "\
Examples:
  dio crash replay run.log --base base.img --check model
  dio crash replay run.log --base base.img --check e2fsck --check model --max-states 2000
  dio crash replay run.log --base base.img --check mount --expect /etc/motd=motd.txt
  dio crash replay run.log --base base.img --check 'cmp -n 4096 \"$1\" golden.img'

CHECKS (--check, repeatable):
  model   every byte claimed durable (dsync writes, `sync`) before the crash holds
          its value or that of a write issued after the claim; every durable write
          is there
  e2fsck  e2fsck -fy -E journal_only (the journal replay a mount does), then
          e2fsck -fn must find nothing (on a copy of the state)
  mount   a kernel loop mount of a copy (root) must show every --expect file in one
          of its versions
  files   the same through dio's own ext reader (no root, no image file)
  CMD     anything else is a shell command: sh -c CMD sh IMAGE, with DIO_CRASH_IMAGE
          and DIO_CRASH_STATE set; exit 0 passes

States: the durable prefix at every flush and FUA write; in each window between
them, the crash just before the closing barrier with none and with all of the
volatile writes landed, then seeded random subsets (torn and reordered) up to
--per-window. The summary gives the first failing state and the command that
rebuilds it. Exit status 1 if any state failed.")]
    Replay(ReplayArgs),
    /// Write one crash state as an image file.
    #[command(after_help = "\
Examples:
  dio crash state run.log --base base.img --at 17 --out state.img
  dio crash state run.log --base base.img --at 17:1:12,15/0-3 --out state.img

SPEC is AT[:SEED[:KEPT]]: the crash after AT log records, the seed of the landing
order of concurrent writes, and the volatile writes that landed (record indices,
each optionally /A-B.C-D: the 512-byte sectors that landed of a torn write).
`dio crash replay` prints the SPEC of each failing state.")]
    State(StateArgs),
    /// List the records of a log.
    Log(LogArgs),
}

#[derive(Args, Debug)]
struct RecordArgs {
    /// The log to write (created or truncated).
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// Host file, block device or IMAGE:/PATH to run the operations on.
    #[arg(value_name = "TARGET")]
    target: OsString,
    /// Operations, in order (see below).
    #[arg(value_name = "OP", required = true)]
    ops: Vec<String>,
    /// Copy TARGET's image (the whole file or device) here before the first write.
    #[arg(long, value_name = "FILE")]
    save_base: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// The log to replay.
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// The image as it was when recording began (default: a zero-filled device).
    #[arg(long, value_name = "IMAGE")]
    base: Option<PathBuf>,
    /// A check to run on every state: model, e2fsck, mount, files, or a command.
    #[arg(long = "check", value_name = "CHECK", required = true)]
    checks: Vec<String>,
    /// PATH=FILE: the file PATH in the image must hold FILE's bytes (repeat PATH
    /// for more acceptable versions; PATH= allows it to be absent). For mount and
    /// files.
    #[arg(long = "expect", value_name = "PATH=FILE")]
    expect: Vec<String>,
    /// Most states in all (an even spread over the log).
    #[arg(long, value_name = "N")]
    max_states: Option<usize>,
    /// Most states per window between barriers.
    #[arg(long, value_name = "N", default_value_t = 8)]
    per_window: usize,
    /// Seed of the random states.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// Never tear a write.
    #[arg(long)]
    no_torn: bool,
    /// Bytes the device writes atomically: a torn write loses or keeps whole
    /// aligned units of this size. 512 assumes the least; 4096 is a disk with
    /// 4 KiB physical sectors (ext4 counts on its 1 KiB superblock being written
    /// whole: with 512, a torn superblock write fails its checksum).
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_unit)]
    atomic_unit: u64,
    /// Directory for temporary state images (default: next to the log).
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct StateArgs {
    /// The log.
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// The image as it was when recording began (default: zeros).
    #[arg(long, value_name = "IMAGE")]
    base: Option<PathBuf>,
    /// The state (as `dio crash replay` prints it).
    #[arg(long, value_name = "SPEC")]
    at: String,
    /// The image file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct LogArgs {
    /// The log.
    #[arg(value_name = "LOG")]
    log: PathBuf,
}

/// `dio crash ...`.
pub fn run(a: &CrashArgs) -> Result<(), Failure> {
    match &a.cmd {
        CrashCmd::Record(r) => record(r),
        CrashCmd::Replay(r) => replay(r),
        CrashCmd::State(s) => state(s),
        CrashCmd::Log(l) => list(l),
    }
}

fn crash_fail(e: dio_crash::CrashError) -> Failure {
    Failure::msg(e.to_string())
}

/// One parsed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
        dsync: bool,
    },
    Flush,
    Sync,
    Mark(String),
}

fn parse_byte(s: &str) -> Option<u8> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_op(s: &str) -> Result<Op, Failure> {
    let bad = |why: &str| {
        Failure::usage(format!(
            "operation `{s}`: {why} (see dio crash record --help)"
        ))
    };
    let (name, rest) = s.split_once(':').unwrap_or((s, ""));
    let num = |t: &str| size::parse_offset(t).map_err(|e| bad(&e));
    match name {
        "flush" if rest.is_empty() => Ok(Op::Flush),
        "sync" if rest.is_empty() => Ok(Op::Sync),
        "mark" if !rest.is_empty() => Ok(Op::Mark(rest.to_string())),
        "write" | "dwrite" => {
            let (off, file) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected write:OFFSET:FILE"))?;
            let data = std::fs::read(file).map_err(|e| Failure::msg(format!("{file}: {e}")))?;
            Ok(Op::Write {
                offset: num(off)?,
                data,
                dsync: name == "dwrite",
            })
        }
        "fill" | "dfill" => {
            let parts: Vec<&str> = rest.split(':').collect();
            let [off, len, byte] = parts[..] else {
                return Err(bad("expected fill:OFFSET:LEN:BYTE"));
            };
            let len = num(len)?;
            let byte = parse_byte(byte).ok_or_else(|| bad("BYTE is 0..255 or 0x00..0xff"))?;
            if len > 1 << 30 {
                return Err(bad("LEN above 1 GiB"));
            }
            Ok(Op::Write {
                offset: num(off)?,
                data: vec![byte; len as usize],
                dsync: name == "dfill",
            })
        }
        _ => Err(bad("unknown operation")),
    }
}

/// Writes since the last `sync`, as (device offset, bytes, claimed already)
/// pieces, oldest first.
#[derive(Default)]
struct Pending(Vec<(u64, Vec<u8>, bool)>);

impl Pending {
    /// Claim every piece not claimed yet as it stands now (later pieces, dsync
    /// ones included, patched in).
    fn claim<D: dio::Device>(&mut self, rec: &Recorder<D>) -> Result<(), Failure> {
        let pieces = std::mem::take(&mut self.0);
        for (i, (off, data, claimed)) in pieces.iter().enumerate() {
            if *claimed {
                continue;
            }
            let mut now = data.clone();
            for (o2, d2, _) in &pieces[i + 1..] {
                let lo = (*off).max(*o2);
                let hi = (off + now.len() as u64).min(o2 + d2.len() as u64);
                if lo < hi {
                    now[(lo - off) as usize..(hi - off) as usize]
                        .copy_from_slice(&d2[(lo - o2) as usize..(hi - o2) as usize]);
                }
            }
            rec.claim(*off, &now)
                .map_err(|e| Failure::msg(format!("writing the log: {e}")))?;
        }
        Ok(())
    }
}

fn record(a: &RecordArgs) -> Result<(), Failure> {
    let ops: Vec<Op> = a
        .ops
        .iter()
        .map(|s| parse_op(s))
        .collect::<Result<_, _>>()?;
    let loc = Location::parse(&a.target)?;
    let Source::Host(path) = &loc.source else {
        return Err(Failure::usage(
            "crash record runs on a host file, a block device or IMAGE:/PATH, not on an NBD export",
        ));
    };
    // The writes go under any file system mounted from it, as `write` and `cp`
    // refuse to do.
    if let Some(holder) = dio::probe::in_use(path) {
        return Err(Failure::msg(format!(
            "refusing to write: {holder} (writing under a mounted file system corrupts \
             it; unmount it first)"
        )));
    }
    if let Some(b) = &a.save_base {
        save_copy(path, b)?;
    }
    let (file, geo) = dio::probe::open_probed(path, true).map_err(|e| Failure::at(path, e))?;
    let dev =
        SyncDevice::new(file, geo, &SyncConfig::default()).map_err(|e| Failure::at(path, e))?;
    let rec = Arc::new(Recorder::create(dev, &a.log).map_err(crash_fail)?);
    let log_fail = |e: std::io::Error| Failure::msg(format!("{}: {e}", a.log.display()));
    let mut pending = Pending::default();
    let mut ops = ops;
    ops.push(Op::Sync);
    match &loc.inner {
        None => {
            let size = geo.size;
            // A host file ends where its bytes end, maybe inside its last block
            // (the device's size is rounded up to a whole block).
            let meta = std::fs::metadata(path).map_err(|e| Failure::at(path, e))?;
            let end = if meta.is_file() { meta.len() } else { size };
            // Every write in place, checked before the first one runs.
            for op in &ops {
                if let Op::Write { offset, data, .. } = op {
                    if offset.saturating_add(data.len() as u64) > end {
                        return Err(Failure::at(
                            path,
                            format!(
                                "a write of {} bytes at {offset} ends past the end ({end} bytes): record writes in place",
                                data.len()
                            ),
                        ));
                    }
                }
            }
            let direct = DirectFile::new(
                rec.clone(),
                Arc::new(IdentityMap::new(geo.logical_block, size)),
                Arc::new(FileState::new(size)),
            )
            .map_err(|e| Failure::at(path, e))?;
            for op in &ops {
                match op {
                    Op::Write {
                        offset,
                        data,
                        dsync,
                    } => {
                        let mut flags = Flags::UNALIGNED;
                        if *dsync {
                            flags |= Flags::DSYNC;
                        }
                        let n = direct
                            .write_at(*offset, data, flags)
                            .map_err(|e| Failure::at(path, format!("write at {offset}: {e}")))?;
                        if n != data.len() {
                            return Err(Failure::at(
                                path,
                                format!("short write at {offset}: {n} of {}", data.len()),
                            ));
                        }
                        if *dsync {
                            rec.claim(*offset, data).map_err(log_fail)?;
                        }
                        pending.0.push((*offset, data.clone(), *dsync));
                    }
                    Op::Flush => direct.sync_data().map_err(|e| Failure::at(path, e))?,
                    Op::Sync => {
                        direct.sync_data().map_err(|e| Failure::at(path, e))?;
                        pending.claim(&rec)?;
                    }
                    Op::Mark(m) => {
                        rec.mark(m).map_err(log_fail)?;
                    }
                }
            }
            // A write into a partial last block went to the device whole and grew
            // the file to the block's end: cut it back to where its bytes end (what
            // `pwrite` leaves), durably.
            if meta.is_file() && end < size {
                let f = File::options()
                    .write(true)
                    .open(path)
                    .map_err(|e| Failure::at(path, e))?;
                f.set_len(end)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| Failure::at(path, format!("cut back to {end} bytes: {e}")))?;
            }
        }
        Some(inner) => {
            let shown = String::from_utf8_lossy(inner).into_owned();
            let fs = dio::ext::Ext::open_writable(rec.clone(), geo.size)
                .map_err(|e| Failure::at(path, e))?;
            let inode = fs
                .lookup(inner, true)
                .map_err(|e| Failure::at(path, format!("{shown}: {e}")))?;
            let file = fs
                .open_file(&inode)
                .map_err(|e| Failure::at(path, format!("{shown}: {e}")))?;
            let extents = fs
                .extents(&inode)
                .map_err(|e| Failure::at(path, format!("{shown}: {e}")))?;
            let bs = u64::from(fs.block_size());
            let fail = |e: dio::Error| Failure::at(path, format!("{shown}: {e}"));
            for op in &ops {
                match op {
                    Op::Write {
                        offset,
                        data,
                        dsync,
                    } => {
                        file.overwrite(*offset, data).map_err(fail)?;
                        let pieces = device_pieces(&extents, bs, *offset, data);
                        if *dsync {
                            rec.flush().map_err(|e| Failure::at(path, e))?;
                            for (o, d) in &pieces {
                                rec.claim(*o, d).map_err(log_fail)?;
                            }
                        }
                        pending
                            .0
                            .extend(pieces.into_iter().map(|(o, d)| (o, d, *dsync)));
                    }
                    Op::Flush => rec.flush().map_err(|e| Failure::at(path, e))?,
                    Op::Sync => {
                        rec.flush().map_err(|e| Failure::at(path, e))?;
                        pending.claim(&rec)?;
                    }
                    Op::Mark(m) => {
                        rec.mark(m).map_err(log_fail)?;
                    }
                }
            }
        }
    }
    rec.sync_log().map_err(log_fail)?;
    say!(
        "{}: {} records ({} operations on {})",
        a.log.display(),
        rec.position(),
        a.ops.len(),
        a.target.to_string_lossy()
    );
    Ok(())
}

/// Where the bytes of a write at file `offset` went on the device.
fn device_pieces(
    extents: &[dio::ext::FileExtent],
    bs: u64,
    offset: u64,
    data: &[u8],
) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let end = offset + data.len() as u64;
    for e in extents {
        let (lo, hi) = (
            (e.logical * bs).max(offset),
            ((e.logical + e.len) * bs).min(end),
        );
        if lo < hi {
            let dev = e.physical * bs + (lo - e.logical * bs);
            out.push((
                dev,
                data[(lo - offset) as usize..(hi - offset) as usize].to_vec(),
            ));
        }
    }
    out
}

fn save_copy(from: &Path, to: &Path) -> Result<(), Failure> {
    let mut src = File::open(from).map_err(|e| Failure::at(from, e))?;
    let mut dst = File::create(to).map_err(|e| Failure::at(to, e))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| Failure::at(to, e))?;
    dst.sync_all().map_err(|e| Failure::at(to, e))
}

fn parse_expect(list: &[String]) -> Result<Vec<ExpectedFile>, Failure> {
    let mut files: Vec<ExpectedFile> = Vec::new();
    for e in list {
        let (path, file) = e
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--expect `{e}`: expected PATH=FILE")))?;
        if !path.starts_with('/') {
            return Err(Failure::usage(format!(
                "--expect `{e}`: PATH is absolute inside the image (/dir/name)"
            )));
        }
        let version = if file.is_empty() {
            None
        } else {
            Some(std::fs::read(file).map_err(|err| Failure::msg(format!("{file}: {err}")))?)
        };
        match files.iter_mut().find(|f| f.path == path) {
            Some(f) => f.versions.push(version),
            None => files.push(ExpectedFile {
                path: path.to_string(),
                versions: vec![version],
            }),
        }
    }
    Ok(files)
}

fn base_of(p: &Option<PathBuf>) -> Result<Base, Failure> {
    match p {
        None => Ok(Base::Zeros),
        Some(p) => {
            std::fs::metadata(p).map_err(|e| Failure::at(p, e))?;
            Ok(Base::File(p.clone()))
        }
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-:,+=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn replay(a: &ReplayArgs) -> Result<(), Failure> {
    let log = Arc::new(Log::open(&a.log).map_err(crash_fail)?);
    let base = base_of(&a.base)?;
    let files = parse_expect(&a.expect)?;
    let scratch = match &a.scratch {
        Some(d) => d.clone(),
        None => {
            let parent = a
                .log
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            parent.join(format!(".dio-crash-{}", std::process::id()))
        }
    };
    let mut owned: Vec<Box<dyn Checker>> = Vec::new();
    for c in &a.checks {
        owned.push(match c.as_str() {
            "model" => Box::new(ModelChecker::new()),
            "e2fsck" => Box::new(E2fsckChecker),
            "mount" | "files" if files.is_empty() => {
                return Err(Failure::usage(format!(
                    "--check {c} needs at least one --expect PATH=FILE"
                )))
            }
            "mount" => Box::new(MountChecker {
                files: files.clone(),
                scratch: scratch.clone(),
            }),
            "files" => Box::new(FilesChecker {
                files: files.clone(),
            }),
            cmd => Box::new(CommandChecker {
                command: cmd.to_string(),
            }),
        });
    }
    let checkers: Vec<&dyn Checker> = owned.iter().map(|b| b.as_ref()).collect();
    let opts = ReplayOptions {
        max_per_window: a.per_window.max(1),
        max_states: a.max_states,
        seed: a.seed,
        torn: !a.no_torn,
        atomic_unit: a.atomic_unit,
    };
    let result = dio_crash::run(&log, base, &checkers, &opts, &scratch);
    if a.scratch.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let sum = result.map_err(crash_fail)?;
    say!(
        "log: {} ({} records{})",
        a.log.display(),
        sum.records,
        if sum.ignored_tail > 0 {
            format!(", a torn tail of {} bytes ignored", sum.ignored_tail)
        } else {
            String::new()
        }
    );
    say!(
        "states checked: {}, failed: {} ({:.1} states/s, {:.1} s)",
        sum.states,
        sum.failed,
        sum.rate(),
        sum.elapsed.as_secs_f64()
    );
    for (c, why) in &sum.skipped {
        say!("skipped: {c}: {why}");
    }
    let Some(first) = sum.failures.first() else {
        return Ok(());
    };
    let mark = first
        .mark
        .as_ref()
        .map(|(i, m)| format!(" (after mark {m:?} at record {i})"))
        .unwrap_or_default();
    say!(
        "first failing state: position {}{mark}, state {}",
        first.spec.at,
        first.spec
    );
    say!(
        "  {}: {}",
        first.checker,
        first.message.replace('\n', "\n    ")
    );
    let base_arg = a
        .base
        .as_ref()
        .map(|b| format!(" --base {}", shell_quote(&b.to_string_lossy())))
        .unwrap_or_default();
    say!(
        "rebuild it: dio crash state {}{base_arg} --at {} --out state.img",
        shell_quote(&a.log.to_string_lossy()),
        first.spec
    );
    Err(Failure::msg(format!(
        "{} of {} crash states failed",
        sum.failed, sum.states
    )))
}

fn state(a: &StateArgs) -> Result<(), Failure> {
    let spec: StateSpec =
        a.at.parse()
            .map_err(|e| Failure::usage(format!("--at: {e}")))?;
    let log = Arc::new(Log::open(&a.log).map_err(crash_fail)?);
    let scratch = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut rep = dio_crash::Replayer::new(log, base_of(&a.base)?, scratch).map_err(crash_fail)?;
    let view = rep.state(&spec).map_err(crash_fail)?;
    view.write_image(&a.out).map_err(crash_fail)?;
    say!("{}: state {spec} ({} bytes)", a.out.display(), view.size());
    Ok(())
}

fn list(a: &LogArgs) -> Result<(), Failure> {
    let log = Log::open(&a.log).map_err(crash_fail)?;
    let h = log.header();
    say!(
        "device: {} bytes, {}-byte logical blocks; {} records",
        h.device_size,
        h.logical_block,
        log.records().len()
    );
    let an = dio_crash::Analysis::new(&log);
    let n = log.records().len() as u64;
    for (i, r) in log.records().iter().enumerate() {
        let line = match r {
            Record::Write(w) => format!(
                "write {} bytes at {}{}{}{} (submitted after {} records)",
                w.len,
                w.offset,
                if w.fua { ", FUA" } else { "" },
                if w.failed { ", FAILED" } else { "" },
                if an.durable(i as u64, n) {
                    ""
                } else {
                    ", never made durable"
                },
                w.submitted
            ),
            Record::Flush { covers } => format!("flush (covers records below {covers})"),
            Record::Mark(m) => format!("mark {m:?}"),
            Record::Claim { offset, len, .. } => format!("claim {len} bytes at {offset} durable"),
        };
        say!("{i:>6}  {line}");
    }
    if log.ignored_tail() > 0 {
        say!("(a torn tail of {} bytes ignored)", log.ignored_tail());
    }
    Ok(())
}

/// An atomic unit: a power of two from 512 bytes to 1 MiB.
fn parse_unit(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !n.is_power_of_two() || !(512..=1 << 20).contains(&n) {
        return Err(format!("{n} is not a power of two from 512 to 1048576"));
    }
    Ok(n)
}
