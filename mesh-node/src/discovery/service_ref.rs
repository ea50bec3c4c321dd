//! How Kubernetes references name a Service: Gateway API `parentRefs` and Istio's
//! `targetRefs` both say kind `Service` in the core group (empty, absent or `core`).

/// Whether a reference of `group` and `kind` names a core Service.
pub fn is_service_parent(group: Option<&str>, kind: Option<&str>) -> bool {
    kind == Some("Service") && matches!(group, None | Some("") | Some("core"))
}
