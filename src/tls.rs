//! TLS: loads the PEM certificate chain and private key (`SSL_CERT`, `SSL_KEY`) into a rustls
//! server configuration. Every failure names the file and what is wrong with it.
//!
//! ALPN offers `http/1.1` only (set in `server.rs`; actix-web's `http2` feature is off too, see
//! Cargo.toml and the README's "Design notes"), so a client cannot cancel a waiting acquire by
//! resetting an HTTP/2 stream while keeping its connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the certificate and key cannot serve HTTPS: each names the variable and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read (`variable` is SSL_CERT or SSL_KEY).
    #[error("{variable} {}: cannot read: {source}", path.display())]
    Unreadable {
        variable: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate file could be examined but not opened for reading.
    #[error("SSL_CERT {}: cannot read: {source}", path.display())]
    CertificateUnreadable {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("SSL_CERT {}: not a valid PEM certificate: {source}", path.display())]
    NotCertificate {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "SSL_CERT {}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block)",
        .0.display()
    )]
    NoCertificate(PathBuf),
    #[error(
        "SSL_KEY {}: not a valid PEM private key (PKCS#8, PKCS#1 or SEC1): {source}",
        path.display()
    )]
    NotKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS set-up failed: {0}")]
    Setup(#[source] rustls::Error),
    #[error(
        "SSL_CERT {} and SSL_KEY {} do not make a usable pair: {source}",
        cert.display(),
        key.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Builds the server configuration from a certificate chain file and a key file.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<ServerConfig, TlsError> {
    let certs = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        })
}

/// Whether `path` is there to be read: a missing file is named as such.
fn readable(variable: &'static str, path: &Path) -> Result<(), TlsError> {
    std::fs::metadata(path)
        .map(drop)
        .map_err(|source| TlsError::Unreadable {
            variable,
            path: path.to_path_buf(),
            source,
        })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    readable("SSL_CERT", path)?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::CertificateUnreadable {
            path: path.to_path_buf(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::NotCertificate {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    readable("SSL_KEY", path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::NotKey {
        path: path.to_path_buf(),
        source,
    })
}
