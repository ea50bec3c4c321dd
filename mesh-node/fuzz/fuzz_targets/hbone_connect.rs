//! The HBONE server's decision on one CONNECT request (method, authority, the pod's
//! addresses), with the properties every answer must have.
#![no_main]

use std::net::IpAddr;

use http::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    discovery::cluster::canonical, hbone::target::connect_target, hbone::target::TargetRefusal,
};

// The input is text, one item a line (so seeds are readable): the method, the request
// target (`:authority` of a CONNECT), then the pod's addresses; lines that are not an
// IP address are skipped.
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = uri.parse::<Uri>() else {
        return;
    };
    let Ok(request) = Request::builder().method(method.clone()).uri(uri).body(()) else {
        return;
    };
    let local: Vec<IpAddr> = lines.filter_map(|l| l.parse().ok()).collect();
    let result = connect_target(&request, &local);
    let canonical_local: Vec<IpAddr> = local.iter().map(|ip| canonical(*ip)).collect();
    match result {
        Ok(target) => {
            assert_eq!(method, Method::CONNECT);
            assert_eq!(canonical(target.ip()), target.ip(), "target not canonical");
            assert!(
                canonical_local.contains(&target.ip()),
                "{target} is not local"
            );
            assert!(
                !mesh_common::is_mesh_pod_port(target.port()),
                "{target} is a mesh port"
            );
            assert_ne!(target.port(), 0);
            // The authority named exactly this address.
            let named = request
                .uri()
                .authority()
                .and_then(|a| a.as_str().parse::<std::net::SocketAddr>().ok())
                .expect("an accepted authority parses");
            assert_eq!(canonical(named.ip()), target.ip());
            assert_eq!(named.port(), target.port());
        }
        Err(refusal) => {
            assert!(matches!(
                refusal.reason().name(),
                "hbone_bad_method"
                    | "hbone_bad_authority"
                    | "hbone_target_not_local"
                    | "hbone_target_mesh_port"
            ));
            match refusal {
                TargetRefusal::BadMethod => assert_ne!(method, Method::CONNECT),
                TargetRefusal::BadAuthority => assert_eq!(method, Method::CONNECT),
                TargetRefusal::NotLocal(t) => {
                    assert_eq!(canonical(t.ip()), t.ip());
                    assert!(!canonical_local.contains(&t.ip()));
                }
                TargetRefusal::MeshPort(t) => {
                    assert!(canonical_local.contains(&t.ip()));
                    assert!(mesh_common::is_mesh_pod_port(t.port()));
                }
            }
            assert!(!refusal.to_string().is_empty());
            assert!(refusal.status().is_client_error());
        }
    }
});
