//! Metadata through the jbd2 journal, checked both ways against independent
//! replayers: transactions dio commits and leaves unreplayed (no checkpoint) are
//! replayed by `e2fsck` and by the kernel's mount into exactly the bytes dio
//! meant, and parsed by `debugfs -R logdump`; a journal the kernel left needing
//! recovery is replayed on disk by dio into the same image `e2fsck -E
//! journal_only` makes. Journals with csum v3 and 64-bit tags (ext4), without
//! checksums and with 32-bit tags (ext3), with the v1 commit checksum and csum
//! v2; escaped blocks, revoke records, and a log that wraps around.
//!
//! Tools (e2fsprogs; root for the kernel's loop mount) are probed: a test that
//! lacks one prints why and skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use dio::ext::{incompat, Ext};
use dio::{RawFile, RawOptions};
use dio_testkit::{
    assert_fsck_clean as assert_clean, copy_at_rest, debugfs_script as debugfs, e2fsck, have,
    inode_location, kernel_mount, make_orphans, mke2fs, need, settle_writeback, sh, skip,
};

const JBD2_MAGIC: [u8; 4] = [0xC0, 0x3B, 0x39, 0x98];

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jbd2-tests");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn need_e2fsprogs() -> bool {
    need(&["mke2fs", "e2fsck", "debugfs"])
}

/// A journal flavour: how the image is made.
#[derive(Clone, Copy, Debug)]
struct Flavour {
    name: &'static str,
    mkfs: &'static [&'static str],
    /// debugfs `journal_open` options that set the journal's features.
    jo: &'static str,
}

/// ext4, 4 KiB blocks, metadata_csum: csum v3 and 64-bit tags.
const EXT4: Flavour = Flavour {
    name: "ext4",
    mkfs: &["-t", "ext4", "-b", "4096"],
    jo: "jo -c",
};
/// ext3, 1 KiB blocks: no checksums, 32-bit tags.
const EXT3: Flavour = Flavour {
    name: "ext3",
    mkfs: &["-t", "ext3", "-b", "1024"],
    jo: "jo",
};

/// An image of `flavour` holding /f (10000 bytes, mtime in 2001) and /d/g, its
/// journal's features set by debugfs.
fn make_image(flavour: Flavour, tag: &str) -> PathBuf {
    let tree = scratch(&format!("{}-{tag}.tree", flavour.name));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("f"), vec![7u8; 10000]).unwrap();
    std::fs::write(tree.join("d/g"), b"g\n").unwrap();
    sh(Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06"])
        .arg(tree.join("f")));
    let img = scratch(&format!("{}-{tag}.img", flavour.name));
    let _ = std::fs::remove_file(&img);
    sh(Command::new("mke2fs")
        .args(["-q", "-F"])
        .args(flavour.mkfs)
        .arg("-d")
        .arg(&tree)
        .arg(&img)
        .arg("16M"));
    debugfs(&img, &[flavour.jo, "jc"]);
    img
}

/// `path` opened through dio (O_DIRECT), read-write with `write`.
fn raw(path: &Path, write: bool) -> RawFile {
    let opts = RawOptions {
        write,
        ..RawOptions::default()
    };
    RawFile::open(path, &opts).unwrap()
}

fn open(path: &Path, write: bool) -> (RawFile, Ext) {
    let raw = raw(path, write);
    let dev = Arc::clone(raw.direct().device());
    let ext = if write {
        Ext::open_writable(dev, raw.size()).unwrap()
    } else {
        Ext::open(dev, raw.size()).unwrap()
    };
    (raw, ext)
}

fn read_at(img: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at).unwrap();
    b
}

fn write_at(img: &Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(data, at).unwrap();
}

fn needs_recovery(img: &Path) -> bool {
    let f = u32::from_le_bytes(read_at(img, 1024 + 0x60, 4).try_into().unwrap());
    f & incompat::RECOVER != 0
}

fn copy(img: &Path, suffix: &str) -> PathBuf {
    let to = PathBuf::from(format!("{}.{suffix}", img.display()));
    std::fs::copy(img, &to).unwrap();
    to
}

/// Byte offset of the inode of `path`.
fn inode_offset(img: &Path, path: &str, bs: u64) -> u64 {
    let (block, offset) = inode_location(img, path);
    block * bs + offset
}

/// Free fs blocks of `img` (from `debugfs ffb`), `n` of them from `goal`.
fn free_blocks(img: &Path, n: usize, goal: u64) -> Vec<u64> {
    let text = sh(Command::new("debugfs")
        .args(["-R", &format!("ffb {n} {goal}")])
        .arg(img));
    let list: Vec<u64> = text
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(list.len(), n, "ffb: {text}");
    list
}

/// The mtime of `path` on a mount: (seconds, nanoseconds).
fn mtime(path: &Path) -> (i64, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.mtime(), m.mtime_nsec() as u32)
}

/// dio commits an inode update (`touch`) and stops before the checkpoint: the
/// image needs recovery, its inode table still holds the old inode, and every
/// replayer (dio read-only in memory, dio writable on disk, e2fsck, the kernel)
/// makes the inode dio wrote; `debugfs logdump` shows the transaction.
fn uncheckpointed_touch(flavour: Flavour) {
    let img = make_image(flavour, "touch");
    let (bs, ino_at, old) = {
        let (_raw, ext) = open(&img, false);
        let bs = u64::from(ext.block_size());
        let at = inode_offset(&img, "/f", bs);
        let old = ext.inode(ext.lookup(b"/f", false).unwrap().ino).unwrap();
        (bs, at, old)
    };
    let want = {
        let (_raw, ext) = open(&img, true);
        assert!(ext.is_journaled());
        ext.set_journal_checkpoint(false);
        let f = ext.open_file(&ext.lookup(b"/f", false).unwrap()).unwrap();
        f.touch().unwrap();
        let want = f.inode();
        // The same open reads its own uncheckpointed write.
        assert_eq!(ext.inode(want.ino).unwrap().raw(), want.raw());
        want
    };
    assert_ne!(want.mtime, old.mtime);
    let isz = want.raw().len();
    assert!(needs_recovery(&img), "{}: needs_recovery", flavour.name);
    assert_eq!(
        read_at(&img, ino_at, isz),
        old.raw(),
        "{}: the change must be only in the journal",
        flavour.name
    );

    // debugfs parses dio's journal.
    let dump = sh(Command::new("debugfs").args(["-R", "logdump -a"]).arg(&img));
    let table = ino_at / bs;
    assert!(
        dump.contains("(descriptor block)")
            && dump.contains("(commit block)")
            && dump.contains(&format!("FS block {table} logged at")),
        "{}: logdump: {dump}",
        flavour.name
    );

    // dio, read-only: replayed in memory, the image unchanged.
    {
        let before = std::fs::read(&img).unwrap();
        let (_raw, ext) = open(&img, false);
        let r = ext.journal_replay().unwrap();
        assert!(!r.on_disk && r.transactions == 1 && r.blocks == 1, "{r:?}");
        assert_eq!(ext.inode(want.ino).unwrap().raw(), want.raw());
        drop((_raw, ext));
        assert!(std::fs::read(&img).unwrap() == before);
    }

    // e2fsck replays it into the inode dio wrote, and the result is clean.
    let fsck = copy(&img, "fsck");
    let (code, out) = e2fsck(&fsck, &["-fy"]);
    assert!(code <= 1, "{}: e2fsck -fy: {out}", flavour.name);
    assert!(!needs_recovery(&fsck));
    assert_eq!(read_at(&fsck, ino_at, isz), want.raw(), "{}", flavour.name);
    assert_clean(&fsck);

    // dio, writable: replayed on disk, like e2fsck -E journal_only.
    let jo = copy(&img, "journal_only");
    let (code, out) = e2fsck(&jo, &["-y", "-E", "journal_only"]);
    assert_eq!(code, 0, "{out}");
    let dio = copy(&img, "dio");
    {
        let (_raw, ext) = open(&dio, true);
        let r = ext.journal_replay().unwrap();
        assert!(r.on_disk && r.transactions == 1 && r.blocks == 1, "{r:?}");
    }
    assert_same_image(&dio, &jo, flavour.name);
    assert_clean(&dio);

    // The kernel replays it at mount.
    let kimg = copy(&img, "kernel");
    if let Some(m) = kernel_mount(&kimg, "rw") {
        assert_eq!(
            mtime(&m.path().join("f")),
            (want.mtime.secs, want.mtime.nsecs),
            "{}: the kernel's mtime",
            flavour.name
        );
        drop(m);
        assert_eq!(read_at(&kimg, ino_at, isz), want.raw(), "{}", flavour.name);
    }
}

/// Two images are the same bytes, but for the superblock fields e2fsck stamps
/// when it writes a superblock (write time, kbytes written, and so the checksum).
fn assert_same_image(a: &Path, b: &Path, what: &str) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    // s_wtime (0x30, with its high byte at 0x274), s_kbytes_written (0x178),
    // s_checksum (0x3FC).
    let stamped = |i: usize| {
        let o = i.wrapping_sub(1024);
        (0x30..0x34).contains(&o)
            || o == 0x274
            || (0x178..0x180).contains(&o)
            || (0x3FC..0x400).contains(&o)
    };
    let diff: Vec<usize> = (0..x.len())
        .filter(|&i| x[i] != y[i] && !stamped(i))
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: {} bytes differ, first at {:?}",
        diff.len(),
        &diff[..diff.len().min(16)]
    );
}

#[test]
fn uncheckpointed_inode_update_is_replayed_by_every_replayer_ext4_csum_v3() {
    if !need_e2fsprogs() {
        return;
    }
    uncheckpointed_touch(EXT4);
}

#[test]
fn uncheckpointed_inode_update_is_replayed_by_every_replayer_ext3_no_csum() {
    if !need_e2fsprogs() {
        return;
    }
    uncheckpointed_touch(EXT3);
}

/// ext3 with the v1 commit checksum (compat `checksum`), 1 KiB blocks.
const EXT3_V1: Flavour = Flavour {
    name: "ext3-csum-v1",
    mkfs: &["-t", "ext3", "-b", "1024"],
    jo: "jo -c",
};
/// ext4 with csum v2 (16-bit tag checksums) and 64-bit tags, 1 KiB blocks.
const EXT4_V2: Flavour = Flavour {
    name: "ext4-csum-v2",
    mkfs: &["-t", "ext4", "-b", "1024"],
    jo: "jo -c -v 2",
};

/// Deterministic contents of one block, different for each (block, salt).
fn pattern(block: u64, salt: u64, bs: usize) -> Vec<u8> {
    let mut x =
        block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (0..bs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn block_of(img: &Path, b: u64, bs: usize) -> Vec<u8> {
    read_at(img, b * bs as u64, bs)
}

/// Every replayer gives `img` (whose journal needs recovery) the blocks `want`:
/// e2fsck (and the result is clean), dio on disk (the same image as e2fsck's
/// `-E journal_only`), the kernel's mount.
fn check_replays(img: &Path, want: &[(u64, Vec<u8>)], what: &str) {
    let bs = want[0].1.len();
    assert!(needs_recovery(img), "{what}");
    let jo = copy(img, "journal_only");
    let (code, out) = e2fsck(&jo, &["-y", "-E", "journal_only"]);
    assert_eq!(code, 0, "{what}: {out}");
    assert!(
        !out.contains("corrupt") && !out.contains("abort"),
        "{what}: {out}"
    );
    for (b, data) in want {
        assert!(block_of(&jo, *b, bs) == *data, "{what}: e2fsck: block {b}");
    }
    assert_clean(&jo);
    let dio = copy(img, "dio");
    {
        let (_raw, ext) = open(&dio, true);
        assert!(ext.journal_replay().unwrap().on_disk);
    }
    assert_same_image(&dio, &jo, what);
    let kimg = copy(img, "kernel");
    if let Some(m) = kernel_mount(&kimg, "rw") {
        drop(m);
        for (b, data) in want {
            assert!(
                block_of(&kimg, *b, bs) == *data,
                "{what}: kernel: block {b}"
            );
        }
    }
}

/// Transactions of raw blocks: an escaped block (one that begins with the jbd2
/// magic), a block logged twice (the later copy wins), a revoked block (its
/// earlier copy must not be replayed over the data written there since), across
/// two uncommitted-to-place transactions.
fn escapes_and_revokes(flavour: Flavour) {
    let img = make_image(flavour, "revoke");
    let (_raw, ext) = open(&img, true);
    let bs = ext.block_size() as usize;
    let x = free_blocks(&img, 5, 3000);
    let mut magic = pattern(x[0], 1, bs);
    magic[..4].copy_from_slice(&JBD2_MAGIC);
    let t1: Vec<(u64, Vec<u8>)> = vec![
        (x[0], magic.clone()),
        (x[1], pattern(x[1], 1, bs)),
        (x[2], pattern(x[2], 1, bs)),
        (x[3], pattern(x[3], 1, bs)),
    ];
    let refs: Vec<(u64, &[u8])> = t1.iter().map(|(b, d)| (*b, d.as_slice())).collect();
    ext.journal_write(&refs, &[], false).unwrap();
    let t2: Vec<(u64, Vec<u8>)> = vec![(x[2], pattern(x[2], 2, bs)), (x[4], pattern(x[4], 2, bs))];
    let refs: Vec<(u64, &[u8])> = t2.iter().map(|(b, d)| (*b, d.as_slice())).collect();
    ext.journal_write(&refs, &[x[1]], false).unwrap();
    drop((_raw, ext));
    // x[1] was freed (revoked) and now holds file data, written in place.
    let data = pattern(x[1], 99, bs);
    write_at(&img, x[1] * bs as u64, &data);
    for &b in &x {
        assert!(
            block_of(&img, b, bs) != pattern(b, 1, bs) && block_of(&img, b, bs) != magic,
            "{}: block {b} must be only in the journal",
            flavour.name
        );
    }
    let dump = sh(Command::new("debugfs").args(["-R", "logdump -a"]).arg(&img));
    assert!(
        dump.contains("(revoke table)") && dump.contains(&format!("FS block {} logged", x[0])),
        "{}: {dump}",
        flavour.name
    );
    // The copy of x[0] is logged escaped (flag 1), its magic stored as zeros.
    let flags = dump
        .split(&format!("FS block {} logged at journal block ", x[0]))
        .nth(1)
        .and_then(|s| s.split("(flags 0x").nth(1))
        .and_then(|s| s.split(')').next())
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("{dump}"));
    assert!(flags & 1 != 0, "{}: flags {flags:#x}", flavour.name);
    let want = vec![
        (x[0], magic),
        (x[1], data),
        (x[2], pattern(x[2], 2, bs)),
        (x[3], pattern(x[3], 1, bs)),
        (x[4], pattern(x[4], 2, bs)),
    ];
    check_replays(&img, &want, flavour.name);
}

#[test]
fn escaped_blocks_and_revokes_replay_like_e2fsck_and_the_kernel() {
    if !need_e2fsprogs() {
        return;
    }
    for f in [EXT4, EXT3, EXT3_V1, EXT4_V2] {
        escapes_and_revokes(f);
    }
}

/// Transactions that fill the log past its end: three checkpointed ones move
/// the head near the end, a fourth and fifth (not checkpointed) wrap around to
/// the log's start. The replay gives their blocks, over the third's in place.
fn wrap_around(flavour: Flavour) {
    let img = make_image(flavour, "wrap");
    let (_raw, ext) = open(&img, true);
    let bs = ext.block_size() as usize;
    let x = free_blocks(&img, 300, 3000);
    let txn = |salt: u64, n: usize| -> Vec<(u64, Vec<u8>)> {
        x[..n].iter().map(|&b| (b, pattern(b, salt, bs))).collect()
    };
    let write = |t: &[(u64, Vec<u8>)], checkpoint: bool| {
        let refs: Vec<(u64, &[u8])> = t.iter().map(|(b, d)| (*b, d.as_slice())).collect();
        ext.journal_write(&refs, &[], checkpoint).unwrap();
    };
    for salt in 1..=3 {
        write(&txn(salt, 300), true);
    }
    write(&txn(4, 300), false);
    write(&txn(5, 10), false);
    drop((_raw, ext));
    for &b in &x {
        assert!(
            block_of(&img, b, bs) == pattern(b, 3, bs),
            "{}",
            flavour.name
        );
    }
    let dump = sh(Command::new("debugfs").args(["-R", "logdump"]).arg(&img));
    let start: u64 = dump
        .split("Journal starts at block ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{dump}"));
    let last_commit: u64 = dump
        .rsplit("(commit block) at block ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{dump}"));
    assert!(
        last_commit < start && dump.matches("(commit block)").count() == 2,
        "{}: the log does not wrap: {dump}",
        flavour.name
    );
    let mut want = txn(5, 10);
    want.extend(txn(4, 300).into_iter().skip(10));
    check_replays(&img, &want, flavour.name);
}

#[test]
fn transactions_wrap_around_the_log() {
    if !need_e2fsprogs() {
        return;
    }
    for f in [EXT3, EXT4] {
        wrap_around(f);
    }
}

fn fsync(p: &Path) {
    std::fs::File::open(p).unwrap().sync_all().unwrap();
}

/// An image whose journal the kernel left needing recovery: files and
/// directories created, changed and removed under mount options `opts`, each
/// change fsync'd (so committed), the image copied while still mounted (at rest:
/// one moment's state, see `copy_at_rest`). The
/// kernel checkpoints lazily, so the copy holds committed transactions not yet
/// written in place. `None` (with the reason printed) without root.
fn kernel_left_needing_recovery(tag: &str, mkfs: &[&str], opts: &str) -> Option<PathBuf> {
    let img = scratch(&format!("kernel-{tag}.img"));
    mke2fs(&img, mkfs, 32);
    settle_writeback();
    let m = kernel_mount(&img, &format!("rw,{opts}"))?;
    let r = m.path();
    std::fs::create_dir(r.join("dir")).unwrap();
    for i in 0..30u64 {
        let p = r.join(format!("dir/f{i}"));
        let mut data: Vec<u8> = (0..(i * 911 + 5000))
            .flat_map(|k| pattern(k, i, 1))
            .collect();
        if i % 3 == 0 {
            // Data blocks that begin with the jbd2 magic: with data=journal
            // they are logged escaped.
            data[..4].copy_from_slice(&JBD2_MAGIC);
        }
        std::fs::write(&p, &data).unwrap();
        fsync(&p);
    }
    // A directory of a few blocks, logged, then removed: in ordered mode its
    // freed blocks are revoked, so recovery must skip their logged copies.
    std::fs::create_dir(r.join("gone")).unwrap();
    for i in 0..150 {
        std::fs::write(r.join(format!("gone/{i:0>40}")), b"x").unwrap();
    }
    fsync(&r.join("gone"));
    std::fs::remove_dir_all(r.join("gone")).unwrap();
    for i in (0..30).step_by(4) {
        std::fs::remove_file(r.join(format!("dir/f{i}"))).unwrap();
    }
    std::fs::rename(r.join("dir/f1"), r.join("moved")).unwrap();
    fsync(&r.join("dir"));
    fsync(r);
    let copy = scratch(&format!("kernel-{tag}-crash.img"));
    copy_at_rest(&img, &copy);
    drop(m);
    if !needs_recovery(&copy) {
        skip(format!("({tag}) the copy does not need recovery"));
        return None;
    }
    Some(copy)
}

/// A journal the kernel left needing recovery is replayed on disk by dio (a
/// writable open) into the same image as `e2fsck -E journal_only` makes, which
/// e2fsck then finds clean.
#[test]
fn kernel_journal_is_replayed_on_disk_like_e2fsck() {
    if !need_e2fsprogs() {
        return;
    }
    let cases: [(&str, &[&str], &str); 2] = [
        // Ordered data, csum v3, 64-bit tags, 4 KiB blocks.
        ("ext4", &["-t", "ext4", "-b", "4096"], "data=ordered"),
        // ext3 with data in the journal: escaped copies, 32-bit tags, 1 KiB.
        ("ext3-data", &["-t", "ext3", "-b", "1024"], "data=journal"),
    ];
    for (tag, mkfs, opts) in cases {
        let Some(img) = kernel_left_needing_recovery(tag, mkfs, opts) else {
            return;
        };
        let jo = copy(&img, "journal_only");
        let (code, out) = e2fsck(&jo, &["-y", "-E", "journal_only"]);
        assert_eq!(code, 0, "{tag}: {out}");
        let dio = copy(&img, "dio");
        {
            let (_raw, ext) = open(&dio, true);
            let r = ext.journal_replay().unwrap();
            assert!(
                r.on_disk && r.transactions > 0 && r.blocks > 0,
                "{tag}: {r:?}"
            );
            eprintln!("{tag}: dio replayed {r:?}");
            // Ordered mode revokes the removed directory's blocks (data=journal
            // never revokes).
            assert_eq!(r.revoked > 0, opts == "data=ordered", "{tag}: {r:?}");
        }
        assert!(!needs_recovery(&dio));
        assert_same_image(&dio, &jo, tag);
        assert_clean(&dio);
    }
}

/// The cost of a commit, for the report (set DIO_JBD2_BENCH=1): transactions of
/// 1, 16 and 256 blocks, checkpointed or not, on a 4 KiB-block ext4 image with
/// a 16 MiB journal, beside the same blocks written in place and flushed.
#[test]
fn commit_cost() {
    if std::env::var_os("DIO_JBD2_BENCH").is_none() {
        skip("set DIO_JBD2_BENCH=1 to measure the commit cost");
        return;
    }
    if !need_e2fsprogs() {
        return;
    }
    let img = scratch("bench.img");
    let _ = std::fs::remove_file(&img);
    // A file with every block written (no holes: the host file system would
    // allocate at the first write of each, and its flushes would time that).
    std::fs::write(&img, vec![0u8; 128 << 20]).unwrap();
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-J", "size=16"])
        .args(["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&img));
    debugfs(&img, &["jo -c", "jc"]);
    let x = free_blocks(&img, 256, 16000);
    let (raw, ext) = open(&img, true);
    let dev = Arc::clone(raw.direct().device());
    let bs = ext.block_size() as usize;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    for n in [1usize, 16, 256] {
        let blocks: Vec<(u64, Vec<u8>)> = x[..n].iter().map(|&b| (b, pattern(b, 7, bs))).collect();
        let refs: Vec<(u64, &[u8])> = blocks.iter().map(|(b, d)| (*b, d.as_slice())).collect();
        let rounds = (1024 / n).clamp(10, 100);
        // Three ways, alternated, five times: a checkpointed commit, a commit
        // left in the journal, and the unjournaled reference (the blocks written
        // in place, then one flush).
        let (mut ck, mut nock, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            for (way, out) in [(0, &mut ck), (1, &mut nock), (2, &mut plain)] {
                let t = std::time::Instant::now();
                for _ in 0..rounds {
                    match way {
                        0 | 1 => ext.journal_write(&refs, &[], way == 0).unwrap(),
                        _ => {
                            // One write per run of consecutive blocks.
                            let mut i = 0;
                            while i < blocks.len() {
                                let mut j = i + 1;
                                while j < blocks.len() && blocks[j].0 == blocks[j - 1].0 + 1 {
                                    j += 1;
                                }
                                let mut buf = dio::AlignedBuf::new((j - i) * bs, 4096);
                                for (k, (_, d)) in blocks[i..j].iter().enumerate() {
                                    buf[k * bs..(k + 1) * bs].copy_from_slice(d);
                                }
                                let at = blocks[i].0 * bs as u64;
                                dio::write_device(&*dev, at, &mut buf, false).unwrap();
                                i = j;
                            }
                            dev.flush().unwrap();
                        }
                    }
                }
                out.push((n * rounds) as f64 / t.elapsed().as_secs_f64());
            }
            ext.journal_write(&[], &[], true).unwrap();
        }
        let ratio: Vec<f64> = plain.iter().zip(&ck).map(|(p, c)| p / c).collect();
        eprintln!(
            "{n:>3}-block transactions: checkpointed {:>7.0} blocks/s, uncheckpointed {:>7.0} blocks/s, unjournaled in place + flush {:>7.0} blocks/s; checkpointed costs {:.2}x the unjournaled time (median of 5 pairs)",
            median(ck.clone()),
            median(nock.clone()),
            median(plain.clone()),
            median(ratio)
        );
    }
    ext.journal_write(&[], &[], true).unwrap();
}

/// The error of a writable open of `img` (which must fail), the image closed.
fn writable_open_error(img: &Path) -> dio::Error {
    let raw = raw(img, true);
    Ext::open_writable(Arc::clone(raw.direct().device()), raw.size()).unwrap_err()
}

/// What a writable open refuses, before changing a byte: an external journal
/// device (no journal inode to write transactions into) and fast-commit
/// journals. Without a journal (ext2) metadata is written in place.
#[test]
fn writable_opens_refuse_journals_dio_cannot_write() {
    if !need_e2fsprogs() {
        return;
    }
    let img = make_image(EXT4, "external");
    debugfs(&img, &["ssv journal_inum 0"]);
    let before = std::fs::read(&img).unwrap();
    let e = writable_open_error(&img);
    assert!(
        matches!(&e, dio::Error::Incompatible(i) if i.feature == dio::Feature::ExternalJournal),
        "{e}"
    );
    assert!(std::fs::read(&img).unwrap() == before);

    let img = make_image(EXT4, "fast-commit");
    sh(Command::new("tune2fs")
        .args(["-O", "fast_commit"])
        .arg(&img));
    let e = writable_open_error(&img);
    assert!(
        matches!(&e, dio::Error::Incompatible(i) if i.feature == dio::Feature::FastCommit),
        "{e}"
    );

    let ext2 = scratch("ext2.img");
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2"])
        .arg("-d")
        .arg(scratch("ext4-external.tree"))
        .arg(&ext2)
        .arg("8M"));
    let (_raw, ext) = open(&ext2, true);
    assert!(!ext.is_journaled());
    ext.open_file(&ext.lookup(b"/f", false).unwrap())
        .unwrap()
        .touch()
        .unwrap();
    drop((_raw, ext));
    assert_clean(&ext2);
}

/// Transactions dio cannot write are refused with nothing written: a block
/// past the file system, given twice, of the wrong length, one of the
/// journal's own, more than the journal holds; and on a read-only open.
#[test]
fn bad_transactions_are_refused_and_change_nothing() {
    if !need_e2fsprogs() {
        return;
    }
    let img = make_image(EXT3, "refused");
    let before = std::fs::read(&img).unwrap();
    {
        let (_raw, ext) = open(&img, false);
        let b = vec![0u8; ext.block_size() as usize];
        assert!(matches!(
            ext.journal_write(&[(3000, &b)], &[], true),
            Err(dio::Error::ReadOnly)
        ));
    }
    let (_raw, ext) = open(&img, true);
    let bs = ext.block_size() as usize;
    let blocks = ext.superblock().blocks_count;
    let b = vec![1u8; bs];
    let invalid = |r: dio::Result<()>| matches!(r, Err(dio::Error::Invalid(_)));
    assert!(invalid(ext.journal_write(&[(blocks, &b)], &[], true)));
    assert!(invalid(ext.journal_write(
        &[(3000, &b), (3000, &b)],
        &[],
        true
    )));
    assert!(invalid(ext.journal_write(&[(3000, &b[1..])], &[], true)));
    assert!(invalid(ext.journal_write(&[], &[blocks + 5], true)));
    let journal_block = {
        sh(Command::new("debugfs").args(["-R", "bmap <8> 5"]).arg(&img))
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert!(invalid(ext.journal_write(
        &[(journal_block, &b)],
        &[],
        true
    )));
    let many: Vec<(u64, &[u8])> = (2000..4000).map(|x| (x, b.as_slice())).collect();
    assert!(matches!(
        ext.journal_write(&many, &[], true),
        Err(dio::Error::NoSpace(_))
    ));
    drop((_raw, ext));
    assert!(std::fs::read(&img).unwrap() == before);
}

/// A journal holding transactions although the superblock does not say it
/// needs recovery is discarded at a writable open, as the kernel's mount
/// discards it (jbd2_journal_wipe), and the next transaction's id is past
/// every stale one: e2fsck then replays the new transaction and only it.
#[test]
fn a_log_without_needs_recovery_is_discarded_and_new_ids_pass_it() {
    if !need_e2fsprogs() {
        return;
    }
    let img = make_image(EXT4, "wipe");
    let (_raw, ext) = open(&img, false);
    let bs = ext.block_size() as usize;
    drop((_raw, ext));
    let x = free_blocks(&img, 11, 3000);
    {
        // Transactions of one block each, at log blocks 1-3 (checkpointed),
        // 4-6, 7-9 and 10-12 (ids 2 to 5).
        let (_raw, ext) = open(&img, true);
        for (i, &b) in x[..4].iter().enumerate() {
            let d = pattern(b, 1, bs);
            ext.journal_write(&[(b, &d)], &[], i == 0).unwrap();
        }
    }
    debugfs(&img, &["feature -needs_recovery"]);
    let (_raw, ext) = open(&img, true);
    assert!(ext.journal_replay().is_none());
    // Seven blocks: log blocks 1-9, so recovery next looks at block 10, which
    // holds a stale transaction whose id follows the journal superblock's
    // sequence + 1: a writer that took that id would have it replayed.
    let new: Vec<(u64, Vec<u8>)> = [x[0]]
        .iter()
        .chain(&x[4..10])
        .map(|&b| (b, pattern(b, 2, bs)))
        .collect();
    let refs: Vec<(u64, &[u8])> = new.iter().map(|(b, d)| (*b, d.as_slice())).collect();
    ext.journal_write(&refs, &[], false).unwrap();
    drop((_raw, ext));
    let mut want = new;
    want.extend(x[1..4].iter().map(|&b| (b, vec![0u8; bs])));
    check_replays(&img, &want, "wiped");
}

/// What a device saw: writes (offset, bytes) and flushes, in order.
enum Event {
    Write(u64, Vec<u8>),
    Flush,
}

/// A RAM device that records every write and flush.
struct Recorder {
    inner: dio::MemDevice,
    events: std::sync::Mutex<Vec<Event>>,
}

impl dio::DeviceWrapper for Recorder {
    type Inner = dio::MemDevice;
    fn inner(&self) -> &dio::MemDevice {
        &self.inner
    }
    fn submit(&self, req: dio::Request) {
        if req.op() == dio::Op::Write {
            let mut b = vec![0u8; req.len() as usize];
            req.copy_out(0, &mut b);
            let mut ev = self.events.lock().unwrap();
            ev.push(Event::Write(req.offset(), b));
            if req.fua() {
                ev.push(Event::Flush);
            }
        }
        dio::Device::submit(&self.inner, req);
    }
    fn flush(&self) -> std::io::Result<()> {
        self.events.lock().unwrap().push(Event::Flush);
        dio::Device::flush(&self.inner)
    }
    fn name(&self) -> &str {
        "recorder"
    }
}

/// Every crash state of an in-place overwrite followed by `touch` (its inode
/// update committed through the journal and checkpointed), under a volatile
/// write cache: at each flush, the durable prefix plus any subset of the writes
/// issued since. e2fsck replays each state into a clean file system whose /f
/// is wholly the old or wholly the new (inode and data), and the new one from
/// the flush after the commit block on; the new inode never with the old data.
fn crash_states(flavour: Flavour) {
    let img = make_image(flavour, "crash");
    let base = std::fs::read(&img).unwrap();
    let size = base.len() as u64;
    let mem = dio::MemDevice::new(dio::MemDeviceConfig::new(size, 512));
    mem.write_raw(0, &base);
    let rec = Arc::new(Recorder {
        inner: mem,
        events: std::sync::Mutex::new(Vec::new()),
    });
    let (old_inode, new_inode, ino_at, data_at) = {
        let ext = Ext::open_writable(Arc::clone(&rec) as Arc<dyn dio::Device>, size).unwrap();
        let bs = u64::from(ext.block_size());
        let f = ext.open_file(&ext.lookup(b"/f", false).unwrap()).unwrap();
        let old = f.inode();
        let data_at = ext.extents(&old).unwrap()[0].physical * bs;
        f.write_at(0, &[9u8; 4096]).unwrap();
        f.touch().unwrap();
        (old, f.inode(), inode_offset(&img, "/f", bs), data_at)
    };
    let events = std::mem::take(&mut *rec.events.lock().unwrap());
    let flushes = events.iter().filter(|e| matches!(e, Event::Flush)).count();
    assert!(flushes >= 2, "{}: {flushes} flushes", flavour.name);
    let isz = new_inode.raw().len();
    let state = scratch(&format!("{}-crash-state.img", flavour.name));
    let mut durable = base.clone();
    let mut window: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut seen_flushes = 0;
    let mut states = 0;
    for ev in events.iter().chain(std::iter::once(&Event::Flush)) {
        match ev {
            Event::Write(at, b) => window.push((*at, b.clone())),
            Event::Flush => {
                assert!(window.len() <= 8, "{} writes between flushes", window.len());
                for mask in 0u32..(1 << window.len()) {
                    let mut img_bytes = durable.clone();
                    for (i, (at, b)) in window.iter().enumerate() {
                        if mask & (1 << i) != 0 {
                            img_bytes[*at as usize..*at as usize + b.len()].copy_from_slice(b);
                        }
                    }
                    std::fs::write(&state, &img_bytes).unwrap();
                    let (code, out) = e2fsck(&state, &["-fy"]);
                    let what = format!(
                        "{}: crash after flush {seen_flushes}, writes {mask:#b} of {}",
                        flavour.name,
                        window.len()
                    );
                    assert!(code <= 1, "{what}: e2fsck -fy: {out}");
                    assert_clean(&state);
                    let inode = read_at(&state, ino_at, isz);
                    let data = read_at(&state, data_at, 4096);
                    let is_new = inode == new_inode.raw();
                    assert!(is_new || inode == old_inode.raw(), "{what}: a torn inode");
                    assert!(
                        data == [9u8; 4096] || data == [7u8; 4096],
                        "{what}: torn data"
                    );
                    if is_new {
                        assert!(data == [9u8; 4096], "{what}: the new inode with old data");
                    }
                    // The commit block is durable from the second flush on.
                    if seen_flushes >= 2 {
                        assert!(is_new, "{what}: a committed update lost");
                    }
                    states += 1;
                }
                for (at, b) in window.drain(..) {
                    durable[at as usize..at as usize + b.len()].copy_from_slice(&b);
                }
                seen_flushes += 1;
            }
        }
    }
    eprintln!("{}: {states} crash states checked", flavour.name);
}

#[test]
fn every_crash_state_of_a_journaled_update_replays_to_old_or_new() {
    if !need_e2fsprogs() {
        return;
    }
    for f in [EXT4, EXT3] {
        crash_states(f);
    }
}

/// The volume label of `img`, from dumpe2fs.
fn label(img: &Path) -> String {
    let text = sh(Command::new("dumpe2fs").arg("-h").arg(img));
    text.lines()
        .find_map(|l| l.strip_prefix("Filesystem volume name:"))
        .unwrap_or_else(|| panic!("{text}"))
        .trim()
        .to_string()
}

/// The fs block holding the superblock, with volume label `name` (and the
/// superblock checksum where the file system has metadata_csum).
fn labelled_sb_block(img: &Path, bs: usize, name: &str) -> (u64, Vec<u8>) {
    let b = 1024 / bs as u64;
    let mut block = block_of(img, b, bs);
    let o = 1024 % bs;
    let sb = &mut block[o..o + 1024];
    sb[0x78..0x88].fill(0);
    sb[0x78..0x78 + name.len()].copy_from_slice(name.as_bytes());
    if u32::from_le_bytes(sb[0x64..0x68].try_into().unwrap()) & 0x400 != 0 {
        // The kernel's crc32c(~0, ...): the standard CRC-32C, inverted.
        let c = !crc32c::crc32c(&sb[..0x3FC]);
        sb[0x3FC..0x400].copy_from_slice(&c.to_le_bytes());
    }
    (b, block)
}

/// The superblock itself through the journal: checkpointed, it lands with
/// needs_recovery clear; left in the journal, every replayer restores it.
#[test]
fn superblock_changes_go_through_the_journal() {
    if !need_e2fsprogs() {
        return;
    }
    for flavour in [EXT4, EXT3] {
        let img = make_image(flavour, "label");
        let bs = open(&img, false).1.block_size() as usize;
        let (b, block) = labelled_sb_block(&img, bs, "checkpointed");
        {
            let (_raw, ext) = open(&img, true);
            ext.journal_write(&[(b, &block)], &[], true).unwrap();
        }
        assert!(!needs_recovery(&img));
        assert_eq!(label(&img), "checkpointed");
        assert_clean(&img);
        let (b, block) = labelled_sb_block(&img, bs, "replayed");
        {
            let (_raw, ext) = open(&img, true);
            ext.journal_write(&[(b, &block)], &[], false).unwrap();
        }
        assert!(needs_recovery(&img));
        assert_eq!(label(&img), "checkpointed", "{}", flavour.name);
        let fsck = copy(&img, "fsck");
        let (code, out) = e2fsck(&fsck, &["-fy"]);
        assert!(code <= 1, "{out}");
        assert_eq!(label(&fsck), "replayed", "{}", flavour.name);
        assert_clean(&fsck);
        let kimg = copy(&img, "kernel");
        if let Some(m) = kernel_mount(&kimg, "rw") {
            drop(m);
            assert_eq!(label(&kimg), "replayed", "{}", flavour.name);
        }
    }
}

/// Journaling's cost beside the unjournaled allocating path, for the report
/// (set DIO_JBD2_BENCH=1): a new 1 GiB file (`put_file`, 8 MiB writes) and
/// 10,000 small files (4 KiB each), on 4 KiB-block ext4 images with and
/// without a journal, alternated (3 pairs, median of the pairwise ratios),
/// each timed up to the file system's close (the journal checkpointed).
#[test]
fn journal_speed() {
    if std::env::var_os("DIO_JBD2_BENCH").is_none() {
        skip("set DIO_JBD2_BENCH=1 to measure journaling against the unjournaled path");
        return;
    }
    if !need_e2fsprogs() {
        return;
    }
    let pairs: usize = std::env::var("DIO_JBD2_BENCH_PAIRS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mkfs = |journal: bool| -> PathBuf {
        let img = scratch(&format!("speed-{journal}.img"));
        let _ = std::fs::remove_file(&img);
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(1400 << 20).unwrap();
        drop(f);
        sh(Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .args([
                "-O",
                if journal {
                    "has_journal"
                } else {
                    "^has_journal"
                },
            ])
            .args(["-E", "nodiscard"])
            .arg(&img));
        img
    };
    let time = |journal: bool, work: &dyn Fn(&Ext)| -> f64 {
        let img = mkfs(journal);
        let t = std::time::Instant::now();
        {
            let (_raw, ext) = open(&img, true);
            assert_eq!(ext.is_journaled(), journal);
            work(&ext);
            ext.checkpoint().unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        assert_clean(&img);
        std::fs::remove_file(&img).unwrap();
        s
    };
    let big = |ext: &Ext| {
        let chunk = vec![0x5Au8; 8 << 20];
        ext.put_file(b"/big", &dio::ext::Attrs::new(), |w| {
            for i in 0..128u64 {
                assert_eq!(w.write_at(i * chunk.len() as u64, &chunk)?, chunk.len());
            }
            Ok(())
        })
        .unwrap();
    };
    let small = |ext: &Ext| {
        let data = vec![0xA5u8; 4096];
        for d in 0..10 {
            ext.mkdir(format!("/d{d}").as_bytes(), &dio::ext::Attrs::new())
                .unwrap();
            for i in 0..1000 {
                let p = format!("/d{d}/f{i}");
                ext.put_file(p.as_bytes(), &dio::ext::Attrs::new(), |w| {
                    w.write_at(0, &data).map(|_| ())
                })
                .unwrap();
            }
        }
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    type Work<'a> = (&'a str, &'a dyn Fn(&Ext), f64);
    let works: [Work; 2] = [
        ("new 1 GiB file", &big, 1.3),
        ("10,000 small files", &small, 2.0),
    ];
    // DIO_JBD2_BENCH_ONLY=big or =small runs one of the two.
    let only = std::env::var("DIO_JBD2_BENCH_ONLY").unwrap_or_default();
    for (k, (what, work, target)) in works.into_iter().enumerate() {
        if (only == "big" && k != 0) || (only == "small" && k != 1) {
            continue;
        }
        let (mut j, mut n, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..pairs {
            let a = time(true, work);
            let b = time(false, work);
            j.push(a);
            n.push(b);
            ratios.push(a / b);
        }
        eprintln!(
            "{what}: journaled {:.2} s, unjournaled {:.2} s (medians); journaled/unjournaled {:.2}x (median of {pairs} pairwise ratios {ratios:.2?}; target {target}x)",
            median(j),
            median(n),
            median(ratios.clone()),
        );
    }
}

/// `s_last_orphan` of an image (its primary superblock in place).
fn last_orphan(img: &Path) -> u32 {
    u32::from_le_bytes(read_at(img, 1024 + 0xE8, 4).try_into().unwrap())
}

/// "Free blocks" and "Free inodes" of `dumpe2fs -h`.
fn free_counts(img: &Path) -> (u64, u64) {
    let text = sh(Command::new("dumpe2fs").arg("-h").arg(img));
    let get = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("dumpe2fs -h: no {key}"))
            .trim()
            .parse()
            .unwrap()
    };
    (get("Free blocks:"), get("Free inodes:"))
}

/// `img` (with an orphan list) processed two ways: by e2fsck -fy (copy B) and
/// by a writable dio open and close (copy A). A read-only dio open first
/// changes nothing. Both end with an empty list, the same free counts, and A
/// passes `e2fsck -fn`. Returns A.
fn orphans_like_e2fsck(img: &Path, what: &str) -> PathBuf {
    let before = std::fs::read(img).unwrap();
    {
        let (_raw, ext) = open(img, false);
        assert!(ext.lookup(b"/", true).is_ok());
    }
    assert!(
        std::fs::read(img).unwrap() == before,
        "{what}: a read-only open changed the image"
    );
    let b = copy(img, "e2fsck");
    let (code, out) = e2fsck(&b, &["-fy"]);
    assert!(code <= 1, "{what}: e2fsck -fy: {out}");
    let a = copy(img, "dio");
    {
        let (_raw, _ext) = open(&a, true);
    }
    assert_eq!(last_orphan(&a), 0, "{what}");
    assert!(!needs_recovery(&a), "{what}");
    assert_clean(&a);
    assert_eq!(
        free_counts(&a),
        free_counts(&b),
        "{what}: free blocks, inodes"
    );
    let _ = std::fs::remove_file(&b);
    a
}

/// The flavours of the orphan tests: ext4 with 4 KiB blocks, ext3 with 1 KiB.
const ORPHAN_FLAVOURS: [(&str, &[&str]); 2] = [
    ("ext4", &["-t", "ext4", "-b", "4096"]),
    ("ext3", &["-t", "ext3", "-b", "1024"]),
];

/// Orphans made with debugfs, as a crash mid-truncate and mid-unlink leaves
/// them: /t (64 KiB) with i_size cut to 5000, blocks past it still mapped, and
/// /u unlinked with its inode kept (links 0); the list /u -> /t. dio frees what
/// e2fsck frees, and /t reads its first 5000 bytes.
#[test]
fn orphan_list_is_processed_like_e2fsck() {
    if !need_e2fsprogs() || !have("dumpe2fs") {
        return;
    }
    for (name, mkfs) in ORPHAN_FLAVOURS {
        let tree = scratch(&format!("orphan-{name}.tree"));
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(&tree).unwrap();
        let t: Vec<u8> = (0..65536u64).flat_map(|k| pattern(k, 3, 1)).collect();
        std::fs::write(tree.join("t"), &t).unwrap();
        std::fs::write(tree.join("u"), vec![9u8; 40000]).unwrap();
        std::fs::write(tree.join("keep"), b"keep\n").unwrap();
        let img = scratch(&format!("orphan-{name}.img"));
        mke2fs(&img, &[mkfs, &["-d", tree.to_str().unwrap()]].concat(), 16);
        let ui = make_orphans(&img, 5000);
        assert_eq!(last_orphan(&img), ui);
        let a = orphans_like_e2fsck(&img, name);
        let (_raw, ext) = open(&a, false);
        let f = ext.open_file(&ext.lookup(b"/t", true).unwrap()).unwrap();
        let mut got = vec![0u8; 5000];
        assert_eq!(f.read_at(0, &mut got).unwrap(), 5000);
        assert!(got == t[..5000], "{name}: /t");
        assert!(ext.lookup(b"/u", true).is_err());
        drop((f, _raw, ext));
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_dir_all(&tree);
    }
}

/// Orphans the kernel made: a file open (and written) when it was unlinked,
/// the image copied while mounted after `sync -f`. dio's writable open
/// replays the journal and frees the orphan as e2fsck does.
#[test]
fn kernel_made_orphan_is_freed_like_e2fsck() {
    if !need_e2fsprogs() || !have("dumpe2fs") {
        return;
    }
    for (name, mkfs) in ORPHAN_FLAVOURS {
        let img = scratch(&format!("korphan-{name}.img"));
        mke2fs(&img, mkfs, 32);
        let Some(m) = kernel_mount(&img, "rw") else {
            return;
        };
        let r = m.path().to_path_buf();
        std::fs::write(r.join("keep"), vec![1u8; 30000]).unwrap();
        let held = {
            let p = r.join("gone");
            std::fs::write(&p, vec![2u8; 300_000]).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            std::fs::remove_file(&p).unwrap();
            f
        };
        sh(Command::new("sync").arg("-f").arg(&r));
        let crash = scratch(&format!("korphan-{name}-crash.img"));
        copy_at_rest(&img, &crash);
        drop(held);
        drop(m);
        let _ = std::fs::remove_file(&img);
        // The kernel wrote the list's head in place (e2fsck -E journal_only
        // would process the orphans too, so the copy is not replayed to look).
        if last_orphan(&crash) == 0 {
            skip(format!("({name}) the kernel's copy has no orphan list"));
            continue;
        }
        let a = orphans_like_e2fsck(&crash, name);
        let (_raw, ext) = open(&a, false);
        let f = ext.open_file(&ext.lookup(b"/keep", true).unwrap()).unwrap();
        assert_eq!(f.size(), 30000);
        drop((f, _raw, ext));
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&crash);
    }
}
