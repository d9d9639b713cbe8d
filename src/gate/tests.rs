//! Gate tests: a manual clock, a real SQLite store in a temporary directory, no sockets.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::store::sqlite::{NewKey, SqliteStore};

const T0: i64 = 1_700_000_000_000;
const DEMO_KEY: &str = "kg_demo_0123456789abcdef";

fn config(extra: &str) -> Arc<Config> {
    let text = format!(
        r#"
[upstream]
url = "http://127.0.0.1:1"
[limits]
failed_auth_per_minute = 5
[plans.free]
limits = [{{ requests = 3, per = "1h" }}]
[[teams]]
id = "demo"
plan = "free"
keys = [{{ id = "demo-key", sha256 = "{}", scopes = ["posts:read"] }}]
[[teams]]
id = "other"
plan = "free"
heartbeat_required = false
keys = [{{ id = "other-key", sha256 = "{}" }}]
{extra}
[[routes]]
path = "/public"
public = true
[[routes]]
path = "/extension/heartbeat"
methods = ["POST"]
heartbeat = "record"
rate_limited = false
[[routes]]
path = "/teams/{{team}}/*"
team_param = "team"
heartbeat = "exempt"
[[routes]]
path = "/write"
scopes = ["posts:write"]
heartbeat = "exempt"
[[routes]]
path = "/*"
"#,
        hex::encode(keys::digest(DEMO_KEY.as_bytes())),
        hex::encode(keys::digest(b"other_key_000000")),
    );
    Arc::new(Config::from_toml(&text).unwrap())
}

struct Fixture {
    gate: Arc<Gate>,
    clock: Clock,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

fn fixture(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("k.db")).unwrap());
    let clock = Clock::manual(T0);
    let gate = Arc::new(Gate::new(
        config(extra),
        store.clone(),
        clock.clone(),
        Metrics::standalone(),
    ));
    Fixture {
        gate,
        clock,
        store,
        _dir: dir,
    }
}

fn headers(key: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(k) = key {
        h.insert("x-api-key", HeaderValue::from_str(k).unwrap());
    }
    h
}

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl Fixture {
    /// A full check, loading on a miss as the proxy does.
    fn check_from(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        peer: IpAddr,
    ) -> Result<Grant, Denial> {
        let h = headers(key);
        let head = RequestHead {
            method: &method,
            path,
            fields: Fields::Map(&h),
            peer,
        };
        let snap = self.gate.snapshot();
        let now = self.clock.now();
        let mut c = self.gate.check(&snap, &head, now);
        if let Check::Lookup(d) = c {
            let loaded = self.gate.load(&d);
            c = self.gate.resume(&snap, &head, now, loaded);
        }
        match c {
            Check::Granted(g) => Ok(g),
            Check::Denied { denial, .. } => Err(denial),
            Check::Lookup(_) => panic!("lookup after resume"),
        }
    }

    fn deny(&self, method: Method, path: &str, key: Option<&str>) -> Option<Denial> {
        self.check(method, path, key).err()
    }

    fn deny_from(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        peer: IpAddr,
    ) -> Option<Denial> {
        self.check_from(method, path, key, peer).err()
    }

    fn check(&self, method: Method, path: &str, key: Option<&str>) -> Result<Grant, Denial> {
        self.check_from(method, path, key, PEER)
    }

    fn beat(&self) {
        self.check(Method::POST, "/extension/heartbeat", Some(DEMO_KEY))
            .unwrap();
    }

    fn lookups(&self) -> u64 {
        self.gate.metrics().store_lookups.get()
    }

    fn issue(&self, team: &str, scopes: &[String], expires_at: Option<i64>) -> (String, String) {
        let key = credential::issue("sk_live_");
        let id = format!("key_{}", &key[8..16]);
        self.store
            .upsert_team(
                &StoredTeam {
                    id: team.into(),
                    plan: Some("free".into()),
                    limits: vec![],
                    heartbeat_required: Some(false),
                },
                T0,
            )
            .unwrap();
        self.store
            .insert_key(
                &NewKey {
                    key_id: &id,
                    digest: &keys::digest(key.as_bytes()),
                    team_id: team,
                    name: "t",
                    environment: Some("live"),
                    scopes,
                    visible_prefix: &key[..12],
                    created_at: T0,
                    expires_at,
                },
                50,
                T0,
            )
            .unwrap();
        (key, id)
    }
}

#[test]
fn route_checks_come_before_the_key() {
    let f = fixture("");
    assert_eq!(
        f.deny(Method::GET, "/a/../b", None),
        Some(Denial::BadRequest)
    );
    let Err(Denial::MethodNotAllowed { group }) =
        f.check(Method::GET, "/extension/heartbeat", None)
    else {
        panic!()
    };
    assert_eq!(f.gate.snapshot().routes.allow(group), "POST");
    assert!(f.check(Method::GET, "/public", None).unwrap().key.is_none());
    assert_eq!(f.deny(Method::GET, "/x", None), Some(Denial::MissingKey));
    assert_eq!(f.lookups(), 0);
}

#[test]
fn unknown_keys_are_looked_up_once_then_cached_negatively() {
    let f = fixture("");
    assert_eq!(
        f.deny(Method::GET, "/x", Some("nope_nope_nope")),
        Some(Denial::InvalidKey)
    );
    assert_eq!(f.lookups(), 1);
    assert_eq!(
        f.deny(Method::GET, "/x", Some("nope_nope_nope")),
        Some(Denial::InvalidKey)
    );
    assert_eq!(
        f.lookups(),
        1,
        "the second refusal came from the negative cache"
    );
}

#[test]
fn a_bad_checksum_never_reaches_the_store() {
    let f = fixture("");
    let (key, _) = f.issue("acme", &[], None);
    let mut bad = key.into_bytes();
    bad[12] = if bad[12] == b'x' { b'y' } else { b'x' };
    let bad = String::from_utf8(bad).unwrap();
    assert_eq!(
        f.deny(Method::GET, "/x", Some(&bad)),
        Some(Denial::InvalidKey)
    );
    assert_eq!(f.lookups(), 0);
}

#[test]
fn policy_then_heartbeat_then_limits_and_denials_spend_no_quota() {
    let f = fixture("");
    // Stale heartbeat: refused, and no quota spent however often.
    for _ in 0..10 {
        assert_eq!(
            f.deny(Method::GET, "/x", Some(DEMO_KEY)),
            Some(Denial::PluginRequired)
        );
    }
    // Wrong team and missing scope come before the heartbeat and limits too.
    assert_eq!(
        f.deny(Method::GET, "/teams/other/t", Some(DEMO_KEY)),
        Some(Denial::AccessDenied)
    );
    assert_eq!(
        f.deny(Method::GET, "/write", Some(DEMO_KEY)),
        Some(Denial::InsufficientScope)
    );
    f.beat();
    for remaining in [2, 1, 0] {
        let g = f.check(Method::GET, "/x", Some(DEMO_KEY)).unwrap();
        assert_eq!(g.rate.unwrap().remaining, remaining);
    }
    let Err(Denial::RateLimited(info)) = f.check(Method::GET, "/x", Some(DEMO_KEY)) else {
        panic!()
    };
    assert_eq!(info.retry_after_secs, 1200);
    // The team's own resources are fine, and rate limited like the rest.
    assert!(matches!(
        f.check(Method::GET, "/teams/demo/t", Some(DEMO_KEY)),
        Err(Denial::RateLimited(_))
    ));
    f.clock.advance(Duration::from_secs(1200));
    assert!(f
        .check(Method::GET, "/teams/demo/t", Some(DEMO_KEY))
        .is_ok());
}

#[test]
fn heartbeat_window_is_driven_by_the_clock() {
    let f = fixture("[heartbeat]\nwindow = \"48h\"");
    f.beat();
    f.clock.advance(Duration::from_secs(48 * 3600));
    assert!(f.check(Method::GET, "/x", Some(DEMO_KEY)).is_ok());
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        f.deny(Method::GET, "/x", Some(DEMO_KEY)),
        Some(Denial::PluginRequired)
    );
    assert_eq!(
        f.gate
            .heartbeats
            .stale(f.clock.now().wall_ms, 48 * 3600 * 1000),
        1
    );
    f.beat();
    assert!(f.check(Method::GET, "/x", Some(DEMO_KEY)).is_ok());
}

#[test]
fn revoked_and_expired_keys_are_invalid_at_once() {
    let f = fixture("");
    let (key, id) = f.issue("acme", &[], Some(T0 + 60_000));
    assert!(f.check(Method::GET, "/x", Some(&key)).is_ok());
    // Expiry is checked on every request, cached or not.
    f.clock.advance(Duration::from_secs(60));
    assert_eq!(
        f.deny(Method::GET, "/x", Some(&key)),
        Some(Denial::InvalidKey)
    );
    let (key2, id2) = f.issue("acme", &[], None);
    assert!(f.check(Method::GET, "/x", Some(&key2)).is_ok());
    f.store.revoke_key(&id2, T0).unwrap();
    f.gate
        .invalidate(&f.store.key_digest(&id2).unwrap().unwrap());
    assert_eq!(
        f.deny(Method::GET, "/x", Some(&key2)),
        Some(Denial::InvalidKey)
    );
    let _ = id;
}

#[test]
fn one_store_load_per_digest_under_a_miss_storm() {
    let f = fixture("");
    let (key, _) = f.issue("acme", &[], None);
    let d = keys::digest(key.as_bytes());
    let n = 16;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let gate = f.gate.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                gate.load(&d).map(|e| e.key_id().to_string())
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().is_ok());
    }
    assert_eq!(f.lookups(), 1);
}

#[test]
fn exactly_n_of_n_plus_k_concurrent_requests_pass() {
    let f = fixture("");
    f.beat();
    let n_threads = 12;
    let barrier = Arc::new(Barrier::new(n_threads));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n_threads)
        .map(|_| {
            let f = f.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                f.check(Method::GET, "/x", Some(DEMO_KEY)).is_ok()
            })
        })
        .collect();
    let passed = handles
        .into_iter()
        .filter(|_| true)
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(passed, 3);
}

#[test]
fn a_key_spraying_client_is_cut_off_and_valid_keys_keep_working() {
    let f = fixture("");
    f.beat();
    // Cache the valid key first (as a real client would have).
    assert!(f.check(Method::GET, "/x", Some(DEMO_KEY)).is_ok());
    for i in 0..50 {
        let _ = f.check(Method::GET, "/x", Some(&format!("random_key_{i:08}")));
    }
    // Five failures are the budget; the sixth finds it empty and blocks the address.
    assert_eq!(f.lookups(), 6, "store lookups stay within the budget");
    assert!(matches!(
        f.check(Method::GET, "/x", Some("random_key_again")),
        Err(Denial::TooManyFailedAuth { .. })
    ));
    assert!(
        f.check(Method::GET, "/x", Some(DEMO_KEY)).is_ok(),
        "a cached key still works"
    );
    // Another address is not affected.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(
        f.deny_from(Method::GET, "/x", Some("random_key_zzz"), other),
        Some(Denial::InvalidKey)
    );
    // The budget refills with time.
    f.clock.advance(Duration::from_secs(60));
    assert_eq!(
        f.deny(Method::GET, "/x", Some("random_key_later")),
        Some(Denial::InvalidKey)
    );
}

#[test]
fn a_blocked_address_is_refused_before_the_negative_cache_is_asked() {
    let f = fixture("");
    for i in 0..6 {
        let _ = f.check(Method::GET, "/x", Some(&format!("random_key_{i:08}")));
    }
    let negative = || f.gate.metrics().cache_negative_hit.get();
    let before = negative();
    // An unknown key the negative cache holds, from the blocked address: refused by the block
    // (the flood case), with no negative-cache lookup.
    for _ in 0..3 {
        assert!(matches!(
            f.deny(Method::GET, "/x", Some("random_key_00000000")),
            Some(Denial::TooManyFailedAuth { .. })
        ));
    }
    assert_eq!(negative(), before);
    // From another address the same key is a negative hit.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(
        f.deny_from(Method::GET, "/x", Some("random_key_00000000"), other),
        Some(Denial::InvalidKey)
    );
    assert_eq!(negative(), before + 1);
}

#[test]
fn valid_keys_never_spend_the_failed_auth_budget() {
    let f = fixture("");
    f.beat();
    // Far more uncached successes than the budget (a reload or expiry empties the cache).
    for _ in 0..20 {
        f.gate.invalidate_all();
        assert!(f
            .check(Method::POST, "/extension/heartbeat", Some(DEMO_KEY))
            .is_ok());
    }
    assert_eq!(
        f.deny(Method::GET, "/x", Some("random_key_1")),
        Some(Denial::InvalidKey)
    );
}

#[test]
fn too_many_failed_auth_retry_after_rounds_up() {
    let f = fixture("");
    for i in 0..6 {
        let _ = f.check(Method::GET, "/x", Some(&format!("random_key_{i:08}")));
    }
    f.clock.advance(Duration::from_millis(500));
    let Some(Denial::TooManyFailedAuth { retry_after_secs }) =
        f.deny(Method::GET, "/x", Some("random_key_x"))
    else {
        panic!()
    };
    // One token per 12 s; half a second has passed: 11.5 s left, said as 12.
    assert_eq!(retry_after_secs, 12);
    f.clock.advance(Duration::from_millis(11_500));
    assert_eq!(
        f.deny(Method::GET, "/x", Some("random_key_y")),
        Some(Denial::InvalidKey)
    );
}

#[test]
fn reload_keeps_buckets_and_applies_new_plans() {
    let f = fixture("");
    f.beat();
    for _ in 0..3 {
        f.check(Method::GET, "/x", Some(DEMO_KEY)).unwrap();
    }
    assert!(matches!(
        f.check(Method::GET, "/x", Some(DEMO_KEY)),
        Err(Denial::RateLimited(_))
    ));
    f.gate.reload(config("[heartbeat]\nwindow = \"72h\""));
    assert!(
        matches!(
            f.check(Method::GET, "/x", Some(DEMO_KEY)),
            Err(Denial::RateLimited(_))
        ),
        "an unchanged quota keeps its bucket"
    );
    let bigger = config("").as_ref().clone();
    let mut bigger = bigger;
    bigger.plans.insert(
        "free".into(),
        vec![crate::config::LimitSpec {
            requests: 10,
            per: Duration::from_secs(3600),
            burst: 10,
        }],
    );
    f.gate.reload(Arc::new(bigger));
    assert!(
        f.check(Method::GET, "/x", Some(DEMO_KEY)).is_ok(),
        "a new quota applies at once"
    );
}

#[test]
fn store_failure_fails_closed_for_uncached_keys_only() {
    let f = fixture("");
    f.beat();
    let (key, _) = f.issue("acme", &[], None);
    assert!(f.check(Method::GET, "/x", Some(&key)).is_ok());
    // Break the store: drop its tables underneath it.
    {
        let conn = rusqlite::Connection::open(f.store.path()).unwrap();
        conn.execute_batch("DROP TABLE keys; DROP TABLE teams;")
            .unwrap();
    }
    assert!(
        f.check(Method::GET, "/x", Some(&key)).is_ok(),
        "a cached key keeps working"
    );
    assert_eq!(
        f.deny(Method::GET, "/x", Some("uncached_key_1")),
        Some(Denial::StoreUnavailable)
    );
    assert_eq!(f.gate.metrics().store_errors.get(), 1);
}

#[test]
fn structured_errors_and_team_custom_limits() {
    let f = fixture("[errors]\nstyle = \"structured\"");
    let body = f.gate.snapshot().errors.body(Denial::MissingKey);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    // A store team with custom limits gets its own quota.
    f.store
        .upsert_team(
            &StoredTeam {
                id: "big".into(),
                plan: None,
                limits: vec![crate::config::LimitSpec {
                    requests: 1,
                    per: Duration::from_secs(60),
                    burst: 1,
                }],
                heartbeat_required: Some(false),
            },
            T0,
        )
        .unwrap();
    let key = credential::issue("sk_test_");
    f.store
        .insert_key(
            &NewKey {
                key_id: "big-1",
                digest: &keys::digest(key.as_bytes()),
                team_id: "big",
                name: "",
                environment: Some("test"),
                scopes: &[],
                visible_prefix: "",
                created_at: T0,
                expires_at: None,
            },
            50,
            T0,
        )
        .unwrap();
    let g = f.check(Method::GET, "/x", Some(&key)).unwrap();
    assert_eq!(g.key.unwrap().plan_header, "custom");
    assert!(matches!(
        f.check(Method::GET, "/x", Some(&key)),
        Err(Denial::RateLimited(_))
    ));
}

#[test]
fn debug_output_never_carries_key_material() {
    let f = fixture("");
    f.beat();
    let g = f.check(Method::GET, "/x", Some(DEMO_KEY)).unwrap();
    let text = format!("{g:?}");
    assert!(text.contains("demo-key"));
    assert!(!text.contains(DEMO_KEY));
    assert!(!text.contains(&hex::encode(keys::digest(DEMO_KEY.as_bytes()))));
}

#[test]
fn only_in_memory_stores_load_on_the_async_worker() {
    let f = fixture("");
    assert!(
        !f.gate.loads_inline(),
        "SQLite lookups do I/O: they go to the blocking pool"
    );
    let declared_only = Gate::new(
        config(""),
        Arc::new(crate::store::NoStore),
        Clock::manual(T0),
        Metrics::standalone(),
    );
    assert!(declared_only.loads_inline());
}

/// The cache's entry for `key` (a clone: it holds the team as a request's usage answer does).
fn cached(f: &Fixture, key: &str) -> KeyEntry {
    let now_ns = f.gate.clock.monotonic().as_nanos() as u64;
    f.gate
        .cache
        .with_hit(&keys::digest(key.as_bytes()), now_ns, KeyEntry::clone)
        .expect("cached")
}

#[test]
fn a_store_teams_keys_share_one_team_entry_which_prune_drops_once_unheld() {
    let f = fixture("");
    let (a, _) = f.issue("acme", &[], None);
    let (b, _) = f.issue("acme", &[], None);
    f.check(Method::GET, "/x", Some(&a)).unwrap();
    f.check(Method::GET, "/x", Some(&b)).unwrap();
    let (ka, kb) = (cached(&f, &a), cached(&f, &b));
    assert!(
        Arc::ptr_eq(&ka.team, &kb.team),
        "one team entry for both keys"
    );
    assert!(
        Arc::ptr_eq(&ka.buckets()[0], &kb.buckets()[0]),
        "and one bucket list"
    );
    assert_eq!(f.gate.teams_held(), 1);
    // A changed team must not be served from the table: invalidate_all forgets it.
    f.gate.invalidate_all();
    assert_eq!(f.gate.teams_held(), 0);
    f.check(Method::GET, "/x", Some(&a)).unwrap();
    let again = cached(&f, &a);
    assert!(!Arc::ptr_eq(&again.team, &ka.team), "resolved anew");
    f.gate.prune();
    assert_eq!(f.gate.teams_held(), 1, "held by a cached key: kept");
    // Once no cached key (or request) holds it, prune drops it.
    f.gate.invalidate(&keys::digest(a.as_bytes()));
    drop((ka, kb, again));
    f.gate.prune();
    assert_eq!(f.gate.teams_held(), 0);
}
