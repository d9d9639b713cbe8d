//! The one place that reads the system clocks.
//!
//! Everything time-based in keygate (token buckets, heartbeat windows, key expiry, grace periods)
//! takes its time from a [`Clock`], so tests drive time by hand instead of sleeping. The clock is
//! also governor's clock: limiters built on it see the same manual time as the rest of the gate.
//!
//! The system clock is *coarse*: a background thread stores monotonic time into an atomic every
//! millisecond and decisions read that atomic. Reading it costs one load of a line every core
//! shares read-only, instead of two `clock_gettime` calls per request; a millisecond is far
//! below anything a plan limit, a heartbeat window or an expiry can tell apart. Wall time is the
//! wall clock at start plus monotonic time, so it never steps (NTP slews are ignored until
//! restart, by at most the drift over the process's life).

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

/// The process-wide coarse clock behind every system [`Clock`].
struct Coarse {
    start: Instant,
    start_wall_ms: i64,
    mono_ns: AtomicU64,
}

const TICK: Duration = Duration::from_millis(1);

fn coarse() -> &'static Coarse {
    static COARSE: OnceLock<&'static Coarse> = OnceLock::new();
    COARSE.get_or_init(|| {
        let c: &'static Coarse = Box::leak(Box::new(Coarse {
            start: Instant::now(),
            start_wall_ms: wall_now_ms(),
            mono_ns: AtomicU64::new(0),
        }));
        let spawned = std::thread::Builder::new()
            .name("keygate-clock".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                c.mono_ns
                    .store(c.start.elapsed().as_nanos() as u64, Ordering::Release);
            });
        if let Err(e) = spawned {
            // Without the ticker time would stand still: fail loudly at start, not silently later.
            panic!("cannot start the clock thread: {e}");
        }
        c
    })
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        coarse();
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
        match &*self.0 {
            Inner::System => {
                let c = coarse();
                Now {
                    wall_ms: c.start_wall_ms
                        + (c.mono_ns.load(Ordering::Acquire) / 1_000_000) as i64,
                }
            }
            Inner::Manual { wall_ms, .. } => Now {
                wall_ms: wall_ms.load(Ordering::Acquire),
            },
        }
    }

    /// Monotonic time since the clock was made, for governor and for measuring latency.
    #[inline]
    pub fn monotonic(&self) -> Duration {
        match &*self.0 {
            Inner::System => Duration::from_nanos(coarse().mono_ns.load(Ordering::Acquire)),
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
    fn system_clock_is_near_real_time_and_moves() {
        let c = Clock::system();
        let real = wall_now_ms();
        assert!((c.now().wall_ms - real).abs() < 5_000);
        let m0 = c.monotonic();
        // The ticker moves the clock; bounded wait for it (no fixed sleep decides the result).
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.monotonic() == m0 {
            assert!(Instant::now() < deadline, "the coarse clock does not tick");
            std::thread::yield_now();
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
}
