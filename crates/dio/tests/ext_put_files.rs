//! `Ext::put_files`: many small files created in one operation (their blocks
//! side by side, their data in few large writes), on ext4 with and without a
//! journal, 1 KiB and 4 KiB blocks, metadata_csum off and on, ext2 and ext3
//! (indirect blocks, double indirect included), inline_data and bigalloc.
//! Judged by `e2fsck -fn` and the kernel's loop mount (every byte, size, mode,
//! owner and mtime); free space is fragmented first so files need extent-tree
//! blocks, and directories grow into htrees and split leaves. All or nothing:
//! an existing or repeated name, a missing parent and ENOSPC change nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dio::ext::{Attrs, Ext, NewFile, Timestamp};
use dio::{Error, PathErrorKind, RawFile, RawOptions};
use dio_testkit::{assert_fsck_clean, have, kernel_mount, mke2fs, skip, Rng};

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ext-put-files")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open(img: &Path) -> (RawFile, Ext) {
    let raw = RawFile::open(
        img,
        &RawOptions {
            write: true,
            ..RawOptions::default()
        },
    )
    .unwrap();
    let ext = Ext::open_writable(Arc::clone(raw.direct().device()), raw.size()).unwrap();
    (raw, ext)
}

/// The bytes of `path` as the library reads them.
fn read_back(ext: &Ext, path: &[u8]) -> Vec<u8> {
    let inode = ext.lookup(path, false).unwrap();
    let f = ext.open_file(&inode).unwrap();
    let mut buf = vec![0u8; inode.size as usize];
    let mut at = 0;
    while at < buf.len() {
        let n = f.read_at(at as u64, &mut buf[at..]).unwrap();
        assert!(
            n > 0,
            "{}: short read at {at}",
            String::from_utf8_lossy(path)
        );
        at += n;
    }
    buf
}

/// One file the test made, as the kernel must show it.
struct Want {
    path: String,
    data: Vec<u8>,
    mode: u16,
    uid: u32,
    mtime: i64,
}

/// Sizes around the edges that matter for block size `bs`, then random ones.
fn size_of(rng: &mut Rng, i: usize, bs: usize) -> usize {
    let edges = [
        0,
        1,
        bs - 1,
        bs,
        bs + 1,
        12 * bs,
        12 * bs + 1,
        (12 + bs / 4) * bs + 1,
        300 << 10,
    ];
    match edges.get(i) {
        Some(&n) => n,
        None if rng.percent(10) => rng.below(200 << 10) as usize,
        None => rng.below(9000) as usize,
    }
}

#[test]
fn put_files_matches_the_kernel_on_every_format() {
    if !have("mke2fs") {
        skip("mke2fs is not installed");
        return;
    }
    let configs: &[(&str, &[&str], bool)] = &[
        ("ext4-4k-journal", &["-t", "ext4", "-b", "4096"], true),
        (
            "ext4-4k-nojournal",
            &["-t", "ext4", "-b", "4096", "-O", "^has_journal"],
            false,
        ),
        (
            "ext4-1k-csum",
            &["-t", "ext4", "-b", "1024", "-O", "metadata_csum"],
            true,
        ),
        (
            "ext4-1k-nocsum",
            &[
                "-t",
                "ext4",
                "-b",
                "1024",
                "-O",
                "^metadata_csum,^has_journal",
            ],
            false,
        ),
        ("ext2-1k", &["-t", "ext2", "-b", "1024"], true),
        ("ext3-2k", &["-t", "ext3", "-b", "2048"], false),
        (
            "ext4-inline",
            &["-t", "ext4", "-b", "4096", "-O", "inline_data"],
            true,
        ),
        (
            "ext4-bigalloc",
            &["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"],
            false,
        ),
    ];
    for &(name, args, batched) in configs {
        let dir = scratch(name);
        let img = dir.join("img");
        mke2fs(&img, args, 64);
        let wants = {
            let (_raw, ext) = open(&img);
            let bs = ext.superblock().block_size as usize;
            let plain = Attrs::new();
            // Fragment the free space: 1-block files, every other one removed.
            ext.mkdir(b"/frag", &plain).unwrap();
            let paths: Vec<String> = (0..160).map(|i| format!("/frag/{i}")).collect();
            let one = vec![0xEEu8; bs];
            let files: Vec<NewFile<'_>> = paths
                .iter()
                .map(|p| NewFile {
                    path: p.as_bytes(),
                    attrs: &plain,
                    data: &one,
                })
                .collect();
            ext.put_files(&files).unwrap();
            for p in paths.iter().step_by(2) {
                ext.remove(p.as_bytes(), false).unwrap();
            }
            if batched {
                ext.begin_batch().unwrap();
            }
            ext.mkdir(b"/a", &plain).unwrap();
            ext.mkdir(b"/a/b", &plain).unwrap();
            let mut rng = Rng::new(16);
            let mut wants = Vec::new();
            for i in 0..480usize {
                let parent = if i % 5 == 4 { "/a/b" } else { "/a" };
                let path = format!("{parent}/a-longer-name-for-leaf-splits-{i:05}");
                let mut data = vec![0u8; size_of(&mut rng, i, bs)];
                rng.fill(&mut data);
                wants.push(Want {
                    path,
                    data,
                    mode: 0o600 + (i % 64) as u16,
                    uid: 1000 + i as u32,
                    mtime: 1_600_000_000 + i as i64,
                });
            }
            let attrs: Vec<Attrs> = wants
                .iter()
                .map(|w| {
                    let t = Timestamp {
                        secs: w.mtime,
                        nsecs: 5,
                    };
                    Attrs::new().mode(w.mode).owner(w.uid, 7).times(t, t)
                })
                .collect();
            // Groups of varied size, mixing both directories.
            let mut at = 0;
            let mut k = 0;
            while at < wants.len() {
                let n = [1, 7, 64, 150][k % 4].min(wants.len() - at);
                let files: Vec<NewFile<'_>> = (at..at + n)
                    .map(|j| NewFile {
                        path: wants[j].path.as_bytes(),
                        attrs: &attrs[j],
                        data: &wants[j].data,
                    })
                    .collect();
                let made = ext.put_files(&files).unwrap();
                assert_eq!(made.len(), n, "{name}");
                for (m, j) in made.iter().zip(at..at + n) {
                    assert_eq!(m.size, wants[j].data.len() as u64, "{name}");
                }
                // Reads through the library see them at once.
                let back = read_back(&ext, wants[at].path.as_bytes());
                assert!(back == wants[at].data, "{name}: {}", wants[at].path);
                at += n;
                k += 1;
            }
            if batched {
                ext.end_batch().unwrap();
            }
            ext.checkpoint().unwrap();
            wants
        };
        assert_fsck_clean(&img);
        let Some(m) = kernel_mount(&img, "ro") else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        let mut deep = 0;
        for w in &wants {
            let host = m.path().join(&w.path[1..]);
            let got = std::fs::read(&host).unwrap_or_else(|e| panic!("{name}: {}: {e}", w.path));
            assert!(got == w.data, "{name}: {}: the bytes differ", w.path);
            let md = std::fs::metadata(&host).unwrap();
            assert_eq!(md.mode() & 0o7777, u32::from(w.mode), "{name}: {}", w.path);
            assert_eq!((md.uid(), md.gid()), (w.uid, 7), "{name}: {}", w.path);
            assert_eq!((md.mtime(), md.mtime_nsec()), (w.mtime, 5), "{name}");
            deep += usize::from(md.blocks() > 0);
        }
        assert!(deep > 0, "{name}");
        let names = std::fs::read_dir(m.path().join("a")).unwrap().count();
        assert_eq!(names, 480 - 96 + 1, "{name}: names in /a");
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The depth of the extent tree of `path` in `img`, from debugfs.
fn extent_depth(img: &Path, path: &str) -> Option<u32> {
    let out = dio_testkit::debugfs(img, &format!("ex {path}"));
    out.lines()
        .filter_map(|l| l.split_whitespace().next()?.split('/').next()?.parse().ok())
        .max()
}

#[test]
fn put_files_on_fragmented_space_builds_extent_trees() {
    if !have("debugfs") {
        skip("debugfs is not installed");
        return;
    }
    let dir = scratch("fragmented");
    let img = dir.join("img");
    mke2fs(
        &img,
        &["-t", "ext4", "-b", "1024", "-O", "^has_journal"],
        32,
    );
    let data = dio_testkit::bytes(60 << 10, 3);
    {
        let (_raw, ext) = open(&img);
        let plain = Attrs::new();
        let paths: Vec<String> = (0..400).map(|i| format!("/f{i}")).collect();
        let one = vec![1u8; 1024];
        let files: Vec<NewFile<'_>> = paths
            .iter()
            .map(|p| NewFile {
                path: p.as_bytes(),
                attrs: &plain,
                data: &one,
            })
            .collect();
        ext.put_files(&files).unwrap();
        for p in paths.iter().step_by(2) {
            ext.remove(p.as_bytes(), false).unwrap();
        }
        ext.put_files(&[NewFile {
            path: b"/holes",
            attrs: &plain,
            data: &data,
        }])
        .unwrap();
        assert!(read_back(&ext, b"/holes") == data);
        // A stretch of 9 MiB of neighbouring blocks: written in pieces, files
        // cut across them.
        let big: Vec<(String, Vec<u8>)> = (0..30)
            .map(|i| {
                (
                    format!("/big{i}"),
                    dio_testkit::bytes(300 * 1024 + 1, 10 + i),
                )
            })
            .collect();
        let files: Vec<NewFile<'_>> = big
            .iter()
            .map(|(p, d)| NewFile {
                path: p.as_bytes(),
                attrs: &plain,
                data: d,
            })
            .collect();
        ext.put_files(&files).unwrap();
        for (p, d) in &big {
            assert!(read_back(&ext, p.as_bytes()) == *d, "{p}");
        }
    }
    assert_fsck_clean(&img);
    // 60 one-block holes: 60 extents, in a leaf block under the inode.
    assert_eq!(extent_depth(&img, "/holes"), Some(1));
    if let Some(m) = kernel_mount(&img, "ro") {
        assert!(std::fs::read(m.path().join("holes")).unwrap() == data);
        for i in 0..30u64 {
            let want = dio_testkit::bytes(300 * 1024 + 1, 10 + i);
            assert!(std::fs::read(m.path().join(format!("big{i}"))).unwrap() == want);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn put_files_is_all_or_nothing() {
    for (name, args) in [
        (
            "ext4",
            &["-t", "ext4", "-b", "4096", "-O", "^has_journal"][..],
        ),
        ("ext4-journal", &["-t", "ext4", "-b", "4096"][..]),
        ("ext2", &["-t", "ext2", "-b", "1024"][..]),
    ] {
        let dir = scratch(&format!("nothing-{name}"));
        let img = dir.join("img");
        mke2fs(&img, args, 16);
        {
            let (_raw, ext) = open(&img);
            let plain = Attrs::new();
            ext.create(b"/taken", &plain).unwrap();
            let before = ext.free_counts();
            let small = vec![9u8; 5000];
            let try_put = |paths: &[&[u8]], data: &[u8]| {
                let files: Vec<NewFile<'_>> = paths
                    .iter()
                    .map(|p| NewFile {
                        path: p,
                        attrs: &plain,
                        data,
                    })
                    .collect();
                ext.put_files(&files)
            };
            fn kind<T>(r: dio::Result<T>) -> Option<PathErrorKind> {
                match r {
                    Err(Error::Path(e)) => Some(e.kind),
                    _ => None,
                }
            }
            assert_eq!(
                kind(try_put(&[b"/new1", b"/taken", b"/new2"], &small)),
                Some(PathErrorKind::AlreadyExists),
                "{name}"
            );
            assert_eq!(
                kind(try_put(&[b"/new1", b"/new2", b"/new1"], &small)),
                Some(PathErrorKind::AlreadyExists),
                "{name}"
            );
            assert_eq!(
                kind(try_put(&[b"/new1", b"/missing/new2"], &small)),
                Some(PathErrorKind::NotFound),
                "{name}"
            );
            // More than the image holds.
            let big = vec![7u8; 1 << 20];
            let many: Vec<String> = (0..40).map(|i| format!("/big{i}")).collect();
            let many: Vec<&[u8]> = many.iter().map(|p| p.as_bytes()).collect();
            assert!(
                matches!(try_put(&many, &big), Err(Error::NoSpace(_))),
                "{name}"
            );
            assert_eq!(ext.free_counts(), before, "{name}: nothing taken");
            for p in [&b"/new1"[..], b"/new2", b"/big0", b"/big39"] {
                assert_eq!(
                    kind(ext.lookup(p, false).map(|_| ())),
                    Some(PathErrorKind::NotFound),
                    "{name}: {}",
                    String::from_utf8_lossy(p)
                );
            }
            // And the next call works.
            try_put(&[b"/new1", b"/new2"], &small).unwrap();
            assert!(read_back(&ext, b"/new2") == small);
            ext.checkpoint().unwrap();
        }
        assert_fsck_clean(&img);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
