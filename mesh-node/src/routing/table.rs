//! The routing table of one discovery snapshot: each Service port's route (TCPRoute,
//! weighted backends, ready endpoints parsed) and each pod address's transport, built
//! the first time a connection needs them and kept for as long as the snapshot serves.
//! A new snapshot starts a new table; the node's pods share it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{mpsc, Arc, Mutex, RwLock, Weak},
};

use crate::{
    discovery::cluster::canonical,
    discovery::cluster::ClusterState,
    keys::ObjectKey,
    routing::resolve::{
        addressed, service_route, subset_backend, Addressed, Backend, IpCidr, Lookup, ServiceRoute,
    },
    routing::transport::{endpoint_info, EndpointInfo, Transport},
};

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A cached backend of one Service: (port, IPv6, subset) and what it resolves to.
type BackendEntry = (u16, bool, Option<String>, Arc<Backend>);

/// At most this many cached backends per Service (ports × families × subsets); past
/// it, backends are built per call.
const MAX_BACKENDS_PER_SERVICE: usize = 256;

/// The routing of one snapshot. Only Service ports that exist and pod addresses are
/// kept (both bounded by the snapshot's objects), never arbitrary destinations.
pub struct RoutingTable {
    service_cidrs: Arc<Vec<IpCidr>>,
    /// The mesh's trust domain; None without a CA (no mutual TLS: every transport is
    /// plain TCP).
    trust_domain: Option<String>,
    /// By (canonical Service address, port).
    services: RwLock<HashMap<(IpAddr, u16), Arc<ServiceRoute>>>,
    /// By canonical pod address.
    pods: RwLock<HashMap<IpAddr, Arc<EndpointInfo>>>,
    /// Backends by Service, then (port, IPv6, subset): what routes naming a subset
    /// resolve to. Bounded by the snapshot's Services and what routes name.
    backends: RwLock<HashMap<ObjectKey, Vec<BackendEntry>>>,
    /// Any address no pod has.
    outside: Arc<EndpointInfo>,
}

impl RoutingTable {
    /// An empty table; use it with one snapshot only.
    pub fn new(service_cidrs: Arc<Vec<IpCidr>>, trust_domain: Option<String>) -> RoutingTable {
        RoutingTable {
            service_cidrs,
            trust_domain,
            services: RwLock::default(),
            pods: RwLock::default(),
            backends: RwLock::default(),
            outside: Arc::new(EndpointInfo {
                pod: None,
                transport: Transport::Plain,
            }),
        }
    }

    /// Room for as many entries as `other` has.
    fn reserve(&mut self, other: &RoutingTable) {
        let services = read(&other.services).len();
        let pods = read(&other.pods).len();
        write(&self.services).reserve(services);
        write(&self.pods).reserve(pods);
    }

    /// What a connection to `dst` resolves to (`state` is the table's snapshot).
    pub fn lookup(&self, state: &ClusterState, dst: SocketAddr) -> Lookup {
        let ip = canonical(dst.ip());
        let key = (ip, dst.port());
        if let Some(route) = read(&self.services).get(&key) {
            return Lookup::Service(route.clone());
        }
        match addressed(state, ip, dst.port(), &self.service_cidrs) {
            Addressed::Direct => Lookup::Direct,
            Addressed::UnknownService => Lookup::UnknownService,
            Addressed::UnknownPort(frontend) => Lookup::UnknownPort(frontend),
            Addressed::ServicePort(service, svc) => {
                let built = Arc::new(service_route(state, service, svc, dst.port(), ip.is_ipv6()));
                Lookup::Service(write(&self.services).entry(key).or_insert(built).clone())
            }
        }
    }

    /// `service:port`'s backend, limited to DestinationRule `subset` when given (no
    /// such subset: no endpoints, fail closed), with its policy; weight 1. Built once
    /// per snapshot (`state` is the table's).
    pub fn backend(
        &self,
        state: &ClusterState,
        service: &ObjectKey,
        port: u16,
        subset: Option<&str>,
        want_v6: bool,
    ) -> Arc<Backend> {
        let matches = |e: &&BackendEntry| e.0 == port && e.1 == want_v6 && e.2.as_deref() == subset;
        if let Some(found) = read(&self.backends)
            .get(service)
            .and_then(|entries| entries.iter().find(matches))
        {
            return found.3.clone();
        }
        let built = Arc::new(subset_backend(
            state,
            service.clone(),
            port,
            1,
            want_v6,
            subset,
        ));
        if !state.services.contains_key(service) {
            return built;
        }
        let mut backends = write(&self.backends);
        let entries = backends.entry(service.clone()).or_default();
        if let Some(found) = entries.iter().find(matches) {
            return found.3.clone();
        }
        if entries.len() < MAX_BACKENDS_PER_SERVICE {
            entries.push((port, want_v6, subset.map(str::to_string), built.clone()));
        }
        built
    }

    /// The pod at `endpoint` and how to reach it (`state` is the table's snapshot).
    pub fn endpoint(&self, state: &ClusterState, endpoint: SocketAddr) -> Arc<EndpointInfo> {
        let ip = canonical(endpoint.ip());
        if let Some(info) = read(&self.pods).get(&ip) {
            return info.clone();
        }
        if state.pod_by_ip(ip).is_none() {
            return self.outside.clone();
        }
        let info = Arc::new(endpoint_info(state, self.trust_domain.as_deref(), ip));
        write(&self.pods).entry(ip).or_insert(info).clone()
    }
}

/// The node's routing: the current snapshot's table, shared by every pod.
pub struct Router {
    service_cidrs: Arc<Vec<IpCidr>>,
    trust_domain: Option<String>,
    /// The snapshot the table was built for; a `Weak` keeps the allocation, so a new
    /// snapshot can never reuse its address.
    current: RwLock<(Weak<ClusterState>, Arc<RoutingTable>)>,
    /// Where replaced tables are dropped, off the proxy's tasks (a full table is
    /// thousands of allocations).
    retired: Mutex<Option<mpsc::Sender<Arc<RoutingTable>>>>,
}

impl Router {
    /// `trust_domain`: Some when a CA is configured (mutual TLS between enrolled pods).
    pub fn new(service_cidrs: Arc<Vec<IpCidr>>, trust_domain: Option<String>) -> Router {
        let table = Arc::new(RoutingTable::new(
            service_cidrs.clone(),
            trust_domain.clone(),
        ));
        Router {
            service_cidrs,
            trust_domain,
            current: RwLock::new((Weak::new(), table)),
            retired: Mutex::new(None),
        }
    }

    /// The table of `state`: the one already built for it, or a new (empty) one when
    /// the snapshot changed.
    pub fn table(&self, state: &Arc<ClusterState>) -> Arc<RoutingTable> {
        let current = read(&self.current);
        if std::ptr::eq(current.0.as_ptr(), Arc::as_ptr(state)) {
            return current.1.clone();
        }
        drop(current);
        let mut current = write(&self.current);
        if std::ptr::eq(current.0.as_ptr(), Arc::as_ptr(state)) {
            return current.1.clone();
        }
        // Sized for the Service ports and pods the last snapshot's traffic needed.
        let mut table = RoutingTable::new(self.service_cidrs.clone(), self.trust_domain.clone());
        table.reserve(&current.1);
        let table = Arc::new(table);
        let (_, old) = std::mem::replace(&mut *current, (Arc::downgrade(state), table.clone()));
        drop(current);
        self.retire(old);
        table
    }

    /// Drops a replaced table on the retiring thread (started on first use); inline if
    /// it cannot start.
    fn retire(&self, table: Arc<RoutingTable>) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if retired.is_none() {
            let (tx, rx) = mpsc::channel::<Arc<RoutingTable>>();
            let spawned = std::thread::Builder::new()
                .name("routing-retire".into())
                .spawn(move || rx.into_iter().for_each(drop));
            if spawned.is_ok() {
                *retired = Some(tx);
            }
        }
        if let Some(tx) = retired.as_ref() {
            // (Fails only if the thread is gone: then the table is dropped here.)
            let _ = tx.send(table);
        }
    }
}
