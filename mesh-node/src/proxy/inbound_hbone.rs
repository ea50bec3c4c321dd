//! The in-pod HBONE listener (15008): terminate mTLS (client certificate required and
//! chained to the mesh root), check the client's SPIFFE ID is in our trust domain,
//! accept HTTP/2 CONNECT streams to this pod's own addresses, apply authorization
//! policy, and connect to the target port inside the pod.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::{
    hbone, hbone::stream::relay_stream, hbone::stream::TcpSide, hbone::target::connect_target,
};
use crate::{
    identity::authz, identity::authz::Admission, identity::authz::ConnectionFacts,
    identity::Identity, limits, limits::Listener, limits::Refusal, limits::Stage,
    proxy::inbound_http, proxy::inline_wake::Inline, proxy::pod::accept_loop,
    proxy::pod::connect_in_pod, proxy::pod::PodContext, telemetry::connections::ConnectionInfo,
    telemetry::connections::Direction, telemetry::connections::Security,
    telemetry::outcome::ConnectionEnd, telemetry::outcome::StreamError,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<PodContext>, acceptor: TlsAcceptor) {
    accept_loop(listener, ctx, move |stream, peer, ctx| {
        let acceptor = acceptor.clone();
        async move { connection(stream, peer, ctx, acceptor).await }
    })
    .await
}

fn refuse_connection(ctx: &PodContext, peer: SocketAddr, reason: &'static str, detail: &str) {
    ctx.metrics.refused.with_label_values(&[reason]).inc();
    crate::warn_limited!(pod = %ctx.pod, src = %peer, reason, detail, "HBONE connection refused");
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<PodContext>,
    acceptor: TlsAcceptor,
) {
    let Some(mesh) = ctx.mesh.clone() else {
        return;
    };
    // A peer can arrive before this pod's first certificate: give the CA a moment
    // rather than failing the handshake for lack of a certificate to present.
    if mesh
        .certificates
        .wait(&ctx.identity, HANDSHAKE_TIMEOUT)
        .await
        .is_none()
    {
        return refuse_connection(&ctx, peer, "no_certificate", &ctx.identity.to_string());
    }
    // TLS and the HTTP/2 preface must both be done by the header timeout.
    let deadline = tokio::time::Instant::now() + ctx.limits.header_timeout;
    let handshake_timed_out = || {
        limits::count_timeout(&ctx.metrics, Listener::Hbone, Stage::Handshake);
        refuse_connection(&ctx, peer, "hbone_handshake_failed", "timed out")
    };
    let tls =
        match tokio::time::timeout_at(deadline, acceptor.accept(hbone::buffered(stream))).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return refuse_connection(&ctx, peer, "hbone_handshake_failed", &e.to_string())
            }
            Err(_) => return handshake_timed_out(),
        };
    let identity = match hbone::server::peer_identity(tls.get_ref().1) {
        Ok(id) => id,
        Err(e) => return refuse_connection(&ctx, peer, "hbone_bad_identity", &e),
    };
    if identity.trust_domain != mesh.trust_domain {
        return refuse_connection(
            &ctx,
            peer,
            "hbone_wrong_trust_domain",
            &identity.to_string(),
        );
    }
    let handshake = hbone::server::h2_settings(ctx.limits.max_streams()).handshake(tls);
    let mut h2 = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refuse_connection(&ctx, peer, "hbone_h2_failed", &e.to_string()),
        Err(_) => return handshake_timed_out(),
    };
    // Each stream holds a slot of the pod's inbound budget; `streams` counts the live
    // ones (its clones), so a connection without streams for the idle timeout closes.
    let streams = Arc::new(());
    let mut idle_since = tokio::time::Instant::now();
    let mut closing = false;
    loop {
        let idle_check = idle_since + ctx.idle_timeout;
        let next = tokio::select! {
            next = h2.accept() => next,
            _ = ctx.drain.started(), if !closing => {
                // GOAWAY: the peer opens new streams elsewhere; these finish.
                debug!(pod = %ctx.pod, src = %peer, "draining: HBONE connection told to go away");
                h2.graceful_shutdown();
                closing = true;
                continue;
            }
            _ = tokio::time::sleep_until(idle_check), if !closing => {
                if Arc::strong_count(&streams) == 1 {
                    limits::count_timeout(&ctx.metrics, Listener::Hbone, Stage::Idle);
                    debug!(pod = %ctx.pod, src = %peer, "HBONE connection idle; closing it");
                    h2.graceful_shutdown();
                    closing = true;
                } else {
                    idle_since = tokio::time::Instant::now();
                }
                continue;
            }
        };
        match next {
            Some(Ok((request, mut respond))) => {
                idle_since = tokio::time::Instant::now();
                let Some(slot) = ctx.budget.admit_stream() else {
                    let reason = Refusal::PodConnectionLimit;
                    ctx.metrics
                        .refused
                        .with_label_values(&[reason.name()])
                        .inc();
                    limits::count_refusal(&ctx.metrics, Listener::Hbone, reason);
                    debug!(pod = %ctx.pod, src = %peer, limit = ctx.limits.max_connections, "HBONE stream refused: the pod is at its connection bound");
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                };
                let live = streams.clone();
                let tunnel = tunnel(request, respond, peer, identity.clone(), ctx.clone());
                tokio::spawn(Inline::new(async move {
                    let _held = (slot, live);
                    tunnel.await
                }));
            }
            Some(Err(e)) => {
                debug!(pod = %ctx.pod, src = %peer, error = %e, "HBONE connection ended");
                return;
            }
            None => return,
        }
    }
}

async fn tunnel(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    identity: Identity,
    ctx: Arc<PodContext>,
) {
    let (known_peer, access_log) = {
        let state = ctx.state.borrow();
        (
            state.pod_by_ip(peer.ip()).cloned(),
            state.telemetry_for(&ctx.pod).logs(),
        )
    };
    let info = |target| ConnectionInfo {
        peer: known_peer.clone(),
        access_log,
        upstream: Some(target),
        security: Security::MutualTls,
        source_identity: Some(identity.to_string()),
        destination_identity: Some(ctx.identity.to_string()),
        ..ConnectionInfo::new(Direction::Inbound, ctx.pod.clone(), peer, target)
    };
    let target = match connect_target(&request, &ctx.ips) {
        Ok(target) => target,
        Err(refusal) => {
            ctx.metrics
                .refused
                .with_label_values(&[refusal.reason().name()])
                .inc();
            crate::warn_limited!(pod = %ctx.pod, src = %peer, %identity, reason = refusal.reason().name(), %refusal, "HBONE CONNECT refused");
            hbone::server::reply(&mut respond, refusal.status());
            if let Some(target) = refusal.target() {
                ctx.connections
                    .open(info(target))
                    .close(ConnectionEnd::Refused(refusal.reason()));
            }
            return;
        }
    };
    let info = info(target);
    let facts = ConnectionFacts {
        source_ip: peer.ip(),
        peer: Some(identity.clone()),
        destination: target,
    };
    let admission = inbound_http::admission(&ctx, &ctx.state.borrow(), &facts);
    if let Admission::Refuse {
        reason: code,
        policy,
        detail: reason,
    } = admission
    {
        ctx.metrics.refused.with_label_values(&[code.name()]).inc();
        crate::warn_limited!(pod = %ctx.pod, %target, %identity, policy = policy.as_deref().unwrap_or(""), %reason, "denied by authorization policy");
        hbone::server::reply(&mut respond, StatusCode::FORBIDDEN);
        ctx.connections.open(info).close(ConnectionEnd::Denied {
            policy,
            detail: reason,
        });
        return;
    }
    let conn = ctx.connections.open(info);
    if let Admission::Http { .. } = admission {
        // Each request is judged: the stream is served as HTTP, not relayed.
        let Ok(ok) = Response::builder().status(StatusCode::OK).body(()) else {
            return;
        };
        let send = match respond.send_response(ok, false) {
            Ok(s) => s,
            Err(e) => return conn.close(ConnectionEnd::Broken(StreamError::Tunnel(e.to_string()))),
        };
        let io = hbone::io::H2Io::new(send, request.into_body());
        let end = inbound_http::serve(io, facts, ctx.clone(), Security::MutualTls).await;
        return conn.close(end);
    }
    let upstream = match connect_in_pod(&ctx, target, &Default::default()).await {
        Ok(s) => s,
        Err(end) => {
            hbone::server::reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            conn.close(end);
            return;
        }
    };
    let Ok(ok) = Response::builder().status(StatusCode::OK).body(()) else {
        return;
    };
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => return conn.close(ConnectionEnd::Broken(StreamError::Tunnel(e.to_string()))),
    };
    let relay = relay_stream(
        upstream,
        send,
        request.into_body(),
        TcpSide::Server,
        ctx.idle_timeout,
        conn.counters(),
    );
    // This node's policy decides for as long as the tunnel lives, whatever the source
    // node knows: a policy that stops allowing it ends it (the stream is reset).
    let revoked = authz::revoked(ctx.state.clone(), ctx.pod.clone(), facts);
    let end = tokio::select! {
        end = relay => end.into(),
        why = revoked => {
            ctx.metrics.refused.with_label_values(&[why.counted_as()]).inc();
            crate::warn_limited!(pod = %ctx.pod, %target, %identity, policy = why.policy.as_deref().unwrap_or(""), reason = %why.detail, "tunnel closed: the authorization policy no longer allows it");
            ConnectionEnd::Revoked {
                policy: why.policy,
                detail: why.detail,
            }
        }
    };
    conn.close(end);
}
