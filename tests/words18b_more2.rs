//! Further claims of docs/guides/{reqwest,tls,paginate,auth}.md read literally: where
//! `SturdyMiddleware` sits in a reqwest-middleware chain, per-request `CallOptions` through
//! reqwest extensions, the HTTPS client on plain `http://`, a page whose body stalls or never
//! ends, and a 401 for a body over the replay limit.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Full, StreamBody};
use sturdy::core::ErrorKind;
use sturdy::paginate::{LinkHeader, Paginate};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{ServiceBuilder, ServiceExt};

async fn flaky_server(fail_first: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().fallback(move || {
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < fail_first {
                (StatusCode::SERVICE_UNAVAILABLE, "busy")
            } else {
                (StatusCode::OK, "ok")
            }
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (addr, hits)
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(5)).unwrap(),
    )
}

type Fut<'a> = futures_util::future::BoxFuture<'a, reqwest_middleware::Result<reqwest::Response>>;

fn hr<F>(f: F) -> F
where
    F: for<'a> Fn(
            reqwest::Request,
            &'a mut http::Extensions,
            reqwest_middleware::Next<'a>,
        ) -> Fut<'a>
        + Send
        + Sync
        + 'static,
{
    f
}

/// "Middlewares added before it see each call once; middlewares added after it see every
/// attempt."
#[tokio::test]
async fn middleware_order() {
    let (addr, hits) = flaky_server(2).await;
    let before = Arc::new(AtomicUsize::new(0));
    let after = Arc::new(AtomicUsize::new(0));
    let counter = |c: Arc<AtomicUsize>| {
        hr(move |req, ext, next| {
            c.fetch_add(1, Ordering::SeqCst);
            next.run(req, ext)
        })
    };
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(counter(before.clone()))
        .with(sturdy::reqwest::SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(counter(after.clone()))
        .build();
    let res = client.get(format!("http://{addr}/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(before.load(Ordering::SeqCst), 1);
    assert_eq!(after.load(Ordering::SeqCst), 3);
}

/// "`.with_extension(sturdy_core::CallOptions::new().without_retries())` ... reach[es] the
/// layers".
#[tokio::test]
async fn call_options_through_reqwest_extensions() {
    let (addr, hits) = flaky_server(5).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy::reqwest::SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    let res = client
        .get(format!("http://{addr}/x"))
        .with_extension(sturdy::core::CallOptions::new().without_retries())
        .send()
        .await;
    match res {
        Ok(r) => assert_eq!(r.status(), 503),
        Err(e) => assert!(e.to_string().contains("503"), "{e}"),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// "The client sends plain `http://` requests too."
#[tokio::test]
async fn https_client_speaks_plain_http() {
    let (addr, _) = flaky_server(0).await;
    let client = ClientBuilder::new().build(sturdy::tls::https_client());
    let res = client
        .oneshot(
            Request::get(format!("http://{addr}/"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// "the timeout covers the response head and the whole body, so a server that sends the head
/// and then stalls the body cannot hang a walk"; "A body larger than the page limit fails with
/// kind `Body`" and "reading stops as soon as it goes past".
#[tokio::test(start_paused = true)]
async fn stalled_and_endless_bodies() {
    use http_body_util::BodyExt;
    let svc = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let body: BoxBody = if req.uri().path() == "/stall" {
            let s = futures_util::stream::iter([Ok(http_body::Frame::data(Bytes::from_static(
                b"[1,",
            )))])
            .chain(futures_util::stream::pending());
            BodyExt::boxed(StreamBody::new(s))
        } else {
            let s = futures_util::stream::repeat_with(|| {
                Ok(http_body::Frame::data(Bytes::from(vec![b' '; 64 * 1024])))
            });
            BodyExt::boxed(StreamBody::new(s))
        };
        Ok::<_, std::convert::Infallible>(Response::new(body))
    });
    use futures_util::StreamExt;
    let p = Paginate::builder(svc, "http://a.test/stall", LinkHeader::new(""))
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let e = p.page(None, 10).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{e}");
    assert_eq!(tokio::time::Instant::now() - t0, Duration::from_secs(5));
    let p = Paginate::builder(svc, "http://a.test/endless", LinkHeader::new(""))
        .with_max_page_bytes(1_000_000)
        .build()
        .unwrap();
    let e = p.page(None, 10).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Body, "{e}");
}

/// "The largest body buffered so a request can be replayed after a 401 [1 MiB]; a larger or
/// unbounded body is sent once and a 401 is returned as is."
#[tokio::test]
async fn unauthorized_over_the_replay_limit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(401)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let tokens = Arc::new(AtomicUsize::new(0));
    let t = tokens.clone();
    let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let i = t.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!(
                r#"{{"access_token":"t{i}","expires_in":3600}}"#
            )))))
        }
    });
    let cc = sturdy::auth::ClientCredentials::new(ep, "http://auth.test/token", "id", "s").unwrap();
    let svc = ServiceBuilder::new()
        .layer(sturdy::auth::AuthLayer::oauth2(cc).with_replay_limit(10))
        .service(api);
    let res = svc
        .oneshot(
            Request::post("http://api.test/x")
                .body(Full::new(Bytes::from(vec![b'x'; 20])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[derive(Clone, Debug, PartialEq)]
struct AttemptNo(usize);

/// "Each attempt goes down the chain with a copy of the call's extensions; when the call ends,
/// the call's extensions are replaced by those of the last attempt that finished."
#[tokio::test]
async fn extensions_of_the_last_attempt() {
    let (addr, _hits) = flaky_server(2).await;
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let outer = hr(move |req, ext, next| {
        let s = s.clone();
        Box::pin(async move {
            let res = next.run(req, ext).await;
            *s.lock().unwrap() = ext.get::<AttemptNo>().cloned();
            res
        })
    });
    let inner = hr(move |req, ext, next| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(
            ext.get::<AttemptNo>().is_none(),
            "attempt {i} saw another attempt's extension"
        );
        ext.insert(AttemptNo(i));
        next.run(req, ext)
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(outer)
        .with(sturdy::reqwest::SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(inner)
        .build();
    let res = client.get(format!("http://{addr}/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*seen.lock().unwrap(), Some(AttemptNo(3)));
}
