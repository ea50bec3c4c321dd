//! Copies bytes both ways between two TCP streams: half-close is passed on (EOF one way
//! becomes a FIN the same way while the other keeps flowing), backpressure comes from
//! awaiting each write, and a connection idle in both directions is closed.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

use crate::telemetry::{connections::ByteCounters, outcome::ConnectionEnd, outcome::StreamError};

const BUFFER: usize = 64 * 1024;

/// Completes once nothing has moved for `idle` (activity measured from `epoch`).
pub(crate) async fn idle_watchdog(counters: &ByteCounters, idle: Duration, epoch: Instant) {
    loop {
        let last = Duration::from_millis(counters.activity().load(Ordering::Relaxed));
        let deadline = last + idle;
        let now = epoch.elapsed();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(deadline - now).await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions reached EOF.
    Completed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// A read or write failed (reset by either side, broken pipe, a tunnel error).
    Error(StreamError),
}

impl From<RelayEnd> for ConnectionEnd {
    fn from(end: RelayEnd) -> ConnectionEnd {
        match end {
            RelayEnd::Completed => ConnectionEnd::Completed,
            RelayEnd::IdleTimeout => ConnectionEnd::IdleTimeout,
            RelayEnd::Error(e) => ConnectionEnd::Broken(e),
        }
    }
}

/// Copies `from` to `to`. The buffer is taken when `from` becomes readable and given
/// back when it runs dry, so that an idle connection holds none (a node holds many).
async fn pump(
    from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    count: &AtomicU64,
    activity: &AtomicU64,
    epoch: Instant,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await?;
        if buf.capacity() == 0 {
            buf.reserve_exact(BUFFER);
        }
        let n = match from.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                buf = Vec::new();
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Pass the half-close on; the peer may still be sending the other way.
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        buf.clear();
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Relays until both sides are done, one fails, or nothing moves for `idle`.
pub(crate) async fn relay(
    client: TcpStream,
    server: TcpStream,
    idle: Duration,
    counters: &ByteCounters,
) -> RelayEnd {
    let epoch = Instant::now();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        &counters.to_server,
        counters.activity(),
        epoch,
    );
    let down = pump(
        server_read,
        client_write,
        &counters.to_client,
        counters.activity(),
        epoch,
    );
    let both = async { tokio::try_join!(up, down) };
    tokio::select! {
        r = both => match r {
            Ok(_) => RelayEnd::Completed,
            Err(e) => RelayEnd::Error(e.into()),
        },
        _ = idle_watchdog(counters, idle, epoch) => RelayEnd::IdleTimeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// A connected pair of streams over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_server, mut backend) = pair().await;
        let counters = std::sync::Arc::new(ByteCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            relay(proxy_client, proxy_server, Duration::from_secs(5), &c).await
        });
        let request = vec![7u8; 300_000];
        app.write_all(&request).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "request arrives whole and then EOF");
        // The other direction still works after the client half-closed.
        backend.write_all(b"response").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"response");
        assert_eq!(task.await.unwrap(), RelayEnd::Completed);
        assert_eq!(counters.to_server.load(Ordering::Relaxed), 300_000);
        assert_eq!(counters.to_client.load(Ordering::Relaxed), 8);
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (_app, proxy_client) = pair().await;
        let (proxy_server, _backend) = pair().await;
        let counters = ByteCounters::default();
        let started = Instant::now();
        let end = relay(
            proxy_client,
            proxy_server,
            Duration::from_millis(200),
            &counters,
        )
        .await;
        assert_eq!(end, RelayEnd::IdleTimeout);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
