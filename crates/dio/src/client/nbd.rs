//! The NBD client: an export on an NBD server as a [`DirectFile`] over the identity
//! map, like [`crate::client::RawFile`] for host files. Its size is the export's; it
//! cannot grow. [`NbdFile::extents`] lists data and holes (`base:allocation`) so a
//! copy can skip what reads as zeros, as nbdcopy does.
//!
//! It holds no I/O logic of its own: bytes move through the engine and the device.

pub use crate::device::nbd::{
    Address, Allocation, NbdConfig, NbdDevice, NbdUri, TlsOptions, DEFAULT_PORT, MAX_REQUEST,
};
use std::sync::Arc;

use std::cell::Cell;

use crate::device::{Device, Op};
use crate::map::{BlockMap, Extent, Private};
use crate::{DirectFile, Error, FileState, IdentityMap, Result};

/// The identity map of an export, with a fixed size: a write that would pass the
/// export's end fails with `ENOSPC` (a block device's answer) instead of the server
/// or the device dropping the bytes past it, and the size never changes.
///
/// An export whose size is not a multiple of the block ends inside its last block.
/// A write covering that block goes to the device whole and the device clips it at
/// the export's end, so whether the caller's bytes fit is checked at the end of the
/// call: a byte-granular write's own end in [`BlockMap::trim_padding`], any other
/// write's end in [`BlockMap::end_io`].
struct ExportMap {
    identity: IdentityMap,
    /// Blocks holding at least one byte of the export (the last may be partial).
    blocks: u64,
    block_size: u32,
    size: u64,
    uri: String,
}

thread_local! {
    /// Set by [`ExportMap::trim_padding`] when a byte-granular write ends inside the
    /// export, and taken by the [`ExportMap::end_io`] that follows it in the same
    /// call's finish, on the same thread.
    static TAIL_CHECKED: Cell<bool> = const { Cell::new(false) };
}

impl ExportMap {
    /// Whether the export ends inside its last block.
    fn ends_mid_block(&self) -> bool {
        self.size % u64::from(self.block_size) != 0
    }

    fn past_end(&self, end: u64) -> Error {
        Error::os(
            format!(
                "{}: write past the end of the export ({} bytes) to byte {end}",
                self.uri, self.size
            ),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        )
    }
}

impl BlockMap for ExportMap {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&self, block: u64, max_blocks: u64, create: bool) -> Result<Extent> {
        if create && block >= self.blocks {
            return Err(self.past_end((block + 1) * u64::from(self.block_size)));
        }
        self.identity.map(block, max_blocks, create)
    }

    fn max_file_size(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }

    fn has_end_io(&self) -> bool {
        self.ends_mid_block()
    }

    fn end_io(
        &self,
        op: Op,
        offset: u64,
        result: Result<usize>,
        _private: Option<&Private>,
    ) -> Result<usize> {
        if op != Op::Write {
            return result;
        }
        let checked = TAIL_CHECKED.with(|c| c.replace(false));
        let n = result?;
        // The call covered the partial last block: its padded end passes the
        // export's. A byte-granular write had its own end checked; any other
        // wrote bytes past the end that the device dropped.
        let end = offset.saturating_add(n as u64);
        if end > self.size && !checked {
            return Err(self.past_end(end));
        }
        Ok(n)
    }

    fn can_resize(&self, size: u64) -> Result<()> {
        if size == self.size {
            return Ok(());
        }
        Err(Error::os(
            format!(
                "{}: an NBD export keeps its size ({} bytes), cannot become {size}",
                self.uri, self.size
            ),
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ))
    }

    /// A byte-granular write into the export's partial last block: its padding
    /// is clipped by the device; its bytes past the export's end fail it.
    fn trims_padding(&self) -> bool {
        self.ends_mid_block()
    }

    fn trim_padding(&self, size: u64) -> Result<()> {
        if size > self.size {
            return Err(self.past_end(size));
        }
        TAIL_CHECKED.with(|c| c.set(true));
        Ok(())
    }
}

/// An NBD export open for direct I/O. See the module docs.
pub struct NbdFile {
    direct: DirectFile,
    dev: Arc<NbdDevice>,
    // Boxed: TLS settings make a URI large, and files move by value.
    uri: Box<NbdUri>,
    notes: Vec<String>,
}

impl std::fmt::Debug for NbdFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdFile")
            .field("uri", &self.uri.to_string())
            .field("size", &self.size())
            .finish()
    }
}

impl NbdFile {
    /// Connect to `uri` and open its export; `write` asks for a writable file (an
    /// export the server serves read-only then fails with `EROFS`).
    pub fn open(uri: &NbdUri, write: bool, cfg: &NbdConfig) -> Result<NbdFile> {
        let dev = Arc::new(NbdDevice::connect(uri, cfg)?);
        if write && dev.is_read_only() {
            return Err(Error::os(
                format!("{uri}: the server exports it read-only"),
                std::io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        let mut notes = Vec::new();
        if !dev.structured_replies() {
            notes.push(format!(
                "{uri}: the server has no structured replies: holes are read as zeros"
            ));
        } else if !dev.can_block_status() {
            notes.push(format!(
                "{uri}: the server has no base:allocation block status: every block is copied"
            ));
        }
        if cfg.connections > 1 && dev.connections() < cfg.connections {
            notes.push(if dev.can_multi_conn() {
                format!(
                    "{uri}: {} of {} connections opened (the server took no more)",
                    dev.connections(),
                    cfg.connections
                )
            } else {
                format!("{uri}: the server does not allow multi-conn: one connection")
            });
        }
        let geometry = dev.geometry();
        let size = dev.export_size();
        let map = Arc::new(ExportMap {
            identity: IdentityMap::new(geometry.logical_block, geometry.size),
            blocks: geometry.size.div_ceil(u64::from(geometry.logical_block)),
            block_size: geometry.logical_block,
            size,
            uri: uri.to_string(),
        });
        let device: Arc<dyn Device> = Arc::clone(&dev) as Arc<dyn Device>;
        let mut direct = DirectFile::new(device, map, Arc::new(FileState::new(size)))?;
        if !write {
            direct = direct.read_only();
        }
        Ok(NbdFile {
            direct,
            dev,
            uri: Box::new(uri.clone()),
            notes,
        })
    }

    /// Parse an NBD URI and open it (see [`NbdUri::parse`]).
    pub fn open_uri(uri: &str, write: bool, cfg: &NbdConfig) -> Result<NbdFile> {
        NbdFile::open(&NbdUri::parse(uri)?, write, cfg)
    }

    /// The export as a [`DirectFile`]: identity map, fs block = the device's
    /// logical block, size = the export size.
    pub fn direct(&self) -> &DirectFile {
        &self.direct
    }

    /// The NBD device (capabilities, trim, write zeroes, block status).
    pub fn device(&self) -> &Arc<NbdDevice> {
        &self.dev
    }

    /// The export size in bytes.
    pub fn size(&self) -> u64 {
        self.dev.export_size()
    }

    /// Where it is.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// One-line notes about what the server lacks.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Data and holes of `[offset, offset + len)`, clipped to the export: adjacent
    /// extents covering the range, each a hole or zeros (skip it) or data (copy
    /// it). A server without block status reports everything as data.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Allocation>> {
        self.dev
            .allocation(offset, len)
            .map_err(|e| Error::os(format!("{}: block status", self.uri), e))
    }
}
