//! Stopping agents the way a kubelet does (SIGTERM, then waiting), a second agent on a
//! node that already has one (an upgrade's newcomer), and the hand-over between them.

use std::{
    fs,
    path::PathBuf,
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{sys::signal, unistd::Pid};

use super::{host, SimCluster};

impl SimCluster {
    /// Sends SIGTERM to the node's agent and returns at once; the agent stays the
    /// node's (see [`SimCluster::wait_agent_exit`]).
    pub fn terminate_agent(&self, node: &str) -> Result<()> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("no agent runs on {node}"))?;
        signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits up to `timeout` (scaled to the machine) for the node's agent to exit and
    /// reaps it; None if it still runs.
    pub fn wait_agent_exit(&self, node: &str, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + host::scaled(timeout);
        loop {
            {
                let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
                let status = agents.get_mut(node)?.try_wait().ok().flatten();
                if let Some(status) = status {
                    agents.remove(node);
                    return Some(status);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log of the node's second agent ([`SimCluster::spawn_second_agent`]).
    pub fn second_agent_log_path(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("agent-{node}-second.log"))
    }

    /// Starts another agent on a node whose agent runs, with the same command line and
    /// its own log. The caller owns it (kill it, or hand it over with
    /// [`SimCluster::adopt_agent`] once the first is gone).
    pub fn spawn_second_agent(&self, node: &str) -> Result<Child> {
        let node = self.node(node).clone();
        let log = fs::File::create(self.second_agent_log_path(&node.name))?;
        self.agent_command(&node)?
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a second mesh-node")
    }

    /// Makes `child` the node's agent (stopped with the cluster), in place of one that
    /// has exited.
    pub fn adopt_agent(&self, node: &str, child: Child) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), child);
    }

    /// An upgrade's first half, as a DaemonSet with `maxSurge: 1` does it: a new agent
    /// starts beside the running one and takes the node over (its `/status` says so and
    /// it is ready). The new agent becomes the node's; the old one is returned (it
    /// drains: send it SIGTERM and wait for it, [`OldAgent`]), with how long the
    /// take-over took from the new agent's start.
    pub fn hand_over_agent(&self, node: &str, timeout: Duration) -> Result<(OldAgent, Duration)> {
        let started = Instant::now();
        let mut newcomer = self.spawn_second_agent(node)?;
        let deadline = started + host::scaled(timeout);
        loop {
            let took_over = self.admin(node, "/status").ok().is_some_and(|s| {
                s["ready"] == true && s["handover"]["took_over_from"].as_u64().is_some()
            });
            if took_over {
                break;
            }
            if let Ok(Some(status)) = newcomer.try_wait() {
                anyhow::bail!(
                    "the new agent on {node} exited ({status}) before taking over; see {}",
                    self.second_agent_log_path(node).display()
                );
            }
            if Instant::now() > deadline {
                let _ = newcomer.kill();
                let _ = newcomer.wait();
                anyhow::bail!(
                    "the new agent on {node} did not take over within {timeout:?}; see {}",
                    self.second_agent_log_path(node).display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = started.elapsed();
        let old = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), newcomer)
            .with_context(|| format!("no agent ran on {node} before"))?;
        Ok((OldAgent(old), took))
    }
}

/// An agent that handed its node over and drains.
pub struct OldAgent(Child);

impl OldAgent {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn terminate(&self) -> Result<()> {
        signal::kill(Pid::from_raw(self.0.id() as i32), signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits up to `timeout` (scaled) for it to exit; None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + host::scaled(timeout);
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OldAgent {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
