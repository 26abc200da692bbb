//! The log file: a header, then length-prefixed, checksummed records in completion
//! order. Writing appends one whole record per `write` call; reading stops at the
//! first record that is short or fails its checksum (the tail a crash of the
//! recorder itself left), and says how many bytes it ignored.
//!
//! ```text
//! header (64 bytes): magic "DIOCRSH1", version u32, logical block u32, device size
//!                    u64, 40 reserved zero bytes, crc32c of the first 60 bytes (u32)
//! record:            payload length u32, crc32c of the payload u32, payload
//! payload:           kind u8, then
//!   1 write:  submitted-at u64, device offset u64, flags u8 (1 = FUA, 2 = failed), data
//!   2 flush:  covers u64 (the records completed before the flush was issued)
//!   3 mark:   name (UTF-8)
//!   4 claim:  device offset u64, data (bytes the workload declares durable)
//! ```
//!
//! All integers are little-endian. A record's index is its position in the log;
//! `submitted-at` is how many records the log held when the write was submitted, so
//! every record below it completed before the write was issued.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{CrashError, Result};

const MAGIC: &[u8; 8] = b"DIOCRSH1";
const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Largest payload a record may claim (a sanity bound for torn length words).
const MAX_PAYLOAD: u32 = 1 << 30;

const KIND_WRITE: u8 = 1;
const KIND_FLUSH: u8 = 2;
const KIND_MARK: u8 = 3;
const KIND_CLAIM: u8 = 4;

const FLAG_FUA: u8 = 1;
const FLAG_FAILED: u8 = 2;

/// What the log says about the device it recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The device's logical block size.
    pub logical_block: u32,
    /// The device's size in bytes.
    pub device_size: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.logical_block.to_le_bytes());
        h[16..24].copy_from_slice(&self.device_size.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(h: &[u8], path: &Path) -> Result<Header> {
        let bad = |what: &str| CrashError::BadLog {
            path: path.to_path_buf(),
            detail: what.to_string(),
        };
        if h.len() < HEADER_LEN {
            return Err(bad("shorter than its 64-byte header"));
        }
        if &h[..8] != MAGIC {
            return Err(bad("not a dio crash log (bad magic)"));
        }
        let crc = u32::from_le_bytes(h[60..64].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&h[..60]) {
            return Err(bad("header checksum mismatch"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(&format!(
                "log version {version}, this dio reads {VERSION}"
            )));
        }
        let logical_block = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        let device_size = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        if !logical_block.is_power_of_two() || logical_block < 512 {
            return Err(bad(&format!(
                "logical block {logical_block} is not a power of two >= 512"
            )));
        }
        Ok(Header {
            logical_block,
            device_size,
        })
    }
}

/// One record, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A completed write.
    Write {
        /// Records in the log when the write was submitted.
        submitted: u64,
        /// Device byte offset.
        offset: u64,
        /// Force unit access.
        fua: bool,
        /// The write completed with an error (its data may or may not have landed).
        failed: bool,
        /// The bytes.
        data: &'a [u8],
    },
    /// A completed flush, covering the first `covers` records.
    Flush {
        /// Records completed before the flush was issued.
        covers: u64,
    },
    /// A user mark.
    Mark(&'a str),
    /// Bytes at a device offset the workload declares durable from here on.
    Claim {
        /// Device byte offset.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
}

fn encode(entry: &Entry<'_>) -> Vec<u8> {
    let mut p = Vec::new();
    match *entry {
        Entry::Write {
            submitted,
            offset,
            fua,
            failed,
            data,
        } => {
            p.reserve(18 + data.len());
            p.push(KIND_WRITE);
            p.extend_from_slice(&submitted.to_le_bytes());
            p.extend_from_slice(&offset.to_le_bytes());
            p.push(if fua { FLAG_FUA } else { 0 } | if failed { FLAG_FAILED } else { 0 });
            p.extend_from_slice(data);
        }
        Entry::Flush { covers } => {
            p.push(KIND_FLUSH);
            p.extend_from_slice(&covers.to_le_bytes());
        }
        Entry::Mark(name) => {
            p.push(KIND_MARK);
            p.extend_from_slice(name.as_bytes());
        }
        Entry::Claim { offset, data } => {
            p.push(KIND_CLAIM);
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(data);
        }
    }
    let mut rec = Vec::with_capacity(8 + p.len());
    rec.extend_from_slice(&(p.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
    rec.extend_from_slice(&p);
    rec
}

/// Appends records to a log file, one `write` per record, under a lock; counts them.
#[derive(Debug)]
pub struct LogWriter {
    inner: Mutex<WriterState>,
    path: PathBuf,
}

#[derive(Debug)]
struct WriterState {
    file: File,
    records: u64,
    /// The first append error; every later append fails with it.
    broken: Option<io::ErrorKind>,
}

impl LogWriter {
    /// Create (or truncate) the log at `path` and write its header.
    pub fn create(path: impl AsRef<Path>, header: Header) -> Result<LogWriter> {
        let path = path.as_ref();
        let ctx = |e| CrashError::io(format!("create log {}", path.display()), e);
        let mut file = File::create(path).map_err(ctx)?;
        file.write_all(&header.encode()).map_err(ctx)?;
        Ok(LogWriter {
            inner: Mutex::new(WriterState {
                file,
                records: 0,
                broken: None,
            }),
            path: path.to_path_buf(),
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records appended so far.
    pub fn records(&self) -> u64 {
        self.lock().records
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append one record; returns its index.
    pub fn append(&self, entry: &Entry<'_>) -> io::Result<u64> {
        let rec = encode(entry);
        let mut st = self.lock();
        if let Some(kind) = st.broken {
            return Err(io::Error::new(
                kind,
                "the crash log could not be written earlier",
            ));
        }
        match st.file.write_all(&rec) {
            Ok(()) => {
                st.records += 1;
                Ok(st.records - 1)
            }
            Err(e) => {
                st.broken = Some(e.kind());
                Err(e)
            }
        }
    }

    /// Whether an append has failed (the log is incomplete from there on).
    pub fn broken(&self) -> Option<io::ErrorKind> {
        self.lock().broken
    }

    /// fsync the log.
    pub fn sync(&self) -> io::Result<()> {
        self.lock().file.sync_data()
    }
}

/// A record of a log read back, with its data left in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A completed write.
    Write(WriteRec),
    /// A completed flush covering the records below `covers`.
    Flush {
        /// Records completed before the flush was issued.
        covers: u64,
    },
    /// A user mark.
    Mark(String),
    /// Bytes the workload declares durable from here on.
    Claim {
        /// Device byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Where the bytes are in the log.
        data_at: u64,
    },
}

/// A write as the log holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRec {
    /// Records in the log when it was submitted (all below completed before it was
    /// issued).
    pub submitted: u64,
    /// Device byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Force unit access.
    pub fua: bool,
    /// It completed with an error.
    pub failed: bool,
    /// Where its bytes are in the log file.
    pub data_at: u64,
}

enum Source {
    Mem(Vec<u8>),
    File(File),
}

/// A log read back: header, records, and the bytes of writes and claims on demand.
pub struct Log {
    path: PathBuf,
    header: Header,
    records: Vec<Record>,
    ignored_tail: u64,
    source: Source,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("records", &self.records.len())
            .field("ignored_tail", &self.ignored_tail)
            .finish()
    }
}

/// Logs up to this size are held in memory while replaying; bigger ones are read
/// with `pread` as needed.
const IN_MEMORY: u64 = 512 << 20;

impl Log {
    /// Read the log at `path`. A record that is cut short or fails its checksum
    /// ends the log there ([`Log::ignored_tail`] says how many bytes were dropped).
    pub fn open(path: impl AsRef<Path>) -> Result<Log> {
        let path = path.as_ref();
        let ctx = |e| CrashError::io(format!("read log {}", path.display()), e);
        let mut file = File::open(path).map_err(ctx)?;
        let size = file.metadata().map_err(ctx)?.len();
        let mut head = [0u8; HEADER_LEN];
        let got = read_full(&mut file, &mut head).map_err(ctx)?;
        let header = Header::decode(&head[..got], path)?;
        let source = if size <= IN_MEMORY {
            let mut all = Vec::with_capacity(size as usize);
            file.read_to_end(&mut all).map_err(ctx)?;
            let mut v = head.to_vec();
            v.extend_from_slice(&all);
            Source::Mem(v)
        } else {
            Source::File(file)
        };
        let mut log = Log {
            path: path.to_path_buf(),
            header,
            records: Vec::new(),
            ignored_tail: 0,
            source,
        };
        log.scan(size).map_err(ctx)?;
        Ok(log)
    }

    fn scan(&mut self, size: u64) -> io::Result<()> {
        let mut pos = HEADER_LEN as u64;
        while pos < size {
            let Some(rec) = self.parse_at(pos, size)? else {
                break;
            };
            let (record, next) = rec;
            self.records.push(record);
            pos = next;
        }
        self.ignored_tail = size - pos;
        Ok(())
    }

    /// Parse the record at `pos`; `None` if it is short, oversized or corrupt.
    fn parse_at(&self, pos: u64, size: u64) -> io::Result<Option<(Record, u64)>> {
        if size - pos < 8 {
            return Ok(None);
        }
        let mut head = [0u8; 8];
        self.read_raw(pos, &mut head)?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_PAYLOAD || u64::from(len) > size - pos - 8 {
            return Ok(None);
        }
        let mut p = vec![0u8; len as usize];
        self.read_raw(pos + 8, &mut p)?;
        if crc32c::crc32c(&p) != crc {
            return Ok(None);
        }
        let body = pos + 9;
        let u64_at = |i: usize| {
            p.get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
        };
        let record = match p[0] {
            KIND_WRITE if p.len() >= 18 => {
                let (Some(submitted), Some(offset)) = (u64_at(1), u64_at(9)) else {
                    return Ok(None);
                };
                let flags = p[17];
                Record::Write(WriteRec {
                    submitted,
                    offset,
                    len: p.len() as u64 - 18,
                    fua: flags & FLAG_FUA != 0,
                    failed: flags & FLAG_FAILED != 0,
                    data_at: body + 17,
                })
            }
            KIND_FLUSH if p.len() == 9 => Record::Flush {
                covers: u64_at(1).expect("length checked"),
            },
            KIND_MARK => Record::Mark(String::from_utf8_lossy(&p[1..]).into_owned()),
            KIND_CLAIM if p.len() >= 9 => Record::Claim {
                offset: u64_at(1).expect("length checked"),
                len: p.len() as u64 - 9,
                data_at: body + 8,
            },
            _ => return Ok(None),
        };
        Ok(Some((record, pos + 8 + u64::from(len))))
    }

    fn read_raw(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.source {
            Source::Mem(v) => {
                let s = at as usize;
                buf.copy_from_slice(&v[s..s + buf.len()]);
                Ok(())
            }
            Source::File(f) => f.read_exact_at(buf, at),
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The records, in completion order.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Bytes at the end that did not form a whole, valid record (a crash of the
    /// recorder mid-append), ignored.
    pub fn ignored_tail(&self) -> u64 {
        self.ignored_tail
    }

    /// Read `buf.len()` bytes of a record's data, from byte `skip` of it.
    pub fn read_data(&self, data_at: u64, skip: u64, buf: &mut [u8]) -> Result<()> {
        self.read_raw(data_at + skip, buf)
            .map_err(|e| CrashError::io(format!("read log {}", self.path.display()), e))
    }

    /// The name of the last mark at or before record `at` (exclusive of `at`).
    pub fn mark_before(&self, at: u64) -> Option<(u64, &str)> {
        self.records[..(at as usize).min(self.records.len())]
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, r)| match r {
                Record::Mark(m) => Some((i as u64, m.as_str())),
                _ => None,
            })
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
