//! redb over dio (feature `redb`): one workload (inserts, reads, range scans,
//! deletes, savepoints restored, compaction, reopen) gives the same transcript on
//! redb's own file backend, on a dio host file and on a dio RAM file, and the
//! final contents equal a `BTreeMap` model.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dio::{
    DirectFile, FileState, IdentityMap, MemDevice, MemDeviceConfig, RawFile, RawOptions,
    RedbBackend, RedbOptions,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("data");

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn value(&mut self) -> Vec<u8> {
        let len = self.below(3000) as usize;
        let seed = self.next() as u8;
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }
}

type Open<'a> = &'a dyn Fn() -> Database;

/// Everything the workload saw, in order, and the final contents.
fn workload(open: Open<'_>) -> (Vec<String>, BTreeMap<u64, Vec<u8>>) {
    let mut log = Vec::new();
    let mut model = BTreeMap::new();
    let mut rng = Rng(0x1234_5678);
    let mut db = open();
    for round in 0..12 {
        // A write transaction of inserts and deletes.
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for _ in 0..150 {
                let k = rng.below(2000);
                if rng.below(4) == 0 {
                    let old = t.remove(k).unwrap().map(|v| v.value().to_vec());
                    assert_eq!(old, model.remove(&k));
                    log.push(format!("remove {k} -> {}", old.map_or(0, |v| v.len())));
                } else {
                    let v = rng.value();
                    let old = t.insert(k, &v[..]).unwrap().map(|v| v.value().len());
                    log.push(format!("insert {k} {} -> {old:?}", v.len()));
                    model.insert(k, v);
                }
            }
        }
        tx.commit().unwrap();

        // Changes undone by restoring an ephemeral savepoint.
        let mut tx = db.begin_write().unwrap();
        let sp = tx.ephemeral_savepoint().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for _ in 0..50 {
                t.insert(rng.below(2000), &b"undone"[..]).unwrap();
            }
            t.retain(|k, _| k % 3 != 0).unwrap();
        }
        tx.restore_savepoint(&sp).unwrap();
        tx.commit().unwrap();
        drop(sp);

        // Reads and range scans.
        let rx = db.begin_read().unwrap();
        let t = rx.open_table(TABLE).unwrap();
        log.push(format!("len {}", t.len().unwrap()));
        for _ in 0..40 {
            let k = rng.below(2000);
            let got = t.get(k).unwrap().map(|v| v.value().to_vec());
            assert_eq!(got.as_ref(), model.get(&k), "round {round}: get {k}");
            log.push(format!("get {k} -> {:?}", got.map(|v| v.len())));
        }
        let a = rng.below(2000);
        let b = a + rng.below(300);
        let scan: Vec<(u64, usize)> = t
            .range(a..b)
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value(), v.value().len())
            })
            .collect();
        let want: Vec<(u64, usize)> = model.range(a..b).map(|(k, v)| (*k, v.len())).collect();
        assert_eq!(scan, want, "round {round}: range {a}..{b}");
        log.push(format!("range {a}..{b} -> {scan:?}"));
        drop(t);
        drop(rx);

        if round % 4 == 3 {
            log.push(format!("compact -> {}", db.compact().unwrap()));
        }
        if round % 3 == 2 {
            drop(db);
            db = open();
            log.push("reopen".into());
        }
    }
    let rx = db.begin_read().unwrap();
    let t = rx.open_table(TABLE).unwrap();
    let all = t
        .iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            (k.value(), v.value().to_vec())
        })
        .collect::<BTreeMap<_, _>>();
    assert!(all == model, "the final contents differ from the model");
    (log, all)
}

fn raw(path: &Path) -> RawFile {
    let opts = RawOptions {
        write: true,
        create: true,
        ..RawOptions::default()
    };
    RawFile::open(path, &opts).unwrap()
}

#[test]
fn a_workload_gives_the_same_results_on_dio_and_on_redbs_file_backend() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    let reference = dir.path().join("reference.redb");
    let (want, want_all) = workload(&|| Database::create(&reference).unwrap());

    let on_dio = dir.path().join("dio.redb");
    let (got, got_all) = workload(&|| {
        Database::builder()
            .create_with_backend(RedbBackend::raw(raw(&on_dio)))
            .unwrap()
    });
    assert_eq!(got, want, "the transcripts differ (dio host file)");
    assert!(got_all == want_all);
    // redb's own backend reads what redb on dio wrote.
    let db = Database::open(&on_dio).unwrap();
    let rx = db.begin_read().unwrap();
    assert_eq!(
        rx.open_table(TABLE).unwrap().len().unwrap(),
        want_all.len() as u64
    );

    // A RAM device full of garbage: growth must zero the new bytes.
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(256 << 20, 512).fill(0xAA),
    ));
    let file = DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(4096, 256 << 20)),
        Arc::new(FileState::new(0)),
    )
    .unwrap();
    let (got, got_all) = workload(&|| {
        Database::builder()
            .create_with_backend(RedbBackend::new(file.clone()))
            .unwrap()
    });
    assert_eq!(got, want, "the transcripts differ (dio RAM file)");
    assert!(got_all == want_all);

    // Again with a backend cache of a few blocks, so redb's pages are evicted,
    // read ahead, written back and read back from the device all the time.
    let dev = Arc::new(MemDevice::new(
        MemDeviceConfig::new(256 << 20, 512).fill(0x55),
    ));
    let file = DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(4096, 256 << 20)),
        Arc::new(FileState::new(0)),
    )
    .unwrap();
    let tiny = RedbOptions::default()
        .cache(6 << 12)
        .write_back(3 << 12)
        .readahead(4 << 12);
    let (got, got_all) = workload(&|| {
        Database::builder()
            .set_cache_size(64 << 10)
            .create_with_backend(RedbBackend::new(file.clone()).with_options(tiny))
            .unwrap()
    });
    assert_eq!(
        got, want,
        "the transcripts differ (dio RAM file, tiny caches)"
    );
    assert!(got_all == want_all);
}

// ---- The backend itself against a byte model ----
//
// redb calls `StorageBackend` with any offsets and lengths; the backend keeps
// aligned blocks (a cache that reads ahead, a write-back buffer). These drive it
// directly with small budgets, so that eviction, readahead, write-back and the
// read-modify-write of partial blocks all happen, and compare every read with a
// `Vec<u8>`. The device is judged by its own bytes: `MemDevice::crash` keeps only
// what was flushed, so after a crash the device must hold exactly what the last
// `sync_data` covered.

use dio::StatsDevice;
use dio_testkit::Rng as TRng;
use redb::StorageBackend;

const DEV: u64 = 8 << 20;
const BLOCK: u64 = 4096;

fn mem_file(dev: &Arc<MemDevice>, len: u64) -> DirectFile {
    DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, DEV)),
        Arc::new(FileState::new(len)),
    )
    .unwrap()
}

/// Budgets small enough that every mechanism runs: (cache, write-back,
/// readahead) in blocks.
const BUDGETS: [(usize, usize, usize); 4] = [(24, 8, 8), (6, 2, 4), (0, 0, 0), (64, 64, 32)];

fn options((cache, write_back, readahead): (usize, usize, usize)) -> RedbOptions {
    let b = BLOCK as usize;
    RedbOptions::default()
        .cache(cache * b)
        .write_back(write_back * b)
        .readahead(readahead * b)
}

/// A random operation mix on `backend` against `model`: unaligned and aligned
/// writes (straddling blocks, past the end), reads (checked, and past the end
/// refused), growth and shrinking. Returns when it picks `sync`, `reopen` or
/// `crash` for the caller (0, 1, 2) after `steps` operations or earlier.
fn churn(backend: &RedbBackend, model: &mut Vec<u8>, rng: &mut TRng, steps: usize) -> u32 {
    for _ in 0..steps {
        let len = model.len() as u64;
        match rng.below(100) {
            0..40 => {
                // redb's shapes: whole pages at page offsets, 320-byte headers
                // at 0; and any bytes anywhere, a little past the end too.
                let (off, n) = match rng.below(4) {
                    0 => (rng.below(len / BLOCK + 2) * BLOCK, BLOCK * rng.range(1..4)),
                    1 => (0, 320),
                    _ => (rng.below(len + 2 * BLOCK), rng.range(1..3 * BLOCK)),
                };
                let data = dio_testkit::bytes(n as usize, rng.next_u64());
                backend.write(off, &data).unwrap();
                let end = (off + n) as usize;
                if end > model.len() {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            40..80 => {
                if len == 0 {
                    continue;
                }
                let off = rng.below(len);
                let n = rng.range(1..3 * BLOCK).min(len - off) as usize;
                let mut out = vec![0x55u8; n];
                backend.read(off, &mut out).unwrap();
                assert!(
                    out == model[off as usize..off as usize + n],
                    "read {off}+{n} differs from the model"
                );
                if rng.percent(5) {
                    let mut past = vec![0u8; n + 1];
                    let e = backend.read(len - n as u64, &mut past).unwrap_err();
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                }
            }
            80..88 => {
                // Shrink into or grow over cached and dirty blocks, often to an
                // unaligned length.
                let to = if rng.percent(50) {
                    rng.below(len + 1)
                } else {
                    len + rng.below(64 * BLOCK)
                };
                let to = to.min(2 << 20);
                backend.set_len(to).unwrap();
                model.resize(to as usize, 0);
                assert_eq!(backend.len().unwrap(), to);
            }
            88..95 => return 0,
            95..98 => return 1,
            _ => return 2,
        }
    }
    0
}

#[test]
fn backend_matches_a_byte_model_and_survives_crashes_at_every_sync() {
    for (seed, budget) in BUDGETS.iter().enumerate() {
        // A device full of garbage: growth must read, and be written, as zeros.
        let dev = Arc::new(MemDevice::new(
            MemDeviceConfig::new(DEV, 512).fill(0xAA).crash_mode(),
        ));
        let mut rng = TRng::new(seed as u64 + 1);
        let mut model = Vec::new();
        let mut durable = Vec::new();
        let mut backend = RedbBackend::new(mem_file(&dev, 0)).with_options(options(*budget));
        let (mut syncs, mut crashes, mut reopens) = (0, 0, 0);
        for _ in 0..200 {
            match churn(&backend, &mut model, &mut rng, 30) {
                0 => {
                    backend.sync_data().unwrap();
                    durable = model.clone();
                    syncs += 1;
                    // What sync_data covered is on the device and flushed.
                    assert_eq!(backend.file().size(), model.len() as u64);
                    assert!(dev.read_raw(0, model.len()) == model, "device after sync");
                }
                1 => {
                    // Drop (writes what is dirty) and open again over the same file.
                    let file = backend.file().clone();
                    drop(backend);
                    assert_eq!(file.size(), model.len() as u64);
                    backend = RedbBackend::new(file).with_options(options(*budget));
                    reopens += 1;
                }
                _ => {
                    // Power loss: only what the last sync covered survives.
                    drop(backend);
                    dev.crash();
                    assert!(
                        dev.read_raw(0, durable.len()) == durable,
                        "seed {seed}: the device lost synced bytes in a crash"
                    );
                    model = durable.clone();
                    backend = RedbBackend::new(mem_file(&dev, durable.len() as u64))
                        .with_options(options(*budget));
                    crashes += 1;
                }
            }
        }
        backend.sync_data().unwrap();
        assert!(dev.read_raw(0, model.len()) == model);
        eprintln!("budget {budget:?}: {syncs} syncs, {reopens} reopens, {crashes} crashes");
        assert!(syncs > 10 && crashes > 2 && reopens > 2);
    }
}

#[test]
fn backend_on_a_host_file_matches_the_model_and_the_file_after_each_sync() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("model.redb");
    for (seed, budget) in BUDGETS.iter().enumerate() {
        let _ = std::fs::remove_file(&path);
        let mut rng = TRng::new(100 + seed as u64);
        let mut model = Vec::new();
        let mut backend = RedbBackend::raw(raw(&path)).with_options(options(*budget));
        for _ in 0..50 {
            if churn(&backend, &mut model, &mut rng, 30) == 1 {
                drop(backend);
                backend = RedbBackend::raw(raw(&path)).with_options(options(*budget));
                continue;
            }
            backend.sync_data().unwrap();
            // The kernel's view of the file: every byte and the length.
            let file = std::fs::read(&path).unwrap();
            if file != model {
                let at = file.iter().zip(&model).position(|(a, b)| a != b);
                panic!(
                    "seed {seed}: file after sync: {} bytes, model {}; first difference at {at:?}",
                    file.len(),
                    model.len()
                );
            }
        }
    }
}

#[test]
fn partial_writes_straddling_cached_blocks_read_each_block_once() {
    let dev = Arc::new(StatsDevice::new(MemDevice::new(
        MemDeviceConfig::new(DEV, 512).fill(0x11),
    )));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, DEV)),
        Arc::new(FileState::new(64 * BLOCK)),
    )
    .unwrap();
    let backend = RedbBackend::new(file);
    // Read blocks 0..8 (cached), then write across the boundaries of 2..6 in
    // odd pieces: no device read, and nothing written before the sync.
    let mut out = vec![0u8; 8 * BLOCK as usize];
    backend.read(0, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0x11));
    let before = dev.stats();
    let mut model = out.clone();
    for (off, n) in [
        (2 * BLOCK - 7, 20),
        (3 * BLOCK + 100, 2 * BLOCK),
        (6 * BLOCK - 1, 2),
    ] {
        let data = dio_testkit::bytes(n as usize, off);
        backend.write(off, &data).unwrap();
        model[off as usize..(off + n) as usize].copy_from_slice(&data);
    }
    backend.read(0, &mut out).unwrap();
    assert!(out == model, "reads see the writes before any sync");
    let after = dev.stats();
    assert_eq!(
        after.reads, before.reads,
        "cached blocks are not read again"
    );
    assert_eq!(
        after.writes, before.writes,
        "nothing written before sync_data"
    );
    // Blocks 12 and 13, not cached: one read of each for their partial writes,
    // however many writes touch them.
    for i in 0..10 {
        backend
            .write(12 * BLOCK + 4000 + i * 13, &[i as u8; 13])
            .unwrap();
    }
    assert_eq!(dev.stats().reads - after.reads, 2);
    backend.sync_data().unwrap();
    let synced = dev.stats();
    assert_eq!(synced.flushes - after.flushes, 1);
    // Blocks 1..7 and 12..14 went as two requests.
    assert_eq!(synced.writes - after.writes, 2);
    assert!(dev.inner().read_raw(0, model.len()) == model);
    let mut tail = vec![0u8; 13];
    backend.read(12 * BLOCK + 4000 + 9 * 13, &mut tail).unwrap();
    assert_eq!(tail, [9u8; 13]);
}

#[test]
fn a_failed_write_back_keeps_the_data_and_the_next_sync_writes_it() {
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(DEV, 512).crash_mode()));
    let backend = RedbBackend::new(mem_file(&dev, 0));
    let mut model = vec![0u8; 64 * BLOCK as usize];
    backend.set_len(model.len() as u64).unwrap();
    backend.sync_data().unwrap();
    for (i, off) in [0, 5 * BLOCK + 3, 40 * BLOCK - 100].into_iter().enumerate() {
        let data = dio_testkit::bytes(2 * BLOCK as usize, i as u64);
        backend.write(off, &data).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    // The device refuses writes to block 40: the sync fails and says so...
    dev.fail_range(40 * BLOCK..40 * BLOCK + 1, Some(dio::Op::Write));
    let e = backend.sync_data().unwrap_err();
    let errno = e
        .get_ref()
        .and_then(|d| d.downcast_ref::<dio::Error>())
        .map(dio::Error::errno);
    assert_eq!(errno, Some(libc::EIO), "{e}");
    // ... reads still see every write ...
    let mut out = vec![0u8; model.len()];
    backend.read(0, &mut out).unwrap();
    assert!(out == model);
    // ... and once the device takes writes again, the next sync writes them all.
    dev.clear_faults();
    backend.sync_data().unwrap();
    dev.crash();
    assert!(dev.read_raw(0, model.len()) == model);
}

#[test]
fn a_sync_writes_runs_of_blocks_as_few_large_requests() {
    let dev = Arc::new(StatsDevice::new(MemDevice::new(MemDeviceConfig::new(
        DEV, 512,
    ))));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, DEV)),
        Arc::new(FileState::new(0)),
    )
    .unwrap();
    let backend = RedbBackend::new(file);
    backend.set_len(4 << 20).unwrap();
    // 512 pages written in a shuffled order from unaligned heap buffers.
    let mut order: Vec<u64> = (0..512).collect();
    let mut rng = TRng::new(5);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &p in &order {
        backend
            .write(p * BLOCK, &[p as u8; BLOCK as usize])
            .unwrap();
    }
    assert_eq!(dev.stats().writes, 0);
    backend.sync_data().unwrap();
    let s = dev.stats();
    // 2 MiB of pages and 2 MiB of the growth's zeros: 1 MiB per request.
    assert_eq!((s.writes, s.bytes_written, s.flushes), (4, 4 << 20, 1));
    // A second sync with nothing written flushes nothing.
    backend.sync_data().unwrap();
    assert_eq!(dev.stats().flushes, 1);
    let raw = dev.inner().read_raw(0, 4 << 20);
    for p in 0..1024usize {
        let want = if p < 512 { p as u8 } else { 0 };
        assert!(
            raw[p * 4096..(p + 1) * 4096].iter().all(|&b| b == want),
            "page {p}"
        );
    }
}

#[test]
fn readahead_grows_on_sequential_reads_and_stops_on_random_ones() {
    let dev = Arc::new(StatsDevice::new(MemDevice::new(
        MemDeviceConfig::new(DEV, 512).fill(7),
    )));
    let file = DirectFile::new(
        dev.clone(),
        Arc::new(IdentityMap::new(4096, DEV)),
        Arc::new(FileState::new(DEV)),
    )
    .unwrap();
    // Sequential pages: far fewer requests than pages.
    let backend = RedbBackend::new(file.clone());
    let mut page = vec![0u8; BLOCK as usize];
    for p in 0..512 {
        backend.read(p * BLOCK, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 7));
    }
    let seq = dev.stats();
    assert!(
        seq.reads <= 40,
        "{} requests for 512 sequential pages",
        seq.reads
    );
    assert!(seq.bytes_read <= (512 + 32) * BLOCK);
    // Random pages over 8 MiB with a 256 KiB cache: readahead would be wasted,
    // so the window shrinks to nothing and the bytes read stay close to those
    // asked for.
    drop(backend);
    dev.reset();
    let backend = RedbBackend::new(file).with_options(RedbOptions::default().cache(256 << 10));
    let mut rng = TRng::new(9);
    let n = 3000;
    for _ in 0..n {
        backend
            .read(rng.below(DEV / BLOCK) * BLOCK, &mut page)
            .unwrap();
    }
    let rand = dev.stats();
    assert!(
        rand.bytes_read < n * BLOCK * 5 / 4,
        "{} bytes read for {n} random pages",
        rand.bytes_read
    );
}

#[test]
fn readers_racing_a_writer_see_only_whole_values() {
    // Threaded completions with latency, so a read's device request is in
    // flight while the writer writes back, syncs, shrinks and grows.
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(DEV, 512).threaded(
        Some(std::time::Duration::from_micros(50)),
        true,
        3,
    )));
    let backend = Arc::new(RedbBackend::new(mem_file(&dev, 0)).with_options(options((8, 4, 4))));
    // Pages 0..64: page p holds byte p, then byte p + 64 after the writer's
    // first pass, and so on: a reader may see any generation, but one per page.
    for p in 0..64u64 {
        backend
            .write(p * BLOCK, &[p as u8; BLOCK as usize])
            .unwrap();
    }
    backend.sync_data().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (backend, stop) = (backend.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = TRng::new(t + 40);
                let mut page = vec![0u8; BLOCK as usize];
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 200 {
                    let p = rng.below(64);
                    backend.read(p * BLOCK, &mut page).unwrap();
                    assert!(page.iter().all(|&b| b == page[0]), "a torn page {p}");
                    assert_eq!(u64::from(page[0]) % 64, p, "page {p} holds another page");
                    reads += 1;
                }
            })
        })
        .collect();
    let mut rng = TRng::new(77);
    for gen in 1..4u64 {
        for p in 0..64u64 {
            let v = (p + 64 * gen) as u8;
            backend.write(p * BLOCK, &[v; BLOCK as usize]).unwrap();
            // Churn past the pages the readers read: write-back, shrink, grow.
            let far = 64 + rng.below(64);
            backend.write(far * BLOCK + 5, &[1; 9]).unwrap();
            if rng.percent(10) {
                backend.set_len(64 * BLOCK + rng.below(64 * BLOCK)).unwrap();
            }
            if rng.percent(10) {
                backend.sync_data().unwrap();
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
}

// ---- Speed: redb on dio against redb on its file backend ----

/// Which backend a speed run uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    File,
    Dio,
}

const BENCH_TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bench");

/// redb's own benchmark shape (`benches/lmdb_benchmark.rs`): 24-byte random keys,
/// 150-byte random values.
fn bench_pairs(n: usize) -> Vec<([u8; 24], [u8; 150])> {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    (0..n)
        .map(|_| {
            let mut k = [0u8; 24];
            let mut v = [0u8; 150];
            for c in k.chunks_mut(8).chain(v.chunks_mut(8)) {
                let r = rng.next().to_le_bytes();
                c.copy_from_slice(&r[..c.len()]);
            }
            (k, v)
        })
        .collect()
}

/// Drop `path`'s pages from the page cache (clean after the close's fsync).
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: posix_fadvise reads no memory; `fd` is open for the call.
    let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise DONTNEED");
}

/// Bytes of `path` in the page cache (util-linux `fincore`), 0 if unknown.
fn cached(path: &Path) -> u64 {
    std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// The memory a side gets: redb's cache, and for dio the backend's own blocks
/// (for the file backend the page cache is not set, it is measured).
#[derive(Clone, Copy)]
struct Budget {
    redb: usize,
    backend: RedbOptions,
}

fn open_bench(side: Side, path: &Path, budget: Budget, create: bool) -> Database {
    let mut b = Database::builder();
    b.set_cache_size(budget.redb);
    match (side, create) {
        (Side::File, true) => b.create(path).unwrap(),
        (Side::File, false) => b.open(path).unwrap(),
        (Side::Dio, _) => b
            .create_with_backend(RedbBackend::raw(raw(path)).with_options(budget.backend))
            .unwrap(),
    }
}

/// One run of the workloads on one side: seconds per phase, and the most page
/// cache the file held (the file backend's second cache).
fn bench_run(
    side: Side,
    dir: &Path,
    pairs: &[([u8; 24], [u8; 150])],
    cache: Budget,
) -> ([f64; 4], u64) {
    use std::time::Instant;
    let path = dir.join(format!("{side:?}.redb"));
    let _ = std::fs::remove_file(&path);
    let mut page_cache = 0u64;
    let mut times = [0.0; 4];
    // Bulk load: every pair in one transaction.
    let t = Instant::now();
    let db = open_bench(side, &path, cache, true);
    let tx = db.begin_write().unwrap();
    {
        let mut table = tx.open_table(BENCH_TABLE).unwrap();
        for (k, v) in pairs {
            table.insert(&k[..], &v[..]).unwrap();
        }
    }
    tx.commit().unwrap();
    drop(db);
    times[0] = t.elapsed().as_secs_f64();
    page_cache = page_cache.max(cached(&path));
    // Random reads, cold: every key once, in a shuffled order.
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut rng = Rng(99);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    evict(&path);
    let t = Instant::now();
    let db = open_bench(side, &path, cache, false);
    {
        let rx = db.begin_read().unwrap();
        let table = rx.open_table(BENCH_TABLE).unwrap();
        for &i in &order {
            let got = table.get(&pairs[i].0[..]).unwrap().unwrap();
            assert_eq!(got.value(), &pairs[i].1[..]);
        }
    }
    times[1] = t.elapsed().as_secs_f64();
    page_cache = page_cache.max(cached(&path));
    drop(db);
    // Random range reads, cold: a tenth as many ranges of ten entries.
    evict(&path);
    let t = Instant::now();
    let db = open_bench(side, &path, cache, false);
    {
        let rx = db.begin_read().unwrap();
        let table = rx.open_table(BENCH_TABLE).unwrap();
        for &i in order.iter().take(pairs.len() / 10) {
            let n = table.range(&pairs[i].0[..]..).unwrap().take(10).count();
            assert!(n >= 1);
        }
    }
    times[2] = t.elapsed().as_secs_f64();
    page_cache = page_cache.max(cached(&path));
    drop(db);
    // Removals, cold: half the keys in one transaction.
    evict(&path);
    let t = Instant::now();
    let db = open_bench(side, &path, cache, false);
    let tx = db.begin_write().unwrap();
    {
        let mut table = tx.open_table(BENCH_TABLE).unwrap();
        for &i in order.iter().take(pairs.len() / 2) {
            assert!(table.remove(&pairs[i].0[..]).unwrap().is_some());
        }
    }
    tx.commit().unwrap();
    drop(db);
    times[3] = t.elapsed().as_secs_f64();
    page_cache = page_cache.max(cached(&path));
    std::fs::remove_file(&path).unwrap();
    (times, page_cache)
}

/// redb's benchmark workloads (bulk load, random reads, range reads, removals),
/// each phase after a cold open (the file's pages dropped from the page cache;
/// dio uses none), on redb's file backend and on dio, in alternating pairs.
/// Equal memory: both get the same redb cache, and dio's backend gets as its
/// block cache, clean and dirty blocks together ([`RedbOptions`]), the most page
/// cache the file backend's run held of the file (`fincore`, after each phase,
/// so the page cache's dirty pages are counted too). Prints
/// every ratio (file time over dio time: above 1 means dio is faster). Env-gated:
/// `DIO_REDB_BENCH=1 cargo test --release -p dio --features redb --test redb -- --nocapture redb_speed`
/// (`DIO_REDB_ELEMENTS`, default 200000; `DIO_REDB_PAIRS`, default 3;
/// `DIO_REDB_CACHE_MIB`, redb's cache on both sides, default 16;
/// `DIO_REDB_DIO_CACHE_MIB`, dio's block cache, the rest of the same budget
/// going to dio's redb cache: 0 is redb's cache alone over a write-through
/// backend).
#[test]
fn redb_speed() {
    if std::env::var_os("DIO_REDB_BENCH").is_none() {
        return dio_testkit::skip("redb speed comparison: set DIO_REDB_BENCH=1");
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("DIO_REDB_ELEMENTS", 200_000);
    let rounds = env("DIO_REDB_PAIRS", 3);
    let cache = env("DIO_REDB_CACHE_MIB", 16) << 20;
    let dio_cache = std::env::var("DIO_REDB_DIO_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|m| m << 20);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pairs = bench_pairs(n);
    let names = [
        "bulk load",
        "random reads",
        "random range reads",
        "removals",
    ];
    let mut ratios: Vec<[f64; 4]> = Vec::new();
    for round in 0..rounds {
        let file_budget = Budget {
            redb: cache,
            backend: RedbOptions::default(),
        };
        let (file, page_cache) = bench_run(Side::File, dir.path(), &pairs, file_budget);
        // The page cache takes dirty pages up to its whole size here (the kernel's
        // dirty limits are a fraction of RAM): so does dio's block cache.
        let page_cache = page_cache as usize;
        // The same total either way: what dio's blocks do not take goes to
        // redb's cache.
        let blocks = dio_cache.unwrap_or(page_cache).min(page_cache + cache);
        let budget = Budget {
            redb: cache + page_cache - blocks,
            backend: RedbOptions::default().cache(blocks).write_back(blocks),
        };
        let (dio, _) = bench_run(Side::Dio, dir.path(), &pairs, budget);
        eprintln!(
            "pair {round}: file {file:.3?} s (redb cache {} MiB + page cache {} MiB), \
             dio {dio:.3?} s (redb cache {} MiB + block cache {} MiB)",
            cache >> 20,
            page_cache >> 20,
            budget.redb >> 20,
            budget.backend.cache >> 20,
        );
        ratios.push(std::array::from_fn(|i| file[i] / dio[i]));
    }
    for (i, name) in names.iter().enumerate() {
        let mut r: Vec<f64> = ratios.iter().map(|x| x[i]).collect();
        r.sort_by(f64::total_cmp);
        eprintln!(
            "{name}: dio speed / file backend speed = {:.2}x (median of {} pairs; {r:.2?})",
            r[r.len() / 2],
            r.len()
        );
    }
}
