//! The effective mutual-TLS mode of each pod and port: Istio's PeerAuthentication
//! (`discovery::peer_authentication`) checked and indexed, with Istio's inheritance —
//! workload > namespace > mesh (a namespace-wide policy in the root namespace), `UNSET`
//! inheriting from the level above, `portLevelMtls` (policies with a selector only)
//! over the workload's mode — and the `nodemesh.io/mtls` namespace label as a shorthand.
//!
//! Precedence, most specific first: the workload's port-level mode, the workload
//! policy's mode, the namespace-wide policy's mode, the namespace label (only when the
//! namespace has no namespace-wide PeerAuthentication in force), the mesh-wide policy's
//! mode, and else PERMISSIVE. Several policies at one level (namespace-wide in one
//! namespace, or workload policies selecting one pod): the oldest wins (then by name),
//! as in Istio; those with nothing left to decide are reported as shadowed.
//!
//! `DISABLE` accepts plaintext like `PERMISSIVE`, and mutual TLS from meshed clients
//! too: a meshed client always uses HBONE (as ztunnel treats DISABLE, an alias of
//! PERMISSIVE), so no traffic between meshed pods ever leaves mutual TLS.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    discovery::peer_authentication::PeerAuthentication, discovery::problem::Problem,
    discovery::problem::ProblemReason, keys::ObjectKey, keys::PodKey,
};

/// Namespace label, a shorthand for a namespace-wide policy: `strict` refuses
/// plaintext (except kubelet probes, which bypass capture), `permissive` accepts it;
/// a namespace-wide PeerAuthentication in force wins over it.
pub const MTLS_LABEL: &str = "nodemesh.io/mtls";

/// Istio's root namespace in Nodemesh: where a PeerAuthentication without a selector
/// applies to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "nodemesh-system";

/// The mesh's root namespace (`--root-namespace`): a namespace-wide PeerAuthentication
/// there is the mesh-wide one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RootNamespace(String);

impl Default for RootNamespace {
    fn default() -> Self {
        RootNamespace(DEFAULT_ROOT_NAMESPACE.to_string())
    }
}

impl RootNamespace {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RootNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a namespace name: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit")]
pub struct BadNamespaceName(String);

impl FromStr for RootNamespace {
    type Err = BadNamespaceName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars().all(ok_char)
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(RootNamespace(s.to_string()))
        } else {
            Err(BadNamespaceName(s.to_string()))
        }
    }
}

/// How a pod's port takes plaintext. (UNSET is never effective: it inherits.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Plaintext is refused; only mutual TLS (HBONE) gets in.
    Strict,
    /// Plaintext is accepted beside mutual TLS.
    Permissive,
    /// Plaintext is accepted; meshed clients still use mutual TLS (as in ztunnel).
    Disable,
}

impl MtlsMode {
    pub fn name(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }

    /// Whether plaintext (captured on 15006) is refused.
    pub fn refuses_plaintext(self) -> bool {
        self == MtlsMode::Strict
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What decided a mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum MtlsSource {
    /// Nothing sets a mode: PERMISSIVE.
    Default,
    /// The namespace-wide PeerAuthentication of the root namespace.
    Mesh { policy: ObjectKey },
    /// The namespace-wide PeerAuthentication of the pod's namespace.
    Namespace { policy: ObjectKey },
    /// The pod's namespace's `nodemesh.io/mtls` label.
    NamespaceLabel { namespace: String },
    /// A PeerAuthentication selecting the pod, by its `mtls.mode`.
    Workload { policy: ObjectKey },
    /// A PeerAuthentication selecting the pod, by its `portLevelMtls` for `port`.
    Port { policy: ObjectKey, port: u16 },
}

impl MtlsSource {
    /// The deciding PeerAuthentication, if a policy decided.
    pub fn policy(&self) -> Option<&ObjectKey> {
        match self {
            MtlsSource::Mesh { policy }
            | MtlsSource::Namespace { policy }
            | MtlsSource::Workload { policy }
            | MtlsSource::Port { policy, .. } => Some(policy),
            MtlsSource::Default | MtlsSource::NamespaceLabel { .. } => None,
        }
    }
}

impl fmt::Display for MtlsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MtlsSource::Default => f.write_str("no PeerAuthentication or label (default)"),
            MtlsSource::Mesh { policy } => write!(f, "PeerAuthentication {policy} (mesh-wide)"),
            MtlsSource::Namespace { policy } => {
                write!(f, "PeerAuthentication {policy} (namespace-wide)")
            }
            MtlsSource::NamespaceLabel { namespace } => {
                write!(f, "label {MTLS_LABEL} of namespace {namespace}")
            }
            MtlsSource::Workload { policy } => write!(f, "PeerAuthentication {policy} (workload)"),
            MtlsSource::Port { policy, port } => {
                write!(f, "PeerAuthentication {policy} (portLevelMtls {port})")
            }
        }
    }
}

/// The mode in force for a pod's port, and what decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    pub source: MtlsSource,
}

/// A pod's modes: for every port, and for the ports its workload policy names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMtls {
    /// Every port without a port-level mode of its own.
    pub default: EffectiveMtls,
    /// Ports the workload policy in force gives a mode (UNSET ports inherit: absent).
    pub ports: BTreeMap<u16, EffectiveMtls>,
    /// Younger workload policies that select the pod too, not used for it.
    pub overridden: Vec<ObjectKey>,
}

/// One PeerAuthentication checked: what it sets, whether it is in force, its problems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPeerAuth {
    /// Creation time (seconds since the epoch): the oldest wins a level.
    pub created: Option<i64>,
    /// The labels it selects pods by; None: namespace-wide (mesh-wide in the root).
    pub selector: Option<BTreeMap<String, String>>,
    /// `mtls.mode`; None: UNSET (inherits).
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls` modes by workload port (UNSET ports left out: they inherit).
    pub ports: BTreeMap<u16, MtlsMode>,
    /// False: ignored (a selector in the root namespace) or shadowed by an older one.
    pub in_force: bool,
    pub problems: Vec<Problem>,
}

impl CompiledPeerAuth {
    pub fn selects(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.selector.as_ref().is_some_and(|s| {
            s.iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
    }
}

fn problem(field: &str, reason: ProblemReason, detail: String) -> Problem {
    Problem {
        field: field.into(),
        reason,
        detail,
    }
}

/// A mode as written: Ok(None) is UNSET. An unknown value counts as STRICT (fail
/// closed: a typo must not open a workload to plaintext) and is reported.
fn written_mode(text: Option<&str>, field: &str, problems: &mut Vec<Problem>) -> Option<MtlsMode> {
    match text {
        None | Some("UNSET") => None,
        Some("STRICT") => Some(MtlsMode::Strict),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("DISABLE") => Some(MtlsMode::Disable),
        Some(other) => {
            problems.push(problem(
                field,
                ProblemReason::UnknownValue,
                format!("`{other}` is not STRICT, PERMISSIVE, DISABLE or UNSET: it counts as STRICT (fail closed) until it is fixed"),
            ));
            Some(MtlsMode::Strict)
        }
    }
}

/// Checks one PeerAuthentication (before precedence is decided).
pub fn compile(key: &ObjectKey, pa: &PeerAuthentication, root: &RootNamespace) -> CompiledPeerAuth {
    let mut problems = Vec::new();
    let spec = &pa.spec;
    // An empty selector selects nothing in particular: namespace-wide, as in Istio.
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let mode = written_mode(
        spec.mtls.as_ref().and_then(|m| m.mode.as_deref()),
        "mtls.mode",
        &mut problems,
    );
    let mut ports = BTreeMap::new();
    for (port, setting) in &spec.port_level_mtls {
        let field = format!("portLevelMtls.{port}");
        let mode = written_mode(setting.mode.as_deref(), &field, &mut problems);
        if selector.is_none() {
            continue;
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {
                if let Some(mode) = mode {
                    ports.insert(p, mode);
                }
            }
            _ => problems.push(problem(
                &field,
                ProblemReason::BadValue,
                format!("`{port}` is not a port number (1-65535): this port setting is left out"),
            )),
        }
    }
    if selector.is_none() && !spec.port_level_mtls.is_empty() {
        problems.push(problem(
            "portLevelMtls",
            ProblemReason::InvalidField,
            "portLevelMtls applies only to a policy with a selector (as in Istio): it is left out; select the workload to set modes by port".into(),
        ));
    }
    let mut in_force = true;
    if selector.is_some() && key.namespace == root.as_str() {
        in_force = false;
        problems.push(problem(
            "selector",
            ProblemReason::BadValue,
            format!("a policy with a selector in the root namespace {root} is ignored (as in Istio): move it to the workload's namespace, or drop the selector to make it mesh-wide"),
        ));
    }
    CompiledPeerAuth {
        created: pa
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        selector,
        mode,
        ports,
        in_force,
        problems,
    }
}

/// Every PeerAuthentication checked, and which are in force at each level.
#[derive(Debug, Clone, Default)]
pub struct PeerAuthIndex {
    root: RootNamespace,
    /// Every policy, checked, by key.
    pub compiled: BTreeMap<ObjectKey, CompiledPeerAuth>,
    /// The namespace-wide policy in force, by namespace.
    namespace_wide: HashMap<String, ObjectKey>,
    /// Workload policies in force, by namespace, oldest first.
    workload: HashMap<String, Vec<ObjectKey>>,
}

impl PeerAuthIndex {
    pub fn build(
        root: &RootNamespace,
        policies: &BTreeMap<ObjectKey, Arc<PeerAuthentication>>,
    ) -> PeerAuthIndex {
        let mut compiled: BTreeMap<ObjectKey, CompiledPeerAuth> = policies
            .iter()
            .map(|(k, pa)| (k.clone(), compile(k, pa, root)))
            .collect();
        // Oldest first (no timestamp, as in manifest files, counts as oldest), then by
        // namespace/name.
        let mut order: Vec<(Option<i64>, ObjectKey)> = compiled
            .iter()
            .filter(|(_, c)| c.in_force)
            .map(|(k, c)| (c.created, k.clone()))
            .collect();
        order.sort();
        let mut namespace_wide: HashMap<String, ObjectKey> = HashMap::new();
        let mut workload: HashMap<String, Vec<ObjectKey>> = HashMap::new();
        let mut shadowed: Vec<(ObjectKey, ObjectKey)> = Vec::new();
        for (_, key) in order {
            let Some(c) = compiled.get(&key) else {
                continue;
            };
            match &c.selector {
                None => match namespace_wide.get(&key.namespace) {
                    Some(winner) => shadowed.push((key, winner.clone())),
                    None => {
                        namespace_wide.insert(key.namespace.clone(), key);
                    }
                },
                Some(selector) => {
                    let same = workload.get(&key.namespace).and_then(|older| {
                        older
                            .iter()
                            .find(|o| {
                                compiled.get(*o).and_then(|o| o.selector.as_ref()) == Some(selector)
                            })
                            .cloned()
                    });
                    match same {
                        Some(winner) => shadowed.push((key, winner)),
                        None => workload.entry(key.namespace.clone()).or_default().push(key),
                    }
                }
            }
        }
        for (key, winner) in shadowed {
            if let Some(c) = compiled.get_mut(&key) {
                c.in_force = false;
                c.problems.push(problem(
                    "selector",
                    ProblemReason::Shadowed,
                    format!("PeerAuthentication {winner} is older and applies to the same workloads; this one is not used: merge them"),
                ));
            }
        }
        PeerAuthIndex {
            root: root.clone(),
            compiled,
            namespace_wide,
            workload,
        }
    }

    pub fn root(&self) -> &RootNamespace {
        &self.root
    }

    fn namespace_policy(&self, namespace: &str) -> Option<(&ObjectKey, &CompiledPeerAuth)> {
        let key = self.namespace_wide.get(namespace)?;
        self.compiled.get_key_value(key)
    }

    /// The workload policies in force in `namespace` that select a pod with `labels`,
    /// oldest first.
    pub fn selecting<'a>(
        &'a self,
        namespace: &str,
        labels: Option<&'a BTreeMap<String, String>>,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a CompiledPeerAuth)> + 'a {
        self.workload
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|k| self.compiled.get_key_value(k))
            .filter(move |(_, c)| c.selects(labels))
    }
}

/// The namespace label's mode: `strict` or `permissive` (other values set nothing).
fn label_mode(label: Option<&str>) -> Option<MtlsMode> {
    match label? {
        "strict" => Some(MtlsMode::Strict),
        "permissive" => Some(MtlsMode::Permissive),
        _ => None,
    }
}

impl PeerAuthIndex {
    /// The mode of a pod of `namespace` that no workload policy selects: namespace-wide
    /// policy, else the namespace's `label` (when no namespace-wide policy is in
    /// force), else the mesh-wide policy, else PERMISSIVE.
    pub fn namespace_mode(&self, namespace: &str, label: Option<&str>) -> EffectiveMtls {
        let root = self.root.as_str();
        match self.namespace_policy(namespace).map(|(k, c)| (k, c.mode)) {
            Some((key, Some(mode))) => {
                let policy = key.clone();
                let source = if namespace == root {
                    MtlsSource::Mesh { policy }
                } else {
                    MtlsSource::Namespace { policy }
                };
                return EffectiveMtls { mode, source };
            }
            // UNSET: inherits from the mesh; the label does not count.
            Some((_, None)) => {}
            None => {
                if let Some(mode) = label_mode(label) {
                    let namespace = namespace.to_string();
                    let source = MtlsSource::NamespaceLabel { namespace };
                    return EffectiveMtls { mode, source };
                }
            }
        }
        match self.namespace_policy(root).map(|(k, c)| (k, c.mode)) {
            Some((key, Some(mode))) if namespace != root => EffectiveMtls {
                mode,
                source: MtlsSource::Mesh {
                    policy: key.clone(),
                },
            },
            _ => EffectiveMtls {
                mode: MtlsMode::Permissive,
                source: MtlsSource::Default,
            },
        }
    }

    /// Every mode of the pod `pod` with `labels`, whose namespace carries `label`: for
    /// its ports in general, and for each port its workload policy names.
    pub fn workload_modes(
        &self,
        pod: &PodKey,
        labels: Option<&BTreeMap<String, String>>,
        label: Option<&str>,
    ) -> WorkloadMtls {
        let mut selecting = self.selecting(&pod.namespace, labels);
        let workload = selecting.next();
        let overridden = selecting.map(|(k, _)| k.clone()).collect();
        let default = match workload.map(|(k, c)| (k, c.mode)) {
            Some((key, Some(mode))) => EffectiveMtls {
                mode,
                source: MtlsSource::Workload {
                    policy: key.clone(),
                },
            },
            _ => self.namespace_mode(&pod.namespace, label),
        };
        let ports = workload
            .map(|(key, c)| {
                c.ports
                    .iter()
                    .map(|(port, mode)| {
                        let source = MtlsSource::Port {
                            policy: key.clone(),
                            port: *port,
                        };
                        (
                            *port,
                            EffectiveMtls {
                                mode: *mode,
                                source,
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        WorkloadMtls {
            default,
            ports,
            overridden,
        }
    }
}

#[cfg(test)]
#[path = "mtls_tests.rs"]
mod tests;
