//! Routing: where a connection or request goes — destination → Service → route rule →
//! backend → endpoint → transport — and the balancers that pick among endpoints.

pub mod balancer;
pub mod http;
pub mod resolve;
pub(crate) mod transport;
