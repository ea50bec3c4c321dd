//! Steady load for agent upgrades (`mesh-testapp upgrade-load`): new short connections
//! at a fixed rate, long paced transfers whose echo is checked byte for byte as it
//! streams (no payload is held in memory), and a kept-alive HTTP/1.1 client at a fixed
//! request rate. It runs until a stop file appears (or a deadline), then reports every
//! failure. A failure is anything a user would see: a refused or reset connection, a
//! wrong byte, an HTTP request that got no 200.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Echo server for the short connections, and their rate per second.
    pub short: Option<(SocketAddr, u64)>,
    /// Echo server for the long transfers: how many, bytes each, and how long each
    /// takes at least (paced).
    pub long: Option<(SocketAddr, usize, u64, Duration)>,
    /// HTTP server (Host header), request rate per second, and kept-alive
    /// connections sharing it.
    pub http: Option<(SocketAddr, String, u64, usize)>,
    /// The load stops when this file exists...
    pub stop_file: PathBuf,
    /// ...or after this long.
    pub max: Duration,
}

/// Counts of one kind of load, and the first few errors.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub seconds: f64,
    pub short: Tally,
    pub long: Tally,
    /// Bytes the long transfers got back intact.
    pub long_bytes: u64,
    pub http: Tally,
    /// HTTP connections opened (the first, and one after each close).
    pub http_connections: u64,
    /// Responses that carried `Connection: close`.
    pub http_close_announced: u64,
}

#[derive(Default)]
struct Shared {
    short: Mutex<Tally>,
    long: Mutex<Tally>,
    long_bytes: AtomicU64,
    http: Mutex<Tally>,
    http_connections: AtomicU64,
    http_close_announced: AtomicU64,
    stop: AtomicBool,
}

fn note(tally: &Mutex<Tally>, result: Result<(), String>) {
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(()) => t.ok += 1,
        Err(e) => {
            t.failed += 1;
            if t.errors.len() < 10 {
                t.errors.push(e);
            }
        }
    }
}

/// The xorshift64* stream both ends of a long transfer compute.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
        }
    }
}

fn short_once(addr: SocketAddr, seed: u64) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut data = vec![0u8; 1024];
    Stream(seed | 1).fill(&mut data);
    s.write_all(&data).map_err(|e| format!("send: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back)
        .map_err(|e| format!("receive: {e}"))?;
    if back != data {
        return Err(format!("echo differs: {} of 1024 bytes back", back.len()));
    }
    Ok(())
}

fn long_once(
    addr: SocketAddr,
    bytes: u64,
    min: Duration,
    seed: u64,
    shared: &Shared,
) -> Result<(), String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || -> Result<(), String> {
        let mut gen = Stream(seed | 1);
        let mut chunk = vec![0u8; 64 * 1024];
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(chunk.len() as u64) as usize;
            gen.fill(&mut chunk[..n]);
            writer
                .write_all(&chunk[..n])
                .map_err(|e| format!("send at byte {sent}: {e}"))?;
            sent += n as u64;
            // Paced: byte `sent` is not sent before its share of `min` has passed.
            let due = min.mul_f64(sent as f64 / bytes as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let mut reader = s;
    let mut expect = Stream(seed | 1);
    let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut got = 0u64;
    let received = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                expect.fill(&mut want[..n]);
                if buf[..n] != want[..n] {
                    break Err(format!("echo differs near byte {got}"));
                }
                got += n as u64;
                shared.long_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => break Err(format!("receive at byte {got}: {e}")),
        }
    };
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err("sender panicked".into()));
    received?;
    sent?;
    if got != bytes {
        return Err(format!("{got} of {bytes} bytes back"));
    }
    Ok(())
}

/// One HTTP/1.1 exchange on `conn`: Ok(true) when the server announced the close.
fn http_once(conn: &mut BufReader<TcpStream>, host: &str) -> Result<bool, String> {
    let request = format!("GET /upgrade-load HTTP/1.1\r\nhost: {host}\r\n\r\n");
    conn.get_mut()
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    conn.read_line(&mut line)
        .map_err(|e| format!("status line: {e}"))?;
    if line.is_empty() {
        return Err("closed before a response".into());
    }
    let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        conn.read_line(&mut line)
            .map_err(|e| format!("headers: {e}"))?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| format!("content-length {value}"))?;
        }
        if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)
        .map_err(|e| format!("body: {e}"))?;
    if status != "200" {
        return Err(format!("HTTP {status}"));
    }
    Ok(close)
}

fn http_loop(addr: SocketAddr, host: String, rate: u64, shared: Arc<Shared>) {
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let started = Instant::now();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    shared.http_connections.fetch_add(1, Ordering::Relaxed);
                    conn = Some(BufReader::new(s));
                }
                Err(e) => {
                    note(&shared.http, Err(format!("connect: {e}")));
                    thread::sleep(every);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match http_once(c, &host) {
            Ok(close) => {
                note(&shared.http, Ok(()));
                if close {
                    shared.http_close_announced.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
            Err(e) => {
                let at = started.elapsed().as_secs_f64();
                note(&shared.http, Err(format!("t={at:.1}s {e}")));
                conn = None;
            }
        }
        n += 1;
        if let Some(wait) = every.mul_f64(n as f64).checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
}

/// Runs `plan` and reports.
pub fn run(plan: LoadPlan) -> LoadReport {
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let mut workers = Vec::new();
    if let Some((addr, count, bytes, min)) = plan.long {
        for i in 0..count {
            let shared = shared.clone();
            workers.push(thread::spawn(move || {
                let seed = 0x5EED_0000 + i as u64;
                let r = long_once(addr, bytes, min, seed, &shared);
                note(&shared.long, r);
            }));
        }
    }
    if let Some((addr, host, rate, connections)) = plan.http {
        let connections = connections.max(1);
        for _ in 0..connections {
            let (shared, host) = (shared.clone(), host.clone());
            let rate = rate.div_ceil(connections as u64);
            workers.push(thread::spawn(move || http_loop(addr, host, rate, shared)));
        }
    }
    let outstanding = Arc::new(AtomicUsize::new(0));
    let every = plan
        .short
        .map(|(_, rate)| Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let mut n = 0u64;
    while !plan.stop_file.exists() && started.elapsed() < plan.max {
        let (Some((addr, _)), Some(every)) = (plan.short, every) else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        n += 1;
        if outstanding.load(Ordering::Relaxed) > 2000 {
            note(
                &shared.short,
                Err("over 2000 connections outstanding".into()),
            );
        } else {
            let (shared, outstanding) = (shared.clone(), outstanding.clone());
            outstanding.fetch_add(1, Ordering::Relaxed);
            let at = started.elapsed().as_secs_f64();
            thread::spawn(move || {
                let r = short_once(addr, n.wrapping_mul(0x9E37_79B9));
                note(&shared.short, r.map_err(|e| format!("t={at:.1}s {e}")));
                outstanding.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if let Some(wait) = every.mul_f64(n as f64).checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let take = |m: &Mutex<Tally>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut short = take(&shared.short);
    let stuck = outstanding.load(Ordering::Relaxed) as u64;
    if stuck > 0 {
        short.failed += stuck;
        short
            .errors
            .push(format!("{stuck} connections never finished"));
    }
    LoadReport {
        seconds: started.elapsed().as_secs_f64(),
        short,
        long: take(&shared.long),
        long_bytes: shared.long_bytes.load(Ordering::Relaxed),
        http: take(&shared.http),
        http_connections: shared.http_connections.load(Ordering::Relaxed),
        http_close_announced: shared.http_close_announced.load(Ordering::Relaxed),
    }
}
