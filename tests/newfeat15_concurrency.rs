//! docs/guides/concurrency.md, "The two algorithms", read against a composed stack and a
//! queueing server: a timeout of `ClientBuilder`'s attempt timer is an overload signal, Vegas
//! settles a few calls above the capacity of a server that queues, and the backoff ratio is
//! validated. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use sturdy::core::BoxError;
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, ServiceExt};

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap()
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// concurrency.md: "Both treat a 429, a 503, a 504 or a timeout ... as an overload signal: the
/// limit is multiplied by 0.9 ... at most once per round trip". In `ClientBuilder`'s stack the
/// attempt timer sits below the adaptive limit, so twenty attempts that time out together lower
/// the limit once, from 20 to 18.
#[tokio::test(start_paused = true)]
async fn attempts_timed_out_by_the_client_builder_lower_the_limit_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |_r: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_adaptive_concurrency(layer)
        .with_attempt_timeout(Duration::from_millis(100))
        .build(api);
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    for t in tasks {
        let err = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            sturdy::core::classify::classify_error(&*err),
            sturdy::core::ErrorKind::Timeout,
            "{err}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    assert_eq!(handle.limit("api.example.com"), Some(18));
    let state = handle.state("api.example.com").unwrap();
    assert_eq!(state.in_flight(), 0);
}

/// concurrency.md, Vegas: "So it settles a few calls above capacity, before the server fails
/// anything." A server of capacity 10 whose calls take `10 ms × in_flight / 10` past it, and
/// that sheds (503) past 30 in flight; 64 callers for 20 s, starting at a limit of 40.
#[tokio::test(start_paused = true)]
async fn vegas_settles_a_few_calls_above_a_queueing_servers_capacity() {
    const CAPACITY: usize = 10;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let shed = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let peak_late = Arc::new(AtomicUsize::new(0));
    let late = Arc::new(AtomicBool::new(false));
    let (f, s, o, p, l) = (
        in_flight.clone(),
        shed.clone(),
        ok.clone(),
        peak_late.clone(),
        late.clone(),
    );
    let api = service_fn(move |_r: Request<Full<Bytes>>| {
        let (f, s, o, p, l) = (f.clone(), s.clone(), o.clone(), p.clone(), l.clone());
        async move {
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            if l.load(Ordering::SeqCst) {
                p.fetch_max(now, Ordering::SeqCst);
            }
            let res = if now > 3 * CAPACITY {
                s.fetch_add(1, Ordering::SeqCst);
                let mut res = Response::new(Full::<Bytes>::default());
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                res
            } else {
                let ms = 10 * now.max(CAPACITY) as u64 / CAPACITY as u64;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                o.fetch_add(1, Ordering::SeqCst);
                Response::new(Full::<Bytes>::default())
            };
            f.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_initial_limit(40)
        .pair();
    let svc = layer.layer(api);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let svc = svc.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let _ = svc.clone().oneshot(get()).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let shed_early = shed.load(Ordering::SeqCst);
    late.store(true, Ordering::SeqCst);
    let mut limits = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        limits.push(handle.limit("api.example.com").unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no hang")
            .unwrap();
    }
    settle().await;
    let shed_late = shed.load(Ordering::SeqCst) - shed_early;
    eprintln!(
        "limits {limits:?}, shed early {shed_early}, shed late {shed_late}, ok {}, peak late {}",
        ok.load(Ordering::SeqCst),
        peak_late.load(Ordering::SeqCst)
    );
    for l in &limits {
        assert!(
            (CAPACITY..=2 * CAPACITY + 5).contains(l),
            "limit {l} is not a few calls above a capacity of {CAPACITY}: {limits:?}"
        );
    }
    assert_eq!(shed_late, 0, "the server shed calls once Vegas had settled");
    assert!(peak_late.load(Ordering::SeqCst) < 3 * CAPACITY);
}

/// "the limit is multiplied by 0.9 (`.with_backoff(ratio)`, validated)".
#[test]
fn the_backoff_ratio_is_validated() {
    for bad in [
        0.0,
        1.0,
        -0.5,
        1.5,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert!(
            AdaptiveConcurrencyLayer::new().with_backoff(bad).is_err(),
            "{bad}"
        );
    }
    for good in [0.5, 0.9, 0.999, f64::MIN_POSITIVE] {
        assert!(
            AdaptiveConcurrencyLayer::new().with_backoff(good).is_ok(),
            "{good}"
        );
    }
}
