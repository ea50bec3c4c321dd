//! The agent's one typed configuration: command-line flags with documented defaults,
//! also dumped as JSON by the admin API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::state::resolve::IpCidr;

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

    #[command(flatten)]
    pub log: LogArgs,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Files,
    Kube,
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

/// Parses `250ms`, `5s`, `10m`, `1h`, and sums of them such as `1h30m` (the Gateway
/// API's duration format, GEP-2257, is this grammar).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: write e.g. 5s, 250ms or 1h30m".into());
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{text}` has no unit: use ms, s, m or h (e.g. 5s)"))?;
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}` does not start with a whole number (e.g. 5s)"))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let part = match &after[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}`: use ms, s, m or h"
                ))
            }
        };
        total = total.saturating_add(part);
        rest = &after[unit_len..];
    }
    Ok(total)
}

mod duration_text {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
    }
}
