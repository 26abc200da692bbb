//! Per-file state shared by every request on one file: the size (i_size), the file
//! lock of the locking mode, the in-flight direct-I/O count that truncate waits on
//! (i_dio_count), and the block-range lock that serialises writes which share a
//! partly written fs block. No I/O happens here.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::shard::{self, Sharded};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State of one open file.
#[derive(Debug)]
pub struct FileState {
    size: AtomicU64,
    file_lock: FileLock,
    /// In-flight direct I/O, sharded by thread: every call counts itself in and out,
    /// so one shared count would be a line every thread writes. A call counts down
    /// the shard it counted up (see [`Begin::Counted`]); truncate sums the shards.
    dio_count: Sharded,
    dio_waiters: AtomicU64,
    dio_zero: Mutex<()>,
    dio_zero_cv: Condvar,
    /// A truncate is under way: new direct I/O waits at [`FileState::dio_begin`].
    truncating: AtomicBool,
    gate: Mutex<GateState>,
    gate_cv: Condvar,
    ranges: RangeLock,
}

impl FileState {
    /// A file of `size` bytes.
    pub fn new(size: u64) -> FileState {
        FileState {
            size: AtomicU64::new(size),
            file_lock: FileLock::default(),
            dio_count: Sharded::default(),
            dio_waiters: AtomicU64::new(0),
            dio_zero: Mutex::new(()),
            dio_zero_cv: Condvar::new(),
            truncating: AtomicBool::new(false),
            gate: Mutex::new(GateState::default()),
            gate_cv: Condvar::new(),
            ranges: RangeLock::new(size),
        }
    }

    /// Current size (i_size).
    #[inline]
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Set the size. Truncation should go through [`crate::DirectFile::truncate`],
    /// which also waits for in-flight I/O and tells the block map.
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Grow the size to `end` if it is smaller (an extending write completed).
    pub fn extend_to(&self, end: u64) {
        self.size.fetch_max(end, Ordering::AcqRel);
    }

    /// Take the file lock shared (what a locking-mode read holds during lookups, and
    /// a locking-mode overwrite of mapped blocks until it completes).
    pub fn lock_shared(&self) -> FileLockGuard<'_> {
        FileLockGuard(self, self.file_lock.acquire(LockKind::Shared))
    }

    /// Take the file lock exclusively (what truncate holds, and a locking-mode write
    /// that may allocate until its data is on the device).
    pub fn lock_exclusive(&self) -> FileLockGuard<'_> {
        FileLockGuard(self, self.file_lock.acquire(LockKind::Exclusive))
    }

    pub(crate) fn file_lock(&self) -> &FileLock {
        &self.file_lock
    }

    /// Direct I/O requests in flight on this file.
    pub fn dio_count(&self) -> u64 {
        self.dio_count.sum(Ordering::SeqCst)
    }

    /// Count a direct I/O in, before it samples i_size or maps a block. While a
    /// truncate is under way this fails ([`Begin::Closed`]) instead, and the caller
    /// waits for the gate ([`FileState::wait_gate`]) or has its call run when the
    /// gate opens ([`FileState::defer`]): otherwise the call could map a block that
    /// the truncate is about to free, and read another offset's data once the block
    /// is reused (the kernel holds i_rwsem against this; LTP dio_truncate).
    ///
    /// The count goes up before the gate is checked, and truncate closes the gate
    /// before it checks the count (both SeqCst): either truncate waits for this I/O,
    /// or this I/O sees the gate and steps back. The count is the calling thread's
    /// shard of it; truncate reads every shard after closing the gate, so it sees
    /// every call that got past the gate (each shard only counts calls in flight on
    /// it, and a call counts down the shard it counted up: a sum of shards read one
    /// by one is never below the calls in flight throughout the reading).
    ///
    /// The truncating thread itself passes: it reaches here only from a completion
    /// callback run while truncate drains, and truncate then drains this call too.
    #[inline]
    pub(crate) fn try_dio_begin(&self) -> Begin {
        let at = shard::shard();
        self.dio_count.at(at).fetch_add(1, Ordering::SeqCst);
        if !self.truncating.load(Ordering::SeqCst) {
            return Begin::Counted(at);
        }
        self.dio_begin_truncating(at)
    }

    /// [`FileState::try_dio_begin`] while a truncate is under way.
    #[cold]
    fn dio_begin_truncating(&self, at: usize) -> Begin {
        let g = lock(&self.gate);
        if g.truncator == Some(std::thread::current().id()) {
            return Begin::Counted(at);
        }
        drop(g);
        self.dio_end(at);
        Begin::Closed
    }

    /// Block while a truncate is under way.
    pub(crate) fn wait_gate(&self) {
        let mut g = lock(&self.gate);
        while self.truncating.load(Ordering::SeqCst) {
            g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Run `job` when the truncate under way is over (by the truncating thread, as
    /// it opens the gate), or now, on this thread, if it is over already. Async
    /// calls wait this way: blocking could stall a device thread whose completions
    /// the truncate is waiting for.
    pub(crate) fn defer(&self, job: Job) {
        let mut g = lock(&self.gate);
        if self.truncating.load(Ordering::SeqCst) {
            g.deferred.push(job);
        } else {
            drop(g);
            job();
        }
    }

    /// Hold new direct I/O at [`FileState::try_dio_begin`] until the guard drops
    /// (the caller then waits for the I/O in flight to drain).
    pub(crate) fn close_gate(&self) -> Gate<'_> {
        lock(&self.gate).truncator = Some(std::thread::current().id());
        self.truncating.store(true, Ordering::SeqCst);
        Gate(self)
    }

    /// Count a direct I/O out of shard `at`, the one [`FileState::try_dio_begin`]
    /// counted it in (on whatever thread the call finishes).
    #[inline]
    pub(crate) fn dio_end(&self, at: usize) {
        // A waiter registers before it checks the count, and we check for waiters
        // after the count drops (both SeqCst): one of us sees the other. Taking the
        // mutex orders the wakeup after the waiter went to sleep. (The waiter sums
        // the shards again: a wakeup for a shard that is not the last is cheap, and
        // there is a waiter only while a truncate drains.)
        self.dio_count.at(at).fetch_sub(1, Ordering::SeqCst);
        if self.dio_waiters.load(Ordering::SeqCst) > 0 {
            self.wake_dio_waiters();
        }
    }

    #[cold]
    fn wake_dio_waiters(&self) {
        let _g = lock(&self.dio_zero);
        self.dio_zero_cv.notify_all();
    }

    /// Block until no direct I/O is in flight (inode_dio_wait).
    pub fn wait_dio_zero(&self) {
        let mut g = lock(&self.dio_zero);
        self.dio_waiters.fetch_add(1, Ordering::SeqCst);
        while self.dio_count() != 0 {
            g = self.dio_zero_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.dio_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn ranges(&self) -> &RangeLock {
        &self.ranges
    }
}

/// The file lock held (see [`FileState::lock_shared`]); released on drop.
#[must_use = "the lock is released when the guard drops"]
pub struct FileLockGuard<'a>(&'a FileState, Held);

impl std::fmt::Debug for FileLockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileLockGuard({:?})", self.1.kind)
    }
}

impl Drop for FileLockGuard<'_> {
    fn drop(&mut self) {
        self.0.file_lock.release(self.1);
    }
}

/// How the file lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    Shared,
    Exclusive,
}

/// A hold on the file lock: its kind, and for a shared one the reader shard it was
/// counted on (counted down there on release, on whatever thread releases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) kind: LockKind,
    at: usize,
}

/// [`FileLock::gate`]: an exclusive holder holds the lock or is taking it (new
/// readers go the slow way and wait).
const WRITER: u8 = 1;
/// [`FileLock::gate`]: someone sleeps or is parked on the lock (a reader that
/// releases goes the slow way and wakes them).
const WAITING: u8 = 2;

/// The file lock (the seed's i_mutex / i_rwsem under DIO_LOCKING): readers share it,
/// truncate and allocating writes hold it alone. Sync callers wait for it; an async
/// call never waits (it may run on a thread that delivers completions): it parks
/// itself, and is started again when the lock is released.
///
/// Readers take no lock in common (a per-CPU rwsem, as the kernel's
/// `percpu_rw_semaphore`): a reader counts itself in on its thread's shard of
/// [`FileLock::readers`] and then checks [`WRITER`]; an exclusive holder sets
/// [`WRITER`] and then waits for the shards to sum to zero. Both steps are SeqCst,
/// so either the writer sees the reader's count or the reader sees the flag (and
/// counts itself out again). A shard is counted down where it was counted up
/// ([`Held`]), so a sum of shards read one by one is never below the readers that
/// hold the lock throughout the reading. Everything else (sleepers, parked calls,
/// the exclusive holder) is under the mutex, which a reader's release takes only
/// when [`FileLock::gate`] is not zero.
///
/// On lines of its own: every locking-mode call reads it, and the file's size and
/// truncate flag next to it are read by every call.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct FileLock {
    readers: Sharded,
    gate: AtomicU8,
    st: Mutex<LockState>,
    cv: Condvar,
}

#[derive(Default)]
struct LockState {
    /// Sync callers asleep waiting.
    sleepers: usize,
    parked: Vec<Job>,
}

impl std::fmt::Debug for FileLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.st);
        f.debug_struct("FileLock")
            .field("readers", &self.readers.sum(Ordering::SeqCst))
            .field("writer", &(self.gate.load(Ordering::SeqCst) & WRITER != 0))
            .field("parked", &st.parked.len())
            .finish()
    }
}

impl FileLock {
    /// Take the lock, waiting for it.
    pub(crate) fn acquire(&self, kind: LockKind) -> Held {
        match kind {
            LockKind::Shared => loop {
                if let Some(h) = self.try_shared() {
                    return h;
                }
                let mut st = lock(&self.st);
                while self.gate.load(Ordering::SeqCst) & WRITER != 0 {
                    st = self.sleep(st);
                }
            },
            LockKind::Exclusive => {
                let mut st = lock(&self.st);
                while self.gate.load(Ordering::SeqCst) & WRITER != 0 {
                    st = self.sleep(st);
                }
                self.gate.fetch_or(WRITER, Ordering::SeqCst);
                while self.readers.sum(Ordering::SeqCst) != 0 {
                    st = self.sleep(st);
                }
                Held { kind, at: 0 }
            }
        }
    }

    /// Sleep until woken (a release, or a reader leaving while [`WRITER`] is set).
    fn sleep<'a>(&self, mut st: MutexGuard<'a, LockState>) -> MutexGuard<'a, LockState> {
        st.sleepers += 1;
        self.gate.fetch_or(WAITING, Ordering::SeqCst);
        st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        st.sleepers -= 1;
        self.settle(&st);
        st
    }

    /// Clear [`WAITING`] when nobody sleeps or is parked any more (under the mutex).
    fn settle(&self, st: &LockState) {
        if st.sleepers == 0 && st.parked.is_empty() {
            self.gate.fetch_and(!WAITING, Ordering::SeqCst);
        }
    }

    /// Count a reader in, unless an exclusive holder is there.
    #[inline]
    fn try_shared(&self) -> Option<Held> {
        let at = shard::shard();
        self.readers.at(at).fetch_add(1, Ordering::SeqCst);
        let held = Held {
            kind: LockKind::Shared,
            at,
        };
        if self.gate.load(Ordering::SeqCst) & WRITER == 0 {
            return Some(held);
        }
        // A writer is there, or coming: step back (and wake it if it waits for us).
        self.release(held);
        None
    }

    /// Take the lock if it is free now.
    pub(crate) fn try_acquire(&self, kind: LockKind) -> Option<Held> {
        match kind {
            LockKind::Shared => self.try_shared(),
            LockKind::Exclusive => {
                let st = lock(&self.st);
                if self.gate.load(Ordering::SeqCst) & WRITER != 0 {
                    return None;
                }
                self.gate.fetch_or(WRITER, Ordering::SeqCst);
                if self.readers.sum(Ordering::SeqCst) == 0 {
                    return Some(Held { kind, at: 0 });
                }
                // Readers hold it: give the flag back, and wake or restart whoever
                // saw it meanwhile.
                self.gate.fetch_and(!WRITER, Ordering::SeqCst);
                self.wake(st);
                None
            }
        }
    }

    /// Park `job` until the lock is released, unless it is free now: then the job
    /// comes back, to be run (retried) by the caller.
    pub(crate) fn park_unless_free(&self, kind: LockKind, job: Job) -> Option<Job> {
        let mut st = lock(&self.st);
        // Flagged first: a reader that leaves after the count below sees it.
        self.gate.fetch_or(WAITING, Ordering::SeqCst);
        let gate = self.gate.load(Ordering::SeqCst);
        let free = gate & WRITER == 0
            && (kind == LockKind::Shared || self.readers.sum(Ordering::SeqCst) == 0);
        if free {
            self.settle(&st);
            return Some(job);
        }
        st.parked.push(job);
        None
    }

    /// Release the lock; parked calls are started again (on this thread).
    pub(crate) fn release(&self, held: Held) {
        match held.kind {
            LockKind::Shared => {
                self.readers.at(held.at).fetch_sub(1, Ordering::SeqCst);
                if self.gate.load(Ordering::SeqCst) == 0 {
                    return;
                }
                self.wake(lock(&self.st));
            }
            LockKind::Exclusive => {
                let st = lock(&self.st);
                self.gate.fetch_and(!WRITER, Ordering::SeqCst);
                self.wake(st);
            }
        }
    }

    /// Wake the sleepers and restart the parked calls (outside the mutex).
    fn wake(&self, mut st: MutexGuard<'_, LockState>) {
        let parked = std::mem::take(&mut st.parked);
        let sleepers = st.sleepers > 0;
        self.settle(&st);
        drop(st);
        if sleepers {
            self.cv.notify_all();
        }
        for job in parked {
            job();
        }
    }
}

/// A closed gate for new direct I/O (see [`FileState::close_gate`]); reopens on drop.
pub(crate) struct Gate<'a>(&'a FileState);

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let state = self.0;
        let deferred = {
            // Under the mutex, so that a waiter between its check and its sleep
            // cannot miss the wakeup, and no call is deferred after the list is taken.
            let mut g = lock(&state.gate);
            state.truncating.store(false, Ordering::SeqCst);
            g.truncator = None;
            std::mem::take(&mut g.deferred)
        };
        state.gate_cv.notify_all();
        for job in deferred {
            job();
        }
    }
}

/// A call deferred until a truncate is over.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// What [`FileState::try_dio_begin`] did.
pub(crate) enum Begin {
    /// The call is counted in flight, on this shard of the count.
    Counted(usize),
    /// A truncate is under way: not counted.
    Closed,
}

/// The truncate gate's state: who truncates, and the async calls waiting for it.
#[derive(Default)]
struct GateState {
    truncator: Option<std::thread::ThreadId>,
    deferred: Vec<Job>,
}

impl std::fmt::Debug for GateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateState")
            .field("truncator", &self.truncator)
            .field("deferred", &self.deferred.len())
            .finish()
    }
}

/// Exclusive locks on byte ranges of a file: a holder waits until no overlapping
/// range is held. Non-overlapping ranges never wait for each other.
///
/// Every write takes one (the fs-block-rounded range of the write), so the lock
/// must cost little and must not be one line that every writer of the file writes:
/// that line would bounce between the cores of all writers, overlapping or not.
///
/// **Shards.** The file is cut in stripes of [`STRIPE`] bytes, and each stripe
/// belongs to one of [`LOCK_SHARDS`] shards. A shard is on lines of its own and
/// holds every held range that touches one of its stripes (a range spanning several
/// stripes is held in each of their shards; one spanning [`LOCK_SHARDS`] stripes or
/// more, in all). Two ranges that overlap share a byte, so a stripe, so a shard:
/// checking the shards of a range's stripes finds every holder that overlaps it.
///
/// Which shard: the file (its size when the lock is made) is cut in [`PARTS`]
/// parts, each with its own [`PER_PART`] shards, and within a part a hash of the
/// stripe number picks one. Writers in different parts of the file (threads that
/// share a file out between them, sequentially or at random offsets) then never
/// touch the same shard: a shard that both touch would be a line moving between
/// their cores at every write. Writers in the same part (neighbours, or random
/// writers over the whole file) meet on one of the part's shards as often as the
/// hash makes two stripes collide. Past the size, parts repeat; a file made empty
/// gets one-stripe parts (a hash over all shards).
///
/// **Fast slots.** Most writes lock a range of whole sectors inside one stripe. Such
/// a range fits one word exactly ([`fast_key`]), and a shard has [`SLOTS`] words
/// for them: a holder claims a free slot with one compare-and-swap and gives it
/// back with one swap, with no mutex and no list. A claim is first marked
/// [`PENDING`]; the claimer then checks the shard's [`SLOW`] flag and the other
/// slots (all SeqCst: of two overlapping claims, the later one's check sees the
/// earlier one), and keeps the slot only if neither shows a conflict. A pending
/// claim counts as held for everyone else's checks; the pending mark keeps a
/// holder's release from taking another thread's transient claim of the same range
/// for its own (only one thread ever holds a range without the mark).
///
/// **The slow side.** Everything else (ranges of several stripes or of partial
/// sectors, a shard whose slots are full, a conflict, a waiter, a parked async call)
/// goes under the shard's mutex: held ranges in an ordered vector, the waiters and
/// the parked calls. Whoever works there first sets the shard's [`SLOW`] flag
/// (SeqCst) and only then looks at the slots: a fast claim either is seen there, or
/// sees the flag and checks again under the mutex. While the flag is set, new
/// takers go the slow way, and a fast holder's release (swap, then a look at the
/// flag: SeqCst both) comes to the mutex to wake the waiters and start the parked
/// calls. The flag is cleared (under the mutex) once the shard's vector, waiters and
/// parked calls are all empty: the vector is never non-empty without it.
///
/// A lock of several shards takes their mutexes in increasing order, checks them
/// all, and inserts into all or none, so it is atomic like the single-shard one. A
/// waiter waits on the shard where it found the overlapping holder; that holder's
/// release goes through that shard (the flag makes a fast release do so too), and
/// wakes it (or starts its parked retry).
#[derive(Debug)]
pub(crate) struct RangeLock {
    shards: Box<[RangeShard; LOCK_SHARDS]>,
    /// 2^64 / stripes per part, rounded up: the part of stripe `s` is the high word
    /// of `s` times this (modulo [`PARTS`]), a division without a divide.
    part_mul: u128,
}

impl Default for RangeLock {
    fn default() -> Self {
        RangeLock::new(0)
    }
}

/// Parts of the file with shards of their own (see [`RangeLock`]).
const PARTS: usize = 4;
/// Shards of a part.
const PER_PART: usize = 16;
/// Shards of a [`RangeLock`].
pub(crate) const LOCK_SHARDS: usize = PARTS * PER_PART;

/// Bytes per stripe of a [`RangeLock`]: a 4 KiB write takes one shard, a 1 MiB one
/// at most two.
pub(crate) const STRIPE: u64 = 1 << 20;

/// Fast slots per shard: with the flag and the condvar, one 64-byte line; the
/// mutex side is the next line (the adjacent-line prefetcher pairs the two, which
/// belong to the same shard).
const SLOTS: usize = 7;

/// [`RangeShard::mode`]: the mutex side is in use (see [`RangeLock`]).
const SLOW: u32 = 1;

/// A fast slot's claim not yet confirmed (see [`RangeLock`]).
const PENDING: u64 = 1;

/// The word of a pending claim of `key`.
#[inline]
fn pending(key: u64) -> u64 {
    key | PENDING
}

/// Granularity of a fast slot's range: a sector.
const SECTOR: u64 = 512;
/// Sectors per stripe (11 bits of a key each for the offset and the length).
const STRIPE_SECTORS: u64 = STRIPE / SECTOR;
/// Where a key's stripe number (plus one) starts; below it, the length in sectors
/// minus one (11 bits), the offset in sectors (11 bits), and [`PENDING`].
const KEY_STRIPE: u32 = 23;

/// One shard of a [`RangeLock`], on lines of its own.
#[derive(Debug, Default)]
#[repr(C, align(128))]
struct RangeShard {
    /// [`SLOW`] or 0.
    mode: AtomicU32,
    released: Condvar,
    /// Held (or [`PENDING`]) ranges of whole sectors in one stripe ([`fast_key`]), or 0.
    slots: [AtomicU64; SLOTS],
    held: Mutex<Ranges>,
}

#[derive(Default)]
struct Ranges {
    /// Held ranges (start, end), ordered by start, that are not in a slot.
    held: Vec<(u64, u64)>,
    /// Async calls waiting for a range, started again at the next release.
    parked: Vec<Job>,
    /// Threads waiting for a range: only then does a release need a wakeup.
    waiters: usize,
}

impl std::fmt::Debug for Ranges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranges")
            .field("held", &self.held)
            .field("waiters", &self.waiters)
            .field("parked", &self.parked.len())
            .finish()
    }
}

/// An empty range locks its first byte (so that held ranges are never empty, and
/// no two share a start).
#[inline]
fn nonempty(start: u64, end: u64) -> (u64, u64) {
    (start, end.max(start.saturating_add(1)))
}

/// The word of the non-empty range `[start, end)` in a fast slot, if it has one:
/// whole sectors inside one stripe (below 2^61 bytes). Never 0 and never
/// [`PENDING`]-marked; two keys are equal only for equal ranges.
#[inline]
fn fast_key(start: u64, end: u64) -> Option<u64> {
    let stripe = start / STRIPE;
    let off = start % STRIPE;
    let fits = (start | end) % SECTOR == 0
        && end - start <= STRIPE - off
        && stripe < (1 << (64 - KEY_STRIPE)) - 1;
    fits.then(|| {
        (stripe + 1) << KEY_STRIPE | ((end - start) / SECTOR - 1) << 12 | (off / SECTOR) << 1
    })
}

/// The range `[start, end)` of a slot's word (marked or not).
#[inline]
fn key_range(key: u64) -> (u64, u64) {
    let start = ((key >> KEY_STRIPE) - 1) * STRIPE + (key >> 1 & (STRIPE_SECTORS - 1)) * SECTOR;
    let len = ((key >> 12 & (STRIPE_SECTORS - 1)) + 1) * SECTOR;
    (start, start + len)
}

/// The shards of `mask`, in increasing order.
#[inline]
fn each(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let i = mask.trailing_zeros();
            mask &= mask - 1;
            i as usize
        })
    })
}

impl Ranges {
    #[inline]
    fn overlaps(&self, start: u64, end: u64) -> bool {
        let below = self.held.partition_point(|&(s, _)| s < end);
        below > 0 && self.held[below - 1].1 > start
    }

    #[inline]
    fn insert(&mut self, start: u64, end: u64) {
        let at = self.held.partition_point(|&(s, _)| s < start);
        self.held.insert(at, (start, end));
    }

    #[inline]
    fn remove(&mut self, start: u64, end: u64) {
        let at = self.held.partition_point(|&(s, _)| s < start);
        if self.held.get(at) == Some(&(start, end)) {
            self.held.remove(at);
        }
    }
}

impl RangeShard {
    /// Claim a free slot for `word`; its index.
    #[inline]
    fn claim(&self, word: u64) -> Option<usize> {
        self.slots.iter().position(|s| {
            s.load(Ordering::Relaxed) == 0
                && s.compare_exchange(0, word, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// A slot other than `except` holds (or claims) a range overlapping
    /// `[start, end)`.
    #[inline]
    fn slots_overlap(&self, except: usize, start: u64, end: u64) -> bool {
        self.slots.iter().enumerate().any(|(i, s)| {
            let w = s.load(Ordering::SeqCst);
            w != 0 && i != except && {
                let (a, b) = key_range(w);
                a < end && start < b
            }
        })
    }

    /// The shard's mutex, with [`SLOW`] set (before anything is looked at).
    fn enter(&self) -> MutexGuard<'_, Ranges> {
        let g = lock(&self.held);
        // Set already: by a SeqCst store under this mutex, and not cleared since.
        if self.mode.load(Ordering::Relaxed) & SLOW == 0 {
            self.mode.store(SLOW, Ordering::SeqCst);
        }
        g
    }

    /// Clear [`SLOW`] when nothing is left on the mutex side (under the mutex).
    fn settle(&self, g: &Ranges) {
        if g.held.is_empty()
            && g.waiters == 0
            && g.parked.is_empty()
            && self.mode.load(Ordering::Relaxed) != 0
        {
            self.mode.store(0, Ordering::SeqCst);
        }
    }

    /// `[start, end)` overlaps a range held here, in the vector or a slot.
    fn overlaps(&self, g: &Ranges, start: u64, end: u64) -> bool {
        g.overlaps(start, end) || self.slots_overlap(SLOTS, start, end)
    }

    /// After a range left this shard: wake the waiters, and hand back the parked
    /// calls (to be started outside the mutex).
    fn released(&self, g: &mut Ranges) -> Vec<Job> {
        if g.waiters > 0 {
            self.released.notify_all();
        }
        let parked = std::mem::take(&mut g.parked);
        self.settle(g);
        parked
    }

    /// A fast slot was emptied while [`SLOW`] was set.
    #[cold]
    fn wake(&self) {
        let parked = self.released(&mut lock(&self.held));
        parked.into_iter().for_each(|job| job());
    }

    /// Keep the pending claim of slot `at` for `key` if nothing overlaps it (under
    /// the mutex: the vector, and the other slots); else give it back.
    #[cold]
    fn confirm(&self, at: usize, key: u64) -> bool {
        let (start, end) = key_range(key);
        let mut g = lock(&self.held);
        if !g.overlaps(start, end) && !self.slots_overlap(at, start, end) {
            self.slots[at].store(key, Ordering::Release);
            return true;
        }
        // Someone may wait (or be parked) for our claim.
        self.slots[at].store(0, Ordering::SeqCst);
        let parked = self.released(&mut g);
        drop(g);
        parked.into_iter().for_each(|job| job());
        false
    }
}

impl RangeLock {
    /// A lock for a file of `size` bytes (which sets the parts, see [`RangeLock`]).
    pub(crate) fn new(size: u64) -> RangeLock {
        let part_stripes = size.div_ceil(STRIPE).div_ceil(PARTS as u64).max(1);
        RangeLock {
            shards: Box::new(std::array::from_fn(|_| RangeShard::default())),
            part_mul: (1u128 << 64).div_ceil(u128::from(part_stripes)),
        }
    }

    /// The shard of stripe `s`: its part's, picked by Fibonacci hashing (the top
    /// bits of a multiple). Any function of `s` alone would be correct.
    #[inline]
    fn shard_of(&self, s: u64) -> usize {
        let part = ((u128::from(s) * self.part_mul) >> 64) as usize % PARTS;
        let hash = s.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - PER_PART.trailing_zeros());
        part * PER_PART + hash as usize
    }

    /// The shard of a key's stripe.
    #[inline]
    fn key_shard(&self, key: u64) -> usize {
        self.shard_of((key >> KEY_STRIPE) - 1)
    }

    /// The shards of the stripes of the non-empty range `[start, end)`, one bit
    /// each; all of them for a range of many stripes (a superset is correct too).
    #[inline]
    fn shards_of(&self, start: u64, end: u64) -> u64 {
        let (first, last) = (start / STRIPE, (end - 1) / STRIPE);
        if last - first >= LOCK_SHARDS as u64 - 1 {
            return u64::MAX >> (64 - LOCK_SHARDS);
        }
        (first..=last).fold(0, |m, s| m | 1 << self.shard_of(s))
    }

    /// Take the non-empty `[start, end)` in a fast slot, if it has a key, its shard
    /// is not [`SLOW`], a slot is free and nothing overlaps.
    #[inline]
    fn take_fast(&self, start: u64, end: u64) -> bool {
        let Some(key) = fast_key(start, end) else {
            return false;
        };
        let sh = &self.shards[self.key_shard(key)];
        if sh.mode.load(Ordering::Relaxed) & SLOW != 0 {
            return false;
        }
        let Some(at) = sh.claim(pending(key)) else {
            return false;
        };
        if sh.mode.load(Ordering::SeqCst) & SLOW == 0 && !sh.slots_overlap(at, start, end) {
            // Ours alone: unmark (only we write this slot until we release it).
            sh.slots[at].store(key, Ordering::Release);
            return true;
        }
        sh.confirm(at, key)
    }

    /// Take the non-empty range `[start, end)` on the slow side if no overlapping
    /// range is held; else the shard where an overlapping one was seen.
    fn try_take(&self, start: u64, end: u64) -> std::result::Result<(), usize> {
        let mask = self.shards_of(start, end);
        // Every shard's mutex, in increasing order (as every taker of several does:
        // no deadlock), then check all and insert into all.
        let mut guards: [Option<MutexGuard<'_, Ranges>>; LOCK_SHARDS] =
            std::array::from_fn(|_| None);
        for i in each(mask) {
            let sh = &self.shards[i];
            let g = sh.enter();
            if sh.overlaps(&g, start, end) {
                sh.settle(&g);
                for (j, g) in guards.iter().enumerate() {
                    if let Some(g) = g {
                        self.shards[j].settle(g);
                    }
                }
                return Err(i);
            }
            guards[i] = Some(g);
        }
        for g in guards.iter_mut().flatten() {
            g.insert(start, end);
        }
        Ok(())
    }

    /// Lock `[start, end)`, waiting for overlapping holders.
    #[inline]
    pub(crate) fn lock(&self, start: u64, end: u64) {
        let (start, end) = nonempty(start, end);
        if !self.take_fast(start, end) {
            self.lock_slow(start, end);
        }
    }

    #[cold]
    fn lock_slow(&self, start: u64, end: u64) {
        while let Err(i) = self.try_take(start, end) {
            // Wait until that shard no longer holds an overlapping range, then try
            // the whole range again.
            let sh = &self.shards[i];
            let mut g = sh.enter();
            while sh.overlaps(&g, start, end) {
                g.waiters += 1;
                g = sh.released.wait(g).unwrap_or_else(|e| e.into_inner());
                g.waiters -= 1;
            }
            sh.settle(&g);
        }
    }

    /// Lock `[start, end)` if no overlapping range is held.
    #[inline]
    pub(crate) fn try_lock(&self, start: u64, end: u64) -> bool {
        let (start, end) = nonempty(start, end);
        self.take_fast(start, end) || self.try_take(start, end).is_ok()
    }

    /// Park `job` until a range is released, unless `[start, end)` is free now: then
    /// the job comes back, to be run (retried) by the caller. For async calls, which
    /// never wait. The job parks in the shard where an overlapping holder is seen,
    /// under that shard's mutex and with its [`SLOW`] flag set: the holder's release
    /// runs it.
    pub(crate) fn park_unless_free(&self, start: u64, end: u64, job: Job) -> Option<Job> {
        let (start, end) = nonempty(start, end);
        for i in each(self.shards_of(start, end)) {
            let sh = &self.shards[i];
            let mut g = sh.enter();
            if sh.overlaps(&g, start, end) {
                g.parked.push(job);
                return None;
            }
            sh.settle(&g);
        }
        Some(job)
    }

    /// Release a range taken with `lock`; parked calls are started again (on this
    /// thread).
    #[inline]
    pub(crate) fn unlock(&self, start: u64, end: u64) {
        let (start, end) = nonempty(start, end);
        if let Some(key) = fast_key(start, end) {
            let sh = &self.shards[self.key_shard(key)];
            // Only the holder has this word unmarked in a slot.
            if let Some(slot) = sh.slots.iter().find(|s| s.load(Ordering::Relaxed) == key) {
                slot.store(0, Ordering::SeqCst);
                if sh.mode.load(Ordering::SeqCst) & SLOW != 0 {
                    sh.wake();
                }
                return;
            }
        }
        self.unlock_slow(start, end);
    }

    /// Release a range held on the slow side.
    #[cold]
    fn unlock_slow(&self, start: u64, end: u64) {
        let mut parked = Vec::new();
        for i in each(self.shards_of(start, end)) {
            let sh = &self.shards[i];
            let mut g = lock(&sh.held);
            g.remove(start, end);
            parked.append(&mut sh.released(&mut g));
        }
        parked.into_iter().for_each(|job| job());
    }
}

#[cfg(test)]
mod tests {
    use super::{fast_key, RangeLock, Ranges, PARTS, STRIPE};
    use std::sync::atomic::Ordering;
    use std::sync::{mpsc, Mutex};

    fn xorshift(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// A random range: small or spanning stripes, empty, or to the end of any file.
    fn range(rnd: &mut dyn FnMut(u64) -> u64) -> (u64, u64) {
        // Units of a sector, or of a quarter stripe (ranges across stripes, and
        // across more stripes than there are shards).
        let unit = if rnd(2) == 0 { 512 } else { STRIPE / 4 };
        let s = rnd(64) * unit + [0, STRIPE - 512, 3 * STRIPE][rnd(3) as usize];
        let e = match rnd(10) {
            0 => s,
            1 => u64::MAX,
            _ => s + (1 + rnd(80)) * unit,
        };
        (s, e)
    }

    /// A range crowded into a few stripes (so into few shards, more holders than a
    /// shard has slots): mostly the fast slots' shape (whole sectors inside one
    /// stripe; often the very same range, so that claims of one range race), some
    /// not (bytes, across a boundary, empty, to the end of any file).
    fn crowded(rnd: &mut dyn FnMut(u64) -> u64) -> (u64, u64) {
        // Stripes 0 and 1, and the first stripes of the second and last parts of a
        // 64 MiB file.
        let base = [0, STRIPE, 16 * STRIPE, 48 * STRIPE][rnd(4) as usize];
        let s = base + rnd(48) * 512;
        match rnd(16) {
            0 => (s + 1 + rnd(511), s + 4096 + rnd(700)),
            1 => (base + STRIPE - 2048, base + STRIPE + 512 * (1 + rnd(8))),
            2 => (s, s),
            3 => (s, u64::MAX),
            4..=7 => (base, base + 4096),
            _ => (s, s + 512 * (1 + rnd(12))),
        }
    }

    type Pick = fn(&mut dyn FnMut(u64) -> u64) -> (u64, u64);

    fn overlap(model: &[(u64, u64)], s: u64, e: u64) -> bool {
        let (ms, me) = (s, e.max(s + 1));
        model.iter().any(|&(a, b)| a < me && ms < b.max(a + 1))
    }

    /// Nothing is left held, in a slot or on a mutex side, and no shard stays on
    /// the slow side.
    fn assert_clean(lk: &RangeLock) {
        for (i, sh) in lk.shards.iter().enumerate() {
            let g = sh.held.lock().unwrap();
            let Ranges {
                held,
                parked,
                waiters,
            } = &*g;
            assert!(
                held.is_empty() && parked.is_empty() && *waiters == 0,
                "shard {i}: {g:?}"
            );
            assert_eq!(sh.mode.load(Ordering::SeqCst), 0, "shard {i} stays slow");
            for slot in &sh.slots {
                assert_eq!(
                    slot.load(Ordering::SeqCst),
                    0,
                    "shard {i}: a slot stays taken"
                );
            }
        }
    }

    /// Locks for files of no size, of a few stripes (parts of two), and large.
    fn locks() -> [RangeLock; 3] {
        [
            RangeLock::new(0),
            RangeLock::new(7 * STRIPE + 5),
            RangeLock::new(64 * STRIPE),
        ]
    }

    /// try_lock agrees with a brute-force overlap check over the held set, for
    /// random ranges (touching, nested, empty, within one stripe and across many,
    /// up to u64::MAX; spread out, or crowded into a few shards with more holders
    /// than slots), and unlock frees exactly what was taken.
    #[test]
    fn range_lock_matches_a_brute_force_model() {
        for (n, lk) in locks().iter().enumerate() {
            for (crowd, pick) in [(false, range as Pick), (true, crowded)] {
                let mut model: Vec<(u64, u64)> = Vec::new();
                let mut rnd = xorshift(0x2545_f491_4f6c_dd1d + n as u64);
                // Fast shapes taken in a slot, and spilled to the mutex side.
                let (mut in_slot, mut spilled) = (0, 0);
                for _ in 0..40_000 {
                    if !model.is_empty() && rnd(3) == 0 {
                        let (s, e) = model.swap_remove(rnd(model.len() as u64) as usize);
                        lk.unlock(s, e);
                        continue;
                    }
                    let (s, e) = pick(&mut rnd);
                    let busy = overlap(&model, s, e);
                    assert_eq!(lk.try_lock(s, e), !busy, "[{s}, {e}) over {model:?}");
                    if !busy {
                        model.push((s, e));
                        if let Some(k) = fast_key(s, e.max(s + 1)) {
                            let sh = &lk.shards[lk.key_shard(k)];
                            if sh.slots.iter().any(|w| w.load(Ordering::SeqCst) == k) {
                                in_slot += 1;
                            } else {
                                spilled += 1;
                            }
                        }
                    }
                }
                assert!(in_slot > 1000, "{in_slot} ranges in a slot");
                if crowd {
                    // More holders in a shard than it has slots.
                    assert!(spilled > 100, "{spilled} fast shapes spilled");
                }
                for (s, e) in model.drain(..) {
                    lk.unlock(s, e);
                }
                assert_clean(lk);
                assert!(lk.try_lock(0, u64::MAX));
                lk.unlock(0, u64::MAX);
                assert_clean(lk);
            }
        }
    }

    /// A shard is two lines: the fast one (flag, condvar, slots) and the mutex side.
    #[test]
    fn a_shard_is_two_lines() {
        assert_eq!(std::mem::size_of::<super::RangeShard>(), 128);
        assert_eq!(std::mem::offset_of!(super::RangeShard, held), 64);
    }

    /// The parts: a file of 64 stripes has parts of 16, each with shards of its
    /// own; every shard is used; ranges a part apart never share a shard.
    #[test]
    fn parts_keep_their_own_shards() {
        let lk = RangeLock::new(64 * STRIPE);
        let mut used = 0u64;
        for s in 0..64 {
            let i = lk.shard_of(s);
            assert_eq!(i / super::PER_PART, s as usize / 16, "stripe {s}");
            used |= 1 << i;
        }
        assert!(used.count_ones() as usize > PARTS * super::PER_PART / 2);
        for s in 0..16 {
            assert_ne!(lk.shard_of(s), lk.shard_of(s + 32));
        }
        // The fast key is exact: every range of whole sectors inside one stripe
        // comes back from its key.
        for (s, e) in [(0, 512), (STRIPE - 512, STRIPE), (5 * STRIPE, 6 * STRIPE)] {
            let k = fast_key(s, e).expect("a fast shape");
            assert_eq!(super::key_range(k), (s, e));
            assert_eq!(super::key_range(k | super::PENDING), (s, e));
        }
        for (s, e) in [
            (0, 513),
            (1, 512),
            (STRIPE - 512, STRIPE + 512),
            (u64::MAX - 512, u64::MAX),
        ] {
            assert!(fast_key(s, e).is_none(), "[{s}, {e})");
        }
    }

    /// A holder's release frees its own slot, never another thread's claim of the
    /// same range still pending (in a slot found first), which would leave the
    /// holder's slot taken for good and the claimer waiting on it.
    #[test]
    fn a_release_leaves_a_pending_claim_of_the_same_range_alone() {
        let lk = RangeLock::new(0);
        let r = (8192, 12288);
        let key = fast_key(r.0, r.1).unwrap();
        let sh = &lk.shards[lk.key_shard(key)];
        assert!(lk.try_lock(0, 4096));
        assert!(lk.try_lock(r.0, r.1));
        lk.unlock(0, 4096);
        // Another thread's claim, between its compare-and-swap and its checks.
        let at = sh.claim(super::pending(key)).unwrap();
        assert_eq!(at, 0, "the first slot, before the holder's");
        lk.unlock(r.0, r.1);
        let words: Vec<u64> = sh.slots.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        assert_eq!(words[0], super::pending(key), "{words:x?}");
        assert!(words[1..].iter().all(|&w| w == 0), "{words:x?}");
        // The claimer's checks find nothing in its way: it keeps the range.
        assert!(sh.confirm(at, key));
        assert!(!lk.try_lock(r.0, r.1));
        lk.unlock(r.0, r.1);
        assert_clean(&lk);
    }

    /// Threads lock random ranges (blocking, or parking a retry as async calls do)
    /// and, while holding one, find no overlapping range held by another thread in
    /// a model of the held set: the shards together exclude as one lock would.
    #[test]
    fn range_lock_excludes_overlapping_holders_across_threads() {
        bounded(|| {
            for lk in locks() {
                exclude_across_threads(&lk, range, 6, 3000);
            }
        });
    }

    /// The same, crowded into a few shards: claims of the fast slots race each
    /// other and the slow side (more holders than slots, ranges of every shape in
    /// the same shards), a thread holds up to three ranges, and some ranges are
    /// released by another thread than the one that took them (as an async call's
    /// completion does).
    #[test]
    fn fast_slots_exclude_when_crowded() {
        bounded(|| {
            for lk in locks() {
                exclude_across_threads(&lk, crowded, 8, 4000);
            }
        });
    }

    /// Run `f`, failing if it has not finished in two minutes (a lost wakeup, or a
    /// range never released, would hang it; it takes about a second).
    fn bounded(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(()) => h.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(p) = h.join() {
                    std::panic::resume_unwind(p);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung: not done in 120 s"),
        }
    }

    fn exclude_across_threads(lk: &RangeLock, pick: Pick, threads: u64, rounds: usize) {
        let held: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
        let check_in = |s: u64, e: u64| {
            let mut h = held.lock().unwrap();
            assert!(!overlap(&h, s, e), "[{s}, {e}) granted over {h:?}");
            h.push((s, e));
        };
        let check_out = |s: u64, e: u64| {
            let mut h = held.lock().unwrap();
            let at = h.iter().position(|&r| r == (s, e)).expect("held");
            h.swap_remove(at);
        };
        let (give, given) = mpsc::channel::<(u64, u64)>();
        std::thread::scope(|sc| {
            // Releases ranges other threads took.
            sc.spawn(|| {
                for (s, e) in given {
                    check_out(s, e);
                    lk.unlock(s, e);
                }
            });
            for t in 0..threads {
                let (check_in, check_out, give) = (&check_in, &check_out, give.clone());
                sc.spawn(move || {
                    let mut rnd = xorshift(0x9e37_79b9 * (t + 1));
                    let mut mine: Vec<(u64, u64)> = Vec::new();
                    for i in 0..rounds {
                        let (s, e) = pick(&mut rnd);
                        if !mine.is_empty() {
                            // More only if free now: waiting while holding could
                            // wait for ever (two threads each waiting for the other).
                            if mine.len() < 3 && lk.try_lock(s, e) {
                                check_in(s, e);
                                mine.push((s, e));
                            }
                        } else if i % 4 == 0 {
                            // The async way: try, park a retry, run it when handed back.
                            let (tx, rx) = mpsc::channel();
                            loop {
                                if lk.try_lock(s, e) {
                                    break;
                                }
                                let tx = tx.clone();
                                let job = Box::new(move || tx.send(()).unwrap());
                                if let Some(job) = lk.park_unless_free(s, e, job) {
                                    job();
                                }
                                rx.recv().unwrap();
                            }
                            check_in(s, e);
                            mine.push((s, e));
                        } else {
                            lk.lock(s, e);
                            check_in(s, e);
                            mine.push((s, e));
                        }
                        std::thread::yield_now();
                        if rnd(2) == 0 {
                            let (s, e) = mine.swap_remove(rnd(mine.len() as u64) as usize);
                            if rnd(4) == 0 {
                                give.send((s, e)).unwrap();
                            } else {
                                check_out(s, e);
                                lk.unlock(s, e);
                            }
                        }
                    }
                    for (s, e) in mine {
                        check_out(s, e);
                        lk.unlock(s, e);
                    }
                });
            }
            drop(give);
        });
        assert_clean(lk);
        assert!(lk.try_lock(0, u64::MAX));
        lk.unlock(0, u64::MAX);
    }
}

#[cfg(test)]
mod file_lock_tests {
    use super::{FileLock, Held, LockKind};
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// Who is inside: +1 per reader, -1000 for a writer.
    struct Inside(AtomicI64);

    impl Inside {
        fn enter(&self, kind: LockKind) {
            let now = match kind {
                LockKind::Shared => self.0.fetch_add(1, Ordering::SeqCst) + 1,
                LockKind::Exclusive => self.0.fetch_sub(1000, Ordering::SeqCst) - 1000,
            };
            match kind {
                LockKind::Shared => assert!(now > 0, "a reader inside with a writer"),
                LockKind::Exclusive => assert_eq!(now, -1000, "a writer not alone"),
            }
        }
        fn leave(&self, kind: LockKind) {
            match kind {
                LockKind::Shared => self.0.fetch_sub(1, Ordering::SeqCst),
                LockKind::Exclusive => self.0.fetch_add(1000, Ordering::SeqCst),
            };
        }
    }

    /// Readers and writers from 6 threads, waiting and trying, some readers released
    /// on another thread than the one that took the lock: nobody is ever inside with
    /// a writer, and every hold ends.
    #[test]
    fn readers_share_and_writers_are_alone() {
        let lock = FileLock::default();
        let inside = Inside(AtomicI64::new(0));
        let (tx, rx) = mpsc::channel::<Held>();
        let released_elsewhere = AtomicUsize::new(0);
        std::thread::scope(|s| {
            // Releases readers' holds that other threads took.
            let (lock_r, inside_r, rel) = (&lock, &inside, &released_elsewhere);
            s.spawn(move || {
                for h in rx {
                    inside_r.leave(LockKind::Shared);
                    lock_r.release(h);
                    rel.fetch_add(1, Ordering::Relaxed);
                }
            });
            for t in 0..6u64 {
                let (lock, inside, tx) = (&lock, &inside, tx.clone());
                s.spawn(move || {
                    let mut x = t * 0x9e37_79b9 + 1;
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let kind = if x % 8 == 0 {
                            LockKind::Exclusive
                        } else {
                            LockKind::Shared
                        };
                        let held = if x % 3 == 0 {
                            match lock.try_acquire(kind) {
                                Some(h) => h,
                                None => continue,
                            }
                        } else {
                            lock.acquire(kind)
                        };
                        assert_eq!(held.kind, kind);
                        inside.enter(kind);
                        std::hint::spin_loop();
                        if kind == LockKind::Shared && x % 5 == 0 {
                            tx.send(held).unwrap();
                            continue;
                        }
                        inside.leave(kind);
                        lock.release(held);
                    }
                });
            }
            drop(tx);
        });
        assert_eq!(inside.0.load(Ordering::SeqCst), 0);
        assert!(released_elsewhere.load(Ordering::Relaxed) > 0);
        // Free again for both kinds.
        let h = lock.try_acquire(LockKind::Exclusive).expect("free");
        lock.release(h);
    }

    /// A call parked for the exclusive lock runs when the last reader leaves (on
    /// another thread), and one parked for the shared lock when the writer leaves.
    #[test]
    fn parked_calls_restart_when_the_lock_frees() {
        let lock = Arc::new(FileLock::default());
        let r1 = lock.acquire(LockKind::Shared);
        let r2 = lock.try_acquire(LockKind::Shared).expect("readers share");
        assert!(lock.try_acquire(LockKind::Exclusive).is_none());
        let ran = Arc::new(AtomicBool::new(false));
        let job = {
            let ran = Arc::clone(&ran);
            Box::new(move || ran.store(true, Ordering::SeqCst))
        };
        assert!(lock.park_unless_free(LockKind::Exclusive, job).is_none());
        lock.release(r1);
        let l2 = Arc::clone(&lock);
        // The last reader leaves on another thread: the parked call runs there.
        std::thread::spawn(move || l2.release(r2)).join().unwrap();
        assert!(ran.load(Ordering::SeqCst));

        let w = lock.acquire(LockKind::Exclusive);
        assert!(lock.try_acquire(LockKind::Shared).is_none());
        let ran = Arc::new(AtomicBool::new(false));
        let job = {
            let (ran, lock) = (Arc::clone(&ran), Arc::clone(&lock));
            Box::new(move || {
                // Retried: the lock is free for it now.
                let h = lock
                    .try_acquire(LockKind::Shared)
                    .expect("free after release");
                lock.release(h);
                ran.store(true, Ordering::SeqCst);
            })
        };
        assert!(lock.park_unless_free(LockKind::Shared, job).is_none());
        assert!(!ran.load(Ordering::SeqCst));
        lock.release(w);
        assert!(ran.load(Ordering::SeqCst));
        // Free: a park hands the job straight back.
        assert!(lock
            .park_unless_free(LockKind::Exclusive, Box::new(|| {}))
            .is_some());
    }

    /// A sync writer waits for the readers in, and readers arriving meanwhile wait
    /// for it (no reader starves it by overlapping the next).
    #[test]
    fn a_waiting_writer_holds_new_readers_off() {
        let lock = Arc::new(FileLock::default());
        let r = lock.acquire(LockKind::Shared);
        let (tx, rx) = mpsc::channel();
        let l = Arc::clone(&lock);
        let writer = std::thread::spawn(move || {
            let w = l.acquire(LockKind::Exclusive);
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            l.release(w);
        });
        // The writer has set its flag once a new reader can no longer get in.
        while lock
            .try_acquire(LockKind::Shared)
            .map(|h| lock.release(h))
            .is_some()
        {
            std::thread::yield_now();
        }
        assert!(rx.try_recv().is_err(), "the writer got in beside a reader");
        lock.release(r);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the writer gets in");
        // A sync reader now waits for the writer to leave.
        let h = lock.acquire(LockKind::Shared);
        lock.release(h);
        writer.join().unwrap();
    }
}
