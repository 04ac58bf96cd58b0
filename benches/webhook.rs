//! Webhook verification under hostile input: a 1 MiB body, three secrets, and a signature header
//! listing one entry or thousands. Each secret's MAC is computed once and compared with every
//! entry (at most `MAX_SIGNATURES` are considered), so thousands of entries must cost about what
//! one does.
//!
//! cargo bench -p sturdy-benches --bench webhook -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use sturdy::webhook::{sign_standard, sign_stripe, StandardWebhooks, Stripe, Verifier};

const NOW: u64 = 1_700_000_000;
const ENTRIES: usize = 4_000;
const SECRETS: [&str; 3] = [
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "whsec_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
];

fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
}

fn standard_headers(sig: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_static("msg_1"));
    h.insert("webhook-timestamp", HeaderValue::from(NOW));
    h.insert("webhook-signature", HeaderValue::from_str(sig).unwrap());
    h
}

fn standard(c: &mut Criterion) {
    let body = vec![b'x'; 1024 * 1024];
    let v = StandardWebhooks::with_secrets(SECRETS).unwrap();
    // Signed with a secret the receiver does not have: every secret is tried.
    let wrong = sign_standard(
        "whsec_CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
        "msg_1",
        NOW as i64,
        &body,
    )
    .unwrap();
    let right = sign_standard(SECRETS[2], "msg_1", NOW as i64, &body).unwrap();
    let one = standard_headers(&wrong);
    let many = standard_headers(&vec![wrong.as_str(); ENTRIES].join(" "));
    let valid = standard_headers(&right);
    let mut g = c.benchmark_group("webhook/standard, 1 MiB, 3 secrets");
    g.bench_function("1 entry, no match (baseline)", |b| {
        b.iter(|| black_box(v.verify(&one, &body, at()).is_err()));
    });
    g.bench_function("4000 entries, no match", |b| {
        b.iter(|| black_box(v.verify(&many, &body, at()).is_err()));
    });
    g.bench_function("1 entry, matching the last secret", |b| {
        b.iter(|| black_box(v.verify(&valid, &body, at()).is_ok()));
    });
    g.finish();
}

fn stripe(c: &mut Criterion) {
    let body = vec![b'x'; 1024 * 1024];
    let v = Stripe::with_secrets(["k1", "k2", "k3"]).unwrap();
    let wrong = sign_stripe("k4", NOW as i64, &body);
    let entry = wrong.split_once(',').unwrap().1;
    let header = |v: String| {
        let mut h = HeaderMap::new();
        h.insert("stripe-signature", HeaderValue::from_str(&v).unwrap());
        h
    };
    let one = header(wrong.clone());
    let many = header(format!("t={NOW},{}", vec![entry; ENTRIES].join(",")));
    let mut g = c.benchmark_group("webhook/stripe, 1 MiB, 3 secrets");
    g.bench_function("1 entry, no match (baseline)", |b| {
        b.iter(|| black_box(v.verify(&one, &body, at()).is_err()));
    });
    g.bench_function("4000 entries, no match", |b| {
        b.iter(|| black_box(v.verify(&many, &body, at()).is_err()));
    });
    g.finish();
}

// criterion_group! makes an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, standard, stripe);
}
use group::benches;
criterion_main!(benches);
