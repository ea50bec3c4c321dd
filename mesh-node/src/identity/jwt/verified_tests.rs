//! Tokens kept as verified: answered again only with the same keys and rule, still
//! expiring on time, never kept when bad, and bounded.

use jsonwebtoken::Algorithm;
use serde_json::json;

use super::{
    test_keys::*,
    tokens_tests::{backend, bearer, invalid, parts, policy, ISS},
    verified::MAX_TOKENS,
    *,
};

fn valid(a: Authentication) -> RequestAuth {
    match a {
        Authentication::Valid(auth) => auth,
        other => panic!("expected Valid, got {other:?}"),
    }
}

fn with_token(token: &str) -> http::request::Parts {
    parts("/", &[("authorization", &bearer(token))])
}

#[test]
fn a_token_sent_again_is_kept_and_answered_the_same() {
    let key = TestKey::ec("k", Algorithm::ES256);
    let s = policy(&[&key], json!({}));
    let jwt = JwtAuthenticator::new();
    let token = key.sign(&claims(ISS, "alice", "api"));
    let first = valid(jwt.authenticate(&s, &backend(), &mut with_token(&token)));
    assert_eq!(jwt.verified_tokens(), 1);
    let mut p = with_token(&token);
    let again = valid(jwt.authenticate(&s, &backend(), &mut p));
    assert_eq!(first, again);
    // Answered from the cache, the request is still rewritten: the token removed.
    assert!(p.headers.get("authorization").is_none());
    assert_eq!(jwt.verified_tokens(), 1);
}

#[test]
fn a_kept_token_still_expires_on_time() {
    let key = TestKey::ec("k", Algorithm::ES256);
    let s = policy(&[&key], json!({}));
    let jwt = JwtAuthenticator::new();
    // Valid for one more second, by the clock skew allowed.
    let mut c = claims(ISS, "alice", "api");
    c["exp"] = json!(now() - keys::CLOCK_SKEW_SECS as i64);
    let token = key.sign(&c);
    valid(jwt.authenticate(&s, &backend(), &mut with_token(&token)));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let why = invalid(jwt.authenticate(&s, &backend(), &mut with_token(&token)));
    assert!(why.contains("expired"), "{why}");
    assert_eq!(jwt.verified_tokens(), 0, "an expired token is let go");
}

#[test]
fn a_kept_token_is_judged_again_under_new_keys_and_audiences() {
    let (old, new) = (
        TestKey::ec("old", Algorithm::ES256),
        TestKey::ec("new", Algorithm::ES256),
    );
    let jwt = JwtAuthenticator::new();
    let token = old.sign(&claims(ISS, "alice", "api"));
    let before = policy(&[&old], json!({}));
    valid(jwt.authenticate(&before, &backend(), &mut with_token(&token)));
    // The issuer's keys rotated: the old key is gone.
    let rotated = policy(&[&new], json!({}));
    let why = invalid(jwt.authenticate(&rotated, &backend(), &mut with_token(&token)));
    assert!(why.contains("no key"), "{why}");
    // The rule now wants another audience.
    let other_audience = policy(&[&old], json!({"audiences": ["billing"]}));
    let why = invalid(jwt.authenticate(&other_audience, &backend(), &mut with_token(&token)));
    assert!(why.contains("audiences"), "{why}");
    // And the first rule still takes it.
    valid(jwt.authenticate(&before, &backend(), &mut with_token(&token)));
}

#[test]
fn bad_tokens_are_never_kept_and_good_ones_are_bounded() {
    let (key, stranger) = (
        TestKey::ec("k", Algorithm::ES256),
        TestKey::ec("k", Algorithm::ES256),
    );
    let s = policy(&[&key], json!({}));
    let jwt = JwtAuthenticator::new();
    for n in 0..50 {
        let forged = stranger.sign(&claims(ISS, &format!("mallory-{n}"), "api"));
        let why = invalid(jwt.authenticate(&s, &backend(), &mut with_token(&forged)));
        assert!(why.contains("signature"), "{why}");
    }
    assert_eq!(jwt.verified_tokens(), 0);
    let mut last = String::new();
    for n in 0..MAX_TOKENS + 50 {
        last = key.sign(&claims(ISS, &format!("user-{n}"), "api"));
        valid(jwt.authenticate(&s, &backend(), &mut with_token(&last)));
    }
    assert_eq!(jwt.verified_tokens(), MAX_TOKENS);
    assert!(
        jwt.verified.issuer_of(&last).is_some(),
        "the newest is kept"
    );
    // Large tokens fill the byte bound before the count bound.
    let filler = "x".repeat(5 * 1024);
    for n in 0..100 {
        let mut c = claims(ISS, &format!("big-{n}"), "api");
        c["filler"] = json!(filler);
        let token = key.sign(&c);
        valid(jwt.authenticate(&s, &backend(), &mut with_token(&token)));
    }
    let kept = jwt.verified_tokens();
    assert!(
        kept < 100,
        "{kept} tokens of about 21 KB each (token and claims) kept within 1 MiB"
    );
}
