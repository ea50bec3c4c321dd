//! Tokens already verified, so that a client sending the same token on every request
//! pays for one signature check, not one per request (Envoy's JWT cache does the same).
//!
//! An entry is used only with the very keys and the rule (issuer, audiences) it was
//! verified by: new keys (a `jwksUri` refreshed, a policy changed) or another rule
//! verify the token again. `exp` and `nbf` are checked again on every use, as a full
//! verification would. Only valid tokens are kept, and within a bound of entries and
//! bytes: a client cannot grow it with bad tokens, and many good ones only evict each
//! other (the oldest first), costing a full verification each, never memory.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use serde_json::{Map, Value};

use crate::{
    discovery::jwks::Jwks,
    discovery::request_auth::CompiledJwtRule,
    identity::jwt::{keys, keys::CLOCK_SKEW_SECS, Rejection},
};

/// Tokens kept at most.
pub const MAX_TOKENS: usize = 1024;
/// Bytes kept at most (each token counted twice: its text and its decoded claims).
pub const MAX_BYTES: usize = 1024 * 1024;

struct Verified {
    /// The keys it was verified with: held, so that the allocation (compared by
    /// address) cannot be reused by other keys while the entry lives.
    keys: Arc<Jwks>,
    issuer: String,
    audiences: Vec<String>,
    claims: Arc<Map<String, Value>>,
    exp: Option<u64>,
    nbf: Option<u64>,
    bytes: usize,
}

impl Verified {
    fn verified_by(&self, rule: &CompiledJwtRule, keys: &Arc<Jwks>) -> bool {
        Arc::ptr_eq(&self.keys, keys)
            && self.issuer == rule.issuer
            && self.audiences == rule.audiences
    }

    /// `exp`/`nbf` at `now`, as `keys::verify` judges them.
    fn in_time(&self, now: u64) -> Result<(), Rejection> {
        if self
            .exp
            .is_some_and(|exp| exp < now.saturating_sub(CLOCK_SKEW_SECS))
        {
            return Err(Rejection::Expired);
        }
        if self.nbf.is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECS) {
            return Err(Rejection::NotYetValid);
        }
        Ok(())
    }
}

#[derive(Default)]
struct Tokens {
    by_token: HashMap<Box<str>, Verified>,
    /// Insertion order, for eviction.
    order: VecDeque<Box<str>>,
    bytes: usize,
}

impl Tokens {
    fn remove(&mut self, token: &str) {
        if let Some(v) = self.by_token.remove(token) {
            self.bytes -= v.bytes;
            self.order.retain(|t| &**t != token);
        }
    }

    fn insert(&mut self, token: &str, entry: Verified) {
        self.remove(token);
        while !self.order.is_empty()
            && (self.by_token.len() >= MAX_TOKENS || self.bytes + entry.bytes > MAX_BYTES)
        {
            if let Some(oldest) = self.order.pop_front() {
                if let Some(v) = self.by_token.remove(&oldest) {
                    self.bytes -= v.bytes;
                }
            }
        }
        if entry.bytes > MAX_BYTES {
            return;
        }
        self.bytes += entry.bytes;
        self.order.push_back(token.into());
        self.by_token.insert(token.into(), entry);
    }
}

/// The node's verified tokens.
#[derive(Default)]
pub struct VerifiedTokens {
    tokens: Mutex<Tokens>,
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A time claim as the verification reads it: absent, or seconds as an unsigned
/// integer; None when it is anything else (such a token is not kept).
fn time_claim(claims: &Map<String, Value>, name: &str) -> Option<Option<u64>> {
    match claims.get(name) {
        None => Some(None),
        Some(v) => v.as_u64().map(Some),
    }
}

impl VerifiedTokens {
    fn lock(&self) -> MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The issuer of `token` if it is kept as verified: it needs no decoding to pick
    /// its rules.
    pub(crate) fn issuer_of(&self, token: &str) -> Option<String> {
        self.lock().by_token.get(token).map(|v| v.issuer.clone())
    }

    /// Tokens kept now.
    pub fn len(&self) -> usize {
        self.lock().by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `keys::verify`, answered from the tokens already verified with these `keys` by
    /// this `rule` when it can be.
    pub(crate) fn verify(
        &self,
        token: &str,
        rule: &CompiledJwtRule,
        keys: &Arc<Jwks>,
    ) -> Result<Arc<Map<String, Value>>, Rejection> {
        {
            let mut tokens = self.lock();
            if let Some(v) = tokens.by_token.get(token) {
                if v.verified_by(rule, keys) {
                    return match v.in_time(now()) {
                        Ok(()) => Ok(v.claims.clone()),
                        Err(why) => {
                            tokens.remove(token);
                            Err(why)
                        }
                    };
                }
            }
        }
        let claims = Arc::new(keys::verify(token, rule, keys)?);
        if let (Some(exp), Some(nbf)) = (time_claim(&claims, "exp"), time_claim(&claims, "nbf")) {
            let payload = token.split('.').nth(1).map_or(0, str::len);
            self.lock().insert(
                token,
                Verified {
                    keys: keys.clone(),
                    issuer: rule.issuer.clone(),
                    audiences: rule.audiences.clone(),
                    claims: claims.clone(),
                    exp,
                    nbf,
                    bytes: token.len() + 2 * payload,
                },
            );
        }
        Ok(claims)
    }
}
