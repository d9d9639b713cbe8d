//! Why a request was refused, and what the client is told.
//!
//! [`Denial`] is a small `Copy` enum; status, code and default message are mapped in one table
//! ([`Denial::spec`]), and [`ErrorBodies`] renders every JSON body once per config snapshot so a
//! refusal costs no formatting.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::config::{ErrorStyle, ErrorsConfig};

/// The rate-limit state reported to a client: the most constrained of its plan's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateInfo {
    /// Requests allowed per window.
    pub limit: u32,
    /// `limit` as a header value, made once per limit (interned).
    pub limit_header: &'static HeaderValue,
    /// Requests left right now.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds until the next request may pass (only when denied).
    pub retry_after_secs: u64,
}

/// A refusal. Every variant maps to one status and one JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No route matches the path.
    NotFound,
    /// A route matches the path but not the method; `group` indexes the route table's `Allow`.
    MethodNotAllowed { group: u16 },
    /// The request is malformed (dot segments, conflicting framing, forbidden upgrade, …).
    BadRequest,
    /// No key in any configured source.
    MissingKey,
    /// Unknown, malformed, revoked or expired key: one answer for all, so none can be told apart.
    InvalidKey,
    /// Not the team's resource, or the key's environment is not allowed here.
    AccessDenied,
    /// The key lacks a scope the route requires.
    InsufficientScope,
    /// The team's heartbeat is older than the window.
    PluginRequired,
    /// Over the plan's limit.
    RateLimited(RateInfo),
    /// Too many failed authentications from this client address.
    TooManyFailedAuth { retry_after_secs: u64 },
    /// The request body is over the configured limit.
    PayloadTooLarge,
    /// The key store cannot be reached and the key is not cached: fail closed.
    StoreUnavailable,
    /// The upstream refused the connection or failed mid-exchange.
    UpstreamUnavailable,
    /// The upstream did not answer within the request timeout.
    UpstreamTimeout,
    /// The client's request body stalled longer than the body timeout.
    RequestTimeout,
    /// More header fields than `proxy.max_headers` (HTTP/2; hyper refuses HTTP/1 itself).
    HeadersTooLarge,
}

/// Status, machine code, structured-style code and default message of one denial kind.
#[derive(Debug)]
pub struct Spec {
    pub status: StatusCode,
    pub code: &'static str,
    pub structured_code: &'static str,
    pub message: &'static str,
}

const fn spec(
    status: u16,
    code: &'static str,
    structured_code: &'static str,
    message: &'static str,
) -> Spec {
    let status = match StatusCode::from_u16(status) {
        Ok(s) => s,
        Err(_) => panic!("bad status in the denial table"),
    };
    Spec {
        status,
        code,
        structured_code,
        message,
    }
}

/// The denial table, indexed by [`Denial::index`]. Pinned by a test.
static SPECS: [Spec; 16] = [
    spec(404, "not_found", "not_found", "Not Found"),
    spec(405, "method_not_allowed", "method_not_allowed", "Method Not Allowed"),
    spec(400, "bad_request", "bad_request", "Bad Request"),
    spec(401, "missing_key", "unauthorized", "Missing API Key"),
    spec(401, "invalid_key", "unauthorized", "Invalid API Key"),
    spec(403, "access_denied", "forbidden", "Access denied: You don't have permission to access this resource"),
    spec(403, "insufficient_scope", "insufficient_scope", "Access denied: You don't have permission to access this resource"),
    spec(
        403,
        "plugin_required",
        "plugin_required",
        "Plugin installation required: no team member's client has been active within the heartbeat window.",
    ),
    spec(429, "rate_limited", "rate_limit_exceeded", "Too Many Requests: rate limit exceeded"),
    spec(429, "too_many_failed_auth", "rate_limit_exceeded", "Too Many Requests: too many failed authentications"),
    spec(413, "payload_too_large", "payload_too_large", "Payload Too Large"),
    spec(503, "store_unavailable", "service_unavailable", "Service Unavailable: the key store cannot be reached"),
    spec(502, "upstream_unavailable", "bad_gateway", "Bad Gateway: the upstream is unavailable"),
    spec(504, "upstream_timeout", "gateway_timeout", "Gateway Timeout: the upstream did not answer in time"),
    spec(408, "request_timeout", "request_timeout", "Request Timeout: the request body stalled"),
    spec(431, "headers_too_large", "request_header_fields_too_large", "Request Header Fields Too Large"),
];

impl Denial {
    /// How many kinds of denial there are.
    pub const COUNT: usize = SPECS.len();

    /// Every denial code, in table order (config validation of `errors.messages`, metric labels).
    pub fn codes() -> impl Iterator<Item = &'static str> {
        SPECS.iter().map(|s| s.code)
    }

    /// Position in the denial table.
    pub fn index(self) -> usize {
        match self {
            Denial::NotFound => 0,
            Denial::MethodNotAllowed { .. } => 1,
            Denial::BadRequest => 2,
            Denial::MissingKey => 3,
            Denial::InvalidKey => 4,
            Denial::AccessDenied => 5,
            Denial::InsufficientScope => 6,
            Denial::PluginRequired => 7,
            Denial::RateLimited(_) => 8,
            Denial::TooManyFailedAuth { .. } => 9,
            Denial::PayloadTooLarge => 10,
            Denial::StoreUnavailable => 11,
            Denial::UpstreamUnavailable => 12,
            Denial::UpstreamTimeout => 13,
            Denial::RequestTimeout => 14,
            Denial::HeadersTooLarge => 15,
        }
    }

    pub fn spec(self) -> &'static Spec {
        &SPECS[self.index()]
    }

    pub fn status(self) -> StatusCode {
        self.spec().status
    }

    pub fn code(self) -> &'static str {
        self.spec().code
    }

    /// Whether this denial counts as a failed authentication (for the per-address limit).
    pub fn is_failed_auth(self) -> bool {
        matches!(self, Denial::InvalidKey)
    }
}

/// The JSON bodies of every denial, rendered once per config snapshot.
#[derive(Debug, Clone)]
pub struct ErrorBodies {
    bodies: Vec<Bytes>,
}

impl ErrorBodies {
    pub fn new(cfg: &ErrorsConfig) -> ErrorBodies {
        let bodies = SPECS
            .iter()
            .map(|s| {
                let message = cfg
                    .messages
                    .get(s.code)
                    .map(String::as_str)
                    .unwrap_or(s.message);
                let value = match cfg.style {
                    ErrorStyle::OutX => serde_json::json!({ "error": message }),
                    ErrorStyle::Structured => {
                        let mut inner =
                            serde_json::json!({ "code": s.structured_code, "message": message });
                        if let Some(url) = &cfg.doc_url {
                            inner["doc_url"] = serde_json::Value::String(url.clone());
                        }
                        serde_json::json!({ "error": inner })
                    }
                };
                Bytes::from(value.to_string())
            })
            .collect();
        ErrorBodies { bodies }
    }

    /// The body for a denial; cloning `Bytes` of a static-lifetime buffer costs a refcount.
    pub fn body(&self, d: Denial) -> Bytes {
        self.bodies[d.index()].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn outx() -> ErrorsConfig {
        ErrorsConfig {
            style: ErrorStyle::OutX,
            doc_url: None,
            messages: BTreeMap::new(),
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<_> = Denial::codes().collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Denial::COUNT);
    }

    /// The error contract of DESIGN.md, pinned.
    #[test]
    fn error_table() {
        let b = ErrorBodies::new(&outx());
        static ONE: HeaderValue = HeaderValue::from_static("1");
        let rate = RateInfo {
            limit: 1,
            limit_header: &ONE,
            remaining: 0,
            reset_secs: 1,
            retry_after_secs: 1,
        };
        let table: &[(Denial, u16, &str)] = &[
            (Denial::MissingKey, 401, r#"{"error":"Missing API Key"}"#),
            (Denial::InvalidKey, 401, r#"{"error":"Invalid API Key"}"#),
            (
                Denial::AccessDenied,
                403,
                r#"{"error":"Access denied: You don't have permission to access this resource"}"#,
            ),
            (
                Denial::InsufficientScope,
                403,
                r#"{"error":"Access denied: You don't have permission to access this resource"}"#,
            ),
            (
                Denial::MethodNotAllowed { group: 0 },
                405,
                r#"{"error":"Method Not Allowed"}"#,
            ),
            (
                Denial::RateLimited(rate),
                429,
                r#"{"error":"Too Many Requests: rate limit exceeded"}"#,
            ),
            (Denial::NotFound, 404, r#"{"error":"Not Found"}"#),
            (
                Denial::UpstreamUnavailable,
                502,
                r#"{"error":"Bad Gateway: the upstream is unavailable"}"#,
            ),
            (
                Denial::UpstreamTimeout,
                504,
                r#"{"error":"Gateway Timeout: the upstream did not answer in time"}"#,
            ),
            (
                Denial::StoreUnavailable,
                503,
                r#"{"error":"Service Unavailable: the key store cannot be reached"}"#,
            ),
        ];
        for (d, status, body) in table {
            assert_eq!(d.status().as_u16(), *status, "{d:?}");
            assert_eq!(&b.body(*d)[..], body.as_bytes(), "{d:?}");
        }
    }

    #[test]
    fn messages_can_be_overridden_and_structured() {
        let mut cfg = outx();
        cfg.messages
            .insert("plugin_required".into(), "Install the extension".into());
        assert_eq!(
            &ErrorBodies::new(&cfg).body(Denial::PluginRequired)[..],
            br#"{"error":"Install the extension"}"#
        );
        cfg.style = ErrorStyle::Structured;
        cfg.doc_url = Some("https://docs.example/auth".into());
        let v: serde_json::Value =
            serde_json::from_slice(&ErrorBodies::new(&cfg).body(Denial::InvalidKey)).unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(v["error"]["message"], "Invalid API Key");
        assert_eq!(v["error"]["doc_url"], "https://docs.example/auth");
    }
}
