//! Keys and teams kept in the SQLite store (as `keygate keys` writes them), end to end: looked up
//! on a cache miss, revoked, expired, with the team's own plan, limits and heartbeat rule.

mod support;

use std::path::Path;
use std::time::Duration;

use keygate::clock::Clock;
use keygate::config::LimitSpec;
use keygate::server::open_store;
use keygate::store::sqlite::NewKey;
use keygate::store::{StateStore, StoredTeam};
use support::*;

const GAMMA_KEY: &str = "kg_gamma_0000000000000007";
const DELTA_KEY: &str = "kg_delta_0000000000000008";

fn digest(key: &str) -> [u8; 32] {
    keygate::gate::keys::digest(key.as_bytes())
}

/// Team `gamma` (plan pro, no heartbeat needed) with key `gamma-1`, which expires at `expires_at`;
/// team `delta` (custom: 2 per hour, heartbeat needed) with key `delta-1`.
fn seed(dir: &Path, expires_at: Option<i64>) {
    let s = open_store(dir).unwrap();
    s.upsert_team(
        &StoredTeam {
            id: "gamma".into(),
            plan: Some("pro".into()),
            limits: Vec::new(),
            heartbeat_required: Some(false),
        },
        T0,
    )
    .unwrap();
    s.upsert_team(
        &StoredTeam {
            id: "delta".into(),
            plan: None,
            limits: vec![LimitSpec {
                requests: 2,
                per: Duration::from_secs(3600),
                burst: 2,
            }],
            heartbeat_required: Some(true),
        },
        T0,
    )
    .unwrap();
    for (key_id, team, key, expires_at) in [
        ("gamma-1", "gamma", GAMMA_KEY, expires_at),
        ("delta-1", "delta", DELTA_KEY, None),
    ] {
        s.insert_key(
            &NewKey {
                key_id,
                digest: &digest(key),
                team_id: team,
                name: "integration test",
                environment: None,
                scopes: &[],
                visible_prefix: &key[..8],
                created_at: T0,
                expires_at,
            },
            50,
            T0,
        )
        .unwrap();
    }
}

fn cfg(up: &Upstream, dir: &Path) -> String {
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    cfg.state_dir = Some(dir.to_owned());
    cfg.render()
}

#[tokio::test]
async fn store_keys_authenticate_with_their_teams_plan() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), None);
    let kg = Keygate::start(&cfg(&up, dir.path())).await;
    for _ in 0..3 {
        let r = kg.get("/api/x", Some(GAMMA_KEY)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed("x-keygate-team"), Some("gamma"));
        assert_eq!(r.echoed("x-keygate-key-id"), Some("gamma-1"));
        assert_eq!(r.echoed("x-keygate-plan"), Some("pro"));
        assert_eq!(r.header("ratelimit-policy"), Some("\"pro\";q=1000;w=3600"));
    }
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, "keygate_store_lookups_total"),
        Some(1.0),
        "one lookup, then the cache: {m}"
    );
}

#[tokio::test]
async fn custom_limits_and_heartbeats_of_a_store_team() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), None);
    let kg = Keygate::start(&cfg(&up, dir.path())).await;
    assert_eq!(
        kg.get("/api/x", Some(DELTA_KEY)).await.status,
        403,
        "delta needs a heartbeat"
    );
    assert_eq!(kg.heartbeat(DELTA_KEY).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(DELTA_KEY)).await.status, 200);
    let r = kg.get("/api/x", Some(DELTA_KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(kg.get("/api/x", Some(DELTA_KEY)).await.status, 429);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn revoked_and_expired_store_keys_are_401() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), Some(T0 + 3_600_000));
    let kg = Keygate::start(&cfg(&up, dir.path())).await;

    // Expiry is checked against the gate's clock, cached or not.
    assert_eq!(kg.get("/api/x", Some(GAMMA_KEY)).await.status, 200);
    kg.clock.advance(Duration::from_secs(3599));
    assert_eq!(kg.get("/api/x", Some(GAMMA_KEY)).await.status, 200);
    kg.clock.advance(Duration::from_secs(1));
    kg.get("/api/x", Some(GAMMA_KEY))
        .await
        .assert_error(401, INVALID_KEY);

    // Revocation in the store, then the running gateway is told (as `keygate keys revoke` does).
    assert_eq!(kg.heartbeat(DELTA_KEY).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(DELTA_KEY)).await.status, 200);
    let store = kg.server.store.clone().expect("the store is open");
    assert!(store.revoke_key("delta-1", kg.clock.now().wall_ms).unwrap());
    kg.server.gate.invalidate(&digest(DELTA_KEY));
    kg.get("/api/x", Some(DELTA_KEY))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(up.hits(), 4);
}

/// The stale-teams gauge counts teams that must send heartbeats. A store team that need not
/// (gamma), whose old heartbeat is restored at start, is not one of them.
#[tokio::test]
async fn restored_heartbeats_of_teams_that_need_none_are_not_stale() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), None);
    open_store(dir.path())
        .unwrap()
        .save_heartbeats(&[("gamma".into(), T0)])
        .unwrap();
    let kg = Keygate::start_with(
        &cfg(&up, dir.path()),
        Clock::manual(T0 + 72 * 3_600_000),
        None,
    )
    .await;
    // alpha, beta and tiny (config) and delta (store) must beat and never have; gamma need not.
    let before = metric(&kg.metrics().await, "keygate_heartbeat_stale_teams");
    assert_eq!(kg.get("/api/x", Some(GAMMA_KEY)).await.status, 200);
    let after = metric(&kg.metrics().await, "keygate_heartbeat_stale_teams");
    assert_eq!(
        (before, after),
        (Some(TEAMS as f64 + 1.0), Some(TEAMS as f64 + 1.0)),
        "stale teams before and after gamma's key was used"
    );
}
