//! TLS: loads the PEM certificate chain and private key (`SSL_CERT`, `SSL_KEY`) into a rustls
//! server configuration. Every failure names the file and what is wrong with it.
//!
//! ALPN offers `http/1.1` only (set in `server.rs`; actix-web's `http2` feature is off too, see
//! Cargo.toml and the README's "Design notes"), so a client cannot cancel a waiting acquire by
//! resetting an HTTP/2 stream while keeping its connection.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Builds the server configuration from a certificate chain file and a key file.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<ServerConfig, String> {
    let certs = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "SSL_CERT {} and SSL_KEY {} do not make a usable pair: {e}",
                cert_path.display(),
                key_path.display()
            )
        })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let name = path.display();
    std::fs::metadata(path).map_err(|e| format!("SSL_CERT {name}: cannot read: {e}"))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("SSL_CERT {name}: cannot read: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("SSL_CERT {name}: not a valid PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "SSL_CERT {name}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block)"
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let name = path.display();
    std::fs::metadata(path).map_err(|e| format!("SSL_KEY {name}: cannot read: {e}"))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!("SSL_KEY {name}: not a valid PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")
    })
}
