//! An upgrade under steady load (issue 17): both nodes' agents replaced the way a
//! DaemonSet with `maxSurge: 1` does it, while a client pod keeps opening connections,
//! streams long transfers and sends HTTP requests through an HTTPRoute. Nothing may be
//! refused, cut or failed. (Host only: the emulated VM cannot carry this load; the
//! hand-over itself is checked on its kernel by `upgrades.rs`.)

use std::time::{Duration, Instant};

use mesh_tests::sim::{host, SimCluster};

#[test]
fn upgrading_both_nodes_under_load_refuses_cuts_and_fails_nothing() {
    let (cluster, _web) = SimCluster::web_behind_a_route("60s").unwrap();
    let _echo = cluster.serve("server", 8080).unwrap();
    let vip = cluster.service("web").addr4();

    // The load, scaled to the machine: 200 new connections/s, 20 transfers
    // of 256 MiB paced over 24 s, 500 HTTP requests/s on four kept-alive connections
    // (closed loop each: on two cores that also carry the transfers' TLS, fewer get
    // through; the report says how many).
    // On a slower machine (a time scale above 1) the load shrinks with the scale's
    // square: such machines carry far less than their scale suggests.
    let scale = host::time_scale().powi(2);
    let echo = cluster.pod("server").addr4(8080).to_string();
    let args: Vec<String> = [
        "--short",
        &echo,
        "--short-rate",
        &((200.0 / scale) as u64).to_string(),
        "--long",
        &echo,
        "--long-count",
        "20",
        "--long-bytes",
        &(((256u64 << 20) as f64 / scale) as u64).to_string(),
        "--long-seconds",
        "24",
        "--http",
        &vip.to_string(),
        "--http-host",
        "web",
        "--http-rate",
        &((500.0 / scale) as u64).to_string(),
        "--max-seconds",
        "300",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let load = cluster.start_load("client", &args).unwrap();
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));

    // Node a (the client's: outbound), then node b (the servers': inbound), each as a
    // DaemonSet with maxSurge 1 does it: the new agent takes over, then SIGTERM.
    let mut olds = Vec::new();
    for node in ["a", "b"] {
        let started = Instant::now();
        let (old, took) = cluster
            .hand_over_agent(node, Duration::from_secs(20))
            .unwrap();
        old.terminate().unwrap();
        let status = cluster.admin(node, "/status").unwrap();
        println!(
            "upgrade of {node} at t={:.1}s: the new agent took over {took:?} after it started; nothing accepted for {} ms",
            (started - load_started).as_secs_f64(),
            status["handover"]["accept_gap_ms"]
        );
        olds.push((node, old, started));
        std::thread::sleep(Duration::from_secs(2));
    }
    let report = load.finish().unwrap();
    println!(
        "load across both upgrades: {}",
        serde_json::to_string(&report).unwrap()
    );

    // The old agents exit by themselves once their last connection ended.
    for (node, mut old, started) in olds {
        let status = old
            .wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the old agent of {node} still runs"));
        assert!(
            status.success(),
            "the old agent of {node} exited with {status}"
        );
        println!(
            "upgrade of {node}: {:?} from the new agent's start to the old one's exit",
            started.elapsed()
        );
    }

    if report.short.failed + report.long.failed + report.http.failed > 0 {
        for node in ["a", "b"] {
            let log =
                std::fs::read_to_string(cluster.second_agent_log_path(node)).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("\"log\":\"access\""))
                .collect();
            eprintln!(
                "--- the new agent of {node}:\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    assert_eq!(
        report.short.failed, 0,
        "new connections failed: {:?}",
        report.short.errors
    );
    assert!(
        report.short.ok as f64 >= 6.0 * 200.0 / scale * 0.8,
        "too few connections ran: {}",
        report.short.ok
    );
    assert_eq!(
        report.long.failed, 0,
        "long transfers were cut: {:?}",
        report.long.errors
    );
    assert_eq!(report.long.ok, 20, "{report:?}");
    assert_eq!(
        report.http.failed, 0,
        "HTTP requests failed: {:?}",
        report.http.errors
    );
    assert!(
        report.http.ok as f64 >= 500.0 / scale,
        "too few HTTP requests ran: {}",
        report.http.ok
    );
    // Node a's drain told the kept-alive client to reconnect (`Connection: close`), the
    // way it can without losing a request.
    assert!(report.http_close_announced >= 1, "{report:?}");

    // Both new agents serve, having inherited every listener.
    for node in ["a", "b"] {
        let status = cluster.admin(node, "/status").unwrap();
        assert!(
            status["handover"]["inherited_listeners"].as_u64() >= Some(3),
            "{status}"
        );
        assert_eq!(status["handover"]["predecessor_exited"], true, "{status}");
    }
    assert!(
        cluster
            .transfer("client", cluster.pod("server").addr4(8080), 4096)
            .unwrap()
            .ok
    );
}
