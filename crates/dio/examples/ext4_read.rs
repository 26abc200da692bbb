//! Reading a file out of an ext4 image through the library, not the CLI.
//!
//! The image is opened as a host file with the best back end (`RawFile`: io_uring or
//! pread/pwrite on O_DIRECT), the ext client reads the superblock, group
//! descriptors, inodes and directories through that device, and file data goes
//! through the engine with the ext block map as its `get_block`. The example lists
//! a directory and reads a file whole, then a byte range of it.
//!
//! Run: `cargo run --example ext4_read [IMAGE [PATH]]` (default: the ext4 fixture
//! image of the tests, unpacked under target/, and `/data/pattern`).

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use dio::ext::Ext;
use dio::Result;
use dio::{RawFile, RawOptions};

fn default_image() -> PathBuf {
    let gz = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ext/ext4-4k.img.gz"
    );
    let out = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/ext4-example.img"
    ));
    if !out.exists() {
        let mut bytes = Vec::new();
        let file = std::fs::File::open(gz).expect("the fixture image is in the repository");
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut bytes)
            .expect("the fixture unpacks");
        std::fs::write(&out, bytes).expect("write the unpacked image under target/");
    }
    std::fs::canonicalize(&out).unwrap_or(out)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let image = args.next().map(PathBuf::from).unwrap_or_else(default_image);
    let path = args.next().unwrap_or_else(|| "/data/pattern".into());

    // The image as a device.
    let raw = RawFile::open(&image, &RawOptions::default())?;
    let dev = Arc::clone(raw.direct().device());
    let fs = Ext::open(dev, raw.size())?;
    println!("{}: ext, {}-byte blocks", image.display(), fs.block_size());

    // A directory listing.
    let dir = path
        .rsplit_once('/')
        .map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
    let dir_inode = fs.lookup(dir.as_bytes(), true)?;
    let names: Vec<String> = fs
        .read_dir(&dir_inode)?
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    println!("{dir}: {names:?}");

    // The file, whole, through the engine.
    let inode = fs.lookup(path.as_bytes(), true)?;
    let file = fs.open_file(&inode)?;
    let mut data = vec![0u8; file.size() as usize];
    let n = file.read_at(0, &mut data)?;
    println!("{path}: {n} bytes, extents {:?}", fs.extents(&inode)?.len());
    // A byte range at an odd offset (byte-granular, head and tail bounced).
    let mut range = [0u8; 24];
    let got = file.read_at(1000, &mut range)?;
    println!(
        "{path} bytes 1000..{}: {:?}",
        1000 + got,
        String::from_utf8_lossy(&range[..got])
    );
    assert_eq!(&range[..got], &data[1000..1000 + got]);
    Ok(())
}
