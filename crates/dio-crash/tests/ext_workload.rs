//! Crash replay of randomized allocating workloads on journalled ext3 and ext4
//! images: create, append, write past the end and into holes, truncate, mkdir,
//! rm, rmdir, symlink, some writes synced (dsync) and some not, all through
//! dio's ext writer over the log-writes recorder. Every replayed state (the
//! durable prefix at each flush and FUA point, seeded reorderings and torn
//! writes in 4 KiB units) must:
//!
//! - open through dio's reader (its journal replayed in memory) and match the
//!   model: every operation that completed durably (a name operation, a synced
//!   write) is there; what came after it is there or not, an operation in flight
//!   all or nothing per name; file bytes are bytes some allowed version had (no
//!   stale bytes of freed blocks, no zeros where the data was promised);
//! - pass `e2fsck -fn` after `e2fsck -E journal_only` (a sample of the states:
//!   e2fsck costs two processes a state).
//!
//! The broken-on-purpose journal (`dio::ext::testing::set_commit_before_data`)
//! must be caught by the same model.
//!
//! `DIO_CRASH_LONG=1` runs longer workloads, more states per window and e2fsck
//! on more of them.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dio::ext::{Attrs, Ext};
use dio::{Device, SyncDevice};
use dio_crash::{E2fsckChecker, Recorder, ReplayOptions, Summary};
use dio_testkit::{assert_fsck_clean, mke2fs, need};

use common::tree_model::{History, ModelFs, Node, Sampled, Tree};

/// The workload: `ops` seeded operations through dio's ext writer on `fs`,
/// marks around each; returns the history.
fn workload(rec: &Recorder<SyncDevice>, fs: &Ext, seed: u64, ops: usize) -> History {
    let mut rng = common::Rng::new(seed);
    let mut h = History::default();
    let mut tree = Tree::new();
    h.trees.push(tree.clone());
    let mut serial = 0u32;
    for k in 0..ops {
        let byte = (k % 251) as u8 + 1;
        let files: Vec<String> = tree
            .iter()
            .filter(|(_, n)| matches!(n, Node::File(_)))
            .map(|(p, _)| p.clone())
            .collect();
        let dirs: Vec<String> = std::iter::once(String::new())
            .chain(
                tree.iter()
                    .filter(|(_, n)| matches!(n, Node::Dir))
                    .map(|(p, _)| p.clone()),
            )
            .collect();
        let dir = dirs[rng.below(dirs.len() as u64) as usize].clone();
        serial += 1;
        let new_name = format!("{dir}/n{serial}");
        let choice = if files.is_empty() { 0 } else { rng.below(100) };
        let dsync = rng.below(3) == 0;
        let mut mid = None;
        let begin = rec.mark(&format!("begin {k}")).unwrap();
        let (name, durable) = match choice {
            0..=14 => {
                fs.create(new_name.as_bytes(), &Attrs::new()).unwrap();
                tree.insert(new_name.clone(), Node::File(Vec::new()));
                (format!("create {new_name}"), true)
            }
            15..=59 => {
                let p = &files[rng.below(files.len() as u64) as usize];
                let Node::File(old) = tree[p].clone() else {
                    unreachable!()
                };
                let len = match rng.below(3) {
                    0 => 1 + rng.below(300),
                    1 => 4096 * (1 + rng.below(4)),
                    _ => 1 + rng.below(40_000),
                } as usize;
                let off = match rng.below(3) {
                    0 => old.len() as u64,
                    1 => rng.below(old.len() as u64 + 1),
                    _ => old.len() as u64 + rng.below(30_000),
                } as usize;
                let inode = fs.lookup(p.as_bytes(), false).unwrap();
                let w = fs.writer(&inode).unwrap();
                assert_eq!(w.write_at(off as u64, &vec![byte; len]).unwrap(), len);
                if dsync {
                    w.sync().unwrap();
                }
                drop(w);
                let mut new = old;
                if new.len() < off + len {
                    new.resize(off + len, 0);
                }
                new[off..off + len].fill(byte);
                tree.insert(p.clone(), Node::File(new));
                (format!("write {p} {off}+{len} dsync={dsync}"), dsync)
            }
            60..=69 => {
                let p = &files[rng.below(files.len() as u64) as usize];
                let Node::File(mut data) = tree[p].clone() else {
                    unreachable!()
                };
                let size = rng.below(data.len() as u64 * 3 / 2 + 2) as usize;
                let inode = fs.lookup(p.as_bytes(), false).unwrap();
                let w = fs.writer(&inode).unwrap();
                w.set_len(size as u64).unwrap();
                if dsync {
                    w.sync().unwrap();
                }
                drop(w);
                if size < data.len() {
                    let mut zeroed = data.clone();
                    zeroed[size..].fill(0);
                    let mut t = tree.clone();
                    t.insert(p.clone(), Node::File(zeroed));
                    mid = Some(t);
                }
                data.resize(size, 0);
                tree.insert(p.clone(), Node::File(data));
                (format!("truncate {p} {size} dsync={dsync}"), dsync)
            }
            70..=77 => {
                fs.mkdir(new_name.as_bytes(), &Attrs::new()).unwrap();
                tree.insert(new_name.clone(), Node::Dir);
                (format!("mkdir {new_name}"), true)
            }
            78..=89 => {
                let p = files[rng.below(files.len() as u64) as usize].clone();
                fs.remove(p.as_bytes(), false).unwrap();
                tree.remove(&p);
                (format!("rm {p}"), true)
            }
            90..=94 => {
                // rmdir an empty directory if there is one, else unlink a link or file.
                let empty = dirs
                    .iter()
                    .skip(1)
                    .find(|d| !tree.keys().any(|k| k.starts_with(&format!("{d}/"))));
                match empty {
                    Some(d) => {
                        let d = d.clone();
                        fs.remove(d.as_bytes(), true).unwrap();
                        tree.remove(&d);
                        (format!("rmdir {d}"), true)
                    }
                    None => {
                        let p = files[0].clone();
                        fs.remove(p.as_bytes(), false).unwrap();
                        tree.remove(&p);
                        (format!("rm {p}"), true)
                    }
                }
            }
            _ => {
                let target: Vec<u8> = if rng.below(2) == 0 {
                    format!("t{serial}").into_bytes()
                } else {
                    vec![b'a' + (serial % 26) as u8; 60 + rng.below(300) as usize]
                };
                fs.symlink(&target, new_name.as_bytes(), &Attrs::new())
                    .unwrap();
                tree.insert(new_name.clone(), Node::Link(target));
                (format!("symlink {new_name}"), true)
            }
        };
        let end = rec.mark(&format!("end {k}")).unwrap();
        h.ops.push((begin, end, durable));
        h.names.push(name);
        h.mids.push(mid);
        h.trees.push(tree.clone());
    }
    h
}

struct Outcome {
    sum: Summary,
    e2fsck_ran: u64,
    ops: usize,
}

impl Outcome {
    /// Enough states replayed, a sample through e2fsck, none failed.
    fn assert_consistent(&self) {
        assert!(
            self.ops > 0 && self.sum.states >= 1000,
            "{} states",
            self.sum.states
        );
        assert!(self.e2fsck_ran >= 10);
        assert_eq!(self.sum.failed, 0, "{:#?}", self.sum.failures);
    }
}

/// Record a workload on a fresh image (blocks of `block` bytes) and replay it.
fn record_and_replay(
    name: &str,
    fs: &str,
    block: &str,
    extra: &[&str],
    seed: u64,
    mutate: bool,
) -> Option<Outcome> {
    if !need(&["mke2fs", "e2fsck"]) {
        return None;
    }
    let long = common::long();
    let dir = common::scratch(name);
    let img = dir.join("disk.img");
    // A fresh image of 16 MiB.
    mke2fs(&img, &[&["-t", fs, "-b", block], extra].concat(), 16);
    let base = dir.join("base.img");
    std::fs::copy(&img, &base).unwrap();
    let log_path = dir.join("log");
    let (rec, size) = common::record(&img, &log_path);
    let rec = Arc::new(rec);
    let ops = if long { 400 } else { 160 };
    let history = {
        let fs = Ext::open_writable(rec.clone() as Arc<dyn Device>, size).unwrap();
        assert!(fs.is_journaled());
        fs.mutation_commit_before_data(mutate);
        let h = workload(&rec, &fs, seed, ops);
        drop(fs);
        h
    };
    // The image as dio left it passes e2fsck.
    assert_fsck_clean(&img);
    drop(rec);
    let history = Arc::new(history);
    let opts = ReplayOptions {
        max_per_window: if long { 32 } else { 8 },
        max_states: Some(if long { 40_000 } else { 2_000 }),
        seed,
        torn: true,
        atomic_unit: 4096,
    };
    let model = ModelFs {
        history: Arc::clone(&history),
        checked: AtomicU64::new(0),
    };
    let e2fsck = Sampled {
        inner: E2fsckChecker,
        every: if long { 25 } else { 60 },
        seen: AtomicU64::new(0),
        ran: AtomicU64::new(0),
    };
    let sum = common::replay(
        name,
        &log_path,
        &base,
        &[&model, &e2fsck],
        &opts,
        &dir.join("states"),
    );
    eprintln!(
        "{name}: {ops} ops, {} states through e2fsck",
        e2fsck.ran.load(Ordering::Relaxed)
    );
    let e2fsck_ran = e2fsck.ran.load(Ordering::Relaxed);
    if sum.failed == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Some(Outcome {
        sum,
        e2fsck_ran,
        ops,
    })
}

#[test]
fn ext4_random_allocating_workload_every_crash_state_is_consistent() {
    let Some(o) = record_and_replay("ext4-workload", "ext4", "4096", &[], 41, false) else {
        return;
    };
    o.assert_consistent();
}

#[test]
fn ext3_random_allocating_workload_every_crash_state_is_consistent() {
    let Some(o) = record_and_replay("ext3-workload", "ext3", "4096", &[], 43, false) else {
        return;
    };
    o.assert_consistent();
}

/// 1 KiB blocks: an indirect table maps 256 KiB, so writes and holes cross from
/// one table to the next and into the double indirect tree, and one write's
/// blocks are allocated over several tables in one operation.
#[test]
fn ext3_1k_random_allocating_workload_every_crash_state_is_consistent() {
    let Some(o) = record_and_replay("ext3-1k-workload", "ext3", "1024", &[], 47, false) else {
        return;
    };
    o.assert_consistent();
}

/// MUTATION: ordered mode broken on purpose (commit blocks not ordered after the
/// data their transactions point at). The model must find states where a
/// committed size covers bytes that never landed.
#[test]
fn mutation_commit_before_data_is_caught() {
    let Some(o) = record_and_replay("ext4-mutation", "ext4", "4096", &[], 41, true) else {
        return;
    };
    assert!(
        o.sum.failed > 0,
        "committing before the data went unnoticed"
    );
    assert!(
        o.sum
            .failures
            .iter()
            .any(|f| f.checker == "model-fs" && f.message.contains("stale bytes")),
        "{:#?}",
        o.sum.failures
    );
}
