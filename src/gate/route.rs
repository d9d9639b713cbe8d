//! The route table: method + path → a route, 404, or 405 with `Allow`.
//!
//! A pattern is a path of literal segments, `{name}` segments (one segment, captured) and an
//! optional final `*` (any rest, including nothing). The first route whose *path* matches decides;
//! routes that repeat that exact pattern split it by method. A matching path whose routes allow
//! none of the request's method is a 405 listing the methods they do allow. `GET` implies `HEAD`.
//!
//! Paths that a server behind us might normalise into another route are refused as bad requests
//! rather than guessed at: dot segments (plain or encoded), empty segments (`//`, which many
//! servers merge), percent-encoded unreserved characters (`%74eams` is `teams` to a server that
//! normalises per RFC 3986 §6.2.2.2), encoded `/` or `\`, a raw `\`, and malformed escapes.

use http::{HeaderValue, Method};

use crate::config::RouteConfig;

/// One compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

impl Pattern {
    /// Compiles `"/teams/{team}/*"`-style text.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let Some(body) = text.strip_prefix('/') else {
            return Err(format!("{text:?} must start with '/'"));
        };
        let mut segments = Vec::new();
        let mut rest = false;
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        for (i, seg) in parts.iter().enumerate() {
            if *seg == "*" {
                if i + 1 != parts.len() {
                    return Err(format!("{text:?}: '*' may only be the last segment"));
                }
                rest = true;
            } else if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "{text:?}: {{{name}}} is not a valid parameter name"
                    ));
                }
                segments.push(Segment::Param(name.to_owned()));
            } else if seg.is_empty() && i + 1 != parts.len() {
                return Err(format!("{text:?} has an empty segment"));
            } else if seg.contains(['{', '}', '*', '?', '#']) {
                return Err(format!(
                    "{text:?}: segment {seg:?} mixes literal text with '{{', '}}', '*', '?' or '#'"
                ));
            } else {
                segments.push(Segment::Literal((*seg).to_owned()));
            }
        }
        Ok(Pattern { segments, rest })
    }

    /// Matches a request path; on success returns the value of the parameter named `want`, if
    /// the pattern has it (or `Some("")` when `want` is `None`).
    fn matches<'p>(&self, path: &'p str, want: Option<&str>) -> Option<&'p str> {
        let body = &path[1..];
        let mut parts = if body.is_empty() {
            None
        } else {
            Some(body.split('/'))
        };
        let mut captured = "";
        for seg in &self.segments {
            let got = parts.as_mut()?.next()?;
            match seg {
                Segment::Literal(l) => {
                    if got != l {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    if got.is_empty() {
                        return None;
                    }
                    if want == Some(name.as_str()) {
                        captured = got;
                    }
                }
            }
        }
        if !self.rest {
            if let Some(mut p) = parts {
                if p.next().is_some() {
                    return None;
                }
            }
        }
        Some(captured)
    }
}

/// A route as the gate uses it.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    pattern: Pattern,
    /// Index of the first route with the same pattern (the group this route belongs to).
    group: u16,
}

/// The result of matching one request.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'p> {
    pub index: u16,
    /// The value of the route's `team_param` segment, if it has one.
    pub team_param: Option<&'p str>,
}

/// Why no route was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    NotFound,
    MethodNotAllowed { group: u16 },
    BadPath,
}

/// The compiled route table of one config snapshot.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// `Allow` per group (indexed by the group's first route).
    allow: Vec<HeaderValue>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        let mut routes: Vec<Route> = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            // Config validation has already refused patterns that do not parse.
            let pattern = Pattern::parse(&c.path).unwrap_or(Pattern {
                segments: vec![Segment::Literal(String::new())],
                rest: false,
            });
            let group = routes
                .iter()
                .find(|r| r.pattern == pattern)
                .map(|r| r.group)
                .unwrap_or(i as u16);
            routes.push(Route {
                config: c.clone(),
                pattern,
                group,
            });
        }
        let allow = (0..routes.len())
            .map(|g| {
                let mut methods: Vec<String> = Vec::new();
                for r in routes.iter().filter(|r| r.group as usize == g) {
                    match &r.config.methods {
                        None => methods.push("*".into()),
                        Some(ms) => {
                            for m in ms {
                                methods.push(m.as_str().to_owned());
                                if m == Method::GET {
                                    methods.push("HEAD".into());
                                }
                            }
                        }
                    }
                }
                methods.sort();
                methods.dedup();
                HeaderValue::from_str(&methods.join(", ")).unwrap_or(HeaderValue::from_static(""))
            })
            .collect();
        RouteTable { routes, allow }
    }

    pub fn get(&self, index: u16) -> &Route {
        &self.routes[index as usize]
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The `Allow` value of a route group.
    pub fn allow(&self, group: u16) -> &HeaderValue {
        &self.allow[group as usize]
    }

    /// Matches a request.
    pub fn find<'p>(&self, method: &Method, path: &'p str) -> Result<Matched<'p>, Miss> {
        if !safe_path(path) {
            return Err(Miss::BadPath);
        }
        let first = self
            .routes
            .iter()
            .position(|r| r.pattern.matches(path, None).is_some())
            .ok_or(Miss::NotFound)?;
        let group = self.routes[first].group;
        for (i, r) in self.routes.iter().enumerate().skip(first) {
            if r.group != group {
                continue;
            }
            let allowed = match &r.config.methods {
                None => true,
                Some(ms) => ms
                    .iter()
                    .any(|m| m == method || (method == Method::HEAD && m == Method::GET)),
            };
            if allowed {
                let team_param = match &r.config.team_param {
                    Some(name) => r.pattern.matches(path, Some(name)),
                    None => None,
                };
                return Ok(Matched {
                    index: i as u16,
                    team_param,
                });
            }
        }
        Err(Miss::MethodNotAllowed { group })
    }
}

/// A path is safe when it starts with '/' and a server behind us cannot resolve it to another
/// path (see the module docs).
fn safe_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    // Fast path, one pass over the bytes: nothing that could need a closer look.
    let mut prev = 0u8;
    let plain = b.iter().all(|&c| {
        let ok = c != b'%' && c != b'.' && c != b'\\' && !(c == b'/' && prev == b'/');
        prev = c;
        ok
    });
    if plain {
        return true;
    }
    if b.contains(&b'\\') {
        return false;
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        // A trailing slash is an empty last segment, and fine; `//` anywhere else is not.
        if seg.is_empty() && i != last {
            return false;
        }
        let mut decoded = Vec::with_capacity(seg.len());
        let sb = seg.as_bytes();
        let mut j = 0;
        while j < sb.len() {
            if sb[j] == b'%' {
                let hex = sb
                    .get(j + 1..j + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return false; // malformed escape
                };
                if v.is_ascii_alphanumeric() || b"-._~/\\".contains(&v) {
                    return false; // an escape a normaliser would undo
                }
                decoded.push(v);
                j += 3;
            } else {
                decoded.push(sb[j]);
                j += 1;
            }
        }
        if decoded == b"." || decoded == b".." {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeartbeatRule;

    fn route(path: &str, methods: Option<&[&str]>) -> RouteConfig {
        RouteConfig {
            name: path.into(),
            path: path.into(),
            methods: methods.map(|ms| {
                ms.iter()
                    .map(|m| Method::from_bytes(m.as_bytes()).unwrap())
                    .collect()
            }),
            public: false,
            heartbeat: HeartbeatRule::Required,
            rate_limited: true,
            scopes: vec![],
            environments: vec![],
            team_param: None,
            usage: false,
            upgrade: false,
        }
    }

    #[test]
    fn patterns() {
        let p = Pattern::parse("/teams/{team}/*").unwrap();
        assert_eq!(p.matches("/teams/a/x/y", Some("team")), Some("a"));
        assert_eq!(p.matches("/teams/a", Some("team")), Some("a"));
        assert_eq!(p.matches("/teams//x", Some("team")), None);
        assert_eq!(p.matches("/team/a", None), None);
        let exact = Pattern::parse("/a/b").unwrap();
        assert!(exact.matches("/a/b", None).is_some());
        assert!(exact.matches("/a/b/c", None).is_none());
        assert!(exact.matches("/a", None).is_none());
        let all = Pattern::parse("/*").unwrap();
        assert!(all.matches("/", None).is_some());
        assert!(all.matches("/anything/at/all", None).is_some());
        let root = Pattern::parse("/").unwrap();
        assert!(root.matches("/", None).is_some());
        assert!(root.matches("/x", None).is_none());
        assert!(Pattern::parse("a").is_err());
        assert!(Pattern::parse("/*/a").is_err());
        assert!(Pattern::parse("/a{b}").is_err());
        assert!(Pattern::parse("/{}").is_err());
    }

    #[test]
    fn first_path_decides_and_405_lists_allowed_methods() {
        let t = RouteTable::new(&[
            route("/extension/heartbeat", Some(&["POST"])),
            route("/items", Some(&["GET"])),
            route("/items", Some(&["POST", "DELETE"])),
            route("/*", None),
        ]);
        assert_eq!(
            t.find(&Method::POST, "/extension/heartbeat").unwrap().index,
            0
        );
        assert_eq!(
            t.find(&Method::GET, "/extension/heartbeat").unwrap_err(),
            Miss::MethodNotAllowed { group: 0 }
        );
        assert_eq!(t.allow(0), "POST");
        assert_eq!(t.find(&Method::GET, "/items").unwrap().index, 1);
        assert_eq!(t.find(&Method::HEAD, "/items").unwrap().index, 1);
        assert_eq!(t.find(&Method::DELETE, "/items").unwrap().index, 2);
        let Err(Miss::MethodNotAllowed { group }) = t.find(&Method::PUT, "/items") else {
            panic!()
        };
        assert_eq!(t.allow(group), "DELETE, GET, HEAD, POST");
        assert_eq!(t.find(&Method::PATCH, "/other/x").unwrap().index, 3);
    }

    #[test]
    fn not_found_without_catch_all() {
        let t = RouteTable::new(&[route("/api/*", None)]);
        assert_eq!(t.find(&Method::GET, "/other").unwrap_err(), Miss::NotFound);
    }

    #[test]
    fn team_param_is_captured() {
        let mut r = route("/teams/{team}/tasks/{task}", None);
        r.team_param = Some("team".into());
        let t = RouteTable::new(&[r]);
        assert_eq!(
            t.find(&Method::GET, "/teams/t1/tasks/9")
                .unwrap()
                .team_param,
            Some("t1")
        );
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let t = RouteTable::new(&[route("/*", None)]);
        for p in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "x",
            "/%74eams/x",
            "//teams/x",
            "/teams//x",
            "/%41",
            "/a%7e",
            "/a%zz",
            "/a%2",
        ] {
            assert_eq!(t.find(&Method::GET, p).unwrap_err(), Miss::BadPath, "{p}");
        }
        for p in [
            "/a.json",
            "/v1.2/x",
            "/a/...",
            "/search/a%20b",
            "/q/%E2%82%AC",
            "/a/",
            "/",
        ] {
            assert!(t.find(&Method::GET, p).is_ok(), "{p}");
        }
    }
}
