//! Checkers: what must hold in every crash state.
//!
//! - [`ModelChecker`]: every claim the workload logged ([`crate::Recorder::claim`])
//!   before the crash holds (or a write issued after the claim replaced those
//!   bytes), and every sector a durable write covers holds its bytes or those of a
//!   write not ordered before it.
//! - [`E2fsckChecker`]: `e2fsck -fy -E journal_only`, then `e2fsck -fn`, on a copy.
//! - [`MountChecker`]: a kernel loop mount of a copy, reading expected files.
//! - [`FilesChecker`]: the same expectations read through dio's own ext reader.
//! - [`CommandChecker`]: any command, given the state's image path.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;

use dio::{CompletionMode, Device, Geometry, Op, Request};

use crate::log::Record;
use crate::replay::{write_rec, StateView, SECTOR};
use crate::Result;

/// A checker's answer for one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The state is consistent.
    Pass,
    /// It is not: why.
    Fail(String),
    /// The checker cannot run here (no root, no tool): why.
    Skip(String),
}

/// Something that judges crash states.
pub trait Checker {
    /// Short name for reports ("model", "e2fsck", ...).
    fn name(&self) -> String;
    /// Judge one state. `Err` means the checker itself broke (not the state).
    fn check(&self, state: &StateView) -> Result<Verdict>;
}

/// The model checker: claims and durable writes (see the module docs).
///
/// A claim whose range no volatile sector of a state touches reads what the
/// durable writes under it (and the base) say, and the writes that may replace it
/// only grow with the crash position: once it passed, it is not read again while
/// the durable writes over its sectors stay the same.
#[derive(Debug, Default)]
pub struct ModelChecker {
    cache: Mutex<ClaimCache>,
}

#[derive(Debug, Default)]
struct ClaimCache {
    /// The log the claims are of (path, records).
    log: Option<(PathBuf, usize)>,
    generation: u64,
    /// Claim -> (crash position it passed at, fingerprint of the durable writes
    /// over its sectors then).
    passed: HashMap<u64, (u64, u64)>,
}

/// A hash of which durable write holds each sector of `[offset, offset + len)`.
fn fingerprint(state: &StateView, offset: u64, len: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for s in offset / SECTOR..(offset + len).div_ceil(SECTOR) {
        let w = state.durable_winner(s).map_or(u64::MAX, |r| r);
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(17);
    }
    h
}

impl ModelChecker {
    /// A model checker.
    pub fn new() -> ModelChecker {
        ModelChecker::default()
    }
}

impl Checker for ModelChecker {
    fn name(&self) -> String {
        "model".into()
    }

    fn check(&self, state: &StateView) -> Result<Verdict> {
        let log = state.log();
        let at = state.spec().at;
        // Durable writes: a sector a durable write covers may hold a volatile
        // write's bytes instead only if that write was not ordered before it (did
        // not complete before the durable write was issued).
        for (s, r) in state.volatile_sectors() {
            if let Some(d) = state.durable_winner(s) {
                if r < write_rec(log, d).submitted {
                    return Ok(Verdict::Fail(format!(
                        "sector {s} holds write {r}, which completed before the durable write {d} over it was issued"
                    )));
                }
            }
        }
        // Claims: those the volatile sectors touch, and those not yet known to
        // pass in this durable generation.
        let mut touched = HashSet::new();
        for (sec, _) in state.volatile_sectors() {
            touched.extend(state.analysis().claims_at(sec).iter().copied());
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let this_log = (log.path().to_path_buf(), log.records().len());
        if cache.log.as_ref() != Some(&this_log) {
            cache.log = Some(this_log);
            cache.passed.clear();
        }
        if cache.generation != state.durable_generation() {
            cache.generation = state.durable_generation();
            // Keep the passes whose sectors the durable writes did not change.
            cache
                .passed
                .retain(|&c, (_, fp)| match &log.records()[c as usize] {
                    Record::Claim { offset, len, .. } => fingerprint(state, *offset, *len) == *fp,
                    _ => false,
                });
        }
        let claims = state.analysis().claims();
        let upto = claims.partition_point(|&c| c < at);
        for &c in &claims[..upto] {
            let Record::Claim {
                offset,
                len,
                data_at,
            } = &log.records()[c as usize]
            else {
                continue;
            };
            let clean = !touched.contains(&c);
            if clean && cache.passed.get(&c).is_some_and(|&(a, _)| a <= at) {
                continue;
            }
            let mut want = vec![0u8; *len as usize];
            log.read_data(*data_at, 0, &mut want)?;
            let mut have = vec![0u8; *len as usize];
            state.read_at(*offset, &mut have)?;
            if want == have {
                if clean {
                    cache
                        .passed
                        .insert(c, (at, fingerprint(state, *offset, *len)));
                }
                continue;
            }
            // Sector by sector: the claimed bytes, or those of a write issued
            // before the crash and logged after the claim.
            let mut pos = 0u64;
            while pos < *len {
                let at_b = offset + pos;
                let n = (SECTOR - at_b % SECTOR).min(len - pos);
                let (a, b) = (pos as usize, (pos + n) as usize);
                if want[a..b] != have[a..b] && !later_write_matches(state, c, at_b, &have[a..b])? {
                    let first = (a..b).find(|&k| want[k] != have[k]).unwrap_or(a);
                    let mark = log
                        .mark_before(c)
                        .map(|(i, m)| format!(" (after mark {m:?} at record {i})"))
                        .unwrap_or_default();
                    return Ok(Verdict::Fail(format!(
                        "claim at record {c}{mark}: device byte {} holds {:#04x}, the workload was promised {:#04x} ({} claimed bytes at offset {offset})",
                        offset + first as u64,
                        have[first],
                        want[first],
                        len
                    )));
                }
                pos += n;
            }
            if clean {
                cache
                    .passed
                    .insert(c, (at, fingerprint(state, *offset, *len)));
            }
        }
        Ok(Verdict::Pass)
    }
}

/// Whether some write logged after record `claim` and issued before the crash
/// wrote exactly `have` at `at`.
fn later_write_matches(state: &StateView, claim: u64, at: u64, have: &[u8]) -> Result<bool> {
    let log = state.log();
    let crash = state.spec().at;
    let mut buf = vec![0u8; have.len()];
    for rec in &log.records()[claim as usize + 1..] {
        let Record::Write(w) = rec else { continue };
        if w.submitted > crash || w.offset > at || w.offset + w.len < at + have.len() as u64 {
            continue;
        }
        log.read_data(w.data_at, at - w.offset, &mut buf)?;
        if buf == have {
            return Ok(true);
        }
    }
    Ok(false)
}

fn tool_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/sbin", "/usr/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

fn output_tail(out: &std::process::Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(12);
    lines[start..].join("\n")
}

/// `e2fsck -fy -E journal_only` (replay the journal, as a mount would), then
/// `e2fsck -fn`: the state passes if the second finds nothing to fix.
#[derive(Debug, Default, Clone)]
pub struct E2fsckChecker;

impl Checker for E2fsckChecker {
    fn name(&self) -> String {
        "e2fsck".into()
    }

    fn check(&self, state: &StateView) -> Result<Verdict> {
        if !tool_exists("e2fsck") {
            return Ok(Verdict::Skip("e2fsck is not installed".into()));
        }
        let img = state.temp_image("e2fsck")?;
        let run = |args: &[&str]| {
            Command::new("e2fsck")
                .args(args)
                .arg(img.path())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| crate::CrashError::io("run e2fsck".to_string(), e))
        };
        let replay = run(&["-fy", "-E", "journal_only"])?;
        let code = replay.status.code().unwrap_or(-1);
        if !(0..=2).contains(&code) {
            return Ok(Verdict::Fail(format!(
                "e2fsck -fy -E journal_only exited {code}:\n{}",
                output_tail(&replay)
            )));
        }
        let check = run(&["-fn"])?;
        match check.status.code() {
            Some(0) => Ok(Verdict::Pass),
            code => Ok(Verdict::Fail(format!(
                "e2fsck -fn exited {}:\n{}",
                code.map_or("on a signal".to_string(), |c| c.to_string()),
                output_tail(&check)
            ))),
        }
    }
}

/// A file the workload expects in every state, in one of several versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedFile {
    /// Path inside the image (`/dir/name`).
    pub path: String,
    /// The acceptable contents; `None` stands for "absent".
    pub versions: Vec<Option<Vec<u8>>>,
}

impl ExpectedFile {
    /// A file that must hold exactly `data`.
    pub fn exactly(path: &str, data: Vec<u8>) -> ExpectedFile {
        ExpectedFile {
            path: path.into(),
            versions: vec![Some(data)],
        }
    }

    fn judge(&self, found: Option<&[u8]>) -> Option<String> {
        if self.versions.iter().any(|v| v.as_deref() == found) {
            return None;
        }
        Some(match found {
            None => format!("{} is missing", self.path),
            Some(d) => {
                let near = self
                    .versions
                    .iter()
                    .flatten()
                    .map(|v| {
                        let first = v.iter().zip(d).position(|(a, b)| a != b);
                        match first {
                            Some(k) => format!(
                                "differs from a {}-byte version at byte {k} ({:#04x}, expected {:#04x})",
                                v.len(),
                                d[k],
                                v[k]
                            ),
                            None => format!(
                                "is {} bytes where a version has {}",
                                d.len(),
                                v.len()
                            ),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                format!(
                    "{} ({} bytes) matches no expected version: {near}",
                    self.path,
                    d.len()
                )
            }
        })
    }
}

/// A kernel loop mount of a copy of the state (read-write, so the kernel replays
/// the journal), reading every expected file. Needs root and `mount`; skips
/// otherwise, saying why.
#[derive(Debug, Clone)]
pub struct MountChecker {
    /// Files to read.
    pub files: Vec<ExpectedFile>,
    /// Where to create the temporary mount point.
    pub scratch: PathBuf,
}

/// Whether this process runs as root (effective uid 0), from /proc.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Checker for MountChecker {
    fn name(&self) -> String {
        "mount".into()
    }

    fn check(&self, state: &StateView) -> Result<Verdict> {
        if !is_root() {
            return Ok(Verdict::Skip("a loop mount needs root".into()));
        }
        if !tool_exists("mount") {
            return Ok(Verdict::Skip("mount is not installed".into()));
        }
        let img = state.temp_image("mount")?;
        let dir = PathBuf::from(format!("{}.mnt", img.path().display()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::CrashError::io(format!("mkdir {}", dir.display()), e))?;
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(img.path())
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| crate::CrashError::io("run mount".to_string(), e))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Ok(Verdict::Fail(format!(
                "mount failed:\n{}",
                output_tail(&out)
            )));
        }
        let mut verdict = Verdict::Pass;
        for f in &self.files {
            let p = dir.join(f.path.trim_start_matches('/'));
            let found = match std::fs::read(&p) {
                Ok(d) => Some(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    verdict = Verdict::Fail(format!("reading {}: {e}", f.path));
                    break;
                }
            };
            if let Some(why) = f.judge(found.as_deref()) {
                verdict = Verdict::Fail(why);
                break;
            }
        }
        // A loop device can stay busy for a moment (udev probing it): retry.
        let mut last = String::new();
        let mut unmounted = false;
        for attempt in 0..20 {
            let un = Command::new("umount")
                .arg(&dir)
                .stdin(Stdio::null())
                .output();
            match un {
                Ok(o) if o.status.success() => {
                    unmounted = true;
                    break;
                }
                Ok(o) => last = output_tail(&o),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(std::time::Duration::from_millis(10 << attempt.min(5)));
        }
        if !unmounted {
            // Lazy unmount so nothing stays behind; then report.
            let _ = Command::new("umount").arg("-l").arg(&dir).output();
            let _ = std::fs::remove_dir(&dir);
            return Err(crate::CrashError::Invalid(format!(
                "umount {} failed: {last}",
                dir.display()
            )));
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(verdict)
    }
}

/// The expected files read through dio's own ext reader (which replays a journal
/// in memory), straight from the overlay: no image file, no root.
#[derive(Debug, Clone)]
pub struct FilesChecker {
    /// Files to read.
    pub files: Vec<ExpectedFile>,
}

impl Checker for FilesChecker {
    fn name(&self) -> String {
        "files".into()
    }

    fn check(&self, state: &StateView) -> Result<Verdict> {
        let fs = match dio::ext::Ext::open(state.device(), state.size()) {
            Ok(fs) => fs,
            Err(e) => return Ok(Verdict::Fail(format!("the image does not open: {e}"))),
        };
        for f in &self.files {
            let found = match fs.lookup(f.path.as_bytes(), true) {
                Ok(inode) => {
                    let file = match fs.open_file(&inode) {
                        Ok(file) => file,
                        Err(e) => return Ok(Verdict::Fail(format!("{}: {e}", f.path))),
                    };
                    let mut data = vec![0u8; file.size() as usize];
                    match file.read_at(0, &mut data) {
                        Ok(n) => data.truncate(n),
                        Err(e) => return Ok(Verdict::Fail(format!("reading {}: {e}", f.path))),
                    }
                    Some(data)
                }
                Err(e) if e.path_kind() == Some(dio::PathErrorKind::NotFound) => None,
                Err(e) => return Ok(Verdict::Fail(format!("{}: {e}", f.path))),
            };
            if let Some(why) = f.judge(found.as_deref()) {
                return Ok(Verdict::Fail(why));
            }
        }
        Ok(Verdict::Pass)
    }
}

/// Any command: `sh -c CMD sh IMAGE`, with `DIO_CRASH_IMAGE` (the image path) and
/// `DIO_CRASH_STATE` (the state's spec) in its environment. Exit 0 passes.
#[derive(Debug, Clone)]
pub struct CommandChecker {
    /// The shell command.
    pub command: String,
}

impl Checker for CommandChecker {
    fn name(&self) -> String {
        format!("command `{}`", self.command)
    }

    fn check(&self, state: &StateView) -> Result<Verdict> {
        let img = state.temp_image("cmd")?;
        let out = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .arg("sh")
            .arg(img.path())
            .env("DIO_CRASH_IMAGE", img.path())
            .env("DIO_CRASH_STATE", state.spec().to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| crate::CrashError::io(format!("run sh -c {:?}", self.command), e))?;
        if out.status.success() {
            Ok(Verdict::Pass)
        } else {
            Ok(Verdict::Fail(format!(
                "exited {}:\n{}",
                out.status
                    .code()
                    .map_or("on a signal".to_string(), |c| c.to_string()),
                output_tail(&out)
            )))
        }
    }
}

/// A crash state as a read-only device.
pub(crate) struct StateDevice {
    state: StateView,
    geometry: Geometry,
}

impl StateDevice {
    pub(crate) fn new(state: StateView) -> StateDevice {
        let lb = state.log().header().logical_block;
        let geometry = Geometry::new(lb, state.size());
        StateDevice { state, geometry }
    }
}

impl Device for StateDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&self, mut req: Request) {
        if let Err(e) = dio::check_request(&self.geometry, &req) {
            return req.complete(Err(e));
        }
        if req.op() == Op::Write {
            return req.complete(Err(io::Error::from_raw_os_error(libc_erofs())));
        }
        let mut buf = vec![0u8; req.len() as usize];
        let r = self.state.read_at(req.offset(), &mut buf);
        match r {
            Ok(()) => {
                req.copy_in(0, &buf);
                req.complete(Ok(()))
            }
            Err(e) => req.complete(Err(io::Error::other(e.to_string()))),
        }
    }

    fn completion_mode(&self) -> CompletionMode {
        CompletionMode::Interrupt
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn name(&self) -> &str {
        "crash-state"
    }
}

/// EROFS (30 on every Linux architecture).
const fn libc_erofs() -> i32 {
    30
}

/// Every checker behind an `Arc`, for lists of mixed checkers.
pub type DynChecker = Arc<dyn Checker + Send + Sync>;
