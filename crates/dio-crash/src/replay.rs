//! The replayer: crash states from a log.
//!
//! # The crash model
//!
//! A crash at position `N` happens after the log's first `N` records completed and
//! before record `N` did. At that moment:
//!
//! - a write is **durable** if it completed without error and either was FUA or a
//!   flush issued after it completed has itself completed (its record is below
//!   `N`): it is on the medium, whole;
//! - every other write issued before the crash (completed below `N`, or still in
//!   flight: submitted when the log held at most `N` records) is **volatile**: it
//!   may be on the medium, missing, or **torn** (some of its 512-byte sectors
//!   landed, others not);
//! - where two writes that landed overlap, the one issued after the other
//!   completed wins; writes that were in flight together may land in either order,
//!   chosen per sector (a seeded, deterministic choice: a random linear extension of
//!   the happens-before order, so the choice is consistent across writes).
//!
//! # The states
//!
//! Barriers (completed flushes, completed FUA writes) cut the log into windows.
//! For each window the plan holds the durable prefix right after the barrier that
//! opens it, the crash just before the barrier that closes it with nothing volatile
//! landed and with everything landed, and then seeded random states (a random
//! crash point inside the window, a random subset of the volatile writes, some of
//! them torn) up to [`ReplayOptions::max_per_window`] states per window.
//!
//! A state is named by a [`StateSpec`] (`AT:SEED[:KEPT]`, see its docs), which
//! rebuilds it exactly: `dio crash state LOG --base IMAGE --at SPEC --out FILE`.
//!
//! States are copy-on-write overlays over the base image: the sectors that differ
//! from the base map to the log record holding their bytes; checkers read through
//! the overlay ([`StateView::read_at`], [`StateView::device`]) or ask for an image
//! file ([`StateView::temp_image`]: a copy of the base with the overlay written in).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::log::{Log, Record, WriteRec};
use crate::{CrashError, Result};

/// A hasher for sector numbers (a multiply and a shift; std's SipHash costs
/// most of a state's build time otherwise).
#[derive(Debug, Default, Clone, Copy)]
pub struct SectorHasher(u64);

impl std::hash::Hasher for SectorHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        let h = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}

/// A map keyed by sector.
pub type SectorMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<SectorHasher>>;

/// The unit of tearing and of the overlay.
pub const SECTOR: u64 = 512;

/// A small, seedable generator (splitmix64).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How to build states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Most states per window between barriers (the fixed ones included).
    pub max_per_window: usize,
    /// Most states in all (`None`: no limit); the plan is cut evenly.
    pub max_states: Option<usize>,
    /// Seed of the random states and of the landing order of concurrent writes.
    pub seed: u64,
    /// Tear some multi-sector volatile writes.
    pub torn: bool,
    /// The bytes the device writes atomically (a power of two, at least 512): a
    /// torn write loses or keeps whole aligned units of this size. 512, the
    /// default, assumes the least; 4096 is what a disk with 4 KiB physical sectors
    /// writes whole (and what ext4 counts on for its 1 KiB superblock at byte 1024:
    /// with 512-byte units a torn superblock write fails its checksum).
    pub atomic_unit: u64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            max_per_window: 8,
            max_states: None,
            seed: 1,
            torn: true,
            atomic_unit: SECTOR,
        }
    }
}

/// A volatile write a state keeps: all of it, or only some sectors (torn).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Kept {
    /// The write's record index.
    pub record: u64,
    /// Sector ranges of the write (relative to its start, half-open) that landed;
    /// `None`: all of it.
    pub sectors: Option<Vec<(u32, u32)>>,
}

/// One crash state: the crash position, the seed of the landing order, and the
/// volatile writes that landed.
///
/// Text form: `AT:SEED` (only durable writes landed) or `AT:SEED:KEPT`, where KEPT is
/// a comma-separated list of record indices, each optionally followed by
/// `/A-B.C-D...`: the half-open sector ranges of the write that landed (torn). A bare
/// `AT` means `AT:0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateSpec {
    /// Crash position: after this many records.
    pub at: u64,
    /// Seed of the per-sector landing order of concurrent writes.
    pub seed: u64,
    /// Volatile writes that landed, by record index (ascending).
    pub kept: Vec<Kept>,
}

impl fmt::Display for StateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.at, self.seed)?;
        for (i, k) in self.kept.iter().enumerate() {
            f.write_str(if i == 0 { ":" } else { "," })?;
            write!(f, "{}", k.record)?;
            if let Some(r) = &k.sectors {
                for (j, (a, b)) in r.iter().enumerate() {
                    f.write_str(if j == 0 { "/" } else { "." })?;
                    write!(f, "{a}-{b}")?;
                }
            }
        }
        Ok(())
    }
}

impl FromStr for StateSpec {
    type Err = CrashError;
    fn from_str(s: &str) -> Result<StateSpec> {
        let bad = |why: &str| CrashError::BadSpec(format!("{s:?}: {why}"));
        let num = |t: &str, what: &str| -> Result<u64> {
            t.parse::<u64>()
                .map_err(|_| bad(&format!("{what} {t:?} is not a number")))
        };
        let mut parts = s.splitn(3, ':');
        let at = num(parts.next().unwrap_or(""), "position")?;
        let seed = match parts.next() {
            Some(t) => num(t, "seed")?,
            None => 0,
        };
        let mut kept = Vec::new();
        if let Some(list) = parts.next().filter(|l| !l.is_empty()) {
            for item in list.split(',') {
                let (rec, ranges) = match item.split_once('/') {
                    Some((r, g)) => (r, Some(g)),
                    None => (item, None),
                };
                let record = num(rec, "record")?;
                let sectors = match ranges {
                    None => None,
                    Some(g) => {
                        let mut v = Vec::new();
                        for r in g.split('.') {
                            let (a, b) = r
                                .split_once('-')
                                .ok_or_else(|| bad(&format!("sector range {r:?} is not A-B")))?;
                            let (a, b) = (num(a, "sector")?, num(b, "sector")?);
                            if a >= b || b > u64::from(u32::MAX) {
                                return Err(bad(&format!("empty sector range {r:?}")));
                            }
                            v.push((a as u32, b as u32));
                        }
                        Some(v)
                    }
                };
                kept.push(Kept { record, sectors });
            }
        }
        Ok(StateSpec { at, seed, kept })
    }
}

/// Where a state's unwritten sectors come from.
#[derive(Debug, Clone)]
pub enum Base {
    /// Zeros (a device that started zeroed, such as a fresh `MemDevice`).
    Zeros,
    /// An image file (bytes past its end read as zeros).
    File(PathBuf),
}

/// The base, opened once.
#[derive(Debug)]
struct BaseSrc {
    base: Base,
    file: Option<File>,
}

/// What the log says about durability, computed once.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Per record: the position of the barrier record that made it durable
    /// (`u64::MAX`: never, or not a write).
    durable_at: Vec<u64>,
    /// Record indices of barriers (completed flushes, completed FUA writes).
    barriers: Vec<u64>,
    /// Record indices of writes.
    writes: Vec<u64>,
    /// Sector -> the claims (record indices) covering it.
    claims_by_sector: SectorMap<Vec<u64>>,
    /// Record indices of claims.
    claims: Vec<u64>,
}

impl Analysis {
    /// Analyse `log`.
    pub fn new(log: &Log) -> Analysis {
        let recs = log.records();
        let mut durable_at = vec![u64::MAX; recs.len()];
        let mut barriers = Vec::new();
        let mut writes = Vec::new();
        // (covers, index) of every flush, for "the first flush covering write i".
        let mut flushes: Vec<(u64, u64)> = Vec::new();
        let mut claims_by_sector: SectorMap<Vec<u64>> = SectorMap::default();
        let mut claims = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            match r {
                Record::Claim { offset, len, .. } => {
                    claims.push(i as u64);
                    for s in *offset / SECTOR..(offset + len).div_ceil(SECTOR) {
                        claims_by_sector.entry(s).or_default().push(i as u64);
                    }
                }
                Record::Write(w) => {
                    writes.push(i as u64);
                    if w.fua && !w.failed {
                        durable_at[i] = i as u64;
                        barriers.push(i as u64);
                    }
                }
                Record::Flush { covers } => {
                    flushes.push((*covers, i as u64));
                    barriers.push(i as u64);
                }
                _ => {}
            }
        }
        // Suffix minimum of the flush index over flushes sorted by coverage.
        flushes.sort_unstable();
        let mut suffix_min = vec![u64::MAX; flushes.len() + 1];
        for k in (0..flushes.len()).rev() {
            suffix_min[k] = suffix_min[k + 1].min(flushes[k].1);
        }
        for &i in &writes {
            let Record::Write(w) = &recs[i as usize] else {
                continue;
            };
            if w.failed {
                continue;
            }
            // First flush whose coverage exceeds i.
            let k = flushes.partition_point(|&(covers, _)| covers <= i);
            durable_at[i as usize] = durable_at[i as usize].min(suffix_min[k]);
        }
        Analysis {
            durable_at,
            barriers,
            writes,
            claims_by_sector,
            claims,
        }
    }

    /// Whether record `i` is a write that is durable at crash position `at`.
    pub fn durable(&self, i: u64, at: u64) -> bool {
        self.durable_at[i as usize] < at
    }

    /// The claims' record indices, ascending.
    pub fn claims(&self) -> &[u64] {
        &self.claims
    }

    /// The claims (record indices) covering a sector.
    pub fn claims_at(&self, sector: u64) -> &[u64] {
        self.claims_by_sector
            .get(&sector)
            .map_or(&[], |v| v.as_slice())
    }

    /// The barrier records.
    pub fn barriers(&self) -> &[u64] {
        &self.barriers
    }

    /// The writes that may or may not have landed at crash position `at`.
    pub fn volatile(&self, log: &Log, at: u64) -> Vec<u64> {
        self.writes
            .iter()
            .copied()
            .filter(|&i| self.durable_at[i as usize] >= at && write_rec(log, i).submitted <= at)
            .collect()
    }
}

pub(crate) fn write_rec(log: &Log, i: u64) -> &WriteRec {
    match &log.records()[i as usize] {
        Record::Write(w) => w,
        _ => panic!("record {i} is not a write"),
    }
}

/// The plan: which states to build, in increasing crash position.
pub fn plan(log: &Log, an: &Analysis, opts: &ReplayOptions) -> Vec<StateSpec> {
    let n = log.records().len() as u64;
    let mut rng = Rng::new(opts.seed);
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |spec: StateSpec, out: &mut Vec<StateSpec>| {
        if seen.insert(spec.clone()) {
            out.push(spec);
        }
    };
    let whole = |i: u64| Kept {
        record: i,
        sectors: None,
    };
    let mut lo = 0u64;
    let mut ends: Vec<u64> = an.barriers.clone();
    ends.push(n);
    for &hi in &ends {
        if hi < lo {
            continue;
        }
        let seed = opts.seed;
        let mut count = 0usize;
        let budget = opts.max_per_window.max(1);
        // The durable prefix right after the barrier that opened the window.
        push(
            StateSpec {
                at: lo,
                seed,
                kept: Vec::new(),
            },
            &mut out,
        );
        count += 1;
        let cands = an.volatile(log, hi);
        let claims = log.records()[lo as usize..hi as usize]
            .iter()
            .any(|r| matches!(r, Record::Claim { .. }));
        if count < budget && (claims || !cands.is_empty()) && hi > lo {
            // Just before the closing barrier, nothing volatile landed.
            push(
                StateSpec {
                    at: hi,
                    seed,
                    kept: Vec::new(),
                },
                &mut out,
            );
            count += 1;
        }
        if count < budget && !cands.is_empty() {
            // ... and everything landed.
            push(
                StateSpec {
                    at: hi,
                    seed,
                    kept: cands.iter().map(|&i| whole(i)).collect(),
                },
                &mut out,
            );
            count += 1;
        }
        // Random states; give up on a window after a few duplicate draws.
        let mut tries = 0;
        while count < budget && !cands.is_empty() && tries < budget * 4 {
            tries += 1;
            let at = lo + rng.below(hi - lo + 1);
            let vol: Vec<u64> = cands
                .iter()
                .copied()
                .filter(|&i| write_rec(log, i).submitted <= at)
                .collect();
            if vol.is_empty() {
                continue;
            }
            let p = 1 + rng.below(99); // percent of writes that land
            let mut kept = Vec::new();
            for &i in &vol {
                if rng.below(100) >= p {
                    continue;
                }
                let w = write_rec(log, i);
                let unit = opts.atomic_unit.max(SECTOR);
                let (first, end) = (w.offset / unit, (w.offset + w.len).div_ceil(unit));
                let units = end.saturating_sub(first);
                let torn = opts.torn && units > 1 && rng.below(4) == 0;
                kept.push(Kept {
                    record: i,
                    sectors: torn.then(|| {
                        // Whole atomic units land or not; as sector ranges of the
                        // write.
                        tear(&mut rng, units as u32)
                            .into_iter()
                            .map(|(a, b)| {
                                let lo = ((first + u64::from(a)) * unit).max(w.offset) - w.offset;
                                let hi = ((first + u64::from(b)) * unit).min(w.offset + w.len)
                                    - w.offset;
                                ((lo / SECTOR) as u32, hi.div_ceil(SECTOR) as u32)
                            })
                            .collect()
                    }),
                });
            }
            let before = out.len();
            push(StateSpec { at, seed, kept }, &mut out);
            if out.len() > before {
                count += 1;
            }
        }
        lo = hi + 1;
    }
    out.sort_by_key(|s| s.at);
    if let Some(max) = opts.max_states {
        if out.len() > max {
            // Keep an even spread over the log.
            let len = out.len();
            out = (0..max).map(|k| out[k * len / max].clone()).collect();
        }
    }
    out
}

/// Which sectors of an `n`-sector write landed: a prefix, a suffix, or a random
/// mix; never none and never all.
fn tear(rng: &mut Rng, n: u32) -> Vec<(u32, u32)> {
    match rng.below(3) {
        0 => vec![(0, 1 + rng.below(u64::from(n) - 1) as u32)],
        1 => vec![(1 + rng.below(u64::from(n) - 1) as u32, n)],
        _ => {
            let mut mask: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
            if mask.iter().all(|&b| b) {
                mask[rng.below(u64::from(n)) as usize] = false;
            }
            if mask.iter().all(|&b| !b) {
                mask[rng.below(u64::from(n)) as usize] = true;
            }
            let mut out = Vec::new();
            let mut start = None;
            for (s, &on) in mask.iter().chain(std::iter::once(&false)).enumerate() {
                match (on, start) {
                    (true, None) => start = Some(s as u32),
                    (false, Some(a)) => {
                        out.push((a, s as u32));
                        start = None;
                    }
                    _ => {}
                }
            }
            out
        }
    }
}

/// The landing-order key of write `i` at `sector`: a seeded point in the interval
/// `[submitted, i + 1)` (in 1/2^32 steps), then the index. If `a` completed before
/// `b` was submitted (`a < b.submitted`), `a`'s interval ends where `b`'s begins,
/// so `a`'s key is below `b`'s; writes in flight together have overlapping
/// intervals and compare either way, the same way for the same seed.
fn key(log: &Log, i: u64, sector: u64, seed: u64) -> (u128, u64) {
    let w = write_rec(log, i);
    let sub = w.submitted.min(i);
    let span = u128::from(i + 1 - sub) << 32;
    let h = u128::from(mix(seed ^ mix(i ^ mix(sector))));
    ((u128::from(sub) << 32) + h % span, i)
}

/// Source of [`StateView::durable_generation`] numbers, unique in the process.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Builds states in turn (cheapest in increasing crash position).
pub struct Replayer {
    log: Arc<Log>,
    an: Arc<Analysis>,
    base: Arc<BaseSrc>,
    seed: u64,
    /// Durable writes applied: crash position they are for.
    upto: u64,
    /// Writes in order of the position they become durable at.
    order: Vec<u64>,
    next: usize,
    /// Sector -> record of the durable write that holds it.
    durable: Arc<SectorMap<u64>>,
    scratch: PathBuf,
    made: u64,
    generation: u64,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field("log", &self.log.path())
            .field("upto", &self.upto)
            .finish()
    }
}

impl Replayer {
    /// A replayer of `log` over `base`; image files for checkers go to `scratch`.
    pub fn new(log: Arc<Log>, base: Base, scratch: impl AsRef<Path>) -> Result<Replayer> {
        let file = match &base {
            Base::File(p) => Some(
                File::open(p)
                    .map_err(|e| CrashError::io(format!("open base {}", p.display()), e))?,
            ),
            Base::Zeros => None,
        };
        let an = Arc::new(Analysis::new(&log));
        let mut order: Vec<u64> = an
            .writes
            .iter()
            .copied()
            .filter(|&i| an.durable_at[i as usize] != u64::MAX)
            .collect();
        order.sort_by_key(|&i| an.durable_at[i as usize]);
        Ok(Replayer {
            log,
            an,
            base: Arc::new(BaseSrc { base, file }),
            seed: 0,
            upto: 0,
            order,
            next: 0,
            durable: Arc::new(SectorMap::default()),
            scratch: scratch.as_ref().to_path_buf(),
            made: 0,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The log.
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The durability analysis.
    pub fn analysis(&self) -> &Arc<Analysis> {
        &self.an
    }

    /// Build the state `spec` names. Fails if it keeps a record that is not a
    /// volatile write at its crash position, or a sector range outside the write.
    pub fn state(&mut self, spec: &StateSpec) -> Result<StateView> {
        let log = Arc::clone(&self.log);
        let n = log.records().len() as u64;
        if spec.at > n {
            return Err(CrashError::BadSpec(format!(
                "{spec}: position {} is past the log's end ({n} records)",
                spec.at
            )));
        }
        if spec.seed != self.seed || spec.at < self.upto {
            self.seed = spec.seed;
            self.upto = 0;
            self.next = 0;
            self.durable = Arc::new(SectorMap::default());
            self.generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        }
        // Apply the writes that became durable since.
        let durable = Arc::make_mut(&mut self.durable);
        while let Some(&i) = self.order.get(self.next) {
            if self.an.durable_at[i as usize] >= spec.at {
                break;
            }
            self.next += 1;
            self.generation = GENERATION.fetch_add(1, Ordering::Relaxed);
            let w = write_rec(&log, i);
            for s in sectors_of(w) {
                let better = match durable.get(&s) {
                    Some(&cur) => key(&log, i, s, self.seed) > key(&log, cur, s, self.seed),
                    None => true,
                };
                if better {
                    durable.insert(s, i);
                }
            }
        }
        self.upto = spec.at;
        // The kept volatile writes, over the durable ones.
        let mut extra: SectorMap<u64> = SectorMap::default();
        let mut last = None;
        for k in &spec.kept {
            if last.is_some_and(|l| k.record <= l) {
                return Err(CrashError::BadSpec(format!(
                    "{spec}: kept records must be listed once, in ascending order"
                )));
            }
            last = Some(k.record);
            let ok = matches!(log.records().get(k.record as usize), Some(Record::Write(w))
                if w.submitted <= spec.at && !self.an.durable(k.record, spec.at));
            if !ok {
                return Err(CrashError::BadSpec(format!(
                    "{spec}: record {} is not a volatile write at position {}",
                    k.record, spec.at
                )));
            }
            let w = write_rec(&log, k.record);
            let first = w.offset / SECTOR;
            let count = w.len.div_ceil(SECTOR);
            let ranges: Vec<(u64, u64)> = match &k.sectors {
                None => vec![(0, count)],
                Some(r) => r
                    .iter()
                    .map(|&(a, b)| (u64::from(a), u64::from(b)))
                    .collect(),
            };
            for (a, b) in ranges {
                if b > count {
                    return Err(CrashError::BadSpec(format!(
                        "{spec}: sectors {a}-{b} outside record {} ({count} sectors)",
                        k.record
                    )));
                }
                for s in first + a..first + b {
                    let cur = extra.get(&s).or_else(|| self.durable.get(&s)).copied();
                    let better = match cur {
                        Some(c) => key(&log, k.record, s, spec.seed) > key(&log, c, s, spec.seed),
                        None => true,
                    };
                    if better {
                        extra.insert(s, k.record);
                    }
                }
            }
        }
        self.made += 1;
        Ok(StateView {
            inner: Arc::new(ViewInner {
                log,
                an: Arc::clone(&self.an),
                base: Arc::clone(&self.base),
                durable: Arc::clone(&self.durable),
                extra,
                spec: spec.clone(),
                scratch: self.scratch.clone(),
                serial: self.made,
                generation: self.generation,
            }),
        })
    }
}

/// The sectors a write covers (whole or in part).
fn sectors_of(w: &WriteRec) -> std::ops::Range<u64> {
    let first = w.offset / SECTOR;
    first..(w.offset + w.len).div_ceil(SECTOR)
}

struct ViewInner {
    log: Arc<Log>,
    an: Arc<Analysis>,
    base: Arc<BaseSrc>,
    durable: Arc<SectorMap<u64>>,
    extra: SectorMap<u64>,
    spec: StateSpec,
    scratch: PathBuf,
    serial: u64,
    generation: u64,
}

/// One crash state, as an overlay over the base image (cheap to clone).
#[derive(Clone)]
pub struct StateView {
    inner: Arc<ViewInner>,
}

impl std::fmt::Debug for StateView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateView({})", self.inner.spec)
    }
}

impl StateView {
    /// What state this is.
    pub fn spec(&self) -> &StateSpec {
        &self.inner.spec
    }

    /// The log it comes from.
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    /// The durability analysis of the log.
    pub fn analysis(&self) -> &Analysis {
        &self.inner.an
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.log.header().device_size
    }

    /// The record whose bytes a sector holds in this state (`None`: the base's).
    pub fn winner(&self, sector: u64) -> Option<u64> {
        let v = &self.inner;
        v.extra
            .get(&sector)
            .or_else(|| v.durable.get(&sector))
            .copied()
    }

    /// A number that changes (process-wide) whenever the durable part of the
    /// states changes: two views with the same number differ only in their
    /// volatile sectors and crash position (checkers may cache by it).
    pub fn durable_generation(&self) -> u64 {
        self.inner.generation
    }

    /// The durable write that holds a sector, if any (whatever a volatile write
    /// may have put over it).
    pub fn durable_winner(&self, sector: u64) -> Option<u64> {
        self.inner.durable.get(&sector).copied()
    }

    /// The sectors a kept volatile write won over what was there.
    pub fn volatile_sectors(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.inner.extra.iter().map(|(&s, &r)| (s, r))
    }

    /// Read the state's bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let sector = at / SECTOR;
            let in_sector = at % SECTOR;
            let n = ((SECTOR - in_sector) as usize).min(buf.len() - pos);
            let dst = &mut buf[pos..pos + n];
            match self.winner(sector) {
                Some(r) => {
                    let w = write_rec(&self.inner.log, r);
                    // The write may cover only part of the sector: the rest is
                    // what was under it, which no sector-aligned device write
                    // leaves; read it from the base.
                    let (lo, hi) = (w.offset.max(at), (w.offset + w.len).min(at + n as u64));
                    if lo > at || hi < at + n as u64 {
                        self.read_base(at, dst)?;
                    }
                    if lo < hi {
                        let d = &mut dst[(lo - at) as usize..(hi - at) as usize];
                        self.inner.log.read_data(w.data_at, lo - w.offset, d)?;
                    }
                }
                None => self.read_base(at, dst)?,
            }
            pos += n;
        }
        Ok(())
    }

    fn read_base(&self, at: u64, dst: &mut [u8]) -> Result<()> {
        match (&self.inner.base.base, &self.inner.base.file) {
            (Base::File(p), Some(f)) => read_or_zero(f, at, dst)
                .map_err(|e| CrashError::io(format!("read base {}", p.display()), e)),
            _ => {
                dst.fill(0);
                Ok(())
            }
        }
    }

    /// Write the state as an image file at `path`: a copy of the base (the kernel
    /// shares extents where the file system can), then every sector that differs.
    pub fn write_image(&self, path: &Path) -> Result<()> {
        let ctx = |what: &str, e| CrashError::io(format!("{what} {}", path.display()), e);
        let size = self.size();
        match &self.inner.base.base {
            Base::File(b) => {
                std::fs::copy(b, path).map_err(|e| {
                    CrashError::io(
                        format!("copy base {} to {}", b.display(), path.display()),
                        e,
                    )
                })?;
            }
            Base::Zeros => {
                File::create(path).map_err(|e| ctx("create", e))?;
            }
        }
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| ctx("open", e))?;
        if f.metadata().map_err(|e| ctx("stat", e))?.len() < size {
            f.set_len(size).map_err(|e| ctx("resize", e))?;
        }
        // Winner of each sector, in order; runs of one record written at once.
        let v = &self.inner;
        let mut sectors: Vec<(u64, u64)> = v
            .durable
            .iter()
            .filter(|(s, _)| !v.extra.contains_key(s))
            .chain(v.extra.iter())
            .map(|(&s, &r)| (s, r))
            .collect();
        sectors.sort_unstable();
        let mut buf = Vec::new();
        let mut i = 0;
        while i < sectors.len() {
            let (s0, r) = sectors[i];
            let mut j = i + 1;
            while j < sectors.len() && sectors[j] == (s0 + (j - i) as u64, r) {
                j += 1;
            }
            let w = write_rec(&v.log, r);
            let lo = (s0 * SECTOR).max(w.offset);
            let hi = ((s0 + (j - i) as u64) * SECTOR).min(w.offset + w.len);
            buf.resize((hi - lo) as usize, 0);
            v.log.read_data(w.data_at, lo - w.offset, &mut buf)?;
            f.write_all_at(&buf, lo).map_err(|e| ctx("write", e))?;
            i = j;
        }
        Ok(())
    }

    /// A fresh image file of the state in the scratch directory, removed when the
    /// returned guard drops. `tag` names the user (a checker) in the file name.
    pub fn temp_image(&self, tag: &str) -> Result<TempImage> {
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let path = self.inner.scratch.join(format!(
            "state-{}-{}-{}.img",
            std::process::id(),
            self.inner.serial,
            tag
        ));
        let img = TempImage { path };
        self.write_image(&img.path)?;
        Ok(img)
    }

    /// The state as a read-only [`dio::Device`] (writes fail with EROFS), for
    /// checkers that read it through dio (the ext reader, say).
    pub fn device(&self) -> Arc<dyn dio::Device> {
        Arc::new(crate::check::StateDevice::new(self.clone()))
    }
}

/// An image file that is removed on drop.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// pread that reads zeros past the end of the file.
fn read_or_zero(f: &File, at: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < dst.len() {
        match f.read_at(&mut dst[done..], at + done as u64) {
            Ok(0) => {
                dst[done..].fill(0);
                return Ok(());
            }
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
