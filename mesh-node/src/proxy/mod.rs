//! The proxy: per-pod context and accept loop, the outbound and inbound in-pod
//! listeners, the L4 relay step, and the HTTP downstream/upstream of the L7 path.

pub mod http;
pub mod inbound;
pub mod inbound_hbone;
pub mod outbound;
pub mod pod;
