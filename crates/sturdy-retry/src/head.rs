//! The request's head as the retry loop keeps it while a replay may follow.

use http::request::Parts;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use sturdy_core::Trace;

/// How many header values are kept in place, without an allocation: a JSON request at the
/// retry layer usually has two of its own (its content type, and for a POST the idempotency
/// key); the layers below add theirs (auth, version) to each attempt. Each slot adds 72 bytes
/// to every call's state, header or not.
const INLINE: usize = 2;

/// A request's head, kept for replays.
///
/// Why not `http::request::Parts`: each attempt but the last sends a copy, and http's
/// `HeaderMap` clone makes two allocations (its index and its entries) even for one header, on
/// every call that may be replayed. Here the first attempt sends the request's own map when it
/// has at most two values, and clones of the values are kept in place of the map (reference
/// counts, no allocation); a map is built again only for a replay, which is rare.
pub(crate) struct KeptHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Headers,
    extensions: Extensions,
}

enum Headers {
    /// The request's own map: before it was sent, or when it has too many values to keep in
    /// place.
    Map(HeaderMap),
    /// Clones of its values, in the map's order (a name with several values once per value),
    /// once the map itself went with an attempt.
    Few([Option<(HeaderName, HeaderValue)>; INLINE]),
}

impl KeptHead {
    pub(crate) fn new(head: Parts) -> Self {
        Self {
            method: head.method,
            uri: head.uri,
            version: head.version,
            headers: Headers::Map(head.headers),
            extensions: head.extensions,
        }
    }

    /// A request for an attempt after which a replay may follow: this head with its map (the
    /// first time, for a few values) or a copy of it.
    pub(crate) fn request<B>(&mut self, body: B) -> Request<B> {
        let mut r = Request::new(body);
        match &mut self.headers {
            // Nothing to keep: the new request's map, which allocates nothing until a layer
            // below adds a header.
            Headers::Map(map) if map.is_empty() => {}
            Headers::Map(map) if map.len() <= INLINE => {
                // The request's own map goes, swapped with the new request's empty one, which
                // the slots replace (one empty map dropped, not two: each drop costs as much as
                // a header's clone).
                std::mem::swap(r.headers_mut(), map);
                self.headers = Headers::Few([None, None]);
                if let Headers::Few(few) = &mut self.headers {
                    for (slot, (name, value)) in few.iter_mut().zip(r.headers().iter()) {
                        *slot = Some((name.clone(), value.clone()));
                    }
                }
            }
            Headers::Map(map) => *r.headers_mut() = map.clone(),
            Headers::Few(few) => {
                let mut map = HeaderMap::with_capacity(few.iter().flatten().count());
                for (name, value) in few.iter().flatten() {
                    map.append(name.clone(), value.clone());
                }
                *r.headers_mut() = map;
            }
        }
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.extensions_mut() = self.extensions.clone();
        r
    }

    /// A request for the last attempt: this head itself, which is left empty.
    pub(crate) fn take_request<B>(&mut self, body: B) -> Request<B> {
        let headers = match &mut self.headers {
            Headers::Map(map) => std::mem::take(map),
            Headers::Few(few) => {
                let mut map = HeaderMap::with_capacity(few.iter().flatten().count());
                for (name, value) in few.iter_mut().filter_map(Option::take) {
                    map.append(name, value);
                }
                map
            }
        };
        let mut r = Request::new(body);
        *r.method_mut() = std::mem::take(&mut self.method);
        *r.uri_mut() = std::mem::take(&mut self.uri);
        *r.version_mut() = self.version;
        *r.headers_mut() = headers;
        *r.extensions_mut() = std::mem::take(&mut self.extensions);
        r
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The first value of `name`, as `HeaderMap::get` gives it.
    pub(crate) fn header(&self, name: &HeaderName) -> Option<&HeaderValue> {
        match &self.headers {
            Headers::Map(map) => map.get(name),
            Headers::Few(few) => few
                .iter()
                .flatten()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v),
        }
    }

    pub(crate) fn trace(&self) -> Option<&Trace> {
        self.extensions.get::<Trace>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&'static str, &'static str)]) -> Parts {
        let mut b = Request::post("http://api.example.com/orders?x=1").version(Version::HTTP_2);
        for &(n, v) in headers {
            b = b.header(n, v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut().insert(7u32);
        r.into_parts().0
    }

    fn pairs(m: &HeaderMap) -> Vec<(String, String)> {
        m.iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    fn same<B>(r: &Request<B>, original: &Parts) {
        assert_eq!(r.method(), original.method);
        assert_eq!(r.uri(), &original.uri);
        assert_eq!(r.version(), original.version);
        assert_eq!(pairs(r.headers()), pairs(&original.headers));
        assert_eq!(r.extensions().get::<u32>(), Some(&7));
    }

    #[test]
    fn every_attempt_carries_the_whole_head_in_order() {
        for headers in [
            &[][..],
            &[("content-type", "application/json")][..],
            &[("a", "1"), ("a", "2")][..],
            &[("a", "1"), ("b", "2"), ("a", "3")][..],
            &[("a", "1"), ("b", "2"), ("a", "3"), ("idempotency-key", "k")][..],
        ] {
            let original = head(headers);
            for replays in 0..3 {
                let mut kept = KeptHead::new(head(headers));
                for _ in 0..replays {
                    same(&kept.request(()), &original);
                    for &(name, _) in headers {
                        assert_eq!(
                            kept.header(&HeaderName::from_static(name)),
                            original.headers.get(name)
                        );
                    }
                    assert_eq!(kept.header(&HeaderName::from_static("absent")), None);
                    assert_eq!(kept.method(), original.method);
                    assert_eq!(kept.uri(), &original.uri);
                }
                same(&kept.take_request(()), &original);
            }
        }
    }
}
