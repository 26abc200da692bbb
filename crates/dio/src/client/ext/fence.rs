//! The device an ext file's engine handles see: the image's device with its
//! write path fenced off. Reads, polls and flushes pass through; a write request
//! submitted here completes with an error and never reaches the device.
//!
//! The engine sends every device request of a file through its block map's
//! `submit_io` hook, and the ext map (`ExtMap`) checks a write there and hands it
//! to the real device itself. So a write arriving here went around the map: it
//! is refused, whoever sent it.

use std::io;
use std::sync::Arc;

use crate::device::{Device, DeviceWrapper, Op, Request};

/// The image's device, writable only through the ext block map.
pub(crate) struct Fence {
    inner: Arc<dyn Device>,
}

impl Fence {
    pub(crate) fn new(inner: Arc<dyn Device>) -> Fence {
        Fence { inner }
    }
}

impl DeviceWrapper for Fence {
    type Inner = dyn Device;

    fn inner(&self) -> &(dyn Device + 'static) {
        &*self.inner
    }

    fn submit(&self, req: Request) {
        if req.op() == Op::Write {
            req.complete(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "ext: a write that did not come through the file's block map",
            )));
            return;
        }
        self.inner.submit(req);
    }
}
