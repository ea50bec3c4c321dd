//! Istio's `AuthorizationPolicy` compiled into the model, each problem reported by
//! field: a rule with a problem is [`Rule::Broken`] (fails closed by its action).

use std::str::FromStr;

use super::{
    Action, Cidr, CompiledPolicy, Condition, Field, Operation, PolicyId, PolicyKind, Rule,
    RuleBody, Source, StringMatch, Target, Values, WhenKey,
};
use crate::discovery::policy_target;
use crate::{
    discovery::authorization_policy as wire, discovery::authorization_policy::AuthorizationPolicy,
    discovery::problem::Problem, discovery::problem::ProblemReason, keys::ObjectKey,
};

fn problem(field: String, reason: ProblemReason, detail: String) -> Problem {
    Problem {
        field,
        reason,
        detail,
    }
}

/// Compiles one Istio policy; never fails (what is broken fails closed, reported).
pub fn compile_istio(key: &ObjectKey, policy: &AuthorizationPolicy) -> CompiledPolicy {
    let spec = &policy.spec;
    let mut problems = Vec::new();
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            let provider = spec.provider.as_ref().and_then(|p| p.name.clone());
            problems.push(problem(
                "action".into(),
                ProblemReason::NotImplemented,
                format!(
                    "CUSTOM (ext-authz, provider {}) is not supported by Nodemesh: every request to the workloads it selects is denied",
                    provider.as_deref().unwrap_or("unset")
                ),
            ));
            Action::Custom { provider }
        }
        Some(other) => {
            problems.push(problem(
                "action".into(),
                ProblemReason::UnknownValue,
                format!("`{other}` is not ALLOW, DENY, AUDIT or CUSTOM: every request to the workloads it selects is denied"),
            ));
            Action::Unknown {
                written: other.to_string(),
            }
        }
    };
    let targets = targets(key, spec, &mut problems);
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let before = problems.len();
            let body = rule(&format!("rules[{i}]"), r, &mut problems);
            if problems.len() > before {
                Rule::Broken
            } else {
                Rule::Match(body)
            }
        })
        .collect();
    CompiledPolicy {
        id: PolicyId {
            kind: PolicyKind::Istio,
            key: key.clone(),
        },
        action,
        targets,
        rules,
        problems,
    }
}

fn targets(
    key: &ObjectKey,
    spec: &wire::AuthorizationPolicySpec,
    problems: &mut Vec<Problem>,
) -> Vec<Target> {
    let scope = policy_target::scope(
        key,
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        problems,
    );
    let Some(services) = scope.services else {
        // No selector: every pod (an empty label set matches all).
        return vec![Target::Labels(scope.labels.unwrap_or_default())];
    };
    let mut targets: Vec<Target> = scope.labels.into_iter().map(Target::Labels).collect();
    if !services.is_empty() {
        targets.push(Target::Services(services));
    }
    targets
}

fn rule(field: &str, r: &wire::Rule, problems: &mut Vec<Problem>) -> RuleBody {
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let field = format!("{field}.from[{i}].source");
            match &f.source {
                Some(s) => source(&field, s, problems),
                None => {
                    problems.push(empty(field));
                    Source::default()
                }
            }
        })
        .collect();
    let to =
        r.to.iter()
            .enumerate()
            .map(|(i, t)| {
                let field = format!("{field}.to[{i}].operation");
                match &t.operation {
                    Some(o) => operation(&field, o, problems),
                    None => {
                        problems.push(empty(field));
                        Operation::default()
                    }
                }
            })
            .collect();
    let when = r
        .when
        .iter()
        .enumerate()
        .filter_map(|(i, c)| condition(&format!("{field}.when[{i}]"), c, problems))
        .collect();
    RuleBody { from, to, when }
}

fn empty(field: String) -> Problem {
    problem(
        field,
        ProblemReason::BadValue,
        "absent or empty (Istio rejects this): the rule fails closed".into(),
    )
}

fn strings(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| StringMatch::parse(v)).collect()
}

fn text_field(any: &[String], none: &[String]) -> Field<StringMatch> {
    Field {
        any_of: strings(any),
        none_of: strings(none),
    }
}

/// Parses each value of a list, reporting each one that does not parse.
fn typed<T>(
    field: &str,
    values: &[String],
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match parse(v) {
            Some(t) => out.push(t),
            None => problems.push(problem(
                format!("{field}[{i}]"),
                ProblemReason::BadValue,
                format!("`{v}` is not {what}: the rule fails closed"),
            )),
        }
    }
    out
}

fn cidrs(
    field: &str,
    any: (&str, &[String]),
    none: (&str, &[String]),
    problems: &mut Vec<Problem>,
) -> Field<Cidr> {
    let parse = |v: &str| Cidr::from_str(v).ok();
    let what = "an IP address or CIDR";
    Field {
        any_of: typed(&format!("{field}.{}", any.0), any.1, parse, what, problems),
        none_of: typed(
            &format!("{field}.{}", none.0),
            none.1,
            parse,
            what,
            problems,
        ),
    }
}

fn port(v: &str) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| *p != 0)
}

fn ports(field: &str, any: &[String], none: &[String], p: &mut Vec<Problem>) -> Field<u16> {
    let what = "a port (1-65535)";
    Field {
        any_of: typed(&format!("{field}.ports"), any, port, what, p),
        none_of: typed(&format!("{field}.notPorts"), none, port, what, p),
    }
}

fn source(field: &str, s: &wire::Source, problems: &mut Vec<Problem>) -> Source {
    let compiled = Source {
        principals: text_field(&s.principals, &s.not_principals),
        request_principals: text_field(&s.request_principals, &s.not_request_principals),
        namespaces: text_field(&s.namespaces, &s.not_namespaces),
        ip_blocks: cidrs(
            field,
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            problems,
        ),
        remote_ip_blocks: cidrs(
            field,
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            problems,
        ),
    };
    if *s == wire::Source::default() {
        problems.push(empty(field.to_string()));
    }
    compiled
}

fn operation(field: &str, o: &wire::Operation, problems: &mut Vec<Problem>) -> Operation {
    let lower = |v: &[String]| -> Vec<StringMatch> {
        strings(v).into_iter().map(StringMatch::lowercase).collect()
    };
    for (name, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (i, p) in list.iter().enumerate() {
            if p.contains('{') {
                problems.push(Problem::not_implemented(
                    format!("{field}.{name}[{i}]"),
                    "a path template ({*} or {**})",
                ));
            }
        }
    }
    if *o == wire::Operation::default() {
        problems.push(empty(field.to_string()));
    }
    Operation {
        hosts: Field {
            any_of: lower(&o.hosts),
            none_of: lower(&o.not_hosts),
        },
        ports: ports(field, &o.ports, &o.not_ports, problems),
        methods: text_field(&o.methods, &o.not_methods),
        paths: text_field(&o.paths, &o.not_paths),
    }
}

/// `request.auth.claims[a][b]` → `["a", "b"]`; `request.headers[X]` → `["X"]`.
fn brackets(rest: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let name = &inner[..end];
        if name.is_empty() {
            return None;
        }
        out.push(name.to_string());
        rest = &inner[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

fn when_key(key: &str) -> Result<WhenKey, (ProblemReason, String)> {
    let unsupported = |what: &str| {
        (
            ProblemReason::NotImplemented,
            format!("`{key}` ({what}) is not supported by Nodemesh: the rule fails closed"),
        )
    };
    let plain = match key {
        "source.ip" => Some(WhenKey::SourceIp),
        "remote.ip" => Some(WhenKey::RemoteIp),
        "source.namespace" => Some(WhenKey::SourceNamespace),
        "source.principal" => Some(WhenKey::SourcePrincipal),
        "request.auth.principal" => Some(WhenKey::RequestPrincipal),
        "request.auth.audiences" => Some(WhenKey::RequestAudiences),
        "request.auth.presenter" => Some(WhenKey::RequestPresenter),
        "destination.ip" => Some(WhenKey::DestinationIp),
        "destination.port" => Some(WhenKey::DestinationPort),
        _ => None,
    };
    if let Some(k) = plain {
        return Ok(k);
    }
    if let Some(rest) = key.strip_prefix("request.headers") {
        let bad = || {
            (
                ProblemReason::BadValue,
                format!("`{key}`: write request.headers[<header name>]"),
            )
        };
        return match brackets(rest).as_deref() {
            Some([name]) => http::HeaderName::from_str(name)
                .map(WhenKey::RequestHeader)
                .map_err(|_| bad()),
            _ => Err(bad()),
        };
    }
    if let Some(rest) = key.strip_prefix("request.auth.claims") {
        return brackets(rest).map(WhenKey::RequestClaim).ok_or((
            ProblemReason::BadValue,
            format!("`{key}`: write request.auth.claims[<claim>] (nested: [a][b])"),
        ));
    }
    if key == "connection.sni" {
        return Err(unsupported("the TLS server name"));
    }
    if key.starts_with("experimental.") {
        return Err(unsupported("an experimental key"));
    }
    Err((
        ProblemReason::UnknownValue,
        format!("`{key}` is not a condition key Istio documents: the rule fails closed"),
    ))
}

fn condition(field: &str, c: &wire::Condition, problems: &mut Vec<Problem>) -> Option<Condition> {
    let key = match when_key(&c.key) {
        Ok(k) => k,
        Err((reason, detail)) => {
            problems.push(problem(format!("{field}.key"), reason, detail));
            return None;
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        problems.push(problem(
            field.to_string(),
            ProblemReason::BadValue,
            "neither values nor notValues (Istio rejects this): the rule fails closed".into(),
        ));
    }
    let values = match key {
        WhenKey::SourceIp | WhenKey::RemoteIp | WhenKey::DestinationIp => Values::Ips(cidrs(
            field,
            ("values", &c.values),
            ("notValues", &c.not_values),
            problems,
        )),
        WhenKey::DestinationPort => {
            let what = "a port (1-65535)";
            Values::Ports(Field {
                any_of: typed(&format!("{field}.values"), &c.values, port, what, problems),
                none_of: typed(
                    &format!("{field}.notValues"),
                    &c.not_values,
                    port,
                    what,
                    problems,
                ),
            })
        }
        _ => Values::Text(text_field(&c.values, &c.not_values)),
    };
    Some(Condition { key, values })
}
