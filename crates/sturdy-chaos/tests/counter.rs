//! `/counter`: a resource under optimistic concurrency, over a real loopback connection.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use sturdy_chaos::{http_client, ChaosServer, CounterStats, Knobs};

async fn send(
    server: &ChaosServer,
    method: Method,
    if_match: &[&str],
    body: &str,
) -> Response<Incoming> {
    let mut b = Request::builder()
        .method(method)
        .uri(server.url("/counter"));
    for v in if_match {
        b = b.header("if-match", *v);
    }
    http_client()
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap()
}

async fn json_of(res: Response<Incoming>) -> Value {
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn a_write_needs_the_current_version() {
    let s = ChaosServer::start(Knobs::default()).await.unwrap();

    let res = send(&s, Method::GET, &[], "").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["etag"], "\"0\"");
    assert_eq!(
        json_of(res).await,
        serde_json::json!({"value": 0, "version": 0})
    );

    // The version just read: written.
    let res = send(&s, Method::PUT, &["\"0\""], r#"{"value": 1}"#).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["etag"], "\"1\"");
    assert_eq!(json_of(res).await["value"], 1);

    // The same version again: stale, refused, nothing changes.
    let res = send(&s, Method::PUT, &["\"0\""], r#"{"value": 7}"#).await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED);
    assert!(json_of(res).await["detail"]
        .as_str()
        .unwrap()
        .contains("read it again"));

    // A list of tags matches when one of them is current; weak tags never match.
    let res = send(&s, Method::PUT, &["\"9\", \"1\""], r#"{"value": 2}"#).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = send(&s, Method::PUT, &["W/\"2\""], r#"{"value": 3}"#).await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED);
    // Two header lines count as one list.
    let res = send(&s, Method::PUT, &["\"0\"", "\"2\""], r#"{"value": 3}"#).await;
    assert_eq!(res.status(), StatusCode::OK);
    // `*` matches the current representation, whatever its version.
    let res = send(&s, Method::PUT, &["*"], r#"{"value": 10}"#).await;
    assert_eq!(res.status(), StatusCode::OK);

    // Malformed: no If-Match (428), a body without an integer value (400).
    let res = send(&s, Method::PUT, &[], r#"{"value": 11}"#).await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_REQUIRED);
    for bad in ["", "{}", r#"{"value": "11"}"#, r#"{"value": 1.5}"#, "[1]"] {
        let res = send(&s, Method::PUT, &["\"4\""], bad).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    let res = send(&s, Method::GET, &[], "").await;
    assert_eq!(
        json_of(res).await,
        serde_json::json!({"value": 10, "version": 4})
    );
    let c = s.counter();
    assert_eq!(
        c,
        CounterStats {
            value: 10,
            version: 4,
            reads: 2,
            writes: 4,
            conflicts: 2,
            rejected: 6,
        }
    );
    assert_eq!(c.calls(), 14);
    // Counted as requests, but not as API requests: faults never apply here.
    assert_eq!(s.stats().requests, 14);
    assert_eq!(s.stats().api_requests, 0);
}

#[tokio::test]
async fn faults_do_not_apply_and_latency_does() {
    let s = ChaosServer::start(Knobs {
        error_rate: 1.0,
        rate_limit_rate: 1.0,
        counter_latency: Duration::from_millis(30),
        counter_latency_jitter: Duration::from_millis(20),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let res = send(&s, Method::GET, &[], "").await;
    assert_eq!(res.status(), StatusCode::OK);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(30), "{took:?}");
    let started = tokio::time::Instant::now();
    let res = send(&s, Method::PUT, &["\"0\""], r#"{"value": 1}"#).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!((s.stats().server_errors, s.stats().rate_limited), (0, 0));
}

#[tokio::test]
async fn concurrent_increments_are_never_lost() {
    // 20 clients increment at once, retrying after each 412: the counter ends at exactly 20.
    let s = ChaosServer::start(Knobs {
        counter_latency: Duration::from_millis(2),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let url = s.url("/counter");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let url = url.clone();
        tasks.spawn(async move {
            let client = http_client();
            loop {
                let res = client
                    .request(Request::get(&url).body(Full::default()).unwrap())
                    .await
                    .unwrap();
                let etag = res.headers()["etag"].clone();
                let value = json_of(res).await["value"].as_i64().unwrap();
                let put = Request::put(&url)
                    .header("if-match", etag)
                    .body(Full::from(format!(r#"{{"value":{}}}"#, value + 1)))
                    .unwrap();
                let res = client.request(put).await.unwrap();
                match res.status() {
                    StatusCode::OK => return,
                    StatusCode::PRECONDITION_FAILED => {}
                    other => panic!("{other}"),
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let c = s.counter();
    assert_eq!((c.value, c.version, c.writes), (20, 20, 20));
    assert_eq!(c.reads, c.writes + c.conflicts);
}
