//! A block map for tests and fsx: allocates on create, can preallocate unwritten
//! extents and punch holes, marks a boundary every K blocks, and can be told to fail.
//!
//! It behaves as a careful file system does: blocks allocated by a direct write stay
//! unwritten (read as zeros) until `end_io` reports the write succeeded, so readers
//! racing with a write into a hole never see stale device data.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(test)]
use super::Mapping;
use super::{BlockMap, Extent, Private};
use crate::device::Op;
use crate::{Error, Result};

/// How a [`TestMap`] behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TestMapConfig {
    /// fs block size in bytes.
    pub block_size: u32,
    /// Device size in fs blocks (allocation never goes past it).
    pub device_blocks: u64,
    /// Mark a boundary after every `k` file blocks (extents are cut there).
    pub boundary_every: Option<u64>,
    /// Ask for deferred completion on every mapping.
    pub defer_completion: bool,
    /// Attach the mapped file block as private data.
    pub private: bool,
    /// Most blocks returned by one call (0 = no limit).
    pub max_extent: u64,
    /// Hand out freed blocks again (so stale data exists on the device).
    pub reuse_freed: bool,
}

impl TestMapConfig {
    /// A map with `block_size`-byte blocks over `device_blocks` device blocks.
    pub fn new(block_size: u32, device_blocks: u64) -> Self {
        TestMapConfig {
            block_size,
            device_blocks,
            boundary_every: None,
            defer_completion: false,
            private: false,
            max_extent: 0,
            reuse_freed: true,
        }
    }
    /// Boundary every `k` blocks.
    pub fn boundary_every(mut self, k: u64) -> Self {
        self.boundary_every = Some(k.max(1));
        self
    }
    /// Deferred completion on every mapping.
    pub fn defer_completion(mut self) -> Self {
        self.defer_completion = true;
        self
    }
    /// Private data on every mapping.
    pub fn private(mut self) -> Self {
        self.private = true;
        self
    }
    /// Cap the extent length.
    pub fn max_extent(mut self, blocks: u64) -> Self {
        self.max_extent = blocks;
        self
    }
}

/// One recorded `end_io` call: op, offset, result (errno on error), private data.
pub type EndIoCall = (Op, u64, std::result::Result<usize, i32>, Option<u64>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    dev: u64,
    unwritten: bool,
}

#[derive(Debug, Default)]
struct State {
    blocks: BTreeMap<u64, Block>,
    next_free: u64,
    freed: Vec<u64>,
    fail_calls: Option<u64>,
    fail_blocks: Option<Range<u64>>,
    calls: u64,
    end_io_calls: Vec<EndIoCall>,
}

/// See the module docs.
#[derive(Debug)]
pub struct TestMap {
    cfg: TestMapConfig,
    state: Mutex<State>,
}

impl TestMap {
    /// A map as `cfg` describes, every block a hole.
    pub fn new(cfg: TestMapConfig) -> TestMap {
        TestMap {
            cfg,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alloc(&self, st: &mut State) -> Result<u64> {
        if self.cfg.reuse_freed {
            if let Some(b) = st.freed.pop() {
                return Ok(b);
            }
        }
        if st.next_free >= self.cfg.device_blocks {
            return Err(Error::os(
                "test map: no free device blocks",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        st.next_free += 1;
        Ok(st.next_free - 1)
    }

    /// Map file blocks `range` as written, at consecutive fresh device blocks.
    pub fn map_written(&self, range: Range<u64>) -> Result<()> {
        self.fill(range, false)
    }

    /// Preallocate file blocks `range` as unwritten extents (fallocate).
    pub fn preallocate(&self, range: Range<u64>) -> Result<()> {
        self.fill(range, true)
    }

    fn fill(&self, range: Range<u64>, unwritten: bool) -> Result<()> {
        let mut st = self.state();
        for fb in range {
            if st.blocks.contains_key(&fb) {
                continue;
            }
            let dev = self.alloc(&mut st)?;
            st.blocks.insert(fb, Block { dev, unwritten });
        }
        Ok(())
    }

    /// Punch a hole over file blocks `range`, freeing their device blocks.
    pub fn punch(&self, range: Range<u64>) {
        let mut st = self.state();
        let gone: Vec<u64> = st.blocks.range(range).map(|(&k, _)| k).collect();
        for k in gone {
            if let Some(b) = st.blocks.remove(&k) {
                st.freed.push(b.dev);
            }
        }
    }

    /// Fail the `n`th `map` call from now (1 = the next).
    pub fn fail_nth_call(&self, n: u64) {
        let mut st = self.state();
        st.fail_calls = Some(st.calls + n);
    }

    /// Fail every `map` call whose range touches file blocks `range`.
    pub fn fail_blocks(&self, range: Range<u64>) {
        self.state().fail_blocks = Some(range);
    }

    /// Stop failing.
    pub fn clear_failures(&self) {
        let mut st = self.state();
        st.fail_calls = None;
        st.fail_blocks = None;
    }

    /// The device block of a file block and whether it is unwritten.
    pub fn lookup(&self, block: u64) -> Option<(u64, bool)> {
        self.state()
            .blocks
            .get(&block)
            .map(|b| (b.dev, b.unwritten))
    }

    /// Every `end_io` call so far: op, offset, result (errno on error) and the
    /// private data as a file block.
    pub fn end_io_calls(&self) -> Vec<EndIoCall> {
        self.state().end_io_calls.clone()
    }

    /// `map` calls so far.
    pub fn calls(&self) -> u64 {
        self.state().calls
    }
}

impl BlockMap for TestMap {
    fn block_size(&self) -> u32 {
        self.cfg.block_size
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        let mut st = self.state();
        st.calls += 1;
        let end = block.saturating_add(max_blocks.max(1));
        if st.fail_calls == Some(st.calls)
            || st
                .fail_blocks
                .as_ref()
                .is_some_and(|r| r.start < end && block < r.end)
        {
            return Err(Error::os(
                format!("test map: injected failure mapping block {block}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let mut limit = max_blocks.max(1);
        if self.cfg.max_extent > 0 {
            limit = limit.min(self.cfg.max_extent);
        }
        let mut boundary = false;
        if let Some(k) = self.cfg.boundary_every {
            let to_boundary = k - block % k;
            if to_boundary <= limit {
                limit = to_boundary;
                boundary = true;
            }
        }
        let first = st.blocks.get(&block).copied();
        let mut ext = match first {
            Some(b) => {
                // The longest run of blocks contiguous on the device in one state.
                let mut len = 1;
                while len < limit {
                    match st.blocks.get(&(block + len)) {
                        Some(n) if n.dev == b.dev + len && n.unwritten == b.unwritten => len += 1,
                        _ => break,
                    }
                }
                if b.unwritten {
                    Extent::unwritten(b.dev, len)
                } else {
                    Extent::mapped(b.dev, len)
                }
            }
            None => {
                // The hole runs to the next mapped block.
                let next = st
                    .blocks
                    .range(block..)
                    .next()
                    .map_or(u64::MAX, |(&k, _)| k);
                let hole = (next - block).min(limit);
                if !create {
                    // A hole past the limit keeps the boundary only if it reaches it.
                    let mut e = Extent::hole(hole);
                    e.boundary = boundary && hole == limit;
                    return Ok(decorate(e, &self.cfg, block));
                }
                // Allocate the hole as unwritten blocks, contiguous where possible;
                // end_io converts them once the write succeeded.
                let dev0 = self.alloc(&mut st)?;
                st.blocks.insert(
                    block,
                    Block {
                        dev: dev0,
                        unwritten: true,
                    },
                );
                let mut len = 1;
                while len < hole {
                    if st.freed.is_empty() || !self.cfg.reuse_freed {
                        if st.next_free != dev0 + len || st.next_free >= self.cfg.device_blocks {
                            break;
                        }
                    } else {
                        break;
                    }
                    let dev = self.alloc(&mut st)?;
                    st.blocks.insert(
                        block + len,
                        Block {
                            dev,
                            unwritten: true,
                        },
                    );
                    len += 1;
                }
                Extent::unwritten(dev0, len).new_blocks(true)
            }
        };
        ext.boundary = boundary && ext.len == limit;
        Ok(decorate(ext, &self.cfg, block))
    }

    fn end_io(
        &self,
        op: Op,
        offset: u64,
        result: Result<usize>,
        private: Option<&Private>,
    ) -> Result<usize> {
        let mut st = self.state();
        let private_block = private.and_then(|p| p.downcast_ref::<u64>().copied());
        let summary = result.as_ref().map(|&n| n).map_err(Error::errno);
        st.end_io_calls.push((op, offset, summary, private_block));
        if let (Op::Write, Ok(n)) = (op, &result) {
            // Convert the unwritten blocks the write filled. The engine zeroed the
            // uncovered parts of partly written new blocks, so whole blocks convert.
            let bs = u64::from(self.cfg.block_size);
            let first = offset / bs;
            let last = (offset + *n as u64).div_ceil(bs);
            for fb in first..last {
                if let Some(b) = st.blocks.get_mut(&fb) {
                    b.unwritten = false;
                }
            }
        }
        result
    }

    fn truncate(&self, size: u64) -> Result<()> {
        let first_gone = size.div_ceil(u64::from(self.cfg.block_size));
        self.punch(first_gone..u64::MAX);
        Ok(())
    }
}

fn decorate(mut e: Extent, cfg: &TestMapConfig, block: u64) -> Extent {
    if cfg.defer_completion {
        e.defer_completion = true;
    }
    if cfg.private {
        e.private = Some(Arc::new(block));
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_unwritten_until_end_io() {
        let m = TestMap::new(TestMapConfig::new(4096, 100));
        let e = m.map(3, 4, true).unwrap();
        assert!(e.new);
        assert_eq!(e.mapping, Mapping::Unwritten(0));
        assert_eq!(e.len, 4);
        m.end_io(Op::Write, 3 * 4096, Ok(4096), None).unwrap();
        assert_eq!(m.lookup(3), Some((0, false)));
        assert_eq!(m.lookup(4), Some((1, true)));
    }

    #[test]
    fn boundary_cuts_extents() {
        let m = TestMap::new(TestMapConfig::new(4096, 100).boundary_every(4));
        m.map_written(0..16).unwrap();
        let e = m.map(1, 10, false).unwrap();
        assert_eq!(e.len, 3);
        assert!(e.boundary);
        let e = m.map(4, 2, false).unwrap();
        assert_eq!(e.len, 2);
        assert!(!e.boundary);
    }
}
