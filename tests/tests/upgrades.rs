//! Stopping and replacing a node's agent (issue 17): SIGTERM drains — listeners
//! close, established connections run to their end (or the drain timeout cuts them,
//! and the agent says how many); a second agent on a node takes it over from the
//! running one (the listening sockets pass between them, nothing is refused or cut),
//! or, when the running one does not answer, waits for it to exit before it touches
//! the pinned state.

use std::{
    io::{Read, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use mesh_node::capture::{bpf_sys, dataplane::cgroup_attachments, sk_lookup::attached_links};
use mesh_tests::{
    h2_client::H2Report,
    sim::{host, ClusterSpec, PodSpec, ServiceSpec, SimCluster},
};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
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
fn a_second_agent_waits_for_the_pins_while_the_first_does_not_answer_until_it_exits() {
    let cluster = cluster("30s");
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let bpf_before = cluster.admin("a", "/bpf").unwrap();

    // The first agent hangs: it holds the lock but answers nothing.
    let first = nix::unistd::Pid::from_raw(cluster.agent_pid("a").unwrap() as i32);
    nix::sys::signal::kill(first, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut second = cluster.spawn_second_agent("a").unwrap();
    let log = cluster.second_agent_log_path("a");
    let waiting = cluster.eventually(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("no hand-over; waiting for the running agent to exit")
    });
    assert!(
        waiting.is_some(),
        "the second agent did not give up on the hand-over and wait:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second agent gave up"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("eBPF dataplane loaded"),
        "the second agent loaded the dataplane while the first held the pins:\n{text}"
    );
    nix::sys::signal::kill(first, nix::sys::signal::Signal::SIGCONT).unwrap();
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

/// Sends `text` (and the descriptor `fd`, if any) as one hand-over request and returns
/// the answer ("" when the agent closed without one).
fn ask_for_a_hand_over(cluster: &SimCluster, text: &str, fd: Option<i32>) -> String {
    let conn = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = UnixAddr::new(&cluster.handover_socket("a")).unwrap();
    socket::connect(conn.as_raw_fd(), &addr).unwrap();
    let fds: Vec<i32> = fd.into_iter().collect();
    let rights = [socket::ControlMessage::ScmRights(&fds)];
    let cmsgs: &[socket::ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let iov = [std::io::IoSlice::new(text.as_bytes())];
    socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        cmsgs,
        socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    let tv = nix::sys::time::TimeVal::new(5, 0);
    socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &tv).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = nix::unistd::read(&conn, &mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn hand_over_requests_without_proof_are_refused_counted_and_change_nothing() {
    let cluster = cluster("30s");
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let request = r#"{"type":"request","version":1,"pid":1}"#;

    // No descriptor; a descriptor of another directory; garbage; a wrong version.
    let other_dir = std::fs::File::open("/tmp").unwrap();
    let answers = [
        ask_for_a_hand_over(&cluster, request, None),
        ask_for_a_hand_over(&cluster, request, Some(other_dir.as_raw_fd())),
        ask_for_a_hand_over(&cluster, "\u{0}garbage{{{", None),
        ask_for_a_hand_over(&cluster, r#"{"type":"request","version":99,"pid":1}"#, None),
    ];
    for answer in &answers {
        assert!(
            answer.contains("\"refused\""),
            "a request without proof was not refused: {answer:?}"
        );
        assert!(!answer.contains("listeners"), "{answer}");
    }
    // One that never speaks is dropped after its 2 s.
    let mut silent = UnixStream::connect(cluster.handover_socket("a"));
    if let Ok(s) = silent.as_mut() {
        let _ = s.set_read_timeout(Some(host::scaled(Duration::from_secs(10))));
        let mut buf = [0u8; 64];
        let started = Instant::now();
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"late");
        assert!(started.elapsed() < host::scaled(Duration::from_secs(8)));
    }

    let metrics = cluster.scrape_metrics("a").unwrap();
    let refused = metrics
        .lines()
        .find(|l| {
            l.starts_with("nodemesh_handovers_total{")
                && l.contains("role=\"giver\"")
                && l.contains("outcome=\"refused\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(refused >= Some(4.0), "refusals not counted: {refused:?}");
    // Nothing changed: the agent serves, nothing was handed over or drained.
    let status = cluster.admin("a", "/status").unwrap();
    assert_eq!(status["draining"], false, "{status}");
    assert!(status["handover"]["handed_over_to"].is_null(), "{status}");
    assert!(cluster.transfer("client", dst, 64 * 1024).unwrap().ok);
}

#[test]
fn kill_9_under_load_cuts_the_established_and_serves_again_within_a_second_of_the_restart() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("web", "apps", "b"));
    spec.services = vec![ServiceSpec::new("web", "apps", 80, 8081, &["web"])];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _echo = cluster.serve("server", 8080).unwrap();
    let _web = cluster.http_serve("web", &[8081]).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 4096).unwrap().ok);

    // Long transfers and new connections, as in the upgrade test, then kill -9.
    let scale = host::time_scale();
    let echo = dst.to_string();
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
        &(((64u64 << 20) as f64 / (scale * scale)) as u64).to_string(),
        "--long-seconds",
        "10",
        "--max-seconds",
        "120",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let load = cluster.start_load("client", &args).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill_agent("a").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    cluster.spawn_agent("a").unwrap();
    let back = cluster.eventually(Duration::from_secs(10), || {
        cluster
            .transfer("client", dst, 1024)
            .map(|r| r.ok)
            .unwrap_or(false)
    });
    assert!(back.is_some(), "new connections never worked again");
    let gap = started.elapsed();
    println!("kill -9 under load: the first new connection worked {gap:?} after the agent started");
    std::thread::sleep(Duration::from_secs(1));
    let report = load.finish().unwrap();
    println!(
        "load across kill -9: {}",
        serde_json::to_string(&report).unwrap()
    );
    // What a crash costs, stated: every established connection is cut...
    assert_eq!(report.long.failed, 20, "{report:?}");
    // ...new ones fail while no agent runs, and work again after.
    assert!(report.short.failed > 0, "{report:?}");
    assert!(report.short.ok > 0, "{report:?}");
    // The goal is 1 s (the figure above); the bound leaves room for a loaded machine,
    // where this runs beside other tests.
    assert!(gap < host::scaled(Duration::from_secs(2)), "{gap:?}");
}

/// What the kernel holds for one node's mesh, to compare over time.
#[derive(Debug, Clone, PartialEq)]
struct NodeKernelState {
    /// Per cgroup attach type: the programs attached at the node's cgroup.
    cgroup: Vec<(&'static str, Vec<u32>)>,
    /// Per pod: the sk_lookup programs attached in its namespace.
    sk_lookup: Vec<(String, Vec<u32>)>,
    /// The pinned maps: name and id.
    pinned_maps: Vec<(String, u32)>,
    /// Per pod: how many sockets listen on 15001, 15006 and 15008, over IPv4 and IPv6.
    listeners: Vec<(String, [[usize; 3]; 2])>,
}

const POD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Listening TCP sockets on each of [`POD_PORTS`] in `netns`: IPv4, then IPv6.
fn listening(netns: &std::path::Path) -> [[usize; 3]; 2] {
    host::in_netns(netns, || {
        let mut counts = [[0usize; 3]; 2];
        for (family, table) in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .iter()
            .enumerate()
        {
            let text = std::fs::read_to_string(table)?;
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                    continue;
                };
                let port = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                if *state != "0A" {
                    continue;
                }
                if let Some(i) = POD_PORTS.iter().position(|p| Some(*p) == port) {
                    counts[family][i] += 1;
                }
            }
        }
        Ok(counts)
    })
    .unwrap()
}

fn kernel_state(cluster: &SimCluster, node: &str, pods: &[&str]) -> NodeKernelState {
    let n = cluster.node(node).clone();
    let mut pinned_maps: Vec<(String, u32)> = std::fs::read_dir(n.pin_dir.join("maps"))
        .unwrap()
        .flatten()
        .map(|e| {
            let fd = bpf_sys::obj_get(&e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                bpf_sys::obj_id(&fd).unwrap(),
            )
        })
        .collect();
    pinned_maps.sort();
    NodeKernelState {
        cgroup: cgroup_attachments(&n.cgroup).unwrap(),
        sk_lookup: pods
            .iter()
            .map(|p| {
                let links = attached_links(&cluster.pod(p).netns).unwrap();
                (p.to_string(), links.iter().map(|l| l.prog_id).collect())
            })
            .collect(),
        pinned_maps,
        listeners: pods
            .iter()
            .map(|p| (p.to_string(), listening(&cluster.pod(p).netns)))
            .collect(),
    }
}

/// One agent's programs, attached once each, on the pinned maps: every attach point
/// has one program; every pod one sk_lookup program, the same for all; and the
/// programs share each of their maps (a second load's maps would show as a second id
/// under one name), the pinned ones being the pinned ids.
fn assert_one_load(state: &NodeKernelState) {
    for (attach, ids) in &state.cgroup {
        assert_eq!(ids.len(), 1, "{attach}: one program attached: {state:#?}");
    }
    let sk: Vec<u32> = state
        .sk_lookup
        .iter()
        .map(|(pod, ids)| {
            assert_eq!(ids.len(), 1, "{pod}: one sk_lookup program: {state:#?}");
            ids[0]
        })
        .collect();
    assert!(
        sk.windows(2).all(|w| w[0] == w[1]),
        "one sk_lookup program for every pod: {state:#?}"
    );
    let programs = state
        .cgroup
        .iter()
        .map(|(_, ids)| ids[0])
        .chain(sk.first().copied());
    let mut by_name: std::collections::BTreeMap<String, std::collections::BTreeSet<u32>> =
        Default::default();
    for prog in programs {
        for map in bpf_sys::prog_map_ids(prog).unwrap() {
            let name = bpf_sys::map_name(map).unwrap();
            by_name.entry(name).or_default().insert(map);
        }
    }
    for (name, ids) in &by_name {
        assert_eq!(
            ids.len(),
            1,
            "{name}: maps of two loads in use: {by_name:?}"
        );
    }
    for (name, id) in &state.pinned_maps {
        let short: String = name.chars().take(15).collect();
        if let Some(used) = by_name.get(&short) {
            assert!(
                used.contains(id),
                "{name}: the programs use map {used:?}, not the pinned {id}"
            );
        }
    }
    assert!(
        by_name.contains_key("NM_ENROLLED") && by_name.contains_key("NM_INBOUND_POL"),
        "the programs' maps: {by_name:?}"
    );
}

#[test]
fn two_agents_started_at_once_leave_one_manager_one_attachment_and_nothing_behind() {
    let mut spec = ClusterSpec::two_nodes();
    spec.agent_args
        .extend(["--drain-timeout".to_string(), "5s".to_string()]);
    spec.pods.push(PodSpec::new("neighbour", "apps", "a"));
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agent("b").unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let pods = ["client", "neighbour"];
    let pin_dir = cluster.node("a").pin_dir.clone();
    let mut kept: Option<NodeKernelState> = None;

    // First on a node with no pins, then on the pins the first round left.
    for round in ["no pins yet", "pins of an earlier agent"] {
        cluster.spawn_agent("a").unwrap();
        let mut second = cluster.spawn_second_agent("a").unwrap();
        let first = cluster.agent_pid("a").unwrap();
        let pids = [first, second.id()];

        // One takes the node over from the other, which drains (it waits for SIGTERM).
        let mut manager = None;
        let settled = cluster.eventually(Duration::from_secs(30), || {
            let Ok(status) = cluster.admin("a", "/status") else {
                return false;
            };
            let from = status["handover"]["took_over_from"].as_u64();
            let holder = mesh_node::capture::pin_lock::holder(&pin_dir);
            manager = holder;
            status["ready"] == true
                && from.is_some_and(|f| pids.contains(&(f as u32)))
                && holder.is_some_and(|h| pids.contains(&h) && Some(h as u64) != from)
        });
        assert!(
            settled.is_some(),
            "{round}: no agent took the node over from the other; logs:\n{}\n---\n{}",
            cluster.agent_log("a"),
            std::fs::read_to_string(cluster.second_agent_log_path("a")).unwrap_or_default()
        );
        let manager = manager.unwrap();
        let logs = [
            cluster.agent_log("a"),
            std::fs::read_to_string(cluster.second_agent_log_path("a")).unwrap_or_default(),
        ];
        for (pid, log) in pids.iter().zip(&logs) {
            let said: Vec<String> = log
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| v["message"].as_str().map(str::to_owned))
                .filter(|m| {
                    [
                        "loaded and",
                        "took the node over",
                        "manages the pins",
                        "asking it",
                    ]
                    .iter()
                    .any(|k| m.contains(k))
                })
                .collect();
            println!("{round}: agent {pid} (manager {manager}): {said:?}");
        }
        let state = kernel_state(&cluster, "a", &pods);
        assert_one_load(&state);
        for (pod, counts) in &state.listeners {
            assert_eq!(
                counts,
                &[[1, 1, 1]; 2],
                "{round}: {pod}'s listeners: {state:#?}"
            );
        }
        assert_eq!(state.pinned_maps.len(), 7, "{round}: {state:#?}");
        if let Some(kept) = &kept {
            assert_eq!(
                kept.pinned_maps, state.pinned_maps,
                "{round}: the pinned maps were reused"
            );
        }
        for _ in 0..3 {
            let r = cluster.transfer("client", dst, 256 * 1024).unwrap();
            assert!(r.ok, "{round}: {r:?}");
        }

        // The drained one exits on SIGTERM; nothing of the manager's changes.
        if manager == first {
            // The second handed over to the node's first agent: stop the second.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(second.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let deadline = Instant::now() + host::scaled(Duration::from_secs(10));
            let status = loop {
                if let Some(s) = second.try_wait().unwrap() {
                    break s;
                }
                assert!(Instant::now() < deadline, "{round}: the giver did not exit");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(status.success(), "{round}: {status}");
        } else {
            // The node's first agent handed over to the second: stop the first and
            // make the second the node's agent.
            cluster.terminate_agent("a").unwrap();
            let status = cluster
                .wait_agent_exit("a", Duration::from_secs(10))
                .expect("the agent that handed over did not exit on SIGTERM");
            assert!(status.success(), "{round}: {status}");
            cluster.adopt_agent("a", second);
        }
        let after = kernel_state(&cluster, "a", &pods);
        assert_eq!(
            after, state,
            "{round}: the giver's exit changed the kernel state"
        );
        assert_eq!(
            mesh_node::capture::pin_lock::holder(&pin_dir),
            Some(manager)
        );
        assert!(cluster.transfer("client", dst, 64 * 1024).unwrap().ok);

        // The manager exits: its listeners close; the pinned links and maps stay, one
        // of each, for the next agent.
        cluster.terminate_agent("a").unwrap();
        let status = cluster
            .wait_agent_exit("a", Duration::from_secs(10))
            .expect("the managing agent did not exit on SIGTERM");
        assert!(status.success(), "{round}: {status}");
        let gone = kernel_state(&cluster, "a", &pods);
        for (pod, counts) in &gone.listeners {
            assert_eq!(
                counts,
                &[[0, 0, 0]; 2],
                "{round}: {pod} kept a listener: {gone:#?}"
            );
        }
        assert_eq!(gone.cgroup, state.cgroup, "{round}");
        assert_eq!(gone.sk_lookup, state.sk_lookup, "{round}");
        assert_eq!(gone.pinned_maps, state.pinned_maps, "{round}");
        assert_eq!(mesh_node::capture::pin_lock::holder(&pin_dir), None);
        kept = Some(gone);
    }
}

#[test]
fn a_newcomer_changes_no_pin_before_it_holds_the_lock() {
    let cluster = cluster("5s");
    cluster.start_agent("b").unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    // Node a's managing agent is starting: it holds the lock and has made the map
    // directory, but has pinned nothing yet.
    let pin_dir = cluster.node("a").pin_dir.clone();
    let maps = pin_dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let holder = std::fs::File::open(&pin_dir).unwrap();
    let lock = nix::fcntl::Flock::lock(holder, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();

    cluster.spawn_agent("a").unwrap();
    let asking = cluster.eventually(Duration::from_secs(20), || {
        cluster
            .agent_log("a")
            .contains("another agent manages this node's pins; asking it to hand over")
    });
    assert!(asking.is_some(), "{}", cluster.agent_log("a"));
    std::thread::sleep(Duration::from_millis(500));
    let pinned = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        pinned(&maps),
        Vec::<String>::new(),
        "the newcomer pinned maps while another agent held the lock:\n{}",
        cluster.agent_log("a")
    );
    assert_eq!(pinned(&pin_dir.join("links")), Vec::<String>::new());
    assert!(
        cluster
            .agent_log("a")
            .contains("eBPF programs are loaded once the node is taken over"),
        "{}",
        cluster.agent_log("a")
    );

    // The holder goes: the newcomer takes the lock, pins, attaches and serves.
    drop(lock);
    cluster.wait_ready("a", Duration::from_secs(20)).unwrap();
    assert_eq!(pinned(&maps).len(), 7, "{:?}", pinned(&maps));
    let r = cluster.transfer("client", dst, 64 * 1024).unwrap();
    assert!(r.ok, "{r:?}");
}

#[test]
fn http2_clients_get_goaway_from_the_handing_over_agent_and_lose_no_request() {
    let (cluster, _web) = SimCluster::web_behind_a_route("30s").unwrap();
    let vip = cluster.service("web").addr4().to_string();

    // A client application keeps one HTTP/2 connection through the route and sends a
    // request every 10 ms, for 3 s before the upgrade and 3 s after.
    let seconds = host::scaled(Duration::from_secs(6)).as_secs_f64();
    let args: Vec<String> = [
        "--connect",
        &vip,
        "--host",
        "web",
        "--seconds",
        &seconds.to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let client = cluster.start_testapp("client", "h2-client", &args).unwrap();
    let client_started = Instant::now();
    std::thread::sleep(host::scaled(Duration::from_secs(3)));
    let upgrade_at = client_started.elapsed();
    let (old, took) = cluster
        .hand_over_agent("a", Duration::from_secs(20))
        .unwrap();
    let out = client.wait_with_output().unwrap();
    let report: H2Report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no h2-client report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    println!("HTTP/2 across a hand-over (taken over after {took:?}): {report:?}");

    // The old agent told the client's connection to go away (GOAWAY), once, after the
    // upgrade began; the client moved to a new connection, served by the new agent,
    // and every request was answered.
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.goaways, 1, "{report:?}");
    assert_eq!(report.connections, 2, "{report:?}");
    let at = Duration::from_millis(report.goaway_at_ms[0]);
    assert!(
        at >= upgrade_at,
        "a GOAWAY at {at:?}, before the upgrade at {upgrade_at:?}"
    );
    assert!(
        report.ok >= (200.0 / host::time_scale()) as u64,
        "too few requests answered: {report:?}"
    );
    old.terminate().unwrap();
    let mut old = old;
    let status = old
        .wait_exit(Duration::from_secs(10))
        .expect("the old agent did not exit once its connections ended");
    assert!(status.success(), "{status}");
}
