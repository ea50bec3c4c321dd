use super::*;
use crate::discovery::problem::ProblemReason;

fn compiled(spec: &str) -> CompiledPolicy {
    let policy: IstioPolicy = serde_yaml::from_str(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: apps}}\nspec: {spec}\n"
    ))
    .unwrap();
    compile_istio(&ObjectKey::new("apps", "p"), &policy)
}

fn problems(p: &CompiledPolicy) -> Vec<(String, ProblemReason)> {
    p.problems
        .iter()
        .map(|p| (p.field.clone(), p.reason))
        .collect()
}

#[test]
fn cidrs_hold_their_addresses_in_both_families() {
    let block: Cidr = "10.1.0.0/16".parse().unwrap();
    assert!(block.contains("10.1.255.3".parse().unwrap()));
    assert!(!block.contains("10.2.0.1".parse().unwrap()));
    assert!(
        block.contains("::ffff:10.1.0.9".parse().unwrap()),
        "v4-mapped"
    );
    let one: Cidr = "192.168.0.7".parse().unwrap();
    assert!(one.contains("192.168.0.7".parse().unwrap()));
    assert!(!one.contains("192.168.0.8".parse().unwrap()));
    let v6: Cidr = "fd00::/8".parse().unwrap();
    assert!(v6.contains("fd12::1".parse().unwrap()));
    assert!(!v6.contains("10.1.0.1".parse().unwrap()));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("8.8.8.8".parse().unwrap()));
    for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "x/8", ""] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
}

#[test]
fn strings_match_in_istios_four_forms() {
    let m = StringMatch::parse;
    assert!(m("/api/*").matches("/api/x") && !m("/api/*").matches("/apix"));
    assert!(m("*.json").matches("/a/b.json") && !m("*.json").matches("/a/b.jsonx"));
    assert!(m("*").matches("") && m("*").matches("anything"));
    assert!(m("GET").matches("GET") && !m("GET").matches("get"));
}

#[test]
fn what_cannot_be_compiled_is_reported_by_field_and_its_rule_is_broken() {
    let p = compiled(
        "{action: DENY, rules: [\
          {to: [{operation: {ports: ['8080', http]}}]},\
          {when: [{key: connection.sni, values: [x]}]},\
          {when: [{key: 'request.headers[]', values: [x]}, {key: made.up, values: [x]}]},\
          {from: [{source: {notIpBlocks: [bogus]}}], to: [{operation: {paths: ['/a/{*}']}}]},\
          {when: [{key: destination.port, values: ['99999']}]},\
          {from: [{source: {}}]},\
          {to: [{operation: {methods: [GET]}}]}]}",
    );
    let expected: Vec<(String, ProblemReason)> = [
        ("rules[0].to[0].operation.ports[1]", ProblemReason::BadValue),
        ("rules[1].when[0].key", ProblemReason::NotImplemented),
        ("rules[2].when[0].key", ProblemReason::BadValue),
        ("rules[2].when[1].key", ProblemReason::UnknownValue),
        (
            "rules[3].from[0].source.notIpBlocks[0]",
            ProblemReason::BadValue,
        ),
        (
            "rules[3].to[0].operation.paths[0]",
            ProblemReason::NotImplemented,
        ),
        ("rules[4].when[0].values[0]", ProblemReason::BadValue),
        ("rules[5].from[0].source", ProblemReason::BadValue),
    ]
    .into_iter()
    .map(|(f, r)| (f.to_string(), r))
    .collect();
    assert_eq!(problems(&p), expected);
    let broken: Vec<bool> = p.rules.iter().map(|r| *r == Rule::Broken).collect();
    assert_eq!(broken, [true, true, true, true, true, true, false]);
}

#[test]
fn custom_and_unknown_actions_deny_all_and_are_reported() {
    let p = compiled("{action: CUSTOM, provider: {name: opa}, rules: [{}]}");
    assert_eq!(
        p.action,
        Action::Custom {
            provider: Some("opa".into())
        }
    );
    assert!(p.action.denies_all());
    assert_eq!(
        problems(&p),
        [("action".to_string(), ProblemReason::NotImplemented)]
    );
    assert!(p.problems[0].detail.contains("CUSTOM"), "{:?}", p.problems);
    let p = compiled("{action: deny}");
    assert!(p.action.denies_all());
    assert_eq!(
        problems(&p),
        [("action".to_string(), ProblemReason::UnknownValue)]
    );
    assert_eq!(compiled("{}").action, Action::Allow, "ALLOW is the default");
}

#[test]
fn targets_are_the_selector_or_the_services_of_the_policys_namespace() {
    assert_eq!(
        compiled("{}").targets,
        [Target::Labels(BTreeMap::new())],
        "no selector: the whole namespace"
    );
    let p = compiled(
        "{targetRefs: [{kind: Service, group: '', name: web}, {kind: Gateway, group: gateway.networking.k8s.io, name: gw}, {kind: Service, name: far, namespace: other}]}",
    );
    assert_eq!(
        p.targets,
        [Target::Services(vec![ObjectKey::new("apps", "web")])]
    );
    assert_eq!(
        problems(&p),
        [
            ("targetRefs[1]".to_string(), ProblemReason::NotImplemented),
            ("targetRefs[2]".to_string(), ProblemReason::NotImplemented),
        ]
    );
    let p = compiled("{targetRef: {kind: Service, name: web}}");
    assert_eq!(
        p.targets,
        [Target::Services(vec![ObjectKey::new("apps", "web")])]
    );
}

#[test]
fn http_attributes_are_found_per_port() {
    let p = compiled(
        "{rules: [{to: [{operation: {ports: ['8080'], methods: [GET]}}, {operation: {ports: ['9090']}}]}]}",
    );
    assert!(p.is_http_on(8080));
    assert!(!p.is_http_on(9090), "the HTTP operation is for 8080 only");
    let p = compiled(
        "{rules: [{from: [{source: {requestPrincipals: ['*']}}], to: [{operation: {ports: ['9090']}}]}]}",
    );
    assert!(p.is_http_on(9090) && !p.is_http_on(8080));
    let p = compiled("{rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}");
    assert!(
        p.is_http_on(1) && p.is_http_on(65535),
        "no ports: every port"
    );
    let p = compiled("{rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}]}]}");
    assert!(!p.is_http(), "source.ip is L4");
    let p = compiled("{rules: [{to: [{operation: {notPaths: ['/x'], notPorts: ['8080']}}]}]}");
    assert!(p.is_http_on(9090) && !p.is_http_on(8080));
}

#[test]
fn nested_claim_keys_are_paths() {
    let p = compiled("{rules: [{when: [{key: 'request.auth.claims[a][b]', values: [x]}]}]}");
    let Rule::Match(body) = &p.rules[0] else {
        panic!("{p:?}")
    };
    assert_eq!(
        body.when[0].key,
        WhenKey::RequestClaim(vec!["a".into(), "b".into()])
    );
}
