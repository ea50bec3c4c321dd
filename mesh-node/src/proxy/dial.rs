//! Connections the agent itself opens on behalf of a local pod, the way the pod's own
//! outbound connection would go: to fetch a RequestAuthentication's `jwksUri`. A host
//! naming a Service of the cluster (`svc.ns.svc.<cluster domain>`, `svc.ns.svc`,
//! `svc.ns`) is resolved from the cluster state to the Service's VIP and port and
//! planned like any connection (`routing::plan`): HBONE with the pod's identity to a
//! meshed endpoint, plain TCP from inside the pod otherwise. Other hosts use the
//! agent's own DNS and TCP ([`DirectConnector`]).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use mesh_common::HBONE_PORT;

use crate::{
    discovery::cluster::ClusterState,
    discovery::connection_pool::PoolLimits,
    discovery::request_auth::{JwksUri, Scheme},
    hbone::io::H2Io,
    identity::jwt::fetcher::{BoxIo, Connecting, DirectConnector, FetchError, JwksConnector},
    keys::{ObjectKey, PodKey},
    proxy::pod::PodContext,
    routing::plan::{self, Plan},
    routing::transport::Transport,
};

/// The local pods' contexts, to connect as one of them.
#[derive(Default)]
pub(crate) struct MeshDialer {
    pods: Mutex<HashMap<PodKey, Weak<PodContext>>>,
}

/// The Service a JWKS host names, if it is one of the cluster's (a single label is
/// never taken for one: it has no namespace).
fn service_of(state: &ClusterState, host: &str) -> Option<(ObjectKey, IpAddr)> {
    if !host.contains('.') {
        return None;
    }
    let key = ObjectKey::from_service_host(host, "").ok()?;
    let service = state.services.get(&key)?;
    let vip: IpAddr = service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()?;
    Some((key, vip))
}

impl MeshDialer {
    pub(crate) fn new() -> Arc<MeshDialer> {
        Arc::new(MeshDialer::default())
    }

    /// Records a local pod's context (dropped pods are forgotten on the way).
    pub(crate) fn register(&self, ctx: &Arc<PodContext>) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.retain(|_, w| w.strong_count() > 0);
        pods.insert(ctx.pod.clone(), Arc::downgrade(ctx));
    }

    fn context(&self, via: &[PodKey]) -> Option<Arc<PodContext>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        via.iter().find_map(|p| pods.get(p)?.upgrade())
    }
}

/// Connects to `dst` (a Service VIP and port) as the pod of `ctx` would.
async fn through_mesh(
    ctx: Arc<PodContext>,
    state: Arc<ClusterState>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<BoxIo, FetchError> {
    let planned = plan::connection_from(
        &ctx.router.table(&state),
        &state,
        &ctx.balancer,
        &ctx.splits,
        None,
        dst,
    );
    let to = match planned {
        Plan::Forward(to) => to,
        Plan::Http(_) => {
            return Err(FetchError::Unsupported(format!(
                "{dst} is routed as HTTP (an HTTPRoute or VirtualService): fetch the keys from a Service port without HTTP routes"
            )))
        }
        Plan::Refused { refusal, .. } => {
            return Err(FetchError::Connect(format!("{dst}: {}", refusal.detail())))
        }
    };
    let target = to.endpoint.addr;
    let limits = PoolLimits {
        connect_timeout: Some(timeout),
        ..PoolLimits::default()
    };
    if let (Some(mesh), Transport::Hbone { identity }) = (&ctx.mesh, to.endpoint.transport()) {
        let crate::hbone::client::Tunnel { send, recv, .. } = mesh
            .hbone
            .open(
                &ctx.sockets,
                &ctx.identity,
                identity,
                SocketAddr::new(target.ip(), HBONE_PORT),
                target,
                &limits,
            )
            .await
            .map_err(|e| FetchError::Connect(format!("HBONE to {target}: {e}")))?;
        return Ok(Box::new(H2Io::new(send, recv)));
    }
    let tcp = ctx
        .sockets
        .connect(target, timeout)
        .await
        .map_err(|e| FetchError::Connect(format!("{target}: {e}")))?;
    Ok(Box::new(tcp))
}

impl JwksConnector for MeshDialer {
    fn connect(
        &self,
        state: Arc<ClusterState>,
        via: Vec<PodKey>,
        uri: JwksUri,
        timeout: Duration,
    ) -> Connecting {
        let Some((service, vip)) = service_of(&state, &uri.host) else {
            return DirectConnector.connect(state, via, uri, timeout);
        };
        if uri.scheme == Scheme::Https {
            return Box::pin(async move {
                Err(FetchError::Unsupported(format!(
                    "https to the cluster Service {service}: the mesh already encrypts it; use http://"
                )))
            });
        }
        let Some(ctx) = self.context(&via) else {
            return Box::pin(async move {
                Err(FetchError::Connect(format!(
                    "no local pod to reach the Service {service} from (yet)"
                )))
            });
        };
        let dst = SocketAddr::new(vip, uri.port);
        Box::pin(through_mesh(ctx, state, dst, timeout))
    }
}
