//! Logging what peers cause without letting them fill a disk.
//!
//! A refused handshake or connection is counted in a metric every time, but logged at
//! most [`LINES_PER_WINDOW`] times per [`WINDOW`] at each call site; the next line that
//! gets through says how many were suppressed in between. Text that comes from a peer
//! is clipped before it reaches a log line or an error answer.

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

/// Lines a call site may write per window.
pub(crate) const LINES_PER_WINDOW: u64 = 5;
/// The window those lines are counted in.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);
/// Peer-supplied text longer than this is clipped in logs and error answers.
pub(crate) const MAX_PEER_TEXT: usize = 160;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The budget of one call site (see [`warn_limited!`](crate::warn_limited)).
pub(crate) struct LogLimit {
    /// Window number (elapsed / WINDOW) and lines written in it, packed: window << 16 | lines.
    window_lines: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

impl LogLimit {
    pub(crate) const fn new() -> LogLimit {
        LogLimit {
            window_lines: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one written)` when a line may be written now.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed())
    }

    fn allow_at(&self, elapsed: Duration) -> Option<u64> {
        let window = (elapsed.as_nanos() / WINDOW.as_nanos()) as u64 + 1;
        let granted = self
            .window_lines
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
                let (w, lines) = (packed >> 16, packed & 0xffff);
                if w != window {
                    Some(window << 16 | 1)
                } else if lines < LINES_PER_WINDOW {
                    Some(packed + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if granted {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// `tracing::warn!` with a budget per call site: at most [`LINES_PER_WINDOW`] lines per
/// [`WINDOW`]; each line carries `suppressed`, the lines dropped since the last one.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::telemetry::log_limit::LogLimit = $crate::telemetry::log_limit::LogLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// Peer-supplied text made safe to log or echo: at most [`MAX_PEER_TEXT`] bytes (on a
/// character boundary), with the original length when clipped.
pub(crate) fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_PEER_TEXT {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_PEER_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_writes_a_few_lines_per_window_and_reports_the_rest() {
        let limit = LogLimit::new();
        let t0 = Duration::from_millis(10);
        let written: Vec<_> = (0..1000).filter_map(|_| limit.allow_at(t0)).collect();
        assert_eq!(written, vec![0; LINES_PER_WINDOW as usize]);
        // The next window's first line says how many were dropped.
        assert_eq!(limit.allow_at(t0 + WINDOW), Some(1000 - LINES_PER_WINDOW));
        assert_eq!(limit.allow_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn peer_text_is_clipped_on_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(10_000);
        let clipped = clip(&long);
        assert!(clipped.len() < MAX_PEER_TEXT + 40, "{}", clipped.len());
        assert!(clipped.ends_with("(20000 bytes)"), "{clipped}");
    }
}
