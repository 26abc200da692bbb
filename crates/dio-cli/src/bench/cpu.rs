//! Process CPU time (user and system, every thread) from getrusage, for CPU percent
//! and CPU per I/O.

use std::time::Duration;

/// User and system CPU time used so far by this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

fn duration(tv: libc::timeval) -> Duration {
    Duration::from_secs(tv.tv_sec.max(0) as u64) + Duration::from_micros(tv.tv_usec.max(0) as u64)
}

impl CpuTime {
    /// Now.
    pub fn now() -> CpuTime {
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes only into `ru`, a valid rusage we own.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        if rc != 0 {
            return CpuTime::default();
        }
        CpuTime {
            user: duration(ru.ru_utime),
            system: duration(ru.ru_stime),
        }
    }

    /// Percent of one core (user, system) used between `self` and `later`, over
    /// `elapsed`.
    pub fn percent_until(&self, later: &CpuTime, elapsed: Duration) -> (f64, f64) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let usr = later.user.saturating_sub(self.user).as_secs_f64();
        let sys = later.system.saturating_sub(self.system).as_secs_f64();
        (usr / secs * 100.0, sys / secs * 100.0)
    }
}
