use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use secrecy::ExposeSecret;
use sturdy_core::trace::TraceEvent;
use sturdy_core::{BoxError, Error, ErrorKind, Trace};
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
    fn request<B>(&self, body: B, token: &Token) -> Result<Request<B>, BoxError> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        *r.extensions_mut() = self.extensions.clone();
        let mut v = HeaderValue::from_str(&format!("Bearer {}", token.secret().expose_secret()))
            .map_err(|_| {
                Error::new(
                    ErrorKind::Auth,
                    "the access token has characters that are not allowed in an HTTP header",
                )
            })?;
        v.set_sensitive(true);
        r.headers_mut().insert(http::header::AUTHORIZATION, v);
        Ok(r)
    }
}

enum Stage<B: Body, F> {
    Buffering(Pin<Box<Collect<B>>>),
    Fetching(BoxFuture<Result<Token, BoxError>>),
    Ready,
    Calling(Pin<Box<F>>),
}

/// A call with a token from a source: fetch the token, call, and on a 401 refresh it once and
/// replay. Boxed as a whole: this path fetches tokens through a boxed future anyway.
pub(crate) struct TokenCall<S, B: Body, F> {
    source: Arc<dyn TokenSource>,
    svc: S,
    head: Head,
    /// The buffered body, when the request can be replayed.
    bytes: Option<Bytes>,
    /// The original body, when it cannot (it is sent once).
    once: Option<B>,
    token: Option<Token>,
    replayed: bool,
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
        replayable: bool,
    ) -> Self {
        let (stage, once) = if replayable {
            (Stage::Buffering(Box::pin(body.collect())), None)
        } else {
            (Stage::Fetching(source.token()), Some(body))
        };
        Self {
            source,
            svc,
            head,
            bytes: None,
            once,
            token: None,
            replayed: false,
            stage,
        }
    }
}

impl<S, B, Rb> TokenCall<S, B, S::Future>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<Rb>, BoxError>> {
        loop {
            match &mut self.stage {
                Stage::Buffering(collect) => {
                    let mut buf = match ready!(collect.as_mut().poll(cx)) {
                        Ok(c) => c.aggregate(),
                        Err(e) => {
                            return Poll::Ready(Err(Box::new(
                                Error::new(ErrorKind::Body, "could not read the request body")
                                    .with_source(e.into()),
                            )))
                        }
                    };
                    self.bytes = Some(buf.copy_to_bytes(buf.remaining()));
                    self.stage = Stage::Fetching(self.source.token());
                }
                Stage::Fetching(fut) => {
                    self.token = Some(ready!(fut.as_mut().poll(cx))?);
                    if let Some(t) = self.head.extensions.get::<Trace>() {
                        t.record(TraceEvent::TokenRefresh);
                    }
                    self.stage = Stage::Ready;
                }
                Stage::Ready => {
                    ready!(self.svc.poll_ready(cx)).map_err(Into::into)?;
                    let token = self.token.as_ref().expect("fetched before the call");
                    let body = match (&self.bytes, self.once.take()) {
                        (Some(b), _) => B::from(b.clone()),
                        (None, Some(b)) => b,
                        (None, None) => unreachable!("the body is either buffered or sent once"),
                    };
                    let req = self.head.request(body, token)?;
                    self.stage = Stage::Calling(Box::pin(self.svc.call(req)));
                }
                Stage::Calling(fut) => {
                    let res = ready!(fut.as_mut().poll(cx)).map_err(Into::into)?;
                    if res.status() != StatusCode::UNAUTHORIZED || self.replayed {
                        return Poll::Ready(Ok(res));
                    }
                    if self.bytes.is_none() {
                        tracing::debug!(
                            "401 on a request whose body cannot be replayed: returned as is"
                        );
                        if let Some(t) = &self.token {
                            self.source.invalidate(t);
                        }
                        return Poll::Ready(Ok(res));
                    }
                    tracing::info!(challenge = ?res.headers().get(http::header::WWW_AUTHENTICATE), "401: refreshing the token and replaying once");
                    self.replayed = true;
                    if let Some(t) = self.token.take() {
                        self.source.invalidate(&t);
                    }
                    self.stage = Stage::Fetching(self.source.token());
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
        }
    }
}
