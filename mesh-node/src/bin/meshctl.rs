//! `meshctl`: inspect a Nodemesh node agent.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use hyper::Method;
use mesh_node::admin_client;

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

#[derive(Parser)]
struct NodeArgs {
    /// Admin API of the agent.
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Json)]
    output: Output,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Readiness of the agent.
    Status,
    /// Pods on the node: enrolled or why not, namespace, listeners.
    Workloads,
    /// Live and recently closed proxied connections.
    Connections,
    /// eBPF programs, links, maps and their occupancy.
    Bpf,
    /// Every Service port: route, weighted backends, ready endpoints.
    Services,
    /// Sync state of each discovered kind.
    Discovery,
    /// Certificates of the identities on this node.
    Certs,
    /// The agent's effective configuration.
    Config,
    /// Show or set the log filter.
    LogLevel { level: Option<String> },
}

fn main() -> ExitCode {
    let Top::Node(args) = Cli::parse().command;
    let (method, path) = match &args.command {
        NodeCommand::Status => (Method::GET, "/healthz/ready".to_string()),
        NodeCommand::Workloads => (Method::GET, "/workloads".into()),
        NodeCommand::Connections => (Method::GET, "/connections".into()),
        NodeCommand::Bpf => (Method::GET, "/bpf".into()),
        NodeCommand::Services => (Method::GET, "/services".into()),
        NodeCommand::Discovery => (Method::GET, "/discovery".into()),
        NodeCommand::Certs => (Method::GET, "/certs".into()),
        NodeCommand::Config => (Method::GET, "/config_dump".into()),
        NodeCommand::LogLevel { level: None } => (Method::GET, "/logging".into()),
        NodeCommand::LogLevel { level: Some(l) } => (Method::POST, format!("/logging?level={l}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(admin_client::request(
        args.admin_addr,
        method,
        &path,
        Duration::from_secs(3),
    ));
    match result {
        Ok(body) => {
            let text = match args.output {
                Output::Json => body,
                Output::Yaml => serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| serde_yaml::to_string(&v).ok())
                    .unwrap_or(body),
            };
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}
