//! The `files` discovery source: a directory of ordinary Kubernetes YAML, parsed into
//! the same k8s-openapi types the `kube` source produces, and watched for changes.
//! A file that fails to parse is reported and its last good contents keep serving.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    discovery::cluster::ClusterState, discovery::cluster::KubeObject,
    discovery::mtls::RootNamespace, telemetry::metrics::Metrics,
};

/// Parses one manifest file (one or more YAML documents, `kind: List` included).
/// Kinds the agent does not use are skipped; a broken document fails the whole file.
pub fn parse_manifest(text: &str) -> Result<Vec<KubeObject>, String> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        collect(value, index + 1, &mut objects)?;
    }
    Ok(objects)
}

fn collect(value: serde_yaml::Value, doc: usize, out: &mut Vec<KubeObject>) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| format!("document {doc}: no `kind` field"))?
        .to_string();
    let typed = |e: serde_yaml::Error| format!("document {doc} ({kind}): {e}");
    let object = match kind.as_str() {
        "Namespace" => {
            KubeObject::Namespace(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "Pod" => KubeObject::Pod(Box::new(serde_yaml::from_value(value).map_err(typed)?)),
        "Service" => KubeObject::Service(Box::new(serde_yaml::from_value(value).map_err(typed)?)),
        "EndpointSlice" => {
            KubeObject::EndpointSlice(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "HTTPRoute" => {
            KubeObject::HttpRoute(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "TCPRoute" => KubeObject::TcpRoute(Box::new(serde_yaml::from_value(value).map_err(typed)?)),
        // By group: Istio's (security.istio.io) or else Nodemesh's own.
        "AuthorizationPolicy" if is_istio_security(&value) => KubeObject::IstioAuthorizationPolicy(
            Box::new(serde_yaml::from_value(value).map_err(typed)?),
        ),
        "AuthorizationPolicy" => {
            KubeObject::AuthorizationPolicy(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        // Istio's kinds; another group's DestinationRule or VirtualService is not ours.
        "DestinationRule" if is_istio_networking(&value) => {
            KubeObject::DestinationRule(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "VirtualService" if is_istio_networking(&value) => {
            KubeObject::VirtualService(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "PeerAuthentication" if is_istio_security(&value) => {
            KubeObject::PeerAuthentication(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "RequestAuthentication" if is_istio_security(&value) => KubeObject::RequestAuthentication(
            Box::new(serde_yaml::from_value(value).map_err(typed)?),
        ),
        "Telemetry" if is_istio_telemetry(&value) => {
            KubeObject::Telemetry(Box::new(serde_yaml::from_value(value).map_err(typed)?))
        }
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                collect(item, doc, out)?;
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    if object.key().is_none() {
        return Err(format!("document {doc} ({kind}): metadata.name is missing"));
    }
    out.push(object);
    Ok(())
}

/// `apiVersion: networking.istio.io/<a version Istio serves VirtualService at>`.
fn is_istio_networking(value: &serde_yaml::Value) -> bool {
    value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .and_then(|v| v.strip_prefix("networking.istio.io/"))
        .is_some_and(|v| crate::discovery::virtual_service::VERSIONS.contains(&v))
}

/// `apiVersion: telemetry.istio.io/<v1 or v1alpha1>`, or
/// `networking.istio.io/v1alpha3` (a spelling Istio's older documents use).
fn is_istio_telemetry(value: &serde_yaml::Value) -> bool {
    let version = value.get("apiVersion").and_then(|v| v.as_str());
    version
        .and_then(|v| v.strip_prefix("telemetry.istio.io/"))
        .is_some_and(|v| crate::discovery::telemetry::VERSIONS.contains(&v))
        || version == Some("networking.istio.io/v1alpha3")
}

/// `apiVersion: security.istio.io/<v1 or v1beta1>`.
fn is_istio_security(value: &serde_yaml::Value) -> bool {
    value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .and_then(|v| v.strip_prefix("security.istio.io/"))
        .is_some_and(|v| crate::discovery::peer_authentication::VERSIONS.contains(&v))
}

/// Identity of a file version: cheap to compare on every rescan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified_ns: i128,
    len: u64,
    ino: u64,
}

struct LoadedFile {
    stamp: Stamp,
    objects: Vec<KubeObject>,
}

/// A problem with one manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    pub path: PathBuf,
    pub reason: String,
}

pub struct ManifestDirectory {
    dir: PathBuf,
    files: BTreeMap<PathBuf, LoadedFile>,
    root: RootNamespace,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl ManifestDirectory {
    pub fn new(dir: impl Into<PathBuf>) -> ManifestDirectory {
        ManifestDirectory {
            dir: dir.into(),
            files: BTreeMap::new(),
            root: RootNamespace::default(),
        }
    }

    /// The mesh's root namespace (`--root-namespace`) the states are built with.
    pub fn with_root_namespace(mut self, root: RootNamespace) -> ManifestDirectory {
        self.root = root;
        self
    }

    /// Re-reads changed files. Returns whether the set of objects changed, and the
    /// problems found in files that changed.
    pub fn rescan(&mut self) -> (bool, Vec<ManifestProblem>) {
        let mut problems = Vec::new();
        let mut seen = Vec::new();
        let mut changed = false;
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                problems.push(ManifestProblem {
                    path: self.dir.clone(),
                    reason: format!("cannot read the manifest directory: {e}"),
                });
                return (false, problems);
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            seen.push(path.clone());
            let stamp = Stamp {
                modified_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
                len: meta.len(),
                ino: meta.ino(),
            };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = fs::read_to_string(&path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|text| parse_manifest(&text));
            match parsed {
                Ok(objects) => {
                    self.files.insert(path, LoadedFile { stamp, objects });
                    changed = true;
                }
                Err(reason) => {
                    // Keep the last good version; remember the stamp so the same broken
                    // file is reported once, not on every rescan.
                    let objects = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files
                        .insert(path.clone(), LoadedFile { stamp, objects });
                    problems.push(ManifestProblem { path, reason });
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        changed |= self.files.len() != before;
        (changed, problems)
    }

    pub fn state(&self) -> ClusterState {
        let mut state =
            ClusterState::from_objects(self.files.values().flat_map(|f| f.objects.iter().cloned()));
        state.set_root_namespace(&self.root);
        state
    }
}

/// How often the directory is rescanned even without a change notification.
const RESCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Rescan interval when inotify is unavailable.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Editors write in several steps; wait this long after a notification.
const SETTLE: Duration = Duration::from_millis(20);

/// Whether a change notification may mean a manifest changed. Opening or reading the
/// directory or a file is not a change, and the rescan itself opens the directory: taken
/// as one, every rescan would set off the next, a scan every [`SETTLE`] forever.
fn may_change_manifests(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches `dir` and publishes a new state whenever it changes (built with the mesh's
/// `root` namespace). The first scan happens before this returns, so the sender holds a
/// state when the agent starts.
pub async fn watch_directory(
    dir: PathBuf,
    root: RootNamespace,
    tx: watch::Sender<Arc<ClusterState>>,
    metrics: Arc<Metrics>,
) {
    let mut manifests = ManifestDirectory::new(dir.clone()).with_root_namespace(root);
    let (notify_tx, mut notify_rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.as_ref().map_or(true, may_change_manifests) {
            let _ = notify_tx.try_send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|_| w));
    let interval = match &watcher {
        Ok(_) => RESCAN_INTERVAL,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the manifest directory; polling instead");
            POLL_INTERVAL
        }
    };
    let mut first = true;
    let mut problems_reporter = crate::discovery::problems::ProblemReporter::new();
    loop {
        metrics.manifest_scans.inc();
        let (changed, problems) = manifests.rescan();
        for p in &problems {
            metrics.manifest_errors.inc();
            warn!(path = %p.path.display(), reason = %p.reason, "manifest skipped; the last good version stays in effect");
        }
        // The first scan is always published: the agent waits for it before reconciling.
        if changed || std::mem::take(&mut first) {
            let state = manifests.state();
            info!(objects = ?state.counts(), "manifests changed");
            problems_reporter.report(&state, &metrics);
            metrics.state_updates.inc();
            tx.send_replace(Arc::new(state));
        }
        tokio::select! {
            _ = notify_rx.recv() => {
                tokio::time::sleep(SETTLE).await;
                while notify_rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(interval) => {}
            _ = tx.closed() => {
                debug!("state receivers gone; manifest watcher stops");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {nodemesh.io/mesh: enabled}}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: apps}\nspec: {nodeName: a, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.0.0.2}\n";

    #[test]
    fn parses_multi_document_files_lists_and_ignores_other_kinds() {
        let text = format!(
            "{NS}---\n{POD}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {{name: other}}\n"
        );
        let objects = parse_manifest(&text).unwrap();
        let state = ClusterState::from_objects(objects);
        assert_eq!(state.namespaces.len(), 2);
        assert_eq!(state.pods.len(), 1);
    }

    #[test]
    fn broken_documents_name_the_problem() {
        let err = parse_manifest("kind: Pod\nmetadata: [not, a, map]\n").unwrap_err();
        assert!(err.contains("document 1 (Pod)"), "{err}");
        let err = parse_manifest("metadata: {name: x}\n").unwrap_err();
        assert!(err.contains("no `kind`"), "{err}");
        let err = parse_manifest("a: [unclosed\n").unwrap_err();
        assert!(err.starts_with("document 1"), "{err}");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_version_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        fs::write(dir.path().join("pod.yaml"), POD).unwrap();
        fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut m = ManifestDirectory::new(dir.path());
        let (changed, problems) = m.rescan();
        assert!(changed && problems.is_empty());
        assert_eq!(m.state().pods.len(), 1);

        fs::write(
            dir.path().join("pod.yaml"),
            "kind: Pod\nspec: {containers: 7}\n",
        )
        .unwrap();
        let (changed, problems) = m.rescan();
        assert!(!changed);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].path.ends_with("pod.yaml"));
        assert_eq!(m.state().pods.len(), 1, "last good pod stays");
        assert!(m.rescan().1.is_empty(), "reported once");

        fs::remove_file(dir.path().join("pod.yaml")).unwrap();
        let (changed, _) = m.rescan();
        assert!(changed);
        assert!(m.state().pods.is_empty());
        assert_eq!(m.state().namespaces.len(), 1);
    }

    /// The watcher rescans when a file changes, and otherwise every [`RESCAN_INTERVAL`]:
    /// its own rescans (which open the directory) do not count as changes.
    #[tokio::test]
    async fn an_unchanged_directory_is_rescanned_every_interval_and_a_change_at_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
        let watcher = tokio::spawn(watch_directory(
            dir.path().to_path_buf(),
            RootNamespace::default(),
            tx,
            metrics.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("the first scan is published")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let scans = metrics.manifest_scans.get();
        assert!(
            scans <= 2,
            "{scans} scans of a directory nobody changed in 1.5 s (the interval is {RESCAN_INTERVAL:?})"
        );
        fs::write(dir.path().join("pod.yaml"), POD).unwrap();
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .expect("a new file is picked up within a second, not at the next interval")
            .unwrap();
        assert_eq!(rx.borrow().pods.len(), 1);
        watcher.abort();
    }
}
