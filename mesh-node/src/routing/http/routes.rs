//! The HTTPRoutes of one Service port, compiled into an ordered table of matches:
//! regexes built once, filters checked once, backends resolved to ready endpoints —
//! per discovery snapshot, not per request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use gateway_api::apis::experimental::httproutes::{
    HttpRouteRules, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
};
use http::{request::Parts, HeaderName, Method};

use crate::{
    discovery::cluster::ClusterState,
    discovery::duration::{optional_timeout, parse_duration, Grammar},
    keys::ObjectKey,
    routing::resolve::backend,
    routing::resolve::is_service_backend,
};
use crate::{
    routing::http::filters, routing::http::filters::Filters, routing::http::matching::full_regex,
    routing::http::matching::normalize_prefix, routing::http::matching::PathMatch,
    routing::http::matching::RequestMatch, routing::http::matching::ValueMatch,
};

/// Retries when the route asks for them without saying how often.
const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// The wait before the first retry when the route gives no `backoff`.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

pub use crate::routing::http::rule::{BackendTarget, RetryPolicy, Rule, RuleSource};

/// Every rule attached to a Service port, in match precedence order.
#[derive(Debug)]
pub struct RouteTable {
    entries: Vec<(RequestMatch, Arc<Rule>)>,
    /// Problems found building the table (matches that never match, rules or
    /// backends that answer 500, VirtualServices that do not apply), each naming its
    /// object: [`RouteCache`] logs (rate-limited) and counts them.
    pub errors: Vec<String>,
    /// VirtualServices naming the Service that do not apply to this port because an
    /// HTTPRoute claims it (the Gateway API, the project's native API, wins).
    pub overridden: Vec<ObjectKey>,
}

fn compile_match(m: &HttpRouteRulesMatches) -> Result<RequestMatch, String> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p.r#type {
                Some(HttpRouteRulesMatchesPathType::Exact) => PathMatch::Exact(value),
                Some(HttpRouteRulesMatchesPathType::RegularExpression) => {
                    PathMatch::Regex(full_regex(&value)?)
                }
                Some(HttpRouteRulesMatchesPathType::PathPrefix) | None => {
                    PathMatch::Prefix(normalize_prefix(&value))
                }
            }
        }
    };
    let method = match &m.method {
        None => None,
        Some(method) => {
            let text = serde_json::to_value(method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            Some(Method::from_bytes(text.as_bytes()).map_err(|_| format!("bad method {text}"))?)
        }
    };
    let mut headers = Vec::new();
    for h in m.headers.iter().flatten() {
        let name = HeaderName::try_from(h.name.as_str())
            .map_err(|_| format!("`{}` is not a header name", h.name))?;
        // Only the first entry of an equivalent name counts.
        if headers.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let value = match h.r#type {
            Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                ValueMatch::Regex(full_regex(&h.value)?)
            }
            _ => ValueMatch::Exact(h.value.clone()),
        };
        headers.push((name, value));
    }
    let mut query = Vec::new();
    for q in m.query_params.iter().flatten() {
        if query
            .iter()
            .any(|(n, _): &(String, ValueMatch)| *n == q.name)
        {
            continue;
        }
        let value = match q.r#type {
            Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                ValueMatch::Regex(full_regex(&q.value)?)
            }
            _ => ValueMatch::Exact(q.value.clone()),
        };
        query.push((q.name.clone(), value));
    }
    Ok(RequestMatch {
        path,
        method,
        method_value: None,
        headers,
        query,
    })
}

fn compile_rule(
    state: &ClusterState,
    route: &ObjectKey,
    index: usize,
    rule: &HttpRouteRules,
    frontend_port: u16,
    want_v6: bool,
) -> Rule {
    let mut invalid = None;
    let filters = filters::compile(rule.filters.as_deref().unwrap_or(&[])).unwrap_or_else(|e| {
        invalid = Some(e);
        Filters::default()
    });
    let timeouts = rule.timeouts.as_ref();
    let request_timeout = optional_timeout(
        timeouts.and_then(|t| t.request.as_deref()),
        Grammar::GatewayApi,
        "timeouts.request",
    );
    let backend_timeout = optional_timeout(
        timeouts.and_then(|t| t.backend_request.as_deref()),
        Grammar::GatewayApi,
        "timeouts.backendRequest",
    );
    let (request_timeout, backend_timeout) = match (request_timeout, backend_timeout) {
        (Ok(r), Ok(b)) => (r, b),
        (Err(e), _) | (_, Err(e)) => {
            invalid.get_or_insert(e);
            (None, None)
        }
    };
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            let backoff = match r.backoff.as_deref().map(parse_duration) {
                None => Ok(DEFAULT_BACKOFF),
                Some(Ok(d)) => Ok(d),
                Some(Err(e)) => Err(format!("retry.backoff: {e}")),
            };
            match backoff {
                Ok(backoff) => Some(RetryPolicy {
                    attempts: r
                        .attempts
                        .map(|a| a.clamp(0, 100) as u32)
                        .unwrap_or(DEFAULT_RETRY_ATTEMPTS),
                    codes: r
                        .codes
                        .iter()
                        .flatten()
                        .filter_map(|c| u16::try_from(*c).ok())
                        .collect(),
                    backoff,
                }),
                Err(e) => {
                    invalid.get_or_insert(e);
                    None
                }
            }
        }
    };
    let backends = rule
        .backend_refs
        .iter()
        .flatten()
        .map(|r| {
            let ns = r
                .namespace
                .clone()
                .unwrap_or_else(|| route.namespace.clone());
            let key = ObjectKey::new(&ns, &r.name);
            let port = r
                .port
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(frontend_port);
            let weight = r.weight.unwrap_or(1).max(0) as u32;
            let mut invalid = None;
            if !is_service_backend(r.group.as_deref(), r.kind.as_deref()) {
                invalid = Some(format!(
                    "backendRef {}/{} {} is not a Service",
                    r.group.as_deref().unwrap_or(""),
                    r.kind.as_deref().unwrap_or(""),
                    r.name
                ));
            } else if !state.services.contains_key(&key) {
                invalid = Some(format!("backend Service {key} does not exist"));
            }
            let filters =
                filters::compile(r.filters.as_deref().unwrap_or(&[])).unwrap_or_else(|e| {
                    invalid.get_or_insert(e);
                    Filters::default()
                });
            BackendTarget {
                backend: backend(state, key, port, weight, want_v6),
                filters,
                invalid,
            }
        })
        .collect();
    Rule {
        route: Some(route.clone()),
        source: RuleSource::HttpRoute,
        index,
        name: rule.name.clone(),
        filters,
        backends,
        request_timeout,
        backend_timeout,
        retry,
        fault: None,
        mirrors: Vec::new(),
        invalid,
    }
}

impl RouteTable {
    /// The table for `service:port`; with no HTTPRoute left, one implicit rule sends
    /// everything to the Service's own endpoints.
    pub fn build(
        state: &ClusterState,
        service: &ObjectKey,
        port: u16,
        want_v6: bool,
    ) -> RouteTable {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        // (match precedence, route order, rule index, match index) orders the table.
        let mut order = 0usize;
        let mut keyed = Vec::new();
        for (route_key, route) in state.http_routes_for(service, port) {
            for (index, rule) in route.spec.rules.iter().flatten().enumerate() {
                let compiled = Arc::new(compile_rule(state, route_key, index, rule, port, want_v6));
                let matches = rule.matches.clone().unwrap_or_default();
                let matches = if matches.is_empty() {
                    vec![RequestMatch::default()]
                } else {
                    matches
                        .iter()
                        .filter_map(|m| {
                            compile_match(m)
                                .map_err(|e| errors.push(format!("{}: {e}", compiled.describe())))
                                .ok()
                        })
                        .collect()
                };
                for m in matches {
                    keyed.push((m.precedence(), order, m, compiled.clone()));
                    order += 1;
                }
            }
        }
        let mut overridden = Vec::new();
        let vs = crate::routing::http::virtual_service::compile(state, service, port, want_v6);
        if !keyed.is_empty() {
            // An HTTPRoute claims the port: the VirtualServices lose, and say so.
            for key in &vs.applied {
                errors.push(format!(
                    "VirtualService {key} is not applied to {service}:{port}: an HTTPRoute routes that port (HTTPRoute wins)"
                ));
            }
            overridden = vs.applied;
        } else if !vs.entries.is_empty() {
            // Istio's order: the first match wins, as written.
            errors.extend(vs.errors);
            entries.extend(vs.entries);
            return RouteTable {
                entries,
                errors,
                overridden,
            };
        } else {
            errors.extend(vs.errors);
        }
        if keyed.is_empty() {
            let implicit = Rule {
                route: None,
                source: RuleSource::HttpRoute,
                index: 0,
                name: None,
                filters: Filters::default(),
                backends: vec![BackendTarget {
                    backend: backend(state, service.clone(), port, 1, want_v6),
                    filters: Filters::default(),
                    invalid: None,
                }],
                request_timeout: None,
                backend_timeout: None,
                fault: None,
                mirrors: Vec::new(),
                retry: None,
                invalid: None,
            };
            keyed.push((
                RequestMatch::default().precedence(),
                0,
                RequestMatch::default(),
                Arc::new(implicit),
            ));
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        entries.extend(keyed.into_iter().map(|(_, _, m, r)| (m, r)));
        RouteTable {
            entries,
            errors,
            overridden,
        }
    }

    /// Every rule of the table, once each, in precedence order (for `trace`).
    pub fn rules(&self) -> Vec<&Arc<Rule>> {
        let mut out: Vec<&Arc<Rule>> = Vec::new();
        for (_, rule) in &self.entries {
            if !out.iter().any(|r| Arc::ptr_eq(r, rule)) {
                out.push(rule);
            }
        }
        out
    }

    /// The most specific match for this request, with its rule.
    pub fn select(&self, request: &Parts) -> Option<(&RequestMatch, &Arc<Rule>)> {
        self.entries
            .iter()
            .find(|(m, _)| m.matches(request))
            .map(|(m, r)| (m, r))
    }
}

type TableKey = (ObjectKey, u16, bool);

#[derive(Default)]
struct CacheSlot {
    /// The snapshot the tables were built from; a `Weak` keeps the allocation, so a new
    /// snapshot can never reuse its address.
    state: Weak<ClusterState>,
    tables: HashMap<TableKey, Arc<RouteTable>>,
}

/// Compiled tables of the current discovery snapshot, shared by every pod of the node.
#[derive(Default)]
pub struct RouteCache {
    slot: Mutex<CacheSlot>,
    /// Counts the problems of each table built (`nodemesh_route_config_problems_total`).
    problems: Option<prometheus::IntCounter>,
}

impl RouteCache {
    /// A cache that logs (rate-limited) and counts the problems of each table it builds.
    pub fn counted(problems: prometheus::IntCounter) -> RouteCache {
        RouteCache {
            slot: Mutex::default(),
            problems: Some(problems),
        }
    }

    pub fn table(
        &self,
        state: &Arc<ClusterState>,
        service: &ObjectKey,
        port: u16,
        want_v6: bool,
    ) -> Arc<RouteTable> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if !std::ptr::eq(slot.state.as_ptr(), Arc::as_ptr(state)) {
            slot.state = Arc::downgrade(state);
            slot.tables.clear();
        }
        slot.tables
            .entry((service.clone(), port, want_v6))
            .or_insert_with(|| {
                let table = RouteTable::build(state, service, port, want_v6);
                for problem in &table.errors {
                    if let Some(c) = &self.problems {
                        c.inc();
                    }
                    crate::warn_limited!(service = %service, port, problem = %crate::telemetry::log_limit::clip(problem), "route configuration problem; the rest of the routes apply");
                }
                Arc::new(table)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::parse_manifest;

    const BASE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: apps}\n\
        spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: echo-v1, namespace: apps}\n\
        spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: echo-v2, namespace: apps}\n\
        spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n";

    fn table(routes: &str) -> RouteTable {
        let state =
            ClusterState::from_objects(parse_manifest(&format!("{BASE}{routes}")).expect("yaml"));
        RouteTable::build(&state, &ObjectKey::new("apps", "echo"), 80, false)
    }

    fn request(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn chosen(t: &RouteTable, method: &str, uri: &str) -> Option<String> {
        t.select(&request(method, uri)).map(|(_, r)| {
            r.backends
                .iter()
                .map(|b| b.backend.service.name.clone())
                .collect::<Vec<_>>()
                .join("+")
        })
    }

    #[test]
    fn rules_across_routes_follow_the_specs_precedence() {
        let t = table(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: apps}\n\
             spec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n  rules:\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /v2}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: b, namespace: apps}\n\
             spec:\n  parentRefs: [{kind: Service, name: echo}]\n  rules:\n\
             \x20 - matches: [{path: {type: Exact, value: /v2/exact}}, {method: POST, path: {value: /v2}}]\n    backendRefs: [{name: echo, port: 80}]\n",
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(chosen(&t, "GET", "/x").as_deref(), Some("echo-v1"));
        assert_eq!(chosen(&t, "GET", "/v2/a").as_deref(), Some("echo-v2"));
        assert_eq!(chosen(&t, "GET", "/v2/exact").as_deref(), Some("echo"));
        assert_eq!(chosen(&t, "POST", "/v2/a").as_deref(), Some("echo"));
        assert_eq!(chosen(&t, "GET", "/v2x").as_deref(), Some("echo-v1"));
    }

    #[test]
    fn routes_for_other_ports_do_not_apply_and_no_route_means_the_service() {
        let t = table(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: apps}\n\
             spec:\n  parentRefs: [{kind: Service, name: echo, port: 8080}]\n  rules:\n\
             \x20 - backendRefs: [{name: echo-v1, port: 80}]\n",
        );
        assert_eq!(chosen(&t, "GET", "/").as_deref(), Some("echo"));
        assert!(t.select(&request("GET", "/")).unwrap().1.route.is_none());
    }

    #[test]
    fn bad_input_is_contained_to_its_rule_or_backend() {
        let t = table(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: apps}\n\
             spec:\n  parentRefs: [{kind: Service, name: echo}]\n  rules:\n\
             \x20 - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
             \x20 - matches: [{path: {value: /timeout}}]\n    timeouts: {request: soon}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
             \x20 - matches: [{path: {value: /missing}}]\n    backendRefs: [{name: nothere, port: 80}, {kind: Pod, name: p}]\n\
             \x20 - matches: [{path: {value: /retry}}]\n    retry: {codes: [503], backoff: 10ms}\n    timeouts: {request: 0s, backendRequest: 500ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n",
        );
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        let rule = |p: &str| t.select(&request("GET", p)).unwrap().1.clone();
        assert!(rule("/timeout")
            .invalid
            .as_deref()
            .unwrap()
            .contains("timeouts.request"));
        let missing = rule("/missing");
        assert!(missing.backends[0]
            .invalid
            .as_deref()
            .unwrap()
            .contains("does not exist"));
        assert!(missing.backends[1]
            .invalid
            .as_deref()
            .unwrap()
            .contains("not a Service"));
        let retry = rule("/retry");
        assert_eq!(retry.request_timeout, None);
        assert_eq!(retry.backend_timeout, Some(Duration::from_millis(500)));
        let policy = retry.retry.as_ref().unwrap();
        assert_eq!(
            (policy.attempts, policy.codes.clone(), policy.backoff),
            (1, vec![503], Duration::from_millis(10))
        );
    }

    #[test]
    fn a_duration_no_timer_can_hold_makes_the_rule_invalid() {
        // The proxy arms `timeouts.request` as a deadline from now; one past the end of
        // time made every request of the rule panic instead of answering.
        let t = table(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: apps}\n\
             spec:\n  parentRefs: [{kind: Service, name: echo}]\n  rules:\n\
             \x20 - matches: [{path: {value: /request}}]\n    timeouts: {request: 99999999999999999h}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
             \x20 - matches: [{path: {value: /backend}}]\n    timeouts: {backendRequest: 18446744073709551615s}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
             \x20 - matches: [{path: {value: /backoff}}]\n    retry: {backoff: 99999999999999999m}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
             \x20 - matches: [{path: {value: /longest}}]\n    timeouts: {request: 99999h99999m99999s99999ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n",
        );
        for path in ["/request", "/backend", "/backoff"] {
            let rule = t.select(&request("GET", path)).unwrap().1.clone();
            let reason = rule.invalid.as_deref().unwrap_or_default();
            assert!(reason.contains("longer than"), "{path}: {reason:?}");
            for d in [rule.request_timeout, rule.backend_timeout]
                .into_iter()
                .flatten()
            {
                assert!(tokio::time::Instant::now().checked_add(d).is_some());
            }
        }
        // The longest duration the Gateway API's format can write is fine.
        let longest = t.select(&request("GET", "/longest")).unwrap().1.clone();
        assert!(longest.invalid.is_none(), "{:?}", longest.invalid);
        let deadline = longest.request_timeout.unwrap();
        assert!(tokio::time::Instant::now().checked_add(deadline).is_some());
    }

    #[test]
    fn the_cache_rebuilds_only_for_a_new_snapshot() {
        let state = Arc::new(ClusterState::from_objects(parse_manifest(BASE).unwrap()));
        let cache = RouteCache::default();
        let key = ObjectKey::new("apps", "echo");
        let a = cache.table(&state, &key, 80, false);
        let b = cache.table(&state, &key, 80, false);
        assert!(Arc::ptr_eq(&a, &b));
        let next = Arc::new((*state).clone());
        let c = cache.table(&next, &key, 80, false);
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
