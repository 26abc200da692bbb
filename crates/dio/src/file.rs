//! Per-file state shared by every request on one file: the size (i_size), the file
//! lock of the locking mode, the in-flight direct-I/O count that truncate waits on
//! (i_dio_count), and the block-range lock that serialises writes which share a
//! partly written fs block. No I/O happens here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State of one open file.
#[derive(Debug)]
pub struct FileState {
    size: AtomicU64,
    file_lock: RwLock<()>,
    dio_count: AtomicU64,
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
            file_lock: RwLock::new(()),
            dio_count: AtomicU64::new(0),
            dio_waiters: AtomicU64::new(0),
            dio_zero: Mutex::new(()),
            dio_zero_cv: Condvar::new(),
            truncating: AtomicBool::new(false),
            gate: Mutex::new(GateState::default()),
            gate_cv: Condvar::new(),
            ranges: RangeLock::default(),
        }
    }

    /// Current size (i_size).
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

    /// Take the file lock shared (what a locking-mode read holds during lookups).
    pub fn lock_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.file_lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the file lock exclusively (what truncate holds).
    pub fn lock_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.file_lock.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Direct I/O requests in flight on this file.
    pub fn dio_count(&self) -> u64 {
        self.dio_count.load(Ordering::Acquire)
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
    /// or this I/O sees the gate and steps back.
    ///
    /// The truncating thread itself passes: it reaches here only from a completion
    /// callback run while truncate drains, and truncate then drains this call too.
    pub(crate) fn try_dio_begin(&self) -> Begin {
        self.dio_count.fetch_add(1, Ordering::SeqCst);
        if !self.truncating.load(Ordering::SeqCst) {
            return Begin::Counted;
        }
        let g = lock(&self.gate);
        if g.truncator == Some(std::thread::current().id()) {
            return Begin::Counted;
        }
        drop(g);
        self.dio_end();
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

    pub(crate) fn dio_end(&self) {
        // A waiter registers before it checks the count, and we check for waiters
        // after the count drops (both SeqCst): one of us sees the other. Taking the
        // mutex orders the wakeup after the waiter went to sleep.
        if self.dio_count.fetch_sub(1, Ordering::SeqCst) == 1
            && self.dio_waiters.load(Ordering::SeqCst) > 0
        {
            let _g = lock(&self.dio_zero);
            self.dio_zero_cv.notify_all();
        }
    }

    /// Block until no direct I/O is in flight (inode_dio_wait).
    pub fn wait_dio_zero(&self) {
        let mut g = lock(&self.dio_zero);
        self.dio_waiters.fetch_add(1, Ordering::SeqCst);
        while self.dio_count.load(Ordering::SeqCst) != 0 {
            g = self.dio_zero_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.dio_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn ranges(&self) -> &RangeLock {
        &self.ranges
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
    /// The call is counted in flight.
    Counted,
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
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<Ranges>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Ranges {
    held: Vec<(u64, u64)>,
    /// Threads waiting for a range: only then does a release need a wakeup.
    waiters: usize,
}

impl Ranges {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.held.iter().any(|&(s, e)| s < end && start < e)
    }
}

impl RangeLock {
    /// Lock `[start, end)`, waiting for overlapping holders.
    pub(crate) fn lock(&self, start: u64, end: u64) {
        let mut g = lock(&self.held);
        while g.overlaps(start, end) {
            g.waiters += 1;
            g = self.released.wait(g).unwrap_or_else(|e| e.into_inner());
            g.waiters -= 1;
        }
        g.held.push((start, end));
    }

    /// Lock `[start, end)` if no overlapping range is held.
    pub(crate) fn try_lock(&self, start: u64, end: u64) -> bool {
        let mut g = lock(&self.held);
        if g.overlaps(start, end) {
            return false;
        }
        g.held.push((start, end));
        true
    }

    /// Release a range taken with `lock`.
    pub(crate) fn unlock(&self, start: u64, end: u64) {
        let mut g = lock(&self.held);
        if let Some(i) = g.held.iter().position(|&r| r == (start, end)) {
            g.held.swap_remove(i);
        }
        let wake = g.waiters > 0;
        drop(g);
        if wake {
            self.released.notify_all();
        }
    }
}
