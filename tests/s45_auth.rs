//! auth today: an error of the replay after a 401 (a refused reconnect, a limiter below) reads
//! "may have been processed", with its kind and words kept. Auth over ConcurrencyLimit(1) and
//! Buffer, a kept service.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, BoxFuture, Token, TokenSource};
use sturdy::core::{BoxError, Delivery, Error, ErrorKind};
use tower::buffer::BufferLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

#[derive(Debug, Default)]
struct Tokens(AtomicU32);
impl TokenSource for Tokens {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(Token::new(format!("tok-{n}"), None)) })
    }
    fn invalidate(&self, _token: &Token) {}
}

#[derive(Clone, Copy)]
enum Replay {
    /// A sturdy error of kind Connect, "not sent".
    SturdyConnect,
    /// A raw io error: connection refused.
    IoRefused,
}

/// The first call answers 401; the replay fails as `replay` says.
#[derive(Clone)]
struct Api {
    calls: Arc<AtomicU32>,
    replay: Replay,
}

impl Service<Req> for Api {
    type Response = Res;
    type Error = BoxError;
    type Future = BoxFuture<Result<Res, BoxError>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let replay = self.replay;
        Box::pin(async move {
            if n == 0 {
                return Ok(Response::builder()
                    .status(401)
                    .header("www-authenticate", "Bearer error=\"invalid_token\"")
                    .body(Full::default())
                    .unwrap());
            }
            Err(match replay {
                Replay::SturdyConnect => {
                    Error::new(ErrorKind::Connect, "s45 refused reconnect to api.test:443")
                        .with_delivery(Delivery::NotSent)
                        .into()
                }
                Replay::IoRefused => Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "s45 connection refused",
                )) as BoxError,
            })
        })
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(" | ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[tokio::test(start_paused = true)]
async fn a_failed_replay_after_a_401_may_have_been_processed() {
    for replay in [Replay::SturdyConnect, Replay::IoRefused] {
        for buffered in [false, true] {
            let api = Api {
                calls: Arc::default(),
                replay,
            };
            let auth = AuthLayer::token_source(Arc::new(Tokens::default()));
            let below = ConcurrencyLimitLayer::new(1).layer(api.clone());
            let mut kept: tower::util::BoxCloneSyncService<Req, Res, BoxError> = if buffered {
                tower::util::BoxCloneSyncService::new(BufferLayer::new(1).layer(auth.layer(below)))
            } else {
                tower::util::BoxCloneSyncService::new(auth.layer(below))
            };
            let req = Request::post("http://api.test/orders")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(60), async {
                kept.ready().await?.call(req).await
            })
            .await
            .expect("hung");
            let e = r.expect_err("the replay fails");
            assert_eq!(api.calls.load(Ordering::SeqCst), 2, "replayed once");
            let text = chain(&*e);
            // "reads": its delivery; the words must not say the opposite.
            assert!(
                !text.contains("not sent") && !text.contains("safe to send again"),
                "{text}"
            );
            assert!(text.contains("s45"), "its words kept: {text}");
            let core = sturdy::core::find::<Error>(&*e).expect("a sturdy error");
            assert_eq!(
                sturdy::core::classify::delivery(&*e),
                Delivery::MaybeProcessed,
                "{text}"
            );
            if matches!(replay, Replay::SturdyConnect) {
                assert_eq!(*core.kind(), ErrorKind::Connect, "kind kept: {text}");
            }
            // The permit below is back: a next call runs (and fails the same way, not hangs).
            let req = Request::get("http://api.test/orders")
                .body(Full::default())
                .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(60), async {
                kept.ready().await?.call(req).await
            })
            .await
            .expect("the next call hung");
            assert!(r.is_err());
        }
    }
}

/// "a limiter below": a rate limiter under the auth layer refuses the replay after a 401 (its
/// quota spent by the first send). The refusal says "not sent" on its own; after a 401 the API
/// had the request, so the call's delivery is "may have been processed", the kind kept.
#[tokio::test(start_paused = true)]
async fn a_limiter_refusing_the_replay_after_a_401_may_have_been_processed() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let api = Api {
        calls: Arc::default(),
        replay: Replay::SturdyConnect,
    };
    let limiter = RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO);
    let auth = AuthLayer::token_source(Arc::new(Tokens::default()));
    let mut kept = auth.layer(limiter.layer(ConcurrencyLimitLayer::new(1).layer(api.clone())));
    let req = Request::post("http://api.test/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        kept.ready().await?.call(req).await
    })
    .await
    .expect("hung");
    let e = r.expect_err("the replay is refused");
    let text = chain(&*e);
    assert_eq!(api.calls.load(Ordering::SeqCst), 1, "{text}");
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*e).is_some(),
        "{text}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        Delivery::MaybeProcessed,
        "{text}"
    );
    assert!(!text.contains("safe to send again"), "{text}");
}

/// auth CHANGELOG: the replay's error has delivery `MaybeProcessed`, "with its kind and words
/// kept: a retry layer above does not resend an unkeyed POST, and its final error says 'it may
/// have been processed'".
#[tokio::test(start_paused = true)]
async fn a_failed_replay_under_a_retry_layer_is_not_resent() {
    use sturdy::retry::RetryLayer;
    let api = Api {
        calls: Arc::default(),
        replay: Replay::SturdyConnect,
    };
    let auth = AuthLayer::token_source(Arc::new(Tokens::default()));
    let mut kept = RetryLayer::new().layer(auth.layer(api.clone()));
    let req = Request::post("http://api.test/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(600), async {
        kept.ready().await?.call(req).await
    })
    .await
    .expect("hung")
    .expect_err("fails");
    let text = chain(&*e);
    // The first call (401) and its replay: nothing more.
    assert_eq!(api.calls.load(Ordering::SeqCst), 2, "{text}");
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        Delivery::MaybeProcessed,
        "{text}"
    );
    assert!(e.to_string().contains("may have been processed"), "{e}");
    assert!(!text.contains("safe to send again"), "{text}");
}
