use std::time::Duration;

use super::*;
use crate::telemetry::metrics::Metrics;

const MS: fn(u64) -> Duration = Duration::from_millis;

fn addrs(n: usize) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
        .collect()
}

fn web() -> ObjectKey {
    ObjectKey::new("apps", "web")
}

fn http(status: u16) -> Signal {
    Signal::Http(status)
}

fn fail(o: &Outliers, p: &OutlierPolicy, e: SocketAddr, total: usize, times: usize) {
    for _ in 0..times {
        o.observe(&web(), p, e, total, http(500), None);
    }
}

fn skipped(o: &Outliers, p: &OutlierPolicy, eps: &[SocketAddr]) -> Vec<bool> {
    o.skip(&web(), p, eps, None)
}

#[test]
fn consecutive_5xx_eject_for_base_time_then_twice_as_long() {
    let base = MS(200);
    let p = policy_for_tests(base);
    let eps = addrs(3);
    let o = Outliers::default();
    fail(&o, &p, eps[0], 3, 2);
    o.observe(&web(), &p, eps[0], 3, http(200), None);
    fail(&o, &p, eps[0], 3, 2);
    assert_eq!(
        skipped(&o, &p, &eps),
        [false; 3],
        "a success resets the count"
    );
    fail(&o, &p, eps[0], 3, 1);
    assert_eq!(skipped(&o, &p, &eps), [true, false, false]);
    assert!(o.any_ejected());
    std::thread::sleep(base + MS(60));
    assert_eq!(
        skipped(&o, &p, &eps),
        [false; 3],
        "back after baseEjectionTime"
    );
    assert!(!o.any_ejected());

    fail(&o, &p, eps[0], 3, 3);
    std::thread::sleep(base + MS(60));
    assert_eq!(
        skipped(&o, &p, &eps),
        [true, false, false],
        "the second ejection lasts twice as long"
    );
    std::thread::sleep(base);
    assert_eq!(skipped(&o, &p, &eps), [false; 3]);
    let view = o.view();
    assert_eq!(view[0].ejections, 2);
    assert_eq!(view[0].last_reason, Some(EjectReason::Consecutive5xx));
}

#[test]
fn gateway_and_local_origin_failures_count_on_their_own() {
    let mut p = policy_for_tests(Duration::from_secs(60));
    p.consecutive_5xx = 0;
    p.consecutive_gateway = 2;
    let eps = addrs(2);
    let o = Outliers::default();
    // A 500 is not a gateway error and breaks the run.
    o.observe(&web(), &p, eps[0], 2, http(503), None);
    o.observe(&web(), &p, eps[0], 2, http(500), None);
    o.observe(&web(), &p, eps[0], 2, http(502), None);
    assert_eq!(skipped(&o, &p, &eps), [false, false]);
    o.observe(&web(), &p, eps[0], 2, http(504), None);
    assert_eq!(skipped(&o, &p, &eps), [true, false]);

    // Connect failures (policy: 2 in a row); a connection made resets the run.
    let o = Outliers::default();
    o.observe(&web(), &p, eps[1], 2, Signal::LocalFailure, None);
    o.observe(&web(), &p, eps[1], 2, Signal::Connected, None);
    o.observe(&web(), &p, eps[1], 2, Signal::LocalFailure, None);
    assert_eq!(skipped(&o, &p, &eps), [false, false]);
    o.observe(&web(), &p, eps[1], 2, Signal::LocalFailure, None);
    assert_eq!(skipped(&o, &p, &eps), [false, true]);
    // Denied and abandoned picks say nothing about health.
    let o = Outliers::default();
    for _ in 0..10 {
        o.observe(&web(), &p, eps[0], 2, Signal::Nothing, None);
        o.observe(&web(), &p, eps[0], 2, Signal::Nothing, None);
    }
    assert!(o.view().is_empty());
}

#[test]
fn max_ejection_percent_caps_and_min_health_percent_ignores() {
    let p = policy_for_tests(Duration::from_secs(60)); // max 50%
    let eps = addrs(3);
    let o = Outliers::default();
    fail(&o, &p, eps[0], 3, 3);
    fail(&o, &p, eps[1], 3, 3);
    assert_eq!(
        skipped(&o, &p, &eps),
        [true, false, false],
        "2 of 3 would be 66% > 50%"
    );
    let mut all = p;
    all.max_ejection_percent = 100;
    fail(&o, &all, eps[1], 3, 3);
    assert_eq!(skipped(&o, &all, &eps), [true, true, false]);
    // Below minHealthPercent healthy, ejections are ignored.
    all.min_health_percent = 50;
    assert_eq!(skipped(&o, &all, &eps), [false; 3]);
}

#[test]
fn departed_endpoints_are_forgotten_and_state_is_bounded() {
    let p = policy_for_tests(Duration::from_secs(60));
    let eps = addrs(3);
    let metrics = Metrics::new();
    let m = Some(&metrics.outliers);
    let o = Outliers::default();
    for e in &eps {
        o.observe(&web(), &p, *e, 3, http(500), m);
    }
    o.observe(&web(), &p, eps[0], 3, http(500), m);
    o.observe(&web(), &p, eps[0], 3, http(500), m);
    let gauge = || {
        metrics
            .outliers
            .ejected
            .with_label_values(&["web.apps.svc.cluster.local", "web", "apps"])
            .get()
    };
    assert_eq!(gauge(), 1);
    assert_eq!(o.view().len(), 3);
    // Only eps[2] is left: the ejected one and eps[1] go at the next sweep.
    std::thread::sleep(p.interval + MS(5));
    assert_eq!(o.skip(&web(), &p, &eps[2..], m), [false]);
    assert_eq!(o.view().len(), 1);
    assert!(!o.any_ejected());
    assert_eq!(gauge(), 0, "the gauge follows");
    // A flood of addresses stops at MAX_TRACKED.
    for i in 0..(MAX_TRACKED + 100) {
        let e = SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 80));
        o.observe(&web(), &p, e, MAX_TRACKED + 100, http(500), None);
    }
    assert_eq!(o.view().len(), MAX_TRACKED);
}
