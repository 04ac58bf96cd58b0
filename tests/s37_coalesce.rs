//! s37: request coalescing (`sturdy-coalesce`, docs/guides/coalesce.md and its rustdoc) tested
//! from outside, on paused time against in-process services.

#![cfg(feature = "full")]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Request, Response};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::coalesce::{CoalesceHandle, CoalesceLayer, SharedError};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, CallOptions, ErrorKind};
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceExt};

type Rb = BoxBody<Bytes, BoxError>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn full(s: &'static str) -> Rb {
    Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed()
}

/// Answers "ok" after 50 ms; counts calls per method.
fn counting(
    seen: Arc<Mutex<Vec<String>>>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Rb>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        seen.lock()
            .unwrap()
            .push(format!("{} {}", req.method(), req.uri()));
        async move {
            tokio::time::sleep(ms(50)).await;
            Ok::<_, BoxError>(Response::new(full("ok")))
        }
    })
}

fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

async fn body_text(res: Response<sturdy::coalesce::ResponseBody<Rb>>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// Runs all requests at once (each spawned after the one before it was polled) and returns the
/// results in order.
async fn all_at_once<S>(svc: &S, reqs: Vec<Request<Full<Bytes>>>) -> Vec<Result<String, BoxError>>
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<sturdy::coalesce::ResponseBody<Rb>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let futs = reqs.into_iter().map(|r| {
        let s = svc.clone();
        async move {
            match s.oneshot(r).await {
                Ok(res) => Ok(body_text(res).await),
                Err(e) => Err(e),
            }
        }
    });
    futures_util::future::join_all(futs).await
}

/// docs/guides/coalesce.md: "Identical: same method, same URI ..., same headers (in any order
/// across names; the values of one name in the same order)". Two names in either order share;
/// two values of one name in another order do not.
#[tokio::test(start_paused = true)]
async fn s37_header_order_across_names_shares_within_a_name_does_not() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(counting(seen.clone()));
    let u = "http://api.example.com/r";
    let out = all_at_once(
        &svc,
        vec![
            req(Method::GET, u, &[("a", "1"), ("b", "2")]),
            req(Method::GET, u, &[("b", "2"), ("a", "1")]),
        ],
    )
    .await;
    assert!(out.iter().all(|r| r.as_ref().unwrap() == "ok"));
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "names in another order share"
    );
    let out = all_at_once(
        &svc,
        vec![
            req(Method::GET, u, &[("accept", "x"), ("accept", "y")]),
            req(Method::GET, u, &[("accept", "y"), ("accept", "x")]),
        ],
    )
    .await;
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "values of one name in another order do not share"
    );
    let s = handle.stats();
    assert_eq!((s.calls(), s.upstream(), s.joined()), (4, 3, 1));
}

/// docs/guides/coalesce.md: "What is coalesced: GET and HEAD requests whose body is empty ... and
/// that carry no `CallOptions` ... A GET with a body ... and every other method pass through
/// untouched" and "Identical: same method, same URI (scheme, authority, path and query)".
#[tokio::test(start_paused = true)]
async fn s37_what_is_and_is_not_coalesced() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(counting(seen.clone()));
    let u = "http://api.example.com/r?page=1";
    let with_body = || Request::get(u).body(Full::new(Bytes::from("q=1"))).unwrap();
    let with_options = || {
        let mut r = req(Method::GET, u, &[]);
        r.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
        r
    };
    let cases: Vec<(&str, Vec<Request<Full<Bytes>>>, usize)> = vec![
        (
            "two GETs",
            vec![req(Method::GET, u, &[]), req(Method::GET, u, &[])],
            1,
        ),
        (
            "two HEADs",
            vec![req(Method::HEAD, u, &[]), req(Method::HEAD, u, &[])],
            1,
        ),
        (
            "GET and HEAD",
            vec![req(Method::GET, u, &[]), req(Method::HEAD, u, &[])],
            2,
        ),
        (
            "two OPTIONS",
            vec![req(Method::OPTIONS, u, &[]), req(Method::OPTIONS, u, &[])],
            2,
        ),
        ("two GETs with a body", vec![with_body(), with_body()], 2),
        (
            "two GETs with CallOptions",
            vec![with_options(), with_options()],
            2,
        ),
        (
            "http and https",
            vec![
                req(Method::GET, u, &[]),
                req(Method::GET, "https://api.example.com/r?page=1", &[]),
            ],
            2,
        ),
        (
            "another query",
            vec![
                req(Method::GET, u, &[]),
                req(Method::GET, "http://api.example.com/r?page=2", &[]),
            ],
            2,
        ),
        (
            "another port",
            vec![
                req(Method::GET, u, &[]),
                req(Method::GET, "http://api.example.com:81/r?page=1", &[]),
            ],
            2,
        ),
        (
            "ignored trace ids differ",
            vec![
                req(
                    Method::GET,
                    u,
                    &[("x-request-id", "1"), ("traceparent", "a")],
                ),
                req(
                    Method::GET,
                    u,
                    &[("x-request-id", "2"), ("traceparent", "b")],
                ),
            ],
            1,
        ),
        (
            "a cookie differs",
            vec![
                req(Method::GET, u, &[("cookie", "s=1")]),
                req(Method::GET, u, &[("cookie", "s=2")]),
            ],
            2,
        ),
    ];
    for (name, reqs, want) in cases {
        seen.lock().unwrap().clear();
        let out = all_at_once(&svc, reqs).await;
        assert!(out.iter().all(|r| r.is_ok()), "{name}: {out:?}");
        assert_eq!(
            seen.lock().unwrap().len(),
            want,
            "{name}: {:?}",
            seen.lock().unwrap()
        );
    }
    assert_eq!(handle.stats().joined(), 3);
}

#[derive(Clone, Debug, PartialEq)]
struct Marker(u32);

/// docs/guides/coalesce.md: "every caller gets the status, headers, extensions and a
/// `ResponseBody` over the same bytes (and trailers)".
#[tokio::test(start_paused = true)]
async fn s37_followers_get_status_headers_extensions_and_trailers() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(ms(20)).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from("part1-"))),
            Ok(Frame::data(Bytes::from("part2"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body: Rb = BodyExt::boxed(StreamBody::new(stream::iter(frames)));
        let mut res = Response::builder()
            .status(206)
            .header("x-served-by", "one")
            .body(body)
            .unwrap();
        res.extensions_mut().insert(Marker(7));
        Ok::<_, BoxError>(res)
    });
    let svc = CoalesceLayer::new().layer(api);
    let futs = (0..3).map(|_| {
        svc.clone()
            .oneshot(req(Method::GET, "http://api.example.com/r", &[]))
    });
    let results = futures_util::future::join_all(futs).await;
    for (i, res) in results.into_iter().enumerate() {
        let res = res.unwrap();
        assert_eq!(res.status(), 206, "caller {i}");
        assert_eq!(res.headers()["x-served-by"], "one", "caller {i}");
        assert_eq!(
            res.extensions().get::<Marker>(),
            Some(&Marker(7)),
            "caller {i}: extensions"
        );
        assert!(res.body().is_shared(), "caller {i}");
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "part1-part2", "caller {i}");
        assert_eq!(
            trailers
                .as_ref()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().unwrap()),
            Some("abc"),
            "caller {i}: trailers"
        );
    }
}

/// docs/guides/coalesce.md: "each caller gets a `sturdy_core::Error` whose kind and delivery are
/// the shared error's ..., with the message \"the call shared by identical requests in flight
/// failed: <the error>\" ..., and whose source chain holds a `SharedError` and then the shared
/// error itself".
#[tokio::test(start_paused = true)]
async fn s37_a_shared_error_reaches_every_caller_with_its_words_kind_and_delivery() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(ms(20)).await;
        Err::<Response<Rb>, BoxError>(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "peer reset the stream",
        )))
    });
    let original: BoxError = Box::new(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "peer reset the stream",
    ));
    let want_kind = sturdy::core::classify::classify_error(&*original);
    let want_delivery = sturdy::core::classify::delivery(&*original);
    let svc = CoalesceLayer::new().layer(api);
    let out = all_at_once(
        &svc,
        (0..3)
            .map(|_| req(Method::GET, "http://api.example.com/r", &[]))
            .collect(),
    )
    .await;
    for (i, r) in out.into_iter().enumerate() {
        let err = r.unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text, "the call shared by identical requests in flight failed: peer reset the stream",
            "caller {i}"
        );
        let core = err
            .downcast_ref::<sturdy::core::Error>()
            .expect("a sturdy_core::Error");
        assert_eq!(*core.kind(), want_kind, "caller {i}");
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            want_delivery,
            "caller {i}"
        );
        assert!(sturdy::core::find::<SharedError>(&*err).is_some());
        let io = sturdy::core::find::<io::Error>(&*err).expect("the io::Error in the chain");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionReset);
    }
}

/// docs/guides/coalesce.md: "A body that fails while being read is an error of kind `Body`,
/// shared the same way."
#[tokio::test(start_paused = true)]
async fn s37_a_body_failing_halfway_is_a_body_error_for_every_caller() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(ms(20)).await;
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from("half"))),
            Err(Box::new(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "body cut after 4 bytes",
            ))),
        ];
        Ok::<_, BoxError>(Response::new(BodyExt::boxed(StreamBody::new(
            stream::iter(frames),
        ))))
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let out = all_at_once(
        &svc,
        (0..3)
            .map(|_| req(Method::GET, "http://api.example.com/r", &[]))
            .collect(),
    )
    .await;
    for (i, r) in out.into_iter().enumerate() {
        let err = r.unwrap_err();
        let core = err
            .downcast_ref::<sturdy::core::Error>()
            .unwrap_or_else(|| panic!("caller {i}: {err:?}"));
        assert_eq!(*core.kind(), ErrorKind::Body, "caller {i}: {err}");
        assert!(
            format!("{err}").contains("body cut after 4 bytes"),
            "caller {i}: {err}"
        );
    }
    assert_eq!(handle.in_flight("api.example.com"), 0);
}

/// docs/guides/coalesce.md: "Above the bound ... Every other caller sends its own request ... If
/// the caller that started the call has gone, the first other caller to look gets the response
/// instead." The leader is dropped after the call went out: of two followers one takes the
/// response, the other sends its own (two upstream requests in all).
#[tokio::test(start_paused = true)]
async fn s37_a_too_large_body_whose_leader_left_goes_to_a_follower() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(ms(50)).await;
            Ok::<_, BoxError>(Response::new(full("0123456789")))
        }
    });
    let (layer, handle) = CoalesceLayer::new().with_max_body(4).pair();
    let svc = layer.layer(api);
    let mut leader = tokio_test::task::spawn(svc.clone().oneshot(req(
        Method::GET,
        "http://api.example.com/big",
        &[],
    )));
    tokio_test::assert_pending!(leader.poll());
    let mut followers = Vec::new();
    for _ in 0..2 {
        let s = svc.clone();
        let mut f = tokio_test::task::spawn(async move {
            let res = s
                .oneshot(req(Method::GET, "http://api.example.com/big", &[]))
                .await?;
            Ok::<_, BoxError>(body_text(res).await)
        });
        tokio_test::assert_pending!(f.poll());
        followers.push(f);
    }
    assert_eq!(handle.stats().joined(), 2);
    drop(leader);
    for r in futures_util::future::join_all(followers).await {
        assert_eq!(r.unwrap(), "0123456789");
    }
    assert_eq!(
        n.load(Ordering::SeqCst),
        2,
        "one follower took the response"
    );
    let s = handle.stats();
    assert_eq!((s.too_large(), s.fallbacks()), (1, 1));
    assert_eq!(handle.in_flight("api.example.com"), 0);
}

/// docs/guides/coalesce.md: "A request that joins a call drops that ready service at once, which
/// gives back what it reserved (a `ConcurrencyLimit` permit, a `Buffer` slot)." Over
/// `ConcurrencyLimit(2)`: the leader holds one permit for its call, a joiner's permit comes back
/// at once, so another request's `poll_ready` is ready while the shared call is in flight.
#[tokio::test(start_paused = true)]
async fn s37_a_joiner_gives_back_its_concurrency_limit_permit_at_once() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(ConcurrencyLimitLayer::new(2).layer(counting(seen.clone())));
    let mut s1 = svc.clone();
    s1.ready().await.unwrap();
    let mut lead =
        tokio_test::task::spawn(s1.call(req(Method::GET, "http://api.example.com/a", &[])));
    tokio_test::assert_pending!(lead.poll());
    let mut s2 = svc.clone();
    s2.ready().await.unwrap();
    let mut join =
        tokio_test::task::spawn(s2.call(req(Method::GET, "http://api.example.com/a", &[])));
    tokio_test::assert_pending!(join.poll());
    assert_eq!(handle.stats().joined(), 1);
    let mut s3 = svc.clone();
    let mut ready3 = tokio_test::task::spawn(async move { s3.ready().await.map(|_| ()) });
    tokio_test::assert_ready_ok!(ready3.poll(), "the joiner's permit came back");
    drop(ready3);
    tokio::time::advance(ms(60)).await;
    let a = tokio_test::assert_ready_ok!(lead.poll());
    let b = tokio_test::assert_ready_ok!(join.poll());
    assert_eq!(body_text(a).await, "ok");
    assert_eq!(body_text(b).await, "ok");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// `CoalesceLayer::on_event`: "Calls `f` with an Event for every call that joins an identical call
/// in flight instead of sending its own (`Coalesced`)"; `Event::Coalesced`: key, "The host
/// called, when the layer keys by host", "The request's method".
#[tokio::test(start_paused = true)]
async fn s37_every_joiner_emits_one_coalesced_event() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = events.clone();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let svc = CoalesceLayer::new()
        .on_event(move |e| {
            if let Event::Coalesced { key, host, method } = e {
                e2.lock().unwrap().push(format!("{key} {host:?} {method}"));
            }
        })
        .layer(counting(seen.clone()));
    let out = all_at_once(
        &svc,
        vec![
            req(Method::HEAD, "http://api.example.com:8080/r", &[]),
            req(Method::HEAD, "http://api.example.com:8080/r", &[]),
            req(Method::HEAD, "http://api.example.com:8080/r", &[]),
            req(Method::GET, "http://api.example.com:8080/r", &[]),
        ],
    )
    .await;
    assert!(out.iter().all(|r| r.is_ok()));
    let line = "api.example.com:8080 Some(\"api.example.com:8080\") HEAD";
    assert_eq!(*events.lock().unwrap(), [line, line]);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// docs/guides/coalesce.md: "When the last caller leaves, the upstream call is dropped, which
/// cancels it ..., and it leaves the table ... The next identical request starts afresh." Callers
/// dropped at different await points (before the first poll, after joining) leave nothing.
#[tokio::test(start_paused = true)]
async fn s37_callers_dropped_at_every_point_leave_nothing_behind() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let d2 = dropped.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    struct OnDrop(Arc<AtomicUsize>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        let guard = OnDrop(d2.clone());
        async move {
            tokio::time::sleep(ms(1_000)).await;
            drop(guard);
            Ok::<_, BoxError>(Response::new(full("ok")))
        }
    });
    let (layer, handle): (CoalesceLayer, CoalesceHandle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let get = || req(Method::GET, "http://api.example.com/r", &[]);
    // Made but never polled.
    let never = svc.clone().oneshot(get());
    drop(never);
    assert_eq!(handle.in_flight("api.example.com"), 0);
    // Called on a ready service but never polled.
    let mut s = svc.clone();
    s.ready().await.unwrap();
    let unpolled = s.call(get());
    assert_eq!(handle.in_flight("api.example.com"), 1);
    let mut joiner = tokio_test::task::spawn(svc.clone().oneshot(get()));
    tokio_test::assert_pending!(joiner.poll());
    drop(unpolled);
    tokio_test::assert_pending!(joiner.poll());
    assert_eq!(
        handle.in_flight("api.example.com"),
        1,
        "the joiner keeps it"
    );
    drop(joiner);
    assert_eq!(handle.in_flight("api.example.com"), 0);
    let started = n.load(Ordering::SeqCst);
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        started,
        "upstream cancelled"
    );
    // Afresh.
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(body_text(res).await, "ok");
    assert_eq!(n.load(Ordering::SeqCst), started + 1);
}

/// `Event::Coalesced`: "The coalescing layer's key (`*` for a host past the host bound)"; "The
/// host called, when the layer keys by host"; `CoalesceLayer::with_max_hosts`: "past it, hosts
/// with nothing in flight are forgotten, then new hosts share one table".
#[tokio::test(start_paused = true)]
async fn s37_a_join_past_the_host_bound_names_star_and_the_host() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = events.clone();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (layer, handle) = CoalesceLayer::new()
        .with_max_hosts(1)
        .on_event(move |e| {
            if let Event::Coalesced { key, host, method } = e {
                e2.lock().unwrap().push(format!("{key} {host:?} {method}"));
            }
        })
        .pair();
    let svc = layer.layer(counting(seen.clone()));
    let out = all_at_once(
        &svc,
        vec![
            req(Method::GET, "http://a.example.com/r", &[]),
            req(Method::GET, "http://b.example.com/r", &[]),
            req(Method::GET, "http://b.example.com/r", &[]),
            req(Method::GET, "http://c.example.com/r", &[]),
        ],
    )
    .await;
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(*events.lock().unwrap(), ["* Some(\"b.example.com\") GET"]);
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(handle.in_flight("b.example.com"), 0);
}

/// docs/guides/coalesce.md: "Identical: same method, same URI (scheme, authority, path and
/// query) ... so callers with different credentials ... never share a response". Credentials in
/// the URI's userinfo are part of the authority: two users never share.
#[tokio::test(start_paused = true)]
async fn s37_different_userinfo_never_shares() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let svc = CoalesceLayer::new().layer(counting(seen.clone()));
    let out = all_at_once(
        &svc,
        vec![
            req(Method::GET, "http://alice:pw1@api.example.com/me", &[]),
            req(Method::GET, "http://bob:pw2@api.example.com/me", &[]),
            req(Method::GET, "http://api.example.com/me", &[]),
        ],
    )
    .await;
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(seen.lock().unwrap().len(), 3, "{:?}", seen.lock().unwrap());
}

/// A request body of unknown size that says it has ended.
#[derive(Default)]
struct Ended(bool);

impl http_body::Body for Ended {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(None)
    }
    fn is_end_stream(&self) -> bool {
        self.0
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::new()
    }
}

use std::convert::Infallible;

/// docs/guides/coalesce.md: "GET and HEAD requests whose body is empty (an exact size hint of 0 or
/// an ended body)". A body of unknown size that has ended is coalesced; one of unknown size that
/// has not ended passes through.
#[tokio::test(start_paused = true)]
async fn s37_an_ended_body_of_unknown_size_is_coalesced_an_open_one_is_not() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<Ended>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(ms(20)).await;
            Ok::<_, BoxError>(Response::new(full("ok")))
        }
    });
    let svc = CoalesceLayer::new().layer(api);
    let mk = |ended: bool| {
        Request::get("http://api.example.com/r")
            .body(Ended(ended))
            .unwrap()
    };
    let (a, b) = tokio::join!(svc.clone().oneshot(mk(true)), svc.clone().oneshot(mk(true)));
    assert!(a.unwrap().body().is_shared() && b.unwrap().body().is_shared());
    assert_eq!(n.load(Ordering::SeqCst), 1, "ended bodies share");
    let (a, b) = tokio::join!(
        svc.clone().oneshot(mk(false)),
        svc.clone().oneshot(mk(false))
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 3, "open bodies go on their own");
}
