//! Writing jbd2 transactions into an internal journal (the journal inode), the
//! way the kernel's jbd2 commits them in ordered mode, so that the kernel and
//! e2fsck replay them after a crash.
//!
//! One transaction is: revoke blocks (fs blocks whose earlier journal copies must
//! not be replayed), descriptor blocks whose tags name the fs block each following
//! journal block is a copy of (a copy that begins with the jbd2 magic is stored
//! with those four bytes zeroed and its tag flagged ESCAPE), then a commit block.
//! Tags, tails and checksums follow the journal's features: 32- or 64-bit block
//! numbers, csum v2/v3 (per-tag checksums, descriptor and revoke tails, the
//! commit block's checksum), or the v1 commit checksum (compat `checksum`).
//!
//! Order, which is what makes it crash-safe:
//! 1. at the first commit of an open, the superblock gets `needs_recovery` (as
//!    the kernel keeps it while mounted: without it the kernel discards the
//!    journal); it stays set until the file system is closed clean (the last
//!    handle dropped, or [`Ext::checkpoint`](super::Ext::checkpoint)), so a
//!    commit does not write the superblock twice. When the journal was empty,
//!    the journal superblock gets the transaction's start and id;
//! 2. revoke, descriptor and copy blocks are written, then a flush: they, the
//!    superblock writes of step 1, and every data block the caller wrote before
//!    calling (ordered mode), are durable before
//! 3. the commit block is written and flushed: from here the transaction is
//!    committed and survives a crash (recovery replays it).
//!
//! Two flushes per commit. Checkpointing is lazy, as the kernel's: committed
//! transactions stay in the log (replay redoes them) until the log runs short
//! of space for the next one, or the file system is closed; a checkpoint writes
//! every logged block in place, flushes, then marks the journal empty (and, at
//! close, clears `needs_recovery` and flushes again). Marking the journal empty
//! needs no flush of its own: replaying checkpointed transactions again writes
//! the same bytes.
//!
//! There is no asynchronous commit (the commit block written together with the
//! log blocks, its checksum vouching for them): recovery checks a whole
//! transaction against its commit block only with the v1 `checksum` feature,
//! while csum v2/v3 check each block on its own and replay the rest of a
//! transaction around a bad one, so the flush before the commit block stays.
//!
//! Until it is checkpointed, a block's latest contents are only in the journal:
//! the file system's metadata reads see the journal copy (see
//! [`super::io::MetaIo`]), and a transaction that does not fit the log's free
//! space checkpoints the earlier ones first.
//!
//! Refused: an external journal device, fast-commit journals, revokes in a journal
//! with a v1 superblock (no feature flags to enable them with).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::bytes::crc32c;
use super::journal::{
    be32, block_csum, flush, patch_needs_recovery, put_be32, set_needs_recovery, Copy, Journal,
    Replay, COMMIT, COMPAT_CHECKSUM, DESCRIPTOR, FLAG_ESCAPE, FLAG_LAST_TAG, FLAG_SAME_UUID,
    INCOMPAT_64BIT, INCOMPAT_CSUM_V3, INCOMPAT_FAST_COMMIT, INCOMPAT_REVOKE, MAGIC, REVOKE,
};
use super::superblock::{compat, SUPERBLOCK_OFFSET};
use super::{lock, Fs};
use crate::error::Feature;
use crate::{Error, Result};

/// The ext compat flag of fast commits.
const COMPAT_FAST_COMMIT: u32 = 0x400;

/// An open journal, ready to take transactions.
pub(crate) struct Writer {
    journal: Journal,
    /// The log block the next transaction starts at.
    head: u64,
    /// The first log block of the oldest transaction not yet checkpointed; 0 when
    /// the journal is empty.
    tail: u64,
    /// The next transaction's id.
    tid: u32,
    /// fs blocks whose latest contents are only in the journal (committed, not
    /// checkpointed), and where their copies are.
    pending: BTreeMap<u64, Copy>,
    /// Whether metadata writes of the file system ([`Fs::write_meta`]) checkpoint
    /// after each commit (tests turn it off to leave a journal needing recovery).
    pub(crate) checkpoint: bool,
    /// The error that stopped the writer part way through a commit.
    failed: Option<Error>,
    /// `needs_recovery` was set on disk by this open (cleared at a clean close).
    live: bool,
    /// MUTATION for crash tests (ordered mode broken on purpose): the flush
    /// between the data and the commit block is left out, so a commit can reach
    /// the disk before the data its metadata points at.
    pub(crate) commit_before_data: bool,
}

impl Writer {
    /// Open the journal of `fs` (opened writable, its journal recovered if it
    /// needed it) for writing. `raw_sb` is the superblock's bytes.
    pub(crate) fn open(fs: &Arc<Fs>, raw_sb: &[u8]) -> Result<Writer> {
        let mut journal = Journal::open(fs, raw_sb)?;
        if journal.sb.incompat & INCOMPAT_FAST_COMMIT != 0 || fs.sb.has_compat(COMPAT_FAST_COMMIT) {
            return Err(Error::incompatible(
                Feature::FastCommit,
                "the journal has fast commits (fast_commit): dio does not write such journals",
            ));
        }
        let mut tid = journal.sb.sequence.wrapping_add(1);
        if journal.sb.start != 0 {
            // A log that is not empty although nothing needs recovery: the kernel
            // discards it at mount (jbd2_journal_wipe); so does dio, moving the id
            // past whatever the log holds so no stale block can pass for part of
            // a new transaction.
            tid = super::journal::log_end(fs, &journal)?.wrapping_add(1);
            journal.sb.start = 0;
            journal.sb.sequence = tid;
            journal.write_sb(fs)?;
            flush(fs)?;
        }
        Ok(Writer {
            head: journal.sb.first,
            journal,
            tail: 0,
            tid,
            pending: BTreeMap::new(),
            checkpoint: true,
            failed: None,
            live: false,
            commit_before_data: false,
        })
    }

    /// Blocks of the log (everything after the journal superblock area).
    fn log_len(&self) -> u64 {
        self.journal.sb.maxlen - self.journal.sb.first
    }

    /// Log blocks free for the next transaction.
    fn free(&self) -> u64 {
        let len = self.log_len();
        if self.tail == 0 {
            return len;
        }
        len - (self.head + len - self.tail) % len
    }

    /// Commit `blocks` (fs block, its full new contents) with revoke records for
    /// `revoked` as one transaction, then checkpoint it unless `checkpoint` is
    /// false (it then stays committed in the journal, `needs_recovery` set, to be
    /// replayed by whoever opens the image next). Data blocks the transaction
    /// points at must have been written (completed) before the call: the flush
    /// before the commit block makes them durable first.
    ///
    /// A block both written and revoked is written (its revoke dropped, as jbd2
    /// cancels the revoke of a block it logs again).
    ///
    /// A failure part way (an I/O error) stops the writer: every later commit
    /// returns that error, since the journal may hold a transaction it does not
    /// know the fate of; reopening the image replays whatever was committed.
    pub(crate) fn commit(
        &mut self,
        fs: &Fs,
        blocks: &[(u64, &[u8])],
        revoked: &[u64],
        checkpoint: bool,
    ) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.try_commit(fs, blocks, revoked, checkpoint);
        if let Err(e) = &r {
            // Refusals come before any write; anything else may be part way.
            if !matches!(
                e,
                Error::Invalid(_) | Error::NoSpace(_) | Error::Incompatible(_)
            ) {
                self.failed = Some(e.clone());
            }
        }
        r
    }

    fn try_commit(
        &mut self,
        fs: &Fs,
        blocks: &[(u64, &[u8])],
        revoked: &[u64],
        checkpoint: bool,
    ) -> Result<()> {
        let bs = fs.sb.block_size as usize;
        let jsb = &self.journal.sb;
        let bit64 = jsb.incompat & INCOMPAT_64BIT != 0;
        let mut seen = BTreeSet::new();
        for &(b, data) in blocks {
            if data.len() != bs {
                return Err(Error::Invalid(format!(
                    "journal: block {b} comes with {} bytes, not one {bs}-byte block",
                    data.len()
                )));
            }
            self.check_target(fs, b, bit64)?;
            if !seen.insert(b) {
                return Err(Error::Invalid(format!(
                    "journal: block {b} appears twice in one transaction"
                )));
            }
        }
        let mut revokes: Vec<u64> = Vec::new();
        for &r in revoked {
            self.check_target(fs, r, bit64)?;
            if !seen.contains(&r) {
                revokes.push(r);
            }
        }
        revokes.sort_unstable();
        revokes.dedup();
        if blocks.is_empty() && revokes.is_empty() {
            if checkpoint {
                self.checkpoint(fs, &[], true)?;
            }
            return Ok(());
        }
        if !revokes.is_empty() && !jsb.v2 {
            return Err(Error::incompatible(
                Feature::JournalFormat,
                "the journal has a v1 superblock, without the feature flags revoke records need: run tune2fs -O ^has_journal,has_journal to make a new journal",
            ));
        }

        let (log, v1_sum) = self.build(fs, blocks, &revokes);
        let total = log.len() as u64 + 1;
        if total >= self.log_len() {
            return Err(Error::NoSpace(format!(
                "journal: a transaction of {total} blocks does not fit the journal's {}-block log",
                self.log_len()
            )));
        }
        if total >= self.free() {
            self.checkpoint(fs, &[], false)?;
        }

        // 1. Live: needs_recovery (once per open), and the log's start when it
        // was empty.
        if !self.live {
            set_needs_recovery(fs, true)?;
            self.live = true;
        }
        let mut sb_dirty = false;
        if self.tail == 0 {
            self.tail = self.head;
            self.journal.sb.start = self.head;
            self.journal.sb.sequence = self.tid;
            sb_dirty = true;
        }
        if !revokes.is_empty() && self.journal.sb.incompat & INCOMPAT_REVOKE == 0 {
            self.journal.sb.incompat |= INCOMPAT_REVOKE;
            sb_dirty = true;
        }
        if sb_dirty {
            self.journal.write_sb(fs)?;
        }

        // 2. The transaction's blocks, then a flush.
        let mut at = Vec::with_capacity(log.len());
        let mut pos = self.head;
        for _ in 0..log.len() {
            at.push(self.journal.log.locate(fs, pos)?);
            pos = self.journal.sb.next(pos);
        }
        write_runs(
            fs,
            log.iter()
                .map(|l| l.bytes.as_slice())
                .zip(at.iter().copied()),
        )?;
        if !self.commit_before_data {
            flush(fs)?;
        }

        // 3. The commit block, flushed.
        let commit_at = self.journal.log.locate(fs, pos)?;
        fs.io.write(
            commit_at * bs as u64,
            &commit_block(self, fs, v1_sum),
            "journal commit block",
        )?;
        flush(fs)?;

        for (l, &p) in log.iter().zip(&at) {
            if let Some((b, escaped)) = l.copy_of {
                self.pending.insert(b, Copy { at: p, escaped });
            }
        }
        for r in &revokes {
            self.pending.remove(r);
        }
        fs.io.set_logged(fs.sb.block_size, &self.pending);
        self.head = self.journal.sb.next(pos);
        self.tid = self.tid.wrapping_add(1);

        // 4. Checkpoint, when asked to (else lazily: see the module docs).
        if checkpoint {
            self.checkpoint(fs, blocks, true)?;
        }
        Ok(())
    }

    fn check_target(&self, fs: &Fs, b: u64, bit64: bool) -> Result<()> {
        if b >= fs.sb.blocks_count {
            return Err(Error::Invalid(format!(
                "journal: block {b} is past the file system's {} blocks",
                fs.sb.blocks_count
            )));
        }
        if self.journal.log.holds(b) {
            return Err(Error::Invalid(format!(
                "journal: block {b} is one of the journal's own"
            )));
        }
        if !bit64 && b > u64::from(u32::MAX) {
            return Err(Error::incompatible(
                Feature::JournalFormat,
                format!("journal: block {b} needs 64-bit tags, which this journal lacks"),
            ));
        }
        Ok(())
    }

    /// Write every block whose latest contents are only in the journal in place
    /// (`fresh` has the contents of some of them at hand; the rest are read from
    /// their journal copies), flush, then mark the journal empty (see the module
    /// doc for why that needs no flush); with `clean`, then clear
    /// `needs_recovery` and flush: the image is clean until the next commit.
    fn checkpoint(&mut self, fs: &Fs, fresh: &[(u64, &[u8])], clean: bool) -> Result<()> {
        if self.tail != 0 {
            self.write_back(fs, fresh)?;
        }
        if clean && self.live {
            set_needs_recovery(fs, false)?;
            flush(fs)?;
            self.live = false;
        }
        Ok(())
    }

    /// Close: checkpoint and leave the image clean, unless the writer stopped
    /// on an error or was told not to checkpoint (then the journal stays for
    /// whoever opens the image next to replay).
    pub(crate) fn close(&mut self, fs: &Fs) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.checkpoint {
            return Ok(());
        }
        let r = self.checkpoint(fs, &[], true);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn write_back(&mut self, fs: &Fs, fresh: &[(u64, &[u8])]) -> Result<()> {
        let bs = u64::from(fs.sb.block_size);
        let fresh: HashMap<u64, &[u8]> = fresh.iter().copied().collect();
        let sb_block = SUPERBLOCK_OFFSET / bs;
        // The journal copies not in memory, read in runs of neighbouring log
        // blocks (up to 1 MiB a read) rather than one read each.
        let mut wanted: Vec<(u64, u64)> = self
            .pending
            .iter()
            .filter(|(b, _)| !fresh.contains_key(b))
            .map(|(&b, c)| (c.at, b))
            .collect();
        wanted.sort_unstable();
        let mut copies: HashMap<u64, Vec<u8>> = HashMap::with_capacity(wanted.len());
        let per_read = ((1u64 << 20) / bs).max(1);
        let mut i = 0;
        while i < wanted.len() {
            let mut j = i + 1;
            while j < wanted.len()
                && wanted[j].0 == wanted[j - 1].0 + 1
                && wanted[j].0 - wanted[i].0 < per_read
            {
                j += 1;
            }
            let run = fs.io.read_plain(
                wanted[i].0 * bs,
                ((wanted[j - 1].0 - wanted[i].0 + 1) * bs) as usize,
                "journal blocks",
            )?;
            for (k, &(_, b)) in wanted[i..j].iter().enumerate() {
                let at = k * bs as usize;
                copies.insert(b, run[at..at + bs as usize].to_vec());
            }
            i = j;
        }
        let mut out: Vec<(Vec<u8>, u64)> = Vec::with_capacity(self.pending.len());
        for (&b, copy) in &self.pending {
            let mut data = match fresh.get(&b) {
                Some(d) => d.to_vec(),
                None => {
                    let mut d = copies.remove(&b).expect("read above");
                    if copy.escaped {
                        Replay::unescape(&mut d);
                    }
                    d
                }
            };
            if b == sb_block {
                // The superblock keeps needs_recovery until the journal is empty:
                // a crash before that replays the journal (and clears it then).
                let o = (SUPERBLOCK_OFFSET % bs) as usize;
                patch_needs_recovery(&mut data[o..o + 1024], true);
            }
            out.push((data, b));
        }
        write_runs(fs, out.iter().map(|(d, b)| (d.as_slice(), *b)))?;
        flush(fs)?;
        // Marking the journal empty needs no flush of its own: until it lands,
        // recovery replays transactions whose blocks are already in place (the
        // same bytes: a block freed since was revoked by a later commit, whose
        // flushes order these writes too).
        self.journal.sb.start = 0;
        self.journal.sb.sequence = self.tid;
        self.journal.write_sb(fs)?;
        self.tail = 0;
        self.pending.clear();
        fs.io.set_logged(fs.sb.block_size, &self.pending);
        Ok(())
    }

    /// The transaction's log blocks (revokes, then descriptors each followed by
    /// its copies), and the v1 commit checksum where the journal has one.
    fn build(&self, fs: &Fs, blocks: &[(u64, &[u8])], revokes: &[u64]) -> (Vec<LogBlock>, u32) {
        let bs = fs.sb.block_size as usize;
        let jsb = &self.journal.sb;
        let tid = self.tid;
        let tail = jsb.tail();
        let bit64 = jsb.incompat & INCOMPAT_64BIT != 0;
        let mut log = Vec::new();

        let rec = if bit64 { 8 } else { 4 };
        for chunk in revokes.chunks((bs - 16 - tail) / rec) {
            let mut b = header(bs, REVOKE, tid);
            let mut p = 16;
            for &r in chunk {
                if bit64 {
                    put_be32(&mut b, p, (r >> 32) as u32);
                    put_be32(&mut b, p + 4, r as u32);
                } else {
                    put_be32(&mut b, p, r as u32);
                }
                p += rec;
            }
            put_be32(&mut b, 12, p as u32);
            if jsb.csum() {
                let c = block_csum(jsb.csum_seed, &b, bs - 4);
                put_be32(&mut b, bs - 4, c);
            }
            log.push(LogBlock {
                bytes: b,
                copy_of: None,
            });
        }

        let tb = jsb.tag_bytes();
        let end = bs - tail;
        let v3 = jsb.incompat & INCOMPAT_CSUM_V3 != 0;
        let mut v1_sum = !0u32;
        let mut rest = blocks;
        while !rest.is_empty() {
            let mut desc = header(bs, DESCRIPTOR, tid);
            let mut copies = Vec::new();
            let mut p = 12;
            let mut last_tag = 0;
            for (i, &(b, data)) in rest.iter().enumerate() {
                let uuid = i == 0;
                let need = tb + if uuid { 16 } else { 0 };
                if p + need > end {
                    break;
                }
                let mut copy = data.to_vec();
                let escaped = be32(&copy, 0) == MAGIC;
                if escaped {
                    copy[..4].fill(0);
                }
                let mut flags = 0;
                if escaped {
                    flags |= FLAG_ESCAPE;
                }
                if !uuid {
                    flags |= FLAG_SAME_UUID;
                }
                let csum = if jsb.csum() {
                    crc32c(crc32c(jsb.csum_seed, &tid.to_be_bytes()), &copy)
                } else {
                    0
                };
                put_be32(&mut desc, p, b as u32);
                if v3 {
                    put_be32(&mut desc, p + 4, flags);
                    put_be32(&mut desc, p + 8, (b >> 32) as u32);
                    put_be32(&mut desc, p + 12, csum);
                } else {
                    desc[p + 4..p + 6].copy_from_slice(&(csum as u16).to_be_bytes());
                    desc[p + 6..p + 8].copy_from_slice(&(flags as u16).to_be_bytes());
                    if bit64 {
                        put_be32(&mut desc, p + 8, (b >> 32) as u32);
                    }
                }
                last_tag = p;
                p += tb;
                if uuid {
                    desc[p..p + 16].copy_from_slice(&jsb.uuid);
                    p += 16;
                }
                copies.push(LogBlock {
                    bytes: copy,
                    copy_of: Some((b, escaped)),
                });
            }
            // The last tag's flags: a 32-bit field after the block number with
            // csum v3, else a 16-bit one at +6.
            if v3 {
                let f = be32(&desc, last_tag + 4) | FLAG_LAST_TAG;
                put_be32(&mut desc, last_tag + 4, f);
            } else {
                desc[last_tag + 7] |= FLAG_LAST_TAG as u8;
            }
            if jsb.csum() {
                let c = block_csum(jsb.csum_seed, &desc, bs - 4);
                put_be32(&mut desc, bs - 4, c);
            }
            rest = &rest[copies.len()..];
            if jsb.compat & COMPAT_CHECKSUM != 0 {
                v1_sum = crc32_be(v1_sum, &desc);
                for c in &copies {
                    v1_sum = crc32_be(v1_sum, &c.bytes);
                }
            }
            log.push(LogBlock {
                bytes: desc,
                copy_of: None,
            });
            log.append(&mut copies);
        }
        (log, v1_sum)
    }
}

/// One block of a transaction's log.
struct LogBlock {
    bytes: Vec<u8>,
    /// For a copy: the fs block it is a copy of, and whether it is escaped.
    copy_of: Option<(u64, bool)>,
}

fn header(bs: usize, kind: u32, tid: u32) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    put_be32(&mut b, 0, MAGIC);
    put_be32(&mut b, 4, kind);
    put_be32(&mut b, 8, tid);
    b
}

/// The commit block of the transaction being written by `w`: its time, and its
/// checksum (csum v2/v3: crc32c of the block; v1: crc32 of the descriptors and
/// copies, `v1_sum`).
fn commit_block(w: &Writer, fs: &Fs, v1_sum: u32) -> Vec<u8> {
    let bs = fs.sb.block_size as usize;
    let jsb = &w.journal.sb;
    let mut b = header(bs, COMMIT, w.tid);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    b[0x30..0x38].copy_from_slice(&now.as_secs().to_be_bytes());
    put_be32(&mut b, 0x38, now.subsec_nanos());
    if jsb.csum() {
        let c = block_csum(jsb.csum_seed, &b, 0x10);
        put_be32(&mut b, 0x10, c);
    } else if jsb.compat & COMPAT_CHECKSUM != 0 {
        // JBD2_CRC32_CHKSUM, 4 bytes.
        b[0xC] = 1;
        b[0xD] = 4;
        put_be32(&mut b, 0x10, v1_sum);
    }
    b
}

/// Write `(contents, fs block)` pairs, one device write per run of consecutive
/// fs blocks.
fn write_runs<'a>(fs: &Fs, blocks: impl Iterator<Item = (&'a [u8], u64)>) -> Result<()> {
    let bs = u64::from(fs.sb.block_size);
    let mut run: Vec<u8> = Vec::new();
    let mut start = 0u64;
    let mut next = u64::MAX;
    for (data, b) in blocks {
        if b != next && !run.is_empty() {
            fs.io.write(start * bs, &run, "journaled blocks")?;
            run.clear();
        }
        if run.is_empty() {
            start = b;
        }
        run.extend_from_slice(data);
        next = b + 1;
        // Bounded runs: a long transaction is not copied whole into one buffer.
        if run.len() >= 1 << 20 {
            fs.io.write(start * bs, &run, "journaled blocks")?;
            run.clear();
            next = u64::MAX;
        }
    }
    if !run.is_empty() {
        fs.io.write(start * bs, &run, "journaled blocks")?;
    }
    Ok(())
}

/// The kernel's `crc32_be(seed, data)` (polynomial 0x04C11DB7, most significant
/// bit first, no inversions): the v1 commit checksum.
fn crc32_be(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl Fs {
    /// Whether metadata of this file system goes through a journal.
    pub(crate) fn journaled(&self) -> bool {
        lock(&self.journal).is_some()
    }

    /// Make metadata changes durable, the one call for every file system: with a
    /// journal, `blocks` and `revoked` are one transaction ([`Writer::commit`]),
    /// checkpointed lazily (see the module docs); without, `blocks`
    /// are written in place and flushed (`revoked` means nothing there). On
    /// return the change survives a crash. Data blocks the change points at
    /// must have been written before the call (the flush covers them). The
    /// caller holds the metadata lock.
    pub(crate) fn commit_metadata(&self, blocks: &[(u64, &[u8])], revoked: &[u64]) -> Result<()> {
        let mut journal = lock(&self.journal);
        match journal.as_mut() {
            Some(w) => w.commit(self, blocks, revoked, false),
            None => {
                let bs = self.sb.block_size as usize;
                for &(b, data) in blocks {
                    if data.len() != bs || b >= self.sb.blocks_count {
                        return Err(Error::Invalid(format!(
                            "metadata block {b}: {} bytes, or past the file system's {} blocks",
                            data.len(),
                            self.sb.blocks_count
                        )));
                    }
                }
                let mut sorted = blocks.to_vec();
                sorted.sort_unstable_by_key(|&(b, _)| b);
                write_runs(self, sorted.iter().map(|&(b, d)| (d, b)))?;
                flush(self)
            }
        }
    }

    /// The blocks of the runs `freed` (start, length) whose latest contents are
    /// only in the journal: freed metadata the transaction that frees them must
    /// revoke, or a checkpoint (or a replay) would write their old contents over
    /// whatever reuses them.
    pub(crate) fn logged_in(&self, freed: &[(u64, u64)]) -> Vec<u64> {
        let journal = lock(&self.journal);
        let Some(w) = journal.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &(s, n) in freed {
            out.extend(w.pending.range(s..s.saturating_add(n)).map(|(b, _)| *b));
        }
        out
    }

    /// Commit a transaction through the journal (see [`Writer::commit`]).
    pub(crate) fn journal_commit(
        &self,
        blocks: &[(u64, &[u8])],
        revoked: &[u64],
        checkpoint: bool,
    ) -> Result<()> {
        match lock(&self.journal).as_mut() {
            Some(w) => {
                if !checkpoint {
                    w.checkpoint = false;
                }
                w.commit(self, blocks, revoked, checkpoint)
            }
            None => Err(Error::Invalid(
                "the file system has no journal open for writing".into(),
            )),
        }
    }

    /// Write metadata bytes at device byte `offset`: with a journal, the fs blocks
    /// they fall in, read and patched, as one transaction (checkpointed unless
    /// the writer's knob says otherwise); without, in place. The caller holds the
    /// metadata lock.
    pub(crate) fn write_meta(&self, offset: u64, data: &[u8], what: &str) -> Result<()> {
        if !self.journaled() {
            return self.io.write(offset, data, what);
        }
        if data.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.sb.block_size);
        let (first, last) = (offset / bs, (offset + data.len() as u64 - 1) / bs);
        let mut blocks = Vec::new();
        for b in first..=last {
            let mut block = self.read_block(b, what)?;
            let b0 = b * bs;
            let s = offset.max(b0);
            let e = (offset + data.len() as u64).min(b0 + bs);
            block[(s - b0) as usize..(e - b0) as usize]
                .copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
            blocks.push((b, block));
        }
        let refs: Vec<(u64, &[u8])> = blocks.iter().map(|(b, d)| (*b, d.as_slice())).collect();
        self.commit_metadata(&refs, &[])
    }
}

impl Drop for Fs {
    /// A clean close: the journal checkpointed and `needs_recovery` cleared.
    /// Errors cannot be reported here; the journal then stays committed and is
    /// replayed by whoever opens the image next ([`super::Ext::checkpoint`]
    /// reports them).
    fn drop(&mut self) {
        let w = self.journal.get_mut().map(Option::take);
        if let Ok(Some(mut w)) = w {
            let _ = w.close(self);
        }
    }
}

impl super::Ext {
    /// Checkpoint the journal and leave the image clean (`needs_recovery`
    /// cleared), as dropping the last handle of the file system does, but with
    /// errors reported. Committed transactions are durable without it (a crash
    /// leaves them for journal replay); this is for callers that want the image
    /// clean before they go on (another tool opening it, a copy). No effect
    /// without a journal, or after [`super::Ext::set_journal_checkpoint`]`(false)`.
    pub fn checkpoint(&self) -> Result<()> {
        let _meta = lock(&self.fs.meta);
        match lock(&self.fs.journal).as_mut() {
            Some(w) => w.close(&self.fs),
            None => Ok(()),
        }
    }

    /// MUTATION, for crash tests only: break ordered mode on purpose. With `on`,
    /// a journal commit no longer flushes the data blocks its metadata points
    /// at before writing its commit block, so a crash can leave a committed
    /// transaction pointing at blocks whose data never landed (stale bytes in
    /// a file whose size covers them). The crash harness must catch it. Never
    /// use it for anything else.
    #[doc(hidden)]
    pub fn mutation_commit_before_data(&self, on: bool) {
        if let Some(w) = lock(&self.fs.journal).as_mut() {
            w.commit_before_data = on;
        }
    }
}

impl Fs {
    /// Whether the flush that orders data before the metadata pointing at it
    /// may be left to the journal commit: with a journal the commit flushes
    /// before its commit block anyway (unless broken on purpose, see
    /// [`super::Ext::mutation_commit_before_data`], which then skips this one
    /// too).
    pub(crate) fn data_flush_in_commit(&self) -> bool {
        lock(&self.journal).is_some()
    }
}

/// Whether `fs` keeps a journal that writes must go through.
pub(crate) fn wants_journal(fs: &Fs) -> bool {
    fs.sb.has_compat(compat::HAS_JOURNAL)
}

#[cfg(test)]
mod tests {
    use super::crc32_be;
    use crate::device::Device;
    use crate::ext::Ext;
    use crate::{MemDevice, MemDeviceConfig};
    use std::io::Read;
    use std::sync::Arc;

    fn fixture(name: &str) -> (Arc<MemDevice>, u64) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/ext/{name}.img.gz"));
        let mut img = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_end(&mut img)
            .unwrap();
        let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(img.len() as u64, 512)));
        dev.write_raw(0, &img);
        (dev, img.len() as u64)
    }

    /// `commit_metadata` makes the blocks durable (through the journal, read
    /// back from it before the checkpoint), and a close leaves them in place and
    /// the journal clean, with or without a journal.
    #[test]
    fn commit_metadata_lands_blocks_durably_with_or_without_a_journal() {
        for (name, journaled) in [("ext2-1k", false), ("ext3-2k", true)] {
            let (dev, size) = fixture(name);
            let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn Device>, size).unwrap();
            let fs = &ext.fs;
            assert_eq!(fs.journaled(), journaled);
            let bs = fs.sb.block_size as usize;
            let b = fs.sb.blocks_count - 1;
            let data = vec![0x5A; bs];
            let flushes = dev.stats().flushes;
            fs.commit_metadata(&[(b, &data)], &[]).unwrap();
            assert!(dev.stats().flushes > flushes, "{name}");
            assert_eq!(fs.read_block(b, "test").unwrap(), data, "{name}");
            let sb = dev.read_raw(1024, 1024);
            assert_eq!(
                super::super::bytes::le32(&sb, 0x60) & 0x4 != 0,
                journaled,
                "{name}: needs_recovery while open"
            );
            // A second commit does not write the superblock again.
            let requests = dev.stats().requests;
            fs.commit_metadata(&[(b, &data)], &[]).unwrap();
            if journaled {
                // Descriptor and copy (one run), then the commit block.
                assert_eq!(dev.stats().requests - requests, 2, "{name}");
            }
            assert!(fs.commit_metadata(&[(b, &data[1..])], &[]).is_err());
            drop(ext);
            assert_eq!(dev.read_raw(b * bs as u64, bs), data, "{name}");
            let sb = dev.read_raw(1024, 1024);
            assert_eq!(super::super::bytes::le32(&sb, 0x60) & 0x4, 0, "{name}");
        }
    }

    /// A write that fails part way through a commit stops the writer: later
    /// commits fail too, even once the device works again.
    #[test]
    fn an_io_error_part_way_stops_the_writer() {
        let (dev, size) = fixture("ext3-2k");
        let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn Device>, size).unwrap();
        let fs = &ext.fs;
        let bs = fs.sb.block_size as usize;
        let b = fs.sb.blocks_count - 1;
        let data = vec![0x5A; bs];
        dev.fail_range(0..size, Some(crate::Op::Write));
        let e = fs.commit_metadata(&[(b, &data)], &[]).unwrap_err();
        assert!(matches!(e, crate::Error::Io { .. }), "{e}");
        dev.clear_faults();
        let again = fs.commit_metadata(&[(b, &data)], &[]).unwrap_err();
        assert!(matches!(again, crate::Error::Io { .. }), "{again}");
        // A refusal does not stop a writer.
        let (dev, size) = fixture("ext3-2k");
        let ext = Ext::open_writable(Arc::clone(&dev) as Arc<dyn Device>, size).unwrap();
        let fs = &ext.fs;
        assert!(fs.commit_metadata(&[(b, &data[1..])], &[]).is_err());
        fs.commit_metadata(&[(b, &data)], &[]).unwrap();
    }

    #[test]
    fn crc32_be_matches_the_kernel_convention() {
        // CRC-32/BZIP2 is crc32_be with ~0 in and out: check value 0xFC891918.
        assert_eq!(!crc32_be(!0, b"123456789"), 0xFC89_1918);
    }
}
