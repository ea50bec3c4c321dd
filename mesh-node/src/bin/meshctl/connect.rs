//! Reaching an agent: its admin address on this machine, or, in a cluster, a
//! port-forward through the API server to the mesh-node pod on a node. The Kubernetes
//! part is kept thin: find the pod, open the stream, hand it to the admin client.

use std::{fmt, net::SocketAddr, time::Duration};

use hyper::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use mesh_node::{admin::client, admin::client::AdminClientError};

pub enum Target {
    Local(SocketAddr),
    Node {
        node: String,
        namespace: String,
        selector: String,
        port: u16,
    },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this machine".into())
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Local(addr) => write!(f, "node {} (local), admin API {addr}", hostname()),
            Target::Node {
                node,
                namespace,
                port,
                ..
            } => write!(
                f,
                "node {node}, mesh-node pod in {namespace} via the API server, port {port}"
            ),
        }
    }
}

/// What to check when the agent cannot be reached.
fn advice(target: &Target, e: &AdminClientError) -> String {
    match (target, e) {
        (_, AdminClientError::Status { status, .. }) if *status == 404 || *status == 400 => {
            "check the arguments (see --help)".into()
        }
        (_, AdminClientError::Status { .. }) => "check the agent's log".into(),
        (Target::Local(addr), _) => format!(
            "check that mesh-node runs on this machine (kubectl -n nodemesh-system get pods -o wide, \
             or its service unit) and that its --admin-addr is {addr} (pass meshctl --admin-addr otherwise); \
             from another machine use --node <name>"
        ),
        (Target::Node { namespace, .. }, _) => format!(
            "check that the agent pod is Running (kubectl -n {namespace} get pods -o wide) and \
             that its admin API listens on the port given by --admin-addr"
        ),
    }
}

/// One request to the agent; errors name the node, the address and what to check.
pub async fn fetch(
    target: &Target,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let result = match target {
        Target::Local(addr) => client::request(*addr, method, path, timeout).await,
        Target::Node {
            node,
            namespace,
            selector,
            port,
        } => {
            let forwarded = tokio::time::timeout(
                timeout,
                through_api_server(node, namespace, selector, *port, method, path),
            )
            .await
            .map_err(|_| {
                format!(
                    "{target}: no answer within {timeout:?}; check the API server is reachable (kubectl get nodes)"
                )
            })?;
            forwarded?
        }
    };
    result.map_err(|e| format!("{target}: {e}; {}", advice(target, &e)))
}

/// Port-forwards to the mesh-node pod on `node` and sends one request. The outer
/// error is about finding the pod; the inner one about the admin API itself.
async fn through_api_server(
    node: &str,
    namespace: &str,
    selector: &str,
    port: u16,
    method: Method,
    path: &str,
) -> Result<Result<String, AdminClientError>, String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("node {node}: no Kubernetes credentials ({e}); check KUBECONFIG or run in a pod with a service account")
    })?;
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let params = ListParams::default()
        .labels(selector)
        .fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&params).await.map_err(|e| {
        format!("node {node}: cannot list pods in {namespace} ({e}); check the API server and your RBAC (list pods)")
    })?;
    let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let pod = list
        .items
        .iter()
        .find(|p| running(p))
        .and_then(|p| p.metadata.name.clone())
        .ok_or_else(|| {
            format!(
                "node {node}: no Running pod matching {selector} in namespace {namespace}; check \
                 kubectl -n {namespace} get pods -l {selector} -o wide (is the DaemonSet scheduled \
                 on {node}? is --agent-selector right?)"
            )
        })?;
    let mut forwarder = pods.portforward(&pod, &[port]).await.map_err(|e| {
        format!("node {node}: port-forward to {namespace}/{pod}:{port} failed ({e}); check your RBAC (create pods/portforward)")
    })?;
    let stream = forwarder.take_stream(port).ok_or_else(|| {
        format!("node {node}: the port-forward to {namespace}/{pod} gave no stream for port {port}")
    })?;
    let name = format!("{namespace}/{pod}:{port}");
    let answer = client::exchange(stream, &name, method, path).await;
    forwarder.abort();
    Ok(answer)
}
