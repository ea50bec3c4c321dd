//! How the agent stops serving: told by a signal (SIGTERM, SIGINT) it closes its
//! listeners and drains; asked by a newer agent on the node it hands its listeners
//! over, releases the pins and drains. A drain waits for the proxied connections to
//! end, for `--drain-timeout`, or for a second signal.

use std::{os::fd::AsFd, time::Duration};

use tokio::{signal::unix::SignalKind, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::AgentError;
use crate::{
    capture::pin_lock::PinLock,
    handover::{
        giver::{Giver, HandoverServer, Request},
        ListenerInfo,
    },
    limits::drain::Drain,
    telemetry::connections::ConnectionTable,
    telemetry::metrics::Metrics,
    workloads::Workloads,
};

/// SIGTERM and SIGINT, counted from the start.
pub(super) struct Signals(watch::Receiver<u32>);

impl Signals {
    pub(super) fn install() -> Result<Signals, AgentError> {
        let mut terminate =
            tokio::signal::unix::signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
        let mut interrupt =
            tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
        let (tx, rx) = watch::channel(0);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        Ok(Signals(rx))
    }

    pub(super) fn count(&self) -> u32 {
        *self.0.borrow()
    }

    /// Resolves once `n` signals have come (at once if they have).
    pub(super) async fn at_least(&self, n: u32) {
        let mut rx = self.0.clone();
        // The sender lives in a task that never ends: the wait cannot fail.
        let _ = rx.wait_for(|count| *count >= n).await;
    }
}

/// Why the agent's main loop ended.
pub(super) enum Stop {
    Signal,
    HandOver(Request),
}

/// The next hand-over request, or never when hand-overs are off.
pub(super) async fn next_request(server: &mut Option<HandoverServer>) -> Option<Request> {
    match server {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The node's own listeners (admin, metrics, readiness): a descriptor of each for a
/// successor, and the tasks serving them.
#[derive(Default)]
pub(super) struct NodeListeners {
    pub kept: Vec<(ListenerInfo, std::os::fd::OwnedFd)>,
    pub servers: Vec<JoinHandle<()>>,
    /// The agent's own network namespace, read once for all of them.
    pub own_netns_cookie: Option<u64>,
}

/// What a drain works on.
pub(super) struct Draining<'a> {
    pub workloads: &'a mut Workloads,
    pub drain: &'a Drain,
    pub connections: &'a ConnectionTable,
    pub metrics: &'a Metrics,
    pub timeout: Duration,
    pub signals: &'a Signals,
    /// The listeners passed to a successor (and this agent stopped accepting then).
    pub handed_over: bool,
}

/// Proxied connections open now (counted, not listed: polled while draining).
fn live(connections: &ConnectionTable) -> usize {
    let (outbound, inbound) = connections.live_counts();
    outbound + inbound
}

impl Draining<'_> {
    /// Drains: the listeners close (or were handed over), HTTP connections are told
    /// to close, and the agent waits until no proxied connection is left, the timeout
    /// passes, or a second signal comes; `report` hears the count about once a
    /// second. Returns (open at the start, cut at the end).
    pub(super) async fn run(self, report: impl Fn(usize)) -> (usize, usize) {
        self.drain.start();
        self.metrics.draining.set(1);
        let open = live(self.connections);
        if self.handed_over {
            info!(
                connections = open,
                timeout_s = self.timeout.as_secs_f64(),
                "draining: the listeners are the new agent's; waiting for open connections to end"
            );
        } else {
            let closed = self.workloads.stop_accepting();
            info!(
                listeners_closed = closed,
                connections = open,
                timeout_s = self.timeout.as_secs_f64(),
                "draining: no longer accepting, waiting for open connections to end"
            );
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut ticks = 0u32;
        let second_signal = self.signals.at_least(2);
        tokio::pin!(second_signal);
        let left = loop {
            let left = live(self.connections);
            if left == 0 {
                break 0;
            }
            if ticks.is_multiple_of(20) {
                report(left);
            }
            ticks = ticks.wrapping_add(1);
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(deadline) => break live(self.connections),
                _ = &mut second_signal => {
                    info!("second signal: ending the drain now");
                    break live(self.connections);
                }
            }
        };
        let cut = left.min(open);
        let drained = &self.metrics.drained_connections;
        drained
            .with_label_values(&["completed"])
            .inc_by((open - cut) as u64);
        drained.with_label_values(&["cut"]).inc_by(cut as u64);
        if cut > 0 {
            warn!(
                cut,
                completed = open - cut,
                "drain timeout: cutting the connections still open"
            );
        } else {
            info!(completed = open, "drained: every connection ended");
        }
        (open, cut)
    }
}

/// Answers a newcomer: every listener passes to it, this agent stops accepting and
/// releases the pin lock (the newcomer waits for exactly that). Err: nothing was
/// handed over and this agent serves on.
pub(super) fn hand_over(
    request: Request,
    workloads: &mut Workloads,
    node: &mut NodeListeners,
    server: &mut Option<HandoverServer>,
    pin_lock: &mut Option<PinLock>,
    metrics: &Metrics,
) -> Result<Giver, crate::handover::HandoverError> {
    let pid = request.pid;
    let mut listeners = workloads.listeners_to_hand_over();
    listeners.extend(node.kept.iter().map(|(info, fd)| (*info, fd.as_fd())));
    let count = listeners.len();
    let giver = request.give(&listeners).inspect_err(|e| {
        metrics
            .handovers
            .with_label_values(&["giver", "failed"])
            .inc();
        warn!(to_pid = pid, error = %e, "hand-over failed; serving on");
    })?;
    for s in node.servers.drain(..) {
        s.abort();
    }
    node.kept.clear();
    workloads.stop_accepting();
    // No third agent asks this one any more; the successor binds its own.
    *server = None;
    *pin_lock = None;
    giver.released();
    metrics
        .handovers
        .with_label_values(&["giver", "handed_over"])
        .inc();
    info!(
        to_pid = pid,
        listeners = count,
        "handed the node over: the new agent accepts on this agent's listeners now"
    );
    Ok(giver)
}
