use std::time::Duration;

use super::*;
use crate::routing::backend::EndpointPolicy;

fn backend(limits: PoolLimits) -> Backend {
    Backend {
        service: ObjectKey::new("apps", "web"),
        port: 80,
        weight: 1,
        endpoints: vec!["10.0.0.1:8080".parse().unwrap()],
        subset: Some("v1".into()),
        subset_error: None,
        policy: EndpointPolicy {
            connection_pool: Some(limits),
            ..Default::default()
        },
        ring: Default::default(),
    }
}

fn limits(connections: Option<u32>, pending: Option<u32>, requests: Option<u32>) -> PoolLimits {
    PoolLimits {
        max_connections: connections,
        max_pending_requests: pending,
        max_requests: requests,
        ..Default::default()
    }
}

fn pools() -> (ConnectionPools, PoolMetrics) {
    let metrics = PoolMetrics::unregistered();
    (ConnectionPools::new(Some(metrics.clone())), metrics)
}

/// Everything given back: no request, connection or wait counted, gauges at zero.
fn idle(pool: &Pool, metrics: &PoolMetrics) {
    let v = pool.occupancy();
    assert_eq!(
        (
            v.active_requests,
            v.active_connections,
            v.pending_requests,
            v.active_retries
        ),
        (0, 0, 0, 0),
        "{v:?}"
    );
    let labels = ["web.apps.svc.cluster.local", "web", "apps", "80", "v1"];
    for kind in ["requests", "connections", "retries"] {
        let [a, b, c, d, e] = labels;
        assert_eq!(
            metrics
                .active
                .with_label_values(&[a, b, c, d, e, kind])
                .get(),
            0
        );
    }
    assert_eq!(metrics.pending.with_label_values(&labels).get(), 0);
}

fn overflows(pool: &Pool, kind: OverflowKind) -> u64 {
    let o = pool.occupancy().overflows;
    match kind {
        OverflowKind::Requests => o.requests,
        OverflowKind::Pending => o.pending,
        OverflowKind::Connections => o.connections,
        OverflowKind::Retries => o.retries,
    }
}

fn retries(max: u32) -> PoolLimits {
    PoolLimits {
        max_retries: Some(max),
        ..Default::default()
    }
}

#[test]
fn max_retries_bounds_retries_outstanding_and_counts_the_excess() {
    let (pools, metrics) = pools();
    let pool = pools
        .pool(&backend(retries(2)))
        .expect("maxRetries alone is tracked");
    let a = pool.retry().unwrap();
    let b = pool.retry().unwrap();
    assert_eq!(pool.occupancy().active_retries, 2);
    let over = pool.retry().unwrap_err();
    assert_eq!(over.kind, OverflowKind::Retries);
    assert_eq!(over.limit, 2);
    assert!(over.to_string().contains("http.maxRetries (2)"), "{over}");
    assert_eq!(overflows(&pool, OverflowKind::Retries), 1);
    let [x, y, z, p, s] = ["web.apps.svc.cluster.local", "web", "apps", "80", "v1"];
    assert_eq!(
        metrics
            .overflows
            .with_label_values(&[x, y, z, p, s, "retries"])
            .get(),
        1
    );
    assert_eq!(
        metrics
            .active
            .with_label_values(&[x, y, z, p, s, "retries"])
            .get(),
        2
    );
    // One ends: a retry may be made again.
    drop(a);
    let c = pool.retry().unwrap();
    drop((b, c));
    idle(&pool, &metrics);
    assert_eq!(overflows(&pool, OverflowKind::Retries), 1);
}

#[tokio::test]
async fn max_retries_alone_bounds_no_request_and_requests_bound_no_retry() {
    let (pools, metrics) = pools();
    let pool = pools.pool(&backend(retries(1))).unwrap();
    let requests: Vec<_> = futures::future::join_all((0..50).map(|_| pool.request(true))).await;
    assert!(requests.iter().all(Result::is_ok));
    let r = pool.retry().unwrap();
    drop((requests, r));
    idle(&pool, &metrics);
    let limited = pools
        .pool(&backend(limits(Some(1), Some(1), Some(1))))
        .unwrap();
    let _held = limited.request(true).await.unwrap();
    drop(limited.retry().unwrap());
}

#[tokio::test]
async fn a_retry_cancelled_during_its_backoff_or_attempt_gives_its_permit_back() {
    let (pools, metrics) = pools();
    let pool = pools.pool(&backend(retries(1))).unwrap();
    // A task holding a retry permit (waiting out its backoff) is aborted, as when the
    // route's timeout fires or the client goes away.
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _retrying = pool.retry().unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await
        }
    });
    for _ in 0..100 {
        if pool.occupancy().active_retries == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pool.occupancy().active_retries, 1);
    assert!(pool.retry().is_err());
    holder.abort();
    let _ = holder.await;
    idle(&pool, &metrics);
    drop(
        pool.retry()
            .expect("the cancelled retry's permit came back"),
    );
}

#[test]
fn without_limits_nothing_is_tracked() {
    let (pools, _) = pools();
    assert!(pools.pool(&backend(PoolLimits::default())).is_none());
    let mut b = backend(PoolLimits::default());
    b.policy.connection_pool = None;
    assert!(pools.pool(&b).is_none());
    // Only per-connection settings: nothing to count either.
    let per_connection = PoolLimits {
        max_requests_per_connection: Some(10),
        ..Default::default()
    };
    assert!(pools.pool(&backend(per_connection)).is_none());
}

#[tokio::test]
async fn http2_max_requests_answers_the_excess_at_once_and_frees_on_drop() {
    let (pools, metrics) = pools();
    let pool = pools.pool(&backend(limits(None, None, Some(2)))).unwrap();
    let a = pool.request(true).await.unwrap();
    let b = pool.request(false).await.unwrap();
    let over = pool.request(true).await.unwrap_err();
    assert_eq!(over.kind, OverflowKind::Requests);
    assert_eq!(over.limit, 2);
    assert!(over.to_string().contains("http2MaxRequests (2)"), "{over}");
    assert!(
        over.to_string().contains("apps/web:80 (subset v1)"),
        "{over}"
    );
    assert_eq!(overflows(&pool, OverflowKind::Requests), 1);
    drop(a);
    let c = pool.request(true).await.unwrap();
    drop((b, c));
    idle(&pool, &metrics);
    let [x, y, z, p, s] = ["web.apps.svc.cluster.local", "web", "apps", "80", "v1"];
    assert_eq!(
        metrics
            .overflows
            .with_label_values(&[x, y, z, p, s, "requests"])
            .get(),
        1
    );
}

#[tokio::test]
async fn requests_wait_for_a_connection_up_to_the_pending_limit() {
    let (pools, metrics) = pools();
    let pool = pools
        .pool(&backend(limits(Some(1), Some(1), None)))
        .unwrap();
    let first = pool.request(true).await.unwrap();
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.request(true).await.map(|_| ()) }
    });
    // The second waits (pending); the third finds the queue full.
    for _ in 0..100 {
        if pool.occupancy().pending_requests == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pool.occupancy().pending_requests, 1);
    let over = pool.request(true).await.unwrap_err();
    assert_eq!(over.kind, OverflowKind::Pending);
    assert_eq!(overflows(&pool, OverflowKind::Pending), 1);
    // HTTP/2 requests do not wait for HTTP/1.1 connection slots.
    drop(pool.request(false).await.unwrap());
    assert!(!waiting.is_finished());
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting request gets the freed connection")
        .unwrap()
        .unwrap();
    idle(&pool, &metrics);
}

#[tokio::test]
async fn a_cancelled_wait_and_an_aborted_request_give_everything_back() {
    let (pools, metrics) = pools();
    let pool = pools
        .pool(&backend(limits(Some(1), Some(5), Some(10))))
        .unwrap();
    let first = pool.request(true).await.unwrap();
    // Timeout: the waiting request gives up (the route's timeout, the client gone).
    let gave_up = tokio::time::timeout(Duration::from_millis(20), pool.request(true)).await;
    assert!(gave_up.is_err());
    assert_eq!(pool.occupancy().pending_requests, 0);
    assert_eq!(pool.occupancy().active_requests, 1);
    // A task holding a permit is aborted mid-request.
    drop(first);
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _permit = pool.request(true).await;
            std::future::pending::<()>().await
        }
    });
    for _ in 0..100 {
        if pool.occupancy().active_requests == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pool.occupancy().active_connections, 1);
    holder.abort();
    let _ = holder.await;
    idle(&pool, &metrics);
    // An error after admission (the request failed): the permit is dropped with it.
    let failed: Result<(), String> = async {
        let _permit = pool.request(true).await.map_err(|e| e.to_string())?;
        Err("upstream reset".into())
    }
    .await;
    assert!(failed.is_err());
    idle(&pool, &metrics);
    // Still the full capacity: nothing leaked.
    let all: Vec<_> = futures::future::join_all((0..1).map(|_| pool.request(true))).await;
    assert!(all.iter().all(Result::is_ok));
}

#[tokio::test]
async fn l4_connections_beyond_max_connections_are_refused_until_one_closes() {
    let (pools, metrics) = pools();
    let pool = pools.pool(&backend(limits(Some(2), None, None))).unwrap();
    let a = pool.connection().unwrap();
    let b = pool.connection().unwrap();
    let over = pool.connection().unwrap_err();
    assert_eq!(over.kind, OverflowKind::Connections);
    assert_eq!(overflows(&pool, OverflowKind::Connections), 1);
    assert_eq!(pool.occupancy().active_connections, 2);
    drop(a);
    let c = pool.connection().unwrap();
    drop((b, c));
    idle(&pool, &metrics);
}

#[tokio::test]
async fn changed_limits_start_a_fresh_pool_and_old_permits_return_to_the_old_one() {
    let (pools, _) = pools();
    let old = pools.pool(&backend(limits(Some(1), None, None))).unwrap();
    let held = old.connection().unwrap();
    assert!(Arc::ptr_eq(
        &old,
        &pools.pool(&backend(limits(Some(1), None, None))).unwrap()
    ));
    let new = pools.pool(&backend(limits(Some(2), None, None))).unwrap();
    assert!(!Arc::ptr_eq(&old, &new));
    let _x = new.connection().unwrap();
    let _y = new.connection().unwrap();
    drop(held);
    assert_eq!(old.occupancy().active_connections, 0);
    assert_eq!(pools.view().len(), 1);
    assert_eq!(pools.view()[0].occupancy.active_connections, 2);
}
