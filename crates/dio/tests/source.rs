//! The whole-device clients' one shape: `dio::Source` and `dio::open_source`.

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use dio::{open_source, PathErrorKind, RawOptions};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("source");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn a_sparse_host_file_reports_its_data_runs_and_reads_at_any_offset() {
    let path = scratch("sparse.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&[0xa5; 4096]).unwrap();
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.write_all(&[0x5a; 8192]).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let src = open_source(path.to_str().unwrap(), &RawOptions::default()).unwrap();
    assert_eq!(src.size(), (4 << 20) + 8192);
    assert!(!src.resizable(), "opened read-only");
    let runs: Vec<(u64, u64)> = src.data_runs(src.size()).map(|r| r.unwrap()).collect();
    // Every byte written lies in a run; the kernel may report more data than
    // written (a file system without SEEK_DATA reports all), never less.
    for (off, len) in [(0u64, 4096u64), (4 << 20, 8192)] {
        assert!(
            runs.iter().any(|&(s, e)| s <= off && off + len <= e),
            "{off}+{len} not in {runs:?}"
        );
    }
    assert!(runs.windows(2).all(|w| w[0].1 <= w[1].0), "{runs:?}");
    // Where the file system knows holes, the 4 MiB gap is not data.
    if runs.len() == 2 {
        assert!(runs[0].1 <= 1 << 20, "{runs:?}");
    }

    // Any offset, any length, through the trait's file.
    let raw = dio::RawFile::open(&path, &RawOptions::default()).unwrap();
    let mut buf = vec![0u8; 10];
    assert_eq!(raw.read_at(4091, &mut buf).unwrap(), 10);
    assert_eq!(&buf[..5], &[0xa5; 5]);
    assert_eq!(&buf[5..], &[0; 5]);
}

#[test]
fn a_writable_source_resizes_and_a_missing_path_is_a_typed_error() {
    let path = scratch("grow.bin");
    let _ = std::fs::remove_file(&path);
    let src = open_source(
        path.to_str().unwrap(),
        &RawOptions {
            write: true,
            create: true,
            ..RawOptions::default()
        },
    )
    .unwrap();
    assert!(src.resizable());
    src.set_len(12345).unwrap();
    assert_eq!(src.size(), 12345);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 12345);
    assert!(!src.backend_name().is_empty());

    let e = open_source(
        scratch("no-such-file").to_str().unwrap(),
        &RawOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    // Not a path inside an image: a host lookup is an OS error, not a PathError.
    assert_ne!(e.path_kind(), Some(PathErrorKind::NotFound));
}
