//! The trace's inbound verdict for one request: where the destination serves a
//! connection as HTTP (policies with HTTP attributes, or a RequestAuthentication), the
//! request the trace describes (`--method`, `--path`, `--header`, `--jwt`) is
//! authenticated and authorized exactly as the destination's agent would.

use std::net::IpAddr;

use serde::Serialize;

use crate::{
    admin::trace::Candidate, admin::trace::HttpAttributes, admin::trace::TraceInputs,
    identity::authz::authorize_request, identity::authz::Admission,
    identity::authz::ConnectionFacts, identity::authz::RequestFacts,
    identity::authz::RequestVerdict, identity::jwt::Authentication,
};

/// What the destination does with the traced request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RequestStep {
    /// The HTTP status the client would see from the mesh (401, 403), None when the
    /// request reaches the application.
    pub status: Option<u16>,
    /// `no token`, `valid: <iss>/<sub>`, or `invalid: <why>`.
    pub authentication: String,
    pub verdict: Option<RequestVerdict>,
}

/// Judges the traced request on `c` when its destination serves the connection as
/// HTTP; sets `c.allowed` to the request's fate.
pub(super) fn judge(
    inputs: &TraceInputs,
    c: &mut Candidate,
    src_ip: Option<IpAddr>,
    http: Option<&HttpAttributes>,
) {
    let (Some(Admission::Http { .. }), Some(dest)) = (&c.inbound.admission, &c.pod) else {
        return;
    };
    let Some(mut parts) = http.and_then(super::request_parts) else {
        c.inbound.note += " (pass --method/--path/--header/--jwt for the request's verdict)";
        return;
    };
    let state = inputs.state;
    let auth = match inputs.jwt.map(|j| j.authenticate(state, dest, &mut parts)) {
        Some(Authentication::Valid(auth)) => Some(auth),
        Some(Authentication::Invalid(why)) => {
            c.allowed = false;
            c.inbound.request = Some(RequestStep {
                status: Some(401),
                authentication: format!("invalid: {why}"),
                verdict: None,
            });
            return;
        }
        Some(Authentication::NoToken) | None => None,
    };
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let facts = ConnectionFacts {
        source_ip: src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        peer: c.presented_identity.as_deref().and_then(|p| p.parse().ok()),
        destination: c.endpoint,
    };
    let verdict = authorize_request(
        state,
        dest,
        &facts,
        &RequestFacts {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host: &host,
            headers: &parts.headers,
            auth: auth.as_ref(),
        },
    );
    c.allowed = verdict.allowed;
    c.inbound.request = Some(RequestStep {
        status: (!verdict.allowed).then_some(403),
        authentication: match &auth {
            Some(a) => format!("valid: {}", a.principal),
            None => "no token".into(),
        },
        verdict: Some(verdict),
    });
}
