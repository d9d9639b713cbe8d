//! Plan limits: governor GCRA buckets, one keyed limiter per distinct quota.
//!
//! The [`LimiterRegistry`] lives outside config snapshots and the key cache, so a reload that
//! keeps a quota keeps its buckets, and a cache eviction never hands a team a fresh bucket.
//! Governor has no per-key quotas (its issue #193), hence one limiter per distinct [`LimitSpec`];
//! its keyed state only shrinks through `retain_recent`, which [`LimiterRegistry::prune`] runs.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderValue;

use super::denial::RateInfo;
use crate::clock::Clock;
use crate::config::LimitSpec;

/// A limiter keyed by team or key id.
pub type KeyedLimiter = RateLimiter<Arc<str>, DefaultKeyedStateStore<Arc<str>>, Clock, StateInformationMiddleware>;

/// All limiters, by quota.
#[derive(Debug)]
pub struct LimiterRegistry {
    clock: Clock,
    limiters: Mutex<HashMap<LimitSpec, Arc<KeyedLimiter>>>,
}

fn quota(spec: &LimitSpec) -> Quota {
    let interval = (spec.per / spec.requests.max(1)).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(spec.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl LimiterRegistry {
    pub fn new(clock: Clock) -> Self {
        LimiterRegistry {
            clock,
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// The limiter for a quota, made on first use.
    pub fn get(&self, spec: &LimitSpec) -> Arc<KeyedLimiter> {
        let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(*spec)
            .or_insert_with(|| {
                Arc::new(
                    RateLimiter::<_, _, _, NoOpMiddleware<Nanos>>::new(
                        quota(spec),
                        DefaultKeyedStateStore::default(),
                        self.clock.clone(),
                    )
                    .with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone()
    }

    /// A named set of limits (a plan, or a team's custom limits).
    pub fn set(&self, name: &str, specs: &[LimitSpec]) -> Arc<LimitSet> {
        let limits: Vec<_> = specs.iter().map(|s| (*s, self.get(s))).collect();
        let policy = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let pname = if specs.len() == 1 { name.to_owned() } else { format!("{name}-{i}") };
                format!("\"{}\";q={};w={}", pname, s.requests, s.per.as_secs().max(1))
            })
            .collect::<Vec<_>>()
            .join(", ");
        Arc::new(LimitSet {
            name: name.into(),
            policy_header: HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("")),
            limits,
        })
    }

    /// Drops idle buckets (those that have fully refilled) and limiters no snapshot uses.
    pub fn prune(&self) -> usize {
        let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, l| Arc::strong_count(l) > 1);
        let mut live = 0;
        for l in map.values() {
            l.retain_recent();
            l.shrink_to_fit();
            live += l.len();
        }
        live
    }

    /// Buckets held across all limiters.
    pub fn buckets(&self) -> usize {
        let map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|l| l.len()).sum()
    }
}

/// The limits of one plan or team, checked together.
#[derive(Debug)]
pub struct LimitSet {
    pub name: Arc<str>,
    /// `RateLimit-Policy` for this set, rendered once.
    pub policy_header: HeaderValue,
    limits: Vec<(LimitSpec, Arc<KeyedLimiter>)>,
}

impl LimitSet {
    pub fn specs(&self) -> impl Iterator<Item = &LimitSpec> {
        self.limits.iter().map(|(s, _)| s)
    }

    /// Takes one request from every bucket of `key`. `Ok` with the most constrained state, or
    /// `Err` with the state of the first limit that refused.
    ///
    /// With several limits a refusal by a later one does not give back the token an earlier one
    /// took: governor has no rollback, and a client over one limit is close to the others.
    pub fn check(&self, key: &Arc<str>) -> Result<Option<RateInfo>, RateInfo> {
        let mut tightest: Option<RateInfo> = None;
        for (spec, limiter) in &self.limits {
            let interval = spec.per.as_secs_f64() / spec.requests as f64;
            match limiter.check_key(key) {
                Ok(state) => {
                    let remaining = state.remaining_burst_capacity();
                    let info = RateInfo {
                        limit: spec.requests,
                        remaining,
                        reset_secs: (interval * (spec.burst - remaining.min(spec.burst)) as f64).ceil() as u64,
                        retry_after_secs: 0,
                    };
                    if tightest.is_none_or(|t| info.remaining < t.remaining) {
                        tightest = Some(info);
                    }
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
                    let retry = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    return Err(RateInfo {
                        limit: spec.requests,
                        remaining: 0,
                        reset_secs: (interval * spec.burst as f64).ceil() as u64,
                        retry_after_secs: retry.max(1),
                    });
                }
            }
        }
        Ok(tightest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(requests: u32, per_secs: u64, burst: u32) -> LimitSpec {
        LimitSpec {
            requests,
            per: Duration::from_secs(per_secs),
            burst,
        }
    }

    #[test]
    fn hundred_per_hour_then_refill() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let set = reg.set("free", &[spec(100, 3600, 100)]);
        let team: Arc<str> = "t".into();
        for i in 0..100 {
            let info = set.check(&team).unwrap().unwrap();
            assert_eq!(info.remaining, 99 - i);
            assert_eq!(info.limit, 100);
        }
        let denied = set.check(&team).unwrap_err();
        assert_eq!(denied.retry_after_secs, 36);
        clock.advance(Duration::from_secs(35));
        assert!(set.check(&team).is_err());
        clock.advance(Duration::from_secs(1));
        assert_eq!(set.check(&team).unwrap().unwrap().remaining, 0);
        assert!(set.check(&team).is_err());
        // Another team has its own bucket.
        assert!(set.check(&"u".into()).is_ok());
    }

    #[test]
    fn burst_caps_a_per_minute_plan() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let set = reg.set("basic", &[spec(100, 60, 20)]);
        let k: Arc<str> = "k".into();
        let passed = (0..50).filter(|_| set.check(&k).is_ok()).count();
        assert_eq!(passed, 20);
        clock.advance(Duration::from_millis(600));
        assert!(set.check(&k).is_ok(), "one token per 0.6 s");
        assert!(set.check(&k).is_err());
    }

    #[test]
    fn same_quota_shares_buckets_across_sets_and_prune_keeps_them() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let a = reg.set("pro", &[spec(2, 3600, 2)]);
        let b = reg.set("pro", &[spec(2, 3600, 2)]);
        let k: Arc<str> = "t".into();
        a.check(&k).unwrap();
        b.check(&k).unwrap();
        assert!(a.check(&k).is_err(), "a reload's new set sees the old bucket");
        reg.prune();
        assert!(b.check(&k).is_err(), "a used bucket survives pruning");
        assert_eq!(reg.buckets(), 1);
        clock.advance(Duration::from_secs(7200));
        reg.prune();
        assert_eq!(reg.buckets(), 0, "a refilled bucket is reclaimed");
        drop((a, b));
        reg.prune();
        assert!(reg.limiters.lock().unwrap().is_empty(), "unused limiters are dropped");
    }

    #[test]
    fn policy_header() {
        let reg = LimiterRegistry::new(Clock::manual(0));
        assert_eq!(reg.set("free", &[spec(100, 3600, 100)]).policy_header, "\"free\";q=100;w=3600");
    }
}
