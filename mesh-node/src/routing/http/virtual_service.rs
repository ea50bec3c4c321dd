//! VirtualService `http` routes compiled into the same rules and matches as HTTPRoute
//! (one engine, two front ends). Istio's semantics: routes in order, the first whose
//! match holds wins (no precedence sort); `uri.prefix` is a plain string prefix.
//!
//! Containment, as for HTTPRoute: a match that cannot be compiled never matches; a
//! route whose actions cannot be compiled answers 500; a destination that is not a
//! Service answers 500; a `subset` destination is the DestinationRule subset's
//! endpoints, and one no DestinationRule defines answers 503 (never all of the
//! Service's endpoints). Every such problem is
//! returned as an error naming the VirtualService, for the caller to report.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, Method, StatusCode};

use crate::{
    discovery::cluster::ClusterState,
    discovery::duration::{optional_timeout, Grammar},
    discovery::virtual_service::{
        Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRetry, HttpRoute,
        StringMatch, VirtualService,
    },
    keys::{ObjectKey, CLUSTER_DOMAIN},
    routing::http::fault::{compile_fault, mirror_share, Mirror},
    routing::http::filters::{
        header_modifier_from, Filter, Filters, PathModifier, Redirect, UrlRewrite,
    },
    routing::http::matching::{full_regex, PathMatch, RequestMatch, ValueMatch},
    routing::http::rule::{BackendTarget, RetryPolicy, Rule, RuleSource},
    routing::resolve::only_port,
    routing::resolve::subset_backend,
    routing::resolve::Backend,
};

/// Istio retries with a 25 ms base interval.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// The most mirrors one route may have (each request is copied to each).
const MAX_MIRRORS: usize = 4;
/// The most retries a route may ask for.
const MAX_ATTEMPTS: i32 = 100;

/// The rules VirtualServices give one Service port, in order, and what could not be
/// applied.
#[derive(Debug, Default)]
pub(crate) struct Compiled {
    pub(crate) entries: Vec<(RequestMatch, Arc<Rule>)>,
    /// VirtualServices that name the Service and apply to the mesh.
    pub(crate) applied: Vec<ObjectKey>,
    pub(crate) errors: Vec<String>,
}

/// The VirtualServices' rules for `service:port` (VirtualServices by namespace/name).
pub(crate) fn compile(
    state: &ClusterState,
    service: &ObjectKey,
    port: u16,
    want_v6: bool,
) -> Compiled {
    let mut out = Compiled::default();
    for (key, vs) in state.virtual_services_for(service) {
        if !vs.spec.binds_mesh() {
            out.errors.push(format!(
                "VirtualService {key} is bound only to gateways {:?}: the node proxy ignores it (add `mesh` to `gateways` to apply it inside the mesh)",
                vs.spec.gateways.as_deref().unwrap_or_default()
            ));
            continue;
        }
        if vs.spec.http.is_empty() {
            continue;
        }
        out.applied.push(key.clone());
        for field in vs.spec.unimplemented() {
            out.errors.push(format!(
                "VirtualService {key}: `{field}` is not implemented by Nodemesh and is not applied; the rest of the VirtualService is"
            ));
        }
        for (index, route) in vs.spec.http.iter().enumerate() {
            compile_route(state, key, vs, index, route, port, want_v6, &mut out);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn compile_route(
    state: &ClusterState,
    key: &ObjectKey,
    vs: &VirtualService,
    index: usize,
    route: &HttpRoute,
    port: u16,
    want_v6: bool,
    out: &mut Compiled,
) {
    let name = || match &route.name {
        Some(n) => format!("VirtualService {key} http[{index}] ({n})"),
        None => format!("VirtualService {key} http[{index}]"),
    };
    let mut matches = Vec::new();
    if route.matches.is_empty() {
        matches.push(RequestMatch::default());
    }
    for (j, m) in route.matches.iter().enumerate() {
        if m.port.is_some_and(|p| p != u32::from(port)) {
            continue;
        }
        match compile_match(m) {
            Ok(m) => matches.push(m),
            Err(e) => out
                .errors
                .push(format!("{} match[{j}]: {e}; it never matches", name())),
        }
    }
    if matches.is_empty() {
        return;
    }
    let mut invalid = None;
    let mut fail = |e: String| {
        invalid.get_or_insert(e);
    };
    let filters = route_filters(route).unwrap_or_else(|e| {
        fail(e);
        Filters::default()
    });
    let request_timeout = optional_timeout(route.timeout.as_deref(), Grammar::Istio, "timeout")
        .unwrap_or_else(|e| {
            fail(e);
            None
        });
    let (retry, backend_timeout) = match &route.retries {
        None => (None, None),
        Some(r) => retry_policy(r).unwrap_or_else(|e| {
            fail(e);
            (None, None)
        }),
    };
    let fault = route
        .fault
        .as_ref()
        .map(compile_fault)
        .transpose()
        .unwrap_or_else(|e| {
            fail(e);
            None
        });
    let mirrors = mirrors(state, key, route, port, want_v6, out, &name());
    let backends = destinations(state, key, vs, route, port, want_v6, out, &name());
    if route.route.is_empty() && route.redirect.is_none() {
        fail("a route needs `route` destinations or a `redirect`".into());
    }
    if let Some(e) = &invalid {
        out.errors
            .push(format!("{}: {e}; its requests are answered 500", name()));
    }
    let rule = Arc::new(Rule {
        route: Some(key.clone()),
        source: RuleSource::VirtualService,
        index,
        name: route.name.clone(),
        filters,
        backends,
        request_timeout,
        backend_timeout,
        retry,
        fault,
        mirrors,
        invalid,
    });
    out.entries
        .extend(matches.into_iter().map(|m| (m, rule.clone())));
}

#[allow(clippy::too_many_arguments)]
fn destinations(
    state: &ClusterState,
    key: &ObjectKey,
    _vs: &VirtualService,
    route: &HttpRoute,
    port: u16,
    want_v6: bool,
    out: &mut Compiled,
    name: &str,
) -> Vec<BackendTarget> {
    let unweighted = route.route.iter().all(|d| d.weight.is_none());
    route
        .route
        .iter()
        .map(|d| {
            let mut invalid = None;
            let weight = match d.weight {
                // Istio: a lone destination without a weight takes everything; without
                // any weights, traffic is split evenly.
                None if unweighted => 1,
                None => 0,
                Some(w) if w < 0 => {
                    invalid = Some(format!("weight {w} is negative"));
                    0
                }
                Some(w) => w as u32,
            };
            let filters = d
                .headers
                .as_ref()
                .map(header_filters)
                .transpose()
                .unwrap_or_else(|e| {
                    invalid.get_or_insert(e);
                    None
                })
                .unwrap_or_default();
            // A subset is the DestinationRule's: its endpoints, under its policy. One no
            // rule defines has no endpoints (503), never every endpoint of the Service.
            let host = &d.destination.host;
            let (b, bad) = destination_backend(state, key, &d.destination, port, want_v6, weight);
            if let Some(e) = bad {
                invalid.get_or_insert(e);
            }
            if let Some(error) = &b.subset_error {
                out.errors.push(format!(
                    "{name}: destination {host}: {error}; its requests are answered 503"
                ));
            }
            if let Some(e) = &invalid {
                out.errors
                    .push(format!("{name}: {e}; requests sent to it are answered 500"));
            }
            BackendTarget {
                backend: b,
                filters,
                invalid,
            }
        })
        .collect()
}

/// The route's mirrors: `mirror` (with `mirrorPercentage`) and each of `mirrors`, at
/// most [`MAX_MIRRORS`]. A broken one is reported and left out; the route still applies.
fn mirrors(
    state: &ClusterState,
    key: &ObjectKey,
    route: &HttpRoute,
    port: u16,
    want_v6: bool,
    out: &mut Compiled,
    name: &str,
) -> Vec<Mirror> {
    let single = route.mirror.as_ref().map(|d| {
        (
            d,
            mirror_share(route.mirror_percentage.as_ref(), route.mirror_percent),
        )
    });
    let listed = route
        .mirrors
        .iter()
        .flatten()
        .map(|m| (&m.destination, mirror_share(m.percentage.as_ref(), None)));
    let mut kept = Vec::new();
    for (i, (destination, share)) in single.into_iter().chain(listed).enumerate() {
        if i >= MAX_MIRRORS {
            out.errors.push(format!(
                "{name}: more than {MAX_MIRRORS} mirrors; the rest are not used"
            ));
            break;
        }
        let resolved = destination_backend(state, key, destination, port, want_v6, 1);
        match (resolved, share) {
            ((backend, None), Ok(share)) => kept.push(Mirror { backend, share }),
            ((_, Some(e)), _) | (_, Err(e)) => out.errors.push(format!(
                "{name}: mirror {}: {e}; nothing is mirrored there",
                destination.host
            )),
        }
    }
    kept
}

/// The backend a destination names: its Service (`host`), port (the Service's only
/// port when absent, else the request's) and subset — a subset is the
/// DestinationRule's, under its policy; one no rule defines has no endpoints (503),
/// never every endpoint of the Service. With why the destination is invalid, if it is
/// (the backend is then only for the logs).
fn destination_backend(
    state: &ClusterState,
    key: &ObjectKey,
    d: &Destination,
    port: u16,
    want_v6: bool,
    weight: u32,
) -> (Backend, Option<String>) {
    let host = &d.host;
    let mut invalid = None;
    let service = match ObjectKey::from_service_host(host, &key.namespace) {
        Ok(s) if state.services.contains_key(&s) => s,
        Ok(s) => {
            invalid = Some(format!(
                "destination host {host}: Service {s} does not exist"
            ));
            s
        }
        Err(why) => {
            invalid = Some(format!(
                "destination host {host} {why}: write the Service as name, name.namespace or name.namespace.svc.{CLUSTER_DOMAIN}"
            ));
            ObjectKey::new(&key.namespace, host)
        }
    };
    let backend_port = match d.port {
        Some(p) => u16::try_from(p.number).unwrap_or_else(|_| {
            invalid.get_or_insert(format!("destination port {} is not a port", p.number));
            port
        }),
        None => only_port(state, &service).unwrap_or(port),
    };
    let subset = d.subset.as_deref();
    let backend = subset_backend(state, service, backend_port, weight, want_v6, subset);
    (backend, invalid)
}

fn value_match(m: &StringMatch, what: &str) -> Result<ValueMatch, String> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok(ValueMatch::Exact(v.clone())),
        (None, Some(p), None) => Ok(ValueMatch::Prefix(p.clone())),
        (None, None, Some(r)) => Ok(ValueMatch::Regex(full_regex(r)?)),
        _ => Err(format!("{what}: give exactly one of exact, prefix, regex")),
    }
}

fn compile_match(m: &HttpMatchRequest) -> Result<RequestMatch, String> {
    let mut out = RequestMatch::default();
    if let Some(uri) = &m.uri {
        out.path = match value_match(uri, "uri")? {
            ValueMatch::Exact(p) => PathMatch::Exact(p),
            ValueMatch::Prefix(p) => PathMatch::StringPrefix(p),
            ValueMatch::Regex(r) => PathMatch::Regex(r),
        };
    }
    if let Some(method) = &m.method {
        match value_match(method, "method")? {
            ValueMatch::Exact(v) => {
                out.method = Some(
                    Method::from_bytes(v.as_bytes())
                        .map_err(|_| format!("method `{v}` is not an HTTP method"))?,
                )
            }
            other => out.method_value = Some(other),
        }
    }
    for (name, want) in &m.headers {
        let header = HeaderName::try_from(name.as_str())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        out.headers
            .push((header, value_match(want, &format!("headers.{name}"))?));
    }
    for (name, want) in &m.query_params {
        out.query.push((
            name.clone(),
            value_match(want, &format!("queryParams.{name}"))?,
        ));
    }
    Ok(out)
}

fn operations(
    ops: &HeaderOperations,
) -> Result<crate::routing::http::filters::HeaderModifier, String> {
    header_modifier_from(&ops.set, &ops.add, &ops.remove)
}

fn header_filters(h: &Headers) -> Result<Filters, String> {
    let mut list = Vec::new();
    if let Some(r) = &h.request {
        list.push(Filter::RequestHeaderModifier(operations(r)?));
    }
    if let Some(r) = &h.response {
        list.push(Filter::ResponseHeaderModifier(operations(r)?));
    }
    Ok(Filters::from_list(list))
}

/// The route's own actions: headers, then rewrite or redirect.
fn route_filters(route: &HttpRoute) -> Result<Filters, String> {
    let mut list = Vec::new();
    if let Some(h) = &route.headers {
        list.extend(header_filters(h)?.iter().cloned());
    }
    if let (Some(_), Some(_)) = (&route.rewrite, &route.redirect) {
        return Err("`rewrite` and `redirect` cannot be used in the same route".into());
    }
    if let Some(rw) = &route.rewrite {
        list.push(Filter::UrlRewrite(UrlRewrite {
            hostname: rw.authority.clone(),
            path: rw.uri.clone().map(PathModifier::ReplacePrefixMatch),
        }));
    }
    if let Some(r) = &route.redirect {
        let code = r.redirect_code.unwrap_or(301);
        let status = match code {
            301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(code as u16)
                .map_err(|_| format!("redirectCode {code} is not a status"))?,
            _ => {
                return Err(format!(
                    "redirectCode {code} is not a redirect (301, 302, 303, 307, 308)"
                ))
            }
        };
        let port = r
            .port
            .map(|p| u16::try_from(p).map_err(|_| format!("redirect port {p} is not a port")))
            .transpose()?;
        list.push(Filter::RequestRedirect(Redirect {
            scheme: r.scheme.clone(),
            hostname: r.authority.clone(),
            port,
            path: r.uri.clone().map(PathModifier::ReplaceFullPath),
            status,
        }));
    }
    Ok(Filters::from_list(list))
}

/// Istio's `retries`: the policy and the per-try timeout.
fn retry_policy(r: &HttpRetry) -> Result<(Option<RetryPolicy>, Option<Duration>), String> {
    if !(0..=MAX_ATTEMPTS).contains(&r.attempts) {
        return Err(format!(
            "retries.attempts {} is out of range (0 to {MAX_ATTEMPTS})",
            r.attempts
        ));
    }
    let per_try = optional_timeout(
        r.per_try_timeout.as_deref(),
        Grammar::Istio,
        "retries.perTryTimeout",
    )?;
    let mut codes = Vec::new();
    for token in r.retry_on.as_deref().unwrap_or("").split(',') {
        match token.trim() {
            "" => {}
            "5xx" => codes.extend(500..=599),
            "gateway-error" => codes.extend([502, 503, 504]),
            // Connection failures before any response are always retried under a
            // policy (the proxy's own rule); the codes come with the status numbers.
            "connect-failure" | "refused-stream" | "reset" | "retriable-status-codes" => {}
            other => match other.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => codes.push(code),
                _ => {
                    return Err(format!(
                        "retries.retryOn `{other}` is not supported: use 5xx, gateway-error, connect-failure, refused-stream, reset, retriable-status-codes or status codes"
                    ))
                }
            },
        }
    }
    codes.sort_unstable();
    codes.dedup();
    let policy = (r.attempts > 0).then_some(RetryPolicy {
        attempts: r.attempts as u32,
        codes,
        backoff: RETRY_BACKOFF,
    });
    Ok((policy, per_try))
}

#[cfg(test)]
mod tests;
