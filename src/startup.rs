//! What stops the server (or `locker import`/`export`) before it serves: one error type that
//! the binary prints as one line and exits with. Each area keeps its own error type
//! ([`ConfigError`], [`DescriptorError`], [`TlsError`], the stores' `OpenError`s, ...), whose
//! messages name the setting or file at fault; this one only gathers them. Errors of running
//! requests are another matter: [`crate::store::StoreError`] and [`crate::api::error::ApiError`].

use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::connection::DescriptorError;
use crate::store::file;
use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Descriptors(#[from] DescriptorError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    FileStore(#[from] file::OpenError),
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    EtcdStore(#[from] crate::store::etcd::OpenError),
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    Migrate(#[from] crate::store::etcd::migrate::MigrateError),
    /// The server stopped with an error after it started.
    #[error("server failed: {0}")]
    Serve(#[source] io::Error),
}
