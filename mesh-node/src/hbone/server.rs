//! Inbound HBONE on a pod's 15008: terminate mTLS (client certificate required and
//! chained to the mesh root), check the client's SPIFFE ID is in our trust domain,
//! accept HTTP/2 CONNECT streams to this pod's own addresses, apply authorization
//! policy, and connect to the target port inside the pod.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use mesh_common::is_mesh_pod_port;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{
    client::{CONNECTION_WINDOW, STREAM_WINDOW},
    stream::{relay_stream, TcpSide},
    tls::spiffe_id,
};
use crate::{
    authz::{self, admit, Admission},
    connections::{ConnectionInfo, Direction, Security},
    forward::{accept_loop, connect_in_pod, PodContext},
    identity::Identity,
    state::canonical,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, ctx: Arc<PodContext>, acceptor: TlsAcceptor) {
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
    let tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(super::buffered(stream)))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return refuse_connection(&ctx, peer, "hbone_handshake_failed", &e.to_string())
            }
            Err(_) => return refuse_connection(&ctx, peer, "hbone_handshake_failed", "timed out"),
        };
    let identity = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(spiffe_id)
    {
        Some(Ok(id)) => id,
        Some(Err(e)) => return refuse_connection(&ctx, peer, "hbone_bad_identity", &e),
        None => {
            return refuse_connection(&ctx, peer, "hbone_bad_identity", "no client certificate")
        }
    };
    if identity.trust_domain != mesh.trust_domain {
        return refuse_connection(
            &ctx,
            peer,
            "hbone_wrong_trust_domain",
            &identity.to_string(),
        );
    }
    let mut h2 = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(tls)
        .await
    {
        Ok(c) => c,
        Err(e) => return refuse_connection(&ctx, peer, "hbone_h2_failed", &e.to_string()),
    };
    while let Some(next) = h2.accept().await {
        match next {
            Ok((request, respond)) => {
                tokio::spawn(tunnel(
                    request,
                    respond,
                    peer,
                    identity.clone(),
                    ctx.clone(),
                ));
            }
            Err(e) => {
                debug!(pod = %ctx.pod, src = %peer, error = %e, "HBONE connection ended");
                return;
            }
        }
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(resp) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(resp, true);
    }
}

async fn tunnel(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    identity: Identity,
    ctx: Arc<PodContext>,
) {
    if request.method() != Method::CONNECT {
        return reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let target = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .map(|t| SocketAddr::new(canonical(t.ip()), t.port()));
    let Some(target) = target else {
        ctx.metrics
            .refused
            .with_label_values(&["hbone_bad_authority"])
            .inc();
        return reply(&mut respond, StatusCode::BAD_REQUEST);
    };
    let info = ConnectionInfo {
        peer: ctx.state.borrow().pod_by_ip(peer.ip()).cloned(),
        upstream: Some(target),
        security: Security::MutualTls,
        source_identity: Some(identity.to_string()),
        destination_identity: Some(ctx.identity.to_string()),
        ..ConnectionInfo::new(Direction::Inbound, ctx.pod.clone(), peer, target)
    };
    // A tunnel ends at one of this pod's application ports: never at another address,
    // never at the mesh's own ports (a tunnel into 15008 would nest, into 15006 loop).
    let refusal = if !ctx.ips.contains(&target.ip()) {
        Some("hbone_target_not_local")
    } else if is_mesh_pod_port(target.port()) {
        Some("hbone_target_mesh_port")
    } else {
        None
    };
    if let Some(reason) = refusal {
        ctx.metrics.refused.with_label_values(&[reason]).inc();
        crate::warn_limited!(pod = %ctx.pod, %target, %identity, reason, "HBONE target refused");
        reply(&mut respond, StatusCode::FORBIDDEN);
        ctx.connections
            .open(info)
            .close(format!("refused: {reason}"));
        return;
    }
    let admission = admit(
        &ctx.state.borrow(),
        &ctx.pod,
        target.port(),
        Some(&identity),
    );
    if let Admission::Refuse {
        reason: code,
        policy,
        detail: reason,
    } = admission
    {
        ctx.metrics.refused.with_label_values(&[code]).inc();
        crate::warn_limited!(pod = %ctx.pod, %target, %identity, policy = policy.as_deref().unwrap_or(""), %reason, "denied by authorization policy");
        reply(&mut respond, StatusCode::FORBIDDEN);
        ctx.connections
            .open(info)
            .close(format!("denied: {}", policy.unwrap_or(reason)));
        return;
    }
    let conn = ctx.connections.open(info);
    let upstream = match connect_in_pod(&ctx, target).await {
        Ok(s) => s,
        Err(result) => {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            conn.close(result);
            return;
        }
    };
    let Ok(ok) = Response::builder().status(StatusCode::OK).body(()) else {
        return;
    };
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => return conn.close(format!("error: {e}")),
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
    let revoked = authz::revoked(
        ctx.state.clone(),
        ctx.pod.clone(),
        target.port(),
        identity.clone(),
    );
    let end = tokio::select! {
        end = relay => end.describe(),
        why = revoked => {
            ctx.metrics.refused.with_label_values(&["policy_revoked"]).inc();
            crate::warn_limited!(pod = %ctx.pod, %target, %identity, policy = why.policy.as_deref().unwrap_or(""), reason = %why.detail, "tunnel closed: the authorization policy no longer allows it");
            format!("revoked: {}", why.policy.unwrap_or(why.detail))
        }
    };
    conn.close(end);
}
