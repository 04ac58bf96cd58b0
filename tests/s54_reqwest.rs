//! s54: outside tests of sturdy-reqwest against docs/guides/reqwest.md and its rustdoc.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::core::{CallOptions, ErrorKind};
use sturdy::ClientBuilder;
use sturdy_reqwest::{same_origin_redirects, ReqwestService, SturdyMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Service, ServiceBuilder, ServiceExt};

type Reply = Arc<dyn Fn(&str, u16) -> Option<String> + Send + Sync>;

/// A raw HTTP/1.1 server on loopback: `reply(path, own_port)` gives the whole response, or
/// `None` to hold the connection without answering. Records (path, body) of each request.
struct Srv {
    port: u16,
    got: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    conns: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Srv {
    async fn start(reply: Reply) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(0));
        let (g, c) = (got.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                *c.lock().unwrap() += 1;
                let (g, reply) = (g.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..].to_vec();
                    g.lock().unwrap().push((path.clone(), body));
                    match reply(&path, port) {
                        Some(r) => {
                            let _ = s.write_all(r.as_bytes()).await;
                            let _ = s.shutdown().await;
                        }
                        None => {
                            let _ = s.read(&mut chunk).await;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                    }
                });
            }
        });
        Self {
            port,
            got,
            conns,
            task,
        }
    }
    fn url(&self, p: &str) -> String {
        format!("http://127.0.0.1:{}{p}", self.port)
    }
    fn got(&self) -> Vec<(String, Vec<u8>)> {
        self.got.lock().unwrap().clone()
    }
    fn conns(&self) -> usize {
        *self.conns.lock().unwrap()
    }
}

fn resp(status: u16, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stream_body(chunks: Vec<Bytes>) -> reqwest::Body {
    let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = chunks
        .into_iter()
        .map(|c| Ok(http_body::Frame::data(c)))
        .collect();
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)))
}

fn get(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn s54_same_origin_redirects_limit_message() {
    let s = Srv::start(Arc::new(|_p: &str, _| {
        Some(resp(302, "location: /loop\r\n", ""))
    }))
    .await;
    let client = reqwest::Client::builder()
        .redirect(same_origin_redirects(2))
        .build()
        .unwrap();
    let err = ReqwestService::new(client)
        .oneshot(get(&s.url("/start")))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("too many redirects (more than 2)"), "{text}");
    assert!(text.contains("could not follow a redirect"), "{text}");
    assert_eq!(err.kind(), &ErrorKind::Other, "{err:?}");
    assert_eq!(s.got().len(), 3, "the first request and two redirects");
}

#[tokio::test]
async fn s54_cross_origin_redirect_handed_back() {
    let other = Srv::start(Arc::new(|_p: &str, _| Some(resp(200, "", "other")))).await;
    let target = other.url("/x");
    let s = Srv::start(Arc::new(move |_p: &str, _| {
        Some(resp(302, &format!("location: {target}\r\n"), ""))
    }))
    .await;
    let client = reqwest::Client::builder()
        .redirect(same_origin_redirects(10))
        .build()
        .unwrap();
    let res = ReqwestService::new(client)
        .oneshot(get(&s.url("/a?api_key=s54secret")))
        .await
        .unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(other.conns(), 0, "another origin got the request");
}

#[tokio::test]
async fn s54_refused_error_hides_query_and_credentials() {
    let port = free_port();
    let url = format!("http://s54user:s54Pw0rd@127.0.0.1:{port}/p?api_key=s54KeyValue#s54frag");
    let err = ReqwestService::new(reqwest::Client::new())
        .oneshot(get(&url))
        .await
        .unwrap_err();
    let mut text = format!("{err} / {err:?}");
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(e) = src {
        text.push_str(&format!(" / {e} / {e:?}"));
        src = e.source();
    }
    for secret in ["s54KeyValue", "s54Pw0rd", "s54frag", "s54user"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert_eq!(err.kind(), &ErrorKind::Connect);

    // The same through the middleware, with retries.
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    let err = client
        .get(&url)
        .with_extension(CallOptions::new().without_retries())
        .send()
        .await
        .unwrap_err();
    let text = format!("{err} / {err:?}");
    for secret in ["s54KeyValue", "s54Pw0rd", "s54frag"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test]
async fn s54_streaming_body_over_limit_fails_before_sending() {
    let s = Srv::start(Arc::new(|_p: &str, _| Some(resp(200, "", "ok")))).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| ClientBuilder::new().build(next)).with_body_limit(10))
        .build();
    let body = stream_body(vec![Bytes::from(vec![b'a'; 8]), Bytes::from(vec![b'b'; 8])]);
    let err = client
        .post(s.url("/up"))
        .body(body)
        .send()
        .await
        .unwrap_err();
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{e:?}");
    assert_eq!(
        sturdy_reqwest::delivery(&err),
        sturdy::core::Delivery::NotSent
    );
    assert_eq!(s.conns(), 0, "nothing is sent");
    // Within the limit it goes.
    let body = stream_body(vec![Bytes::from_static(b"0123456789")]);
    let res = client.post(s.url("/up")).body(body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.got().last().unwrap().1, b"0123456789");
}

#[tokio::test]
async fn s54_request_timeout_names_reqwest_timeout() {
    let s = Srv::start(Arc::new(|_p: &str, _| None)).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    let t0 = Instant::now();
    let err = client
        .get(s.url("/slow"))
        .timeout(Duration::from_millis(100))
        .with_extension(CallOptions::new().without_retries())
        .send()
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let text = err.to_string();
    assert!(text.contains("timed out (reqwest's timeout)"), "{text}");
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
}

#[tokio::test]
async fn s54_307_resends_small_sized_body_but_not_a_stream() {
    let s = Srv::start(Arc::new(|p: &str, _| {
        if p == "/a" {
            Some(resp(307, "location: /b\r\n", ""))
        } else {
            Some(resp(200, "", "done"))
        }
    }))
    .await;
    let svc = ReqwestService::new(reqwest::Client::new());
    let req = http::Request::post(s.url("/a"))
        .body(Full::new(Bytes::from_static(b"payload54")))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.extensions().get::<reqwest::Url>().unwrap().path(), "/b");
    let got = s.got();
    assert_eq!(
        got.last().unwrap(),
        &("/b".to_string(), b"payload54".to_vec())
    );

    // A streamed body: reqwest answers the 307 with the redirect response itself.
    let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> =
        vec![Ok(http_body::Frame::data(Bytes::from_static(b"stream54")))];
    let req = http::Request::post(s.url("/a"))
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 307);

    // A sized body over the buffer limit is streamed too.
    let small = ReqwestService::new(reqwest::Client::new()).with_buffer_limit(4);
    let req = http::Request::post(s.url("/a"))
        .body(Full::new(Bytes::from_static(b"payload54")))
        .unwrap();
    let res = small.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 307);
}

#[tokio::test]
async fn s54_under_buffer_and_concurrency_limit_kept_service() {
    let s = Srv::start(Arc::new(|_p: &str, _| Some(resp(200, "", "hi")))).await;
    let client = ClientBuilder::new().build(ReqwestService::new(reqwest::Client::new()));
    let svc = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(client);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut svc = svc.clone();
        let url = s.url(&format!("/n{i}"));
        tasks.push(tokio::spawn(async move {
            let res = svc.ready().await?.call(get(&url)).await?;
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, sturdy::core::BoxError>(body)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Bytes::from_static(b"hi"));
    }
    assert_eq!(s.got().len(), 6);
}

#[tokio::test]
async fn s54_dropped_call_closes_the_connection() {
    let s = Srv::start(Arc::new(|_p: &str, _| None)).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    let fut = client.get(s.url("/hang")).send();
    let r = tokio::time::timeout(Duration::from_millis(300), fut).await;
    assert!(r.is_err(), "the server never answers");
    assert_eq!(s.conns(), 1);
    // A new call after the drop still works on a fresh server.
    let ok = Srv::start(Arc::new(|_p: &str, _| Some(resp(200, "", "ok")))).await;
    let res = client.get(ok.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn s54_ftp_url_is_config_not_sent() {
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    let err = client
        .get("ftp://127.0.0.1/file?token=s54tok")
        .send()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("invalid request"), "{text}");
    assert!(!format!("{text} {err:?}").contains("s54tok"));
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert_eq!(
        sturdy_reqwest::delivery(&err),
        sturdy::core::Delivery::NotSent
    );
}
