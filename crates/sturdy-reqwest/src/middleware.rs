//! A sturdy stack inside a reqwest-middleware chain.

use std::error::Error as StdError;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{select, Either};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use http::Extensions;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use reqwest::ResponseBuilderExt as _;
use reqwest_middleware::{Middleware, Next};
use sturdy_core::classify::{classify_error, describe};
use sturdy_core::{BoxError, Delivery, DriverGone, Error, ErrorKind};
use tokio::sync::{mpsc, oneshot};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};

use crate::error::{convert, convert_sent, Stage};
use crate::service::into_http;

/// Streaming request bodies are buffered up to this many bytes \[16 MiB\].
const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;

type Stack =
    BoxCloneSyncService<http::Request<Full<Bytes>>, http::Response<reqwest::Body>, BoxError>;

/// A `reqwest_middleware::Middleware` that runs each request through a sturdy stack: existing
/// reqwest-middleware code adopts sturdy with one `.with(..)`.
///
/// ```text
/// reqwest_middleware::ClientBuilder::new(reqwest_client)
///     .with(TracingMiddleware)            // sees each call once
///     .with(SturdyMiddleware::new(|next| sturdy::ClientBuilder::new().build(next)))
///     .with(LoggingMiddleware)            // sees every attempt
/// ```
///
/// The closure given to [`new`](Self::new) builds the stack around a [`NextAttempt`]: the
/// service that sends one attempt on down the rest of the chain (the middlewares added after
/// this one, then the reqwest client). Build it with `sturdy::ClientBuilder::build`, or with a
/// `tower::ServiceBuilder` of any sturdy layers. The stack is built once, so every call made
/// through the client shares its state: circuit breakers, rate limits, retry budgets, token caches.
///
/// What a request keeps from reqwest: everything `reqwest::RequestBuilder` set (headers,
/// `.json()`, `.query()`, `.bearer_auth()`, `.timeout()`, which then bounds each attempt), and the
/// response is a `reqwest::Response` whose `url()` is the final URL.
///
/// What the stack sees: an `http::Request<Full<Bytes>>` whose extensions hold the request's
/// reqwest-middleware extensions, so `sturdy_core::CallOptions` or a `sturdy_core::Trace` given
/// with `RequestBuilder::with_extension` reach the sturdy layers. A streaming body (a stream,
/// multipart) is read into memory first, up to the body limit \[16 MiB\]; a longer one fails
/// with a `Body` error before anything is sent. Whether a body is replayed by a retry is the
/// retry layer's decision (bodies up to its replay limit, 1 MiB by default).
///
/// Each attempt goes down the chain with a copy of the call's extensions; when the call ends,
/// the call's extensions are replaced by those of the last attempt that finished or was given up
/// (at its attempt timeout or the call's deadline). An attempt the stack stops waiting for is
/// cancelled: the rest of the chain's future is dropped, as a hyper-util request is when its
/// future is dropped.
///
/// Errors: a failed call is `reqwest_middleware::Error::Middleware` holding the stack's error
/// (for the retry layer, a [`sturdy_core::Error`] such as `gave up after 4 attempts: connection
/// refused`). Find it with [`find`](crate::find); ask whether the request may have been
/// processed with [`delivery`](crate::delivery). reqwest errors of each attempt are converted
/// with [`from_reqwest_error`](crate::from_reqwest_error) before the stack sees them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sturdy::ClientBuilder;
/// use sturdy_chaos::{ChaosServer, Knobs};
/// use sturdy_reqwest::SturdyMiddleware;
///
/// // The connection of the first order is closed after the order was committed.
/// let server = ChaosServer::start(Knobs {
///     reset_after_commit_next: 1,
///     idempotency: true,
///     ..Knobs::default()
/// })
/// .await
/// .unwrap();
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(SturdyMiddleware::new(|next| ClientBuilder::new().build(next)))
///     .build();
/// let res = client
///     .post(server.url("/orders"))
///     .header("content-type", "application/json")
///     .body(r#"{"item":"book"}"#)
///     .send()
///     .await
///     .unwrap();
/// // The retry carried the same idempotency key: the server replayed the first outcome.
/// assert_eq!(res.status(), 201);
/// assert_eq!(res.headers()["idempotent-replayed"], "true");
/// assert_eq!(server.stats().orders_committed, 1);
/// # }
/// ```
#[derive(Clone)]
pub struct SturdyMiddleware {
    stack: Stack,
    body_limit: usize,
}

impl SturdyMiddleware {
    /// Builds the stack once, around the [`NextAttempt`] that `make` is given.
    ///
    /// The stack may answer with any body (a `ClientBuilder` with coalescing answers with
    /// `sturdy::coalesce::ResponseBody`): it is handed back to reqwest as a `reqwest::Body`.
    pub fn new<F, S, Rb>(make: F) -> Self
    where
        F: FnOnce(NextAttempt) -> S,
        S: Service<http::Request<Full<Bytes>>, Response = http::Response<Rb>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Rb: http_body::Body + Send + Sync + 'static,
        Rb::Data: Into<Bytes>,
        Rb::Error: Into<BoxError>,
    {
        let stack = make(NextAttempt { _priv: () })
            .map_response(|res: http::Response<Rb>| res.map(reqwest::Body::wrap))
            .map_err(Into::into);
        Self {
            stack: BoxCloneSyncService::new(stack),
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    /// Streaming request bodies are read into memory up to `bytes`; a longer one fails the call
    /// before anything is sent \[16 MiB\]. Bodies reqwest already holds as bytes (`.body(..)`
    /// with bytes or a string, `.json()`, `.form()`) are not limited.
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

impl fmt::Debug for SturdyMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SturdyMiddleware")
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Middleware for SturdyMiddleware {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let mut req = match into_http_request(req, self.body_limit).await {
            Ok(r) => r,
            Err(e) => return Err(into_middleware_error(Box::new(e))),
        };
        req.extensions_mut().extend(extensions.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        req.extensions_mut().insert(Dispatch(tx));
        let call = self.stack.clone().oneshot(req);
        match drive(call, rx, next, extensions).await {
            Ok(res) => Ok(into_reqwest_response(res)),
            Err(e) => Err(into_middleware_error(e)),
        }
    }
}

/// Runs the stack's call, sending each attempt it makes down the rest of the chain, until the
/// call ends. Attempts run concurrently when the stack makes them concurrently.
async fn drive<F>(
    call: F,
    mut attempts: mpsc::UnboundedReceiver<Attempt>,
    next: Next<'_>,
    extensions: &mut Extensions,
) -> Result<http::Response<reqwest::Body>, BoxError>
where
    F: Future<Output = Result<http::Response<reqwest::Body>, BoxError>>,
{
    let mut call = pin!(call);
    let mut running = FuturesUnordered::new();
    let mut last: Option<Extensions> = None;
    let result = poll_fn(|cx| {
        while let Poll::Ready(Some(attempt)) = attempts.poll_recv(cx) {
            running.push(run_attempt(next.clone(), attempt, extensions.clone()));
        }
        while let Poll::Ready(Some(ext)) = running.poll_next_unpin(cx) {
            last = Some(ext);
        }
        call.as_mut().poll(cx)
    })
    .await;
    // The stack gave up on an attempt as it ended (its timeout, the call's deadline): that
    // attempt has not been polled since, and ends as soon as it is (it sees it was abandoned).
    // Its extensions are the last ones. One more poll, without waiting: an attempt still
    // running is not waited for.
    poll_fn(|cx| {
        while let Poll::Ready(Some(ext)) = running.poll_next_unpin(cx) {
            last = Some(ext);
        }
        Poll::Ready(())
    })
    .await;
    if let Some(ext) = last {
        *extensions = ext;
    }
    result
}

/// Sends one attempt down the chain. An attempt the stack stops waiting for (its attempt timeout
/// fired) is cancelled, as dropping a hyper-util request would cancel it.
async fn run_attempt(next: Next<'_>, attempt: Attempt, mut extensions: Extensions) -> Extensions {
    let Attempt { request, mut reply } = attempt;
    let outcome = {
        let abandoned = pin!(reply.closed());
        // Whether the chain waited on anything before it answered: see `convert_sent`. Only a
        // request reqwest can send can be redirected: a builder error for a URL reqwest cannot
        // use (an `ftp:` request) is raised before sending, however long a later middleware
        // waited before handing the request to reqwest.
        let redirectable = matches!(request.url().scheme(), "http" | "https");
        let own_https = request.url().scheme() == "https";
        let mut waited = false;
        let mut run = pin!(next.run(request, &mut extensions));
        let run = poll_fn(|cx| {
            let poll = run.as_mut().poll(cx);
            waited |= poll.is_pending();
            poll
        });
        match select(pin!(run), abandoned).await {
            Either::Left((res, _)) => {
                Some(res.map_err(|e| from_chain_error(e, waited && redirectable, own_https)))
            }
            Either::Right(((), _)) => None,
        }
    };
    if let Some(res) = outcome {
        // The stack may have stopped waiting in the meantime: the answer is then dropped.
        let _ = reply.send(res);
    }
    extensions
}

/// One attempt on its way down the chain, and where its outcome goes.
struct Attempt {
    request: reqwest::Request,
    reply: oneshot::Sender<Result<reqwest::Response, BoxError>>,
}

/// Where [`NextAttempt`] sends the attempts of one call: to the middleware's `handle`, which
/// holds the rest of the chain.
#[derive(Clone)]
struct Dispatch(mpsc::UnboundedSender<Attempt>);

/// The bottom of the stack that a [`SturdyMiddleware`] runs: sends one attempt down the rest of
/// the reqwest-middleware chain.
///
/// ```text
/// async fn(http::Request<Full<Bytes>>) -> Result<http::Response<reqwest::Body>, BoxError>
/// ```
///
/// Errors of the attempt are [`sturdy_core::Error`]s (reqwest's converted with
/// [`from_reqwest_error`](crate::from_reqwest_error), other middlewares' classified by their
/// `source()` chain). It works only for requests that a `SturdyMiddleware` passes to its stack;
/// any other request fails with a `Config` error.
///
/// # Backpressure
///
/// Always ready.
#[derive(Clone)]
pub struct NextAttempt {
    _priv: (),
}

impl fmt::Debug for NextAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextAttempt").finish()
    }
}

impl Service<http::Request<Full<Bytes>>> for NextAttempt {
    type Response = http::Response<reqwest::Body>;
    type Error = BoxError;
    type Future = NextAttemptFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Full<Bytes>>) -> Self::Future {
        let Some(dispatch) = req.extensions_mut().remove::<Dispatch>() else {
            return NextAttemptFuture::failed(
                Error::new(
                    ErrorKind::Config,
                    "NextAttempt can only send requests that a SturdyMiddleware passed to its stack",
                )
                .with_delivery(Delivery::NotSent),
            );
        };
        let request = match into_reqwest_request(req) {
            Ok(r) => r,
            Err(e) => return NextAttemptFuture::failed(e),
        };
        let (reply, rx) = oneshot::channel();
        if dispatch.0.send(Attempt { request, reply }).is_err() {
            return NextAttemptFuture::failed(call_ended(false));
        }
        NextAttemptFuture {
            state: AttemptState::Waiting(rx),
        }
    }
}

/// The response future of [`NextAttempt`].
pub struct NextAttemptFuture {
    state: AttemptState,
}

enum AttemptState {
    Waiting(oneshot::Receiver<Result<reqwest::Response, BoxError>>),
    Failed(Option<Error>),
}

impl NextAttemptFuture {
    fn failed(e: Error) -> Self {
        Self {
            state: AttemptState::Failed(Some(e)),
        }
    }
}

impl fmt::Debug for NextAttemptFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextAttemptFuture").finish_non_exhaustive()
    }
}

impl Future for NextAttemptFuture {
    type Output = Result<http::Response<reqwest::Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            // Handed to the call's `handle`, which went away before the answer: whether the
            // attempt had begun going down the chain is not known, so it may have been sent.
            AttemptState::Waiting(rx) => Poll::Ready(match std::task::ready!(rx.poll_unpin(cx)) {
                Ok(Ok(res)) => Ok(into_http(res)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Box::new(call_ended(true))),
            }),
            AttemptState::Failed(e) => Poll::Ready(Err(Box::new(e.take().unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Other,
                    "a NextAttempt future was polled after it completed",
                )
            })))),
        }
    }
}

/// The error of an attempt whose reqwest-middleware call ended (its caller went away) before
/// the attempt was answered: only callers who joined it through a coalescing layer still wait
/// for it, and that layer has them send their own request ([`DriverGone`]).
fn call_ended(handed: bool) -> Error {
    let err = if handed {
        Error::new(
            ErrorKind::Other,
            "the reqwest-middleware call that was sending this attempt ended (its caller went away) before the answer came, so the attempt was cut off and may have been processed",
        )
        .with_delivery(Delivery::MaybeProcessed)
    } else {
        Error::new(
            ErrorKind::Other,
            "the reqwest-middleware call ended before this attempt was sent",
        )
        .with_delivery(Delivery::NotSent)
    };
    // Not the server's failure (no breaker counts it), and not worth a retry: the chain that
    // would send it is gone.
    err.with_hidden_source(DriverGone).with_cause_elsewhere()
}

/// An error from the rest of the chain, in sturdy's terms (`waited`, `own_https`: see
/// `convert_sent`).
fn from_chain_error(err: reqwest_middleware::Error, waited: bool, own_https: bool) -> BoxError {
    let err = match err {
        reqwest_middleware::Error::Reqwest(e) => {
            return Box::new(convert_sent(e, waited, own_https))
        }
        reqwest_middleware::Error::Middleware(e) => match e.downcast::<reqwest::Error>() {
            Ok(e) => return Box::new(convert_sent(e, waited, own_https)),
            Err(e) => e,
        },
    };
    // Another middleware's error (a retry middleware's after its last try, a limiter's). What it
    // did before failing is not known: it may have sent the request already, so the call may
    // have been processed, whatever the error below it says. Its text is kept, not the error
    // itself: a reqwest error inside it would show the URL's query and credentials in `Debug`
    // and `Display`, which sturdy cannot redact in place.
    let boxed: BoxError = err.into();
    let kind = classify_error(&*boxed);
    let message = redact_urls(&describe(&*boxed));
    let chain: Vec<String> = sturdy_core::chain(&*boxed)
        .map(|e| redact_urls(&e.to_string()))
        .collect();
    Box::new(
        Error::new(kind, message)
            .with_hidden_source(ChainText(chain.join(": ")))
            .with_delivery(Delivery::MaybeProcessed),
    )
}

/// What an error of another middleware said, its URLs without query, fragment or credentials.
#[derive(Debug)]
struct ChainText(String);

impl fmt::Display for ChainText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for ChainText {}

/// `text` with each URL in it (a word holding `://`) cut to its scheme, host, port and path.
fn redact_urls(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The URL starts at the scheme: the letters, digits, '+', '-', '.' before "://".
        // (The character found may be wider than a byte: the URL starts after all of it.)
        let start = rest[..at]
            .char_indices()
            .rev()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |(i, c)| i + c.len_utf8());
        // It ends at a space, a closing bracket or a quote.
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | ']' | '"' | '\'' | '>'))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..start]);
        let candidate = &rest[start..end];
        match reqwest::Url::parse(candidate) {
            Ok(mut url) => {
                crate::error::clean_url(&mut url);
                out.push_str(url.as_str());
            }
            // Not a URL after all: nothing of it is shown past its scheme.
            Err(_) => out.push_str(&rest[start..at + 3]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The stack's error as reqwest-middleware's.
///
/// `reqwest_middleware::Error::Middleware` is transparent: its `source()` is the `source()` of
/// the error anyhow holds, which skips that error itself. sturdy's error therefore goes in
/// under a context (its own text): anyhow's context error gives the error as its source, so
/// `sturdy_core::find`, `classify::delivery` and `ErrorSummary::of` reach it through the plain
/// `std::error::Error` chain of the `reqwest_middleware::Error`, and anyhow's `downcast_ref`
/// still finds it.
fn into_middleware_error(err: BoxError) -> reqwest_middleware::Error {
    reqwest_middleware::Error::Middleware(match err.downcast::<Error>() {
        Ok(e) => {
            let text = e.to_string();
            anyhow::Error::new(*e).context(text)
        }
        Err(e) => anyhow::Error::new(Boxed(e)),
    })
}

/// A boxed error as an error type of its own (anyhow takes only sized errors).
struct Boxed(BoxError);

impl fmt::Debug for Boxed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Boxed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Boxed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// reqwest's request as the `http::Request<Full<Bytes>>` a sturdy stack takes.
async fn into_http_request(
    req: reqwest::Request,
    limit: usize,
) -> Result<http::Request<Full<Bytes>>, Error> {
    // A request with a timeout of its own has a setting of its own: marked with (empty)
    // `CallOptions`, the mark sturdy's layers read, so that the coalescing layer sends it on its
    // own instead of joining a call that runs under another request's timeout.
    let own_timeout = req.timeout().is_some();
    let req = http::Request::<reqwest::Body>::try_from(req).map_err(|e| convert(e, Stage::Call))?;
    let (mut parts, body) = req.into_parts();
    if own_timeout && parts.extensions.get::<sturdy_core::CallOptions>().is_none() {
        parts.extensions.insert(sturdy_core::CallOptions::new());
    }
    let bytes = if body.as_bytes().is_some() {
        // Already in memory: taking the bytes out cannot fail.
        body.collect()
            .await
            .map_err(|e| convert(e, Stage::Call))?
            .to_bytes()
    } else {
        match Limited::new(body, limit).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return Err(Error::new(
                    ErrorKind::Body,
                    format!(
                        "the request body is a stream longer than {limit} bytes, the most SturdyMiddleware reads into memory \
                         (every attempt must be able to send it): send it as bytes, or raise the limit with SturdyMiddleware::with_body_limit"
                    ),
                )
                .with_delivery(Delivery::NotSent))
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Body,
                    format!("could not read the request body: {}", describe(&*e)),
                )
                .with_hidden_source(e)
                .with_delivery(Delivery::NotSent))
            }
        }
    };
    Ok(http::Request::from_parts(parts, Full::new(bytes)))
}

/// One attempt of the stack as a reqwest request (the extensions, reqwest's timeout among them,
/// come along).
fn into_reqwest_request(req: http::Request<Full<Bytes>>) -> Result<reqwest::Request, Error> {
    let (parts, body) = req.into_parts();
    // A `Full` body is ready at once.
    let bytes = match body.collect().now_or_never() {
        Some(Ok(c)) => c.to_bytes(),
        Some(Err(never)) => match never {},
        None => {
            return Err(
                Error::new(ErrorKind::Body, "the request body was not ready")
                    .with_delivery(Delivery::NotSent),
            )
        }
    };
    let req = http::Request::from_parts(parts, reqwest::Body::from(bytes));
    reqwest::Request::try_from(req).map_err(|e| convert(e, Stage::Call))
}

/// The stack's response as a `reqwest::Response`, with the URL it came from.
fn into_reqwest_response(res: http::Response<reqwest::Body>) -> reqwest::Response {
    let (mut parts, body) = res.into_parts();
    if let Some(url) = parts.extensions.remove::<reqwest::Url>() {
        let mut with_url = http::Response::builder().url(url);
        if let Some(ext) = with_url.extensions_mut() {
            parts.extensions.extend(std::mem::take(ext));
        }
    }
    reqwest::Response::from(http::Response::from_parts(parts, body))
}

#[cfg(test)]
mod redaction_tests {
    #[test]
    fn urls_in_a_message_lose_query_fragment_and_credentials() {
        let r = super::redact_urls;
        assert_eq!(
            r("error sending request for url (https://u:p@api.example.com/x?api_key=s3cr3t#f)"),
            "error sending request for url (https://api.example.com/x)"
        );
        assert_eq!(r("no url here"), "no url here");
        assert_eq!(
            r("a http://h/a?k=1 and b https://h2:8443/b?k=2."),
            "a http://h/a and b https://h2:8443/b"
        );
        assert!(!r("x ://?k=s3cr3t").contains("s3cr3t"));
    }

    /// A character of more than one byte just before a URL (a French quote, a CJK word) is
    /// stepped over whole, not cut (which panicked).
    #[test]
    fn a_wide_character_before_a_url_is_kept_whole() {
        let r = super::redact_urls;
        assert_eq!(
            r("\u{e9}chec \u{ab}https://u:p@h.example/x?k=s\u{bb}"),
            "\u{e9}chec \u{ab}https://h.example/x"
        );
        assert_eq!(
            r("\u{8bf7}\u{6c42}https://h.example/y?k=s"),
            "\u{8bf7}\u{6c42}https://h.example/y"
        );
    }
}
