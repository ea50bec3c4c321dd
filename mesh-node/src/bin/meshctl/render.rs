//! Filters and tables for `meshctl node` views, from the admin API's JSON.

use std::collections::BTreeSet;

use serde_json::Value;

use comfy_table::Table;

use crate::format::{age, bytes, finish, identity, key, now_unix, s, table, utc};

pub struct Filter {
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

/// The namespace and pods a row is about, for -n and --pod.
pub struct RowKey {
    pub namespaces: Vec<String>,
    /// None: --pod does not apply to this kind of row.
    pub pods: Option<Vec<String>>,
}

fn keep(row: &RowKey, f: &Filter) -> bool {
    let ns_ok = f
        .namespace
        .as_ref()
        .is_none_or(|n| row.namespaces.iter().any(|r| r == n));
    let pod_ok = match (&f.pod, &row.pods) {
        (None, _) | (_, None) => true,
        (Some(p), Some(pods)) => pods.iter().any(|r| r == p),
    };
    ns_ok && pod_ok
}

/// Keeps the rows of a JSON array that pass the filter.
pub fn filter(rows: &Value, f: &Filter, key_of: fn(&Value) -> RowKey) -> Value {
    Value::Array(
        rows.as_array()
            .into_iter()
            .flatten()
            .filter(|r| keep(&key_of(r), f))
            .cloned()
            .collect(),
    )
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

pub fn workload_key(r: &Value) -> RowKey {
    RowKey {
        namespaces: vec![text(&r["namespace"])],
        pods: Some(vec![text(&r["name"])]),
    }
}

pub fn connection_key(r: &Value) -> RowKey {
    RowKey {
        namespaces: vec![text(&r["pod"]["namespace"]), text(&r["peer"]["namespace"])],
        pods: Some(vec![text(&r["pod"]["name"]), text(&r["peer"]["name"])]),
    }
}

pub fn service_key(r: &Value) -> RowKey {
    RowKey {
        namespaces: vec![text(&r["service"]["namespace"])],
        pods: None,
    }
}

pub fn route_key(r: &Value) -> RowKey {
    RowKey {
        namespaces: vec![text(&r["route"]["namespace"])],
        pods: None,
    }
}

pub fn cert_key(r: &Value) -> RowKey {
    // spiffe://<td>/ns/<ns>/sa/<sa>
    let id = text(&r["identity"]);
    let ns = id
        .split("/ns/")
        .nth(1)
        .and_then(|rest| rest.split('/').next());
    RowKey {
        namespaces: vec![ns.unwrap_or_default().to_string()],
        pods: None,
    }
}

pub fn filter_policies(v: &Value, f: &Filter) -> Value {
    let namespaces = filter(&v["namespaces"], f, |r| RowKey {
        namespaces: vec![text(&r["namespace"])],
        pods: None,
    });
    let policies = filter(&v["policies"], f, |r| RowKey {
        namespaces: vec![text(&r["policy"]["namespace"])],
        pods: Some(
            r["selects_on_this_node"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| text(&p["name"]))
                .collect(),
        ),
    });
    serde_json::json!({ "namespaces": namespaces, "policies": policies })
}

fn rows(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// The table, or a line saying there is nothing to show.
fn or_none(t: &Table, what: &str) -> String {
    if t.row_iter().next().is_none() {
        format!("(no {what})")
    } else {
        finish(t)
    }
}

pub fn status(v: &Value) -> String {
    let mut t = table(&["FIELD", "VALUE"]);
    let ready = if v["ready"].as_bool() == Some(true) {
        "yes".to_string()
    } else {
        format!("NO: {}", s(&v["not_ready_reason"]))
    };
    let objects: Vec<String> = v["state"]["objects"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let state_age = v["state"]["age_seconds"]
        .as_f64()
        .map(|a| format!("{} ago", age(a as i64)))
        .unwrap_or_else(|| "never".into());
    let mtls = if v["mtls"].as_bool() == Some(true) {
        format!("on (trust domain {})", s(&v["trust_domain"]))
    } else {
        "OFF: no CA configured, meshed traffic is not encrypted".into()
    };
    for (field, value) in [
        ("node", s(&v["node"])),
        ("version", s(&v["version"])),
        ("ready", ready),
        (
            "uptime",
            age(v["uptime_seconds"].as_i64().unwrap_or_default()),
        ),
        ("mtls", mtls),
        ("source", s(&v["source"])),
        (
            "state",
            format!(
                "{} updates, last {state_age}; {}",
                v["state"]["updates"],
                objects.join(", ")
            ),
        ),
        (
            "workloads",
            format!(
                "{} enrolled of {} on this node",
                v["workloads"]["enrolled"], v["workloads"]["total"]
            ),
        ),
        (
            "connections",
            format!(
                "{} outbound, {} inbound open",
                v["connections"]["live_outbound"], v["connections"]["live_inbound"]
            ),
        ),
        (
            "certificates",
            format!(
                "{} valid of {}",
                v["certificates"]["valid"], v["certificates"]["total"]
            ),
        ),
    ] {
        t.add_row(vec![field.to_string(), value]);
    }
    finish(&t)
}

/// In-pod listener ports, e.g. `15001 15006 15008`.
fn listener_ports(v: &Value) -> String {
    let ports: BTreeSet<String> = rows(v)
        .filter_map(|l| l.as_str()?.rsplit_once(':').map(|(_, p)| p.to_string()))
        .collect();
    ports.into_iter().collect::<Vec<_>>().join(" ")
}

pub fn workloads(v: &Value) -> String {
    let mut t = table(&[
        "NAMESPACE",
        "POD",
        "IPS",
        "ACCOUNT",
        "ENROLLED",
        "LISTENERS",
        "COOKIE / REASON",
    ]);
    for w in rows(v) {
        let ips: Vec<String> = rows(&w["ips"]).map(s).collect();
        let enrolled = w["enrolled"].as_bool() == Some(true);
        t.add_row(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            ips.join("\n"),
            s(&w["service_account"]),
            if enrolled { "yes" } else { "no" }.to_string(),
            listener_ports(&w["listeners"]),
            if enrolled {
                s(&w["netns_cookie"])
            } else {
                s(&w["reason"])
            },
        ]);
    }
    or_none(&t, "pods on this node")
}

fn backend_line(b: &Value) -> String {
    let eps = b["endpoints"].as_array().map(Vec::len).unwrap_or(0);
    format!(
        "{} :{} weight {} ({eps} ready)",
        key(&b["service"]),
        b["port"],
        b["weight"]
    )
}

/// A backend of an HTTPRoute rule (the routes view's shape).
fn rule_backend_line(b: &Value) -> String {
    let port = match b["port"].as_u64() {
        Some(p) => format!(" :{p}"),
        None => String::new(),
    };
    format!(
        "{}{port} weight {} ({} ready)",
        key(&b["service"]),
        b["weight"],
        s(&b["ready_endpoints"])
    )
}

/// ROUTE and BACKENDS of an HTTP-routed port: each HTTPRoute, and each rule's
/// backends (the rule is chosen per request).
fn http_route_cells(routes: &Value) -> (String, String) {
    let names: Vec<String> = rows(routes)
        .map(|r| format!("{} {}", s(&r["kind"]), key(&r["route"])))
        .collect();
    let mut backends = Vec::new();
    for r in rows(routes) {
        for rule in rows(&r["rules"]) {
            let matches: Vec<String> = rows(&rule["matches"]).map(s).collect();
            let label = if matches.is_empty() {
                "any request".to_string()
            } else {
                matches.join("; ")
            };
            backends.push(format!("#{} {label}:", rule["index"]));
            backends.extend(rows(&rule["backends"]).map(|b| format!("  {}", rule_backend_line(b))));
        }
    }
    (names.join("\n"), backends.join("\n"))
}

pub fn services(v: &Value) -> String {
    let mut t = table(&["SERVICE", "VIPS", "PORT", "ROUTE", "BACKENDS"]);
    for svc in rows(v) {
        let r = &svc["resolution"];
        let vips: Vec<String> = rows(&svc["vips"]).map(s).collect();
        let backends: Vec<String> = rows(&r["backends"]).map(backend_line).collect();
        let (route, backends) = if rows(&svc["http_routes"]).next().is_some() {
            http_route_cells(&svc["http_routes"])
        } else {
            (
                if r["route"].is_null() {
                    "-".into()
                } else {
                    key(&r["route"])
                },
                if backends.is_empty() {
                    s(&r["kind"])
                } else {
                    backends.join("\n")
                },
            )
        };
        t.add_row(vec![
            key(&svc["service"]),
            vips.join("\n"),
            s(&svc["port"]),
            route,
            backends,
        ]);
    }
    or_none(&t, "Services")
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{:.1}%", f * 100.0))
        .unwrap_or_else(|| "-".into())
}

pub fn routes(v: &Value) -> String {
    let mut t = table(&["ROUTE", "RULE", "BACKEND", "WEIGHT", "OBSERVED", "READY"]);
    for r in rows(v) {
        let parents: Vec<String> = rows(&r["parents"])
            .map(|p| match p["port"].as_u64() {
                Some(port) => format!("on {}:{port}", key(&p["service"])),
                None => format!("on {}", key(&p["service"])),
            })
            .collect();
        // The route's name once, above its rules and backends.
        let mut route = Some(format!(
            "{}\n{}\n{}",
            key(&r["route"]),
            s(&r["kind"]),
            parents.join("\n")
        ));
        for rule in rows(&r["rules"]) {
            let total: u64 = rows(&rule["backends"])
                .map(|b| b["weight"].as_u64().unwrap_or(0))
                .sum();
            let matches: Vec<String> = rows(&rule["matches"]).map(s).collect();
            let matches = match (r["kind"].as_str(), matches.is_empty()) {
                (Some("TCPRoute"), _) => "per connection".to_string(),
                (_, true) => "any request".to_string(),
                (_, false) => matches.join("\n"),
            };
            let mut rule_cell = Some(format!("#{} {matches}", rule["index"]));
            for b in rows(&rule["backends"]) {
                let weight = b["weight"].as_u64().unwrap_or(0);
                let configured = if total > 0 {
                    format!("{weight} ({:.0}%)", weight as f64 * 100.0 / total as f64)
                } else {
                    weight.to_string()
                };
                t.add_row(vec![
                    route.take().unwrap_or_default(),
                    rule_cell.take().unwrap_or_default(),
                    key(&b["service"]),
                    configured,
                    format!("{} ({})", percent(&b["observed_share"]), s(&b["picks"])),
                    s(&b["ready_endpoints"]),
                ]);
            }
        }
    }
    or_none(&t, "TCPRoutes or HTTPRoutes")
}

pub fn certs(v: &Value) -> String {
    let mut t = table(&["IDENTITY", "STATE", "SERIAL", "VALID (UTC)", "EXPIRES IN"]);
    let now = now_unix();
    let mut errors = Vec::new();
    for c in rows(v) {
        // Minutes are enough to read validity; JSON output has the exact seconds.
        let time = |f: &str| {
            c[f].as_i64()
                .map(|t| utc(t).chars().take(16).collect::<String>())
                .unwrap_or_else(|| "-".into())
        };
        let serial = s(&c["serial"]);
        let serial = if serial.chars().count() > 12 {
            format!("{}…", serial.chars().take(11).collect::<String>())
        } else {
            serial
        };
        t.add_row(vec![
            identity(&c["identity"]),
            s(&c["state"]),
            serial,
            format!(
                "from {}\nto   {}",
                time("not_before_unix"),
                time("not_after_unix")
            ),
            c["not_after_unix"]
                .as_i64()
                .map(|t| age(t - now))
                .unwrap_or_else(|| "-".into()),
        ]);
        if let Some(e) = c["last_error"].as_str() {
            errors.push(format!("{}: last CA error: {e}", s(&c["identity"])));
        }
    }
    let mut out = or_none(&t, "certificates (no CA configured, or no enrolled pods)");
    for e in errors {
        out += &format!("\n{e}");
    }
    out
}

fn rule_line(rule: &Value) -> String {
    let mut from = Vec::new();
    for src in rows(&rule["from"]) {
        for (field, label) in [
            ("principals", "principal"),
            ("namespaces", "namespace"),
            ("serviceAccounts", "sa"),
        ] {
            for item in rows(&src[field]) {
                from.push(format!("{label} {}", s(item)));
            }
        }
    }
    let ports: Vec<String> = rows(&rule["to"])
        .flat_map(|d| rows(&d["ports"]).map(s).collect::<Vec<_>>())
        .collect();
    let from = if from.is_empty() {
        "any source".to_string()
    } else {
        from.join(" or ")
    };
    let to = if ports.is_empty() {
        "any port".to_string()
    } else {
        format!("port {}", ports.join(","))
    };
    format!("from {from} to {to}")
}

pub fn policies(v: &Value) -> String {
    let mut modes = table(&["NAMESPACE", "MESH", "MODE"]);
    for n in rows(&v["namespaces"]) {
        let enrolled = n["enrolled"].as_bool() == Some(true);
        modes.add_row(vec![
            s(&n["namespace"]),
            if enrolled { "enabled" } else { "-" }.to_string(),
            if enrolled {
                s(&n["mode"])
            } else {
                "-".to_string()
            },
        ]);
    }
    let mut t = table(&["POLICY", "ACTION", "SELECTOR", "RULES", "SELECTS HERE"]);
    for p in rows(&v["policies"]) {
        let selector: Vec<String> = p["selector"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect();
        let rules: Vec<String> = rows(&p["rules"]).map(rule_line).collect();
        let here: Vec<String> = rows(&p["selects_on_this_node"]).map(key).collect();
        t.add_row(vec![
            key(&p["policy"]),
            s(&p["action"]),
            if selector.is_empty() {
                "(all pods)".into()
            } else {
                selector.join(",")
            },
            if rules.is_empty() {
                "(no rules: matches nothing)".into()
            } else {
                rules.join("\n")
            },
            if here.is_empty() {
                "-".into()
            } else {
                here.join("\n")
            },
        ]);
    }
    format!(
        "{}\n\n{}",
        or_none(&modes, "namespaces"),
        or_none(&t, "authorization policies")
    )
}

pub fn connections(v: &Value) -> String {
    // Two lines per connection keep both identities whole within 100 columns.
    let mut t = table(&[
        "POD / PEER",
        "SRC / ORIG DST",
        "IDENTITIES (SRC / DST)",
        "UP / DOWN",
        "STATE",
    ]);
    for c in rows(v) {
        let dir = match c["direction"].as_str() {
            Some("outbound") => "out",
            Some("inbound") => "in",
            _ => "?",
        };
        let ids = if c["security"] == "mutual_tls" {
            format!(
                "{}\n{}",
                identity(&c["source_identity"]),
                identity(&c["destination_identity"])
            )
        } else {
            "(plaintext)".to_string()
        };
        let service = c["service"]
            .as_str()
            .map(|svc| format!("\nvia {svc}"))
            .unwrap_or_default();
        let peer = if c["peer"].is_null() {
            "-".to_string()
        } else {
            key(&c["peer"])
        };
        t.add_row(vec![
            format!("{dir} {}\n-> {peer}", key(&c["pod"])),
            format!("{}\n{}{service}", s(&c["src"]), s(&c["original_dst"])),
            ids,
            format!(
                "{}\n{}",
                bytes(c["bytes_to_server"].as_u64().unwrap_or(0)),
                bytes(c["bytes_to_client"].as_u64().unwrap_or(0))
            ),
            format!(
                "{}\n{} #{}",
                s(&c["result"]),
                age((c["duration_ms"].as_u64().unwrap_or(0) / 1000) as i64),
                s(&c["id"])
            ),
        ]);
    }
    or_none(&t, "connections")
}

pub fn bpf(v: &Value) -> String {
    let mut programs = table(&["PROGRAM", "ATTACH", "PROG ID", "LINK ID"]);
    for p in rows(&v["programs"]) {
        programs.add_row(vec![
            s(&p["name"]),
            s(&p["attach"]),
            s(&p["program_id"]),
            s(&p["link_id"]),
        ]);
    }
    let mut maps = table(&["MAP", "ID", "ENTRIES", "MAX", "USED", "PINNED"]);
    for m in rows(&v["maps"]) {
        let entries = m["entries"].as_u64().unwrap_or(0);
        let max = m["max_entries"].as_u64().unwrap_or(0);
        maps.add_row(vec![
            s(&m["name"]),
            s(&m["id"]),
            entries.to_string(),
            max.to_string(),
            if max > 0 {
                format!("{:.1}%", entries as f64 * 100.0 / max as f64)
            } else {
                "-".into()
            },
            if m["pinned"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ]);
    }
    let cookies: Vec<String> = rows(&v["enrolled_netns_cookies"]).map(s).collect();
    format!(
        "{}\n\n{}\n\npin dir: {} (links under links/, maps under maps/){}\nenrolled netns cookies: {}",
        or_none(&programs, "attached programs"),
        or_none(&maps, "maps"),
        s(&v["pin_dir"]),
        if v["reused_pins"].as_bool() == Some(true) {
            " (maps reused from a previous run)"
        } else {
            ""
        },
        if cookies.is_empty() {
            "(none)".to_string()
        } else {
            cookies.join(" ")
        }
    )
}
