//! An HTTP/2 client that behaves as a well-made one does across a server's graceful
//! shutdown: paced requests on one connection; a GOAWAY retires that connection (no
//! request fails because of it), and a request the server had not taken (its stream
//! above the GOAWAY's last stream id, or refused) is sent again on a new connection.
//! The report says how many GOAWAYs came and when.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct H2ClientOptions {
    pub connect: SocketAddr,
    /// The `:authority`.
    pub host: String,
    pub path: String,
    /// How long to keep sending.
    pub duration: Duration,
    /// Pause between one answer and the next request.
    pub interval: Duration,
    /// Per request.
    pub timeout: Duration,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct H2Report {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed or were answered otherwise.
    pub failed: u64,
    pub first_error: Option<String>,
    /// Connections opened.
    pub connections: u64,
    /// Connections retired by a GOAWAY from the server.
    pub goaways: u64,
    /// When each GOAWAY was seen, in ms from the start.
    pub goaway_at_ms: Vec<u64>,
    /// Requests the server had not taken when it went away, sent again.
    pub resent: u64,
}

/// How one request ended.
enum Outcome {
    Answered(u16),
    /// The connection went away before the request was taken (`sent`: after it was
    /// sent): send it again.
    NotTaken {
        sent: bool,
    },
    Failed(String),
}

fn not_taken(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

async fn connect(opts: &H2ClientOptions) -> Result<SendRequest<Bytes>, String> {
    let tcp = tokio::time::timeout(opts.timeout, TcpStream::connect(opts.connect))
        .await
        .map_err(|_| format!("connect {}: timed out", opts.connect))?
        .map_err(|e| format!("connect {}: {e}", opts.connect))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = h2::client::handshake(tcp)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn request(sender: &mut SendRequest<Bytes>, opts: &H2ClientOptions) -> Outcome {
    let ready = match sender.clone().ready().await {
        Ok(s) => s,
        Err(e) if not_taken(&e) => return Outcome::NotTaken { sent: false },
        Err(e) => return Outcome::Failed(format!("connection: {e}")),
    };
    *sender = ready;
    let uri = format!("http://{}{}", opts.host, opts.path);
    let Ok(req) = http::Request::get(uri).body(()) else {
        return Outcome::Failed("bad request".into());
    };
    let response = match sender.send_request(req, true) {
        Ok((response, _)) => response,
        Err(e) if not_taken(&e) => return Outcome::NotTaken { sent: false },
        Err(e) => return Outcome::Failed(format!("send: {e}")),
    };
    let answer = async {
        let response = response.await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        Ok::<u16, h2::Error>(status)
    };
    match tokio::time::timeout(opts.timeout, answer).await {
        Ok(Ok(status)) => Outcome::Answered(status),
        Ok(Err(e)) if not_taken(&e) => Outcome::NotTaken { sent: true },
        Ok(Err(e)) => Outcome::Failed(format!("response: {e}")),
        Err(_) => Outcome::Failed("timed out".into()),
    }
}

pub fn run(opts: H2ClientOptions) -> H2Report {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return H2Report {
                failed: 1,
                first_error: Some(format!("tokio runtime: {e}")),
                ..H2Report::default()
            }
        }
    };
    runtime.block_on(async move {
        let started = Instant::now();
        let mut report = H2Report::default();
        let mut sender: Option<SendRequest<Bytes>> = None;
        while started.elapsed() < opts.duration {
            // One request, sent again (at most 3 times) while the server goes away
            // before taking it.
            for _attempt in 0..3 {
                let s = match sender.as_mut() {
                    Some(s) => s,
                    None => match connect(&opts).await {
                        Ok(s) => {
                            report.connections += 1;
                            sender.insert(s)
                        }
                        Err(e) => {
                            report.failed += 1;
                            report.first_error.get_or_insert(e);
                            break;
                        }
                    },
                };
                match request(s, &opts).await {
                    Outcome::Answered(200) => {
                        report.ok += 1;
                        break;
                    }
                    Outcome::Answered(status) => {
                        report.failed += 1;
                        report.first_error.get_or_insert(format!("status {status}"));
                        break;
                    }
                    Outcome::NotTaken { sent } => {
                        report.goaways += 1;
                        report
                            .goaway_at_ms
                            .push(started.elapsed().as_millis() as u64);
                        report.resent += u64::from(sent);
                        sender = None;
                    }
                    Outcome::Failed(e) => {
                        report.failed += 1;
                        report.first_error.get_or_insert(e);
                        sender = None;
                        break;
                    }
                }
            }
            tokio::time::sleep(opts.interval).await;
        }
        report
    })
}
