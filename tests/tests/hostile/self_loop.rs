//! The mesh's own ports as a target: a connection to `<meshed pod>:15006` (plaintext,
//! from any pod), a tunnel to the pod's own 15006/15008 (HBONE, from an enrolled pod), and
//! a pod's own process connecting to its loopback 15006 must each be refused once, not
//! turned into the agent connecting to itself over and over.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

const INBOUND_PLAINTEXT_PORT: u16 = 15006;
const HBONE_PORT: u16 = 15008;
use mesh_tests::sim::{host, usage::Usage, ClusterSpec, SimCluster};

/// Attack connections per target address.
const ATTACKERS: usize = 16;

/// Opens `count` connections to `target` from inside `netns`, sends a few bytes on each
/// and reports how each ended within 2 s: `true` when the agent closed or refused it.
fn attack(netns: &std::path::Path, target: SocketAddr, count: usize) -> Vec<bool> {
    host::in_netns(netns, move || {
        let mut held = Vec::new();
        let mut ended = Vec::new();
        for _ in 0..count {
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(mut s) => {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                    held.push(s);
                }
                Err(_) => ended.push(true),
            }
        }
        for mut s in held {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 64];
            ended.push(match s.read(&mut buf) {
                // EOF or reset: the agent ended it.
                Ok(0) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                // An answer: something served a connection to the mesh's own port.
                Ok(_) => false,
            });
        }
        Ok(ended)
    })
    .expect("attack runs in the pod's namespace")
}

fn peak_usage(cluster: &SimCluster, node: &str, for_: Duration, peak: &mut Usage) {
    let until = Instant::now() + for_;
    while Instant::now() < until {
        if let Ok(u) = cluster.agent_usage(node) {
            peak.fds = peak.fds.max(u.fds);
            peak.rss_kib = peak.rss_kib.max(u.rss_kib);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn access_log_lines(cluster: &SimCluster, node: &str) -> usize {
    cluster
        .access_log(node)
        .lines()
        .filter(|l| l.contains("\"log\":\"access\""))
        .count()
}

#[test]
fn a_meshed_pods_own_ports_as_target_are_refused_once_and_never_loop() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _app = cluster.serve("server", 8080).unwrap();
    let server = cluster.pod("server").clone();
    let app = server.addr4(8080);
    assert!(cluster.transfer("client", app, 4096).unwrap().ok);
    // Settle: certificates fetched, the first tunnel pooled.
    std::thread::sleep(Duration::from_millis(300));
    let baseline = cluster.agent_usage("b").unwrap();
    let logs_before = access_log_lines(&cluster, "b");
    eprintln!("agent b before: {baseline}");

    // 1. Plaintext to <pod>:15006, v4 and v6, from a pod of the same node and one of the
    //    other node, none of them enrolled.
    let mut peak = baseline;
    let mut results = Vec::new();
    for (from, target) in [
        ("outsider", server.addr4(INBOUND_PLAINTEXT_PORT)),
        ("outsider", server.addr6(INBOUND_PLAINTEXT_PORT)),
        ("bystander", server.addr4(INBOUND_PLAINTEXT_PORT)),
    ] {
        results.extend(attack(&cluster.pod(from).netns, target, ATTACKERS));
        peak_usage(&cluster, "b", Duration::from_millis(200), &mut peak);
    }
    // 2. A process of the meshed pod itself, to its loopback listener.
    let own = "127.0.0.1:15006".parse().unwrap();
    results.extend(attack(&server.netns, own, ATTACKERS));
    // 3. An enrolled pod through HBONE: its connections to the server's 15006 and 15008
    //    are redirected and tunnelled; the tunnel must be refused at the destination.
    for port in [INBOUND_PLAINTEXT_PORT, HBONE_PORT] {
        let report = cluster
            .transfer("client", server.addr4(port), 1024)
            .unwrap();
        assert!(
            !report.ok,
            "a tunnel to the mesh's port {port} carried data: {report:?}"
        );
    }
    // Legitimate traffic is served all along.
    for _ in 0..20 {
        let report = cluster.transfer("client", app, 64 * 1024).unwrap();
        assert!(
            report.ok,
            "legitimate transfer failed during the attack: {report:?}"
        );
    }
    peak_usage(&cluster, "b", Duration::from_secs(1), &mut peak);
    eprintln!("agent b peak during the attacks: {peak}");

    assert!(
        results.iter().all(|ended| *ended),
        "a connection to a mesh port was held open: {results:?}"
    );
    assert!(
        peak.fds <= baseline.fds + 64,
        "fds grew from {} to {} (a loop?)",
        baseline.fds,
        peak.fds
    );
    assert!(
        peak.rss_kib <= baseline.rss_kib + 32 * 1024,
        "RSS grew from {baseline} to {peak}"
    );
    let refused = |reason| cluster.refused_count("b", reason).unwrap();
    assert!(
        refused("inbound_target_mesh_port") >= ATTACKERS as u64,
        "own-loopback attack not counted"
    );
    assert!(
        refused("hbone_target_mesh_port") >= 2,
        "HBONE attacks not counted"
    );
    // One record per refused connection at most, plus the legitimate ones: nothing
    // multiplies.
    let logged = access_log_lines(&cluster, "b") - logs_before;
    assert!(
        logged <= 4 * ATTACKERS + 2 + 2 * 20 + 10,
        "{logged} access-log lines for a handful of connections"
    );

    // Back to baseline once the attackers are gone.
    let back = cluster.eventually(Duration::from_secs(10), || {
        cluster
            .agent_usage("b")
            .is_ok_and(|u| u.fds <= baseline.fds + 4)
    });
    let now = cluster.agent_usage("b").unwrap();
    eprintln!("agent b after: {now} (back to baseline after {back:?})");
    assert!(back.is_some(), "fds never came back: {baseline} -> {now}");
}
