//! One direct-I/O call from start to finish: validate it (alignment, limits, zero
//! length, EOF), take the file lock, the in-flight count and the block-range lock,
//! choose sync or async, run the walk, and hand the call to completion.
//! (seed: do_blockdev_direct_IO)

use std::sync::Arc;

use super::bio::BioBuilder;
use super::complete::{Call, Dio, Done, FileRef, Res, Stop};
use super::walk::{walk, Looked, Seen, Walk};
use super::{Flags, Handle, Shared};
use crate::buf::Segments;
use crate::buf::{Lender, MemRef};
use crate::device::{CompletionMode, Op, Request};
use crate::engine::{Begin, Held, Job, LockKind};
use crate::error::AlignPart;
use crate::map::Mapping;
use crate::{Error, Result};

/// The unit a validated request walks in.
pub(crate) struct Checked {
    pub dio_block: u64,
    pub len: u64,
}

/// Check alignment and limits. The dio block is the fs block when offset and every
/// length are fs-block multiples, else the device's logical block; memory addresses
/// must meet the device's memory alignment.
pub(crate) fn check(file: &Shared, op: Op, offset: u64, mem: &[MemRef]) -> Result<Checked> {
    if op == Op::Write && file.read_only {
        return Err(Error::ReadOnly);
    }
    let fs = u64::from(file.fs_block);
    let lb = u64::from(file.geometry.logical_block);
    let mem_align = file.geometry.mem_align as usize;
    let mut len = 0u64;
    let mut lens = 0u64;
    for m in mem {
        if m.addr() & (mem_align - 1) != 0 && !m.is_empty() {
            return Err(Error::Misaligned {
                part: AlignPart::Buffer,
                value: m.addr() as u64,
                required: mem_align as u64,
            });
        }
        len += m.len() as u64;
        lens |= m.len() as u64;
    }
    let dio_block = if (offset | lens) & (fs - 1) == 0 {
        fs
    } else {
        lb
    };
    if offset & (dio_block - 1) != 0 {
        return Err(Error::Misaligned {
            part: AlignPart::Offset,
            value: offset,
            required: lb,
        });
    }
    if let Some(bad) = mem.iter().find(|m| m.len() as u64 & (dio_block - 1) != 0) {
        return Err(Error::Misaligned {
            part: AlignPart::Length,
            value: bad.len() as u64,
            required: lb,
        });
    }
    let max = file.map.max_file_size();
    match offset.checked_add(len) {
        Some(end) if end <= max => {}
        end => {
            return Err(Error::TooLarge {
                end: end.unwrap_or(u64::MAX),
                max,
            })
        }
    }
    Ok(Checked { dio_block, len })
}

/// What a caller inside the engine (the byte-granular layer) arranged already.
#[derive(Default, Clone, Copy)]
pub(crate) struct Extra {
    /// The write's block range is locked already (read-modify-write holds it from
    /// its reads to its write); the call releases it when it completes.
    pub range_locked: Option<(u64, u64)>,
    /// The file may grow only to here (a padded write covers more than the caller's
    /// bytes).
    pub logical_end: Option<u64>,
    /// The write's padded last block may grow the map's storage past the file size:
    /// the finish calls [`crate::BlockMap::trim_padding`] before it releases the
    /// range (which then reaches to the end of any file).
    pub trim_padding: bool,
}

/// The fs-block-rounded range a write locks.
pub(crate) fn write_lock_range(fs: u64, start: u64, end: u64) -> (u64, u64) {
    (start & !(fs - 1), (end + fs - 1) & !(fs - 1))
}

/// Take a write's block-range lock. The holder may be an async write whose
/// completion only arrives when someone polls the device: then wait by polling, so
/// the waiter itself drives that completion instead of sleeping on it forever.
#[inline]
pub(crate) fn lock_write_range(file: &Shared, r: (u64, u64), flags: Flags) -> Result<()> {
    let ranges = file.state.ranges();
    // Free, as it mostly is: no need to ask the device how to wait.
    if ranges.try_lock(r.0, r.1) {
        return Ok(());
    }
    if flags.contains(Flags::NOWAIT) {
        return Err(Error::WouldBlock);
    }
    if file.dev.completion_mode() == CompletionMode::Polled {
        while !ranges.try_lock(r.0, r.1) {
            file.dev
                .poll(true)
                .map_err(|e| Error::os("poll device while waiting for an overlapping write", e))?;
        }
    } else {
        ranges.lock(r.0, r.1);
    }
    Ok(())
}

/// Why the file lock's kind could not be chosen.
enum LockWait {
    Error(Error),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// The file lock a locking-mode call needs.
enum Need {
    /// This kind, not taken yet.
    Take(LockKind),
    /// The shared lock, taken already (by the overwrite check).
    HeldShared(Held),
}

/// The kind of file lock a locking-mode call needs: shared for reads and for
/// overwrites of blocks that are mapped and written already; exclusive for writes
/// that may allocate. The check looks the range up (without allocating) under the
/// shared lock, as ext4 decides an overwrite, and keeps that lock when the answer is
/// shared; a sync caller waits for it, an async one only tries it (and asks for the
/// exclusive kind when it cannot check).
fn locking_kind(
    file: &Shared,
    op: Op,
    offset: u64,
    end: u64,
    is_async: bool,
) -> std::result::Result<Need, LockWait> {
    if op == Op::Read {
        return Ok(Need::Take(LockKind::Shared));
    }
    if end > file.state.size() {
        return Ok(Need::Take(LockKind::Exclusive));
    }
    let lk = file.state.file_lock();
    let shared = if is_async {
        match lk.try_acquire(LockKind::Shared) {
            Some(h) => h,
            None => return Ok(Need::Take(LockKind::Exclusive)),
        }
    } else {
        lk.acquire(LockKind::Shared)
    };
    let fs = u64::from(file.fs_block);
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (mut block, last) = (offset / fs, (end - 1) / fs);
        while block <= last {
            let e = file.map.map(block, last - block + 1, false)?;
            if e.len == 0 || e.new || !matches!(e.mapping, Mapping::Mapped(_)) {
                return Ok(false);
            }
            block += e.len;
        }
        Ok(true)
    }));
    if matches!(checked, Ok(Ok(true))) {
        return Ok(Need::HeldShared(shared));
    }
    lk.release(shared);
    match checked {
        Ok(Ok(_)) => Ok(Need::Take(LockKind::Exclusive)),
        Ok(Err(e)) => Err(LockWait::Error(e)),
        Err(p) => Err(LockWait::Panicked(p)),
    }
}

/// An async call's completion, and the handle that started it, if a
/// [`DirectFile`](super::DirectFile) did: the call carries the handle's reference
/// rather than the file's own `Arc` (see [`Handle`]).
pub(crate) struct Async {
    done: Done,
    handle: Option<Arc<Handle>>,
}

impl Async {
    /// How the call holds its file.
    fn file_ref(&mut self, file: &Arc<Shared>) -> FileRef {
        match self.handle.take() {
            Some(h) => FileRef::Handle(h),
            None => FileRef::Shared(Arc::clone(file)),
        }
    }
}

/// Run one async call on memory the call owns (it travels with `done`, so there is
/// nothing to pin).
pub(crate) fn run_async(
    file: &Arc<Shared>,
    op: Op,
    offset: u64,
    mem: &[MemRef],
    flags: Flags,
    done: Done,
    extra: Extra,
) {
    start_async(
        file,
        op,
        offset,
        mem,
        flags,
        Async { done, handle: None },
        extra,
    );
}

/// [`run_async`] for a call that `handle` starts (it carries the handle's
/// reference).
pub(crate) fn run_async_handle(
    handle: &Arc<Handle>,
    op: Op,
    offset: u64,
    mem: &[MemRef],
    flags: Flags,
    done: Done,
    extra: Extra,
) {
    let done = Async {
        done,
        handle: Some(Arc::clone(handle)),
    };
    start_async(&handle.0, op, offset, mem, flags, done, extra);
}

/// Start an async call on owned memory.
fn start_async(
    file: &Arc<Shared>,
    op: Op,
    offset: u64,
    mem: &[MemRef],
    flags: Flags,
    done: Async,
    extra: Extra,
) {
    run(
        file,
        op,
        offset,
        mem,
        Lender::Owned,
        flags,
        None,
        Some(done),
        extra,
    );
}

/// The one device request of a fast-path read: `m` read from device byte `at`
/// for the call `dio` (file offset `offset`).
fn one_read_request(
    at: u64,
    m: &MemRef,
    dio: Arc<dyn crate::device::Completion>,
    offset: u64,
    lender: &Lender,
) -> Request {
    Request::build(
        Op::Read,
        at,
        Segments::from(*m),
        false,
        dio,
        offset,
        lender.keep(),
    )
}

/// The shape of a read the one-request fast paths take: one buffer of whole fs
/// blocks (so the dio block is the fs block) at an aligned address, one request's
/// worth, within the file system's limit, on a map without end_io; not ATOMIC (the
/// whole way refuses atomic reads).
fn one_request_shape(file: &Shared, offset: u64, m: &MemRef, flags: Flags) -> bool {
    let geo = &file.geometry;
    let fs = u64::from(file.fs_block);
    let len = m.len() as u64;
    !(file.end_io
        || flags.contains(Flags::ATOMIC)
        || len == 0
        || (offset | len) & (fs - 1) != 0
        || m.addr() & (geo.mem_align as usize - 1) != 0
        || len > u64::from(geo.max_bytes)
        || offset
            .checked_add(len)
            .is_none_or(|end| end > file.map.max_file_size()))
}

/// Whether the map's answer covers all `blocks` of a fast-path read in one piece
/// the device holds (or a hole / unwritten extent: zeros, no request).
fn one_extent(file: &Shared, e: &crate::map::Extent, blocks: u64) -> bool {
    let sh = file.fs_block.trailing_zeros();
    e.len >= blocks
        && match e.mapping {
            Mapping::Mapped(b) => b
                .checked_add(blocks)
                .is_some_and(|end| end <= file.geometry.size >> sh),
            Mapping::Hole | Mapping::Unwritten(_) => true,
        }
}

/// The fast path of the commonest call: a sync read of one aligned buffer that one
/// extent maps and one device request carries, on a file whose map has no end_io.
/// It does what [`run`] does for such a call (the same count, i_size sample, lookup
/// and result rules) without the walk, the request builder and the file-lock logic.
/// Returns None, having done nothing, for a call of another shape (the general path
/// takes it); a call that turns out to need the walk after its lookup continues in
/// the walk with that lookup's answer.
///
/// A panic in the map or its submit_io hook unwinds through guards instead of being
/// caught: they wait for the request if it went out and count the call out, which
/// is all the general path does for it when the map has no end_io (no lock is held,
/// no result is delivered); the panic then goes on to the caller, as there.
#[inline]
pub(crate) fn read_one(
    file: &Arc<Shared>,
    offset: u64,
    mem: &[MemRef],
    lender: Lender<'_>,
    flags: Flags,
) -> Option<Res> {
    let [m] = mem else {
        return None;
    };
    let fs = u64::from(file.fs_block);
    let len = m.len() as u64;
    if !one_request_shape(file, offset, m, flags) {
        return None;
    }
    let _span = crate::trace::call_span!(Op::Read, offset, len, file);
    let state = &file.state;
    // The locking mode's shared file lock, for the lookup and the submission (as the
    // general path holds it), taken before the call counts itself in flight: a
    // truncate holds the lock exclusively while it waits for that count.
    let mut locked = FileLockHold {
        file,
        held: flags
            .contains(Flags::LOCKING)
            .then(|| state.file_lock().acquire(LockKind::Shared)),
    };
    let count = if flags.contains(Flags::SKIP_DIO_COUNT) {
        None
    } else {
        match state.try_dio_begin() {
            Begin::Counted(at) => Some(at),
            // A truncate is under way: the general path waits for it.
            Begin::Closed => return None,
        }
    };
    let i_size = state.size();
    if offset >= i_size {
        if let Some(at) = count {
            state.dio_end(at);
        }
        return Some(Ok(0));
    }
    let mut counted = CountGuard {
        file,
        count,
        armed: true,
    };
    let sh = fs.trailing_zeros();
    let (block, blocks) = (offset >> sh, len >> sh);
    let looked = file.map.map(block, blocks, false);
    let simple = matches!(&looked, Ok(e) if one_extent(file, e, blocks));
    counted.armed = false;
    if !simple {
        let held = locked.held.take();
        let p = Prepared::one_read(offset, fs, len, i_size, count, held, flags);
        return walk_call(file, p, mem, lender, None, None, Some(Ok(looked)));
    }
    let Ok(e) = &looked else {
        unreachable!("a simple answer is an extent")
    };
    let call = Call::one_read(offset, i_size, count);
    let poll = flags.contains(Flags::POLL);
    let mapped = matches!(e.mapping, Mapping::Mapped(_));
    // The one request is counted in at once.
    let dio = Dio::sync_call_with(usize::from(mapped));
    let walked = match e.mapping {
        Mapping::Mapped(b) => {
            counted.armed = true;
            let waiting = WaitGuard {
                file,
                dio: &dio,
                poll,
            };
            let req = one_read_request(b << sh, m, dio.clone(), offset, &lender);
            crate::trace::request_submitted!(req, offset);
            file.map.submit_io(&*file.dev, req, offset);
            std::mem::forget(waiting);
            counted.armed = false;
            len
        }
        Mapping::Hole | Mapping::Unwritten(_) => {
            // Zeros, up to EOF rounded up to the block (the walk's rule).
            let eof = i_size.saturating_add(fs - 1) & !(fs - 1);
            let n = len.min(eof - offset);
            m.slice(0, n as usize).zero();
            n
        }
    };
    let private = e.private.clone();
    drop(looked);
    // The lookup and the request are done: a locking read waits without the lock.
    drop(locked);
    // The map has no end_io: nothing in the finish can panic.
    dio.submitter_done(
        file,
        &call,
        poll,
        walked,
        &mut Stop::Clean,
        private,
        &mut None,
    )
}

/// The async counterpart of [`read_one`]: an async read of one aligned buffer that
/// one extent maps and one device request carries, on a file whose map has no
/// end_io, without the walk, the request builder and the file-lock logic. Gives
/// `done` back, having done nothing, for a call of another shape (the general path
/// takes it); a call that turns out to need the walk after its lookup continues in
/// the walk with that lookup's answer (a panic of it included).
///
/// User code (the map, its submit_io hook) is caught as the walk catches it: the
/// call then finishes through `done` with [`Error::Panicked`], and the panic goes
/// on to this caller.
pub(crate) fn read_one_async(
    handle: &Arc<Handle>,
    offset: u64,
    mem: &[MemRef],
    flags: Flags,
    done: Done,
) -> Option<Done> {
    let file = &handle.0;
    let [m] = mem else {
        return Some(done);
    };
    let fs = u64::from(file.fs_block);
    let len = m.len() as u64;
    // The shape read_one takes, not in the locking mode (the general path takes and
    // parks on the file lock).
    if flags.contains(Flags::LOCKING) || !one_request_shape(file, offset, m, flags) {
        return Some(done);
    }
    let _span = crate::trace::call_span!(Op::Read, offset, len, file);
    let state = &file.state;
    let count = if flags.contains(Flags::SKIP_DIO_COUNT) {
        None
    } else {
        match state.try_dio_begin() {
            Begin::Counted(at) => Some(at),
            // A truncate is under way: the general path parks the call behind it.
            Begin::Closed => return Some(done),
        }
    };
    let i_size = state.size();
    if offset >= i_size {
        if let Some(at) = count {
            state.dio_end(at);
        }
        done(Ok(0));
        return None;
    }
    let sh = fs.trailing_zeros();
    let (block, blocks) = (offset >> sh, len >> sh);
    let looked: Looked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        file.map.map(block, blocks, false)
    }));
    let simple = matches!(&looked, Ok(Ok(e)) if one_extent(file, e, blocks));
    if !simple {
        let p = Prepared::one_read(offset, fs, len, i_size, count, None, flags);
        let done = Async {
            done,
            handle: Some(Arc::clone(handle)),
        };
        walk_call(file, p, mem, Lender::Owned, None, Some(done), Some(looked));
        return None;
    }
    let Ok(Ok(e)) = &looked else {
        unreachable!("a simple answer is an extent")
    };
    let call = Call::one_read(offset, i_size, count);
    let mut stop = Stop::Clean;
    let mut private = e.private.clone();
    let mut panic = None;
    let (dio, walked) = match e.mapping {
        Mapping::Mapped(b) => {
            // The one request is counted in (and as submitted) at once.
            let dio = Dio::new_async(FileRef::Handle(Arc::clone(handle)), done, 1);
            if e.defer_completion {
                dio.set_defer();
            }
            let req = one_read_request(b << sh, m, dio.clone(), offset, &Lender::Owned);
            crate::trace::request_submitted!(req, offset);
            let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                file.map.submit_io(&*file.dev, req, offset);
            }));
            match sent {
                Ok(()) => (dio, len),
                Err(payload) => {
                    // As the walk: nothing counts as read; the request, if it did
                    // not go out, was cancelled as it dropped.
                    stop = Stop::Error(Error::Panicked(
                        "the block map, its submit_io hook or the pin closure",
                    ));
                    private = None;
                    panic = Some(payload);
                    (dio, 0)
                }
            }
        }
        Mapping::Hole | Mapping::Unwritten(_) => {
            let dio = Dio::new_async(FileRef::Handle(Arc::clone(handle)), done, 0);
            if e.defer_completion {
                dio.set_defer();
            }
            // Zeros, up to EOF rounded up to the block (the walk's rule).
            let eof = i_size.saturating_add(fs - 1) & !(fs - 1);
            let n = len.min(eof - offset);
            m.slice(0, n as usize).zero();
            (dio, n)
        }
    };
    drop(looked);
    let poll = flags.contains(Flags::POLL);
    // Async: records the outcome; the last reference finishes the call.
    let _ = dio.submitter_done(file, &call, poll, walked, &mut stop, private, &mut None);
    if let Some(payload) = panic {
        std::panic::resume_unwind(payload);
    }
    None
}

/// The fast path's hold on the file lock (locking mode), released on drop: also
/// when it returns early or unwinds (a panic in the block map or submit_io hook,
/// after [`WaitGuard`] waited for the request).
struct FileLockHold<'a> {
    file: &'a Shared,
    held: Option<Held>,
}

impl Drop for FileLockHold<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            self.file.state.file_lock().release(h);
        }
    }
}

/// Counts a call out if the fast path unwinds (a panic in the block map).
struct CountGuard<'a> {
    file: &'a Shared,
    count: Option<usize>,
    armed: bool,
}

impl Drop for CountGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.armed {
            if let Some(at) = self.count {
                self.file.state.dio_end(at);
            }
        }
    }
}

/// Waits for the fast path's request if the submit_io hook unwinds (the request
/// may be out); [`std::mem::forget`] it once submit_io returns.
struct WaitGuard<'a> {
    file: &'a Shared,
    dio: &'a Arc<Dio>,
    poll: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let dev = &*self.file.dev;
        dev.unplug();
        self.dio.wait_in_flight_at_most(dev, 0, self.poll);
    }
}

/// Run one call. `done` is None for a sync call (the result is returned) and Some
/// for an async one (the result goes there, and None is returned).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    file: &Arc<Shared>,
    op: Op,
    offset: u64,
    mem: &[MemRef],
    lender: Lender<'_>,
    flags: Flags,
    pin: Option<&mut dyn FnMut(MemRef) -> bool>,
    mut done: Option<Async>,
    extra: Extra,
) -> Option<Res> {
    let _span = crate::trace::call_span!(
        op,
        offset,
        mem.iter().map(|m| m.len() as u64).sum::<u64>(),
        file
    );
    let state = &file.state;
    let unlock_range = |r: Option<(u64, u64)>| {
        if let Some((s, e)) = r {
            state.ranges().unlock(s, e);
        }
    };
    let finish_now = |done: Option<Async>, r: Result<usize>| match done {
        Some(d) => {
            (d.done)(r);
            None
        }
        None => Some(r.map_err(Box::new)),
    };
    let checked = match check(file, op, offset, mem) {
        Ok(c) if c.len > 0 => c,
        r => {
            unlock_range(extra.range_locked);
            return finish_now(done, r.map(|_| 0));
        }
    };
    if flags.contains(Flags::ATOMIC) {
        if let Err(e) = super::atomic::check_call(file, op, offset, checked.len, mem) {
            unlock_range(extra.range_locked);
            return finish_now(done, Err(e));
        }
    }
    let fs = u64::from(file.fs_block);
    let end = offset + checked.len;

    // An async call never waits (it may run on a thread that delivers completions):
    // where a sync call would wait for a lock, it parks a retry of itself, started
    // again when the lock is released. It owns its memory and has nothing to pin.
    let retry = |done: Async, extra: Extra| -> Job {
        let (file, mem) = (Arc::clone(file), mem.to_vec());
        Box::new(move || {
            let lender = Lender::Owned;
            run(
                &file,
                op,
                offset,
                &mem,
                lender,
                flags,
                None,
                Some(done),
                extra,
            );
        })
    };

    // Writes that share an fs block with another write must not run at once: the
    // zeroing of a fresh block's uncovered part would wipe the other's data
    // (fstests generic/240). Lock the fs-block-rounded range until completion.
    let range_lock = match (op, extra.range_locked) {
        (_, Some(r)) => Some(r),
        (Op::Write, None) => {
            let r = write_lock_range(fs, offset, end);
            match done {
                Some(d) if !flags.contains(Flags::NOWAIT) && !state.ranges().try_lock(r.0, r.1) => {
                    if let Some(job) = state.ranges().park_unless_free(r.0, r.1, retry(d, extra)) {
                        job();
                    }
                    return None;
                }
                Some(d) => {
                    if flags.contains(Flags::NOWAIT) && !state.ranges().try_lock(r.0, r.1) {
                        return finish_now(Some(d), Err(Error::WouldBlock));
                    }
                    done = Some(d);
                }
                None => {
                    if let Err(e) = lock_write_range(file, r, flags) {
                        return finish_now(None, Err(e));
                    }
                }
            }
            Some(r)
        }
        (Op::Read, None) => None,
    };
    // Every way out releases the range (a caller that locked it for us hands it over
    // with the call), except a parked retry: that keeps a caller's range (the retry
    // carries it in `extra`) and gives back only the one taken here.
    let own_range = if extra.range_locked.is_none() {
        range_lock
    } else {
        None
    };

    // The file lock of the locking mode: reads share it for their lookups; writes
    // hold it until their data is on the device, alone when they may allocate
    // (fill a hole, convert an unwritten extent, extend the file), so that no locking
    // reader maps a fresh block before its data is there (the seed's i_mutex).
    let mut held = None;
    if flags.contains(Flags::LOCKING) {
        let kind = match locking_kind(file, op, offset, end, done.is_some()) {
            Ok(Need::Take(k)) => k,
            Ok(Need::HeldShared(h)) => {
                held = Some(h);
                LockKind::Shared
            }
            Err(LockWait::Panicked(p)) => {
                unlock_range(range_lock);
                std::panic::resume_unwind(p);
            }
            Err(LockWait::Error(e)) => {
                unlock_range(range_lock);
                return finish_now(done, Err(e));
            }
        };
        let lk = state.file_lock();
        if held.is_none() {
            match done {
                None => held = Some(lk.acquire(kind)),
                Some(d) => match lk.try_acquire(kind) {
                    Some(h) => {
                        held = Some(h);
                        done = Some(d);
                    }
                    None => {
                        if flags.contains(Flags::NOWAIT) {
                            unlock_range(range_lock);
                            return finish_now(Some(d), Err(Error::WouldBlock));
                        }
                        unlock_range(own_range);
                        if let Some(job) = lk.park_unless_free(kind, retry(d, extra)) {
                            job();
                        }
                        return None;
                    }
                },
            }
        }
    }
    let release_lock = |held: &mut Option<Held>| {
        if let Some(h) = held.take() {
            state.file_lock().release(h);
        }
    };

    // Counted in before i_size is sampled and blocks are mapped, so that a truncate
    // either waits for this call or runs entirely before it.
    let count = if flags.contains(Flags::SKIP_DIO_COUNT) {
        None
    } else {
        match state.try_dio_begin() {
            Begin::Counted(at) => Some(at),
            Begin::Closed => None,
        }
    };
    if !flags.contains(Flags::SKIP_DIO_COUNT) && count.is_none() {
        // A truncate is under way: this call starts once it is over.
        release_lock(&mut held);
        if flags.contains(Flags::NOWAIT) {
            unlock_range(range_lock);
            return finish_now(done, Err(Error::WouldBlock));
        }
        // The range lock, if taken, stays held for the second start.
        let extra = Extra {
            range_locked: range_lock,
            logical_end: extra.logical_end,
            trim_padding: extra.trim_padding,
        };
        let Some(done) = done else {
            state.wait_gate();
            return run(file, op, offset, mem, lender, flags, pin, None, extra);
        };
        state.defer(retry(done, extra));
        return None;
    }
    if flags.contains(Flags::ATOMIC) {
        // Under the range lock and the in-flight count: no truncate moves the
        // blocks between this look and the walk.
        let looked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::atomic::check_mapped(file, offset, checked.len)
        }));
        if !matches!(looked, Ok(Ok(()))) {
            if let Some(at) = count {
                state.dio_end(at);
            }
            release_lock(&mut held);
            unlock_range(range_lock);
            match looked {
                Ok(r) => return finish_now(done, r.map(|()| 0)),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
    }
    let i_size = state.size();
    if op == Op::Read && offset >= i_size {
        if let Some(at) = count {
            state.dio_end(at);
        }
        release_lock(&mut held);
        unlock_range(range_lock);
        return finish_now(done, Ok(0));
    }
    let logical_end = extra.logical_end.unwrap_or(end).min(end);
    let call = Prepared {
        op,
        offset,
        checked,
        i_size,
        logical_end,
        count,
        range_lock,
        held,
        flags,
        trim_padding: extra.trim_padding,
    };
    walk_call(file, call, mem, lender, pin, done, None)
}

/// A call past its checks, its locks and its count, with i_size sampled: what the
/// walk and the finish need.
struct Prepared {
    op: Op,
    offset: u64,
    checked: Checked,
    i_size: u64,
    /// The file may grow to here at most.
    logical_end: u64,
    count: Option<usize>,
    range_lock: Option<(u64, u64)>,
    /// The file lock, if the locking mode took it.
    held: Option<Held>,
    flags: Flags,
    /// See [`Extra::trim_padding`].
    trim_padding: bool,
}

impl Prepared {
    /// A fast-path read (one buffer of `len` bytes of whole `fs` blocks) that its
    /// lookup sent to the walk: counted in, i_size sampled, the file lock `held`.
    fn one_read(
        offset: u64,
        fs: u64,
        len: u64,
        i_size: u64,
        count: Option<usize>,
        held: Option<Held>,
        flags: Flags,
    ) -> Prepared {
        Prepared {
            op: Op::Read,
            offset,
            checked: Checked { dio_block: fs, len },
            i_size,
            logical_end: offset + len,
            count,
            range_lock: None,
            held,
            flags,
            trim_padding: false,
        }
    }
}

/// The rest of a call: walk the buffers against the block map, send the requests,
/// and finish (sync: wait, and return the result; async: the last completion
/// finishes). `first` is the block map's answer for the call's first block, when the
/// fast path asked already (it must not be asked twice).
fn walk_call(
    file: &Arc<Shared>,
    p: Prepared,
    mem: &[MemRef],
    lender: Lender<'_>,
    pin: Option<&mut dyn FnMut(MemRef) -> bool>,
    done: Option<Async>,
    first: Option<Looked>,
) -> Option<Res> {
    let Prepared {
        op,
        offset,
        checked,
        i_size,
        logical_end,
        count,
        range_lock,
        mut held,
        flags,
        trim_padding,
    } = p;
    let state = &file.state;
    let fs = u64::from(file.fs_block);
    let release_lock = |held: &mut Option<Held>| {
        if let Some(h) = held.take() {
            state.file_lock().release(h);
        }
    };
    // An extending write completes only once its data is on the device, and then
    // moves i_size. Unless the file system allows async extension, that finish runs
    // on the completion worker (where it may block), never in a device's context.
    let extend = op == Op::Write && logical_end > i_size;
    let defer_extend = done.is_some() && extend && !flags.contains(Flags::ASYNC_EXTEND);
    let dsync = op == Op::Write && flags.contains(Flags::DSYNC);
    let mut call = Call {
        op,
        offset,
        i_size,
        extend: extend.then_some(logical_end),
        count,
        range_lock,
        file_lock: None,
        flush: false,
        dsync,
        trim_padding,
    };
    let dio = match done {
        None => Dio::sync_call(),
        Some(mut a) => Dio::new_async(a.file_ref(file), a.done, 0),
    };
    if defer_extend {
        dio.set_defer();
    }
    // A write keeps the file lock until it completes; a read gives it back after its
    // lookups (below).
    if op == Op::Write {
        call.file_lock = held.take();
    }
    let poll = flags.contains(Flags::POLL);
    let walk_in = Walk {
        op,
        offset,
        len: checked.len,
        fs_block: fs,
        i_size,
        dio_block: checked.dio_block,
        device_size: file.geometry.size,
        skip_holes: flags.contains(Flags::SKIP_HOLES),
        mem,
    };
    let mut seen = Seen::default();
    let mut walked = 0;
    let mut stop = Stop::Clean;
    let mut last_private = None;
    let mut defer = false;
    // User code runs in the walk (the block map, the submit_io hook, the pin
    // closure). If it panics, the call still ends properly: no new request goes out,
    // the ones in flight are waited for (sync) or finish the call (async), locks and
    // counts are released, and then the panic goes on to the caller.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Durable writes go out with FUA; if metadata changes too (allocation, a
        // new size), a flush at completion covers it.
        let mut builder = BioBuilder::new(&dio, file, op, dsync, poll, lender);
        builder.atomic = flags.contains(Flags::ATOMIC);
        walked = walk(
            &walk_in,
            &mut builder,
            &*file.map,
            first,
            |e: &crate::map::Extent| {
                last_private = e.private.clone();
                defer |= e.defer_completion;
            },
            pin,
            &mut seen,
            &mut stop,
        );
        builder.send();
    }));
    let panic = match caught {
        Ok(()) => {
            if defer {
                dio.set_defer();
            }
            None
        }
        Err(payload) => {
            walked = 0;
            stop = Stop::Error(Error::Panicked(
                "the block map, its submit_io hook or the pin closure",
            ));
            last_private = None;
            Some(payload)
        }
    };
    // All lookups are done: a locking read drops the lock before waiting.
    release_lock(&mut held);
    // A write that met a hole before writing anything tells the caller so.
    if op == Op::Write && walked == 0 && matches!(stop, Stop::Clean) {
        stop = Stop::Error(Error::Hole { offset });
    }
    if dsync && (seen.allocated || extend) {
        call.flush = true;
    }
    if dsync && dio.is_async() {
        // The flush may block: finish in the worker, not the device's context.
        dio.set_defer();
    }
    let mut end_io_panic = None;
    let Some(r) = dio.submitter_done(
        file,
        &call,
        poll,
        walked,
        &mut stop,
        last_private,
        &mut end_io_panic,
    ) else {
        // Async: the last completion finishes the call (a panic of the walk still
        // goes on to this caller).
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
        return None;
    };
    // A panic in end_io during a sync finish goes on to the caller, too.
    if let Some(payload) = panic.or(end_io_panic) {
        std::panic::resume_unwind(payload);
    }
    Some(r)
}
