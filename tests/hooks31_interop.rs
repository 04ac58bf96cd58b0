//! The real signers (`standardwebhooks` and `stripe` npm packages, through `interop/sign.js`)
//! against sturdy's verifiers: the tolerance at its edges on a fixed clock, bodies of every
//! shape, rotation with both secrets' entries in one header. Skips unless
//! `STURDY_INTEROP_NODE_DIR` names the directory of `sign.js` and its `node_modules`.
#![cfg(feature = "full")]

use std::io::Write;
use std::process::{Command, Stdio};

use http::{HeaderMap, HeaderValue};
use serde_json::json;
use sturdy::webhook::{sign_standard, sign_stripe, StandardWebhooks, Stripe, Verifier};

use crate::hooks31_util::{at, STD_OTHER, STD_SECRET, STRIPE_SECRET};

const NOW: i64 = 1_800_000_000;

fn node_dir() -> Option<String> {
    match std::env::var("STURDY_INTEROP_NODE_DIR") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("STURDY_INTEROP").as_deref() == Ok("1") {
                panic!("STURDY_INTEROP=1 but STURDY_INTEROP_NODE_DIR is not set");
            }
            eprintln!("skipped: STURDY_INTEROP_NODE_DIR is not set (scripts/interop.sh)");
            None
        }
    }
}

fn sign(dir: &str, cases: &serde_json::Value) -> Vec<String> {
    let mut child = Command::new("node")
        .arg(format!("{dir}/sign.js"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sign.js: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sw(id: &str, ts: i64, sig: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(id).unwrap());
    h.insert(
        "webhook-timestamp",
        HeaderValue::from_str(&ts.to_string()).unwrap(),
    );
    h.insert("webhook-signature", HeaderValue::from_str(sig).unwrap());
    h
}

fn st(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("stripe-signature", HeaderValue::from_str(v).unwrap());
    h
}

/// The real libraries' signatures at 300 s old and ahead pass, at 301 s fail (401), on a
/// fixed clock; Stripe's library signs with the timestamp it is given, and sturdy refuses
/// its future timestamps too (the guide's "both directions"), where stripe-node's own verifier
/// only checks age.
#[test]
fn hooks31_interop_real_signatures_at_the_tolerance_edges() {
    let Some(dir) = node_dir() else { return };
    let payload = "{\"id\":\"evt_hooks31_edge\",\"object\":\"event\"}";
    let offsets = [-301i64, -300, 0, 300, 301];
    let mut cases = Vec::new();
    for d in offsets {
        cases.push(json!({"scheme":"standard","secret":STD_SECRET,"id":"msg_edge","timestamp":NOW + d,"payload":payload}));
        cases.push(
            json!({"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":NOW + d,"payload":payload}),
        );
    }
    let sigs = sign(&dir, &serde_json::Value::Array(cases));
    let v = StandardWebhooks::new(STD_SECRET).unwrap();
    let s = Stripe::new(STRIPE_SECRET).unwrap();
    for (i, d) in offsets.iter().enumerate() {
        let ok = d.abs() <= 300;
        let (a, b) = (&sigs[2 * i], &sigs[2 * i + 1]);
        assert_eq!(
            a,
            &sign_standard(STD_SECRET, "msg_edge", NOW + d, payload.as_bytes()).unwrap()
        );
        assert_eq!(b, &sign_stripe(STRIPE_SECRET, NOW + d, payload.as_bytes()));
        let ra = v.verify(&sw("msg_edge", NOW + d, a), payload.as_bytes(), at(NOW, 0));
        let rb = s.verify(&st(b), payload.as_bytes(), at(NOW, 0));
        assert_eq!(ra.is_ok(), ok, "standard {d:+}: {ra:?}");
        assert_eq!(rb.is_ok(), ok, "stripe {d:+}: {rb:?}");
        if !ok {
            assert_eq!(ra.unwrap_err().status, 401);
            assert_eq!(rb.unwrap_err().status, 401);
        }
    }
}

/// Bodies of every shape the signers take (empty, multi-byte, CR LF, a NUL, a long one, one
/// with a `.` pattern) verify exactly as signed, and a body one byte different never does.
#[test]
fn hooks31_interop_bodies_of_every_shape() {
    let Some(dir) = node_dir() else { return };
    let long = "x".repeat(200_000);
    let payloads = [
        String::new(),
        "héllo ☃ 𝄞".to_owned(),
        "line\r\nline\n".to_owned(),
        "nul\u{0}inside".to_owned(),
        long,
        "1800000000.{\"a\":1}".to_owned(),
    ];
    let mut cases = Vec::new();
    for p in &payloads {
        cases.push(json!({"scheme":"standard","secret":STD_SECRET,"id":"msg_shape","timestamp":NOW,"payload":p}));
        cases.push(json!({"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":NOW,"payload":p}));
    }
    let sigs = sign(&dir, &serde_json::Value::Array(cases));
    let v = StandardWebhooks::new(STD_SECRET).unwrap();
    let s = Stripe::new(STRIPE_SECRET).unwrap();
    for (i, p) in payloads.iter().enumerate() {
        let (a, b) = (&sigs[2 * i], &sigs[2 * i + 1]);
        let body = p.as_bytes();
        v.verify(&sw("msg_shape", NOW, a), body, at(NOW, 0))
            .unwrap_or_else(|r| panic!("standard, payload {i}: {r:?}"));
        let out = s
            .verify(&st(b), body, at(NOW, 0))
            .unwrap_or_else(|r| panic!("stripe, payload {i}: {r:?}"));
        assert!(
            out.id.unwrap().starts_with("sha256:"),
            "no JSON id: a digest"
        );
        let mut other = body.to_vec();
        other.push(b' ');
        assert!(v
            .verify(&sw("msg_shape", NOW, a), &other, at(NOW, 0))
            .is_err());
        assert!(s.verify(&st(b), &other, at(NOW, 0)).is_err());
    }
}

/// Rotation: the old and the new secret each sign with the real library; a header listing
/// both entries passes a verifier holding either secret alone or both, and fails one holding
/// neither.
#[test]
fn hooks31_interop_rotation_with_both_entries() {
    let Some(dir) = node_dir() else { return };
    let payload = "{\"id\":\"evt_rot\"}";
    let sigs = sign(
        &dir,
        &json!([
            {"scheme":"standard","secret":STD_SECRET,"id":"msg_rot","timestamp":NOW,"payload":payload},
            {"scheme":"standard","secret":STD_OTHER,"id":"msg_rot","timestamp":NOW,"payload":payload},
            {"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":NOW,"payload":payload},
            {"scheme":"stripe","secret":"whsec_hooks31_new_stripe","timestamp":NOW,"payload":payload},
        ]),
    );
    let both = format!("{} {}", sigs[0], sigs[1]);
    let stripe_both = format!("{},{}", sigs[2], sigs[3].split_once(',').unwrap().1);
    let body = payload.as_bytes();
    for secrets in [
        vec![STD_SECRET],
        vec![STD_OTHER],
        vec![STD_OTHER, STD_SECRET],
    ] {
        let v = StandardWebhooks::with_secrets(secrets.iter().copied()).unwrap();
        assert!(v
            .verify(&sw("msg_rot", NOW, &both), body, at(NOW, 0))
            .is_ok());
    }
    let neither = StandardWebhooks::new("whsec_bmVpdGhlciBvZiB0aGUgdHdvIHNlY3JldHM=").unwrap();
    assert!(neither
        .verify(&sw("msg_rot", NOW, &both), body, at(NOW, 0))
        .is_err());
    for secrets in [
        vec![STRIPE_SECRET],
        vec!["whsec_hooks31_new_stripe"],
        vec!["whsec_hooks31_new_stripe", STRIPE_SECRET],
    ] {
        let s = Stripe::with_secrets(secrets.iter().copied()).unwrap();
        let out = s.verify(&st(&stripe_both), body, at(NOW, 0)).unwrap();
        assert_eq!(out.id.as_deref(), Some("evt_rot"));
    }
    let s = Stripe::new("whsec_neither").unwrap();
    assert!(s.verify(&st(&stripe_both), body, at(NOW, 0)).is_err());
}
