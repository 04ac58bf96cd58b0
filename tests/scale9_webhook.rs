//! The cost of hostile webhook signature headers and forwarding headers, measured at sizes n,
//! 4n and 16n around the shapes already tested (8,000 `v1` entries): many timestamps, many
//! entries of other versions, unknown keys, long numbers, long signatures, long
//! `X-Forwarded-For` chains. Each must cost time about linear in the header (a ratio well under
//! 40 between 16n and n) and never panic.
#![cfg(feature = "full")]

use crate::cost_common::{fastest, ratio, scaling};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use sturdy::webhook::{
    sign_standard, sign_stripe, Encoding, GenericHmac, SourceAllowlist, StandardWebhooks, Stripe,
    Verifier,
};

const NOW: i64 = 1_700_000_000;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn at(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
}

fn headers(pairs: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn check(name: &str, t: &[Duration; 3]) {
    eprintln!("{name}: {t:?}, ratio {:.1}", ratio(t));
    assert!(ratio(t) < 40.0, "{name}: {t:?}");
}

#[test]
fn stripe_headers_of_many_entries_are_linear() {
    let body = br#"{"id":"evt_1"}"#;
    let v = Stripe::new("sk").unwrap();
    let good = sign_stripe("sk", NOW, body);
    let v1 = good.split_once(',').unwrap().1.to_owned();
    // Many timestamps (each one parsed; the last wins), then the real one and its signature.
    let many_t = |n: usize| format!("{}t={NOW},{v1}", format!("t={NOW},").repeat(n / 13));
    // Many keys Stripe does not define.
    let unknown = |n: usize| format!("t={NOW},{}{v1}", "x=abcdef,".repeat(n / 9));
    // Many `v0` entries (Stripe's test-mode scheme), which are skipped.
    let v0 = |n: usize| {
        format!(
            "t={NOW},{}{v1}",
            format!("v0={},", "a".repeat(64)).repeat(n / 68)
        )
    };
    let shapes: [(&str, &dyn Fn(usize) -> String); 3] = [
        ("many t", &many_t),
        ("unknown keys", &unknown),
        ("v0 entries", &v0),
    ];
    for (name, make) in shapes {
        let t = scaling(4 * 1024, |n| {
            let h = headers(&[("stripe-signature", make(n))]);
            fastest(5, || {
                let out = v.verify(&h, body, at(NOW)).unwrap();
                assert_eq!(out.id.as_deref(), Some("evt_1"));
            })
        });
        check(&format!("Stripe {name}"), &t);
    }
}

/// A timestamp of thousands of leading zeros is the same number: parsed in linear time (the
/// MAC would cover the raw text, so a wrong tag of the right length is a 401).
#[test]
fn stripe_timestamp_with_leading_zeros_is_linear() {
    let body = b"{}";
    let v = Stripe::new("sk").unwrap();
    let t = scaling(4 * 1024, |n| {
        let ts_raw = format!("{}{NOW}", "0".repeat(n));
        let h = headers(&[(
            "stripe-signature",
            format!("t={ts_raw},v1={}", "00".repeat(32)),
        )]);
        fastest(5, || {
            assert!(v.check_headers(&h, at(NOW)).is_ok());
            assert_eq!(v.verify(&h, body, at(NOW)).unwrap_err().status, 401);
        })
    });
    check("Stripe long zero-padded t", &t);
}

#[test]
fn standard_headers_of_other_versions_are_linear() {
    let body = br#"{"type":"x"}"#;
    let v = StandardWebhooks::new(SECRET).unwrap();
    let good = sign_standard(SECRET, "msg_1", NOW, body).unwrap();
    let t = scaling(4 * 1024, |n| {
        // Entries of another version (skipped), then malformed ones, then the good one.
        let sig = format!(
            "{}{}{good}",
            "v2,AAAA ".repeat(n / 16),
            "nocomma ".repeat(n / 16)
        );
        let h = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", NOW.to_string()),
            ("webhook-signature", sig),
        ]);
        fastest(5, || {
            assert!(v.verify(&h, body, at(NOW)).is_ok());
        })
    });
    check("Standard other versions", &t);
}

/// A `webhook-timestamp` of thousands of digits (out of range), and one of leading zeros (in
/// range): refused or checked in linear time.
#[test]
fn standard_long_timestamps_are_linear() {
    let v = StandardWebhooks::new(SECRET).unwrap();
    for (name, make) in [
        ("nines", (|n: usize| "9".repeat(n)) as fn(usize) -> String),
        ("zeros", |n: usize| format!("{}{NOW}", "0".repeat(n))),
    ] {
        let t = scaling(4 * 1024, |n| {
            let h = headers(&[
                ("webhook-id", "msg_1".into()),
                ("webhook-timestamp", make(n)),
                ("webhook-signature", "v1,AAAA".into()),
            ]);
            fastest(5, || {
                let _ = v.check_headers(&h, at(NOW));
            })
        });
        check(&format!("Standard timestamp {name}"), &t);
    }
}

/// A generic scheme's signature of many kilobytes, hex and base64: decoded once, refused with
/// 400 before any MAC (it is not the 32 bytes of an HMAC-SHA256).
#[test]
fn generic_long_signatures_are_linear() {
    for enc in [Encoding::Hex, Encoding::Base64] {
        let v = GenericHmac::new("acme", HeaderName::from_static("x-sig"), "s3cret")
            .unwrap()
            .with_prefix("sha256=")
            .with_encoding(enc);
        let t = scaling(4 * 1024, |n| {
            let h = headers(&[("x-sig", format!("sha256={}", "ab".repeat(n / 2)))]);
            fastest(5, || {
                assert_eq!(v.verify(&h, b"{}", at(NOW)).unwrap_err().status, 400);
            })
        });
        check(&format!("generic {enc:?}"), &t);
    }
}

/// `X-Forwarded-For` and `Forwarded` chains from a trusted proxy: empty entries (which count no
/// hop), and trusted hops past the hop bound.
#[test]
fn forwarded_chains_are_linear() {
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let xff = SourceAllowlist::new(["192.0.2.0/24"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let fwd = xff
        .clone()
        .with_forwarded_header(sturdy::webhook::ForwardedHeader::Forwarded);
    let shapes: [(&str, &SourceAllowlist, &str, fn(usize) -> String); 3] = [
        ("empty XFF entries", &xff, "x-forwarded-for", |n| {
            format!("192.0.2.7{}", ", ".repeat(n / 2))
        }),
        ("trusted XFF hops", &xff, "x-forwarded-for", |n| {
            format!("192.0.2.7{}", ", 10.0.0.9".repeat(n / 10))
        }),
        ("Forwarded pairs", &fwd, "forwarded", |n| {
            format!("{}for=192.0.2.7", "a=b;".repeat(n / 4))
        }),
    ];
    for (name, list, header, make) in shapes {
        let t = scaling(4 * 1024, |n| {
            let h = headers(&[(header, make(n))]);
            fastest(5, || {
                let _ = list.allows(peer, &h);
            })
        });
        check(name, &t);
    }
}
