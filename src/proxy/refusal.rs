//! The header maps of refusals, made without hashing a name.
//!
//! Built field by field, a refusal's map hashes each name it inserts: nine for a 429 with a
//! key. Each shape is made once instead, as a template with placeholder values: a refusal
//! clones its template (the same two allocations `with_capacity` made) and sets the values by
//! position. Each template ends with `x-request-id`, so the id the proxy sets last replaces
//! the placeholder in place and the map never grows. (`Connection: close`, on the rare
//! refusals that end the connection, is inserted.)

use std::sync::LazyLock;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use super::{forward, JSON, RATELIMIT, RATELIMIT_POLICY};
use super::{X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING, X_RATELIMIT_RESET};

static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
static PLACEHOLDER: HeaderValue = HeaderValue::from_static("");

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
        h.insert((*n).clone(), PLACEHOLDER.clone());
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

/// A refusal's map in `shape`, `values` set in the order of the shape's fields after
/// `content-type` and `cache-control` (the last, `x-request-id`, is left to the caller).
pub(super) fn headers<const N: usize>(shape: Shape, values: [HeaderValue; N]) -> HeaderMap {
    debug_assert_eq!(N + 1, names(shape).len());
    let mut h = TEMPLATES[shape as usize].clone();
    for (slot, v) in h.values_mut().skip(2).zip(values) {
        *slot = v;
    }
    h
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

    #[test]
    fn values_land_on_their_fields_and_the_map_does_not_grow() {
        let mut h = headers(Shape::Retry, [HeaderValue::from_static("7")]);
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
