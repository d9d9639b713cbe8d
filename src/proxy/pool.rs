//! The upstream connection pool: HTTP/1.1 keep-alive connections, reused last-in first-out,
//! each request exchanged on one by the request's own task ([`super::h1`]).
//!
//! It replaced hyper-util's legacy client (a channel hop to the pool task, hashing the pool key,
//! cloning the URI per request), and then hyper's per-connection client task (a channel hop and
//! two wake-ups per request): issue 5's profiles, BENCHMARKS.md. A connection goes back to the
//! pool when its response body has been read to the end with nothing after it; one dropped
//! part-way is closed rather than reused. An idle connection the upstream closed is noticed at
//! checkout from the reactor's readiness, without a syscall while it is quiet, or by the
//! worker's periodic [`Pool::prune`], which also closes those idle too long; one that closes
//! in the instant between checkout and the request is retried once on a fresh connection when
//! that is safe (no body, an idempotent method, nothing answered).
//!
//! With `upstream.pipeline` above 1, bodiless `GET`s and `HEAD`s go on connections they share
//! instead ([`super::pipe`]); what a broken pipe leaves unanswered comes back here, to a
//! connection of its own.
//!
//! For an `https://` upstream each connection is a rustls session, set up within the connect
//! timeout. Upgrades (WebSocket) and `CONNECT` get a connection of their own, never pooled,
//! on which hyper's client makes the request and which then becomes the tunnel.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rustls::pki_types::ServerName;
use tokio::time::Instant;

use super::body::GuardedBody;
use super::h1::{self, Conn, Decoder, H1Error, Io, ReqBody};
use super::pipe::{Answer, Pipe, Wait};

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
    H1(#[from] H1Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    /// Still fit to carry a request: idle no longer than `timeout`, and not closed (or sent
    /// anything) by the upstream meanwhile.
    fn usable(&mut self, timeout: Duration) -> bool {
        self.since.elapsed() <= timeout && self.conn.idle_ok()
    }
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
    /// Requests in flight on one connection at most; 1: no pipelining.
    pipeline: usize,
    /// Connections shared by pipelined requests, the most recently opened last.
    pipes: Mutex<Vec<Arc<Pipe>>>,
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

/// Safe to send twice (RFC 9110 §9.2.2), so safe to retry when a pooled connection closed
/// under the request with no answer.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Pool {
    pub fn new(
        addr: String,
        tls: Option<ClientTls>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        pipeline: usize,
        connects: IntCounter,
    ) -> Pool {
        Pool(Arc::new(Inner {
            addr,
            tls,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            pipeline,
            pipes: Mutex::new(Vec::new()),
            connects,
        }))
    }

    /// How long a connection may sit idle (`upstream.pool_idle_timeout`).
    pub fn idle_timeout(&self) -> Duration {
        self.0.idle_timeout
    }

    /// Whether `other` would pool the same plain-HTTP connections the same way: then a reload
    /// can keep this pool and its connections. A TLS pool never counts as the same, so that
    /// renewed CA files and names apply to every connection after a reload.
    pub fn same_as(&self, other: &Pool) -> bool {
        let (a, b) = (&*self.0, &*other.0);
        a.tls.is_none()
            && b.tls.is_none()
            && a.addr == b.addr
            && a.pipeline == b.pipeline
            && a.idle_timeout == b.idle_timeout
            && a.max_idle == b.max_idle
            && a.connect_timeout == b.connect_timeout
    }

    /// Closes the idle connections and pipes that the upstream has closed or that have been
    /// idle past `upstream.pool_idle_timeout`. Checkout skips those too, but only those it
    /// walks past: without this a burst's extra connections would sit (in `CLOSE_WAIT`, once
    /// the upstream gave up on them) until traffic next reached them.
    pub fn prune(&self) {
        let timeout = self.0.idle_timeout;
        self.0
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain_mut(|i| i.usable(timeout));
        self.0
            .pipes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| !p.close_if_stale(timeout));
    }

    /// A pooled connection that is still open, if any.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let mut idle = self
                .0
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if idle.usable(self.0.idle_timeout) {
                return Some(idle.conn);
            }
        }
    }

    async fn connect(&self) -> Result<Io, PoolError> {
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
                None => Ok(Io::Plain(stream)),
                Some(tls) => tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map(|s| Io::Tls(Box::new(s)))
                    .map_err(|source| PoolError::Tls {
                        addr: addr.clone(),
                        source,
                    }),
            }
        };
        tokio::time::timeout(self.0.connect_timeout, setup)
            .await
            .map_err(|_| PoolError::ConnectTimeout(addr.clone()))?
    }

    /// Sends an upgrade or `CONNECT` request on a connection of its own, with hyper's client.
    /// When the upstream agrees (101, or 2xx to `CONNECT`), `hyper::upgrade::on` the response
    /// yields the tunnel.
    pub async fn tunnel(&self, req: Request<GuardedBody>) -> Result<Response<Incoming>, PoolError> {
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream tunnel connection ended with an error");
            }
        });
        Ok(sender.send_request(req).await?)
    }

    /// Queues a pipelined request on the newest pipe with room, else on a new connection.
    fn attach(&self, head: bool, encode: &impl Fn(&mut Vec<u8>)) -> Option<Wait> {
        let mut pipes = self.0.pipes.lock().unwrap_or_else(|e| e.into_inner());
        for i in (0..pipes.len()).rev() {
            if let Some(w) = pipes[i].attach(self.0.pipeline, self.0.idle_timeout, head, encode) {
                return Some(w);
            }
            if pipes[i].is_closed() {
                pipes.remove(i);
            }
        }
        None
    }

    /// A bodiless `GET` or `HEAD` on a pipe ([`super::pipe`]). `Ok(None)`: the pipe broke
    /// before its answer began, and it is to be sent again on a connection of its own.
    async fn send_piped(
        &self,
        parts: &http::request::Parts,
        extra: &h1::Extra<'_>,
    ) -> Result<Option<Response<Pooled>>, PoolError> {
        let head = parts.method == Method::HEAD;
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let encode = |out: &mut Vec<u8>| {
            h1::encode_head(
                out,
                &parts.method,
                target,
                &parts.headers,
                extra,
                ReqBody::None,
            )
        };
        let wait = match self.attach(head, &encode) {
            Some(w) => w,
            None => {
                let pipe = Arc::new(Pipe::new(Conn::new(self.connect().await?)));
                let Some(w) = pipe.attach(self.0.pipeline, self.0.idle_timeout, head, encode)
                else {
                    return Ok(None);
                };
                let mut pipes = self.0.pipes.lock().unwrap_or_else(|e| e.into_inner());
                if pipes.len() < self.0.max_idle.max(1) {
                    pipes.push(pipe);
                }
                w
            }
        };
        // As in `h1::exchange`: the requests of this turn are queued before the first of them
        // writes, so their heads go out in one write. Only that first one yields; the others
        // wait for their answers at once, which saves each a turn through the runtime.
        if wait.writes() {
            tokio::task::yield_now().await;
        }
        Ok(match wait.await {
            Answer::Whole(h, body) => Some(response(
                h.status,
                h.version,
                h.headers,
                Pooled(Kind::Whole(body)),
            )),
            Answer::Stream(h, conn) => {
                // A connection that left its pipe to stream never comes back to the pool.
                let body = Pooled(Kind::Stream {
                    conn,
                    decoder: h.decoder,
                    back: None,
                });
                Some(response(h.status, h.version, h.headers, body))
            }
            Answer::Failed(e) => return Err(e.into()),
            Answer::Unanswered => None,
        })
    }

    /// Sends a request (origin-form URI, `Host` set here or by `extra`) with `extra`'s fields,
    /// and returns the response, whose body gives the connection back to the pool when read to
    /// the end.
    pub async fn send(
        &self,
        req: Request<GuardedBody>,
        extra: &h1::Extra<'_>,
    ) -> Result<Response<Pooled>, PoolError> {
        let (parts, body) = req.into_parts();
        let empty = body.is_end_stream();
        if empty
            && self.0.pipeline > 1
            && (parts.method == Method::GET || parts.method == Method::HEAD)
        {
            if let Some(resp) = self.send_piped(&parts, extra).await? {
                return Ok(resp);
            }
        }
        let framing = ReqBody::of(&parts.method, empty, body.size_hint().exact());
        let (mut conn, mut reused) = match self.checkout() {
            Some(c) => (c, true),
            None => (Conn::new(self.connect().await?), false),
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        conn.head.clear();
        h1::encode_head(
            &mut conn.head,
            &parts.method,
            target,
            &parts.headers,
            extra,
            framing,
        );
        let mut body = (!empty).then_some((body, framing));
        let head = loop {
            match h1::exchange(&mut conn, &parts.method, body.take()).await {
                Ok(head) => break head,
                Err(f) if reused && f.unanswered && empty && idempotent(&parts.method) => {
                    let mut fresh = Conn::new(self.connect().await?);
                    std::mem::swap(&mut fresh.head, &mut conn.head);
                    conn = fresh;
                    reused = false;
                }
                Err(f) => return Err(f.error.into()),
            }
        };
        let h1::Head {
            status,
            version,
            headers,
            mut decoder,
            reuse,
        } = head;
        // The common case: the whole body came with the head, and the connection can go back
        // before the response is even returned.
        let whole = match decoder.remaining() {
            Some(0) => Some(None),
            Some(n) if conn.buf.len() as u64 >= n => Some(decoder.decode(&mut conn.buf)?),
            _ => None,
        };
        let body = match whole {
            Some(data) => {
                if reuse {
                    self.put(conn);
                }
                Pooled(Kind::Whole(data))
            }
            None => Pooled(Kind::Stream {
                conn,
                decoder,
                back: reuse.then(|| self.clone()),
            }),
        };
        Ok(response(status, version, headers, body))
    }

    fn put(&self, conn: Conn) {
        if !conn.buf.is_empty() {
            return; // Bytes past the response: the connection is out of step.
        }
        let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.0.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// The response of a parsed head (for either path: one connection, or a pipe).
fn response(
    status: http::StatusCode,
    version: http::Version,
    headers: http::HeaderMap,
    body: Pooled,
) -> Response<Pooled> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    resp
}

/// An upstream response body. Read to its end, it returns its connection to the pool.
pub struct Pooled(Kind);

enum Kind {
    /// All of it was in hand (or there is none); the connection has gone back already.
    Whole(Option<Bytes>),
    Stream {
        conn: Conn,
        decoder: Decoder,
        /// The pool, when the connection may be reused.
        back: Option<Pool>,
    },
    /// A tunnel's refusal, from hyper's client.
    Hyper(Incoming),
    /// The stream broke; the error is told on the next poll, so that what came before it
    /// (the head, the last data) is flushed to the client first.
    Broken(Option<PoolError>),
}

impl Pooled {
    /// A body whose connection is not the pool's (a tunnel's refusal).
    pub fn unpooled(inner: Incoming) -> Pooled {
        Pooled(Kind::Hyper(inner))
    }

    /// Keeps `e` for the next poll, once the server side has flushed what it has (see
    /// `Kind::Broken`).
    fn broken<T>(&mut self, cx: &mut Context<'_>, e: PoolError) -> Poll<T> {
        self.0 = Kind::Broken(Some(e));
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The body is over: its connection goes back if it may.
    fn finish(&mut self) {
        if let Kind::Stream {
            conn,
            back: Some(pool),
            ..
        } = std::mem::replace(&mut self.0, Kind::Whole(None))
        {
            pool.put(conn);
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = PoolError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, PoolError>>> {
        let this = &mut *self;
        let (conn, decoder) = match &mut this.0 {
            Kind::Whole(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Hyper(inner) => return Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Kind::Broken(e) => return Poll::Ready(e.take().map(Err)),
            Kind::Stream { conn, decoder, .. } => (conn, decoder),
        };
        loop {
            match decoder.decode(&mut conn.buf) {
                Ok(Some(data)) => {
                    if decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if decoder.is_done() => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => return this.broken(cx, e.into()),
            }
            h1::make_room(&mut conn.buf);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            )) {
                // Read to the close (so not reusable), or cut short.
                Ok(0) => match decoder.eof() {
                    Ok(()) => {
                        this.0 = Kind::Whole(None);
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.broken(cx, e.into()),
                },
                Ok(_) => {}
                Err(e) => return this.broken(cx, H1Error::Io(e).into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Whole(data) => data.is_none(),
            Kind::Broken(_) => false,
            Kind::Stream { decoder, .. } => decoder.is_done(),
            Kind::Hyper(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Stream { decoder, .. } => match decoder.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Kind::Hyper(inner) => inner.size_hint(),
            Kind::Broken(_) => SizeHint::default(),
        }
    }
}
