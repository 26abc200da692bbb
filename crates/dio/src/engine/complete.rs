//! Completion: counting the requests of one direct-I/O call in flight, waiting for
//! them (sync), finishing the call from the last completion (async), deferring the
//! finish to a worker when it may block (dsync flush, a map that asks), and the
//! result rules: precedence of errors, clipping at EOF, the end_io hook.
//! (seed: dio_bio_end_io, dio_bio_end_aio, dio_await_completion, dio_complete)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, Thread};

use super::{Handle, Shared};
use std::collections::VecDeque;

use super::bio::MAX_IN_FLIGHT;
use crate::device::{Completion, CompletionMode, Device, Finished, Op, Request};
use crate::engine::Held;
use crate::map::Private;
use crate::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the caller learns the result of an async call.
pub(crate) type Done = Box<dyn FnOnce(Result<usize>) + Send>;

/// What the walk ended with, for the result rules.
pub(crate) enum Stop {
    /// Ran to the end of the request (or EOF, or a hole on a write).
    Clean,
    /// An error passed in (map error, bad extent).
    Error(Error),
    /// Memory could not be used at this byte of the request.
    MemoryFault(u64),
}

/// A call's result inside the engine: the error boxed, so that the result is two
/// words and travels in registers (an unboxed [`Error`] makes it four, moved
/// through memory at every return). Unboxed once, at the public API.
pub(crate) type Res = std::result::Result<usize, Box<Error>>;

/// A panic payload, carried to the caller.
pub(crate) type Payload = Box<dyn std::any::Any + Send>;

/// What the finish of a call needs to know of the call itself. A sync call keeps it
/// on its submitter's stack; an async one hands it over with its outcome.
#[derive(Clone, Copy)]
pub(crate) struct Call {
    pub(crate) op: Op,
    pub(crate) offset: u64,
    pub(crate) i_size: u64,
    /// Extend i_size to the written end, at most to this, at completion.
    pub(crate) extend: Option<u64>,
    /// The shard of the file's in-flight count the call is counted on (None: not
    /// counted, [`Flags::SKIP_DIO_COUNT`](super::Flags::SKIP_DIO_COUNT)).
    pub(crate) count: Option<usize>,
    /// Block range held in the file's range lock until completion.
    pub(crate) range_lock: Option<(u64, u64)>,
    /// The file lock a locking-mode write holds until it completes.
    pub(crate) file_lock: Option<Held>,
    /// Flush the device before completing (dsync with metadata changes or no FUA).
    pub(crate) flush: bool,
    /// A write with `Flags::DSYNC`: completion goes through the map's
    /// `end_io_dsync`, which makes it durable.
    pub(crate) dsync: bool,
    /// A byte-granular write whose padded last block may have grown the map's
    /// storage past the file size: the finish calls the map's `trim_padding` (its
    /// range lock reaches to the end of any file).
    pub(crate) trim_padding: bool,
}

impl Call {
    /// A read of the one-request fast paths: no locks, nothing to extend or flush.
    pub(crate) fn one_read(offset: u64, i_size: u64, count: Option<usize>) -> Call {
        Call {
            op: Op::Read,
            offset,
            i_size,
            extend: None,
            count,
            range_lock: None,
            file_lock: None,
            flush: false,
            dsync: false,
            trim_padding: false,
        }
    }
}

/// One direct-I/O call in flight (the seed's `struct dio`): what its requests'
/// completions share.
///
/// A sync call's `Dio` is reused by the thread's next sync call (see
/// [`Dio::sync_call`]): it owns nothing of the file or the call, and its submitter
/// passes the file, the [`Call`], the walk's outcome and the result around on its
/// own stack. Only an async call, which finishes on whatever thread completes it,
/// carries the file and (once the walk is over) its call and outcome inside.
///
/// Aligned to 128 bytes, so its allocation (its `Arc` count included) has its own
/// cache lines: a thread's sync `Dio` is written by every call it makes, and a
/// neighbour on its line that another thread uses (a small allocation of the
/// caller's, such as the `Vec` holding the file handles) would bounce between the
/// cores at every call (two threads reading one file cost 130 ns of CPU per read
/// instead of 62, on the null device).
#[repr(align(128))]
pub(crate) struct Dio {
    /// The file, for an async call (it finishes on another thread); None for a sync
    /// call, whose submitter has the file at hand.
    file: Option<FileRef>,
    /// 1 for the submitter plus one per device request in flight.
    refs: AtomicUsize,
    /// Everything completion reads once: one lock for all of it.
    tail: Mutex<Tail>,
    /// Whether `tail.io_error` holds an error (checked without the lock on every
    /// finish; set under the lock, before the request's reference goes).
    io_failed: AtomicBool,
    defer: AtomicBool,
    /// Whether a caller waits for the result (sync) rather than a callback.
    sync: bool,
    /// The waiting thread, registered only once it has to sleep (a reused sync
    /// `Dio` stays on its thread, so the registration stays right).
    waiter: OnceLock<Thread>,
    sleeping: AtomicBool,
    /// Async calls: requests built but held back while [`MAX_IN_FLIGHT`] are in
    /// flight, sent as completions arrive (nothing of an async call ever waits).
    queue: Mutex<VecDeque<(Request, u64)>>,
    queued: AtomicUsize,
    /// Async calls: requests submitted and not yet completed.
    submitted: AtomicUsize,
    /// Set once by an async call's submitter when its walk is over: the call, bytes
    /// walked, how the walk stopped, and the last mapping's private data for end_io.
    /// Read in place by the finish (after the last reference's count went, which
    /// orders the set before it).
    outcome: OnceLock<Outcome>,
}

/// How an async call holds its file.
pub(crate) enum FileRef {
    /// The file's own `Arc`, which every handle of the file shares.
    Shared(Arc<Shared>),
    /// The reference of the handle that started the call (see [`Handle`]).
    Handle(Arc<Handle>),
}

impl FileRef {
    #[inline]
    fn get(&self) -> &Shared {
        match self {
            FileRef::Shared(f) => f,
            FileRef::Handle(h) => &h.0,
        }
    }
}

/// What an async call's submitter hands to its finish.
type Outcome = (Call, u64, Stop, Option<Private>);

thread_local! {
    /// The thread's spare sync-call state.
    static SPARE: std::cell::Cell<Option<Arc<Dio>>> = const { std::cell::Cell::new(None) };
}

#[derive(Default)]
struct Tail {
    /// Lowest file offset of a failed device request, and its error.
    io_error: Option<(u64, Error)>,
    /// The async caller's completion.
    done: Option<Done>,
}

/// How many finished async calls' states a thread keeps for its next async calls.
/// Enough for a batch of completions reaped at once whose callbacks then start the
/// next calls (a few KiB per thread at most).
const ASYNC_SPARES: usize = 32;

thread_local! {
    /// Finished async calls' states, each owned by this list alone (no other
    /// reference to it exists) and blank: no file, no completion, no outcome, no
    /// error, no private data.
    static ASYNC_SPARE: std::cell::RefCell<Vec<Arc<Dio>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Dio {
    /// A new async call's state: it carries the file, and the caller's completion.
    /// The call will send `requests` requests, counted in already (no [`Dio::get`]
    /// for them). A finished async call's state is reused when this thread kept one
    /// ([`Dio::recycle_async`]), so a call allocates none.
    #[inline(never)]
    pub(crate) fn new_async(file: FileRef, done: Done, requests: usize) -> Arc<Dio> {
        let spare = ASYNC_SPARE
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten();
        let mut dio = match spare {
            Some(d) => d,
            None => Arc::new(Dio::blank(false)),
        };
        match Arc::get_mut(&mut dio) {
            Some(d) => {
                // Blank (a new one, or reset by recycle_async): set what this call
                // brings.
                d.file = Some(file);
                *d.refs.get_mut() = 1 + requests;
                *d.submitted.get_mut() = requests;
                d.tail.get_mut().unwrap_or_else(|e| e.into_inner()).done = Some(done);
                dio
            }
            None => unreachable!("a new or spare async call state has no other owner"),
        }
    }

    /// Keep a finished async call's state for this thread's next async call, if
    /// nothing else refers to it any more (a completion of the call that is on its
    /// way out, between its count going and its reference going, still holds one:
    /// then it is freed as usual, by whoever drops it last). Everything of the call
    /// goes first (its file, its completion, its outcome, its errors and private
    /// data), so the next call starts from a blank state and nothing of the file is
    /// kept alive by a thread's spare.
    fn recycle_async(mut self: Arc<Self>) {
        let Some(d) = Arc::get_mut(&mut self) else {
            return;
        };
        d.file = None;
        // Dropped in place.
        d.outcome = OnceLock::new();
        *d.tail.get_mut().unwrap_or_else(|e| e.into_inner()) = Tail::default();
        *d.refs.get_mut() = 1;
        *d.io_failed.get_mut() = false;
        *d.defer.get_mut() = false;
        *d.sleeping.get_mut() = false;
        // Every request went out and completed: the queue and counts are empty.
        let queue = d.queue.get_mut().unwrap_or_else(|e| e.into_inner());
        debug_assert!(queue.is_empty());
        queue.clear();
        *d.queued.get_mut() = 0;
        *d.submitted.get_mut() = 0;
        let _ = ASYNC_SPARE.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if s.len() < ASYNC_SPARES {
                    s.push(self);
                }
            }
        });
    }

    fn blank(sync: bool) -> Dio {
        Dio {
            file: None,
            refs: AtomicUsize::new(1),
            tail: Mutex::new(Tail::default()),
            io_failed: AtomicBool::new(false),
            defer: AtomicBool::new(false),
            sync,
            waiter: OnceLock::new(),
            sleeping: AtomicBool::new(false),
            queue: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            submitted: AtomicUsize::new(0),
            outcome: OnceLock::new(),
        }
    }

    /// A sync call's state: the thread's spare from its last sync call, else a new
    /// one (no allocation per call). Give it back with [`Dio::recycle`].
    #[inline]
    pub(crate) fn sync_call() -> Arc<Dio> {
        Dio::sync_call_with(0)
    }

    /// [`Dio::sync_call`] for a call that will send `requests` requests, counted in
    /// already (no [`Dio::get`] for them).
    #[inline]
    pub(crate) fn sync_call_with(requests: usize) -> Arc<Dio> {
        match SPARE.with(|s| s.take()) {
            Some(spare) => {
                // The last call on it saw every request complete (its errors taken,
                // refs back to 1); reset what a call changes. A completion of that
                // call may still be on its way out, between its decrement of refs and
                // the drop of its reference: all it does then is look at `sleeping`
                // and perhaps unpark this thread, which a waiter tolerates (it parks
                // in a loop on its own condition).
                spare.refs.store(1 + requests, Ordering::Relaxed);
                spare.io_failed.store(false, Ordering::Relaxed);
                spare.defer.store(false, Ordering::Relaxed);
                spare.sleeping.store(false, Ordering::Relaxed);
                spare
            }
            None => {
                let dio = Dio::blank(true);
                dio.refs.store(1 + requests, Ordering::Relaxed);
                Arc::new(dio)
            }
        }
    }

    /// Keep a finished sync call's state for the thread's next sync call.
    #[inline]
    pub(crate) fn recycle(self: Arc<Self>) {
        debug_assert!(self.sync && self.in_flight() == 0);
        SPARE.with(|s| s.set(Some(self)));
    }

    fn async_file(&self) -> &Shared {
        self.file
            .as_ref()
            .map(FileRef::get)
            .expect("an async call carries its file")
    }

    /// Send a request of an async call, or queue it while the call has
    /// [`MAX_IN_FLIGHT`] requests in flight (completions send it later).
    pub(crate) fn send_async(&self, req: Request, file_offset: u64) {
        if self.queued.load(Ordering::SeqCst) == 0 {
            if self.submitted.fetch_add(1, Ordering::SeqCst) < MAX_IN_FLIGHT {
                let file = self.async_file();
                file.map.submit_io(&*file.dev, req, file_offset);
                return;
            }
            self.submitted.fetch_sub(1, Ordering::SeqCst);
        }
        lock(&self.queue).push_back((req, file_offset));
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.pump();
    }

    /// Send queued requests while there is room. Whoever changes the room or the
    /// queue pumps after the change (both SeqCst), so a queued request is never
    /// stranded with room free.
    fn pump(&self) {
        while self.queued.load(Ordering::SeqCst) > 0 {
            if self.submitted.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
                self.submitted.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            let next = lock(&self.queue).pop_front();
            let Some((req, file_offset)) = next else {
                self.submitted.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let file = self.async_file();
            file.map.submit_io(&*file.dev, req, file_offset);
        }
    }

    /// Whether the call completes through a callback.
    pub(crate) fn is_async(&self) -> bool {
        !self.sync
    }

    /// A device request is about to be submitted.
    pub(crate) fn get(&self) {
        self.refs.fetch_add(1, Ordering::AcqRel);
    }

    /// Requests in flight (not counting the submitter's reference).
    pub(crate) fn in_flight(&self) -> usize {
        self.refs.load(Ordering::Acquire) - 1
    }

    pub(crate) fn set_defer(&self) {
        self.defer.store(true, Ordering::Release);
    }

    /// Wait until at most `max` requests are in flight (reaping, the seed's
    /// dio_bio_reap / dio_await_one). Only a sync call's submitter waits: an async
    /// call queues what exceeds the bound instead.
    ///
    /// A device whose completions come by polling is polled. With [`Flags::POLL`]
    /// (high priority) an interrupt-driven device is polled too, once per round, and
    /// when that finds nothing the thread sleeps until a completion wakes it, as the
    /// seed does: it never spins.
    ///
    /// [`Flags::POLL`]: super::Flags::POLL
    pub(crate) fn wait_in_flight_at_most(&self, dev: &dyn Device, max: usize, poll: bool) {
        debug_assert!(self.sync, "only sync calls wait");
        if self.in_flight() <= max {
            return;
        }
        let polled = dev.completion_mode() == CompletionMode::Polled;
        dev.unplug();
        while self.in_flight() > max {
            if polled {
                if dev.poll(true).is_err() {
                    // A transient error (EINTR): back off before polling again.
                    thread::sleep(std::time::Duration::from_micros(50));
                }
                continue;
            }
            if poll && dev.poll(false).is_ok_and(|n| n > 0) {
                continue;
            }
            // Register before announcing sleep; a completion that sees `sleeping`
            // finds the thread to wake.
            self.waiter.get_or_init(thread::current);
            self.sleeping.store(true, Ordering::SeqCst);
            if self.in_flight() > max {
                thread::park();
            }
            self.sleeping.store(false, Ordering::SeqCst);
        }
    }

    /// The submitter is done walking (`walked` bytes, ended by `stop`, the last
    /// mapping's private data for end_io). Sync: wait for every request, then finish
    /// and return the result, with the payload if the map's end_io panicked. Async:
    /// record the outcome and drop the submitter's reference; the last reference
    /// finishes the call.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn submitter_done(
        self: Arc<Self>,
        file: &Shared,
        call: &Call,
        poll: bool,
        walked: u64,
        stop: &mut Stop,
        private: Option<Private>,
        panic: &mut Option<Payload>,
    ) -> Option<Res> {
        file.dev.unplug();
        if self.sync {
            self.wait_in_flight_at_most(&*file.dev, 0, poll);
            let r = self.finish(file, call, walked, stop, private.as_ref(), panic);
            self.recycle();
            Some(r)
        } else {
            self.async_submitter_done(call, walked, stop, private);
            None
        }
    }

    /// [`Dio::submitter_done`] of an async call (kept out of line: the sync path
    /// inlines the rest).
    #[inline(never)]
    fn async_submitter_done(
        self: Arc<Self>,
        call: &Call,
        walked: u64,
        stop: &mut Stop,
        private: Option<Private>,
    ) {
        if self.refs.load(Ordering::Acquire) == 1 {
            // Every request completed already (the submitter's is the last
            // reference, and only the submitter adds to the count): finish here,
            // from the submitter's own stack, as the last reference would.
            self.refs.store(0, Ordering::Relaxed);
            self.finish_async_with(call, walked, stop, private);
        } else {
            let outcome = (*call, walked, std::mem::replace(stop, Stop::Clean), private);
            let first = self.outcome.set(outcome).is_ok();
            debug_assert!(first, "an async call's outcome is set once");
            self.put();
        }
    }

    fn put(self: Arc<Self>) {
        if self.refs.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish_async();
        }
    }

    fn finish_async(self: Arc<Self>) {
        if self.defer.load(Ordering::Acquire) {
            deferred(Box::new(move || {
                self.finish_and_deliver();
                self.recycle_async();
            }));
        } else {
            self.finish_and_deliver();
            self.recycle_async();
        }
    }

    /// The finish of an async call whose requests all completed before its
    /// submitter was done: from the submitter's stack, unless it must be deferred
    /// (then the outcome goes to the worker as usual).
    fn finish_async_with(
        self: Arc<Self>,
        call: &Call,
        walked: u64,
        stop: &mut Stop,
        private: Option<Private>,
    ) {
        if self.defer.load(Ordering::Acquire) {
            let outcome = (*call, walked, std::mem::replace(stop, Stop::Clean), private);
            let first = self.outcome.set(outcome).is_ok();
            debug_assert!(first, "an async call's outcome is set once");
            self.finish_async();
            return;
        }
        self.deliver(call, walked, stop, private.as_ref());
        self.recycle_async();
    }

    /// An async call's finish, from the outcome its submitter recorded.
    fn finish_and_deliver(&self) {
        let Some((call, walked, stop, private)) = self.outcome.get() else {
            unreachable!("an async call's submitter records its outcome before its reference goes");
        };
        self.deliver(call, *walked, stop, private.as_ref());
    }

    /// Finish an async call and hand the result to its caller.
    fn deliver(&self, call: &Call, walked: u64, stop: &Stop, private: Option<&Private>) {
        let done = lock(&self.tail).done.take();
        // An async caller has no one to carry a panic of end_io to: it is the error.
        let r = self.finish(self.async_file(), call, walked, stop, private, &mut None);
        if let Some(done) = done {
            done(r.map_err(|e| *e));
        }
    }

    /// The result rules (the seed's dio_complete).
    #[inline]
    fn finish(
        &self,
        file: &Shared,
        call: &Call,
        walked: u64,
        stop: &Stop,
        private: Option<&Private>,
        panic: &mut Option<Payload>,
    ) -> Res {
        // Every request is done: its error, if any, was stored before its reference
        // went, which the finisher has seen drop.
        let io_error = if self.io_failed.load(Ordering::Acquire) {
            lock(&self.tail).io_error.take()
        } else {
            None
        };
        // Bytes that are certainly done: the walk's count, cut at the first failed
        // request (everything before it in the file completed), and for reads at EOF.
        let mut done = walked;
        if let Some((at, _)) = &io_error {
            let mut good_end = (*at).max(call.offset);
            if call.op == Op::Write {
                // A failed request may begin inside an fs block: report only whole
                // blocks, so the map never converts a half-written fresh block
                // whose other half still holds the device's old bytes.
                let fs = u64::from(file.fs_block);
                good_end = (good_end & !(fs - 1)).max(call.offset);
            }
            done = done.min(good_end - call.offset);
        }
        if call.op == Op::Read {
            done = done.min(call.i_size.saturating_sub(call.offset));
        }
        let mut result: Res = match stop {
            Stop::Error(e) => Err(Box::new(e.clone())),
            Stop::MemoryFault(at) if done == 0 => Err(Box::new(Error::MemoryFault { at: *at })),
            _ => match io_error {
                Some((_, e)) if done == 0 => Err(Box::new(e)),
                _ => Ok(done as usize),
            },
        };
        // The map's end_io is user code: a panic there still releases the call's
        // locks and counts (below), and reaches a sync caller afterwards.
        let map = &file.map;
        if call.trim_padding {
            // First, so that a dsync write's flush below covers the new size too.
            result = self.trim_padding(file, call, result, panic);
        }
        if call.op == Op::Write && call.dsync && file.end_io {
            // The map makes the write durable (its metadata, and the flush).
            let r = result.map_err(|e| *e);
            let size = match (&r, call.extend) {
                (Ok(n), Some(limit)) => Some((call.offset + *n as u64).min(limit)),
                _ => None,
            };
            return self.finish_tail(
                file,
                call,
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    map.end_io_dsync(&*file.dev, call.offset, r, private, size, call.flush)
                })) {
                    Ok(r) => r.map_err(Box::new),
                    Err(payload) => {
                        *panic = Some(payload);
                        Err(Box::new(Error::Panicked("BlockMap::end_io_dsync")))
                    }
                },
            );
        }
        if file.end_io {
            let r = result.map_err(|e| *e);
            result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                map.end_io(call.op, call.offset, r, private)
            })) {
                Ok(r) => r.map_err(Box::new),
                Err(payload) => {
                    *panic = Some(payload);
                    Err(Box::new(Error::Panicked("BlockMap::end_io")))
                }
            };
        }
        // A dsync write is durable with what the map's end_io wrote for it (an
        // unwritten extent converted, an allocation recorded): the flush comes
        // after end_io, as generic_write_sync follows the kernel's end_io. (Before
        // it, metadata written in end_io stayed in the device's volatile cache: the
        // shape of the 2025 iomap bug; dio-crash's end_io_order test replays it.)
        if call.op == Op::Write && call.flush {
            if let Ok(n) = result {
                if n > 0 {
                    if let Err(e) = file.dev.flush() {
                        result = Err(Box::new(Error::io(call.offset, e)));
                    }
                }
            }
        }
        self.finish_tail(file, call, result)
    }

    /// Cut the storage a padded byte-granular write grew back to the file size, the
    /// write counted ([`crate::BlockMap::trim_padding`]); still under the call's range
    /// lock, which reaches to the end of any file, so no other write lies past it.
    /// Runs whatever the write's result: a failed write may have grown it too.
    #[cold]
    fn trim_padding(
        &self,
        file: &Shared,
        call: &Call,
        result: Res,
        panic: &mut Option<Payload>,
    ) -> Res {
        let mut size = file.state.size();
        if let (Ok(n), Some(limit)) = (&result, call.extend) {
            size = size.max((call.offset + *n as u64).min(limit));
        }
        let map = &file.map;
        let trimmed =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| map.trim_padding(size)))
            {
                Ok(r) => r,
                Err(payload) => {
                    *panic = Some(payload);
                    Err(Error::Panicked("BlockMap::trim_padding"))
                }
            };
        match (result, trimmed) {
            (Ok(n), Ok(())) => Ok(n),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(Box::new(e)),
        }
    }

    /// The end of a call's finish, after end_io and the dsync flush: the counts,
    /// the new size, and the locks released.
    #[inline]
    fn finish_tail(&self, file: &Shared, call: &Call, result: Res) -> Res {
        if let (Op::Write, Ok(n)) = (call.op, &result) {
            file.stats.written.add(*n as u64);
            if let Some(limit) = call.extend {
                file.state.extend_to((call.offset + *n as u64).min(limit));
            }
        } else if let (Op::Read, Ok(n)) = (call.op, &result) {
            file.stats.read.add(*n as u64);
        }
        if let Some(at) = call.count {
            file.state.dio_end(at);
        }
        // Last: releasing locks may start calls that were parked on them.
        if let Some(h) = call.file_lock {
            file.state.file_lock().release(h);
        }
        if let Some((s, e)) = call.range_lock {
            file.state.ranges().unlock(s, e);
        }
        result
    }
}

/// An engine completion put off by [`DeferCompletions`].
type Deferred = (Arc<Dio>, Finished, std::io::Result<()>);

thread_local! {
    /// How many [`DeferCompletions`] guards this thread holds.
    static DEFER_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Engine completions reaped on this thread while it held one.
    static DEFERRED: std::cell::RefCell<Vec<Deferred>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// While alive, engine completions that this thread reaps (an io_uring poll or
/// a sync device completing inline inside a metadata read, say) are queued
/// instead of run; the last guard to drop runs them. A block map takes one
/// with any lock that it holds across device I/O: a completion may call the
/// map again (`end_io`, or a read-modify-write that starts its write and
/// maps it), and on the thread that holds the lock that call would wait on
/// itself.
///
/// Drop it only after the lock it covers is released.
pub(crate) struct DeferCompletions(());

impl DeferCompletions {
    pub(crate) fn new() -> DeferCompletions {
        DEFER_DEPTH.with(|d| d.set(d.get() + 1));
        DeferCompletions(())
    }
}

impl Drop for DeferCompletions {
    fn drop(&mut self) {
        let depth = DEFER_DEPTH.with(|d| {
            let v = d.get() - 1;
            d.set(v);
            v
        });
        if depth != 0 {
            return;
        }
        // Each run may reap (and queue) more while a map lock is held again.
        loop {
            let batch = DEFERRED.with(|q| std::mem::take(&mut *q.borrow_mut()));
            if batch.is_empty() {
                return;
            }
            for (dio, req, result) in batch {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    dio.run_completion(req, result);
                }));
                if caught.is_err() {
                    crate::device::note_callback_panic();
                }
            }
        }
    }
}

impl Completion for Dio {
    fn complete(self: Arc<Self>, req: Finished, result: std::io::Result<()>) {
        if DEFER_DEPTH.with(|d| d.get()) != 0 {
            DEFERRED.with(|q| q.borrow_mut().push((self, req, result)));
            return;
        }
        self.run_completion(req, result);
    }
}

impl Dio {
    fn run_completion(self: Arc<Self>, mut req: Finished, result: std::io::Result<()>) {
        crate::trace::request_completed!(req, result);
        if let Err(e) = result {
            let mut t = lock(&self.tail);
            let slot = &mut t.io_error;
            let at = req.tag();
            if slot.as_ref().is_none_or(|(first, _)| at < *first) {
                *slot = Some((
                    at,
                    Error::Io {
                        offset: req.offset(),
                        source: std::sync::Arc::new(e),
                    },
                ));
            }
            self.io_failed.store(true, Ordering::Release);
        }
        // The request's claim on lent memory goes before the call can see it done
        // (in place: a move of the request to drop it would copy it).
        req.release();
        if !self.sync {
            // Room for one more: send what waits.
            self.submitted.fetch_sub(1, Ordering::SeqCst);
            self.pump();
        }
        if self.sync {
            // A sync submitter polls or parks; it announces sleep before its last
            // check of the count, so after our decrement one of us sees the other.
            self.refs.fetch_sub(1, Ordering::SeqCst);
            if self.sleeping.load(Ordering::SeqCst) {
                if let Some(waiter) = self.waiter.get() {
                    waiter.unpark();
                }
            }
        } else {
            self.put();
        }
    }
}

/// Run `job` on the completion worker (the seed's dio_done_wq): for completions
/// that may block, such as a dsync flush or a map's deferred end_io.
fn deferred(job: Box<dyn FnOnce() + Send>) {
    type Job = Box<dyn FnOnce() + Send>;
    static WORKER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let tx = WORKER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("dio-complete".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A panicking callback must not take the jobs behind it down
                    // with the worker (the panic hook reports it).
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("spawn dio completion worker");
        Mutex::new(tx)
    });
    let tx = lock(tx).clone();
    if let Err(mpsc::SendError(job)) = tx.send(job) {
        job();
    }
}
