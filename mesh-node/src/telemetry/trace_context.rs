//! W3C trace context (`traceparent`, `tracestate`) and the proxy's part in a trace.
//!
//! With tracing off for a pod, a valid `traceparent` (and its `tracestate`) passes
//! through untouched and a missing or malformed one is replaced by a new trace, so
//! every request leaving the node can be followed in the access log.
//!
//! With tracing on, the proxy takes part: it makes a span id of its own and sends it
//! as the parent the next hop sees, keeping the trace id and `tracestate`. An incoming
//! sampled flag is honoured either way (set: a span is recorded; clear: none is); a
//! request without trace context is sampled at the configured percentage.

use std::fmt;

use http::{HeaderMap, HeaderValue};
use rand::{Rng, RngCore};

pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";

/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// A 16-byte trace id (never all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TraceId(pub [u8; 16]);

/// An 8-byte span id (never all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SpanId(pub [u8; 8]);

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl TraceId {
    fn random() -> TraceId {
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        id[0] |= 1; // never all zero
        TraceId(id)
    }
}

impl SpanId {
    pub(crate) fn random() -> SpanId {
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        id[0] |= 1;
        SpanId(id)
    }
}

/// Lower-case hex of exactly `N` bytes.
fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// An id: lower-case hex of exactly `N` bytes, not all zero.
fn parse_id<const N: usize>(text: &str) -> Option<[u8; N]> {
    decode_hex(text).filter(|id: &[u8; N]| id.iter().any(|b| *b != 0))
}

/// A valid `traceparent`: `<version>-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub flags: u8,
}

impl TraceParent {
    pub(crate) fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let [version] = decode_hex::<1>(version)?;
        let [flags] = decode_hex::<1>(flags)?;
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            // ff is invalid; version 00 has exactly four fields (later ones may add).
            return None;
        }
        Some(TraceParent {
            trace_id: TraceId(parse_id(trace)?),
            parent_id: SpanId(parse_id(parent)?),
            flags,
        })
    }

    pub(crate) fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The header value, in version 00 (what a participant that changes it writes).
    fn header_value(&self) -> Option<HeaderValue> {
        let text = format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags);
        HeaderValue::try_from(text).ok()
    }
}

/// The trace id of a valid `traceparent`.
#[cfg(test)]
pub(crate) fn trace_id(value: &str) -> Option<String> {
    TraceParent::parse(value).map(|t| t.trace_id.to_string())
}

/// Whether the proxy takes part in the traces of a pod's requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sampling {
    /// Tracing is off for the pod: trace context passes through (or is started).
    Off,
    /// Tracing is on: requests without trace context are sampled at this percentage
    /// (0 to 100); an incoming sampled flag decides for the others.
    Percent(f64),
}

/// The proxy's place in one request's trace.
#[derive(Debug, Clone)]
pub(crate) struct RequestTrace {
    pub trace_id: TraceId,
    /// The span the request came from; none when the proxy began the trace.
    pub parent: Option<SpanId>,
    /// The proxy's own span: the parent the next hop sees, when tracing is on.
    pub span: SpanId,
    /// Whether the proxy records its span (tracing on and the trace sampled).
    pub recorded: bool,
    /// The `tracestate` that came with the request, when it is kept.
    pub tracestate: Option<String>,
}

/// Reads the request's trace context, decides whether the proxy records a span, and
/// writes the `traceparent` the next hop sees.
pub(crate) fn begin(headers: &mut HeaderMap, sampling: Sampling) -> RequestTrace {
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let tracestate = || {
        headers
            .get(TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    match (incoming, sampling) {
        (Some(given), Sampling::Off) => RequestTrace {
            trace_id: given.trace_id,
            parent: Some(given.parent_id),
            span: given.parent_id,
            recorded: false,
            tracestate: tracestate(),
        },
        (Some(given), Sampling::Percent(_)) => {
            let ours = TraceParent {
                parent_id: SpanId::random(),
                ..given
            };
            let trace = RequestTrace {
                trace_id: given.trace_id,
                parent: Some(given.parent_id),
                span: ours.parent_id,
                recorded: given.sampled(),
                tracestate: tracestate(),
            };
            set(headers, &ours);
            trace
        }
        (None, sampling) => {
            // tracestate without a valid traceparent means nothing (W3C: drop it).
            headers.remove(TRACESTATE);
            let recorded = match sampling {
                Sampling::Off => false,
                Sampling::Percent(p) => rand::rng().random::<f64>() * 100.0 < p,
            };
            let ours = TraceParent {
                trace_id: TraceId::random(),
                parent_id: SpanId::random(),
                // Off: marked sampled, as before tracing existed, so an application
                // that traces on its own keeps following the request.
                flags: if recorded || sampling == Sampling::Off {
                    SAMPLED
                } else {
                    0
                },
            };
            set(headers, &ours);
            RequestTrace {
                trace_id: ours.trace_id,
                parent: None,
                span: ours.parent_id,
                recorded,
                tracestate: None,
            }
        }
    }
}

fn set(headers: &mut HeaderMap, parent: &TraceParent) {
    if let Some(v) = parent.header_value() {
        headers.insert(TRACEPARENT, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    fn with(traceparent: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(traceparent).unwrap());
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        h
    }

    fn sent(h: &HeaderMap) -> TraceParent {
        TraceParent::parse(h.get(TRACEPARENT).unwrap().to_str().unwrap()).unwrap()
    }

    #[test]
    fn tracing_off_lets_a_valid_traceparent_and_its_tracestate_pass_through() {
        let mut h = with(VALID);
        let t = begin(&mut h, Sampling::Off);
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!t.recorded);
        assert_eq!(h.get(TRACEPARENT).unwrap(), VALID);
        assert_eq!(h.get(TRACESTATE).unwrap(), "vendor=x");
    }

    #[test]
    fn a_missing_or_broken_traceparent_is_replaced_by_a_new_trace() {
        for broken in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            Some("garbage"),
        ] {
            for sampling in [Sampling::Off, Sampling::Percent(100.0)] {
                let mut h = match broken {
                    Some(b) => with(b),
                    None => HeaderMap::new(),
                };
                let t = begin(&mut h, sampling);
                let value = h.get(TRACEPARENT).unwrap().to_str().unwrap().to_string();
                assert_eq!(trace_id(&value), Some(t.trace_id.to_string()), "{value}");
                assert!(value.ends_with("-01"), "{value}");
                assert!(h.get(TRACESTATE).is_none());
                assert_eq!(t.parent, None);
                assert_eq!(t.recorded, sampling != Sampling::Off);
            }
        }
    }

    #[test]
    fn a_later_version_with_more_fields_is_read() {
        let t = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz");
        assert_eq!(t.map(|t| t.sampled()), Some(true));
    }

    #[test]
    fn tracing_on_keeps_the_trace_and_sends_its_own_span_as_the_parent() {
        let mut h = with(VALID);
        let t = begin(&mut h, Sampling::Percent(0.0));
        let out = sent(&h);
        assert_eq!(out.trace_id, t.trace_id);
        assert_eq!(
            t.parent.map(|p| p.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(out.parent_id, t.span);
        assert_ne!(t.span, t.parent.unwrap());
        assert!(t.recorded, "an incoming sampled flag is honoured at 0 %");
        assert_eq!(t.tracestate.as_deref(), Some("vendor=x"));
        assert_eq!(h.get(TRACESTATE).unwrap(), "vendor=x");
    }

    #[test]
    fn an_incoming_clear_sampled_flag_is_honoured_at_100_percent() {
        let mut h = with(UNSAMPLED);
        let t = begin(&mut h, Sampling::Percent(100.0));
        assert!(!t.recorded);
        assert!(!sent(&h).sampled());
    }

    #[test]
    fn new_traces_are_sampled_at_the_configured_percentage() {
        let recorded = (0..10_000)
            .filter(|_| begin(&mut HeaderMap::new(), Sampling::Percent(10.0)).recorded)
            .count();
        assert!((800..=1200).contains(&recorded), "{recorded} of 10,000");
        let mut h = HeaderMap::new();
        let t = begin(&mut h, Sampling::Percent(0.0));
        assert!(!t.recorded);
        assert!(
            !sent(&h).sampled(),
            "the next hop learns the trace is not sampled"
        );
    }
}
