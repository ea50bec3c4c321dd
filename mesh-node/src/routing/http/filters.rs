//! HTTPRoute filters: request and response header modifiers, URL rewrites and
//! redirects, compiled once per rule (and per backendRef) into a list kept in the
//! route's order, and applied by [`Filters::apply_request`] and
//! [`Filters::apply_response`]. Rule-level and backendRef-level filters have separate
//! (identical) Rust types in the Gateway API crate; both are read through serde into
//! these. A new filter kind is a [`Filter`] variant, its arm in `compile`, and its arm
//! in the apply functions.

use http::{
    header::{HeaderName, HeaderValue, HOST},
    request::Parts,
    HeaderMap, StatusCode, Uri,
};
use serde::{Deserialize, Serialize};

use crate::{routing::http::matching::normalize_prefix, routing::http::matching::PathMatch};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FilterSpec {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModifierSpec>,
    response_header_modifier: Option<HeaderModifierSpec>,
    url_rewrite: Option<UrlRewriteSpec>,
    request_redirect: Option<RedirectSpec>,
}

#[derive(Debug, Default, Deserialize)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Debug, Default, Deserialize)]
struct HeaderModifierSpec {
    #[serde(default)]
    set: Vec<NameValue>,
    #[serde(default)]
    add: Vec<NameValue>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathModifierSpec {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UrlRewriteSpec {
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    port: Option<u16>,
    path: Option<PathModifierSpec>,
    status_code: Option<u16>,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug, Clone)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: StatusCode,
}

/// One filter of a rule or a backendRef, compiled.
#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(Redirect),
    UrlRewrite(UrlRewrite),
}

/// The filters of one rule or one backendRef, compiled, in the route's order.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    list: Vec<Filter>,
}

/// What a rule's request filters decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestAction {
    /// Send the request, as the filters left it, to a backend.
    Forward,
    /// Answer with this redirect: no backend sees the request.
    Redirect {
        status: StatusCode,
        location: String,
    },
}

fn header_pairs(list: &[NameValue]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    list.iter()
        .map(|nv| {
            let name = HeaderName::try_from(nv.name.as_str())
                .map_err(|_| format!("`{}` is not a valid header name", nv.name))?;
            let value = HeaderValue::try_from(nv.value.as_str())
                .map_err(|_| format!("the value of header `{}` is not valid", nv.name))?;
            Ok((name, value))
        })
        .collect()
}

fn header_modifier(spec: HeaderModifierSpec) -> Result<HeaderModifier, String> {
    Ok(HeaderModifier {
        set: header_pairs(&spec.set)?,
        add: header_pairs(&spec.add)?,
        remove: spec
            .remove
            .iter()
            .map(|n| {
                HeaderName::try_from(n.as_str())
                    .map_err(|_| format!("`{n}` is not a valid header name"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(spec: PathModifierSpec) -> Result<PathModifier, String> {
    match spec.kind.as_str() {
        "ReplaceFullPath" => spec
            .replace_full_path
            .map(PathModifier::ReplaceFullPath)
            .ok_or_else(|| "ReplaceFullPath without replaceFullPath".into()),
        "ReplacePrefixMatch" => spec
            .replace_prefix_match
            .map(PathModifier::ReplacePrefixMatch)
            .ok_or_else(|| "ReplacePrefixMatch without replacePrefixMatch".into()),
        other => Err(format!("path modifier type `{other}` is not supported")),
    }
}

fn compile_one<T: Serialize>(filter: &T) -> Result<Filter, String> {
    let spec: FilterSpec = serde_json::to_value(filter)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("filter is malformed: {e}"))?;
    let missing = || format!("filter {} has no {} field", spec.kind, spec.kind);
    Ok(match spec.kind.as_str() {
        "RequestHeaderModifier" => Filter::RequestHeaderModifier(header_modifier(
            spec.request_header_modifier.unwrap_or_default(),
        )?),
        "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(header_modifier(
            spec.response_header_modifier.unwrap_or_default(),
        )?),
        "URLRewrite" => {
            let r = spec.url_rewrite.ok_or_else(missing)?;
            Filter::UrlRewrite(UrlRewrite {
                hostname: r.hostname,
                path: r.path.map(path_modifier).transpose()?,
            })
        }
        "RequestRedirect" => {
            let r = spec.request_redirect.ok_or_else(missing)?;
            let status = r.status_code.unwrap_or(302);
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| s.is_redirection())
                .ok_or_else(|| format!("redirect status {status} is not a 3xx code"))?;
            Filter::RequestRedirect(Redirect {
                scheme: r.scheme,
                hostname: r.hostname,
                port: r.port,
                path: r.path.map(path_modifier).transpose()?,
                status,
            })
        }
        other => {
            return Err(format!(
                "filter type {other} is not supported by Nodemesh; remove it or move the route to a gateway that supports it"
            ))
        }
    })
}

/// Compiles a rule's or backendRef's `filters`, keeping their order. A filter
/// Nodemesh does not implement makes the whole list invalid: the spec asks for an
/// error response, never for silently ignoring a filter.
pub fn compile<T: Serialize>(filters: &[T]) -> Result<Filters, String> {
    let list = filters
        .iter()
        .map(compile_one)
        .collect::<Result<Vec<_>, _>>()?;
    let has = |kind: fn(&Filter) -> bool| list.iter().any(kind);
    if has(|f| matches!(f, Filter::RequestRedirect(_)))
        && has(|f| matches!(f, Filter::UrlRewrite(_)))
    {
        return Err("RequestRedirect and URLRewrite cannot be used in the same rule".into());
    }
    Ok(Filters { list })
}

/// A header modifier from name → value maps (a VirtualService's `headers`).
pub(crate) fn header_modifier_from<'a>(
    set: impl IntoIterator<Item = (&'a String, &'a String)>,
    add: impl IntoIterator<Item = (&'a String, &'a String)>,
    remove: &[String],
) -> Result<HeaderModifier, String> {
    let pairs = |m: &mut dyn Iterator<Item = (&'a String, &'a String)>| {
        m.map(|(name, value)| NameValue {
            name: name.clone(),
            value: value.clone(),
        })
        .collect::<Vec<_>>()
    };
    header_modifier(HeaderModifierSpec {
        set: pairs(&mut set.into_iter()),
        add: pairs(&mut add.into_iter()),
        remove: remove.to_vec(),
    })
}

impl Filters {
    /// Filters already compiled (a VirtualService's), applied in this order.
    pub(crate) fn from_list(list: Vec<Filter>) -> Filters {
        Filters { list }
    }

    /// The filters, in the route's order.
    pub fn iter(&self) -> impl Iterator<Item = &Filter> {
        self.list.iter()
    }

    /// Applies a rule's filters to a request, in the route's order: header
    /// modifiers and URL rewrites change it; a redirect ends the walk with its answer
    /// (the filters after it have no request to act on). `matched` is the rule match
    /// that selected the request (a prefix rewrite replaces exactly that prefix).
    /// Err: a rewrite made the request invalid.
    pub fn apply_request(
        &self,
        parts: &mut Parts,
        matched: &PathMatch,
    ) -> Result<RequestAction, String> {
        for filter in &self.list {
            match filter {
                Filter::RequestHeaderModifier(m) => m.apply(&mut parts.headers),
                Filter::UrlRewrite(rewrite) => rewrite.apply(parts, matched)?,
                Filter::RequestRedirect(redirect) => {
                    return Ok(RequestAction::Redirect {
                        status: redirect.status,
                        location: redirect.location(parts, matched),
                    })
                }
                Filter::ResponseHeaderModifier(_) => {}
            }
        }
        Ok(RequestAction::Forward)
    }

    /// Applies a backendRef's filters to the headers of a request forwarded to that
    /// backend, in the route's order. A backendRef's header modifiers are all that
    /// acts there: its redirects and rewrites are compiled (and make a bad list
    /// invalid) but not applied.
    pub fn apply_backend_request(&self, headers: &mut HeaderMap) {
        for filter in &self.list {
            if let Filter::RequestHeaderModifier(m) = filter {
                m.apply(headers);
            }
        }
    }

    /// Applies the response header modifiers to a response, in the route's order.
    pub fn apply_response(&self, headers: &mut HeaderMap) {
        for filter in &self.list {
            if let Filter::ResponseHeaderModifier(m) = filter {
                m.apply(headers);
            }
        }
    }
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// The path after a path modifier; `matched` is the rule match that selected the
/// request (a prefix replacement replaces exactly the matched prefix).
pub fn modified_path(modifier: &PathModifier, matched: &PathMatch, path: &str) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let prefix = match matched {
                PathMatch::Prefix(p) | PathMatch::Exact(p) => normalize_prefix(p),
                PathMatch::Regex(_) => return path.to_string(),
                // A VirtualService's rewrite replaces exactly the matched characters.
                PathMatch::StringPrefix(p) => {
                    let rest = path.strip_prefix(p.as_str()).unwrap_or(path);
                    let joined = format!("{replacement}{rest}");
                    return if joined.starts_with('/') {
                        joined
                    } else {
                        format!("/{joined}")
                    };
                }
            };
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            };
            let replacement = replacement.trim_end_matches('/');
            let rest = rest.trim_start_matches('/');
            let joined = match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_string(),
                (true, false) => format!("/{rest}"),
                (false, true) => replacement.to_string(),
                (false, false) => format!("{replacement}/{rest}"),
            };
            if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

fn with_query(path: String, uri: &Uri) -> String {
    match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// The request's authority: the Host header (HTTP/1.1) or the URI's (HTTP/2).
pub fn authority(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
}

fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    // Bracketed IPv6 literals keep their colons.
    if let Some(end) = authority.rfind(']') {
        let (host, rest) = authority.split_at(end + 1);
        return (host, rest.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

fn well_known_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

impl Redirect {
    /// The `Location` of the redirect, per the Gateway API: an unset scheme, hostname or
    /// path keeps the request's; an unset port keeps the request's unless the scheme
    /// changes (then the new scheme's well-known port); well-known ports are omitted.
    pub fn location(&self, parts: &Parts, matched: &PathMatch) -> String {
        let authority = authority(parts).unwrap_or_default();
        let (req_host, req_port) = split_host_port(&authority);
        let scheme = self
            .scheme
            .clone()
            .or_else(|| parts.uri.scheme_str().map(str::to_string))
            .unwrap_or_else(|| "http".into());
        let host = self.hostname.as_deref().unwrap_or(req_host);
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => None,
            (None, None) => req_port,
        };
        let port = port.filter(|p| *p != well_known_port(&scheme));
        let path = match &self.path {
            Some(m) => modified_path(m, matched, parts.uri.path()),
            None => parts.uri.path().to_string(),
        };
        let path = with_query(path, &parts.uri);
        match port {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }
}

impl UrlRewrite {
    /// Rewrites the request's path and authority in place.
    pub fn apply(&self, parts: &mut Parts, matched: &PathMatch) -> Result<(), String> {
        if let Some(host) = &self.hostname {
            let value = HeaderValue::try_from(host.as_str())
                .map_err(|_| format!("rewrite hostname `{host}` is not valid"))?;
            parts.headers.insert(HOST, value);
        }
        if let Some(m) = &self.path {
            let path = with_query(modified_path(m, matched, parts.uri.path()), &parts.uri);
            let mut uri = parts.uri.clone().into_parts();
            uri.path_and_query = Some(
                path.parse()
                    .map_err(|_| format!("rewritten path `{path}` is not valid"))?,
            );
            parts.uri = Uri::from_parts(uri).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: &str) -> Parts {
        http::Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(normalize_prefix(p))
    }

    #[test]
    fn prefix_replacement_replaces_exactly_the_matched_prefix() {
        let m = |r: &str| PathModifier::ReplacePrefixMatch(r.into());
        assert_eq!(
            modified_path(&m("/one"), &prefix("/prefix"), "/prefix/two"),
            "/one/two"
        );
        assert_eq!(
            modified_path(&m("/"), &prefix("/prefix"), "/prefix/two"),
            "/two"
        );
        assert_eq!(modified_path(&m("/"), &prefix("/prefix"), "/prefix"), "/");
        assert_eq!(
            modified_path(&m("/one/"), &prefix("/prefix/"), "/prefix/"),
            "/one"
        );
        assert_eq!(modified_path(&m("/x"), &prefix("/"), "/a/b"), "/x/a/b");
        let full = PathModifier::ReplaceFullPath("/full".into());
        assert_eq!(modified_path(&full, &prefix("/a"), "/a/b"), "/full");
    }

    #[test]
    fn redirects_keep_what_is_unset_and_drop_well_known_ports() {
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(str::to_string),
            hostname: host.map(str::to_string),
            port,
            path: None,
            status: StatusCode::FOUND,
        };
        let req = parts("/port?x=1", "echo");
        let m = prefix("/port");
        assert_eq!(
            r(None, None, Some(8083)).location(&req, &m),
            "http://echo:8083/port?x=1"
        );
        assert_eq!(
            r(None, Some("example.org"), Some(8083)).location(&req, &m),
            "http://example.org:8083/port?x=1"
        );
        assert_eq!(
            r(Some("https"), None, None).location(&req, &m),
            "https://echo/port?x=1"
        );
        let with_port = parts("/p", "echo:8080");
        assert_eq!(
            r(None, Some("h"), None).location(&with_port, &m),
            "http://h:8080/p"
        );
        assert_eq!(
            r(Some("https"), None, None).location(&with_port, &m),
            "https://echo/p"
        );
        assert_eq!(
            r(None, None, Some(80)).location(&with_port, &m),
            "http://echo/p"
        );
        let v6 = parts("/p", "[fd00::1]:81");
        assert_eq!(
            r(None, None, None).location(&v6, &m),
            "http://[fd00::1]:81/p"
        );
    }

    #[test]
    fn header_modifiers_set_add_and_remove() {
        let spec: HeaderModifierSpec = serde_json::from_str(
            r#"{"set":[{"name":"X-Set","value":"s"}],"add":[{"name":"X-Add","value":"a"}],"remove":["X-Gone"]}"#,
        )
        .unwrap();
        let m = header_modifier(spec).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-set", HeaderValue::from_static("old"));
        h.insert("x-add", HeaderValue::from_static("first"));
        h.insert("x-gone", HeaderValue::from_static("bye"));
        m.apply(&mut h);
        assert_eq!(h.get("x-set").unwrap(), "s");
        assert_eq!(h.get_all("x-add").iter().count(), 2);
        assert!(h.get("x-gone").is_none());
    }

    fn filters(json: serde_json::Value) -> Filters {
        let list: Vec<serde_json::Value> = serde_json::from_value(json).unwrap();
        compile(&list).unwrap()
    }

    fn set(name: &str, value: &str) -> serde_json::Value {
        serde_json::json!({"type": "RequestHeaderModifier",
            "requestHeaderModifier": {"set": [{"name": name, "value": value}]}})
    }

    fn remove(name: &str) -> serde_json::Value {
        serde_json::json!({"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": [name]}})
    }

    fn forwarded(f: &Filters, uri: &str) -> Parts {
        let mut req = parts(uri, "echo");
        let action = f.apply_request(&mut req, &prefix("/")).unwrap();
        assert_eq!(action, RequestAction::Forward);
        req
    }

    #[test]
    fn filters_apply_in_the_routes_order() {
        let set_then_remove = filters(serde_json::json!([set("x-a", "1"), remove("x-a")]));
        assert!(forwarded(&set_then_remove, "/")
            .headers
            .get("x-a")
            .is_none());
        let remove_then_set = filters(serde_json::json!([remove("x-a"), set("x-a", "1")]));
        assert_eq!(forwarded(&remove_then_set, "/").headers["x-a"], "1");
        // Across kinds too: whichever of a rewrite and a header modifier comes last
        // decides the Host the backend sees.
        let rewrite =
            serde_json::json!({"type": "URLRewrite", "urlRewrite": {"hostname": "rewritten"}});
        let rewrite_then_set = filters(serde_json::json!([rewrite, set("host", "modified")]));
        assert_eq!(forwarded(&rewrite_then_set, "/").headers[HOST], "modified");
        let set_then_rewrite = filters(serde_json::json!([set("host", "modified"), rewrite]));
        assert_eq!(forwarded(&set_then_rewrite, "/").headers[HOST], "rewritten");
        // A redirect answers the request as the filters before it left it; the ones
        // after it do nothing.
        let redirect =
            serde_json::json!({"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}});
        let f = filters(serde_json::json!([
            set("host", "moved"),
            redirect,
            set("x-late", "1")
        ]));
        let mut req = parts("/a?b=1", "echo");
        assert_eq!(
            f.apply_request(&mut req, &prefix("/")).unwrap(),
            RequestAction::Redirect {
                status: StatusCode::MOVED_PERMANENTLY,
                location: "http://moved/a?b=1".into()
            }
        );
        assert!(req.headers.get("x-late").is_none());
    }

    #[test]
    fn each_kind_of_filter_applies_where_it_belongs() {
        let f = filters(serde_json::json!([
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-resp", "value": "r"}]}},
            {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}},
            set("x-req", "q"),
        ]));
        assert_eq!(f.iter().count(), 3);
        let mut req = parts("/old/page?q=1", "echo");
        let action = f.apply_request(&mut req, &prefix("/old")).unwrap();
        assert_eq!(action, RequestAction::Forward);
        assert_eq!(req.uri, "/new/page?q=1");
        assert_eq!(req.headers["x-req"], "q");
        assert!(req.headers.get("x-resp").is_none());
        let mut response = HeaderMap::new();
        f.apply_response(&mut response);
        assert_eq!(response["x-resp"], "r");
        assert!(response.get("x-req").is_none());
        // A backendRef's filters: its request header modifiers, on the forwarded
        // request's headers.
        let mut headers = HeaderMap::new();
        f.apply_backend_request(&mut headers);
        assert_eq!(
            (headers.len(), &headers["x-req"]),
            (1, &HeaderValue::from_static("q"))
        );
        // A rewrite that cannot make a valid request is an error, not a request.
        let bad = filters(serde_json::json!([
            {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a b"}}}
        ]));
        assert!(bad
            .apply_request(&mut parts("/", "echo"), &prefix("/"))
            .is_err());
        assert!(Filters::default()
            .apply_request(&mut parts("/", "echo"), &prefix("/"))
            .is_ok_and(|a| a == RequestAction::Forward));
    }

    #[test]
    fn unsupported_or_conflicting_filters_are_errors() {
        let mirror = serde_json::json!([{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x"}}}]);
        let list: Vec<serde_json::Value> = serde_json::from_value(mirror).unwrap();
        assert!(compile(&list).unwrap_err().contains("RequestMirror"));
        let both = serde_json::json!([
            {"type": "RequestRedirect", "requestRedirect": {"port": 8083}},
            {"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}
        ]);
        let list: Vec<serde_json::Value> = serde_json::from_value(both).unwrap();
        assert!(compile(&list).unwrap_err().contains("cannot be used"));
        let bad = serde_json::json!([{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]);
        let list: Vec<serde_json::Value> = serde_json::from_value(bad).unwrap();
        assert!(compile(&list).unwrap_err().contains("3xx"));
    }
}
