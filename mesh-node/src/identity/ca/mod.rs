//! The mesh certificate authority (`mesh-node ca`) and the agents' side of it.

pub mod auth;
pub mod authority;
pub mod client;
pub mod protocol;
pub mod server;
pub mod sign;
