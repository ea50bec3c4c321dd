//! HTTPRoute rules (structured: matches, filters, timeouts, retries, backendRefs) are
//! compiled into the route table of one Service port, and fuzzed requests are matched
//! against it and put through the chosen rule's filters as the node proxy does:
//! redirect `Location`, request header modifiers, URL rewrite, response header
//! modifiers.
#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use http::{request::Parts, HeaderMap, HeaderName, HeaderValue, Method, Request};
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    discovery::cluster::ClusterState, discovery::cluster::KubeObject,
    discovery::files::parse_manifest, keys::ObjectKey, routing::http::filters::authority,
    routing::http::filters::RequestAction, routing::http::routes::RouteTable,
};
use serde::Serialize;
use serde_json::{json, Value};

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: apps}\n\
    spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: echo-v1, namespace: apps}\n\
    spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: echo-v1-a, namespace: apps, labels: {kubernetes.io/service-name: echo-v1}}\n\
    addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.2]}]\n";

/// A string that is usually meaningful to the routing code (a path, a known name), so
/// the fuzzer reaches matches and filters, not only their compile errors.
#[derive(Debug, Arbitrary)]
enum Text {
    Word(u8),
    Path(Vec<u8>),
    Raw(String),
}

const WORDS: [&str; 16] = [
    "",
    "/",
    "x-mesh",
    "version",
    "q",
    "echo",
    "echo.apps:8080",
    "[fd00::1]:81",
    "a+b%41",
    "[a-z]+",
    ".*",
    "/v[0-9]+",
    "2",
    "https",
    "host",
    "x.example",
];
const SEGMENTS: [&str; 8] = ["", "a", "api", "v1", "v2", "%2F", "..", "a.b"];

impl Text {
    fn string(&self) -> String {
        match self {
            Text::Word(i) => WORDS[*i as usize % WORDS.len()].to_string(),
            Text::Path(segments) if segments.is_empty() => "/".to_string(),
            Text::Path(segments) => segments
                .iter()
                .map(|i| format!("/{}", SEGMENTS[*i as usize % SEGMENTS.len()]))
                .collect(),
            Text::Raw(s) => s.clone(),
        }
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.string())
    }
}

#[derive(Debug, Arbitrary)]
enum Unit {
    Ms,
    S,
    M,
    H,
}

/// A Gateway API duration (`5s`, `1h30m`), or any text.
#[derive(Debug, Arbitrary)]
enum DurationIn {
    Valid(Vec<(u64, Unit)>),
    Raw(String),
}

impl Serialize for DurationIn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DurationIn::Valid(parts) => s.serialize_str(
                &parts
                    .iter()
                    .map(|(n, u)| format!("{n}{}", format!("{u:?}").to_lowercase()))
                    .collect::<String>(),
            ),
            DurationIn::Raw(text) => s.serialize_str(text),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum PathType {
    Exact,
    PathPrefix,
    RegularExpression,
    Unset,
}

#[derive(Debug, Arbitrary)]
enum MatchMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

#[derive(Debug, Arbitrary)]
struct ValueMatch {
    regex: bool,
    name: Text,
    value: Text,
}

#[derive(Debug, Arbitrary)]
struct MatchIn {
    path: Option<(PathType, Option<Text>)>,
    method: Option<MatchMethod>,
    headers: Vec<ValueMatch>,
    query: Vec<ValueMatch>,
}

#[derive(Debug, Arbitrary)]
struct HeaderModifierIn {
    set: Vec<(Text, Text)>,
    add: Vec<(Text, Text)>,
    remove: Vec<Text>,
}

#[derive(Debug, Arbitrary)]
enum PathModifierIn {
    Full(Text),
    Prefix(Text),
}

#[derive(Debug, Arbitrary)]
enum FilterIn {
    RequestHeaders(HeaderModifierIn),
    ResponseHeaders(HeaderModifierIn),
    Rewrite {
        hostname: Option<Text>,
        path: Option<PathModifierIn>,
    },
    Redirect {
        https: Option<bool>,
        hostname: Option<Text>,
        port: Option<i32>,
        path: Option<PathModifierIn>,
        status: Option<i64>,
    },
    Mirror,
}

#[derive(Debug, Arbitrary)]
struct BackendIn {
    /// Index into a few names: the two Services, a missing one.
    service: u8,
    port: Option<i32>,
    weight: Option<i32>,
    filters: Vec<FilterIn>,
}

#[derive(Debug, Arbitrary)]
struct RuleIn {
    name: Option<Text>,
    matches: Vec<MatchIn>,
    filters: Vec<FilterIn>,
    backends: Vec<BackendIn>,
    request_timeout: Option<DurationIn>,
    backend_timeout: Option<DurationIn>,
    retry: Option<(Option<i64>, Option<DurationIn>, Vec<i64>)>,
}

#[derive(Debug, Arbitrary)]
enum MethodIn {
    Get,
    Post,
    Head,
    Raw(String),
}

#[derive(Debug, Arbitrary)]
struct RequestIn {
    method: MethodIn,
    /// An absolute-form target's authority (as HTTP/2 requests have).
    authority: Option<Text>,
    path: Text,
    query: Vec<(Text, Text)>,
    host: Option<Text>,
    headers: Vec<(Text, Text)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// One route per entry, attached to `echo:80` (or every port).
    routes: Vec<(bool, Vec<RuleIn>)>,
    requests: Vec<RequestIn>,
}

fn header_modifier(m: &HeaderModifierIn) -> Value {
    let pairs = |list: &[(Text, Text)]| -> Vec<Value> {
        list.iter()
            .map(|(n, v)| json!({"name": n, "value": v}))
            .collect()
    };
    json!({"set": pairs(&m.set), "add": pairs(&m.add), "remove": m.remove})
}

fn path_modifier(p: &PathModifierIn) -> Value {
    match p {
        PathModifierIn::Full(v) => json!({"type": "ReplaceFullPath", "replaceFullPath": v}),
        PathModifierIn::Prefix(v) => {
            json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": v})
        }
    }
}

fn filter(f: &FilterIn) -> Value {
    match f {
        FilterIn::RequestHeaders(m) => {
            json!({"type": "RequestHeaderModifier", "requestHeaderModifier": header_modifier(m)})
        }
        FilterIn::ResponseHeaders(m) => {
            json!({"type": "ResponseHeaderModifier", "responseHeaderModifier": header_modifier(m)})
        }
        FilterIn::Rewrite { hostname, path } => {
            let mut r = json!({});
            if let Some(h) = hostname {
                r["hostname"] = json!(h);
            }
            if let Some(p) = path {
                r["path"] = path_modifier(p);
            }
            json!({"type": "URLRewrite", "urlRewrite": r})
        }
        FilterIn::Redirect {
            https,
            hostname,
            port,
            path,
            status,
        } => {
            let mut r = json!({});
            if let Some(https) = https {
                r["scheme"] = json!(if *https { "https" } else { "http" });
            }
            if let Some(h) = hostname {
                r["hostname"] = json!(h);
            }
            if let Some(p) = port {
                r["port"] = json!(p);
            }
            if let Some(p) = path {
                r["path"] = path_modifier(p);
            }
            if let Some(s) = status {
                r["statusCode"] = json!(s);
            }
            json!({"type": "RequestRedirect", "requestRedirect": r})
        }
        FilterIn::Mirror => {
            json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "echo-v1"}}})
        }
    }
}

fn value_matches(list: &[ValueMatch]) -> Vec<Value> {
    list.iter()
        .map(|m| {
            json!({
                "name": m.name,
                "value": m.value,
                "type": if m.regex { "RegularExpression" } else { "Exact" },
            })
        })
        .collect()
}

fn rule(r: &RuleIn) -> Value {
    let matches: Vec<Value> = r
        .matches
        .iter()
        .map(|m| {
            let mut out = json!({
                "headers": value_matches(&m.headers),
                "queryParams": value_matches(&m.query),
            });
            if let Some((kind, value)) = &m.path {
                let mut path = json!({});
                match kind {
                    PathType::Exact => path["type"] = json!("Exact"),
                    PathType::PathPrefix => path["type"] = json!("PathPrefix"),
                    PathType::RegularExpression => path["type"] = json!("RegularExpression"),
                    PathType::Unset => {}
                }
                if let Some(v) = value {
                    path["value"] = json!(v);
                }
                out["path"] = path;
            }
            if let Some(method) = &m.method {
                out["method"] = json!(format!("{method:?}").to_uppercase());
            }
            out
        })
        .collect();
    let backends: Vec<Value> = r
        .backends
        .iter()
        .map(|b| {
            let name = ["echo", "echo-v1", "missing"][b.service as usize % 3];
            let mut out = json!({
                "name": name,
                "filters": b.filters.iter().map(filter).collect::<Vec<_>>(),
            });
            if let Some(p) = b.port {
                out["port"] = json!(p);
            }
            if let Some(w) = b.weight {
                out["weight"] = json!(w);
            }
            out
        })
        .collect();
    let mut out = json!({
        "matches": matches,
        "filters": r.filters.iter().map(filter).collect::<Vec<_>>(),
        "backendRefs": backends,
    });
    if let Some(n) = &r.name {
        out["name"] = json!(n);
    }
    let mut timeouts = json!({});
    if let Some(t) = &r.request_timeout {
        timeouts["request"] = json!(t);
    }
    if let Some(t) = &r.backend_timeout {
        timeouts["backendRequest"] = json!(t);
    }
    out["timeouts"] = timeouts;
    if let Some((attempts, backoff, codes)) = &r.retry {
        let mut retry = json!({"codes": codes});
        if let Some(a) = attempts {
            retry["attempts"] = json!(a);
        }
        if let Some(b) = backoff {
            retry["backoff"] = json!(b);
        }
        out["retry"] = retry;
    }
    out
}

fn request(r: &RequestIn) -> Option<Parts> {
    let method = match &r.method {
        MethodIn::Get => Method::GET,
        MethodIn::Post => Method::POST,
        MethodIn::Head => Method::HEAD,
        MethodIn::Raw(m) => Method::from_bytes(m.as_bytes()).ok()?,
    };
    let mut uri = r.path.string();
    for (i, (k, v)) in r.query.iter().enumerate() {
        uri.push(if i == 0 { '?' } else { '&' });
        uri.push_str(&format!("{}={}", k.string(), v.string()));
    }
    if let Some(a) = &r.authority {
        uri = format!("http://{}{uri}", a.string());
    }
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(h) = &r.host {
        b = b.header(http::header::HOST, HeaderValue::try_from(h.string()).ok()?);
    }
    for (n, v) in &r.headers {
        b = b.header(
            HeaderName::try_from(n.string()).ok()?,
            HeaderValue::try_from(v.string()).ok()?,
        );
    }
    Some(b.body(()).ok()?.into_parts().0)
}

static BASE: LazyLock<Vec<KubeObject>> =
    LazyLock::new(|| parse_manifest(SERVICES).expect("the base Services"));

fuzz_target!(|input: Input| {
    let mut objects = BASE.clone();
    for (i, (every_port, rules)) in input.routes.iter().enumerate() {
        let parent = if *every_port {
            json!({"kind": "Service", "name": "echo"})
        } else {
            json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
        };
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": format!("r{i}"), "namespace": "apps"},
            "spec": {"parentRefs": [parent], "rules": rules.iter().map(rule).collect::<Vec<_>>()},
        });
        match serde_json::from_value(route) {
            Ok(route) => objects.push(KubeObject::HttpRoute(Box::new(route))),
            Err(_) => return,
        }
    }
    let state = ClusterState::from_objects(objects);
    let table = RouteTable::build(&state, &ObjectKey::new("apps", "echo"), 80, false);
    for rule in table.rules() {
        // Whatever a route says, the proxy must be able to arm its timers.
        for t in [rule.request_timeout, rule.backend_timeout]
            .into_iter()
            .flatten()
            .chain(rule.retry.as_ref().map(|r| r.backoff))
        {
            assert!(
                tokio::time::Instant::now().checked_add(t).is_some(),
                "timeout {t:?} cannot be armed"
            );
        }
        let _ = rule.describe();
    }
    for r in &input.requests {
        let Some(mut parts) = request(r) else {
            continue;
        };
        let Some((matched, rule)) = table.select(&parts) else {
            continue;
        };
        assert!(matched.matches(&parts), "the selected match must match");
        let matched = matched.path.clone();
        if rule.invalid.is_some() {
            continue;
        }
        let mut response = HeaderMap::new();
        match rule.filters.apply_request(&mut parts, &matched) {
            Ok(RequestAction::Redirect { status, location }) => {
                assert!(status.is_redirection());
                // A valid rule's redirect always carries its Location.
                assert!(
                    HeaderValue::try_from(location.as_str()).is_ok(),
                    "Location {location:?} cannot be sent"
                );
            }
            Ok(RequestAction::Forward) => {
                let _ = authority(&parts);
                for backend in &rule.backends {
                    backend
                        .filters
                        .apply_backend_request(&mut parts.headers.clone());
                }
            }
            Err(_) => {}
        }
        rule.filters.apply_response(&mut response);
    }
});
