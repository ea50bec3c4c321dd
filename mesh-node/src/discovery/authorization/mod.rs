//! Nodemesh's one authorization policy model: Istio's `AuthorizationPolicy`
//! (`discovery::authorization_policy`) and Nodemesh's own L4 kind
//! (`discovery::policy`, translated) compiled into typed matchers — strings in Istio's
//! exact / `prefix*` / `*suffix` / `*` forms, CIDRs, ports and a typed enum of `when`
//! keys — kept together in one index ([`AuthzIndex`], `ClusterState::authorization`)
//! under keys that tell the two kinds apart.
//!
//! Whatever cannot be compiled is a problem reported by name and field
//! (`discovery::problems`) and fails closed: a `CUSTOM` policy (or an unknown action)
//! denies every request to the workloads it selects; an ALLOW or AUDIT rule that cannot
//! be compiled matches nothing; a DENY rule that cannot be compiled matches everything.
//! `identity::authz` decides with it.

mod compile;
mod nodemesh;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

pub use compile::compile_istio;
pub use nodemesh::translate;

use crate::{
    discovery::authorization_policy::AuthorizationPolicy as IstioPolicy,
    discovery::policy::AuthorizationPolicy as NodemeshPolicy, discovery::problem::Problem,
    keys::ObjectKey,
};

/// Which kind a policy was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// `security.istio.io` AuthorizationPolicy.
    Istio,
    /// `security.nodemesh.io` AuthorizationPolicy.
    Nodemesh,
}

impl PolicyKind {
    pub fn api_group(self) -> &'static str {
        match self {
            PolicyKind::Istio => "security.istio.io",
            PolicyKind::Nodemesh => "security.nodemesh.io",
        }
    }
}

/// A policy's key: an Istio and a Nodemesh policy of the same name are two policies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    pub key: ObjectKey,
}

impl fmt::Display for PolicyId {
    /// `<ns>/<name>`, as decisions and metrics name policies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.key.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// External authorization: not supported; the workloads it selects are denied.
    Custom {
        provider: Option<String>,
    },
    /// An action Istio does not have: denies like CUSTOM (fail closed).
    Unknown {
        written: String,
    },
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom { .. } => "CUSTOM",
            Action::Unknown { written } => written,
        }
    }

    /// CUSTOM and unknown actions deny every request to the workloads they select.
    pub fn denies_all(&self) -> bool {
        matches!(self, Action::Custom { .. } | Action::Unknown { .. })
    }
}

/// Which pods a policy applies to (besides its namespace, or the whole mesh in the
/// root namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Pods carrying all these labels; empty: every pod.
    Labels(BTreeMap<String, String>),
    /// The pods these Services (of the policy's namespace) select.
    Services(Vec<ObjectKey>),
}

/// An Istio string match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    /// `abc*`
    Prefix(String),
    /// `*abc`
    Suffix(String),
    /// `*`: any value, but there must be one.
    Present,
}

impl StringMatch {
    pub fn parse(text: &str) -> StringMatch {
        if text == "*" {
            StringMatch::Present
        } else if let Some(suffix) = text.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = text.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(text.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Present => true,
        }
    }

    fn lowercase(self) -> StringMatch {
        match self {
            StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
            StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
            StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
            StringMatch::Present => StringMatch::Present,
        }
    }
}

/// An address block (`10.0.0.0/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: Ipv6Addr,
    /// Out of 128 (IPv4 is held IPv4-mapped).
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR")]
pub struct BadCidr(String);

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped()),
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(text.to_string());
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let ip = IpAddr::from_str(addr).map_err(|_| bad())?;
        let (max, offset) = if ip.is_ipv4() { (32, 96) } else { (128, 0) };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(bad());
        }
        let prefix = len + offset;
        let mask = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
        let network = Ipv6Addr::from(u128::from(mapped(ip)) & mask);
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = u128::MAX
            .checked_shl(u32::from(128 - self.prefix))
            .unwrap_or(0);
        u128::from(mapped(ip)) & mask == u128::from(self.network)
    }
}

/// A list field and its `not…` twin: any of `any_of` (none set: anything), none of
/// `none_of`. A value that is absent (plaintext has no principal) matches no pattern:
/// it fails `any_of` and passes `none_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    pub any_of: Vec<T>,
    pub none_of: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            any_of: Vec::new(),
            none_of: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    pub fn is_set(&self) -> bool {
        !self.any_of.is_empty() || !self.none_of.is_empty()
    }

    /// Whether the field holds, `matches` telling whether the value matches a pattern.
    pub fn holds(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&matches))
            && !self.none_of.iter().any(matches)
    }
}

/// `from.source`: every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// Against `<trust domain>/ns/<ns>/sa/<sa>`.
    pub principals: Field<StringMatch>,
    /// Against `<iss>/<sub>` of a valid JWT.
    pub request_principals: Field<StringMatch>,
    pub namespaces: Field<StringMatch>,
    pub ip_blocks: Field<Cidr>,
    pub remote_ip_blocks: Field<Cidr>,
}

/// `to.operation`: every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    /// Lowercased: compared with the lowercased host.
    pub hosts: Field<StringMatch>,
    pub ports: Field<u16>,
    pub methods: Field<StringMatch>,
    pub paths: Field<StringMatch>,
}

/// The `when` keys Nodemesh implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhenKey {
    RequestHeader(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// `request.auth.claims[a][b]…`: the path into the JWT payload.
    RequestClaim(Vec<String>),
    DestinationIp,
    DestinationPort,
}

impl WhenKey {
    /// Whether only an HTTP request has it.
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            WhenKey::RequestHeader(_)
                | WhenKey::RequestPrincipal
                | WhenKey::RequestAudiences
                | WhenKey::RequestPresenter
                | WhenKey::RequestClaim(_)
        )
    }
}

/// A condition's values, typed by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    Text(Field<StringMatch>),
    Ips(Field<Cidr>),
    Ports(Field<u16>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: WhenKey,
    pub values: Values,
}

/// A rule as compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Match(RuleBody),
    /// Could not be compiled (reported): in a DENY policy it matches everything, in
    /// any other nothing.
    Broken,
}

/// `from` (any), `to` (any) and `when` (all): an empty list matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleBody {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Operation {
    pub fn is_http(&self) -> bool {
        self.hosts.is_set() || self.methods.is_set() || self.paths.is_set()
    }
}

impl RuleBody {
    /// Whether the rule has HTTP attributes that could apply to connections to `port`
    /// (Istio's `to` ports decide which ports a rule covers).
    pub fn is_http_on(&self, port: u16) -> bool {
        let on_port = |op: &Operation| op.ports.holds(|p| *p == port);
        let outside_to = self.from.iter().any(|s| s.request_principals.is_set())
            || self.when.iter().any(|c| c.key.is_http());
        let to_covers = self.to.is_empty() || self.to.iter().any(on_port);
        (outside_to && to_covers) || self.to.iter().any(|op| op.is_http() && on_port(op))
    }
}

/// One policy of either kind, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub id: PolicyId,
    pub action: Action,
    /// Which pods of its namespace it applies to (any of these); none: no pod.
    pub targets: Vec<Target>,
    pub rules: Vec<Rule>,
    /// What could not be compiled, by field.
    pub problems: Vec<Problem>,
}

impl CompiledPolicy {
    /// Whether any rule has HTTP attributes that could apply to `port`.
    pub fn is_http_on(&self, port: u16) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r, Rule::Match(body) if body.is_http_on(port)))
    }

    /// Whether any rule has HTTP attributes at all.
    pub fn is_http(&self) -> bool {
        self.rules.iter().any(|r| match r {
            Rule::Match(b) => {
                b.to.iter().any(Operation::is_http)
                    || b.from.iter().any(|s| s.request_principals.is_set())
                    || b.when.iter().any(|c| c.key.is_http())
            }
            Rule::Broken => false,
        })
    }
}

/// Every AuthorizationPolicy of both kinds, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzIndex {
    pub policies: BTreeMap<PolicyId, Arc<CompiledPolicy>>,
}

impl AuthzIndex {
    /// Compiles every policy (they are few; a change recompiles them all).
    pub fn build<'a>(
        istio: impl Iterator<Item = (&'a ObjectKey, &'a IstioPolicy)>,
        nodemesh: impl Iterator<Item = (&'a ObjectKey, &'a NodemeshPolicy)>,
    ) -> AuthzIndex {
        let istio = istio.map(|(k, p)| compile_istio(k, p));
        let nodemesh = nodemesh.map(|(k, p)| translate(k, p));
        AuthzIndex {
            policies: istio
                .chain(nodemesh)
                .map(|p| (p.id.clone(), Arc::new(p)))
                .collect(),
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
