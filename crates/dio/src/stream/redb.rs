//! redb on direct I/O (feature `redb`): [`RedbBackend`].

use std::io;

use crate::{DirectFile, Flags, RawFile};

/// Zeros written per call when a plain [`DirectFile`] grows.
const ZERO_CHUNK: usize = 1 << 20;

enum Target {
    Direct(DirectFile),
    Raw(RawFile),
}

/// A `redb::StorageBackend` over a dio file: a [`RawFile`] (a host file or block
/// device, via [`RedbBackend::raw`]) or any [`DirectFile`] (RAM, NBD, an ext
/// overwriter, via [`RedbBackend::new`]).
///
/// redb keeps its own page cache, so the kernel's is a second copy of every page;
/// over dio the database's reads and writes go straight to the device (byte-granular
/// calls, [`Flags::UNALIGNED`], as redb's offsets and buffers are not aligned for
/// direct I/O), and memory goes to redb's cache alone.
///
/// Over a host file: `RedbBackend::raw(RawFile::open(path, &RawOptions { write: true,
/// create: true, ..RawOptions::default() })?)`. Here over the RAM device:
///
/// ```
/// use std::sync::Arc;
/// use dio::{DirectFile, FileState, IdentityMap, MemDevice, MemDeviceConfig, RedbBackend};
/// use redb::{Database, ReadableDatabase, TableDefinition};
///
/// const TABLE: TableDefinition<u64, &str> = TableDefinition::new("t");
/// let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(64 << 20, 512)));
/// let map = Arc::new(IdentityMap::new(4096, 64 << 20));
/// let file = DirectFile::new(dev, map, Arc::new(FileState::new(0))).unwrap();
/// let db = Database::builder().create_with_backend(RedbBackend::new(file)).unwrap();
/// let tx = db.begin_write().unwrap();
/// tx.open_table(TABLE).unwrap().insert(1, "one").unwrap();
/// tx.commit().unwrap();
/// let rx = db.begin_read().unwrap();
/// assert_eq!(rx.open_table(TABLE).unwrap().get(1).unwrap().unwrap().value(), "one");
/// ```
///
/// Locking: the backend implements none of redb's range locks, so redb runs in its
/// default `ExclusiveWriter` concurrency mode and does not itself stop a second
/// process from opening the same storage; open each database from one process.
pub struct RedbBackend {
    target: Target,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file();
        f.debug_struct("RedbBackend")
            .field("device", &file.device().name())
            .field("len", &file.size())
            .finish()
    }
}

impl RedbBackend {
    /// A backend over `file`. Growing the storage writes zeros over the new bytes
    /// (the device may hold anything there); shrinking truncates the file.
    pub fn new(file: DirectFile) -> RedbBackend {
        RedbBackend {
            target: Target::Direct(file),
        }
    }

    /// A backend over a host file or block device: growing and shrinking a file
    /// go through `ftruncate` (new bytes are zeros without being written).
    pub fn raw(file: RawFile) -> RedbBackend {
        RedbBackend {
            target: Target::Raw(file),
        }
    }

    /// The file.
    pub fn file(&self) -> &DirectFile {
        match &self.target {
            Target::Direct(f) => f,
            Target::Raw(r) => r.direct(),
        }
    }
}

/// A short transfer as an error naming where.
fn short(what: &str, offset: u64, want: usize, got: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{what} at {offset}: {got} of {want} bytes"),
    )
}

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.file().size())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let n = self.file().read_at(offset, out, Flags::UNALIGNED)?;
        if n != out.len() {
            return Err(short("read", offset, out.len(), n));
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        match &self.target {
            Target::Raw(r) => Ok(r.set_len(len)?),
            Target::Direct(f) => {
                let mut at = f.size();
                if len <= at {
                    return Ok(f.truncate(len)?);
                }
                let zeros = vec![0u8; ZERO_CHUNK];
                while at < len {
                    let n = (len - at).min(ZERO_CHUNK as u64) as usize;
                    let done = f.write_at(at, &zeros[..n], Flags::UNALIGNED)?;
                    if done != n {
                        return Err(short("zero-fill", at, n, done));
                    }
                    at += n as u64;
                }
                Ok(())
            }
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(self.file().sync_data()?)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let n = self.file().write_at(offset, data, Flags::UNALIGNED)?;
        if n != data.len() {
            return Err(short("write", offset, data.len(), n));
        }
        Ok(())
    }
}
