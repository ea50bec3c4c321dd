//! Sockets that live in a pod's network namespace: the in-pod listeners, and upstream
//! connections that leave from the pod (so the pod IP is their source). Each socket is
//! created inside the namespace and then used from any thread.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{capture::netns::Netns, discovery::connection_pool::Keepalive};

/// SO_NETNS_COOKIE (Linux >= 5.14): the cookie bpf_get_netns_cookie() returns.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("connect to {dst} timed out after {timeout:?}")]
    Timeout { dst: SocketAddr, timeout: Duration },
    #[error("connect to {dst}: {source}")]
    Io { dst: SocketAddr, source: io::Error },
}

/// Creates sockets inside one pod's namespace.
#[derive(Clone)]
pub struct PodSockets {
    netns: Arc<Netns>,
    home: Arc<Netns>,
    mark: u32,
}

fn in_netns<T>(netns: &Netns, home: &Netns, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    netns.run(home, f).map_err(io::Error::other)?
}

impl PodSockets {
    pub fn new(netns: Arc<Netns>, home: Arc<Netns>, mark: u32) -> PodSockets {
        PodSockets { netns, home, mark }
    }

    /// A listener bound inside the pod (IPv6 listeners are IPv6-only, so the IPv4 and
    /// IPv6 listeners of a port can coexist and feed the family-matching sk_lookup).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = in_netns(&self.netns, &self.home, || {
            Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        })?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        // The agent restarting must be able to rebind while old connections linger.
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    /// Connects from inside the pod. The socket carries the agent's mark so the
    /// connect hooks leave it alone.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, ConnectError> {
        let io_err = |source| ConnectError::Io { dst, source };
        let socket = in_netns(&self.netns, &self.home, || {
            Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
        })
        .map_err(io_err)?;
        socket.set_mark(self.mark).map_err(io_err)?;
        socket.set_nonblocking(true).map_err(io_err)?;
        socket.set_tcp_nodelay(true).map_err(io_err)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(ConnectError::Io { dst, source }),
            Err(_) => Err(ConnectError::Timeout { dst, timeout }),
        }
    }

    /// The namespace cookie the eBPF programs see for this pod.
    pub fn netns_cookie(&self) -> io::Result<u64> {
        let socket = in_netns(&self.netns, &self.home, || {
            Socket::new(Domain::IPV4, Type::DGRAM, None)
        })?;
        netns_cookie_of(socket.as_raw_fd())
    }
}

/// SO_KEEPALIVE on an upstream socket (a DestinationRule's `tcp.tcpKeepalive`; parts
/// left out keep the kernel's defaults). A failure only loses the probes, so it is
/// logged, not fatal.
pub(crate) fn set_keepalive(tcp: &TcpStream, k: &Keepalive) {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time_secs {
        ka = ka.with_time(Duration::from_secs(t));
    }
    if let Some(i) = k.interval_secs {
        ka = ka.with_interval(Duration::from_secs(i));
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "setting TCP keepalive on an upstream socket failed");
    }
}

pub(crate) fn netns_cookie_of(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len point to valid storage of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("SO_NETNS_COOKIE needs Linux >= 5.14: {e}"),
        ));
    }
    Ok(cookie)
}
