//! The header maps of refusals, made without hashing a name.
//!
//! Built field by field, a refusal's map hashes each name it inserts: nine for a 429 with a
//! key. Each shape is made once instead, as a template with placeholder values: a refusal
//! clones its template (the same two allocations `with_capacity` made) and sets the values by
//! position. Each template ends with `x-request-id`, so the id the proxy sets last replaces
//! the placeholder in place and the map never grows. (`Connection: close`, on the rare
//! refusals that end the connection, is inserted.) The refusal lane needs no map at all: it
//! writes the same fields in the same order straight from the shape ([`Fields::write`]), and
//! the numbers among them straight as digits ([`Value`]).

use std::sync::LazyLock;

use bytes::BufMut;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use super::{forward, values, JSON, RATELIMIT, RATELIMIT_POLICY};
use super::{X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING, X_RATELIMIT_RESET};

static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const PLACEHOLDER: HeaderValue = HeaderValue::from_static("");

/// A refusal's field value as it is decided. Numbers become header values only for hyper's
/// map; the lane writes their digits into its answer (a value made per refusal cost a copy
/// into the per-thread arena, a reference count and a validity scan, four times per 429).
#[derive(Debug, Clone)]
pub(super) enum Value {
    Header(HeaderValue),
    Int(u64),
    /// The IETF draft's `RateLimit`: `"<name>";r=<remaining>;t=<seconds>`.
    Rate {
        name: &'static HeaderValue,
        remaining: u32,
        secs: u64,
    },
}

const EMPTY: Value = Value::Header(PLACEHOLDER);

impl Value {
    fn header(self) -> HeaderValue {
        match self {
            Value::Header(h) => h,
            Value::Int(n) => values::int(n),
            // A header value's bytes, quotes and digits: always a valid value.
            Value::Rate { name, .. } => {
                values::render(name.len() + 48, |b| self.put(b)).unwrap_or(PLACEHOLDER)
            }
        }
    }

    fn put(&self, out: &mut impl BufMut) {
        let mut n = itoa::Buffer::new();
        match self {
            Value::Header(h) => out.put_slice(h.as_bytes()),
            Value::Int(i) => out.put_slice(n.format(*i).as_bytes()),
            Value::Rate {
                name,
                remaining,
                secs,
            } => {
                out.put_slice(b"\"");
                out.put_slice(name.as_bytes());
                out.put_slice(b"\";r=");
                out.put_slice(n.format(*remaining).as_bytes());
                out.put_slice(b";t=");
                out.put_slice(n.format(*secs).as_bytes());
            }
        }
    }
}

/// `RateLimit` as a header value (for grants, which go through hyper).
pub(super) fn ratelimit(name: &'static HeaderValue, remaining: u32, secs: u64) -> HeaderValue {
    Value::Rate {
        name,
        remaining,
        secs,
    }
    .header()
}

/// The shapes with a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// No key, nothing to add (401, 404, …).
    Plain,
    /// No key, `Retry-After` (too many failed authentications).
    Retry,
    /// A key: `RateLimit-Policy` (403s).
    Keyed,
    /// A key over its limit: `Retry-After` and every rate field (`limits.headers = "all"`).
    Limited,
    /// A key over its limit: `Retry-After` and the IETF draft's fields.
    LimitedDraft,
    /// A key over its limit: `Retry-After` and `X-RateLimit-*`.
    LimitedX,
    /// No route for the method: `Allow`.
    Allow,
}

/// The names of a shape's fields after `content-type` and `cache-control`, in order.
fn names(shape: Shape) -> &'static [&'static HeaderName] {
    static RETRY: &[&HeaderName] = &[&header::RETRY_AFTER, &forward::X_REQUEST_ID];
    static PLAIN: &[&HeaderName] = &[&forward::X_REQUEST_ID];
    static ALLOW: &[&HeaderName] = &[&header::ALLOW, &forward::X_REQUEST_ID];
    static KEYED: &[&HeaderName] = &[&RATELIMIT_POLICY, &forward::X_REQUEST_ID];
    static LIMITED: &[&HeaderName] = &[
        &header::RETRY_AFTER,
        &RATELIMIT_POLICY,
        &RATELIMIT,
        &X_RATELIMIT_LIMIT,
        &X_RATELIMIT_REMAINING,
        &X_RATELIMIT_RESET,
        &forward::X_REQUEST_ID,
    ];
    static LIMITED_DRAFT: &[&HeaderName] = &[
        &header::RETRY_AFTER,
        &RATELIMIT_POLICY,
        &RATELIMIT,
        &forward::X_REQUEST_ID,
    ];
    static LIMITED_X: &[&HeaderName] = &[
        &header::RETRY_AFTER,
        &X_RATELIMIT_LIMIT,
        &X_RATELIMIT_REMAINING,
        &X_RATELIMIT_RESET,
        &forward::X_REQUEST_ID,
    ];
    match shape {
        Shape::Plain => PLAIN,
        Shape::Retry => RETRY,
        Shape::Keyed => KEYED,
        Shape::Limited => LIMITED,
        Shape::LimitedDraft => LIMITED_DRAFT,
        Shape::LimitedX => LIMITED_X,
        Shape::Allow => ALLOW,
    }
}

fn template(shape: Shape) -> HeaderMap {
    let names = names(shape);
    let mut h = HeaderMap::with_capacity(2 + names.len());
    h.insert(header::CONTENT_TYPE, JSON.clone());
    h.insert(header::CACHE_CONTROL, NO_STORE.clone());
    for n in names {
        h.insert((*n).clone(), PLACEHOLDER);
    }
    h
}

const SHAPES: [Shape; 7] = [
    Shape::Plain,
    Shape::Retry,
    Shape::Keyed,
    Shape::Limited,
    Shape::LimitedDraft,
    Shape::LimitedX,
    Shape::Allow,
];

static TEMPLATES: LazyLock<[HeaderMap; 7]> = LazyLock::new(|| SHAPES.map(template));

/// The most values a shape takes (`Limited`'s, before `x-request-id`).
const MAX_VALUES: usize = 6;

/// A refusal's fields before they are a map: hyper's service makes the map ([`Fields::map`]),
/// the refusal lane writes them as they are ([`Fields::write`]), in the same order.
#[derive(Debug)]
pub(super) struct Fields {
    shape: Shape,
    values: [Value; MAX_VALUES],
    close: bool,
}

impl Fields {
    /// `values` in the order of the shape's fields after `content-type` and `cache-control`,
    /// `x-request-id` left out; `close` adds `Connection: close`.
    pub(super) fn new<const N: usize>(shape: Shape, values: [Value; N], close: bool) -> Self {
        debug_assert_eq!(N + 1, names(shape).len());
        let mut all = [EMPTY; MAX_VALUES];
        for (slot, v) in all.iter_mut().zip(values) {
            *slot = v;
        }
        Fields {
            shape,
            values: all,
            close,
        }
    }

    /// Whether the answer ends the connection.
    pub(super) fn close(&self) -> bool {
        self.close
    }

    /// The map, `x-request-id` still a placeholder for the caller to replace in place.
    pub(super) fn map(self) -> HeaderMap {
        let mut h = TEMPLATES[self.shape as usize].clone();
        for (slot, v) in h.values_mut().skip(2).zip(self.values) {
            *slot = v.header();
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        h
    }

    /// `name: value` lines in the map's order, with `request_id`: the template's names, and its
    /// values for `content-type` and `cache-control`.
    pub(super) fn write(&self, out: &mut Vec<u8>, request_id: &[u8]) {
        let template = &TEMPLATES[self.shape as usize];
        let last = template.len() - 1;
        for (i, (name, fixed)) in template.iter().enumerate() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            match i {
                0 | 1 => out.extend_from_slice(fixed.as_bytes()),
                i if i == last => out.extend_from_slice(request_id),
                i => self.values[i - 2].put(out),
            }
            out.extend_from_slice(b"\r\n");
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_hold_their_names_in_order_once_each() {
        for shape in SHAPES {
            let h = &TEMPLATES[shape as usize];
            let got: Vec<&HeaderName> = h.keys().collect();
            let mut want = vec![&header::CONTENT_TYPE, &header::CACHE_CONTROL];
            want.extend(names(shape).iter().copied());
            assert_eq!(got, want, "{shape:?}");
            assert_eq!(h.len(), want.len(), "{shape:?}: one value per name");
        }
    }

    /// What the lane writes is what hyper writes of the map, for every shape.
    #[test]
    fn written_fields_are_the_maps_in_order() {
        let v = |s: &'static str| Value::Header(HeaderValue::from_static(s));
        static NAME: HeaderValue = HeaderValue::from_static("pro");
        let all = [
            Fields::new(Shape::Plain, [], false),
            Fields::new(Shape::Plain, [], true),
            Fields::new(Shape::Retry, [Value::Int(7)], false),
            Fields::new(Shape::Keyed, [v("\"p\";q=1;w=60")], true),
            Fields::new(Shape::Allow, [v("GET, HEAD")], false),
            Fields::new(
                Shape::Limited,
                [
                    Value::Int(u64::MAX),
                    v("pol"),
                    Value::Rate {
                        name: &NAME,
                        remaining: 0,
                        secs: 3600,
                    },
                    v("10"),
                    Value::Int(0),
                    Value::Int(60),
                ],
                false,
            ),
            Fields::new(
                Shape::LimitedDraft,
                [
                    Value::Int(5),
                    v("pol"),
                    Value::Rate {
                        name: &NAME,
                        remaining: 0,
                        secs: 5,
                    },
                ],
                true,
            ),
            Fields::new(
                Shape::LimitedX,
                [Value::Int(5), v("10"), Value::Int(0), Value::Int(3600)],
                false,
            ),
        ];
        for f in all {
            let mut written = Vec::new();
            f.write(&mut written, b"id-1");
            let shape = f.shape;
            let mut map = f.map();
            map.insert(
                forward::X_REQUEST_ID.clone(),
                HeaderValue::from_static("id-1"),
            );
            let want: String = map
                .iter()
                .map(|(n, v)| format!("{n}: {}\r\n", v.to_str().unwrap()))
                .collect();
            assert_eq!(String::from_utf8(written).unwrap(), want, "{shape:?}");
        }
    }

    #[test]
    fn values_are_written_as_their_header_values_are() {
        static NAME: HeaderValue = HeaderValue::from_static("free");
        for v in [
            Value::Int(0),
            Value::Int(1234567890),
            Value::Rate {
                name: &NAME,
                remaining: 99,
                secs: 36,
            },
        ] {
            let mut written = Vec::new();
            v.put(&mut written);
            assert_eq!(v.header().as_bytes(), &written[..]);
        }
        assert_eq!(ratelimit(&NAME, 99, 36), "\"free\";r=99;t=36");
    }

    #[test]
    fn values_land_on_their_fields_and_the_map_does_not_grow() {
        let mut h = Fields::new(Shape::Retry, [Value::Int(7)], false).map();
        assert_eq!(h[header::RETRY_AFTER], "7");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        let cap = h.capacity();
        h.insert(
            forward::X_REQUEST_ID.clone(),
            HeaderValue::from_static("id"),
        );
        assert_eq!(h.capacity(), cap);
        assert_eq!(h.len(), 4);
        assert_eq!(h.keys().last(), Some(&forward::X_REQUEST_ID));
    }
}
