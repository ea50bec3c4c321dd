//! Durations as the Gateway API writes them (GEP-2257: `250ms`, `5s`, `1h30m`), the
//! format route timeouts use and the agent's flags share.

use std::time::Duration;

/// The longest duration [`parse_duration`] accepts: far more than any timeout or
/// certificate lifetime needs (the Gateway API's format cannot write 12 years), and
/// short enough that a deadline or expiry that far from now can always be computed.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses `250ms`, `5s`, `10m`, `1h`, and sums of them such as `1h30m` (the Gateway
/// API's duration format, GEP-2257, is this grammar), up to [`MAX_DURATION`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: write e.g. 5s, 250ms or 1h30m".into());
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{text}` has no unit: use ms, s, m or h (e.g. 5s)"))?;
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}` does not start with a whole number (e.g. 5s)"))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let part = match &after[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}`: use ms, s, m or h"
                ))
            }
        };
        total = total.saturating_add(part);
        rest = &after[unit_len..];
    }
    if total > MAX_DURATION {
        return Err(format!(
            "`{text}` is longer than 100 years: write a shorter duration"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
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
        assert!(parse_duration("s").is_err());
        // Nothing past what a deadline or a certificate's expiry can hold.
        assert!(parse_duration("99999999999999999h")
            .unwrap_err()
            .contains("longer than 100 years"));
        assert!(parse_duration("18446744073709551615s").is_err());
        assert_eq!(parse_duration("876000h"), Ok(MAX_DURATION));
        assert!(parse_duration("876000h1ms").is_err());
    }
}
