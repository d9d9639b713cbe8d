//! The upstream connection pool: HTTP/1.1 keep-alive connections made with hyper's
//! `client::conn::http1`, reused last-in first-out.
//!
//! It replaces hyper-util's legacy client, whose per-request work (a channel hop to the pool
//! task, hashing the pool key, cloning the URI) was the largest single cost in keygate's own
//! code under load (issue 5's profile). A connection goes back to the pool when its response
//! body has been read to the end; one dropped part-way is closed rather than reused. A request
//! that could not be written on a pooled connection (it closed under us) is retried once on a
//! fresh one — hyper hands the unsent request back, so nothing is sent twice.
//!
//! For an `https://` upstream each connection is a rustls session, set up within the connect
//! timeout. Upgrades (WebSocket) and `CONNECT` get a connection of their own, never pooled,
//! which becomes the tunnel.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::rt::{Read, Write};
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rustls::pki_types::ServerName;
use tokio::time::Instant;

use super::body::GuardedBody;

/// Why a request could not be exchanged with the upstream.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    sender: SendRequest<GuardedBody>,
    since: Instant,
}

/// TLS settings of an `https://` upstream.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

struct Inner {
    addr: String,
    tls: Option<ClientTls>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
    connects: IntCounter,
}

/// A pool of keep-alive connections to one upstream address.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.0.addr)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(
        addr: String,
        tls: Option<ClientTls>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        connects: IntCounter,
    ) -> Pool {
        Pool(Arc::new(Inner {
            addr,
            tls,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            connects,
        }))
    }

    /// The upstream address (`host:port`).
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Whether connections are TLS sessions.
    pub fn is_tls(&self) -> bool {
        self.0.tls.is_some()
    }

    /// A pooled connection that is ready for a request, if any.
    async fn checkout(&self) -> Option<SendRequest<GuardedBody>> {
        loop {
            let idle = self
                .0
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if idle.sender.is_closed() || idle.since.elapsed() > self.0.idle_timeout {
                continue;
            }
            let mut sender = idle.sender;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, upgrades: bool) -> Result<SendRequest<GuardedBody>, PoolError> {
        let addr = &self.0.addr;
        let setup = async {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| PoolError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let _ = stream.set_nodelay(true);
            self.0.connects.inc();
            match &self.0.tls {
                None => Ok(Stream::Plain(stream)),
                Some(tls) => tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map(|s| Stream::Tls(Box::new(s)))
                    .map_err(|source| PoolError::Tls {
                        addr: addr.clone(),
                        source,
                    }),
            }
        };
        let stream = tokio::time::timeout(self.0.connect_timeout, setup)
            .await
            .map_err(|_| PoolError::ConnectTimeout(addr.clone()))??;
        match stream {
            Stream::Plain(s) => start(TokioIo::new(s), upgrades).await,
            Stream::Tls(s) => start(TokioIo::new(*s), upgrades).await,
        }
    }

    /// Sends an upgrade or `CONNECT` request on a connection of its own. When the upstream
    /// agrees (101, or 2xx to `CONNECT`), `hyper::upgrade::on` the response yields the tunnel.
    pub async fn tunnel(&self, req: Request<GuardedBody>) -> Result<Response<Incoming>, PoolError> {
        let mut sender = self.connect(true).await?;
        Ok(sender.send_request(req).await?)
    }

    /// Sends a request (origin-form URI, `Host` set) and returns the response, whose body
    /// gives the connection back to the pool when read to the end.
    pub async fn send(&self, req: Request<GuardedBody>) -> Result<Response<Pooled>, PoolError> {
        let (mut sender, reused) = match self.checkout().await {
            Some(s) => (s, true),
            None => (self.connect(false).await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                // Not written: the pooled connection closed under us. Once more, on a new one.
                Some(req) if reused => {
                    sender = self.connect(false).await?;
                    sender.send_request(req).await?
                }
                _ => return Err(e.into_error().into()),
            },
        };
        let (parts, body) = resp.into_parts();
        let mut pooled = Pooled {
            inner: body,
            back: Some((sender, self.clone())),
        };
        if pooled.inner.is_end_stream() {
            pooled.give_back();
        }
        Ok(Response::from_parts(parts, pooled))
    }

    fn put(&self, sender: SendRequest<GuardedBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.0.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// The HTTP/1.1 handshake on a connected stream; the connection is driven by a task of its own.
async fn start<T>(io: T, upgrades: bool) -> Result<SendRequest<GuardedBody>, PoolError>
where
    T: Read + Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        let ended = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An upstream response body that returns its connection to the pool at its end.
pub struct Pooled {
    inner: Incoming,
    back: Option<(SendRequest<GuardedBody>, Pool)>,
}

impl Pooled {
    /// A body whose connection is not the pool's (a tunnel's refusal).
    pub fn unpooled(inner: Incoming) -> Pooled {
        Pooled { inner, back: None }
    }

    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put(sender);
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
