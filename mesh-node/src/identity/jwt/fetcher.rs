//! The keys of every `jwksUri` the node's workloads need: fetched by the agent in the
//! background, only for URIs that RequestAuthentications selecting pods of this node
//! name; fetched again every refresh interval, sooner while failing (1 s, doubling, up
//! to 30 s or the interval); the last good keys kept while a URI fails. Responses are
//! bounded in time (the rule's `timeout`) and size ([`MAX_JWKS_BYTES`]); every fetch is
//! counted in `nodemesh_jwks_fetches_total{result}`.
//!
//! How a URI is reached is the [`JwksConnector`]'s business: the agent's
//! (`proxy::dial`) goes through the mesh to a cluster Service, as the pod would;
//! [`DirectConnector`] uses the agent's own DNS and TCP.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tracing::{debug, info};

use crate::{
    discovery::cluster::ClusterState,
    discovery::jwks::{self, Jwks, JwksError, MAX_JWKS_BYTES},
    discovery::request_auth::{JwksUri, KeySource, Scheme},
    identity::jwt::JwtAuthenticator,
    keys::PodKey,
};

/// Longest wait before a failing URI is tried again.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// A byte stream to a JWKS server.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type BoxIo = Box<dyn Io>;
pub type Connecting = Pin<Box<dyn Future<Output = Result<BoxIo, FetchError>> + Send>>;

/// Opens a connection to a JWKS server.
pub trait JwksConnector: Send + Sync {
    /// A connection to `uri`'s host and port, for the local pods `via` (the pods whose
    /// RequestAuthentications name it), as `state` has the cluster.
    fn connect(
        &self,
        state: Arc<ClusterState>,
        via: Vec<PodKey>,
        uri: JwksUri,
        timeout: Duration,
    ) -> Connecting;
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer in time")]
    Timeout,
    #[error("the server answered {0}")]
    Status(u16),
    #[error("the answer is over {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("the answer broke off: {0}")]
    Body(String),
    #[error("{0}")]
    BadJwks(JwksError),
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl FetchError {
    /// The `result` label of `nodemesh_jwks_fetches_total`.
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect_failed",
            FetchError::Timeout => "timeout",
            FetchError::Status(_) => "http_error",
            FetchError::TooLarge => "too_large",
            FetchError::Body(_) => "http_error",
            FetchError::BadJwks(_) => "bad_jwks",
            FetchError::Unsupported(_) => "unsupported",
        }
    }
}

/// The agent's own DNS and TCP (plain HTTP only).
pub struct DirectConnector;

impl JwksConnector for DirectConnector {
    fn connect(
        &self,
        _state: Arc<ClusterState>,
        _via: Vec<PodKey>,
        uri: JwksUri,
        _timeout: Duration,
    ) -> Connecting {
        Box::pin(async move {
            if uri.scheme == Scheme::Https {
                return Err(FetchError::Unsupported(format!(
                    "https to {} (not a Service of the cluster): serve the keys over http, through the mesh, or inline them in `jwks`",
                    uri.host
                )));
            }
            let tcp = tokio::net::TcpStream::connect((uri.host.as_str(), uri.port))
                .await
                .map_err(|e| FetchError::Connect(format!("{}:{}: {e}", uri.host, uri.port)))?;
            Ok(Box::new(tcp) as BoxIo)
        })
    }
}

#[derive(Debug)]
struct Entry {
    keys: Option<Arc<Jwks>>,
    failures: u32,
    next_due: Instant,
    in_flight: bool,
}

/// The keys of each `jwksUri`, by the URI as written.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl KeyCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last good keys of `uri`.
    pub fn get(&self, uri: &str) -> Option<Arc<Jwks>> {
        self.lock().get(uri).and_then(|e| e.keys.clone())
    }

    /// Forgets URIs no longer wanted.
    fn retain(&self, wanted: &BTreeMap<String, Want>) {
        self.lock().retain(|k, _| wanted.contains_key(k));
    }

    /// Whether `uri` is due a fetch now (and marks it in flight if so).
    fn start_if_due(&self, uri: &str, now: Instant) -> bool {
        let mut entries = self.lock();
        let e = entries.entry(uri.to_string()).or_insert(Entry {
            keys: None,
            failures: 0,
            next_due: now,
            in_flight: false,
        });
        if e.in_flight || e.next_due > now {
            return false;
        }
        e.in_flight = true;
        true
    }

    fn finish(&self, uri: &str, result: &Result<Jwks, FetchError>, refresh: Duration) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(uri) else {
            return;
        };
        e.in_flight = false;
        let now = Instant::now();
        match result {
            Ok(keys) => {
                e.keys = Some(Arc::new(keys.clone()));
                e.failures = 0;
                e.next_due = now + refresh;
            }
            Err(_) => {
                e.failures = e.failures.saturating_add(1);
                let backoff = Duration::from_secs(1 << e.failures.min(6).saturating_sub(1));
                e.next_due = now + backoff.min(MAX_RETRY).min(refresh);
            }
        }
    }
}

/// One URI to keep: how long a fetch may take, and the local pods that need it.
#[derive(Debug, Clone)]
struct Want {
    uri: JwksUri,
    timeout: Duration,
    via: Vec<PodKey>,
}

/// Every `jwksUri` of the RequestAuthentications selecting pods of `node`.
fn wanted(state: &ClusterState, node: &str) -> BTreeMap<String, Want> {
    let mut out: BTreeMap<String, Want> = BTreeMap::new();
    if state.request_authentication.is_empty() {
        return out;
    }
    for (pod, _) in state.pods_on_node(node) {
        for (_, ra) in state.request_authentications_for(pod) {
            for rule in &ra.rules {
                let KeySource::Uri(uri) = &rule.keys else {
                    continue;
                };
                let want = out.entry(uri.text.clone()).or_insert_with(|| Want {
                    uri: uri.clone(),
                    timeout: rule.timeout,
                    via: Vec::new(),
                });
                if !want.via.contains(pod) {
                    want.via.push(pod.clone());
                }
            }
        }
    }
    out
}

/// Fetches and reads one JWKS document.
pub async fn fetch(
    connector: &dyn JwksConnector,
    state: Arc<ClusterState>,
    via: Vec<PodKey>,
    uri: &JwksUri,
    timeout: Duration,
) -> Result<Jwks, FetchError> {
    let work = async {
        let io = connector.connect(state, via, uri.clone(), timeout).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| FetchError::Connect(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = match (uri.scheme, uri.port) {
            (Scheme::Http, 80) | (Scheme::Https, 443) => uri.host.clone(),
            _ => format!("{}:{}", uri.host, uri.port),
        };
        let request = http::Request::get(uri.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| FetchError::Connect(e.to_string()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| FetchError::Body(e.to_string()))?;
            if !response.status().is_success() {
                return Err(FetchError::Status(response.status().as_u16()));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge
                    } else {
                        FetchError::Body(e.to_string())
                    }
                })?
                .to_bytes();
            let text = std::str::from_utf8(&body)
                .map_err(|_| FetchError::BadJwks(JwksError::NotJson("not UTF-8".into())))?;
            jwks::parse(text).map_err(FetchError::BadJwks)
        }
        .await;
        driver.abort();
        result
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(FetchError::Timeout))
}

/// How often the loop looks for due URIs.
fn tick_for(refresh: Duration) -> Duration {
    (refresh / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Keeps the keys of every `jwksUri` the pods of `node` need, until `state` closes.
pub async fn run(
    auth: Arc<JwtAuthenticator>,
    mut state: watch::Receiver<Arc<ClusterState>>,
    node: String,
    connector: Arc<dyn JwksConnector>,
) {
    let refresh = auth.refresh();
    let mut tick = tokio::time::interval(tick_for(refresh));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Arc<ClusterState>, BTreeMap<String, Want>)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = state.changed() => if changed.is_err() { return },
        }
        let snapshot = state.borrow().clone();
        let stale = last
            .as_ref()
            .is_none_or(|(s, _)| !Arc::ptr_eq(s, &snapshot));
        if stale {
            let w = wanted(&snapshot, &node);
            auth.key_cache().retain(&w);
            last = Some((snapshot.clone(), w));
        }
        let Some((_, wants)) = &last else { continue };
        let now = Instant::now();
        for (text, want) in wants {
            if !auth.key_cache().start_if_due(text, now) {
                continue;
            }
            let (auth, connector, snapshot) = (auth.clone(), connector.clone(), snapshot.clone());
            let (text, want) = (text.clone(), want.clone());
            tokio::spawn(async move {
                let result = fetch(
                    connector.as_ref(),
                    snapshot,
                    want.via.clone(),
                    &want.uri,
                    want.timeout,
                )
                .await;
                let label = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.label(),
                };
                if let Some(m) = auth.metrics() {
                    m.jwks_fetches.with_label_values(&[label]).inc();
                }
                match &result {
                    Ok(keys) => {
                        debug!(uri = %text, keys = keys.keys.len(), "JWKS fetched")
                    }
                    Err(e) => {
                        let kept = auth.fetched_keys(&text).is_some();
                        crate::warn_limited!(uri = %text, error = %e, last_good_keys_kept = kept, "JWKS fetch failed; retrying");
                    }
                }
                auth.key_cache().finish(&text, &result, refresh);
            });
        }
    }
}

/// Starts [`run`] on the runtime.
pub fn spawn(
    auth: &Arc<JwtAuthenticator>,
    state: watch::Receiver<Arc<ClusterState>>,
    node: String,
    connector: Arc<dyn JwksConnector>,
) -> tokio::task::JoinHandle<()> {
    info!(refresh = ?auth.refresh(), "JWKS fetcher started");
    tokio::spawn(run(auth.clone(), state, node, connector))
}
