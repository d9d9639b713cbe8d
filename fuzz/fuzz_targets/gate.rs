//! The decision core, `Gate::check`, on arbitrary sequences of requests.
//!
//! Each input is a short program run against a fresh `Gate` built from the shipped
//! `config/keygate.toml` (parsed once), the in-memory `NoStore` (the config's declared `demo`
//! team and key are the only keys) and a manual clock starting at a fixed time, so every input
//! replays the same way. Steps are requests (method, path, headers, client address) and clock
//! moves, prunes, reloads and cache invalidations between them; a sequence reaches the stateful
//! parts (key cache, negative cache, failed-authentication budget, heartbeats, plan buckets).
//! A `Lookup` is resolved as the proxy resolves it (`Gate::load`, then `Gate::resume`), and every
//! outcome is counted and rendered as the proxy does (`Snapshot::count`, `ErrorBodies::body`,
//! `RouteTable::allow`).
//!
//! Nothing may panic, and these invariants, read off `src/gate/mod.rs` and
//! `src/gate/credential.rs`, must hold:
//!
//! 1. A request with no credential header (neither `x-api-key` nor `Authorization`) on a route
//!    that is not public is never granted, never leads to a key lookup, and is refused as
//!    `MissingKey` (checks 1 → 2: a matched non-public route with no key is *missing*).
//! 2. A grant names the route `RouteTable::find` matches; it carries a key exactly when the
//!    route is not public.
//! 3. A grant on a non-public route is for the only key there is, `demo-key`, whose plaintext the
//!    request carried in `x-api-key` (the shipped config's only source); on `/teams/{team}/*`
//!    the `{team}` segment is the key's team, `demo`.
//! 4. `resume` never asks for another lookup; retry-after values are at least one second.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use http::header::{AUTHORIZATION, CONNECTION};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use keygate::clock::Clock;
use keygate::config::Config;
use keygate::gate::credential::{checksum, ISSUED_RANDOM_LEN, X_API_KEY};
use keygate::gate::{Check, Denial, Fields, Gate, Outcome, RequestHead};
use keygate::metrics::Metrics;
use keygate::store::NoStore;
use libfuzzer_sys::fuzz_target;

const SHIPPED: &str = include_str!("../../config/keygate.toml");
/// The demo key of the shipped config (its SHA-256 is the `demo-key` digest there).
const DEMO_KEY: &str = "kg_demo_0123456789abcdef";
/// The manual clock's start: 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const MAX_STEPS: usize = 48;

fn config() -> Arc<Config> {
    static CONFIG: OnceLock<Arc<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| Arc::new(Config::from_toml(SHIPPED).expect("config/keygate.toml is valid")))
        .clone()
}

/// One metrics registry for every run: counters only count, they decide nothing, and a fresh
/// registry per input would dominate the cost of a run.
fn metrics() -> Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::standalone).clone()
}

#[derive(Debug, Arbitrary)]
enum MethodIn {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Other(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum PathIn {
    /// One of the paths the shipped routes care about.
    Known(u8),
    /// `/teams/<segment>/<rest>`.
    Teams(String, String),
    Raw(String),
}

const KNOWN_PATHS: &[&str] = &[
    "/linkedin-agent/auth-send-otp",
    "/linkedin-agent/auth-verify-otp",
    "/extension/heartbeat",
    "/keygate/usage",
    "/teams/demo/tasks",
    "/teams/demo",
    "/teams/other/tasks",
    "/teams//tasks",
    "/api/v1/posts",
    "/",
    "/a/../teams/demo",
    "/%74eams/demo",
];

#[derive(Debug, Arbitrary)]
enum Name {
    ApiKey,
    Authorization,
    Connection,
    Other(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Value {
    DemoKey,
    /// `Bearer <demo key>` (not a source in the shipped config).
    BearerDemo,
    /// A key in keygate's issued format (`sk_live_` / `sk_test_`), checksum right or wrong.
    Issued {
        live: bool,
        random: [u8; ISSUED_RANDOM_LEN],
        corrupt: bool,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Peer {
    /// One of a few IPv4 addresses, so failures from one address add up.
    Few(u8),
    V4(u32),
    V6(u128),
}

#[derive(Debug, Arbitrary)]
struct Request {
    method: MethodIn,
    path: PathIn,
    headers: Vec<(Name, Value)>,
    peer: Peer,
}

#[derive(Debug, Arbitrary)]
enum Step {
    Request(Request),
    /// The same request 1 + n times (enough to run a plan's bucket dry: `free` is 100/h).
    Burst(u8, Request),
    /// Both clocks forward by this many milliseconds.
    AdvanceMs(u16),
    /// Both clocks forward by this many hours (past heartbeat windows, cache TTLs, buckets).
    AdvanceHours(u8),
    /// The wall clock set to T0 + this many seconds (it may step back; monotonic time does not).
    SetWall(i32),
    Prune,
    Reload,
    InvalidateAll,
}

fn method(m: &MethodIn) -> Option<Method> {
    Some(match m {
        MethodIn::Get => Method::GET,
        MethodIn::Head => Method::HEAD,
        MethodIn::Post => Method::POST,
        MethodIn::Put => Method::PUT,
        MethodIn::Delete => Method::DELETE,
        MethodIn::Patch => Method::PATCH,
        MethodIn::Options => Method::OPTIONS,
        MethodIn::Connect => Method::CONNECT,
        MethodIn::Other(b) => Method::from_bytes(b).ok()?,
    })
}

fn path(p: &PathIn) -> String {
    match p {
        PathIn::Known(i) => KNOWN_PATHS[usize::from(*i) % KNOWN_PATHS.len()].to_owned(),
        PathIn::Teams(team, rest) => format!("/teams/{team}/{rest}"),
        PathIn::Raw(s) => s.clone(),
    }
}

fn headers(pairs: &[(Name, Value)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs.iter().take(12) {
        let name = match name {
            Name::ApiKey => X_API_KEY.clone(),
            Name::Authorization => AUTHORIZATION,
            Name::Connection => CONNECTION,
            Name::Other(b) => match HeaderName::from_bytes(b) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let bytes: Vec<u8> = match value {
            Value::DemoKey => DEMO_KEY.into(),
            Value::BearerDemo => format!("Bearer {DEMO_KEY}").into(),
            Value::Issued {
                live,
                random,
                corrupt,
            } => {
                let prefix = if *live { "sk_live_" } else { "sk_test_" };
                let random: Vec<u8> = random.iter().map(|b| BASE62[*b as usize % 62]).collect();
                let mut sum = checksum(prefix.as_bytes(), &random);
                if *corrupt {
                    sum[5] = if sum[5] == b'0' { b'1' } else { b'0' };
                }
                let mut v = prefix.as_bytes().to_vec();
                v.extend_from_slice(&random);
                v.extend_from_slice(&sum);
                v
            }
            Value::Raw(b) => b.clone(),
        };
        if let Ok(v) = HeaderValue::from_bytes(&bytes) {
            h.append(name, v);
        }
    }
    h
}

fn peer(p: &Peer) -> IpAddr {
    match p {
        Peer::Few(i) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, i % 4)),
        Peer::V4(a) => IpAddr::V4(Ipv4Addr::from(*a)),
        Peer::V6(a) => IpAddr::V6(Ipv6Addr::from(*a)),
    }
}

fn request(gate: &Gate, clock: &Clock, r: &Request) {
    let Some(method) = method(&r.method) else {
        return;
    };
    let path = path(&r.path);
    let headers = headers(&r.headers);
    let head = RequestHead {
        method: &method,
        path: &path,
        fields: Fields::Map(&headers),
        peer: peer(&r.peer),
    };
    let snap = gate.snapshot();
    let now = clock.now();
    let no_credential = !headers.contains_key(&X_API_KEY) && !headers.contains_key(AUTHORIZATION);
    let matched = snap.routes.find(&method, &path);
    let public = matched
        .as_ref()
        .is_ok_and(|m| snap.routes.get(m.index).config.public);

    let mut check = gate.check(&snap, &head, now);
    if let Check::Lookup(d) = &check {
        assert!(
            !no_credential,
            "a key lookup for a request with no credential header: {method} {path:?}"
        );
        let loaded = gate.load(d);
        check = gate.resume(&snap, &head, now, loaded);
        assert!(
            !matches!(check, Check::Lookup(_)),
            "resume asked for another lookup"
        );
    }

    if no_credential {
        if let Ok(m) = &matched {
            if !public {
                assert!(
                    !matches!(check, Check::Granted(_)),
                    "granted without a credential on non-public route {:?}: {method} {path:?}",
                    snap.routes.get(m.index).config.name
                );
                assert!(
                    matches!(
                        check,
                        Check::Denied {
                            denial: Denial::MissingKey,
                            ..
                        }
                    ),
                    "no credential on a non-public route, yet {check:?}"
                );
            }
        }
    }

    match check {
        Check::Granted(grant) => {
            let m = matched.expect("granted, yet no route matches");
            assert_eq!(
                grant.route, m.index,
                "granted on another route than matched"
            );
            let route = &snap.routes.get(grant.route).config;
            assert_eq!(
                grant.key.is_none(),
                route.public,
                "a grant carries a key exactly when the route is not public"
            );
            if let Some(key) = &grant.key {
                assert_eq!(key.usage.key_id(), "demo-key", "granted to an unknown key");
                assert_eq!(key.team_header, "demo");
                let sent: Vec<&[u8]> = headers
                    .get_all(&X_API_KEY)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .collect();
                assert_eq!(
                    sent,
                    [DEMO_KEY.as_bytes()],
                    "granted without the demo key in x-api-key"
                );
                if route.team_param.is_some() {
                    assert_eq!(m.team_param, Some("demo"));
                    assert_eq!(path.split('/').nth(2), Some("demo"));
                }
            }
            if grant.rate.is_some() {
                assert!(route.rate_limited, "rate state on a route without limits");
            }
            snap.count(Some(grant.route), Outcome::Forwarded);
        }
        Check::Denied {
            denial,
            key: _,
            route,
        } => {
            match denial {
                Denial::MethodNotAllowed { group } => {
                    let _ = snap.routes.allow(group);
                }
                Denial::RateLimited(info) => assert!(info.retry_after_secs >= 1),
                Denial::TooManyFailedAuth { retry_after_secs } => assert!(retry_after_secs >= 1),
                _ => {}
            }
            if let Some(r) = route {
                assert!(usize::from(r) < snap.routes.len());
            }
            let _ = denial.status();
            let _ = denial.code();
            let _ = snap.errors.body(denial);
            snap.count(route, Outcome::Denied(denial));
        }
        Check::Lookup(_) => unreachable!("resolved above"),
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let config = config();
    let clock = Clock::manual(T0);
    let gate = Gate::new(config.clone(), Arc::new(NoStore), clock.clone(), metrics());
    for step in steps.iter().take(MAX_STEPS) {
        match step {
            Step::Request(r) => request(&gate, &clock, r),
            Step::Burst(n, r) => {
                for _ in 0..=*n {
                    request(&gate, &clock, r);
                }
            }
            Step::AdvanceMs(ms) => clock.advance(Duration::from_millis(u64::from(*ms))),
            Step::AdvanceHours(h) => clock.advance(Duration::from_secs(3600 * u64::from(*h))),
            Step::SetWall(s) => clock.set_wall(T0 + 1000 * i64::from(*s)),
            Step::Prune => {
                let _ = gate.prune();
            }
            Step::Reload => gate.reload(config.clone()),
            Step::InvalidateAll => gate.invalidate_all(),
        }
    }
});
