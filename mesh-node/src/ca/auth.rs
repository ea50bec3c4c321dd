//! Who is asking the CA: a node agent, identified by a bearer token. In the embedded
//! mode each node has a static token; in a cluster the token is the agent's
//! service-account token, checked with a TokenReview, and the node name comes from
//! the bound token's `authentication.kubernetes.io/node-name` claim. Tokens are minted
//! for the CA's own audience, so one sent to the CA is no credential for the API server.

use std::collections::HashMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{api::PostParams, Api, Client};
use thiserror::Error;

use crate::telemetry::log_limit::clip;

#[derive(Debug, Error)]
pub(crate) enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <node token>`")]
    Missing,
    #[error("the token is not valid for any node")]
    Unknown,
    /// The TokenReview's own reason (clipped), e.g. the API server's list of audiences.
    #[error("the API server rejected the token: {0}")]
    Rejected(String),
    #[error("the token does not belong to the agent's service account ({0})")]
    WrongAccount(String),
    #[error("the token is not for audience `{audience}`{review}: mint it with that audience (a projected serviceAccountToken volume)")]
    WrongAudience {
        audience: String,
        /// ` (TokenReview: <its error>)` when the review said why, else empty.
        review: String,
    },
    #[error(
        "the token carries no node name: use a bound service-account token (Kubernetes >= 1.30)"
    )]
    NoNode,
    #[error("TokenReview failed: {0}")]
    Review(kube::Error),
}

const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";

pub(crate) enum NodeAuthenticator {
    /// token -> node name.
    StaticTokens(HashMap<String, String>),
    TokenReview {
        client: Client,
        /// `system:serviceaccount:<namespace>:<name>` of the agents.
        agent_user: String,
        /// The audience agents' tokens must be minted for.
        audience: String,
    },
}

impl NodeAuthenticator {
    /// Parses `node=token` lines (blank lines and `#` comments ignored).
    pub(crate) fn parse_tokens(text: &str) -> Result<NodeAuthenticator, String> {
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (node, token) = line
                .split_once('=')
                .filter(|(n, t)| !n.trim().is_empty() && t.trim().len() >= 16)
                .ok_or_else(|| {
                    format!(
                        "line {}: expected `<node>=<token of at least 16 characters>`",
                        n + 1
                    )
                })?;
            tokens.insert(token.trim().to_string(), node.trim().to_string());
        }
        Ok(NodeAuthenticator::StaticTokens(tokens))
    }

    /// The node the bearer of `authorization` (the header value) runs on.
    pub(crate) async fn node_of(&self, authorization: Option<&str>) -> Result<String, AuthError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        match self {
            NodeAuthenticator::StaticTokens(tokens) => {
                tokens.get(token).cloned().ok_or(AuthError::Unknown)
            }
            NodeAuthenticator::TokenReview {
                client,
                agent_user,
                audience,
            } => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: token.to_string(),
                        audiences: Some(vec![audience.clone()]),
                    },
                    ..Default::default()
                };
                let api: Api<TokenReview> = Api::all(client.clone());
                let status = api
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(AuthError::Review)?
                    .status
                    .unwrap_or_default();
                node_of_review(status, agent_user, audience)
            }
        }
    }
}

/// The node of an agent from the API server's verdict on its token: authenticated,
/// for `audience` (an audience-aware server echoes it), of `agent_user`, bound to a pod
/// and so carrying the node's name.
pub(crate) fn node_of_review(
    status: TokenReviewStatus,
    agent_user: &str,
    audience: &str,
) -> Result<String, AuthError> {
    if status.authenticated != Some(true) {
        // The review's error names the cause; an audience mismatch is the one a
        // deployment gets wrong, and its text names both sides' audiences.
        let error = status.error.as_deref().map(str::trim).unwrap_or_default();
        return Err(if error.is_empty() {
            AuthError::Unknown
        } else if error.contains("audience") {
            AuthError::WrongAudience {
                audience: audience.to_string(),
                review: format!(" (TokenReview: {})", clip(error)),
            }
        } else {
            AuthError::Rejected(clip(error).into_owned())
        });
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == audience)
    {
        return Err(AuthError::WrongAudience {
            audience: audience.to_string(),
            review: String::new(),
        });
    }
    let user = status.user.unwrap_or_default();
    let name = user.username.unwrap_or_default();
    if name != agent_user {
        return Err(AuthError::WrongAccount(name));
    }
    user.extra
        .and_then(|mut e| e.remove(NODE_CLAIM))
        .and_then(|v| v.into_iter().next())
        .ok_or(AuthError::NoNode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_tokens_name_their_node() {
        let auth = NodeAuthenticator::parse_tokens(
            "# nodes\na=aaaaaaaaaaaaaaaaaaaa\n\nb = bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        assert_eq!(
            auth.node_of(Some("Bearer aaaaaaaaaaaaaaaaaaaa"))
                .await
                .unwrap(),
            "a"
        );
        assert_eq!(
            auth.node_of(Some("Bearer bbbbbbbbbbbbbbbbbbbb"))
                .await
                .unwrap(),
            "b"
        );
        assert!(matches!(
            auth.node_of(Some("Bearer nope")).await,
            Err(AuthError::Unknown)
        ));
        assert!(matches!(auth.node_of(None).await, Err(AuthError::Missing)));
        assert!(matches!(
            auth.node_of(Some("Basic x")).await,
            Err(AuthError::Missing)
        ));
        assert!(NodeAuthenticator::parse_tokens("a=short").is_err());
    }

    fn review(audiences: &[&str], user: &str, node: Option<&str>) -> TokenReviewStatus {
        use k8s_openapi::api::authentication::v1::UserInfo;
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: node.map(|n| [(NODE_CLAIM.to_string(), vec![n.to_string()])].into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_reviewed_token_names_its_node_only_for_the_agent_and_the_audience() {
        const AGENT: &str = "system:serviceaccount:nodemesh-system:mesh-node";
        let ok = node_of_review(
            review(&["nodemesh-ca"], AGENT, Some("n1")),
            AGENT,
            "nodemesh-ca",
        );
        assert_eq!(ok.unwrap(), "n1");
        let api_audience = review(&["https://kubernetes.default.svc"], AGENT, Some("n1"));
        assert!(matches!(
            node_of_review(api_audience, AGENT, "nodemesh-ca"),
            Err(AuthError::WrongAudience { .. })
        ));
        let other = review(
            &["nodemesh-ca"],
            "system:serviceaccount:apps:client",
            Some("n1"),
        );
        assert!(matches!(
            node_of_review(other, AGENT, "nodemesh-ca"),
            Err(AuthError::WrongAccount(_))
        ));
        let unbound = review(&["nodemesh-ca"], AGENT, None);
        assert!(matches!(
            node_of_review(unbound, AGENT, "nodemesh-ca"),
            Err(AuthError::NoNode)
        ));
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            ..review(&["nodemesh-ca"], AGENT, Some("n1"))
        };
        assert!(matches!(
            node_of_review(rejected, AGENT, "nodemesh-ca"),
            Err(AuthError::Unknown)
        ));
    }

    /// An audience-aware API server refuses a token minted for another audience with
    /// `authenticated: false` and an error naming both: the CA must pass that on.
    #[test]
    fn a_rejected_review_reports_its_own_error() {
        const AGENT: &str = "system:serviceaccount:nodemesh-system:mesh-node";
        let mismatch = TokenReviewStatus {
            authenticated: Some(false),
            error: Some(
                "[invalid bearer token, token audiences [\"https://kubernetes.default.svc.cluster.local\"] \
                 is invalid for the target audiences [\"nodemesh-ca\"], unknown]"
                    .into(),
            ),
            ..Default::default()
        };
        let e = node_of_review(mismatch, AGENT, "nodemesh-ca").unwrap_err();
        assert!(matches!(e, AuthError::WrongAudience { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("the token is not for audience `nodemesh-ca`"),
            "the README's troubleshooting row: {text}"
        );
        assert!(
            text.contains("https://kubernetes.default.svc.cluster.local"),
            "names the token's audiences: {text}"
        );
        let expired = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("[invalid bearer token, service account token has expired]".into()),
            ..Default::default()
        };
        let e = node_of_review(expired, AGENT, "nodemesh-ca").unwrap_err();
        assert!(matches!(e, AuthError::Rejected(_)), "{e:?}");
        assert!(e.to_string().contains("has expired"), "{e}");
        let long = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("x".repeat(100_000)),
            ..Default::default()
        };
        let e = node_of_review(long, AGENT, "nodemesh-ca").unwrap_err();
        assert!(e.to_string().len() < 2_000, "clipped");
        let silent = TokenReviewStatus {
            authenticated: Some(false),
            ..Default::default()
        };
        assert!(matches!(
            node_of_review(silent, AGENT, "nodemesh-ca"),
            Err(AuthError::Unknown)
        ));
    }
}
