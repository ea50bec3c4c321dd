//! `jwksUri` keys fetched from a real HTTP server on loopback: none before the first
//! fetch, rotation picked up within the refresh interval, the last good keys kept
//! while the server is down, bounds counted, and only URIs this node's pods need.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::{fetcher::DirectConnector, test_keys::*, *};
use crate::{discovery::files::parse_manifest, telemetry::metrics::Metrics};

const ISS: &str = "https://keys.test";

/// A JWKS server: answers every request with `status` and `body`.
struct Server {
    addr: SocketAddr,
    body: Arc<Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

async fn server(status: u16, body: String) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(Mutex::new((status, body)));
    let hits = Arc::new(AtomicUsize::new(0));
    let (b, h) = (body.clone(), hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (b, h) = (b.clone(), h.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, text) = b.lock().unwrap().clone();
                    let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server {
        addr,
        body,
        hits,
        task,
    }
}

fn state(uri: &str, node: &str) -> Arc<ClusterState> {
    let docs = [
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "backend", "namespace": "apps", "labels": {"app": "backend"}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}),
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "RequestAuthentication",
               "metadata": {"name": "jwt", "namespace": "apps"},
               "spec": {"selector": {"matchLabels": {"app": "backend"}},
                        "jwtRules": [{"issuer": ISS, "jwksUri": uri, "timeout": "1s"}]}}),
    ];
    let text: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    Arc::new(ClusterState::from_objects(
        parse_manifest(&text.join("\n---\n")).unwrap(),
    ))
}

fn check(auth: &JwtAuthenticator, s: &ClusterState, token: &str) -> Authentication {
    let mut p = http::Request::builder()
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    auth.authenticate(s, &ObjectKey::new("apps", "backend"), &mut p)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fetches(m: &Metrics, result: &str) -> u64 {
    m.jwks_fetches.with_label_values(&[result]).get()
}

struct Running {
    auth: Arc<JwtAuthenticator>,
    metrics: Arc<Metrics>,
    _tx: watch::Sender<Arc<ClusterState>>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(s: &Arc<ClusterState>, refresh: Duration) -> Running {
    let metrics = Arc::new(Metrics::new());
    let auth = JwtAuthenticator::counted(metrics.clone(), refresh);
    let (tx, rx) = watch::channel(s.clone());
    let task = fetcher::spawn(&auth, rx, "n1".into(), Arc::new(DirectConnector));
    Running {
        auth,
        metrics,
        _tx: tx,
        task,
    }
}

#[tokio::test]
async fn keys_rotate_within_the_refresh_and_survive_the_server_going_away() {
    let (old, new) = (
        TestKey::rsa("old", Algorithm::RS256),
        TestKey::ec("new", Algorithm::ES256),
    );
    let srv = server(200, jwks(&[&old])).await;
    let s = state(&format!("http://{}/keys.json", srv.addr), "n1");
    let (old_token, new_token) = (
        old.sign(&claims(ISS, "alice", "x")),
        new.sign(&claims(ISS, "bob", "x")),
    );
    // Nothing fetched yet: the token cannot be checked, so it is refused.
    let idle = JwtAuthenticator::new();
    assert_eq!(
        check(&idle, &s, &old_token),
        Authentication::Invalid(Rejection::KeysUnavailable.to_string())
    );
    let run = start(&s, Duration::from_millis(400));
    eventually("the first keys", || {
        matches!(check(&run.auth, &s, &old_token), Authentication::Valid(_))
    })
    .await;
    assert!(matches!(
        check(&run.auth, &s, &new_token),
        Authentication::Invalid(_)
    ));
    // The server rotates to the new key: its tokens pass within the refresh.
    let rotated = Instant::now();
    srv.body.lock().unwrap().1 = jwks(&[&new]);
    eventually("the rotated keys", || {
        matches!(check(&run.auth, &s, &new_token), Authentication::Valid(_))
    })
    .await;
    assert!(
        rotated.elapsed() < Duration::from_secs(2),
        "{:?}",
        rotated.elapsed()
    );
    assert!(matches!(
        check(&run.auth, &s, &old_token),
        Authentication::Invalid(_)
    ));
    // The server goes away: fetches fail, the last good keys keep working.
    srv.task.abort();
    let _ = srv.task.await;
    eventually("failed fetches", || {
        fetches(&run.metrics, "connect_failed") >= 2
    })
    .await;
    assert!(matches!(
        check(&run.auth, &s, &new_token),
        Authentication::Valid(_)
    ));
    assert!(fetches(&run.metrics, "ok") >= 2);
}

#[tokio::test]
async fn bad_answers_are_counted_and_give_no_keys() {
    let key = TestKey::ed25519("k");
    let token = key.sign(&claims(ISS, "a", "x"));
    for (status, body, result) in [
        (500, jwks(&[&key]), "http_error"),
        (200, "x".repeat(300 * 1024), "too_large"),
        (200, "{\"keys\": []}".to_string(), "bad_jwks"),
    ] {
        let srv = server(status, body).await;
        let s = state(&format!("http://{}/", srv.addr), "n1");
        let run = start(&s, Duration::from_secs(60));
        eventually(result, || fetches(&run.metrics, result) >= 1).await;
        assert_eq!(
            check(&run.auth, &s, &token),
            Authentication::Invalid(Rejection::KeysUnavailable.to_string()),
            "{result}"
        );
        srv.task.abort();
    }
}

#[tokio::test]
async fn uris_of_pods_on_other_nodes_are_not_fetched() {
    let key = TestKey::ed25519("k");
    let srv = server(200, jwks(&[&key])).await;
    let s = state(&format!("http://{}/", srv.addr), "elsewhere");
    let run = start(&s, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(srv.hits.load(Ordering::SeqCst), 0);
    assert_eq!(fetches(&run.metrics, "ok"), 0);
    srv.task.abort();
}
