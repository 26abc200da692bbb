//! Process CPU time (user and system, every thread) from getrusage, for CPU percent
//! and CPU per I/O.

use std::time::Duration;

/// User and system CPU time used so far by this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

fn duration(tv: nix::sys::time::TimeVal) -> Duration {
    Duration::from_secs(tv.tv_sec().max(0) as u64)
        + Duration::from_micros(tv.tv_usec().max(0) as u64)
}

impl CpuTime {
    /// Now.
    pub fn now() -> CpuTime {
        Self::of(nix::sys::resource::UsageWho::RUSAGE_SELF)
    }

    /// The calling thread's CPU time so far.
    pub fn thread() -> CpuTime {
        Self::of(nix::sys::resource::UsageWho::RUSAGE_THREAD)
    }

    fn of(who: nix::sys::resource::UsageWho) -> CpuTime {
        use nix::sys::resource::getrusage;
        match getrusage(who) {
            Ok(ru) => CpuTime {
                user: duration(ru.user_time()),
                system: duration(ru.system_time()),
            },
            Err(_) => CpuTime::default(),
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
