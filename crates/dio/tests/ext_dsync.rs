//! A dsync allocating write on an ext2/3/4 image is durable when it returns (the
//! seed's rule): on the RAM device's crash mode, a power loss right after the
//! call (sync) or its completion (async) keeps the bytes, the blocks and the size,
//! as `e2fsck -fy` (which replays the journal) and `debugfs` see them; on ext2
//! (indirect blocks), ext4 without a journal and ext4 with one. Dropping the
//! flush that makes the metadata durable (a mutation of the device) loses the
//! write, so the test would see a missing flush.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dio::ext::{Attrs, Ext};
use dio::{AlignedBuf, Device, Flags, MemDevice, MemDeviceConfig};
use dio_testkit::have;

fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-dsync");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkfs(name: &str, args: &[&str]) -> Vec<u8> {
    let img = scratch().join(format!("{name}.img"));
    std::fs::write(&img, vec![0xA5u8; 16 << 20]).unwrap();
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-E", "nodiscard"])
        .args(args)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "mke2fs {args:?}: {out:?}");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    bytes
}

/// A device that forwards to a RAM device and drops (answers without sending)
/// the flushes numbered in `drop` (counted from 1).
struct Flushes {
    inner: Arc<MemDevice>,
    count: AtomicU64,
    drop: Option<std::ops::RangeInclusive<u64>>,
}

impl Device for Flushes {
    fn geometry(&self) -> dio::Geometry {
        self.inner.geometry()
    }
    fn submit(&self, req: dio::Request) {
        self.inner.submit(req)
    }
    fn flush(&self) -> io::Result<()> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if self.drop.as_ref().is_some_and(|d| d.contains(&n)) {
            return Ok(());
        }
        self.inner.flush()
    }
    fn name(&self) -> &str {
        "flushes"
    }
}

/// What a run saw: the flush count before and after the last (async) write.
struct Run {
    image: Vec<u8>,
    last_write: (u64, u64),
}

const SYNC_LEN: usize = 10_000;
const ASYNC_AT: u64 = 64 << 10;
const ASYNC_LEN: usize = 8192;

fn expected() -> Vec<u8> {
    let mut v = vec![0u8; ASYNC_AT as usize + ASYNC_LEN];
    v[..SYNC_LEN].fill(0x5A);
    v[ASYNC_AT as usize..].fill(0xC3);
    v
}

/// Create /f and make it durable, then two dsync writes that allocate and
/// extend: `write_at` of 10,000 bytes at 0 (sync, unaligned end), and an async
/// 8 KiB write with `Flags::DSYNC` at 64 KiB (past a hole). The power goes
/// right after the second completes.
fn run(base: &[u8], dropped: Option<std::ops::RangeInclusive<u64>>) -> Run {
    let size = base.len() as u64;
    let ram = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512).crash_mode()));
    ram.write_raw(0, base);
    let dev = Arc::new(Flushes {
        inner: Arc::clone(&ram),
        count: AtomicU64::new(0),
        drop: dropped,
    });
    let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn Device>, size).unwrap();
    let inode = ext.create(b"/f", &Attrs::new()).unwrap();
    dev.flush().unwrap();
    let w = ext.writer(&inode).unwrap();
    w.set_dsync(true);
    assert_eq!(w.write_at(0, &[0x5A; SYNC_LEN]).unwrap(), SYNC_LEN);
    let before = dev.count.load(Ordering::SeqCst);
    let mut buf = AlignedBuf::new(ASYNC_LEN, 4096);
    buf.fill(0xC3);
    let done = w
        .direct()
        .write_future(ASYNC_AT, vec![buf], Flags::DSYNC)
        .wait();
    assert_eq!(done.result.unwrap(), ASYNC_LEN);
    let after = dev.count.load(Ordering::SeqCst);
    // The power goes now, before anything else (drops included) is written.
    ram.crash();
    let image = ram.read_raw(0, size as usize);
    drop(w);
    drop(ext);
    Run {
        image,
        last_write: (before, after),
    }
}

/// Repair the crashed image (journal replay included); the bytes of /f as
/// debugfs reads them.
fn after_crash(name: &str, image: &[u8]) -> Option<Vec<u8>> {
    let img = scratch().join(format!("{name}-crashed.img"));
    std::fs::write(&img, image).unwrap();
    let fix = Command::new("e2fsck")
        .arg("-fy")
        .arg(&img)
        .output()
        .unwrap();
    let code = fix.status.code().unwrap_or(-1);
    assert!(code <= 1, "{name}: e2fsck -fy exit {code}: {fix:?}");
    let check = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(check.status.success(), "{name}: e2fsck -fn: {check:?}");
    let out = scratch().join(format!("{name}-f.out"));
    let _ = std::fs::remove_file(&out);
    let dump = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /f {}", out.display()))
        .arg(&img)
        .output()
        .unwrap();
    let got = std::fs::read(&out).ok();
    let _ = std::fs::remove_file(&out);
    std::fs::remove_file(&img).unwrap();
    assert!(dump.status.success(), "{name}: debugfs: {dump:?}");
    got
}

/// "whole" when /f holds what both writes wrote, else what differs.
fn describe(got: Option<&[u8]>) -> String {
    let want = expected();
    match got {
        None => "no file".into(),
        Some(g) if g.len() != want.len() => format!("{} bytes, not {}", g.len(), want.len()),
        Some(g) => match g.iter().zip(&want).position(|(a, b)| a != b) {
            None => "whole".into(),
            Some(i) => format!("byte {i} is {:#04x}, not {:#04x}", g[i], want[i]),
        },
    }
}

#[test]
fn a_dsync_allocating_write_is_durable_when_it_returns() {
    if !have("mke2fs") || !have("e2fsck") || !have("debugfs") {
        eprintln!("skipped: needs mke2fs, e2fsck and debugfs");
        return;
    }
    let configs: [(&str, &[&str], bool); 4] = [
        ("ext2-1k", &["-t", "ext2", "-b", "1024"], false),
        (
            "ext4-4k-nojournal",
            &["-t", "ext4", "-b", "4096", "-O", "^has_journal"],
            false,
        ),
        (
            "ext4-1k-nojournal",
            &["-t", "ext4", "-b", "1024", "-O", "^has_journal"],
            false,
        ),
        ("ext4-4k-journal", &["-t", "ext4", "-b", "4096"], true),
    ];
    for (name, args, journal) in configs {
        let base = mkfs(name, args);
        let good = run(&base, None);
        let got = after_crash(name, &good.image);
        assert_eq!(
            describe(got.as_deref()),
            "whole",
            "{name}: the dsync writes are not all there after the crash"
        );
        // The mutation: the flushes that make the last write's metadata durable
        // (without a journal the last one, after the tree and inode; with one,
        // the commit block's and the checkpoint's) are dropped.
        let (before, after) = good.last_write;
        // (ext2's indirect table goes before the inode with its size, a flush
        // apart: dropping only the last leaves pointers to the written blocks,
        // from which e2fsck -fy rebuilds the size.)
        let k = if journal || name == "ext2-1k" { 2 } else { 1 };
        assert!(after >= before + k, "{name}: {before}..{after} flushes");
        let bad = run(&base, Some(after - k + 1..=after));
        let got = after_crash(&format!("{name}-mutant"), &bad.image);
        assert_ne!(
            describe(got.as_deref()),
            "whole",
            "{name}: the write survived without its flush: the test cannot see a missing one"
        );
    }
}
