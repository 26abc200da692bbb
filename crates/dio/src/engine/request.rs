//! One direct-I/O call from start to finish: validate it (alignment, limits, zero
//! length, EOF), take the file lock, the in-flight count and the block-range lock,
//! choose sync or async, run the walk, and hand the call to completion.
//! (seed: do_blockdev_direct_IO)

use std::sync::Arc;

use super::bio::BioBuilder;
use super::complete::{Dio, Done, Stop};
use super::walk::{walk, Seen, Walk};
use super::{Flags, Shared};
use crate::buf::{Lender, MemRef};
use crate::device::{CompletionMode, Op};
use crate::error::AlignPart;
use crate::file::Begin;
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
}

/// The fs-block-rounded range a write locks.
pub(crate) fn write_lock_range(fs: u64, start: u64, end: u64) -> (u64, u64) {
    (start & !(fs - 1), (end + fs - 1) & !(fs - 1))
}

/// Take a write's block-range lock. The holder may be an async write whose
/// completion only arrives when someone polls the device: then wait by polling, so
/// the waiter itself drives that completion instead of sleeping on it forever.
pub(crate) fn lock_write_range(file: &Shared, r: (u64, u64), flags: Flags) -> Result<()> {
    let ranges = file.state.ranges();
    if flags.contains(Flags::NOWAIT) {
        return if ranges.try_lock(r.0, r.1) {
            Ok(())
        } else {
            Err(Error::WouldBlock)
        };
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
    run(
        file,
        op,
        offset,
        mem,
        Lender::Owned,
        flags,
        &mut |_| true,
        Some(done),
        extra,
    );
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
    pin: &mut dyn FnMut(MemRef) -> bool,
    mut done: Option<Done>,
    extra: Extra,
) -> Option<Result<usize>> {
    let state = &file.state;
    let unlock_range = |r: Option<(u64, u64)>| {
        if let Some((s, e)) = r {
            state.ranges().unlock(s, e);
        }
    };
    let finish_now = |done: Option<Done>, r: Result<usize>| match done {
        Some(d) => {
            d(r);
            None
        }
        None => Some(r),
    };
    let checked = match check(file, op, offset, mem) {
        Ok(c) if c.len > 0 => c,
        r => {
            unlock_range(extra.range_locked);
            return finish_now(done, r.map(|_| 0));
        }
    };
    let fs = u64::from(file.fs_block);
    let end = offset + checked.len;

    // Writes that share an fs block with another write must not run at once: the
    // zeroing of a fresh block's uncovered part would wipe the other's data
    // (fstests generic/240). Lock the fs-block-rounded range until completion.
    let range_lock = match (op, extra.range_locked) {
        (_, Some(r)) => Some(r),
        (Op::Write, None) => {
            let r = write_lock_range(fs, offset, end);
            if let Err(e) = lock_write_range(file, r, flags) {
                return finish_now(done, Err(e));
            }
            Some(r)
        }
        (Op::Read, None) => None,
    };

    let guard = flags.contains(Flags::LOCKING).then(|| state.lock_shared());
    // Counted in before i_size is sampled and blocks are mapped, so that a truncate
    // either waits for this call or runs entirely before it.
    let skip_count = flags.contains(Flags::SKIP_DIO_COUNT);
    if !skip_count && matches!(state.try_dio_begin(), Begin::Closed) {
        // A truncate is under way: this call starts once it is over.
        drop(guard);
        if flags.contains(Flags::NOWAIT) {
            unlock_range(range_lock);
            return finish_now(done, Err(Error::WouldBlock));
        }
        // The range lock, if taken, stays held for the second start.
        let extra = Extra {
            range_locked: range_lock,
            logical_end: extra.logical_end,
        };
        let Some(done) = done else {
            state.wait_gate();
            return run(file, op, offset, mem, lender, flags, pin, None, extra);
        };
        // An async call must not block here: its caller may be a device thread
        // whose other completions the truncate waits for. It owns its memory, so
        // the references stay valid until it runs, and it has nothing to pin.
        let (file, mem) = (Arc::clone(file), mem.to_vec());
        state.defer(Box::new(move || {
            run_async(&file, op, offset, &mem, flags, done, extra)
        }));
        return None;
    }
    let i_size = state.size();
    if op == Op::Read && offset >= i_size {
        if !skip_count {
            state.dio_end();
        }
        drop(guard);
        unlock_range(range_lock);
        return finish_now(done, Ok(0));
    }
    // An extending write is synchronous unless the file system allows async
    // extension: i_size must not move before the data is on the device.
    let logical_end = extra.logical_end.unwrap_or(end).min(end);
    let extend = op == Op::Write && logical_end > i_size;
    let mut forced_sync = None;
    if done.is_some() && extend && !flags.contains(Flags::ASYNC_EXTEND) {
        forced_sync = done.take();
    }
    let dsync = op == Op::Write && flags.contains(Flags::DSYNC);
    let dio = Arc::new(Dio::new(
        Arc::clone(file),
        op,
        offset,
        i_size,
        extend.then_some(logical_end),
        skip_count,
        range_lock,
        done,
    ));
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
    // User code runs in the walk (the block map, the submit_io hook, the pin
    // closure). If it panics, the call still ends properly: no new request goes out,
    // the ones in flight are waited for (sync) or finish the call (async), locks and
    // counts are released, and then the panic goes on to the caller.
    let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Durable writes go out with FUA; if metadata changes too (allocation, a
        // new size), a flush at completion covers it.
        let mut builder = BioBuilder::new(&dio, dsync, poll, lender);
        let mut last_private = None;
        let mut defer = false;
        let r = walk(
            &walk_in,
            &mut builder,
            &*file.map,
            &mut |e| {
                last_private = e.private.clone();
                defer |= e.defer_completion;
            },
            pin,
            &mut seen,
        );
        builder.send();
        (r.0, r.1, last_private, defer)
    }));
    let (walked, stop, last_private, panic) = match walked {
        Ok((walked, stop, private, defer)) => {
            if defer {
                dio.set_defer();
            }
            (walked, stop, private, None)
        }
        Err(payload) => (
            0,
            Stop::Error(Error::Panicked(
                "the block map, its submit_io hook or the pin closure",
            )),
            None,
            Some(payload),
        ),
    };
    // All lookups are done: a locking read drops the lock before waiting.
    drop(guard);
    let stop = match stop {
        // A write that met a hole before writing anything tells the caller so.
        Stop::Clean if op == Op::Write && walked == 0 => Stop::Error(Error::Hole { offset }),
        s => s,
    };
    if dsync && (seen.allocated || extend) {
        dio.flush.store(true, std::sync::atomic::Ordering::Release);
    }
    if dsync && dio.is_async() {
        // The flush may block: finish in the worker, not the device's context.
        dio.set_defer();
    }
    dio.set_outcome(walked, stop, last_private);
    let later = Arc::clone(&dio);
    let r = dio.submitter_done(poll);
    // A panic in end_io during a sync finish goes on to the caller, too.
    let panic = panic.or_else(|| later.take_panic());
    let r = match (forced_sync, r) {
        (Some(d), Some(r)) => {
            d(r);
            None
        }
        (_, r) => r,
    };
    if let Some(payload) = panic {
        std::panic::resume_unwind(payload);
    }
    r
}
