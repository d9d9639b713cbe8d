//! Plan limits end to end: exactly N of N+k concurrent requests pass, buckets refill with the
//! (manual) clock, and quotas are per team.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::sync::Barrier;

/// N+k requests released at once against a quota of N, with the clock frozen: exactly N pass and
/// the upstream sees exactly N. Run cold (every request misses the key cache at once) and warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_n_of_n_plus_k_concurrent_requests_pass() {
    const N: usize = 8;
    const K: usize = 24;
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = N as u32;
    let kg = Arc::new(Keygate::start(&cfg.render()).await);

    let statuses = concurrent_statuses(&kg, TINY_KEY, N + K).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (N, K), "statuses: {statuses:?}");
    assert_eq!(
        up.hits(),
        N,
        "the upstream sees exactly the granted requests"
    );

    // Another team on the same keygate, meanwhile, is not limited by tiny's quota.
    let ok = concurrent_statuses(&kg, ALPHA_KEY, N + K)
        .await
        .iter()
        .filter(|&&st| st == 200)
        .count();
    assert_eq!(
        ok,
        N + K,
        "alpha's 100/hour is its own, untouched by tiny's"
    );
    assert_eq!(up.hits(), N + N + K);
}

/// After 100 of 100/hour, advancing 36 s (one token's worth) lets exactly one more through.
#[tokio::test]
async fn bucket_refills_with_the_clock() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    for i in 0..100 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!(r.status, 200, "request {i}");
    }
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("36"));
    // Not yet.
    kg.clock.advance(Duration::from_secs(35));
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    kg.clock.advance(Duration::from_secs(1));
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        kg.get("/api/x", Some(ALPHA_KEY)).await.status,
        429,
        "exactly one"
    );
    assert_eq!(up.hits(), 101);
    // A full hour refills the whole bucket.
    kg.clock.advance(Duration::from_secs(3600));
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));
}

/// The wall clock stepping back (NTP) must not refill or drain buckets: they run on monotonic time.
#[tokio::test]
async fn wall_clock_steps_do_not_touch_buckets() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 2;
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    kg.clock.set_wall(T0 + 10 * 3_600_000);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);
    kg.clock.set_wall(T0 - 10 * 3_600_000);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);
}

/// Quotas are per team: exhausting one team leaves the others alone.
#[tokio::test]
async fn quotas_are_per_team() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 1;
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);
    let r = kg.get("/api/x", Some(BETA_KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("999"));
}

const DUO_1: &str = "kg_duo_one_00000000000001";
const DUO_2: &str = "kg_duo_two_00000000000002";

fn duo(cfg: &mut Cfg, key_by: &str) {
    cfg.extra = format!(
        "[limits]\nkey_by = \"{key_by}\"\n\n[[teams]]\nid = \"duo\"\nplan = \"tiny\"\nkeys = [\
         {{ id = \"duo-1\", sha256 = \"{}\" }}, {{ id = \"duo-2\", sha256 = \"{}\" }}]\n",
        sha256_hex(DUO_1),
        sha256_hex(DUO_2)
    );
}

/// `limits.key_by = "team"` (the default): a team's keys share its buckets.
#[tokio::test]
async fn keys_of_a_team_share_its_quota() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 2;
    duo(&mut cfg, "team");
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(kg.get("/api/x", Some(DUO_1)).await.status, 200);
    let r = kg.get("/api/x", Some(DUO_2)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed("x-keygate-key-id"), Some("duo-2"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(kg.get("/api/x", Some(DUO_1)).await.status, 429);
    assert_eq!(kg.get("/api/x", Some(DUO_2)).await.status, 429);
    // Another team on the same plan has its own bucket.
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
}

/// `limits.key_by = "key"`: each key has its own buckets.
#[tokio::test]
async fn keyed_by_key_each_key_has_its_own_quota() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 2;
    duo(&mut cfg, "key");
    let kg = Keygate::start(&cfg.render()).await;
    for key in [DUO_1, DUO_2] {
        assert_eq!(kg.get("/api/x", Some(key)).await.status, 200);
        assert_eq!(kg.get("/api/x", Some(key)).await.status, 200);
        assert_eq!(kg.get("/api/x", Some(key)).await.status, 429);
    }
}

/// Pruning idle buckets never changes what a client sees: an exhausted bucket is kept, a full
/// one may go and comes back full.
#[tokio::test]
async fn pruning_buckets_is_invisible() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 2;
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    kg.server.gate.invalidate_all();
    kg.server.gate.prune();
    assert_eq!(
        kg.get("/api/x", Some(TINY_KEY)).await.status,
        429,
        "an exhausted bucket survives pruning"
    );
    kg.clock.advance(Duration::from_secs(2 * 3600));
    kg.server.gate.invalidate_all();
    kg.server.gate.prune();
    let r = kg.get("/api/x", Some(TINY_KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
}

/// Sends `n` requests with `key` at once (one client and connection each, released together by
/// a barrier) and returns their statuses.
async fn concurrent_statuses(kg: &Arc<Keygate>, key: &'static str, n: usize) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let kg = kg.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let c = client();
                let rb = c
                    .get(kg.url(&format!("/api/c{i}")))
                    .header("x-api-key", key);
                barrier.wait().await;
                send(rb).await.status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}
