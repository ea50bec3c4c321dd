use super::*;
use crate::discovery::{cluster::ClusterState, files::parse_manifest};

const PODS: &str = "\
apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: apps, labels: {app: server, tier: back}}\nspec: {containers: [{name: c, image: x}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: apps, labels: {app: web}}\nspec: {containers: [{name: c, image: x}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: vault, namespace: secure, labels: {app: vault}}\nspec: {containers: [{name: c, image: x}]}\n";

fn pa(namespace: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n")
}

fn pa_at(namespace: &str, name: &str, created: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}, creationTimestamp: \"{created}\"}}\nspec: {spec}\n")
}

fn state(objects: &[String]) -> ClusterState {
    let text = std::iter::once(PODS.to_string())
        .chain(objects.iter().cloned())
        .collect::<Vec<_>>()
        .join("---\n");
    ClusterState::from_objects(parse_manifest(&text).unwrap())
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn mode(s: &ClusterState, ns: &str, pod: &str, port: u16) -> (MtlsMode, MtlsSource) {
    let m = s.mtls_mode(&key(ns, pod), port);
    (m.mode, m.source)
}

fn problems(s: &ClusterState, ns: &str, name: &str) -> Vec<(String, ProblemReason)> {
    s.peer_authentication.compiled[&key(ns, name)]
        .problems
        .iter()
        .map(|p| (p.field.clone(), p.reason))
        .collect()
}

/// The example: mesh STRICT, namespace PERMISSIVE, workload STRICT with a
/// DISABLE port.
fn layered() -> Vec<String> {
    vec![
        pa("nodemesh-system", "default", "{mtls: {mode: STRICT}}"),
        pa("apps", "default", "{mtls: {mode: PERMISSIVE}}"),
        pa(
            "apps",
            "server",
            "{selector: {matchLabels: {app: server}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}",
        ),
    ]
}

#[test]
fn workload_beats_namespace_beats_mesh_and_a_port_beats_its_workload() {
    let s = state(&layered());
    let (server, ns, mesh) = (
        key("apps", "server"),
        key("apps", "default"),
        key("nodemesh-system", "default"),
    );
    assert_eq!(
        mode(&s, "apps", "server", 8080),
        (
            MtlsMode::Strict,
            MtlsSource::Workload {
                policy: server.clone()
            }
        )
    );
    assert_eq!(
        mode(&s, "apps", "server", 9090),
        (
            MtlsMode::Disable,
            MtlsSource::Port {
                policy: server,
                port: 9090
            }
        )
    );
    assert_eq!(
        mode(&s, "apps", "web", 8080),
        (MtlsMode::Permissive, MtlsSource::Namespace { policy: ns })
    );
    assert_eq!(
        mode(&s, "secure", "vault", 8080),
        (MtlsMode::Strict, MtlsSource::Mesh { policy: mesh })
    );
    // Nothing at all: PERMISSIVE by default.
    let none = state(&[]);
    assert_eq!(
        mode(&none, "apps", "server", 8080),
        (MtlsMode::Permissive, MtlsSource::Default)
    );
    assert!(!MtlsMode::Disable.refuses_plaintext());
    assert!(!MtlsMode::Permissive.refuses_plaintext());
    assert!(MtlsMode::Strict.refuses_plaintext());
}

#[test]
fn unset_inherits_from_the_level_above_at_every_level() {
    let mesh = pa("nodemesh-system", "default", "{mtls: {mode: STRICT}}");
    // A workload policy that only overrides a port: other ports inherit the
    // namespace's mode; the namespace's UNSET inherits the mesh's.
    let s = state(&[
        mesh.clone(),
        pa("apps", "default", "{mtls: {mode: UNSET}}"),
        pa(
            "apps",
            "server",
            "{selector: {matchLabels: {app: server}}, portLevelMtls: {8080: {mode: PERMISSIVE}, 9090: {mode: UNSET}}}",
        ),
    ]);
    assert_eq!(
        mode(&s, "apps", "server", 8080),
        (
            MtlsMode::Permissive,
            MtlsSource::Port {
                policy: key("apps", "server"),
                port: 8080
            }
        )
    );
    let mesh_decides = (
        MtlsMode::Strict,
        MtlsSource::Mesh {
            policy: key("nodemesh-system", "default"),
        },
    );
    assert_eq!(mode(&s, "apps", "server", 9090), mesh_decides, "port UNSET");
    assert_eq!(
        mode(&s, "apps", "server", 7000),
        mesh_decides,
        "workload UNSET"
    );
    assert_eq!(mode(&s, "apps", "web", 80), mesh_decides, "namespace UNSET");
    // A mesh-wide UNSET (or no `mtls` at all) is PERMISSIVE.
    let s = state(&[pa("nodemesh-system", "default", "{mtls: {}}")]);
    assert_eq!(
        mode(&s, "secure", "vault", 1),
        (MtlsMode::Permissive, MtlsSource::Default)
    );
}

#[test]
fn the_namespace_label_is_a_namespace_wide_policy_that_an_explicit_one_overrides() {
    let label = |value: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps, labels: {{nodemesh.io/mtls: {value}}}}}\n")
    };
    let mesh = pa("nodemesh-system", "default", "{mtls: {mode: STRICT}}");
    let by_label = MtlsSource::NamespaceLabel {
        namespace: "apps".into(),
    };
    let s = state(&[label("strict")]);
    assert_eq!(
        mode(&s, "apps", "web", 80),
        (MtlsMode::Strict, by_label.clone())
    );
    // The label beats the mesh-wide policy...
    let s = state(&[label("permissive"), mesh.clone()]);
    assert_eq!(
        mode(&s, "apps", "web", 80),
        (MtlsMode::Permissive, by_label)
    );
    // ...and a namespace-wide or workload PeerAuthentication beats the label.
    let s = state(&[
        label("strict"),
        pa("apps", "open", "{mtls: {mode: PERMISSIVE}}"),
    ]);
    assert_eq!(mode(&s, "apps", "web", 80).0, MtlsMode::Permissive);
    let s = state(&[
        label("strict"),
        pa(
            "apps",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
        ),
    ]);
    assert_eq!(mode(&s, "apps", "web", 80).0, MtlsMode::Disable);
    assert_eq!(mode(&s, "apps", "server", 80).0, MtlsMode::Strict);
    // An unknown label value sets nothing.
    let s = state(&[label("maybe"), mesh]);
    assert!(matches!(
        mode(&s, "apps", "web", 80).1,
        MtlsSource::Mesh { .. }
    ));
}

#[test]
fn port_level_mtls_needs_a_selector_and_is_reported_without_one() {
    let s = state(&[pa(
        "apps",
        "default",
        "{mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}",
    )]);
    assert_eq!(mode(&s, "apps", "web", 9090).0, MtlsMode::Strict);
    assert_eq!(
        problems(&s, "apps", "default"),
        [("portLevelMtls".to_string(), ProblemReason::InvalidField)]
    );
    assert!(s.peer_authentication.compiled[&key("apps", "default")].in_force);
}

#[test]
fn the_oldest_policy_wins_a_level_and_the_others_are_reported_as_shadowed() {
    let s = state(&[
        pa_at(
            "apps",
            "young",
            "2026-02-01T00:00:00Z",
            "{mtls: {mode: STRICT}}",
        ),
        pa_at(
            "apps",
            "old",
            "2026-01-01T00:00:00Z",
            "{mtls: {mode: PERMISSIVE}}",
        ),
        pa_at(
            "apps",
            "w-young",
            "2026-02-01T00:00:00Z",
            "{selector: {matchLabels: {app: server}}, mtls: {mode: PERMISSIVE}}",
        ),
        pa_at(
            "apps",
            "w-old",
            "2026-01-01T00:00:00Z",
            "{selector: {matchLabels: {app: server}}, mtls: {mode: STRICT}}",
        ),
        // Selects server too, with another selector: not shadowed, but younger.
        pa_at(
            "apps",
            "w-tier",
            "2026-03-01T00:00:00Z",
            "{selector: {matchLabels: {tier: back}}, mtls: {mode: DISABLE}}",
        ),
    ]);
    assert_eq!(
        mode(&s, "apps", "web", 80),
        (
            MtlsMode::Permissive,
            MtlsSource::Namespace {
                policy: key("apps", "old")
            }
        )
    );
    assert_eq!(
        problems(&s, "apps", "young"),
        [("selector".to_string(), ProblemReason::Shadowed)]
    );
    let detail = &s.peer_authentication.compiled[&key("apps", "young")].problems[0].detail;
    assert!(detail.contains("apps/old"), "{detail}");
    assert_eq!(
        mode(&s, "apps", "server", 80),
        (
            MtlsMode::Strict,
            MtlsSource::Workload {
                policy: key("apps", "w-old")
            }
        )
    );
    assert_eq!(
        problems(&s, "apps", "w-young"),
        [("selector".to_string(), ProblemReason::Shadowed)]
    );
    assert!(problems(&s, "apps", "w-tier").is_empty());
    assert_eq!(
        s.mtls_modes(&key("apps", "server")).overridden,
        [key("apps", "w-tier")]
    );
}

#[test]
fn broken_policies_fail_closed_and_are_reported_by_name() {
    let s = state(&[
        pa(
            "apps",
            "typo",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: strict}, portLevelMtls: {http: {mode: DISABLE}, 0: {mode: DISABLE}}}",
        ),
        pa(
            "nodemesh-system",
            "selected",
            "{selector: {matchLabels: {app: vault}}, mtls: {mode: PERMISSIVE}}",
        ),
    ]);
    assert_eq!(
        mode(&s, "apps", "web", 80).0,
        MtlsMode::Strict,
        "fail closed"
    );
    let mut got = problems(&s, "apps", "typo");
    got.sort();
    assert_eq!(
        got,
        [
            ("mtls.mode".to_string(), ProblemReason::UnknownValue),
            ("portLevelMtls.0".to_string(), ProblemReason::BadValue),
            ("portLevelMtls.http".to_string(), ProblemReason::BadValue),
        ]
    );
    // A selector in the root namespace: ignored, as Istio does.
    assert_eq!(
        problems(&s, "nodemesh-system", "selected"),
        [("selector".to_string(), ProblemReason::BadValue)]
    );
    assert!(!s.peer_authentication.compiled[&key("nodemesh-system", "selected")].in_force);
    assert_eq!(
        mode(&s, "secure", "vault", 80),
        (MtlsMode::Permissive, MtlsSource::Default)
    );
}

#[test]
fn the_root_namespace_is_configurable() {
    let mut s = state(&[pa("mesh-root", "default", "{mtls: {mode: STRICT}}")]);
    assert_eq!(mode(&s, "secure", "vault", 80).0, MtlsMode::Permissive);
    s.set_root_namespace(&"mesh-root".parse().unwrap());
    assert_eq!(
        mode(&s, "secure", "vault", 80),
        (
            MtlsMode::Strict,
            MtlsSource::Mesh {
                policy: key("mesh-root", "default")
            }
        )
    );
    // Later changes keep the root.
    s.apply(
        parse_manifest(&pa("apps", "default", "{mtls: {mode: PERMISSIVE}}"))
            .unwrap()
            .remove(0),
    );
    assert_eq!(mode(&s, "secure", "vault", 80).0, MtlsMode::Strict);
    assert_eq!(mode(&s, "apps", "web", 80).0, MtlsMode::Permissive);
    for bad in ["", "Upper", "-x", "x-", &"a".repeat(64), "a.b"] {
        assert!(bad.parse::<RootNamespace>().is_err(), "{bad:?}");
    }
    assert_eq!(RootNamespace::default().as_str(), "nodemesh-system");
}

#[test]
fn sources_are_named_for_people() {
    let s = state(&layered());
    let text = |pod: &str, port| s.mtls_mode(&key("apps", pod), port).source.to_string();
    assert_eq!(
        text("server", 9090),
        "PeerAuthentication apps/server (portLevelMtls 9090)"
    );
    assert_eq!(
        text("web", 1),
        "PeerAuthentication apps/default (namespace-wide)"
    );
}
