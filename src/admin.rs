//! The admin listener (loopback by default, never the proxy's port).
//!
//! Endpoints:
//! - `GET /metrics` — Prometheus text; gauges are refreshed on each scrape.
//! - `GET /healthz` — 200 while the process serves.
//! - `GET /readyz` — 200 once the proxy accepts, 503 while starting or draining.
//!
//! The admin API, under `/admin/`, needs `Authorization: Bearer <admin token>` (the token comes
//! from `admin.token_env` or `admin.token_file`, is compared in constant time and never logged;
//! without one configured the API is off). JSON in, JSON out; errors are `{"error": "…"}`.
//! - `GET /admin/teams`, `POST /admin/teams`, `PUT /admin/teams/{id}` — list, create, update
//! - `POST /admin/teams/{id}/heartbeat` — record a heartbeat for the team
//! - `GET /admin/keys[?team=T]`, `POST /admin/keys` — list, create (the key is in the answer,
//!   and only there)
//! - `GET /admin/keys/{id}`, `GET /admin/keys/{id}/usage`
//! - `POST /admin/keys/{id}/revoke` — refused on the very next request
//! - `POST /admin/keys/{id}/rotate` `{"grace":"24h"}` — a new key; the old one works for the grace
//! - `POST /admin/cache/invalidate` `{"key_id":…}` or `{}` — what the CLI calls after it writes

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Server;

/// Serves the admin endpoints until shutdown.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = crate::server::stopped(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(&server, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(server: &Arc<Server>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let s = server.clone();
            let text = tokio::task::spawn_blocking(move || {
                s.refresh_gauges();
                s.gate.metrics().render()
            })
            .await
            .unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => {
            if server.is_ready() {
                json(StatusCode::OK, serde_json::json!({ "status": "ready" }))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "not ready" }),
                )
            }
        }
        (_, path) if path.starts_with("/admin/") => api(server, req).await,
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "Not Found" }),
        ),
    }
}
fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": msg.to_string() }))
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

async fn read_json<T: serde::de::DeserializeOwned + Default>(
    body: Incoming,
) -> Result<T, Response<Full<Bytes>>> {
    use http_body_util::BodyExt;
    let bytes = http_body_util::Limited::new(body, MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            )
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format_args!("invalid JSON: {e}")))
}

fn manage_error(e: crate::manage::ManageError) -> Response<Full<Bytes>> {
    use crate::manage::ManageError as M;
    match e {
        M::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        M::NotFound(m) => error(StatusCode::NOT_FOUND, format_args!("{m} not found")),
        M::Conflict(m) => error(StatusCode::CONFLICT, m),
        M::Store(e) => {
            tracing::error!(error = %e, "admin API: store failure");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key store is unavailable",
            )
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default, with = "humantime_serde")]
    grace: Option<std::time::Duration>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    #[serde(default)]
    key_id: Option<String>,
}

/// Runs a blocking store operation off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response<Full<Bytes>>> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "the operation failed"))
}

/// The admin API (see the module docs).
async fn api(server: &Arc<Server>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(token) = server.admin_token() else {
        return error(
            StatusCode::FORBIDDEN,
            "the admin API is off: set admin.token_env or admin.token_file",
        );
    };
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| v[7..].trim_ascii())
        .unwrap_or(b"");
    if !token_matches(given, &token) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
    }
    let Some(store) = server.store.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no key store: set state.dir to manage keys and teams",
        );
    };
    let config = server.gate.snapshot().config.clone();
    let now = server.gate.clock().now().wall_ms;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let segs: Vec<String> = path
        .trim_start_matches("/admin/")
        .split('/')
        .map(str::to_owned)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let body = req.into_body();
    let s = server.clone();
    let result = match (method, segs.as_slice()) {
        (Method::GET, ["teams"]) => blocking(move || crate::manage::list_teams(&config, &store))
            .await
            .map(|r| match r {
                Ok(t) => json(StatusCode::OK, serde_json::json!({ "teams": t })),
                Err(e) => manage_error(e),
            }),
        (m @ (Method::POST | Method::PUT), ["teams"] | ["teams", _]) => {
            let mut t: crate::manage::TeamRequest = match read_json::<Option<_>>(body).await {
                Ok(Some(t)) => t,
                Ok(None) => return error(StatusCode::BAD_REQUEST, "a JSON team is required"),
                Err(r) => return r,
            };
            if let ["teams", id] = segs.as_slice() {
                t.id = (*id).to_owned();
            }
            let created = m == Method::POST;
            blocking(move || crate::manage::upsert_team(&config, &store, &t, now).map(|()| t.id))
                .await
                .map(|r| match r {
                    Ok(id) => {
                        // A changed plan must reach the team's cached keys at once.
                        s.gate.invalidate_all();
                        let status = if created {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        json(status, serde_json::json!({ "id": id }))
                    }
                    Err(e) => manage_error(e),
                })
        }
        (Method::POST, ["teams", id, "heartbeat"]) => {
            if !crate::config::valid_id(id) {
                return error(StatusCode::BAD_REQUEST, "invalid team id");
            }
            let team = (*id).to_owned();
            let known = {
                let config = config.clone();
                let team = team.clone();
                blocking(move || {
                    config.teams.iter().any(|t| t.id == team)
                        || crate::store::KeyStore::find_team(&*store, &team)
                            .ok()
                            .flatten()
                            .is_some()
                })
                .await
            };
            match known {
                Ok(true) => {}
                Ok(false) => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format_args!("team {team:?} not found"),
                    )
                }
                Err(r) => return r,
            }
            s.gate.heartbeats.record_team(id, now);
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "team": id, "heartbeat_at": crate::proxy::millis_to_rfc3339(now) }),
            ))
        }
        (Method::GET, ["keys"]) => {
            let team = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("team="))
                .map(str::to_owned);
            blocking(move || store.list_keys(team.as_deref()))
                .await
                .map(|r| match r {
                    Ok(keys) => {
                        let keys: Vec<_> = keys.into_iter().map(|k| s.with_live_usage(k)).collect();
                        json(StatusCode::OK, serde_json::json!({ "keys": keys }))
                    }
                    Err(e) => manage_error(e.into()),
                })
        }
        (Method::POST, ["keys"]) => {
            let r: crate::manage::KeyRequest = match read_json(body).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            blocking(move || crate::manage::create_key(&config, &store, &r, now))
                .await
                .map(|r| match r {
                    Ok(k) => json(
                        StatusCode::CREATED,
                        serde_json::to_value(k).unwrap_or_default(),
                    ),
                    Err(e) => manage_error(e),
                })
        }
        (Method::GET, ["keys", id]) | (Method::GET, ["keys", id, "usage"]) => {
            let usage_only = segs.len() == 3;
            let id = (*id).to_owned();
            blocking(move || store.get_key(&id)).await.map(|r| match r {
                Ok(Some(k)) => {
                    let k = s.with_live_usage(k);
                    if usage_only {
                        json(
                            StatusCode::OK,
                            serde_json::json!({
                                "key_id": k.key_id,
                                "requests": k.use_count,
                                "last_used_at": k.last_used_at,
                            }),
                        )
                    } else {
                        json(StatusCode::OK, serde_json::to_value(k).unwrap_or_default())
                    }
                }
                Ok(None) => error(StatusCode::NOT_FOUND, "key not found"),
                Err(e) => manage_error(e.into()),
            })
        }
        (Method::POST, ["keys", id, "revoke"]) => {
            let id = (*id).to_owned();
            blocking(move || crate::manage::revoke_key(&store, &id, now).map(|d| (d, id)))
                .await
                .map(|r| match r {
                    Ok((d, id)) => {
                        s.gate.invalidate(&d);
                        json(
                            StatusCode::OK,
                            serde_json::json!({ "key_id": id, "revoked": true }),
                        )
                    }
                    Err(e) => manage_error(e),
                })
        }
        (Method::POST, ["keys", id, "rotate"]) => {
            let r: RotateBody = match read_json(body).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let id = (*id).to_owned();
            let grace = r.grace.unwrap_or_default();
            blocking(move || crate::manage::rotate_key(&config, &store, &id, grace, now))
                .await
                .map(|r| match r {
                    Ok((k, old)) => {
                        s.gate.invalidate(&old);
                        json(
                            StatusCode::CREATED,
                            serde_json::to_value(k).unwrap_or_default(),
                        )
                    }
                    Err(e) => manage_error(e),
                })
        }
        (Method::POST, ["cache", "invalidate"]) => {
            let r: InvalidateBody = match read_json(body).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            match r.key_id {
                Some(id) => blocking(move || store.key_digest(&id))
                    .await
                    .map(|r| match r {
                        Ok(Some(d)) => {
                            s.gate.invalidate(&d);
                            json(StatusCode::OK, serde_json::json!({ "invalidated": 1 }))
                        }
                        Ok(None) => error(StatusCode::NOT_FOUND, "key not found"),
                        Err(e) => manage_error(e.into()),
                    }),
                None => {
                    s.gate.invalidate_all();
                    Ok(json(
                        StatusCode::OK,
                        serde_json::json!({ "invalidated": "all" }),
                    ))
                }
            }
        }
        _ => Ok(error(StatusCode::NOT_FOUND, "no such admin endpoint")),
    };
    result.unwrap_or_else(|r| r)
}

/// Constant-time comparison of a presented admin token with the configured one.
pub fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Compare digests, so the time taken does not depend on where the two first differ or on
    // the presented token's length.
    let a = crate::gate::keys::digest(given);
    let b = crate::gate::keys::digest(token);
    !token.is_empty() && bool::from(a.ct_eq(&b))
}
