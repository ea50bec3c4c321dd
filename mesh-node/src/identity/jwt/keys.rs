//! Verifying a token with an issuer's keys: the key its `kid` names (every key of the
//! issuer fitting its `alg` when it names none), then `exp`/`nbf` with a minute of
//! clock skew (as Istio), the issuer and the audiences.

use std::collections::HashSet;

use jsonwebtoken::{errors::ErrorKind, Validation};
use serde_json::{Map, Value};

use crate::{
    discovery::jwks::Jwks, discovery::request_auth::CompiledJwtRule, identity::jwt::Rejection,
};

/// Clock skew allowed on `exp` and `nbf` (Istio's 60 s).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The token's claims, not yet verified: only to pick the rule of its issuer.
pub(crate) fn unverified_claims(token: &str) -> Result<Map<String, Value>, Rejection> {
    jsonwebtoken::dangerous::insecure_decode_claims::<Map<String, Value>>(token)
        .map_err(|e| Rejection::Malformed(e.to_string()))
}

fn validation(rule: &CompiledJwtRule, alg: jsonwebtoken::Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = CLOCK_SKEW_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.required_spec_claims = HashSet::new();
    v.set_issuer(&[rule.issuer.as_str()]);
    if rule.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&rule.audiences);
        v.required_spec_claims.insert("aud".into());
    }
    v
}

/// Verifies `token` by `rule` with the issuer's `keys`; its claims if it holds.
pub(crate) fn verify(
    token: &str,
    rule: &CompiledJwtRule,
    keys: &Jwks,
) -> Result<Map<String, Value>, Rejection> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let v = validation(rule, header.alg);
    let mut tried = 0;
    for key in keys.candidates(header.alg, header.kid.as_deref()) {
        tried += 1;
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v) {
            Ok(data) => return Ok(data.claims),
            Err(e) => match e.kind() {
                // Not this key: try the next one.
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidKeyFormat => continue,
                // The signature held (it is checked first): the claims do not.
                ErrorKind::ExpiredSignature => return Err(Rejection::Expired),
                ErrorKind::ImmatureSignature => return Err(Rejection::NotYetValid),
                ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                    return Err(Rejection::Audience)
                }
                ErrorKind::InvalidIssuer => return Err(Rejection::UnknownIssuer),
                _ => return Err(Rejection::Malformed(e.to_string())),
            },
        }
    }
    if tried == 0 {
        return Err(Rejection::NoKey {
            alg: format!("{:?}", header.alg),
            kid: header.kid,
        });
    }
    Err(Rejection::BadSignature)
}
