//! `meshctl node trace` as text: one line per step of the connection's path, then the
//! candidate endpoints and the verdict.

use mesh_node::admin::api::{
    AdmissionView, CandidateView, HashView, RedirectView, ResolutionView, RouteView, SourceView,
    TraceTransport, TraceView,
};

use crate::format::{finish, keep_whole, key, opt, opt_text, table, text, DEFAULT_WIDTH};
use crate::render::backend_line;

const LABEL: usize = 11;

/// Splits a line at spaces so that it fits `width` columns (a longer word stays whole).
fn wrap(line: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in line.split(' ') {
        let current = lines.last_mut().expect("never empty");
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
    }
    lines
}

/// One labelled step, wrapped to the table width.
fn step(out: &mut String, label: &str, text: &str) {
    let width = usize::from(DEFAULT_WIDTH) - LABEL;
    let lines = text.lines().flat_map(|l| wrap(l, width));
    for (i, line) in lines.enumerate() {
        let label = if i == 0 { label } else { "" };
        out.push_str(&format!("{label:<LABEL$}{line}\n"));
    }
}

fn source(src: &SourceView) -> String {
    let node = opt_text(src.node.as_deref());
    let status = if src.enrolled {
        match src.netns_cookie {
            Some(c) => format!("enrolled (netns cookie {c})"),
            None => "enrolled".to_string(),
        }
    } else {
        format!("NOT enrolled: {}", opt_text(src.reason.as_deref()))
    };
    let identity = match &src.identity {
        Some(id) => format!("\npresents {id}"),
        None => String::new(),
    };
    format!("{} on node {node}: {status}{identity}", key(&src.pod))
}

fn redirect(r: &RedirectView) -> String {
    let ids = match (r.program_id, r.link_id) {
        (Some(p), Some(l)) => format!(" (program {p}, link {l})"),
        _ => String::new(),
    };
    if r.redirected {
        format!(
            "{}{ids} rewrites it to {}\n{}",
            text(&r.program),
            opt(r.to),
            text(&r.reason)
        )
    } else {
        format!(
            "not redirected by {}{ids}: {}",
            text(&r.program),
            text(&r.reason)
        )
    }
}

/// The Service and route lines of a resolution.
fn resolution(out: &mut String, r: &ResolutionView) {
    match r {
        ResolutionView::Direct => step(
            out,
            "SERVICE",
            "none: not a Service address; the proxy connects to it as addressed",
        ),
        ResolutionView::Service {
            service,
            port,
            route,
            backends,
        } => {
            step(out, "SERVICE", &format!("{} port {port}", key(service)));
            let backends: Vec<String> = backends
                .iter()
                .map(|b| format!("{} weight {}", key(&b.service), b.weight))
                .collect();
            let route = match route {
                None => "no TCPRoute: the Service's own endpoints".to_string(),
                Some(r) => format!("TCPRoute {} (chosen per connection)", key(r)),
            };
            step(out, "ROUTE", &format!("{route}\n{}", backends.join(", ")));
        }
        ResolutionView::UnknownPort { service, port } => step(
            out,
            "SERVICE",
            &format!("{} has no port {port}", key(service)),
        ),
        ResolutionView::UnknownService => step(
            out,
            "SERVICE",
            "inside a service CIDR, but no Service has this address",
        ),
    }
}

fn http_routes(out: &mut String, routes: &[RouteView]) {
    for route in routes {
        let mut text = format!(
            "HTTPRoute {}: the rule is chosen per request",
            key(&route.route)
        );
        for rule in &route.rules {
            let backends: Vec<String> = rule
                .backends
                .iter()
                .map(|b| format!("{} weight {}", key(&b.service), b.weight))
                .collect();
            text += &format!(
                "\nrule {}: {} -> {}",
                rule.index,
                if rule.matches.is_empty() {
                    "any request".to_string()
                } else {
                    rule.matches.join(" | ")
                },
                backends.join(", ")
            );
        }
        step(out, "HTTPROUTE", &text);
    }
}

/// The traffic policy of the backends in play (subset, balancing, outlier state,
/// pool), one step each.
fn policies(out: &mut String, v: &TraceView) {
    for b in &v.backends {
        step(out, "POLICY", &backend_line(b));
    }
    for h in &v.hashes {
        step(out, "HASH", &hash(h));
    }
}

fn hash(h: &HashView) -> String {
    let subset = match &h.subset {
        Some(s) => format!(" subset {s}"),
        None => String::new(),
    };
    format!(
        "{}{subset} on {}\n{}",
        key(&h.backend),
        h.policy,
        text(&h.note)
    )
}

fn decision(c: &CandidateView) -> String {
    let inbound = &c.inbound;
    let mode = match (&inbound.mode, &inbound.mode_source) {
        (Some(m), Some(by)) => format!(" ({m}, by {})", text(by)),
        (Some(m), None) => format!(" ({m})"),
        (None, _) => " (not meshed)".into(),
    };
    match &inbound.admission {
        Some(AdmissionView::Refuse { reason, .. }) => {
            format!("DENY{mode}\n{}: {}", reason, text(&inbound.note))
        }
        Some(AdmissionView::Http { .. }) => match &inbound.request {
            Some(r) => {
                let verdict = match (r.status, &r.policy) {
                    (Some(status), _) => format!("DENY {status}"),
                    (None, _) => "ALLOW".to_string(),
                };
                let by = match (&r.policy, r.rule) {
                    (Some(p), Some(rule)) => format!(" by {p} rule {rule}"),
                    (Some(p), None) => format!(" by {p}"),
                    _ => String::new(),
                };
                format!(
                    "{verdict} per request{mode}{by}\nJWT: {}; {}",
                    text(&r.authentication),
                    text(&r.detail)
                )
            }
            None => format!("HTTP{mode}\n{}", text(&inbound.note)),
        },
        _ => format!("ALLOW{mode}\n{}", text(&inbound.note)),
    }
}

pub fn render(v: &TraceView) -> String {
    let mut out = format!(
        "Trace {} -> {} ({})\n\n",
        key(&v.source.pod),
        text(&v.destination),
        v.address
    );
    step(&mut out, "SOURCE", &source(&v.source));
    step(&mut out, "REDIRECT", &redirect(&v.redirect));
    match &v.resolution {
        None => step(
            &mut out,
            "PROXY",
            "none on the source side: the connection leaves the pod as the app made it",
        ),
        Some(r) => resolution(&mut out, r),
    }
    http_routes(&mut out, &v.http_routes);
    policies(&mut out, v);
    let mut t = table(&[
        "ENDPOINT / POD",
        "BACKEND",
        "TRANSPORT / EXPECTS",
        "DECISION",
    ]);
    let longest = v
        .candidates
        .iter()
        .map(|c| opt_text(c.expected_identity.as_deref()).chars().count())
        .max()
        .unwrap_or(0);
    keep_whole(&mut t, 2, longest.min(60) as u16);
    for c in &v.candidates {
        let subset = match &c.subset {
            Some(s) => format!("\nsubset {s}"),
            None => String::new(),
        };
        let backend = match (&c.backend, c.weight) {
            (None, _) => "-".to_string(),
            (Some(b), Some(w)) => format!("{}{subset}\nweight {w}", key(b)),
            (Some(b), None) => format!("{}{subset}", key(b)),
        };
        let pod = match &c.pod {
            None => "(not a pod)".to_string(),
            Some(p) => format!("{} on {}", key(p), opt_text(c.node.as_deref())),
        };
        let transport = match c.transport {
            TraceTransport::HboneMtls => format!(
                "HBONE mTLS, expects\n{}",
                opt_text(c.expected_identity.as_deref())
            ),
            TraceTransport::Plaintext => "plaintext".to_string(),
        };
        t.add_row(vec![
            format!("{}\n{pod}", c.endpoint),
            backend,
            transport,
            decision(c),
        ]);
    }
    out.push_str("\nCANDIDATES\n");
    if v.candidates.is_empty() {
        out.push_str("(none)\n");
    } else {
        out.push_str(&finish(&t));
        out.push('\n');
    }
    out.push('\n');
    step(
        &mut out,
        "VERDICT",
        &format!("{}: {}", v.outcome.name(), text(&v.summary)),
    );
    for note in &v.notes {
        step(&mut out, "NOTE", &text(note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_wrap_to_the_table_width() {
        let mut out = String::new();
        let long = "word ".repeat(60);
        step(&mut out, "REDIRECT", &long);
        assert!(out.lines().count() >= 3);
        for line in out.lines() {
            assert!(line.chars().count() <= 100, "{line}");
        }
        assert!(out.starts_with("REDIRECT   word"));
    }

    #[test]
    fn a_trace_shows_the_policy_of_its_backends_and_where_the_hash_key_lands() {
        let v: TraceView = serde_json::from_value(serde_json::json!({
            "source": {"pod": {"namespace": "apps", "name": "client"}, "node": "a", "on_this_node": true,
                "enrolled": true, "reason": null, "netns_cookie": 7, "identity": null, "host_network": false},
            "destination": "shop:80", "address": "10.96.0.20:80", "named_service": null,
            "redirect": {"redirected": true, "program": "cgroup/connect4", "program_id": 1, "link_id": 2,
                "to": "127.0.0.1:15001", "reason": "enrolled"},
            "resolution": null, "http_routes": [], "http_request": null,
            "backends": [{"service": {"namespace": "apps", "name": "shop"}, "port": 80, "weight": 1,
                "endpoints": ["10.2.0.11:8080", "10.2.0.12:8080"], "least_connections": false,
                "subset": "v1", "load_balancer": "CONSISTENT_HASH",
                "consistent_hash": {"key": {"source": "header", "name": "x-user"},
                    "table": {"kind": "ring_hash", "minimum_ring_size": 1024}},
                "outlier_detection": {"consecutive_5xx": 3, "consecutive_gateway": 0,
                    "consecutive_local_origin": 0, "interval_ms": 1000, "base_ejection_time_ms": 30000,
                    "max_ejection_percent": 10, "min_health_percent": 0},
                "outliers": [{"endpoint": "10.2.0.11:8080", "ejected": true, "ejected_until_unix_ms": 1_700_000_000_000u64,
                    "ejections": 1, "last_reason": "consecutive_5xx", "consecutive_5xx": 0,
                    "consecutive_gateway": 0, "consecutive_local_origin": 0}]}],
            "hashes": [{"backend": {"namespace": "apps", "name": "shop"}, "subset": "v1",
                "policy": "header x-user, ring hash 1024", "hash": "00000000000000ff",
                "endpoint": "10.2.0.12:8080",
                "note": "the key hashes to 00000000000000ff: endpoint 10.2.0.12:8080"}],
            "candidates": [], "outcome": "ALLOW", "summary": "allowed", "notes": [],
        }))
        .unwrap();
        let text = render(&v);
        assert!(
            text.contains("POLICY     apps/shop :80 subset v1 weight 1 (2 ready)"),
            "{text}"
        );
        assert!(text.contains("10.2.0.11:8080 EJECTED until"), "{text}");
        assert!(
            text.contains("HASH       apps/shop subset v1 on header x-user, ring hash 1024"),
            "{text}"
        );
        assert!(text.contains("endpoint 10.2.0.12:8080"), "{text}");
    }
}
