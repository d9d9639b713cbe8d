//! The key cache's memory per cached key, counted by dhat as this test binary's global allocator
//! (the only test in its process, so nothing else allocates while it measures).
//!
//! 10,000 store keys over 1,000 teams are loaded into a gate and each used once, as
//! `benches/memory.sh` does with 1,000,000 keys, and the heap this costs per cached key is held
//! under [`BOUND`], so the compact cache cannot grow back unnoticed. The target it serves is
//! 1,000,000 cached keys and 100,000 live buckets in 256 MiB RSS (BENCHMARKS.md, "Memory").

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use keygate::clock::Clock;
use keygate::config::Config;
use keygate::gate::{keys, Check, Fields, Gate, RequestHead};
use keygate::metrics::Metrics;
use keygate::store::{KeyStore, StoreError, StoredKey, StoredTeam};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const KEYS: usize = 10_000;
const TEAMS: usize = 1_000;

/// Heap bytes per cached key the test allows: the key's own share (cache slot, entry, usage
/// record), its team's share (a tenth of a team entry, bucket, headers) and the gate's fixed
/// cost spread over the keys. 280 when this was written, 247 since the key id is kept as a
/// `&'static str` rather than a `HeaderValue`, 208 since the entry lives in its cache slot
/// instead of an `Arc` of its own, 215 with crossbeam's `ShardedLock`s over the key cache's
/// shards (their reader slots are fixed cost), 203 since a team's id, plan and beat are
/// process-lifetime references and the limiter registry's table holds only pointers to the
/// buckets (565 -> 443 B a team); the design before the compact cache (commit 9d3df26) took
/// 1,371. What the RSS target allows is about 200 all told: see BENCHMARKS.md, "Memory".
const BOUND: f64 = 210.0;

fn key(i: usize) -> String {
    format!("sk_mem_{i:022}")
}

/// A store answering from memory, with records shaped like `benches/memory.sh`'s.
struct Store {
    keys: HashMap<[u8; 32], StoredKey>,
    teams: HashMap<String, StoredTeam>,
}

impl KeyStore for Store {
    fn find_key(&self, d: &[u8; 32]) -> Result<Option<StoredKey>, StoreError> {
        Ok(self.keys.get(d).cloned())
    }
    fn find_team(&self, id: &str) -> Result<Option<StoredTeam>, StoreError> {
        Ok(self.teams.get(id).cloned())
    }
}

#[test]
fn a_cached_key_costs_at_most_the_targets_share_of_heap() {
    let store = Store {
        keys: (0..KEYS)
            .map(|i| {
                (
                    keys::digest(key(i).as_bytes()),
                    StoredKey {
                        key_id: format!("k{i}"),
                        team_id: format!("t{}", i % TEAMS),
                        name: String::new(),
                        scopes: Vec::new(),
                        environment: None,
                        created_at: 0,
                        expires_at: None,
                        revoked_at: None,
                        visible_prefix: String::new(),
                        use_count: 0,
                    },
                )
            })
            .collect(),
        teams: (0..TEAMS)
            .map(|t| {
                let id = format!("t{t}");
                let team = StoredTeam {
                    id: id.clone(),
                    plan: Some("bench".into()),
                    limits: Vec::new(),
                    heartbeat_required: None,
                };
                (id, team)
            })
            .collect(),
    };
    let config = Config::from_toml(
        r#"
[upstream]
url = "http://127.0.0.1:1"
[heartbeat]
required = false
[cache]
capacity = 13000
[plans.bench]
limits = [{ requests = 100000000, per = "1m" }]
[[routes]]
path = "/*"
"#,
    )
    .unwrap();
    // Everything a request allocates and frees again, made before the count starts.
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_static("sk_mem_x"));
    let values: Vec<HeaderValue> = (0..KEYS)
        .map(|i| HeaderValue::from_str(&key(i)).unwrap())
        .collect();
    let mut forwarded = HeaderMap::with_capacity(8);
    // Bytes allocates a shared block on a value's first clone: have that happen to the test's
    // own request values before the count.
    for v in &values {
        drop(v.clone());
    }

    let _profiler = dhat::Profiler::builder().testing().build();
    let heap = || {
        let s = dhat::HeapStats::get();
        // Each block as glibc lays it out: an 8-byte header and, on average, 8 bytes of
        // rounding to its 16-byte granules.
        (s.curr_bytes + 16 * s.curr_blocks) as f64
    };
    // Counted from before the gate is made: what it sets up for its capacity counts too.
    let start = heap();
    let clock = Clock::manual(1_700_000_000_000);
    let gate = Gate::new(
        Arc::new(config),
        Arc::new(store),
        clock.clone(),
        Metrics::standalone(),
    );
    let fixed = heap() - start;
    // keygate registers every store team's heartbeat at start (server.rs): not per key.
    let before_beats = heap();
    for t in 0..TEAMS {
        gate.heartbeats.beat(&format!("t{t}"), false);
    }
    let beats = heap() - before_beats;
    let use_once = |v: &HeaderValue, h: &mut HeaderMap, forwarded: &mut HeaderMap| {
        h.insert("x-api-key", v.clone());
        let head = RequestHead {
            method: &Method::GET,
            path: "/x",
            fields: Fields::Map(h),
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let snap = gate.snapshot();
        let now = clock.now();
        let mut c = gate.check(&snap, &head, now);
        if let Check::Lookup(d) = c {
            c = gate.resume(&snap, &head, now, gate.load(&d));
        }
        let Check::Granted(g) = c else {
            panic!("every key is granted")
        };
        // The identity headers the proxy clones onto the forwarded request.
        let k = g.key.unwrap();
        forwarded.insert("x-keygate-team", k.team_header.clone());
        forwarded.insert("x-keygate-key-id", k.key_id_header());
        forwarded.insert("x-keygate-plan", k.plan_header.clone());
        forwarded.clear();
    };

    // The first key of each team brings the team in (its entry, buckets, headers).
    for v in &values[..TEAMS] {
        use_once(v, &mut h, &mut forwarded);
    }
    let teams_in = heap() - beats;
    for v in &values[TEAMS..] {
        use_once(v, &mut h, &mut forwarded);
    }
    assert_eq!(gate.cache_counts().0, KEYS as u64, "every key is cached");
    let end = heap() - beats;
    let per_key = (end - start) / KEYS as f64;
    let key_only = (end - teams_in) / (KEYS - TEAMS) as f64;
    let per_team = (teams_in - start - fixed) / TEAMS as f64 - key_only;
    let per_beat = beats / TEAMS as f64;
    println!(
        "{KEYS} keys over {TEAMS} teams: {per_key:.0} B per cached key \
         ({key_only:.0} B for the key itself, {per_team:.0} B per team, {fixed:.0} B for the gate; \
         heartbeats {per_beat:.0} B per team)"
    );
    assert!(
        per_key <= BOUND,
        "{per_key:.0} B of heap per cached key (bound {BOUND})"
    );
    drop(gate);
}
