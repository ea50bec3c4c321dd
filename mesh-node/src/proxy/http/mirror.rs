//! Traffic mirroring (a VirtualService route's `mirror`/`mirrors`): a copy of a share of
//! the requests goes to the mirror's backend in the background, its answer is read and
//! dropped, and the client never waits for it. As Envoy does, the copy's authority
//! gets `-shadow` appended to its host, so the mirror can tell copies from traffic.
//!
//! Bounds: a pod has at most [`crate::limits::mirror_slots::MAX_IN_FLIGHT`] copies in
//! flight (more are dropped and counted), each copy gets at most [`MIRROR_TIMEOUT`] (or
//! the rule's shorter timeout), and only requests whose body the proxy holds whole (up
//! to the replay limit) are copied: a larger body streams to the backend and is not
//! mirrored (counted). A copy takes a request permit of the mirror backend's
//! connection pool (its DestinationRule's `connectionPool`) like any request: over
//! the mirror's limits it is dropped and counted, and the client never notices.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, request::Parts, HeaderValue, Request, Version};
use http_body_util::{BodyExt, Full};

use crate::{
    discovery::cluster::ClusterState,
    proxy::http::box_body,
    proxy::http::upstream,
    proxy::http::upstream::{peer_of, upstream_request, Protocol, SendOptions},
    proxy::http::ProxyBody,
    proxy::pod::PodContext,
    routing::balancer::Outcome,
    routing::http::fault::Mirror,
    routing::http::filters::{authority, Filters},
    routing::http::rule::Rule,
    routing::plan,
};

/// The longest a copy may take (the rule's own timeout applies when shorter).
pub(crate) const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// A mirror's answer is read (so the connection can be reused) up to this much, then
/// dropped.
const MAX_DRAIN: usize = 1024 * 1024;

/// What became of one copy (`outcome` label of `nodemesh_mirrored_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MirrorOutcome {
    /// The mirror answered (whatever the status).
    Answered,
    /// Connecting, sending or waiting failed, or the timeout passed.
    Failed,
    /// The mirror's backend has no ready endpoint.
    NoEndpoint,
    /// The request's body was too large to hold for a copy.
    BodyNotHeld,
    /// The pod already had [`crate::limits::mirror_slots::MAX_IN_FLIGHT`] copies in flight.
    Overflow,
    /// The mirror backend's connection pool was full (its DestinationRule's limits).
    PoolOverflow,
}

impl MirrorOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MirrorOutcome::Answered => "answered",
            MirrorOutcome::Failed => "failed",
            MirrorOutcome::NoEndpoint => "no_endpoint",
            MirrorOutcome::BodyNotHeld => "body_not_held",
            MirrorOutcome::Overflow => "overflow",
            MirrorOutcome::PoolOverflow => "pool_overflow",
        }
    }
}

/// `host-shadow[:port]`.
fn shadow_authority(authority: &str) -> String {
    let split = if authority.starts_with('[') {
        authority.find(']').map(|i| authority.split_at(i + 1))
    } else {
        authority
            .rsplit_once(':')
            .map(|(host, _)| authority.split_at(host.len()))
    };
    match split {
        Some((host, port)) if !host.is_empty() => format!("{host}-shadow{port}"),
        _ => format!("{authority}-shadow"),
    }
}

/// Sends the copies `rule` asks for of this request (`body`: the whole body, None when
/// the proxy streams it). Returns at once.
pub(crate) fn copy(
    ctx: &Arc<PodContext>,
    state: &Arc<ClusterState>,
    rule: &Rule,
    parts: &Parts,
    body: Option<&Bytes>,
) {
    for mirror in rule.mirrors.iter().filter(|m| m.share.sample()) {
        let count = |outcome| counted(ctx, mirror, outcome);
        let Some(body) = body else {
            count(MirrorOutcome::BodyNotHeld);
            continue;
        };
        let Some(slot) = ctx.mirrors.take() else {
            count(MirrorOutcome::Overflow);
            continue;
        };
        let Some(request) = copy_request(parts, body.clone()) else {
            count(MirrorOutcome::Failed);
            continue;
        };
        let timeout = [rule.backend_timeout, rule.request_timeout]
            .into_iter()
            .flatten()
            .fold(MIRROR_TIMEOUT, Duration::min);
        let (ctx, state, mirror) = (ctx.clone(), state.clone(), mirror.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let outcome = tokio::time::timeout(timeout, send(&ctx, &state, &mirror, request))
                .await
                .unwrap_or(MirrorOutcome::Failed);
            counted(&ctx, &mirror, outcome);
        });
    }
}

/// Counts one copy in `nodemesh_mirrored_requests_total`.
fn counted(ctx: &PodContext, mirror: &Mirror, outcome: MirrorOutcome) {
    ctx.metrics
        .mirrored_requests
        .with_label_values(&[&mirror.backend.service.service_fqdn(), outcome.as_str()])
        .inc();
}

/// The copy as the mirror receives it: the request as a backend would get it, its
/// host named `<host>-shadow` (both protocols). None when the request has no authority.
fn copy_request(parts: &Parts, body: Bytes) -> Option<(Request<ProxyBody>, Protocol)> {
    let shadow = shadow_authority(&authority(parts)?);
    let protocol = if parts.version == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let body = box_body(Full::new(body));
    let mut request = upstream_request(parts, body, protocol, &Filters::default(), &shadow).ok()?;
    if protocol == Protocol::Http1 {
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::try_from(shadow).ok()?);
    }
    Some((request, protocol))
}

async fn send(
    ctx: &PodContext,
    state: &Arc<ClusterState>,
    mirror: &Mirror,
    (request, protocol): (Request<ProxyBody>, Protocol),
) -> MirrorOutcome {
    // The mirror backend's request limits, as for any request to it (the overflow is
    // counted by the pool, for the mirror's Service).
    let pool = ctx.pools.pool(&mirror.backend);
    let _permit = match &pool {
        Some(pool) => match pool.request(protocol == Protocol::Http1).await {
            Ok(permit) => Some(permit),
            Err(_) => return MirrorOutcome::PoolOverflow,
        },
        None => None,
    };
    let table = ctx.router.table(state);
    let Some((endpoint, pick)) = plan::mirror(&table, state, &ctx.balancer, &mirror.backend) else {
        return MirrorOutcome::NoEndpoint;
    };
    let peer = peer_of(state, &endpoint);
    let sent = tokio::time::Instant::now();
    // The mirror's own connection settings apply (its DestinationRule's reuse limits,
    // and a new HTTP/2 connection takes a place under its tcp.maxConnections).
    let opts = SendOptions {
        upgrade: false,
        limits: mirror.backend.policy.connection_pool.unwrap_or_default(),
        pool,
    };
    match upstream::send(ctx, endpoint.addr, &peer, protocol, request, opts, &pick).await {
        // The stream (under maxConcurrentStreams) is held while the answer is read.
        Ok(upstream::Sent {
            response,
            stream: _stream,
        }) => {
            pick.report(Outcome::Http {
                status: response.status().as_u16(),
                latency: sent.elapsed(),
            });
            // Read the answer (bounded) so the connection goes back to the pool.
            let _ = http_body_util::Limited::new(response.into_body(), MAX_DRAIN)
                .collect()
                .await;
            MirrorOutcome::Answered
        }
        Err(_) => {
            pick.report(Outcome::ConnectFailed);
            MirrorOutcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_names_the_shadow_host() {
        assert_eq!(shadow_authority("web"), "web-shadow");
        assert_eq!(shadow_authority("web.apps:8080"), "web.apps-shadow:8080");
        assert_eq!(shadow_authority("10.0.0.1:80"), "10.0.0.1-shadow:80");
    }
}
