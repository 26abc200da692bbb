//! What fsx runs against.

use std::fmt;
use std::sync::Arc;

use dio::{
    Device, DirectFile, FaultConfig, FaultDevice, FileState, Geometry, MemDevice, MemDeviceConfig,
    RawFile, Result, TestMap, TestMapConfig,
};
use dio_testkit::{Rng, STALE};

/// How the RAM target is built.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemTarget {
    /// Largest file size (the model's span); the device is a little larger.
    pub span: u64,
    /// fs block of the test map.
    pub fs_block: u32,
    /// Device logical block (and memory alignment).
    pub logical_block: u32,
    /// Fraction of device requests failed with EIO.
    pub fault_rate: f64,
    /// Complete requests on the device's own thread, shuffled.
    pub threaded: bool,
    /// Seed of the device limits, boundaries, shuffle and faults.
    pub seed: u64,
    /// Request limits of the device (segments, bytes); random from the seed when
    /// `None`.
    pub limits: Option<(u32, u32)>,
}

impl MemTarget {
    /// A RAM target of `span` bytes: 4 KiB fs blocks on 512-byte sectors, threaded,
    /// no faults.
    pub fn new(span: u64, seed: u64) -> MemTarget {
        MemTarget {
            span,
            fs_block: 4096,
            logical_block: 512,
            fault_rate: 0.0,
            threaded: true,
            seed,
            limits: None,
        }
    }
    /// Set the device's request limits: most segments and bytes per request.
    pub fn limits(mut self, segments: u32, bytes: u32) -> MemTarget {
        self.limits = Some((segments, bytes));
        self
    }
    /// Fail this fraction of requests.
    pub fn faults(mut self, rate: f64) -> MemTarget {
        self.fault_rate = rate;
        self
    }
    /// Set the fs block size.
    pub fn fs_block(mut self, fs: u32) -> MemTarget {
        self.fs_block = fs;
        self
    }
    /// Complete inline (false) or on the device thread (true).
    pub fn threaded(mut self, threaded: bool) -> MemTarget {
        self.threaded = threaded;
        self
    }
}

/// How a resizable target changes its size (a truncate up or down).
pub type Resize = Box<dyn Fn(u64) -> Result<()> + Send + Sync>;

/// What fsx runs against: a file, how to resize it, and the knobs it may turn.
pub struct Target {
    pub(crate) name: String,
    pub(crate) file: DirectFile,
    pub(crate) resize: Option<Resize>,
    pub(crate) map: Option<Arc<TestMap>>,
    pub(crate) faults: Option<Arc<FaultDevice>>,
    mem: Option<Arc<MemDevice>>,
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish()
    }
}

impl Target {
    /// The RAM device (0xAA-filled, random request limits) under a test map
    /// (random boundaries), behind a [`FaultDevice`].
    pub fn mem(cfg: &MemTarget) -> Result<Target> {
        let mut rng = Rng::new(cfg.seed ^ 0x3E3);
        let fs = u64::from(cfg.fs_block);
        let span = cfg.span.div_ceil(fs) * fs;
        let dev_size = span + (1 << 20);
        // Some limits cut requests inside an fs block (6 KiB on 4 KiB blocks), so a
        // failed request can leave a block half written.
        let segs = [4u32, 16, 256][rng.below(3) as usize];
        let bytes = [6u32 << 10, 16 << 10, 64 << 10, 1 << 20][rng.below(4) as usize];
        let (segs, bytes) = cfg.limits.unwrap_or((segs, bytes));
        let bytes = (bytes / cfg.logical_block * cfg.logical_block).max(cfg.logical_block);
        let geo = Geometry::new(cfg.logical_block, dev_size).with_limits(segs, bytes);
        let mut dcfg = MemDeviceConfig::new(dev_size, cfg.logical_block)
            .geometry(geo)
            .fill(STALE)
            .crash_mode();
        if cfg.threaded {
            dcfg = dcfg.threaded(None, true, cfg.seed | 1);
        }
        let mem = Arc::new(MemDevice::new(dcfg));
        let faults = Arc::new(FaultDevice::new(
            mem.clone() as Arc<dyn Device>,
            FaultConfig::new(cfg.fault_rate).seed(cfg.seed),
        ));
        let mut mcfg = TestMapConfig::new(cfg.fs_block, dev_size / fs);
        if rng.percent(30) {
            mcfg = mcfg.boundary_every(1 + rng.below(8));
        }
        if rng.percent(30) {
            mcfg = mcfg.max_extent(1 + rng.below(16));
        }
        let map = Arc::new(TestMap::new(mcfg));
        let file = DirectFile::new(
            faults.clone() as Arc<dyn Device>,
            map.clone(),
            Arc::new(FileState::new(0)),
        )?;
        let f = file.clone();
        Ok(Target {
            name: format!(
                "mem ({} KiB span, fs {}, sector {}, {} segs x {} KiB per request, faults {})",
                span >> 10,
                cfg.fs_block,
                cfg.logical_block,
                segs,
                bytes >> 10,
                cfg.fault_rate
            ),
            file,
            resize: Some(Box::new(move |s| f.truncate(s))),
            map: Some(map),
            faults: Some(faults),
            mem: Some(mem),
            _keep: None,
        })
    }

    /// A host file (resizable) or block device (overwrites only) through the raw
    /// client.
    pub fn raw(raw: RawFile) -> Target {
        let raw = Arc::new(raw);
        let name = format!(
            "{} ({})",
            if raw.is_block_device() {
                "block device"
            } else {
                "host file"
            },
            raw.backend_name()
        );
        let resize: Option<Resize> = if raw.is_block_device() {
            None
        } else {
            let r = Arc::clone(&raw);
            Some(Box::new(move |s| r.set_len(s)))
        };
        Target {
            name,
            file: raw.direct().clone(),
            resize,
            map: None,
            faults: None,
            mem: None,
            _keep: Some(Box::new(raw)),
        }
    }

    /// Any file; without `resize` fsx only overwrites it within its size. `keep`
    /// holds whatever must outlive the file (an image, a device).
    pub fn file(
        name: impl Into<String>,
        file: DirectFile,
        resize: Option<Resize>,
        keep: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Target {
        Target {
            name: name.into(),
            file,
            resize,
            map: None,
            faults: None,
            mem: None,
            _keep: keep,
        }
    }

    /// A description for reports.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The file under test.
    pub fn direct(&self) -> &DirectFile {
        &self.file
    }
    /// The test map, for the RAM target.
    pub fn test_map(&self) -> Option<&Arc<TestMap>> {
        self.map.as_ref()
    }
    /// The RAM device, for the RAM target.
    pub fn mem_device(&self) -> Option<&Arc<MemDevice>> {
        self.mem.as_ref()
    }
    /// The fault injector, for the RAM target.
    pub fn fault_device(&self) -> Option<&Arc<FaultDevice>> {
        self.faults.as_ref()
    }

    pub(crate) fn faults_active(&self) -> bool {
        self.faults.as_ref().is_some_and(|f| f.active())
    }

    pub(crate) fn arm(&self, armed: bool) {
        if let Some(f) = &self.faults {
            f.set_armed(armed);
        }
    }
}
