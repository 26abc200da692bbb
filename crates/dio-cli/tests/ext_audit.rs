//! Defects an audit of the image-writing commands found with real tools, one test
//! each, judged by `e2fsck -fn`, debugfs and (as root) the kernel:
//! - images with quota files take no allocating write (the usage they record
//!   would go stale) and stay byte-identical; in-place overwrites still work;
//! - `cp` into an image keeps the source's holes;
//! - a block or inode bitmap that cannot be right (checksum, metadata shown
//!   free, a live inode shown free) is refused before anything is allocated
//!   from it, leaving the image as it was;
//! - ENOSPC part-way through a file mapped by indirect blocks (ext2/ext3)
//!   leaks no block.

use dio_testkit::{debugfs, e2fsck, kernel_mount, mke2fs, need, output_with_stdin, skip};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dio(args: &[&std::ffi::OsStr]) -> Output {
    output_with_stdin(Command::new(env!("CARGO_BIN_EXE_dio")).args(args), None)
}

fn dio_s(args: &[&str]) -> Output {
    let a: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    dio(&a)
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Exit 1 with a `dio: ` message, never a panic.
fn refused(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.starts_with("dio: "), "{what}: {err}");
    err
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-audit");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn at(img: &Path, path: &str) -> String {
    format!("{}:{path}", img.display())
}

fn fsck(img: &Path) -> (i32, String) {
    e2fsck(img, &["-fn"])
}

fn assert_clean(img: &Path, after: &str) {
    let (code, out) = fsck(img);
    assert_eq!(code, 0, "e2fsck -fn after {after}:\n{out}");
}

/// A populated image made by `mke2fs -d` (so its quota files, where it has
/// them, are right): /keep (20,000 bytes of `seed`), /dir/a, /dir/b.
fn populated(name: &str, args: &[&str], seed: u8) -> (PathBuf, Vec<u8>) {
    let tree = scratch(&format!("{name}.tree"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("dir")).unwrap();
    let keep: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
        .collect();
    std::fs::write(tree.join("keep"), &keep).unwrap();
    std::fs::write(tree.join("dir/a"), b"a").unwrap();
    std::fs::write(tree.join("dir/b"), b"b").unwrap();
    let img = scratch(&format!("{name}.img"));
    let mut a = args.to_vec();
    let t = tree.to_str().unwrap().to_string();
    a.extend(["-d", &t]);
    mke2fs(&img, &a, 16);
    std::fs::remove_dir_all(&tree).unwrap();
    // mke2fs 1.47's -d leaves the quota usage short; e2fsck sets it right.
    if args.iter().any(|a| a.contains("quota")) {
        let (code, out) = e2fsck(&img, &["-fy"]);
        assert!(code <= 1, "e2fsck -fy after mke2fs -d:\n{out}");
    }
    (img, keep)
}

#[test]
fn quota_image_refuses_allocating_writes_byte_identical() {
    if !need(&["mke2fs", "e2fsck", "debugfs"]) {
        return;
    }
    let (img, keep) = populated("quota", &["-t", "ext4", "-O", "quota,project"], 1);
    assert_clean(&img, "mke2fs -d");
    let before = std::fs::read(&img).unwrap();
    let src = scratch("quota.src");
    std::fs::write(&src, vec![7u8; 10_000]).unwrap();
    let host_dir = scratch("quota.hostdir");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("f"), b"x").unwrap();
    let s = src.to_str().unwrap();
    for (what, args) in [
        ("cp new", vec!["cp", s, &at(&img, "/new")]),
        ("cp into dir", vec!["cp", s, &at(&img, "/dir/")]),
        ("mkdir", vec!["mkdir", &at(&img, "/d")]),
        ("truncate new", vec!["truncate", "-s", "5", &at(&img, "/t")]),
        (
            "truncate down",
            vec!["truncate", "-s", "5", &at(&img, "/keep")],
        ),
        ("ln -s", vec!["ln", "-s", "target", &at(&img, "/l")]),
        ("rm", vec!["rm", &at(&img, "/dir/a")]),
        ("rm -r", vec!["rm", "-r", &at(&img, "/dir")]),
        (
            "cp -r",
            vec!["cp", "-r", host_dir.to_str().unwrap(), &at(&img, "/tree")],
        ),
        (
            "write past the end",
            vec![
                "write",
                &at(&img, "/keep"),
                "--offset",
                "19000",
                "--input",
                s,
            ],
        ),
    ]
    .map(|(w, a)| (w, a.into_iter().map(String::from).collect::<Vec<_>>()))
    {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = refused(&dio_s(&a), what);
        assert!(
            err.contains("quota"),
            "{what}: the refusal names the feature: {err}"
        );
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{what}: a refused write changed the image"
        );
    }
    assert_clean(&img, "the refused writes");
    // In place, inside the file: no block changes hands, so it works.
    ok(
        &dio_s(&["write", &at(&img, "/keep"), "--offset", "100", "--input", s]),
        "write in place",
    );
    assert_clean(&img, "an in-place write");
    let mut want = keep.clone();
    want[100..10_100].fill(7);
    let got = Command::new("debugfs")
        .args(["-R", "cat /keep"])
        .arg(&img)
        .output()
        .unwrap()
        .stdout;
    assert!(got == want, "debugfs cat /keep after the in-place write");
    let _ = std::fs::remove_dir_all(&host_dir);
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&img);
}

/// Allocated 512-byte sectors of `path` in `img`, as the kernel counts them
/// (debugfs' Blockcount).
fn blockcount(img: &Path, path: &str) -> u64 {
    let text = debugfs(img, &format!("stat {path}"));
    text.split("Blockcount: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("debugfs stat {path}: {text}"))
}

#[test]
fn cp_into_an_image_keeps_the_source_holes() {
    if !need(&["mke2fs", "e2fsck", "debugfs"]) {
        return;
    }
    // 4 KiB of data, a 1 MiB hole, 8 KiB of data, a hole to 3 MiB; cp -r takes
    // a file this size one at a time (not in a group of small files).
    let src_dir = scratch("holes.src");
    let _ = std::fs::remove_dir_all(&src_dir);
    std::fs::create_dir_all(&src_dir).unwrap();
    let sparse = src_dir.join("sparse");
    let mut want = vec![0u8; 3 << 20];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(3 << 20).unwrap();
        for (off, len, byte) in [(0usize, 4096usize, 0x11u8), ((1 << 20) + 4096, 8192, 0x22)] {
            want[off..off + len].fill(byte);
            f.write_all_at(&want[off..off + len], off as u64).unwrap();
        }
        f.sync_all().unwrap();
    }
    {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(&sparse).unwrap().blocks() > 64 {
            skip("the target directory's file system keeps no holes");
            return;
        }
    }
    for (name, args) in [
        ("holes-ext4", &["-t", "ext4"][..]),
        ("holes-ext2", &["-t", "ext2", "-b", "1024"][..]),
    ] {
        let img = scratch(&format!("{name}.img"));
        mke2fs(&img, args, 32);
        ok(
            &dio_s(&["cp", sparse.to_str().unwrap(), &at(&img, "/sparse")]),
            "cp",
        );
        ok(
            &dio_s(&["cp", "-r", src_dir.to_str().unwrap(), &at(&img, "/tree")]),
            "cp -r",
        );
        // And from a file of the image itself.
        ok(
            &dio_s(&["cp", &at(&img, "/sparse"), &at(&img, "/again")]),
            "cp image to image",
        );
        assert_clean(&img, "the copies");
        for p in ["/sparse", "/tree/sparse", "/again"] {
            let got = Command::new("debugfs")
                .args(["-R", &format!("cat {p}")])
                .arg(&img)
                .output()
                .unwrap()
                .stdout;
            assert!(got == want, "{name}: debugfs cat {p}");
            // 12 KiB of data (and an indirect block or two on ext2), not 3 MiB.
            let sectors = blockcount(&img, p);
            assert!(
                sectors <= 40,
                "{name}: {p} holds {sectors} sectors: its holes were filled"
            );
        }
        if let Some(m) = kernel_mount(&img, "ro") {
            let got = std::fs::read(m.path().join("sparse")).unwrap();
            assert!(got == want, "{name}: the kernel reads /sparse differently");
        }
        let _ = std::fs::remove_file(&img);
    }
    let _ = std::fs::remove_dir_all(&src_dir);
}

/// Overwrite `len` bytes at `off` of `img` with `byte`.
fn stomp(img: &Path, off: u64, len: usize, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&vec![byte; len], off).unwrap();
}

/// `Block bitmap at N` / `Inode bitmap at N` of group 0, from dumpe2fs.
fn bitmap_block(img: &Path, which: &str) -> u64 {
    let out = Command::new("dumpe2fs").arg(img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = format!("{which} bitmap at ");
    text.split(key.as_str())
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("dumpe2fs: no {key}"))
}

/// Commands that allocate in group 0 (`blocks`: blocks, else inodes; a new
/// directory may go to another group) are refused on `img` (exit 1), and `e2fsck -fn` finds
/// exactly what it found before: nothing was made worse. (`cp` may take and
/// give back an inode before its first block is refused.)
fn writes_refused(img: &Path, what: &str, blocks: bool) {
    let before = fsck(img);
    let src = scratch(&format!("{what}.src"));
    std::fs::write(&src, vec![5u8; 50_000]).unwrap();
    let s = src.to_str().unwrap();
    let (new, keep, l) = (at(img, "/new"), at(img, "/keep"), at(img, "/l"));
    let cmds: Vec<Vec<&str>> = if blocks {
        vec![
            vec!["cp", s, &new],
            vec!["write", &keep, "--offset", "20000", "--input", s],
        ]
    } else {
        vec![vec!["cp", s, &new], vec!["ln", "-s", "t", &l]]
    };
    for a in cmds {
        refused(&dio_s(&a), &format!("{what}: {}", a[0]));
        assert_eq!(fsck(img), before, "{what}: {} made the image worse", a[0]);
    }
    let _ = std::fs::remove_file(&src);
}

#[test]
fn a_bitmap_that_cannot_be_right_is_refused_before_allocating() {
    if !need(&["mke2fs", "e2fsck", "debugfs", "dumpe2fs"]) {
        return;
    }
    for (name, args) in [
        ("bm-csum", &["-t", "ext4", "-b", "4096"][..]),
        (
            "bm-nocsum",
            &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"][..],
        ),
        ("bm-ext2", &["-t", "ext2", "-b", "1024"][..]),
    ] {
        let bs: u64 = if args.contains(&"4096") { 4096 } else { 1024 };
        // A zeroed block bitmap: every block shows free, the group's own
        // metadata and every file's data included.
        let (img, _) = populated(name, args, 2);
        let bb = bitmap_block(&img, "Block");
        stomp(&img, bb * bs, bs as usize, 0);
        assert_ne!(fsck(&img).0, 0, "{name}: the stomp must show");
        writes_refused(&img, &format!("{name} zeroed block bitmap"), true);
        // A zeroed inode bitmap: the root's and the files' inodes show free.
        let (img, _) = populated(name, args, 3);
        let ib = bitmap_block(&img, "Inode");
        stomp(&img, ib * bs, bs as usize, 0);
        assert_ne!(fsck(&img).0, 0, "{name}: the stomp must show");
        writes_refused(&img, &format!("{name} zeroed inode bitmap"), false);
        // Reads still work.
        ok(&dio_s(&["cat", &at(&img, "/dir/a")]), "cat");
        let _ = std::fs::remove_file(&img);
    }
    // One checksum bit wrong is enough with metadata_csum: a bitmap that shows
    // one in-use data block free (the kernel refuses such a group too).
    let (img, _) = populated("bm-bit", &["-t", "ext4", "-b", "4096"], 4);
    let bb = bitmap_block(&img, "Block");
    let blocks = debugfs(&img, "bmap /keep 0");
    let b: u64 = blocks.trim().parse().unwrap();
    let byte_at = bb * 4096 + b / 8;
    let mut byte = [0u8];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&img).unwrap();
        f.read_exact_at(&mut byte, byte_at).unwrap();
    }
    stomp(&img, byte_at, 1, byte[0] & !(1 << (b % 8)));
    writes_refused(&img, "bm-bit one data block shown free", true);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn enospc_on_indirect_files_leaks_no_block() {
    if !need(&["mke2fs", "e2fsck", "debugfs"]) {
        return;
    }
    let big = scratch("enospc.src");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let b = big.to_str().unwrap();
    for (name, args) in [
        ("enospc-ext2", &["-t", "ext2"][..]),
        ("enospc-ext3", &["-t", "ext3"][..]),
        ("enospc-ext4", &["-t", "ext4"][..]),
    ] {
        let (img, keep) = populated(name, args, 5);
        let mut stopped = None;
        for i in 0..10 {
            let o = dio_s(&["cp", b, &at(&img, &format!("/f{i}"))]);
            if !o.status.success() {
                let err = refused(&o, "cp into a full image");
                assert!(
                    err.contains("No space") || err.contains("no space"),
                    "{err}"
                );
                stopped = Some(i);
                break;
            }
        }
        let i = stopped.unwrap_or_else(|| panic!("{name}: 30 MB fit in 16 MiB"));
        assert_clean(&img, &format!("{name}: cp failing with ENOSPC"));
        let st = Command::new("debugfs")
            .args(["-R", &format!("stat /f{i}")])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&st.stderr).contains("not found"),
            "{name}: the failed cp left /f{i}"
        );
        // A sparse source whose first data run fits and whose second does not:
        // the first run's blocks are given back with the inode.
        let sparse = scratch(&format!("{name}.sparse"));
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&sparse).unwrap();
            f.write_all_at(&data[..200_000], 0).unwrap();
            f.write_all_at(&data, 4 << 20).unwrap();
        }
        let o = dio_s(&["cp", sparse.to_str().unwrap(), &at(&img, "/sparse")]);
        refused(&o, "a sparse cp into a full image");
        assert_clean(&img, &format!("{name}: a sparse cp failing with ENOSPC"));
        let _ = std::fs::remove_file(&sparse);
        // Growing a file into the full image: what fits is kept (or nothing),
        // never a size over bytes that were not written.
        let o = dio_s(&[
            "write",
            &at(&img, "/keep"),
            "--offset",
            "20000",
            "--input",
            b,
        ]);
        refused(&o, "write growing into a full image");
        assert_clean(&img, &format!("{name}: write failing with ENOSPC"));
        let got = Command::new("debugfs")
            .args(["-R", "cat /keep"])
            .arg(&img)
            .output()
            .unwrap()
            .stdout;
        assert!(
            got.len() >= 20_000 && got[..20_000] == keep[..],
            "{name}: /keep's old bytes"
        );
        assert!(
            got[20_000..] == data[..got.len() - 20_000],
            "{name}: /keep claims bytes not written"
        );
        let _ = std::fs::remove_file(&img);
    }
    let _ = std::fs::remove_file(&big);
}

#[test]
fn sigint_during_cp_into_a_journaled_image_leaves_nothing_behind() {
    use std::io::Write;
    if !need(&["mke2fs", "e2fsck", "debugfs", "kill"]) {
        return;
    }
    let img = scratch("sigint.img");
    mke2fs(&img, &["-t", "ext4"], 64);
    let chunk = vec![0x5Au8; 9 << 20];
    // Once dio has taken this in (the pipe holds 64 KiB), it is copying, with
    // its handlers in place.
    let (child, mut stdin) =
        dio_testkit::cp_from_open_pipe(env!("CARGO_BIN_EXE_dio"), at(&img, "/f"), &chunk);
    let pid = child.id().to_string();
    let o = Command::new("kill").args(["-INT", &pid]).output().unwrap();
    assert!(o.status.success(), "kill -INT {pid}");
    // More data after the signal: the copy sees it at its next chunk. dio may
    // stop reading (a broken pipe).
    let _ = stdin.write_all(&chunk);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "dio cp stopped by SIGINT: {err}"
    );
    // Nothing named, nothing left for a journal replay or e2fsck to find: the
    // inode that took the bytes was given back (e2fsck -fy replays the journal
    // and has nothing to fix).
    let st = Command::new("debugfs")
        .args(["-R", "stat /f"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&st.stderr).contains("not found"),
        "/f exists"
    );
    let (code, text) = e2fsck(&img, &["-fy"]);
    assert_eq!(code, 0, "e2fsck -fy after the interrupted cp:\n{text}");
    let _ = std::fs::remove_file(&img);
}

#[test]
fn sigkill_during_cp_into_a_journaled_image_leaves_an_orphan_not_a_leak() {
    if !need(&["mke2fs", "e2fsck", "debugfs"]) {
        return;
    }
    let img = scratch("sigkill.img");
    mke2fs(&img, &["-t", "ext4"], 64);
    // Once dio has taken this in, its new inode is on the image (made before
    // the first byte is read) and a chunk is being written into it.
    let (mut child, stdin) = dio_testkit::cp_from_open_pipe(
        env!("CARGO_BIN_EXE_dio"),
        at(&img, "/f"),
        &vec![0x6Bu8; 9 << 20],
    );
    child.kill().unwrap();
    let _ = child.wait();
    drop(stdin);
    // Whoever replays the journal next frees the unnamed inode and its
    // blocks: the kernel's mount (orphan cleanup), dio's next writable open,
    // e2fsck. Before, each left an unattached inode and its blocks.
    let copy = scratch("sigkill-kernel.img");
    std::fs::copy(&img, &copy).unwrap();
    if let Some(m) = kernel_mount(&copy, "rw") {
        assert!(!m.path().join("f").exists(), "the kernel shows /f");
        drop(m);
        assert_clean(&copy, "the kernel's mount of the killed cp's image");
    }
    let _ = std::fs::remove_file(&copy);
    ok(
        &dio_s(&["mkdir", &at(&img, "/d")]),
        "mkdir after the killed cp",
    );
    assert_clean(&img, "dio's writable open of the killed cp's image");
    let st = Command::new("debugfs")
        .args(["-R", "stat /f"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&st.stderr).contains("not found"),
        "/f exists"
    );
    let _ = std::fs::remove_file(&img);
}
