//! End-to-end: map hygiene under churn, restarts, and failing clearly.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh_node::{
    capture::bpf_sys, capture::dataplane::cgroup_attachments, capture::sk_lookup::attached_links,
};
use mesh_tests::sim::{host, host::scaled, ClusterSpec, PodSpec, SimCluster};

const OUTBOUND_LISTENER: &str = "127.0.0.1:15001";

#[test]
fn after_ten_thousand_short_connections_every_map_is_back_to_baseline() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let baseline_a = cluster.map_entries("a").unwrap();
    let baseline_b = cluster.map_entries("b").unwrap();

    let churn = cluster
        .churn("client", cluster.pod("server").addr4(8080), 10_000)
        .unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
    assert_eq!(churn.succeeded, 10_000);

    for (node, baseline) in [("a", &baseline_a), ("b", &baseline_b)] {
        let settled = cluster.eventually(Duration::from_secs(3), || {
            cluster.map_entries(node).unwrap() == *baseline
        });
        assert!(
            settled.is_some(),
            "node {node}: maps {:?} did not return to {baseline:?}",
            cluster.map_entries(node).unwrap()
        );
    }
    let outbound = cluster
        .closed_connections("a")
        .unwrap()
        .iter()
        .filter(|c| c["direction"] == "outbound")
        .count();
    assert!(
        outbound >= 4000,
        "the proxy saw the churn ({outbound} kept in history)"
    );
}

fn pinned_map_id(pin_dir: &Path, map: &str) -> u32 {
    let fd = bpf_sys::obj_get(&pin_dir.join("maps").join(map)).expect("pinned map");
    bpf_sys::obj_id(&fd).expect("map id")
}

#[test]
fn a_killed_agent_restarts_on_its_pinned_state_with_one_attachment_per_program() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let node = cluster.node("a").clone();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);

    let maps_before: Vec<u32> = ["NM_ENROLLED", "NM_ORIG_DST", "NM_PARKED"]
        .iter()
        .map(|m| pinned_map_id(&node.pin_dir, m))
        .collect();
    let attached_before = cgroup_attachments(&node.cgroup).unwrap();

    cluster.kill_agent("a").unwrap();
    // Redirection stays in the kernel while the agent is gone: connections fail closed
    // instead of bypassing the mesh.
    let down = cluster.transfer("client", dst, 1024).unwrap();
    assert!(
        !down.ok,
        "with the agent down the connection must not bypass it: {down:?}"
    );

    cluster.start_agent("a").unwrap();
    let took = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .transfer("client", dst, 1024)
            .map(|r| r.ok)
            .unwrap_or(false)
    });
    let took = took.expect("connections never worked again after the restart");
    eprintln!("first connection after ready succeeded after {took:?}");
    assert!(
        took < scaled(Duration::from_secs(1)),
        "took {took:?} after ready"
    );
    let report = cluster.transfer("client", dst, 1024).unwrap();
    assert_eq!(report.peer.as_deref(), Some(OUTBOUND_LISTENER));

    let maps_after: Vec<u32> = ["NM_ENROLLED", "NM_ORIG_DST", "NM_PARKED"]
        .iter()
        .map(|m| pinned_map_id(&node.pin_dir, m))
        .collect();
    assert_eq!(maps_before, maps_after, "the pinned maps were reused");
    let bpf = cluster.admin("a", "/bpf").unwrap();
    assert_eq!(bpf["reused_pins"], true);

    let attached_after = cgroup_attachments(&node.cgroup).unwrap();
    for ((attach, before), (_, after)) in attached_before.iter().zip(&attached_after) {
        assert_eq!(before.len(), 1, "{attach} before the restart: {before:?}");
        assert_eq!(after.len(), 1, "{attach} after the restart: {after:?}");
        assert_ne!(
            before, after,
            "{attach}: the new program was swapped into the link"
        );
    }
}

/// Starts mesh-node with the node's usual flags, some replaced by `overrides`, and
/// returns its stderr after checking it failed without panicking.
fn failing_start(cluster: &SimCluster, overrides: &[(&str, &str)], as_nobody: bool) -> String {
    let node = cluster.node("a");
    let mut flags = vec![
        ("--node-name", "a".to_string()),
        (
            "--manifests",
            cluster.manifests.to_string_lossy().into_owned(),
        ),
        ("--cgroup-root", node.cgroup.to_string_lossy().into_owned()),
        ("--pin-dir", node.pin_dir.to_string_lossy().into_owned()),
        ("--node-netns", node.netns.to_string_lossy().into_owned()),
    ];
    for (flag, value) in overrides {
        flags.retain(|(f, _)| f != flag);
        flags.push((flag, value.to_string()));
    }
    let mut full = vec!["agent"];
    for (flag, value) in &flags {
        full.push(flag);
        full.push(value);
    }
    let args = overrides;
    let mut cmd = if as_nobody {
        // std switches uid before pre_exec hooks run, so an unprivileged process cannot
        // join the node's cgroup; it fails its privilege check before touching anything.
        let mut cmd = std::process::Command::new(cluster.mesh_node_bin());
        cmd.args(&full).uid(65534).gid(65534);
        cmd
    } else {
        cluster.mesh_node_command(node, &full).unwrap()
    };
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "mesh-node {args:?} should fail; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn missing_privileges_bpffs_or_object_fail_with_one_clear_error() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();

    let err = failing_start(&cluster, &[], true);
    assert!(
        err.contains("must run as root") && err.contains("CAP_BPF"),
        "{err}"
    );

    let err = failing_start(&cluster, &[("--pin-dir", "/tmp/nodemesh-not-bpffs")], false);
    assert!(
        err.contains("not on a bpf filesystem") && err.contains("mount -t bpf"),
        "{err}"
    );

    let err = failing_start(
        &cluster,
        &[("--ebpf-object", "/nonexistent/mesh-ebpf.o")],
        false,
    );
    assert!(
        err.contains("cannot read the eBPF object") && err.contains("cargo xtask build"),
        "{err}"
    );

    let err = failing_start(&cluster, &[("--cgroup-root", "/nonexistent-cgroup")], false);
    assert!(err.contains("cgroup root"), "{err}");
}

/// A server the test owns inside a pod's namespace: it counts every connection the
/// kernel hands it, i.e. every connection that reached the application.
struct CountingServer {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CountingServer {
    fn start(netns: &Path, port: u16) -> CountingServer {
        let file = std::fs::File::open(netns).expect("pod netns");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // [::] with IPV6_V6ONLY off (Linux's default): IPv4 and IPv6.
            let listener = TcpListener::bind(("::", port)).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        drop(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server listening");
        CountingServer { accepted, stop }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Plaintext connects from inside `netns` to each target, a round every 10 ms, until at
/// least `min_rounds` rounds have run and `period` has passed (a loaded machine makes
/// rounds slower, never fewer), for at most a minute: how many connects succeeded per
/// target, and how many rounds ran. A refused connect is answered at once (RST); the
/// 1 s connect timeout only matters for a target that silently drops.
fn probe_plaintext(
    netns: &Path,
    targets: Vec<SocketAddr>,
    period: Duration,
    min_rounds: usize,
) -> (Vec<usize>, usize) {
    host::in_netns(netns, move || {
        let mut connected = vec![0; targets.len()];
        let mut rounds = 0;
        let started = Instant::now();
        let cap = started + Duration::from_secs(60);
        while (rounds < min_rounds || started.elapsed() < period) && Instant::now() < cap {
            for (i, target) in targets.iter().enumerate() {
                if let Ok(mut s) = TcpStream::connect_timeout(target, Duration::from_secs(1)) {
                    connected[i] += 1;
                    let _ = s.write_all(b"plaintext probe");
                }
            }
            rounds += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((connected, rounds))
    })
    .unwrap()
}

fn mesh_manifest(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: apps\nspec:\n{spec}"
    )
}

/// Port of the echo servers (`mesh-testapp serve`) the meshed checks use.
const ECHO_PORT: u16 = 8080;
/// Port of the counting servers the plaintext probes target.
const PROBE_PORT: u16 = 7000;

#[test]
fn policy_holds_while_a_killed_agent_is_down_and_traffic_resumes_when_it_starts() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("web", "apps", "b"));
    spec.pods.push(PodSpec::new("open", "apps", "b"));
    spec.pods.push(PodSpec::new("other", "apps", "a"));
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _echo: Vec<_> = ["server", "web", "open"]
        .iter()
        .map(|p| cluster.serve(p, ECHO_PORT).unwrap())
        .collect();
    let counting: Vec<CountingServer> = ["server", "web", "open"]
        .iter()
        .map(|p| CountingServer::start(&cluster.pod(p).netns, PROBE_PORT))
        .collect();
    let echo = |p: &str| cluster.pod(p).addr4(ECHO_PORT);
    let probe = |p: &str| cluster.pod(p).addr4(PROBE_PORT);

    // `server` STRICT; `web` only for apps/client; `open` PERMISSIVE, no policy.
    let policies = [
        mesh_manifest(
            "PeerAuthentication",
            "server-strict",
            "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT\n",
        ),
        "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-client-only, namespace: apps}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from: [{principals: [\"spiffe://cluster.local/ns/apps/sa/client\"]}]\n"
            .to_string(),
    ];
    cluster
        .write_manifest("restart-policies.yaml", &policies.join("---\n"))
        .unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        !cluster
            .transfer("bystander", echo("server"), 16)
            .unwrap()
            .ok
            && !cluster.transfer("bystander", echo("web"), 16).unwrap().ok
            && !cluster.transfer("other", echo("web"), 16).unwrap().ok
    });
    assert!(applied.is_some(), "the policies never applied");
    assert!(cluster.transfer("client", echo("web"), 64).unwrap().ok);
    assert!(cluster.transfer("client", echo("server"), 64).unwrap().ok);
    assert!(cluster.transfer("bystander", echo("open"), 64).unwrap().ok);

    let before: Vec<usize> = counting.iter().map(CountingServer::accepted).collect();
    cluster.kill_agent("b").unwrap();
    let bystander = cluster.pod("bystander").netns.clone();
    let (connected, rounds) = probe_plaintext(
        &bystander,
        vec![probe("server"), probe("web"), probe("open")],
        Duration::from_secs(2),
        50,
    );
    // A meshed caller the policy does not allow, during the gap as well.
    for _ in 0..3 {
        let r = cluster.transfer("other", probe("web"), 16).unwrap();
        assert!(!r.ok, "other reached web with b's agent down: {r:?}");
    }
    let during: Vec<usize> = counting.iter().map(CountingServer::accepted).collect();
    eprintln!("agent down: {rounds} probe rounds, connects {connected:?}, app accepts {before:?} -> {during:?}");
    assert!(rounds >= 50, "the probe loop ran ({rounds} rounds)");
    assert_eq!(
        connected[0], 0,
        "plaintext reached the STRICT pod with no agent"
    );
    assert_eq!(during[0], before[0], "the STRICT pod's app saw plaintext");
    assert_eq!(
        connected[1], 0,
        "a caller the policy does not allow reached web"
    );
    assert_eq!(
        during[1], before[1],
        "web's app saw a caller it does not allow"
    );
    assert_eq!(
        connected[2], rounds,
        "the PERMISSIVE pod with no policy stays reachable"
    );
    assert_eq!(during[2] - before[2], rounds, "its app saw every probe");

    let started = Instant::now();
    cluster.spawn_agent("b").unwrap();
    let took = cluster.eventually(Duration::from_secs(10), || {
        cluster
            .transfer("client", echo("server"), 64)
            .map(|r| r.ok)
            .unwrap_or(false)
    });
    assert!(took.is_some(), "meshed connections never worked again");
    let gap = started.elapsed();
    eprintln!("kill -9 gap: first meshed connection {gap:?} after the agent started");
    assert!(gap < scaled(Duration::from_secs(5)), "{gap:?}");
    cluster.wait_ready("b", Duration::from_secs(20)).unwrap();

    // The agent enforces the same policies again.
    assert!(cluster.transfer("client", echo("web"), 64).unwrap().ok);
    assert!(!cluster.transfer("other", echo("web"), 64).unwrap().ok);
    assert!(
        !cluster
            .transfer("bystander", echo("server"), 64)
            .unwrap()
            .ok
    );
    assert!(cluster.transfer("bystander", echo("open"), 64).unwrap().ok);
    // Outbound from node a's pods failed closed while its agent was down, which the
    // restart test above checks; node b's own outbound fails closed the same way.
    cluster.kill_agent("b").unwrap();
    let _client_echo = cluster.serve("client", ECHO_PORT).unwrap();
    let down = cluster
        .transfer("server", cluster.pod("client").addr4(ECHO_PORT), 64)
        .unwrap();
    assert!(!down.ok, "outbound bypassed the dead agent: {down:?}");
}

fn pinned_links(pin_dir: &Path) -> Vec<u64> {
    let mut cookies: Vec<u64> = std::fs::read_dir(pin_dir.join("links/sk_lookup"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    cookies.sort();
    cookies
}

fn netns_cookie(cluster: &SimCluster, node: &str, pod: &str) -> u64 {
    let workloads = cluster.admin(node, "/workloads").unwrap();
    workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == pod)
        .and_then(|w| w["netns_cookie"].as_u64())
        .unwrap_or_else(|| panic!("{pod} is not enrolled: {workloads:#}"))
}

#[test]
fn a_restart_takes_over_the_pinned_sk_lookup_links_and_pods_that_leave_take_theirs() {
    let mut spec = ClusterSpec::two_nodes();
    spec.namespaces.push(("transient".into(), true));
    spec.pods.push(PodSpec::new("leaver", "transient", "b"));
    spec.pods.push(PodSpec::new("doomed", "apps", "b"));
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let node = cluster.node("b").clone();
    let pods = ["server", "leaver", "doomed"];
    let enrolled = cluster.eventually(Duration::from_secs(5), || {
        pinned_links(&node.pin_dir).len() == pods.len()
    });
    assert!(
        enrolled.is_some(),
        "one pin per enrolled pod: {:?}",
        pinned_links(&node.pin_dir)
    );
    let cookies: Vec<u64> = pods
        .iter()
        .map(|p| netns_cookie(&cluster, "b", p))
        .collect();
    let mut sorted = cookies.clone();
    sorted.sort();
    assert_eq!(
        pinned_links(&node.pin_dir),
        sorted,
        "pins named by netns cookie"
    );
    let links = |pod: &str| attached_links(&cluster.pod(pod).netns).unwrap();
    let before: Vec<_> = pods
        .iter()
        .map(|p| {
            let l = links(p);
            assert_eq!(l.len(), 1, "{p}: one sk_lookup attachment: {l:?}");
            l[0]
        })
        .collect();

    cluster.kill_agent("b").unwrap();
    for (p, b) in pods.iter().zip(&before) {
        assert_eq!(
            links(p),
            vec![*b],
            "{p}: the pinned link outlives the agent"
        );
    }
    // A pod that goes away while no agent runs: the kernel detaches its link; the
    // next agent removes the pin.
    cluster.destroy_pod_netns("doomed").unwrap();

    cluster.start_agent("b").unwrap();
    for (p, b) in pods.iter().zip(&before).take(2) {
        let after = links(p);
        assert_eq!(
            after.len(),
            1,
            "{p}: one attachment after the restart: {after:?}"
        );
        assert_eq!(
            after[0].link_id, b.link_id,
            "{p}: the pinned link was taken over"
        );
        assert_ne!(
            after[0].prog_id, b.prog_id,
            "{p}: the new program was swapped in"
        );
    }
    let stale_gone = cluster.eventually(Duration::from_secs(5), || {
        !pinned_links(&node.pin_dir).contains(&cookies[2])
    });
    assert!(
        stale_gone.is_some(),
        "the pin of a namespace that is gone stayed"
    );

    cluster.set_namespace_enrolled("transient", false).unwrap();
    let unpinned = cluster.eventually(Duration::from_secs(5), || {
        pinned_links(&node.pin_dir) == vec![cookies[0]]
    });
    assert!(
        unpinned.is_some(),
        "the leaving pod's pin stayed: {:?}",
        pinned_links(&node.pin_dir)
    );
    // Detached once its listeners have drained.
    let detached = cluster.eventually(Duration::from_secs(20), || links("leaver").is_empty());
    assert!(detached.is_some(), "leaver: {:?}", links("leaver"));
    assert_eq!(links("server").len(), 1);

    let remaining = links("server")[0].link_id;
    drop(cluster);
    let leaked: Vec<_> = bpf_sys::sk_lookup_links()
        .unwrap()
        .into_iter()
        .filter(|l| l.link_id == remaining || before.iter().any(|b| b.link_id == l.link_id))
        .collect();
    assert!(
        leaked.is_empty(),
        "links left after the cluster ended: {leaked:?}"
    );
}
