//! A JSON Web Key Set (RFC 7517) read into verification keys, for RequestAuthentication:
//! an inline `jwks` is read here when the policy is compiled, a fetched `jwksUri`
//! document when it arrives (`identity::jwt::fetcher`). Only public keys of the
//! asymmetric families are kept (RSA, EC P-256/P-384, Ed25519); a key of another kind is
//! skipped, and a set with no usable key is refused.

use std::fmt;

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk},
    Algorithm, AlgorithmFamily, DecodingKey,
};

/// Largest JWKS document read (inline or fetched): larger ones are refused.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys read from one document (the rest are skipped).
pub const MAX_KEYS: usize = 64;

/// One public key and the algorithms it may verify.
#[derive(Clone)]
pub struct VerifyKey {
    /// `kid`: tokens naming a key are checked with it alone.
    pub kid: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub keys: Vec<VerifyKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is {0} bytes, over the {MAX_JWKS_BYTES}-byte limit: serve fewer keys")]
    TooLarge(usize),
    #[error("the JWKS is not a JSON object with a `keys` list: {0}")]
    NotJson(String),
    #[error("the JWKS has no usable key (RSA, EC P-256/P-384 or Ed25519 public keys){}", skipped_note(.0))]
    NoUsableKey(Vec<String>),
}

fn skipped_note(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!("; skipped: {}", skipped.join("; "))
    }
}

impl Jwks {
    /// The keys that may verify a token signed with `alg` naming `kid` (if it names
    /// one: then only keys with that `kid`).
    pub fn candidates<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.algorithms.contains(&alg) && (kid.is_none() || k.kid.as_deref() == kid)
        })
    }
}

/// Reads a JWKS document.
pub fn parse(text: &str) -> Result<Jwks, JwksError> {
    if text.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge(text.len()));
    }
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_str(text).map_err(|e| JwksError::NotJson(e.to_string()))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        if keys.len() >= MAX_KEYS {
            skipped.push(format!("keys after the first {MAX_KEYS}"));
            break;
        }
        match serde_json::from_value::<Jwk>(value)
            .map_err(|e| e.to_string())
            .and_then(|jwk| verify_key(&jwk))
        {
            Ok(k) => keys.push(k),
            Err(why) => skipped.push(format!("key {i}: {why}")),
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey(skipped));
    }
    Ok(Jwks { keys })
}

fn verify_key(jwk: &Jwk) -> Result<VerifyKey, String> {
    let (family, algorithms): (AlgorithmFamily, Vec<Algorithm>) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (
            AlgorithmFamily::Rsa,
            AlgorithmFamily::Rsa.algorithms().to_vec(),
        ),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => (AlgorithmFamily::Ec, vec![Algorithm::ES256]),
            EllipticCurve::P384 => (AlgorithmFamily::Ec, vec![Algorithm::ES384]),
            ref other => return Err(format!("EC curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => (AlgorithmFamily::Ed, vec![Algorithm::EdDSA]),
            ref other => return Err(format!("OKP curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) keys are not accepted from a JWKS".into())
        }
        _ => return Err("unknown key type".into()),
    };
    // A key that names its algorithm verifies that one only.
    let algorithms = match jwk.common.key_algorithm {
        None => algorithms,
        Some(named) => match Algorithm::try_from(named) {
            Ok(alg) if algorithms.contains(&alg) => vec![alg],
            _ => return Err(format!("`alg` {named} does not fit a {family:?} key")),
        },
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key material: {e}"))?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}
