//! Enrolling one pod: its namespace found and held, its identity leased, its three
//! listeners opened inside the namespace, its eBPF map entries and pinned sk_lookup
//! link; and the inbound policy sk_lookup applies to it while no agent runs.

use super::*;

impl Workloads {
    pub(super) fn enroll(
        &self,
        mut plan: PodPlan,
        inbound_policy: InboundPolicy,
    ) -> Result<RunningPod, EnrollError> {
        let netns_path = self.locator.locate(&plan).map_err(EnrollError::Locate)?;
        let netns = Arc::new(Netns::open(&netns_path)?);
        if plan.ips.is_empty() {
            // Its status has no IP yet (the kubelet publishes it only once the
            // containers run): its namespace already has its addresses.
            plan.ips = netns.addresses(&self.home)?;
            if plan.ips.is_empty() {
                return Err(EnrollError::NoAddress(netns_path.display().to_string()));
            }
        }
        let sockets = PodSockets::new(netns.clone(), self.home.clone(), self.settings.socket_mark);
        let cookie = sockets.netns_cookie().map_err(|source| EnrollError::Io {
            what: "reading the namespace cookie".into(),
            source,
        })?;
        let has_v6 = plan.ips.iter().any(IpAddr::is_ipv6);
        let listen = |ip: IpAddr, port: u16| -> Result<Option<TcpListener>, EnrollError> {
            let addr = SocketAddr::new(ip, port);
            // A predecessor's listener, handed over: the very socket, queue and all.
            let inherited = crate::capture::dataplane::lock(&self.inherited).take(cookie, addr);
            if let Some(l) = inherited {
                return TcpListener::from_std(l)
                    .map(Some)
                    .map_err(|source| EnrollError::Io {
                        what: format!("taking over the listener on {addr} in the pod"),
                        source,
                    });
            }
            match sockets.listen(addr) {
                Ok(l) => Ok(Some(l)),
                // A pod without IPv6 may have it disabled entirely; that is fine.
                Err(_) if ip.is_ipv6() && !has_v6 => Ok(None),
                Err(source) => Err(EnrollError::Io {
                    what: format!("listening on {addr} in the pod"),
                    source,
                }),
            }
        };
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let outbound = [
            listen(IpAddr::V4(Ipv4Addr::LOCALHOST), OUTBOUND_PORT)?,
            listen(IpAddr::V6(Ipv6Addr::LOCALHOST), OUTBOUND_PORT)?,
        ];
        // The plaintext inbound listener is reachable only through sk_lookup, which never
        // steers the mesh's own ports: bound to loopback, no peer can connect to it by
        // its own address and make it the "original destination" of itself.
        let inbound4 = listen(IpAddr::V4(Ipv4Addr::LOCALHOST), INBOUND_PLAINTEXT_PORT)?;
        let inbound6 = listen(IpAddr::V6(Ipv6Addr::LOCALHOST), INBOUND_PLAINTEXT_PORT)?;
        let hbone = [listen(any4, HBONE_PORT)?, listen(any6, HBONE_PORT)?];

        let dup = |l: &Option<TcpListener>| -> Result<Option<OwnedFd>, EnrollError> {
            l.as_ref()
                .map(|l| l.as_fd().try_clone_to_owned())
                .transpose()
                .map_err(|source| EnrollError::Io {
                    what: "keeping the inbound listener".into(),
                    source,
                })
        };
        let inbound_fds = [dup(&inbound4)?, dup(&inbound6)?];
        // Every listener's address and a descriptor of it, for a successor (a
        // hand-over). Taken before anything else changes: running out of descriptors
        // here leaves nothing behind (no map entry, no accept loop holding a port).
        let mut listeners = Vec::new();
        for l in outbound
            .iter()
            .chain([&inbound4, &inbound6])
            .chain(hbone.iter())
            .flatten()
        {
            let kept = l
                .local_addr()
                .and_then(|a| Ok((a, l.as_fd().try_clone_to_owned()?)))
                .map_err(|source| EnrollError::Io {
                    what: "keeping a listener for a hand-over".into(),
                    source,
                })?;
            listeners.push(kept);
        }
        self.capture(
            &plan,
            &inbound_policy,
            cookie,
            [inbound4.as_ref(), inbound6.as_ref()].map(|l| l.map(|l| l.as_fd())),
        )?;
        // After the capture: a link taken over from an earlier run gets the program
        // whose listeners are already in place.
        let sk_lookup = self
            .dataplane
            .attach_sk_lookup(&netns, cookie, &plan.key.to_string())
            .inspect_err(|_| {
                let _ = self.dataplane.stop_redirecting(cookie);
                for ip in &plan.ips {
                    let _ = self.dataplane.release_inbound(ip_key(*ip));
                }
            })?;

        let identity = self.identity(&plan);
        let hbone_tls = match &self.settings.mesh {
            Some(mesh) => Some(TlsAcceptor::from(
                hbone::tls::server_config(mesh.certificates.clone(), identity.clone(), &mesh.trust)
                    .map_err(|e| EnrollError::Io {
                        what: "building the HBONE TLS config".into(),
                        source: std::io::Error::other(e),
                    })?,
            )),
            None => None,
        };
        let identity_lease = self
            .settings
            .mesh
            .as_ref()
            .map(|mesh| mesh.certificates.lease(&identity));
        let ctx = Arc::new(PodContext {
            pod: plan.key.clone(),
            identity,
            identity_lease,
            ips: plan.ips.clone(),
            mesh: self.settings.mesh.clone(),
            netns_cookie: cookie,
            sockets,
            dataplane: self.dataplane.clone(),
            connections: self.connections.clone(),
            metrics: self.metrics.clone(),
            state: self.state.clone(),
            balancer: self.settings.balancer.clone(),
            pools: self.settings.pools.clone(),
            splits: Default::default(),
            router: self.settings.router.clone(),
            connect_timeout: self.settings.connect_timeout,
            idle_timeout: self.settings.idle_timeout,
            http_routes: self.settings.http_routes.clone(),
            http_upstreams: Default::default(),
            budget: crate::limits::PodBudget::new(&self.settings.limits, &self.metrics),
            limits: self.settings.limits,
            mirrors: Default::default(),
            jwt: self.settings.jwt.clone(),
            tracer: self.settings.tracer.clone(),
            drain: self.settings.drain.clone(),
        });
        self.settings.dialer.register(&ctx);
        let mut tasks = Vec::new();
        for l in outbound.into_iter().flatten() {
            tasks.push(tokio::spawn(outbound::serve(l, ctx.clone())));
        }
        // Kept-alive upstream connections idle past their idle timeout are closed.
        tasks.push(tokio::spawn(crate::proxy::http::pool::close_idle(
            Arc::downgrade(&ctx),
            |ctx: &PodContext| ctx.http_upstreams.as_ref(),
        )));
        for l in [inbound4, inbound6].into_iter().flatten() {
            tasks.push(tokio::spawn(inbound::serve(l, ctx.clone())));
        }
        for l in hbone.into_iter().flatten() {
            tasks.push(match &hbone_tls {
                Some(acceptor) => tokio::spawn(crate::proxy::inbound_hbone::serve(
                    l,
                    ctx.clone(),
                    acceptor.clone(),
                )),
                None => tokio::spawn(inbound::serve_hbone_placeholder(l, ctx.clone())),
            });
        }
        Ok(RunningPod {
            netns_id: netns.id(),
            netns_path,
            cookie,
            listeners,
            inbound: inbound_fds,
            tasks,
            plan,
            sk_lookup,
            inbound_policy,
        })
    }
}

/// The pod's inbound policy as sk_lookup applies it: its plan's exclusions, and per port
/// whether inbound fails closed while no agent runs: closed where plaintext is STRICT,
/// and on every port when a policy selects the pod; open only on PERMISSIVE (or
/// DISABLE) ports of a pod no policy selects.
pub(super) fn inbound_policy(state: &ClusterState, plan: &PodPlan) -> InboundPolicy {
    let mut policy = plan.inbound;
    let governed = authz::inbound_governed(state, &plan.key);
    let modes = state.mtls_modes(&plan.key);
    let closed = governed || modes.default.mode == MtlsMode::Strict;
    let exceptions = modes
        .ports
        .iter()
        .filter(|(_, m)| !governed && (m.mode == MtlsMode::Strict) != closed)
        .map(|(port, _)| *port);
    if !policy.set_fail_mode(closed, exceptions) {
        crate::warn_limited!(pod = %plan.key, "more port-level mTLS modes than the eBPF policy holds; every port of the pod fails closed while no agent runs");
    }
    policy
}
