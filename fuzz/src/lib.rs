//! The ext image reader under hostile input. An input picks one of the small base
//! images in `seeds/` and patches bytes of it (so a mutation lands deep in a
//! structure that parses, and corpus entries stay a few bytes), or, with the top
//! bit of its first byte set, is the raw image itself. The harness then opens the
//! file system on a RAM device and walks it: every directory listed, every name
//! looked up again by path (htree lookups), every file read (bounded), symlinks
//! read, extent maps listed, and a small in-place write tried.
//!
//! Whatever the bytes, dio must answer with an error or data: never a panic, a
//! hang, an unbounded allocation or a read outside the image.

use std::io::Read;
use std::sync::{Arc, OnceLock};

use dio::ext::{Ext, FileType, Inode};
use dio::{Device, MemDevice, MemDeviceConfig};

const SEEDS: &[&[u8]] = &[
    include_bytes!("../seeds/ext4-csum.img.gz"),
    include_bytes!("../seeds/ext4-plain.img.gz"),
    include_bytes!("../seeds/ext2.img.gz"),
    include_bytes!("../seeds/ext3-2k.img.gz"),
];

fn bases() -> &'static Vec<Vec<u8>> {
    static BASES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BASES.get_or_init(|| {
        SEEDS
            .iter()
            .map(|gz| {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(*gz)
                    .read_to_end(&mut out)
                    .expect("seed images decompress");
                out
            })
            .collect()
    })
}

/// Build the image an input describes.
pub fn image_of(input: &[u8]) -> Option<Vec<u8>> {
    let (&first, rest) = input.split_first()?;
    if first & 0x80 != 0 {
        return Some(rest.to_vec());
    }
    let bases = bases();
    let mut img = bases[usize::from(first) % bases.len()].clone();
    let mut p = rest;
    // Patches: 3-byte offset (scaled to the image), 1-byte length, bytes.
    while p.len() >= 4 {
        let off = (u32::from(p[0]) | u32::from(p[1]) << 8 | u32::from(p[2]) << 16) as usize;
        let off = off % img.len();
        let len = usize::from(p[3] & 0x3F).min(p.len() - 4);
        let end = (off + len).min(img.len());
        img[off..end].copy_from_slice(&p[4..4 + (end - off)]);
        p = &p[4 + len..];
    }
    Some(img)
}

/// Most bytes read from one file, and most inodes visited per input.
const READ_CAP: u64 = 256 << 10;
const VISIT_CAP: usize = 300;

/// Run one input.
pub fn ext_image(input: &[u8]) {
    let Some(img) = image_of(input) else {
        return;
    };
    if img.len() < 2048 {
        return;
    }
    let size = (img.len() as u64).div_ceil(512) * 512;
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512)));
    dev.write_raw(0, &img);
    let dev: Arc<dyn Device> = dev;
    let Ok(ext) = Ext::open_writable(Arc::clone(&dev), img.len() as u64)
        .or_else(|_| Ext::open(Arc::clone(&dev), img.len() as u64))
    else {
        return;
    };
    let Ok(root) = ext.lookup(b"/", true) else {
        return;
    };
    let mut queue = vec![(b"".to_vec(), root)];
    let mut visited = 0;
    while let Some((path, dir)) = queue.pop() {
        let Ok(entries) = ext.read_dir(&dir) else {
            continue;
        };
        for e in entries {
            visited += 1;
            if visited > VISIT_CAP {
                return;
            }
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let mut child = path.clone();
            child.push(b'/');
            child.extend_from_slice(&e.name);
            let Ok(inode) = ext.inode(e.inode) else {
                continue;
            };
            // Lookups by path take the htree route in hashed directories.
            let _ = ext.lookup(&child, false);
            let _ = ext.lookup(&child, true);
            let _ = ext.extents(&inode);
            visit(&ext, &inode);
            if inode.file_type() == FileType::Directory && path.len() < 64 {
                queue.push((child, inode));
            }
        }
    }
}

fn visit(ext: &Ext, inode: &Inode) {
    match inode.file_type() {
        FileType::Symlink => {
            let _ = ext.read_link(inode);
        }
        FileType::Regular => {
            let Ok(file) = ext.open_file(inode) else {
                return;
            };
            let n = file.size().min(READ_CAP) as usize;
            let mut buf = vec![0u8; n];
            let _ = file.read_at(0, &mut buf);
            // The end of a (maybe huge, sparse) file, at an odd offset.
            let mut tail = [0u8; 777];
            let _ = file.read_at(file.size().saturating_sub(700), &mut tail);
            if ext.is_writable() && file.check_write(1, 10).is_ok() {
                let _ = file.overwrite(1, b"0123456789");
            }
            if let Some(d) = file.direct() {
                let _ = d.read_at(0, &mut [0u8; 4096], dio::Flags::NONE);
            }
        }
        _ => {}
    }
}
