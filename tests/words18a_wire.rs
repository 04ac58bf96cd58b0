//! A `Retry-After` given as an HTTP date, over the wire: a real server on 127.0.0.1 and the
//! default client over hyper-util, in real time.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::ClientBuilder;
use tower::ServiceExt;

/// An IMF-fixdate for `secs` after the Unix epoch.
fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let (h, m, s) = ((secs % 86_400) / 3_600, (secs % 3_600) / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[usize::try_from(days % 7).unwrap()],
        d,
        MONTHS[usize::try_from(month - 1).unwrap()],
        year,
        h,
        m,
        s
    )
}

#[test]
fn the_date_helper_writes_imf_fixdates() {
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
}

#[derive(Clone, Default)]
struct Seen {
    /// Arrival times (since the epoch) and the status each got.
    log: Arc<Mutex<Vec<(Duration, u16)>>>,
    /// The moment the server's `Retry-After` date names.
    until: Arc<Mutex<Option<Duration>>>,
}

// The server reads its own wall clock, as a real server does.
#[allow(clippy::disallowed_methods)]
async fn handler(State(seen): State<Seen>) -> (StatusCode, HeaderMap, &'static str) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut until = seen.until.lock().unwrap();
    let limit = *until.get_or_insert_with(|| Duration::from_secs(now.as_secs() + 3));
    let mut headers = HeaderMap::new();
    let status = if now < limit {
        headers.insert("retry-after", http_date(limit.as_secs()).parse().unwrap());
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::OK
    };
    seen.log.lock().unwrap().push((now, status.as_u16()));
    (status, headers, "ok")
}

/// retry.md: "A `Retry-After` (seconds or HTTP date) on a 429 ... overrides the backoff: never
/// sooner than asked"; ratelimit.md: a 429 with `Retry-After` (seconds or an HTTP date) pauses
/// every caller of the host. A date 2 to 3 s ahead: the call is retried at the date, and calls
/// made meanwhile reach the server only after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_date_retry_after_is_honoured_by_the_call_and_every_caller() {
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", get(handler))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ClientBuilder::new().build(http);
    let url = format!("http://{addr}/orders");
    let get_req = || {
        http::Request::get(url.as_str())
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let first = tokio::spawn(client.clone().oneshot(get_req()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get_req())))
        .collect();
    let res = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    for t in later {
        let res = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let until = seen.until.lock().unwrap().unwrap();
    let log = seen.log.lock().unwrap().clone();
    assert_eq!(log[0].1, 429);
    let refused = log.iter().filter(|(_, s)| *s == 429).count();
    assert_eq!(refused, 1, "only the first call met the 429: {log:?}");
    for (at, status) in &log[1..] {
        assert_eq!(*status, 200);
        assert!(
            *at >= until,
            "a call reached the server before the date: {log:?}"
        );
        assert!(*at < until + Duration::from_secs(2), "{log:?}");
    }
}
