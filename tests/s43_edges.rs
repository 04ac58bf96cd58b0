//! Edges of the settings and guards of docs/guides/auth.md and docs/guides/paginate.md:
//! extreme durations (`Duration::MAX`, `Duration::ZERO` "lets only an immediate answer
//! through"), a static bearer's 401 returned as is, the words of a token wait that runs out
//! before the replay after a 401, and a server cursor too long for a `page()` cursor
//! (`MAX_CURSOR_LEN`). Paused time, in-process.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ExposeSecret};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::paginate::{LinkHeader, Paginate, MAX_CURSOR_LEN};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

use crate::s43_util::{get, own, source, token_json, Answer, Api, Endpoint, TOKEN_URL};

const API: &str = "https://api.example.com/v1/orders";

#[tokio::test(start_paused = true)]
async fn duration_max_settings_neither_panic_nor_wedge() {
    let ep = Endpoint::new(token_json("t-1", None));
    let src = source(&ep)
        .with_request_timeout(Duration::MAX)
        .with_default_lifetime(Duration::MAX)
        .with_max_lifetime(Duration::MAX)
        .with_skew(Duration::MAX);
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(
            AuthLayer::oauth2(src.clone())
                .with_token_timeout(Duration::MAX)
                .with_attempt_timeout(Duration::MAX),
        )
        .service(api.service());
    assert_eq!(
        svc.clone().oneshot(get(API)).await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_secs(10 * 365 * 86_400)).await;
    assert_eq!(
        svc.oneshot(get(API)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(src.get().await.unwrap().secret().expose_secret(), "t-1");
}

#[tokio::test(start_paused = true)]
async fn a_zero_request_timeout_lets_only_an_immediate_answer_through() {
    let ep = Endpoint::new(token_json("t-1", Some("3600")));
    assert!(source(&ep)
        .with_request_timeout(Duration::ZERO)
        .get()
        .await
        .is_ok());
    let ep = Endpoint::new(Answer::After(
        Duration::from_millis(1),
        200,
        r#"{"access_token":"t","expires_in":3600}"#.into(),
    ));
    let err = source(&ep)
        .with_request_timeout(Duration::ZERO)
        .get()
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_static_bearers_401_is_returned_as_is() {
    let api = Api::default();
    *api.always.lock().unwrap() = Some(401);
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::bearer("static-token").unwrap())
        .service(api.service());
    let res = svc.oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.seen(), ["Bearer static-token"]);
}

#[tokio::test(start_paused = true)]
async fn a_token_wait_that_runs_out_before_the_replay_says_the_request_got_a_401() {
    let ep = Endpoint::new(Answer::Stall);
    ep.then(token_json("t-1", Some("3600")));
    let api = Api::default();
    api.statuses.lock().unwrap().extend([401]);
    let svc = ServiceBuilder::new()
        .layer(
            AuthLayer::oauth2(source(&ep).with_request_timeout(Duration::from_secs(600)))
                .with_token_timeout(Duration::from_secs(4)),
        )
        .service(api.service());
    let start = Instant::now();
    let err = svc.oneshot(get(API)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(4));
    let e = own(&err);
    assert_eq!(*e.kind(), ErrorKind::Timeout);
    assert_eq!(e.delivery(), Some(Delivery::MaybeProcessed));
    assert!(
        err.to_string().starts_with(&format!(
            "no access token from the token endpoint {TOKEN_URL} within 4s; the request got a 401 and was not replayed"
        )),
        "{err}"
    );
    assert_eq!(api.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_server_cursor_too_long_for_a_page_cursor_fails_the_call_with_a_short_error() {
    let long = format!("{API}?after={}", "x".repeat(MAX_CURSOR_LEN + 100));
    let next = format!("<{long}>; rel=\"next\"");
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let res = Response::builder()
            .header("link", next.clone())
            .body(Full::<Bytes>::from("[1, 2]"))
            .unwrap();
        async move { Ok::<_, Infallible>(res) }
    });
    let pager = Paginate::new(svc, API, LinkHeader::new("")).unwrap();
    // One item: the call stops inside the first page, a short cursor.
    let p = pager.page(None, 1).await.unwrap();
    assert!(p.next_cursor.unwrap().len() <= MAX_CURSOR_LEN);
    // Two: the cursor would carry the server's next link.
    match pager.page(None, 2).await {
        Ok(p) => assert!(p.next_cursor.is_none_or(|c| c.len() <= MAX_CURSOR_LEN)),
        Err(e) => {
            assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}");
            assert!(
                e.to_string().len() < 2_000,
                "a {} byte message",
                e.to_string().len()
            );
        }
    }
}
