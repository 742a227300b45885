//! Noticing that a waiting client went away. actix-web keeps a handler running after its client
//! disconnects, so a waiting acquire watches the peer's socket itself: `on_connect` records the
//! socket, and [`client_gone`] completes when the peer closes it or resets it.

use std::any::Any;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The raw socket of a connection, stored in its extensions by [`record_socket`].
#[derive(Clone, Copy, Debug)]
struct PeerSocket(RawFd);

/// The `on_connect` callback: remembers the socket of plain and TLS connections.
pub fn record_socket(connection: &dyn Any, extensions: &mut Extensions) {
    let fd = if let Some(tcp) = connection.downcast_ref::<TcpStream>() {
        tcp.as_raw_fd()
    } else if let Some(tls) = connection.downcast_ref::<TlsStream<TcpStream>>() {
        tls.get_ref().0.as_raw_fd()
    } else {
        return;
    };
    extensions.insert(PeerSocket(fd));
}

/// Completes once the client of `request` has closed or reset its connection. Never completes
/// when that cannot be watched (the request then simply waits out its time).
pub async fn client_gone(request: &HttpRequest) {
    let Some(watch) = request
        .conn_data::<PeerSocket>()
        .and_then(|socket| watch_socket(socket.0).ok())
    else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = watch.readable().await else {
            return std::future::pending().await;
        };
        if ready.ready().is_read_closed() || peer_closed(watch.get_ref()) {
            return;
        }
        ready.clear_ready();
    }
}

/// Registers a duplicate of the connection's descriptor with the runtime: the same socket, but
/// a registration of our own that cannot disturb actix-web's.
fn watch_socket(fd: RawFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the connection, and so its descriptor, outlives the request that is asking.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let duplicate = borrowed.try_clone_to_owned()?;
    // SAFETY: `duplicate` is our own descriptor, owned by the AsyncFd until it is dropped.
    unsafe { AsyncFd::register_with_interest(duplicate, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Peeks without consuming: end of stream or an error means the peer is gone; pipelined bytes
/// or nothing to read mean it is still there.
fn peer_closed(fd: &OwnedFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a valid buffer; MSG_PEEK leaves the data in place.
    let read = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match read {
        0 => true,
        n if n > 0 => false,
        _ => std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock,
    }
}
