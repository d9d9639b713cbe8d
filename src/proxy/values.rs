//! Header values made per request, without an allocation each.
//!
//! `HeaderValue::from_str` and `HeaderValue::from(u64)` allocate one buffer per value, and the
//! first clone of such a value allocates again (to share it). A forwarded request used to make
//! six of them (the request id, sent both ways, and the rate-limit fields). Here values are
//! written into a per-thread arena and split off as shared slices of it: making one costs a
//! copy and a reference count, and an arena chunk is allocated once per few hundred values.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// Bytes per arena chunk: enough for a few hundred values.
const CHUNK: usize = 8 * 1024;

thread_local! {
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value from what `write` puts into the buffer, or `None` if that is not a valid
/// header value. `write` must write at most `max` bytes.
pub fn render(max: usize, write: impl FnOnce(&mut BytesMut)) -> Option<HeaderValue> {
    let bytes = ARENA.with(|arena| {
        let mut arena = arena.borrow_mut();
        if arena.capacity() < max {
            *arena = BytesMut::with_capacity(CHUNK.max(max));
        }
        write(&mut arena);
        arena.split().freeze()
    });
    HeaderValue::from_maybe_shared(bytes).ok()
}

/// A decimal integer as a header value.
pub fn int(n: u64) -> HeaderValue {
    render(20, |b| {
        b.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    })
    .unwrap_or_else(|| HeaderValue::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_what_was_written_and_independent() {
        let a = int(0);
        let b = int(u64::MAX);
        let c = render(16, |w| w.extend_from_slice(b"\"free\";r=9;t=3")).unwrap();
        assert_eq!(a, "0");
        assert_eq!(b, "18446744073709551615");
        assert_eq!(c, "\"free\";r=9;t=3");
        // A clone shares the bytes; later values do not disturb earlier ones.
        let c2 = c.clone();
        for i in 0..10_000u64 {
            assert_eq!(int(i), i.to_string().as_str());
        }
        assert_eq!(c2, "\"free\";r=9;t=3");
        assert_eq!(c, c2);
        assert_eq!(a, "0");
    }

    #[test]
    fn invalid_bytes_make_no_value() {
        assert!(render(4, |w| w.extend_from_slice(b"a\nb")).is_none());
        // The arena is still usable afterwards.
        assert_eq!(int(42), "42");
    }

    #[test]
    fn values_larger_than_a_chunk_are_fine() {
        let long = vec![b'x'; CHUNK * 2];
        let v = render(long.len(), |w| w.extend_from_slice(&long)).unwrap();
        assert_eq!(v.len(), CHUNK * 2);
    }
}
