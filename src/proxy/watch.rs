//! A client connection's two timeouts, kept by counting rather than by a timer per request.
//!
//! - **Header read:** a request head, once begun, must be complete within
//!   `proxy.header_read_timeout` (slowloris); so must the first one on a new connection.
//! - **Idle:** a keep-alive connection with nothing in flight, no request ended and no head
//!   begun for `proxy.idle_timeout` is closed gracefully (a long answer still streaming is
//!   finished first).
//!
//! hyper's own header timer is armed at the start of every head read, which includes the idle
//! wait between keep-alive requests: it closed idle connections after the header timeout, not
//! the idle one, and cost a clock read, a boxed sleep and a timer-wheel insert and removal per
//! request. Here the connection's reads and writes and the service's requests bump plain
//! counters, and one interval per connection ([`Watchdog::period`]) compares them with what it
//! saw at its last tick. [`Watchdog::tick`] is the pure decision; [`Counted`] the counting IO.
//!
//! The IO cannot tell a body's bytes from a pipelined head's, so a request's end marks all read
//! so far as used: a partial head pipelined behind a request, then stalled, is left to the idle
//! timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The counters of one connection. Reads and writes are counted by [`Counted`] on the
/// connection's task; requests by the service, which for HTTP/2 runs on tasks of its own.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Requests whose handler has returned.
    ended: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    /// `read` when the last request began or ended: bytes past it belong to a new head.
    read_at_mark: AtomicU64,
    /// HTTP/2: its frames between requests are not a request head.
    h2: AtomicBool,
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl Activity {
    /// A request's handler begins; the returned guard ends it.
    pub fn begin(&self, http2: bool) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if http2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.mark();
        InFlight(self)
    }

    fn mark(&self) {
        self.read_at_mark
            .store(self.read.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn seen(&self) -> Seen {
        let read = self.read.load(Ordering::Relaxed);
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let ended = self.ended.load(Ordering::Acquire);
        Seen {
            in_flight,
            ended,
            written: self.written.load(Ordering::Relaxed),
            // A new connection owes its first head from the start.
            head_open: in_flight == 0
                && !self.h2.load(Ordering::Relaxed)
                && (ended == 0 || read > self.read_at_mark.load(Ordering::Relaxed)),
        }
    }
}

/// Ends a request when dropped.
pub struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.mark();
        self.0.ended.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One tick's view of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    pub in_flight: usize,
    pub ended: u64,
    pub written: u64,
    /// HTTP/1 with nothing in flight, and bytes arrived since the last request began or ended,
    /// or no request yet.
    pub head_open: bool,
}

/// What the connection should do after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Idle for the idle timeout: close gracefully.
    Idle,
    /// A request head open for the header timeout: cut the connection.
    SlowHead,
}

/// The decision, from counters sampled every [`Watchdog::period`].
#[derive(Debug)]
pub struct Watchdog {
    last: Seen,
    idle_ticks: u32,
    head_ticks: u32,
    idle_limit: u32,
    head_limit: u32,
}

impl Watchdog {
    /// The tick interval: a quarter of the shorter timeout, at least a millisecond. The shorter
    /// timeout then fires at most a quarter of itself late, the longer at most half the
    /// shorter one late (it need not be a whole number of periods), and neither early.
    pub fn period(idle: Duration, header: Duration) -> Duration {
        (idle.min(header) / 4).max(Duration::from_millis(1))
    }

    pub fn new(idle: Duration, header: Duration) -> Watchdog {
        let p = Self::period(idle, header).as_nanos();
        let ticks = |d: Duration| (d.as_nanos().div_ceil(p)).min(u32::MAX as u128) as u32;
        Watchdog {
            // A new connection owes its first head from the start.
            last: Seen {
                head_open: true,
                ..Seen::default()
            },
            idle_ticks: 0,
            // Quiet since the tick that saw the last change: at least (n - 1) periods.
            idle_limit: ticks(idle).saturating_add(1),
            // The first tick of a connection comes one period after it opened.
            head_ticks: 0,
            head_limit: ticks(header).saturating_add(1),
        }
    }

    /// The verdict on the counters now, given those at the previous tick.
    pub fn tick(&mut self, now: Seen) -> Verdict {
        let before = std::mem::replace(&mut self.last, now);
        if now.in_flight > 0 {
            self.idle_ticks = 0;
            self.head_ticks = 0;
            return Verdict::Fine;
        }
        let ended = now.ended != before.ended;
        // Still writing an answer whose handler has returned (a long body) holds a pipelined
        // head's clock, but not the idle one: HTTP/2's keep-alive pings write too, and must not
        // keep an idle connection open for ever.
        let answered = ended || now.written != before.written;
        // A head that was already open at the last tick, with no answer since, has aged a
        // whole period; one that opened since, less than one.
        self.head_ticks = match (now.head_open, before.head_open && !answered) {
            (false, _) => 0,
            (true, true) => self.head_ticks.saturating_add(1),
            (true, false) => 1,
        };
        // An open head is the header timeout's to judge, however long the idle one is.
        self.idle_ticks = if now.head_open {
            0
        } else if ended {
            1
        } else {
            self.idle_ticks.saturating_add(1)
        };
        if self.head_ticks >= self.head_limit {
            Verdict::SlowHead
        } else if self.idle_ticks >= self.idle_limit {
            Verdict::Idle
        } else {
            Verdict::Fine
        }
    }

    /// [`Watchdog::tick`] on a connection's counters.
    pub fn check(&mut self, activity: &Activity) -> Verdict {
        self.tick(activity.seen())
    }
}

/// An IO that counts the bytes it reads and writes into an [`Activity`].
#[derive(Debug)]
pub struct Counted<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Counted<I> {
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        Counted { io, activity }
    }
}

/// Only the connection's task writes these two counters, so a load and a store will do.
fn bump(counter: &AtomicU64, n: usize) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n as u64),
        Ordering::Relaxed,
    );
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let a = &self.activity;
            if a.read.load(Ordering::Relaxed) == 0 && buf.filled()[before..].starts_with(H2_PREFACE)
            {
                a.h2.store(true, Ordering::Relaxed);
            }
            bump(&a.read, n);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            bump(&self.activity.written, n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            bump(&self.activity.written, n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A watchdog with period 100 ms: idle 400 ms (limit 5), header 800 ms (limit 9).
    fn dog() -> Watchdog {
        let w = Watchdog::new(400 * MS, 800 * MS);
        assert_eq!(Watchdog::period(400 * MS, 800 * MS), 100 * MS);
        w
    }

    fn idle(ended: u64, written: u64) -> Seen {
        Seen {
            in_flight: 0,
            ended,
            written,
            head_open: false,
        }
    }

    fn head(ended: u64, written: u64) -> Seen {
        Seen {
            head_open: true,
            ..idle(ended, written)
        }
    }

    /// Ticks until a verdict other than `Fine`, at most `max`; the tick count.
    fn ticks_until(w: &mut Watchdog, seen: Seen, max: u32) -> Option<(u32, Verdict)> {
        (1..=max).find_map(|i| match w.tick(seen) {
            Verdict::Fine => None,
            v => Some((i, v)),
        })
    }

    #[test]
    fn a_new_connection_that_sends_nothing_is_cut_after_the_header_timeout() {
        // Opened at 0; tick i is at i × 100 ms. The head is owed from the start.
        let mut w = Watchdog::new(10_000 * MS, 800 * MS);
        assert_eq!(Watchdog::period(10_000 * MS, 800 * MS), 200 * MS);
        // Limit 5 ticks of 200 ms: cut at 1,000 ms, not before 800.
        assert_eq!(
            ticks_until(&mut w, head(0, 0), 100),
            Some((5, Verdict::SlowHead))
        );
    }

    #[test]
    fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_one() {
        // Header 100 ms, idle 1 s: an answered connection sits idle far past the header timeout.
        let mut w = Watchdog::new(1000 * MS, 100 * MS);
        let p = Watchdog::period(1000 * MS, 100 * MS);
        assert_eq!(p, 25 * MS);
        assert_eq!(w.tick(idle(1, 200)), Verdict::Fine);
        let (n, v) = ticks_until(&mut w, idle(1, 200), 1000).unwrap();
        assert_eq!(v, Verdict::Idle);
        // The answer came within the first tick's period, so the quiet time at the verdict
        // is at least n periods: never before the timeout, at most one period after.
        assert!(p * n >= 1000 * MS && p * n <= 1025 * MS, "after {n} ticks");
    }

    #[test]
    fn a_head_that_began_is_cut_after_the_header_timeout_however_it_trickles() {
        let mut w = dog();
        // An answer, then a head begins within the next period and never completes. Its bytes
        // keep arriving but neither `ended` nor `written` moves.
        assert_eq!(w.tick(idle(1, 200)), Verdict::Fine);
        let (n, v) = ticks_until(&mut w, head(1, 200), 100).unwrap();
        assert_eq!(v, Verdict::SlowHead);
        // Open for less than one period at its first tick: n - 1 whole periods ≥ 800 ms.
        assert_eq!(n, 9);
    }

    #[test]
    fn requests_in_flight_or_answers_being_written_hold_both_timeouts_off() {
        let mut w = dog();
        let busy = Seen {
            in_flight: 1,
            ..head(0, 0)
        };
        for _ in 0..100 {
            assert_eq!(w.tick(busy), Verdict::Fine);
        }
        // A long answer streaming after its handler returned, with the next head already
        // begun (pipelined): each tick sees more written.
        for i in 1..100 {
            assert_eq!(w.tick(head(1, i * 1000)), Verdict::Fine);
        }
        // The answer's last write was seen at the loop's last tick: from there the open head
        // ages, and is cut once it is sure to have been open 800 ms.
        assert_eq!(
            ticks_until(&mut w, head(1, 99_000), 100),
            Some((8, Verdict::SlowHead))
        );
    }

    #[test]
    fn bytes_written_alone_do_not_keep_a_connection_from_idling() {
        // HTTP/2 pings (or the tail of a long answer): `written` moves, no request ends.
        let mut w = dog();
        assert_eq!(w.tick(idle(1, 100)), Verdict::Fine);
        let mut verdict = None;
        for i in 1..=10 {
            match w.tick(idle(1, 100 + i * 17)) {
                Verdict::Fine => {}
                v => {
                    verdict = Some((i, v));
                    break;
                }
            }
        }
        assert_eq!(verdict, Some((4, Verdict::Idle)));
    }

    #[test]
    fn each_answered_request_restarts_both_clocks() {
        let mut w = dog();
        // A request answered every three ticks keeps the connection alive indefinitely,
        // whether a head is open at the tick or not.
        for i in 0..300u64 {
            let seen = if i % 2 == 0 {
                head(i / 3, i / 3 * 100)
            } else {
                idle(i / 3, i / 3 * 100)
            };
            assert_eq!(w.tick(seen), Verdict::Fine, "tick {i}");
        }
    }

    #[test]
    fn an_http1_head_is_open_from_the_start_or_from_new_bytes_an_http2_one_never() {
        let a = Activity::default();
        a.h2.store(true, Ordering::Relaxed);
        assert!(!a.seen().head_open);
        bump(&a.read, 9);
        assert!(!a.seen().head_open);
        let b = Activity::default();
        // HTTP/1: owed from the start, bytes or not.
        assert!(b.seen().head_open);
        bump(&b.read, 9);
        assert!(b.seen().head_open);
        // A request's start and end mark what has been read: nothing after is open.
        drop(b.begin(false));
        assert!(!b.seen().head_open);
        assert_eq!(b.seen().ended, 1);
        bump(&b.read, 1);
        assert!(b.seen().head_open);
    }

    #[tokio::test]
    async fn counted_io_counts_and_recognises_the_http2_preface() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1024);
        let a = Arc::new(Activity::default());
        let mut io = Counted::new(server, a.clone());
        let mut client = client;
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(a.read.load(Ordering::Relaxed), n as u64);
        assert!(a.h2.load(Ordering::Relaxed));
        io.write_all(b"hello").await.unwrap();
        assert_eq!(a.written.load(Ordering::Relaxed), 5);

        let (mut client, server) = tokio::io::duplex(1024);
        let b = Arc::new(Activity::default());
        let mut io = Counted::new(server, b.clone());
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        assert!(!b.h2.load(Ordering::Relaxed));
        assert_eq!(b.read.load(Ordering::Relaxed), 16);
    }
}
