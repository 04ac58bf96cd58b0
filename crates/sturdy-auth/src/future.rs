use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use secrecy::ExposeSecret;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::hold::{AttemptHold, HeldFor};
use sturdy_core::trace::TraceEvent;
use sturdy_core::{human_duration, BoxError, Delivery, Error, ErrorKind, Trace};
use tokio::time::{sleep, Sleep};
use tower::Service;

use crate::token::{BoxFuture, Token, TokenSource};

/// What is needed to build the request again for a replay.
pub(crate) struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    extensions: http::Extensions,
}

impl From<Parts> for Head {
    fn from(p: Parts) -> Self {
        Self {
            method: p.method,
            uri: p.uri,
            version: p.version,
            headers: p.headers,
            extensions: p.extensions,
        }
    }
}

impl Head {
    /// The host the request goes to (never the `user:password@` part), for events.
    fn host(&self) -> &str {
        // The header only matters (and is only looked up) when the URI has no authority.
        let header = self
            .uri
            .authority()
            .is_none()
            .then(|| self.headers.get(http::header::HOST))
            .flatten();
        sturdy_core::key::uri_host(&self.uri, header)
    }

    fn request<B>(&self, body: B, token: &Token) -> Result<Request<B>, Error> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        *r.extensions_mut() = self.extensions.clone();
        let secret = token.secret().expose_secret();
        let mut v = HeaderValue::from_str(&format!("Bearer {secret}")).map_err(|_| {
            Error::new(
                ErrorKind::Auth,
                crate::layer::not_allowed("the access token", secret),
            )
        })?;
        v.set_sensitive(true);
        r.headers_mut().insert(http::header::AUTHORIZATION, v);
        Ok(r)
    }
}

enum Stage<B: Body, F> {
    /// Read through `Capped`: a body whose size hint said it fits the replay limit but which
    /// yields more is refused once the limit has arrived, not read for ever.
    Buffering(Pin<Box<Collect<Capped<B>>>>),
    Fetching {
        fut: BoxFuture<Result<Token, BoxError>>,
        /// Started at the first poll that had to wait, so a cached token costs no timer.
        timer: Option<Pin<Box<Sleep>>>,
    },
    Ready(Token),
    Calling {
        fut: Pin<Box<F>>,
        token: Token,
    },
    Done,
}

pin_project! {
    /// A body read for the replay, failing once more than `left` bytes have arrived.
    ///
    /// Why not `http_body_util::Limited`: it needs `B::Error: Into<BoxError>` on the type, and
    /// the future holding it is named in `ResponseFuture`, whose type has no such bound.
    pub(crate) struct Capped<B> {
        #[pin]
        body: B,
        left: usize,
    }
}

/// The error of a [`Capped`] body: its own, or more bytes than the cap.
#[derive(Debug)]
pub(crate) enum CapError<E> {
    Read(E),
    TooLarge,
}

impl<B: Body> Body for Capped<B> {
    type Data = B::Data;
    type Error = CapError<B::Error>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match ready!(this.body.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    match this.left.checked_sub(data.remaining()) {
                        Some(left) => *this.left = left,
                        None => return Poll::Ready(Some(Err(CapError::TooLarge))),
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(CapError::Read(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A call with a token from a source: fetch the token, call, and on a 401 refresh it once and
/// replay. Boxed as a whole: this path fetches tokens through a boxed future anyway.
pub(crate) struct TokenCall<S, B: Body, F> {
    source: Arc<dyn TokenSource>,
    /// The service `Auth::poll_ready` made ready; called without polling readiness again the
    /// first time, polled again before the replay.
    svc: S,
    /// Whether `svc` must be driven to readiness before the next call (only for the replay).
    needs_ready: bool,
    head: Head,
    /// The buffered body, when the request can be replayed.
    bytes: Option<Bytes>,
    /// The original body, when it cannot (it is sent once).
    once: Option<B>,
    /// The most bytes kept for the replay (named in the error of a body that brings more).
    replay_limit: usize,
    replayed: bool,
    /// Whether this call marked its attempt as held back for a token (cleared when it is sent).
    held: bool,
    timeout: Duration,
    events: EventHook,
    stage: Stage<B, F>,
}

impl<S, B> TokenCall<S, B, S::Future>
where
    S: Service<Request<B>>,
    B: Body + From<Bytes>,
{
    pub(crate) fn new(
        source: Arc<dyn TokenSource>,
        svc: S,
        head: Head,
        body: B,
        replay_limit: Option<usize>,
        timeout: Duration,
        events: EventHook,
    ) -> Self {
        let (stage, once) = if let Some(limit) = replay_limit {
            (
                Stage::Buffering(Box::pin(Capped { body, left: limit }.collect())),
                None,
            )
        } else {
            (fetching(&*source), Some(body))
        };
        Self {
            source,
            svc,
            needs_ready: false,
            head,
            bytes: None,
            once,
            replay_limit: replay_limit.unwrap_or_default(),
            replayed: false,
            held: false,
            timeout,
            events,
            stage,
        }
    }
}

fn fetching<B: Body, F>(source: &dyn TokenSource) -> Stage<B, F> {
    Stage::Fetching {
        fut: source.token(),
        timer: None,
    }
}

impl<S, B, Rb> TokenCall<S, B, S::Future>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    /// What a failure to get a token says about delivery: before the first send nothing left;
    /// after a 401 the server saw the request (it answered, and a server that answers 401 may
    /// still have acted on it), so the call may have been processed, whatever the token
    /// failure's own kind (a refused connection to the token endpoint says nothing of the API).
    /// Either way the failure is the token source's, not the API's: a breaker does not count it.
    fn mark(&self, e: Error) -> Error {
        let e = e.with_cause_elsewhere();
        if self.replayed {
            e.with_delivery(Delivery::MaybeProcessed)
        } else {
            e.with_delivery(Delivery::NotSent)
        }
    }

    /// An error of the inner service. Of the replay after a 401 it cannot say "not sent" for
    /// the call: the first send reached the API, which may have acted on it, whatever stopped
    /// the replay (a refused connection, a limiter below). Its kind, words and cause stay.
    fn sent_before(&self, e: BoxError) -> BoxError {
        if !self.replayed || !sturdy_core::classify::delivery(&*e).proves_not_sent() {
            return e;
        }
        match e.downcast::<Error>() {
            Ok(err) => Box::new(err.with_delivery(Delivery::MaybeProcessed)),
            Err(e) => {
                let kind = sturdy_core::classify::classify_error(&*e);
                let words = sturdy_core::classify::describe(&*e);
                Box::new(
                    Error::new(kind, words)
                        .with_source(e)
                        .with_delivery(Delivery::MaybeProcessed),
                )
            }
        }
    }

    /// The error of a token wait that ran out of time.
    fn timed_out(&self) -> BoxError {
        let what = if self.replayed {
            "the request got a 401 and was not replayed"
        } else {
            "the request was not sent"
        };
        Box::new(self.mark(Error::new(
            ErrorKind::Timeout,
            format!(
                "no access token from {} within {}; {what}. Retryable: the token request goes \
                 on, and a later call uses its token",
                self.source.describe(),
                human_duration(self.timeout),
            ),
        )))
    }

    /// A token source's error, as a `sturdy_core::Error` (kept as it is when it already is one),
    /// marked not sent when the request never left.
    fn token_error(&self, e: BoxError) -> BoxError {
        let e = match e.downcast::<Error>() {
            Ok(own) => *own,
            Err(e) => {
                let kind = match sturdy_core::classify::classify_error(&*e) {
                    ErrorKind::Other => ErrorKind::Auth,
                    kind => kind,
                };
                // The error's own text, or its cause's when that text names none (a
                // hyper-util client's "client error (Connect)").
                Error::new(
                    kind,
                    format!(
                        "could not get an access token from {}: {}",
                        self.source.describe(),
                        sturdy_core::classify::own_text(&*e)
                    ),
                )
                .with_hidden_source(e)
            }
        };
        Box::new(self.mark(e))
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<Rb>, BoxError>> {
        loop {
            match &mut self.stage {
                Stage::Buffering(collect) => {
                    let mut buf = match ready!(collect.as_mut().poll(cx)) {
                        // Both sends are rebuilt from the bytes (`B: From<Bytes>`), which cannot
                        // carry trailers: refused, not sent without them (a checksum, say).
                        Ok(c) if c.trailers().is_some_and(|t| !t.is_empty()) => {
                            self.stage = Stage::Done;
                            return Poll::Ready(Err(Box::new(
                                Error::new(
                                    ErrorKind::Body,
                                    "the request body has trailers, which a request rebuilt from the body's bytes for the replay after a 401 cannot carry, so it was not sent; a body whose size is not known in advance is sent as it is, trailers included, and not replayed",
                                )
                                .with_delivery(Delivery::NotSent),
                            )));
                        }
                        Ok(c) => c.aggregate(),
                        Err(CapError::TooLarge) => {
                            self.stage = Stage::Done;
                            return Poll::Ready(Err(Box::new(
                                Error::new(
                                    ErrorKind::Body,
                                    format!(
                                        "the request body is larger than its size hint said: more than the {} bytes kept for a replay after a 401 arrived, so it was not sent",
                                        self.replay_limit
                                    ),
                                )
                                .with_delivery(Delivery::NotSent),
                            )));
                        }
                        Err(CapError::Read(e)) => {
                            self.stage = Stage::Done;
                            // Read before the first send: the request never left.
                            return Poll::Ready(Err(Box::new(
                                Error::new(ErrorKind::Body, "could not read the request body")
                                    .with_source(e.into())
                                    .with_delivery(Delivery::NotSent),
                            )));
                        }
                    };
                    self.bytes = Some(buf.copy_to_bytes(buf.remaining()));
                    self.stage = fetching(&*self.source);
                }
                Stage::Fetching { fut, timer } => {
                    let result = match fut.as_mut().poll(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            if timer.is_none() && !self.replayed {
                                // Held back for a token: a deadline ending meanwhile can say
                                // the request was never sent.
                                if let Some(hold) = self.head.extensions.get::<AttemptHold>() {
                                    hold.hold(HeldFor::Token);
                                    self.held = true;
                                }
                            }
                            let timer = timer.get_or_insert_with(|| Box::pin(sleep(self.timeout)));
                            ready!(timer.as_mut().poll(cx));
                            let err = self.timed_out();
                            self.stage = Stage::Done;
                            return Poll::Ready(Err(err));
                        }
                    };
                    let waited = timer.is_some();
                    match result {
                        Ok(token) => {
                            if waited {
                                if let Some(t) = self.head.extensions.get::<Trace>() {
                                    t.record(TraceEvent::TokenRefresh);
                                }
                            }
                            self.stage = Stage::Ready(token);
                        }
                        Err(e) => {
                            let err = self.token_error(e);
                            self.stage = Stage::Done;
                            return Poll::Ready(Err(err));
                        }
                    }
                }
                Stage::Ready(_) => {
                    if self.needs_ready {
                        if let Err(e) = ready!(self.svc.poll_ready(cx)) {
                            self.stage = Stage::Done;
                            return Poll::Ready(Err(self.sent_before(e.into())));
                        }
                    }
                    let Stage::Ready(token) = std::mem::replace(&mut self.stage, Stage::Done)
                    else {
                        continue;
                    };
                    let body = match (&self.bytes, self.once.take()) {
                        (Some(b), _) => B::from(b.clone()),
                        (None, Some(b)) => b,
                        // Not reachable: the body is either buffered or sent once, and only a
                        // buffered body is replayed.
                        (None, None) => B::from(Bytes::new()),
                    };
                    let req = match self.head.request(body, &token) {
                        Ok(req) => req,
                        Err(e) => {
                            // A token that cannot be sent would fail every call while it is
                            // cached: the source must not hand it out again.
                            self.source.invalidate(&token);
                            return Poll::Ready(Err(Box::new(self.mark(e))));
                        }
                    };
                    if std::mem::take(&mut self.held) {
                        if let Some(hold) = req.extensions().get::<AttemptHold>() {
                            hold.release();
                        }
                    }
                    // The service is used: a replay must drive it to readiness again.
                    self.needs_ready = true;
                    self.stage = Stage::Calling {
                        fut: Box::pin(self.svc.call(req)),
                        token,
                    };
                }
                Stage::Calling { fut, token } => {
                    let res = match ready!(fut.as_mut().poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            self.stage = Stage::Done;
                            return Poll::Ready(Err(self.sent_before(e.into())));
                        }
                    };
                    if res.status() != StatusCode::UNAUTHORIZED {
                        token.mark_accepted();
                        self.stage = Stage::Done;
                        return Poll::Ready(Ok(res));
                    }
                    if self.replayed {
                        self.stage = Stage::Done;
                        return Poll::Ready(Ok(res));
                    }
                    // The API refused the token: the source must not hand it out again (or not
                    // for a while, and then a replay would send the same token).
                    let renewed = self.source.reject(token);
                    if self.bytes.is_none() {
                        tracing::debug!(
                            "401 on a request whose body cannot be replayed: returned as is"
                        );
                        self.stage = Stage::Done;
                        return Poll::Ready(Ok(res));
                    }
                    if !renewed {
                        tracing::debug!(
                            "401 with a token the source keeps for now: returned as is, not replayed"
                        );
                        self.stage = Stage::Done;
                        return Poll::Ready(Ok(res));
                    }
                    // Only the challenge's error code: its description may echo the token.
                    tracing::info!(
                        error = challenge_error(res.headers().get(http::header::WWW_AUTHENTICATE)),
                        "401: refreshing the token and replaying once"
                    );
                    self.events.emit(&Event::TokenRejected {
                        host: &sturdy_core::key::host_key(self.head.host()),
                    });
                    self.replayed = true;
                    // The request went out once and is sent again: a wait of the replay below
                    // (a rate limit) must not read as "never sent".
                    if let Some(hold) = self.head.extensions.get::<AttemptHold>() {
                        hold.fan_out();
                    }
                    // Replacing the stage drops the first response future, and with it whatever
                    // the inner service reserved for it.
                    self.stage = fetching(&*self.source);
                }
                Stage::Done => {
                    return Poll::Ready(Err(Box::new(Error::new(
                        ErrorKind::Other,
                        "the auth response future was polled after it completed",
                    ))))
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`Auth`](crate::Auth).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
        B: Body,
    {
        #[pin]
        kind: Kind<S::Future, Box<TokenCall<S, B, S::Future>>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Direct { #[pin] fut: F },
        Token { call: T },
        // Refused before it was sent (taken on the first poll).
        Failed { err: Option<BoxError> },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
    B: Body,
{
    pub(crate) fn direct(fut: S::Future) -> Self {
        Self {
            kind: Kind::Direct { fut },
        }
    }

    pub(crate) fn failed(err: BoxError) -> Self {
        Self {
            kind: Kind::Failed { err: Some(err) },
        }
    }

    pub(crate) fn token(call: TokenCall<S, B, S::Future>) -> Self {
        Self {
            kind: Kind::Token {
                call: Box::new(call),
            },
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
    B: Body,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, B, Rb> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Direct { fut } => fut.poll(cx).map_err(Into::into),
            KindProj::Token { call } => call.poll(cx),
            KindProj::Failed { err } => Poll::Ready(Err(err.take().unwrap_or_else(|| {
                Box::new(Error::new(
                    ErrorKind::Other,
                    "the auth layer's response future was polled after it completed",
                ))
            }))),
        }
    }
}

/// The `error` code of a `WWW-Authenticate` challenge, for a log line: one of RFC 6750's codes
/// if the header names it, else empty. Nothing else of the header is logged (an
/// `error_description` may repeat the rejected token).
fn challenge_error(v: Option<&http::HeaderValue>) -> &'static str {
    let text = v.and_then(|v| v.to_str().ok()).unwrap_or("");
    ["invalid_token", "insufficient_scope", "invalid_request"]
        .into_iter()
        .find(|code| {
            text.contains(&format!("error=\"{code}\"")) || text.contains(&format!("error={code}"))
        })
        .unwrap_or("")
}
