//! The manifests under deploy/ agree with the code: RBAC grants exactly what discovery
//! watches, and the CRD is the one the Rust type defines.

use std::collections::BTreeSet;

use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::CustomResourceExt;
use mesh_node::{
    kube_source::{watched_resources, WATCH_VERBS},
    policy::AuthorizationPolicy,
};
use serde::Deserialize;

fn deploy(file: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/").to_string() + file;
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_cluster_role_grants_exactly_what_discovery_watches() {
    let text = deploy("rbac.yaml");
    let role: ClusterRole = serde_yaml::Deserializer::from_str(&text)
        .map(serde_yaml::Value::deserialize)
        .filter_map(Result::ok)
        .find(|v| v["kind"] == "ClusterRole")
        .map(|v| serde_yaml::from_value(v).expect("ClusterRole parses"))
        .expect("rbac.yaml has a ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(
            verbs,
            WATCH_VERBS.into_iter().collect(),
            "verbs beyond what the watchers use: {rule:?}"
        );
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                granted.insert((group.clone(), resource));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = watched_resources().into_iter().collect();
    assert_eq!(granted, watched);
}

#[test]
fn the_authorization_policy_crd_matches_the_rust_type() {
    let on_disk: serde_yaml::Value =
        serde_yaml::from_str(&deploy("crds/authorizationpolicy.yaml")).unwrap();
    let generated = serde_yaml::to_value(AuthorizationPolicy::crd()).unwrap();
    assert_eq!(
        on_disk, generated,
        "deploy/crds/authorizationpolicy.yaml is stale: regenerate it with `mesh-node crds > deploy/crds/authorizationpolicy.yaml`"
    );
}
