//! Idle, slow and greedy clients against every listener the agent and the CA own: the
//! metrics and readiness listeners (any pod reaches them), the L7 node proxy, the CA,
//! the per-pod proxying budget, and HBONE's HTTP/2 limits. Each attack reports the
//! agent's (or CA's) descriptors and memory before, during and after.

mod h2raw;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use mesh_node::{
    hbone::tls::static_client_config, identity::ca::authority::new_csr,
    identity::ca::authority::CertificateAuthority, identity::ca::client::CaClient,
    identity::spiffe::TrustBundle, identity::Identity,
};
use mesh_tests::{
    conn_flood::FloodMode,
    sim::{
        host,
        usage::{process_usage, Usage},
        ClusterSpec, PodSpec, ServiceSpec, SimCluster,
    },
};

use h2raw::RawH2;

/// The agent's and CA's default header/handshake timeout (`--header-timeout`,
/// `mesh-node ca --handshake-timeout`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors the agent may hold above its baseline once an attack is over
/// (pooled connections come and go).
const FD_SLACK: usize = 16;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// The value of one sample (`name{labels}`, exactly as exposed) on a node's agent.
fn metric(cluster: &SimCluster, node: &str, sample: &str) -> f64 {
    let (_, text) = cluster.admin_raw(node, "GET", "/stats/prometheus").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn refused(cluster: &SimCluster, node: &str, reason: &str) -> f64 {
    metric(
        cluster,
        node,
        &format!("nodemesh_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// Samples a process's usage every 20 ms from the start of an attack until `finish`,
/// keeping the highest descriptor and memory figures.
struct Peak {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<Usage>,
}

impl Peak {
    fn watch(pid: u32) -> Peak {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut top = Usage { fds: 0, rss_kib: 0 };
            while !flag.load(Ordering::Relaxed) {
                if let Ok(u) = process_usage(pid) {
                    top.fds = top.fds.max(u.fds);
                    top.rss_kib = top.rss_kib.max(u.rss_kib);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            top
        });
        Peak { stop, sampler }
    }

    fn finish(self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap()
    }
}

/// Waits until descriptors are back within `FD_SLACK` of `baseline`: how long it took
/// and the usage then.
fn back_to_baseline(
    cluster: &SimCluster,
    baseline: Usage,
    mut usage: impl FnMut() -> Usage,
) -> (Duration, Usage) {
    let mut last = usage();
    let took = cluster.eventually(Duration::from_secs(20), || {
        last = usage();
        last.fds <= baseline.fds + FD_SLACK
    });
    let took =
        took.unwrap_or_else(|| panic!("not back to baseline ({baseline}) after 20 s: {last}"));
    (took, last)
}

fn report_during(attack: &str, before: Usage, during: Usage, legit: &str) {
    eprintln!("[{attack}] before: {before}; during (peak): {during}; legitimate: {legit}");
}

fn report_after(attack: &str, after: Usage, took: Duration) {
    eprintln!(
        "[{attack}] after: {after}; back to baseline {} ms after the attacker left",
        took.as_millis()
    );
}

#[test]
fn idle_floods_on_metrics_and_readiness_leave_the_agent_bounded_and_serving() {
    const ATTACK: &str = "idle flood on :15020 and :15021";
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let target = cluster.pod("server").addr4(8080);
    let warm = cluster.churn("client", target, 20).unwrap();
    assert_eq!(warm.failed, 0, "{warm:?}");
    let usage = || cluster.agent_usage("a").unwrap();
    let before = usage();
    let peak = Peak::watch(cluster.agent_pid("a").unwrap());

    // A pod outside the mesh opens up to 10,000 idle connections to each listener
    // (both at once; opening gives up after 15 s).
    let attack_started = Instant::now();
    let node: IpAddr = cluster.node("a").ipv4.into();
    let bystander = cluster.pod("bystander").placement();
    let floods = cluster
        .floods(&[15020, 15021].map(|port| {
            let dst = SocketAddr::new(node, port);
            (bystander.clone(), dst, 10_000, FloodMode::Idle, 45)
        }))
        .unwrap();

    // Legitimate traffic meanwhile: new mesh connections, and the kubelet's probe.
    let legit = cluster.churn("client", target, 300).unwrap();
    let probe = cluster.readiness_probe("a", "GET", "/healthz/ready");
    // The connections the agent did accept are closed at the header timeout, while
    // the attacker still holds its side.
    let released = cluster.eventually(HEADER_TIMEOUT + Duration::from_secs(5), || {
        usage().fds <= before.fds + FD_SLACK
    });
    let during = peak.finish();
    let legit_text = format!(
        "{} of 300 new mesh connections failed; probe {:?}; agent released the attacker's connections {:?} after the attack began",
        legit.failed,
        probe.as_ref().map(|p| p.0),
        released.map(|_| attack_started.elapsed())
    );
    report_during(ATTACK, before, during, &legit_text);
    for f in &floods {
        eprintln!("[{ATTACK}] attacker: {:?}", f.opened);
        assert!(
            f.opened.opened >= 1_000,
            "the attack did not happen: {:?}",
            f.opened
        );
    }
    assert_eq!(legit.failed, 0, "legitimate connections failed: {legit:?}");
    assert!(
        matches!(probe, Ok((200, _))),
        "the node's own probe was refused: {probe:?}"
    );
    assert!(
        during.fds <= before.fds + 500,
        "the agent held the attacker's connections: {before} -> {during}"
    );
    assert!(
        during.rss_kib <= before.rss_kib + 64 * 1024,
        "the agent's memory grew: {before} -> {during}"
    );
    assert!(
        released.is_some(),
        "the agent still held idle connections {:?} after the attack began",
        attack_started.elapsed()
    );
    let limited = metric(
        &cluster,
        "a",
        "nodemesh_listener_refused_total{listener=\"metrics\",reason=\"source_limit\"}",
    );
    assert!(limited > 0.0, "refusals at the cap are not counted");
    let timeouts = metric(
        &cluster,
        "a",
        "nodemesh_listener_timeouts_total{listener=\"readiness\",stage=\"header\"}",
    );
    assert!(timeouts > 0.0, "header timeouts are not counted");
    // Every attacker connection was closed by the agent: refused at the cap, or cut at
    // the header timeout (the attacker gives up opening after 15 s).
    for f in floods {
        let r = f.finish().unwrap();
        eprintln!("[{ATTACK}] attacker at the end: {r:?}");
        assert_eq!(r.still_open, 0, "idle connections kept open: {r:?}");
        let last = r.closed_after_ms_max.unwrap_or(u64::MAX);
        assert!(
            last <= (HEADER_TIMEOUT + Duration::from_secs(3)).as_millis() as u64,
            "an idle connection was closed only {last} ms after it opened"
        );
    }
    let (took, after) = back_to_baseline(&cluster, before, usage);
    report_after(ATTACK, after, took);
}

fn route_yaml(service: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {service}\n  namespace: apps\n\
         spec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {service}\n    port: 80\n  rules:\n  - backendRefs:\n    - name: {service}\n      port: 80\n"
    )
}

#[test]
fn a_slowloris_on_an_http_routed_service_is_cut_at_the_header_timeout() {
    let mut spec = ClusterSpec::two_nodes();
    spec.services = vec![ServiceSpec::new("web", "apps", 80, 8080, &["server"])];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("server", &[8080]).unwrap();
    cluster
        .write_manifest("httproutes.yaml", &route_yaml("web"))
        .unwrap();
    let vip = cluster.service("web").addr4();
    let routed = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .http("client", vip, "web", "/", &[])
            .is_ok_and(|r| r.errors == 0)
            && !cluster.request_logs("a").is_empty()
    });
    assert!(routed.is_some(), "the HTTPRoute never took effect");
    const ATTACK: &str = "slowloris on the L7 proxy";
    let usage = || cluster.agent_usage("a").unwrap();
    let before = usage();
    let peak = Peak::watch(cluster.agent_pid("a").unwrap());

    // An enrolled pod sends its request heads at one byte per second.
    let slow = cluster
        .flood("client", vip, 100, FloodMode::Slowloris, 25)
        .unwrap();
    let legit = cluster
        .http("client", vip, "web", "/", &["--count", "20"])
        .unwrap();
    let result = slow.finish().unwrap();
    let during = peak.finish();
    let legit_text = format!("{} of 20 requests failed", legit.errors);
    report_during(ATTACK, before, during, &legit_text);
    eprintln!("[{ATTACK}] attacker: {result:?}");
    assert_eq!(result.opened, 100, "{result:?}");
    assert_eq!(legit.errors, 0, "legitimate requests failed: {legit:?}");
    assert_eq!(
        result.still_open, 0,
        "slow request heads kept connections open: {result:?}"
    );
    let (first, last) = (
        result.closed_after_ms_min.unwrap_or(0),
        result.closed_after_ms_max.unwrap_or(u64::MAX),
    );
    let timeout = HEADER_TIMEOUT.as_millis() as u64;
    assert!(
        first >= timeout - 2_000 && last <= timeout + 3_000,
        "closed between {first} and {last} ms, not at the {timeout} ms header timeout"
    );
    let counted = metric(
        &cluster,
        "a",
        "nodemesh_listener_timeouts_total{listener=\"http\",stage=\"header\"}",
    );
    assert!(counted >= 100.0, "header timeouts counted: {counted}");
    let (took, after) = back_to_baseline(&cluster, before, usage);
    report_after(ATTACK, after, took);
}

#[test]
fn the_ca_times_out_silent_and_stalled_handshakes_and_keeps_signing() {
    const ATTACK: &str = "silent and stalled TLS on the CA";
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let pid = cluster.ca_pid().unwrap();
    let usage = || process_usage(pid).unwrap();
    let before = usage();
    let peak = Peak::watch(pid);
    let ca = cluster.ca_addr();

    // Two pods outside the mesh: one connects and says nothing, the other sends a
    // ClientHello and then nothing.
    let silent = cluster
        .flood("outsider", ca, 3_000, FloodMode::Idle, 30)
        .unwrap();
    let hellos = cluster
        .flood("bystander", ca, 300, FloodMode::TlsHello, 30)
        .unwrap();

    // Meanwhile an agent asks for a certificate.
    let root = std::fs::read_to_string(cluster.ca_dir().join("root/root.pem")).unwrap();
    let token = std::fs::read_to_string(cluster.node_token_file("b").unwrap()).unwrap();
    let started = Instant::now();
    let signed = host::in_netns(&cluster.node("b").netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async move {
            let client = CaClient::new(ca, None, &root, &token).map_err(|e| e.to_string())?;
            let (_key, csr) = new_csr(&id("apps", "server")).map_err(|e| e.to_string())?;
            client
                .sign(&id("apps", "server"), &csr)
                .await
                .map_err(|e| e.to_string())
        }))
    })
    .unwrap();
    let signing = started.elapsed();
    let results = [("silent", silent), ("ClientHello", hellos)]
        .map(|(what, flood)| (what, flood.finish().unwrap()));
    let during = peak.finish();
    let legit_text = format!(
        "certificate {} in {} ms",
        if signed.is_ok() {
            "issued"
        } else {
            "NOT issued"
        },
        signing.as_millis()
    );
    report_during(ATTACK, before, during, &legit_text);
    assert!(
        signed.is_ok(),
        "no certificate during the flood: {signed:?}"
    );
    assert!(signing < Duration::from_secs(3), "signing took {signing:?}");
    for (what, r) in results {
        eprintln!("[{ATTACK}] {what} attacker: {r:?}");
        assert!(r.opened >= 100, "the attack did not happen: {r:?}");
        assert_eq!(r.still_open, 0, "{what} connections kept open: {r:?}");
        let last = r.closed_after_ms_max.unwrap_or(u64::MAX);
        assert!(
            last <= (HEADER_TIMEOUT + Duration::from_secs(3)).as_millis() as u64,
            "{what} connections were closed only after {last} ms"
        );
    }
    assert!(
        during.fds <= before.fds + 300,
        "the CA held the attacker's connections: {before} -> {during}"
    );
    let (took, after) = back_to_baseline(&cluster, before, usage);
    report_after(ATTACK, after, took);
}

#[test]
fn a_pod_at_its_connection_bound_is_refused_while_another_pod_is_unaffected() {
    const BOUND: usize = 64;
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("client2", "apps", "a"));
    spec.pods.push(PodSpec::new("server2", "apps", "b"));
    spec.agent_args = vec!["--max-connections-per-pod".into(), BOUND.to_string()];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _servers = [
        cluster.serve("server", 8080).unwrap(),
        cluster.serve("server2", 8080).unwrap(),
    ];
    let (target, target2) = (
        cluster.pod("server").addr4(8080),
        cluster.pod("server2").addr4(8080),
    );
    for (pod, dst) in [("client", target), ("client2", target2)] {
        assert_eq!(cluster.churn(pod, dst, 5).unwrap().failed, 0);
    }
    const ATTACK: &str = "one pod at its connection bound";
    let usage = || cluster.agent_usage("a").unwrap();
    let before = usage();
    let peak = Peak::watch(cluster.agent_pid("a").unwrap());

    // One pod asks for more than its bound; another, on the same node, for less.
    let greedy = cluster
        .flood("client", target, BOUND + 36, FloodMode::Echo, 30)
        .unwrap();
    let other = cluster
        .flood("client2", target2, BOUND - 14, FloodMode::Echo, 30)
        .unwrap();
    let counted = refused(&cluster, "a", "pod_connection_limit");
    let greedy_opened = greedy.opened.clone();
    greedy.stop();
    let during = peak.finish();
    let legit_text = format!(
        "other pod: {} of {} connections failed",
        other.opened.echo_failed + other.opened.connect_failed,
        BOUND - 14
    );
    report_during(ATTACK, before, during, &legit_text);
    eprintln!("[{ATTACK}] greedy pod: {greedy_opened:?}");
    assert_eq!(
        greedy_opened.echo_ok, BOUND as u64,
        "the greedy pod got more or less than its bound: {greedy_opened:?}"
    );
    assert_eq!(
        greedy_opened.echo_failed + greedy_opened.connect_failed,
        36,
        "every connection past the bound is refused: {greedy_opened:?}"
    );
    assert_eq!(
        (
            other.opened.echo_ok,
            other.opened.echo_failed,
            other.opened.connect_failed
        ),
        ((BOUND - 14) as u64, 0, 0),
        "the other pod was affected: {:?}",
        other.opened
    );
    other.stop();
    assert!(counted >= 36.0, "refusals counted: {counted}");

    // Once the greedy pod lets go, it can connect again.
    let recovered = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .churn("client", target, 10)
            .is_ok_and(|r| r.failed == 0)
    });
    assert!(recovered.is_some(), "the pod's budget was not returned");
    let (took, after) = back_to_baseline(&cluster, before, usage);
    report_after(ATTACK, after, took);
}

/// A client certificate for `identity` from the cluster's own CA root.
fn workload_certificate(cluster: &SimCluster, identity: &Identity) -> (String, String, String) {
    let dir = cluster.ca_dir().join("root");
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("root-key.pem")).unwrap();
    let ca =
        CertificateAuthority::from_pem(&root, &key, "cluster.local", Duration::from_secs(3600))
            .unwrap();
    let (key, csr) = new_csr(identity).unwrap();
    let now = SystemTime::now();
    let cert = ca
        .sign_with_validity(
            &csr,
            identity,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    (cert, key.serialize_pem(), root)
}

#[test]
fn hbone_refuses_huge_header_blocks_and_streams_beyond_its_bounds() {
    const BOUND: u32 = 32;
    let mut spec = ClusterSpec::two_nodes();
    spec.agent_args = vec!["--max-connections-per-pod".into(), BOUND.to_string()];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    assert_eq!(
        cluster
            .churn("client", cluster.pod("server").addr4(8080), 5)
            .unwrap()
            .failed,
        0
    );
    const ATTACK: &str = "HBONE header block and streams";
    let usage = || cluster.agent_usage("b").unwrap();
    let before = usage();
    let peak = Peak::watch(cluster.agent_pid("b").unwrap());
    let server = cluster.pod("server");
    let hbone = SocketAddr::new(server.ipv4.into(), 15008);
    let target = server.addr4(8080).to_string();
    let (cert, key, root) = workload_certificate(&cluster, &id("apps", "client"));
    let trust = TrustBundle::from_pem(&root).unwrap();
    let config = static_client_config(
        Some((cert.as_str(), key.as_str())),
        &trust,
        id("apps", "server"),
    )
    .unwrap();

    let agent_b = cluster.agent_pid("b").unwrap();
    let (huge, streams, more, held) = host::in_netns(&cluster.node("a").netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async move {
            // A 10 MB header block on one CONNECT.
            let mut c = RawH2::connect(hbone, config.clone()).await.unwrap();
            let sent = c.send_connect(1, &target, 10 << 20).await;
            let huge = (sent, c.outcomes(1, Duration::from_secs(5)).await);
            // More streams than the pod's bound, on one connection, then on a second.
            let mut c1 = RawH2::connect(hbone, config.clone()).await.unwrap();
            for i in 0..BOUND + 8 {
                c1.send_connect(1 + 2 * i, &target, 0).await.unwrap();
            }
            let streams = c1
                .outcomes((BOUND + 8) as usize, Duration::from_secs(5))
                .await;
            let mut c2 = RawH2::connect(hbone, config).await.unwrap();
            for i in 0..8 {
                c2.send_connect(1 + 2 * i, &target, 0).await.unwrap();
            }
            let more = c2.outcomes(8, Duration::from_secs(5)).await;
            // The agent's usage while the tunnels are open.
            let held = process_usage(agent_b);
            (huge, streams, more, held)
        }))
    })
    .unwrap();
    let mut during = peak.finish();
    if let Ok(held) = held {
        during.fds = during.fds.max(held.fds);
        during.rss_kib = during.rss_kib.max(held.rss_kib);
    }
    report_during(
        ATTACK,
        before,
        during,
        "n/a (the attack is on the server pod's own bound)",
    );
    eprintln!("[{ATTACK}] 10 MB block: {huge:?}; {} streams on one connection: {streams:?}; 8 more on a second: {more:?}", BOUND + 8);

    let (sent, huge) = huge;
    assert!(
        huge.opened.is_empty(),
        "a 10 MB header block opened a tunnel (sent: {sent:?}): {huge:?}"
    );
    assert!(
        streams.opened.len() <= BOUND as usize,
        "{} streams opened on one connection: {streams:?}",
        streams.opened.len()
    );
    assert!(
        streams.reset.values().filter(|c| **c == 7).count() >= 8,
        "excess streams were not refused (REFUSED_STREAM): {streams:?}"
    );
    assert!(
        more.opened.is_empty() && more.reset.len() == 8,
        "streams beyond the pod's bound on a second connection: {more:?}"
    );
    assert!(refused(&cluster, "b", "pod_connection_limit") >= 8.0);
    assert!(
        during.rss_kib <= before.rss_kib + 32 * 1024,
        "the agent's memory grew: {before} -> {during}"
    );
    let (took, after) = back_to_baseline(&cluster, before, usage);
    let recovered = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .churn("client", cluster.pod("server").addr4(8080), 5)
            .is_ok_and(|r| r.failed == 0)
    });
    assert!(
        recovered.is_some(),
        "the server pod's budget was not returned"
    );
    report_after(ATTACK, after, took);
}

/// Sets a process's descriptor limit (soft and hard), as a tight container limit would.
fn set_fd_limit(pid: u32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `new` and writes nothing (old limit pointer is null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn readiness_fails_while_the_agent_is_out_of_descriptors_and_recovers_by_itself() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let target = cluster.pod("server").addr4(8080);
    assert_eq!(cluster.churn("client", target, 10).unwrap().failed, 0);
    let before = cluster.agent_usage("a").unwrap();
    set_fd_limit(cluster.agent_pid("a").unwrap(), before.fds as u64 + 40);

    // A pod holds more connections than the agent has descriptors left.
    let flood = cluster
        .flood("client", target, 100, FloodMode::Echo, 30)
        .unwrap();
    let flood_report = flood.opened.clone();
    assert!(flood_report.echo_failed > 0, "{flood_report:?}");
    flood.stop();

    // Once descriptors free up, readiness says why it failed, then recovers by itself.
    let mut said = None;
    let unready = cluster.eventually(Duration::from_secs(5), || {
        let probe = cluster.readiness_probe("a", "GET", "/healthz/ready");
        let hit = matches!(&probe, Ok((503, body)) if body.contains("EMFILE"));
        said = Some(probe.map_err(|e| e.to_string()));
        hit
    });
    assert!(
        unready.is_some(),
        "readiness never reported EMFILE: {said:?}"
    );
    eprintln!("[descriptor exhaustion] readiness said: {said:?}");
    let recovered = cluster.eventually(Duration::from_secs(10), || {
        matches!(
            cluster.readiness_probe("a", "GET", "/healthz/ready"),
            Ok((200, _))
        )
    });
    assert!(recovered.is_some(), "readiness did not recover");
    eprintln!(
        "[descriptor exhaustion] attacker: {:?}; ready again {:?} after the EMFILE report",
        flood_report, recovered
    );
    let (_, text) = cluster.admin_raw("a", "GET", "/stats/prometheus").unwrap();
    let emfile: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("nodemesh_accept_errors_total{") && l.contains("error=\"emfile\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(emfile > 0.0, "EMFILE accepts are not counted:\n{text}");
    assert_eq!(cluster.churn("client", target, 20).unwrap().failed, 0);
}
