//! HTTPRoute filters: request and response header modifiers, URL rewrites and
//! redirects. Rule-level and backendRef-level filters have separate (identical) Rust
//! types in the Gateway API crate; both are read through serde into these.

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

/// The filters of one rule or one backendRef, compiled.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub request_headers: Vec<HeaderModifier>,
    pub response_headers: Vec<HeaderModifier>,
    pub rewrite: Option<UrlRewrite>,
    pub redirect: Option<Redirect>,
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

/// Compiles a rule's or backendRef's `filters`. A filter Nodemesh does not implement
/// makes the whole list invalid: the spec asks for an error response, never for
/// silently ignoring a filter.
pub fn compile<T: Serialize>(filters: &[T]) -> Result<Filters, String> {
    let mut out = Filters::default();
    for filter in filters {
        let spec: FilterSpec = serde_json::to_value(filter)
            .and_then(serde_json::from_value)
            .map_err(|e| format!("filter is malformed: {e}"))?;
        let missing = || format!("filter {} has no {} field", spec.kind, spec.kind);
        match spec.kind.as_str() {
            "RequestHeaderModifier" => out.request_headers.push(header_modifier(
                spec.request_header_modifier.unwrap_or_default(),
            )?),
            "ResponseHeaderModifier" => out.response_headers.push(header_modifier(
                spec.response_header_modifier.unwrap_or_default(),
            )?),
            "URLRewrite" => {
                let r = spec.url_rewrite.ok_or_else(missing)?;
                out.rewrite = Some(UrlRewrite {
                    hostname: r.hostname,
                    path: r.path.map(path_modifier).transpose()?,
                });
            }
            "RequestRedirect" => {
                let r = spec.request_redirect.ok_or_else(missing)?;
                let status = r.status_code.unwrap_or(302);
                let status = StatusCode::from_u16(status)
                    .ok()
                    .filter(|s| s.is_redirection())
                    .ok_or_else(|| format!("redirect status {status} is not a 3xx code"))?;
                out.redirect = Some(Redirect {
                    scheme: r.scheme,
                    hostname: r.hostname,
                    port: r.port,
                    path: r.path.map(path_modifier).transpose()?,
                    status,
                });
            }
            other => {
                return Err(format!(
                    "filter type {other} is not supported by Nodemesh; remove it or move the route to a gateway that supports it"
                ))
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err("RequestRedirect and URLRewrite cannot be used in the same rule".into());
    }
    Ok(out)
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
