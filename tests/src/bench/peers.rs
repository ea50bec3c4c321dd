//! The peers: an stunnel pair and an haproxy pair doing the mesh's job between the two
//! nodes. The client side runs in node a's namespace (pods reach it at their gateway
//! address), originates TLS 1.3 with a client certificate and verifies the server's;
//! the server side runs in node b's namespace, terminates TLS, requires and verifies
//! the client certificate, and forwards to the `outsider` pod. ECDSA P-256 throughout,
//! like the mesh's workload certificates.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType,
    PKCS_ECDSA_P256_SHA256,
};

use super::scenarios::App;
use crate::sim::{
    host::{in_netns, wait_for},
    network::underlay,
    Process, SimCluster,
};

/// A CA, a server certificate for node b's fabric address and a client certificate,
/// as PEM files.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Certificate and key in one file, as haproxy's `crt` wants them.
    pub server_bundle: PathBuf,
    pub client_bundle: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path, _cluster: &SimCluster) -> Result<Certs> {
        fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "nodemesh bench peer CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, san: SanType| -> Result<(String, String)> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.subject_alt_names.push(san);
            Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let server_ip = IpAddr::V4(underlay(1).0);
        let (server_cert, server_key) = leaf("peer-server", SanType::IpAddress(server_ip))?;
        let (client_cert, client_key) =
            leaf("peer-client", SanType::DnsName("peer-client".try_into()?))?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            fs::write(&path, text)?;
            Ok(path)
        };
        Ok(Certs {
            ca: write("ca.pem", &ca_cert.pem())?,
            server_bundle: write("server-bundle.pem", &(server_cert.clone() + &server_key))?,
            client_bundle: write("client-bundle.pem", &(client_cert.clone() + &client_key))?,
            server_cert: write("server.pem", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.pem", &client_cert)?,
            client_key: write("client.key", &client_key)?,
        })
    }
}

/// One peer's two processes and the addresses its client side listens on.
pub struct PeerPair {
    client: Process,
    server: Process,
    entries: Vec<(App, SocketAddr)>,
}

impl PeerPair {
    pub fn entry(&self, app: App) -> SocketAddr {
        self.entries
            .iter()
            .find(|(a, _)| *a == app)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("the peer forwards every app; {app:?} missing"))
    }

    pub fn pids(&self) -> Vec<u32> {
        vec![self.client.0.id(), self.server.0.id()]
    }
}

/// Per app: the client side's address on node a, the server side's on node b, and
/// the backend in the `outsider` pod.
struct Hop {
    app: App,
    entry: SocketAddr,
    tunnel: SocketAddr,
    backend: SocketAddr,
}

fn hops(cluster: &SimCluster, base_port: u16) -> Vec<Hop> {
    let node_a = IpAddr::V4(cluster.node("a").ipv4);
    let node_b = IpAddr::V4(underlay(1).0);
    App::ALL
        .iter()
        .enumerate()
        .map(|(i, &app)| Hop {
            app,
            entry: SocketAddr::new(node_a, base_port + i as u16),
            tunnel: SocketAddr::new(node_b, base_port + 1000 + i as u16),
            backend: cluster.pod("outsider").addr4(app.port()),
        })
        .collect()
}

/// Starts `program args` in a node's namespace, logging to `log`.
fn spawn_on(
    cluster: &SimCluster,
    node: &str,
    program: &str,
    args: &[&str],
    log: &Path,
) -> Result<Process> {
    let file = fs::File::create(log)?;
    let child = cluster
        .node_placement(node)
        .command(Path::new(program))?
        .args(args)
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    Ok(Process(child))
}

/// Waits until every address listens (checked from inside its node's namespace).
fn wait_listening(
    cluster: &SimCluster,
    node: &str,
    addrs: Vec<SocketAddr>,
    what: &str,
    log: &Path,
) -> Result<()> {
    let netns = cluster.node(node).netns.clone();
    let up = wait_for(Duration::from_secs(10), || {
        let addrs = addrs.clone();
        in_netns(&netns, move || {
            Ok(addrs
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()))
        })
        .ok()
        .filter(|up| *up)
    });
    if up.is_none() {
        bail!(
            "{what} did not start listening; log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(())
}

fn start_pair(
    cluster: &SimCluster,
    name: &str,
    dir: &Path,
    hops: &[Hop],
    configs: (String, String),
    command: impl Fn(&Path) -> (&'static str, Vec<String>),
) -> Result<PeerPair> {
    let mut sides = Vec::new();
    for (side, node, config, addrs) in [
        (
            "server",
            "b",
            &configs.1,
            hops.iter().map(|h| h.tunnel).collect::<Vec<_>>(),
        ),
        (
            "client",
            "a",
            &configs.0,
            hops.iter().map(|h| h.entry).collect(),
        ),
    ] {
        let conf = dir.join(format!("{name}-{side}.conf"));
        fs::write(&conf, config)?;
        let log = dir.join(format!("{name}-{side}.log"));
        let (program, args) = command(&conf);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = spawn_on(cluster, node, program, &args, &log)?;
        wait_listening(cluster, node, addrs, &format!("{name} ({side} side)"), &log)?;
        sides.push(process);
    }
    let client = sides.pop().context("client side")?;
    let server = sides.pop().context("server side")?;
    Ok(PeerPair {
        client,
        server,
        entries: hops.iter().map(|h| (h.app, h.entry)).collect(),
    })
}

pub fn start_stunnel(cluster: &SimCluster, certs: &Certs, base_port: u16) -> Result<PeerPair> {
    let dir = cluster.work_dir.join("stunnel");
    fs::create_dir_all(&dir)?;
    let hops = hops(cluster, base_port);
    let common = |side: &str| {
        format!(
            "foreground = yes\npid =\nsyslog = no\ndebug = err\noutput = {}\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
            dir.join(format!("stunnel-{side}.out")).display()
        )
    };
    let tls = |cert: &Path, key: &Path| {
        format!(
            "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
             sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n",
            cert.display(),
            key.display(),
            certs.ca.display()
        )
    };
    let (mut client, mut server) = (common("client"), common("server"));
    for (i, h) in hops.iter().enumerate() {
        let _ = write!(
            client,
            "[app{i}]\nclient = yes\naccept = {}\nconnect = {}\ncheckIP = {}\n{}",
            h.entry,
            h.tunnel,
            h.tunnel.ip(),
            tls(&certs.client_cert, &certs.client_key)
        );
        let _ = write!(
            server,
            "[app{i}]\naccept = {}\nconnect = {}\n{}",
            h.tunnel,
            h.backend,
            tls(&certs.server_cert, &certs.server_key)
        );
    }
    start_pair(cluster, "stunnel", &dir, &hops, (client, server), |conf| {
        ("stunnel4", vec![conf.display().to_string()])
    })
}

pub fn start_haproxy(cluster: &SimCluster, certs: &Certs, base_port: u16) -> Result<PeerPair> {
    let dir = cluster.work_dir.join("haproxy");
    fs::create_dir_all(&dir)?;
    let hops = hops(cluster, base_port);
    let common = "global\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  \
                  ssl-default-server-options ssl-min-ver TLSv1.3\n\
                  defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
                  timeout server 60s\n";
    let (mut client, mut server) = (common.to_string(), common.to_string());
    for (i, h) in hops.iter().enumerate() {
        let _ = write!(
            client,
            "listen app{i}\n  bind {}\n  server b {} ssl crt {} ca-file {} verify required\n",
            h.entry,
            h.tunnel,
            certs.client_bundle.display(),
            certs.ca.display()
        );
        let _ = write!(
            server,
            "listen app{i}\n  bind {} ssl crt {} ca-file {} verify required\n  server s {}\n",
            h.tunnel,
            certs.server_bundle.display(),
            certs.ca.display(),
            h.backend
        );
    }
    start_pair(cluster, "haproxy", &dir, &hops, (client, server), |conf| {
        (
            "haproxy",
            vec!["-db".into(), "-f".into(), conf.display().to_string()],
        )
    })
}
