//! Every YAML document under deploy/, parsed into its typed Kubernetes object. A field
//! the type does not know (a typo, a wrong level) fails the parse: whatever the file
//! says must survive a round trip through the type.

use std::path::{Path, PathBuf};

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use mesh_node::discovery::{
    authorization_policy::AuthorizationPolicy as IstioAuthorizationPolicy,
    policy::AuthorizationPolicy,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_yaml::Value;

// Some kinds are only checked to parse; their objects are kept all the same.
#[allow(dead_code)]
pub enum Object {
    Namespace(Namespace),
    ConfigMap(ConfigMap),
    ServiceAccount(ServiceAccount),
    Service(Service),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Crd(CustomResourceDefinition),
    HttpRoute(HttpRoute),
    AuthorizationPolicy(AuthorizationPolicy),
    IstioAuthorizationPolicy(IstioAuthorizationPolicy),
    /// The Prometheus operator's (deploy/observability); no Rust type: its fields are
    /// checked by tests/dashboards.rs.
    PodMonitor(Value),
}

/// One document of one file.
pub struct Document {
    pub file: PathBuf,
    pub object: Object,
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `.yaml` file under `dir`, recursively, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

pub fn is_kustomization(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "kustomization.yaml")
}

/// `original` must be contained in `typed`: every key with the same value (the type may
/// add defaults, never drop or change what the file says).
fn assert_contained(original: &Value, typed: &Value, at: &str) {
    match (original, typed) {
        (Value::Mapping(o), Value::Mapping(t)) => {
            for (key, value) in o {
                let name = key.as_str().unwrap_or("?");
                let inner = t.get(key).unwrap_or_else(|| {
                    panic!("{at}.{name}: not a field of the type (typo or wrong level?)")
                });
                assert_contained(value, inner, &format!("{at}.{name}"));
            }
        }
        (Value::Sequence(o), Value::Sequence(t)) => {
            assert_eq!(o.len(), t.len(), "{at}: list length changed");
            for (i, (a, b)) in o.iter().zip(t).enumerate() {
                assert_contained(a, b, &format!("{at}[{i}]"));
            }
        }
        (a, b) => assert_eq!(
            a, b,
            "{at}: the value does not survive the typed round trip"
        ),
    }
}

fn typed<T: DeserializeOwned + Serialize>(doc: &Value, at: &str) -> T {
    let object: T = serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let back = serde_yaml::to_value(&object).unwrap();
    assert_contained(doc, &back, at);
    object
}

fn parse_document(doc: &Value, at: &str) -> Object {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => Object::Namespace(typed(doc, at)),
        ("v1", "ConfigMap") => Object::ConfigMap(typed(doc, at)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(typed(doc, at)),
        ("v1", "Service") => Object::Service(typed(doc, at)),
        ("apps/v1", "Deployment") => Object::Deployment(typed(doc, at)),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(doc, at)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(typed(doc, at)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(typed(doc, at))
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => Object::Crd(typed(doc, at)),
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => Object::HttpRoute(typed(doc, at)),
        ("security.nodemesh.io/v1alpha1", "AuthorizationPolicy") => {
            Object::AuthorizationPolicy(typed(doc, at))
        }
        ("security.istio.io/v1", "AuthorizationPolicy") => {
            Object::IstioAuthorizationPolicy(typed(doc, at))
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => Object::PodMonitor(doc.clone()),
        other => panic!("{at}: {other:?} is not a kind this test knows: add its type here"),
    }
}

/// Every document of every manifest (kustomizations excepted) under `dir`.
pub fn documents(dir: &Path) -> Vec<Document> {
    let mut out = Vec::new();
    for file in yaml_files(dir).into_iter().filter(|f| !is_kustomization(f)) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let at = format!("{} document {i}", file.display());
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{at}: {e}"));
            if value.is_null() {
                continue;
            }
            out.push(Document {
                file: file.clone(),
                object: parse_document(&value, &at),
            });
        }
    }
    out
}

/// The whole deploy/ tree, examples included.
pub fn all() -> Vec<Document> {
    documents(&deploy_dir())
}

pub fn the<'a, T>(
    docs: &'a [Document],
    pick: impl Fn(&'a Object) -> Option<&'a T>,
    name: &str,
) -> &'a T
where
    T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    docs.iter()
        .filter_map(|d| pick(&d.object))
        .find(|o| o.metadata().name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("deploy/ has no object named {name} of that kind"))
}
