//! Lifecycle end to end: config reloads (state kept, bad files refused, changes applied),
//! graceful shutdown with a request in flight, and the shipped example config.

mod support;

use std::time::Duration;

use keygate::config::Config;
use support::*;

#[tokio::test]
async fn reload_keeps_limiter_state() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 2;
    let (kg, _dir, path) = start_from_file(&cfg).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);

    // An unrelated change: a new error message.
    cfg.messages
        .push(("not_found".into(), "Nothing here".into()));
    write_file(&path, &cfg.render());
    kg.server.reload().expect("the edited config is valid");
    kg.get("/nowhere", None)
        .await
        .assert_error(404, r#"{"error":"Nothing here"}"#);
    // The reload dropped every cached key; pruning idle buckets now must still keep this one,
    // which is far from full.
    kg.server.gate.prune();
    let r = kg.get("/api/x", Some(TINY_KEY)).await;
    assert_eq!(
        r.status,
        429,
        "a reload must not hand out a fresh bucket: {}",
        r.text()
    );
    assert_eq!(up.hits(), 2);
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, r#"keygate_config_reloads_total{result="ok"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_broken_file_is_refused_and_the_old_config_keeps_serving() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 1;
    let (kg, _dir, path) = start_from_file(&cfg).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);

    // Not TOML at all.
    write_file(&path, "[proxy\nthis is not toml");
    assert!(kg.server.reload().is_err());
    // Valid TOML that fails validation: an unknown plan, and a typo'd field.
    let mut broken = cfg.clone();
    broken.tiny_limit = 50;
    let text = broken
        .render()
        .replace("plan = \"pro\"", "plan = \"platinum\"");
    write_file(&path, &text);
    let err = kg
        .server
        .reload()
        .expect_err("an unknown plan is refused")
        .to_string();
    assert!(err.contains("teams[1].plan"), "{err}");
    write_file(
        &path,
        &broken
            .render()
            .replace("[heartbeat]\n", "[heartbeat]\nwindw = \"1h\"\n"),
    );
    let err = kg
        .server
        .reload()
        .expect_err("an unknown field is refused")
        .to_string();
    assert!(err.contains("windw"), "{err}");

    // Everything answers as before.
    assert_eq!(
        kg.get("/api/x", Some(TINY_KEY)).await.status,
        429,
        "still the old quota, not 50"
    );
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(BETA_KEY)).await.status, 200);
    kg.get("/api/x", None).await.assert_error(401, MISSING_KEY);
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, r#"keygate_config_reloads_total{result="refused"}"#),
        Some(3.0)
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_reload_that_changes_a_limit_takes_effect() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 1;
    let (kg, _dir, path) = start_from_file(&cfg).await;
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);

    cfg.tiny_limit = 3;
    write_file(&path, &cfg.render());
    kg.server.reload().unwrap();
    let r = kg.get("/api/x", Some(TINY_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("ratelimit-policy"), Some("\"tiny\";q=3;w=3600"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(TINY_KEY)).await.status, 429);
}

#[tokio::test]
async fn a_reload_that_changes_limits_headers_takes_effect() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.tiny_limit = 5;
    let (kg, _dir, path) = start_from_file(&cfg).await;
    let r = kg.get("/api/x", Some(TINY_KEY)).await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("4"));
    assert!(r.header("ratelimit").is_some());

    cfg.extra = "[limits]\nheaders = \"draft\"\n".into();
    write_file(&path, &cfg.render());
    kg.server.reload().unwrap();
    let r = kg.get("/api/x", Some(TINY_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-ratelimit-remaining").is_none());
    // The bucket is the one before the reload: one more request spent.
    assert_eq!(r.header("ratelimit"), Some("\"tiny\";r=3;t=1440"));
}

#[tokio::test]
async fn a_reload_can_revoke_a_key_and_move_the_upstream() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let cfg = Cfg::new(up.addr);
    let (kg, _dir, path) = start_from_file(&cfg).await;
    assert_eq!(kg.get("/api/x", Some(BETA_KEY)).await.status, 200);
    assert_eq!(up.hits(), 1);

    // Beta's key is removed from the file (cached entries must not outlive the reload), and
    // the upstream moves.
    let mut moved = Cfg::new(other.addr);
    moved.tiny_limit = cfg.tiny_limit;
    let text = moved.render().replace(
        &sha256_hex(BETA_KEY),
        &sha256_hex("kg_beta_rotated_000000009"),
    );
    write_file(&path, &text);
    kg.server.reload().unwrap();
    kg.get("/api/x", Some(BETA_KEY))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(
        kg.get("/api/x", Some("kg_beta_rotated_000000009"))
            .await
            .status,
        200
    );
    assert_eq!((up.hits(), other.hits()), (1, 1));
}

/// A request in flight when shutdown starts is finished; new connections are refused; the
/// server returns once drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let in_flight = tokio::spawn(send(
        kg.client
            .get(kg.url("/api/slow"))
            .header("x-api-key", ALPHA_KEY),
    ));
    up.slow_arrived().await;

    kg.shutdown();
    // The listener closes: new connections are refused while the old one drains.
    let mut refused = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(kg.proxy).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "the proxy should stop accepting once shutdown starts"
    );
    assert!(
        !kg.is_finished(),
        "the server must wait for the request in flight"
    );

    up.release_slow(1);
    let r = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the request in flight should complete")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body["slow"], "released");
    let proxy = kg.proxy;
    let admin = kg.admin;
    kg.stop().await;
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener stops too"
    );
}

/// A drain is bounded by `proxy.drain_timeout`: a request that never ends does not hold the
/// process forever.
#[tokio::test]
async fn drain_is_bounded() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(r#"drain_timeout = "300ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    let client = kg.client.clone();
    let url = kg.url("/api/slow");
    let in_flight =
        tokio::spawn(async move { client.get(url).header("x-api-key", ALPHA_KEY).send().await });
    up.slow_arrived().await;
    let started = std::time::Instant::now();
    kg.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    up.release_slow(1);
    in_flight.abort();
}

/// Readiness: `/readyz` is 200 while serving, `/healthz` too.
#[tokio::test]
async fn admin_health_and_readiness() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = send(kg.client.get(kg.admin_url("/healthz"))).await;
    assert_eq!(r.status, 200);
    // The proxy may not have reached its accept loop yet; readiness flips once it has.
    let mut ready = false;
    for _ in 0..500 {
        if send(kg.client.get(kg.admin_url("/readyz"))).await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready);
    assert!(kg.server.is_ready());
    kg.stop().await;
}

/// The shipped example config loads, and its demo key authenticates (after a heartbeat, as the
/// demo walks through).
#[tokio::test]
async fn shipped_config_works() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml");
    let shipped =
        Config::load(std::path::Path::new(path)).expect("config/keygate.toml must validate");
    assert!(shipped.routes.iter().any(|r| r.public));

    let up = Upstream::start().await;
    let state = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("http://127.0.0.1:3000", &up.url())
        .replace(
            "dir = \"state\"",
            &format!("dir = {}", toml_str(&state.path().display().to_string())),
        );
    assert_ne!(text, std::fs::read_to_string(path).unwrap());
    let kg = Keygate::start(&text).await;
    let key = keygate::demo::DEMO_KEY;
    assert_eq!(key, "kg_demo_0123456789abcdef");

    kg.get("/api/posts", None)
        .await
        .assert_error(401, MISSING_KEY);
    kg.get("/api/posts", Some("wrong"))
        .await
        .assert_error(401, INVALID_KEY);
    let r = kg.get("/api/posts", Some(key)).await;
    assert_eq!(r.status, 403);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .starts_with("Plugin installation required: Please install the OutX"));
    assert_eq!(kg.post("/extension/heartbeat", Some(key)).await.status, 200);
    let r = kg.get("/api/posts", Some(key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed("x-keygate-team"), Some("demo"));
    assert_eq!(r.echoed("x-keygate-key-id"), Some("demo-key"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"free\";q=100;w=3600"));
    // Public OTP endpoints need no key; another team's resources are refused.
    assert_eq!(
        kg.post("/linkedin-agent/auth-send-otp", None).await.status,
        200
    );
    kg.get("/teams/acme/tasks", Some(key))
        .await
        .assert_error(403, ACCESS_DENIED);
    // The usage route is answered by keygate itself.
    let hits = up.hits();
    let r = kg.get("/keygate/usage", Some(key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body["team"], "demo");
    assert_eq!(r.body["plan"], "free");
    assert_eq!(up.hits(), hits);
    kg.stop().await;
}

/// While draining, readiness must say so (admin.rs: "`/readyz` — 200 once the proxy accepts, 503
/// while starting or draining"; `Server::is_ready`: "accepting and not draining"), so a load
/// balancer stops sending before the process goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_the_drain() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let in_flight = tokio::spawn(send(
        kg.client
            .get(kg.url("/api/slow"))
            .header("x-api-key", ALPHA_KEY),
    ));
    up.slow_arrived().await;
    kg.shutdown();
    kg.wait_until_refused().await;
    // Draining: the request is still in flight.
    let ready = kg.server.is_ready();
    let readyz = kg
        .client
        .get(kg.admin_url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    up.release_slow(1);
    assert_eq!(in_flight.await.unwrap().status, 200);
    kg.stop().await;
    let readyz = readyz.map_err(|e| e.to_string());
    assert!(
        !ready && readyz == Ok(503),
        "while draining: is_ready() = {ready}, /readyz = {readyz:?}"
    );
}

/// An idle keep-alive connection is closed after `proxy.idle_timeout`: one served by hyper (a
/// forwarded request) and one still in the refusal lane (only refused so far).
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(r#"idle_timeout = "300ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    for (n, (key, status)) in [
        (format!("x-api-key: {ALPHA_KEY}\r\n"), 200),
        (String::new(), 401),
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
        s.write_all(format!("GET /api/x HTTP/1.1\r\nHost: a\r\n{key}\r\n").as_bytes())
            .await
            .unwrap();
        // Read until the connection closes: the answer, then EOF once idle.
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("an idle connection should be closed")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "closed before the idle timeout"
        );
        assert_timeouts(&kg, 0, n as u32 + 1).await;
    }
}

/// `keygate_connection_timeouts_total` reads `header` and `idle`.
async fn assert_timeouts(kg: &Keygate, header: u32, idle: u32) {
    let m = kg.metrics().await;
    let count = |t: &str| {
        metric(
            &m,
            &format!(r#"keygate_connection_timeouts_total{{timeout="{t}"}}"#),
        )
    };
    assert_eq!(
        (count("header"), count("idle")),
        (Some(header.into()), Some(idle.into())),
        "{m}"
    );
}

/// keygate with a 200 ms header timeout and a 30 s idle one, and its upstream.
async fn header_timeout_200ms() -> (Upstream, Keygate) {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(r#"header_read_timeout = "200ms""#.into());
    cfg.proxy.push(r#"idle_timeout = "30s""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    (up, kg)
}

/// The header timeout does not run through the idle wait between keep-alive requests: a
/// connection idle for several header timeouts, but within the idle timeout, still serves.
/// (hyper's own timer closed it after one header timeout.)
#[tokio::test]
async fn idle_keep_alive_connections_outlive_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, kg) = header_timeout_200ms().await;
    let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let req = format!("GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n");
    for round in 0..2 {
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "round {round}: {text:?}");
        // Four header timeouts (and past the watchdog's lateness) of keep-alive idleness.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    assert_eq!(up.hits(), 2);
}

/// An HTTP/2 connection is not held to the header timeout between requests, nor before its
/// first: its frames are not a request head (HTTP/2 bounds its streams itself). One that waits
/// several header timeouts before each request is still served.
#[tokio::test]
async fn http2_connections_may_wait_between_requests_past_the_header_timeout() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (up, kg) = header_timeout_200ms().await;
    let s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let req = http::Request::get("http://localhost/api/x")
            .header("x-api-key", ALPHA_KEY)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the connection was closed: {e}"));
        assert_eq!(resp.status(), 200, "round {round}");
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(up.hits(), 2);
}

/// A connection that opens and sends nothing owes its first head within
/// `proxy.header_read_timeout`, not the (longer) idle timeout.
#[tokio::test]
async fn silent_new_connections_are_cut_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let (_up, kg) = header_timeout_200ms().await;
    let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a silent connection should be cut well before the idle timeout")
        .ok();
    assert!(out.is_empty(), "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "cut before the header timeout"
    );
    assert_timeouts(&kg, 1, 0).await;
}

/// A client that never finishes its request head is cut off after `proxy.header_read_timeout`
/// (slowloris).
#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(r#"header_read_timeout = "300ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a stalled request head should be cut off")
        .ok();
    assert!(!String::from_utf8_lossy(&out).contains(" 200 "));
    assert_eq!(up.hits(), 0);
    assert_timeouts(&kg, 1, 0).await;
}
