//! `UringPlug`: while a thread holds one, its calls' io_uring requests stay in the
//! submission ring until the thread polls or the plug drops (or, with a limit,
//! until that many are held). The oracle for
//! "submitted" is the kernel's own account of each ring (`SqHead`/`SqTail` in
//! /proc/self/fdinfo of every io_uring descriptor of this process), and the data
//! is checked against the file as std::fs reads it. One test function: the rings
//! of the whole process are counted, so nothing else may run here at once.
//! Skipped where io_uring is unavailable.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use dio::{
    AlignedBuf, DirectFile, Flags, RawFile, RawOptions, UringConfig, UringDevice, UringPlug,
};

const BLOCK: usize = 4096;
const CALLS: u64 = 8;

/// Entries pushed to a submission ring of this process that the kernel has not
/// consumed yet, over all its io_uring descriptors.
fn unsubmitted() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:[io_uring]" {
            continue;
        }
        let info =
            std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name())).unwrap();
        let field = |name: &str| -> u32 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or_else(|| panic!("no {name} in fdinfo:\n{info}"))
                .trim()
                .parse()
                .unwrap()
        };
        total += u64::from(field("SqTail").wrapping_sub(field("SqHead")));
    }
    total
}

fn scratch(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("plug-{name}-{}.bin", std::process::id()));
    let mut data = vec![0u8; BLOCK * 4 * CALLS as usize];
    dio_testkit::pattern(&mut data, 1, 0);
    std::fs::write(&path, &data).unwrap();
    path
}

fn block(seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(BLOCK, BLOCK);
    dio_testkit::pattern(&mut b, seed, 0);
    b
}

type Done = mpsc::Receiver<(u64, dio::Result<usize>, AlignedBuf)>;

/// Start CALLS async reads (or writes of `block(100 + i)`) of every other block.
fn start(file: &DirectFile, write: bool) -> Done {
    let (tx, rx) = mpsc::channel();
    for i in 0..CALLS {
        let tx = tx.clone();
        let done = move |mut c: dio::Completed<AlignedBuf>| {
            let _ = tx.send((i, c.result, c.bufs.pop().unwrap()));
        };
        let at = i * 2 * BLOCK as u64;
        if write {
            file.write_async(at, vec![block(100 + i)], Flags::NONE, done);
        } else {
            file.read_async(at, vec![AlignedBuf::new(BLOCK, BLOCK)], Flags::NONE, done);
        }
    }
    rx
}

/// Poll until every call of `rx` completed; check each against the file's bytes.
fn finish(file: &DirectFile, rx: &Done, path: &Path, polled: bool) {
    let mut got = 0;
    while got < CALLS {
        match rx.try_recv() {
            Ok((i, r, buf)) => {
                assert_eq!(r.unwrap(), BLOCK);
                let disk = std::fs::read(path).unwrap();
                let at = (i * 2) as usize * BLOCK;
                assert_eq!(&disk[at..at + BLOCK], &buf[..], "call {i}");
                got += 1;
            }
            Err(mpsc::TryRecvError::Empty) if polled => {
                file.poll(true).unwrap();
            }
            Err(mpsc::TryRecvError::Empty) => {
                // Completions come on the reaper thread; the guard only turns a
                // hang into a failure.
                let (i, r, buf) = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("completion");
                assert_eq!(r.unwrap(), BLOCK);
                let disk = std::fs::read(path).unwrap();
                let at = (i * 2) as usize * BLOCK;
                assert_eq!(&disk[at..at + BLOCK], &buf[..], "call {i}");
                got += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn polled_device(name: &str, per_thread: bool) {
    let path = scratch(name);
    let raw = RawFile::open(
        &path,
        &RawOptions {
            write: true,
            backend: dio::Backend::Uring,
            queue_depth: 32,
            single_thread: !per_thread,
            ring_per_thread: per_thread,
            ..RawOptions::default()
        },
    )
    .unwrap();
    let file = raw.direct();
    assert_eq!(unsubmitted(), 0, "{name}: nothing queued at open");

    // Held back while plugged (an inner plug's end changes nothing), then
    // submitted by the poll that waits for them.
    let plug = UringPlug::new();
    let rx = start(file, false);
    assert_eq!(
        unsubmitted(),
        CALLS,
        "{name}: plugged reads wait in the ring"
    );
    drop(UringPlug::new());
    assert_eq!(
        unsubmitted(),
        CALLS,
        "{name}: an inner plug holds nothing back"
    );
    finish(file, &rx, &path, true);
    assert_eq!(unsubmitted(), 0, "{name}");

    // The plug's end submits what it held back.
    let rx = start(file, true);
    assert_eq!(
        unsubmitted(),
        CALLS,
        "{name}: plugged writes wait in the ring"
    );
    drop(plug);
    assert_eq!(unsubmitted(), 0, "{name}: the plug's end submits");
    finish(file, &rx, &path, true);
    let disk = std::fs::read(&path).unwrap();
    for i in 0..CALLS {
        let at = (i * 2) as usize * BLOCK;
        assert_eq!(
            &disk[at..at + BLOCK],
            &block(100 + i)[..],
            "{name}: write {i}"
        );
    }

    // A sync call under a plug polls its own requests out: no hang.
    let plug = UringPlug::new();
    let mut buf = AlignedBuf::new(2 * BLOCK, BLOCK);
    let n = file
        .read(
            BLOCK as u64,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            Flags::NONE,
        )
        .unwrap();
    assert_eq!(n, 2 * BLOCK);
    assert_eq!(
        &buf[..],
        &disk[BLOCK..3 * BLOCK],
        "{name}: sync read under a plug"
    );
    drop(plug);

    // A limit of 3: every third call submits what is held (fio's
    // iodepth_batch_submit), the rest waits for the poll. An inner plug's smaller
    // limit lasts as long as it does.
    let plug = UringPlug::new();
    let inner = UringPlug::with_limit(3);
    let rx = start(file, false);
    assert_eq!(unsubmitted(), CALLS % 3, "{name}: limit 3");
    finish(file, &rx, &path, true);
    drop(inner);
    let rx = start(file, false);
    assert_eq!(unsubmitted(), CALLS, "{name}: the outer plug's limit again");
    finish(file, &rx, &path, true);
    drop(plug);

    // Without a plug, every call's requests go at its end.
    let rx = start(file, false);
    assert_eq!(unsubmitted(), 0, "{name}: unplugged calls are submitted");
    finish(file, &rx, &path, true);
    drop(raw);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_plug_holds_submissions_until_poll_or_its_end_and_loses_nothing() {
    if let Err(e) = dio::probe::uring_available() {
        dio_testkit::skip(format_args!("io_uring unavailable here ({e})"));
        return;
    }
    polled_device("per-thread", true);
    polled_device("single-issuer", false);

    // A device that completes on a reaper thread submits at once, plug or not:
    // nobody on this thread would poll the held requests out.
    let path = scratch("reaper");
    let mut cfg = UringConfig::default();
    cfg.reaper = true;
    cfg.queue_depth = 32;
    let raw = RawFile::open(
        &path,
        &RawOptions {
            write: true,
            backend: dio::Backend::Sync,
            ..RawOptions::default()
        },
    )
    .unwrap();
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap()
    };
    let dev = UringDevice::new(direct, raw.direct().device().geometry(), &cfg).unwrap();
    let file = raw.direct().with_device(Arc::new(dev)).unwrap();
    assert_eq!(
        file.device().completion_mode(),
        dio::CompletionMode::Interrupt
    );
    let plug = UringPlug::new();
    let rx = start(&file, true);
    assert_eq!(unsubmitted(), 0, "reaper: submitted at once under a plug");
    finish(&file, &rx, &path, false);
    drop(plug);
    drop(file);
    drop(raw);
    std::fs::remove_file(&path).unwrap();
}
