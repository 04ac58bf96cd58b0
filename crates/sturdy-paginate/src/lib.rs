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
//! Guards, each a [`sturdy_core::Error`] of kind `Pagination` that says what happened: a cursor or
//! URL seen twice (a loop), a next link to another origin (credentials would follow it; allow it
//! explicitly with [`Paginate::allow_foreign_origin`]), more than `max_pages` \[1,000\] pages or
//! `max_items` \[100,000\] items (the items before the bound are yielded first), a page that is not
//! the expected JSON (named by its number), a page that answered an error status.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
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
//! let pager = Paginate::new(api, "http://api.example.com/items", JsonCursor::new("/data", "/next")).unwrap();
//! let all: Vec<serde_json::Value> = pager.items().try_collect().await.unwrap();
//! assert_eq!(all.len(), 45);
//!
//! // A bounded page for a tool call, and its continuation.
//! let first = pager.page(None, 10).await.unwrap();
//! assert_eq!((first.items.len(), first.has_more), (10, true));
//! let next = pager.page(first.next_cursor.as_deref(), 10).await.unwrap();
//! assert_eq!(next.items[0], 10);
//! # }
//! ```
#![forbid(unsafe_code)]

mod strategy;

use std::collections::HashSet;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use futures_core::Stream;
use futures_util::{stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sturdy_core::{BoxError, Error, ErrorKind};
use tower::{Service, ServiceExt};

pub use strategy::{
    JsonCursor, LinkHeader, OffsetLimit, PageNumber, PageStrategy, Parsed, RawPage,
};

/// One page of a walk.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// 1-based page number within the walk.
    pub number: usize,
    /// The items.
    pub items: Vec<Value>,
    /// The strategy's cursor of the next page, if any.
    pub next: Option<String>,
}

/// A bounded page for agent tools: at most `limit` items, whether more exist, and an opaque
/// cursor that resumes exactly after the last item returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundedPage<T = Value> {
    /// The items, at most the limit asked for.
    pub items: Vec<T>,
    /// Whether more items may follow.
    pub has_more: bool,
    /// Pass it back to get the next items; `None` at the end.
    pub next_cursor: Option<String>,
}

/// The page size [`Paginate::page`] asks for when none is set: most APIs cap pages at 100.
const BOUNDED_PAGE_SIZE: usize = 100;

/// The largest page body read \[16 MiB\].
const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;

type Fetch = Arc<
    dyn Fn(
            Request<Full<Bytes>>,
        )
            -> Pin<Box<dyn std::future::Future<Output = Result<Response<Bytes>, BoxError>> + Send>>
        + Send
        + Sync,
>;

/// A paginated endpoint; see the [crate docs](crate). Cheap to clone.
pub struct Paginate<P> {
    fetch: Fetch,
    strategy: Arc<P>,
    base: Uri,
    headers: HeaderMap,
    max_pages: usize,
    max_items: usize,
    allow_foreign: bool,
    page_size: Option<usize>,
}

impl<P> Clone for Paginate<P> {
    fn clone(&self) -> Self {
        Self {
            fetch: self.fetch.clone(),
            strategy: self.strategy.clone(),
            base: self.base.clone(),
            headers: self.headers.clone(),
            max_pages: self.max_pages,
            max_items: self.max_items,
            allow_foreign: self.allow_foreign,
            page_size: self.page_size,
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for Paginate<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paginate")
            .field("strategy", &self.strategy)
            .field("base", &self.base)
            .field("max_pages", &self.max_pages)
            .field("max_items", &self.max_items)
            .finish_non_exhaustive()
    }
}

fn origin(u: &Uri) -> (Option<&str>, Option<&str>) {
    (
        u.scheme_str(),
        u.authority().map(http::uri::Authority::as_str),
    )
}

fn err(msg: String) -> Error {
    Error::new(ErrorKind::Pagination, msg)
}

/// What the opaque cursor of [`Paginate::page`] holds.
#[derive(Serialize, Deserialize)]
struct Resume {
    /// The strategy's cursor of the page to read from (`None`: the first page).
    c: Option<String>,
    /// Items of that page already returned.
    s: usize,
    /// The page size the walk uses, so positions stay stable.
    l: usize,
}

impl Resume {
    fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(s: &str) -> Result<Self, Error> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                err(format!(
                    "{s:?} is not a cursor this tool returned; start again without a cursor"
                ))
            })
    }
}

impl<P: PageStrategy> Paginate<P> {
    /// Walks `uri` (the first page) through `service` with `strategy`.
    ///
    /// # Errors
    /// When `uri` is not an absolute URI.
    pub fn new<S, Rb>(service: S, uri: &str, strategy: P) -> Result<Self, Error>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Rb: Body + Send + 'static,
        Rb::Data: Send,
        Rb::Error: Into<BoxError>,
    {
        let base: Uri = uri.parse().map_err(|e| {
            Error::new(ErrorKind::Config, format!("{uri:?} is not a valid URI")).with_source(e)
        })?;
        if base.scheme().is_none() || base.authority().is_none() {
            return Err(Error::new(
                ErrorKind::Config,
                "the first page's URI must be absolute",
            ));
        }
        let fetch: Fetch = Arc::new(move |req| {
            let svc = service.clone();
            Box::pin(async move {
                let res = svc.oneshot(req).await.map_err(Into::into)?;
                let (parts, body) = res.into_parts();
                let body = sturdy_core::body::buffer(body, MAX_PAGE_BYTES).await?;
                Ok(Response::from_parts(parts, body))
            })
        });
        Ok(Self {
            fetch,
            strategy: Arc::new(strategy),
            base,
            headers: HeaderMap::new(),
            max_pages: 1_000,
            max_items: 100_000,
            allow_foreign: false,
            page_size: None,
        })
    }

    /// Sends `name: value` with every page request.
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The most pages a walk fetches \[1,000\].
    #[must_use]
    pub fn max_pages(mut self, n: usize) -> Self {
        self.max_pages = n.max(1);
        self
    }

    /// The most items a walk returns \[100,000\].
    #[must_use]
    pub fn max_items(mut self, n: usize) -> Self {
        self.max_items = n.max(1);
        self
    }

    /// The page size asked of the server in walks (when the strategy can say it).
    #[must_use]
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = Some(n.max(1));
        self
    }

    /// Follows next links to other origins too. Off by default: a foreign next link could
    /// receive the credentials the stack adds.
    #[must_use]
    pub fn allow_foreign_origin(mut self, allow: bool) -> Self {
        self.allow_foreign = allow;
        self
    }

    /// Fetches and reads one page.
    async fn fetch_page(
        &self,
        number: usize,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Parsed, Error> {
        let uri = self.strategy.uri(&self.base, cursor, limit)?;
        if self.strategy.cursors_are_urls()
            && !self.allow_foreign
            && origin(&uri) != origin(&self.base)
        {
            return Err(err(format!(
                "refusing to follow the next link of page {} to another origin ({}://{}); the walk started at {}://{}",
                number - 1,
                uri.scheme_str().unwrap_or("?"),
                uri.authority().map_or("?", |a| a.as_str()),
                self.base.scheme_str().unwrap_or("?"),
                self.base.authority().map_or("?", |a| a.as_str()),
            )));
        }
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = self.headers.clone();
        let res = (self.fetch)(req).await.map_err(|e| {
            let kind = sturdy_core::classify::classify_error(&*e);
            Error::new(kind, format!("page {number} ({}) failed", uri.path())).with_source(e)
        })?;
        if !res.status().is_success() {
            let kind = ErrorKind::from_status(res.status()).unwrap_or(ErrorKind::Other);
            return Err(Error::new(
                kind,
                format!("page {number} ({}) answered {}", uri.path(), res.status()),
            ));
        }
        let (parts, body) = res.into_parts();
        let raw = RawPage {
            number,
            uri,
            status: parts.status,
            headers: parts.headers,
            body,
        };
        self.strategy.parse(&raw, cursor, limit)
    }

    /// Every page, fetched lazily: the next page only when the stream is polled. Ends after the
    /// last page; a guard or a failed page ends it with an error.
    pub fn pages(&self) -> PageStream<Page> {
        struct Walk<P> {
            pager: Paginate<P>,
            cursor: Option<String>,
            number: usize,
            items: usize,
            seen: HashSet<String>,
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
            if w.number >= w.pager.max_pages {
                return Err(err(format!("stopped after {} pages (max_pages) and {} items; raise max_pages or narrow the query", w.number, w.items)));
            }
            w.number += 1;
            let parsed = w
                .pager
                .fetch_page(w.number, w.cursor.as_deref(), w.pager.page_size)
                .await?;
            let mut items = parsed.items;
            if w.items + items.len() > w.pager.max_items {
                items.truncate(w.pager.max_items - w.items);
                w.pending = Some(err(format!("stopped at {} items (max_items) on page {}; raise max_items or narrow the query", w.pager.max_items, w.number)));
            }
            w.items += items.len();
            match &parsed.next {
                None => w.done = true,
                Some(n) => {
                    if let Some(c) = &w.cursor {
                        w.seen.insert(c.clone());
                    }
                    if w.seen.contains(n) || w.cursor.as_deref() == Some(n.as_str()) {
                        w.pending.get_or_insert_with(|| err(format!("pagination loop: page {} points back to a page already read ({n:?})", w.number)));
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

    /// At most `limit` items from `cursor` (`None`: the start), for agent tools. Fetches only
    /// the pages needed, asking for pages of `min(limit, 100)` items (or the
    /// [`page_size`](Self::page_size)); `next_cursor` resumes exactly after the last item
    /// returned.
    ///
    /// # Errors
    /// As the walks: a failed page, a malformed page, a loop, a foreign next link, or a cursor
    /// that this method did not return.
    pub async fn page(&self, cursor: Option<&str>, limit: usize) -> Result<BoundedPage, Error> {
        let limit = limit.max(1);
        let mut at = match cursor {
            None => Resume {
                c: None,
                s: 0,
                l: self
                    .page_size
                    .unwrap_or_else(|| limit.min(BOUNDED_PAGE_SIZE)),
            },
            Some(c) => Resume::decode(c)?,
        };
        let mut items = Vec::new();
        let mut seen: HashSet<Option<String>> = HashSet::new();
        let mut number = 0;
        loop {
            if !seen.insert(at.c.clone()) {
                return Err(err(format!(
                    "pagination loop: the server sent cursor {:?} twice",
                    at.c
                )));
            }
            number += 1;
            let parsed = self.fetch_page(number, at.c.as_deref(), Some(at.l)).await?;
            let available = parsed.items.len().saturating_sub(at.s);
            let take = available.min(limit - items.len());
            items.extend(parsed.items.into_iter().skip(at.s).take(take));
            if take < available {
                // Stopped inside this page: resume from it, further in.
                let next = Resume {
                    c: at.c,
                    s: at.s + take,
                    l: at.l,
                };
                return Ok(BoundedPage {
                    items,
                    has_more: true,
                    next_cursor: Some(next.encode()),
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
                    };
                    if items.len() >= limit {
                        return Ok(BoundedPage {
                            items,
                            has_more: true,
                            next_cursor: Some(at.encode()),
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
