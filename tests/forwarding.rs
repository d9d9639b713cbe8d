//! Forwarding end to end: bodies streamed both ways without buffering, the body size limit, and
//! header hygiene on the way to the upstream.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use support::*;

const MIB: usize = 1024 * 1024;

/// A 64 MiB upload, sent in 64 KiB chunks with no Content-Length, reaches the upstream intact and
/// in many frames: keygate streams it rather than collecting it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_through() {
    const TOTAL: usize = 64 * MIB;
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(format!("max_body_bytes = {}", 128 * MIB));
    let kg = Keygate::start(&cfg.render()).await;

    let chunk_count = TOTAL / CHUNK;
    let chunk = pattern_chunk(0, CHUNK * 2);
    let mut crc = crc32fast::Hasher::new();
    for _ in 0..chunk_count {
        crc.update(&chunk);
    }
    let expected_crc = crc.finalize();
    let stream = futures_util::stream::iter(
        (0..chunk_count).map(move |_| Ok::<Bytes, Infallible>(chunk.clone())),
    );
    let r = kg.upload(reqwest::Body::wrap_stream(stream)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body["bytes"], TOTAL);
    assert_eq!(r.body["crc32"], expected_crc);
    let frames = r.body["frames"].as_u64().unwrap();
    assert!(
        frames >= 64,
        "the upstream got the body in {frames} frames; expected it streamed in many"
    );
    assert_eq!(
        up.seen
            .uploads_done
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// A large response streams back intact, in many chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_streams_back() {
    const TOTAL: usize = 16 * MIB + 123;
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let resp = kg.get_streamed(&format!("/api/big?bytes={TOTAL}")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-request-id").is_some());
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "99");
    let mut stream = resp.bytes_stream();
    let mut offset = 0usize;
    let mut chunks = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("the response body should stream without error");
        chunks += 1;
        for (i, b) in chunk.iter().enumerate() {
            if *b != pattern_byte(offset + i) {
                panic!("byte {} differs", offset + i);
            }
        }
        offset += chunk.len();
    }
    assert_eq!(offset, TOTAL);
    assert!(
        chunks > 16,
        "{chunks} chunks: the response should arrive streamed, not in one piece"
    );
}

/// A body declared over `proxy.max_body_bytes` is refused with 413 before anything is forwarded.
#[tokio::test]
async fn declared_body_over_the_limit_is_413() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("max_body_bytes = 1024".into());
    let kg = Keygate::start(&cfg.render()).await;
    let r = kg.upload(vec![7u8; 2048]).await;
    r.assert_error(413, r#"{"error":"Payload Too Large"}"#);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(
        up.hits(),
        0,
        "the upstream must see nothing of a refused body"
    );
    // At the limit it passes.
    let r = kg.upload(vec![7u8; 1024]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["bytes"], 1024);
}

/// A streamed (chunked) body that grows past the limit is cut off with 413, and the upstream
/// never gets it whole.
#[tokio::test]
async fn streamed_body_over_the_limit_is_413() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("max_body_bytes = 1024".into());
    let kg = Keygate::start(&cfg.render()).await;
    let stream =
        futures_util::stream::iter([Ok::<Bytes, Infallible>(Bytes::from(vec![1u8; 3000]))]);
    let r = kg.upload(reqwest::Body::wrap_stream(stream)).await;
    r.assert_error(413, r#"{"error":"Payload Too Large"}"#);
    assert_eq!(
        up.seen
            .uploads_done
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// What the upstream is told: no hop-by-hop fields, no credentials, no spoofed identity, the
/// peer's address rather than the client's claim, and a request id.
#[tokio::test]
async fn header_hygiene() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.sources = r#"["x-api-key", "bearer"]"#.into();
    let kg = Keygate::start(&cfg.render()).await;
    let request = format!(
        "GET /api/hygiene?q=1 HTTP/1.1\r\n\
         Host: api.example\r\n\
         Connection: close, x-secret-hop\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Trailer: x-checksum\r\n\
         Proxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         X-Secret-Hop: must-not-pass\r\n\
         x-api-key: {ALPHA_KEY}\r\n\
         Authorization: Bearer {ALPHA_KEY}\r\n\
         x_api_key: {BETA_KEY}\r\n\
         x-keygate-team: beta\r\n\
         x-keygate-key-id: beta-key\r\n\
         x-keygate-plan: enterprise\r\n\
         x-keygate-admin: yes\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         Forwarded: for=6.6.6.6\r\n\
         X-Forwarded-Host: evil.example\r\n\
         X-Request-Id: spoofed\r\n\
         Accept: application/json\r\n\
         X-Custom: kept\r\n\
         \r\n"
    );
    let raw = raw_request(kg.proxy, request.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let h = up.last_headers();
    for gone in [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "x-secret-hop",
        "x-api-key",
        "authorization",
        "x_api_key",
        "x-keygate-admin",
        "forwarded",
        "x-forwarded-host",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(h["x-keygate-team"], "alpha");
    assert_eq!(h["x-keygate-key-id"], "alpha-key");
    assert_eq!(h["x-keygate-plan"], "free");
    // keygate's own fields are written after the client's: each must reach the upstream
    // exactly once, the client's copies gone.
    for ours in [
        "x-keygate-team",
        "x-keygate-key-id",
        "x-keygate-plan",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "host",
    ] {
        assert_eq!(h.get_all(ours).iter().count(), 1, "{ours}: {h:?}");
    }
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "the client's X-Forwarded-For is not trusted by default"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["host"], "api.example", "preserve_host is the default");
    assert_eq!(h["accept"], "application/json");
    assert_eq!(h["x-custom"], "kept");
    let id = h["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "spoofed");
    assert_eq!(id.len(), 24, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // The client is told the same request id.
    assert!(
        raw.to_ascii_lowercase()
            .contains(&format!("x-request-id: {id}")),
        "{raw}"
    );
    assert_eq!(up.last_path().as_deref(), Some("/api/hygiene"));

    // Request ids differ per request.
    let r = kg.get("/api/again", Some(ALPHA_KEY)).await;
    assert_ne!(r.echoed("x-request-id"), Some(id.as_str()));
}

/// With bearer configured, `Authorization: Bearer` authenticates and is not forwarded; another
/// scheme is the upstream's business and passes through, but is not a key.
#[tokio::test]
async fn bearer_credentials() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.sources = r#"["x-api-key", "bearer"]"#.into();
    let kg = Keygate::start(&cfg.render()).await;
    let r = send(kg.client.get(kg.url("/api/b")).bearer_auth(BETA_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed("x-keygate-team"), Some("beta"));
    assert_eq!(r.echoed("authorization"), None);
    let r = send(
        kg.client
            .get(kg.url("/api/b"))
            .basic_auth("user", Some("pass")),
    )
    .await;
    r.assert_error(401, MISSING_KEY);
    // Two sources that disagree are ambiguous.
    let r = send(
        kg.client
            .get(kg.url("/api/b"))
            .bearer_auth(BETA_KEY)
            .header("x-api-key", ALPHA_KEY),
    )
    .await;
    r.assert_error(401, INVALID_KEY);
    assert_eq!(up.hits(), 1);
}

/// `proxy.trust_forwarded = true` (keygate behind another proxy) appends the peer instead.
#[tokio::test]
async fn trusted_forwarding_appends_the_peer() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("trust_forwarded = true".into());
    let kg = Keygate::start(&cfg.render()).await;
    let r = send(
        kg.client
            .get(kg.url("/api/t"))
            .header("x-api-key", ALPHA_KEY)
            .header("x-forwarded-for", "10.1.2.3"),
    )
    .await;
    assert_eq!(r.echoed("x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
    let h = up.last_headers();
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1, "{h:?}");
}

/// `upstream.preserve_host = false`: the upstream gets its own authority as `Host`, once, in
/// place of the client's.
#[tokio::test]
async fn the_upstream_host_replaces_the_clients_when_not_preserved() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.upstream_extra.push("preserve_host = false".into());
    let kg = Keygate::start(&cfg.render()).await;
    let raw = raw_request(
        kg.proxy,
        format!(
            "GET /api/h HTTP/1.1\r\nHost: api.example\r\nx-api-key: {ALPHA_KEY}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let h = up.last_headers();
    assert_eq!(
        h.get_all("host").iter().collect::<Vec<_>>(),
        [up.addr.to_string().as_str()]
    );
}

/// The query string and method pass through; the answer's own hop-by-hop fields do not come back.
#[tokio::test]
async fn method_path_and_query_pass_through() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = send(
        kg.client
            .put(kg.url("/api/items/42?expand=all&x=%20y"))
            .header("x-api-key", ALPHA_KEY)
            .body("hello"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["method"], "PUT");
    assert_eq!(r.body["path"], "/api/items/42");
    assert_eq!(r.body["query"], "expand=all&x=%20y");
    assert_eq!(r.body["body_bytes"], 5);
}

/// The upstream's answers pass through as they are, errors included, minus hop-by-hop fields.
#[tokio::test]
async fn upstream_answers_pass_through_without_hop_by_hop_fields() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = kg.get("/api/teapot", Some(ALPHA_KEY)).await;
    assert_eq!(
        r.status, 418,
        "an upstream error is the upstream's answer, not keygate's"
    );
    assert_eq!(r.body, serde_json::json!({ "upstream": "short and stout" }));
    assert_eq!(r.header("x-upstream"), Some("yes"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));

    let r = kg.get("/api/hop", Some(ALPHA_KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("yes"));
    for gone in ["x-upstream-secret", "keep-alive", "proxy-authenticate"] {
        assert!(
            r.header(gone).is_none(),
            "{gone} came back to the client: {:?}",
            r.headers
        );
    }
}

/// A credential header the client itself names in `Connection` is hop-by-hop: it is neither
/// used nor forwarded.
#[tokio::test]
async fn a_key_named_in_connection_is_not_used() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let raw = raw_request(
        kg.proxy,
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close, x-api-key\r\nx-api-key: {ALPHA_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert!(raw.ends_with(MISSING_KEY), "{raw}");
    assert_eq!(up.hits(), 0);
}

/// The upstream pool keeps connections alive: sequential requests, with bodies read to the end,
/// reuse one upstream connection; an upstream error answer does not cost a new one either.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    assert_eq!(kg.heartbeat(ALPHA_KEY).await.status, 200);
    for _ in 0..20 {
        assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    }
    assert_eq!(kg.get("/api/teapot", Some(ALPHA_KEY)).await.status, 418);
    assert_eq!(kg.get("/api/y", Some(ALPHA_KEY)).await.status, 200);
    let text = kg.metrics().await;
    assert_eq!(
        metric(&text, "keygate_upstream_connections_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(up.hits(), 23);
}

/// A WebSocket-style upstream: answers an upgrade with 101 and then echoes bytes back. Returns
/// its address and, once a request arrives, the request head it saw.
async fn upgrade_upstream() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await.unwrap();
        let _ = tx.send(head);
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
            }
        }
    });
    (addr, rx)
}

fn with_ws_route(mut cfg: Cfg) -> String {
    cfg.routes = format!(
        "[[routes]]\nname = \"ws\"\npath = \"/ws/*\"\nupgrade = true\n{}",
        cfg.routes
    );
    cfg.render()
}

/// Sends a WebSocket handshake with alpha's key; the stream once the 101 is read, and its head
/// in lower case.
async fn open_tunnel(kg: &Keygate) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET /ws/chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             x-api-key: {ALPHA_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = read_head(&mut s).await.unwrap().to_ascii_lowercase();
    assert!(resp.starts_with("http/1.1 101"), "{resp}");
    (s, resp)
}

/// A drain waits for open tunnels as for requests in flight: once shutdown begins the listener
/// closes, but an open tunnel still carries bytes and the server does not finish until it
/// closes (well within the drain timeout).
#[tokio::test]
async fn a_drain_waits_for_open_tunnels() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _head) = upgrade_upstream().await;
    let mut cfg = Cfg::new(up);
    cfg.proxy.push(r#"drain_timeout = "60s""#.into());
    let kg = Keygate::start(&with_ws_route(cfg)).await;
    let (mut s, _) = open_tunnel(&kg).await;
    kg.shutdown();
    poll_until(Duration::from_secs(5), "the listener to close", || async {
        tokio::net::TcpStream::connect(kg.proxy)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // Time for a drain with nothing to wait for to have finished.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!kg.is_finished(), "the drain must wait for the open tunnel");
    s.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still here");
    drop(s);
    // Within `stop`'s 10 s, far inside the 60 s drain timeout: the tunnel's end ended it.
    kg.stop().await;
}

/// On a route with `upgrade = true`, a WebSocket handshake reaches the upstream with its
/// `Upgrade`/`Connection` pair (and without the key), the 101 comes back, and bytes then flow
/// both ways through the tunnel, which the gauge counts while it is open.
#[tokio::test]
async fn a_websocket_upgrade_is_tunnelled_on_an_upgrade_route() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, head) = upgrade_upstream().await;
    let kg = Keygate::start(&with_ws_route(Cfg::new(up))).await;
    let (mut s, resp) = open_tunnel(&kg).await;
    assert!(resp.contains("upgrade: websocket"), "{resp}");
    assert!(resp.contains("connection: upgrade"), "{resp}");
    assert!(
        resp.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{resp}"
    );
    let seen = head.await.unwrap().to_ascii_lowercase();
    assert!(seen.starts_with("get /ws/chat http/1.1"), "{seen}");
    assert!(seen.contains("upgrade: websocket"), "{seen}");
    assert!(seen.contains("connection: upgrade"), "{seen}");
    assert!(seen.contains("x-keygate-team: alpha"), "{seen}");
    assert!(
        !seen.contains(&ALPHA_KEY.to_ascii_lowercase()),
        "the key must not cross: {seen}"
    );
    for msg in [&b"ping"[..], &[0x81, 0x02, b'h', b'i'][..]] {
        s.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, msg);
    }
    assert_eq!(
        metric(&kg.metrics().await, "keygate_tunnels_open"),
        Some(1.0)
    );
    drop(s);
    poll_until(Duration::from_secs(5), "the tunnel to close", || async {
        (metric(&kg.metrics().await, "keygate_tunnels_open") == Some(0.0)).then_some(())
    })
    .await;
}

/// An upgrade route still authenticates first, and an upstream that declines the upgrade
/// answers as usual.
#[tokio::test]
async fn an_upgrade_route_still_needs_a_key_and_a_declined_upgrade_is_an_ordinary_answer() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&with_ws_route(Cfg::new(up.addr))).await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade, close\r\n";
    let raw = raw_request(
        kg.proxy,
        format!("GET /ws/chat HTTP/1.1\r\nHost: a\r\n{upgrade}\r\n").as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert!(raw.ends_with(MISSING_KEY), "{raw}");
    assert_eq!(up.hits(), 0);
    // The plain test upstream knows nothing of WebSocket: its 200 comes back as is.
    let raw = raw_request(
        kg.proxy,
        format!("GET /ws/chat HTTP/1.1\r\nHost: a\r\n{upgrade}x-api-key: {ALPHA_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(up.hits(), 1);
    // The same handshake on a route without `upgrade` is refused before the upstream.
    let raw = raw_request(
        kg.proxy,
        format!("GET /api/chat HTTP/1.1\r\nHost: a\r\n{upgrade}x-api-key: {ALPHA_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(up.hits(), 1);
}
