//! The in-pod plaintext inbound listener (15006): connections sk_lookup steered here.
//! The original destination is simply the accepted socket's local address.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::is_mesh_pod_port;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::{
    discovery::cluster::canonical, identity::authz, identity::authz::Admission,
    identity::authz::ConnectionFacts, proxy::inbound_http, proxy::pod::accept_loop,
    proxy::pod::connect_in_pod, proxy::pod::refuse, proxy::pod::reset, proxy::pod::PodContext,
    relay::relay, telemetry::connections::ConnectionInfo, telemetry::connections::Direction,
    telemetry::connections::Security, telemetry::outcome::ConnectionEnd,
    telemetry::outcome::RefusalReason,
};

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<PodContext>) {
    accept_loop(listener, ctx, |stream, peer, ctx| async move {
        handle(stream, peer, ctx).await
    })
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: Arc<PodContext>) {
    let dst = match stream.local_addr() {
        Ok(a) => SocketAddr::new(canonical(a.ip()), a.port()),
        Err(e) => {
            crate::warn_limited!(pod = %ctx.pod, src = %peer, error = %e, "inbound socket has no local address");
            return;
        }
    };
    debug!(pod = %ctx.pod, src = %peer, dst = %dst, "inbound plaintext");
    let state = ctx.state.borrow().clone();
    let mut info = ConnectionInfo {
        peer: state.pod_by_ip(canonical(peer.ip())).cloned(),
        destination_identity: Some(ctx.identity.to_string()),
        access_log: state.telemetry_for(&ctx.pod).logs(),
        ..ConnectionInfo::new(Direction::Inbound, ctx.pod.clone(), peer, dst)
    };
    // sk_lookup only steers the pod's addresses and never the mesh's ports; anything else
    // reached the loopback listener from inside the pod, and forwarding it would make
    // the agent connect to itself.
    if is_mesh_pod_port(dst.port()) {
        return refuse(stream, info, RefusalReason::InboundTargetMeshPort, &ctx);
    }
    if !ctx.ips.contains(&dst.ip()) {
        return refuse(stream, info, RefusalReason::InboundTargetNotLocal, &ctx);
    }
    let facts = ConnectionFacts {
        source_ip: canonical(peer.ip()),
        peer: None,
        destination: dst,
    };
    match inbound_http::admission(&ctx, &state, &facts) {
        Admission::Refuse { reason, .. } => refuse(stream, info, reason, &ctx),
        Admission::Allow { .. } => relay_until_revoked(stream, facts, info, &ctx).await,
        Admission::Http { .. } => {
            // Each request is judged (plaintext under PERMISSIVE: no peer identity).
            info.upstream = Some(dst);
            let conn = ctx.connections.open(info);
            let end = inbound_http::serve(stream, facts, ctx.clone(), Security::None).await;
            conn.close(end);
        }
    }
}

/// Connects to `dst` inside the pod and relays, for as long as this node's state
/// admits plaintext there: when the port's mTLS mode turns STRICT (or a policy stops
/// allowing plaintext), the connection is closed at once, counted
/// (`strict_mtls_revoked` / `policy_revoked`) and logged.
async fn relay_until_revoked(
    client: TcpStream,
    facts: ConnectionFacts,
    mut info: ConnectionInfo,
    ctx: &PodContext,
) {
    let dst = facts.destination;
    info.upstream = Some(dst);
    let src = info.src;
    let conn = ctx.connections.open(info);
    // Into the pod: the agent's connect settings (a DestinationRule is the client side's).
    let upstream = match connect_in_pod(ctx, dst, &Default::default()).await {
        Ok(s) => s,
        Err(end) => {
            reset(client);
            conn.close(end);
            return;
        }
    };
    let relay = relay(client, upstream, ctx.idle_timeout, conn.counters());
    let revoked = authz::revoked(ctx.state.clone(), ctx.pod.clone(), facts);
    let end = tokio::select! {
        end = relay => end.into(),
        why = revoked => {
            ctx.metrics.refused.with_label_values(&[why.counted_as()]).inc();
            crate::warn_limited!(pod = %ctx.pod, %src, %dst, policy = why.policy.as_deref().unwrap_or(""), reason = %why.detail, "plaintext connection closed: no longer admitted");
            ConnectionEnd::Revoked {
                policy: why.policy,
                detail: why.detail,
            }
        }
    };
    conn.close(end);
}

/// Without a CA (`--ca-addr`) there is no mTLS: the HBONE port (15008) stays open so
/// the mesh owns it, and connections to it are refused and counted.
pub(crate) async fn serve_hbone_placeholder(listener: TcpListener, ctx: Arc<PodContext>) {
    accept_loop(listener, ctx, |stream, peer, ctx| async move {
        ctx.metrics
            .refused
            .with_label_values(&["hbone_unsupported"])
            .inc();
        debug!(pod = %ctx.pod, src = %peer, "HBONE needs a CA (--ca-addr); refusing");
        reset(stream);
    })
    .await
}
