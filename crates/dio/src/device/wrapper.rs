//! One way to write a [`Device`] that wraps another: implement [`DeviceWrapper`]
//! (name the inner device, override only the calls the wrapper changes) and the
//! blanket impl makes the type a [`Device`] that forwards everything else.

#![forbid(unsafe_code)]

use std::io;

use super::{CompletionMode, Device, Geometry, Request};

/// A [`Device`] over another device, written as only what it changes.
///
/// Every method defaults to the same call on [`DeviceWrapper::inner`]; a wrapper
/// overrides the ones it changes (most often `submit`, to count, log, fail or
/// refuse requests, and `flush`). Every type that implements it is a [`Device`]
/// through a blanket impl, which forwards each [`Device`] method to the method of
/// the same name here. So a wrapper never forgets to forward a call the trait
/// gains later (`watch`, `unwatch`, `unplug`): a polled device under it keeps
/// being watched and unplugged.
///
/// Call a wrapper through [`Device`] (`use dio::Device`); with both traits in
/// scope, the method names are ambiguous, so implement this one in a module of its
/// own or call `Device::submit(&dev, req)`.
///
/// ```
/// use std::io;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use dio::{read_device, AlignedBuf, Device, DeviceWrapper, MemDevice, MemDeviceConfig};
///
/// /// Counts flushes; passes everything through.
/// struct CountFlushes<D> {
///     inner: D,
///     flushes: AtomicU64,
/// }
///
/// impl<D: Device> DeviceWrapper for CountFlushes<D> {
///     type Inner = D;
///     fn inner(&self) -> &D {
///         &self.inner
///     }
///     fn flush(&self) -> io::Result<()> {
///         self.flushes.fetch_add(1, Ordering::Relaxed);
///         self.inner.flush()
///     }
/// }
///
/// let dev = CountFlushes {
///     inner: MemDevice::new(MemDeviceConfig::new(1 << 20, 512)),
///     flushes: AtomicU64::new(0),
/// };
/// Device::flush(&dev).unwrap();
/// assert_eq!(dev.flushes.load(Ordering::Relaxed), 1);
/// assert_eq!(Device::name(&dev), "mem");
/// // Requests pass through to the RAM device.
/// let dev: Arc<dyn Device> = Arc::new(dev);
/// let mut buf = AlignedBuf::new(512, 512);
/// read_device(&*dev, 0, &mut buf).unwrap();
/// assert_eq!(&buf[..], &[0u8; 512][..]);
/// ```
pub trait DeviceWrapper: Send + Sync {
    /// The device under the wrapper.
    type Inner: Device + ?Sized;

    /// The device under the wrapper, where every call not overridden goes.
    fn inner(&self) -> &Self::Inner;

    /// [`Device::geometry`]; by default the inner device's.
    fn geometry(&self) -> Geometry {
        self.inner().geometry()
    }

    /// [`Device::submit`]; by default passed to the inner device.
    fn submit(&self, req: Request) {
        self.inner().submit(req)
    }

    /// [`Device::unplug`]; by default passed to the inner device.
    fn unplug(&self) {
        self.inner().unplug()
    }

    /// [`Device::poll`]; by default passed to the inner device.
    fn poll(&self, wait: bool) -> io::Result<usize> {
        self.inner().poll(wait)
    }

    /// [`Device::completion_mode`]; by default the inner device's.
    fn completion_mode(&self) -> CompletionMode {
        self.inner().completion_mode()
    }

    /// [`Device::watch`]; by default passed to the inner device.
    fn watch(&self) -> bool {
        self.inner().watch()
    }

    /// [`Device::unwatch`]; by default passed to the inner device.
    fn unwatch(&self) {
        self.inner().unwatch()
    }

    /// [`Device::flush`]; by default passed to the inner device.
    fn flush(&self) -> io::Result<()> {
        self.inner().flush()
    }

    /// [`Device::name`]; by default the inner device's.
    fn name(&self) -> &str {
        self.inner().name()
    }
}

impl<W: DeviceWrapper> Device for W {
    fn geometry(&self) -> Geometry {
        DeviceWrapper::geometry(self)
    }
    fn submit(&self, req: Request) {
        DeviceWrapper::submit(self, req)
    }
    fn unplug(&self) {
        DeviceWrapper::unplug(self)
    }
    fn poll(&self, wait: bool) -> io::Result<usize> {
        DeviceWrapper::poll(self, wait)
    }
    fn completion_mode(&self) -> CompletionMode {
        DeviceWrapper::completion_mode(self)
    }
    fn watch(&self) -> bool {
        DeviceWrapper::watch(self)
    }
    fn unwatch(&self) {
        DeviceWrapper::unwatch(self)
    }
    fn flush(&self) -> io::Result<()> {
        DeviceWrapper::flush(self)
    }
    fn name(&self) -> &str {
        DeviceWrapper::name(self)
    }
}
