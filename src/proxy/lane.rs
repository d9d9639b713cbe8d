//! The refusal lane: where a plain HTTP/1.1 connection starts, before hyper serves it.
//!
//! Answering a flood of bad keys, keygate spent more of its own time in hyper's server (parse,
//! dispatch, header maps, encode) than in the decision. The lane reads request heads itself,
//! with httparse as hyper does, puts each through [`Proxy::early`] (the framing, field-count and
//! gate checks hyper's service makes first) and writes refusals straight from their parts. The
//! checks read the head's fields where they lie ([`Fields::Raw`]): a refused request costs no
//! header map and no allocation.
//!
//! The first request it does not refuse goes to hyper, with every byte after it: the connection
//! is handed over with what was read and the check already made (a key the cache missed is
//! loaded first, as hyper's service would), so a grant takes its token once. Left to hyper
//! unchecked: anything but a bodiless HTTP/1.1 request in origin form whose `Connection` says at
//! most `keep-alive` (so bodies, upgrades, `Expect`, HTTP/1.0, `CONNECT`, HTTP/2's preface), and
//! heads that httparse cannot read or that break a limit (hyper answers those as before). A
//! client that is only ever refused stays in the lane; a well-behaved one leaves it on its first
//! request.
//!
//! The connection's watchdog ([`super::watch`]) keeps its timeouts here too: the lane reads and
//! writes through the counting IO, and a request is in flight while it is decided.

use std::cell::RefCell;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::server::Limits;
use super::watch::Activity;
use super::{ConnInfo, Early, Head, Proxy, Refusal};
use crate::clock::Stopwatch;
use crate::gate::fields::{Fields, Span};
use crate::gate::Check;

/// How a connection left the lane.
pub enum End {
    /// Closed: by the client, a read error, a drain, or a refusal that ends the connection.
    Closed,
    /// hyper serves the rest, reading `read` first. Its first request was checked and granted
    /// if `checked` is set.
    Handover { read: Bytes, checked: Option<Check> },
}

/// What the connection's task and its lane share.
#[derive(Debug, Default)]
pub struct Shared {
    /// A drain began: the lane ends at its next read.
    draining: AtomicBool,
    /// The lane waits for a new request with nothing read and nothing to write.
    idle: AtomicBool,
}

impl Shared {
    /// A drain began; true if the lane is idle, so the connection can be closed now.
    pub fn drain(&self) -> bool {
        // The lane and the task that calls this are polled by one task: never at once.
        self.draining.store(true, Ordering::Relaxed);
        self.idle.load(Ordering::Relaxed)
    }
}

/// The check the lane made of the request it handed over, for hyper's first call.
#[derive(Debug, Default)]
pub struct Handed {
    pending: AtomicBool,
    check: Mutex<Option<Check>>,
}

impl Handed {
    pub fn new(check: Option<Check>) -> Handed {
        Handed {
            pending: AtomicBool::new(check.is_some()),
            check: Mutex::new(check),
        }
    }

    /// The check, once; `None` after, or if there was none.
    pub fn take(&self) -> Option<Check> {
        // A load first: every later request of the connection pays only that.
        if !self.pending.load(Ordering::Acquire) || !self.pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.check.lock().ok()?.take()
    }
}

/// Read-buffer growth: hyper's first read buffer is this size too.
const READ_CHUNK: usize = 8 * 1024;
/// Answers are written once this much is queued, even with more pipelined heads to answer.
const WRITE_HIGH: usize = 64 * 1024;
/// Fields parsed on the stack; a larger `proxy.max_headers` parses into the heap.
const STACK_FIELDS: usize = 100;

/// Serves refusals on `io` until a request is not refused, the client goes, or a drain.
pub async fn run<I>(
    io: &mut I,
    proxy: &Proxy,
    conn: &ConnInfo,
    activity: &Activity,
    shared: &Shared,
    limits: &Limits,
) -> End
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::new();
    let mut spans = Spans::default();
    loop {
        // Every complete head already read, in order.
        while !buf.is_empty() {
            match parse(&buf, limits.max_headers, &mut spans) {
                Parsed::Partial if buf.len() <= limits.max_header_bytes => break,
                // Over the budget, unreadable, or not ours: hyper answers it.
                Parsed::Partial | Parsed::Leave => {
                    return hand_over(io, &mut out, None, buf.freeze(), None).await;
                }
                Parsed::Head(len) => {
                    let head = buf.split_to(len).freeze();
                    let Some((method, uri)) = spans.target(&head) else {
                        return hand_over(io, &mut out, Some(head), buf.freeze(), None).await;
                    };
                    let req = Head {
                        method: &method,
                        uri: &uri,
                        version: Version::HTTP_11,
                        fields: spans.fields(&head),
                    };
                    let in_flight = activity.begin(false);
                    let snap = proxy.gate.snapshot();
                    let watch = Stopwatch::start();
                    let now = proxy.gate.clock().now_at(&watch);
                    let mut early = proxy.early(&snap, &req, conn, &watch, now);
                    // A key to load is loaded here too: a client spraying new keys stays.
                    if let Early::Checked(Check::Lookup(d)) = early {
                        let check = proxy.lookup(&snap, &req, conn, now, d).await;
                        early = proxy.settle(&snap, check, &watch);
                    }
                    // Decided: a client that stops reading now is the idle timeout's.
                    drop(in_flight);
                    match early {
                        Early::Refused(r) => {
                            let body = method != Method::HEAD;
                            match super::client_request_id(&snap, req.fields) {
                                Some(id) => encode(&mut out, &r, id, body),
                                None => encode(&mut out, &r, &proxy.ids.next_hex(), body),
                            }
                            if r.fields.close() {
                                let _ = write_out(io, &mut out).await;
                                let _ = io.shutdown().await;
                                return End::Closed;
                            }
                        }
                        Early::Checked(c) => {
                            return hand_over(io, &mut out, Some(head), buf.freeze(), Some(c))
                                .await;
                        }
                    }
                    if out.len() >= WRITE_HIGH && write_out(io, &mut out).await.is_err() {
                        return End::Closed;
                    }
                }
            }
        }
        if write_out(io, &mut out).await.is_err() || shared.draining.load(Ordering::Relaxed) {
            return End::Closed;
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        shared.idle.store(buf.is_empty(), Ordering::Relaxed);
        let read = io.read_buf(&mut buf).await;
        shared.idle.store(false, Ordering::Relaxed);
        match read {
            // A client gone mid-head is gone: hyper closes too.
            Ok(0) | Err(_) => return End::Closed,
            Ok(_) => {}
        }
    }
}

/// Writes what is queued, then hands the connection over with `head` and `rest` to read.
async fn hand_over<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    head: Option<Bytes>,
    rest: Bytes,
    checked: Option<Check>,
) -> End {
    // Answers already made go first: hyper's come after them.
    if write_out(io, out).await.is_err() {
        return End::Closed;
    }
    let read = match head {
        None => rest,
        Some(h) if rest.is_empty() => h,
        // Once per connection: a request pipelined behind the one handed over.
        Some(h) => [h, rest].concat().into(),
    };
    End::Handover { read, checked }
}

async fn write_out<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = io.write_all(out).await;
    out.clear();
    r
}

/// Where a parsed head's pieces lie in the buffer.
#[derive(Debug, Default)]
struct Spans {
    method: Range<usize>,
    target: Range<usize>,
    fields: Vec<Span>,
}

enum Parsed {
    Partial,
    /// Complete, ours, this many bytes long.
    Head(usize),
    /// Not a request the lane answers: hyper's.
    Leave,
}

/// Parses one head at the start of `buf` into `spans`.
fn parse(buf: &[u8], max_fields: usize, spans: &mut Spans) -> Parsed {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_FIELDS];
    let mut heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_fields <= STACK_FIELDS {
        &mut stack[..max_fields]
    } else {
        heap = Vec::with_capacity(max_fields);
        heap.resize_with(max_fields, MaybeUninit::uninit);
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Leave,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Leave;
    };
    if !target.starts_with('/') || method == "CONNECT" {
        return Parsed::Leave;
    }
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    spans.method = at(method.as_bytes());
    spans.target = at(target.as_bytes());
    spans.fields.clear();
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        let plain = if name.eq_ignore_ascii_case(b"connection") {
            f.value.eq_ignore_ascii_case(b"keep-alive")
        } else {
            // A body, or a request that changes what the connection is.
            ![
                &b"content-length"[..],
                b"transfer-encoding",
                b"upgrade",
                b"expect",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        };
        if !plain {
            return Parsed::Leave;
        }
        spans.fields.push((at(name), at(f.value)));
    }
    Parsed::Head(len)
}

impl Spans {
    /// The request's method and target, made as hyper makes them; `None` if hyper would not
    /// take them either.
    fn target(&self, head: &Bytes) -> Option<(Method, Uri)> {
        Some((
            Method::from_bytes(&head[self.method.clone()]).ok()?,
            Uri::from_maybe_shared(head.slice(self.target.clone())).ok()?,
        ))
    }

    /// The request's fields, read where they lie: no map is made for a request refused.
    fn fields<'a>(&'a self, head: &'a [u8]) -> Fields<'a> {
        Fields::Raw {
            head,
            spans: &self.fields,
        }
    }
}

/// A refusal as HTTP/1.1 bytes, the fields in hyper's order: the map's, `content-length`,
/// `date`.
fn encode(out: &mut Vec<u8>, r: &Refusal, request_id: &[u8], body: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(r.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(r.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    r.fields.write(out, request_id);
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(r.body.len()).as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    date(out);
    out.extend_from_slice(b"\r\n\r\n");
    if body {
        out.extend_from_slice(&r.body);
    }
}

/// An IMF-fixdate is 29 bytes.
const DATE_LEN: usize = 29;

thread_local! {
    /// The `date` value of the current second, made once a second per thread (as hyper does).
    static DATE: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
}

fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let _ = write!(&mut text[..], "{}", httpdate::HttpDate::from(now));
            *at = secs;
        }
        out.extend_from_slice(&text[..]);
    });
}

/// An IO whose reads return `read` first: the bytes the lane took before handing over.
pub struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub fn new(read: Bytes, io: I) -> Self {
        Rewind { read, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            if self.read.is_empty() {
                // An emptied slice still holds the lane's whole read buffer.
                self.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;
    use http::{HeaderMap, HeaderValue};

    use crate::gate::credential::X_API_KEY;

    fn parsed(raw: &str, max_fields: usize) -> (Parsed, Spans) {
        let mut spans = Spans::default();
        (parse(raw.as_bytes(), max_fields, &mut spans), spans)
    }

    fn leaves(raw: &str) -> bool {
        matches!(parsed(raw, 100).0, Parsed::Leave)
    }

    #[test]
    fn a_bodiless_http11_request_is_the_lanes() {
        let raw = "GET /api/x?q=1 HTTP/1.1\r\nHost: kg\r\nX-Api-Key: k\r\nConnection: Keep-Alive\r\n\r\nGET /next";
        let (p, spans) = parsed(raw, 100);
        let Parsed::Head(len) = p else {
            panic!("not a head")
        };
        assert_eq!(&raw[len..], "GET /next", "the head ends at its blank line");
        let head = Bytes::copy_from_slice(&raw.as_bytes()[..len]);
        let (method, uri) = spans.target(&head).unwrap();
        assert_eq!(method, Method::GET);
        assert_eq!(uri.path(), "/api/x");
        assert_eq!(uri.query(), Some("q=1"));
        let fields = spans.fields(&head);
        assert_eq!(fields.len(), 3);
        assert_eq!(fields.get(&X_API_KEY), Some(&b"k"[..]));
        assert_eq!(fields.get(&http::header::HOST), Some(&b"kg"[..]));
    }

    /// The map hyper would make of a head's fields; `None` if it would refuse one of them.
    fn hypers_map(spans: &Spans, head: &Bytes) -> Option<HeaderMap> {
        let mut map = HeaderMap::new();
        for (name, value) in &spans.fields {
            map.append(
                HeaderName::from_bytes(&head[name.clone()]).ok()?,
                HeaderValue::from_maybe_shared(head.slice(value.clone())).ok()?,
            );
        }
        Some(map)
    }

    #[test]
    fn an_unfinished_head_waits() {
        assert!(matches!(
            parsed("GET /api/x HTTP/1.1\r\nHost: kg\r\n", 100).0,
            Parsed::Partial
        ));
        assert!(matches!(parsed("GE", 100).0, Parsed::Partial));
    }

    #[test]
    fn what_is_not_a_bodiless_http11_request_in_origin_form_is_left_to_hyper() {
        let with = |field: &str| format!("POST /api/x HTTP/1.1\r\nHost: kg\r\n{field}\r\n\r\n");
        for field in [
            "Content-Length: 0",
            "content-length: 5",
            "Transfer-Encoding: chunked",
            "Upgrade: websocket",
            "Expect: 100-continue",
            "Connection: close",
            "Connection: upgrade",
            "Connection: keep-alive, upgrade",
        ] {
            assert!(leaves(&with(field)), "{field}");
        }
        for raw in [
            "GET /api/x HTTP/1.0\r\nHost: kg\r\n\r\n",
            "CONNECT kg:443 HTTP/1.1\r\nHost: kg\r\n\r\n",
            "GET http://kg/api/x HTTP/1.1\r\nHost: kg\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: kg\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /api/x HTTP/1.1\r\nHost kg\r\n\r\n",
            "\u{1}\u{2}garbage\r\n\r\n",
        ] {
            assert!(leaves(raw), "{raw:?}");
        }
    }

    #[test]
    fn more_fields_than_the_limit_are_left_to_hyper() {
        let raw = "GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n";
        assert!(matches!(parsed(raw, 3).0, Parsed::Head(_)));
        assert!(matches!(parsed(raw, 2).0, Parsed::Leave));
        // Past the stack's slots, the heap's.
        let many: String = (0..150).map(|i| format!("f{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parsed(&raw, 200).0, Parsed::Head(_)));
        assert!(matches!(parsed(&raw, 149).0, Parsed::Leave));
    }

    #[test]
    fn a_refusal_is_written_as_hyper_writes_it() {
        use super::super::refusal::{Fields, Shape};
        let r = Refusal {
            status: http::StatusCode::UNAUTHORIZED,
            fields: Fields::new(Shape::Plain, [], false),
            body: Bytes::from_static(b"{\"e\":1}"),
        };
        let text = |body| {
            let mut out = Vec::new();
            encode(&mut out, &r, b"id1", body);
            let s = String::from_utf8(out).unwrap();
            let (before, after) = s.split_once("date: ").unwrap();
            let (date, rest) = after.split_once("\r\n").unwrap();
            assert_eq!(date.len(), DATE_LEN);
            assert!(date.ends_with(" GMT") && httpdate::parse_http_date(date).is_ok());
            format!("{before}{rest}")
        };
        let head = "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                    cache-control: no-store\r\nx-request-id: id1\r\ncontent-length: 7\r\n\r\n";
        assert_eq!(text(true), format!("{head}{{\"e\":1}}"));
        assert_eq!(text(false), head, "HEAD: the length, no body");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes: no panic, and every field of a head the lane keeps is one hyper's map
        /// would hold, read alike (the lane reads fields where they lie and makes no map).
        #[test]
        fn any_bytes_parse_without_panic(
            line in "(GET|HEAD|POST|CONNECT|PRI|G\\x00T) (/[a-z?=&%]{0,12}|\\*|http://k/) HTTP/1\\.[01]\r\n",
            fields in proptest::collection::vec(
                (proptest::sample::select(vec!["host", "X-Api-Key", "x-api-key", "Connection",
                    "x-forwarded-for", "x-request-id", "a(b", "x y", "\u{e9}"]),
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12)),
                0..6),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
            cut in 0usize..200,
        ) {
            let mut raw = line.into_bytes();
            for (name, value) in &fields {
                raw.extend_from_slice(name.as_bytes());
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(value);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&tail);
            raw.truncate(cut.max(1));
            let mut spans = Spans::default();
            if let Parsed::Head(len) = parse(&raw, 100, &mut spans) {
                let head = Bytes::copy_from_slice(&raw[..len]);
                let map = hypers_map(&spans, &head);
                proptest::prop_assert!(map.is_some(), "a field hyper would refuse");
                let map = map.unwrap();
                let raw_fields = spans.fields(&head);
                proptest::prop_assert_eq!(raw_fields.len(), map.len());
                for (name, _) in &map {
                    let ours: Vec<&[u8]> = raw_fields.get_all(name).collect();
                    let hypers: Vec<&[u8]> =
                        map.get_all(name).iter().map(HeaderValue::as_bytes).collect();
                    proptest::prop_assert_eq!(ours, hypers);
                }
                if let Some((_, uri)) = spans.target(&head) {
                    proptest::prop_assert!(uri.path().starts_with('/'));
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Raw bytes, any: no panic, whatever the lane makes of them.
        #[test]
        fn any_raw_bytes_parse_without_panic(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            max_fields in 1usize..4,
        ) {
            let mut spans = Spans::default();
            if let Parsed::Head(len) = parse(&raw, max_fields, &mut spans) {
                proptest::prop_assert!(len <= raw.len());
                let head = Bytes::copy_from_slice(&raw[..len]);
                let _ = spans.target(&head);
                proptest::prop_assert!(hypers_map(&spans, &head).is_some());
            }
        }
    }

    #[tokio::test]
    async fn rewind_reads_what_was_taken_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }
}
