//! redb under the crash recorder: a seeded redb workload runs through
//! [`dio::RedbBackend`] on a recorded RAM device (inserts, overwrites, deletes,
//! range deletes, aborted transactions, several tables, a table dropped, commits
//! with `Durability::Immediate` and `Durability::None`, two-phase and quick-repair
//! commits, a persistent and an ephemeral savepoint restored, a reopen, a
//! compaction that shrinks the file). Every replayed crash state is then opened by
//! redb (which repairs on open) through an overlay backend over the state, and:
//!
//! - the open must succeed (before the database was first created, an error is
//!   allowed; a panic never is);
//! - the database (every table's entries, the table names, the persistent
//!   savepoints) must equal the model as of some commit at or after the last
//!   `Immediate` commit that had returned before the crash, and no later than the
//!   last commit that had started: never a torn, aborted or uncommitted
//!   transaction, never a durable commit lost;
//! - bounded and reverse range scans agree with that model;
//! - `check_integrity` passes and a new write transaction commits;
//! - one state in 100 is also written out as an image file and opened by redb's
//!   own file backend (`Database::create`), which must find the same database.
//!
//! CI: 120 transactions, 2,000 states (a few seconds). `DIO_CRASH_LONG=1`: 600
//! transactions, up to 40,000 states (a few minutes).
//!
//! The file's length is file-system metadata that a host file keeps apart from
//! its data: here the test backend stores it in a record at the device's end,
//! written (volatile) by every `set_len` and made durable by the next
//! `sync_data`, as `fdatasync` does for a file's size.
//!
//! The mutation tests run the same workload over broken backends, and the
//! checker must fail states: one whose `sync_data` does not flush, and one that
//! holds writes back (write-behind) and whose `sync_data` flushes before it sends
//! them (the bug a write-behind backend must not have).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use dio::RedbBackend;
use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
use dio_crash::{run, Base, Checker, Log, Recorder, ReplayOptions, StateView, Verdict};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition,
    TableHandle,
};

use common::Rng;

/// The recorded device.
const DEV_SIZE: u64 = 64 << 20;
/// Where the file's length record is (the last 4 KiB of the device).
const LEN_AT: u64 = DEV_SIZE - 4096;
/// Marks a length record.
const LEN_MAGIC: u64 = 0x6469_6f2d_6c65_6e31;
/// redb's cache: small, so pages are written back inside transactions too.
const CACHE: usize = 256 << 10;
const TABLES: [&str; 3] = ["alpha", "beta", "gamma"];

fn def(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

// ---------------------------------------------------------------------------
// The backend the workload runs on.

/// [`RedbBackend`] plus the file's length kept on the device (see the module
/// docs), correct or with a mutation.
struct Stored {
    inner: RedbBackend,
    len_file: DirectFile,
    mode: Mode,
    /// Writes held back ([`Mode::FlushBeforeWrites`]).
    held: Mutex<Vec<(u64, Vec<u8>)>>,
}

/// How the test backend behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Correct,
    /// MUTATION: `sync_data` does nothing.
    NoFlush,
    /// MUTATION: writes are held back until the next read, resize or sync, and
    /// `sync_data` flushes the device before it sends them.
    FlushBeforeWrites,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stored({:?})", self.inner)
    }
}

impl Stored {
    /// Send the writes held back.
    fn drain(&self) -> io::Result<()> {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (offset, data) in held {
            self.inner.write(offset, &data)?;
        }
        Ok(())
    }

    fn write_len(&self, len: u64) -> io::Result<()> {
        let mut buf = AlignedBuf::new(4096, 4096);
        buf.fill(0);
        buf[..8].copy_from_slice(&LEN_MAGIC.to_le_bytes());
        buf[8..16].copy_from_slice(&len.to_le_bytes());
        let n = self.len_file.write_at(LEN_AT, &buf, Flags::NONE)?;
        assert_eq!(n, 4096);
        Ok(())
    }
}

impl StorageBackend for Stored {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.drain()?;
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.drain()?;
        self.inner.set_len(len)?;
        self.write_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        match self.mode {
            Mode::Correct => self.inner.sync_data(),
            Mode::NoFlush => Ok(()),
            Mode::FlushBeforeWrites => {
                self.inner.sync_data()?;
                self.drain()
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        if self.mode == Mode::FlushBeforeWrites {
            self.held.lock().unwrap().push((offset, data.to_vec()));
            return Ok(());
        }
        self.inner.write(offset, data)
    }
}

// ---------------------------------------------------------------------------
// The model.

/// A value of the model (shared between the snapshots that hold it).
type Bytes = Arc<[u8]>;

type Tables = BTreeMap<String, BTreeMap<u64, Bytes>>;

/// The database as of one commit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Snap {
    tables: Tables,
    savepoints: Vec<u64>,
}

/// One commit of the workload (a compaction counts as one, with the same
/// contents): the log positions of the marks around `commit()`.
#[derive(Debug, Clone)]
struct Commit {
    begin: u64,
    done: u64,
    durable: bool,
    snap: usize,
}

#[derive(Debug, Default)]
struct Run {
    /// `snaps[0]`: the empty database; then one per commit.
    snaps: Vec<Snap>,
    commits: Vec<Commit>,
    /// The mark after `Database::create` returned.
    created: u64,
    non_durable: usize,
    aborted: usize,
    /// Tables deleted, commits with two-phase commit, with quick repair.
    tables_deleted: usize,
    two_phase: usize,
    quick_repair: usize,
}

impl Run {
    /// The snapshots a crash after `at` records may show: from the last durable
    /// commit that had returned to the last commit that had started.
    fn allowed(&self, at: u64) -> (usize, usize) {
        let (mut lo, mut hi) = (0, 0);
        for c in &self.commits {
            if c.durable && c.done < at {
                lo = c.snap;
            }
            if c.begin < at {
                hi = c.snap;
            }
        }
        (lo, hi)
    }
}

/// Everything a database holds, read back.
fn read_snap(db: &Database) -> Result<Snap, String> {
    let e = |w: &str, x: &dyn std::fmt::Display| format!("{w}: {x}");
    let rx = db.begin_read().map_err(|x| e("begin_read", &x))?;
    let mut tables = Tables::new();
    for h in rx.list_tables().map_err(|x| e("list_tables", &x))? {
        let name = h.name().to_string();
        let t = rx
            .open_table(def(&name))
            .map_err(|x| e(&format!("open_table {name}"), &x))?;
        let mut m = BTreeMap::new();
        for item in t.iter().map_err(|x| e("iter", &x))? {
            let (k, v) = item.map_err(|x| e(&format!("iter {name}"), &x))?;
            m.insert(k.value(), Bytes::from(v.value()));
        }
        tables.insert(name, m);
    }
    drop(rx);
    let wx = db.begin_write().map_err(|x| e("begin_write", &x))?;
    let savepoints: Vec<u64> = wx
        .list_persistent_savepoints()
        .map_err(|x| e("list_persistent_savepoints", &x))?
        .collect();
    wx.abort().map_err(|x| e("abort", &x))?;
    Ok(Snap { tables, savepoints })
}

/// Bounded and reverse range scans of every table of `db`, against `want`.
fn check_ranges(db: &Database, want: &Snap, rng: &mut Rng) -> Result<(), String> {
    let rx = db.begin_read().map_err(|x| x.to_string())?;
    for (name, m) in &want.tables {
        let t = rx.open_table(def(name)).map_err(|x| x.to_string())?;
        for _ in 0..3 {
            let a = rng.below(KEYS);
            let b = a + rng.below(400);
            let got: Vec<(u64, Bytes)> = t
                .range(a..b)
                .map_err(|x| x.to_string())?
                .map(|r| r.map(|(k, v)| (k.value(), Bytes::from(v.value()))))
                .collect::<Result<_, _>>()
                .map_err(|x| x.to_string())?;
            let exp: Vec<(u64, Bytes)> = m.range(a..b).map(|(k, v)| (*k, v.clone())).collect();
            if got != exp {
                return Err(format!(
                    "table {name}: range {a}..{b} gives {} entries, the model {}",
                    got.len(),
                    exp.len()
                ));
            }
            let got: Vec<u64> = t
                .range(..=b)
                .map_err(|x| x.to_string())?
                .rev()
                .take(7)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|x| x.to_string())?;
            let exp: Vec<u64> = m.range(..=b).rev().take(7).map(|(k, _)| *k).collect();
            if got != exp {
                return Err(format!(
                    "table {name}: reverse scan from {b} gives {got:?}, the model {exp:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Where two snapshots differ first (for failure messages).
fn diff(got: &Snap, want: &Snap) -> String {
    if got.savepoints != want.savepoints {
        return format!(
            "persistent savepoints {:?}, want {:?}",
            got.savepoints, want.savepoints
        );
    }
    let names = |s: &Snap| s.tables.keys().cloned().collect::<Vec<_>>();
    if names(got) != names(want) {
        return format!("tables {:?}, want {:?}", names(got), names(want));
    }
    for (name, m) in &want.tables {
        let g = &got.tables[name];
        for (k, v) in m {
            match g.get(k) {
                None => return format!("table {name}: key {k} missing"),
                Some(x) if x != v => {
                    return format!(
                        "table {name}: key {k} holds version {:?}, want {:?}",
                        stamp(x),
                        stamp(v)
                    )
                }
                _ => {}
            }
        }
        if let Some(k) = g.keys().find(|k| !m.contains_key(k)) {
            return format!("table {name}: key {k} should not be there");
        }
    }
    "equal".into()
}

/// The version stamp at the front of a value.
fn stamp(v: &[u8]) -> Option<u64> {
    v.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

// ---------------------------------------------------------------------------
// The workload.

const KEYS: u64 = 1500;

type Rec = Recorder<Arc<MemDevice>>;

fn open_db(rec: &Arc<Rec>, state: &Arc<FileState>, mode: Mode) -> Database {
    let file = DirectFile::new(
        rec.clone(),
        Arc::new(IdentityMap::new(4096, LEN_AT)),
        Arc::clone(state),
    )
    .unwrap();
    let len_file = DirectFile::new(
        rec.clone(),
        Arc::new(IdentityMap::new(4096, DEV_SIZE)),
        Arc::new(FileState::new(DEV_SIZE)),
    )
    .unwrap();
    let backend = Stored {
        inner: RedbBackend::new(file),
        len_file,
        mode,
        held: Mutex::new(Vec::new()),
    };
    Database::builder()
        .set_cache_size(CACHE)
        .create_with_backend(backend)
        .unwrap()
}

/// A value: a unique version stamp, then bytes of a seeded length.
fn value(rng: &mut Rng, version: u64) -> Vec<u8> {
    let len = match rng.below(20) {
        0 => 5000 + rng.below(15_000),
        1..=4 => 100 + rng.below(2000),
        _ => 8 + rng.below(60),
    } as usize;
    let mut v = vec![(version % 251) as u8; len];
    v[..8].copy_from_slice(&version.to_le_bytes());
    v
}

struct Work<'a> {
    rec: &'a Arc<Rec>,
    run: Run,
    model: Snap,
    version: u64,
}

impl Work<'_> {
    /// Commit `tx`, whose changes made `next`, logging the marks around it.
    fn commit(&mut self, tx: redb::WriteTransaction, next: Snap, durable: bool, what: &str) {
        let n = self.run.commits.len();
        let begin = self.rec.mark(&format!("commit {n} begin: {what}")).unwrap();
        tx.commit().unwrap();
        let done = self.rec.mark(&format!("commit {n} done")).unwrap();
        self.model = next;
        self.run.snaps.push(self.model.clone());
        self.run.commits.push(Commit {
            begin,
            done,
            durable,
            snap: self.run.snaps.len() - 1,
        });
        if !durable {
            self.run.non_durable += 1;
        }
    }

    /// The live database equals the model (checks the model itself).
    fn verify(&self, db: &Database, when: &str) {
        let got = read_snap(db).unwrap();
        assert!(
            got == self.model,
            "live database after {when}: {}",
            diff(&got, &self.model)
        );
    }

    /// A transaction of random changes; `durable` false commits it with
    /// `Durability::None`, `abort` aborts it.
    fn changes(&mut self, db: &Database, rng: &mut Rng, durable: bool, abort: bool) {
        let mut tx = db.begin_write().unwrap();
        if !durable {
            tx.set_durability(Durability::None).unwrap();
        } else {
            if !abort && rng.below(6) == 0 {
                tx.set_two_phase_commit(true);
                self.run.two_phase += 1;
            }
            if !abort && rng.below(6) == 0 {
                tx.set_quick_repair(true);
                self.run.quick_repair += 1;
            }
        }
        let mut next = self.model.clone();
        let ops = 1 + rng.below(40);
        for _ in 0..ops {
            let name = TABLES[rng.below(3) as usize];
            let m = next.tables.entry(name.to_string()).or_default();
            let mut t = tx.open_table(def(name)).unwrap();
            let existing = |m: &BTreeMap<u64, Bytes>, rng: &mut Rng| {
                m.keys()
                    .nth(rng.below(m.len().max(1) as u64) as usize)
                    .copied()
            };
            match rng.below(20) {
                0..=8 => {
                    let k = rng.below(KEYS);
                    self.version += 1;
                    let v = value(rng, self.version);
                    t.insert(k, v.as_slice()).unwrap();
                    m.insert(k, v.into());
                }
                9..=11 => {
                    if let Some(k) = existing(m, rng) {
                        self.version += 1;
                        let v = value(rng, self.version);
                        let old = t.insert(k, v.as_slice()).unwrap();
                        assert_eq!(old.map(|o| Bytes::from(o.value())).as_ref(), m.get(&k));
                        m.insert(k, v.into());
                    }
                }
                12..=16 => {
                    if let Some(k) = existing(m, rng) {
                        let old = t.remove(k).unwrap();
                        assert_eq!(old.map(|o| Bytes::from(o.value())), m.remove(&k));
                    }
                }
                17 => {
                    let a = rng.below(KEYS);
                    let b = a + rng.below(60);
                    t.retain_in(a..b, |_, _| false).unwrap();
                    m.retain(|k, _| !(a..b).contains(k));
                }
                _ => {
                    let a = rng.below(KEYS);
                    let b = a + rng.below(300);
                    let got: Vec<u64> = t
                        .range(a..b)
                        .unwrap()
                        .map(|r| r.unwrap().0.value())
                        .collect();
                    let exp: Vec<u64> = m.range(a..b).map(|(k, _)| *k).collect();
                    assert_eq!(got, exp, "range {a}..{b} of {name} inside a transaction");
                }
            }
        }
        if durable && !abort && rng.below(25) == 0 && next.tables.len() == TABLES.len() {
            let name = TABLES[rng.below(3) as usize];
            assert!(tx.delete_table(def(name)).unwrap());
            next.tables.remove(name);
            self.run.tables_deleted += 1;
        }
        if abort {
            tx.abort().unwrap();
            self.run.aborted += 1;
        } else {
            let what = if durable {
                "changes"
            } else {
                "changes, not durable"
            };
            self.commit(tx, next, durable, what);
        }
    }
}

/// Run the workload of `txs` transactions on a database over `rec`.
fn workload(rec: &Arc<Rec>, seed: u64, txs: usize, mode: Mode) -> Run {
    let mut rng = Rng::new(seed);
    let state = Arc::new(FileState::new(0));
    let mut db = open_db(rec, &state, mode);
    let created = rec.mark("created").unwrap();
    let mut w = Work {
        rec,
        run: Run {
            snaps: vec![Snap::default()],
            created,
            ..Run::default()
        },
        model: Snap::default(),
        version: 0,
    };
    let at = |f: usize| txs * f / 10;
    let mut persistent: Option<(u64, Tables)> = None;
    let mut ephemeral: Option<(redb::Savepoint, Tables)> = None;
    for i in 0..txs {
        if i == at(2) {
            // A persistent savepoint (its own transaction, Immediate).
            let tx = db.begin_write().unwrap();
            let id = tx.persistent_savepoint().unwrap();
            let mut next = w.model.clone();
            next.savepoints.push(id);
            persistent = Some((id, w.model.tables.clone()));
            w.commit(tx, next, true, "persistent savepoint");
        } else if i == at(3) {
            // Reopen: a clean close, then an open over a new backend.
            drop(db);
            rec.mark("reopen").unwrap();
            db = open_db(rec, &state, mode);
            w.verify(&db, "reopen");
        } else if i == at(4) {
            let tx = db.begin_write().unwrap();
            ephemeral = Some((tx.ephemeral_savepoint().unwrap(), w.model.tables.clone()));
            tx.abort().unwrap();
        } else if i == at(5) {
            let (sp, tables) = ephemeral.as_ref().unwrap();
            let mut tx = db.begin_write().unwrap();
            tx.restore_savepoint(sp).unwrap();
            let next = Snap {
                tables: tables.clone(),
                savepoints: w.model.savepoints.clone(),
            };
            w.commit(tx, next, true, "restore the ephemeral savepoint");
        } else if i == at(6) {
            let (id, tables) = persistent.as_ref().unwrap();
            let mut tx = db.begin_write().unwrap();
            let sp = tx.get_persistent_savepoint(*id).unwrap();
            tx.restore_savepoint(&sp).unwrap();
            drop(sp);
            let next = Snap {
                tables: tables.clone(),
                savepoints: w.model.savepoints.clone(),
            };
            w.commit(tx, next, true, "restore the persistent savepoint");
            ephemeral = None;
        } else if i == at(7) {
            let (id, _) = persistent.take().unwrap();
            let tx = db.begin_write().unwrap();
            assert!(tx.delete_persistent_savepoint(id).unwrap());
            let mut next = w.model.clone();
            next.savepoints.retain(|s| *s != id);
            w.commit(tx, next, true, "delete the persistent savepoint");
        } else if i == at(8) {
            // Delete most of the data, then compact: the file shrinks.
            let tx = db.begin_write().unwrap();
            let mut next = w.model.clone();
            for (name, m) in next.tables.iter_mut() {
                let mut t = tx.open_table(def(name)).unwrap();
                t.retain(|k, _| k % 5 == 0).unwrap();
                m.retain(|k, _| k % 5 == 0);
            }
            w.commit(tx, next, true, "delete 4/5");
            let before = state.size();
            let n = w.run.commits.len();
            let begin = rec.mark(&format!("commit {n} begin: compact")).unwrap();
            while db.compact().unwrap() {}
            let done = rec.mark(&format!("commit {n} done")).unwrap();
            w.run.snaps.push(w.model.clone());
            w.run.commits.push(Commit {
                begin,
                done,
                durable: true,
                snap: w.run.snaps.len() - 1,
            });
            eprintln!("compaction: {before} -> {} bytes", state.size());
            assert!(
                state.size() < before,
                "the compaction did not shrink the file"
            );
        }
        let durable = rng.below(4) != 0;
        let abort = rng.below(12) == 0;
        w.changes(&db, &mut rng, durable, abort);
        // Before a reopen, a savepoint or a compaction, and at the end: an
        // Immediate commit.
        if (2..=8).any(|f| i + 1 == at(f)) || i + 1 == txs {
            w.changes(&db, &mut rng, true, false);
        }
        w.verify(&db, &format!("transaction {i}"));
    }
    drop(db);
    rec.mark("closed").unwrap();
    w.run
}

// ---------------------------------------------------------------------------
// The checker: redb opens each state through an overlay backend.

/// A state as redb storage: reads come from the state (bytes past the recorded
/// length read as zeros), writes (redb's repair) go to a private overlay.
struct StateBackend {
    view: StateView,
    st: Mutex<Overlay>,
}

struct Overlay {
    len: u64,
    /// Bytes below this and not in `chunks` are the state's; above, zeros.
    valid: u64,
    chunks: HashMap<u64, Box<[u8]>>,
}

const CHUNK: u64 = 4096;

impl std::fmt::Debug for StateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateBackend({})", self.view.spec())
    }
}

fn state_err(e: dio_crash::CrashError) -> io::Error {
    io::Error::other(e.to_string())
}

impl Overlay {
    /// Bytes at `pos` (inside one chunk) as stored, ignoring the overlay.
    fn read_under(&self, view: &StateView, pos: u64, out: &mut [u8]) -> io::Result<()> {
        let n = self.valid.saturating_sub(pos).min(out.len() as u64) as usize;
        if n > 0 {
            view.read_at(pos, &mut out[..n]).map_err(state_err)?;
        }
        out[n..].fill(0);
        Ok(())
    }

    fn chunk(&mut self, view: &StateView, c: u64) -> io::Result<&mut [u8]> {
        if !self.chunks.contains_key(&c) {
            let mut b = vec![0u8; CHUNK as usize].into_boxed_slice();
            self.read_under(view, c * CHUNK, &mut b)?;
            self.chunks.insert(c, b);
        }
        Ok(self.chunks.get_mut(&c).unwrap())
    }
}

impl StateBackend {
    fn new(view: StateView, len: u64) -> StateBackend {
        StateBackend {
            view,
            st: Mutex::new(Overlay {
                len,
                valid: len,
                chunks: HashMap::new(),
            }),
        }
    }
}

fn past_end(what: &str, offset: u64, n: usize, len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{what} of {n} bytes at {offset} past the end ({len})"),
    )
}

impl StorageBackend for StateBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.st.lock().unwrap().len)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let st = self.st.lock().unwrap();
        if offset + out.len() as u64 > st.len {
            return Err(past_end("read", offset, out.len(), st.len));
        }
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let c = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match st.chunks.get(&c) {
                Some(b) => dst.copy_from_slice(&b[within..within + n]),
                None => st.read_under(&self.view, pos, dst)?,
            }
            done += n;
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut st = self.st.lock().unwrap();
        if len < st.len {
            st.chunks.retain(|c, _| c * CHUNK < len);
            if let Some(b) = st.chunks.get_mut(&(len / CHUNK)) {
                b[(len % CHUNK) as usize..].fill(0);
            }
        }
        st.valid = st.valid.min(len).min(st.len);
        st.len = len;
        Ok(())
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut st = self.st.lock().unwrap();
        if offset + data.len() as u64 > st.len {
            return Err(past_end("write", offset, data.len(), st.len));
        }
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(data.len() - done);
            let b = st.chunk(&self.view, pos / CHUNK)?;
            b[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

/// The file's length in a state (0 before the first `set_len`).
fn state_len(view: &StateView) -> dio_crash::Result<u64> {
    let mut b = [0u8; 16];
    view.read_at(LEN_AT, &mut b)?;
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    Ok(if word(0) == LEN_MAGIC { word(8) } else { 0 })
}

#[derive(Debug, Default)]
struct Tally {
    /// States showing the newest allowed commit, an older one.
    newest: u64,
    older: u64,
    /// States before the database existed that did not open.
    refused_before_create: u64,
    /// States also opened through redb's own file backend.
    file_backend: u64,
}

struct RedbChecker<'a> {
    run: &'a Run,
    tally: Mutex<Tally>,
    /// Every this many states, the state is also written out as an image file
    /// and opened by redb's own file backend, which must find the same database.
    file_every: u64,
    seen: std::sync::atomic::AtomicU64,
}

thread_local! {
    /// Set while redb runs on a crash state: its panics are reported as
    /// failures, not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` catching panics, without the panic hook printing them.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                prev(info)
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r
}

/// A database over a crash state that is closed (dropped) only by
/// [`Closing::close`], once the state passed: on a state that failed, redb's
/// clean close (a commit) may panic inside its own destructors while unwinding,
/// which aborts the process, so a failed state's database is leaked instead.
struct Closing(Option<Database>);

impl Closing {
    fn close(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for Closing {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Closing {
    fn deref_mut(&mut self) -> &mut Database {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        std::mem::forget(self.0.take());
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "?".into())
}

impl RedbChecker<'_> {
    /// Judge a state; a panic anywhere in redb (opening, reading, checking,
    /// writing, or closing: a clean close commits) fails the state.
    fn judge(&self, view: &StateView) -> dio_crash::Result<Result<(), String>> {
        let stage = std::cell::Cell::new("opening");
        match quietly(|| self.judge_in(view, &stage)) {
            Err(p) => Ok(Err(format!(
                "redb panicked {} the state: {}",
                stage.get(),
                panic_text(&*p)
            ))),
            Ok(r) => r,
        }
    }

    fn judge_in(
        &self,
        view: &StateView,
        stage: &std::cell::Cell<&'static str>,
    ) -> dio_crash::Result<Result<(), String>> {
        let at = view.spec().at;
        let len = state_len(view)?;
        let before_create = at <= self.run.created;
        let backend = StateBackend::new(view.clone(), len);
        let opened = Database::builder()
            .set_cache_size(CACHE)
            .create_with_backend(backend);
        let mut db = match opened {
            Err(_) if before_create => {
                self.tally.lock().unwrap().refused_before_create += 1;
                return Ok(Ok(()));
            }
            Err(e) => return Ok(Err(format!("redb cannot open (length {len}): {e}"))),
            Ok(db) => Closing(Some(db)),
        };
        let (lo, hi) = if before_create {
            (0, 0)
        } else {
            self.run.allowed(at)
        };
        stage.set("reading");
        let got = match read_snap(&db) {
            Err(e) => return Ok(Err(format!("reading the opened database: {e}"))),
            Ok(s) => s,
        };
        let Some(k) = (lo..=hi).rev().find(|&k| self.run.snaps[k] == got) else {
            return Ok(Err(format!(
                "the database is no committed state in {lo}..={hi} (of commits {}..={}): \
                 against the newest, {}; against the oldest, {}",
                lo,
                hi,
                diff(&got, &self.run.snaps[hi]),
                diff(&got, &self.run.snaps[lo])
            )));
        };
        {
            let mut t = self.tally.lock().unwrap();
            if k == hi {
                t.newest += 1;
            } else {
                t.older += 1;
            }
        }
        let nth = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if nth % self.file_every == 0 {
            stage.set("writing out");
            if let Err(why) = self.through_a_file(view, len, &got)? {
                return Ok(Err(why));
            }
            self.tally.lock().unwrap().file_backend += 1;
        }
        let mut rng = Rng::new(at);
        stage.set("checking");
        let more = (|| -> Result<(), String> {
            check_ranges(&db, &self.run.snaps[k], &mut rng)?;
            db.check_integrity()
                .map_err(|e| format!("check_integrity: {e}"))?;
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut t = tx
                    .open_table(def("after-crash"))
                    .map_err(|e| format!("open a table after the crash: {e}"))?;
                t.insert(1, b"x".as_slice())
                    .map_err(|e| format!("write after the crash: {e}"))?;
            }
            tx.commit()
                .map_err(|e| format!("commit after the crash: {e}"))?;
            Ok(())
        })();
        if more.is_ok() {
            stage.set("closing");
            db.close();
        }
        Ok(more)
    }
}

/// A file removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl RedbChecker<'_> {
    /// The state as an image file cut to the file's length, opened by redb's
    /// `Database::create` (its file backend): the same contents as `want`.
    fn through_a_file(
        &self,
        view: &StateView,
        len: u64,
        want: &Snap,
    ) -> dio_crash::Result<Result<(), String>> {
        // Plain (buffered) I/O on this file: the temp dir (often tmpfs, where
        // redb's fsyncs cost nothing).
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let img = TempFile(std::env::temp_dir().join(format!(
            "dio-crash-redb-{}-{}.img",
            std::process::id(),
            SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )));
        view.write_image(&img.0)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img.0)
            .and_then(|f| f.set_len(len));
        if let Err(e) = f {
            return Ok(Err(format!("cut {} to {len}: {e}", img.0.display())));
        }
        let r = quietly(|| -> Result<Snap, String> {
            let db = Database::builder()
                .set_cache_size(CACHE)
                .create(&img.0)
                .map_err(|e| format!("redb's file backend cannot open the state: {e}"))?;
            let db = Closing(Some(db));
            let got = read_snap(&db)?;
            db.close();
            Ok(got)
        });
        Ok(match r {
            Err(p) => Err(format!(
                "redb panicked on the state as a file: {}",
                panic_text(&*p)
            )),
            Ok(Err(e)) => Err(e),
            Ok(Ok(got)) if got != *want => Err(format!(
                "redb's file backend and the overlay disagree: {}",
                diff(&got, want)
            )),
            Ok(Ok(_)) => Ok(()),
        })
    }
}

impl Checker for RedbChecker<'_> {
    fn name(&self) -> String {
        "redb".into()
    }
    fn check(&self, view: &StateView) -> dio_crash::Result<Verdict> {
        Ok(match self.judge(view)? {
            Ok(()) => Verdict::Pass,
            Err(why) => Verdict::Fail(why),
        })
    }
}

/// Record the workload, replay it, check every state with redb.
fn record_and_check(name: &str, seed: u64, mode: Mode) -> (Run, dio_crash::Summary, Tally) {
    let dir = common::scratch(name);
    let log_path = dir.join("log");
    // Threaded completions: the requests of one call complete out of order.
    let mem = Arc::new(MemDevice::new(
        MemDeviceConfig::new(DEV_SIZE, 512).threaded(None, true, seed),
    ));
    let rec = Arc::new(Recorder::create(Arc::clone(&mem), &log_path).unwrap());
    let long = common::long();
    let txs = if long { 600 } else { 120 };
    let run = workload(&rec, seed, txs, mode);
    drop(rec);
    let log = Arc::new(Log::open(&log_path).unwrap());
    let opts = ReplayOptions {
        max_per_window: if long { 48 } else { 16 },
        // The mutations fail early: fewer states suffice.
        max_states: Some(match (long, mode) {
            (true, Mode::Correct) => 40_000,
            (true, _) => 3000,
            (false, Mode::Correct) => 2000,
            (false, _) => 600,
        }),
        seed,
        ..ReplayOptions::default()
    };
    let checker = RedbChecker {
        run: &run,
        tally: Mutex::new(Tally::default()),
        file_every: 100,
        seen: Default::default(),
    };
    let sum = run_checked(&log, &checker, &opts, &dir);
    let tally = checker.tally.into_inner().unwrap();
    eprintln!(
        "redb {name}: {} commits ({} not durable, {} two-phase, {} quick-repair), {} aborted, \
         {} tables deleted, {} records, {} states, \
         {} failed, {:.0} states/s; states showing the newest allowed commit {}, an older \
         one {}, refused before the database existed {}, also opened as a file {}",
        run.commits.len(),
        run.non_durable,
        run.two_phase,
        run.quick_repair,
        run.aborted,
        run.tables_deleted,
        sum.records,
        sum.states,
        sum.failed,
        sum.rate(),
        tally.newest,
        tally.older,
        tally.refused_before_create,
        tally.file_backend
    );
    let _ = std::fs::remove_dir_all(&dir);
    (run, sum, tally)
}

fn run_checked(
    log: &Arc<Log>,
    checker: &RedbChecker<'_>,
    opts: &ReplayOptions,
    dir: &std::path::Path,
) -> dio_crash::Summary {
    run(log, Base::Zeros, &[checker], opts, &dir.join("states")).unwrap()
}

#[test]
fn redb_workload_every_crash_state_opens_at_a_committed_state() {
    let (run, sum, tally) = record_and_check("redb", 7, Mode::Correct);
    assert!(run.non_durable > 0 && run.aborted > 0);
    assert!(run.two_phase > 0 && run.quick_repair > 0 && run.tables_deleted > 0);
    assert!(sum.states >= 1000, "only {} states", sum.states);
    assert_eq!(sum.failed, 0, "{:#?}", sum.failures);
    // The replay reached states in the middle of commits, and states after
    // them.
    assert!(tally.newest > 0 && tally.older > 0, "{tally:?}");
    assert!(tally.file_backend >= 10, "{tally:?}");
}

fn expect_caught(name: &str, mode: Mode) {
    let (_, sum, _) = record_and_check(name, 7, mode);
    assert!(sum.failed > 0, "{mode:?} went unnoticed");
    let f = &sum.failures[0];
    assert_eq!(f.checker, "redb");
    let spec = f.spec.to_string();
    eprintln!(
        "first failure: {} ({:?}): {}",
        &spec[..spec.len().min(120)],
        f.mark,
        f.message
    );
}

#[test]
fn mutation_sync_data_that_does_not_flush_is_caught() {
    expect_caught("redb-noflush", Mode::NoFlush);
}

#[test]
fn mutation_write_behind_flushed_before_its_writes_is_caught() {
    expect_caught("redb-early-flush", Mode::FlushBeforeWrites);
}
