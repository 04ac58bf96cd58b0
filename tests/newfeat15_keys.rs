//! The per-host state of the newer layers for a URI that carries a password: metrics.md says the
//! host label is "Never the `user:password@` part", and the guides key "by host"; the adaptive
//! limit's refusal (`LimitReached`: "the key, the limit, how long it waited"), the handles'
//! listings and the messages must not hold the password either. Paused time, in process.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use tower::{service_fn, Layer, ServiceExt};

const PW: &str = "hunter2pw";
const URI: &str = "http://someone:hunter2pw@api.example.com/orders";

fn get() -> Request<Full<Bytes>> {
    Request::get(URI).body(Full::default()).unwrap()
}

fn slow_api() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    })
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{err} {err:?}");
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(&format!(" | {e} {e:?}"));
        cur = e.source();
    }
    out
}

#[tokio::test(start_paused = true)]
async fn the_adaptive_limits_key_and_refusal_hold_no_password() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(slow_api());
    let first = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(get()).await.unwrap_err();
    let text = chain(&*err);
    eprintln!("{text}");
    assert!(!text.contains(PW), "{text}");
    let reached = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached in the chain");
    assert_eq!(reached.key(), "api.example.com");
    first.await.unwrap().unwrap();
    let states = handle.states();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].0, "api.example.com");
    assert_eq!(handle.limit("api.example.com"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn the_hedging_layers_keys_hold_no_password() {
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(slow_api());
    for _ in 0..3 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let all = handle.all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].0, "api.example.com");
    assert!(!format!("{all:?} {handle:?}").contains(PW));
}

#[tokio::test(start_paused = true)]
async fn the_coalescing_tables_key_holds_no_password() {
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(slow_api());
    let first = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    assert_eq!(handle.in_flight("api.example.com"), 1);
    assert!(!format!("{handle:?} {:?}", handle.stats()).contains(PW));
    first.await.unwrap().unwrap();
}
