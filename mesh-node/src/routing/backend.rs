//! One weighted backend Service of a resolved destination: what a balancer picks
//! among.

use std::net::SocketAddr;

use serde::Serialize;

pub(crate) use crate::discovery::traffic_policy::OutlierPolicy;
pub use crate::discovery::traffic_policy::{EndpointPolicy, LbPolicy};
use crate::{keys::ObjectKey, routing::hash_ring::RingCache};

/// One weighted backend Service of a resolved destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub service: ObjectKey,
    /// The backend Service's port.
    pub port: u16,
    pub weight: u32,
    /// Ready endpoints (of the subset, when one is named), sorted.
    pub endpoints: Vec<SocketAddr>,
    /// The DestinationRule subset the endpoints are limited to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Why the named subset has no endpoints at all (no DestinationRule for the
    /// Service, or none of that name): the backend fails closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset_error: Option<String>,
    /// How an endpoint is chosen, and outlier detection (the DestinationRule's policy
    /// for this port and subset; round-robin without one).
    #[serde(flatten)]
    pub policy: EndpointPolicy,
    /// The consistent-hash ring over `endpoints` (built on the first hashed pick).
    #[serde(skip)]
    pub ring: RingCache,
}

impl Backend {
    /// Whether an L4 pick may choose this backend: a positive weight and at least one
    /// ready endpoint.
    pub fn is_eligible(&self) -> bool {
        self.weight > 0 && !self.endpoints.is_empty()
    }

    /// Whether endpoints are chosen by fewest picks in flight (LEAST_REQUEST).
    pub fn least_connections(&self) -> bool {
        self.policy.load_balancer == LbPolicy::LeastRequest
    }
}
