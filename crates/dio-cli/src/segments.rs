//! The cutting of a file's range into aligned chunks for the benchmark's request
//! loop.

use std::io;

/// The data segments `[start, end)` to cut: `[0, size)` whole. (A host file's
/// SEEK_DATA runs come from the library's `dio::DataRuns`.)
pub struct DataSegments {
    pos: u64,
    size: u64,
}

impl DataSegments {
    /// `[0, size)` as one segment, holes or not.
    pub fn whole(size: u64) -> Self {
        DataSegments { pos: 0, size }
    }
}

impl Iterator for DataSegments {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.size {
            return None;
        }
        let seg = (self.pos, self.size);
        self.pos = self.size;
        Some(Ok(seg))
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
pub struct Chunks {
    segments: DataSegments,
    block: u64,
    max: u64,
    size: u64,
    /// The segment being cut, `[pos, end)`, aligned.
    pos: u64,
    end: u64,
}

impl Chunks {
    /// Chunks of a file of `size` bytes; `max` must be a multiple of `block`.
    pub fn new(segments: DataSegments, block: u64, max: u64, size: u64) -> Self {
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

impl Iterator for Chunks {
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
