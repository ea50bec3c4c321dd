//! Durations as the cluster's objects and the agent's flags write them. One scanner,
//! two grammars:
//! - the Gateway API's (GEP-2257: `250ms`, `5s`, `1h30m`; whole numbers of h, m, s,
//!   ms), which HTTPRoute timeouts and the agent's flags use;
//! - Istio's (Go's `time.ParseDuration`, as Istio's CRDs validate them: `1.5s`,
//!   `300ms`, `1m30s`, and us/µs/ns too), which VirtualService and DestinationRule use.
//!
//! What a zero or a tiny value means is the caller's rule (a timeout of `0s` is none:
//! [`optional_timeout`]; DestinationRule wants at least 1ms).

use std::time::Duration;

/// The longest duration either grammar accepts: far more than any timeout or
/// certificate lifetime needs (the Gateway API's format cannot write 12 years), and
/// short enough that a deadline or expiry that far from now can always be computed.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Which spelling of durations an object uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grammar {
    /// GEP-2257: whole numbers of h, m, s, ms, and sums of them.
    GatewayApi,
    /// Go's `time.ParseDuration` without a sign: fractions, and units h, m, s, ms,
    /// us (µs), ns.
    Istio,
}

impl Grammar {
    fn example(self) -> &'static str {
        match self {
            Grammar::GatewayApi => "5s, 250ms or 1h30m",
            Grammar::Istio => "5s, 1.5s or 250ms",
        }
    }

    fn units(self) -> &'static str {
        match self {
            Grammar::GatewayApi => "ms, s, m or h",
            Grammar::Istio => "h, m, s, ms, us or ns",
        }
    }

    /// Nanoseconds in one `unit`, if this grammar has it.
    fn unit(self, unit: &str) -> Option<u128> {
        let nanos = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" if self == Grammar::Istio => 1_000,
            "ns" if self == Grammar::Istio => 1,
            _ => return None,
        };
        Some(nanos)
    }
}

/// Parses a Gateway API duration (GEP-2257), up to [`MAX_DURATION`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    parse(text, Grammar::GatewayApi)
}

/// Parses an Istio duration (Go's grammar), up to [`MAX_DURATION`].
pub(crate) fn parse_istio_duration(text: &str) -> Result<Duration, String> {
    parse(text, Grammar::Istio)
}

/// A timeout field: absent or `0s` is no timeout. Errors name the field (`what`).
pub(crate) fn optional_timeout(
    text: Option<&str>,
    grammar: Grammar,
    what: &str,
) -> Result<Option<Duration>, String> {
    match text {
        None => Ok(None),
        Some(t) => {
            let d = parse(t, grammar).map_err(|e| format!("{what}: {e}"))?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

/// Parses `text` in `grammar`: one or more `<number><unit>` parts, summed.
pub(crate) fn parse(text: &str, grammar: Grammar) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration: write e.g. {}", grammar.example()));
    }
    let max = MAX_DURATION.as_nanos();
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` has no unit: use {} (e.g. 5s)", grammar.units()))?;
        let number = &rest[..number_len];
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty()
            || number.matches('.').count() > 1
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(format!(
                "`{text}` does not start with a number (e.g. {})",
                grammar.example()
            ));
        }
        if number.contains('.') && grammar == Grammar::GatewayApi {
            return Err(format!(
                "`{text}` has a fraction: write whole numbers of a smaller unit (e.g. 1500ms)"
            ));
        }
        let after = &rest[number_len..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let scale = grammar
            .unit(unit)
            .ok_or_else(|| format!("unknown unit `{unit}` in `{text}`: use {}", grammar.units()))?;
        let too_long = || {
            format!(
                "`{text}` is longer than {} days: write a shorter duration",
                MAX_DURATION.as_secs() / 86400
            )
        };
        // Whole part: anything past the maximum is refused, not wrapped.
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse::<u128>().map_err(|_| too_long())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(too_long)?;
        // Fraction: digits past nanosecond precision do not matter.
        let mut divisor: u128 = 1;
        let mut numerator: u128 = 0;
        for digit in fraction.bytes().take(18) {
            numerator = numerator * 10 + u128::from(digit - b'0');
            divisor *= 10;
        }
        part += numerator * scale / divisor;
        total = total.saturating_add(part);
        if total > max {
            return Err(too_long());
        }
        rest = &after[unit_len..];
    }
    let secs = (total / 1_000_000_000) as u64;
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_api_durations_are_whole_numbers_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("5us").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("1.5s").unwrap_err().contains("fraction"));
        assert!(parse_duration("s").is_err());
        // Nothing past what a deadline or a certificate's expiry can hold.
        assert!(parse_duration("99999999999999999h")
            .unwrap_err()
            .contains("longer than"));
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("999999999999999999999999999999999999999999s").is_err());
        assert_eq!(parse_duration("876000h"), Ok(MAX_DURATION));
        assert!(parse_duration("876000h1ms").is_err());
    }

    #[test]
    fn istio_durations_take_fractions_and_small_units_and_are_bounded() {
        let ms = Duration::from_millis;
        assert_eq!(parse_istio_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_istio_duration("10s"), Ok(ms(10_000)));
        assert_eq!(parse_istio_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_istio_duration("2h"), Ok(ms(7_200_000)));
        assert_eq!(parse_istio_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_istio_duration("0.25s"), Ok(ms(250)));
        assert_eq!(parse_istio_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_istio_duration("1.5m"), Ok(ms(90_000)));
        assert_eq!(
            parse_istio_duration("1.000000001s"),
            Ok(Duration::new(1, 1))
        );
        assert_eq!(
            parse_istio_duration("250us"),
            Ok(Duration::from_micros(250))
        );
        assert_eq!(parse_istio_duration("3µs"), Ok(Duration::from_micros(3)));
        assert_eq!(parse_istio_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_istio_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "10",
            "soon",
            "ten seconds",
            "1.2.3s",
            ".s",
            "-1.5s",
            "5d",
            "999999999999h",
            "1e3s",
        ] {
            assert!(parse_istio_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_zero_timeout_is_no_timeout_and_errors_name_the_field() {
        let t = |s| optional_timeout(s, Grammar::Istio, "timeout");
        assert_eq!(t(None), Ok(None));
        assert_eq!(t(Some("0s")), Ok(None));
        assert_eq!(t(Some("1.5s")), Ok(Some(Duration::from_millis(1500))));
        assert!(t(Some("later")).unwrap_err().starts_with("timeout: "));
    }
}
