//! The request builder: takes (memory, device offset, file offset) pieces from the
//! walk and grows device requests from them: a piece that continues the last memory
//! segment and the device range grows that segment; one that continues the request
//! on the device *and* in the file joins it as a new segment; anything else sends the
//! request and starts another. Limits (segments, bytes) and the boundary flag send at
//! once. Completed requests are reaped while submitting, so a huge call holds a
//! bounded number of requests. (seed: submit_page_section, dio_send_cur_page,
//! dio_new_bio, dio_bio_submit, dio_bio_reap)
//!
//! It knows nothing of block maps, holes or EOF: that is the walk's job.

use std::sync::Arc;

use super::complete::Dio;
use super::Shared;
use crate::buf::{Lender, MemRef, Segments};
use crate::device::{Op, Request};

/// Most requests one call keeps in flight before it waits for some to complete (the
/// seed reaps every 64 pages for the same reason: bounded memory per call).
pub const MAX_IN_FLIGHT: usize = 64;

/// The seed's BIO_MAX_PAGES: at most this many segments per request, whatever the
/// device allows.
pub const MAX_SEGMENTS: usize = 256;

struct Building {
    dev_offset: u64,
    file_offset: u64,
    len: u64,
    segments: Segments,
}

pub(crate) struct BioBuilder<'a> {
    dio: &'a Arc<Dio>,
    file: &'a Shared,
    op: Op,
    fua: bool,
    max_bytes: u64,
    max_segments: usize,
    poll: bool,
    lender: Lender<'a>,
    /// An untorn write: its one request goes out flagged atomic (the checks of
    /// `atomic.rs` made sure the walk builds exactly one).
    pub(crate) atomic: bool,
    /// This call's merges and splits, published to the file's stats once, when the
    /// builder goes (no shared counter touched per piece).
    merges: u64,
    splits: u64,
    /// The device's logical block and memory alignment: where a piece may be cut.
    lb: usize,
    mem_align: usize,
    cur: Option<Building>,
}

/// How much of `mem` fits in `room` bytes of a request: all of it, or the longest
/// prefix whose end leaves the rest a valid segment start (a multiple of the logical
/// block long, ending at a memory-aligned address). 0 when no such prefix fits (the
/// caller sends what it has and cuts again in a fresh request).
fn cut(mem: MemRef, room: usize, lb: usize, mem_align: usize) -> usize {
    if mem.len() <= room {
        return mem.len();
    }
    let mut take = room - room % lb;
    // Step back a logical block at a time until the rest starts aligned (both are
    // powers of two, so this ends within mem_align / lb steps).
    while take > 0 && (mem.addr() + take) % mem_align != 0 {
        take -= lb;
    }
    take
}

impl<'a> BioBuilder<'a> {
    pub(crate) fn new(
        dio: &'a Arc<Dio>,
        file: &'a Shared,
        op: Op,
        fua: bool,
        poll: bool,
        lender: Lender<'a>,
    ) -> BioBuilder<'a> {
        let geo = file.geometry;
        BioBuilder {
            dio,
            file,
            op,
            fua,
            max_bytes: u64::from(geo.max_bytes),
            max_segments: (geo.max_segments as usize).min(MAX_SEGMENTS),
            poll,
            lender,
            atomic: false,
            merges: 0,
            splits: 0,
            lb: geo.logical_block as usize,
            mem_align: (geo.mem_align as usize).max(1),
            cur: None,
        }
    }

    /// Add a piece: `mem` goes to device byte `dev_offset`, file byte `file_offset`.
    /// With `boundary`, the request is sent right after this piece.
    pub(crate) fn add(
        &mut self,
        mut mem: MemRef,
        mut dev_offset: u64,
        mut file_offset: u64,
        boundary: bool,
    ) {
        if let Some(cur) = &self.cur {
            if cur.dev_offset + cur.len != dev_offset || cur.file_offset + cur.len != file_offset {
                self.send();
            }
        }
        let mut parts = 0u64;
        while !mem.is_empty() {
            let cur = self.cur.get_or_insert_with(|| Building {
                dev_offset,
                file_offset,
                len: 0,
                segments: Segments::new(),
            });
            let room = (self.max_bytes - cur.len) as usize;
            let mut take = cut(mem, room, self.lb, self.mem_align);
            if take == 0 && cur.len == 0 {
                // Even a whole request cannot end where the rest is aligned (memory
                // alignment above the request limit): cut at the limit.
                take = room - room % self.lb;
            }
            if take == 0 {
                // No cut here leaves the rest aligned: start a new request.
                self.send();
                continue;
            }
            let piece = mem.slice(0, take);
            let grows = cur
                .segments
                .last()
                .is_some_and(|l| l.is_followed_by(&piece));
            if grows {
                let last = cur.segments.last_mut().expect("checked above");
                *last = last.joined(&piece);
            } else if cur.segments.len() == self.max_segments {
                self.send();
                continue;
            } else {
                cur.segments.push(piece);
            }
            if cur.len > 0 {
                self.merges += 1;
            }
            parts += 1;
            cur.len += take as u64;
            let full = cur.len == self.max_bytes || take < mem.len();
            mem = mem.slice(take, mem.len() - take);
            dev_offset += take as u64;
            file_offset += take as u64;
            if full {
                self.send();
            }
        }
        self.splits += parts.saturating_sub(1);
        if boundary {
            self.send();
        }
    }

    /// Send the request under assembly, if any.
    #[inline]
    pub(crate) fn send(&mut self) {
        let Some(b) = self.cur.take() else {
            return;
        };
        let dio = self.dio;
        // A sync call reaps before adding another request in flight; an async one
        // never waits: its requests over the bound queue up (see Dio::send_async).
        if !dio.is_async() {
            dio.wait_in_flight_at_most(&*self.file.dev, MAX_IN_FLIGHT - 1, self.poll);
        }
        dio.get();
        let mut req = Request::build(
            self.op,
            b.dev_offset,
            b.segments,
            self.fua,
            dio.clone(),
            b.file_offset,
            self.lender.keep(),
        );
        if self.atomic {
            req.set_atomic(true);
        }
        crate::trace::request_submitted!(req, b.file_offset);
        if dio.is_async() {
            dio.send_async(req, b.file_offset);
        } else {
            let file = self.file;
            file.map.submit_io(&*file.dev, req, b.file_offset);
        }
    }
}

impl Drop for BioBuilder<'_> {
    fn drop(&mut self) {
        // Unwinding from a panic in user code: send nothing more; the call waits only
        // for what is already in flight.
        if !std::thread::panicking() {
            self.send();
        }
        self.file.stats.add_cuts(self.merges, self.splits);
    }
}
