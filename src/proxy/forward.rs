//! Forwarding: the pooled upstream client and the header hygiene on both legs.
//!
//! Request headers, in order: hop-by-hop fields (RFC 9110 §7.6.1, and any named in `Connection`)
//! and client framing (`Content-Length`, `Transfer-Encoding` — hyper re-frames from the body) go;
//! credential headers go; any `x-keygate-*`, header names with `_` (a spoofing path past checks
//! on the `-` spelling), and — unless `proxy.trust_forwarded` — `Forwarded`/`X-Forwarded-*` and
//! `X-Request-Id` from the client go; then keygate's own identity, forwarding and request-id
//! headers are set ([`Hop`]: written after the client's by the upstream client, not inserted).
//! Response headers lose their hop-by-hop fields.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::gate::KeyView;
use http::header::{self, HeaderName};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Uri};

pub static X_KEYGATE_TEAM: HeaderName = HeaderName::from_static("x-keygate-team");
pub static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub static X_KEYGATE_PLAN: HeaderName = HeaderName::from_static("x-keygate-plan");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop fields that never cross keygate.
static HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// The upstream's authority and base path, split once per snapshot.
#[derive(Debug, Clone)]
pub struct Target {
    authority: Authority,
    default_port: u16,
    base: String,
    host: HeaderValue,
}

impl Target {
    pub fn new(url: &Uri) -> Target {
        let authority = url
            .authority()
            .cloned()
            .unwrap_or(Authority::from_static("127.0.0.1"));
        Target {
            host: HeaderValue::from_str(authority.as_str())
                .unwrap_or(HeaderValue::from_static("localhost")),
            authority,
            default_port: if url.scheme_str() == Some("https") {
                443
            } else {
                80
            },
            base: url.path().trim_end_matches('/').to_owned(),
        }
    }

    /// `host:port` to connect to.
    pub fn addr(&self) -> String {
        format!(
            "{}:{}",
            self.authority.host(),
            self.authority.port_u16().unwrap_or(self.default_port)
        )
    }

    /// The origin-form URI (path and query, under the base path) sent upstream.
    pub fn uri(&self, original: &Uri) -> Result<Uri, http::Error> {
        let pq = original
            .path_and_query()
            .map(PathAndQuery::as_str)
            .unwrap_or("/");
        let pq: PathAndQuery = if self.base.is_empty() {
            match original.path_and_query() {
                Some(p) => p.clone(),
                None => PathAndQuery::from_static("/"),
            }
        } else {
            format!("{}{}", self.base, pq).parse()?
        };
        Ok(Uri::from(pq))
    }

    /// The upstream's own `Host`, for `upstream.preserve_host = false`.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }
}

/// Which of [`HOP_BY_HOP`] (bit i) and `Content-Length` (bit 9) are present: one pass over the
/// names, so that only fields that are there cost a `remove` (each hashes its name). Nearly
/// every request has none of them, nearly every response only `Connection`.
fn hop_fields(headers: &HeaderMap) -> u16 {
    const CONTENT_LENGTH_BIT: u16 = 1 << HOP_BY_HOP.len();
    let mut found = 0;
    for n in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == n) {
            found |= 1 << i;
        } else if n == header::CONTENT_LENGTH {
            found |= CONTENT_LENGTH_BIT;
        }
    }
    found
}

/// Removes hop-by-hop fields, including those the `Connection` header names; with `framing`,
/// also `Content-Length` (requests are re-framed by hyper from the body).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, framing: bool) {
    let found = hop_fields(headers);
    // Bit 0 is `Connection`.
    if found & 1 != 0 {
        // `keep-alive`, `close` and the fixed list go anyway: no name is made (and allocated)
        // for them, which is nearly every `Connection` field an upstream sends.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| {
                !t.eq_ignore_ascii_case(b"close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes()))
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(*h);
        }
    }
    if framing && found & (1 << HOP_BY_HOP.len()) != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Everything the request hygiene needs besides the headers.
pub struct Forwarding<'a> {
    pub credential_headers: &'a [&'static HeaderName],
    pub key: Option<&'a KeyView>,
    pub peer: &'a HeaderValue,
    pub proto: &'static str,
    pub trust_forwarded: bool,
    pub request_id: &'a HeaderValue,
}

/// Whether a `Connection` field lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The fields keygate sets on a forwarded request. The upstream client writes them after the
/// request's own ([`Hop::extra`]) instead of their being inserted into its map, which cost a
/// hash of each name (seven per request). A tunnel, sent by hyper's client, takes them into
/// the map ([`Hop::insert_into`]).
#[derive(Debug)]
pub struct Hop {
    /// In place of the request's own `Host`, if set.
    pub host: Option<HeaderValue>,
    /// The first `len` are set, in the order they are written.
    fields: [(&'static HeaderName, HeaderValue); 6],
    len: usize,
}

impl Hop {
    fn new() -> Hop {
        const UNSET: (&HeaderName, HeaderValue) = (&X_REQUEST_ID, HeaderValue::from_static(""));
        Hop {
            host: None,
            fields: [UNSET; 6],
            len: 0,
        }
    }

    fn push(&mut self, name: &'static HeaderName, value: HeaderValue) {
        self.fields[self.len] = (name, value);
        self.len += 1;
    }

    /// What the upstream client writes besides the request's map.
    pub fn extra(&self) -> super::h1::Extra<'_> {
        super::h1::Extra {
            host: self.host.as_ref(),
            fields: &self.fields[..self.len],
        }
    }

    /// Sets the fields in `headers`, replacing any of the same names.
    pub fn insert_into(self, headers: &mut HeaderMap) {
        if let Some(h) = self.host {
            headers.insert(header::HOST, h);
        }
        for (name, value) in self.fields.into_iter().take(self.len) {
            headers.insert(name, value);
        }
    }
}

/// Rewrites request headers for the upstream (see the module docs for the order): the client's
/// fields that must not pass are removed, and keygate's own are returned, to be written after
/// the rest.
pub fn request_headers(headers: &mut HeaderMap, f: &Forwarding<'_>) -> Hop {
    strip_hop_by_hop(headers, true);
    // One pass over the names: which credential headers are there (bit i % 64 for the i-th:
    // past 64 names a bit stands for several, which costs a needless `remove`, never a missed
    // one), and the patterns a fixed list cannot name. Untrusted, `Forwarded`, any
    // `X-Forwarded-*` (Host, Port, Prefix, Server, Uri, …) and `X-Real-IP` could mislead the
    // upstream about the client; keygate sets For and Proto itself. The fields keygate sets go
    // too (a trusted `X-Forwarded-For` is read first, to be extended), except a trusted
    // `X-Forwarded-Proto`, which is kept.
    let creds = f.credential_headers;
    let mut present = 0u64;
    let mut client_proto = false;
    let forwarded_for = if f.trust_forwarded {
        headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|prev| {
                HeaderValue::from_str(&format!("{prev}, {}", f.peer.to_str().unwrap_or(""))).ok()
            })
            .unwrap_or_else(|| f.peer.clone())
    } else {
        f.peer.clone()
    };
    let suspicious: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            if let Some(i) = creds.iter().position(|c| *c == *n) {
                present |= 1 << (i % 64);
                return false;
            }
            if f.trust_forwarded && *n == X_FORWARDED_PROTO {
                client_proto = true;
                return false;
            }
            let n = n.as_str();
            n.contains('_')
                || n.starts_with("x-keygate-")
                || n == X_REQUEST_ID
                || (n.starts_with("x-forwarded-") && (!f.trust_forwarded || n == X_FORWARDED_FOR))
                || (!f.trust_forwarded && (n == "x-real-ip" || n == "forwarded"))
        })
        .cloned()
        .collect();
    for (i, h) in creds.iter().enumerate() {
        if present & (1 << (i % 64)) != 0 {
            headers.remove(*h);
        }
    }
    for n in suspicious {
        headers.remove(n);
    }
    let mut hop = Hop::new();
    hop.push(&X_FORWARDED_FOR, forwarded_for);
    if !client_proto {
        hop.push(&X_FORWARDED_PROTO, HeaderValue::from_static(f.proto));
    }
    // The caller already kept the client's id if it was sane.
    hop.push(&X_REQUEST_ID, f.request_id.clone());
    if let Some(k) = f.key {
        hop.push(&X_KEYGATE_TEAM, k.team_header.clone());
        hop.push(&X_KEYGATE_KEY_ID, k.key_id_header());
        hop.push(&X_KEYGATE_PLAN, k.plan_header.clone());
    }
    hop
}

/// Request ids: a random per-process prefix and a counter, 24 hex digits (made in the
/// per-thread arena of [`super::values`], so sending one both ways allocates nothing).
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds {
            prefix: rand::random::<u64>() & 0xffff_ffff,
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    pub fn next(&self) -> HeaderValue {
        super::values::render(24, |b| b.extend_from_slice(&self.next_hex()))
            .unwrap_or(HeaderValue::from_static("0"))
    }

    /// The next id's digits (the refusal lane writes them as they are).
    pub fn next_hex(&self) -> [u8; 24] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let v = (u128::from(self.prefix) << 64) | u128::from(n);
        let mut hex = [0u8; 24];
        for (i, d) in hex.iter_mut().enumerate() {
            *d = HEX[((v >> (4 * (23 - i))) & 0xf) as usize];
        }
        hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::fields::map_of as map;

    #[test]
    fn hop_by_hop_and_connection_named_fields_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "0005"),
            ("upgrade", "h2c"),
            ("accept", "application/json"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
        // Tokens in any case; the fixed names are skipped, the others still named and removed.
        let mut h = map(&[
            ("connection", "Close, KEEP-ALIVE"),
            ("connection", " X-Other ,upgrade"),
            ("x-other", "1"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn request_hygiene() {
        let mut h = map(&[
            ("x-api-key", "sk_live_secret"),
            ("x_api_key", "sk_live_secret"),
            ("x-keygate-team", "someone-else"),
            ("x-keygate-anything", "x"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-request-id", "spoofed"),
            ("accept", "*/*"),
        ]);
        let peer = HeaderValue::from_static("127.0.0.1");
        let f = Forwarding {
            credential_headers: &[&crate::gate::credential::X_API_KEY],
            key: None,
            peer: &peer,
            proto: "http",
            trust_forwarded: false,
            request_id: &HeaderValue::from_static("abc"),
        };
        let mut hop = request_headers(&mut h, &f);
        hop.host = Some(HeaderValue::from_static("up:80"));
        let h = sent(&h, &hop);
        assert!(h.get("x-api-key").is_none());
        assert!(h.get("x_api_key").is_none());
        assert!(h.get("x-keygate-team").is_none());
        assert!(h.get("x-keygate-anything").is_none());
        assert!(h.get("forwarded").is_none());
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["accept"], "*/*");
        for ours in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id",
            "host",
        ] {
            assert_eq!(h.get_all(ours).iter().count(), 1, "{ours} sent once");
        }
        assert_eq!(h["host"], "up:80");
    }

    #[test]
    fn every_credential_header_present_goes_whichever_is_first() {
        let names: Vec<&'static HeaderName> = (0..70)
            .map(|i| {
                &*Box::leak(Box::new(
                    HeaderName::from_bytes(format!("x-cred-{i}").as_bytes()).unwrap(),
                ))
            })
            .collect();
        let peer = HeaderValue::from_static("127.0.0.1");
        for creds in [&names[..2], &names[..]] {
            let f = Forwarding {
                credential_headers: creds,
                key: None,
                peer: &peer,
                proto: "http",
                trust_forwarded: false,
                request_id: &HeaderValue::from_static("abc"),
            };
            // Only the second, then the last (past 64) and another, with unrelated fields.
            let last = creds.len() - 1;
            let mut h = map(&[("accept", "*/*"), (names[1].as_str(), "k")]);
            h.append(creds[last], HeaderValue::from_static("k2"));
            h.append(names[0], HeaderValue::from_static("k3"));
            request_headers(&mut h, &f);
            for n in creds {
                assert!(
                    h.get(*n).is_none(),
                    "{n} kept with {} credential names",
                    creds.len()
                );
            }
            assert_eq!(h["accept"], "*/*");
        }
    }

    #[test]
    fn trusted_forwarding_appends() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1"), ("x-request-id", "r1")]);
        let kept = h["x-request-id"].clone();
        let peer = HeaderValue::from_static("127.0.0.1");
        let f = Forwarding {
            credential_headers: &[],
            key: None,
            peer: &peer,
            proto: "https",
            trust_forwarded: true,
            request_id: &kept,
        };
        let hop = request_headers(&mut h, &f);
        let out = sent(&h, &hop);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(out["x-request-id"], "r1");
        assert_eq!(out["x-forwarded-proto"], "https");
        for ours in ["x-forwarded-for", "x-forwarded-proto", "x-request-id"] {
            assert_eq!(out.get_all(ours).iter().count(), 1, "{ours} sent once");
        }
        // A trusted client's own protocol is kept, and so sent once too.
        let mut h = map(&[("x-forwarded-proto", "https"), ("x-request-id", "r1")]);
        let f = Forwarding { proto: "http", ..f };
        let hop = request_headers(&mut h, &f);
        let out = sent(&h, &hop);
        assert_eq!(
            out.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(),
            ["https"]
        );
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
        // A tunnel takes the same fields into its map.
        hop.insert_into(&mut h);
        assert_eq!(h, out);
    }

    /// The head the upstream client writes for `h` and `hop`, read back (repeats kept).
    fn sent(h: &HeaderMap, hop: &Hop) -> HeaderMap {
        let mut out = Vec::new();
        super::super::h1::encode_head(
            &mut out,
            &http::Method::GET,
            "/",
            h,
            &hop.extra(),
            super::super::h1::ReqBody::None,
        );
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut fields);
        assert!(req.parse(&out).unwrap().is_complete());
        let mut back = HeaderMap::new();
        for f in req.headers.iter() {
            back.append(
                HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(f.value).unwrap(),
            );
        }
        back
    }

    #[test]
    fn target_uri() {
        let t = Target::new(&"http://127.0.0.1:3000".parse().unwrap());
        assert_eq!(t.uri(&"/a/b?c=1".parse().unwrap()).unwrap(), "/a/b?c=1");
        assert_eq!(t.addr(), "127.0.0.1:3000");
        let t = Target::new(&"http://up:80/base/".parse().unwrap());
        assert_eq!(t.uri(&"/a?x".parse().unwrap()).unwrap(), "/base/a?x");
        assert_eq!(t.host(), "up:80");
    }

    #[test]
    fn request_ids_are_unique() {
        let ids = RequestIds::default();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
    }
}
