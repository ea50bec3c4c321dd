//! Workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

pub mod authz;
mod authz_eval;
mod authz_facts;
#[cfg(test)]
mod authz_scope_tests;
#[cfg(test)]
mod authz_tests;
pub mod ca;
pub(crate) mod cert_cache;
pub(crate) mod certificates;
pub mod jwt;
pub mod pem;
pub mod spiffe;
pub(crate) mod workload_certificate;

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// DNS-1123 label-ish: what Kubernetes allows in namespace and service-account names,
/// and in trust domains (plus dots).
fn valid_segment(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
        })
}

impl FromStr for Identity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{}` is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
                crate::telemetry::log_limit::clip(s)
            )
        };
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa]
                if valid_segment(td, true)
                    && valid_segment(ns, false)
                    && valid_segment(sa, true) =>
            {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_near_misses() {
        let id: Identity = "spiffe://cluster.local/ns/apps/sa/client".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "apps", "client"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/apps/sa/client");
        for bad in [
            "spiffe://cluster.local/ns/apps/sa/",
            "spiffe://cluster.local/ns/apps/sa/client/extra",
            "spiffe://cluster.local/ns/Apps/sa/client",
            "https://cluster.local/ns/apps/sa/client",
            "spiffe://cluster.local/sa/client/ns/apps",
            "spiffe:///ns/apps/sa/client",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
