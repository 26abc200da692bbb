//! Untorn (atomic) writes: the statx limits are exposed, and a request for atomic
//! writes where the file reports none (or not the size asked) is refused with
//! `Feature::AtomicWrite`. The oracle for the limits is the kernel's own statx
//! answer through `xfs_io -c statx` when that tool is present.

use dio::probe::{atomic_write_limits, require_atomic_writes};
use dio::{Error, Feature, Incompatible, RawFile, RawOptions};

fn feature(e: &Error) -> Option<Feature> {
    match e {
        Error::Incompatible(Incompatible { feature, .. }) => Some(*feature),
        _ => None,
    }
}

#[test]
fn atomic_writes_are_granted_only_where_statx_reports_units() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("atomic.bin");
    let opts = RawOptions {
        write: true,
        create: true,
        ..RawOptions::default()
    };
    let raw = RawFile::open(&path, &opts).unwrap();
    raw.set_len(1 << 20).unwrap();
    let limits = atomic_write_limits(raw.fd()).unwrap();
    eprintln!("atomic write limits of {}: {limits:?}", path.display());
    if limits.supported() {
        assert!(limits.unit_min.is_power_of_two() && limits.unit_max.is_power_of_two());
        require_atomic_writes(raw.fd(), &path, u64::from(limits.unit_min)).unwrap();
        require_atomic_writes(raw.fd(), &path, u64::from(limits.unit_max)).unwrap();
        let too_big = u64::from(limits.unit_max) * 2;
        let e = require_atomic_writes(raw.fd(), &path, too_big).unwrap_err();
        assert_eq!(feature(&e), Some(Feature::AtomicWrite));
    } else {
        for unit in [512u64, 4096, 65536] {
            let e = require_atomic_writes(raw.fd(), &path, unit).unwrap_err();
            assert_eq!(feature(&e), Some(Feature::AtomicWrite), "{e}");
            assert_eq!(e.errno(), libc::EOPNOTSUPP);
        }
    }
    // Sizes that are never atomic: not a power of two, zero.
    for unit in [0u64, 3000] {
        let e = require_atomic_writes(raw.fd(), &path, unit).unwrap_err();
        assert_eq!(feature(&e), Some(Feature::AtomicWrite));
    }
    // The kernel's answer through another tool, where it is installed.
    match std::process::Command::new("xfs_io")
        .args(["-c", "statx -r -m 0x10000"])
        .arg(&path)
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("stat.{name} = ")))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            };
            if let Some(min) = field("atomic_write_unit_min") {
                assert_eq!(min, limits.unit_min);
                assert_eq!(field("atomic_write_unit_max"), Some(limits.unit_max));
            } else {
                eprintln!("skipped the xfs_io comparison: it prints no atomic write fields");
            }
        }
        _ => eprintln!("skipped the xfs_io comparison: xfs_io not installed"),
    }
}
