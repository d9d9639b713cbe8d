//! The accept loop and connection lifecycle.
//!
//! A semaphore caps open connections (past the cap, clients wait in the kernel's backlog);
//! accept errors such as EMFILE back off instead of spinning. Each connection is served by
//! hyper-util's HTTP/1 + HTTP/2 builder with a timer, header and HTTP/2 limits set explicitly.
//!
//! The drain is hand-rolled rather than hyper-util's `GracefulShutdown` because each connection
//! also has a watchdog for its header-read and idle timeouts ([`super::watch`]; the auto
//! builder never closes an idle keep-alive connection), and both have to act on the same pinned
//! connection.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use super::watch::{Activity, Counted, Verdict, Watchdog};
use super::{lane, ConnInfo, Proxy};
use crate::config::ProxyConfig;

/// Connection limits and timeouts of the listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl From<&ProxyConfig> for Limits {
    fn from(c: &ProxyConfig) -> Self {
        Limits {
            max_connections: c.max_connections,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            drain_timeout: c.drain_timeout,
            max_header_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
        }
    }
}

/// Builds the connection builder with every limit set explicitly.
pub fn builder(l: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Kept by the connection's watchdog instead: hyper's timer also runs through the idle
        // wait between requests, and costs a timer per request (see `watch`).
        .header_read_timeout(None::<Duration>)
        .keep_alive(true)
        // hyper's minimum buffer is 8 KiB; the header budget bounds it from above.
        .max_buf_size(l.max_header_bytes.max(8192))
        .max_headers(l.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        // Rapid reset (CVE-2023-44487) and error-reset floods.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(256))
        // CONTINUATION floods are bounded by the header list size.
        .max_header_list_size(l.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Tracks live connections, and the tunnels they became, so a drain can wait for them.
#[derive(Debug, Default)]
pub struct Live {
    count: AtomicUsize,
    zero: Notify,
}

impl Live {
    /// Counts one more until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> LiveGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self.clone())
    }
}

/// Holds a drain open while it lives.
pub struct LiveGuard(Arc<Live>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// Wraps accepted streams (plain TCP, or TLS later) into something hyper can serve.
pub trait Acceptor: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Whether a connection may start in the refusal lane ([`super::lane`]): plain TCP only,
    /// where a connection cannot be HTTP/2 but by its preface.
    const LANE: bool;
    fn accept(
        &self,
        stream: tokio::net::TcpStream,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

/// Plain TCP.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Acceptor for Plain {
    type Io = tokio::net::TcpStream;
    const LANE: bool = true;
    async fn accept(&self, stream: tokio::net::TcpStream) -> std::io::Result<Self::Io> {
        Ok(stream)
    }
}

/// TLS termination with a certificate that a reload can replace.
pub struct Tls {
    config: arc_swap::ArcSwap<rustls::ServerConfig>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    pub fn new(config: Arc<rustls::ServerConfig>, handshake_timeout: Duration) -> Tls {
        Tls {
            config: arc_swap::ArcSwap::new(config),
            handshake_timeout,
        }
    }

    /// New connections use `config` from now on.
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        self.config.store(config);
    }
}

impl Acceptor for Tls {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    const LANE: bool = false;
    async fn accept(&self, stream: tokio::net::TcpStream) -> std::io::Result<Self::Io> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        // A handshake that trickles is bounded like a request head.
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

/// Serves `listener` until `shutdown` turns true, then drains for at most the drain timeout.
/// `semaphore` holds the connection cap (shared by every worker's listener).
pub async fn serve<A: Acceptor>(
    listener: TcpListener,
    acceptor: Arc<A>,
    proxy: Arc<Proxy>,
    limits: Limits,
    semaphore: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let live = Arc::new(Live::default());
    let builder = Arc::new(builder(&limits));
    let metrics = proxy.gate.metrics().clone();
    let pruner = tokio::spawn({
        let proxy = proxy.clone();
        let mut shutdown = shutdown.clone();
        async move {
            loop {
                let next = proxy.prune_upstream();
                tokio::select! {
                    _ = crate::server::stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(next) => {}
                }
            }
        }
    });
    loop {
        let permit = tokio::select! {
            _ = crate::server::stopped(&mut shutdown) => break,
            p = semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = crate::server::stopped(&mut shutdown) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let guard = live.enter();
        let proxy = proxy.clone();
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let live = live.clone();
        let limits = limits.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            metrics.connections.inc();
            metrics.open_connections.inc();
            if let Ok(io) = acceptor.accept(stream).await {
                let info = Arc::new(ConnInfo::new(peer, live));
                let lane = A::LANE && proxy.gate.snapshot().config.proxy.refusal_lane;
                connection(io, info, proxy, &builder, &limits, lane, shutdown).await;
            }
            metrics.open_connections.dec();
            drop(guard);
            drop(permit);
        });
    }
    drop(listener);
    pruner.abort();
    // Drain: wait for live connections, at most the drain timeout.
    let wait = async {
        loop {
            let notified = live.zero.notified();
            if live.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    };
    if tokio::time::timeout(limits.drain_timeout, wait)
        .await
        .is_err()
    {
        tracing::warn!(
            open = live.count.load(Ordering::Acquire),
            "drain timeout reached; closing remaining connections"
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection<I>(
    io: I,
    info: Arc<ConnInfo>,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    limits: &Limits,
    lane: bool,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let gate = proxy.gate.clone();
    let activity = Arc::new(Activity::default());
    let (idle, header) = (limits.idle_timeout, limits.header_read_timeout);
    let mut dog = Watchdog::new(idle, header);
    let period = Watchdog::period(idle, header);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // Each tick counts as a whole period, so late ticks must not come in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut io = Counted::new(io, activity.clone());
    let mut draining = false;
    let (mut read, mut checked) = (bytes::Bytes::new(), None);
    if lane {
        let shared = lane::Shared::default();
        let run = lane::run(&mut io, &proxy, &info, &activity, &shared, limits);
        tokio::pin!(run);
        loop {
            tokio::select! {
                end = run.as_mut() => match end {
                    lane::End::Closed => return,
                    lane::End::Handover { read: r, checked: c } => {
                        gate.metrics().lane_handovers.inc();
                        (read, checked) = (r, c);
                        break;
                    }
                },
                _ = crate::server::stopped(&mut shutdown), if !draining => {
                    draining = true;
                    if shared.drain() {
                        return;
                    }
                }
                _ = tick.tick() => match dog.check(&activity) {
                    Verdict::Fine => {}
                    Verdict::Idle => {
                        gate.metrics().idle_closes.inc();
                        return;
                    }
                    Verdict::SlowHead => return slow_head(&gate, peer),
                },
            }
        }
    }
    let handed = Arc::new(lane::Handed::new(checked));
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let info = info.clone();
            let activity = activity.clone();
            let checked = handed.take();
            async move {
                let _g = activity.begin(req.version() == Version::HTTP_2);
                proxy.handle(req, &info, checked).await
            }
        })
    };
    let io = TokioIo::new(lane::Rewind::new(read, io));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    // A drain that began in the lane: hyper first reads the request handed over (all of it
    // is in `read`), so its graceful shutdown finishes that request instead of cancelling it.
    let mut drain_now = draining;
    loop {
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = std::future::ready(()), if drain_now => {
                drain_now = false;
                conn.as_mut().graceful_shutdown();
            }
            _ = crate::server::stopped(&mut shutdown), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => match dog.check(&activity) {
                Verdict::Fine => {}
                Verdict::Idle => {
                    if !draining {
                        draining = true;
                        gate.metrics().idle_closes.inc();
                        conn.as_mut().graceful_shutdown();
                    }
                }
                Verdict::SlowHead => return slow_head(&gate, peer),
            },
        }
    }
}

/// A connection closed because its request head did not arrive in time.
fn slow_head(gate: &crate::gate::Gate, peer: std::net::SocketAddr) {
    tracing::debug!(%peer, "request head not complete within the header timeout");
    gate.metrics().header_timeouts.inc();
}
