//! TLS termination on the proxy listener: HTTP/1.1 and HTTP/2 by ALPN, the same gate behind
//! both, `X-Forwarded-Proto: https` upstream, a renewed certificate picked up by a reload, and
//! a config whose TLS files are unusable refused with the field named. Then the other leg:
//! HTTPS to the upstream, trusting a configured CA, pooled, and refused (502) when the
//! upstream's certificate does not verify.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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

// ---------------------------------------------------------------------------------------------
// HTTPS to the upstream

/// A CA (its PEM file in `dir`) and a server config for `localhost` with a leaf it signed.
struct Pki {
    dir: tempfile::TempDir,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn ca_path(&self) -> String {
        self.dir.path().join("ca.pem").to_str().unwrap().to_owned()
    }
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
    .unwrap();
    Pki {
        dir,
        server: Arc::new(server),
    }
}

/// A TLS front for the plain test upstream: terminates TLS with `config` and relays the bytes
/// to `to`. Returns its address and a count of completed handshakes.
async fn tls_front(
    to: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut plain = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, handshakes)
}

fn https_toml(front: SocketAddr, upstream_lines: &[String]) -> String {
    let mut cfg = Cfg::new(format!("https://localhost:{}", front.port()));
    cfg.upstream_extra = upstream_lines.to_vec();
    cfg.render()
}

#[tokio::test]
async fn https_upstream_trusting_a_configured_ca_is_pooled() {
    let up = Upstream::start().await;
    let p = pki();
    let (front, handshakes) = tls_front(up.addr, p.server.clone()).await;
    let toml = https_toml(front, &[format!("ca = {}", toml_str(&p.ca_path()))]);
    let kg = Keygate::start(&toml).await;
    for _ in 0..5 {
        let r = kg.get("/api/over-tls", Some(ALPHA_KEY)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.hits(), 5);
    assert_eq!(up.last_path().as_deref(), Some("/api/over-tls"));
    assert!(up.last_headers().get("x-api-key").is_none());
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "one TLS session carried all five requests"
    );
    // Denials still never reach the upstream.
    kg.get("/api/over-tls", None)
        .await
        .assert_error(401, MISSING_KEY);
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn https_upstream_with_pipelining_answers_each_request_its_own() {
    let up = Upstream::start().await;
    let p = pki();
    let (front, _) = tls_front(up.addr, p.server.clone()).await;
    let toml = https_toml(
        front,
        &[
            format!("ca = {}", toml_str(&p.ca_path())),
            "pipeline = 8".into(),
        ],
    );
    let kg = Keygate::start(&toml).await;
    assert_each_gets_its_own(&kg, "/api/tls/", 24).await;
    assert_eq!(up.hits(), 24);
}

#[tokio::test]
async fn an_upstream_certificate_that_does_not_verify_is_502() {
    let up = Upstream::start().await;
    let served = pki();
    let other = pki();
    let (front, handshakes) = tls_front(up.addr, served.server.clone()).await;
    let bad_gateway = r#"{"error":"Bad Gateway: the upstream is unavailable"}"#;
    // Signed by a CA keygate was not told to trust.
    let kg = Keygate::start(&https_toml(
        front,
        &[format!("ca = {}", toml_str(&other.ca_path()))],
    ))
    .await;
    kg.get("/api/x", Some(ALPHA_KEY))
        .await
        .assert_error(502, bad_gateway);
    kg.stop().await;
    // The right CA, but keygate expects another name than the certificate's.
    let kg = Keygate::start(&https_toml(
        front,
        &[
            format!("ca = {}", toml_str(&served.ca_path())),
            r#"server_name = "api.internal.example""#.to_owned(),
        ],
    ))
    .await;
    kg.get("/api/x", Some(ALPHA_KEY))
        .await
        .assert_error(502, bad_gateway);
    assert_eq!(handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(up.hits(), 0, "nothing crossed an unverified connection");
}

#[test]
fn upstream_tls_settings_are_checked_at_load() {
    let missing = "/nonexistent/keygate-ca.pem";
    let mut cfg = Cfg::new("https://localhost:1");
    cfg.upstream_extra = vec![format!("ca = {}", toml_str(missing))];
    let e = keygate::config::Config::from_toml(&cfg.render())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstream.ca (line") && e.contains(missing),
        "{e}"
    );
    // TLS settings on a plain upstream are a mistake, not ignored.
    let mut cfg = Cfg::new("http://localhost:1");
    cfg.upstream_extra = vec![r#"server_name = "x""#.to_owned()];
    let e = keygate::config::Config::from_toml(&cfg.render())
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream.server_name (line"), "{e}");
}
