//! One compiled route rule, whichever front end wrote it (an HTTPRoute rule or a
//! VirtualService `http` route): its backends, filters, timeouts and retries.

use std::time::Duration;

use serde::Serialize;

use crate::{
    keys::ObjectKey, routing::http::fault::Fault, routing::http::fault::Mirror,
    routing::http::filters::Filters, routing::resolve::Backend,
};

/// One weighted backendRef of a rule.
#[derive(Debug, Clone)]
pub struct BackendTarget {
    pub backend: Backend,
    pub filters: Filters,
    /// Why every request sent to this backend gets a 500 (the spec's invalid backend).
    pub invalid: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

/// Which front end a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RuleSource {
    HttpRoute,
    VirtualService,
}

/// One rule of one HTTPRoute or VirtualService (or the implicit rule of a Service
/// without a route).
#[derive(Debug)]
pub struct Rule {
    /// `None` for the Service's own endpoints when its routes disappeared.
    pub route: Option<ObjectKey>,
    /// The kind `route` names.
    pub source: RuleSource,
    pub index: usize,
    pub name: Option<String>,
    pub filters: Filters,
    pub backends: Vec<BackendTarget>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// Delays and aborts injected (VirtualService `fault`).
    pub fault: Option<Fault>,
    /// Where copies of the requests go (VirtualService `mirror`, `mirrors`).
    pub mirrors: Vec<Mirror>,
    /// Why the whole rule answers 500 (unsupported filter, bad timeout).
    pub invalid: Option<String>,
}

impl Rule {
    /// `ns/route` `#name` or `#index`, for logs and metrics.
    pub fn describe(&self) -> String {
        let kind = match self.source {
            RuleSource::HttpRoute => "",
            RuleSource::VirtualService => "VirtualService ",
        };
        match (&self.route, &self.name) {
            (Some(r), Some(n)) if !kind.is_empty() => format!("{kind}{r}#{n}"),
            (Some(r), None) if !kind.is_empty() => format!("{kind}{r}#{}", self.index),
            (Some(r), Some(n)) => format!("{r}#{n}"),
            (Some(r), None) => format!("{r}#{}", self.index),
            (None, _) => "(service endpoints)".into(),
        }
    }

    /// The balancer key of this rule's weighted choice.
    pub fn frontend(&self, service: &ObjectKey) -> ObjectKey {
        match (&self.route, self.source) {
            (Some(r), RuleSource::HttpRoute) => {
                ObjectKey::new(&r.namespace, &format!("{}#{}", r.name, self.index))
            }
            // Apart from an HTTPRoute of the same name.
            (Some(r), RuleSource::VirtualService) => {
                ObjectKey::new(&r.namespace, &format!("{}#vs{}", r.name, self.index))
            }
            (None, _) => service.clone(),
        }
    }
}
