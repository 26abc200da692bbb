//! Sequential streams over any dio file with readahead and write-behind, as
//! `std::io` readers and writers (glommio's `DmaStreamReader`/`DmaStreamWriter` are
//! the model).
//!
//! Direct I/O has no page cache, so nothing reads ahead for you: a program that
//! reads a file in 64 KiB pieces through plain direct reads waits for the device
//! on every call. A [`DioReader`] keeps `buffers` reads of `buffer_size` bytes in
//! flight ahead of the caller through the engine's async calls; a [`DioWriter`]
//! gathers the caller's bytes into buffers of `buffer_size` and keeps up to
//! `buffers` writes in flight behind the caller. Both take any offset, any length
//! and any caller buffer size: the engine's byte-granular path
//! ([`Flags::UNALIGNED`]) writes partial blocks at the ends.
//!
//! They implement [`std::io::Read`], [`BufRead`] and [`Seek`] (the reader) and
//! [`std::io::Write`] and [`Seek`] (the writer), so `std::io::copy`, hashers,
//! compressors and archivers work on them; with the `tokio` feature they also
//! implement tokio's `AsyncRead`, `AsyncBufRead`, `AsyncWrite` and `AsyncSeek`.
//!
//! They work over any [`StreamFile`]: a [`DirectFile`] (the files of every client,
//! e.g. the one from `dio::ext::ExtFile::direct`), any [`Source`] (a [`RawFile`],
//! an NBD file, a `Box<dyn Source>`), or a reference, `Arc` or `Box` of one.
//!
//! ```
//! use std::io::{Read, Seek, SeekFrom, Write};
//! use std::sync::Arc;
//! use dio::stream::{DioReader, DioWriter};
//! use dio::{DirectFile, FileState, IdentityMap, MemDevice, MemDeviceConfig};
//!
//! let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(8 << 20, 512)));
//! let map = Arc::new(IdentityMap::new(4096, 8 << 20));
//! let file = DirectFile::new(dev, map, Arc::new(FileState::new(0))).unwrap();
//!
//! let mut w = DioWriter::new(file.clone());
//! for i in 0..1000u32 {
//!     writeln!(w, "line {i}").unwrap();
//! }
//! w.finish().unwrap(); // the tail, the final size, and any error
//!
//! let mut r = DioReader::new(&file);
//! r.seek(SeekFrom::Start(5)).unwrap();
//! let mut text = String::new();
//! r.read_to_string(&mut text).unwrap();
//! assert!(text.starts_with("0\nline 1\n"));
//! assert_eq!(file.size(), 8890);
//! ```
//!
//! # Memory safety of abandoned I/O
//!
//! Every read ahead and every write behind owns its buffer: the buffer moves into
//! the engine's async call and comes back with the completion. Dropping a stream
//! (or, with tokio, a future polling it) while requests are in flight therefore
//! never leaves a device reading or writing freed memory: the requests finish on
//! their own, and their buffers are freed when they complete. A dropped reader
//! simply stops waiting for its readahead.
//!
//! # With tokio (feature `tokio`)
//!
//! [`DioReader`] is also `tokio::io::AsyncRead + AsyncBufRead + AsyncSeek`, and
//! [`DioWriter`] `AsyncWrite + AsyncSeek`. tokio's own `File` cannot do direct I/O
//! (it runs buffered reads on its blocking pool); these run on the engine's async
//! calls: each read ahead or write behind is submitted to the device and its
//! completion wakes the task ([`DioFuture`]), so no runtime thread waits for the
//! device. On io_uring, whose completions are polled by default, the device's
//! watcher thread reaps them while a task waits ([`crate::Device::watch`]): the
//! task is not polled again until its read or write is done. The one exception is the device flush of
//! [`StreamOptions::sync_on_finish`] in `shutdown`, an `fdatasync`, which runs on
//! tokio's blocking pool.
//!
//! Every method is cancel-safe: a `read` or `write` future dropped before it
//! completes has moved no bytes (`poll_write` takes bytes only when it returns
//! `Ready`, `poll_read` hands them out only then), and the requests in flight stay
//! with the stream, which picks them up on the next call. Dropping the stream
//! itself (an aborted task, a `select!` branch that loses) is memory-safe as said
//! above, without any `unsafe`: the buffers belong to the requests. Dropping a
//! [`DioWriter`] that was not shut down blocks the thread until its writes are done
//! (see its Drop notes): in async code, `shutdown().await` it, which also returns
//! any error.

#[cfg(feature = "redb")]
pub(crate) mod redb;
#[cfg(feature = "tokio")]
mod tokio_io;

use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::buf::Window;
use crate::RawFile;
use crate::{AlignedBuf, Completed, DioFuture, DirectFile, Error, Flags, Result, Source};

/// A file a stream can run over: anything that has a [`DirectFile`].
pub trait StreamFile {
    /// The file, as the engine serves it.
    fn direct_file(&self) -> &DirectFile;

    /// Called when a writer finishes, after all its data is on the device, with the
    /// file's size: a client whose storage keeps a size of its own sets it here
    /// (a host file written through its device ends rounded up to a block; a
    /// [`RawFile`] truncates it to the exact size). The default does nothing: the
    /// engine's size is already exact.
    fn settle_len(&self, size: u64) -> Result<()> {
        let _ = size;
        Ok(())
    }
}

impl StreamFile for DirectFile {
    fn direct_file(&self) -> &DirectFile {
        self
    }
}

/// The whole-device clients ([`Source`]): a resizable one (a regular host file
/// open for writing) gets the exact size at the end, since its device writes whole
/// blocks.
macro_rules! source_stream_file {
    ($t:ty) => {
        impl StreamFile for $t {
            fn direct_file(&self) -> &DirectFile {
                Source::direct(self)
            }
            fn settle_len(&self, size: u64) -> Result<()> {
                if self.resizable() {
                    Source::set_len(self, size)?;
                }
                Ok(())
            }
        }
    };
}

source_stream_file!(RawFile);
source_stream_file!(dyn Source);
#[cfg(feature = "nbd")]
source_stream_file!(crate::nbd::NbdFile);

impl<T: StreamFile + ?Sized> StreamFile for &T {
    fn direct_file(&self) -> &DirectFile {
        (**self).direct_file()
    }
    fn settle_len(&self, size: u64) -> Result<()> {
        (**self).settle_len(size)
    }
}

impl<T: StreamFile + ?Sized> StreamFile for Arc<T> {
    fn direct_file(&self) -> &DirectFile {
        (**self).direct_file()
    }
    fn settle_len(&self, size: u64) -> Result<()> {
        (**self).settle_len(size)
    }
}

impl<T: StreamFile + ?Sized> StreamFile for Box<T> {
    fn direct_file(&self) -> &DirectFile {
        (**self).direct_file()
    }
    fn settle_len(&self, size: u64) -> Result<()> {
        (**self).settle_len(size)
    }
}

/// How a stream buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Buffers in flight: reads ahead of the reader, writes behind the writer
    /// (at least 1).
    pub buffers: usize,
    /// Bytes per buffer; rounded up to a multiple of the file's block size. The
    /// reader's reads grow to this size (see [`DioReader`]); the writer's writes
    /// are this size.
    pub buffer_size: usize,
    /// Flags for every engine call (e.g. [`Flags::DSYNC`] for the writer).
    pub flags: Flags,
    /// Whether [`DioWriter::finish`] (and tokio's `shutdown`) flushes the device, so
    /// the data is durable when it returns.
    pub sync_on_finish: bool,
}

impl Default for StreamOptions {
    /// Four buffers of 4 MiB, no flags, no sync at finish. Large requests are what
    /// devices stream fastest (on a virtio disk, four 1 MiB reads in flight read a
    /// cold file slower than four of 4 MiB: per request costs dominate); the
    /// reader starts small and grows its reads to this size only while reading
    /// goes on sequentially.
    fn default() -> Self {
        StreamOptions {
            buffers: 4,
            buffer_size: 4 << 20,
            flags: Flags::NONE,
            sync_on_finish: false,
        }
    }
}

impl StreamOptions {
    /// The buffer size for `file`: a multiple of its block size, at least one block.
    fn chunk_for(&self, file: &DirectFile) -> usize {
        let block = file.block_size() as usize;
        self.buffer_size.max(1).div_ceil(block) * block
    }
}

/// Wait for (`cx` = `None`) or poll the oldest future of a queue; the queue must
/// not be empty. The future leaves the queue once it is ready.
fn front_ready<T: Copy, B>(
    queue: &mut VecDeque<(T, DioFuture<B>)>,
    cx: Option<&mut Context<'_>>,
) -> Poll<(T, Completed<B>)> {
    match cx {
        None => {
            let (tag, fut) = queue.pop_front().expect("a call is in flight");
            Poll::Ready((tag, fut.wait()))
        }
        Some(cx) => {
            let (tag, fut) = queue.front_mut().expect("a call is in flight");
            let tag = *tag;
            match Pin::new(fut).poll(cx) {
                Poll::Ready(done) => {
                    queue.pop_front();
                    Poll::Ready((tag, done))
                }
                Poll::Pending => Poll::Pending,
            }
        }
    }
}

use std::future::Future;

/// The position a seek asks for, from the current position and the file size.
fn seek_target(pos: u64, size: u64, to: SeekFrom) -> io::Result<u64> {
    let target = match to {
        SeekFrom::Start(n) => Some(n),
        SeekFrom::End(d) => size.checked_add_signed(d),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
    };
    target.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "seek to a negative or overflowing position",
        )
    })
}

/// A chunk that has been read: `len` valid bytes of the file from `off`.
struct ReadChunk {
    off: u64,
    buf: AlignedBuf,
    len: usize,
}

/// A sequential reader with readahead. See the [module docs](self).
///
/// Reads ahead from where the caller reads, keeping `buffers` reads in flight.
/// As the kernel's readahead does, the reads start small where reading starts
/// (1/16 of `buffer_size`, at least a block) and double each time the caller
/// moves on to the next one, up to `buffer_size`: a reader that takes a few bytes
/// after a seek costs `buffers` small reads, a long sequential one gets large
/// reads (few requests per byte, which is what a device streams fastest). A seek inside
/// the reads already in flight keeps them; a seek elsewhere drops them (their
/// buffers are freed when the device is done with them) and starts again, small,
/// at the new position. The end of the file is its size when a read is issued: a
/// file that grows is read further by the next call.
pub struct DioReader {
    file: DirectFile,
    /// The largest read (bytes per buffer).
    chunk: usize,
    /// The first read after a (re)start.
    first: usize,
    block: u64,
    depth: usize,
    flags: Flags,
    pos: u64,
    cur: Option<ReadChunk>,
    /// Reads in flight, oldest first, with their file offsets and lengths
    /// (consecutive ranges).
    ahead: VecDeque<(Span, DioFuture<Window<AlignedBuf>>)>,
    /// The offset of the next read ahead.
    next: u64,
    /// The length of the next read ahead.
    next_len: usize,
    spare: Vec<AlignedBuf>,
}

impl std::fmt::Debug for DioReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DioReader")
            .field("pos", &self.pos)
            .field("buffer_size", &self.chunk)
            .field("buffers", &self.depth)
            .field("in_flight", &self.ahead.len())
            .finish()
    }
}

impl DioReader {
    /// A reader of `file` from offset 0 with [`StreamOptions::default`].
    pub fn new(file: &(impl StreamFile + ?Sized)) -> DioReader {
        DioReader::with_options(file, &StreamOptions::default())
    }

    /// A reader of `file` from offset 0.
    pub fn with_options(file: &(impl StreamFile + ?Sized), opts: &StreamOptions) -> DioReader {
        let file = file.direct_file().clone();
        let chunk = opts.chunk_for(&file);
        let block = file.block_size() as usize;
        let first = (chunk / 16).div_ceil(block).max(1) * block;
        DioReader {
            chunk,
            first,
            block: block as u64,
            depth: opts.buffers.max(1),
            flags: opts.flags,
            file,
            pos: 0,
            cur: None,
            ahead: VecDeque::new(),
            next: 0,
            next_len: first,
            spare: Vec::new(),
        }
    }

    /// The position of the next byte to read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The file.
    pub fn file(&self) -> &DirectFile {
        &self.file
    }

    /// Start reads until `depth` are in flight or the file ends.
    fn read_ahead(&mut self) {
        let size = self.file.size();
        while self.ahead.len() < self.depth && self.next < size {
            let buf = self.spare.pop().unwrap_or_else(|| {
                AlignedBuf::new(self.chunk, self.file.geometry().buffer_align())
            });
            // Not past the block that holds the end of the file.
            let end = size.div_ceil(self.block) * self.block;
            let len = (self.next_len as u64).min(end - self.next) as usize;
            let win = Window::new(buf, 0, len).expect("a read fits its buffer");
            let fut = self.file.read_future(self.next, vec![win], self.flags);
            self.ahead.push_back(((self.next, len), fut));
            self.next += len as u64;
        }
    }

    /// The bytes available at the position (empty at the end of the file).
    fn available(&self) -> &[u8] {
        match &self.cur {
            Some(c) if self.pos >= c.off && self.pos < c.off + c.len as u64 => {
                &c.buf[(self.pos - c.off) as usize..c.len]
            }
            _ => &[],
        }
    }

    /// Make the chunk holding the position current, waiting for it (`cx` = `None`)
    /// or polling it. Ready with nothing available means the end of the file.
    pub(crate) fn fill(&mut self, cx: Option<&mut Context<'_>>) -> Poll<io::Result<()>> {
        if !self.available().is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(c) = self.cur.take() {
            self.spare.push(c.buf);
        }
        if self.pos >= self.file.size() {
            return Poll::Ready(Ok(()));
        }
        // Reads ahead of bytes the caller skipped are of no use.
        while matches!(self.ahead.front(), Some(&((off, len), _)) if off + len as u64 <= self.pos) {
            self.ahead.pop_front();
        }
        if !matches!(self.ahead.front(), Some(&((off, _), _)) if off <= self.pos) {
            // Start again, small, at the block that holds the position.
            self.ahead.clear();
            self.next = self.pos - self.pos % self.block;
            self.next_len = self.first;
        }
        self.read_ahead();
        let ((off, _), done) = match front_ready(&mut self.ahead, cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return Poll::Pending,
        };
        let buf = done
            .bufs
            .into_iter()
            .next()
            .expect("one buffer per read")
            .into_inner();
        match done.result {
            Ok(len) => {
                self.cur = Some(ReadChunk { off, buf, len });
                // The caller is reading on: the next reads grow.
                self.next_len = (self.next_len * 2).min(self.chunk);
                self.read_ahead();
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                // Start over at the position on the next call.
                self.spare.push(buf);
                self.ahead.clear();
                Poll::Ready(Err(e.into()))
            }
        }
    }

    /// Copy what is available into `out`.
    fn copy_out(&mut self, out: &mut [u8]) -> usize {
        let have = self.available();
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        self.pos += n as u64;
        n
    }

    /// Move the position (no I/O: the next read starts there).
    pub(crate) fn seek_to(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_target(self.pos, self.file.size(), to)?;
        Ok(self.pos)
    }

    pub(crate) fn poll_read_into(
        &mut self,
        cx: Option<&mut Context<'_>>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match self.fill(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(self.copy_out(out))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn buffered(&self) -> &[u8] {
        self.available()
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n.min(self.available().len()) as u64;
    }
}

impl Read for DioReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.poll_read_into(None, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("a blocking wait is always ready"),
        }
    }
}

impl BufRead for DioReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self.fill(None) {
            Poll::Ready(Ok(())) => Ok(self.available()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => unreachable!("a blocking wait is always ready"),
        }
    }
    fn consume(&mut self, amt: usize) {
        self.advance(amt);
    }
}

impl Seek for DioReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.seek_to(pos)
    }
    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

/// A read's or a write behind's file offset and length.
type Span = (u64, usize);

/// The chunk a writer is filling: file bytes `[base + lo, base + hi)` are in
/// `buf[lo..hi]`; `base` is a multiple of the chunk size.
struct WriteChunk {
    base: u64,
    buf: AlignedBuf,
    lo: usize,
    hi: usize,
}

/// A sequential writer with write-behind. See the [module docs](self).
///
/// Bytes gather in a buffer of `buffer_size` (chunks aligned to multiples of it);
/// a full buffer goes to the device as one async write, with up to `buffers` of
/// them in flight while the caller goes on. Partial chunks (where writing starts,
/// after a seek or a flush, and the tail) go through the engine's byte-granular
/// path, which read-modify-writes the blocks they share with other data. Writes
/// overwrite; the file grows past its end and never shrinks.
///
/// # Errors, `finish` and `Drop`
///
/// A write behind the caller fails after `write` returned: its error is kept and
/// returned by the next `write`, `flush`, `seek` or [`DioWriter::finish`], and by
/// every call after it (the stream's data is no longer whole). Call
/// [`DioWriter::finish`] at the end: it writes the tail, waits for every write,
/// sets the final size ([`StreamFile::settle_len`]), flushes the device if
/// [`StreamOptions::sync_on_finish`] is set, and returns the first error.
///
/// Dropping a writer that was not finished does the same work (it blocks until
/// every write is done) but cannot return an error: as with `std::io::BufWriter`,
/// an error there is dropped with it. Finish writers whose data matters.
pub struct DioWriter<F: StreamFile = DirectFile> {
    target: F,
    file: DirectFile,
    chunk: usize,
    depth: usize,
    flags: Flags,
    sync: bool,
    pos: u64,
    cur: Option<WriteChunk>,
    /// Writes in flight, oldest first, with (file offset, length).
    behind: VecDeque<(Span, DioFuture<Window<AlignedBuf>>)>,
    spare: Vec<AlignedBuf>,
    /// The first failure of a write behind (sticky).
    error: Option<Error>,
    /// Whether any write was started (the final size needs settling).
    wrote: bool,
    finished: bool,
    /// A seek waiting for the writes before it (tokio's two-step seek).
    #[cfg(feature = "tokio")]
    pub(crate) pending_seek: Option<SeekFrom>,
    /// The device flush of tokio's `shutdown`, run off the runtime's threads.
    #[cfg(feature = "tokio")]
    pub(crate) sync_job: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl<F: StreamFile> std::fmt::Debug for DioWriter<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DioWriter")
            .field("pos", &self.pos)
            .field("buffer_size", &self.chunk)
            .field("buffers", &self.depth)
            .field("in_flight", &self.behind.len())
            .field("error", &self.error)
            .finish()
    }
}

impl<F: StreamFile> DioWriter<F> {
    /// A writer of `file` from offset 0 with [`StreamOptions::default`].
    pub fn new(file: F) -> DioWriter<F> {
        DioWriter::with_options(file, &StreamOptions::default())
    }

    /// A writer of `file` from offset 0.
    pub fn with_options(target: F, opts: &StreamOptions) -> DioWriter<F> {
        let file = target.direct_file().clone();
        DioWriter {
            chunk: opts.chunk_for(&file),
            depth: opts.buffers.max(1),
            flags: opts.flags | Flags::UNALIGNED,
            sync: opts.sync_on_finish,
            file,
            target,
            pos: 0,
            cur: None,
            behind: VecDeque::new(),
            spare: Vec::new(),
            error: None,
            wrote: false,
            finished: false,
            #[cfg(feature = "tokio")]
            pending_seek: None,
            #[cfg(feature = "tokio")]
            sync_job: None,
        }
    }

    /// The position of the next byte to write.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The file.
    pub fn file(&self) -> &DirectFile {
        &self.file
    }

    /// The error of a failed write behind, if one failed.
    fn check(&self) -> io::Result<()> {
        match &self.error {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Take one completed write behind.
    fn settle_one(&mut self, (off, len): (u64, usize), done: Completed<Window<AlignedBuf>>) {
        if let Some(w) = done.bufs.into_iter().next() {
            self.spare.push(w.into_inner());
        }
        let failure = match done.result {
            Ok(n) if n == len => None,
            Ok(n) => Some(Error::os(
                format!("stream write at offset {off}: {n} of {len} bytes written"),
                io::ErrorKind::WriteZero.into(),
            )),
            Err(e) => Some(e),
        };
        if self.error.is_none() {
            self.error = failure;
        }
    }

    /// Wait for (or poll) writes behind until at most `keep` are in flight.
    fn reap_to(&mut self, keep: usize, mut cx: Option<&mut Context<'_>>) -> Poll<()> {
        while self.behind.len() > keep {
            match front_ready(&mut self.behind, cx.as_deref_mut()) {
                Poll::Ready((at, done)) => self.settle_one(at, done),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    /// Send the current chunk (there must be room behind).
    fn send_current(&mut self) {
        let Some(c) = self.cur.take() else { return };
        if c.hi == c.lo {
            self.spare.push(c.buf);
            return;
        }
        let (off, len) = (c.base + c.lo as u64, c.hi - c.lo);
        let win = Window::new(c.buf, c.lo, len).expect("the window lies in the chunk");
        let fut = self.file.write_future(off, vec![win], self.flags);
        self.behind.push_back(((off, len), fut));
        self.wrote = true;
    }

    /// Accept bytes: waits for (or polls) a slot only when the current chunk is
    /// full and every slot is taken.
    pub(crate) fn poll_write_from(
        &mut self,
        cx: Option<&mut Context<'_>>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        if self.finished {
            return Poll::Ready(Err(io::Error::other("write after finish")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if matches!(&self.cur, Some(c) if c.hi == self.chunk) {
            if self.reap_to(self.depth - 1, cx).is_pending() {
                return Poll::Pending;
            }
            self.check()?;
            self.send_current();
        }
        let chunk = self.chunk;
        let pos = self.pos;
        let spare = &mut self.spare;
        let align = self.file.geometry().buffer_align();
        let c = self.cur.get_or_insert_with(|| {
            let base = pos - pos % chunk as u64;
            let at = (pos - base) as usize;
            WriteChunk {
                base,
                buf: spare.pop().unwrap_or_else(|| AlignedBuf::new(chunk, align)),
                lo: at,
                hi: at,
            }
        });
        let n = (chunk - c.hi).min(data.len());
        c.buf[c.hi..c.hi + n].copy_from_slice(&data[..n]);
        c.hi += n;
        self.pos += n as u64;
        // Send a full chunk at once if a slot is free.
        if c.hi == chunk && self.behind.len() < self.depth {
            self.send_current();
        }
        Poll::Ready(Ok(n))
    }

    /// Send the partial chunk and wait for (or poll) every write behind.
    pub(crate) fn poll_flush_all(
        &mut self,
        mut cx: Option<&mut Context<'_>>,
    ) -> Poll<io::Result<()>> {
        if self.cur.is_some() {
            if self.reap_to(self.depth - 1, cx.as_deref_mut()).is_pending() {
                return Poll::Pending;
            }
            self.send_current();
        }
        if self.reap_to(0, cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(self.check())
    }

    /// Move the position, once every write before it is done.
    pub(crate) fn poll_seek(
        &mut self,
        cx: Option<&mut Context<'_>>,
        to: SeekFrom,
    ) -> Poll<io::Result<u64>> {
        if let SeekFrom::Current(0) = to {
            // Just asking where we are: nothing to wait for.
            return Poll::Ready(self.check().map(|()| self.pos));
        }
        match self.poll_flush_all(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        self.pos = seek_target(self.pos, self.file.size(), to)?;
        Poll::Ready(Ok(self.pos))
    }

    /// What finishing does once every write is done: settle the size.
    pub(crate) fn settle(&mut self) -> Result<()> {
        self.finished = true;
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.wrote {
            self.target.settle_len(self.file.size())?;
        }
        Ok(())
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn wants_sync(&self) -> bool {
        self.sync
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Write the tail, wait for every write, set the final size, flush the device
    /// if [`StreamOptions::sync_on_finish`] is set; the first error of any of it.
    /// Returns the file's size.
    pub fn finish(mut self) -> Result<u64> {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> Result<u64> {
        if let Poll::Ready(Err(e)) = self.poll_flush_all(None) {
            self.finished = true;
            return Err(self
                .error
                .clone()
                .unwrap_or_else(|| Error::os("stream flush", e)));
        }
        self.settle()?;
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(self.file.size())
    }

    /// Wait for every write so far and flush the device: what was written is then
    /// durable. The stream goes on.
    pub fn sync(&mut self) -> Result<()> {
        if let Poll::Ready(Err(e)) = self.poll_flush_all(None) {
            return Err(self
                .error
                .clone()
                .unwrap_or_else(|| Error::os("stream flush", e)));
        }
        self.file.sync_data()
    }
}

impl<F: StreamFile> Write for DioWriter<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.poll_write_from(None, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("a blocking wait is always ready"),
        }
    }
    /// Sends the partial buffer and waits for every write behind (the data is on
    /// the device, not necessarily durable: see [`DioWriter::sync`]).
    fn flush(&mut self) -> io::Result<()> {
        match self.poll_flush_all(None) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("a blocking wait is always ready"),
        }
    }
}

impl<F: StreamFile> Seek for DioWriter<F> {
    /// Waits for the writes before the seek (two writes in flight at once may land
    /// in either order, so overlapping ones must not be).
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self.poll_seek(None, pos) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("a blocking wait is always ready"),
        }
    }
    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

impl<F: StreamFile> Drop for DioWriter<F> {
    /// Finishes an unfinished writer, blocking until every write is done; an error
    /// is lost here: call [`DioWriter::finish`] to see it.
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.finish_inner();
        }
    }
}
