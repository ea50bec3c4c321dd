//! The access log: one JSON object per line on stdout, one line per connection when it
//! closes (and per request on L7 routes). It is data for log pipelines, not
//! diagnostics, so it is independent of the log filter and the log format on stderr.
//!
//! The proxy never writes stdout itself: a line is encoded where it is made and queued
//! to one writer thread, which wakes at most every [`LINGER`] and writes whatever has
//! queued up with one call. A stdout that blocks (a log pipe nobody reads) or falls
//! behind holds up no connection: once [`QUEUE_LINES`] lines wait, further lines are
//! dropped and counted in `nodemesh_access_log_dropped_total`.

use std::{
    io::Write,
    sync::{
        mpsc::{self, Receiver, SyncSender, TrySendError},
        OnceLock,
    },
    time::Duration,
};

use prometheus::IntCounter;
use serde::Serialize;

/// Lines that may wait for the writer.
pub(crate) const QUEUE_LINES: usize = 16 * 1024;
/// The writer writes at most this much with one call.
const BATCH_BYTES: usize = 64 * 1024;
/// How long the writer lets lines gather once the first one has queued: a line reaches
/// stdout at most this much later, and the writer wakes at most this often, however
/// many requests there are.
const LINGER: Duration = Duration::from_millis(50);

enum Queued {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(SyncSender<()>),
}

fn queue() -> &'static SyncSender<Queued> {
    static QUEUE: OnceLock<SyncSender<Queued>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, std::io::stdout()));
        if let Err(e) = spawned {
            // The receiver is gone with the closure: every line is dropped, counted.
            crate::warn_limited!(error = %e, "cannot start the access log's writer thread");
        }
        tx
    })
}

/// Lines dropped because the writer fell behind (registered with every [`Metrics`]).
///
/// [`Metrics`]: crate::telemetry::metrics::Metrics
pub(crate) fn dropped() -> &'static IntCounter {
    static DROPPED: OnceLock<IntCounter> = OnceLock::new();
    DROPPED.get_or_init(|| {
        IntCounter::new(
            "nodemesh_access_log_dropped_total",
            "Access log lines dropped because stdout blocked or fell behind.",
        )
        .unwrap_or_else(|e| panic!("the access log's drop counter is malformed: {e}"))
    })
}

/// Queues `entry` as one line (lines never interleave: each is encoded whole).
pub(crate) fn write(entry: &impl Serialize) {
    // Request lines run to 600-900 bytes: one allocation, not a doubling series.
    let mut line = Vec::with_capacity(1024);
    if let Err(e) = serde_json::to_writer(&mut line, entry) {
        crate::warn_limited!(error = %e, "cannot encode an access log entry");
        return;
    }
    line.push(b'\n');
    match queue().try_send(Queued::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            dropped().inc();
            crate::warn_limited!(
                queued = QUEUE_LINES,
                "the access log falls behind (stdout blocked or slow): lines are dropped"
            );
        }
        Err(TrySendError::Disconnected(_)) => {
            dropped().inc();
            crate::warn_limited!("the access log's writer is gone: lines are dropped");
        }
    }
}

/// Waits up to `timeout` until every line queued so far is written (at exit, and for
/// the admin endpoint); whether they were.
pub(crate) fn flush(timeout: Duration) -> bool {
    let (tx, rx) = mpsc::sync_channel(1);
    queue().try_send(Queued::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
}

/// The writer thread: writes what has queued, up to [`BATCH_BYTES`] at a time.
fn write_lines(rx: Receiver<Queued>, out: impl Write) {
    let mut out = out;
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut flushed = Vec::new();
    while let Ok(first) = rx.recv() {
        if matches!(first, Queued::Line(_)) {
            // Let lines gather rather than wake for each: while this thread sleeps, the
            // proxy's sends wake nobody (no futex call, no context switch per line).
            std::thread::sleep(LINGER);
        }
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Queued::Line(line) => batch.extend_from_slice(&line),
                Queued::Flush(done) => flushed.push(done),
            }
            if batch.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                crate::warn_limited!(error = %e, "cannot write the access log");
            }
            batch.clear();
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records each write call.
    #[derive(Clone, Default)]
    struct Calls(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn queued_lines_are_written_whole_in_order_and_batched() {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let calls = Calls::default();
        for n in 0..1000 {
            tx.send(Queued::Line(format!("{{\"n\":{n}}}\n").into_bytes()))
                .unwrap();
        }
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        tx.send(Queued::Flush(done_tx)).unwrap();
        let writer = {
            let calls = calls.clone();
            std::thread::spawn(move || write_lines(rx, calls))
        };
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(tx);
        writer.join().unwrap();
        let writes = calls.0.lock().unwrap().clone();
        assert!(writes.len() < 10, "one write per batch: {}", writes.len());
        let text = String::from_utf8(writes.concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        for (n, line) in lines.iter().enumerate() {
            assert_eq!(*line, format!("{{\"n\":{n}}}"));
        }
    }

    /// Requests one at a time (a line each millisecond) do not wake the writer once per
    /// line: it writes a batch per [`LINGER`], not a call per line.
    #[test]
    fn lines_that_trickle_in_are_written_a_batch_per_linger() {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let calls = Calls::default();
        let writer = {
            let calls = calls.clone();
            std::thread::spawn(move || write_lines(rx, calls))
        };
        let started = std::time::Instant::now();
        for n in 0..200 {
            tx.send(Queued::Line(format!("{{\"n\":{n}}}\n").into_bytes()))
                .unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        tx.send(Queued::Flush(done_tx)).unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let elapsed = started.elapsed();
        drop(tx);
        writer.join().unwrap();
        let writes = calls.0.lock().unwrap().clone();
        let most = elapsed.as_millis() / LINGER.as_millis() + 2;
        assert!(
            writes.len() as u128 <= most,
            "{} writes for 200 lines over {elapsed:?}: at most {most} (one per {LINGER:?})",
            writes.len()
        );
        let text = String::from_utf8(writes.concat()).unwrap();
        assert_eq!(text.lines().count(), 200);
    }
}
