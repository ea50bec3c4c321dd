//! `meshctl`: inspect a Nodemesh node agent, locally or through the Kubernetes API.

mod connect;
mod format;
mod mtls_view;
mod pools;
mod render;
#[cfg(test)]
mod render_tests;
mod trace_view;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use mesh_node::admin::api::{
    BpfView, CertificateStatus, ConnectionsView, LogLevelView, PoliciesView, RouteView,
    ServiceView, StatusView, TraceView, WorkloadStatus,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use connect::Target;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect Nodemesh node agents")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Commands for one node's agent.
    Node(NodeArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// Admin API of the agent (on this machine, or inside the agent pod with --node).
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Reach the agent of this Kubernetes node through the API server (port-forward
    /// to its mesh-node pod) instead of --admin-addr on this machine.
    #[arg(long, global = true)]
    node: Option<String>,
    /// Namespace of the mesh-node DaemonSet (with --node).
    #[arg(long, global = true, default_value = "nodemesh-system")]
    agent_namespace: String,
    /// Label selector of the mesh-node pods (with --node).
    #[arg(
        long,
        global = true,
        default_value = "app.kubernetes.io/name=mesh-node"
    )]
    agent_selector: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Only rows of this namespace.
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Only rows of this pod (workloads, connections, policies).
    #[arg(long, global = true)]
    pod: Option<String>,
    /// Give up on the agent after this many seconds.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Readiness, state freshness, and what the agent serves.
    Status,
    /// Pods on the node: identity, IPs, enrolled or why not, listeners.
    Workloads,
    /// Every Service port: route, weighted backends, ready endpoints.
    Services,
    /// TCPRoutes and HTTPRoutes: rules, matches, backend weights and observed shares.
    Routes,
    /// Certificates of the identities on this node.
    Certs,
    /// Namespace modes (STRICT/PERMISSIVE) and authorization policies.
    Policies,
    /// Live proxied connections (with --closed: the recently closed ones).
    Connections {
        #[arg(long)]
        closed: bool,
    },
    /// eBPF programs with ids and attach points, maps and their occupancy.
    Bpf,
    /// Explain what the mesh would do with a connection from POD to HOST:PORT, from
    /// the live state, without sending traffic.
    Trace {
        /// The source pod: `name` (with -n) or `namespace/name`.
        pod: String,
        /// `ip:port`, `[v6]:port` or `service[.namespace]:port`.
        destination: String,
        /// HTTP-routed Services: the request's method, to select the HTTPRoute rule.
        #[arg(long)]
        method: Option<String>,
        /// HTTP-routed Services: the request's path (and query).
        #[arg(long)]
        path: Option<String>,
        /// HTTP-routed Services: a request header `name:value` (repeatable).
        #[arg(long)]
        header: Vec<String>,
        /// A file holding a JWT, sent as `Authorization: Bearer <token>`: the
        /// destination's verdict on it (RequestAuthentication, requestPrincipals).
        #[arg(long, value_name = "FILE")]
        jwt: Option<std::path::PathBuf>,
    },
    /// Show or set the log filter (tracing EnvFilter syntax, e.g. debug or info,nodemesh=debug).
    LogLevel { level: Option<String> },
    /// Sync state of each discovered kind.
    Discovery,
    /// The agent's effective configuration.
    Config,
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn request_of(args: &NodeArgs) -> Result<(Method, String), String> {
    Ok(match &args.command {
        NodeCommand::Status => (Method::GET, "/status".into()),
        NodeCommand::Workloads => (Method::GET, "/workloads".into()),
        NodeCommand::Services => (Method::GET, "/services".into()),
        NodeCommand::Routes => (Method::GET, "/routes".into()),
        NodeCommand::Certs => (Method::GET, "/certs".into()),
        NodeCommand::Policies => (Method::GET, "/policies".into()),
        NodeCommand::Connections { .. } => (Method::GET, "/connections".into()),
        NodeCommand::Bpf => (Method::GET, "/bpf".into()),
        NodeCommand::Trace {
            pod,
            destination,
            method,
            path,
            header,
            jwt,
        } => {
            let pod = match (pod.contains('/'), &args.namespace) {
                (true, _) => pod.clone(),
                (false, Some(ns)) => format!("{ns}/{pod}"),
                (false, None) => format!("default/{pod}"),
            };
            let mut query = format!("/trace?pod={}&to={}", encode(&pod), encode(destination));
            if let Some(m) = method {
                query += &format!("&method={}", encode(m));
            }
            if let Some(p) = path {
                query += &format!("&path={}", encode(p));
            }
            for h in header {
                query += &format!("&header={}", encode(h));
            }
            if let Some(file) = jwt {
                let token = std::fs::read_to_string(file).map_err(|e| {
                    format!(
                        "cannot read the JWT in {}: {e}; pass a file holding one token",
                        file.display()
                    )
                })?;
                let bearer = format!("authorization:Bearer {}", token.trim());
                query += &format!("&header={}", encode(&bearer));
            }
            (Method::GET, query)
        }
        NodeCommand::LogLevel { level: None } => (Method::GET, "/logging".into()),
        NodeCommand::LogLevel { level: Some(l) } => {
            (Method::POST, format!("/logging?level={}", encode(l)))
        }
        NodeCommand::Discovery => (Method::GET, "/discovery".into()),
        NodeCommand::Config => (Method::GET, "/config_dump".into()),
    })
}

/// Writes `text` and a newline to stdout. A reader that went away (`meshctl ... |
/// head`) ends the output quietly, as other command-line tools do.
fn print_out(text: &str) -> Result<(), String> {
    mesh_node::cli::write_stdout(&format!("{}\n", text.trim_end()))
        .map_err(|e| format!("cannot write the output: {e}"))
}

fn print_structured(value: &Value, output: Output) -> Result<(), String> {
    let text = match output {
        Output::Yaml => serde_yaml::to_string(value).map_err(|e| e.to_string())?,
        _ => serde_json::to_string_pretty(value).map_err(|e| e.to_string())?,
    };
    print_out(&text)
}

/// Prints a view as a table, or as JSON or YAML (through a JSON value, so that
/// keys come out in the order they always did).
fn show<T: Serialize>(
    view: &T,
    output: Output,
    table: impl FnOnce(&T) -> String,
) -> Result<(), String> {
    if output == Output::Table {
        return print_out(&table(view));
    }
    let value = serde_json::to_value(view).map_err(|e| format!("cannot encode the view: {e}"))?;
    print_structured(&value, output)
}

/// The admin API's answer to `path`, read as the view this meshctl knows.
fn view<T: DeserializeOwned>(body: Value, target: &Target, path: &str) -> Result<T, String> {
    let path = path.split('?').next().unwrap_or(path);
    serde_json::from_value(body).map_err(|e| {
        format!(
            "{target}: the admin API's answer to {path} is not what this meshctl reads ({e}); \
             meshctl and the agent are likely of different versions: use the meshctl of the agent's version"
        )
    })
}

fn run(args: NodeArgs) -> Result<(), String> {
    let (method, path) = request_of(&args)?;
    let target = match &args.node {
        Some(node) => Target::Node {
            node: node.clone(),
            namespace: args.agent_namespace.clone(),
            selector: args.agent_selector.clone(),
            port: args.admin_addr.port(),
        },
        None => Target::Local(args.admin_addr),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let body = runtime.block_on(connect::fetch(
        &target,
        method,
        &path,
        Duration::from_secs(args.timeout),
    ))?;
    let value: Value = serde_json::from_str(&body).map_err(|e| {
        format!(
            "{}: the admin API answered something that is not JSON ({e}); is {} really a mesh-node admin API?",
            target, target
        )
    })?;
    let filter = render::Filter {
        namespace: args.namespace.clone(),
        pod: args.pod.clone(),
    };
    let output = args.output;
    match &args.command {
        NodeCommand::Status => {
            let v: StatusView = view(value, &target, &path)?;
            show(&v, output, render::status)
        }
        NodeCommand::Workloads => {
            let rows: Vec<WorkloadStatus> = view(value, &target, &path)?;
            let rows = render::filter(rows, &filter, render::workload_key);
            show(&rows, output, |r| render::workloads(r))
        }
        NodeCommand::Services => {
            let rows: Vec<ServiceView> = view(value, &target, &path)?;
            let rows = render::filter(rows, &filter, render::service_key);
            show(&rows, output, |r| render::services(r))
        }
        NodeCommand::Routes => {
            let rows: Vec<RouteView> = view(value, &target, &path)?;
            let rows = render::filter(rows, &filter, render::route_key);
            show(&rows, output, |r| render::routes(r))
        }
        NodeCommand::Certs => {
            let rows: Vec<CertificateStatus> = view(value, &target, &path)?;
            let rows = render::filter(rows, &filter, render::cert_key);
            show(&rows, output, |r| render::certs(r))
        }
        NodeCommand::Policies => {
            let v: PoliciesView = view(value, &target, &path)?;
            show(
                &render::filter_policies(v, &filter),
                output,
                render::policies,
            )
        }
        NodeCommand::Connections { closed } => {
            let v: ConnectionsView = view(value, &target, &path)?;
            let rows = if *closed { v.closed } else { v.live };
            let rows = render::filter(rows, &filter, render::connection_key);
            show(&rows, output, |r| render::connections(r))
        }
        NodeCommand::Bpf => {
            let v: BpfView = view(value, &target, &path)?;
            show(&v, output, render::bpf)
        }
        NodeCommand::Trace { .. } => {
            let v: TraceView = view(value, &target, &path)?;
            show(&v, output, trace_view::render)
        }
        NodeCommand::LogLevel { .. } => {
            let v: LogLevelView = view(value, &target, &path)?;
            show(&v, output, |v| format!("log level: {}", v.level))
        }
        // Dumps, shown as the agent wrote them.
        NodeCommand::Discovery | NodeCommand::Config => {
            let output = if output == Output::Table {
                Output::Yaml
            } else {
                output
            };
            print_structured(&value, output)
        }
    }
}

fn main() -> ExitCode {
    let Top::Node(args) = Cli::parse().command;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}
