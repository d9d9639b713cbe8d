//! The header maps of refusals, made without hashing a name.
//!
//! Built field by field, a refusal's map hashes each name it inserts: nine for a 429 with a
//! key. Each shape is made once instead, as a template with placeholder values: a refusal
//! clones its template (the same two allocations `with_capacity` made) and sets the values by
//! position. Each template ends with `x-request-id`, so the id the proxy sets last replaces
//! the placeholder in place and the map never grows. (`Connection: close`, on the rare
//! refusals that end the connection, is inserted.) The refusal lane needs no map at all: it
//! writes the same fields in the same order straight from the shape ([`Fields::write`]).

use std::sync::LazyLock;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use super::{forward, JSON, RATELIMIT, RATELIMIT_POLICY};
use super::{X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING, X_RATELIMIT_RESET};

static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const PLACEHOLDER: HeaderValue = HeaderValue::from_static("");

/// The shapes with a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// No key, nothing to add (401, 404, …).
    Plain,
    /// No key, `Retry-After` (too many failed authentications).
    Retry,
    /// A key: `RateLimit-Policy` (403s).
    Keyed,
    /// A key over its limit: `Retry-After` and every rate field.
    Limited,
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
    match shape {
        Shape::Plain => PLAIN,
        Shape::Retry => RETRY,
        Shape::Keyed => KEYED,
        Shape::Limited => LIMITED,
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

const SHAPES: [Shape; 5] = [
    Shape::Plain,
    Shape::Retry,
    Shape::Keyed,
    Shape::Limited,
    Shape::Allow,
];

static TEMPLATES: LazyLock<[HeaderMap; 5]> = LazyLock::new(|| SHAPES.map(template));

/// The most values a shape takes (`Limited`'s, before `x-request-id`).
const MAX_VALUES: usize = 6;

/// A refusal's fields before they are a map: hyper's service makes the map ([`Fields::map`]),
/// the refusal lane writes them as they are ([`Fields::write`]), in the same order.
#[derive(Debug)]
pub(super) struct Fields {
    shape: Shape,
    values: [HeaderValue; MAX_VALUES],
    close: bool,
}

impl Fields {
    /// `values` in the order of the shape's fields after `content-type` and `cache-control`,
    /// `x-request-id` left out; `close` adds `Connection: close`.
    pub(super) fn new<const N: usize>(shape: Shape, values: [HeaderValue; N], close: bool) -> Self {
        debug_assert_eq!(N + 1, names(shape).len());
        let mut all = [const { PLACEHOLDER }; MAX_VALUES];
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
            *slot = v;
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        h
    }

    /// `name: value` lines in the map's order, with `request_id`: the template's names, and its
    /// values for `content-type` and `cache-control`.
    pub(super) fn write(&self, out: &mut Vec<u8>, request_id: &HeaderValue) {
        let template = &TEMPLATES[self.shape as usize];
        let values = template
            .values()
            .take(2)
            .chain(&self.values[..names(self.shape).len() - 1])
            .chain([request_id]);
        for (name, value) in template.keys().zip(values) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
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
        let v = |s: &'static str| HeaderValue::from_static(s);
        let all = [
            Fields::new(Shape::Plain, [], false),
            Fields::new(Shape::Plain, [], true),
            Fields::new(Shape::Retry, [v("7")], false),
            Fields::new(Shape::Keyed, [v("\"p\";q=1;w=60")], true),
            Fields::new(Shape::Allow, [v("GET, HEAD")], false),
            Fields::new(
                Shape::Limited,
                [v("1"), v("pol"), v("lim"), v("10"), v("0"), v("60")],
                false,
            ),
        ];
        for f in all {
            let id = v("id-1");
            let mut written = Vec::new();
            f.write(&mut written, &id);
            let shape = f.shape;
            let mut map = f.map();
            map.insert(forward::X_REQUEST_ID.clone(), id);
            let want: String = map
                .iter()
                .map(|(n, v)| format!("{n}: {}\r\n", v.to_str().unwrap()))
                .collect();
            assert_eq!(String::from_utf8(written).unwrap(), want, "{shape:?}");
        }
    }

    #[test]
    fn values_land_on_their_fields_and_the_map_does_not_grow() {
        let mut h = Fields::new(Shape::Retry, [HeaderValue::from_static("7")], false).map();
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
