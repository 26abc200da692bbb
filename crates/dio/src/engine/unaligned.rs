//! Byte-granular direct I/O ([`Flags::UNALIGNED`]): any offset, any length, any
//! buffer address. The kernel answers EINVAL here; dio pads instead.
//!
//! A request is widened to whole logical blocks. Its aligned middle goes straight
//! from (or to) the caller's memory when that memory is aligned; the partial head and
//! tail blocks go through small bounce buffers. A write reads those partial blocks
//! first and patches them (read-modify-write) while it holds the block-range lock
//! that every direct write takes, so overlapping read-modify-writes, and
//! read-modify-writes against plain direct writes sharing a block, never lose each
//! other's bytes; writes to other blocks still run in parallel. Memory that is not
//! aligned is bounced through an aligned buffer in bounded chunks, with no
//! read-modify-write when offset and length are aligned.
//!
//! A padded last block can grow the map's storage past where the bytes end (a host
//! file grows to the block's end). When the map asks for it
//! ([`crate::BlockMap::trims_padding`]) and the padded end passes the file size,
//! the write locks its range to the end of any file, and its finish, before that
//! lock goes, has the map cut the storage back to the new size
//! ([`crate::BlockMap::trim_padding`]): no other write past the block runs
//! meanwhile, so the cut never meets another write's bytes, and writes that end
//! inside the file or on a block boundary take the usual narrow range.
//!
//! It builds on the request layer and owns no walk or request-building logic.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};

use super::request::{self, write_lock_range, Extra};
use super::{Completed, Flags, Shared};
use crate::buf::{self, AlignedBuf, MemRef, OwnedBuf};
use crate::device::Op;
use crate::engine::Job;
use crate::{Error, Result};

/// Bytes bounced at a time when the caller's memory is not aligned.
const BOUNCE_CHUNK: u64 = 1 << 20;

/// The aligned middle goes straight from (to) the caller's memory when it is at
/// least this long. Shorter requests go through one contiguous bounce buffer: one
/// memory segment and fewer pages pinned per request instead of head + middle +
/// tail, which costs more than copying a few KiB.
const DIRECT_MIN: u64 = 64 << 10;

/// Whether a request needs no padding or bouncing.
pub(crate) fn is_aligned<'a>(
    file: &Shared,
    offset: u64,
    pieces: impl Iterator<Item = (usize, usize)> + 'a,
) -> bool {
    let lb = u64::from(file.geometry.logical_block);
    let ma = file.geometry.mem_align as usize;
    let mut ok = offset & (lb - 1) == 0;
    for (addr, len) in pieces {
        ok &= len as u64 & (lb - 1) == 0 && (len == 0 || addr & (ma - 1) == 0);
    }
    ok
}

/// How one unaligned request is widened.
#[derive(Debug, Clone, Copy)]
struct Plan {
    off: u64,
    end: u64,
    lb: u64,
    /// The widened, aligned range.
    a0: u64,
    a1: u64,
    /// Partial head block (starts at a0), partial tail block start.
    head: bool,
    tail: Option<u64>,
    /// The aligned middle, served from the caller's memory.
    m0: u64,
    m1: u64,
}

impl Plan {
    fn new(off: u64, len: u64, lb: u64) -> Plan {
        let end = off + len;
        let a0 = off & !(lb - 1);
        let a1 = (end + lb - 1) & !(lb - 1);
        let head = off & (lb - 1) != 0;
        let end_block = end & !(lb - 1);
        if head && end <= a0 + lb {
            // One partial block: the head bounce covers it all.
            return Plan {
                off,
                end,
                lb,
                a0,
                a1,
                head,
                tail: None,
                m0: off,
                m1: off,
            };
        }
        let m0 = if head { a0 + lb } else { off };
        let (m1, tail) = if end & (lb - 1) != 0 {
            (end_block, Some(end_block))
        } else {
            (end, None)
        };
        Plan {
            off,
            end,
            lb,
            a0,
            a1,
            head,
            tail,
            m0,
            m1,
        }
    }

    /// Bounce buffers for the partial head and tail blocks.
    fn bounce_blocks(&self, file: &Shared) -> (Option<AlignedBuf>, Option<AlignedBuf>) {
        let block = || AlignedBuf::new(self.lb as usize, file.geometry.buffer_align());
        (self.head.then(block), self.tail.map(|_| block()))
    }

    /// After a read of `n` bytes from `a0`: copy the caller's parts of the head and
    /// tail bounce blocks into the caller's buffers.
    fn deliver_ends<'b>(
        &self,
        n: usize,
        head: Option<&[u8]>,
        tail: Option<&[u8]>,
        bufs: impl IntoIterator<Item = &'b mut [u8]>,
    ) {
        let got_end = (self.a0 + n as u64).min(self.end);
        let mut bufs: Vec<&mut [u8]> = bufs.into_iter().collect();
        if let Some(h) = head {
            let from = (self.off - self.a0) as usize;
            let to = ((got_end.max(self.off) - self.a0) as usize).min(self.lb as usize);
            scatter(bufs.iter_mut().map(|b| &mut **b), 0, &h[from..to]);
        }
        if let (Some(t), Some(t0)) = (tail, self.tail) {
            if got_end > t0 {
                let at = (t0 - self.off) as usize;
                scatter(
                    bufs.iter_mut().map(|b| &mut **b),
                    at,
                    &t[..(got_end - t0) as usize],
                );
            }
        }
    }

    /// Caller bytes done, given `n` bytes done from `a0`.
    fn user_count(&self, n: usize) -> usize {
        ((self.a0 + n as u64).min(self.end)).saturating_sub(self.off) as usize
    }
}

/// Whether the caller's memory can serve the aligned middle as it is.
fn middle_is_direct(file: &Shared, plan: &Plan, pieces: &[(usize, usize)]) -> bool {
    if plan.m1 - plan.m0 < DIRECT_MIN {
        return false;
    }
    let lb = plan.lb;
    let ma = file.geometry.mem_align as usize;
    let mut p = plan.off;
    for &(addr, len) in pieces {
        let s = p.max(plan.m0);
        let e = (p + len as u64).min(plan.m1);
        if s < e {
            let at = addr + (s - p) as usize;
            if s & (lb - 1) != 0 || e & (lb - 1) != 0 || at & (ma - 1) != 0 {
                return false;
            }
        }
        p += len as u64;
    }
    true
}

/// The parts of `mem` (laid end to end) between request bytes `from` and `to`.
fn sub_refs(mem: &[MemRef], from: u64, to: u64, out: &mut Vec<MemRef>) {
    let mut p = 0u64;
    for m in mem {
        let s = p.max(from);
        let e = (p + m.len() as u64).min(to);
        if s < e {
            out.push(m.slice((s - p) as usize, (e - s) as usize));
        }
        p += m.len() as u64;
    }
}

/// Walk buffers laid end to end from byte `at` for `len` bytes: `f(buffer, range
/// in it, offset in the flat run)` for each piece.
fn pieces<B: AsRef<[u8]>>(
    bufs: impl IntoIterator<Item = B>,
    mut at: usize,
    len: usize,
    mut f: impl FnMut(B, std::ops::Range<usize>, usize),
) {
    let mut done = 0;
    for b in bufs {
        if done == len {
            return;
        }
        let blen = b.as_ref().len();
        if at >= blen {
            at -= blen;
            continue;
        }
        let n = (blen - at).min(len - done);
        f(b, at..at + n, done);
        done += n;
        at = 0;
    }
}

/// Copy `src` into the caller's buffers, starting at byte `at` of them.
fn scatter<'b>(bufs: impl IntoIterator<Item = &'b mut [u8]>, at: usize, src: &[u8]) {
    pieces(bufs, at, src.len(), |b, r, o| {
        let n = r.len();
        b[r].copy_from_slice(&src[o..o + n]);
    });
}

/// Copy from the caller's buffers, starting at byte `at` of them, into `dst`.
fn gather<'b>(bufs: impl IntoIterator<Item = &'b [u8]>, at: usize, dst: &mut [u8]) {
    let len = dst.len();
    pieces(bufs, at, len, |b, r, o| {
        let n = r.len();
        dst[o..o + n].copy_from_slice(&b[r]);
    });
}

/// The memory of a widened request: the head bounce, the caller's aligned middle
/// (`refs` are the caller's buffers laid end to end), the tail bounce.
fn widened<'a>(
    scope: &buf::IoScope<'a>,
    plan: &Plan,
    refs: &[MemRef],
    head: Option<&'a mut AlignedBuf>,
    tail: Option<&'a mut AlignedBuf>,
) -> Vec<MemRef> {
    let mut mem = Vec::with_capacity(refs.len() + 2);
    if let Some(h) = head {
        mem.push(scope.lend_buf(h));
    }
    sub_refs(refs, plan.m0 - plan.off, plan.m1 - plan.off, &mut mem);
    if let Some(t) = tail {
        mem.push(scope.lend_buf(t));
    }
    mem
}

fn run_sync(
    file: &Arc<Shared>,
    scope: &buf::IoScope<'_>,
    op: Op,
    offset: u64,
    mem: &[MemRef],
    flags: Flags,
    extra: Extra,
) -> Result<usize> {
    let lender = scope.lender();
    request::run(file, op, offset, mem, lender, flags, None, None, extra)
        .expect("a sync call returns its result")
        .map_err(|e| *e)
}

/// Read one logical block at `pos` into `block` for read-modify-write: bytes past
/// what the read returned (EOF, a short read) are zeros.
fn read_block(file: &Arc<Shared>, pos: u64, block: &mut [u8], flags: Flags) -> Result<()> {
    let n = buf::io_scope(super::drain(file), |scope| {
        let m = scope.lend_buf(block);
        run_sync(file, scope, Op::Read, pos, &[m], flags, Extra::default())
    })?;
    block[n..].fill(0);
    Ok(())
}

/// Read the partial head and tail blocks of a write and patch the caller's bytes
/// (`src`, laid end to end) into them: the read-modify-write, done under the
/// block-range lock.
fn read_modify(
    file: &Arc<Shared>,
    plan: &Plan,
    head: Option<&mut [u8]>,
    tail: Option<&mut [u8]>,
    src: &[&[u8]],
    flags: Flags,
) -> Result<()> {
    if let Some(h) = head {
        read_block(file, plan.a0, h, flags)?;
        let from = (plan.off - plan.a0) as usize;
        let to = ((plan.end - plan.a0) as usize).min(plan.lb as usize);
        gather(src.iter().copied(), 0, &mut h[from..to]);
    }
    if let (Some(t), Some(t0)) = (tail, plan.tail) {
        read_block(file, t0, t, flags)?;
        let at = (t0 - plan.off) as usize;
        gather(src.iter().copied(), at, &mut t[..(plan.end - t0) as usize]);
    }
    Ok(())
}

fn too_large(file: &Shared, off: u64, len: u64) -> Result<()> {
    let max = file.map.max_file_size();
    match off.checked_add(len) {
        Some(end) if end <= max => Ok(()),
        end => Err(Error::TooLarge {
            end: end.unwrap_or(u64::MAX),
            max,
        }),
    }
}

/// The block range a write locks, and whether its padded last block may grow the
/// map's storage past the file size (see [`Locked`]).
fn lock_range(file: &Shared, plan: &Plan, flags: Flags) -> Result<Locked> {
    loop {
        let (want, trim) = range_to_lock(file, plan);
        request::lock_write_range(file, want, flags)?;
        if let Some(locked) = locked_as(file, plan, want, trim) {
            return Ok(locked);
        }
    }
}

/// A write's locked block range. When the map trims padding
/// ([`crate::BlockMap::trims_padding`]) and the write's padded end passes the file
/// size, the range reaches to the end of any file: then no other write at or past
/// the write's first block runs, and no truncate, until the write's finish has cut
/// the padding back (`trim`), so the cut never meets another write's bytes.
#[derive(Debug, Clone, Copy)]
struct Locked {
    range: (u64, u64),
    trim: bool,
}

/// The range to lock for `plan`, and whether it is the wide one (to the end of any
/// file), judged on the size now.
fn range_to_lock(file: &Shared, plan: &Plan) -> ((u64, u64), bool) {
    let r = write_lock_range(u64::from(file.fs_block), plan.a0, plan.a1);
    // Only a partial last block pads; only a padded end past the size grows storage.
    let pads = plan.end & (plan.lb - 1) != 0 && plan.a1 > file.state.size();
    if pads && file.map.trims_padding() {
        ((r.0, u64::MAX), true)
    } else {
        (r, false)
    }
}

/// With `want` locked: the lock, or None (`want` released again) when the narrow
/// range no longer does, because a truncate shrank the file below the padded end
/// between the look and the lock. Under the narrow lock the size stays at or past
/// the padded end: shrinking below it needs a range that overlaps this one.
fn locked_as(file: &Shared, plan: &Plan, want: (u64, u64), trim: bool) -> Option<Locked> {
    let pads = plan.end & (plan.lb - 1) != 0 && plan.a1 > file.state.size();
    if !trim && pads && file.map.trims_padding() {
        file.state.ranges().unlock(want.0, want.1);
        return None;
    }
    Some(Locked { range: want, trim })
}

fn pieces_mut(bufs: &[IoSliceMut<'_>]) -> Vec<(usize, usize)> {
    bufs.iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect()
}

/// A synchronous read at any offset into any buffers.
pub(crate) fn read(
    file: &Arc<Shared>,
    off: u64,
    bufs: &mut [IoSliceMut<'_>],
    flags: Flags,
) -> Result<usize> {
    let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    too_large(file, off, len)?;
    if len == 0 {
        return Ok(0);
    }
    let lb = u64::from(file.geometry.logical_block);
    let plan = Plan::new(off, len, lb);
    if middle_is_direct(file, &plan, &pieces_mut(bufs)) {
        return read_direct(file, &plan, bufs, flags);
    }
    // Bounce the widened range through one aligned buffer, a chunk at a time.
    let mut bounce = bounce_buffer(file, len, lb);
    by_chunks(off, len, |pos, n, done| {
        let plan = Plan::new(pos, n as u64, lb);
        let widened = &mut bounce[..(plan.a1 - plan.a0) as usize];
        let got = buf::io_scope(super::drain(file), |scope| {
            let m = scope.lend_buf(widened);
            run_sync(
                file,
                scope,
                Op::Read,
                plan.a0,
                &[m],
                flags,
                Extra::default(),
            )
        })?;
        let user = plan.user_count(got);
        let from = (plan.off - plan.a0) as usize;
        scatter(
            bufs.iter_mut().map(|b| &mut **b),
            done,
            &bounce[from..from + user],
        );
        Ok(user)
    })
}

/// A bounce buffer for a request of `len` bytes widened to whole blocks, at most
/// a chunk's worth.
fn bounce_buffer(file: &Shared, len: u64, lb: u64) -> AlignedBuf {
    let size = len.min(BOUNCE_CHUNK) + 2 * lb;
    AlignedBuf::new(size as usize, file.geometry.buffer_align())
}

/// Fill a widened range's bounce buffer for a write: the partial head and tail
/// blocks read from the file (read-modify-write), the caller's bytes (`src`, laid
/// end to end from the request's start) over them.
fn fill_widened(
    file: &Arc<Shared>,
    plan: &Plan,
    widened: &mut [u8],
    src: &[&[u8]],
    flags: Flags,
) -> Result<()> {
    let lb = plan.lb as usize;
    if plan.head {
        read_block(file, plan.a0, &mut widened[..lb], flags)?;
    }
    if let Some(t0) = plan.tail {
        let at = (t0 - plan.a0) as usize;
        read_block(file, t0, &mut widened[at..at + lb], flags)?;
    }
    let from = (plan.off - plan.a0) as usize;
    gather(
        src.iter().copied(),
        0,
        &mut widened[from..from + (plan.end - plan.off) as usize],
    );
    Ok(())
}

/// Run `step(position, length, done so far)` over `[off, off + len)` in chunks of
/// at most [`BOUNCE_CHUNK`] bytes. Stops at a short step; an error after some bytes
/// are done ends with those bytes (an exact partial count).
fn by_chunks(
    off: u64,
    len: u64,
    mut step: impl FnMut(u64, usize, usize) -> Result<usize>,
) -> Result<usize> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(BOUNCE_CHUNK) as usize;
        let moved = match step(off + done, n, done as usize) {
            Ok(m) => m,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        };
        done += moved as u64;
        if moved < n {
            break;
        }
    }
    Ok(done as usize)
}

/// The read of a plan whose middle can go straight to the caller's memory.
fn read_direct(
    file: &Arc<Shared>,
    plan: &Plan,
    bufs: &mut [IoSliceMut<'_>],
    flags: Flags,
) -> Result<usize> {
    let (mut head, mut tail) = plan.bounce_blocks(file);
    let n = buf::io_scope(super::drain(file), |scope| {
        let refs = scope.lend_mut(bufs);
        let mem = widened(scope, plan, refs, head.as_mut(), tail.as_mut());
        run_sync(
            file,
            scope,
            Op::Read,
            plan.a0,
            &mem,
            flags,
            Extra::default(),
        )
    })?;
    plan.deliver_ends(
        n,
        head.as_deref(),
        tail.as_deref(),
        bufs.iter_mut().map(|b| &mut **b),
    );
    Ok(plan.user_count(n))
}

/// A synchronous write at any offset from any buffers.
pub(crate) fn write(
    file: &Arc<Shared>,
    off: u64,
    bufs: &[IoSlice<'_>],
    flags: Flags,
) -> Result<usize> {
    if file.read_only {
        return Err(Error::ReadOnly);
    }
    let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    too_large(file, off, len)?;
    if len == 0 {
        return Ok(0);
    }
    let lb = u64::from(file.geometry.logical_block);
    let plan = Plan::new(off, len, lb);
    let pieces: Vec<(usize, usize)> = bufs
        .iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect();
    if middle_is_direct(file, &plan, &pieces) {
        return write_direct(file, &plan, bufs, flags);
    }
    let mut bounce = bounce_buffer(file, len, lb);
    let all: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
    by_chunks(off, len, |pos, n, done| {
        let plan = Plan::new(pos, n as u64, lb);
        let locked = lock_range(file, &plan, flags)?;
        let widened = &mut bounce[..(plan.a1 - plan.a0) as usize];
        // This chunk's bytes of the caller's buffers.
        let mut part = vec![0u8; 0];
        let src: Vec<&[u8]> = if done == 0 && n as u64 == len {
            all.clone()
        } else {
            part.resize(n, 0);
            gather(all.iter().copied(), done, &mut part);
            vec![&part[..]]
        };
        let patched = fill_widened(file, &plan, widened, &src, flags);
        let extra = after_patch(file, &plan, locked, patched)?;
        let put = buf::io_scope(super::drain(file), |scope| {
            let m = scope.lend_buf(widened);
            run_sync(file, scope, Op::Write, plan.a0, &[m], flags, extra)
        })?;
        Ok(plan.user_count(put))
    })
}

/// After the read-modify-write of a write holding `range`: on failure release the
/// range and report; else what the write's call needs to release it when done.
fn after_patch(file: &Shared, plan: &Plan, locked: Locked, patched: Result<()>) -> Result<Extra> {
    if let Err(e) = patched {
        file.state.ranges().unlock(locked.range.0, locked.range.1);
        return Err(e);
    }
    Ok(Extra {
        range_locked: Some(locked.range),
        logical_end: Some(plan.end),
        trim_padding: locked.trim,
    })
}

/// The write of a plan whose middle can come straight from the caller's memory.
fn write_direct(
    file: &Arc<Shared>,
    plan: &Plan,
    bufs: &[IoSlice<'_>],
    flags: Flags,
) -> Result<usize> {
    let locked = lock_range(file, plan, flags)?;
    let (mut head, mut tail) = plan.bounce_blocks(file);
    let src: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
    let patched = read_modify(
        file,
        plan,
        head.as_deref_mut(),
        tail.as_deref_mut(),
        &src,
        flags,
    );
    let extra = after_patch(file, plan, locked, patched)?;
    let n = buf::io_scope(super::drain(file), |scope| {
        let refs = scope.lend(bufs);
        let mem = widened(scope, plan, refs, head.as_mut(), tail.as_mut());
        run_sync(file, scope, Op::Write, plan.a0, &mem, flags, extra)
    })?;
    Ok(plan.user_count(n))
}

/// The memory of a widened async request from owned buffers: bounce blocks for
/// the partial ends, the caller's buffers for the aligned middle. `blocks` holds the
/// bounce blocks (head first) and must live until the request completes.
fn widened_owned<B: OwnedBuf>(
    plan: &Plan,
    blocks: &mut [AlignedBuf],
    bufs: &mut [B],
) -> Vec<MemRef> {
    let ends = buf::lend_owned(blocks);
    let refs = buf::lend_owned(bufs);
    let mut mem = Vec::with_capacity(refs.len() + 2);
    if plan.head {
        mem.push(ends[0]);
    }
    sub_refs(&refs, plan.m0 - plan.off, plan.m1 - plan.off, &mut mem);
    if plan.tail.is_some() {
        mem.push(ends[ends.len() - 1]);
    }
    mem
}

fn owned_pieces<B: OwnedBuf>(bufs: &mut [B]) -> Vec<(usize, usize)> {
    bufs.iter_mut()
        .map(|b| (b.as_mut_ptr() as usize, b.len()))
        .collect()
}

/// An async read at any offset. When the caller's memory suits the aligned middle,
/// only the partial end blocks are bounced; otherwise the widened range is read
/// into one aligned bounce buffer. Copies into the caller's buffers happen at
/// completion.
pub(crate) fn read_async<B: OwnedBuf>(
    file: &Arc<Shared>,
    off: u64,
    mut bufs: Vec<B>,
    flags: Flags,
    done: impl FnOnce(Completed<B>) + Send + 'static,
) {
    let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    if let Err(e) = too_large(file, off, len) {
        return done(Completed {
            result: Err(e),
            bufs,
        });
    }
    let plan = Plan::new(off, len, u64::from(file.geometry.logical_block));
    let direct = middle_is_direct(file, &plan, &owned_pieces(&mut bufs));
    let (mem, finish): (Vec<MemRef>, super::complete::Done) = if direct {
        let (head, tail) = plan.bounce_blocks(file);
        let has_head = head.is_some();
        let mut blocks: Vec<AlignedBuf> = head.into_iter().chain(tail).collect();
        let mem = widened_owned(&plan, &mut blocks, &mut bufs);
        let finish = Box::new(move |r: Result<usize>| {
            let result = r.map(|n| {
                let head = if has_head { blocks.first() } else { None };
                let tail = plan.tail.and(blocks.last());
                plan.deliver_ends(
                    n,
                    head.map(|b| &b[..]),
                    tail.map(|b| &b[..]),
                    bufs.iter_mut().map(|b| b.as_mut_slice()),
                );
                plan.user_count(n)
            });
            done(Completed { result, bufs });
        });
        (mem, finish)
    } else {
        let mut bounce = vec![AlignedBuf::new(
            (plan.a1 - plan.a0) as usize,
            file.geometry.buffer_align(),
        )];
        let mem = buf::lend_owned(&mut bounce).to_vec();
        let finish = Box::new(move |r: Result<usize>| {
            let result = r.map(|n| {
                let user = plan.user_count(n);
                let from = (plan.off - plan.a0) as usize;
                scatter(
                    bufs.iter_mut().map(|b| b.as_mut_slice()),
                    0,
                    &bounce[0][from..from + user],
                );
                user
            });
            done(Completed { result, bufs });
        });
        (mem, finish)
    };
    request::run_async(
        file,
        Op::Read,
        plan.a0,
        &mem,
        flags,
        finish,
        Extra::default(),
    );
}

/// An async write at any offset: the partial blocks are read and patched in the
/// caller's thread (read-modify-write), then the widened range is written, the
/// middle straight from the caller's buffers when their memory suits it, else from
/// one bounce buffer; the block range stays locked until the write completes.
pub(crate) fn write_async<B: OwnedBuf>(
    file: &Arc<Shared>,
    off: u64,
    bufs: Vec<B>,
    flags: Flags,
    done: impl FnOnce(Completed<B>) + Send + 'static,
) {
    if file.read_only {
        return done(Completed {
            result: Err(Error::ReadOnly),
            bufs,
        });
    }
    let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    if let Err(e) = too_large(file, off, len) {
        return done(Completed {
            result: Err(e),
            bufs,
        });
    }
    if len == 0 {
        return done(Completed {
            result: Ok(0),
            bufs,
        });
    }
    let lb = u64::from(file.geometry.logical_block);
    let plan = Plan::new(off, len, lb);
    // The block range stays locked from the reads of the partial blocks to the end
    // of the write. An async call never waits for it: it parks and starts again.
    let (range, trim) = range_to_lock(file, &plan);
    let ranges = file.state.ranges();
    if !ranges.try_lock(range.0, range.1) {
        if flags.contains(Flags::NOWAIT) {
            return done(Completed {
                result: Err(Error::WouldBlock),
                bufs,
            });
        }
        let again = Arc::clone(file);
        let job: Job = Box::new(move || write_async(&again, off, bufs, flags, done));
        if let Some(job) = ranges.park_unless_free(range.0, range.1, job) {
            job();
        }
        return;
    }
    let Some(locked) = locked_as(file, &plan, range, trim) else {
        // The file shrank below the padded end meanwhile: lock the wide range.
        return write_async(file, off, bufs, flags, done);
    };
    // Read the partial end blocks without waiting (this may be a device's
    // completion thread); patch and write once they are in.
    let (head, tail) = plan.bounce_blocks(file);
    let file2 = Arc::clone(file);
    read_ends_async(file, &plan, head, tail, flags, move |ends| match ends {
        Err(e) => {
            file2.state.ranges().unlock(range.0, range.1);
            done(Completed {
                result: Err(e),
                bufs,
            });
        }
        Ok((head, tail)) => write_patched(&file2, plan, head, tail, bufs, flags, locked, done),
    });
}

/// What [`read_ends_async`] hands on: the head and tail blocks, read.
type Ends = Result<(Option<AlignedBuf>, Option<AlignedBuf>)>;

/// Read the partial head and tail blocks of a write (those present) with async
/// calls, then call `then` with them (bytes past what a read returned are zeros),
/// on whatever thread completes the last read.
fn read_ends_async(
    file: &Arc<Shared>,
    plan: &Plan,
    head: Option<AlignedBuf>,
    tail: Option<AlignedBuf>,
    flags: Flags,
    then: impl FnOnce(Ends) + Send + 'static,
) {
    struct Gather {
        head: Option<AlignedBuf>,
        tail: Option<AlignedBuf>,
        pending: usize,
        error: Option<Error>,
        then: Option<Box<dyn FnOnce(Ends) + Send>>,
    }
    let reads: Vec<(bool, u64, AlignedBuf)> = head
        .map(|b| (true, plan.a0, b))
        .into_iter()
        .chain(tail.map(|b| (false, plan.tail.expect("a tail block has a start"), b)))
        .collect();
    if reads.is_empty() {
        return then(Ok((None, None)));
    }
    let state = Arc::new(Mutex::new(Gather {
        head: None,
        tail: None,
        pending: reads.len(),
        error: None,
        then: Some(Box::new(then)),
    }));
    // Only the partial blocks' own flags matter to their reads.
    let read_flags = flags & (Flags::LOCKING | Flags::NOWAIT | Flags::SKIP_DIO_COUNT);
    for (is_head, pos, block) in reads {
        let state = Arc::clone(&state);
        let mut block = vec![block];
        let mem = buf::lend_owned(&mut block);
        let done: super::complete::Done = Box::new(move |r: Result<usize>| {
            let mut block = block.pop().expect("the block comes back");
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(n) => {
                    block[n..].fill(0);
                    if is_head {
                        st.head = Some(block);
                    } else {
                        st.tail = Some(block);
                    }
                }
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
            st.pending -= 1;
            if st.pending > 0 {
                return;
            }
            let then = st.then.take().expect("called once");
            let ends = match st.error.take() {
                Some(e) => Err(e),
                None => Ok((st.head.take(), st.tail.take())),
            };
            drop(st);
            then(ends);
        });
        request::run_async(
            file,
            Op::Read,
            pos,
            &mem,
            read_flags,
            done,
            Extra::default(),
        );
    }
}

/// The second half of an async read-modify-write: patch the caller's bytes into the
/// read end blocks and write the widened range (the middle straight from the
/// caller's buffers when their memory suits it, else one bounce buffer), the block
/// range still locked until the write completes.
#[allow(clippy::too_many_arguments)]
fn write_patched<B: OwnedBuf>(
    file: &Arc<Shared>,
    plan: Plan,
    mut head: Option<AlignedBuf>,
    mut tail: Option<AlignedBuf>,
    mut bufs: Vec<B>,
    flags: Flags,
    locked: Locked,
    done: impl FnOnce(Completed<B>) + Send + 'static,
) {
    let direct = middle_is_direct(file, &plan, &owned_pieces(&mut bufs));
    let lb = plan.lb as usize;
    let mut blocks: Vec<AlignedBuf> = Vec::new();
    {
        let src: Vec<&[u8]> = bufs.iter_mut().map(|b| &*b.as_mut_slice()).collect();
        if let Some(h) = head.as_deref_mut() {
            let from = (plan.off - plan.a0) as usize;
            let to = ((plan.end - plan.a0) as usize).min(lb);
            gather(src.iter().copied(), 0, &mut h[from..to]);
        }
        if let (Some(t), Some(t0)) = (tail.as_deref_mut(), plan.tail) {
            let at = (t0 - plan.off) as usize;
            gather(src.iter().copied(), at, &mut t[..(plan.end - t0) as usize]);
        }
        if direct {
            blocks.extend(head.take().into_iter().chain(tail.take()));
        } else {
            // One bounce buffer for the whole widened range: the patched end blocks
            // in place, the caller's bytes between them.
            let mut b = AlignedBuf::new((plan.a1 - plan.a0) as usize, file.geometry.buffer_align());
            if let Some(h) = &head {
                b[..lb].copy_from_slice(h);
            }
            if let (Some(t), Some(t0)) = (&tail, plan.tail) {
                let at = (t0 - plan.a0) as usize;
                b[at..at + lb].copy_from_slice(t);
            }
            let from = (plan.off - plan.a0) as usize;
            gather(
                src.iter().copied(),
                0,
                &mut b[from..from + (plan.end - plan.off) as usize],
            );
            blocks.push(b);
        }
    }
    let mem = if direct {
        widened_owned(&plan, &mut blocks, &mut bufs)
    } else {
        buf::lend_owned(&mut blocks).to_vec()
    };
    let finish = Box::new(move |r: Result<usize>| {
        drop(blocks);
        done(Completed {
            result: r.map(|n| plan.user_count(n)),
            bufs,
        });
    });
    let extra = Extra {
        range_locked: Some(locked.range),
        logical_end: Some(plan.end),
        trim_padding: locked.trim,
    };
    request::run_async(file, Op::Write, plan.a0, &mem, flags, finish, extra);
}

#[cfg(test)]
mod tests {
    use super::Plan;

    #[test]
    fn plans_widen_to_whole_blocks() {
        let p = Plan::new(100, 50, 512);
        assert_eq!(
            (p.a0, p.a1, p.head, p.tail, p.m0, p.m1),
            (0, 512, true, None, 100, 100)
        );
        let p = Plan::new(100, 1000, 512);
        assert_eq!(
            (p.a0, p.a1, p.head, p.tail, p.m0, p.m1),
            (0, 1536, true, Some(1024), 512, 1024)
        );
        let p = Plan::new(512, 1024, 512);
        assert_eq!(
            (p.a0, p.a1, p.head, p.tail, p.m0, p.m1),
            (512, 1536, false, None, 512, 1536)
        );
        let p = Plan::new(512, 700, 512);
        assert_eq!(
            (p.a0, p.a1, p.head, p.tail, p.m0, p.m1),
            (512, 1536, false, Some(1024), 512, 1024)
        );
        assert_eq!(p.user_count(1024), 700);
        assert_eq!(p.user_count(512), 512);
    }
}
