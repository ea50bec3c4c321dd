//! Talking to a node agent's admin API from the test process: each request runs on
//! a thread that has entered the node's network namespace.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{host, SimCluster};

impl SimCluster {
    /// One HTTP/1.1 request to the node agent's admin API (127.0.0.1:15000 in the node).
    pub fn admin_raw(&self, node: &str, method: &str, path: &str) -> Result<(u16, String)> {
        self.http_in_node(node, "127.0.0.1:15000".parse()?, method, path)
    }

    /// The node agent's Prometheus endpoint (:15020/metrics), as a scraper reads it.
    pub fn scrape_metrics(&self, node: &str) -> Result<String> {
        let (status, body) =
            self.http_in_node(node, "127.0.0.1:15020".parse()?, "GET", "/metrics")?;
        if status != 200 {
            bail!("metrics on {node}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// `nodemesh_connections_refused_total{reason}` on a node (0 when never counted).
    pub fn refused_count(&self, node: &str, reason: &str) -> Result<u64> {
        let (_, text) = self.admin_raw(node, "GET", "/stats/prometheus")?;
        let prefix = format!("nodemesh_connections_refused_total{{reason=\"{reason}\"}} ");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64))
    }

    /// A request to the node agent's readiness listener (:15021) from the node, as
    /// the kubelet probes it.
    pub fn readiness_probe(&self, node: &str, method: &str, path: &str) -> Result<(u16, String)> {
        self.http_in_node(node, "127.0.0.1:15021".parse()?, method, path)
    }

    /// Runs `meshctl node <args>` inside the node, as an operator on it would.
    pub fn meshctl(&self, node: &str, args: &[&str]) -> Result<std::process::Output> {
        let meshctl = host::target_bin("meshctl")?;
        Ok(self
            .node_placement(node)
            .command(&meshctl)?
            .arg("node")
            .args(args)
            .output()?)
    }

    /// `meshctl node <args> -o json`, which must succeed, parsed.
    pub fn meshctl_json(&self, node: &str, args: &[&str]) -> Result<Value> {
        let out = self.meshctl(node, &[args, &["-o", "json"]].concat())?;
        if !out.status.success() {
            bail!(
                "meshctl node {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("meshctl node {args:?}: not JSON"))
    }

    fn http_in_node(
        &self,
        node: &str,
        addr: SocketAddr,
        method: &str,
        path: &str,
    ) -> Result<(u16, String)> {
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        host::in_netns(&self.node(node).netns, move || {
            let mut s = TcpStream::connect_timeout(&addr, host::scaled(Duration::from_secs(2)))?;
            s.set_read_timeout(Some(host::scaled(Duration::from_secs(5))))?;
            s.write_all(request.as_bytes())?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow!("malformed HTTP response"))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("no status in `{head}`"))?;
            Ok((status, body.to_string()))
        })
    }

    pub fn admin(&self, node: &str, path: &str) -> Result<Value> {
        let (status, body) = self.admin_raw(node, "GET", path)?;
        if status != 200 {
            bail!("admin {path} on {node}: HTTP {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("admin {path}: not JSON: {body}"))
    }

    /// Closed connections the node's agent recorded.
    pub fn closed_connections(&self, node: &str) -> Result<Vec<Value>> {
        let v = self.admin(node, "/connections")?;
        Ok(v["closed"].as_array().cloned().unwrap_or_default())
    }

    /// The node's closed connections once one of them satisfies `wanted` (polled for up
    /// to 2 s, scaled): the agent records a connection when both of its sides are closed,
    /// a moment after the client is done.
    pub fn closed_connections_with(
        &self,
        node: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        let found = super::host::wait_for(std::time::Duration::from_secs(2), || {
            self.closed_connections(node)
                .ok()
                .filter(|records| records.iter().any(&wanted))
        });
        match found {
            Some(records) => Ok(records),
            None => bail!(
                "node {node} recorded no such closed connection: {:#?}",
                self.closed_connections(node)?
            ),
        }
    }

    /// The entry count of each eBPF map of the node's agent.
    pub fn map_entries(&self, node: &str) -> Result<HashMap<String, u64>> {
        let v = self.admin(node, "/bpf")?;
        Ok(v["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m["name"].as_str()?.to_string(), m["entries"].as_u64()?)))
            .collect())
    }

    /// The node agent's output with every access-log line queued so far written out
    /// (the agent writes them within 50 ms; this asks it to at once, when it runs).
    pub fn access_log(&self, node: &str) -> String {
        let _ = self.admin_raw(node, "POST", "/access-log/flush");
        self.agent_log(node)
    }

    /// The HTTP request lines of the node agent's access log (JSON on stdout), oldest first.
    pub fn request_logs(&self, node: &str) -> Vec<Value> {
        self.access_log(node)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["log"] == "access" && v["kind"] == "request")
            .collect()
    }
}
