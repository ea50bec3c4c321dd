//! Asking a [`ClusterState`]: the objects that apply to a pod or Service (`*_for`), by
//! address, on a node, and each pod's and port's mTLS mode, from the indexes
//! `discovery::cluster` keeps.

use std::{net::IpAddr, sync::Arc};

use gateway_api::apis::experimental::{httproutes::HttpRoute, tcproutes::TcpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    discovery::addresses::canonical, discovery::cluster::ClusterState,
    discovery::mtls::EffectiveMtls, discovery::mtls::WorkloadMtls, discovery::mtls::MTLS_LABEL,
    discovery::request_auth::CompiledRequestAuth, discovery::route_parents::routes_for,
    discovery::traffic_policy::CompiledRule, discovery::virtual_service::VirtualService,
    keys::ObjectKey, keys::PodKey,
};

impl ClusterState {
    /// The RequestAuthentications that select the pod `pod`, by key (their rules all
    /// apply).
    pub fn request_authentications_for(
        &self,
        pod: &PodKey,
    ) -> Vec<(&ObjectKey, &Arc<CompiledRequestAuth>)> {
        if self.request_authentication.is_empty() {
            return Vec::new();
        }
        let labels = self.pods.get(pod).and_then(|p| p.metadata.labels.as_ref());
        let selects = |service: &ObjectKey| {
            service.namespace == pod.namespace
                && self
                    .services
                    .get(service)
                    .and_then(|s| s.spec.as_ref()?.selector.as_ref())
                    .is_some_and(|want| {
                        !want.is_empty()
                            && want
                                .iter()
                                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                    })
        };
        self.request_authentication.selecting(pod, labels, selects)
    }

    /// What the Telemetry resources say of the pod `pod`'s tracing and access logging
    /// (mesh, namespace and workload levels merged; nothing when there are none).
    pub fn telemetry_for(&self, pod: &PodKey) -> crate::telemetry::spans::TelemetryPolicy {
        if self.telemetry.is_empty() {
            return Default::default();
        }
        let labels = self.pods.get(pod).and_then(|p| p.metadata.labels.as_ref());
        self.telemetry.resolve(pod, labels)
    }

    /// The mode of a pod of `namespace` no workload PeerAuthentication selects.
    pub fn namespace_mtls(&self, namespace: &str) -> EffectiveMtls {
        let label = self.mtls_label(namespace);
        self.peer_authentication.namespace_mode(namespace, label)
    }

    /// Every mTLS mode of the pod `pod` (a pod not in the state: its namespace's).
    pub fn mtls_modes(&self, pod: &PodKey) -> WorkloadMtls {
        let labels = self.pods.get(pod).and_then(|p| p.metadata.labels.as_ref());
        let label = self.mtls_label(&pod.namespace);
        self.peer_authentication.workload_modes(pod, labels, label)
    }

    /// The mode in force for plaintext to `port` of the pod `pod`, and what decided it
    /// (`discovery::mtls`): what the inbound listeners, `meshctl node trace` and
    /// `meshctl node policies` use.
    pub fn mtls_mode(&self, pod: &PodKey, port: u16) -> EffectiveMtls {
        let mut modes = self.mtls_modes(pod);
        modes.ports.remove(&port).unwrap_or(modes.default)
    }

    fn mtls_label(&self, namespace: &str) -> Option<&str> {
        let labels = self.namespace(namespace)?.metadata.labels.as_ref()?;
        labels.get(MTLS_LABEL).map(String::as_str)
    }

    /// The DestinationRule in force for `service`, if any (O(1)).
    pub fn destination_rule_for(&self, service: &ObjectKey) -> Option<&Arc<CompiledRule>> {
        self.rules_by_service.get(service)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(&ObjectKey::new("", name)).map(|n| &**n)
    }

    pub fn pods_on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = (&'a PodKey, &'a Pod)> + 'a {
        self.pods
            .iter()
            .filter(move |(_, pod)| {
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            })
            .map(|(k, p)| (k, &**p))
    }

    /// The pod that owns `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodKey> {
        self.pods_by_ip.get(&canonical(ip))
    }

    /// The Service whose virtual IP is `ip`, if any.
    pub fn service_by_ip(&self, ip: IpAddr) -> Option<(&ObjectKey, &Service)> {
        let key = self.services_by_ip.get(&canonical(ip))?;
        Some((key, self.services.get(key)?))
    }

    pub fn endpoint_slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.endpoint_slices.get(k).map(|s| &**s))
    }

    /// TCPRoutes attached to a Service port, by Gateway API precedence (oldest first).
    pub fn tcp_routes_for(&self, service: &ObjectKey, port: u16) -> Vec<(&ObjectKey, &TcpRoute)> {
        routes_for(&self.tcp_routes_by_service, &self.tcp_routes, service, port)
    }

    /// HTTPRoutes attached to a Service port, by Gateway API precedence (oldest first).
    pub fn http_routes_for(&self, service: &ObjectKey, port: u16) -> Vec<(&ObjectKey, &HttpRoute)> {
        routes_for(
            &self.http_routes_by_service,
            &self.http_routes,
            service,
            port,
        )
    }

    /// VirtualServices with a host naming `service` (any spelling of it), whatever
    /// their `gateways`, by name. (A scan: the routing table builds this once per
    /// Service port and snapshot.)
    pub fn virtual_services_for(&self, service: &ObjectKey) -> Vec<(&ObjectKey, &VirtualService)> {
        self.virtual_services
            .iter()
            .filter(|(key, vs)| {
                vs.spec.hosts.iter().any(|h| {
                    ObjectKey::from_service_host(h, &key.namespace).is_ok_and(|s| s == *service)
                })
            })
            .map(|(k, v)| (k, &**v))
            .collect()
    }

    /// Whether a VirtualService that applies to the mesh has `http` routes for
    /// `service`: its connections are then served as HTTP.
    pub fn virtual_services_route_http(&self, service: &ObjectKey) -> bool {
        self.virtual_services_for(service)
            .iter()
            .any(|(_, vs)| vs.spec.binds_mesh() && !vs.spec.http.is_empty())
    }
}
