//! `keygate demo`: the example config plus a small built-in echo upstream, for trying keygate
//! with nothing else installed.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The example config, as shipped.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/keygate.toml");
/// The demo team's key (only its digest is in the config).
pub const DEMO_KEY: &str = "kg_demo_0123456789abcdef";

/// Answers every request with JSON describing what arrived: method, path, body size and the
/// identity headers keygate added, so a person can see what the upstream is told.
pub async fn echo_upstream(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            _ = crate::server::stopped(&mut shutdown) => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let size = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let h = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let v = serde_json::json!({
        "ok": true,
        "upstream": "keygate demo echo",
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "body_bytes": size,
        "team": h("x-keygate-team"),
        "key_id": h("x-keygate-key-id"),
        "plan": h("x-keygate-plan"),
        "request_id": h("x-request-id"),
        "api_key_forwarded": parts.headers.contains_key("x-api-key"),
    });
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// The lines printed when the demo starts.
pub fn banner(proxy: &str, admin: &str) -> String {
    format!(
        "keygate demo: gateway on http://{proxy}, admin on http://{admin}, echo upstream behind it.\n\
         The demo team's key is {DEMO_KEY} (plan free: 100 requests/hour).\n\
         Try:\n\
         \x20 curl -i http://{proxy}/api/posts                                   # 401 Missing API Key\n\
         \x20 curl -i -H 'x-api-key: wrong' http://{proxy}/api/posts             # 401 Invalid API Key\n\
         \x20 curl -i -H 'x-api-key: {DEMO_KEY}' http://{proxy}/api/posts        # 403: no extension heartbeat yet\n\
         \x20 curl -i -X POST -H 'x-api-key: {DEMO_KEY}' http://{proxy}/extension/heartbeat\n\
         \x20 curl -i -H 'x-api-key: {DEMO_KEY}' http://{proxy}/api/posts        # 200, forwarded\n\
         \x20 curl -i -H 'x-api-key: {DEMO_KEY}' http://{proxy}/keygate/usage    # your plan and what is left\n\
         \x20 curl -i -X DELETE -H 'x-api-key: {DEMO_KEY}' http://{proxy}/extension/heartbeat   # 405\n\
         \x20 curl -s http://{admin}/metrics | grep keygate_requests_total\n\
         Stop with Ctrl-C."
    )
}
