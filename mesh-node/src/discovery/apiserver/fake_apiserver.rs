//! A scripted kube-apiserver for tests: HTTP/1.1 on loopback, answering kube-rs's
//! requests with the shapes the real API server uses (API conventions): lists with
//! `metadata.resourceVersion` and `continue`, chunked watch streams of
//! `{"type": ..., "object": ...}` lines replayed from a change log (the watch cache),
//! `Status` objects for errors (404 `NotFound`, 410 `Expired` as an HTTP answer on a
//! list and as an `ERROR` watch event), and legacy discovery (`/apis`,
//! `/apis/<group>/<version>`). A test scripts it: apply and delete objects, install,
//! change and delete CRDs, close watches, forget the watch cache, stop and restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};

type Body = UnsyncBoxBody<Bytes, Infallible>;
/// (group, plural): one collection, served at every version its CRD lists.
pub(crate) type Gr = (String, String);

/// Built-in kinds: (group, version, plural, kind).
const BUILTIN: [(&str, &str, &str, &str); 4] = [
    ("", "v1", "namespaces", "Namespace"),
    ("", "v1", "pods", "Pod"),
    ("", "v1", "services", "Service"),
    ("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
];

pub(crate) fn gr(group: &str, plural: &str) -> Gr {
    (group.to_string(), plural.to_string())
}

/// What a request for a resource that is not served gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotFoundBody {
    /// `Status` `NotFound` 404, as the API server's handlers answer.
    Status,
    /// Go's plain `404 page not found`, as a bare mux answers.
    PlainText,
}

struct Crd {
    kind: String,
    versions: Vec<String>,
}

struct Watch {
    gr: Gr,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct Cluster {
    rv: u64,
    /// Watches from an older resourceVersion get 410 Gone (the watch cache's start).
    oldest_rv: u64,
    objects: BTreeMap<Gr, BTreeMap<String, Value>>,
    /// Every change (rv, collection, event type, object): what watches replay.
    log: Vec<(u64, Gr, &'static str, Value)>,
    crds: BTreeMap<Gr, Crd>,
    watches: Vec<Watch>,
    requests: Vec<String>,
    not_found: NotFoundBody,
    /// At most this many items per list page (0: as many as asked).
    page_size: usize,
    /// The next list continuation gets 410 Expired.
    expire_continue: bool,
    /// Collections whose list and watch answer 404 while discovery still lists them.
    unserved: BTreeSet<Gr>,
}

pub(crate) struct FakeApiServer {
    addr: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
    tasks: Mutex<Option<JoinSet<()>>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": {}, "code": code,
    })
}

fn respond(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    respond(code, "application/json", value.to_string())
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({ "type": kind, "object": object })))
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    url_pairs(query.unwrap_or(""))
}

fn url_pairs(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%3A", ":")))
        .collect()
}

impl Cluster {
    fn kind_of(&self, gr: &Gr, version: &str) -> Option<String> {
        if let Some((_, _, _, kind)) = BUILTIN
            .iter()
            .find(|(g, v, p, _)| (*g, *v, *p) == (&gr.0, version, &gr.1))
        {
            return Some(kind.to_string());
        }
        self.crds
            .get(gr)
            .filter(|c| c.versions.iter().any(|v| v == version))
            .map(|c| c.kind.clone())
    }

    fn api_version(group: &str, version: &str) -> String {
        if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn change(&mut self, gr: &Gr, kind: &'static str, mut object: Value) {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = object_key(&object);
        let store = self.objects.entry(gr.clone()).or_default();
        if kind == "DELETED" {
            store.remove(&key);
        } else {
            store.insert(key, object.clone());
        }
        self.log.push((rv, gr.clone(), kind, object.clone()));
        self.watches
            .retain(|w| w.gr != *gr || w.tx.send(event_line(kind, &object)).is_ok());
    }

    fn not_found(&self) -> Response<Body> {
        match self.not_found {
            NotFoundBody::Status => json_response(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ),
            NotFoundBody::PlainText => respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "404 page not found\n",
            ),
        }
    }

    /// group -> version -> [(plural, kind)] of every CRD.
    fn discovery(&self) -> BTreeMap<String, BTreeMap<String, Vec<(String, String)>>> {
        let mut out: BTreeMap<String, BTreeMap<String, Vec<(String, String)>>> = BTreeMap::new();
        for ((group, plural), crd) in &self.crds {
            for v in &crd.versions {
                out.entry(group.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push((plural.clone(), crd.kind.clone()));
            }
        }
        out
    }

    fn api_group_list(&self) -> Value {
        let mut groups: Vec<Value> = self
            .discovery()
            .into_iter()
            .map(|(group, versions)| {
                let versions: Vec<Value> = versions
                    .keys()
                    .map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v }))
                    .collect();
                json!({ "name": group, "versions": versions, "preferredVersion": versions[0] })
            })
            .collect();
        groups.push(json!({
            "name": "discovery.k8s.io",
            "versions": [{ "groupVersion": "discovery.k8s.io/v1", "version": "v1" }],
            "preferredVersion": { "groupVersion": "discovery.k8s.io/v1", "version": "v1" },
        }));
        json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
    }

    fn api_resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let discovery = self.discovery();
        let resources = discovery.get(group)?.get(version)?;
        let resources: Vec<Value> = resources
            .iter()
            .flat_map(|(plural, kind)| {
                [
                    json!({
                        "name": plural, "singularName": kind.to_lowercase(), "namespaced": true,
                        "kind": kind,
                        "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"],
                    }),
                    json!({
                        "name": format!("{plural}/status"), "singularName": "", "namespaced": true,
                        "kind": kind, "verbs": ["get", "patch", "update"],
                    }),
                ]
            })
            .collect();
        Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("{group}/{version}"), "resources": resources,
        }))
    }

    fn list(
        &mut self,
        gr: &Gr,
        version: &str,
        kind: &str,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let api_version = Cluster::api_version(&gr.0, version);
        let (list_rv, offset) = match query.get("continue") {
            Some(token) => {
                if std::mem::take(&mut self.expire_continue) {
                    return json_response(
                        StatusCode::GONE,
                        &status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result. \
                             You can start a new list without the continue parameter.",
                        ),
                    );
                }
                let (rv, offset) = token.split_once('-').unwrap_or(("0", "0"));
                (rv.parse().unwrap_or(0), offset.parse().unwrap_or(0))
            }
            None => (self.rv, 0usize),
        };
        let asked: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let limit = match self.page_size {
            0 => asked,
            n => n.min(asked),
        };
        let all: Vec<Value> = self
            .objects
            .get(gr)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default();
        let items: Vec<Value> = all
            .iter()
            .skip(offset)
            .take(limit)
            .map(|o| {
                let mut o = o.clone();
                o["apiVersion"] = json!(api_version);
                o["kind"] = json!(kind);
                o
            })
            .collect();
        let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
        if offset + items.len() < all.len() {
            metadata["continue"] = json!(format!("{list_rv}-{}", offset + items.len()));
        }
        json_response(
            StatusCode::OK,
            &json!({ "kind": format!("{kind}List"), "apiVersion": api_version, "metadata": metadata, "items": items }),
        )
    }

    fn watch(
        &mut self,
        gr: &Gr,
        version: &str,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(self.rv);
        let (tx, rx) = mpsc::unbounded_channel();
        let api_version = Cluster::api_version(&gr.0, version);
        if from < self.oldest_rv {
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", self.oldest_rv),
            );
            let _ = tx.send(event_line("ERROR", &gone));
            // The stream ends after the error, as the API server's does.
            drop(tx);
        } else {
            for (rv, g, kind, object) in &self.log {
                if *rv > from && g == gr {
                    let mut object = object.clone();
                    object["apiVersion"] = json!(api_version);
                    let _ = tx.send(event_line(kind, &object));
                }
            }
            self.watches.push(Watch { gr: gr.clone(), tx });
        }
        let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
        }));
        let mut r = Response::new(body.boxed_unsync());
        if let Ok(v) = "application/json".parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    }

    fn handle(&mut self, path: &str, query: Option<&str>) -> Response<Body> {
        self.requests.push(match query {
            Some(q) => format!("GET {path}?{q}"),
            None => format!("GET {path}"),
        });
        let q = query_map(query);
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (gr, version) = match parts.as_slice() {
            ["api"] => {
                return json_response(
                    StatusCode::OK,
                    &json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] }),
                )
            }
            ["apis"] => return json_response(StatusCode::OK, &self.api_group_list()),
            ["apis", group, version] => {
                return match self.api_resource_list(group, version) {
                    Some(list) => json_response(StatusCode::OK, &list),
                    None => self.not_found(),
                }
            }
            ["api", "v1", plural] => (gr("", plural), "v1".to_string()),
            ["apis", group, version, plural] => (gr(group, plural), version.to_string()),
            _ => return self.not_found(),
        };
        let Some(kind) = self
            .kind_of(&gr, &version)
            .filter(|_| !self.unserved.contains(&gr))
        else {
            return self.not_found();
        };
        if q.get("watch").map(String::as_str) == Some("true") {
            self.watch(&gr, &version, &q)
        } else {
            self.list(&gr, &version, &kind, &q)
        }
    }
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

async fn serve(listener: TcpListener, cluster: Arc<Mutex<Cluster>>, mut tasks: JoinSet<()>) {
    loop {
        // Finished connections are reaped so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let cluster = cluster.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let cluster = cluster.clone();
                async move {
                    let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
                    Ok::<_, Infallible>(c.handle(req.uri().path(), req.uri().query()))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl FakeApiServer {
    /// Serves built-in kinds only (no CRDs), on a free loopback port.
    pub(crate) async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let server = FakeApiServer {
            addr,
            cluster: Arc::new(Mutex::new(Cluster {
                rv: 100,
                oldest_rv: 0,
                objects: BTreeMap::new(),
                log: Vec::new(),
                crds: BTreeMap::new(),
                watches: Vec::new(),
                requests: Vec::new(),
                not_found: NotFoundBody::Status,
                page_size: 0,
                expire_continue: false,
                unserved: BTreeSet::new(),
            })),
            tasks: Mutex::new(None),
        };
        server.listen(listener);
        server
    }

    fn listen(&self, listener: TcpListener) {
        let mut set = JoinSet::new();
        let connections = JoinSet::new();
        set.spawn(serve(listener, self.cluster.clone(), connections));
        *self.tasks.lock().unwrap_or_else(|p| p.into_inner()) = Some(set);
    }

    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kube-rs client of this server.
    pub(crate) fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client")
    }

    /// Installs (or changes) a CRD: `plural` of `group` served at `versions`.
    pub(crate) fn serve_crd(&self, group: &str, plural: &str, kind: &str, versions: &[&str]) {
        let mut c = self.cluster();
        let gr = gr(group, plural);
        // Versions no longer served end their watches, as the API server does.
        c.watches.retain(|w| w.gr != gr);
        c.crds.insert(
            gr,
            Crd {
                kind: kind.into(),
                versions: versions.iter().map(|v| v.to_string()).collect(),
            },
        );
    }

    /// Deletes a CRD as the API server does: its objects are deleted (watchers see
    /// DELETED), its watches end, and it is no longer served or discovered.
    pub(crate) fn delete_crd(&self, group: &str, plural: &str) {
        let mut c = self.cluster();
        let gr = gr(group, plural);
        let objects: Vec<Value> = c
            .objects
            .get(&gr)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default();
        for o in objects {
            c.change(&gr, "DELETED", o);
        }
        c.watches.retain(|w| w.gr != gr);
        c.crds.remove(&gr);
        c.unserved.remove(&gr);
    }

    /// Lists and watches of a CRD's objects answer 404 (their watches end) while
    /// discovery still lists it: the moment a CRD is being deleted.
    pub(crate) fn stop_serving(&self, group: &str, plural: &str) {
        let mut c = self.cluster();
        let gr = gr(group, plural);
        c.watches.retain(|w| w.gr != gr);
        c.unserved.insert(gr);
    }

    /// Creates or updates an object (a JSON/YAML-shaped value with metadata).
    pub(crate) fn apply(&self, gr: &Gr, object: Value) {
        let mut c = self.cluster();
        let exists = c
            .objects
            .get(gr)
            .is_some_and(|o| o.contains_key(&object_key(&object)));
        c.change(gr, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    pub(crate) fn delete(&self, gr: &Gr, namespace: &str, name: &str) {
        let mut c = self.cluster();
        let key = format!("{namespace}/{name}");
        if let Some(o) = c.objects.get(gr).and_then(|o| o.get(&key)).cloned() {
            c.change(gr, "DELETED", o);
        }
    }

    /// Ends every open watch cleanly (as on an API server's watch timeout).
    pub(crate) fn close_watches(&self) {
        self.cluster().watches.clear();
    }

    /// Forgets the watch cache: a watch from any earlier resourceVersion gets an
    /// `ERROR` event with a 410 `Expired` Status (an API server restarted without it).
    pub(crate) fn forget_watch_cache(&self) {
        let mut c = self.cluster();
        c.oldest_rv = c.rv + 1;
        let rv = c.next_rv();
        c.log.retain(|(r, ..)| *r >= rv);
    }

    pub(crate) fn set_not_found_body(&self, body: NotFoundBody) {
        self.cluster().not_found = body;
    }

    pub(crate) fn set_page_size(&self, n: usize) {
        self.cluster().page_size = n;
    }

    /// The next request continuing a paginated list gets HTTP 410 `Expired`.
    pub(crate) fn expire_next_continue(&self) {
        self.cluster().expire_continue = true;
    }

    /// Every request so far, `GET path?query`, in order.
    pub(crate) fn requests(&self) -> Vec<String> {
        self.cluster().requests.clone()
    }

    /// Discovery paths requested so far (without repetitions).
    pub(crate) fn discovery_requests(&self) -> BTreeSet<String> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r == "GET /apis"
                    || r == "GET /api"
                    || (r.starts_with("GET /apis/")
                        && r.matches('/').count() == 3
                        && !r.contains('?'))
            })
            .collect()
    }

    /// The process stops: the port refuses connections, open ones are cut.
    pub(crate) fn stop(&self) {
        if let Some(mut set) = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Dropping the serve task drops its listener and every connection task.
            set.abort_all();
        }
        self.cluster().watches.clear();
    }

    /// The process is back on the same port, with the same objects.
    pub(crate) async fn restart(&self) {
        // The old listener may take a moment to close after the abort.
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    attempts += 1;
                    assert!(attempts < 200, "cannot rebind {}: {e}", self.addr);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        };
        self.listen(listener);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
