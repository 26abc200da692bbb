//! Inodes: the on-disk inode (128 bytes, or 256+ with the extra fields), its
//! checksum, its timestamps, and the in-inode extended attributes where inline data
//! continues (`system.data`).

use super::bytes::{crc32c, le16, le32, put16, put32, u8at};
use crate::error::{CorruptKind, Feature};
use crate::{Error, Result};

/// Inode flags dio looks at.
pub mod flags {
    /// Immutable file.
    pub const IMMUTABLE: u32 = 0x10;
    /// Append-only file.
    pub const APPEND: u32 = 0x20;
    /// Hashed (htree) directory.
    pub const INDEX: u32 = 0x1000;
    /// i_blocks counts fs blocks (huge_file).
    pub const HUGE_FILE: u32 = 0x40000;
    /// Encrypted file.
    pub const ENCRYPT: u32 = 0x800;
    /// The inode uses an extent tree.
    pub const EXTENTS: u32 = 0x80000;
    /// fs-verity file.
    pub const VERITY: u32 = 0x100000;
    /// The inode holds a large extended attribute value.
    pub const EA_INODE: u32 = 0x200000;
    /// Data lives inside the inode.
    pub const INLINE_DATA: u32 = 0x1000_0000;
    /// Case-insensitive directory.
    pub const CASEFOLD: u32 = 0x4000_0000;
}

/// The root directory's inode number.
pub const ROOT_INO: u32 = 2;

/// The type of a file, from the top bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// Regular file.
    Regular,
    /// Directory.
    Directory,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// Socket.
    Socket,
    /// Anything else (a corrupt mode).
    Unknown,
}

impl FileType {
    /// From the mode's `S_IFMT` bits.
    pub fn from_mode(mode: u16) -> FileType {
        match mode & 0xF000 {
            0x8000 => FileType::Regular,
            0x4000 => FileType::Directory,
            0xA000 => FileType::Symlink,
            0x2000 => FileType::CharDevice,
            0x6000 => FileType::BlockDevice,
            0x1000 => FileType::Fifo,
            0xC000 => FileType::Socket,
            _ => FileType::Unknown,
        }
    }

    /// The character `ls -l` shows.
    pub fn ls_char(self) -> char {
        match self {
            FileType::Regular => '-',
            FileType::Directory => 'd',
            FileType::Symlink => 'l',
            FileType::CharDevice => 'c',
            FileType::BlockDevice => 'b',
            FileType::Fifo => 'p',
            FileType::Socket => 's',
            FileType::Unknown => '?',
        }
    }

    /// A lower-case name ("regular", "directory", ...).
    pub fn name(self) -> &'static str {
        match self {
            FileType::Regular => "regular",
            FileType::Directory => "directory",
            FileType::Symlink => "symlink",
            FileType::CharDevice => "char-device",
            FileType::BlockDevice => "block-device",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
            FileType::Unknown => "unknown",
        }
    }
}

/// A timestamp: seconds since the epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    /// Seconds (may be negative).
    pub secs: i64,
    /// Nanoseconds.
    pub nsecs: u32,
}

/// Offsets of the fields in the raw inode.
pub(crate) const OFF_CTIME: usize = 0x0C;
pub(crate) const OFF_MTIME: usize = 0x10;
const OFF_CSUM_LO: usize = 0x7C;
const OFF_EXTRA_ISIZE: usize = 0x80;
const OFF_CSUM_HI: usize = 0x82;
pub(crate) const OFF_CTIME_EXTRA: usize = 0x84;
pub(crate) const OFF_MTIME_EXTRA: usize = 0x88;
const GOOD_OLD_SIZE: usize = 128;

/// One inode, as read from the inode table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Inode {
    /// Inode number.
    pub ino: u32,
    /// Type and permission bits.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Hard links.
    pub links: u16,
    /// Flags (see [`flags`]).
    pub flags: u32,
    /// Blocks used, in 512-byte units.
    pub blocks_512: u64,
    /// Generation (NFS).
    pub generation: u32,
    /// Extended-attribute block.
    pub file_acl: u64,
    /// Access, change, modification times.
    pub atime: Timestamp,
    /// Change time.
    pub ctime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// The raw on-disk bytes (the inode size of the file system).
    pub(crate) raw: Vec<u8>,
}

fn time(raw: &[u8], off: usize, extra_off: usize, extra_isize: usize) -> Timestamp {
    let lo = i64::from(le32(raw, off) as i32);
    if extra_off + 4 <= GOOD_OLD_SIZE + extra_isize {
        let extra = le32(raw, extra_off);
        Timestamp {
            secs: lo + (i64::from(extra & 3) << 32),
            nsecs: extra >> 2,
        }
    } else {
        Timestamp { secs: lo, nsecs: 0 }
    }
}

impl Inode {
    /// Parse the raw inode `raw` of inode `ino`; `huge_file` says whether i_blocks may
    /// count fs blocks (with `block_size`).
    pub(crate) fn parse(ino: u32, raw: Vec<u8>, huge_file: bool, block_size: u32) -> Result<Inode> {
        let extra = extra_isize(&raw, ino)?;
        let mode = le16(&raw, 0);
        let flags = le32(&raw, 0x20);
        let mut blocks = u64::from(le32(&raw, 0x1C)) | u64::from(le16(&raw, 0x74)) << 32;
        if huge_file && flags & flags::HUGE_FILE != 0 {
            blocks = blocks.saturating_mul(u64::from(block_size / 512));
        }
        Ok(Inode {
            ino,
            mode,
            uid: u32::from(le16(&raw, 0x2)) | u32::from(le16(&raw, 0x78)) << 16,
            gid: u32::from(le16(&raw, 0x18)) | u32::from(le16(&raw, 0x7A)) << 16,
            size: u64::from(le32(&raw, 0x4)) | u64::from(le32(&raw, 0x6C)) << 32,
            links: le16(&raw, 0x1A),
            flags,
            blocks_512: blocks,
            generation: le32(&raw, 0x64),
            file_acl: u64::from(le32(&raw, 0x68)) | u64::from(le16(&raw, 0x76)) << 32,
            atime: time(&raw, 0x8, 0x8C, extra),
            ctime: time(&raw, OFF_CTIME, OFF_CTIME_EXTRA, extra),
            mtime: time(&raw, OFF_MTIME, OFF_MTIME_EXTRA, extra),
            raw,
        })
    }

    /// The file type.
    pub fn file_type(&self) -> FileType {
        FileType::from_mode(self.mode)
    }

    /// Permission bits (including setuid, setgid, sticky).
    pub fn permissions(&self) -> u16 {
        self.mode & 0o7777
    }

    /// Whether a flag is set.
    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// The 60 bytes of `i_block`: block pointers, extent root, inline data or a
    /// fast symlink's target.
    pub fn i_block(&self) -> &[u8] {
        &self.raw[0x28..0x28 + 60]
    }

    /// The size of the extra fields past the first 128 bytes.
    pub(crate) fn extra_isize(&self) -> usize {
        extra_isize(&self.raw, self.ino).unwrap_or(0)
    }

    /// The raw bytes as they are on disk.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The value of the in-inode extended attribute `index`/`name` (index 7 is
    /// `system.`), if present.
    pub(crate) fn inline_xattr(&self, index: u8, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let start = GOOD_OLD_SIZE + self.extra_isize();
        let raw = &self.raw;
        if start + 4 > raw.len() || le32(raw, start) != 0xEA02_0000 {
            return Ok(None);
        }
        let first = start + 4;
        let end = raw.len();
        let mut pos = first;
        let bad = |m: &str| {
            Error::corrupt(
                CorruptKind::Inode,
                format!("inode {}: in-inode xattrs: {m}", self.ino),
            )
        };
        while pos + 4 <= end && le32(raw, pos) != 0 {
            if pos + 16 > end {
                return Err(bad("entry runs past the inode"));
            }
            let name_len = usize::from(u8at(raw, pos));
            let name_index = u8at(raw, pos + 1);
            let value_offs = usize::from(le16(raw, pos + 2));
            let value_inum = le32(raw, pos + 4);
            let value_size = le32(raw, pos + 8) as usize;
            let entry_len = (16 + name_len + 3) & !3;
            if pos + entry_len > end {
                return Err(bad("entry name runs past the inode"));
            }
            let ename = &raw[pos + 16..pos + 16 + name_len];
            if name_index == index && ename == name {
                if value_inum != 0 {
                    return Err(Error::incompatible(
                        Feature::EaInode,
                        format!("inode {}: inline data kept in an EA inode", self.ino),
                    ));
                }
                let v0 = first + value_offs;
                let v1 = v0.checked_add(value_size).filter(|&e| e <= end);
                return match v1 {
                    Some(v1) => Ok(Some(raw[v0..v1].to_vec())),
                    None => Err(bad("value runs past the inode")),
                };
            }
            pos += entry_len;
        }
        Ok(None)
    }

    /// Set a timestamp in the raw inode (seconds, and nanoseconds/epoch where the
    /// inode has room for them).
    pub(crate) fn set_time(&mut self, off: usize, extra_off: usize, t: Timestamp) {
        put32(&mut self.raw, off, t.secs as u32);
        if extra_off + 4 <= GOOD_OLD_SIZE + self.extra_isize() {
            let epoch = ((t.secs - i64::from(t.secs as i32)) >> 32) as u32 & 3;
            put32(&mut self.raw, extra_off, (t.nsecs << 2) | epoch);
        }
    }
}

fn extra_isize(raw: &[u8], ino: u32) -> Result<usize> {
    if raw.len() <= GOOD_OLD_SIZE {
        return Ok(0);
    }
    let extra = usize::from(le16(raw, OFF_EXTRA_ISIZE));
    if extra % 4 != 0 || GOOD_OLD_SIZE + extra > raw.len() {
        return Err(Error::corrupt(
            CorruptKind::Inode,
            format!("inode {ino}: extra inode size {extra} does not fit"),
        ));
    }
    Ok(extra)
}

/// The checksum of a raw inode, and whether its high half is stored.
fn checksum(seed: u32, ino: u32, raw: &[u8]) -> (u32, bool) {
    let generation = le32(raw, 0x64);
    let mut c = crc32c(seed, &ino.to_le_bytes());
    c = crc32c(c, &generation.to_le_bytes());
    c = crc32c(c, &raw[..OFF_CSUM_LO]);
    c = crc32c(c, &[0, 0]);
    c = crc32c(c, &raw[OFF_CSUM_LO + 2..GOOD_OLD_SIZE]);
    let mut has_hi = false;
    if raw.len() > GOOD_OLD_SIZE {
        let extra = usize::from(le16(raw, OFF_EXTRA_ISIZE));
        has_hi = extra >= 4;
        c = crc32c(c, &raw[GOOD_OLD_SIZE..OFF_CSUM_HI]);
        if has_hi {
            c = crc32c(c, &[0, 0]);
            c = crc32c(c, &raw[OFF_CSUM_HI + 2..]);
        } else {
            c = crc32c(c, &raw[OFF_CSUM_HI..]);
        }
    }
    (c, has_hi)
}

/// Verify the metadata_csum checksum of a raw inode.
pub(crate) fn verify(seed: u32, ino: u32, raw: &[u8]) -> Result<()> {
    let (c, has_hi) = checksum(seed, ino, raw);
    let lo = u32::from(le16(raw, OFF_CSUM_LO));
    let (stored, computed) = if has_hi {
        (lo | u32::from(le16(raw, OFF_CSUM_HI)) << 16, c)
    } else {
        (lo, c & 0xFFFF)
    };
    if stored != computed {
        return Err(Error::corrupt(
            CorruptKind::Inode,
            format!(
            "inode {ino} checksum {stored:#010x} does not match its contents ({computed:#010x})"
        ),
        ));
    }
    Ok(())
}

/// Recompute and store the metadata_csum checksum of a raw inode.
pub(crate) fn update_checksum(seed: u32, ino: u32, raw: &mut [u8]) {
    let (c, has_hi) = checksum(seed, ino, raw);
    put16(raw, OFF_CSUM_LO, (c & 0xFFFF) as u16);
    if has_hi {
        put16(raw, OFF_CSUM_HI, (c >> 16) as u16);
    }
}

/// The per-inode checksum seed (extent blocks, directory blocks).
pub(crate) fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    crc32c(
        crc32c(fs_seed, &ino.to_le_bytes()),
        &generation.to_le_bytes(),
    )
}

/// Most bytes of inode table one [`super::Ext::inodes`] read covers.
const MAX_INODE_SPAN: u64 = 64 << 10;

impl super::Ext {
    /// Read the inodes `inos`, each checked as [`super::Ext::inode`] checks one
    /// (range, checksum), with one device read per run of neighbouring
    /// inode-table bytes (up to 64 KiB): a directory's inodes, allocated
    /// together, come in one read rather than one each. The results are in the
    /// order of `inos`.
    pub fn inodes(&self, inos: &[u32]) -> Vec<Result<Inode>> {
        let fs = &self.fs;
        let size = u64::from(fs.sb.inode_size);
        let mut out: Vec<Option<Result<Inode>>> = vec![None; inos.len()];
        let mut at: Vec<(u64, usize)> = Vec::with_capacity(inos.len());
        for (i, &ino) in inos.iter().enumerate() {
            match fs.inode_offset(ino) {
                Ok(off) => at.push((off, i)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        at.sort_unstable();
        let mut first = 0;
        while first < at.len() {
            let start = at[first].0;
            let mut end = first + 1;
            while end < at.len() && at[end].0 + size - start <= MAX_INODE_SPAN {
                end += 1;
            }
            let len = at[end - 1].0 + size - start;
            match fs.io.read(start, len as usize, "inode") {
                Ok(bytes) => {
                    for &(off, i) in &at[first..end] {
                        let from = (off - start) as usize;
                        let raw = bytes[from..from + size as usize].to_vec();
                        let ino = inos[i];
                        let parsed = if fs.sb.metadata_csum() {
                            verify(fs.sb.checksum_seed, ino, &raw)
                        } else {
                            Ok(())
                        }
                        .and_then(|()| {
                            Inode::parse(
                                ino,
                                raw,
                                fs.sb.has_ro_compat(super::superblock::ro_compat::HUGE_FILE),
                                fs.sb.block_size,
                            )
                        });
                        out[i] = Some(parsed);
                    }
                }
                Err(e) => {
                    for &(_, i) in &at[first..end] {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
            first = end;
        }
        // Every slot was filled above: by its refused offset or by its read.
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Invalid("inode not read".into()))))
            .collect()
    }
}
