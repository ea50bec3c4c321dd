//! HBONE: TCP tunnelled through HTTP/2 CONNECT over mutual TLS (Istio-compatible
//! framing), between node proxies, on each pod's port 15008.

pub mod client;
pub(crate) mod io;
pub(crate) mod server;
pub(crate) mod stream;
pub mod target;
pub mod tls;

use tokio::{io::BufReader, net::TcpStream};

/// Read buffer under each HBONE connection's TLS. rustls asks the socket for at most
/// 4 KiB at a time, so without it every 16 KiB record costs four `recv` calls; with it,
/// one `recv` takes up to 64 KiB and rustls reads from memory.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// The TCP stream an HBONE connection's TLS runs on.
pub fn buffered(tcp: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}
