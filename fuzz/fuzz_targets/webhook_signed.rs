//! Correctly signed deliveries, whatever their id, timestamp, body and extra signature entries,
//! are always accepted by Standard Webhooks, Stripe and GitHub verifiers (and never panic).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use sturdy_webhook::http::{HeaderMap, HeaderValue};
use sturdy_webhook::{GitHub, StandardWebhooks, Stripe, Verifier};

const STANDARD_SECRET: &[u8] = b"a fixed 24-byte key!....";

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Fixed {
    standard: StandardWebhooks,
    stripe: Stripe,
    github: GitHub,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| Fixed {
        standard: StandardWebhooks::new(&format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(STANDARD_SECRET)
        ))
        .unwrap(),
        stripe: Stripe::new("stripe-secret").unwrap(),
        github: GitHub::new("github-secret").unwrap(),
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // A timestamp within the tolerance of "now", an id, junk entries, and the body.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let ts = 1_700_000_000 - i64::from(data[0] % 200);
    let id_len = usize::from(data[1] % 40).min(data.len() - 2);
    let id: String = data[2..2 + id_len]
        .iter()
        .map(|b| char::from(b'a' + b % 26))
        .collect();
    let junk = usize::from(data[2] % 8);
    let body = &data[2 + id_len..];
    let f = fixed();

    // Standard Webhooks: v1,<base64 of HMAC(secret, "id.ts.body")>, after junk entries.
    let id = if id.is_empty() { "msg".to_owned() } else { id };
    let tag = mac(STANDARD_SECRET, &[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body]);
    let mut sig = String::new();
    for i in 0..junk {
        sig.push_str(&format!("v1,bm90IGEgc2lnbmF0dXJl{i} "));
    }
    sig.push_str("v1,");
    sig.push_str(&base64::engine::general_purpose::STANDARD.encode(&tag));
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(&id).unwrap());
    h.insert("webhook-timestamp", HeaderValue::from_str(&ts.to_string()).unwrap());
    h.insert("webhook-signature", HeaderValue::from_str(&sig).unwrap());
    assert!(f.standard.check_headers(&h, now).is_ok());
    f.standard.verify(&h, body, now).expect("a signed Standard Webhooks delivery");

    // Stripe: t=ts,v1=<hex HMAC(secret, "ts.body")>, junk v1 entries first.
    let tag = mac(b"stripe-secret", &[ts.to_string().as_bytes(), b".", body]);
    let mut sig = format!("t={ts}");
    for _ in 0..junk {
        sig.push_str(",v1=00");
    }
    sig.push_str(&format!(",v1={}", hex(&tag)));
    let mut h = HeaderMap::new();
    h.insert("stripe-signature", HeaderValue::from_str(&sig).unwrap());
    assert!(f.stripe.check_headers(&h, now).is_ok());
    f.stripe.verify(&h, body, now).expect("a signed Stripe delivery");

    // GitHub: sha256=<hex HMAC(secret, body)>.
    let tag = mac(b"github-secret", &[body]);
    let mut h = HeaderMap::new();
    h.insert(
        "x-hub-signature-256",
        HeaderValue::from_str(&format!("sha256={}", hex(&tag))).unwrap(),
    );
    assert!(f.github.check_headers(&h, now).is_ok());
    f.github.verify(&h, body, now).expect("a signed GitHub delivery");
});
