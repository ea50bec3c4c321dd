//! What the wire tests share: the agent's discovery started against [`FakeApiServer`]
//! as `agent::run` starts it, waiting for what should happen, and which versions of a
//! kind the agent asked for.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    discovery::apiserver::fake_apiserver::FakeApiServer, discovery::apiserver::DiscoveryHealth,
    discovery::cluster::ClusterState, discovery::cluster::Kind, discovery::mtls::RootNamespace,
    telemetry::metrics::Metrics,
};

/// Bound on waits for things that happen at once when the code is right.
pub(super) const PROMPTLY: Duration = Duration::from_secs(10);

/// The agent's discovery, stopped when dropped.
pub(super) struct Agent {
    pub(super) health: Arc<DiscoveryHealth>,
    pub(super) metrics: Arc<Metrics>,
    state: watch::Receiver<Arc<ClusterState>>,
    task: JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Discovery from `server`, with the default root namespace.
pub(super) fn start(server: &FakeApiServer) -> Agent {
    start_with_root(server, RootNamespace::default())
}

pub(super) fn start_with_root(server: &FakeApiServer, root: RootNamespace) -> Agent {
    let health = Arc::new(DiscoveryHealth::default());
    let metrics = Arc::new(Metrics::new());
    let (tx, state) = watch::channel(Arc::new(ClusterState::default()));
    let task = tokio::spawn(super::run(
        server.client(),
        tx,
        metrics.clone(),
        health.clone(),
        root,
    ));
    Agent {
        health,
        metrics,
        state,
        task,
    }
}

impl Agent {
    pub(super) fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// Ready, as `/healthz/ready`'s discovery part says, with every kind synced.
    pub(super) fn ready(&self) -> bool {
        self.health.unready_reason(Instant::now()).is_none() && self.health.every_kind_synced()
    }

    /// `nodemesh_config_problems_total{kind,reason}`.
    pub(super) fn problems(&self, kind: Kind, reason: &str) -> u64 {
        self.metrics
            .config_problems
            .with_label_values(&[kind.name(), reason])
            .get()
    }
}

/// Polls `check` every 10 ms until it holds, and says how long that took; fails after
/// `within`.
pub(super) async fn eventually(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if check() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The versions of `group`'s `plural` the agent asked `server` for.
pub(super) fn versions_read(server: &FakeApiServer, group: &str, plural: &str) -> BTreeSet<String> {
    server
        .requests()
        .iter()
        .filter_map(|r| {
            let path = r.strip_prefix(&format!("GET /apis/{group}/"))?;
            let (version, rest) = path.split_once('/')?;
            rest.starts_with(plural).then(|| version.to_string())
        })
        .collect()
}
