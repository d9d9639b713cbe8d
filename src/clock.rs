//! The one place that reads the system clocks.
//!
//! Everything time-based in keygate (token buckets, heartbeat windows, key expiry, grace periods)
//! takes its time from a [`Clock`], so tests drive time by hand instead of sleeping. The clock is
//! also governor's clock: limiters built on it see the same manual time as the rest of the gate.
//!
//! The system clock reads the monotonic clock (`clock_gettime` through the vDSO, no system
//! call) and derives wall time from the wall clock at start plus monotonic time, so it never
//! steps (NTP slews are ignored until restart, by at most the drift over the process's life).
//! An earlier design kept a coarse time in an atomic, stored by a thread every millisecond: it
//! saved a few tens of nanoseconds per read, but woke the process a thousand times a second
//! even when idle and cost more CPU per request than the reads at moderate load (BENCHMARKS.md).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::nanos::Nanos;

/// Wall-clock time in milliseconds since the Unix epoch, as used for heartbeats and expiry.
pub type UnixMillis = i64;

/// A point in time as the gate sees it: wall time (persisted things) with monotonic time kept
/// inside governor's limiters, which read the same [`Clock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: UnixMillis,
    /// Monotonic nanoseconds, as [`Clock::monotonic`]: read together with the wall time, so a
    /// request reads the clock once for both.
    pub mono_ns: u64,
}

/// A clock: the system's, or a manual one that only moves when told to.
#[derive(Clone, Debug)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
enum Inner {
    System,
    Manual {
        mono_ns: AtomicU64,
        wall_ms: AtomicI64,
    },
}

/// The process-wide base of every system [`Clock`].
struct Base {
    start: Instant,
    start_wall_ms: i64,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| Base {
        start: Instant::now(),
        start_wall_ms: wall_now_ms(),
    })
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        base();
        Clock(Arc::new(Inner::System))
    }

    /// A manual clock starting at the given wall time; it moves only through [`Clock::advance`]
    /// and [`Clock::set_wall`].
    pub fn manual(wall_ms: UnixMillis) -> Self {
        Clock(Arc::new(Inner::Manual {
            mono_ns: AtomicU64::new(0),
            wall_ms: AtomicI64::new(wall_ms),
        }))
    }

    /// The current time for the gate's decisions.
    #[inline]
    pub fn now(&self) -> Now {
        self.now_at(&Stopwatch::start())
    }

    /// [`Clock::now`] as of when `watch` started (a manual clock ignores it): a request's
    /// decisions and its latency metrics from one reading of the clock.
    #[inline]
    pub fn now_at(&self, watch: &Stopwatch) -> Now {
        match &*self.0 {
            Inner::System => {
                let b = base();
                let elapsed = watch.0.saturating_duration_since(b.start);
                Now {
                    wall_ms: b.start_wall_ms + elapsed.as_millis() as i64,
                    mono_ns: elapsed.as_nanos() as u64,
                }
            }
            Inner::Manual { wall_ms, mono_ns } => Now {
                wall_ms: wall_ms.load(Ordering::Acquire),
                mono_ns: mono_ns.load(Ordering::Acquire),
            },
        }
    }

    /// Monotonic time since the clock was made, for governor and for measuring latency.
    #[inline]
    pub fn monotonic(&self) -> Duration {
        match &*self.0 {
            Inner::System => base().start.elapsed(),
            Inner::Manual { mono_ns, .. } => Duration::from_nanos(mono_ns.load(Ordering::Acquire)),
        }
    }

    /// Moves a manual clock forward (both wall and monotonic time). No effect on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Inner::Manual { mono_ns, wall_ms } = &*self.0 {
            mono_ns.fetch_add(by.as_nanos() as u64, Ordering::AcqRel);
            wall_ms.fetch_add(by.as_millis() as i64, Ordering::AcqRel);
        }
    }

    /// Sets a manual clock's wall time, which may step backwards as a real wall clock can.
    /// Monotonic time is untouched.
    pub fn set_wall(&self, to: UnixMillis) {
        if let Inner::Manual { wall_ms, .. } = &*self.0 {
            wall_ms.store(to, Ordering::Release);
        }
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    #[inline]
    fn now(&self) -> Nanos {
        Nanos::from(self.monotonic())
    }
}

/// Wall time for places outside the gate that only stamp records (e.g. the CLI writing a key).
pub fn wall_now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now().wall_ms, 1_000);
        let m0 = governor::clock::Clock::now(&c);
        c.advance(Duration::from_secs(2));
        assert_eq!(c.now().wall_ms, 3_000);
        assert_eq!(
            governor::clock::Clock::now(&c).as_u64() - m0.as_u64(),
            2_000_000_000
        );
        c.set_wall(500);
        assert_eq!(c.now().wall_ms, 500, "wall time may step back");
        assert_eq!(
            c.monotonic(),
            Duration::from_secs(2),
            "monotonic time does not"
        );
    }

    #[test]
    fn now_at_reads_the_stopwatch_not_the_clock() {
        let c = Clock::system();
        let first = Stopwatch::start();
        while first.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let second = Stopwatch::start();
        let (a, b) = (c.now_at(&first), c.now_at(&second));
        assert!(b.mono_ns - a.mono_ns >= 2_000_000, "{a:?} {b:?}");
        // The same reading gives the same time, however late it is asked.
        assert_eq!(c.now_at(&first), a);
        assert!(second.since(&first) >= Duration::from_millis(2));
        assert_eq!(first.since(&second), Duration::ZERO);
        // A manual clock keeps its own time.
        let m = Clock::manual(1_000);
        assert_eq!(m.now_at(&second), m.now());
    }

    #[test]
    fn system_clock_is_near_real_time_and_moves() {
        let c = Clock::system();
        let real = wall_now_ms();
        assert!((c.now().wall_ms - real).abs() < 5_000);
        let m0 = c.monotonic();
        let real = Instant::now();
        while real.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        assert!(c.monotonic() >= m0 + Duration::from_millis(2));
        // No thread of its own: an idle gateway is not woken to keep time.
        let threads = std::fs::read_dir("/proc/self/task").unwrap();
        for t in threads {
            // Other tests' threads come and go: one listed may have ended before it is read.
            let Ok(comm) = std::fs::read_to_string(t.unwrap().path().join("comm")) else {
                continue;
            };
            assert_ne!(comm.trim(), "keygate-clock");
        }
    }
}

/// Real elapsed time for latency metrics (never for decisions, which use [`Clock`]).
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    #[inline]
    pub fn start() -> Self {
        Stopwatch(Instant::now())
    }

    #[inline]
    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }

    /// The time from `earlier`'s start to this one's.
    #[inline]
    pub fn since(&self, earlier: &Stopwatch) -> Duration {
        self.0.saturating_duration_since(earlier.0)
    }
}
