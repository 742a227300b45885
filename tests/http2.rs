//! HTTP/2 over TLS. actix-web runs an HTTP/2 request's handler to its end even after the client
//! reset the stream (`RST_STREAM`), and the connection stays open, so a waiting acquire whose
//! stream was cancelled stayed queued and was granted the lock on release: held by nobody who
//! asked, until a force release (issue 16). The server speaks HTTP/1.1 only, where a client that
//! gives up closes its connection and its wait is withdrawn. These tests speak h2 to prove it.

pub mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Server;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

/// A self-signed certificate for 127.0.0.1/localhost, as PEM files in `dir`; and its DER.
fn write_certificate(dir: &Path) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert, key, certified.cert.der().clone())
}

fn tls_client_config(cert: &CertificateDer<'static>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("trust the certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn https_client(cert: &CertificateDer<'static>) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(cert).expect("certificate"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn address(server: &Server) -> String {
    server
        .base
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

/// The protocol the server picks when a client offers `h2` and `http/1.1`.
async fn negotiated(server: &Server, cert: &CertificateDer<'static>) -> Option<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(address(server))
        .await
        .expect("connect");
    let config = tls_client_config(cert, &[b"h2", b"http/1.1"]);
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// What an h2 client keeps of its waiting request: the connection stays open while it is held.
struct H2Wait {
    _sender: h2::client::SendRequest<Bytes>,
    stream: h2::SendStream<Bytes>,
    _response: h2::client::ResponseFuture,
}

/// Opens an h2 connection (ALPN `h2`) and sends `PUT /lock/{name}?wait=30s` on it.
async fn open_h2_wait(
    server: &Server,
    cert: &CertificateDer<'static>,
    name: &str,
) -> Result<H2Wait, String> {
    let tcp = tokio::net::TcpStream::connect(address(server))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let config = tls_client_config(cert, &[b"h2"]);
    let server_name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS handshake offering only h2: {e}"))?;
    let (sender, connection) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut sender = sender
        .ready()
        .await
        .map_err(|e| format!("h2 not ready: {e}"))?;
    let request = http::Request::put(format!("https://localhost/lock/{name}?wait=30s"))
        .header("content-type", "application/json")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut stream) = sender
        .send_request(request, false)
        .map_err(|e| format!("h2 request: {e}"))?;
    stream
        .send_data(Bytes::from(json!({"key": "left"}).to_string()), true)
        .map_err(|e| format!("h2 body: {e}"))?;
    Ok(H2Wait {
        _sender: sender,
        stream,
        _response: response,
    })
}

#[test]
fn over_tls_the_server_negotiates_http_1_1_even_when_h2_is_offered() {
    let dir = common::temp_dir();
    let (cert, key, der) = write_certificate(dir.path());
    let server = common::server().tls(&cert, &key).start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let protocol = runtime.block_on(negotiated(&server, &der));
    assert_eq!(protocol.as_deref(), Some(&b"http/1.1"[..]));
}

#[test]
fn a_waiting_acquire_whose_h2_stream_was_reset_is_never_granted() {
    let dir = common::temp_dir();
    let (cert, key, der) = write_certificate(dir.path());
    let server = common::server().tls(&cert, &key).start();
    let http = https_client(&der);
    let lock = server.url("/lock/x");
    let holder = json!({"key": "holder"}).to_string();
    assert_eq!(
        common::call_with(&http, "PUT", &lock, Some(&holder)).status,
        200
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Kept until the end: the h2 connection stays open after its stream is reset.
    let _kept = match runtime.block_on(open_h2_wait(&server, &der, "x")) {
        Ok(mut wait) => {
            // Queued behind the holder, then cancelled by the client on an open connection.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let status = common::call_with(&http, "GET", &lock, None);
                if status.json()["waiters"] == json!(1) {
                    break;
                }
                assert!(Instant::now() < deadline, "never queued: {}", status.body);
                std::thread::sleep(Duration::from_millis(10));
            }
            wait.stream.send_reset(h2::Reason::CANCEL);
            Some(wait)
        }
        Err(refused) => {
            eprintln!("h2 refused, as it must be: {refused}");
            None
        }
    };
    let released = common::call_with(&http, "DELETE", &lock, Some(&holder));
    assert_eq!(released.status, 200, "{}", released.body);
    // The client that left does not hold the lock: it is free, and a third client gets it.
    let third = common::call_with(
        &http,
        "PUT",
        &lock,
        Some(&json!({"key": "third"}).to_string()),
    );
    assert_eq!(
        third.status, 200,
        "the lock went to the client that reset its stream: {}",
        third.body
    );
}
