//! What `/workloads` shows of each pod of the node (and `meshctl` reads).

use super::*;

/// One pod of this node as the admin API shows it (and `meshctl` reads it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    #[serde(flatten)]
    pub pod: PodKey,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub enrolled: bool,
    /// Why the pod is not enrolled (a rule, or the last enrollment error).
    pub reason: Option<String>,
    pub netns: Option<String>,
    pub netns_cookie: Option<u64>,
    pub listeners: Vec<SocketAddr>,
    /// Not enrolled yet, and its connects are refused until it is (its cgroup is held).
    pub held: bool,
}

impl Workloads {
    /// Every pod scheduled on this node, enrolled or not (and why not).
    pub(crate) fn status(&self, state: &ClusterState) -> Vec<WorkloadStatus> {
        state
            .pods_on_node(&self.settings.node)
            .map(|(key, pod)| {
                let plan = crate::discovery::cluster::plan(key, pod);
                let running = self.running.get(key);
                let reason = match (running, state.mesh_rules(key, pod)) {
                    (Some(_), _) => None,
                    (None, Err(rule)) => Some(
                        serde_json::to_value(rule)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                    ),
                    (None, Ok(())) => Some(
                        self.failures
                            .get(key)
                            .cloned()
                            .unwrap_or_else(|| "pending".into()),
                    ),
                };
                WorkloadStatus {
                    pod: key.clone(),
                    uid: plan.uid,
                    ips: running.map_or(plan.ips, |r| r.plan.ips.clone()),
                    service_account: plan.service_account,
                    enrolled: running.is_some(),
                    reason,
                    netns: running.map(|r| r.netns_path.display().to_string()),
                    netns_cookie: running.map(|r| r.cookie),
                    listeners: running
                        .map(|r| r.listeners.iter().map(|(a, _)| *a).collect())
                        .unwrap_or_default(),
                    held: running.is_none() && self.holds.is_held(key),
                }
            })
            .collect()
    }
}
