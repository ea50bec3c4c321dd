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
}
