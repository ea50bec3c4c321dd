//! Per-kind health of the `kube` source, for readiness, metrics and the admin API.
//!
//! A kind is healthy when the API server last answered its list or watch (a re-watch
//! that succeeds and has nothing to report counts: rarely-changing kinds stay silent),
//! or when its CRD is not installed (it counts as empty). It is failing from its first
//! failed request until the API server answers again.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::discovery::cluster::Kind;

/// A kind failing for longer than this makes the agent unready.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindHealth {
    /// An initial list completed (or the kind is not installed) at least once.
    pub synced: bool,
    /// The API version watched (chosen through API discovery for CRD kinds).
    pub version: Option<&'static str>,
    /// Why the kind counts as empty: its CRD is not installed (None: it is).
    pub not_installed: Option<String>,
    #[serde(skip)]
    pub failing_since: Option<Instant>,
    /// The error of the current failure (None while healthy).
    pub last_error: Option<String>,
}

/// Per-kind sync state of discovery, shared with readiness and the admin API.
#[derive(Debug, Default)]
pub struct DiscoveryHealth {
    kinds: Mutex<BTreeMap<Kind, KindHealth>>,
}

impl DiscoveryHealth {
    pub(crate) fn update<T>(&self, kind: Kind, f: impl FnOnce(&mut KindHealth) -> T) -> T {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        f(kinds.entry(kind).or_default())
    }

    /// Marks every kind synced (the `files` source has no partial state).
    pub fn all_synced(&self) {
        for kind in Kind::ALL {
            self.update(kind, |h| h.synced = true);
        }
    }

    /// Whether every kind has completed an initial list at least once.
    pub fn every_kind_synced(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        Kind::ALL
            .iter()
            .all(|k| kinds.get(k).is_some_and(|h| h.synced))
    }

    /// Why the state should not be trusted, or None.
    pub fn unready_reason(&self, now: Instant) -> Option<String> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        for kind in Kind::ALL {
            let h = kinds.get(&kind);
            if !h.is_some_and(|h| h.synced) {
                return Some(format!("{} not synced yet", kind.name()));
            }
            if let Some(since) = h.and_then(|h| h.failing_since) {
                if now.saturating_duration_since(since) > STALE_AFTER {
                    return Some(format!(
                        "{} watch failing for {}s: {}",
                        kind.name(),
                        now.saturating_duration_since(since).as_secs(),
                        h.and_then(|h| h.last_error.clone()).unwrap_or_default()
                    ));
                }
            }
        }
        None
    }

    /// Seconds each kind has been failing (0 when healthy).
    pub fn staleness(&self, now: Instant) -> Vec<(Kind, f64)> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        Kind::ALL
            .iter()
            .map(|k| {
                let since = kinds.get(k).and_then(|h| h.failing_since);
                (
                    *k,
                    since.map_or(0.0, |s| now.saturating_duration_since(s).as_secs_f64()),
                )
            })
            .collect()
    }

    pub fn snapshot(&self) -> BTreeMap<Kind, KindHealth> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
