//! Bytes of memory per stored key in the in-memory idempotency store.
//!
//! cargo bench -p sturdy-benches --bench idempotency_memory
//!
//! Fills a `MemoryStore` with completed keys, each holding its own typical small API response
//! (201, a JSON content type, a 120-byte body), and reports two figures: the resident memory the
//! process grew by (what the allocator really took, map tables included), and the store's own
//! accounting (`MemoryStore::heap_bytes`, the figure its byte bound applies to: keys, responses
//! and an estimate of each entry's share of the tables).

use std::time::Duration;

use bytes::Bytes;
use sturdy::idempotency::server::{IdempotencyStore, LockToken, MemoryStore, StoredResponse};

/// One token for every lock: each key is locked once, by one execution.
const T: LockToken = LockToken::from_u128(1);

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() {
    // `cargo test --benches` runs this too; a short run is enough there.
    let n: usize = if std::env::args().any(|a| a == "--bench") {
        200_000
    } else {
        1_000
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        // Each key holds its own response, as responses from a handler do.
        let response = || StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: Bytes::from(vec![b'x'; 120]),
        };
        // Bounded by entries here, not by bytes.
        let store = MemoryStore::new(n)
            .and_then(|s| s.with_max_bytes(4 << 30))
            .expect("valid bounds");
        let before = rss_bytes();
        for i in 0..n {
            // A scope hash (32 hex) and a UUID key, as the layer builds them.
            let key = format!("5f0c2a9e7b1d4c3f8e6a0b2d4f6e8a1c:{i:08x}-5e2b-4c1d-9a7f-{i:012x}");
            let fp = [i as u8; 32];
            store
                .begin(&key, fp, T, Duration::from_secs(30))
                .await
                .unwrap();
            store
                .complete(&key, fp, T, response(), Duration::from_secs(86_400))
                .await
                .unwrap();
        }
        let after = rss_bytes();
        println!("keys stored: {n}");
        if let (Some(b), Some(a)) = (before, after) {
            println!(
                "resident memory per key: {} bytes",
                a.saturating_sub(b) / n as u64
            );
        }
        println!(
            "accounted per key:       {} bytes (MemoryStore::heap_bytes: key, response, table share)",
            store.heap_bytes() / n
        );
    });
}
