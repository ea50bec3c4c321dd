//! The connection cap of a node listener: so many connections at once, and so many
//! from one source address, so that one pod flooding the metrics or readiness port
//! cannot lock out the kubelet's probes or the scraper.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use prometheus::IntGauge;

use crate::telemetry::metrics::Metrics;
use crate::{limits::count_refusal, limits::Listener, limits::ListenerLimits, limits::Refusal};

#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Admission to one listener.
pub(crate) struct Gate {
    listener: Listener,
    limits: ListenerLimits,
    open: Mutex<Open>,
    gauge: IntGauge,
    metrics: Arc<Metrics>,
}

/// One admitted connection; its slot is returned when this is dropped.
pub(crate) struct Admitted {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Gate {
    pub(crate) fn new(
        listener: Listener,
        limits: ListenerLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            listener,
            limits,
            open: Mutex::default(),
            gauge: metrics
                .listener_connections
                .with_label_values(&[listener.name()]),
            metrics,
        })
    }

    pub(crate) fn listener(&self) -> Listener {
        self.listener
    }

    pub(crate) fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A slot for a connection from `source`, or why not (counted).
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = open.by_source.get(&source).copied().unwrap_or(0);
        let refusal = if open.total >= self.limits.max_connections {
            Some(Refusal::ConnectionLimit)
        } else if from_source >= self.limits.max_per_source {
            Some(Refusal::SourceLimit)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(open);
            count_refusal(&self.metrics, self.listener, refusal);
            return Err(refusal);
        }
        open.total += 1;
        open.by_source.insert(source, from_source + 1);
        self.gauge.inc();
        Ok(Admitted {
            gate: self.clone(),
            source,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
        self.gate.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn gate(max: usize, per_source: usize) -> Arc<Gate> {
        let limits = ListenerLimits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_connections: max,
            max_per_source: per_source,
        };
        Gate::new(Listener::Metrics, limits, Arc::new(Metrics::new()))
    }

    #[test]
    fn one_source_is_capped_before_the_listener_is() {
        let g = gate(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = g.admit(a).unwrap();
        let _second = g.admit(a).unwrap();
        assert_eq!(g.admit(a).err(), Some(Refusal::SourceLimit));
        let _other = g.admit(b).unwrap();
        assert_eq!(g.admit(b).err(), Some(Refusal::ConnectionLimit));
        drop(first);
        assert!(g.admit(b).is_ok());
        let refused = g
            .metrics()
            .listener_refused
            .with_label_values(&["metrics", "source_limit"])
            .get();
        assert_eq!(refused, 1);
    }

    #[test]
    fn slots_are_returned_and_sources_forgotten() {
        let g = gate(10, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..10).map(|_| g.admit(a).unwrap()).collect();
        assert!(g.admit(a).is_err());
        drop(held);
        let open = g.open.lock().unwrap();
        assert_eq!(open.total, 0);
        assert!(open.by_source.is_empty());
    }
}
