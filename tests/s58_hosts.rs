#![cfg(feature = "full")]
//! s58: an outside round on host keys (a host name is case-insensitive, so every per-host key is
//! the host in lower case): the pure key functions against a reference on seeded authorities,
//! every keyed layer and the retry budget alone and inside `ClientBuilder`, hosts written with
//! ports, `user:pw@`, IPv6 literals, a relative URI with a `Host` header, percent-escapes and
//! non-ASCII bytes; thousands of spellings of one host against each layer's bound of kept keys;
//! `Buffer` and `ConcurrencyLimit(1)` with a kept service; a custom `RemoteQuota` and the real
//! Redis quota; event keys and `server.address` labels. Paused time unless Redis is involved.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::key::{host_header, host_key, host_key_of, stored_key};
use sturdy::core::{find, BoxError, ByHost, CircuitOpen, KeyExtractor, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{BoxFuture, Quota, RateLimitLayer, RemoteQuota, Reserve};
use sturdy::redis::RedisQuota;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::sync::watch;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(Full::default()).unwrap()
}

/// A relative request with a `Host` header.
fn get_host(path: &str, host: &str) -> Req {
    let mut req = get(path);
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_str(host).unwrap());
    req
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

/// `host` with the case of its i-th letter flipped when bit i of `n` is set.
fn spelling(host: &str, n: u32) -> String {
    let mut i = 0;
    host.chars()
        .map(|c| {
            if c.is_ascii_alphabetic() {
                let flip = n >> i & 1 == 1;
                i += 1;
                if flip {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            } else {
                c
            }
        })
        .collect()
}

/// An API answering `status` (a `Retry-After: 10` on a 429), counting calls.
fn api(
    status: u16,
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send + Sync + 'static
{
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::builder().status(status);
            if status == 429 {
                res = res.header("retry-after", "10");
            }
            Ok::<_, BoxError>(res.body(Full::default()).unwrap())
        }
    })
}

/// An API whose calls hang until `gate` turns true; counts calls entered.
fn gated(
    gate: watch::Receiver<bool>,
    entered: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send + Sync + 'static
{
    service_fn(move |_req: Req| {
        entered.fetch_add(1, Ordering::SeqCst);
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok::<_, BoxError>(Response::new(Full::default()))
        }
    })
}

/// Waits (on paused time) until `n` calls entered.
async fn until_entered(entered: &AtomicUsize, n: usize) {
    for _ in 0..10_000 {
        if entered.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(ms(1)).await;
    }
    panic!(
        "only {} of {n} calls entered",
        entered.load(Ordering::SeqCst)
    );
}

fn snapshot<T: Clone>(m: &Mutex<Vec<T>>) -> Vec<T> {
    m.lock().unwrap().clone()
}

fn has_upper(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_uppercase())
}

// ---------------------------------------------------------------------------------------------
// The key functions.

/// Seeded random authorities (with and without `user:pw@`, capitals anywhere, every length up
/// to 40, bytes an authority may hold): the key is the authority after its user info, in lower
/// case; borrowed when the authority has neither an '@' nor a capital. The same with a relative
/// URI and the authority in a `Host` header (with a path after it).
#[test]
fn the_host_key_of_seeded_authorities_is_the_host_after_the_user_info_in_lower_case() {
    const HOST_BYTES: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_~!$&'()*+,;=";
    const USER_BYTES: &[u8] = b"abcXYZ019:-._~!$&'()*+,;=%";
    let mut rng = Rng(58);
    let mut checked = 0;
    for round in 0..60_000u64 {
        let len = 1 + rng.below(40) as usize;
        let mut host: String = (0..len)
            .map(|_| HOST_BYTES[rng.below(HOST_BYTES.len() as u64) as usize] as char)
            .collect();
        if rng.below(4) == 0 {
            host.push_str(&format!(":{}", rng.below(65_536)));
        }
        let user = if round % 3 == 0 {
            let ulen = rng.below(20) as usize;
            let u: String = (0..ulen)
                .map(|_| USER_BYTES[rng.below(USER_BYTES.len() as u64) as usize] as char)
                .collect();
            format!("{u}@")
        } else {
            String::new()
        };
        let Ok(uri) = format!("http://{user}{host}/p").parse::<Uri>() else {
            continue;
        };
        let auth = uri.authority().unwrap().as_str().to_owned();
        let after_user = auth.rsplit('@').next().unwrap();
        let want = after_user.to_ascii_lowercase();
        let req = Request::get(uri).body(()).unwrap();
        let got = host_key_of(&req);
        assert_eq!(got, want, "authority {auth:?}");
        assert_eq!(ByHost.key(&req), want, "authority {auth:?}");
        assert!(
            !got.contains('@'),
            "user info in the key of {auth:?}: {got}"
        );
        if !auth.contains('@') && !has_upper(&auth) {
            assert!(matches!(got, Cow::Borrowed(_)), "{auth:?} not borrowed");
        }
        // host_key of an already lower key is borrowed and changes nothing.
        assert!(matches!(host_key(&want), Cow::Borrowed(_)), "{want:?}");
        assert_eq!(host_key(after_user), want);
        assert_eq!(stored_key(after_user, true), want);
        assert_eq!(stored_key(after_user, false), after_user);

        // The same host in a Host header of a relative request.
        if let Ok(value) = HeaderValue::from_str(&format!("{user}{host}/v1?token=SECRET")) {
            let mut rel = Request::get("/v1").body(()).unwrap();
            rel.headers_mut().insert(http::header::HOST, value.clone());
            let want = host_header(Some(&value)).to_ascii_lowercase();
            assert_eq!(ByHost.key(&rel), want, "Host {value:?}");
            assert_eq!(host_key_of(&rel), want, "Host {value:?}");
            assert!(!want.contains("SECRET") && !want.contains("secret"));
        }
        checked += 1;
    }
    assert!(checked > 30_000, "only {checked} authorities parsed");
}

#[test]
fn ipv6_literals_percent_escapes_and_odd_host_headers() {
    let key = |uri: &str| {
        ByHost
            .key(&Request::get(uri).body(()).unwrap())
            .into_owned()
    };
    assert_eq!(key("http://[FE80::1]:8443/x"), "[fe80::1]:8443");
    assert_eq!(key("http://User:Pw@[FE80::AbCd]/"), "[fe80::abcd]");
    assert_eq!(key("http://[fe80::abcd]/"), key("http://[FE80::ABCD]/"));
    // Percent-escapes: their hex digits are case-insensitive too.
    // (http's Uri refuses a '%' in an authority, so they come in a Host header only.)
    assert!("http://API%2Dx.Example.com/".parse::<Uri>().is_err());
    let a = ByHost
        .key(&get_host("/", "API%2Dx.Example.com"))
        .into_owned();
    let b = ByHost
        .key(&get_host("/", "api%2dx.example.com"))
        .into_owned();
    assert_eq!(a, b);
    assert!(!has_upper(&a), "{a}");
    // A Host header in mixed case with user info, a port and a path.
    let req = get_host("/v1", "User:PW@API.Example.COM:8080/x?token=S");
    assert_eq!(ByHost.key(&req), "api.example.com:8080");
    // A Host header that is not text is no host ("" for every spelling).
    let mut req = get("/v1");
    req.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_bytes(b"API.\xC4xample.com").unwrap(),
    );
    assert_eq!(ByHost.key(&req), "");
    // The URI's authority wins over the Host header.
    let mut req = get("http://Api.Example.com/");
    req.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_static("other.example"),
    );
    assert_eq!(ByHost.key(&req), "api.example.com");
    // stored_key: a host key in lower case, a custom key as given.
    assert_eq!(stored_key("[FE80::1]:8443", true), "[fe80::1]:8443");
    assert!(matches!(
        stored_key("Tenant-A", false),
        Cow::Borrowed("Tenant-A")
    ));
}

// ---------------------------------------------------------------------------------------------
// Rate limit.

/// 4,096 spellings of one host against `with_max_keys(2)`: one key, one 429 answered, the rest
/// refused while it is paused; another host still gets a key (and a pause) of its own, not the
/// overflow `*`. Events name the key in lower case.
#[tokio::test(start_paused = true)]
async fn ratelimit_thousands_of_spellings_are_one_key_within_the_bound() {
    let keys = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let k = keys.clone();
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .with_max_keys(2)
        .on_event(move |e: &Event<'_>| {
            if let Event::RateLimitPaused { key, host, .. } = e {
                k.lock()
                    .unwrap()
                    .push(((*key).to_owned(), host.map(str::to_owned)));
            }
        })
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    let mut refused = 0;
    for n in 0..4096 {
        let uri = format!("http://{}/v1", spelling("api.example.com", n));
        match svc.clone().oneshot(get(&uri)).await {
            Ok(res) => assert_eq!(res.status(), 429),
            Err(e) => {
                assert!(find::<RateLimited>(&*e).is_some(), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one host, one 429");
    assert_eq!(refused, 4095);
    let res = svc
        .clone()
        .oneshot(get("http://Other.Example/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let mut paused: Vec<_> = handle.paused().into_iter().map(|(k, _)| k).collect();
    paused.sort();
    assert_eq!(paused, ["api.example.com", "other.example"]);
    let keys = snapshot(&keys);
    let names: Vec<_> = keys.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["api.example.com", "other.example"], "{keys:?}");
    for (_, host) in &keys {
        let host = host.as_deref().expect("a host-keyed layer names the host");
        assert!(!has_upper(host), "{host}");
    }
    for spelling in ["OTHER.EXAMPLE", "Other.Example", "other.example"] {
        assert!(handle.pause(spelling).is_some(), "{spelling}");
    }
}

/// The port is part of the key as written; the host part of it in any case.
#[tokio::test(start_paused = true)]
async fn ratelimit_ports_ipv6_and_user_info() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    svc.clone()
        .oneshot(get("https://User:Pw@API.Example.com:8443/"))
        .await
        .unwrap();
    assert!(handle.pause("api.example.com:8443").is_some());
    assert!(handle.pause("API.EXAMPLE.COM:8443").is_some());
    assert!(handle.pause("api.example.com").is_none(), "another port");
    let e = svc
        .clone()
        .oneshot(get("https://api.example.com:8443/x"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    // No port: another key, not paused.
    svc.clone()
        .oneshot(get("https://API.example.com/"))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    svc.clone()
        .oneshot(get("http://u:p@[FE80::1]:8080/"))
        .await
        .unwrap();
    assert!(handle.pause("[fe80::1]:8080").is_some());
    assert!(handle.pause("[FE80::1]:8080").is_some());
    let e = svc
        .clone()
        .oneshot(get("http://[fe80::1]:8080/"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let mut paused: Vec<_> = handle.paused().into_iter().map(|(k, _)| k).collect();
    paused.sort();
    assert_eq!(
        paused,
        ["[fe80::1]:8080", "api.example.com", "api.example.com:8443"]
    );
}

/// A relative URI with a `Host` header in mixed case is the same host as an absolute URI.
#[tokio::test(start_paused = true)]
async fn ratelimit_a_host_header_in_mixed_case_is_the_uri_host() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    svc.clone()
        .oneshot(get_host("/v1", "Api.EXAMPLE.com"))
        .await
        .unwrap();
    assert!(handle.pause("api.example.com").is_some());
    let e = svc
        .clone()
        .oneshot(get("http://API.example.COM/v1"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    let e = svc
        .clone()
        .oneshot(get_host("/v2", "x:y@api.example.com/whatever"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A call waiting out a pause is counted under every spelling; clearing under one lets it go.
#[tokio::test(start_paused = true)]
async fn ratelimit_waiting_and_clear_pause_under_any_spelling() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(60))
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // 429 to the first call, 200 after.
    let svc = layer.layer(service_fn(move |_req: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::builder().status(if n == 0 { 429 } else { 200 });
            if n == 0 {
                res = res.header("retry-after", "30");
            }
            Ok::<_, BoxError>(res.body(Full::<Bytes>::default()).unwrap())
        }
    }));
    let res = svc
        .clone()
        .oneshot(get("http://API.Example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let waiter = tokio::spawn(svc.clone().oneshot(get("http://api.EXAMPLE.com/")));
    tokio::time::sleep(ms(10)).await;
    for s in ["api.example.com", "API.EXAMPLE.COM", "Api.Example.Com"] {
        assert_eq!(handle.waiting(s), 1, "{s}");
    }
    assert!(handle.clear_pause("API.Example.COM").is_some());
    let res = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter leaves once the pause is cleared")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(handle.waiting("api.example.com"), 0);
}

/// Bare 429s (no wait header) teach a pace; the handle finds it under any spelling, and
/// `clear_pause` under any spelling forgets it.
#[tokio::test(start_paused = true)]
async fn ratelimit_learned_pace_under_any_spelling() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(120))
        .pair();
    let svc = layer.layer(service_fn(|_req: Req| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(429)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    }));
    for n in 0..6 {
        let uri = format!("http://{}/", spelling("api.example.com", n * 37));
        let _ = svc.clone().oneshot(get(&uri)).await;
    }
    let lower = handle.learned_pace("api.example.com");
    assert!(lower.is_some(), "six bare 429s to one host taught no pace");
    assert_eq!(handle.learned_pace("API.EXAMPLE.COM"), lower);
    assert_eq!(handle.learned_pace("Api.Example.Com"), lower);
    handle.clear_pause("API.example.com");
    assert_eq!(handle.learned_pace("api.example.com"), None);
}

/// A custom key keeps its case in events (with no host) and in the handle; a key that happens
/// to look like a host in capitals is not lowered either.
#[tokio::test(start_paused = true)]
async fn ratelimit_custom_keys_keep_their_case_in_events_and_handle() {
    let keys = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let k = keys.clone();
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .on_event(move |e: &Event<'_>| {
            if let Event::RateLimitPaused { key, host, .. } = e {
                k.lock()
                    .unwrap()
                    .push(((*key).to_owned(), host.map(str::to_owned)));
            }
        })
        .with_key(|req: &Req| req.uri().host().unwrap_or("").to_owned())
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    svc.clone()
        .oneshot(get("http://API.Example.com/"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "two custom keys");
    assert!(handle.pause("API.Example.com").is_some());
    assert!(handle.pause("api.example.com").is_some());
    assert!(
        handle.pause("API.EXAMPLE.COM").is_none(),
        "looked up as given"
    );
    let keys = snapshot(&keys);
    assert_eq!(
        keys,
        [
            ("API.Example.com".to_owned(), None),
            ("api.example.com".to_owned(), None)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Under Buffer and ConcurrencyLimit(1), a kept service, clones.

#[tokio::test(start_paused = true)]
async fn ratelimit_under_buffer_and_concurrency_limit_with_a_kept_service() -> Result<(), BoxError>
{
    let quota = Quota::per_second(1)?.with_burst(1)?;
    let (layer, handle) = RateLimitLayer::new(quota)
        .with_max_wait(Duration::ZERO)
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = ServiceBuilder::new()
        .concurrency_limit(1)
        .layer(layer)
        .service(api(200, calls.clone()));
    let mut svc = tower::buffer::Buffer::new(inner, 4);
    let mut other = svc.clone();
    svc.ready()
        .await?
        .call(get("http://API.Example.com/a"))
        .await?;
    let e = other
        .ready()
        .await?
        .call(get("http://api.example.com/b"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    let e = svc
        .ready()
        .await?
        .call(get_host("/c", "API.EXAMPLE.COM"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    other
        .ready()
        .await?
        .call(get("http://aPi.eXample.cOm/d"))
        .await?;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(handle.waiting("API.example.com"), 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker.

/// 4,096 spellings of one failing host against `with_max_breakers(2)`: one breaker opens after
/// 3 failures and refuses the rest; another failing host still gets a breaker of its own.
#[tokio::test(start_paused = true)]
async fn circuit_thousands_of_spellings_are_one_breaker_within_the_bound() {
    let changes = Arc::new(Mutex::new(Vec::<String>::new()));
    let events = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let (c, e2) = (changes.clone(), events.clone());
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .with_max_breakers(2)
        .on_state_change(move |key, _from, _to| c.lock().unwrap().push(key.to_owned()))
        .on_event(move |e: &Event<'_>| {
            if let Event::CircuitRejected { key, host, .. }
            | Event::CircuitChanged { key, host, .. } = e
            {
                e2.lock()
                    .unwrap()
                    .push(((*key).to_owned(), host.map(str::to_owned)));
            }
        })
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(503, calls.clone()));
    let mut refused = 0;
    for n in 0..4096 {
        let uri = format!("https://{}/v1", spelling("api.example.com", n));
        match svc.clone().oneshot(get(&uri)).await {
            Ok(res) => assert_eq!(res.status(), 503),
            Err(e) => {
                assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one breaker, opened after 3"
    );
    assert_eq!(refused, 4093);
    for _ in 0..4 {
        let _ = svc.clone().oneshot(get("https://Second.Example/")).await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "its own breaker, opened after 3"
    );
    let states = handle.states();
    let keys: Vec<_> = states.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 2, "{states:?}");
    assert!(
        keys.contains(&"api.example.com") && keys.contains(&"second.example"),
        "{states:?}"
    );
    for s in ["SECOND.EXAMPLE", "second.example", "API.example.COM"] {
        assert!(
            matches!(handle.state(s), Some(CircuitState::Open { .. })),
            "{s}: {:?}",
            handle.state(s)
        );
    }
    let changes = snapshot(&changes);
    assert!(!changes.is_empty());
    assert!(changes.iter().all(|k| !has_upper(k)), "{changes:?}");
    let events = snapshot(&events);
    assert!(events.len() > 4000, "{}", events.len());
    for (key, host) in &events {
        assert!(!has_upper(key), "{key}");
        assert!(!has_upper(host.as_deref().unwrap_or("")), "{host:?}");
    }
}

/// The port is part of a breaker's key as written.
#[tokio::test(start_paused = true)]
async fn circuit_a_forced_breaker_is_the_hosts_with_its_port_as_written() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(200, calls.clone()));
    handle.force_open("API.Example.com:8443");
    let e = svc
        .clone()
        .oneshot(get("https://u:p@api.example.COM:8443/"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
    svc.clone()
        .oneshot(get("https://API.example.com/"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(get("https://api.example.com:443/"))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    handle.force_open("[FE80::1]");
    let e = svc
        .clone()
        .oneshot(get("http://[fe80::1]/"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
    let e = svc
        .clone()
        .oneshot(get_host("/", "[Fe80::1]"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
    let mut keys: Vec<_> = handle.states().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    assert!(keys.iter().all(|k| !has_upper(k)), "{keys:?}");
    assert!(
        keys.contains(&"api.example.com:8443".to_owned()),
        "{keys:?}"
    );
    assert!(keys.contains(&"[fe80::1]".to_owned()), "{keys:?}");
    handle.force_close("[fE80::1]");
    svc.oneshot(get("http://[FE80::1]/")).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Adaptive concurrency.

/// 16 calls in flight to 16 spellings of one host: one limit with 16 in flight; another host
/// gets a limit of its own past them, with a bound of 2 hosts.
#[tokio::test(start_paused = true)]
async fn concurrency_spellings_in_flight_are_one_host_within_the_bound() {
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev = events.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 64)
        .with_initial_limit(32)
        .with_max_hosts(2)
        .on_event(move |e: &Event<'_>| {
            if let Event::ConcurrencyLimitChanged { key, .. }
            | Event::ConcurrencyRejected { key, .. } = e
            {
                ev.lock().unwrap().push((*key).to_owned());
            }
        })
        .pair();
    let (open, gate) = watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(gated(gate, entered.clone()));
    let mut tasks = Vec::new();
    for n in 0..16 {
        let uri = format!("http://{}/", spelling("api.example.com", n * 131 + 1));
        tasks.push(tokio::spawn(svc.clone().oneshot(get(&uri))));
    }
    until_entered(&entered, 16).await;
    let st = handle.state("API.EXAMPLE.COM").expect("one host");
    assert_eq!(st.in_flight(), 16);
    tasks.push(tokio::spawn(
        svc.clone().oneshot(get("http://B.Example:81/")),
    ));
    until_entered(&entered, 17).await;
    let keys: Vec<_> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com", "b.example:81"]);
    handle.set_limit("b.EXAMPLE:81", 5);
    assert_eq!(handle.limit("b.example:81"), Some(5));
    assert_eq!(handle.limit("B.Example:81"), Some(5));
    open.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let events = snapshot(&events);
    assert!(events.iter().all(|k| !has_upper(k)), "{events:?}");
    assert!(events.iter().all(|k| k != "*"), "{events:?}");
}

// ---------------------------------------------------------------------------------------------
// Hedging.

#[tokio::test(start_paused = true)]
async fn hedge_spellings_are_one_host_within_the_bound() {
    let (layer, handle) = HedgeLayer::new().with_max_hosts(2).pair();
    let svc = layer.layer(service_fn(|_req: Req| async {
        tokio::time::sleep(ms(10)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    }));
    for n in 0..300 {
        let uri = format!("http://{}:8080/", spelling("api.example.com", n * 7));
        svc.clone().oneshot(get(&uri)).await.unwrap();
    }
    svc.clone().oneshot(get("http://B.example/")).await.unwrap();
    let keys: Vec<_> = handle.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com:8080", "b.example"]);
    let stats = handle
        .stats("API.EXAMPLE.COM:8080")
        .expect("found in capitals");
    assert_eq!(stats.calls(), 300);
    let p = handle.latency_percentile("Api.Example.Com:8080", 0.5);
    assert_eq!(p, handle.latency_percentile("api.example.com:8080", 0.5));
    assert!(p.is_some(), "300 samples");
    assert!(handle.stats("api.example.com").is_none(), "another port");
}

// ---------------------------------------------------------------------------------------------
// Coalescing.

/// 30 calls in flight to 30 spellings of one host (different paths, so not identical): one
/// table holding 30; another host still has a table of its own (its joined call's event names
/// it, not `*`), with a bound of 2 hosts.
#[tokio::test(start_paused = true)]
async fn coalesce_spellings_in_flight_are_one_table_within_the_bound() {
    let events = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let ev = events.clone();
    let (layer, handle) = CoalesceLayer::new()
        .with_max_hosts(2)
        .on_event(move |e: &Event<'_>| {
            if let Event::Coalesced { key, host, .. } = e {
                ev.lock()
                    .unwrap()
                    .push(((*key).to_owned(), host.map(str::to_owned)));
            }
        })
        .pair();
    let (open, gate) = watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(gated(gate, entered.clone()));
    let mut tasks = Vec::new();
    for n in 0..30 {
        let uri = format!("http://{}/p{n}", spelling("api.example.com", n * 97 + 3));
        tasks.push(tokio::spawn(svc.clone().oneshot(get(&uri))));
    }
    until_entered(&entered, 30).await;
    for s in ["api.example.com", "API.EXAMPLE.COM", "Api.Example.Com"] {
        assert_eq!(handle.in_flight(s), 30, "{s}");
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get("http://B.Example/x"))));
    }
    until_entered(&entered, 31).await;
    tokio::time::sleep(ms(5)).await;
    assert_eq!(
        entered.load(Ordering::SeqCst),
        31,
        "the identical pair shares one call"
    );
    assert_eq!(handle.in_flight("b.example"), 1);
    assert_eq!(handle.in_flight("B.EXAMPLE"), 1);
    open.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let events = snapshot(&events);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "b.example", "{events:?}");
    // The event's `host` is "the host called" (not promised in lower case: it is as written).
    assert!(
        events[0]
            .1
            .as_deref()
            .unwrap_or("")
            .eq_ignore_ascii_case("b.example"),
        "{events:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Retry budget.

/// 300 spellings of one host, each failing with 503: the budget of 10 retries is one.
#[tokio::test(start_paused = true)]
async fn retry_budget_is_one_for_hundreds_of_spellings_and_events_name_no_user_info() {
    let stops = Arc::new(Mutex::new(Vec::<String>::new()));
    let st = stops.clone();
    let layer = RetryLayer::new()
        .with_max_attempts(2)
        .with_seed(58)
        .with_budget(Duration::from_secs(10), 1, 0.0)
        .unwrap()
        .on_event(move |e: &Event<'_>| match e {
            Event::RetryStopped { host, stop, .. } => {
                st.lock().unwrap().push(format!("{host} {stop:?}"));
            }
            Event::RetryScheduled { host, .. } => {
                st.lock().unwrap().push(format!("{host} scheduled"));
            }
            _ => {}
        });
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(503, calls.clone()));
    for n in 0..300 {
        let uri = format!("http://u:SECRETpw@{}:8080/", spelling("a.example.com", n));
        let res = svc.clone().oneshot(get(&uri)).await.unwrap();
        assert_eq!(res.status(), 503);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        310,
        "300 calls and 10 retries"
    );
    let stops = snapshot(&stops);
    let budget = format!("{:?}", RetryStop::BudgetExhausted);
    assert_eq!(stops.iter().filter(|s| s.ends_with(&budget)).count(), 290);
    assert!(
        stops
            .iter()
            .all(|s| !s.contains('@') && !s.contains("SECRET")),
        "{stops:?}"
    );
    // Another port is another host, with a budget of its own.
    let res = svc
        .clone()
        .oneshot(get("http://a.example.com:8081/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 312);
}

// ---------------------------------------------------------------------------------------------
// ClientBuilder.

/// Every keyed layer in one client: a 429 to one spelling pauses the host for every spelling,
/// a breaker forced open under one refuses the others, and each handle finds one host.
#[tokio::test(start_paused = true)]
async fn client_builder_one_host_in_every_layer() {
    let (cb, circuit) = CircuitBreakerLayer::new().pair();
    let (rl, limits) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .pair();
    let (cc, conc) = AdaptiveConcurrencyLayer::new().pair();
    let (hl, hedge) = HedgeLayer::new().pair();
    let (co, coal) = CoalesceLayer::new().pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        let limited = req.uri().path() == "/limited";
        async move {
            let mut res = Response::builder().status(if limited { 429 } else { 200 });
            if limited {
                res = res.header("retry-after", "10");
            }
            Ok::<_, BoxError>(res.body(Full::<Bytes>::default()).unwrap())
        }
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(1))
        .with_circuit_breaker(cb)
        .with_rate_limit(rl)
        .with_adaptive_concurrency(cc)
        .with_hedge(hl)
        .with_coalesce(co)
        .build(http);
    for n in 0..20 {
        let uri = format!("http://{}/ok", spelling("api.example.com", n * 11));
        let res = client.clone().oneshot(get(&uri)).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    let keys: Vec<_> = conc.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com"]);
    let keys: Vec<_> = hedge.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com"]);
    assert_eq!(hedge.stats("API.EXAMPLE.COM").map(|s| s.calls()), Some(20));
    assert!(conc.limit("Api.Example.Com").is_some());
    assert_eq!(coal.in_flight("API.example.com"), 0);
    let keys: Vec<_> = circuit.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com"]);

    // The 429 comes back as the response or as a RateLimited error (the retry layer's).
    match client
        .clone()
        .oneshot(get("http://API.Example.com/limited"))
        .await
    {
        Ok(res) => assert_eq!(res.status(), 429),
        Err(e) => assert!(find::<RateLimited>(&*e).is_some(), "{e}"),
    }
    assert!(limits.pause("api.example.com").is_some());
    assert!(limits.pause("API.EXAMPLE.COM").is_some());
    let e = client
        .clone()
        .oneshot(get("http://api.example.COM/ok"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 21);
    limits.clear_pause("Api.Example.Com");

    circuit.force_open("API.EXAMPLE.COM");
    let e = client
        .clone()
        .oneshot(get("http://api.example.com/ok"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
    circuit.force_close("api.EXAMPLE.com");
    let res = client
        .clone()
        .oneshot(get("http://api.example.com/ok"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(circuit.states().len(), 1);
}

/// The retry budget inside a client: 60 spellings of one failing host share 10 retries.
#[tokio::test(start_paused = true)]
async fn client_builder_retry_budget_is_one_per_host() {
    let calls = Arc::new(AtomicUsize::new(0));
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_max_attempts(2)
                .with_seed(7)
                .with_budget(Duration::from_secs(10), 1, 0.0)
                .unwrap(),
        )
        .without_circuit_breaker()
        .without_rate_limit()
        .build(api(503, calls.clone()));
    for n in 0..60 {
        let uri = format!("http://{}/", spelling("shop.example.org", n * 3));
        let res = client.clone().oneshot(get(&uri)).await.unwrap();
        assert_eq!(res.status(), 503);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 70, "60 calls and 10 retries");
}

// ---------------------------------------------------------------------------------------------
// Remote quotas.

/// A remote quota that grants everything and records the keys it is asked about.
#[derive(Debug, Default)]
struct Recorder {
    keys: Mutex<Vec<String>>,
}

impl RemoteQuota for Recorder {
    fn reserve(&self, key: &str, _max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        self.keys.lock().unwrap().push(format!("reserve {key}"));
        Box::pin(async {
            Ok(Reserve::Granted {
                wait: Duration::ZERO,
            })
        })
    }
    fn pause(&self, key: &str, _duration: Duration) -> BoxFuture<Result<(), BoxError>> {
        self.keys.lock().unwrap().push(format!("pause {key}"));
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_remote_quota_is_asked_with_the_host_in_lower_case_and_a_custom_key_as_given() {
    let quota = Quota::per_second(100).unwrap();
    let remote = Arc::new(Recorder::default());
    let layer = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .with_max_wait(Duration::ZERO);
    let calls = Arc::new(AtomicUsize::new(0));
    layer
        .layer(api(200, calls.clone()))
        .oneshot(get("http://User:Pw@API.Example.COM:8443/"))
        .await
        .unwrap();
    layer
        .layer(api(200, calls.clone()))
        .oneshot(get_host("/", "Api.Example.Com:8443"))
        .await
        .unwrap();
    layer
        .layer(api(429, calls.clone()))
        .oneshot(get("http://api.EXAMPLE.com:8443/"))
        .await
        .unwrap();
    // The pause is published in the background.
    for _ in 0..100 {
        if remote.keys.lock().unwrap().len() >= 4 {
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    let custom = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .with_max_wait(Duration::ZERO)
        .with_key(|_req: &Req| "Tenant-A".to_owned());
    custom
        .layer(api(200, calls.clone()))
        .oneshot(get("http://API.Example.COM/"))
        .await
        .unwrap();
    let keys = snapshot(&remote.keys);
    assert_eq!(
        keys,
        [
            "reserve api.example.com:8443",
            "reserve api.example.com:8443",
            "reserve api.example.com:8443",
            "pause api.example.com:8443",
            "reserve Tenant-A",
        ]
    );
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

/// Two processes on one Redis quota: a 429 one of them gets to `API.Example.com` pauses
/// `api.example.com` for the other (one Redis key), and the pause is cleared under the key
/// `host_key` gives.
#[tokio::test]
async fn a_redis_pause_from_a_429_on_one_spelling_holds_the_other_spelling() -> Result<(), BoxError>
{
    let quota = Quota::per_second(100)?;
    let t = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)?
        .as_nanos();
    let remote = RedisQuota::connect(&redis_url(), quota)
        .await?
        .with_prefix(format!("s58-{t:x}-{}", std::process::id()));
    let one = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote.clone()))
        .with_max_wait(Duration::ZERO);
    let other = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote.clone()))
        .with_max_wait(Duration::ZERO);
    let calls = Arc::new(AtomicUsize::new(0));
    let res = one
        .layer(api(429, calls.clone()))
        .oneshot(get("http://u:p@API.Example.com:9443/"))
        .await?;
    assert_eq!(res.status(), 429);
    let key = host_key("API.Example.com:9443").into_owned();
    let mut published = None;
    for _ in 0..200 {
        published = remote.try_paused(&key).await?;
        if published.is_some() {
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    let left = published.expect("the pause reached Redis under the lower-case key");
    assert!(left > Duration::from_secs(8), "{left:?}");
    let ok = Arc::new(AtomicUsize::new(0));
    let e = other
        .layer(api(200, ok.clone()))
        .oneshot(get("http://api.EXAMPLE.com:9443/"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    let e = other
        .layer(api(200, ok.clone()))
        .oneshot(get_host("/", "API.EXAMPLE.COM:9443"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    assert_eq!(ok.load(Ordering::SeqCst), 0);
    // Another port: not paused.
    other
        .layer(api(200, ok.clone()))
        .oneshot(get("http://api.example.com/"))
        .await?;
    assert!(remote.try_clear_pause(&key).await?.is_some());
    other
        .layer(api(200, ok.clone()))
        .oneshot(get("http://API.example.com:9443/"))
        .await?;
    assert_eq!(ok.load(Ordering::SeqCst), 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metric labels.

type Row = (String, Vec<(String, String)>, DebugValue);

fn rows(s: &Snapshotter) -> Vec<Row> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _unit, _desc, v)| {
            let (_kind, key) = ck.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (key.name().to_owned(), labels, v)
        })
        .collect()
}

fn label<'a>(r: &'a Row, name: &str) -> Option<&'a str> {
    r.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Every `server.address` is in lower case, whatever layer emits; one host written many ways is
/// one label value; the port is its own label, as written; user info never appears.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn metric_labels_are_one_lower_case_address_per_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let calls = Arc::new(AtomicUsize::new(0));
    // Rate limit pauses and refusals, under a retry layer that counts its retries and stops.
    let limited = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(2)
                .with_seed(3)
                .with_max_retry_after(Duration::from_secs(1)),
        )
        .layer(RateLimitLayer::adaptive_only().with_max_wait(Duration::ZERO))
        .service(api(429, calls.clone()));
    for n in 0..8 {
        let uri = format!(
            "http://User:PW@{}:8443/",
            spelling("api.example.com", n * 5)
        );
        let _ = limited.clone().oneshot(get(&uri)).await;
    }
    // Breaker transitions and rejections, IPv6 in capitals.
    let breaker = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .layer(api(503, calls.clone()));
    for _ in 0..4 {
        let _ = breaker
            .clone()
            .oneshot(get("http://[FE80::AB]:8443/"))
            .await;
    }
    // Retries of 503s to a Host header in capitals.
    let retry = RetryLayer::new()
        .with_max_attempts(3)
        .with_seed(1)
        .layer(api(503, calls.clone()));
    for h in ["RETRY.Example.NET", "retry.example.net"] {
        let _ = retry.clone().oneshot(get_host("/", h)).await;
    }
    // Concurrency limit changes set by hand.
    let (cl, ch) = AdaptiveConcurrencyLayer::new().pair();
    let conc = cl.layer(api(200, calls.clone()));
    conc.oneshot(get("http://Conc.Example/")).await.unwrap();
    ch.set_limit("CONC.example", 3);

    let rows = rows(&snap);
    let mut addresses: Vec<&str> = rows
        .iter()
        .filter_map(|r| label(r, "server.address"))
        .collect();
    addresses.sort();
    addresses.dedup();
    assert!(addresses.iter().all(|a| !has_upper(a)), "{addresses:?}");
    assert!(
        addresses
            .iter()
            .all(|a| !a.contains('@') && !a.contains("pw")),
        "{addresses:?}"
    );
    for want in ["api.example.com", "retry.example.net", "conc.example"] {
        assert!(addresses.contains(&want), "{want} not in {addresses:?}");
    }
    assert!(
        addresses.iter().any(|a| a.contains("fe80::ab")),
        "{addresses:?}"
    );
    eprintln!("server.address values: {addresses:?}");
    // One host, one label set per metric.
    let pauses: Vec<_> = rows
        .iter()
        .filter(|r| r.0 == "sturdy.ratelimit.pauses")
        .collect();
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert_eq!(label(pauses[0], "server.address"), Some("api.example.com"));
    assert_eq!(label(pauses[0], "server.port"), Some("8443"));
    let refusals: Vec<_> = rows
        .iter()
        .filter(|r| r.0 == "sturdy.ratelimit.refusals")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let retries: Vec<_> = rows
        .iter()
        .filter(|r| {
            r.0 == "sturdy.retry.retries" && label(r, "server.address") == Some("retry.example.net")
        })
        .collect();
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert!(
        matches!(retries[0].2, DebugValue::Counter(4)),
        "{retries:?}"
    );
    let open: Vec<_> = rows
        .iter()
        .filter(|r| r.0 == "sturdy.circuit.transitions")
        .collect();
    assert!(!open.is_empty());
    for r in &open {
        assert_eq!(label(r, "server.port"), Some("8443"), "{r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Handles: new keys set by hand, keys past the bound, custom keys.

/// A limit set by hand for a host in capitals before any call is the host's (lower case), and a
/// call to it then runs under it.
#[tokio::test(start_paused = true)]
async fn concurrency_a_limit_set_by_hand_in_capitals_is_the_hosts() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    handle.set_limit("NEW.Example:8080", 3);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(200, calls.clone()));
    svc.oneshot(get("http://new.example:8080/")).await.unwrap();
    let states = handle.states();
    let keys: Vec<_> = states.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["new.example:8080"], "{states:?}");
    let limit = handle.limit("new.example:8080").unwrap();
    assert!(
        (2..=4).contains(&limit),
        "set to 3, then adapted by one call: {limit}"
    );
}

/// Past the bound, a host in capitals is answered for by the overflow state, as in lower case.
#[tokio::test(start_paused = true)]
async fn handles_answer_for_a_host_past_the_bound_in_any_case() {
    let (layer, limits) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .with_max_keys(1)
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    svc.clone().oneshot(get("http://a.example/")).await.unwrap();
    svc.clone().oneshot(get("http://C.Example/")).await.unwrap();
    let paused: Vec<_> = limits.paused().into_iter().map(|(k, _)| k).collect();
    assert!(paused.contains(&"*".to_owned()), "{paused:?}");
    assert!(limits.pause("c.example").is_some());
    assert_eq!(limits.pause("C.EXAMPLE"), limits.pause("c.example"));

    let (layer, hedge) = HedgeLayer::new().with_max_hosts(1).pair();
    let svc = layer.layer(api(200, calls.clone()));
    svc.clone().oneshot(get("http://a.example/")).await.unwrap();
    svc.clone().oneshot(get("http://C.Example/")).await.unwrap();
    svc.clone().oneshot(get("http://c.example/")).await.unwrap();
    let keys: Vec<_> = hedge.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["*", "a.example"]);
    assert_eq!(hedge.stats("C.EXAMPLE").map(|s| s.calls()), Some(2));
    assert_eq!(hedge.stats("c.example").map(|s| s.calls()), Some(2));

    let (open, gate) = watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let (layer, conc) = AdaptiveConcurrencyLayer::new().with_max_hosts(1).pair();
    let svc = layer.layer(gated(gate, entered.clone()));
    let a = tokio::spawn(svc.clone().oneshot(get("http://a.example/")));
    until_entered(&entered, 1).await;
    let c = tokio::spawn(svc.clone().oneshot(get("http://C.Example/")));
    until_entered(&entered, 2).await;
    let upper = conc.state("C.EXAMPLE").map(|s| s.in_flight());
    assert_eq!(upper, Some(1));
    assert_eq!(conc.state("c.example").map(|s| s.in_flight()), upper);
    open.send(true).unwrap();
    a.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
}

/// Custom keys in every other keyed layer keep their case, and handles look them up as given.
#[tokio::test(start_paused = true)]
async fn custom_keys_keep_their_case_in_every_keyed_layer() {
    let tenant = |req: &Req| {
        req.headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let with_tenant = |t: &str| {
        let mut req = get("http://API.example.com/");
        req.headers_mut().insert("x-tenant", t.parse().unwrap());
        req
    };
    let calls = Arc::new(AtomicUsize::new(0));

    let (layer, circuit) = CircuitBreakerLayer::new().with_key(tenant).pair();
    let svc = layer.layer(api(200, calls.clone()));
    circuit.force_open("Tenant-A");
    let e = svc
        .clone()
        .oneshot(with_tenant("Tenant-A"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
    svc.clone().oneshot(with_tenant("tenant-a")).await.unwrap();
    assert!(
        circuit.state("TENANT-A").is_none(),
        "{:?}",
        circuit.states()
    );

    let (layer, conc) = AdaptiveConcurrencyLayer::new().with_key(tenant).pair();
    let svc = layer.layer(api(200, calls.clone()));
    svc.clone().oneshot(with_tenant("Tenant-A")).await.unwrap();
    assert!(conc.limit("Tenant-A").is_some());
    assert!(conc.limit("tenant-a").is_none());
    conc.set_limit("Tenant-B", 2);
    let keys: Vec<_> = conc.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["Tenant-A", "Tenant-B"]);

    let (layer, hedge) = HedgeLayer::new().with_key(tenant).pair();
    let svc = layer.layer(api(200, calls.clone()));
    svc.clone().oneshot(with_tenant("Tenant-A")).await.unwrap();
    assert!(hedge.stats("Tenant-A").is_some());
    assert!(hedge.stats("tenant-a").is_none());

    let (open, gate) = watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let (layer, coal) = CoalesceLayer::new().with_key(tenant).pair();
    let svc = layer.layer(gated(gate, entered.clone()));
    let t = tokio::spawn(svc.clone().oneshot(with_tenant("Tenant-A")));
    until_entered(&entered, 1).await;
    assert_eq!(coal.in_flight("Tenant-A"), 1);
    assert_eq!(coal.in_flight("tenant-a"), 0);
    assert_eq!(coal.in_flight("api.example.com"), 0);
    open.send(true).unwrap();
    t.await.unwrap().unwrap();
}

/// The whole client under `Buffer` over `ConcurrencyLimit(1)`, kept and cloned, driven with
/// `ready().await?.call(req)`: one breaker and one pause for a host written three ways.
#[tokio::test(start_paused = true)]
async fn client_under_buffer_and_concurrency_limit_one_host() -> Result<(), BoxError> {
    let (cb, circuit) = CircuitBreakerLayer::new().pair();
    let (rl, limits) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        let limited = req.uri().path() == "/limited";
        async move {
            let mut res = Response::builder().status(if limited { 429 } else { 200 });
            if limited {
                res = res.header("retry-after", "10");
            }
            Ok::<_, BoxError>(res.body(Full::<Bytes>::default()).unwrap())
        }
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(1))
        .with_circuit_breaker(cb)
        .with_rate_limit(rl)
        .build(http);
    let limited = ServiceBuilder::new().concurrency_limit(1).service(client);
    let mut svc = tower::buffer::Buffer::new(limited, 4);
    let mut other = svc.clone();
    svc.ready()
        .await?
        .call(get("http://Api.Example.com/ok"))
        .await?;
    let _ = other
        .ready()
        .await?
        .call(get("http://API.EXAMPLE.COM/limited"))
        .await;
    assert!(limits.pause("api.example.com").is_some());
    let e = svc
        .ready()
        .await?
        .call(get_host("/ok", "api.Example.COM"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*e).is_some(), "{e}");
    limits.clear_pause("API.example.com");
    circuit.force_open("aPI.example.com");
    let e = other
        .ready()
        .await?
        .call(get("http://api.example.com/ok"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*e).is_some(), "{e}");
    circuit.force_close("API.Example.Com");
    svc.ready()
        .await?
        .call(get("http://API.example.com/ok"))
        .await?;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let keys: Vec<_> = circuit.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com"]);
    Ok(())
}

/// Two identical GETs in flight whose URIs differ only in the host's case: one table (the
/// handle counts them together). Whether they share one call is not said by the docs
/// ("same URI (scheme, authority, ...)"); this records what happens.
#[tokio::test(start_paused = true)]
async fn coalesce_identical_requests_whose_host_case_differs() {
    let (open, gate) = watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let (layer, coal) = CoalesceLayer::new().pair();
    let svc = layer.layer(gated(gate, entered.clone()));
    let a = tokio::spawn(svc.clone().oneshot(get("http://API.Example.com/x")));
    until_entered(&entered, 1).await;
    let b = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/x")));
    tokio::time::sleep(ms(5)).await;
    let sent = entered.load(Ordering::SeqCst);
    assert_eq!(
        coal.in_flight("api.example.com"),
        sent,
        "one table for both"
    );
    open.send(true).unwrap();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    eprintln!("host case differs: {sent} upstream call(s)");
}

/// A handle taken before `with_key(..)`: the layer `with_key` returns "shares this layer's
/// state", the handle "sees the state shared by the layer, ... the layers its setters return",
/// and keys chosen with `with_key(..)` "are looked up as given".
#[tokio::test(start_paused = true)]
async fn ratelimit_a_handle_taken_before_with_key_finds_custom_keys_as_given() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .pair();
    let layer = layer.with_key(|_req: &Req| "Tenant-A".to_owned());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    svc.oneshot(get("http://api.example.com/")).await.unwrap();
    let paused: Vec<_> = handle.paused().into_iter().map(|(k, _)| k).collect();
    assert_eq!(paused, ["Tenant-A"]);
    assert!(
        handle.pause("Tenant-A").is_some(),
        "paused() lists Tenant-A but pause(\"Tenant-A\") does not find it"
    );
    assert!(handle.clear_pause("Tenant-A").is_some());
}

#[tokio::test(start_paused = true)]
async fn circuit_a_handle_taken_before_with_key_finds_custom_keys_as_given() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let layer = layer.with_key(|_req: &Req| "Tenant-A".to_owned());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(200, calls.clone()));
    handle.force_open("Tenant-A");
    let res = svc.oneshot(get("http://api.example.com/")).await;
    let keys: Vec<_> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert!(
        matches!(&res, Err(e) if find::<CircuitOpen>(&**e).is_some()),
        "force_open(\"Tenant-A\") did not refuse key Tenant-A: {res:?}, states {keys:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_hedge_coalesce_handles_taken_before_with_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, conc) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer
        .with_key(|_req: &Req| "Tenant-A".to_owned())
        .layer(api(200, calls.clone()));
    svc.oneshot(get("http://api.example.com/")).await.unwrap();
    let keys: Vec<_> = conc.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["Tenant-A"]);
    assert!(
        conc.limit("Tenant-A").is_some(),
        "states() {keys:?}, limit(\"Tenant-A\") None"
    );

    let (layer, hedge) = HedgeLayer::new().pair();
    let svc = layer
        .with_key(|_req: &Req| "Tenant-A".to_owned())
        .layer(api(200, calls.clone()));
    svc.oneshot(get("http://api.example.com/")).await.unwrap();
    let keys: Vec<_> = hedge.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["Tenant-A"]);
    assert!(
        hedge.stats("Tenant-A").is_some(),
        "all() {keys:?}, stats(\"Tenant-A\") None"
    );

    let (open, gate) = watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let (layer, coal) = CoalesceLayer::new().pair();
    let svc = layer
        .with_key(|_req: &Req| "Tenant-A".to_owned())
        .layer(gated(gate, entered.clone()));
    let t = tokio::spawn(svc.oneshot(get("http://api.example.com/")));
    until_entered(&entered, 1).await;
    let n = coal.in_flight("Tenant-A");
    open.send(true).unwrap();
    t.await.unwrap().unwrap();
    assert_eq!(n, 1, "in_flight(\"Tenant-A\")");
}
