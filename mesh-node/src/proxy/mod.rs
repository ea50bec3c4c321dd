//! The proxy: per-pod context and accept loop, the outbound and inbound in-pod
//! listeners, the L4 relay step, the HTTP downstream/upstream of the L7 path, and the
//! destination's per-request policy (inbound HTTP).

pub(crate) mod dial;
pub(crate) mod http;
pub(crate) mod inbound;
pub(crate) mod inbound_hbone;
pub(crate) mod inbound_http;
pub(crate) mod inline_wake;
pub(crate) mod outbound;
pub(crate) mod pod;
