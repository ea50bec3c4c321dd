//! mTLS for HBONE. Workload certificates name a SPIFFE ID (URI SAN) and nothing else,
//! so the client's server-certificate check is a chain check to the mesh root plus an
//! exact SPIFFE ID match, not a DNS name check. The server requires a client
//! certificate chained to the root (webpki, client-auth usage); the caller then reads
//! and checks the peer's SPIFFE ID.

use std::sync::Arc;

use rustls::{
    client::ResolvesClientCert,
    server::{danger::ClientCertVerifier, ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ClientConfig, ServerConfig, SignatureScheme,
};

use crate::{
    identity::certificates::CertificateStore, identity::pem, identity::spiffe::TrustBundle,
    identity::Identity,
};

pub const ALPN_H2: &[u8] = b"h2";

/// Presents the current certificate of one identity (rotation needs no new config).
#[derive(Debug)]
struct IdentityCert {
    store: Arc<CertificateStore>,
    identity: Identity,
}

impl ResolvesServerCert for IdentityCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.get(&self.identity).map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for IdentityCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.get(&self.identity).map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a pod's 15008 listener asks of a client certificate: one is required, chained
/// to the mesh root, valid now and usable for client authentication. The caller then
/// reads and checks the peer's SPIFFE ID.
pub(crate) fn client_cert_verifier(
    trust: &TrustBundle,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(trust.roots(), pem::provider())
        .build()
        .map_err(|e| e.to_string())
}

/// Server side of one pod's 15008 listener: its own certificate, client certificates
/// required.
pub fn server_config(
    store: Arc<CertificateStore>,
    identity: Identity,
    trust: &TrustBundle,
) -> Result<Arc<ServerConfig>, String> {
    let verifier = client_cert_verifier(trust)?;
    let mut config = ServerConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(IdentityCert { store, identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Client side for one (source, destination) identity pair.
pub fn client_config(
    store: Arc<CertificateStore>,
    source: Identity,
    expected: Identity,
    trust: &TrustBundle,
) -> Result<Arc<ClientConfig>, String> {
    let verifier = trust.server_verifier(expected);
    let mut config = ClientConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(IdentityCert {
            store,
            identity: source,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client config with a fixed certificate (or none), for tools and tests that are
/// not agents; the server must still prove `expected`.
pub fn static_client_config(
    certificate: Option<(&str, &str)>,
    trust: &TrustBundle,
    expected: Identity,
) -> Result<Arc<ClientConfig>, String> {
    let verifier = trust.server_verifier(expected);
    let builder = ClientConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match certificate {
        Some((cert, key)) => builder
            .with_client_auth_cert(pem::certs_from_pem(cert)?, pem::key_from_pem(key)?)
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
