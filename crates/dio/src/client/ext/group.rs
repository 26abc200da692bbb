//! Block group descriptors: where each group's inode table is. 32-byte (ext2/3) and
//! 64-bit descriptors, the plain table after the superblock and meta_bg's
//! per-meta-group tables; checksums (crc32c with metadata_csum, crc16 with
//! gdt_csum) are verified.

use super::bytes::{crc16, crc32c, le16, le32};
use super::io::MetaIo;
use super::superblock::{incompat, ro_compat, Superblock};
use crate::error::CorruptKind;
use crate::{Error, Result};

/// What dio keeps of one group descriptor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupDesc {
    pub inode_table: u64,
}

/// The device block holding descriptor block `nr` of the table (the kernel's
/// `descriptor_loc`). The table follows the fs block that holds the superblock:
/// block 1 with 1 KiB blocks, also when the first data block is 0 (bigalloc).
pub(crate) fn descriptor_block(sb: &Superblock, nr: u32, per_block: u32) -> u64 {
    let sb_block = super::superblock::SUPERBLOCK_OFFSET / u64::from(sb.block_size);
    if !sb.has_incompat(incompat::META_BG) || nr < sb.first_meta_bg {
        return sb_block + u64::from(nr) + 1;
    }
    let g = nr.saturating_mul(per_block);
    let mut has_super = u64::from(sb.group_has_super(g));
    if sb.block_size == 1024 && nr == 0 && sb.first_data_block == 0 {
        has_super += 1;
    }
    sb.group_first_block(g) + has_super
}

fn check(sb: &Superblock, g: u32, d: &[u8]) -> Result<()> {
    let stored = le16(d, 0x1E);
    let computed = if sb.metadata_csum() {
        let mut c = crc32c(sb.checksum_seed, &g.to_le_bytes());
        c = crc32c(c, &d[..0x1E]);
        c = crc32c(c, &[0, 0]);
        if d.len() > 0x20 {
            c = crc32c(c, &d[0x20..]);
        }
        (c & 0xFFFF) as u16
    } else if sb.has_ro_compat(ro_compat::GDT_CSUM) {
        let mut c = crc16(!0, &sb.uuid);
        c = crc16(c, &g.to_le_bytes());
        c = crc16(c, &d[..0x1E]);
        if d.len() > 0x20 {
            c = crc16(c, &d[0x20..]);
        }
        c
    } else {
        return Ok(());
    };
    if stored != computed {
        return Err(Error::corrupt(CorruptKind::GroupDescriptor, format!(
            "group {g} descriptor checksum {stored:#06x} does not match its contents ({computed:#06x})"
        )));
    }
    Ok(())
}

/// Read and check every group descriptor.
pub(crate) fn read_table(io: &MetaIo, sb: &Superblock) -> Result<Vec<GroupDesc>> {
    let bs = sb.block_size as usize;
    let ds = usize::from(sb.desc_size);
    let per_block = (bs / ds) as u32;
    let blocks = sb.groups.div_ceil(per_block);
    let mut out = Vec::new();
    for nr in 0..blocks {
        let block = descriptor_block(sb, nr, per_block);
        if block >= sb.blocks_count {
            return Err(Error::corrupt(
                CorruptKind::GroupDescriptor,
                format!(
                    "group descriptor block {block} is past the file system's {} blocks",
                    sb.blocks_count
                ),
            ));
        }
        let raw = io.read(block * bs as u64, bs, "group descriptor block")?;
        for i in 0..per_block {
            let g = nr * per_block + i;
            if g >= sb.groups {
                break;
            }
            let d = &raw[i as usize * ds..(i as usize + 1) * ds];
            check(sb, g, d)?;
            let hi = if ds >= 64 {
                u64::from(le32(d, 0x28)) << 32
            } else {
                0
            };
            let inode_table = u64::from(le32(d, 0x8)) | hi;
            let itable_blocks =
                (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(bs as u64);
            if inode_table == 0
                || inode_table
                    .checked_add(itable_blocks)
                    .is_none_or(|end| end > sb.blocks_count)
            {
                return Err(Error::corrupt(
                    CorruptKind::GroupDescriptor,
                    format!(
                        "group {g} inode table at block {inode_table} lies outside the file system"
                    ),
                ));
            }
            out.push(GroupDesc { inode_table });
        }
    }
    Ok(out)
}
