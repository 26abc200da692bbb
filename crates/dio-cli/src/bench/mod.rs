//! `dio bench`: one workload on a target (human or JSON output), or without a target
//! the built-in suite (`suite.rs`): direct against buffered with both on the disk,
//! against fio where installed, under a buffered writer, with a plot, on a scratch
//! file in the current directory that is removed afterwards (also on error and
//! Ctrl-C).

mod cache;
mod cpu;
mod fio;
mod hist;
mod plot;
mod run;
mod suite;

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Args;
use dio::nbd::NbdFile;
use dio::nbd::{NbdConfig, NbdUri};
use dio::{AlignedBuf, DioFuture, DirectFile, Flags};
use dio::{RawFile, RawOptions};
use serde_json::{json, Value};

use crate::copy::open;
use crate::fail::{say, Failure};
use crate::segments::{Chunks, DataSegments};
use crate::size::{human, parse_size};
use crate::Engine;
use run::{Report, Rw, Workload};

/// Where the suite (and a target-less `--rw` run) measures.
const SCRATCH: &str = "dio-bench.tmp";
/// Size of a created target when --size does not say.
const DEFAULT_SIZE: u64 = 256 << 20;
/// `dio bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// File, block device or NBD URI to measure; a file is created and laid out if
    /// missing or smaller than --size. Without it (and without --rw): the
    /// direct-vs-buffered suite.
    pub target: Option<PathBuf>,
    /// Access pattern [default: randread].
    #[arg(long, value_enum)]
    pub rw: Option<Rw>,
    /// Bytes per I/O, K/M/G suffixes [default: 4k for rand*, 1M for read/write].
    #[arg(long, value_parser = parse_size)]
    pub bs: Option<u64>,
    /// I/Os kept in flight [default: 32 for rand*, 8 for read/write].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub qd: Option<u32>,
    /// Jobs (threads) running the workload at once, each with --qd in flight and,
    /// on io_uring, a ring of its own (fio's --numjobs with --group_reporting): one
    /// combined report, per-job figures in --json. CPU is the whole process's, in
    /// percent of one core. With --buffered: --qd threads per job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub jobs: u32,
    /// NBD targets: connections to open where the server allows several
    /// (multi-conn), each job keeping to one [default: --jobs].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: Option<u32>,
    /// Bytes of the target to use [default: the file's size, else 256M].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seconds per run [default: 5; 1.5 per run in the suite].
    #[arg(long)]
    pub runtime: Option<f64>,
    /// Seconds to run the workload before measuring (fio's --ramp_time): the
    /// I/Os of the ramp are not counted, and IOPS, latency and CPU are taken over
    /// --runtime after it. A machine that was idle (a VM's virtual CPUs and disk)
    /// is slower for the first second or so: ramp both sides of a comparison
    /// alike [default: 0].
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// I/O back end of the direct runs.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Print one JSON object (iops, bw_bytes, lat_ns {p50, p99, p999}, cpu_usr,
    /// cpu_sys, batch, and with --jobs a "jobs" array of the same per job) instead
    /// of text.
    #[arg(long)]
    pub json: bool,
    /// Measure the page cache instead (pread/pwrite, one thread per queue slot).
    #[arg(long)]
    pub buffered: bool,
    /// Allow write workloads on a block device (destroys its data).
    #[arg(long)]
    pub force: bool,
    /// Shift every offset by this many bytes: byte-granular (unaligned) I/O, to
    /// compare its cost with aligned runs (direct runs only).
    #[arg(long, value_parser = parse_size, default_value_t = 0)]
    pub skew: u64,
    /// I/Os submitted to io_uring together at most (fio's --iodepth_batch_submit):
    /// the I/Os started for a round of completions go to the kernel in one enter
    /// (the last of a round in the enter that also waits for the next completions),
    /// saving a system call per I/O; 1 submits each I/O at its call's end, one enter
    /// per I/O, as fio does by default [default: a quarter of --qd].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: Option<u32>,
    /// Register the I/O buffers with the io_uring ring once (fixed buffers: no page
    /// pinning per I/O), as fio's --fixedbufs does.
    #[arg(long)]
    pub fixed_bufs: bool,
    /// Draw the latency distributions (CDFs) into FILE: SVG, or an HTML page if it
    /// ends in .html [default for the suite without --json: ./dio-bench.svg].
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Count the device requests of the direct run (dio::StatsDevice) and print
    /// them: requests, bytes, most in flight, errors, the device's latency
    /// percentiles, and the engine's merges and splits. Costs an allocation and a
    /// few atomic additions per request.
    #[arg(long)]
    pub stats: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The signal that stopped the runs (0: none).
static SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// Whether Ctrl-C (or SIGTERM, SIGHUP) arrived: runs stop early, scratch files go
/// away.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn catch_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook::flag;
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // A second signal exits at once; the first asks for a clean stop.
        let _ = flag::register_conditional_shutdown(sig, 128 + sig, &INTERRUPTED);
        let _ = flag::register(sig, &INTERRUPTED);
        let _ = flag::register_usize(sig, &SIGNAL, sig as usize);
    }
}

fn stop_if_interrupted() -> Result<(), Failure> {
    if interrupted() {
        Err(interrupt_failure())
    } else {
        Ok(())
    }
}

/// How a signal ends the runs: exit 128 + the signal, as `cp` (130 for Ctrl-C).
fn interrupt_failure() -> Failure {
    match SIGNAL.load(Ordering::Relaxed) as i32 {
        0 | libc::SIGINT => Failure::Interrupted,
        signal => Failure::Signal {
            signal,
            message: if signal == libc::SIGTERM {
                "terminated (SIGTERM)".to_string()
            } else {
                format!("stopped by signal {signal}")
            },
        },
    }
}

/// A file of ours that goes away when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn here() -> Scratch {
        Scratch(Path::new(".").join(SCRATCH))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `dio bench`.
pub fn run(args: &BenchArgs) -> Result<(), Failure> {
    if let Some(r) = args.runtime {
        if !(r.is_finite() && r > 0.0 && r <= 86_400.0) {
            return Err(Failure::usage(
                "--runtime must be a number of seconds above 0",
            ));
        }
    }
    if !(args.ramp.is_finite() && (0.0..=86_400.0).contains(&args.ramp)) {
        return Err(Failure::usage(
            "--ramp must be a number of seconds, 0 or more",
        ));
    }
    if args.bs == Some(0) || args.size == Some(0) {
        return Err(Failure::usage("--bs and --size must be above 0"));
    }
    if let Some(p) = &args.plot {
        // Before the runs, not after them.
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) || p.is_dir() {
            return Err(Failure::at(
                p,
                "--plot needs a file in an existing directory",
            ));
        }
    }
    if args.jobs > 1 && args.target.is_none() && args.rw.is_none() {
        return Err(Failure::usage(
            "--jobs runs one workload: give a target or --rw (the suite runs one job)",
        ));
    }
    catch_signals();
    match (&args.target, args.rw) {
        (None, None) => suite::suite(args),
        (Some(target), _) => single(target, args),
        (None, Some(_)) => {
            let scratch = Scratch::here();
            single(&scratch.0, args)
        }
    }
}

/// The target, open and laid out.
struct Target {
    raw: RawFile,
    size: u64,
}

fn ring_depth(qd: u32) -> u32 {
    qd.saturating_mul(8).clamp(128, 4096).next_power_of_two()
}

/// Open `path` for a workload, creating and laying it out if it is a file smaller
/// than `size` (fio's "laying out IO file").
fn prepare(
    path: &Path,
    size: Option<u64>,
    args: &BenchArgs,
    write: bool,
    qd: u32,
) -> Result<Target, Failure> {
    let meta = std::fs::metadata(path).ok();
    if meta.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Failure::at(path, "is a directory"));
    }
    let is_device = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    if is_device && write && !args.force {
        return Err(Failure::at(
            path,
            "is a block device and this workload writes to it, destroying its data; add --force to do it anyway",
        ));
    }
    let existing = meta.as_ref().map_or(0, |m| m.len());
    let file_size = size.unwrap_or(if existing > 0 { existing } else { DEFAULT_SIZE });
    let lay_out_needed = !is_device && existing < file_size;
    let raw = open(
        path,
        &RawOptions {
            write: write || lay_out_needed,
            create: lay_out_needed,
            backend: args.engine.backend(),
            queue_depth: ring_depth(qd),
            // One job submits and reaps on this thread only; several get a ring
            // each, on their own threads.
            single_thread: args.jobs <= 1,
            ring_per_thread: args.jobs > 1,
            ..RawOptions::default()
        },
    )?;
    let size = if is_device {
        let dev = raw.size();
        if dev == 0 {
            return Err(Failure::at(path, "holds 0 bytes: nothing to measure"));
        }
        let size = size.unwrap_or(dev);
        if size > dev {
            return Err(Failure::at(
                path,
                format!("--size {size} is larger than the device ({dev} bytes)"),
            ));
        }
        size
    } else {
        file_size
    };
    if lay_out_needed {
        lay_out(&raw, path, size)?;
    }
    Ok(Target { raw, size })
}

/// Fill `[0, size)` with data through dio, 1 MiB at a time, 8 in flight.
fn lay_out(raw: &RawFile, path: &Path, size: u64) -> Result<(), Failure> {
    const CHUNK: u64 = 1 << 20;
    const DEPTH: usize = 8;
    say(format_args!(
        "laying out {} ({})",
        path.display(),
        human(size)
    ));
    let file = raw.direct();
    let geo = file.geometry();
    let block = u64::from(geo.logical_block);
    let fail = |e: dio::Error| Failure::at(path, e);
    raw.set_len(size.div_ceil(block) * block).map_err(fail)?;
    let mut inflight: VecDeque<(usize, DioFuture<AlignedBuf>)> = VecDeque::new();
    let mut free: Vec<AlignedBuf> = Vec::new();
    let mut chunks = Chunks::new(DataSegments::whole(size), block, CHUNK, size);
    let mut result = Ok(());
    loop {
        while result.is_ok() && inflight.len() < DEPTH && !interrupted() {
            let Some(c) = chunks.next() else { break };
            let c = c.map_err(|e| Failure::at(path, e))?;
            let buf = match free.pop() {
                Some(b) if b.len() == c.len => b,
                _ => {
                    let mut b = AlignedBuf::new(c.len, geo.buffer_align());
                    run::pattern(&mut b, c.off + 1);
                    b
                }
            };
            inflight.push_back((c.len, file.write_future(c.off, vec![buf], Flags::NONE)));
        }
        let Some((len, fut)) = inflight.pop_front() else {
            break;
        };
        let mut done = fut.wait();
        match done.result {
            Ok(n) if n == len => free.extend(done.bufs.pop()),
            Ok(n) => {
                if result.is_ok() {
                    result = Err(Failure::at(
                        path,
                        format!("short write laying out: {n} of {len}"),
                    ));
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(fail(e));
                }
            }
        }
    }
    result?;
    stop_if_interrupted()?;
    raw.set_len(size).map_err(fail)
}

/// I/Os submitted together at most: --batch, else a quarter of the queue depth.
fn batch_for(args: &BenchArgs, qd: u32) -> u32 {
    args.batch.unwrap_or((qd / 4).max(1))
}

fn span(size: u64, bs: u64) -> Result<u64, Failure> {
    let span = size / bs * bs;
    if span == 0 {
        return Err(Failure::usage(format!(
            "--size ({size} bytes) is smaller than --bs ({bs} bytes)"
        )));
    }
    Ok(span)
}

fn runtime(args: &BenchArgs, default: f64) -> Duration {
    Duration::from_secs_f64(args.runtime.unwrap_or(default))
}

fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Failure::BrokenPipe
            } else {
                Failure::msg(format!("stdout: {e}"))
            }
        })
}

fn open_buffered(path: &Path, write: bool) -> Result<File, Failure> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| Failure::at(path, e))
}

/// An NBD export to measure in place: writes need --force (they destroy its data,
/// as on a block device), and there is no page cache to compare with.
fn open_nbd(uri: &str, args: &BenchArgs, rw: Rw) -> Result<NbdFile, Failure> {
    if args.buffered {
        return Err(Failure::usage(format!(
            "{uri}: --buffered needs a host file, not an NBD export"
        )));
    }
    if rw.is_write() && !args.force {
        return Err(Failure::msg(format!(
            "{uri}: this workload writes to the export, destroying its data; add --force to do it anyway"
        )));
    }
    let conns = args.connections.unwrap_or(args.jobs) as usize;
    let file = NbdFile::open_uri(uri, rw.is_write(), &NbdConfig::default().connections(conns))
        .map_err(|e| Failure::msg(e.to_string()))?;
    for note in file.notes() {
        say(note);
    }
    Ok(file)
}

/// One workload on `path`.
fn single(path: &Path, args: &BenchArgs) -> Result<(), Failure> {
    let rw = args.rw.unwrap_or(Rw::Randread);
    let (bs, qd) = if rw.is_random() {
        (4096, 32)
    } else {
        (1 << 20, 8)
    };
    let bs = args.bs.unwrap_or(bs);
    let qd = args.qd.unwrap_or(qd);
    let nbd;
    let uri = path.to_str().filter(|s| NbdUri::is_nbd_uri(s));
    let target = match uri {
        Some(_) => None,
        None => Some(prepare(path, args.size, args, rw.is_write(), qd)?),
    };
    let (direct, size, backend) = match (uri, &target) {
        (Some(uri), _) => {
            nbd = open_nbd(uri, args, rw)?;
            let size = match args.size {
                Some(s) if s > nbd.size() => {
                    return Err(Failure::usage(format!(
                        "{uri}: --size {s} is larger than the export ({} bytes)",
                        nbd.size()
                    )))
                }
                Some(s) => s,
                None => nbd.size(),
            };
            (nbd.direct(), size, "nbd")
        }
        (None, Some(t)) => (t.raw.direct(), t.size, t.raw.backend_name()),
        (None, None) => unreachable!("a host target is prepared above"),
    };
    let counted = args
        .stats
        .then(|| std::sync::Arc::new(dio::StatsDevice::new(direct.device().clone())));
    let observed = match &counted {
        Some(c) => Some(
            direct
                .with_device(c.clone())
                .map_err(|e| Failure::at(path, e))?,
        ),
        None => None,
    };
    let direct = observed.as_ref().unwrap_or(direct);
    let span = span(size, bs)?;
    // The shift needs a block to spare at the end of the span.
    if args.skew != 0 && args.skew.div_ceil(bs).saturating_mul(bs) >= span {
        return Err(Failure::usage(format!(
            "--skew {} leaves no room: it must be less than --size ({size} bytes) minus --bs ({bs} bytes)",
            args.skew
        )));
    }
    let w = Workload {
        rw,
        bs,
        qd,
        span,
        runtime: runtime(args, 5.0),
        ramp: Duration::from_secs_f64(args.ramp),
        skew: args.skew,
        batch: batch_for(args, qd),
    };
    let mut jobs = Vec::new();
    let (mode, engine, report) = if args.buffered {
        let file = open_buffered(path, rw.is_write())?;
        let w = Workload {
            qd: w.qd.saturating_mul(args.jobs),
            ..w
        };
        ("buffered", "pread/pwrite", run::buffered(&file, &w, false)?)
    } else if args.jobs > 1 {
        let fixed = if args.fixed_bufs {
            match &target {
                Some(t) => Some(&t.raw),
                None => {
                    say("--fixed-bufs needs io_uring: ignored over NBD");
                    None
                }
            }
        } else {
            None
        };
        run::check_bs(direct, &w)?;
        let arena = run::arena_for(direct, &w, args.jobs);
        run::register_fixed(fixed, &arena)?;
        jobs = run_jobs(direct, &w, &arena, args.jobs)?;
        // The process's CPU from the first job's start of measuring (after a ramp:
        // what the ramp spent is not the run's).
        let cpu = if w.ramp.is_zero() {
            jobs.iter().map(|(_, cpu0)| *cpu0).next()
        } else {
            jobs.iter()
                .map(|(r, _)| r.started_cpu)
                .min_by_key(|c| c.user + c.system)
        };
        let reports: Vec<Report> = jobs.iter().map(|(r, _)| r.clone()).collect();
        let combined = Report::combine(&reports, cpu.unwrap_or_default());
        ("direct", backend, combined)
    } else {
        let fixed = if args.fixed_bufs {
            match &target {
                Some(t) => Some(&t.raw),
                None => {
                    say("--fixed-bufs needs io_uring: ignored over NBD");
                    None
                }
            }
        } else {
            None
        };
        ("direct", backend, run::direct(direct, &w, fixed)?)
    };
    stop_if_interrupted()?;
    if let Some(plot_path) = &args.plot {
        plot::write(
            plot_path,
            &format!("dio bench: latency CDF on {}", path.display()),
            &[plot::Panel {
                title: w.label(),
                series: vec![plot::Series {
                    name: mode.into(),
                    points: report.lat.cdf(),
                }],
            }],
        )?;
    }
    if args.json {
        let mut v = report_json(&w, &report);
        v["numjobs"] = json!(args.jobs);
        if !jobs.is_empty() {
            v["jobs"] = Value::Array(
                jobs.iter()
                    .enumerate()
                    .map(|(i, (r, _))| {
                        let mut j = report_json(&w, r);
                        j["job"] = json!(i);
                        j
                    })
                    .collect(),
            );
        }
        if let Some(c) = &counted {
            let (s, e) = (c.stats(), direct.stats());
            let pct = |p| s.latency().percentile(p).as_nanos() as u64;
            v["device_stats"] = json!({
                "reads": s.reads, "writes": s.writes,
                "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
                "max_in_flight": s.max_in_flight, "flushes": s.flushes, "errors": s.errors,
                "merges": e.merges(), "splits": e.splits(),
                "lat_p50_ns_at_most": pct(50.0), "lat_p99_ns_at_most": pct(99.0),
            });
        }
        v["target"] = json!(path.display().to_string());
        v["mode"] = json!(mode);
        v["engine"] = json!(engine);
        if let Some(p) = &args.plot {
            v["plot"] = json!(p.display().to_string());
        }
        return print(&format!("{v}\n"));
    }
    let r = &report;
    let us = |ns: u64| ns as f64 / 1000.0;
    print(&format!(
        "{} on {} ({}, {mode}, {engine}), {:.1} s{}\n  \
         IOPS       {:.0}\n  \
         bandwidth  {}/s\n  \
         latency    p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us (mean {:.1} us, max {:.1} us)\n  \
         cpu        usr {:.1}%, sys {:.1}% of one core, {:.2} us per I/O\n",
        w.label(),
        path.display(),
        human(w.span),
        r.elapsed.as_secs_f64(),
        if w.ramp.is_zero() {
            String::new()
        } else {
            format!(" after a {:.1} s ramp", w.ramp.as_secs_f64())
        },
        r.iops(),
        human(r.bw_bytes() as u64),
        us(r.lat.quantile(0.5)),
        us(r.lat.quantile(0.99)),
        us(r.lat.quantile(0.999)),
        us(r.lat.mean()),
        us(r.lat.max()),
        r.cpu_usr,
        r.cpu_sys,
        cpu_per_io_us(r),
    ))?;
    if let Some(c) = &counted {
        let e = direct.stats();
        print(&format!(
            "  device     {}\n  engine     {} merges, {} splits\n",
            c.stats().to_string().trim_end().replace('\n', "\n  "),
            e.merges(),
            e.splits()
        ))?;
    }
    if !jobs.is_empty() {
        let per_job: Vec<String> = jobs
            .iter()
            .map(|(r, _)| {
                format!(
                    "{:.0} IOPS, p99 {:.1} us, cpu {:.0}%",
                    r.iops(),
                    us(r.lat.quantile(0.99)),
                    r.cpu_usr + r.cpu_sys
                )
            })
            .collect();
        print(&format!(
            "  jobs       {} x qd{}: {}\n",
            args.jobs,
            w.qd,
            per_job.join("; ")
        ))?;
    }
    if let Some(p) = &args.plot {
        print(&format!("plot: {}\n", p.display()))?;
    }
    Ok(())
}

/// Run `w` in `n` jobs at once, each on its own thread (and ring), started together;
/// each job's report with the process CPU time taken just before the start.
fn run_jobs(
    file: &DirectFile,
    w: &Workload,
    arena: &std::sync::Arc<dio::BufArena>,
    n: u32,
) -> Result<Vec<(Report, cpu::CpuTime)>, Failure> {
    let start = std::sync::Barrier::new(n as usize + 1);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|j| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    run::direct_job(file, w, arena, 0x5eed + u64::from(j) * 0x1000_0001, true)
                })
            })
            .collect();
        let cpu0 = cpu::CpuTime::now();
        start.wait();
        handles.into_iter().map(|h| (h.join(), cpu0)).collect()
    });
    let mut out = Vec::new();
    for (r, cpu0) in results {
        let r = r.map_err(|_| Failure::msg("a bench job panicked"))??;
        out.push((r, cpu0));
    }
    Ok(out)
}

/// CPU microseconds spent per I/O.
fn cpu_per_io_us(r: &Report) -> f64 {
    (r.cpu_usr + r.cpu_sys) / 100.0 * r.elapsed.as_secs_f64() * 1e6 / (r.ios.max(1) as f64)
}

fn report_json(w: &Workload, r: &Report) -> Value {
    json!({
        "workload": w.label(),
        "rw": w.rw.name(),
        "bs": w.bs,
        "qd": w.qd,
        "batch": w.batch,
        "ramp_s": w.ramp.as_secs_f64(),
        "size": w.span,
        "runtime_s": r.elapsed.as_secs_f64(),
        "ios": r.ios,
        "iops": r.iops(),
        "bw_bytes": r.bw_bytes(),
        "lat_ns": {
            "p50": r.lat.quantile(0.5),
            "p99": r.lat.quantile(0.99),
            "p999": r.lat.quantile(0.999),
            "mean": r.lat.mean(),
            "max": r.lat.max(),
        },
        "cpu_usr": r.cpu_usr,
        "cpu_sys": r.cpu_sys,
    })
}
