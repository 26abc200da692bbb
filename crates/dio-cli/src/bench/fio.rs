//! fio on the suite's workloads, for the dio-beside-fio rows: the same file, block
//! size, queue depth and runtime, `--direct=1 --ioengine=io_uring` (as
//! `bench/vs-fio.sh` runs it). Only where `fio` is on PATH.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::interrupted;
use super::run::Workload;
use crate::fail::Failure;

/// Percentiles asked of fio: enough points for a CDF.
const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// What one fio run measured.
pub struct FioReport {
    pub iops: f64,
    pub bw_bytes: f64,
    pub ios: u64,
    pub runtime_s: f64,
    /// Percent of one core, user plus system.
    pub cpu: f64,
    /// (latency ns, fraction at or below), submit to completion.
    pub lat: Vec<(u64, f64)>,
}

impl FioReport {
    /// The latency at `p` (0..=1) among the asked percentiles, in ns.
    pub fn quantile(&self, p: f64) -> u64 {
        self.lat
            .iter()
            .find(|&&(_, q)| q >= p - 1e-9)
            .or(self.lat.last())
            .map_or(0, |&(ns, _)| ns)
    }
    /// CPU microseconds per I/O.
    pub fn cpu_per_io_us(&self) -> f64 {
        self.cpu / 100.0 * self.runtime_s * 1e6 / (self.ios.max(1) as f64)
    }
}

/// fio's path, if it is on PATH.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("fio"))
        .find(|p| p.is_file())
}

/// fio's version line (`fio-3.33`).
pub fn version(fio: &Path) -> String {
    Command::new(fio)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "fio".into())
}

/// Run `w` through fio on `target` (a file of at least `w.span` bytes).
pub fn run(fio: &Path, target: &Path, w: &Workload) -> Result<FioReport, Failure> {
    let list: Vec<String> = PERCENTILES.iter().map(|p| p.to_string()).collect();
    let mut child = Command::new(fio)
        .arg("--name=dio-bench")
        .arg(format!("--filename={}", target.display()))
        .arg(format!("--size={}", w.span))
        .arg(format!("--rw={}", w.rw.name()))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--runtime={}ms", w.runtime.as_millis().max(1)))
        .arg(format!("--ramp_time={}ms", w.ramp.as_millis()))
        .args([
            "--time_based",
            "--direct=1",
            "--ioengine=io_uring",
            "--norandommap",
            "--randrepeat=0",
            "--lat_percentiles=1",
            "--output-format=json",
        ])
        .arg(format!("--percentile_list={}", list.join(":")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::msg(format!("{}: {e}", fio.display())))?;
    // Wait, but stop fio too on Ctrl-C.
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Failure::msg(format!("fio: {e}")))?
        {
            break status;
        }
        if interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(super::interrupt_failure());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::msg(format!("fio: {e}")))?;
    if !status.success() {
        return Err(Failure::msg(format!(
            "fio failed on {}: {}",
            w.label(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before its JSON.
    let json = text.find('{').map_or("", |i| &text[i..]);
    parse(json)
        .ok_or_else(|| Failure::msg(format!("fio: unreadable JSON output for {}", w.label())))
}

fn parse(json: &str) -> Option<FioReport> {
    let v: Value = serde_json::from_str(json).ok()?;
    let job = v.get("jobs")?.get(0)?;
    let mut r = FioReport {
        iops: 0.0,
        bw_bytes: 0.0,
        ios: 0,
        runtime_s: 0.0,
        cpu: job.get("usr_cpu")?.as_f64()? + job.get("sys_cpu")?.as_f64()?,
        lat: Vec::new(),
    };
    for dir in ["read", "write"] {
        let d = job.get(dir)?;
        let ios = d.get("total_ios").and_then(Value::as_u64).unwrap_or(0);
        if ios == 0 {
            continue;
        }
        r.ios += ios;
        r.iops += d.get("iops").and_then(Value::as_f64).unwrap_or(0.0);
        r.bw_bytes += d.get("bw_bytes").and_then(Value::as_f64).unwrap_or(0.0);
        let ms = d.get("runtime").and_then(Value::as_f64).unwrap_or(0.0);
        r.runtime_s = r.runtime_s.max(ms / 1000.0);
        let pct = d
            .get("lat_ns")
            .and_then(|l| l.get("percentile"))
            .or_else(|| d.get("clat_ns").and_then(|l| l.get("percentile")))
            .and_then(Value::as_object);
        if let Some(pct) = pct {
            let mut lat: Vec<(u64, f64)> = pct
                .iter()
                .filter_map(|(k, v)| Some((v.as_u64()?, k.parse::<f64>().ok()? / 100.0)))
                .collect();
            lat.sort_by(|a, b| a.1.total_cmp(&b.1));
            r.lat = lat;
        }
    }
    (r.ios > 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fio_json() {
        let j = r#"{"jobs":[{"usr_cpu":10.0,"sys_cpu":5.0,
            "read":{"total_ios":1000,"iops":500.0,"bw_bytes":2048000.0,"runtime":2000,
                    "lat_ns":{"percentile":{"50.000000":100000,"99.000000":400000,"99.900000":900000}}},
            "write":{"total_ios":0,"iops":0.0,"bw_bytes":0.0,"runtime":0}}]}"#;
        let r = parse(j).expect("parsed");
        assert_eq!(r.ios, 1000);
        assert_eq!(r.quantile(0.99), 400_000);
        assert_eq!(r.quantile(0.999), 900_000);
        assert!((r.cpu_per_io_us() - 300.0).abs() < 1e-6);
    }
}
