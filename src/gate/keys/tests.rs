//! Key cache and usage registry tests: time is the monotonic nanoseconds passed in, no sleeps.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::*;
use crate::clock::Clock;
use crate::gate::heartbeat::Heartbeats;
use crate::gate::limits::LimiterRegistry;

const S: u64 = 1_000_000_000;

fn cache(capacity: u64, ttl_secs: u64) -> KeyCache {
    KeyCache::new(&CacheConfig {
        capacity,
        ttl: Duration::from_secs(ttl_secs),
        negative_capacity: 100,
        negative_ttl: Duration::from_secs(60),
    })
}

fn d(i: u32) -> Digest {
    digest(&i.to_le_bytes())
}

struct Keys {
    usage: UsageRegistry,
    team: Arc<TeamEntry>,
}

impl Keys {
    fn new() -> Keys {
        let names = Names::default();
        let limiters = LimiterRegistry::new(Clock::manual(0));
        Keys {
            usage: UsageRegistry::default(),
            team: Arc::new(TeamEntry {
                id: "t".into(),
                plan: "p".into(),
                limits: limiters.set(&names, "p", &[]),
                buckets: Buckets::None,
                beat: Heartbeats::default().beat("t", false),
                heartbeat_required: false,
                team_header: names.header("t").unwrap(),
                plan_header: names.header("p").unwrap(),
            }),
        }
    }

    fn entry(&self, id: &str) -> KeyEntry {
        let usage = self.usage.get(id, 0).unwrap();
        KeyEntry::new(
            self.team.clone(),
            Buckets::None,
            usage,
            &[],
            None,
            None,
            false,
        )
    }
}

fn hit(c: &KeyCache, d: &Digest, now_ns: u64) -> Option<String> {
    match c.get(d, now_ns) {
        Cached::Hit(e) => Some(e.key_id().to_owned()),
        _ => None,
    }
}

/// Loads `d` as key `id`, expecting a store lookup.
fn load(c: &KeyCache, keys: &Keys, d: &Digest, id: &str, now_ns: u64) {
    let mut looked_up = false;
    c.load(d, now_ns, || {
        looked_up = true;
        Ok(keys.entry(id))
    })
    .unwrap();
    assert!(looked_up, "{id} was already cached");
}

#[test]
fn hit_miss_and_known_unknown() {
    let (c, keys) = (cache(1000, 60), Keys::new());
    assert!(matches!(c.get(&d(1), 0), Cached::Miss));
    load(&c, &keys, &d(1), "k1", 0);
    assert_eq!(hit(&c, &d(1), 0).as_deref(), Some("k1"));
    assert!(matches!(c.get(&d(2), 0), Cached::Miss));
    assert!(matches!(
        c.load(&d(2), 0, || Err(LoadError::Unknown)),
        Err(LoadError::Unknown)
    ));
    assert!(matches!(c.get(&d(2), 0), Cached::KnownUnknown));
    assert_eq!(c.counts(), (1, 1));
    // A load of a cached digest answers from the cache.
    let e = c.load(&d(1), 0, || panic!("no lookup")).unwrap();
    assert_eq!(e.key_id(), "k1");
}

#[test]
fn entries_expire_at_the_ttl_in_injected_time_never_later() {
    let (c, keys) = (cache(1000, 10), Keys::new());
    load(&c, &keys, &d(1), "k1", 0);
    assert!(hit(&c, &d(1), 10 * S - 1).is_some());
    assert!(hit(&c, &d(1), 10 * S).is_none(), "expired at the ttl");
    // Inserted mid-second: the expiry rounds down, so it never outlives the ttl.
    load(&c, &keys, &d(2), "k2", 20 * S + S / 2);
    assert!(hit(&c, &d(2), 30 * S - 1).is_some());
    assert!(hit(&c, &d(2), 30 * S).is_none());
    // An expired entry loads again.
    load(&c, &keys, &d(1), "k1", 31 * S);
    assert!(hit(&c, &d(1), 31 * S).is_some());
}

#[test]
fn capacity_is_held_and_clock_evicts_unreferenced_entries_first() {
    // Under 32 entries: one shard, so the capacity is exact.
    let (c, keys) = (cache(4, 60), Keys::new());
    assert_eq!(c.shards.len(), 1);
    for i in 1..=4 {
        load(&c, &keys, &d(i), &format!("k{i}"), 0);
    }
    assert!(hit(&c, &d(1), 0).is_some());
    assert!(hit(&c, &d(3), 0).is_some());
    load(&c, &keys, &d(5), "k5", 0);
    assert_eq!(c.counts().0, 4);
    assert!(
        hit(&c, &d(2), 0).is_none(),
        "the first unreferenced entry went"
    );
    load(&c, &keys, &d(6), "k6", 0);
    assert!(
        hit(&c, &d(4), 0).is_none(),
        "then the next unreferenced one"
    );
    for i in [1, 3, 5, 6] {
        assert!(hit(&c, &d(i), 0).is_some(), "k{i} is kept");
    }
    assert_eq!(c.counts().0, 4);
}

#[test]
fn an_expired_entry_is_evicted_even_when_referenced() {
    let (c, keys) = (cache(2, 10), Keys::new());
    load(&c, &keys, &d(1), "k1", 0);
    load(&c, &keys, &d(2), "k2", 5 * S);
    assert!(hit(&c, &d(1), 9 * S).is_some());
    assert!(hit(&c, &d(2), 9 * S).is_some());
    load(&c, &keys, &d(3), "k3", 11 * S);
    assert!(hit(&c, &d(2), 11 * S).is_some(), "the live one is kept");
    assert!(hit(&c, &d(3), 11 * S).is_some());
    assert_eq!(c.counts().0, 2);
}

#[test]
fn invalidation_of_one_and_all_and_reinsertion() {
    let (c, keys) = (cache(1000, 60), Keys::new());
    for i in 1..=3 {
        load(&c, &keys, &d(i), &format!("k{i}"), 0);
    }
    c.invalidate(&d(2));
    assert!(hit(&c, &d(2), 0).is_none());
    assert!(hit(&c, &d(1), 0).is_some() && hit(&c, &d(3), 0).is_some());
    load(&c, &keys, &d(2), "k2", 0);
    assert!(
        hit(&c, &d(2), 0).is_some(),
        "cached again after invalidation"
    );
    assert_eq!(c.counts().0, 3);
    c.invalidate_all();
    assert_eq!(c.counts().0, 0);
    for i in 1..=3 {
        assert!(hit(&c, &d(i), 0).is_none());
    }
    load(&c, &keys, &d(1), "k1", 0);
    assert!(hit(&c, &d(1), 0).is_some());
    // Invalidation also forgets a negative entry.
    let _ = c.load(&d(9), 0, || Err(LoadError::Unknown));
    c.invalidate(&d(9));
    assert!(matches!(c.get(&d(9), 0), Cached::Miss));
}

#[test]
fn a_load_overtaken_by_an_invalidation_is_not_cached() {
    let (c, keys) = (cache(1000, 60), Keys::new());
    // The key is revoked while its lookup runs: the (stale) answer must not stay cached.
    let e = c
        .load(&d(1), 0, || {
            let e = keys.entry("k1");
            c.invalidate(&d(1));
            Ok(e)
        })
        .unwrap();
    assert_eq!(e.key_id(), "k1");
    assert!(hit(&c, &d(1), 0).is_none());
    let _ = c.load(&d(2), 0, || {
        c.invalidate_all();
        Err(LoadError::Unknown)
    });
    assert!(matches!(c.get(&d(2), 0), Cached::Miss));
}

#[test]
fn a_spray_of_unknown_digests_never_evicts_known_keys() {
    let (c, keys) = (cache(4, 60), Keys::new());
    for i in 1..=4 {
        load(&c, &keys, &d(i), &format!("k{i}"), 0);
    }
    for i in 1000..11_000 {
        let _ = c.load(&d(i), 0, || Err(LoadError::Unknown));
    }
    for i in 1..=4 {
        assert!(hit(&c, &d(i), 0).is_some());
    }
    let (positive, negative) = c.counts();
    assert_eq!(positive, 4);
    assert!(negative <= 100, "the negative side is bounded: {negative}");
}

#[test]
fn prune_expired_drops_only_expired_entries() {
    let (c, keys) = (cache(1000, 10), Keys::new());
    load(&c, &keys, &d(1), "k1", 0);
    load(&c, &keys, &d(2), "k2", 5 * S);
    let held = Arc::strong_count(&keys.team);
    assert_eq!(c.prune_expired(9 * S), 0);
    assert_eq!(c.prune_expired(10 * S), 1);
    assert_eq!(c.counts().0, 1);
    assert_eq!(
        Arc::strong_count(&keys.team),
        held - 1,
        "the pruned entry no longer holds its team"
    );
}

#[test]
fn shard_count_follows_capacity() {
    assert_eq!(cache(10, 1).shards.len(), 1);
    assert_eq!(cache(10, 1).shard_capacity, 10);
    assert_eq!(cache(100, 1).shards.len(), 4);
    assert_eq!(cache(100, 1).shard_capacity, 25);
    assert_eq!(cache(100_000, 1).shards.len(), SHARDS);
    assert_eq!(cache(100_000, 1).shard_capacity, 100_000 / SHARDS);
}

/// Waits (bounded, no fixed sleep) until `n` callers share the flight of `d`: the table's
/// reference, the leader's, and one per waiter.
fn wait_for_waiters(c: &KeyCache, d: &Digest, waiters: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let joined = c
            .flights
            .lock()
            .unwrap()
            .get(d)
            .map_or(0, |f| Arc::strong_count(f) - 2);
        if joined == waiters {
            return;
        }
        assert!(Instant::now() < deadline, "{joined} of {waiters} waiters");
        std::thread::yield_now();
    }
}

fn concurrent_loads(
    result: impl Fn(&Keys) -> Result<KeyEntry, LoadError> + Sync,
) -> (usize, Vec<Result<KeyEntry, LoadError>>) {
    const N: usize = 8;
    let (c, keys) = (cache(1000, 60), Keys::new());
    let calls = AtomicUsize::new(0);
    let barrier = Barrier::new(N);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    c.load(&d(1), 0, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // Answer only once every other caller waits on this load.
                        wait_for_waiters(&c, &d(1), N - 1);
                        result(&keys)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(c.flights.lock().unwrap().is_empty());
    (calls.into_inner(), results)
}

#[test]
fn concurrent_loads_of_one_digest_run_one_lookup() {
    let (calls, results) = concurrent_loads(|keys| Ok(keys.entry("k1")));
    assert_eq!(calls, 1);
    for r in &results {
        assert_eq!(
            r.as_ref().unwrap().key_id(),
            "k1",
            "the leader's entry for all"
        );
    }
}

#[test]
fn waiters_get_the_leaders_store_error_without_a_lookup_of_their_own() {
    let (calls, results) = concurrent_loads(|_| Err(LoadError::Store("down".into())));
    assert_eq!(calls, 1);
    assert!(results
        .iter()
        .all(|r| matches!(r, Err(LoadError::Store(m)) if m == "down")));
}

#[test]
fn a_panicking_lookup_leaves_no_flight_behind() {
    let (c, keys) = (cache(1000, 60), Keys::new());
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = c.load(&d(1), 0, || panic!("store driver bug"));
    }));
    assert!(caught.is_err());
    assert!(c.flights.lock().unwrap().is_empty());
    load(&c, &keys, &d(1), "k1", 0);
}

#[test]
fn usage_records_are_made_once_and_keep_their_counts() {
    let r = UsageRegistry::default();
    let a = r.get("key-a", 40).unwrap();
    a.hit(1_000);
    a.hit(1_500);
    let again = r.get("key-a", 99).unwrap();
    assert!(std::ptr::eq(a, again), "one record per key id");
    assert_eq!(
        again.total(),
        42,
        "the base is the store's count at first load"
    );
    assert_eq!(a.key_id(), "key-a");
    assert_eq!(a.header(), "key-a");
    assert_eq!(r.pending(), vec![("key-a".to_string(), 2, 1_000)]);
    assert_eq!(r.unflushed("key-a"), Some((2, 1_000)));
    r.commit(&r.pending());
    assert!(r.pending().is_empty());
    assert_eq!(r.unflushed("key-a"), Some((0, 1_000)));
    assert_eq!(a.total(), 42);
    assert!(r.get("bad\nid", 0).is_none(), "not a header value: refused");
    assert!(r.peek("bad\nid").is_none());
    assert!(r.peek("key-b").is_none());
    // Many records across slab chunks stay distinct and findable.
    for i in 0..3000 {
        r.get(&format!("k{i}"), i).unwrap();
    }
    for i in (0..3000).step_by(7) {
        assert_eq!(r.peek(&format!("k{i}")).unwrap().total(), i);
    }
}

#[test]
fn names_are_rendered_once() {
    let n = Names::default();
    let a = n.header("team-a").unwrap();
    assert!(std::ptr::eq(a, n.header("team-a").unwrap()));
    assert_eq!(a, "team-a");
    assert!(n.header("bad\r\n").is_none());
    let long = "x".repeat(1000);
    assert_eq!(n.header(&long).unwrap().as_bytes(), long.as_bytes());
}

#[test]
fn sizes_stay_compact() {
    use std::mem::size_of;
    assert_eq!(size_of::<Slot>(), 64);
    assert_eq!(size_of::<KeyEntry>(), 24);
    assert_eq!(size_of::<KeyUsage>(), 40);
}
