//! Tracing (feature `tracing`): the engine's spans and events, through macros of
//! dio's own that compile to nothing without the feature (their arguments are not
//! even evaluated), so a build without it pays nothing.
//!
//! With the feature, dio emits with the [`tracing`](https://docs.rs/tracing)
//! crate, under the target `dio`:
//!
//! - a span `dio.call` (level DEBUG) per engine call, with fields `op` ("read" or
//!   "write"), `offset` and `len` (file bytes), `file` (an id of the open file:
//!   the address of its [`FileState`](crate::FileState)) and `device` (its name). A
//!   sync call's span covers the whole call; an async call's covers its start,
//!   until its requests are submitted.
//! - an event `dio.submit` (level TRACE) per device request the engine submits,
//!   inside the call's span: `op`, `dev_offset`, `file_offset`, `len`, `segments`,
//!   `fua`, `atomic`;
//! - an event `dio.complete` (level TRACE) per device request completed, on the
//!   thread that completes it: `op`, `dev_offset`, `file_offset`, `len`, and `error`
//!   (the errno, 0 for success).
//!
//! Byte-granular calls ([`Flags::UNALIGNED`](crate::Flags::UNALIGNED)) show as a
//! span with the engine calls they make (reads of partial blocks, the write back)
//! nested inside.

/// Enter a span for one engine call; the guard lives to the end of the scope.
#[cfg(feature = "tracing")]
macro_rules! call_span {
    ($op:expr, $offset:expr, $len:expr, $file:expr) => {
        ::tracing::debug_span!(
            target: "dio",
            "dio.call",
            op = $crate::trace::op_name($op),
            offset = $offset,
            len = $len,
            file = ::std::sync::Arc::as_ptr(&$file.state) as usize,
            device = $file.dev.name(),
        )
        .entered()
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! call_span {
    ($($t:tt)*) => {
        ()
    };
}

/// An event for a device request submitted.
#[cfg(feature = "tracing")]
macro_rules! request_submitted {
    ($req:expr, $file_offset:expr) => {
        ::tracing::trace!(
            target: "dio",
            op = $crate::trace::op_name($req.op()),
            dev_offset = $req.offset(),
            file_offset = $file_offset,
            len = $req.len(),
            segments = $req.segments().len(),
            fua = $req.fua(),
            atomic = $req.atomic(),
            "dio.submit"
        )
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! request_submitted {
    ($($t:tt)*) => {
        ()
    };
}

/// An event for a device request completed.
#[cfg(feature = "tracing")]
macro_rules! request_completed {
    ($fin:expr, $result:expr) => {
        ::tracing::trace!(
            target: "dio",
            op = $crate::trace::op_name($fin.op()),
            dev_offset = $fin.offset(),
            file_offset = $fin.tag(),
            len = $fin.len(),
            error = $result.as_ref().err().map_or(0, |e| e.raw_os_error().unwrap_or(-1)),
            "dio.complete"
        )
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! request_completed {
    ($($t:tt)*) => {
        ()
    };
}

pub(crate) use {call_span, request_completed, request_submitted};

/// The name of a direction in spans and events.
#[cfg(feature = "tracing")]
pub(crate) fn op_name(op: crate::Op) -> &'static str {
    match op {
        crate::Op::Read => "read",
        crate::Op::Write => "write",
    }
}
