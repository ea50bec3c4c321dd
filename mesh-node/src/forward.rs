//! What the in-pod listeners share: the per-pod context, the accept loop, and the
//! connect-relay-record step that ends every proxied connection.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use crate::{
    balancer::Balancer,
    connections::{ConnectionInfo, ConnectionTable},
    dataplane::Dataplane,
    metrics::Metrics,
    relay::{relay, RelayEnd},
    sockets::PodSockets,
    state::resolve::IpCidr,
    state::{ClusterState, PodKey},
};

/// Everything a listener of one enrolled pod needs.
pub struct PodContext {
    pub pod: PodKey,
    pub netns_cookie: u64,
    pub sockets: PodSockets,
    pub dataplane: Arc<Dataplane>,
    pub connections: Arc<ConnectionTable>,
    pub metrics: Arc<Metrics>,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub balancer: Arc<Balancer>,
    pub service_cidrs: Arc<Vec<IpCidr>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Accepts forever, one task per connection. Errors such as EMFILE are logged and
/// retried after a pause instead of ending the listener.
pub async fn accept_loop<F, Fut>(listener: TcpListener, ctx: Arc<PodContext>, handler: F)
where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handler(stream, peer, ctx.clone()));
            }
            Err(e) => {
                warn!(pod = %ctx.pod, error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Records a connection the proxy refuses, and resets it.
pub fn refuse(client: TcpStream, info: ConnectionInfo, reason: &'static str, ctx: &PodContext) {
    ctx.metrics.refused.with_label_values(&[reason]).inc();
    warn!(pod = %info.pod, src = %info.src, dst = %info.original_dst, reason, "connection refused");
    reset(client);
    ctx.connections
        .open(info)
        .close(format!("refused: {reason}"));
}

/// Connects to `dst` from inside the pod and relays, recording the connection.
pub async fn forward(
    client: TcpStream,
    dst: SocketAddr,
    mut info: ConnectionInfo,
    ctx: &PodContext,
) {
    info.upstream = Some(dst);
    let conn = ctx.connections.open(info);
    let upstream = match ctx.sockets.connect(dst, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics
                .refused
                .with_label_values(&["connect_failed"])
                .inc();
            reset(client);
            conn.close(format!("connect_failed: {e}"));
            return;
        }
    };
    let end = relay(client, upstream, ctx.idle_timeout, conn.counters()).await;
    conn.close(match end {
        RelayEnd::Completed => "completed".to_string(),
        RelayEnd::IdleTimeout => "idle_timeout".to_string(),
        RelayEnd::Error(e) => format!("error: {e}"),
    });
}

/// Closes with RST so the application sees a refused/reset connection, not a clean EOF.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
