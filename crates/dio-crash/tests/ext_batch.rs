//! Crash states inside a batch of operations (`Ext::begin_batch`, what
//! `dio cp -r` uses): two directories and 20 files put with `put_file` (sizes
//! from 0 to 70,000 bytes, each byte a function of file and offset, never
//! zero), then `end_batch`, all recorded through the log-writes recorder. Every
//! crash state (durable prefixes, seeded subsets and 4 KiB tears of the
//! volatile writes) goes through `e2fsck -fy`; then `e2fsck -fn` finds nothing
//! to fix, the file that was there before the batch is whole, and:
//!
//! - with a journal (ext4): the batch is all or nothing: no name of it, or
//!   every name with all its bytes;
//! - without one (ext4 `^has_journal`, ext2): every file shown, under its name
//!   or in lost+found, holds only bytes that were written to it (a prefix of
//!   its contents, possibly empty): no size claiming bytes that never landed.
//!
//! The same for a batch that removes the tree again (what `dio rm -r` does):
//! with a journal all or nothing; without one every file still named is whole
//! and one e2fsck finds unnamed holds only its own bytes.
//!
//! Also here: an in-place inode change (`ExtFile::touch`) while a batch is
//! open joins the batch instead of being overwritten by it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use dio::ext::{Attrs, Ext, FileType, Timestamp};
use dio::{Device, SyncConfig, SyncDevice};
use dio_crash::{run, Base, Checker, Log, Recorder, ReplayOptions, StateView, Verdict};

const FILES: usize = 20;
const UUID: &str = "2f7c1d0e-5b9a-4e63-8d2f-71a4c0e9b355";

/// File `i`'s path and contents.
fn file(i: usize) -> (String, Vec<u8>) {
    let sizes = [0usize, 1, 100, 4095, 4096, 5000, 12288, 20000, 70000, 333];
    let size = sizes[i % sizes.len()] + i;
    let data = (0..size)
        .map(|o| ((i * 31 + o * 7) % 251) as u8 + 1)
        .collect();
    let dir = if i % 2 == 0 { "a" } else { "b" };
    (format!("/t/{dir}/f{i:02}"), data)
}

const KEEP: &[u8] = b"the file from before the batch\n";

/// Every regular file under `dir` (path -> bytes), through dio's reader.
fn files_under(fs: &Ext, dir: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    let inode = fs
        .lookup(if dir.is_empty() { b"/" } else { dir.as_bytes() }, false)
        .map_err(|e| format!("{dir}/: {e}"))?;
    for e in fs.read_dir(&inode).map_err(|e| format!("{dir}/: {e}"))? {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let path = format!("{dir}/{}", String::from_utf8_lossy(&e.name));
        let inode = fs.inode(e.inode).map_err(|e| format!("{path}: {e}"))?;
        match inode.file_type() {
            FileType::Directory => files_under(fs, &path, out)?,
            FileType::Regular => {
                let f = fs.open_file(&inode).map_err(|e| format!("{path}: {e}"))?;
                let mut data = vec![0u8; f.size() as usize];
                let n = f
                    .read_at(0, &mut data)
                    .map_err(|e| format!("{path}: {e}"))?;
                data.truncate(n);
                out.insert(path, data);
            }
            t => return Err(format!("{path}: unexpected type {t:?}")),
        }
    }
    Ok(())
}

/// See the module docs.
struct BatchChecker {
    journal: bool,
    /// The batch removes the files (else it makes them): a file still named
    /// must be whole.
    removing: bool,
}

impl BatchChecker {
    fn judge(&self, img: &Path) -> Result<(), String> {
        let (f, geo) = dio::probe::open_probed(img, false).map_err(|e| format!("open: {e}"))?;
        let dev = SyncDevice::new(f, geo, &SyncConfig::default()).map_err(|e| format!("{e}"))?;
        let fs =
            Ext::open(Arc::new(dev) as Arc<dyn Device>, geo.size).map_err(|e| format!("{e}"))?;
        let mut found = BTreeMap::new();
        files_under(&fs, "", &mut found)?;
        if found.get("/keep").map(Vec::as_slice) != Some(KEEP) {
            return Err("/keep is not whole".into());
        }
        let expected: BTreeMap<String, Vec<u8>> = (0..FILES).map(file).collect();
        let mut present = 0;
        for (path, data) in &found {
            if path == "/keep" {
                continue;
            }
            if let Some(lost) = path.strip_prefix("/lost+found/") {
                // A file e2fsck found unnamed: its bytes are some file's prefix.
                if self.journal {
                    return Err(format!("{path} in lost+found with a journal"));
                }
                if !expected
                    .values()
                    .any(|e| e.len() >= data.len() && e[..data.len()] == data[..])
                {
                    let same = expected
                        .iter()
                        .find(|(p, _)| p.rsplit('/').next() == lost.rsplit('/').next());
                    let at = same.map(|(_, e)| data.iter().zip(e).position(|(a, b)| a != b));
                    return Err(format!(
                        "lost+found/{lost}: {} bytes no file had (first difference with its namesake at {at:?})",
                        data.len()
                    ));
                }
                continue;
            }
            let Some(want) = expected.get(path) else {
                return Err(format!("{path}: never made"));
            };
            present += 1;
            if self.journal {
                if data != want {
                    return Err(format!(
                        "{path}: {} bytes, not its {} (the batch is not atomic)",
                        data.len(),
                        want.len()
                    ));
                }
            } else if self.removing && data != want {
                return Err(format!(
                    "{path}: {} bytes, not its {}: a removal changed a file it left",
                    data.len(),
                    want.len()
                ));
            } else if data.len() > want.len() || want[..data.len()] != data[..] {
                let at = data.iter().zip(want).position(|(a, b)| a != b);
                return Err(format!(
                    "{path}: {} bytes of its {}, differing at {at:?}: bytes never written",
                    data.len(),
                    want.len()
                ));
            }
        }
        if self.journal && present != 0 && present != FILES {
            return Err(format!(
                "{present} of the batch's {FILES} files (the batch is not atomic)"
            ));
        }
        Ok(())
    }
}

impl Checker for BatchChecker {
    fn name(&self) -> String {
        "batch".into()
    }

    fn check(&self, state: &StateView) -> dio_crash::Result<Verdict> {
        let img = state.temp_image("batch")?;
        let fix = match common::e2fsck_repair(img.path())? {
            Ok(fix) => fix,
            Err(why) => return Ok(Verdict::Fail(why)),
        };
        Ok(match self.judge(img.path()) {
            Ok(()) => Verdict::Pass,
            Err(why) if fix.code == 0 => Verdict::Fail(why),
            Err(why) => Verdict::Fail(format!("{why} (e2fsck -fy fixed:\n{})", fix.log)),
        })
    }
}

/// A fresh 16 MiB image holding /keep.
fn make_image(dir: &Path, mkfs: &str, args: &[&str]) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("keep"), KEEP).unwrap();
    let img = dir.join("disk.img");
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-b", "4096", "-U", UUID])
        .args(args)
        .arg("-d")
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{mkfs}: {out:?}");
    img
}

fn batch_crash(tag: &str, mkfs: &str, args: &[&str], journal: bool) {
    for t in [mkfs, "e2fsck"] {
        if !dio_testkit::have(t) {
            dio_testkit::skip(format!("{t} is not installed"));
            return;
        }
    }
    let dir = common::scratch(&format!("batch-{tag}"));
    let img = make_image(&dir, mkfs, args);
    let (base, log_path) = record_batch(&dir, &img, journal, make_tree);
    replay_batch(tag, &dir, &img, base, &log_path, journal, false, 11);
}

/// The directories and files of the batch (see the module docs).
fn make_tree(fs: &Ext) {
    for d in ["/t", "/t/a", "/t/b"] {
        fs.mkdir(d.as_bytes(), &Attrs::new()).unwrap();
    }
    for i in 0..FILES {
        let (path, data) = file(i);
        fs.put_file(path.as_bytes(), &Attrs::new(), |w| {
            if !data.is_empty() {
                assert_eq!(w.write_at(0, &data)?, data.len());
            }
            Ok(())
        })
        .unwrap();
    }
}

/// Keep `img` as the base, then run `batch` inside one batch on it through the
/// log-writes recorder. Returns the base and the log.
fn record_batch(
    dir: &Path,
    img: &Path,
    journal: bool,
    batch: impl FnOnce(&Ext),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.img");
    std::fs::copy(img, &base).unwrap();
    let (f, geo) = dio::probe::open_probed(img, true).unwrap();
    let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
    let log_path = dir.join("log");
    let rec = Arc::new(Recorder::create(dev, &log_path).unwrap());
    let fs = Ext::open_writable(rec.clone() as Arc<dyn Device>, geo.size).unwrap();
    assert_eq!(fs.is_journaled(), journal);
    rec.mark("begin batch").unwrap();
    fs.begin_batch().unwrap();
    batch(&fs);
    fs.end_batch().unwrap();
    fs.checkpoint().unwrap();
    rec.mark("end batch").unwrap();
    (base, log_path)
}

/// The image as dio left it passes `e2fsck -fn`; then every crash state of the
/// recorded batch (seeded) passes [`BatchChecker`]; the scratch `dir` goes.
#[allow(clippy::too_many_arguments)]
fn replay_batch(
    tag: &str,
    dir: &Path,
    img: &Path,
    base: std::path::PathBuf,
    log_path: &Path,
    journal: bool,
    removing: bool,
    seed: u64,
) {
    dio_testkit::assert_fsck_clean(img);
    let long = common::long();
    let log = Arc::new(Log::open(log_path).unwrap());
    let opts = ReplayOptions {
        max_per_window: if long { 64 } else { 12 },
        max_states: Some(if long { 4000 } else { 120 }),
        seed,
        torn: true,
        atomic_unit: 4096,
    };
    let checker = BatchChecker { journal, removing };
    let sum = run(
        &log,
        Base::File(base),
        &[&checker],
        &opts,
        &dir.join("states"),
    )
    .unwrap();
    eprintln!(
        "{tag}: {} records, {} states, {} failed, {:.1} s",
        sum.records,
        sum.states,
        sum.failed,
        sum.elapsed.as_secs_f64()
    );
    for f in sum.failures.iter().take(3) {
        eprintln!("  {} {}", f.spec, f.message);
    }
    assert!(sum.states >= 20, "{} states", sum.states);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
    let _ = std::fs::remove_dir_all(dir);
}

/// Remove `path` and everything under it, as `dio rm -r` does.
fn remove_tree(fs: &Ext, path: &str) {
    let inode = fs.lookup(path.as_bytes(), false).unwrap();
    if inode.file_type() == FileType::Directory {
        for e in fs.read_dir(&inode).unwrap() {
            if e.name != b"." && e.name != b".." {
                remove_tree(fs, &format!("{path}/{}", String::from_utf8_lossy(&e.name)));
            }
        }
    }
    fs.remove(path.as_bytes(), inode.file_type() == FileType::Directory)
        .unwrap();
}

/// The tree of [`batch_crash`] made and flushed first, then removed in one batch
/// under the recorder.
fn remove_crash(tag: &str, mkfs: &str, args: &[&str], journal: bool) {
    for t in [mkfs, "e2fsck"] {
        if !dio_testkit::have(t) {
            dio_testkit::skip(format!("{t} is not installed"));
            return;
        }
    }
    let dir = common::scratch(&format!("batch-rm-{tag}"));
    let img = make_image(&dir, mkfs, args);
    {
        let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
        let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
        let fs = Ext::open_writable(Arc::new(dev) as Arc<dyn Device>, geo.size).unwrap();
        make_tree(&fs);
        fs.checkpoint().unwrap();
    }
    let (base, log_path) = record_batch(&dir, &img, journal, |fs| remove_tree(fs, "/t"));
    replay_batch(
        &format!("rm-{tag}"),
        &dir,
        &img,
        base,
        &log_path,
        journal,
        true,
        13,
    );
}

#[test]
fn batched_removal_ext4_journal_is_all_or_nothing() {
    remove_crash("ext4-j", "mkfs.ext4", &[], true);
}

#[test]
fn batched_removal_without_journal_leaves_whole_files() {
    remove_crash("ext4-nj", "mkfs.ext4", &["-O", "^has_journal"], false);
    remove_crash("ext2", "mkfs.ext2", &[], false);
}

#[test]
fn ext4_journal_batch_is_all_or_nothing() {
    batch_crash("ext4-j", "mkfs.ext4", &[], true);
}

#[test]
fn ext4_nojournal_batch_names_only_written_bytes() {
    batch_crash("ext4-nj", "mkfs.ext4", &["-O", "^has_journal"], false);
}

#[test]
fn ext2_batch_names_only_written_bytes() {
    batch_crash("ext2", "mkfs.ext2", &[], false);
}

/// `ExtFile::touch` (an in-place inode write) on a file whose inode shares a
/// table block with a new inode of an open batch: the touch joins the batch,
/// so neither the batch's copy of the block undoes it nor does it write the
/// batch's pending inode early. With and without a journal.
#[test]
fn touch_inside_a_batch_joins_it() {
    for (mkfs, args, journal) in [
        ("mkfs.ext4", &["-O", "^has_journal"][..], false),
        ("mkfs.ext4", &[][..], true),
    ] {
        if !dio_testkit::have(mkfs) || !dio_testkit::have("e2fsck") {
            dio_testkit::skip(format!("{mkfs} or e2fsck is not installed"));
            return;
        }
        let dir = common::scratch(&format!("batch-touch-{journal}"));
        let img = make_image(&dir, mkfs, args);
        let old = Timestamp {
            secs: 1_000_000_000,
            nsecs: 0,
        };
        let keep_ino;
        let new_ino;
        {
            let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
            let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
            let fs = Ext::open_writable(Arc::new(dev) as Arc<dyn Device>, geo.size).unwrap();
            assert_eq!(fs.is_journaled(), journal);
            let keep = fs.lookup(b"/keep", false).unwrap();
            keep_ino = keep.ino;
            fs.set_attrs(keep.ino, &Attrs::new().times(old, old))
                .unwrap();
            fs.begin_batch().unwrap();
            new_ino = fs.create(b"/new", &Attrs::new()).unwrap().ino;
            let file = fs.open_file(&keep).unwrap();
            file.touch().unwrap();
            assert_ne!(file.inode().mtime, old);
            if !journal && dio_testkit::have("debugfs") {
                // Before the batch is written the image does not hold the new
                // inode: the touch did not write its table block early.
                let (block, off) =
                    dio_testkit::tools::inode_location(&img, &format!("<{new_ino}>"));
                let raw = std::fs::read(&img).unwrap();
                let at = (block * 4096 + off) as usize;
                assert_eq!(
                    &raw[at..at + 2],
                    &[0, 0],
                    "the new inode reached the disk early"
                );
            }
            fs.end_batch().unwrap();
        }
        assert_eq!(
            (keep_ino - 1) / 16,
            (new_ino - 1) / 16,
            "the test wants both inodes in one 4 KiB table block"
        );
        let (f, geo) = dio::probe::open_probed(&img, false).unwrap();
        let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
        let fs = Ext::open(Arc::new(dev) as Arc<dyn Device>, geo.size).unwrap();
        let keep = fs.lookup(b"/keep", false).unwrap();
        assert_ne!(keep.mtime, old, "journal {journal}: the touch was lost");
        assert_eq!(fs.lookup(b"/new", false).unwrap().ino, new_ino);
        drop(fs);
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "journal {journal}: {out:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
