//! Plan limits: governor GCRA buckets, one per (quota, team or key).
//!
//! Each bucket is a governor *direct* limiter owned by the [`LimiterRegistry`], found by
//! (quota, key) when a team is resolved (limits keyed by team: the team entry holds them, for
//! all its keys) or a key is loaded (keyed by key: the key's entry holds them), so the
//! per-request check is one compare-and-swap on that bucket's own atomic. (The first design used one governor
//! keyed limiter per quota; its DashMap shard locks were shared between threads on every check
//! and the hot path stopped scaling with cores — see BENCHMARKS.md.)
//!
//! Beside its limiter a bucket holds a pointer to its quota (made once per limit set and shared
//! by every bucket under it) and the id it is found by, borrowed from a process-lifetime registry
//! (the gate's names or the key usage records), so it is its own key in the registry's table: a
//! slot is one pointer. The registry used to be a map keyed by a copy of the quota and an `Arc` of
//! the id (48-byte slots, and for limits keyed by key an id allocated per key), with the quota
//! copied into each bucket too: its cells cost about 100 heap bytes a team, they now cost about
//! 18 (`tests/memory.rs`).
//!
//! The registry lives outside config snapshots and the key cache: a reload that keeps a quota
//! keeps its buckets, and a cache eviction never hands a team a fresh bucket. [`LimiterRegistry::prune`]
//! drops a bucket only when no entry holds it (a declared team's entry, in the snapshot, always
//! does; a store team's, while a cached key or the gate's team table has it) and it has been
//! idle long enough to have refilled completely — so dropping it changes nothing a client could
//! observe.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::RateLimiter;
use hashbrown::HashTable;
use http::HeaderValue;

use super::denial::RateInfo;
use super::keys::Names;
use crate::clock::Clock;
use crate::config::LimitSpec;

type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// A quota as its buckets are made and checked under it: made once per limit set, shared by all
/// the buckets under it.
#[derive(Debug)]
struct Quota {
    spec: LimitSpec,
    /// `spec.requests` as `X-RateLimit-Limit` gives it.
    limit_header: &'static HeaderValue,
    /// The spec as governor's quota, worked out once: each new bucket's limiter copies it.
    governor: governor::Quota,
}

impl Quota {
    fn new(spec: LimitSpec, names: &Names) -> Quota {
        let interval = (spec.per / spec.requests.max(1)).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(spec.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        static ZERO: HeaderValue = HeaderValue::from_static("0");
        Quota {
            spec,
            // Digits only: always a valid value.
            limit_header: names
                .header(itoa::Buffer::new().format(spec.requests))
                .unwrap_or(&ZERO),
            governor: governor::Quota::with_period(interval)
                .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
                .allow_burst(burst),
        }
    }
}

/// One token bucket.
#[derive(Debug)]
pub struct Bucket {
    quota: Arc<Quota>,
    /// The team or key id it applies to, in a process-lifetime registry (the gate's names or
    /// usage records), so the bucket is its own registry key with no copy of the id.
    owner: &'static str,
    limiter: Direct,
    /// Monotonic nanoseconds of a check at most [`STAMP_NS`] before the last one, for pruning.
    last_used: AtomicU64,
}

/// How far the last check may run ahead of `last_used`. A check writes the time only when it
/// has moved this far: a bucket refusing a flood from two workers (a spent plan) had its line
/// written by both on every check, where the limiter itself writes only on a grant.
const STAMP_NS: u64 = 1_000_000_000;

/// All buckets, by (quota, team or key id).
#[derive(Debug)]
pub struct LimiterRegistry {
    clock: Clock,
    buckets: Mutex<Table>,
}

/// The buckets, each found by its own quota and owner: a slot is one pointer (a map keyed by
/// a copy of both took 48 bytes a slot).
#[derive(Debug, Default)]
struct Table {
    by_key: HashTable<Arc<Bucket>>,
    hasher: ahash::RandomState,
}

impl LimiterRegistry {
    pub fn new(clock: Clock) -> Self {
        LimiterRegistry {
            clock,
            buckets: Mutex::default(),
        }
    }

    /// The buckets of `owner` (a team or key id) under `set`'s limits, made on first use.
    pub fn buckets(&self, set: &LimitSet, owner: &'static str) -> Buckets {
        let mut table = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Table { by_key, hasher } = &mut *table;
        let all: Vec<Arc<Bucket>> = set
            .quotas
            .iter()
            .map(|quota| {
                let spec = &quota.spec;
                by_key
                    .entry(
                        hasher.hash_one((spec, owner)),
                        |b| b.quota.spec == *spec && b.owner == owner,
                        |b| hasher.hash_one((&b.quota.spec, b.owner)),
                    )
                    .or_insert_with(|| {
                        Arc::new(Bucket {
                            quota: quota.clone(),
                            owner,
                            limiter: RateLimiter::<_, _, _, NoOpMiddleware<Nanos>>::new(
                                quota.governor,
                                InMemoryState::default(),
                                self.clock.clone(),
                            )
                            .with_middleware::<StateInformationMiddleware>(),
                            last_used: AtomicU64::new(0),
                        })
                    })
                    .get()
                    .clone()
            })
            .collect();
        Buckets::from(all)
    }

    /// A named set of limits (a plan, or a team's custom limits). Its header values are
    /// interned in `names` (kept for the life of the process), so a granted request can carry
    /// them as plain references.
    pub fn set(&self, names: &Names, name: &str, specs: &[LimitSpec]) -> Arc<LimitSet> {
        let policy = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let pname = if specs.len() == 1 {
                    name.to_owned()
                } else {
                    format!("{name}-{i}")
                };
                format!(
                    "\"{}\";q={};w={}",
                    pname,
                    s.requests,
                    s.per.as_secs().max(1)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        // A name that cannot be a header value (a control character) is rendered empty.
        static EMPTY: HeaderValue = HeaderValue::from_static("");
        Arc::new(LimitSet {
            name: name.into(),
            policy_header: names.header(&policy).unwrap_or(&EMPTY),
            name_header: names.header(name).unwrap_or(&EMPTY),
            quotas: specs
                .iter()
                .map(|s| Arc::new(Quota::new(*s, names)))
                .collect(),
        })
    }

    /// Drops buckets that no cached key holds and that have been idle long enough to be full
    /// again. Returns the buckets kept.
    pub fn prune(&self) -> usize {
        let now = self.clock.monotonic().as_nanos() as u64;
        let mut table = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Table { by_key, hasher } = &mut *table;
        by_key.retain(|b| {
            let spec = &b.quota.spec;
            let refill = (spec.per.as_nanos() as u64 / spec.requests.max(1) as u64)
                .saturating_mul(spec.burst as u64);
            // The stamp may be up to STAMP_NS older than the last check.
            let idle = now.saturating_sub(b.last_used.load(Ordering::Relaxed));
            Arc::strong_count(b) > 1 || idle <= refill.saturating_add(STAMP_NS)
        });
        by_key.shrink_to_fit(|b| hasher.hash_one((&b.quota.spec, b.owner)));
        by_key.len()
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The buckets a key is checked against. One bucket (a plan with one limit, the common case)
/// is held inline: a request then follows one pointer fewer to reach it.
#[derive(Debug, Default)]
pub enum Buckets {
    #[default]
    None,
    One(Arc<Bucket>),
    Many(Box<[Arc<Bucket>]>),
}

impl From<Vec<Arc<Bucket>>> for Buckets {
    fn from(mut all: Vec<Arc<Bucket>>) -> Buckets {
        match all.len() {
            0 => Buckets::None,
            1 => all.pop().map_or(Buckets::None, Buckets::One),
            _ => Buckets::Many(all.into_boxed_slice()),
        }
    }
}

impl std::ops::Deref for Buckets {
    type Target = [Arc<Bucket>];

    #[inline]
    fn deref(&self) -> &[Arc<Bucket>] {
        match self {
            Buckets::None => &[],
            Buckets::One(b) => std::slice::from_ref(b),
            Buckets::Many(all) => all,
        }
    }
}

/// The limits of one plan or team.
#[derive(Debug)]
pub struct LimitSet {
    pub name: Arc<str>,
    /// `RateLimit-Policy` for this set, rendered once.
    pub policy_header: &'static HeaderValue,
    /// The set's name as `RateLimit` gives it.
    pub name_header: &'static HeaderValue,
    quotas: Box<[Arc<Quota>]>,
}

impl LimitSet {
    pub fn specs(&self) -> impl Iterator<Item = &LimitSpec> {
        self.quotas.iter().map(|q| &q.spec)
    }
}

/// Takes one request from each bucket. `Ok` with the most constrained state (`None` with no
/// limits), or `Err` with the state of the first limit that refused.
///
/// With several limits a refusal by a later one does not give back the token an earlier one
/// took: governor has no rollback, and a client over one limit is close to the others.
///
/// `now_ns` (monotonic, read when the request arrived) also dates a refusal's wait: a little
/// before governor's own read, so the wait is, if anything, rounded up a second early.
#[inline]
pub fn check(buckets: &[Arc<Bucket>], now_ns: u64) -> Result<Option<RateInfo>, RateInfo> {
    let mut tightest: Option<RateInfo> = None;
    for b in buckets {
        let spec = &b.quota.spec;
        let interval = spec.per.as_secs_f64() / spec.requests as f64;
        let result = b.limiter.check();
        if now_ns.saturating_sub(b.last_used.load(Ordering::Relaxed)) >= STAMP_NS {
            b.last_used.store(now_ns, Ordering::Relaxed);
        }
        match result {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                let info = RateInfo {
                    limit: spec.requests,
                    limit_header: b.quota.limit_header,
                    remaining,
                    reset_secs: (interval * (spec.burst - remaining.min(spec.burst)) as f64).ceil()
                        as u64,
                    retry_after_secs: 0,
                };
                if tightest.is_none_or(|t| info.remaining < t.remaining) {
                    tightest = Some(info);
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(Nanos::from(now_ns));
                let retry = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Err(RateInfo {
                    limit: spec.requests,
                    limit_header: b.quota.limit_header,
                    remaining: 0,
                    reset_secs: (interval * spec.burst as f64).ceil() as u64,
                    retry_after_secs: retry.max(1),
                });
            }
        }
    }
    Ok(tightest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(clock: &Clock) -> u64 {
        clock.monotonic().as_nanos() as u64
    }

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
        let set = reg.set(&Names::default(), "free", &[spec(100, 3600, 100)]);
        let team = reg.buckets(&set, "t");
        for i in 0..100 {
            let info = check(&team, ns(&clock)).unwrap().unwrap();
            assert_eq!(info.remaining, 99 - i);
            assert_eq!(info.limit, 100);
        }
        let denied = check(&team, ns(&clock)).unwrap_err();
        assert_eq!(denied.retry_after_secs, 36);
        clock.advance(Duration::from_secs(35));
        assert!(check(&team, ns(&clock)).is_err());
        clock.advance(Duration::from_secs(1));
        assert_eq!(check(&team, ns(&clock)).unwrap().unwrap().remaining, 0);
        assert!(check(&team, ns(&clock)).is_err());
        // Another team has its own bucket.
        assert!(check(&reg.buckets(&set, "u"), ns(&clock)).is_ok());
    }

    #[test]
    fn burst_caps_a_per_minute_plan() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let set = reg.set(&Names::default(), "basic", &[spec(100, 60, 20)]);
        let k = reg.buckets(&set, "k");
        let passed = (0..50).filter(|_| check(&k, ns(&clock)).is_ok()).count();
        assert_eq!(passed, 20);
        clock.advance(Duration::from_millis(600));
        assert!(check(&k, ns(&clock)).is_ok(), "one token per 0.6 s");
        assert!(check(&k, ns(&clock)).is_err());
    }

    #[test]
    fn the_tightest_of_several_limits_is_reported() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let set = reg.set(
            &Names::default(),
            "ent",
            &[spec(1000, 3600, 1000), spec(10, 60, 2)],
        );
        let k = reg.buckets(&set, "k");
        assert_eq!(check(&k, ns(&clock)).unwrap().unwrap().remaining, 1);
        assert_eq!(check(&k, ns(&clock)).unwrap().unwrap().remaining, 0);
        let denied = check(&k, ns(&clock)).unwrap_err();
        assert_eq!(denied.limit, 10);
        assert_eq!(denied.retry_after_secs, 6);
    }

    #[test]
    fn buckets_survive_new_sets_and_prune_only_drops_idle_unheld_ones() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let a = reg.buckets(&reg.set(&Names::default(), "pro", &[spec(2, 3600, 2)]), "t");
        // A reload builds a new set with the same quota: same bucket.
        let b = reg.buckets(&reg.set(&Names::default(), "pro", &[spec(2, 3600, 2)]), "t");
        check(&a, ns(&clock)).unwrap();
        check(&b, ns(&clock)).unwrap();
        assert!(
            check(&a, ns(&clock)).is_err(),
            "a reload's new set sees the old bucket"
        );
        drop((a, b));
        assert_eq!(
            reg.prune(),
            1,
            "not yet refilled: kept even though nothing holds it"
        );
        let c = reg.buckets(&reg.set(&Names::default(), "pro", &[spec(2, 3600, 2)]), "t");
        assert!(
            check(&c, ns(&clock)).is_err(),
            "evicted entries do not reset the bucket"
        );
        clock.advance(Duration::from_secs(7200));
        assert_eq!(reg.prune(), 1, "held by a cached entry: kept");
        drop(c);
        assert_eq!(reg.prune(), 0, "idle, refilled and unheld: reclaimed");
    }

    #[test]
    fn a_bucket_is_kept_until_refilled_after_its_last_check_not_its_last_stamp() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        // Two requests a second, burst 2: full again 1 s after a check that emptied it.
        let set = reg.set(&Names::default(), "s", &[spec(2, 1, 2)]);
        let held = reg.buckets(&set, "t");
        clock.advance(Duration::from_secs(1));
        check(&held, ns(&clock)).unwrap();
        check(&held, ns(&clock)).unwrap();
        clock.advance(Duration::from_millis(600));
        // 0.6 s after the stamp: granted (1.2 tokens), not stamped; 0.2 tokens left.
        check(&held, ns(&clock)).unwrap();
        drop(held);
        clock.advance(Duration::from_millis(600));
        assert_eq!(
            reg.prune(),
            1,
            "1.2 s after the stamp but 0.6 s after the last check: not full, kept"
        );
        let again = reg.buckets(&set, "t");
        assert!(
            check(&again, ns(&clock)).is_ok() && check(&again, ns(&clock)).is_err(),
            "the kept bucket has 1.4 tokens, not a new bucket's 2"
        );
        drop(again);
        clock.advance(Duration::from_secs(3));
        assert_eq!(reg.prune(), 0, "long idle: reclaimed");
    }

    #[test]
    fn policy_header() {
        let reg = LimiterRegistry::new(Clock::manual(0));
        assert_eq!(
            *reg.set(&Names::default(), "free", &[spec(100, 3600, 100)])
                .policy_header,
            "\"free\";q=100;w=3600"
        );
    }

    #[test]
    fn each_limit_reports_its_own_value() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let set = reg.set(
            &Names::default(),
            "two",
            &[spec(7, 1, 7), spec(100, 60, 100)],
        );
        let buckets = reg.buckets(&set, "k");
        let now = ns(&clock);
        // The per-second limit is the tighter one after the first request.
        let info = check(&buckets, now).unwrap().unwrap();
        assert_eq!(info.limit, 7);
        assert_eq!(*info.limit_header, "7");
        for _ in 0..6 {
            check(&buckets, now).unwrap();
        }
        let refused = check(&buckets, now).unwrap_err();
        assert_eq!(refused.limit, 7);
        assert_eq!(*refused.limit_header, "7");
        let set = reg.set(&Names::default(), "one", &[spec(100, 60, 100)]);
        let info = check(&reg.buckets(&set, "k"), now).unwrap().unwrap();
        assert_eq!(*info.limit_header, "100");
    }
}
