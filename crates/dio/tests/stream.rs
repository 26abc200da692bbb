//! The streams (`dio::stream`) against a byte model: random seeks and reads,
//! random writes, `std::io::copy`, SHA-256 of a stream against that of the bytes, on
//! the RAM device (threaded, with reordered completions) and on a host file.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use dio::stream::{DioReader, DioWriter, StreamOptions};
use dio::{
    DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig, Op, RawFile, RawOptions,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const DEV: u64 = 8 << 20;

/// A file of `size` bytes over a zero-filled RAM device (a gap written past the
/// end reads as zeros, as in a sparse host file), optionally threaded with
/// reordered completions, with `fs`-byte blocks.
fn ram_file(size: u64, fs: u32, threaded: bool) -> (Arc<MemDevice>, DirectFile) {
    let mut cfg = MemDeviceConfig::new(DEV, 512);
    if threaded {
        cfg = cfg.threaded(None, true, 7);
    }
    let dev = Arc::new(MemDevice::new(cfg));
    let map = Arc::new(IdentityMap::new(fs, DEV));
    let file = DirectFile::new(dev.clone(), map, Arc::new(FileState::new(size))).unwrap();
    (dev, file)
}

/// Deterministic bytes that never repeat with a short period.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The errno of an `io::Error` made from a `dio::Error` (or of an OS error).
fn errno(e: &std::io::Error) -> i32 {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<dio::Error>())
        .map(|d| d.errno())
        .or(e.raw_os_error())
        .expect("an errno")
}

fn opts(buffers: usize, buffer_size: usize) -> StreamOptions {
    StreamOptions {
        buffers,
        buffer_size,
        ..StreamOptions::default()
    }
}

fn file_bytes(file: &DirectFile) -> Vec<u8> {
    let mut out = vec![0u8; file.size() as usize];
    let n = file.read_at(0, &mut out, Flags::UNALIGNED).unwrap();
    assert_eq!(n, out.len());
    out
}

#[derive(Debug, Clone)]
enum ReadOp {
    Seek(SeekFrom),
    Read(usize),
    Line,
}

fn read_op(size: u64) -> impl Strategy<Value = ReadOp> {
    let s = size as i64;
    prop_oneof![
        (0..size + 5000).prop_map(|n| ReadOp::Seek(SeekFrom::Start(n))),
        (-s - 10..100i64).prop_map(|d| ReadOp::Seek(SeekFrom::End(d))),
        (-20000..20000i64).prop_map(|d| ReadOp::Seek(SeekFrom::Current(d))),
        (0usize..300_000).prop_map(ReadOp::Read),
        Just(ReadOp::Line),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every read, seek and line of a reader matches the file's bytes (a model
    /// cursor over them), whatever the buffer size, depth, block size and file size.
    #[test]
    fn reader_matches_the_model(
        size in 0u64..600_000,
        buffers in 1usize..5,
        buffer_size in prop_oneof![Just(4096usize), Just(10_000), Just(65_536), Just(200_000)],
        fs in prop_oneof![Just(512u32), Just(4096)],
        threaded in any::<bool>(),
        ops in proptest::collection::vec(read_op(600_000), 1..40),
    ) {
        let (_dev, file) = ram_file(size, fs, threaded);
        let data = bytes(size as usize, size);
        file.write_at(0, &data, Flags::UNALIGNED).unwrap();
        let mut r = DioReader::with_options(&file, &opts(buffers, buffer_size));
        let mut pos = 0u64;
        for op in ops {
            match op {
                ReadOp::Seek(to) => {
                    let want = match to {
                        SeekFrom::Start(n) => Some(n),
                        SeekFrom::End(d) => size.checked_add_signed(d),
                        SeekFrom::Current(d) => pos.checked_add_signed(d),
                    };
                    match (r.seek(to), want) {
                        (Ok(got), Some(w)) => { prop_assert_eq!(got, w); pos = w; }
                        (Err(e), None) => prop_assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput),
                        (got, want) => prop_assert!(false, "seek {:?}: {:?}, model {:?}", to, got, want),
                    }
                }
                ReadOp::Read(n) => {
                    let mut buf = vec![0u8; n];
                    let got = r.read(&mut buf).unwrap();
                    let start = pos.min(size) as usize;
                    let avail = &data[start..];
                    prop_assert!(got <= n && got <= avail.len());
                    prop_assert!(n == 0 || avail.is_empty() || got > 0, "read returned 0 before EOF");
                    prop_assert_eq!(&buf[..got], &avail[..got]);
                    pos += got as u64;
                }
                ReadOp::Line => {
                    let mut line = Vec::new();
                    r.read_until(0x0a, &mut line).unwrap();
                    let start = pos.min(size) as usize;
                    let rest = &data[start..];
                    let end = rest.iter().position(|&b| b == 0x0a).map_or(rest.len(), |i| i + 1);
                    prop_assert_eq!(&line[..], &rest[..end]);
                    pos += end as u64;
                }
            }
            prop_assert_eq!(r.position(), pos);
        }
    }
}

#[derive(Debug, Clone)]
enum WriteOp {
    Seek(u64),
    Write(usize, u64),
    Flush,
}

fn write_op() -> impl Strategy<Value = WriteOp> {
    prop_oneof![
        1 => (0u64..700_000).prop_map(WriteOp::Seek),
        6 => ((0usize..150_000), any::<u64>()).prop_map(|(n, s)| WriteOp::Write(n, s)),
        1 => Just(WriteOp::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A writer's random writes, seeks and flushes leave the file equal to the
    /// model: written bytes where written, the old bytes elsewhere, and the size the
    /// larger of the old size and the furthest byte written.
    #[test]
    fn writer_matches_the_model(
        size in 0u64..300_000,
        buffers in 1usize..5,
        buffer_size in prop_oneof![Just(4096usize), Just(10_000), Just(65_536)],
        fs in prop_oneof![Just(512u32), Just(4096)],
        threaded in any::<bool>(),
        ops in proptest::collection::vec(write_op(), 1..30),
    ) {
        let (_dev, file) = ram_file(size, fs, threaded);
        let mut model = bytes(size as usize, 99);
        file.write_at(0, &model, Flags::UNALIGNED).unwrap();
        let mut w = DioWriter::with_options(file.clone(), &opts(buffers, buffer_size));
        let mut pos = 0usize;
        for op in ops {
            match op {
                WriteOp::Seek(n) => {
                    prop_assert_eq!(w.seek(SeekFrom::Start(n)).unwrap(), n);
                    pos = n as usize;
                }
                WriteOp::Write(n, seed) => {
                    let data = bytes(n, seed);
                    w.write_all(&data).unwrap();
                    if model.len() < pos + n {
                        model.resize(pos + n, 0);
                    }
model[pos..pos + n].copy_from_slice(&data);
                    pos += n;
                }
                WriteOp::Flush => w.flush().unwrap(),
            }
            prop_assert_eq!(w.position(), pos as u64);
        }
        let end = w.finish().unwrap();
        prop_assert_eq!(end, model.len() as u64);
        prop_assert_eq!(file.size(), model.len() as u64);
        prop_assert!(file_bytes(&file) == model, "the file differs from the model");
    }
}

#[test]
fn writer_seek_past_end_leaves_the_gap_to_the_device() {
    let (_dev, file) = ram_file(0, 4096, false);
    let mut w = DioWriter::with_options(file.clone(), &opts(2, 8192));
    w.write_all(b"head").unwrap();
    w.seek(SeekFrom::Start(100_001)).unwrap();
    w.write_all(b"tail").unwrap();
    assert_eq!(w.finish().unwrap(), 100_005);
    let got = file_bytes(&file);
    assert_eq!(&got[..4], b"head");
    assert!(got[4..100_001].iter().all(|&b| b == 0));
    assert_eq!(&got[100_001..], b"tail");
}

#[test]
fn copy_and_hash_through_streams_on_the_ram_device() {
    let size = 5_000_017usize;
    let data = bytes(size, 3);
    let (_dev, file) = ram_file(0, 4096, true);
    // Write with io::copy from a slice reader (odd read sizes from io::copy's 8 KiB
    // buffer), then read back with io::copy and hash the stream.
    let mut w = DioWriter::with_options(file.clone(), &opts(3, 64 << 10));
    let n = std::io::copy(&mut &data[..], &mut w).unwrap();
    assert_eq!(n, size as u64);
    assert_eq!(w.finish().unwrap(), size as u64);

    let mut r = DioReader::with_options(&file, &opts(4, 128 << 10));
    let mut back = Vec::new();
    std::io::copy(&mut r, &mut back).unwrap();
    assert!(
        back == data,
        "io::copy through the streams changed the bytes"
    );

    let mut r = DioReader::new(&file);
    let mut h = Sha256::new();
    std::io::copy(&mut r, &mut h).unwrap();
    assert_eq!(h.finalize(), Sha256::digest(&data));
}

#[test]
fn a_failed_write_behind_is_reported_by_the_next_call_and_by_finish() {
    let (dev, file) = ram_file(0, 4096, false);
    dev.fail_range(1 << 20..(1 << 20) + 4096, Some(Op::Write));
    let mut w = DioWriter::with_options(file.clone(), &opts(2, 64 << 10));
    let chunk = vec![5u8; 64 << 10];
    // Writes go on until the failure is seen; every call after it fails.
    let mut failed = None;
    for i in 0..40 {
        if let Err(e) = w.write_all(&chunk) {
            failed = Some((i, e));
            break;
        }
    }
    let (i, e) = failed.expect("the failed write behind was reported");
    assert!(
        i >= 16,
        "reported before the failing chunk was written: {i}"
    );
    assert_eq!(errno(&e), libc::EIO);
    assert!(w.write_all(b"more").is_err());
    assert!(w.flush().is_err());
    let err = w.finish().unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
}

#[test]
fn finish_reports_an_error_of_the_tail() {
    let (dev, file) = ram_file(0, 4096, false);
    dev.fail_range(0..4096, Some(Op::Write));
    let mut w = DioWriter::new(file);
    w.write_all(b"short").unwrap();
    assert_eq!(w.finish().unwrap_err().errno(), libc::EIO);
}

#[test]
fn reads_ahead_start_small_after_a_seek_and_grow_while_reading_on() {
    let data = bytes(DEV as usize, 3);
    let (dev, file) = ram_file(DEV, 4096, false);
    file.write_at(0, &data, Flags::UNALIGNED).unwrap();
    let o = opts(4, 1 << 20);
    let mut r = DioReader::with_options(&file, &o);
    // A few bytes after a seek: four reads of 64 KiB (1/16 of the buffer size) at
    // the block that holds the position, not four of 1 MiB, and once the first is
    // taken, one of 128 KiB behind them.
    let before = dev.stats();
    r.seek(SeekFrom::Start(5_000_000)).unwrap();
    let mut b = [0u8; 10];
    r.read_exact(&mut b).unwrap();
    assert_eq!(b[..], data[5_000_000..5_000_010]);
    let after = dev.stats();
    assert_eq!(after.requests - before.requests, 5);
    assert_eq!(after.bytes - before.bytes, 4 * (64 << 10) + (128 << 10));
    // Reading on, the reads double up to the buffer size: the rest of the file
    // (about 3 MiB) comes in few requests, and right.
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest[..] == data[5_000_010..]);
    let end = dev.stats();
    let reqs = end.requests - after.requests;
    assert!(reqs <= 8, "{reqs} requests for the rest");
    // Every byte read from the device once: from the block of the seek on.
    let from = 5_000_000 / 4096 * 4096;
    assert_eq!(end.bytes - before.bytes, DEV - from);
}

#[test]
fn a_read_error_is_returned_and_the_reader_recovers() {
    let (dev, file) = ram_file(1 << 20, 4096, false);
    file.write_at(0, &bytes(1 << 20, 1), Flags::UNALIGNED)
        .unwrap();
    dev.fail_range(300_000..300_512, Some(Op::Read));
    let mut r = DioReader::with_options(&file, &opts(2, 64 << 10));
    let mut out = Vec::new();
    let e = r.read_to_end(&mut out).unwrap_err();
    assert_eq!(errno(&e), libc::EIO);
    // Every byte before the failed read came (reads are at most 64 KiB).
    assert!(
        out.len() <= 300_000 && out.len() + (64 << 10) > 300_000,
        "bytes before the failed read came: {}",
        out.len()
    );
    assert!(out[..] == bytes(1 << 20, 1)[..out.len()]);
    dev.clear_faults();
    r.read_to_end(&mut out).unwrap();
    assert!(out == bytes(1 << 20, 1));
}

#[test]
fn dropping_streams_with_io_in_flight_is_safe() {
    // Threaded RAM device with reordering: requests complete on other threads,
    // after the streams are gone. The buffers belong to the requests, so nothing
    // touches freed memory (valgrind/ASan runs of this test would see it).
    let (dev, file) = ram_file(4 << 20, 4096, true);
    for _ in 0..20 {
        let mut r = DioReader::with_options(&file, &opts(8, 64 << 10));
        let mut b = [0u8; 10];
        r.read_exact(&mut b).unwrap();
        drop(r);
        let mut w = DioWriter::with_options(file.clone(), &opts(8, 64 << 10));
        w.write_all(&vec![1u8; 300_000]).unwrap();
        drop(w); // finishes: every write is done when drop returns
        assert_eq!(file_bytes(&file)[..300_000], vec![1u8; 300_000][..]);
    }
    while dev.in_flight() != 0 {
        std::thread::yield_now();
    }
}

#[test]
fn streams_over_a_host_file_match_std_fs() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("stream.bin");
    let data = bytes(3_000_001, 11);
    let raw = RawFile::open(
        &path,
        &RawOptions {
            write: true,
            create: true,
            ..RawOptions::default()
        },
    )
    .unwrap();
    let mut w = DioWriter::with_options(
        &raw,
        &StreamOptions {
            sync_on_finish: true,
            ..opts(4, 256 << 10)
        },
    );
    std::io::copy(&mut &data[..], &mut w).unwrap();
    assert_eq!(w.finish().unwrap(), data.len() as u64);
    // The host file has exactly the bytes: no block padding at the end.
    assert!(std::fs::read(&path).unwrap() == data);

    // Overwrite a middle range through a second writer; std sees it.
    let mut w = DioWriter::new(&raw);
    w.seek(SeekFrom::Start(1_000_003)).unwrap();
    w.write_all(b"overwritten").unwrap();
    w.finish().unwrap();
    let mut model = data.clone();
    model[1_000_003..1_000_014].copy_from_slice(b"overwritten");
    assert!(std::fs::read(&path).unwrap() == model);

    let ro = RawFile::open(&path, &RawOptions::default()).unwrap();
    let mut r = DioReader::new(&ro);
    let mut h = Sha256::new();
    std::io::copy(&mut r, &mut h).unwrap();
    assert_eq!(h.finalize(), Sha256::digest(&model));
    // A writer over a read-only file fails, at the latest when finished.
    let mut w = DioWriter::new(&ro);
    let _ = w.write_all(b"x");
    assert_eq!(w.finish().unwrap_err().errno(), libc::EBADF);
}

/// Throughput, not a check: with `DIO_STREAM_BENCH=1`, a cold 1 GiB host file read
/// through a `DioReader` (`StreamOptions::default()`, or `DIO_BENCH_N` buffers of
/// `DIO_BENCH_B` bytes; the caller reading 64 KiB at a time), through
/// `std::fs::File` (page cache and kernel readahead, 64 KiB reads) and through dio's
/// plain sync 1 MiB reads; then 1 GiB written through a `DioWriter` plus a device
/// flush against `std::fs::File` writes plus `fdatasync`. The page cache is dropped
/// before each run; three rounds alternate the contenders; prints the medians of
/// the per-round ratios. Needs root (drop_caches).
#[test]
fn stream_speed_against_std_fs() {
    if std::env::var_os("DIO_STREAM_BENCH").is_none() {
        eprintln!("skipped: set DIO_STREAM_BENCH=1 to measure stream throughput");
        return;
    }
    use std::time::Instant;
    const SIZE: usize = 1 << 30;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("bench.bin");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let block = bytes(1 << 20, 1);
        for _ in 0..SIZE >> 20 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let drop_caches = || {
        std::process::Command::new("sync").status().unwrap();
        if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
            panic!("cannot drop the page cache (needs root)");
        }
    };
    let gib_s = |secs: f64| SIZE as f64 / secs / (1u64 << 30) as f64;
    let time = |f: &mut dyn FnMut() -> u64| {
        drop_caches();
        let t = Instant::now();
        let n = f();
        assert_eq!(n, SIZE as u64);
        t.elapsed().as_secs_f64()
    };
    let stream = || {
        let raw = RawFile::open(&path, &RawOptions::default()).unwrap();
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let d = StreamOptions::default();
        let mut r = DioReader::with_options(
            &raw,
            &opts(
                env("DIO_BENCH_N", d.buffers),
                env("DIO_BENCH_B", d.buffer_size),
            ),
        );
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0u64;
        if std::env::var_os("DIO_BENCH_NOCOPY").is_some() {
            loop {
                let k = r.fill_buf().unwrap().len();
                if k == 0 {
                    return n;
                }
                r.consume(k);
                n += k as u64;
            }
        }
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                break n;
            }
            n += k as u64;
        }
    };
    let std_read = || {
        let mut f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf).unwrap();
            if k == 0 {
                break n;
            }
            n += k as u64;
        }
    };
    let dio_sync = || {
        let raw = RawFile::open(&path, &RawOptions::default()).unwrap();
        let file = raw.direct();
        let mut buf = dio::AlignedBuf::new(1 << 20, file.geometry().buffer_align());
        let mut n = 0u64;
        loop {
            let k = file.read_at(n, &mut buf, Flags::NONE).unwrap();
            if k == 0 {
                break n;
            }
            n += k as u64;
        }
    };
    let wpath = dir.path().join("written.bin");
    let block = bytes(64 << 10, 2);
    let stream_write = || {
        let _ = std::fs::remove_file(&wpath);
        let raw = RawFile::open(
            &wpath,
            &RawOptions {
                write: true,
                create: true,
                ..RawOptions::default()
            },
        )
        .unwrap();
        let mut w = DioWriter::with_options(
            &raw,
            &StreamOptions {
                sync_on_finish: true,
                ..StreamOptions::default()
            },
        );
        for _ in 0..SIZE / block.len() {
            w.write_all(&block).unwrap();
        }
        w.finish().unwrap()
    };
    let std_write = || {
        let _ = std::fs::remove_file(&wpath);
        let mut f = std::fs::File::create(&wpath).unwrap();
        for _ in 0..SIZE / block.len() {
            f.write_all(&block).unwrap();
        }
        f.sync_data().unwrap();
        f.metadata().unwrap().len()
    };
    let (mut vs_std, mut vs_sync, mut w_vs_std) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let s = time(&mut { stream });
        let f = time(&mut { std_read });
        let d = time(&mut { dio_sync });
        let sw = time(&mut { stream_write });
        let fw = time(&mut { std_write });
        eprintln!(
            "round {round}: read GiB/s stream {:.2}, std::fs {:.2}, dio sync 1 MiB {:.2}; \
             write+sync GiB/s stream {:.2}, std::fs {:.2}",
            gib_s(s),
            gib_s(f),
            gib_s(d),
            gib_s(sw),
            gib_s(fw)
        );
        vs_std.push(f / s);
        vs_sync.push(d / s);
        w_vs_std.push(fw / sw);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    eprintln!(
        "median speed ratios: stream/std::fs read {:.2}x, stream/dio sync read {:.2}x, \
         stream/std::fs write+sync {:.2}x",
        median(vs_std),
        median(vs_sync),
        median(w_vs_std)
    );
}

/// Files inside ext2/ext4 images (fragmented, sparse, odd sizes) read through a
/// `DioReader` over the ext client's `DirectFile`: the CRC-32 of the stream equals
/// the fixture manifest's (made from the kernel's own mount when the images were
/// built).
#[cfg(feature = "ext")]
#[test]
fn reader_over_ext_files_matches_the_fixture_manifest() {
    use dio::ext::Ext;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ext");
    let manifest = std::fs::read_to_string(fixtures.join("manifest.txt")).unwrap();
    let want: Vec<(&str, u64, u32)> = manifest
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[0] == "f").then(|| {
                (
                    f[1],
                    f[2].parse().unwrap(),
                    u32::from_str_radix(f[3], 16).unwrap(),
                )
            })
        })
        .filter(|(p, _, _)| {
            // (/frag's bytes depend on the block size: the manifest has no CRC of them)
            [
                "/sparse3m",
                "/data/pattern",
                "/data/random",
                "/data/sparse",
                "/data/far",
            ]
            .contains(p)
        })
        .collect();
    assert_eq!(want.len(), 5, "the manifest lists the files");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut streamed = 0;
    for name in ["ext4-4k", "ext2-1k"] {
        let gz = std::fs::File::open(fixtures.join(format!("{name}.img.gz"))).unwrap();
        let mut img = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut img)
            .unwrap();
        let path = dir.path().join(format!("{name}.img"));
        std::fs::write(&path, img).unwrap();
        let raw = RawFile::open(&path, &RawOptions::default()).unwrap();
        let ext = Ext::open(Arc::clone(raw.direct().device()), raw.size()).unwrap();
        for &(p, size, crc) in &want {
            let file = ext
                .open_file(&ext.lookup(p.as_bytes(), true).unwrap())
                .unwrap();
            let Some(direct) = file.direct() else {
                // Inline data: no blocks for the engine (ExtFile::direct says so).
                eprintln!("{name}:{p}: no DirectFile, skipped");
                continue;
            };
            streamed += 1;
            let mut r = DioReader::with_options(direct, &opts(3, 48 << 10));
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            assert_eq!(data.len() as u64, size, "{name}:{p}");
            let mut c = flate2::Crc::new();
            c.update(&data);
            assert_eq!(c.sum(), crc, "{name}:{p}");
        }
    }
    assert!(streamed >= 8, "only {streamed} files had a DirectFile");
}
