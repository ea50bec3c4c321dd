//! What the agent exports, for tests and tools outside the crate (the dashboards under
//! deploy/observability are checked against it).

use std::collections::{BTreeMap, BTreeSet};

/// Every metric family the agent's `/metrics` can expose, by name, with its variable
/// label names. A histogram is listed under its family name: the exposition adds
/// `_bucket` (with `le`), `_sum` and `_count` (see [`histogram_families`]).
pub fn metrics_catalog() -> BTreeMap<String, Vec<String>> {
    crate::telemetry::metrics::Metrics::new().catalog()
}

/// The families of [`metrics_catalog`] that are histograms.
pub fn histogram_families() -> BTreeSet<String> {
    crate::telemetry::metrics::Metrics::new().histograms()
}
