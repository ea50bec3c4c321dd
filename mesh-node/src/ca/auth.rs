//! Who is asking the CA: a node agent, identified by a bearer token. In the embedded
//! mode each node has a static token; in a cluster the token is the agent's
//! service-account token, checked with a TokenReview, and the node name comes from
//! the bound token's `authentication.kubernetes.io/node-name` claim.

use std::collections::HashMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{api::PostParams, Api, Client};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <node token>`")]
    Missing,
    #[error("the token is not valid for any node")]
    Unknown,
    #[error("the token does not belong to the agent's service account ({0})")]
    WrongAccount(String),
    #[error(
        "the token carries no node name: use a bound service-account token (Kubernetes >= 1.30)"
    )]
    NoNode,
    #[error("TokenReview failed: {0}")]
    Review(kube::Error),
}

const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";

pub enum NodeAuthenticator {
    /// token -> node name.
    StaticTokens(HashMap<String, String>),
    TokenReview {
        client: Client,
        /// `system:serviceaccount:<namespace>:<name>` of the agents.
        agent_user: String,
    },
}

impl NodeAuthenticator {
    /// Parses `node=token` lines (blank lines and `#` comments ignored).
    pub fn parse_tokens(text: &str) -> Result<NodeAuthenticator, String> {
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
    pub async fn node_of(&self, authorization: Option<&str>) -> Result<String, AuthError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        match self {
            NodeAuthenticator::StaticTokens(tokens) => {
                tokens.get(token).cloned().ok_or(AuthError::Unknown)
            }
            NodeAuthenticator::TokenReview { client, agent_user } => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: token.to_string(),
                        ..Default::default()
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
                if status.authenticated != Some(true) {
                    return Err(AuthError::Unknown);
                }
                let user = status.user.unwrap_or_default();
                let name = user.username.unwrap_or_default();
                if &name != agent_user {
                    return Err(AuthError::WrongAccount(name));
                }
                user.extra
                    .and_then(|mut e| e.remove(NODE_CLAIM))
                    .and_then(|v| v.into_iter().next())
                    .ok_or(AuthError::NoNode)
            }
        }
    }
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
}
