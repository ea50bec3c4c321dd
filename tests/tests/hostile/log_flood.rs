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
