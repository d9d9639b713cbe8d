//! A request's header fields as the gate and the proxy's first checks read them: hyper's map,
//! or the refusal lane's spans of the raw head.
//!
//! The lane answers most of what it reads with a refusal, and a refusal reads three or four
//! fields. Building a `HeaderMap` for it (a hash, an insert and a shared slice per field) cost
//! more than the scans that replace it here.

use std::ops::Range;

use http::header::{GetAll, ValueIter};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Where one field's name and value lie in the head it was parsed from.
pub type Span = (Range<usize>, Range<usize>);

/// The header fields of one request.
#[derive(Debug, Clone, Copy)]
pub enum Fields<'a> {
    Map(&'a HeaderMap),
    /// Fields as httparse read them, in order. httparse holds names and values to the rules
    /// `HeaderName` and `HeaderValue` do (tokens; no control bytes but tab), so these are the
    /// fields hyper would have put in its map.
    Raw {
        head: &'a [u8],
        spans: &'a [Span],
    },
}

impl<'a> Fields<'a> {
    /// How many fields (a name given twice counts twice).
    pub fn len(self) -> usize {
        match self {
            Fields::Map(m) => m.len(),
            Fields::Raw { spans, .. } => spans.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Every value of `name`, in the order they came.
    pub fn get_all<'n>(self, name: &'n HeaderName) -> Values<'a, 'n> {
        match self {
            Fields::Map(m) => Values::Map(GetAll::into_iter(m.get_all(name))),
            Fields::Raw { head, spans } => Values::Raw {
                head,
                spans: spans.iter(),
                name: name.as_str().as_bytes(),
            },
        }
    }

    /// The first value of `name`.
    pub fn get(self, name: &HeaderName) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    pub fn contains(self, name: &HeaderName) -> bool {
        self.get(name).is_some()
    }
}

/// The values of one name ([`Fields::get_all`]).
pub enum Values<'a, 'n> {
    Map(ValueIter<'a, HeaderValue>),
    Raw {
        head: &'a [u8],
        spans: std::slice::Iter<'a, Span>,
        /// Lower case, as `HeaderName` keeps it.
        name: &'n [u8],
    },
}

// `next` and `next_back` match names inline, each: shared through a helper, the match cost
// 1-2 % more CPU per refusal in A/B runs (BENCHMARKS.md, sixth session).
impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(it) => it.next().map(HeaderValue::as_bytes),
            Values::Raw { head, spans, name } => spans
                .find(|(n, _)| head[n.clone()].eq_ignore_ascii_case(name))
                .map(|(_, v)| &head[v.clone()]),
        }
    }
}

impl<'a> DoubleEndedIterator for Values<'a, '_> {
    fn next_back(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(it) => it.next_back().map(HeaderValue::as_bytes),
            Values::Raw { head, spans, name } => spans
                .rfind(|(n, _)| head[n.clone()].eq_ignore_ascii_case(name))
                .map(|(_, v)| &head[v.clone()]),
        }
    }
}

/// `v` as text, if every byte is visible ASCII or a tab (what `HeaderValue::to_str` accepts).
pub fn visible(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        // Checked just above: ASCII only.
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// A map of `pairs`, in order (a name may repeat): the unit tests' way to make request fields.
#[cfg(test)]
pub(crate) fn map_of(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (n, v) in pairs {
        m.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A head of `pairs` and the spans of its fields.
    fn raw(pairs: &[(&str, &str)]) -> (Vec<u8>, Vec<Span>) {
        let mut head = Vec::new();
        let mut spans = Vec::new();
        for (n, v) in pairs {
            let n0 = head.len();
            head.extend_from_slice(n.as_bytes());
            let v0 = head.len() + 2;
            head.extend_from_slice(b": ");
            head.extend_from_slice(v.as_bytes());
            spans.push((n0..n0 + n.len(), v0..v0 + v.len()));
            head.extend_from_slice(b"\r\n");
        }
        (head, spans)
    }

    fn all<'a>(f: Fields<'a>, name: &HeaderName) -> Vec<&'a [u8]> {
        f.get_all(name).collect()
    }

    #[test]
    fn raw_names_match_whatever_their_case_and_values_keep_their_order() {
        let pairs = [
            ("X-Api-Key", "one"),
            ("host", "h"),
            ("x-api-key", "two"),
            ("X-FORWARDED-FOR", "1.2.3.4"),
        ];
        let (head, spans) = raw(&pairs);
        let f = Fields::Raw {
            head: &head,
            spans: &spans,
        };
        let key = HeaderName::from_static("x-api-key");
        assert_eq!(all(f, &key), [&b"one"[..], b"two"]);
        assert_eq!(f.get_all(&key).next_back(), Some(&b"two"[..]));
        assert_eq!(f.get(&http::header::HOST), Some(&b"h"[..]));
        assert!(!f.contains(&http::header::CONTENT_LENGTH));
        assert_eq!(f.len(), 4);
    }

    #[test]
    fn a_name_that_only_starts_like_another_does_not_match() {
        let (head, spans) = raw(&[("x-api-keys", "a"), ("x-api-ke", "b")]);
        let f = Fields::Raw {
            head: &head,
            spans: &spans,
        };
        assert!(all(f, &HeaderName::from_static("x-api-key")).is_empty());
    }

    #[test]
    fn visible_takes_what_to_str_takes() {
        for b in 0u8..=255 {
            let v = [b'a', b];
            let ok = HeaderValue::from_bytes(&v).is_ok_and(|h| h.to_str().is_ok());
            assert_eq!(visible(&v).is_some(), ok, "byte {b:#x}");
        }
    }

    proptest! {
        /// Both views answer alike for any fields: hyper's map is the reference.
        #[test]
        fn raw_fields_read_as_the_map_does(
            pairs in proptest::collection::vec(
                (prop::sample::select(vec!["host", "Host", "x-api-key", "X-API-KEY",
                    "authorization", "connection", "x-forwarded-for", "accept"]),
                 "[ -~]{0,8}"),
                0..8),
        ) {
            let pairs: Vec<(&str, &str)> =
                pairs.iter().map(|(n, v)| (*n, v.trim_matches(' '))).collect();
            let (head, spans) = raw(&pairs);
            let m = map_of(&pairs);
            let r = Fields::Raw { head: &head, spans: &spans };
            prop_assert_eq!(r.len(), Fields::Map(&m).len());
            for name in ["host", "x-api-key", "authorization", "connection", "x-forwarded-for",
                         "accept", "content-length"] {
                let name = HeaderName::from_static(name);
                prop_assert_eq!(all(r, &name), all(Fields::Map(&m), &name));
                prop_assert_eq!(r.get_all(&name).next_back(), Fields::Map(&m).get_all(&name).next_back());
            }
        }
    }
}
