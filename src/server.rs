//! Wiring: builds the gate, proxy and admin listener for a config and runs them on listeners it
//! is given, until a shutdown signal; then drains and flushes state.
//!
//! [`Server::run`] takes bound listeners and a shutdown receiver, so tests and the demo bind
//! `127.0.0.1:0` themselves, and the binary maps signals onto the same receiver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::proxy::server::{serve, Limits, Plain};
use crate::proxy::Proxy;
use crate::store::sqlite::SqliteStore;
use crate::store::{KeyStore, NoStore, StateStore, StoreError, StoredKey, StoredTeam};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// How to run: the clock (manual in tests), the metrics registry, and where the config came
/// from (for reloads).
#[derive(Debug, Clone)]
pub struct Options {
    pub clock: Clock,
    pub metrics: Metrics,
    pub config_path: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: Clock::system(),
            metrics: Metrics::standalone(),
            config_path: None,
        }
    }
}

/// The file name of the SQLite store inside `state.dir`.
pub const STORE_FILE: &str = "keygate.db";

/// Stands in for the store when it could not be opened: every lookup fails, so uncached keys
/// are refused with 503 (fail closed) instead of 401.
#[derive(Debug)]
struct Broken(String);

impl KeyStore for Broken {
    fn find_key(&self, _: &[u8; 32]) -> Result<Option<StoredKey>, StoreError> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
    fn find_team(&self, _: &str) -> Result<Option<StoredTeam>, StoreError> {
        Err(StoreError::Unavailable(self.0.clone()))
    }
}

/// Resolves no certificate: every handshake fails (used when the TLS files broke between
/// validation and start, so the listener never falls back to plain HTTP).
#[derive(Debug)]
struct NoCert;

impl rustls::server::ResolvesServerCert for NoCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// The SQLite store if open, and what the gate uses for keys and for state.
type Stores = (
    Option<Arc<SqliteStore>>,
    Arc<dyn KeyStore>,
    Arc<dyn StateStore>,
);

/// A running keygate's parts.
pub struct Server {
    pub gate: Arc<Gate>,
    /// Every worker's proxy, the first one's first: each has its own upstream pool, on its
    /// worker's runtime.
    proxies: Mutex<Vec<Arc<Proxy>>>,
    /// The SQLite store, when `state.dir` is set and it opened.
    pub store: Option<Arc<SqliteStore>>,
    state: Arc<dyn StateStore>,
    config_path: Option<PathBuf>,
    ready: AtomicBool,
    admin_token: arc_swap::ArcSwapOption<Vec<u8>>,
    /// TLS termination, when `proxy.tls` is set.
    tls: Option<Arc<crate::proxy::server::Tls>>,
}

/// Reads the admin token from the environment variable or file the config names.
pub fn load_admin_token(config: &Config) -> Option<Vec<u8>> {
    let raw = if let Some(var) = &config.admin.token_env {
        std::env::var(var).ok()
    } else if let Some(file) = &config.admin.token_file {
        match std::fs::read_to_string(file) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "cannot read the admin token file; the admin API is off");
                None
            }
        }
    } else {
        None
    };
    raw.map(|t| t.trim().as_bytes().to_vec())
        .filter(|t| !t.is_empty())
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// Opens the store of a config's state directory.
pub fn open_store(dir: &Path) -> Result<SqliteStore, StoreError> {
    SqliteStore::open(&dir.join(STORE_FILE))
}

impl Server {
    /// Builds everything for a validated config; restores persisted heartbeats.
    pub fn new(config: Config, opts: Options) -> Server {
        let config = Arc::new(config);
        let (store, keys, state): Stores = match config.state_dir() {
            None => (None, Arc::new(NoStore), Arc::new(NoStore)),
            Some(dir) => match open_store(dir) {
                Ok(s) => {
                    let s = Arc::new(s);
                    (Some(s.clone()), s.clone(), s)
                }
                Err(e) => {
                    tracing::error!(error = %e, dir = %dir.display(),
                            "cannot open the state store; heartbeats and usage stay in memory, uncached keys get 503");
                    opts.metrics.state_write_errors.inc();
                    (None, Arc::new(Broken(e.to_string())), Arc::new(NoStore))
                }
            },
        };
        let gate = Arc::new(Gate::new(
            config,
            keys,
            opts.clock.clone(),
            opts.metrics.clone(),
        ));
        match state.load_heartbeats() {
            Ok(beats) => gate.heartbeats.restore(beats),
            Err(e) => tracing::error!(error = %e, "cannot load heartbeats; starting with none"),
        }
        // Teams in the store whose keys have not been used yet still count for the stale-teams
        // metric with their own heartbeat rule (config teams were registered with the snapshot).
        if let Some(s) = &store {
            let default = gate.snapshot().config.heartbeat.required;
            for t in s.list_teams().unwrap_or_default() {
                if gate.snapshot().team(&t.id).is_none() {
                    gate.heartbeats
                        .beat(&t.id, t.heartbeat_required.unwrap_or(default));
                }
            }
        }
        let tls = {
            let snap = gate.snapshot();
            snap.config.proxy.tls.as_ref().map(|files| {
                // Validation already built this config once; a failure now (the files changed
                // in between) leaves an empty config that refuses every handshake: never plain.
                let cfg = crate::tls::server_config(files).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "TLS config failed; refusing TLS handshakes");
                    Arc::new(
                        rustls::ServerConfig::builder_with_provider(Arc::new(
                            rustls::crypto::ring::default_provider(),
                        ))
                        .with_safe_default_protocol_versions()
                        .map(|b| b.with_no_client_auth().with_cert_resolver(Arc::new(NoCert)))
                        .unwrap_or_else(|_| unreachable!("ring supports the default versions")),
                    )
                });
                Arc::new(crate::proxy::server::Tls::new(
                    cfg,
                    snap.config.proxy.header_read_timeout,
                ))
            })
        };
        let proxy = Arc::new(Proxy::new(gate.clone(), tls.is_some()));
        let admin_token =
            arc_swap::ArcSwapOption::from(load_admin_token(&gate.snapshot().config).map(Arc::new));
        Server {
            gate,
            proxies: Mutex::new(vec![proxy]),
            store,
            state,
            config_path: opts.config_path,
            ready: AtomicBool::new(false),
            admin_token,
            tls,
        }
    }

    /// Whether the proxy is accepting and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Re-reads the config file and swaps it in if valid; the old config keeps serving if not.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.config_path else {
            return Err(ConfigError::Invalid(vec![
                "no config file to reload from".into()
            ]));
        };
        let metrics = self.gate.metrics();
        match Config::load(path) {
            Ok(c) => {
                self.apply(c);
                metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(path = %path.display(), "config reloaded");
                Ok(())
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["refused"]).inc();
                tracing::error!(path = %path.display(), error = %e, "config reload refused; the old config keeps serving");
                Err(e)
            }
        }
    }

    /// Swaps in a validated config (listener addresses, worker counts and turning TLS on or off
    /// apply on restart; a renewed certificate applies at once).
    pub fn apply(&self, config: Config) {
        if let (Some(tls), Some(files)) = (&self.tls, &config.proxy.tls) {
            match crate::tls::server_config(files) {
                Ok(c) => tls.replace(c),
                Err(e) => {
                    tracing::error!(error = %e, "TLS files unusable; keeping the old certificate")
                }
            }
        }
        self.admin_token
            .store(load_admin_token(&config).map(Arc::new));
        // Upstreams first: a request that sees the new snapshot then sees its upstream too.
        for p in self.proxies().iter() {
            p.reloaded(&config.upstream);
        }
        self.gate.reload(Arc::new(config));
    }

    /// The admin API's token, if one is configured.
    pub fn admin_token(&self) -> Option<Arc<Vec<u8>>> {
        self.admin_token.load_full()
    }

    /// A stored key's usage plus what this process counted and has not flushed yet.
    pub fn with_live_usage(
        &self,
        mut k: crate::store::sqlite::KeyInfo,
    ) -> crate::store::sqlite::KeyInfo {
        if let Some((n, last)) = self.gate.usage.unflushed(&k.key_id) {
            k.use_count += n;
            if last > k.last_used_at.unwrap_or(0) {
                k.last_used_at = Some(last);
            }
        }
        k
    }

    /// Writes dirty heartbeats and pending usage to the state store. Failures are counted and
    /// logged, and the data stays in memory for the next try.
    pub fn flush(&self) {
        if let Some(beats) = self.gate.heartbeats.take_dirty() {
            if let Err(e) = self.state.save_heartbeats(&beats) {
                self.gate.heartbeats.mark_dirty();
                self.gate.metrics().state_write_errors.inc();
                tracing::error!(error = %e, "cannot persist heartbeats; kept in memory, will retry");
            }
        }
        let usage = self.gate.usage.pending();
        if !usage.is_empty() {
            match self.state.add_usage(&usage) {
                Ok(()) => self.gate.usage.commit(&usage),
                Err(e) => {
                    self.gate.metrics().state_write_errors.inc();
                    tracing::error!(error = %e, "cannot persist key usage; kept in memory, will retry");
                }
            }
        }
    }

    /// Updates the gauges that are read, not counted.
    pub fn refresh_gauges(&self) {
        let m = self.gate.metrics();
        let snap = self.gate.snapshot();
        let now = self.gate.clock().now().wall_ms;
        m.stale_teams
            .set(self.gate.heartbeats.stale(now, snap.heartbeat_window_ms) as i64);
        m.cache_entries.set(self.gate.cache_counts().0 as i64);
        m.limiter_buckets.set(self.gate.limiters.len() as i64);
    }

    /// Serves until `shutdown` turns true; then drains the proxy, flushes state and returns.
    pub async fn run(
        self: Arc<Self>,
        proxy_listener: TcpListener,
        admin_listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) {
        self.run_workers(vec![proxy_listener], admin_listener, shutdown)
            .await
    }

    /// [`Server::run`] with one worker per proxy listener (see [`bind`]): the first is served
    /// on the caller's runtime, with the admin API and the background work; every other one
    /// on a thread of its own with a single-threaded runtime and its own upstream pool, so a
    /// request and its upstream connection never change threads. All drain together.
    pub async fn run_workers(
        self: Arc<Self>,
        mut proxy_listeners: Vec<TcpListener>,
        admin_listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) {
        let snap = self.gate.snapshot();
        let limits = Limits::from(&snap.config.proxy);
        let usage_every = snap.config.keys.usage_flush_interval;
        drop(snap);
        // The admin listener outlives the drain, so /readyz can say 503 while it runs.
        let (admin_stop, admin_rx) = watch::channel(false);
        let admin = tokio::spawn(crate::admin::serve(admin_listener, self.clone(), admin_rx));
        let background = tokio::spawn(self.clone().background(usage_every, shutdown.clone()));
        let unready = {
            let this = self.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                stopped(&mut shutdown).await;
                this.ready.store(false, Ordering::Release);
            })
        };
        let semaphore = Arc::new(Semaphore::new(limits.max_connections));
        let first = proxy_listeners.remove(0);
        let mut others = Vec::new();
        for (i, l) in proxy_listeners.into_iter().enumerate() {
            match self.spawn_worker(i + 1, l, &limits, &semaphore, &shutdown) {
                Ok(done) => others.push(done),
                Err(e) => tracing::error!(error = %e, worker = i + 1, "cannot start a worker"),
            }
        }
        self.ready.store(true, Ordering::Release);
        let proxy = self.proxies()[0].clone();
        self.serve_on(first, proxy, limits, semaphore, shutdown.clone())
            .await;
        for done in others {
            let _ = done.await;
        }
        self.ready.store(false, Ordering::Release);
        unready.abort();
        let _ = background.await;
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.flush()).await;
        let _ = admin_stop.send(true);
        let _ = admin.await;
        tracing::info!("stopped");
    }

    fn proxies(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Proxy>>> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One worker's accept loop and drain, plain or TLS.
    async fn serve_on(
        &self,
        listener: TcpListener,
        proxy: Arc<Proxy>,
        limits: Limits,
        semaphore: Arc<Semaphore>,
        shutdown: watch::Receiver<bool>,
    ) {
        match &self.tls {
            Some(tls) => serve(listener, tls.clone(), proxy, limits, semaphore, shutdown).await,
            None => {
                serve(
                    listener,
                    Arc::new(Plain),
                    proxy,
                    limits,
                    semaphore,
                    shutdown,
                )
                .await
            }
        }
    }

    /// Starts worker `n` on a thread of its own; the receiver resolves when it has drained.
    fn spawn_worker(
        self: &Arc<Self>,
        n: usize,
        listener: TcpListener,
        limits: &Limits,
        semaphore: &Arc<Semaphore>,
        shutdown: &watch::Receiver<bool>,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        // A listener belongs to the runtime that registered it: hand over the socket itself.
        let listener = listener.into_std()?;
        let proxy = Arc::new(Proxy::new(self.gate.clone(), self.tls.is_some()));
        self.proxies().push(proxy.clone());
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (this, limits, semaphore, shutdown) = (
            self.clone(),
            limits.clone(),
            semaphore.clone(),
            shutdown.clone(),
        );
        let rt = worker_runtime()?;
        std::thread::Builder::new()
            .name(format!("keygate-w{n}"))
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => this.serve_on(l, proxy, limits, semaphore, shutdown).await,
                        Err(e) => tracing::error!(error = %e, worker = n, "worker cannot listen"),
                    }
                });
                let _ = done_tx.send(());
            })?;
        Ok(done)
    }

    /// Periodic work: heartbeats are flushed within a quarter second, usage per interval, idle
    /// rate-limit buckets pruned every minute.
    async fn background(
        self: Arc<Self>,
        usage_every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut beat_tick = tokio::time::interval(Duration::from_millis(250));
        // The first flush one interval in, not at once (`interval`'s first tick is immediate):
        // nothing is pending at start, and an immediate one raced the first requests.
        let mut usage_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + usage_every, usage_every);
        let mut prune_tick = tokio::time::interval(Duration::from_secs(60));
        // Another process (the CLI) writing the store: forget cached keys within a second.
        let mut watch_tick = tokio::time::interval(Duration::from_secs(1));
        let mut seen_version = None;
        loop {
            tokio::select! {
                _ = crate::server::stopped(&mut shutdown) => return,
                _ = beat_tick.tick() => {
                    if let Some(beats) = self.gate.heartbeats.take_dirty() {
                        let this = self.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            if let Err(e) = this.state.save_heartbeats(&beats) {
                                this.gate.heartbeats.mark_dirty();
                                this.gate.metrics().state_write_errors.inc();
                                tracing::error!(error = %e, "cannot persist heartbeats; kept in memory, will retry");
                            }
                        }).await;
                    }
                }
                _ = usage_tick.tick() => {
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.flush()).await;
                }
                _ = watch_tick.tick() => {
                    if let Some(store) = self.store.clone() {
                        let v = tokio::task::spawn_blocking(move || store.data_version().ok()).await.ok().flatten();
                        if v.is_some() && seen_version.is_some() && v != seen_version {
                            tracing::info!("the key store was changed by another process; cached keys dropped");
                            self.gate.invalidate_all();
                        }
                        if v.is_some() {
                            seen_version = v;
                        }
                    }
                }
                _ = prune_tick.tick() => {
                    let kept = self.gate.prune();
                    self.gate.metrics().limiter_buckets.set(kept as i64);
                }
            }
        }
    }
}

/// A worker's runtime: single-threaded, with a blocking pool of two threads for store work.
/// The store serves one operation at a time (one SQLite connection), so more threads would only
/// wait on its lock; and each thread that allocates cache entries gets a glibc malloc arena of
/// its own, which with a million cached keys cost ~80 MiB of fragmentation at tokio's default
/// of up to 512 threads (BENCHMARKS.md, "Memory"). Two, not one, so that one stuck operation
/// cannot stop key lookups.
pub fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
}

/// The worker count `proxy.workers` asks for (0: one per core).
pub fn workers(config: &Config) -> usize {
    match config.proxy.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds the configured listeners: one proxy listener per worker (with `SO_REUSEPORT`, so the
/// kernel spreads new connections over the workers' accept queues), and the admin listener.
pub async fn bind(config: &Config) -> Result<(Vec<TcpListener>, TcpListener), ServerError> {
    let n = workers(config);
    let mut addr = config.proxy.listen;
    let mut proxy = Vec::with_capacity(n);
    for _ in 0..n {
        let l = listen(addr, n > 1).map_err(|source| ServerError::Bind {
            addr: config.proxy.listen,
            source,
        })?;
        // Port 0: the other workers join the port the first one got.
        addr = l.local_addr().unwrap_or(addr);
        proxy.push(l);
    }
    let a = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    Ok((proxy, a))
}

fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Resolves once `shutdown` has turned true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
