//! The proxy: a thin hyper shell around the [`Gate`].
//!
//! For each request: take the current snapshot, run [`Gate::check`] (synchronous on a cache
//! hit), load a missed key on the blocking pool, then either answer with the denial's JSON or
//! forward over the pooled client and stream the answer back. Nothing here decides access.
//! Plain HTTP/1.1 connections meet the same first steps ([`Proxy::early`]) in the refusal lane
//! ([`lane`]) before hyper serves them.

pub mod body;
pub mod forward;
pub mod h1;
pub mod lane;
pub mod pipe;
pub mod pool;
mod refusal;
pub mod server;
pub mod values;
pub mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::clock::{Now, Stopwatch};
use crate::config::RateHeaders;
use crate::gate::fields::{self, Fields};
use crate::gate::keys::LoadError;
use crate::gate::{Check, Denial, Gate, Grant, KeyView, Outcome, RateInfo, RequestHead, Snapshot};
use body::{BodyFate, GuardedBody};
use forward::{Forwarding, RequestIds, Target, X_REQUEST_ID};

/// The response body: the upstream's, streamed, or one of ours.
pub type ProxyBody = Either<pool::Pooled, Full<Bytes>>;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static JSON: HeaderValue = HeaderValue::from_static("application/json");

/// What every connection's service shares.
pub struct Proxy {
    pub gate: Arc<Gate>,
    upstream: arc_swap::ArcSwap<(Target, pool::Pool)>,
    ids: RequestIds,
    proto: &'static str,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("proto", &self.proto)
            .finish_non_exhaustive()
    }
}

/// What a request carries through forwarding besides itself.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    conn: &'a ConnInfo,
    watch: Stopwatch,
    request_id: &'a HeaderValue,
}

/// A request made ready for the upstream.
struct Upstream {
    req: Request<GuardedBody>,
    /// keygate's fields, written after the request's own.
    hop: forward::Hop,
    /// What became of the body, if there is one.
    fate: Option<Arc<BodyFate>>,
}

/// A refusal's answer, before it becomes hyper's response or the lane's bytes.
struct Refusal {
    status: http::StatusCode,
    fields: refusal::Fields,
    body: Bytes,
}

impl Refusal {
    fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(Either::Right(Full::new(self.body)));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.fields.map();
        resp
    }
}

/// What [`Proxy::early`] made of a request.
enum Early {
    Refused(Refusal),
    /// Granted, or its key is to be loaded.
    Checked(Check),
}

/// Per-connection facts, computed once per connection rather than per request.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub peer_header: HeaderValue,
    /// The listener's drain count: a tunnel holds it open beyond its connection.
    live: Arc<server::Live>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, live: Arc<server::Live>) -> Self {
        ConnInfo {
            peer,
            peer_header: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            live,
        }
    }
}

impl Proxy {
    pub fn new(gate: Arc<Gate>, tls: bool) -> Proxy {
        let snap = gate.snapshot();
        let upstream = Self::upstream(&gate, &snap.config.upstream);
        drop(snap);
        Proxy {
            gate,
            upstream: arc_swap::ArcSwap::from_pointee(upstream),
            ids: RequestIds::default(),
            proto: if tls { "https" } else { "http" },
        }
    }

    fn upstream(gate: &Gate, cfg: &crate::config::UpstreamConfig) -> (Target, pool::Pool) {
        let target = Target::new(&cfg.url);
        let pool = pool::Pool::new(
            target.addr(),
            cfg.tls.as_ref().map(|t| pool::ClientTls {
                config: t.config.clone(),
                server_name: t.server_name.clone(),
            }),
            cfg.connect_timeout,
            cfg.pool_idle_timeout,
            cfg.pool_max_idle,
            cfg.pipeline,
            gate.metrics().upstream_connects.clone(),
        );
        (target, pool)
    }

    /// Closes the upstream pool's stale idle connections ([`pool::Pool::prune`]); the time
    /// until the next pass: half the pool's idle timeout, at most a second (so a reload's
    /// shorter timeout soon applies).
    pub fn prune_upstream(&self) -> std::time::Duration {
        let upstream = self.upstream.load();
        upstream.1.prune();
        (upstream.1.idle_timeout() / 2).min(std::time::Duration::from_secs(1))
    }

    /// Picks up a reloaded upstream: changed pool settings (address, pipelining depth, idle
    /// timeout, size, connect timeout) get a new pool, the same plain-HTTP one keeps its
    /// connections ([`pool::Pool::same_as`]).
    pub fn reloaded(&self, cfg: &crate::config::UpstreamConfig) {
        let (target, pool) = Self::upstream(&self.gate, cfg);
        let current = self.upstream.load();
        let pool = if current.1.same_as(&pool) {
            current.1.clone()
        } else {
            pool
        };
        self.upstream.store(Arc::new((target, pool)));
    }

    /// Handles one request. Every answer carries `x-request-id`: the client's own when
    /// `proxy.trust_forwarded` is set and it sent a sane one, else a new one. `checked` is
    /// what [`Proxy::early`] already made of this request in the refusal lane, if it did.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        checked: Option<Check>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let snap = self.gate.snapshot();
        let request_id = self.request_id(&snap, req.headers());
        let mut resp = self.respond(&snap, req, conn, &request_id, checked).await;
        resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
        Ok(resp)
    }

    /// The client's `x-request-id` when trusted and sane, else a new one.
    fn request_id(&self, snap: &Snapshot, headers: &http::HeaderMap) -> HeaderValue {
        match headers.get(&X_REQUEST_ID) {
            Some(v) if snap.config.proxy.trust_forwarded && sane_request_id(v.as_bytes()) => {
                v.clone()
            }
            _ => self.ids.next(),
        }
    }

    /// What a request meets first, wherever it was read (hyper's service or the refusal
    /// lane): its framing, its field count, then the gate. A refusal here is final; a check
    /// is what [`Proxy::respond`] goes on from.
    fn early(
        &self,
        snap: &Snapshot,
        head: &Head<'_>,
        conn: &ConnInfo,
        watch: &Stopwatch,
        now: Now,
    ) -> Early {
        if let Some(d) = framing_denial(head) {
            snap.count(None, Outcome::Denied(d));
            return Early::Refused(self.refusal(snap, d, None, true));
        }
        // HTTP/1's parser counts fields itself; HTTP/2's only bounds their bytes.
        if head.fields.len() > snap.config.proxy.max_headers {
            snap.count(None, Outcome::Denied(Denial::HeadersTooLarge));
            return Early::Refused(self.refusal(snap, Denial::HeadersTooLarge, None, false));
        }
        let gate_head = head.for_gate(snap, conn);
        self.settle(snap, self.gate.check(snap, &gate_head, now), watch)
    }

    /// A check's refusal made final ([`Proxy::refused`]); any other check goes on.
    fn settle(&self, snap: &Snapshot, check: Check, watch: &Stopwatch) -> Early {
        match check {
            Check::Denied { denial, key, route } => {
                Early::Refused(self.refused(snap, denial, key.as_ref(), route, watch))
            }
            check => Early::Checked(check),
        }
    }

    /// Loads a key the cache missed ([`Check::Lookup`]) and finishes its check.
    async fn lookup(
        &self,
        snap: &Snapshot,
        head: &Head<'_>,
        conn: &ConnInfo,
        now: Now,
        digest: crate::gate::keys::Digest,
    ) -> Check {
        let head = head.for_gate(snap, conn);
        let loaded = if self.gate.loads_inline() {
            // Declared keys only: a miss is a map lookup, not worth a thread hop.
            self.gate.load(&digest)
        } else {
            let gate = self.gate.clone();
            tokio::task::spawn_blocking(move || gate.load(&digest))
                .await
                .unwrap_or_else(|_| Err(LoadError::Store("lookup task failed".into())))
        };
        self.gate.resume(snap, &head, now, loaded)
    }

    /// A gate's refusal: counted, its overhead observed, and its answer.
    fn refused(
        &self,
        snap: &Snapshot,
        d: Denial,
        key: Option<&KeyView>,
        route: Option<u16>,
        watch: &Stopwatch,
    ) -> Refusal {
        snap.count(route, Outcome::Denied(d));
        self.gate
            .metrics()
            .overhead_seconds
            .observe(watch.elapsed().as_secs_f64());
        self.refusal(snap, d, key, false)
    }

    async fn respond(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        checked: Option<Check>,
    ) -> Response<ProxyBody> {
        let watch = Stopwatch::start();
        let now = self.gate.clock().now_at(&watch);
        let (parts, body) = req.into_parts();
        let head = Head::of(&parts);
        let mut check = match checked {
            Some(c) => c,
            None => match self.early(snap, &head, conn, &watch, now) {
                Early::Refused(r) => return r.into_response(),
                Early::Checked(c) => c,
            },
        };
        if let Check::Lookup(digest) = check {
            check = self.lookup(snap, &head, conn, now, digest).await;
        }
        let grant = match check {
            Check::Granted(g) => g,
            Check::Denied {
                denial: d,
                key,
                route,
            } => {
                return self
                    .refused(snap, d, key.as_ref(), route, &watch)
                    .into_response()
            }
            Check::Lookup(_) => {
                snap.count(None, Outcome::Denied(Denial::StoreUnavailable));
                return self.denial(snap, Denial::StoreUnavailable, None, false);
            }
        };
        let route = &snap.routes.get(grant.route).config;
        if route.usage {
            snap.count(Some(grant.route), Outcome::Served);
            return self.usage(snap, &grant, now);
        }
        let tunnel = parts.method == Method::CONNECT
            || parts.headers.contains_key(header::UPGRADE)
            || forward::connection_has(&parts.headers, "upgrade");
        // A tunnel needs HTTP/1.1's upgrade; HTTP/2's extended CONNECT is not offered.
        if tunnel && (!route.upgrade || parts.version != http::Version::HTTP_11) {
            snap.count(Some(grant.route), Outcome::Denied(Denial::BadRequest));
            return self.denial(snap, Denial::BadRequest, grant.key.as_ref(), false);
        }
        let max_body = snap.config.proxy.max_body_bytes;
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
            if len
                .to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_none_or(|n| n > max_body)
            {
                snap.count(Some(grant.route), Outcome::Denied(Denial::PayloadTooLarge));
                return self.denial(snap, Denial::PayloadTooLarge, grant.key.as_ref(), true);
            }
        }
        let ctx = Ctx {
            conn,
            watch,
            request_id,
        };
        if tunnel {
            return self.tunnel(snap, parts, body, grant, &ctx).await;
        }
        self.forward(snap, parts, body, grant, &ctx).await
    }

    /// The upstream's request: origin-form URI under the target's base, headers rewritten for
    /// the hop (keygate's own fields, and `Host` unless preserved, are returned apart: see
    /// [`forward::Hop`]), the body guarded by the size and stall limits.
    fn upstream_request(
        &self,
        snap: &Snapshot,
        target: &Target,
        mut parts: http::request::Parts,
        body: Incoming,
        grant: &Grant,
        ctx: &Ctx<'_>,
    ) -> Result<Upstream, Denial> {
        let cfg = &snap.config;
        let uri = target.uri(&parts.uri).map_err(|_| Denial::BadRequest)?;
        let mut hop = forward::request_headers(
            &mut parts.headers,
            &Forwarding {
                credential_headers: snap.credentials.header_names(),
                key: grant.key.as_ref(),
                peer: &ctx.conn.peer_header,
                proto: self.proto,
                trust_forwarded: cfg.proxy.trust_forwarded,
                request_id: ctx.request_id,
            },
        );
        if !cfg.upstream.preserve_host {
            hop.host = Some(target.host().clone());
        } else if !parts.headers.contains_key(header::HOST) {
            // HTTP/2 clients send :authority instead of Host; HTTP/1.1 upstreams need Host.
            let host = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| target.host().clone());
            hop.host = Some(host);
        }
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        // An empty body cannot fail: no record of its fate (an allocation) for it.
        let fate = (!http_body::Body::is_end_stream(&body)).then(|| Arc::new(BodyFate::default()));
        let body = GuardedBody::new(
            body,
            cfg.proxy.max_body_bytes,
            cfg.proxy.body_timeout,
            fate.clone(),
        );
        Ok(Upstream {
            req: Request::from_parts(parts, body),
            hop,
            fate,
        })
    }

    async fn forward(
        &self,
        snap: &Snapshot,
        parts: http::request::Parts,
        body: Incoming,
        grant: Grant,
        ctx: &Ctx<'_>,
    ) -> Response<ProxyBody> {
        let cfg = &snap.config;
        let upstream = self.upstream.load();
        let (target, pool) = &**upstream;
        let Upstream { req, hop, fate } =
            match self.upstream_request(snap, target, parts, body, &grant, ctx) {
                Ok(r) => r,
                Err(d) => {
                    snap.count(Some(grant.route), Outcome::Denied(d));
                    return self.denial(snap, d, grant.key.as_ref(), false);
                }
            };
        let watch = ctx.watch;
        let metrics = self.gate.metrics();
        let upstream_watch = Stopwatch::start();
        metrics
            .overhead_seconds
            .observe(upstream_watch.since(&watch).as_secs_f64());
        let result =
            tokio::time::timeout(cfg.upstream.request_timeout, pool.send(req, &hop.extra())).await;
        metrics
            .upstream_seconds
            .observe(upstream_watch.elapsed().as_secs_f64());
        let denial = match result {
            Ok(Ok(resp)) => {
                snap.count(Some(grant.route), Outcome::Forwarded);
                let (mut rparts, rbody) = resp.into_parts();
                // The body is streamed as is, so the upstream's Content-Length stays valid.
                forward::strip_hop_by_hop(&mut rparts.headers, false);
                if let Some(k) = &grant.key {
                    rate_headers(
                        &mut rparts.headers,
                        snap.config.limits.headers,
                        k,
                        grant.rate.as_ref(),
                    );
                }
                return Response::from_parts(rparts, Either::Left(rbody));
            }
            Ok(Err(e)) => {
                let fate = fate.as_deref();
                if fate.is_some_and(BodyFate::too_large) {
                    Denial::PayloadTooLarge
                } else if fate.is_some_and(BodyFate::stalled) {
                    Denial::RequestTimeout
                } else if fate.is_some_and(BodyFate::malformed) {
                    // The client's fault, not the upstream's: no 502, no upstream alert.
                    Denial::BadRequest
                } else {
                    tracing::warn!(error = %e, "upstream request failed");
                    Denial::UpstreamUnavailable
                }
            }
            Err(_) => Denial::UpstreamTimeout,
        };
        snap.count(Some(grant.route), Outcome::Denied(denial));
        let close = matches!(
            denial,
            Denial::PayloadTooLarge | Denial::RequestTimeout | Denial::BadRequest
        );
        self.denial(snap, denial, grant.key.as_ref(), close)
    }

    /// An upgrade (WebSocket) or `CONNECT` on a route that allows it: the request goes to the
    /// upstream on a connection of its own, and if the upstream switches protocols (101, or 2xx
    /// to `CONNECT`) the two connections are spliced until either side closes. Any other answer
    /// is passed back as an ordinary response.
    async fn tunnel(
        &self,
        snap: &Snapshot,
        mut parts: http::request::Parts,
        body: Incoming,
        grant: Grant,
        ctx: &Ctx<'_>,
    ) -> Response<ProxyBody> {
        let connect = parts.method == Method::CONNECT;
        let (Some(client_side), upgrade) = (
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
            parts.headers.get(header::UPGRADE).cloned(),
        ) else {
            snap.count(Some(grant.route), Outcome::Denied(Denial::BadRequest));
            return self.denial(snap, Denial::BadRequest, grant.key.as_ref(), false);
        };
        let upstream = self.upstream.load();
        let (target, pool) = &**upstream;
        let mut req = match self.upstream_request(snap, target, parts, body, &grant, ctx) {
            Ok(Upstream { mut req, hop, .. }) => {
                // hyper's client sends a tunnel's request: the fields go into its map.
                hop.insert_into(req.headers_mut());
                req
            }
            Err(d) => {
                snap.count(Some(grant.route), Outcome::Denied(d));
                return self.denial(snap, d, grant.key.as_ref(), false);
            }
        };
        // Hop-by-hop, so stripped above; an upgrade needs them on this hop too.
        if let Some(u) = upgrade {
            req.headers_mut().insert(header::UPGRADE, u);
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let timeout = snap.config.upstream.request_timeout;
        let mut resp = match tokio::time::timeout(timeout, pool.tunnel(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream tunnel request failed");
                snap.count(
                    Some(grant.route),
                    Outcome::Denied(Denial::UpstreamUnavailable),
                );
                return self.denial(snap, Denial::UpstreamUnavailable, grant.key.as_ref(), false);
            }
            Err(_) => {
                snap.count(Some(grant.route), Outcome::Denied(Denial::UpstreamTimeout));
                return self.denial(snap, Denial::UpstreamTimeout, grant.key.as_ref(), false);
            }
        };
        snap.count(Some(grant.route), Outcome::Forwarded);
        let switched = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
            || (connect && resp.status().is_success());
        let upgrade = resp.headers().get(header::UPGRADE).cloned();
        forward::strip_hop_by_hop(resp.headers_mut(), false);
        if let Some(k) = &grant.key {
            rate_headers(
                resp.headers_mut(),
                snap.config.limits.headers,
                k,
                grant.rate.as_ref(),
            );
        }
        if !switched {
            let (rparts, rbody) = resp.into_parts();
            return Response::from_parts(rparts, Either::Left(pool::Pooled::unpooled(rbody)));
        }
        if let Some(u) = upgrade {
            resp.headers_mut().insert(header::UPGRADE, u);
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let tunnels = self.gate.metrics().tunnels_open.clone();
        // A drain waits for open tunnels too (up to its timeout), as for requests in flight.
        let draining = ctx.conn.live.enter();
        tokio::spawn(async move {
            let _draining = draining;
            let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel upgrade failed");
                    return;
                }
            };
            tunnels.inc();
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut upstream = hyper_util::rt::TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
            tunnels.dec();
        });
        let (rparts, _) = resp.into_parts();
        Response::from_parts(rparts, Either::Right(Full::new(Bytes::new())))
    }

    /// A denial's response: status, JSON body, and the headers it calls for.
    pub fn denial(
        &self,
        snap: &Snapshot,
        d: Denial,
        key: Option<&KeyView>,
        close: bool,
    ) -> Response<ProxyBody> {
        self.refusal(snap, d, key, close).into_response()
    }

    fn refusal(&self, snap: &Snapshot, d: Denial, key: Option<&KeyView>, close: bool) -> Refusal {
        Refusal {
            status: d.status(),
            fields: denial_fields(snap, d, key, close),
            body: snap.errors.body(d),
        }
    }

    /// The self-service usage answer: the caller's own key, plan, limits and heartbeat.
    fn usage(&self, snap: &Snapshot, grant: &Grant, now: Now) -> Response<ProxyBody> {
        let Some(k) = &grant.entry else {
            return Response::new(Either::Right(Full::new(Bytes::from_static(b"{}"))));
        };
        let usage = &k.usage;
        let limits: Vec<_> = k
            .team
            .limits
            .specs()
            .map(|s| serde_json::json!({ "requests": s.requests, "per_seconds": s.per.as_secs_f64(), "burst": s.burst }))
            .collect();
        let body = serde_json::json!({
            "key_id": k.key_id(),
            "team": &*k.team.id,
            "plan": &*k.team.plan,
            "limits": limits,
            "remaining": grant.rate.map(|r| r.remaining),
            "reset_seconds": grant.rate.map(|r| r.reset_secs),
            "heartbeat_age_seconds": self.gate.heartbeat_age(&k.team.id, now.wall_ms),
            "heartbeat_required": k.team.heartbeat_required,
            "key_expires_at": k.expires_at().map(millis_to_rfc3339),
            "requests": usage.total(),
            "last_used_at": usage.last_used().map(millis_to_rfc3339),
        });
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, JSON.clone());
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        rate_headers(
            resp.headers_mut(),
            snap.config.limits.headers,
            &k.view(),
            grant.rate.as_ref(),
        );
        resp
    }
}

/// A denial's headers, from its shape's template ([`refusal`]). A refusal is either keyed
/// (the gate knew the key) or carries `Retry-After` or `Allow`, never two of these, except
/// the over-limit one, which has shapes of its own (one per `limits.headers` that sends any).
fn denial_fields(
    snap: &Snapshot,
    d: Denial,
    key: Option<&KeyView>,
    close: bool,
) -> refusal::Fields {
    use refusal::{Fields, Shape, Value};
    let sent = snap.config.limits.headers;
    match (d, key) {
        (Denial::RateLimited(i), Some(k)) if sent != RateHeaders::None => {
            let retry = Value::Int(i.retry_after_secs);
            let policy = Value::Header(k.policy_header.clone());
            let rate = Value::Rate {
                name: k.limits_name,
                remaining: i.remaining,
                secs: ratelimit_secs(&i),
            };
            let limit = Value::Header(i.limit_header.clone());
            let (remaining, reset) = (Value::Int(i.remaining.into()), Value::Int(i.reset_secs));
            match sent {
                RateHeaders::Draft => {
                    Fields::new(Shape::LimitedDraft, [retry, policy, rate], close)
                }
                RateHeaders::XRateLimit => {
                    Fields::new(Shape::LimitedX, [retry, limit, remaining, reset], close)
                }
                _ => Fields::new(
                    Shape::Limited,
                    [retry, policy, rate, limit, remaining, reset],
                    close,
                ),
            }
        }
        (
            Denial::RateLimited(RateInfo {
                retry_after_secs, ..
            })
            | Denial::TooManyFailedAuth { retry_after_secs },
            _,
        ) => Fields::new(Shape::Retry, [Value::Int(retry_after_secs)], close),
        (Denial::MethodNotAllowed { group }, _) => Fields::new(
            Shape::Allow,
            [Value::Header(snap.routes.allow(group).clone())],
            close,
        ),
        (_, Some(k)) if sent.draft() => Fields::new(
            Shape::Keyed,
            [Value::Header(k.policy_header.clone())],
            close,
        ),
        _ => Fields::new(Shape::Plain, [], close),
    }
}

/// The client's `x-request-id`, if it is trusted and sane.
fn client_request_id<'h>(snap: &Snapshot, fields: Fields<'h>) -> Option<&'h [u8]> {
    if !snap.config.proxy.trust_forwarded {
        return None;
    }
    fields.get(&X_REQUEST_ID).filter(|v| sane_request_id(v))
}

/// Short and visible ASCII: safe to send back and to log.
fn sane_request_id(v: &[u8]) -> bool {
    v.len() <= 128 && fields::visible(v).is_some()
}

/// What [`Proxy::early`] reads of a request: hyper's parts, or the refusal lane's raw head.
pub(crate) struct Head<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub version: http::Version,
    pub fields: Fields<'a>,
}

impl<'a> Head<'a> {
    fn of(parts: &'a http::request::Parts) -> Head<'a> {
        Head {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            fields: Fields::Map(&parts.headers),
        }
    }

    /// What the gate reads of it.
    fn for_gate(&self, snap: &Snapshot, conn: &ConnInfo) -> RequestHead<'a> {
        RequestHead {
            method: self.method,
            path: self.uri.path(),
            fields: self.fields,
            peer: client_addr(self.fields, conn, snap.config.proxy.trust_forwarded),
        }
    }
}

/// The client's address for per-address budgets: the peer, or — behind a trusted proxy — the
/// address that proxy appended last to `X-Forwarded-For` (entries to its left are the client's
/// own claims and are not trusted).
fn client_addr(fields: Fields<'_>, conn: &ConnInfo, trust_forwarded: bool) -> std::net::IpAddr {
    if trust_forwarded {
        let last = fields
            .get_all(&forward::X_FORWARDED_FOR)
            .next_back()
            .and_then(fields::visible)
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse().ok());
        if let Some(ip) = last {
            return ip;
        }
    }
    conn.peer.ip()
}

/// RFC 3339 in UTC, for JSON answers.
pub fn millis_to_rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `RateLimit-Policy`, `RateLimit` (the IETF draft's fields) and `X-RateLimit-*`, as
/// `limits.headers` says. Each replaces the upstream's field of that name; the families not
/// sent pass through.
fn rate_headers(h: &mut http::HeaderMap, sent: RateHeaders, k: &KeyView, info: Option<&RateInfo>) {
    if sent.draft() {
        h.insert(RATELIMIT_POLICY.clone(), k.policy_header.clone());
        if let Some(i) = info {
            h.insert(
                RATELIMIT.clone(),
                refusal::ratelimit(k.limits_name, i.remaining, ratelimit_secs(i)),
            );
        }
    }
    if let Some(i) = info.filter(|_| sent.x_ratelimit()) {
        h.insert(X_RATELIMIT_LIMIT.clone(), i.limit_header.clone());
        h.insert(
            X_RATELIMIT_REMAINING.clone(),
            values::int(i.remaining.into()),
        );
        h.insert(X_RATELIMIT_RESET.clone(), values::int(i.reset_secs));
    }
}

/// The seconds the IETF draft's `RateLimit` gives: until all is there again, or until the next
/// request may pass when none remains.
fn ratelimit_secs(i: &RateInfo) -> u64 {
    if i.remaining == 0 {
        i.retry_after_secs.max(i.reset_secs)
    } else {
        i.reset_secs
    }
}

/// `name` or `name:port` with letters, digits, `.` and `-` only: surely a valid authority, so
/// the common `Host` needs no (allocating) parse.
fn plain_host(b: &[u8]) -> bool {
    let (name, port) = match b.iter().position(|&c| c == b':') {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    !name.is_empty()
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'-')
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit))
}

/// Requests whose framing or target cannot be forwarded safely: HTTP/1.1 without exactly one
/// valid `Host`, a `Host` with userinfo, or both `Content-Length` and `Transfer-Encoding`
/// (request smuggling), or several `Content-Length`s. The connection is closed after the 400.
fn framing_denial(head: &Head<'_>) -> Option<Denial> {
    let h = head.fields;
    if head.version == http::Version::HTTP_11 || head.version == http::Version::HTTP_10 {
        let mut hosts = h.get_all(&header::HOST);
        match (hosts.next(), hosts.next()) {
            (Some(b), None) => {
                if b.is_empty() && head.version == http::Version::HTTP_11 || b.contains(&b'@') {
                    return Some(Denial::BadRequest);
                }
                if !b.is_empty()
                    && !plain_host(b)
                    && fields::visible(b)
                        .and_then(|s| s.parse::<http::uri::Authority>().ok())
                        .is_none()
                {
                    return Some(Denial::BadRequest);
                }
            }
            (None, _) if head.version == http::Version::HTTP_11 => return Some(Denial::BadRequest),
            (Some(_), Some(_)) => return Some(Denial::BadRequest),
            _ => {}
        }
    }
    let mut lens = h.get_all(&header::CONTENT_LENGTH);
    let first_len = lens.next();
    if lens.next().is_some() || (first_len.is_some() && h.contains(&header::TRANSFER_ENCODING)) {
        return Some(Denial::BadRequest);
    }
    // keygate streams bodies as they come and can apply no coding but chunked: anything else
    // (`gzip, chunked`) would be silently dropped on the way upstream.
    if h.get_all(&header::TRANSFER_ENCODING).any(|v| {
        v.split(|&b| b == b',')
            .any(|t| !t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    }) {
        return Some(Denial::BadRequest);
    }
    if head
        .uri
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Some(Denial::BadRequest);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_hosts_skip_the_parse_and_agree_with_it() {
        for h in [
            "example.com",
            "a-b.c:8080",
            "127.0.0.1",
            "localhost:1",
            "x:65535",
        ] {
            assert!(plain_host(h.as_bytes()), "{h}");
            assert!(h.parse::<http::uri::Authority>().is_ok(), "{h}");
        }
        // Not plain: left to the full parse, which accepts some and refuses others.
        for h in [
            "", ":80", "a:", "a:123456", "[::1]:80", "a b", "a:8:8", "u@h", "h%41",
        ] {
            assert!(!plain_host(h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn framing_refuses_hosts_the_parse_refuses() {
        let parts = |host: &'static str| {
            let (p, ()) = Request::builder()
                .uri("/x")
                .header(header::HOST, host)
                .body(())
                .unwrap()
                .into_parts();
            p
        };
        for ok in ["example.com:8080", "[::1]:80", "h.example"] {
            assert_eq!(framing_denial(&Head::of(&parts(ok))), None, "{ok}");
        }
        for bad in ["a b", "a/b", "u@h", "a:b:c:d"] {
            assert_eq!(
                framing_denial(&Head::of(&parts(bad))),
                Some(Denial::BadRequest),
                "{bad}"
            );
        }
    }
}
