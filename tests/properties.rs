//! Properties, checked over generated inputs (proptest):
//! - the limiter never lets more than the quota through in any window, and refills exactly;
//! - header hygiene: whatever a client sends, no hop-by-hop field, credential, `_` name or
//!   spoofed identity header survives, and every other field does, unchanged.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::clock::Clock;
use keygate::config::LimitSpec;
use keygate::gate::keys::Names;
use keygate::gate::limits::{check, LimiterRegistry};
use keygate::proxy::forward::{request_headers, Forwarding};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For `requests` per `per` with `burst`, over any sequence of request times, the number
    /// granted in any window of length `per` is at most `burst + requests` (a full bucket plus
    /// what refills during the window), and over the whole run at most
    /// `burst + elapsed / interval`.
    #[test]
    fn limiter_never_exceeds_its_quota(
        requests in 1u32..50,
        per_ms in 100u64..10_000,
        burst_extra in 0u32..20,
        steps in proptest::collection::vec(0u64..2_000, 1..300),
    ) {
        let burst = (requests + burst_extra).min(requests.max(1) * 2);
        let spec = LimitSpec { requests, per: Duration::from_millis(per_ms), burst };
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let set = reg.set(&Names::default(), "p", &[spec]);
        let buckets = reg.buckets(&set, "k");
        let interval_ns = per_ms as f64 * 1e6 / requests as f64;
        let mut granted_at: Vec<u64> = Vec::new();
        let mut now_ns = 0u64;
        for step in steps {
            clock.advance(Duration::from_millis(step));
            now_ns += step * 1_000_000;
            if check(&buckets, clock.monotonic().as_nanos() as u64).is_ok() {
                granted_at.push(now_ns);
            }
        }
        let total_allowed = burst as f64 + (now_ns as f64 / interval_ns).floor();
        prop_assert!(granted_at.len() as f64 <= total_allowed,
            "{} granted, at most {total_allowed} allowed", granted_at.len());
        let window = per_ms * 1_000_000;
        for (i, &t) in granted_at.iter().enumerate() {
            let in_window = granted_at[i..].iter().take_while(|&&u| u < t + window).count();
            prop_assert!(in_window as u32 <= burst + requests, "{in_window} in one window");
        }
    }

    /// After the bucket is emptied, exactly one request per interval is let through again.
    #[test]
    fn limiter_refills_exactly(requests in 1u32..100, per_s in 1u64..3_600) {
        let spec = LimitSpec { requests, per: Duration::from_secs(per_s), burst: requests };
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(clock.clone());
        let buckets = reg.buckets(&reg.set(&Names::default(), "p", &[spec]), "k");
        for _ in 0..requests {
            prop_assert!(check(&buckets, clock.monotonic().as_nanos() as u64).is_ok());
        }
        prop_assert!(check(&buckets, clock.monotonic().as_nanos() as u64).is_err());
        let interval = Duration::from_secs(per_s) / requests;
        clock.advance(interval - Duration::from_nanos(1).min(interval));
        if interval > Duration::from_nanos(1) {
            prop_assert!(check(&buckets, clock.monotonic().as_nanos() as u64).is_err(), "not before the interval");
        }
        clock.advance(Duration::from_nanos(1));
        prop_assert!(check(&buckets, clock.monotonic().as_nanos() as u64).is_ok(), "exactly at the interval");
        prop_assert!(check(&buckets, clock.monotonic().as_nanos() as u64).is_err());
    }

    #[test]
    fn header_hygiene(
        fields in proptest::collection::vec(("[a-z][a-z0-9_-]{0,12}", "[ -~]{0,20}"), 0..20),
        listed in proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 0..3),
    ) {
        const HOP: [&str; 9] = ["connection", "keep-alive", "proxy-connection", "proxy-authenticate",
            "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"];
        let mut h = HeaderMap::new();
        for (n, v) in &fields {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v.trim())) {
                h.append(n, v);
            }
        }
        h.append("x-api-key", HeaderValue::from_static("sk_live_secret"));
        h.append("x-keygate-team", HeaderValue::from_static("spoofed"));
        if !listed.is_empty() {
            h.append("connection", HeaderValue::from_str(&listed.join(", ")).unwrap());
        }
        let before = h.clone();
        let peer = HeaderValue::from_static("192.0.2.1");
        let rid = HeaderValue::from_static("rid");
        let hop = request_headers(&mut h, &Forwarding {
            credential_headers: &[&keygate::gate::credential::X_API_KEY],
            key: None,
            peer: &peer,
            proto: "http",
            trust_forwarded: false,
            request_id: &rid,
        });
        // As a tunnel's request gets them; a pooled one has them written after the map's.
        hop.insert_into(&mut h);
        let ours = ["x-forwarded-for", "x-forwarded-proto", "x-request-id"];
        for name in h.keys() {
            let n = name.as_str();
            prop_assert!(!HOP.contains(&n), "hop-by-hop {n} survived");
            prop_assert!(!n.contains('_'), "underscore name {n} survived");
            prop_assert!(n != "x-api-key" && n != "content-length" && !n.starts_with("x-keygate-"), "{n} survived");
            prop_assert!(!listed.iter().any(|l| l == n), "{n} was named in Connection");
        }
        prop_assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.1");
        for name in before.keys() {
            let n = name.as_str();
            let dropped = HOP.contains(&n) || n.contains('_') || n == "x-api-key" || n == "content-length"
                || n.starts_with("x-keygate-") || listed.iter().any(|l| l == n)
                || ours.contains(&n) || n == "forwarded" || n == "x-forwarded-host";
            if !dropped {
                let a: Vec<_> = before.get_all(name).iter().collect();
                let b: Vec<_> = h.get_all(name).iter().collect();
                prop_assert_eq!(a, b, "{} changed", n);
            }
        }
    }
}
