//! Untorn writes ([`Flags::ATOMIC`](super::Flags::ATOMIC), the kernel's
//! `RWF_ATOMIC`): the checks that let the engine promise that such a write goes to
//! the device as exactly one request the device writes whole or not at all.
//!
//! A write may be untorn when the device offers atomic write units
//! ([`Geometry::atomic_write_units`](crate::Geometry::atomic_write_units)), its length
//! is a power of two within them, its file and device offsets are multiples of its
//! length, its memory fits the device's atomic segment limit, and the block map
//! maps the whole range as one run of written blocks (no hole to allocate, no
//! unwritten extent to convert, no fragment to split at). Anything else is refused
//! before a byte moves, with [`Error::Incompatible`] for [`Feature::AtomicWrite`]
//! naming the rule broken and the sizes the device takes.

use super::Shared;
use crate::buf::MemRef;
use crate::device::Op;
use crate::error::Feature;
use crate::map::Mapping;
use crate::{Error, Result};

fn refuse(why: String) -> Error {
    Error::incompatible(Feature::AtomicWrite, why)
}

/// What the device takes, for messages.
fn units(file: &Shared) -> String {
    match file.geometry.atomic_write_units() {
        Some((min, max)) => format!(
            "device \"{}\" takes untorn writes of powers of two from {min} to {max} bytes, \
             aligned to their length",
            file.dev.name()
        ),
        None => format!(
            "device \"{}\" reports no atomic write units (no untorn writes)",
            file.dev.name()
        ),
    }
}

/// An untorn call that would go through the byte-granular layer (bounce buffers
/// and read-modify-write): refused.
pub(crate) fn refuse_unaligned(file: &Shared, op: Op, offset: u64, len: u64) -> Error {
    if op == Op::Read {
        return refuse_read();
    }
    refuse(format!(
        "untorn write of {len} bytes at offset {offset}: offset, length and memory must be \
         aligned (no read-modify-write); {}",
        units(file)
    ))
}

fn refuse_read() -> Error {
    refuse("untorn (atomic) I/O applies to writes only".into())
}

/// The checks that need no block map: direction, units, length, alignment, memory.
pub(crate) fn check_call(
    file: &Shared,
    op: Op,
    offset: u64,
    len: u64,
    mem: &[MemRef],
) -> Result<()> {
    if op == Op::Read {
        return Err(refuse_read());
    }
    let geo = &file.geometry;
    if !geo.allows_atomic_write(offset, len) {
        return Err(refuse(format!(
            "untorn write of {len} bytes at file offset {offset}: {}",
            units(file)
        )));
    }
    let pieces = mem.iter().filter(|m| !m.is_empty()).count();
    let most = match geo.atomic_segments_max {
        0 => (geo.max_segments as usize).min(super::MAX_SEGMENTS),
        n => (n as usize).min(super::MAX_SEGMENTS),
    };
    if pieces > most {
        return Err(refuse(format!(
            "untorn write in {pieces} buffers: device \"{}\" takes at most {most} per untorn write",
            file.dev.name()
        )));
    }
    Ok(())
}

/// The check against the block map, under the call's range lock and in-flight
/// count (so no truncate changes the answer before the walk): the range must be one
/// run of written blocks, at a device offset aligned to the length.
pub(crate) fn check_mapped(file: &Shared, offset: u64, len: u64) -> Result<()> {
    let fs = u64::from(file.fs_block);
    let (first, last) = (offset / fs, (offset + len - 1) / fs);
    let count = last - first + 1;
    let e = file.map.map(first, count, false)?;
    let block = match e.mapping {
        Mapping::Mapped(b) if !e.new && e.len >= count => b,
        _ => {
            return Err(refuse(format!(
                "untorn write of {len} bytes at file offset {offset}: the range is not one run \
                 of allocated, written blocks (a hole, an unwritten extent or a fragment); \
                 write it once without the flag first"
            )))
        }
    };
    let dev = block * fs + offset % fs;
    if dev & (len - 1) != 0 {
        return Err(refuse(format!(
            "untorn write of {len} bytes at file offset {offset}: it maps to device byte {dev}, \
             not a multiple of its length; {}",
            units(file)
        )));
    }
    Ok(())
}
