//! How a connection crosses the network to an endpoint: HBONE (mutual TLS, expecting
//! the endpoint's SPIFFE identity) when the endpoint is an enrolled pod, plain TCP
//! otherwise.

use std::net::IpAddr;

use crate::{
    discovery::cluster::{service_account, ClusterState},
    identity::Identity,
};

/// The identity to expect at `ip` when it is an enrolled pod (its traffic must then
/// cross the network as mutual TLS); None for anything else.
pub fn meshed_identity(state: &ClusterState, trust_domain: &str, ip: IpAddr) -> Option<Identity> {
    let (key, pod) = state.meshed_pod(ip)?;
    Some(Identity::new(
        trust_domain,
        &key.namespace,
        service_account(pod),
    ))
}
