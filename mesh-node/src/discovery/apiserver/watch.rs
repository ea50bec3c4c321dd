//! One kind's list-and-watch loop against the API server, on kube-rs's `Client`.
//!
//! kube-runtime's watcher is not used: it reports neither a re-watch that succeeds
//! (so a silent kind looked stale until its next object event) nor the HTTP status of
//! a refused watch (a deleted CRD's 404 arrived as a body it could not decode), and
//! its backoff reaches 30 s. Here every request's answer is known, so:
//! - the API server answering a list or a watch (HTTP 2xx) makes the kind healthy;
//! - a 404 for a CRD kind sends us back to API discovery, which also picks the served
//!   version among those we read: not served at all means not installed (empty);
//! - 410 Gone (an `ERROR` watch event, or an expired list continuation) relists at
//!   once, the first time in a row;
//! - failures retry after a jittered backoff of at most [`RETRY_MAX`], so a kind is
//!   back within a few seconds of the API server answering again.

use std::{
    fmt::Debug,
    pin::Pin,
    time::{Duration, Instant},
};

use futures::{io::AsyncBufRead, AsyncBufReadExt, StreamExt};
use kube::{
    api::{ListParams, WatchParams},
    core::{ObjectList, Request, WatchEvent},
    discovery,
    error::DiscoveryError,
    runtime::watcher,
    Client, Resource,
};
use rand::Rng;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::discovery::apiserver::SourceEvent;
use crate::{discovery::cluster::Kind, discovery::cluster::KubeObject};

/// First retry delay after a failure; it doubles up to [`RETRY_MAX`] (each jittered
/// down to half, so many agents do not retry in step).
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between attempts while the API server fails: a kind recovers at
/// most this long (plus the request) after the API server answers again.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(3);
/// A CRD that is not installed is looked for again after this, doubling up to
/// [`ABSENT_MAX`].
const ABSENT_FIRST: Duration = Duration::from_secs(1);
const ABSENT_MAX: Duration = Duration::from_secs(30);
/// Server-side watch timeout; the API server ends the watch cleanly after it.
const WATCH_TIMEOUT_S: u32 = 290;
/// A watch silent for longer than the server's timeout is dead.
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_TIMEOUT_S as u64 + 5);
/// A watch that lived this long (or delivered anything) worked: the backoff restarts.
const WATCH_STABLE: Duration = Duration::from_secs(5);
const PAGE_SIZE: u32 = 500;

/// What the agent reads of one kind.
#[derive(Debug)]
pub struct KindSpec {
    pub kind: Kind,
    pub group: &'static str,
    pub plural: &'static str,
    /// Versions whose objects decode into our type, preferred first. CRD kinds watch
    /// the first one the API server serves (API discovery).
    pub versions: &'static [&'static str],
    /// Defined by a CRD: not served means not installed, which counts as empty.
    pub crd: bool,
}

impl KindSpec {
    fn path(&self, version: &str) -> String {
        if self.group.is_empty() {
            format!("/api/{version}/{}", self.plural)
        } else {
            format!("/apis/{}/{version}/{}", self.group, self.plural)
        }
    }

    /// The first version we read that `served` says the API server serves.
    pub fn choose_version(&self, served: impl Fn(&str) -> bool) -> Option<&'static str> {
        self.versions.iter().copied().find(|v| served(v))
    }
}

/// Exponential backoff with jitter.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The version of `spec` to watch, None when the API server serves none we read.
async fn served_version(
    client: &Client,
    spec: &KindSpec,
) -> Result<Option<&'static str>, kube::Error> {
    let group = match discovery::group(client, spec.group).await {
        Ok(g) => g,
        Err(kube::Error::Discovery(DiscoveryError::MissingApiGroup(_))) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(spec.choose_version(|v| {
        group
            .versioned_resources(v)
            .iter()
            .any(|(r, _)| r.plural == spec.plural)
    }))
}

/// How a watch ended.
enum WatchEnd {
    /// The stream ended (server timeout, cut connection): resume from `rv`.
    Ended { lines: bool },
    /// 410 Gone: relist.
    Gone,
    /// An `ERROR` event, or an event that does not decode: report, relist.
    Failed(String),
    /// The consumer is gone.
    Closed,
}

struct KindWatch<K> {
    client: Client,
    spec: &'static KindSpec,
    wrap: fn(K) -> KubeObject,
    tx: mpsc::Sender<(Kind, SourceEvent)>,
}

impl<K> KindWatch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    async fn send(&self, event: SourceEvent) -> bool {
        self.tx.send((self.spec.kind, event)).await.is_ok()
    }

    /// Every object (all pages) and the list's resourceVersion.
    async fn list(&self, path: &str) -> Result<(Vec<K>, String), kube::Error> {
        let mut objects = Vec::new();
        let mut params = ListParams::default().limit(PAGE_SIZE);
        loop {
            let request = Request::new(path)
                .list(&params)
                .map_err(kube::Error::BuildRequest)?;
            let page: ObjectList<K> = self.client.request(request).await?;
            objects.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => {
                    let rv = page.metadata.resource_version.unwrap_or_default();
                    return Ok((objects, rv));
                }
            }
        }
    }

    async fn open_watch(
        &self,
        path: &str,
        rv: &str,
    ) -> Result<Pin<Box<dyn AsyncBufRead + Send>>, kube::Error> {
        let params = WatchParams::default().timeout(WATCH_TIMEOUT_S);
        let request = Request::new(path)
            .watch(&params, rv)
            .map_err(kube::Error::BuildRequest)?;
        // `request_stream` checks the HTTP status: a refused watch is an API error
        // with its code, not a body to decode.
        Ok(Box::pin(self.client.request_stream(request).await?))
    }

    /// Forwards the watch's events until it ends; `rv` follows them.
    async fn consume(&self, body: Pin<Box<dyn AsyncBufRead + Send>>, rv: &mut String) -> WatchEnd {
        let mut lines = body.lines();
        let mut any = false;
        loop {
            let line = match tokio::time::timeout(WATCH_IDLE, lines.next()).await {
                Ok(Some(Ok(line))) => line,
                // A cut connection ends the watch like a clean end: the next request
                // tells whether the API server is there.
                Ok(Some(Err(e))) => {
                    debug!(kind = self.spec.kind.name(), error = %e, "watch stream cut");
                    return WatchEnd::Ended { lines: any };
                }
                Ok(None) | Err(_) => return WatchEnd::Ended { lines: any },
            };
            if line.trim().is_empty() {
                continue;
            }
            any = true;
            let event = match serde_json::from_str::<WatchEvent<K>>(&line) {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                    *rv = o.meta().resource_version.clone().unwrap_or_default();
                    watcher::Event::Apply((self.wrap)(o))
                }
                Ok(WatchEvent::Deleted(o)) => {
                    *rv = o.meta().resource_version.clone().unwrap_or_default();
                    watcher::Event::Delete((self.wrap)(o))
                }
                Ok(WatchEvent::Bookmark(b)) => {
                    *rv = b.metadata.resource_version;
                    continue;
                }
                Ok(WatchEvent::Error(status)) if status.code == 410 => return WatchEnd::Gone,
                Ok(WatchEvent::Error(status)) => {
                    return WatchEnd::Failed(format!("the watch reported: {status}"))
                }
                Err(e) => {
                    return WatchEnd::Failed(format!(
                        "cannot decode a watch event: {e}: {}",
                        crate::telemetry::log_limit::clip(&line)
                    ))
                }
            };
            if !self.send(SourceEvent::Event(event)).await {
                return WatchEnd::Closed;
            }
        }
    }

    async fn run(self) {
        let spec = self.spec;
        let mut retry = Backoff::new(RETRY_FIRST, RETRY_MAX);
        let mut absent = Backoff::new(ABSENT_FIRST, ABSENT_MAX);
        let mut version = (!spec.crd).then(|| spec.versions[0]);
        // The resourceVersion to resume watching from; None: list first.
        let mut resume: Option<String> = None;
        // A 404 sent us back to discovery; a discovery that still lists the kind then
        // is an inconsistency to wait out, not a reason to loop.
        let mut after_not_found = false;
        let mut gone_in_a_row = 0u32;
        loop {
            let Some(v) = version else {
                match served_version(&self.client, spec).await {
                    Ok(Some(v)) => {
                        absent.reset();
                        version = Some(v);
                        resume = None;
                        if after_not_found {
                            let e = format!("{} answers 404 but discovery lists it", spec.path(v));
                            if !self.send(SourceEvent::Error(e)).await {
                                return;
                            }
                            tokio::time::sleep(retry.next()).await;
                        }
                    }
                    Ok(None) => {
                        let why = format!(
                            "the API server serves no {} version we read ({})",
                            spec.kind.name(),
                            spec.versions.join(", ")
                        );
                        if !self.send(SourceEvent::NotInstalled(why)).await {
                            return;
                        }
                        after_not_found = false;
                        tokio::time::sleep(absent.next()).await;
                    }
                    Err(e) => {
                        if !self
                            .send(SourceEvent::Error(format!("API discovery: {e}")))
                            .await
                        {
                            return;
                        }
                        tokio::time::sleep(retry.next()).await;
                    }
                }
                continue;
            };
            let path = spec.path(v);
            let rv = match resume.take() {
                Some(rv) => rv,
                None => match self.list(&path).await {
                    Ok((objects, rv)) => {
                        after_not_found = false;
                        let mut events = vec![
                            SourceEvent::Answered { version: v },
                            SourceEvent::Event(watcher::Event::Init),
                        ];
                        events.extend(objects.into_iter().map(|o| {
                            SourceEvent::Event(watcher::Event::InitApply((self.wrap)(o)))
                        }));
                        events.push(SourceEvent::Event(watcher::Event::InitDone));
                        for event in events {
                            if !self.send(event).await {
                                return;
                            }
                        }
                        rv
                    }
                    Err(e) => {
                        if !self
                            .failed(
                                &e,
                                &mut version,
                                &mut after_not_found,
                                &mut gone_in_a_row,
                                &mut retry,
                            )
                            .await
                        {
                            return;
                        }
                        continue;
                    }
                },
            };
            let started = Instant::now();
            let body = match self.open_watch(&path, &rv).await {
                Ok(body) => body,
                Err(e) => {
                    resume = Some(rv);
                    if api_code(&e) == Some(410) || api_code(&e) == Some(404) {
                        resume = None;
                    }
                    if !self
                        .failed(
                            &e,
                            &mut version,
                            &mut after_not_found,
                            &mut gone_in_a_row,
                            &mut retry,
                        )
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            if !self.send(SourceEvent::Answered { version: v }).await {
                return;
            }
            let mut rv = rv;
            let end = self.consume(body, &mut rv).await;
            let worked =
                started.elapsed() >= WATCH_STABLE || matches!(end, WatchEnd::Ended { lines: true });
            if worked {
                retry.reset();
                gone_in_a_row = 0;
            }
            match end {
                WatchEnd::Closed => return,
                WatchEnd::Ended { lines } => {
                    resume = Some(rv);
                    if !lines && !worked {
                        // Ended at once with nothing: do not hammer whatever does that.
                        tokio::time::sleep(retry.next()).await;
                    }
                }
                WatchEnd::Gone => {
                    info!(
                        kind = spec.kind.name(),
                        "watch expired (410 Gone); relisting"
                    );
                    gone_in_a_row += 1;
                    if gone_in_a_row > 1 {
                        tokio::time::sleep(retry.next()).await;
                    }
                }
                WatchEnd::Failed(e) => {
                    if !self.send(SourceEvent::Error(e)).await {
                        return;
                    }
                    tokio::time::sleep(retry.next()).await;
                }
            }
        }
    }

    /// Handles a failed list or watch request; false when the consumer is gone.
    async fn failed(
        &self,
        e: &kube::Error,
        version: &mut Option<&'static str>,
        after_not_found: &mut bool,
        gone_in_a_row: &mut u32,
        retry: &mut Backoff,
    ) -> bool {
        match api_code(e) {
            // The CRD (or the version we watch) may be gone: ask discovery at once.
            Some(404) if self.spec.crd => {
                debug!(kind = self.spec.kind.name(), error = %e, "404: checking API discovery");
                *version = None;
                *after_not_found = true;
                true
            }
            // An expired list continuation (or watch): relist from the start.
            Some(410) => {
                info!(
                    kind = self.spec.kind.name(),
                    "list expired (410 Gone); relisting"
                );
                *gone_in_a_row += 1;
                if *gone_in_a_row > 1 {
                    tokio::time::sleep(retry.next()).await;
                }
                true
            }
            _ => {
                if !self.send(SourceEvent::Error(e.to_string())).await {
                    return false;
                }
                tokio::time::sleep(retry.next()).await;
                true
            }
        }
    }
}

/// Lists and watches one kind for as long as the receiver of `tx` lives.
pub(crate) async fn watch_kind<K>(
    client: Client,
    spec: &'static KindSpec,
    wrap: fn(K) -> KubeObject,
    tx: mpsc::Sender<(Kind, SourceEvent)>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    KindWatch {
        client,
        spec,
        wrap,
        tx,
    }
    .run()
    .await;
}
