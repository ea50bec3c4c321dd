//! The `mesh-node` command line: one parser for the binary and for the test that checks
//! the arguments deploy/ passes.

use clap::{Parser, Subcommand};

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
    /// Print the CustomResourceDefinitions Nodemesh defines, as YAML.
    Crds,
}
