//! Choosing the key a limiter or breaker keeps its state under.

use std::borrow::Cow;

use http::{HeaderValue, Request, Uri};

/// Chooses the key of a request: the host by default ([`ByHost`]), or any function of the request
/// (`Fn(&Request<B>) -> String`), e.g. per API token or per tenant.
///
/// A key is not a secret to the layers: it is written in their logs and error messages (`rate
/// limited by <key>`, `circuit open for <key>`) and, with a Redis backend, in the store's key
/// names (never in metric labels). Per credential, derive the key from it (the credential's id,
/// the tenant, a hash of the token), never return the credential itself.
pub trait KeyExtractor<B> {
    /// The key of `req`.
    fn key<'r>(&self, req: &'r Request<B>) -> Cow<'r, str>;
}

/// One key per host: [`host`] of the request (the URI's authority without a `user:password@`
/// part, else the `Host` header's, else the empty string), in lower case ([`host_key`]): a host name is case-insensitive (RFC 3986), so
/// `https://API.example.com/` and `https://api.example.com/` share one quota, breaker and budget.
/// The port is part of the key as written (`api.example.com` and `api.example.com:443` are two
/// keys).
///
/// ```
/// use http::Request;
/// use sturdy_core::{ByHost, KeyExtractor};
///
/// let req = Request::get("https://user:pw@API.Example.com:8443/v1").body(()).unwrap();
/// assert_eq!(ByHost.key(&req), "api.example.com:8443");
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ByHost;

impl<B> KeyExtractor<B> for ByHost {
    #[inline]
    fn key<'r>(&self, req: &'r Request<B>) -> Cow<'r, str> {
        host_key_of(req)
    }
}

/// The key a host is kept under: `host` in ASCII lower case, borrowed when it is already (the
/// common case: no allocation). Host names are case-insensitive (RFC 3986, section 3.2.2), and a
/// quota or a breaker split by how a URI happened to be written would let through more than
/// the host allows.
///
/// ```
/// use sturdy_core::key::host_key;
///
/// assert_eq!(host_key("api.example.com:8443"), "api.example.com:8443");
/// assert_eq!(host_key("API.Example.COM"), "api.example.com");
/// ```
#[inline]
pub fn host_key(host: &str) -> Cow<'_, str> {
    if has_upper(host.as_bytes()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> String,
{
    fn key<'r>(&self, req: &'r Request<B>) -> Cow<'r, str> {
        Cow::Owned(self(req))
    }
}

/// [`host_key`] of [`host`]`(req)`: the key of a request's host, which every keyed layer and the
/// retry budget take on every call. An authority with neither a `user:password@` part nor a
/// capital (nearly every one) is found so in one pass, eight bytes at a time, and borrowed.
///
/// ```
/// use http::Request;
/// use sturdy_core::key::host_key_of;
///
/// let req = Request::get("https://user:pw@API.Example.com/v1").body(()).unwrap();
/// assert_eq!(host_key_of(&req), "api.example.com");
/// ```
#[inline]
pub fn host_key_of<B>(req: &Request<B>) -> Cow<'_, str> {
    match req.uri().authority() {
        Some(a) => {
            let a = a.as_str();
            if any_word(a.as_bytes(), |w| word_has_at(w) | word_has_upper(w)) {
                host_key(without_userinfo(a))
            } else {
                Cow::Borrowed(a)
            }
        }
        None => host_key(host_header(req.headers().get(http::header::HOST))),
    }
}

/// `key` as a layer keeps it: [`host_key`] of it when the layer's keys are hosts (its default
/// key, [`ByHost`]), else as given (a key chosen with `with_key(..)` is the caller's, case and
/// all). The layers' handles look keys up through this, so that a breaker, a limit or a pause
/// of `https://api.example.com/` is found under `"API.example.com"` too.
///
/// ```
/// use sturdy_core::key::stored_key;
///
/// assert_eq!(stored_key("API.example.com", true), "api.example.com");
/// assert_eq!(stored_key("Tenant-A", false), "Tenant-A");
/// ```
#[inline]
pub fn stored_key(key: &str, keys_are_hosts: bool) -> Cow<'_, str> {
    if keys_are_hosts {
        host_key(key)
    } else {
        Cow::Borrowed(key)
    }
}

/// The host of a request: the URI's authority (host and port, never the `user:password@` part,
/// which would put a secret in keys, messages and logs), else the authority the `Host` header
/// starts with ([`host_header`]), else `""`.
#[inline]
pub fn host<B>(req: &Request<B>) -> &str {
    // The header is looked up only when the URI has no authority: a lookup hashes the name and
    // probes the map, about 80 instructions, on every call of several layers (callgrind).
    match req.uri().authority() {
        Some(a) => without_userinfo(a.as_str()),
        None => host_header(req.headers().get(http::header::HOST)),
    }
}

/// [`host`] of a request kept in parts: the authority of `uri` without a `user:password@` part,
/// else [`host_header`] of the request's `Host` header `host`.
///
/// ```
/// use http::{HeaderValue, Uri};
/// use sturdy_core::key::uri_host;
///
/// let host = HeaderValue::from_static("api.example.com?api_key=SECRET");
/// assert_eq!(uri_host(&Uri::from_static("/v1/orders"), Some(&host)), "api.example.com");
/// let uri = Uri::from_static("https://user:pw@api.example.com:8443/v1");
/// assert_eq!(uri_host(&uri, None), "api.example.com:8443");
/// ```
#[inline]
pub fn uri_host<'a>(uri: &'a Uri, host: Option<&'a HeaderValue>) -> &'a str {
    match uri.authority() {
        Some(a) => without_userinfo(a.as_str()),
        None => host_header(host),
    }
}

/// The host and port a `Host` header names, for keys, messages, logs and metric labels: the
/// authority it starts with, cut at the first byte an authority cannot hold (`/`, `?`, `#`,
/// spaces, ...), without a `user:password@` part; `""` when there is no header or it is not
/// text. A `Host` header is only a host and a port (RFC 9110), so a path or query in it (where a
/// careless caller may put a token) is never taken into a key or shown.
///
/// ```
/// use http::HeaderValue;
/// use sturdy_core::key::host_header;
///
/// let h = HeaderValue::from_static("api.example.com:8443/v1?api_key=SECRET");
/// assert_eq!(host_header(Some(&h)), "api.example.com:8443");
/// let h = HeaderValue::from_static("user:pw@api.example.com");
/// assert_eq!(host_header(Some(&h)), "api.example.com");
/// assert_eq!(host_header(None), "");
/// ```
pub fn host_header(value: Option<&HeaderValue>) -> &str {
    let Some(raw) = value.and_then(|h| h.to_str().ok()) else {
        return "";
    };
    let raw = raw.trim_start_matches([' ', '\t']);
    // RFC 3986 authority: unreserved, pct-encoded, sub-delims, ':', '@', '[' and ']'.
    let end = raw
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@[]".contains(&b)))
        .unwrap_or(raw.len());
    without_userinfo(&raw[..end])
}

/// The idempotency key a header value holds: `None` when the header is missing or blank (empty,
/// or only spaces and tabs). A blank key names no operation, so no server can deduplicate on it:
/// the client idempotency layer replaces it with a fresh key, and the retry layer does not count
/// it as a key (a POST carrying one is not retried, and no error names it).
///
/// ```
/// use http::HeaderValue;
/// use sturdy_core::key::idempotency_key;
///
/// let key = HeaderValue::from_static("order-1");
/// assert_eq!(idempotency_key(Some(&key)), Some(&key));
/// assert_eq!(idempotency_key(Some(&HeaderValue::from_static(" \t"))), None);
/// assert_eq!(idempotency_key(None), None);
/// ```
pub fn idempotency_key(value: Option<&HeaderValue>) -> Option<&HeaderValue> {
    value.filter(|v| v.as_bytes().iter().any(|b| !matches!(b, b' ' | b'\t')))
}

/// `authority` without a `user:password@` part. A plain loop: authorities are short, and this
/// runs on every call.
#[inline]
pub fn without_userinfo(authority: &str) -> &str {
    if !has_at(authority.as_bytes()) {
        return authority;
    }
    match authority.bytes().rposition(|b| b == b'@') {
        // '@' is ASCII: the index is a char boundary.
        Some(i) => &authority[i + 1..],
        None => authority,
    }
}

/// Whether `s` holds an '@', eight bytes at a time: this runs for every call in several layers,
/// and authorities are too short for `memchr`'s setup to pay off.
#[inline]
fn has_at(s: &[u8]) -> bool {
    any_word(s, word_has_at)
}

/// Whether `s` holds an ASCII capital, eight bytes at a time (every keyed layer asks this of
/// the host on every call).
#[inline]
fn has_upper(s: &[u8]) -> bool {
    any_word(s, word_has_upper)
}

/// Whether one of the eight bytes of `w` is an '@'.
#[inline(always)]
fn word_has_at(w: u64) -> bool {
    const ATS: u64 = u64::from_ne_bytes([b'@'; 8]);
    // A byte of `x` is zero exactly where the eight bytes hold an '@'.
    let x = w ^ ATS;
    x.wrapping_sub(ONES) & !x & HIGHS != 0
}

/// Whether one of the eight bytes of `w` is an ASCII capital.
#[inline(always)]
fn word_has_upper(w: u64) -> bool {
    const LOW7: u64 = u64::from_ne_bytes([0x7f; 8]);
    // Per byte, with the high bit cleared (`t`): 0x7f + '[' - t keeps its high bit exactly when
    // t < '[', and t + 0x7f - '@' sets it exactly when t > '@'; no byte borrows or carries into
    // the next. `!w` drops the bytes whose own high bit is set (not ASCII).
    const BELOW: u64 = u64::from_ne_bytes([0x7f + b'['; 8]);
    const ABOVE: u64 = u64::from_ne_bytes([0x7f - b'@'; 8]);
    let t = w & LOW7;
    (BELOW - t) & !w & (t + ABOVE) & HIGHS != 0
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Whether `word_has` holds for one of the 8-byte words that cover `s`. A string of eight
/// bytes or fewer is read as one word padded with zero bytes (which neither test matches); a
/// longer one ends with its last eight bytes, overlapping the words read already: no
/// byte-by-byte tail.
#[inline(always)]
fn any_word(s: &[u8], word_has: impl Fn(u64) -> bool) -> bool {
    let n = s.len();
    if n <= 8 {
        let mut w = [0u8; 8];
        w[..n].copy_from_slice(s);
        return word_has(u64::from_ne_bytes(w));
    }
    let at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_ne_bytes(w)
    };
    let mut i = 0;
    while i + 8 < n {
        if word_has(at(i)) {
            return true;
        }
        i += 8;
    }
    word_has(at(n - 8))
}

#[cfg(test)]
mod tests {
    #[test]
    fn has_at_finds_an_at_anywhere() {
        assert!(!super::has_at(b""));
        assert!(!super::has_at(b"api.example.com:8443"));
        for len in 1..40 {
            for at in 0..len {
                let mut s = vec![b'a'; len];
                s[at] = b'@';
                assert!(super::has_at(&s), "len {len}, '@' at {at}");
            }
            // Bytes next to '@' (0x3f, 0x41) and with the high bit set are not '@'.
            let near: Vec<u8> = (0..len).map(|i| [0x3f, 0x41, 0xc0, 0x80][i % 4]).collect();
            assert!(!super::has_at(&near), "len {len}");
        }
    }

    #[test]
    fn has_upper_finds_a_capital_anywhere_and_nothing_else() {
        let naive = |s: &[u8]| s.iter().any(u8::is_ascii_uppercase);
        for len in 0..40 {
            for pos in 0..len {
                // Every byte value at every position, among lower-case letters and among bytes
                // with the high bit set.
                for b in 0..=255u8 {
                    for fill in [b'a', 0xff, b'@', b'['] {
                        let mut s = vec![fill; len];
                        s[pos] = b;
                        assert_eq!(super::has_upper(&s), naive(&s), "{s:?}");
                    }
                }
            }
        }
        // Seeded random strings of every byte.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 33) as usize;
            let s: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 7) >> 3) as u8)
                .collect();
            assert_eq!(super::has_upper(&s), naive(&s), "{s:?}");
        }
    }

    #[test]
    fn host_key_of_is_the_lower_case_host() {
        for uri in [
            "http://a/",
            "http://api.example.com/",
            "http://API.example.com:8443/x",
            "http://u:p@api.example.com/",
            "http://U:P@Api.Example.Com/",
            "http://u:p@a/",
            "http://[::1]:8080/",
            "http://[FE80::1]:8080/",
            "http://a-very-long-host-name-of-more-than-two-words.example.com:65535/",
            "http://a-very-long-host-name-of-more-than-two-words.example.coM/",
            "http://user@a-very-long-host-name-of-more-than-two-words.example.com/",
        ] {
            let req = http::Request::get(uri).body(()).unwrap();
            let key = super::host_key_of(&req);
            assert_eq!(key, super::host(&req).to_ascii_lowercase(), "{uri}");
            let lower_already = super::host(&req) == super::host(&req).to_ascii_lowercase();
            assert_eq!(
                matches!(key, std::borrow::Cow::Borrowed(_)),
                lower_already,
                "{uri}"
            );
        }
        let mut req = http::Request::get("/x").body(()).unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "U:P@Api.Example.com/x".parse().unwrap());
        assert_eq!(super::host_key_of(&req), "api.example.com");
    }

    use super::*;

    #[test]
    fn a_host_header_gives_its_authority_only() {
        let cases = [
            ("api.example.com", "api.example.com"),
            ("api.example.com:8443", "api.example.com:8443"),
            ("[::1]:8080", "[::1]:8080"),
            ("api.example.com:8443/p?q=SECRET", "api.example.com:8443"),
            ("api.example.com?k=SECRET", "api.example.com"),
            ("api.example.com#SECRET", "api.example.com"),
            ("api.example.com/x@evil.test", "api.example.com"),
            ("u:SECRET@api.example.com/x", "api.example.com"),
            ("  api.example.com other", "api.example.com"),
            ("/only-a-path", ""),
            ("", ""),
        ];
        for (value, want) in cases {
            let v = HeaderValue::from_str(value).unwrap();
            assert_eq!(host_header(Some(&v)), want, "{value:?}");
            let r = Request::get("/x").header("host", value).body(()).unwrap();
            assert_eq!(host(&r), want, "{value:?}");
        }
        let not_text = HeaderValue::from_bytes(b"api.\xffexample.com").unwrap();
        assert_eq!(host_header(Some(&not_text)), "");
    }

    #[test]
    fn by_host_and_closures() {
        let r = Request::get("http://api.example.com:8080/x")
            .body(())
            .unwrap();
        assert_eq!(ByHost.key(&r), "api.example.com:8080");
        let r = Request::get("/x")
            .header("host", "h.example")
            .body(())
            .unwrap();
        assert_eq!(ByHost.key(&r), "h.example");
        let r2 = Request::get("https://user:s3cr3t@api.example.com:8443/x")
            .body(())
            .unwrap();
        assert_eq!(ByHost.key(&r2), "api.example.com:8443");
        let by_path = |r: &Request<()>| r.uri().path().to_owned();
        assert_eq!(by_path.key(&r), "/x");
    }
}
