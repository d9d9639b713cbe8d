//! The request body as forwarded: streamed frame by frame, never buffered whole, and cut off
//! when it grows past the size limit or stalls longer than the body timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body over the size limit")]
    TooLarge,
    #[error("request body stalled")]
    Stalled,
    #[error("request body: {0}")]
    Client(#[from] hyper::Error),
}

/// Shared with the handler so it can tell, after a failed forward, whether the body was the cause.
#[derive(Debug, Default)]
pub struct BodyFate(AtomicU8);

impl BodyFate {
    const TOO_LARGE: u8 = 1;
    const STALLED: u8 = 2;
    const MALFORMED: u8 = 3;

    pub fn too_large(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::TOO_LARGE
    }

    pub fn stalled(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::STALLED
    }

    /// The client's body broke its own framing (bad chunked encoding, cut short).
    pub fn malformed(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::MALFORMED
    }
}

pin_project! {
    /// A client's request body with a size limit and a stall timeout.
    pub struct GuardedBody {
        #[pin]
        inner: Incoming,
        remaining: u64,
        stall: Duration,
        // Boxed so the body stays `Unpin`, as hyper's client requires; made on first stall.
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
        fate: Option<Arc<BodyFate>>,
    }
}

impl GuardedBody {
    pub fn new(inner: Incoming, limit: u64, stall: Duration, fate: Option<Arc<BodyFate>>) -> Self {
        GuardedBody {
            inner,
            remaining: limit,
            stall,
            timer: None,
            armed: false,
            fate,
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > *this.remaining {
                        if let Some(f) = this.fate {
                            f.0.store(BodyFate::TOO_LARGE, Ordering::Release);
                        }
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    *this.remaining -= n;
                }
                *this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = this.fate {
                    f.0.store(BodyFate::MALFORMED, Ordering::Release);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = Instant::now() + *this.stall;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !*this.armed {
                    timer.as_mut().reset(deadline);
                    *this.armed = true;
                }
                {
                    if timer.as_mut().poll(cx).is_ready() {
                        if let Some(f) = this.fate {
                            f.0.store(BodyFate::STALLED, Ordering::Release);
                        }
                        return Poll::Ready(Some(Err(BodyError::Stalled)));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
