//! `dio cp -r DIR IMG:/DIR` (a host tree into an existing image, batched) and
//! `dio ln IMG:/A IMG:/B` (hard links), on ext4 with and without a journal:
//! `e2fsck -fn` clean, the kernel's loop mount (as root) shows the tree, its
//! bytes, hard links as one inode, and with -p the modes, owners and times;
//! `debugfs -R logdump` reads the journal; a full image stops the copy with
//! "No space left on device", exit 1, and a clean file system.

use dio_testkit::{assert_fsck_clean, bytes, have, is_root, kernel_mount, mke2fs, skip};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ext-tree-cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkfs(dir: &Path, features: &str, mib: u64) -> String {
    let img = dir.join("img");
    mke2fs(&img, &["-t", "ext4", "-b", "4096", "-O", features], mib);
    img.to_str().unwrap().to_string()
}

fn fsck(img: &str) {
    assert_fsck_clean(Path::new(img));
}

/// Mount `img` read-only and run `f` on the mount point (skipped without root).
fn with_mount(img: &str, f: impl FnOnce(&Path)) {
    if let Some(m) = kernel_mount(Path::new(img), "ro") {
        f(m.path());
    }
}

/// A host tree: nested directories, files of many sizes (empty, sub-block,
/// several blocks), a symlink, a hard link, a fifo and (as root) a device node,
/// odd modes, an owner, and old times.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    for (i, n) in [0usize, 1, 4095, 4096, 4097, 70_000, 300_001]
        .iter()
        .enumerate()
    {
        std::fs::write(root.join(format!("a/f{i}")), bytes(*n, i as u64)).unwrap();
    }
    for i in 0..150 {
        std::fs::write(
            root.join(format!("a/b/many{i:03}")),
            bytes(i * 37, 100 + i as u64),
        )
        .unwrap();
    }
    std::fs::write(root.join("a/b/c/deep"), b"deep\n").unwrap();
    std::os::unix::fs::symlink("../a/f1", root.join("link")).unwrap();
    std::fs::hard_link(root.join("a/f5"), root.join("a/b/hard")).unwrap();
    Command::new("mkfifo")
        .arg(root.join("fifo"))
        .status()
        .unwrap();
    if is_root() {
        Command::new("mknod")
            .args([root.join("a/null").to_str().unwrap(), "c", "1", "3"])
            .status()
            .unwrap();
        std::os::unix::fs::chown(root.join("a/f2"), Some(1234), Some(4321)).unwrap();
    }
    Command::new("chmod")
        .args(["4751", root.join("a/f3").to_str().unwrap()])
        .status()
        .unwrap();
    for p in ["a/f4", "a/b/c", "a/b/c/deep", "empty"] {
        Command::new("touch")
            .args([
                "-h",
                "-d",
                "2001-02-03 04:05:06.789",
                root.join(p).to_str().unwrap(),
            ])
            .status()
            .unwrap();
    }
}

/// The tree under `mnt` equals `src`: names, types, bytes, symlink targets;
/// with `preserve`, modes, owners and mtimes too.
fn same_tree(src: &Path, mnt: &Path, preserve: bool) {
    let o = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(src)
        .arg(mnt)
        .output()
        .unwrap();
    // diff names fifos and devices it does not compare: only those lines allowed.
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        assert!(
            l.contains("is a fifo") || l.contains("character special"),
            "diff: {l}"
        );
    }
    let walk = |p: &Path, rel: &Path| {
        let (s, m) = (
            std::fs::symlink_metadata(p.join(rel)).unwrap(),
            std::fs::symlink_metadata(mnt.join(rel)).unwrap(),
        );
        assert_eq!(s.mode() & 0o170000, m.mode() & 0o170000, "{rel:?} type");
        assert_eq!(s.rdev(), m.rdev(), "{rel:?} rdev");
        if preserve {
            assert_eq!(s.mode(), m.mode(), "{rel:?} mode");
            assert_eq!((s.uid(), s.gid()), (m.uid(), m.gid()), "{rel:?} owner");
            assert_eq!(
                (s.mtime(), s.mtime_nsec()),
                (m.mtime(), m.mtime_nsec()),
                "{rel:?} mtime"
            );
        }
    };
    fn all(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            out.push(r.clone());
            if e.file_type().unwrap().is_dir() {
                all(root, &r, out);
            }
        }
    }
    let mut names = Vec::new();
    all(src, Path::new(""), &mut names);
    for r in &names {
        walk(src, r);
    }
    // Hard links stay one inode.
    let (a, b) = (
        std::fs::metadata(mnt.join("a/f5")).unwrap(),
        std::fs::metadata(mnt.join("a/b/hard")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
}

#[test]
fn cp_r_copies_a_host_tree_into_images_with_and_without_a_journal() {
    if !have("mke2fs") || !have("e2fsck") || !have("debugfs") {
        skip("needs e2fsprogs");
        return;
    }
    for (name, features) in [("nojournal", "^has_journal"), ("journal", "has_journal")] {
        let dir = scratch(name);
        let src = dir.join("src");
        make_tree(&src);
        let img = mkfs(&dir, features, 64);
        // Into an existing directory: IMG:/dst/src (GNU cp), with -p.
        ok(&dio(&["mkdir", &format!("{img}:/dst")]), "mkdir");
        let o = dio(&[
            "cp",
            "-r",
            "-p",
            src.to_str().unwrap(),
            &format!("{img}:/dst"),
        ]);
        ok(&o, "cp -r -p");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("hard links"), "summary: {err}");
        fsck(&img);
        // A second copy, to a new name, without -p; over the first: replaces.
        ok(
            &dio(&["cp", "-r", src.to_str().unwrap(), &format!("{img}:/plain")]),
            "cp -r",
        );
        ok(
            &dio(&[
                "cp",
                "-r",
                &format!("{}/.", src.display()),
                &format!("{img}:/plain"),
            ]),
            "cp -r again",
        );
        fsck(&img);
        // The journal is readable by debugfs (committed transactions or clean).
        if features == "has_journal" {
            let o = Command::new("debugfs")
                .args(["-R", "logdump", &img])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.contains("Journal starts at block"), "{out}");
        }
        with_mount(&img, |mnt| {
            same_tree(&src, &mnt.join("dst/src"), true);
            same_tree(&src, &mnt.join("plain"), false);
            // Without -p: the source's permission bits, owned by root.
            let m = std::fs::metadata(mnt.join("plain/a/f3")).unwrap();
            assert_eq!((m.mode() & 0o7777, m.uid()), (0o751, 0));
        });
    }
}

#[test]
fn cp_r_into_a_full_image_stops_with_no_space_and_stays_clean() {
    if !have("mke2fs") || !have("e2fsck") {
        skip("needs e2fsprogs");
        return;
    }
    for (name, features) in [("full-nj", "^has_journal"), ("full-j", "has_journal")] {
        let dir = scratch(name);
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..40 {
            std::fs::write(src.join(format!("f{i:02}")), bytes(1 << 20, i)).unwrap();
        }
        let img = mkfs(&dir, features, 16);
        let o = dio(&["cp", "-r", src.to_str().unwrap(), &format!("{img}:/")]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("No space left on device"), "{err}");
        fsck(&img);
        // What was copied is whole.
        let ls = dio(&["ls", &format!("{img}:/src")]);
        ok(&ls, "ls");
        let names = String::from_utf8_lossy(&ls.stdout).to_string();
        assert!(!names.trim().is_empty(), "nothing copied");
        for n in names.lines() {
            let got = dio(&["cat", &format!("{img}:/src/{n}")]);
            ok(&got, "cat");
            assert!(got.stdout == std::fs::read(src.join(n)).unwrap(), "{n}");
        }
    }
}

#[test]
fn ln_makes_hard_links_and_refuses_directories() {
    if !have("mke2fs") || !have("e2fsck") {
        skip("needs e2fsprogs");
        return;
    }
    for (name, features) in [("ln-nj", "^has_journal"), ("ln-j", "has_journal")] {
        let dir = scratch(name);
        let img = mkfs(&dir, features, 16);
        let f = dir.join("f");
        std::fs::write(&f, b"linked\n").unwrap();
        ok(
            &dio(&["cp", f.to_str().unwrap(), &format!("{img}:/f")]),
            "cp",
        );
        ok(&dio(&["mkdir", &format!("{img}:/d")]), "mkdir");
        ok(
            &dio(&["ln", &format!("{img}:/f"), &format!("{img}:/d/g")]),
            "ln",
        );
        let o = dio(&["ln", &format!("{img}:/d"), &format!("{img}:/d2")]);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("is a directory"));
        let o = dio(&["ln", &format!("{img}:/f"), &format!("{img}:/d/g")]);
        assert_eq!(o.status.code(), Some(1), "an existing name is refused");
        fsck(&img);
        let st = dio(&["stat", "--json", &format!("{img}:/d/g")]);
        ok(&st, "stat");
        let js = String::from_utf8_lossy(&st.stdout);
        assert!(
            js.contains("\"links\":2") || js.contains("\"links\": 2"),
            "{js}"
        );
        with_mount(&img, |mnt| {
            let (a, b) = (
                std::fs::metadata(mnt.join("f")).unwrap(),
                std::fs::metadata(mnt.join("d/g")).unwrap(),
            );
            assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
            assert_eq!(std::fs::read(mnt.join("d/g")).unwrap(), b"linked\n");
        });
        // Removing one name keeps the other.
        ok(&dio(&["rm", &format!("{img}:/f")]), "rm");
        fsck(&img);
        assert_eq!(dio(&["cat", &format!("{img}:/d/g")]).stdout, b"linked\n");
    }
}
