//! `meshctl node ... | head`: a reader that goes away before meshctl writes ends its
//! output quietly (no panic, success), for tables and structured output alike.

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// An admin API answering one request with `body`, once `go` says so.
fn admin_api(body: &'static str) -> (String, mpsc::Sender<()>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (go, wait) = mpsc::channel();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "meshctl closed before sending its request");
            request.extend_from_slice(&buf[..n]);
        }
        wait.recv_timeout(Duration::from_secs(10)).unwrap();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
    });
    (addr, go, server)
}

fn run_with_closed_stdout(args: &[&str], body: &'static str) {
    let (addr, go, server) = admin_api(body);
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["node", "--admin-addr", &addr])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away (as `head` does once it has its lines) before meshctl
    // has anything to write.
    drop(child.stdout.take());
    go.send(()).unwrap();
    let out = child.wait_with_output().unwrap();
    server.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let services = r#"[{"service": {"namespace": "apps", "name": "web"}, "vips": ["10.96.0.10"], "port": 80,
        "resolution": {"kind": "direct"}, "http_routes": []}]"#;
    run_with_closed_stdout(&["services"], services);
    run_with_closed_stdout(&["services", "-o", "json"], services);
    run_with_closed_stdout(&["discovery"], r#"{"Pod": {"synced": true}}"#);
}
