//! Logs as an amplifier: a pod that makes thousands of handshakes fail must not make the
//! agent write thousands of lines; every refusal is still counted.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use mesh_tests::sim::{host, ClusterSpec, SimCluster};

const HANDSHAKES: u64 = 2_000;

fn warn_lines(cluster: &SimCluster, node: &str, message: &str) -> usize {
    cluster
        .agent_log(node)
        .lines()
        .filter(|l| l.contains(message))
        .count()
}

#[test]
fn thousands_of_failed_handshakes_are_counted_but_logged_a_few_times_a_second() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let target = cluster.pod("server").addr4(15008);
    let refused_before = cluster
        .refused_count("b", "hbone_handshake_failed")
        .unwrap();
    let started = Instant::now();
    let flood = move |count: u64| -> anyhow::Result<u64> {
        let mut failed = 0u64;
        for _ in 0..count {
            let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
                continue;
            };
            // Not a TLS ClientHello: the handshake fails at once.
            let _ = s.write_all(b"\x16\x03\x01\x00\x05hello, not TLS");
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 256];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            failed += 1;
        }
        Ok(failed)
    };
    let outsider = cluster.pod("outsider").netns.clone();
    let failed = host::in_netns(&outsider, move || flood(HANDSHAKES)).unwrap();
    let took = started.elapsed();
    assert_eq!(
        failed, HANDSHAKES,
        "every attempt reached the HBONE listener"
    );
    let counted = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .refused_count("b", "hbone_handshake_failed")
            .is_ok_and(|n| n - refused_before >= HANDSHAKES)
    });
    assert!(counted.is_some(), "not every failed handshake was counted");
    let lines = warn_lines(&cluster, "b", "HBONE connection refused");
    // 5 lines per second per call site, plus one window of slack.
    let allowed = 5 * (took.as_secs() as usize + 2);
    eprintln!(
        "{HANDSHAKES} failed handshakes in {took:?}: {lines} warning lines (at most {allowed})"
    );
    assert!(
        lines <= allowed,
        "{lines} warning lines for {HANDSHAKES} handshakes in {took:?}"
    );
    assert!(lines >= 1, "the refusals were not logged at all");
    // The next window's first line says how many were dropped.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(host::in_netns(&outsider, move || flood(1)).unwrap(), 1);
    let logged = cluster.eventually(Duration::from_secs(5), || {
        warn_lines(&cluster, "b", "HBONE connection refused") > lines
    });
    assert!(
        logged.is_some(),
        "the refusal after a quiet second was not logged"
    );
    // Every refusal is either a line or counted as suppressed in a later line.
    let log = cluster.agent_log("b");
    let refusals: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("HBONE connection refused"))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let suppressed: u64 = refusals
        .iter()
        .filter_map(|v| v["suppressed"].as_u64())
        .sum();
    assert_eq!(
        suppressed + refusals.len() as u64,
        HANDSHAKES + 1,
        "lines written + suppressed counts must account for every refusal"
    );
    // The agent still serves meshed traffic.
    let _app = cluster.serve("server", 8080).unwrap();
    let report = cluster
        .transfer("client", cluster.pod("server").addr4(8080), 64 * 1024)
        .unwrap();
    assert!(report.ok, "{report:?}");
}

/// A log collector that stops reading the agent's stdout (the pipe fills after a few
/// dozen access-log lines) must not stall the connections whose lines wait: the access
/// log is written by its own thread, behind a bounded queue.
#[test]
fn an_access_log_nobody_reads_holds_up_no_connection() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agent("b").unwrap();
    let node = cluster.node("a").clone();
    let stderr = std::fs::File::create(cluster.agent_log_path("a")).unwrap();
    let mut agent = cluster
        .agent_command(&node)
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    // Held, not read, until the end.
    let mut stdout = agent.stdout.take().unwrap();
    cluster.adopt_agent("a", agent);
    cluster.wait_ready("a", Duration::from_secs(20)).unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);

    // 3,000 connections, each closing with an access-log line of about 1 KB: 40 times
    // what the pipe holds. Every one works, at the usual pace.
    let connections = 3_000u64;
    let report = cluster.churn("client", dst, connections).unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.succeeded, connections, "{report:?}");
    assert!(
        report.elapsed_ms < host::scaled(Duration::from_secs(30)).as_millis() as u64,
        "{report:?}"
    );
    assert!(
        cluster.scrape_metrics("a").is_ok(),
        "the admin side stalled"
    );

    // The collector reads again: the lines that waited come out whole, one per
    // connection.
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = 0u64;
        while lines < connections && Instant::now() < deadline {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    text.extend_from_slice(&buf[..n]);
                    lines = text.iter().filter(|b| **b == b'\n').count() as u64;
                }
            }
        }
        text
    });
    let text = reader.join().unwrap();
    let text = String::from_utf8_lossy(&text);
    let tcp_lines = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["log"] == "access" && v["kind"] == "tcp")
        })
        .count() as u64;
    assert!(
        tcp_lines >= connections,
        "{tcp_lines} whole access-log lines of {connections} connections"
    );
    let metrics = cluster.scrape_metrics("a").unwrap();
    assert!(
        metrics.contains("nodemesh_access_log_dropped_total 0"),
        "lines were dropped: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("nodemesh_access_log"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
