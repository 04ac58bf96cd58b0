//! The client side: one key per logical operation, kept across retries.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Method, Request};
use sha2::{Digest, Sha256};
use sturdy_core::trace::TraceEvent;
use sturdy_core::{CallOptions, Trace};
use tower::{Layer, Service};

/// Sets `Idempotency-Key` to a fresh random UUID v4 on each POST and PATCH (configurable), unless
/// the caller already set one (a blank one, empty or only spaces and tabs, counts as none and is
/// replaced; blank lines next to a key of the caller's are dropped and the key kept), or gave one for this request in
/// [`CallOptions::with_idempotency_key`](sturdy_core::CallOptions::with_idempotency_key). Place it **outside** the retry layer: the key is set once per
/// logical call, and every retry sends the same key. The key is never derived from the payload,
/// so two deliberate identical orders stay two orders.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use http::{Request, Response};
/// use sturdy_idempotency::client::IdempotencyKeyLayer;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// let api = service_fn(|req: Request<()>| async move {
///     let key = req.headers()["idempotency-key"].to_str().unwrap().to_owned();
///     Ok::<_, std::convert::Infallible>(Response::new(key))
/// });
/// let client = ServiceBuilder::new().layer(IdempotencyKeyLayer::new()).service(api);
/// let key = client.oneshot(Request::post("http://api.example.com/orders").body(()).unwrap()).await.unwrap().into_body();
/// assert_eq!(uuid::Uuid::parse_str(&key).unwrap().get_version_num(), 4);
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct IdempotencyKeyLayer {
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    header: HeaderName,
    methods: Vec<Method>,
}

impl Default for IdempotencyKeyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl IdempotencyKeyLayer {
    /// Keys on POST and PATCH, in `Idempotency-Key`.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                header: HeaderName::from_static("idempotency-key"),
                methods: vec![Method::POST, Method::PATCH],
            }),
        }
    }

    /// The header to set \[`Idempotency-Key`\].
    pub fn with_header(self, header: HeaderName) -> Self {
        Self {
            config: Arc::new(Config {
                header,
                methods: self.config.methods.clone(),
            }),
        }
    }

    /// The header the keys go in.
    pub fn header(&self) -> &HeaderName {
        &self.config.header
    }

    /// The methods that get a key \[POST, PATCH\].
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        Self {
            config: Arc::new(Config {
                header: self.config.header.clone(),
                methods: methods.into_iter().collect(),
            }),
        }
    }
}

impl<S> Layer<S> for IdempotencyKeyLayer {
    type Service = IdempotencyKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyKey {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The header value of a key given in [`CallOptions`]: the key itself, or, when no header value
/// can carry it as it is, `sturdy-sha256-` and the hex SHA-256 of the key. A header value cannot
/// hold a control character (CR, LF, NUL, DEL), and one that begins or ends with a space or a tab
/// loses them on the way (HTTP parsers strip them, so ` order-9 ` would arrive as `order-9`, the
/// same key as another). A tab inside is a control character too: HTTP lets a header carry it,
/// but many servers refuse such a key (sturdy's own server layer answers 400), so it goes as a
/// digest as well. The same key always gives the same value, so a caller that sends a
/// request again with its key still names the same request (a random key instead would make
/// every resend a new request). A digest rather than an escaped form: every string a header can
/// carry is a key someone may give as it is, so an escaped `a\r\nb` (`a%0D%0Ab`) would be sent
/// exactly as the key `a%0D%0Ab` is, and a server would answer the second request with the first
/// one's response; a digest is the same as another key only if that key spells out this digest.
/// The value sent is the key a failed call reports, and giving it again names the same request.
fn given_key(key: &str) -> HeaderValue {
    // An empty key would arrive as no key at all: it is sent as its digest too. A tab anywhere
    // (at an end it would be stripped, inside it is a control character) and a space at an end
    // send the digest; `HeaderValue` refuses every other control character.
    if !key.is_empty() && !key.starts_with(' ') && !key.ends_with(' ') && !key.contains('\t') {
        if let Ok(v) = HeaderValue::from_str(key) {
            return v;
        }
    }
    tracing::warn!(
        "an idempotency key given in CallOptions is empty, or holds control characters or spaces at an end, which no header carries: sent as its SHA-256 digest"
    );
    let digest = Sha256::digest(key.as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(DIGEST_PREFIX.len() + 64);
    out.extend_from_slice(DIGEST_PREFIX.as_bytes());
    for b in digest {
        out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
    }
    HeaderValue::from_bytes(&out).expect("a prefix and hex digits")
}

/// What a digest key starts with.
const DIGEST_PREFIX: &str = "sturdy-sha256-";

/// The service made by the client [`IdempotencyKeyLayer`]. `poll_ready` is the inner service's.
#[derive(Debug, Clone)]
pub struct IdempotencyKey<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyKey<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for IdempotencyKey<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // A blank key header names no operation (no server can deduplicate on it): it is
        // replaced like a missing one.
        if sturdy_core::key::idempotency_key(req.headers().get(&self.config.header)).is_none() {
            // A blank first line before a key of the caller's (two header lines): the blank
            // ones are dropped and the caller's key kept, first, where every layer reads it.
            let kept: Vec<HeaderValue> = req
                .headers()
                .get_all(&self.config.header)
                .iter()
                .filter(|v| sturdy_core::key::idempotency_key(Some(v)).is_some())
                .cloned()
                .collect();
            if !kept.is_empty() {
                let headers = req.headers_mut();
                headers.remove(&self.config.header);
                for v in kept {
                    headers.append(self.config.header.clone(), v);
                }
                return self.inner.call(req);
            }
            let given = CallOptions::of(&req)
                .and_then(CallOptions::idempotency_key)
                .map(given_key);
            let value = match given {
                Some(v) => Some(v),
                None if self.config.methods.contains(req.method()) => {
                    // Formatted on the stack, then owned by one reference-counted allocation:
                    // the retry layer's copy of the head for a replay only counts a reference
                    // (a value copied from a slice would be moved into a second allocation on
                    // its first clone).
                    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
                    Some(
                        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
                            .expect("a UUID is a valid header value"),
                    )
                }
                None => None,
            };
            if let Some(value) = value {
                if let Some(t) = Trace::of(&req) {
                    if let Ok(k) = std::str::from_utf8(value.as_bytes()) {
                        t.record(TraceEvent::IdempotencyKey(k.to_owned()));
                    }
                }
                req.headers_mut().insert(self.config.header.clone(), value);
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::given_key;

    #[test]
    fn a_given_key_is_kept_or_sent_as_its_digest_the_same_every_time() {
        assert_eq!(given_key("order-1"), "order-1");
        assert_eq!(given_key("50% é"), "50% é".as_bytes());
        assert_eq!(given_key("a%0D%0Ab"), "a%0D%0Ab");
        // SHA-256 of "a\r\nb".
        let d = given_key("a\r\nb");
        assert_eq!(d, given_key("a\r\nb"));
        assert_ne!(d, given_key("a%0D%0Ab"));
        assert_eq!(
            d,
            "sturdy-sha256-18745f36a05e29072709042d6062ce54f1b08ff36c27ba80c39f81fb010c8ce2"
        );
        // A tab inside: a header may carry it, many servers refuse it.
        assert!(given_key("a\tb")
            .to_str()
            .unwrap()
            .starts_with("sturdy-sha256-"));
        assert!(given_key("\u{7f}\t")
            .to_str()
            .unwrap()
            .starts_with("sturdy-sha256-"));
        // The value sent is a key that is sent as it is when given again.
        assert_eq!(given_key(d.to_str().unwrap()), d);
        // An empty key would arrive as none: its digest, the same every time.
        assert_eq!(
            given_key(""),
            "sturdy-sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn a_blank_key_header_is_replaced_by_a_fresh_key() {
        use super::IdempotencyKeyLayer;
        use http::Request;
        use tower::{service_fn, Layer, ServiceExt};
        let svc = IdempotencyKeyLayer::new().layer(service_fn(|req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(
                req.headers()
                    .get_all("idempotency-key")
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        }));
        for blank in ["", " ", "\t \t"] {
            let req = Request::post("http://a.test/")
                .header("idempotency-key", blank)
                .body(())
                .unwrap();
            let sent = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(sent.len(), 1, "{blank:?}");
            assert!(
                uuid::Uuid::parse_str(sent[0].to_str().unwrap()).is_ok(),
                "{blank:?} gave {sent:?}"
            );
        }
        // A key that is not blank is kept as it is.
        let req = Request::post("http://a.test/")
            .header("idempotency-key", "order-1")
            .body(())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap(), ["order-1"]);
        // A blank line before the caller's key: the blank one goes, the key stays, first.
        let mut req = Request::post("http://a.test/").body(()).unwrap();
        for v in ["", "order-9", " "] {
            req.headers_mut()
                .append("idempotency-key", http::HeaderValue::from_static(v));
        }
        assert_eq!(svc.oneshot(req).await.unwrap(), ["order-9"]);
    }
}
