//! keygate's upstream HTTP/1.1 response reading (`keygate::proxy::h1`) on arbitrary bytes.
//!
//! Two modes:
//!
//! - `Raw`: any bytes, fed in arbitrary pieces, as a response to a fuzzed method. `parse_head`
//!   and the body decoder must never panic; a head with `Transfer-Encoding` carries no
//!   `Content-Length`; a `HEAD` answer, a 1xx, 204 or 304 has no body; a body with a known length
//!   yields exactly that many bytes before it is done, never more; no decoded piece is empty;
//!   and the end of input is accepted only for a body read to the close (or a finished one).
//! - `Chunked`: arbitrary chunks, chunk-encoded (with an extension on some size lines and a
//!   trailer), fed in arbitrary pieces: the decoder must give back exactly the chunks' bytes,
//!   be done, and leave what followed the body in the buffer.

#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use http::Method;
use keygate::proxy::h1::{parse_head, Decoder};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Input {
    Raw {
        head_method: bool,
        pieces: Vec<u8>,
        bytes: Vec<u8>,
    },
    Chunked {
        chunks: Vec<Vec<u8>>,
        extensions: bool,
        pieces: Vec<u8>,
        after: Vec<u8>,
    },
}

/// Splits `bytes` at the sizes `pieces` gives (1..=256 each, the rest at the end).
fn split<'a>(bytes: &'a [u8], pieces: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for &p in pieces {
        if rest.is_empty() {
            break;
        }
        let n = (usize::from(p) + 1).min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Feeds the pieces to the decoder; returns the body so far, or `None` on an error.
fn decode(d: &mut Decoder, buf: &mut BytesMut, pieces: &[&[u8]]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let start = d.remaining();
    for p in pieces {
        buf.extend_from_slice(p);
        loop {
            match d.decode(buf) {
                Ok(Some(b)) => {
                    assert!(!b.is_empty(), "an empty piece");
                    body.extend_from_slice(&b);
                    if let Some(n) = start {
                        assert!(body.len() as u64 <= n, "more than the length");
                    }
                }
                Ok(None) => break,
                Err(_) => return None,
            }
        }
    }
    Some(body)
}

fuzz_target!(|input: Input| match input {
    Input::Raw {
        head_method,
        pieces,
        bytes,
    } => {
        let method = if head_method { Method::HEAD } else { Method::GET };
        let parts = split(&bytes, &pieces);
        let mut buf = BytesMut::new();
        let mut i = 0;
        let head = loop {
            let Some(p) = parts.get(i) else { return };
            buf.extend_from_slice(p);
            i += 1;
            match parse_head(&mut buf, &method) {
                Ok(Some(h)) => break h,
                Ok(None) => continue,
                Err(_) => return,
            }
        };
        if head.headers.contains_key("transfer-encoding") {
            assert!(!head.headers.contains_key("content-length"));
        }
        let bodiless = method == Method::HEAD
            || head.status.is_informational()
            || head.status == 204
            || head.status == 304;
        let mut d = head.decoder;
        if bodiless {
            assert!(d.is_done());
        }
        let known = d.remaining();
        let Some(body) = decode(&mut d, &mut buf, &parts[i..]) else {
            return;
        };
        if let Some(n) = known {
            assert_eq!(d.is_done(), body.len() as u64 == n);
        }
        let finished = d.is_done();
        match d.eof() {
            Ok(()) => assert!(finished || known.is_none()),
            Err(_) => assert!(!finished),
        }
    }
    Input::Chunked {
        chunks,
        extensions,
        pieces,
        after,
    } => {
        let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut want = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            wire.extend_from_slice(format!("{:X}", c.len()).as_bytes());
            if extensions {
                wire.extend_from_slice(b" ;name=\"v\"");
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
            want.extend_from_slice(c);
        }
        wire.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
        wire.extend_from_slice(&after);
        let mut buf = BytesMut::from(&wire[..]);
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        let mut d = head.decoder;
        let rest = buf.split().freeze();
        let body = decode(&mut d, &mut buf, &split(&rest, &pieces)).expect("valid chunked");
        assert_eq!(body, want);
        assert!(d.is_done());
        assert_eq!(&buf[..], &after[..]);
    }
});
