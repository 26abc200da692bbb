//! Shared pieces of the crash tests: scratch directories, broken devices (the
//! mutations), and a seeded workload that claims what it was promised.

#![allow(dead_code)]

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dio::{
    AlignedBuf, Completion, CompletionMode, Device, DirectFile, Finished, Flags, Geometry, Op,
    Request,
};
use dio_crash::Recorder;

/// A fresh directory under the crate's target tmp dir (O_DIRECT works there).
/// Directories of earlier runs of the same test whose process is gone are removed.
pub fn scratch(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dio-crash");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(pid) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(name))
                .and_then(|r| r.strip_prefix('-'))
                .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
            else {
                continue;
            };
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let d = root.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether to run the long versions (`DIO_CRASH_LONG=1`).
pub fn long() -> bool {
    std::env::var_os("DIO_CRASH_LONG").is_some_and(|v| v != "0" && !v.is_empty())
}

pub use dio_testkit::Rng;

/// Passes everything through but clears FUA: a device without FUA (the block
/// layer then relies on flushes).
pub struct StripFua<D>(pub D);

impl<D: Device> Device for StripFua<D> {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn submit(&self, mut req: Request) {
        req.set_fua(false);
        self.0.submit(req)
    }
    fn poll(&self, wait: bool) -> io::Result<usize> {
        self.0.poll(wait)
    }
    fn completion_mode(&self) -> CompletionMode {
        self.0.completion_mode()
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn name(&self) -> &str {
        "strip-fua"
    }
}

/// MUTATION: acknowledges flushes without doing them.
pub struct DropFlush<D>(pub D);

impl<D: Device> Device for DropFlush<D> {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn submit(&self, req: Request) {
        self.0.submit(req)
    }
    fn poll(&self, wait: bool) -> io::Result<usize> {
        self.0.poll(wait)
    }
    fn completion_mode(&self) -> CompletionMode {
        self.0.completion_mode()
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "drop-flush"
    }
}

struct Ignore;
impl Completion for Ignore {
    fn complete(self: Arc<Self>, _req: Finished, _result: io::Result<()>) {}
}

/// MUTATION: completes a write as soon as it arrives (from a copy of its bytes),
/// and sends it to the device only when the next request comes (or at `drain`).
pub struct EarlyAck<D> {
    pub inner: D,
    held: Mutex<Vec<(u64, AlignedBuf, bool)>>,
}

impl<D: Device> EarlyAck<D> {
    pub fn new(inner: D) -> Self {
        EarlyAck {
            inner,
            held: Mutex::new(Vec::new()),
        }
    }
    pub fn drain(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (off, buf, fua) in held {
            self.inner.submit(Request::with_buf(
                Op::Write,
                off,
                buf,
                fua,
                Arc::new(Ignore),
                0,
            ));
        }
    }
}

impl<D: Device> Device for EarlyAck<D> {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn submit(&self, req: Request) {
        self.drain();
        if req.op() == Op::Read {
            return self.inner.submit(req);
        }
        let mut buf = AlignedBuf::new(req.len() as usize, self.geometry().buffer_align());
        req.copy_out(0, &mut buf);
        self.held
            .lock()
            .unwrap()
            .push((req.offset(), buf, req.fua()));
        req.complete(Ok(()));
    }
    fn poll(&self, wait: bool) -> io::Result<usize> {
        self.inner.poll(wait)
    }
    fn completion_mode(&self) -> CompletionMode {
        self.inner.completion_mode()
    }
    fn flush(&self) -> io::Result<()> {
        // The bug: the flush does not wait for (or send) the writes it holds.
        self.inner.flush()
    }
    fn name(&self) -> &str {
        "early-ack"
    }
}

/// A seeded workload on a file over the identity map (file offset = device
/// offset): byte-granular and aligned writes, some with DSYNC, some followed by
/// `sync_data`, each promise logged as a claim. `model` starts as the device's
/// bytes; the function returns the bytes it expects on the device at the end.
pub fn raw_workload<D: Device>(
    rec: &Recorder<D>,
    file: &DirectFile,
    seed: u64,
    ops: usize,
    mut model: Vec<u8>,
) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let size = model.len() as u64;
    // Ranges written since the last sync and not yet claimed.
    let mut pending: Vec<(u64, u64)> = Vec::new();
    for op in 0..ops {
        rec.mark(&format!("op {op}")).unwrap();
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => 4096 * (1 + rng.below(4)),
            2 => 512 * (1 + rng.below(16)),
            _ => 1 + rng.below(20_000),
        };
        let aligned = rng.below(2) == 0;
        let mut off = rng.below(size - len);
        if aligned {
            off &= !4095;
        }
        let byte = (op % 251) as u8 + 1;
        let data = vec![byte; len as usize];
        let dsync = rng.below(3) == 0;
        let mut flags = Flags::UNALIGNED;
        if dsync {
            flags |= Flags::DSYNC;
        }
        assert_eq!(file.write_at(off, &data, flags).unwrap(), len as usize);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        if dsync {
            rec.claim(off, &data).unwrap();
        } else {
            pending.push((off, len));
        }
        if rng.below(5) == 0 {
            file.sync_data().unwrap();
            for (o, l) in pending.drain(..) {
                rec.claim(o, &model[o as usize..(o + l) as usize]).unwrap();
            }
        }
    }
    model
}
