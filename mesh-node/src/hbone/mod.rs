//! HBONE: TCP tunnelled through HTTP/2 CONNECT over mutual TLS (Istio-compatible
//! framing), between node proxies, on each pod's port 15008.

pub mod client;
pub mod io;
pub mod server;
pub mod stream;
pub mod tls;
