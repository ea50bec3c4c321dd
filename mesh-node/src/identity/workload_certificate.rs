//! A usable workload certificate: the rustls key pair of one identity, with the
//! validity and serial read from what the CA issued.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::KeyPair;
use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use x509_parser::pem::parse_x509_pem;

use crate::identity::{pem, Identity};

/// A usable certificate of one identity.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    pub certified: Arc<CertifiedKey>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    pub fn is_valid(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// Builds the rustls key and reads validity and serial from the issued PEM.
pub(crate) fn certified(
    identity: &Identity,
    key: &KeyPair,
    cert_pem: &str,
) -> Result<WorkloadCertificate, String> {
    let chain = pem::certs_from_pem(cert_pem)?;
    let (_, pem) =
        parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("certificate PEM: {e}"))?;
    let x509 = pem.parse_x509().map_err(|e| format!("certificate: {e}"))?;
    let validity = x509.validity();
    let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = pem::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("private key: {e}"))?;
    Ok(WorkloadCertificate {
        identity: identity.clone(),
        certified: Arc::new(CertifiedKey::new(chain, signing)),
        serial: x509.raw_serial_as_string(),
        not_before: at(validity.not_before.timestamp()),
        not_after: at(validity.not_after.timestamp()),
    })
}
