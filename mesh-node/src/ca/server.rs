//! `mesh-node ca`: signs workload CSRs over HTTPS for authenticated node agents, only
//! for identities that have a pod scheduled on the caller's node, judged from the same
//! discovered state the agents use.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use serde::Serialize;
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    ca::auth::NodeAuthenticator, ca::sign::answer, ca::sign::SignRefusal,
    identity::ca::authority::CaError, identity::ca::authority::CertificateAuthority,
    identity::ca::protocol::ErrorResponse, identity::ca::protocol::SIGN_PATH,
};
use crate::{
    config::at_least_one, config::LogArgs, config::Source, discovery::apiserver,
    discovery::apiserver::DiscoveryHealth, discovery::cluster::ClusterState,
    discovery::duration::parse_duration, discovery::files, identity::pem,
    identity::DEFAULT_TRUST_DOMAIN, limits, limits::Gate, limits::Listener, limits::ListenerLimits,
    limits::Stage, telemetry::metrics::Metrics,
};

#[derive(Debug, Clone, Args, Serialize)]
pub struct CaConfig {
    /// HTTPS address of the CA.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// Trust domain of every identity this CA signs.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of workload certificates.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    #[serde(skip)]
    pub ttl: Duration,

    /// Embedded mode: keep a generated root here (created on first start).
    #[arg(long, conflicts_with_all = ["root_cert", "root_key"])]
    pub root_dir: Option<PathBuf>,

    /// Root certificate (PEM), e.g. a mounted Secret's `ca.crt`.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,

    /// Root key (PEM), e.g. a mounted Secret's `ca.key`.
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,

    /// Names and IPs for the CA's TLS certificate (what agents dial).
    #[arg(long = "server-name", required = true)]
    pub server_names: Vec<String>,

    /// Where pod scheduling is learned: `kube` or `files`.
    #[arg(long, value_enum, default_value_t = Source::Files)]
    pub source: Source,

    /// Manifest directory for `--source files`.
    #[arg(long, required_if_eq("source", "files"))]
    pub manifests: Option<PathBuf>,

    /// Embedded mode: `node=token` lines; without it, tokens are checked with TokenReview.
    #[arg(long)]
    pub node_tokens: Option<PathBuf>,

    /// With TokenReview: the agents' service-account user.
    #[arg(
        long,
        default_value = "system:serviceaccount:nodemesh-system:mesh-node"
    )]
    pub agent_user: String,

    /// With TokenReview: the audience agents' tokens must be minted for (the projected
    /// serviceAccountToken's `audience`), so they are no credential for the API server.
    #[arg(long, default_value = "nodemesh-ca")]
    pub token_audience: String,

    /// Time a client has to finish the TLS handshake and send its request head.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(skip)]
    pub handshake_timeout: Duration,

    /// A connection with no bytes either way for this long is closed; and none lives
    /// longer than this in all (agents send one request per connection).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    #[serde(skip)]
    pub idle_timeout: Duration,

    /// Connections open at once; more are accepted and closed at once.
    #[arg(long, value_parser = at_least_one, default_value_t = 1024)]
    pub max_connections: usize,

    /// Connections open at once from one address (each agent needs one at a time),
    /// so that a flood from one pod cannot lock the agents out.
    #[arg(long, value_parser = at_least_one, default_value_t = 64)]
    pub max_connections_per_source: usize,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Error)]
pub enum CaServerError {
    #[error(transparent)]
    Authority(#[from] CaError),
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--node-tokens {path}: {reason}")]
    Tokens { path: PathBuf, reason: String },
    #[error("give the CA a root: --root-dir (embedded) or --root-cert and --root-key")]
    NoRoot,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot reach the Kubernetes API for TokenReview and discovery: {0}")]
    Kube(kube::Error),
}

fn read(what: &'static str, path: &PathBuf) -> Result<String, CaServerError> {
    std::fs::read_to_string(path).map_err(|source| CaServerError::Read {
        what,
        path: path.clone(),
        source,
    })
}

struct CaService {
    authority: CertificateAuthority,
    authenticator: NodeAuthenticator,
    state: watch::Receiver<Arc<ClusterState>>,
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, error: String) -> Response<Full<Bytes>> {
    json(status, &ErrorResponse { error })
}

/// Requests are a few KiB; anything bigger is not a CSR.
const MAX_BODY: usize = 64 * 1024;

impl CaService {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::POST || req.uri().path() != SIGN_PATH {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("POST {SIGN_PATH} is the only endpoint"),
            );
        }
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let node = match self.authenticator.node_of(authorization.as_deref()).await {
            Ok(n) => n,
            Err(e) => {
                crate::warn_limited!(error = %e, "CA request refused: not authenticated");
                return refuse(StatusCode::UNAUTHORIZED, e.to_string());
            }
        };
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request: {e}"),
                )
            }
        };
        let state = self.state.borrow().clone();
        match answer(&self.authority, &state, &node, &body) {
            Ok((identity, response)) => {
                info!(%node, %identity, "certificate issued");
                json(StatusCode::OK, &response)
            }
            Err(refusal @ (SignRefusal::Malformed(_) | SignRefusal::BadIdentity(_))) => {
                debug!(%node, error = %crate::telemetry::log_limit::clip(&refusal.to_string()), "CA request refused: malformed");
                refuse(
                    refusal.status(),
                    crate::telemetry::log_limit::clip(&refusal.to_string()).into_owned(),
                )
            }
            Err(refusal) => {
                crate::warn_limited!(%node, error = %crate::telemetry::log_limit::clip(&refusal.to_string()), "CA request refused");
                refuse(
                    refusal.status(),
                    crate::telemetry::log_limit::clip(&refusal.to_string()).into_owned(),
                )
            }
        }
    }
}

fn authority(config: &CaConfig) -> Result<CertificateAuthority, CaServerError> {
    match (&config.root_dir, &config.root_cert, &config.root_key) {
        (Some(dir), _, _) => Ok(CertificateAuthority::load_or_generate(
            dir,
            &config.trust_domain,
            config.ttl,
        )?),
        (None, Some(cert), Some(key)) => Ok(CertificateAuthority::from_pem(
            &read("root certificate", cert)?,
            &read("root key", key)?,
            &config.trust_domain,
            config.ttl,
        )?),
        _ => Err(CaServerError::NoRoot),
    }
}

/// Runs the CA until the process is stopped.
pub async fn run(config: CaConfig) -> Result<(), CaServerError> {
    if let Err(e) = limits::raise_fd_limit() {
        warn!(error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE); keeping the inherited one");
    }
    let authority = authority(&config)?;
    let (cert, key) = authority.issue_server_certificate(&config.server_names)?;
    let acceptor = TlsAcceptor::from(pem::server_config(&cert, &key).map_err(CaServerError::Tls)?);
    let metrics = Arc::new(Metrics::new());
    let (state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let authenticator =
        match (&config.node_tokens, config.source) {
            (Some(path), _) => NodeAuthenticator::parse_tokens(&read("node tokens", path)?)
                .map_err(|reason| CaServerError::Tokens {
                    path: path.clone(),
                    reason,
                })?,
            (None, _) => NodeAuthenticator::TokenReview {
                client: kube::Client::try_default()
                    .await
                    .map_err(CaServerError::Kube)?,
                agent_user: config.agent_user.clone(),
                audience: config.token_audience.clone(),
            },
        };
    match (config.source, &config.manifests) {
        (Source::Files, Some(dir)) => {
            // The CA decides nothing by mTLS mode: the default root namespace will do.
            tokio::spawn(files::watch_directory(
                dir.clone(),
                Default::default(),
                state_tx,
                metrics.clone(),
            ));
        }
        _ => {
            let client = kube::Client::try_default()
                .await
                .map_err(CaServerError::Kube)?;
            tokio::spawn(apiserver::run(
                client,
                state_tx,
                metrics.clone(),
                Arc::new(DiscoveryHealth::default()),
                Default::default(),
            ));
        }
    }
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| CaServerError::Bind {
                addr: config.listen,
                source,
            })?;
    let service = Arc::new(CaService {
        authority,
        authenticator,
        state: state_rx,
    });
    info!(listen = %config.listen, trust_domain = %config.trust_domain, ttl_s = config.ttl.as_secs(), "CA serving");
    let gate = Gate::new(
        Listener::Ca,
        ListenerLimits {
            header_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
            max_per_source: config.max_connections_per_source,
        },
        metrics,
    );
    loop {
        let (stream, peer) = limits::accept(&listener, Listener::Ca, gate.metrics()).await;
        let admitted = match gate.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                debug!(%peer, reason = refusal.name(), "CA connection refused at the cap");
                continue;
            }
        };
        let (acceptor, service, gate) = (acceptor.clone(), service.clone(), gate.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let bounds = *gate.limits();
            let tls =
                match tokio::time::timeout(bounds.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "CA TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        limits::count_timeout(gate.metrics(), Listener::Ca, Stage::Handshake);
                        debug!(%peer, "CA TLS handshake timed out");
                        return;
                    }
                };
            let svc = service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service.handle(req).await) }
            });
            let served = limits::http::serve_http1(tls, svc, &gate);
            match tokio::time::timeout(bounds.idle_timeout, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "CA connection ended with an error"),
                Err(_) => {
                    limits::count_timeout(gate.metrics(), Listener::Ca, Stage::Idle);
                    debug!(%peer, "CA connection outlived its idle timeout; closed");
                }
            }
        });
    }
}
