//! `dio cat`, `cp`, `ls`, `stat` and `write` on `IMAGE:/PATH` locations and byte
//! ranges, against the fixture images of the dio crate, debugfs, `filefrag -v` on a
//! kernel mount (as root) and `e2fsck -fn` after every write.

use dio_testkit::{
    assert_fsck_clean, copy_at_rest, have, is_root, mke2fs, output_with_stdin, superblock_field,
    Mount,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dio(args: &[&str]) -> Output {
    dio_stdin(args, None)
}

fn dio_stdin(args: &[&str], input: Option<&[u8]>) -> Output {
    output_with_stdin(Command::new(env!("CARGO_BIN_EXE_dio")).args(args), input)
}

fn ok(o: &Output, what: &str) -> Vec<u8> {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout.clone()
}

fn err(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-cli");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn unpack(name: &str, tag: &str) -> String {
    let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dio/tests/fixtures/ext")
        .join(format!("{name}.img.gz"));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let p = scratch().join(format!("{name}-{tag}.img"));
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

/// Mount `img` read-only through a loop device at `IMG.mnt` (root only); the
/// journal is not replayed, so the image stays as it is. Unmounted on drop.
fn mount_ro(img: &str) -> Result<Mount, String> {
    Mount::new(Path::new(img), "ro,noload")
}

fn debugfs_cat(img: &str, path: &str) -> Vec<u8> {
    Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), img])
        .output()
        .unwrap()
        .stdout
}

fn fsck_clean(img: &str) {
    assert_fsck_clean(Path::new(img));
}

#[test]
fn cat_reads_image_files_and_follows_symlinks() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    for name in ["ext4-4k", "ext2-1k"] {
        let img = unpack(name, "cat");
        for p in ["/data/random", "/data/pattern", "/data/sparse", "/frag"] {
            let out = ok(&dio(&["cat", &format!("{img}:{p}")]), p);
            assert!(out == debugfs_cat(&img, p), "{name}:{p}");
        }
        // (debugfs pads inline files to their 60-byte area: compare with the tree.)
        let out = ok(
            &dio(&[
                "cat",
                &format!("{img}:/many/f0007-xxxxxxx-\u{e9}\u{e8}\u{ff}"),
            ]),
            "utf-8 name",
        );
        assert_eq!(out, b"7\n");
        let out = ok(&dio(&["cat", &format!("{img}:/links/slow")]), "slow link");
        assert_eq!(out, b"deep inside\n");
        let out = ok(
            &dio(&["cat", &format!("{img}:/links/todir/sub/deep.txt")]),
            "dir link",
        );
        assert_eq!(out, b"deep inside\n");
        let e = err(&dio(&["cat", &format!("{img}:/missing")]));
        assert_eq!(
            e,
            format!("dio: {img}:/missing: No such file or directory\n")
        );
        let e = err(&dio(&["cat", &format!("{img}:/dir")]));
        assert!(e.contains("is a directory"), "{e}");
    }
}

#[test]
fn cat_offset_and_length_are_byte_granular() {
    let img = unpack("ext4-1k", "range");
    let whole = ok(&dio(&["cat", &format!("{img}:/data/pattern")]), "whole");
    for (off, len) in [
        (0usize, 1usize),
        (1023, 2),
        (1000, 70_000),
        (whole.len() - 3, 100),
        (5, 0),
    ] {
        let out = ok(
            &dio(&[
                "cat",
                &format!("{img}:/data/pattern"),
                "--offset",
                &off.to_string(),
                "--length",
                &len.to_string(),
                "--bs",
                "4k",
            ]),
            "range",
        );
        let end = (off + len).min(whole.len());
        assert!(out == whole[off..end], "image range {off}+{len}");
    }
    // A host file too.
    let host = scratch().join("range.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&host, &data).unwrap();
    let h = host.to_str().unwrap();
    let out = ok(
        &dio(&["cat", h, "--offset", "777", "--length", "50000"]),
        "host range",
    );
    assert!(out == data[777..50_777]);
    let out = ok(&dio(&["cat", h, "--offset", "99999"]), "host tail");
    assert_eq!(out, &data[99_999..]);
}

#[test]
fn cp_out_of_and_into_images() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    let img = unpack("ext4-4k", "cp");
    let out = scratch().join("sparse-copy");
    ok(
        &dio(&["cp", &format!("{img}:/data/sparse"), out.to_str().unwrap()]),
        "cp out",
    );
    assert!(std::fs::read(&out).unwrap() == debugfs_cat(&img, "/data/sparse"));
    // Into a directory: the image file's name.
    let dir = scratch().join("cpdir");
    std::fs::create_dir_all(&dir).unwrap();
    ok(
        &dio(&["cp", &format!("{img}:/data/random"), dir.to_str().unwrap()]),
        "cp into dir",
    );
    assert!(std::fs::read(dir.join("random")).unwrap() == debugfs_cat(&img, "/data/random"));
    // Into the image (it has a journal): same size, shorter, longer; each
    // replaces the file, through the journal.
    let len = debugfs_cat(&img, "/data/random").len();
    let new: Vec<u8> = (0..len).map(|i| (i * 13 % 256) as u8).collect();
    let src = scratch().join("new-random");
    std::fs::write(&src, &new).unwrap();
    ok(
        &dio(&["cp", src.to_str().unwrap(), &format!("{img}:/data/random")]),
        "cp in",
    );
    assert!(debugfs_cat(&img, "/data/random") == new);
    fsck_clean(&img);
    std::fs::write(&src, b"short").unwrap();
    let o = dio(&["cp", src.to_str().unwrap(), &format!("{img}:/data/random")]);
    ok(&o, "cp shorter");
    assert_eq!(debugfs_cat(&img, "/data/random"), b"short");
    let big = scratch().join("bigger");
    let bigger: Vec<u8> = (0..3 * len + 7).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&big, &bigger).unwrap();
    ok(
        &dio(&["cp", big.to_str().unwrap(), &format!("{img}:/data/random")]),
        "cp longer",
    );
    assert!(debugfs_cat(&img, "/data/random") == bigger);
    fsck_clean(&img);
    // The command leaves the journal checkpointed: nothing needs recovery (debugfs,
    // which reads without replaying, sees the new bytes above).
    let sb = dio_testkit::sh(std::process::Command::new("dumpe2fs").args(["-h", &img]));
    let features = sb
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default();
    assert!(features.contains("has_journal"), "{features}");
    assert!(!features.contains("needs_recovery"), "{features}");
    // bigalloc images allocate in clusters: cp grows the file there too.
    let ba = unpack("ext4-bigalloc", "cp");
    let hello = debugfs_cat(&ba, "/hello.txt");
    std::fs::write(&big, vec![7u8; hello.len() + 5000]).unwrap();
    ok(
        &dio(&["cp", big.to_str().unwrap(), &format!("{ba}:/hello.txt")]),
        "cp growing a file on bigalloc",
    );
    assert!(debugfs_cat(&ba, "/hello.txt") == vec![7u8; hello.len() + 5000]);
    fsck_clean(&ba);
}

#[test]
fn ls_lists_names_and_long_details() {
    let img = unpack("ext3-2k", "ls");
    let out = String::from_utf8(ok(&dio(&["ls", &format!("{img}:/")]), "ls /")).unwrap();
    assert_eq!(
        out,
        "data\ndir\nempty\nemptydir\nfrag\nhello.txt\ninline_big\ninline_small\nlinks\nlost+found\nmany\nsparse3m\n"
    );
    let many = ok(&dio(&["ls", &format!("{img}:/many")]), "ls many");
    assert_eq!(
        many.split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        400
    );
    let long =
        String::from_utf8(ok(&dio(&["ls", "-l", &format!("{img}:/links")]), "ls -l")).unwrap();
    let fast = long
        .lines()
        .find(|l| l.ends_with("fast -> ../hello.txt"))
        .unwrap();
    assert!(fast.starts_with("lrwxrwxrwx"), "{fast}");
    let long = String::from_utf8(ok(
        &dio(&["ls", "-l", &format!("{img}:/hello.txt")]),
        "ls -l file",
    ))
    .unwrap();
    let f: Vec<&str> = long.split_whitespace().collect();
    assert_eq!(
        (f[0], f[1], f[4], f[7]),
        ("-rw-r--r--", "1", "11", "hello.txt"),
        "{long}"
    );
    let e = err(&dio(&["ls", &img]));
    assert!(e.contains("IMAGE:/DIR"), "{e}");
}

/// `dio stat --json`'s extent map is what `filefrag -v` reports through the kernel.
#[test]
fn stat_extents_match_filefrag_on_a_kernel_mount() {
    let img = unpack("ext4-1k", "stat");
    let json: serde_json::Value = serde_json::from_slice(&ok(
        &dio(&["stat", "--json", &format!("{img}:/data/sparse")]),
        "stat",
    ))
    .unwrap();
    assert_eq!(json["size"], 614400);
    assert_eq!(json["type"], "regular");
    assert_eq!(json["mode"], "0644");
    assert_eq!(json["links"], 1);
    let text =
        String::from_utf8(ok(&dio(&["stat", &format!("{img}:/frag")]), "stat text")).unwrap();
    assert!(text.contains(" ext:     logical_offset:"), "{text}");
    if !is_root() || !have("filefrag") {
        eprintln!("skipping filefrag comparison: needs root (mount -o loop) and filefrag");
        return;
    }
    let mnt = match mount_ro(&img) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipping filefrag comparison: {e}");
            return;
        }
    };
    let mut checks = Vec::new();
    for p in ["/data/sparse", "/frag", "/data/pattern", "/data/random"] {
        let ff = Command::new("filefrag")
            .arg("-v")
            .arg(mnt.path().join(&p[1..]))
            .output()
            .unwrap();
        let theirs: Vec<(u64, u64, u64, bool)> = String::from_utf8_lossy(&ff.stdout)
            .lines()
            .filter(|l| {
                l.trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
                    && l.contains("..")
            })
            .map(|l| {
                let f: Vec<&str> = l.split(':').map(str::trim).collect();
                let logical: u64 = f[1].split("..").next().unwrap().trim().parse().unwrap();
                let physical: u64 = f[2].split("..").next().unwrap().trim().parse().unwrap();
                let len: u64 = f[3].parse().unwrap();
                (logical, physical, len, l.contains("unwritten"))
            })
            .collect();
        let json: serde_json::Value = serde_json::from_slice(&ok(
            &dio(&["stat", "--json", &format!("{img}:{p}")]),
            "stat",
        ))
        .unwrap();
        let ours: Vec<(u64, u64, u64, bool)> = json["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["logical"].as_u64().unwrap(),
                    e["physical"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["unwritten"].as_bool().unwrap(),
                )
            })
            .collect();
        checks.push((p, ours == theirs, ours.len(), theirs.len()));
    }
    drop(mnt);
    for (p, same, a, b) in checks {
        assert!(same, "{p}: dio lists {a} extents, filefrag {b}");
    }
}

#[test]
fn write_overwrites_grows_and_fills_holes() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    let img = unpack("ext4-2k", "write");
    let before = debugfs_cat(&img, "/data/pattern");
    ok(
        &dio_stdin(
            &["write", &format!("{img}:/data/pattern"), "--offset", "2040"],
            Some(b"0123456789abcdef"),
        ),
        "write",
    );
    let mut expect = before.clone();
    expect[2040..2056].copy_from_slice(b"0123456789abcdef");
    assert!(debugfs_cat(&img, "/data/pattern") == expect);
    fsck_clean(&img);
    // From a file, through a symlink.
    let input = scratch().join("write-input");
    std::fs::write(&input, b"via link").unwrap();
    ok(
        &dio(&[
            "write",
            &format!("{img}:/links/abs"),
            "--offset",
            "1",
            "--input",
            input.to_str().unwrap(),
        ]),
        "write via link",
    );
    expect[1..9].copy_from_slice(b"via link");
    assert!(debugfs_cat(&img, "/data/pattern") == expect);
    // Into a hole, and past the end: blocks are allocated (through the
    // journal: the image has one).
    let mut sparse = debugfs_cat(&img, "/data/sparse");
    ok(
        &dio_stdin(
            &["write", &format!("{img}:/data/sparse"), "--offset", "16000"],
            Some(&[9u8; 600]),
        ),
        "write into a hole",
    );
    sparse[16000..16600].fill(9);
    assert!(debugfs_cat(&img, "/data/sparse") == sparse);
    ok(
        &dio_stdin(
            &[
                "write",
                &format!("{img}:/data/pattern"),
                "--offset",
                &(expect.len() - 1).to_string(),
            ],
            Some(b"xy"),
        ),
        "write growing",
    );
    let n = expect.len();
    expect[n - 1] = b'x';
    expect.push(b'y');
    assert!(debugfs_cat(&img, "/data/pattern") == expect);
    fsck_clean(&img);
    // bigalloc: a write past the end allocates in the file's cluster.
    let ba = unpack("ext4-bigalloc-1k", "write");
    let mut hello = debugfs_cat(&ba, "/hello.txt");
    ok(
        &dio_stdin(
            &["write", &format!("{ba}:/hello.txt"), "--offset", "10"],
            Some(b"xy"),
        ),
        "write growing on bigalloc",
    );
    hello.truncate(10);
    hello.extend_from_slice(b"xy");
    assert!(debugfs_cat(&ba, "/hello.txt") == hello);
    fsck_clean(&ba);
    // A journal that needs recovery is recovered first (here: nothing to
    // replay), then the write goes through it.
    let j = unpack("ext3-2k", "recovery");
    Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery", &j])
        .output()
        .unwrap();
    let before = debugfs_cat(&j, "/data/pattern");
    ok(
        &dio_stdin(
            &["write", &format!("{j}:/data/pattern"), "--offset", "0"],
            Some(b"x"),
        ),
        "write after recovery",
    );
    let mut expect = before;
    expect[0] = b'x';
    assert!(debugfs_cat(&j, "/data/pattern") == expect);
    fsck_clean(&j);
}

#[test]
fn write_to_host_files_is_byte_granular() {
    let host = scratch().join("write-host.bin");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&host, &data).unwrap();
    let h = host.to_str().unwrap();
    ok(
        &dio_stdin(&["write", h, "--offset", "4095"], Some(b"ABC")),
        "write mid",
    );
    let mut expect = data.clone();
    expect[4095..4098].copy_from_slice(b"ABC");
    assert!(std::fs::read(&host).unwrap() == expect, "host bytes");
    // Past the end: the file grows to exactly the last byte written.
    ok(
        &dio_stdin(&["write", h, "--offset", "12001"], Some(b"tail")),
        "write past end",
    );
    expect.resize(12001, 0);
    expect.extend_from_slice(b"tail");
    assert!(std::fs::read(&host).unwrap() == expect, "host bytes");
    // A new file.
    let fresh = scratch().join("write-new.bin");
    let _ = std::fs::remove_file(&fresh);
    ok(
        &dio_stdin(
            &["write", fresh.to_str().unwrap(), "--offset", "3"],
            Some(b"xyz"),
        ),
        "write new",
    );
    assert_eq!(std::fs::read(&fresh).unwrap(), b"\0\0\0xyz");
}

/// Writing an image (or its loop device) while the kernel has it mounted is refused
/// with exit 1 and nothing written; after umount the same write goes through.
#[test]
fn writes_to_a_mounted_image_are_refused() {
    if !is_root() {
        eprintln!("skipping: mounting an image needs root");
        return;
    }
    let img = unpack("ext4-1k", "mounted");
    let before = ok(&dio(&["cat", &format!("{img}:/hello.txt")]), "cat");
    let mnt = match mount_ro(&img) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let loopdev = String::from_utf8(
        Command::new("losetup")
            .args(["-j", &img])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let loopdev = loopdev.split(':').next().unwrap().trim().to_string();
    let target = format!("{img}:/hello.txt");
    let refused = dio_stdin(&["write", "--offset", "0", &target], Some(b"XY"));
    let cp_src = scratch().join("mounted-src");
    std::fs::write(&cp_src, b"XY").unwrap();
    let refused_cp = dio(&["cp", cp_src.to_str().unwrap(), &target]);
    let refused_dev = (!loopdev.is_empty())
        .then(|| dio_stdin(&["write", "--offset", "0", &loopdev], Some(b"XY")));
    drop(mnt);
    let e = err(&refused);
    assert!(e.contains("mounted") && e.contains("unmount"), "{e}");
    let e = err(&refused_cp);
    assert!(e.contains("mounted"), "{e}");
    if let Some(o) = refused_dev {
        let e = err(&o);
        assert!(e.contains("mounted"), "{e}");
    }
    assert_eq!(
        ok(&dio(&["cat", &target]), "cat after refusal"),
        before,
        "a refused write changed the file"
    );
    ok(
        &dio_stdin(&["write", "--offset", "0", &target], Some(b"XY")),
        "write after umount",
    );
    let after = ok(&dio(&["cat", &target]), "cat after write");
    assert_eq!(&after[..2], b"XY");
    assert_eq!(&after[2..], &before[2..]);
}

// ---- issue 15: ls, stat, locations, usage ----

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ls_takes_ls_flags_and_several_operands() {
    let img = unpack("ext4-4k", "lsflags");
    let root = format!("{img}:/");
    // -lh lists (it printed help before).
    let o = dio(&["ls", "-lh", &root]);
    let out = String::from_utf8(ok(&o, "ls -lh")).unwrap();
    let frag = out.lines().find(|l| l.ends_with(" frag")).expect(&out);
    assert_eq!(frag.split_whitespace().nth(4), Some("800K"), "{out}");
    assert!(out.starts_with("total "), "{out}");
    // -a shows dot entries, . and .. first.
    let all = String::from_utf8(ok(&dio(&["ls", "-a", &root]), "ls -a")).unwrap();
    assert!(all.starts_with(".\n..\n"), "{all}");
    let plain = String::from_utf8(ok(&dio(&["ls", "-1", &root]), "ls -1")).unwrap();
    assert!(
        !plain.contains(".\n") && plain.contains("hello.txt\n"),
        "{plain}"
    );
    // Several operands: files first, then each directory under a header.
    let o = dio(&[
        "ls",
        &format!("{img}:/dir"),
        &format!("{img}:/hello.txt"),
        &root,
    ]);
    let out = String::from_utf8(ok(&o, "ls several")).unwrap();
    assert!(
        out.starts_with(&format!("{img}:/hello.txt\n\n{img}:/dir:\n")),
        "{out}"
    );
    assert!(out.contains(&format!("\n\n{img}:/:\n")), "{out}");
    // -i: the inode number first, as stat has it.
    let o = dio(&["ls", "-i", &format!("{img}:/hello.txt")]);
    let line = String::from_utf8(ok(&o, "ls -i")).unwrap();
    let st = json_of(&dio(&["stat", "--json", &format!("{img}:/hello.txt")]));
    assert_eq!(
        line.split_whitespace().next().unwrap(),
        st["inode"].to_string()
    );
    // --help still works.
    assert_eq!(code(&dio(&["ls", "--help"])), Some(0));
}

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&ok(o, "json")).unwrap()
}

#[test]
fn ls_reports_an_unreadable_entry_and_lists_the_rest() {
    if !have("debugfs") {
        eprintln!("skipped: no debugfs");
        return;
    }
    let img = unpack("ext4-4k", "lsbad");
    // Break hello.txt's inode checksum (metadata_csum): that entry cannot be read.
    let d = Command::new("debugfs")
        .args([
            "-w",
            "-R",
            "set_inode_field /hello.txt checksum 0x1234",
            &img,
        ])
        .output()
        .unwrap();
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let o = dio(&["ls", "-l", &format!("{img}:/")]);
    assert_eq!(code(&o), Some(1), "{}", err(&o));
    assert!(err(&o).contains("hello.txt"), "{}", err(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(" frag\n") && out.contains(" many\n"), "{out}");
    assert!(!out.contains("hello.txt"), "{out}");
}

#[test]
fn stat_shows_inline_data_and_device_numbers() {
    let img = unpack("ext4-4k", "statdev");
    let o = dio(&["stat", &format!("{img}:/inline_small")]);
    let out = String::from_utf8(ok(&o, "stat inline")).unwrap();
    assert!(out.contains("Blocks: 1 "), "{out}");
    assert!(out.contains("inline"), "{out}");
    assert!(
        out.contains("Modify: 20") && out.contains(" +0000"),
        "{out}"
    );
    if !is_root() {
        eprintln!("skipped the device part: not root (mknod through a loop mount)");
        return;
    }
    let mounted = match Mount::new(Path::new(&img), "rw") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped the device part: {e}");
            return;
        }
    };
    let mk = Command::new("mknod")
        .arg(mounted.path().join("tty"))
        .args(["c", "4", "65"])
        .status();
    drop(mounted);
    assert!(mk.unwrap().success());
    let o = dio(&["stat", &format!("{img}:/tty")]);
    let out = String::from_utf8(ok(&o, "stat dev")).unwrap();
    assert!(out.contains("Device type: 4,65"), "{out}");
    let j = json_of(&dio(&["stat", "--json", &format!("{img}:/tty")]));
    assert_eq!(
        (j["device"]["major"].as_u64(), j["device"]["minor"].as_u64()),
        (Some(4), Some(65))
    );
    let l = String::from_utf8(ok(&dio(&["ls", "-l", &format!("{img}:/tty")]), "ls dev")).unwrap();
    assert!(l.starts_with("crw") && l.contains(" 4, 65 "), "{l}");
}

/// `ls -l` and `stat` against the kernel's view of the same image: `ls -ln
/// --time-style=long-iso` and `stat` in UTC.
#[test]
fn ls_long_and_stat_agree_with_the_kernel() {
    if !is_root() {
        eprintln!("skipped: not root (no loop mount)");
        return;
    }
    let img = unpack("ext4-4k", "kernel-ls");
    let mnt = match mount_ro(&img) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let k = Command::new("ls")
        .env("TZ", "UTC")
        .args(["-ln", "--time-style=long-iso"])
        .arg(mnt.path().join(""))
        .output()
        .unwrap();
    let kernel = String::from_utf8(k.stdout).unwrap();
    let ours = String::from_utf8(ok(&dio(&["ls", "-l", &format!("{img}:/")]), "ls -l")).unwrap();
    let fields = |s: &str| -> Vec<Vec<String>> {
        s.lines()
            .map(|l| {
                l.split_whitespace()
                    .enumerate()
                    .map(|(i, w)| {
                        // ls marks ACLs or security contexts after the mode.
                        if i == 0 {
                            w.trim_end_matches(['.', '+']).to_string()
                        } else {
                            w.to_string()
                        }
                    })
                    .collect()
            })
            .collect()
    };
    assert_eq!(
        fields(&ours),
        fields(&kernel),
        "ours:\n{ours}\nkernel:\n{kernel}"
    );
    for f in ["inline_small", "hello.txt", "frag"] {
        let k = Command::new("stat")
            .env("TZ", "UTC")
            .args(["-c", "%b|%y"])
            .arg(mnt.path().join(f))
            .output()
            .unwrap();
        let k = String::from_utf8(k.stdout).unwrap();
        let (blocks, mtime) = k.trim().split_once('|').unwrap();
        let ours = String::from_utf8(ok(&dio(&["stat", &format!("{img}:/{f}")]), "stat")).unwrap();
        assert!(
            ours.contains(&format!("Blocks: {blocks} ")),
            "{f}: kernel {blocks}\n{ours}"
        );
        assert!(
            ours.contains(&format!("Modify: {mtime}\n")),
            "{f}: kernel {mtime}\n{ours}"
        );
    }
}

#[test]
fn locations_name_what_is_wrong() {
    let dir = scratch();
    for (arg, says) in [
        ("nbds://h/x?tls-verify-peer=maybe", "tls-verify-peer"),
        ("nbd:/h/x", "malformed NBD URI"),
        ("nbd://", "missing host"),
        ("http://h/x", "does not speak http://"),
    ] {
        let o = dio(&["cat", arg]);
        let e = text(&o.stderr);
        assert_eq!(code(&o), Some(2), "{arg}: {e}");
        assert!(e.contains(says), "{arg}: {e}");
    }
    let small = dir.join("small-not-image");
    std::fs::write(&small, vec![7u8; 1000]).unwrap();
    let o = dio(&["ls", &format!("{}:/", small.display())]);
    assert_eq!(code(&o), Some(1));
    assert!(err(&o).contains("not an ext2/3/4 image"), "{}", err(&o));
    let img = unpack("ext4-1k", "rel");
    let o = dio(&["cat", &format!("{img}:hello.txt")]);
    assert_eq!(code(&o), Some(1));
    assert!(
        err(&o).contains(&format!("did you mean {img}:/hello.txt")),
        "{}",
        err(&o)
    );
}

#[test]
fn usage_mistakes_exit_2_with_plain_messages() {
    let img = unpack("ext4-1k", "usage");
    let hello = format!("{img}:/hello.txt");
    for args in [
        vec!["cat", "--bs", "1", hello.as_str()],
        vec!["cat", "--bs", "64M", hello.as_str()],
        vec!["cat", "--bs", "16M", "--qd", "16", hello.as_str()],
        vec!["bench", "x", "--runtime", "0"],
        vec!["cat", "--offset", "-5", hello.as_str()],
        vec!["write", hello.as_str(), "--offset", "-1"],
    ] {
        let o = dio(&args);
        assert_eq!(code(&o), Some(2), "{args:?}: {}", text(&o.stderr));
    }
    let o = dio(&["cat", "--offset", "-5", &hello]);
    assert!(
        text(&o.stderr).contains("is negative"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn write_errors_name_the_offset_given() {
    // Past the largest offset the format maps: refused before anything moves,
    // naming the offset the user gave.
    let img = unpack("ext4-1k", "writeerr");
    let before = std::fs::read(&img).unwrap();
    let o = dio_stdin(
        &[
            "write",
            &format!("{img}:/hello.txt"),
            "--offset",
            "18446744073709551000",
        ],
        Some(b"x"),
    );
    assert_eq!(code(&o), Some(1));
    let e = err(&o);
    assert!(e.contains("offset 18446744073709551000"), "{e}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused write changed the image"
    );
}

/// Issue 15, item 5: an image whose journal needs recovery is read through the
/// journal (replayed in memory, as the kernel would), with a note, and left as it is.
#[test]
fn an_image_needing_recovery_is_read_through_its_journal_with_a_note() {
    if !is_root() || !have("mke2fs") || !have("dumpe2fs") {
        eprintln!("skipping: needs root and e2fsprogs to make an image with a live journal");
        return;
    }
    let dir = scratch().join("recovery");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("live.img");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    mke2fs(&img, &["-t", "ext4"], 32);
    // Changes committed to the journal but not yet written in place: copy the image
    // while it is still mounted, a second after the commit (at rest: one moment's
    // state, not blocks from before and after a checkpoint).
    let copy = dir.join("needs-recovery.img");
    let mut made = false;
    for _ in 0..4 {
        let m = Mount::new(&img, "rw,commit=1").unwrap_or_else(|e| panic!("mount: {e}"));
        std::fs::create_dir_all(m.path().join("d")).unwrap();
        std::fs::write(m.path().join("d/new.txt"), b"journaled\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2500));
        copy_at_rest(&img, &copy);
        drop(m);
        if superblock_field(&copy, "Filesystem features").contains("needs_recovery") {
            made = true;
            break;
        }
    }
    if !made {
        eprintln!("skipping: could not catch the journal before its checkpoint");
        return;
    }
    let before = std::fs::read(&copy).unwrap();
    let o = dio(&["ls", &format!("{}:/d", s(&copy))]);
    let listing = ok(&o, "ls");
    let note = String::from_utf8_lossy(&o.stderr);
    assert!(note.contains("journal needs recovery"), "{note}");
    // The kernel's view after its own replay (of another copy).
    let replayed = dir.join("replayed.img");
    std::fs::copy(&copy, &replayed).unwrap();
    let m = Mount::new(&replayed, "rw").unwrap_or_else(|e| panic!("mount: {e}"));
    let mut names: Vec<String> = std::fs::read_dir(m.path().join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let kernel_file = std::fs::read(m.path().join("d/new.txt")).ok();
    drop(m);
    assert_eq!(text(&listing).lines().collect::<Vec<_>>(), names);
    if let Some(k) = kernel_file {
        let o = dio(&["cat", &format!("{}:/d/new.txt", s(&copy))]);
        assert_eq!(ok(&o, "cat"), k);
    }
    assert!(
        std::fs::read(&copy).unwrap() == before,
        "dio changed the image"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
