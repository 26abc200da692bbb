//! The recorder: a [`Device`] wrapper that logs every completed write (with its
//! bytes), every completed flush, and the workload's marks and claims, in
//! completion order, while passing everything through to the device under it.

use std::io;
use std::path::Path;
use std::sync::Arc;

use dio::{Completion, Device, DeviceWrapper, Finished, Op, Request};

use crate::log::{Entry, Header, LogWriter};
use crate::Result;

/// A device that records what reaches the device under it (see the crate docs).
///
/// Reads pass straight through. A write is logged when it completes, with the
/// bytes it carried, whether it was FUA, whether it failed, and how many records
/// the log held when it was submitted (so the replayer knows which writes were in
/// flight together). A flush is logged when it completes, with the number of
/// records completed before it was issued: exactly those are covered.
///
/// If the log cannot be written (disk full), the error sticks: every later flush
/// fails with it, so a workload never believes a run was recorded that was not.
pub struct Recorder<D: Device> {
    inner: D,
    log: Arc<LogWriter>,
}

impl<D: Device> std::fmt::Debug for Recorder<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("inner", &self.inner.name())
            .field("log", &self.log.path())
            .finish()
    }
}

impl<D: Device> Recorder<D> {
    /// Record `inner` into a new log at `path` (created or truncated), whose header
    /// holds the device's size and logical block.
    pub fn create(inner: D, path: impl AsRef<Path>) -> Result<Recorder<D>> {
        let g = inner.geometry();
        let log = LogWriter::create(
            path,
            Header {
                logical_block: g.logical_block,
                device_size: g.size,
            },
        )?;
        Ok(Recorder {
            inner,
            log: Arc::new(log),
        })
    }

    /// The device under the recorder.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Records logged so far (the position a mark or state refers to).
    pub fn position(&self) -> u64 {
        self.log.records()
    }

    /// Log a mark (a name for this position, shown in replay reports).
    pub fn mark(&self, name: &str) -> io::Result<u64> {
        self.log.append(&Entry::Mark(name))
    }

    /// Declare that the device holds `data` at byte `offset` durably from now on
    /// (until a later write overwrites it): what the workload was promised, e.g.
    /// by a completed dsync write or an fsync. The model checker fails every crash
    /// state after this point that does not hold these bytes (or newer ones).
    pub fn claim(&self, offset: u64, data: &[u8]) -> io::Result<u64> {
        self.log.append(&Entry::Claim { offset, data })
    }

    /// fsync the log file.
    pub fn sync_log(&self) -> io::Result<()> {
        self.log.sync()
    }

    fn check_log(&self) -> io::Result<()> {
        match self.log.broken() {
            Some(kind) => Err(io::Error::new(
                kind,
                format!("the crash log {} is incomplete", self.log.path().display()),
            )),
            None => Ok(()),
        }
    }
}

/// Takes a forwarded write back, logs it, completes it.
struct Logged {
    log: Arc<LogWriter>,
    submitted: u64,
}

impl Completion for Logged {
    fn complete(self: Arc<Self>, mut fin: Finished, result: io::Result<()>) {
        let Some(parent) = fin.take_parent() else {
            return;
        };
        let mut data = vec![0u8; parent.len() as usize];
        parent.copy_out(0, &mut data);
        let logged = self.log.append(&Entry::Write {
            submitted: self.submitted,
            offset: parent.offset(),
            fua: parent.fua(),
            failed: result.is_err(),
            data: &data,
        });
        // A write the log missed is reported as failed: the run is not recorded.
        let result = result.and(logged.map(|_| ()));
        parent.complete(result);
    }
}

impl<D: Device> DeviceWrapper for Recorder<D> {
    type Inner = D;

    fn inner(&self) -> &D {
        &self.inner
    }

    fn submit(&self, req: Request) {
        if req.op() == Op::Read {
            return self.inner.submit(req);
        }
        let done = Arc::new(Logged {
            log: Arc::clone(&self.log),
            submitted: self.log.records(),
        });
        self.inner.submit(req.forward(done));
    }

    fn flush(&self) -> io::Result<()> {
        self.check_log()?;
        let covers = self.log.records();
        self.inner.flush()?;
        self.log.append(&Entry::Flush { covers })?;
        Ok(())
    }

    fn name(&self) -> &str {
        "crash-recorder"
    }
}
