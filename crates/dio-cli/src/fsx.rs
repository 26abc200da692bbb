//! `dio fsx TARGET`: the exerciser of the `dio-fsx` crate on the RAM device, a host
//! file, a block device or a file inside an ext image, with a progress line on a
//! terminal, the figures at the end, and exit 1 with the operation log on a
//! divergence.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use dio::RawOptions;
use dio_fsx::{MemTarget, Options, Report, Target};

use crate::fail::{say, Failure};
use crate::location::{Image, Location};
use crate::size::parse_size;
use crate::Engine;

/// Arguments of `dio fsx`.
#[derive(Args, Debug)]
pub struct FsxArgs {
    /// `mem` or `mem:SIZE` (the RAM device, 0xAA-filled, under a test map), a host
    /// file (created, its contents destroyed), a block device (overwritten: needs
    /// --force), or IMAGE:/PATH (a file in an ext image on a host file, block device
    /// or NBD export, overwritten in place).
    target: String,
    /// Seed of the operations (default: from the clock; printed to repeat the run).
    #[arg(long)]
    seed: Option<u64>,
    /// Number of operations [default: 10000].
    #[arg(long, conflicts_with = "duration")]
    ops: Option<u64>,
    /// Run for this many seconds instead of a number of operations.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// I/O back end for host files and block devices.
    #[arg(long, value_enum, default_value = "auto")]
    engine: Engine,
    /// Fraction of device requests failed with EIO (RAM device only), e.g. 0.01.
    #[arg(long, value_name = "RATE", default_value_t = 0.0)]
    faults: f64,
    /// Largest file size (default 4M; for mem:SIZE, SIZE); at most this much of a
    /// block device or ext file is exercised.
    #[arg(long, value_parser = parse_size)]
    span: Option<u64>,
    /// Largest read or write.
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    max_len: u64,
    /// Most async calls in flight in one batch (1 to 1024; 1 runs as 2).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    qd: u16,
    /// fs block of the RAM device's test map.
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    block: u64,
    /// Request limits of the RAM device, SEGMENTS:BYTES (e.g. 256:1M); random
    /// from the seed by default.
    #[arg(long, value_name = "SEGS:BYTES")]
    limits: Option<String>,
    /// Only sector- and block-aligned calls (no byte-granular ones).
    #[arg(long)]
    aligned_only: bool,
    /// Read the whole file back every N operations.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    verify_every: u64,
    /// Operations shown before a divergence.
    #[arg(long, value_name = "N", default_value_t = 64)]
    log: usize,
    /// Allow overwriting a block device.
    #[arg(long)]
    force: bool,
    /// Corrupt the model at this operation (shows what a divergence looks like).
    #[arg(long, hide = true)]
    corrupt_model_at: Option<u64>,
    /// After a clean run, write the bytes fsx expects the file to hold (its
    /// model) to this host file, e.g. to compare with a kernel mount.
    #[arg(long, value_name = "FILE")]
    dump: Option<PathBuf>,
}

/// `dio fsx`.
pub fn run(a: &FsxArgs) -> Result<(), Failure> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1)
    });
    if let Some(secs) = a.duration {
        if !(secs.is_finite() && secs > 0.0) {
            return Err(Failure::usage(
                "--duration must be a number of seconds above 0",
            ));
        }
    }
    let mut span = a.span.unwrap_or(4 << 20);
    fits_in_memory(span, 1, "the model")?;
    let (target, finish) = open_target(a, seed, &mut span)?;
    let mut opts = Options::new(seed).span(span);
    opts = match (a.ops, a.duration) {
        (_, Some(secs)) if secs > 0.0 => opts.duration(Duration::from_secs_f64(secs)),
        (Some(n), _) => opts.ops(n),
        _ => opts.ops(10_000),
    };
    opts.max_len = a.max_len.max(1);
    opts.max_batch = usize::from(a.qd.max(2));
    opts.unaligned = !a.aligned_only;
    opts.verify_every = a.verify_every;
    opts.log_len = a.log.max(1);
    opts.corrupt_model_at = a.corrupt_model_at;
    opts.dump = a.dump.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop));
    opts.stop = Some(Arc::clone(&stop));

    say(format_args!("fsx: {} seed {seed}", target.name()));
    let tty = std::io::stderr().is_terminal();
    let mut progress = |r: &Report| {
        if tty {
            let _ = write!(
                std::io::stderr().lock(),
                "\r{} ops, {:.0} ops/s, {} calls, {} MiB moved   ",
                r.ops,
                r.ops_per_sec(),
                r.calls,
                (r.bytes_read + r.bytes_written) >> 20
            );
        }
    };
    let result = dio_fsx::run(&target, &opts, &mut progress);
    if tty {
        let _ = write!(std::io::stderr().lock(), "\r{:60}\r", "");
    }
    if let (Ok(_), Some(finish)) = (&result, &finish) {
        // The size and the converted extents of the allocating writes, on disk.
        finish().map_err(|e| Failure::msg(format!("fsx: {}: {e}", target.name())))?;
    }
    match result {
        Ok(r) => {
            println!("{r}");
            println!(
                "seed {seed}: {} ops, {:.0} ops/s, 0 divergences",
                r.ops,
                r.ops_per_sec()
            );
            Ok(())
        }
        Err(d) => {
            println!("{d}");
            Err(Failure::msg(format!(
                "fsx: divergence at op {} (repeat with --seed {seed}{})",
                d.op,
                match (a.ops, a.duration) {
                    (_, Some(_)) => String::new(),
                    _ => format!(" --ops {}", d.op),
                }
            )))
        }
    }
}

/// What to do after a clean run (record an allocating writer's size on disk).
type Finish = Box<dyn Fn() -> dio::Result<()>>;

fn open_target(
    a: &FsxArgs,
    seed: u64,
    span: &mut u64,
) -> Result<(Target, Option<Finish>), Failure> {
    if a.faults != 0.0 && !a.target.starts_with("mem") {
        return Err(Failure::msg("--faults needs the RAM device (TARGET mem)"));
    }
    if !(0.0..=1.0).contains(&a.faults) {
        return Err(Failure::msg("--faults is a fraction from 0 to 1"));
    }
    if a.target == "mem" || a.target.starts_with("mem:") {
        if let Some(size) = a.target.strip_prefix("mem:") {
            *span = parse_size(size).map_err(Failure::msg)?;
        }
        let block = u32::try_from(a.block)
            .ok()
            .filter(|b| b.is_power_of_two() && (512..=65536).contains(b))
            .ok_or_else(|| Failure::msg("--block must be a power of two from 512 to 64K"))?;
        if *span < u64::from(block) {
            return Err(Failure::msg("the span must hold at least one block"));
        }
        fits_in_memory(*span, 2, "the RAM device and the model")?;
        let mut cfg = MemTarget::new(*span, seed).faults(a.faults).fs_block(block);
        if let Some(l) = &a.limits {
            let bad = || Failure::msg("--limits takes SEGMENTS:BYTES, e.g. 256:1M");
            let (segs, bytes) = l.split_once(':').ok_or_else(bad)?;
            let segs: u32 = segs.parse().map_err(|_| bad())?;
            let bytes = parse_size(bytes).map_err(Failure::msg)?;
            let bytes = u32::try_from(bytes).map_err(|_| bad())?;
            cfg = cfg.limits(segs.max(1), bytes);
        }
        let t = Target::mem(&cfg).map_err(|e| Failure::msg(e.to_string()))?;
        return Ok((t, None));
    }
    let loc = Location::parse(std::ffi::OsStr::new(&a.target))?;
    if loc.inner.is_some() {
        return open_ext(a, &loc);
    }
    if let crate::location::Source::Nbd(uri) = &loc.source {
        return Err(Failure::msg(format!(
            "{uri}: fsx runs on mem, a host file, a block device or IMAGE:/PATH; a whole NBD export is not a target (a file in an image on it is: {uri}:/PATH)"
        )));
    }
    let path = PathBuf::from(&a.target);
    if path.is_dir() {
        return Err(Failure::at(&path, "is a directory"));
    }
    let block_device = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if block_device && !a.force {
        return Err(Failure::at(
            &path,
            "is a block device: fsx overwrites it (add --force)",
        ));
    }
    let opts = RawOptions {
        write: true,
        create: !block_device,
        backend: a.engine.backend(),
        ..RawOptions::default()
    };
    let raw = crate::copy::open(&path, &opts)?;
    let block = u64::from(raw.direct().geometry().logical_block);
    if block_device && raw.size() < block {
        return Err(Failure::at(
            &path,
            format!(
                "holds {} bytes, less than one {block}-byte block: nothing to exercise",
                raw.size()
            ),
        ));
    }
    Ok((Target::raw(raw), None))
}

/// A file inside an ext image (on a host file, a block device or an NBD export),
/// truncated to 0 at the start, then grown, shrunk and filled by allocating
/// writes; where the image does not allow allocation (features dio does not
/// write), overwritten in place within its size.
fn open_ext(a: &FsxArgs, loc: &Location) -> Result<(Target, Option<Finish>), Failure> {
    let image = Image::open(loc, true, true, a.engine)?;
    // A regular file (the check opens it; a writer needs it closed).
    drop(image.file(loc)?);
    let backend = image.backend_name();
    match image.ext.writer(&image.inode) {
        Ok(w) => {
            let w = std::sync::Arc::new(w);
            let name = format!("ext file {} (allocating, {backend})", loc.display());
            let (r, f) = (std::sync::Arc::clone(&w), std::sync::Arc::clone(&w));
            let t = Target::file(
                name,
                w.direct().clone(),
                Some(Box::new(move |s| r.set_len(s))),
                Some(Box::new((image, w))),
            );
            Ok((t, Some(Box::new(move || f.sync()))))
        }
        Err(e @ (dio::Error::Incompatible(_) | dio::Error::ReadOnly)) => {
            say(format_args!(
                "fsx: {}: no allocating writes ({e}): overwrites in place",
                loc.display()
            ));
            let file = image.file(loc)?;
            // Overwrites stay inside written blocks: refuse holes and unwritten
            // extents up front rather than report them as divergences.
            file.check_write(0, file.size()).map_err(|e| loc.fail(e))?;
            let direct = file.overwriter().map_err(|e| loc.fail(e))?;
            let name = format!("ext file {} ({backend})", loc.display());
            let t = Target::file(name, direct, None, Some(Box::new((image, file))));
            Ok((t, None))
        }
        Err(e) => Err(loc.fail(e)),
    }
}

/// Refuse a span whose `copies` in memory the machine cannot hold, instead of
/// aborting on a failed allocation.
fn fits_in_memory(span: u64, copies: u64, what: &str) -> Result<(), Failure> {
    match mem_available() {
        Some(avail) if span.saturating_mul(copies) > avail => Err(Failure::msg(format!(
            "a span of {} is too large: {what} need{} {copies} x {} of memory, and {} is available",
            span,
            if copies == 1 { "s" } else { "" },
            crate::size::human(span),
            crate::size::human(avail)
        ))),
        _ => Ok(()),
    }
}

/// `MemAvailable` of /proc/meminfo in bytes, if it can be read.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}
