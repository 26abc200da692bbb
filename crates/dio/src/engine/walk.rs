//! The walk: goes through the caller's memory and the file together, asks the block
//! map for extents, and hands (memory, device offset, file offset) pieces to the
//! request builder. It fills holes with zeros on reads, stops writes at holes, stops
//! reads at EOF, and zeroes the parts of freshly allocated (or unwritten) fs blocks
//! that a sub-block write does not cover. (seed: do_direct_IO, get_more_blocks,
//! dio_zero_block)
//!
//! It does not build or send requests: that is the builder's job.

use super::bio::BioBuilder;
use super::complete::Stop;
use crate::buf::{self, MemRef};
use crate::device::Op;
use crate::error::CorruptKind;
use crate::map::{Extent, Mapping};
use crate::Error;

/// The block map's answer for a call's first block, asked before the walk (by the
/// fast path): the result, or the payload of the map's panic.
pub(crate) type Looked = std::thread::Result<crate::Result<Extent>>;

/// Inputs of one walk.
pub(crate) struct Walk<'a> {
    pub op: Op,
    /// File byte offset and length of the request.
    pub offset: u64,
    pub len: u64,
    /// fs block size.
    pub fs_block: u64,
    /// i_size sampled at the start.
    pub i_size: u64,
    /// The dio block: fs block or device logical block (EOF rounding unit).
    pub dio_block: u64,
    /// Device size in bytes.
    pub device_size: u64,
    /// Skip-holes: no allocation inside i_size.
    pub skip_holes: bool,
    /// The caller's memory, in order.
    pub mem: &'a [MemRef],
}

/// What the walk saw that the request layer needs.
#[derive(Default)]
pub(crate) struct Seen {
    /// Some extent was new or unwritten (metadata will change).
    pub allocated: bool,
}

/// What the walk keeps of the current extent: a few scalars, read field by field
/// from the map's answer rather than moving the whole `Extent` around.
#[derive(Clone, Copy)]
struct Cur {
    mapping: Mapping,
    boundary: bool,
    /// New or unwritten: metadata changes, uncovered parts get zeroed.
    fresh: bool,
}

/// The memory cursor over the caller's segments.
struct Cursor<'a> {
    mem: &'a [MemRef],
    idx: usize,
    off: usize,
}

impl Cursor<'_> {
    /// The next piece of at most `max` bytes, without consuming it.
    fn peek(&self, max: u64) -> MemRef {
        let m = self.mem[self.idx];
        let n = ((m.len() - self.off) as u64).min(max) as usize;
        m.slice(self.off, n)
    }
    fn advance(&mut self, n: usize) {
        self.off += n;
        while self.idx < self.mem.len() && self.off == self.mem[self.idx].len() {
            self.idx += 1;
            self.off = 0;
        }
    }
}

/// Run the walk, feeding `builder`; `pin`, if any, is asked for every memory piece before it
/// is used and may refuse it (a memory fault). Returns bytes walked, and stores how
/// it stopped in `stop` (in place: the caller's slot is written once, not moved).
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk(
    w: &Walk<'_>,
    builder: &mut BioBuilder<'_>,
    map: &dyn crate::BlockMap,
    first: Option<Looked>,
    on_extent: impl FnMut(&Extent),
    pin: Option<&mut dyn FnMut(MemRef) -> bool>,
    seen: &mut Seen,
    stop: &mut Stop,
) -> u64 {
    let (walked, s) = walk_inner(w, builder, map, first, on_extent, pin, seen);
    *stop = s;
    walked
}

#[inline(always)]
fn walk_inner(
    w: &Walk<'_>,
    builder: &mut BioBuilder<'_>,
    map: &dyn crate::BlockMap,
    mut first: Option<Looked>,
    mut on_extent: impl FnMut(&Extent),
    mut pin: Option<&mut dyn FnMut(MemRef) -> bool>,
    seen: &mut Seen,
) -> (u64, Stop) {
    // No pin step: every piece is usable.
    let mut pin = |m: MemRef| pin.as_mut().is_none_or(|p| p(m));
    let fs = w.fs_block;
    // Block sizes are powers of two: shifts and masks, no division on the hot path.
    let sh = fs.trailing_zeros();
    let mask = fs - 1;
    let end = w.offset + w.len;
    let mut pos = w.offset;
    let mut cur = Cursor {
        mem: w.mem,
        idx: 0,
        off: 0,
    };
    cur.advance(0);
    // The current extent: bytes left in it from `pos`, and the device byte for `pos`.
    let mut ext: Option<Cur> = None;
    let mut left = 0u64;
    let mut dev_pos = 0u64;
    // Reads stop at EOF rounded up to the dio block (a partial last block is read).
    let eof = w.i_size.saturating_add(w.dio_block - 1) & !(w.dio_block - 1);

    let stop = loop {
        if pos >= end {
            break Stop::Clean;
        }
        if left == 0 {
            let block = pos >> sh;
            let count = ((end - 1) >> sh) - block + 1;
            // With skip-holes, no allocation inside i_size (guard the empty file:
            // the seed's (i_size - 1) underflowed there).
            let inside = w.i_size > 0 && block <= (w.i_size - 1) >> sh;
            let create = w.op == Op::Write && !(w.skip_holes && inside);
            // The first answer may have been asked already (for the same block,
            // count and create: the fast path of a read); a panic in that lookup
            // goes on from here, as one in this walk's own lookups would.
            let r = match first.take() {
                Some(Ok(r)) => r,
                Some(Err(payload)) => std::panic::resume_unwind(payload),
                None => map.map(block, count, create),
            };
            let e = match &r {
                Ok(e) => e,
                Err(_) => break Stop::Error(r.expect_err("matched an error")),
            };
            if e.len == 0 {
                break Stop::Error(Error::corrupt(
                    CorruptKind::BlockMap,
                    format!("block map returned an empty extent at file block {block}"),
                ));
            }
            let len = e.len.min(count);
            if let Some(b) = e.device_block() {
                let dev_blocks = w.device_size >> sh;
                if b.checked_add(len).is_none_or(|e| e > dev_blocks) {
                    break Stop::Error(Error::BeyondDevice {
                        block: b,
                        len,
                        device_blocks: dev_blocks,
                    });
                }
                dev_pos = b * fs + (pos & mask);
            }
            on_extent(e);
            left = len * fs - (pos & mask);
            let fresh = e.new || matches!(e.mapping, Mapping::Unwritten(_));
            if w.op == Op::Write && fresh {
                seen.allocated = true;
            }
            // A write starting inside a fresh block zeroes the block's head first.
            if w.op == Op::Write && fresh && (pos & mask) != 0 {
                let head = pos & mask;
                builder.add(
                    buf::zeroes(head as usize),
                    dev_pos - head,
                    pos - head,
                    false,
                );
            }
            ext = Some(Cur {
                mapping: e.mapping,
                boundary: e.boundary,
                fresh,
            });
        }
        let e = ext.expect("extent mapped above");
        let readable_zeros = matches!(e.mapping, Mapping::Hole)
            || (w.op == Op::Read && matches!(e.mapping, Mapping::Unwritten(_)));
        if readable_zeros {
            if w.op == Op::Write {
                // The seed's ENOTBLK: the rest is the caller's job.
                break Stop::Clean;
            }
            if pos >= eof {
                break Stop::Clean;
            }
            let n = left.min(end - pos).min(eof - pos);
            let mut done = 0;
            while done < n {
                let piece = cur.peek(n - done);
                if !pin(piece) {
                    return (pos - w.offset, Stop::MemoryFault(pos - w.offset));
                }
                piece.zero();
                cur.advance(piece.len());
                done += piece.len() as u64;
                pos += piece.len() as u64;
            }
            left -= n;
            dev_pos += n;
            continue;
        }
        let piece = cur.peek(left.min(end - pos));
        let n = piece.len() as u64;
        if !pin(piece) {
            if w.op == Op::Write {
                // The blocks are mapped (maybe freshly allocated): never leave them
                // holding old data. Write zeros to the rest of this extent within the
                // request, then report the fault.
                let fault_at = pos - w.offset;
                let mut zpos = pos;
                let zend = (pos + left).min(end);
                let mut zdev = dev_pos;
                while zpos < zend {
                    let z = (zend - zpos).min(buf::ZERO_LEN as u64);
                    builder.add(buf::zeroes(z as usize), zdev, zpos, false);
                    zpos += z;
                    zdev += z;
                }
                zero_tail(w, builder, &e, zend, zdev);
                return (fault_at, Stop::MemoryFault(fault_at));
            }
            return (pos - w.offset, Stop::MemoryFault(pos - w.offset));
        }
        let boundary = e.boundary && n == left;
        builder.add(piece, dev_pos, pos, boundary);
        cur.advance(piece.len());
        pos += n;
        dev_pos += n;
        left -= n;
    };
    if let Some(e) = ext {
        if matches!(stop, Stop::Clean) && pos == end {
            zero_tail(w, builder, &e, pos, dev_pos);
        }
    }
    (pos - w.offset, stop)
}

/// A write that ends inside a fresh block zeroes the block's tail.
fn zero_tail(w: &Walk<'_>, builder: &mut BioBuilder<'_>, e: &Cur, pos: u64, dev_pos: u64) {
    let fs = w.fs_block;
    let mask = fs - 1;
    if w.op == Op::Write && e.fresh && (pos & mask) != 0 {
        let tail = fs - (pos & mask);
        builder.add(buf::zeroes(tail as usize), dev_pos, pos, false);
    }
}
