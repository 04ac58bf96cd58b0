use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use sturdy_core::{BoxError, Delivery, Error, ErrorKind};
use tower::Service;

use crate::body::ResponseBody;
use crate::error::{convert, convert_sent, Stage};

/// Request bodies of a known size up to this many bytes are handed to reqwest as bytes \[1 MiB\].
const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;

/// `reqwest::Client` as a `tower::Service<http::Request<B>>`: the HTTP client at the bottom of a
/// sturdy stack.
///
/// ```text
/// async fn(http::Request<B>) -> Result<http::Response<ResponseBody>, sturdy_core::Error>
/// ```
///
/// Every reqwest error becomes a [`sturdy_core::Error`] with the kind sturdy's classification
/// gives the same failure from hyper-util (see [`from_reqwest_error`](crate::from_reqwest_error)),
/// so the retry layer retries reqwest's timeouts, connect errors and resets, and the circuit
/// breaker counts them. Response bodies are [`ResponseBody`]s.
///
/// The response's extensions hold the final `reqwest::Url` (after redirects), besides those of
/// reqwest's response.
///
/// Request bodies: any `http_body::Body` (for sturdy stacks, `http_body_util::Full<Bytes>`).
/// A body whose exact size is known and at most the buffer limit \[1 MiB\] is handed to reqwest
/// as bytes, so reqwest can send it again on a 307 or 308 redirect; any other body is streamed.
///
/// # Clone
///
/// Cheap: `reqwest::Client` is a handle to a shared connection pool.
///
/// # Backpressure
///
/// Always ready: `reqwest::Client` applies no backpressure.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use sturdy::ClientBuilder;
/// use sturdy_chaos::{ChaosServer, Knobs};
/// use sturdy_reqwest::ReqwestService;
/// use tower::ServiceExt;
///
/// // The first two attempts get 503.
/// let server = ChaosServer::start(Knobs { fail_next: 2, ..Knobs::default() }).await.unwrap();
/// let client = ClientBuilder::new().build(ReqwestService::new(reqwest::Client::new()));
/// let req = http::Request::post(server.url("/orders"))
///     .header("content-type", "application/json")
///     .body(Full::new(Bytes::from_static(br#"{"item":"book"}"#)))
///     .unwrap();
/// let res = client.oneshot(req).await.unwrap();
/// assert_eq!(res.status(), 201);
/// let order = res.into_body().collect().await.unwrap().to_bytes();
/// assert!(order.starts_with(b"{"));
/// assert_eq!(server.stats().orders_committed, 1);
/// # }
/// ```
#[derive(Clone)]
pub struct ReqwestService {
    client: reqwest::Client,
    buffer_limit: usize,
}

impl ReqwestService {
    /// Sends requests with `client` (configure its timeouts, proxies, TLS and redirects as usual).
    ///
    /// Leave reqwest's own retry policy at its default (which retries only what the protocol
    /// says is safe): sturdy's retry layer decides retries, and two retry loops multiply
    /// attempts.
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
        }
    }

    /// Request bodies of a known size up to `bytes` are handed to reqwest as bytes; larger ones,
    /// and bodies of unknown size, are streamed \[1 MiB\].
    #[must_use]
    pub fn with_buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// The reqwest client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }

    /// Gives the reqwest client back.
    pub fn into_inner(self) -> reqwest::Client {
        self.client
    }
}

impl From<reqwest::Client> for ReqwestService {
    fn from(client: reqwest::Client) -> Self {
        Self::new(client)
    }
}

impl fmt::Debug for ReqwestService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the client's own `Debug`: it prints its default headers, values and all, and an
        // `Authorization` or API key set there is not marked sensitive.
        f.debug_struct("ReqwestService")
            .field("buffer_limit", &self.buffer_limit)
            .finish_non_exhaustive()
    }
}

impl<B> Service<http::Request<B>> for ReqwestService
where
    B: Body + Send + Sync + 'static,
    B::Data: Into<Bytes> + Send,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let small = req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= self.buffer_limit as u64);
        let state = if small {
            let (parts, body) = req.into_parts();
            State::Buffering {
                collect: body.collect(),
                head: Some((parts, self.client.clone())),
            }
        } else {
            send(
                &mut self.client,
                req.map(|b| reqwest::Body::wrap(StreamBody { inner: b })),
            )
        };
        ResponseFuture { state }
    }
}

fn send<B: Body>(client: &mut reqwest::Client, req: http::Request<reqwest::Body>) -> State<B> {
    let own_https = req.uri().scheme_str() == Some("https");
    match reqwest::Request::try_from(req) {
        Ok(req) => State::Sending {
            pending: client.call(req),
            waited: false,
            own_https,
        },
        Err(e) => State::Failed {
            error: Some(convert(e, Stage::Call)),
        },
    }
}

/// A reqwest response as an `http::Response` whose extensions hold the final URL.
pub(crate) fn into_http(res: reqwest::Response) -> http::Response<reqwest::Body> {
    let url = res.url().clone();
    let mut res = http::Response::<reqwest::Body>::from(res);
    res.extensions_mut().insert(url);
    res
}

pin_project! {
    /// A request body handed to reqwest as a stream (its data turned into `Bytes`).
    struct StreamBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Body for StreamBody<B>
where
    B: Body,
    B::Data: Into<Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map(|frame| frame.map_data(Into::into))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

pin_project! {
    /// The response future of [`ReqwestService`].
    pub struct ResponseFuture<B: Body> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B: Body> {
        // Reading a small request body into bytes before the request is sent.
        Buffering {
            #[pin]
            collect: Collect<B>,
            head: Option<(http::request::Parts, reqwest::Client)>,
        },
        Sending {
            #[pin]
            pending: Pending,
            // Whether reqwest has waited on the network yet: see `convert_sent`.
            waited: bool,
            // Whether the request's own URL is `https`: see `convert_sent`.
            own_https: bool,
        },
        Failed {
            error: Option<Error>,
        },
    }
}

impl<B: Body> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B> Future for ResponseFuture<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Buffering { collect, head } => {
                    let collected = ready!(collect.poll(cx));
                    let Some((parts, mut client)) = head.take() else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    match collected {
                        Ok(c) => {
                            let body = reqwest::Body::from(c.to_bytes());
                            send(&mut client, http::Request::from_parts(parts, body))
                        }
                        Err(e) => {
                            let e: BoxError = e.into();
                            State::Failed {
                                error: Some(
                                    Error::new(
                                        ErrorKind::Body,
                                        format!("could not read the request body: {e}"),
                                    )
                                    .with_hidden_source(e)
                                    .with_delivery(Delivery::NotSent),
                                ),
                            }
                        }
                    }
                }
                StateProj::Sending {
                    pending,
                    waited,
                    own_https,
                } => {
                    let Poll::Ready(res) = pending.poll(cx) else {
                        *waited = true;
                        return Poll::Pending;
                    };
                    return Poll::Ready(match res {
                        Ok(res) => Ok(into_http(res).map(ResponseBody::new)),
                        Err(e) => Err(convert_sent(e, *waited, *own_https)),
                    });
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(polled_after_completion)));
                }
            };
            this.state.set(next);
        }
    }
}

fn polled_after_completion() -> Error {
    Error::new(
        ErrorKind::Other,
        "a ReqwestService response future was polled after it completed",
    )
}
