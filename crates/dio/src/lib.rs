//! dio: a direct-I/O engine in user space.
//!
//! # What direct I/O is, and when to use it
//!
//! Direct I/O moves bytes between your memory and a block device without the page
//! cache: no second copy of the data in the kernel, no write-back you do not control,
//! no eviction of other programs' cached pages, and latency you can measure. Storage
//! engines, databases, backup and image tools use it when they manage their own
//! caching and durability. The price is alignment (offsets, lengths and memory
//! addresses in device-block units) and the loss of read-ahead: a workload that
//! rereads small files is better served by the page cache.
//!
//! dio is Linux's generic O_DIRECT layer (`fs/direct-io.c`) rebuilt as a library: it
//! asks a [`BlockMap`] (the file system side) where each file block lives, walks your
//! buffers against that map, merges the pieces into large device requests, submits
//! them to a [`Device`], and completes the call synchronously or asynchronously, with
//! exact rules for alignment, holes, end of file, freshly allocated blocks, errors and
//! truncate races.
//!
//! Open a host file (or block device) and read at any offset into any memory; dio
//! picks io_uring where the kernel allows it and pads what is not aligned:
//!
//! ```no_run
//! use dio::{RawFile, RawOptions};
//!
//! let file = RawFile::open("disk.img", &RawOptions::default())?;
//! let mut buf = [0u8; 100];
//! let n = file.read_at(12_345, &mut buf)?; // unaligned: bounced by the engine
//! println!("{n} bytes, backend {}", file.backend_name());
//! # Ok::<(), dio::Error>(())
//! ```
//!
//! Underneath is the plumbing, yours to combine: a [`Device`], a [`BlockMap`] and the
//! engine, [`DirectFile`], whose strict calls move aligned buffers without a copy:
//!
//! ```
//! use std::sync::Arc;
//! use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
//!
//! let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
//! let map = Arc::new(IdentityMap::new(4096, 1 << 20));
//! let file = DirectFile::new(dev, map, Arc::new(FileState::new(1 << 20))).unwrap();
//! let mut buf = AlignedBuf::new(8192, file.geometry().buffer_align());
//! buf.fill(7);
//! assert_eq!(file.write_at(4096, &buf, Flags::NONE).unwrap(), 8192);
//! let mut back = AlignedBuf::new(8192, file.geometry().buffer_align());
//! assert_eq!(file.read_at(4096, &mut back, Flags::NONE).unwrap(), 8192);
//! assert_eq!(&back[..], &buf[..]);
//! ```
//!
//! # The parts
//!
//! - [`BlockMap`]: the file system side (the seed's `get_block`). `map(block,
//!   max_blocks, create)` answers with an [`Extent`]: a hole, mapped or unwritten
//!   blocks, how many, and flags (`new`, `boundary`, `defer_completion`, private data
//!   for the [`BlockMap::end_io`] hook). [`IdentityMap`] serves raw files and block
//!   devices; [`ext`] maps files inside ext2/3/4 images; [`TestMap`] is a small
//!   allocating file system for tests. The `custom_map` example writes one.
//! - [`Device`]: where bytes go. `submit` a [`Request`] (one contiguous device range,
//!   many memory segments, an FUA flag) and get exactly one completion; `poll`,
//!   `flush`, and [`Geometry`] with the limits. Back ends: io_uring and pread/pwrite
//!   on O_DIRECT files and block devices ([`UringDevice`], [`SyncDevice`]), RAM
//!   with fault injection and crash simulation ([`MemDevice`]), and NBD exports
//!   ([`nbd::NbdDevice`]).
//! - [`DirectFile`]: the engine over one file: sync calls borrow your buffers
//!   ([`DirectFile::read`], [`DirectFile::write`]); async calls own them and complete
//!   through a callback ([`DirectFile::read_async`]) or a [`DioFuture`] that needs no
//!   particular executor ([`DirectFile::read_future`], [`DioFuture::wait`]).
//! - Clients, what users open: [`RawFile`] (a host file or block device, with the
//!   best back end), [`nbd::NbdFile`] (an NBD export), both [`Source`]s, opened from
//!   one string by [`open_source`]; and [`ext::ExtFile`] (a file inside an ext2/3/4
//!   image, through [`ext::Ext`]).
//!
//! # Layout
//!
//! One public path per item: the modules are private and re-exported flat here,
//! except three namespaces that carry meaning: [`ext`], [`nbd`] and [`probe`].
//!
//! | folder (`src/`) | owns |
//! | --- | --- |
//! | `engine/` | [`DirectFile`]: the walk of buffers against the map, bios, completion, unaligned I/O; `state.rs`: a file's [`FileState`] (size, in-flight count, range lock, truncate gate) |
//! | `map/` | [`BlockMap`] and its simple maps: [`IdentityMap`], the raw file's map, [`TestMap`] |
//! | `device/` | [`Device`], [`Request`], and the back ends: RAM, pread/pwrite, io_uring, NBD; the probe of host files ([`probe`]). With `buf.rs`, the only place `unsafe` is allowed |
//! | `stream/` | adapters to the Rust ecosystem: [`stream::DioReader`] and [`stream::DioWriter`] (readahead, write-behind; `std::io` and, with `tokio`, tokio's I/O traits), and with `redb` the `RedbBackend` |
//! | `client/` | what users open: [`RawFile`], [`nbd::NbdFile`], [`ext`]; the [`Source`] trait |
//! | `buf.rs` | aligned buffers, arenas, the memory a request may touch |
//! | `error.rs` | [`Error`] and its kinds |
//!
//! # Alignment
//!
//! A request's offset and every buffer length must be multiples of the device's
//! logical block, and buffer addresses multiples of its memory alignment; otherwise
//! the call fails with [`Error::Misaligned`] (EINVAL), naming the offending part and
//! the alignment required, and nothing is transferred. Ask with
//! [`DirectFile::dio_align`] (what statx(STATX_DIOALIGN) reports) and allocate with
//! [`AlignedBuf::new`] at [`Geometry::buffer_align`]; for async I/O on io_uring, a
//! [`BufArena`] registered once with the ring ([`RawFile::register_arena`])
//! lends out [`ArenaBuf`]s whose requests skip page pinning. Requests aligned to the file
//! system block are walked in fs blocks; finer ones in logical blocks, with partly
//! written new blocks zeroed. Or set [`Flags::UNALIGNED`] and use any offset, length
//! and address: dio pads with bounce buffers and read-modify-write, serialised against
//! every other write that shares a block (the kernel answers EINVAL here).
//!
//! # Sync or async
//!
//! Sync calls wait for their requests (polling the device if its completions need
//! polling, as io_uring's do). Async calls return at once and complete on whatever
//! thread reaps the device. Up to [`MAX_IN_FLIGHT`] requests of one call are in
//! flight at once, so a huge call pins a bounded amount of device queue: a sync
//! call reaps completed requests before it sends more; an async call never waits
//! for anything (it may run on a thread that delivers completions): its requests
//! over the bound queue up and go out as its completions arrive, and a call that
//! meets a lock (a byte range another write holds, the file lock of
//! [`Flags::LOCKING`], a truncate under way) parks itself and starts again when the
//! lock is released. A write that extends the file moves the size only once its
//! data is on the device, and unless [`Flags::ASYNC_EXTEND`] is set, it finishes
//! on dio's completion worker, where the map's `end_io` may block, rather than in
//! the device's completion context. The `async_reader` example keeps many calls in
//! flight with and without an executor.
//!
//! A completion callback may start new async calls (a chain of reads, say, or an
//! append): `tests/concurrency.rs` chains 10,000 calls, and 50 calls of 1,000
//! requests each, on every back end. It must not make a sync call on a device whose
//! completions a thread of its own delivers (a reaper thread, the pread pool, NBD's
//! reader), since that thread would then wait for a completion only it can deliver.
//!
//! # Locking
//!
//! With [`Flags::LOCKING`] (the seed's DIO_LOCKING), a read holds the file lock
//! shared while it looks blocks up and drops it before it waits for the device. A
//! write that may allocate (fill a hole, convert an unwritten extent, extend the
//! file) holds it exclusively until its data is on the device, so no locking reader
//! maps a fresh block before the data is there; an overwrite of mapped, written
//! blocks (checked by a lookup under the shared lock, as ext4 does) holds it shared.
//! Writes that share an fs block never run at once (the block range lock), and a
//! byte-granular write holds its range from the read of its partial blocks to its
//! write back, so [`DirectFile::truncate`], which takes the range it changes, never
//! runs between the two.
//!
//! # Errors
//!
//! Every error is an [`Error`]: misalignment, limits, corrupt or incompatible images,
//! device I/O errors with the device offset, memory faults; [`Error::errno`] gives the
//! errno a kernel caller would have seen. Precedence follows the kernel: an error
//! passed in (a map error) wins, then a memory fault, then an I/O error, else the byte
//! count; but where the bytes before a failure are certainly done, dio reports that
//! exact count instead of the error, so a retry can resume from an aligned position.
//!
//! # Guarantees, and the tests that prove them
//!
//! - **No stale data.** A read never returns bytes that were on the device before the
//!   file owned the block: holes and unwritten extents read as zeros, partly written
//!   new blocks are zeroed, a memory fault during a write leaves zeros in the blocks
//!   already mapped (`tests/engine.rs`: `partial_write_of_new_block_zeroes_the_rest_of_it`,
//!   `memory_fault_during_write_leaves_zeros_not_old_data_in_mapped_blocks`,
//!   `failed_write_into_unwritten_extent_reveals_no_old_data_generic_252`;
//!   `tests/model.rs` checks every read of random operation sequences against a byte
//!   model on a device pre-filled with 0xAA; `tests/races.rs`: readers of a hole
//!   being filled).
//! - **Exact partial counts.** A short result means exactly those bytes are done;
//!   a reported success means the data is there (`tests/engine.rs`:
//!   `eio_on_a_chosen_request_gives_the_error_or_the_exact_partial_count`;
//!   `tests/faults.rs` under random EIO injection).
//! - **Truncate exclusion.** [`DirectFile::truncate`] waits for in-flight direct I/O
//!   and for byte-granular writes between their read and their write back
//!   (`tests/concurrency.rs`: `truncate_and_read_modify_write_exclude_each_other_*`),
//!   zeroes the new last block through the map's `submit_io` hook,
//!   and calls that start meanwhile wait for it (sync calls block, async calls start
//!   when it is over, and [`Flags::NOWAIT`] calls get [`Error::WouldBlock`]), so none
//!   maps a block truncate frees
//!   (`truncate_waits_for_in_flight_io`; in `tests/races.rs`,
//!   `calls_starting_during_truncate_wait_for_it_and_see_the_new_size`,
//!   `async_calls_started_from_callbacks_during_truncate_neither_hang_nor_fail` and
//!   `truncates_racing_sync_readers_and_writers_show_only_data_or_zeros`).
//! - **Sub-block writes never lose each other's bytes** (fstests generic/240):
//!   `two_sub_block_writes_into_different_halves_of_one_new_block_both_survive_generic_240`,
//!   and for byte-granular writes the stress tests in `tests/unaligned.rs`.
//! - **Durability.** With [`Flags::DSYNC`] a completed write survives a crash
//!   (`dsync_makes_data_durable_before_completion`, on the RAM device's crash mode).
//!
//! # Soundness: what safe code cannot do
//!
//! A device reads or fills a request's memory after `submit` returns, so a request
//! must never outlive its memory. The types make that hold for any program without
//! `unsafe`:
//!
//! - A [`Request`] is built only over memory it owns ([`Request::with_buf`]), over
//!   the memory of a request it stands in for ([`Request::forward`]), or by the
//!   engine, whose borrowed memory is lent in a crate-private scope that waits for
//!   every request over it (also when user code panics). Raw memory needs the
//!   `unsafe` [`Request::from_raw_parts`], whose `# Safety` section is the whole
//!   obligation. Its fields are private.
//! - A completed request reaches its [`Completion`] as a [`Finished`], which has no
//!   memory and cannot be submitted again.
//! - A [`MemRef`] is an inert address range: no safe constructor, no way to lengthen
//!   it, no safe access through it. Safe devices move data with
//!   [`Request::copy_out`] and [`Request::copy_in`] (the RAM device is written so,
//!   with `forbid(unsafe_code)`).
//! - A dropped request completes itself with `ECANCELED`; a panicking completion is
//!   caught, so device threads go on: every request completes exactly once.
//!
//! Each door that used to be open is shut; these do not compile:
//!
//! ```compile_fail
//! // A reference lent by a scope cannot leave it: the scope is not public.
//! let mut b = dio::AlignedBuf::new(4096, 4096);
//! let m = dio::io_scope(|| {}, |s| s.lend_buf(&mut b[..]));
//! ```
//!
//! ```compile_fail
//! // A request from raw memory (a buffer about to be freed) needs `unsafe`.
//! use std::sync::Arc;
//! use dio::{AlignedBuf, Completion, Finished, MemRef, Op, Request};
//! struct Nop;
//! impl Completion for Nop {
//!     fn complete(self: Arc<Self>, _: Finished, _: std::io::Result<()>) {}
//! }
//! let mut b = AlignedBuf::new(4096, 4096);
//! let m = MemRef::from_raw(b.as_mut_ptr(), 4096);
//! ```
//!
//! ```compile_fail
//! use std::sync::Arc;
//! use dio::{Completion, Finished, Op, Request, Segments};
//! struct Nop;
//! impl Completion for Nop {
//!     fn complete(self: Arc<Self>, _: Finished, _: std::io::Result<()>) {}
//! }
//! let req = Request::from_raw_parts(Op::Read, 0, Segments::new(), false, Arc::new(Nop), 0);
//! ```
//!
//! ```compile_fail
//! // Requests have private fields: no struct literal over someone else's memory.
//! use std::sync::Arc;
//! use dio::{Completion, Finished, Op, Request, Segments};
//! struct Nop;
//! impl Completion for Nop {
//!     fn complete(self: Arc<Self>, _: Finished, _: std::io::Result<()>) {}
//! }
//! let req = Request { op: Op::Read, offset: 0, segments: Segments::new(), fua: false,
//!                     completion: Arc::new(Nop), tag: 0 };
//! ```
//!
//! ```compile_fail
//! // A memory reference cannot be grown past what was lent.
//! fn grow(m: dio::MemRef) -> dio::MemRef { m.grown(4096) }
//! ```
//!
//! ```compile_fail
//! // The arena's whole memory, slots lent out as `&mut` included, is not handed out.
//! let arena = dio::BufArena::new(4, 4096, 4096);
//! let all = arena.memory();
//! ```
//!
//! ```compile_fail
//! // A finished request cannot be submitted again.
//! use std::sync::Arc;
//! use dio::{Completion, Device, Finished, MemDevice, MemDeviceConfig};
//! struct Again(Arc<MemDevice>);
//! impl Completion for Again {
//!     fn complete(self: Arc<Self>, req: Finished, _: std::io::Result<()>) {
//!         self.0.submit(req);
//!     }
//! }
//! ```
//!
//! What safe code can do, a device of its own included:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use dio::{AlignedBuf, Completion, CompletionMode, Device, Finished, Geometry, Op, Request};
//!
//! /// A RAM disk in safe code.
//! struct Ram(Mutex<Vec<u8>>);
//! impl Device for Ram {
//!     fn geometry(&self) -> Geometry { Geometry::new(512, 1 << 20) }
//!     fn submit(&self, mut req: Request) {
//!         let (at, end) = (req.offset() as usize, (req.offset() + req.len()) as usize);
//!         let mut data = self.0.lock().unwrap();
//!         match req.op() {
//!             Op::Read => req.copy_in(0, &data[at..end]),
//!             Op::Write => req.copy_out(0, &mut data[at..end]),
//!         }
//!         drop(data);
//!         req.complete(Ok(()));
//!     }
//!     fn flush(&self) -> std::io::Result<()> { Ok(()) }
//!     fn name(&self) -> &str { "ram" }
//! }
//!
//! /// Gets the buffer back when the request is done.
//! struct Back(Mutex<Option<AlignedBuf>>);
//! impl Completion for Back {
//!     fn complete(self: Arc<Self>, mut req: Finished, r: std::io::Result<()>) {
//!         r.unwrap();
//!         *self.0.lock().unwrap() = req.take_buf::<AlignedBuf>();
//!     }
//! }
//!
//! let ram = Ram(Mutex::new(vec![7; 1 << 20]));
//! let back = Arc::new(Back(Mutex::new(None)));
//! ram.submit(Request::with_buf(Op::Read, 4096, AlignedBuf::new(4096, 4096), false, back.clone(), 0));
//! assert!(back.0.lock().unwrap().take().unwrap().iter().all(|&b| b == 7));
//! ```

#![warn(missing_docs)]
// `unsafe` lives only in the buffer and device layers; the compiler keeps it there.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

#[allow(unsafe_code)]
mod buf;
mod client;
#[allow(unsafe_code)]
mod device;
mod engine;
mod error;
mod map;
pub mod stream;
#[cfg_attr(not(feature = "tracing"), allow(unused_macros, unused_imports))]
pub mod trace;

pub use buf::{AlignedBuf, ArenaBuf, BufArena, MemRef, OwnedBuf, Segments, Window, HUGE_MIN};
#[cfg(feature = "ext")]
pub use client::ext;
#[cfg(feature = "nbd")]
pub use client::nbd;
pub use client::{open_source, Backend, DataRuns, RawFile, RawOptions, Run, Source};
pub use device::probe;
pub use device::{
    callback_panics, check_request, read_device, write_device, Completion, CompletionMode, Device,
    FaultConfig, FaultDevice, FaultStats, Finished, Geometry, LoggedRequest, MemDevice,
    MemDeviceConfig, MemStats, Op, Request, SyncConfig, SyncDevice,
};
pub use device::{DeviceWrapper, IoStats, LatencyHistogram, StatsDevice, LATENCY_BUCKETS};
#[cfg(feature = "io-uring")]
pub use device::{UringConfig, UringDevice, UringPlug};
pub use engine::{
    Completed, DioFuture, DirectFile, FileLockGuard, FileState, Flags, Stats, MAX_IN_FLIGHT,
    MAX_SEGMENTS,
};
pub use error::{
    AlignPart, Corrupt, CorruptKind, Error, Feature, Incompatible, PathError, PathErrorKind, Result,
};
pub use error::{TlsError, TlsErrorKind};
pub use map::{BlockMap, Extent, IdentityMap, Mapping, Private, TestMap, TestMapConfig};
#[cfg(feature = "redb")]
pub use stream::redb::{RedbBackend, RedbOptions};
