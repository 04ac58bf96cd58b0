//! The public vectors of shared/vectors/STANDARDS.md §1 to §3, as they are, and every way a
//! delivery can be wrong.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sturdy_webhook::{
    decode_standard_secret, sign_github, sign_standard, sign_stripe, Encoding, GenericHmac, GitHub,
    StandardWebhooks, Stripe, Verifier,
};

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

// ===== 1. Standard Webhooks =====

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_TS: u64 = 1_614_265_330;
const SW_BODY: &str = r#"{"test": 2432232314}"#;
const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn sw(sig: &str, ts: &str) -> HeaderMap {
    headers(&[
        ("webhook-id", SW_ID),
        ("webhook-timestamp", ts),
        ("webhook-signature", sig),
    ])
}

#[test]
fn sw1_sign_and_verify() {
    assert_eq!(
        sign_standard(SW_SECRET, SW_ID, SW_TS as i64, SW_BODY.as_bytes()).unwrap(),
        SW_SIG
    );
    assert_eq!(decode_standard_secret(SW_SECRET).unwrap().len(), 24);
    let v = StandardWebhooks::new(SW_SECRET)
        .unwrap()
        .verify(&sw(SW_SIG, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
        .unwrap();
    assert_eq!(v.id.as_deref(), Some(SW_ID));
    assert_eq!(v.timestamp, Some(1_614_265_330));
    // Header names are case-insensitive (http's HeaderMap lowercases them).
    let mut upper = HeaderMap::new();
    upper.insert(
        HeaderName::from_bytes(b"Webhook-Id").unwrap(),
        HeaderValue::from_static(SW_ID),
    );
    upper.insert(
        HeaderName::from_bytes(b"WEBHOOK-TIMESTAMP").unwrap(),
        HeaderValue::from_static("1614265330"),
    );
    upper.insert(
        HeaderName::from_bytes(b"Webhook-Signature").unwrap(),
        HeaderValue::from_static(SW_SIG),
    );
    assert!(StandardWebhooks::new(SW_SECRET)
        .unwrap()
        .verify(&upper, SW_BODY.as_bytes(), at(SW_TS))
        .is_ok());
}

#[test]
fn sw_neg_signatures_are_rejected_without_panicking() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    for sig in [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
    ] {
        let r = v
            .verify(&sw(sig, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
            .unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{sig}");
    }
}

#[test]
fn sw_multi_signature_lists() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    let multi = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    assert!(v
        .verify(&sw(multi, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
        .is_ok());
    let none = "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=";
    assert_eq!(
        v.verify(&sw(none, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
            .unwrap_err()
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Malformed entries are skipped, not fatal.
    let messy = format!("garbage v2 ,, {SW_SIG}");
    assert!(v
        .verify(&sw(&messy, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
        .is_ok());
}

#[test]
fn sw_time_tolerance_both_directions() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    let sign = |ts: u64| sign_standard(SW_SECRET, SW_ID, ts as i64, SW_BODY.as_bytes()).unwrap();
    let now = 1_700_000_000;
    for (ts, ok) in [
        (now, true),
        (now - 300, true),
        (now + 300, true),
        (now - 301, false),
        (now + 301, false),
    ] {
        let r = v.verify(&sw(&sign(ts), &ts.to_string()), SW_BODY.as_bytes(), at(now));
        assert_eq!(r.is_ok(), ok, "ts {ts}");
        if let Err(e) = r {
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        }
    }
    for bad in ["hello", "1614265330.5", "-", "--1", "+1614265330", ""] {
        let r = v
            .verify(&sw(SW_SIG, bad), SW_BODY.as_bytes(), at(SW_TS))
            .unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    // A negative whole number is a well-formed time before 1970: stale, not malformed.
    for old in ["-161426533", "-1", &i64::MIN.to_string()] {
        let r = v
            .verify(&sw(SW_SIG, old), SW_BODY.as_bytes(), at(SW_TS))
            .unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{old:?}");
        assert!(r.reason.contains("old"), "{old:?}: {}", r.reason);
    }
}

#[test]
fn sw_missing_headers_are_400() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let mut h = sw(SW_SIG, "1614265330");
        h.remove(missing);
        assert_eq!(
            v.verify(&h, SW_BODY.as_bytes(), at(SW_TS))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST,
            "{missing}"
        );
    }
}

#[test]
fn sw_secret_parsing() {
    assert!(
        decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok(),
        "without the prefix"
    );
    // Unpadded secrets are accepted (the Python library's behaviour; the choice is ours).
    assert!(decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS").is_ok());
    assert!(decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr").is_ok());
    assert!(decode_standard_secret("").is_err());
    assert!(decode_standard_secret("whsec_").is_err());
    assert!(decode_standard_secret("whsec_!!!").is_err());
    assert!(StandardWebhooks::with_secrets([]).is_err());
}

#[test]
fn every_tampered_byte_is_caught() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    let body = SW_BODY.as_bytes();
    for i in 0..body.len() {
        let mut t = body.to_vec();
        t[i] ^= 0x01;
        assert!(
            v.verify(&sw(SW_SIG, "1614265330"), &t, at(SW_TS)).is_err(),
            "byte {i}"
        );
    }
    // Tampered id and timestamp too.
    let h = headers(&[
        ("webhook-id", "msg_other"),
        ("webhook-timestamp", "1614265330"),
        ("webhook-signature", SW_SIG),
    ]);
    assert!(v.verify(&h, body, at(SW_TS)).is_err());
    assert!(v
        .verify(&sw(SW_SIG, "1614265331"), body, at(SW_TS))
        .is_err());
    // The wrong secret.
    let wrong = StandardWebhooks::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
    assert!(wrong
        .verify(&sw(SW_SIG, "1614265330"), body, at(SW_TS))
        .is_err());
}

#[test]
fn rotation_accepts_old_and_new_secrets() {
    let new = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let both = StandardWebhooks::with_secrets([new, SW_SECRET]).unwrap();
    assert!(both
        .verify(&sw(SW_SIG, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
        .is_ok());
    let sig_new = sign_standard(new, SW_ID, SW_TS as i64, SW_BODY.as_bytes()).unwrap();
    assert!(both
        .verify(&sw(&sig_new, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
        .is_ok());
    let stripe = Stripe::with_secrets(["whsec_old", "whsec_new"]).unwrap();
    let h = headers(&[(
        "stripe-signature",
        &sign_stripe("whsec_old", 1_700_000_000, b"{}"),
    )]);
    assert!(stripe.verify(&h, b"{}", at(1_700_000_000)).is_ok());
}

// ===== 2. Stripe =====

#[test]
fn stripe_round_trip_and_event_id_from_the_body() {
    let body = br#"{"id":"evt_123","type":"charge.succeeded"}"#;
    let now = 1_700_000_000;
    let h = headers(&[(
        "stripe-signature",
        &sign_stripe("whsec_test", now as i64, body),
    )]);
    let v = Stripe::new("whsec_test")
        .unwrap()
        .verify(&h, body, at(now))
        .unwrap();
    assert_eq!(v.id.as_deref(), Some("evt_123"));
    // Stripe keys are the secret's bytes, not base64-decoded.
    assert!(Stripe::new("test")
        .unwrap()
        .verify(&h, body, at(now))
        .is_err());
    // An extra undecodable v1 entry is ignored; a valid one still passes.
    let extra = format!(
        "{},v1=bad_signature",
        sign_stripe("whsec_test", now as i64, body)
    );
    assert!(Stripe::new("whsec_test")
        .unwrap()
        .verify(&headers(&[("stripe-signature", &extra)]), body, at(now))
        .is_ok());
}

#[test]
fn stripe_header_negatives() {
    let s = Stripe::new("whsec_test").unwrap();
    let now = at(1_492_774_577);
    for bad in [
        "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef",
        "t,v1=,v0=",
        "t,v1=,v0",
        "t,v1=,",
        "t,,",
        ",,",
        "t",
        "v1,t=1",
        "t=",
        "bad_header",
    ] {
        let r = s.verify(&headers(&[("stripe-signature", bad)]), b"{}", now).unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    // No header at all.
    assert_eq!(
        s.verify(&HeaderMap::new(), b"{}", now).unwrap_err().status,
        StatusCode::BAD_REQUEST
    );
    // Only a v0 scheme: no v1 signature.
    let v0 = headers(&[(
        "stripe-signature",
        "t=1492774577,v0=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
    )]);
    assert_eq!(
        s.verify(&v0, b"{}", now).unwrap_err().status,
        StatusCode::BAD_REQUEST
    );
    // The docs' example parses, but the secret is not published: it must not verify.
    let docs = headers(&[(
        "stripe-signature",
        "t=1492774577,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
    )]);
    assert_eq!(
        s.verify(&docs, b"{}", now).unwrap_err().status,
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn stripe_tolerance() {
    let body = b"{}";
    let now = 1_700_000_000;
    let h = headers(&[("stripe-signature", &sign_stripe("k", now as i64 - 15, body))]);
    assert!(Stripe::new("k")
        .unwrap()
        .with_tolerance(Duration::from_secs(10))
        .verify(&h, body, at(now))
        .is_err());
    assert!(Stripe::new("k")
        .unwrap()
        .with_tolerance(Duration::from_secs(20))
        .verify(&h, body, at(now))
        .is_ok());
    let future = headers(&[(
        "stripe-signature",
        &sign_stripe("k", now as i64 + 301, body),
    )]);
    assert!(
        Stripe::new("k")
            .unwrap()
            .verify(&future, body, at(now))
            .is_err(),
        "both directions"
    );
}

// ===== 3. GitHub =====

#[test]
fn gh1_vector() {
    let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    assert_eq!(
        sign_github("It's a Secret to Everybody", b"Hello, World!"),
        sig
    );
    let h = headers(&[
        ("x-hub-signature-256", sig),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
    ]);
    let v = GitHub::new("It's a Secret to Everybody")
        .unwrap()
        .verify(&h, b"Hello, World!", at(0))
        .unwrap();
    // GitHub signs the body only: the dedup id is a digest of it, and the (unsigned) delivery
    // id is carried as a header.
    assert_eq!(
        v.id.as_deref(),
        Some("sha256:dffd6021bb2bd5b0af676290809ec3a53191dd81c7f70a4b28688a362182986f")
    );
    assert_eq!(
        v.headers["x-github-delivery"],
        "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    );
    assert_eq!(v.timestamp, None);
    assert!(GitHub::new("It's a Secret to Everybody")
        .unwrap()
        .verify(&h, b"Hello, World!\n", at(0))
        .is_err());
    for bad in ["757107ea", "sha1=abc", "sha256=zz", "sha256=abc"] {
        let r = GitHub::new("x")
            .unwrap()
            .verify(&headers(&[("x-hub-signature-256", bad)]), b"", at(0))
            .unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

// ===== Generic =====

#[test]
fn generic_hmac_with_timestamp_and_base64() {
    use base64::Engine as _;
    use hmac::Mac as _;
    let body = b"{\"n\":1}";
    let ts = "1700000000";
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"k").unwrap();
    m.update(ts.as_bytes());
    m.update(b".");
    m.update(body);
    let sig = format!(
        "hmac={}",
        base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
    );
    let v = GenericHmac::new("acme", HeaderName::from_static("x-acme-signature"), "k")
        .unwrap()
        .with_prefix("hmac=")
        .with_encoding(Encoding::Base64)
        .with_timestamp_header(HeaderName::from_static("x-acme-timestamp"))
        .with_event_header(HeaderName::from_static("x-acme-event"));
    let h = headers(&[
        ("x-acme-signature", &sig),
        ("x-acme-timestamp", ts),
        ("x-acme-event", "e1"),
    ]);
    let ok = v.verify(&h, body, at(1_700_000_000)).unwrap();
    assert_eq!(v.scheme(), "acme");
    assert_eq!(ok.timestamp, Some(1_700_000_000));
    assert_eq!(ok.headers["x-acme-event"], "e1");
    assert_eq!(ok.headers["x-acme-timestamp"], ts);
    // The event header is not signed: the id is a digest of the signed `timestamp.body`.
    let digest = {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(format!("{ts}.{{\"n\":1}}"));
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(ok.id, Some(format!("sha256:{digest}")));
    assert_eq!(
        v.verify(&h, body, at(1_700_001_000)).unwrap_err().status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        v.verify(&h, b"{}", at(1_700_000_000)).unwrap_err().status,
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn debug_never_shows_secrets() {
    let d = format!(
        "{:?} {:?} {:?} {:?}",
        StandardWebhooks::new(SW_SECRET).unwrap(),
        Stripe::new("whsec_stripe_secret").unwrap(),
        GitHub::new("gh-secret").unwrap(),
        GenericHmac::new("g", HeaderName::from_static("x-s"), "generic-secret").unwrap()
    );
    for s in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_stripe_secret",
        "gh-secret",
        "generic-secret",
    ] {
        assert!(!d.contains(s), "{d}");
    }
}

// ===== What each scheme signs, deduplicates on and carries =====

#[test]
fn empty_secrets_are_refused_with_a_clear_error() {
    let x = HeaderName::from_static("x-sig");
    let errors = [
        Stripe::new("").unwrap_err(),
        Stripe::with_secrets(["ok", ""]).unwrap_err(),
        Stripe::with_secrets([]).unwrap_err(),
        GitHub::new("").unwrap_err(),
        GitHub::with_secrets(["", "ok"]).unwrap_err(),
        GitHub::with_secrets([]).unwrap_err(),
        GenericHmac::new("g", x.clone(), "").unwrap_err(),
        GenericHmac::with_secrets("g", x.clone(), ["ok", ""]).unwrap_err(),
        GenericHmac::new("", x, "ok").unwrap_err(),
        StandardWebhooks::new("").unwrap_err(),
        StandardWebhooks::new("whsec_").unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.kind(), &sturdy_core::ErrorKind::Config, "{e}");
        assert!(
            e.to_string().contains("secret") || e.to_string().contains("name"),
            "{e}"
        );
    }
    assert!(Stripe::new("")
        .unwrap_err()
        .to_string()
        .contains("anyone could sign"));
}

#[test]
fn a_github_copy_under_a_new_delivery_id_has_the_same_dedup_id() {
    let gh = GitHub::new("s").unwrap();
    let body = br#"{"action":"opened"}"#;
    let sig = sign_github("s", body);
    let first = headers(&[("x-hub-signature-256", &sig), ("x-github-delivery", "d-1")]);
    let copy = headers(&[("x-hub-signature-256", &sig), ("x-github-delivery", "d-2")]);
    let a = gh.verify(&first, body, at(0)).unwrap();
    let b = gh.verify(&copy, body, at(0)).unwrap();
    assert_eq!(a.id, b.id);
    assert_ne!(a.headers, b.headers);
    // Another body is another event.
    let other = br#"{"action":"closed"}"#;
    let c = gh
        .verify(
            &headers(&[("x-hub-signature-256", &sign_github("s", other))]),
            other,
            at(0),
        )
        .unwrap();
    assert_ne!(a.id, c.id);
}

#[test]
fn stripe_dedups_on_the_signed_event_id_and_carries_the_timestamp() {
    let s = Stripe::new("k").unwrap();
    let body = br#"{"id":"evt_1","object":"event","data":{"object":{"id":"ch_1"}}}"#;
    let now = 1_700_000_000;
    // Stripe's retry of one event is signed again, later: same event id.
    let first = s
        .verify(
            &headers(&[("stripe-signature", &sign_stripe("k", now, body))]),
            body,
            at(now as u64),
        )
        .unwrap();
    let retry = s
        .verify(
            &headers(&[("stripe-signature", &sign_stripe("k", now + 60, body))]),
            body,
            at(now as u64 + 60),
        )
        .unwrap();
    assert_eq!(first.id.as_deref(), Some("evt_1"));
    assert_eq!(retry.id, first.id);
    assert_eq!(first.timestamp, Some(now));
    assert_eq!(
        first.fresh_until,
        Some(at(now as u64 + 301)),
        "acceptable until the tolerance runs out (ages are whole seconds: 300.9 s reads as 300)"
    );
    assert!(first.headers.contains_key("stripe-signature"));
    // No usable id: a digest of the signed `t.body`, so another timestamp is another event.
    for body in [&b"[1]"[..], br#"{"id":7}"#, br#"{"id":""}"#] {
        let a = s
            .verify(
                &headers(&[("stripe-signature", &sign_stripe("k", now, body))]),
                body,
                at(now as u64),
            )
            .unwrap();
        let b = s
            .verify(
                &headers(&[("stripe-signature", &sign_stripe("k", now + 1, body))]),
                body,
                at(now as u64),
            )
            .unwrap();
        assert!(a.id.as_deref().unwrap().starts_with("sha256:"));
        assert_ne!(a.id, b.id);
    }
    let long = format!(r#"{{"id":"{}"}}"#, "e".repeat(300));
    let v = s
        .verify(
            &headers(&[("stripe-signature", &sign_stripe("k", now, long.as_bytes()))]),
            long.as_bytes(),
            at(now as u64),
        )
        .unwrap();
    assert!(
        v.id.unwrap().starts_with("sha256:"),
        "an overlong id is not kept"
    );
}

#[test]
fn standard_carries_its_ids_and_refuses_overlong_ids() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    let ok = v
        .verify(&sw(SW_SIG, "1614265330"), SW_BODY.as_bytes(), at(SW_TS))
        .unwrap();
    assert_eq!(ok.headers["webhook-id"], SW_ID);
    assert_eq!(ok.headers["webhook-timestamp"], "1614265330");
    assert_eq!(ok.headers.len(), 2, "the signature is not carried");
    let long = "m".repeat(257);
    let sig = sign_standard(SW_SECRET, &long, SW_TS as i64, SW_BODY.as_bytes()).unwrap();
    let h = headers(&[
        ("webhook-id", &long),
        ("webhook-timestamp", "1614265330"),
        ("webhook-signature", &sig),
    ]);
    assert_eq!(
        v.verify(&h, SW_BODY.as_bytes(), at(SW_TS))
            .unwrap_err()
            .status,
        StatusCode::BAD_REQUEST
    );
}

#[test]
fn headers_are_checked_on_their_own() {
    let v = StandardWebhooks::new(SW_SECRET).unwrap();
    assert!(v
        .check_headers(&sw(SW_SIG, "1614265330"), at(SW_TS))
        .is_ok());
    assert_eq!(
        v.check_headers(&HeaderMap::new(), at(SW_TS))
            .unwrap_err()
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        v.check_headers(&sw(SW_SIG, "1614265330"), at(SW_TS + 301))
            .unwrap_err()
            .status,
        StatusCode::UNAUTHORIZED,
        "stale, without the body"
    );
    let gh = GitHub::new("s").unwrap();
    assert!(gh.check_headers(&HeaderMap::new(), at(0)).is_err());
    let s = Stripe::new("k").unwrap();
    assert!(s
        .check_headers(&headers(&[("stripe-signature", "t=1")]), at(1))
        .is_err());
}
