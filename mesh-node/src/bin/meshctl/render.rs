//! Filters and tables for `meshctl node` views, from the admin API's typed views.

use std::collections::BTreeSet;

use comfy_table::Table;
use mesh_node::{
    admin::api::BackendView, admin::api::BpfView, admin::api::CertificateStatus,
    admin::api::ConnectionRecord, admin::api::Direction, admin::api::PoliciesView,
    admin::api::ResolutionView, admin::api::ResolvedBackendView, admin::api::RouteKind,
    admin::api::RouteView, admin::api::Security, admin::api::ServiceView, admin::api::StatusView,
    admin::api::WorkloadStatus, discovery::policy::PolicyAction, discovery::policy::PolicyRule,
    discovery::traffic_policy::LbPolicy,
};

use crate::format::{
    age, bytes, finish, identity, key, now_unix, opt, opt_key, opt_text, table, text, utc,
};
use crate::pools::pool_line;
use crate::{authz_view, mtls_view};

pub struct Filter {
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

/// The namespace and pods a row is about, for -n and --pod.
pub struct RowKey {
    pub namespaces: Vec<String>,
    /// None: --pod does not apply to this kind of row.
    pub pods: Option<Vec<String>>,
}

fn keep(row: &RowKey, f: &Filter) -> bool {
    let ns_ok = f
        .namespace
        .as_ref()
        .is_none_or(|n| row.namespaces.iter().any(|r| r == n));
    let pod_ok = match (&f.pod, &row.pods) {
        (None, _) | (_, None) => true,
        (Some(p), Some(pods)) => pods.iter().any(|r| r == p),
    };
    ns_ok && pod_ok
}

/// Keeps the rows that pass the filter.
pub fn filter<T>(rows: Vec<T>, f: &Filter, key_of: fn(&T) -> RowKey) -> Vec<T> {
    rows.into_iter().filter(|r| keep(&key_of(r), f)).collect()
}

pub fn workload_key(r: &WorkloadStatus) -> RowKey {
    RowKey {
        namespaces: vec![r.pod.namespace.clone()],
        pods: Some(vec![r.pod.name.clone()]),
    }
}

pub fn connection_key(r: &ConnectionRecord) -> RowKey {
    let peer = r.info.peer.as_ref();
    RowKey {
        namespaces: vec![
            r.info.pod.namespace.clone(),
            peer.map(|p| p.namespace.clone()).unwrap_or_default(),
        ],
        pods: Some(vec![
            r.info.pod.name.clone(),
            peer.map(|p| p.name.clone()).unwrap_or_default(),
        ]),
    }
}

pub fn service_key(r: &ServiceView) -> RowKey {
    RowKey {
        namespaces: vec![r.service.namespace.clone()],
        pods: None,
    }
}

pub fn route_key(r: &RouteView) -> RowKey {
    RowKey {
        namespaces: vec![r.route.namespace.clone()],
        pods: None,
    }
}

pub fn cert_key(r: &CertificateStatus) -> RowKey {
    RowKey {
        namespaces: vec![r.identity.namespace.clone()],
        pods: None,
    }
}

pub fn filter_policies(v: PoliciesView, f: &Filter) -> PoliciesView {
    PoliciesView {
        namespaces: filter(v.namespaces, f, |r| RowKey {
            namespaces: vec![r.namespace.clone()],
            pods: None,
        }),
        workloads: filter(v.workloads, f, |r| RowKey {
            namespaces: vec![r.pod.namespace.clone()],
            pods: Some(vec![r.pod.name.clone()]),
        }),
        peer_authentications: filter(v.peer_authentications, f, |r| RowKey {
            namespaces: vec![r.policy.namespace.clone()],
            pods: (!r.selector.is_empty()).then(|| {
                r.selects_on_this_node
                    .iter()
                    .map(|p| p.name.clone())
                    .collect()
            }),
        }),
        authorization: filter(v.authorization, f, |r| RowKey {
            namespaces: vec![r.pod.namespace.clone()],
            pods: Some(vec![r.pod.name.clone()]),
        }),
        policies: filter(v.policies, f, |r| RowKey {
            namespaces: vec![r.policy.namespace.clone()],
            pods: Some(
                r.selects_on_this_node
                    .iter()
                    .map(|p| p.name.clone())
                    .collect(),
            ),
        }),
    }
}

/// The table, or a line saying there is nothing to show.
fn or_none(t: &Table, what: &str) -> String {
    if t.row_iter().next().is_none() {
        format!("(no {what})")
    } else {
        finish(t)
    }
}

pub fn status(v: &StatusView) -> String {
    let mut t = table(&["FIELD", "VALUE"]);
    let ready = if v.ready {
        "yes".to_string()
    } else {
        format!("NO: {}", opt_text(v.not_ready_reason.as_deref()))
    };
    let objects: Vec<String> = v
        .state
        .objects
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let state_age = v
        .state
        .age_seconds
        .map(|a| format!("{} ago", age(a as i64)))
        .unwrap_or_else(|| "never".into());
    let mtls = if v.mtls {
        format!("on (trust domain {})", text(&v.trust_domain))
    } else {
        "OFF: no CA configured, meshed traffic is not encrypted".into()
    };
    for (field, value) in [
        ("node", text(&v.node)),
        ("version", text(&v.version)),
        ("ready", ready),
        ("uptime", age(v.uptime_seconds as i64)),
        (
            "draining",
            if v.draining {
                let listeners = if v.handover.handed_over_to.is_some() {
                    "listeners handed over"
                } else {
                    "listeners closed"
                };
                format!(
                    "yes: {listeners}, {} connections still open",
                    v.connections.live_outbound + v.connections.live_inbound
                )
            } else {
                "no".into()
            },
        ),
        ("handover", handover(&v.handover)),
        ("mtls", mtls),
        ("source", v.source.name().to_string()),
        (
            "state",
            format!(
                "{} updates, last {state_age}; {}",
                v.state.updates,
                objects.join(", ")
            ),
        ),
        (
            "workloads",
            format!(
                "{} enrolled of {} on this node",
                v.workloads.enrolled, v.workloads.total
            ),
        ),
        (
            "connections",
            format!(
                "{} outbound, {} inbound open",
                v.connections.live_outbound, v.connections.live_inbound
            ),
        ),
        (
            "certificates",
            format!("{} valid of {}", v.certificates.valid, v.certificates.total),
        ),
    ] {
        t.add_row(vec![field.to_string(), value]);
    }
    if v.tracing.is_empty() {
        t.add_row(vec![
            "tracing".to_string(),
            "off: no provider in --mesh-config".to_string(),
        ]);
    }
    for e in &v.tracing {
        let health = match &e.last_error {
            Some(error) => format!("FAILING: {}", text(error)),
            None if e.last_success_unix.is_some() => "ok".to_string(),
            None => "no export yet".to_string(),
        };
        t.add_row(vec![
            format!("tracing {}", text(&e.provider)),
            format!(
                "{} {}: {health}; {} sent, {} queued, {} dropped",
                e.protocol,
                text(&e.endpoint),
                e.sent,
                e.queued,
                e.dropped
            ),
        ]);
    }
    finish(&t)
}

/// In-pod listener ports, e.g. `15001 15006 15008`.
fn listener_ports(listeners: &[std::net::SocketAddr]) -> String {
    let ports: BTreeSet<String> = listeners.iter().map(|l| l.port().to_string()).collect();
    ports.into_iter().collect::<Vec<_>>().join(" ")
}

pub fn workloads(v: &[WorkloadStatus]) -> String {
    let mut t = table(&[
        "NAMESPACE",
        "POD",
        "IPS",
        "ACCOUNT",
        "ENROLLED",
        "LISTENERS",
        "COOKIE / REASON",
    ]);
    for w in v {
        let ips: Vec<String> = w.ips.iter().map(|ip| ip.to_string()).collect();
        t.add_row(vec![
            text(&w.pod.namespace),
            text(&w.pod.name),
            ips.join("\n"),
            text(&w.service_account),
            if w.enrolled { "yes" } else { "no" }.to_string(),
            listener_ports(&w.listeners),
            if w.enrolled {
                opt(w.netns_cookie)
            } else {
                opt_text(w.reason.as_deref())
            },
        ]);
    }
    or_none(&t, "pods on this node")
}

pub(crate) fn backend_line(b: &ResolvedBackendView) -> String {
    let subset = match &b.subset {
        Some(s) => format!(" subset {s}"),
        None => String::new(),
    };
    let mut line = format!(
        "{} :{}{subset} weight {} ({} ready)",
        key(&b.service),
        b.port,
        b.weight,
        b.endpoints.len()
    );
    if let Some(e) = &b.subset_error {
        line.push_str(&format!("\n  {e}"));
    }
    if b.load_balancer != LbPolicy::RoundRobin {
        line.push_str(&format!("\n  lb {:?}", b.load_balancer));
        if let Some(hash) = &b.consistent_hash {
            line.push_str(&format!(" on {hash}"));
        }
    }
    if let Some(od) = &b.outlier_detection {
        line.push_str(&format!(
            "\n  outlier: 5xx {} gateway {} local {} base {}ms max {}% min-health {}%",
            od.consecutive_5xx,
            od.consecutive_gateway,
            od.consecutive_local_origin,
            od.base_ejection_time.as_millis(),
            od.max_ejection_percent,
            od.min_health_percent
        ));
    }
    if let Some(limits) = &b.connection_pool {
        line.push_str(&pool_line(limits, &b.pool.unwrap_or_default()));
    }
    for o in b.outliers.iter().filter(|o| o.ejected || o.ejections > 0) {
        let state = match o.ejected_until_unix_ms {
            Some(until) if o.ejected => format!("EJECTED until {until} (unix ms)"),
            _ => "healthy".to_string(),
        };
        line.push_str(&format!(
            "\n  {} {state}, ejected {} time(s)",
            o.endpoint, o.ejections
        ));
    }
    line
}

/// A backend of an HTTPRoute rule (the routes view's shape).
fn rule_backend_line(b: &BackendView) -> String {
    let port = match b.port {
        Some(p) => format!(" :{p}"),
        None => String::new(),
    };
    format!(
        "{}{port} weight {} ({} ready)",
        key(&b.service),
        b.weight,
        b.ready_endpoints
    )
}

/// ROUTE and BACKENDS of an HTTP-routed port: each HTTPRoute, and each rule's
/// backends (the rule is chosen per request).
fn http_route_cells(routes: &[RouteView]) -> (String, String) {
    let names: Vec<String> = routes
        .iter()
        .map(|r| format!("{} {}", r.kind.name(), key(&r.route)))
        .collect();
    let mut backends = Vec::new();
    for r in routes {
        for rule in &r.rules {
            let label = if rule.matches.is_empty() {
                "any request".to_string()
            } else {
                rule.matches.join("; ")
            };
            backends.push(format!("#{} {label}:", rule.index));
            backends.extend(
                rule.backends
                    .iter()
                    .map(|b| format!("  {}", rule_backend_line(b))),
            );
        }
    }
    (names.join("\n"), backends.join("\n"))
}

/// ROUTE and BACKENDS of a port without HTTPRoutes: what a connection resolves to.
fn resolution_cells(resolution: Option<&ResolutionView>) -> (String, String) {
    let Some(r) = resolution else {
        return ("-".into(), "-".into());
    };
    let (route, backends) = match r {
        ResolutionView::Service {
            route, backends, ..
        } => (route.as_ref(), backends.as_slice()),
        _ => (None, &[][..]),
    };
    let backends: Vec<String> = backends.iter().map(backend_line).collect();
    (
        opt_key(route),
        if backends.is_empty() {
            r.kind().to_string()
        } else {
            backends.join("\n")
        },
    )
}

pub fn services(v: &[ServiceView]) -> String {
    let mut t = table(&["SERVICE", "VIPS", "PORT", "ROUTE", "BACKENDS"]);
    for svc in v {
        let vips: Vec<String> = svc.vips.iter().map(|ip| ip.to_string()).collect();
        let (mut route, backends) = if svc.http_routes.is_empty() {
            resolution_cells(svc.resolution.as_ref())
        } else {
            http_route_cells(&svc.http_routes)
        };
        if let Some(dr) = &svc.destination_rule {
            let state = if dr.applied { "" } else { " (not applied)" };
            route.push_str(&format!("\nDestinationRule {}{state}", key(&dr.rule)));
            if !dr.subsets.is_empty() {
                route.push_str(&format!("\n  subsets {}", dr.subsets.join(", ")));
            }
            for p in &dr.problems {
                route.push_str(&format!(
                    "\n  {} {}: {}",
                    p.field,
                    p.reason.as_str(),
                    p.detail
                ));
            }
        }
        t.add_row(vec![
            key(&svc.service),
            vips.join("\n"),
            svc.port.to_string(),
            route,
            backends,
        ]);
    }
    or_none(&t, "Services")
}

fn percent(share: Option<f64>) -> String {
    share
        .map(|f| format!("{:.1}%", f * 100.0))
        .unwrap_or_else(|| "-".into())
}

pub fn routes(v: &[RouteView]) -> String {
    let mut t = table(&["ROUTE", "RULE", "BACKEND", "WEIGHT", "OBSERVED", "READY"]);
    for r in v {
        let parents: Vec<String> = r
            .parents
            .iter()
            .map(|p| match p.port {
                Some(port) => format!("on {}:{port}", key(&p.service)),
                None => format!("on {}", key(&p.service)),
            })
            .collect();
        // The route's name once, above its rules and backends.
        let not_applied: Vec<String> = r
            .not_applied
            .iter()
            .map(|n| format!("NOT APPLIED: {n}"))
            .collect();
        let mut route = Some(
            [
                vec![key(&r.route), r.kind.name().to_string()],
                parents,
                not_applied,
            ]
            .concat()
            .join("\n"),
        );
        for rule in &r.rules {
            let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
            let matches = match (r.kind, rule.matches.is_empty()) {
                (RouteKind::TcpRoute, _) => "per connection".to_string(),
                (_, true) => "any request".to_string(),
                (_, false) => rule.matches.join("\n"),
            };
            let mut rule_cell = Some(format!("#{} {matches}", rule.index));
            for b in &rule.backends {
                let weight = u64::from(b.weight);
                let configured = if total > 0 {
                    format!("{weight} ({:.0}%)", weight as f64 * 100.0 / total as f64)
                } else {
                    weight.to_string()
                };
                t.add_row(vec![
                    route.take().unwrap_or_default(),
                    rule_cell.take().unwrap_or_default(),
                    key(&b.service),
                    configured,
                    format!("{} ({})", percent(b.observed_share), b.picks),
                    b.ready_endpoints.to_string(),
                ]);
            }
        }
    }
    or_none(&t, "TCPRoutes, HTTPRoutes or VirtualServices")
}

pub fn certs(v: &[CertificateStatus]) -> String {
    let mut t = table(&["IDENTITY", "STATE", "SERIAL", "VALID (UTC)", "EXPIRES IN"]);
    let now = now_unix();
    let mut errors = Vec::new();
    for c in v {
        let unix = |t: Option<u64>| t.and_then(|t| i64::try_from(t).ok());
        // Minutes are enough to read validity; JSON output has the exact seconds.
        let time = |t: Option<u64>| {
            unix(t)
                .map(|t| utc(t).chars().take(16).collect::<String>())
                .unwrap_or_else(|| "-".into())
        };
        let serial = opt_text(c.serial.as_deref());
        let serial = if serial.chars().count() > 12 {
            format!("{}…", serial.chars().take(11).collect::<String>())
        } else {
            serial
        };
        t.add_row(vec![
            c.identity.to_string(),
            c.state.name().to_string(),
            serial,
            format!(
                "from {}\nto   {}",
                time(c.not_before_unix),
                time(c.not_after_unix)
            ),
            unix(c.not_after_unix)
                .map(|t| age(t - now))
                .unwrap_or_else(|| "-".into()),
        ]);
        if let Some(e) = &c.last_error {
            errors.push(format!("{}: last CA error: {e}", c.identity));
        }
    }
    let mut out = or_none(&t, "certificates (no CA configured, or no enrolled pods)");
    for e in errors {
        out += &format!("\n{e}");
    }
    out
}

fn rule_line(rule: &PolicyRule) -> String {
    let mut from = Vec::new();
    for src in &rule.from {
        for (items, label) in [
            (&src.principals, "principal"),
            (&src.namespaces, "namespace"),
            (&src.service_accounts, "sa"),
        ] {
            for item in items {
                from.push(format!("{label} {}", text(item)));
            }
        }
    }
    let ports: Vec<String> = rule
        .to
        .iter()
        .flat_map(|d| d.ports.iter().map(u16::to_string))
        .collect();
    let from = if from.is_empty() {
        "any source".to_string()
    } else {
        from.join(" or ")
    };
    let to = if ports.is_empty() {
        "any port".to_string()
    } else {
        format!("port {}", ports.join(","))
    };
    format!("from {from} to {to}")
}

pub fn policies(v: &PoliciesView) -> String {
    let mut modes = table(&["NAMESPACE", "MESH", "MTLS", "DECIDED BY"]);
    for n in &v.namespaces {
        modes.add_row(vec![
            text(&n.namespace),
            if n.enrolled { "enabled" } else { "-" }.to_string(),
            if n.enrolled { n.mode.name() } else { "-" }.to_string(),
            if n.enrolled {
                text(&n.decided_by)
            } else {
                "-".into()
            },
        ]);
    }
    let mut t = table(&["POLICY", "ACTION", "SELECTOR", "RULES", "SELECTS HERE"]);
    for p in &v.policies {
        let selector: Vec<String> = p
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect();
        let rules: Vec<String> = p.rules.iter().map(rule_line).collect();
        let here: Vec<String> = p.selects_on_this_node.iter().map(key).collect();
        t.add_row(vec![
            key(&p.policy),
            match p.action {
                PolicyAction::Allow => "ALLOW",
                PolicyAction::Deny => "DENY",
            }
            .to_string(),
            if selector.is_empty() {
                "(all pods)".into()
            } else {
                selector.join(",")
            },
            if rules.is_empty() {
                "(no rules: matches nothing)".into()
            } else {
                rules.join("\n")
            },
            if here.is_empty() {
                "-".into()
            } else {
                here.join("\n")
            },
        ]);
    }
    format!(
        "{}\n\n{}\n\n{}\n\n{}\n\n{}",
        or_none(&modes, "namespaces"),
        or_none(
            &mtls_view::workload_modes(v),
            "enrolled workloads on this node"
        ),
        or_none(&mtls_view::peer_authentications(v), "PeerAuthentications"),
        or_none(
            &authz_view::workload_policies(v),
            "enrolled workloads on this node"
        ),
        or_none(&t, "security.nodemesh.io authorization policies")
    )
}

pub fn connections(v: &[ConnectionRecord]) -> String {
    // Two lines per connection keep both identities whole within 100 columns.
    let mut t = table(&[
        "POD / PEER",
        "SRC / ORIG DST",
        "IDENTITIES (SRC / DST)",
        "UP / DOWN",
        "STATE",
    ]);
    for c in v {
        let info = &c.info;
        let dir = match info.direction {
            Direction::Outbound => "out",
            Direction::Inbound => "in",
        };
        let ids = match info.security {
            Security::MutualTls => format!(
                "{}\n{}",
                identity(info.source_identity.as_deref()),
                identity(info.destination_identity.as_deref())
            ),
            Security::None => "(plaintext)".to_string(),
        };
        let service = info
            .service
            .as_ref()
            .map(|svc| format!("\nvia {svc}"))
            .unwrap_or_default();
        t.add_row(vec![
            format!(
                "{dir} {}\n-> {}",
                key(&info.pod),
                opt_key(info.peer.as_ref())
            ),
            format!("{}\n{}{service}", info.src, info.original_dst),
            ids,
            format!("{}\n{}", bytes(c.bytes_to_server), bytes(c.bytes_to_client)),
            format!(
                "{}\n{} #{}",
                text(&c.result()),
                age((c.duration_ms / 1000) as i64),
                c.id
            ),
        ]);
    }
    or_none(&t, "connections")
}

pub fn bpf(v: &BpfView) -> String {
    let mut programs = table(&["PROGRAM", "ATTACH", "PROG ID", "LINK ID"]);
    for p in &v.programs {
        programs.add_row(vec![
            text(&p.name),
            text(&p.attach),
            p.program_id.to_string(),
            p.link_id.to_string(),
        ]);
    }
    let mut maps = table(&["MAP", "ID", "ENTRIES", "MAX", "USED", "PINNED"]);
    for m in &v.maps {
        maps.add_row(vec![
            text(&m.name),
            m.id.to_string(),
            m.entries.to_string(),
            m.max_entries.to_string(),
            if m.max_entries > 0 {
                format!(
                    "{:.1}%",
                    m.entries as f64 * 100.0 / f64::from(m.max_entries)
                )
            } else {
                "-".into()
            },
            if m.pinned { "yes" } else { "no" }.to_string(),
        ]);
    }
    let cookies: Vec<String> = v
        .enrolled_netns_cookies
        .iter()
        .map(u64::to_string)
        .collect();
    format!(
        "{}\n\n{}\n\npin dir: {} (links under links/, maps under maps/){}\nenrolled netns cookies: {}",
        or_none(&programs, "attached programs"),
        or_none(&maps, "maps"),
        text(&v.pin_dir.to_string_lossy()),
        if v.reused_pins {
            " (maps reused from a previous run)"
        } else {
            ""
        },
        if cookies.is_empty() {
            "(none)".to_string()
        } else {
            cookies.join(" ")
        }
    )
}

/// The `handover` line of `meshctl node status`.
pub(crate) fn handover(h: &mesh_node::handover::HandoverView) -> String {
    if let Some(pid) = h.handed_over_to {
        return format!("handed the node over to pid {pid}");
    }
    let Some(pid) = h.took_over_from else {
        return "none".into();
    };
    let predecessor = match (
        h.predecessor_exited,
        h.predecessor_drained,
        h.predecessor_draining,
    ) {
        (true, Some((completed, cut)), _) => {
            format!("it drained ({completed} completed, {cut} cut) and exited")
        }
        (true, None, _) => "it has exited".into(),
        (false, Some((completed, cut)), _) => {
            format!("it drained ({completed} completed, {cut} cut) and waits for SIGTERM")
        }
        (false, None, Some(n)) => format!("it still drains {n} connections"),
        (false, None, None) => "it drains".into(),
    };
    let gap = h
        .accept_gap_ms
        .map(|ms| format!(", {ms} ms without accepting"))
        .unwrap_or_default();
    format!(
        "took the node over from pid {pid} ({} listeners inherited{gap}); {predecessor}",
        h.inherited_listeners
    )
}
