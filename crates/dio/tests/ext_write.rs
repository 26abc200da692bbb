//! Allocating writes on ext4 images: a randomized workload (create, append, writes
//! at random offsets, truncate down and up, mkdir, rm, rmdir, symlinks) against a
//! model, checked by `e2fsck -fn` and by the kernel's loop mount (as root), over a
//! feature matrix; an extent tree of depth 2 checked by the kernel; ENOSPC with
//! nothing half-written; refusals (bigalloc).
//!
//! Directories: inline-data directories (made, filled, turned into blocks,
//! emptied; the kernel's own too), ext2 directories past 12 blocks (linear and
//! htree, through indirect blocks), dio-made htrees with every hash version and
//! signedness, a full two-level htree refused with ENOSPC then a third level
//! with large_dir, dir_nlink past 65,000 subdirectories.
//!
//! `DIO_EXT_SOAK_SECS=N` runs the workload for N seconds per configuration;
//! `DIO_EXT_BIG=1` makes the big-directory tests full size (50,000 names,
//! 65,001 subdirectories).

use dio_testkit::{
    assert_fsck_clean, debugfs, debugfs_w, e2fsck, have, is_root, kernel_mount, mke2fs_filled,
    need, Mount,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use dio::ext::{Attrs, Ext};
use dio::{Error, RawFile, RawOptions};

fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-write");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkfs(name: &str, args: &[&str], size_mib: u64) -> PathBuf {
    let img = scratch().join(format!("{name}.img"));
    // Free space full of a pattern (and no discard by mke2fs): a byte of it
    // showing through a file is stale data.
    mke2fs_filled(&img, args, size_mib, 0xA5);
    img
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

fn fsck(img: &Path) {
    assert_fsck_clean(img);
}

/// A tiny deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let s = self.next();
        let mut x = s | 1;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x as u8);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
    Link(Vec<u8>),
}

type Model = BTreeMap<String, Node>;

fn dirs(m: &Model) -> Vec<String> {
    let mut v = vec![String::new()];
    v.extend(
        m.iter()
            .filter(|(_, n)| **n == Node::Dir)
            .map(|(k, _)| k.clone()),
    );
    v
}

fn files(m: &Model) -> Vec<String> {
    m.iter()
        .filter(|(_, n)| matches!(n, Node::File(_)))
        .map(|(k, _)| k.clone())
        .collect()
}

fn write_model(buf: &mut Vec<u8>, off: usize, data: &[u8]) {
    if buf.len() < off + data.len() {
        buf.resize(off + data.len(), 0);
    }
    buf[off..off + data.len()].copy_from_slice(data);
}

/// How a workload names things.
#[derive(Clone, Copy, Default)]
struct Shape {
    /// Names of 100 to 255 bytes (directories grow many blocks).
    long_names: bool,
    /// Most new names in the root directory (one directory grows large).
    flat: bool,
    /// The image's size in MiB (0: 48).
    mib: u64,
}

/// One random step on `ext` and the model.
fn step(ext: &Ext, m: &mut Model, rng: &mut Rng, counter: &mut u64, max_file: u64) {
    step_shaped(ext, m, rng, counter, max_file, Shape::default())
}

fn step_shaped(
    ext: &Ext,
    m: &mut Model,
    rng: &mut Rng,
    counter: &mut u64,
    max_file: u64,
    shape: Shape,
) {
    let choice = rng.below(100);
    let fresh_name = |counter: &mut u64, rng: &mut Rng| {
        *counter += 1;
        let len = if shape.long_names {
            100 + rng.below(156) as usize
        } else {
            1 + rng.below(40) as usize
        };
        let mut n = format!("n{counter}-");
        while n.len() < len {
            n.push((b'a' + rng.below(26) as u8) as char);
        }
        n
    };
    let pick_dir = |m: &Model, rng: &mut Rng| {
        let ds = dirs(m);
        if shape.flat && rng.below(4) != 0 {
            return String::new();
        }
        ds[rng.below(ds.len() as u64) as usize].clone()
    };
    let all_files = files(m);
    // A flat workload grows: half of its removals are creates instead.
    let choice = if shape.flat && choice >= 75 && rng.below(2) == 0 {
        0
    } else {
        choice
    };
    match choice {
        0..=14 => {
            // create (maybe with data)
            let d = &pick_dir(m, rng);
            let p = format!("{d}/{}", fresh_name(counter, rng));
            let inode = ext.create(p.as_bytes(), &Attrs::new()).unwrap();
            let n = rng.below(max_file / 2) as usize;
            let data = rng.bytes(n);
            if n > 0 {
                let w = ext.writer(&inode).unwrap();
                w.write_at(0, &data).unwrap();
                w.sync().unwrap();
            }
            m.insert(p, Node::File(data));
        }
        15..=39 if !all_files.is_empty() => {
            // write: append or at a random offset (maybe past EOF: a hole)
            let p = &all_files[rng.below(all_files.len() as u64) as usize];
            let Some(Node::File(buf)) = m.get_mut(p) else {
                unreachable!()
            };
            let off = if rng.below(2) == 0 {
                buf.len() as u64
            } else {
                rng.below(max_file)
            };
            let len = rng.below(max_file / 4).min(max_file - off.min(max_file)) as usize + 1;
            let data = rng.bytes(len);
            let inode = ext.lookup(p.as_bytes(), false).unwrap();
            let w = ext.writer(&inode).unwrap();
            assert_eq!(w.write_at(off, &data).unwrap(), len);
            w.sync().unwrap();
            write_model(buf, off as usize, &data);
        }
        40..=54 if !all_files.is_empty() => {
            // truncate down or up
            let p = &all_files[rng.below(all_files.len() as u64) as usize];
            let Some(Node::File(buf)) = m.get_mut(p) else {
                unreachable!()
            };
            let size = rng.below(max_file) as usize;
            let inode = ext.lookup(p.as_bytes(), false).unwrap();
            let w = ext.writer(&inode).unwrap();
            w.set_len(size as u64).unwrap();
            w.sync().unwrap();
            buf.resize(size, 0);
        }
        55..=64 => {
            let d = &pick_dir(m, rng);
            let p = format!("{d}/{}", fresh_name(counter, rng));
            ext.mkdir(p.as_bytes(), &Attrs::new()).unwrap();
            m.insert(p, Node::Dir);
        }
        65..=74 => {
            let d = &pick_dir(m, rng);
            let p = format!("{d}/{}", fresh_name(counter, rng));
            let tlen = if rng.below(2) == 0 {
                1 + rng.below(50)
            } else {
                60 + rng.below(300)
            };
            let target: Vec<u8> = (0..tlen).map(|i| b'a' + (i % 26) as u8).collect();
            ext.symlink(&target, p.as_bytes(), &Attrs::new()).unwrap();
            m.insert(p, Node::Link(target));
        }
        75..=89 => {
            // rm a file or symlink
            let cands: Vec<String> = m
                .iter()
                .filter(|(_, n)| !matches!(n, Node::Dir))
                .map(|(k, _)| k.clone())
                .collect();
            if cands.is_empty() {
                return;
            }
            let p = &cands[rng.below(cands.len() as u64) as usize];
            ext.remove(p.as_bytes(), false).unwrap();
            m.remove(p);
        }
        90..=99 => {
            // rmdir an empty directory (or see NotEmpty)
            let ds: Vec<String> = dirs(m).into_iter().filter(|d| !d.is_empty()).collect();
            if ds.is_empty() {
                return;
            }
            let d = &ds[rng.below(ds.len() as u64) as usize];
            let prefix = format!("{d}/");
            let empty = !m.keys().any(|k| k.starts_with(&prefix));
            match ext.remove(d.as_bytes(), true) {
                Ok(()) => {
                    assert!(empty, "{d} removed but not empty");
                    m.remove(d);
                }
                Err(Error::Path(e)) => {
                    assert!(!empty, "{d}: {e}");
                    assert_eq!(e.kind, dio::PathErrorKind::NotEmpty);
                }
                Err(e) => panic!("rmdir {d}: {e}"),
            }
        }
        _ => {}
    }
}

/// Check `ext` (a fresh open) shows exactly the model.
fn check_dio(img: &Path, m: &Model) {
    let (_raw, ext) = open(img);
    for (p, n) in m {
        let inode = ext.lookup(p.as_bytes(), false).unwrap();
        match n {
            Node::File(data) => {
                let f = ext.open_file(&inode).unwrap();
                assert_eq!(f.size(), data.len() as u64, "{p}");
                let mut buf = vec![0u8; data.len()];
                f.read_at(0, &mut buf).unwrap();
                assert!(buf == *data, "{p}: bytes differ");
            }
            Node::Dir => assert_eq!(inode.file_type(), dio::ext::FileType::Directory),
            Node::Link(t) => assert_eq!(&ext.read_link(&inode).unwrap(), t, "{p}"),
        }
    }
}

fn mount(img: &Path) -> Option<Mount> {
    kernel_mount(img, "ro")
}

/// A read-write kernel mount for the kernel to make what a test then changes
/// (the test has checked it is root): a failure is the test's.
fn mount_rw(img: &Path) -> Mount {
    Mount::new(img, "rw").unwrap_or_else(|e| panic!("mount {}: {e}", img.display()))
}

/// Walk a kernel mount into a model.
fn walk(root: &Path, rel: &str, out: &mut Model) {
    for e in std::fs::read_dir(root.join(rel.trim_start_matches('/'))).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if rel.is_empty() && name == "lost+found" {
            continue;
        }
        let p = format!("{rel}/{name}");
        let ft = e.file_type().unwrap();
        let full = root.join(p.trim_start_matches('/'));
        if ft.is_dir() {
            out.insert(p.clone(), Node::Dir);
            walk(root, &p, out);
        } else if ft.is_symlink() {
            use std::os::unix::ffi::OsStrExt;
            let t = std::fs::read_link(&full).unwrap();
            out.insert(p, Node::Link(t.as_os_str().as_bytes().to_vec()));
        } else {
            out.insert(p, Node::File(std::fs::read(&full).unwrap()));
        }
    }
}

fn check_kernel(img: &Path, m: &Model) {
    let Some(mnt) = mount(img) else { return };
    let mut seen = Model::new();
    walk(mnt.path(), "", &mut seen);
    drop(mnt);
    assert_eq!(seen.len(), m.len(), "the kernel sees another tree");
    for (p, n) in m {
        assert!(
            seen.get(p) == Some(n),
            "{p}: the kernel sees it differently"
        );
    }
}

fn workload(name: &str, args: &[&str], ops: u64, seed: u64, max_file: u64) {
    workload_sized(name, args, ops, seed, max_file, 48);
}

/// The workload on an image of `mib` MiB; a passing run deletes the image (a
/// failing one keeps it for a look).
fn workload_sized(name: &str, args: &[&str], ops: u64, seed: u64, max_file: u64, mib: u64) {
    let shape = Shape {
        mib,
        ..Shape::default()
    };
    if let Some(img) = workload_shaped(name, args, ops, 1, seed, max_file, shape) {
        let _ = std::fs::remove_file(&img);
    }
}

/// The workload that grows one wide directory: 100 operations a round, at least
/// `rounds` rounds, long names mostly in the root, files of up to 20,000 bytes.
fn wide_dir_workload(name: &str, args: &[&str], rounds: u64, seed: u64) -> Option<PathBuf> {
    let shape = Shape {
        long_names: true,
        flat: true,
        mib: 0,
    };
    workload_shaped(name, args, 100, rounds, seed, 20_000, shape)
}

/// The workload in `rounds` rounds of `ops` operations (more while a soak
/// lasts), each round checked by e2fsck, dio and (with `rounds` > 1) the
/// kernel; the image is left for more checks (None when skipped).
fn workload_shaped(
    name: &str,
    args: &[&str],
    ops: u64,
    rounds_min: u64,
    seed: u64,
    max_file: u64,
    shape: Shape,
) -> Option<PathBuf> {
    if !need(&["mke2fs", "e2fsck"]) {
        return None;
    }
    let img = mkfs(name, args, if shape.mib == 0 { 48 } else { shape.mib });
    let mut m = Model::new();
    let mut rng = Rng(seed);
    let mut counter = 0;
    let soak: u64 = std::env::var("DIO_EXT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let t0 = std::time::Instant::now();
    let mut done = 0u64;
    let mut rounds = 0u64;
    loop {
        {
            let (_raw, ext) = open(&img);
            for _ in 0..ops {
                step_shaped(&ext, &mut m, &mut rng, &mut counter, max_file, shape);
                done += 1;
            }
        }
        fsck(&img);
        check_dio(&img, &m);
        rounds += 1;
        if rounds_min > 1 {
            check_kernel(&img, &m);
        }
        if rounds >= rounds_min && t0.elapsed().as_secs() >= soak {
            break;
        }
    }
    if rounds_min <= 1 {
        check_kernel(&img, &m);
    }
    eprintln!(
        "{name}: {done} operations in {rounds} round(s), {} names, {:.1} s",
        m.len(),
        t0.elapsed().as_secs_f64()
    );
    Some(img)
}

const NOJ: &str = "^has_journal";

#[test]
fn workload_ext4_4k_metadata_csum_64bit_flex_bg() {
    workload(
        "w-4k-csum",
        &["-t", "ext4", "-b", "4096", "-O", NOJ],
        300,
        1,
        200_000,
    );
}

#[test]
fn workload_ext4_1k_gdt_csum() {
    workload(
        "w-1k-gdt",
        &[
            "-t",
            "ext4",
            "-b",
            "1024",
            "-O",
            &format!("{NOJ},^metadata_csum,uninit_bg"),
        ],
        300,
        2,
        100_000,
    );
}

#[test]
fn workload_ext4_2k_no_64bit_no_flex_bg() {
    workload(
        "w-2k-plain",
        &[
            "-t",
            "ext4",
            "-b",
            "2048",
            "-O",
            &format!("{NOJ},^64bit,^flex_bg,^metadata_csum"),
        ],
        300,
        3,
        100_000,
    );
}

#[test]
fn extent_tree_reaches_depth_2_and_the_kernel_reads_it() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    // 1 KiB blocks: 84 extents a leaf, 4 leaves under the inode at depth 1.
    let img = mkfs("depth2", &["-t", "ext4", "-b", "1024", "-O", NOJ], 16);
    let mut model = Vec::new();
    let n = 400u64;
    {
        let (_raw, ext) = open(&img);
        let inode = ext.create(b"/frag", &Attrs::new()).unwrap();
        let w = ext.writer(&inode).unwrap();
        // Every other block, with a sub-block write in each: 400 one-block
        // extents, each partly written (the rest must read as zeros).
        for i in 0..n {
            let data = vec![(i % 251) as u8 + 1; 300];
            let off = 2 * i * 1024 + 100;
            w.write_at(off, &data).unwrap();
            write_model(&mut model, off as usize, &data);
        }
        w.sync().unwrap();
        let depth = u16::from_le_bytes([w.inode().i_block()[6], w.inode().i_block()[7]]);
        assert_eq!(depth, 2, "the tree should have grown to depth 2");
        assert_eq!(ext.extents(&w.inode()).unwrap().len() as u64, n);
    }
    fsck(&img);
    let mut m = Model::new();
    m.insert("/frag".into(), Node::File(model.clone()));
    check_dio(&img, &m);
    check_kernel(&img, &m);
    // Fill the holes: the extents merge back and the tree shrinks.
    {
        let (_raw, ext) = open(&img);
        let inode = ext.lookup(b"/frag", false).unwrap();
        let w = ext.writer(&inode).unwrap();
        for i in 0..n {
            let data = vec![0x5Au8; 1024];
            let off = (2 * i + 1) * 1024;
            w.write_at(off, &data).unwrap();
            write_model(&mut model, off as usize, &data);
        }
        w.set_len(model.len() as u64 - 5000).unwrap();
        model.truncate(model.len() - 5000);
        w.sync().unwrap();
    }
    fsck(&img);
    m.insert("/frag".into(), Node::File(model));
    check_dio(&img, &m);
    check_kernel(&img, &m);
}

/// Free blocks and inodes as e2fsck counts them... as the superblock says.
fn free_counts(img: &Path) -> (u64, u32) {
    let (_raw, ext) = open(img);
    ext.free_counts()
}

#[test]
fn enospc_leaves_nothing_half_written() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    let img = mkfs("enospc", &["-t", "ext4", "-b", "4096", "-O", NOJ], 8);
    {
        let (_raw, ext) = open(&img);
        let inode = ext.create(b"/keep", &Attrs::new()).unwrap();
        let w = ext.writer(&inode).unwrap();
        w.write_at(0, b"precious").unwrap();
        w.sync().unwrap();
    }
    let before = free_counts(&img);
    let big = vec![0x42u8; 16 << 20];
    {
        let (_raw, ext) = open(&img);
        // A new file and a replacement of an existing one: both refused whole.
        for path in [&b"/new"[..], b"/keep"] {
            let r = ext.put_file(path, &Attrs::new(), |w| {
                w.allocate(0, big.len() as u64)?;
                w.write_at(0, &big).map(|_| ())
            });
            match r {
                Err(Error::NoSpace(_)) => {}
                other => panic!("expected ENOSPC, got {other:?}"),
            }
        }
        // Without preallocation the engine meets ENOSPC mid-write: still nothing.
        // (write_at returns a short count there, as write(2) does.)
        let r = ext.put_file(b"/new2", &Attrs::new(), |w| {
            let n = w.write_at(0, &big)?;
            assert!(n < big.len());
            Err(Error::NoSpace(format!("wrote {n} bytes")))
        });
        assert!(matches!(r, Err(Error::NoSpace(_))), "{r:?}");
        assert!(ext.lookup(b"/new", false).is_err());
        assert!(ext.lookup(b"/new2", false).is_err());
    }
    assert_eq!(free_counts(&img), before, "blocks or inodes leaked");
    fsck(&img);
    let mut m = Model::new();
    m.insert("/keep".into(), Node::File(b"precious".to_vec()));
    check_dio(&img, &m);
    check_kernel(&img, &m);
}

/// A write that meets ENOSPC part way through a file mapped by indirect blocks
/// (1 KiB blocks: a table maps 256 KiB, so the write takes several runs before
/// the space runs out) fails, and gives every block it took back: the free
/// counts are as before, e2fsck finds nothing, and the file is as it was.
#[test]
fn failed_indirect_write_gives_its_blocks_back() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    let img = mkfs("enospc-ind", &["-t", "ext2", "-b", "1024"], 8);
    {
        let (_raw, ext) = open(&img);
        let inode = ext.create(b"/f", &Attrs::new()).unwrap();
        let w = ext.writer(&inode).unwrap();
        w.write_at(0, b"first").unwrap();
        w.sync().unwrap();
    }
    let before = free_counts(&img);
    {
        let (_raw, ext) = open(&img);
        let inode = ext.lookup(b"/f", false).unwrap();
        let w = ext.writer(&inode).unwrap();
        // Aligned (offset, length and memory): the engine's own walk meets the
        // map's ENOSPC and fails the call (an unaligned write would end short
        // at a piece boundary instead).
        let mut data = dio::AlignedBuf::new(16 << 20, 4096);
        data.fill(7);
        let r = w.write_at(1024, &data);
        assert!(matches!(r, Err(Error::NoSpace(_))), "{r:?}");
        assert_eq!(w.size(), 5);
    }
    assert_eq!(free_counts(&img), before, "blocks leaked");
    fsck(&img);
    let mut m = Model::new();
    m.insert("/f".into(), Node::File(b"first".to_vec()));
    check_dio(&img, &m);
    check_kernel(&img, &m);
}

#[test]
fn workload_ext4_4k_with_journal() {
    // Every operation is one jbd2 transaction (the journal writer), checkpointed.
    workload(
        "w-4k-journal",
        &["-t", "ext4", "-b", "4096"],
        200,
        7,
        150_000,
    );
}

#[test]
fn workload_ext3_1k_with_journal() {
    workload(
        "w-ext3-journal",
        &["-t", "ext3", "-b", "1024"],
        150,
        8,
        150_000,
    );
}

#[test]
fn htree_directories_take_names_split_leaves_and_lose_names() {
    if !have("mke2fs") || !have("e2fsck") || !is_root() {
        eprintln!("skipped: needs mke2fs, e2fsck and root (the kernel builds the htree)");
        return;
    }
    for (tag, opts) in [
        ("csum", NOJ.to_string()),
        ("plain", format!("{NOJ},^metadata_csum")),
    ] {
        let img = mkfs(
            &format!("htree-{tag}"),
            &["-t", "ext4", "-b", "1024", "-O", &opts],
            16,
        );
        let mut names: std::collections::BTreeSet<String> = Default::default();
        {
            let m = mount_rw(&img);
            let dir = m.path().to_path_buf();
            std::fs::create_dir(dir.join("big")).unwrap();
            for i in 0..300 {
                let n = format!("file-with-a-long-name-{i}");
                std::fs::write(dir.join("big").join(&n), b"x").unwrap();
                names.insert(n);
            }
            drop(m);
        }
        let (_raw, ext) = open(&img);
        let big = ext.lookup(b"/big", false).unwrap();
        assert!(
            big.has_flag(dio::ext::inode_flags::INDEX),
            "the kernel made no htree"
        );
        let (mut added, mut full) = (0, 0);
        for i in 0..250 {
            let n = format!("new-{i}-{}", "y".repeat(i % 30));
            match ext.create(format!("/big/{n}").as_bytes(), &Attrs::new()) {
                Ok(_) => {
                    added += 1;
                    names.insert(n);
                }
                Err(Error::Incompatible(e)) => {
                    assert_eq!(e.feature, dio::Feature::HtreeInsert);
                    full += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        // Full leaves split while the index block has room: here it always has.
        assert_eq!(full, 0, "names refused");
        for i in (0..300).step_by(3) {
            let n = format!("file-with-a-long-name-{i}");
            ext.remove(format!("/big/{n}").as_bytes(), false).unwrap();
            names.remove(&n);
        }
        // Every name is found through the index.
        for n in &names {
            ext.lookup(format!("/big/{n}").as_bytes(), false).unwrap();
        }
        drop(ext);
        eprintln!("htree-{tag}: {added} names added, {full} refused (full leaf)");
        fsck(&img);
        let Some(mnt) = mount(&img) else { continue };
        let seen: std::collections::BTreeSet<String> = std::fs::read_dir(mnt.path().join("big"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        for n in &names {
            // A lookup by name goes through the kernel's own hash index.
            assert!(
                mnt.path().join("big").join(n).symlink_metadata().is_ok(),
                "{n}"
            );
        }
        drop(mnt);
        assert_eq!(seen, names);
    }
}

#[test]
fn workload_ext2_1k_indirect_blocks() {
    // 1 KiB blocks: files past 268 KiB reach the double-indirect block.
    workload("w-ext2-1k", &["-t", "ext2", "-b", "1024"], 250, 4, 400_000);
}

#[test]
fn workload_ext3_4k_without_journal() {
    workload(
        "w-ext3-4k",
        &["-t", "ext3", "-b", "4096", "-O", NOJ],
        250,
        5,
        200_000,
    );
}

/// Directories of `img` (a fresh dio open) by how they are kept: (inline,
/// htree, linear past 12 blocks).
fn dir_kinds(img: &Path) -> (usize, usize, usize) {
    let (_raw, ext) = open(img);
    let mut todo = vec![b"/".to_vec()];
    let (mut inline, mut htree, mut big) = (0, 0, 0);
    while let Some(p) = todo.pop() {
        let d = ext.lookup(&p, false).unwrap();
        if d.has_flag(dio::ext::inode_flags::INLINE_DATA) {
            inline += 1;
        } else if d.has_flag(dio::ext::inode_flags::INDEX) {
            htree += 1;
        } else if d.size > 12 * 1024 {
            big += 1;
        }
        for e in ext.read_dir(&d).unwrap() {
            if e.file_type == 2 && e.name != b"." && e.name != b".." {
                let mut c = p.clone();
                if c.len() > 1 {
                    c.push(b'/');
                }
                c.extend_from_slice(&e.name);
                todo.push(c);
            }
        }
    }
    (inline, htree, big)
}

#[test]
fn workload_ext4_4k_inline_data_image() {
    // New directories are inline; names fill them and turn them into block
    // directories; removals from both. Checked by the kernel every round.
    let Some(img) = workload_shaped(
        "w-4k-inline",
        &[
            "-t",
            "ext4",
            "-b",
            "4096",
            "-O",
            &format!("{NOJ},inline_data"),
        ],
        60,
        4,
        6,
        100_000,
        Shape::default(),
    ) else {
        return;
    };
    let (inline, _, _) = dir_kinds(&img);
    assert!(inline > 0, "no inline directory left");
}

#[test]
fn workload_ext2_1k_directories_past_12_blocks() {
    // No dir_index: the root grows past its 12 direct blocks through
    // indirect blocks.
    let Some(img) = wide_dir_workload(
        "w-ext2-1k-wide",
        &["-t", "ext2", "-b", "1024", "-O", "^dir_index"],
        4,
        11,
    ) else {
        return;
    };
    let (_, htree, big) = dir_kinds(&img);
    assert!(big > 0 && htree == 0, "big {big} htree {htree}");
}

#[test]
fn workload_ext2_1k_htree_on_indirect_blocks() {
    // dir_index: the root becomes an htree mapped by indirect blocks.
    let Some(img) = wide_dir_workload("w-ext2-1k-htree", &["-t", "ext2", "-b", "1024"], 4, 12)
    else {
        return;
    };
    let (_raw, ext) = open(&img);
    let root = ext.lookup(b"/", false).unwrap();
    assert!(root.has_flag(dio::ext::inode_flags::INDEX));
    assert!(root.size > 12 * 1024, "root of {} bytes", root.size);
}

#[test]
fn workload_ext4_1k_large_dir() {
    let Some(img) = wide_dir_workload(
        "w-1k-largedir",
        &[
            "-t",
            "ext4",
            "-b",
            "1024",
            "-O",
            &format!("{NOJ},large_dir"),
        ],
        3,
        13,
    ) else {
        return;
    };
    let (_, htree, _) = dir_kinds(&img);
    assert!(htree > 0);
}

/// bigalloc: bitmaps of clusters, a cluster shared by neighbouring logical
/// blocks of one file, i_blocks in whole clusters, free counts in clusters
/// (descriptors) and blocks (superblock); e2fsck and the kernel judge.
#[test]
fn workload_ext4_4k_bigalloc_16k_clusters() {
    workload_sized(
        "w-bigalloc-16k",
        &[
            "-t",
            "ext4",
            "-b",
            "4096",
            "-C",
            "16384",
            "-O",
            &format!("{NOJ},bigalloc"),
        ],
        300,
        11,
        200_000,
        96,
    );
}

#[test]
fn workload_ext4_4k_bigalloc_64k_clusters() {
    workload_sized(
        "w-bigalloc-64k",
        &[
            "-t",
            "ext4",
            "-b",
            "4096",
            "-C",
            "65536",
            "-O",
            &format!("{NOJ},bigalloc"),
        ],
        300,
        12,
        200_000,
        192,
    );
}

/// bigalloc by hand: blocks 5 and 2 of a file share the physical cluster of
/// their logical cluster (at their offsets), i_blocks counts whole clusters, a
/// truncate that keeps a block of a cluster keeps the cluster, and unlink gives
/// every cluster back (free counts as before); e2fsck and the kernel agree.
#[test]
fn bigalloc_blocks_of_one_logical_cluster_share_its_physical_cluster() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    let img = mkfs(
        "bigalloc-share",
        &[
            "-t",
            "ext4",
            "-b",
            "4096",
            "-C",
            "65536",
            "-O",
            &format!("{NOJ},bigalloc"),
        ],
        64,
    );
    let before = free_counts(&img);
    let (_raw, ext) = open(&img);
    let inode = ext.create(b"/f", &Attrs::new()).unwrap();
    let w = ext.writer(&inode).unwrap();
    w.write_at(5 * 4096, &[0x55; 4096]).unwrap();
    w.write_at(2 * 4096, &[0x22; 4096]).unwrap();
    // Past the first cluster: block 17 (second logical cluster).
    w.write_at(17 * 4096, &[0x77; 100]).unwrap();
    w.sync().unwrap();
    let ex = ext.extents(&w.inode()).unwrap();
    let phys = |l: u64| {
        let e = ex
            .iter()
            .find(|e| e.logical <= l && l < e.logical + e.len)
            .unwrap();
        e.physical + (l - e.logical)
    };
    assert_eq!(phys(5) - phys(2), 3, "{ex:?}");
    assert_eq!(phys(2) % 16, 2, "{ex:?}");
    assert_eq!(phys(17) % 16, 1, "{ex:?}");
    assert_ne!(phys(17) / 16, phys(2) / 16, "{ex:?}");
    // Two clusters of 64 KiB.
    assert_eq!(w.inode().blocks_512, 2 * 128);
    // Cut inside the second logical cluster's block: both clusters stay.
    w.set_len(17 * 4096 + 50).unwrap();
    w.sync().unwrap();
    assert_eq!(w.inode().blocks_512, 2 * 128);
    // Cut to block 3: the second cluster goes, the first stays (block 2).
    w.set_len(3 * 4096).unwrap();
    w.sync().unwrap();
    assert_eq!(w.inode().blocks_512, 128);
    drop(w);
    drop(ext);
    fsck(&img);
    let mut m = Model::new();
    let mut data = vec![0u8; 3 * 4096];
    data[2 * 4096..].fill(0x22);
    m.insert("/f".into(), Node::File(data));
    check_dio(&img, &m);
    check_kernel(&img, &m);
    let (_raw, ext) = open(&img);
    ext.remove(b"/f", false).unwrap();
    drop(ext);
    fsck(&img);
    assert_eq!(free_counts(&img), before);
    let _ = std::fs::remove_file(&img);
}

/// An image's bytes on a RAM device (crash mode: unflushed writes can be lost).
fn ram(img: &Path) -> (Arc<dio::MemDevice>, u64) {
    let bytes = std::fs::read(img).unwrap();
    let size = bytes.len() as u64;
    let dev = Arc::new(dio::MemDevice::new(
        dio::MemDeviceConfig::new(size, 512).crash_mode(),
    ));
    dev.write_raw(0, &bytes);
    (dev, size)
}

#[test]
fn a_crash_at_any_flush_leaves_a_repairable_image_and_synced_files_intact() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    let base = mkfs("crash-base", &["-t", "ext4", "-b", "1024", "-O", NOJ], 8);
    for cut in [3u64, 7, 12, 20, 33, 47] {
        let (dev, size) = ram(&base);
        let mut m = Model::new();
        let mut rng = Rng(100 + cut);
        let mut counter = 0;
        {
            let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn dio::Device>, size).unwrap();
            for _ in 0..cut {
                step(&ext, &mut m, &mut rng, &mut counter, 60_000);
            }
            // One more operation, interrupted by the crash wherever its writes
            // stand (nothing after its last flush survives).
            step(&ext, &mut Model::new(), &mut rng, &mut counter, 60_000);
            dev.crash();
        }
        let img = scratch().join(format!("crash-{cut}.img"));
        std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
        let (code, out) = e2fsck(&img, &["-fy"]);
        assert!(code <= 1, "cut {cut}: e2fsck -fy exit {code}:\n{out}");
        for bad in ["Multiply-claimed", "duplicate", "shared with"] {
            assert!(!out.contains(bad), "cut {cut}: a block owned twice:\n{out}");
        }
        fsck(&img);
        // Every file synced before the last operation reads back whole (the
        // last operation may have changed one of them: skip that comparison
        // when the kernel-free check differs only there).
        let (_raw, ext) = open(&img);
        let mut differ = 0;
        for (p, n) in &m {
            if let Node::File(data) = n {
                let Ok(inode) = ext.lookup(p.as_bytes(), false) else {
                    differ += 1;
                    continue;
                };
                let f = ext.open_file(&inode).unwrap();
                let mut buf = vec![0u8; f.size() as usize];
                f.read_at(0, &mut buf).unwrap();
                if buf != *data {
                    differ += 1;
                }
            }
        }
        assert!(
            differ <= 1,
            "cut {cut}: {differ} synced files changed by a crash"
        );
    }
}

#[test]
fn an_eio_mid_write_leaves_size_and_extents_describing_only_what_was_written() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    let base = mkfs("eio", &["-t", "ext4", "-b", "4096", "-O", NOJ], 16);
    let (dev, size) = ram(&base);
    let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn dio::Device>, size).unwrap();
    let inode = ext.create(b"/f", &Attrs::new()).unwrap();
    let w = ext.writer(&inode).unwrap();
    // Two extents apart on the device (another file's block between them), so
    // the write goes out as at least two requests.
    w.allocate(0, 32 * 4096).unwrap();
    let other = ext.create(b"/other", &Attrs::new()).unwrap();
    let o = ext.writer(&other).unwrap();
    o.write_at(0, b"between").unwrap();
    o.sync().unwrap();
    drop(o);
    w.allocate(32 * 4096, 32 * 4096).unwrap();
    let ex = ext.extents(&w.inode()).unwrap();
    assert!(ex.len() >= 2, "{ex:?}");
    let e = ex
        .iter()
        .find(|e| e.logical <= 40 && 40 < e.logical + e.len)
        .unwrap();
    let p = e.physical + (40 - e.logical);
    // Block 40 of the file fails to write.
    dev.fail_range(p * 4096..(p + 1) * 4096, Some(dio::Op::Write));
    let data = vec![0x77u8; 64 * 4096];
    let r = w.write_at(0, &data);
    dev.clear_faults();
    let n = match r {
        Ok(n) => n as u64,
        Err(_) => 0,
    };
    assert!((32 * 4096..=40 * 4096).contains(&n), "wrote {n}");
    w.sync().unwrap();
    assert_eq!(w.size(), n);
    let ex = ext.extents(&w.inode()).unwrap();
    let written: u64 = ex.iter().filter(|e| !e.unwritten).map(|e| e.len).sum();
    assert_eq!(written * 4096, n.div_ceil(4096) * 4096, "{ex:?}");
    drop(w);
    drop(ext);
    let img = scratch().join("eio-after.img");
    std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
    fsck(&img);
    let mut m = Model::new();
    m.insert("/f".into(), Node::File(vec![0x77u8; n as usize]));
    m.insert("/other".into(), Node::File(b"between".to_vec()));
    check_dio(&img, &m);
}

/// The same rule on files mapped by indirect blocks (ext2: new blocks stay
/// out of the pointers until written, and the failed ones are freed) and on
/// bigalloc (clusters shared by the written and the failed blocks). The file is
/// written whole once, cut to 0 and written again: the allocator hands out the
/// same blocks, so the block that fails is known.
#[test]
fn an_eio_mid_write_on_indirect_and_bigalloc_files_leaves_only_what_was_written() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    let configs: [(&str, &[&str]); 3] = [
        ("eio-ext2-4k", &["-t", "ext2", "-b", "4096"]),
        ("eio-ext2-1k", &["-t", "ext2", "-b", "1024"]),
        (
            "eio-bigalloc",
            &[
                "-t",
                "ext4",
                "-b",
                "4096",
                "-C",
                "16384",
                "-O",
                "^has_journal,bigalloc",
            ],
        ),
    ];
    for (name, args) in configs {
        let base = mkfs(name, args, 32);
        let (dev, size) = ram(&base);
        std::fs::remove_file(&base).unwrap();
        let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn dio::Device>, size).unwrap();
        let bs = u64::from(ext.superblock().block_size);
        let inode = ext.create(b"/f", &Attrs::new()).unwrap();
        let w = ext.writer(&inode).unwrap();
        let blocks = 64u64;
        w.write_at(0, &vec![0x11u8; (blocks * bs) as usize])
            .unwrap();
        w.sync().unwrap();
        let ex = ext.extents(&w.inode()).unwrap();
        let e = ex
            .iter()
            .find(|e| e.logical <= 40 && 40 < e.logical + e.len)
            .unwrap();
        let p = e.physical + (40 - e.logical);
        w.set_len(0).unwrap();
        w.sync().unwrap();
        // Block 40 of the file fails to write.
        dev.fail_range(p * bs..(p + 1) * bs, Some(dio::Op::Write));
        let r = w.write_at(0, &vec![0x77u8; (blocks * bs) as usize]);
        dev.clear_faults();
        let n = match r {
            Ok(n) => n as u64,
            Err(_) => 0,
        };
        assert!(n <= 40 * bs, "{name}: wrote {n}");
        eprintln!("{name}: {n} of {} bytes written", blocks * bs);
        w.sync().unwrap();
        assert_eq!(w.size(), n, "{name}");
        let ex = ext.extents(&w.inode()).unwrap();
        let written: u64 = ex.iter().filter(|e| !e.unwritten).map(|e| e.len).sum();
        assert_eq!(written, n.div_ceil(bs), "{name}: {ex:?}");
        drop(w);
        drop(ext);
        let img = scratch().join(format!("{name}-after.img"));
        std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
        // e2fsck finds no block owned by nobody or twice, and i_blocks right.
        fsck(&img);
        let mut m = Model::new();
        m.insert("/f".into(), Node::File(vec![0x77u8; n as usize]));
        check_dio(&img, &m);
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn htree_index_grows_a_level_and_splits_index_nodes() {
    if !have("mke2fs") || !have("e2fsck") || !is_root() {
        eprintln!("skipped: needs mke2fs, e2fsck and root (the kernel builds the htree)");
        return;
    }
    let img = mkfs("htree-levels", &["-t", "ext4", "-b", "1024", "-O", NOJ], 32);
    {
        let m = mount_rw(&img);
        let dir = m.path().to_path_buf();
        std::fs::create_dir(dir.join("big")).unwrap();
        for i in 0..200 {
            std::fs::write(dir.join("big").join(format!("k{i}")), b"").unwrap();
        }
        drop(m);
    }
    let (_raw, ext) = open(&img);
    let mut names = Vec::new();
    // 240-byte names: 4 to a 1 KiB leaf, so the 123-entry root fills up.
    for i in 0..700 {
        let n = format!("{i:05}-{}", "z".repeat(234));
        ext.create(format!("/big/{n}").as_bytes(), &Attrs::new())
            .unwrap_or_else(|e| panic!("name {i}: {e}"));
        names.push(n);
    }
    let big = ext.lookup(b"/big", false).unwrap();
    let f = ext.extents(&big).unwrap();
    drop(ext);
    fsck(&img);
    if have("debugfs") {
        // The index grew a level, and its nodes split (the root has several).
        let out = debugfs(&img, "htree /big");
        assert!(out.contains("Indirect levels: 1"), "{out}");
        let root_count: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("Number of entries (count): "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        assert!(root_count >= 2, "{out}");
    }
    let (_raw, ext) = open(&img);
    let big_blocks: u64 = f.iter().map(|e| e.len).sum();
    assert!(big_blocks > 200, "{big_blocks} directory blocks");
    for n in &names {
        ext.lookup(format!("/big/{n}").as_bytes(), false).unwrap();
    }
    drop(ext);
    let Some(mnt) = mount(&img) else { return };
    for n in &names {
        assert!(
            mnt.path().join("big").join(n).symlink_metadata().is_ok(),
            "{n}"
        );
    }
    assert_eq!(
        std::fs::read_dir(mnt.path().join("big")).unwrap().count(),
        900
    );
}

#[test]
fn removing_files_with_an_xattr_block_frees_or_unshares_it() {
    if !have("mke2fs") || !have("e2fsck") || !have("python3") || !is_root() {
        eprintln!("skipped: needs mke2fs, e2fsck, python3 and root (the kernel writes the xattrs)");
        return;
    }
    let img = mkfs("xattr", &["-t", "ext4", "-b", "4096", "-O", NOJ], 16);
    {
        let m = mount_rw(&img);
        let dir = m.path().to_path_buf();
        for f in ["a", "b", "c"] {
            std::fs::write(dir.join(f), b"data").unwrap();
        }
        // The same large value on a and b (the kernel shares one block), another
        // on c: too big for the inode, so each lives in an xattr block.
        let script = format!(
            "import os\nfor f, v in (('a', b'x'), ('b', b'x'), ('c', b'y')):\n    os.setxattr('{0}/' + f, 'user.big', v * 1500)\n",
            dir.display()
        );
        let st = Command::new("python3")
            .arg("-c")
            .arg(script)
            .status()
            .unwrap();
        assert!(st.success());
        drop(m);
    }
    let (_raw, ext) = open(&img);
    for f in ["a", "b", "c"] {
        assert_ne!(
            ext.lookup(format!("/{f}").as_bytes(), false)
                .unwrap()
                .file_acl,
            0,
            "{f}"
        );
    }
    ext.remove(b"/a", false).unwrap();
    drop(ext);
    fsck(&img);
    let (_raw, ext) = open(&img);
    ext.remove(b"/b", false).unwrap();
    ext.remove(b"/c", false).unwrap();
    drop(ext);
    fsck(&img);
}

/// A RAM device holding `img`'s bytes (no crash mode: flushes are free), and
/// an `Ext` on it.
fn ram_ext(img: &Path) -> (Arc<dio::MemDevice>, u64, Ext) {
    let bytes = std::fs::read(img).unwrap();
    let size = bytes.len() as u64;
    let dev = Arc::new(dio::MemDevice::new(dio::MemDeviceConfig::new(size, 512)));
    dev.write_raw(0, &bytes);
    let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn dio::Device>, size).unwrap();
    (dev, size, ext)
}

/// `debugfs -R "htree PATH"`'s "Indirect levels" line, if debugfs is here.
fn htree_levels(img: &Path, path: &str) -> Option<u32> {
    if !have("debugfs") {
        return None;
    }
    let out = debugfs(img, &format!("htree {path}"));
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Indirect levels: "))
        .and_then(|n| n.trim().parse().ok())
}

/// The `i`th name of the big-directory tests: `len` bytes.
fn big_name(i: usize, len: usize) -> String {
    let mut n = format!("{i:06}-");
    while n.len() < len {
        n.push((b'a' + ((i * 7 + n.len()) % 26) as u8) as char);
    }
    n
}

/// Add names `from..to` (`len` bytes) to `/big` of the image on `ext`; stops
/// at the first refusal, returned with the names made.
fn fill_big(ext: &Ext, from: usize, to: usize, len: usize) -> (Vec<String>, Option<Error>) {
    let t0 = std::time::Instant::now();
    let mut names = Vec::new();
    for i in from..to {
        let n = big_name(i, len);
        match ext.create(format!("/big/{n}").as_bytes(), &Attrs::new()) {
            Ok(_) => names.push(n),
            Err(e) => {
                eprintln!(
                    "{} names made in {:.2} s",
                    names.len(),
                    t0.elapsed().as_secs_f64()
                );
                return (names, Some(e));
            }
        }
    }
    eprintln!(
        "{} names made in {:.2} s",
        names.len(),
        t0.elapsed().as_secs_f64()
    );
    (names, None)
}

/// Remove every `every`th of `names` from `/big`; returns those left.
fn thin_big(ext: &Ext, names: Vec<String>, every: usize) -> Vec<String> {
    let t0 = std::time::Instant::now();
    let mut kept = Vec::new();
    let mut removed = 0;
    for (i, n) in names.into_iter().enumerate() {
        if i % every == every - 1 {
            ext.remove(format!("/big/{n}").as_bytes(), false).unwrap();
            removed += 1;
        } else {
            kept.push(n);
        }
    }
    eprintln!(
        "{removed} names removed in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    kept
}

/// Check `/big` of `img` holds exactly `names`: e2fsck (which checks the
/// htree), dio's lookups, and the kernel (every name through readdir, a sample
/// through its hash index).
fn check_big(img: &Path, names: &[String]) {
    let t0 = std::time::Instant::now();
    fsck(img);
    eprintln!("e2fsck -fn: {:.2} s", t0.elapsed().as_secs_f64());
    let (_raw, ext) = open(img);
    let big = ext.lookup(b"/big", false).unwrap();
    let listed = ext.read_dir(&big).unwrap();
    assert_eq!(listed.len(), names.len() + 2, "dio's readdir");
    for n in names.iter().step_by(61) {
        ext.lookup(format!("/big/{n}").as_bytes(), false).unwrap();
    }
    drop(ext);
    eprintln!("dio: {:.2} s", t0.elapsed().as_secs_f64());
    let Some(mnt) = mount(img) else { return };
    let seen: std::collections::BTreeSet<String> = std::fs::read_dir(mnt.path().join("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(seen.len(), names.len(), "the kernel's ls count");
    for n in names.iter().step_by(97) {
        assert!(seen.contains(n), "{n} not listed");
        assert!(
            mnt.path().join("big").join(n).symlink_metadata().is_ok(),
            "{n}: the kernel's lookup"
        );
    }
    let missing = big_name(999_999, names[0].len());
    assert!(mnt
        .path()
        .join("big")
        .join(missing)
        .symlink_metadata()
        .is_err());
    drop(mnt);
    eprintln!("kernel: {:.2} s", t0.elapsed().as_secs_f64());
}

#[test]
fn htree_full_at_two_levels_is_enospc_and_grows_a_third_with_large_dir() {
    if !have("mke2fs") || !have("e2fsck") || !have("tune2fs") {
        eprintln!("skipped: needs mke2fs, e2fsck and tune2fs");
        return;
    }
    // 250-byte names: at most 3 to a 1 KiB leaf, so two index levels hold
    // 15,498 leaves (123 root entries x 126 node entries), about 21,500
    // names. Without large_dir the next name is refused with ENOSPC,
    // "directory index full"; with it (tune2fs -O large_dir) the tree grows a
    // third level. CI goes to 26,000 names; DIO_EXT_BIG=1 to 50,000.
    let total = if std::env::var_os("DIO_EXT_BIG").is_some() {
        50_000
    } else {
        26_000
    };
    let len = 250;
    let img = mkfs(
        "htree-big",
        &["-t", "ext4", "-b", "1024", "-N", "56000", "-O", NOJ],
        80,
    );
    let (dev, size, ext) = ram_ext(&img);
    ext.mkdir(b"/big", &Attrs::new()).unwrap();
    let (mut names, refused) = fill_big(&ext, 0, total, len);
    let before = ext.free_counts();
    match refused {
        Some(Error::NoSpace(m)) => eprintln!("refused after {} names: {m}", names.len()),
        other => panic!("expected ENOSPC (directory index full), got {other:?}"),
    }
    // Refused again, with nothing written.
    let refused_name = format!("/big/{}", big_name(names.len(), len));
    let again = ext.create(refused_name.as_bytes(), &Attrs::new());
    assert!(matches!(again, Err(Error::NoSpace(_))), "{again:?}");
    assert_eq!(ext.free_counts(), before);
    drop(ext);
    std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
    if let Some(l) = htree_levels(&img, "/big") {
        assert_eq!(l, 1, "two index levels");
    }
    check_big(&img, &names);

    let o = Command::new("tune2fs")
        .args(["-O", "large_dir"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (dev, size, ext) = ram_ext(&img);
    let start = names.len() + 1;
    let (more, refused) = fill_big(&ext, start, start + total - names.len(), len);
    assert!(refused.is_none(), "{refused:?}");
    names.extend(more);
    let names = thin_big(&ext, names, 10);
    drop(ext);
    std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
    if let Some(l) = htree_levels(&img, "/big") {
        assert_eq!(l, 2, "three index levels");
    }
    check_big(&img, &names);
    let _ = std::fs::remove_file(&img);
}

/// Make `n` subdirectories of `/p` on `ext`.
fn subdirs(ext: &Ext, from: usize, to: usize) -> Result<(), Error> {
    for i in from..to {
        ext.mkdir(format!("/p/s{i}").as_bytes(), &Attrs::new())?;
    }
    Ok(())
}

#[test]
fn dir_nlink_counts_1_past_65000_subdirectories() {
    if !need(&["mke2fs", "e2fsck"]) {
        return;
    }
    // The real thing is 65,001 directories (DIO_EXT_BIG=1); CI starts /p at a
    // link count of 64,998 set by debugfs (e2fsck would count 2: not checked).
    let big = std::env::var_os("DIO_EXT_BIG").is_some();
    if !big && !have("debugfs") {
        eprintln!("skipped: needs debugfs");
        return;
    }
    let opts = format!("{NOJ},inline_data");
    let img = if big {
        mkfs(
            "nlink",
            &["-t", "ext4", "-b", "1024", "-N", "70000", "-O", &opts],
            64,
        )
    } else {
        mkfs("nlink", &["-t", "ext4", "-b", "1024", "-O", &opts], 8)
    };
    {
        let (_raw, ext) = open(&img);
        ext.mkdir(b"/p", &Attrs::new()).unwrap();
        ext.mkdir(b"/q", &Attrs::new()).unwrap();
    }
    let start = if big {
        0
    } else {
        for (d, links) in [("/p", 64_998), ("/q", 64_999)] {
            debugfs_w(&img, &format!("sif {d} links_count {links}"));
        }
        // /p is hashed (many long names), /q is not.
        let (_raw, ext) = open(&img);
        for i in 0..40 {
            ext.create(format!("/p/{}", big_name(i, 200)).as_bytes(), &Attrs::new())
                .unwrap();
        }
        assert!(ext
            .lookup(b"/p", false)
            .unwrap()
            .has_flag(dio::ext::inode_flags::INDEX));
        64_996
    };
    let (dev, size, ext) = ram_ext(&img);
    let t0 = std::time::Instant::now();
    subdirs(&ext, start, 64_998).unwrap();
    assert_eq!(ext.lookup(b"/p", false).unwrap().links, 65_000);
    if !big {
        // An unhashed directory at 65,000 takes no more (EMLINK), as the kernel.
        ext.mkdir(b"/q/a", &Attrs::new()).unwrap();
        match ext.mkdir(b"/q/b", &Attrs::new()) {
            Err(Error::Path(e)) => {
                assert_eq!(e.kind, dio::PathErrorKind::TooManyLinks);
                assert_eq!(e.kind.errno(), 31, "EMLINK");
            }
            other => panic!("expected EMLINK, got {other:?}"),
        }
        ext.remove(b"/q/a", true).unwrap();
    }
    // The hashed one goes to 1 and stays there.
    subdirs(&ext, 64_998, 65_001).unwrap();
    assert_eq!(ext.lookup(b"/p", false).unwrap().links, 1);
    ext.remove(b"/p/s65000", true).unwrap();
    assert_eq!(ext.lookup(b"/p", false).unwrap().links, 1);
    eprintln!("subdirectories made in {:.2} s", t0.elapsed().as_secs_f64());
    drop(ext);
    std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
    if big {
        fsck(&img);
    }
    if let Some(mnt) = mount(&img) {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(mnt.path().join("p")).unwrap().nlink(), 1);
        assert!(mnt.path().join("p/s64999").is_dir());
        if big {
            let n = std::fs::read_dir(mnt.path().join("p")).unwrap().count();
            assert_eq!(n, 65_000);
            let sample = std::fs::read_dir(mnt.path().join("p/s12345"))
                .unwrap()
                .count();
            assert_eq!(sample, 0);
        }
    }
    let _ = std::fs::remove_file(&img);
}

/// `/d`'s inode in a fresh open of `img`.
fn inode_of(img: &Path, p: &str) -> dio::ext::Inode {
    let (_raw, ext) = open(img);
    ext.lookup(p.as_bytes(), false).unwrap()
}

#[test]
fn inline_directories_take_names_convert_to_a_block_and_lose_names() {
    if !have("mke2fs") || !have("e2fsck") || !is_root() {
        eprintln!("skipped: needs mke2fs, e2fsck and root (the kernel makes inline directories)");
        return;
    }
    use dio::ext::inode_flags::{EXTENTS, INLINE_DATA};
    for (tag, opts) in [
        ("csum", format!("{NOJ},inline_data")),
        ("plain", format!("{NOJ},inline_data,^metadata_csum")),
    ] {
        let img = mkfs(
            &format!("inline-{tag}"),
            &["-t", "ext4", "-b", "1024", "-I", "256", "-O", &opts],
            16,
        );
        // The kernel's inline directories: /k with names spilling into the
        // system.data xattr, /e empty.
        let mut k_names: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
        {
            let m = mount_rw(&img);
            let dir = m.path().to_path_buf();
            std::fs::create_dir(dir.join("k")).unwrap();
            std::fs::create_dir(dir.join("e")).unwrap();
            for n in &k_names {
                std::fs::write(dir.join("k").join(n), b"").unwrap();
            }
            drop(m);
        }
        assert!(
            inode_of(&img, "/k").has_flag(INLINE_DATA),
            "the kernel made no inline dir"
        );
        // dio's own inline directory, filled name by name until it becomes a
        // block directory; every step checked by e2fsck and dio.
        let mut d_names = Vec::new();
        {
            let (_raw, ext) = open(&img);
            ext.mkdir(b"/d", &Attrs::new()).unwrap();
        }
        let d = inode_of(&img, "/d");
        assert!(d.has_flag(INLINE_DATA) && !d.has_flag(EXTENTS));
        assert_eq!(d.size, 60);
        fsck(&img);
        let mut converted_at = None;
        for i in 0..12 {
            let n = format!("name-{i}");
            {
                let (_raw, ext) = open(&img);
                if i % 3 == 2 {
                    ext.mkdir(format!("/d/{n}").as_bytes(), &Attrs::new())
                        .unwrap();
                } else {
                    ext.create(format!("/d/{n}").as_bytes(), &Attrs::new())
                        .unwrap();
                }
            }
            d_names.push(n);
            fsck(&img);
            let d = inode_of(&img, "/d");
            if !d.has_flag(INLINE_DATA) && converted_at.is_none() {
                converted_at = Some(i);
                assert!(d.has_flag(EXTENTS));
                assert_eq!(d.size, 1024);
            }
        }
        let at = converted_at.expect("the inline directory never became a block one");
        assert!(at >= 2, "converted after {at} names");
        // Names into the kernel's inline directory (its xattr area first),
        // then removals from an inline directory.
        {
            let (_raw, ext) = open(&img);
            for i in 0..6 {
                let n = format!("x{i}");
                ext.create(format!("/k/{n}").as_bytes(), &Attrs::new())
                    .unwrap();
                k_names.push(n);
            }
            ext.mkdir(b"/e/sub", &Attrs::new()).unwrap();
            ext.create(b"/e/f", &Attrs::new()).unwrap();
            ext.remove(b"/e/sub", true).unwrap();
        }
        fsck(&img);
        {
            let (_raw, ext) = open(&img);
            for n in ["k0", "k3", "x1"] {
                ext.remove(format!("/k/{n}").as_bytes(), false).unwrap();
                k_names.retain(|x| x != n);
            }
            // An inline subdirectory of /d: made, filled a little, removed.
            ext.mkdir(b"/d/sub", &Attrs::new()).unwrap();
            ext.create(b"/d/sub/a", &Attrs::new()).unwrap();
            ext.remove(b"/d/sub/a", false).unwrap();
            ext.remove(b"/d/sub", true).unwrap();
            assert!(matches!(ext.remove(b"/d/name-2", true), Ok(())));
            d_names.retain(|x| x != "name-2");
        }
        fsck(&img);
        assert!(inode_of(&img, "/e").has_flag(INLINE_DATA));
        let Some(mnt) = mount(&img) else { continue };
        let ls = |p: &str| -> std::collections::BTreeSet<String> {
            std::fs::read_dir(mnt.path().join(p))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        assert_eq!(ls("d"), d_names.iter().cloned().collect());
        assert_eq!(ls("k"), k_names.iter().cloned().collect());
        assert_eq!(ls("e"), ["f".to_string()].into_iter().collect());
        for n in &k_names {
            assert!(
                mnt.path().join("k").join(n).symlink_metadata().is_ok(),
                "{n}"
            );
        }
        assert!(mnt.path().join("d/name-5").is_dir());
        let dir_links = std::fs::metadata(mnt.path().join("d")).unwrap();
        use std::os::unix::fs::MetadataExt;
        // `.`, its name in /, and name-5, name-8, name-11.
        assert_eq!(dir_links.nlink(), 5);
    }
}

#[test]
fn dio_made_htrees_hash_with_every_version_and_signedness() {
    if !have("mke2fs") || !have("e2fsck") || !have("tune2fs") || !have("debugfs") {
        eprintln!("skipped: needs mke2fs, e2fsck, tune2fs and debugfs");
        return;
    }
    // Names with bytes past 0x7F: signed and unsigned hashes differ on them.
    // e2fsck checks every name's hash against its leaf's index range; the
    // kernel finds each one through its own hash.
    for alg in ["legacy", "half_md4", "tea"] {
        for (signedness, flags) in [("signed", 1), ("unsigned", 2)] {
            let tag = format!("hash-{alg}-{signedness}");
            let img = mkfs(&tag, &["-t", "ext4", "-b", "1024", "-O", NOJ], 8);
            let o = Command::new("tune2fs")
                .arg("-E")
                .arg(format!("hash_alg={alg}"))
                .arg(&img)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            debugfs_w(&img, &format!("ssv flags {flags}"));
            let mut names = Vec::new();
            {
                let (dev, size, ext) = ram_ext(&img);
                ext.mkdir(b"/h", &Attrs::new()).unwrap();
                for i in 0..150 {
                    let n = format!("ñame-é{i}-{}", "ü".repeat(i % 17));
                    ext.create(format!("/h/{n}").as_bytes(), &Attrs::new())
                        .unwrap();
                    names.push(n);
                }
                for n in names.iter().step_by(5) {
                    ext.remove(format!("/h/{n}").as_bytes(), false).unwrap();
                }
                let h = ext.lookup(b"/h", false).unwrap();
                assert!(h.has_flag(dio::ext::inode_flags::INDEX), "{tag}: no htree");
                drop(ext);
                std::fs::write(&img, dev.read_raw(0, size as usize)).unwrap();
            }
            let names: Vec<String> = names
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 5 != 0)
                .map(|(_, n)| n)
                .collect();
            fsck(&img);
            let out = debugfs(&img, "htree /h");
            let want = match alg {
                "legacy" => 0,
                "half_md4" => 1,
                _ => 2,
            };
            assert!(
                out.contains(&format!("Hash Version: {want}")),
                "{tag}: {}",
                out.lines().take(3).collect::<Vec<_>>().join(" / ")
            );
            if let Some(mnt) = mount(&img) {
                for n in &names {
                    assert!(
                        mnt.path().join("h").join(n).symlink_metadata().is_ok(),
                        "{tag}: the kernel does not find {n}"
                    );
                }
                let count = std::fs::read_dir(mnt.path().join("h")).unwrap().count();
                assert_eq!(count, names.len(), "{tag}");
            }
            let _ = std::fs::remove_file(&img);
        }
    }
}
