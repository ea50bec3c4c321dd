//! HTTPRoute request matches (path, method, headers, query parameters) and their
//! precedence, as the Gateway API orders them.

use std::cmp::Reverse;

use http::{request::Parts, HeaderMap, Method};
use regex::Regex;

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix, stored without a trailing slash (`/` stays `/`).
    Prefix(String),
    Regex(Regex),
    /// A plain string prefix (a VirtualService's `uri.prefix`: `/api` matches `/apis`).
    StringPrefix(String),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
    /// A plain string prefix (VirtualService).
    Prefix(String),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(r) => r.is_match(value),
            ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

/// One entry of a rule's `matches`: every condition must hold.
#[derive(Debug, Clone)]
pub struct RequestMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    /// The method by prefix or regular expression (VirtualService).
    pub method_value: Option<ValueMatch>,
    pub headers: Vec<(http::HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

impl Default for RequestMatch {
    /// A rule without matches matches every request (`PathPrefix /`).
    fn default() -> Self {
        RequestMatch {
            path: PathMatch::Prefix("/".into()),
            method: None,
            method_value: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }
}

/// Anchors a Gateway API regular expression: it must match the whole value.
pub(crate) fn full_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("regular expression `{pattern}` is invalid: {e}"))
}

/// `PathPrefix` as the spec defines it: `/abc` matches `/abc`, `/abc/` and `/abc/def`,
/// not `/abcd`.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Normalizes a prefix for matching: no trailing slash except for `/` itself.
pub(crate) fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

fn header_matches(headers: &HeaderMap, name: &http::HeaderName, want: &ValueMatch) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| want.matches(v))
}

/// Decodes `%XX` and `+` in a query component; malformed escapes stay as they are.
fn decode_query_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                // Two hex digits exactly: `from_str_radix` alone would also take `+1`.
                let hex = &bytes[i + 1..i + 3];
                let value = hex
                    .iter()
                    .all(u8::is_ascii_hexdigit)
                    .then(|| std::str::from_utf8(hex).ok())
                    .flatten()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match value {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of query parameter `name` (the spec says only the first counts).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode_query_component(k) == name).then(|| decode_query_component(v))
    })
}

impl RequestMatch {
    pub fn matches(&self, request: &Parts) -> bool {
        let path = request.uri.path();
        let path_ok = match &self.path {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => prefix_matches(p, path),
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::StringPrefix(p) => path.starts_with(p.as_str()),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == request.method)
            && self
                .method_value
                .as_ref()
                .is_none_or(|m| m.matches(request.method.as_str()))
            && self
                .headers
                .iter()
                .all(|(name, want)| header_matches(&request.headers, name, want))
            && self.query.iter().all(|(name, want)| {
                query_param(request.uri.query(), name).is_some_and(|v| want.matches(&v))
            })
    }

    /// Sort key, most specific first: Exact path, then regular expressions (their rank
    /// is implementation-specific; before prefixes, so a catch-all `/` cannot shadow
    /// them), then the longest prefix; then a method match, the most header matches,
    /// the most query matches.
    pub fn precedence(&self) -> (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>) {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
            PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => (2, p.len()),
        };
        (
            kind,
            Reverse(len),
            self.method.is_none() && self.method_value.is_none(),
            Reverse(self.headers.len()),
            Reverse(self.query.len()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn prefixes_match_whole_path_elements() {
        assert!(prefix_matches("/abc", "/abc"));
        assert!(prefix_matches("/abc", "/abc/"));
        assert!(prefix_matches("/abc", "/abc/def"));
        assert!(!prefix_matches("/abc", "/abcd"));
        assert!(prefix_matches("/", "/anything"));
        assert_eq!(normalize_prefix("/abc/"), "/abc");
        assert_eq!(normalize_prefix("/"), "/");
    }

    #[test]
    fn every_condition_must_hold() {
        let m = RequestMatch {
            path: PathMatch::Exact("/v1".into()),
            method: Some(Method::POST),
            method_value: None,
            headers: vec![(
                http::HeaderName::from_static("version"),
                ValueMatch::Exact("two".into()),
            )],
            query: vec![("animal".into(), ValueMatch::Exact("whale".into()))],
        };
        assert!(m.matches(&parts("POST", "/v1?animal=whale", &[("Version", "two")])));
        assert!(!m.matches(&parts("GET", "/v1?animal=whale", &[("Version", "two")])));
        assert!(!m.matches(&parts("POST", "/v1?animal=dolphin", &[("Version", "two")])));
        assert!(!m.matches(&parts("POST", "/v1?animal=whale", &[("Version", "one")])));
        assert!(!m.matches(&parts("POST", "/v1/x?animal=whale", &[("Version", "two")])));
    }

    #[test]
    fn regular_expressions_must_match_the_whole_value() {
        let m = RequestMatch {
            path: PathMatch::Regex(full_regex("/v[0-9]+").unwrap()),
            ..RequestMatch::default()
        };
        assert!(m.matches(&parts("GET", "/v12", &[])));
        assert!(!m.matches(&parts("GET", "/v12/x", &[])));
        assert!(full_regex("(").is_err());
    }

    #[test]
    fn query_parameters_are_decoded_and_the_first_counts() {
        assert_eq!(query_param(Some("a=1&a=2"), "a").as_deref(), Some("1"));
        assert_eq!(
            query_param(Some("q=hello+w%6Frld"), "q").as_deref(),
            Some("hello world")
        );
        assert_eq!(query_param(Some("flag"), "flag").as_deref(), Some(""));
        assert_eq!(
            query_param(Some("bad=%zz%"), "bad").as_deref(),
            Some("%zz%")
        );
        assert_eq!(query_param(None, "a"), None);
        // A sign is not a hex digit: `%+1` is malformed and stays as it is.
        assert_eq!(query_param(Some("a=%+1"), "a").as_deref(), Some("% 1"));
        assert_eq!(query_param(Some("a=%+1x"), "a").as_deref(), Some("% 1x"));
    }

    #[test]
    fn precedence_orders_exact_then_longest_prefix_then_method_headers_query() {
        let prefix = |p: &str| RequestMatch {
            path: PathMatch::Prefix(p.into()),
            ..RequestMatch::default()
        };
        let exact = RequestMatch {
            path: PathMatch::Exact("/a".into()),
            ..RequestMatch::default()
        };
        let with_method = RequestMatch {
            method: Some(Method::GET),
            ..prefix("/a")
        };
        let mut all = [
            prefix("/"),
            prefix("/a"),
            with_method,
            exact.clone(),
            prefix("/a/b"),
        ];
        all.sort_by_key(|m| m.precedence());
        let order: Vec<String> = all
            .iter()
            .map(|m| match &m.path {
                PathMatch::Exact(p) => format!("exact {p}"),
                PathMatch::Prefix(p) => format!("prefix {p} {}", m.method.is_some()),
                PathMatch::Regex(r) => r.to_string(),
                PathMatch::StringPrefix(p) => format!("string prefix {p}"),
            })
            .collect();
        assert_eq!(
            order,
            [
                "exact /a",
                "prefix /a/b false",
                "prefix /a true",
                "prefix /a false",
                "prefix / false"
            ]
        );
    }
}
