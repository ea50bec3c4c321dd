//! RequestAuthentication (`discovery::request_authentication`) checked and indexed: each
//! policy's `jwtRules` compiled (inline JWKS read, `jwksUri` parsed, token locations and
//! output headers validated) and which policies select a pod, as in Istio: a selector
//! picks pods of the policy's namespace; no selector, the whole namespace; in the root
//! namespace, the whole mesh (a selector there picks matching pods of every namespace);
//! `targetRef(s)` the pods of the named Services (with a selector too, reported: the pods
//! of both, as for AuthorizationPolicy). Every policy selecting a pod applies: their
//! rules are merged.
//!
//! Fail closed: a rule whose keys cannot be read (a bad inline JWKS, a bad `jwksUri`)
//! stays, with its keys marked broken, so that tokens of its issuer are refused rather
//! than passed unchecked; the problem is reported under the policy's name.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use http::HeaderName;

use crate::{
    discovery::jwks, discovery::jwks::Jwks, discovery::mtls::RootNamespace,
    discovery::policy_target, discovery::problem::Problem, discovery::problem::ProblemReason,
    discovery::request_authentication::RequestAuthentication, keys::ObjectKey, keys::PodKey,
};

/// Time allowed to fetch a `jwksUri` when the rule sets no `timeout` (Istio's default).
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `timeout` a rule may set (larger ones are capped).
pub const MAX_JWKS_TIMEOUT: Duration = Duration::from_secs(30);

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Http,
    Https,
}

/// A `jwksUri`, parsed: where the agent fetches an issuer's keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JwksUri {
    /// As written (the cache key).
    pub text: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
}

impl JwksUri {
    pub fn parse(text: &str) -> Result<JwksUri, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("`{text}` is not a URI: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(format!("`{text}` is not an http:// or https:// URI")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{text}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        Ok(JwksUri {
            text: text.to_string(),
            scheme,
            host,
            port,
            path,
        })
    }
}

/// Where a rule's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `jwks`, read when the policy was compiled.
    Inline(Arc<Jwks>),
    /// `jwksUri`, fetched by the agent.
    Uri(JwksUri),
    /// The keys cannot be had (why): tokens of the issuer are refused.
    Broken(String),
}

/// A header that carries the token, and the text before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderLocation {
    pub name: HeaderName,
    pub prefix: String,
}

/// One `jwtRules` entry, checked.
#[derive(Debug, Clone)]
pub struct CompiledJwtRule {
    pub issuer: String,
    /// Empty: any audience.
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// Where the token is looked for (Istio's defaults when none is written:
    /// `Authorization: Bearer ` and the `access_token` parameter).
    pub headers: Vec<HeaderLocation>,
    pub params: Vec<String>,
    pub cookies: Vec<String>,
    pub output_payload_to_header: Option<HeaderName>,
    pub forward_original_token: bool,
    pub output_claim_to_headers: Vec<(HeaderName, String)>,
    /// Time allowed to fetch `jwksUri`.
    pub timeout: Duration,
}

/// Which pods a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every pod of the policy's namespace (of the mesh, in the root namespace).
    Namespace,
    /// Pods with these labels (of every namespace, in the root namespace).
    Labels(BTreeMap<String, String>),
    /// The pods these Services select.
    Services(Vec<ObjectKey>),
}

/// One RequestAuthentication checked.
#[derive(Debug, Clone)]
pub struct CompiledRequestAuth {
    /// It applies to the pods any of these select (two only when `selector` and
    /// `targetRefs` are both written: reported, the pods of both); none: no pod.
    pub selection: Vec<Selection>,
    pub rules: Vec<CompiledJwtRule>,
    pub problems: Vec<Problem>,
}

fn problem(field: String, reason: ProblemReason, detail: String) -> Problem {
    Problem {
        field,
        reason,
        detail,
    }
}

fn header_name(text: &str, field: &str, problems: &mut Vec<Problem>) -> Option<HeaderName> {
    match HeaderName::from_bytes(text.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            problems.push(problem(
                field.into(),
                ProblemReason::BadValue,
                format!("`{text}` is not a header name: it is left out"),
            ));
            None
        }
    }
}

/// Checks one RequestAuthentication.
pub fn compile(key: &ObjectKey, ra: &RequestAuthentication) -> CompiledRequestAuth {
    let spec = &ra.spec;
    let mut problems = Vec::new();
    let scope = policy_target::scope(
        key,
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        &mut problems,
    );
    let selection = match (scope.labels, scope.services) {
        (None, None) => vec![Selection::Namespace],
        (labels, services) => labels
            .map(Selection::Labels)
            .into_iter()
            .chain(services.map(Selection::Services))
            .collect(),
    };
    let rules = spec
        .jwt_rules
        .iter()
        .enumerate()
        .map(|(i, r)| compile_rule(i, r, &mut problems))
        .collect();
    CompiledRequestAuth {
        selection,
        rules,
        problems,
    }
}

fn compile_rule(
    i: usize,
    rule: &crate::discovery::request_authentication::JwtRule,
    problems: &mut Vec<Problem>,
) -> CompiledJwtRule {
    let at = |f: &str| format!("jwtRules[{i}].{f}");
    if rule.issuer.is_empty() {
        problems.push(problem(
            at("issuer"),
            ProblemReason::BadValue,
            "a rule needs an issuer: no token can match this rule; set `issuer`".into(),
        ));
    }
    let keys = match (&rule.jwks, &rule.jwks_uri) {
        (Some(inline), _) => match jwks::parse(inline) {
            Ok(k) => KeySource::Inline(Arc::new(k)),
            Err(e) => {
                problems.push(problem(
                    at("jwks"),
                    ProblemReason::BadValue,
                    format!(
                        "{e}: tokens of issuer `{}` are refused (401) until it is fixed",
                        rule.issuer
                    ),
                ));
                KeySource::Broken(format!("the inline JWKS is broken: {e}"))
            }
        },
        (None, Some(uri)) => match JwksUri::parse(uri) {
            Ok(u) => KeySource::Uri(u),
            Err(e) => {
                problems.push(problem(
                    at("jwksUri"),
                    ProblemReason::BadValue,
                    format!(
                        "{e}: tokens of issuer `{}` are refused (401) until it is fixed",
                        rule.issuer
                    ),
                ));
                KeySource::Broken(format!("jwksUri is broken: {e}"))
            }
        },
        (None, None) => {
            problems.push(problem(
                at("jwksUri"),
                ProblemReason::BadValue,
                format!("neither `jwks` nor `jwksUri` is set (Nodemesh does not discover keys through OpenID configuration): tokens of issuer `{}` are refused (401); set one", rule.issuer),
            ));
            KeySource::Broken("the rule has neither jwks nor jwksUri".into())
        }
    };
    let mut headers: Vec<HeaderLocation> = rule
        .from_headers
        .iter()
        .enumerate()
        .filter_map(|(j, h)| {
            let name = header_name(&h.name, &at(&format!("fromHeaders[{j}].name")), problems)?;
            Some(HeaderLocation {
                name,
                prefix: h.prefix.clone().unwrap_or_default(),
            })
        })
        .collect();
    let mut params: Vec<String> = rule
        .from_params
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    let cookies: Vec<String> = rule
        .from_cookies
        .iter()
        .filter(|c| !c.is_empty())
        .cloned()
        .collect();
    if rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty() {
        headers.push(HeaderLocation {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        });
        params.push("access_token".into());
    }
    let output_payload_to_header = rule
        .output_payload_to_header
        .as_deref()
        .and_then(|h| header_name(h, &at("outputPayloadToHeader"), problems));
    let output_claim_to_headers = rule
        .output_claim_to_headers
        .iter()
        .enumerate()
        .filter_map(|(j, c)| {
            let name = header_name(
                &c.header,
                &at(&format!("outputClaimToHeaders[{j}].header")),
                problems,
            )?;
            Some((name, c.claim.clone()))
        })
        .collect();
    let timeout = match rule.timeout.as_deref() {
        None => DEFAULT_JWKS_TIMEOUT,
        Some(t) => match crate::discovery::duration::parse_istio_duration(t) {
            Ok(d) if d.is_zero() => DEFAULT_JWKS_TIMEOUT,
            Ok(d) if d > MAX_JWKS_TIMEOUT => {
                problems.push(problem(
                    at("timeout"),
                    ProblemReason::Capped,
                    format!("`{t}` is over {}s: capped", MAX_JWKS_TIMEOUT.as_secs()),
                ));
                MAX_JWKS_TIMEOUT
            }
            Ok(d) => d,
            Err(e) => {
                problems.push(problem(
                    at("timeout"),
                    ProblemReason::BadDuration,
                    format!(
                        "{e}: the default {}s is used",
                        DEFAULT_JWKS_TIMEOUT.as_secs()
                    ),
                ));
                DEFAULT_JWKS_TIMEOUT
            }
        },
    };
    CompiledJwtRule {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        keys,
        headers,
        params,
        cookies,
        output_payload_to_header,
        forward_original_token: rule.forward_original_token.unwrap_or(false),
        output_claim_to_headers,
        timeout,
    }
}

/// Every RequestAuthentication checked, by namespace.
#[derive(Debug, Clone, Default)]
pub struct RequestAuthIndex {
    root: RootNamespace,
    pub compiled: BTreeMap<ObjectKey, Arc<CompiledRequestAuth>>,
    by_namespace: HashMap<String, Vec<ObjectKey>>,
}

impl RequestAuthIndex {
    pub fn build(
        root: &RootNamespace,
        policies: &BTreeMap<ObjectKey, Arc<RequestAuthentication>>,
    ) -> RequestAuthIndex {
        let compiled: BTreeMap<ObjectKey, Arc<CompiledRequestAuth>> = policies
            .iter()
            .map(|(k, ra)| (k.clone(), Arc::new(compile(k, ra))))
            .collect();
        let mut by_namespace: HashMap<String, Vec<ObjectKey>> = HashMap::new();
        for key in compiled.keys() {
            by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(key.clone());
        }
        RequestAuthIndex {
            root: root.clone(),
            compiled,
            by_namespace,
        }
    }

    pub fn root(&self) -> &RootNamespace {
        &self.root
    }

    pub fn is_empty(&self) -> bool {
        self.compiled.is_empty()
    }

    /// The policies that select the pod `pod` (with `labels`), by key; `service_selects`
    /// says whether a Service selects it (for `targetRefs`).
    pub fn selecting(
        &self,
        pod: &PodKey,
        labels: Option<&BTreeMap<String, String>>,
        service_selects: impl Fn(&ObjectKey) -> bool,
    ) -> Vec<(&ObjectKey, &Arc<CompiledRequestAuth>)> {
        let own = self.by_namespace.get(&pod.namespace);
        let root = (pod.namespace != self.root.as_str())
            .then(|| self.by_namespace.get(self.root.as_str()))
            .flatten();
        own.into_iter()
            .chain(root)
            .flatten()
            .filter_map(|k| self.compiled.get_key_value(k))
            .filter(|(_, ra)| {
                ra.selection.iter().any(|s| match s {
                    Selection::Namespace => true,
                    Selection::Labels(want) => want
                        .iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)),
                    Selection::Services(services) => services.iter().any(&service_selects),
                })
            })
            .collect()
    }
}
