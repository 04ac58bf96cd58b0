//! An in-process API whose pages the test scripts, counting the requests it gets.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::service_fn;

/// How many requests an [`api`] has answered.
#[derive(Clone, Default)]
pub(crate) struct Count(Arc<AtomicUsize>);

impl Count {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A page: its JSON body and, optionally, a `Link` header.
pub(crate) fn page(body: &str, link: Option<&str>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::from(body.to_owned()));
    if let Some(l) = link {
        r.headers_mut().insert("link", l.parse().unwrap());
    }
    r
}

/// An API that answers each request with `script(path_and_query)`.
pub(crate) fn api<F>(
    script: F,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Count,
)
where
    F: Fn(&str) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    let count = Count::default();
    let c = count.clone();
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        c.0.fetch_add(1, Ordering::SeqCst);
        let res = script(req.uri().path_and_query().map_or("/", |p| p.as_str()));
        async move { Ok(res) }
    });
    (svc, count)
}
