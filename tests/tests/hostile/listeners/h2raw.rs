//! A raw HTTP/2 client over the mesh's mTLS, to send what a well-behaved client
//! library would not: an oversized header block, more streams than the server allows.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{pki_types::ServerName, ClientConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{timeout_at, Instant},
};
use tokio_rustls::{client::TlsStream, TlsConnector};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// The largest frame a peer must accept before SETTINGS say otherwise.
const MAX_FRAME: usize = 16_384;

/// What became of the streams a client opened.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Answered `200`: the tunnel is open.
    pub opened: Vec<u32>,
    /// Answered with another status (e.g. 431).
    pub status: BTreeMap<u32, u8>,
    /// Reset by the server, with its error code (7: REFUSED_STREAM).
    pub reset: BTreeMap<u32, u32>,
    /// The server ended the connection (GOAWAY, its error code).
    pub goaway: Option<u32>,
    /// The connection closed or failed.
    pub closed: bool,
}

impl Outcomes {
    pub fn decided(&self) -> usize {
        self.opened.len() + self.status.len() + self.reset.len()
    }
}

pub struct RawH2 {
    tls: TlsStream<TcpStream>,
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// `CONNECT <authority>` as literal fields (no Huffman, no indexing), plus an
/// `x-pad` header of `pad` bytes when asked.
fn connect_block(authority: &str, pad: usize) -> Vec<u8> {
    let mut block = Vec::with_capacity(64 + pad);
    hpack_int(&mut block, 0, 4, 2); // :method (static index 2)
    hpack_string(&mut block, b"CONNECT");
    hpack_int(&mut block, 0, 4, 1); // :authority (static index 1)
    hpack_string(&mut block, authority.as_bytes());
    if pad > 0 {
        block.push(0);
        hpack_string(&mut block, b"x-pad");
        hpack_int(&mut block, 0, 7, pad);
        block.resize(block.len() + pad, b'a');
    }
    block
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl RawH2 {
    /// TLS (the config carries the client certificate and expected server identity)
    /// and the client preface with empty SETTINGS.
    pub async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<RawH2, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        tls.write_all(&hello)
            .await
            .map_err(|e| format!("preface: {e}"))?;
        Ok(RawH2 { tls })
    }

    /// Opens stream `id` with a CONNECT to `authority` (the stream stays open), its
    /// header block padded to about `pad` bytes, split into HEADERS and CONTINUATION.
    pub async fn send_connect(
        &mut self,
        id: u32,
        authority: &str,
        pad: usize,
    ) -> Result<(), String> {
        let block = connect_block(authority, pad);
        let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
        let last = chunks.len() - 1;
        let mut out = Vec::with_capacity(block.len() + 9 * chunks.len());
        for (i, chunk) in chunks.into_iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if i == last { END_HEADERS } else { 0 };
            out.extend(frame(kind, flags, id, chunk));
        }
        self.tls
            .write_all(&out)
            .await
            .map_err(|e| format!("sending stream {id}: {e}"))?;
        self.tls.flush().await.map_err(|e| e.to_string())
    }

    async fn read_frame(&mut self, until: Instant) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        timeout_at(until, self.tls.read_exact(&mut head))
            .await
            .ok()?
            .ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        timeout_at(until, self.tls.read_exact(&mut payload))
            .await
            .ok()?
            .ok()?;
        Some((head[3], head[4], stream, payload))
    }

    /// Reads what the server says until `streams` streams have an outcome, the
    /// connection ends, or `wait` passes.
    pub async fn outcomes(&mut self, streams: usize, wait: Duration) -> Outcomes {
        let until = Instant::now() + wait;
        let mut out = Outcomes::default();
        while out.decided() < streams {
            let Some((kind, flags, stream, payload)) = self.read_frame(until).await else {
                out.closed = Instant::now() < until;
                break;
            };
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let _ = self.tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if flags & ACK == 0 => {
                    let _ = self.tls.write_all(&frame(PING, ACK, 0, &payload)).await;
                }
                // An indexed `:status: 200` (static index 8) opens the tunnel.
                HEADERS if payload.first() == Some(&0x88) => out.opened.push(stream),
                HEADERS => {
                    out.status
                        .insert(stream, payload.first().copied().unwrap_or(0));
                }
                RST_STREAM if payload.len() >= 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    out.reset.insert(stream, code);
                }
                GOAWAY if payload.len() >= 8 => {
                    out.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                DATA => {}
                _ => {}
            }
        }
        out
    }
}
