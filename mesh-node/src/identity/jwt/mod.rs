//! Request authentication (`security.istio.io` RequestAuthentication): JSON Web Tokens
//! on requests to a local workload, checked against the issuers' keys (JWKS, inline or
//! fetched from `jwksUri`).
//!
//! Interface only at this commit: every request is "no token". The JWT work fills it in
//! behind the same types.

use std::sync::Arc;

use serde::Serialize;

use crate::{discovery::cluster::ClusterState, keys::ObjectKey};

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
    pub claims: serde_json::Map<String, serde_json::Value>,
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

/// The node's request authenticator: the JWKS of every issuer its workloads trust.
#[derive(Default)]
pub struct JwtAuthenticator {}

impl JwtAuthenticator {
    pub fn new() -> Arc<JwtAuthenticator> {
        Arc::new(JwtAuthenticator::default())
    }

    /// Authenticates a request to the local pod `dest` (its headers and URI in
    /// `parts`), by the RequestAuthentication policies that select it. May rewrite
    /// `parts`: the token removed unless `forwardOriginalToken`, the payload added as
    /// `outputPayloadToHeader`.
    pub fn authenticate(
        &self,
        _state: &ClusterState,
        _dest: &ObjectKey,
        _parts: &mut http::request::Parts,
    ) -> Authentication {
        Authentication::NoToken
    }

    /// Whether any RequestAuthentication selects `dest` (so its inbound traffic must be
    /// served as HTTP).
    pub fn selects(&self, _state: &ClusterState, _dest: &ObjectKey) -> bool {
        false
    }
}
