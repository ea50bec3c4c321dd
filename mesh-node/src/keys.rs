//! How the agent names cluster objects: namespace and name. Every room uses these
//! keys (telemetry labels, discovery indexes, routing decisions), so they sit below
//! all of them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// Namespace and name of an object (namespace empty for cluster-scoped kinds).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

pub type PodKey = ObjectKey;

/// The cluster's DNS domain: a Service is `name.namespace.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Why a host does not name a Service of the cluster ([`ObjectKey::from_service_host`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("is a wildcard, which Nodemesh does not implement")]
    Wildcard,
    #[error("is not a Service of this cluster")]
    NotAService,
    #[error("is not a valid Service name")]
    InvalidName,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A Service's fully qualified name, `name.namespace.svc.cluster.local` (Istio's
    /// `destination_service`).
    pub fn service_fqdn(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }

    /// The Service a host names, as Istio's VirtualService and DestinationRule write it
    /// from an object in `own_namespace`: `name`, `name.namespace`, `name.namespace.svc`
    /// or `name.namespace.svc.cluster.local`. Names are DNS labels (RFC 1035).
    pub fn from_service_host(host: &str, own_namespace: &str) -> Result<ObjectKey, HostError> {
        if host.contains('*') {
            return Err(HostError::Wildcard);
        }
        let parts: Vec<&str> = host.split('.').collect();
        let (name, namespace) = match parts.as_slice() {
            [name] => (*name, own_namespace),
            [name, ns] | [name, ns, "svc"] => (*name, *ns),
            [name, ns, "svc", domain @ ..] if domain.join(".") == CLUSTER_DOMAIN => (*name, *ns),
            _ => return Err(HostError::NotAService),
        };
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if label(name) && label(namespace) {
            Ok(ObjectKey::new(namespace, name))
        } else {
            Err(HostError::InvalidName)
        }
    }

    pub(crate) fn of(meta: &ObjectMeta) -> Option<ObjectKey> {
        Some(ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone()?,
        })
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

impl std::str::FromStr for ObjectKey {
    type Err = KeyError;

    /// `namespace/name`, as [`Display`](std::fmt::Display) writes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ObjectKey::new(ns, name))
            }
            _ => Err(KeyError(format!("{s:?} is not namespace/name"))),
        }
    }
}

/// A key's text that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// One port of a Service: the frontend a connection to a Service address reaches.
/// Shown as `namespace/name:port` (a connection's `service` in the admin API and the
/// access log is that text: [`as_text`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePortRef {
    pub service: ObjectKey,
    pub port: u16,
}

impl std::fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

impl std::str::FromStr for ServicePortRef {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || KeyError(format!("{s:?} is not namespace/name:port"));
        let (service, port) = s.rsplit_once(':').ok_or_else(bad)?;
        Ok(ServicePortRef {
            service: service.parse().map_err(|_| bad())?,
            port: port.parse().map_err(|_| bad())?,
        })
    }
}

/// Serde for an optional key carried as its text (`namespace/name`,
/// `namespace/name:port`): `#[serde(with = "keys::as_text")]`.
pub mod as_text {
    use std::{fmt::Display, str::FromStr};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<K: Display, S: Serializer>(key: &Option<K>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(key) => s.collect_str(key),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, K, D>(d: D) -> Result<Option<K>, D::Error>
    where
        K: FromStr,
        K::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_port_reads_back_from_its_text() {
        let port = ServicePortRef {
            service: ObjectKey::new("apps", "web"),
            port: 80,
        };
        assert_eq!(port.to_string(), "apps/web:80");
        assert_eq!("apps/web:80".parse::<ServicePortRef>(), Ok(port.clone()));
        for bad in [
            "",
            "apps/web",
            "web:80",
            "apps/web:",
            "apps/web:99999",
            "/web:80",
            "a/b/c:1",
        ] {
            assert!(bad.parse::<ServicePortRef>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts_name_services_in_four_spellings_and_nothing_else() {
        let svc = |ns: &str, name: &str| Ok(ObjectKey::new(ns, name));
        for (host, want) in [
            ("web", svc("apps", "web")),
            ("web.prod", svc("prod", "web")),
            ("web.prod.svc", svc("prod", "web")),
            ("web.prod.svc.cluster.local", svc("prod", "web")),
            ("example.com", svc("com", "example")),
            ("web.prod.svc.other.domain", Err(HostError::NotAService)),
            ("www.example.com", Err(HostError::NotAService)),
            ("*.prod.svc.cluster.local", Err(HostError::Wildcard)),
            ("Web", Err(HostError::InvalidName)),
            ("-web", Err(HostError::InvalidName)),
            ("", Err(HostError::InvalidName)),
            ("a..b", Err(HostError::NotAService)),
            ("web..svc", Err(HostError::InvalidName)),
        ] {
            assert_eq!(ObjectKey::from_service_host(host, "apps"), want, "{host}");
        }
        assert_eq!(
            ObjectKey::new("prod", "web").service_fqdn(),
            "web.prod.svc.cluster.local"
        );
    }
}
