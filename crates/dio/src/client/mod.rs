//! The engine's clients: what users open. Raw host files and block devices
//! ([`RawFile`]), NBD exports ([`nbd::NbdFile`]), and files inside ext2/3/4 images
//! ([`ext`]). Each builds a device and a block map and serves file data through a
//! [`crate::DirectFile`]; none of them uses `unsafe`.
//!
//! The whole-device clients share one shape, the [`Source`] trait, and
//! [`open_source`] opens either from one string (a path or an NBD URI).

use std::fmt;
use std::sync::Arc;

use crate::{Device, DirectFile, Result};

#[cfg(feature = "ext")]
pub mod ext;
#[cfg(feature = "nbd")]
pub mod nbd;
mod raw;

pub use raw::{Backend, DataRuns, RawFile, RawOptions};

/// A byte range `[start, end)` of a source that holds data.
pub type Run = Result<(u64, u64)>;

/// What every whole-device client offers: a host file or block device
/// ([`RawFile`]), an NBD export ([`nbd::NbdFile`]). Generic code (a copy tool, a
/// benchmark) holds a `Box<dyn Source>` and never asks which it is.
pub trait Source: fmt::Debug + Send + Sync {
    /// The whole source as a file: the identity map over its device.
    fn direct(&self) -> &DirectFile;

    /// The device under it.
    fn device(&self) -> &Arc<dyn Device> {
        self.direct().device()
    }

    /// Its size in bytes (a regular file's current size).
    fn size(&self) -> u64 {
        self.direct().size()
    }

    /// One-line notes about fallbacks taken at open (io_uring unavailable, a
    /// server without block status, ...).
    fn notes(&self) -> &[String];

    /// The back end, for messages: `"uring"`, `"sync"` or `"nbd"`.
    fn backend_name(&self) -> &'static str;

    /// Whether [`Source::set_len`] can change the size (a regular host file open
    /// for writing); block devices and exports have a fixed size.
    fn resizable(&self) -> bool;

    /// Set the size (see [`RawFile::set_len`]); an error on a fixed-size source.
    fn set_len(&self, size: u64) -> Result<()>;

    /// The runs of `[0, end)` that hold data, in order: `SEEK_DATA`/`SEEK_HOLE`
    /// of a host file (asked lazily), block status of an export (what reads as
    /// zeros is left out), else `[0, end)` whole.
    fn data_runs(&self, end: u64) -> Box<dyn Iterator<Item = Run> + '_>;
}

/// Open `spec`: an NBD URI (`nbd://`, `nbd+unix://`) through
/// [`nbd::NbdFile::open_uri`], anything else as a host path through
/// [`RawFile::open`] with `opts` (whose `write` applies to both).
pub fn open_source(spec: &str, opts: &RawOptions) -> Result<Box<dyn Source>> {
    #[cfg(not(feature = "nbd"))]
    if spec
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.starts_with("nbd"))
    {
        return Err(crate::Error::incompatible(
            crate::Feature::Nbd,
            format!("{spec}: dio was built without its nbd feature"),
        ));
    }
    #[cfg(feature = "nbd")]
    if nbd::NbdUri::is_nbd_uri(spec) {
        let f = nbd::NbdFile::open_uri(spec, opts.write, &nbd::NbdConfig::default())?;
        return Ok(Box::new(f));
    }
    Ok(Box::new(RawFile::open(spec, opts)?))
}

impl Source for RawFile {
    fn direct(&self) -> &DirectFile {
        RawFile::direct(self)
    }

    fn notes(&self) -> &[String] {
        RawFile::notes(self)
    }

    fn backend_name(&self) -> &'static str {
        RawFile::backend_name(self)
    }

    fn resizable(&self) -> bool {
        !self.is_block_device() && self.is_writable()
    }

    fn set_len(&self, size: u64) -> Result<()> {
        RawFile::set_len(self, size)
    }

    fn data_runs(&self, end: u64) -> Box<dyn Iterator<Item = Run> + '_> {
        if self.is_block_device() {
            return Box::new(whole(end));
        }
        Box::new(DataRuns::of(self.fd(), end))
    }
}

#[cfg(feature = "nbd")]
impl Source for nbd::NbdFile {
    fn direct(&self) -> &DirectFile {
        nbd::NbdFile::direct(self)
    }

    fn notes(&self) -> &[String] {
        nbd::NbdFile::notes(self)
    }

    fn backend_name(&self) -> &'static str {
        "nbd"
    }

    fn resizable(&self) -> bool {
        false
    }

    fn set_len(&self, size: u64) -> Result<()> {
        if size == self.size() {
            return Ok(());
        }
        Err(crate::Error::incompatible(
            crate::Feature::Resize,
            format!("{}: an NBD export's size is fixed", self.uri()),
        ))
    }

    fn data_runs(&self, end: u64) -> Box<dyn Iterator<Item = Run> + '_> {
        let end = end.min(self.size());
        match self.extents(0, end) {
            Ok(ext) => Box::new(
                ext.into_iter()
                    .filter(|e| !e.zero)
                    .map(|e| Ok((e.offset, e.offset + e.len))),
            ),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }
}

/// `[0, end)` as one run (none when empty).
fn whole(end: u64) -> impl Iterator<Item = Run> {
    (end > 0).then_some(Ok((0, end))).into_iter()
}
