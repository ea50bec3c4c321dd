//! `/status`, `/connections`, `/logging`, `/` and the error answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{config::Source, telemetry::connections::ConnectionRecord};

/// `/status`: one view of the agent's health, readiness, state freshness, what it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    pub version: String,
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    pub uptime_seconds: u64,
    /// The agent is stopping: listeners closed, open connections running to their end.
    #[serde(default)]
    pub draining: bool,
    /// A hand-over between agents this one took part in (an upgrade).
    #[serde(default)]
    pub handover: crate::handover::HandoverView,
    pub mtls: bool,
    pub trust_domain: String,
    pub source: Source,
    pub state: StateSummary,
    pub workloads: WorkloadCounts,
    pub connections: ConnectionCounts,
    pub certificates: CertificateCounts,
    /// Each tracing provider's exporter (empty: tracing is not configured).
    #[serde(default)]
    pub tracing: Vec<ExporterView>,
}

/// A tracing provider's export: spans queued, sent, dropped, the last error.
pub use crate::telemetry::spans::export::ExporterStatus as ExporterView;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateSummary {
    /// Objects of the cluster state by kind.
    pub objects: BTreeMap<String, usize>,
    pub updates: u64,
    /// Seconds since the last update (None before the first).
    pub age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadCounts {
    pub total: usize,
    pub enrolled: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCounts {
    pub live_outbound: usize,
    pub live_inbound: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateCounts {
    pub total: usize,
    pub valid: usize,
}

/// `/connections`: live proxied connections and the recently closed ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsView {
    pub live: Vec<ConnectionRecord>,
    pub closed: Vec<ConnectionRecord>,
}

/// `/logging`: the log filter in force (GET), or the one just set (POST).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLevelView {
    pub level: String,
}

/// `/`: the endpoints the admin API answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexView {
    pub endpoints: Vec<String>,
}

/// The body of every JSON error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        admin::api::round_trip::check, keys::ObjectKey, telemetry::connections::ConnectionInfo,
        telemetry::connections::Direction, telemetry::connections::Security,
        telemetry::outcome::ConnectionEnd,
    };

    #[test]
    fn status_keeps_its_wire_form() {
        let view = StatusView {
            node: "a".into(),
            version: "0.1.0".into(),
            ready: false,
            not_ready_reason: Some("eBPF or first reconcile pending".into()),
            uptime_seconds: 12,
            draining: false,
            handover: Default::default(),
            mtls: true,
            trust_domain: "cluster.local".into(),
            source: Source::Kube,
            state: StateSummary {
                objects: BTreeMap::from([("Pod".into(), 3), ("Service".into(), 2)]),
                updates: 7,
                age_seconds: Some(1.5),
            },
            workloads: WorkloadCounts {
                total: 3,
                enrolled: 2,
            },
            connections: ConnectionCounts {
                live_outbound: 1,
                live_inbound: 4,
            },
            certificates: CertificateCounts { total: 2, valid: 1 },
            tracing: vec![ExporterView {
                provider: "otel".into(),
                protocol: "otlp-grpc".into(),
                endpoint: "collector:4317".into(),
                queued: 3,
                sent: 120,
                dropped: 7,
                last_error: Some("no answer within 5s".into()),
                last_success_unix: Some(1_700_000_000),
            }],
        };
        check(
            &view,
            json!({
                "node": "a", "version": "0.1.0", "ready": false,
                "not_ready_reason": "eBPF or first reconcile pending",
                "uptime_seconds": 12, "draining": false,
                "handover": {"took_over_from": null, "inherited_listeners": 0, "accept_gap_ms": null,
                    "predecessor_draining": null, "predecessor_drained": null,
                    "predecessor_exited": false, "handed_over_to": null},
                "mtls": true, "trust_domain": "cluster.local",
                "source": "kube",
                "state": {"objects": {"Pod": 3, "Service": 2}, "updates": 7, "age_seconds": 1.5},
                "workloads": {"total": 3, "enrolled": 2},
                "connections": {"live_outbound": 1, "live_inbound": 4},
                "certificates": {"total": 2, "valid": 1},
                "tracing": [{"provider": "otel", "protocol": "otlp-grpc",
                    "endpoint": "collector:4317", "queued": 3, "sent": 120, "dropped": 7,
                    "last_error": "no answer within 5s", "last_success_unix": 1_700_000_000}],
            }),
        );
        let fresh = StatusView {
            not_ready_reason: None,
            state: StateSummary {
                age_seconds: None,
                ..view.state.clone()
            },
            ..view
        };
        let json = serde_json::to_value(&fresh).unwrap();
        assert!(json["not_ready_reason"].is_null() && json["state"]["age_seconds"].is_null());
        // meshctl prints the source by its name: the one the JSON gives.
        for source in [Source::Files, Source::Kube] {
            assert_eq!(serde_json::to_value(source).unwrap(), source.name());
        }
    }

    #[test]
    fn connections_keep_their_wire_form() {
        let info = ConnectionInfo {
            peer: Some(ObjectKey::new("apps", "server")),
            service: Some("apps/web:80".parse().unwrap()),
            backend: Some(ObjectKey::new("apps", "web-v1")),
            upstream: Some("10.0.0.9:8080".parse().unwrap()),
            security: Security::MutualTls,
            source_identity: Some("spiffe://cluster.local/ns/apps/sa/client".into()),
            destination_identity: Some("spiffe://cluster.local/ns/apps/sa/server".into()),
            ..ConnectionInfo::new(
                Direction::Outbound,
                ObjectKey::new("apps", "client"),
                "10.0.0.5:40000".parse().unwrap(),
                "10.96.0.10:80".parse().unwrap(),
            )
        };
        let record = ConnectionRecord {
            id: 9,
            info,
            started_unix_ms: 1_700_000_000_000,
            duration_ms: 2500,
            bytes_to_server: 100,
            bytes_to_client: 2048,
            end: None,
        };
        let closed = ConnectionRecord {
            info: ConnectionInfo::new(
                Direction::Inbound,
                ObjectKey::new("apps", "server"),
                "10.0.0.5:40001".parse().unwrap(),
                "10.0.0.9:8080".parse().unwrap(),
            ),
            end: Some(ConnectionEnd::Completed),
            ..record.clone()
        };
        check(
            &ConnectionsView {
                live: vec![record],
                closed: vec![closed],
            },
            json!({
                "live": [{
                    "id": 9, "direction": "outbound",
                    "pod": {"namespace": "apps", "name": "client"},
                    "src": "10.0.0.5:40000", "original_dst": "10.96.0.10:80",
                    "peer": {"namespace": "apps", "name": "server"},
                    "service": "apps/web:80", "backend": "apps/web-v1", "upstream": "10.0.0.9:8080",
                    "security": "mutual_tls",
                    "source_identity": "spiffe://cluster.local/ns/apps/sa/client",
                    "destination_identity": "spiffe://cluster.local/ns/apps/sa/server",
                    "started_unix_ms": 1_700_000_000_000u64, "duration_ms": 2500,
                    "bytes_to_server": 100, "bytes_to_client": 2048, "result": "open",
                }],
                "closed": [{
                    "id": 9, "direction": "inbound",
                    "pod": {"namespace": "apps", "name": "server"},
                    "src": "10.0.0.5:40001", "original_dst": "10.0.0.9:8080",
                    "peer": null, "service": null, "backend": null, "upstream": null,
                    "security": "none", "source_identity": null, "destination_identity": null,
                    "started_unix_ms": 1_700_000_000_000u64, "duration_ms": 2500,
                    "bytes_to_server": 100, "bytes_to_client": 2048, "result": "completed",
                }],
            }),
        );
    }

    #[test]
    fn log_level_index_and_errors_keep_their_wire_form() {
        check(
            &LogLevelView {
                level: "info,nodemesh=debug".into(),
            },
            json!({"level": "info,nodemesh=debug"}),
        );
        check(
            &IndexView {
                endpoints: vec!["/status".into(), "/".into()],
            },
            json!({"endpoints": ["/status", "/"]}),
        );
        check(
            &ErrorView {
                error: "no such endpoint".into(),
            },
            json!({"error": "no such endpoint"}),
        );
    }
}
