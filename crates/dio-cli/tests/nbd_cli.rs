//! `dio cat`, `cp`, `ls` and `bench` on NBD locations (`nbd://HOST:PORT/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`, with and without `:/PATH` inside an ext
//! image), against qemu-nbd started here on loopback. Skips with a reason when
//! qemu-nbd is missing; every server is killed by a guard; every dio run is killed
//! after a deadline.

use dio_testkit::{have, qemu_nbd_tcp, qemu_nbd_unix, ServerProcess};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Run dio with `args`, killed if it takes more than 60 s.
fn dio(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a large output cannot block the child.
    let mut out = c.stdout.take().unwrap();
    let mut err = c.stderr.take().unwrap();
    let o = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("dio {args:?} did not finish within 60 s");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

fn ok(o: &Output, what: &str) -> Vec<u8> {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout.clone()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nbd-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// qemu-nbd serving the raw `image` as export "disk" on a Unix socket in `dir`
/// (`tcp`: on a TCP port of 127.0.0.1 instead), killed when the guard drops.
/// Returns the guard and the URI.
fn qemu_nbd(dir: &Path, image: &Path, tcp: bool) -> (ServerProcess, String) {
    if tcp {
        let (srv, port) = qemu_nbd_tcp(image, "raw");
        (srv, format!("nbd://127.0.0.1:{port}/disk"))
    } else {
        let sock = dir.join("s");
        let srv = qemu_nbd_unix(image, "raw", &sock);
        (srv, format!("nbd+unix:///disk?socket={}", sock.display()))
    }
}

fn unpack_ext4(dir: &Path) -> PathBuf {
    let gz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dio/tests/fixtures/ext/ext4-4k.img.gz");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let p = dir.join("ext4.img");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn cat_and_ls_read_exports_and_files_inside_images_on_them() {
    if !have("qemu-nbd") {
        eprintln!("skipped: qemu-nbd is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = scratch("cat");
    let img = unpack_ext4(&dir);
    let whole = std::fs::read(&img).unwrap();
    let local = img.to_str().unwrap().to_string();
    for tcp in [true, false] {
        let (_srv, uri) = qemu_nbd(&dir, &img, tcp);
        // The export itself.
        let out = ok(&dio(&["cat", &uri]), "cat export");
        assert!(out == whole, "{uri}: cat differs from the image");
        let out = ok(
            &dio(&["cat", &uri, "--offset", "1000", "--length", "5000"]),
            "cat range",
        );
        assert!(out[..] == whole[1000..6000]);
        // Files inside the ext image on the export, as on the host image.
        for p in ["/hello.txt", "/data/sparse", "/links/slow"] {
            let remote = ok(&dio(&["cat", &format!("{uri}:{p}")]), p);
            let host = ok(&dio(&["cat", &format!("{local}:{p}")]), p);
            assert!(remote == host, "{uri}:{p}");
        }
        let names = ok(&dio(&["ls", &format!("{uri}:/")]), "ls");
        let names = String::from_utf8_lossy(&names);
        assert!(
            names.contains("hello.txt") && names.contains("data"),
            "{names}"
        );
        // Errors name the location.
        let o = dio(&["cat", &format!("{uri}:/missing")]);
        assert_eq!(o.status.code(), Some(1));
        let bad = uri.replace("/disk", "/nope");
        let o = dio(&["cat", &bad]);
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("nope"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cp_of_a_sparse_export_skips_its_holes() {
    if !have("qemu-nbd") {
        eprintln!("skipped: qemu-nbd is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = scratch("cp");
    let img = dir.join("sparse.raw");
    // 64 MiB with data at 1 MiB and 40 MiB, holes elsewhere.
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    let a: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    let b: Vec<u8> = (0..64 * 1024).map(|i| (i % 241) as u8 + 1).collect();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&a, 1 << 20).unwrap();
    f.write_all_at(&b, 40 << 20).unwrap();
    drop(f);
    let (srv, uri) = qemu_nbd(&dir, &img, true);
    let out = dir.join("copy.raw");
    ok(
        &dio(&["cp", &uri, out.to_str().unwrap()]),
        "cp export to a file",
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 64 << 20);
    // Only the data (rounded to file system blocks) is allocated.
    assert!(
        m.blocks() * 512 <= 2 << 20,
        "{} bytes allocated for 320 KiB of data",
        m.blocks() * 512
    );
    // Into a directory: the export has no file name, so that is refused.
    let o = dio(&["cp", &uri, dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_measures_an_export_and_refuses_writes_without_force() {
    if !have("qemu-nbd") {
        eprintln!("skipped: qemu-nbd is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = scratch("bench");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![7u8; 8 << 20]).unwrap();
    let (srv, uri) = qemu_nbd(&dir, &img, false);
    let out = ok(
        &dio(&[
            "bench",
            &uri,
            "--rw",
            "randread",
            "--qd",
            "32",
            "--runtime",
            "0.5",
            "--json",
        ]),
        "bench randread",
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v["iops"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["engine"], "nbd");
    let o = dio(&["bench", &uri, "--rw", "randwrite", "--runtime", "0.2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    ok(
        &dio(&[
            "bench",
            &uri,
            "--rw",
            "write",
            "--runtime",
            "0.3",
            "--force",
            "--size",
            "4M",
        ]),
        "bench write with --force",
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}
