//! Heartbeats end to end: the 48 h rule, recording through the heartbeat route, the stale-teams
//! metric, and persistence across a restart on the same state directory.

mod support;

use std::time::Duration;

use keygate::clock::Clock;
use support::*;

const HOUR: Duration = Duration::from_secs(3600);

fn plugin_required() -> String {
    serde_json::json!({ "error": PLUGIN_MESSAGE }).to_string()
}

#[tokio::test]
async fn heartbeat_opens_the_api_for_48_hours() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    let kg = Keygate::start(&cfg.render()).await;

    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, "keygate_heartbeat_stale_teams"),
        Some(TEAMS as f64),
        "{m}"
    );

    kg.get("/api/x", Some(ALPHA_KEY))
        .await
        .assert_error(403, &plugin_required());
    assert_eq!(up.hits(), 0);

    // The heartbeat itself is exempt, recorded, and forwarded with the team's identity.
    let r = kg.heartbeat(ALPHA_KEY).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body["path"], "/extension/heartbeat");
    assert_eq!(r.echoed("x-keygate-team"), Some("alpha"));
    assert_eq!(up.hits(), 1);

    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    // Only alpha's: beta is still locked out.
    kg.get("/api/x", Some(BETA_KEY))
        .await
        .assert_error(403, &plugin_required());
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, "keygate_heartbeat_stale_teams"),
        Some((TEAMS - 1) as f64)
    );

    // Exactly 48 h later the heartbeat is still within the window...
    kg.clock.advance(48 * HOUR);
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    // ...and a second later it is not.
    kg.clock.advance(Duration::from_secs(1));
    kg.get("/api/x", Some(ALPHA_KEY))
        .await
        .assert_error(403, &plugin_required());
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, "keygate_heartbeat_stale_teams"),
        Some(TEAMS as f64)
    );
    assert_eq!(up.hits(), 3);

    // A new heartbeat opens it again.
    assert_eq!(kg.heartbeat(ALPHA_KEY).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
}

#[tokio::test]
async fn a_refused_heartbeat_records_nothing() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    let kg = Keygate::start(&cfg.render()).await;
    // No key, a wrong key, the wrong method: none of them counts as the team's heartbeat.
    assert_eq!(kg.post("/extension/heartbeat", None).await.status, 401);
    assert_eq!(
        kg.post("/extension/heartbeat", Some("kg_nobody_000000000000000"))
            .await
            .status,
        401
    );
    assert_eq!(
        kg.get("/extension/heartbeat", Some(ALPHA_KEY)).await.status,
        405
    );
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 403);
    assert!(kg.server.gate.heartbeats.last("alpha").is_none());
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn heartbeats_survive_a_restart() {
    let up = Upstream::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    cfg.state_dir = Some(state.path().to_owned());
    let toml = cfg.render();

    // First life: beta beats at T0 and goes stale; alpha beats 49 h later; tiny never beats.
    let kg = Keygate::start(&toml).await;
    assert_eq!(kg.heartbeat(BETA_KEY).await.status, 200);
    kg.clock.advance(49 * HOUR);
    assert_eq!(kg.heartbeat(ALPHA_KEY).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(BETA_KEY)).await.status, 403);
    let now = kg.clock.now().wall_ms;
    kg.stop().await;

    // Second life on the same directory, at the same wall time.
    let kg = Keygate::start_with(&toml, Clock::manual(now), None).await;
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(
        r.status,
        200,
        "a restart must not lock out a fresh team: {}",
        r.text()
    );
    kg.get("/api/x", Some(BETA_KEY))
        .await
        .assert_error(403, &plugin_required());
    kg.get("/api/x", Some(TINY_KEY))
        .await
        .assert_error(403, &plugin_required());
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, "keygate_heartbeat_stale_teams"),
        Some((TEAMS - 1) as f64),
        "{m}"
    );
    // The restored heartbeat still ages from when it was made.
    kg.clock.advance(48 * HOUR + Duration::from_secs(1));
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 403);
    kg.stop().await;
}

/// A restart must not let a stale team in: its old heartbeat, restored, is still stale.
#[tokio::test]
async fn a_stale_team_stays_stale_after_a_restart() {
    let up = Upstream::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    cfg.state_dir = Some(state.path().to_owned());
    let toml = cfg.render();

    let kg = Keygate::start(&toml).await;
    assert_eq!(kg.heartbeat(ALPHA_KEY).await.status, 200);
    kg.stop().await;

    // Restart three days later.
    let later = T0 + 72 * 3_600_000;
    let kg = Keygate::start_with(&toml, Clock::manual(later), None).await;
    kg.get("/api/x", Some(ALPHA_KEY))
        .await
        .assert_error(403, &plugin_required());
    assert_eq!(
        kg.server.gate.heartbeats.last("alpha"),
        Some(T0),
        "the heartbeat was persisted"
    );
    assert_eq!(up.hits(), 1);
    kg.stop().await;
}

/// Teams with `heartbeat_required = false` (or the global switch off) are never asked.
#[tokio::test]
async fn heartbeat_not_required() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    let m = kg.metrics().await;
    assert_eq!(metric(&m, "keygate_heartbeat_stale_teams"), Some(0.0));
}
