//! Agent-health gauges, read from their sources when metrics are scraped (cheaper
//! than keeping them current, and never stale).

use crate::{admin::state::unix_now, admin::state::AdminState};

pub(crate) fn refresh(state: &AdminState) {
    let m = &state.metrics;
    for map in state.dataplane.map_status() {
        m.bpf_map_entries
            .with_label_values(&[map.name])
            .set(map.entries as i64);
        m.bpf_map_capacity
            .with_label_values(&[map.name])
            .set(i64::from(map.max_entries));
    }
    // The eBPF side counts in the kernel; bring the counters up to its totals.
    for (reason, total) in state.dataplane.ebpf_refusals() {
        let counter = m.refused.with_label_values(&[reason.name()]);
        counter.inc_by(total.saturating_sub(counter.get()));
    }
    let now = unix_now();
    // Identities come and go with pods: drop the series of those that left.
    m.certificate_expiry_seconds.reset();
    for cert in state
        .certificates
        .as_ref()
        .map(|c| c.status())
        .unwrap_or_default()
    {
        if let Some(not_after) = cert.not_after_unix {
            m.certificate_expiry_seconds
                .with_label_values(&[cert.identity.to_string()])
                .set(not_after as f64 - now);
        }
    }
    let workloads = state.workloads.borrow().clone();
    let enrolled = workloads.iter().filter(|w| w.enrolled).count() as i64;
    m.workloads.with_label_values(&["enrolled"]).set(enrolled);
    m.workloads
        .with_label_values(&["not_enrolled"])
        .set(workloads.len() as i64 - enrolled);
    let (outbound, inbound) = state.connections.live_counts();
    m.connections_active
        .with_label_values(&["outbound"])
        .set(outbound as i64);
    m.connections_active
        .with_label_values(&["inbound"])
        .set(inbound as i64);
    let last = m.state_last_update.get();
    if last > 0.0 {
        m.state_age_seconds.set((now - last).max(0.0));
    }
}
