//! reqwest's errors in sturdy's terms.

use sturdy_core::classify::{classify_error, describe};
use sturdy_core::{Delivery, Error, ErrorKind};

/// Where a reqwest error happened, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// While sending the request and waiting for the response head.
    Call,
    /// While reading the response body.
    ResponseBody,
}

/// Converts a reqwest error into a [`sturdy_core::Error`] that sturdy classifies as it would the
/// same failure from a hyper-util client, except where reqwest's redirects make a difference.
///
/// | reqwest says | [`ErrorKind`] | delivery | retried by the retry layer |
/// |---|---|---|---|
/// | `is_builder()`: a URL or header reqwest cannot use | `Config` | `NotSent` (but see below) | no |
/// | `is_connect()` for an `https` URL when reqwest has no TLS feature | `Config` | `NotSent` (but see below) | no |
/// | `is_connect()` with an untrusted server certificate | `Tls` | may have been processed | no |
/// | `is_connect()`: refused, DNS, other TLS handshake failures, connect timeout | `Connect` | may have been processed | as a sent request |
/// | `is_timeout()`: one of reqwest's own timeouts | `Timeout` | may have been processed | yes |
/// | `is_redirect()`: too many redirects | `Other` | may have been processed | no |
/// | `is_body()` or `is_decode()` | `Body` | may have been processed | no |
/// | `status()`: from `error_for_status` | the status's kind (`Server(503)`, ...) | may have been processed | as the status |
/// | anything else | by its `source()` chain, as for hyper-util: a reset or early close is `Transport` | may have been processed | as the kind |
///
/// The checks run in that order, so a connect timeout is `Connect`.
///
/// **Why a connect error may have been processed.** reqwest follows redirects inside one
/// `send`, out of sturdy's sight, and a connect error on a redirect's target looks exactly like
/// one on the first connection. The server may have received and processed the request before
/// answering the redirect (a POST answered `303 See Other`, a 307 to a host that is down), so
/// sturdy cannot state that the request never left. The retry layer therefore treats a connect
/// error from reqwest as it treats a broken connection: it tries again idempotent methods and
/// requests with an idempotency key (`ClientBuilder` gives POST and PATCH one), with the same
/// key, and does not resend a POST or PATCH that has none. A connect error from a hyper-util
/// client, which follows no redirect, stays `NotSent`.
///
/// **Builder errors.** reqwest raises them before anything is sent (an unknown scheme, a header
/// it cannot use), and also while following a redirect whose target it cannot use (a `Location`
/// with an `ftp:` scheme), after the server answered.
/// [`ReqwestService`](crate::ReqwestService) and `SturdyMiddleware` tell these apart (a builder
/// error for an http or https request, raised after reqwest waited on the network, came from a
/// redirect, and may have been processed; one for a request whose own URL reqwest refuses never
/// left); this function, given the error alone, reports every builder error as `NotSent`. The
/// same holds for an `https` URL when reqwest has no TLS feature (hyper-util's "invalid URL,
/// scheme is not http", which reqwest reports as a connect error).
///
/// The message names the root cause in plain words (`connection refused`, `timed out (reqwest's
/// timeout)`, `TLS handshake failed (invalid peer certificate: UnknownIssuer)`), so the retry
/// layer's final error reads `gave up after 4 attempts: connection refused`. The reqwest error
/// stays reachable as the `source()`; its URL keeps scheme, host and path but loses query,
/// fragment and credentials, so neither `Display` nor `Debug` shows an API key passed in a
/// query string.
///
/// [`ReqwestService`](crate::ReqwestService) and `SturdyMiddleware` convert every reqwest error
/// by the same rules, except that they tell a builder error raised after a wait apart (above);
/// call this function yourself for errors you get from reqwest directly, such as those of
/// `reqwest::Response::json`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sturdy_core::classify::delivery;
/// use sturdy_core::{Delivery, ErrorKind};
///
/// // A port nothing listens on.
/// let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
/// let err = reqwest::Client::new()
///     .get(format!("http://127.0.0.1:{port}/?api_key=secret"))
///     .send()
///     .await
///     .unwrap_err();
/// let err = sturdy_reqwest::from_reqwest_error(err);
/// assert_eq!(err.kind(), &ErrorKind::Connect);
/// assert_eq!(err.to_string(), "connection refused");
/// // It may have been a redirect's target: reqwest follows redirects out of sturdy's sight.
/// assert_eq!(delivery(&err), Delivery::MaybeProcessed);
/// assert!(!format!("{err:?}").contains("secret"));
///
/// // reqwest refuses a scheme it does not speak before sending anything.
/// let err = reqwest::Client::new().get("ftp://127.0.0.1/").send().await.unwrap_err();
/// let err = sturdy_reqwest::from_reqwest_error(err);
/// assert_eq!(err.kind(), &ErrorKind::Config);
/// assert_eq!(delivery(&err), Delivery::NotSent);
/// # }
/// ```
pub fn from_reqwest_error(err: reqwest::Error) -> Error {
    convert(err, Stage::Call)
}

/// Converts an error of reqwest's `send` (or of the reqwest-middleware chain below sturdy):
/// `waited` says whether the call waited on anything before failing, for a request whose own
/// URL reqwest can send (http or https). reqwest's own checks fail at once, before anything is
/// sent; a builder error that came later was raised while following a redirect, after the
/// server answered. Callers pass `false` for a request reqwest cannot send at all, since a
/// later reqwest-middleware may wait before handing it to reqwest. `own_https`: the request's
/// own URL is `https`, which a reqwest without a TLS feature cannot send at all.
pub(crate) fn convert_sent(err: reqwest::Error, waited: bool, own_https: bool) -> Error {
    if waited && !own_https && err.is_connect() && no_tls_backend(&err) {
        // An `https` URL that reqwest without a TLS feature cannot use, met after a wait on an
        // `http` request: a redirect's target, after the server answered (see `convert` for
        // one met at once). A request whose own URL is `https` was never sent by this client,
        // however long a middleware below waited before handing it on.
        let err = redact(err);
        return Error::new(
            ErrorKind::Config,
            "could not follow a redirect: the server answered with a redirect to an https URL, and this reqwest client has no TLS backend (turn on reqwest's `rustls` or `native-tls` feature)",
        )
        .with_hidden_source(err)
        .with_delivery(Delivery::MaybeProcessed);
    }
    if waited && err.is_builder() {
        let err = redact(err);
        let message = format!(
            "could not follow a redirect: the server answered with a redirect to a URL reqwest cannot use ({})",
            root_text(&err)
        );
        Error::new(ErrorKind::Other, message)
            .with_hidden_source(err)
            .with_delivery(Delivery::MaybeProcessed)
    } else {
        convert(err, Stage::Call)
    }
}

pub(crate) fn convert(err: reqwest::Error, stage: Stage) -> Error {
    let err = redact(err);
    // A connect error carries no delivery of its own: reqwest may have followed a redirect
    // before it (see the table above), so it may have been processed, and the explicit
    // `MaybeProcessed` keeps sturdy's classification (which reads connect errors as never sent)
    // from saying otherwise.
    let (kind, message, delivery) = if err.is_builder() {
        (
            ErrorKind::Config,
            format!("invalid request: {}", root_text(&err)),
            Some(Delivery::NotSent),
        )
    } else if err.is_connect() && no_tls_backend(&err) {
        // reqwest without a TLS feature reports an `https` URL as a connect error, raised before
        // any connection: trying again cannot help.
        (
            ErrorKind::Config,
            "invalid request: an https URL, and this reqwest client has no TLS backend (turn on reqwest's `rustls` or `native-tls` feature)".to_owned(),
            Some(Delivery::NotSent),
        )
    } else if err.is_connect() && sturdy_core::classify::untrusted_certificate(&err) {
        (ErrorKind::Tls, words(&err), Some(Delivery::MaybeProcessed))
    } else if err.is_connect() {
        let message = if err.is_timeout() {
            "timed out while connecting".to_owned()
        } else {
            words(&err)
        };
        (ErrorKind::Connect, message, Some(Delivery::MaybeProcessed))
    } else if err.is_timeout() {
        let message = match stage {
            Stage::Call => "timed out (reqwest's timeout)",
            Stage::ResponseBody => "timed out while reading the response body (reqwest's timeout)",
        };
        (ErrorKind::Timeout, message.to_owned(), None)
    } else if err.is_redirect() {
        (
            ErrorKind::Other,
            format!("could not follow a redirect: {}", root_text(&err)),
            None,
        )
    } else if err.is_decode() {
        (
            ErrorKind::Body,
            format!("could not decode the response body: {}", words(&err)),
            None,
        )
    } else if err.is_body() {
        let what = match stage {
            Stage::Call => "could not send the request body",
            Stage::ResponseBody => "could not read the response body",
        };
        (ErrorKind::Body, format!("{what}: {}", words(&err)), None)
    } else if let Some(status) = err.status() {
        (
            ErrorKind::from_status(status).unwrap_or(ErrorKind::Other),
            format!("the server answered {status}"),
            None,
        )
    } else {
        let kind = classify_error(&err);
        // A TLS 1.3 server's refusal of the handshake comes after the request was written, and
        // reads as `Connect` by its chain: like a connect error here, it may come at a
        // redirect's target, after a server processed the request.
        let delivery = (kind == ErrorKind::Connect).then_some(Delivery::MaybeProcessed);
        (kind, words(&err), delivery)
    };
    let e = Error::new(kind, message).with_hidden_source(err);
    match delivery {
        Some(d) => e.with_delivery(d),
        None => e,
    }
}

/// Removes what may be secret from the URL an error carries.
fn redact(mut err: reqwest::Error) -> reqwest::Error {
    if let Some(url) = err.url_mut() {
        clean_url(url);
    }
    err
}

/// Cuts `url` to its scheme, host, port and path: no query, fragment or credentials.
pub(crate) fn clean_url(url: &mut reqwest::Url) {
    url.set_query(None);
    url.set_fragment(None);
    // Fails only for URLs that cannot have credentials, which then have none.
    let _ = url.set_username("");
    let _ = url.set_password(None);
}

/// The root cause in plain words: sturdy's description when it recognises the cause, else the
/// text of the deepest error in the chain.
fn words(err: &reqwest::Error) -> String {
    let described = describe(err);
    if described == err.to_string() {
        root_text(err)
    } else {
        described
    }
}

/// Whether `err` is reqwest's refusal of an `https` URL for want of a TLS backend (hyper-util's
/// HTTP connector's words; no error type says it).
fn no_tls_backend(err: &reqwest::Error) -> bool {
    sturdy_core::chain(err).any(|e| e.to_string().contains("scheme is not http"))
}

/// The most of a cause's text an error message carries: a connector's or a middleware's error
/// of any length (one that echoes a whole response, say) stays a short message.
const MAX_ROOT_TEXT: usize = 512;

/// The text of the deepest error in the chain (reqwest's own text says only "error sending
/// request"), at most [`MAX_ROOT_TEXT`] bytes, cut at a character boundary.
fn root_text(err: &reqwest::Error) -> String {
    let root = sturdy_core::chain(err).last().unwrap_or(err);
    let mut text = root.to_string();
    if text.len() > MAX_ROOT_TEXT {
        let mut end = MAX_ROOT_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}
