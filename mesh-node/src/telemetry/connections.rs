//! Live and recently closed proxied connections: what the admin API lists, what the
//! access log prints (one line per connection on close), and what the TCP metrics count.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    keys::ObjectKey, keys::PodKey, keys::ServicePortRef, telemetry::access_log,
    telemetry::metrics::Metrics, telemetry::metrics::TcpLabels, telemetry::outcome::ConnectionEnd,
    telemetry::outcome::ResponseFlags,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    /// Istio's `reporter` label: the source side reports outbound, the destination inbound.
    fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// How the connection crossed the network (Istio's `connection_security_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    None,
    MutualTls,
}

impl Security {
    pub fn label(self) -> &'static str {
        match self {
            Security::None => "none",
            Security::MutualTls => "mutual_tls",
        }
    }
}

/// Who is talking to whom, fixed when the connection is accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub direction: Direction,
    /// The enrolled pod on this node whose listener accepted the connection.
    pub pod: PodKey,
    pub src: SocketAddr,
    pub original_dst: SocketAddr,
    /// The peer workload, when the state knows the address.
    pub peer: Option<PodKey>,
    /// Outbound to a Service: the Service and port (shown `ns/name:port`).
    #[serde(with = "crate::keys::as_text")]
    pub service: Option<ServicePortRef>,
    /// The backend Service the route chose (the Service itself without a route; shown
    /// `ns/name`).
    #[serde(with = "crate::keys::as_text")]
    pub backend: Option<ObjectKey>,
    /// Where the proxy connected: the chosen endpoint, or the original destination.
    pub upstream: Option<SocketAddr>,
    pub security: Security,
    /// SPIFFE IDs, when known (always, for mutual TLS).
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    /// Whether the connection is written to the access log when it closes (Telemetry
    /// `accessLogging` of its pod). Not part of the admin view.
    #[serde(skip, default = "logged")]
    pub access_log: bool,
}

fn logged() -> bool {
    true
}

impl ConnectionInfo {
    /// A plaintext connection with nothing resolved yet.
    pub fn new(
        direction: Direction,
        pod: PodKey,
        src: SocketAddr,
        original_dst: SocketAddr,
    ) -> ConnectionInfo {
        ConnectionInfo {
            direction,
            pod,
            src,
            original_dst,
            peer: None,
            service: None,
            backend: None,
            upstream: None,
            security: Security::None,
            source_identity: None,
            destination_identity: None,
            access_log: true,
        }
    }
}

/// One connection, as listed by the admin API (and read by `meshctl`) and printed by
/// the access log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub id: u64,
    #[serde(flatten)]
    pub info: ConnectionInfo,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    /// How it ended; `None` while live. Shown as `result`: `open` while live, then the
    /// end's text (`completed`, `idle_timeout`, `connect_failed: ...`, ...).
    #[serde(
        rename = "result",
        serialize_with = "serialize_result",
        deserialize_with = "deserialize_result"
    )]
    pub end: Option<ConnectionEnd>,
}

impl ConnectionRecord {
    /// The `result` text of the admin API and the access log.
    pub fn result(&self) -> String {
        match &self.end {
            Some(end) => end.to_string(),
            None => "open".into(),
        }
    }
}

fn serialize_result<S: serde::Serializer>(
    end: &Option<ConnectionEnd>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match end {
        Some(end) => s.collect_str(end),
        None => s.serialize_str("open"),
    }
}

fn deserialize_result<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ConnectionEnd>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "open" {
        return Ok(None);
    }
    ConnectionEnd::from_result(&text)
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown connection result {text:?}")))
}

struct Live {
    info: ConnectionInfo,
    started: Instant,
    started_unix_ms: u64,
    counters: Arc<ByteCounters>,
}

/// How many closed connections the admin API keeps for inspection.
const CLOSED_HISTORY: usize = 4096;

pub struct ConnectionTable {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
    closed: Mutex<VecDeque<ConnectionRecord>>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn label_of(key: &Option<PodKey>) -> (&str, &str) {
    key.as_ref()
        .map(|k| (k.name.as_str(), k.namespace.as_str()))
        .unwrap_or(("unknown", "unknown"))
}

/// Istio's `destination_service`, `_name` and `_namespace` from `ns/name:port`.
fn service_labels(service: Option<&ServicePortRef>) -> (String, &str, &str) {
    match service {
        Some(ServicePortRef { service: key, .. }) => {
            (key.service_fqdn(), &key.name, &key.namespace)
        }
        None => ("unknown".into(), "unknown", "unknown"),
    }
}

/// A principal label: the SPIFFE ID, or `unknown`.
fn principal(id: &Option<String>) -> &str {
    id.as_deref().unwrap_or("unknown")
}

impl ConnectionInfo {
    /// The TCP metric labels from this connection's view.
    fn labels(&self, flags: ResponseFlags) -> TcpLabels<'_> {
        let me = (self.pod.name.as_str(), self.pod.namespace.as_str());
        let peer = label_of(&self.peer);
        let (src, dst) = match self.direction {
            Direction::Outbound => (me, peer),
            Direction::Inbound => (peer, me),
        };
        let (service, service_name, service_namespace) = service_labels(self.service.as_ref());
        TcpLabels {
            reporter: self.direction.reporter(),
            source_workload: src.0,
            source_workload_namespace: src.1,
            source_principal: principal(&self.source_identity),
            destination_workload: dst.0,
            destination_workload_namespace: dst.1,
            destination_principal: principal(&self.destination_identity),
            destination_service: service,
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            request_protocol: "tcp",
            response_flags: flags,
            connection_security_policy: self.security.label(),
        }
    }
}

impl ConnectionTable {
    pub fn new(metrics: Arc<Metrics>) -> Arc<ConnectionTable> {
        Arc::new(ConnectionTable {
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            closed: Mutex::new(VecDeque::with_capacity(CLOSED_HISTORY)),
            metrics,
        })
    }

    /// Registers a connection; finish it with [`OpenConnection::close`].
    pub fn open(self: &Arc<Self>, info: ConnectionInfo) -> OpenConnection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Opened is counted as the connection starts, before its outcome is known.
        self.metrics
            .tcp_opened
            .with_label_values(&info.labels(ResponseFlags::None).values())
            .inc();
        let counters = Arc::new(ByteCounters::default());
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        lock(&self.live).insert(
            id,
            Live {
                info,
                started: Instant::now(),
                started_unix_ms,
                counters: counters.clone(),
            },
        );
        OpenConnection {
            table: self.clone(),
            id,
            counters,
            closed: false,
        }
    }

    fn record(id: u64, live: &Live, end: Option<ConnectionEnd>) -> ConnectionRecord {
        ConnectionRecord {
            id,
            info: live.info.clone(),
            started_unix_ms: live.started_unix_ms,
            duration_ms: live.started.elapsed().as_millis() as u64,
            bytes_to_server: live.counters.to_server.load(Ordering::Relaxed),
            bytes_to_client: live.counters.to_client.load(Ordering::Relaxed),
            end,
        }
    }

    fn finish(&self, id: u64, end: ConnectionEnd) {
        let Some(live) = lock(&self.live).remove(&id) else {
            return;
        };
        let labels = live.info.labels(end.response_flags());
        let record = Self::record(id, &live, Some(end));
        let values = labels.values();
        self.metrics.tcp_closed.with_label_values(&values).inc();
        self.metrics
            .tcp_sent_bytes
            .with_label_values(&values)
            .inc_by(record.bytes_to_server);
        self.metrics
            .tcp_received_bytes
            .with_label_values(&values)
            .inc_by(record.bytes_to_client);
        if live.info.access_log {
            access_log::write(&access_entry(&record, &labels));
        }
        let mut closed = lock(&self.closed);
        if closed.len() == CLOSED_HISTORY {
            closed.pop_front();
        }
        closed.push_back(record);
    }

    pub fn live(&self) -> Vec<ConnectionRecord> {
        let live = lock(&self.live);
        let mut out: Vec<_> = live
            .iter()
            .map(|(id, l)| Self::record(*id, l, None))
            .collect();
        out.sort_by_key(|r| r.id);
        out
    }

    pub fn closed(&self) -> Vec<ConnectionRecord> {
        lock(&self.closed).iter().cloned().collect()
    }

    /// Open connections by direction (for the health gauges).
    pub fn live_counts(&self) -> (usize, usize) {
        let live = lock(&self.live);
        let outbound = live
            .values()
            .filter(|l| l.info.direction == Direction::Outbound)
            .count();
        (outbound, live.len() - outbound)
    }
}

/// The access-log line of a closed connection: the metric labels under the same
/// names, plus what is per connection (addresses, bytes, duration, result).
fn access_entry(record: &ConnectionRecord, labels: &TcpLabels) -> serde_json::Value {
    let mut entry = serde_json::Map::new();
    entry.insert("log".into(), "access".into());
    entry.insert("kind".into(), "tcp".into());
    entry.insert("id".into(), record.id.into());
    entry.insert("start_unix_ms".into(), record.started_unix_ms.into());
    for (name, value) in TcpLabels::NAMES.into_iter().zip(labels.values()) {
        entry.insert(name.into(), value.into());
    }
    let info = &record.info;
    let text = |v: Option<String>| v.map(serde_json::Value::from).unwrap_or_default();
    entry.insert("pod".into(), info.pod.to_string().into());
    entry.insert("source_address".into(), info.src.to_string().into());
    entry.insert(
        "destination_address".into(),
        info.original_dst.to_string().into(),
    );
    entry.insert(
        "upstream_address".into(),
        text(info.upstream.map(|u| u.to_string())),
    );
    entry.insert(
        "upstream_backend".into(),
        text(info.backend.as_ref().map(|b| b.to_string())),
    );
    entry.insert("sent_bytes".into(), record.bytes_to_server.into());
    entry.insert("received_bytes".into(), record.bytes_to_client.into());
    entry.insert("duration_ms".into(), record.duration_ms.into());
    entry.insert("result".into(), record.result().into());
    serde_json::Value::Object(entry)
}

/// A registered connection; closing it (or dropping it) writes its record.
pub struct OpenConnection {
    table: Arc<ConnectionTable>,
    id: u64,
    counters: Arc<ByteCounters>,
    closed: bool,
}

impl OpenConnection {
    pub fn counters(&self) -> &ByteCounters {
        &self.counters
    }

    /// The counters, for I/O wrappers that outlive a borrow (upgraded connections).
    pub fn shared_counters(&self) -> Arc<ByteCounters> {
        self.counters.clone()
    }

    pub fn close(mut self, end: ConnectionEnd) {
        self.closed = true;
        self.table.finish(self.id, end);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if !self.closed {
            // The task was cancelled (pod removed, agent stopping).
            self.table.finish(self.id, ConnectionEnd::Aborted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::outcome::RefusalReason;

    fn info(direction: Direction) -> ConnectionInfo {
        ConnectionInfo {
            peer: Some(PodKey::new("apps", "server")),
            service: Some("apps/web:80".parse().unwrap()),
            ..ConnectionInfo::new(
                direction,
                PodKey::new("apps", "client"),
                "127.0.0.1:40000".parse().unwrap(),
                "10.0.2.2:8080".parse().unwrap(),
            )
        }
    }

    #[test]
    fn records_move_from_live_to_closed_with_their_bytes() {
        let metrics = Arc::new(Metrics::new());
        let table = ConnectionTable::new(metrics.clone());
        let conn = table.open(info(Direction::Outbound));
        conn.counters().to_server.fetch_add(10, Ordering::Relaxed);
        assert_eq!(table.live().len(), 1);
        assert_eq!(table.live()[0].bytes_to_server, 10);
        conn.close(ConnectionEnd::Completed);
        assert!(table.live().is_empty());
        let closed = table.closed();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].result(), "completed");
        assert_eq!(closed[0].info.original_dst.to_string(), "10.0.2.2:8080");
        let text = metrics.encode();
        assert!(text.contains("nodemesh_tcp_sent_bytes_total{connection_security_policy=\"none\",destination_principal=\"unknown\",destination_service=\"web.apps.svc.cluster.local\",destination_service_name=\"web\",destination_service_namespace=\"apps\",destination_workload=\"server\",destination_workload_namespace=\"apps\",reporter=\"source\",request_protocol=\"tcp\",response_flags=\"-\",source_principal=\"unknown\",source_workload=\"client\",source_workload_namespace=\"apps\"} 10"), "{text}");
    }

    #[test]
    fn the_admin_api_shows_open_then_the_text_of_the_end() {
        let table = ConnectionTable::new(Arc::new(Metrics::new()));
        let conn = table.open(info(Direction::Inbound));
        let live = serde_json::to_value(&table.live()[0]).unwrap();
        assert_eq!(live["result"], "open");
        conn.close(ConnectionEnd::Denied {
            policy: Some("apps/deny-intruder".into()),
            detail: "a DENY rule matched".into(),
        });
        let closed = serde_json::to_value(&table.closed()[0]).unwrap();
        assert_eq!(closed["result"], "denied: apps/deny-intruder");
        assert!(closed.get("end").is_none(), "{closed}");
    }

    #[test]
    fn a_dropped_connection_is_recorded_as_aborted() {
        let table = ConnectionTable::new(Arc::new(Metrics::new()));
        drop(table.open(info(Direction::Inbound)));
        assert_eq!(table.closed()[0].end, Some(ConnectionEnd::Aborted));
    }

    /// Every TCP label with a value of its own, so a label paired with another's value
    /// shows: the metric line and the access-log fields, exactly.
    #[test]
    fn each_tcp_label_carries_its_own_value() {
        let metrics = Arc::new(Metrics::new());
        let table = ConnectionTable::new(metrics.clone());
        let conn = table.open(ConnectionInfo {
            security: Security::MutualTls,
            source_identity: Some("spiffe://cluster.local/ns/apps/sa/client".into()),
            destination_identity: Some("spiffe://cluster.local/ns/shop/sa/server".into()),
            peer: Some(PodKey::new("shop", "server")),
            service: Some("shop/web:80".parse().unwrap()),
            ..info(Direction::Outbound)
        });
        conn.close(ConnectionEnd::Refused(RefusalReason::NoReadyEndpoint));
        let want = [
            ("reporter", "source"),
            ("source_workload", "client"),
            ("source_workload_namespace", "apps"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/apps/sa/client",
            ),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "shop"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/shop/sa/server",
            ),
            ("destination_service", "web.shop.svc.cluster.local"),
            ("destination_service_name", "web"),
            ("destination_service_namespace", "shop"),
            ("request_protocol", "tcp"),
            ("response_flags", "UH"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let text = metrics.encode();
        let line = "nodemesh_tcp_connections_closed_total{connection_security_policy=\"mutual_tls\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\",destination_service=\"web.shop.svc.cluster.local\",destination_service_name=\"web\",destination_service_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\",reporter=\"source\",request_protocol=\"tcp\",response_flags=\"UH\",source_principal=\"spiffe://cluster.local/ns/apps/sa/client\",source_workload=\"client\",source_workload_namespace=\"apps\"} 1\n";
        assert!(text.contains(line), "{text}");
        let record = &table.closed()[0];
        let entry = access_entry(
            record,
            &record.info.labels(ResponseFlags::NoHealthyUpstream),
        );
        for (name, value) in want {
            assert_eq!(entry[name], value, "{name} in {entry}");
        }
        assert_eq!(entry["result"], "refused: no_ready_endpoint");
    }

    #[test]
    fn the_access_entry_uses_the_metric_label_names() {
        let table = ConnectionTable::new(Arc::new(Metrics::new()));
        let conn = table.open(info(Direction::Outbound));
        conn.counters().to_server.fetch_add(5, Ordering::Relaxed);
        conn.close(ConnectionEnd::Refused(RefusalReason::PolicyDenied));
        let record = &table.closed()[0];
        let entry = access_entry(record, &record.info.labels(ResponseFlags::Denied));
        for label in TcpLabels::NAMES {
            assert!(entry.get(label).is_some(), "{label} missing: {entry}");
        }
        assert_eq!(entry["response_flags"], "RBAC");
        assert_eq!(entry["sent_bytes"], 5);
        assert_eq!(entry["destination_service_name"], "web");
        let line = serde_json::to_string(&entry).unwrap();
        assert!(!line.contains('\n'));
    }
}

/// Byte counts of a live connection, readable while it runs.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub to_server: AtomicU64,
    pub to_client: AtomicU64,
    /// Milliseconds since `epoch` of the last byte either way.
    last_activity_ms: AtomicU64,
}

impl ByteCounters {
    /// Milliseconds (since the relay's start) of the last byte either way.
    pub fn activity(&self) -> &AtomicU64 {
        &self.last_activity_ms
    }
}
