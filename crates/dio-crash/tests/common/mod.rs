//! Shared pieces of the crash tests: scratch directories, broken devices (the
//! mutations), and a seeded workload that claims what it was promised.

#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dio::{
    AlignedBuf, Completion, Device, DeviceWrapper, DirectFile, Finished, Flags, Op, Request,
    SyncConfig, SyncDevice,
};
pub mod tree_model;

use dio_crash::{run, Base, Checker, Log, Recorder, ReplayOptions, Summary};

/// A fresh directory under the crate's target tmp dir (O_DIRECT works there).
/// Directories of earlier runs of the same test whose process is gone are removed.
pub fn scratch(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dio-crash");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(pid) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(name))
                .and_then(|r| r.strip_prefix('-'))
                .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
            else {
                continue;
            };
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let d = root.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether to run the long versions (`DIO_CRASH_LONG=1`).
pub fn long() -> bool {
    std::env::var_os("DIO_CRASH_LONG").is_some_and(|v| v != "0" && !v.is_empty())
}

pub use dio_testkit::Rng;

/// A recorder over the image file `img` (O_DIRECT, pread/pwrite) logging to `log`,
/// and the image's size.
pub fn record(img: &Path, log: &Path) -> (Recorder<SyncDevice>, u64) {
    let (f, geo) = dio::probe::open_probed(img, true).unwrap();
    let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
    (Recorder::create(dev, log).unwrap(), geo.size)
}

/// Replays the log at `log` over the image `base` through `checkers` (the states
/// under `states`), and prints what it found: the counts and the first failures.
pub fn replay(
    name: &str,
    log: &Path,
    base: &Path,
    checkers: &[&dyn Checker],
    opts: &ReplayOptions,
    states: &Path,
) -> Summary {
    let log = Arc::new(Log::open(log).unwrap());
    let sum = run(&log, Base::File(base.to_path_buf()), checkers, opts, states).unwrap();
    eprintln!(
        "{name}: {} records, {} states, {} failed, {:.1} states/s, {:.1} s, skipped: {:?}",
        sum.records,
        sum.states,
        sum.failed,
        sum.rate(),
        sum.elapsed.as_secs_f64(),
        sum.skipped
    );
    for f in sum.failures.iter().take(3) {
        eprintln!("  {} [{}] {}", f.spec, f.checker, f.message);
    }
    sum
}

/// Passes everything through but clears FUA: a device without FUA (the block
/// layer then relies on flushes).
pub struct StripFua<D>(pub D);

impl<D: Device> DeviceWrapper for StripFua<D> {
    type Inner = D;
    fn inner(&self) -> &D {
        &self.0
    }
    fn submit(&self, mut req: Request) {
        req.set_fua(false);
        self.0.submit(req)
    }
    fn name(&self) -> &str {
        "strip-fua"
    }
}

/// MUTATION: acknowledges flushes without doing them.
pub struct DropFlush<D>(pub D);

impl<D: Device> DeviceWrapper for DropFlush<D> {
    type Inner = D;
    fn inner(&self) -> &D {
        &self.0
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "drop-flush"
    }
}

struct Ignore;
impl Completion for Ignore {
    fn complete(self: Arc<Self>, _req: Finished, _result: io::Result<()>) {}
}

/// MUTATION: completes a write as soon as it arrives (from a copy of its bytes),
/// and sends it to the device only when the next request comes (or at `drain`).
pub struct EarlyAck<D> {
    pub inner: D,
    held: Mutex<Vec<(u64, AlignedBuf, bool)>>,
}

impl<D: Device> EarlyAck<D> {
    pub fn new(inner: D) -> Self {
        EarlyAck {
            inner,
            held: Mutex::new(Vec::new()),
        }
    }
    pub fn drain(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (off, buf, fua) in held {
            self.inner.submit(Request::with_buf(
                Op::Write,
                off,
                buf,
                fua,
                Arc::new(Ignore),
                0,
            ));
        }
    }
}

impl<D: Device> DeviceWrapper for EarlyAck<D> {
    type Inner = D;
    fn inner(&self) -> &D {
        &self.inner
    }
    fn submit(&self, req: Request) {
        self.drain();
        if req.op() == Op::Read {
            return self.inner.submit(req);
        }
        let mut buf = AlignedBuf::new(req.len() as usize, self.inner.geometry().buffer_align());
        req.copy_out(0, &mut buf);
        self.held
            .lock()
            .unwrap()
            .push((req.offset(), buf, req.fua()));
        req.complete(Ok(()));
    }
    fn flush(&self) -> io::Result<()> {
        // The bug: the flush does not wait for (or send) the writes it holds.
        self.inner.flush()
    }
    fn name(&self) -> &str {
        "early-ack"
    }
}

/// A seeded workload on a file over the identity map (file offset = device
/// offset): byte-granular and aligned writes, some with DSYNC, some followed by
/// `sync_data`, each promise logged as a claim. `model` starts as the device's
/// bytes; the function returns the bytes it expects on the device at the end.
pub fn raw_workload<D: Device>(
    rec: &Recorder<D>,
    file: &DirectFile,
    seed: u64,
    ops: usize,
    mut model: Vec<u8>,
) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let size = model.len() as u64;
    // Ranges written since the last sync and not yet claimed.
    let mut pending: Vec<(u64, u64)> = Vec::new();
    for op in 0..ops {
        rec.mark(&format!("op {op}")).unwrap();
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => 4096 * (1 + rng.below(4)),
            2 => 512 * (1 + rng.below(16)),
            _ => 1 + rng.below(20_000),
        };
        let aligned = rng.below(2) == 0;
        let mut off = rng.below(size - len);
        if aligned {
            off &= !4095;
        }
        let byte = (op % 251) as u8 + 1;
        let data = vec![byte; len as usize];
        let dsync = rng.below(3) == 0;
        let mut flags = Flags::UNALIGNED;
        if dsync {
            flags |= Flags::DSYNC;
        }
        assert_eq!(file.write_at(off, &data, flags).unwrap(), len as usize);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        if dsync {
            rec.claim(off, &data).unwrap();
        } else {
            pending.push((off, len));
        }
        if rng.below(5) == 0 {
            file.sync_data().unwrap();
            for (o, l) in pending.drain(..) {
                rec.claim(o, &model[o as usize..(o + l) as usize]).unwrap();
            }
        }
    }
    model
}

/// The last ten non-empty lines of a command's stdout (for failure messages).
pub fn tail(out: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// What `e2fsck -fy` did to a crash state whose repair `e2fsck -fn` then found clean.
pub struct Repair {
    /// e2fsck -fy's exit code: 0 nothing to fix, 1 or 2 fixed.
    pub code: i32,
    /// The end of its report.
    pub log: String,
}

/// Repair the image at `img` with `e2fsck -fy`, then require `e2fsck -fn` clean:
/// `Ok(Err(why))` when either step breaks that rule.
pub fn e2fsck_repair(img: &Path) -> dio_crash::Result<Result<Repair, String>> {
    let run = |args: &[&str]| {
        std::process::Command::new("e2fsck")
            .args(args)
            .arg(img)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| dio_crash::CrashError::Io {
                context: "run e2fsck".to_string(),
                source,
            })
    };
    let fix = run(&["-fy"])?;
    let code = fix.status.code().unwrap_or(-1);
    if !(0..=2).contains(&code) {
        return Ok(Err(format!("e2fsck -fy exited {code}:\n{}", tail(&fix))));
    }
    let check = run(&["-fn"])?;
    if check.status.code() != Some(0) {
        return Ok(Err(format!(
            "e2fsck -fn after -fy is not clean:\n{}",
            tail(&check)
        )));
    }
    Ok(Ok(Repair {
        code,
        log: tail(&fix),
    }))
}
