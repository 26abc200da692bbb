//! The built-in suite, `dio bench` without a target: what direct I/O costs and what
//! it saves. Each workload runs through dio, through the page cache (buffered reads
//! with the file's cache dropped before every pass, so both sides read the disk)
//! and through fio where it is installed; then random reads again while a buffered
//! writer loads the machine; then a summary of the ratios and a plot of the
//! latency distributions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{json, Value};

use super::cache::{Cache, Probe};
use super::fio::{self, FioReport};
use super::plot::{self, Panel, Series};
use super::run::{self, Report, Rw, Workload};
use super::{
    cpu_per_io_us, open_buffered, prepare, print, report_json, runtime, span, stop_if_interrupted,
    BenchArgs, Scratch, DEFAULT_SIZE, SCRATCH,
};
use crate::fail::{say, Failure};
use crate::size::human;

/// The suite: pattern, block size, queue depth.
const SUITE: [(Rw, u64, u32); 4] = [
    (Rw::Randread, 4096, 32),
    (Rw::Randwrite, 4096, 32),
    (Rw::Read, 1 << 20, 8),
    (Rw::Write, 1 << 20, 8),
];
/// The plot of a default run, next to the scratch file.
const PLOT: &str = "dio-bench.svg";
/// The file the concurrent buffered writer fills, next to the scratch file.
const WRITER: &str = "dio-bench-writer.tmp";
/// Its pace, bytes/s: a load on the page cache and the disk, not a CPU hog.
const WRITER_RATE: u64 = 256 << 20;
const DROP: &str = "posix_fadvise(DONTNEED)";

/// CPU milliseconds per GiB moved.
fn cpu_ms_per_gib(cpu_percent: f64, secs: f64, bytes: f64) -> f64 {
    cpu_percent / 100.0 * secs * 1000.0 / (bytes / f64::from(1 << 30)).max(1e-12)
}

fn report_cpu_ms_per_gib(r: &Report) -> f64 {
    cpu_ms_per_gib(
        r.cpu_usr + r.cpu_sys,
        r.elapsed.as_secs_f64(),
        r.bytes as f64,
    )
}

fn fio_cpu_ms_per_gib(f: &FioReport) -> f64 {
    cpu_ms_per_gib(f.cpu, f.runtime_s, f.bw_bytes * f.runtime_s)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| {
        format!("{:.0}", b as f64 / f64::from(1 << 20))
    })
}

/// The page cache cell: most filled while running / left after, MiB.
fn cache_cell(c: Option<Cache>) -> String {
    c.map_or("-".into(), |c| format!("{}/{}", mib(c.peak), mib(c.left)))
}

const HEADER: &str = "workload          mode         IOPS    MiB/s   p50 us   p99 us  p99.9 us  cpu us/IO  cpu ms/GiB  cache MiB peak/left\n";

#[allow(clippy::too_many_arguments)]
fn row_text(
    label: &str,
    mode: &str,
    iops: f64,
    bw: f64,
    lat: [u64; 3],
    cpu: Option<(f64, f64)>,
    cache: Option<Cache>,
) -> String {
    let us = |ns: u64| ns as f64 / 1000.0;
    let (cpu_io, cpu_gib) = cpu.map_or(("-".into(), "-".into()), |(io, gib)| {
        (format!("{io:.2}"), format!("{gib:.0}"))
    });
    format!(
        "{label:<17} {mode:<9} {iops:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {cpu_io:>10} {cpu_gib:>11} {:>20}\n",
        bw / f64::from(1 << 20),
        us(lat[0]),
        us(lat[1]),
        us(lat[2]),
        cache_cell(cache),
    )
}

fn row(label: &str, mode: &str, r: &Report, cache: Option<Cache>) -> String {
    row_text(
        label,
        mode,
        r.iops(),
        r.bw_bytes(),
        [0.5, 0.99, 0.999].map(|q| r.lat.quantile(q)),
        Some((cpu_per_io_us(r), report_cpu_ms_per_gib(r))),
        cache,
    )
}

fn fio_row(label: &str, f: &FioReport, cache: Option<Cache>) -> String {
    row_text(
        label,
        "fio",
        f.iops,
        f.bw_bytes,
        [0.5, 0.99, 0.999].map(|q| f.quantile(q)),
        Some((f.cpu_per_io_us(), fio_cpu_ms_per_gib(f))),
        cache,
    )
}

fn fio_json(f: &FioReport) -> Value {
    json!({
        "iops": f.iops,
        "bw_bytes": f.bw_bytes,
        "ios": f.ios,
        "runtime_s": f.runtime_s,
        "cpu": f.cpu,
        "cpu_us_per_io": f.cpu_per_io_us(),
        "cpu_ms_per_gib": fio_cpu_ms_per_gib(f),
        "lat_ns": {
            "p50": f.quantile(0.5),
            "p99": f.quantile(0.99),
            "p999": f.quantile(0.999),
        },
    })
}

fn run_json(w: &Workload, r: &Report, cache: Cache) -> Value {
    let mut v = report_json(w, r);
    v["cpu_us_per_io"] = json!(cpu_per_io_us(r));
    v["cpu_ms_per_gib"] = json!(report_cpu_ms_per_gib(r));
    add_cache(&mut v, cache);
    v
}

fn add_cache(v: &mut Value, cache: Cache) {
    v["cache_peak_bytes"] = json!(cache.peak);
    v["cache_left_bytes"] = json!(cache.left);
}

/// `a / b` as `1.23x`, or `-` when either side measured nothing.
fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 && (a / b).is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// Drop the scratch file's page cache before a run, so each one starts cold and
/// what it leaves behind is its own.
fn cold(file: &std::fs::File) -> Result<(), Failure> {
    run::drop_cache(file).map_err(|e| Failure::msg(format!("dropping the page cache: {e}")))
}

/// `f` while a buffered writer fills `path`; returns its report, with the writer
/// thread's CPU time taken out of it, and the bytes the writer wrote.
fn under_writer(
    path: &Path,
    size: u64,
    f: impl FnOnce() -> Result<Report, Failure>,
) -> Result<(Report, u64), Failure> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| run::pressure_writer(path, size, WRITER_RATE, &stop));
        let result = f();
        stop.store(true, Ordering::Relaxed);
        let (written, cpu) = writer
            .join()
            .map_err(|_| Failure::msg("the buffered writer thread panicked"))?
            .map_err(|e| Failure::at(path, e))?;
        let mut r = result?;
        // The writer ran (a little longer than) the whole run: its share goes.
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        r.cpu_usr = (r.cpu_usr - cpu.user.as_secs_f64() / secs * 100.0).max(0.0);
        r.cpu_sys = (r.cpu_sys - cpu.system.as_secs_f64() / secs * 100.0).max(0.0);
        Ok((r, written))
    })
}

/// `dio bench` without a target.
pub fn suite(args: &BenchArgs) -> Result<(), Failure> {
    if args.bs.is_some() || args.qd.is_some() || args.buffered {
        return Err(Failure::usage(
            "--bs, --qd and --buffered shape one workload: add --rw or a TARGET",
        ));
    }
    let scratch = Scratch::here();
    let size = args.size.unwrap_or(DEFAULT_SIZE);
    let plot_path: Option<PathBuf> = match &args.plot {
        Some(p) => Some(p.clone()),
        None if !args.json => Some(Path::new(".").join(PLOT)),
        None => None,
    };
    // The suite's own file: always laid out afresh.
    let _ = std::fs::remove_file(&scratch.0);
    let target = prepare(&scratch.0, Some(size), args, true, 32)?;
    let buffered_file = open_buffered(&scratch.0, true)?;
    let runtime = runtime(args, 1.5);
    let engine = target.raw.backend_name();
    let probe = Probe::pick(&scratch.0);
    let fio = fio::find();
    let fio_version = fio.as_deref().map(fio::version);
    if fio.is_none() {
        say("fio is not on PATH: the dio-vs-fio rows are skipped (apt-get install fio)");
    }
    if !args.json {
        let vs_fio = match &fio_version {
            Some(v) => format!(" and fio ({v}, io_uring, direct)"),
            None => String::new(),
        };
        print(&format!(
            "dio bench: direct (dio, {engine}) vs buffered (page cache, pread/pwrite){vs_fio}\n\
             on {}, {}, {:.1} s per run. Buffered runs hit the disk too: before every pass over\n\
             the file its pages are written back and dropped with {DROP} (random I/O: each\n\
             block once a pass, read-ahead off). Each run starts with the file's cache dropped.\n\n{HEADER}",
            scratch.0.display(),
            human(size),
            runtime.as_secs_f64(),
        ))?;
    }
    let mut results = Vec::new();
    let mut panels = Vec::new();
    let mut summary = String::new();
    let mut quiet_randread = None;
    for (rw, bs, qd) in SUITE {
        let w = Workload {
            rw,
            bs,
            qd,
            span: span(target.size, bs)?,
            runtime,
            ramp: std::time::Duration::from_secs_f64(args.ramp),
            skew: 0,
            batch: super::batch_for(args, qd),
        };
        let label = w.label();
        cold(&buffered_file)?;
        let (d, d_cache) = probe.measure(&scratch.0, || run::direct(target.raw.direct(), &w, None));
        let d = d?;
        stop_if_interrupted()?;
        if !args.json {
            print(&row(&label, "direct", &d, Some(d_cache)))?;
        }
        cold(&buffered_file)?;
        let (b, b_cache) = probe.measure(&scratch.0, || run::buffered(&buffered_file, &w, true));
        let b = b?;
        stop_if_interrupted()?;
        if !args.json {
            print(&row(&label, "buffered", &b, Some(b_cache)))?;
        }
        let mut f = None;
        let mut f_cache = Cache::default();
        if let Some(fio) = &fio {
            cold(&buffered_file)?;
            let (r, c) = probe.measure(&scratch.0, || fio::run(fio, &scratch.0, &w));
            let r = r?;
            f_cache = c;
            if !args.json {
                print(&fio_row(&label, &r, Some(f_cache)))?;
            }
            f = Some(r);
        }
        let mut series = vec![
            Series {
                name: "direct".into(),
                points: d.lat.cdf(),
            },
            Series {
                name: "buffered".into(),
                points: b.lat.cdf(),
            },
        ];
        if let Some(f) = &f {
            series.push(Series {
                name: "fio".into(),
                points: f.lat.clone(),
            });
        }
        panels.push(Panel {
            title: label.clone(),
            series,
        });
        let vs_fio = f.as_ref().map_or(String::new(), |f| {
            format!(
                "{:>12} {:>7}",
                ratio(d.iops(), f.iops),
                ratio(cpu_per_io_us(&d), f.cpu_per_io_us())
            )
        });
        let line = format!(
            "{label:<17} {:>7} {:>9} {:>9} / {:<9} | {vs_fio}",
            ratio(d.iops(), b.iops()),
            ratio(report_cpu_ms_per_gib(&d), report_cpu_ms_per_gib(&b)),
            mib(d_cache.peak),
            mib(b_cache.peak),
        );
        summary.push_str(line.trim_end_matches([' ', '|']));
        summary.push('\n');
        results.push(json!({
            "workload": label,
            "direct": run_json(&w, &d, d_cache),
            "buffered": run_json(&w, &b, b_cache),
            "fio": f.as_ref().map(|f| {
                let mut v = fio_json(f);
                add_cache(&mut v, f_cache);
                v
            }),
        }));
        if rw == Rw::Randread {
            quiet_randread = Some((w, d, b));
        }
    }

    // Random reads again, while a buffered writer fills the page cache and the disk.
    let (w, quiet_d, quiet_b) = quiet_randread.expect("the suite has a randread");
    let writer = Scratch(scratch.0.with_file_name(WRITER));
    let writer_size = (4 * size).clamp(64 << 20, 1 << 30);
    if !args.json {
        print(&format!(
            "\nwith a buffered writer filling {} (1 MiB writes at {} MiB/s, fdatasync every 64 MiB):\n",
            writer.0.display(),
            WRITER_RATE >> 20
        ))?;
    }
    cold(&buffered_file)?;
    let (pd, d_written) = under_writer(&writer.0, writer_size, || {
        run::direct(target.raw.direct(), &w, None)
    })?;
    stop_if_interrupted()?;
    let label = w.label();
    if !args.json {
        print(&row(&label, "direct", &pd, None))?;
    }
    let _ = std::fs::remove_file(&writer.0);
    cold(&buffered_file)?;
    let (pb, b_written) = under_writer(&writer.0, writer_size, || {
        run::buffered(&buffered_file, &w, true)
    })?;
    stop_if_interrupted()?;
    drop(writer);
    if !args.json {
        print(&row(&label, "buffered", &pb, None))?;
    }
    panels.push(Panel {
        title: format!("{label}, with a buffered writer"),
        series: vec![
            Series {
                name: "direct".into(),
                points: pd.lat.cdf(),
            },
            Series {
                name: "buffered".into(),
                points: pb.lat.cdf(),
            },
        ],
    });
    if let Some(path) = &plot_path {
        plot::write(
            path,
            &format!(
                "dio bench: latency CDFs on {} ({}, {:.1} s per run)",
                SCRATCH,
                human(size),
                runtime.as_secs_f64()
            ),
            &panels,
        )?;
    }
    // "p99 / p99.9 (quiet: p99 / p99.9)" in ms.
    let tails = |r: &Report, quiet: &Report| {
        let ms = |r: &Report, q: f64| r.lat.quantile(q) as f64 / 1e6;
        format!(
            "{:.2} / {:.2} (quiet {:.2} / {:.2})",
            ms(r, 0.99),
            ms(r, 0.999),
            ms(quiet, 0.99),
            ms(quiet, 0.999)
        )
    };
    if args.json {
        let pressure = |r: &Report, quiet: &Report, written: u64| {
            let mut v = report_json(&w, r);
            v["writer_bytes"] = json!(written);
            v["quiet_lat_ns"] = json!({
                "p99": quiet.lat.quantile(0.99),
                "p999": quiet.lat.quantile(0.999),
            });
            v
        };
        let v = json!({
            "target": scratch.0.display().to_string(),
            "size": size,
            "engine": engine,
            "buffered_reads": format!("page cache of the file dropped with {DROP} before every pass"),
            "cache_probe": probe.name(),
            "fio": fio_version,
            "results": results,
            "under_writer": {
                "workload": label,
                "writer": format!(
                    "buffered 1 MiB writes at {} MiB/s, fdatasync every 64 MiB, in a separate file",
                    WRITER_RATE >> 20
                ),
                "direct": pressure(&pd, &quiet_d, d_written),
                "buffered": pressure(&pb, &quiet_b, b_written),
            },
            "plot": plot_path.as_ref().map(|p| p.display().to_string()),
        });
        return print(&format!("{v}\n"));
    }
    let fio_head = if fio.is_some() {
        "dio/fio IOPS  CPU/IO"
    } else {
        "dio/fio: skipped, no fio"
    };
    print(&format!(
        "\n{:<17} {:>7} {:>9} {:>9} / {:<9} | {fio_head}\n\
         {summary}\
         {label} p99 / p99.9 with the writer: direct {}, buffered {} ms\n\
         cache: the most a run filled, counted by {}.\n\
         plot: {}\n",
        "direct/buffered",
        "IOPS",
        "CPU/byte",
        "cache d",
        "b MiB",
        tails(&pd, &quiet_d),
        tails(&pb, &quiet_b),
        probe.name(),
        plot_path.map_or("-".into(), |p| p.display().to_string()),
    ))
}
