//! Authorization decisions for inbound connections and requests to a local workload,
//! with Istio's order: a CUSTOM policy selecting the workload denies (ext-authz is not
//! supported), then any matching DENY denies, matching AUDIT policies are recorded
//! (they never decide), no ALLOW policy allows, and else an ALLOW policy must match.
//!
//! Policies of both kinds (Istio's and Nodemesh's own) are compiled into one model
//! (`discovery::authorization`, `ClusterState::authorization`); matching is in
//! `authz_eval`. A plaintext source has no identity: `principals` and `namespaces`
//! cannot match it, their `not…` forms can. A policy with no rules matches nothing.
//!
//! At connection time ([`admit`]) a pod with policies whose rules have HTTP attributes
//! for the port is served as HTTP ([`Admission::Http`]) and each request decided by
//! [`authorize_request`]; otherwise the decision is taken for the connection.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

pub use crate::identity::authz_facts::{ConnectionFacts, RequestFacts};
use crate::{
    discovery::authorization::Action, discovery::authorization::CompiledPolicy,
    discovery::cluster::ClusterState, discovery::policy::AuthorizationPolicy,
    identity::authz_eval::applies, identity::authz_eval::first_match, identity::authz_eval::Facts,
    keys::ObjectKey, keys::PodKey, telemetry::outcome::RefusalReason,
};

/// The decision on one HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestVerdict {
    pub allowed: bool,
    /// The policy that decided (`<ns>/<name>`): the DENY or ALLOW that matched; None
    /// when no policy selects the pod, or when ALLOW policies select it and none matched.
    pub policy: Option<String>,
    /// The index of the deciding rule in that policy.
    pub rule: Option<usize>,
    /// Why, in words, for logs and `meshctl node trace`.
    pub detail: String,
    /// AUDIT policies that matched (logged, never decide).
    pub audited: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Allow {
        policy: Option<String>,
    },
    Deny {
        policy: Option<String>,
        reason: String,
    },
}

impl Verdict {
    #[cfg(test)]
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// Whether the Nodemesh policy's selector picks `pod` (same namespace assumed).
pub fn selects(policy: &AuthorizationPolicy, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    policy
        .spec
        .selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// The policies of both kinds that apply to the pod `dest` (by selector, targetRefs,
/// or mesh-wide from the root namespace), in key order. None: the pod is unknown.
pub fn policies_for(state: &ClusterState, dest: &PodKey) -> Option<Vec<Arc<CompiledPolicy>>> {
    let pod = state.pods.get(dest)?;
    Some(
        state
            .authorization
            .policies
            .values()
            .filter(|p| applies(state, p, dest, pod))
            .cloned()
            .collect(),
    )
}

/// Whether a policy governs the pod's inbound: an AuthorizationPolicy of either kind
/// (any action) or a RequestAuthentication selects it. Such a pod's inbound is dropped,
/// not passed to the app, while no agent runs (see `mesh_sk_lookup`).
pub fn inbound_governed(state: &ClusterState, pod: &PodKey) -> bool {
    policies_for(state, pod).is_some_and(|p| !p.is_empty())
        || !state.request_authentications_for(pod).is_empty()
}

/// The decision on a connection (`request` None) or one request.
fn decide(state: &ClusterState, dest: &ObjectKey, facts: &Facts) -> RequestVerdict {
    let deny = |policy: Option<String>, rule, detail: String, audited| RequestVerdict {
        allowed: false,
        policy,
        rule,
        detail,
        audited,
    };
    let Some(policies) = policies_for(state, dest) else {
        return deny(None, None, "destination pod unknown".into(), vec![]);
    };
    if let Some(p) = policies.iter().find(|p| p.action.denies_all()) {
        let why = match &p.action {
            Action::Custom { provider } => format!(
                "CUSTOM policy {} (ext-authz provider {}) selects this workload: CUSTOM/ext-authz is not supported by Nodemesh, every request is denied",
                p.id,
                provider.as_deref().unwrap_or("unset")
            ),
            other => format!(
                "policy {} has action `{}`, which Istio does not have: every request is denied",
                p.id,
                other.name()
            ),
        };
        return deny(Some(p.id.to_string()), None, why, vec![]);
    }
    let with = |action: Action| policies.iter().filter(move |p| p.action == action);
    if let Some((p, i)) = with(Action::Deny).find_map(|p| Some((p, first_match(p, facts)?))) {
        return deny(
            Some(p.id.to_string()),
            Some(i),
            "a DENY rule matched".into(),
            vec![],
        );
    }
    let audited: Vec<String> = with(Action::Audit)
        .filter(|p| first_match(p, facts).is_some())
        .map(|p| p.id.to_string())
        .collect();
    if with(Action::Allow).next().is_none() {
        return RequestVerdict {
            allowed: true,
            policy: None,
            rule: None,
            detail: "allowed: no policy denies it".into(),
            audited,
        };
    }
    match with(Action::Allow).find_map(|p| Some((p, first_match(p, facts)?))) {
        Some((p, i)) => RequestVerdict {
            allowed: true,
            policy: Some(p.id.to_string()),
            rule: Some(i),
            detail: format!("allowed by rule {i} of {}", p.id),
            audited,
        },
        None => deny(
            None,
            None,
            "ALLOW policies select this workload and none matched".into(),
            audited,
        ),
    }
}

/// May `peer` (None: plaintext) connect to `port` of the local pod `dest`? (The
/// connection-time decision without addresses: unit tests of port and identity rules.)
#[cfg(test)]
pub(crate) fn authorize(
    state: &ClusterState,
    dest: &ObjectKey,
    port: u16,
    peer: Option<&crate::identity::Identity>,
) -> Verdict {
    let conn = ConnectionFacts {
        source_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
        peer: peer.cloned(),
        destination: std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
    };
    verdict(decide(state, dest, &Facts::new(&conn, None)))
}

fn verdict(v: RequestVerdict) -> Verdict {
    if v.allowed {
        Verdict::Allow { policy: v.policy }
    } else {
        Verdict::Deny {
            policy: v.policy,
            reason: v.detail,
        }
    }
}

/// What the inbound side of a pod does with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "admission", rename_all = "snake_case")]
pub enum Admission {
    Allow {
        policy: Option<String>,
    },
    Refuse {
        /// The `reason` label of `nodemesh_connections_refused_total`.
        reason: RefusalReason,
        policy: Option<String>,
        detail: String,
    },
    /// Policies with HTTP attributes (or a RequestAuthentication) select this pod and
    /// port: the connection is served as HTTP and each request judged by
    /// [`authorize_request`]; anything that is not HTTP is refused.
    Http {
        /// The policies that made it so.
        policies: Vec<String>,
    },
}

/// The decision on one request to the local pod `dest` on a connection `conn`: every
/// attribute of every policy that applies, with the request's.
pub fn authorize_request(
    state: &ClusterState,
    dest: &ObjectKey,
    conn: &ConnectionFacts,
    request: &RequestFacts<'_>,
) -> RequestVerdict {
    decide(state, dest, &Facts::new(conn, Some(request)))
}

/// The inbound decision for a connection to `port` of the pod `dest` from `peer`
/// (None: plaintext, captured on 15006). Plaintext to a port whose effective mTLS mode
/// is STRICT ([`ClusterState::mtls_mode`]: PeerAuthentication or the namespace label)
/// is refused before any policy is consulted; PERMISSIVE and DISABLE take it. Then a
/// CUSTOM policy refuses; then, if any policy that applies (whatever its action) has a
/// rule with HTTP attributes that could apply to this port, the connection is served
/// as HTTP ([`Admission::Http`]); else the policies decide for the connection, and one
/// they allow is served as HTTP all the same when a RequestAuthentication selects the
/// pod (its tokens are checked per request). The listeners and `meshctl node trace`
/// both ask this.
pub fn admit(state: &ClusterState, dest: &ObjectKey, conn: &ConnectionFacts) -> Admission {
    let (port, peer) = (conn.destination.port(), conn.peer.as_ref());
    if peer.is_none() {
        let mtls = state.mtls_mode(dest, port);
        if mtls.mode.refuses_plaintext() {
            return Admission::Refuse {
                reason: RefusalReason::StrictMtlsPlaintext,
                policy: mtls.source.policy().map(ObjectKey::to_string),
                detail: format!(
                    "port {port} of {dest} is STRICT ({}): plaintext refused",
                    mtls.source
                ),
            };
        }
    }
    let policies = policies_for(state, dest).unwrap_or_default();
    let denies_all = policies.iter().any(|p| p.action.denies_all());
    let http: Vec<String> = policies
        .iter()
        .filter(|p| p.is_http_on(port))
        .map(|p| p.id.to_string())
        .collect();
    if !denies_all && !http.is_empty() {
        return Admission::Http { policies: http };
    }
    match verdict(decide(state, dest, &Facts::new(conn, None))) {
        Verdict::Allow { policy } => {
            let jwt = request_authentications(state, dest);
            if jwt.is_empty() {
                Admission::Allow { policy }
            } else {
                Admission::Http { policies: jwt }
            }
        }
        Verdict::Deny { policy, reason } => Admission::Refuse {
            reason: RefusalReason::PolicyDenied,
            policy,
            detail: reason,
        },
    }
}

/// The RequestAuthentications that select the pod `dest`, named as
/// `RequestAuthentication <ns>/<name>`: its inbound traffic must be served as HTTP.
pub fn request_authentications(state: &ClusterState, dest: &ObjectKey) -> Vec<String> {
    state
        .request_authentications_for(dest)
        .into_iter()
        .map(|(key, _)| format!("RequestAuthentication {key}"))
        .collect()
}

/// Why a connection admitted earlier is no longer allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// What a new connection like it would be refused as (`strict_mtls_plaintext`,
    /// `policy_denied`).
    pub reason: RefusalReason,
    pub policy: Option<String>,
    pub detail: String,
}

impl Revocation {
    /// The `reason` label of `nodemesh_connections_refused_total` for a live
    /// connection closed: `strict_mtls_revoked` (plaintext to a port now STRICT) or
    /// `policy_revoked`.
    pub fn counted_as(&self) -> &'static str {
        match self.reason {
            RefusalReason::StrictMtlsPlaintext => "strict_mtls_revoked",
            _ => "policy_revoked",
        }
    }
}

/// Resolves when the destination's current state no longer admits a connection from
/// `peer` (a mutual-TLS tunnel; None: plaintext captured on 15006) to `port` of the
/// local pod `dest`: the decision is taken again on the latest state now and after
/// every change, so a connection admitted under an older, looser policy or mTLS mode
/// (or before this node noticed the new one) does not outlive it. Never resolves
/// while the connection stays allowed, nor once the pod left the state (its
/// connections are left alone, like those of a pod leaving the mesh).
pub async fn revoked(
    mut state: tokio::sync::watch::Receiver<std::sync::Arc<ClusterState>>,
    dest: ObjectKey,
    conn: ConnectionFacts,
) -> Revocation {
    loop {
        let snapshot = state.borrow_and_update().clone();
        if snapshot.pods.contains_key(&dest) {
            match admit(&snapshot, &dest, &conn) {
                Admission::Refuse {
                    reason,
                    policy,
                    detail,
                } => {
                    return Revocation {
                        reason,
                        policy,
                        detail,
                    }
                }
                // A relayed byte stream cannot be judged per request.
                Admission::Http { policies } => {
                    return Revocation {
                        reason: RefusalReason::PolicyDenied,
                        policy: policies.first().cloned(),
                        detail: "policies with HTTP attributes (or a RequestAuthentication) \
                                 now select this port: the connection must be made again to \
                                 be judged per request"
                            .into(),
                    }
                }
                Admission::Allow { .. } => {}
            }
        }
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{discovery::files::parse_manifest, identity::Identity};

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: apps, labels: {app: server}}\nspec: {containers: [{name: c, image: x}]}\n";

    fn state(policies: &str) -> ClusterState {
        ClusterState::from_objects(parse_manifest(&format!("{PODS}---\n{policies}")).unwrap())
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    fn facts(port: u16, peer: Option<Identity>) -> ConnectionFacts {
        ConnectionFacts {
            source_ip: "10.0.0.9".parse().unwrap(),
            peer,
            destination: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
        }
    }

    fn verdict(s: &ClusterState, port: u16, peer: Option<&Identity>) -> bool {
        authorize(s, &ObjectKey::new("apps", "server"), port, peer).allowed()
    }

    const ALLOW_CLIENT: &str = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: apps}\n\
        spec: {selector: {matchLabels: {app: server}}, action: ALLOW, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/apps/sa/client\"]}], to: [{ports: [8080]}]}]}\n";
    const DENY_PLAIN_NS: &str = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-plain, namespace: apps}\n\
        spec: {action: DENY, rules: [{from: [{namespaces: [plain]}]}]}\n";

    #[test]
    fn no_policy_allows_everything() {
        let s = state("");
        assert!(verdict(&s, 8080, Some(&id("apps", "client"))));
        assert!(verdict(&s, 8080, None));
    }

    #[test]
    fn allow_policies_deny_everything_else() {
        let s = state(ALLOW_CLIENT);
        assert!(verdict(&s, 8080, Some(&id("apps", "client"))));
        assert!(
            !verdict(&s, 9090, Some(&id("apps", "client"))),
            "other port"
        );
        assert!(
            !verdict(&s, 8080, Some(&id("apps", "other"))),
            "other principal"
        );
        assert!(
            !verdict(&s, 8080, None),
            "plaintext cannot match a principal"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let allow_all_ns = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: allow-plain, namespace: apps}\n\
            spec: {action: ALLOW, rules: [{from: [{namespaces: [plain, apps]}]}]}\n";
        let s = state(&format!("{allow_all_ns}---\n{DENY_PLAIN_NS}"));
        assert!(!verdict(&s, 8080, Some(&id("plain", "x"))));
        assert!(verdict(&s, 8080, Some(&id("apps", "x"))));
        let v = authorize(
            &s,
            &ObjectKey::new("apps", "server"),
            8080,
            Some(&id("plain", "x")),
        );
        assert_eq!(
            v,
            Verdict::Deny {
                policy: Some("apps/deny-plain".into()),
                reason: "a DENY rule matched".into()
            }
        );
    }

    #[test]
    fn strict_namespaces_refuse_plaintext_before_policy() {
        let strict = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {nodemesh.io/mtls: strict}}\n";
        let s = state(strict);
        let server = ObjectKey::new("apps", "server");
        assert!(matches!(
            admit(&s, &server, &facts(8080, None)),
            Admission::Refuse {
                reason: RefusalReason::StrictMtlsPlaintext,
                ..
            }
        ));
        assert_eq!(
            admit(&s, &server, &facts(8080, Some(id("apps", "client")))),
            Admission::Allow { policy: None }
        );
        let s = state(ALLOW_CLIENT);
        assert!(matches!(
            admit(&s, &server, &facts(8080, None)),
            Admission::Refuse {
                reason: RefusalReason::PolicyDenied,
                ..
            }
        ));
    }

    #[test]
    fn selectors_and_service_accounts() {
        let other = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: for-db, namespace: apps}\n\
            spec: {selector: {matchLabels: {app: db}}, action: ALLOW, rules: [{from: [{serviceAccounts: [apps/client]}]}]}\n";
        let s = state(other);
        assert!(
            verdict(&s, 8080, Some(&id("apps", "anyone"))),
            "the policy selects another workload"
        );
        let sa = other.replace("app: db", "app: server");
        let s = state(&sa);
        assert!(verdict(&s, 1, Some(&id("apps", "client"))));
        assert!(!verdict(&s, 1, Some(&id("apps", "other"))));
    }

    #[tokio::test]
    async fn a_tunnel_is_revoked_when_a_policy_stops_allowing_it() {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(state("")));
        let dest = ObjectKey::new("apps", "server");
        let revoked = |peer| {
            let rx = rx.clone();
            let dest = dest.clone();
            tokio::spawn(async move { revoked(rx, dest, facts(8080, Some(peer))).await })
        };
        let client = revoked(id("apps", "client"));
        let other = revoked(id("apps", "other"));
        tokio::task::yield_now().await;
        assert!(!client.is_finished() && !other.is_finished());
        // A change that keeps both allowed revokes nothing; the ALLOW policy revokes
        // the tunnel it does not allow, at once.
        tx.send_replace(std::sync::Arc::new(state("")));
        tokio::task::yield_now().await;
        assert!(!other.is_finished());
        tx.send_replace(std::sync::Arc::new(state(ALLOW_CLIENT)));
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), other)
            .await
            .unwrap()
            .unwrap();
        assert!(why.detail.contains("none matched"), "{why:?}");
        tokio::task::yield_now().await;
        assert!(!client.is_finished(), "the allowed tunnel stays");
        // A pod gone from the state: its tunnels are left alone.
        let gone = revoked(id("apps", "other"));
        tx.send_replace(std::sync::Arc::new(ClusterState::from_objects(
            parse_manifest(ALLOW_CLIENT).unwrap(),
        )));
        tokio::task::yield_now().await;
        assert!(!gone.is_finished());
        client.abort();
        gone.abort();
    }

    #[tokio::test]
    async fn a_relayed_tunnel_is_revoked_when_a_request_authentication_selects_its_pod() {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(state("")));
        let conn = facts(8080, Some(id("apps", "client")));
        let relayed = tokio::spawn(revoked(rx, ObjectKey::new("apps", "server"), conn));
        tokio::task::yield_now().await;
        assert!(!relayed.is_finished());
        // Its requests' tokens could not be checked on a byte stream: made again, the
        // connection is served as HTTP.
        let jwt = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: apps}\n\
            spec: {selector: {matchLabels: {app: server}}, jwtRules: [{issuer: iss, jwksUri: 'http://keys.apps/jwks'}]}\n";
        tx.send_replace(std::sync::Arc::new(state(jwt)));
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), relayed)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(why.reason, RefusalReason::PolicyDenied);
        assert_eq!(
            why.policy.as_deref(),
            Some("RequestAuthentication apps/jwt")
        );
    }

    #[tokio::test]
    async fn plaintext_is_revoked_when_its_port_turns_strict_and_only_then() {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(state("")));
        let dest = ObjectKey::new("apps", "server");
        let watch = |port| {
            let (rx, dest) = (rx.clone(), dest.clone());
            tokio::spawn(async move { revoked(rx, dest, facts(port, None)).await })
        };
        let (web, admin) = (watch(8080), watch(9090));
        tokio::task::yield_now().await;
        assert!(!web.is_finished() && !admin.is_finished());
        let strict_but_9090 = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: server, namespace: apps}\n\
            spec: {selector: {matchLabels: {app: server}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}\n";
        tx.send_replace(std::sync::Arc::new(state(strict_but_9090)));
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), web)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(why.reason, RefusalReason::StrictMtlsPlaintext);
        assert_eq!(why.counted_as(), "strict_mtls_revoked");
        assert_eq!(why.policy.as_deref(), Some("apps/server"));
        assert!(why.detail.contains("STRICT"), "{why:?}");
        tokio::task::yield_now().await;
        assert!(!admin.is_finished(), "the DISABLE port keeps its plaintext");
        admin.abort();
    }
}
