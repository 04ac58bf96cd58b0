//! Memory past every per-host bound: the whole client stack (idempotency keys, retry budgets,
//! hedging, breakers, rate limiters, adaptive concurrency, coalescing, version notices) called
//! on 2,000 and then 6,000 distinct hosts, each answering with a `Deprecation` header on a path
//! of its own. Live heap after 6,000 hosts must stay close to the live heap after 2,000 (every
//! bound is 1,024 hosts or 10,000 endpoints). Measured: about 7 KB a host up to the bound (about
//! 9 MB), then flat through 12,000 hosts (its level moves by a few hundred KB as idle hosts are
//! forgotten and maps regrow).
#![cfg(feature = "full")]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use tower::{service_fn, ServiceExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn live_memory_stays_flat_past_every_host_bound() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let http = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("deprecation", "@1688169599")
                .header("ratelimit", "\"default\";r=5;t=1")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
    });
    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .with_coalesce(CoalesceLayer::new())
        .build(http);
    let mut live = Vec::new();
    let mut host = 0usize;
    for until in [2_000usize, 6_000] {
        rt.block_on(async {
            while host < until {
                // A long host name, so that a per-host copy would show.
                let uri = format!("http://h{host}-{}.example/items/{host}", "x".repeat(200));
                let method = if host.is_multiple_of(2) {
                    "GET"
                } else {
                    "POST"
                };
                let req = Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap();
                let res = client.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                host += 1;
            }
        });
        let now = dhat::HeapStats::get().curr_bytes;
        eprintln!("after {until} hosts: {now} bytes live");
        live.push(now);
    }
    // 4,000 more hosts add less than 1 MiB (a per-host copy of 230-byte names alone would be
    // 1.4 MB per layer).
    assert!(
        live[1] < live[0] + 1024 * 1024,
        "2,000 hosts: {} bytes; 6,000 hosts: {} bytes",
        live[0],
        live[1]
    );
}
