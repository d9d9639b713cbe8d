//! TLS termination on the proxy listener: HTTP/1.1 and HTTP/2 by ALPN, the same gate behind
//! both, `X-Forwarded-Proto: https` upstream, a renewed certificate picked up by a reload, and
//! a config whose TLS files are unusable refused with the field named.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;

struct Certs {
    dir: tempfile::TempDir,
    der: CertificateDer<'static>,
}

/// A self-signed certificate for `localhost`, written as PEM files in a temporary directory.
fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    Certs {
        der: ck.cert.der().clone(),
        dir,
    }
}

fn tls_toml(up: &Upstream, c: &Certs) -> String {
    let mut cfg = Cfg::new(up.addr);
    cfg.extra = format!(
        "[proxy.tls]\ncert = {}\nkey = {}\n",
        toml_str(c.dir.path().join("cert.pem").to_str().unwrap()),
        toml_str(c.dir.path().join("key.pem").to_str().unwrap())
    );
    cfg.render()
}

/// Connects with TLS trusting only `root`, offering `alpn`; returns the stream and what was
/// negotiated.
async fn connect(
    kg: &Keygate,
    root: &CertificateDer<'static>,
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (tls, alpn)
}

fn request(key: Option<&str>) -> http::Request<Empty<Bytes>> {
    let mut b = http::Request::get("https://localhost/api/x").header("host", "localhost");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(Empty::new()).unwrap()
}

async fn body(resp: http::Response<hyper::body::Incoming>) -> (u16, String) {
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn http1_over_tls_reaches_the_same_gate() {
    let up = Upstream::start().await;
    let c = certs();
    let kg = Keygate::start(&tls_toml(&up, &c)).await;
    let (tls, alpn) = connect(&kg, &c.der, b"http/1.1").await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (status, text) = body(send.send_request(request(None)).await.unwrap()).await;
    assert_eq!(
        (status, text.as_str()),
        (401, r#"{"error":"Missing API Key"}"#)
    );
    send.ready().await.unwrap();
    let (status, _) = body(send.send_request(request(Some(ALPHA_KEY))).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(
        up.hits(),
        1,
        "only the authenticated request reached the upstream"
    );
}

#[tokio::test]
async fn http2_by_alpn_and_forwarded_proto_is_https() {
    let up = Upstream::start().await;
    let c = certs();
    let kg = Keygate::start(&tls_toml(&up, &c)).await;
    let (tls, alpn) = connect(&kg, &c.der, b"h2").await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A heartbeat first (over the same HTTP/2 connection), then a forwarded call.
    let beat = http::Request::post("https://localhost/extension/heartbeat")
        .header("x-api-key", ALPHA_KEY)
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(beat).await.unwrap().status(), 200);
    let (status, _) = body(send.send_request(request(Some(ALPHA_KEY))).await.unwrap()).await;
    assert_eq!(status, 200);
    let seen = up.last_headers();
    assert_eq!(seen.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(
        seen.get("host").unwrap(),
        "localhost",
        "HTTP/2's :authority becomes Host upstream"
    );
    assert!(seen.get("x-api-key").is_none());
}

#[tokio::test]
async fn a_reload_picks_up_a_renewed_certificate() {
    let up = Upstream::start().await;
    let c = certs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    let toml = tls_toml(&up, &c);
    std::fs::write(&path, &toml).unwrap();
    let kg = Keygate::start_with(
        &toml,
        keygate::clock::Clock::manual(1_700_000_000_000),
        Some(path.clone()),
    )
    .await;
    // Renew: a new key and certificate in the same files.
    let renewed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(c.dir.path().join("cert.pem"), renewed.cert.pem()).unwrap();
    std::fs::write(
        c.dir.path().join("key.pem"),
        renewed.signing_key.serialize_pem(),
    )
    .unwrap();
    kg.server.reload().unwrap();
    let (_, alpn) = connect(&kg, renewed.cert.der(), b"http/1.1").await;
    assert_eq!(
        alpn.as_deref(),
        Some(&b"http/1.1"[..]),
        "the new certificate is served"
    );
}

#[test]
fn unusable_tls_files_are_refused_with_the_field() {
    let c = certs();
    std::fs::write(c.dir.path().join("key.pem"), "not a key").unwrap();
    let toml = format!(
        "{}\n[proxy.tls]\ncert = {}\nkey = {}\n",
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\npath = \"/*\"",
        toml_str(c.dir.path().join("cert.pem").to_str().unwrap()),
        toml_str(c.dir.path().join("key.pem").to_str().unwrap())
    );
    let err = keygate::config::Config::from_toml(&toml)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proxy.tls (line 7)") && err.contains("no PEM private key"),
        "{err}"
    );
}
