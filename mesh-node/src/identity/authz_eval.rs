//! The compiled authorization model (`discovery::authorization`) matched against what
//! a decision knows: which policies apply to a pod, and whether a rule matches a
//! connection or a request, with Istio's semantics. `identity::authz` orders the
//! decision (CUSTOM, DENY, AUDIT, ALLOW).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::Pod;

use crate::{
    discovery::authorization::Action, discovery::authorization::CompiledPolicy,
    discovery::authorization::Condition, discovery::authorization::Operation,
    discovery::authorization::PolicyKind, discovery::authorization::Rule,
    discovery::authorization::Source, discovery::authorization::StringMatch,
    discovery::authorization::Target, discovery::authorization::Values,
    discovery::authorization::WhenKey, discovery::cluster::ClusterState,
    identity::authz_facts::ConnectionFacts, identity::authz_facts::RequestFacts,
    identity::jwt::RequestAuth, keys::PodKey,
};

/// A connection's facts, and the request's when the decision is per request (None: at
/// connection time, where no HTTP attribute can match).
pub(super) struct Facts<'a> {
    pub(super) conn: &'a ConnectionFacts,
    pub(super) request: Option<&'a RequestFacts<'a>>,
    /// Istio's `source.principal`: the peer's SPIFFE ID without `spiffe://`.
    principal: Option<String>,
}

impl<'a> Facts<'a> {
    pub(super) fn new(
        conn: &'a ConnectionFacts,
        request: Option<&'a RequestFacts<'a>>,
    ) -> Facts<'a> {
        let principal = conn.peer.as_ref().map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        });
        Facts {
            conn,
            request,
            principal,
        }
    }

    fn auth(&self) -> Option<&RequestAuth> {
        self.request.and_then(|r| r.auth)
    }
}

fn labels_match(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Whether `policy` applies to the pod `key`: a policy of the pod's namespace (an Istio
/// policy of the root namespace: of any namespace) whose selector or target Services
/// pick it.
pub(super) fn applies(
    state: &ClusterState,
    policy: &CompiledPolicy,
    key: &PodKey,
    pod: &Pod,
) -> bool {
    let ns = &policy.id.key.namespace;
    let mesh_wide = policy.id.kind == PolicyKind::Istio
        && ns.as_str() == state.peer_authentication.root().as_str();
    if *ns != key.namespace && !mesh_wide {
        return false;
    }
    policy.targets.iter().any(|t| match t {
        Target::Labels(selector) => labels_match(selector, pod),
        Target::Services(services) => services.iter().any(|s| {
            s.namespace == key.namespace
                && state
                    .services
                    .get(s)
                    .and_then(|svc| svc.spec.as_ref()?.selector.as_ref())
                    .is_some_and(|sel| !sel.is_empty() && labels_match(sel, pod))
        }),
    })
}

fn text(m: &StringMatch, value: Option<&str>) -> bool {
    value.is_some_and(|v| m.matches(v))
}

fn source(s: &Source, f: &Facts) -> bool {
    let src = f.conn.source_ip;
    s.principals.holds(|m| text(m, f.principal.as_deref()))
        && s
            .namespaces
            .holds(|m| text(m, f.conn.peer.as_ref().map(|id| id.namespace.as_str())))
        && s
            .request_principals
            .holds(|m| text(m, f.auth().map(|a| a.principal.as_str())))
        && s.ip_blocks.holds(|c| c.contains(src))
        // No proxy in front forwards a client address: remote.ip is the source's.
        && s.remote_ip_blocks.holds(|c| c.contains(src))
}

fn operation(o: &Operation, f: &Facts) -> bool {
    let port = f.conn.destination.port();
    let host = f.request.map(|r| r.host.to_ascii_lowercase());
    o.ports.holds(|p| *p == port)
        && o.hosts.holds(|m| text(m, host.as_deref()))
        && o.methods.holds(|m| text(m, f.request.map(|r| r.method)))
        && o.paths.holds(|m| text(m, f.request.map(|r| r.path)))
}

/// A JWT claim at `path` (nested objects), as strings: a string, or a list's strings.
fn claim(auth: &RequestAuth, path: &[String]) -> Vec<String> {
    let Some((first, rest)) = path.split_first() else {
        return Vec::new();
    };
    let mut value = auth.claims.get(first);
    for step in rest {
        value = value.and_then(|v| v.get(step));
    }
    match value {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn texts(key: &WhenKey, f: &Facts) -> Vec<String> {
    let auth = f.auth();
    match key {
        WhenKey::RequestHeader(name) => {
            let values: Vec<&str> = f
                .request
                .map(|r| {
                    r.headers
                        .get_all(name)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                })
                .into_iter()
                .flatten()
                .collect();
            // As Envoy matches a repeated header: its values joined by commas.
            if values.is_empty() {
                Vec::new()
            } else {
                vec![values.join(",")]
            }
        }
        WhenKey::SourceNamespace => f.conn.peer.iter().map(|id| id.namespace.clone()).collect(),
        WhenKey::SourcePrincipal => f.principal.iter().cloned().collect(),
        WhenKey::RequestPrincipal => auth.map(|a| vec![a.principal.clone()]).unwrap_or_default(),
        WhenKey::RequestAudiences => auth.map(|a| a.audiences.clone()).unwrap_or_default(),
        WhenKey::RequestPresenter => auth.and_then(|a| a.presenter.clone()).into_iter().collect(),
        WhenKey::RequestClaim(path) => auth.map(|a| claim(a, path)).unwrap_or_default(),
        WhenKey::SourceIp | WhenKey::RemoteIp | WhenKey::DestinationIp => Vec::new(),
        WhenKey::DestinationPort => Vec::new(),
    }
}

fn ip(key: &WhenKey, f: &Facts) -> Option<IpAddr> {
    match key {
        WhenKey::SourceIp | WhenKey::RemoteIp => Some(f.conn.source_ip),
        WhenKey::DestinationIp => Some(f.conn.destination.ip()),
        _ => None,
    }
}

fn condition(c: &Condition, f: &Facts) -> bool {
    match &c.values {
        Values::Text(field) => {
            let values = texts(&c.key, f);
            field.holds(|m| values.iter().any(|v| m.matches(v)))
        }
        Values::Ips(field) => {
            let ip = ip(&c.key, f);
            field.holds(|cidr| ip.is_some_and(|ip| cidr.contains(ip)))
        }
        Values::Ports(field) => {
            let port = (c.key == WhenKey::DestinationPort).then(|| f.conn.destination.port());
            field.holds(|p| port == Some(*p))
        }
    }
}

/// Whether `rule` of a policy with `action` matches. A broken rule fails closed: it
/// matches everything in a DENY policy and nothing in any other.
pub(super) fn rule_matches(rule: &Rule, action: &Action, f: &Facts) -> bool {
    match rule {
        Rule::Broken => *action == Action::Deny,
        Rule::Match(b) => {
            (b.from.is_empty() || b.from.iter().any(|s| source(s, f)))
                && (b.to.is_empty() || b.to.iter().any(|o| operation(o, f)))
                && b.when.iter().all(|c| condition(c, f))
        }
    }
}

/// The index of the first rule of `policy` that matches.
pub(super) fn first_match(policy: &CompiledPolicy, f: &Facts) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|r| rule_matches(r, &policy.action, f))
}
