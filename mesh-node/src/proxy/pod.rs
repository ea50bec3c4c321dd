//! What the in-pod listeners share: the per-pod context, the accept loop, and the
//! connect-relay-record step that ends every proxied connection.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::HBONE_PORT;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::debug;

use mesh_common::ConnKey;

use crate::{
    capture::dataplane::Dataplane, capture::sockets::set_keepalive, capture::sockets::PodSockets,
    discovery::cluster::ip_key, discovery::cluster::ClusterState,
    discovery::connection_pool::PoolLimits, hbone::client::HboneClient, hbone::client::HboneError,
    hbone::stream::relay_stream, hbone::stream::TcpSide, identity::certificates::CertificateStore,
    identity::certificates::IdentityLease, identity::spiffe::TrustBundle, identity::Identity,
    keys::PodKey, limits, limits::Listener, limits::PodBudget, limits::PodLimits, limits::Refusal,
    proxy::http::pool::UpstreamPool, proxy::inline_wake::Inline, relay::relay, relay::RelayEnd,
    routing::balancer::Balancer, routing::balancer::Outcome, routing::balancer::Pick,
    routing::http::routes::RouteCache, routing::splits::ClientSplits, routing::table::Router,
    telemetry::connections::ConnectionInfo, telemetry::connections::ConnectionTable,
    telemetry::connections::Security, telemetry::metrics::Metrics,
    telemetry::outcome::ConnectionEnd, telemetry::outcome::RefusalReason,
};

/// What mutual TLS needs, shared by every pod of the node (absent without a CA).
pub(crate) struct Mesh {
    pub certificates: Arc<CertificateStore>,
    pub hbone: HboneClient,
    pub trust: TrustBundle,
    pub trust_domain: String,
}

/// Everything a listener of one enrolled pod needs.
pub(crate) struct PodContext {
    pub pod: PodKey,
    pub identity: Identity,
    /// Keeps the identity's certificate while the pod's listeners or any connection
    /// they accepted live (None without a CA). Held for its `Drop`, never read.
    #[allow(dead_code)]
    pub identity_lease: Option<IdentityLease>,
    pub ips: Vec<IpAddr>,
    pub mesh: Option<Arc<Mesh>>,
    pub netns_cookie: u64,
    pub sockets: PodSockets,
    pub dataplane: Arc<Dataplane>,
    pub connections: Arc<ConnectionTable>,
    pub metrics: Arc<Metrics>,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub balancer: Arc<Balancer>,
    /// The node's connection pools (circuit breaking), shared by its pods.
    pub pools: Arc<crate::routing::pool::ConnectionPools>,
    /// This pod's weighted-split state: each client gets its weighted share (goes
    /// with the pod).
    pub splits: ClientSplits,
    /// The node's routing table of the current snapshot (the plan's input).
    pub router: Arc<Router>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Compiled HTTPRoutes, shared by the node's pods.
    pub http_routes: Arc<RouteCache>,
    /// This pod's kept-alive HTTP connections to backends.
    pub http_upstreams: Arc<UpstreamPool>,
    /// This pod's share of the node's proxying: connections (and HBONE streams) beyond
    /// it are refused.
    pub budget: PodBudget,
    pub limits: PodLimits,
    /// This pod's mirrored copies in flight (bounded).
    pub mirrors: crate::limits::mirror_slots::MirrorSlots,
    /// The node's request authenticator (RequestAuthentication, JWT).
    pub jwt: Arc<crate::identity::jwt::JwtAuthenticator>,
    /// The node's tracing.
    pub tracer: Arc<crate::telemetry::spans::Tracer>,
    /// The agent's drain: HTTP connections served for this pod close gracefully once
    /// it starts.
    pub drain: crate::limits::drain::Drain,
}

impl PodContext {
    /// The client's IP for a connection accepted from `peer`: the in-pod listeners see
    /// the application's loopback address, so it is the pod's own IP (of the family
    /// the application connected with) — what `consistentHash.useSourceIp` hashes.
    pub(crate) fn client_ip(&self, peer: SocketAddr, want_v6: bool) -> IpAddr {
        if !peer.ip().is_loopback() {
            return peer.ip();
        }
        self.ips
            .iter()
            .find(|ip| ip.is_ipv6() == want_v6)
            .or(self.ips.first())
            .copied()
            .unwrap_or(peer.ip())
    }
}

/// Accepts forever, one task per connection, each holding a slot of the pod's budget
/// for its listener (the listener's port says which: outbound, inbound or HBONE). A
/// connection beyond the budget is reset at once and counted as `pod_connection_limit`.
/// Errors such as EMFILE are counted and retried after a pause instead of ending the
/// listener.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, ctx: Arc<PodContext>, handler: F)
where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let which = listener
        .local_addr()
        .map_or(Listener::Inbound, |a| Listener::in_pod(a.port()));
    loop {
        let (stream, peer) = limits::accept(&listener, which, &ctx.metrics).await;
        let Some(slot) = ctx.budget.admit(which) else {
            refuse_over_budget(stream, peer, which, &ctx);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let task = handler(stream, peer, ctx.clone());
        tokio::spawn(Inline::new(async move {
            let _slot = slot;
            task.await
        }));
    }
}

/// The pod is at its bound for `which`: the connection is reset (the application sees
/// a refused connection), counted, and its parked original destination dropped.
fn refuse_over_budget(stream: TcpStream, peer: SocketAddr, which: Listener, ctx: &PodContext) {
    if which == Listener::Outbound {
        forget_original_destination(ctx, peer);
    }
    let reason = Refusal::PodConnectionLimit;
    ctx.metrics
        .refused
        .with_label_values(&[reason.name()])
        .inc();
    limits::count_refusal(&ctx.metrics, which, reason);
    debug!(pod = %ctx.pod, src = %peer, listener = which.name(), limit = ctx.limits.max_connections, "connection refused: the pod is at its connection bound");
    reset(stream);
}

/// Records a connection the proxy refuses, and resets it.
pub(crate) fn refuse(
    client: TcpStream,
    info: ConnectionInfo,
    reason: RefusalReason,
    ctx: &PodContext,
) {
    ctx.metrics
        .refused
        .with_label_values(&[reason.name()])
        .inc();
    crate::warn_limited!(pod = %info.pod, src = %info.src, dst = %info.original_dst, reason = reason.name(), "connection refused");
    reset(client);
    ctx.connections
        .open(info)
        .close(ConnectionEnd::Refused(reason));
}

/// What a failed tunnel says about the endpoint, for the balancer: None when the
/// failure is this node's own (no certificate yet, TLS setup).
pub(crate) fn hbone_outcome(e: &HboneError) -> Option<Outcome> {
    match e {
        HboneError::NoCertificate(_) | HboneError::Setup(_) => None,
        HboneError::Refused { status: 403, .. } => Some(Outcome::Denied),
        HboneError::Connect { .. }
        | HboneError::Handshake { .. }
        | HboneError::H2 { .. }
        | HboneError::Refused { .. } => Some(Outcome::ConnectFailed),
    }
}

/// Reports how an established connection ended: an error is a reset.
fn report_end(pick: Option<&Pick>, end: &RelayEnd) {
    if let (Some(pick), RelayEnd::Error(_)) = (pick, end) {
        pick.report(Outcome::Reset);
    }
}

/// Tunnels to `target` through the HBONE port of the meshed pod at `target.ip()`,
/// as this pod's identity, expecting `destination`. `pick`, the balancer's choice of
/// `target`, learns the outcome and is held while the connection lives. A new HBONE
/// connection is made with `limits`' connect timeout and keepalive.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward_hbone(
    client: TcpStream,
    target: SocketAddr,
    destination: &Identity,
    mut info: ConnectionInfo,
    ctx: &PodContext,
    mesh: &Mesh,
    pick: Option<Pick>,
    limits: &PoolLimits,
) {
    info.upstream = Some(target);
    info.security = Security::MutualTls;
    info.source_identity = Some(ctx.identity.to_string());
    info.destination_identity = Some(destination.to_string());
    let conn = ctx.connections.open(info);
    let hbone_addr = SocketAddr::new(target.ip(), HBONE_PORT);
    let started = Instant::now();
    let crate::hbone::client::Tunnel { send, recv, .. } = match mesh
        .hbone
        .open(
            &ctx.sockets,
            &ctx.identity,
            destination,
            hbone_addr,
            target,
            limits,
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            if let (Some(pick), Some(outcome)) = (&pick, hbone_outcome(&e)) {
                pick.report(outcome);
            }
            ctx.metrics
                .refused
                .with_label_values(&["hbone_failed"])
                .inc();
            crate::warn_limited!(pod = %ctx.pod, %target, error = %e, "HBONE tunnel failed");
            reset(client);
            conn.close(ConnectionEnd::HboneFailed(e.to_string()));
            return;
        }
    };
    if let Some(pick) = &pick {
        pick.report(Outcome::Connected {
            latency: started.elapsed(),
        });
    }
    let end = relay_stream(
        client,
        send,
        recv,
        TcpSide::Client,
        ctx.idle_timeout,
        conn.counters(),
    )
    .await;
    report_end(pick.as_ref(), &end);
    conn.close(end.into());
}

/// Connects to `target` from inside the pod, with `limits`' connect timeout (None: the
/// agent's) and keepalive; a failure is counted and returned as the connection's end.
pub(crate) async fn connect_in_pod(
    ctx: &PodContext,
    target: SocketAddr,
    limits: &PoolLimits,
) -> Result<TcpStream, ConnectionEnd> {
    let timeout = limits.connect_timeout.unwrap_or(ctx.connect_timeout);
    let tcp = ctx.sockets.connect(target, timeout).await.map_err(|e| {
        ctx.metrics
            .refused
            .with_label_values(&["connect_failed"])
            .inc();
        ConnectionEnd::ConnectFailed(e.to_string())
    })?;
    if let Some(k) = &limits.tcp_keepalive {
        set_keepalive(&tcp, k);
    }
    Ok(tcp)
}

/// Connects to `dst` from inside the pod and relays, recording the connection. `pick`,
/// the balancer's choice of `dst` (None for a destination no balancer chose), learns
/// the outcome and is held while the connection lives. `limits`: the destination's
/// connect timeout and keepalive (a DestinationRule's; default: the agent's).
pub(crate) async fn forward(
    client: TcpStream,
    dst: SocketAddr,
    mut info: ConnectionInfo,
    ctx: &PodContext,
    pick: Option<Pick>,
    limits: &PoolLimits,
) {
    info.upstream = Some(dst);
    let conn = ctx.connections.open(info);
    let started = Instant::now();
    let upstream = match connect_in_pod(ctx, dst, limits).await {
        Ok(s) => s,
        Err(end) => {
            if let Some(pick) = &pick {
                pick.report(Outcome::ConnectFailed);
            }
            reset(client);
            conn.close(end);
            return;
        }
    };
    if let Some(pick) = &pick {
        pick.report(Outcome::Connected {
            latency: started.elapsed(),
        });
    }
    let end = relay(client, upstream, ctx.idle_timeout, conn.counters()).await;
    report_end(pick.as_ref(), &end);
    conn.close(end.into());
}

/// Closes with RST so the application sees a refused/reset connection, not a clean EOF.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Drops the parked original destination of a connection refused before it was
/// handled (the pod at its bound), so that refusals leave nothing behind in the map.
pub(crate) fn forget_original_destination(ctx: &PodContext, peer: SocketAddr) {
    let key = ConnKey {
        netns_cookie: ctx.netns_cookie,
        addr: ip_key(peer.ip()),
        port: peer.port(),
        _pad: [0; 3],
    };
    let _ = ctx.dataplane.take_orig_dst(&key);
}
