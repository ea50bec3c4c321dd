//! The mTLS part of `/policies`: each namespace's mode, each workload's of this node
//! (with its port overrides) and the PeerAuthentications behind them, all from
//! [`ClusterState::mtls_modes`], the function the inbound listeners decide with.

use k8s_openapi::api::core::v1::Namespace;

use crate::{
    admin::api::NamespaceView, admin::api::PeerAuthLevel, admin::api::PeerAuthenticationView,
    admin::api::PortMtlsView, admin::api::WorkloadMtlsView, discovery::cluster::ClusterState,
    discovery::cluster::MESH_LABEL, keys::ObjectKey, keys::PodKey,
};

pub(crate) fn namespace_view(
    cluster: &ClusterState,
    key: &ObjectKey,
    ns: &Namespace,
) -> NamespaceView {
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    let mtls = cluster.namespace_mtls(&key.name);
    NamespaceView {
        namespace: key.name.clone(),
        enrolled: labels.get(MESH_LABEL).map(String::as_str) == Some("enabled"),
        mode: mtls.mode,
        decided_by: mtls.source.to_string(),
    }
}

/// The modes of `pods` (this node's enrolled workloads).
pub(crate) fn workload_views(cluster: &ClusterState, pods: &[PodKey]) -> Vec<WorkloadMtlsView> {
    pods.iter()
        .map(|pod| {
            let modes = cluster.mtls_modes(pod);
            WorkloadMtlsView {
                pod: pod.clone(),
                mode: modes.default.mode,
                decided_by: modes.default.source.to_string(),
                ports: modes
                    .ports
                    .into_iter()
                    .map(|(port, m)| PortMtlsView {
                        port,
                        mode: m.mode,
                        decided_by: m.source.to_string(),
                    })
                    .collect(),
                also_selected_by: modes.overridden,
            }
        })
        .collect()
}

/// Every PeerAuthentication, with the pods of `pods` it selects (in force or not).
pub(crate) fn peer_authentication_views(
    cluster: &ClusterState,
    pods: &[PodKey],
) -> Vec<PeerAuthenticationView> {
    let index = &cluster.peer_authentication;
    index
        .compiled
        .iter()
        .map(|(key, pa)| {
            let level = match &pa.selector {
                Some(_) => PeerAuthLevel::Workload,
                None if key.namespace == index.root().as_str() => PeerAuthLevel::Mesh,
                None => PeerAuthLevel::Namespace,
            };
            let selects = pods
                .iter()
                .filter(|p| {
                    p.namespace == key.namespace
                        && pa.selects(
                            cluster
                                .pods
                                .get(*p)
                                .and_then(|pod| pod.metadata.labels.as_ref()),
                        )
                })
                .cloned()
                .collect();
            PeerAuthenticationView {
                policy: key.clone(),
                level,
                selector: pa.selector.clone().unwrap_or_default(),
                mode: pa.mode,
                ports: pa.ports.clone(),
                in_force: pa.in_force,
                problems: pa.problems.clone(),
                selects_on_this_node: selects,
            }
        })
        .collect()
}
