//! Telemetry resources (`discovery::telemetry`) checked and resolved per pod, with
//! Istio's precedence: a resource in the root namespace without a selector sets the
//! mesh's telemetry, one without a selector in a namespace overrides it for that
//! namespace, one whose selector matches a pod overrides both for that pod. Each level
//! overrides the broader one field by field (a workload that only sets the sampling
//! keeps its namespace's providers). Where several resources claim one level, the
//! oldest applies (then by name) and the others are reported as shadowed.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use http::HeaderName;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{
    discovery::mtls::RootNamespace,
    discovery::problem::{Problem, ProblemReason},
    discovery::telemetry::{Telemetry, Tracing},
    keys::{ObjectKey, PodKey},
    telemetry::spans::{CustomTag, TelemetryPolicy, TracingOverride},
};

/// One resource, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledTelemetry {
    /// The labels a pod must carry (`None`: the whole namespace, or mesh).
    pub selector: Option<BTreeMap<String, String>>,
    pub policy: TelemetryPolicy,
    pub problems: Vec<Problem>,
    created: Option<Time>,
}

fn problem(field: String, reason: ProblemReason, detail: String) -> Problem {
    Problem {
        field,
        reason,
        detail,
    }
}

fn tracing_override(t: &Tracing, at: &str, problems: &mut Vec<Problem>) -> TracingOverride {
    let mut o = TracingOverride {
        providers: (!t.providers.is_empty())
            .then(|| t.providers.iter().map(|p| p.name.clone()).collect()),
        sampling: None,
        disabled: t.disable_span_reporting,
        custom_tags: BTreeMap::new(),
    };
    if let Some(p) = t.random_sampling_percentage {
        if (0.0..=100.0).contains(&p) {
            o.sampling = Some(p);
        } else {
            problems.push(problem(
                format!("{at}.randomSamplingPercentage"),
                ProblemReason::BadValue,
                format!(
                    "{p} is not a percentage from 0 to 100: the broader level's sampling applies"
                ),
            ));
        }
    }
    for (name, tag) in &t.custom_tags {
        let field = format!("{at}.customTags.{name}");
        let compiled = match (&tag.literal, &tag.header, &tag.environment) {
            (Some(l), None, None) => Some(CustomTag::Literal(l.value.clone())),
            (None, Some(h), None) => match HeaderName::from_bytes(h.name.as_bytes()) {
                Ok(header) => Some(CustomTag::Header {
                    name: header,
                    default: h.default_value.clone(),
                }),
                Err(_) => {
                    problems.push(problem(
                        field.clone(),
                        ProblemReason::BadValue,
                        format!("`{}` is not a header name: the tag is left out", h.name),
                    ));
                    None
                }
            },
            (None, None, Some(_)) => {
                problems.push(Problem::not_implemented(
                    format!("{field}.environment"),
                    "a tag from the proxy's environment",
                ));
                None
            }
            _ => {
                problems.push(problem(
                    field.clone(),
                    ProblemReason::BadValue,
                    "a custom tag must be exactly one of literal, header, environment: the tag is left out".into(),
                ));
                None
            }
        };
        if let Some(c) = compiled {
            o.custom_tags.insert(name.clone(), c);
        }
    }
    if t.use_request_id_for_trace_sampling.is_some() {
        problems.push(Problem::not_implemented(
            format!("{at}.useRequestIdForTraceSampling"),
            "sampling by x-request-id",
        ));
    }
    o
}

/// Checks one resource: what it says, and what of it is not applied.
pub fn compile(t: &Telemetry) -> CompiledTelemetry {
    let spec = &t.spec;
    let mut problems = Vec::new();
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        problems.push(Problem::not_implemented(
            "targetRefs".into(),
            "selecting workloads by Service (use selector)",
        ));
    }
    if !spec.metrics.is_empty() {
        problems.push(Problem::not_implemented(
            "metrics".into(),
            "configuring metrics (the agent's are always on)",
        ));
    }
    let mut policy = TelemetryPolicy::default();
    let (mut client_set, mut server_set) = (false, false);
    for (i, t) in spec.tracing.iter().enumerate() {
        let at = format!("tracing[{i}]");
        let mode = t.r#match.as_ref().and_then(|m| m.mode.as_deref());
        let (client, server) = match mode {
            None | Some("CLIENT_AND_SERVER") => (true, true),
            Some("CLIENT") => (true, false),
            Some("SERVER") => (false, true),
            Some(other) => {
                problems.push(problem(
                    format!("{at}.match.mode"),
                    ProblemReason::UnknownValue,
                    format!("`{other}` is not CLIENT_AND_SERVER, CLIENT or SERVER: the entry is left out"),
                ));
                continue;
            }
        };
        let o = tracing_override(t, &at, &mut problems);
        // The first entry for each side applies (as in Istio).
        if client && !client_set {
            policy.client = o.clone();
            client_set = true;
        }
        if server && !server_set {
            policy.server = o;
            server_set = true;
        }
    }
    for (i, a) in spec.access_logging.iter().enumerate() {
        let at = format!("accessLogging[{i}]");
        if a.r#match.is_some() {
            problems.push(Problem::not_implemented(
                format!("{at}.match"),
                "logging one side only",
            ));
        }
        if a.filter.is_some() {
            problems.push(Problem::not_implemented(
                format!("{at}.filter"),
                "filtering access-log entries",
            ));
        }
        if i == 0 {
            // Naming a provider turns the (one) access log on.
            policy.access_log = match a.disabled {
                Some(d) => Some(!d),
                None if !a.providers.is_empty() => Some(true),
                None => None,
            };
        }
    }
    CompiledTelemetry {
        selector: spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .filter(|l| !l.is_empty()),
        policy,
        problems,
        created: t.metadata.creation_timestamp.clone(),
    }
}

/// Every Telemetry resource checked, by namespace, oldest first.
#[derive(Debug, Clone, Default)]
pub struct TelemetryIndex {
    root: RootNamespace,
    pub compiled: BTreeMap<ObjectKey, Arc<CompiledTelemetry>>,
    /// Keys by namespace, oldest first (then by name).
    by_namespace: HashMap<String, Vec<ObjectKey>>,
}

impl TelemetryIndex {
    pub fn build(
        root: &RootNamespace,
        resources: &BTreeMap<ObjectKey, Arc<Telemetry>>,
    ) -> TelemetryIndex {
        let mut compiled: BTreeMap<ObjectKey, CompiledTelemetry> = resources
            .iter()
            .map(|(k, t)| (k.clone(), compile(t)))
            .collect();
        let mut by_namespace: HashMap<String, Vec<ObjectKey>> = HashMap::new();
        for key in compiled.keys() {
            by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(key.clone());
        }
        for keys in by_namespace.values_mut() {
            keys.sort_by(|a, b| {
                let created = |k: &ObjectKey| compiled.get(k).and_then(|c| c.created.clone());
                // Resources without a creation time (manifest files) sort by name.
                created(a)
                    .map(|t| t.0)
                    .cmp(&created(b).map(|t| t.0))
                    .then_with(|| a.name.cmp(&b.name))
            });
            // Only one resource without a selector applies per namespace.
            let mut winner: Option<ObjectKey> = None;
            for key in keys.iter() {
                let Some(c) = compiled.get_mut(key) else {
                    continue;
                };
                if c.selector.is_some() {
                    continue;
                }
                match &winner {
                    None => winner = Some(key.clone()),
                    Some(w) => c.problems.push(problem(
                        "selector".into(),
                        ProblemReason::Shadowed,
                        format!("Telemetry {w} also covers the whole namespace and is older (or sorts first): this one is not applied; merge them"),
                    )),
                }
            }
        }
        TelemetryIndex {
            root: root.clone(),
            compiled: compiled
                .into_iter()
                .map(|(k, c)| (k, Arc::new(c)))
                .collect(),
            by_namespace,
        }
    }

    pub fn root(&self) -> &RootNamespace {
        &self.root
    }

    pub fn is_empty(&self) -> bool {
        self.compiled.is_empty()
    }

    /// The first resource of `namespace` without a selector, or whose selector
    /// matches `labels`.
    fn first(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
        workload: bool,
    ) -> Option<&CompiledTelemetry> {
        self.by_namespace
            .get(namespace)?
            .iter()
            .filter_map(|k| self.compiled.get(k))
            .find(|c| match (&c.selector, workload) {
                (None, false) => true,
                (Some(want), true) => want
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)),
                _ => false,
            })
            .map(|c| c.as_ref())
    }

    /// What applies to the pod `pod` (with `labels`): mesh, then namespace, then
    /// workload.
    pub fn resolve(
        &self,
        pod: &PodKey,
        labels: Option<&BTreeMap<String, String>>,
    ) -> TelemetryPolicy {
        let mut policy = TelemetryPolicy::default();
        if self.compiled.is_empty() {
            return policy;
        }
        let root = self.root.as_str();
        let levels = [
            self.first(root, labels, false),
            (pod.namespace != root)
                .then(|| self.first(&pod.namespace, labels, false))
                .flatten(),
            self.first(&pod.namespace, labels, true),
        ];
        for level in levels.into_iter().flatten() {
            policy.overlay(&level.policy);
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry(ns: &str, name: &str, spec: &str) -> (ObjectKey, Arc<Telemetry>) {
        let mut t = Telemetry::new(name, serde_yaml::from_str(spec).unwrap());
        t.metadata.namespace = Some(ns.into());
        (ObjectKey::new(ns, name), Arc::new(t))
    }

    fn index(items: Vec<(ObjectKey, Arc<Telemetry>)>) -> TelemetryIndex {
        let root: RootNamespace = "istio-system".parse().unwrap();
        TelemetryIndex::build(&root, &items.into_iter().collect())
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), app.to_string())])
    }

    #[test]
    fn mesh_then_namespace_then_workload_each_override_field_by_field() {
        let i = index(vec![
            telemetry(
                "istio-system",
                "mesh-default",
                "tracing: [{providers: [{name: otel}], randomSamplingPercentage: 100}]",
            ),
            telemetry(
                "apps",
                "quiet",
                "tracing: [{disableSpanReporting: true}]\naccessLogging: [{disabled: true}]",
            ),
            telemetry(
                "apps",
                "loud-client",
                "selector: {matchLabels: {app: client}}\ntracing: [{disableSpanReporting: false, randomSamplingPercentage: 5}]",
            ),
        ]);
        let client = i.resolve(&PodKey::new("apps", "client"), Some(&labels("client")));
        assert_eq!(client.client.providers, Some(vec!["otel".to_string()]));
        assert_eq!(client.client.disabled, Some(false));
        assert_eq!(client.client.sampling, Some(5.0));
        assert!(!client.logs(), "the namespace's access logging applies");
        let other = i.resolve(&PodKey::new("apps", "server"), Some(&labels("server")));
        assert_eq!(other.server.disabled, Some(true));
        assert_eq!(other.server.sampling, Some(100.0));
        let elsewhere = i.resolve(&PodKey::new("shop", "web"), Some(&labels("client")));
        assert_eq!(elsewhere.client.disabled, None);
        assert!(elsewhere.logs());
    }

    #[test]
    fn a_side_of_its_own_and_what_is_not_implemented_is_reported() {
        let c = compile(
            &telemetry(
                "apps",
                "t",
                r#"
targetRefs: [{kind: Service, name: web}]
metrics: [{providers: [{name: prometheus}]}]
tracing:
- match: {mode: SERVER}
  providers: [{name: zipkin}]
  randomSamplingPercentage: 250
  customTags:
    env: {literal: {value: prod}}
    bad: {header: {name: "no spaces"}}
    pod: {environment: {name: POD_NAME}}
- match: {mode: CLIENT}
  providers: [{name: otel}]
accessLogging: [{filter: {expression: "response.code >= 400"}, providers: [{name: envoy}]}]
"#,
            )
            .1,
        );
        assert_eq!(c.policy.server.providers, Some(vec!["zipkin".to_string()]));
        assert_eq!(c.policy.client.providers, Some(vec!["otel".to_string()]));
        assert_eq!(c.policy.server.sampling, None);
        assert_eq!(
            c.policy.server.custom_tags.get("env"),
            Some(&CustomTag::Literal("prod".into()))
        );
        assert_eq!(c.policy.server.custom_tags.len(), 1);
        assert_eq!(c.policy.access_log, Some(true));
        let fields: Vec<_> = c.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "targetRefs",
                "metrics",
                "tracing[0].randomSamplingPercentage",
                "tracing[0].customTags.bad",
                "tracing[0].customTags.pod.environment",
                "accessLogging[0].filter",
            ]
        );
    }

    #[test]
    fn of_two_namespace_wide_resources_the_first_applies_and_the_other_is_shadowed() {
        let i = index(vec![
            telemetry("apps", "b", "tracing: [{randomSamplingPercentage: 2}]"),
            telemetry("apps", "a", "tracing: [{randomSamplingPercentage: 1}]"),
        ]);
        let p = i.resolve(&PodKey::new("apps", "x"), None);
        assert_eq!(p.client.sampling, Some(1.0));
        let shadowed = &i.compiled[&ObjectKey::new("apps", "b")].problems;
        assert_eq!(shadowed[0].reason, ProblemReason::Shadowed, "{shadowed:?}");
    }
}
