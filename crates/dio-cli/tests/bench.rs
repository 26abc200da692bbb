//! `dio bench`'s suite as a newcomer runs it, shortened: the table with dio beside
//! buffered (and fio where installed), the runs under a buffered writer, the plot
//! (parsed: well-formed, axes, one line per run, the run names in legends), the
//! JSON with its fields, and the scratch files gone afterwards. No timed asserts.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`): tmpfs may refuse
//! O_DIRECT.

use std::path::Path;
use std::process::{Command, Output};

use dio_testkit::have;
use serde_json::Value;
use tempfile::TempDir;

const WORKLOADS: [&str; 4] = [
    "randread 4k qd32",
    "randwrite 4k qd32",
    "read 1M qd8",
    "write 1M qd8",
];

fn scratch() -> TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

fn dio_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run dio")
}

fn assert_ok(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{what}: exit {:?}:\n{err}",
        o.status.code()
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
}

/// The element names of `xml` in document order, checked for nesting: every tag
/// closed, in order, one root. Panics with the reason otherwise.
fn elements(xml: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut roots = 0;
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack
                .pop()
                .unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(open, name.trim(), "mismatched close");
            continue;
        }
        let name: String = tag
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '/')
            .collect();
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if stack.is_empty() {
            roots += 1;
        }
        names.push(name.clone());
        if !tag.ends_with('/') {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    assert_eq!(roots, 1, "one root element");
    names
}

/// The `data-run` names of the plot's lines.
fn runs(svg: &str) -> Vec<String> {
    svg.split("<polyline")
        .skip(1)
        .map(|p| {
            let at = p.find("data-run=\"").expect("a named line") + 10;
            p[at..at + p[at..].find('"').unwrap()].to_string()
        })
        .collect()
}

#[test]
fn default_bench_compares_like_with_like_and_plots_every_run() {
    let dir = scratch();
    let o = dio_in(dir.path(), &["bench", "--runtime", "0.1", "--size", "16M"]);
    assert_ok(&o, "dio bench");
    let out = String::from_utf8_lossy(&o.stdout);
    let modes: &[&str] = if have("fio") {
        &["direct", "buffered", "fio"]
    } else {
        &["direct", "buffered"]
    };
    for w in WORKLOADS {
        for m in modes {
            assert!(
                out.lines().any(|l| l.starts_with(w) && l.contains(m)),
                "a {m} row for {w}:\n{out}"
            );
        }
    }
    assert!(
        out.contains("posix_fadvise(DONTNEED)"),
        "says how the cache is dropped:\n{out}"
    );
    assert!(out.contains("buffered writer"), "{out}");
    assert!(out.contains("cache MiB peak/left"), "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert_eq!(
        last, "plot: ./dio-bench.svg",
        "the last line names the plot:\n{out}"
    );
    if !have("fio") {
        assert!(String::from_utf8_lossy(&o.stderr).contains("fio is not on PATH"));
    }

    let svg = std::fs::read_to_string(dir.path().join("dio-bench.svg")).expect("the plot");
    let names = elements(&svg);
    assert_eq!(names.first().map(String::as_str), Some("svg"));
    // One panel per workload and one for the runs under the writer, each with axes.
    assert_eq!(
        svg.matches(r#"<g class="axis""#).count(),
        5,
        "axes per panel"
    );
    assert!(svg.contains(r#"class="x-axis""#) && svg.contains(r#"class="y-axis""#));
    let lines = runs(&svg);
    assert_eq!(
        lines.len(),
        4 * modes.len() + 2,
        "one line per run: {lines:?}"
    );
    for w in WORKLOADS {
        for m in modes {
            assert!(lines.contains(&format!("{w} {m}")), "{w} {m} in {lines:?}");
        }
    }
    assert!(lines.contains(&"randread 4k qd32, with a buffered writer buffered".to_string()));
    for m in modes {
        assert!(svg.contains(&format!(">{m}</text>")), "{m} in a legend");
    }
    for left in ["dio-bench.tmp", "dio-bench-writer.tmp"] {
        assert!(!dir.path().join(left).exists(), "{left} left behind");
    }
}

#[test]
fn bench_json_keeps_its_fields_and_adds_what_direct_io_saves() {
    let dir = scratch();
    let o = dio_in(
        dir.path(),
        &[
            "bench",
            "--runtime",
            "0.1",
            "--size",
            "16M",
            "--json",
            "--plot",
            "p.html",
        ],
    );
    assert_ok(&o, "dio bench --json");
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    for r in results {
        for mode in ["direct", "buffered"] {
            let m = &r[mode];
            for key in [
                "iops",
                "bw_bytes",
                "cpu_usr",
                "cpu_sys",
                "cpu_us_per_io",
                "cpu_ms_per_gib",
            ] {
                assert!(m[key].is_number(), "{mode}.{key} in {r}");
            }
            for q in ["p50", "p99", "p999"] {
                assert!(m["lat_ns"][q].is_u64(), "{mode}.lat_ns.{q}");
            }
            for key in ["cache_peak_bytes", "cache_left_bytes"] {
                assert!(m[key].is_u64() || m[key].is_null(), "{mode}.{key} in {r}");
            }
        }
        // Direct I/O leaves none of the file in the page cache.
        if v["cache_probe"]
            .as_str()
            .unwrap_or("")
            .starts_with("fincore")
        {
            assert_eq!(r["direct"]["cache_left_bytes"], 0, "{r}");
            assert_eq!(r["direct"]["cache_peak_bytes"], 0, "{r}");
        }
        assert_eq!(r["fio"].is_object(), have("fio"), "{r}");
    }
    assert!(v["buffered_reads"]
        .as_str()
        .unwrap()
        .contains("posix_fadvise"));
    for mode in ["direct", "buffered"] {
        let m = &v["under_writer"][mode];
        assert!(
            m["lat_ns"]["p999"].is_u64() && m["quiet_lat_ns"]["p999"].is_u64(),
            "{m}"
        );
        assert!(m["writer_bytes"].is_u64());
    }
    assert_eq!(v["plot"], "p.html");
    let html = std::fs::read_to_string(dir.path().join("p.html")).expect("the plot");
    assert!(html.starts_with("<!DOCTYPE html>"));
    let svg = &html[html.find("<svg").unwrap()..html.find("</svg>").unwrap() + 6];
    elements(svg);
    // Without --plot, --json writes no plot.
    assert!(!dir.path().join("dio-bench.svg").exists());
}

#[test]
fn one_workload_plots_one_line() {
    let dir = scratch();
    let o = dio_in(
        dir.path(),
        &[
            "bench",
            "t.dat",
            "--rw",
            "randread",
            "--size",
            "4M",
            "--runtime",
            "0.1",
            "--plot",
            "one.svg",
        ],
    );
    assert_ok(&o, "bench --plot");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.ends_with("plot: one.svg\n"), "{out}");
    let svg = std::fs::read_to_string(dir.path().join("one.svg")).unwrap();
    elements(&svg);
    assert_eq!(runs(&svg), ["randread 4k qd32 direct"]);
}

#[test]
fn a_plot_in_a_missing_directory_fails_before_running() {
    let dir = scratch();
    let o = dio_in(dir.path(), &["bench", "--plot", "no/such/dir/p.svg"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("dio: no/such/dir/p.svg:"), "{err}");
    assert!(!dir.path().join("dio-bench.tmp").exists());
}
