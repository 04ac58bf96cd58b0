//! Error chains and log lines the docs promise: a custom token source's own `sturdy_core::Error`
//! kept as it is, a pager's transport failure classified with its cause reachable, and the
//! version layer's `tracing` warning once per endpoint.
#![cfg(feature = "full")]

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, Token, TokenSource};
use sturdy::core::{BoxError, ErrorKind};
use tower::{ServiceBuilder, ServiceExt};

#[derive(Debug)]
struct OwnWords;
impl TokenSource for OwnWords {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
        Box::pin(async {
            Err::<Token, BoxError>(Box::new(sturdy::core::Error::new(
                ErrorKind::Auth,
                "the vault refused role orders-writer",
            )))
        })
    }
    fn invalidate(&self, _: &Token) {}
}

/// "An error of your own `TokenSource` is wrapped in one ... unless it already is one."
#[tokio::test]
async fn own_sturdy_error_is_kept() {
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let err = ServiceBuilder::new()
        .layer(AuthLayer::token_source(Arc::new(OwnWords)))
        .service(api)
        .oneshot(
            Request::get("http://api.test/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy_core::Error");
    assert_eq!(e.to_string(), "the vault refused role orders-writer");
    assert_eq!(e.kind(), &ErrorKind::Auth);
}

/// A page whose request fails on the wire: the error's kind is the failure's, and the cause is in
/// its chain (`sturdy_core::find`).
#[tokio::test]
async fn pager_transport_failure() {
    let svc = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
    });
    let p = sturdy::paginate::Paginate::new(
        svc,
        "http://api.test/items",
        sturdy::paginate::LinkHeader::new(""),
    )
    .unwrap();
    let e = p.page(None, 5).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Connect, "{e}");
    assert!(sturdy::core::find::<std::io::Error>(&e).is_some(), "{e}");
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// "reported once per endpoint: a `tracing` warning and `.on_notice(|n| ..)`"; a malformed
/// `Deprecation` is no notice and no panic.
#[tokio::test]
async fn version_warning_once_per_endpoint() {
    let cap = Capture::default();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(cap.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::logs13_common::set_default(sub);
    let api = tower::service_fn(|r: Request<Full<Bytes>>| async move {
        let dep = if r.uri().path() == "/bad" {
            "@@nope"
        } else {
            "@1700000000"
        };
        Ok::<_, std::convert::Infallible>(
            Response::builder()
                .header("deprecation", dep)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let svc = ServiceBuilder::new()
        .layer(sturdy::version::VersionLayer::header("api-version", "1").unwrap())
        .service(api);
    for path in ["/a", "/a", "/bad", "/a"] {
        svc.clone()
            .oneshot(
                Request::get(format!("http://h.test{path}"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    let log = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    let warns: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warns.len(), 1, "{log}");
    assert!(warns[0].contains("/a"), "{log}");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let start = std::time::Duration::from_secs(5);
    let mut spins = 0u32;
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        spins += 1;
        assert!(spins < 10_000, "no progress outside a tokio runtime");
        std::thread::park_timeout(start / 1_000);
    }
}

/// "Without a tokio runtime (another executor), the handler runs in the request's future,
/// without lease renewal": a keyed request runs and its repeat is replayed.
#[test]
fn idempotency_without_a_tokio_runtime() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    let handler = tower::service_fn(move |_req: Request<axum::body::Body>| {
        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(201)
                    .body(axum::body::Body::from("made"))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        .service(handler);
    let req = || {
        Request::post("/orders")
            .header("idempotency-key", "no-rt")
            .body(axum::body::Body::from("x"))
            .unwrap()
    };
    let a = block_on(svc.clone().oneshot(req())).unwrap();
    let b = block_on(svc.oneshot(req())).unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201));
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// "handler panics | the panic is caught; the key is released ... | ... (or a 500 from a
/// panic-catching layer); a retry, even at once, runs the handler again" — with tower-http's
/// `CatchPanicLayer` outside the layer in an axum app.
#[tokio::test]
async fn panic_then_immediate_retry_under_catch_panic() {
    use axum::routing::post;
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(move || {
                let n = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    assert!(n > 0, "first run panics");
                    (http::StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let req = || {
        Request::post("/orders")
            .header("idempotency-key", "p1")
            .body(axum::body::Body::from("x"))
            .unwrap()
    };
    let a = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(a.status(), 500);
    let b = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(b.status(), 201);
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// `BoundedPage::items`: "at most the limit asked for (a limit of 0 reads as 1)";
/// `with_max_items`: "the largest `limit` a `page()` call honours".
#[tokio::test]
async fn page_limits_at_their_bounds() {
    let svc = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
            serde_json::to_string(&(0..100).collect::<Vec<u32>>()).unwrap(),
        ))))
    });
    let p = sturdy::paginate::Paginate::builder(
        svc,
        "http://api.test/items",
        sturdy::paginate::LinkHeader::new("").without_limit_param(),
    )
    .with_max_items(7)
    .build()
    .unwrap();
    assert_eq!(p.page(None, 0).await.unwrap().items.len(), 1);
    let big = p.page(None, 50).await.unwrap();
    assert_eq!(big.items.len(), 7);
    assert!(big.has_more);
}

/// "only the first `MAX_SIGNATURES` (16) `v1` entries of a Standard Webhooks or Stripe header
/// are considered" — Stripe.
#[tokio::test]
async fn stripe_sixteen_v1_entries() {
    use sturdy::webhook::{sign_stripe, MemoryQueue, Stripe, WebhookReceiver};
    let now = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (q, _rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(Stripe::new("whsec_s").unwrap(), q);
    let good = sign_stripe("whsec_s", now, b"{}");
    let v1 = good.split_once(",v1=").unwrap().1;
    for (fakes, want) in [(15usize, 200u16), (16, 401)] {
        let mut h = format!("t={now}");
        for _ in 0..fakes {
            h.push_str(&format!(",v1={}", "0".repeat(64)));
        }
        h.push_str(&format!(",v1={v1}"));
        let req = Request::post("/s")
            .header("stripe-signature", h)
            .body(axum::body::Body::from("{}"))
            .unwrap();
        assert_eq!(
            r.clone().oneshot(req).await.unwrap().status().as_u16(),
            want,
            "{fakes}"
        );
    }
}

/// "a circuit breaker around the auth layer does not count a failing token endpoint against the
/// API host": many calls failing for want of a token never open the API host's breaker.
#[tokio::test(start_paused = true)]
async fn failing_token_endpoint_never_opens_the_api_breaker() {
    let ep = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
    });
    let src =
        sturdy::auth::ClientCredentials::new(ep, "http://auth.test/token", "id", "s").unwrap();
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let svc = ServiceBuilder::new()
        .layer(sturdy::circuit::CircuitBreakerLayer::new())
        .layer(AuthLayer::oauth2(src))
        .service(api);
    for i in 0..200 {
        let err = svc
            .clone()
            .oneshot(
                Request::get("http://api.test/x")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(
            sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_none(),
            "call {i}: the API's breaker opened on token failures: {err}"
        );
        tokio::time::advance(std::time::Duration::from_millis(300)).await;
    }
}

/// "Secrets live in `secrecy` types ...; headers are marked sensitive; no `Debug` or log line
/// shows them" — the Basic credentials encoded, too; and a token endpoint that echoes the
/// client secret (raw, form-encoded, or as the Basic credentials it received) in its error words.
#[tokio::test]
async fn static_secrets_and_echoed_client_secret() {
    let b64 = b64enc(b"alice:pw+s3cr/t");
    let layers = [
        AuthLayer::basic("alice", "pw+s3cr/t").unwrap(),
        AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "pw+s3cr/t").unwrap(),
        AuthLayer::api_key_query("k", "pw+s3cr/t").unwrap(),
        AuthLayer::bearer("pw+s3cr/t").unwrap(),
    ];
    for l in &layers {
        let d = format!("{l:?}");
        assert!(!d.contains("s3cr") && !d.contains(&b64), "{d}");
    }
    let seen = Arc::new(Mutex::new(vec![]));
    let s = seen.clone();
    let api = tower::service_fn(move |r: Request<Full<Bytes>>| {
        s.lock().unwrap().push(r.headers().clone());
        async { Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    for l in layers.into_iter().take(2) {
        ServiceBuilder::new()
            .layer(l)
            .service(api.clone())
            .oneshot(
                Request::get("http://a.test/")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    {
        let seen = seen.lock().unwrap();
        assert!(seen[0]["authorization"].is_sensitive());
        assert!(seen[1]["x-api-key"].is_sensitive());
    }

    let secret = "cs+s3cr/t ok";
    let basic = b64enc(b"id:cs%2Bs3cr%2Ft+ok");
    for echoed in [
        secret.to_owned(),
        "cs%2Bs3cr%2Ft+ok".to_owned(),
        basic.clone(),
    ] {
        let body = serde_json::json!({
            "error": "invalid_client",
            "error_description": format!("client secret {echoed} is wrong")
        })
        .to_string();
        let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let b = body.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(401)
                        .body(Full::new(Bytes::from(b)))
                        .unwrap(),
                )
            }
        });
        let c = sturdy::auth::ClientCredentials::new(ep, "http://auth.test/token", "id", secret)
            .unwrap();
        let e = c.get().await.unwrap_err();
        for t in [e.to_string(), format!("{e:?}")] {
            assert!(
                !t.contains("s3cr") && !t.contains(&basic),
                "echo {echoed:?}: {t}"
            );
        }
    }
}

fn b64enc(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
