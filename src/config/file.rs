//! The TOML file as written: serde structs with `deny_unknown_fields` everywhere, so a typo in an
//! auth gateway's config is an error, never a silently ignored (and failed-open) setting.
//! Nothing outside `config` sees these types; [`super::Config`] is the validated form.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::defaults::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub(super) proxy: Proxy,
    #[serde(default)]
    pub(super) admin: Admin,
    pub(super) upstream: Upstream,
    #[serde(default)]
    pub(super) credentials: Credentials,
    #[serde(default)]
    pub(super) keys: Keys,
    #[serde(default)]
    pub(super) cache: Cache,
    #[serde(default)]
    pub(super) heartbeat: Heartbeat,
    #[serde(default)]
    pub(super) limits: Limits,
    #[serde(default)]
    pub(super) state: State,
    #[serde(default)]
    pub(super) errors: Errors,
    #[serde(default)]
    pub(super) log: Log,
    #[serde(default)]
    pub(super) plans: BTreeMap<String, Plan>,
    #[serde(default)]
    pub(super) teams: Vec<Team>,
    #[serde(default)]
    pub(super) routes: Vec<Route>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Proxy {
    #[serde(default = "default_proxy_listen")]
    pub(super) listen: Spanned<String>,
    #[serde(default)]
    pub(super) workers: usize,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: usize,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub(super) header_read_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub(super) idle_timeout: Duration,
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub(super) body_timeout: Duration,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub(super) drain_timeout: Duration,
    #[serde(default = "default_max_header_bytes")]
    pub(super) max_header_bytes: usize,
    #[serde(default = "default_max_headers")]
    pub(super) max_headers: usize,
    #[serde(default = "default_max_body_bytes")]
    pub(super) max_body_bytes: u64,
    #[serde(default)]
    pub(super) trust_forwarded: bool,
    #[serde(default = "default_true")]
    pub(super) refusal_lane: bool,
    #[serde(default)]
    pub(super) tls: Option<Tls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            listen: default_proxy_listen(),
            workers: 0,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            trust_forwarded: false,
            refusal_lane: true,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Admin {
    #[serde(default = "default_admin_listen")]
    pub(super) listen: Spanned<String>,
    #[serde(default)]
    pub(super) token_env: Option<String>,
    #[serde(default)]
    pub(super) token_file: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin_listen(),
            token_env: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Upstream {
    pub(super) url: Spanned<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub(super) connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub(super) request_timeout: Duration,
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub(super) pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub(super) pool_max_idle: usize,
    #[serde(default = "default_pipeline")]
    pub(super) pipeline: Spanned<usize>,
    #[serde(default = "default_true")]
    pub(super) preserve_host: bool,
    /// PEM file of the CA(s) an `https://` upstream's certificate must chain to (instead of the
    /// system's roots).
    #[serde(default)]
    pub(super) ca: Option<Spanned<String>>,
    /// The name an `https://` upstream's certificate must carry, when it is not the URL's host.
    #[serde(default)]
    pub(super) server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Credentials {
    #[serde(default = "default_sources")]
    pub(super) sources: Spanned<Vec<String>>,
    #[serde(default = "default_max_key_length")]
    pub(super) max_key_length: usize,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            sources: default_sources(),
            max_key_length: DEFAULT_MAX_KEY_LENGTH,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Keys {
    #[serde(default = "default_key_prefixes")]
    pub(super) prefixes: BTreeMap<String, String>,
    #[serde(default = "default_max_active_per_team")]
    pub(super) max_active_per_team: usize,
    #[serde(default = "default_usage_flush", with = "humantime_serde")]
    pub(super) usage_flush_interval: Duration,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            prefixes: default_key_prefixes(),
            max_active_per_team: DEFAULT_MAX_ACTIVE_KEYS_PER_TEAM,
            usage_flush_interval: DEFAULT_USAGE_FLUSH_INTERVAL,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Cache {
    #[serde(default = "default_cache_capacity")]
    pub(super) capacity: u64,
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub(super) ttl: Duration,
    #[serde(default = "default_negative_capacity")]
    pub(super) negative_capacity: u64,
    #[serde(default = "default_negative_ttl", with = "humantime_serde")]
    pub(super) negative_ttl: Duration,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            capacity: DEFAULT_CACHE_CAPACITY,
            ttl: DEFAULT_CACHE_TTL,
            negative_capacity: DEFAULT_NEGATIVE_CAPACITY,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Heartbeat {
    #[serde(default = "default_heartbeat_window", with = "humantime_serde")]
    pub(super) window: Duration,
    #[serde(default = "default_true")]
    pub(super) required: bool,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            window: DEFAULT_HEARTBEAT_WINDOW,
            required: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    #[serde(default = "default_limit_key")]
    pub(super) key_by: Spanned<String>,
    #[serde(default = "default_rate_headers")]
    pub(super) headers: Spanned<String>,
    #[serde(default = "default_failed_auth_per_minute")]
    pub(super) failed_auth_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_by: default_limit_key(),
            headers: default_rate_headers(),
            failed_auth_per_minute: DEFAULT_FAILED_AUTH_PER_MINUTE,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct State {
    #[serde(default)]
    pub(super) dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Errors {
    #[serde(default = "default_error_style")]
    pub(super) style: Spanned<String>,
    #[serde(default)]
    pub(super) doc_url: Option<String>,
    #[serde(default)]
    pub(super) messages: BTreeMap<Spanned<String>, String>,
}

impl Default for Errors {
    fn default() -> Self {
        Errors {
            style: default_error_style(),
            doc_url: None,
            messages: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Log {
    #[serde(default = "default_log_format")]
    pub(super) format: Spanned<String>,
    #[serde(default = "default_log_level")]
    pub(super) level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Plan {
    pub(super) limits: Vec<Spanned<Limit>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct Limit {
    pub(super) requests: u32,
    #[serde(with = "humantime_serde")]
    pub(super) per: Duration,
    #[serde(default)]
    pub(super) burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Team {
    pub(super) id: Spanned<String>,
    #[serde(default)]
    pub(super) plan: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) limits: Option<Vec<Spanned<Limit>>>,
    #[serde(default)]
    pub(super) heartbeat_required: Option<bool>,
    #[serde(default)]
    pub(super) keys: Vec<Key>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Key {
    #[serde(default)]
    pub(super) id: Option<String>,
    pub(super) sha256: Spanned<String>,
    #[serde(default)]
    pub(super) scopes: Vec<String>,
    #[serde(default)]
    pub(super) environment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Route {
    #[serde(default)]
    pub(super) name: Option<String>,
    pub(super) path: Spanned<String>,
    #[serde(default)]
    pub(super) methods: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) public: bool,
    #[serde(default = "default_route_heartbeat")]
    pub(super) heartbeat: Spanned<String>,
    #[serde(default = "default_true")]
    pub(super) rate_limited: bool,
    #[serde(default)]
    pub(super) scopes: Vec<String>,
    #[serde(default)]
    pub(super) environments: Vec<String>,
    #[serde(default)]
    pub(super) team_param: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) usage: bool,
    #[serde(default)]
    pub(super) upgrade: bool,
}
