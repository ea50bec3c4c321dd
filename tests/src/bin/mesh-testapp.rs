//! `mesh-testapp`: the real client and server programs the simulated cluster runs
//! inside pods. `serve` echoes; `transfer` sends random bytes and checks every byte
//! of the echo; `churn` opens many short connections.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use mesh_tests::{
    conn_flood::{Flood, FloodMode},
    flood::raise_nofile,
    h2_client, httpapp,
    report::{ChurnReport, FirstConnectReport, RttReport, TransferReport},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server; prints `ready` once every address is bound.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Send N pseudo-random bytes, half-close, and verify the echo.
    Transfer {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Fill the payload with this text repeated instead of random bytes.
        #[arg(long)]
        marker: Option<String>,
    },
    /// Keep one connection open for N seconds, exchanging a ping every interval.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Closed-loop request/response: COUNT round trips of SIZE bytes on one connection.
    Rtt {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: u64,
        #[arg(long, default_value_t = 5000)]
        count: u64,
    },
    /// Do nothing until killed: the pod's pause process, which the agent finds by cgroup.
    Pause,
    /// HTTP echo server (HTTP/1.1 and HTTP/2 prior knowledge); prints `ready`.
    HttpServe {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Reported in `x-served-by` and the JSON body.
        #[arg(long)]
        name: String,
        /// Answer every request with this status (a broken endpoint).
        #[arg(long)]
        status: Option<u16>,
        /// Wait this long before every answer (a slow endpoint).
        #[arg(long)]
        delay_ms: Option<u64>,
        /// Answer every request with this file's contents, read at each request
        /// (`application/json`; 404 while the file is missing): a static file server,
        /// such as an issuer's JWKS.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Serve every request by calling this address (passing `traceparent`,
        /// `tracestate` and `x-request-id` on), with `--forward-host` as its Host.
        #[arg(long, requires = "forward_host")]
        forward_to: Option<SocketAddr>,
        #[arg(long)]
        forward_host: Option<String>,
    },
    /// COUNT HTTP requests on one kept-alive connection; prints a summary.
    Http {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// Host header (HTTP/1.1) or :authority (HTTP/2).
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name: value`, repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// HTTP/2 prior knowledge instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Give each request `x-request-id: <prefix>-<n>`.
        #[arg(long)]
        request_ids: Option<String>,
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Paced HTTP/2 requests for SECONDS, across GOAWAYs (see `h2_client`); prints a
    /// summary.
    H2Client {
        #[arg(long)]
        connect: SocketAddr,
        /// The :authority.
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Upgrade to WebSocket and check that a message comes back.
    Websocket {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long)]
        message: String,
    },
    /// A starting app: from its first instant, one fresh connection (a MARKER-filled
    /// transfer) every INTERVAL until one succeeds and AFTER more have been made, or
    /// TIMEOUT passes; reports every attempt.
    FirstConnect {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        marker: String,
        #[arg(long, default_value_t = 4096)]
        bytes: u64,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 3)]
        after: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Open N short connections one after another (SIZE bytes each way).
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 8)]
        size: usize,
    },
    /// Hostile: open COUNT IPv6-only sockets, connect each to CONNECT (a v4-mapped
    /// address), print a report once all are open, and hold them for HOLD seconds.
    ParkFlood {
        #[arg(long)]
        connect: std::net::SocketAddrV6,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 120)]
        hold_seconds: u64,
    },
    /// Open COUNT connections and hold them: prints a JSON report once they are open,
    /// and another when the peer closed them all or SECONDS passed.
    Flood {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, value_enum)]
        mode: FloodMode,
        #[arg(long)]
        seconds: u64,
        /// Slowloris: one byte per interval.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Load across an agent upgrade: short connections, long paced transfers and a
    /// kept-alive HTTP client, until STOP_FILE exists; prints a JSON report.
    UpgradeLoad {
        #[arg(long)]
        short: Option<SocketAddr>,
        #[arg(long, default_value_t = 200)]
        short_rate: u64,
        #[arg(long)]
        long: Option<SocketAddr>,
        #[arg(long, default_value_t = 20)]
        long_count: usize,
        #[arg(long, default_value_t = 256 << 20)]
        long_bytes: u64,
        #[arg(long, default_value_t = 20)]
        long_seconds: u64,
        #[arg(long)]
        http: Option<SocketAddr>,
        #[arg(long, default_value = "web")]
        http_host: String,
        #[arg(long, default_value_t = 500)]
        http_rate: u64,
        #[arg(long, default_value_t = 4)]
        http_connections: usize,
        #[arg(long)]
        stop_file: std::path::PathBuf,
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
    },
    /// Open-loop HTTP/1.1 load at a fixed rate; prints latency percentiles.
    HttpLoad {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// A header every request carries, `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn serve(addrs: Vec<SocketAddr>) -> ! {
    // A thread and a descriptor per connection: benchmarks hold 10,000 at once.
    let _ = raise_nofile(65_536);
    let mut listeners = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| {
            eprintln!("mesh-testapp: cannot listen on {addr}: {e}");
            std::process::exit(2)
        });
        listeners.push(l);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut handles = Vec::new();
    for l in listeners {
        handles.push(thread::spawn(move || {
            for stream in l.incoming().flatten() {
                thread::spawn(move || echo(stream));
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    std::process::exit(0)
}

/// xorshift64*: deterministic per seed, good enough to catch reordering or corruption.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn transfer(
    addr: SocketAddr,
    bytes: u64,
    timeout: Duration,
    marker: Option<&str>,
) -> TransferReport {
    let started = Instant::now();
    let mut report = TransferReport::default();
    let stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("connect: {e}"));
            return report;
        }
    };
    let _ = stream.set_read_timeout(Some(timeout));
    report.local = stream.local_addr().ok().map(|a| a.to_string());
    report.peer = stream.peer_addr().ok().map(|a| a.to_string());
    let seed = started.elapsed().as_nanos() as u64 ^ 0x9E37_79B9_7F4A_7C15;
    let data = match marker {
        Some(m) if !m.is_empty() => m.bytes().cycle().take(bytes as usize).collect(),
        _ => payload(bytes as usize, seed),
    };
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            report.error = Some(format!("clone: {e}"));
            return report;
        }
    };
    let to_send = data.clone();
    let sender = thread::spawn(move || -> std::io::Result<u64> {
        writer.write_all(&to_send)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(to_send.len() as u64)
    });
    let mut received = Vec::with_capacity(data.len());
    let mut reader = stream;
    let read_result = reader.read_to_end(&mut received);
    match sender.join() {
        Ok(Ok(n)) => report.sent = n,
        Ok(Err(e)) => report.error = Some(format!("send: {e}")),
        Err(_) => report.error = Some("sender panicked".into()),
    }
    if let Err(e) = read_result {
        report.error.get_or_insert(format!("receive: {e}"));
    }
    report.received = received.len() as u64;
    report.ok = report.error.is_none() && received == data;
    if report.error.is_none() && !report.ok {
        let first_diff = received.iter().zip(&data).position(|(a, b)| a != b);
        report.error = Some(format!(
            "echo differs: {} of {} bytes back, first difference at {first_diff:?}",
            received.len(),
            data.len()
        ));
    }
    report.elapsed_us = started.elapsed().as_micros() as u64;
    report
}

fn churn(addr: SocketAddr, count: u64, size: usize) -> ChurnReport {
    let started = Instant::now();
    let mut report = ChurnReport::default();
    let message: Vec<u8> = b"nodemesh".iter().copied().cycle().take(size).collect();
    let mut back = vec![0u8; size];
    let mut once = || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&message)?;
        s.read_exact(&mut back)?;
        if back != message {
            return Err(std::io::Error::other("echo differs"));
        }
        Ok(())
    };
    for _ in 0..count {
        match once() {
            Ok(()) => report.succeeded += 1,
            Err(e) => {
                report.failed += 1;
                report.first_error.get_or_insert(e.to_string());
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

fn rtt(addr: SocketAddr, size: usize, count: u64) -> RttReport {
    let mut samples = Vec::with_capacity(count as usize);
    let run = |samples: &mut Vec<f64>| -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let request = vec![0x5au8; size];
        let mut back = vec![0u8; size];
        for _ in 0..count {
            let t = Instant::now();
            s.write_all(&request)?;
            s.read_exact(&mut back)?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(())
    };
    let error = run(&mut samples).err().map(|e| e.to_string());
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    RttReport {
        count: samples.len() as u64,
        size: size as u64,
        p50_us: at(0.5),
        p99_us: at(0.99),
        p999_us: at(0.999),
        error,
    }
}

fn first_connect(
    addr: SocketAddr,
    marker: &str,
    bytes: u64,
    interval: Duration,
    after: u64,
    timeout: Duration,
) -> FirstConnectReport {
    let started = Instant::now();
    let mut report = FirstConnectReport::default();
    let mut left_after = after;
    while started.elapsed() < timeout {
        let mut attempt = transfer(addr, bytes, Duration::from_secs(5), Some(marker));
        attempt.elapsed_us = started.elapsed().as_micros() as u64;
        let ok = attempt.ok;
        report.attempts.push(attempt);
        if ok && report.first_ok_ms.is_none() {
            report.first_ok_ms = Some(started.elapsed().as_millis() as u64);
        }
        if report.first_ok_ms.is_some() {
            if left_after == 0 {
                break;
            }
            left_after -= 1;
        }
        thread::sleep(interval);
    }
    report
}

/// One long-lived connection: a ping/echo every `interval` for `duration`.
fn hold(addr: SocketAddr, duration: Duration, interval: Duration) -> ChurnReport {
    let started = Instant::now();
    let mut report = ChurnReport::default();
    let run = |report: &mut ChurnReport| -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        while started.elapsed() < duration {
            s.write_all(b"ping")?;
            let mut back = [0u8; 4];
            s.read_exact(&mut back)?;
            if &back != b"ping" {
                return Err(std::io::Error::other("echo differs"));
            }
            report.succeeded += 1;
            thread::sleep(interval);
        }
        Ok(())
    };
    if let Err(e) = run(&mut report) {
        report.failed += 1;
        report.first_error = Some(e.to_string());
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

fn main() {
    match Cli::parse().command {
        Cmd::Serve { listen } => serve(listen),
        Cmd::Transfer {
            connect,
            bytes,
            timeout_ms,
            marker,
        } => {
            let r = transfer(
                connect,
                bytes,
                Duration::from_millis(timeout_ms),
                marker.as_deref(),
            );
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.ok { 0 } else { 1 });
        }
        Cmd::Hold {
            connect,
            seconds,
            interval_ms,
        } => {
            let r = hold(
                connect,
                Duration::from_secs(seconds),
                Duration::from_millis(interval_ms),
            );
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.failed == 0 { 0 } else { 1 });
        }
        Cmd::Rtt {
            connect,
            size,
            count,
        } => {
            let r = rtt(connect, size as usize, count);
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.error.is_none() { 0 } else { 1 });
        }
        Cmd::UpgradeLoad {
            short,
            short_rate,
            long,
            long_count,
            long_bytes,
            long_seconds,
            http,
            http_host,
            http_rate,
            http_connections,
            stop_file,
            max_seconds,
        } => {
            let report = mesh_tests::upgrade_load::run(mesh_tests::upgrade_load::LoadPlan {
                short: short.map(|a| (a, short_rate)),
                long: long.map(|a| (a, long_count, long_bytes, Duration::from_secs(long_seconds))),
                http: http.map(|a| (a, http_host, http_rate, http_connections)),
                stop_file,
                max: Duration::from_secs(max_seconds),
            });
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            std::process::exit(0);
        }
        Cmd::HttpLoad {
            connect,
            rate,
            seconds,
            headers,
        } => {
            let headers = headers
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .collect();
            let r = mesh_tests::bench::http::load(connect, rate, seconds, headers);
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.failed == 0 { 0 } else { 1 });
        }
        Cmd::ParkFlood {
            connect,
            count,
            hold_seconds,
        } => {
            let (r, held) = mesh_tests::flood::park_flood(connect, count);
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            thread::sleep(Duration::from_secs(hold_seconds));
            drop(held);
        }
        Cmd::Flood {
            connect,
            count,
            mode,
            seconds,
            interval_ms,
        } => {
            if let Err(e) = raise_nofile(count as u64 + 1024) {
                eprintln!("mesh-testapp: cannot raise the descriptor limit: {e}");
            }
            let mut flood = Flood::open(connect, count, mode);
            println!(
                "{}",
                serde_json::to_string(&flood.report()).unwrap_or_default()
            );
            let _ = std::io::stdout().flush();
            flood.hold(
                Duration::from_secs(seconds),
                Duration::from_millis(interval_ms),
            );
            println!(
                "{}",
                serde_json::to_string(&flood.report()).unwrap_or_default()
            );
        }
        Cmd::Pause => loop {
            thread::sleep(Duration::from_secs(3600));
        },
        Cmd::HttpServe {
            listen,
            name,
            status,
            delay_ms,
            file,
            forward_to,
            forward_host,
        } => httpapp::serve(
            listen,
            name,
            httpapp::Behaviour {
                status,
                delay: delay_ms.map(std::time::Duration::from_millis),
                file,
                forward: forward_to.map(|to| httpapp::Forward {
                    to,
                    host: forward_host.unwrap_or_default(),
                }),
            },
        ),
        Cmd::Http {
            connect,
            path,
            host,
            method,
            headers,
            count,
            http2,
            request_ids,
            body_bytes,
            timeout_ms,
        } => {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::GET);
            let headers = headers
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            let r = httpapp::client(httpapp::ClientOptions {
                connect,
                path,
                host,
                method,
                headers,
                count,
                http2,
                request_ids,
                body_bytes,
                timeout: Duration::from_millis(timeout_ms),
            });
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.errors == 0 { 0 } else { 1 });
        }
        Cmd::H2Client {
            connect,
            host,
            path,
            seconds,
            interval_ms,
            timeout_ms,
        } => {
            let r = h2_client::run(h2_client::H2ClientOptions {
                connect,
                host,
                path,
                duration: Duration::from_secs_f64(seconds.max(0.0)),
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
            });
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.failed == 0 { 0 } else { 1 });
        }
        Cmd::Websocket {
            connect,
            host,
            path,
            message,
        } => {
            let r = httpapp::websocket(connect, &host, &path, &message);
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.error.is_none() { 0 } else { 1 });
        }
        Cmd::FirstConnect {
            connect,
            marker,
            bytes,
            interval_ms,
            after,
            timeout_ms,
        } => {
            let r = first_connect(
                connect,
                &marker,
                bytes,
                Duration::from_millis(interval_ms),
                after,
                Duration::from_millis(timeout_ms),
            );
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        }
        Cmd::Churn {
            connect,
            count,
            size,
        } => {
            let r = churn(connect, count, size);
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            std::process::exit(if r.failed == 0 { 0 } else { 1 });
        }
    }
}
