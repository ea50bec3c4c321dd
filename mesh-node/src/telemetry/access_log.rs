//! The access log: one JSON object per line on stdout, one line per connection when it
//! closes (and per request on L7 routes). It is data for log pipelines, not
//! diagnostics, so it is independent of the log filter and the log format on stderr.

use std::io::Write;

use serde::Serialize;

/// Writes `entry` as one line. The line is built first and written with one call, so
/// lines from concurrent connections never interleave.
pub(crate) fn write(entry: &impl Serialize) {
    let mut line = match serde_json::to_vec(entry) {
        Ok(l) => l,
        Err(e) => {
            crate::warn_limited!(error = %e, "cannot encode an access log entry");
            return;
        }
    };
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
        crate::warn_limited!(error = %e, "cannot write the access log");
    }
}
