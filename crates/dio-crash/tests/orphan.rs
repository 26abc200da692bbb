//! Orphan processing under the crash recorder: an image left with an orphan
//! list (made with debugfs as a crash mid-truncate and mid-unlink leaves it:
//! /t's size cut below its blocks, /u unlinked with its inode kept) is opened
//! writable by dio, which truncates /t and frees /u through the journal. Every
//! crash state of that passes `e2fsck -fn` after journal replay (which
//! finishes what the list still holds), and reads through dio's reader show
//! /t's first 5000 bytes and no /u.

mod common;

use std::sync::Arc;

use dio::Device;
use dio_crash::{E2fsckChecker, ExpectedFile, FilesChecker, ReplayOptions};
use dio_testkit::{assert_fsck_clean, make_orphans, mke2fs, need};

#[test]
fn orphan_processing_is_crash_safe() {
    if !need(&["mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = common::scratch("orphan");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let t: Vec<u8> = (0..200_000u32).map(|k| (k % 251) as u8 + 1).collect();
    std::fs::write(tree.join("t"), &t).unwrap();
    std::fs::write(tree.join("u"), vec![9u8; 300_000]).unwrap();
    std::fs::write(tree.join("keep"), b"keep\n").unwrap();
    let img = dir.join("disk.img");
    mke2fs(
        &img,
        &["-t", "ext4", "-b", "4096", "-d", tree.to_str().unwrap()],
        16,
    );
    make_orphans(&img, 5000);
    let base = dir.join("base.img");
    std::fs::copy(&img, &base).unwrap();

    let log_path = dir.join("log");
    let (rec, size) = common::record(&img, &log_path);
    let rec = Arc::new(rec);
    {
        let fs = dio::ext::Ext::open_writable(rec.clone() as Arc<dyn Device>, size).unwrap();
        fs.checkpoint().unwrap();
    }
    drop(rec);
    let sb = std::fs::read(&img).unwrap();
    let last_orphan = u32::from_le_bytes(sb[1024 + 0xE8..1024 + 0xEC].try_into().unwrap());
    assert_eq!(last_orphan, 0, "the list is empty after the open");
    assert_fsck_clean(&img);

    let files = FilesChecker {
        files: vec![
            ExpectedFile::exactly("/t", t[..5000].to_vec()),
            ExpectedFile {
                path: "/u".into(),
                versions: vec![None],
            },
            ExpectedFile::exactly("/keep", b"keep\n".to_vec()),
        ],
    };
    let opts = ReplayOptions {
        max_per_window: if common::long() { 32 } else { 6 },
        max_states: Some(if common::long() { 2000 } else { 150 }),
        seed: 5,
        torn: true,
        atomic_unit: 4096,
    };
    let sum = common::replay(
        "orphan processing",
        &log_path,
        &base,
        &[&files, &E2fsckChecker],
        &opts,
        &dir.join("states"),
    );
    assert!(sum.states >= 20, "{} states", sum.states);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
    let _ = std::fs::remove_dir_all(&dir);
}
