//! The error contract of DESIGN.md, end to end: every row's status, exact body and
//! `application/json`, the headers each one calls for, and that no denied request reaches the
//! upstream.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn missing_key_is_401() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = kg.get("/api/things", None).await;
    r.assert_error(401, MISSING_KEY);
    assert_eq!(r.names(), ["content-type", "cache-control", "x-request-id"]);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // An empty value is no key either.
    let r = kg.get("/api/things", Some("")).await;
    r.assert_error(401, MISSING_KEY);
    assert_eq!(up.hits(), 0, "a denied request must not reach the upstream");
}

#[tokio::test]
async fn invalid_keys_are_401() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    // Unknown (well-formed), asked twice: the second answer comes from the negative cache.
    for _ in 0..2 {
        kg.get("/api/things", Some("kg_nobody_000000000000000"))
            .await
            .assert_error(401, INVALID_KEY);
    }
    // Malformed: a space inside, and over the length bound.
    kg.get("/api/things", Some("kg alpha"))
        .await
        .assert_error(401, INVALID_KEY);
    let long = "k".repeat(300);
    kg.get("/api/things", Some(&long))
        .await
        .assert_error(401, INVALID_KEY);
    // An issued-format key (sk_live_ + 22 + 6 base62) with a wrong checksum.
    kg.get("/api/things", Some("sk_live_0123456789abcdefghijklAAAAAA"))
        .await
        .assert_error(401, INVALID_KEY);
    // The right key sent twice is ambiguous.
    let r = send(
        kg.client
            .get(kg.url("/api/things"))
            .header("x-api-key", ALPHA_KEY)
            .header("x-api-key", ALPHA_KEY),
    )
    .await;
    r.assert_error(401, INVALID_KEY);
    assert_eq!(up.hits(), 0);
    // And the real key passes, so the 401s were about the keys.
    assert_eq!(kg.get("/api/things", Some(ALPHA_KEY)).await.status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn stale_heartbeat_is_403_with_the_configured_message() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    let kg = Keygate::start(&cfg.render()).await;
    let r = kg.get("/api/things", Some(ALPHA_KEY)).await;
    r.assert_error(
        403,
        &serde_json::json!({ "error": PLUGIN_MESSAGE }).to_string(),
    );
    // The key is known by now, so the answer carries the plan's policy.
    assert_eq!(r.header("ratelimit-policy"), Some("\"free\";q=100;w=3600"));
    assert_eq!(
        r.names(),
        [
            "content-type",
            "cache-control",
            "ratelimit-policy",
            "x-request-id"
        ]
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn another_teams_resource_and_a_missing_scope_are_403() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    // team_param: alpha's key on beta's resources.
    kg.get("/teams/beta/tasks", Some(ALPHA_KEY))
        .await
        .assert_error(403, ACCESS_DENIED);
    // scopes: alpha's key lacks "write".
    kg.post("/write/posts", Some(ALPHA_KEY))
        .await
        .assert_error(403, ACCESS_DENIED);
    assert_eq!(up.hits(), 0);
    // The same keys where they belong pass.
    assert_eq!(
        kg.get("/teams/alpha/tasks", Some(ALPHA_KEY)).await.status,
        200
    );
    assert_eq!(kg.post("/write/posts", Some(BETA_KEY)).await.status, 200);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn denials_before_the_limit_spend_no_quota() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 2;
    let kg = Keygate::start(&cfg.render()).await;
    for _ in 0..5 {
        kg.get("/teams/alpha/x", Some(TINY_KEY))
            .await
            .assert_error(403, ACCESS_DENIED);
    }
    assert_eq!(kg.get("/api/a", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/b", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/c", Some(TINY_KEY)).await.status, 429);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    for r in [
        kg.post("/only-get", Some(ALPHA_KEY)).await,
        // Before any key check: no key still gets the 405.
        kg.post("/only-get", None).await,
    ] {
        r.assert_error(405, r#"{"error":"Method Not Allowed"}"#);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(
            r.names(),
            ["content-type", "cache-control", "allow", "x-request-id"]
        );
    }
    let r = send(
        kg.client
            .delete(kg.url("/extension/heartbeat"))
            .header("x-api-key", ALPHA_KEY),
    )
    .await;
    r.assert_error(405, r#"{"error":"Method Not Allowed"}"#);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 3;
    let kg = Keygate::start(&cfg.render()).await;
    for _ in 0..3 {
        assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    }
    let r = kg.get("/api/x", Some(TINY_KEY)).await;
    r.assert_error(429, r#"{"error":"Too Many Requests: rate limit exceeded"}"#);
    // 3 per hour: one token every 1200 s.
    assert_eq!(r.header("retry-after"), Some("1200"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("3600"));
    assert_eq!(r.header("ratelimit"), Some("\"tiny\";r=0;t=3600"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.names(),
        [
            "content-type",
            "cache-control",
            "retry-after",
            "ratelimit-policy",
            "ratelimit",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-request-id"
        ]
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn no_route_is_404() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    kg.get("/nowhere", Some(ALPHA_KEY))
        .await
        .assert_error(404, r#"{"error":"Not Found"}"#);
    kg.get("/", None)
        .await
        .assert_error(404, r#"{"error":"Not Found"}"#);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn closed_upstream_is_502() {
    let kg = Keygate::start(&base_toml(closed_port())).await;
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    r.assert_error(
        502,
        r#"{"error":"Bad Gateway: the upstream is unavailable"}"#,
    );
    // Authenticated, so the rate-limit policy is there too.
    assert!(r.header("ratelimit-policy").is_some());
    let m = kg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"keygate_requests_total{outcome="upstream_unavailable",route="api"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.upstream_extra
        .push(r#"request_timeout = "200ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    let started = std::time::Instant::now();
    let r = kg.get("/api/slow", Some(ALPHA_KEY)).await;
    r.assert_error(
        504,
        r#"{"error":"Gateway Timeout: the upstream did not answer in time"}"#,
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout should not wait for the upstream"
    );
    // The upstream did get it (it was forwarded, then given up on) and is still holding it.
    up.slow_arrived().await;
    up.release_slow(1);
}

#[tokio::test]
async fn every_denial_leaves_the_upstream_untouched() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 1;
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(up.hits(), 1);
    let denied = [
        kg.get("/api/x", None).await.status,
        kg.get("/api/x", Some("kg_nobody_000000000000000"))
            .await
            .status,
        kg.get("/teams/beta/x", Some(ALPHA_KEY)).await.status,
        kg.post("/write/x", Some(ALPHA_KEY)).await.status,
        kg.post("/only-get", Some(ALPHA_KEY)).await.status,
        kg.get("/api/x", Some(TINY_KEY)).await.status,
        kg.get("/nope", Some(ALPHA_KEY)).await.status,
        kg.get("/api/a%2Fb", Some(ALPHA_KEY)).await.status,
    ];
    assert_eq!(denied, [401, 401, 403, 403, 405, 429, 404, 400]);
    assert_eq!(up.hits(), 1, "no denied request may reach the upstream");
}

#[tokio::test]
async fn structured_style() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.error_style = "structured".into();
    cfg.doc_url = Some("https://docs.example/errors".into());
    cfg.heartbeat_required = true;
    let kg = Keygate::start(&cfg.render()).await;
    let cases = [
        (
            kg.get("/api/x", None).await,
            401,
            "unauthorized",
            "Missing API Key",
        ),
        (
            kg.get("/api/x", Some("kg_nobody_000000000000000")).await,
            401,
            "unauthorized",
            "Invalid API Key",
        ),
        (
            kg.get("/api/x", Some(ALPHA_KEY)).await,
            403,
            "plugin_required",
            PLUGIN_MESSAGE,
        ),
        (
            kg.get("/nowhere", None).await,
            404,
            "not_found",
            "Not Found",
        ),
    ];
    for (r, status, code, message) in cases {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.body,
            serde_json::json!({ "error": { "code": code, "message": message, "doc_url": "https://docs.example/errors" } })
        );
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn rate_limit_headers_on_authenticated_answers() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-policy"), Some("\"free\";q=100;w=3600"));
    // 100 per hour: a token every 36 s; one taken, so the bucket is full again in 36 s.
    assert_eq!(r.header("ratelimit"), Some("\"free\";r=99;t=36"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("36"));
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("98"));
    assert_eq!(r.header("ratelimit"), Some("\"free\";r=98;t=72"));
    // Unauthenticated answers carry none of them.
    let r = kg.get("/api/x", None).await;
    assert!(r.header("ratelimit-policy").is_none() && r.header("x-ratelimit-limit").is_none());
    // The heartbeat route is not rate limited: a policy but no counts.
    let r = kg.heartbeat(ALPHA_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-policy"), Some("\"free\";q=100;w=3600"));
    assert!(r.header("x-ratelimit-remaining").is_none());
}

/// `limits.headers` picks the families keygate sends. Each of its fields replaces the
/// upstream's of that name; the families it does not send are the upstream's and pass through.
/// A 429 keeps `Retry-After` whatever the setting, from the refusal lane and from hyper's path.
#[tokio::test]
async fn limits_headers_choose_the_rate_fields() {
    let up = Upstream::start().await;
    let ours = [
        ("ratelimit-policy", "\"tiny\";q=1;w=3600"),
        ("ratelimit", "\"tiny\";r=0;t=3600"),
        ("x-ratelimit-limit", "1"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "3600"),
    ];
    let mut answers = 0;
    for (mode, draft, x) in [
        ("all", true, true),
        ("draft", true, false),
        ("x-ratelimit", false, true),
        ("none", false, false),
    ] {
        let sent = |name: &str| if name.starts_with("x-") { x } else { draft };
        for lane in [true, false] {
            let mut cfg = Cfg::new(up.addr);
            cfg.tiny_limit = 1;
            cfg.proxy.push(format!("refusal_lane = {lane}"));
            cfg.extra = format!("[limits]\nheaders = \"{mode}\"\n");
            let kg = Keygate::start(&cfg.render()).await;
            let ctx = format!("headers = {mode:?}, refusal lane {lane}");

            let r = kg.get("/api/own-limits", Some(TINY_KEY)).await;
            answers += 1;
            assert_eq!(r.status, 200, "{ctx}");
            for ((name, mine), (_, theirs)) in ours.iter().zip(UPSTREAM_RATE_FIELDS) {
                let want = if sent(name) { *mine } else { theirs };
                assert_eq!(r.header(name), Some(want), "{ctx}: {name}");
            }

            let r = kg.get("/api/own-limits", Some(TINY_KEY)).await;
            r.assert_error(429, r#"{"error":"Too Many Requests: rate limit exceeded"}"#);
            assert_eq!(r.header("retry-after"), Some("3600"), "{ctx}");
            let mut want = vec!["content-type", "cache-control", "retry-after"];
            want.extend(ours.iter().map(|(n, _)| *n).filter(|n| sent(n)));
            want.push("x-request-id");
            assert_eq!(r.names(), want, "{ctx}");
            for (name, value) in ours.iter().filter(|(n, _)| sent(n)) {
                assert_eq!(r.header(name), Some(*value), "{ctx}: {name}");
            }

            // A keyed refusal before the limits: the policy is a draft field.
            let r = kg.get("/teams/alpha/x", Some(TINY_KEY)).await;
            assert_eq!(r.status, 403, "{ctx}");
            let want: &[&str] = if draft {
                &[
                    "content-type",
                    "cache-control",
                    "ratelimit-policy",
                    "x-request-id",
                ]
            } else {
                &["content-type", "cache-control", "x-request-id"]
            };
            assert_eq!(r.names(), want, "{ctx}");
        }
    }
    assert_eq!(
        up.hits(),
        answers,
        "only the first request of each reaches the upstream"
    );
}

#[tokio::test]
async fn public_routes_need_no_key() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    let kg = Keygate::start(&cfg.render()).await;
    let r = send(
        kg.client
            .get(kg.url("/public/otp"))
            .header("x-keygate-team", "alpha"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body["path"], "/public/otp");
    assert_eq!(
        r.echoed("x-keygate-team"),
        None,
        "a public request has no identity, and a spoofed one goes"
    );
    assert!(r.header("ratelimit-policy").is_none());
    // A key, even an unknown one, is not looked at on a public route.
    let r = kg
        .post("/public/otp", Some("kg_nobody_000000000000000"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed("x-api-key"),
        None,
        "credentials never reach the upstream"
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn too_many_failed_authentications_is_429() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.extra = "[limits]\nfailed_auth_per_minute = 3\n".into();
    let kg = Keygate::start(&cfg.render()).await;
    // Valid keys never spend the budget, cached or not.
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    // Three failures are the budget; the fourth finds it empty and blocks the address.
    for i in 1..=4 {
        kg.get("/api/x", Some(&format!("kg_nobody_00000000000000{i}")))
            .await
            .assert_error(401, INVALID_KEY);
    }
    let r = kg.get("/api/x", Some("kg_nobody_000000000000005")).await;
    r.assert_error(
        429,
        r#"{"error":"Too Many Requests: too many failed authentications"}"#,
    );
    assert_eq!(r.header("retry-after"), Some("20"));
    assert_eq!(
        r.names(),
        [
            "content-type",
            "cache-control",
            "retry-after",
            "x-request-id"
        ]
    );
    // A cached key is never charged, so it keeps working during an attack from its address.
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    // The budget refills with the clock.
    kg.clock.advance(Duration::from_secs(60));
    kg.get("/api/x", Some("kg_nobody_000000000000003"))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(up.hits(), 2);
}

/// Requests whose framing cannot be forwarded safely are refused with a JSON 400 and the
/// connection is closed.
#[tokio::test]
async fn unsafe_framing_is_400() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let cases = [
        // HTTP/1.1 without Host.
        format!("GET /api/x HTTP/1.1\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"),
        // Two Hosts.
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"),
        // Userinfo in Host.
        format!("GET /api/x HTTP/1.1\r\nHost: user@a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"),
        // An upgrade on a route that does not allow it.
        format!(
            "GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"
        ),
        // A path with dot segments.
        format!("GET /api/../teams/beta/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"),
    ];
    for req in &cases {
        let raw = raw_request(kg.proxy, req.as_bytes()).await;
        let lower = raw.to_ascii_lowercase();
        assert!(raw.starts_with("HTTP/1.1 400"), "{req:?} got:\n{raw}");
        assert!(lower.contains("content-type: application/json"), "{raw}");
        assert!(raw.ends_with(r#"{"error":"Bad Request"}"#), "{raw}");
    }
    assert_eq!(up.hits(), 0);

    // Content-Length with Transfer-Encoding (request smuggling): hyper drops the Content-Length
    // and closes after the exchange; the upstream must see one framing only.
    let raw = raw_request(
        kg.proxy,
        format!(
            "POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\
             x-api-key: {ALPHA_KEY}\r\n\r\n1\r\nA\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    if raw.starts_with("HTTP/1.1 200") {
        let h = up.last_headers();
        assert!(
            !(h.contains_key("content-length") && h.contains_key("transfer-encoding")),
            "{h:?}"
        );
        assert!(raw.contains(r#""body_bytes":1"#), "{raw}");
    } else {
        assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    }
}

/// The route table matches the raw path, so a path spelled differently from a route's pattern
/// but meaning the same to the upstream must not fall through to a more permissive route.
/// Route docs: "Paths that a server behind us might normalise into another route … are refused
/// as bad requests rather than guessed at."
#[tokio::test]
async fn equivalent_spellings_cannot_dodge_a_stricter_route() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    // As in config/keygate.toml: a team route, a scoped route, then a catch-all.
    cfg.routes = r#"
[[routes]]
name = "team"
path = "/teams/{team}/*"
team_param = "team"

[[routes]]
name = "write"
path = "/write/*"
scopes = ["write"]

[[routes]]
name = "api"
path = "/*"
"#
    .into();
    let kg = Keygate::start(&cfg.render()).await;
    kg.get("/teams/beta/tasks", Some(ALPHA_KEY))
        .await
        .assert_error(403, ACCESS_DENIED);
    kg.get("/write/posts", Some(ALPHA_KEY))
        .await
        .assert_error(403, ACCESS_DENIED);
    assert_eq!(up.hits(), 0);
    // Every one of these is /teams/beta/tasks or /write/posts to a server that decodes
    // unreserved characters (RFC 3986 §6.2.2.2) or merges slashes (nginx's default).
    let mut forwarded = Vec::new();
    for path in [
        "/%74eams/beta/tasks",
        "/teams//beta/tasks",
        "//teams/beta/tasks",
        "/%77rite/posts",
    ] {
        let r = kg.get(path, Some(ALPHA_KEY)).await;
        if !(r.status == 400 || r.status == 403) {
            forwarded.push(format!(
                "{path} -> {} (upstream saw {:?})",
                r.status,
                up.last_path()
            ));
        }
    }
    assert!(
        forwarded.is_empty(),
        "alpha's key reached beta's resources: {forwarded:#?}"
    );
    assert_eq!(up.hits(), 0, "none of them may reach the upstream");
}

/// The key store cannot be opened: keys declared in the config still work, and any other key is
/// refused with 503 (fail closed), never waved through.
#[tokio::test]
async fn unreachable_store_fails_closed_with_503() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the state directory should be: the store cannot open.
    let not_a_dir = dir.path().join("state");
    std::fs::write(&not_a_dir, b"not a directory").unwrap();
    let mut cfg = Cfg::new(up.addr);
    cfg.state_dir = Some(not_a_dir);
    let kg = Keygate::start(&cfg.render()).await;
    assert!(kg.server.store.is_none());
    assert_eq!(
        kg.get("/api/x", Some(ALPHA_KEY)).await.status,
        200,
        "declared keys need no store"
    );
    kg.get("/api/x", Some("kg_nobody_000000000000000"))
        .await
        .assert_error(
            503,
            r#"{"error":"Service Unavailable: the key store cannot be reached"}"#,
        );
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, "keygate_state_write_errors_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "keygate_store_errors_total"),
        Some(1.0),
        "the failed lookup is counted: {m}"
    );
    assert_eq!(up.hits(), 1);
}

/// `Retry-After` must be long enough: a client that waits exactly that long is let through.
#[tokio::test]
async fn failed_auth_retry_after_is_rounded_up() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.extra = "[limits]\nfailed_auth_per_minute = 3\n".into();
    let kg = Keygate::start(&cfg.render()).await;
    for i in 0..4 {
        kg.get("/api/x", Some(&format!("kg_nobody_00000000000000{i}")))
            .await
            .assert_error(401, INVALID_KEY);
    }
    // Half a second later the next token is 19.5 s away.
    kg.clock.advance(Duration::from_millis(500));
    let r = kg.get("/api/x", Some("kg_nobody_000000000000009")).await;
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    kg.clock.advance(Duration::from_secs(wait));
    let r = kg.get("/api/x", Some("kg_nobody_000000000000009")).await;
    assert_eq!(
        r.status, 401,
        "refused again after waiting Retry-After = {wait} s"
    );
}

/// Behind a trusted proxy, the failed-authentication budget is per client (the address the proxy
/// appended last to X-Forwarded-For), not per proxy: one client guessing keys does not block
/// another client's uncached valid key. Addresses a client writes to the left are not trusted.
#[tokio::test]
async fn failed_auth_budget_is_per_forwarded_client_behind_a_trusted_proxy() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("trust_forwarded = true".into());
    cfg.extra = "[limits]\nfailed_auth_per_minute = 3\n".into();
    let kg = Keygate::start(&cfg.render()).await;
    let from = |xff: &str, key: &str| {
        kg.client
            .get(kg.url("/api/x"))
            .header("x-forwarded-for", xff)
            .header("x-api-key", key)
    };
    // The attacker varies the address it claims; the proxy's last entry stays 203.0.113.9.
    for i in 0..5 {
        send(from(
            &format!("10.0.0.{i}, 203.0.113.9"),
            &format!("kg_nobody_00000000000000{i}"),
        ))
        .await;
    }
    let r = send(from("203.0.113.9", "kg_nobody_000000000000009")).await;
    r.assert_error(
        429,
        r#"{"error":"Too Many Requests: too many failed authentications"}"#,
    );
    // Another client behind the same proxy: its first (uncached) valid request passes.
    let r = send(from("198.51.100.7", ALPHA_KEY)).await;
    assert_eq!(r.status, 200);
}
