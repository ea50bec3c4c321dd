//! `mesh-node`: the Nodemesh node agent.

use std::process::ExitCode;

use clap::Parser;
use mesh_node::{
    admin::state::LogLevel, cli::Cli, cli::Command, config::LogArgs, config::LogFormat,
};
use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer};

fn init_logging(config: &LogArgs) -> anyhow::Result<LogLevel> {
    let filter = EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level `{}`: {e}", config.log_level))?;
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    Ok(LogLevel::new(&config.log_level, move |level| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

/// Runs a subcommand on a multi-threaded runtime; errors end the process with one line.
fn run_async<E: std::fmt::Display>(
    what: &str,
    task: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{what}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{what} failed");
            eprintln!("{what}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { kind } => {
            use kube::CustomResourceExt;
            let crd = match kind {
                mesh_node::cli::CrdKind::AuthorizationPolicy => {
                    mesh_node::discovery::policy::AuthorizationPolicy::crd()
                }
                mesh_node::cli::CrdKind::DestinationRule => {
                    mesh_node::discovery::destination_rule::crd()
                }
                mesh_node::cli::CrdKind::VirtualService => {
                    mesh_node::discovery::virtual_service::crd()
                }
                mesh_node::cli::CrdKind::PeerAuthentication => {
                    mesh_node::discovery::peer_authentication::crd()
                }
                mesh_node::cli::CrdKind::IstioAuthorizationPolicy => {
                    mesh_node::discovery::authorization_policy::crd()
                }
                mesh_node::cli::CrdKind::RequestAuthentication => {
                    mesh_node::discovery::request_authentication::crd()
                }
                mesh_node::cli::CrdKind::Telemetry => mesh_node::discovery::telemetry::crd(),
            };
            let written = serde_yaml::to_string(&crd)
                .map_err(|e| format!("cannot render the CRD: {e}"))
                .and_then(|text| {
                    mesh_node::cli::write_stdout(&text)
                        .map_err(|e| format!("cannot write the CRD: {e}"))
                });
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-node: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca(config) => {
            if let Err(e) = init_logging(&config.log) {
                eprintln!("mesh-node: {e}");
                return ExitCode::from(2);
            }
            run_async("mesh-node ca", mesh_node::ca::server::run(*config))
        }
        Command::Agent(config) => {
            let log_level = match init_logging(&config.log) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mesh-node: {e}");
                    return ExitCode::from(2);
                }
            };
            // Before the runtime's threads exist.
            mesh_node::agent::one_heap_per_core();
            run_async("mesh-node agent", mesh_node::agent::run(*config, log_level))
        }
    }
}
