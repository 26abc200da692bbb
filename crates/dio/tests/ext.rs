//! The ext client against real images: compressed fixtures made by `mke2fs -d`
//! (tests/fixtures/ext/make.sh), compared file by file with the tree they were made
//! from, with `debugfs -R rdump` and, as root, with the kernel's own mount; in-place
//! writes checked by `e2fsck -fn` and the kernel; hostile edits give "corrupt: ...".

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use dio::ext::{Ext, FileType};
use dio::Mapping;
use dio::{CorruptKind, Error, Feature};
use dio::{RawFile, RawOptions};
use dio_testkit::{
    assert_fsck_clean, copy_at_rest, have, inode_location, is_root, kernel_mount, settle_writeback,
    sh, Rng,
};

const IMAGES: &[&str] = &[
    "ext4-4k",
    "ext4-1k",
    "ext4-2k",
    "ext3-2k",
    "ext2-1k",
    "ext4-bigalloc",
    "ext4-bigalloc-1k",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ext")
}

fn scratch_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-tests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Unpack fixture `name` to a scratch image of its own (`tag` keeps tests apart).
fn unpack(name: &str, tag: &str) -> PathBuf {
    let gz = std::fs::File::open(fixtures().join(format!("{name}.img.gz"))).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    let path = scratch_dir().join(format!("{name}-{tag}.img"));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open(path: &Path, write: bool) -> dio::Result<(RawFile, Ext)> {
    let raw = RawFile::open(
        path,
        &RawOptions {
            write,
            ..RawOptions::default()
        },
    )?;
    let dev = Arc::clone(raw.direct().device());
    let ext = if write {
        Ext::open_writable(dev, raw.size())?
    } else {
        Ext::open(dev, raw.size())?
    };
    Ok((raw, ext))
}

fn read_all(ext: &Ext, path: &str) -> Vec<u8> {
    let inode = ext.lookup(path.as_bytes(), true).unwrap();
    let file = ext.open_file(&inode).unwrap();
    let mut buf = vec![0u8; file.size() as usize];
    assert_eq!(file.read_at(0, &mut buf).unwrap(), buf.len(), "{path}");
    buf
}

fn crc(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// The pattern make.sh writes: 1 KiB blocks tagged with their index.
fn pattern(nblocks: usize, tag: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..nblocks {
        let head = format!("{tag} {i:08} ");
        let mut b = head.repeat(1024 / head.len() + 1).into_bytes();
        b.truncate(1024);
        out.extend_from_slice(&b);
    }
    out
}

/// What /frag holds after make.sh punched every other fs block from 10 on (only
/// extent-mapped images).
fn frag_expected(ext: &Ext) -> Vec<u8> {
    let mut data = pattern(800, "frag");
    let inode = ext.lookup(b"/frag", true).unwrap();
    if inode.has_flag(dio::ext::inode_flags::EXTENTS) {
        let bs = ext.block_size() as usize;
        let blocks = 800 * 1024 / bs;
        let mut b = 10;
        while b < blocks - 2 {
            data[b * bs..(b + 1) * bs].fill(0);
            b += 2;
        }
    }
    data
}

enum Want {
    Dir,
    File(u64, u32),
    Link(String),
}

fn manifest() -> BTreeMap<String, Want> {
    let text = std::fs::read_to_string(fixtures().join("manifest.txt")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let want = match f[0] {
            "d" => Want::Dir,
            "f" => Want::File(
                f[2].parse().unwrap(),
                u32::from_str_radix(f[3], 16).unwrap(),
            ),
            "l" => Want::Link(f[2].to_string()),
            _ => panic!("bad manifest line {line}"),
        };
        out.insert(f[1].to_string(), want);
    }
    out
}

fn parent(p: &str) -> &str {
    match p.rfind('/') {
        Some(0) => "/",
        Some(i) => &p[..i],
        None => "/",
    }
}

#[test]
fn every_fixture_matches_the_tree_it_was_made_from() {
    let want = manifest();
    for name in IMAGES {
        let img = unpack(name, "manifest");
        let (_raw, ext) = open(&img, false).unwrap();
        for (path, w) in &want {
            match w {
                Want::Dir => {
                    let inode = ext.lookup(path.as_bytes(), false).unwrap();
                    assert_eq!(inode.file_type(), FileType::Directory, "{name}:{path}");
                    let mut names: Vec<String> = ext
                        .read_dir(&inode)
                        .unwrap()
                        .into_iter()
                        .map(|e| String::from_utf8(e.name).unwrap())
                        .filter(|n| n != "." && n != ".." && !(path == "/" && n == "lost+found"))
                        .collect();
                    names.sort();
                    let mut expect: Vec<String> = want
                        .keys()
                        .filter(|k| k.as_str() != "/" && parent(k) == path)
                        .map(|k| k.rsplit('/').next().unwrap().to_string())
                        .collect();
                    expect.sort();
                    assert_eq!(names, expect, "{name}: listing of {path}");
                }
                Want::File(size, sum) => {
                    let data = read_all(&ext, path);
                    if path == "/frag" {
                        assert!(data == frag_expected(&ext), "{name}: /frag");
                        continue;
                    }
                    assert_eq!(data.len() as u64, *size, "{name}:{path} size");
                    assert_eq!(crc(&data), *sum, "{name}:{path} contents");
                }
                Want::Link(target) => {
                    let inode = ext.lookup(path.as_bytes(), false).unwrap();
                    assert_eq!(inode.file_type(), FileType::Symlink, "{name}:{path}");
                    assert_eq!(
                        ext.read_link(&inode).unwrap(),
                        target.as_bytes(),
                        "{name}:{path}"
                    );
                }
            }
        }
        // Symlinks are followed in the middle and at the end.
        assert_eq!(read_all(&ext, "/links/fast"), b"hello, ext\n");
        assert_eq!(read_all(&ext, "/links/slow"), b"deep inside\n");
        assert_eq!(
            read_all(&ext, "/links/todir/sub/deep.txt"),
            b"deep inside\n"
        );
        assert_eq!(
            read_all(&ext, "/links/abs"),
            read_all(&ext, "/data/pattern")
        );
        let err = |p: &str| ext.lookup(p.as_bytes(), true).unwrap_err().errno();
        assert_eq!(err("/links/dangling"), libc::ENOENT, "{name}");
        assert_eq!(err("/links/loop1"), libc::ELOOP, "{name}");
        assert_eq!(err("/hello.txt/x"), libc::ENOTDIR, "{name}");
        assert_eq!(err("/many/not-there"), libc::ENOENT, "{name}");
    }
}

#[test]
fn feature_mix_of_the_fixtures_is_what_the_tests_claim() {
    use dio::ext::{compat, incompat, ro_compat};
    let expect: &[(&str, u32, u32, u32, u32)] = &[
        // name, block size, incompat, ro_compat, compat bits that must be set
        (
            "ext4-4k",
            4096,
            incompat::EXTENTS | incompat::BIT64 | incompat::INLINE_DATA | incompat::FLEX_BG,
            ro_compat::METADATA_CSUM,
            compat::DIR_INDEX,
        ),
        (
            "ext4-1k",
            1024,
            incompat::EXTENTS | incompat::META_BG,
            ro_compat::METADATA_CSUM,
            compat::DIR_INDEX,
        ),
        (
            "ext4-2k",
            2048,
            incompat::EXTENTS,
            ro_compat::GDT_CSUM,
            compat::DIR_INDEX,
        ),
        (
            "ext3-2k",
            2048,
            incompat::FILETYPE,
            0,
            compat::HAS_JOURNAL | compat::DIR_INDEX,
        ),
        ("ext2-1k", 1024, incompat::FILETYPE, 0, compat::DIR_INDEX),
        (
            "ext4-bigalloc",
            4096,
            incompat::EXTENTS | incompat::BIT64,
            ro_compat::BIGALLOC | ro_compat::METADATA_CSUM,
            compat::HAS_JOURNAL,
        ),
        (
            "ext4-bigalloc-1k",
            1024,
            incompat::EXTENTS | incompat::BIT64,
            ro_compat::BIGALLOC | ro_compat::METADATA_CSUM,
            compat::HAS_JOURNAL,
        ),
    ];
    for &(name, bs, inc, ro, com) in expect {
        let img = unpack(name, "features");
        let (_raw, ext) = open(&img, false).unwrap();
        let sb = ext.superblock();
        assert_eq!(sb.block_size, bs, "{name}");
        assert_eq!(
            sb.feature_incompat & inc,
            inc,
            "{name}: {}",
            sb.feature_names()
        );
        assert_eq!(
            sb.feature_ro_compat & ro,
            ro,
            "{name}: {}",
            sb.feature_names()
        );
        assert_eq!(
            sb.feature_compat & com,
            com,
            "{name}: {}",
            sb.feature_names()
        );
        let many = ext.lookup(b"/many", false).unwrap();
        assert!(
            many.has_flag(dio::ext::inode_flags::INDEX),
            "{name}: /many is hashed"
        );
    }
    // The geometries that were once called corrupt: a group of 131072 blocks
    // (32768 clusters of 16 KiB), and 1 KiB blocks in 4 KiB clusters whose first
    // data block is 0 (the descriptors still follow the superblock's block 1).
    let (_raw, ext) = open(&unpack("ext4-bigalloc", "features"), false).unwrap();
    let sb = ext.superblock();
    assert_eq!(
        (sb.cluster_size, sb.blocks_per_group, sb.clusters_per_group),
        (16384, 131072, 32768)
    );
    let (_raw, ext) = open(&unpack("ext4-bigalloc-1k", "features"), false).unwrap();
    let sb = ext.superblock();
    assert_eq!(
        (sb.cluster_size, sb.first_data_block, sb.clusters_per_group),
        (4096, 0, 2048)
    );
    // A 3 MiB all-hole file kept inline: 60 bytes of inline area, zeros past it.
    let (_raw, ext) = open(&unpack("ext4-4k", "features"), false).unwrap();
    let inode = ext.lookup(b"/sparse3m", false).unwrap();
    assert!(inode.has_flag(dio::ext::inode_flags::INLINE_DATA));
    assert_eq!(inode.size, 3 << 20);
    let file = ext.open_file(&inode).unwrap();
    let mut buf = vec![1u8; 5000];
    assert_eq!(file.read_at((3 << 20) - 4000, &mut buf).unwrap(), 4000);
    assert!(buf[..4000].iter().all(|&b| b == 0) && buf[4000] == 1);
}

/// Every file `debugfs -R rdump` writes out reads the same through dio.
#[test]
fn files_match_debugfs_rdump() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    for name in IMAGES {
        let img = unpack(name, "rdump");
        let out = scratch_dir().join(format!("{name}-rdump"));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let st = Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", out.display()))
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let (_raw, ext) = open(&img, false).unwrap();
        let mut checked = 0;
        compare_tree(&ext, &out, "", &mut checked, true);
        assert!(checked > 400, "{name}: only {checked} files compared");
    }
}

/// Compare the tree under `host` (a dump or a mount) with the image's, file by
/// file. `debugfs` dumps inline-data files as their inline area: compare the prefix.
fn compare_tree(ext: &Ext, host: &Path, rel: &str, checked: &mut usize, dump: bool) {
    let mut names: Vec<_> = std::fs::read_dir(host)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let dir = ext
        .lookup(if rel.is_empty() { b"/" } else { rel.as_bytes() }, false)
        .unwrap();
    let mut ours: Vec<String> = ext
        .read_dir(&dir)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .filter(|n| n != "." && n != "..")
        .collect();
    ours.sort();
    assert_eq!(ours, names, "listing of {rel}/");
    for n in names {
        let p = host.join(&n);
        let path = format!("{rel}/{n}");
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let inode = ext.lookup(path.as_bytes(), false).unwrap();
        if meta.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            assert_eq!(
                ext.read_link(&inode).unwrap(),
                t.as_os_str().as_encoded_bytes(),
                "{path}"
            );
        } else if meta.is_dir() {
            compare_tree(ext, &p, &path, checked, dump);
        } else {
            let host_bytes = std::fs::read(&p).unwrap();
            let ours = read_all(ext, &path);
            if dump && inode.has_flag(dio::ext::inode_flags::INLINE_DATA) {
                // debugfs dumps the inline area: past the shorter of the two,
                // only zeros.
                let n = host_bytes.len().min(ours.len());
                assert!(host_bytes[..n] == ours[..n], "{path} (inline)");
                assert!(
                    host_bytes[n..].iter().chain(&ours[n..]).all(|&b| b == 0),
                    "{path} (inline tail)"
                );
            } else {
                assert!(
                    host_bytes == ours,
                    "{path}: {} vs {} bytes",
                    host_bytes.len(),
                    ours.len()
                );
            }
            *checked += 1;
        }
    }
}

#[test]
fn fixtures_match_the_kernel_mount() {
    for name in IMAGES {
        let img = unpack(name, "kernel");
        let Some(m) = kernel_mount(&img, "ro,noload") else {
            return;
        };
        let (_raw, ext) = open(&img, false).unwrap();
        let mut checked = 0;
        compare_tree(&ext, m.path(), "", &mut checked, false);
        assert!(checked > 400, "{name}");
    }
}

/// An image the kernel wrote: files copied in, unwritten extents by fallocate, a
/// deep extent tree by punching holes, a big directory hashed by the kernel.
#[test]
fn kernel_made_image_reads_like_the_kernel_mount() {
    if !is_root() {
        eprintln!("skipping: making an image with the kernel needs root");
        return;
    }
    for (tag, bs) in [("4k", "4096"), ("1k", "1024")] {
        let img = scratch_dir().join(format!("kernel-{tag}.img"));
        let _ = std::fs::remove_file(&img);
        sh(Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                bs,
                "-O",
                "inline_data,metadata_csum",
            ])
            .arg(&img)
            .arg("24M"));
        {
            let Some(m) = kernel_mount(&img, "rw") else {
                return;
            };
            let root = m.path();
            let step: usize = bs.parse().unwrap();
            let data: Vec<u8> = (0..1_200_000u32)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect();
            std::fs::write(root.join("plain"), &data).unwrap();
            // Every other block zero from block 3 on; `fallocate --dig-holes` punches
            // them all in one go, leaving hundreds of extents (depth 2 with 1 KiB
            // blocks).
            let mut holey = data.clone();
            for (i, block) in holey.chunks_mut(step).enumerate() {
                if i >= 3 && i % 2 == 1 {
                    block.fill(0);
                }
            }
            std::fs::write(root.join("punched"), &holey).unwrap();
            sh(&mut Command::new("sync"));
            sh(Command::new("fallocate")
                .arg("--dig-holes")
                .arg(root.join("punched")));
            std::fs::write(root.join("tiny"), b"tiny inline file\n").unwrap();
            sh(Command::new("fallocate")
                .args(["-l", "1M"])
                .arg(root.join("prealloc")));
            // Written head, unwritten tail beyond it, inside i_size.
            std::fs::write(root.join("mixed"), &data[..20000]).unwrap();
            sh(Command::new("fallocate")
                .args(["-o", "20480", "-l", "200000"])
                .arg(root.join("mixed")));
            sh(Command::new("truncate")
                .args(["-s", "300000"])
                .arg(root.join("mixed")));
            std::fs::create_dir(root.join("bigdir")).unwrap();
            for i in 0..600 {
                std::fs::write(
                    root.join(format!("bigdir/entry-{i:05}-{}", "y".repeat(i % 29))),
                    format!("{i}"),
                )
                .unwrap();
            }
            std::os::unix::fs::symlink("plain", root.join("link")).unwrap();
        }
        let (_raw, ext) = open(&img, false).unwrap();
        let ino = ext.lookup(b"/punched", false).unwrap();
        let depth = u16::from_le_bytes([ino.i_block()[6], ino.i_block()[7]]);
        let want_depth = if bs == "1024" { 2 } else { 1 };
        assert!(
            depth >= want_depth,
            "punched file has a tree of depth {depth}"
        );
        let mixed = ext.lookup(b"/mixed", false).unwrap();
        assert!(
            ext.extents(&mixed).unwrap().iter().any(|e| e.unwritten),
            "mixed has unwritten extents"
        );
        let Some(m) = kernel_mount(&img, "ro") else {
            return;
        };
        let mut checked = 0;
        compare_tree(&ext, m.path(), "", &mut checked, false);
        assert!(checked > 300);
        drop(m);
        if have("debugfs") {
            let out = scratch_dir().join(format!("kernel-{tag}-rdump"));
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(&out).unwrap();
            sh(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", out.display()))
                .arg(&img));
            let mut checked = 0;
            compare_tree(&ext, &out, "", &mut checked, true);
            assert!(checked > 300);
        }
    }
}

/// Each file block's device block (0 for a hole) as `debugfs bmap` reports it
/// equals what the ext block map and the extent listing say.
#[test]
fn block_map_matches_debugfs_bmap() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    for name in IMAGES {
        let img = unpack(name, "bmap");
        let (_raw, ext) = open(&img, false).unwrap();
        for path in [
            "/frag",
            "/data/sparse",
            "/data/pattern",
            "/data/far",
            "/many",
        ] {
            let inode = ext.lookup(path.as_bytes(), false).unwrap();
            let bs = u64::from(ext.block_size());
            let nblocks = inode.size.div_ceil(bs);
            // The head, and the tail of the far file (triple indirect on ext2-1k).
            let blocks: Vec<u64> = (0..nblocks.min(64))
                .chain((64..nblocks.min(1200)).step_by(5))
                .chain(nblocks.saturating_sub(8).max(1200)..nblocks)
                .collect();
            let cmds: String = blocks
                .iter()
                .map(|b| format!("bmap {path} {b}\n"))
                .collect();
            let cmdfile = scratch_dir().join(format!("{name}-bmap.cmds"));
            std::fs::write(&cmdfile, cmds).unwrap();
            let o = Command::new("debugfs")
                .arg("-f")
                .arg(&cmdfile)
                .arg(&img)
                .output()
                .unwrap();
            let theirs: Vec<u64> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.starts_with("debugfs"))
                .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(theirs.len(), blocks.len(), "{name}:{path}");
            let map = ext.block_map(&inode).unwrap();
            let extents = ext.extents(&inode).unwrap();
            for (&b, &want) in blocks.iter().zip(&theirs) {
                let e = map.map(b, 1, false).unwrap();
                let got = e.device_block().unwrap_or(0);
                assert_eq!(got, want, "{name}:{path} block {b}");
                let listed = extents
                    .iter()
                    .find(|x| x.logical <= b && b < x.logical + x.len)
                    .map_or(0, |x| x.physical + b - x.logical);
                assert_eq!(listed, want, "{name}:{path} block {b} in the extent list");
            }
        }
    }
}

#[test]
fn indirect_mappings_end_at_indirect_block_boundaries() {
    let img = unpack("ext2-1k", "boundary");
    let (_raw, ext) = open(&img, false).unwrap();
    let inode = ext.lookup(b"/data/pattern", false).unwrap();
    let map = ext.block_map(&inode).unwrap();
    // 1 KiB blocks: 12 direct pointers, then 256 per indirect block.
    let e = map.map(0, 1000, false).unwrap();
    assert!(e.len <= 12 && matches!(e.mapping, Mapping::Mapped(_)));
    let e = map.map(11, 1000, false).unwrap();
    assert_eq!(e.len, 1);
    assert!(e.boundary, "the last direct block is a boundary");
    let mut b = 12;
    while b < 268 {
        let e = map.map(b, 1000, false).unwrap();
        assert!(
            b + e.len <= 268,
            "a mapping never crosses an indirect block"
        );
        assert_eq!(
            e.boundary,
            b + e.len == 268,
            "boundary only at the block's end"
        );
        b += e.len;
    }
    // The hole and unwritten parts of a sparse extent file.
    let img = unpack("ext4-4k", "boundary");
    let (_raw, ext) = open(&img, false).unwrap();
    let inode = ext.lookup(b"/data/sparse", false).unwrap();
    let map = ext.block_map(&inode).unwrap();
    assert!(matches!(
        map.map(2, 1, false).unwrap().mapping,
        Mapping::Hole
    ));
    assert!(matches!(
        map.map(25, 1, false).unwrap().mapping,
        Mapping::Unwritten(_)
    ));
}

fn sha(path: &Path) -> u32 {
    crc(&std::fs::read(path).unwrap())
}

#[test]
fn in_place_writes_land_and_keep_the_image_clean() {
    for name in IMAGES {
        let img = unpack(name, "write");
        let before = {
            let (_raw, ext) = open(&img, false).unwrap();
            ext.lookup(b"/data/pattern", false).unwrap()
        };
        let (_raw, ext) = open(&img, true).unwrap();
        let file = ext
            .open_file(&ext.lookup(b"/data/pattern", false).unwrap())
            .unwrap();
        let mut expect = read_all(&ext, "/data/pattern");
        // Sub-block head and tail, across fs blocks, and a one-byte write.
        for (off, len) in [
            (1000usize, 5000usize),
            (3, 1),
            (70_000, 9000),
            (expect.len() - 7, 7),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + off) as u8).collect();
            assert_eq!(file.overwrite(off as u64, &data).unwrap(), len);
            expect[off..off + len].copy_from_slice(&data);
        }
        let after = file.inode();
        assert!(
            after.mtime.secs >= before.mtime.secs && after.mtime != before.mtime,
            "{name}: mtime"
        );
        assert_eq!(after.ctime, after.mtime);
        drop(file);
        drop(ext);
        drop(_raw);
        let (_raw, ext) = open(&img, false).unwrap();
        assert!(
            read_all(&ext, "/data/pattern") == expect,
            "{name}: read back"
        );
        assert_fsck_clean(&img);
        if have("debugfs") {
            let o = Command::new("debugfs")
                .args(["-R", "cat /data/pattern"])
                .arg(&img)
                .output()
                .unwrap();
            assert!(o.stdout == expect, "{name}: debugfs sees the new bytes");
        }
        if let Some(m) = kernel_mount(&img, "ro,noload") {
            assert!(
                std::fs::read(m.path().join("data/pattern")).unwrap() == expect,
                "{name}: kernel sees the new bytes"
            );
        }
    }
}

#[test]
fn writes_that_need_allocation_are_refused_and_change_nothing() {
    let img = unpack("ext4-4k", "refuse");
    let sum = sha(&img);
    let (_raw, ext) = open(&img, true).unwrap();
    let open_file = |p: &str| {
        ext.open_file(&ext.lookup(p.as_bytes(), false).unwrap())
            .unwrap()
    };
    let sparse = open_file("/data/sparse");
    // A write that would allocate is an invalid argument (EINVAL) for an in-place
    // writer: into a hole, into an unwritten extent, past the end.
    let refused = |r: dio::Result<usize>| {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
    };
    // Written head, then a hole: the whole range is checked before any byte moves.
    refused(sparse.overwrite(4096 * 2 - 10, &[1; 20]));
    refused(sparse.overwrite(4096 * 25 + 1, &[1; 20]));
    let pattern = open_file("/data/pattern");
    refused(pattern.overwrite(pattern.size() - 2, &[1; 3]));
    let e = open_file("/inline_big").overwrite(0, &[1; 3]).unwrap_err();
    assert_eq!(feature(&e), Some(Feature::InlineData), "{e}");
    drop((sparse, pattern));
    drop(ext);
    drop(_raw);
    assert_eq!(sha(&img), sum, "refused writes changed the image");
    // Read-only opens refuse writes.
    let (_raw, ext) = open(&img, false).unwrap();
    let f = ext
        .open_file(&ext.lookup(b"/data/pattern", false).unwrap())
        .unwrap();
    assert!(matches!(f.overwrite(0, b"x"), Err(Error::ReadOnly)));
}

#[test]
fn journal_needing_recovery_reads_in_memory_and_recovers_for_writing() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    let img = unpack("ext3-2k", "recover");
    sh(Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&img));
    // A writable open recovers on disk (here: nothing to replay, the flag
    // cleared), as e2fsck does.
    let wimg = scratch_dir().join("ext3-2k-recover-w.img");
    std::fs::copy(&img, &wimg).unwrap();
    {
        let (_raw, ext) = open(&wimg, true).unwrap();
        let r = ext.journal_replay().unwrap();
        assert!(r.on_disk && r.transactions == 0, "{r:?}");
    }
    assert!(open(&wimg, false).unwrap().1.journal_replay().is_none());
    assert_fsck_clean(&wimg);
    let (_raw, ext) = open(&img, false).unwrap();
    assert_eq!(read_all(&ext, "/hello.txt"), b"hello, ext\n");
    // The journal is empty (s_start 0): nothing to replay, said in a note.
    assert_eq!(ext.journal_replay().unwrap().transactions, 0);
    assert!(
        ext.notes()[0].contains("nothing to replay"),
        "{:?}",
        ext.notes()
    );
    drop((_raw, ext));
    // An external journal (no journal inode) that needs recovery is refused by
    // name: reading without it would show the image as it was before.
    sh(Command::new("debugfs")
        .args(["-w", "-R", "ssv journal_inum 0"])
        .arg(&img));
    let e = open(&img, false).unwrap_err();
    assert_eq!(feature(&e), Some(Feature::ExternalJournal), "{e}");
}

/// Byte offset of an inode on the image, from `debugfs imap`.
fn inode_offset(img: &Path, path: &str) -> u64 {
    let (block, off) = inode_location(img, path);
    let (_raw, ext) = open(img, false).unwrap();
    block * u64::from(ext.block_size()) + off
}

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read_frag(img: &Path) -> Result<(), Error> {
    let (_raw, ext) = open(img, false)?;
    let f = ext.open_file(&ext.lookup(b"/frag", false)?)?;
    let mut b = vec![0; f.size() as usize];
    f.read_at(0, &mut b).map(drop)
}

/// The feature an incompatibility error names.
fn feature(e: &Error) -> Option<Feature> {
    match e {
        Error::Incompatible(i) => Some(i.feature),
        _ => None,
    }
}

#[test]
fn hostile_images_give_corrupt_errors() {
    if !have("debugfs") {
        eprintln!("skipping: debugfs (e2fsprogs) is not installed");
        return;
    }
    // Superblock magic.
    let img = unpack("ext2-1k", "magic");
    patch(&img, 1024 + 0x38, &[0, 0]);
    let e = open(&img, false).unwrap_err();
    assert_eq!(e.corrupt_kind(), Some(CorruptKind::NoSuperblock), "{e}");
    // An unknown incompat feature is refused by name.
    let img = unpack("ext2-1k", "feature");
    patch(&img, 1024 + 0x60, &0x0001_0002u32.to_le_bytes());
    let e = open(&img, false).unwrap_err();
    assert_eq!(feature(&e), Some(Feature::UnknownFlags), "{e}");
    // An inode checksum mismatch.
    let img = unpack("ext4-4k", "icsum");
    let at = inode_offset(&img, "/hello.txt");
    patch(&img, at + 0x10, b"\x01\x02");
    let e = {
        let (_raw, ext) = open(&img, false).unwrap();
        ext.lookup(b"/hello.txt", false).unwrap_err()
    };
    assert_eq!(e.corrupt_kind(), Some(CorruptKind::Inode), "{e}");
    // Extent trees (ext4-2k has no checksums, so edits reach the tree checks):
    // an absurd depth, and two index entries naming the same block.
    let img = unpack("ext4-2k", "depth");
    let at = inode_offset(&img, "/frag") + 0x28;
    patch(&img, at + 6, &9u16.to_le_bytes());
    let e = read_frag(&img).unwrap_err();
    assert_eq!(e.corrupt_kind(), Some(CorruptKind::ExtentTree), "{e}");
    let img = unpack("ext4-2k", "cycle");
    let at = inode_offset(&img, "/frag") + 0x28;
    let raw = std::fs::read(&img).unwrap();
    let entries = u16::from_le_bytes([raw[at as usize + 2], raw[at as usize + 3]]);
    assert!(entries >= 2, "/frag's root has {entries} entries");
    let first_leaf = raw[at as usize + 12 + 4..at as usize + 12 + 8].to_vec();
    patch(&img, at + 24 + 4, &first_leaf);
    let e = read_frag(&img).unwrap_err();
    assert_eq!(e.corrupt_kind(), Some(CorruptKind::ExtentTree), "{e}");
    // A block pointer past the end of the file system (ext2, indirect).
    let img = unpack("ext2-1k", "pointer");
    let at = inode_offset(&img, "/hello.txt") + 0x28;
    patch(&img, at, &0x00ff_ffffu32.to_le_bytes());
    let (_raw, ext) = open(&img, false).unwrap();
    let f = ext
        .open_file(&ext.lookup(b"/hello.txt", false).unwrap())
        .unwrap();
    let e = f.read_at(0, &mut [0; 11]).unwrap_err();
    assert!(e.corrupt_kind().is_some(), "{e}");
}

#[test]
fn a_truncated_image_is_corrupt_not_a_read_past_its_end() {
    let img = unpack("ext4-1k", "short");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(2 << 20).unwrap();
    let e = open(&img, false).unwrap_err();
    assert!(e.corrupt_kind().is_some(), "{e}");
}

/// Deterministic file contents for the journal tests.
fn jdata(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k * 31 + seed * 7 + k / 251) as u8)
        .collect()
}

/// Four 1 KiB pieces each starting with the jbd2 magic: in a data=journal
/// journal, their blocks are logged escaped (the magic stored as zeros).
fn magic_file() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..4 {
        let mut b = jdata(900 + i, 4096);
        b[..4].copy_from_slice(&[0xC0, 0x3B, 0x39, 0x98]);
        out.extend_from_slice(&b);
    }
    out
}

fn fsync(p: &Path) {
    std::fs::File::open(p).unwrap().sync_all().unwrap();
}

/// An image whose journal needs recovery, made by the kernel: a tree written and
/// unmounted cleanly, then changed under mount options `opts` (each change
/// fsync'd, so the journal holds committed transactions that the kernel has not
/// yet written in place) and copied while still mounted. `None` (with the reason
/// printed) without root or loop devices.
fn needs_recovery_image(tag: &str, opts: &str, mkfs: &[&str]) -> Option<PathBuf> {
    if !is_root() || !have("mke2fs") {
        eprintln!("skipping: making an image with the kernel needs root and e2fsprogs");
        return None;
    }
    let img = scratch_dir().join(format!("recover-{tag}.img"));
    let _ = std::fs::remove_file(&img);
    sh(Command::new("mke2fs")
        .args(["-q", "-F"])
        .args(mkfs)
        .arg(&img)
        .arg("32M"));
    {
        let m = kernel_mount(&img, "rw")?;
        let r = m.path();
        for d in ["keep", "gone"] {
            std::fs::create_dir(r.join(d)).unwrap();
        }
        for i in 0..40 {
            std::fs::write(r.join(format!("keep/k{i}")), jdata(i, 100 + i * 13)).unwrap();
            std::fs::write(r.join(format!("gone/g{i}")), jdata(i + 50, 300)).unwrap();
        }
        std::fs::write(r.join("big"), jdata(1, 300_000)).unwrap();
        std::fs::write(r.join("edit"), b"before\n").unwrap();
    }
    settle_writeback();
    let m = kernel_mount(&img, &format!("rw,{opts}"))?;
    let r = m.path();
    std::fs::remove_dir_all(r.join("gone")).unwrap();
    std::fs::rename(r.join("keep/k1"), r.join("renamed")).unwrap();
    std::fs::create_dir(r.join("new")).unwrap();
    for i in 0..60 {
        let p = r.join(format!("new/n{i}"));
        std::fs::write(&p, jdata(i + 100, i * 97 + 1)).unwrap();
        fsync(&p);
    }
    let mut big = std::fs::OpenOptions::new()
        .append(true)
        .open(r.join("big"))
        .unwrap();
    std::io::Write::write_all(&mut big, &jdata(2, 100_000)).unwrap();
    big.sync_all().unwrap();
    drop(big);
    std::fs::write(r.join("edit"), b"after\n").unwrap();
    sh(Command::new("truncate")
        .args(["-s", "1000000"])
        .arg(r.join("edit")));
    fsync(&r.join("edit"));
    std::fs::write(r.join("magic"), magic_file()).unwrap();
    fsync(&r.join("magic"));
    for d in ["new", "keep", ""] {
        fsync(&r.join(d));
    }
    // Without fsync: an overwrite in place and a new file. With data=journal the
    // next commit (commit=1) logs their data, which reaches its place only at
    // writeback; in ordered mode the overwrite stays in the page cache and the
    // new file's blocks are not even allocated yet.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(r.join("big"))
            .unwrap();
        f.write_all_at(&jdata(3, 10_000), 5000).unwrap();
    }
    std::fs::write(r.join("late"), jdata(4, 20_000)).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Committed, not yet checkpointed: the kernel writes metadata in place only
    // after 30 s or when the journal fills.
    let copy = scratch_dir().join(format!("recover-{tag}-copy.img"));
    copy_at_rest(&img, &copy);
    drop(m);
    let raw = std::fs::read(&copy).unwrap();
    let incompat = u32::from_le_bytes(raw[1024 + 0x60..1024 + 0x64].try_into().unwrap());
    assert!(
        incompat & dio::ext::incompat::RECOVER != 0,
        "{tag}: the copy does not need recovery"
    );
    Some(copy)
}

/// dio reads an image whose journal needs recovery as the kernel does after
/// replaying it (the oracle: a rw mount of a copy, which replays), without
/// changing a byte of it (the caller checked that the kernel's `noload` view,
/// without replay, differs: the journal carried the changes).
fn check_replay_against_kernel(img: &Path, tag: &str, escaped: bool) {
    let before = std::fs::read(img).unwrap();
    let (raw, ext) = open(img, false).unwrap();
    let r = ext.journal_replay().expect("a replay");
    assert!(r.transactions > 0 && r.blocks > 0, "{tag}: {r:?}");
    let notes = ext.notes();
    assert!(
        notes[0].contains("needs recovery") && notes[0].contains("replayed in memory"),
        "{tag}: {notes:?}"
    );
    let magic = ext
        .open_file(&ext.lookup(b"/magic", false).unwrap())
        .unwrap();
    assert_eq!(magic.direct().is_none(), escaped, "{tag}: escaped copies");
    let mut buf = vec![0u8; 16384];
    assert_eq!(magic.read_at(0, &mut buf).unwrap(), 16384);
    assert!(buf == magic_file(), "{tag}: /magic");
    // Odd ranges straddling the restored magic bytes.
    let mut small = [0u8; 7];
    assert_eq!(magic.read_at(4096 - 3, &mut small).unwrap(), 7);
    assert_eq!(small[..], magic_file()[4093..4100], "{tag}: /magic at 4093");
    drop(magic);
    // The kernel after replay.
    let kimg = scratch_dir().join(format!("recover-{tag}-kernel.img"));
    std::fs::copy(img, &kimg).unwrap();
    let Some(m) = kernel_mount(&kimg, "rw") else {
        return;
    };
    let mut checked = 0;
    compare_tree(&ext, m.path(), "", &mut checked, false);
    assert!(checked > 100, "{tag}: {checked} files");
    assert_eq!(
        std::fs::read(m.path().join("edit")).unwrap().len(),
        1_000_000,
        "{tag}"
    );
    drop(m);
    drop((ext, raw));
    assert!(
        std::fs::read(img).unwrap() == before,
        "{tag}: dio changed the image"
    );
}

/// Whether the changes are only in the journal: the kernel without replay
/// (`noload`) sees the old tree, and with data=journal the old data of /big. A
/// `sync` elsewhere on the machine (other tests run it) can write them in place
/// before the copy is taken; then the image proves nothing.
fn changes_only_in_journal(img: &Path, tag: &str, data_journal: bool) -> bool {
    let nimg = scratch_dir().join(format!("recover-{tag}-noload.img"));
    std::fs::copy(img, &nimg).unwrap();
    let Some(m) = kernel_mount(&nimg, "ro,noload") else {
        return false;
    };
    let mut new_big = jdata(1, 300_000);
    new_big.extend_from_slice(&jdata(2, 100_000));
    new_big[5000..15000].copy_from_slice(&jdata(3, 10_000));
    !m.path().join("renamed").exists()
        && m.path().join("gone").exists()
        && (!data_journal || std::fs::read(m.path().join("big")).unwrap() != new_big)
}

#[test]
fn journal_is_replayed_in_memory_like_the_kernel() {
    for (tag, opts, mkfs) in [
        // Ordered data, csum v3 journal, 4 KiB blocks.
        ("ordered-4k", "commit=1", &["-t", "ext4"][..]),
        // Data in the journal too, 1 KiB blocks: file data reads follow the
        // journal copies; blocks beginning with the magic are logged escaped.
        (
            "journal-1k",
            "commit=1,data=journal",
            &["-t", "ext4", "-b", "1024"][..],
        ),
        // ext3: indirect blocks, a journal without checksums.
        ("ext3-ordered", "commit=1", &["-t", "ext3", "-I", "256"][..]),
    ] {
        let data_journal = tag == "journal-1k";
        let mut tries = 0;
        let img = loop {
            let Some(img) = needs_recovery_image(tag, opts, mkfs) else {
                return;
            };
            if changes_only_in_journal(&img, tag, data_journal) {
                break img;
            }
            tries += 1;
            assert!(tries < 4, "{tag}: the changes never stayed in the journal");
            eprintln!("{tag}: the kernel wrote the changes in place before the copy: again");
        };
        check_replay_against_kernel(&img, tag, data_journal);
    }
}

/// Big-endian u32 at byte `at` of a file.
fn be32_at(img: &Path, at: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u32::from_be_bytes(b)
}

/// Byte offset of journal block `j` (through `debugfs bmap` of the journal inode).
fn journal_block(img: &Path, j: u64, bs: u64) -> u64 {
    let o = Command::new("debugfs")
        .args(["-R", &format!("bmap <8> {j}")])
        .arg(img)
        .output()
        .unwrap();
    let b: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    b * bs
}

#[test]
fn corrupt_journals_are_corrupt_errors_not_panics() {
    let mut tries = 0;
    let base = loop {
        let Some(img) = needs_recovery_image("hostile", "commit=1", &["-t", "ext4", "-b", "1024"])
        else {
            return;
        };
        if changes_only_in_journal(&img, "hostile", false) {
            break img;
        }
        tries += 1;
        assert!(tries < 4, "the changes never stayed in the journal");
    };
    let bs = 1024;
    let variant = |name: &str| {
        let p = scratch_dir().join(format!("recover-hostile-v-{name}.img"));
        std::fs::copy(&base, &p).unwrap();
        p
    };
    let jsb = journal_block(&base, 0, bs);
    let start = u64::from(be32_at(&base, jsb + 0x1C));
    assert!(start > 0);
    let open_err = |p: &Path| match open(p, false) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    };
    let journal = Some(CorruptKind::Journal);
    // The journal superblock, a descriptor and a logged copy: checksums.
    let img = variant("jsb");
    patch(&img, jsb + 0x48, b"\x7f");
    let e = open_err(&img);
    assert_eq!(e.corrupt_kind(), journal, "{e}");
    let kind = |j: u64| be32_at(&base, journal_block(&base, j, bs) + 4);
    let desc = (start..start + 100).find(|&j| kind(j) == 1).unwrap();
    let img = variant("desc");
    patch(&img, journal_block(&base, desc, bs) + 200, b"\x55\xaa");
    let e = open_err(&img);
    assert_eq!(e.corrupt_kind(), journal, "{e}");
    let img = variant("revoke");
    patch(&img, journal_block(&base, start, bs) + 1000, b"\x55\xaa");
    let e = open_err(&img);
    assert_eq!(e.corrupt_kind(), journal, "{e}");
    let img = variant("copy");
    patch(&img, journal_block(&base, desc + 1, bs) + 10, b"\x55\xaa");
    let e = open_err(&img);
    assert_eq!(e.corrupt_kind(), journal, "{e}");
    // A bad commit block ends the log there (as the kernel does): the first
    // transaction's commit, so nothing is replayed, with a note.
    let j = (start..start + 100).find(|&j| kind(j) == 2).unwrap();
    let img = variant("commit");
    patch(&img, journal_block(&base, j, bs) + 40, b"\x01");
    let (_raw, ext) = open(&img, false).unwrap();
    assert_eq!(ext.journal_replay().unwrap().transactions, 0);
    assert!(
        ext.notes().iter().any(|n| n.contains("bad commit block")),
        "{:?}",
        ext.notes()
    );
    drop((_raw, ext));
    // Random bytes over the live log: data or an error, never a panic or a hang.
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    let mut rnd = move || rng.next_u64();
    let img = variant("fuzz");
    let pristine = std::fs::read(&img).unwrap();
    let log: Vec<u64> = (start..start + 40)
        .map(|j| journal_block(&base, j, bs))
        .collect();
    for _ in 0..150 {
        std::fs::write(&img, &pristine).unwrap();
        for _ in 0..1 + rnd() % 4 {
            let at = log[(rnd() % log.len() as u64) as usize] + rnd() % 48;
            patch(&img, at, &[rnd() as u8]);
        }
        if let Ok((_raw, ext)) = open(&img, false) {
            if let Ok(root) = ext.lookup(b"/", false) {
                let _ = ext.read_dir(&root);
            }
        }
    }
}
