//! The `mesh-node` command line: one parser for the binary and for the test that checks
//! the arguments deploy/ passes.

use clap::{Parser, Subcommand, ValueEnum};

use crate::{ca::server::CaConfig, config::AgentConfig};

#[derive(Parser)]
#[command(name = "mesh-node", version, about = "Nodemesh node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent: eBPF redirection, in-pod listeners, proxy.
    Agent(Box<AgentConfig>),
    /// Run the mesh certificate authority.
    Ca(Box<CaConfig>),
    /// Print a CustomResourceDefinition Nodemesh reads, as YAML.
    Crds {
        /// Which one: Nodemesh's AuthorizationPolicy, or Istio's DestinationRule,
        /// VirtualService, PeerAuthentication, AuthorizationPolicy
        /// (`istio-authorization-policy`), RequestAuthentication or Telemetry, for clusters without
        /// Istio's own CRDs.
        #[arg(long, value_enum, default_value_t = CrdKind::AuthorizationPolicy)]
        kind: CrdKind,
    },
}

/// The CRDs `mesh-node crds` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CrdKind {
    AuthorizationPolicy,
    DestinationRule,
    VirtualService,
    PeerAuthentication,
    /// Istio's (`security.istio.io`); `authorization-policy` is Nodemesh's own.
    IstioAuthorizationPolicy,
    RequestAuthentication,
    /// Istio's Telemetry (`telemetry.istio.io` v1, v1alpha1).
    Telemetry,
}

/// Writes `text` to standard output. A reader that went away (`... | head`) ends the
/// output quietly, as other command-line tools do.
pub fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
