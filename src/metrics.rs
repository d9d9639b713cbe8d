//! The Prometheus registry's typed handles.
//!
//! Labels are bounded by the config: route names and outcomes, never a key, team or raw path.
//! `main` (or a test) makes the `Registry` and passes it in, so each instance's metrics can be
//! read on their own.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric keygate exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `keygate_requests_total{route, outcome}`
    pub requests: IntCounterVec,
    /// `keygate_upstream_duration_seconds`: request sent → response head received.
    pub upstream_seconds: Histogram,
    /// `keygate_overhead_duration_seconds`: time spent in keygate before the upstream is asked
    /// (or before a refusal is sent): the decision, header rewriting, the queue for a connection.
    pub overhead_seconds: Histogram,
    /// `keygate_key_cache_requests_total{result}`: hit, negative_hit, miss.
    pub cache: IntCounterVec,
    pub cache_hit: IntCounter,
    pub cache_negative_hit: IntCounter,
    pub cache_miss: IntCounter,
    /// `keygate_store_lookups_total`
    pub store_lookups: IntCounter,
    /// `keygate_store_errors_total`
    pub store_errors: IntCounter,
    /// `keygate_open_connections`
    pub open_connections: IntGauge,
    /// `keygate_connections_total`
    pub connections: IntCounter,
    /// `keygate_heartbeat_stale_teams`
    pub stale_teams: IntGauge,
    /// `keygate_key_cache_entries`
    pub cache_entries: IntGauge,
    /// `keygate_limiter_buckets`
    pub limiter_buckets: IntGauge,
    /// `keygate_config_reloads_total{result}`
    pub reloads: IntCounterVec,
    /// `keygate_state_write_errors_total`
    pub state_write_errors: IntCounter,
}

impl Metrics {
    pub fn new(registry: Registry) -> Result<Metrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("keygate_requests_total", "Requests by route and outcome."),
            &["route", "outcome"],
        )?;
        let upstream_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time from sending a request upstream to receiving the response head.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let overhead_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_overhead_duration_seconds",
                "Time keygate spends on a request before asking the upstream or refusing it.",
            )
            .buckets(vec![
                0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
            ]),
        )?;
        let cache = IntCounterVec::new(
            Opts::new("keygate_key_cache_requests_total", "Key cache lookups by result."),
            &["result"],
        )?;
        let m = Metrics {
            cache_hit: cache.with_label_values(&["hit"]),
            cache_negative_hit: cache.with_label_values(&["negative_hit"]),
            cache_miss: cache.with_label_values(&["miss"]),
            cache,
            requests,
            upstream_seconds,
            overhead_seconds,
            store_lookups: IntCounter::new("keygate_store_lookups_total", "Key store lookups (cache misses loaded).")?,
            store_errors: IntCounter::new("keygate_store_errors_total", "Key store lookups that failed.")?,
            open_connections: IntGauge::new("keygate_open_connections", "Client connections open now.")?,
            connections: IntCounter::new("keygate_connections_total", "Client connections accepted.")?,
            stale_teams: IntGauge::new(
                "keygate_heartbeat_stale_teams",
                "Teams that must send heartbeats and whose last one is older than the window.",
            )?,
            cache_entries: IntGauge::new("keygate_key_cache_entries", "Keys in the positive cache.")?,
            limiter_buckets: IntGauge::new("keygate_limiter_buckets", "Rate-limit buckets held in memory.")?,
            reloads: IntCounterVec::new(
                Opts::new("keygate_config_reloads_total", "Config reloads by result."),
                &["result"],
            )?,
            state_write_errors: IntCounter::new(
                "keygate_state_write_errors_total",
                "Failed writes of heartbeats or usage to the state store (kept in memory, retried).",
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.upstream_seconds.clone()))?;
        r.register(Box::new(m.overhead_seconds.clone()))?;
        r.register(Box::new(m.cache.clone()))?;
        r.register(Box::new(m.store_lookups.clone()))?;
        r.register(Box::new(m.store_errors.clone()))?;
        r.register(Box::new(m.open_connections.clone()))?;
        r.register(Box::new(m.connections.clone()))?;
        r.register(Box::new(m.stale_teams.clone()))?;
        r.register(Box::new(m.cache_entries.clone()))?;
        r.register(Box::new(m.limiter_buckets.clone()))?;
        r.register(Box::new(m.reloads.clone()))?;
        r.register(Box::new(m.state_write_errors.clone()))?;
        Ok(m)
    }

    /// A fresh registry with every metric: for tests and benches.
    pub fn standalone() -> Metrics {
        Metrics::new(Registry::new()).unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
