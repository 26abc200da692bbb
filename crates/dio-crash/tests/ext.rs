//! Crash states of an ext4 image: metadata written before the data it points at
//! must be caught (stale bytes in the file); the right order, and dio's own
//! in-place overwrite, pass e2fsck, the kernel's mount and dio's ext reader in
//! every state.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::scratch;
use dio::{AlignedBuf, Device, SyncDevice};
use dio_crash::{
    Base, Checker, E2fsckChecker, ExpectedFile, FilesChecker, Log, ModelChecker, MountChecker,
    Recorder, ReplayOptions, Summary,
};
use dio_testkit::{assert_fsck_clean, debugfs, debugfs_w, inode_location, mke2fs, need};

const BS: u64 = 4096;

/// An 8 MiB ext4 image (no metadata checksums: the test edits an inode by hand)
/// holding /f: one block of 'A' inside i_size (4096), and a second block of the
/// extent, past i_size, holding 'X' (bytes the file must never show).
/// Returns (image, inode's device byte offset, device byte offset of block 1).
fn make_image(dir: &Path) -> (PathBuf, u64, u64) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut f = vec![b'A'; BS as usize];
    f.extend(vec![b'X'; BS as usize]);
    std::fs::write(src.join("f"), &f).unwrap();
    let img = dir.join("disk.img");
    let src = src.to_str().unwrap();
    mke2fs(
        &img,
        &[
            "-t",
            "ext4",
            "-b",
            "4096",
            "-O",
            "^metadata_csum",
            "-d",
            src,
        ],
        8,
    );
    debugfs_w(&img, "sif /f size 4096");
    let (block, offset) = inode_location(&img, "/f");
    let data_block: u64 = debugfs(&img, "bmap /f 1").trim().parse().unwrap();
    assert_fsck_clean(&img);
    (img, block * BS + offset, data_block * BS)
}

struct Rig {
    dir: PathBuf,
    base: PathBuf,
    log: PathBuf,
    rec: Recorder<SyncDevice>,
}

fn rig(name: &str) -> Option<(Rig, u64, u64)> {
    if !need(&["mke2fs", "debugfs", "e2fsck"]) {
        return None;
    }
    let dir = scratch(name);
    let (img, inode_at, block1_at) = make_image(&dir);
    let base = dir.join("base.img");
    std::fs::copy(&img, &base).unwrap();
    let log = dir.join("log");
    let (rec, _) = common::record(&img, &log);
    Some((
        Rig {
            dir,
            base,
            log,
            rec,
        },
        inode_at,
        block1_at,
    ))
}

fn write(dev: &dyn Device, at: u64, data: &[u8]) {
    let mut b = AlignedBuf::new(data.len(), 4096);
    b.copy_from_slice(data);
    dio::write_device(dev, at, &mut b, false).unwrap();
}

/// Rewrite the inode-table block holding /f's inode with i_size = 8192.
fn grow_inode(dev: &dyn Device, inode_at: u64) {
    let block = inode_at / BS * BS;
    let mut b = AlignedBuf::new(BS as usize, 4096);
    dio::read_device(dev, block, &mut b).unwrap();
    let i = (inode_at - block) as usize;
    b[i + 4..i + 8].copy_from_slice(&8192u32.to_le_bytes());
    let data = b.to_vec();
    write(dev, block, &data);
}

fn versions() -> Vec<ExpectedFile> {
    let old = vec![b'A'; BS as usize];
    let mut new = old.clone();
    new.extend(vec![b'B'; BS as usize]);
    vec![ExpectedFile {
        path: "/f".into(),
        versions: vec![Some(old), Some(new)],
    }]
}

fn replay(r: &Rig, checkers: &[&dyn Checker]) -> Summary {
    let opts = ReplayOptions {
        max_per_window: if common::long() { 64 } else { 8 },
        seed: 7,
        ..ReplayOptions::default()
    };
    common::replay(
        "ext",
        &r.log,
        &r.base,
        checkers,
        &opts,
        &r.dir.join("states"),
    )
}

fn mount_checker(dir: &Path) -> MountChecker {
    MountChecker {
        files: versions(),
        scratch: dir.to_path_buf(),
    }
}

#[test]
fn mutation_inode_pointing_at_data_not_yet_written_is_caught() {
    let Some((r, inode_at, block1_at)) = rig("ext-mutation") else {
        return;
    };
    // The bug: the size goes out (and is flushed) before the data it exposes.
    r.rec.mark("grow inode").unwrap();
    grow_inode(&r.rec, inode_at);
    r.rec.flush().unwrap();
    r.rec.mark("write data").unwrap();
    write(&r.rec, block1_at, &vec![b'B'; BS as usize]);
    r.rec.flush().unwrap();
    let files = FilesChecker { files: versions() };
    let sum = replay(&r, &[&files]);
    assert!(sum.failed > 0, "stale bytes went unnoticed");
    assert!(sum.failures[0].message.contains("/f"));
    // The kernel's view agrees: the first failing state, mounted, shows them too.
    if !dio_testkit::is_root() {
        dio_testkit::skip("the loop-mount half needs root");
        return;
    }
    let first = sum.failures[0].spec.clone();
    let log = Arc::new(Log::open(&r.log).unwrap());
    let mount = mount_checker(&r.dir);
    let e2fsck = E2fsckChecker;
    let again = dio_crash::run_specs(
        &log,
        Base::File(r.base.clone()),
        &[&mount, &e2fsck],
        &[first],
        &r.dir.join("states"),
    )
    .unwrap();
    assert_eq!(again.failed, 1, "{again:?}");
    assert_eq!(again.failures[0].checker, "mount");
}

#[test]
fn data_before_metadata_passes_every_state() {
    let Some((r, inode_at, block1_at)) = rig("ext-ordered") else {
        return;
    };
    r.rec.mark("write data").unwrap();
    write(&r.rec, block1_at, &vec![b'B'; BS as usize]);
    r.rec.flush().unwrap();
    r.rec.mark("grow inode").unwrap();
    grow_inode(&r.rec, inode_at);
    r.rec.flush().unwrap();
    let files = FilesChecker { files: versions() };
    let mount = mount_checker(&r.dir);
    let e2fsck = E2fsckChecker;
    let sum = replay(&r, &[&files, &e2fsck, &mount]);
    assert!(sum.states >= 5);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}

#[test]
fn dio_in_place_overwrite_then_flush_passes_e2fsck_and_the_model() {
    let Some((r, _, _)) = rig("ext-dio-write") else {
        return;
    };
    let size = r.rec.geometry().size;
    let rec = Arc::new(r.rec);
    let fs = dio::ext::Ext::open_writable(rec.clone(), size).unwrap();
    let file = fs.open_file(&fs.lookup(b"/f", true).unwrap()).unwrap();
    // Where block 0 of /f lives, for the claim.
    let block0 = { debugfs(&r.base, "bmap /f 0").trim().parse::<u64>().unwrap() * BS };
    let mut model = vec![b'A'; BS as usize];
    for (k, (off, len)) in [(100u64, 3000usize), (0, 4096), (4000, 96), (17, 1)]
        .into_iter()
        .enumerate()
    {
        rec.mark(&format!("overwrite {k}")).unwrap();
        let data = vec![b'a' + k as u8; len];
        assert_eq!(file.overwrite(off, &data).unwrap(), len);
        model[off as usize..off as usize + len].copy_from_slice(&data);
        rec.flush().unwrap();
        rec.claim(block0, &model).unwrap();
    }
    drop(file);
    drop(fs);
    let r = Rig {
        dir: r.dir,
        base: r.base,
        log: r.log,
        rec: Arc::try_unwrap(rec).unwrap(),
    };
    let e2fsck = E2fsckChecker;
    let sum = replay(&r, &[&ModelChecker::new(), &e2fsck]);
    assert!(sum.states >= 8);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
}
