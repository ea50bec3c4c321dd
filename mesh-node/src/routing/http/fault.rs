//! Fault injection and traffic mirroring of a route rule (a VirtualService route's
//! `fault`, `mirror`, `mirrors`), compiled once and sampled per request. The proxy
//! carries them out (`proxy/http`): a delay before the request is routed, an abort
//! answered by the proxy itself, a copy of the request sent to the mirror and its
//! answer dropped.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

use crate::{
    discovery::duration::{parse_istio_duration, MAX_DURATION},
    discovery::virtual_service::{HttpFaultInjection, Percent},
    routing::resolve::Backend,
};

/// The longest delay a fault may inject: a delayed request holds a connection and
/// memory on the node proxy meanwhile.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// A share of requests, in millionths (Istio's `percentage.value`: 0 to 100, with a
/// fraction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Share(u32);

const MILLION: u32 = 1_000_000;

impl Share {
    pub const ALL: Share = Share(MILLION);
    pub const NONE: Share = Share(0);

    /// `percent` of requests (0 to 100).
    pub fn from_percent(percent: f64) -> Result<Share, String> {
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return Err(format!(
                "percentage {percent} is not between 0 and 100: write e.g. 50 or 0.1"
            ));
        }
        Ok(Share((percent * 10_000.0).round() as u32))
    }

    /// The share as a percentage, for views.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }

    /// Whether this request is one of the share (a fresh draw per call).
    pub fn sample(self) -> bool {
        match self.0 {
            0 => false,
            n if n >= MILLION => true,
            n => rand::random_range(0..MILLION) < n,
        }
    }
}

/// A rule's fault injection: a fixed delay for a share of requests, an abort with a
/// status for a share (drawn independently, as Envoy does: a request may get both,
/// the delay first).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delay {
    pub fixed: Duration,
    pub share: Share,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Abort {
    #[serde(serialize_with = "status_code")]
    pub status: StatusCode,
    pub share: Share,
}

fn status_code<S: serde::Serializer>(s: &StatusCode, out: S) -> Result<S::Ok, S::Error> {
    out.serialize_u16(s.as_u16())
}

/// What the fault does to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultDraw {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

impl Fault {
    /// Draws this request's fault.
    pub fn draw(&self) -> FaultDraw {
        FaultDraw {
            delay: self
                .delay
                .as_ref()
                .filter(|d| d.share.sample())
                .map(|d| d.fixed),
            abort: self
                .abort
                .as_ref()
                .filter(|a| a.share.sample())
                .map(|a| a.status),
        }
    }
}

/// One mirror of a rule: a share of its requests is copied to `backend`.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub backend: Backend,
    pub share: Share,
}

/// The share a `percentage` (or deprecated whole-number `percent`) gives; neither is
/// none (Istio's rule for faults).
fn share_of(
    percentage: Option<&Percent>,
    percent: Option<u32>,
    what: &str,
) -> Result<Share, String> {
    match (percentage, percent) {
        (Some(p), _) => Share::from_percent(p.value),
        (None, Some(p)) => Share::from_percent(f64::from(p)),
        (None, None) => Ok(Share::NONE),
    }
    .map_err(|e| format!("{what}: {e}"))
}

/// A VirtualService route's `fault`, compiled. Err: why the route cannot apply it (the
/// route then answers 500, as for any invalid action).
pub(crate) fn compile_fault(spec: &HttpFaultInjection) -> Result<Fault, String> {
    let delay = match &spec.delay {
        None => None,
        Some(d) => {
            let share = share_of(d.percentage.as_ref(), d.percent, "fault.delay.percentage")?;
            let fixed = match (&d.fixed_delay, &d.exponential_delay) {
                (Some(text), _) => parse_istio_duration(text)
                    .map_err(|e| format!("fault.delay.fixedDelay: {e}"))?,
                // Reported as not implemented; nothing to delay by.
                (None, Some(_)) => Duration::ZERO,
                (None, None) => {
                    return Err("fault.delay needs a fixedDelay (e.g. 5s)".into());
                }
            };
            if fixed > MAX_DELAY.min(MAX_DURATION) {
                return Err(format!(
                    "fault.delay.fixedDelay is longer than {} s: write a shorter delay",
                    MAX_DELAY.as_secs()
                ));
            }
            (!fixed.is_zero()).then_some(Delay { fixed, share })
        }
    };
    let abort = match &spec.abort {
        None => None,
        Some(a) => {
            let share = share_of(a.percentage.as_ref(), None, "fault.abort.percentage")?;
            match a.http_status {
                Some(code) => {
                    let status = u16::try_from(code)
                        .ok()
                        .filter(|c| (200..=599).contains(c))
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .ok_or_else(|| {
                            format!(
                                "fault.abort.httpStatus {code} is not an HTTP status (200 to 599)"
                            )
                        })?;
                    Some(Abort { status, share })
                }
                // grpcStatus / http2Error only: reported as not implemented.
                None if a.grpc_status.is_some() || a.http2_error.is_some() => None,
                None => return Err("fault.abort needs an httpStatus (e.g. 503)".into()),
            }
        }
    };
    Ok(Fault { delay, abort })
}

/// A mirror's share: `percentage` (absent: every request).
pub(crate) fn mirror_share(
    percentage: Option<&Percent>,
    percent: Option<u32>,
) -> Result<Share, String> {
    match (percentage, percent) {
        (None, None) => Ok(Share::ALL),
        (p, n) => share_of(p, n, "mirrorPercentage"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_percentages_and_sample_their_share() {
        assert_eq!(Share::from_percent(100.0), Ok(Share::ALL));
        assert_eq!(Share::from_percent(0.0), Ok(Share::NONE));
        assert_eq!(Share::from_percent(0.1).unwrap().percent(), 0.1);
        for bad in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            assert!(Share::from_percent(bad).is_err(), "{bad}");
        }
        assert!((0..1000).all(|_| Share::ALL.sample()));
        assert!((0..1000).all(|_| !Share::NONE.sample()));
        let half = Share::from_percent(50.0).unwrap();
        let hits = (0..100_000).filter(|_| half.sample()).count();
        assert!((48_000..=52_000).contains(&hits), "{hits}");
    }

    #[test]
    fn delays_and_aborts_are_drawn_independently() {
        let fault = Fault {
            delay: Some(Delay {
                fixed: Duration::from_millis(5),
                share: Share::ALL,
            }),
            abort: Some(Abort {
                status: StatusCode::SERVICE_UNAVAILABLE,
                share: Share::NONE,
            }),
        };
        let draw = fault.draw();
        assert_eq!(draw.delay, Some(Duration::from_millis(5)));
        assert_eq!(draw.abort, None);
        assert_eq!(Fault::default().draw(), FaultDraw::default());
    }

    fn fault(yaml: &str) -> Result<Fault, String> {
        compile_fault(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn faults_compile_as_istio_writes_them_and_bad_ones_say_why() {
        let f = fault("{delay: {fixedDelay: 1.5s, percentage: {value: 10}}, abort: {httpStatus: 503, percentage: {value: 0.1}}}").unwrap();
        assert_eq!(f.delay.as_ref().unwrap().fixed, Duration::from_millis(1500));
        assert_eq!(f.delay.as_ref().unwrap().share.percent(), 10.0);
        assert_eq!(
            f.abort.as_ref().unwrap().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(f.abort.as_ref().unwrap().share.percent(), 0.1);
        // The deprecated whole percent; no percentage at all is no request (Istio).
        let f = fault("{delay: {fixedDelay: 5s, percent: 50}}").unwrap();
        assert_eq!(f.delay.unwrap().share.percent(), 50.0);
        let f = fault("{abort: {httpStatus: 500}}").unwrap();
        assert_eq!(f.abort.unwrap().share, Share::NONE);
        for (bad, words) in [
            (
                "{abort: {httpStatus: 99, percentage: {value: 1}}}",
                "not an HTTP status",
            ),
            ("{abort: {httpStatus: 600}}", "not an HTTP status"),
            ("{abort: {percentage: {value: 1}}}", "needs an httpStatus"),
            ("{delay: {percentage: {value: 1}}}", "needs a fixedDelay"),
            ("{delay: {fixedDelay: soon}}", "fixedDelay"),
            ("{delay: {fixedDelay: 2h}}", "longer than"),
            (
                "{delay: {fixedDelay: 1s, percentage: {value: 101}}}",
                "between 0 and 100",
            ),
        ] {
            let e = fault(bad).unwrap_err();
            assert!(e.contains(words), "{bad}: {e}");
        }
        assert_eq!(mirror_share(None, None), Ok(Share::ALL));
        assert_eq!(mirror_share(None, Some(25)).unwrap().percent(), 25.0);
    }
}
