use super::*;
use crate::discovery::consistent_hash::HashTable;

fn policy(key: HashKey) -> HashPolicy {
    HashPolicy {
        key,
        table: HashTable::RingHash {
            minimum_ring_size: 1024,
        },
    }
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn hash(key: HashKey, uri: &str, headers: &[(&str, &str)]) -> RequestHash {
    let p = parts(uri, headers);
    request_hash(
        &policy(key),
        &KeyedRequest {
            parts: &p,
            src: "127.0.0.1:41000".parse().unwrap(),
            source_ip: "10.0.0.7".parse().unwrap(),
        },
    )
}

#[test]
fn each_source_hashes_its_value_and_a_missing_key_hashes_nothing() {
    let header = || HashKey::Header {
        name: "x-user".into(),
    };
    let a = hash(header(), "/", &[("x-user", "alice")]).hash;
    assert_eq!(a, Some(xxh64(b"alice", 0)));
    assert_ne!(a, hash(header(), "/", &[("x-user", "bob")]).hash);
    assert_eq!(hash(header(), "/", &[("x-other", "alice")]).hash, None);

    let query = || HashKey::QueryParameter {
        name: "user".into(),
    };
    assert_eq!(
        hash(query(), "/p?a=1&user=alice&b", &[]).hash,
        Some(xxh64(b"alice", 0))
    );
    assert_eq!(hash(query(), "/p?username=alice", &[]).hash, None);
    assert_eq!(hash(query(), "/p", &[]).hash, None);

    let cookie = |ttl_ms| HashKey::Cookie {
        name: "session".into(),
        path: Some("/".into()),
        ttl_ms,
    };
    let sent = hash(
        cookie(Some(1000)),
        "/",
        &[("cookie", "a=1; session=\"abc\""), ("cookie", "b=2")],
    );
    assert_eq!(sent.hash, Some(xxh64(b"abc", 0)));
    assert!(sent.set_cookie.is_none(), "the client has one: none is set");
    assert_eq!(
        hash(cookie(None), "/", &[("cookie", "other=1")]).hash,
        None,
        "no ttl: no cookie is made up"
    );

    let ip = hash(HashKey::SourceIp, "/", &[]).hash;
    assert_eq!(ip, Some(source_hash("10.0.0.7".parse().unwrap())));
    assert_eq!(
        source_hash("::ffff:10.0.0.7".parse().unwrap()),
        source_hash("10.0.0.7".parse().unwrap())
    );
    assert_eq!(
        connection_hash(
            Some(&policy(HashKey::SourceIp)),
            "10.0.0.7".parse().unwrap()
        ),
        ip
    );
    assert_eq!(
        connection_hash(Some(&policy(header())), "10.0.0.7".parse().unwrap()),
        None
    );
}

#[test]
fn a_missing_cookie_with_a_ttl_is_made_up_hashed_and_set() {
    let made = hash(
        HashKey::Cookie {
            name: "session".into(),
            path: Some("/cart".into()),
            ttl_ms: Some(3_600_500),
        },
        "/",
        &[],
    );
    let set = made.set_cookie.unwrap();
    let set = set.to_str().unwrap();
    let value = set
        .strip_prefix("session=")
        .and_then(|v| v.split(';').next())
        .unwrap();
    assert_eq!(value.len(), 16);
    assert_eq!(made.hash, Some(xxh64(value.as_bytes(), 0)));
    assert_eq!(
        set,
        format!("session={value}; Max-Age=3601; Path=/cart; HttpOnly")
    );
    // Sending it back hashes the same.
    let back = hash(
        HashKey::Cookie {
            name: "session".into(),
            path: None,
            ttl_ms: Some(1),
        },
        "/",
        &[("cookie", &format!("session={value}"))],
    );
    assert_eq!(back.hash, made.hash);
    // A ttl of 0: a session cookie (no Max-Age).
    let session = hash(
        HashKey::Cookie {
            name: "s".into(),
            path: None,
            ttl_ms: Some(0),
        },
        "/",
        &[],
    );
    let text = session.set_cookie.unwrap();
    assert!(!text.to_str().unwrap().contains("Max-Age"), "{text:?}");
}
