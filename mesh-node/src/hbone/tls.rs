//! mTLS for HBONE. Workload certificates name a SPIFFE ID (URI SAN) and nothing else,
//! so the client's server-certificate check is a chain check to the mesh root plus an
//! exact SPIFFE ID match, not a DNS name check. The server requires a client
//! certificate chained to the root (webpki, client-auth usage); the caller then reads
//! and checks the peer's SPIFFE ID.

use std::{fmt, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::{danger::ClientCertVerifier, ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{certificates::CertificateStore, identity::Identity, tls};

pub const ALPN_H2: &[u8] = b"h2";

/// The single SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or("certificate has no SAN")?;
    let uris: Vec<&str> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse(),
        _ => Err(format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )),
    }
}

/// Checks the server's chain against the mesh root and its SPIFFE ID against the one
/// expected for the destination pod.
pub struct SpiffeServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    expected: Identity,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeServerVerifier({})", self.expected)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            TlsError::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            TlsError::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        match spiffe_id(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            _ => Err(TlsError::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

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

/// The mesh root, as rustls and webpki want it.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    pub fn from_pem(pem: &str) -> Result<TrustBundle, String> {
        let roots = tls::roots_from_pem(pem)?;
        let anchors = roots.roots.clone();
        Ok(TrustBundle { roots, anchors })
    }

    /// Whether a workload certificate chain is one peers would accept now: it chains
    /// to this root and is valid for both ends of mutual TLS.
    pub fn verify_workload(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let (leaf, intermediates) = chain.split_first().ok_or("empty certificate chain")?;
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
        let provider = tls::provider();
        let now = UnixTime::now();
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            cert.verify_for_usage(
                provider.signature_verification_algorithms.all,
                &self.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// What a pod's 15008 listener asks of a client certificate: one is required, chained
/// to the mesh root, valid now and usable for client authentication. The caller then
/// reads and checks the peer's SPIFFE ID.
pub(crate) fn client_cert_verifier(
    trust: &TrustBundle,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), tls::provider())
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
    let mut config = ServerConfig::builder_with_provider(tls::provider())
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
    let verifier = Arc::new(SpiffeServerVerifier {
        anchors: trust.anchors.clone(),
        expected,
        provider: tls::provider(),
    });
    let mut config = ClientConfig::builder_with_provider(tls::provider())
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
    let verifier = Arc::new(SpiffeServerVerifier {
        anchors: trust.anchors.clone(),
        expected,
        provider: tls::provider(),
    });
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match certificate {
        Some((cert, key)) => builder
            .with_client_auth_cert(tls::certs_from_pem(cert)?, tls::key_from_pem(key)?)
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
