//! Each knob does what it says, over a real loopback connection, in real time.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm, ServerRateLimit};
use sturdy_core::headers::RetryAfter;

async fn send(
    server: &ChaosServer,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let mut b = Request::builder().method(method).uri(server.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    http_client()
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
}

async fn json_of(res: Response<Incoming>) -> Value {
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

async fn order(
    server: &ChaosServer,
    n: u32,
    key: Option<&str>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let mut h = vec![("content-type", "application/json")];
    if let Some(k) = key {
        h.push(("idempotency-key", k));
    }
    send(
        server,
        Method::POST,
        "/orders",
        &h,
        &json!({ "item": "book", "n": n }).to_string(),
    )
    .await
}

#[tokio::test]
async fn quiet_by_default() {
    let s = ChaosServer::start(Knobs::default()).await.unwrap();
    for n in 0..20 {
        assert_eq!(
            order(&s, n, None).await.unwrap().status(),
            StatusCode::CREATED
        );
    }
    let st = s.stats();
    assert_eq!(
        (
            st.orders_committed,
            st.server_errors,
            st.rate_limited,
            st.resets
        ),
        (20, 0, 0, 0)
    );
    assert_eq!(s.requests().len(), 20);
}

#[tokio::test]
async fn reset_after_commit_commits_once_and_the_client_sees_an_error() {
    let s = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let err = order(&s, 1, Some("k1")).await.unwrap_err();
    let kind = sturdy_core::classify::classify_error(&err);
    assert_eq!(kind, sturdy_core::ErrorKind::Transport, "{err:?}");
    assert_eq!(s.stats().orders_committed, 1);
    assert_eq!(s.stats().resets, 1);
    // Without idempotency, the client's naive retry duplicates the order.
    assert_eq!(
        order(&s, 1, Some("k1")).await.unwrap().status(),
        StatusCode::CREATED
    );
    let st = s.stats();
    assert_eq!(
        (
            st.orders_committed,
            st.duplicates_by_key,
            st.duplicates_by_payload
        ),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn idempotency_replays_and_rejects_other_payloads() {
    let s = ChaosServer::start(Knobs {
        idempotency: true,
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    assert!(order(&s, 1, Some("k1")).await.is_err());
    let res = order(&s, 1, Some("\"k1\"")).await.unwrap(); // structured-field form of the same key
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(json_of(res).await["id"], "o_1");
    assert_eq!(
        order(&s, 2, Some("k1")).await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let st = s.stats();
    assert_eq!(
        (st.orders_committed, st.replayed, st.duplicates_by_key),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn fail_next_and_error_rate() {
    let s = ChaosServer::start(Knobs {
        fail_next: 2,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for n in 0..3 {
            v.push(order(&s, n, None).await.unwrap().status().as_u16());
        }
        v
    };
    assert_eq!(statuses, [503, 503, 201]);
    assert_eq!(s.stats().server_errors, 2);
    assert_eq!(s.stats().orders_committed, 1);

    let s = ChaosServer::start(Knobs {
        error_rate: 0.3,
        error_status: 500,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let mut errors = 0;
    for _ in 0..200 {
        if send(&s, Method::GET, "/orders", &[], "")
            .await
            .unwrap()
            .status()
            == 500
        {
            errors += 1;
        }
    }
    assert!((30..=90).contains(&errors), "{errors} of 200");
    assert_eq!(s.stats().server_errors, errors);
}

#[tokio::test]
async fn rate_limit_with_retry_after_seconds_and_date() {
    let s = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(7),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let res = send(&s, Method::GET, "/orders", &[], "").await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "7");
    assert_eq!(
        send(&s, Method::GET, "/orders", &[], "")
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    s.update(|k| {
        k.rate_limit_next = 1;
        k.retry_after = RetryAfterForm::Date(Duration::from_secs(120));
    });
    let res = send(&s, Method::GET, "/orders", &[], "").await.unwrap();
    let ra = RetryAfter::parse(res.headers()["retry-after"].as_bytes()).unwrap();
    assert!(matches!(ra, RetryAfter::At(_)));
    let d = ra.delay_from(sturdy_core::WallClock::now(&sturdy_core::SystemClock));
    assert!(
        d > Duration::from_secs(115) && d <= Duration::from_secs(120),
        "{d:?}"
    );
    assert_eq!(s.stats().rate_limited, 2);
}

#[tokio::test]
async fn latency_is_added() {
    let s = ChaosServer::start(Knobs {
        latency: Duration::from_millis(300),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let start = tokio::time::Instant::now();
    send(&s, Method::GET, "/orders", &[], "").await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    // /health is never faulted (300 ms leaves a loaded machine room to answer it late).
    let start = tokio::time::Instant::now();
    send(&s, Method::GET, "/health", &[], "").await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn server_side_quota() {
    let s = ChaosServer::start(Knobs {
        server_rate_limit: Some(ServerRateLimit {
            limit: 3,
            window: Duration::from_secs(10),
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    for _ in 0..3 {
        assert_eq!(
            send(&s, Method::GET, "/orders", &[], "")
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    let res = send(&s, Method::GET, "/orders", &[], "").await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&secs));
    assert!(res.headers()["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"default\";r=0;t="));
    assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=3;w=10");
}

#[tokio::test]
async fn oauth_tokens_expire_and_can_be_revoked() {
    let s = ChaosServer::start(Knobs {
        require_auth: true,
        token_lifetime: Duration::from_millis(300),
        ..Knobs::default()
    })
    .await
    .unwrap();
    // No token => 401 with a Bearer challenge.
    let res = send(&s, Method::GET, "/orders", &[], "").await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");

    // client_secret_basic.
    let basic = format!("Basic {}", base64_encode("client:secret"));
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[
            ("authorization", &basic),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        "grant_type=client_credentials&scope=orders",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body = json_of(res).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 0); // 300 ms, in whole seconds
    assert_eq!(body["scope"], "orders");
    let bearer = format!("Bearer {}", body["access_token"].as_str().unwrap());
    assert_eq!(
        send(
            &s,
            Method::GET,
            "/orders",
            &[("authorization", &bearer)],
            ""
        )
        .await
        .unwrap()
        .status(),
        StatusCode::OK
    );

    // Expired.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let res = send(
        &s,
        Method::GET,
        "/orders",
        &[("authorization", &bearer)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );

    // client_secret_post, then revocation.
    s.update(|k| k.token_lifetime = Duration::from_secs(60));
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[],
        "grant_type=client_credentials&client_id=client&client_secret=secret",
    )
    .await
    .unwrap();
    let bearer = format!(
        "Bearer {}",
        json_of(res).await["access_token"].as_str().unwrap()
    );
    assert_eq!(
        send(
            &s,
            Method::GET,
            "/orders",
            &[("authorization", &bearer)],
            ""
        )
        .await
        .unwrap()
        .status(),
        StatusCode::OK
    );
    s.revoke_tokens();
    assert_eq!(
        send(
            &s,
            Method::GET,
            "/orders",
            &[("authorization", &bearer)],
            ""
        )
        .await
        .unwrap()
        .status(),
        StatusCode::UNAUTHORIZED
    );

    // Bad client, bad grant, injected failure, raw response.
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[],
        "grant_type=client_credentials&client_id=client&client_secret=nope",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(res).await["error"], "invalid_client");
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[],
        "grant_type=password&client_id=client&client_secret=secret",
    )
    .await
    .unwrap();
    assert_eq!(json_of(res).await["error"], "unsupported_grant_type");
    s.update(|k| k.token_fail_next = 1);
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[],
        "grant_type=client_credentials&client_id=client&client_secret=secret",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    s.update(|k| k.token_response = Some((200, "not json".into())));
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[],
        "grant_type=client_credentials",
    )
    .await
    .unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "not json"
    );
    let st = s.stats();
    assert_eq!((st.token_requests, st.tokens_issued), (6, 2));
    assert_eq!(st.unauthorized, 3);
}

#[tokio::test]
async fn basic_auth_form_encodes_id_and_secret() {
    // RFC 6749 §2.3.1 / Appendix B: a secret with ':', '+' and '%' must be form-encoded first.
    let s = ChaosServer::start(Knobs {
        client_secret: "a:b+c%d £€".into(),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let encoded: String = form_urlencoded::byte_serialize("a:b+c%d £€".as_bytes()).collect();
    let basic = format!("Basic {}", base64_encode(&format!("client:{encoded}")));
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[("authorization", &basic)],
        "grant_type=client_credentials",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let naive = format!("Basic {}", base64_encode("client:a:b+c%d £€"));
    let res = send(
        &s,
        Method::POST,
        "/oauth/token",
        &[("authorization", &naive)],
        "grant_type=client_credentials",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn api_version_and_deprecation_headers() {
    let s = ChaosServer::start(Knobs {
        api_version: Some("2024-06-01".into()),
        deprecation: Some(1_688_169_599),
        sunset: Some(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_719_791_999)),
        ..Knobs::default()
    })
    .await
    .unwrap();
    assert_eq!(
        send(&s, Method::GET, "/orders", &[], "")
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(
            &s,
            Method::GET,
            "/orders",
            &[("api-version", "2023-01-01")],
            ""
        )
        .await
        .unwrap()
        .status(),
        StatusCode::BAD_REQUEST
    );
    let res = send(
        &s,
        Method::GET,
        "/orders",
        &[("api-version", "2024-06-01")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["deprecation"], "@1688169599");
    assert_eq!(res.headers()["sunset"], "Sun, 30 Jun 2024 23:59:59 GMT");
}

#[tokio::test]
async fn three_pagination_styles_cover_every_order_once() {
    let s = ChaosServer::start(Knobs {
        orders: 95,
        ..Knobs::default()
    })
    .await
    .unwrap();

    // Cursor.
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/orders?limit=20&cursor={c}"),
            None => "/orders?limit=20".into(),
        };
        let body = json_of(send(&s, Method::GET, &path, &[], "").await.unwrap()).await;
        ids.extend(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["id"].as_str().unwrap().to_owned()),
        );
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(ids.len(), 95);
    assert_eq!(ids.first().unwrap(), "o_1");
    assert_eq!(ids.last().unwrap(), "o_95");

    // Link.
    let mut count = 0;
    let mut path = "/orders/link?per_page=30".to_owned();
    loop {
        let res = send(&s, Method::GET, &path, &[], "").await.unwrap();
        let next = sturdy_core::headers::next_link(res.headers(), &s.url(&path));
        count += json_of(res).await.as_array().unwrap().len();
        match next {
            Some(n) => path = n.strip_prefix(&s.url("")).unwrap().to_owned(),
            None => break,
        }
    }
    assert_eq!(count, 95);

    // Page numbers and offsets.
    let body = json_of(
        send(&s, Method::GET, "/orders/pages?page=4&per_page=30", &[], "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (
            body["items"].as_array().unwrap().len(),
            body["total"].as_u64()
        ),
        (5, Some(95))
    );
    let body = json_of(
        send(
            &s,
            Method::GET,
            "/orders/offset?offset=90&limit=30",
            &[],
            "",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(body["items"][0]["id"], "o_91");
    assert_eq!(s.stats().page_requests, 5 + 4 + 2);
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn debug_shows_the_address_not_the_client_secret_or_tokens() {
    let s = ChaosServer::start(Knobs {
        client_secret: "chaos-s3cret".into(),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let shown = format!("{s:?}");
    assert!(shown.contains(&s.addr().to_string()), "{shown}");
    assert!(!shown.contains("chaos-s3cret"), "{shown}");
}
