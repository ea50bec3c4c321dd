//! The in-pod outbound listener (15001): connections the connect hooks redirected.
//! The original destination comes from the eBPF map, keyed by the accepted socket's
//! peer; the upstream connection leaves from inside the pod.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::ConnKey;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::{
    discovery::cluster::ip_from_key, discovery::cluster::ip_key,
    discovery::connection_pool::PoolLimits, proxy::http::downstream,
    proxy::http::forward::Frontend, proxy::pod::accept_loop, proxy::pod::forward,
    proxy::pod::forward_hbone, proxy::pod::refuse, proxy::pod::reset, proxy::pod::PodContext,
    routing::plan, routing::plan::Plan, routing::pool::backend_of, routing::pool::ConnectionPermit,
    routing::pool::Overflow, routing::transport::Transport, telemetry::connections::ConnectionInfo,
    telemetry::connections::Direction, telemetry::outcome::RefusalReason,
};

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<PodContext>) {
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
    info.access_log = state.telemetry_for(&ctx.pod).logs();
    // (The routing table is held only while planning.)
    let planned = plan::connection_from(
        &ctx.router.table(&state),
        &state,
        &ctx.balancer,
        &ctx.splits,
        Some(ctx.client_ip(peer, dst.is_ipv6())),
        dst,
    );
    match planned {
        Plan::Forward(to) => {
            info.service = to.service.as_ref().map(|s| s.frontend.clone());
            info.backend = to.backend().cloned();
            info.peer = to.endpoint.pod().cloned();
            // Circuit breaking: the destination's tcp.maxConnections, held while the
            // connection lives.
            let permit = match admit(&ctx, &to) {
                Ok(permit) => permit,
                Err(overflow) => {
                    debug!(pod = %ctx.pod, src = %peer, %dst, %overflow, "connection refused");
                    refuse(stream, info, RefusalReason::ConnectionPoolOverflow, &ctx);
                    return;
                }
            };
            send(stream, to, info, &ctx).await;
            drop(permit);
        }
        Plan::Http(service) => {
            info.service = Some(service.frontend.clone());
            let frontend = Frontend {
                backend_http2: service.http.is_some_and(|h| h.backend_http2),
                service: service.frontend.service.clone(),
                port: service.frontend.port,
                want_v6: service.want_v6,
                src: peer,
            };
            downstream::serve(stream, info, frontend, ctx).await
        }
        Plan::Refused { frontend, refusal } => {
            info.service = frontend;
            refuse(stream, info, refusal.reason(), &ctx);
        }
    }
}

/// A place in the connection pool of the backend the balancer chose (None: its policy
/// bounds nothing).
fn admit(ctx: &PodContext, to: &plan::Forward) -> Result<Option<ConnectionPermit>, Overflow> {
    let (Some(service), Some(pick)) = (&to.service, &to.pick) else {
        return Ok(None);
    };
    let Some(pool) = backend_of(service, pick).and_then(|b| ctx.pools.pool(b)) else {
        return Ok(None);
    };
    pool.connection().map(Some)
}

/// The connection settings of the backend the balancer chose (its DestinationRule's
/// `tcp.connectTimeout` and `tcp.tcpKeepalive`; default: the agent's).
fn connect_limits(to: &plan::Forward) -> PoolLimits {
    let (Some(service), Some(pick)) = (&to.service, &to.pick) else {
        return PoolLimits::default();
    };
    backend_of(service, pick)
        .and_then(|b| b.policy.connection_pool)
        .unwrap_or_default()
}

/// HBONE to meshed pods (when the mesh has a CA), plain TCP to everything else.
async fn send(stream: TcpStream, to: plan::Forward, info: ConnectionInfo, ctx: &PodContext) {
    let target = to.endpoint.addr;
    let limits = connect_limits(&to);
    if let (Some(mesh), Transport::Hbone { identity }) = (&ctx.mesh, to.endpoint.transport()) {
        return forward_hbone(stream, target, identity, info, ctx, mesh, to.pick, &limits).await;
    }
    forward(stream, target, info, ctx, to.pick, &limits).await
}
