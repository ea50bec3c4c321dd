//! The agent's mesh configuration file (`--mesh-config`): the telemetry part of
//! Istio's MeshConfig, written as Istio users write it —
//!
//! ```yaml
//! extensionProviders:
//! - name: otel
//!   opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4317}
//! - name: otel-http
//!   opentelemetry:
//!     service: otel-collector.observability.svc.cluster.local
//!     port: 4318
//!     http: {path: /v1/traces, timeout: 5s}
//! - name: zipkin
//!   zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
//! defaultProviders:
//!   tracing: [otel]
//! defaultConfig:
//!   tracing: {sampling: 1.0}
//! ```
//!
//! An `opentelemetry` provider speaks OTLP over gRPC unless it has `http`; a `zipkin`
//! provider posts Zipkin v2 JSON to `path` (default `/api/v2/spans`). `service` is an
//! address or a name the agent's resolver knows (in the DaemonSet, the cluster's DNS:
//! Service names resolve). Fields Nodemesh does not implement are reported when the
//! agent starts, never silently ignored. The DaemonSet mounts it from the ConfigMap in
//! `deploy/mesh-config.yaml`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;
use thiserror::Error;

/// Istio's default sampling of requests without trace context: 1 %.
pub(crate) const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;
/// How long one export may take by default.
pub(crate) const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_OTLP_HTTP_PATH: &str = "/v1/traces";
const DEFAULT_ZIPKIN_PATH: &str = "/api/v2/spans";

type Unsupported = BTreeMap<String, serde_yaml::Value>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MeshConfig {
    #[serde(default)]
    extension_providers: Vec<ExtensionProvider>,
    #[serde(default)]
    default_providers: DefaultProviders,
    #[serde(default)]
    default_config: DefaultConfig,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtensionProvider {
    name: String,
    opentelemetry: Option<OpenTelemetryProvider>,
    zipkin: Option<ZipkinProvider>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenTelemetryProvider {
    service: String,
    port: u16,
    http: Option<OtlpHttp>,
    grpc: Option<OtlpGrpc>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OtlpHttp {
    path: Option<String>,
    timeout: Option<String>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OtlpGrpc {
    timeout: Option<String>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinProvider {
    service: String,
    port: u16,
    path: Option<String>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefaultProviders {
    #[serde(default)]
    tracing: Vec<String>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefaultConfig {
    tracing: Option<TracingDefaults>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TracingDefaults {
    sampling: Option<f64>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Debug, Error)]
pub enum MeshConfigError {
    #[error("reading the mesh configuration {path}: {source}; check --mesh-config")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the mesh configuration {path} is not valid YAML of MeshConfig's shape: {source}; fix the file (see deploy/mesh-config.yaml)")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("extension provider {name:?}: {why}; fix it in the mesh configuration")]
    Provider { name: String, why: String },
    #[error("defaultProviders.tracing names {name:?}, which no extensionProviders entry defines; add it or remove the name")]
    UnknownDefault { name: String },
    #[error("defaultConfig.tracing.sampling is {0}, not a percentage from 0 to 100")]
    Sampling(f64),
}

/// How a provider's spans travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// OTLP, protobuf in an HTTP/1.1 POST to `path`.
    OtlpHttp { path: String },
    /// OTLP over gRPC (HTTP/2 without TLS): `TraceService/Export`.
    OtlpGrpc,
    /// Zipkin v2 JSON in an HTTP/1.1 POST to `path`.
    Zipkin { path: String },
}

impl Protocol {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Protocol::OtlpHttp { .. } => "otlp-http",
            Protocol::OtlpGrpc => "otlp-grpc",
            Protocol::Zipkin { .. } => "zipkin",
        }
    }
}

/// A tracing provider, ready for an exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProviderSpec {
    pub name: String,
    pub protocol: Protocol,
    /// Address or host name of the collector.
    pub host: String,
    pub port: u16,
    pub timeout: Duration,
}

/// What the agent's tracing starts from.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct TracingConfig {
    pub providers: Vec<ProviderSpec>,
    /// Providers used where no Telemetry resource says otherwise.
    pub default_providers: Vec<String>,
    pub default_sampling: f64,
    /// Fields of the file that Nodemesh does not implement (reported at start).
    pub unsupported: Vec<String>,
}

fn note(unsupported: &Unsupported, at: &str, out: &mut Vec<String>) {
    out.extend(unsupported.keys().map(|k| format!("{at}{k}")));
}

/// A protobuf Duration as YAML writes it (`5s`, `0.5s`), or milliseconds (`500ms`).
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = match text.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (text.strip_suffix('s')?, 1.0),
    };
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0 && value * unit <= 3600.0)
        .then(|| Duration::from_secs_f64(value * unit))
}

fn timeout(text: Option<&String>, name: &str) -> Result<Duration, MeshConfigError> {
    match text {
        None => Ok(DEFAULT_EXPORT_TIMEOUT),
        Some(t) => {
            parse_duration(t)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| MeshConfigError::Provider {
                    name: name.into(),
                    why: format!("timeout {t:?} is not a duration such as 5s"),
                })
        }
    }
}

impl MeshConfig {
    pub(crate) fn load(path: &Path) -> Result<MeshConfig, MeshConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MeshConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        MeshConfig::parse(&text).map_err(|source| MeshConfigError::Parse {
            path: shown,
            source,
        })
    }

    pub(crate) fn parse(text: &str) -> Result<MeshConfig, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(MeshConfig::default());
        }
        serde_yaml::from_str(text)
    }

    /// Checks the file and turns it into the tracing configuration.
    pub(crate) fn tracing(&self) -> Result<TracingConfig, MeshConfigError> {
        let mut unsupported = Vec::new();
        note(&self.unsupported, "", &mut unsupported);
        let mut providers = Vec::new();
        for (i, p) in self.extension_providers.iter().enumerate() {
            let at = format!("extensionProviders[{i}].");
            note(&p.unsupported, &at, &mut unsupported);
            let bad = |why: &str| MeshConfigError::Provider {
                name: p.name.clone(),
                why: why.into(),
            };
            if p.name.is_empty() {
                return Err(bad("it has no name"));
            }
            if providers.iter().any(|q: &ProviderSpec| q.name == p.name) {
                return Err(bad("the name is used twice"));
            }
            let spec = match (&p.opentelemetry, &p.zipkin) {
                (Some(o), None) => {
                    note(
                        &o.unsupported,
                        &format!("{at}opentelemetry."),
                        &mut unsupported,
                    );
                    let (protocol, t) = match (&o.http, &o.grpc) {
                        (Some(h), _) => {
                            note(
                                &h.unsupported,
                                &format!("{at}opentelemetry.http."),
                                &mut unsupported,
                            );
                            let path = h.path.clone().unwrap_or(DEFAULT_OTLP_HTTP_PATH.into());
                            (Protocol::OtlpHttp { path }, h.timeout.as_ref())
                        }
                        (None, Some(g)) => {
                            note(
                                &g.unsupported,
                                &format!("{at}opentelemetry.grpc."),
                                &mut unsupported,
                            );
                            (Protocol::OtlpGrpc, g.timeout.as_ref())
                        }
                        (None, None) => (Protocol::OtlpGrpc, None),
                    };
                    ProviderSpec {
                        name: p.name.clone(),
                        protocol,
                        host: o.service.clone(),
                        port: o.port,
                        timeout: timeout(t, &p.name)?,
                    }
                }
                (None, Some(z)) => {
                    note(&z.unsupported, &format!("{at}zipkin."), &mut unsupported);
                    ProviderSpec {
                        name: p.name.clone(),
                        protocol: Protocol::Zipkin {
                            path: z.path.clone().unwrap_or(DEFAULT_ZIPKIN_PATH.into()),
                        },
                        host: z.service.clone(),
                        port: z.port,
                        timeout: DEFAULT_EXPORT_TIMEOUT,
                    }
                }
                (Some(_), Some(_)) => {
                    return Err(bad("it is both opentelemetry and zipkin; keep one"))
                }
                (None, None) => {
                    // Another kind of provider (envoyFileAccessLog, stackdriver, ...).
                    unsupported.push(format!("{at}(provider {:?})", p.name));
                    continue;
                }
            };
            if spec.host.is_empty() || spec.port == 0 {
                return Err(bad("service and port must both be set"));
            }
            if let Protocol::OtlpHttp { path } | Protocol::Zipkin { path } = &spec.protocol {
                if !path.starts_with('/') {
                    return Err(bad("path must start with /"));
                }
            }
            providers.push(spec);
        }
        note(
            &self.default_providers.unsupported,
            "defaultProviders.",
            &mut unsupported,
        );
        for name in &self.default_providers.tracing {
            if !providers.iter().any(|p| &p.name == name) {
                return Err(MeshConfigError::UnknownDefault { name: name.clone() });
            }
        }
        note(
            &self.default_config.unsupported,
            "defaultConfig.",
            &mut unsupported,
        );
        let mut sampling = DEFAULT_SAMPLING_PERCENT;
        if let Some(t) = &self.default_config.tracing {
            note(&t.unsupported, "defaultConfig.tracing.", &mut unsupported);
            if let Some(s) = t.sampling {
                if !(0.0..=100.0).contains(&s) {
                    return Err(MeshConfigError::Sampling(s));
                }
                sampling = s;
            }
        }
        Ok(TracingConfig {
            providers,
            default_providers: self.default_providers.tracing.clone(),
            default_sampling: sampling,
            unsupported,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(text: &str) -> Result<TracingConfig, MeshConfigError> {
        MeshConfig::parse(text).unwrap().tracing()
    }

    #[test]
    fn providers_read_as_istio_writes_them() {
        let c = tracing(
            r#"
extensionProviders:
- name: otel
  opentelemetry: {service: collector.obs.svc.cluster.local, port: 4317}
- name: otel-http
  opentelemetry:
    service: 10.0.0.9
    port: 4318
    http: {timeout: 2s}
- name: zipkin
  zipkin: {service: zipkin.istio-system, port: 9411}
defaultProviders: {tracing: [otel, zipkin]}
defaultConfig: {tracing: {sampling: 10}}
"#,
        )
        .unwrap();
        let protocols: Vec<_> = c.providers.iter().map(|p| p.protocol.clone()).collect();
        assert_eq!(
            protocols,
            vec![
                Protocol::OtlpGrpc,
                Protocol::OtlpHttp {
                    path: "/v1/traces".into()
                },
                Protocol::Zipkin {
                    path: "/api/v2/spans".into()
                }
            ]
        );
        assert_eq!(c.providers[1].timeout, Duration::from_secs(2));
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), None);
        assert_eq!(c.providers[0].timeout, DEFAULT_EXPORT_TIMEOUT);
        assert_eq!(c.default_providers, ["otel", "zipkin"]);
        assert_eq!(c.default_sampling, 10.0);
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);
    }

    #[test]
    fn an_empty_file_means_no_tracing_at_istios_default_sampling() {
        let c = tracing("").unwrap();
        assert!(c.providers.is_empty() && c.default_providers.is_empty());
        assert_eq!(c.default_sampling, DEFAULT_SAMPLING_PERCENT);
    }

    #[test]
    fn fields_not_implemented_are_reported_by_their_path() {
        let c = tracing(
            r#"
enableTracing: true
extensionProviders:
- name: otel
  opentelemetry:
    service: c
    port: 4317
    resourceDetectors: {environment: {}}
    grpc: {initialMetadata: [{name: a, value: b}]}
- name: log
  envoyFileAccessLog: {path: /dev/stdout}
defaultProviders: {metrics: [prometheus]}
defaultConfig: {tracing: {sampling: 5, zipkin: {address: x}}, holdApplicationUntilProxyStarts: true}
"#,
        )
        .unwrap();
        assert_eq!(
            c.unsupported,
            [
                "enableTracing",
                "extensionProviders[0].opentelemetry.resourceDetectors",
                "extensionProviders[0].opentelemetry.grpc.initialMetadata",
                "extensionProviders[1].envoyFileAccessLog",
                "extensionProviders[1].(provider \"log\")",
                "defaultProviders.metrics",
                "defaultConfig.holdApplicationUntilProxyStarts",
                "defaultConfig.tracing.zipkin",
            ]
        );
        assert_eq!(c.providers.len(), 1);
    }

    #[test]
    fn mistakes_are_errors_that_name_the_fix() {
        for (text, want) in [
            (
                "defaultProviders: {tracing: [nope]}",
                "no extensionProviders entry defines",
            ),
            (
                "extensionProviders: [{name: a, zipkin: {service: z, port: 1}}, {name: a, zipkin: {service: z, port: 1}}]",
                "used twice",
            ),
            (
                "extensionProviders: [{name: a, zipkin: {service: z, port: 1}, opentelemetry: {service: z, port: 1}}]",
                "keep one",
            ),
            (
                "extensionProviders: [{name: a, zipkin: {service: z, port: 1, path: v2}}]",
                "must start with /",
            ),
            (
                "extensionProviders: [{name: a, opentelemetry: {service: z, port: 1, http: {timeout: soon}}}]",
                "not a duration",
            ),
            ("defaultConfig: {tracing: {sampling: 101}}", "from 0 to 100"),
        ] {
            let e = tracing(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(MeshConfig::parse("extensionProviders: 3").is_err());
    }
}
