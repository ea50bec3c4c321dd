//! What an inbound HBONE CONNECT request may ask for, decided before anything is
//! connected: the method must be CONNECT, the authority an `ip:port` of this very pod,
//! and the port not one of the mesh's own in-pod listeners (a CONNECT to them would
//! tunnel the agent into itself). Pure, so it is unit-tested and fuzzed on its own.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};
use mesh_common::is_mesh_pod_port;
use thiserror::Error;

use crate::{discovery::cluster::canonical, telemetry::outcome::RefusalReason};

/// Why a CONNECT request is refused before any connection is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TargetRefusal {
    #[error("only CONNECT is served on the HBONE port")]
    BadMethod,
    #[error("the CONNECT authority is not an `ip:port` with a non-zero port")]
    BadAuthority,
    #[error("target {0} is not an address of this pod")]
    NotLocal(SocketAddr),
    #[error("target {0} is one of the mesh's own ports")]
    MeshPort(SocketAddr),
}

impl TargetRefusal {
    /// Why, as counted (`reason` of `nodemesh_connections_refused_total`) and recorded.
    pub fn reason(&self) -> RefusalReason {
        match self {
            TargetRefusal::BadMethod => RefusalReason::HboneBadMethod,
            TargetRefusal::BadAuthority => RefusalReason::HboneBadAuthority,
            TargetRefusal::NotLocal(_) => RefusalReason::HboneTargetNotLocal,
            TargetRefusal::MeshPort(_) => RefusalReason::HboneTargetMeshPort,
        }
    }

    /// The status the stream is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            TargetRefusal::BadMethod => StatusCode::METHOD_NOT_ALLOWED,
            TargetRefusal::BadAuthority => StatusCode::BAD_REQUEST,
            TargetRefusal::NotLocal(_) | TargetRefusal::MeshPort(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The (canonical) target asked for, when the authority named one.
    pub fn target(&self) -> Option<SocketAddr> {
        match self {
            TargetRefusal::NotLocal(t) | TargetRefusal::MeshPort(t) => Some(*t),
            TargetRefusal::BadMethod | TargetRefusal::BadAuthority => None,
        }
    }
}

/// The address a CONNECT request may be tunnelled to, given the pod's addresses
/// (`local_ips`, canonical: v4 as v4). A v4-mapped v6 authority is the v4 address.
pub fn connect_target<B>(
    request: &Request<B>,
    local_ips: &[IpAddr],
) -> Result<SocketAddr, TargetRefusal> {
    if request.method() != Method::CONNECT {
        return Err(TargetRefusal::BadMethod);
    }
    let target = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .filter(|t| t.port() != 0)
        .map(|t| SocketAddr::new(canonical(t.ip()), t.port()))
        .ok_or(TargetRefusal::BadAuthority)?;
    if !local_ips.iter().any(|ip| canonical(*ip) == target.ip()) {
        return Err(TargetRefusal::NotLocal(target));
    }
    if is_mesh_pod_port(target.port()) {
        return Err(TargetRefusal::MeshPort(target));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_V4: &str = "10.0.1.5";
    const POD_V6: &str = "fd00::1:5";

    fn local() -> Vec<IpAddr> {
        vec![POD_V4.parse().unwrap(), POD_V6.parse().unwrap()]
    }

    fn connect(authority: &str) -> Result<SocketAddr, TargetRefusal> {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap();
        connect_target(&request, &local())
    }

    #[test]
    fn a_connect_to_an_application_port_of_this_pod_is_its_target() {
        assert_eq!(
            connect("10.0.1.5:8080"),
            Ok("10.0.1.5:8080".parse().unwrap())
        );
        assert_eq!(
            connect("[fd00::1:5]:80"),
            Ok("[fd00::1:5]:80".parse().unwrap())
        );
        // v4-mapped v6 is the v4 address, as the kernel would connect it.
        assert_eq!(
            connect("[::ffff:10.0.1.5]:8080"),
            Ok("10.0.1.5:8080".parse().unwrap())
        );
    }

    #[test]
    fn only_connect_is_served() {
        for method in [Method::GET, Method::POST, Method::OPTIONS] {
            let request = Request::builder()
                .method(method)
                .uri("http://10.0.1.5:8080/")
                .body(())
                .unwrap();
            let refused = connect_target(&request, &local()).unwrap_err();
            assert_eq!(refused, TargetRefusal::BadMethod);
            assert_eq!(refused.reason().name(), "hbone_bad_method");
            assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        }
    }

    #[test]
    fn authorities_that_are_not_ip_and_port_are_refused() {
        for authority in [
            "web.apps.svc:8080",
            "10.0.1.5",
            "10.0.1.5:0",
            "10.0.1.5:65536",
            "[fd00::1:5]",
            "user@10.0.1.5:8080",
        ] {
            let refused = connect(authority).unwrap_err();
            assert_eq!(refused, TargetRefusal::BadAuthority, "{authority}");
            assert_eq!(refused.reason().name(), "hbone_bad_authority");
            assert_eq!(refused.target(), None);
        }
        let no_authority = Request::builder()
            .method(Method::CONNECT)
            .uri("/")
            .body(())
            .unwrap();
        assert_eq!(
            connect_target(&no_authority, &local()),
            Err(TargetRefusal::BadAuthority)
        );
    }

    #[test]
    fn another_pods_address_is_refused() {
        for authority in ["10.0.1.6:8080", "127.0.0.1:8080", "[::1]:8080"] {
            let refused = connect(authority).unwrap_err();
            assert!(matches!(refused, TargetRefusal::NotLocal(_)), "{authority}");
            assert_eq!(refused.reason().name(), "hbone_target_not_local");
            assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        }
    }

    #[test]
    fn the_meshs_own_ports_are_never_a_target() {
        for authority in [
            "10.0.1.5:15001",
            "10.0.1.5:15006",
            "10.0.1.5:15008",
            "[fd00::1:5]:15008",
            "[::ffff:10.0.1.5]:15006",
        ] {
            let refused = connect(authority).unwrap_err();
            assert!(matches!(refused, TargetRefusal::MeshPort(_)), "{authority}");
            assert_eq!(refused.reason().name(), "hbone_target_mesh_port");
            assert_eq!(refused.status(), StatusCode::FORBIDDEN);
            assert_eq!(
                refused.target().map(|t| t.ip().is_ipv4()),
                Some(!authority.starts_with("[fd"))
            );
        }
    }

    #[test]
    fn v4_mapped_local_addresses_count_as_v4() {
        let mapped: Vec<IpAddr> = vec!["::ffff:10.0.1.5".parse().unwrap()];
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.1.5:8080")
            .body(())
            .unwrap();
        assert_eq!(
            connect_target(&request, &mapped),
            Ok("10.0.1.5:8080".parse().unwrap())
        );
    }

    /// A CONNECT as h2 hands it over: the URI is the `:authority` alone, which the
    /// `http` authority parser has accepted (h2 resets a stream whose authority it
    /// refuses, so only these reach `connect_target`).
    fn connect_as_h2(authority: &str) -> Result<SocketAddr, TargetRefusal> {
        let parsed = http::uri::Authority::try_from(authority).unwrap_or_else(|e| {
            panic!("{authority:?} never reaches connect_target (h2 refuses it: {e}); test another")
        });
        let mut parts = http::uri::Parts::default();
        parts.authority = Some(parsed);
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(http::Uri::from_parts(parts).unwrap())
            .body(())
            .unwrap();
        connect_target(&request, &local())
    }

    fn assert_bad_authority(authorities: &[&str]) {
        for authority in authorities {
            let shown = &authority[..authority.len().min(60)];
            let refused = connect_as_h2(authority).unwrap_err();
            assert_eq!(refused, TargetRefusal::BadAuthority, "{shown}");
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{shown}");
            assert_eq!(refused.target(), None, "{shown}");
        }
    }

    #[test]
    fn ipv4_and_bracketed_ipv6_authorities_name_their_target() {
        for (authority, target) in [
            ("10.0.1.5:8080", "10.0.1.5:8080"),
            ("10.0.1.5:1", "10.0.1.5:1"),
            ("10.0.1.5:65535", "10.0.1.5:65535"),
            ("[fd00::1:5]:443", "[fd00::1:5]:443"),
            ("[fd00:0:0:0:0:0:1:5]:443", "[fd00::1:5]:443"),
            ("[::ffff:10.0.1.5]:8080", "10.0.1.5:8080"),
            // Leading zeros in a port change nothing: it is still decimal.
            ("10.0.1.5:08080", "10.0.1.5:8080"),
        ] {
            assert_eq!(
                connect_as_h2(authority),
                Ok(target.parse().unwrap()),
                "{authority}"
            );
        }
    }

    #[test]
    fn a_missing_or_zero_port_is_a_bad_authority() {
        assert_bad_authority(&[
            "10.0.1.5",
            "10.0.1.5:",
            "[fd00::1:5]",
            "[fd00::1:5]:",
            "10.0.1.5:0",
            "10.0.1.5:00000",
            "[fd00::1:5]:0",
            "[::ffff:10.0.1.5]:0",
            ":8080",
        ]);
    }

    #[test]
    fn a_port_beyond_65535_or_with_a_sign_is_a_bad_authority() {
        assert_bad_authority(&[
            "10.0.1.5:65536",
            "10.0.1.5:99999",
            // 2^32 + 80 and 2^64 + 80: no wrapping into port 80.
            "10.0.1.5:4294967376",
            "10.0.1.5:18446744073709551696",
            "[fd00::1:5]:65536",
            "10.0.1.5:-1",
            "10.0.1.5:+80",
        ]);
    }

    #[test]
    fn host_names_and_unusual_ipv4_spellings_are_refused() {
        // Only an address names a target: nothing is resolved, and no spelling that
        // some resolver would read as another address gets through.
        assert_bad_authority(&[
            "localhost:8080",
            "web.apps.svc.cluster.local:80",
            "pod-10-0-1-5:8080",
            "010.0.1.5:8080",
            "0x0a.0.1.5:8080",
            "10.1.5:8080",
            "167772421:8080",
            "10.0.1.5.:8080",
            "[10.0.1.5]:8080",
        ]);
    }

    #[test]
    fn userinfo_is_refused() {
        assert_bad_authority(&[
            "user@10.0.1.5:8080",
            "user:secret@10.0.1.5:8080",
            "user:pw@[fd00::1:5]:8080",
            "@10.0.1.5:8080",
            "10.0.1.5:8080@10.0.1.6:80",
        ]);
    }

    #[test]
    fn trailing_garbage_and_zone_ids_are_refused() {
        assert_bad_authority(&[
            "10.0.1.5:8080abc",
            "10.0.1.5:80.0",
            "[fd00::1:5]:80x",
            "[fd00::1:5%eth0]:8080",
            "[fe80::1%25eth0]:8080",
        ]);
    }

    #[test]
    fn an_empty_or_absent_authority_is_refused() {
        // h2 refuses an empty `:authority` itself; a CONNECT with none at all reaches
        // us as a URI without authority.
        assert!(http::uri::Authority::try_from("").is_err());
        for uri in ["/", "*"] {
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(uri)
                .body(())
                .unwrap();
            assert_eq!(
                connect_target(&request, &local()),
                Err(TargetRefusal::BadAuthority),
                "{uri}"
            );
        }
    }

    #[test]
    fn over_long_authorities_are_refused_without_being_echoed() {
        // The header list is bounded at 16 KiB; anything near it is refused, and the
        // refusal (logged and counted) does not carry the input.
        let n = 16 * 1024;
        let long_port = format!("10.0.1.5:{}", "8".repeat(n));
        let padded_address = format!("{}10.0.1.5:8080", "0".repeat(n));
        let long_name = format!("{}:8080", "a".repeat(n));
        let long_userinfo = format!("{}@10.0.1.5:8080", "u".repeat(n));
        let authorities = [
            long_port.as_str(),
            &padded_address,
            &long_name,
            &long_userinfo,
        ];
        assert_bad_authority(&authorities);
        for authority in authorities {
            let refused = connect_as_h2(authority).unwrap_err();
            assert!(refused.to_string().len() < 100, "{refused}");
        }
    }

    #[test]
    fn a_zero_padded_port_does_not_slip_past_the_mesh_port_check() {
        assert_eq!(
            connect_as_h2("10.0.1.5:015008"),
            Err(TargetRefusal::MeshPort("10.0.1.5:15008".parse().unwrap()))
        );
    }

    #[test]
    fn another_address_is_refused_naming_it_canonically() {
        assert_eq!(
            connect_as_h2("[::ffff:10.0.1.6]:8080"),
            Err(TargetRefusal::NotLocal("10.0.1.6:8080".parse().unwrap()))
        );
        // A pod whose addresses are not known yet accepts nothing.
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.1.5:8080")
            .body(())
            .unwrap();
        assert_eq!(
            connect_target(&request, &[]),
            Err(TargetRefusal::NotLocal("10.0.1.5:8080".parse().unwrap()))
        );
    }

    #[test]
    fn each_refusal_kind_has_its_own_reason_status_and_target() {
        let get = Request::builder()
            .method(Method::GET)
            .uri("10.0.1.5:8080")
            .body(())
            .unwrap();
        let refusals = [
            (
                connect_target(&get, &local()).unwrap_err(),
                "hbone_bad_method",
                StatusCode::METHOD_NOT_ALLOWED,
                None,
            ),
            (
                connect("web:8080").unwrap_err(),
                "hbone_bad_authority",
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                connect("10.0.1.6:8080").unwrap_err(),
                "hbone_target_not_local",
                StatusCode::FORBIDDEN,
                Some("10.0.1.6:8080"),
            ),
            (
                connect("[::ffff:10.0.1.5]:15008").unwrap_err(),
                "hbone_target_mesh_port",
                StatusCode::FORBIDDEN,
                Some("10.0.1.5:15008"),
            ),
        ];
        for (refusal, reason, status, target) in &refusals {
            assert_eq!(refusal.reason().name(), *reason, "{refusal:?}");
            assert_eq!(refusal.status(), *status, "{refusal:?}");
            assert_eq!(
                refusal.target(),
                target.map(|t| t.parse().unwrap()),
                "{refusal:?}"
            );
            assert!(!refusal.to_string().is_empty());
        }
        let mut reasons: Vec<_> = refusals.iter().map(|r| r.1).collect();
        reasons.dedup();
        assert_eq!(reasons.len(), 4, "one metric reason per kind");
    }

    #[test]
    fn checks_run_method_then_authority_then_address_then_port() {
        // Which refusal a request gets decides the metric it is counted under.
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://web:15008/")
            .body(())
            .unwrap();
        assert_eq!(
            connect_target(&get, &local()),
            Err(TargetRefusal::BadMethod)
        );
        assert_eq!(connect("web:15008"), Err(TargetRefusal::BadAuthority));
        assert_eq!(
            connect("10.0.1.6:15008"),
            Err(TargetRefusal::NotLocal("10.0.1.6:15008".parse().unwrap()))
        );
    }
}
