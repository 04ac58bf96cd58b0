#![cfg(feature = "full")]
//! s57: an outside round on the auth layer's 401 handling (the hold of a token an API refuses
//! before it accepted anything with it): the numbers of the docs on paused time, concurrency,
//! composition with `Buffer`, `ConcurrencyLimit`, `Timeout` and `ClientBuilder`, cancellation at
//! seeded random points, custom token sources, hostile token endpoints and secrets in logs.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, BoxFuture, ClientCredentials, ExposeSecret, Token, TokenSource};
use sturdy::core::BoxError;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const TOKEN_URL: &str = "https://auth.s57.test/oauth/token";
const CLIENT_SECRET: &str = "cs-S57SECRET-qwerty";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Awaits `f`, failing (instead of hanging) after 600 s of (paused or real) time.
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(secs(600), f).await {
        Ok(v) => v,
        Err(_) => panic!("deadlock? {what} did not finish within 600 s"),
    }
}

fn get() -> Request<Full<Bytes>> {
    Request::get("https://api.s57.test/orders")
        .body(Full::default())
        .unwrap()
}

/// Small seeded generator (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A token endpoint: `tokSECRET-<n>` (n from 1) or one fixed value, with a given `expires_in`
/// text, after `delay`; logs when each request came.
#[derive(Clone)]
struct Ep {
    at: Arc<Mutex<Vec<Instant>>>,
    expires: Arc<Mutex<String>>,
    same: Option<&'static str>,
    delay: Duration,
    status: Arc<std::sync::atomic::AtomicU16>,
}

impl Ep {
    fn new(expires: &str) -> Self {
        Self {
            at: Arc::default(),
            expires: Arc::new(Mutex::new(expires.to_owned())),
            same: None,
            delay: Duration::ZERO,
            status: Arc::new(std::sync::atomic::AtomicU16::new(200)),
        }
    }
    fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    fn same_value(mut self, v: &'static str) -> Self {
        self.same = Some(v);
        self
    }
    fn count(&self) -> usize {
        self.at.lock().unwrap().len()
    }
    fn fetched(&self, n: usize) -> Instant {
        self.at.lock().unwrap()[n - 1]
    }
    fn source(&self) -> ClientCredentials {
        let me = self.clone();
        let svc = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                if !me.delay.is_zero() {
                    tokio::time::sleep(me.delay).await;
                }
                let n = {
                    let mut at = me.at.lock().unwrap();
                    at.push(Instant::now());
                    at.len()
                };
                let status = me.status.load(Ordering::SeqCst);
                if status != 200 {
                    return Ok(Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"down")))
                        .unwrap());
                }
                let value = match me.same {
                    Some(v) => v.to_owned(),
                    None => format!("tokSECRET-{n}"),
                };
                let expires = me.expires.lock().unwrap().clone();
                let body = format!(
                    r#"{{"access_token":"{value}","token_type":"Bearer","expires_in":{expires}}}"#
                );
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap(),
                )
            }
        });
        ClientCredentials::new(svc, TOKEN_URL, "s57-client", CLIENT_SECRET).unwrap()
    }
}

type Policy = Arc<dyn Fn(&str) -> u16 + Send + Sync>;

/// An API answering the status `policy(token)` after `delay`; logs (token, when).
#[derive(Clone)]
struct Api {
    calls: Arc<Mutex<Vec<(String, Instant)>>>,
    policy: Arc<Mutex<Policy>>,
    delay: Duration,
    www: Option<Arc<String>>,
}

impl Api {
    fn refusing() -> Self {
        Self {
            calls: Arc::default(),
            policy: Arc::new(Mutex::new(Arc::new(|_: &str| 401))),
            delay: Duration::ZERO,
            www: None,
        }
    }
    fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    fn set(&self, f: impl Fn(&str) -> u16 + Send + Sync + 'static) {
        *self.policy.lock().unwrap() = Arc::new(f);
    }
    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn tokens(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }
    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let token = auth.strip_prefix("Bearer ").unwrap_or("").to_owned();
                me.calls
                    .lock()
                    .unwrap()
                    .push((token.clone(), Instant::now()));
                if !me.delay.is_zero() {
                    tokio::time::sleep(me.delay).await;
                }
                let policy = me.policy.lock().unwrap().clone();
                let status = policy(&token);
                let mut b = Response::builder().status(status);
                if status == 401 {
                    let www = me
                        .www
                        .as_deref()
                        .cloned()
                        .unwrap_or_else(|| r#"Bearer error="invalid_token""#.to_owned());
                    b = b.header("www-authenticate", www);
                }
                Ok::<_, Infallible>(
                    b.body(Full::new(Bytes::from(format!("answer {status}"))))
                        .unwrap(),
                )
            }
        })
    }
}

async fn status_of<S>(svc: &S) -> StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    within("a call", svc.clone().oneshot(get()))
        .await
        .unwrap()
        .status()
}

/// Brings a fresh layer over a refusing API into its first hold: returns after the first call
/// (2 token requests, 2 API requests).
async fn into_hold<S>(svc: &S, ep: &Ep, api: &Api)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    assert_eq!(status_of(svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (ep.count(), api.count()),
        (2, 2),
        "first 401: new token, replay"
    );
}

// ---------------------------------------------------------------------------------------------
// The hold, on paused time.

/// "kept for 1 s from its fetch (doubling with each such token in a row, at most 60 s)": the
/// hold boundaries measured from the ep's log, 50 calls inside each hold costing no token.
#[tokio::test(start_paused = true)]
async fn holds_are_1_2_4_up_to_60_s_from_the_fetch_and_cost_one_api_request_per_call() {
    let ep = Ep::new("86400").delayed(ms(7));
    let api = Api::refusing().delayed(ms(3));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    let mut expect_hold = 1u64;
    for round in 0..10 {
        let fetched = ep.fetched(ep.count());
        let (tokens, calls) = (ep.count(), api.count());
        for _ in 0..5 {
            assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(
            (ep.count(), api.count()),
            (tokens, calls + 5),
            "round {round}"
        );
        let almost = fetched + secs(expect_hold) - ms(20);
        tokio::time::advance(almost.saturating_duration_since(Instant::now())).await;
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            ep.count(),
            tokens,
            "round {round}: still held {expect_hold} s"
        );
        tokio::time::advance(ms(40)).await;
        let calls = api.count();
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            (ep.count(), api.count()),
            (tokens + 1, calls + 2),
            "round {round}: hold of {expect_hold} s over: one token, a replay"
        );
        expect_hold = (expect_hold * 2).min(60);
    }
}

/// "what counts as accepted": any answer but a 401 (200, 403, 404, 429, 500) marks the held
/// token as one that worked, so its next 401 replaces it at once, with a replay.
#[tokio::test(start_paused = true)]
async fn any_non_401_answer_makes_a_held_token_one_that_worked() {
    for accepted in [200u16, 403, 404, 429, 500, 503] {
        let ep = Ep::new("3600");
        let api = Api::refusing();
        let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
        into_hold(&svc, &ep, &api).await;
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!((ep.count(), api.count()), (2, 3), "{accepted}: held");
        api.set(move |_| accepted);
        assert_eq!(status_of(&svc).await.as_u16(), accepted);
        assert_eq!(
            (ep.count(), api.count()),
            (2, 4),
            "{accepted}: no token request"
        );
        api.set(|_| 401);
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            (ep.count(), api.count()),
            (3, 6),
            "{accepted}: a token that worked is replaced at once, with a replay"
        );
    }
}

/// A revoked token (it worked) is replaced at once even right after its fetch; the new token
/// works and is used.
#[tokio::test(start_paused = true)]
async fn a_token_that_worked_then_refused_is_replaced_at_once_and_the_replay_succeeds() {
    let ep = Ep::new("3600");
    let api = Api::refusing();
    api.set(|_| 200);
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    assert_eq!(status_of(&svc).await, StatusCode::OK);
    api.set(|t| if t == "tokSECRET-1" { 401 } else { 200 });
    assert_eq!(status_of(&svc).await, StatusCode::OK);
    assert_eq!((ep.count(), api.count()), (2, 3));
    assert_eq!(api.tokens()[2], "tokSECRET-2");
}

/// During a hold the 401 comes back "as it is": status, headers (a 100 KB WWW-Authenticate)
/// and body. After a replay, the second 401 too.
#[tokio::test(start_paused = true)]
async fn held_401s_come_back_as_they_are_even_with_a_100_kb_www_authenticate() {
    let ep = Ep::new("3600");
    let mut api = Api::refusing();
    let www = format!(
        r#"Bearer realm="x", error_description="{}""#,
        "a".repeat(100_000)
    );
    api.www = Some(Arc::new(www.clone()));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    for n in 0..3 {
        let res = within("call", svc.clone().oneshot(get())).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(res.headers()["www-authenticate"], www.as_str(), "call {n}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(b"answer 401"), "call {n}");
    }
    assert_eq!((ep.count(), api.count()), (2, 4));
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

/// 64 concurrent callers on a held token: no token request, one API request each.
#[tokio::test(start_paused = true)]
async fn sixty_four_concurrent_callers_on_a_held_token_cost_no_token_request() {
    let ep = Ep::new("3600").delayed(ms(5));
    let api = Api::refusing().delayed(ms(10));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    let calls: Vec<_> = (0..64)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        let res = within("concurrent call", c).await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!((ep.count(), api.count()), (2, 66));
    assert!(api.tokens()[2..].iter().all(|t| t == "tokSECRET-2"));
}

/// 64 callers that all waited for the first token get its 401 together: one new token for all
/// (single flight), each replays once, and the next token's hold is the first (1 s), not one
/// lengthened by 64 refusals of the same token.
#[tokio::test(start_paused = true)]
async fn sixty_four_callers_mid_fetch_share_one_new_token_and_the_streak_counts_tokens() {
    let ep = Ep::new("86400").delayed(ms(20));
    let api = Api::refusing().delayed(ms(10));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let calls: Vec<_> = (0..64)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        let res = within("concurrent call", c).await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(ep.count(), 2, "one token for the 64 replays");
    assert_eq!(api.count(), 128, "each call replayed once");
    // Tok 2 is the second refused in a row: held 1 s from its fetch.
    let fetched = ep.fetched(2);
    tokio::time::advance((fetched + ms(900)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 2, "held 1 s");
    tokio::time::advance(ms(200)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 3, "the 1 s hold is over");
    let fetched = ep.fetched(3);
    tokio::time::advance((fetched + ms(1900)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 3, "held 2 s");
    tokio::time::advance(ms(200)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 4, "the 2 s hold is over");
}

/// The API refuses a held token for one request and accepts it for the others at the same time
/// (a new token not known yet on every API node): the 401 that came first (nothing accepted
/// yet) is returned as is; once one request was accepted the token worked, so its next 401
/// replaces it at once.
#[tokio::test(start_paused = true)]
async fn a_token_accepted_by_one_concurrent_request_counts_as_having_worked() {
    let ep = Ep::new("3600");
    let api = Api::refusing().delayed(ms(10));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    let flip = Arc::new(AtomicUsize::new(0));
    let f = flip.clone();
    api.set(move |_| {
        if f.fetch_add(1, Ordering::SeqCst) == 0 {
            401
        } else {
            200
        }
    });
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        within("call", c).await.unwrap().unwrap();
    }
    assert_eq!(
        ep.count(),
        2,
        "held: the 401s of the batch are returned as they are"
    );
    api.set(|_| 401);
    let (tokens, calls) = (ep.count(), api.count());
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (ep.count(), api.count()),
        (tokens + 1, calls + 2),
        "the token worked: replaced at once"
    );
}

// ---------------------------------------------------------------------------------------------
// Composition.

async fn kept_calls<S>(svc: &mut S, n: usize) -> Vec<StatusCode>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut out = Vec::new();
    for _ in 0..n {
        let ready = within("ready", svc.ready()).await.unwrap();
        let res = within("kept call", ready.call(get())).await.unwrap();
        out.push(res.status());
    }
    out
}

/// Auth over and under `Buffer`, over `ConcurrencyLimit(1)` and `Timeout`, driven by a kept
/// service and by `oneshot`: the first call replays, the held ones do not, nothing deadlocks.
#[tokio::test(start_paused = true)]
async fn held_tokens_through_buffer_concurrency_limit_and_timeout_kept_and_oneshot() {
    // Auth over Buffer(ConcurrencyLimit(1)(Timeout(api))).
    {
        let ep = Ep::new("3600").delayed(ms(5));
        let api = Api::refusing().delayed(ms(5));
        let inner = ServiceBuilder::new()
            .buffer(1)
            .concurrency_limit(1)
            .timeout(secs(5))
            .service(api.service());
        let mut svc = AuthLayer::oauth2(ep.source()).layer(inner);
        let st = kept_calls(&mut svc, 10).await;
        assert!(st.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
        assert_eq!((ep.count(), api.count()), (2, 11), "over buffer, kept");
        let calls: Vec<_> = (0..16)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for c in calls {
            within("c", c).await.unwrap().unwrap();
        }
        assert_eq!((ep.count(), api.count()), (2, 27), "over buffer, oneshot");
    }
    // Buffer(Auth(ConcurrencyLimit(1)(api))), kept and oneshot.
    {
        let ep = Ep::new("3600").delayed(ms(5));
        let api = Api::refusing().delayed(ms(5));
        let auth = AuthLayer::oauth2(ep.source()).layer(
            ServiceBuilder::new()
                .concurrency_limit(1)
                .service(api.service()),
        );
        let mut svc = tower::buffer::Buffer::new(auth, 1);
        let st = kept_calls(&mut svc, 10).await;
        assert!(st.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
        assert_eq!((ep.count(), api.count()), (2, 11), "under buffer, kept");
        let calls: Vec<_> = (0..16)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for c in calls {
            within("c", c).await.unwrap().unwrap();
        }
        assert_eq!((ep.count(), api.count()), (2, 27), "under buffer, oneshot");
    }
    // ConcurrencyLimit(1)(Timeout(Auth(api))) with a replay going on in each hold's end.
    {
        let ep = Ep::new("3600").delayed(ms(5));
        let api = Api::refusing().delayed(ms(5));
        let mut svc = ServiceBuilder::new()
            .concurrency_limit(1)
            .timeout(secs(5))
            .layer(AuthLayer::oauth2(ep.source()))
            .service(api.service());
        let st = kept_calls(&mut svc, 3).await;
        assert!(st.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
        tokio::time::advance(secs(2)).await;
        let st = kept_calls(&mut svc, 3).await;
        assert!(st.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
        assert_eq!((ep.count(), api.count()), (3, 8), "limit over auth");
    }
}

/// Inside `ClientBuilder` (retry, rate limit, breaker): a refusing API costs one API request per
/// held call (a 401 is not retried), one token per hold, and the breaker does not open on the
/// token endpoint's account; a kept client and oneshot both finish.
#[tokio::test(start_paused = true)]
async fn in_a_client_builder_stack_a_refusing_api_costs_one_request_per_held_call() {
    let ep = Ep::new("3600").delayed(ms(5));
    let api = Api::refusing().delayed(ms(5));
    let (breaker, _handle) = sturdy::circuit::CircuitBreakerLayer::new()
        .with_consecutive_failures(100)
        .pair();
    let mut client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(57))
        .with_rate_limit(sturdy::ratelimit::RateLimitLayer::new(
            sturdy::ratelimit::Quota::per_second(1000).unwrap(),
        ))
        .with_circuit_breaker(breaker)
        .with_auth(AuthLayer::oauth2(ep.source()))
        .build(api.service());
    let st = kept_calls(&mut client, 10).await;
    assert!(st.iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{st:?}");
    assert_eq!((ep.count(), api.count()), (2, 11));
    for _ in 0..10 {
        let res = within("oneshot", client.clone().oneshot(get()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!((ep.count(), api.count()), (2, 21));
    // The API starts accepting the held token (it was new): it works.
    api.set(|_| 200);
    let st = kept_calls(&mut client, 2).await;
    assert_eq!(st, vec![StatusCode::OK; 2]);
    api.set(|t| if t == "tokSECRET-2" { 401 } else { 200 });
    let st = kept_calls(&mut client, 1).await;
    assert_eq!(
        st,
        vec![StatusCode::OK],
        "revoked: replaced at once, replayed"
    );
    assert_eq!(ep.count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Cancellation.

/// A call dropped at a seeded random point (waiting for its token, during its first send, after
/// the 401 while the new token is fetched, during the replay, or on a held token): the source
/// still works afterwards, the next call gets a token and an answer, no single flight is stuck.
#[tokio::test(start_paused = true)]
async fn calls_dropped_at_random_points_leave_the_source_working() {
    let mut rng = Rng(0x5757_0001);
    for round in 0..200 {
        let ep = Ep::new("3600").delayed(ms(20));
        let api = Api::refusing().delayed(ms(10));
        // Refuses the first token only (a revoked one), or every token (the hold).
        let refuse_all = round % 2 == 1;
        if !refuse_all {
            api.set(|t| if t == "tokSECRET-1" { 401 } else { 200 });
        }
        let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
        let before_cut = rng.below(3);
        for _ in 0..before_cut {
            within("warm-up", svc.clone().oneshot(get())).await.unwrap();
        }
        let cut = ms(rng.below(75));
        let _ = tokio::time::timeout(cut, svc.clone().oneshot(get())).await;
        if rng.below(2) == 0 {
            // Let what the dropped call started go on a bit, or not.
            tokio::time::advance(ms(rng.below(40))).await;
        }
        let res = within("call after a cancelled one", svc.clone().oneshot(get()))
            .await
            .unwrap();
        let want = if refuse_all {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        assert_eq!(res.status(), want, "round {round}, cut {cut:?}");
        assert!(ep.count() <= 3, "round {round}: {} tokens", ep.count());
        // And long after, on a new hold or an expired token, still.
        tokio::time::advance(secs(3_700)).await;
        let res = within("call much later", svc.clone().oneshot(get()))
            .await
            .unwrap();
        assert_eq!(res.status(), want, "round {round}, later");
    }
}

/// The same with 16 concurrent callers, some dropped at random points mid-flight.
#[tokio::test(start_paused = true)]
async fn concurrent_callers_some_dropped_do_not_strand_the_others() {
    let mut rng = Rng(0x5757_0002);
    for round in 0..40 {
        let ep = Ep::new("3600").delayed(ms(20));
        let api = Api::refusing().delayed(ms(10));
        let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
        let mut handles = Vec::new();
        for _ in 0..16 {
            let cut = if rng.below(2) == 0 {
                Some(ms(rng.below(75)))
            } else {
                None
            };
            let call = svc.clone().oneshot(get());
            handles.push(tokio::spawn(async move {
                match cut {
                    Some(c) => tokio::time::timeout(c, call).await.ok().map(|r| r.unwrap()),
                    None => Some(call.await.unwrap()),
                }
            }));
        }
        for h in handles {
            if let Some(res) = within("survivor", h).await.unwrap() {
                assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "round {round}");
            }
        }
        assert!(ep.count() <= 3, "round {round}: {} tokens", ep.count());
        api.set(|_| 200);
        tokio::time::advance(secs(61)).await;
        assert_eq!(status_of(&svc).await, StatusCode::OK, "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// Custom token sources.

#[derive(Debug, Default)]
struct Counting {
    n: AtomicUsize,
    invalidated: AtomicUsize,
    rejected: AtomicUsize,
    keep: bool,
}

#[derive(Debug, Clone)]
struct Src(Arc<Counting>);

impl TokenSource for Src {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let n = self.0.n.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Ok(Token::new(format!("custom-{n}"), None)) })
    }
    fn invalidate(&self, _token: &Token) {
        self.0.invalidated.fetch_add(1, Ordering::SeqCst);
    }
    fn reject(&self, token: &Token) -> bool {
        self.0.rejected.fetch_add(1, Ordering::SeqCst);
        if self.0.keep {
            false
        } else {
            self.invalidate(token);
            true
        }
    }
}

/// The default `reject` (invalidate + `true`).
#[derive(Debug, Clone)]
struct DefaultSrc(Arc<Counting>);

impl TokenSource for DefaultSrc {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let n = self.0.n.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Ok(Token::new(format!("default-{n}"), None)) })
    }
    fn invalidate(&self, _token: &Token) {
        self.0.invalidated.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_whose_reject_answers_false_gets_no_replay_and_no_rejected_event() {
    let c = Arc::new(Counting {
        keep: true,
        ..Counting::default()
    });
    let api = Api::refusing();
    let events = Arc::new(AtomicUsize::new(0));
    let e = events.clone();
    let svc = new_token_source_for_test(Src(c.clone()), move || {
        e.fetch_add(1, Ordering::SeqCst);
    })
    .layer(api.service());
    for n in 1..=5 {
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(api.count(), n, "no replay");
    }
    assert_eq!(c.rejected.load(Ordering::SeqCst), 5);
    assert_eq!(c.invalidated.load(Ordering::SeqCst), 0);
    assert_eq!(c.n.load(Ordering::SeqCst), 5, "one token() per call");
    assert_eq!(events.load(Ordering::SeqCst), 0, "no TokenRejected");
}

#[tokio::test(start_paused = true)]
async fn a_source_with_the_default_reject_is_replayed_once_per_call() {
    let c = Arc::new(Counting::default());
    let api = Api::refusing();
    let events = Arc::new(AtomicUsize::new(0));
    let e = events.clone();
    let svc = new_token_source_for_test(DefaultSrc(c.clone()), move || {
        e.fetch_add(1, Ordering::SeqCst);
    })
    .layer(api.service());
    for n in 1..=5 {
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(api.count(), 2 * n, "a replay per call");
    }
    let t = api.tokens();
    assert_eq!(t[0], "default-1");
    assert_eq!(t[1], "default-2");
    assert_eq!(c.n.load(Ordering::SeqCst), 10);
    // "a 401 ... invalidates the token": both 401s of each call (the second returned as is).
    assert!(c.invalidated.load(Ordering::SeqCst) >= 5);
    assert_eq!(
        events.load(Ordering::SeqCst),
        5,
        "one TokenRejected per replay"
    );

    // With a ClientCredentials source, 401s during a hold make no TokenRejected event either.
    let ep = Ep::new("3600");
    let api = Api::refusing();
    let events = Arc::new(AtomicUsize::new(0));
    let e = events.clone();
    let svc = AuthLayer::oauth2(ep.source())
        .on_event(move |ev| {
            if matches!(ev, sturdy::core::events::Event::TokenRejected { .. }) {
                e.fetch_add(1, Ordering::SeqCst);
            }
        })
        .layer(api.service());
    for _ in 0..10 {
        status_of(&svc).await;
    }
    assert_eq!((ep.count(), api.count()), (2, 11));
    assert_eq!(events.load(Ordering::SeqCst), 1, "one replay, one event");
}

/// `AuthLayer::token_source` with a counter of `TokenRejected` events.
fn new_token_source_for_test(
    src: impl TokenSource,
    on_rejected: impl Fn() + Send + Sync + 'static,
) -> AuthLayer {
    AuthLayer::token_source(Arc::new(src)).on_event(move |ev| {
        if matches!(ev, sturdy::core::events::Event::TokenRejected { .. }) {
            on_rejected();
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Hostile token endpoints.

/// A token endpoint that hands out the same value every time (a provider caching its tokens):
/// bounded token requests, holds still apply, and when the API starts accepting it, it works.
#[tokio::test(start_paused = true)]
async fn a_token_endpoint_returning_the_same_value_every_time() {
    let ep = Ep::new("3600").same_value("sameSECRET").delayed(ms(5));
    let api = Api::refusing().delayed(ms(5));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    let calls: Vec<_> = (0..32)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        within("c", c).await.unwrap().unwrap();
    }
    assert_eq!((ep.count(), api.count()), (2, 34), "held");
    api.set(|_| 200);
    assert_eq!(status_of(&svc).await, StatusCode::OK);
    api.set(|_| 401);
    // It worked, so it is replaced at once (with the same value), and replayed once.
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!((ep.count(), api.count()), (3, 37));
    // Then the holds again: the next call fetches (the first never-accepted one was dropped),
    // and the one after is held.
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert!(ep.count() <= 4, "{}", ep.count());
}

/// A token is never sent after its `expires_in`, hold or not: a 10 s token that the API refuses
/// is held 1, 2, 4, 8 s, then the hold (16 s...) would outlast it.
#[tokio::test(start_paused = true)]
async fn a_held_token_is_not_sent_after_it_expired() {
    let ep = Ep::new("10");
    let api = Api::refusing();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    for _ in 0..400 {
        status_of(&svc).await;
        tokio::time::advance(ms(500)).await;
    }
    let calls = api.calls.lock().unwrap().clone();
    for (t, at) in calls {
        let n: usize = t.strip_prefix("tokSECRET-").unwrap().parse().unwrap();
        let age = at - ep.fetched(n);
        assert!(
            age < secs(10),
            "{t} sent {age:?} after its fetch (expires_in 10)"
        );
    }
    // No more than a token request per hold, roughly: 200 s of calls.
    assert!(ep.count() < 60, "{} token requests", ep.count());
}

/// Odd `expires_in` values with a refusing API: huge (clamped to 24 h), 1e400, fractional, 1;
/// each call finishes and token requests stay bounded.
#[tokio::test(start_paused = true)]
async fn odd_expires_in_with_a_refusing_api() {
    for exp in [
        "1e400",
        "18446744073709551616",
        "86400000000",
        "1",
        "1.5",
        "2",
    ] {
        let ep = Ep::new(exp);
        let api = Api::refusing();
        let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
        for _ in 0..100 {
            let res = within("call", svc.clone().oneshot(get())).await;
            if let Ok(res) = res {
                assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{exp}");
            }
            tokio::time::advance(ms(100)).await;
        }
        // 10 s of calls: holds 1, 2, 4 s; a token of lifetime L is refreshed every L / 2.
        let bound = match exp {
            "1" | "1.5" => 25,
            "2" => 16,
            _ => 6,
        };
        assert!(ep.count() <= bound, "{exp}: {} token requests", ep.count());
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets.

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// No client secret or token in a TRACE log, an error's Display/Debug, or the Debug of the layer,
/// the source or a token, over the hold, the replay, a revoked token and failing token requests.
#[tokio::test(start_paused = true)]
async fn no_secret_in_trace_logs_errors_or_debug_across_holds() {
    let cap = Captured::default();
    let w = cap.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(sub);

    let ep = Ep::new("3600");
    let api = Api::refusing();
    let src = ep.source();
    let layer = AuthLayer::oauth2(src.clone());
    let svc = layer.clone().layer(api.service());
    let mut dbg = vec![format!("{layer:?}"), format!("{src:?}")];
    for _ in 0..5 {
        status_of(&svc).await;
    }
    tokio::time::advance(secs(2)).await;
    api.set(|_| 200);
    status_of(&svc).await;
    api.set(|_| 401);
    status_of(&svc).await;
    let t = src.token().await.unwrap();
    dbg.push(format!("{t:?}"));
    dbg.push(format!("{layer:?} {src:?}"));

    // A token endpoint that echoes the request (the secret, the Basic header) in an error.
    let echo = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let text = format!(
            r#"{{"error":"invalid_client","error_description":"got {} {}"}}"#,
            auth,
            String::from_utf8_lossy(&body)
        );
        Ok::<_, Infallible>(
            Response::builder()
                .status(401)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(text)))
                .unwrap(),
        )
    });
    let bad = ClientCredentials::new(echo, TOKEN_URL, "s57-client", CLIENT_SECRET)
        .unwrap()
        .with_client_auth(sturdy::auth::ClientAuth::SecretPost);
    let bad_svc = AuthLayer::oauth2(bad).layer(api.service());
    let err = within("bad", bad_svc.oneshot(get())).await.unwrap_err();
    dbg.push(format!("{err} {err:?}"));
    drop(_guard);

    let log = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    for text in dbg.iter().chain(std::iter::once(&log)) {
        for secret in [CLIENT_SECRET, "tokSECRET", "S57SECRET"] {
            assert!(
                !text.contains(secret),
                "{secret} in: {}",
                &text[..text.len().min(2000)]
            );
        }
    }
    let _ = t.secret().expose_secret();
}

// ---------------------------------------------------------------------------------------------
// More of the hold: late 401s, the source driven directly, bodies that cannot be replayed.

/// `ClientCredentials` through the `TokenSource` trait: the first refused token is forgotten
/// (`reject` says replay), the second in a row is kept (`reject` says no replay, `token` hands it
/// out again without a request) until 1 s from its fetch; rejecting it again during the hold
/// does not lengthen the hold; a stale token's rejection says a replay is worth it.
#[tokio::test(start_paused = true)]
async fn client_credentials_reject_through_the_trait() {
    let ep = Ep::new("3600");
    let src = ep.source();
    let t1 = src.token().await.unwrap();
    assert!(src.reject(&t1), "first refusal: replaced at once");
    let t2 = src.token().await.unwrap();
    assert_eq!(ep.count(), 2);
    assert!(!t2.same_value(&t1));
    assert!(!src.reject(&t2), "second in a row: kept");
    for _ in 0..10 {
        let t = src.token().await.unwrap();
        assert!(t.same_value(&t2), "held: the same token");
        assert!(!src.reject(&t), "held: no replay");
    }
    assert_eq!(ep.count(), 2);
    // A stale token (t1) rejected late: the next token is another one, so a replay is worth it;
    // it must not drop the held t2.
    let late = src.reject(&t1);
    assert!(
        late,
        "t1 is no longer cached: the next token is another one"
    );
    assert!(src.token().await.unwrap().same_value(&t2));
    assert_eq!(ep.count(), 2);
    // The hold ends 1 s after t2's fetch, however often it was refused meanwhile.
    tokio::time::advance((ep.fetched(2) + ms(1010)).saturating_duration_since(Instant::now()))
        .await;
    let t = src.token().await.unwrap();
    assert!(src.reject(&t), "hold over: replaced");
    let t3 = src.token().await.unwrap();
    assert_eq!(ep.count(), 3);
    assert!(!src.reject(&t3), "third in a row: kept (2 s)");
    tokio::time::advance((ep.fetched(3) + ms(1990)).saturating_duration_since(Instant::now()))
        .await;
    assert!(!src.reject(&t3), "still in its 2 s hold");
    tokio::time::advance(ms(30)).await;
    assert!(src.reject(&t3), "2 s hold over");
}

/// Calls on a held token still in flight when the hold ends: their 401s come back after it;
/// together they cost one token request (single flight), each replays once, and the next hold
/// is the next step (2 s), not lengthened by the 64 late refusals of one token.
#[tokio::test(start_paused = true)]
async fn sixty_four_calls_whose_401s_arrive_after_the_hold_ended() {
    let ep = Ep::new("86400").delayed(ms(5));
    let api = Api::refusing().delayed(ms(20));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    let end = ep.fetched(2) + secs(1);
    tokio::time::advance((end - ms(10)).saturating_duration_since(Instant::now())).await;
    let calls: Vec<_> = (0..64)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        let res = within("c", c).await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(ep.count(), 3, "one new token for all of them");
    assert_eq!(api.count(), 2 + 128, "each replayed once");
    let f3 = ep.fetched(3);
    tokio::time::advance((f3 + ms(1950)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 3, "held 2 s");
    tokio::time::advance(ms(100)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 4, "2 s, not longer");
}

/// A slow call sent with the held token answers 401 only after the hold ended and another call
/// replaced the token: the late 401 is about a token no longer used, so it neither drops the new
/// token nor lengthens its hold; the slow call replays with the new token.
#[tokio::test(start_paused = true)]
async fn a_late_401_for_a_replaced_token_does_not_touch_the_new_one() {
    let ep = Ep::new("86400");
    let api = Api::refusing();
    let src = ep.source();
    // Two services sharing one source (clones share one cache); the second API path is slow.
    let fast = AuthLayer::oauth2(src.clone()).layer(api.service());
    let first = Arc::new(AtomicUsize::new(0));
    let inner = api.service();
    let slow_path = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let (first, inner) = (first.clone(), inner.clone());
        async move {
            let res = inner.oneshot(req).await;
            if first.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(secs(3)).await;
            }
            res
        }
    });
    let slow = AuthLayer::oauth2(src.clone()).layer(slow_path);
    into_hold(&fast, &ep, &api).await;
    // Sent on tok-2 during its hold; answered 3 s later.
    let late = tokio::spawn(slow.clone().oneshot(get()));
    tokio::time::advance(ms(1)).await;
    assert_eq!(api.count(), 3, "the slow call was sent on tok-2");
    tokio::time::advance(ms(1499)).await;
    // The hold is over: tok-2 is refused and replaced by tok-3, whose refusal holds it 2 s.
    assert_eq!(status_of(&fast).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 3);
    // The slow call's 401 (about tok-2) arrives now.
    let res = within("late", late).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let toks = api.tokens();
    assert_eq!(ep.count(), 3, "tok-3 is kept: {toks:?}");
    // tok-3's hold is 2 s from its fetch, and the token still tok-3 until then.
    let f3 = ep.fetched(3);
    tokio::time::advance((f3 + ms(1950)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&fast).await, StatusCode::UNAUTHORIZED);
    let t0 = ep.fetched(1);
    let trace: Vec<_> = api
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(t, at)| (t.clone(), *at - t0))
        .collect();
    let fetches: Vec<_> = ep.at.lock().unwrap().iter().map(|at| *at - t0).collect();
    assert_eq!(ep.count(), 3, "held 2 s: {trace:?} fetches {fetches:?}");
    assert_eq!(api.tokens().last().unwrap(), "tokSECRET-3");
    tokio::time::advance(ms(100)).await;
    assert_eq!(status_of(&fast).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 4, "2 s, not longer");
}

/// A body too large to replay, on a held token: sent once, its 401 returned as is, and no
/// token request per call either; a small body on the next call is fine.
#[tokio::test(start_paused = true)]
async fn bodies_too_large_to_replay_on_a_refusing_api() {
    let ep = Ep::new("3600");
    let api = Api::refusing();
    let svc = AuthLayer::oauth2(ep.source())
        .with_replay_limit(16)
        .layer(api.service());
    let big = || {
        Request::post("https://api.s57.test/orders")
            .body(Full::new(Bytes::from(vec![b'x'; 1024])))
            .unwrap()
    };
    for n in 0..10 {
        let res = within("big", svc.clone().oneshot(big())).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{n}");
    }
    assert_eq!(api.count(), 10, "sent once each");
    assert!(
        ep.count() <= 2,
        "{} token requests for 10 calls",
        ep.count()
    );
    api.set(|_| 200);
    assert_eq!(status_of(&svc).await, StatusCode::OK);
}

/// A slow token endpoint (1.5 s per token): the hold counts from the fetch, so a call right
/// after the token came is held, not charged a token request.
#[tokio::test(start_paused = true)]
async fn a_slow_token_endpoint_still_gets_its_hold() {
    let ep = Ep::new("3600").delayed(ms(1500));
    let api = Api::refusing();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    for _ in 0..10 {
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        (ep.count(), api.count()),
        (2, 12),
        "held right after a slow fetch"
    );
}

/// On a multi-thread runtime, 64 callers on a cold cache over a refusing API, 20 rounds: one
/// token for the first 401s, one replay each, then the held token for the next 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_callers_on_a_refusing_api() {
    for round in 0..20 {
        // Delays (real time, short) so that the 64 all wait for the first token.
        let ep = Ep::new("3600").delayed(ms(20));
        let api = Api::refusing().delayed(ms(10));
        let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
        let calls: Vec<_> = (0..64)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for c in calls {
            let res = within("c", c).await.unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        }
        let toks = api.tokens();
        let first = toks.iter().filter(|t| *t == "tokSECRET-1").count();
        assert_eq!(
            (ep.count(), api.count(), first),
            (2, 128, 64),
            "round {round}"
        );
        let calls: Vec<_> = (0..64)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for c in calls {
            within("c", c).await.unwrap().unwrap();
        }
        // Real time: the 1 s hold of tok-2 may just have ended on a slow machine.
        let started = ep.fetched(2);
        if started.elapsed() < ms(900) {
            assert_eq!((ep.count(), api.count()), (2, 192), "round {round}");
        }
    }
}

/// The end of a hold under `Buffer(1)` and `ConcurrencyLimit(1)`, 16 concurrent callers, kept
/// and oneshot: one token request, each call at most one replay, no deadlock.
#[tokio::test(start_paused = true)]
async fn hold_ends_under_buffer_and_concurrency_limit_with_concurrent_callers() {
    let ep = Ep::new("3600").delayed(ms(5));
    let api = Api::refusing().delayed(ms(5));
    let auth = AuthLayer::oauth2(ep.source()).layer(
        ServiceBuilder::new()
            .buffer(1)
            .concurrency_limit(1)
            .service(api.service()),
    );
    let svc = tower::buffer::Buffer::new(auth, 1);
    into_hold(&svc, &ep, &api).await;
    tokio::time::advance(secs(2)).await;
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    svc.oneshot(get()).await
                } else {
                    let s = svc.ready().await?;
                    s.call(get()).await
                }
            })
        })
        .collect();
    for c in calls {
        let res = within("c", c).await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(ep.count(), 3, "one token for the end of the hold");
    assert!(api.count() <= 2 + 32, "{}", api.count());
    assert!(api.count() >= 2 + 17, "{}", api.count());
}

/// 64 callers all sent with the first token, whose 401s come back spread over 0-60 ms (seeded),
/// while the second token is fetched (5 ms), used by the first replays and refused: every
/// call's 401 is about the first token, which is replaced at once, so every call replays once
/// (with the second token, whose 401s are then returned as they are); one token request more.
#[tokio::test(start_paused = true)]
async fn spread_out_401s_for_the_first_token_each_get_their_replay() {
    for seed in 0..20u64 {
        let ep = Ep::new("3600").delayed(ms(5));
        let api = Api::refusing();
        let mut rng = Rng(0x5757_0100 + seed);
        let delays: Arc<Mutex<Vec<u64>>> =
            Arc::new(Mutex::new((0..64).map(|_| rng.below(60)).collect()));
        let inner = api.service();
        let jitter = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let d = delays.lock().unwrap().pop().unwrap_or(0);
            let inner = inner.clone();
            async move {
                let res = inner.oneshot(req).await;
                tokio::time::sleep(ms(d)).await;
                res
            }
        });
        let svc = AuthLayer::oauth2(ep.source()).layer(jitter);
        let calls: Vec<_> = (0..64)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for c in calls {
            let res = within("c", c).await.unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        }
        let toks = api.tokens();
        let first = toks.iter().filter(|t| *t == "tokSECRET-1").count();
        assert_eq!(first, 64, "seed {seed}");
        assert_eq!(
            (ep.count(), api.count()),
            (2, 128),
            "seed {seed}: each 401 of tok-1 replayed once"
        );
    }
}

/// An attempt that failed without an answer (a `Timeout` under the layer) is not an answer of
/// the API: it does not make a held token one that worked, so the next 401 is still held.
#[tokio::test(start_paused = true)]
async fn an_error_without_an_answer_does_not_count_as_accepted() {
    let ep = Ep::new("3600");
    let api = Api::refusing();
    let inner = api.service();
    let stall = Arc::new(AtomicUsize::new(0));
    let st = stall.clone();
    let stalling = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let inner = inner.clone();
        let stall = st.load(Ordering::SeqCst) > 0;
        async move {
            if stall {
                std::future::pending::<()>().await;
            }
            inner.oneshot(req).await
        }
    });
    let svc = AuthLayer::oauth2(ep.source())
        .layer(ServiceBuilder::new().timeout(ms(100)).service(stalling));
    into_hold(&svc, &ep, &api).await;
    stall.store(1, Ordering::SeqCst);
    for _ in 0..3 {
        let r = within("stalled", svc.clone().oneshot(get())).await;
        assert!(r.is_err());
    }
    stall.store(0, Ordering::SeqCst);
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (ep.count(), api.count()),
        (2, 3),
        "still held: a timeout is not an acceptance"
    );
}

/// The hold ends while the token endpoint is down (503): the call that finds the held token
/// refused gets an error that says the API may have seen the request (it answered the first
/// send), retryable, naming the token endpoint, with no secret; the next caller gets the
/// backoff's error at once, not sent; once the endpoint is back, the new token's refusal is
/// held (the one before it went the same way).
#[tokio::test(start_paused = true)]
async fn the_hold_ends_while_the_token_endpoint_is_down() {
    let ep = Ep::new("3600");
    let api = Api::refusing();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    tokio::time::advance(secs(2)).await;
    ep.status.store(503, Ordering::SeqCst);
    let err = within("down", svc.clone().oneshot(get()))
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy error");
    let text = format!("{err} {err:?}");
    assert!(e.is_retryable(), "{text}");
    assert!(text.contains("auth.s57.test"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::MaybeProcessed,
        "{text}"
    );
    assert_eq!(api.count(), 3);
    let err = within("backoff", svc.clone().oneshot(get()))
        .await
        .unwrap_err();
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    assert_eq!(api.count(), 3, "not sent during the backoff");
    ep.status.store(200, Ordering::SeqCst);
    tokio::time::advance(secs(2)).await;
    let before = ep.count();
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), before + 1);
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), before + 1, "held");
}

/// A call waiting for its token under `Auth` over `Buffer(1)` and `ConcurrencyLimit(1)`, dropped
/// while it waits, gives its place back: the next caller is not blocked behind it.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_waiting_for_a_token_frees_its_place() {
    let ep = Ep::new("3600").delayed(secs(1));
    let api = Api::refusing();
    api.set(|_| 200);
    let mut svc = AuthLayer::oauth2(ep.source()).layer(
        ServiceBuilder::new()
            .buffer(1)
            .concurrency_limit(1)
            .service(api.service()),
    );
    let ready = within("ready", svc.ready()).await.unwrap();
    let waiting = ready.call(get());
    let _ = tokio::time::timeout(ms(100), waiting).await;
    let mut other = svc.clone();
    let res = within("next", async {
        other.ready().await.unwrap().call(get()).await
    })
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(ep.count(), 1);
}

/// A token that worked is revoked under 64 concurrent calls: one new token for all of them (each
/// replays once), that new token's 64 refusals are one token refused, so the token after it is
/// held 1 s (not longer), then 2 s.
#[tokio::test(start_paused = true)]
async fn a_revocation_storm_counts_tokens_not_refusals() {
    let ep = Ep::new("86400").delayed(ms(5));
    let api = Api::refusing().delayed(ms(10));
    api.set(|_| 200);
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    assert_eq!(status_of(&svc).await, StatusCode::OK);
    api.set(|_| 401);
    let calls: Vec<_> = (0..64)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        let res = within("c", c).await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        (ep.count(), api.count()),
        (2, 1 + 128),
        "one new token, 64 replays"
    );
    // tok-2 never worked, after one that did: dropped, not held; tok-3 is then held 1 s.
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 3);
    let f3 = ep.fetched(3);
    tokio::time::advance((f3 + ms(950)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 3, "held 1 s");
    tokio::time::advance(ms(100)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 4, "1 s, not longer");
    let f4 = ep.fetched(4);
    tokio::time::advance((f4 + ms(1950)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 4, "held 2 s");
    tokio::time::advance(ms(100)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), 5, "2 s, not longer");
}

/// `with_token_timeout(Duration::ZERO)` ("the cached token or fail at once") at the end of a
/// hold: the refused token is dropped, the replay finds no cached token and fails at once (the
/// API saw the first send), the token request goes on, and the next call uses its token.
#[tokio::test(start_paused = true)]
async fn a_zero_token_timeout_at_the_end_of_a_hold() {
    let ep = Ep::new("3600").delayed(ms(20));
    let api = Api::refusing();
    let warm = AuthLayer::oauth2(ep.source());
    let svc = warm
        .clone()
        .with_token_timeout(Duration::ZERO)
        .layer(api.service());
    // Into the hold with waits allowed (the same source and cache).
    let waiting = warm.layer(api.service());
    into_hold(&waiting, &ep, &api).await;
    let res = within("held", svc.clone().oneshot(get())).await;
    assert_eq!(
        res.expect("held: the cached token, no wait").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!((ep.count(), api.count()), (2, 3), "held, no wait needed");
    tokio::time::advance(secs(2)).await;
    let started = Instant::now();
    let err = within("zero", svc.clone().oneshot(get()))
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO, "at once: {err}");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("sturdy error");
    assert_eq!(e.kind(), &sturdy::core::ErrorKind::Timeout, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::MaybeProcessed,
        "{err}"
    );
    // (sleep, not advance: the token task spawned just now must get to run and be driven.)
    tokio::time::sleep(ms(30)).await;
    let res = within("after", svc.clone().oneshot(get())).await;
    assert_eq!(
        res.expect("the token request went on").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(ep.count(), 3, "the token request went on; its token used");
    assert_eq!(api.tokens().last().unwrap(), "tokSECRET-3");
}

/// Token request failures between two refused tokens do not lengthen the next hold: the token
/// after them is the third refused in a row, held 2 s (not the failure backoff's length).
#[tokio::test(start_paused = true)]
async fn failures_of_the_token_endpoint_do_not_lengthen_the_hold() {
    let ep = Ep::new("86400");
    let api = Api::refusing();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    tokio::time::advance(secs(2)).await;
    ep.status.store(503, Ordering::SeqCst);
    // Fails 1 + several times during the backoffs (1, 2, 4, 8 s).
    for _ in 0..20 {
        let _ = within("down", svc.clone().oneshot(get())).await;
        tokio::time::sleep(secs(1)).await;
    }
    let failed = ep.count() - 2;
    assert!(failed >= 3, "{failed} failed token requests");
    ep.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(secs(17)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    let n = ep.count();
    let fetched = ep.fetched(n);
    assert_eq!(api.tokens().last().unwrap(), &format!("tokSECRET-{n}"));
    tokio::time::advance((fetched + ms(1900)).saturating_duration_since(Instant::now())).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), n, "held 2 s");
    tokio::time::advance(ms(200)).await;
    assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), n + 1, "2 s, not longer");
}

/// The whole `ClientBuilder` stack at TRACE over a refusing API (first 401, replay, holds, a
/// hold's end, a revoked token, a token endpoint that fails): no client secret or token in the
/// log or in any error.
#[tokio::test(start_paused = true)]
async fn no_secret_in_trace_logs_of_a_client_builder_stack() {
    let cap = Captured::default();
    let w = cap.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(sub);
    let ep = Ep::new("3600");
    let api = Api::refusing();
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(5))
        .with_auth(AuthLayer::oauth2(ep.source()))
        .build(api.service());
    let mut texts = Vec::new();
    for round in 0..6 {
        for _ in 0..3 {
            match within("c", client.clone().oneshot(get())).await {
                Ok(res) => texts.push(format!("{res:?}")),
                Err(e) => texts.push(format!("{e} {e:?}")),
            }
        }
        match round {
            1 => api.set(|_| 200),
            2 => api.set(|_| 401),
            3 => ep.status.store(503, Ordering::SeqCst),
            4 => ep.status.store(200, Ordering::SeqCst),
            _ => {}
        }
        tokio::time::sleep(secs(3)).await;
    }
    drop(_guard);
    let log = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    assert!(ep.count() >= 3);
    for text in texts.iter().chain(std::iter::once(&log)) {
        for secret in [CLIENT_SECRET, "tokSECRET", "S57SECRET"] {
            assert!(
                !text.contains(secret),
                "{secret} in: {}",
                &text[..text.len().min(2000)]
            );
        }
    }
}

/// A refusing API for a long time: 150 holds in a row (past any 64-bit doubling), each at most
/// 60 s, no panic, one token request per hold.
#[tokio::test(start_paused = true)]
async fn one_hundred_fifty_holds_in_a_row_stay_at_60_s() {
    let ep = Ep::new("86400");
    let api = Api::refusing();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    into_hold(&svc, &ep, &api).await;
    let mut hold = 1u64;
    for round in 0..150 {
        let n = ep.count();
        let fetched = ep.fetched(n);
        tokio::time::advance(
            (fetched + secs(hold) - ms(10)).saturating_duration_since(Instant::now()),
        )
        .await;
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(ep.count(), n, "round {round}: held {hold} s");
        tokio::time::advance(ms(20)).await;
        assert_eq!(status_of(&svc).await, StatusCode::UNAUTHORIZED);
        assert_eq!(ep.count(), n + 1, "round {round}: {hold} s, not longer");
        hold = (hold * 2).min(60);
    }
}
