//! Real signing keys for the JWT tests, made fresh in each test: RSA (PKCS#1 for
//! signing), EC P-256/P-384 and Ed25519, with their public JWKs.

use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub(super) struct TestKey {
    pub(super) alg: Algorithm,
    pub(super) kid: String,
    encoding: EncodingKey,
    pub(super) jwk: Value,
}

/// The contents of the DER element at the start of `der`, and what follows it.
fn der_element(der: &[u8]) -> (&[u8], &[u8]) {
    let (len, start) = match der[1] {
        n if n < 0x80 => (n as usize, 2),
        n => {
            let count = (n & 0x7f) as usize;
            let len = der[2..2 + count]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, 2 + count)
        }
    };
    (&der[start..start + len], &der[start + len..])
}

/// PKCS#1 `RSAPrivateKey` out of a PKCS#8 `PrivateKeyInfo`.
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    let (info, _) = der_element(pkcs8);
    let (_, rest) = der_element(info); // version
    let (_, rest) = der_element(rest); // algorithm
    let (key, _) = der_element(rest); // privateKey OCTET STRING
    key.to_vec()
}

impl TestKey {
    fn new(alg: Algorithm, kid: &str, encoding: EncodingKey) -> TestKey {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        TestKey {
            alg,
            kid: kid.to_string(),
            encoding,
            jwk: serde_json::to_value(&jwk).unwrap(),
        }
    }

    pub(super) fn rsa(kid: &str, alg: Algorithm) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let der = pkcs1_of(&pair.serialize_der());
        TestKey::new(alg, kid, EncodingKey::from_rsa_der(&der))
    }

    pub(super) fn ec(kid: &str, alg: Algorithm) -> TestKey {
        let which = match alg {
            Algorithm::ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => &rcgen::PKCS_ECDSA_P256_SHA256,
        };
        let pair = rcgen::KeyPair::generate_for(which).unwrap();
        TestKey::new(alg, kid, EncodingKey::from_ec_der(&pair.serialize_der()))
    }

    /// (The crate reads an Ed25519 JWK only out of a PKCS#8 v1 key; aws-lc writes v2,
    /// so the public JWK is written from the raw public key.)
    pub(super) fn ed25519(kid: &str) -> TestKey {
        use base64::Engine;
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        TestKey {
            alg: Algorithm::EdDSA,
            kid: kid.to_string(),
            encoding: EncodingKey::from_ed_der(&pair.serialize_der()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}),
        }
    }

    /// A token with `claims`, naming this key's `kid` (or none).
    pub(super) fn sign_with_kid(&self, claims: &Value, kid: bool) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.then(|| self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    pub(super) fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(claims, true)
    }
}

/// A JWKS document with `keys`.
pub(super) fn jwks(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

pub(super) fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims of a token valid for an hour.
pub(super) fn claims(iss: &str, sub: &str, aud: &str) -> Value {
    json!({"iss": iss, "sub": sub, "aud": aud, "exp": now() + 3600, "iat": now()})
}
