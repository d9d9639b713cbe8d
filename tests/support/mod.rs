//! Shared helpers for the integration tests: a real upstream that counts what reaches it, a real
//! keygate on `127.0.0.1:0` driven by a manual clock, a base config, and a small HTTP client.
//!
//! No fixed ports and no sleeps for synchronisation: the upstream signals arrival of a `/slow`
//! request through a semaphore and waits for the test to release it; time-based behaviour is
//! driven with [`Clock::advance`].

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use keygate::clock::Clock;
use keygate::config::Config;
use keygate::metrics::Metrics;
use keygate::server::{Options, Server};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// The manual clock's starting wall time (2023-11-14).
pub const T0: i64 = 1_700_000_000_000;

/// Team `alpha`, plan `free` (100/hour), scope `read`.
pub const ALPHA_KEY: &str = "kg_alpha_0000000000000001";
/// Team `beta`, plan `pro` (1000/hour), scopes `read`, `write`.
pub const BETA_KEY: &str = "kg_beta_00000000000000002";
/// Team `tiny`, plan `tiny` ([`Cfg::tiny_limit`] per hour).
pub const TINY_KEY: &str = "kg_tiny_00000000000000003";
/// Teams declared by the base config (each has a heartbeat entry).
pub const TEAMS: usize = 3;

/// The configured `plugin_required` message.
pub const PLUGIN_MESSAGE: &str =
    "Plugin installation required: Please install the OutX browser extension (integration tests).";
pub const MISSING_KEY: &str = r#"{"error":"Missing API Key"}"#;
pub const INVALID_KEY: &str = r#"{"error":"Invalid API Key"}"#;
pub const ACCESS_DENIED: &str =
    r#"{"error":"Access denied: You don't have permission to access this resource"}"#;

/// Bytes of each chunk of `/big` responses and streamed uploads.
/// The rate-limit fields the upstream's `/own-limits` answers with, one of each family.
pub const UPSTREAM_RATE_FIELDS: [(&str, &str); 5] = [
    ("ratelimit-policy", "\"upstream\";q=5000;w=3600"),
    ("ratelimit", "\"upstream\";r=4999;t=1"),
    ("x-ratelimit-limit", "5000"),
    ("x-ratelimit-remaining", "4999"),
    ("x-ratelimit-reset", "1"),
];
pub const CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Upstream

/// What the upstream has seen.
#[derive(Debug)]
pub struct Seen {
    /// Requests whose head reached the upstream.
    pub hits: AtomicUsize,
    /// Connections accepted and not yet ended: once a connection has ended, every request it
    /// carried is in `hits`.
    pub open: AtomicUsize,
    /// `/upload` bodies read to the end.
    pub uploads_done: AtomicUsize,
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_path: Mutex<Option<String>>,
    /// One permit per `/slow` request that arrived.
    arrived: Semaphore,
    /// One permit per `/slow` request the test lets answer.
    release: Semaphore,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            hits: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            uploads_done: AtomicUsize::new(0),
            last_headers: Mutex::new(None),
            last_path: Mutex::new(None),
            arrived: Semaphore::new(0),
            release: Semaphore::new(0),
        }
    }
}

/// A real hyper 1 server on `127.0.0.1:0`.
///
/// Behaviour by the path's last segment: `slow` (answers only once released), `big?bytes=N`
/// (streams N bytes of [`pattern_byte`] in [`CHUNK`]-sized frames), `upload` (reads the body frame
/// by frame, answers `{"bytes","frames","crc32"}`), `teapot` (418 with its own JSON), `hop`
/// (200 with hop-by-hop response headers); anything else echoes the request as JSON.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to bring an upstream back where it was).
    pub async fn start_at(addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                s.open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let seen = s.clone();
                    let svc = service_fn(move |req| upstream_handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that reached the upstream so far.
    pub fn hits(&self) -> usize {
        self.seen.hits.load(Ordering::SeqCst)
    }

    /// Connections open to the upstream now.
    pub fn open_connections(&self) -> usize {
        self.seen.open.load(Ordering::SeqCst)
    }

    /// The headers of the last request that reached the upstream.
    pub fn last_headers(&self) -> HeaderMap {
        self.seen
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .expect("no request reached the upstream")
    }

    pub fn last_path(&self) -> Option<String> {
        self.seen.last_path.lock().unwrap().clone()
    }

    /// Waits until a `/slow` request has reached the upstream (bounded: 10 s).
    pub async fn slow_arrived(&self) {
        let permit = tokio::time::timeout(Duration::from_secs(10), self.seen.arrived.acquire())
            .await
            .expect("a /slow request should reach the upstream")
            .unwrap();
        permit.forget();
    }

    /// Lets `n` held (or future) `/slow` requests answer.
    pub fn release_slow(&self, n: usize) {
        self.seen.release.add_permits(n);
    }
}

type UpBody = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: Value) -> Response<UpBody> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// The byte at `offset` of every streamed test payload.
pub fn pattern_byte(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// The `index`-th [`CHUNK`]-sized chunk of the test payload (the last may be shorter).
pub fn pattern_chunk(index: usize, total: usize) -> Bytes {
    let start = index * CHUNK;
    let end = (start + CHUNK).min(total);
    Bytes::from((start..end).map(pattern_byte).collect::<Vec<u8>>())
}

async fn upstream_handle(
    seen: Arc<Seen>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    seen.hits.fetch_add(1, Ordering::SeqCst);
    let (parts, mut body) = req.into_parts();
    *seen.last_headers.lock().unwrap() = Some(parts.headers.clone());
    *seen.last_path.lock().unwrap() = Some(parts.uri.path().to_owned());
    let last = parts.uri.path().rsplit('/').next().unwrap_or("").to_owned();
    match last.as_str() {
        "slow" => {
            seen.arrived.add_permits(1);
            seen.release.acquire().await.unwrap().forget();
            Ok(full(StatusCode::OK, json!({ "slow": "released" })))
        }
        "big" => {
            let total: usize = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(8 * 1024 * 1024);
            let chunks = total.div_ceil(CHUNK);
            let stream = futures_util::stream::iter(
                (0..chunks).map(move |i| Ok::<_, Infallible>(Frame::data(pattern_chunk(i, total)))),
            );
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            Ok(r)
        }
        "teapot" => {
            let mut r = full(
                StatusCode::IM_A_TEAPOT,
                json!({ "upstream": "short and stout" }),
            );
            r.headers_mut()
                .insert("x-upstream", http::HeaderValue::from_static("yes"));
            Ok(r)
        }
        "own-limits" => {
            // An API that reports limits of its own ([`UPSTREAM_RATE_FIELDS`]).
            let mut r = full(StatusCode::OK, json!({ "own": "limits" }));
            for (name, value) in UPSTREAM_RATE_FIELDS {
                r.headers_mut()
                    .insert(name, http::HeaderValue::from_static(value));
            }
            Ok(r)
        }
        "hop" => {
            // Hop-by-hop fields in the answer, which must not reach the client.
            let mut r = full(StatusCode::OK, json!({ "hop": true }));
            let h = r.headers_mut();
            h.insert(
                "connection",
                http::HeaderValue::from_static("x-upstream-secret"),
            );
            h.insert(
                "x-upstream-secret",
                http::HeaderValue::from_static("internal"),
            );
            h.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
            h.insert(
                "proxy-authenticate",
                http::HeaderValue::from_static("Basic realm=\"up\""),
            );
            h.insert("x-upstream", http::HeaderValue::from_static("yes"));
            Ok(r)
        }
        "upload" => {
            let mut bytes = 0usize;
            let mut frames = 0usize;
            let mut crc = crc32fast::Hasher::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            frames += 1;
                            bytes += d.len();
                            crc.update(d);
                        }
                    }
                    Err(e) => {
                        return Ok(full(
                            StatusCode::BAD_REQUEST,
                            json!({ "error": e.to_string(), "bytes": bytes }),
                        ));
                    }
                }
            }
            seen.uploads_done.fetch_add(1, Ordering::SeqCst);
            Ok(full(
                StatusCode::OK,
                json!({ "bytes": bytes, "frames": frames, "crc32": crc.finalize() }),
            ))
        }
        _ => {
            let size = body
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            let headers: BTreeMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            Ok(full(
                StatusCode::OK,
                json!({
                    "echo": true,
                    "method": parts.method.as_str(),
                    "path": parts.uri.path(),
                    "query": parts.uri.query(),
                    "body_bytes": size,
                    "headers": headers,
                }),
            ))
        }
    }
}

/// An address nothing listens on: bind `:0`, note the port, close it.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

// ---------------------------------------------------------------------------------------------
// Config

/// The base config; each test changes only the fields it is about.
///
/// Teams: `alpha` (plan free, 100/hour, scope read), `beta` (plan pro, 1000/hour, scopes read and
/// write), `tiny` (plan tiny, `tiny_limit`/hour). Routes, first match wins:
/// `/public/*` (public), `POST /extension/heartbeat` (records a heartbeat, not rate limited),
/// `GET /only-get`, `/teams/{team}/*` (the key's own team only), `/write/*` (scope write),
/// `/api/*`. Anything else is 404.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub upstream: String,
    /// Extra lines of `[proxy]`.
    pub proxy: Vec<String>,
    /// Extra lines of `[upstream]`.
    pub upstream_extra: Vec<String>,
    /// The `credentials.sources` array, as TOML.
    pub sources: String,
    pub heartbeat_required: bool,
    pub heartbeat_window: String,
    pub state_dir: Option<PathBuf>,
    /// `errors.style`.
    pub error_style: String,
    pub doc_url: Option<String>,
    /// Extra `[errors.messages]` entries (`plugin_required` is always [`PLUGIN_MESSAGE`]).
    pub messages: Vec<(String, String)>,
    pub tiny_limit: u32,
    /// The `[[routes]]` tables.
    pub routes: String,
    /// Whole tables (e.g. `[limits]`) placed before the plans.
    pub extra: String,
}

pub const BASE_ROUTES: &str = r#"
[[routes]]
name = "public"
path = "/public/*"
public = true

[[routes]]
name = "heartbeat"
path = "/extension/heartbeat"
methods = ["POST"]
heartbeat = "record"
rate_limited = false

[[routes]]
name = "only-get"
path = "/only-get"
methods = ["GET"]

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
path = "/api/*"
"#;

impl Cfg {
    pub fn new(upstream: impl std::fmt::Display) -> Cfg {
        let upstream = upstream.to_string();
        Cfg {
            upstream: if upstream.starts_with("http") {
                upstream
            } else {
                format!("http://{upstream}")
            },
            proxy: Vec::new(),
            upstream_extra: Vec::new(),
            sources: r#"["x-api-key"]"#.into(),
            heartbeat_required: false,
            heartbeat_window: "48h".into(),
            state_dir: None,
            error_style: "outx".into(),
            doc_url: None,
            messages: Vec::new(),
            tiny_limit: 5,
            routes: BASE_ROUTES.into(),
            extra: String::new(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("[proxy]\nlisten = \"127.0.0.1:0\"\n");
        for l in &self.proxy {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        s.push_str(&format!("\n[upstream]\nurl = \"{}\"\n", self.upstream));
        for l in &self.upstream_extra {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!("\n[credentials]\nsources = {}\n", self.sources));
        s.push_str(&format!(
            "\n[heartbeat]\nwindow = \"{}\"\nrequired = {}\n",
            self.heartbeat_window, self.heartbeat_required
        ));
        if let Some(dir) = &self.state_dir {
            s.push_str(&format!(
                "\n[state]\ndir = {}\n",
                toml_str(&dir.display().to_string())
            ));
        }
        s.push_str(&format!("\n[errors]\nstyle = \"{}\"\n", self.error_style));
        if let Some(url) = &self.doc_url {
            s.push_str(&format!("doc_url = {}\n", toml_str(url)));
        }
        s.push_str("\n[errors.messages]\n");
        s.push_str(&format!("plugin_required = {}\n", toml_str(PLUGIN_MESSAGE)));
        for (code, msg) in &self.messages {
            s.push_str(&format!("{code} = {}\n", toml_str(msg)));
        }
        s.push('\n');
        s.push_str(&self.extra);
        s.push_str(&format!(
            r#"
[plans.free]
limits = [{{ requests = 100, per = "1h" }}]

[plans.pro]
limits = [{{ requests = 1000, per = "1h" }}]

[plans.tiny]
limits = [{{ requests = {tiny}, per = "1h" }}]

[[teams]]
id = "alpha"
plan = "free"
keys = [{{ id = "alpha-key", sha256 = "{alpha}", scopes = ["read"] }}]

[[teams]]
id = "beta"
plan = "pro"
keys = [{{ id = "beta-key", sha256 = "{beta}", scopes = ["read", "write"] }}]

[[teams]]
id = "tiny"
plan = "tiny"
keys = [{{ id = "tiny-key", sha256 = "{tiny_digest}" }}]
"#,
            tiny = self.tiny_limit,
            alpha = sha256_hex(ALPHA_KEY),
            beta = sha256_hex(BETA_KEY),
            tiny_digest = sha256_hex(TINY_KEY),
        ));
        s.push_str(&self.routes);
        s
    }
}

/// The base config for an upstream, unchanged.
pub fn base_toml(upstream: impl std::fmt::Display) -> String {
    Cfg::new(upstream).render()
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

pub fn sha256_hex(key: &str) -> String {
    hex::encode(keygate::gate::keys::digest(key.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Keygate

/// A running keygate on `127.0.0.1:0`.
pub struct Keygate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub server: Arc<Server>,
    pub clock: Clock,
    pub client: reqwest::Client,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl Keygate {
    /// Starts keygate on a config with a manual clock at [`T0`].
    pub async fn start(toml: &str) -> Keygate {
        Keygate::start_with(toml, Clock::manual(T0), None).await
    }

    /// Starts keygate with a given clock and, for reload tests, the config file's path.
    pub async fn start_with(toml: &str, clock: Clock, config_path: Option<PathBuf>) -> Keygate {
        let config = Config::from_toml(toml)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
        Keygate::start_config(config, clock, config_path).await
    }

    pub async fn start_config(
        config: Config,
        clock: Clock,
        config_path: Option<PathBuf>,
    ) -> Keygate {
        let proxy_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Keygate::launch(config, clock, config_path, proxy_l, admin_l)
    }

    /// Builds the server and runs it on the given listeners.
    fn launch(
        config: Config,
        clock: Clock,
        config_path: Option<PathBuf>,
        proxy_l: TcpListener,
        admin_l: TcpListener,
    ) -> Keygate {
        let server = Arc::new(Server::new(
            config,
            Options {
                clock: clock.clone(),
                metrics: Metrics::standalone(),
                config_path,
            },
        ));
        let proxy = proxy_l.local_addr().unwrap();
        let admin = admin_l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(server.clone().run(proxy_l, admin_l, rx));
        Keygate {
            proxy,
            admin,
            server,
            clock,
            client: client(),
            shutdown: tx,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Asks the server to drain and stop, without waiting.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Whether [`Server::run`] has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Drains and stops; panics if the server does not finish within 10 s.
    pub async fn stop(mut self) {
        self.shutdown();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("keygate should stop within 10 s")
                .expect("the server task should not panic");
        }
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Resp {
        let mut rb = self.client.get(self.url(path));
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        send(rb).await
    }

    /// `GET path` with alpha's key, answered as far as its head: the body is left to the test
    /// (to stream it, or to see it fail).
    pub async fn get_streamed(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("x-api-key", ALPHA_KEY)
            .send()
            .await
            .expect("keygate answers a head")
    }

    /// `POST /api/upload` with alpha's key and `body`.
    pub async fn upload(&self, body: impl Into<reqwest::Body>) -> Resp {
        send(
            self.client
                .post(self.url("/api/upload"))
                .header("x-api-key", ALPHA_KEY)
                .body(body),
        )
        .await
    }

    pub async fn post(&self, path: &str, key: Option<&str>) -> Resp {
        let mut rb = self.client.post(self.url(path));
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        send(rb).await
    }

    /// The Prometheus text from the admin listener (which refreshes the gauges).
    pub async fn metrics(&self) -> String {
        let r = send(self.client.get(self.admin_url("/metrics"))).await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.raw.to_vec()).unwrap()
    }

    /// Waits (bounded) until the proxy listener refuses new connections, as it does once a
    /// shutdown has begun; panics if it never does.
    pub async fn wait_until_refused(&self) {
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(self.proxy).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the proxy listener still accepts connections after 5 s");
    }

    /// Records a heartbeat for the team of `key` through the proxy.
    pub async fn heartbeat(&self, key: &str) -> Resp {
        self.post("/extension/heartbeat", Some(key)).await
    }
}

/// The value of one sample in Prometheus text, e.g. `metric(&text, "keygate_heartbeat_stale_teams")`
/// or with labels `metric(&text, r#"keygate_requests_total{outcome="forwarded",route="api"}"#)`.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Client

/// A plain-HTTP client that ignores proxy environment variables.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub raw: Bytes,
    /// The body as JSON (`Null` if it is not JSON).
    pub body: Value,
}

impl Resp {
    /// The field names in the order they came, without hyper's `content-length` and `date`.
    pub fn names(&self) -> Vec<&str> {
        self.headers
            .keys()
            .map(|n| n.as_str())
            .filter(|n| *n != "content-length" && *n != "date")
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.raw).unwrap_or("<binary>")
    }

    /// Asserts an error answer: status, exact body and `application/json`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, body: &str) {
        assert_eq!(self.status, status, "status; body: {}", self.text());
        assert_eq!(self.text(), body, "body of the {status}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "content-type of the {status}"
        );
    }

    /// The upstream's echo of the request headers.
    pub fn echoed(&self, name: &str) -> Option<&str> {
        assert_eq!(
            self.body["echo"],
            true,
            "not an upstream echo: {}",
            self.text()
        );
        self.body["headers"][name].as_str()
    }
}

pub async fn send(rb: reqwest::RequestBuilder) -> Resp {
    let r = rb.send().await.expect("request should get an answer");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let raw = r.bytes().await.expect("response body");
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        raw,
        body,
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it; the request should
/// carry `Connection: close` (or be answered with it).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    match read {
        Ok(r) => {
            r.unwrap();
            text
        }
        Err(_) => panic!("the server did not close the connection within 10 s; it sent:\n{text}"),
    }
}

/// Starts keygate (manual clock at [`T0`]) from a config file in a temp dir, so that
/// `server.reload()` can re-read it after the test rewrites it with [`write_file`].
pub async fn start_from_file(cfg: &Cfg) -> (Keygate, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    write_file(&path, &cfg.render());
    let kg = Keygate::start_with(&cfg.render(), Clock::manual(T0), Some(path.clone())).await;
    (kg, dir, path)
}

/// Writes `text` to `path` atomically (write a sibling, rename), as an operator's editor might.
pub fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Key lifecycle (tests/keys.rs, tests/cli.rs)

/// `toml` as [`Cfg::render`] makes it, with its `[admin]` table replaced: `listen`, and
/// `token_file` if given.
pub fn with_admin(toml: &str, listen: &str, token_file: Option<&Path>) -> String {
    let base = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    assert!(toml.contains(base), "not a Cfg::render config:\n{toml}");
    let mut admin = format!("\n[admin]\nlisten = {}\n", toml_str(listen));
    if let Some(f) = token_file {
        admin.push_str(&format!(
            "token_file = {}\n",
            toml_str(&f.display().to_string())
        ));
    }
    toml.replacen(base, &admin, 1)
}

/// Writes an admin token file in `dir` (with a trailing newline, as an editor leaves it).
pub fn write_token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// Whether `s` is a live key in keygate's issued format: `^sk_live_[0-9A-Za-z]{28}$`.
pub fn is_live_key(s: &str) -> bool {
    s.strip_prefix("sk_live_")
        .is_some_and(|b| b.len() == 28 && b.bytes().all(|c| c.is_ascii_alphanumeric()))
}

impl Keygate {
    /// Starts keygate on listeners the test bound itself, e.g. an admin listener whose port is
    /// written into a config file that the CLI reads.
    pub async fn start_on(
        config: Config,
        clock: Clock,
        proxy_l: TcpListener,
        admin_l: TcpListener,
    ) -> Keygate {
        Keygate::launch(config, clock, None, proxy_l, admin_l)
    }

    /// A call on the admin listener, with `Authorization: Bearer <token>` if given and a JSON
    /// body if given.
    pub async fn admin_call(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut rb = self.client.request(method, self.admin_url(path));
        if let Some(t) = token {
            rb = rb.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        send(rb).await
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`. Only for what the test
/// does not drive (another process such as the CLI, or keygate's own worker finishing with an
/// upstream connection); in-process behaviour is driven without waiting.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 clients for hostile input (tests/abuse.rs)

/// Sends raw bytes on a fresh connection and reads until the server closes it, tolerating what a
/// server that refuses bad input may do: stop reading (the write fails) or reset the connection
/// (the read fails). Returns what was read; panics if the connection is still open after 10 s.
pub async fn raw_until_closed(addr: SocketAddr, request: &[u8]) -> String {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    read_until_closed(s, request).await
}

/// [`raw_until_closed`] on a connection the caller opened (e.g. from another local address).
pub async fn read_until_closed(mut s: tokio::net::TcpStream, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server did not close the connection within 10 s; it sent:\n{}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP connection to `addr` from the local address `ip` (any of 127.0.0.0/8 works on Linux),
/// so one test can be several clients.
pub async fn connect_from(ip: std::net::IpAddr, addr: SocketAddr) -> tokio::net::TcpStream {
    let sock = match ip {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .unwrap();
    sock.bind(SocketAddr::new(ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    sock.connect(addr).await.unwrap()
}

/// The first HTTP/1 answer in raw bytes read off a socket.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    /// The head, field names lowercased, one `name: value` per line.
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    /// Parses the first answer in `raw`; `None` if there is none (the server said nothing).
    pub fn parse(raw: &str) -> Option<RawAnswer> {
        let (head, rest) = raw.split_once("\r\n\r\n")?;
        let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
        let head: String = head
            .lines()
            .map(|l| match l.split_once(':') {
                Some((n, v)) => format!("{}: {}\n", n.to_ascii_lowercase(), v.trim()),
                None => format!("{l}\n"),
            })
            .collect();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let body = rest.get(..len).unwrap_or(rest).to_owned();
        Some(RawAnswer { status, head, body })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}: ", name.to_ascii_lowercase());
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// Asserts one of keygate's error answers: status, exact body, `application/json`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, body: &str) {
        assert_eq!(
            self.status, status,
            "status; answer:\n{}{}",
            self.head, self.body
        );
        assert_eq!(self.body, body, "body of the {status}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "content-type of the {status}"
        );
    }
}

/// One keep-alive HTTP/1 connection driven by hand: raw requests in, whole answers out.
pub struct H1Conn {
    pub stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl H1Conn {
    pub async fn connect(addr: SocketAddr) -> H1Conn {
        H1Conn::on(tokio::net::TcpStream::connect(addr).await.unwrap())
    }

    pub fn on(stream: tokio::net::TcpStream) -> H1Conn {
        H1Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, request: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request).await.unwrap();
    }

    /// Reads one whole answer (with a `Content-Length` body); panics after 10 s or on EOF.
    pub async fn answer(&mut self) -> RawAnswer {
        tokio::time::timeout(Duration::from_secs(10), self.read_answer())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no whole answer within 10 s; got:\n{}",
                    String::from_utf8_lossy(&self.buf)
                )
            })
    }

    async fn read_answer(&mut self) -> RawAnswer {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                assert!(
                    !head
                        .to_ascii_lowercase()
                        .contains("transfer-encoding: chunked"),
                    "H1Conn reads Content-Length answers only:\n{head}"
                );
                let probe = RawAnswer::parse(&head).expect("an HTTP/1.1 status line");
                let len: usize = probe
                    .header("content-length")
                    .map_or(0, |n| n.parse().unwrap());
                if self.buf.len() >= end + 4 + len {
                    let whole: Vec<u8> = self.buf.drain(..end + 4 + len).collect();
                    return RawAnswer::parse(&String::from_utf8_lossy(&whole)).unwrap();
                }
            }
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "the connection closed before a whole answer; got:\n{}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Reads one message head (up to the blank line) from `s` byte by byte, so nothing after it is
/// consumed; `None` at end of stream.
/// A raw-socket upstream on `127.0.0.1:0`: `serve(stream, n)` runs for each connection it
/// accepts, `n` counting them from 0. Returns its address and how many it has accepted.
pub async fn raw_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, count.fetch_add(1, Ordering::SeqCst)));
        }
    });
    (addr, accepted)
}

/// Sends `n` GETs to `{prefix}{i}` at once (as beta) and asserts that each answer is the test
/// upstream's echo of its own path.
pub async fn assert_each_gets_its_own(kg: &Keygate, prefix: &str, n: usize) {
    let each = (0..n).map(|i| {
        let path = format!("{prefix}{i}");
        let rb = kg.client.get(kg.url(&path)).header("x-api-key", BETA_KEY);
        async move { (path, send(rb).await) }
    });
    for (path, r) in futures_util::future::join_all(each).await {
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.body["path"], path.as_str());
    }
}

pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(s, &mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}
