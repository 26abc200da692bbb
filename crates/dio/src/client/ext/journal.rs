//! The jbd2 journal's recovery: when the superblock says the journal needs
//! recovery, find the committed transactions the kernel would replay. One scan,
//! two sinks: [`replay`] serves their blocks in place of the image's, in memory
//! (read-only opens: the image is never written); [`recover_on_disk`] writes them
//! in place, resets the journal and clears `needs_recovery`, as e2fsck and the
//! kernel do (writable opens). Writing transactions is [`super::jwrite`]'s.
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
//! What the scan gives: a map "fs block -> journal block holding its replayed
//! contents". In memory, metadata reads ([`super::io::MetaIo`]) patch those blocks in; the
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

use super::bytes::{crc32c, le32, put32};
use super::inode::FileType;
use super::map::{FileExtent, Layout};
use super::superblock::{compat, incompat, ro_compat, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use super::Fs;
use crate::{Error, Result};

pub(super) const MAGIC: u32 = 0xC03B_3998;
pub(super) const DESCRIPTOR: u32 = 1;
pub(super) const COMMIT: u32 = 2;
const SUPERBLOCK_V1: u32 = 3;
const SUPERBLOCK_V2: u32 = 4;
pub(super) const REVOKE: u32 = 5;

/// Journal compat features: the v1 commit checksum (crc32 of the transaction).
pub(super) const COMPAT_CHECKSUM: u32 = 0x1;

/// Journal incompat features.
pub(super) const INCOMPAT_REVOKE: u32 = 0x1;
pub(super) const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
pub(super) const INCOMPAT_CSUM_V2: u32 = 0x8;
pub(super) const INCOMPAT_CSUM_V3: u32 = 0x10;
pub(super) const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const INCOMPAT_KNOWN: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

/// Tag flags.
pub(super) const FLAG_ESCAPE: u32 = 1;
pub(super) const FLAG_SAME_UUID: u32 = 2;
pub(super) const FLAG_LAST_TAG: u32 = 8;

pub(super) fn be32(b: &[u8], off: usize) -> u32 {
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

pub(super) fn put_be32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off.saturating_add(4)) {
        s.copy_from_slice(&v.to_be_bytes());
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

/// The outcome of a journal replay (in memory or on disk).
#[derive(Debug, Default)]
pub(crate) struct Replay {
    pub(crate) blocks: BTreeMap<u64, Copy>,
    pub(crate) transactions: u64,
    pub(crate) revoked: u64,
    pub(crate) escaped: usize,
    pub(crate) notes: Vec<String>,
    /// The first transaction id the scan did not find committed.
    next_seq: u32,
    /// Whether a log was scanned (false: nothing to replay).
    scanned: bool,
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

/// The journal superblock fields recovery and the writer use.
pub(super) struct JournalSb {
    pub(super) maxlen: u64,
    pub(super) first: u64,
    pub(super) sequence: u32,
    pub(super) start: u64,
    pub(super) compat: u32,
    pub(super) incompat: u32,
    pub(super) csum_seed: u32,
    /// A v2 superblock (v1 has no feature fields).
    pub(super) v2: bool,
    pub(super) uuid: [u8; 16],
}

impl JournalSb {
    pub(super) fn csum(&self) -> bool {
        self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0
    }
    pub(super) fn tail(&self) -> usize {
        if self.csum() {
            4
        } else {
            0
        }
    }
    pub(super) fn tag_bytes(&self) -> usize {
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
    pub(super) fn next(&self, b: u64) -> u64 {
        if b + 1 >= self.maxlen {
            self.first
        } else {
            b + 1
        }
    }
}

/// The block-tail (descriptor, revoke) and commit-block checksum: crc32c of the
/// whole block with the checksum field zeroed.
pub(super) fn block_csum(seed: u32, block: &[u8], field: usize) -> u32 {
    let mut b = block.to_vec();
    b[field..field + 4].fill(0);
    crc32c(seed, &b)
}

fn block_csum_ok(seed: u32, block: &[u8], field: usize) -> bool {
    block_csum(seed, block, field) == be32(block, field)
}

/// The journal superblock's checksum (over its first 1024 bytes).
fn sb_csum(b: &[u8]) -> u32 {
    let mut sbb = b[..1024].to_vec();
    sbb[0xFC..0x100].fill(0);
    crc32c(!0, &sbb)
}

/// Where the journal inode's blocks are: its mapped runs, read once.
pub(super) struct Log {
    ino: u32,
    runs: Vec<FileExtent>,
    blocks: u64,
}

impl Log {
    /// The journal inode's map (an internal journal).
    fn open(fs: &Arc<Fs>) -> Result<Log> {
        let ino = fs.sb.journal_inum;
        let inode = fs.read_inode(ino)?;
        if inode.file_type() != FileType::Regular {
            return corrupt(format!(
                "journal inode {ino} is a {}",
                inode.file_type().name()
            ));
        }
        let blocks = inode.size / u64::from(fs.sb.block_size);
        let runs = Layout::of(fs, &inode)?.runs(blocks)?;
        Ok(Log { ino, runs, blocks })
    }

    /// The fs block holding journal block `j`.
    pub(super) fn locate(&self, fs: &Fs, j: u64) -> Result<u64> {
        if j >= self.blocks {
            return corrupt(format!(
                "block {j} is past the journal's {} blocks",
                self.blocks
            ));
        }
        let i = self.runs.partition_point(|e| e.logical + e.len <= j);
        match self.runs.get(i) {
            Some(e) if e.logical <= j && !e.unwritten => {
                let p = e.physical + (j - e.logical);
                fs.check_blocks(p, 1, self.ino)?;
                Ok(p)
            }
            _ => corrupt(format!("journal block {j} is not mapped")),
        }
    }

    /// Whether fs block `p` is one of the journal's.
    pub(super) fn holds(&self, p: u64) -> bool {
        self.runs
            .iter()
            .any(|e| (e.physical..e.physical.saturating_add(e.len)).contains(&p))
    }

    pub(super) fn read(&self, fs: &Fs, j: u64) -> Result<Vec<u8>> {
        let p = self.locate(fs, j)?;
        fs.read_block(p, "journal block")
    }
}

/// An internal journal: its map and its superblock (parsed, and the block as
/// read, which [`Journal::write_sb`] writes back with the parsed fields).
pub(super) struct Journal {
    pub(super) log: Log,
    pub(super) sb: JournalSb,
    raw: Vec<u8>,
}

impl Journal {
    /// Open the journal of `fs`: the journal inode's; an external journal device
    /// is refused.
    pub(super) fn open(fs: &Arc<Fs>, raw_sb: &[u8]) -> Result<Journal> {
        let uuid_set = raw_sb
            .get(0xD0..0xE0)
            .is_some_and(|u| u.iter().any(|&b| b != 0));
        if fs.sb.journal_inum == 0 || uuid_set {
            let dev = le32(raw_sb, 0xE4);
            let uuid: String = raw_sb
                .get(0xD0..0xE0)
                .unwrap_or(&[])
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            return Err(Error::incompatible(
                Feature::ExternalJournal,
                format!(
                    "external journal (device {dev:#x}, journal UUID {uuid}): dio uses only internal journals (the journal inode)"
                ),
            ));
        }
        let log = Log::open(fs)?;
        let raw = log.read(fs, 0)?;
        let sb = parse_sb(&raw, fs.sb.block_size, log.blocks)?;
        Ok(Journal { log, sb, raw })
    }

    /// Write the journal superblock with the current `sb.start`, `sb.sequence`
    /// and `sb.incompat`, and its checksum.
    pub(super) fn write_sb(&mut self, fs: &Fs) -> Result<()> {
        put_be32(&mut self.raw, 0x18, self.sb.sequence);
        put_be32(&mut self.raw, 0x1C, self.sb.start as u32);
        if self.sb.v2 {
            put_be32(&mut self.raw, 0x28, self.sb.incompat);
        }
        if self.sb.csum() {
            let c = sb_csum(&self.raw);
            put_be32(&mut self.raw, 0xFC, c);
        }
        let p = self.log.locate(fs, 0)?;
        fs.io.write(
            p * u64::from(fs.sb.block_size),
            &self.raw,
            "journal superblock",
        )
    }
}

/// Make every completed write of the image durable.
pub(super) fn flush(fs: &Fs) -> Result<()> {
    fs.io
        .device()
        .flush()
        .map_err(|e| Error::os("flushing the image", e))
}

/// Set or clear `needs_recovery` in the primary superblock on disk (its checksum
/// updated), reading it fresh: the caller holds whatever lock keeps other
/// superblock writers out.
pub(super) fn set_needs_recovery(fs: &Fs, on: bool) -> Result<()> {
    let mut sb = fs
        .io
        .read_plain(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "superblock")?;
    patch_needs_recovery(&mut sb, on);
    fs.io.write(SUPERBLOCK_OFFSET, &sb, "superblock")
}

/// Set or clear `needs_recovery` in superblock bytes `sb` (1024 of them), with
/// the checksum updated where the file system has metadata_csum.
pub(super) fn patch_needs_recovery(sb: &mut [u8], on: bool) {
    let mut f = le32(sb, 0x60);
    if on {
        f |= incompat::RECOVER;
    } else {
        f &= !incompat::RECOVER;
    }
    put32(sb, 0x60, f);
    if le32(sb, 0x64) & ro_compat::METADATA_CSUM != 0 && sb.len() >= SUPERBLOCK_SIZE {
        let c = crc32c(!0, &sb[..0x3FC]);
        put32(sb, 0x3FC, c);
    }
}

/// Recovery's scan, shared by both sinks: `None` when the superblock does not
/// say the journal needs recovery; else the replay map and, where a log was
/// scanned, the journal (to reset after an on-disk replay).
fn find(fs: &Arc<Fs>, raw_sb: &[u8]) -> Result<Option<(Replay, Option<Journal>)>> {
    let sb = &fs.sb;
    if !sb.has_incompat(incompat::RECOVER) {
        return Ok(None);
    }
    if !sb.has_compat(compat::HAS_JOURNAL) {
        let r = Replay {
            notes: vec![
                "needs_recovery is set but the file system has no journal: nothing to replay"
                    .into(),
            ],
            ..Replay::default()
        };
        return Ok(Some((r, None)));
    }
    let journal = Journal::open(fs, raw_sb).map_err(|e| match e {
        Error::Incompatible(i) if i.feature == Feature::ExternalJournal => Error::incompatible(
            Feature::ExternalJournal,
            format!(
                "{}; it needs recovery: mount the image with its journal device or run e2fsck -fy first",
                i.detail
            ),
        ),
        e => e,
    })?;
    let jsb = &journal.sb;
    if jsb.start == 0 {
        let r = Replay {
            notes: vec!["needs_recovery is set but the journal is empty: nothing to replay".into()],
            next_seq: jsb.sequence,
            ..Replay::default()
        };
        return Ok(Some((r, Some(journal))));
    }
    if jsb.incompat & INCOMPAT_FAST_COMMIT != 0 {
        return Err(Error::incompatible(Feature::FastCommit,
            "the journal needs recovery and has fast commits (fast_commit), which dio does not replay: mount the image once or run e2fsck -fy first",
        ));
    }
    let (txns, next_seq, mut notes) = scan(fs, &journal.log, jsb)?;
    let mut out = build(fs, &journal.log, jsb, txns)?;
    out.notes.append(&mut notes);
    out.next_seq = next_seq;
    out.scanned = true;
    Ok(Some((out, Some(journal))))
}

/// Replay the journal of `fs` in memory if the superblock says it needs recovery;
/// `None` when there is nothing to replay. `raw_sb` is the superblock's bytes.
pub(crate) fn replay(fs: &Arc<Fs>, raw_sb: &[u8]) -> Result<Option<Replay>> {
    let Some((mut out, journal)) = find(fs, raw_sb)? else {
        return Ok(None);
    };
    if out.scanned {
        let first = journal.map(|j| j.sb.sequence).unwrap_or(0);
        out.notes.insert(
            0,
            format!(
                "the journal needs recovery: replayed in memory ({} transactions from {first}, {} blocks; {} revoked copies skipped); the image is unchanged",
                out.transactions,
                out.blocks.len(),
                out.revoked
            ),
        );
    }
    Ok(Some(out))
}

/// Replay the journal of `fs` on disk if the superblock says it needs recovery,
/// as e2fsck does: every replayed block written in place and flushed, then the
/// journal marked empty (`s_start` 0, the sequence moved past every transaction
/// in the log) and `needs_recovery` cleared, flushed. `None` when the journal
/// did not need recovery.
///
/// A crash part way leaves the journal as it was (it is reset only after the
/// replayed blocks are durable), so running it again replays the same blocks.
pub(crate) fn recover_on_disk(fs: &Arc<Fs>, raw_sb: &[u8]) -> Result<Option<Replay>> {
    let Some((mut out, journal)) = find(fs, raw_sb)? else {
        return Ok(None);
    };
    let bs = u64::from(fs.sb.block_size);
    for (&block, copy) in &out.blocks {
        let mut data = fs.read_block(copy.at, "journal block")?;
        if copy.escaped {
            Replay::unescape(&mut data);
        }
        fs.io.write(block * bs, &data, "replayed block")?;
    }
    flush(fs)?;
    if let Some(mut j) = journal {
        let first = j.sb.sequence;
        if out.scanned {
            // Past every transaction the log may hold, committed or not (the
            // kernel's and e2fsck's `++end_transaction`): no stale block of the
            // old log can pass for part of the next transaction.
            j.sb.sequence = out.next_seq.wrapping_add(1);
            j.sb.start = 0;
            j.write_sb(fs)?;
            out.notes.insert(
                0,
                format!(
                    "the journal needed recovery: replayed on disk ({} transactions from {first}, {} blocks; {} revoked copies skipped)",
                    out.transactions,
                    out.blocks.len(),
                    out.revoked
                ),
            );
        }
    }
    set_needs_recovery(fs, false)?;
    flush(fs)?;
    Ok(Some(out))
}

/// The id of the first transaction not found committed in `journal`'s log
/// (what recovery would stop at), without replaying anything.
pub(super) fn log_end(fs: &Fs, journal: &Journal) -> Result<u32> {
    if journal.sb.start == 0 {
        return Ok(journal.sb.sequence);
    }
    Ok(scan(fs, &journal.log, &journal.sb)?.1)
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
    let v2 = kind == SUPERBLOCK_V2;
    let (compat, incompat) = if v2 {
        (be32(b, 0x24), be32(b, 0x28))
    } else {
        (0, 0)
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
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[0x30..0x40]);
    let mut jsb = JournalSb {
        maxlen,
        first,
        sequence: be32(b, 0x18),
        start,
        compat,
        incompat,
        csum_seed: 0,
        v2,
        uuid,
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
        let got = sb_csum(b);
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
/// tags and revokes, and the id of the first transaction not found committed.
/// Reads at most one lap of the log.
fn scan(fs: &Fs, log: &Log, jsb: &JournalSb) -> Result<(Vec<Txn>, u32, Vec<String>)> {
    let bs = fs.sb.block_size as usize;
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
        // Every block of the log once at most. A transaction still being
        // written when the log was full can run past a lap (its blocks
        // overwrite the oldest, checkpointed ones, while the journal superblock
        // still starts there): it has no commit block within the lap, so the
        // journal ends there, as the kernel's and e2fsck's scans end it (at the
        // first block whose sequence is not the next).
        if walked > log_len {
            break;
        }
        let b = log.read(fs, blk)?;
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
    Ok((done, cur.seq, notes))
}

/// Passes two and three: revokes, then the replay map (later copies win; a copy
/// revoked by its own or a later transaction is skipped). Every copy's checksum is
/// checked.
fn build(fs: &Fs, log: &Log, jsb: &JournalSb, txns: Vec<Txn>) -> Result<Replay> {
    let mut revoked: HashMap<u64, usize> = HashMap::new();
    for (i, t) in txns.iter().enumerate() {
        for &r in &t.revokes {
            revoked.insert(r, i);
        }
    }
    let blocks_count = fs.sb.blocks_count;
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
            let at = log.locate(fs, tag.log_block)?;
            if jsb.csum() {
                let data = fs.read_block(at, "journal block")?;
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
