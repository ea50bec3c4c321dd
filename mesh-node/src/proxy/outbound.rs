//! The in-pod outbound listener (15001): connections the connect hooks redirected.
//! The original destination comes from the eBPF map, keyed by the accepted socket's
//! peer; the upstream connection leaves from inside the pod.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::ConnKey;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::{
    discovery::cluster::canonical, discovery::cluster::ip_from_key, discovery::cluster::ip_key,
    discovery::cluster::ClusterState, proxy::http::downstream, proxy::http::forward::Frontend,
    proxy::pod::accept_loop, proxy::pod::forward, proxy::pod::forward_hbone, proxy::pod::refuse,
    proxy::pod::reset, proxy::pod::PodContext, routing::http::routes::declares_http2,
    routing::http::routes::is_http_routed, routing::resolve::resolve, routing::resolve::Resolution,
    routing::transport::meshed_identity, telemetry::connections::ConnectionInfo,
    telemetry::connections::Direction, telemetry::outcome::RefusalReason,
};

pub async fn serve(listener: TcpListener, ctx: Arc<PodContext>) {
    accept_loop(listener, ctx, |stream, peer, ctx| async move {
        handle(stream, peer, ctx).await
    })
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: Arc<PodContext>) {
    let key = ConnKey {
        netns_cookie: ctx.netns_cookie,
        addr: ip_key(peer.ip()),
        port: peer.port(),
        _pad: [0; 3],
    };
    let Some(orig) = ctx.dataplane.take_orig_dst(&key) else {
        // Someone connected to 15001 directly, or the entry was swept: we cannot know
        // where this was going.
        ctx.metrics
            .refused
            .with_label_values(&["no_original_destination"])
            .inc();
        crate::warn_limited!(pod = %ctx.pod, src = %peer, "outbound connection without an original destination; closing");
        reset(stream);
        return;
    };
    let dst = SocketAddr::new(ip_from_key(&orig.addr), orig.port);
    debug!(pod = %ctx.pod, src = %peer, dst = %dst, "outbound");
    let state = ctx.state.borrow().clone();
    let mut info = ConnectionInfo::new(Direction::Outbound, ctx.pod.clone(), peer, dst);
    match resolve(&state, dst, &ctx.service_cidrs) {
        Resolution::Direct => {
            info.peer = state.pod_by_ip(canonical(dst.ip())).cloned();
            send(stream, dst, info, &ctx, &state).await;
        }
        Resolution::Service {
            service,
            port,
            backends,
            ..
        } => {
            info.service = Some(format!("{service}:{port}"));
            if is_http_routed(&state, &service, port) {
                let frontend = Frontend {
                    backend_http2: declares_http2(&state, &service, port),
                    service,
                    port,
                    want_v6: canonical(dst.ip()).is_ipv6(),
                    src: peer,
                };
                return downstream::serve(stream, info, frontend, ctx).await;
            }
            let Some(pick) = ctx.balancer.pick(&service, port, &backends) else {
                return refuse(stream, info, RefusalReason::NoReadyEndpoint, &ctx);
            };
            info.backend = Some(pick.backend.to_string());
            info.peer = state.pod_by_ip(pick.endpoint.ip()).cloned();
            send(stream, pick.endpoint, info, &ctx, &state).await;
            drop(pick);
        }
        Resolution::UnknownPort { service, port } => {
            info.service = Some(format!("{service}:{port}"));
            refuse(stream, info, RefusalReason::UnknownServicePort, &ctx);
        }
        Resolution::UnknownService => refuse(stream, info, RefusalReason::UnknownService, &ctx),
    }
}

/// HBONE to meshed pods, plain TCP to everything else.
async fn send(
    stream: TcpStream,
    target: SocketAddr,
    info: ConnectionInfo,
    ctx: &PodContext,
    state: &ClusterState,
) {
    if let Some(mesh) = &ctx.mesh {
        if let Some(destination) = meshed_identity(state, &mesh.trust_domain, target.ip()) {
            return forward_hbone(stream, target, destination, info, ctx, mesh).await;
        }
    }
    forward(stream, target, info, ctx).await
}
