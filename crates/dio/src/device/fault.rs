//! A device wrapper that injects I/O errors: [`FaultDevice`] fails a chosen fraction
//! of the requests it is given with `EIO`, half of them before the data moves and
//! half after (the data landed, the device still says `EIO`), the two ways a real
//! device fails a write. The choice follows a seeded generator in submission order,
//! so a run repeats from its seed. fsx (the `dio-fsx` crate) puts one between the
//! engine and the RAM device to check that errors and short counts never reveal
//! stale data; it wraps any [`Device`].

#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Completion, Device, DeviceWrapper, Finished, Request};

/// How a [`FaultDevice`] fails requests.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct FaultConfig {
    /// Fraction of requests failed with `EIO`, from 0 (none) to 1 (all).
    pub rate: f64,
    /// Seed of the choice of requests (and of before or after the data moved).
    pub seed: u64,
}

impl FaultConfig {
    /// Fail a fraction `rate` (clamped to 0..=1) of requests, chosen from seed 0.
    pub fn new(rate: f64) -> FaultConfig {
        FaultConfig { rate, seed: 0 }
    }
    /// Set the seed.
    pub fn seed(mut self, seed: u64) -> FaultConfig {
        self.seed = seed;
        self
    }
}

/// Counters of a [`FaultDevice`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests seen.
    pub requests: u64,
    /// Requests failed with `EIO` without touching the medium.
    pub failed: u64,
    /// Requests that moved their data and then reported `EIO` anyway.
    pub torn: u64,
}

impl FaultStats {
    /// Faults injected, of both kinds.
    pub fn injected(&self) -> u64 {
        self.failed + self.torn
    }
}

/// A device that fails a fraction of its requests with `EIO`, half of them before
/// the data moves and half after (the data landed, the device still says `EIO`),
/// chosen by a seeded generator in submission order; everything else goes to the
/// inner device unchanged. Faults can be switched off and on ([`FaultDevice::set_armed`]), for a
/// check that must see the medium as it is.
///
/// ```
/// use std::sync::Arc;
/// use dio::{AlignedBuf, Device, FaultConfig, FaultDevice, MemDevice, MemDeviceConfig};
///
/// let mem = Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)));
/// let dev = FaultDevice::new(mem, FaultConfig::new(1.0).seed(7));
/// let mut buf = AlignedBuf::new(4096, 4096);
/// let e = dio::read_device(&dev, 0, &mut buf).unwrap_err();
/// assert_eq!(e.raw_os_error(), Some(libc::EIO));
/// dev.set_armed(false);
/// dio::read_device(&dev, 0, &mut buf).unwrap();
/// assert_eq!(dev.stats().requests, 2);
/// assert_eq!(dev.stats().injected(), 1);
/// ```
pub struct FaultDevice {
    inner: Arc<dyn Device>,
    rate_ppm: u64,
    armed: AtomicBool,
    rng: Mutex<u64>,
    requests: AtomicU64,
    failed: AtomicU64,
    torn: AtomicU64,
}

impl fmt::Debug for FaultDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultDevice")
            .field("inner", &self.inner.name())
            .field("rate_ppm", &self.rate_ppm)
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .finish()
    }
}

/// One step of splitmix64 on `state`.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FaultDevice {
    /// Wrap `inner`, failing requests as `cfg` says. Faults start armed.
    pub fn new(inner: Arc<dyn Device>, cfg: FaultConfig) -> FaultDevice {
        FaultDevice {
            inner,
            rate_ppm: (cfg.rate.clamp(0.0, 1.0) * 1e6) as u64,
            armed: AtomicBool::new(true),
            rng: Mutex::new(cfg.seed ^ 0xFA17),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            torn: AtomicU64::new(0),
        }
    }

    /// Inject faults (true) or pass every request through (false).
    pub fn set_armed(&self, armed: bool) {
        self.armed.store(armed, Ordering::SeqCst);
    }

    /// Whether faults may be injected now: armed, with a rate above 0.
    pub fn active(&self) -> bool {
        self.armed.load(Ordering::SeqCst) && self.rate_ppm > 0
    }

    /// Counters so far.
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            requests: self.requests.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            torn: self.torn.load(Ordering::SeqCst),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn Device> {
        &self.inner
    }
}

/// Reports `EIO` for a request whose data the inner device moved.
struct FailAfter;

impl Completion for FailAfter {
    fn complete(self: Arc<Self>, mut inner: Finished, _result: io::Result<()>) {
        if let Some(outer) = inner.take_parent() {
            outer.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
    }
}

impl DeviceWrapper for FaultDevice {
    type Inner = dyn Device;

    fn inner(&self) -> &(dyn Device + 'static) {
        &*self.inner
    }

    fn submit(&self, req: Request) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.active() {
            let (fail, land) = {
                let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                let fail = next(&mut rng) % 1_000_000 < self.rate_ppm;
                (fail, next(&mut rng) % 100 < 50)
            };
            if fail && land {
                self.torn.fetch_add(1, Ordering::SeqCst);
                // The inner request stands in for the outer one, which completes
                // (with EIO) only after the inner one moved the data.
                return self.inner.submit(req.forward(Arc::new(FailAfter)));
            }
            if fail {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
            }
        }
        self.inner.submit(req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_device, write_device, AlignedBuf, MemDevice, MemDeviceConfig};

    fn mem() -> Arc<MemDevice> {
        Arc::new(MemDevice::new(MemDeviceConfig::new(1 << 20, 512)))
    }

    /// Every request fails, some before and some after the data moved: the medium
    /// holds the new data exactly for the torn ones.
    #[test]
    fn failed_requests_leave_the_medium_alone_and_torn_ones_write_it() {
        let mem = mem();
        let dev = FaultDevice::new(mem.clone(), FaultConfig::new(1.0).seed(3));
        let (mut before, mut after) = (0, 0);
        for block in 0..64u64 {
            let mut buf = AlignedBuf::new(4096, 4096);
            buf.fill(block as u8 + 1);
            let e = write_device(&dev, block * 4096, &mut buf, false).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            let mut back = AlignedBuf::new(4096, 4096);
            read_device(&*mem, block * 4096, &mut back).unwrap();
            if back.iter().all(|&b| b == block as u8 + 1) {
                after += 1;
            } else {
                assert!(back.iter().all(|&b| b == 0), "block {block} half written");
                before += 1;
            }
        }
        let s = dev.stats();
        assert_eq!((s.requests, s.failed, s.torn), (64, before, after));
        assert!(before > 0 && after > 0, "{s:?}");
    }

    #[test]
    fn disarmed_or_zero_rate_passes_everything_through() {
        let dev = FaultDevice::new(mem(), FaultConfig::new(0.0));
        assert!(!dev.active());
        let dev = FaultDevice::new(mem(), FaultConfig::new(1.0));
        dev.set_armed(false);
        assert!(!dev.active());
        let mut buf = AlignedBuf::new(4096, 4096);
        for i in 0..16 {
            write_device(&dev, i * 4096, &mut buf, false).unwrap();
        }
        assert_eq!(dev.stats().injected(), 0);
        assert_eq!(dev.stats().requests, 16);
    }

    /// A rate between 0 and 1 fails about that fraction, and the same seed fails
    /// the same requests.
    #[test]
    fn rate_is_a_fraction_and_the_seed_repeats_the_choice() {
        let run = |seed| {
            let dev = FaultDevice::new(mem(), FaultConfig::new(0.25).seed(seed));
            let mut buf = AlignedBuf::new(512, 512);
            (0..400u64)
                .map(|i| read_device(&dev, (i % 2048) * 512, &mut buf).is_err())
                .collect::<Vec<bool>>()
        };
        let a = run(11);
        assert_eq!(a, run(11));
        let failed = a.iter().filter(|&&f| f).count();
        assert!((50..150).contains(&failed), "{failed} of 400 failed");
    }
}
