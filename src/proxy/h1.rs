//! HTTP/1.1 with the upstream, spoken by the request's own task.
//!
//! hyper's client drives each connection from a task of its own and passes every request to it
//! over a channel, so a forwarded request costs two extra task wake-ups and a channel hop on top
//! of the socket work: in issue 5's profile the client was the largest block of keygate's own
//! user time. Here the request's task writes the request head itself, reads and parses the
//! response head (with httparse, as hyper does, header values sliced from the read buffer
//! without copies), and the response body is decoded from the same buffer as the server side
//! polls it. A response that arrived whole with its head costs no further poll.
//!
//! What is ours is the framing of RFC 9112: the request's length (`Content-Length` from an exact
//! size, else chunked); the response's (none for `HEAD`, 1xx, 204 and 304; chunked; a valid
//! `Content-Length`; else to the close); and when a connection may carry another request (HTTP/1.1,
//! no `Connection: close`, a delimited body read to its end with nothing after it). Tunnels
//! (upgrades, `CONNECT`) stay on hyper's client, which hands the connection over.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::body::{BodyError, GuardedBody};

/// A response head larger than this is refused (as hyper's client refuses one over its buffer).
pub const MAX_HEAD: usize = 64 * 1024;
/// Header fields in a response head at most (hyper's default).
const MAX_HEADERS: usize = 100;
/// Response fields keygate may add to an upstream's answer (`x-request-id`, `RateLimit-Policy`,
/// `RateLimit`, three `X-RateLimit-*`).
const ADDED_FIELDS: usize = 6;
/// What a read asks for when the buffer is short of room.
const READ_SIZE: usize = 8 * 1024;
/// A chunk-size line (with extensions) or a trailer section longer than this is refused.
const MAX_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("the upstream closed the connection mid-response")]
    Truncated,
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
    #[error("the request body is longer or shorter than its length")]
    BodyLength,
    #[error(transparent)]
    Body(#[from] BodyError),
}

/// A connection's transport: plain TCP or a rustls session over it.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One upstream connection: its transport and its read and write buffers.
pub struct Conn {
    pub(super) io: Io,
    /// Read, not yet consumed.
    pub(super) buf: BytesMut,
    /// The request head being sent.
    pub(super) head: Vec<u8>,
}

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
        }
    }

    /// Whether an idle connection is still open with nothing unread. A read is tried only if
    /// the reactor saw the socket readable since the last one, so a quiet connection costs no
    /// syscall; a close, a reset or stray bytes all make it unusable. (For TLS, records with no
    /// application data — session tickets — are consumed and the connection kept.)
    pub fn idle_ok(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        self.buf.is_empty()
            && Pin::new(&mut self.io)
                .poll_read(&mut cx, &mut rb)
                .is_pending()
    }
}

/// How the request body is framed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqBody {
    None,
    Length(u64),
    Chunked,
}

impl ReqBody {
    /// `Content-Length` when the size is known (and `0` for an empty body only where a body is
    /// expected, as hyper does), chunked otherwise.
    pub fn of(method: &Method, empty: bool, exact: Option<u64>) -> ReqBody {
        if empty {
            return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                ReqBody::Length(0)
            } else {
                ReqBody::None
            };
        }
        match exact {
            Some(n) => ReqBody::Length(n),
            None => ReqBody::Chunked,
        }
    }
}

/// What a request carries besides its map, written by [`encode_head`]: a `Host` that takes
/// the place of the map's, and fields that follow the map's. The proxy's own fields travel
/// this way rather than being inserted into the map (each insert hashes its name).
#[derive(Debug, Default, Clone, Copy)]
pub struct Extra<'a> {
    pub host: Option<&'a HeaderValue>,
    pub fields: &'a [(&'static HeaderName, HeaderValue)],
}

/// Appends a request head to `dst`. Names and values come from `http`'s types, so they hold no
/// CR or LF (`http` refuses them): nothing here can split the head.
pub fn encode_head(
    dst: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    extra: &Extra<'_>,
    body: ReqBody,
) {
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = extra.host {
        field(dst, &header::HOST, host);
    }
    for (name, value) in headers {
        if extra.host.is_none() || name != header::HOST {
            field(dst, name, value);
        }
    }
    for (name, value) in extra.fields {
        field(dst, name, value);
    }
    match body {
        ReqBody::None => {}
        ReqBody::Length(n) => {
            dst.extend_from_slice(b"content-length: ");
            dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.extend_from_slice(b"\r\n");
        }
        ReqBody::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    dst.extend_from_slice(b"\r\n");
}

fn field(dst: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    dst.extend_from_slice(name.as_str().as_bytes());
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub decoder: Decoder,
    /// Whether the connection may carry another request once the body is read to its end.
    pub reuse: bool,
}

/// Parses a response head from the front of `buf`, taking it off the buffer. `Ok(None)`: not
/// all there yet. The framing is settled here: a `Transfer-Encoding` wins over (and removes) a
/// `Content-Length`; differing or invalid lengths are refused.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, H1Error> {
    // Offsets of names and values in the head, so values can be slices of it once frozen.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, status, version, count) = {
        // Uninitialised, as hyper does: zeroing 100 fields per response is measurable.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(H1Error::Malformed("head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("too many header fields"))
            }
            Err(_) => return Err(H1Error::Malformed("invalid head")),
        };
        if len > MAX_HEAD {
            return Err(H1Error::Malformed("head too large"));
        }
        let status = res
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(H1Error::Malformed("invalid status"))?;
        let version = match res.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let base = buf.as_ptr() as usize;
        let count = res.headers.len();
        for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
            let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            *span = (
                at(h.name.as_bytes()),
                h.name.len() as u32,
                at(h.value),
                h.value.len() as u32,
            );
        }
        (len, status, version, count)
    };
    let head = buf.split_to(len).freeze();
    // Room for the fields keygate adds on the way back (request id, rate-limit fields), so the
    // map is not grown (a realloc) per response.
    let mut headers = HeaderMap::with_capacity(count + ADDED_FIELDS);
    for &(n, nl, v, vl) in &spans[..count] {
        let (n, v) = (n as usize, v as usize);
        let name = HeaderName::from_bytes(&head[n..n + nl as usize])
            .map_err(|_| H1Error::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl as usize))
            .map_err(|_| H1Error::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    let framing = framing(&mut headers, status, version, method)?;
    let reuse = version == Version::HTTP_11
        && !super::forward::connection_has(&headers, "close")
        && !matches!(framing, State::Close);
    Ok(Some(Head {
        status,
        version,
        headers,
        decoder: Decoder { state: framing },
        reuse,
    }))
}

/// RFC 9112 §6.3, for a response.
fn framing(
    headers: &mut HeaderMap,
    status: StatusCode,
    version: Version,
    method: &Method,
) -> Result<State, H1Error> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(State::Done);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The length is the coding's, and a stale `Content-Length` must not reach the client.
        headers.remove(header::CONTENT_LENGTH);
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
            .map(<[u8]>::trim_ascii);
        let chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked && version == Version::HTTP_11 {
            State::Size
        } else {
            State::Close
        });
    }
    let mut len = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let n = parse_len(v.as_bytes()).ok_or(H1Error::Malformed("invalid Content-Length"))?;
        if len.is_some_and(|l| l != n) {
            return Err(H1Error::Malformed("differing Content-Lengths"));
        }
        len = Some(n);
    }
    Ok(match len {
        Some(0) => State::Done,
        Some(n) => State::Length(n),
        None => State::Close,
    })
}

/// Digits only (no sign, no spaces), at most 19 of them.
fn parse_len(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes to go.
    Length(u64),
    /// Until the connection closes.
    Close,
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes to go.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section (dropped), this many bytes in.
    Trailers(usize),
    Done,
}

/// A response body's decoder: takes body bytes off the front of the read buffer.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes left, when the length is known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of body in `buf`, or `None` when more input is needed or the body is done
    /// ([`Decoder::is_done`]). Never returns an empty piece.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, H1Error> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Length(n) | State::Data(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::DataEnd,
                        (_, l) => State::Data(l),
                    };
                    return Ok(Some(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                State::Size => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(None);
                    };
                    let line = buf.split_to(end + 1);
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::Data(size)
                    };
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("chunk not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = State::Size;
                }
                State::Trailers(seen) => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(None);
                    };
                    if seen + end + 1 > MAX_TRAILERS {
                        return Err(H1Error::Malformed("trailers too large"));
                    }
                    let line = buf.split_to(end + 1);
                    self.state = if &line[..] == b"\r\n" {
                        State::Done
                    } else {
                        State::Trailers(seen + line.len())
                    };
                }
            }
        }
    }

    /// The whole body, taken off `buf`, when all of it is there (`Some(None)`: an empty one);
    /// `None`, with `buf` untouched, when some is still to come or it runs to the close.
    pub fn whole(&mut self, buf: &mut BytesMut) -> Result<Option<Option<Bytes>>, H1Error> {
        match self.state {
            State::Done => return Ok(Some(None)),
            State::Close => return Ok(None),
            State::Length(n) if (buf.len() as u64) < n => return Ok(None),
            State::Length(_) => return Ok(Some(self.decode(buf)?)),
            _ => {}
        }
        // Chunked: decoded from a copy, so that a body not all there leaves `buf` as it was.
        let mut probe = self.clone();
        let mut rest = BytesMut::from(&buf[..]);
        let mut body = BytesMut::new();
        while let Some(piece) = probe.decode(&mut rest)? {
            body.extend_from_slice(&piece);
        }
        if !probe.is_done() {
            return Ok(None);
        }
        let _ = buf.split_to(buf.len() - rest.len());
        *self = probe;
        Ok(Some((!body.is_empty()).then(|| body.freeze())))
    }

    /// The input ended: the end of a body read to the close, else a truncation.
    pub fn eof(&mut self) -> Result<(), H1Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(H1Error::Truncated),
        }
    }
}

/// The index of the LF ending the first line, which must end in CRLF.
fn line_end(buf: &[u8]) -> Result<Option<usize>, H1Error> {
    match buf.iter().take(MAX_LINE).position(|&b| b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i)),
        Some(_) => Err(H1Error::Malformed("bare LF in chunked framing")),
        None if buf.len() >= MAX_LINE => Err(H1Error::Malformed("chunk line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional extensions (ignored), then CRLF.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let line = &line[..line.len() - 2];
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    // Only whitespace, then extensions (`;name=value`), may follow the size.
    let rest = line[digits..].trim_ascii_start();
    if digits == 0
        || digits > 15
        || !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f)
    {
        return Err(H1Error::Malformed("invalid chunk size"));
    }
    Ok(line[..digits].iter().fold(0, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0);
        n * 16 + u64::from(v)
    }))
}

/// What an exchange's failure means for a retry: whether any of an answer had come.
#[derive(Debug)]
pub struct Failed {
    pub error: H1Error,
    /// Nothing was read from the upstream: if the connection was a pooled one, the upstream
    /// most likely closed it while idle.
    pub unanswered: bool,
}

impl From<H1Error> for Failed {
    fn from(error: H1Error) -> Failed {
        Failed {
            error,
            unanswered: false,
        }
    }
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Failed {
        H1Error::Io(e).into()
    }
}

/// Makes room for a read when the buffer is short of it (for the head and the body alike).
pub fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 8 {
        buf.reserve(READ_SIZE);
    }
}

/// Makes room and reads once; `Ok(0)` at the end of input.
async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    make_room(buf);
    io.read_buf(buf).await
}

/// Reads up to a final (non-1xx) response head. 1xx answers are passed over, as hyper's client
/// does; a 101 was not asked for on this path and is refused.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Head, Failed> {
    let mut answered = !buf.is_empty();
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, method)? {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(H1Error::Malformed("unrequested 101").into());
                }
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
        }
        match fill(io, buf).await {
            Ok(0) => {
                return Err(Failed {
                    error: if answered {
                        H1Error::Truncated
                    } else {
                        H1Error::Closed
                    },
                    unanswered: !answered,
                })
            }
            Ok(_) => answered = true,
            Err(e) => {
                return Err(Failed {
                    error: e.into(),
                    unanswered: !answered,
                })
            }
        }
    }
}

/// Streams the request body: framed as `framing` says, flushed at the end.
async fn send_body<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut body: GuardedBody,
    framing: ReqBody,
) -> Result<(), H1Error> {
    use http_body_util::BodyExt;
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // Trailers are not forwarded.
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            ReqBody::Chunked => {
                let mut line = [0u8; 18];
                let n = hex_line(&mut line, data.len());
                w.write_all(&line[..n]).await?;
                w.write_all(&data).await?;
                w.write_all(b"\r\n").await?;
            }
            ReqBody::Length(len) if sent > len => return Err(H1Error::BodyLength),
            _ => w.write_all(&data).await?,
        }
    }
    match framing {
        ReqBody::Chunked => w.write_all(b"0\r\n\r\n").await?,
        ReqBody::Length(len) if sent != len => return Err(H1Error::BodyLength),
        _ => {}
    }
    w.flush().await?;
    Ok(())
}

/// `{n:x}\r\n` into `out`; returns its length.
fn hex_line(out: &mut [u8; 18], n: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, d) in out[..digits].iter_mut().enumerate() {
        *d = HEX[(n >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

/// One request and its response head on `conn`. The head is in `conn.head` already
/// ([`encode_head`]). With a body, the response is read while the body is still being sent, so
/// an upstream that answers early (a 413, say) is heard; the connection is then not reused.
pub async fn exchange(
    conn: &mut Conn,
    method: &Method,
    body: Option<(GuardedBody, ReqBody)>,
) -> Result<Head, Failed> {
    // Let the other requests that became ready in this turn of the runtime be read and decided
    // first, so the upstream writes of one turn go out together. On loopback a send runs the
    // receiver's TCP input and wakes it if it sleeps, in the sender's own syscall; sent one at a
    // time, each found the upstream asleep again (`sock_def_readable` was 11 % of keygate's
    // samples). Deferred tasks resume once the runtime has run out of ready tasks and polled
    // the driver. Measured: +8-12 % requests/s, ~1 µs less system time per request
    // (BENCHMARKS.md, "Session of 2026-11-23 (night)").
    tokio::task::yield_now().await;
    let Conn { io, buf, head } = conn;
    let Some((body, framing)) = body else {
        if let Err(e) = io.write_all(head).await {
            return Err(Failed {
                error: e.into(),
                unanswered: true,
            });
        }
        io.flush().await?;
        return read_head(io, buf, method).await;
    };
    io.write_all(head).await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let send = send_body(&mut wr, body, framing);
    let recv = read_head(&mut rd, buf, method);
    tokio::pin!(send, recv);
    let mut sent = None;
    loop {
        tokio::select! {
            biased;
            head = &mut recv => {
                let mut head = head?;
                match sent {
                    Some(Ok(())) => {}
                    // The upstream answered before taking the whole body.
                    Some(Err(_)) | None => head.reuse = false,
                }
                return Ok(head);
            }
            r = &mut send, if sent.is_none() => match r {
                // The client's body failed: nothing more to wait for.
                Err(e @ (H1Error::Body(_) | H1Error::BodyLength)) => return Err(e.into()),
                // A write failed: an answer may still be there to read.
                r => sent = Some(r),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, method: &Method) -> Result<Option<Head>, H1Error> {
        parse_head(&mut BytesMut::from(text), method)
    }

    #[test]
    fn a_whole_body_is_taken_only_when_all_of_it_is_there() {
        let head = |text: &str| {
            let mut buf = BytesMut::from(text);
            let h = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
            (h.decoder, buf)
        };
        // Chunked: a body not all there leaves the buffer as it was.
        let (mut d, mut buf) =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
        assert_eq!(d.whole(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"3\r\nabc\r\n");
        buf.extend_from_slice(b"2;x=y\r\nde\r\n0\r\nt: 1\r\n\r\nNEXT");
        assert_eq!(d.whole(&mut buf).unwrap(), Some(Some(Bytes::from("abcde"))));
        assert!(d.is_done());
        assert_eq!(&buf[..], b"NEXT");
        // A length.
        let (mut d, mut buf) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc");
        assert_eq!(d.whole(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"abc");
        buf.extend_from_slice(b"deX");
        assert_eq!(d.whole(&mut buf).unwrap(), Some(Some(Bytes::from("abcde"))));
        assert_eq!(&buf[..], b"X");
        // None at all; and to the close, never whole.
        let (mut d, mut buf) = head("HTTP/1.1 204 No Content\r\n\r\nX");
        assert_eq!(d.whole(&mut buf).unwrap(), Some(None));
        assert_eq!(&buf[..], b"X");
        let (mut d, mut buf) = head("HTTP/1.1 200 OK\r\n\r\nall of it");
        assert_eq!(d.whole(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"all of it");
        // Broken chunked framing is an error, not a wait.
        let (mut d, mut buf) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert!(d.whole(&mut buf).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A pipe takes an answer whole only once every byte of it is in: for any chunking of
        /// any body, every proper prefix of the chunked framing is "not yet" (with the buffer
        /// untouched), and the whole of it gives the body back, leaving what follows.
        #[test]
        fn whole_waits_for_the_last_byte_of_a_chunked_body(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            cuts in proptest::collection::vec(1usize..40, 0..12),
        ) {
            let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            let head_len = wire.len();
            let mut rest = &body[..];
            for c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
                let n = (*c).min(rest.len());
                if n == 0 {
                    break;
                }
                wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            for end in head_len..wire.len() {
                let mut buf = BytesMut::from(&wire[..end]);
                let mut d = parse_head(&mut buf, &Method::GET).unwrap().unwrap().decoder;
                let before = buf.clone();
                proptest::prop_assert_eq!(d.whole(&mut buf).unwrap(), None);
                proptest::prop_assert_eq!(&buf, &before);
            }
            let mut buf = BytesMut::from(&wire[..]);
            buf.extend_from_slice(b"NEXT");
            let mut d = parse_head(&mut buf, &Method::GET).unwrap().unwrap().decoder;
            let got = d.whole(&mut buf).unwrap().unwrap();
            proptest::prop_assert_eq!(got.as_deref().unwrap_or(b""), &body[..]);
            proptest::prop_assert_eq!(&buf[..], b"NEXT");
        }
    }

    /// Decodes all of `input`, fed in pieces of `step` bytes.
    fn decode_all(d: &mut Decoder, input: &[u8], step: usize) -> Result<Vec<u8>, H1Error> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(b) = d.decode(&mut buf)? {
                assert!(!b.is_empty());
                out.extend_from_slice(&b);
            }
        }
        Ok(out)
    }

    #[test]
    fn request_heads_carry_their_framing() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("up:80"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        let none = Extra::default();
        encode_head(&mut out, &Method::GET, "/a?b", &h, &none, ReqBody::None);
        assert_eq!(
            out,
            b"GET /a?b HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        encode_head(
            &mut out,
            &Method::POST,
            "/",
            &HeaderMap::new(),
            &none,
            ReqBody::Length(12),
        );
        assert_eq!(&out[50..], b"POST / HTTP/1.1\r\ncontent-length: 12\r\n\r\n");
        encode_head(
            &mut out,
            &Method::PUT,
            "/",
            &HeaderMap::new(),
            &none,
            ReqBody::Chunked,
        );
        assert_eq!(
            &out[50 + 39..],
            b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(ReqBody::of(&Method::GET, true, Some(0)), ReqBody::None);
        assert_eq!(
            ReqBody::of(&Method::POST, true, Some(0)),
            ReqBody::Length(0)
        );
        assert_eq!(
            ReqBody::of(&Method::POST, false, Some(5)),
            ReqBody::Length(5)
        );
        assert_eq!(ReqBody::of(&Method::POST, false, None), ReqBody::Chunked);
    }

    #[test]
    fn extra_fields_follow_the_map_and_a_host_replaces_its_own() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("client.example"));
        static X_B: HeaderName = HeaderName::from_static("x-b");
        let up = HeaderValue::from_static("up:80");
        let fields = [(&X_B, HeaderValue::from_static("2"))];
        let mut out = Vec::new();
        let extra = Extra {
            host: Some(&up),
            fields: &fields,
        };
        encode_head(&mut out, &Method::GET, "/", &h, &extra, ReqBody::None);
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\nx-b: 2\r\n\r\n"
        );
        // Without a replacement the map's own Host goes out, once.
        out.clear();
        let extra = Extra {
            host: None,
            fields: &fields,
        };
        encode_head(&mut out, &Method::GET, "/", &h, &extra, ReqBody::Length(3));
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nx-a: 1\r\nhost: client.example\r\nx-b: 2\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn chunk_lines() {
        let mut out = [0u8; 18];
        for (n, want) in [
            (0, "0\r\n"),
            (1, "1\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
        ] {
            let len = hex_line(&mut out, n);
            assert_eq!(&out[..len], want.as_bytes());
        }
    }

    #[test]
    fn a_head_in_pieces_waits_then_parses_with_values_intact() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Team: alpha\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok";
        for cut in 1..text.len() - 2 {
            let mut buf = BytesMut::from(&text[..cut]);
            assert!(
                parse_head(&mut buf, &Method::GET).unwrap().is_none(),
                "{cut}"
            );
        }
        let mut buf = BytesMut::from(text);
        let h = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.headers["x-team"], "alpha");
        let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(h.reuse);
        assert_eq!(h.decoder.remaining(), Some(2));
        assert_eq!(&buf[..], b"ok", "only the head is taken");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = &Method::GET;
        let head = |t: &str, m: &Method| parse(t, m).unwrap().unwrap();
        // No body, whatever the length says.
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        );
        assert!(h.decoder.is_done() && h.reuse);
        for s in ["204 No Content", "304 Not Modified", "100 Continue"] {
            assert!(head(&format!("HTTP/1.1 {s}\r\n\r\n"), get)
                .decoder
                .is_done());
        }
        // Transfer-Encoding wins, and the Content-Length goes.
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            get,
        );
        assert!(h.headers.get("content-length").is_none());
        assert!(h.reuse && h.decoder.remaining().is_none());
        // A coding other than chunked last: read to the close.
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            get,
        );
        assert!(!h.reuse);
        // Neither: to the close, not reusable.
        assert!(!head("HTTP/1.1 200 OK\r\n\r\n", get).reuse);
        // Close, and HTTP/1.0, are not reused.
        assert!(
            !head(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                get
            )
            .reuse
        );
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", get).reuse);
        // Equal repeats are one length; differing or invalid ones are refused.
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            get,
        );
        assert_eq!(h.decoder.remaining(), Some(4));
        for bad in [
            "4\r\nContent-Length: 5",
            "+4",
            "4 4",
            "0x4",
            "",
            "99999999999999999999",
        ] {
            let t = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(parse(&t, get), Err(H1Error::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_heads_are_refused() {
        for bad in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTQ/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad, &Method::GET), Err(H1Error::Malformed(_))),
                "{bad:?}"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let t = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            parse(&t, &Method::GET),
            Err(H1Error::Malformed(_))
        ));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(
            parse(&huge, &Method::GET),
            Err(H1Error::Malformed(_))
        ));
    }

    #[test]
    fn chunked_bodies_decode_in_any_pieces() {
        let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n";
        for step in 1..=input.len() {
            let mut d = Decoder { state: State::Size };
            assert_eq!(
                decode_all(&mut d, input, step).unwrap(),
                b"hello, world",
                "{step}"
            );
            assert!(d.is_done(), "{step}");
        }
    }

    #[test]
    fn chunked_bodies_that_break_framing_are_refused() {
        for bad in [
            &b"5\r\nhelloXX"[..],
            b"zz\r\n",
            b"5\nhello\r\n",
            b"5 x\r\n",
            b"10000000000000000\r\n",
            b"-5\r\n",
        ] {
            let mut d = Decoder { state: State::Size };
            assert!(
                decode_all(&mut d, bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut d = Decoder { state: State::Size };
        let long = vec![b'1'; MAX_LINE + 1];
        assert!(decode_all(&mut d, &long, 64).is_err());
    }

    #[test]
    fn lengths_stop_at_the_end_and_leave_the_rest() {
        let mut d = Decoder {
            state: State::Length(5),
        };
        let mut buf = BytesMut::from(&b"helloEXTRA"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), "hello");
        assert!(d.is_done());
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"EXTRA");
        // Cut short: a truncation, never a shorter body.
        let mut d = Decoder {
            state: State::Length(5),
        };
        assert_eq!(decode_all(&mut d, b"hel", 1).unwrap(), b"hel");
        assert!(matches!(d.eof(), Err(H1Error::Truncated)));
        // To the close: the close is the end.
        let mut d = Decoder {
            state: State::Close,
        };
        assert_eq!(decode_all(&mut d, b"all of it", 4).unwrap(), b"all of it");
        d.eof().unwrap();
        assert!(d.is_done());
        let mut d = Decoder { state: State::Size };
        assert!(matches!(d.eof(), Err(H1Error::Truncated)));
    }
}
