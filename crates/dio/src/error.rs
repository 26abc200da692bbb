//! The error type of every dio operation: what went wrong, with enough context to act
//! on it, and the errno a C caller would have seen.

use std::io;

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

/// Everything that can go wrong in dio.
#[derive(Debug, thiserror::Error)]
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
        source: io::Error,
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
    /// The image or metadata is corrupt.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The image uses a feature dio does not support.
    #[error("incompatible: {0}")]
    Incompatible(String),
    /// Any other OS error, with what dio was doing.
    #[error("{context}: {source}")]
    Os {
        /// What dio was doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An invalid argument that is not an alignment problem.
    #[error("invalid argument: {0}")]
    Invalid(String),
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
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// An OS error with context.
    pub fn os(context: impl Into<String>, source: io::Error) -> Self {
        Error::Os {
            context: context.into(),
            source,
        }
    }

    /// Duplicate the error (io::Error is not Clone; its kind, errno and message are
    /// kept).
    pub fn duplicate(&self) -> Error {
        fn dup(e: &io::Error) -> io::Error {
            match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            }
        }
        match self {
            Error::Misaligned {
                part,
                value,
                required,
            } => Error::Misaligned {
                part: *part,
                value: *value,
                required: *required,
            },
            Error::TooLarge { end, max } => Error::TooLarge {
                end: *end,
                max: *max,
            },
            Error::BeyondDevice {
                block,
                len,
                device_blocks,
            } => Error::BeyondDevice {
                block: *block,
                len: *len,
                device_blocks: *device_blocks,
            },
            Error::Hole { offset } => Error::Hole { offset: *offset },
            Error::Io { offset, source } => Error::Io {
                offset: *offset,
                source: dup(source),
            },
            Error::MemoryFault { at } => Error::MemoryFault { at: *at },
            Error::ReadOnly => Error::ReadOnly,
            Error::Panicked(what) => Error::Panicked(what),
            Error::WouldBlock => Error::WouldBlock,
            Error::Corrupt(s) => Error::Corrupt(s.clone()),
            Error::Incompatible(s) => Error::Incompatible(s.clone()),
            Error::Os { context, source } => Error::Os {
                context: context.clone(),
                source: dup(source),
            },
            Error::Invalid(s) => Error::Invalid(s.clone()),
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
