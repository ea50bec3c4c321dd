//! W3C trace context: a valid `traceparent` (and its `tracestate`) passes through
//! untouched; a missing or malformed one is replaced by a new trace, so every request
//! leaving the node can be followed.

use http::{HeaderMap, HeaderValue};
use rand::RngCore;

pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The trace id of a valid `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub(crate) fn trace_id(value: &str) -> Option<&str> {
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = version.len() == 2
        && version != "ff"
        && is_lower_hex(version)
        && trace.len() == 32
        && is_lower_hex(trace)
        && trace.bytes().any(|b| b != b'0')
        && parent.len() == 16
        && is_lower_hex(parent)
        && parent.bytes().any(|b| b != b'0')
        && flags.len() == 2
        && is_lower_hex(flags)
        // Version 00 has exactly four fields; later versions may append more.
        && (version != "00" || parts.next().is_none());
    well_formed.then_some(trace)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keeps a valid `traceparent` or starts a new trace; returns the trace id.
pub(crate) fn ensure(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id)
    {
        return id.to_string();
    }
    // tracestate without a valid traceparent means nothing (W3C: drop it).
    headers.remove(TRACESTATE);
    let mut rng = rand::rng();
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    rng.fill_bytes(&mut trace);
    rng.fill_bytes(&mut span);
    trace[0] |= 1; // never all zero
    span[0] |= 1;
    let id = hex(&trace);
    let value = format!("00-{id}-{}-01", hex(&span));
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(TRACEPARENT, v);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_and_its_tracestate_pass_through() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        assert_eq!(ensure(&mut h), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h.get(TRACEPARENT).unwrap(), VALID);
        assert_eq!(h.get(TRACESTATE).unwrap(), "vendor=x");
    }

    #[test]
    fn a_missing_or_broken_traceparent_is_replaced_by_a_new_trace() {
        for broken in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("garbage"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(b) = broken {
                h.insert(TRACEPARENT, HeaderValue::from_static(b));
                h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
            }
            let id = ensure(&mut h);
            let value = h.get(TRACEPARENT).unwrap().to_str().unwrap().to_string();
            assert_eq!(trace_id(&value), Some(id.as_str()), "{value}");
            assert!(h.get(TRACESTATE).is_none());
        }
    }
}
