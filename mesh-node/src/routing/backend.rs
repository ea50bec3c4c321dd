//! One weighted backend Service of a resolved destination: what a balancer picks
//! among.

use std::net::SocketAddr;

use serde::Serialize;

use crate::keys::ObjectKey;

/// One weighted backend Service of a resolved destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub service: ObjectKey,
    /// The backend Service's port.
    pub port: u16,
    pub weight: u32,
    /// Ready endpoints, sorted.
    pub endpoints: Vec<SocketAddr>,
    pub least_connections: bool,
    /// A DestinationRule subset the route asked for (a VirtualService destination's
    /// `subset`); until subsets resolve, such a backend has no endpoints (fail closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

impl Backend {
    /// Whether an L4 pick may choose this backend: a positive weight and at least one
    /// ready endpoint.
    pub fn is_eligible(&self) -> bool {
        self.weight > 0 && !self.endpoints.is_empty()
    }
}
