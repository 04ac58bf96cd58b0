//! API version pinning, and notice of deprecations before they break you.
//!
//! [`VersionLayer`] sets the API version on every request, in a header whose name you give
//! (`API-Version`, `Stripe-Version`, `X-GitHub-Api-Version`, ...) or a query parameter; a version
//! the caller set is kept. It reads every response for `Deprecation` (RFC 9745: `@<unix>`, and
//! the older `true` or HTTP-date forms) and `Sunset` (RFC 8594: an HTTP date, read leniently;
//! a date before 1970 is that date), and reports each endpoint (method and path) once: a
//! `tracing` warning and an optional callback. The response itself is untouched.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::{Arc, Mutex};
//! use http::{Request, Response};
//! use sturdy_version::{Notice, VersionLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! let api = service_fn(|req: Request<()>| async move {
//!     assert_eq!(req.headers()["api-version"], "2024-06-01");
//!     Ok::<_, std::convert::Infallible>(Response::builder().header("deprecation", "@1688169599").body(()).unwrap())
//! });
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let client = VersionLayer::header("api-version", "2024-06-01").unwrap()
//!     .on_notice(move |n: &Notice| log.lock().unwrap().push(n.endpoint.clone()))
//!     .layer(api);
//! for _ in 0..3 {
//!     client.clone().oneshot(Request::get("http://api.example.com/v1/orders").body(()).unwrap()).await.unwrap();
//! }
//! assert_eq!(*seen.lock().unwrap(), ["GET /v1/orders"]); // once per endpoint
//! # }
//! ```
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use sturdy_core::headers::{parse_http_date_any_year, sf};
use sturdy_core::{Error, ErrorKind};
use tower::{Layer, Service};

/// What a response said about the endpoint's future.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `METHOD /path`.
    pub endpoint: String,
    /// When it was (or will be) deprecated; `Some(None)` for the legacy `Deprecation: true`.
    pub deprecation: Option<Option<SystemTime>>,
    /// When it stops working.
    pub sunset: Option<SystemTime>,
}

type Callback = Arc<dyn Fn(&Notice) + Send + Sync>;

#[derive(Clone)]
enum Pinning {
    Header(HeaderName, HeaderValue),
    Query(String, String),
}

struct Shared {
    pin: Pinning,
    callback: Option<Callback>,
    reported: Mutex<HashSet<String>>,
    max_endpoints: usize,
}

/// Pins the API version and reports deprecations; see the [crate docs](crate).
#[derive(Clone)]
#[must_use]
pub struct VersionLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for VersionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pin = match &self.shared.pin {
            Pinning::Header(n, v) => format!("{n}: {v:?}"),
            Pinning::Query(k, v) => format!("?{k}={v}"),
        };
        f.debug_struct("VersionLayer")
            .field("pin", &pin)
            .finish_non_exhaustive()
    }
}

impl VersionLayer {
    fn with(pin: Pinning) -> Self {
        Self {
            shared: Arc::new(Shared {
                pin,
                callback: None,
                reported: Mutex::new(HashSet::new()),
                max_endpoints: 10_000,
            }),
        }
    }

    /// Sends `version` in the header `name`.
    ///
    /// # Errors
    /// When the name or the value is not valid in a header.
    pub fn header(name: &str, version: &str) -> Result<Self, Error> {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
            Error::new(ErrorKind::Config, format!("{name:?} is not a header name")).with_source(e)
        })?;
        let v = HeaderValue::from_str(version).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("{version:?} is not a header value"),
            )
            .with_source(e)
        })?;
        Ok(Self::with(Pinning::Header(n, v)))
    }

    /// Sends `version` in the query parameter `name`. A request whose URI cannot hold the
    /// parameter (its path and query would pass the 65,534 bytes `http::Uri` allows) is sent
    /// as it is, without the version, and a `tracing` warning names the parameter: this layer
    /// passes its inner service's error type through, so it has no error of its own to refuse
    /// with.
    pub fn query(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self::with(Pinning::Query(name.into(), version.into()))
    }

    /// Calls `f` once per endpoint that announces a deprecation or a sunset. The layer remembers
    /// 10,000 endpoints; past that it starts afresh, so a new endpoint is never missed and one
    /// reported long ago may be reported again.
    pub fn on_notice(self, f: impl Fn(&Notice) + Send + Sync + 'static) -> Self {
        let s = &self.shared;
        Self {
            shared: Arc::new(Shared {
                pin: s.pin.clone(),
                callback: Some(Arc::new(f)),
                reported: Mutex::new(HashSet::new()),
                max_endpoints: s.max_endpoints,
            }),
        }
    }
}

impl<S> Layer<S> for VersionLayer {
    type Service = Version<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Version {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`VersionLayer`]. `poll_ready` is the inner service's.
#[derive(Clone)]
pub struct Version<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Version<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Version")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn set_query<B>(req: &mut Request<B>, name: &str, value: &str) {
    // A version the caller set is kept.
    if sturdy_core::query::has(req.uri(), name) {
        return;
    }
    // A URI with no path to carry a query (the authority form of `CONNECT host:443`, `*`)
    // is a request to the proxy or server itself: it goes as it is, with no pin and no word.
    if req.uri().path_and_query().is_none_or(|p| p.as_str() == "*") && req.uri().scheme().is_none()
    {
        return;
    }
    match sturdy_core::query::set(req.uri(), &[(name, value)]) {
        Ok(u) => *req.uri_mut() = u,
        // Past that, only a URI longer than `http::Uri` can hold fails: it goes as it is.
        Err(_) => tracing::warn!(
            parameter = name,
            uri_bytes = req.uri().to_string().len(),
            "the API version could not be added to the query: the URI would be longer than a URI can be; the request is sent without it"
        ),
    }
}

/// Reads `Deprecation` in its RFC 9745 form (`@<unix>`), or the legacy `true` and HTTP-date forms.
fn deprecation(v: &HeaderValue) -> Option<Option<SystemTime>> {
    if let Ok((sf::BareItem::Date(secs), _)) = sf::parse_item(v.as_bytes()) {
        let t = if secs >= 0 {
            // Checked: where `SystemTime` holds a narrower range (Windows), a peer's far date
            // would overflow.
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))?
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
        };
        return Some(Some(t));
    }
    if v.as_bytes().eq_ignore_ascii_case(b"true") {
        return Some(None);
    }
    parse_http_date_any_year(v.as_bytes(), "Deprecation")
        .ok()
        .map(Some)
}

impl Shared {
    fn observe<B>(&self, endpoint: String, res: &Response<B>) {
        let dep = res.headers().get("deprecation").and_then(deprecation);
        let sunset = res
            .headers()
            .get("sunset")
            .and_then(|v| parse_http_date_any_year(v.as_bytes(), "Sunset").ok());
        if dep.is_none() && sunset.is_none() {
            return;
        }
        {
            let mut seen = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            // Bounded memory: past the bound the set starts afresh, so a new endpoint is never
            // missed (one seen long ago may be reported again).
            if seen.len() >= self.max_endpoints && !seen.contains(&endpoint) {
                seen.clear();
            }
            if !seen.insert(endpoint.clone()) {
                return;
            }
        }
        // An HTTP date cannot be written before 1970: such a date (a peer's `@-1659578233`, or
        // `Sunset: Mon, 01 Jan 1900 00:00:00 GMT`) is logged in RFC 9745's `@<unix>` form.
        let fmt_time = |t: SystemTime| match SystemTime::UNIX_EPOCH.duration_since(t) {
            Ok(before) if !before.is_zero() => format!("@-{}", before.as_secs()),
            _ => sturdy_core::headers::format_http_date(t),
        };
        tracing::warn!(
            endpoint = %endpoint,
            deprecation = ?dep.map(|d| d.map_or_else(|| "true".to_owned(), fmt_time)),
            sunset = ?sunset.map(fmt_time),
            "the API announces that this endpoint is deprecated or will be shut down"
        );
        if let Some(cb) = &self.callback {
            cb(&Notice {
                endpoint,
                deprecation: dep,
                sunset,
            });
        }
    }
}

impl<S, B, Rb> Service<Request<B>> for Version<S>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    type Response = Response<Rb>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match &self.shared.pin {
            Pinning::Header(n, v) => {
                if !req.headers().contains_key(n) {
                    req.headers_mut().insert(n.clone(), v.clone());
                }
            }
            Pinning::Query(k, v) => set_query(&mut req, k, v),
        }
        let endpoint = format!("{} {}", req.method(), req.uri().path());
        ResponseFuture {
            fut: self.inner.call(req),
            endpoint: Some(endpoint),
            shared: self.shared.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`Version`].
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        endpoint: Option<String>,
        shared: Arc<Shared>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl<F, Rb, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Rb>, E>>,
{
    type Output = Result<Response<Rb>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        if let (Ok(res), Some(ep)) = (&out, this.endpoint.take()) {
            this.shared.observe(ep, res);
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deprecation_forms() {
        let t = |s: &str| deprecation(&HeaderValue::from_str(s).unwrap());
        assert_eq!(
            t("@1688169599"),
            Some(Some(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_688_169_599)
            ))
        );
        assert_eq!(t("true"), Some(None));
        assert_eq!(
            t("Sun, 11 Nov 2018 23:59:59 GMT"),
            Some(Some(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_541_980_799)
            ))
        );
        assert_eq!(t("@1659578233.12"), None);
        assert_eq!(t("soon"), None);
    }

    #[test]
    fn query_pinning() {
        let mut r = Request::get("http://h/x?a=1").body(()).unwrap();
        set_query(&mut r, "api-version", "2024-06-01");
        assert_eq!(r.uri(), "http://h/x?a=1&api-version=2024-06-01");
        let mut r = Request::get("http://h/x?api-version=old").body(()).unwrap();
        set_query(&mut r, "api-version", "new");
        assert_eq!(
            r.uri(),
            "http://h/x?api-version=old",
            "the caller's version is kept"
        );
    }

    #[tokio::test]
    async fn hostile_dates_are_reported_without_a_panic() {
        use std::sync::Mutex;
        use tower::ServiceExt;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let api = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .header("deprecation", "@999999999999999")
                    .header("sunset", "Sat, 01 Jan 99999 00:00:00 GMT")
                    .body(())
                    .unwrap(),
            )
        });
        let svc = VersionLayer::header("api-version", "1")
            .unwrap()
            .on_notice(move |n: &Notice| log.lock().unwrap().push(n.clone()))
            .layer(api);
        // A subscriber that formats the warning, dates included.
        let subscriber = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        svc.oneshot(Request::get("http://h/x").body(()).unwrap())
            .await
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(matches!(seen[0].deprecation, Some(Some(_))));
    }
}
