//! Stopping and replacing a node's agent (issue 17, first part): SIGTERM drains —
//! listeners close, established connections run to their end (or the drain timeout cuts
//! them, and the agent says how many) — and a second agent on a node waits for the
//! first to exit before it touches the pinned state.

use std::time::{Duration, Instant};

use mesh_tests::sim::{host, ClusterSpec, SimCluster};
use serde_json::Value;

fn cluster(drain_timeout: &str) -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.agent_args
        .extend(["--drain-timeout".to_string(), drain_timeout.to_string()]);
    SimCluster::create(spec).unwrap()
}

fn hold_report(hold: std::process::Child) -> Value {
    let out = hold.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn metric(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn sigterm_drains_refusing_new_connections_and_exits_when_the_last_one_ends() {
    let cluster = cluster("30s");
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 4096).unwrap().ok);

    // A connection that pings for 4 s, established before the agent is told to stop.
    let hold = cluster.hold("client", dst, 4).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    cluster.terminate_agent("a").unwrap();
    let signalled = Instant::now();

    // New connections fail at once (outbound fails closed), they are not queued.
    let refused = cluster.eventually(Duration::from_secs(2), || {
        let started = Instant::now();
        let r = cluster.transfer("client", dst, 1024).unwrap();
        !r.ok && started.elapsed() < Duration::from_secs(2)
    });
    assert!(
        refused.is_some(),
        "a new connection still worked (or hung) while the agent drained"
    );
    let metrics = cluster.scrape_metrics("a").unwrap();
    assert_eq!(metric(&metrics, "nodemesh_agent_draining"), Some(1.0));
    assert!(
        cluster
            .wait_agent_exit("a", Duration::from_millis(100))
            .is_none(),
        "the agent exited with a connection still open"
    );

    // The established connection runs to its end, every ping answered.
    let report = hold_report(hold);
    assert_eq!(
        report["failed"], 0,
        "the drained connection broke: {report}"
    );
    let pings = (6.0 / host::time_scale()) as u64;
    assert!(
        report["succeeded"].as_u64().unwrap_or(0) >= pings,
        "{report}"
    );
    let ended = Instant::now();
    // Then the agent exits by itself, well before the 30 s drain timeout.
    let status = cluster
        .wait_agent_exit("a", Duration::from_secs(3))
        .expect("the agent did not exit after its last connection ended");
    assert!(status.success(), "the agent exited with {status}");
    println!(
        "drain: signal to exit {:?}, last connection end to exit {:?}",
        signalled.elapsed(),
        ended.elapsed()
    );
    let log = cluster.agent_log("a");
    assert!(
        log.lines()
            .any(|l| l.contains("drained: every connection ended") && l.contains("\"completed\":1")),
        "the log does not say the drain completed one connection:\n{log}"
    );

    // The next agent takes over the pinned state: connections work again.
    cluster.start_agent("a").unwrap();
    assert!(cluster.transfer("client", dst, 64 * 1024).unwrap().ok);
}

#[test]
fn a_drain_that_outlasts_the_timeout_cuts_the_rest_and_says_how_many() {
    let cluster = cluster("1s");
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let holds: Vec<_> = (0..2)
        .map(|_| cluster.hold("client", dst, 30).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let signalled = Instant::now();
    cluster.terminate_agent("a").unwrap();
    let status = cluster
        .wait_agent_exit("a", Duration::from_secs(4))
        .expect("the agent outlived its 1 s drain timeout by far");
    let took = signalled.elapsed();
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the drain timeout"
    );
    let log = cluster.agent_log("a");
    assert!(
        log.lines()
            .any(|l| l.contains("drain timeout") && l.contains("\"cut\":2")),
        "the log does not say two connections were cut:\n{log}"
    );
    // The cut connections see it (they are not left hanging).
    for hold in holds {
        let report = hold_report(hold);
        assert_eq!(report["failed"], 1, "{report}");
    }
}

#[test]
fn a_second_agent_waits_for_the_pins_until_the_first_exits() {
    let cluster = cluster("30s");
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let bpf_before = cluster.admin("a", "/bpf").unwrap();

    let mut second = cluster.spawn_second_agent("a").unwrap();
    let log = cluster.second_agent_log_path("a");
    let waiting = cluster.eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("another agent manages this node's pins")
    });
    assert!(waiting.is_some(), "the second agent did not say it waits");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second agent gave up"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("eBPF dataplane loaded"),
        "the second agent loaded the dataplane while the first ran:\n{text}"
    );
    // The first agent is undisturbed: same pinned state, traffic flows.
    assert_eq!(cluster.admin("a", "/bpf").unwrap(), bpf_before);
    assert!(cluster.transfer("client", dst, 64 * 1024).unwrap().ok);

    // The first dies without a word: the kernel releases its lock, the second takes
    // over and serves.
    cluster.kill_agent("a").unwrap();
    cluster.adopt_agent("a", second);
    cluster.wait_ready("a", Duration::from_secs(20)).unwrap();
    assert!(cluster.transfer("client", dst, 64 * 1024).unwrap().ok);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("this one manages the pins now"),
        "the second agent's log:\n{text}"
    );
}
