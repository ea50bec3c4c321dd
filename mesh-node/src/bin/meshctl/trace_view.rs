//! `meshctl node trace` as text: one line per step of the connection's path, then the
//! candidate endpoints and the verdict.

use serde_json::Value;

use crate::format::{finish, keep_whole, key, s, table, DEFAULT_WIDTH};

fn rows(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

const LABEL: usize = 11;

/// Splits a line at spaces so that it fits `width` columns (a longer word stays whole).
fn wrap(line: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in line.split(' ') {
        let current = lines.last_mut().expect("never empty");
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
    }
    lines
}

/// One labelled step, wrapped to the table width.
fn step(out: &mut String, label: &str, text: &str) {
    let width = usize::from(DEFAULT_WIDTH) - LABEL;
    let lines = text.lines().flat_map(|l| wrap(l, width));
    for (i, line) in lines.enumerate() {
        let label = if i == 0 { label } else { "" };
        out.push_str(&format!("{label:<LABEL$}{line}\n"));
    }
}

fn source(src: &Value) -> String {
    let node = s(&src["node"]);
    let status = if src["enrolled"].as_bool() == Some(true) {
        match src["netns_cookie"].as_u64() {
            Some(c) => format!("enrolled (netns cookie {c})"),
            None => "enrolled".to_string(),
        }
    } else {
        format!("NOT enrolled: {}", s(&src["reason"]))
    };
    let identity = match src["identity"].as_str() {
        Some(id) => format!("\npresents {id}"),
        None => String::new(),
    };
    format!("{} on node {node}: {status}{identity}", key(&src["pod"]))
}

fn redirect(r: &Value) -> String {
    let ids = match (r["program_id"].as_u64(), r["link_id"].as_u64()) {
        (Some(p), Some(l)) => format!(" (program {p}, link {l})"),
        _ => String::new(),
    };
    if r["redirected"].as_bool() == Some(true) {
        format!(
            "{}{ids} rewrites it to {}\n{}",
            s(&r["program"]),
            s(&r["to"]),
            s(&r["reason"])
        )
    } else {
        format!(
            "not redirected by {}{ids}: {}",
            s(&r["program"]),
            s(&r["reason"])
        )
    }
}

/// The Service and route lines of a resolution.
fn resolution(out: &mut String, r: &Value) {
    match r["kind"].as_str() {
        Some("direct") => step(
            out,
            "SERVICE",
            "none: not a Service address; the proxy connects to it as addressed",
        ),
        Some("service") => {
            step(
                out,
                "SERVICE",
                &format!("{} port {}", key(&r["service"]), r["port"]),
            );
            let backends: Vec<String> = rows(&r["backends"])
                .map(|b| format!("{} weight {}", key(&b["service"]), b["weight"]))
                .collect();
            let route = if r["route"].is_null() {
                "no TCPRoute: the Service's own endpoints".to_string()
            } else {
                format!("TCPRoute {} (chosen per connection)", key(&r["route"]))
            };
            step(out, "ROUTE", &format!("{route}\n{}", backends.join(", ")));
        }
        Some("unknown_port") => step(
            out,
            "SERVICE",
            &format!("{} has no port {}", key(&r["service"]), r["port"]),
        ),
        Some("unknown_service") => step(
            out,
            "SERVICE",
            "inside a service CIDR, but no Service has this address",
        ),
        _ => {}
    }
}

fn http_routes(out: &mut String, routes: &Value) {
    for route in rows(routes) {
        let mut text = format!(
            "HTTPRoute {}: the rule is chosen per request",
            key(&route["route"])
        );
        for rule in rows(&route["rules"]) {
            let matches: Vec<String> = rows(&rule["matches"]).map(s).collect();
            let backends: Vec<String> = rows(&rule["backends"])
                .map(|b| format!("{} weight {}", key(&b["service"]), b["weight"]))
                .collect();
            text += &format!(
                "\nrule {}: {} -> {}",
                rule["index"],
                if matches.is_empty() {
                    "any request".to_string()
                } else {
                    matches.join(" | ")
                },
                backends.join(", ")
            );
        }
        step(out, "HTTPROUTE", &text);
    }
}

fn decision(c: &Value) -> String {
    let inbound = &c["inbound"];
    let mode = inbound["mode"]
        .as_str()
        .map(|m| format!(" ({m})"))
        .unwrap_or_else(|| " (not meshed)".into());
    match inbound["admission"]["admission"].as_str() {
        Some("refuse") => format!(
            "DENY{mode}\n{}: {}",
            s(&inbound["admission"]["reason"]),
            s(&inbound["note"])
        ),
        _ => format!("ALLOW{mode}\n{}", s(&inbound["note"])),
    }
}

pub fn render(v: &Value) -> String {
    let mut out = format!(
        "Trace {} -> {} ({})\n\n",
        key(&v["source"]["pod"]),
        s(&v["destination"]),
        s(&v["address"])
    );
    step(&mut out, "SOURCE", &source(&v["source"]));
    step(&mut out, "REDIRECT", &redirect(&v["redirect"]));
    if v["resolution"].is_null() {
        step(
            &mut out,
            "PROXY",
            "none on the source side: the connection leaves the pod as the app made it",
        );
    } else {
        resolution(&mut out, &v["resolution"]);
    }
    http_routes(&mut out, &v["http_routes"]);
    let mut t = table(&[
        "ENDPOINT / POD",
        "BACKEND",
        "TRANSPORT / EXPECTS",
        "DECISION",
    ]);
    let longest = rows(&v["candidates"])
        .map(|c| s(&c["expected_identity"]).chars().count())
        .max()
        .unwrap_or(0);
    keep_whole(&mut t, 2, longest.min(60) as u16);
    for c in rows(&v["candidates"]) {
        let backend = match (c["backend"].is_null(), c["weight"].as_u64()) {
            (true, _) => "-".to_string(),
            (false, Some(w)) => format!("{}\nweight {w}", key(&c["backend"])),
            (false, None) => key(&c["backend"]),
        };
        let pod = if c["pod"].is_null() {
            "(not a pod)".to_string()
        } else {
            format!("{} on {}", key(&c["pod"]), s(&c["node"]))
        };
        let transport = match c["transport"].as_str() {
            Some("hbone_mtls") => format!("HBONE mTLS, expects\n{}", s(&c["expected_identity"])),
            _ => "plaintext".to_string(),
        };
        t.add_row(vec![
            format!("{}\n{pod}", s(&c["endpoint"])),
            backend,
            transport,
            decision(c),
        ]);
    }
    out.push_str("\nCANDIDATES\n");
    if v["candidates"].as_array().is_some_and(|c| !c.is_empty()) {
        out.push_str(&finish(&t));
        out.push('\n');
    } else {
        out.push_str("(none)\n");
    }
    out.push('\n');
    step(
        &mut out,
        "VERDICT",
        &format!("{}: {}", s(&v["outcome"]), s(&v["summary"])),
    );
    for note in rows(&v["notes"]) {
        step(&mut out, "NOTE", &s(note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_wrap_to_the_table_width() {
        let mut out = String::new();
        let long = "word ".repeat(60);
        step(&mut out, "REDIRECT", &long);
        assert!(out.lines().count() >= 3);
        for line in out.lines() {
            assert!(line.chars().count() <= 100, "{line}");
        }
        assert!(out.starts_with("REDIRECT   word"));
    }
}
