//! scratch
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{service_fn, ServiceExt};
fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let bare = service_fn(|_r: Request<Full<Bytes>>| std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(()))));
    let svc = sturdy::ClientBuilder::new().build(bare);
    let method: http::Method = std::env::args().nth(1).unwrap_or("GET".into()).parse().unwrap();
    let n: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    rt.block_on(async {
        for _ in 0..n {
            let mut r = Request::new(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")));
            *r.uri_mut() = http::Uri::from_static("http://api.example.com/orders");
            *r.method_mut() = method.clone();
            std::hint::black_box(svc.clone().oneshot(r).await.unwrap());
        }
    });
}
