//! Workload certificates of the identities with pods on this node. One key per
//! identity, in memory only; a CSR to the CA; refresh at half-life (with jitter);
//! exponential backoff while the CA is unreachable, the current certificate serving
//! until it expires; forgotten when the identity's last pod leaves.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::KeyPair;
use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};
use x509_parser::pem::parse_x509_pem;

use crate::{
    ca::{authority::new_csr_with_key, client::CaClient},
    identity::Identity,
    metrics::Metrics,
    tls,
};

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

/// What the admin API shows about a certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateStatus {
    pub identity: Identity,
    pub state: &'static str,
    pub serial: Option<String>,
    pub not_before_unix: Option<u64>,
    pub not_after_unix: Option<u64>,
    pub last_error: Option<String>,
}

struct Slot {
    current: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct CertificateStore {
    ca: Arc<CaClient>,
    metrics: Arc<Metrics>,
    slots: Mutex<HashMap<Identity, Slot>>,
}

impl std::fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateStore")
            .field("identities", &lock(&self.slots).len())
            .finish()
    }
}

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds the rustls key and reads validity and serial from the issued PEM.
fn certified(
    identity: &Identity,
    key: &KeyPair,
    cert_pem: &str,
) -> Result<WorkloadCertificate, String> {
    let chain = tls::certs_from_pem(cert_pem)?;
    let (_, pem) =
        parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("certificate PEM: {e}"))?;
    let x509 = pem.parse_x509().map_err(|e| format!("certificate: {e}"))?;
    let validity = x509.validity();
    let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = tls::provider()
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

/// When to refresh: half-way through the remaining validity, minus up to 10 % jitter so
/// a node's identities do not all renew at once. Measured from now, not from
/// `not_before`, which the CA backdates for clock skew.
fn refresh_delay(cert: &WorkloadCertificate, now: SystemTime) -> Duration {
    let remaining = cert.not_after.duration_since(now).unwrap_or_default();
    let jitter = remaining.mul_f64(rand::random::<f64>() * 0.1);
    remaining / 2 - jitter
}

async fn maintain(
    identity: Identity,
    ca: Arc<CaClient>,
    metrics: Arc<Metrics>,
    current: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let key = match KeyPair::generate() {
        Ok(k) => k,
        Err(e) => {
            *lock(&last_error) = Some(format!("cannot generate a key: {e}"));
            return;
        }
    };
    let mut backoff = BACKOFF_START;
    loop {
        let issued = match new_csr_with_key(&identity, &key) {
            Ok(csr) => ca.sign(&identity, &csr).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
        .and_then(|(pem, _root)| certified(&identity, &key, &pem));
        match issued {
            Ok(cert) => {
                info!(%identity, serial = %cert.serial, not_after = unix(cert.not_after), "workload certificate issued");
                metrics.certificates_issued.inc();
                let delay = refresh_delay(&cert, SystemTime::now());
                current.send_replace(Some(Arc::new(cert)));
                *lock(&last_error) = None;
                backoff = BACKOFF_START;
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                metrics.certificate_errors.inc();
                warn!(%identity, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot get a workload certificate; the current one (if any) keeps serving");
                *lock(&last_error) = Some(e);
                // An expired certificate must not be offered any more.
                let expired = current
                    .borrow()
                    .as_ref()
                    .is_some_and(|c| !c.is_valid(SystemTime::now()));
                if expired {
                    current.send_replace(None);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

impl CertificateStore {
    pub fn new(ca: Arc<CaClient>, metrics: Arc<Metrics>) -> Arc<CertificateStore> {
        Arc::new(CertificateStore {
            ca,
            metrics,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Fetches certificates for new identities (prefetch as pods land) and forgets
    /// those no pod on the node has any more.
    pub fn set_identities(&self, wanted: &BTreeSet<Identity>) {
        let mut slots = lock(&self.slots);
        slots.retain(|id, _| {
            let keep = wanted.contains(id);
            if !keep {
                info!(identity = %id, "last pod of this identity left; forgetting its key and certificate");
            }
            keep
        });
        for id in wanted {
            if slots.contains_key(id) {
                continue;
            }
            let (current, _) = watch::channel(None);
            let last_error = Arc::new(Mutex::new(None));
            let task = tokio::spawn(maintain(
                id.clone(),
                self.ca.clone(),
                self.metrics.clone(),
                current.clone(),
                last_error.clone(),
            ));
            slots.insert(
                id.clone(),
                Slot {
                    current,
                    last_error,
                    task,
                },
            );
        }
    }

    /// The valid certificate of `identity`, if there is one now.
    pub fn get(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let slots = lock(&self.slots);
        let cert = slots.get(identity)?.current.borrow().clone()?;
        cert.is_valid(SystemTime::now()).then_some(cert)
    }

    /// Waits up to `timeout` for a valid certificate (a pod's first connection may
    /// arrive before its certificate).
    pub async fn wait(
        &self,
        identity: &Identity,
        timeout: std::time::Duration,
    ) -> Option<Arc<WorkloadCertificate>> {
        let mut rx = lock(&self.slots).get(identity)?.current.subscribe();
        let wait = rx.wait_for(|c| c.as_ref().is_some_and(|c| c.is_valid(SystemTime::now())));
        let cert = tokio::time::timeout(timeout, wait)
            .await
            .ok()?
            .ok()?
            .clone();
        cert
    }

    pub fn status(&self) -> Vec<CertificateStatus> {
        let slots = lock(&self.slots);
        let mut out: Vec<CertificateStatus> = slots
            .iter()
            .map(|(id, slot)| {
                let cert = slot.current.borrow().clone();
                let now = SystemTime::now();
                CertificateStatus {
                    identity: id.clone(),
                    state: match &cert {
                        Some(c) if c.is_valid(now) => "valid",
                        Some(_) => "expired",
                        None => "pending",
                    },
                    serial: cert.as_ref().map(|c| c.serial.clone()),
                    not_before_unix: cert.as_ref().map(|c| unix(c.not_before)),
                    not_after_unix: cert.as_ref().map(|c| unix(c.not_after)),
                    last_error: lock(&slot.last_error).clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::authority::{new_csr, CertificateAuthority};

    #[test]
    fn refresh_is_due_half_way_through_what_is_left_despite_backdating() {
        let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(20)).unwrap();
        let id = Identity::new("cluster.local", "apps", "client");
        let (key, csr) = new_csr(&id).unwrap();
        let cert = certified(&id, &key, &ca.sign(&csr, &id).unwrap()).unwrap();
        let now = SystemTime::now();
        let remaining = cert.not_after.duration_since(now).unwrap();
        // X.509 times are whole seconds, so a 20 s certificate has 19-20 s left.
        assert!(
            remaining > Duration::from_secs(18) && remaining <= Duration::from_secs(20),
            "{remaining:?}"
        );
        let delay = refresh_delay(&cert, now);
        // Half of what is left, minus up to 10 % of it: 40-50 % of the remaining time.
        assert!(
            delay >= remaining.mul_f64(0.4) && delay <= remaining / 2,
            "{delay:?} of {remaining:?}"
        );
        assert!(cert.is_valid(SystemTime::now()));
        assert!(!cert.is_valid(SystemTime::now() + Duration::from_secs(21)));
    }
}
