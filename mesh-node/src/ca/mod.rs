//! The mesh CA as a service (`mesh-node ca`, port 15012): it watches the cluster to
//! know which pods run on which node, authenticates the node agents that ask, and signs
//! a workload certificate only for an identity that has a pod on the asking node.

pub(crate) mod auth;
pub mod server;
pub mod sign;
