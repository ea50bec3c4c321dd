//! Which Services a route attaches to (GAMMA: `parentRefs` naming a Service), indexed
//! per Service, and the routes of one Service port by Gateway API precedence.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use gateway_api::apis::experimental::{httproutes::HttpRoute, tcproutes::TcpRoute};

use crate::{discovery::service_ref::is_service_parent, keys::ObjectKey};

/// A route's `parentRefs` that name a Service (GAMMA), as (Service, port) pairs; `None`
/// means every port.
pub trait ServiceParents {
    fn service_parents(&self, own_namespace: &str) -> Vec<(ObjectKey, Option<u16>)>;
}

fn service_parent(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    own_namespace: &str,
) -> Option<(ObjectKey, Option<u16>)> {
    if !is_service_parent(group, kind) {
        return None;
    }
    let key = ObjectKey::new(namespace.unwrap_or(own_namespace), name);
    Some((key, port.and_then(|p| u16::try_from(p).ok())))
}

/// The route kinds' parentRef types differ only in name (generated per CRD).
macro_rules! service_parents_of {
    ($($route:ty),*) => {$(
        impl ServiceParents for $route {
            fn service_parents(&self, own_namespace: &str) -> Vec<(ObjectKey, Option<u16>)> {
                self.spec
                    .parent_refs
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        service_parent(
                            p.group.as_deref(),
                            p.kind.as_deref(),
                            &p.name,
                            p.namespace.as_deref(),
                            p.port,
                            own_namespace,
                        )
                    })
                    .collect()
            }
        }
    )*};
}

service_parents_of!(TcpRoute, HttpRoute);

pub(super) fn route_index<T: ServiceParents>(
    routes: &BTreeMap<ObjectKey, Arc<T>>,
) -> HashMap<ObjectKey, Vec<ObjectKey>> {
    let mut index: HashMap<ObjectKey, Vec<ObjectKey>> = HashMap::new();
    for (key, route) in routes.iter() {
        for (service, _) in route.service_parents(&key.namespace) {
            let entry = index.entry(service).or_default();
            if !entry.contains(key) {
                entry.push(key.clone());
            }
        }
    }
    index
}

/// Routes of `index` attached to `service` on `port`, by Gateway API precedence:
/// oldest first, then by namespace/name.
pub(super) fn routes_for<'a, T: ServiceParents + kube::Resource>(
    index: &HashMap<ObjectKey, Vec<ObjectKey>>,
    routes: &'a BTreeMap<ObjectKey, Arc<T>>,
    service: &ObjectKey,
    port: u16,
) -> Vec<(&'a ObjectKey, &'a T)> {
    let mut out: Vec<(&ObjectKey, &T)> = index
        .get(service)
        .into_iter()
        .flatten()
        .filter_map(|k| routes.get_key_value(k).map(|(k, r)| (k, &**r)))
        .filter(|(k, r)| {
            r.service_parents(&k.namespace)
                .iter()
                .any(|(s, p)| s == service && p.is_none_or(|p| p == port))
        })
        .collect();
    out.sort_by(|a, b| {
        let created = |r: &T| r.meta().creation_timestamp.as_ref().map(|t| t.0);
        created(a.1).cmp(&created(b.1)).then_with(|| a.0.cmp(b.0))
    });
    out
}
