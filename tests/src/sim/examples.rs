//! Turns the example app of `deploy/examples/` (the manifests a user applies to a real
//! cluster) into a simulated cluster: each Deployment replica becomes a pod, each
//! Service keeps its ports and selects its pods by label, and routes and policies are
//! fed to the agents exactly as written.

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml::Value;

use super::{ClusterSpec, PodSpec, ServiceSpec};

/// Kinds the agents read as they are; the harness plays kubelet and the endpoints
/// controller for the rest.
const PASSED_THROUGH: [&str; 3] = ["HTTPRoute", "TCPRoute", "AuthorizationPolicy"];

/// Pods selected by a Service run on node b (servers), the others on node a (clients),
/// so every request crosses the nodes.
pub struct Example {
    pub spec: ClusterSpec,
    /// `HTTPRoute`, `TCPRoute` and `AuthorizationPolicy` documents, verbatim.
    pub manifests: String,
    /// Server pods, their Deployment and the ports they listen on.
    pub servers: Vec<(String, String, Vec<u16>)>,
    /// Client pods (selected by no Service) and their Deployment.
    pub clients: Vec<(String, String)>,
}

struct Deployment {
    name: String,
    namespace: String,
    replicas: u64,
    labels: BTreeMap<String, String>,
    service_account: String,
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect()
}

fn documents(dir: &Path) -> Result<Vec<Value>> {
    let mut paths: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    paths.sort();
    let mut docs = Vec::new();
    for path in paths {
        let content = fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&content) {
            let v = Value::deserialize(doc)
                .with_context(|| format!("{} is not valid YAML", path.display()))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    Ok(docs)
}

fn pod_name(deployment: &str, replicas: u64, i: u64) -> String {
    if replicas == 1 {
        deployment.to_string()
    } else {
        format!("{deployment}-{i}")
    }
}

pub fn load(dir: &Path) -> Result<Example> {
    let docs = documents(dir)?;
    let mut namespaces = Vec::new();
    let mut deployments = Vec::new();
    let mut services = Vec::new();
    let mut manifests = Vec::new();
    for doc in &docs {
        let kind = text(doc, &["kind"]).unwrap_or("");
        let name = text(doc, &["metadata", "name"]).unwrap_or("").to_string();
        let namespace = text(doc, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string();
        match kind {
            "Namespace" => {
                let labels = string_map(doc.get("metadata").and_then(|m| m.get("labels")));
                let enrolled = labels
                    .get("nodemesh.io/mesh")
                    .is_some_and(|v| v == "enabled");
                namespaces.push((name, enrolled));
            }
            "Deployment" => {
                let template = doc.get("spec").and_then(|s| s.get("template"));
                deployments.push(Deployment {
                    replicas: doc
                        .get("spec")
                        .and_then(|s| s.get("replicas"))
                        .and_then(Value::as_u64)
                        .unwrap_or(1)
                        .clamp(1, 3),
                    labels: string_map(template.and_then(|t| t.get("metadata")?.get("labels"))),
                    service_account: template
                        .and_then(|t| text(t, &["spec", "serviceAccountName"]))
                        .unwrap_or("default")
                        .to_string(),
                    name,
                    namespace,
                });
            }
            "Service" => services.push(doc.clone()),
            k if PASSED_THROUGH.contains(&k) => manifests.push(serde_yaml::to_string(doc)?),
            _ => {}
        }
    }
    if deployments.is_empty() || services.is_empty() {
        bail!(
            "{} holds no Deployments or Services: is it the example app?",
            dir.display()
        );
    }
    // Which pods each Service selects, and on which target ports.
    let mut spec_services = Vec::new();
    let mut served: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for svc in &services {
        let name = text(svc, &["metadata", "name"]).unwrap_or("").to_string();
        let namespace = text(svc, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string();
        let selector = string_map(svc.get("spec").and_then(|s| s.get("selector")));
        let port = svc
            .get("spec")
            .and_then(|s| s.get("ports"))
            .and_then(|p| p.get(0))
            .context("a Service without ports")?;
        let number = |key: &str| {
            port.get(key)
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
        };
        let Some(service_port) = number("port") else {
            bail!("Service {namespace}/{name}: port must be a number");
        };
        let target = number("targetPort").unwrap_or(service_port);
        let mut pods = Vec::new();
        for d in deployments.iter().filter(|d| d.namespace == namespace) {
            if !selector.is_empty() && selector.iter().all(|(k, v)| d.labels.get(k) == Some(v)) {
                for i in 0..d.replicas {
                    let pod = pod_name(&d.name, d.replicas, i);
                    let ports = served.entry(pod.clone()).or_default();
                    if !ports.contains(&target) {
                        ports.push(target);
                    }
                    pods.push(pod);
                }
            }
        }
        let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
        spec_services.push(ServiceSpec::new(
            &name,
            &namespace,
            service_port,
            target,
            &pods,
        ));
    }
    let mut pods = Vec::new();
    let (mut servers, mut clients) = (Vec::new(), Vec::new());
    for d in &deployments {
        for i in 0..d.replicas {
            let name = pod_name(&d.name, d.replicas, i);
            let ports = served.get(&name).cloned();
            let node = if ports.is_some() { "b" } else { "a" };
            let mut pod = PodSpec::new(&name, &d.namespace, node);
            pod.labels = d
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            pod.service_account = d.service_account.clone();
            match ports {
                Some(ports) => servers.push((name, d.name.clone(), ports)),
                None => clients.push((name, d.name.clone())),
            }
            pods.push(pod);
        }
    }
    let mut spec = ClusterSpec::two_nodes();
    spec.namespaces = namespaces;
    spec.pods = pods;
    spec.services = spec_services;
    spec.routes = Vec::new();
    Ok(Example {
        spec,
        manifests: manifests.join("---\n"),
        servers,
        clients,
    })
}
