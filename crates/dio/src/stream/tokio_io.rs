//! tokio's I/O traits on the streams (feature `tokio`): [`DioReader`] is
//! `AsyncRead + AsyncBufRead + AsyncSeek`, [`DioWriter`] is `AsyncWrite + AsyncSeek`.
//!
//! See the `stream` module docs for what runs where and for cancellation.
//!
//! ```
//! # use std::sync::Arc;
//! # use dio::{DirectFile, FileState, IdentityMap, MemDevice, MemDeviceConfig};
//! use dio::stream::{DioReader, DioWriter};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! # let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(4 << 20, 512)));
//! # let file = DirectFile::new(dev, Arc::new(IdentityMap::new(4096, 4 << 20)), Arc::new(FileState::new(0))).unwrap();
//! # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! # rt.block_on(async {
//! let mut w = DioWriter::new(file.clone());
//! w.write_all(b"hello, direct world").await.unwrap();
//! w.shutdown().await.unwrap();
//! let mut text = String::new();
//! DioReader::new(&file).read_to_string(&mut text).await.unwrap();
//! assert_eq!(text, "hello, direct world");
//! # });
//! ```

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::stream::{DioReader, DioWriter, StreamFile};

impl AsyncRead for DioReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let out = buf.initialize_unfilled();
        match this.poll_read_into(Some(cx), out) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncBufRead for DioReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        match this.fill(Some(cx)) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(this.buffered())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().advance(amt);
    }
}

impl AsyncSeek for DioReader {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.get_mut().seek_to(position).map(drop)
    }
    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.position()))
    }
}

impl<F: StreamFile + Unpin> AsyncWrite for DioWriter<F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_from(Some(cx), buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_all(Some(cx))
    }

    /// Writes the tail, waits for every write, sets the final size and, with
    /// `sync_on_finish`, flushes the device (on the blocking pool).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sync_job.is_none() && !this.is_finished() {
            match this.poll_flush_all(Some(cx)) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            this.settle()?;
            if this.wants_sync() {
                let file = this.file().clone();
                this.sync_job = Some(tokio::task::spawn_blocking(move || file.sync_data()));
            }
        }
        let Some(job) = this.sync_job.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let done = match Pin::new(job).poll(cx) {
            Poll::Ready(done) => done,
            Poll::Pending => return Poll::Pending,
        };
        this.sync_job = None;
        Poll::Ready(match done {
            Ok(r) => r.map_err(io::Error::from),
            Err(join) => Err(io::Error::other(join)),
        })
    }
}

use std::future::Future;

impl<F: StreamFile + Unpin> AsyncSeek for DioWriter<F> {
    /// The seek happens in `poll_complete`, once the writes before it are done.
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        if this.pending_seek.is_some() {
            return Err(io::Error::other("a seek is already in progress"));
        }
        this.pending_seek = Some(position);
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        let Some(to) = this.pending_seek else {
            return Poll::Ready(Ok(this.position()));
        };
        match this.poll_seek(Some(cx), to) {
            Poll::Ready(r) => {
                this.pending_seek = None;
                Poll::Ready(r)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
