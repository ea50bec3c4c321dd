use super::*;
use crate::discovery::traffic_policy::{compile as compile_rule, CompiledRule, LbPolicy};
use crate::{
    discovery::{cluster::KubeObject, files::parse_manifest},
    keys::ObjectKey,
};

fn rule(lb: &str) -> CompiledRule {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: apps}}\n\
         spec:\n  host: web\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 3}}\n    loadBalancer: {lb}\n"
    );
    let objects = parse_manifest(&yaml).expect("valid yaml");
    let Some(KubeObject::DestinationRule(dr)) = objects.into_iter().next() else {
        panic!("not a DestinationRule");
    };
    compile_rule(&ObjectKey::new("apps", "web"), &dr)
}

fn hash_of(lb: &str) -> Option<HashPolicy> {
    let r = rule(lb);
    assert!(r.is_valid(), "{:?}", r.problems);
    r.endpoint_policy(80, None).unwrap().consistent_hash
}

#[test]
fn each_key_source_compiles_with_istio_defaults() {
    let h = hash_of("{consistentHash: {httpHeaderName: X-User}}").unwrap();
    assert_eq!(
        h.key,
        HashKey::Header {
            name: "x-user".into()
        }
    );
    assert_eq!(
        h.table,
        HashTable::RingHash {
            minimum_ring_size: DEFAULT_RING_SIZE
        }
    );
    let h = hash_of(
        "{consistentHash: {httpCookie: {name: session, path: /, ttl: 3600s}, maglev: {tableSize: 251}}}",
    )
    .unwrap();
    assert_eq!(
        h.key,
        HashKey::Cookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl_ms: Some(3_600_000)
        }
    );
    assert_eq!(h.table, HashTable::Maglev { table_size: 251 });
    let h = hash_of("{consistentHash: {httpCookie: {name: s, ttl: 0s}}}").unwrap();
    assert!(matches!(
        h.key,
        HashKey::Cookie {
            ttl_ms: Some(0),
            ..
        }
    ));
    let h = hash_of("{consistentHash: {httpCookie: {name: s}}}").unwrap();
    assert!(matches!(h.key, HashKey::Cookie { ttl_ms: None, .. }));
    let h = hash_of("{consistentHash: {useSourceIp: true, minimumRingSize: 4096}}").unwrap();
    assert_eq!(h.key, HashKey::SourceIp);
    assert_eq!(
        h.table,
        HashTable::RingHash {
            minimum_ring_size: 4096
        }
    );
    let h = hash_of(
        "{consistentHash: {httpQueryParameterName: user, ringHash: {minimumRingSize: 64}}}",
    )
    .unwrap();
    assert_eq!(
        h.key,
        HashKey::QueryParameter {
            name: "user".into()
        }
    );
    assert_eq!(h.to_string(), "query parameter user, ring hash 64");
    let r = rule("{consistentHash: {httpHeaderName: x-user}}");
    assert_eq!(
        r.endpoint_policy(80, None).unwrap().load_balancer,
        LbPolicy::ConsistentHash
    );
}

#[test]
fn a_broken_consistent_hash_is_reported_and_the_rest_of_the_rule_applies() {
    for (lb, field) in [
        (
            "{consistentHash: {}}",
            "trafficPolicy.loadBalancer.consistentHash",
        ),
        (
            "{consistentHash: {httpHeaderName: a, useSourceIp: true}}",
            "trafficPolicy.loadBalancer.consistentHash",
        ),
        (
            "{consistentHash: {httpHeaderName: \"bad name\"}}",
            "trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
        ),
        (
            "{consistentHash: {httpCookie: {name: s, ttl: soon}}}",
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        ),
        (
            "{consistentHash: {httpCookie: {name: s, path: \"/a;b\"}}}",
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
        ),
        (
            "{consistentHash: {useSourceIp: true, ringHash: {}, maglev: {}}}",
            "trafficPolicy.loadBalancer.consistentHash",
        ),
        (
            "{consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}",
            "trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        ),
        (
            "{consistentHash: {useSourceIp: yes please}}",
            "trafficPolicy.loadBalancer.consistentHash",
        ),
        (
            "{simple: RANDOM, consistentHash: {useSourceIp: true}}",
            "trafficPolicy.loadBalancer.consistentHash",
        ),
    ] {
        let r = rule(lb);
        assert!(r.is_valid(), "{lb}: the rest applies: {:?}", r.problems);
        assert_eq!(r.problems.len(), 1, "{lb}: {:?}", r.problems);
        assert_eq!(r.problems[0].field, field, "{lb}");
        assert_eq!(r.problems[0].reason, ProblemReason::InvalidField, "{lb}");
        let p = r.endpoint_policy(80, None).unwrap();
        assert!(p.consistent_hash.is_none(), "{lb}");
        assert_ne!(p.load_balancer, LbPolicy::ConsistentHash, "{lb}");
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx, 3, "{lb}");
    }
}

#[test]
fn unknown_fields_are_reported_and_sizes_are_capped() {
    let r = rule(
        "{consistentHash: {httpCookie: {name: s, attributes: [{name: Secure}]}, ringHash: {minimumRingSize: 99999999, maximumRingSize: 5}, hashKey: x}}",
    );
    assert!(r.is_valid(), "{:?}", r.problems);
    let mut got: Vec<(String, ProblemReason)> = r
        .problems
        .iter()
        .map(|p| (p.field.clone(), p.reason))
        .collect();
    got.sort();
    let at = |f: &str| format!("trafficPolicy.loadBalancer.consistentHash.{f}");
    assert_eq!(
        got,
        [
            (at("hashKey"), ProblemReason::NotImplemented),
            (at("httpCookie.attributes"), ProblemReason::NotImplemented),
            (
                at("ringHash.maximumRingSize"),
                ProblemReason::NotImplemented
            ),
            (at("ringHash.minimumRingSize"), ProblemReason::Capped),
        ]
    );
    let h = r
        .endpoint_policy(80, None)
        .unwrap()
        .consistent_hash
        .unwrap();
    assert_eq!(
        h.table,
        HashTable::RingHash {
            minimum_ring_size: MAX_RING_SIZE
        }
    );
    let h = hash_of("{consistentHash: {useSourceIp: true, maglev: {tableSize: 5000011}}}");
    assert_eq!(
        h.unwrap().table,
        HashTable::Maglev {
            table_size: MAX_MAGLEV_TABLE_SIZE
        }
    );
    assert!(is_prime(MAX_MAGLEV_TABLE_SIZE) && is_prime(DEFAULT_MAGLEV_TABLE_SIZE));
}

#[test]
fn a_port_setting_or_subset_overrides_the_whole_load_balancer() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: apps}\n\
         spec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n    \
         portLevelSettings:\n    - port: {number: 9080}\n      loadBalancer: {simple: RANDOM}\n    \
         - port: {number: 9090}\n      loadBalancer: {consistentHash: {useSourceIp: true}}\n  \
         subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      loadBalancer: {consistentHash: {httpQueryParameterName: u}}\n";
    let objects = parse_manifest(yaml).expect("valid yaml");
    let Some(KubeObject::DestinationRule(dr)) = objects.into_iter().next() else {
        panic!("not a DestinationRule");
    };
    let r = compile_rule(&ObjectKey::new("apps", "web"), &dr);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let key = |port, subset| {
        r.endpoint_policy(port, subset)
            .unwrap()
            .consistent_hash
            .map(|h| h.key)
    };
    assert_eq!(
        key(80, None),
        Some(HashKey::Header {
            name: "x-user".into()
        })
    );
    assert_eq!(key(9080, None), None);
    assert_eq!(
        r.endpoint_policy(9080, None).unwrap().load_balancer,
        LbPolicy::Random
    );
    assert_eq!(key(9090, None), Some(HashKey::SourceIp));
    assert_eq!(
        key(80, Some("v1")),
        Some(HashKey::QueryParameter { name: "u".into() })
    );
}
