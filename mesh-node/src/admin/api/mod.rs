//! The admin API's answers as types: the agent serializes them, `meshctl` deserializes
//! them and renders from their fields, so a field renamed on one side is a compile
//! error on the other instead of a blank column. The tests of each view pin its JSON.
//!
//! Where a lower room already keeps a type for what the admin API shows (a workload, a
//! certificate, a connection), the view is that type; where the agent's own type is
//! shaped for its work (the trace, a resolution, the eBPF status), the view is its own
//! type here and `admin::views` builds it.

mod bpf;
mod policies;
mod routes;
mod services;
mod status;
mod trace;

pub use bpf::{BpfView, MapView, ProgramView};
pub use policies::{
    Action, AuthzPolicyView, MtlsMode, NamespaceView, PeerAuthLevel, PeerAuthenticationView,
    PoliciesView, PolicyKind, PolicyView, PortMtlsView, WorkloadAuthzView, WorkloadMtlsView,
};
pub use routes::{BackendView, Chosen, ParentView, RouteKind, RouteView, RuleView};
pub use services::{DestinationRuleView, ResolutionView, ResolvedBackendView, ServiceView};
pub use status::{
    CertificateCounts, ConnectionCounts, ConnectionsView, ErrorView, ExporterView, IndexView,
    LogLevelView, StateSummary, StatusView, WorkloadCounts,
};
pub use trace::{
    AdmissionView, CandidateView, HashView, HttpRequestView, InboundView, RedirectView,
    RequestView, SourceView, TraceOutcome, TraceTransport, TraceView,
};

pub use crate::{
    identity::certificates::CertificateState, identity::certificates::CertificateStatus,
    telemetry::connections::ConnectionInfo, telemetry::connections::ConnectionRecord,
    telemetry::connections::Direction, telemetry::connections::Security, workloads::WorkloadStatus,
};

#[cfg(test)]
pub(crate) mod round_trip {
    use serde::{de::DeserializeOwned, Serialize};

    /// Serializes `view`, checks the JSON is `expected`, and reads it back as the same
    /// view: what the agent writes is what meshctl reads.
    pub(crate) fn check<T>(view: &T, expected: serde_json::Value)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_value(view).expect("a view serializes");
        assert_eq!(json, expected, "the wire form of the view changed");
        let text = serde_json::to_string_pretty(view).expect("a view serializes");
        let back: T = serde_json::from_str(&text).expect("a view reads back");
        assert_eq!(&back, view);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{round_trip::check, *};
    use crate::{identity::Identity, keys::ObjectKey};

    #[test]
    fn workloads_keep_their_wire_form() {
        let enrolled = WorkloadStatus {
            pod: ObjectKey::new("apps", "client"),
            uid: "uid-1".into(),
            ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            service_account: "client".into(),
            enrolled: true,
            reason: None,
            netns: Some("/proc/42/ns/net".into()),
            netns_cookie: Some(4097),
            listeners: vec![
                "10.0.0.5:15001".parse().unwrap(),
                "[fd00::5]:15008".parse().unwrap(),
            ],
            held: false,
        };
        let bystander = WorkloadStatus {
            pod: ObjectKey::new("plain", "bystander"),
            enrolled: false,
            reason: Some("namespace_not_enrolled".into()),
            netns: None,
            netns_cookie: None,
            listeners: vec![],
            held: true,
            ..enrolled.clone()
        };
        check(
            &vec![enrolled, bystander],
            json!([
                {
                    "namespace": "apps", "name": "client", "uid": "uid-1",
                    "ips": ["10.0.0.5", "fd00::5"], "service_account": "client", "enrolled": true,
                    "reason": null, "netns": "/proc/42/ns/net", "netns_cookie": 4097,
                    "listeners": ["10.0.0.5:15001", "[fd00::5]:15008"], "held": false,
                },
                {
                    "namespace": "plain", "name": "bystander", "uid": "uid-1",
                    "ips": ["10.0.0.5", "fd00::5"], "service_account": "client", "enrolled": false,
                    "reason": "namespace_not_enrolled", "netns": null, "netns_cookie": null,
                    "listeners": [], "held": true,
                },
            ]),
        );
    }

    #[test]
    fn certificates_keep_their_wire_form() {
        let valid = CertificateStatus {
            identity: Identity::new("cluster.local", "apps", "client"),
            state: CertificateState::Valid,
            serial: Some("0a1b2c".into()),
            not_before_unix: Some(1_700_000_000),
            not_after_unix: Some(1_700_086_400),
            last_error: None,
        };
        let pending = CertificateStatus {
            identity: Identity::new("cluster.local", "apps", "server"),
            state: CertificateState::Pending,
            serial: None,
            not_before_unix: None,
            not_after_unix: None,
            last_error: Some("CA unreachable".into()),
        };
        check(
            &vec![valid, pending],
            json!([
                {
                    "identity": "spiffe://cluster.local/ns/apps/sa/client", "state": "valid",
                    "serial": "0a1b2c", "not_before_unix": 1_700_000_000u64,
                    "not_after_unix": 1_700_086_400u64, "last_error": null,
                },
                {
                    "identity": "spiffe://cluster.local/ns/apps/sa/server", "state": "pending",
                    "serial": null, "not_before_unix": null, "not_after_unix": null,
                    "last_error": "CA unreachable",
                },
            ]),
        );
        for state in [
            CertificateState::Valid,
            CertificateState::Expired,
            CertificateState::Pending,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }
}
