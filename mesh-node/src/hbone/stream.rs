//! Relays bytes between a TCP connection and one HTTP/2 CONNECT stream, honouring h2
//! flow control both ways. End of stream and TCP half-close map onto each other.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::AsyncWriteExt,
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

use crate::{
    relay::RelayEnd, telemetry::connections::ByteCounters, telemetry::outcome::StreamError,
};

/// The most read from the TCP side at once. A buffer is taken only once the socket is
/// readable and handed to h2 as it is (no copy): an idle connection holds none.
const CHUNK: usize = 64 * 1024;

/// A failure of the HTTP/2 stream or its connection, as h2 describes it.
fn tunnel(e: h2::Error) -> StreamError {
    StreamError::Tunnel(e.to_string())
}

async fn tcp_to_stream(
    tcp: OwnedReadHalf,
    mut send: SendStream<Bytes>,
    count: &AtomicU64,
    activity: &AtomicU64,
    epoch: Instant,
) -> Result<(), StreamError> {
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = match tcp.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(tunnel)?;
            return Ok(());
        }
        let mut data = buf.freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or(StreamError::TunnelClosed)?
                .map_err(tunnel)?;
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false).map_err(tunnel)?;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn stream_to_tcp(
    mut recv: RecvStream,
    mut tcp: OwnedWriteHalf,
    count: &AtomicU64,
    activity: &AtomicU64,
    epoch: Instant,
) -> Result<(), StreamError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(tunnel)?;
        let n = chunk.len();
        tcp.write_all(&chunk).await?;
        let _ = recv.flow_control().release_capacity(n);
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    Ok(tcp.shutdown().await?)
}

/// Which way is "to the server" for the byte counters.
#[derive(Clone, Copy)]
pub(crate) enum TcpSide {
    /// The TCP side is the client (outbound: app → tunnel).
    Client,
    /// The TCP side is the server (inbound: tunnel → app).
    Server,
}

pub(crate) async fn relay_stream(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    side: TcpSide,
    idle: Duration,
    counters: &ByteCounters,
) -> RelayEnd {
    let epoch = Instant::now();
    let (tcp_read, tcp_write) = tcp.into_split();
    let (into_tunnel, out_of_tunnel) = match side {
        TcpSide::Client => (&counters.to_server, &counters.to_client),
        TcpSide::Server => (&counters.to_client, &counters.to_server),
    };
    let activity = counters.activity();
    let up = tcp_to_stream(tcp_read, send, into_tunnel, activity, epoch);
    let down = stream_to_tcp(recv, tcp_write, out_of_tunnel, activity, epoch);
    let both = async { tokio::try_join!(up, down) };
    tokio::select! {
        r = both => match r {
            Ok(_) => RelayEnd::Completed,
            Err(e) => RelayEnd::Error(e),
        },
        _ = crate::relay::idle_watchdog(counters, idle, epoch) => RelayEnd::IdleTimeout,
    }
}
