use super::*;
use crate::discovery::files::parse_manifest;

fn objects(yaml: &str) -> Vec<KubeObject> {
    parse_manifest(yaml).expect("valid yaml")
}

const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, "fd00:96::a"], ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: apps, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.2]}]
"#;

#[test]
fn indexes_follow_applies_and_deletes() {
    let mut s = ClusterState::from_objects(objects(SVC));
    let web = ObjectKey::new("apps", "web");
    assert_eq!(
        s.service_by_ip("10.96.0.10".parse().unwrap()).map(|x| x.0),
        Some(&web)
    );
    assert_eq!(
        s.service_by_ip("fd00:96::a".parse().unwrap()).map(|x| x.0),
        Some(&web)
    );
    assert_eq!(
        s.service_by_ip("::ffff:10.96.0.10".parse().unwrap())
            .map(|x| x.0),
        Some(&web)
    );
    assert_eq!(s.endpoint_slices_of(&web).count(), 1);

    let snapshot = s.clone();
    s.delete(Kind::EndpointSlice, &ObjectKey::new("apps", "web-abc"));
    assert_eq!(s.endpoint_slices_of(&web).count(), 0);
    assert_eq!(
        snapshot.endpoint_slices_of(&web).count(),
        1,
        "snapshots are immutable"
    );

    s.delete(Kind::Service, &web);
    assert!(s.service_by_ip("10.96.0.10".parse().unwrap()).is_none());
    assert!(snapshot
        .service_by_ip("10.96.0.10".parse().unwrap())
        .is_some());
}

#[test]
fn replace_kind_drops_what_the_relist_no_longer_has() {
    let mut s = ClusterState::from_objects(objects(SVC));
    s.replace_kind(Kind::EndpointSlice, Vec::new());
    assert!(s.endpoint_slices.is_empty());
    assert_eq!(s.services.len(), 1, "other kinds untouched");
}
