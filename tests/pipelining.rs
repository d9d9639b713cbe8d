//! HTTP/1.1 pipelining to the upstream (`upstream.pipeline`): answers reach their own requests
//! in order, and a pipe that breaks (a `Connection: close`, a close without an answer, a
//! malformed answer, an answer too long to hold) costs the requests behind it a retry on a
//! connection of their own, never a wrong or lost answer.
//!
//! The scripted upstream answers the first request on a connection at once (it opens the pipe)
//! and then holds its answers until it has read [`BATCH`] more request heads on that same
//! connection: without pipelining the requests below would each take a connection of their own
//! and the upstream would wait for ever (the tests time out).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

const BATCH: usize = 3;

/// The request target of a head.
fn target(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// A 200 that names its request in a field and in the body (none for `HEAD`).
fn echo(head: &str) -> Vec<u8> {
    let t = target(head);
    let body = if head.starts_with("HEAD ") { "" } else { t };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-target: {t}\r\n\r\n{body}",
        t.len()
    )
    .into_bytes()
}

/// Answers a batch of heads: the bytes to write, and whether to close after them.
type Script = dyn Fn(&[String]) -> (Vec<u8>, bool) + Send + Sync;

async fn upstream(script: Arc<Script>) -> (SocketAddr, Arc<AtomicUsize>) {
    raw_upstream(move |mut s, _| {
        let script = script.clone();
        async move {
            let Some(first) = read_head(&mut s).await else {
                return;
            };
            if s.write_all(&echo(&first)).await.is_err() {
                return;
            }
            loop {
                let mut heads = Vec::new();
                while heads.len() < BATCH {
                    match read_head(&mut s).await {
                        Some(h) => heads.push(h),
                        None => return,
                    }
                }
                let (bytes, close) = script(&heads);
                if s.write_all(&bytes).await.is_err() || close {
                    return;
                }
            }
        }
    })
    .await
}

async fn start(script: Arc<Script>) -> (Keygate, Arc<AtomicUsize>) {
    let (addr, accepted) = upstream(script).await;
    let mut cfg = Cfg::new(addr);
    cfg.upstream_extra.push("pipeline = 8".into());
    let kg = Keygate::start(&cfg.render()).await;
    // Opens the pipe: answered at once.
    let r = kg.get("/api/open", Some(BETA_KEY)).await;
    assert_eq!((r.status, r.text()), (200, "/api/open"));
    (kg, accepted)
}

/// `GET`s of `/api/a`, `/api/b` and `HEAD /api/c`, at once; their answers.
async fn three(kg: &Keygate) -> Vec<Resp> {
    let get = |path: &str| send(kg.client.get(kg.url(path)).header("x-api-key", BETA_KEY));
    let head = send(
        kg.client
            .head(kg.url("/api/c"))
            .header("x-api-key", BETA_KEY),
    );
    let all = async { tokio::join!(get("/api/a"), get("/api/b"), head) };
    let (a, b, c) = tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("the requests were not pipelined on the open connection");
    vec![a, b, c]
}

/// `r` is the answer to `path` (of [`three`]).
fn assert_own(r: &Resp, path: &str) {
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    assert_eq!(r.header("x-target"), Some(path));
    let body = if path == "/api/c" { "" } else { path };
    assert_eq!(r.text(), body);
}

fn assert_own_answers(rs: &[Resp]) {
    for (r, path) in rs.iter().zip(["/api/a", "/api/b", "/api/c"]) {
        assert_own(r, path);
    }
}

#[tokio::test]
async fn answers_reach_their_own_requests_in_order_on_one_connection() {
    // The middle answer is chunked, to show its end is found before the next one begins.
    let (kg, accepted) = start(Arc::new(|heads: &[String]| {
        let mut out = Vec::new();
        for (i, h) in heads.iter().enumerate() {
            if i == 1 && !h.starts_with("HEAD ") {
                let t = target(h);
                out.extend_from_slice(
                    format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-target: {t}\r\n\r\n\
                         {:x}\r\n{t}\r\n0\r\n\r\n",
                        t.len()
                    )
                    .as_bytes(),
                );
            } else {
                out.extend_from_slice(&echo(h));
            }
        }
        (out, false)
    }))
    .await;
    for _ in 0..2 {
        assert_own_answers(&three(&kg).await);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_close_answer_sends_the_requests_behind_it_again() {
    let (kg, accepted) = start(Arc::new(|heads: &[String]| {
        let first = String::from_utf8(echo(&heads[0])).unwrap();
        let closing = first.replacen("\r\n", "\r\nConnection: close\r\n", 1);
        (closing.into_bytes(), true)
    }))
    .await;
    assert_own_answers(&three(&kg).await);
    // The pipe, then one connection each for the two requests behind the close.
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_close_with_nothing_answered_sends_every_request_again() {
    let (kg, accepted) = start(Arc::new(|_: &[String]| (Vec::new(), true))).await;
    assert_own_answers(&three(&kg).await);
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_malformed_answer_is_a_502_for_its_request_only() {
    let (kg, _) = start(Arc::new(|heads: &[String]| {
        let mut out = Vec::new();
        for h in heads {
            if target(h) == "/api/b" {
                out.extend_from_slice(b"NOT HTTP AT ALL\r\n\r\n");
                break;
            }
            out.extend_from_slice(&echo(h));
        }
        (out, false)
    }))
    .await;
    let rs = three(&kg).await;
    assert_own(&rs[0], "/api/a");
    rs[1].assert_error(
        502,
        r#"{"error":"Bad Gateway: the upstream is unavailable"}"#,
    );
    assert_own(&rs[2], "/api/c");
}

#[tokio::test]
async fn an_answer_too_long_to_hold_streams_and_the_rest_go_elsewhere() {
    let long = keygate::proxy::pipe::WHOLE_MAX as usize + 1;
    let (kg, accepted) = start(Arc::new(move |heads: &[String]| {
        let mut out = Vec::new();
        for h in heads {
            if target(h) == "/api/a" {
                let t = target(h);
                out.extend_from_slice(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {long}\r\nx-target: {t}\r\n\r\n")
                        .as_bytes(),
                );
                out.extend(std::iter::repeat_n(b'x', long));
            } else {
                out.extend_from_slice(&echo(h));
            }
        }
        (out, false)
    }))
    .await;
    let rs = three(&kg).await;
    assert_eq!((rs[0].status, rs[0].text().len()), (200, long));
    assert!(rs[0].text().bytes().all(|b| b == b'x'));
    assert_own(&rs[1], "/api/b");
    assert_own(&rs[2], "/api/c");
    // Whichever came first on the pipe: the ones behind the long answer were sent again.
    assert!(accepted.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn answers_to_abandoned_requests_are_read_and_dropped_never_misdelivered() {
    let (addr, accepted) = upstream(Arc::new(|heads: &[String]| {
        (heads.iter().flat_map(|h| echo(h)).collect(), false)
    }))
    .await;
    let mut cfg = Cfg::new(addr);
    cfg.upstream_extra.push("pipeline = 8".into());
    cfg.upstream_extra
        .push("request_timeout = \"300ms\"".into());
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(
        kg.get("/api/open", Some(BETA_KEY)).await.text(),
        "/api/open"
    );
    // Two of the batch of three: the upstream holds them, and keygate gives up on both.
    let (a, b) = tokio::join!(
        kg.get("/api/a", Some(BETA_KEY)),
        kg.get("/api/b", Some(BETA_KEY))
    );
    assert_eq!((a.status, b.status), (504, 504));
    // The third completes the batch: the first two answers come first, for nobody.
    let c = kg.get("/api/c2", Some(BETA_KEY)).await;
    assert_eq!((c.status, c.text()), (200, "/api/c2"));
    assert_eq!(c.header("x-target"), Some("/api/c2"));
    assert_eq!(kg.get("/api/d", Some(BETA_KEY)).await.status, 504);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn many_requests_at_once_on_a_real_upstream_each_get_their_own_answer() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.upstream_extra.push("pipeline = 4".into());
    let kg = Keygate::start(&cfg.render()).await;
    assert_each_gets_its_own(&kg, "/api/many/", 48).await;
    assert_eq!(up.hits(), 48);
}

/// A reload that turns pipelining on gets a new pool, so it takes effect at once: the next
/// connection is a pipe. (Were the old pool kept, the second `/api/open` would be the second
/// request on its idle connection, which the scripted upstream holds, and time out.)
#[tokio::test]
async fn a_reload_that_turns_pipelining_on_takes_effect() {
    let (addr, accepted) = upstream(Arc::new(|heads: &[String]| {
        (heads.iter().flat_map(|h| echo(h)).collect(), false)
    }))
    .await;
    let mut cfg = Cfg::new(addr);
    let (kg, _dir, path) = start_from_file(&cfg).await;
    let open = || async {
        let r = tokio::time::timeout(Duration::from_secs(10), kg.get("/api/open", Some(BETA_KEY)))
            .await
            .expect("the request was held: the pool was not replaced");
        assert_eq!((r.status, r.text()), (200, "/api/open"));
    };
    open().await;
    cfg.upstream_extra.push("pipeline = 8".into());
    write_file(&path, &cfg.render());
    kg.server.reload().expect("the edited config is valid");
    open().await;
    assert_own_answers(&three(&kg).await);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
