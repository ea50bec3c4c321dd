//! The admin API's views that combine several parts of the agent (status, policies,
//! routes, services, trace, eBPF), built as the typed views of [`crate::admin::api`].

use std::net::SocketAddr;

use crate::{
    admin::api::AdmissionView, admin::api::AuthzPolicyView, admin::api::BpfView,
    admin::api::CandidateView, admin::api::CertificateCounts, admin::api::CertificateState,
    admin::api::ConnectionCounts, admin::api::HashView, admin::api::HttpRequestView,
    admin::api::InboundView, admin::api::MapView, admin::api::PoliciesView, admin::api::PolicyView,
    admin::api::ProgramView, admin::api::RedirectView, admin::api::RequestView,
    admin::api::ResolutionView, admin::api::ResolvedBackendView, admin::api::RouteView,
    admin::api::ServiceView, admin::api::SourceView, admin::api::StateSummary,
    admin::api::StatusView, admin::api::TraceOutcome, admin::api::TraceTransport,
    admin::api::TraceView, admin::api::WorkloadAuthzView, admin::api::WorkloadCounts,
    admin::peer_auth, admin::routes::route_views, admin::state::unix_now, admin::state::AdminState,
    admin::trace::trace, admin::trace::HttpAttributes, admin::trace::Outcome, admin::trace::Trace,
    admin::trace::TraceError, admin::trace::TraceInputs, admin::trace::Transport,
    capture::dataplane::MapStatus, capture::dataplane::ProgramStatus,
    discovery::cluster::service_ips, discovery::cluster::ClusterState,
    identity::authz::policies_for, identity::authz::selects, identity::authz::Admission,
    keys::ObjectKey, keys::PodKey, routing::resolve::resolve, routing::resolve::IpCidr,
    routing::resolve::Resolution,
};

/// One view of the agent's health: readiness, state freshness, what it serves.
pub(crate) fn status(state: &AdminState) -> StatusView {
    let cluster = state.state.borrow().clone();
    let workloads = state.workloads.borrow().clone();
    let certs = state
        .certificates
        .as_ref()
        .map(|c| c.status())
        .unwrap_or_default();
    let (live_out, live_in) = state.connections.live_counts();
    let last_update = state.metrics.state_last_update.get();
    let draining = state.metrics.draining.get() == 1;
    let unready = crate::admin::state::unready_reason(
        draining,
        &state.ready,
        &state.discovery,
        &state.dataplane,
        state.certificates.as_deref(),
    );
    StatusView {
        node: state.config.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        ready: unready.is_none(),
        not_ready_reason: unready,
        uptime_seconds: state.started.elapsed().as_secs(),
        draining,
        handover: state
            .handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        tracing: state.tracer.status(),
        mtls: state.certificates.is_some(),
        trust_domain: state.config.trust_domain.clone(),
        source: state.config.source,
        state: StateSummary {
            objects: cluster
                .counts()
                .into_iter()
                .map(|(kind, n)| (kind.to_string(), n))
                .collect(),
            updates: state.metrics.state_updates.get(),
            age_seconds: (last_update > 0.0).then(|| (unix_now() - last_update).max(0.0)),
        },
        workloads: WorkloadCounts {
            total: workloads.len(),
            enrolled: workloads.iter().filter(|w| w.enrolled).count(),
        },
        connections: ConnectionCounts {
            live_outbound: live_out,
            live_inbound: live_in,
        },
        certificates: CertificateCounts {
            total: certs.len(),
            valid: certs
                .iter()
                .filter(|c| c.state == CertificateState::Valid)
                .count(),
        },
    }
}

/// Namespaces with their mTLS mode, this node's workloads with theirs (by port) and
/// the PeerAuthentications behind them, and every AuthorizationPolicy with the pods of
/// this node it selects.
pub(crate) fn policies(state: &AdminState) -> PoliciesView {
    let cluster = state.state.borrow().clone();
    let workloads = state.workloads.borrow().clone();
    let namespaces = cluster
        .namespaces
        .iter()
        .map(|(key, ns)| peer_auth::namespace_view(&cluster, key, ns))
        .collect();
    let here: Vec<PodKey> = workloads
        .iter()
        .filter(|w| w.enrolled)
        .map(|w| w.pod.clone())
        .collect();
    let policies = cluster
        .authorization_policies
        .iter()
        .map(|(key, policy)| {
            let selected: Vec<PodKey> = workloads
                .iter()
                .map(|w| &w.pod)
                .filter(|p| p.namespace == key.namespace)
                .filter(|p| cluster.pods.get(*p).is_some_and(|pod| selects(policy, pod)))
                .cloned()
                .collect();
            PolicyView {
                policy: key.clone(),
                action: policy.spec.action,
                selector: policy.spec.selector.match_labels.clone(),
                rules: policy.spec.rules.clone(),
                selects_on_this_node: selected,
            }
        })
        .collect();
    let authorization = here
        .iter()
        .map(|pod| WorkloadAuthzView {
            pod: pod.clone(),
            policies: policies_for(&cluster, pod)
                .unwrap_or_default()
                .iter()
                .map(|p| AuthzPolicyView {
                    kind: p.id.kind,
                    policy: p.id.key.clone(),
                    action: p.action.clone(),
                    l7: p.is_http(),
                    problems: p.problems.clone(),
                })
                .collect(),
        })
        .collect();
    PoliciesView {
        authorization,
        namespaces,
        workloads: peer_auth::workload_views(&cluster, &here),
        peer_authentications: peer_auth::peer_authentication_views(&cluster, &here),
        policies,
    }
}

pub(crate) fn routes(state: &AdminState) -> Vec<RouteView> {
    let cluster: std::sync::Arc<ClusterState> = state.state.borrow().clone();
    route_views(&cluster, &state.balancer.picks())
}

/// The eBPF programs and maps of the dataplane.
pub(crate) fn bpf(state: &AdminState) -> BpfView {
    let dataplane = &state.dataplane;
    BpfView {
        pin_dir: dataplane.pin_dir().to_path_buf(),
        reused_pins: dataplane.reused_pins,
        programs: dataplane.programs().iter().map(program_view).collect(),
        maps: dataplane.map_status().iter().map(map_view).collect(),
        enrolled_netns_cookies: dataplane.enrolled_cookies(),
        pinned_sk_lookup_links: dataplane.pinned_sk_lookup_links(),
    }
}

fn program_view(p: &ProgramStatus) -> ProgramView {
    ProgramView {
        name: p.name.into(),
        attach: p.attach.into(),
        program_id: p.program_id,
        link_id: p.link_id,
        pin: p.pin.clone(),
    }
}

fn map_view(m: &MapStatus) -> MapView {
    MapView {
        name: m.name.into(),
        id: m.id,
        max_entries: m.max_entries,
        entries: m.entries,
        pinned: m.pinned,
    }
}

/// `pod` is `namespace/name`; `to` is `host:port`.
pub(crate) fn run_trace(
    state: &AdminState,
    pod: &str,
    to: &str,
    http: HttpAttributes,
) -> Result<TraceView, TraceError> {
    let key = match pod.split_once('/') {
        Some((ns, name)) => ObjectKey::new(ns, name),
        None => ObjectKey::new("default", pod),
    };
    let cluster = state.state.borrow().clone();
    let workloads = state.workloads.borrow().clone();
    let picks = state.balancer.picks();
    let inputs = TraceInputs {
        state: &cluster,
        node: &state.config.node_name,
        workloads: &workloads,
        dataplane: &*state.dataplane,
        service_cidrs: &state.config.service_cidrs,
        trust_domain: state
            .certificates
            .is_some()
            .then_some(state.config.trust_domain.as_str()),
        picks: &picks,
        balancer: Some(&state.balancer),
        jwt: Some(&state.jwt),
    };
    trace(&inputs, &key, to, Some(http))
        .map(|t| trace_view(t, Some(&state.balancer), Some(&state.pools)))
}

/// The admin API's form of a trace.
fn trace_view(
    t: Trace,
    balancer: Option<&crate::routing::balancer::Balancer>,
    pools: Option<&crate::routing::pool::ConnectionPools>,
) -> TraceView {
    TraceView {
        source: SourceView {
            pod: t.source.pod,
            node: t.source.node,
            on_this_node: t.source.on_this_node,
            enrolled: t.source.enrolled,
            reason: t.source.reason,
            netns_cookie: t.source.netns_cookie,
            identity: t.source.identity,
            host_network: t.source.host_network,
        },
        destination: t.destination,
        address: t.address,
        named_service: t.named_service,
        redirect: RedirectView {
            redirected: t.redirect.redirected,
            program: t.redirect.program,
            program_id: t.redirect.program_id,
            link_id: t.redirect.link_id,
            to: t.redirect.to,
            reason: t.redirect.reason,
        },
        resolution: t.resolution.as_ref().map(resolution_view),
        http_routes: t.http_routes,
        http_request: t.http_request.map(|r| HttpRequestView {
            method: r.method,
            path: r.path,
            headers: r.headers,
        }),
        backends: t
            .backends
            .iter()
            .map(|b| backend_view(b, balancer, pools))
            .collect(),
        hashes: t
            .hashes
            .into_iter()
            .map(|h| HashView {
                backend: h.backend,
                subset: h.subset,
                policy: h.policy.to_string(),
                hash: h.hash.map(|h| format!("{h:016x}")),
                endpoint: h.endpoint,
                note: h.note,
            })
            .collect(),
        candidates: t
            .candidates
            .into_iter()
            .map(|c| CandidateView {
                backend: c.backend,
                weight: c.weight,
                subset: c.subset,
                endpoint: c.endpoint,
                pod: c.pod,
                node: c.node,
                transport: match c.transport {
                    Transport::HboneMtls => TraceTransport::HboneMtls,
                    Transport::Plaintext => TraceTransport::Plaintext,
                },
                presented_identity: c.presented_identity,
                expected_identity: c.expected_identity,
                inbound: InboundView {
                    handled_by_mesh: c.inbound.handled_by_mesh,
                    listener: c.inbound.listener,
                    mode: c.inbound.mode.map(String::from),
                    mode_source: c.inbound.mode_source,
                    admission: c.inbound.admission.map(|a| match a {
                        Admission::Allow { policy } => AdmissionView::Allow { policy },
                        Admission::Refuse {
                            reason,
                            policy,
                            detail,
                        } => AdmissionView::Refuse {
                            reason,
                            policy,
                            detail,
                        },
                        Admission::Http { policies } => AdmissionView::Http { policies },
                    }),
                    note: c.inbound.note,
                    request: c.inbound.request.map(|r| RequestView {
                        status: r.status,
                        authentication: r.authentication,
                        allowed: r.verdict.as_ref().is_some_and(|v| v.allowed),
                        policy: r.verdict.as_ref().and_then(|v| v.policy.clone()),
                        rule: r.verdict.as_ref().and_then(|v| v.rule),
                        detail: r.verdict.map(|v| v.detail).unwrap_or_default(),
                    }),
                },
                allowed: c.allowed,
            })
            .collect(),
        outcome: match t.outcome {
            Outcome::Allow => TraceOutcome::Allow,
            Outcome::Deny => TraceOutcome::Deny,
            Outcome::Partial => TraceOutcome::Partial,
            Outcome::Refused => TraceOutcome::Refused,
        },
        summary: t.summary,
        notes: t.notes,
    }
}

/// The admin API's form of what a connection to an address resolves to.
fn resolution_view(r: &Resolution) -> ResolutionView {
    resolution_view_with(r, None, None)
}

/// [`resolution_view`] with each backend's outlier state from `balancer` and its
/// connection pool's occupancy from `pools`.
fn resolution_view_with(
    r: &Resolution,
    balancer: Option<&crate::routing::balancer::Balancer>,
    pools: Option<&crate::routing::pool::ConnectionPools>,
) -> ResolutionView {
    match r {
        Resolution::Direct => ResolutionView::Direct,
        Resolution::Service {
            service,
            port,
            route,
            backends,
        } => ResolutionView::Service {
            service: service.clone(),
            port: *port,
            route: route.clone(),
            backends: backends
                .iter()
                .map(|b| backend_view(b, balancer, pools))
                .collect(),
        },
        Resolution::UnknownPort { service, port } => ResolutionView::UnknownPort {
            service: service.clone(),
            port: *port,
        },
        Resolution::UnknownService => ResolutionView::UnknownService,
    }
}

/// A backend with the traffic policy in force: its outlier state from `balancer`
/// and its connection pool's occupancy from `pools`.
fn backend_view(
    b: &crate::routing::resolve::Backend,
    balancer: Option<&crate::routing::balancer::Balancer>,
    pools: Option<&crate::routing::pool::ConnectionPools>,
) -> ResolvedBackendView {
    ResolvedBackendView {
        service: b.service.clone(),
        port: b.port,
        weight: b.weight,
        endpoints: b.endpoints.clone(),
        least_connections: b.least_connections(),
        subset: b.subset.clone(),
        subset_error: b.subset_error.clone(),
        load_balancer: b.policy.load_balancer,
        consistent_hash: b.policy.consistent_hash.clone(),
        outlier_detection: b.policy.outlier_detection,
        outliers: balancer
            .map(|bal| bal.outliers(&b.service, b.port))
            .unwrap_or_default(),
        connection_pool: b.policy.connection_pool,
        pool: b
            .policy
            .connection_pool
            .map(|_| pools.and_then(|p| p.occupancy(b)).unwrap_or_default()),
    }
}

/// Every Service port with what a connection to it would resolve to right now; an
/// HTTP-routed port also with its HTTPRoutes (their rules choose per request).
pub(crate) fn services_view(
    state: &ClusterState,
    cidrs: &[IpCidr],
    picks: &crate::routing::balancer::PickCounts,
    balancer: Option<&crate::routing::balancer::Balancer>,
    pools: Option<&crate::routing::pool::ConnectionPools>,
) -> Vec<ServiceView> {
    let mut out = Vec::new();
    for (key, svc) in state.services.iter() {
        let vips = service_ips(svc);
        let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
        for port in ports.filter_map(|p| u16::try_from(p.port).ok()) {
            let resolution = vips.first().map(|vip| {
                resolution_view_with(
                    &resolve(state, SocketAddr::new(*vip, port), cidrs),
                    balancer,
                    pools,
                )
            });
            out.push(ServiceView {
                service: key.clone(),
                vips: vips.clone(),
                port,
                resolution,
                http_routes: crate::admin::routes::http_routes_for(state, key, port, picks),
                destination_rule: destination_rule_view(state, key),
            });
        }
    }
    out
}

/// The DestinationRule in force for `service`, or else a rejected one that names it.
fn destination_rule_view(
    state: &ClusterState,
    service: &crate::keys::ObjectKey,
) -> Option<crate::admin::api::DestinationRuleView> {
    let rule = state.destination_rule_for(service).or_else(|| {
        state
            .compiled_rules
            .values()
            .find(|r| r.service.as_ref() == Some(service))
    })?;
    Some(crate::admin::api::DestinationRuleView {
        rule: rule.rule.clone(),
        applied: rule.is_valid()
            && state
                .destination_rule_for(service)
                .is_some_and(|r| r.rule == rule.rule),
        subsets: rule.subsets.iter().map(|s| s.name.clone()).collect(),
        problems: rule.problems.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admin::views::services_view, discovery::files::parse_manifest,
        routing::balancer::PickCounts, telemetry::outcome::RefusalReason,
    };

    const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
        spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: web-v1, namespace: demo}\n\
        spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: demo}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
        rules: [{backendRefs: [{name: web-v1, port: 80, weight: 90}]}]\n";

    #[test]
    fn an_http_routed_service_port_shows_its_httproute_and_backends() {
        let state = ClusterState::from_objects(parse_manifest(SERVICES).unwrap());
        let view = serde_json::to_value(services_view(&state, &[], &PickCounts::new(), None, None))
            .unwrap();
        let view = view.as_array().unwrap();
        let web = view.iter().find(|v| v["service"]["name"] == "web").unwrap();
        let routes = web["http_routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1, "{web:#}");
        assert_eq!(routes[0]["route"]["name"], "split");
        assert_eq!(routes[0]["kind"], "HTTPRoute");
        let backend = &routes[0]["rules"][0]["backends"][0];
        assert_eq!(backend["service"]["name"], "web-v1");
        assert_eq!(backend["weight"], 90);
        let plain = view
            .iter()
            .find(|v| v["service"]["name"] == "web-v1")
            .unwrap();
        assert!(plain["http_routes"].as_array().unwrap().is_empty());
    }

    /// A trace with every optional part present and every kind of resolution,
    /// admission and transport the trace can give.
    fn full_traces() -> Vec<Trace> {
        use crate::admin::trace::{Candidate, InboundStep, RedirectStep, SourceStep};
        use crate::routing::resolve::Backend;
        let candidate = |transport, admission| Candidate {
            backend: Some(ObjectKey::new("apps", "web-v1")),
            weight: Some(50),
            subset: Some("v1".into()),
            endpoint: "10.0.0.9:8080".parse().unwrap(),
            pod: Some(ObjectKey::new("apps", "server")),
            node: Some("b".into()),
            transport,
            presented_identity: Some("spiffe://cluster.local/ns/apps/sa/client".into()),
            expected_identity: Some("spiffe://cluster.local/ns/apps/sa/server".into()),
            inbound: InboundStep {
                handled_by_mesh: true,
                listener: Some(15008),
                mode: Some("STRICT"),
                mode_source: Some("PeerAuthentication apps/strict (namespace-wide)".into()),
                admission,
                note: "a note".into(),
                request: None,
            },
            allowed: true,
        };
        let state = ClusterState::from_objects(parse_manifest(SERVICES).unwrap());
        let trace = Trace {
            source: SourceStep {
                pod: ObjectKey::new("apps", "client"),
                node: Some("a".into()),
                on_this_node: true,
                enrolled: true,
                reason: Some("why".into()),
                netns_cookie: Some(4097),
                identity: Some("spiffe://cluster.local/ns/apps/sa/client".into()),
                host_network: true,
            },
            destination: "web:80".into(),
            address: "10.96.0.10:80".parse().unwrap(),
            named_service: Some(ObjectKey::new("apps", "web")),
            redirect: RedirectStep {
                redirected: true,
                program: "cgroup/connect4".into(),
                program_id: Some(41),
                link_id: Some(7),
                to: Some("127.0.0.1:15001".parse().unwrap()),
                reason: "enrolled".into(),
            },
            resolution: Some(Resolution::Service {
                service: ObjectKey::new("apps", "web"),
                port: 80,
                route: Some(ObjectKey::new("apps", "split")),
                backends: vec![Backend {
                    service: ObjectKey::new("apps", "web-v1"),
                    port: 80,
                    weight: 50,
                    endpoints: vec!["10.0.0.9:8080".parse().unwrap()],
                    subset: None,
                    subset_error: None,
                    policy: crate::routing::resolve::EndpointPolicy {
                        load_balancer: crate::routing::resolve::LbPolicy::LeastRequest,
                        outlier_detection: None,
                        consistent_hash: None,
                        connection_pool: None,
                    },
                    ring: Default::default(),
                }],
            }),
            http_routes: route_views(&state, &PickCounts::new()),
            http_request: Some(HttpAttributes {
                method: Some("GET".into()),
                path: Some("/".into()),
                headers: vec![("x-a".into(), "1".into())],
            }),
            backends: Vec::new(),
            hashes: vec![crate::admin::trace::HashStep {
                backend: ObjectKey::new("apps", "web-v1"),
                subset: Some("v1".into()),
                policy: crate::discovery::consistent_hash::HashPolicy {
                    key: crate::discovery::consistent_hash::HashKey::Header {
                        name: "x-user".into(),
                    },
                    table: crate::discovery::consistent_hash::HashTable::RingHash {
                        minimum_ring_size: 1024,
                    },
                },
                hash: Some(255),
                endpoint: Some("10.0.0.9:8080".parse().unwrap()),
                note: "a note".into(),
            }],
            candidates: vec![
                candidate(Transport::HboneMtls, None),
                candidate(
                    Transport::Plaintext,
                    Some(Admission::Allow {
                        policy: Some("apps/allow".into()),
                    }),
                ),
                candidate(
                    Transport::Plaintext,
                    Some(Admission::Refuse {
                        reason: RefusalReason::PolicyDenied,
                        policy: None,
                        detail: "denied".into(),
                    }),
                ),
            ],
            outcome: Outcome::Partial,
            summary: "summary".into(),
            notes: vec!["note".into()],
        };
        let mut out = vec![trace.clone()];
        for (resolution, outcome) in [
            (None, Outcome::Allow),
            (Some(Resolution::Direct), Outcome::Deny),
            (Some(Resolution::UnknownService), Outcome::Refused),
            (
                Some(Resolution::UnknownPort {
                    service: ObjectKey::new("apps", "web"),
                    port: 81,
                }),
                Outcome::Allow,
            ),
        ] {
            out.push(Trace {
                resolution,
                outcome,
                http_request: None,
                named_service: None,
                ..trace.clone()
            });
        }
        out
    }

    #[test]
    fn the_trace_view_is_the_json_the_trace_always_gave() {
        for trace in full_traces() {
            let internal = serde_json::to_value(&trace).unwrap();
            let mut view = serde_json::to_value(trace_view(trace, None, None)).unwrap();
            // The backends' view adds their live state (outliers, pools) to the policy.
            assert_eq!(view["backends"], serde_json::json!([]));
            view.as_object_mut().unwrap().remove("backends");
            assert_eq!(view, internal);
        }
    }

    #[test]
    fn the_bpf_view_is_the_json_the_dataplane_status_always_gave() {
        let program = ProgramStatus {
            name: "nm_connect4",
            attach: "cgroup/connect4",
            program_id: 41,
            link_id: 7,
            pin: "/sys/fs/bpf/nodemesh/links/nm_connect4".into(),
        };
        assert_eq!(
            serde_json::to_value(program_view(&program)).unwrap(),
            serde_json::to_value(&program).unwrap()
        );
        let map = MapStatus {
            name: "NM_ENROLLED",
            id: 12,
            max_entries: 1024,
            entries: 2,
            pinned: true,
        };
        assert_eq!(
            serde_json::to_value(map_view(&map)).unwrap(),
            serde_json::to_value(&map).unwrap()
        );
    }
}
