//! The rate limiter against a real nginx `limit_req` on loopback (started here with a temporary
//! configuration): its bare 429s, its default bare 503s and a 503 with `Retry-After`, as
//! docs/guides/ratelimit.md describes the reaction to each.

#![cfg(feature = "full")]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::BoxError;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, Service, ServiceExt};

const NGINX: &str = "/usr/sbin/nginx";

/// An nginx started for one test, stopped (its process killed) when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts nginx with `limit_req rate=10r/s` locations; `None` when nginx is not installed.
async fn start_nginx() -> Option<Nginx> {
    if !std::path::Path::new(NGINX).exists() {
        eprintln!("nginx not installed: skipped");
        return None;
    }
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    for _attempt in 0..5 {
        let dir = std::env::temp_dir().join(format!(
            "sturdy-limits-nginx-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (port, upstream) = (free_port(), free_port());
        let d = dir.display();
        let conf = format!(
            r#"
worker_processes 1;
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    limit_req_zone $uri zone=strict429:1m rate=10r/s;
    limit_req_zone $uri zone=strict503:1m rate=10r/s;
    limit_req_zone $uri zone=after503:1m rate=10r/s;
    upstream answer {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location /strict429/ {{
            limit_req zone=strict429;
            limit_req_status 429;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://answer;
        }}
        location /strict503/ {{
            limit_req zone=strict503;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://answer;
        }}
        location /after503/ {{
            limit_req zone=after503;
            error_page 503 = @unavailable;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://answer;
        }}
        location @unavailable {{
            add_header Retry-After 1 always;
            return 503 'unavailable';
        }}
    }}
    server {{
        listen 127.0.0.1:{upstream};
        location / {{ return 200 'ok'; }}
    }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx { child, dir, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", upstream)).is_ok()
            {
                return Some(nginx);
            }
            if nginx.child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
        eprintln!("nginx did not start on {port}: {log}");
    }
    panic!("nginx could not be started");
}

type Body = Full<Bytes>;

/// A hyper-util client that counts the statuses it received.
fn counted_http() -> (
    impl Service<Request<Body>, Response = Response<Incoming>, Error = BoxError, Future = impl Send>
        + Clone
        + Send
        + Sync
        + 'static,
    Arc<Mutex<Vec<u16>>>,
) {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Body>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let svc = service_fn(move |req: Request<Body>| {
        let client = client.clone();
        let s = s.clone();
        async move {
            let res = client.request(req).await.map_err(BoxError::from)?;
            s.lock().unwrap().push(res.status().as_u16());
            Ok::<_, BoxError>(res)
        }
    });
    (svc, seen)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::default()).unwrap()
}

/// Calls until nginx refuses one (its `limit_req` lets a call through when more than 100 ms
/// passed since the last, which a loaded machine can take between two calls); the first call to
/// a fresh location is let through. Returns the refusal.
async fn until_refused<S>(svc: &S, uri: &str) -> Response<Incoming>
where
    S: Service<Request<Body>, Response = Response<Incoming>, Error = BoxError> + Clone,
{
    assert_eq!(svc.clone().oneshot(get(uri)).await.unwrap().status(), 200);
    for _ in 0..50 {
        let res = svc.clone().oneshot(get(uri)).await.unwrap();
        if res.status() != 200 {
            return res;
        }
    }
    panic!("nginx let 51 calls in a row through a 10 r/s limit");
}

async fn burst<S>(svc: S, uri: &str, n: usize) -> Vec<Result<u16, String>>
where
    S: Service<Request<Body>, Response = Response<Incoming>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let uri = uri.to_string();
            tokio::spawn(async move {
                svc.oneshot(get(&uri))
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_gets_at_once_against_limit_req_429_all_succeed() {
    let Some(nginx) = start_nginx().await else {
        return;
    };
    let (http, seen) = counted_http();
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(2))
        .build(http);
    let start = tokio::time::Instant::now();
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        burst(
            client,
            &format!("http://127.0.0.1:{}/strict429/a", nginx.port),
            20,
        ),
    )
    .await
    .expect("within 30 s");
    let took = start.elapsed();
    let seen = seen.lock().unwrap().clone();
    let limited = seen.iter().filter(|s| **s == 429).count();
    eprintln!("20 GETs: {took:?}, {} requests, {limited} 429s", seen.len());
    assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
    assert!(took <= Duration::from_secs(10), "about 4 s: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_429_from_nginx_pauses_and_teaches_a_pace() {
    let Some(nginx) = start_nginx().await else {
        return;
    };
    let (http, _) = counted_http();
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(http);
    let uri = format!("http://127.0.0.1:{}/strict429/b", nginx.port);
    let key = format!("127.0.0.1:{}", nginx.port);
    assert_eq!(until_refused(&svc, &uri).await.status(), 429);
    let pause = handle.pause(&key).expect("a bare 429 pauses");
    assert!(
        pause <= Duration::from_secs(1) && pause >= Duration::from_millis(500),
        "about a second: {pause:?}"
    );
    assert_eq!(handle.learned_pace(&key), Some(Duration::from_millis(125)));
    let left = handle.pause(&key).unwrap_or_default();
    let start = tokio::time::Instant::now();
    assert_eq!(svc.clone().oneshot(get(&uri)).await.unwrap().status(), 200);
    // The next call waits out what is left of the pause (read just before it started).
    assert!(
        start.elapsed() + Duration::from_millis(50) >= left,
        "{:?} of {left:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_503_from_nginx_pauses_only_with_bare_503_pauses() {
    let Some(nginx) = start_nginx().await else {
        return;
    };
    let key = format!("127.0.0.1:{}", nginx.port);
    for (on, path) in [(false, "c"), (true, "d")] {
        let (http, _) = counted_http();
        let (layer, handle) = RateLimitLayer::adaptive_only()
            .with_bare_503_pauses(on)
            .pair();
        let svc = layer.layer(http);
        let uri = format!("http://127.0.0.1:{}/strict503/{path}", nginx.port);
        assert_eq!(until_refused(&svc, &uri).await.status(), 503);
        assert_eq!(
            handle.pause(&key).is_some(),
            on,
            "with_bare_503_pauses({on})"
        );
        assert_eq!(handle.learned_pace(&key).is_some(), on);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_gets_against_nginx_default_503_all_succeed_with_bare_503_pauses() {
    let Some(nginx) = start_nginx().await else {
        return;
    };
    let (http, _) = counted_http();
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .with_attempt_timeout(Duration::from_secs(2))
        .build(http);
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        burst(
            client,
            &format!("http://127.0.0.1:{}/strict503/e", nginx.port),
            20,
        ),
    )
    .await
    .expect("within 30 s");
    assert!(results.iter().all(|r| r == &Ok(200)), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_from_nginx_pauses_for_it() {
    let Some(nginx) = start_nginx().await else {
        return;
    };
    let (http, _) = counted_http();
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(http);
    let uri = format!("http://127.0.0.1:{}/after503/f", nginx.port);
    let key = format!("127.0.0.1:{}", nginx.port);
    let res = until_refused(&svc, &uri).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let pause = handle.pause(&key).expect("a 503 with Retry-After pauses");
    assert!(
        pause >= Duration::from_millis(500) && pause <= Duration::from_secs(1),
        "{pause:?}"
    );
    assert_eq!(
        handle.learned_pace(&key),
        None,
        "a pause, not a pace: the server said when"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_quota_just_under_nginx_meets_almost_no_429() {
    let Some(nginx) = start_nginx().await else {
        return;
    };
    let (http, seen) = counted_http();
    let svc = RateLimitLayer::new(Quota::new(19, Duration::from_secs(2)).unwrap()).layer(http);
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        burst(
            svc,
            &format!("http://127.0.0.1:{}/strict429/g", nginx.port),
            20,
        ),
    )
    .await
    .expect("within 30 s");
    let limited = seen.lock().unwrap().iter().filter(|s| **s == 429).count();
    assert!(
        limited <= 2,
        "now and then on a loaded machine: {limited} of {results:?}"
    );
}
