//! Copy an NBD export to a local file, skipping holes, or time 4 KiB random reads
//! at a queue depth: the NBD client's speed without the CLI.
//!
//! ```sh
//! cargo run --release --example nbd_bench            # built-in default: see below
//! cargo run --release --example nbd_bench -- copy nbd://127.0.0.1:10809/disk out.img
//! cargo run --release --example nbd_bench -- randread nbd://127.0.0.1:10809/disk 32 5
//! ```
//!
//! Without arguments it serves a 64 MiB scratch image (16 MiB of data, the rest a
//! hole) under `target/nbd_bench/` with qemu-nbd (or nbdkit) on a Unix socket,
//! copies it and runs 2 s of random reads against it, then cleans up.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dio::nbd::NbdConfig;
use dio::nbd::NbdFile;
use dio::{AlignedBuf, Flags};
use dio::{RawFile, RawOptions};

const CHUNK: usize = 1 << 20;
const QD: usize = 8;

fn copy(src: &str, dst: &Path) -> dio::Result<()> {
    let t = Instant::now();
    let src = NbdFile::open_uri(src, false, &NbdConfig::default())?;
    let size = src.size();
    let out = RawFile::open(
        dst,
        &RawOptions {
            write: true,
            create: true,
            ..RawOptions::default()
        },
    )?;
    out.set_len(0)?;
    out.set_len(size)?;
    let mut pieces = VecDeque::new();
    for e in src.extents(0, size)? {
        if e.zero {
            continue;
        }
        let mut at = e.offset;
        while at < e.offset + e.len {
            let n = (e.offset + e.len - at).min(CHUNK as u64);
            pieces.push_back((at, n as usize));
            at += n;
        }
    }
    let data: u64 = pieces.iter().map(|p| p.1 as u64).sum();
    let mut free: Vec<AlignedBuf> = (0..QD).map(|_| AlignedBuf::new(CHUNK, 4096)).collect();
    let mut flight = VecDeque::new();
    loop {
        while let (Some(_), Some(mut buf)) = (pieces.front(), free.pop()) {
            let (at, n) = pieces.pop_front().expect("checked");
            // Whole blocks: the tail past EOF reads as zeros and is cut below.
            let whole = n.div_ceil(4096) * 4096;
            if whole != buf.len() {
                buf = AlignedBuf::new(whole, 4096);
            }
            flight.push_back((at, n, src.direct().read_future(at, vec![buf], Flags::NONE)));
        }
        let Some((at, n, fut)) = flight.pop_front() else {
            break;
        };
        let mut c = fut.wait();
        let got = c.result?;
        assert_eq!(got, n);
        let buf = c.bufs.pop().expect("one buffer");
        let whole = n.div_ceil(4096) * 4096;
        out.direct()
            .write_at(at, &buf[..whole.min(buf.len())], Flags::UNALIGNED)?;
        if buf.len() == CHUNK {
            free.push(buf);
        } else {
            free.push(AlignedBuf::new(CHUNK, 4096));
        }
    }
    out.set_len(size)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "copied {size} bytes ({data} of data) in {s:.3} s: {:.0} MB/s",
        size as f64 / s / 1e6
    );
    Ok(())
}

fn randread(src: &str, qd: usize, secs: u64) -> dio::Result<()> {
    let src = NbdFile::open_uri(src, false, &NbdConfig::default())?;
    let blocks = src.size() / 4096;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    };
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut flight = VecDeque::new();
    for _ in 0..qd {
        flight.push_back((
            Instant::now(),
            src.direct()
                .read_future(next(), vec![AlignedBuf::new(4096, 4096)], Flags::NONE),
        ));
    }
    let mut lat = Vec::new();
    while let Some((t0, fut)) = flight.pop_front() {
        let c = fut.wait();
        c.result?;
        lat.push(t0.elapsed());
        if Instant::now() < end {
            flight.push_back((
                Instant::now(),
                src.direct().read_future(next(), c.bufs, Flags::NONE),
            ));
        }
    }
    let s = start.elapsed().as_secs_f64();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "randread 4k qd{qd}: {:.0} IOPS, p50 {:?}, p99 {:?}",
        lat.len() as f64 / s,
        p(0.5),
        p(0.99)
    );
    Ok(())
}

/// A local NBD server on a scratch image, stopped and removed on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve_default() -> Result<Server, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nbd_bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let img = dir.join("disk.img");
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    // 64 MiB: 16 MiB of data at 8 MiB, the rest a hole.
    let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
    f.set_len(64 << 20).map_err(|e| e.to_string())?;
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 8 << 20).map_err(|e| e.to_string())?;
    let (img_s, sock_s) = (img.to_string_lossy(), sock.to_string_lossy());
    let tries: [(&str, Vec<String>); 2] = [
        (
            "qemu-nbd",
            vec![
                "-f".into(),
                "raw".into(),
                "-x".into(),
                "disk".into(),
                "-k".into(),
                sock_s.to_string(),
                "--persistent".into(),
                img_s.to_string(),
            ],
        ),
        (
            "nbdkit",
            vec![
                "-f".into(),
                "-U".into(),
                sock_s.to_string(),
                "-e".into(),
                "disk".into(),
                "file".into(),
                img_s.to_string(),
            ],
        ),
    ];
    for (tool, args) in tries {
        let Ok(child) = Command::new(tool).args(&args).stdout(Stdio::null()).spawn() else {
            continue;
        };
        let server = Server {
            child,
            dir: dir.clone(),
            uri: format!("nbd+unix:///disk?socket={sock_s}"),
        };
        for _ in 0..500 {
            if sock.exists() {
                eprintln!(
                    "nbd_bench: {tool} serves {} at {}",
                    img.display(),
                    server.uri
                );
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        return Err(format!("{tool} did not create {}", sock.display()));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Err(
        "no NBD server to run the default on: install qemu-nbd (qemu-utils) or nbdkit, \
         or give a URI (nbd_bench copy URI DST | randread URI [QD] [SECS])"
            .to_string(),
    )
}

fn run_default() -> dio::Result<()> {
    let server = match serve_default() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd_bench: {e}");
            std::process::exit(1);
        }
    };
    let out = server.dir.join("copy.img");
    copy(&server.uri, &out)?;
    randread(&server.uri, 32, 2)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let r = match a.get(1).map(String::as_str) {
        None => run_default(),
        Some("copy") if a.len() == 4 => copy(&a[2], Path::new(&a[3])),
        Some("randread") if a.len() >= 3 => randread(
            &a[2],
            a.get(3).and_then(|s| s.parse().ok()).unwrap_or(32),
            a.get(4).and_then(|s| s.parse().ok()).unwrap_or(5),
        ),
        _ => {
            eprintln!("usage: nbd_bench copy URI DST | randread URI [QD] [SECS]");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("nbd_bench: {e}");
        std::process::exit(1);
    }
}
