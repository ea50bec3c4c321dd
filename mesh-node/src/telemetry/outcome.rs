//! How a proxied connection ended ([`ConnectionEnd`]), why one was refused
//! ([`RefusalReason`]), and the Envoy-style response flags ([`ResponseFlags`]) that
//! summarise an end in the metrics and the access log.
//!
//! The text of an end (`completed`, `refused: no_ready_endpoint`, ...) is what the
//! admin API and the access log show under `result`; it is produced by `Display`. The
//! agent never reads it back (the flags come from the variant); `meshctl` does, when it
//! deserializes the admin API's answer ([`ConnectionEnd::from_result`]).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Envoy-style response flags, Istio's `response_flags` label: one small, fixed set
/// for TCP connections and HTTP requests alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    /// `-`: nothing to report.
    #[default]
    None,
    /// `NR`: no such Service (port), no route rule matched, or a misdirected tunnel.
    NoRoute,
    /// `UH`: no healthy upstream (the chosen backend has no ready endpoint).
    NoHealthyUpstream,
    /// `UF`: connecting to the upstream (or tunnelling to it) failed.
    UpstreamConnectFailure,
    /// `UT`: the upstream did not answer in time.
    UpstreamTimeout,
    /// `URX`: retries exhausted on a retriable response.
    RetryLimit,
    /// `LR`: answered by the proxy itself (redirect, invalid rule).
    LocalReply,
    /// `RBAC`: refused by authorization policy, STRICT mTLS, or the mesh's own rules.
    Denied,
    /// `SI`: nothing moved for the idle timeout.
    StreamIdleTimeout,
    /// `UC`: the relay ended on an error (reset, broken pipe, the tunnel's stream failed).
    ConnectionTerminated,
    /// `DC`: the downstream went away, or the proxy cut the connection short (pod
    /// removed, agent stopping).
    DownstreamClosed,
    /// `DPE`: the downstream broke HTTP, or sent no complete request head within the
    /// header timeout.
    DownstreamProtocolError,
    /// `FI`: the route's fault injection aborted the request.
    FaultInjected,
    /// `DI`: the route's fault injection delayed the request (then sent on).
    DelayInjected,
    /// `UO`: upstream overflow: the destination's connection pool (a DestinationRule's
    /// `connectionPool`) was full, so the proxy answered 503 or refused the connection.
    UpstreamOverflow,
}

impl ResponseFlags {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::NoRoute => "NR",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::UpstreamConnectFailure => "UF",
            ResponseFlags::UpstreamTimeout => "UT",
            ResponseFlags::RetryLimit => "URX",
            ResponseFlags::LocalReply => "LR",
            ResponseFlags::Denied => "RBAC",
            ResponseFlags::StreamIdleTimeout => "SI",
            ResponseFlags::ConnectionTerminated => "UC",
            ResponseFlags::DownstreamClosed => "DC",
            ResponseFlags::DownstreamProtocolError => "DPE",
            ResponseFlags::FaultInjected => "FI",
            ResponseFlags::DelayInjected => "DI",
            ResponseFlags::UpstreamOverflow => "UO",
        }
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the proxy refused a connection before relaying a byte. Its name is the `reason`
/// label of `nodemesh_connections_refused_total` and follows `refused: ` in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Outbound to a Service address that no Service has.
    UnknownService,
    /// Outbound to a Service on a port it does not declare.
    UnknownServicePort,
    /// Outbound to a Service whose backends have no ready endpoint.
    NoReadyEndpoint,
    /// Inbound plaintext addressed to one of the mesh's own in-pod ports.
    InboundTargetMeshPort,
    /// Inbound plaintext addressed to an address that is not the pod's.
    InboundTargetNotLocal,
    /// Plaintext into a namespace whose mTLS mode is STRICT.
    StrictMtlsPlaintext,
    /// The destination's authorization policy does not allow it.
    PolicyDenied,
    /// A request on the HBONE port that is not CONNECT.
    HboneBadMethod,
    /// A CONNECT whose authority is not an `ip:port`.
    HboneBadAuthority,
    /// A CONNECT to an address that is not the pod's.
    HboneTargetNotLocal,
    /// A CONNECT to one of the mesh's own in-pod ports.
    HboneTargetMeshPort,
    /// Outbound to a destination whose connection pool (`tcp.maxConnections`) is full.
    ConnectionPoolOverflow,
    /// Bytes that are not HTTP to a pod port whose policies judge each HTTP request.
    NotHttp,
}

impl RefusalReason {
    /// Every reason, in declaration order.
    pub const ALL: [RefusalReason; 13] = [
        RefusalReason::UnknownService,
        RefusalReason::UnknownServicePort,
        RefusalReason::NoReadyEndpoint,
        RefusalReason::InboundTargetMeshPort,
        RefusalReason::InboundTargetNotLocal,
        RefusalReason::StrictMtlsPlaintext,
        RefusalReason::PolicyDenied,
        RefusalReason::HboneBadMethod,
        RefusalReason::HboneBadAuthority,
        RefusalReason::HboneTargetNotLocal,
        RefusalReason::HboneTargetMeshPort,
        RefusalReason::ConnectionPoolOverflow,
        RefusalReason::NotHttp,
    ];

    /// The reason whose [`name`](Self::name) is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The `reason` label value and the text after `refused: `.
    pub const fn name(self) -> &'static str {
        match self {
            RefusalReason::UnknownService => "unknown_service",
            RefusalReason::UnknownServicePort => "unknown_service_port",
            RefusalReason::NoReadyEndpoint => "no_ready_endpoint",
            RefusalReason::InboundTargetMeshPort => "inbound_target_mesh_port",
            RefusalReason::InboundTargetNotLocal => "inbound_target_not_local",
            RefusalReason::StrictMtlsPlaintext => "strict_mtls_plaintext",
            RefusalReason::PolicyDenied => "policy_denied",
            RefusalReason::HboneBadMethod => "hbone_bad_method",
            RefusalReason::HboneBadAuthority => "hbone_bad_authority",
            RefusalReason::HboneTargetNotLocal => "hbone_target_not_local",
            RefusalReason::HboneTargetMeshPort => "hbone_target_mesh_port",
            RefusalReason::ConnectionPoolOverflow => "connection_pool_overflow",
            RefusalReason::NotHttp => "not_http",
        }
    }

    pub const fn response_flags(self) -> ResponseFlags {
        match self {
            RefusalReason::NoReadyEndpoint => ResponseFlags::NoHealthyUpstream,
            RefusalReason::ConnectionPoolOverflow => ResponseFlags::UpstreamOverflow,
            RefusalReason::UnknownService
            | RefusalReason::UnknownServicePort
            | RefusalReason::HboneTargetNotLocal => ResponseFlags::NoRoute,
            RefusalReason::InboundTargetMeshPort
            | RefusalReason::InboundTargetNotLocal
            | RefusalReason::StrictMtlsPlaintext
            | RefusalReason::PolicyDenied
            | RefusalReason::HboneBadMethod
            | RefusalReason::HboneBadAuthority
            | RefusalReason::HboneTargetMeshPort
            | RefusalReason::NotHttp => ResponseFlags::Denied,
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for RefusalReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for RefusalReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        RefusalReason::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown refusal reason {name:?}")))
    }
}

/// A read or write that failed while bytes were being relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// On a TCP side: reset by the peer, broken pipe, ...
    Io(std::io::ErrorKind),
    /// On the HTTP/2 stream of a tunnel, or its connection (h2's description).
    Tunnel(String),
    /// The peer closed the tunnel's stream while data waited for flow-control window.
    TunnelClosed,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Io(kind) => write!(f, "{kind}"),
            StreamError::Tunnel(text) => f.write_str(text),
            StreamError::TunnelClosed => f.write_str("stream closed by peer"),
        }
    }
}

impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        StreamError::Io(e.kind())
    }
}

/// How a proxied connection ended. `Display` gives the text of the record's `result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// `completed`: both directions reached EOF.
    Completed,
    /// `completed (http)`: the application closed a connection served as HTTP (its
    /// requests have log lines of their own).
    CompletedHttp,
    /// `idle_timeout`: nothing moved either way for the idle timeout.
    IdleTimeout,
    /// `header_timeout`: HTTP, no request head within the header timeout.
    HeaderTimeout,
    /// `error: <what>`: a read or write failed mid-relay (reset by either side, broken
    /// pipe, the tunnel's stream failed), or the tunnel could not be answered.
    Broken(StreamError),
    /// `refused: <reason>`: refused before anything was connected.
    Refused(RefusalReason),
    /// `connect_failed: <error>`: connecting to the upstream from the pod failed.
    ConnectFailed(String),
    /// `hbone_failed: <error>`: the HBONE tunnel to the destination could not be opened.
    HboneFailed(String),
    /// `denied: <policy, or why>`: the destination's authorization policy refused the
    /// tunnel.
    Denied {
        policy: Option<String>,
        detail: String,
    },
    /// `revoked: <policy, or why>`: a policy that no longer allows a live tunnel ended
    /// it.
    Revoked {
        policy: Option<String>,
        detail: String,
    },
    /// `http_error: <error>`: the downstream HTTP connection failed (protocol error).
    HttpError(String),
    /// `aborted`: dropped without being closed: its task was cancelled (pod removed,
    /// agent stopping).
    Aborted,
}

impl ConnectionEnd {
    /// The response flags of a connection that ended so. (Until 2026-12 the flags were
    /// read from the text, and `completed (http)`, `header_timeout`, `http_error` and
    /// `revoked` fell through to `UC`, an upstream termination none of them is: an
    /// HTTP connection the application closed is `-`, a policy revocation `RBAC`, a
    /// downstream that broke HTTP or sent no request head in time `DPE`.)
    pub const fn response_flags(&self) -> ResponseFlags {
        match self {
            ConnectionEnd::Completed | ConnectionEnd::CompletedHttp => ResponseFlags::None,
            ConnectionEnd::IdleTimeout => ResponseFlags::StreamIdleTimeout,
            ConnectionEnd::Refused(reason) => reason.response_flags(),
            ConnectionEnd::ConnectFailed(_) | ConnectionEnd::HboneFailed(_) => {
                ResponseFlags::UpstreamConnectFailure
            }
            ConnectionEnd::Denied { .. } | ConnectionEnd::Revoked { .. } => ResponseFlags::Denied,
            ConnectionEnd::HeaderTimeout | ConnectionEnd::HttpError(_) => {
                ResponseFlags::DownstreamProtocolError
            }
            ConnectionEnd::Aborted => ResponseFlags::DownstreamClosed,
            ConnectionEnd::Broken(_) => ResponseFlags::ConnectionTerminated,
        }
    }
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionEnd::Completed => f.write_str("completed"),
            ConnectionEnd::CompletedHttp => f.write_str("completed (http)"),
            ConnectionEnd::IdleTimeout => f.write_str("idle_timeout"),
            ConnectionEnd::HeaderTimeout => f.write_str("header_timeout"),
            ConnectionEnd::Broken(e) => write!(f, "error: {e}"),
            ConnectionEnd::Refused(reason) => write!(f, "refused: {reason}"),
            ConnectionEnd::ConnectFailed(e) => write!(f, "connect_failed: {e}"),
            ConnectionEnd::HboneFailed(e) => write!(f, "hbone_failed: {e}"),
            ConnectionEnd::Denied { policy, detail } => {
                write!(f, "denied: {}", policy.as_deref().unwrap_or(detail))
            }
            ConnectionEnd::Revoked { policy, detail } => {
                write!(f, "revoked: {}", policy.as_deref().unwrap_or(detail))
            }
            ConnectionEnd::HttpError(e) => write!(f, "http_error: {e}"),
            ConnectionEnd::Aborted => f.write_str("aborted"),
        }
    }
}

impl Serialize for ConnectionEnd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl ConnectionEnd {
    /// The end whose `result` text is `text`, for a reader of the admin API (`meshctl`).
    /// It shows the same text and maps to the same flags as the end that wrote it; what
    /// the text does not carry is not recovered (a `denied: x` comes back with `x` as
    /// its detail, an `error: x` as a tunnel error). `None` for a text no end writes.
    pub fn from_result(text: &str) -> Option<Self> {
        let end = match text {
            "completed" => ConnectionEnd::Completed,
            "completed (http)" => ConnectionEnd::CompletedHttp,
            "idle_timeout" => ConnectionEnd::IdleTimeout,
            "header_timeout" => ConnectionEnd::HeaderTimeout,
            "aborted" => ConnectionEnd::Aborted,
            _ => {
                let (kind, rest) = text.split_once(": ")?;
                let rest = rest.to_string();
                match kind {
                    "error" if rest == "stream closed by peer" => {
                        ConnectionEnd::Broken(StreamError::TunnelClosed)
                    }
                    "error" => ConnectionEnd::Broken(StreamError::Tunnel(rest)),
                    "refused" => ConnectionEnd::Refused(RefusalReason::from_name(&rest)?),
                    "connect_failed" => ConnectionEnd::ConnectFailed(rest),
                    "hbone_failed" => ConnectionEnd::HboneFailed(rest),
                    "denied" => ConnectionEnd::Denied {
                        policy: None,
                        detail: rest,
                    },
                    "revoked" => ConnectionEnd::Revoked {
                        policy: None,
                        detail: rest,
                    },
                    "http_error" => ConnectionEnd::HttpError(rest),
                    _ => return None,
                }
            }
        };
        Some(end)
    }
}

impl<'de> Deserialize<'de> for ConnectionEnd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ConnectionEnd::from_result(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown connection end {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    fn policy(name: Option<&str>, detail: &str) -> (Option<String>, String) {
        (name.map(String::from), detail.to_string())
    }

    /// Every way a connection ends, with the text the proxy wrote for it when the end
    /// was a string (formatted at each call site) and the flags that text mapped to.
    fn ends() -> Vec<(ConnectionEnd, &'static str, &'static str)> {
        let (p, d) = policy(Some("apps/deny-all"), "a DENY rule matched");
        let (no_p, no_d) = policy(None, "ALLOW policies select this workload and none matched");
        let (rp, rd) = policy(Some("apps/deny-all"), "a DENY rule matched");
        let (no_rp, no_rd) = policy(None, "destination pod unknown");
        use ConnectionEnd as E;
        use RefusalReason as R;
        vec![
            // relay.rs / hbone/stream.rs: how the relay ended
            (E::Completed, "completed", "-"),
            (E::IdleTimeout, "idle_timeout", "SI"),
            (
                E::Broken(StreamError::Io(ErrorKind::ConnectionReset)),
                "error: connection reset",
                "UC",
            ),
            (
                E::Broken(StreamError::Io(ErrorKind::BrokenPipe)),
                "error: broken pipe",
                "UC",
            ),
            (
                E::Broken(StreamError::TunnelClosed),
                "error: stream closed by peer",
                "UC",
            ),
            // inbound_hbone: h2's error when the 200 cannot be sent
            (
                E::Broken(StreamError::Tunnel("stream no longer needed".into())),
                "error: stream no longer needed",
                "UC",
            ),
            // proxy::pod::refuse: format!("refused: {reason}")
            (
                E::Refused(R::NoReadyEndpoint),
                "refused: no_ready_endpoint",
                "UH",
            ),
            (
                E::Refused(R::UnknownService),
                "refused: unknown_service",
                "NR",
            ),
            (
                E::Refused(R::UnknownServicePort),
                "refused: unknown_service_port",
                "NR",
            ),
            (
                E::Refused(R::InboundTargetMeshPort),
                "refused: inbound_target_mesh_port",
                "RBAC",
            ),
            (
                E::Refused(R::InboundTargetNotLocal),
                "refused: inbound_target_not_local",
                "RBAC",
            ),
            (
                E::Refused(R::StrictMtlsPlaintext),
                "refused: strict_mtls_plaintext",
                "RBAC",
            ),
            (
                E::Refused(R::PolicyDenied),
                "refused: policy_denied",
                "RBAC",
            ),
            // inbound_hbone: format!("refused: {}", refusal.reason())
            (
                E::Refused(R::HboneTargetNotLocal),
                "refused: hbone_target_not_local",
                "NR",
            ),
            (
                E::Refused(R::HboneTargetMeshPort),
                "refused: hbone_target_mesh_port",
                "RBAC",
            ),
            (
                E::Refused(R::HboneBadMethod),
                "refused: hbone_bad_method",
                "RBAC",
            ),
            (
                E::Refused(R::HboneBadAuthority),
                "refused: hbone_bad_authority",
                "RBAC",
            ),
            // outbound: a destination's connection pool is full
            (
                E::Refused(R::ConnectionPoolOverflow),
                "refused: connection_pool_overflow",
                "UO",
            ),
            // inbound_http: no HTTP on a port whose policies judge each request
            (E::Refused(R::NotHttp), "refused: not_http", "RBAC"),
            // connect_in_pod: format!("connect_failed: {e}")
            (
                E::ConnectFailed("connecting to 10.0.2.2:8080: connection refused".into()),
                "connect_failed: connecting to 10.0.2.2:8080: connection refused",
                "UF",
            ),
            // forward_hbone: format!("hbone_failed: {e}")
            (
                E::HboneFailed("handshake".into()),
                "hbone_failed: handshake",
                "UF",
            ),
            // inbound_hbone: format!("denied: {}", policy.unwrap_or(reason))
            (
                E::Denied {
                    policy: p,
                    detail: d,
                },
                "denied: apps/deny-all",
                "RBAC",
            ),
            (
                E::Denied {
                    policy: no_p,
                    detail: no_d,
                },
                "denied: ALLOW policies select this workload and none matched",
                "RBAC",
            ),
            // inbound_hbone: format!("revoked: {}", why.policy.unwrap_or(why.detail))
            (
                E::Revoked {
                    policy: rp,
                    detail: rd,
                },
                "revoked: apps/deny-all",
                "RBAC",
            ),
            (
                E::Revoked {
                    policy: no_rp,
                    detail: no_rd,
                },
                "revoked: destination pod unknown",
                "RBAC",
            ),
            // http/downstream.rs
            (E::CompletedHttp, "completed (http)", "-"),
            (E::HeaderTimeout, "header_timeout", "DPE"),
            (
                E::HttpError("connection error".into()),
                "http_error: connection error",
                "DPE",
            ),
            // OpenConnection dropped unclosed
            (E::Aborted, "aborted", "DC"),
        ]
    }

    /// One number per variant: adding a variant breaks this match, and the test below
    /// then asks for a row of [`ends`].
    fn variant(end: &ConnectionEnd) -> usize {
        match end {
            ConnectionEnd::Completed => 0,
            ConnectionEnd::CompletedHttp => 1,
            ConnectionEnd::IdleTimeout => 2,
            ConnectionEnd::HeaderTimeout => 3,
            ConnectionEnd::Broken(_) => 4,
            ConnectionEnd::Refused(_) => 5,
            ConnectionEnd::ConnectFailed(_) => 6,
            ConnectionEnd::HboneFailed(_) => 7,
            ConnectionEnd::Denied { .. } => 8,
            ConnectionEnd::Revoked { .. } => 9,
            ConnectionEnd::HttpError(_) => 10,
            ConnectionEnd::Aborted => 11,
        }
    }
    const VARIANTS: usize = 12;

    fn refusal(reason: RefusalReason) -> usize {
        match reason {
            RefusalReason::UnknownService => 0,
            RefusalReason::UnknownServicePort => 1,
            RefusalReason::NoReadyEndpoint => 2,
            RefusalReason::InboundTargetMeshPort => 3,
            RefusalReason::InboundTargetNotLocal => 4,
            RefusalReason::StrictMtlsPlaintext => 5,
            RefusalReason::PolicyDenied => 6,
            RefusalReason::HboneBadMethod => 7,
            RefusalReason::HboneBadAuthority => 8,
            RefusalReason::HboneTargetNotLocal => 9,
            RefusalReason::HboneTargetMeshPort => 10,
            RefusalReason::ConnectionPoolOverflow => 11,
            RefusalReason::NotHttp => 12,
        }
    }
    const REFUSALS: usize = 13;

    #[test]
    fn every_end_shows_the_text_it_had_as_a_string() {
        for (end, text, _) in ends() {
            assert_eq!(end.to_string(), text, "{end:?}");
            assert_eq!(serde_json::to_value(&end).unwrap(), text, "{end:?}");
        }
    }

    #[test]
    fn every_end_maps_to_the_flags_its_text_had() {
        for (end, text, flags) in ends() {
            assert_eq!(end.response_flags().as_str(), flags, "{text}");
            assert_eq!(end.response_flags().to_string(), flags, "{text}");
        }
    }

    #[test]
    fn the_table_covers_every_end_and_every_refusal() {
        let ends = ends();
        for v in 0..VARIANTS {
            assert!(
                ends.iter().any(|(e, _, _)| variant(e) == v),
                "variant {v} of ConnectionEnd has no row"
            );
        }
        for r in 0..REFUSALS {
            assert!(
                ends.iter()
                    .any(|(e, _, _)| matches!(e, ConnectionEnd::Refused(x) if refusal(*x) == r)),
                "refusal {r} has no row"
            );
        }
    }

    #[test]
    fn a_reader_of_the_text_gets_an_end_with_the_same_text_and_flags() {
        for (end, text, flags) in ends() {
            let read: ConnectionEnd = serde_json::from_value(serde_json::json!(text))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(read.to_string(), text);
            assert_eq!(read.response_flags(), end.response_flags(), "{text}");
            assert_eq!(read.response_flags().as_str(), flags, "{text}");
        }
        for text in [
            "",
            "open",
            "refused: no_such_reason",
            "weird: x",
            "completed ",
        ] {
            assert_eq!(ConnectionEnd::from_result(text), None, "{text:?}");
        }
    }

    #[test]
    fn every_refusal_reason_reads_back_from_its_label() {
        assert_eq!(RefusalReason::ALL.len(), REFUSALS);
        for (i, reason) in RefusalReason::ALL.into_iter().enumerate() {
            assert_eq!(refusal(reason), i);
            let read: RefusalReason =
                serde_json::from_value(serde_json::json!(reason.name())).unwrap();
            assert_eq!(read, reason);
        }
        assert!(serde_json::from_value::<RefusalReason>(serde_json::json!("nope")).is_err());
    }

    #[test]
    fn refusal_reasons_serialize_as_their_label() {
        assert_eq!(
            serde_json::to_value(RefusalReason::StrictMtlsPlaintext).unwrap(),
            "strict_mtls_plaintext"
        );
        assert_eq!(RefusalReason::PolicyDenied.to_string(), "policy_denied");
    }

    #[test]
    fn flags_have_envoy_names() {
        use ResponseFlags as F;
        for (flags, text) in [
            (F::None, "-"),
            (F::NoRoute, "NR"),
            (F::NoHealthyUpstream, "UH"),
            (F::UpstreamConnectFailure, "UF"),
            (F::UpstreamTimeout, "UT"),
            (F::RetryLimit, "URX"),
            (F::LocalReply, "LR"),
            (F::Denied, "RBAC"),
            (F::StreamIdleTimeout, "SI"),
            (F::ConnectionTerminated, "UC"),
            (F::DownstreamClosed, "DC"),
            (F::DownstreamProtocolError, "DPE"),
            (F::FaultInjected, "FI"),
            (F::DelayInjected, "DI"),
            (F::UpstreamOverflow, "UO"),
        ] {
            assert_eq!(flags.as_str(), text);
        }
        assert_eq!(F::default(), F::None);
    }
}
