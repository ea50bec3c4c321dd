//! Request authentication (`security.istio.io` RequestAuthentication): JSON Web Tokens
//! on requests to a local workload, checked against the issuers' keys (JWKS, inline or
//! fetched from `jwksUri`).
//!
//! `tokens.rs` finds a request's token and rewrites the request once it is verified;
//! `keys.rs` verifies it (signature by `kid`, `exp`/`nbf`, issuer, audiences), and
//! `verified.rs` keeps the tokens that held, so a token sent again is not checked again;
//! `fetcher.rs` keeps the keys of every `jwksUri` the node's workloads need (fetched
//! in the background, refreshed, the last good keys kept while a URI fails). The
//! policies themselves are compiled in `discovery::request_auth`.

use std::{sync::Arc, time::Duration};

use serde::Serialize;

use crate::{
    discovery::cluster::ClusterState, discovery::request_auth::CompiledJwtRule,
    discovery::request_auth::KeySource, keys::ObjectKey, telemetry::metrics::Metrics,
};

pub mod fetcher;
pub mod keys;
pub mod tokens;
pub mod verified;

#[cfg(test)]
mod fetcher_tests;
#[cfg(test)]
mod test_keys;
#[cfg(test)]
mod tokens_tests;
#[cfg(test)]
mod verified_tests;

/// How often a `jwksUri` is fetched again by default (Istio's 20 minutes).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);

/// What a valid token says about the request: Istio's `request.auth.*` attributes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestAuth {
    /// `request.auth.principal`: `<iss>/<sub>`.
    pub principal: String,
    /// `request.auth.audiences` (the `aud` claim, a string or a list).
    pub audiences: Vec<String>,
    /// `request.auth.presenter` (the `azp` claim).
    pub presenter: Option<String>,
    /// `request.auth.claims[...]`: the whole payload, so nested claims can be read.
    pub claims: Arc<serde_json::Map<String, serde_json::Value>>,
}

/// The outcome of authenticating one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Authentication {
    /// No RequestAuthentication selects the workload, or none of its token locations
    /// holds a token: the request goes on without `request.auth.*`.
    NoToken,
    Valid(RequestAuth),
    /// A token was present and failed (expired, wrong issuer or audience, bad
    /// signature, malformed, too large): answered 401.
    Invalid(String),
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the token is {0} bytes, over the {max}-byte limit", max = tokens::MAX_TOKEN_BYTES)]
    TooLarge(usize),
    #[error("the request carries {0} different tokens; send one")]
    Multiple(usize),
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's issuer is not accepted by any RequestAuthentication of the workload")]
    UnknownIssuer,
    #[error("keys not yet available for the issuer (its jwksUri has not been fetched yet)")]
    KeysUnavailable,
    #[error("the issuer's keys cannot be used: {0}")]
    BrokenKeys(String),
    #[error("no key of the issuer fits the token (alg {alg}, kid {kid:?})")]
    NoKey { alg: String, kid: Option<String> },
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audiences are not accepted")]
    Audience,
}

impl Rejection {
    /// The `reason` label of `nodemesh_jwt_rejected_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::TooLarge(_) => "too_large",
            Rejection::Multiple(_) => "multiple_tokens",
            Rejection::Malformed(_) => "malformed",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::KeysUnavailable => "keys_unavailable",
            Rejection::BrokenKeys(_) => "broken_keys",
            Rejection::NoKey { .. } => "no_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::Audience => "audience",
        }
    }
}

/// The node's request authenticator: the JWKS of every issuer its workloads trust.
pub struct JwtAuthenticator {
    keys: fetcher::KeyCache,
    verified: verified::VerifiedTokens,
    metrics: Option<Arc<Metrics>>,
    /// How often a `jwksUri` is fetched again.
    refresh: Duration,
}

impl Default for JwtAuthenticator {
    fn default() -> Self {
        JwtAuthenticator {
            keys: fetcher::KeyCache::default(),
            verified: verified::VerifiedTokens::default(),
            metrics: None,
            refresh: DEFAULT_JWKS_REFRESH,
        }
    }
}

fn audiences(claims: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn text_claim(claims: &serde_json::Map<String, serde_json::Value>, name: &str) -> Option<String> {
    claims
        .get(name)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

impl JwtAuthenticator {
    pub fn new() -> Arc<JwtAuthenticator> {
        Arc::new(JwtAuthenticator::default())
    }

    /// An authenticator that counts its refusals and fetches in `metrics` and fetches
    /// every `jwksUri` again each `refresh`.
    pub fn counted(metrics: Arc<Metrics>, refresh: Duration) -> Arc<JwtAuthenticator> {
        Arc::new(JwtAuthenticator {
            keys: fetcher::KeyCache::default(),
            verified: verified::VerifiedTokens::default(),
            metrics: Some(metrics),
            refresh,
        })
    }

    fn reject(&self, why: Rejection) -> Authentication {
        if let Some(m) = &self.metrics {
            m.jwt_rejected.with_label_values(&[why.as_str()]).inc();
        }
        tracing::debug!(reason = why.as_str(), detail = %why, "JWT refused");
        Authentication::Invalid(why.to_string())
    }

    /// Authenticates a request to the local pod `dest` (its headers and URI in
    /// `parts`), by the RequestAuthentication policies that select it. May rewrite
    /// `parts`: the token removed unless `forwardOriginalToken`, the payload added as
    /// `outputPayloadToHeader`.
    pub fn authenticate(
        &self,
        state: &ClusterState,
        dest: &ObjectKey,
        parts: &mut http::request::Parts,
    ) -> Authentication {
        let policies = state.request_authentications_for(dest);
        if policies.is_empty() {
            return Authentication::NoToken;
        }
        let rules: Vec<&CompiledJwtRule> = policies
            .iter()
            .flat_map(|(_, ra)| ra.rules.iter())
            .collect();
        let found = tokens::find(parts, &rules);
        // After finding the token (a location may share a name with an output header),
        // before anything reads the request: a client's own claim headers never pass.
        tokens::strip_outputs(parts, &rules);
        let found = match found {
            Ok(Some(found)) => found,
            Ok(None) => return Authentication::NoToken,
            Err(why) => return self.reject(why),
        };
        let issuer = match self.verified.issuer_of(&found.token) {
            Some(issuer) => issuer,
            None => match keys::unverified_claims(&found.token) {
                Ok(claims) => match claims.get("iss").and_then(|i| i.as_str()) {
                    Some(iss) => iss.to_string(),
                    None => return self.reject(Rejection::Malformed("no `iss` claim".into())),
                },
                Err(why) => return self.reject(why),
            },
        };
        let mut first_error = None;
        for rule in rules.iter().filter(|r| r.issuer == issuer) {
            let outcome = match &rule.keys {
                KeySource::Inline(jwks) => self.verified.verify(&found.token, rule, jwks),
                KeySource::Uri(uri) => match self.keys.get(&uri.text) {
                    Some(jwks) => self.verified.verify(&found.token, rule, &jwks),
                    None => Err(Rejection::KeysUnavailable),
                },
                KeySource::Broken(why) => Err(Rejection::BrokenKeys(why.clone())),
            };
            match outcome {
                Ok(claims) => {
                    tokens::rewrite(parts, &found, rule, &claims);
                    let sub = text_claim(&claims, "sub").unwrap_or_default();
                    return Authentication::Valid(RequestAuth {
                        principal: format!("{issuer}/{sub}"),
                        audiences: audiences(&claims),
                        presenter: text_claim(&claims, "azp"),
                        claims,
                    });
                }
                Err(why) => {
                    first_error.get_or_insert(why);
                }
            }
        }
        self.reject(first_error.unwrap_or(Rejection::UnknownIssuer))
    }

    /// The keys last fetched from `uri`, if any.
    pub fn fetched_keys(&self, uri: &str) -> Option<Arc<crate::discovery::jwks::Jwks>> {
        self.keys.get(uri)
    }

    pub fn refresh(&self) -> Duration {
        self.refresh
    }

    pub(crate) fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    pub(crate) fn key_cache(&self) -> &fetcher::KeyCache {
        &self.keys
    }

    /// Tokens kept as verified now.
    pub fn verified_tokens(&self) -> usize {
        self.verified.len()
    }
}
