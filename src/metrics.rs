//! The Prometheus registry's typed handles.
//!
//! Labels are bounded by the config: route names and outcomes, never a key, team or raw path.
//! `main` (or a test) makes the `Registry` and passes it in, so each instance's metrics can be
//! read on their own.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

const STRIPES: usize = 8;

/// One cache line per stripe, so threads counting at once never share a line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe(AtomicU64);

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// A per-request counter split into per-thread stripes and folded into its Prometheus counter
/// when metrics are rendered (and when it is dropped). A plain `IntCounter` is one atomic that
/// every worker thread writes on every request.
#[derive(Debug)]
pub struct Striped {
    stripes: [Stripe; STRIPES],
    synced: Mutex<u64>,
    counter: IntCounter,
}

impl Striped {
    fn new(counter: IntCounter) -> Self {
        Striped {
            stripes: Default::default(),
            synced: Mutex::new(0),
            counter,
        }
    }

    #[inline]
    pub fn inc(&self) {
        let i = MY_STRIPE.with(|i| *i);
        self.stripes[i].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }

    fn sync(&self) {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let total = self.get();
        self.counter.inc_by(total.saturating_sub(*synced));
        *synced = total.max(*synced);
    }
}

impl Drop for Striped {
    fn drop(&mut self) {
        self.sync();
    }
}

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
    pub cache_hit: Arc<Striped>,
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
    /// `keygate_upstream_connections_total`: new upstream connections (the pool reuses them).
    pub upstream_connects: IntCounter,
    /// `keygate_state_write_errors_total`
    pub state_write_errors: IntCounter,
    /// `keygate_tunnels_open`: upgraded (WebSocket) and `CONNECT` tunnels spliced now.
    pub tunnels_open: IntGauge,
    /// `keygate_connection_timeouts_total{timeout="header"}`: cut with a request head late.
    pub header_timeouts: IntCounter,
    /// `keygate_connection_timeouts_total{timeout="idle"}`: closed as idle.
    pub idle_closes: IntCounter,
    /// `keygate_lane_handovers_total`: connections the refusal lane handed to hyper.
    pub lane_handovers: IntCounter,
    timeouts: IntCounterVec,
    striped: Arc<Mutex<Vec<Weak<Striped>>>>,
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
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )?;
        let overhead_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_overhead_duration_seconds",
                "Time keygate spends on a request before asking the upstream or refusing it.",
            )
            .buckets(vec![
                0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                0.005, 0.01, 0.05,
            ]),
        )?;
        let cache = IntCounterVec::new(
            Opts::new(
                "keygate_key_cache_requests_total",
                "Key cache lookups by result.",
            ),
            &["result"],
        )?;
        let timeouts = IntCounterVec::new(
            Opts::new(
                "keygate_connection_timeouts_total",
                "Client connections closed by a timeout: a request head not complete within \
                 proxy.header_read_timeout, or idle for proxy.idle_timeout.",
            ),
            &["timeout"],
        )?;
        let striped = Arc::new(Mutex::new(Vec::new()));
        let cache_hit = Arc::new(Striped::new(cache.with_label_values(&["hit"])));
        striped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&cache_hit));
        let m = Metrics {
            striped,
            cache_hit,
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
            upstream_connects: IntCounter::new(
                "keygate_upstream_connections_total",
                "Upstream connections opened (kept alive and reused by the pool).",
            )?,
            state_write_errors: IntCounter::new(
                "keygate_state_write_errors_total",
                "Failed writes of heartbeats or usage to the state store (kept in memory, retried).",
            )?,
            tunnels_open: IntGauge::new(
                "keygate_tunnels_open",
                "Upgraded (WebSocket) and CONNECT tunnels open now.",
            )?,
            lane_handovers: IntCounter::new(
                "keygate_lane_handovers_total",
                "Plain HTTP/1.1 connections the refusal lane handed to hyper (at their first \
                 request not refused there).",
            )?,
            header_timeouts: timeouts.with_label_values(&["header"]),
            idle_closes: timeouts.with_label_values(&["idle"]),
            timeouts,
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
        r.register(Box::new(m.upstream_connects.clone()))?;
        r.register(Box::new(m.tunnels_open.clone()))?;
        r.register(Box::new(m.timeouts.clone()))?;
        r.register(Box::new(m.lane_handovers.clone()))?;
        Ok(m)
    }

    /// A fresh registry with every metric: for tests and benches.
    pub fn standalone() -> Metrics {
        Metrics::new(Registry::new()).unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }

    /// A striped counter over `counter`, folded in on every render.
    pub fn striped(&self, counter: IntCounter) -> Arc<Striped> {
        let s = Arc::new(Striped::new(counter));
        let mut all = self.striped.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&s));
        s
    }

    /// Folds every striped counter into its Prometheus counter.
    pub fn sync(&self) {
        let all: Vec<Arc<Striped>> = {
            let mut all = self.striped.lock().unwrap_or_else(|e| e.into_inner());
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        for s in all {
            s.sync();
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        self.sync();
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counts_reach_prometheus_on_render_and_on_drop() {
        let m = Metrics::standalone();
        let c = m.striped(m.requests.with_label_values(&["r", "forwarded"]));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..1000).for_each(|_| c.inc()));
            }
        });
        assert_eq!(c.get(), 4000);
        assert!(m
            .render()
            .contains("keygate_requests_total{outcome=\"forwarded\",route=\"r\"} 4000"));
        c.inc();
        drop(c);
        assert!(m
            .render()
            .contains("keygate_requests_total{outcome=\"forwarded\",route=\"r\"} 4001"));
    }
}
