//! Outside round s68: `sturdy-webhook` verifying what the real sender libraries sign (the npm
//! packages `standardwebhooks` and `stripe`, through `interop/sign.js`): secrets of odd lengths
//! and forms, rotation with one valid signature among many, the tolerance edges, byte-for-byte
//! agreement of sturdy's own signers. `STURDY_INTEROP_NODE_DIR` names the directory holding
//! `sign.js`; without it every test returns early.
use crate::interop_common::sign;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_standard, sign_stripe, MemoryQueue, MemoryReceiver, StandardWebhooks, Stripe,
    WebhookReceiver,
};
use tower::ServiceExt;

const NODE_DIR: &str = "STURDY_INTEROP_NODE_DIR";
const NOW: i64 = 1_700_000_000;

#[derive(Debug)]
struct Fixed(SystemTime);

impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn clock() -> Arc<dyn WallClock> {
    Arc::new(Fixed(UNIX_EPOCH + Duration::from_secs(NOW as u64)))
}

/// A seeded splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Standard base64 with padding.
fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn standard(verifier: StandardWebhooks) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(1_000);
    (
        WebhookReceiver::new(verifier, queue).with_clock(clock()),
        events,
    )
}

fn stripe(verifier: Stripe) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(1_000);
    (
        WebhookReceiver::new(verifier, queue).with_clock(clock()),
        events,
    )
}

async fn deliver_standard(
    r: &WebhookReceiver<MemoryQueue>,
    id: &str,
    ts: i64,
    sig: &str,
    body: &str,
) -> StatusCode {
    let req = Request::post("/wh")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), r.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap()
        .status()
}

async fn deliver_stripe(r: &WebhookReceiver<MemoryQueue>, sig: &str, body: &str) -> StatusCode {
    let req = Request::post("/wh")
        .header("stripe-signature", sig)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), r.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap()
        .status()
}

/// Secrets of every length from 1 to 80 bytes (seeded random bytes), with and without the
/// `whsec_` prefix: the real library's signatures verify, sturdy's own signer gives the same
/// value, and the unpadded form of the secret (documented as accepted) verifies them too.
#[tokio::test]
async fn interop_s68_standard_secrets_of_odd_lengths() {
    let dir = peer_or_skip!(NODE_DIR);
    let mut rng = Rng(68);
    let mut secrets = Vec::new();
    for len in 1..=80usize {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let enc = b64(&bytes);
        secrets.push(if len % 2 == 0 {
            format!("whsec_{enc}")
        } else {
            enc
        });
    }
    let body = "{\"type\":\"odd\",\"ü\":\"✓\"}";
    let cases: Vec<_> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"scheme":"standard","secret":s,"id":format!("msg_len{i}"),"timestamp":NOW,"payload":body})
        })
        .collect();
    let sigs = sign(&dir, &json!(cases));
    for (i, (secret, sig)) in secrets.iter().zip(&sigs).enumerate() {
        let id = format!("msg_len{i}");
        assert_eq!(
            &sign_standard(secret, &id, NOW, body.as_bytes()).unwrap(),
            sig,
            "secret of {} bytes",
            i + 1
        );
        let (r, mut events) = standard(StandardWebhooks::new(secret).unwrap());
        assert_eq!(
            deliver_standard(&r, &id, NOW, sig, body).await,
            StatusCode::OK,
            "secret {secret}"
        );
        let e = events.try_recv().unwrap();
        assert_eq!(&e.body[..], body.as_bytes());
        let unpadded = secret.trim_end_matches('=');
        let (r, _e) = standard(StandardWebhooks::new(unpadded).unwrap());
        assert_eq!(
            deliver_standard(&r, &id, NOW, sig, body).await,
            StatusCode::OK,
            "unpadded secret {unpadded}"
        );
    }
}

/// Rotation: one valid signature among many from the real library (its own multi-entry
/// header joined), at every position within the first 16; the verifier holding only one of the
/// secrets, or several.
#[tokio::test]
async fn interop_s68_one_valid_among_many() {
    let dir = peer_or_skip!(NODE_DIR);
    let mut rng = Rng(6868);
    let secrets: Vec<String> = (0..16)
        .map(|_| {
            let b: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
            format!("whsec_{}", b64(&b))
        })
        .collect();
    let body = r#"{"rotation":true}"#;
    let cases: Vec<_> = secrets
        .iter()
        .map(|s| json!({"scheme":"standard","secret":s,"id":"msg_rot","timestamp":NOW,"payload":body}))
        .collect();
    let sigs = sign(&dir, &json!(cases));
    let header = sigs.join(" ");
    for (i, secret) in secrets.iter().enumerate() {
        let (r, _e) = standard(StandardWebhooks::new(secret).unwrap());
        assert_eq!(
            deliver_standard(&r, "msg_rot", NOW, &header, body).await,
            StatusCode::OK,
            "valid entry at position {}",
            i + 1
        );
    }
    let (r, _e) = standard(
        StandardWebhooks::with_secrets([
            "whsec_dGhlIG90aGVyIHNlY3JldCBvZiB0aGUgdGVzdHM=",
            secrets[15].as_str(),
        ])
        .unwrap(),
    );
    assert_eq!(
        deliver_standard(&r, "msg_rot", NOW, &header, body).await,
        StatusCode::OK
    );
    // The 17th entry is past MAX_SIGNATURES: ignored.
    let extra: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
    let seventeenth = format!("whsec_{}", b64(&extra));
    let s17 = sign(
        &dir,
        &json!([{"scheme":"standard","secret":seventeenth,"id":"msg_rot","timestamp":NOW,"payload":body}]),
    );
    let (r, _e) = standard(StandardWebhooks::new(&seventeenth).unwrap());
    assert_eq!(
        deliver_standard(&r, "msg_rot", NOW, &format!("{header} {}", s17[0]), body).await,
        StatusCode::UNAUTHORIZED
    );
}

/// Stripe's real signer: the secret's bytes as they are (unicode, spaces, `whsec_` that looks
/// like base64), sturdy's `sign_stripe` byte for byte the same, rotated secrets joined in one
/// header, and the tolerance edges at a fixed clock.
#[tokio::test]
async fn interop_s68_stripe_secrets_rotation_and_edges() {
    let dir = peer_or_skip!(NODE_DIR);
    let secrets = [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "sécret ✓ with spaces",
        "x",
        "whsec_=",
        &"k".repeat(300),
    ];
    let body = "{\"id\":\"evt_s68\",\"object\":\"event\",\"name\":\"Zoë\"}";
    let offsets = [0i64, -300, 300, -301, 301];
    let mut cases = Vec::new();
    for s in &secrets {
        for off in offsets {
            cases.push(json!({"scheme":"stripe","secret":s,"timestamp":NOW + off,"payload":body}));
        }
    }
    let sigs = sign(&dir, &json!(cases));
    let mut k = 0;
    for s in &secrets {
        let (r, mut events) = stripe(Stripe::new(s).unwrap());
        for off in offsets {
            let sig = &sigs[k];
            k += 1;
            assert_eq!(&sign_stripe(s, NOW + off, body.as_bytes()), sig);
            let want = if off.abs() <= 300 {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(
                deliver_stripe(&r, sig, body).await,
                want,
                "secret {s:?} offset {off}"
            );
        }
        // Stripe's retries of one event are one event.
        assert!(events.try_recv().is_some());
        assert!(events.try_recv().is_none());
    }
    // Rotation: both secrets' v1 entries in one header; each verifier finds its own.
    let a = &sigs[0];
    let b = &sigs[offsets.len()];
    let joined = format!("{a},{}", b.split_once(',').unwrap().1);
    for s in &secrets[..2] {
        let (r, _e) = stripe(Stripe::new(s).unwrap());
        assert_eq!(deliver_stripe(&r, &joined, body).await, StatusCode::OK);
    }
    // A real header plus an undecodable extra `v1` stays valid (stripe-go: "Ignore invalid
    // signatures").
    let (r, _e) = stripe(Stripe::new(secrets[0]).unwrap());
    assert_eq!(
        deliver_stripe(&r, &format!("{a},v1=bad_signature"), body).await,
        StatusCode::OK
    );
    // An empty payload signed by the real library.
    let empty = sign(
        &dir,
        &json!([{"scheme":"stripe","secret":secrets[0],"timestamp":NOW,"payload":""}]),
    );
    assert_eq!(deliver_stripe(&r, &empty[0], "").await, StatusCode::OK);
}

/// The real Standard Webhooks signer at the tolerance edges, with a fixed clock; and a body
/// changed after signing.
#[tokio::test]
async fn interop_s68_standard_edges() {
    let dir = peer_or_skip!(NODE_DIR);
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let body = "{\"n\":1}";
    let offsets = [0i64, -300, 300, -301, 301];
    let cases: Vec<_> = offsets
        .iter()
        .map(|o| json!({"scheme":"standard","secret":secret,"id":format!("msg_e{o}"),"timestamp":NOW + o,"payload":body}))
        .collect();
    let sigs = sign(&dir, &json!(cases));
    let (r, _e) = standard(StandardWebhooks::new(secret).unwrap());
    for (o, sig) in offsets.iter().zip(&sigs) {
        let want = if o.abs() <= 300 {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(
            deliver_standard(&r, &format!("msg_e{o}"), NOW + o, sig, body).await,
            want,
            "offset {o}"
        );
        assert_eq!(
            deliver_standard(&r, &format!("msg_e{o}"), NOW + o, sig, "{\"n\":2}").await,
            StatusCode::UNAUTHORIZED,
        );
    }
}
