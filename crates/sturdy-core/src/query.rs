//! Query parameters of a URI: set and look up, with `application/x-www-form-urlencoded` encoding.
//! One implementation for every layer that touches the query (API keys, version pins, page
//! cursors).

use http::Uri;

use crate::{Error, ErrorKind};

/// Whether `uri`'s query has a parameter `name`.
pub fn has(uri: &Uri, name: &str) -> bool {
    uri.query()
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == name))
}

/// `base` with each `(name, value)` of `set` set: an existing parameter of that name is replaced,
/// others are kept in order, new ones are appended.
///
/// # Errors
/// When the result is not a valid URI (it always is for a valid `base`; the error is for
/// completeness, never a panic).
///
/// ```
/// let u: http::Uri = "http://h/orders?status=open&limit=5".parse().unwrap();
/// let u = sturdy_core::query::set(&u, &[("limit", "20"), ("cursor", "a b&c")]).unwrap();
/// assert_eq!(u, "http://h/orders?status=open&limit=20&cursor=a+b%26c");
/// assert!(sturdy_core::query::has(&u, "cursor"));
/// ```
pub fn set(base: &Uri, set: &[(&str, &str)]) -> Result<Uri, Error> {
    let mut pairs: Vec<(String, String)> = base
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    for (k, v) in set {
        pairs.retain(|(pk, _)| pk != k);
        pairs.push(((*k).to_owned(), (*v).to_owned()));
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let path = if base.path().is_empty() {
        "/"
    } else {
        base.path()
    };
    let pq = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let invalid =
        |e: http::Error| Error::new(ErrorKind::Other, "could not build the URI").with_source(e);
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|e: http::uri::InvalidUri| invalid(e.into()))?,
    );
    Uri::from_parts(parts).map_err(|e| invalid(e.into()))
}
