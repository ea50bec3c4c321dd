//! Istio's kinds are served at several versions with one schema. The CRDs Nodemesh
//! ships for clusters without Istio's own serve the kind at each of those versions,
//! the first one stored, as Istio's CRDs do.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// `crd` (generated at `versions[0]`) served at every one of `versions` with the same
/// schema, `versions[0]` stored.
pub(crate) fn at_versions(
    mut crd: CustomResourceDefinition,
    versions: &[&str],
) -> CustomResourceDefinition {
    if let Some(generated) = crd.spec.versions.first().cloned() {
        crd.spec.versions = versions
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut v = generated.clone();
                v.name = (*name).to_string();
                v.served = true;
                v.storage = i == 0;
                v
            })
            .collect();
    }
    crd
}
