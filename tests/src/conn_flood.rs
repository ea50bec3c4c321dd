//! Many connections at once, held open: the hostile tests' idle floods, slowloris and
//! connection-bound attacks. The test app runs it inside a pod (`mesh-testapp flood`),
//! so an enrolled pod's connections go through its cgroup's redirection like any
//! application's.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use clap::ValueEnum;

use crate::report::FloodReport;

/// What each connection of a flood does once open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FloodMode {
    /// Nothing at all.
    Idle,
    /// One `ping` echoed (through an echo server), then nothing.
    Echo,
    /// An HTTP/1.1 request head that never ends, one byte per interval.
    Slowloris,
    /// A TLS 1.3 ClientHello, then nothing.
    TlsHello,
}

/// Opening stops after this long (an exhausted server stops accepting: each connect
/// then waits for its timeout).
const OPEN_DEADLINE: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The slowloris request: a valid start, then a header value that never ends.
const SLOW_HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ";

/// A TLS 1.3 ClientHello (x25519, TLS_AES_128_GCM_SHA256, ECDSA/RSA-PSS signatures)
/// that a server answers and then waits on.
pub fn client_hello() -> Vec<u8> {
    let mut ext = Vec::new();
    let mut push_ext = |id: u16, body: &[u8]| {
        ext.extend_from_slice(&id.to_be_bytes());
        ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ext.extend_from_slice(body);
    };
    push_ext(0x002b, &[0x02, 0x03, 0x04]); // supported_versions: TLS 1.3
    push_ext(0x000a, &[0x00, 0x02, 0x00, 0x1d]); // supported_groups: x25519
    push_ext(0x000d, &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x08, 0x07]); // signature_algorithms
    let mut share = vec![0x00, 0x24, 0x00, 0x1d, 0x00, 0x20];
    share.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(9)));
    push_ext(0x0033, &share); // key_share: x25519
    let mut hello = vec![0x03, 0x03];
    hello.extend((0..32u8).map(|i| i.wrapping_mul(13).wrapping_add(1))); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

struct Conn {
    stream: TcpStream,
    opened: Instant,
    /// Bytes of the slowloris head sent so far.
    sent: usize,
    closed: Option<Duration>,
}

/// The open connections of one flood.
pub struct Flood {
    mode: FloodMode,
    conns: Vec<Conn>,
    report: FloodReport,
    started: Instant,
}

impl Flood {
    /// Opens `count` connections to `addr` one after another, each doing what `mode`
    /// says first; failures are counted, not fatal. Gives up opening after 15 s.
    pub fn open(addr: SocketAddr, count: usize, mode: FloodMode) -> Flood {
        let started = Instant::now();
        let mut flood = Flood {
            mode,
            conns: Vec::with_capacity(count),
            report: FloodReport::default(),
            started,
        };
        let hello = client_hello();
        let mut next_poll = Instant::now();
        for _ in 0..count {
            // Closes are noticed while opening too, so their times are right.
            if Instant::now() >= next_poll {
                flood.poll();
                next_poll = Instant::now() + Duration::from_millis(500);
            }
            if started.elapsed() > OPEN_DEADLINE {
                flood
                    .report
                    .first_error
                    .get_or_insert("gave up opening after 15 s".into());
                break;
            }
            let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    flood.report.connect_failed += 1;
                    flood
                        .report
                        .first_error
                        .get_or_insert(format!("connect: {e}"));
                    continue;
                }
            };
            let first: Result<(), String> = match mode {
                FloodMode::Idle | FloodMode::Slowloris => Ok(()),
                FloodMode::TlsHello => stream.write_all(&hello).map_err(|e| e.to_string()),
                FloodMode::Echo => echo_once(&mut stream),
            };
            match first {
                Ok(()) if mode == FloodMode::Echo => flood.report.echo_ok += 1,
                Ok(()) => {}
                Err(e) => {
                    flood.report.echo_failed += 1;
                    flood.report.first_error.get_or_insert(e);
                    continue;
                }
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            flood.report.opened += 1;
            flood.conns.push(Conn {
                stream,
                opened: Instant::now(),
                sent: 0,
                closed: None,
            });
        }
        flood.report.open_ms = started.elapsed().as_millis() as u64;
        flood.poll();
        flood
    }

    /// Notes which connections the peer closed (EOF or reset). Bytes the peer sends
    /// (a TLS ServerHello, an HTTP error) are read and dropped.
    pub fn poll(&mut self) {
        let mut buf = [0u8; 4096];
        for c in self.conns.iter_mut().filter(|c| c.closed.is_none()) {
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => c.closed = Some(c.opened.elapsed()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => c.closed = Some(c.opened.elapsed()),
                }
                break;
            }
        }
    }

    /// Slowloris: one more byte of the endless request head on every open connection.
    pub fn trickle(&mut self) {
        if self.mode != FloodMode::Slowloris {
            return;
        }
        for c in self.conns.iter_mut().filter(|c| c.closed.is_none()) {
            let byte = SLOW_HEAD.get(c.sent).copied().unwrap_or(b'a');
            match c.stream.write(&[byte]) {
                Ok(_) => c.sent += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => c.closed = Some(c.opened.elapsed()),
            }
        }
    }

    pub fn open_count(&self) -> usize {
        self.conns.iter().filter(|c| c.closed.is_none()).count()
    }

    /// Holds the connections for up to `hold` (or until the peer closed them all),
    /// trickling every `interval`, and polling for closes every 100 ms.
    pub fn hold(&mut self, hold: Duration, interval: Duration) {
        let until = Instant::now() + hold;
        let mut next_trickle = Instant::now();
        while Instant::now() < until && self.open_count() > 0 {
            if Instant::now() >= next_trickle {
                self.trickle();
                next_trickle += interval;
            }
            self.poll();
            std::thread::sleep(Duration::from_millis(100));
        }
        self.poll();
    }

    pub fn report(&self) -> FloodReport {
        let mut r = self.report.clone();
        let closed: Vec<u64> = self
            .conns
            .iter()
            .filter_map(|c| c.closed.map(|d| d.as_millis() as u64))
            .collect();
        r.closed_by_peer = closed.len() as u64;
        r.still_open = self.open_count() as u64;
        r.closed_after_ms_min = closed.iter().min().copied();
        r.closed_after_ms_max = closed.iter().max().copied();
        r.elapsed_ms = self.started.elapsed().as_millis() as u64;
        r
    }
}

fn echo_once(stream: &mut TcpStream) -> Result<(), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"ping")
        .map_err(|e| format!("send: {e}"))?;
    let mut back = [0u8; 4];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("echo: {e}"))?;
    if &back != b"ping" {
        return Err(format!("echo differs: {back:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::client_hello;

    #[test]
    fn the_client_hello_is_one_well_formed_record() {
        let r = client_hello();
        assert_eq!(r[0], 0x16);
        let len = u16::from_be_bytes([r[3], r[4]]) as usize;
        assert_eq!(r.len(), 5 + len);
        let body = u32::from_be_bytes([0, r[6], r[7], r[8]]) as usize;
        assert_eq!(len, 4 + body);
    }
}
