//! `dio write` and `dio cp` leave a host file exactly where its bytes end, though
//! byte-granular direct I/O writes a partial last block whole: checked against
//! `std::fs::metadata().len()` and the bytes a plain `std::fs` model expects.
//!
//! Files live under the target dir (`CARGO_TARGET_TMPDIR`): tmpfs may refuse
//! O_DIRECT.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use dio_testkit::bytes;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under target/")
}

/// `dio ARGS` with `stdin` piped in.
fn dio(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dio");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("feed stdin");
    let out = child.wait_with_output().expect("wait for dio");
    assert!(
        out.status.success(),
        "dio {args:?}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn check(path: &Path, model: &[u8], what: &str) {
    assert_eq!(
        std::fs::metadata(path).expect("stat").len(),
        model.len() as u64,
        "{what}: size"
    );
    assert!(std::fs::read(path).expect("read") == model, "{what}: bytes");
}

/// The lead's repro: 700 zeros at offset 1000 of a 1712-byte file end inside the
/// last partial block; the file stays 1712 bytes. Then writes across and past the
/// end, and one far past it (a hole between).
#[test]
fn write_inside_and_past_the_last_partial_block() {
    let dir = scratch();
    let path = dir.path().join("s.bin");
    let p = path.to_str().expect("utf-8 path");
    let mut model = bytes(1712, 1);
    std::fs::write(&path, &model).unwrap();
    for (off, len, seed) in [
        (1000u64, 700usize, 0u64),
        (1700, 100, 2),
        (1790, 3000, 3),
        (9999, 10, 4),
    ] {
        let data = if seed == 0 {
            vec![0; len]
        } else {
            bytes(len, seed)
        };
        dio(&["write", p, "--offset", &off.to_string()], &data);
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        check(&path, &model, &format!("write {off}+{len}"));
    }
}

/// `dio cp` to a host file whose size is not a block multiple: the copy is exactly
/// as long as the source, from a file and from stdin.
#[test]
fn cp_to_a_file_of_a_partial_last_block() {
    let dir = scratch();
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    for len in [1712usize, 4097, (1 << 20) + 333] {
        let data = bytes(len, len as u64);
        std::fs::write(&src, &data).unwrap();
        // An existing longer destination is replaced.
        std::fs::write(&dst, bytes(len + 5000, 9)).unwrap();
        dio(&["cp", s, d], &[]);
        check(&dst, &data, &format!("cp of {len} bytes"));
        std::fs::remove_file(&dst).unwrap();
        dio(&["cp", "-", d], &data);
        check(&dst, &data, &format!("cp of {len} bytes from stdin"));
    }
}
