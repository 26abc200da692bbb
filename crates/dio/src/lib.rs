//! dio: a direct-I/O engine in user space.
//!
//! dio moves bytes between a caller's memory and a block device without the page
//! cache, the way Linux's generic O_DIRECT layer does: it asks a [`BlockMap`] (the
//! file system side) where each file block lives, walks the caller's buffers against
//! that map, merges the pieces into large device requests, submits them to a
//! [`Device`], and completes the call synchronously or asynchronously, with exact
//! rules for alignment, holes, end of file, freshly allocated blocks, errors and
//! truncate races.
//!
//! ```
//! use std::sync::Arc;
//! use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};
//!
//! let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
//! let map = Arc::new(IdentityMap::new(4096, 1 << 20));
//! let file = DirectFile::new(dev, map, Arc::new(FileState::new(1 << 20))).unwrap();
//! let mut buf = AlignedBuf::new(8192, 4096);
//! buf.fill(7);
//! assert_eq!(file.write_at(4096, &buf, Flags::NONE).unwrap(), 8192);
//! let mut back = AlignedBuf::new(8192, 4096);
//! assert_eq!(file.read_at(4096, &mut back, Flags::NONE).unwrap(), 8192);
//! assert_eq!(&back[..], &buf[..]);
//! ```

#![warn(missing_docs)]

pub mod buf;
pub mod device;
pub mod engine;
pub mod error;
pub mod file;
pub mod fs;
pub mod fsx;
pub mod map;
pub mod nbd_file;
pub mod raw;

pub use buf::{AlignedBuf, MemRef, OwnedBuf};
pub use device::{
    Completion, CompletionMode, Device, Geometry, MemDevice, MemDeviceConfig, Op, Request,
};
pub use engine::{Completed, DioFuture, DirectFile, Flags, Stats, MAX_IN_FLIGHT, MAX_SEGMENTS};
pub use error::{AlignPart, Error, Result};
pub use file::FileState;
pub use map::{BlockMap, Extent, IdentityMap, Mapping, Private, TestMap, TestMapConfig};
