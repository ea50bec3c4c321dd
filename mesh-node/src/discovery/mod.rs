//! Discovery: the agent's view of the cluster (`ClusterState` snapshots), the sources
//! that fill it (the Kubernetes API, manifest files), the enrollment rules, and the
//! policy objects it carries.

pub(crate) mod addresses;
pub mod apiserver;
pub mod authorization;
pub mod authorization_policy;
pub mod cluster;
pub mod connection_pool;
pub mod consistent_hash;
pub(crate) mod crd_versions;
pub mod destination_rule;
pub(crate) mod duration;
pub(crate) mod enrollment;
pub mod files;
pub mod jwks;
mod lookups;
pub mod mtls;
pub mod peer_authentication;
pub mod policy;
pub mod policy_target;
pub mod problem;
pub mod problems;
pub mod request_auth;
pub mod request_authentication;
pub(crate) mod route_parents;
pub mod service_ref;
pub mod telemetry;
pub mod telemetry_index;
pub mod traffic_policy;
pub mod virtual_service;
