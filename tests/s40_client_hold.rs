//! s40: through `sturdy::ClientBuilder`, a hedged GET that a layer below holds back (the rate
//! limit's pause after a 429 with `Retry-After`, the adaptive concurrency limit's line, a slow
//! token fetch) is not hedged while it waits (docs/guides/hedge.md, "When";
//! crates/sturdy-hedge/CHANGELOG.md, Unreleased; docs/RELIABILITY.md), on paused time against an
//! in-process service.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, BoxFuture, Token, TokenSource};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::BoxError;
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, ServiceExt};

const HOST: &str = "api.example.com";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn url(path: &str) -> String {
    format!("http://{HOST}{path}")
}

fn req(method: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url(path))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The in-process server: `/warm` 10 ms, `/slow` 1 s, `/held` 2 ms, `/limited` a 429 with
/// `Retry-After: 1` the first time, then 200.
#[derive(Clone, Default)]
struct Server {
    seen: Arc<Mutex<Vec<(String, String, tokio::time::Instant)>>>,
    limited: Arc<AtomicUsize>,
}

impl Server {
    fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p, _)| p == path)
            .count()
    }
    fn starts(&self, path: &str) -> Vec<tokio::time::Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p, _)| p == path)
            .map(|(_, _, t)| *t)
            .collect()
    }
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        service_fn(move |r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let path = r.uri().path().to_owned();
                me.seen.lock().unwrap().push((
                    r.method().to_string(),
                    path.clone(),
                    tokio::time::Instant::now(),
                ));
                let (wait, status) = match path.as_str() {
                    "/slow" | "/heldslow" => (1_000, 200),
                    "/held" => (2, 200),
                    "/limited" => {
                        if me.limited.fetch_add(1, Ordering::SeqCst) == 0 {
                            (0, 429)
                        } else {
                            (2, 200)
                        }
                    }
                    _ => (10, 200),
                };
                tokio::time::sleep(ms(wait)).await;
                let mut b = Response::builder().status(status);
                if status == 429 {
                    b = b.header("retry-after", "1");
                }
                Ok::<_, BoxError>(b.body(Full::new(Bytes::from_static(b"ok"))).unwrap())
            }
        })
    }
}

fn hedges(handle: &HedgeHandle) -> u64 {
    handle.stats(HOST).map_or(0, |s| s.hedges())
}

async fn warm(client: &sturdy::Client<Full<Bytes>>, handle: &HedgeHandle, n: usize) -> Duration {
    for _ in 0..n {
        client.clone().oneshot(req("GET", "/warm")).await.unwrap();
    }
    handle.stats(HOST).unwrap().delay().expect("a delay")
}

/// The brief's stack: `ClientBuilder::new().with_hedge(HedgeLayer::new())` (100 samples), a 429
/// with `Retry-After: 1` makes the next GET wait for the pause: it is not hedged while it waits,
/// and the server sees it once.
#[tokio::test(start_paused = true)]
async fn s40_client_rate_limit_pause_is_not_hedged() {
    let server = Server::default();
    let (layer, handle) = HedgeLayer::new().pair();
    let client = ClientBuilder::new()
        .with_hedge(layer)
        .build(server.service());
    let d = warm(&client, &handle, 120).await;
    assert!(d < ms(100), "delay {d:?}");
    let a = tokio::spawn(client.clone().oneshot(req("GET", "/limited")));
    tokio::time::sleep(ms(1)).await;
    assert_eq!(server.count("/limited"), 1, "the 429 was answered");
    let b = tokio::spawn(client.clone().oneshot(req("GET", "/held")));
    tokio::time::sleep(ms(500)).await;
    assert_eq!(server.count("/held"), 0, "the next GET waits for the pause");
    assert_eq!(hedges(&handle), 0, "not hedged while it waits");
    let _ = a.await.unwrap();
    let res = b.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(server.count("/held"), 1, "the server saw one request");
    assert!(server.count("/limited") <= 2);
    assert_eq!(hedges(&handle), 0, "nothing was hedged");
}

/// Same, with one token (ratio 0, burst 1): the token is not spent by the held call; a later
/// slow call is still hedged.
#[tokio::test(start_paused = true)]
async fn s40_client_rate_limit_pause_spends_no_token() {
    let server = Server::default();
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let client = ClientBuilder::new()
        .with_hedge(layer)
        .build(server.service());
    warm(&client, &handle, 5).await;
    let a = tokio::spawn(client.clone().oneshot(req("POST", "/limited")));
    tokio::time::sleep(ms(1)).await;
    assert_eq!(server.count("/limited"), 1, "the 429 was answered");
    let b = tokio::spawn(client.clone().oneshot(req("GET", "/held")));
    tokio::time::sleep(ms(500)).await;
    assert_eq!(server.count("/held"), 0, "the GET waits for the pause");
    let _ = a.await.unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(server.count("/held"), 1);
    assert_eq!(hedges(&handle), 0);
    client.clone().oneshot(req("GET", "/slow")).await.unwrap();
    assert_eq!(server.count("/slow"), 2, "the token was still there");
    assert_eq!(hedges(&handle), 1);
}

/// Adaptive concurrency at a limit of 1, a slow (unhedged) POST holding the place: the GET in
/// line is not hedged while it waits.
#[tokio::test(start_paused = true)]
async fn s40_client_concurrency_line_is_not_hedged() {
    let server = Server::default();
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let client = ClientBuilder::new()
        .with_hedge(layer)
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_max_wait(Duration::from_secs(20)),
        )
        .build(server.service());
    warm(&client, &handle, 5).await;
    let a = tokio::spawn(client.clone().oneshot(req("POST", "/slow")));
    tokio::time::sleep(ms(1)).await;
    assert_eq!(server.count("/slow"), 1);
    let b = tokio::spawn(client.clone().oneshot(req("GET", "/held")));
    tokio::time::sleep(ms(500)).await;
    assert_eq!(server.count("/held"), 0, "the GET waits in line");
    assert_eq!(hedges(&handle), 0, "not hedged while it waits");
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(server.count("/held"), 1, "the server saw one request");
    assert_eq!(hedges(&handle), 0);
}

#[derive(Debug, Default)]
struct SlowSource {
    fetches: AtomicUsize,
    delay_ms: AtomicU64,
}

#[derive(Debug)]
struct Src(Arc<SlowSource>);

impl TokenSource for Src {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let me = self.0.clone();
        Box::pin(async move {
            me.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(ms(me.delay_ms.load(Ordering::SeqCst))).await;
            // Expires at once, so each call fetches (or the layer refreshes).
            Ok(Token::new(
                "t0k3n".to_owned(),
                Some(tokio::time::Instant::now() + Duration::from_millis(1)),
            ))
        })
    }
    fn invalidate(&self, _: &Token) {}
}

/// The auth layer's token fetch being slow: the GET waiting for its token is not hedged.
#[tokio::test(start_paused = true)]
async fn s40_client_slow_token_fetch_is_not_hedged() {
    let server = Server::default();
    let source = Arc::new(SlowSource::default());
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let client = ClientBuilder::new()
        .with_hedge(layer)
        .with_auth(AuthLayer::token_source(Arc::new(Src(source.clone()))))
        .build(server.service());
    warm(&client, &handle, 5).await;
    let before = source.fetches.load(Ordering::SeqCst);
    source.delay_ms.store(1_000, Ordering::SeqCst);
    let b = tokio::spawn(client.clone().oneshot(req("GET", "/held")));
    tokio::time::sleep(ms(500)).await;
    if source.fetches.load(Ordering::SeqCst) == before {
        panic!("setup: the token was cached, no fetch to wait for");
    }
    assert_eq!(server.count("/held"), 0, "the GET waits for its token");
    assert_eq!(hedges(&handle), 0, "not hedged while it waits");
    b.await.unwrap().unwrap();
    assert_eq!(server.count("/held"), 1, "the server saw one request");
    assert_eq!(hedges(&handle), 0);
    source.delay_ms.store(0, Ordering::SeqCst);
    client.clone().oneshot(req("GET", "/slow")).await.unwrap();
    assert_eq!(server.count("/slow"), 2, "the token of the budget is there");
}

/// hedge.md: "once the first copy has been let go, one more delay passes before the hedge is
/// sent": through the client, a GET held by the rate limit's pause, then slow at the server, is
/// hedged between one and about two delays after it reached the server.
#[tokio::test(start_paused = true)]
async fn s40_client_held_then_slow_is_hedged_after_one_to_two_delays() {
    let server = Server::default();
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let client = ClientBuilder::new()
        .with_hedge(layer)
        .build(server.service());
    let d = warm(&client, &handle, 5).await;
    let a = tokio::spawn(client.clone().oneshot(req("POST", "/limited")));
    tokio::time::sleep(ms(1)).await;
    let b = tokio::spawn(client.clone().oneshot(req("GET", "/heldslow")));
    tokio::time::sleep(ms(500)).await;
    assert_eq!(server.count("/heldslow"), 0, "held by the pause");
    let _ = a.await.unwrap();
    b.await.unwrap().unwrap();
    let t = server.starts("/heldslow");
    assert_eq!(t.len(), 2, "first copy and hedge");
    assert_eq!(hedges(&handle), 1);
    let gap = t[1] - t[0];
    assert!(
        gap >= d && gap <= 2 * d + ms(1),
        "hedge {gap:?} after the first copy went, delay {d:?}"
    );
}
