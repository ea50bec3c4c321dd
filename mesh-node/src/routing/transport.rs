//! How a connection crosses the network to an endpoint: HBONE (mutual TLS, expecting
//! the endpoint's SPIFFE identity) when the endpoint is an enrolled pod, plain TCP
//! otherwise.

use std::net::IpAddr;

use crate::{
    discovery::cluster::{service_account, ClusterState},
    identity::Identity,
    keys::PodKey,
};

/// How a connection reaches one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/2 CONNECT over mutual TLS to the endpoint's HBONE port (15008), which must
    /// present `identity`.
    Hbone { identity: Identity },
    /// Plain TCP straight to the endpoint.
    Plain,
}

impl Transport {
    /// The identity the endpoint must present (HBONE only).
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Transport::Hbone { identity } => Some(identity),
            Transport::Plain => None,
        }
    }
}

/// What the routing knows of one endpoint address: the pod that has it, and how to
/// reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The pod that owns the address (enrolled or not); None outside the cluster's pods.
    pub pod: Option<PodKey>,
    pub transport: Transport,
}

/// The identity to expect at `ip` when it is an enrolled pod (its traffic must then
/// cross the network as mutual TLS); None for anything else.
pub(crate) fn meshed_identity(
    state: &ClusterState,
    trust_domain: &str,
    ip: IpAddr,
) -> Option<Identity> {
    let (key, pod) = state.meshed_pod(ip)?;
    Some(Identity::new(
        trust_domain,
        &key.namespace,
        service_account(pod),
    ))
}

/// The pod at `ip` and the transport to it: HBONE to an enrolled pod when mutual TLS is
/// on (`trust_domain` is Some: a CA is configured), plain TCP otherwise.
pub(crate) fn endpoint_info(
    state: &ClusterState,
    trust_domain: Option<&str>,
    ip: IpAddr,
) -> EndpointInfo {
    let transport = trust_domain
        .and_then(|td| meshed_identity(state, td, ip))
        .map_or(Transport::Plain, |identity| Transport::Hbone { identity });
    EndpointInfo {
        pod: state.pod_by_ip(ip).cloned(),
        transport,
    }
}
