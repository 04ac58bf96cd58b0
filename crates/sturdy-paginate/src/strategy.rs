//! How an API pages: where the items are, and how to ask for the next page.

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Uri};
use serde_json::Value;
use sturdy_core::{Error, ErrorKind};

/// A page as it came back. Its `Debug` output shows the URI without userinfo or query, which
/// may hold a credential, and the headers' names without their values (a `Link` may carry a
/// signed URL or a password, a `Set-Cookie` a session).
#[derive(Clone)]
pub struct RawPage {
    /// 1-based page number within this walk.
    pub number: usize,
    /// The URI it was requested from.
    pub uri: Uri,
    /// The status (always 2xx here; other statuses stop the walk earlier).
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl std::fmt::Debug for RawPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawPage")
            .field("number", &self.number)
            .field("uri", &crate::shown(&self.uri.to_string()))
            .field("status", &self.status)
            .field("headers", &HeaderNames(&self.headers))
            .field("body", &self.body)
            .finish()
    }
}

/// A header map's names, each once, for `Debug`: its values may hold credentials.
struct HeaderNames<'a>(&'a HeaderMap);

impl std::fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl RawPage {
    /// The body as JSON, or a pagination error naming the page.
    ///
    /// # Errors
    /// When the body is not JSON.
    pub fn json(&self) -> Result<Value, Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::new(
                ErrorKind::Pagination,
                format!(
                    "page {} ({}) is not JSON: {e}",
                    self.number,
                    crate::short(self.uri.path())
                ),
            )
        })
    }

    /// The array at `pointer` (RFC 6901; "" for the whole body).
    ///
    /// # Errors
    /// When there is no array there.
    pub fn items_at(&self, json: &Value, pointer: &str) -> Result<Vec<Value>, Error> {
        match json.pointer(pointer) {
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(other) => Err(self.malformed(&format!(
                "{} is {}, not an array of items",
                show(pointer),
                kind(other)
            ))),
            None => Err(self.malformed(&format!("{} is missing", show(pointer)))),
        }
    }

    /// The array at `pointer`, taken out of `json` (an empty array is left there) rather than
    /// copied: read anything else you need from `json` (a next cursor, a total) first. A
    /// page's items are its bulk, and a copy would double the memory a large page peaks at.
    ///
    /// # Errors
    /// When there is no array there.
    pub fn take_items_at(&self, json: &mut Value, pointer: &str) -> Result<Vec<Value>, Error> {
        match json.pointer_mut(pointer) {
            Some(Value::Array(a)) => Ok(std::mem::take(a)),
            Some(other) => Err(self.malformed(&format!(
                "{} is {}, not an array of items",
                show(pointer),
                kind(other)
            ))),
            None => Err(self.malformed(&format!("{} is missing", show(pointer)))),
        }
    }

    /// A pagination error about this page.
    pub fn malformed(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Pagination,
            format!(
                "page {} ({}) is not the expected JSON: {what}",
                self.number,
                crate::short(self.uri.path())
            ),
        )
    }
}

fn show(pointer: &str) -> String {
    if pointer.is_empty() {
        "the body".to_owned()
    } else {
        format!("`{pointer}`")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a page holds: its items and where the next one is.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The items.
    pub items: Vec<Value>,
    /// The cursor of the next page, or `None` on the last page.
    pub next: Option<String>,
}

/// A pagination scheme. Implement it for an API that pages some other way.
///
/// A cursor is an opaque string that the strategy makes and reads: a server cursor, a next URL,
/// a page number, an offset.
pub trait PageStrategy: Send + Sync + 'static {
    /// The URI of the page at `cursor` (`None`: the first page), asking for `limit` items when the
    /// API lets the client choose.
    ///
    /// # Errors
    /// When the cursor cannot be turned into a URI.
    fn uri(&self, base: &Uri, cursor: Option<&str>, limit: Option<usize>) -> Result<Uri, Error>;

    /// Reads a page.
    ///
    /// # Errors
    /// When the page is not what the strategy expects.
    fn parse(
        &self,
        page: &RawPage,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Parsed, Error>;

    /// Whether cursors are URLs to follow (checked against the first page's origin).
    fn cursors_are_urls(&self) -> bool {
        false
    }

    /// Checks the strategy's configuration; [`PaginateBuilder::build`](crate::PaginateBuilder::build)
    /// calls it, so a mistake (a JSON pointer without its leading `/`, an empty parameter name)
    /// is reported when the pager is built, not on the first page.
    ///
    /// # Errors
    /// A [`sturdy_core::Error`] of kind `Config` that says what to change.
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A mistake found before any page is fetched: nothing was sent.
fn config(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_delivery(sturdy_core::Delivery::NotSent)
}

/// A JSON pointer (RFC 6901) is empty or starts with `/`, and `~` is followed by `0` or `1`.
fn check_pointer(what: &str, p: &str) -> Result<(), Error> {
    let escapes_ok = p
        .split('~')
        .skip(1)
        .all(|rest| rest.starts_with('0') || rest.starts_with('1'));
    if (p.is_empty() || p.starts_with('/')) && escapes_ok {
        Ok(())
    } else {
        Err(config(format!(
            "the {what} pointer {p:?} is not a JSON pointer (RFC 6901): use \"\" for the whole body or a path starting with '/', e.g. \"/data\""
        )))
    }
}

fn check_param(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        Err(config(format!("the {what} query parameter name is empty")))
    } else {
        Ok(())
    }
}

fn check_size(n: usize) -> Result<(), Error> {
    if n == 0 {
        Err(config(
            "the page size must be at least 1 (with_page_size(0))".to_owned(),
        ))
    } else {
        Ok(())
    }
}

/// Sets (or replaces) query parameters of `base`.
pub(crate) fn with_query(base: &Uri, set: &[(&str, String)]) -> Result<Uri, Error> {
    let set: Vec<(&str, &str)> = set.iter().map(|(k, v)| (*k, v.as_str())).collect();
    sturdy_core::query::set(base, &set).map_err(|e| {
        Error::new(ErrorKind::Pagination, "could not build the page URI").with_source(e)
    })
}

/// Whether a page of a numbered walk (page numbers, offsets) is the last: an empty page is;
/// with a total (at `total`), when the items seen so far reach it (a server may cap the page size
/// below what was asked, which makes every page look short); without one, a short page is.
/// The total at `pointer`, read before the items are taken out of the page (a total may sit
/// inside them, repeated on every row): the pointer and the number, if there is one.
fn read_total<'p>(json: &Value, pointer: Option<&'p str>) -> Option<(&'p str, Option<u64>)> {
    pointer.map(|p| (p, json.pointer(p).and_then(Value::as_u64)))
}

fn is_last(
    page: &RawPage,
    total: Option<(&str, Option<u64>)>,
    len: usize,
    size: usize,
    seen: usize,
) -> Result<bool, Error> {
    if len == 0 {
        return Ok(true);
    }
    match total {
        Some((_, Some(total))) => Ok(seen as u64 >= total),
        Some((p, None)) => Err(page.malformed(&format!("the total `{p}` is not a number"))),
        None => Ok(len < size),
    }
}

/// Cursor in a JSON body: items at one JSON pointer, the next cursor at another, sent back in a
/// query parameter. E.g. `{"data": \[...\], "next_cursor": "c40"}`.
#[derive(Debug, Clone)]
pub struct JsonCursor {
    items: String,
    next: String,
    cursor_param: String,
    limit_param: Option<String>,
}

impl JsonCursor {
    /// Items at `items`, the next cursor at `next` (JSON pointers), sent back as `?cursor=`;
    /// the page size is sent as `?limit=`.
    pub fn new(items: impl Into<String>, next: impl Into<String>) -> Self {
        Self {
            items: items.into(),
            next: next.into(),
            cursor_param: "cursor".into(),
            limit_param: Some("limit".into()),
        }
    }

    /// The query parameter that carries the cursor \[`cursor`\].
    #[must_use]
    pub fn with_cursor_param(mut self, name: impl Into<String>) -> Self {
        self.cursor_param = name.into();
        self
    }

    /// The query parameter for the page size \[`limit`\].
    #[must_use]
    pub fn with_limit_param(mut self, name: impl Into<String>) -> Self {
        self.limit_param = Some(name.into());
        self
    }

    /// The API has no page-size parameter: none is sent.
    #[must_use]
    pub fn without_limit_param(mut self) -> Self {
        self.limit_param = None;
        self
    }
}

impl PageStrategy for JsonCursor {
    fn uri(&self, base: &Uri, cursor: Option<&str>, limit: Option<usize>) -> Result<Uri, Error> {
        let mut set = Vec::new();
        if let Some(c) = cursor {
            set.push((self.cursor_param.as_str(), c.to_owned()));
        }
        if let (Some(p), Some(l)) = (&self.limit_param, limit) {
            set.push((p.as_str(), l.to_string()));
        }
        with_query(base, &set)
    }

    fn parse(&self, page: &RawPage, _: Option<&str>, _: Option<usize>) -> Result<Parsed, Error> {
        let mut json = page.json()?;
        let next = match json.pointer(&self.next) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(page.malformed(&format!(
                    "the next cursor `{}` is {}",
                    self.next,
                    kind(other)
                )))
            }
        };
        let items = page.take_items_at(&mut json, &self.items)?;
        Ok(Parsed { items, next })
    }

    fn validate(&self) -> Result<(), Error> {
        check_pointer("items", &self.items)?;
        check_pointer("next cursor", &self.next)?;
        check_param("cursor", &self.cursor_param)?;
        if let Some(p) = &self.limit_param {
            check_param("limit", p)?;
            if *p == self.cursor_param {
                return Err(config(format!(
                    "the cursor and limit query parameters are both {p:?}"
                )));
            }
        }
        Ok(())
    }
}

/// RFC 8288 `Link: <...>; rel="next"`: the cursor is the next URL (resolved against the page's
/// URI). Items are the array at a JSON pointer ("" for a body that is an array).
#[derive(Debug, Clone)]
pub struct LinkHeader {
    items: String,
    limit_param: Option<String>,
}

impl LinkHeader {
    /// Items at `items`. When a page size is set
    /// ([`PaginateBuilder::with_page_size`](crate::PaginateBuilder::with_page_size), or the
    /// limit of [`Paginate::page`](crate::Paginate::page)), the first page is asked for
    /// `?per_page=<size>`; without one, the first URL is sent as given. Later pages are the
    /// server's next links, as they are.
    pub fn new(items: impl Into<String>) -> Self {
        Self {
            items: items.into(),
            limit_param: Some("per_page".into()),
        }
    }

    /// The query parameter for the page size on the first page \[`per_page`\], sent only when a
    /// page size is set.
    #[must_use]
    pub fn with_limit_param(mut self, name: impl Into<String>) -> Self {
        self.limit_param = Some(name.into());
        self
    }

    /// The API has no page-size parameter: the first page is asked for as given.
    #[must_use]
    pub fn without_limit_param(mut self) -> Self {
        self.limit_param = None;
        self
    }
}

impl PageStrategy for LinkHeader {
    fn uri(&self, base: &Uri, cursor: Option<&str>, limit: Option<usize>) -> Result<Uri, Error> {
        match cursor {
            Some(url) => url.parse().map_err(|e| {
                Error::new(
                    ErrorKind::Pagination,
                    format!("the next link {:?} is not a valid URI", crate::shown(url)),
                )
                .with_source(e)
            }),
            None => match (&self.limit_param, limit) {
                (Some(p), Some(l)) => with_query(base, &[(p.as_str(), l.to_string())]),
                _ => Ok(base.clone()),
            },
        }
    }

    fn parse(&self, page: &RawPage, _: Option<&str>, _: Option<usize>) -> Result<Parsed, Error> {
        let mut json = page.json()?;
        let items = page.take_items_at(&mut json, &self.items)?;
        let next = sturdy_core::headers::next_link(&page.headers, &page.uri.to_string());
        Ok(Parsed { items, next })
    }

    fn cursors_are_urls(&self) -> bool {
        true
    }

    fn validate(&self) -> Result<(), Error> {
        check_pointer("items", &self.items)?;
        if let Some(p) = &self.limit_param {
            check_param("limit", p)?;
        }
        Ok(())
    }
}

/// Page numbers: `?page=1&per_page=20`, stopping on an empty or short page, or when a total
/// (at a JSON pointer) is reached.
#[derive(Debug, Clone)]
pub struct PageNumber {
    items: String,
    total: Option<String>,
    page_param: String,
    size_param: String,
    first: usize,
    page_size: usize,
}

impl PageNumber {
    /// Items at `items`; pages from 1, `?page=` and `?per_page=`, 20 per page.
    pub fn new(items: impl Into<String>) -> Self {
        Self {
            items: items.into(),
            total: None,
            page_param: "page".into(),
            size_param: "per_page".into(),
            first: 1,
            page_size: 20,
        }
    }

    /// The total number of items is at `pointer`; stop when it is reached. A page's number and
    /// length are all this strategy sees, so the items seen are counted as if every page so far
    /// held as many as this one: where the server serves fewer items per page than asked, the
    /// short last page counts low, and the walk asks for one more page (empty) before it stops.
    /// When every page but the last holds the same number of items (the size asked for, or the
    /// server's own cap), it never stops before the total (use [`OffsetLimit`] to stop exactly
    /// on the last page). A server whose pages vary in length (one that leaves rows out of a
    /// page after paging) can end the walk before the total, with items unread: this page's
    /// length times its number is then more than was read, and no page number can tell. Such
    /// an API is read safely by a cursor that does not count ([`JsonCursor`], [`LinkHeader`]).
    #[must_use]
    pub fn with_total(mut self, pointer: impl Into<String>) -> Self {
        self.total = Some(pointer.into());
        self
    }

    /// The parameter names \[`page`, `per_page`\].
    #[must_use]
    pub fn with_params(mut self, page: impl Into<String>, size: impl Into<String>) -> Self {
        self.page_param = page.into();
        self.size_param = size.into();
        self
    }

    /// The number of the first page \[1\].
    #[must_use]
    pub fn with_first_page(mut self, n: usize) -> Self {
        self.first = n;
        self
    }

    /// Items per page when the pager does not say \[20\]; at least 1 (checked when the pager is
    /// built).
    #[must_use]
    pub fn with_page_size(mut self, n: usize) -> Self {
        self.page_size = n;
        self
    }

    fn number(&self, cursor: Option<&str>) -> Result<usize, Error> {
        match cursor {
            None => Ok(self.first),
            Some(c) => c.parse().map_err(|_| {
                Error::new(ErrorKind::Pagination, format!("{c:?} is not a page number"))
            }),
        }
    }
}

impl PageStrategy for PageNumber {
    fn uri(&self, base: &Uri, cursor: Option<&str>, limit: Option<usize>) -> Result<Uri, Error> {
        let n = self.number(cursor)?;
        let size = limit.unwrap_or(self.page_size);
        with_query(
            base,
            &[
                (self.page_param.as_str(), n.to_string()),
                (self.size_param.as_str(), size.to_string()),
            ],
        )
    }

    fn parse(
        &self,
        page: &RawPage,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Parsed, Error> {
        let mut json = page.json()?;
        let total = read_total(&json, self.total.as_deref());
        let items = page.take_items_at(&mut json, &self.items)?;
        let n = self.number(cursor)?;
        let size = limit.unwrap_or(self.page_size);
        // Servers cap page sizes, so the size that counts is the one this page has. Were this the
        // short last page, the estimate is low, and the next page (empty) ends the walk.
        let seen = (n.saturating_add(1).saturating_sub(self.first)).saturating_mul(items.len());
        let last = is_last(page, total, items.len(), size, seen)?;
        let next = if last {
            None
        } else {
            n.checked_add(1).map(|n| n.to_string())
        };
        Ok(Parsed { items, next })
    }

    fn validate(&self) -> Result<(), Error> {
        check_pointer("items", &self.items)?;
        if let Some(t) = &self.total {
            check_pointer("total", t)?;
        }
        check_param("page", &self.page_param)?;
        check_param("page size", &self.size_param)?;
        if self.page_param == self.size_param {
            return Err(config(format!(
                "the page and page-size query parameters are both {:?}",
                self.page_param
            )));
        }
        check_size(self.page_size)
    }
}

/// Offset and limit: `?offset=0&limit=20`, stopping on an empty or short page, or at a total.
#[derive(Debug, Clone)]
pub struct OffsetLimit {
    items: String,
    total: Option<String>,
    offset_param: String,
    limit_param: String,
    page_size: usize,
}

impl OffsetLimit {
    /// Items at `items`; `?offset=` and `?limit=`, 20 per page.
    pub fn new(items: impl Into<String>) -> Self {
        Self {
            items: items.into(),
            total: None,
            offset_param: "offset".into(),
            limit_param: "limit".into(),
            page_size: 20,
        }
    }

    /// The total number of items is at `pointer`; stop on the page that reaches it (the offset
    /// and the page's length tell exactly how many items have been seen).
    #[must_use]
    pub fn with_total(mut self, pointer: impl Into<String>) -> Self {
        self.total = Some(pointer.into());
        self
    }

    /// The parameter names \[`offset`, `limit`\].
    #[must_use]
    pub fn with_params(mut self, offset: impl Into<String>, limit: impl Into<String>) -> Self {
        self.offset_param = offset.into();
        self.limit_param = limit.into();
        self
    }

    /// Items per page when the pager does not say \[20\]; at least 1 (checked when the pager is
    /// built).
    #[must_use]
    pub fn with_page_size(mut self, n: usize) -> Self {
        self.page_size = n;
        self
    }

    fn offset(cursor: Option<&str>) -> Result<usize, Error> {
        match cursor {
            None => Ok(0),
            Some(c) => c
                .parse()
                .map_err(|_| Error::new(ErrorKind::Pagination, format!("{c:?} is not an offset"))),
        }
    }
}

impl PageStrategy for OffsetLimit {
    fn uri(&self, base: &Uri, cursor: Option<&str>, limit: Option<usize>) -> Result<Uri, Error> {
        let offset = Self::offset(cursor)?;
        let size = limit.unwrap_or(self.page_size);
        with_query(
            base,
            &[
                (self.offset_param.as_str(), offset.to_string()),
                (self.limit_param.as_str(), size.to_string()),
            ],
        )
    }

    fn parse(
        &self,
        page: &RawPage,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Parsed, Error> {
        let mut json = page.json()?;
        let total = read_total(&json, self.total.as_deref());
        let items = page.take_items_at(&mut json, &self.items)?;
        let offset = Self::offset(cursor)?;
        let size = limit.unwrap_or(self.page_size);
        let next_offset = offset.saturating_add(items.len());
        let last = is_last(page, total, items.len(), size, next_offset)?;
        let next = (!last).then(|| next_offset.to_string());
        Ok(Parsed { items, next })
    }

    fn validate(&self) -> Result<(), Error> {
        check_pointer("items", &self.items)?;
        if let Some(t) = &self.total {
            check_pointer("total", t)?;
        }
        check_param("offset", &self.offset_param)?;
        check_param("limit", &self.limit_param)?;
        if self.offset_param == self.limit_param {
            return Err(config(format!(
                "the offset and limit query parameters are both {:?}",
                self.offset_param
            )));
        }
        check_size(self.page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_set_and_replaced() {
        let base: Uri = "http://h/orders?status=open&limit=5".parse().unwrap();
        let u = with_query(&base, &[("limit", "20".into()), ("cursor", "a b&c".into())]).unwrap();
        assert_eq!(u, "http://h/orders?status=open&limit=20&cursor=a+b%26c");
    }

    #[test]
    fn a_long_bad_next_link_is_quoted_short() {
        let base: Uri = "http://h/orders".parse().unwrap();
        let link = format!("https://h/{}\u{7f}é", "p".repeat(70_000));
        let err = LinkHeader::new("items")
            .uri(&base, Some(&link), None)
            .unwrap_err()
            .to_string();
        assert!(err.len() < 1_000, "{}", err.len());
        assert!(err.contains("bytes more"), "{err}");
        assert!(err.starts_with("the next link \"https://h/ppp"), "{err}");
    }
}
