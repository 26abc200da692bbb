//! Crash states of a growing directory: names created one by one in `/d`
//! through dio's ext writer, over the log-writes recorder, until the linear
//! directory becomes an htree, its leaves split, the root's index fills and a
//! level is added below it, and that index node splits (1 KiB blocks, names of
//! 200 bytes: four to a leaf). Every crash state (durable prefixes, seeded
//! subsets and tears of the volatile writes in block-sized units) of the
//! operations that grow the directory goes through `e2fsck -fy`, and then:
//!
//! - `e2fsck -fn` finds nothing left to fix;
//! - `/d` holds every name whose create returned before the crash (with its
//!   inode), at most the one in flight besides, no name twice;
//! - `lost+found` is empty (no name was lost and reconnected there).
//!
//! Without a journal (ext2, ext4 `^has_journal`, with and without
//! metadata_csum, 1 KiB and 4 KiB blocks) this is the write order of the
//! directory code at work (see `make_indexed` and `dx_split` in dio's
//! `client/ext/ops.rs`); with a journal (ext4, ext3) every state after the
//! replay is all or nothing.
//!
//! Only the operations that grow the directory are replayed (the first
//! conversion, the first few leaf splits, every split of an index node and new
//! level); `DIO_CRASH_LONG=1` replays every leaf split and more states per
//! window.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use dio::ext::{Attrs, Ext};
use dio::{Device, SyncConfig, SyncDevice};
use dio_crash::{
    plan_for, run_specs, Base, Checker, Log, Record, Recorder, ReplayOptions, StateView, Verdict,
};

/// One create: its marks in the log, the name and its inode.
struct Op {
    begin: u64,
    end: u64,
    /// The first flush record covering its end (its name is durable in
    /// states past it), `u64::MAX` if none.
    durable: u64,
    name: Vec<u8>,
    ino: u32,
}

/// The workload's history.
struct History {
    ops: Vec<Op>,
}

/// The names of `/d`, `lost+found`'s entries, read through dio's reader from
/// the image file `img`.
/// Names with their inodes.
type Names = Vec<(Vec<u8>, u32)>;

fn listing(img: &Path) -> Result<(Names, Vec<Vec<u8>>), String> {
    let (f, geo) = dio::probe::open_probed(img, false).map_err(|e| format!("open: {e}"))?;
    let dev = SyncDevice::new(f, geo, &SyncConfig::default()).map_err(|e| format!("{e}"))?;
    let fs = Ext::open(Arc::new(dev) as Arc<dyn Device>, geo.size).map_err(|e| format!("{e}"))?;
    let list = |p: &[u8]| -> Result<Names, String> {
        let dir = fs
            .lookup(p, false)
            .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(p)))?;
        Ok(fs
            .read_dir(&dir)
            .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(p)))?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.name, e.inode))
            .collect())
    };
    let d = list(b"/d")?;
    let lf = list(b"/lost+found")?.into_iter().map(|e| e.0).collect();
    Ok((d, lf))
}

/// `e2fsck -fy`, then `e2fsck -fn` clean, then the names (see the module docs).
struct Repaired {
    history: Arc<History>,
}

impl Checker for Repaired {
    fn name(&self) -> String {
        "e2fsck-fy-names".into()
    }

    fn check(&self, state: &StateView) -> dio_crash::Result<Verdict> {
        let at = state.spec().at;
        let ops = &self.history.ops;
        // Names made durable (a flush after their create returned) must be
        // there; names of creates begun before the crash may be.
        let durable = ops.iter().take_while(|o| o.durable < at).count();
        let begun = ops.iter().take_while(|o| o.begin < at).count();
        let where_ = format!("at record {at}, {begun} creates begun, {durable} durable");
        let img = state.temp_image("dirgrow")?;
        if let Some(keep) = std::env::var_os("DIO_DIRGROW_KEEP") {
            // Debugging: keep each state as it was before e2fsck.
            let _ = std::fs::copy(
                img.path(),
                Path::new(&keep).join(format!("{}.img", state.spec())),
            );
        }
        let fix = match common::e2fsck_repair(img.path())? {
            Ok(fix) => fix,
            Err(why) => return Ok(Verdict::Fail(format!("{where_}: {why}"))),
        };
        let (names, lost) = match listing(img.path()) {
            Ok(x) => x,
            Err(e) => return Ok(Verdict::Fail(format!("{where_}: after e2fsck -fy: {e}"))),
        };
        let fixed = if fix.code == 0 {
            String::new()
        } else {
            format!(" (e2fsck -fy fixed:\n{})", fix.log)
        };
        if !lost.is_empty() {
            return Ok(Verdict::Fail(format!(
                "{where_}: {} names in lost+found{fixed}",
                lost.len()
            )));
        }
        let mut seen: BTreeMap<&[u8], u32> = BTreeMap::new();
        for (n, ino) in &names {
            if seen.insert(n, *ino).is_some() {
                return Ok(Verdict::Fail(format!(
                    "{where_}: {} is in /d twice{fixed}",
                    String::from_utf8_lossy(&n[..8])
                )));
            }
        }
        let missing: Vec<String> = ops[..durable]
            .iter()
            .filter(|o| seen.get(&o.name[..]) != Some(&o.ino))
            .map(|o| String::from_utf8_lossy(&o.name[..8]).into_owned())
            .collect();
        if !missing.is_empty() {
            return Ok(Verdict::Fail(format!(
                "{where_}: {} names lost ({:?}...){fixed}",
                missing.len(),
                &missing[..missing.len().min(4)]
            )));
        }
        for (n, ino) in &names {
            if !ops[..begun].iter().any(|o| o.name == *n && o.ino == *ino) {
                return Ok(Verdict::Fail(format!(
                    "{where_}: /d has {} -> {ino}, never made{fixed}",
                    String::from_utf8_lossy(&n[..n.len().min(12)])
                )));
            }
        }
        Ok(Verdict::Pass)
    }
}

/// A 200-byte name (four fit a 1 KiB leaf) starting with its serial.
fn name_of(k: usize) -> Vec<u8> {
    let mut n = format!("{k:07}-").into_bytes();
    let fill = b'a' + (k % 26) as u8;
    n.resize(200, fill);
    n
}

const UUID: &str = "6b1f3a52-0d6e-4c1e-9a57-3c2f1e0b7d44";

struct Config {
    tag: &'static str,
    mkfs: &'static str,
    args: &'static [&'static str],
    block: u64,
    journal: bool,
    /// Stop after this many index-changing operations (a node split or a new
    /// level), or at `max_names`.
    index_ops: usize,
    max_names: usize,
    /// Batch the creates (`Ext::begin_batch`), writing the batch every this
    /// many (0: no batch).
    batch: usize,
}

struct Outcome {
    states: u64,
    failed: u64,
    first: Vec<String>,
    kinds: String,
}

/// Record the workload of `c` and replay the chosen operations' states.
fn record_and_replay(c: &Config) -> Option<Outcome> {
    for t in [c.mkfs, "e2fsck"] {
        if !dio_testkit::have(t) {
            dio_testkit::skip(format!("{t} is not installed"));
            return None;
        }
    }
    let long = common::long();
    let dir = common::scratch(&format!("dirgrow-{}", c.tag));
    let img = dir.join("disk.img");
    let out = Command::new(c.mkfs)
        .args(["-q", "-F", "-b", &c.block.to_string()])
        // The same hashes (and so the same splits) every run.
        .args(["-U", UUID, "-E", &format!("hash_seed={UUID}")])
        .args(c.args)
        .arg(&img)
        .arg(if c.block == 1024 { "4M" } else { "8M" })
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {out:?}", c.mkfs);
    {
        let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
        let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
        let fs = Ext::open_writable(Arc::new(dev) as Arc<dyn Device>, geo.size).unwrap();
        fs.mkdir(b"/d", &Attrs::new()).unwrap();
    }
    let base: PathBuf = dir.join("base.img");
    std::fs::copy(&img, &base).unwrap();

    let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
    let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
    let log_path = dir.join("log");
    let rec = Arc::new(Recorder::create(dev, &log_path).unwrap());
    let mut ops: Vec<Op> = Vec::new();
    // Per operation: how many blocks it added to /d.
    let mut grew = Vec::new();
    {
        let fs = Ext::open_writable(rec.clone() as Arc<dyn Device>, geo.size).unwrap();
        assert_eq!(fs.is_journaled(), c.journal);
        let mut size = fs.lookup(b"/d", false).unwrap().size;
        let mut index_ops = 0;
        let mut converted = false;
        // Batched: the operations since the last batch write.
        let mut unwritten = 0;
        let mut stop = false;
        if c.batch > 0 {
            fs.begin_batch().unwrap();
        }
        for k in 0..c.max_names {
            let name = name_of(k);
            let mut path = b"/d/".to_vec();
            path.extend_from_slice(&name);
            let begin = rec.mark(&format!("begin {k}")).unwrap();
            let inode = fs.create(&path, &Attrs::new()).unwrap();
            let mut end = rec.mark(&format!("end {k}")).unwrap();
            if c.batch > 0 {
                unwritten += 1;
            }
            if c.batch > 0 && (unwritten == c.batch || stop) {
                // The batch goes out: its names are made only now.
                fs.commit_batch().unwrap();
                end = rec.mark(&format!("batch written {k}")).unwrap();
                let n = ops.len();
                for o in &mut ops[n + 1 - unwritten..] {
                    o.end = end;
                }
                unwritten = 0;
            }
            ops.push(Op {
                begin,
                end,
                durable: u64::MAX,
                name,
                ino: inode.ino,
            });
            let now = fs.lookup(b"/d", false).unwrap().size;
            let g = (now - size) / c.block;
            size = now;
            grew.push(g);
            if g > 0 && !converted {
                // The conversion (and the split of its new leaf).
                converted = true;
            } else if g >= 2 {
                index_ops += 1;
                stop |= index_ops >= c.index_ops;
            }
            if stop && unwritten == 0 {
                break;
            }
        }
        if c.batch > 0 {
            fs.end_batch().unwrap();
            let end = rec.mark("batch ended").unwrap();
            let n = ops.len();
            for o in &mut ops[n - unwritten..] {
                o.end = end;
            }
        }
    }
    drop(rec);
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn of the final image: {out:?}"
    );

    // The operations to replay: the conversion (the first growth), the first
    // leaf splits, every operation that changed the index.
    let mut chosen = Vec::new();
    let mut splits = 0;
    let mut converted = false;
    for (k, &g) in grew.iter().enumerate() {
        let pick = match g {
            0 => false,
            _ if !converted => {
                converted = true;
                true
            }
            1 => {
                splits += 1;
                long || splits <= 2 || splits % 40 == 0
            }
            _ => true,
        };
        if pick {
            chosen.push(k);
        }
    }
    let kinds = format!(
        "{} creates, {} leaf splits, {} index splits or new levels, {} replayed",
        grew.len(),
        grew.iter().filter(|&&g| g == 1).count(),
        grew.iter().filter(|&&g| g >= 2).count().saturating_sub(1),
        chosen.len()
    );
    let log = Arc::new(Log::open(&log_path).unwrap());
    for o in &mut ops {
        o.durable = log
            .records()
            .iter()
            .enumerate()
            .skip(o.end as usize)
            .find(|(_, r)| matches!(r, Record::Flush { covers } if *covers > o.end))
            .map_or(u64::MAX, |(i, _)| i as u64);
    }
    let opts = ReplayOptions {
        max_per_window: if long { 24 } else { 6 },
        max_states: None,
        seed: 7,
        torn: true,
        atomic_unit: c.block,
    };
    let specs: Vec<_> = plan_for(&log, &opts)
        .into_iter()
        .filter(|s| {
            chosen
                .iter()
                .any(|&k| ops[k].begin < s.at && s.at <= ops[k].end)
        })
        .collect();
    let history = Arc::new(History { ops });
    let checker = Repaired { history };
    let sum = run_specs(
        &log,
        Base::File(base),
        &[&checker],
        &specs,
        &dir.join("states"),
    )
    .unwrap();
    eprintln!(
        "{}: {kinds}; {} states, {} failed, {:.1} s",
        c.tag,
        sum.states,
        sum.failed,
        sum.elapsed.as_secs_f64()
    );
    let first: Vec<String> = sum
        .failures
        .iter()
        .take(3)
        .map(|f| format!("{} {}", f.spec, f.message))
        .collect();
    for f in &first {
        eprintln!("  {f}");
    }
    if sum.failed == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Some(Outcome {
        states: sum.states,
        failed: sum.failed,
        first,
        kinds,
    })
}

fn check(c: Config) {
    let Some(o) = record_and_replay(&c) else {
        return;
    };
    assert!(
        o.states >= 20,
        "{}: {} states ({})",
        c.tag,
        o.states,
        o.kinds
    );
    assert_eq!(o.failed, 0, "{}: {:#?}", c.tag, o.first);
}

#[test]
fn ext2_1k_directory_growth_is_crash_safe() {
    check(Config {
        tag: "ext2-1k",
        mkfs: "mkfs.ext2",
        args: &[],
        block: 1024,
        journal: false,
        index_ops: 2,
        max_names: 2000,
        batch: 0,
    });
}

#[test]
fn ext4_nojournal_1k_csum_directory_growth_is_crash_safe() {
    check(Config {
        tag: "ext4-nj-1k-csum",
        mkfs: "mkfs.ext4",
        args: &["-O", "^has_journal,metadata_csum"],
        block: 1024,
        journal: false,
        index_ops: 2,
        max_names: 2000,
        batch: 0,
    });
}

#[test]
fn ext4_nojournal_4k_directory_growth_is_crash_safe() {
    check(Config {
        tag: "ext4-nj-4k",
        mkfs: "mkfs.ext4",
        args: &["-O", "^has_journal,^metadata_csum"],
        block: 4096,
        journal: false,
        index_ops: 1,
        max_names: 150,
        batch: 0,
    });
}

#[test]
fn ext4_journal_1k_directory_growth_is_all_or_nothing() {
    check(Config {
        tag: "ext4-j-1k",
        mkfs: "mkfs.ext4",
        args: &[],
        block: 1024,
        journal: true,
        index_ops: 2,
        max_names: 2000,
        batch: 0,
    });
}

#[test]
fn ext3_1k_directory_growth_is_all_or_nothing() {
    check(Config {
        tag: "ext3-1k",
        mkfs: "mkfs.ext3",
        args: &[],
        block: 1024,
        journal: true,
        index_ops: 1,
        max_names: 40,
        batch: 0,
    });
}

#[test]
fn ext2_1k_batched_directory_growth_is_crash_safe() {
    check(Config {
        tag: "ext2-1k-batch",
        mkfs: "mkfs.ext2",
        args: &[],
        block: 1024,
        journal: false,
        index_ops: 2,
        max_names: 2000,
        batch: 9,
    });
}

#[test]
fn ext4_nojournal_4k_csum_batched_directory_growth_is_crash_safe() {
    check(Config {
        tag: "ext4-nj-4k-csum-batch",
        mkfs: "mkfs.ext4",
        args: &["-O", "^has_journal,metadata_csum"],
        block: 4096,
        journal: false,
        index_ops: 1,
        max_names: 150,
        batch: 40,
    });
}
