//! `dio crash record / replay / state / log` end to end.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dio(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("crash-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn record_a_host_file_replay_it_and_rebuild_a_failing_state() {
    let d = scratch("host");
    let base: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("disk.img"), &base).unwrap();
    std::fs::write(d.join("new.bin"), vec![0x5a; 10_000]).unwrap();
    let o = dio(
        &[
            "crash",
            "record",
            "run.log",
            "disk.img",
            "--save-base",
            "base.img",
            "write:4096:new.bin",
            "mark:half",
            "fill:100k:9000:0xab",
            "flush",
            "dfill:8k:512:7",
            "fill:512k:64k:3",
        ],
        &d,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(d.join("base.img")).unwrap(), base);
    // The target holds the result.
    let img = std::fs::read(d.join("disk.img")).unwrap();
    assert!(img[4096..8192].iter().all(|&b| b == 0x5a));
    assert!(img[8192..8704].iter().all(|&b| b == 7));
    assert!(img[8704..14096].iter().all(|&b| b == 0x5a));
    assert!(img[524288..589824].iter().all(|&b| b == 3));
    let o = dio(&["crash", "log", "run.log"], &d);
    assert!(o.status.success());
    assert!(text(&o).contains("mark \"half\""), "{}", text(&o));

    let o = dio(
        &[
            "crash", "replay", "run.log", "--base", "base.img", "--check", "model",
        ],
        &d,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("failed: 0"), "{}", text(&o));

    // A check that fails where the last fill has not landed: exit 1, and the
    // printed command rebuilds that very state.
    let probe = "test \"$(od -An -tx1 -j 524288 -N1 \"$1\" | tr -d ' ')\" = 03";
    let o = dio(
        &[
            "crash", "replay", "run.log", "--base", "base.img", "--check", probe,
        ],
        &d,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("rebuild it: "))
        .expect(&out);
    let cmd: Vec<&str> = line["rebuild it: dio ".len()..]
        .split_whitespace()
        .collect();
    let o = dio(&cmd, &d);
    assert!(o.status.success(), "{}", text(&o));
    let state = std::fs::read(d.join("state.img")).unwrap();
    assert_eq!(state.len(), base.len());
    assert_ne!(state[524288], 3, "the rebuilt state is the failing one");

    // Bad input: a clear message, exit 1 or 2.
    let o = dio(&["crash", "record", "x.log", "disk.img", "fill:1M:1:0"], &d);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = dio(&["crash", "record", "x.log", "disk.img", "frob"], &d);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = dio(
        &["crash", "state", "run.log", "--at", "1:x", "--out", "s.img"],
        &d,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    std::fs::write(
        d.join("junk.log"),
        b"not a log at all, not at all, not at all, not at all, no",
    )
    .unwrap();
    let o = dio(&["crash", "replay", "junk.log", "--check", "model"], &d);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn record_in_place_writes_inside_an_ext4_image_and_replay_with_e2fsck() {
    if Command::new("mkfs.ext4").arg("-V").output().is_err()
        || Command::new("e2fsck").arg("-V").output().is_err()
    {
        eprintln!("skipped: mkfs.ext4 or e2fsck is not installed");
        return;
    }
    let d = scratch("ext");
    std::fs::create_dir_all(d.join("src")).unwrap();
    std::fs::write(d.join("src/f"), vec![1u8; 20_000]).unwrap();
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d", "src", "e.img", "8M"])
        .current_dir(&d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    std::fs::write(d.join("hw"), b"hello world").unwrap();
    let o = dio(
        &[
            "crash",
            "record",
            "e.log",
            "e.img:/f",
            "--save-base",
            "base.img",
            "write:100:hw",
            "mark:two",
            "dfill:5000:10000:0x41",
            "write:19989:hw",
        ],
        &d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = dio(
        &[
            // The journal sets and clears needs_recovery in the 1 KiB superblock,
            // which ext4 counts on being written whole (4 KiB physical sectors).
            "crash",
            "replay",
            "e.log",
            "--base",
            "base.img",
            "--check",
            "model",
            "--check",
            "e2fsck",
            "--atomic-unit",
            "4096",
        ],
        &d,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("failed: 0"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}
