//! The error type of every dio operation: what went wrong, with enough context to act
//! on it, and the errno a C caller would have seen.

use std::io;
use std::sync::Arc;

/// Which part of a request broke the alignment rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignPart {
    /// The file offset.
    Offset,
    /// A buffer's memory address.
    Buffer,
    /// A buffer's length (or the total length).
    Length,
}

impl std::fmt::Display for AlignPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AlignPart::Offset => "offset",
            AlignPart::Buffer => "buffer address",
            AlignPart::Length => "length",
        })
    }
}

/// Which on-disk structure of an image was found corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CorruptKind {
    /// No ext2/3/4 superblock where one must be (wrong magic): not an image of
    /// this format at all.
    NoSuperblock,
    /// The superblock (geometry, counts).
    Superblock,
    /// A block group descriptor.
    GroupDescriptor,
    /// A block or inode bitmap.
    Bitmap,
    /// An inode (its fields, size or checksum).
    Inode,
    /// An extent tree node.
    ExtentTree,
    /// An indirect block of an ext2/ext3 block map.
    IndirectBlock,
    /// A directory block or entry.
    Directory,
    /// An htree (hashed directory) index.
    HtreeIndex,
    /// A symbolic link.
    Symlink,
    /// Inline data or the extended attribute that holds it.
    InlineData,
    /// The jbd2 journal.
    Journal,
    /// A block map returned something impossible (outside the file system, or a
    /// mapping that does not cover what was asked).
    BlockMap,
    /// Metadata that lies past the end of the image.
    OutOfImage,
}

impl std::fmt::Display for CorruptKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CorruptKind::NoSuperblock => "missing superblock",
            CorruptKind::Superblock => "superblock",
            CorruptKind::GroupDescriptor => "group descriptor",
            CorruptKind::Bitmap => "bitmap",
            CorruptKind::Inode => "inode",
            CorruptKind::ExtentTree => "extent tree",
            CorruptKind::IndirectBlock => "indirect block",
            CorruptKind::Directory => "directory",
            CorruptKind::HtreeIndex => "htree index",
            CorruptKind::Symlink => "symlink",
            CorruptKind::InlineData => "inline data",
            CorruptKind::Journal => "journal",
            CorruptKind::BlockMap => "block map",
            CorruptKind::OutOfImage => "metadata past the end of the image",
        })
    }
}

/// A corrupt image: which structure, and what exactly is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    /// The structure that is corrupt; match on this.
    pub kind: CorruptKind,
    /// What is wrong, for people (inode and block numbers, the bad value).
    pub detail: String,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// A feature of an image, a device or a server that dio does not support (or not for
/// the operation asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// Feature flags unknown to dio (incompat, ro_compat or journal flags).
    UnknownFlags,
    /// A journal on a separate device.
    ExternalJournal,
    /// jbd2 fast commits.
    FastCommit,
    /// The journal needs recovery before this operation.
    JournalRecovery,
    /// A journal format or journal feature dio does not write (a v1 journal
    /// superblock's revokes, 32-bit tags for a block past 2^32).
    JournalFormat,
    /// Multiple-mount protection.
    Mmp,
    /// Encrypted files or directories.
    Encryption,
    /// Case-folded directories.
    Casefold,
    /// fs-verity files.
    Verity,
    /// Data kept inline in the inode.
    InlineData,
    /// Data or attributes kept in an EA inode.
    EaInode,
    /// An htree hash version dio does not know.
    HtreeHash,
    /// A metadata checksum algorithm dio does not know.
    ChecksumType,
    /// Changing a file's size where the file system client cannot.
    Resize,
    /// A block size or logical block size dio does not support.
    BlockSize,
    /// Something an NBD server refused or lacks.
    Nbd,
    /// TLS, or a TLS mode.
    Tls,
    /// Untorn (atomic, `RWF_ATOMIC`) writes: the file or device reports no atomic
    /// write units, or not the size asked.
    AtomicWrite,
    /// Allocating writes (new files, growth, directories) on an image whose
    /// journal is not open for writing.
    JournalWrite,
    /// Allocating writes on a bigalloc (clustered) image.
    Bigalloc,
    /// Adding entries to a hashed (htree) directory whose two-level index is
    /// full (a third level needs `large_dir`).
    HtreeInsert,
    /// Allocating writes to files mapped by ext2/3 indirect blocks.
    IndirectAlloc,
    /// Allocating writes on an image with quota files (`quota`): dio does not
    /// update the usage they record.
    Quota,
}

/// What is not supported, and the details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatible {
    /// The feature; match on this.
    pub feature: Feature,
    /// What exactly, for people.
    pub detail: String,
}

impl std::fmt::Display for Incompatible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Why a TLS connection (NBD over TLS) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// The server's certificate is not signed by a trusted certificate authority.
    UnknownIssuer,
    /// The server's certificate has expired.
    Expired,
    /// The server's certificate is not valid yet.
    NotYetValid,
    /// The server's certificate is not for the host name dio connected to.
    WrongName,
    /// The server's certificate is unusable for another reason (revoked, bad
    /// signature, bad encoding, unsupported algorithm).
    BadCertificate,
    /// The server refused the handshake (it sent an alert: for example it wants a
    /// client certificate, or does not trust ours).
    PeerRejected,
    /// The handshake failed otherwise (no common cipher, protocol violation).
    Handshake,
}

impl std::fmt::Display for TlsErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsErrorKind::UnknownIssuer => "certificate signed by an unknown authority",
            TlsErrorKind::Expired => "certificate expired",
            TlsErrorKind::NotYetValid => "certificate not valid yet",
            TlsErrorKind::WrongName => "certificate not valid for the host name",
            TlsErrorKind::BadCertificate => "bad certificate",
            TlsErrorKind::PeerRejected => "the server refused the TLS handshake",
            TlsErrorKind::Handshake => "TLS handshake failed",
        })
    }
}

/// A refused TLS connection: why, and the details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// Why; match on this.
    pub kind: TlsErrorKind,
    /// What exactly, for people.
    pub detail: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Why a path inside an image could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PathErrorKind {
    /// No such file or directory (ENOENT).
    NotFound,
    /// A component that must be a directory is not one (ENOTDIR).
    NotADirectory,
    /// Too many symbolic links met while resolving (ELOOP).
    TooManySymlinks,
    /// The name exists already (EEXIST).
    AlreadyExists,
    /// The directory is not empty (ENOTEMPTY).
    NotEmpty,
    /// The path names a directory where a file was needed (EISDIR).
    IsADirectory,
    /// A name longer than the file system allows (ENAMETOOLONG).
    NameTooLong,
    /// A name the file system cannot hold (empty, `.`, `..`, or with `/` or NUL).
    BadName,
    /// A directory has as many subdirectories as its link count can hold (EMLINK).
    TooManyLinks,
}

impl PathErrorKind {
    /// The errno of this kind.
    pub fn errno(self) -> i32 {
        match self {
            PathErrorKind::NotFound => libc::ENOENT,
            PathErrorKind::NotADirectory => libc::ENOTDIR,
            PathErrorKind::TooManySymlinks => libc::ELOOP,
            PathErrorKind::AlreadyExists => libc::EEXIST,
            PathErrorKind::NotEmpty => libc::ENOTEMPTY,
            PathErrorKind::IsADirectory => libc::EISDIR,
            PathErrorKind::NameTooLong => libc::ENAMETOOLONG,
            PathErrorKind::BadName => libc::EINVAL,
            PathErrorKind::TooManyLinks => libc::EMLINK,
        }
    }
}

/// A path that could not be resolved or used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    /// Why; match on this.
    pub kind: PathErrorKind,
    /// The path (or `inode N`), lossily decoded.
    pub path: String,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = io::Error::from_raw_os_error(self.kind.errno()).to_string();
        let why = why.find(" (os error").map_or(&why[..], |i| &why[..i]);
        write!(f, "{}: {why}", self.path)
    }
}

/// Everything that can go wrong in dio. `Clone`, so one error can complete many
/// waiters; match on the variants and their kinds, never on the message text.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is not aligned to the device's logical block (EINVAL); nothing was
    /// transferred.
    #[error("misaligned {part}: {value:#x} is not a multiple of {required} bytes")]
    Misaligned {
        /// Which part is misaligned.
        part: AlignPart,
        /// The offending value.
        value: u64,
        /// The alignment required.
        required: u64,
    },
    /// The request reaches past the largest offset the file can have (EFBIG/EINVAL).
    #[error("request ends at {end}, past the largest file offset {max}")]
    TooLarge {
        /// Where the request would end.
        end: u64,
        /// The largest allowed end.
        max: u64,
    },
    /// The block map pointed outside the device: a file system bug or a corrupt image.
    #[error(
        "block map returned device block {block}+{len}, past the device's {device_blocks} blocks"
    )]
    BeyondDevice {
        /// First block returned.
        block: u64,
        /// Length returned, in fs blocks.
        len: u64,
        /// Device size in fs blocks.
        device_blocks: u64,
    },
    /// A direct write met a hole it may not fill (the seed's ENOTBLK) before any byte
    /// was written; the caller must fill it another way.
    #[error("direct write at offset {offset} met a hole that needs allocation")]
    Hole {
        /// File offset of the hole.
        offset: u64,
    },
    /// The device reported an I/O error (EIO).
    #[error("I/O error at device offset {offset}: {source}")]
    Io {
        /// Device byte offset of the failed request.
        offset: u64,
        /// The device's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// User code called by the engine (a block map, a hook, a pin closure, a
    /// completion callback) panicked during the call (EIO). Every request of the call
    /// had completed and its locks were released before this was reported; a sync
    /// call then resumes the panic.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// Memory could not be used for I/O (EFAULT).
    #[error("bad memory in the caller's buffers at byte {at} of the request")]
    MemoryFault {
        /// Byte of the request where the fault was met.
        at: u64,
    },
    /// A write on a read-only file (EBADF).
    #[error("file is open read-only")]
    ReadOnly,
    /// The request would block and the caller asked it not to (EAGAIN).
    #[error("operation would block")]
    WouldBlock,
    /// The image or metadata is corrupt (EUCLEAN); [`Corrupt::kind`] says which
    /// structure.
    #[error("corrupt: {0}")]
    Corrupt(Corrupt),
    /// The image, device or server uses a feature dio does not support
    /// (EOPNOTSUPP); [`Incompatible::feature`] says which.
    #[error("incompatible: {0}")]
    Incompatible(Incompatible),
    /// A path inside an image cannot be resolved or used (ENOENT, ENOTDIR, ELOOP,
    /// EEXIST, ...); [`PathError::kind`] says why.
    #[error("{0}")]
    Path(PathError),
    /// The file system has no free block or inode left (ENOSPC).
    #[error("no space left on device: {0}")]
    NoSpace(String),
    /// Any other OS error, with what dio was doing.
    #[error("{context}: {source}")]
    Os {
        /// What dio was doing.
        context: String,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// An invalid argument that is not an alignment problem.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A TLS connection was refused (EACCES; EPROTO for a failed handshake);
    /// [`TlsError::kind`] says why.
    #[error("TLS: {0}")]
    Tls(TlsError),
}

impl Error {
    /// The errno a kernel caller would have seen for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Misaligned { .. } | Error::Invalid(_) => libc::EINVAL,
            Error::TooLarge { .. } => libc::EFBIG,
            Error::BeyondDevice { .. } | Error::Corrupt(_) => libc::EUCLEAN,
            Error::Hole { .. } => libc::ENOTBLK,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::MemoryFault { .. } => libc::EFAULT,
            Error::ReadOnly => libc::EBADF,
            Error::Panicked(_) => libc::EIO,
            Error::WouldBlock => libc::EAGAIN,
            Error::Incompatible(_) => libc::EOPNOTSUPP,
            Error::Path(p) => p.kind.errno(),
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Tls(t) if t.kind == TlsErrorKind::Handshake => libc::EPROTO,
            Error::Tls(_) => libc::EACCES,
        }
    }

    /// An OS error with context.
    pub fn os(context: impl Into<String>, source: io::Error) -> Self {
        Error::Os {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// A device I/O error at device byte `offset`.
    pub fn io(offset: u64, source: io::Error) -> Self {
        Error::Io {
            offset,
            source: Arc::new(source),
        }
    }

    /// A corrupt `kind` of structure, described by `detail`.
    pub fn corrupt(kind: CorruptKind, detail: impl Into<String>) -> Self {
        Error::Corrupt(Corrupt {
            kind,
            detail: detail.into(),
        })
    }

    /// An unsupported `feature`, described by `detail`.
    pub fn incompatible(feature: Feature, detail: impl Into<String>) -> Self {
        Error::Incompatible(Incompatible {
            feature,
            detail: detail.into(),
        })
    }

    /// A refused TLS connection of `kind`, described by `detail`.
    pub fn tls(kind: TlsErrorKind, detail: impl Into<String>) -> Self {
        Error::Tls(TlsError {
            kind,
            detail: detail.into(),
        })
    }

    /// The TLS error kind, if this is a refused TLS connection.
    pub fn tls_kind(&self) -> Option<TlsErrorKind> {
        match self {
            Error::Tls(t) => Some(t.kind),
            _ => None,
        }
    }

    /// A path error of `kind` on `path` (bytes, decoded lossily).
    pub fn path(kind: PathErrorKind, path: impl AsRef<[u8]>) -> Self {
        Error::Path(PathError {
            kind,
            path: String::from_utf8_lossy(path.as_ref()).into_owned(),
        })
    }

    /// The corrupt structure, if this is a corrupt-image error.
    pub fn corrupt_kind(&self) -> Option<CorruptKind> {
        match self {
            Error::Corrupt(c) => Some(c.kind),
            _ => None,
        }
    }

    /// The path error kind, if this is a path error.
    pub fn path_kind(&self) -> Option<PathErrorKind> {
        match self {
            Error::Path(p) => Some(p.kind),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let code = e.errno();
        io::Error::new(io::Error::from_raw_os_error(code).kind(), e)
    }
}

/// dio's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
