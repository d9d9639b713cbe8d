//! keygate's own HTTP/1.1 upstream client against scripted upstreams on raw sockets: each
//! framing RFC 9112 allows a response, 1xx answers, broken lengths, an early answer to a body
//! still being sent, and when a connection is (and is not) used again.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use support::*;
use tokio::io::AsyncWriteExt;

const BAD_GATEWAY: &str = r#"{"error":"Bad Gateway: the upstream is unavailable"}"#;

/// An upstream that answers every request head it reads with `answer(head)`, then closes the
/// connection if told to. Returns its address and the connections it accepted.
async fn scripted<F>(answer: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    raw_upstream(move |mut s, _| {
        let answer = answer.clone();
        async move {
            while let Some(head) = read_head(&mut s).await {
                let (bytes, close) = answer(&head);
                if s.write_all(&bytes).await.is_err() || close {
                    return;
                }
            }
        }
    })
    .await
}

fn fixed(bytes: &'static str) -> impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static {
    move |_| (bytes.as_bytes().to_vec(), false)
}

/// The same answer to every request, each connection closed after it.
fn closing(bytes: &'static str) -> impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static {
    move |_| (bytes.as_bytes().to_vec(), true)
}

async fn connections(kg: &Keygate) -> f64 {
    metric(&kg.metrics().await, "keygate_upstream_connections_total").unwrap_or(0.0)
}

#[tokio::test]
async fn a_chunked_answer_is_decoded_its_trailers_dropped_and_its_connection_reused() {
    let (addr, accepted) = scripted(fixed(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
    ))
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    for _ in 0..3 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (200, "hello world"));
        assert_eq!(r.header("x-trailer"), None);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(connections(&kg).await, 1.0);
}

#[tokio::test]
async fn an_answer_without_a_length_runs_to_the_close_and_its_connection_is_not_reused() {
    let (addr, accepted) =
        scripted(closing("HTTP/1.1 200 OK\r\n\r\nall of it, to the close")).await;
    let kg = Keygate::start(&base_toml(addr)).await;
    for _ in 0..2 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (200, "all of it, to the close"));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn informational_answers_are_passed_over() {
    let (addr, accepted) = scripted(fixed(
        "HTTP/1.1 100 Continue\r\n\r\n\
         HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
         HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    ))
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    for _ in 0..2 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (201, "ok"));
        assert_eq!(
            r.header("link"),
            None,
            "a 103's fields are not the answer's"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_head_answer_has_no_body_whatever_its_length_says() {
    let (addr, accepted) = scripted(|head| {
        let body = if head.starts_with("HEAD ") {
            ""
        } else {
            "hello"
        };
        (
            format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{body}").into_bytes(),
            false,
        )
    })
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    let r = send(
        kg.client
            .head(kg.url("/api/x"))
            .header("x-api-key", ALPHA_KEY),
    )
    .await;
    assert_eq!((r.status, r.header("content-length")), (200, Some("5")));
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!((r.status, r.text()), (200, "hello"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the HEAD's connection carried the GET: no body was waited for"
    );
}

#[tokio::test]
async fn transfer_encoding_wins_over_a_content_length_which_does_not_reach_the_client() {
    let (addr, _) = scripted(fixed(
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n\
         2\r\nok\r\n0\r\n\r\n",
    ))
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!((r.status, r.text()), (200, "ok"));
    assert_ne!(r.header("content-length"), Some("100"));
}

#[tokio::test]
async fn broken_framing_is_a_502_and_the_connection_is_dropped() {
    for bad in [
        "HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        "not http at all\r\n\r\n",
    ] {
        let (addr, accepted) = scripted(fixed(bad)).await;
        let kg = Keygate::start(&base_toml(addr)).await;
        for _ in 0..2 {
            kg.get("/api/x", Some(ALPHA_KEY))
                .await
                .assert_error(502, BAD_GATEWAY);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "{bad:?}");
    }
}

#[tokio::test]
async fn a_bad_chunk_cuts_the_answer_short_as_an_error() {
    let (addr, _) = scripted(fixed(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    ))
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    let resp = kg.get_streamed("/api/x").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a broken body reaches the client as an error, not as a shorter body"
    );
}

#[tokio::test]
async fn bytes_after_an_answer_keep_its_connection_out_of_the_pool() {
    let (addr, accepted) = scripted(fixed(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK",
    ))
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    for _ in 0..3 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (200, "ok"));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// The upstream closes every connection after its answer without saying so: each later request
/// still gets its answer (the closed connection is noticed, or the request retried once).
#[tokio::test]
async fn an_upstream_that_closes_idle_connections_silently_costs_no_error() {
    let (addr, accepted) =
        scripted(closing("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let kg = Keygate::start(&base_toml(addr)).await;
    for i in 0..10 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (200, "ok"), "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

/// An upstream that refuses a body as soon as it has the head: the client gets that answer
/// while its body is still coming, and the connection is not used again.
#[tokio::test]
async fn an_early_answer_to_a_body_still_being_sent_is_passed_back() {
    let (addr, accepted) = scripted(|head| {
        if head.starts_with("POST ") {
            let refusal = "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo much";
            (refusal.as_bytes().to_vec(), false)
        } else {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                false,
            )
        }
    })
    .await;
    let kg = Keygate::start(&base_toml(addr)).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    tx.send(Ok(Bytes::from_static(b"the first part")))
        .await
        .unwrap();
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let resp = kg
        .client
        .post(kg.url("/api/upload"))
        .header("x-api-key", ALPHA_KEY)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.text().await.unwrap(), "too much");
    drop(tx);
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!((r.status, r.text()), (200, "ok"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the connection whose request body was cut off is not reused"
    );
}

/// A request body of unknown length goes upstream chunked, one of known length with its
/// `Content-Length`, and an empty POST with `Content-Length: 0`.
#[tokio::test]
async fn request_bodies_are_framed_by_what_is_known_of_their_length() {
    let up = Upstream::start().await;
    let kg = Keygate::start(&base_toml(up.addr)).await;
    let stream = futures_util::stream::iter(
        ["abc", "defg"].map(|s| Ok::<Bytes, Infallible>(Bytes::from_static(s.as_bytes()))),
    );
    let r = kg.upload(reqwest::Body::wrap_stream(stream)).await;
    assert_eq!((r.status, &r.body["bytes"]), (200, &serde_json::json!(7)));
    let seen = up.last_headers();
    assert_eq!(seen["transfer-encoding"], "chunked");
    assert!(seen.get("content-length").is_none());

    let r = kg.upload("twelve bytes").await;
    assert_eq!((r.status, &r.body["bytes"]), (200, &serde_json::json!(12)));
    assert_eq!(up.last_headers()["content-length"], "12");

    let r = kg.post("/api/upload", Some(ALPHA_KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last_headers()["content-length"], "0");
}

/// An upstream that answers every request `200 ok` and, when keygate closes a connection,
/// sends that connection's number (from 0) and the time on the channel.
async fn ok_upstream_reporting_closes() -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<(usize, std::time::Instant)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (addr, accepted) = raw_upstream(move |mut s, n| {
        let tx = tx.clone();
        async move {
            while read_head(&mut s).await.is_some() {
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
            let _ = tx.send((n, std::time::Instant::now()));
        }
    })
    .await;
    (addr, accepted, rx)
}

/// An idle upstream connection is closed once past `upstream.pool_idle_timeout` with no request
/// to walk past it, and so is an idle pipe: the upstream sees keygate hang up.
#[tokio::test]
async fn idle_upstream_connections_are_closed_without_traffic() {
    use std::time::{Duration, Instant};
    for pipeline in [1, 8] {
        let (addr, _, mut closed) = ok_upstream_reporting_closes().await;
        let mut cfg = Cfg::new(addr);
        cfg.upstream_extra.push(format!("pipeline = {pipeline}"));
        cfg.upstream_extra
            .push(r#"pool_idle_timeout = "300ms""#.into());
        let kg = Keygate::start(&cfg.render()).await;
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (200, "ok"));
        let answered = Instant::now();
        let (_, closed) = tokio::time::timeout(Duration::from_secs(5), closed.recv())
            .await
            .unwrap_or_else(|_| panic!("pipeline {pipeline}: the idle connection stayed open"))
            .unwrap();
        assert!(
            closed.duration_since(answered) >= Duration::from_millis(250),
            "pipeline {pipeline}: closed before the idle timeout"
        );
    }
}

/// A reload that changes a pool setting (here `upstream.pool_idle_timeout`) takes effect: the
/// old pool and its idle connection go, and the next request opens a connection under the new
/// setting, which then closes once idle past it.
#[tokio::test]
async fn a_reload_that_changes_the_pool_idle_timeout_applies_it() {
    use std::time::{Duration, Instant};
    let (addr, accepted, mut rx) = ok_upstream_reporting_closes().await;
    let mut cfg = Cfg::new(addr);
    cfg.upstream_extra
        .push(r#"pool_idle_timeout = "1h""#.into());
    let (kg, _dir, path) = start_from_file(&cfg).await;
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!((r.status, r.text()), (200, "ok"));

    cfg.upstream_extra = vec![r#"pool_idle_timeout = "300ms""#.into()];
    write_file(&path, &cfg.render());
    kg.server.reload().expect("the edited config is valid");
    let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
    assert_eq!((r.status, r.text()), (200, "ok"));
    let answered = Instant::now();
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the old pool was kept");
    // The first connection went with the old pool; the second closes once idle 300 ms (not an
    // hour), within the sweep's next passes.
    let mut closed = Vec::new();
    while closed.len() < 2 {
        let (n, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("closed so far: {closed:?}"))
            .unwrap();
        closed.push(n);
        if n == 1 {
            assert!(at.duration_since(answered) >= Duration::from_millis(250));
        }
    }
    closed.sort();
    assert_eq!(closed, [0, 1]);
}
