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
/// block cache plus write-back buffer ([`RedbOptions`]) the most page cache the
/// file backend's run held of the file (`fincore`, after each phase). Prints
/// every ratio (file time over dio time: above 1 means dio is faster). Env-gated:
/// `DIO_REDB_BENCH=1 cargo test --release -p dio --features redb --test redb -- --nocapture redb_speed`
/// (`DIO_REDB_ELEMENTS`, default 200000; `DIO_REDB_PAIRS`, default 3;
/// `DIO_REDB_CACHE_MIB`, the file backend's redb cache, default 16).
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
        let budget = Budget {
            redb: cache,
            backend: RedbOptions::default()
                .cache(page_cache)
                .write_back(page_cache),
        };
        let (dio, _) = bench_run(Side::Dio, dir.path(), &pairs, budget);
        eprintln!(
            "pair {round}: file {file:.3?} s (redb cache {} MiB + page cache {} MiB), \
             dio {dio:.3?} s (redb cache {} MiB + block cache {} MiB)",
            cache >> 20,
            page_cache >> 20,
            cache >> 20,
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
