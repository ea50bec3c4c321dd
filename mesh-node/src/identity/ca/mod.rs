//! The mesh certificate authority (`mesh-node ca`) and the agents' side of it.

pub mod authority;
pub mod client;
pub(crate) mod protocol;
