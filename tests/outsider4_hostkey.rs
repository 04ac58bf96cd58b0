//! Host keys never hold the `user:password@` part of a URI. RELIABILITY.md: "a request URI
//! with `user:password@` ... keys and messages hold host and port only"; `sturdy::core::key::host`:
//! "the URI's authority (host and port, never the `user:password@` part, which would put a
//! secret in keys, messages and logs), else the `Host` header". PERFORMANCE.md says the scan
//! for '@' now reads eight bytes at a time, so every length and position is tried here.
#![cfg(feature = "full")]

use crate::outsider4_common;
use outsider4_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::key::{host, without_userinfo};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::RetryLayer;
use tower::{Layer, ServiceExt};

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn text(len: usize, salt: usize) -> String {
    (0..len)
        .map(|i| ALNUM[(i * 7 + salt) % ALNUM.len()] as char)
        .collect()
}

/// Every length of userinfo and host up to 40 bytes, '@' at every position.
#[test]
fn without_userinfo_at_every_position() {
    for user in 0..=40 {
        for hostlen in 1..=40 {
            let h = text(hostlen, 3);
            let u = text(user, 5);
            let authority = format!("{u}@{h}");
            assert_eq!(without_userinfo(&authority), h, "{authority:?}");
            // No '@' at all: unchanged.
            let plain = format!("{u}{h}");
            assert_eq!(without_userinfo(&plain), plain, "{plain:?}");
        }
    }
}

/// With a password and a port.
#[test]
fn without_userinfo_with_password_and_port() {
    for user in 1..=20 {
        for pw in 0..=20 {
            for port in ["", ":8443"] {
                let h = format!("api{}.example.com{port}", text(user % 5, 1));
                let authority = format!("{}:{}@{h}", text(user, 2), text(pw, 9));
                assert_eq!(without_userinfo(&authority), h, "{authority:?}");
            }
        }
    }
}

/// Bytes outside ASCII (a `&str` from anywhere, not only `http::Uri`) are neither taken for
/// '@' nor hide one.
#[test]
fn without_userinfo_with_non_ascii_bytes() {
    let odd = [
        "é", "À", "ÿ", "€", "𝄞", "\u{80}", "\u{7f}", "\u{c0}", "\u{100}", "\u{3c0}",
    ];
    for pre in 0..=17 {
        for o in odd {
            let plain = format!("{}{o}{}", text(pre, 1), text(17 - pre, 4));
            assert_eq!(without_userinfo(&plain), plain, "{plain:?}");
            let with = format!("{}{o}@host{}", text(pre, 2), text(pre % 3, 6));
            let expected = &with[with.find('@').unwrap() + 1..];
            assert_eq!(without_userinfo(&with), expected, "{with:?}");
        }
    }
}

/// `host(req)` on URIs with userinfo of every length up to 40.
#[test]
fn host_of_a_uri_with_userinfo() {
    for user in 0..=40 {
        for pw in [0, 1, 7, 8, 9, 16] {
            let secret = text(pw, 11);
            let uri = if pw == 0 {
                format!("http://{}@api.example.com:8080/x", text(user, 1))
            } else {
                format!("http://{}:{secret}@api.example.com:8080/x", text(user, 1))
            };
            let req = get(&uri);
            assert_eq!(host(&req), "api.example.com:8080", "{uri}");
        }
    }
}

/// The `Host` header fallback (a request with a relative URI) also never gives a
/// `user:password@` part.
#[test]
fn host_header_fallback_without_userinfo() {
    let req = http::Request::get("/x")
        .header("host", "api.example.com:8443")
        .body(Body::default())
        .unwrap();
    assert_eq!(host(&req), "api.example.com:8443");
    let req = http::Request::get("/x")
        .header("host", "user:hunter2@api.example.com")
        .body(Body::default())
        .unwrap();
    assert!(
        !host(&req).contains("hunter2"),
        "a secret in the key: {}",
        host(&req)
    );
}

/// End to end: the limiter's and the breaker's keys and the retry layer's message for a URI
/// with a password hold the host only.
#[tokio::test(start_paused = true)]
async fn keys_and_messages_hold_no_password() {
    for len in [1, 7, 8, 9, 15, 16, 17, 31, 32, 33] {
        let secret = format!("pw{}", text(len, 13));
        let uri = format!("http://someone:{secret}@api.example.com/orders");
        let api = Api::always(st_h(429, &[("retry-after", "120")]));
        let (limit, rl) = RateLimitLayer::adaptive_only().pair();
        let (breaker, cb) = CircuitBreakerLayer::new().pair();
        let svc = RetryLayer::new().layer(breaker.layer(limit.layer(api.service())));
        let err = bounded(svc.oneshot(get(&uri))).await.unwrap_err();
        let msg = chain(&*err);
        assert!(!msg.contains(&secret), "{msg}");
        assert_eq!(
            err.to_string(),
            "rate limited by api.example.com; retry after 2m",
            "{len}"
        );
        let paused = rl.paused();
        assert_eq!(paused.len(), 1);
        assert_eq!(paused[0].0, "api.example.com");
        let states = cb.states();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].0, "api.example.com");
    }
}
