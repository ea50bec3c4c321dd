//! Workload certificates of the identities with pods on this node. One key per
//! identity, in memory (and, when configured, in a private memory-backed cache that
//! survives agent restarts); a CSR to the CA; refresh at half-life (with jitter); a
//! short, jittered backoff while the CA is unreachable, the current certificate serving
//! until it expires. An identity is forgotten only when its last pod has left the node
//! and nothing uses it any more: a connection that started under it holds a lease.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    identity::ca::authority::new_csr_with_key, identity::ca::client::CaClient,
    identity::cert_cache::CachedCertificate, identity::cert_cache::CertCache,
    identity::spiffe::TrustBundle, identity::workload_certificate::certified,
    identity::workload_certificate::WorkloadCertificate, identity::Identity,
    telemetry::metrics::Metrics,
};

/// Where an identity's certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertificateState {
    Valid,
    Expired,
    /// Not issued yet.
    Pending,
}

impl CertificateState {
    pub fn name(self) -> &'static str {
        match self {
            CertificateState::Valid => "valid",
            CertificateState::Expired => "expired",
            CertificateState::Pending => "pending",
        }
    }
}

/// What the admin API shows about a certificate (and `meshctl` reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub identity: Identity,
    pub state: CertificateState,
    pub serial: Option<String>,
    pub not_before_unix: Option<u64>,
    pub not_after_unix: Option<u64>,
    pub last_error: Option<String>,
}

struct Slot {
    current: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
    /// Set (under its lock) when the identity is forgotten, so that a renewal
    /// finishing at that moment does not write its files back.
    retired: Arc<Mutex<bool>>,
    task: JoinHandle<()>,
    /// A pod of this identity is on the node.
    wanted: bool,
    /// Pods and connections using the identity now (see [`IdentityLease`]).
    leases: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct CertificateStore {
    ca: Arc<CaClient>,
    metrics: Arc<Metrics>,
    trust: TrustBundle,
    cache: Option<Arc<CertCache>>,
    slots: Mutex<HashMap<Identity, Slot>>,
    /// Whether the cache was cleared of identities no pod of this node has (done once,
    /// at the first reconcile after a start).
    cache_pruned: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateStore")
            .field("identities", &lock(&self.slots).len())
            .finish()
    }
}

/// Keeps an identity's key and certificate while held: a pod's listeners and every
/// connection they accepted hold one, so a pod that leaves the mesh lets its
/// connections finish under the identity they started with.
pub struct IdentityLease {
    store: Arc<CertificateStore>,
    identity: Identity,
}

impl std::fmt::Debug for IdentityLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityLease({})", self.identity)
    }
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        self.store.release(&self.identity);
    }
}

const BACKOFF_START: Duration = Duration::from_millis(500);
/// Low, so that a CA that answers again is noticed within seconds.
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Half to all of `backoff`, so a node's identities (and nodes) do not retry in step.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// When to refresh: half-way through the remaining validity, minus up to 10 % jitter so
/// a node's identities do not all renew at once. Measured from now, not from
/// `not_before`, which the CA backdates for clock skew.
fn refresh_delay(cert: &WorkloadCertificate, now: SystemTime) -> Duration {
    let remaining = cert.not_after.duration_since(now).unwrap_or_default();
    let jitter = remaining.mul_f64(rand::random::<f64>() * 0.1);
    remaining / 2 - jitter
}

/// One identity's certificate upkeep.
struct Upkeep {
    identity: Identity,
    ca: Arc<CaClient>,
    metrics: Arc<Metrics>,
    trust: TrustBundle,
    cache: Option<Arc<CertCache>>,
    current: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
    retired: Arc<Mutex<bool>>,
}

impl Upkeep {
    /// The key and certificate kept from before a restart, when still usable.
    fn kept(&self) -> Option<(KeyPair, WorkloadCertificate)> {
        let cache = self.cache.as_ref()?;
        let identity = &self.identity;
        let found = cache.load(identity).and_then(|e| {
            e.map(|e| e.usable(identity, &self.trust, SystemTime::now()))
                .transpose()
        });
        match found {
            Ok(kept) => kept,
            Err(reason) => {
                warn!(%identity, %reason, "kept workload certificate not used; asking the CA for a new one");
                cache.remove(identity);
                None
            }
        }
    }

    fn keep(&self, key: &KeyPair, chain: &str) {
        let Some(cache) = &self.cache else { return };
        let retired = lock(&self.retired);
        if *retired {
            return;
        }
        let entry = CachedCertificate {
            identity: self.identity.to_string(),
            key: key.serialize_pem(),
            chain: chain.to_string(),
        };
        if let Err(e) = cache.store(&self.identity, &entry) {
            warn!(identity = %self.identity, dir = %cache.dir().display(), error = %e, "cannot keep the workload certificate for restarts");
        }
    }

    async fn run(self) {
        let identity = self.identity.clone();
        let (key, mut delay) = match self.kept() {
            Some((key, cert)) => {
                info!(%identity, serial = %cert.serial, not_after = unix(cert.not_after), "workload certificate kept from before the restart serves");
                let delay = refresh_delay(&cert, SystemTime::now());
                self.current.send_replace(Some(Arc::new(cert)));
                (key, delay)
            }
            None => match KeyPair::generate() {
                Ok(k) => (k, Duration::ZERO),
                Err(e) => {
                    *lock(&self.last_error) = Some(format!("cannot generate a key: {e}"));
                    return;
                }
            },
        };
        let mut backoff = BACKOFF_START;
        loop {
            tokio::time::sleep(delay).await;
            let issued = match new_csr_with_key(&identity, &key) {
                Ok(csr) => self
                    .ca
                    .sign(&identity, &csr)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
            .and_then(|(pem, _root)| certified(&identity, &key, &pem).map(|c| (c, pem)));
            match issued {
                Ok((cert, pem)) => {
                    info!(%identity, serial = %cert.serial, not_after = unix(cert.not_after), "workload certificate issued");
                    self.metrics.certificates_issued.inc();
                    delay = refresh_delay(&cert, SystemTime::now());
                    self.current.send_replace(Some(Arc::new(cert)));
                    *lock(&self.last_error) = None;
                    self.keep(&key, &pem);
                    backoff = BACKOFF_START;
                }
                Err(e) => {
                    self.metrics.certificate_errors.inc();
                    delay = jittered(backoff);
                    warn!(%identity, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot get a workload certificate; the current one (if any) keeps serving");
                    *lock(&self.last_error) = Some(e);
                    // An expired certificate must not be offered any more.
                    let expired = self
                        .current
                        .borrow()
                        .as_ref()
                        .is_some_and(|c| !c.is_valid(SystemTime::now()));
                    if expired {
                        self.current.send_replace(None);
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

impl CertificateStore {
    /// `cache`: where keys and certificates are kept across restarts (None: memory
    /// only); what is found there is used only if `trust` accepts it.
    pub fn new(
        ca: Arc<CaClient>,
        metrics: Arc<Metrics>,
        trust: TrustBundle,
        cache: Option<CertCache>,
    ) -> Arc<CertificateStore> {
        Arc::new(CertificateStore {
            ca,
            metrics,
            trust,
            cache: cache.map(Arc::new),
            slots: Mutex::new(HashMap::new()),
            cache_pruned: Default::default(),
        })
    }

    fn new_slot(&self, identity: &Identity) -> Slot {
        let (current, _) = watch::channel(None);
        let last_error = Arc::new(Mutex::new(None));
        let retired = Arc::new(Mutex::new(false));
        let task = tokio::spawn(
            Upkeep {
                identity: identity.clone(),
                ca: self.ca.clone(),
                metrics: self.metrics.clone(),
                trust: self.trust.clone(),
                cache: self.cache.clone(),
                current: current.clone(),
                last_error: last_error.clone(),
                retired: retired.clone(),
            }
            .run(),
        );
        Slot {
            current,
            last_error,
            retired,
            task,
            wanted: false,
            leases: 0,
        }
    }

    /// Drops a slot nothing uses: its task stops, its kept files go.
    fn forget(&self, identity: &Identity, slot: Slot) {
        info!(%identity, "no pod of this identity is left and nothing uses it; forgetting its key and certificate");
        let mut retired = lock(&slot.retired);
        *retired = true;
        if let Some(cache) = &self.cache {
            cache.remove(identity);
        }
        drop(retired);
        drop(slot);
    }

    /// Fetches certificates for new identities (prefetch as pods land) and forgets
    /// those no pod on the node has any more, once nothing uses them.
    pub fn set_identities(&self, wanted: &BTreeSet<Identity>) {
        let mut slots = lock(&self.slots);
        for (id, slot) in slots.iter_mut() {
            slot.wanted = wanted.contains(id);
        }
        let unused: Vec<Identity> = slots
            .iter()
            .filter(|(_, s)| !s.wanted && s.leases == 0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in unused {
            if let Some(slot) = slots.remove(&id) {
                self.forget(&id, slot);
            }
        }
        for id in wanted {
            if !slots.contains_key(id) {
                let mut slot = self.new_slot(id);
                slot.wanted = true;
                slots.insert(id.clone(), slot);
            }
        }
        if !self
            .cache_pruned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            if let Some(cache) = &self.cache {
                cache.retain(slots.keys());
            }
        }
    }

    /// Holds `identity` (starting its upkeep if no pod asked for it yet) until the
    /// lease is dropped.
    pub fn lease(self: &Arc<Self>, identity: &Identity) -> IdentityLease {
        let mut slots = lock(&self.slots);
        if !slots.contains_key(identity) {
            let slot = self.new_slot(identity);
            slots.insert(identity.clone(), slot);
        }
        if let Some(slot) = slots.get_mut(identity) {
            slot.leases += 1;
        }
        IdentityLease {
            store: self.clone(),
            identity: identity.clone(),
        }
    }

    fn release(&self, identity: &Identity) {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(identity) else {
            return;
        };
        slot.leases = slot.leases.saturating_sub(1);
        if slot.leases == 0 && !slot.wanted {
            if let Some(slot) = slots.remove(identity) {
                self.forget(identity, slot);
            }
        }
    }

    /// Identities of this node's pods without a valid certificate now.
    pub fn pending(&self) -> Vec<Identity> {
        let now = SystemTime::now();
        let slots = lock(&self.slots);
        let mut out: Vec<Identity> = slots
            .iter()
            .filter(|(_, s)| s.wanted)
            .filter(|(_, s)| !s.current.borrow().as_ref().is_some_and(|c| c.is_valid(now)))
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out
    }

    /// Why the node cannot serve all its pods yet: the identities still waiting for a
    /// certificate (None: every local identity has one).
    pub fn unready_reason(&self) -> Option<String> {
        let pending = self.pending();
        if pending.is_empty() {
            return None;
        }
        let names: Vec<String> = pending.iter().map(Identity::to_string).collect();
        Some(format!(
            "no certificate yet for {} (is the CA reachable? see /certs)",
            names.join(", ")
        ))
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
                        Some(c) if c.is_valid(now) => CertificateState::Valid,
                        Some(_) => CertificateState::Expired,
                        None => CertificateState::Pending,
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
    use crate::{identity::ca::authority::new_csr, identity::ca::authority::CertificateAuthority};

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

    #[tokio::test]
    async fn an_identity_stays_while_leased_after_its_last_pod_left() {
        let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(60)).unwrap();
        let client =
            CaClient::new("127.0.0.1:9".parse().unwrap(), None, ca.root_pem(), "token").unwrap();
        let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let store = CertificateStore::new(Arc::new(client), Arc::new(Metrics::new()), trust, None);
        let id = Identity::new("cluster.local", "apps", "client");
        let known = |s: &CertificateStore| s.status().iter().any(|c| c.identity == id);

        store.set_identities(&BTreeSet::from([id.clone()]));
        assert_eq!(store.pending(), vec![id.clone()], "no CA: pending");
        let first = store.lease(&id);
        let second = store.lease(&id);
        store.set_identities(&BTreeSet::new());
        assert!(known(&store), "kept while connections use it");
        assert!(store.pending().is_empty(), "no pod of it: not pending");
        drop(first);
        assert!(known(&store));
        drop(second);
        assert!(!known(&store), "forgotten once nothing uses it");

        // A lease without a pod starts the upkeep and ends it.
        let lease = store.lease(&id);
        assert!(known(&store));
        drop(lease);
        assert!(!known(&store));
        // The pod's own lease does not keep it past the pod when released.
        store.set_identities(&BTreeSet::from([id.clone()]));
        let pods = store.lease(&id);
        drop(pods);
        assert!(known(&store), "its pod is still on the node");
    }
}
