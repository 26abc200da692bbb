//! Which parts of a file to move: its data segments (SEEK_DATA / SEEK_HOLE, so holes
//! are skipped) and their cutting into aligned chunks for the request pipeline.

use std::io;
use std::os::fd::BorrowedFd;

use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

/// The data segments `[start, end)` of a file of `size` bytes, in order, asked of the
/// kernel lazily (a huge sparse file costs no memory). Where the file system or the
/// device does not know SEEK_DATA, the whole file is one segment.
pub struct DataSegments<'fd> {
    fd: Option<BorrowedFd<'fd>>,
    pos: u64,
    size: u64,
}

impl<'fd> DataSegments<'fd> {
    /// The data segments of the file behind `fd`.
    pub fn of(fd: BorrowedFd<'fd>, size: u64) -> Self {
        DataSegments {
            fd: Some(fd),
            pos: 0,
            size,
        }
    }

    /// `[0, size)` as one segment, holes or not.
    pub fn whole(size: u64) -> Self {
        DataSegments {
            fd: None,
            pos: 0,
            size,
        }
    }
}

impl Iterator for DataSegments<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.size {
            return None;
        }
        let Some(fd) = self.fd else {
            let seg = (self.pos, self.size);
            self.pos = self.size;
            return Some(Ok(seg));
        };
        let start = match seek(fd, SeekFrom::Data(self.pos)) {
            Ok(d) => d,
            // No data after pos: the rest is a hole.
            Err(Errno::NXIO) => {
                self.pos = self.size;
                return None;
            }
            // SEEK_DATA unknown here: everything is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                self.fd = None;
                return self.next();
            }
            Err(e) => return Some(Err(e.into())),
        };
        if start >= self.size {
            self.pos = self.size;
            return None;
        }
        let end = match seek(fd, SeekFrom::Hole(start)) {
            Ok(h) => h.min(self.size),
            Err(e) => return Some(Err(e.into())),
        };
        // A hole reported at `start` itself would loop forever; take one byte as data.
        let end = end.max(start + 1);
        self.pos = end;
        Some(Ok((start, end)))
    }
}

/// One request of the pipeline: `len` bytes (a multiple of the block) at `off`, of
/// which `want` are inside the file (less than `len` only for the unaligned tail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub off: u64,
    pub len: usize,
    pub want: usize,
}

/// Data segments rounded out to `block` and cut into chunks of at most `max` bytes.
pub struct Chunks<'fd> {
    segments: DataSegments<'fd>,
    block: u64,
    max: u64,
    size: u64,
    /// The segment being cut, `[pos, end)`, aligned.
    pos: u64,
    end: u64,
}

impl<'fd> Chunks<'fd> {
    /// Chunks of a file of `size` bytes; `max` must be a multiple of `block`.
    pub fn new(segments: DataSegments<'fd>, block: u64, max: u64, size: u64) -> Self {
        debug_assert!(block > 0 && max >= block && max % block == 0);
        Chunks {
            segments,
            block,
            max,
            size,
            pos: 0,
            end: 0,
        }
    }
}

impl Iterator for Chunks<'_> {
    type Item = io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos >= self.end {
            let (start, end) = match self.segments.next()? {
                Ok(seg) => seg,
                Err(e) => return Some(Err(e)),
            };
            let b = self.block;
            let start = (start / b * b).max(self.end);
            let end = end.min(self.size).div_ceil(b) * b;
            self.pos = start;
            self.end = end;
        }
        let len = (self.end - self.pos).min(self.max);
        let off = self.pos;
        self.pos += len;
        let want = (off + len).min(self.size) - off;
        Some(Ok(Chunk {
            off,
            len: len as usize,
            want: want as usize,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(size: u64, block: u64, max: u64) -> Vec<Chunk> {
        Chunks::new(DataSegments::whole(size), block, max, size)
            .map(|c| c.unwrap())
            .collect()
    }

    #[test]
    fn empty_file_has_no_chunks() {
        assert!(cut(0, 512, 4096).is_empty());
    }

    #[test]
    fn unaligned_tail_is_one_padded_block() {
        let c = cut(4097, 512, 4096);
        assert_eq!(
            c,
            vec![
                Chunk {
                    off: 0,
                    len: 4096,
                    want: 4096
                },
                Chunk {
                    off: 4096,
                    len: 512,
                    want: 1
                },
            ]
        );
    }

    #[test]
    fn chunks_cover_the_file_exactly() {
        let size = (1 << 20) + 1;
        let c = cut(size, 4096, 1 << 18);
        assert_eq!(c.iter().map(|c| c.want as u64).sum::<u64>(), size);
        assert!(c.windows(2).all(|w| w[0].off + w[0].len as u64 == w[1].off));
    }
}
