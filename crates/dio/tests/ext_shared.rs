//! The ext client's handles: what a handle can do is what the file system
//! supports (no truncate, no write past i_size or into a preallocated extent,
//! through any handle), handles of one inode share their state (sub-block writes
//! from two handles to one block lose nothing), and metadata updates of inodes
//! that share an inode-table block do not lose each other. Images are made by
//! mke2fs and debugfs and checked with e2fsck and debugfs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};

use dio::ext::{Ext, ExtFile, Timestamp};
use dio::{Error, Flags};
use dio::{RawFile, RawOptions};
use dio_testkit::{assert_fsck_clean, bytes, have, sh, Rng};

/// Whether e2fsprogs is there; says why a test skips when it is not.
fn require_e2fsprogs() -> bool {
    let ok = have("mke2fs") && have("debugfs") && have("e2fsck");
    if !ok {
        eprintln!("skipping: e2fsprogs (mke2fs, debugfs, e2fsck) is not installed");
    }
    ok
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ext-shared-tests")
        .join(tag);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 16 MiB ext4 image (4 KiB blocks, 256-byte inodes, metadata_csum) with
/// `/f`: 8192 bytes (two written blocks) and an unwritten (preallocated) extent
/// of blocks 2..=5 past its size; `/g`: 5000 bytes; `/a`, `/b`, `/c`: 5000 bytes
/// each; `/u`: 16384 bytes, blocks 0..=1 written, 2..=3 unwritten; `/h`: 16384
/// bytes, blocks 0..=1 written, 2..=3 a hole. Inodes in creation order: f 12,
/// g 13, a 14, b 15, c 16, u 17, h 18.
fn make_image(tag: &str) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let dir = scratch_dir(tag);
    let img = dir.join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256"])
        .args(["-O", "metadata_csum,extent"])
        .arg(&img));
    let f = bytes(8192, 0x11);
    let g = bytes(5000, 0x22);
    std::fs::write(dir.join("f"), &f).unwrap();
    std::fs::write(dir.join("g"), &g).unwrap();
    let cmds = "write f f\nfallocate /f 2 5\nsif /f size 8192\nwrite g g\nwrite g a\nwrite g b\nwrite g c\nwrite f u\nfallocate /u 2 3\nsif /u size 16384\nwrite f h\nsif /h size 16384\n";
    std::fs::write(dir.join("cmds"), cmds).unwrap();
    sh(Command::new("debugfs")
        .current_dir(&dir)
        .args(["-w", "-f", "cmds"])
        .arg(&img));
    assert_fsck_clean(&img);
    let extents = sh(Command::new("debugfs").args(["-R", "ex /f"]).arg(&img));
    assert!(
        extents.lines().any(|l| l.contains("Uninit")),
        "no unwritten extent in /f: {extents}"
    );
    (img, f, g)
}

fn open(path: &Path) -> (RawFile, Ext) {
    let raw = RawFile::open(
        path,
        &RawOptions {
            write: true,
            ..RawOptions::default()
        },
    )
    .unwrap();
    let dev = Arc::clone(raw.direct().device());
    let ext = Ext::open_writable(dev, raw.size()).unwrap();
    (raw, ext)
}

fn open_file(ext: &Ext, path: &str) -> ExtFile {
    ext.open_file(&ext.lookup(path.as_bytes(), false).unwrap())
        .unwrap()
}

fn read_back(file: &ExtFile) -> Vec<u8> {
    let mut buf = vec![0u8; file.size() as usize];
    assert_eq!(file.read_at(0, &mut buf).unwrap(), buf.len());
    buf
}

/// Every handle an `ExtFile` gives out refuses a truncate and a write past
/// i_size (also into a preallocated extent, also into the last block's tail),
/// and nothing of it reaches the image. Before the fix, `direct()` was a
/// writable engine file on the raw device: `truncate(100)` zeroed bytes
/// 100..4096 of the first block, and a write at 8192 landed in the unwritten
/// extent and returned Ok.
#[test]
fn handles_cannot_truncate_or_write_past_what_ext_supports() {
    if !require_e2fsprogs() {
        return;
    }
    let (img, f_data, g_data) = make_image("refuse");
    let before = std::fs::read(&img).unwrap();
    let (raw, ext) = open(&img);
    let f = open_file(&ext, "/f");
    let g = open_file(&ext, "/g");
    let mut block = dio::AlignedBuf::new(4096, 4096);
    block.fill(0x5A);
    // Refused for what the file system does not support, not for alignment.
    let refused = |r: dio::Result<usize>, what: &str| match r {
        Err(Error::Misaligned { .. }) | Ok(_) => panic!("{what}: {r:?}"),
        Err(e) => eprintln!("{what}: {e}"),
    };

    // The read-only view.
    let d = f
        .direct()
        .expect("a file with data blocks has an engine view");
    assert!(d.truncate(100).is_err(), "direct().truncate(100)");
    assert!(d.truncate(4096).is_err(), "direct().truncate(4096)");
    assert!(d.truncate(0).is_err(), "direct().truncate(0)");
    assert!(matches!(
        d.write_at(8192, &block, Flags::NONE),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(
        d.write_at(0, &block, Flags::NONE),
        Err(Error::ReadOnly)
    ));
    // It still reads.
    let mut back = vec![0u8; 8192];
    assert_eq!(d.read_at(0, &mut back, Flags::UNALIGNED).unwrap(), 8192);
    assert!(back == f_data);

    // The writable handle: overwrites inside i_size only.
    for file in [&f, &g] {
        let w = file.overwriter().unwrap();
        let size = file.size();
        // (A truncate up inside the logical block holding EOF is the one call
        // the engine runs without asking the block map: it changes the engine
        // size of the shared state, nothing on disk and not `ExtFile::size`.)
        let eof_block = size.next_multiple_of(512);
        for to in [0, 100, 4096, size - 1, eof_block + 1, size + 4096, 1 << 20] {
            assert!(w.truncate(to).is_err(), "overwriter().truncate({to})");
        }
        // Past i_size: a whole block, bytes in the last block's tail, a write
        // that straddles EOF.
        let tail = size.next_multiple_of(4096);
        refused(w.write_at(tail, &block, Flags::NONE), "block past EOF");
        refused(
            w.write_at(tail, &block[..10], Flags::UNALIGNED),
            "bytes past EOF",
        );
        refused(
            w.write_at(size, &block[..10], Flags::UNALIGNED),
            "bytes at EOF",
        );
        refused(
            w.write_at(size - 4, &block[..10], Flags::UNALIGNED),
            "bytes across EOF",
        );
        refused(
            w.write_at(tail, &block, Flags::SKIP_HOLES),
            "skip-holes block past EOF",
        );
        // Async too.
        let buf = dio::AlignedBuf::new(4096, 4096);
        let done = w.write_future(tail, vec![buf], Flags::NONE).wait();
        assert!(done.result.is_err(), "async write past EOF");
    }
    // Inside i_size: an unwritten extent and a hole are never written, also
    // when the engine does not ask for allocation (skip-holes).
    let u = open_file(&ext, "/u");
    let h = open_file(&ext, "/h");
    for (file, what) in [(&u, "unwritten"), (&h, "hole")] {
        let w = file.overwriter().unwrap();
        refused(w.write_at(8192, &block, Flags::NONE), what);
        refused(w.write_at(8200, &block[..10], Flags::UNALIGNED), what);
        match w.write_at(8192, &block, Flags::SKIP_HOLES) {
            Ok(0) | Err(Error::Hole { .. }) => {}
            Err(Error::Misaligned { .. }) | Ok(_) => panic!("skip-holes into {what}"),
            Err(e) => eprintln!("skip-holes into {what}: {e}"),
        }
    }
    let mut zeros = vec![1u8; 8192];
    assert_eq!(u.read_at(8192, &mut zeros).unwrap(), 8192);
    assert!(
        zeros.iter().all(|&b| b == 0),
        "unwritten blocks read as zeros"
    );
    drop((u, h));
    // The file's own checked calls refuse the same.
    refused(f.write_at(8192, &block), "ExtFile::write_at past EOF");
    refused(
        g.write_at(4999, &block[..2]),
        "ExtFile::write_at across EOF",
    );

    // Nothing changed: not the sizes, not a byte of the image.
    assert_eq!((f.size(), g.size()), (8192, 5000));
    assert!(read_back(&f) == f_data);
    assert!(read_back(&g) == g_data);
    assert_eq!(f.overwriter().unwrap().size(), 8192);
    drop((f, g, ext, raw));
    let after = std::fs::read(&img).unwrap();
    if let Some(i) = (0..before.len()).find(|&i| before[i] != after[i]) {
        panic!("the image changed at byte {i}");
    }
    assert_fsck_clean(&img);
    let stat = sh(Command::new("debugfs").args(["-R", "stat /f"]).arg(&img));
    assert!(stat.contains("Size: 8192"), "{stat}");
}

/// Two handles of one inode, each from its own `open_file`, write bytes of the
/// same logical blocks at once (byte-granular, so each write reads, patches and
/// writes back its blocks): the handles share the inode's range locks, so
/// nothing is lost. Before the fix each handle had its own state, and one
/// handle's read-modify-write put back the other's old bytes.
#[test]
fn two_handles_sub_block_writes_to_one_block_lose_nothing() {
    if !require_e2fsprogs() {
        return;
    }
    let (img, _, g_data) = make_image("two-handles");
    let (raw, ext) = open(&img);
    let h1 = Arc::new(open_file(&ext, "/g"));
    let h2 = Arc::new(open_file(&ext, "/g"));
    // Slots of 24 bytes over the first 1536 bytes (the first logical blocks of
    // any device): handle 1 owns the even slots, handle 2 the odd ones.
    const SLOT: usize = 24;
    const SLOTS: usize = 64;
    const WRITES: usize = 3000;
    let barrier = Arc::new(Barrier::new(2));
    let writer = |h: Arc<ExtFile>, parity: usize, barrier: Arc<Barrier>| {
        std::thread::spawn(move || {
            let mut model = vec![None::<u8>; SLOTS * SLOT];
            let mut rng = Rng::new(parity as u64 + 1);
            barrier.wait();
            for n in 0..WRITES {
                let x = rng.next_u64();
                let slot = (x as usize % (SLOTS / 2)) * 2 + parity;
                let from = (x >> 8) as usize % SLOT;
                let len = 1 + (x >> 16) as usize % (SLOT - from);
                let at = slot * SLOT + from;
                let byte = (n % 251) as u8 ^ (parity as u8 * 0x80);
                let data = vec![byte; len];
                assert_eq!(h.write_at(at as u64, &data).unwrap(), len);
                model[at..at + len].fill(Some(byte));
            }
            model
        })
    };
    let t1 = writer(Arc::clone(&h1), 0, Arc::clone(&barrier));
    let t2 = writer(Arc::clone(&h2), 1, Arc::clone(&barrier));
    let (m1, m2) = (t1.join().unwrap(), t2.join().unwrap());
    let mut expect = g_data.clone();
    for (i, b) in m1.iter().zip(&m2).enumerate() {
        match b {
            (Some(v), None) | (None, Some(v)) => expect[i] = *v,
            (None, None) => {}
            (Some(_), Some(_)) => unreachable!("slots are disjoint"),
        }
    }
    h1.touch().unwrap();
    for (name, h) in [("handle 1", &h1), ("handle 2", &h2)] {
        let got = read_back(h);
        if let Some(i) = (0..got.len()).find(|&i| got[i] != expect[i]) {
            panic!(
                "{name}: byte {i} is {:#04x}, the model says {:#04x}: a write was lost",
                got[i], expect[i]
            );
        }
    }
    drop((h1, h2, ext, raw));
    assert_fsck_clean(&img);
    let cat = Command::new("debugfs")
        .args(["-R", "cat /g"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(cat.stdout == expect, "debugfs sees what the model says");
}

/// mtime and ctime as `debugfs -R 'stat PATH'` prints them: (seconds, nanoseconds).
fn debugfs_times(img: &Path, path: &str) -> [(u32, u32); 2] {
    let out = sh(Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(img));
    let field = |name: &str| {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"));
        let v = line.split_whitespace().nth(1).unwrap();
        let (s, e) = v.trim_start_matches("0x").split_once(':').unwrap();
        let secs = u32::from_str_radix(s, 16).unwrap();
        let extra = u32::from_str_radix(e, 16).unwrap();
        (secs, extra >> 2)
    };
    [field("mtime:"), field("ctime:")]
}

fn times(t: Timestamp) -> (u32, u32) {
    (t.secs as u32, t.nsecs)
}

/// Two files whose inodes share one 512-byte block of the inode table are
/// overwritten and touched at once, round after round: each inode keeps its own
/// update (mtime, ctime, checksum), as read back by dio, debugfs and e2fsck.
/// Before the fix, two inode writes read-modify-wrote the shared device block
/// without a lock, and one put back the other's old inode.
#[test]
fn concurrent_updates_of_inodes_sharing_a_block_keep_both() {
    if !require_e2fsprogs() {
        return;
    }
    let (img, _, _) = make_image("shared-block");
    let (raw, ext) = open(&img);
    let a = Arc::new(open_file(&ext, "/b"));
    let b = Arc::new(open_file(&ext, "/c"));
    let isz = u64::from(ext.superblock().inode_size);
    let sector = |f: &ExtFile| (u64::from(f.inode().ino) - 1) * isz / 512;
    assert_eq!(
        sector(&a),
        sector(&b),
        "the two inodes share a 512-byte block"
    );
    const ROUNDS: usize = 400;
    let barrier = Arc::new(Barrier::new(3));
    let worker = |f: Arc<ExtFile>, seed: u8, barrier: Arc<Barrier>| {
        std::thread::spawn(move || {
            for r in 0..ROUNDS {
                barrier.wait();
                let data = [seed ^ r as u8; 7];
                f.overwrite((r * 13 % 4000) as u64, &data).unwrap();
                barrier.wait();
            }
        })
    };
    let ta = worker(Arc::clone(&a), 0x0F, Arc::clone(&barrier));
    let tb = worker(Arc::clone(&b), 0xF0, Arc::clone(&barrier));
    let mut lost = Vec::new();
    for r in 0..ROUNDS {
        barrier.wait();
        barrier.wait();
        // Both updates of this round are done: each inode on disk must be what
        // its handle wrote (a read checks the inode checksum too).
        for (name, f) in [("/b", &a), ("/c", &b)] {
            let wrote = f.inode();
            let disk = ext.inode(wrote.ino).unwrap();
            if (disk.mtime, disk.ctime) != (wrote.mtime, wrote.ctime) {
                lost.push(format!(
                    "round {r}: {name} on disk {:?}, written {:?}",
                    disk.mtime, wrote.mtime
                ));
            }
        }
    }
    ta.join().unwrap();
    tb.join().unwrap();
    assert!(
        lost.is_empty(),
        "{} lost inode updates, first: {}",
        lost.len(),
        lost[0]
    );
    let want = [a.inode(), b.inode()].map(|i| [times(i.mtime), times(i.ctime)]);
    drop((a, b, ext, raw));
    assert_fsck_clean(&img);
    assert_eq!(debugfs_times(&img, "/b"), want[0], "debugfs stat /b");
    assert_eq!(debugfs_times(&img, "/c"), want[1], "debugfs stat /c");
}
