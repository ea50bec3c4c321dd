//! The node-wide drain, started once when the agent is told to stop (SIGTERM, SIGINT)
//! or has handed the node over: the in-pod listeners stop accepting, HTTP connections
//! the agent serves are told to close after the requests in flight (`limits::served`;
//! GOAWAY on HBONE), and what is established runs on until it ends or the agent's
//! `--drain-timeout` cuts it.

use std::sync::Arc;

use tokio::sync::watch;

/// A handle on the drain; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Drain {
        Drain(Arc::new(watch::channel(false).0))
    }
}

impl Drain {
    /// Starts the drain (again: no effect).
    pub(crate) fn start(&self) {
        self.0.send_replace(true);
    }

    pub(crate) fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain has started (at once if it has).
    pub(crate) async fn started(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Drain;

    #[tokio::test]
    async fn every_clone_sees_the_drain_start_once() {
        let drain = Drain::default();
        let other = drain.clone();
        assert!(!other.is_draining());
        let waiting = tokio::spawn(async move { other.started().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "resolved before the drain started");
        drain.start();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a waiter never saw the drain")
            .expect("the waiter panicked");
        drain.start();
        assert!(drain.is_draining());
        // Started already: resolves at once.
        tokio::time::timeout(Duration::from_millis(100), drain.started())
            .await
            .expect("started() waits after the drain began");
    }
}
