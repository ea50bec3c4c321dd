//! The agent's one typed configuration: command-line flags with documented defaults,
//! also dumped as JSON by the admin API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{
    discovery::duration::parse_duration, discovery::mtls::RootNamespace, routing::resolve::IpCidr,
};

#[derive(Debug, Clone, Args, Serialize)]
pub struct AgentConfig {
    /// Name of the node this agent serves; only pods with this `spec.nodeName` are enrolled.
    #[arg(long)]
    pub node_name: String,

    /// Where the cluster state comes from: the Kubernetes API (`kube`, in-cluster
    /// credentials or KUBECONFIG) or a directory of manifests (`files`).
    #[arg(long, value_enum, default_value_t = Source::Files)]
    pub source: Source,

    /// Directory of Kubernetes YAML manifests for `--source files`, watched for changes.
    #[arg(long, required_if_eq("source", "files"))]
    pub manifests: Option<PathBuf>,

    /// How a pod's network namespace is found: `kubepods` looks for a process of the pod
    /// by its UID in kubelet's cgroup layout (needs hostPID); `netns-dir` opens
    /// `<--netns-dir>/<pod uid>`.
    #[arg(long, value_enum, default_value_t = NetnsLocatorKind::Kubepods)]
    pub netns_locator: NetnsLocatorKind,

    /// Directory of named network namespaces for `--netns-locator netns-dir`.
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,

    /// Service address ranges (the cluster's service CIDRs). A connection to an address
    /// in them that no Service has is refused at once instead of leaving the node.
    #[arg(long = "service-cidr")]
    pub service_cidrs: Vec<IpCidr>,

    /// cgroup v2 directory the connect/sockops programs attach to, absolute or relative
    /// to the cgroup2 mount (found in /proc/self/mountinfo). Default: the mount itself.
    #[arg(long, default_value = "")]
    pub cgroup_root: PathBuf,

    /// bpffs directory for pinned maps and links (created if missing); must be on bpffs.
    #[arg(long, default_value = "/sys/fs/bpf/nodemesh")]
    pub pin_dir: PathBuf,

    /// Compiled eBPF object. Default: `mesh-ebpf.o` next to the mesh-node executable.
    #[arg(long)]
    pub ebpf_object: Option<PathBuf>,

    /// The node's own network namespace (where kubelet runs). TCP connections that
    /// sockets of this namespace open straight to an enrolled pod's address (kubelet
    /// probes) reach the pod without the proxy, whatever address they leave from; all
    /// other inbound traffic is captured, also when NAT made its source a node address
    /// (NodePort, hostPort). The default is the host's, as seen with hostPID.
    #[arg(long, default_value = "/proc/1/ns/net")]
    pub node_netns: PathBuf,

    /// SO_MARK on the agent's own sockets, so the eBPF programs never redirect them.
    #[arg(long, default_value_t = 0x6e6d)]
    pub socket_mark: u32,

    /// The mesh CA (`host:port`). Without it, traffic between meshed pods is proxied
    /// but NOT encrypted.
    #[arg(long)]
    pub ca_addr: Option<SocketAddr>,

    /// The mesh root certificate (PEM) that signs workload certificates and the CA's.
    #[arg(long)]
    pub ca_root: Option<PathBuf>,

    /// File holding this node's credential for the CA (a token).
    #[arg(long)]
    pub ca_token_file: Option<PathBuf>,

    /// Name in the CA's TLS certificate, when it is not the address's IP.
    #[arg(long)]
    pub ca_server_name: Option<String>,

    /// Where the current key and certificate of each local identity are kept, so that
    /// an agent restarted while the CA is down still serves its pods. Must be on tmpfs
    /// or ramfs (keys never touch a disk) and the agent's alone (created 0700 if
    /// missing; files 0600); otherwise it is not used and keys live in memory only.
    /// Root on the node can read it, as it can read the agent's memory; a reboot clears
    /// it. An empty value turns keeping off.
    #[arg(long, default_value = "/run/nodemesh/certs")]
    pub cert_cache_dir: PathBuf,

    /// Istio's root namespace: a PeerAuthentication without a selector there is
    /// mesh-wide (one with a selector there is ignored, as in Istio).
    #[arg(long, default_value = crate::discovery::mtls::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: RootNamespace,

    /// How often the keys of a RequestAuthentication's `jwksUri` are fetched again
    /// (Istio's default: 20 minutes). A failing URI is retried sooner (from 1 s,
    /// doubling, at most 30 s), its last good keys kept meanwhile.
    #[arg(long, value_parser = parse_duration, default_value = "20m")]
    #[serde(with = "duration_text")]
    pub jwks_refresh: Duration,

    /// How long the agent drains on SIGTERM (or SIGINT): its listeners stop accepting
    /// at once, established connections run on until they end or this passes, then the
    /// rest are cut. A second signal cuts them at once. The DaemonSet's
    /// `terminationGracePeriodSeconds` must be longer.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    #[serde(with = "duration_text")]
    pub drain_timeout: Duration,

    /// The Unix socket on which the running agent hands the node over to a newer one
    /// (an upgrade): its listening sockets pass to the newcomer, so no connection is
    /// refused, and it drains. Both agents must see the same path (a hostPath in the
    /// DaemonSet); its directory is created 0700. Empty: no hand-over (a newcomer
    /// waits for the running agent to exit).
    #[arg(long, default_value = "/run/nodemesh/handover.sock")]
    pub handover_socket: PathBuf,

    /// Istio's MeshConfig (YAML), its telemetry part: tracing providers
    /// (`extensionProviders` with `opentelemetry` or `zipkin`), the providers used by
    /// default (`defaultProviders.tracing`) and the sampling of requests without trace
    /// context (`defaultConfig.tracing.sampling`, percent; Istio's default 1).
    /// Without it, or without default providers, no spans are recorded unless a
    /// Telemetry resource names a provider. See deploy/observability/mesh-config.yaml.
    #[arg(long)]
    pub mesh_config: Option<PathBuf>,

    /// Trust domain of workload identities.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Admin API (JSON), localhost only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness probe (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Time allowed for an upstream TCP connect.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,

    /// A proxied connection with no bytes either way for this long is closed.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,

    /// Time a client of the admin, metrics and readiness listeners, of a pod's HBONE
    /// port (TLS and the HTTP/2 preface) and of the L7 proxy has to finish its handshake
    /// and send a complete request head; a kept-alive HTTP/1.1 connection waiting this
    /// long for its next request is closed too.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(with = "duration_text")]
    pub header_timeout: Duration,

    /// A connection to the admin, metrics or readiness listener with no bytes either
    /// way for this long, or an L7 (HTTP-routed) connection with no request in flight
    /// for this long, is closed.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    #[serde(with = "duration_text")]
    pub http_idle_timeout: Duration,

    /// Connections open at once on each of the admin, metrics and readiness listeners;
    /// more are accepted and closed at once.
    #[arg(long, value_parser = at_least_one, default_value_t = 256)]
    pub max_http_connections: usize,

    /// Connections open at once from one address on each of the admin, metrics and
    /// readiness listeners, so that one pod cannot lock out the kubelet or the scraper.
    #[arg(long, value_parser = at_least_one, default_value_t = 32)]
    pub max_http_connections_per_source: usize,

    /// Proxied connections one pod may have open at once, per direction: outbound
    /// (its own connections, L7 ones included) and inbound (plaintext and HBONE
    /// streams). More are refused (`pod_connection_limit`). Also the HTTP/2 stream
    /// limit of HBONE and L7 connections.
    #[arg(long, value_parser = at_least_one, default_value_t = 4096)]
    pub max_connections_per_pod: usize,

    /// HBONE connections (TLS sessions, each carrying many streams) one pod's 15008
    /// accepts at once; peers pool theirs, so this is far above what they need.
    #[arg(long, value_parser = at_least_one, default_value_t = 1024)]
    pub max_hbone_connections_per_pod: usize,

    #[command(flatten)]
    pub log: LogArgs,
}

impl AgentConfig {
    /// The limits of the admin, metrics and readiness listeners.
    pub fn http_limits(&self) -> crate::limits::ListenerLimits {
        crate::limits::ListenerLimits {
            header_timeout: self.header_timeout,
            idle_timeout: self.http_idle_timeout,
            max_connections: self.max_http_connections,
            max_per_source: self.max_http_connections_per_source,
        }
    }

    /// What bounds each enrolled pod's proxying.
    pub fn pod_limits(&self) -> crate::limits::PodLimits {
        crate::limits::PodLimits {
            header_timeout: self.header_timeout,
            http_idle_timeout: self.http_idle_timeout,
            max_connections: self.max_connections_per_pod,
            max_hbone_connections: self.max_hbone_connections_per_pod,
        }
    }
}

/// Logging flags of every mesh-node subcommand.
#[derive(Debug, Clone, Args, Serialize)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Initial log filter (tracing `EnvFilter` syntax), changeable at runtime via the admin API.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Files,
    Kube,
}

impl Source {
    /// The name the flag and the admin API give it.
    pub fn name(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Kube => "kube",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetnsLocatorKind {
    Kubepods,
    NetnsDir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A count that must allow something: a limit of 0 would refuse every connection.
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

mod duration_text {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

/// Checks a mesh configuration (`--mesh-config`'s contents) as the agent would at
/// start: the fields it does not implement, or why it would refuse to start.
pub fn check_mesh_config(text: &str) -> Result<Vec<String>, String> {
    let config =
        crate::telemetry::spans::mesh_config::MeshConfig::parse(text).map_err(|e| e.to_string())?;
    config
        .tracing()
        .map(|t| t.unsupported)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_defaults_and_refuse_zero() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            agent: AgentConfig,
        }
        let base = [
            "x",
            "--node-name",
            "n",
            "--manifests",
            "/m",
            "--cgroup-root",
            "/c",
        ];
        let f = Flags::try_parse_from(base).unwrap();
        assert_eq!(f.agent.header_timeout, Duration::from_secs(10));
        assert_eq!(f.agent.max_connections_per_pod, 4096);
        assert_eq!(f.agent.pod_limits().max_streams(), 4096);
        assert_eq!(f.agent.http_limits().max_per_source, 32);
        let zero = [&base[..], &["--max-connections-per-pod", "0"]].concat();
        assert!(Flags::try_parse_from(zero).is_err());
    }
}
