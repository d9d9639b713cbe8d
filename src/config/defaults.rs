//! Every default in one place: the `DEFAULT_*` constants that the file structs point at, each
//! documented in README's configuration reference.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Spanned;

pub(crate) const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Open client connections beyond this wait in the kernel's backlog.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub(crate) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Envoy's default header budget: 60 KiB.
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;
pub(crate) const DEFAULT_MAX_HEADERS: usize = 100;
pub(crate) const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub(crate) const DEFAULT_POOL_MAX_IDLE: usize = 256;
/// Requests in flight on one upstream connection: 1, no pipelining (see `proxy::pipe`).
pub(crate) const DEFAULT_PIPELINE: usize = 1;
/// The most `upstream.pipeline` may be.
pub(crate) const MAX_PIPELINE: usize = 128;
pub(crate) const DEFAULT_MAX_KEY_LENGTH: usize = 256;
pub(crate) const DEFAULT_MAX_ACTIVE_KEYS_PER_TEAM: usize = 50;
pub(crate) const DEFAULT_USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_CACHE_CAPACITY: u64 = 1_000_000;
pub(crate) const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
pub(crate) const DEFAULT_NEGATIVE_CAPACITY: u64 = 100_000;
pub(crate) const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_HEARTBEAT_WINDOW: Duration = Duration::from_secs(48 * 3600);
pub(crate) const DEFAULT_FAILED_AUTH_PER_MINUTE: u32 = 600;
pub const DEFAULT_STATE_DIR: &str = "state";

pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_proxy_listen() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_PROXY_LISTEN.to_owned())
}
pub(super) fn default_admin_listen() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_ADMIN_LISTEN.to_owned())
}
pub(super) fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
pub(super) fn default_header_read_timeout() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
pub(super) fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
pub(super) fn default_body_timeout() -> Duration {
    DEFAULT_BODY_TIMEOUT
}
pub(super) fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
pub(super) fn default_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
pub(super) fn default_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
pub(super) fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
pub(super) fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
pub(super) fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}
pub(super) fn default_pool_idle_timeout() -> Duration {
    DEFAULT_POOL_IDLE_TIMEOUT
}
pub(super) fn default_pool_max_idle() -> usize {
    DEFAULT_POOL_MAX_IDLE
}
pub(super) fn default_pipeline() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_PIPELINE)
}
pub(super) fn default_sources() -> Spanned<Vec<String>> {
    Spanned::new(0..0, vec!["x-api-key".to_owned()])
}
pub(super) fn default_max_key_length() -> usize {
    DEFAULT_MAX_KEY_LENGTH
}
pub(super) fn default_key_prefixes() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("live".to_owned(), "sk_live_".to_owned()),
        ("test".to_owned(), "sk_test_".to_owned()),
    ])
}
pub(super) fn default_max_active_per_team() -> usize {
    DEFAULT_MAX_ACTIVE_KEYS_PER_TEAM
}
pub(super) fn default_usage_flush() -> Duration {
    DEFAULT_USAGE_FLUSH_INTERVAL
}
pub(super) fn default_cache_capacity() -> u64 {
    DEFAULT_CACHE_CAPACITY
}
pub(super) fn default_cache_ttl() -> Duration {
    DEFAULT_CACHE_TTL
}
pub(super) fn default_negative_capacity() -> u64 {
    DEFAULT_NEGATIVE_CAPACITY
}
pub(super) fn default_negative_ttl() -> Duration {
    DEFAULT_NEGATIVE_TTL
}
pub(super) fn default_heartbeat_window() -> Duration {
    DEFAULT_HEARTBEAT_WINDOW
}
pub(super) fn default_limit_key() -> Spanned<String> {
    Spanned::new(0..0, "team".to_owned())
}
pub(super) fn default_rate_headers() -> Spanned<String> {
    Spanned::new(0..0, "all".to_owned())
}
pub(super) fn default_failed_auth_per_minute() -> u32 {
    DEFAULT_FAILED_AUTH_PER_MINUTE
}
pub(super) fn default_error_style() -> Spanned<String> {
    Spanned::new(0..0, "outx".to_owned())
}
pub(super) fn default_log_format() -> Spanned<String> {
    Spanned::new(0..0, "text".to_owned())
}
pub(super) fn default_log_level() -> String {
    "info".to_owned()
}
pub(super) fn default_route_heartbeat() -> Spanned<String> {
    Spanned::new(0..0, "required".to_owned())
}
