//! What the docs say may be shared (Send, Sync, Clone, 'static), checked without failing the
//! build: a type that lacks a bound makes its test fail instead. And a retry's sleep between
//! attempts holds no permit of a `ConcurrencyLimit` below it.
#![cfg(feature = "full")]
// `(&probe).is_send()` picks the trait by autoref: the borrow is the point.
#![allow(clippy::needless_borrow)]

use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::{DirectLimiter, Quota, RateLimitLayer};
use sturdy::retry::{AttemptTimeoutLayer, Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use sturdy_core::BoxError;
use tokio::time::timeout;
use tower::limit::ConcurrencyLimit;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

struct Probe<T>(PhantomData<T>);
fn probe<T>(_: &T) -> Probe<T> {
    Probe(PhantomData)
}
trait SendYes {
    fn is_send(&self) -> bool {
        true
    }
}
impl<T: Send> SendYes for Probe<T> {}
// Chosen only when the bound is missing.
#[allow(dead_code)]
trait SendNo {
    fn is_send(&self) -> bool {
        false
    }
}
impl<T> SendNo for &Probe<T> {}
trait SyncYes {
    fn is_sync(&self) -> bool {
        true
    }
}
impl<T: Sync> SyncYes for Probe<T> {}
#[allow(dead_code)]
trait SyncNo {
    fn is_sync(&self) -> bool {
        false
    }
}
impl<T> SyncNo for &Probe<T> {}
trait CloneYes {
    fn is_clone(&self) -> bool {
        true
    }
}
impl<T: Clone> CloneYes for Probe<T> {}
#[allow(dead_code)]
trait CloneNo {
    fn is_clone(&self) -> bool {
        false
    }
}
impl<T> CloneNo for &Probe<T> {}

/// (name, Send, Sync, Clone) of a value.
macro_rules! bounds {
    ($name:expr, $v:expr) => {{
        let p = probe(&$v);
        ($name, (&p).is_send(), (&p).is_sync(), (&p).is_clone())
    }};
}

fn api(
) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send + Sync + 'static
{
    service_fn(|_req: Req| async { Ok::<_, BoxError>(Response::new(Full::from("ok"))) })
}

fn get() -> Req {
    Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap()
}

fn tokens() -> ClientCredentials {
    ClientCredentials::new(api(), "http://auth.example.com/token", "id", "secret").unwrap()
}

/// ARCHITECTURE.md: "`sturdy::Client` is a `BoxCloneSyncService`: `Clone + Send + Sync +
/// 'static`"; every layer's service is shared the same way (axum `State`, `Arc<App>`), and its
/// futures are spawned (`tokio::spawn`).
#[tokio::test(start_paused = true)]
async fn services_futures_and_handles_are_send_sync_and_clone() {
    let mut rows = Vec::new();
    macro_rules! service {
        ($name:expr, $layer:expr) => {{
            let mut svc = $layer.layer(api());
            rows.push(bounds!(concat!($name, " service"), svc));
            let fut = svc.call(get());
            let p = probe(&fut);
            rows.push((concat!($name, " future"), (&p).is_send(), true, true));
            drop(fut);
        }};
    }
    service!("IdempotencyKey", IdempotencyKeyLayer::new());
    service!("Retry", RetryLayer::new());
    service!("CircuitBreaker", CircuitBreakerLayer::new());
    service!("RateLimit", RateLimitLayer::adaptive_only());
    service!("Auth (bearer)", AuthLayer::bearer("k").unwrap());
    service!("Auth (OAuth2)", AuthLayer::oauth2(tokens()));
    service!("Version", VersionLayer::header("api-version", "1").unwrap());
    service!("AttemptTimeout", AttemptTimeoutLayer::new(None));
    service!("Hedge", HedgeLayer::new());
    service!("AdaptiveConcurrency", AdaptiveConcurrencyLayer::new());
    service!("Coalesce", CoalesceLayer::new());

    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::oauth2(tokens()))
        .with_coalesce(CoalesceLayer::new())
        .build(api());
    rows.push(bounds!("Client", client));
    rows.push(bounds!("ClientCredentials", tokens()));
    rows.push(bounds!(
        "RateLimitHandle",
        RateLimitLayer::adaptive_only().pair().1
    ));
    rows.push(bounds!(
        "CircuitHandle",
        CircuitBreakerLayer::new().pair().1
    ));
    rows.push(bounds!("HedgeHandle", HedgeLayer::new().pair().1));
    rows.push(bounds!(
        "ConcurrencyHandle",
        AdaptiveConcurrencyLayer::new().pair().1
    ));
    rows.push(bounds!("CoalesceHandle", CoalesceLayer::new().pair().1));
    let direct = DirectLimiter::new(Quota::per_second(5).unwrap());
    // "share the limiter behind an `Arc`"
    let direct = std::sync::Arc::new(direct);
    rows.push(bounds!("Arc<DirectLimiter>", direct));
    let wait = direct.until_ready(Duration::from_secs(1));
    let p = probe(&wait);
    rows.push((
        "DirectLimiter::until_ready future",
        (&p).is_send(),
        true,
        true,
    ));
    drop(wait);

    let missing: Vec<_> = rows
        .iter()
        .filter(|(_, send, sync, clone)| !(send & sync & clone))
        .collect();
    assert!(
        missing.is_empty(),
        "(name, Send, Sync, Clone) lacking a bound: {missing:?}"
    );
}

/// docs/guides/concurrency.md: "Below the retry layer, each attempt takes a place; a retried
/// call gives its place back while it sleeps." ARCHITECTURE.md: a retry "polls readiness again
/// on the service the future holds, after the first call's response future (and whatever permit
/// it held) is gone". So during the backoff sleep another caller gets the only permit.
#[tokio::test(start_paused = true)]
async fn a_retry_sleeping_between_attempts_holds_no_permit() {
    let backoff = || Backoff::exponential(Duration::from_secs(2), Duration::from_secs(2)).unwrap();
    for name in ["RetryLayer", "ClientBuilder"] {
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let limited = ConcurrencyLimit::new(mock, 1);
        let svc: sturdy::Client<Full<Bytes>> = if name == "RetryLayer" {
            tower::util::BoxCloneSyncService::new(
                RetryLayer::new()
                    .with_seed(1)
                    .with_backoff(backoff())
                    .layer(limited),
            )
        } else {
            ClientBuilder::new()
                .with_retry(RetryLayer::new().with_seed(1).with_backoff(backoff()))
                .build(limited)
        };
        let mut a = svc.clone();
        let mut first = tokio_test::task::spawn(a.ready().await.unwrap().call(get()));
        let _ = first.poll();
        let (_r, send) = timeout(Duration::from_secs(1), handle.next_request())
            .await
            .unwrap()
            .unwrap();
        send.send_response(
            Response::builder()
                .status(503)
                .body(Full::default())
                .unwrap(),
        );
        // The first call now sleeps before its second attempt.
        for _ in 0..5 {
            assert!(first.poll().is_pending());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let mut b = svc.clone();
        let got = timeout(Duration::from_millis(500), b.ready()).await;
        assert!(
            got.is_ok(),
            "{name}: a call sleeping before its retry kept the only permit of the limit below"
        );
        drop(b);
    }
}
