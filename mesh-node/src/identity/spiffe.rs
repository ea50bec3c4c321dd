//! SPIFFE identities on the wire: reading the one SPIFFE ID (URI SAN) a workload
//! certificate names, the mesh root as rustls and webpki want it, and the check a
//! client makes of a server: a chain to the mesh root plus an exact SPIFFE ID match
//! (workload certificates carry no DNS names).

use std::{fmt, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{identity::pem, identity::Identity};

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

/// The mesh root, as rustls and webpki want it.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// The roots, for a webpki client-certificate verifier.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// A verifier that accepts a server only if it chains to this root and names
    /// exactly `expected`.
    pub fn server_verifier(&self, expected: Identity) -> Arc<SpiffeServerVerifier> {
        Arc::new(SpiffeServerVerifier {
            anchors: self.anchors.clone(),
            expected,
            provider: pem::provider(),
        })
    }

    pub fn from_pem(pem: &str) -> Result<TrustBundle, String> {
        let roots = pem::roots_from_pem(pem)?;
        let anchors = roots.roots.clone();
        Ok(TrustBundle { roots, anchors })
    }

    /// Whether a workload certificate chain is one peers would accept now: it chains
    /// to this root and is valid for both ends of mutual TLS.
    pub fn verify_workload(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let (leaf, intermediates) = chain.split_first().ok_or("empty certificate chain")?;
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
        let provider = pem::provider();
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
