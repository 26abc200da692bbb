//! `dio cp -r`'s grouped path for small files (`Ext::put_files`: many files in
//! one operation, their data in few large writes), judged by `e2fsck -fn` and
//! `diff -r` against the kernel's loop mount: on ext2, ext3, ext4 with 1 KiB
//! and 4 KiB blocks, metadata_csum off and on, inline_data and bigalloc; a
//! second copy over the first (names that exist fall back to one file at a
//! time and are replaced); and source files that cannot be read midway (a
//! corrupt source image, loop-mounted) leave no name in the image, in a group
//! and on the large-file path alike.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dio_testkit::{assert_fsck_clean, bytes, debugfs, have, kernel_mount, mke2fs, skip, Rng};

fn dio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ext-tree-batch")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A host tree of `dirs` directories of `files` small files (a few past a
/// group's 1 MiB bound), bytes from `seed`.
fn make_tree(root: &Path, dirs: usize, files: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for d in 0..dirs {
        let dir = root.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..files {
            let n = match f {
                0 => 0,
                1 => (1 << 20) + 1,
                _ if rng.percent(3) => rng.below(300 << 10) as usize,
                _ => rng.below(12 << 10) as usize,
            };
            std::fs::write(
                dir.join(format!("file-{f:04}")),
                bytes(n, seed * 1_000_000 + (d * files + f) as u64),
            )
            .unwrap();
        }
    }
}

fn same_as_kernel(img: &Path, src: &Path, under: &str) {
    let Some(m) = kernel_mount(img, "ro") else {
        return;
    };
    let o = Command::new("diff")
        .arg("-r")
        .arg(src)
        .arg(m.path().join(under))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "diff -r {} against the kernel's view:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn cp_r_groups_small_files_on_every_format() {
    if !have("mke2fs") || !have("e2fsck") {
        skip("needs e2fsprogs");
        return;
    }
    let base = scratch("formats");
    let src = base.join("tree");
    make_tree(&src, 3, 260, 1);
    let configs: &[(&str, &[&str])] = &[
        ("ext2-1k", &["-t", "ext2", "-b", "1024"]),
        ("ext3-4k", &["-t", "ext3", "-b", "4096"]),
        (
            "ext4-1k-nocsum",
            &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"],
        ),
        (
            "ext4-4k-csum-nojournal",
            &[
                "-t",
                "ext4",
                "-b",
                "4096",
                "-O",
                "metadata_csum,^has_journal",
            ],
        ),
        ("ext4-inline", &["-t", "ext4", "-O", "inline_data"]),
        (
            "ext4-bigalloc",
            &["-t", "ext4", "-O", "bigalloc", "-C", "16384"],
        ),
    ];
    for &(name, args) in configs {
        let img = base.join(format!("{name}.img"));
        mke2fs(&img, args, 96);
        let dst = format!("{}:/copy", img.display());
        let o = dio(&["cp", "-r", src.to_str().unwrap(), &dst, "--no-progress"]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_fsck_clean(&img);
        same_as_kernel(&img, &src, "copy");
        let _ = std::fs::remove_file(&img);
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn cp_r_over_an_earlier_copy_replaces_the_files() {
    if !have("mke2fs") || !have("e2fsck") {
        skip("needs e2fsprogs");
        return;
    }
    let base = scratch("again");
    let (first, second) = (base.join("first"), base.join("second"));
    make_tree(&first, 2, 120, 2);
    make_tree(&second, 3, 100, 3);
    for features in ["has_journal", "^has_journal"] {
        let img = base.join("img");
        mke2fs(&img, &["-t", "ext4", "-b", "4096", "-O", features], 64);
        let dst = format!("{}:/t", img.display());
        for src in [&first, &second] {
            let o = dio(&[
                "cp",
                "-r",
                &format!("{}/.", src.display()),
                &dst,
                "--no-progress",
            ]);
            assert!(
                o.status.success(),
                "{features}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert_fsck_clean(&img);
        // The second tree's files over the first's: d0 and d1 hold the first
        // tree's extra names (file-0100.. file-0119) besides the second's.
        if let Some(m) = kernel_mount(&img, "ro") {
            for d in 0..3 {
                for f in 0..100 {
                    let rel = format!("d{d}/file-{f:04}");
                    let want = std::fs::read(second.join(&rel)).unwrap();
                    let got = std::fs::read(m.path().join("t").join(&rel)).unwrap();
                    assert!(got == want, "{features}: {rel}");
                }
            }
            let extra = std::fs::read(m.path().join("t/d1/file-0110")).unwrap();
            assert!(extra == std::fs::read(first.join("d1/file-0110")).unwrap());
        }
        let _ = std::fs::remove_file(&img);
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn cp_r_leaves_no_name_for_a_file_it_could_not_read() {
    if !have("mke2fs") || !have("e2fsck") || !have("debugfs") {
        skip("needs e2fsprogs");
        return;
    }
    let base = scratch("unreadable");
    // The source: an ext2 image (1 KiB blocks) whose files "bad" (20 KiB, a
    // group's) and "big" (past a group's bound) have the first pointer of
    // their indirect block past the device: a read of them fails after 12 KiB.
    let src_dir = base.join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    let good1 = bytes(5000, 1);
    let good2 = bytes(70_000, 2);
    std::fs::write(src_dir.join("good1"), &good1).unwrap();
    std::fs::write(src_dir.join("bad"), bytes(20_000, 3)).unwrap();
    std::fs::write(src_dir.join("big"), bytes(3 << 20, 4)).unwrap();
    std::fs::write(src_dir.join("good2"), &good2).unwrap();
    let src_img = base.join("src.img");
    mke2fs(
        &src_img,
        &["-t", "ext2", "-b", "1024", "-d", src_dir.to_str().unwrap()],
        8,
    );
    for f in ["bad", "big"] {
        let st = debugfs(&src_img, &format!("stat /{f}"));
        let ind: u64 = st
            .split("(IND):")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no indirect block for {f}: {st}"));
        dio_testkit::debugfs_w(&src_img, &format!("zap_block -o 0 -l 4 -p 255 {ind}"));
    }
    let Some(src) = kernel_mount(&src_img, "ro") else {
        return;
    };
    match std::fs::read(src.path().join("bad")) {
        Ok(_) => {
            skip("the kernel read a block past the device");
            return;
        }
        // It stats and opens: the failure comes midway through the bytes.
        Err(_) => assert!(std::fs::File::open(src.path().join("bad")).is_ok()),
    }
    for features in ["has_journal", "^has_journal"] {
        let img = base.join("img");
        mke2fs(&img, &["-t", "ext4", "-b", "4096", "-O", features], 32);
        let o = dio(&[
            "cp",
            "-r",
            src.path().to_str().unwrap(),
            &format!("{}:/copy", img.display()),
            "--no-progress",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{features}: {err}");
        assert!(
            err.contains("/copy/bad") && err.contains("/copy/big"),
            "{features}: {err}"
        );
        assert_fsck_clean(&img);
        let ls = debugfs(&img, "ls -l /copy");
        assert!(
            ls.contains("good1") && ls.contains("good2"),
            "{features}: {ls}"
        );
        assert!(
            !ls.contains("bad") && !ls.contains("big"),
            "{features}: {ls}"
        );
        if let Some(m) = kernel_mount(&img, "ro") {
            assert!(std::fs::read(m.path().join("copy/good1")).unwrap() == good1);
            assert!(std::fs::read(m.path().join("copy/good2")).unwrap() == good2);
            assert!(!m.path().join("copy/bad").exists());
            assert!(!m.path().join("copy/big").exists());
        }
        let _ = std::fs::remove_file(&img);
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&base);
}
