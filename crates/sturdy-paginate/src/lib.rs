//! Pagination over any HTTP service: every page when you want them, a bounded page when a
//! language model is asking.
//!
//! [`Paginate`] wraps a `Service<Request<Full<Bytes>>>` (the composed sturdy stack, so every page
//! gets its retries, auth and limits) and a [`PageStrategy`]:
//!
//! - [`JsonCursor`]: a cursor in the JSON body (`{"data": \[...\], "next_cursor": "..."}`);
//! - [`LinkHeader`]: RFC 8288 `Link: <...>; rel="next"`, resolved against the page's URI;
//! - [`PageNumber`] and [`OffsetLimit`]: stopping on an empty or short page, or at a total;
//! - your own, through the trait.
//!
//! Walks: [`Paginate::pages`] and [`Paginate::items`] are streams that fetch the next page only
//! when polled. For agent tools, [`Paginate::page`] returns at most `limit` items with
//! `has_more` and an opaque `next_cursor` that resumes exactly where it stopped, fetching no page
//! that was not needed.
//!
//! # Configuration
//!
//! [`Paginate::new`] builds a pager with the defaults; [`Paginate::builder`] takes `with_*`
//! settings, and [`PaginateBuilder::build`] reports every configuration mistake (a bound of zero,
//! a JSON pointer without its leading `/`, a short cursor key, a URI that is not absolute) as an
//! error of kind `Config`, before any page is fetched.
//!
//! | setting | default |
//! |---|---|
//! | [`with_max_pages`](PaginateBuilder::with_max_pages) | 1,000 pages per walk or `page()` call |
//! | [`with_max_items`](PaginateBuilder::with_max_items) | 100,000 items per walk or `page()` call |
//! | [`with_page_timeout`](PaginateBuilder::with_page_timeout) | 60 s per page, head and body |
//! | [`with_max_page_bytes`](PaginateBuilder::with_max_page_bytes) | 16 MiB per page body |
//! | [`with_page_size`](PaginateBuilder::with_page_size) | the strategy's (walks); `min(limit, 100)` (`page()`) |
//! | [`with_foreign_origin_allowed`](PaginateBuilder::with_foreign_origin_allowed) | `false` |
//! | [`with_cursor_key`](PaginateBuilder::with_cursor_key) | a random key per pager |
//!
//! # Guards
//!
//! Each guard ends the walk (or fails the `page()` call) with a [`sturdy_core::Error`] that says
//! what happened:
//!
//! - a page that does not arrive within the page timeout, counting the response head and the
//!   whole body (kind `Timeout`), or whose body is larger than the page limit (kind `Body`): a
//!   server that stalls or streams forever cannot hang a walk;
//! - a loop (kind `Pagination`): a page's next cursor leads to a URI already fetched in this walk,
//!   the first page's included, and the error comes before that page is fetched again, so no
//!   item is yielded twice; in `page()`, a cursor whose page would be the page it came from is
//!   refused;
//! - a `page()` cursor this pager did not return (kind `Pagination`): cursors carry an
//!   HMAC-SHA-256 tag over their content and the pager's URI, so a forged, edited or
//!   foreign cursor is refused before any request is sent;
//! - a next link to another origin (kind `Pagination`; credentials would follow it): allow it
//!   explicitly with [`with_foreign_origin_allowed`](PaginateBuilder::with_foreign_origin_allowed);
//! - more than `max_pages` pages or `max_items` items (kind `Pagination`; the items before the
//!   bound are yielded first);
//! - a page that is not the expected JSON (named by its number), or that answered an error
//!   status (kind from the status).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use bytes::Bytes;
//! use futures_util::TryStreamExt;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use sturdy_paginate::{JsonCursor, Paginate};
//! use tower::service_fn;
//!
//! // An API with 45 items, 20 per page, and a cursor in the body.
//! let api = service_fn(|req: Request<Full<Bytes>>| async move {
//!     let q = req.uri().query().unwrap_or("");
//!     let start: usize = q.split('&').find_map(|kv| kv.strip_prefix("cursor=")).map_or(0, |c| c.parse().unwrap());
//!     let end = (start + 20).min(45);
//!     let next = if end < 45 { serde_json::json!(end.to_string()) } else { serde_json::Value::Null };
//!     let body = serde_json::json!({ "data": (start..end).collect::<Vec<_>>(), "next": next });
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from(body.to_string())))
//! });
//!
//! let pager = Paginate::builder(api, "http://api.example.com/items", JsonCursor::new("/data", "/next"))
//!     .with_page_timeout(Duration::from_secs(10))
//!     .build()
//!     .unwrap();
//! let all: Vec<serde_json::Value> = pager.items().try_collect().await.unwrap();
//! assert_eq!(all.len(), 45);
//!
//! // A bounded page for a tool call, and its continuation.
//! let first = pager.page(None, 10).await.unwrap();
//! assert_eq!((first.items.len(), first.has_more), (10, true));
//! let next = pager.page(first.next_cursor.as_deref(), 10).await.unwrap();
//! assert_eq!(next.items[0], 10);
//!
//! // A cursor it did not hand out is refused, before any request.
//! assert!(pager.page(Some("eyJjIjoiOTk5In0"), 10).await.is_err());
//! # }
//! ```
#![forbid(unsafe_code)]

mod cursor;
mod strategy;

use std::collections::HashSet;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::{stream, StreamExt, TryStreamExt};
use hmac::Mac;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sturdy_core::body::BodyError;
use sturdy_core::{human_duration, BoxError, Error, ErrorKind};
use tower::{Service, ServiceExt};

use cursor::{page_id, CursorMac, PageId, Resume};

pub use cursor::MAX_CURSOR_LEN;
pub use strategy::{
    JsonCursor, LinkHeader, OffsetLimit, PageNumber, PageStrategy, Parsed, RawPage,
};

/// One page of a walk. Its `Debug` output shows the next cursor without userinfo or query (a
/// next link may carry credentials).
#[derive(Clone, PartialEq)]
pub struct Page {
    /// 1-based page number within the walk.
    pub number: usize,
    /// The items.
    pub items: Vec<Value>,
    /// The strategy's cursor of the next page, if any.
    pub next: Option<String>,
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("number", &self.number)
            .field("items", &self.items)
            .field("next", &self.next.as_deref().map(shown))
            .finish()
    }
}

/// A bounded page for agent tools: at most `limit` items, whether more exist, and an opaque
/// cursor that resumes exactly after the last item returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundedPage<T = Value> {
    /// The items: at most the limit asked for (a limit of 0 reads as 1).
    pub items: Vec<T>,
    /// Whether more items may follow.
    pub has_more: bool,
    /// Pass it back to get the next items; `None` at the end.
    pub next_cursor: Option<String>,
}

/// The page size [`Paginate::page`] asks for when none is set: most APIs cap pages at 100.
const BOUNDED_PAGE_SIZE: usize = 100;

const DEFAULT_MAX_PAGES: usize = 1_000;
const DEFAULT_MAX_ITEMS: usize = 100_000;
const DEFAULT_PAGE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;

type FetchFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Response<Bytes>, BoxError>> + Send>>;

/// Sends one page request and reads its body, up to the byte limit given.
type Fetch = Arc<dyn Fn(Request<Full<Bytes>>, usize) -> FetchFuture + Send + Sync>;

/// A paginated endpoint; see the [crate docs](crate). Cheap to clone: clones share the
/// configuration and the cursor key.
pub struct Paginate<P> {
    inner: Arc<Inner<P>>,
}

struct Inner<P> {
    fetch: Fetch,
    strategy: P,
    base: Uri,
    headers: HeaderMap,
    max_pages: usize,
    max_items: usize,
    foreign_origin_allowed: bool,
    page_size: Option<usize>,
    page_timeout: Duration,
    max_page_bytes: usize,
    cursor_mac: CursorMac,
}

impl<P> Clone for Paginate<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for Paginate<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("Paginate")
            .field("strategy", &i.strategy)
            .field("base", &shown(&i.base.to_string()))
            .field("max_pages", &i.max_pages)
            .field("max_items", &i.max_items)
            .field("page_timeout", &i.page_timeout)
            .field("max_page_bytes", &i.max_page_bytes)
            .field("foreign_origin_allowed", &i.foreign_origin_allowed)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`Paginate`], checked by [`build`](Self::build). Made by [`Paginate::builder`].
#[must_use]
pub struct PaginateBuilder<P> {
    fetch: Fetch,
    uri: String,
    strategy: P,
    headers: HeaderMap,
    max_pages: usize,
    max_items: usize,
    foreign_origin_allowed: bool,
    page_size: Option<usize>,
    page_timeout: Duration,
    max_page_bytes: usize,
    cursor_key: Option<Vec<u8>>,
}

impl<P: fmt::Debug> fmt::Debug for PaginateBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaginateBuilder")
            .field("uri", &shown(&self.uri))
            .field("strategy", &self.strategy)
            .field("max_pages", &self.max_pages)
            .field("max_items", &self.max_items)
            .field("page_timeout", &self.page_timeout)
            .field("max_page_bytes", &self.max_page_bytes)
            .field("foreign_origin_allowed", &self.foreign_origin_allowed)
            .field(
                "cursor_key",
                &self.cursor_key.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// A URI's origin as RFC 6454 compares them: the scheme and host in lowercase, and the port,
/// the scheme's default when none is written (`http://API.example.com` and
/// `http://api.example.com:80` are one origin). Userinfo is not part of it. `None` for a port
/// that is not a port number (`:99999`): such a URI has no origin to share.
fn origin(u: &Uri) -> Option<(String, String, Option<u16>)> {
    let scheme = u.scheme_str().unwrap_or("").to_ascii_lowercase();
    // `Uri::port` is `None` for a port out of range too, so look at what is written.
    let written = u.authority().is_some_and(|a| {
        written_port(sturdy_core::key::without_userinfo(a.as_str())).is_some_and(|p| !p.is_empty())
    });
    let port = match (written, u.port_u16()) {
        (true, None) => return None,
        (_, Some(p)) => Some(p),
        (false, None) => match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        },
    };
    Some((scheme, u.host().unwrap_or("").to_ascii_lowercase(), port))
}

/// The port as written after `host` (`host:port`, `[v6]:port`), possibly empty; `None` when
/// no `:` follows the host.
fn written_port(host: &str) -> Option<&str> {
    let after_brackets = host.rfind(']').map_or(host, |at| &host[at..]);
    after_brackets.rsplit_once(':').map(|(_, port)| port)
}

/// Whether two URIs share an origin (never when either has none).
fn same_origin(a: &Uri, b: &Uri) -> bool {
    matches!((origin(a), origin(b)), (Some(x), Some(y)) if x == y)
}

/// A URI or cursor for a message or `Debug` output, without what may hold a credential: the
/// query and fragment become `?…`, userinfo becomes `…@`. The query is cut first (an `@` or a
/// `://` in it says nothing about the rest); an `@` counts as the end of userinfo in the
/// authority, or anywhere before the query when the authority is broken (a password holding `/`,
/// `?` or `#` leaves a "port" that is not a number: then everything up to the last `@` is
/// withheld, or the whole authority when there is none). Works on text that is not a valid URI
/// too, and on network paths (`//user:pw@host/...`).
pub(crate) fn shown(s: &str) -> String {
    let whole = shown_whole(s);
    match short(&whole) {
        std::borrow::Cow::Borrowed(_) => whole,
        std::borrow::Cow::Owned(cut) => cut,
    }
}

/// The most bytes of a server's link, cursor or path a message quotes: the server chose them,
/// and a next link may be as long as a URI can be (64 KiB).
const MAX_SHOWN: usize = 512;

/// `text` cut to [`MAX_SHOWN`] bytes at a character boundary, saying how much was left out.
pub(crate) fn short(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_SHOWN {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}… ({} bytes more)",
        &text[..end],
        text.len() - end
    ))
}

/// [`shown`] before its length is bounded.
fn shown_whole(s: &str) -> String {
    let (head, cut) = match s.find(['?', '#']) {
        Some(at) => (&s[..at], "?…"),
        None => (s, ""),
    };
    let scheme_len = head.find("://").filter(|&at| {
        let scheme = &head[..at];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    let (prefix, rest) = match scheme_len {
        Some(at) => head.split_at(at + 3),
        None if head.starts_with("//") => head.split_at(2),
        // A path or an opaque cursor: nothing before the query names a user.
        None => return format!("{head}{cut}"),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (hidden, host) = match authority.rfind('@') {
        Some(at) => ("…@", &authority[at + 1..]),
        None => ("", authority),
    };
    let port_ok =
        written_port(host).is_none_or(|port| port.is_empty() || port.parse::<u16>().is_ok());
    if port_ok {
        return format!("{prefix}{hidden}{host}{path}{cut}");
    }
    match rest.rfind('@') {
        Some(at) => format!("{prefix}…@{}{cut}", &rest[at + 1..]),
        None => format!("{prefix}…{cut}"),
    }
}

/// `scheme://host[:port]` for a message: never the userinfo, which may hold a password.
fn shown_origin(u: &Uri) -> String {
    let scheme = u.scheme_str().unwrap_or("?");
    let host = u.host().unwrap_or("?");
    match u.port_u16() {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    }
}

/// The longest wait a page's `Retry-After` is reported as (a peer's value, capped).
const MAX_TOLD_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

fn err(msg: String) -> Error {
    Error::new(ErrorKind::Pagination, msg)
}

/// A mistake found before any page is fetched: nothing was sent.
fn config(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_delivery(sturdy_core::Delivery::NotSent)
}

impl<P: PageStrategy> PaginateBuilder<P> {
    /// Sends `name: value` with every page request.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The most pages one walk, or one [`Paginate::page`] call, fetches \[1,000\]; at least 1.
    pub fn with_max_pages(mut self, n: usize) -> Self {
        self.max_pages = n;
        self
    }

    /// The most items one walk returns \[100,000\], and the largest `limit` a
    /// [`Paginate::page`] call honours; at least 1.
    pub fn with_max_items(mut self, n: usize) -> Self {
        self.max_items = n;
        self
    }

    /// The page size asked of the server (when the strategy can say it), in walks and in
    /// [`Paginate::page`]; at least 1. Without it, walks use the strategy's default and `page()`
    /// asks for `min(limit, 100)`.
    pub fn with_page_size(mut self, n: usize) -> Self {
        self.page_size = Some(n);
        self
    }

    /// Follows next links to other origins too \[`false`\]: a foreign next link could receive
    /// the credentials the stack adds.
    pub fn with_foreign_origin_allowed(mut self, allowed: bool) -> Self {
        self.foreign_origin_allowed = allowed;
        self
    }

    /// How long one page may take, from sending the request to the last byte of the body
    /// \[60 s\]; more than zero. It bounds everything the inner service does for that page,
    /// retries included. A page that takes longer fails with an error of kind `Timeout`.
    pub fn with_page_timeout(mut self, timeout: Duration) -> Self {
        self.page_timeout = timeout;
        self
    }

    /// The largest page body read, in bytes \[16 MiB\]; at least 1. Reading stops as soon as a
    /// body goes past it, and the page fails with an error of kind `Body`.
    pub fn with_max_page_bytes(mut self, n: usize) -> Self {
        self.max_page_bytes = n;
        self
    }

    /// The key that signs [`Paginate::page`] cursors \[a random key made when the pager is
    /// built\]; at least 32 bytes. With the default, a cursor is valid only for this pager and its
    /// clones; give every instance the same secret key when cursors must survive a restart or
    /// move between processes. The key never appears in `Debug` output.
    pub fn with_cursor_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.cursor_key = Some(key.as_ref().to_vec());
        self
    }

    /// Checks the settings and the strategy ([`PageStrategy::validate`]) and makes the pager.
    ///
    /// # Errors
    /// An error of kind `Config` when the first page's URI is not an absolute URI, a bound is
    /// zero, the cursor key is shorter than 32 bytes, or the strategy is misconfigured.
    pub fn build(self) -> Result<Paginate<P>, Error> {
        let uri = &self.uri;
        let base: Uri = uri
            .parse()
            // Not repeated in the message: a URI may carry a credential (userinfo, a key in the
            // query).
            .map_err(|e| {
                config("the first page's URI is not a valid URI".to_owned()).with_source(e)
            })?;
        if base.scheme().is_none() || base.authority().is_none() {
            return Err(config(format!(
                "the first page's URI must be absolute (scheme and host), not {}",
                shown(uri)
            )));
        }
        for (n, setting) in [
            (self.max_pages, "with_max_pages"),
            (self.max_items, "with_max_items"),
            (self.page_size.unwrap_or(1), "with_page_size"),
            (self.max_page_bytes, "with_max_page_bytes"),
        ] {
            if n == 0 {
                return Err(config(format!(
                    "{setting}(0): the value must be at least 1"
                )));
            }
        }
        if self.page_timeout.is_zero() {
            return Err(config(
                "with_page_timeout(0): the page timeout must be more than zero".to_owned(),
            ));
        }
        self.strategy.validate()?;
        let key = match self.cursor_key {
            Some(k) if k.len() < cursor::MIN_KEY_LEN => {
                return Err(config(format!(
                    "the cursor key is {} bytes long; use at least {} random bytes",
                    k.len(),
                    cursor::MIN_KEY_LEN
                )))
            }
            Some(k) => k,
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let cursor_mac = CursorMac::new_from_slice(&key)
            .map_err(|_| config("the cursor key is not usable".to_owned()))?;
        Ok(Paginate {
            inner: Arc::new(Inner {
                fetch: self.fetch,
                strategy: self.strategy,
                base,
                headers: self.headers,
                max_pages: self.max_pages,
                max_items: self.max_items,
                foreign_origin_allowed: self.foreign_origin_allowed,
                page_size: self.page_size,
                page_timeout: self.page_timeout,
                max_page_bytes: self.max_page_bytes,
                cursor_mac,
            }),
        })
    }
}

impl<P: PageStrategy> Paginate<P> {
    /// A pager with the default settings that walks `uri` (the first page) through `service`
    /// with `strategy`; the same as `Paginate::builder(service, uri, strategy).build()`.
    ///
    /// # Errors
    /// As [`PaginateBuilder::build`]: when `uri` is not an absolute URI or the strategy is
    /// misconfigured.
    pub fn new<S, Rb>(service: S, uri: &str, strategy: P) -> Result<Self, Error>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Rb: Body + Send + 'static,
        Rb::Data: Send,
        Rb::Error: Into<BoxError>,
    {
        Self::builder(service, uri, strategy).build()
    }

    /// Settings for a pager that walks `uri` (the first page) through `service` with
    /// `strategy`; finish with [`PaginateBuilder::build`]. Each page is sent with `oneshot` on
    /// a clone of `service`.
    pub fn builder<S, Rb>(service: S, uri: &str, strategy: P) -> PaginateBuilder<P>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Rb: Body + Send + 'static,
        Rb::Data: Send,
        Rb::Error: Into<BoxError>,
    {
        let fetch: Fetch = Arc::new(move |req, limit| {
            let svc = service.clone();
            Box::pin(async move {
                let res = svc.oneshot(req).await.map_err(Into::into)?;
                let (parts, body) = res.into_parts();
                let body = sturdy_core::body::buffer(body, limit).await?;
                Ok(Response::from_parts(parts, body))
            })
        });
        PaginateBuilder {
            fetch,
            uri: uri.to_owned(),
            strategy,
            headers: HeaderMap::new(),
            max_pages: DEFAULT_MAX_PAGES,
            max_items: DEFAULT_MAX_ITEMS,
            foreign_origin_allowed: false,
            page_size: None,
            page_timeout: DEFAULT_PAGE_TIMEOUT,
            max_page_bytes: DEFAULT_MAX_PAGE_BYTES,
            cursor_key: None,
        }
    }

    /// The URI of page `number` at `cursor`, refused if it leaves the first page's origin.
    fn page_uri(
        &self,
        number: usize,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Uri, Error> {
        let i = &self.inner;
        let uri = i.strategy.uri(&i.base, cursor, limit)?;
        if i.strategy.cursors_are_urls() && !i.foreign_origin_allowed && !same_origin(&uri, &i.base)
        {
            return Err(err(format!(
                "refusing to follow the next link of page {} to another origin ({}); the walk started at {}",
                number.saturating_sub(1),
                shown_origin(&uri),
                shown_origin(&i.base),
            )));
        }
        Ok(uri)
    }

    /// Fetches and reads one page, within the page timeout and the body limit.
    async fn fetch_page(
        &self,
        number: usize,
        uri: Uri,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Parsed, Error> {
        let i = &self.inner;
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = i.headers.clone();
        let fetched = tokio::time::timeout(i.page_timeout, (i.fetch)(req, i.max_page_bytes)).await;
        let res = match fetched {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "page {number} ({}) did not arrive within {} (the page timeout covers the response head and the whole body); the server stalled, or raise with_page_timeout",
                        short(uri.path()),
                        human_duration(i.page_timeout)
                    ),
                ))
            }
            Ok(Err(e)) => {
                if let Some(BodyError::TooLarge { limit }) = e.downcast_ref::<BodyError>() {
                    return Err(Error::new(
                        ErrorKind::Body,
                        format!(
                            "page {number} ({}) is larger than the {limit}-byte page limit; ask for smaller pages or raise with_max_page_bytes",
                            short(uri.path())
                        ),
                    ));
                }
                let kind = sturdy_core::classify::classify_error(&*e);
                return Err(
                    // The error's own text, or its cause's when that text names none (a
                    // hyper-util client's "client error (SendRequest)").
                    Error::new(
                        kind,
                        format!(
                            "page {number} ({}) failed: {}",
                            short(uri.path()),
                            sturdy_core::classify::own_text(&*e)
                        ),
                    )
                    .with_hidden_source(e),
                );
            }
            Ok(Ok(res)) => res,
        };
        if !res.status().is_success() {
            let status = res.status();
            let mut kind = ErrorKind::from_status(status).unwrap_or(ErrorKind::Other);
            // A 429 or 503 that says when (`Retry-After`) tells the caller, and through a tool
            // result an agent, how long to wait, as the retry layer's refusal does; a peer's
            // value is capped first.
            let told = (status == http::StatusCode::TOO_MANY_REQUESTS
                || status == http::StatusCode::SERVICE_UNAVAILABLE)
                .then(|| sturdy_core::headers::RetryAfter::from_headers(res.headers()))
                .flatten()
                .map(|ra| {
                    ra.delay_from(sturdy_core::WallClock::now(&sturdy_core::SystemClock))
                        .min(MAX_TOLD_WAIT)
                });
            if let (Some(wait), ErrorKind::RateLimited { retry_after }) = (told, &mut kind) {
                *retry_after = Some(wait);
            }
            let mut e = Error::new(
                kind,
                format!("page {number} ({}) answered {status}", short(uri.path())),
            );
            if let Some(wait) = told {
                let host = uri.host().unwrap_or_default().to_owned();
                e = e.with_hidden_source(sturdy_core::RateLimited::new(wait).with_scope(host));
            }
            return Err(e);
        }
        let (parts, body) = res.into_parts();
        let raw = RawPage {
            number,
            uri,
            status: parts.status,
            headers: parts.headers,
            body,
        };
        i.strategy.parse(&raw, cursor, limit)
    }

    /// Every page, fetched lazily: the next page only when the stream is polled. Ends after the
    /// last page; a guard or a failed page ends it with an error.
    ///
    /// A page whose next cursor leads to a URI already fetched in this walk (the first page's
    /// included) is still yielded; the stream then ends with a loop error instead of fetching
    /// that URI again.
    pub fn pages(&self) -> PageStream<Page> {
        struct Walk<P> {
            pager: Paginate<P>,
            cursor: Option<String>,
            number: usize,
            items: usize,
            seen: HashSet<PageId>,
            pending: Option<Error>,
            done: bool,
        }
        let walk = Walk {
            pager: self.clone(),
            cursor: None,
            number: 0,
            items: 0,
            seen: HashSet::new(),
            pending: None,
            done: false,
        };
        let s = stream::try_unfold(walk, |mut w| async move {
            if let Some(e) = w.pending.take() {
                return Err(e);
            }
            if w.done {
                return Ok(None);
            }
            let i = &w.pager.inner;
            if w.number >= i.max_pages {
                return Err(err(format!("stopped after {} pages (max_pages) and {} items; raise with_max_pages or narrow the query", w.number, w.items)));
            }
            w.number += 1;
            let uri = w
                .pager
                .page_uri(w.number, w.cursor.as_deref(), i.page_size)?;
            w.seen.insert(page_id(&uri));
            let parsed = w
                .pager
                .fetch_page(w.number, uri.clone(), w.cursor.as_deref(), i.page_size)
                .await?;
            let mut items = parsed.items;
            if w.items + items.len() > i.max_items {
                items.truncate(i.max_items - w.items);
                w.pending = Some(err(format!("stopped at {} items (max_items) on page {}; raise with_max_items or narrow the query", i.max_items, w.number)));
            }
            w.items += items.len();
            match &parsed.next {
                None => w.done = true,
                Some(n) => {
                    // The next page is known by the URI it would be fetched from.
                    match i.strategy.uri(&i.base, Some(n), i.page_size) {
                        Ok(next) if w.seen.contains(&page_id(&next)) => {
                            w.pending.get_or_insert_with(|| {
                                err(format!(
                                    "pagination loop: the next cursor of page {} ({:?}) leads back to {}, a page already read",
                                    w.number,
                                    shown(n),
                                    if page_id(&next) == page_id(&uri) { "the same page".to_owned() } else { short(next.path()).into_owned() }
                                ))
                            });
                        }
                        // A cursor that makes no URI fails when the next page is asked for.
                        _ => {}
                    }
                    w.cursor = Some(n.clone());
                }
            }
            let page = Page {
                number: w.number,
                items,
                next: parsed.next,
            };
            Ok(Some((page, w)))
        });
        PageStream(Box::pin(s))
    }

    /// Every item of every page, fetched lazily.
    pub fn items(&self) -> PageStream<Value> {
        let s = self
            .pages()
            .map_ok(|p| stream::iter(p.items.into_iter().map(Ok)))
            .try_flatten();
        PageStream(Box::pin(s))
    }

    /// Every item, deserialized into `T`.
    pub fn items_as<T: DeserializeOwned + Send + 'static>(&self) -> PageStream<T> {
        let s = self.items().enumerate().map(|(i, r)| {
            r.and_then(|v| {
                serde_json::from_value(v).map_err(|e| {
                    err(format!(
                        "item {} does not have the expected shape: {e}",
                        i + 1
                    ))
                })
            })
        });
        PageStream(Box::pin(s))
    }

    /// At most `limit` items from `cursor` (`None`: the start), for agent tools.
    ///
    /// Fetches only the pages needed, asking for pages of `min(limit, 100)` items (or the
    /// [`with_page_size`](PaginateBuilder::with_page_size)); `next_cursor` resumes exactly
    /// after the last item returned. A `limit` of 0 reads as 1, and one above
    /// [`with_max_items`](PaginateBuilder::with_max_items) as that bound. One call reads at most
    /// `max_pages` pages. A call returns all its items or fails as a whole.
    ///
    /// The cursor is signed (HMAC-SHA-256 with the pager's key, over the cursor and the pager's
    /// URI) and at most [`MAX_CURSOR_LEN`] characters long: a cursor this pager did not
    /// return is refused before any request is sent.
    ///
    /// # Errors
    /// As the walks: a failed, slow, oversized or malformed page, a loop (including a cursor
    /// whose page would be the page it came from), a foreign next link, more than `max_pages`
    /// pages; and a cursor that this pager did not return.
    pub async fn page(&self, cursor: Option<&str>, limit: usize) -> Result<BoundedPage, Error> {
        let i = &self.inner;
        let limit = limit.clamp(1, i.max_items);
        let mut at = match cursor {
            None => Resume {
                c: None,
                s: 0,
                l: i.page_size.unwrap_or_else(|| limit.min(BOUNDED_PAGE_SIZE)),
                f: None,
            },
            Some(c) => cursor::decode(&i.cursor_mac, &i.base, c)?,
        };
        let mut from = at.linked_from();
        let mut items = Vec::new();
        let mut seen: HashSet<PageId> = HashSet::new();
        let mut number = 0;
        loop {
            if number >= i.max_pages {
                return Err(err(format!(
                    "stopped after {number} pages (max_pages) with {} items; raise with_max_pages or ask for fewer items",
                    items.len()
                )));
            }
            number += 1;
            let uri = self.page_uri(number, at.c.as_deref(), Some(at.l))?;
            let id = page_id(&uri);
            if from == Some(id) {
                return Err(err(format!(
                    "pagination loop: this cursor would fetch {} again, the page it came from (its next cursor {:?} points to itself); there is nothing more to read",
                    short(uri.path()),
                    shown(at.c.as_deref().unwrap_or(""))
                )));
            }
            if !seen.insert(id) {
                return Err(err(format!(
                    "pagination loop: the next cursor {:?} leads back to {}, a page already read in this call",
                    shown(at.c.as_deref().unwrap_or("")),
                    short(uri.path())
                )));
            }
            let parsed = self
                .fetch_page(number, uri, at.c.as_deref(), Some(at.l))
                .await?;
            let available = parsed.items.len().saturating_sub(at.s);
            let take = available.min(limit - items.len());
            items.extend(parsed.items.into_iter().skip(at.s).take(take));
            if take < available {
                // Stopped inside this page: resume from it, further in.
                let next = Resume {
                    c: at.c,
                    s: at.s + take,
                    l: at.l,
                    f: None,
                };
                return Ok(BoundedPage {
                    items,
                    has_more: true,
                    next_cursor: Some(cursor::encode(&i.cursor_mac, &i.base, &next)?),
                });
            }
            match parsed.next {
                None => {
                    return Ok(BoundedPage {
                        items,
                        has_more: false,
                        next_cursor: None,
                    })
                }
                Some(n) => {
                    at = Resume {
                        c: Some(n),
                        s: 0,
                        l: at.l,
                        f: None,
                    };
                    at.set_linked_from(&id);
                    from = Some(id);
                    if items.len() >= limit {
                        return Ok(BoundedPage {
                            items,
                            has_more: true,
                            next_cursor: Some(cursor::encode(&i.cursor_mac, &i.base, &at)?),
                        });
                    }
                }
            }
        }
    }
}

/// A stream of pages or items (boxed; the type is named so the box can go later).
pub struct PageStream<T>(Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>);

impl<T> fmt::Debug for PageStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PageStream")
    }
}

impl<T> Stream for PageStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}
