//! A trace collector for the end-to-end tests: one port that takes OTLP over HTTP
//! (`POST /v1/traces`, protobuf), OTLP over gRPC (HTTP/2 without TLS,
//! `TraceService/Export`) and Zipkin v2 JSON (`POST /api/v2/spans`). OTLP is decoded
//! with OpenTelemetry's own generated message types, so what the agent encodes is
//! checked against the published protocol, not against itself. It can be told to
//! answer late (a slow collector).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::any_value::Value as OtlpValue,
};
use prost::Message;

use crate::sim::host;

/// One span as the collector received it, whatever the protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedSpan {
    /// `otlp-http`, `otlp-grpc` or `zipkin`.
    pub via: &'static str,
    pub service: String,
    pub name: String,
    /// `CLIENT` or `SERVER`.
    pub kind: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub error: bool,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<CollectedSpan>>,
    delay: Mutex<Duration>,
    requests: Mutex<u64>,
}

/// A running collector; it stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn otlp_spans(request: ExportTraceServiceRequest, via: &'static str) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                OtlpValue::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let attributes = s
                    .attributes
                    .iter()
                    .map(|kv| {
                        let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(OtlpValue::StringValue(s)) => s.clone(),
                            Some(OtlpValue::IntValue(n)) => n.to_string(),
                            Some(other) => format!("{other:?}"),
                            None => String::new(),
                        };
                        (kv.key.clone(), v)
                    })
                    .collect();
                out.push(CollectedSpan {
                    via,
                    service: service.clone(),
                    name: s.name.clone(),
                    kind: match s.kind {
                        2 => "SERVER".into(),
                        3 => "CLIENT".into(),
                        k => format!("kind {k}"),
                    },
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    attributes,
                    error: s.status.as_ref().map(|st| st.code) == Some(2),
                    start_unix_nanos: s.start_time_unix_nano,
                    end_unix_nanos: s.end_time_unix_nano,
                });
            }
        }
    }
    out
}

fn zipkin_spans(body: &[u8]) -> Result<Vec<CollectedSpan>, String> {
    let spans: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    spans
        .into_iter()
        .map(|s| {
            let text = |k: &str| s[k].as_str().map(str::to_string);
            let tags: BTreeMap<String, String> = s["tags"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("<not a string>").into()))
                        .collect()
                })
                .unwrap_or_default();
            let micros = |k: &str| s[k].as_u64().ok_or(format!("{k} is not a number"));
            let start = micros("timestamp")? * 1000;
            Ok(CollectedSpan {
                via: "zipkin",
                service: s["localEndpoint"]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                name: text("name").unwrap_or_default(),
                kind: text("kind").unwrap_or_default(),
                trace_id: text("traceId").ok_or("no traceId")?,
                span_id: text("id").ok_or("no id")?,
                parent_id: text("parentId"),
                error: tags.contains_key("error"),
                attributes: tags,
                start_unix_nanos: start,
                end_unix_nanos: start + micros("duration")? * 1000,
            })
        })
        .collect()
}

/// A body of one data frame, then trailers (a gRPC answer).
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

fn answer(status: StatusCode, body: Bytes, grpc: bool) -> Response<WithTrailers> {
    let trailers = grpc.then(|| {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t
    });
    let mut r = Response::new(WithTrailers {
        data: Some(body),
        trailers,
    });
    *r.status_mut() = status;
    if grpc {
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
    }
    r
}

async fn handle(request: Request<Incoming>, shared: Arc<Shared>) -> Response<WithTrailers> {
    let path = request.uri().path().to_string();
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string().into(), false),
    };
    *shared.requests.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    let delay = *shared.delay.lock().unwrap_or_else(|p| p.into_inner());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (spans, reply, grpc) = match path.as_str() {
        "/v1/traces" => (
            ExportTraceServiceRequest::decode(body)
                .map(|r| otlp_spans(r, "otlp-http"))
                .map_err(|e| e.to_string()),
            Bytes::from(ExportTraceServiceResponse::default().encode_to_vec()),
            false,
        ),
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export" => {
            let message = (body.len() >= 5 && body[0] == 0)
                .then(|| {
                    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                    body.slice(5..).slice(..len.min(body.len() - 5))
                })
                .ok_or_else(|| "not one uncompressed gRPC message".to_string());
            let decoded = message.and_then(|m| {
                ExportTraceServiceRequest::decode(m)
                    .map(|r| otlp_spans(r, "otlp-grpc"))
                    .map_err(|e| e.to_string())
            });
            // One empty ExportTraceServiceResponse, length-prefixed.
            (decoded, Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        }
        "/api/v2/spans" => (zipkin_spans(&body), Bytes::new(), false),
        other => (Err(format!("nothing at {other}")), Bytes::new(), false),
    };
    match spans {
        Ok(spans) => {
            shared
                .spans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(spans);
            let status = if path == "/api/v2/spans" {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            answer(status, reply, grpc)
        }
        Err(e) => answer(StatusCode::BAD_REQUEST, e.into(), false),
    }
}

impl Collector {
    /// Listens on `addr` inside the network namespace `netns` (e.g. a node's, on the
    /// fabric every agent reaches).
    pub fn start(netns: &Path, addr: SocketAddr) -> Result<Collector> {
        let listener = host::in_netns(netns, move || {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = shared.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let accept = async {
                    while let Ok((stream, _)) = listener.accept().await {
                        let shared = served.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |r| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(handle(r, shared).await) }
                            });
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Collector {
            addr,
            shared,
            stop: Some(stop),
        })
    }

    /// Every answer waits this long from now on (a slow collector).
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        *self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.shared
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn clear(&self) {
        self.shared
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Waits (at most `timeout`) until the spans received satisfy `done`; returns them
    /// either way.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
