//! The block map of a raw file or block device: the identity, with a file's rules at
//! its end.

use std::os::fd::AsFd;
use std::path::PathBuf;

use crate::map::{BlockMap, Extent, IdentityMap};
use crate::{Error, Result};

/// The identity map of a raw file or device, with the file semantics at its end:
/// reads past the end are short (not an error), a write past the end of a block
/// device fails with `ENOSPC`, and a regular file's padded byte-granular writes are
/// cut back to the file size ([`BlockMap::trim_padding`]).
pub(crate) struct RawMap {
    pub(crate) identity: IdentityMap,
    pub(crate) blocks: u64,
    pub(crate) block_size: u32,
    pub(crate) path: PathBuf,
    /// The file, to shrink it (regular files open for writing).
    pub(crate) resize: Option<std::fs::File>,
}

impl BlockMap for RawMap {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        if create && block >= self.blocks {
            return Err(Error::os(
                format!("write past the end of {}", self.path.display()),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        self.identity.map(block, max_blocks, create)
    }

    fn max_file_size(&self) -> u64 {
        (i64::MAX as u64) / u64::from(self.block_size) * u64::from(self.block_size)
    }

    fn has_end_io(&self) -> bool {
        false
    }

    fn trims_padding(&self) -> bool {
        self.resize.is_some()
    }

    /// Cut a regular file grown by a padded last block back to the size (what
    /// `pwrite` without `O_DIRECT` would leave); never grows it.
    fn trim_padding(&self, size: u64) -> Result<()> {
        let Some(f) = &self.resize else {
            return Ok(());
        };
        let len = f
            .metadata()
            .map_err(|e| Error::os(format!("stat {}", self.path.display()), e))?
            .len();
        if len <= size {
            return Ok(());
        }
        crate::device::ftruncate(f.as_fd(), size).map_err(|e| {
            Error::os(
                format!(
                    "cut the padding of {} back to {size} bytes",
                    self.path.display()
                ),
                e,
            )
        })
    }

    fn truncate(&self, size: u64) -> Result<()> {
        match &self.resize {
            Some(f) => crate::device::ftruncate(f.as_fd(), size)
                .map_err(|e| Error::os(format!("truncate {} to {size}", self.path.display()), e)),
            None => Ok(()),
        }
    }
}
