//! The CA's answer to one sign request body from an authenticated agent: the JSON, the
//! SPIFFE ID and the CSR inside it, checked against a real CA key (generated once per
//! process) and a state with one pod on the asking node.
//!
//! The first byte chooses how the rest is read: `0` the whole body as sent; `1` the DER
//! of a CSR, wrapped in PEM and JSON for the pod's identity (so mutations reach the
//! CSR parser instead of breaking base64); `2` the same for an identity whose pod is not
//! on the node.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_node::{
    ca::sign::answer, ca::sign::SignRefusal, discovery::cluster::ClusterState,
    discovery::files::parse_manifest, identity::ca::authority::CertificateAuthority,
};

const NODE: &str = "node-a";
const IDENTITY: &str = "spiffe://cluster.local/ns/apps/sa/client";
const ELSEWHERE: &str = "spiffe://cluster.local/ns/apps/sa/other";
const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: apps}\n\
    spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: c, image: x}]}\n\
    ---\napiVersion: v1\nkind: Pod\nmetadata: {name: o, namespace: apps}\n\
    spec: {nodeName: node-b, serviceAccountName: other, containers: [{name: c, image: x}]}\n";

static CA: LazyLock<CertificateAuthority> = LazyLock::new(|| {
    CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).expect("a CA")
});

static STATE: LazyLock<ClusterState> =
    LazyLock::new(|| ClusterState::from_objects(parse_manifest(PODS).expect("pods")));

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem_request(identity: &str, der: &[u8]) -> Vec<u8> {
    let body = base64(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap_or_default())
        .collect();
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    );
    serde_json::to_vec(&serde_json::json!({ "identity": identity, "csr": pem })).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let body = match mode {
        0 => rest.to_vec(),
        1 => pem_request(IDENTITY, rest),
        2 => pem_request(ELSEWHERE, rest),
        _ => return,
    };
    match answer(&CA, &STATE, NODE, &body) {
        Ok((identity, response)) => {
            // Only the pod's identity, only with a certificate from this root.
            assert_eq!(identity.to_string(), IDENTITY);
            assert_ne!(mode, 2);
            assert_eq!(response.root, CA.root_pem());
            assert!(response
                .certificate
                .starts_with("-----BEGIN CERTIFICATE-----"));
        }
        Err(refusal) => {
            if mode == 2 {
                assert!(
                    matches!(refusal, SignRefusal::NotScheduled { .. }),
                    "{refusal}"
                );
            }
            assert!(refusal.status().is_client_error() || refusal.status().is_server_error());
            let _ = refusal.to_string();
        }
    }
});
