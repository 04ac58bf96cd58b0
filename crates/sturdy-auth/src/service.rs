use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use secrecy::ExposeSecret;
use sturdy_core::{BoxError, Delivery, Error, ErrorKind};
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

/// `req` with the key in its query, or the error of a URI that cannot carry it.
fn with_query<B>(req: &mut Request<B>, param: &str, value: &str) -> Result<(), BoxError> {
    // The only failure is a URI past what `http::Uri` can hold once the key is in it: the
    // request is refused rather than sent without its key (which the API would answer with a
    // 401 that names no cause). The error names neither the key nor the URI.
    let u = sturdy_core::query::set(req.uri(), &[(param, value)]).map_err(|_| {
        Box::new(
            Error::new(
                ErrorKind::Config,
                format!(
                    "the API key could not be added to the query parameter `{param}`: the URI would be longer than a URI can be ({} bytes before the key), so the request was not sent",
                    req.uri().to_string().len()
                ),
            )
            .with_delivery(Delivery::NotSent),
        ) as BoxError
    })?;
    *req.uri_mut() = u;
    Ok(())
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
                match with_query(&mut req, param, value.expose_secret()) {
                    Ok(()) => ResponseFuture::direct(self.inner.call(req)),
                    Err(e) => {
                        // Answered without the inner service: what its `poll_ready` reserved (a
                        // `ConcurrencyLimit` permit, a `Buffer` slot) goes back now, not at this
                        // service's next call.
                        sturdy_core::ready::release_ready(&mut self.inner);
                        ResponseFuture::failed(e)
                    }
                }
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
                let replay_limit =
                    sturdy_core::body::fits(&body, self.replay_limit).then_some(self.replay_limit);
                ResponseFuture::token(TokenCall::new(
                    source.clone(),
                    ready,
                    Head::from(parts),
                    body,
                    replay_limit,
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
        with_query(&mut r, "api_key", "a&b c").unwrap();
        assert_eq!(r.uri(), "http://h/p?x=1&api_key=a%26b+c");
        let mut r = http::Request::get("http://h").body(()).unwrap();
        with_query(&mut r, "k", "v").unwrap();
        assert_eq!(r.uri(), "http://h/?k=v");
    }

    #[test]
    fn a_uri_with_no_room_for_the_key_is_refused_without_naming_it() {
        let long = format!("http://h/{}", "p".repeat(65_520));
        let mut r = http::Request::get(long.as_str()).body(()).unwrap();
        let e = with_query(&mut r, "api_key", "sk_live_secret_value").unwrap_err();
        let e = e.downcast::<sturdy_core::Error>().unwrap();
        assert_eq!(*e.kind(), sturdy_core::ErrorKind::Config);
        assert_eq!(e.delivery(), Some(sturdy_core::Delivery::NotSent));
        let text = e.to_string();
        assert!(
            text.contains("api_key") && text.contains("not sent"),
            "{text}"
        );
        assert!(!text.contains("sk_live") && !text.contains("ppp"), "{text}");
        assert_eq!(r.uri(), long.as_str(), "the URI is left as it was");
    }
}
