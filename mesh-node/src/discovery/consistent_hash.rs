//! DestinationRule `loadBalancer.consistentHash` (Istio's `ConsistentHashLB`): its wire
//! form (the CRD schema, [`ConsistentHashLb`]), checked and compiled into the
//! [`HashPolicy`] routing applies.
//!
//! A policy hashes one key — a request header, a cookie, a query parameter, or the
//! client's IP — onto a ring of the backend's endpoints (ring hash with virtual nodes,
//! or a Maglev table), so that one key keeps going to one endpoint and removing one of
//! N endpoints moves about 1/N of the keys. A request without its key is balanced at
//! random, as Envoy does; with `httpCookie.ttl`, the proxy makes the cookie up, hashes
//! it, and sets it on the response (a `ttl` of 0: a session cookie; no `ttl`: no cookie
//! is ever made).
//!
//! A consistentHash that cannot be applied as written (no key source or more than one,
//! a bad name or duration, both `ringHash` and `maglev`) is reported with the rule's
//! name and left out; the rest of the rule applies. Sub-fields Nodemesh does not know
//! are reported, never silently ignored. Ring and table sizes are capped
//! ([`MAX_RING_SIZE`], [`MAX_MAGLEV_TABLE_SIZE`]): a larger one is reported and capped.

use std::{collections::BTreeMap, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    discovery::duration::parse_istio_duration,
    discovery::problem::{Problem, ProblemReason},
    telemetry::log_limit::clip,
};

/// Envoy's default minimum ring size (Istio's default when a rule names none).
pub const DEFAULT_RING_SIZE: u64 = 1024;
/// At most this many points on a ring: a larger `minimumRingSize` is capped (and
/// reported), so no rule can make the agent allocate more than a few MiB per backend.
pub const MAX_RING_SIZE: u64 = 1 << 17;
/// Envoy's (and Istio's) default Maglev table size, a prime.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65_537;
/// The largest Maglev table (a prime): larger ones are capped and reported.
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 131_071;
/// Longest header, cookie or query parameter name accepted.
const MAX_NAME: usize = 256;
/// Longest cookie path accepted.
const MAX_PATH: usize = 1024;

/// `consistentHash` as Istio writes it (v1 field names; `minimumRingSize` directly
/// under it is Istio's deprecated form of `ringHash.minimumRingSize`). Read from the
/// rule's raw JSON so that a broken one never breaks the rest of the rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHashLb {
    /// Hash this request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    /// Hash this cookie's value (made up and set on the response when absent and
    /// `ttl` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    /// Hash the client's IP address (HTTP requests and TCP connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    /// Hash this query parameter's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    /// A ring with virtual nodes (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHash>,
    /// A Maglev lookup table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<Maglev>,
    /// Deprecated by Istio: `ringHash.minimumRingSize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
    /// Anything else (reported as not implemented).
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// e.g. `3600s`; `0s`: a session cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RingHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Maglev {
    /// A prime (default 65537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u64>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The CRD schema of `consistentHash` (the wire field stays raw JSON).
pub(crate) fn schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = ConsistentHashLb::json_schema(generator);
    schema.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
    schema
}

/// What a request or connection is hashed on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum HashKey {
    /// A request header (name in lower case).
    Header { name: String },
    /// A cookie; with `ttl_ms`, one is made up when absent (0: a session cookie).
    Cookie {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// A query parameter of the request's URI.
    QueryParameter { name: String },
    /// The client pod's IP address.
    SourceIp,
}

/// How the keys are laid over the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HashTable {
    RingHash { minimum_ring_size: u64 },
    Maglev { table_size: u64 },
}

/// A consistent-hash policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HashPolicy {
    pub key: HashKey,
    pub table: HashTable,
}

impl std::fmt::Display for HashKey {
    /// `header x-user`, `cookie session`, `query parameter u`, `source IP`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashKey::Header { name } => write!(f, "header {name}"),
            HashKey::Cookie { name, .. } => write!(f, "cookie {name}"),
            HashKey::QueryParameter { name } => write!(f, "query parameter {name}"),
            HashKey::SourceIp => write!(f, "source IP"),
        }
    }
}

impl std::fmt::Display for HashPolicy {
    /// `header x-user, ring hash 1024` (what `meshctl` shows).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.key)?;
        if let HashKey::Cookie { path, ttl_ms, .. } = &self.key {
            if let Some(p) = path {
                write!(f, " path {p}")?;
            }
            match ttl_ms {
                Some(0) => write!(f, " (made up when absent: session cookie)")?,
                Some(ms) => write!(f, " (made up when absent: ttl {ms}ms)")?,
                None => {}
            }
        }
        match self.table {
            HashTable::RingHash { minimum_ring_size } => {
                write!(f, ", ring hash {minimum_ring_size}")
            }
            HashTable::Maglev { table_size } => write!(f, ", maglev {table_size}"),
        }
    }
}

/// Whether `n` is prime (table sizes are small: trial division).
pub(crate) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// RFC 6265 cookie names are tokens; header names too (RFC 9110).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks and compiles `consistentHash` (raw JSON) at `field`; problems go to
/// `problems`. None: nothing to apply (reported).
pub(crate) fn compile(
    field: &str,
    raw: &serde_json::Value,
    problems: &mut Vec<Problem>,
) -> Option<HashPolicy> {
    let mut report = |at: &str, reason: ProblemReason, detail: String| {
        problems.push(Problem {
            field: if at.is_empty() {
                field.to_string()
            } else {
                format!("{field}.{at}")
            },
            reason,
            detail,
        });
    };
    let spec: ConsistentHashLb = match serde_json::from_value(raw.clone()) {
        Ok(s) => s,
        Err(e) => {
            report(
                "",
                ProblemReason::InvalidField,
                format!("consistentHash is not applied: {}: write it as Istio's DestinationRule reference shows", clip(&e.to_string())),
            );
            return None;
        }
    };
    let unknown = |report: &mut dyn FnMut(&str, ProblemReason, String),
                   at: &str,
                   other: &BTreeMap<String, serde_json::Value>| {
        for name in other.keys() {
            let at = if at.is_empty() {
                clip(name).to_string()
            } else {
                format!("{at}.{}", clip(name))
            };
            report(
                &at,
                ProblemReason::NotImplemented,
                "this field is not implemented by Nodemesh: it is not applied".into(),
            );
        }
    };
    unknown(&mut report, "", &spec.other);
    let mut sources = Vec::new();
    if let Some(name) = &spec.http_header_name {
        if is_token(name) {
            sources.push(HashKey::Header {
                name: name.to_ascii_lowercase(),
            });
        } else {
            report(
                "httpHeaderName",
                ProblemReason::InvalidField,
                format!("`{}` is not an HTTP header name", clip(name)),
            );
            return None;
        }
    }
    if let Some(cookie) = &spec.http_cookie {
        unknown(&mut report, "httpCookie", &cookie.other);
        if !is_token(&cookie.name) {
            report(
                "httpCookie.name",
                ProblemReason::InvalidField,
                format!("`{}` is not a cookie name", clip(&cookie.name)),
            );
            return None;
        }
        let path = cookie.path.as_deref().filter(|p| !p.is_empty());
        if let Some(p) = path {
            let ok = p.len() <= MAX_PATH
                && p.starts_with('/')
                && p.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';');
            if !ok {
                report(
                    "httpCookie.path",
                    ProblemReason::InvalidField,
                    format!("`{}` is not a cookie path: write e.g. /", clip(p)),
                );
                return None;
            }
        }
        let ttl = match cookie.ttl.as_deref().map(str::trim) {
            None => None,
            Some("0" | "0s" | "0ms" | "0.0s") => Some(Duration::ZERO),
            Some(t) => match parse_istio_duration(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    report("httpCookie.ttl", ProblemReason::InvalidField, e);
                    return None;
                }
            },
        };
        sources.push(HashKey::Cookie {
            name: cookie.name.clone(),
            path: path.map(str::to_string),
            ttl_ms: ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
    }
    if let Some(name) = &spec.http_query_parameter_name {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| (0x21..0x7f).contains(&b) && !b"&=#?".contains(&b));
        if !ok {
            report(
                "httpQueryParameterName",
                ProblemReason::InvalidField,
                format!("`{}` is not a query parameter name", clip(name)),
            );
            return None;
        }
        sources.push(HashKey::QueryParameter { name: name.clone() });
    }
    if spec.use_source_ip == Some(true) {
        sources.push(HashKey::SourceIp);
    }
    let key = match sources.len() {
        1 => sources.remove(0),
        0 => {
            report(
                "",
                ProblemReason::InvalidField,
                "consistentHash names no key: set one of httpHeaderName, httpCookie, httpQueryParameterName or useSourceIp: true".into(),
            );
            return None;
        }
        _ => {
            report(
                "",
                ProblemReason::InvalidField,
                "consistentHash names more than one key: set only one of httpHeaderName, httpCookie, httpQueryParameterName and useSourceIp".into(),
            );
            return None;
        }
    };
    let capped =
        |report: &mut dyn FnMut(&str, ProblemReason, String), at: &str, value: u64, max: u64| {
            if value > max {
                report(
                    at,
                    ProblemReason::Capped,
                    format!("{value} is more than Nodemesh allows: {max} is used"),
                );
                max
            } else {
                value
            }
        };
    if spec.ring_hash.is_some() && spec.maglev.is_some() {
        report(
            "",
            ProblemReason::InvalidField,
            "set either ringHash or maglev, not both".into(),
        );
        return None;
    }
    if spec.minimum_ring_size.is_some() && (spec.ring_hash.is_some() || spec.maglev.is_some()) {
        report(
            "minimumRingSize",
            ProblemReason::InvalidField,
            "the deprecated minimumRingSize is set beside ringHash or maglev: keep only ringHash.minimumRingSize".into(),
        );
        return None;
    }
    let table = if let Some(maglev) = &spec.maglev {
        unknown(&mut report, "maglev", &maglev.other);
        let size = maglev
            .table_size
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
        if size <= MAX_MAGLEV_TABLE_SIZE && !is_prime(size) {
            report(
                "maglev.tableSize",
                ProblemReason::InvalidField,
                format!("{size} is not a prime: use a prime such as 65537 (or leave it out)"),
            );
            return None;
        }
        HashTable::Maglev {
            table_size: capped(&mut report, "maglev.tableSize", size, MAX_MAGLEV_TABLE_SIZE),
        }
    } else {
        let (at, size) = match &spec.ring_hash {
            Some(ring) => {
                unknown(&mut report, "ringHash", &ring.other);
                ("ringHash.minimumRingSize", ring.minimum_ring_size)
            }
            None => ("minimumRingSize", spec.minimum_ring_size),
        };
        let size = size.filter(|n| *n > 0).unwrap_or(DEFAULT_RING_SIZE);
        HashTable::RingHash {
            minimum_ring_size: capped(&mut report, at, size, MAX_RING_SIZE),
        }
    };
    Some(HashPolicy { key, table })
}

#[cfg(test)]
#[path = "consistent_hash_tests.rs"]
mod tests;
