//! Full HBONE mTLS handshakes per second (TLS 1.3, ECDSA P-256, client certificate
//! and SPIFFE checks both ways) over loopback, one at a time, with the agent's own
//! TLS configs.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_node::{
    hbone::tls::static_client_config, identity::ca::authority::new_csr,
    identity::ca::authority::CertificateAuthority, identity::pem, identity::spiffe::TrustBundle,
    identity::Identity,
};
use rustls::{pki_types::ServerName, server::WebPkiClientVerifier, ServerConfig};
use tokio::net::{TcpListener, TcpStream};

const ROUNDS: u32 = 2000;

fn main() {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let issue = |id: &Identity| {
        let (key, csr) = new_csr(id).unwrap();
        (ca.sign(&csr, id).unwrap(), key.serialize_pem())
    };
    let client_id = Identity::new("cluster.local", "apps", "client");
    let server_id = Identity::new("cluster.local", "apps", "server");
    let (client_cert, client_key) = issue(&client_id);
    let (server_cert, server_key) = issue(&server_id);
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let client =
        static_client_config(Some((&client_cert, &client_key)), &trust, server_id).unwrap();
    let roots = pem::roots_from_pem(ca.root_pem()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, pem::provider())
        .build()
        .unwrap();
    let mut server = ServerConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pem::certs_from_pem(&server_cert).unwrap(),
            pem::key_from_pem(&server_key).unwrap(),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(client);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        let started = Instant::now();
        for _ in 0..ROUNDS {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .expect("handshake");
        }
        let elapsed = started.elapsed();
        println!(
            "HBONE mTLS handshakes (client and server in one process, sequential): {:.0}/s ({:.0} µs each, {ROUNDS} rounds)",
            f64::from(ROUNDS) / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / f64::from(ROUNDS)
        );
    });
}
