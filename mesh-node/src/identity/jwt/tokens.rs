//! Finding a request's token where the rules say it is (headers with a prefix, query
//! parameters, cookies), bounded; and rewriting the request once it is verified: the
//! token removed unless `forwardOriginalToken`, the payload and claims copied to
//! headers.

use http::{header::HeaderValue, request::Parts, HeaderName};

use crate::{discovery::request_auth::CompiledJwtRule, identity::jwt::Rejection};

/// Largest token accepted (Istio's and Envoy's order of size): larger ones are refused.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Header(HeaderName),
    Param(String),
    Cookie(String),
}

/// A token and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub token: String,
    pub location: Location,
}

fn strip_prefix<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The request's token, looked for in every location of `rules`: None without one.
/// More than one different token, or one over [`MAX_TOKEN_BYTES`], is refused.
pub(crate) fn find(parts: &Parts, rules: &[&CompiledJwtRule]) -> Result<Option<Found>, Rejection> {
    let mut found: Vec<Found> = Vec::new();
    let mut add = |token: &str, location: Location| -> Result<(), Rejection> {
        let token = token.trim();
        if token.is_empty() {
            return Ok(());
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::TooLarge(token.len()));
        }
        if !found.iter().any(|f| f.token == token) {
            found.push(Found {
                token: token.to_string(),
                location,
            });
        }
        Ok(())
    };
    for rule in rules {
        for h in &rule.headers {
            for value in parts.headers.get_all(&h.name) {
                if value.len() > MAX_TOKEN_BYTES + h.prefix.len() + 2 {
                    return Err(Rejection::TooLarge(value.len()));
                }
                let Ok(text) = value.to_str() else {
                    return Err(Rejection::Malformed("the token header is not text".into()));
                };
                if let Some(token) = strip_prefix(text, &h.prefix) {
                    add(token, Location::Header(h.name.clone()))?;
                }
            }
        }
        if let Some(query) = parts.uri.query() {
            for (k, v) in query_pairs(query) {
                if rule.params.iter().any(|p| p == k) {
                    add(v, Location::Param(k.to_string()))?;
                }
            }
        }
        if !rule.cookies.is_empty() {
            for value in parts.headers.get_all(http::header::COOKIE) {
                let Ok(text) = value.to_str() else { continue };
                for (k, v) in text.split(';').filter_map(|c| c.trim().split_once('=')) {
                    if rule.cookies.iter().any(|c| c == k) {
                        add(v, Location::Cookie(k.to_string()))?;
                    }
                }
            }
        }
    }
    if found.len() > 1 {
        return Err(Rejection::Multiple(found.len()));
    }
    Ok(found.pop())
}

/// Removes the token from where it was (a cookie stays: the Cookie header carries
/// others too).
pub(crate) fn remove(parts: &mut Parts, location: &Location) {
    match location {
        Location::Header(name) => {
            parts.headers.remove(name);
        }
        Location::Param(name) => {
            let Some(query) = parts.uri.query() else {
                return;
            };
            let kept: Vec<String> = query_pairs(query)
                .filter(|(k, _)| k != name)
                .map(|(k, v)| {
                    if v.is_empty() {
                        k.to_string()
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
            let path = parts.uri.path();
            let pq = if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            let mut uri = http::uri::Builder::new();
            if let Some(s) = parts.uri.scheme() {
                uri = uri.scheme(s.clone());
            }
            if let Some(a) = parts.uri.authority() {
                uri = uri.authority(a.clone());
            }
            if let Ok(u) = uri.path_and_query(pq).build() {
                parts.uri = u;
            }
        }
        Location::Cookie(_) => {}
    }
}

/// The claim at `path` (a top-level name, or a dotted path into nested objects) as a
/// header value: strings as they are, numbers and booleans as text.
fn claim_text(claims: &serde_json::Map<String, serde_json::Value>, path: &str) -> Option<String> {
    let value = claims.get(path).or_else(|| {
        let mut parts = path.split('.');
        let mut v = claims.get(parts.next()?)?;
        for p in parts {
            v = v.get(p)?;
        }
        Some(v)
    })?;
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Removes the client's own values of every header a rule of the pod's policies writes
/// (`outputPayloadToHeader`, `outputClaimToHeaders`): whatever the token's fate, those
/// headers reach policies and the application only as authentication set them.
pub(crate) fn strip_outputs(parts: &mut Parts, rules: &[&CompiledJwtRule]) {
    for rule in rules {
        if let Some(header) = &rule.output_payload_to_header {
            parts.headers.remove(header);
        }
        for (header, _) in &rule.output_claim_to_headers {
            parts.headers.remove(header);
        }
    }
}

/// Rewrites a request whose token `found` was verified by `rule`.
pub(crate) fn rewrite(
    parts: &mut Parts,
    found: &Found,
    rule: &CompiledJwtRule,
    claims: &serde_json::Map<String, serde_json::Value>,
) {
    if !rule.forward_original_token {
        remove(parts, &found.location);
    }
    if let Some(header) = &rule.output_payload_to_header {
        // The payload segment is the base64url payload already.
        let payload = found.token.split('.').nth(1).unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(payload) {
            parts.headers.insert(header.clone(), v);
        }
    }
    for (header, claim) in &rule.output_claim_to_headers {
        if let Some(v) = claim_text(claims, claim).and_then(|t| HeaderValue::from_str(&t).ok()) {
            parts.headers.insert(header.clone(), v);
        }
    }
}
