//! Route matching on arbitrary methods and paths, and pattern compilation on arbitrary text.
//!
//! - `RouteTable::find` on the route table of the shipped `config/keygate.toml` (built once),
//!   with any method `http` accepts and any path string. Never panics; a match names a route
//!   that exists and whose methods allow the request's (GET implying HEAD); a 405 names a group
//!   whose `Allow` value exists; a path without a leading '/' is a bad request; a `team_param`
//!   is the path's `{team}` segment.
//! - `Pattern::parse` on arbitrary text: never panics, and text without a leading '/' is refused.
//!   A pattern that parses is also compiled into a one-route table and matched against the path.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use http::Method;
use keygate::config::{Config, RouteConfig};
use keygate::gate::route::{Miss, Pattern, RouteTable};
use libfuzzer_sys::fuzz_target;

const SHIPPED: &str = include_str!("../../config/keygate.toml");

fn shipped() -> &'static (Config, RouteTable) {
    static TABLE: OnceLock<(Config, RouteTable)> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config = Config::from_toml(SHIPPED).expect("config/keygate.toml is valid");
        let table = RouteTable::new(&config.routes);
        (config, table)
    })
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
    Trace,
    Other(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    method: MethodIn,
    path: String,
    pattern: String,
}

fn allowed(route: &RouteConfig, method: &Method) -> bool {
    match &route.methods {
        None => true,
        Some(ms) => ms
            .iter()
            .any(|m| m == method || (method == Method::HEAD && m == Method::GET)),
    }
}

fuzz_target!(|input: Input| {
    let method = match &input.method {
        MethodIn::Get => Method::GET,
        MethodIn::Head => Method::HEAD,
        MethodIn::Post => Method::POST,
        MethodIn::Put => Method::PUT,
        MethodIn::Delete => Method::DELETE,
        MethodIn::Patch => Method::PATCH,
        MethodIn::Options => Method::OPTIONS,
        MethodIn::Connect => Method::CONNECT,
        MethodIn::Trace => Method::TRACE,
        MethodIn::Other(b) => match Method::from_bytes(b) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let path = input.path.as_str();

    let (_, table) = shipped();
    match table.find(&method, path) {
        Ok(m) => {
            assert!(usize::from(m.index) < table.len());
            let route = &table.get(m.index).config;
            assert!(
                allowed(route, &method),
                "{method} {path:?} matched route {:?}, which does not allow it",
                route.name
            );
            if let Some(team) = m.team_param {
                // The only route with a team_param in the shipped config is /teams/{team}/*.
                assert_eq!(route.team_param.as_deref(), Some("team"));
                assert_eq!(path.split('/').nth(2), Some(team), "{path:?}");
            }
        }
        Err(Miss::MethodNotAllowed { group }) => {
            assert!(usize::from(group) < table.len());
            let _ = table.allow(group);
        }
        Err(Miss::NotFound) | Err(Miss::BadPath) => {}
    }
    if !path.starts_with('/') {
        assert_eq!(table.find(&method, path).unwrap_err(), Miss::BadPath);
    }

    match Pattern::parse(&input.pattern) {
        Ok(_) => {
            assert!(input.pattern.starts_with('/'));
            // A copy of a shipped route (so new `RouteConfig` fields need no change here).
            let (config, _) = shipped();
            let mut route = config.routes[config.routes.len() - 1].clone();
            route.path = input.pattern.clone();
            route.methods = None;
            route.team_param = None;
            let table = RouteTable::new(&[route]);
            if let Ok(m) = table.find(&method, path) {
                assert_eq!(m.index, 0);
            }
        }
        Err(why) => {
            assert!(
                !why.is_empty(),
                "an empty reason for refusing {:?}",
                input.pattern
            );
        }
    }
});
