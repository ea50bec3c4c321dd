//! One sign request, from the body an authenticated node agent sent to the answer: the
//! JSON parses, the identity is a SPIFFE ID with a pod scheduled on that node, and the
//! CSR asks for exactly that identity. Pure (no I/O), so it is unit-tested and fuzzed
//! on its own; the server only authenticates, reads the body and logs.

use http::StatusCode;
use thiserror::Error;

use crate::{
    discovery::cluster::service_account, discovery::cluster::ClusterState, identity::Identity,
};
use crate::{
    identity::ca::authority::CaError, identity::ca::authority::CertificateAuthority,
    identity::ca::protocol::SignRequest, identity::ca::protocol::SignResponse,
};

/// Why a sign request gets no certificate.
#[derive(Debug, Error)]
pub enum SignRefusal {
    #[error("expected {{\"identity\", \"csr\"}} JSON: {0}")]
    Malformed(serde_json::Error),
    #[error("{0}")]
    BadIdentity(String),
    #[error("no pod with identity {identity} is scheduled on node {node}")]
    NotScheduled { identity: Identity, node: String },
    #[error(transparent)]
    Csr(CaError),
}

impl SignRefusal {
    pub fn status(&self) -> StatusCode {
        match self {
            SignRefusal::NotScheduled { .. } => StatusCode::FORBIDDEN,
            SignRefusal::Csr(CaError::Crypto(_) | CaError::Io { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            SignRefusal::Malformed(_) | SignRefusal::BadIdentity(_) | SignRefusal::Csr(_) => {
                StatusCode::BAD_REQUEST
            }
        }
    }
}

/// The answer to `body`, sent by the agent of `node`, judged against `state`.
pub fn answer(
    authority: &CertificateAuthority,
    state: &ClusterState,
    node: &str,
    body: &[u8],
) -> Result<(Identity, SignResponse), SignRefusal> {
    let request: SignRequest = serde_json::from_slice(body).map_err(SignRefusal::Malformed)?;
    let identity: Identity = request.identity.parse().map_err(SignRefusal::BadIdentity)?;
    let scheduled = state.pods_on_node(node).any(|(key, pod)| {
        key.namespace == identity.namespace && service_account(pod) == identity.service_account
    });
    if !scheduled {
        return Err(SignRefusal::NotScheduled {
            identity,
            node: node.to_string(),
        });
    }
    let certificate = authority
        .sign(&request.csr, &identity)
        .map_err(SignRefusal::Csr)?;
    let response = SignResponse {
        certificate,
        root: authority.root_pem().to_string(),
    };
    Ok((identity, response))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{discovery::files::parse_manifest, identity::ca::authority::new_csr};

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: apps}\n\
        spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: c, image: x}]}\n";

    fn setup() -> (CertificateAuthority, ClusterState) {
        let ca =
            CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let state = ClusterState::from_objects(parse_manifest(POD).unwrap());
        (ca, state)
    }

    fn body(identity: &str, csr: &str) -> Vec<u8> {
        serde_json::to_vec(&SignRequest {
            identity: identity.into(),
            csr: csr.into(),
        })
        .unwrap()
    }

    #[test]
    fn a_csr_for_a_pod_scheduled_on_the_node_is_signed() {
        let (ca, state) = setup();
        let id = Identity::new("cluster.local", "apps", "client");
        let (_key, csr) = new_csr(&id).unwrap();
        let (signed_for, response) =
            answer(&ca, &state, "node-a", &body(&id.to_string(), &csr)).unwrap();
        assert_eq!(signed_for, id);
        assert!(response
            .certificate
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(response.root, ca.root_pem());
    }

    #[test]
    fn each_refusal_has_its_status() {
        let (ca, state) = setup();
        let id = Identity::new("cluster.local", "apps", "client");
        let (_key, csr) = new_csr(&id).unwrap();
        let status = |node: &str, body: &[u8]| answer(&ca, &state, node, body).unwrap_err();

        let refused = status("node-a", b"{\"identity\": 7}");
        assert!(matches!(refused, SignRefusal::Malformed(_)), "{refused}");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

        let refused = status("node-a", &body("not a spiffe id", &csr));
        assert!(matches!(refused, SignRefusal::BadIdentity(_)), "{refused}");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

        let refused = status("node-b", &body(&id.to_string(), &csr));
        assert!(
            matches!(refused, SignRefusal::NotScheduled { .. }),
            "{refused}"
        );
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);

        let refused = status("node-a", &body(&id.to_string(), "garbage"));
        assert!(
            matches!(refused, SignRefusal::Csr(CaError::Csr(_))),
            "{refused}"
        );
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

        let (_key, other) = new_csr(&Identity::new("cluster.local", "apps", "admin")).unwrap();
        let refused = status("node-a", &body(&id.to_string(), &other));
        assert!(
            matches!(refused, SignRefusal::Csr(CaError::SanMismatch { .. })),
            "{refused}"
        );
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }
}
