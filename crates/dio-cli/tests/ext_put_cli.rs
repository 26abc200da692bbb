//! `dio cp/write/mkdir/rm/ln/truncate` changing the tree of ext4 images without a
//! journal, checked by `e2fsck -fn` and the kernel's loop mount (as root); ENOSPC
//! leaves nothing half-written; images with a journal refuse (or, for cp/write
//! of existing files, overwrite in place as before).

use dio_testkit::{
    assert_fsck_clean, have, kernel_mount, mke2fs_filled, output_with_stdin, superblock_field,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dio(args: &[&str], input: Option<&[u8]>) -> Output {
    output_with_stdin(Command::new(env!("CARGO_BIN_EXE_dio")).args(args), input)
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn failed(o: &Output, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-put-cli");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An image whose free space holds 0xA5 (stale bytes a file must never show).
fn mkfs(name: &str, args: &[&str], mib: u64) -> String {
    let img = scratch().join(format!("{name}.img"));
    mke2fs_filled(&img, args, mib, 0xA5);
    img.to_str().unwrap().to_string()
}

fn fsck(img: &str) {
    assert_fsck_clean(Path::new(img));
}

fn free_blocks(img: &str) -> String {
    let img = Path::new(img);
    ["Free blocks", "Free inodes"]
        .map(|k| format!("{k}: {}", superblock_field(img, k)))
        .join(",")
}

/// Mount `img` read-only and run `f` on the mount point (skipped without root).
fn with_mount(img: &str, f: impl FnOnce(&Path)) {
    if let Some(m) = kernel_mount(Path::new(img), "ro") {
        f(m.path());
    }
}

#[test]
fn cli_builds_a_tree_the_kernel_sees() {
    if !have("mke2fs") || !have("e2fsck") {
        eprintln!("skipped: needs e2fsprogs");
        return;
    }
    for (tag, fs, bs, opts) in [
        ("4k", "ext4", "4096", "^has_journal"),
        ("1k", "ext4", "1024", "^has_journal,^metadata_csum"),
        ("ext2", "ext2", "1024", "^dir_index"),
    ] {
        let img = mkfs(
            &format!("tree-{tag}"),
            &["-t", fs, "-b", bs, "-O", opts],
            32,
        );
        let at = |p: &str| format!("{img}:{p}");
        let src = scratch().join(format!("src-{tag}"));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let s = src.to_str().unwrap();
        ok(
            &dio(
                &[
                    "mkdir",
                    "-p",
                    "--mode",
                    "750",
                    "--owner",
                    "1000:100",
                    &at("/a/b/c"),
                ],
                None,
            ),
            "mkdir -p",
        );
        ok(&dio(&["mkdir", &at("/d")], None), "mkdir");
        failed(&dio(&["mkdir", &at("/d")], None), "mkdir exists");
        failed(&dio(&["mkdir", &at("/no/such")], None), "mkdir no parent");
        ok(&dio(&["cp", s, &at("/a/b/")], None), "cp into dir");
        ok(&dio(&["cp", s, &at("/a/f")], None), "cp create");
        // Replace with something shorter.
        ok(
            &dio(&["cp", "-", &at("/a/f")], Some(b"replaced")),
            "cp replace from stdin",
        );
        // write: extend past EOF (a hole between) and fill.
        ok(
            &dio(&["write", &at("/a/f"), "--offset", "100000"], Some(b"tail")),
            "write extends",
        );
        ok(
            &dio(&["write", &at("/a/f"), "--offset", "3"], Some(b"XY")),
            "write in place",
        );
        ok(
            &dio(&["truncate", "-s", "1M", &at("/sparse")], None),
            "truncate creates",
        );
        ok(
            &dio(
                &["truncate", "-s", "1000", &at(&format!("/a/b/src-{tag}"))],
                None,
            ),
            "truncate down",
        );
        ok(
            &dio(&["ln", "-s", "b/c", &at("/a/fast")], None),
            "ln -s fast",
        );
        let long = "x/".repeat(100);
        ok(
            &dio(&["ln", "-s", &long, &at("/a/slow")], None),
            "ln -s slow",
        );
        ok(&dio(&["cp", s, &at("/d/gone")], None), "cp");
        ok(&dio(&["mkdir", &at("/d/sub")], None), "mkdir");
        failed(&dio(&["rm", &at("/d")], None), "rm dir without -r");
        ok(&dio(&["rm", "-r", &at("/d")], None), "rm -r");
        ok(&dio(&["rm", &at("/a/fast")], None), "rm symlink");
        ok(
            &dio(&["ln", "-s", "b/c", &at("/a/fast")], None),
            "ln -s again",
        );
        fsck(&img);
        let mut f = b"repXYced".to_vec();
        f.resize(100_000, 0);
        f.extend_from_slice(b"tail");
        with_mount(&img, |m| {
            assert!(std::fs::read(m.join("a/f")).unwrap() == f);
            assert!(std::fs::read(m.join(format!("a/b/src-{tag}"))).unwrap() == data[..1000]);
            assert_eq!(std::fs::read(m.join("sparse")).unwrap(), vec![0u8; 1 << 20]);
            assert_eq!(
                std::fs::read_link(m.join("a/fast")).unwrap(),
                Path::new("b/c")
            );
            assert_eq!(
                std::fs::read_link(m.join("a/slow")).unwrap(),
                Path::new(&long)
            );
            assert!(!m.join("d").exists());
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let md = std::fs::metadata(m.join("a/b/c")).unwrap();
            assert_eq!(md.permissions().mode() & 0o7777, 0o750);
            assert_eq!((md.uid(), md.gid()), (1000, 100));
            let mut names: Vec<String> = std::fs::read_dir(m.join("a"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["b", "f", "fast", "slow"]);
        });
    }
}

#[test]
fn cp_enospc_leaves_nothing_half_written() {
    if !have("mke2fs") || !have("e2fsck") || !have("dumpe2fs") {
        eprintln!("skipped: needs e2fsprogs");
        return;
    }
    let img = mkfs(
        "full",
        &["-t", "ext4", "-b", "4096", "-O", "^has_journal"],
        8,
    );
    let keep = scratch().join("keep");
    std::fs::write(&keep, b"keep me").unwrap();
    ok(
        &dio(
            &["cp", keep.to_str().unwrap(), &format!("{img}:/keep")],
            None,
        ),
        "cp",
    );
    let before = free_blocks(&img);
    let big = scratch().join("big");
    std::fs::write(&big, vec![1u8; 16 << 20]).unwrap();
    failed(
        &dio(&["cp", big.to_str().unwrap(), &format!("{img}:/big")], None),
        "cp too big",
    );
    failed(
        &dio(
            &["cp", big.to_str().unwrap(), &format!("{img}:/keep")],
            None,
        ),
        "replace too big",
    );
    failed(
        &dio(
            &["cp", "-", &format!("{img}:/pipe")],
            Some(&vec![2u8; 16 << 20]),
        ),
        "stdin too big",
    );
    assert_eq!(free_blocks(&img), before, "blocks or inodes leaked");
    fsck(&img);
    let o = dio(&["cat", &format!("{img}:/keep")], None);
    ok(&o, "cat");
    assert_eq!(o.stdout, b"keep me");
    failed(
        &dio(&["cat", &format!("{img}:/big")], None),
        "big is absent",
    );
}

/// `rm -r IMG:/` is refused before anything is removed (GNU rm's
/// --preserve-root): exit 1, the image byte for byte as it was.
#[test]
fn rm_r_refuses_the_root_directory() {
    if !have("mke2fs") {
        eprintln!("skipped: needs e2fsprogs");
        return;
    }
    let img = mkfs("rm-root", &["-t", "ext4", "-O", "^has_journal"], 8);
    ok(
        &dio(&["mkdir", "-p", &format!("{img}:/a/b")], None),
        "mkdir",
    );
    let before = std::fs::read(&img).unwrap();
    for path in ["/", "//", "/a/.."] {
        failed(&dio(&["rm", "-r", &format!("{img}:{path}")], None), path);
        failed(&dio(&["rm", "-rf", &format!("{img}:{path}")], None), path);
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "rm -r / changed the image"
    );
}

/// `rm` of many paths in one image removes every one it can (GNU rm goes on past
/// a path it cannot remove, exit 1 at the end) and leaves an image e2fsck and the
/// kernel agree with.
#[test]
fn rm_goes_on_past_a_path_it_cannot_remove() {
    if !have("mke2fs") || !have("e2fsck") {
        eprintln!("skipped: needs e2fsprogs");
        return;
    }
    let img = mkfs("rm-many", &["-t", "ext4"], 16);
    ok(
        &dio(&["mkdir", "-p", &format!("{img}:/d/sub")], None),
        "mkdir",
    );
    for i in 0..40 {
        ok(
            &dio(&["cp", "-", &format!("{img}:/d/f{i}")], Some(b"x")),
            "cp",
        );
    }
    let mut args = vec!["rm".to_string()];
    for i in 0..40 {
        args.push(format!("{img}:/d/f{i}"));
        if i == 10 {
            args.push(format!("{img}:/d/missing"));
            args.push(format!("{img}:/d/sub"));
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    failed(&dio(&args, None), "rm with a missing path and a directory");
    fsck(&img);
    let o = dio(&["ls", &format!("{img}:/d")], None);
    ok(&o, "ls");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "sub");
    with_mount(&img, |m| {
        let names: Vec<_> = std::fs::read_dir(m.join("d")).unwrap().collect();
        assert_eq!(names.len(), 1, "the kernel sees {names:?}");
    });
}

/// `dio write` that runs out of space part way (the second 8 MiB chunk does not
/// fit) fails with exit 1, keeps the chunk that fit, durable, with the size that
/// covers it, and gives back every block the failed chunk took: the free counts
/// equal those of an image that was written only the first chunk.
#[test]
fn write_enospc_keeps_what_fit_and_leaks_nothing() {
    if !have("mke2fs") || !have("e2fsck") || !have("dumpe2fs") {
        eprintln!("skipped: needs e2fsprogs");
        return;
    }
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let first = &data[..8 << 20];
    for (name, args) in [
        ("ext2-1k", &["-t", "ext2", "-b", "1024"][..]),
        (
            "ext4-4k",
            &["-t", "ext4", "-b", "4096", "-O", "^has_journal"][..],
        ),
    ] {
        let mut free = Vec::new();
        for (tag, input) in [("fits", first), ("full", &data[..])] {
            let img = mkfs(&format!("wfull-{name}-{tag}"), args, 16);
            ok(
                &dio(&["truncate", "-s", "0", &format!("{img}:/w")], None),
                "create",
            );
            let o = dio(
                &["write", &format!("{img}:/w"), "--offset", "0"],
                Some(input),
            );
            if tag == "fits" {
                ok(&o, "write 8 MiB");
            } else {
                failed(&o, "write 24 MiB into 16 MiB");
            }
            fsck(&img);
            let o = dio(&["cat", &format!("{img}:/w")], None);
            ok(&o, "cat");
            assert!(o.stdout == first, "{name} {tag}: /w is not the first 8 MiB");
            with_mount(&img, |m| {
                assert!(
                    std::fs::read(m.join("w")).unwrap() == first,
                    "{name}: kernel"
                );
            });
            free.push(free_blocks(&img));
        }
        assert_eq!(free[0], free[1], "{name}: the failed chunk's blocks leaked");
    }
}

#[test]
fn journal_images_take_changes_through_the_journal() {
    if !have("mke2fs") || !have("e2fsck") {
        eprintln!("skipped: needs e2fsprogs");
        return;
    }
    let img = mkfs("journal", &["-t", "ext4", "-b", "4096"], 32);
    ok(&dio(&["mkdir", &format!("{img}:/x")], None), "mkdir");
    ok(
        &dio(&["truncate", "-s", "10", &format!("{img}:/x/t")], None),
        "truncate",
    );
    ok(&dio(&["ln", "-s", "t", &format!("{img}:/x/l")], None), "ln");
    ok(
        &dio(&["rm", "-r", &format!("{img}:/lost+found")], None),
        "rm",
    );
    fsck(&img);
    let o = dio(&["cat", &format!("{img}:/x/t")], None);
    ok(&o, "cat");
    assert_eq!(o.stdout, vec![0u8; 10]);
}
