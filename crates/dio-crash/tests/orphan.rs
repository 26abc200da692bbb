//! Orphan processing under the crash recorder: an image left with an orphan
//! list (made with debugfs as a crash mid-truncate and mid-unlink leaves it:
//! /t's size cut below its blocks, /u unlinked with its inode kept) is opened
//! writable by dio, which truncates /t and frees /u through the journal. Every
//! crash state of that passes `e2fsck -fn` after journal replay (which
//! finishes what the list still holds), and reads through dio's reader show
//! /t's first 5000 bytes and no /u.

mod common;

use std::process::Command;
use std::sync::Arc;

use dio::{Device, SyncConfig, SyncDevice};
use dio_crash::{
    run, Base, E2fsckChecker, ExpectedFile, FilesChecker, Log, Recorder, ReplayOptions,
};

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ino_of(img: &std::path::Path, path: &str) -> u32 {
    let text = sh(Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(img));
    text.split("Inode: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("stat {path}: {text}"))
}

#[test]
fn orphan_processing_is_crash_safe() {
    for t in ["mkfs.ext4", "debugfs", "e2fsck"] {
        if !dio_testkit::have(t) {
            dio_testkit::skip(format!("{t} is not installed"));
            return;
        }
    }
    let dir = common::scratch("orphan");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let t: Vec<u8> = (0..200_000u32).map(|k| (k % 251) as u8 + 1).collect();
    std::fs::write(tree.join("t"), &t).unwrap();
    std::fs::write(tree.join("u"), vec![9u8; 300_000]).unwrap();
    std::fs::write(tree.join("keep"), b"keep\n").unwrap();
    let img = dir.join("disk.img");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("16M"));
    let (ti, ui) = (ino_of(&img, "/t"), ino_of(&img, "/u"));
    let script = dir.join("script");
    std::fs::write(
        &script,
        format!(
            "sif /t size 5000\nsif /u dtime {ti}\nunlink /u\nsif <{ui}> links_count 0\nssv last_orphan {ui}\n"
        ),
    )
    .unwrap();
    sh(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(&img));
    let base = dir.join("base.img");
    std::fs::copy(&img, &base).unwrap();

    let (f, geo) = dio::probe::open_probed(&img, true).unwrap();
    let dev = SyncDevice::new(f, geo, &SyncConfig::default()).unwrap();
    let log_path = dir.join("log");
    let rec = Arc::new(Recorder::create(dev, &log_path).unwrap());
    {
        let fs = dio::ext::Ext::open_writable(rec.clone() as Arc<dyn Device>, geo.size).unwrap();
        fs.checkpoint().unwrap();
    }
    drop(rec);
    let sb = std::fs::read(&img).unwrap();
    let last_orphan = u32::from_le_bytes(sb[1024 + 0xE8..1024 + 0xEC].try_into().unwrap());
    assert_eq!(last_orphan, 0, "the list is empty after the open");
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let log = Arc::new(Log::open(&log_path).unwrap());
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
    let sum = run(
        &log,
        Base::File(base),
        &[&files, &E2fsckChecker],
        &opts,
        &dir.join("states"),
    )
    .unwrap();
    eprintln!(
        "orphan processing: {} records, {} states, {} failed, {:.1} states/s",
        sum.records,
        sum.states,
        sum.failed,
        sum.rate()
    );
    assert!(sum.states >= 20, "{} states", sum.states);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
    let _ = std::fs::remove_dir_all(&dir);
}
