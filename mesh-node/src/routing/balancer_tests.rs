use super::*;
use crate::routing::splits::ClientSplits;

fn backend(name: &str, weight: u32, endpoints: &[&str], least: bool) -> Backend {
    Backend {
        service: ObjectKey::new("apps", name),
        port: 80,
        weight,
        endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        subset: None,
        subset_error: None,
        policy: crate::routing::backend::EndpointPolicy {
            load_balancer: if least {
                LbPolicy::LeastRequest
            } else {
                LbPolicy::RoundRobin
            },
            outlier_detection: None,
            consistent_hash: None,
            connection_pool: None,
        },
        ring: Default::default(),
    }
}

fn shares(b: &Balancer, backends: &[Backend], n: usize) -> HashMap<String, usize> {
    let client = ClientSplits::new();
    let svc = ObjectKey::new("apps", "web");
    let mut counts = HashMap::new();
    for _ in 0..n {
        let p = b.pick(&client, &svc, 80, backends).unwrap();
        *counts.entry(p.backend.name.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn weights_give_exact_shares_and_zero_gets_nothing() {
    let b = Balancer::new();
    let backends = [
        backend("v1", 90, &["10.0.0.1:80"], false),
        backend("v2", 10, &["10.0.0.2:80"], false),
        backend("v3", 0, &["10.0.0.3:80"], false),
    ];
    let counts = shares(&b, &backends, 1000);
    assert_eq!(counts["v1"], 900);
    assert_eq!(counts["v2"], 100);
    assert!(!counts.contains_key("v3"));
    let picks = b.picks();
    let web = &picks[&(ObjectKey::new("apps", "web"), 80)];
    assert_eq!(web[&ObjectKey::new("apps", "v1")], 900);
    assert_eq!(web[&ObjectKey::new("apps", "v2")], 100);
}

#[test]
fn picks_are_spread_not_bunched() {
    let client = ClientSplits::new();
    let b = Balancer::new();
    let backends = [
        backend("a", 1, &["10.0.0.1:80"], false),
        backend("b", 1, &["10.0.0.2:80"], false),
    ];
    let svc = ObjectKey::new("apps", "web");
    let seq: Vec<String> = (0..6)
        .map(|_| {
            b.pick(&client, &svc, 80, &backends)
                .unwrap()
                .backend
                .name
                .clone()
        })
        .collect();
    assert_eq!(seq, ["a", "b", "a", "b", "a", "b"]);
}

#[test]
fn backends_without_endpoints_are_skipped_and_none_means_none() {
    let client = ClientSplits::new();
    let b = Balancer::new();
    let backends = [
        backend("v1", 90, &[], false),
        backend("v2", 10, &["10.0.0.2:80"], false),
    ];
    assert_eq!(shares(&b, &backends, 10)["v2"], 10);
    assert!(b
        .pick(
            &client,
            &ObjectKey::new("apps", "web"),
            80,
            &[backend("v1", 5, &[], false)]
        )
        .is_none());
}

#[test]
fn least_connections_prefers_the_idle_endpoint_and_guards_release() {
    let client = ClientSplits::new();
    let b = Balancer::new();
    let svc = ObjectKey::new("apps", "web");
    let backends = [backend("v1", 1, &["10.0.0.1:80", "10.0.0.2:80"], true)];
    let first = b.pick(&client, &svc, 80, &backends).unwrap();
    let second = b.pick(&client, &svc, 80, &backends).unwrap();
    assert_ne!(first.endpoint, second.endpoint);
    let busy = first.endpoint;
    drop(second);
    // `busy` still has one connection: the next two picks go to the other one first.
    let third = b.pick(&client, &svc, 80, &backends).unwrap();
    assert_ne!(third.endpoint, busy);
    assert_eq!(b.active(&busy), 1);
    drop(first);
    assert_eq!(b.active(&busy), 0);
}

/// Records every outcome, in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<(String, SocketAddr, Outcome)>>);

impl OutcomeObserver for Recorder {
    fn observe(&self, backend: &ObjectKey, endpoint: SocketAddr, outcome: Outcome) {
        lock(&self.0).push((backend.name.clone(), endpoint, outcome));
    }
}

#[test]
fn outcomes_reach_the_observer_and_an_unreported_pick_is_abandoned() {
    let client = ClientSplits::new();
    let recorder = Arc::new(Recorder::default());
    let b = Balancer::with_observer(recorder.clone());
    let svc = ObjectKey::new("apps", "web");
    let backends = [backend("v1", 1, &["10.0.0.1:80", "10.0.0.2:80"], true)];
    let ms = Duration::from_millis;

    let connected = b.pick(&client, &svc, 80, &backends).unwrap();
    let first = connected.endpoint;
    connected.report(Outcome::Connected { latency: ms(2) });
    connected.report(Outcome::Reset);
    // Least-connections still sees it in flight until it is dropped.
    assert_eq!(b.active(&first), 1);
    drop(connected);
    assert_eq!(b.active(&first), 0);

    let http = b.pick(&client, &svc, 80, &backends).unwrap();
    let second = http.endpoint;
    http.report(Outcome::Http {
        status: 503,
        latency: ms(7),
    });
    drop(http);

    let forgotten = b.pick(&client, &svc, 80, &backends).unwrap();
    let third = forgotten.endpoint;
    drop(forgotten);

    let seen = lock(&recorder.0).clone();
    let v1 = |e, o| ("v1".to_string(), e, o);
    assert_eq!(
        seen,
        [
            v1(first, Outcome::Connected { latency: ms(2) }),
            v1(first, Outcome::Reset),
            v1(
                second,
                Outcome::Http {
                    status: 503,
                    latency: ms(7)
                }
            ),
            v1(third, Outcome::Abandoned),
        ]
    );
}

#[test]
fn weighted_choice_is_the_same_over_any_view_of_the_backends() {
    let client = ClientSplits::new();
    // L7 chooses among every weighted backendRef (with or without endpoints), by
    // index into the rule's list; a zero weight is skipped, not counted.
    let b = Balancer::new();
    let backends = [
        backend("off", 0, &["10.0.0.9:80"], false),
        backend("a", 3, &[], false),
        backend("b", 1, &["10.0.0.2:80"], false),
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let svc = ObjectKey::new("apps", "rule");
    let seq: Vec<usize> = (0..8)
        .map(|_| b.choose_backend(&client, &svc, 80, &refs).unwrap())
        .collect();
    assert_eq!(seq, [1, 1, 2, 1, 1, 1, 2, 1]);
    let picks = b.picks();
    let shares = &picks[&(svc, 80)];
    assert_eq!(shares[&ObjectKey::new("apps", "a")], 6);
    assert_eq!(shares[&ObjectKey::new("apps", "b")], 2);
}
