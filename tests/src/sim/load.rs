//! Steady load across agent upgrades: a cluster whose `web` Service is behind an
//! HTTPRoute (the load's HTTP requests go through it), and the load itself
//! (`mesh-testapp upgrade-load`), stopped and reported.

use std::{
    path::PathBuf,
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{ClusterSpec, PodSpec, Process, ServiceSpec, SimCluster};
use crate::upgrade_load::LoadReport;

/// The `web` Service (apps, port 80) through an HTTPRoute that marks each request
/// `x-routed: by-route`: the requests are proxied as HTTP, not relayed.
fn web_route() -> String {
    [
        "apiVersion: gateway.networking.k8s.io/v1",
        "kind: HTTPRoute",
        "metadata: {name: web, namespace: apps}",
        "spec:",
        "  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]",
        "  rules:",
        "  - filters:",
        "    - type: RequestHeaderModifier",
        "      requestHeaderModifier: {add: [{name: x-routed, value: by-route}]}",
        "    backendRefs: [{name: web, port: 80}]",
    ]
    .join("\n")
        + "\n"
}

impl SimCluster {
    /// Two nodes whose agents drain for at most `drain_timeout`, with the `web`
    /// Service (apps, port 80) on node b serving HTTP behind the `web` HTTPRoute,
    /// which is checked to apply from `client`. Returns the cluster and the web server.
    pub fn web_behind_a_route(drain_timeout: &str) -> Result<(SimCluster, Process)> {
        let mut spec = ClusterSpec::two_nodes();
        spec.pods.push(PodSpec::new("web", "apps", "b"));
        spec.services = vec![ServiceSpec::new("web", "apps", 80, 8081, &["web"])];
        spec.agent_args
            .extend(["--drain-timeout".to_string(), drain_timeout.to_string()]);
        let cluster = SimCluster::create(spec)?;
        cluster.start_agents()?;
        let web = cluster.http_serve("web", &[8081])?;
        cluster.write_manifest("web-route.yaml", &web_route())?;
        let vip = cluster.service("web").addr4();
        let routed = cluster.eventually(Duration::from_secs(10), || {
            cluster
                .http("client", vip, "web", "/", &[])
                .ok()
                .and_then(|r| r.samples.first().cloned())
                .is_some_and(|s| s.status == 200 && s.body.contains("by-route"))
        });
        if routed.is_none() {
            bail!("the web HTTPRoute never applied");
        }
        Ok((cluster, web))
    }

    /// Starts `mesh-testapp upgrade-load` in `pod` with `args` (without
    /// `--stop-file`: [`RunningLoad::finish`] stops it).
    pub fn start_load(&self, pod: &str, args: &[String]) -> Result<RunningLoad> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let stop = std::env::temp_dir().join(format!(
            "nodemesh-load-stop-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&stop);
        let mut args = args.to_vec();
        args.extend(["--stop-file".to_string(), stop.display().to_string()]);
        let child = self.start_testapp(pod, "upgrade-load", &args)?;
        Ok(RunningLoad {
            child: Some(child),
            stop,
        })
    }
}

/// A load running in a pod.
pub struct RunningLoad {
    child: Option<Child>,
    stop: PathBuf,
}

impl RunningLoad {
    /// Tells the load to stop, waits for it, and returns its report.
    pub fn finish(mut self) -> Result<LoadReport> {
        std::fs::write(&self.stop, b"").context("writing the load's stop file")?;
        let child = self.child.take().context("the load was already finished")?;
        let out = child.wait_with_output().context("waiting for the load")?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "no load report: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for RunningLoad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.stop);
    }
}
