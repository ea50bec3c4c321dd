//! The manifests under deploy/ agree with the code: every document parses into its
//! typed object; RBAC grants exactly what the code uses; the CRD is the one the Rust
//! type defines; the DaemonSet and the CA Deployment pass arguments their parsers
//! accept, mount what the code opens and expose the conventional ports.

#[path = "deploy_manifests/objects.rs"]
mod objects;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::Parser;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Container, PodSpec, Service, Volume},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::CustomResourceExt;
use mesh_node::{
    ca::server::CaConfig, capture::preflight::missing_capabilities, cli::Cli, cli::Command,
    config::AgentConfig, config::NetnsLocatorKind, config::Source,
    discovery::apiserver::watched_resources, discovery::apiserver::WATCH_VERBS,
    discovery::policy::AuthorizationPolicy,
};
use objects::{all, deploy_dir, documents, is_kustomization, the, yaml_files, Object};
use serde::Deserialize;

fn cluster_role<'a>(docs: &'a [objects::Document], name: &str) -> &'a ClusterRole {
    the(
        docs,
        |o| match o {
            Object::ClusterRole(r) => Some(r),
            _ => None,
        },
        name,
    )
}

/// (group, resource) -> verbs a ClusterRole grants.
fn grants(role: &ClusterRole) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.clone().unwrap_or_default() {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                out.entry((group.clone(), resource))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    out
}

fn watch_grants() -> BTreeMap<(String, String), BTreeSet<String>> {
    let verbs: BTreeSet<String> = WATCH_VERBS.iter().map(|v| v.to_string()).collect();
    watched_resources()
        .into_iter()
        .map(|r| (r, verbs.clone()))
        .collect()
}

/// The ServiceAccount (namespace, name) a ClusterRole is bound to.
fn bound_account(docs: &[objects::Document], role: &str) -> (String, String) {
    let bindings: Vec<&ClusterRoleBinding> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ClusterRoleBinding(b) if b.role_ref.name == role => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(bindings.len(), 1, "one binding of ClusterRole {role}");
    let subjects = bindings[0].subjects.clone().unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "ClusterRole {role} is bound to one subject"
    );
    assert_eq!(subjects[0].kind, "ServiceAccount");
    (
        subjects[0].namespace.clone().unwrap_or_default(),
        subjects[0].name.clone(),
    )
}

#[test]
fn the_agent_role_grants_exactly_what_discovery_watches() {
    let docs = documents(&deploy_dir());
    assert_eq!(grants(cluster_role(&docs, "nodemesh-node")), watch_grants());
}

#[test]
fn the_ca_role_grants_discovery_and_token_reviews_only() {
    // The CA runs the same discovery (to see which pods run on which node) and creates
    // TokenReviews (ca/auth.rs) to authenticate agents.
    let docs = documents(&deploy_dir());
    let mut expected = watch_grants();
    expected.insert(
        ("authentication.k8s.io".into(), "tokenreviews".into()),
        ["create".to_string()].into(),
    );
    assert_eq!(grants(cluster_role(&docs, "nodemesh-ca")), expected);
}

#[test]
fn the_authorization_policy_crd_matches_the_rust_type() {
    let path = deploy_dir().join("crds/authorizationpolicy.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated = serde_yaml::to_value(AuthorizationPolicy::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/authorizationpolicy.yaml is stale: regenerate it with `mesh-node crds > deploy/crds/authorizationpolicy.yaml`"
    );
}

#[test]
fn the_destination_rule_crd_matches_the_rust_type() {
    let path = deploy_dir().join("crds/istio/destinationrule.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated = serde_yaml::to_value(mesh_node::discovery::destination_rule::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/istio/destinationrule.yaml is stale: regenerate it with `mesh-node crds --kind destination-rule > deploy/crds/istio/destinationrule.yaml`"
    );
}

#[test]
fn the_peer_authentication_crd_matches_the_rust_type_at_istios_versions() {
    let path = deploy_dir().join("crds/istio/peerauthentication.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated = serde_yaml::to_value(mesh_node::discovery::peer_authentication::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/istio/peerauthentication.yaml is stale: regenerate it with `mesh-node crds --kind peer-authentication > deploy/crds/istio/peerauthentication.yaml`"
    );
    assert_eq!(on_disk["spec"]["group"], "security.istio.io");
}

#[test]
fn the_istio_authorization_policy_crd_matches_the_rust_type_at_istios_versions() {
    let path = deploy_dir().join("crds/istio/authorizationpolicy.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated =
        serde_yaml::to_value(mesh_node::discovery::authorization_policy::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/istio/authorizationpolicy.yaml is stale: regenerate it with `mesh-node crds --kind istio-authorization-policy > deploy/crds/istio/authorizationpolicy.yaml`"
    );
    assert_eq!(on_disk["spec"]["group"], "security.istio.io");
}

#[test]
fn the_request_authentication_crd_matches_the_rust_type_at_istios_versions() {
    let path = deploy_dir().join("crds/istio/requestauthentication.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated =
        serde_yaml::to_value(mesh_node::discovery::request_authentication::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/istio/requestauthentication.yaml is stale: regenerate it with `mesh-node crds --kind request-authentication > deploy/crds/istio/requestauthentication.yaml`"
    );
    assert_eq!(on_disk["spec"]["group"], "security.istio.io");
}

#[test]
fn the_telemetry_crd_matches_the_rust_type_at_istios_versions() {
    let path = deploy_dir().join("crds/istio/telemetry.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated = serde_yaml::to_value(mesh_node::discovery::telemetry::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/istio/telemetry.yaml is stale: regenerate it with `mesh-node crds --kind telemetry > deploy/crds/istio/telemetry.yaml`"
    );
    assert_eq!(on_disk["spec"]["group"], "telemetry.istio.io");
}

#[test]
fn the_virtual_service_crd_matches_the_rust_type_at_istios_versions() {
    let path = deploy_dir().join("crds/istio/virtualservice.yaml");
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let generated = serde_yaml::to_value(mesh_node::discovery::virtual_service::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/istio/virtualservice.yaml is stale: regenerate it with `mesh-node crds --kind virtual-service > deploy/crds/istio/virtualservice.yaml`"
    );
    let versions: Vec<&str> = on_disk["spec"]["versions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["v1", "v1beta1", "v1alpha3"]);
}

#[test]
fn every_manifest_parses_into_its_typed_object() {
    let docs = all();
    let files: BTreeSet<&Path> = docs.iter().map(|d| d.file.as_path()).collect();
    let count = |f: fn(&Object) -> bool| docs.iter().filter(|d| f(&d.object)).count();
    // The install and the example app, as the README describes them.
    assert_eq!(count(|o| matches!(o, Object::DaemonSet(_))), 1);
    assert_eq!(count(|o| matches!(o, Object::Deployment(_))), 5);
    assert_eq!(count(|o| matches!(o, Object::HttpRoute(_))), 1);
    // The example app uses Istio's kind (Nodemesh's own is translated, not shown).
    assert_eq!(count(|o| matches!(o, Object::AuthorizationPolicy(_))), 0);
    assert_eq!(
        count(|o| matches!(o, Object::IstioAuthorizationPolicy(_))),
        1
    );
    assert_eq!(count(|o| matches!(o, Object::Crd(_))), 7);
    assert_eq!(count(|o| matches!(o, Object::ConfigMap(_))), 1);
    assert_eq!(count(|o| matches!(o, Object::PodMonitor(_))), 1);
    assert!(files.len() >= 10, "{files:?}");
}

#[derive(Deserialize)]
struct Kustomization {
    resources: Vec<String>,
}

#[test]
fn each_kustomization_lists_every_manifest_of_its_tree_once() {
    let root = deploy_dir();
    // deploy/crds/istio is its own tree: Istio's kind, applied only without Istio;
    // deploy/observability too: the PodMonitor needs the Prometheus operator's CRDs.
    for (dir, nested) in [
        (
            root.clone(),
            vec![
                root.join("examples"),
                root.join("crds/istio"),
                root.join("observability"),
            ],
        ),
        (root.join("examples"), vec![]),
        (root.join("crds/istio"), vec![]),
        (root.join("observability"), vec![]),
    ] {
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        let k: Kustomization = serde_yaml::from_str(&text).unwrap();
        let listed: BTreeSet<PathBuf> = k.resources.iter().map(|r| dir.join(r)).collect();
        assert_eq!(
            listed.len(),
            k.resources.len(),
            "{}: duplicates",
            dir.display()
        );
        // Everything below the directory except another kustomization's tree.
        let present: BTreeSet<PathBuf> = yaml_files(&dir)
            .into_iter()
            .filter(|f| !is_kustomization(f))
            .filter(|f| !nested.iter().any(|n| f.starts_with(n)))
            .collect();
        assert_eq!(listed, present, "{}/kustomization.yaml", dir.display());
    }
}

fn daemon_set(docs: &[objects::Document]) -> &DaemonSet {
    the(
        docs,
        |o| match o {
            Object::DaemonSet(d) => Some(d),
            _ => None,
        },
        "mesh-node",
    )
}

fn ca_deployment(docs: &[objects::Document]) -> &Deployment {
    the(
        docs,
        |o| match o {
            Object::Deployment(d) => Some(d),
            _ => None,
        },
        "nodemesh-ca",
    )
}

fn pod_spec(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().expect("pod template has a spec")
}

/// Sample values the kubelet would fill in for the downward API.
const NODE_NAME: &str = "worker-1";
const NODE_IP: &str = "172.18.0.3";
const CA_CLUSTER_IP: &str = "10.96.0.12";

/// The environment the kubelet gives a container: its `env` (downward API fields
/// filled with samples) and the service links of the Services in its namespace.
fn environment(
    container: &Container,
    namespace: &str,
    services: &[&Service],
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for service in services
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
    {
        let prefix = service
            .metadata
            .name
            .clone()
            .unwrap()
            .to_uppercase()
            .replace('-', "_");
        let ports = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        env.insert(format!("{prefix}_SERVICE_HOST"), CA_CLUSTER_IP.to_string());
        env.insert(format!("{prefix}_SERVICE_PORT"), ports[0].port.to_string());
        for port in &ports {
            if let Some(name) = &port.name {
                env.insert(
                    format!(
                        "{prefix}_SERVICE_PORT_{}",
                        name.to_uppercase().replace('-', "_")
                    ),
                    port.port.to_string(),
                );
            }
        }
    }
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from.and_then(|v| v.field_ref)) {
            (Some(v), _) => v,
            (None, Some(field)) => match field.field_path.as_str() {
                "spec.nodeName" => NODE_NAME.into(),
                "status.hostIP" => NODE_IP.into(),
                other => panic!("env {}: no sample for field {other}", var.name),
            },
            _ => panic!("env {}: unsupported source", var.name),
        };
        env.insert(var.name, value);
    }
    env
}

/// Expands `$(VAR)` as the kubelet does; an undefined variable fails the test (the
/// kubelet would pass it through literally).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find(')').expect("closed $(") + start;
        let name = &rest[start + 2..end];
        out.push_str(
            env.get(name)
                .unwrap_or_else(|| panic!("`{arg}`: ${name} is not defined")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn command_line(container: &Container, namespace: &str, docs: &[objects::Document]) -> Command {
    let services: Vec<&Service> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    let env = environment(container, namespace, &services);
    assert!(
        container.command.is_none(),
        "the image's entrypoint is mesh-node"
    );
    let args = container.args.clone().unwrap_or_default();
    let argv = std::iter::once("mesh-node".to_string()).chain(args.iter().map(|a| expand(a, &env)));
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.command,
        Err(e) => panic!(
            "{} args {args:?} are refused by mesh-node: {e}",
            container.name
        ),
    }
}

fn agent_config(docs: &[objects::Document]) -> AgentConfig {
    let ds = daemon_set(docs);
    let spec = pod_spec(&ds.spec.as_ref().unwrap().template);
    match command_line(
        &spec.containers[0],
        ds.metadata.namespace.as_deref().unwrap(),
        docs,
    ) {
        Command::Agent(config) => *config,
        _ => panic!("the DaemonSet does not run `mesh-node agent`"),
    }
}

fn ca_config(docs: &[objects::Document]) -> CaConfig {
    let deployment = ca_deployment(docs);
    let spec = pod_spec(&deployment.spec.as_ref().unwrap().template);
    let namespace = deployment.metadata.namespace.as_deref().unwrap();
    match command_line(&spec.containers[0], namespace, docs) {
        Command::Ca(config) => *config,
        _ => panic!("the CA Deployment does not run `mesh-node ca`"),
    }
}

/// The volume mounted at the deepest mount point containing `path`, and the path
/// relative to that mount point.
fn volume_for<'a>(spec: &'a PodSpec, path: &Path) -> (&'a Volume, PathBuf) {
    let mounts = spec.containers[0].volume_mounts.clone().unwrap_or_default();
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("mount {} has no volume", mount.name));
    (
        volume,
        path.strip_prefix(&mount.mount_path).unwrap().to_path_buf(),
    )
}

fn host_path(volume: &Volume) -> Option<&str> {
    volume.host_path.as_ref().map(|h| h.path.as_str())
}

#[test]
fn the_daemon_set_runs_the_agent_on_the_kube_source_with_this_nodes_identity() {
    let docs = all();
    let config = agent_config(&docs);
    assert_eq!(config.source, Source::Kube);
    assert_eq!(config.node_name, NODE_NAME);
    let ds = daemon_set(&docs);
    let spec = pod_spec(&ds.spec.as_ref().unwrap().template);
    // kubelet's probes are recognised by the node's own namespace, the host's: the
    // agent reaches it through /proc/1 of the host's PID namespace.
    assert_eq!(config.node_netns, std::path::Path::new("/proc/1/ns/net"));
    assert_eq!(spec.host_pid, Some(true));
    // Its own account, the one the agent ClusterRole and the CA's --agent-user name.
    let account = (
        ds.metadata.namespace.clone().unwrap(),
        spec.service_account_name.clone().unwrap(),
    );
    assert_eq!(bound_account(&docs, "nodemesh-node"), account);
    assert_eq!(
        ca_config(&docs).agent_user,
        format!("system:serviceaccount:{}:{}", account.0, account.1)
    );
}

#[test]
fn the_daemon_set_mounts_what_the_agent_opens() {
    let docs = all();
    let config = agent_config(&docs);
    let ds = daemon_set(&docs);
    let spec = pod_spec(&ds.spec.as_ref().unwrap().template);
    // Pinned maps and links must outlive the pod: the host's bpffs.
    let (bpffs, _) = volume_for(spec, &config.pin_dir);
    assert_eq!(
        host_path(bpffs),
        Some("/sys/fs/bpf"),
        "--pin-dir {}",
        config.pin_dir.display()
    );
    // The programs attach to the host's cgroup2 hierarchy, not the container's own.
    assert!(
        config.cgroup_root.is_absolute(),
        "--cgroup-root must name the host mount"
    );
    let (cgroup, below) = volume_for(spec, &config.cgroup_root);
    assert_eq!(host_path(cgroup), Some("/sys/fs/cgroup"));
    assert_eq!(below, PathBuf::new(), "attach at the host's cgroup2 root");
    // Kept keys outlive the pod (an upgrade, a crash) but not the node: the host's /run,
    // a tmpfs; the agent creates its private directory below the mount.
    let (cache, below) = volume_for(spec, &config.cert_cache_dir);
    assert_eq!(host_path(cache), Some("/run/nodemesh"));
    assert_ne!(below, PathBuf::new(), "the agent's own 0700 directory");
    // The mesh configuration comes from its ConfigMap.
    let mesh_config = config.mesh_config.as_ref().expect("--mesh-config");
    let (volume, below) = volume_for(spec, mesh_config);
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("nodemesh-mesh-config")
    );
    assert_eq!(below, PathBuf::from("mesh.yaml"));
    let text = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ConfigMap(c) if c.metadata.name.as_deref() == Some("nodemesh-mesh-config") => {
                c.data.as_ref()?.get("mesh.yaml").cloned()
            }
            _ => None,
        })
        .expect("the ConfigMap nodemesh-mesh-config has mesh.yaml");
    assert_eq!(
        mesh_node::config::check_mesh_config(&text),
        Ok(Vec::new()),
        "deploy/mesh-config.yaml's mesh.yaml must be a mesh configuration the agent takes"
    );
    // The kubepods locator reads /proc/<pid>/cgroup and /proc/<pid>/ns/net of pods.
    assert_eq!(config.netns_locator, NetnsLocatorKind::Kubepods);
    assert_eq!(spec.host_pid, Some(true));
    assert_ne!(
        spec.host_network,
        Some(true),
        "the agent needs no host network"
    );
}

#[test]
fn the_agent_reaches_the_ca_with_its_root_and_an_audience_bound_token() {
    let docs = all();
    let (agent, ca) = (agent_config(&docs), ca_config(&docs));
    let ds = daemon_set(&docs);
    let spec = pod_spec(&ds.spec.as_ref().unwrap().template);
    // Address: the CA Service, on the port the CA listens on.
    let service = the(
        &docs,
        |o| match o {
            Object::Service(s) => Some(s),
            _ => None,
        },
        "nodemesh-ca",
    );
    let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    let ca_addr = agent.ca_addr.expect("--ca-addr");
    assert_eq!(
        ca_addr.to_string(),
        format!("{CA_CLUSTER_IP}:{}", port.port)
    );
    assert_eq!(ca.listen.port() as i32, port.port);
    assert!(ca
        .server_names
        .contains(agent.ca_server_name.as_ref().unwrap()));
    // Root: the CA Secret's certificate only, never its key.
    let root = agent.ca_root.as_ref().expect("--ca-root");
    let (volume, file) = volume_for(spec, root);
    let secret = volume
        .secret
        .as_ref()
        .expect("the root comes from a Secret");
    let items = secret.items.clone().unwrap_or_default();
    assert_eq!(items.len(), 1, "only ca.crt is projected into the agent");
    assert_eq!(
        (items[0].key.as_str(), Path::new(&items[0].path)),
        ("ca.crt", file.as_path())
    );
    // Token: a projected service-account token for the audience the CA checks.
    let token = agent.ca_token_file.as_ref().expect("--ca-token-file");
    let (volume, file) = volume_for(spec, token);
    let projected = volume.projected.as_ref().expect("the token is projected");
    let sources = projected.sources.clone().unwrap_or_default();
    let sa_token = sources[0]
        .service_account_token
        .as_ref()
        .expect("a serviceAccountToken");
    assert_eq!(Path::new(&sa_token.path), file.as_path());
    assert_eq!(
        sa_token.audience.as_deref(),
        Some(ca.token_audience.as_str())
    );
    // The CA's side: TokenReview (no static tokens) and its root from the same Secret.
    assert_eq!(ca.source, Source::Kube);
    assert!(ca.node_tokens.is_none() && ca.root_dir.is_none());
    let ca_spec = pod_spec(&ca_deployment(&docs).spec.as_ref().unwrap().template);
    for (path, key) in [(&ca.root_cert, "ca.crt"), (&ca.root_key, "ca.key")] {
        let path = path.as_ref().unwrap();
        let (volume, file) = volume_for(ca_spec, path);
        let ca_secret = volume.secret.as_ref().expect("the CA root is a Secret");
        assert_eq!(ca_secret.secret_name, secret.secret_name);
        assert_eq!(file, PathBuf::from(key));
    }
    assert_eq!(
        bound_account(&docs, "nodemesh-ca").1,
        ca_spec.service_account_name.clone().unwrap()
    );
}

#[test]
fn ports_and_probes_follow_the_conventions() {
    let docs = all();
    let config = agent_config(&docs);
    let ds = daemon_set(&docs);
    let container = &pod_spec(&ds.spec.as_ref().unwrap().template).containers[0];
    let port = |name: &str| {
        container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no container port {name}"))
            .container_port
    };
    assert_eq!(port("metrics"), 15020);
    assert_eq!(port("metrics"), config.metrics_addr.port() as i32);
    assert_eq!(port("readiness"), 15021);
    assert_eq!(port("readiness"), config.readiness_addr.port() as i32);
    assert!(
        config.admin_addr.ip().is_loopback(),
        "the admin API stays on localhost"
    );
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("readiness".into())
    );
    let ca = ca_config(&docs);
    assert_eq!(ca.listen.port(), 15012);
}

fn capability_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "BPF" => 39,
        other => panic!("capability {other} is not one the agent needs: say why or remove it"),
    }
}

#[test]
fn the_agent_runs_unprivileged_with_the_capabilities_its_preflight_checks() {
    let docs = all();
    let ds = daemon_set(&docs);
    let security = pod_spec(&ds.spec.as_ref().unwrap().template).containers[0]
        .security_context
        .clone()
        .unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    let added = caps.add.unwrap_or_default();
    let mask = added.iter().fold(0u64, |m, c| m | 1 << capability_bit(c));
    let kubepods = agent_config(&docs).netns_locator == NetnsLocatorKind::Kubepods;
    assert_eq!(missing_capabilities(mask, kubepods), Vec::<&str>::new());
}

#[test]
fn an_update_hands_each_node_over_and_agents_never_enroll_themselves() {
    let docs = all();
    let ds = daemon_set(&docs);
    let strategy = ds.spec.as_ref().unwrap().update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    // The new agent starts beside the old one and takes the node over; the old one
    // goes only once the new one is ready.
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let spec = pod_spec(&ds.spec.as_ref().unwrap().template);
    // Two agent pods on one node must not collide on ports.
    assert_ne!(spec.host_network, Some(true));
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            assert_eq!(p.host_port, None, "{c:?}");
        }
    }
    // Both see the hand-over socket's directory (--handover-socket's default).
    let container = &spec.containers[0];
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/run/nodemesh")
        .expect("/run/nodemesh is mounted");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("its volume");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/run/nodemesh")
    );
    // The grace period outlasts the default 30 s drain.
    assert!(spec.termination_grace_period_seconds > Some(30));
    for template in [
        &ds.spec.as_ref().unwrap().template,
        &ca_deployment(&docs).spec.as_ref().unwrap().template,
    ] {
        let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
        assert_eq!(
            labels.get("nodemesh.io/mesh").map(String::as_str),
            Some("disabled")
        );
    }
}

/// Whether a `curl` invocation fails on an HTTP error status (`-f`/`--fail`).
fn curl_fails_on_http_errors(line: &str) -> bool {
    line.split("curl ").skip(1).all(|call| {
        call.split_whitespace()
            .take_while(|w| w.starts_with('-'))
            .any(|w| w == "--fail" || (!w.starts_with("--") && w.contains('f')))
    })
}

#[test]
fn the_example_clients_say_request_failed_when_the_policy_refuses_them() {
    // The README: `forbidden` logs "request failed". Its refusal is an HTTP 403 (the
    // route is HTTP), on which curl exits 0 unless it is told to fail.
    let mut loops = 0;
    for doc in documents(&deploy_dir().join("examples")) {
        let Object::Deployment(d) = &doc.object else {
            continue;
        };
        let template = &d.spec.as_ref().expect("a Deployment has a spec").template;
        for c in &pod_spec(template).containers {
            let line = [c.command.clone(), c.args.clone()]
                .into_iter()
                .flatten()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            if line.contains("request failed") {
                loops += 1;
                assert!(
                    curl_fails_on_http_errors(&line),
                    "{}: {line}",
                    doc.file.display()
                );
            }
        }
    }
    assert_eq!(loops, 2, "client and forbidden");
    assert!(!curl_fails_on_http_errors("curl -sS http://web/ || echo x"));
    assert!(curl_fails_on_http_errors("curl -fsS http://web/"));
}
