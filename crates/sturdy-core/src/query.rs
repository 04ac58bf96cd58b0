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

/// `base` with each `(name, value)` of `set` set: an existing parameter of that name is removed
/// and the new one appended; every other pair of the query is kept exactly as it was (a
/// pre-signed URL or a binary value such as `%9A` arrives as the caller wrote it). A pair added
/// to an empty query (`/x?`) or after a trailing `&` gets no `&` of its own.
///
/// # Errors
/// When the result is not a valid URI (it always is for a valid `base`; the error is for
/// completeness, never a panic).
///
/// ```
/// let u: http::Uri = "http://h/orders?status=open&limit=5&sig=%9A%2F".parse().unwrap();
/// let u = sturdy_core::query::set(&u, &[("limit", "20"), ("cursor", "a b&c")]).unwrap();
/// assert_eq!(u, "http://h/orders?status=open&sig=%9A%2F&limit=20&cursor=a+b%26c");
/// assert!(sturdy_core::query::has(&u, "cursor"));
///
/// let u: http::Uri = "http://h/orders?".parse().unwrap();
/// let u = sturdy_core::query::set(&u, &[("api-version", "2")]).unwrap();
/// assert_eq!(u, "http://h/orders?api-version=2");
/// ```
pub fn set(base: &Uri, set: &[(&str, &str)]) -> Result<Uri, Error> {
    let mut query = String::new();
    let mut first = true;
    let mut push = |segment: &str| {
        if !first {
            query.push('&');
        }
        first = false;
        query.push_str(segment);
    };
    if let Some(q) = base.query() {
        for segment in q.split('&') {
            let name = segment.split('=').next().unwrap_or_default();
            if !set.iter().any(|(k, _)| name_is(name, k)) {
                // The caller's bytes, untouched.
                push(segment);
            }
        }
    }
    for (k, v) in set {
        let pair = form_urlencoded::Serializer::new(String::new())
            .append_pair(k, v)
            .finish();
        // After an empty query (`/x?`) or a trailing `&`, no separator of our own: the pair
        // would otherwise follow an empty one (`?&k=v`).
        if query.is_empty() || query.ends_with('&') {
            query.push_str(&pair);
        } else {
            query.push('&');
            query.push_str(&pair);
        }
    }
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

/// Whether the raw (still encoded) parameter name `raw` decodes to `name`.
fn name_is(raw: &str, name: &str) -> bool {
    if raw == name {
        return true;
    }
    if !raw.contains(['%', '+']) {
        return false;
    }
    form_urlencoded::parse(raw.as_bytes())
        .next()
        .is_some_and(|(k, _)| k == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_bytes_arrive_as_written() {
        let u: Uri = "http://h/p?b=%9A%FF&x=1&x=2&&c=a+b&%6Bey=old&flag"
            .parse()
            .unwrap();
        let out = set(&u, &[("key", "v"), ("x", "3")]).unwrap();
        assert_eq!(out, "http://h/p?b=%9A%FF&&c=a+b&flag&key=v&x=3");
        let u: Uri = "http://h".parse().unwrap();
        assert_eq!(set(&u, &[("k", "v")]).unwrap(), "http://h/?k=v");
        let u: Uri = "http://h/?&a=1".parse().unwrap();
        assert_eq!(set(&u, &[("k", "v")]).unwrap(), "http://h/?&a=1&k=v");
        // A pre-signed URL keeps its signature byte for byte.
        let u: Uri = "https://b.example/o?X-Sig=ab%2Bcd%3D%3D&X-Exp=60"
            .parse()
            .unwrap();
        assert_eq!(
            set(&u, &[("api-version", "2")]).unwrap(),
            "https://b.example/o?X-Sig=ab%2Bcd%3D%3D&X-Exp=60&api-version=2"
        );
    }
}
