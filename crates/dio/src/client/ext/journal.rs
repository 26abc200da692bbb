//! The jbd2 journal, read-only: when the superblock says the journal needs
//! recovery, find the committed transactions the kernel would replay and serve
//! their blocks in place of the image's, in memory. The image is never written.
//!
//! The journal is a ring of fs blocks inside the journal inode (big-endian
//! structures): a superblock, then from `s_start` transactions of sequence
//! `s_sequence`, `s_sequence + 1`, ... Each transaction is descriptor blocks (tags
//! naming the fs block each following journal block is a copy of), revoke blocks
//! (fs blocks earlier copies of which must not be replayed) and a commit block.
//! Recovery follows jbd2's three passes: scan to the last transaction with a valid
//! commit block, collect revokes, then replay every tagged copy not revoked by the
//! same or a later transaction; a later copy of a block wins.
//!
//! What the result is: a map "fs block -> journal block holding its replayed
//! contents". Metadata reads ([`super::io::MetaIo`]) patch those blocks in; the
//! file block map points file data at the journal copy (data=journal), so the
//! engine reads the replayed bytes straight from the device.
//!
//! Checksums (csum v2/v3: superblock, descriptor and revoke tails, commit blocks,
//! every tag's block) are verified: a mismatch is "corrupt: ...", except a bad
//! commit block, which ends the log there as the kernel ends it. The v1 commit
//! checksum (compat `checksum`, crc32 of the transaction) is not verified.
//! Fast-commit journals that need recovery are refused ("incompatible").

use crate::error::{CorruptKind, Feature};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::bytes::{crc32c, le32};
use super::inode::FileType;
use super::map::Layout;
use super::superblock::{compat, incompat};
use super::Fs;
use crate::map::Mapping;
use crate::{Error, Result};

const MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const SUPERBLOCK_V1: u32 = 3;
const SUPERBLOCK_V2: u32 = 4;
const REVOKE: u32 = 5;

/// Journal incompat features.
const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const INCOMPAT_KNOWN: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

/// Tag flags.
const FLAG_ESCAPE: u32 = 1;
const FLAG_SAME_UUID: u32 = 2;
const FLAG_LAST_TAG: u32 = 8;

fn be32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off.saturating_add(4)) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn be16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off.saturating_add(2)) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn corrupt<T>(m: String) -> Result<T> {
    Err(Error::corrupt(
        CorruptKind::Journal,
        format!("journal: {m}"),
    ))
}

/// Where the replayed contents of one fs block are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Copy {
    /// The fs block (inside the journal) holding the copy.
    pub(crate) at: u64,
    /// The copy's first four bytes were the journal magic, stored as zeros.
    pub(crate) escaped: bool,
}

/// The outcome of an in-memory journal replay.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    pub(crate) blocks: BTreeMap<u64, Copy>,
    pub(crate) transactions: u64,
    pub(crate) revoked: u64,
    pub(crate) escaped: usize,
    pub(crate) notes: Vec<String>,
}

impl Replay {
    /// The journal copy standing in for fs block `block`, if any.
    pub(crate) fn get(&self, block: u64) -> Option<Copy> {
        self.blocks.get(&block).copied()
    }

    /// The first replayed fs block in `[start, end)`.
    pub(crate) fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        if start >= end {
            return None;
        }
        self.blocks.range(start..end).next().map(|(&b, _)| b)
    }

    /// Put back the magic an escaped copy lost.
    pub(crate) fn unescape(block: &mut [u8]) {
        if let Some(s) = block.get_mut(..4) {
            s.copy_from_slice(&MAGIC.to_be_bytes());
        }
    }
}

/// One tag: the fs block a journal block is a copy of.
struct Tag {
    fs_block: u64,
    log_block: u64,
    escaped: bool,
    csum: u32,
}

struct Txn {
    seq: u32,
    tags: Vec<Tag>,
    revokes: Vec<u64>,
}

/// The journal superblock fields recovery needs.
struct JournalSb {
    maxlen: u64,
    first: u64,
    sequence: u32,
    start: u64,
    incompat: u32,
    csum_seed: u32,
}

impl JournalSb {
    fn csum(&self) -> bool {
        self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0
    }
    fn tail(&self) -> usize {
        if self.csum() {
            4
        } else {
            0
        }
    }
    fn tag_bytes(&self) -> usize {
        if self.incompat & INCOMPAT_CSUM_V3 != 0 {
            return 16;
        }
        let mut sz = 12;
        if self.incompat & INCOMPAT_CSUM_V2 != 0 {
            sz += 2;
        }
        if self.incompat & INCOMPAT_64BIT != 0 {
            sz
        } else {
            sz - 4
        }
    }
    /// The next log block after `b`, wrapping from the end to `first`.
    fn next(&self, b: u64) -> u64 {
        if b + 1 >= self.maxlen {
            self.first
        } else {
            b + 1
        }
    }
}

/// The block-tail (descriptor, revoke) and commit-block checksum: crc32c of the
/// whole block with the checksum field zeroed.
fn block_csum_ok(seed: u32, block: &[u8], field: usize) -> bool {
    let want = be32(block, field);
    let mut b = block.to_vec();
    b[field..field + 4].fill(0);
    crc32c(seed, &b) == want
}

/// The journal inode's blocks, read through the (un-replayed) file system.
struct Log<'a> {
    fs: &'a Arc<Fs>,
    layout: Layout,
    blocks: u64,
}

impl Log<'_> {
    /// The fs block holding journal block `j`.
    fn locate(&self, j: u64) -> Result<u64> {
        if j >= self.blocks {
            return corrupt(format!(
                "block {j} is past the journal's {} blocks",
                self.blocks
            ));
        }
        match self.layout.map(j, 1)?.mapping {
            Mapping::Mapped(p) => {
                self.fs.check_blocks(p, 1, self.fs.sb.journal_inum)?;
                Ok(p)
            }
            _ => corrupt(format!("journal block {j} is not mapped")),
        }
    }

    fn read(&self, j: u64) -> Result<Vec<u8>> {
        let p = self.locate(j)?;
        self.fs.read_block(p, "journal block")
    }
}

/// Replay the journal of `fs` in memory if the superblock says it needs recovery;
/// `None` when there is nothing to replay. `raw_sb` is the superblock's bytes.
pub(crate) fn replay(fs: &Arc<Fs>, raw_sb: &[u8]) -> Result<Option<Replay>> {
    let sb = &fs.sb;
    if !sb.has_incompat(incompat::RECOVER) {
        return Ok(None);
    }
    if !sb.has_compat(compat::HAS_JOURNAL) {
        return Ok(Some(Replay {
            notes: vec![
                "needs_recovery is set but the file system has no journal: read as it is".into(),
            ],
            ..Replay::default()
        }));
    }
    if sb.journal_inum == 0 {
        let dev = le32(raw_sb, 0xE4);
        let uuid: String = raw_sb[0xD0..0xE0]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        return Err(Error::incompatible(Feature::ExternalJournal, format!(
            "external journal (device {:#x}, journal UUID {uuid}) needs recovery: dio reads only internal journals; mount the image with its journal device or run e2fsck -fy first",
            dev
        )));
    }
    let inode = fs.read_inode(sb.journal_inum)?;
    if inode.file_type() != FileType::Regular {
        return corrupt(format!(
            "journal inode {} is a {}",
            sb.journal_inum,
            inode.file_type().name()
        ));
    }
    let bs = u64::from(sb.block_size);
    let log = Log {
        fs,
        layout: Layout::of(fs, &inode)?,
        blocks: inode.size / bs,
    };
    let jsb = parse_sb(&log.read(0)?, sb.block_size, log.blocks)?;
    if jsb.start == 0 {
        return Ok(Some(Replay {
            notes: vec!["needs_recovery is set but the journal is empty: nothing to replay".into()],
            ..Replay::default()
        }));
    }
    if jsb.incompat & INCOMPAT_FAST_COMMIT != 0 {
        return Err(Error::incompatible(Feature::FastCommit,
            "the journal needs recovery and has fast commits (fast_commit), which dio does not replay: mount the image once or run e2fsck -fy first",
        ));
    }
    let (txns, mut notes) = scan(&log, &jsb)?;
    let mut out = build(&log, &jsb, txns)?;
    out.notes.append(&mut notes);
    let first = jsb.sequence;
    out.notes.insert(
        0,
        format!(
            "the journal needs recovery: replayed in memory ({} transactions from {first}, {} blocks; {} revoked copies skipped); the image is unchanged",
            out.transactions,
            out.blocks.len(),
            out.revoked
        ),
    );
    Ok(Some(out))
}

fn parse_sb(b: &[u8], block_size: u32, journal_blocks: u64) -> Result<JournalSb> {
    if be32(b, 0) != MAGIC {
        return corrupt(format!(
            "no journal superblock (magic {:#010x})",
            be32(b, 0)
        ));
    }
    let kind = be32(b, 4);
    if kind != SUPERBLOCK_V1 && kind != SUPERBLOCK_V2 {
        return corrupt(format!("journal superblock of unknown type {kind}"));
    }
    if be32(b, 0xC) != block_size {
        return corrupt(format!(
            "journal block size {} differs from the file system's {block_size}",
            be32(b, 0xC)
        ));
    }
    let maxlen = u64::from(be32(b, 0x10));
    let first = u64::from(be32(b, 0x14));
    if maxlen > journal_blocks || maxlen < 2 {
        return corrupt(format!(
            "journal length {maxlen} does not fit its inode's {journal_blocks} blocks"
        ));
    }
    if first == 0 || first >= maxlen {
        return corrupt(format!("journal log starts at block {first} of {maxlen}"));
    }
    let start = u64::from(be32(b, 0x1C));
    if start != 0 && (start < first || start >= maxlen) {
        return corrupt(format!(
            "journal start {start} lies outside its log ({first}..{maxlen})"
        ));
    }
    let incompat = if kind == SUPERBLOCK_V2 {
        be32(b, 0x28)
    } else {
        0
    };
    let unknown = incompat & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Error::incompatible(
            Feature::UnknownFlags,
            format!("journal features {unknown:#x} (unknown to dio)"),
        ));
    }
    if incompat & INCOMPAT_CSUM_V2 != 0 && incompat & INCOMPAT_CSUM_V3 != 0 {
        return corrupt("both checksum v2 and v3 are set".into());
    }
    let mut jsb = JournalSb {
        maxlen,
        first,
        sequence: be32(b, 0x18),
        start,
        incompat,
        csum_seed: 0,
    };
    if jsb.csum() {
        // Checksum type 4: crc32c.
        if b.get(0x50) != Some(&4) {
            return corrupt(format!(
                "journal checksum type {} (want crc32c)",
                b.get(0x50).copied().unwrap_or(0)
            ));
        }
        let want = be32(b, 0xFC);
        let mut sbb = b[..1024].to_vec();
        sbb[0xFC..0x100].fill(0);
        let got = crc32c(!0, &sbb);
        if want != got {
            return corrupt(format!(
                "journal superblock checksum {want:#010x} does not match its contents ({got:#010x})"
            ));
        }
        jsb.csum_seed = crc32c(!0, &b[0x30..0x40]);
    }
    Ok(jsb)
}

/// Pass one: the transactions with a valid commit block, in order, each with its
/// tags and revokes. Reads at most one lap of the log.
fn scan(log: &Log<'_>, jsb: &JournalSb) -> Result<(Vec<Txn>, Vec<String>)> {
    let bs = log.fs.sb.block_size as usize;
    let log_len = jsb.maxlen - jsb.first;
    let mut notes = Vec::new();
    let mut done = Vec::new();
    let mut cur = Txn {
        seq: jsb.sequence,
        tags: Vec::new(),
        revokes: Vec::new(),
    };
    let mut blk = jsb.start;
    let mut walked = 0u64;
    loop {
        // Every block of the log once at most: a longer walk means the log wraps
        // onto itself.
        if walked > log_len {
            return corrupt(format!(
                "the log from block {} runs a whole lap without ending",
                jsb.start
            ));
        }
        let b = log.read(blk)?;
        walked += 1;
        if be32(&b, 0) != MAGIC || be32(&b, 8) != cur.seq {
            break;
        }
        match be32(&b, 4) {
            DESCRIPTOR => {
                if jsb.csum() && !block_csum_ok(jsb.csum_seed, &b, bs - 4) {
                    return corrupt(format!(
                        "descriptor block {blk} of transaction {}: checksum mismatch",
                        cur.seq
                    ));
                }
                let tb = jsb.tag_bytes();
                let end = bs - jsb.tail();
                let mut p = 12;
                while p + tb <= end {
                    let t = &b[p..p + tb];
                    let (lo, flags, hi, csum) = if jsb.incompat & INCOMPAT_CSUM_V3 != 0 {
                        (be32(t, 0), be32(t, 4), be32(t, 8), be32(t, 12))
                    } else {
                        (
                            be32(t, 0),
                            u32::from(be16(t, 6)),
                            if jsb.incompat & INCOMPAT_64BIT != 0 {
                                be32(t, 8)
                            } else {
                                0
                            },
                            u32::from(be16(t, 4)),
                        )
                    };
                    let hi = if jsb.incompat & INCOMPAT_64BIT != 0 {
                        hi
                    } else {
                        0
                    };
                    blk = jsb.next(blk);
                    walked += 1;
                    cur.tags.push(Tag {
                        fs_block: u64::from(lo) | u64::from(hi) << 32,
                        log_block: blk,
                        escaped: flags & FLAG_ESCAPE != 0,
                        csum,
                    });
                    p += tb;
                    if flags & FLAG_SAME_UUID == 0 {
                        p += 16;
                    }
                    if flags & FLAG_LAST_TAG != 0 {
                        break;
                    }
                }
            }
            COMMIT => {
                if jsb.csum() && !block_csum_ok(jsb.csum_seed, &b, 16) {
                    notes.push(format!(
                        "transaction {} has a bad commit block checksum: it and the ones after it were not replayed (as the kernel does, which then marks the file system with errors)",
                        cur.seq
                    ));
                    break;
                }
                let next = cur.seq.wrapping_add(1);
                done.push(std::mem::replace(
                    &mut cur,
                    Txn {
                        seq: next,
                        tags: Vec::new(),
                        revokes: Vec::new(),
                    },
                ));
            }
            REVOKE => {
                if jsb.csum() && !block_csum_ok(jsb.csum_seed, &b, bs - 4) {
                    return corrupt(format!(
                        "revoke block {blk} of transaction {}: checksum mismatch",
                        cur.seq
                    ));
                }
                let count = be32(&b, 12) as usize;
                if count < 16 || count > bs - jsb.tail() {
                    return corrupt(format!("revoke block {blk} claims {count} bytes of {bs}"));
                }
                let rec = if jsb.incompat & INCOMPAT_64BIT != 0 {
                    8
                } else {
                    4
                };
                let mut p = 16;
                while p + rec <= count {
                    let r = if rec == 8 {
                        u64::from(be32(&b, p)) << 32 | u64::from(be32(&b, p + 4))
                    } else {
                        u64::from(be32(&b, p))
                    };
                    cur.revokes.push(r);
                    p += rec;
                }
            }
            _ => break,
        }
        blk = jsb.next(blk);
    }
    Ok((done, notes))
}

/// Passes two and three: revokes, then the replay map (later copies win; a copy
/// revoked by its own or a later transaction is skipped). Every copy's checksum is
/// checked.
fn build(log: &Log<'_>, jsb: &JournalSb, txns: Vec<Txn>) -> Result<Replay> {
    let mut revoked: HashMap<u64, usize> = HashMap::new();
    for (i, t) in txns.iter().enumerate() {
        for &r in &t.revokes {
            revoked.insert(r, i);
        }
    }
    let blocks_count = log.fs.sb.blocks_count;
    let mut out = Replay {
        transactions: txns.len() as u64,
        ..Replay::default()
    };
    for (i, t) in txns.iter().enumerate() {
        for tag in &t.tags {
            if revoked.get(&tag.fs_block).is_some_and(|&r| r >= i) {
                out.revoked += 1;
                continue;
            }
            if tag.fs_block >= blocks_count {
                return corrupt(format!(
                    "transaction {} logs block {}, past the file system's {blocks_count} blocks",
                    t.seq, tag.fs_block
                ));
            }
            let at = log.locate(tag.log_block)?;
            if jsb.csum() {
                let data = log.fs.read_block(at, "journal block")?;
                let mut c = crc32c(jsb.csum_seed, &t.seq.to_be_bytes());
                c = crc32c(c, &data);
                let want_ok = if jsb.incompat & INCOMPAT_CSUM_V3 != 0 {
                    c == tag.csum
                } else {
                    c & 0xFFFF == tag.csum
                };
                if !want_ok {
                    return corrupt(format!(
                        "the copy of block {} in transaction {} (journal block {}) fails its checksum",
                        tag.fs_block, t.seq, tag.log_block
                    ));
                }
            }
            out.blocks.insert(
                tag.fs_block,
                Copy {
                    at,
                    escaped: tag.escaped,
                },
            );
        }
    }
    out.escaped = out.blocks.values().filter(|c| c.escaped).count();
    Ok(out)
}
