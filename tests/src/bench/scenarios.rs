//! What is measured: the scenarios (one way each of getting bytes from a client pod on
//! node a to a server pod on node b) and the test bed that offers them all at once.
//!
//! Adding a scenario is one enum variant plus its entry in [`Bed::target`] (and
//! [`Bed::proxy_pids`] if it runs proxies): e.g. `NodemeshL7` would send the client
//! to a Service whose HTTPRoute picks the server.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Result};

use super::{
    peers::{self, PeerPair},
    servers,
};
use crate::sim::{host::sysctl_in, ClusterSpec, Process, ServiceSpec, SimCluster};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// No mesh: an unenrolled pod talks to an unenrolled pod (the physical limit).
    Direct,
    /// Enrolled pods: both node agents proxy, HBONE mTLS between them.
    NodemeshL4,
    /// The same pods, through a Service whose HTTPRoute node a's proxy applies per
    /// request (HTTP measurements only: the Service speaks HTTP).
    NodemeshL7,
    /// Enrolled pods, L4 on the source side, to a server an AuthorizationPolicy with
    /// methods and paths selects: node b's agent judges each request (HTTP only).
    NodemeshL7Authz,
    /// As NodemeshL7Authz, to a server that also requires a JSON Web Token
    /// (RequestAuthentication): node b verifies each request's ES256 token.
    NodemeshL7Jwt,
    /// An stunnel pair in the node namespaces: TLS 1.3, client certificate, verified.
    Stunnel,
    /// An haproxy pair in the node namespaces, configured like the stunnel pair.
    Haproxy,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Direct,
        Scenario::NodemeshL4,
        Scenario::NodemeshL7,
        Scenario::NodemeshL7Authz,
        Scenario::NodemeshL7Jwt,
        Scenario::Stunnel,
        Scenario::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::NodemeshL4 => "nodemesh-l4",
            Scenario::NodemeshL7 => "nodemesh-l7",
            Scenario::NodemeshL7Authz => "nodemesh-l7-authz",
            Scenario::NodemeshL7Jwt => "nodemesh-l7-jwt",
            Scenario::Stunnel => "stunnel",
            Scenario::Haproxy => "haproxy",
        }
    }

    pub fn by_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::Direct => "no mesh: unenrolled pod to unenrolled pod",
            Scenario::NodemeshL4 => {
                "enrolled pods; node agents on both sides, HBONE (HTTP/2 CONNECT over mTLS)"
            }
            Scenario::NodemeshL7 => {
                "as nodemesh-l4, through an HTTPRoute routed per request on node a (HTTP only)"
            }
            Scenario::NodemeshL7Authz => {
                "as nodemesh-l4, to a server whose AuthorizationPolicy (methods, paths) node b judges per request (HTTP only)"
            }
            Scenario::NodemeshL7Jwt => {
                "as nodemesh-l7-authz, the policy also requiring a JWT (ES256) that node b verifies per request (HTTP only)"
            }
            Scenario::Stunnel => {
                "stunnel4 pair in the node namespaces, TLS 1.3, ECDSA P-256 client certificate"
            }
            Scenario::Haproxy => {
                "haproxy pair in the node namespaces (TCP mode), TLS 1.3, ECDSA P-256 client certificate"
            }
        }
    }

    /// A third-party proxy doing the same job (what "best peer" compares with).
    pub fn is_peer(self) -> bool {
        matches!(self, Scenario::Stunnel | Scenario::Haproxy)
    }

    /// Only the HTTP figures apply (the route's Service speaks HTTP, not iperf/echo).
    pub fn http_only(self) -> bool {
        matches!(
            self,
            Scenario::NodemeshL7 | Scenario::NodemeshL7Authz | Scenario::NodemeshL7Jwt
        )
    }

    /// The pod the client programs run in (node a).
    pub fn client_pod(self) -> &'static str {
        match self {
            Scenario::NodemeshL4
            | Scenario::NodemeshL7
            | Scenario::NodemeshL7Authz
            | Scenario::NodemeshL7Jwt => "client",
            _ => "bystander",
        }
    }
}

/// The server programs each server pod runs, one port each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    Iperf,
    Echo,
    Http,
}

impl App {
    pub const ALL: [App; 3] = [App::Iperf, App::Echo, App::Http];

    pub fn port(self) -> u16 {
        match self {
            App::Iperf => 5201,
            App::Echo => 8080,
            App::Http => 8081,
        }
    }
}

/// The Service of the nodemesh-l7 scenario and the HTTPRoute that makes it L7.
const HTTP_SERVICE: &str = "bench-http";
const HTTP_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
    metadata: {name: bench-http, namespace: apps}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: bench-http, port: 80}]\n\
    \x20 rules:\n  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: bench-http, port: 80}]\n";

/// The server of the nodemesh-l7-authz scenario and the policy that makes node b judge
/// each request to it (what a typical one checks: principal, methods, paths).
const GUARDED: &str = "guarded";
const GUARDED_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: guarded, namespace: apps}\nspec:\n  selector: {matchLabels: {app: guarded}}\n\
    \x20 rules:\n  - from: [{source: {principals: [\"cluster.local/ns/apps/sa/client\"]}}]\n\
    \x20   to: [{operation: {methods: [GET, HEAD], paths: [\"/*\"]}}]\n";

/// The server of the nodemesh-l7-jwt scenario: the same policy plus a required token.
const BEARER: &str = "bearer";
const BEARER_ISSUER: &str = "https://issuer.bench.nodemesh.test";

/// A signing key, the RequestAuthentication and policy trusting it, and a token it
/// signed (valid for a day).
fn bearer_policy_and_token() -> Result<(String, String)> {
    use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let key = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
    jwk.common.key_id = Some("bench".into());
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({"iss": BEARER_ISSUER, "sub": "client", "aud": "bench",
        "iat": now, "exp": now + 86_400});
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    let token = jsonwebtoken::encode(&header, &claims, &key)?;
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {{name: {BEARER}, namespace: apps}}\nspec:\n  selector: {{matchLabels: {{app: {BEARER}}}}}\n\
         \x20 jwtRules:\n  - issuer: \"{BEARER_ISSUER}\"\n    audiences: [bench]\n    jwks: '{jwks}'\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {BEARER}, namespace: apps}}\nspec:\n  selector: {{matchLabels: {{app: {BEARER}}}}}\n\
         \x20 rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/apps/sa/client\"], requestPrincipals: [\"{BEARER_ISSUER}/client\"]}}}}]\n\
         \x20   to: [{{operation: {{methods: [GET, HEAD], paths: [\"/*\"]}}}}]\n"
    );
    Ok((policy, token))
}

/// The simulated cluster with every server and peer proxy running.
pub struct Bed {
    pub cluster: SimCluster,
    /// The token nodemesh-l7-jwt's client sends.
    bearer_token: String,
    _servers: Vec<Process>,
    stunnel: PeerPair,
    haproxy: PeerPair,
}

impl Bed {
    /// Two nodes with mTLS; servers in `server` (enrolled) and `outsider` (not), the
    /// peer proxies on the nodes in front of `outsider`.
    pub fn start(work_dir: &std::path::Path) -> Result<Bed> {
        let mut spec = ClusterSpec::two_nodes();
        spec.services = vec![ServiceSpec::new(
            HTTP_SERVICE,
            "apps",
            80,
            App::Http.port(),
            &["server"],
        )];
        spec.pods
            .push(crate::sim::PodSpec::new(GUARDED, "apps", "b"));
        spec.pods
            .push(crate::sim::PodSpec::new(BEARER, "apps", "b"));
        // The memory-per-connection figure holds 10,000 connections from one pod to
        // one pod: above the default budget of 4,096 per pod and direction.
        spec.agent_args
            .extend(["--max-connections-per-pod".to_string(), "16384".to_string()]);
        let cluster = SimCluster::create(spec)?;
        cluster.write_manifest("bench-httproute.yaml", HTTP_ROUTE)?;
        cluster.write_manifest("bench-authz.yaml", GUARDED_POLICY)?;
        let (bearer_policy, bearer_token) = bearer_policy_and_token()?;
        cluster.write_manifest("bench-jwt.yaml", &bearer_policy)?;
        // Thousands of short connections per run leave TIME_WAIT sockets behind; Linux
        // reuses their ports only for loopback by default (which the mesh's client,
        // connecting to 15001, gets): give every scenario the same reuse.
        for netns in cluster
            .nodes
            .iter()
            .map(|n| &n.netns)
            .chain(cluster.pods.iter().map(|p| &p.netns))
        {
            sysctl_in(netns, "/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        }
        cluster.start_agents()?;
        let mut servers = Vec::new();
        for pod in ["server", "outsider"] {
            servers.push(cluster.serve(pod, App::Echo.port())?);
            servers.push(servers::iperf(&cluster, pod, App::Iperf.port())?);
            servers.push(servers::http(&cluster, pod, App::Http.port())?);
        }
        servers.push(servers::http(&cluster, GUARDED, App::Http.port())?);
        servers.push(servers::http(&cluster, BEARER, App::Http.port())?);
        // The policies are in force before anything is measured (until then every
        // request to those pods passes at L4 and would measure nothing of L7).
        let status = |pod: &str, extra: &[&str]| {
            let dst = cluster.pod(pod).addr4(App::Http.port());
            cluster
                .http("client", dst, pod, "/", extra)
                .ok()
                .and_then(|r| r.statuses.keys().next().copied())
        };
        let bearer_header = format!("authorization: Bearer {bearer_token}");
        let applied = cluster.eventually(Duration::from_secs(20), || {
            status(GUARDED, &["--method", "DELETE"]) == Some(403)
                && status(BEARER, &[]) == Some(403)
                && status(BEARER, &["-H", &bearer_header]) == Some(200)
        });
        if applied.is_none() {
            bail!(
                "the bench's AuthorizationPolicy and RequestAuthentication never applied on node b"
            );
        }
        let certs = peers::Certs::generate(&work_dir.join("peer-certs"), &cluster)?;
        let stunnel = peers::start_stunnel(&cluster, &certs, 20000)?;
        let haproxy = peers::start_haproxy(&cluster, &certs, 22000)?;
        Ok(Bed {
            cluster,
            bearer_token,
            _servers: servers,
            stunnel,
            haproxy,
        })
    }

    /// Where the scenario's client connects to reach `app` on the server.
    pub fn target(&self, scenario: Scenario, app: App) -> SocketAddr {
        match scenario {
            Scenario::Direct => self.cluster.pod("outsider").addr4(app.port()),
            Scenario::NodemeshL4 => self.cluster.pod("server").addr4(app.port()),
            Scenario::NodemeshL7 => self.cluster.service(HTTP_SERVICE).addr4(),
            Scenario::NodemeshL7Authz => self.cluster.pod(GUARDED).addr4(app.port()),
            Scenario::NodemeshL7Jwt => self.cluster.pod(BEARER).addr4(app.port()),
            Scenario::Stunnel => self.stunnel.entry(app),
            Scenario::Haproxy => self.haproxy.entry(app),
        }
    }

    /// The headers every HTTP request of the scenario carries (`name: value`).
    pub fn http_headers(&self, scenario: Scenario) -> Vec<String> {
        match scenario {
            Scenario::NodemeshL7Jwt => vec![format!("authorization: Bearer {}", self.bearer_token)],
            _ => Vec::new(),
        }
    }

    /// The proxy processes carrying the scenario's traffic, node a's first.
    pub fn proxy_pids(&self, scenario: Scenario) -> Vec<u32> {
        match scenario {
            Scenario::Direct => Vec::new(),
            Scenario::NodemeshL4
            | Scenario::NodemeshL7
            | Scenario::NodemeshL7Authz
            | Scenario::NodemeshL7Jwt => ["a", "b"]
                .iter()
                .filter_map(|n| self.cluster.agent_pid(n))
                .collect(),
            Scenario::Stunnel => self.stunnel.pids(),
            Scenario::Haproxy => self.haproxy.pids(),
        }
    }
}
