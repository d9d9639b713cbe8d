//! Configuration: the TOML file ([`file`]) turned into an immutable, validated [`Config`].
//!
//! `Config::from_toml` reports every problem at once, each as
//! `field (line N): what is wrong, what to do`. `keygate check-config` and a SIGHUP reload run the
//! same validation; a file that fails it never replaces a running config.

mod defaults;
mod file;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, Uri};
use toml::Spanned;

pub use defaults::DEFAULT_STATE_DIR;

/// Why a config was refused: every problem found, one per line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// A validated configuration snapshot.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub credentials: CredentialsConfig,
    pub keys: KeysConfig,
    pub cache: CacheConfig,
    pub heartbeat: HeartbeatConfig,
    pub limits: LimitsConfig,
    pub state_dir: Option<PathBuf>,
    pub errors: ErrorsConfig,
    pub log: LogConfig,
    pub plans: BTreeMap<String, Vec<LimitSpec>>,
    pub teams: Vec<TeamConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Runtime worker threads; 0 means one per core.
    pub workers: usize,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub trust_forwarded: bool,
    /// Plain HTTP/1.1 connections start in the refusal lane ([`crate::proxy::lane`]).
    pub refusal_lane: bool,
    /// TLS termination on the proxy listener; plain HTTP when absent.
    pub tls: Option<crate::tls::TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: Uri,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Bodiless `GET`s and `HEAD`s in flight on one connection at most (HTTP/1.1 pipelining);
    /// 1 turns it off.
    pub pipeline: usize,
    pub preserve_host: bool,
    /// Set for an `https://` upstream.
    pub tls: Option<UpstreamTls>,
}

/// How keygate speaks TLS to an `https://` upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// The CA file, if one replaces the system's roots.
    pub ca: Option<PathBuf>,
}

/// Where a request's API key may be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// The `x-api-key` header.
    ApiKeyHeader,
    /// `Authorization: Bearer <key>`.
    Bearer,
}

#[derive(Debug, Clone)]
pub struct CredentialsConfig {
    pub sources: Vec<CredentialSource>,
    pub max_key_length: usize,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    /// Environment name → key prefix, for keys keygate issues (`live` → `sk_live_`).
    pub prefixes: BTreeMap<String, String>,
    pub max_active_per_team: usize,
    pub usage_flush_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_capacity: u64,
    pub negative_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    pub window: Duration,
    pub required: bool,
}

/// What a plan's buckets are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    Team,
    Key,
}

/// Which rate-limit fields keygate adds to authenticated answers (`limits.headers`). A 429
/// always carries `Retry-After` whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateHeaders {
    /// The IETF draft's `RateLimit-Policy` and `RateLimit`, and `X-RateLimit-*`.
    All,
    /// `RateLimit-Policy` and `RateLimit` only.
    Draft,
    /// `X-RateLimit-Limit`, `-Remaining` and `-Reset` only.
    XRateLimit,
    /// None: an upstream's own rate-limit fields pass through untouched.
    None,
}

impl RateHeaders {
    /// Whether `RateLimit-Policy` and `RateLimit` are sent.
    #[inline]
    pub fn draft(self) -> bool {
        matches!(self, RateHeaders::All | RateHeaders::Draft)
    }

    /// Whether `X-RateLimit-*` are sent.
    #[inline]
    pub fn x_ratelimit(self) -> bool {
        matches!(self, RateHeaders::All | RateHeaders::XRateLimit)
    }
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub key_by: LimitKey,
    /// The rate-limit fields sent on authenticated answers.
    pub headers: RateHeaders,
    /// Failed authentications allowed per client address per minute (0: no limit).
    pub failed_auth_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `{"error":"message"}`
    OutX,
    /// `{"error":{"code":…,"message":…,"doc_url":…}}`
    Structured,
}

#[derive(Debug, Clone)]
pub struct ErrorsConfig {
    pub style: ErrorStyle,
    pub doc_url: Option<String>,
    /// Overrides by denial code (`missing_key`, `plugin_required`, …).
    pub messages: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// One limit: `requests` per `per`, with at most `burst` at once (default: `requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitSpec {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub enum TeamPlan {
    Named(String),
    Custom(Vec<LimitSpec>),
}

#[derive(Debug, Clone)]
pub struct TeamConfig {
    pub id: String,
    pub plan: TeamPlan,
    pub heartbeat_required: Option<bool>,
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub id: String,
    pub digest: [u8; 32],
    pub scopes: Vec<String>,
    pub environment: Option<String>,
}

/// What a route does about the team's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatRule {
    /// The team's heartbeat must be fresh (the default).
    Required,
    /// Not checked.
    Exempt,
    /// Not checked, and a granted request records a heartbeat for the team.
    Record,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub path: String,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
    pub public: bool,
    pub heartbeat: HeartbeatRule,
    pub rate_limited: bool,
    pub scopes: Vec<String>,
    pub environments: Vec<String>,
    pub team_param: Option<String>,
    /// Answered by keygate itself with the caller's own usage (not forwarded).
    pub usage: bool,
    /// `Connection: upgrade` (WebSocket) and `CONNECT` are forwarded only on such routes.
    pub upgrade: bool,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates TOML text, reporting every problem at once.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: file::File = toml::from_str(text).map_err(|e| {
            ConfigError::Invalid(vec![e.to_string().trim_end().replace('\n', "\n  ")])
        })?;
        let mut v = Validator {
            text,
            errors: Vec::new(),
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(v.errors))
        }
    }

    /// The directory for persistent state (heartbeats, usage, the SQLite store), if any.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<String>,
}

impl Validator<'_> {
    fn line_of<T>(&self, s: &Spanned<T>) -> Option<usize> {
        let span = s.span();
        if span.start == 0 && span.end == 0 {
            return None; // a default, not from the file
        }
        Some(
            self.text[..span.start.min(self.text.len())]
                .matches('\n')
                .count()
                + 1,
        )
    }

    fn err<T>(&mut self, field: &str, at: Option<&Spanned<T>>, msg: impl std::fmt::Display) {
        match at.and_then(|s| self.line_of(s)) {
            Some(line) => self.errors.push(format!("{field} (line {line}): {msg}")),
            None => self.errors.push(format!("{field}: {msg}")),
        }
    }

    fn pipeline(&mut self, p: &Spanned<usize>) -> usize {
        let n = *p.get_ref();
        if !(1..=defaults::MAX_PIPELINE).contains(&n) {
            self.err(
                "upstream.pipeline",
                Some(p),
                format_args!("must be 1 (off) to {}", defaults::MAX_PIPELINE),
            );
        }
        n.clamp(1, defaults::MAX_PIPELINE)
    }

    fn positive(&mut self, field: &str, d: Duration) -> Duration {
        if d.is_zero() {
            self.err::<()>(field, None, "must be greater than zero, e.g. \"30s\"");
        }
        d
    }

    fn addr(&mut self, field: &str, s: &Spanned<String>) -> SocketAddr {
        s.get_ref().parse().unwrap_or_else(|_| {
            self.err(
                field,
                Some(s),
                format_args!(
                    "{:?} is not an address:port such as \"127.0.0.1:8080\"",
                    s.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn limit(&mut self, field: &str, l: &Spanned<file::Limit>) -> LimitSpec {
        let raw = l.get_ref();
        if raw.requests == 0 {
            self.err(field, Some(l), "requests must be at least 1");
        }
        if raw.per.is_zero() {
            self.err(
                field,
                Some(l),
                "per must be a duration greater than zero, e.g. \"1h\"",
            );
        }
        if raw.burst == Some(0) {
            self.err(
                field,
                Some(l),
                "burst must be at least 1 (or left out: burst = requests)",
            );
        }
        LimitSpec {
            requests: raw.requests.max(1),
            per: raw.per.max(Duration::from_millis(1)),
            burst: raw.burst.unwrap_or(raw.requests).max(1),
        }
    }

    fn config(&mut self, f: file::File) -> Config {
        let proxy = ProxyConfig {
            listen: self.addr("proxy.listen", &f.proxy.listen),
            workers: f.proxy.workers,
            max_connections: f.proxy.max_connections,
            header_read_timeout: self
                .positive("proxy.header_read_timeout", f.proxy.header_read_timeout),
            idle_timeout: self.positive("proxy.idle_timeout", f.proxy.idle_timeout),
            body_timeout: self.positive("proxy.body_timeout", f.proxy.body_timeout),
            drain_timeout: f.proxy.drain_timeout,
            max_header_bytes: f.proxy.max_header_bytes,
            max_headers: f.proxy.max_headers,
            max_body_bytes: f.proxy.max_body_bytes,
            trust_forwarded: f.proxy.trust_forwarded,
            refusal_lane: f.proxy.refusal_lane,
            tls: f.proxy.tls.as_ref().map(|t| crate::tls::TlsFiles {
                cert: PathBuf::from(t.cert.get_ref()),
                key: PathBuf::from(t.key.get_ref()),
            }),
        };
        if let (Some(files), Some(raw)) = (&proxy.tls, &f.proxy.tls) {
            if let Err(e) = crate::tls::server_config(files) {
                let at = match e {
                    crate::tls::TlsError::NoKey(_) => &raw.key,
                    crate::tls::TlsError::Read { ref path, .. }
                        if *path == raw.key.get_ref().as_str() =>
                    {
                        &raw.key
                    }
                    _ => &raw.cert,
                };
                self.err("proxy.tls", Some(at), e);
            }
        }
        if proxy.max_connections == 0 {
            self.err::<()>("proxy.max_connections", None, "must be at least 1");
        }
        if proxy.max_header_bytes < 8192 {
            // hyper's HTTP/1 read buffer cannot be smaller, so a smaller budget would not hold.
            self.err::<()>("proxy.max_header_bytes", None, "must be at least 8192");
        }
        if proxy.max_headers == 0 {
            self.err::<()>("proxy.max_headers", None, "must be at least 1");
        }
        let admin = AdminConfig {
            listen: self.addr("admin.listen", &f.admin.listen),
            token_env: f.admin.token_env,
            token_file: f.admin.token_file.map(PathBuf::from),
        };
        let upstream = self.upstream(&f.upstream);
        let credentials = self.credentials(&f.credentials);
        for (env, prefix) in &f.keys.prefixes {
            if prefix.is_empty()
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                self.err::<()>(
                    &format!("keys.prefixes.{env}"),
                    None,
                    "a prefix must be non-empty ASCII letters, digits or '_', e.g. \"sk_live_\"",
                );
            }
        }
        let keys = KeysConfig {
            prefixes: f.keys.prefixes,
            max_active_per_team: f.keys.max_active_per_team,
            usage_flush_interval: self
                .positive("keys.usage_flush_interval", f.keys.usage_flush_interval),
        };
        let cache = CacheConfig {
            capacity: f.cache.capacity,
            ttl: self.positive("cache.ttl", f.cache.ttl),
            negative_capacity: f.cache.negative_capacity,
            negative_ttl: self.positive("cache.negative_ttl", f.cache.negative_ttl),
        };
        let heartbeat = HeartbeatConfig {
            window: self.positive("heartbeat.window", f.heartbeat.window),
            required: f.heartbeat.required,
        };
        let key_by = match f.limits.key_by.get_ref().as_str() {
            "team" => LimitKey::Team,
            "key" => LimitKey::Key,
            other => {
                self.err(
                    "limits.key_by",
                    Some(&f.limits.key_by),
                    format_args!("{other:?} is not one of \"team\", \"key\""),
                );
                LimitKey::Team
            }
        };
        let headers = match f.limits.headers.get_ref().as_str() {
            "all" => RateHeaders::All,
            "draft" => RateHeaders::Draft,
            "x-ratelimit" => RateHeaders::XRateLimit,
            "none" => RateHeaders::None,
            other => {
                self.err(
                    "limits.headers",
                    Some(&f.limits.headers),
                    format_args!(
                        "{other:?} is not one of \"all\", \"draft\", \"x-ratelimit\", \"none\""
                    ),
                );
                RateHeaders::All
            }
        };
        let limits = LimitsConfig {
            key_by,
            headers,
            failed_auth_per_minute: f.limits.failed_auth_per_minute,
        };
        let errors = self.errors_config(f.errors);
        let log = LogConfig {
            format: match f.log.format.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    self.err(
                        "log.format",
                        Some(&f.log.format),
                        format_args!("{other:?} is not one of \"text\", \"json\""),
                    );
                    LogFormat::Text
                }
            },
            level: f.log.level,
        };
        let mut plans = BTreeMap::new();
        for (name, plan) in &f.plans {
            if plan.limits.is_empty() {
                self.err::<()>(
                    &format!("plans.{name}.limits"),
                    None,
                    "a plan needs at least one limit",
                );
            }
            let specs = plan
                .limits
                .iter()
                .enumerate()
                .map(|(i, l)| self.limit(&format!("plans.{name}.limits[{i}]"), l))
                .collect();
            plans.insert(name.clone(), specs);
        }
        let teams = self.teams(&f.teams, &plans);
        let routes = self.routes(&f.routes);
        Config {
            proxy,
            admin,
            upstream,
            credentials,
            keys,
            cache,
            heartbeat,
            limits,
            state_dir: f.state.dir.map(PathBuf::from),
            errors,
            log,
            plans,
            teams,
            routes,
        }
    }

    fn upstream(&mut self, u: &file::Upstream) -> UpstreamConfig {
        let url = match u.url.get_ref().parse::<Uri>() {
            Ok(url)
                if matches!(url.scheme_str(), Some("http" | "https"))
                    && url.authority().is_some() =>
            {
                url
            }
            _ => {
                self.err(
                    "upstream.url",
                    Some(&u.url),
                    format_args!(
                        "{:?} is not an absolute URL such as \"http://127.0.0.1:3000\"",
                        u.url.get_ref()
                    ),
                );
                Uri::from_static("http://127.0.0.1:1")
            }
        };
        if url.query().is_some() {
            self.err("upstream.url", Some(&u.url), "must not have a query string");
        }
        let tls = if url.scheme_str() == Some("https") {
            self.upstream_tls(u, &url)
        } else {
            for (field, at) in [
                ("upstream.ca", &u.ca),
                ("upstream.server_name", &u.server_name),
            ] {
                if let Some(at) = at {
                    self.err(field, Some(at), "only applies to an https:// upstream.url");
                }
            }
            None
        };
        UpstreamConfig {
            url,
            connect_timeout: self.positive("upstream.connect_timeout", u.connect_timeout),
            request_timeout: self.positive("upstream.request_timeout", u.request_timeout),
            pool_idle_timeout: self.positive("upstream.pool_idle_timeout", u.pool_idle_timeout),
            pool_max_idle: u.pool_max_idle,
            pipeline: self.pipeline(&u.pipeline),
            preserve_host: u.preserve_host,
            tls,
        }
    }

    fn upstream_tls(&mut self, u: &file::Upstream, url: &Uri) -> Option<UpstreamTls> {
        let name = match &u.server_name {
            Some(n) => n.get_ref().clone(),
            // `Uri::host` keeps an IPv6 literal's brackets; a server name has none.
            None => url
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        };
        let server_name = match rustls::pki_types::ServerName::try_from(name) {
            Ok(n) => n,
            Err(_) => {
                let (field, at) = match &u.server_name {
                    Some(at) => ("upstream.server_name", at),
                    None => ("upstream.url", &u.url),
                };
                self.err(field, Some(at), "is not a DNS name or IP address for TLS");
                return None;
            }
        };
        let ca = u.ca.as_ref().map(|c| PathBuf::from(c.get_ref()));
        match crate::tls::client_config(ca.as_deref()) {
            Ok(config) => Some(UpstreamTls {
                config,
                server_name,
                ca,
            }),
            Err(e) => {
                match &u.ca {
                    Some(at) => self.err("upstream.ca", Some(at), e),
                    None => self.err("upstream.url", Some(&u.url), e),
                }
                None
            }
        }
    }

    fn credentials(&mut self, c: &file::Credentials) -> CredentialsConfig {
        let mut sources = Vec::new();
        for s in c.sources.get_ref() {
            let src = match s.as_str() {
                "x-api-key" => CredentialSource::ApiKeyHeader,
                "bearer" | "authorization" => CredentialSource::Bearer,
                other => {
                    self.err(
                        "credentials.sources",
                        Some(&c.sources),
                        format_args!("{other:?} is not one of \"x-api-key\", \"bearer\""),
                    );
                    continue;
                }
            };
            if !sources.contains(&src) {
                sources.push(src);
            }
        }
        if sources.is_empty() {
            self.err(
                "credentials.sources",
                Some(&c.sources),
                "name at least one source",
            );
        }
        if c.max_key_length < 16 || c.max_key_length > 4096 {
            self.err::<()>(
                "credentials.max_key_length",
                None,
                "must be between 16 and 4096",
            );
        }
        CredentialsConfig {
            sources,
            max_key_length: c.max_key_length,
        }
    }

    fn errors_config(&mut self, e: file::Errors) -> ErrorsConfig {
        let style = match e.style.get_ref().as_str() {
            "outx" | "simple" => ErrorStyle::OutX,
            "structured" => ErrorStyle::Structured,
            other => {
                self.err(
                    "errors.style",
                    Some(&e.style),
                    format_args!("{other:?} is not one of \"outx\", \"structured\""),
                );
                ErrorStyle::OutX
            }
        };
        let mut messages = BTreeMap::new();
        for (code, msg) in e.messages {
            if !crate::gate::Denial::codes().any(|c| c == code.get_ref()) {
                self.err(
                    "errors.messages",
                    Some(&code),
                    format_args!(
                        "{:?} is not a denial code; known codes: {}",
                        code.get_ref(),
                        crate::gate::Denial::codes().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            messages.insert(code.into_inner(), msg);
        }
        ErrorsConfig {
            style,
            doc_url: e.doc_url,
            messages,
        }
    }

    fn teams(
        &mut self,
        teams: &[file::Team],
        plans: &BTreeMap<String, Vec<LimitSpec>>,
    ) -> Vec<TeamConfig> {
        let mut seen_teams = HashSet::new();
        let mut seen_digests = HashSet::new();
        let mut seen_key_ids = HashSet::new();
        let mut out = Vec::new();
        for (i, t) in teams.iter().enumerate() {
            let id = t.id.get_ref().clone();
            let field = format!("teams[{i}]");
            if !valid_id(&id) {
                self.err(
                    &format!("{field}.id"),
                    Some(&t.id),
                    "a team id is 1–64 ASCII letters, digits, '-', '_' or '.'",
                );
            }
            if !seen_teams.insert(id.clone()) {
                self.err(
                    &format!("{field}.id"),
                    Some(&t.id),
                    format_args!("team {id:?} is defined twice"),
                );
            }
            let plan = match (&t.plan, &t.limits) {
                (Some(p), None) => {
                    if !plans.contains_key(p.get_ref()) {
                        self.err(
                            &format!("{field}.plan"),
                            Some(p),
                            format_args!(
                                "no plan named {:?}; define [plans.{}] or use one of: {}",
                                p.get_ref(),
                                p.get_ref(),
                                plans.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        );
                    }
                    TeamPlan::Named(p.get_ref().clone())
                }
                (None, Some(limits)) => {
                    if limits.is_empty() {
                        self.err(
                            &format!("{field}.limits"),
                            Some(&t.id),
                            "custom limits need at least one limit",
                        );
                    }
                    TeamPlan::Custom(
                        limits
                            .iter()
                            .enumerate()
                            .map(|(j, l)| self.limit(&format!("{field}.limits[{j}]"), l))
                            .collect(),
                    )
                }
                _ => {
                    self.err(
                        &field,
                        Some(&t.id),
                        "set exactly one of `plan` (a plan name) or `limits` (custom limits)",
                    );
                    TeamPlan::Custom(Vec::new())
                }
            };
            let mut keys = Vec::new();
            for (j, k) in t.keys.iter().enumerate() {
                let kfield = format!("{field}.keys[{j}].sha256");
                let digest = match parse_digest(k.sha256.get_ref()) {
                    Some(d) => d,
                    None => {
                        self.err(
                            &kfield,
                            Some(&k.sha256),
                            "must be 64 hex digits (the SHA-256 of the key; `keygate hash-key` prints it). \
                             Never put a plaintext key in the config",
                        );
                        [0; 32]
                    }
                };
                if !seen_digests.insert(digest) {
                    self.err(&kfield, Some(&k.sha256), "this key digest is listed twice");
                }
                let key_id =
                    k.id.clone()
                        .unwrap_or_else(|| format!("kd_{}", &hex::encode(digest)[..12]));
                if !seen_key_ids.insert(key_id.clone()) {
                    self.err(
                        &kfield,
                        Some(&k.sha256),
                        format_args!("key id {key_id:?} is used twice"),
                    );
                }
                keys.push(KeyConfig {
                    id: key_id,
                    digest,
                    scopes: k.scopes.clone(),
                    environment: k.environment.clone(),
                });
            }
            out.push(TeamConfig {
                id,
                plan,
                heartbeat_required: t.heartbeat_required,
                keys,
            });
        }
        out
    }

    fn routes(&mut self, routes: &[file::Route]) -> Vec<RouteConfig> {
        let mut out = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let field = format!("routes[{i}]");
            let path = r.path.get_ref().clone();
            if let Err(why) = crate::gate::route::Pattern::parse(&path) {
                self.err(&format!("{field}.path"), Some(&r.path), why);
            }
            let methods = r.methods.as_ref().map(|ms| {
                let mut out = Vec::new();
                for m in ms.get_ref() {
                    match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(m) => out.push(m),
                        Err(_) => self.err(
                            &format!("{field}.methods"),
                            Some(ms),
                            format_args!("{m:?} is not an HTTP method"),
                        ),
                    }
                }
                if out.is_empty() {
                    self.err(
                        &format!("{field}.methods"),
                        Some(ms),
                        "list at least one method, or leave `methods` out for any",
                    );
                }
                out
            });
            let heartbeat = match r.heartbeat.get_ref().as_str() {
                "required" => HeartbeatRule::Required,
                "exempt" => HeartbeatRule::Exempt,
                "record" => HeartbeatRule::Record,
                other => {
                    self.err(
                        &format!("{field}.heartbeat"),
                        Some(&r.heartbeat),
                        format_args!(
                            "{other:?} is not one of \"required\", \"exempt\", \"record\""
                        ),
                    );
                    HeartbeatRule::Required
                }
            };
            if r.public
                && (r.usage
                    || !r.scopes.is_empty()
                    || r.team_param.is_some()
                    || heartbeat == HeartbeatRule::Record)
            {
                self.err(
                    &format!("{field}.public"),
                    Some(&r.path),
                    "a public route needs no key, so it cannot have scopes, team_param, usage or heartbeat = \"record\"",
                );
            }
            if let Some(tp) = &r.team_param {
                if !path.contains(&format!("{{{}}}", tp.get_ref())) {
                    self.err(
                        &format!("{field}.team_param"),
                        Some(tp),
                        format_args!("the path has no {{{}}} segment", tp.get_ref()),
                    );
                }
            }
            out.push(RouteConfig {
                name: r.name.clone().unwrap_or_else(|| path.clone()),
                path,
                methods,
                public: r.public,
                heartbeat,
                rate_limited: r.rate_limited,
                scopes: r.scopes.clone(),
                environments: r.environments.clone(),
                team_param: r.team_param.as_ref().map(|t| t.get_ref().clone()),
                usage: r.usage,
                upgrade: r.upgrade,
            });
        }
        if out.is_empty() {
            self.errors.push(
                "routes: define at least one [[routes]] entry (e.g. path = \"/*\" for everything)"
                    .into(),
            );
        }
        out
    }
}

/// Team ids and key ids: short, printable, safe in headers and logs.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parses a SHA-256 digest written as 64 hex digits.
pub fn parse_digest(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out).ok()?;
    Some(out)
}
