//! Per-key cost of the in-memory idempotency store at its bound, from 1,000 to 1,000,000 keys.
//!
//! cargo bench -p sturdy-benches --bench idempotency_store -- --warm-up-time 1 --measurement-time 3
//!
//! Each store is first filled to its bound with completed keys (a scope hash and a UUID, 69
//! bytes, holding a small API response: 201, a JSON content type, a 120-byte body). Then:
//!
//! - "new key": what the layer does for a request with a new key: `begin` (which evicts the
//!   completed key that expires first, as the store is full) and `complete`. The cost should be
//!   flat in the number of keys.
//! - "replay": `begin` on a key that is stored, spread over the whole store.
//! - "baseline: HashMap + FIFO": the simplest O(1) bounded map doing the same work (insert the
//!   new key with its response, drop the oldest), so the growth that comes from the memory
//!   hierarchy (a bigger map misses the caches more) shows next to the store's.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sturdy::idempotency::server::{IdempotencyStore, LockToken, MemoryStore, StoredResponse};

/// The memory store's futures are ready at once.
fn ready<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the memory store answers at once"),
    }
}

fn key(buf: &mut String, i: u64) -> &str {
    buf.clear();
    let _ = write!(
        buf,
        "5f0c2a9e7b1d4c3f8e6a0b2d4f6e8a1c:{:08x}-5e2b-4c1d-9a7f-{i:012x}",
        i as u32
    );
    buf
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(86_400);
/// One token for every lock: each key is locked once, by one execution.
const T: LockToken = LockToken::from_u128(1);

fn at_the_bound(c: &mut Criterion) {
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Bytes::from(vec![b'x'; 120]),
    };
    let mut g = c.benchmark_group("idempotency/memory store at its bound");
    let mut buf = String::with_capacity(80);
    // `cargo test --benches` runs this too, once per benchmark; small stores are enough there.
    let sizes: &[u64] = if std::env::args().any(|a| a == "--bench") {
        &[1_000, 10_000, 100_000, 1_000_000]
    } else {
        &[1_000, 10_000]
    };
    for &n in sizes {
        // Bounded by entries here, not by bytes.
        let store = MemoryStore::new(n as usize)
            .and_then(|s| s.with_max_bytes(4 << 30))
            .expect("valid bounds");
        for i in 0..n {
            let k = key(&mut buf, i);
            let fp = [i as u8; 32];
            ready(store.begin(k, fp, T, LEASE)).expect("room");
            ready(store.complete(k, fp, T, response.clone(), TTL)).expect("room");
        }
        let mut next = n;
        g.bench_with_input(BenchmarkId::new("new key", n), &n, |b, _| {
            b.iter(|| {
                next += 1;
                let k = key(&mut buf, next);
                let fp = [next as u8; 32];
                black_box(ready(store.begin(k, fp, T, LEASE)).expect("room"));
                ready(store.complete(k, fp, T, response.clone(), TTL)).expect("room");
            });
        });
        assert_eq!(store.len() as u64, n, "the store stayed at its bound");
        let mut fifo_map: HashMap<Box<str>, StoredResponse> = HashMap::new();
        let mut fifo: VecDeque<Box<str>> = VecDeque::new();
        for i in 0..n {
            let k: Box<str> = key(&mut buf, i).into();
            fifo_map.insert(k.clone(), response.clone());
            fifo.push_back(k);
        }
        let mut fifo_next = n;
        g.bench_with_input(
            BenchmarkId::new("baseline: HashMap + FIFO", n),
            &n,
            |b, _| {
                b.iter(|| {
                    fifo_next += 1;
                    let k: Box<str> = key(&mut buf, fifo_next).into();
                    if let Some(old) = fifo.pop_front() {
                        fifo_map.remove(&old);
                    }
                    fifo_map.insert(k.clone(), response.clone());
                    fifo.push_back(k);
                });
            },
        );
        drop((fifo_map, fifo));
        let mut step = 0u64;
        g.bench_with_input(BenchmarkId::new("replay", n), &n, |b, _| {
            b.iter(|| {
                // A stored key, spread over the store: the newest n keys are next-n+1 ..= next.
                step = (step + 7_919) % n;
                let i = next - step;
                black_box(
                    ready(store.begin(key(&mut buf, i), [i as u8; 32], T, LEASE)).expect("ok"),
                );
            });
        });
    }
    g.finish();
}

// criterion_group! makes an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, at_the_bound);
}
use group::benches;
criterion_main!(benches);
