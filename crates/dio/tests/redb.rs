//! redb over dio (feature `redb`): one workload (inserts, reads, range scans,
//! deletes, savepoints restored, compaction, reopen) gives the same transcript on
//! redb's own file backend, on a dio host file and on a dio RAM file, and the
//! final contents equal a `BTreeMap` model.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dio::{
    DirectFile, FileState, IdentityMap, MemDevice, MemDeviceConfig, RawFile, RawOptions,
    RedbBackend,
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
