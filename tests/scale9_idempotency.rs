//! The cost of hostile idempotency requests on the server (`IdempotencyLayer`), measured at
//! sizes n, 4n and 16n: time must grow about linearly (a ratio well under 40 between 16n and
//! n, compared within one run).
#![cfg(feature = "full")]

use crate::cost_common::{fastest, ratio, scaling};
use std::convert::Infallible;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use tower::{service_fn, Layer, Service, ServiceExt};

fn distinct_params(count: usize) -> String {
    let mut s = String::with_capacity(count * 5);
    for i in 0..count {
        let mut n = i;
        s.push(';');
        for _ in 0..4 {
            s.push(char::from(b'a' + (n % 26) as u8));
            n /= 26;
        }
    }
    s
}

type App = Box<dyn FnMut(Request<Full<Bytes>>) -> Response<()>>;

/// An app under `IdempotencyLayer` (memory store, `scope`), driven on a current-thread runtime.
fn app(layer: &IdempotencyLayer<MemoryStore>) -> App {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(201)
                .body(Full::new(Bytes::from_static(b"ok")))
                .unwrap(),
        )
    }));
    Box::new(move |req| {
        rt.block_on(async {
            let mut s = svc.clone();
            let res = s.ready().await.unwrap().call(req).await.unwrap();
            res.map(|_| ())
        })
    })
}

fn post(headers: &[(&str, &HeaderValue)]) -> Request<Full<Bytes>> {
    let mut b = Request::post("http://api.example.com/orders");
    for (k, v) in headers {
        b = b.header(*k, (*v).clone());
    }
    b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

/// `Idempotency-Key: "k-1";aaaa;baaa;...`: a valid key (the string item) followed by distinct
/// parameters. `read_key` parses it with `sf::parse_item`, whose parameter dedup compares each
/// new key with every one before it: 16 times the header costs about 256 times the time. Any
/// client can send it, before any store lookup; a 400 KiB header (hyper's default buffer) holds
/// 80,000 keys, 3.2 billion comparisons per request.
#[test]
fn idempotency_key_with_distinct_parameters_is_linear() {
    let t = scaling(1024, |bytes| {
        let key = HeaderValue::from_str(&format!("\"k-1\"{}", distinct_params(bytes / 5))).unwrap();
        let mut call = app(&IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
        fastest(5, || {
            let res = call(post(&[("idempotency-key", &key)]));
            assert_eq!(res.status(), StatusCode::CREATED);
        })
    });
    eprintln!(
        "Idempotency-Key, distinct keys: {t:?}, ratio {:.1}",
        ratio(&t)
    );
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// The same header with one parameter repeated (`;aaaa;aaaa;...`): linear, the baseline.
#[test]
fn idempotency_key_with_a_repeated_parameter_is_linear() {
    let t = scaling(1024, |bytes| {
        let key = HeaderValue::from_str(&format!("\"k-1\"{}", ";aaaa".repeat(bytes / 5))).unwrap();
        let mut call = app(&IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
        fastest(5, || {
            let res = call(post(&[("idempotency-key", &key)]));
            assert_eq!(res.status(), StatusCode::CREATED);
        })
    });
    eprintln!(
        "Idempotency-Key, one key repeated: {t:?}, ratio {:.1}",
        ratio(&t)
    );
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// Scope headers: a long `Authorization`, a `Cookie` of many pairs read by name, and many
/// identical `Idempotency-Key` lines (the ambiguity check compares each with the first).
#[test]
fn scope_headers_and_repeated_keys_are_linear() {
    let shapes: [(&str, fn(usize) -> Vec<(&'static str, HeaderValue)>); 3] = [
        ("authorization", |n| {
            vec![(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {}", "t".repeat(n))).unwrap(),
            )]
        }),
        ("cookie pairs", |n| {
            let pairs: Vec<String> = (0..n / 8).map(|i| format!("c{i}=v")).collect();
            vec![(
                "cookie",
                HeaderValue::from_str(&format!("{}; sid=s1", pairs.join("; "))).unwrap(),
            )]
        }),
        ("repeated keys", |n| {
            (0..n / 8)
                .map(|_| ("idempotency-key", HeaderValue::from_static("k-1")))
                .collect()
        }),
    ];
    for (name, make) in shapes {
        let t = scaling(1024, |bytes| {
            let mut hs = make(bytes);
            if !hs.iter().any(|(k, _)| *k == "idempotency-key") {
                hs.push(("idempotency-key", HeaderValue::from_static("k-1")));
            }
            let mut call = app(&IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default().with_cookies(["sid"]),
            ));
            fastest(5, || {
                let refs: Vec<(&str, &HeaderValue)> = hs.iter().map(|(k, v)| (*k, v)).collect();
                let res = call(post(&refs));
                assert_eq!(res.status(), StatusCode::CREATED, "{name}");
            })
        });
        eprintln!("{name}: {t:?}, ratio {:.1}", ratio(&t));
        assert!(ratio(&t) < 40.0, "{name}: {t:?}");
    }
}

/// Over the wire: an axum server with `IdempotencyLayer` accepts (hyper's default 400 KiB head
/// buffer) a 200 KiB `Idempotency-Key` of distinct parameters and spends seconds of CPU on it,
/// in the request's task, before it answers. Prints the time; any client can send it.
#[test]
#[ignore = "slow: prints the server time of one 200 KiB Idempotency-Key"]
fn one_large_idempotency_key_over_the_wire() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let router = axum::Router::new()
            .route("/orders", axum::routing::post(|| async { (StatusCode::CREATED, "o_1") }))
            .layer(IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default(),
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let key = format!("\"k-1\"{}", distinct_params(200 * 1024 / 5));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        let start = Instant::now();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let took = start.elapsed();
        let head = String::from_utf8_lossy(&out[..out.len().min(40)]).into_owned();
        eprintln!("200 KiB Idempotency-Key: {head:?} after {took:?}");
        assert!(head.starts_with("HTTP/1.1 201"), "{head}");
        assert!(took < Duration::from_millis(100), "{took:?}");
    });
}
