//! The webhook verifiers and the Link pager against public vectors (/work/shared/vectors/
//! STANDARDS.md) and real third parties: deliveries signed by the npm packages
//! `standardwebhooks` and `stripe` (`interop/sign.js`) and json-server's Link pagination.
//! `STURDY_INTEROP_NODE_DIR` names a directory holding `sign.js` and its `node_modules`; without
//! it the third-party tests print a skip line and pass.
use std::io::Write;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post_service;
use axum::Router;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sturdy::core::WallClock;
use sturdy::paginate::{LinkHeader, Paginate};
use sturdy::webhook::{
    sign_github, GitHub, MemoryQueue, MemoryReceiver, StandardWebhooks, Stripe, WebhookReceiver,
};
use tower::{service_fn, ServiceExt};

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_TS: i64 = 1614265330;
const SW_PAYLOAD: &str = r#"{"test": 2432232314}"#;
const SW_EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
const STRIPE_SECRET: &str = "whsec_server29_interop_stripe";

#[derive(Debug)]
struct Fixed(i64);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0 as u64)
    }
}

fn now() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn node_dir() -> Option<String> {
    match std::env::var("STURDY_INTEROP_NODE_DIR") {
        Ok(d) if !d.is_empty() => Some(d),
        _ => {
            if std::env::var("STURDY_INTEROP").as_deref() == Ok("1") {
                panic!("STURDY_INTEROP=1 but STURDY_INTEROP_NODE_DIR is not set");
            }
            eprintln!("skipped: STURDY_INTEROP_NODE_DIR is not set");
            None
        }
    }
}

fn sign(dir: &str, cases: &Value) -> Vec<String> {
    let mut child = Command::new("node")
        .arg(format!("{dir}/sign.js"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn app_standard(clock: Option<i64>, limit: usize) -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let mut r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_body_limit(limit);
    if let Some(c) = clock {
        r = r.with_clock(Arc::new(Fixed(c)));
    }
    (Router::new().route("/wh", post_service(r)), events)
}

fn app_stripe(clock: Option<i64>, limit: usize) -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let mut r =
        WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue).with_body_limit(limit);
    if let Some(c) = clock {
        r = r.with_clock(Arc::new(Fixed(c)));
    }
    (Router::new().route("/wh", post_service(r)), events)
}

async fn deliver_standard(
    app: &Router,
    id: &str,
    ts: i64,
    sig: &str,
    body: impl Into<Body>,
) -> StatusCode {
    let req = Request::post("/wh")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(body.into())
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

async fn deliver_stripe(app: &Router, sig: &str, body: impl Into<Body>) -> StatusCode {
    let req = Request::post("/wh")
        .header("stripe-signature", sig)
        .body(body.into())
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

// ---- public vectors -----------------------------------------------------------------------------

#[tokio::test]
async fn sw1_vector_and_its_negatives() {
    let (app, mut events) = app_standard(Some(SW_TS), 1 << 20);
    assert_eq!(
        deliver_standard(&app, SW_ID, SW_TS, SW_EXPECTED, SW_PAYLOAD).await,
        StatusCode::OK
    );
    assert_eq!(events.recv().await.unwrap().id, SW_ID);
    let (app, mut events) = app_standard(Some(SW_TS), 1 << 20);
    for bad in [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
        "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
    ] {
        let s = deliver_standard(&app, SW_ID, SW_TS, bad, SW_PAYLOAD).await;
        assert!(s == StatusCode::UNAUTHORIZED || s == StatusCode::BAD_REQUEST, "{bad}: {s}");
    }
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn sw_multi_and_time_vectors() {
    let (app, _events) = app_standard(Some(SW_TS), 1 << 20);
    let multi = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    assert_eq!(
        deliver_standard(&app, SW_ID, SW_TS, multi, SW_PAYLOAD).await,
        StatusCode::OK
    );
    for clock in [SW_TS + 301, SW_TS - 301] {
        let (app, _events) = app_standard(Some(clock), 1 << 20);
        assert_eq!(
            deliver_standard(&app, SW_ID, SW_TS, SW_EXPECTED, SW_PAYLOAD).await,
            StatusCode::UNAUTHORIZED,
            "clock {clock}"
        );
    }
    let req = Request::post("/wh")
        .header("webhook-id", SW_ID)
        .header("webhook-timestamp", "hello")
        .header("webhook-signature", SW_EXPECTED)
        .body(Body::from(SW_PAYLOAD))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

#[test]
fn sw_secret_vectors() {
    assert!(
        StandardWebhooks::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS").is_ok(),
        "unpadded, as the docs allow"
    );
    assert!(StandardWebhooks::new("").is_err());
    assert!(StandardWebhooks::new("whsec_").is_err());
}

#[tokio::test]
async fn gh1_vector() {
    assert_eq!(
        sign_github("It's a Secret to Everybody", b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
    let (queue, mut events) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(GitHub::new("It's a Secret to Everybody").unwrap(), queue);
    let app = Router::new().route("/gh", post_service(r));
    let req = Request::post("/gh")
        .header(
            "x-hub-signature-256",
            "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
        )
        .body(Body::from("Hello, World!"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK,
        "either case of hex"
    );
    assert!(events.recv().await.is_some());
}

#[tokio::test]
async fn stripe_header_negatives_are_rejected() {
    let t = 1_700_000_000;
    let (app, mut events) = app_stripe(Some(t), 1 << 20);
    for bad in [
        "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef",
        "t,v1=,v0=",
        "t,v1=,v0",
        "t,v1=,",
        "t,,",
        ",,",
        "t",
        "",
        "v1,t=1",
        "t=",
        "bad_header",
    ] {
        let s = deliver_stripe(&app, bad, "{}").await;
        assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED, "{bad:?}: {s}");
    }
    let good = sturdy::webhook::sign_stripe(STRIPE_SECRET, t, br#"{"id":"evt_x"}"#);
    assert_eq!(
        deliver_stripe(
            &app,
            &format!("{good},v1=bad_signature"),
            r#"{"id":"evt_x"}"#
        )
        .await,
        StatusCode::OK
    );
    let v1 = good.split(',').nth(1).unwrap().trim_start_matches("v1=");
    let s = deliver_stripe(&app, &format!("t={t},v0={v1}"), r#"{"id":"evt_y"}"#).await;
    assert!(
        s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED,
        "no v1 entry: {s}"
    );
    assert_eq!(events.recv().await.unwrap().id, "evt_x");
}

type Pages = Arc<std::sync::Mutex<Vec<String>>>;

fn link_api(
    link: &'static str,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Pages,
) {
    let seen: Pages = Arc::default();
    let s = seen.clone();
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let first = s.lock().unwrap().is_empty();
        s.lock().unwrap().push(req.uri().to_string());
        async move {
            let mut b = http::Response::builder();
            if first {
                for line in link.split('\n') {
                    b = b.header("link", line);
                }
            }
            Ok::<_, std::convert::Infallible>(b.body(Full::from("[1]")).unwrap())
        }
    });
    (svc, seen)
}

#[tokio::test]
async fn rfc8288_examples_find_next_where_there_is_one() {
    for (link, want) in [
        (
            "</TheBook/chapter2>; rel=\"previous\"; title*=UTF-8'de'letztes%20Kapitel, </TheBook/chapter4>; rel=\"next\"; title*=UTF-8'de'n%c3%a4chstes%20Kapitel",
            Some("http://example.com/TheBook/chapter4"),
        ),
        ("<http://example.com/p2>; rel=\"start next\"", Some("http://example.com/p2")),
        ("<http://example.com/p2>; rel=NEXT", Some("http://example.com/p2")),
        ("<http://example.com/a>; rel=\"start\"\n<http://example.com/p3>; rel=\"next\"", Some("http://example.com/p3")),
        ("<http://example.com/q>; rel=\"prev\"; title=\"a, b; rel=next\"", None),
        ("<http://example.com/q>; rel=\"prev\", <http://example.com/r>; rel=\"next\"; rel=\"prev\"", Some("http://example.com/r")),
        ("<http://example.com/q>; rel=\"next\"; rel=\"prev\"", Some("http://example.com/q")),
        ("<http://example.com/s>; rel=\"prev\"; rel=\"next\"", None),
        ("<http://example.com/t>; rel=\"http://example.net/next\"", None),
    ] {
        let (svc, seen) = link_api(link);
        let pager = Paginate::new(svc, "http://example.com/TheBook/chapter3", LinkHeader::new("").without_limit_param()).unwrap();
        let r: Result<Vec<Value>, _> = pager.items().try_collect().await;
        r.unwrap_or_else(|e| panic!("{link}: {e}"));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.get(1).map(String::as_str), want, "{link}");
    }
}

// ---- real signers ------------------------------------------------------------------------------------

#[tokio::test]
async fn standardwebhooks_library_edge_cases_verify_with_sturdy() {
    let Some(dir) = node_dir() else { return };
    let t = now();
    let big = "x".repeat(2 * 1024 * 1024);
    let cases = [
        ("msg_lib_edge_old", t - 290, "{}".to_string()),
        ("msg_lib_edge_new", t + 290, "{}".to_string()),
        ("msg_lib_empty", t, String::new()),
        ("msg_lib_big", t, big.clone()),
        (
            "msg_lib_unicode",
            t,
            "{\"name\":\"Zoë ✓ 日本\"}".to_string(),
        ),
        (
            &*Box::leak("m".repeat(256).into_boxed_str()),
            t,
            "{}".to_string(),
        ),
    ];
    let json_cases: Vec<Value> = cases
        .iter()
        .map(|(id, ts, p)| json!({"scheme":"standard","secret":SW_SECRET,"id":id,"timestamp":ts,"payload":p}))
        .collect();
    let sigs = sign(&dir, &Value::Array(json_cases));
    let (app, mut events) = app_standard(None, 4 * 1024 * 1024);
    for ((id, ts, p), sig) in cases.iter().zip(&sigs) {
        assert_eq!(
            deliver_standard(&app, id, *ts, sig, p.clone()).await,
            StatusCode::OK,
            "{id}"
        );
        let e = events.recv().await.unwrap();
        assert_eq!(e.body.len(), p.len());
    }
    // Signed by the library, but stale, or for another body.
    let stale = sign(
        &dir,
        &json!([{"scheme":"standard","secret":SW_SECRET,"id":"msg_stale","timestamp":t - 400,"payload":"{}"}]),
    );
    assert_eq!(
        deliver_standard(&app, "msg_stale", t - 400, &stale[0], "{}").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        deliver_standard(&app, "msg_lib_empty", t, &sigs[2], "x").await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn stripe_library_edge_cases_verify_with_sturdy() {
    let Some(dir) = node_dir() else { return };
    let t = now();
    let payloads = [
        r#"{"id":"evt_lib_1","object":"event"}"#.to_string(),
        String::new(),
        format!(
            "{{\"id\":\"evt_lib_big\",\"pad\":\"{}\"}}",
            "p".repeat(2 * 1024 * 1024)
        ),
        r#"{"id":"evt_ünï","object":"event"}"#.to_string(),
        format!("{{\"id\":\"{}\"}}", "e".repeat(300)),
    ];
    let cases: Vec<Value> = payloads
        .iter()
        .map(|p| json!({"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":t,"payload":p}))
        .collect();
    let sigs = sign(&dir, &Value::Array(cases));
    let (app, mut events) = app_stripe(None, 4 * 1024 * 1024);
    for (p, sig) in payloads.iter().zip(&sigs) {
        assert_eq!(
            deliver_stripe(&app, sig, p.clone()).await,
            StatusCode::OK,
            "{}",
            &p[..p.len().min(40)]
        );
        let e = events.recv().await.unwrap();
        if p.contains("evt_lib_1") {
            assert_eq!(e.id, "evt_lib_1");
        }
        if p.contains("eeeeeeeeee") {
            assert!(
                e.id.starts_with("sha256:"),
                "an id over 256 bytes is not used: {}",
                e.id
            );
        }
    }
    // A delivery signed with another secret by the library.
    let other = sign(
        &dir,
        &json!([{"scheme":"stripe","secret":"whsec_other","timestamp":t,"payload":"{}"}]),
    );
    assert_eq!(
        deliver_stripe(&app, &other[0], "{}").await,
        StatusCode::UNAUTHORIZED
    );
    // Stripe's own retry: same body, signed again later: a duplicate.
    let again = sign(
        &dir,
        &json!([{"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":t + 5,"payload":payloads[0]}]),
    );
    let (app2, mut ev2) = app_stripe(Some(t + 5), 1 << 20);
    assert_eq!(
        deliver_stripe(&app2, &sigs[0], payloads[0].clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        deliver_stripe(&app2, &again[0], payloads[0].clone()).await,
        StatusCode::OK
    );
    ev2.recv().await.unwrap();
    assert!(ev2.try_recv().is_none(), "Stripe's resend is a duplicate");
}

// ---- json-server ------------------------------------------------------------------------------------------

struct Peer(Child);
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn json_server(dir: &str, n: usize) -> Option<(Peer, u16)> {
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        "const j=require('json-server');const http=require('http');\
         const items=[];for(let i=1;i<={n};i++)items.push({{id:i,name:'item '+i}});\
         const app=j.create();app.use(j.defaults({{logger:false}}));app.use(j.router({{items}}));\
         http.createServer(app).listen({port},'127.0.0.1',()=>console.log('up'));"
    );
    let child = Command::new("node")
        .arg("-e")
        .arg(script)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let peer = Peer(child);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some((peer, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("json-server did not start");
}

#[tokio::test]
async fn json_server_link_pagination_end_to_end_through_the_sturdy_client() {
    let Some(dir) = node_dir() else { return };
    let (_peer, port) = json_server(&dir, 100).await.unwrap();
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = sturdy::ClientBuilder::new().build(http);
    let pager = Paginate::new(
        client.clone(),
        &format!("http://127.0.0.1:{port}/items?_page=1"),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    let ids: Vec<u64> = all.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());

    let pager = Paginate::builder(
        client,
        &format!("http://127.0.0.1:{port}/items?_page=1"),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_size(7)
    .build()
    .unwrap();
    let pages: Vec<_> = pager.pages().try_collect().await.unwrap();
    assert_eq!(pages.len(), 15);
    let mut cursor: Option<String> = None;
    let mut got = Vec::new();
    loop {
        let p = pager.page(cursor.as_deref(), 30).await.unwrap();
        got.extend(p.items.iter().map(|v| v["id"].as_u64().unwrap()));
        if !p.has_more {
            break;
        }
        cursor = p.next_cursor;
    }
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn json_server_empty_collection_and_a_page_past_the_end() {
    let Some(dir) = node_dir() else { return };
    let (_peer, port) = json_server(&dir, 0).await.unwrap();
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let pager = Paginate::new(
        http,
        &format!("http://127.0.0.1:{port}/items?_page=1"),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert!(all.is_empty());
    let p = pager.page(None, 10).await.unwrap();
    assert!(p.items.is_empty() && !p.has_more && p.next_cursor.is_none());
}
