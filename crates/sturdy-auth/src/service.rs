use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use secrecy::ExposeSecret;
use sturdy_core::BoxError;
use tower::Service;

use crate::future::{Head, ResponseFuture, TokenCall};
use crate::layer::Credentials;

/// The service made by [`AuthLayer`](crate::AuthLayer).
///
/// # Backpressure
/// `poll_ready` is the inner service's. The request goes to the service that `poll_ready` made
/// ready: a call that must wait for a token takes that ready service into its response future
/// (whatever it reserved, such as a `ConcurrencyLimit` permit or a `Buffer` slot, stays
/// reserved for this call during the wait) and calls it as soon as the token is there, without
/// polling readiness again. The replay after a 401 drives the same service to readiness once
/// more, after the first response has released what it held. A response future that is dropped
/// drops the service it holds, and with it any reservation.
///
/// So `Auth` may sit over or under `tower::buffer::Buffer` and concurrency limits, and may be
/// driven by `oneshot` or by a service kept across calls (`svc.ready().await?.call(req)`).
///
/// # Clone
/// Clones share the credentials and the token source (one cache for all); a clone starts
/// without the readiness of the service it was cloned from, as tower requires.
#[derive(Clone)]
pub struct Auth<S> {
    pub(crate) inner: S,
    pub(crate) creds: Arc<Credentials>,
    pub(crate) replay_limit: usize,
    pub(crate) token_timeout: Duration,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) events: sturdy_core::events::EventHook,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("inner", &self.inner)
            .field("creds", &self.creds)
            .finish()
    }
}

sturdy_core::define_inner_service_accessors!(Auth<S>);

fn with_query<B>(req: &mut Request<B>, param: &str, value: &str) {
    // A URI that cannot take the parameter is left as it is: the API then answers 401.
    if let Ok(u) = sturdy_core::query::set(req.uri(), &[(param, value)]) {
        *req.uri_mut() = u;
    }
}

// ===== impl Auth =====

impl<S, B, Rb> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<Rb>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match &*self.creds {
            Credentials::Header(name, value) => {
                req.headers_mut().insert(name.clone(), value.clone());
                ResponseFuture::direct(self.inner.call(req))
            }
            Credentials::Query(param, value) => {
                with_query(&mut req, param, value.expose_secret());
                ResponseFuture::direct(self.inner.call(req))
            }
            Credentials::Token(source) => {
                // The token comes first: take the service `poll_ready` made ready into the future
                // and call it after the wait; a clone that is not ready stays here.
                let ready = sturdy_core::ready::take_ready(&mut self.inner);
                // The wait is part of the attempt: the request's own attempt timeout, else the
                // stack's, bounds it too.
                let attempt = match sturdy_core::CallOptions::of(&req)
                    .and_then(sturdy_core::CallOptions::attempt_timeout)
                {
                    Some(own) => own,
                    None => self.attempt_timeout,
                };
                let wait = attempt.map_or(self.token_timeout, |t| t.min(self.token_timeout));
                let (parts, body) = req.into_parts();
                let replayable = sturdy_core::body::fits(&body, self.replay_limit);
                ResponseFuture::token(TokenCall::new(
                    source.clone(),
                    ready,
                    Head::from(parts),
                    body,
                    replayable,
                    wait,
                    self.events.clone(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_query;

    #[test]
    fn query_keys_are_encoded_and_appended() {
        let mut r = http::Request::get("http://h/p?x=1").body(()).unwrap();
        with_query(&mut r, "api_key", "a&b c");
        assert_eq!(r.uri(), "http://h/p?x=1&api_key=a%26b+c");
        let mut r = http::Request::get("http://h").body(()).unwrap();
        with_query(&mut r, "k", "v");
        assert_eq!(r.uri(), "http://h/?k=v");
    }
}
