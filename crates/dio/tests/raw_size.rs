//! A byte-granular write ([`Flags::UNALIGNED`]) on a host file whose size is not a
//! multiple of the logical block pads its last block to a whole block on the
//! device; the host file must still end where the bytes end, as `pwrite` without
//! `O_DIRECT` would leave it. Checked against the kernel's idea of the file
//! (`std::fs::metadata().len()`, `std::fs::read`) and a byte model, on io_uring and
//! the pread/pwrite back end, sync and async, and with threads appending while
//! others write inside the last partial block.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`): tmpfs may refuse
//! O_DIRECT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dio::{Backend, Flags, RawFile, RawOptions};
use dio_testkit::{bytes, skip, Rng};

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

/// Open `path` for writing on `backend`; None (with a note) where io_uring is
/// unavailable.
fn open(path: &Path, backend: Backend) -> Option<RawFile> {
    let opts = RawOptions {
        write: true,
        backend,
        ..RawOptions::default()
    };
    match RawFile::open(path, &opts) {
        Ok(f) => Some(f),
        Err(e) if backend == Backend::Uring => {
            skip(format!("io_uring unavailable: {e}"));
            None
        }
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

/// The host file, the engine and the model agree.
fn check(path: &Path, f: &RawFile, model: &[u8], what: &str) {
    let len = std::fs::metadata(path).expect("stat").len();
    assert_eq!(len, model.len() as u64, "{what}: host file size");
    assert_eq!(f.size(), model.len() as u64, "{what}: engine size");
    let on_disk = std::fs::read(path).expect("read back");
    assert!(
        on_disk == model,
        "{what}: host file bytes differ from the model"
    );
}

fn apply(model: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[off as usize..end].copy_from_slice(data);
}

/// Writes inside, across and past the last partial block, and exactly to a block
/// end; `how` picks the call: 0 `RawFile::write_at`, 1 `DirectFile::write` from
/// unaligned memory, 2 `DirectFile::write_future`.
fn writes_keep_the_size(backend: Backend, how: u32) {
    let dir = scratch();
    let path = dir.path().join("s.bin");
    let mut model = bytes(1712, 1);
    std::fs::write(&path, &model).unwrap();
    let Some(f) = open(&path, backend) else {
        return;
    };
    let cases: &[(u64, usize)] = &[
        (1000, 700),  // the CLI repro: ends inside the last partial block
        (1600, 50),   // inside the last partial block only
        (1536, 100),  // aligned start, inside the last block
        (1700, 12),   // up to the end exactly
        (1700, 300),  // across the end, still inside the block
        (1900, 500),  // across the block end
        (2400, 1),    // one byte past the end
        (9000, 77),   // far past the end: a hole between
        (10000, 240), // appending to a block boundary (10240)
        (10240, 5),   // appending from a block boundary
        (3, 4000),    // across the whole front, not reaching the end
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = bytes(len, 100 + i as u64);
        let n = match how {
            0 => f.write_at(off, &data).unwrap(),
            1 => {
                // Memory one byte off alignment, so the middle is bounced too.
                let mut v = vec![0u8; len + 1];
                v[1..].copy_from_slice(&data);
                f.direct()
                    .write(off, &[std::io::IoSlice::new(&v[1..])], Flags::UNALIGNED)
                    .unwrap()
            }
            _ => {
                let c = f
                    .direct()
                    .write_future(off, vec![data.clone()], Flags::UNALIGNED)
                    .wait();
                c.result.unwrap()
            }
        };
        assert_eq!(n, len, "write {off}+{len}");
        apply(&mut model, off, &data);
        check(
            &path,
            &f,
            &model,
            &format!("write {off}+{len} (call {how})"),
        );
    }
    // A truncate to a partial block, then writes again.
    f.set_len(5000).unwrap();
    model.truncate(5000);
    check(&path, &f, &model, "set_len 5000");
    let data = bytes(30, 7);
    f.write_at(4990, &data).unwrap();
    apply(&mut model, 4990, &data);
    check(&path, &f, &model, "write 4990+30 after set_len");
}

#[test]
fn sync_backend_writes_keep_the_host_size() {
    for how in 0..3 {
        writes_keep_the_size(Backend::Sync, how);
    }
}

#[test]
fn uring_writes_keep_the_host_size() {
    for how in 0..3 {
        writes_keep_the_size(Backend::Uring, how);
    }
}

/// Threads append in unaligned pieces while others write inside the initial last
/// partial block (each its own bytes) and others write far-off aligned blocks
/// below the end: the host file ends where the appends end, and every byte is the
/// last one written there. A trim to a stale size would cut an append.
fn appends_race_tail_writes(backend: Backend) {
    let dir = scratch();
    let path: PathBuf = dir.path().join("race.bin");
    let start = bytes(1712, 3);
    std::fs::write(&path, &start).unwrap();
    let Some(f) = open(&path, backend) else {
        return;
    };
    let f = Arc::new(f);
    const PIECE: usize = 301;
    const APPENDS: usize = 60;
    const TAIL_WRITERS: u64 = 3;
    std::thread::scope(|s| {
        // The appender: sequential unaligned appends.
        let fa = Arc::clone(&f);
        s.spawn(move || {
            for k in 0..APPENDS {
                let off = 1712 + (k * PIECE) as u64;
                let data = bytes(PIECE, 1000 + k as u64);
                assert_eq!(fa.write_at(off, &data).unwrap(), PIECE);
            }
        });
        // Tail writers: writer i owns bytes [1540 + 50 i, +40), inside the
        // initial last partial block [1536, 1712).
        for i in 0..TAIL_WRITERS {
            let ft = Arc::clone(&f);
            s.spawn(move || {
                let mut rng = Rng::new(i + 9);
                for round in 0..80u64 {
                    let at = 1540 + 50 * i + rng.below(20);
                    let len = 40 - (at - (1540 + 50 * i)) as usize;
                    let data = vec![(round % 251) as u8 + 1; len];
                    assert_eq!(ft.write_at(at, &data).unwrap(), len);
                }
                // The last word: the whole owned range.
                let data = vec![0xA0 + i as u8; 40];
                ft.write_at(1540 + 50 * i, &data).unwrap();
            });
        }
        // Async writes inside the tail block too, from another thread.
        let fx = Arc::clone(&f);
        s.spawn(move || {
            for round in 0..40u8 {
                let c = fx
                    .direct()
                    .write_future(1700, vec![vec![round; 10]], Flags::UNALIGNED)
                    .wait();
                assert_eq!(c.result.unwrap(), 10);
            }
            let c = fx
                .direct()
                .write_future(1700, vec![vec![0xEE; 10]], Flags::UNALIGNED)
                .wait();
            assert_eq!(c.result.unwrap(), 10);
        });
    });
    let mut model = start;
    for k in 0..APPENDS {
        apply(
            &mut model,
            1712 + (k * PIECE) as u64,
            &bytes(PIECE, 1000 + k as u64),
        );
    }
    for i in 0..TAIL_WRITERS {
        apply(&mut model, 1540 + 50 * i, &[0xA0 + i as u8; 40]);
    }
    apply(&mut model, 1700, &[0xEE; 10]);
    check(&path, &f, &model, "after the race");
}

#[test]
fn sync_backend_appends_race_tail_writes() {
    appends_race_tail_writes(Backend::Sync);
}

#[test]
fn uring_appends_race_tail_writes() {
    appends_race_tail_writes(Backend::Uring);
}

/// Far-off appends (each past the end, leaving a hole) race writes inside the last
/// partial block: the trim of a tail write must never cut a concurrent append
/// beyond its block, and a truncate in between keeps everything consistent.
fn sparse_appends_race(backend: Backend) {
    let dir = scratch();
    let path = dir.path().join("sparse.bin");
    std::fs::write(&path, bytes(1000, 5)).unwrap();
    let Some(f) = open(&path, backend) else {
        return;
    };
    let f = Arc::new(f);
    std::thread::scope(|s| {
        let fa = Arc::clone(&f);
        s.spawn(move || {
            for k in 0..40u64 {
                let off = 8192 + k * 4096 + 100;
                fa.write_at(off, &[k as u8 + 1; 33]).unwrap();
            }
        });
        let ft = Arc::clone(&f);
        s.spawn(move || {
            for k in 0..200u64 {
                ft.write_at(900 + k % 50, &[7u8; 20]).unwrap();
            }
        });
    });
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, 8192 + 39 * 4096 + 133, "host size");
    assert_eq!(f.size(), len, "engine size");
    let data = std::fs::read(&path).unwrap();
    for k in 0..40u64 {
        let at = (8192 + k * 4096 + 100) as usize;
        assert!(
            data[at..at + 33].iter().all(|&b| b == k as u8 + 1),
            "append {k} lost"
        );
    }
    assert!(data[900..969].iter().all(|&b| b == 7), "tail writes lost");
    assert!(data[1000..8292].iter().all(|&b| b == 0), "hole not zero");
}

#[test]
fn sync_backend_sparse_appends_race_tail_writes() {
    sparse_appends_race(Backend::Sync);
}

#[test]
fn uring_sparse_appends_race_tail_writes() {
    sparse_appends_race(Backend::Uring);
}

/// Truncates (down and up, to sizes inside blocks) race writes inside and past
/// the last partial block: afterwards the host file is as long as the engine
/// says, and its bytes past the last truncate's size are the writes' own.
fn truncates_race_tail_writes(backend: Backend) {
    let dir = scratch();
    let path = dir.path().join("trunc.bin");
    std::fs::write(&path, bytes(3000, 6)).unwrap();
    let Some(f) = open(&path, backend) else {
        return;
    };
    let f = Arc::new(f);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let fw = Arc::clone(&f);
            s.spawn(move || {
                let mut rng = Rng::new(t + 40);
                for _ in 0..150 {
                    let at = rng.range(1000..6000);
                    let len = rng.range(1..700) as usize;
                    fw.write_at(at, &vec![0x5A; len]).unwrap();
                }
            });
        }
        let ft = Arc::clone(&f);
        s.spawn(move || {
            let mut rng = Rng::new(77);
            for _ in 0..60 {
                ft.set_len(rng.range(500..7000)).unwrap();
            }
        });
    });
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, f.size(), "host size against the engine's");
    // The engine's view of the bytes is the kernel's.
    let mut back = vec![0u8; len as usize];
    assert_eq!(f.read_at(0, &mut back).unwrap(), len as usize);
    assert!(back == std::fs::read(&path).unwrap(), "bytes differ");
}

#[test]
fn sync_backend_truncates_race_tail_writes() {
    truncates_race_tail_writes(Backend::Sync);
}

#[test]
fn uring_truncates_race_tail_writes() {
    truncates_race_tail_writes(Backend::Uring);
}
