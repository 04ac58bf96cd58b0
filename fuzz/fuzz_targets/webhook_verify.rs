//! Every webhook verifier on hostile headers and bodies: `check_headers` and `verify` never panic,
//! and nothing unsigned is accepted (the secrets are fixed and private to this target, so the
//! input cannot carry a valid MAC except by a collision).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sturdy_fuzz::{header_lines, take_now};
use sturdy_webhook::http::HeaderName;
use sturdy_webhook::{GenericHmac, GitHub, StandardWebhooks, Stripe, Verifier};

const NAMES: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "stripe-signature",
    "x-hub-signature-256",
    "x-signature",
    "x-timestamp",
    "x-github-event",
];

fn verifiers() -> &'static [Box<dyn Verifier>] {
    static V: OnceLock<Vec<Box<dyn Verifier>>> = OnceLock::new();
    V.get_or_init(|| {
        vec![
            Box::new(StandardWebhooks::new("whsec_ZnV6ei10YXJnZXQtc2VjcmV0LTI0Ynkh").unwrap()),
            Box::new(Stripe::new("whsec_test_secret").unwrap()),
            Box::new(GitHub::new("It's a Secret to Everybody").unwrap()),
            Box::new(
                GenericHmac::new("generic", HeaderName::from_static("x-signature"), "s3cr3t")
                    .unwrap()
                    .with_prefix("sha256="),
            ),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let (now, rest) = take_now(data);
    // Header lines, then a blank line, then the body.
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest, &[][..]),
    };
    let headers = header_lines(NAMES, head);
    for v in verifiers() {
        let _ = v.check_headers(&headers, now);
        if let Ok(verified) = v.verify(&headers, body, now) {
            panic!("{} accepted an unsigned delivery: {verified:?}", v.scheme());
        }
    }
});
