//! The key lifecycle through the admin API, end to end on an in-process gateway with a SQLite
//! store and an admin token file: teams and keys created, used, revoked, rotated with a grace
//! period (driven by the manual clock), the per-team key limit, checksum rejection before any
//! lookup, usage counts (live and persisted), admin authentication, team updates and heartbeats.

mod support;

use std::path::Path;
use std::time::Duration;

use http::Method;
use keygate::clock::Clock;
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "kg-admin-7f3a9c1e5b2d";

/// A self-service usage route, added after the base routes.
const USAGE_ROUTE: &str = r#"
[[routes]]
name = "usage"
path = "/keygate/usage"
methods = ["GET"]
usage = true
"#;

/// The base config with a store in `dir/state`, the usage route, and the admin token in
/// `dir/admin.token`; `tweak` changes the rest.
fn toml_for(up: &Upstream, dir: &Path, tweak: impl FnOnce(&mut Cfg)) -> String {
    let mut cfg = Cfg::new(up.addr);
    cfg.state_dir = Some(dir.join("state"));
    cfg.routes.push_str(USAGE_ROUTE);
    tweak(&mut cfg);
    let token = write_token_file(dir, TOKEN);
    with_admin(&cfg.render(), "127.0.0.1:0", Some(&token))
}

struct Env {
    up: Upstream,
    kg: Keygate,
    dir: tempfile::TempDir,
    toml: String,
}

impl Env {
    async fn start(tweak: impl FnOnce(&mut Cfg)) -> Env {
        let up = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let toml = toml_for(&up, dir.path(), tweak);
        let kg = Keygate::start(&toml).await;
        Env { up, kg, dir, toml }
    }
}

/// An admin call with the right token.
async fn admin(kg: &Keygate, method: Method, path: &str, body: Option<Value>) -> Resp {
    kg.admin_call(method, path, Some(TOKEN), body.as_ref())
        .await
}

async fn create_team(kg: &Keygate, body: Value) {
    let r = admin(kg, Method::POST, "/admin/teams", Some(body)).await;
    assert_eq!(r.status, 201, "create team: {}", r.text());
}

/// Creates a key for `team`; returns (key, key id).
async fn create_key(kg: &Keygate, team: &str) -> (String, String) {
    let r = admin(
        kg,
        Method::POST,
        "/admin/keys",
        Some(json!({ "team": team })),
    )
    .await;
    assert_eq!(r.status, 201, "create key: {}", r.text());
    let key = r.body["key"].as_str().expect("the key").to_owned();
    let id = r.body["key_id"].as_str().expect("the key id").to_owned();
    (key, id)
}

/// Uses a key on `/api/x`: the key id the upstream was told on 200, or the status otherwise
/// (a 401 must be the exact invalid-key answer).
async fn who(kg: &Keygate, key: &str) -> Result<String, u16> {
    let r = kg.get("/api/x", Some(key)).await;
    match r.status {
        200 => Ok(r
            .echoed("x-keygate-key-id")
            .expect("x-keygate-key-id")
            .to_owned()),
        401 => {
            r.assert_error(401, INVALID_KEY);
            Err(401)
        }
        s => Err(s),
    }
}

fn error_of(r: &Resp) -> &str {
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {}", r.text()))
}

/// Files of the store (the database and its WAL), concatenated.
fn store_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir.join("state")).unwrap() {
        all.extend(std::fs::read(entry.unwrap().path()).unwrap_or_default());
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// 1

#[tokio::test]
async fn a_key_made_by_the_admin_api_authenticates_then_revocation_refuses_the_next_request() {
    let e = Env::start(|_| {}).await;
    let r = admin(
        &e.kg,
        Method::POST,
        "/admin/teams",
        Some(json!({ "id": "gamma", "plan": "pro" })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.body, json!({ "id": "gamma" }));

    let r = admin(
        &e.kg,
        Method::POST,
        "/admin/keys",
        Some(json!({ "team": "gamma", "name": "ci", "scopes": ["read"] })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["key_id"].as_str().unwrap().to_owned();
    assert!(is_live_key(&key), "issued format: {key}");
    assert!(id.starts_with("key_") && !key.contains(&id[4..]), "{id}");
    assert_eq!(r.body["team_id"], "gamma");
    assert_eq!(r.body["name"], "ci");
    assert_eq!(r.body["scopes"], json!(["read"]));
    assert_eq!(r.body["prefix"], &key[..12], "visible prefix");
    assert_eq!(r.body["created_at"], T0, "stamped by the gateway's clock");
    assert!(r.body["revoked_at"].is_null() && r.body["expires_at"].is_null());

    // The key exists in that answer only: never listed, never read back, never stored.
    let digest = sha256_hex(&key);
    let secrets = [
        key.clone(),
        key[8..].to_owned(),
        digest.clone(),
        digest.to_uppercase(),
    ];
    for path in [
        "/admin/keys".to_owned(),
        "/admin/keys?team=gamma".to_owned(),
        format!("/admin/keys/{id}"),
        format!("/admin/keys/{id}/usage"),
    ] {
        let r = admin(&e.kg, Method::GET, &path, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.text().contains(&id), "{path} names the key id");
        for s in &secrets {
            assert!(
                !r.text().contains(s.as_str()),
                "{path} leaks {s}: {}",
                r.text()
            );
        }
    }
    let list = admin(&e.kg, Method::GET, "/admin/keys", None).await;
    assert_eq!(list.body["keys"].as_array().map(Vec::len), Some(1));
    assert!(
        !contains(&store_bytes(e.dir.path()), &key),
        "the plaintext key is in the store files"
    );

    // Through the proxy: the upstream is told which key it was.
    let r = e.kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        e.up.last_headers()
            .get("x-keygate-key-id")
            .map(|v| v.to_str().unwrap()),
        Some(id.as_str())
    );
    assert_eq!(r.echoed("x-keygate-team"), Some("gamma"));
    assert_eq!(r.echoed("x-keygate-plan"), Some("pro"));
    assert_eq!(r.echoed("x-api-key"), None, "the key is not forwarded");

    // Revoked: the very next request is refused, and nothing reaches the upstream.
    let r = admin(
        &e.kg,
        Method::POST,
        &format!("/admin/keys/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, json!({ "key_id": id, "revoked": true }));
    let hits = e.up.hits();
    e.kg.get("/api/x", Some(&key))
        .await
        .assert_error(401, INVALID_KEY);
    e.kg.get("/api/x", Some(&key))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(
        e.up.hits(),
        hits,
        "a revoked key's request reached the upstream"
    );
    let r = admin(&e.kg, Method::GET, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(r.body["revoked_at"], T0);

    let r = admin(&e.kg, Method::POST, "/admin/keys/key_nope/revoke", None).await;
    assert_eq!(r.status, 404, "{}", r.text());
    error_of(&r);
}

// ---------------------------------------------------------------------------------------------
// 2

#[tokio::test]
async fn rotation_keeps_the_old_key_for_the_grace_period_and_not_a_moment_more() {
    let e = Env::start(|_| {}).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "pro" })).await;
    let (old, old_id) = create_key(&e.kg, "gamma").await;
    // Cached before the rotation, so the rotation must reach the cache.
    assert_eq!(who(&e.kg, &old).await, Ok(old_id.clone()));

    let r = admin(
        &e.kg,
        Method::POST,
        &format!("/admin/keys/{old_id}/rotate"),
        Some(json!({ "grace": "1h" })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let new = r.body["key"].as_str().unwrap().to_owned();
    let new_id = r.body["key_id"].as_str().unwrap().to_owned();
    assert!(is_live_key(&new));
    assert_ne!(new, old);
    assert_ne!(new_id, old_id);
    assert_eq!(r.body["team_id"], "gamma");

    assert_eq!(who(&e.kg, &new).await, Ok(new_id.clone()));
    assert_eq!(
        who(&e.kg, &old).await,
        Ok(old_id.clone()),
        "old key in its grace"
    );
    e.kg.clock.advance(Duration::from_secs(59 * 60 + 59));
    assert_eq!(
        who(&e.kg, &old).await,
        Ok(old_id.clone()),
        "1 s before the end of the grace"
    );
    e.kg.clock.advance(Duration::from_secs(2));
    assert_eq!(who(&e.kg, &old).await, Err(401), "after the grace");
    assert_eq!(who(&e.kg, &new).await, Ok(new_id.clone()));

    let r = admin(&e.kg, Method::GET, &format!("/admin/keys/{old_id}"), None).await;
    assert_eq!(r.body["replaced_by"], new_id.as_str());
    assert_eq!(r.body["expires_at"], T0 + 3_600_000);
    // An ended key is not rotated again.
    let r = admin(
        &e.kg,
        Method::POST,
        &format!("/admin/keys/{old_id}/rotate"),
        None,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    error_of(&r);

    // Without a grace period the old key stops at once.
    let r = admin(
        &e.kg,
        Method::POST,
        &format!("/admin/keys/{new_id}/rotate"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let newer = r.body["key"].as_str().unwrap().to_owned();
    let newer_id = r.body["key_id"].as_str().unwrap().to_owned();
    assert_eq!(who(&e.kg, &new).await, Err(401), "rotated without grace");
    assert_eq!(who(&e.kg, &newer).await, Ok(newer_id));
}

// ---------------------------------------------------------------------------------------------
// 3

#[tokio::test]
async fn a_team_at_its_key_limit_is_refused_until_a_key_is_revoked() {
    let e = Env::start(|c| c.extra.push_str("[keys]\nmax_active_per_team = 3\n")).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "pro" })).await;
    create_team(&e.kg, json!({ "id": "delta", "plan": "free" })).await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(create_key(&e.kg, "gamma").await);
    }
    let refuse = || {
        admin(
            &e.kg,
            Method::POST,
            "/admin/keys",
            Some(json!({ "team": "gamma" })),
        )
    };
    let r = refuse().await;
    assert_eq!(r.status, 409, "{}", r.text());
    let msg = error_of(&r);
    assert!(
        msg.contains("gamma") && msg.contains("limit") && msg.contains('3'),
        "unclear message: {msg}"
    );
    assert!(r.body.get("key").is_none());
    let list = admin(&e.kg, Method::GET, "/admin/keys?team=gamma", None).await;
    assert_eq!(
        list.body["keys"].as_array().map(Vec::len),
        Some(3),
        "nothing stored"
    );

    // The limit is per team.
    create_key(&e.kg, "delta").await;

    // A rotation at the limit is refused too, and leaves the old key working.
    let (k0, id0) = keys[0].clone();
    let r = admin(
        &e.kg,
        Method::POST,
        &format!("/admin/keys/{id0}/rotate"),
        Some(json!({ "grace": "1h" })),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(who(&e.kg, &k0).await, Ok(id0.clone()));

    let r = admin(
        &e.kg,
        Method::POST,
        &format!("/admin/keys/{id0}/revoke"),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let (k, id) = create_key(&e.kg, "gamma").await;
    assert_eq!(who(&e.kg, &k).await, Ok(id));
    assert_eq!(refuse().await.status, 409, "full again");
}

// ---------------------------------------------------------------------------------------------
// 4

#[tokio::test]
async fn a_bad_checksum_is_refused_without_a_lookup_and_unknown_keys_are_looked_up_once() {
    let e = Env::start(|_| {}).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "pro" })).await;
    let (key, id) = create_key(&e.kg, "gamma").await;
    let lookups = || {
        metric(
            &e.kg.server.gate.metrics().render(),
            "keygate_store_lookups_total",
        )
        .expect("keygate_store_lookups_total")
    };
    assert_eq!(lookups(), 0.0);

    // One character changed, in the random part and in the checksum.
    for at in [12, key.len() - 1] {
        let mut bad = key.clone().into_bytes();
        bad[at] = if bad[at] == b'a' { b'b' } else { b'a' };
        let bad = String::from_utf8(bad).unwrap();
        assert!(is_live_key(&bad), "still the issued shape");
        e.kg.get("/api/x", Some(&bad))
            .await
            .assert_error(401, INVALID_KEY);
        assert_eq!(lookups(), 0.0, "a bad checksum (at {at}) reached the store");
    }
    assert_eq!(e.up.hits(), 0);

    // The real key: one lookup, then the cache.
    assert_eq!(who(&e.kg, &key).await, Ok(id.clone()));
    assert_eq!(lookups(), 1.0);
    assert_eq!(who(&e.kg, &key).await, Ok(id));
    assert_eq!(lookups(), 1.0);

    // A well-formed key nobody issued: one lookup, then the negative cache.
    let unknown = keygate::gate::credential::issue("sk_live_");
    e.kg.get("/api/x", Some(&unknown))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(lookups(), 2.0);
    e.kg.get("/api/x", Some(&unknown))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(lookups(), 2.0, "the negative cache did not answer");
    // The admin listener's /metrics says the same.
    assert_eq!(
        metric(&e.kg.metrics().await, "keygate_store_lookups_total"),
        Some(2.0)
    );
}

// ---------------------------------------------------------------------------------------------
// 5

#[tokio::test]
async fn usage_is_live_before_a_flush_survives_a_restart_and_keeps_adding_up() {
    const N: u64 = 7;
    // No periodic flush during the test: only the one on shutdown.
    let e = Env::start(|c| c.extra.push_str("[keys]\nusage_flush_interval = \"1h\"\n")).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "pro" })).await;
    let (key, id) = create_key(&e.kg, "gamma").await;
    let usage_path = format!("/admin/keys/{id}/usage");
    let r = admin(&e.kg, Method::GET, &usage_path, None).await;
    assert_eq!(
        r.body,
        json!({ "key_id": id, "requests": 0, "last_used_at": null })
    );

    for _ in 0..N {
        assert_eq!(e.kg.get("/api/x", Some(&key)).await.status, 200);
    }
    let r = admin(&e.kg, Method::GET, &usage_path, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.body,
        json!({ "key_id": id, "requests": N, "last_used_at": T0 })
    );
    let store = e.kg.server.store.clone().unwrap();
    assert_eq!(
        store.get_key(&id).unwrap().unwrap().use_count,
        0,
        "counted live, not yet written"
    );
    let list = admin(&e.kg, Method::GET, "/admin/keys?team=gamma", None).await;
    assert_eq!(list.body["keys"][0]["use_count"], N);
    // A heartbeat at T0, to be aged after the restart.
    let r = admin(&e.kg, Method::POST, "/admin/teams/gamma/heartbeat", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(store);

    // A graceful stop writes the counts.
    let Env { up, kg, dir, toml } = e;
    kg.stop().await;
    let on_disk = keygate::server::open_store(&dir.path().join("state"))
        .unwrap()
        .get_key(&id)
        .unwrap()
        .unwrap();
    assert_eq!((on_disk.use_count, on_disk.last_used_at), (N, Some(T0)));

    let kg = Keygate::start_with(&toml, Clock::manual(T0 + 90_000), None).await;
    let r = admin(&kg, Method::GET, &usage_path, None).await;
    assert_eq!(
        r.body,
        json!({ "key_id": id, "requests": N, "last_used_at": T0 })
    );
    for _ in 0..3 {
        assert_eq!(kg.get("/api/x", Some(&key)).await.status, 200);
    }
    let r = admin(&kg, Method::GET, &usage_path, None).await;
    assert_eq!(
        r.body,
        json!({ "key_id": id, "requests": N + 3, "last_used_at": T0 + 90_000 })
    );

    // Self-service: the caller's own key, plan, limits, what remains and the heartbeat's age.
    let hits = up.hits();
    let r = kg.get("/keygate/usage", Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(up.hits(), hits, "answered by keygate, not forwarded");
    let b = &r.body;
    assert_eq!(b["key_id"], id.as_str());
    assert_eq!(b["team"], "gamma");
    assert_eq!(b["plan"], "pro");
    let limits = b["limits"].as_array().expect("limits");
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0]["requests"], 1000);
    assert_eq!(limits[0]["per_seconds"].as_f64(), Some(3600.0));
    // A fresh bucket in the new process: three requests and this one.
    assert_eq!(b["remaining"], 996);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("996"));
    assert_eq!(b["heartbeat_age_seconds"], 90, "{}", r.text());
    assert_eq!(b["heartbeat_required"], false);

    // Another key of the same team sees its own id, not this one's.
    let (other, other_id) = create_key(&kg, "gamma").await;
    let r = kg.get("/keygate/usage", Some(&other)).await;
    assert_eq!(r.body["key_id"], other_id.as_str());
}

/// The self-service answer's request count is the key's own count, as `GET
/// /admin/keys/{id}/usage` gives it: after a restart it still includes what was persisted.
#[tokio::test]
async fn self_service_request_count_matches_the_admin_count_after_a_restart() {
    let e = Env::start(|_| {}).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "pro" })).await;
    let (key, id) = create_key(&e.kg, "gamma").await;
    for _ in 0..3 {
        assert_eq!(e.kg.get("/api/x", Some(&key)).await.status, 200);
    }
    let Env {
        up: _up,
        kg,
        dir: _dir,
        toml,
    } = e;
    kg.stop().await;
    let kg = Keygate::start(&toml).await;
    let r = kg.get("/keygate/usage", Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let admin_count = admin(&kg, Method::GET, &format!("/admin/keys/{id}/usage"), None)
        .await
        .body["requests"]
        .clone();
    assert_eq!(admin_count, 4);
    assert_eq!(r.body["requests"], admin_count, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 6

#[tokio::test]
async fn the_admin_api_needs_its_token_and_is_off_without_one() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kg = Keygate::start(&toml_for(&up, dir.path(), |_| {})).await;
    let call =
        |token: Option<&'static str>| kg.admin_call(Method::GET, "/admin/teams", token, None);

    let r = call(None).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(!error_of(&r).is_empty());
    for wrong in [
        "",
        "nope",
        "kg-admin-7f3a9c1e5b2",
        "kg-admin-7f3a9c1e5b2dX",
        "KG-ADMIN-7F3A9C1E5B2D",
    ] {
        let r = call(Some(wrong)).await;
        assert_eq!(r.status, 401, "token {wrong:?}: {}", r.text());
        error_of(&r);
    }
    // Another scheme with the right token is not accepted either.
    let r = send(
        kg.client
            .get(kg.admin_url("/admin/teams"))
            .header("authorization", format!("Basic {TOKEN}")),
    )
    .await;
    assert_eq!(r.status, 401);
    // The right token (the file's trailing newline is not part of it).
    let r = call(Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ids: Vec<&str> = r.body["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "beta", "tiny"]);
    // Refused calls changed nothing; a refused write is refused before its body is read.
    let r = kg
        .admin_call(
            Method::POST,
            "/admin/teams",
            Some("nope"),
            Some(&json!({ "id": "sneaky", "plan": "pro" })),
        )
        .await;
    assert_eq!(r.status, 401);
    let r = call(Some(TOKEN)).await;
    assert_eq!(r.body["teams"].as_array().unwrap().len(), 3);
    // Metrics and health need no token.
    for path in ["/metrics", "/healthz"] {
        let r = send(kg.client.get(kg.admin_url(path))).await;
        assert_eq!(r.status, 200, "{path}");
    }

    // No token configured: the API is off (403), metrics and health still answer.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(up.addr);
    cfg.state_dir = Some(dir2.path().join("state"));
    let off = Keygate::start(&cfg.render()).await;
    for token in [None, Some(TOKEN), Some("")] {
        let r = off
            .admin_call(Method::GET, "/admin/keys", token, None)
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        let msg = error_of(&r);
        assert!(msg.contains("off"), "{msg}");
    }
    for path in ["/metrics", "/healthz"] {
        let r = send(off.client.get(off.admin_url(path))).await;
        assert_eq!(r.status, 200, "{path}");
    }

    // A token file that cannot be read: off as well, not open.
    let missing = dir2.path().join("no-such.token");
    let toml = with_admin(&cfg.render(), "127.0.0.1:0", Some(&missing));
    let unreadable = Keygate::start(&toml).await;
    for token in [None, Some(""), Some(TOKEN)] {
        let r = unreadable
            .admin_call(Method::GET, "/admin/teams", token, None)
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
    }
}

/// RFC 9110 §11.1: the authentication scheme is case-insensitive (`bearer`, `BEARER`), as the
/// proxy's own `Authorization: Bearer` credential source already treats it.
#[tokio::test]
async fn the_admin_token_scheme_is_case_insensitive() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kg = Keygate::start(&toml_for(&up, dir.path(), |_| {})).await;
    for scheme in ["bearer", "BEARER"] {
        let r = send(
            kg.client
                .get(kg.admin_url("/admin/teams"))
                .header("authorization", format!("{scheme} {TOKEN}")),
        )
        .await;
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
    }
}

// ---------------------------------------------------------------------------------------------
// 7

#[tokio::test]
async fn a_team_update_reaches_its_cached_keys_on_the_next_request() {
    let e = Env::start(|_| {}).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "free" })).await;
    let (key, _) = create_key(&e.kg, "gamma").await;
    let r = e.kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(r.echoed("x-keygate-plan"), Some("free"));
    let r = e.kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"), "cached now");

    let r = admin(
        &e.kg,
        Method::PUT,
        "/admin/teams/gamma",
        Some(json!({ "id": "gamma", "plan": "pro" })),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, json!({ "id": "gamma" }));
    let r = e.kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some("1000"),
        "the new plan at once"
    );
    assert_eq!(r.echoed("x-keygate-plan"), Some("pro"));

    // Custom limits: enforced from the next request on.
    let r = admin(
        &e.kg,
        Method::PUT,
        "/admin/teams/gamma",
        Some(json!({ "id": "gamma", "limits": [{ "requests": 2, "per": "1h" }] })),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = e.kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.echoed("x-keygate-plan"), Some("custom"));
    assert_eq!(e.kg.get("/api/x", Some(&key)).await.status, 200);
    assert_eq!(e.kg.get("/api/x", Some(&key)).await.status, 429);

    let r = admin(&e.kg, Method::GET, "/admin/teams", None).await;
    let gamma = r.body["teams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "gamma")
        .expect("gamma listed")
        .clone();
    assert_eq!(gamma["plan"], "custom");
    assert_eq!(gamma["source"], "store");

    // Unknown plans and config teams are refused, and change nothing.
    let r = admin(
        &e.kg,
        Method::PUT,
        "/admin/teams/gamma",
        Some(json!({ "id": "gamma", "plan": "platinum" })),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(error_of(&r).contains("platinum"));
    let r = admin(
        &e.kg,
        Method::PUT,
        "/admin/teams/alpha",
        Some(json!({ "id": "alpha", "plan": "pro" })),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        e.kg.get("/api/x", Some(ALPHA_KEY))
            .await
            .header("x-ratelimit-limit"),
        Some("100")
    );
}

/// `PUT /admin/teams/{id}` names the team in the path; the body should not have to repeat it.
#[tokio::test]
async fn a_team_update_takes_its_id_from_the_path() {
    let e = Env::start(|_| {}).await;
    create_team(&e.kg, json!({ "id": "gamma", "plan": "free" })).await;
    let (key, _) = create_key(&e.kg, "gamma").await;
    let r = admin(
        &e.kg,
        Method::PUT,
        "/admin/teams/gamma",
        Some(json!({ "plan": "pro" })),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = e.kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("1000"));
}

// ---------------------------------------------------------------------------------------------
// 8

#[tokio::test]
async fn an_admin_heartbeat_lets_a_stale_team_through() {
    let e = Env::start(|c| c.heartbeat_required = true).await;
    create_team(&e.kg, json!({ "id": "delta", "plan": "pro" })).await;
    create_team(
        &e.kg,
        json!({ "id": "free-rider", "plan": "pro", "heartbeat_required": false }),
    )
    .await;
    let (key, id) = create_key(&e.kg, "delta").await;
    let (other, other_id) = create_key(&e.kg, "free-rider").await;
    let plugin = json!({ "error": PLUGIN_MESSAGE }).to_string();

    e.kg.get("/api/x", Some(&key))
        .await
        .assert_error(403, &plugin);
    assert_eq!(
        who(&e.kg, &other).await,
        Ok(other_id),
        "a team that need not beat"
    );
    let r = admin(&e.kg, Method::POST, "/admin/teams/delta/heartbeat", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body["team"], "delta");
    assert_eq!(r.body["heartbeat_at"], "2023-11-14T22:13:20.000Z");
    assert_eq!(who(&e.kg, &key).await, Ok(id.clone()));

    // Stale again after the window; one more admin heartbeat and it passes.
    e.kg.clock.advance(Duration::from_secs(48 * 3600 + 1));
    let hits = e.up.hits();
    e.kg.get("/api/x", Some(&key))
        .await
        .assert_error(403, &plugin);
    assert_eq!(e.up.hits(), hits);
    let r = admin(&e.kg, Method::POST, "/admin/teams/delta/heartbeat", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(who(&e.kg, &key).await, Ok(id));

    // It needs the token like every admin call.
    let r =
        e.kg.admin_call(Method::POST, "/admin/teams/delta/heartbeat", None, None)
            .await;
    assert_eq!(r.status, 401);
    let r = admin(&e.kg, Method::POST, "/admin/teams/bad%20id/heartbeat", None).await;
    assert_eq!(r.status, 400, "{}", r.text());
}

/// A heartbeat is recorded only for a team that exists: an unknown id is a 404, not a phantom
/// team that later counts as stale in `keygate_heartbeat_stale_teams`.
#[tokio::test]
async fn an_admin_heartbeat_for_an_unknown_team_is_404() {
    let e = Env::start(|c| c.heartbeat_required = true).await;
    let stale = || async {
        metric(&e.kg.metrics().await, "keygate_heartbeat_stale_teams").expect("the gauge")
    };
    assert_eq!(stale().await, TEAMS as f64);
    let r = admin(&e.kg, Method::POST, "/admin/teams/ghost/heartbeat", None).await;
    e.kg.clock.advance(Duration::from_secs(49 * 3600));
    let after = stale().await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(after, TEAMS as f64, "a phantom stale team");
}
