//! The certificate authority's core: a root (generated and kept in a directory in the
//! embedded mode, or loaded from a Secret's files), and signing of workload CSRs for
//! exactly the SPIFFE ID asked for. Nothing in a CSR but its key and its (checked)
//! SAN reaches the certificate.

use std::{
    fs,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use thiserror::Error;
use time::OffsetDateTime;

use crate::{identity::Identity, telemetry::log_limit::clip};

/// Workload certificates start this far in the past, for clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(300);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, Error)]
pub enum CaError {
    #[error("cannot create a key or certificate: {0}")]
    Crypto(#[from] rcgen::Error),
    #[error("the CSR does not parse or its signature is invalid: {0}")]
    Csr(String),
    /// `first` is clipped: a CSR is the requester's input and this text is echoed.
    #[error("the CSR asks for {count} SAN(s) (first: {first}), but the request is for exactly {asked}: put exactly that SPIFFE ID, and nothing else, in the CSR")]
    SanMismatch {
        asked: String,
        count: usize,
        first: String,
    },
    #[error("identity {asked} is outside this CA's trust domain {trust_domain}")]
    TrustDomain { asked: String, trust_domain: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct CertificateAuthority {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
    ttl: Duration,
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn root_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nodemesh");
    dn.push(
        DnType::CommonName,
        format!("Nodemesh root CA ({trust_domain})"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = offset(now - BACKDATE);
    params.not_after = offset(now + ROOT_VALIDITY);
    params.serial_number = Some(random_serial());
    params
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CertificateAuthority {
    /// A fresh self-signed root.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate()?;
        let params = root_params(trust_domain);
        let root = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.into(),
            ttl,
        })
    }

    /// A root from PEM (e.g. a Kubernetes Secret's `ca.crt` / `ca.key`).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority {
            root_pem: cert_pem.to_string(),
            issuer,
            trust_domain: trust_domain.into(),
            ttl,
        })
    }

    /// Loads `root.pem`/`root-key.pem` from `dir`, or generates them on first start.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<CertificateAuthority, CaError> {
        let cert_path = dir.join("root.pem");
        let key_path = dir.join("root-key.pem");
        if cert_path.exists() && key_path.exists() {
            let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            return CertificateAuthority::from_pem(&cert, &key, trust_domain, ttl);
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = KeyPair::generate()?;
        let params = root_params(trust_domain);
        let root = params.self_signed(&key)?;
        // The key first, readable by the owner only.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes()))
            .map_err(io_err(&key_path))?;
        fs::write(&cert_path, root.pem()).map_err(io_err(&cert_path))?;
        Ok(CertificateAuthority {
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.into(),
            ttl,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs a workload CSR for `identity`, valid for the CA's TTL.
    pub fn sign(&self, csr_pem: &str, identity: &Identity) -> Result<String, CaError> {
        let now = SystemTime::now();
        self.sign_with_validity(csr_pem, identity, now - BACKDATE, now + self.ttl)
    }

    /// Signs with an explicit validity window (tests mint expired certificates with it).
    pub fn sign_with_validity(
        &self,
        csr_pem: &str,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::TrustDomain {
                asked: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(clip(&e.to_string()).into_owned()))?;
        let asked = identity.to_string();
        let found: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if found != [asked.clone()] {
            return Err(CaError::SanMismatch {
                asked,
                count: found.len(),
                first: found
                    .first()
                    .map(|f| clip(f).into_owned())
                    .unwrap_or_else(|| "none".into()),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(asked.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// A TLS server certificate for the CA's own endpoint (DNS names and IPs).
    pub fn issue_server_certificate(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + ROOT_VALIDITY / 10);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A key pair and a CSR for `identity` (what an agent sends to the CA).
pub fn new_csr(identity: &Identity) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate()?;
    let csr = new_csr_with_key(identity, &key)?;
    Ok((key, csr))
}

/// A CSR for `identity` signed with an existing key (the agent keeps one per identity).
pub fn new_csr_with_key(identity: &Identity, key: &KeyPair) -> Result<String, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().as_str().try_into()?)];
    Ok(params.serialize_request(key)?.pem()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::{extensions::GeneralName, pem::parse_x509_pem};

    fn uri_sans(pem: &str) -> Vec<String> {
        let (_, p) = parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        cert.subject_alternative_name()
            .unwrap()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn signs_exactly_the_identity_asked_for_with_the_ttl() {
        let ca =
            CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("cluster.local", "apps", "client");
        let (_key, csr) = new_csr(&id).unwrap();
        let leaf = ca.sign(&csr, &id).unwrap();
        assert_eq!(uri_sans(&leaf), vec![id.to_string()]);
        let (_, p) = parse_x509_pem(leaf.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + BACKDATE.as_secs() as i64);
        assert!(!cert.is_ca());
    }

    #[test]
    fn a_refusal_does_not_echo_a_huge_csr_back() {
        let ca =
            CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = (0..2000)
            .map(|i| {
                SanType::DnsName(
                    format!("san-{i:04}-{}.example", "x".repeat(20))
                        .try_into()
                        .unwrap(),
                )
            })
            .collect();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(csr.len() > 60_000, "a big CSR: {} bytes", csr.len());
        let err = ca
            .sign(&csr, &Identity::new("cluster.local", "apps", "client"))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, CaError::SanMismatch { count: 2000, .. }),
            "{text}"
        );
        assert!(
            text.len() < 512,
            "the answer echoes {} bytes: {text}",
            text.len()
        );
    }

    #[test]
    fn refuses_a_csr_for_another_identity_or_trust_domain() {
        let ca =
            CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let (_key, csr) = new_csr(&Identity::new("cluster.local", "apps", "admin")).unwrap();
        let err = ca
            .sign(&csr, &Identity::new("cluster.local", "apps", "client"))
            .unwrap_err();
        assert!(matches!(err, CaError::SanMismatch { .. }), "{err}");
        let other_td = Identity::new("other.domain", "apps", "client");
        let (_key, csr) = new_csr(&other_td).unwrap();
        assert!(matches!(
            ca.sign(&csr, &other_td).unwrap_err(),
            CaError::TrustDomain { .. }
        ));
        assert!(matches!(
            ca.sign("garbage", &other_td).unwrap_err(),
            CaError::TrustDomain { .. }
        ));
        let id = Identity::new("cluster.local", "apps", "client");
        assert!(matches!(
            ca.sign(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &id
            )
            .unwrap_err(),
            CaError::Csr(_)
        ));
    }

    #[test]
    fn a_generated_root_is_kept_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::load_or_generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(60),
        )
        .unwrap();
        let again = CertificateAuthority::load_or_generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.path().join("root-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // The reloaded CA still signs.
        let id = Identity::new("cluster.local", "apps", "client");
        let (_key, csr) = new_csr(&id).unwrap();
        assert!(again.sign(&csr, &id).is_ok());
    }
}
