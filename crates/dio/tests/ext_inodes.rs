//! `Ext::inodes` (many inodes, one read per run of inode table) against
//! `Ext::inode` (one read each) on every fixture image: the same inodes, the
//! same refusals, in the order asked.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use dio::ext::Ext;
use dio::{RawFile, RawOptions};

#[test]
fn batched_inode_reads_equal_single_reads() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ext");
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ext-inodes");
    std::fs::create_dir_all(&scratch).unwrap();
    for name in ["ext2-1k", "ext3-2k", "ext4-1k", "ext4-4k", "ext4-bigalloc"] {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(
            std::fs::File::open(fixtures.join(format!("{name}.img.gz"))).unwrap(),
        )
        .read_to_end(&mut bytes)
        .unwrap();
        let img = scratch.join(format!("{name}.img"));
        std::fs::write(&img, bytes).unwrap();
        let raw = RawFile::open(&img, &RawOptions::default()).unwrap();
        let ext = Ext::open(Arc::clone(raw.direct().device()), raw.size()).unwrap();
        let count = ext.superblock().inodes_count;
        // Every inode, shuffled (a fixed stride), plus numbers out of range.
        let mut inos: Vec<u32> = (0..count).map(|i| (i * 7919) % count + 1).collect();
        inos.extend([0, count + 1, u32::MAX]);
        let batch = ext.inodes(&inos);
        assert_eq!(batch.len(), inos.len());
        for (&ino, got) in inos.iter().zip(&batch) {
            match (ext.inode(ino), got) {
                (Ok(want), Ok(got)) => {
                    assert_eq!(got.ino, ino, "{name}");
                    assert_eq!(got.raw(), want.raw(), "{name}: inode {ino}");
                }
                (Err(want), Err(got)) => assert_eq!(
                    std::mem::discriminant(got),
                    std::mem::discriminant(&want),
                    "{name}: inode {ino}"
                ),
                (want, got) => panic!("{name}: inode {ino}: {want:?} vs {got:?}"),
            }
        }
    }
}
