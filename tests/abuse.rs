//! Hostile input end to end, against a real keygate and a real upstream: odd keys, oversized
//! heads, request smuggling, slow clients, connection floods, HTTP/2 reset and CONTINUATION
//! floods, forbidden upgrades, spoofed identity headers, near-miss keys and key spraying.
//!
//! Every case checks that nothing (or nothing whole) reached the upstream, and where it matters
//! that keygate still serves a valid key afterwards. Cases covered elsewhere are not repeated:
//! Content-Length with Transfer-Encoding, the Host checks and a websocket upgrade with
//! `Connection: Upgrade` (errors.rs); idle keep-alive and a stalled request head (lifecycle.rs);
//! 413s, header hygiene and a key named in `Connection` (forwarding.rs).
//!
//! Not JSON: requests hyper's HTTP/1 parser refuses before keygate runs (a control character,
//! an over-long head or URI, conflicting lengths) get hyper's own empty 400/414/431 and a closed
//! connection; these tests assert the status and the close.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BAD_REQUEST: &str = r#"{"error":"Bad Request"}"#;
const REQUEST_TIMEOUT: &str = r#"{"error":"Request Timeout: the request body stalled"}"#;
const TOO_MANY_FAILED: &str = r#"{"error":"Too Many Requests: too many failed authentications"}"#;

/// A valid key still passes end to end: keygate is healthy after the abuse.
async fn assert_healthy(kg: &Keygate, up: &Upstream) {
    let before = up.hits();
    let r = kg.get("/api/healthy", Some(BETA_KEY)).await;
    assert_eq!(
        r.status,
        200,
        "keygate should still serve a valid key: {}",
        r.text()
    );
    assert_eq!(r.echoed("x-keygate-team"), Some("beta"));
    assert_eq!(up.hits(), before + 1);
}

/// `GET path` with `Connection: close` and the given extra header lines (each ending in CRLF).
fn get_close(path: &str, extra: &[u8]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n").into_bytes();
    r.extend_from_slice(extra);
    r.extend_from_slice(b"\r\n");
    r
}

/// An `x-api-key` line with arbitrary bytes as the value.
fn key_line(key: &[u8]) -> Vec<u8> {
    let mut l = b"x-api-key: ".to_vec();
    l.extend_from_slice(key);
    l.extend_from_slice(b"\r\n");
    l
}

/// The answer to one raw request sent on its own connection.
async fn raw_answer(kg: &Keygate, request: &[u8]) -> RawAnswer {
    let raw = raw_until_closed(kg.proxy, request).await;
    RawAnswer::parse(&raw).unwrap_or_else(|| {
        panic!(
            "no HTTP answer to {:?}; got {raw:?}",
            String::from_utf8_lossy(request)
        )
    })
}

async fn store_lookups(kg: &Keygate) -> f64 {
    metric(&kg.metrics().await, "keygate_store_lookups_total").unwrap()
}

fn uploads_done(up: &Upstream) -> usize {
    up.seen.uploads_done.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// 1. Keys

/// Malformed keys (bytes outside printable ASCII, over `credentials.max_key_length`) are
/// *invalid* and refused before any lookup; a key exactly at the length bound is well formed
/// and looked up.
#[tokio::test]
async fn malformed_keys_are_401_without_a_lookup() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // UTF-8 (é) after a valid key: obs-text to HTTP, which hyper passes on.
        ("utf-8", [ALPHA_KEY.as_bytes(), b"\xc3\xa9"].concat()),
        ("obs-text", [ALPHA_KEY.as_bytes(), b"\xff"].concat()),
        (
            "obs-text inside",
            b"kg_alpha_\x80\x81000000000000001".to_vec(),
        ),
        ("tab inside", b"kg_alpha\t0000000000000001".to_vec()),
        // The default bound is 256.
        ("257 bytes", vec![b'k'; 257]),
        ("8 KiB", vec![b'k'; 8 * 1024]),
    ];
    let lookups = store_lookups(&kg).await;
    for (what, key) in &cases {
        let r = raw_answer(&kg, &get_close("/api/x", &key_line(key))).await;
        assert_eq!(r.status, 401, "{what}: {}{}", r.head, r.body);
        r.assert_error(401, INVALID_KEY);
    }
    assert_eq!(
        store_lookups(&kg).await,
        lookups,
        "a malformed key must be refused before any lookup"
    );
    // At the bound it is well formed: looked up (once), and unknown.
    let at_bound = "k".repeat(256);
    kg.get("/api/x", Some(&at_bound))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(store_lookups(&kg).await, lookups + 1.0);
    assert_eq!(up.hits(), 0);
    assert_healthy(&kg, &up).await;
}

/// Control characters in a field value are refused by the HTTP parser itself (400, connection
/// closed), before keygate sees the request.
#[tokio::test]
async fn control_characters_in_a_key_are_refused() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    for ctl in [0x01u8, 0x00, 0x7f, 0x1b, b'\r'] {
        let key = format!("kg_alpha_{}0000000000000001", ctl as char).into_bytes();
        let raw = raw_until_closed(kg.proxy, &get_close("/api/x", &key_line(&key))).await;
        let r = RawAnswer::parse(&raw).unwrap_or_else(|| panic!("{ctl:?}: no answer: {raw:?}"));
        assert_eq!(r.status, 400, "{ctl:?}: {raw}");
    }
    assert_eq!(up.hits(), 0);
    assert_healthy(&kg, &up).await;
}

/// Whitespace around a field value is not part of it (RFC 9110 §5.5: optional whitespace), so a
/// padded key is the key; whitespace alone is no key at all.
#[tokio::test]
async fn padding_around_a_key_is_not_part_of_it() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    for padded in [
        format!("x-api-key:    {ALPHA_KEY}\r\n"),
        format!("x-api-key: {ALPHA_KEY}  \t \r\n"),
        format!("x-api-key:\t{ALPHA_KEY}\t\r\n"),
    ] {
        let r = raw_answer(&kg, &get_close("/api/padded", padded.as_bytes())).await;
        assert_eq!(r.status, 200, "{padded:?}: {}{}", r.head, r.body);
        assert_eq!(up.last_headers()["x-keygate-team"], "alpha");
    }
    assert_eq!(up.hits(), 3);
    // A padded unknown key is an unknown key, not a missing one.
    raw_answer(
        &kg,
        &get_close("/api/x", b"x-api-key:   kg_nobody_000000000000000  \r\n"),
    )
    .await
    .assert_error(401, INVALID_KEY);
    raw_answer(&kg, &get_close("/api/x", b"x-api-key:    \t  \r\n"))
        .await
        .assert_error(401, MISSING_KEY);
    assert_eq!(up.hits(), 3);
}

/// The credential rules of `src/gate/credential.rs` with both sources configured: a source sent
/// twice is ambiguous (*invalid*) even if the copies agree or one is empty; two sources that
/// agree are one key; an empty value or a bearer without a token is no key; another
/// `Authorization` scheme is not a key and does not conflict.
#[tokio::test]
async fn duplicate_and_conflicting_credentials() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.sources = r#"["x-api-key", "bearer"]"#.into();
    let kg = Keygate::start(&cfg.render()).await;
    let refused: Vec<(String, &str)> = vec![
        (
            format!("x-api-key: {ALPHA_KEY}\r\nx-api-key: {BETA_KEY}\r\n"),
            INVALID_KEY,
        ),
        (
            format!("x-api-key: \r\nx-api-key: {ALPHA_KEY}\r\n"),
            INVALID_KEY,
        ),
        (
            format!("Authorization: Bearer {ALPHA_KEY}\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"),
            INVALID_KEY,
        ),
        (
            format!("Authorization: Bearer {ALPHA_KEY}\r\nAuthorization: Basic dXNlcjpw\r\n"),
            INVALID_KEY,
        ),
        ("Authorization: Bearer\r\n".into(), MISSING_KEY),
        ("Authorization: Bearer    \r\n".into(), MISSING_KEY),
        ("Authorization: Bearer\t\r\n".into(), MISSING_KEY),
        ("Authorization: Token abc\r\n".into(), MISSING_KEY),
        (
            "x-api-key: \r\nAuthorization: Bearer \r\n".into(),
            MISSING_KEY,
        ),
        (
            format!("Authorization: Bearer {ALPHA_KEY} extra\r\n"),
            INVALID_KEY,
        ),
    ];
    for (headers, body) in &refused {
        let r = raw_answer(&kg, &get_close("/api/x", headers.as_bytes())).await;
        assert_eq!(r.status, 401, "{headers:?}: {}{}", r.head, r.body);
        r.assert_error(401, body);
    }
    assert_eq!(up.hits(), 0, "no refused request may reach the upstream");

    let granted = [
        // The same key in both sources.
        format!("x-api-key: {ALPHA_KEY}\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"),
        format!("x-api-key: {ALPHA_KEY}\r\nAuthorization: bearer   {ALPHA_KEY}\r\n"),
        // An empty source is skipped, not a disagreement.
        format!("x-api-key: \r\nAuthorization: Bearer {ALPHA_KEY}\r\n"),
        // Another scheme is not a key of ours.
        format!("x-api-key: {ALPHA_KEY}\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"),
    ];
    for headers in &granted {
        let r = raw_answer(&kg, &get_close("/api/x", headers.as_bytes())).await;
        assert_eq!(r.status, 200, "{headers:?}: {}{}", r.head, r.body);
        let h = up.last_headers();
        assert_eq!(h["x-keygate-team"], "alpha");
        assert!(
            h.get("x-api-key").is_none() && h.get("authorization").is_none(),
            "credential headers reached the upstream: {h:?}"
        );
    }
    assert_eq!(up.hits(), granted.len());
}

// ---------------------------------------------------------------------------------------------
// 9. Near misses: nothing short-circuits on a shared prefix

/// A key one character off a valid one, a prefix of one, and one a character longer are answered
/// exactly like a random unknown key (status, body, header names) and each costs the same one
/// cache miss and one store lookup: nothing is decided on a shared prefix.
#[tokio::test]
async fn near_miss_keys_are_treated_like_random_keys() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    let last_changed = format!("{}2", &ALPHA_KEY[..ALPHA_KEY.len() - 1]);
    let prefix = ALPHA_KEY[..ALPHA_KEY.len() - 1].to_owned();
    let longer = format!("{ALPHA_KEY}1");
    let first_changed = format!("x{}", &ALPHA_KEY[1..]);
    let random = "kg_zq81mv0c7hx4ud9s2ewbnp".to_owned();
    assert_eq!(random.len(), ALPHA_KEY.len());

    let mut answers = Vec::new();
    for key in [&random, &last_changed, &prefix, &longer, &first_changed] {
        let m = kg.metrics().await;
        let (lookups, misses) = (
            metric(&m, "keygate_store_lookups_total").unwrap(),
            metric(&m, r#"keygate_key_cache_requests_total{result="miss"}"#).unwrap_or(0.0),
        );
        let r = kg.get("/api/x", Some(key)).await;
        r.assert_error(401, INVALID_KEY);
        let m = kg.metrics().await;
        assert_eq!(
            metric(&m, "keygate_store_lookups_total").unwrap() - lookups,
            1.0,
            "{key}: one store lookup, like any unknown key"
        );
        assert_eq!(
            metric(&m, r#"keygate_key_cache_requests_total{result="miss"}"#).unwrap() - misses,
            1.0,
            "{key}: one cache miss"
        );
        let mut names: Vec<String> = r
            .headers
            .keys()
            .map(|n| n.as_str().to_owned())
            .filter(|n| n != "date")
            .collect();
        names.sort();
        answers.push((key.clone(), r.status, r.raw.clone(), names));
    }
    let (_, status, body, names) = &answers[0];
    for (key, s, b, n) in &answers[1..] {
        assert_eq!(
            (s, b, n),
            (status, body, names),
            "{key} answered unlike a random key"
        );
    }
    assert_eq!(up.hits(), 1);
}

/// The same for keys in keygate's issued format, where the checksum is checked before any
/// lookup: a near miss with a valid checksum is looked up like a random key with a valid
/// checksum, and a near miss that breaks the checksum is refused without a lookup like a random
/// key with a broken one. Same answer in all four cases.
#[tokio::test]
async fn issued_format_near_misses_are_treated_like_random_keys() {
    use keygate::gate::credential::{checksum, issue};
    let up = Upstream::start().await;
    let issued = issue("sk_live_");
    // Alpha's declared key becomes an issued-format one.
    let toml = base_toml(up.addr).replace(&sha256_hex(ALPHA_KEY), &sha256_hex(&issued));
    let kg = Keygate::start(&toml).await;
    assert_eq!(kg.get("/api/x", Some(&issued)).await.status, 200);

    let with_checksum = |random: &str| {
        let sum = checksum(b"sk_live_", random.as_bytes());
        format!("sk_live_{random}{}", std::str::from_utf8(&sum).unwrap())
    };
    let random_part = &issued[8..30];
    let mut near = random_part.as_bytes().to_vec();
    near[21] = if near[21] == b'a' { b'b' } else { b'a' };
    let near_valid = with_checksum(std::str::from_utf8(&near).unwrap());
    let random_valid = with_checksum("Zz0Yy1Xx2Ww3Vv4Uu5Tt6S");
    let mut near_broken = issued.clone().into_bytes();
    let last = near_broken.len() - 1;
    near_broken[last] = if near_broken[last] == b'a' {
        b'b'
    } else {
        b'a'
    };
    let near_broken = String::from_utf8(near_broken).unwrap();
    let random_broken = "sk_live_Zz0Yy1Xx2Ww3Vv4Uu5Tt6S000000".to_owned();
    assert_ne!(random_broken, with_checksum("Zz0Yy1Xx2Ww3Vv4Uu5Tt6S"));

    for (key, lookups) in [
        (&random_valid, 1.0),
        (&near_valid, 1.0),
        (&random_broken, 0.0),
        (&near_broken, 0.0),
    ] {
        let before = store_lookups(&kg).await;
        kg.get("/api/x", Some(key))
            .await
            .assert_error(401, INVALID_KEY);
        assert_eq!(store_lookups(&kg).await - before, lookups, "{key}");
    }
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// 10. Key spraying

/// One address spraying 2,000 random well-formed keys: the failed-authentication budget blocks
/// it after `failed_auth_per_minute` failures, so the store is asked a bounded number of times;
/// its own uncached keys get 429 while blocked, and a client at another address is not affected
/// (its uncached valid key passes, its unknown key is a plain 401).
#[tokio::test]
async fn spraying_random_keys_costs_bounded_lookups_and_spares_other_addresses() {
    const BUDGET: usize = 20;
    const SPRAY: usize = 2_000;
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.extra = format!("[limits]\nfailed_auth_per_minute = {BUDGET}\n");
    let kg = Keygate::start(&cfg.render()).await;
    let lookups = store_lookups(&kg).await;
    let mut attacker = H1Conn::on(connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), kg.proxy).await);
    let (mut invalid, mut blocked) = (0, 0);
    for i in 0..SPRAY {
        let key = format!(
            "kg_spray_{:016x}",
            (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        attacker
            .send(format!("GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {key}\r\n\r\n").as_bytes())
            .await;
        let r = attacker.answer().await;
        match r.status {
            401 => {
                r.assert_error(401, INVALID_KEY);
                invalid += 1;
            }
            429 => {
                r.assert_error(429, TOO_MANY_FAILED);
                blocked += 1;
            }
            s => panic!("unexpected {s}: {}{}", r.head, r.body),
        }
    }
    let spent = store_lookups(&kg).await - lookups;
    assert!(
        spent <= (BUDGET + 1) as f64,
        "{SPRAY} random keys cost {spent} store lookups; the budget is {BUDGET}"
    );
    assert!(invalid <= BUDGET + 1, "{invalid} answered 401");
    assert_eq!(invalid + blocked, SPRAY);

    // The blocked address: its uncached keys get 429, valid or not.
    attacker
        .send(format!("GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {TINY_KEY}\r\n\r\n").as_bytes())
        .await;
    attacker.answer().await.assert_error(429, TOO_MANY_FAILED);

    // Another client address: unaffected.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut client = H1Conn::on(connect_from(other, kg.proxy).await);
    client
        .send(
            format!("GET /api/legit HTTP/1.1\r\nHost: a\r\nx-api-key: {BETA_KEY}\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let r = client.answer().await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.body);
    assert_eq!(up.last_headers()["x-forwarded-for"], "127.0.0.2");
    client
        .send(b"GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: kg_other_000000000000000\r\n\r\n")
        .await;
    client.answer().await.assert_error(401, INVALID_KEY);
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// 2. Head limits

/// A request line longer than the head budget is refused as a too-large head (431); one longer
/// than hyper's URI limit (64 KiB) with a larger budget is 414. The connection is closed either
/// way, so a request pipelined behind it is never read.
#[tokio::test]
async fn an_oversized_request_line_is_refused_and_closes() {
    let up = Upstream::start().await;
    for (budget, uri_len, status) in [(8192usize, 10_000usize, 431u16), (128 * 1024, 70_000, 414)] {
        let before = up.hits();
        let mut cfg = Cfg::new(up.addr);
        cfg.proxy.push(format!("max_header_bytes = {budget}"));
        let kg = Keygate::start(&cfg.render()).await;
        let request = format!(
            "GET /api/{} HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n\
             GET /api/pipelined HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n",
            "u".repeat(uri_len)
        );
        let raw = raw_until_closed(kg.proxy, request.as_bytes()).await;
        let r = RawAnswer::parse(&raw).unwrap_or_else(|| panic!("no answer: {raw:?}"));
        assert_eq!(
            r.status, status,
            "URI of {uri_len} bytes, budget {budget}: {raw}"
        );
        assert_eq!(
            raw.matches("HTTP/1.1 ").count(),
            1,
            "one answer only: {raw}"
        );
        assert_eq!(
            up.hits(),
            before,
            "the oversized or the pipelined request was forwarded"
        );
        assert_healthy(&kg, &up).await;
    }
}

/// Header fields that together exceed `proxy.max_header_bytes` are 431, the connection is
/// closed, and nothing pipelined behind them is read.
#[tokio::test]
async fn headers_over_the_byte_budget_are_431_and_close() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("max_header_bytes = 16384".into());
    let kg = Keygate::start(&cfg.render()).await;
    // 40 fields (under max_headers) of 500 bytes: 20 KB.
    let mut request = format!("GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n");
    for i in 0..40 {
        request.push_str(&format!("x-pad-{i:02}: {}\r\n", "p".repeat(488)));
    }
    request.push_str("\r\n");
    request.push_str(&format!(
        "GET /api/pipelined HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"
    ));
    let raw = raw_until_closed(kg.proxy, request.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
    assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{raw}");
    assert_eq!(up.hits(), 0);
    // Under the budget the same kind of request passes.
    let mut request = format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nx-api-key: {ALPHA_KEY}\r\n"
    );
    for i in 0..20 {
        request.push_str(&format!("x-pad-{i:02}: {}\r\n", "p".repeat(488)));
    }
    request.push_str("\r\n");
    assert_eq!(raw_answer(&kg, request.as_bytes()).await.status, 200);
    assert_eq!(up.hits(), 1);
}

/// More header fields than `proxy.max_headers` is 431 and the connection is closed.
#[tokio::test]
async fn more_headers_than_max_headers_is_431_and_closes() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("max_headers = 20".into());
    let kg = Keygate::start(&cfg.render()).await;
    let request = |n: usize| {
        let mut r = format!("GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n");
        for i in 0..n {
            r.push_str(&format!("x-h{i}: v\r\n"));
        }
        r + "\r\n"
    };
    let raw = raw_until_closed(
        kg.proxy,
        (request(30)
            + &format!("GET /api/pipelined HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n"))
            .as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
    assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{raw}");
    assert_eq!(up.hits(), 0);
    // 2 + 15 fields fit.
    let mut c = H1Conn::connect(kg.proxy).await;
    c.send(request(15).as_bytes()).await;
    assert_eq!(c.answer().await.status, 200);
    assert_eq!(up.hits(), 1);
}

/// `proxy.max_header_bytes` cannot go below hyper's smallest HTTP/1 read buffer (8 KiB), where
/// it would not hold: such a config is refused with the field named.
#[test]
fn a_head_budget_below_8_kib_is_refused_at_load() {
    let mut cfg = Cfg::new("127.0.0.1:1");
    cfg.proxy.push("max_header_bytes = 2048".into());
    let e = keygate::config::Config::from_toml(&cfg.render())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("proxy.max_header_bytes") && e.contains("8192"),
        "{e}"
    );
    cfg.proxy.pop();
    cfg.proxy.push("max_header_bytes = 8192".into());
    assert!(keygate::config::Config::from_toml(&cfg.render()).is_ok());
}

/// `proxy.max_headers` holds over HTTP/2 too (hyper's HTTP/2 side only bounds the bytes): 431 JSON,
/// nothing forwarded.
#[tokio::test]
async fn max_headers_is_enforced_on_http2() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("max_headers = 20".into());
    let kg = Keygate::start(&cfg.render()).await;
    let mut headers = vec![("x-api-key".to_owned(), ALPHA_KEY.to_owned())];
    headers.extend((0..40).map(|i| (format!("x-h{i}"), "v".to_owned())));
    let status = match h2_get(&kg, "/api/many", &headers).await {
        Ok((status, _)) => status,
        Err(e) => panic!("the HTTP/2 request failed: {e}"),
    };
    assert_eq!(
        up.hits(),
        0,
        "a request over max_headers reached the upstream"
    );
    assert_eq!(status, 431);
}

// ---------------------------------------------------------------------------------------------
// 3. Smuggling

/// Content-Lengths that disagree (two fields, or a list) or that are not plain digits are
/// refused with 400 and the connection is closed: the bytes behind them, which a server reading
/// another length would take for a second request, are never read.
#[tokio::test]
async fn conflicting_content_lengths_are_400_and_close() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let smuggled =
        format!("GET /api/smuggled HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n");
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 6\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: 5 6\r\n",
    ] {
        let request = format!(
            "POST /api/upload HTTP/1.1\r\nHost: a\r\n{lengths}x-api-key: {ALPHA_KEY}\r\n\r\nhelloX{smuggled}"
        );
        let raw = raw_until_closed(kg.proxy, request.as_bytes()).await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{lengths:?}: {raw}");
        assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{lengths:?}: {raw}");
        assert_eq!(up.hits(), 0, "{lengths:?} reached the upstream");
    }
    assert_healthy(&kg, &up).await;
}

/// Repeated framing fields that agree are read as one framing, and the upstream gets exactly one
/// (re-made by keygate) with the body the client framed: nothing for two parsers to disagree on.
#[tokio::test]
async fn agreeing_repeated_framing_is_forwarded_as_one() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    for (framing, body) in [
        ("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let before = up.hits();
        let request = format!(
            "POST /api/upload HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{framing}x-api-key: {ALPHA_KEY}\r\n\r\n{body}"
        );
        let r = raw_answer(&kg, request.as_bytes()).await;
        if r.status == 400 {
            r.assert_error(400, BAD_REQUEST);
            assert_eq!(up.hits(), before);
            continue;
        }
        assert_eq!(r.status, 200, "{framing:?}: {}{}", r.head, r.body);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["bytes"], 5, "{framing:?}");
        let h = up.last_headers();
        let lengths = h.get_all("content-length").iter().count();
        let encodings = h.get_all("transfer-encoding").iter().count();
        assert!(
            lengths + encodings == 1,
            "{framing:?}: the upstream got {lengths} Content-Length and {encodings} Transfer-Encoding fields"
        );
    }
}

/// A chunked body with broken framing (a bad size, a missing CRLF, an overflowing size, bare
/// LFs) ends the exchange and the connection: a request pipelined behind it never reaches the
/// upstream and is never answered, and no upload reaches the upstream whole. The broken
/// request's head may have been forwarded already (bodies stream), so the upstream sees at most
/// that one.
#[tokio::test]
async fn malformed_chunked_bodies_smuggle_nothing() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let smuggled =
        format!("GET /api/smuggled HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n");
    for body in [
        "zz\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX0\r\n\r\n",
        "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "5\nhello\n0\n\n",
        "5 5\r\nhello\r\n0\r\n\r\n",
    ] {
        let before = up.hits();
        let request = format!(
            "POST /api/upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nx-api-key: {ALPHA_KEY}\r\n\r\n{body}{smuggled}"
        );
        let raw = raw_until_closed(kg.proxy, request.as_bytes()).await;
        assert!(raw.matches("HTTP/1.1 ").count() <= 1, "{body:?}: {raw}");
        if let Some(r) = RawAnswer::parse(&raw) {
            assert!(r.status >= 400, "{body:?} was accepted: {raw}");
        }
        // A head that was forwarded may reach the upstream after the client has its answer;
        // its connection is not reused, so once it has ended the count is complete.
        poll_until(
            Duration::from_secs(5),
            "the upstream connection ended",
            || async { (up.open_connections() == 0).then_some(()) },
        )
        .await;
        let seen = up.hits() - before;
        assert!(seen <= 1, "{body:?}: the upstream saw {seen} requests");
        if seen == 1 {
            assert_eq!(up.last_path().as_deref(), Some("/api/upload"), "{body:?}");
        }
        assert_eq!(
            uploads_done(&up),
            0,
            "{body:?}: an upload reached the upstream whole"
        );
    }
    assert_ne!(up.last_path().as_deref(), Some("/api/smuggled"));
    assert_healthy(&kg, &up).await;
}

/// A client's malformed chunked body is the client's fault: 400 `{"error":"Bad Request"}`, never
/// a 502 counted as `upstream_unavailable` (which is what an operator alerts on).
#[tokio::test]
async fn a_malformed_chunked_body_is_400_not_502() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = raw_answer(
        &kg,
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nx-api-key: {ALPHA_KEY}\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    r.assert_error(400, BAD_REQUEST);
    let m = kg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"keygate_requests_total{outcome="upstream_unavailable",route="api"}"#
        ),
        Some(0.0),
        "{m}"
    );
}

/// Transfer codings that do not end in `chunked`, or that an HTTP/1.0 request cannot use, cannot
/// be framed: 400, connection closed, nothing forwarded.
#[tokio::test]
async fn unframeable_transfer_codings_are_400_and_close() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let smuggled =
        format!("GET /api/smuggled HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\n\r\n");
    for (version, te) in [
        ("HTTP/1.1", "xchunked"),
        ("HTTP/1.1", "chunked, gzip"),
        ("HTTP/1.1", "identity"),
        ("HTTP/1.1", "chunked;q=1"),
        ("HTTP/1.0", "chunked"),
    ] {
        let request = format!(
            "POST /api/upload {version}\r\nHost: a\r\nTransfer-Encoding: {te}\r\nx-api-key: {ALPHA_KEY}\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}"
        );
        let raw = raw_until_closed(kg.proxy, request.as_bytes()).await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{version} {te:?}: {raw}");
        assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{te:?}: {raw}");
        assert_eq!(up.hits(), 0, "{version} {te:?} reached the upstream");
    }
    assert_healthy(&kg, &up).await;
}

/// A transfer coding keygate does not apply (`gzip, chunked`) would be decoded as chunked only
/// and forwarded with the `gzip` coding dropped, so it is refused (RFC 9112 §6.1; README: unsafe
/// framing is 400).
#[tokio::test]
async fn a_transfer_coding_keygate_cannot_apply_is_refused() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = raw_answer(
        &kg,
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: gzip, chunked\r\nx-api-key: {ALPHA_KEY}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(up.hits(), 0, "forwarded as {}{}", r.head, r.body);
    assert!(r.status == 400 || r.status == 501, "{}{}", r.head, r.body);
}

// ---------------------------------------------------------------------------------------------
// 4. Slow clients

/// A body that stalls longer than `proxy.body_timeout` (a Content-Length body 10 bytes into 100,
/// and a chunked body after its first chunk) is cut off with a JSON 408 and the connection is
/// closed; the upstream, which gets the head as soon as the body starts streaming, never gets the
/// body whole.
#[tokio::test]
async fn a_stalled_body_is_408_and_the_upstream_never_gets_it_whole() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(r#"body_timeout = "300ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    for (framing, partial) in [
        ("Content-Length: 100", "0123456789"),
        ("Transfer-Encoding: chunked", "a\r\n0123456789\r\n"),
    ] {
        let before = up.hits();
        let request = format!(
            "POST /api/upload HTTP/1.1\r\nHost: a\r\n{framing}\r\nx-api-key: {ALPHA_KEY}\r\n\r\n{partial}"
        );
        // Nothing more is sent; the server must answer and close on its own.
        let raw = raw_until_closed(kg.proxy, request.as_bytes()).await;
        let r = RawAnswer::parse(&raw).unwrap_or_else(|| panic!("{framing}: no answer: {raw:?}"));
        r.assert_error(408, REQUEST_TIMEOUT);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(up.hits() - before <= 1);
        assert_eq!(
            uploads_done(&up),
            0,
            "{framing}: the upstream got the whole body"
        );
    }
    let m = kg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"keygate_requests_total{outcome="request_timeout",route="api"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_healthy(&kg, &up).await;
}

/// A request head trickled a byte at a time, each pause well under `proxy.header_read_timeout`
/// but the whole far over it, is cut off: the timeout bounds the whole head, not each read.
#[tokio::test]
async fn a_trickled_request_head_is_cut_off() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push(r#"header_read_timeout = "300ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    let head = format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {ALPHA_KEY}\r\nx-pad: {}\r\n\r\n",
        "p".repeat(300)
    );
    // At 25 ms a byte, the whole head takes about 9 s: thirty times the timeout.
    let s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut out)).await;
        out
    });
    let mut sent = 0;
    for b in head.as_bytes() {
        if reader.is_finished() || w.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let out = reader.await.unwrap();
    assert!(
        sent < head.len(),
        "the whole {}-byte head was trickled in without the connection being cut",
        head.len()
    );
    assert!(!String::from_utf8_lossy(&out).contains(" 200 "));
    assert_eq!(up.hits(), 0);
    assert_healthy(&kg, &up).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Connection floods

/// With `proxy.max_connections = 4` and four connections held open, a fifth is not served (it
/// waits in the backlog, not accepted) until one of the four closes; then it is, and the other
/// three still work.
#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.proxy.push("max_connections = 4".into());
    let kg = Keygate::start(&cfg.render()).await;
    let request =
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nx-api-key: {BETA_KEY}\r\n\r\n").into_bytes();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = H1Conn::connect(kg.proxy).await;
        c.send(&request).await;
        assert_eq!(c.answer().await.status, 200);
        held.push(c);
    }
    let m = kg.metrics().await;
    assert_eq!(metric(&m, "keygate_open_connections"), Some(4.0), "{m}");

    // The kernel completes the fifth handshake; keygate does not accept it.
    let mut fifth = H1Conn::connect(kg.proxy).await;
    fifth.send(&request).await;
    let mut buf = [0u8; 256];
    let early = tokio::time::timeout(Duration::from_millis(300), fifth.stream.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the fifth connection was answered while four were open: {early:?}"
    );
    let m = kg.metrics().await;
    assert_eq!(metric(&m, "keygate_connections_total"), Some(4.0), "{m}");
    assert_eq!(up.hits(), 4);

    drop(held.remove(0));
    let r = fifth.answer().await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.body);
    for c in &mut held {
        c.send(&request).await;
        assert_eq!(
            c.answer().await.status,
            200,
            "a held connection stopped working"
        );
    }
    assert_eq!(up.hits(), 8);
    let m = kg.metrics().await;
    assert_eq!(metric(&m, "keygate_connections_total"), Some(5.0), "{m}");
    assert_eq!(metric(&m, "keygate_open_connections"), Some(4.0), "{m}");
}

/// 500 connections opened and dropped at once (some silent, some mid-head, some after a whole
/// request) are all accepted and all released: the open-connections gauge returns to its
/// baseline, and keygate still answers.
#[tokio::test]
async fn connection_churn_returns_the_gauge_to_baseline() {
    const N: usize = 500;
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let m = kg.metrics().await;
    let baseline = metric(&m, "keygate_open_connections").unwrap();
    for i in 0..N {
        let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
        match i % 3 {
            0 => {}
            1 => {
                let _ = s.write_all(b"GET /api/x HTTP/1.1\r\nHo").await;
            }
            _ => {
                let _ = s.write_all(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").await;
            }
        }
        drop(s);
    }
    // Closing is asynchronous (keygate sees each EOF in its own time): wait, bounded.
    let settled = |want_total: f64| {
        let kg = &kg;
        move || async move {
            let m = kg.metrics().await;
            let open = metric(&m, "keygate_open_connections").unwrap();
            let total = metric(&m, "keygate_connections_total").unwrap();
            (open == baseline && total == want_total).then_some(())
        }
    };
    poll_until(
        Duration::from_secs(20),
        "all churned connections accepted and closed",
        settled(N as f64),
    )
    .await;
    let r = raw_answer(
        &kg,
        format!("GET /api/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\nx-api-key: {BETA_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    poll_until(
        Duration::from_secs(20),
        "the last connection closed",
        settled(N as f64 + 1.0),
    )
    .await;
    assert_eq!(up.hits(), 1, "only the keyed request reaches the upstream");
}

// ---------------------------------------------------------------------------------------------
// 6. HTTP/2 (prior knowledge on the plaintext listener), raw frames

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const COMPRESSION_ERROR: u32 = 0x9;

/// One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    assert!(len < 1 << 24);
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing, new name (RFC 7541 §6.2.2).
fn hpack_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_str(out, name.as_bytes());
    hpack_str(out, value.as_bytes());
}

/// A request's header block: `:method` (static 2 GET / 3 POST), `:scheme http`, `:path`,
/// `:authority`, then `fields`.
fn request_block(post: bool, path: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![if post { 0x83 } else { 0x82 }, 0x86];
    hpack_int(&mut b, 0, 4, 4);
    hpack_str(&mut b, path.as_bytes());
    hpack_int(&mut b, 0, 4, 1);
    hpack_str(&mut b, b"localhost");
    for (n, v) in fields {
        hpack_field(&mut b, n, v);
    }
    b
}

/// What keygate sent on a raw HTTP/2 connection until it closed it.
#[derive(Debug, Default)]
struct H2Seen {
    /// (type, flags, stream) of every frame.
    frames: Vec<(u8, u8, u32)>,
    /// (last stream id, error code, debug data) of a GOAWAY.
    goaway: Option<(u32, u32, String)>,
    /// Whether keygate closed the connection (EOF or reset) within 10 s.
    closed: bool,
}

/// A raw HTTP/2 client connection: the preface and an empty SETTINGS are sent; a task reads
/// frames until keygate closes the connection.
struct RawH2 {
    w: tokio::net::tcp::OwnedWriteHalf,
    reader: tokio::task::JoinHandle<H2Seen>,
}

impl RawH2 {
    async fn connect(kg: &Keygate, send_buffer: Option<u32>) -> RawH2 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = send_buffer {
            sock.set_send_buffer_size(size).unwrap();
        }
        let (r, mut w) = sock.connect(kg.proxy).await.unwrap().into_split();
        let reader = tokio::spawn(read_h2_frames(r));
        w.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
            .await
            .unwrap();
        RawH2 { w, reader }
    }

    /// Waits (at most 10 s) for keygate to close the connection; the client side stays open
    /// meanwhile, so a close is keygate's own doing.
    async fn finish(self) -> H2Seen {
        let seen = self.reader.await.unwrap();
        drop(self.w);
        seen
    }
}

async fn read_h2_frames(mut r: tokio::net::tcp::OwnedReadHalf) -> H2Seen {
    let mut seen = H2Seen::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), r.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                seen.closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let p = &buf[9..9 + len];
            if kind == GOAWAY && p.len() >= 8 {
                seen.goaway = Some((
                    u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                    u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                    String::from_utf8_lossy(&p[8..]).into_owned(),
                ));
            }
            seen.frames.push((kind, flags, stream));
            buf.drain(..9 + len);
        }
    }
    seen
}

/// One HTTP/2 GET over a fresh prior-knowledge connection (hyper's client).
async fn h2_get(
    kg: &Keygate,
    path: &str,
    headers: &[(String, String)],
) -> Result<(u16, Bytes), hyper::Error> {
    let s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let mut rb = http::Request::get(format!("http://localhost{path}"));
    for (n, v) in headers {
        rb = rb.header(n.as_str(), v.as_str());
    }
    let resp = send
        .send_request(rb.body(Empty::<Bytes>::new()).unwrap())
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Keygate still serves a valid key over HTTP/2 (and HTTP/1).
async fn assert_healthy_h2(kg: &Keygate, up: &Upstream) {
    let before = up.hits();
    let (status, body) = h2_get(
        kg,
        "/api/h2-healthy",
        &[("x-api-key".into(), BETA_KEY.into())],
    )
    .await
    .expect("a fresh HTTP/2 connection should work");
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(up.hits(), before + 1);
    assert_healthy(kg, up).await;
}

fn h2_cfg(up: &Upstream) -> Cfg {
    let mut cfg = Cfg::new(up.addr);
    // Streams that get through are forwarded without running into the plan's limit.
    cfg.tiny_limit = 1_000_000;
    cfg
}

/// Rapid reset (CVE-2023-44487): 1,000 streams each opened with a keyed request and reset at
/// once. Keygate allows 20 streams reset before it accepts them, then closes the connection with
/// GOAWAY ENHANCE_YOUR_CALM, long before the 1,000th; reset streams are not forwarded.
#[tokio::test]
async fn http2_rapid_reset_is_cut_off_with_goaway() {
    const STREAMS: u32 = 1_000;
    let up = Upstream::start().await;
    let kg = Keygate::start(&h2_cfg(&up).render()).await;
    let mut c = RawH2::connect(&kg, None).await;
    let block = request_block(false, "/api/x", &[("x-api-key", TINY_KEY)]);
    let mut out = Vec::new();
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    let _ = c.w.write_all(&out).await;
    let seen = c.finish().await;
    assert!(seen.closed, "keygate kept the connection open: {seen:?}");
    let (last, code, debug) = seen.goaway.clone().expect("a GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM, "{debug}");
    assert!(
        last < 2 * 100 + 1,
        "the GOAWAY came only after stream {last} of {}",
        2 * STREAMS - 1
    );
    assert!(
        up.hits() <= 20,
        "{} reset streams were forwarded",
        up.hits()
    );
    assert_healthy_h2(&kg, &up).await;
}

/// A flood of streams that make keygate reset them (a Content-Length the DATA overruns: a stream
/// error on keygate's side, as in "MadeYouReset") is cut off with GOAWAY ENHANCE_YOUR_CALM once
/// too many streams were reset; no upload reaches the upstream whole.
#[tokio::test]
async fn http2_server_reset_flood_is_cut_off_with_goaway() {
    const STREAMS: u32 = 1_000;
    let up = Upstream::start().await;
    let kg = Keygate::start(&h2_cfg(&up).render()).await;
    let mut c = RawH2::connect(&kg, None).await;
    let block = request_block(
        true,
        "/api/upload",
        &[("x-api-key", TINY_KEY), ("content-length", "1")],
    );
    let mut out = Vec::new();
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS, id, &block));
        out.extend(frame(DATA, END_STREAM, id, b"xx"));
    }
    let _ = c.w.write_all(&out).await;
    let seen = c.finish().await;
    assert!(
        seen.closed,
        "keygate kept the connection open: {:?}",
        seen.goaway
    );
    let (last, code, debug) = seen.goaway.clone().expect("a GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM, "{debug}");
    assert!(
        last < 2 * STREAMS - 1,
        "every stream was processed before the GOAWAY"
    );
    assert!(
        seen.frames.iter().filter(|f| f.0 == RST_STREAM).count() <= 256,
        "more resets than max_local_error_reset_streams"
    );
    assert_eq!(uploads_done(&up), 0);
    assert!(up.hits() <= 256);
    assert_healthy_h2(&kg, &up).await;
}

/// CONTINUATION flood: a HEADERS frame without END_HEADERS followed by CONTINUATION frames that
/// never end the block. Keygate closes the connection (GOAWAY) before the client has managed to
/// write ten times `proxy.max_header_bytes`. (The client's send buffer is kept small so that
/// what it has written is close to what keygate has read.)
#[tokio::test]
async fn http2_continuation_flood_is_cut_off() {
    const BUDGET: usize = 61_440;
    let up = Upstream::start().await;
    let kg = Keygate::start(&h2_cfg(&up).render()).await;
    let mut c = RawH2::connect(&kg, Some(16 * 1024)).await;
    c.w.write_all(&frame(
        HEADERS,
        END_STREAM,
        1,
        &request_block(false, "/api/x", &[("x-api-key", TINY_KEY)]),
    ))
    .await
    .unwrap();
    let mut block = Vec::new();
    let mut i = 0;
    while block.len() < 16_000 {
        hpack_field(&mut block, &format!("x-flood-{i}"), &"f".repeat(100));
        i += 1;
    }
    let continuation = frame(CONTINUATION, 0, 1, &block);
    let mut written = 0usize;
    let cut = loop {
        if c.reader.is_finished() {
            break true;
        }
        if c.w.write_all(&continuation).await.is_err() {
            break true;
        }
        written += continuation.len();
        if written > 100 * BUDGET {
            break false;
        }
    };
    assert!(
        cut,
        "keygate read 100 times the header budget without closing"
    );
    let seen = c.finish().await;
    assert!(seen.closed);
    let (_, code, debug) = seen.goaway.clone().expect("a GOAWAY");
    assert!(
        code == ENHANCE_YOUR_CALM || code == COMPRESSION_ERROR,
        "GOAWAY code {code} ({debug})"
    );
    assert!(
        written < 10 * BUDGET,
        "{written} bytes of header block were written before keygate cut the connection"
    );
    assert_eq!(up.hits(), 0);
    assert_healthy_h2(&kg, &up).await;
}

/// Over HTTP/2 too: a header list over `proxy.max_header_bytes` is 431 and not forwarded, and
/// the identity and forwarding headers a client sends are replaced by keygate's.
#[tokio::test]
async fn http2_requests_get_the_same_limits_and_hygiene() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let (status, _) = h2_get(
        &kg,
        "/api/big-head",
        &[
            ("x-api-key".into(), ALPHA_KEY.into()),
            ("x-big".into(), "b".repeat(70_000)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(status, 431);
    assert_eq!(up.hits(), 0);

    let spoofed: Vec<(String, String)> = [
        ("x-api-key", ALPHA_KEY),
        ("x-keygate-team", "beta"),
        ("x-keygate-key-id", "beta-key"),
        ("x-keygate-plan", "enterprise"),
        ("x_keygate_team", "beta"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6"),
        ("x-request-id", "spoofed"),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
    .collect();
    let (status, body) = h2_get(&kg, "/api/h2", &spoofed).await.unwrap();
    assert_eq!(status, 200, "{body:?}");
    let h = up.last_headers();
    assert_eq!(h["x-keygate-team"], "alpha");
    assert_eq!(h["x-keygate-key-id"], "alpha-key");
    assert_eq!(h["x-keygate-plan"], "free");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_ne!(h["x-request-id"], "spoofed");
    for gone in ["x_keygate_team", "forwarded", "x-api-key"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// 7. Upgrades and CONNECT

/// On a route without `upgrade = true`: an h2c upgrade, an `Upgrade` field without `Connection:
/// upgrade`, and CONNECT (authority-form and origin-form) are refused with a JSON 400, even
/// with a valid key, and nothing reaches the upstream.
#[tokio::test]
async fn upgrades_and_connect_are_refused_on_a_plain_route() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let key = format!("x-api-key: {ALPHA_KEY}\r\n");
    let cases = [
        format!(
            "GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n{key}\r\n"
        ),
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nUpgrade: websocket\r\n{key}\r\n"),
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nUpgrade: h2c\r\n{key}\r\n"),
        format!("CONNECT upstream.example:443 HTTP/1.1\r\nHost: upstream.example:443\r\nConnection: close\r\n{key}\r\n"),
        format!("CONNECT /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{key}\r\n"),
    ];
    for request in &cases {
        let r = raw_answer(&kg, request.as_bytes()).await;
        assert_eq!(r.status, 400, "{request:?}: {}{}", r.head, r.body);
        r.assert_error(400, BAD_REQUEST);
        assert!(
            !r.head.starts_with("HTTP/1.1 101"),
            "{request:?} switched protocols"
        );
    }
    assert_eq!(up.hits(), 0);
    let m = kg.metrics().await;
    let refused = metric(
        &m,
        r#"keygate_requests_total{outcome="bad_request",route="api"}"#,
    )
    .unwrap_or(0.0)
        + metric(
            &m,
            r#"keygate_requests_total{outcome="bad_request",route="none"}"#,
        )
        .unwrap_or(0.0);
    assert_eq!(refused, cases.len() as f64, "{m}");
    assert_healthy(&kg, &up).await;
}

/// README (routes): `Connection: upgrade` and `CONNECT` are allowed only on `upgrade` routes
/// (400 elsewhere), `Connection: upgrade` without an `Upgrade` field too.
#[tokio::test]
async fn connection_upgrade_alone_is_refused_on_a_plain_route() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = raw_answer(
        &kg,
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: upgrade, close\r\nx-api-key: {ALPHA_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(up.hits(), 0, "forwarded: {}{}", r.head, r.body);
    r.assert_error(400, BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// 8. Spoofed identity and forwarding headers

/// What header_hygiene (forwarding.rs) does not cover: a client's `X-Forwarded-Proto` is
/// replaced, repeated `X-Forwarded-For` and `x-keygate-*` lines collapse to keygate's one value,
/// and underscore spellings go. With `trust_forwarded` on, identity headers are still keygate's.
#[tokio::test]
async fn spoofed_identity_and_forwarding_headers_are_replaced() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let spoof = format!(
        "x-api-key: {ALPHA_KEY}\r\n\
         X-Forwarded-Proto: https\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         X-Forwarded-For: 7.7.7.7\r\n\
         X-KEYGATE-TEAM: beta\r\n\
         x-keygate-team: tiny\r\n\
         x-keygate-key-id: beta-key\r\n\
         x-keygate-key-id: tiny-key\r\n\
         x_keygate_team: beta\r\n\
         x_forwarded_for: 6.6.6.6\r\n\
         X-Keygate-Anything: 1\r\n"
    );
    let r = raw_answer(&kg, &get_close("/api/spoof", spoof.as_bytes())).await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.body);
    let h = up.last_headers();
    let one = |name: &str, want: &str| {
        let all: Vec<_> = h.get_all(name).iter().collect();
        assert_eq!(all, [want], "{name}: {h:?}");
    };
    one("x-keygate-team", "alpha");
    one("x-keygate-key-id", "alpha-key");
    one("x-keygate-plan", "free");
    one("x-forwarded-for", "127.0.0.1");
    one("x-forwarded-proto", "http");
    for gone in ["x_keygate_team", "x_forwarded_for", "x-keygate-anything"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h:?}");
    }

    // Behind a trusted proxy the forwarding chain is kept, the identity is still keygate's.
    let up2 = Upstream::start().await;
    let mut cfg = Cfg::new(up2.addr);
    cfg.proxy.push("trust_forwarded = true".into());
    let kg2 = Keygate::start(&cfg.render()).await;
    let r = raw_answer(
        &kg2,
        &get_close(
            "/api/trusted",
            format!(
                "x-api-key: {ALPHA_KEY}\r\nx-keygate-team: beta\r\nx-keygate-plan: enterprise\r\nx-keygate-key-id: beta-key\r\n"
            )
            .as_bytes(),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let h = up2.last_headers();
    assert_eq!(h["x-keygate-team"], "alpha");
    assert_eq!(h["x-keygate-plan"], "free");
    assert_eq!(h["x-keygate-key-id"], "alpha-key");
    assert_eq!(h.get_all("x-keygate-team").iter().count(), 1);
}

/// README: `proxy.trust_forwarded` "keep[s] the client's `X-Forwarded-*`" — so with it off (the
/// default) none of them (nor `X-Real-IP`) may reach the upstream from the client: upstream
/// frameworks use them to build redirect URLs and route prefixes.
#[tokio::test]
async fn client_x_forwarded_fields_do_not_reach_the_upstream() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let r = raw_answer(
        &kg,
        &get_close(
            "/api/fwd",
            format!(
                "x-api-key: {ALPHA_KEY}\r\nX-Forwarded-Port: 8443\r\nX-Forwarded-Prefix: /admin\r\n\
                 X-Forwarded-Server: evil.example\r\nX-Forwarded-Uri: /admin/users\r\n\
                 X-Real-IP: 6.6.6.6\r\n"
            )
            .as_bytes(),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let h = up.last_headers();
    let leaked: Vec<_> = h
        .keys()
        .filter(|n| n.as_str().starts_with("x-forwarded-"))
        .filter(|n| !matches!(n.as_str(), "x-forwarded-for" | "x-forwarded-proto"))
        .map(|n| format!("{n}: {:?}", h[n]))
        .collect();
    assert!(
        leaked.is_empty(),
        "client X-Forwarded-* fields reached the upstream: {leaked:?}"
    );
    assert!(h.get("x-real-ip").is_none());
}
