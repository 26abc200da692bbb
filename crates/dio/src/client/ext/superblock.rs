//! The superblock: geometry, feature flags and checksum seed, parsed from the 1024
//! bytes at byte 1024 of the image and checked before anything else is read.
//!
//! Feature policy: an incompat feature dio does not understand refuses the image
//! ("incompatible: FEATURE"), because reading on would misread it. Unknown ro_compat
//! features are fine for reading and refuse writing, as the kernel refuses a
//! read-write mount.

use super::bytes::{crc32c, le16, le32, u8at};
use crate::error::{CorruptKind, Feature};
use crate::{Error, Result};

/// Byte offset of the primary superblock.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Size of the superblock.
pub const SUPERBLOCK_SIZE: usize = 1024;
const MAGIC: u16 = 0xEF53;

/// compat feature bits that matter here.
pub mod compat {
    /// Has a journal.
    pub const HAS_JOURNAL: u32 = 0x4;
    /// Hashed (htree) directories.
    pub const DIR_INDEX: u32 = 0x20;
    /// Backup superblocks only in the groups named in `s_backup_bgs`.
    pub const SPARSE_SUPER2: u32 = 0x200;
}

/// incompat feature bits.
pub mod incompat {
    /// Compression (never finished upstream).
    pub const COMPRESSION: u32 = 0x1;
    /// Directory entries carry a file type.
    pub const FILETYPE: u32 = 0x2;
    /// The journal needs recovery.
    pub const RECOVER: u32 = 0x4;
    /// This is an external journal device.
    pub const JOURNAL_DEV: u32 = 0x8;
    /// Meta block groups.
    pub const META_BG: u32 = 0x10;
    /// Extent trees.
    pub const EXTENTS: u32 = 0x40;
    /// 64-bit block numbers.
    pub const BIT64: u32 = 0x80;
    /// Multiple-mount protection.
    pub const MMP: u32 = 0x100;
    /// Flexible block groups.
    pub const FLEX_BG: u32 = 0x200;
    /// Extended attributes in inodes.
    pub const EA_INODE: u32 = 0x400;
    /// Data in directory entries.
    pub const DIRDATA: u32 = 0x1000;
    /// Checksum seed in the superblock.
    pub const CSUM_SEED: u32 = 0x2000;
    /// Directories over 2 GiB and 3-level htrees.
    pub const LARGEDIR: u32 = 0x4000;
    /// Data inside inodes.
    pub const INLINE_DATA: u32 = 0x8000;
    /// Encrypted files.
    pub const ENCRYPT: u32 = 0x10000;
    /// Case-insensitive directories.
    pub const CASEFOLD: u32 = 0x20000;
}

/// ro_compat feature bits.
pub mod ro_compat {
    /// Sparse superblock backups.
    pub const SPARSE_SUPER: u32 = 0x1;
    /// Files over 2 GiB.
    pub const LARGE_FILE: u32 = 0x2;
    /// Old btree directory flag.
    pub const BTREE_DIR: u32 = 0x4;
    /// i_blocks in fs blocks for huge files.
    pub const HUGE_FILE: u32 = 0x8;
    /// crc16 group-descriptor checksums.
    pub const GDT_CSUM: u32 = 0x10;
    /// Directory link counts past 65000.
    pub const DIR_NLINK: u32 = 0x20;
    /// Large inodes reserve extra space.
    pub const EXTRA_ISIZE: u32 = 0x40;
    /// Snapshots (out of tree).
    pub const HAS_SNAPSHOT: u32 = 0x80;
    /// Quota inodes.
    pub const QUOTA: u32 = 0x100;
    /// Clusters of blocks.
    pub const BIGALLOC: u32 = 0x200;
    /// crc32c checksums on all metadata.
    pub const METADATA_CSUM: u32 = 0x400;
    /// Replicas (never merged).
    pub const REPLICA: u32 = 0x800;
    /// Read-only file system.
    pub const READONLY: u32 = 0x1000;
    /// Project quotas.
    pub const PROJECT: u32 = 0x2000;
    /// Shared (deduplicated) blocks.
    pub const SHARED_BLOCKS: u32 = 0x4000;
    /// fs-verity files.
    pub const VERITY: u32 = 0x8000;
    /// The orphan file has entries.
    pub const ORPHAN_PRESENT: u32 = 0x10000;
}

const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (incompat::COMPRESSION, "compression"),
    (incompat::FILETYPE, "filetype"),
    (incompat::RECOVER, "needs_recovery"),
    (incompat::JOURNAL_DEV, "journal_dev"),
    (incompat::META_BG, "meta_bg"),
    (incompat::EXTENTS, "extent"),
    (incompat::BIT64, "64bit"),
    (incompat::MMP, "mmp"),
    (incompat::FLEX_BG, "flex_bg"),
    (incompat::EA_INODE, "ea_inode"),
    (incompat::DIRDATA, "dirdata"),
    (incompat::CSUM_SEED, "metadata_csum_seed"),
    (incompat::LARGEDIR, "large_dir"),
    (incompat::INLINE_DATA, "inline_data"),
    (incompat::ENCRYPT, "encrypt"),
    (incompat::CASEFOLD, "casefold"),
];

const RO_COMPAT_NAMES: &[(u32, &str)] = &[
    (ro_compat::SPARSE_SUPER, "sparse_super"),
    (ro_compat::LARGE_FILE, "large_file"),
    (ro_compat::BTREE_DIR, "btree_dir"),
    (ro_compat::HUGE_FILE, "huge_file"),
    (ro_compat::GDT_CSUM, "uninit_bg"),
    (ro_compat::DIR_NLINK, "dir_nlink"),
    (ro_compat::EXTRA_ISIZE, "extra_isize"),
    (ro_compat::HAS_SNAPSHOT, "snapshot"),
    (ro_compat::QUOTA, "quota"),
    (ro_compat::BIGALLOC, "bigalloc"),
    (ro_compat::METADATA_CSUM, "metadata_csum"),
    (ro_compat::REPLICA, "replica"),
    (ro_compat::READONLY, "read-only"),
    (ro_compat::PROJECT, "project"),
    (ro_compat::SHARED_BLOCKS, "shared_blocks"),
    (ro_compat::VERITY, "verity"),
    (ro_compat::ORPHAN_PRESENT, "orphan_present"),
];

/// incompat features this reader understands. `encrypt` and `casefold` are left out
/// on purpose: names and data would be misread.
const INCOMPAT_READ: u32 = incompat::FILETYPE
    | incompat::RECOVER
    | incompat::META_BG
    | incompat::EXTENTS
    | incompat::BIT64
    | incompat::MMP
    | incompat::FLEX_BG
    | incompat::EA_INODE
    | incompat::CSUM_SEED
    | incompat::LARGEDIR
    | incompat::INLINE_DATA;

/// ro_compat features in-place writes (data, timestamps, inode checksum) are safe
/// with: none of them changes how a file's written blocks or its inode are kept.
const RO_COMPAT_WRITE: u32 = ro_compat::SPARSE_SUPER
    | ro_compat::LARGE_FILE
    | ro_compat::BTREE_DIR
    | ro_compat::HUGE_FILE
    | ro_compat::GDT_CSUM
    | ro_compat::DIR_NLINK
    | ro_compat::EXTRA_ISIZE
    | ro_compat::QUOTA
    | ro_compat::BIGALLOC
    | ro_compat::METADATA_CSUM
    | ro_compat::PROJECT
    | ro_compat::VERITY
    | ro_compat::ORPHAN_PRESENT;

/// Names of the bits of `bits` (unknown ones as hex).
fn names(bits: u32, table: &[(u32, &str)]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut rest = bits;
    for &(bit, name) in table {
        if bits & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("unknown feature bits {rest:#x}"));
    }
    out.join(", ")
}

/// The parsed superblock (the fields dio uses).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Superblock {
    /// Inodes in the file system.
    pub inodes_count: u32,
    /// Blocks in the file system.
    pub blocks_count: u64,
    /// First data block (1 for 1 KiB blocks, else 0).
    pub first_data_block: u32,
    /// Block size in bytes (1 KiB to 64 KiB).
    pub block_size: u32,
    /// Blocks per group.
    pub blocks_per_group: u32,
    /// Cluster size in bytes (the block size unless bigalloc).
    pub cluster_size: u32,
    /// Clusters per group (what a group's block bitmap counts; blocks per group
    /// unless bigalloc).
    pub clusters_per_group: u32,
    /// Inodes per group.
    pub inodes_per_group: u32,
    /// Revision (0: old fixed inode size).
    pub rev_level: u32,
    /// On-disk inode size.
    pub inode_size: u16,
    /// First non-reserved inode.
    pub first_ino: u32,
    /// compat features.
    pub feature_compat: u32,
    /// incompat features.
    pub feature_incompat: u32,
    /// ro_compat features.
    pub feature_ro_compat: u32,
    /// File system UUID.
    pub uuid: [u8; 16],
    /// Volume label (up to 16 bytes, NUL-padded on disk).
    pub volume_name: Vec<u8>,
    /// htree hash seed.
    pub hash_seed: [u32; 4],
    /// Default htree hash version.
    pub def_hash_version: u8,
    /// Group descriptor size (32 without 64bit).
    pub desc_size: u16,
    /// First meta block group (meta_bg).
    pub first_meta_bg: u32,
    /// Flags (signed/unsigned directory hash).
    pub flags: u32,
    /// Backup groups with sparse_super2.
    pub backup_bgs: [u32; 2],
    /// Checksum seed (metadata_csum_seed), else computed from the UUID.
    pub checksum_seed: u32,
    /// Reserved GDT blocks (resize inode).
    pub reserved_gdt_blocks: u16,
    /// Journal inode.
    pub journal_inum: u32,
    /// Number of block groups.
    pub groups: u32,
}

/// Whether the superblock flags ask for the unsigned directory hash.
const FLAGS_UNSIGNED_HASH: u32 = 0x2;

impl Superblock {
    /// Parse and check the superblock bytes (1024 of them).
    pub fn parse(b: &[u8]) -> Result<Superblock> {
        if b.len() < SUPERBLOCK_SIZE {
            return Err(Error::corrupt(
                CorruptKind::Superblock,
                "superblock is short",
            ));
        }
        if le16(b, 0x38) != MAGIC {
            return Err(Error::corrupt(
                CorruptKind::NoSuperblock,
                format!(
                    "no ext2/3/4 superblock (magic {:#06x}, want {MAGIC:#06x})",
                    le16(b, 0x38)
                ),
            ));
        }
        let feature_compat = le32(b, 0x5C);
        let feature_incompat = le32(b, 0x60);
        let feature_ro_compat = le32(b, 0x64);
        let rev_level = le32(b, 0x4C);
        let (feature_compat, feature_incompat, feature_ro_compat) = if rev_level == 0 {
            (0, 0, 0)
        } else {
            (feature_compat, feature_incompat, feature_ro_compat)
        };
        let unknown = feature_incompat & !INCOMPAT_READ;
        if unknown != 0 {
            return Err(Error::incompatible(
                Feature::UnknownFlags,
                names(unknown, INCOMPAT_NAMES),
            ));
        }
        if feature_ro_compat & ro_compat::METADATA_CSUM != 0 {
            if u8at(b, 0x175) != 1 {
                return Err(Error::incompatible(
                    Feature::ChecksumType,
                    format!(
                        "metadata checksum type {} (only crc32c is known)",
                        u8at(b, 0x175)
                    ),
                ));
            }
            let want = le32(b, 0x3FC);
            let got = crc32c(!0, &b[..0x3FC]);
            if want != got {
                return Err(Error::corrupt(
                    CorruptKind::Superblock,
                    format!(
                    "superblock checksum {want:#010x} does not match its contents ({got:#010x})"
                ),
                ));
            }
        }
        let log = le32(b, 0x18);
        if log > 6 {
            return Err(Error::corrupt(
                CorruptKind::Superblock,
                format!("block size 2^{} KiB is out of range", log),
            ));
        }
        let block_size = 1024u32 << log;
        let bit64 = feature_incompat & incompat::BIT64 != 0;
        let blocks_count = u64::from(le32(b, 0x4))
            | if bit64 {
                u64::from(le32(b, 0x150)) << 32
            } else {
                0
            };
        let first_data_block = le32(b, 0x14);
        let blocks_per_group = le32(b, 0x20);
        let inodes_per_group = le32(b, 0x28);
        let inodes_count = le32(b, 0x0);
        let (inode_size, first_ino) = if rev_level == 0 {
            (128, 11)
        } else {
            (le16(b, 0x58), le32(b, 0x54))
        };
        let desc_size = if bit64 { le16(b, 0xFE) } else { 32 };
        let bits_per_block = block_size * 8;
        let bad = |m: String| Err(Error::corrupt(CorruptKind::Superblock, m));
        // With bigalloc, bitmaps count clusters: a group holds up to one bitmap
        // block's bits of clusters, and its blocks per group must be exactly its
        // clusters per group times the blocks per cluster (the kernel's
        // ext4_handle_clustersize).
        let bigalloc = feature_ro_compat & ro_compat::BIGALLOC != 0;
        let (cluster_size, clusters_per_group) = if bigalloc {
            let log_cluster = le32(b, 0x1C);
            if log_cluster < log || log_cluster > 20 {
                return bad(format!(
                    "cluster size 2^{log_cluster} KiB is out of range for {block_size}-byte blocks"
                ));
            }
            let cpg = le32(b, 0x24);
            if cpg == 0 || cpg > bits_per_block {
                return bad(format!("clusters per group {cpg} out of range"));
            }
            let per_cluster = 1u64 << (log_cluster - log);
            if u64::from(blocks_per_group) != u64::from(cpg) * per_cluster {
                return bad(format!(
                    "blocks per group {blocks_per_group} and clusters per group {cpg} disagree ({per_cluster} blocks per cluster)"
                ));
            }
            (1024u32 << log_cluster, cpg)
        } else {
            if blocks_per_group == 0 || blocks_per_group > bits_per_block {
                return bad(format!("blocks per group {blocks_per_group} out of range"));
            }
            (block_size, blocks_per_group)
        };
        if inodes_per_group == 0 || inodes_per_group > bits_per_block {
            return bad(format!("inodes per group {inodes_per_group} out of range"));
        }
        if inode_size < 128 || !inode_size.is_power_of_two() || u32::from(inode_size) > block_size {
            return bad(format!("inode size {inode_size} out of range"));
        }
        if bit64 && (!(64..=1024).contains(&desc_size) || !desc_size.is_power_of_two()) {
            return bad(format!("group descriptor size {desc_size} out of range"));
        }
        if u64::from(first_data_block) >= blocks_count
            || first_data_block > 1
            || (block_size > 1024 && first_data_block != 0)
        {
            return bad(format!(
                "first data block {first_data_block} is wrong for {block_size}-byte blocks"
            ));
        }
        let groups64 =
            (blocks_count - u64::from(first_data_block)).div_ceil(u64::from(blocks_per_group));
        let groups = u32::try_from(groups64).map_err(|_| {
            Error::corrupt(
                CorruptKind::Superblock,
                format!("{groups64} block groups is too many"),
            )
        })?;
        if u64::from(inodes_count) > u64::from(groups) * u64::from(inodes_per_group)
            || inodes_count < 2
        {
            return bad(format!(
                "inode count {inodes_count} does not fit {groups} groups of {inodes_per_group}"
            ));
        }
        if first_ino < 3 || first_ino > inodes_count {
            return bad(format!("first inode {first_ino} out of range"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[0x68..0x78]);
        let volume_name: Vec<u8> = b[0x78..0x88]
            .iter()
            .copied()
            .take_while(|&c| c != 0)
            .collect();
        let hash_seed = [le32(b, 0xEC), le32(b, 0xF0), le32(b, 0xF4), le32(b, 0xF8)];
        let checksum_seed = if feature_incompat & incompat::CSUM_SEED != 0 {
            le32(b, 0x270)
        } else {
            crc32c(!0, &uuid)
        };
        Ok(Superblock {
            inodes_count,
            blocks_count,
            first_data_block,
            block_size,
            blocks_per_group,
            cluster_size,
            clusters_per_group,
            inodes_per_group,
            rev_level,
            inode_size,
            first_ino,
            feature_compat,
            feature_incompat,
            feature_ro_compat,
            uuid,
            volume_name,
            hash_seed,
            def_hash_version: u8at(b, 0xFC),
            desc_size,
            first_meta_bg: le32(b, 0x104),
            flags: le32(b, 0x160),
            backup_bgs: [le32(b, 0x24C), le32(b, 0x250)],
            checksum_seed,
            reserved_gdt_blocks: le16(b, 0xCE),
            journal_inum: le32(b, 0xE0),
            groups,
        })
    }

    /// Whether a compat feature is set.
    pub fn has_compat(&self, bit: u32) -> bool {
        self.feature_compat & bit != 0
    }
    /// Whether an incompat feature is set.
    pub fn has_incompat(&self, bit: u32) -> bool {
        self.feature_incompat & bit != 0
    }
    /// Whether a ro_compat feature is set.
    pub fn has_ro_compat(&self, bit: u32) -> bool {
        self.feature_ro_compat & bit != 0
    }
    /// Whether metadata checksums are on.
    pub fn metadata_csum(&self) -> bool {
        self.has_ro_compat(ro_compat::METADATA_CSUM)
    }
    /// Whether group descriptors carry checksums and uninitialised-group flags
    /// (`metadata_csum` or `uninit_bg`).
    pub fn csum_groups(&self) -> bool {
        self.metadata_csum() || self.has_ro_compat(ro_compat::GDT_CSUM)
    }
    /// Whether directory hashes treat name bytes as unsigned.
    pub fn unsigned_hash(&self) -> bool {
        self.flags & FLAGS_UNSIGNED_HASH != 0
    }

    /// Why in-place writes are refused on this file system, if they are.
    pub fn write_refusal(&self) -> Option<Error> {
        if self.has_incompat(incompat::RECOVER) {
            return Some(Error::incompatible(Feature::JournalRecovery,
                "the journal needs recovery (needs_recovery): mount the image once or run e2fsck, then write",
            ));
        }
        self.feature_refusal()
    }

    /// Why in-place writes are refused on this file system whatever the state of
    /// its journal, if they are.
    pub(crate) fn feature_refusal(&self) -> Option<Error> {
        if self.has_incompat(incompat::MMP) {
            return Some(Error::incompatible(
                Feature::Mmp,
                "mmp: multiple-mount protection is not implemented for writing",
            ));
        }
        let unknown = self.feature_ro_compat & !RO_COMPAT_WRITE;
        if unknown != 0 {
            return Some(Error::incompatible(
                Feature::UnknownFlags,
                format!("{} (read-only for dio)", names(unknown, RO_COMPAT_NAMES)),
            ));
        }
        None
    }

    /// Names of every feature set, for display.
    pub fn feature_names(&self) -> String {
        let compat = [
            (0x1, "dir_prealloc"),
            (0x2, "imagic_inodes"),
            (compat::HAS_JOURNAL, "has_journal"),
            (0x8, "ext_attr"),
            (0x10, "resize_inode"),
            (compat::DIR_INDEX, "dir_index"),
            (0x40, "lazy_bg"),
            (compat::SPARSE_SUPER2, "sparse_super2"),
            (0x400, "fast_commit"),
            (0x800, "stable_inodes"),
            (0x1000, "orphan_file"),
        ];
        [
            names(self.feature_compat, &compat),
            names(self.feature_incompat, INCOMPAT_NAMES),
            names(self.feature_ro_compat, RO_COMPAT_NAMES),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
    }

    /// First block of group `g`.
    pub fn group_first_block(&self, g: u32) -> u64 {
        u64::from(g) * u64::from(self.blocks_per_group) + u64::from(self.first_data_block)
    }

    /// Whether group `g` holds a superblock backup (and so a descriptor copy).
    pub fn group_has_super(&self, g: u32) -> bool {
        if g == 0 {
            return true;
        }
        if self.has_compat(compat::SPARSE_SUPER2) {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if g <= 1 || !self.has_ro_compat(ro_compat::SPARSE_SUPER) {
            return true;
        }
        if g & 1 == 0 {
            return false;
        }
        [3u32, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < g {
                match p.checked_mul(base) {
                    Some(n) => p = n,
                    None => return false,
                }
            }
            p == g
        })
    }
}
