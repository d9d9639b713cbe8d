//! HTTP/1.1 pipelining to the upstream (`upstream.pipeline`), for bodiless `GET`s and `HEAD`s.
//!
//! Every forwarded request costs the upstream socket a send and a receive. On loopback the send
//! runs the upstream's TCP input and wakes it, inside keygate's own syscall: in issue 5's
//! profile, sends were 44 % of keygate's samples. A pipe lets the requests decided in one turn
//! of the runtime share a connection: their heads go out in one write and their answers come
//! back in order in as few reads, parsed by whichever waiting request is polled and handed to
//! their owners.
//!
//! Only safe methods without a body are pipelined (RFC 9112 §9.3.2), so the requests left
//! unanswered when a pipe breaks (the upstream closed it, answered `Connection: close`, sent
//! something malformed, or a request behind which answers were queued was abandoned mid-answer)
//! are retried once on a connection of their own ([`Answer::Unanswered`]).
//!
//! An answer whose length is known and at most [`WHOLE_MAX`] is read whole before it is
//! handed over. Any other (longer, chunked and not all there, or running to the close) takes
//! the connection with it to stream from, and the requests behind it are retried elsewhere: a
//! large answer never holds the others up.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::time::Instant;

use super::h1::{self, Conn, H1Error, Head};

/// The longest answer read whole on a pipe; a longer one detaches the connection.
pub const WHOLE_MAX: u64 = 256 * 1024;

/// What a pipelined request gets.
pub enum Answer {
    /// The head and all of the body (`None`: empty).
    Whole(Head, Option<Bytes>),
    /// The head, and the connection to stream the body from; it is not reused.
    Stream(Head, Conn),
    /// The upstream failed while answering this request.
    Failed(H1Error),
    /// The pipe broke before this request's answer began: safe to send again.
    Unanswered,
}

enum Slot {
    /// Its owner waits; the waker is the last one it was polled with.
    Waiting(Option<Waker>),
    Ready(Answer),
    /// Its owner went away before its answer was read: the answer is read and dropped.
    Abandoned,
    /// Taken, or abandoned and read.
    Gone,
}

struct Ticket {
    head: bool,
    slot: Slot,
}

impl Ticket {
    /// Hands `answer` to its owner, waking it; dropped (with any detached connection) if the
    /// owner went away.
    fn deliver(&mut self, answer: Answer) {
        if let Slot::Waiting(w) = std::mem::replace(&mut self.slot, Slot::Gone) {
            self.slot = Slot::Ready(answer);
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

struct State {
    /// `None` once broken or detached: nothing more is sent on it.
    conn: Option<Conn>,
    /// Request heads not yet written.
    out: Vec<u8>,
    /// The ticket of `tickets[0]`.
    first: u64,
    tickets: VecDeque<Ticket>,
    /// The ticket whose answer is next on the wire.
    read: u64,
    /// The head of the answer being read, while the rest of its body arrives.
    pending: Option<Head>,
    /// The ticket whose task the socket would wake (the last to see it not ready).
    polled_by: Option<u64>,
    /// The ticket that writes the heads queued in this turn of the runtime: the first queued
    /// on an empty pipe, which lets the turn's other requests be decided first. Until it is
    /// polled, the others leave the heads queued, so they go out in one write, and only the
    /// writer pays a yield to the runtime.
    writer: Option<u64>,
    /// When the pipe last had nothing outstanding (made, or its last answer read), for the
    /// idle timeout.
    idle_since: Instant,
}

/// One upstream connection shared by pipelined requests.
pub struct Pipe {
    state: Mutex<State>,
}

impl Pipe {
    pub fn new(conn: Conn) -> Pipe {
        Pipe {
            state: Mutex::new(State {
                conn: Some(conn),
                out: Vec::new(),
                first: 0,
                tickets: VecDeque::new(),
                read: 0,
                pending: None,
                polled_by: None,
                writer: None,
                idle_since: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request whose head `encode` appends, if the pipe is open, has fewer than
    /// `depth` answers outstanding, and (when it has none) has not been idle past `idle` nor
    /// been closed by the upstream. The heads queued in one turn of the runtime go out together,
    /// written by the first of them ([`Wait::writes`]).
    pub fn attach(
        self: &Arc<Self>,
        depth: usize,
        idle: std::time::Duration,
        head: bool,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Option<Wait> {
        let mut st = self.lock();
        let next = st.next();
        let outstanding = next - st.read;
        if outstanding as usize >= depth {
            return None;
        }
        if outstanding == 0 && st.close_if_stale(idle) {
            return None;
        }
        st.conn.as_ref()?;
        let writes = st.out.is_empty() && st.writer.is_none();
        if writes {
            st.writer = Some(next);
        }
        encode(&mut st.out);
        st.tickets.push_back(Ticket {
            head,
            slot: Slot::Waiting(None),
        });
        Some(Wait {
            pipe: self.clone(),
            ticket: next,
            done: false,
            writes,
        })
    }

    /// Whether the pipe can take no more requests, ever.
    pub fn is_closed(&self) -> bool {
        self.lock().conn.is_none()
    }

    /// With nothing outstanding, closes the pipe if it has been idle past `idle` or the
    /// upstream closed it; whether it is closed.
    pub fn close_if_stale(&self, idle: std::time::Duration) -> bool {
        let mut st = self.lock();
        if st.next() == st.read {
            st.close_if_stale(idle)
        } else {
            st.conn.is_none()
        }
    }
}

impl State {
    fn next(&self) -> u64 {
        self.first + self.tickets.len() as u64
    }

    /// For a pipe with nothing outstanding: closes it if idle past `idle` or closed by the
    /// upstream; whether it is closed.
    fn close_if_stale(&mut self, idle: std::time::Duration) -> bool {
        let fresh = self.idle_since.elapsed() <= idle;
        if !(fresh && self.conn.as_mut().is_some_and(Conn::idle_ok)) {
            self.conn = None;
        }
        self.conn.is_none()
    }

    fn ticket(&mut self, t: u64) -> &mut Ticket {
        &mut self.tickets[(t - self.first) as usize]
    }

    /// Writes what is queued and reads answers while any is awaited, until the socket is not
    /// ready or nothing is awaited.
    fn drive(&mut self, cx: &mut Context<'_>, me: u64) {
        // Until the writer has been polled the heads stay queued for it; then whoever drives
        // writes what is queued.
        let writes = self.writer.is_none_or(|w| w == me);
        if writes {
            self.writer = None;
        }
        let wrote = writes && !self.out.is_empty();
        while writes && !self.out.is_empty() {
            let Some(conn) = self.conn.as_mut() else {
                self.out.clear();
                break;
            };
            match Pin::new(&mut conn.io).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => self.fail(None),
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Pending => {
                    self.polled_by = Some(me);
                    break;
                }
            }
        }
        // A TLS session may hold written records until flushed (plain TCP holds nothing).
        if wrote && self.out.is_empty() {
            if let Some(conn) = self.conn.as_mut() {
                match Pin::new(&mut conn.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => self.fail(None),
                    Poll::Pending => self.polled_by = Some(me),
                }
            }
        }
        while self.read < self.next() {
            match self.answer() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.fail(Some(e));
                    return;
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            h1::make_room(&mut conn.buf);
            let polled = tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf);
            // Whether the answer being read had begun: then it failed, rather than went unanswered.
            let begun = !conn.buf.is_empty() || self.pending.is_some();
            match polled {
                Poll::Ready(Ok(0)) => self.fail(begun.then_some(H1Error::Truncated)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => self.fail(begun.then_some(H1Error::Io(e))),
                Poll::Pending => {
                    self.polled_by = Some(me);
                    return;
                }
            }
        }
    }

    /// Takes the next answer off the buffer if it is all there (or must be streamed), and
    /// hands it over. `Ok(false)`: more input is needed.
    fn answer(&mut self) -> Result<bool, H1Error> {
        let read = self.read;
        let head_only = self.ticket(read).head;
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let mut head = match self.pending.take() {
            Some(h) => h,
            None => loop {
                if conn.buf.is_empty() {
                    return Ok(false);
                }
                let method = if head_only {
                    &http::Method::HEAD
                } else {
                    &http::Method::GET
                };
                let Some(h) = h1::parse_head(&mut conn.buf, method)? else {
                    return Ok(false);
                };
                if h.status == http::StatusCode::SWITCHING_PROTOCOLS {
                    return Err(H1Error::Malformed("unrequested 101"));
                }
                if !h.status.is_informational() {
                    break h;
                }
            },
        };
        let answer = match head.decoder.whole(&mut conn.buf)? {
            Some(body) => Answer::Whole(head, body),
            None if head.decoder.remaining().is_some_and(|n| n <= WHOLE_MAX) => {
                self.pending = Some(head);
                return Ok(false);
            }
            None => {
                let Some(conn) = self.conn.take() else {
                    return Ok(false);
                };
                Answer::Stream(head, conn)
            }
        };
        let reuse = matches!(&answer, Answer::Whole(h, _) if h.reuse);
        self.read += 1;
        // Read only when the pipe goes idle, not per answer.
        if self.read == self.next() {
            self.idle_since = Instant::now();
        }
        self.ticket(read).deliver(answer);
        if !reuse {
            self.fail(None);
        }
        Ok(true)
    }

    /// The pipe is broken: the answer being read fails with `e` (if one had begun), every
    /// other awaited one is unanswered, and the connection is closed.
    fn fail(&mut self, mut e: Option<H1Error>) {
        self.conn = None;
        self.out.clear();
        self.writer = None;
        self.pending = None;
        while self.read < self.next() {
            let read = self.read;
            self.read += 1;
            let answer = match e.take() {
                Some(e) => Answer::Failed(e),
                None => Answer::Unanswered,
            };
            self.ticket(read).deliver(answer);
        }
    }

    /// Drops settled tickets off the front.
    fn trim(&mut self) {
        while self.first < self.read
            && matches!(
                self.tickets.front(),
                Some(Ticket {
                    slot: Slot::Gone,
                    ..
                })
            )
        {
            self.tickets.pop_front();
            self.first += 1;
        }
    }

    /// `me` is leaving: if the socket would have woken it, or it was to write the queued heads,
    /// another waiter takes over.
    fn hand_over(&mut self, me: u64) {
        let writer = self.writer.take_if(|w| *w == me).is_some();
        let polled = self.polled_by.take_if(|p| *p == me).is_some();
        if !(writer || polled) {
            return;
        }
        let (from, to) = ((self.read - self.first) as usize, self.tickets.len());
        for t in self.tickets.range_mut(from..to) {
            if let Slot::Waiting(Some(w)) = &t.slot {
                w.wake_by_ref();
                return;
            }
        }
    }
}

/// A pipelined request waiting for its answer. Dropped before it, the request is abandoned:
/// its answer is read and dropped when it comes.
pub struct Wait {
    pipe: Arc<Pipe>,
    ticket: u64,
    done: bool,
    writes: bool,
}

impl Wait {
    /// Whether this request writes the heads queued in its turn: its owner should yield to
    /// the runtime before polling it, so that the turn's other requests are queued first.
    pub fn writes(&self) -> bool {
        self.writes
    }
}

impl std::future::Future for Wait {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let this = self.get_mut();
        let mut st = this.pipe.lock();
        st.drive(cx, this.ticket);
        let t = st.ticket(this.ticket);
        match std::mem::replace(&mut t.slot, Slot::Gone) {
            Slot::Ready(answer) => {
                this.done = true;
                st.hand_over(this.ticket);
                st.trim();
                Poll::Ready(answer)
            }
            Slot::Waiting(w) => {
                let w = match w {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                t.slot = Slot::Waiting(Some(w));
                Poll::Pending
            }
            other => {
                t.slot = other;
                this.done = true;
                Poll::Ready(Answer::Unanswered)
            }
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.pipe.lock();
        let me = self.ticket;
        let answered = me < st.read;
        let t = st.ticket(me);
        t.slot = if answered {
            Slot::Gone
        } else {
            Slot::Abandoned
        };
        st.hand_over(me);
        st.trim();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures_util::task::{waker, ArcWake};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    /// A pipe over a real loopback connection, and the upstream's end of it.
    async fn pipe() -> (Arc<Pipe>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (up, _) = l.accept().await.unwrap();
        (Arc::new(Pipe::new(Conn::new(h1::Io::Plain(c)))), up)
    }

    fn head(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nhost: up\r\n\r\n")
    }

    fn get(pipe: &Arc<Pipe>, path: &str) -> Wait {
        let h = head(path);
        pipe.attach(8, IDLE, false, |out| out.extend_from_slice(h.as_bytes()))
            .unwrap()
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl ArcWake for Count {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls `w` once with a waker that counts.
    fn poll_once(w: &mut Wait, count: &Arc<Count>) -> Poll<Answer> {
        let wk = waker(count.clone());
        Pin::new(w).poll(&mut Context::from_waker(&wk))
    }

    /// Reads from the upstream's end until `want` bytes have come.
    async fn read(up: &mut TcpStream, want: usize) -> String {
        let mut got = vec![0; want];
        up.read_exact(&mut got).await.unwrap();
        String::from_utf8(got).unwrap()
    }

    async fn answer(up: &mut TcpStream, bodies: &[&str]) {
        for b in bodies {
            let a = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len());
            up.write_all(a.as_bytes()).await.unwrap();
        }
    }

    fn body(a: Answer) -> Bytes {
        match a {
            Answer::Whole(h, b) if h.status == 200 => b.unwrap_or_default(),
            _ => panic!("not a whole 200"),
        }
    }

    #[tokio::test]
    async fn the_first_request_of_a_turn_writes_every_head_queued_in_it() {
        let (pipe, mut up) = pipe().await;
        let mut a = get(&pipe, "/a");
        let mut b = get(&pipe, "/b");
        assert!(
            a.writes() && !b.writes(),
            "the first queued on an empty pipe writes"
        );
        let count = Arc::new(Count::default());
        // Polled before the writer, `b` leaves both heads queued.
        assert!(poll_once(&mut b, &count).is_pending());
        let both = format!("{}{}", head("/a"), head("/b"));
        assert_eq!(pipe.lock().out, both.as_bytes());
        // The writer sends both in one write.
        assert!(poll_once(&mut a, &count).is_pending());
        assert!(pipe.lock().out.is_empty());
        assert_eq!(read(&mut up, both.len()).await, both);
        answer(&mut up, &["a", "b"]).await;
        assert_eq!(body(a.await), "a");
        assert_eq!(body(b.await), "b");
        // The next turn's first request writes again.
        let mut c = get(&pipe, "/c");
        assert!(c.writes());
        assert!(poll_once(&mut c, &count).is_pending());
        assert!(pipe.lock().out.is_empty());
        assert_eq!(read(&mut up, head("/c").len()).await, head("/c"));
        answer(&mut up, &["c"]).await;
        assert_eq!(body(c.await), "c");
    }

    #[tokio::test]
    async fn a_writer_that_goes_away_before_writing_hands_the_heads_to_another() {
        let (pipe, mut up) = pipe().await;
        let a = get(&pipe, "/a");
        let mut b = get(&pipe, "/b");
        let count = Arc::new(Count::default());
        assert!(poll_once(&mut b, &count).is_pending());
        assert!(
            !pipe.lock().out.is_empty(),
            "b left the heads to the writer"
        );
        drop(a);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "b is woken to write");
        assert!(poll_once(&mut b, &count).is_pending());
        assert!(pipe.lock().out.is_empty());
        let both = format!("{}{}", head("/a"), head("/b"));
        assert_eq!(read(&mut up, both.len()).await, both);
        // The abandoned request's answer is read and dropped; b gets its own.
        answer(&mut up, &["a", "b"]).await;
        assert_eq!(body(b.await), "b");
    }
}
