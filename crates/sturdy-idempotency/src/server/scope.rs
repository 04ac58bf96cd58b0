use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{header, HeaderName};
use sha2::{Digest, Sha256};

/// Chooses the client scope of a key from the request head: two requests share a key space
/// only when their scopes are equal, so one client can never be answered with another's
/// stored response.
///
/// The layer hashes what `scope` returns (SHA-256) before it reaches the store, so a scope may
/// be built from secrets, and its length does not matter.
///
/// Closures `Fn(&http::request::Parts) -> String` are scopes, so a scope can come from
/// anything in the head, including extensions another layer set (an mTLS peer identity, an
/// authenticated user id):
///
/// ```
/// use http::request::Parts;
/// use sturdy_idempotency::server::{IdempotencyLayer, MemoryStore};
///
/// /// Set by the TLS acceptor for each connection.
/// #[derive(Clone)]
/// struct PeerCertificate { subject: String }
///
/// let layer = IdempotencyLayer::new(MemoryStore::default(), |head: &Parts| {
///     match head.extensions.get::<PeerCertificate>() {
///         Some(peer) => format!("mtls:{}", peer.subject),
///         None => "anonymous".to_owned(),
///     }
/// });
/// # let _ = layer;
/// ```
pub trait Scope: Send + Sync + 'static {
    /// The scope of the request's client (a credential, a tenant, a peer identity).
    fn scope(&self, head: &Parts) -> String;
}

impl<F> Scope for F
where
    F: Fn(&Parts) -> String + Send + Sync + 'static,
{
    fn scope(&self, head: &Parts) -> String {
        self(head)
    }
}

/// The default scope: the credentials the request carries.
///
/// By default these headers, each with every value, in this order: `Authorization`,
/// `Proxy-Authorization`, `X-API-Key`, `API-Key`, `X-Auth-Token`, `X-Access-Token` and
/// `Cookie`. Two requests share a key space only when all of them are equal; a request with
/// none of them is in the shared `anonymous` scope. Only a SHA-256 hash of the credentials is
/// kept, never the credentials.
///
/// With cookies, the whole `Cookie` header is the credential by default, so a client whose
/// other cookies change between two retries (an analytics cookie) gets a new scope and runs
/// again. Name the session cookies with [`with_cookies`](Self::with_cookies) to scope by them
/// alone.
///
/// ```
/// use http::HeaderName;
/// use sturdy_idempotency::server::ByCredentials;
///
/// // An API that authenticates with its own header, and a web app with a session cookie.
/// let api = ByCredentials::headers([HeaderName::from_static("x-customer-token")]);
/// let web = ByCredentials::default().with_cookies(["session_id"]);
/// # let _ = (api, web);
/// ```
#[derive(Clone)]
pub struct ByCredentials {
    headers: Arc<[HeaderName]>,
    cookies: Option<Arc<[String]>>,
}

impl fmt::Debug for ByCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: no credential ever reaches Debug output.
        f.debug_struct("ByCredentials")
            .field("headers", &self.headers)
            .field("cookies", &self.cookies)
            .finish()
    }
}

impl Default for ByCredentials {
    fn default() -> Self {
        Self::headers([
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("api-key"),
            HeaderName::from_static("x-auth-token"),
            HeaderName::from_static("x-access-token"),
            header::COOKIE,
        ])
    }
}

impl ByCredentials {
    /// Scopes by these headers only (all their values).
    pub fn headers(headers: impl IntoIterator<Item = HeaderName>) -> Self {
        Self {
            headers: headers.into_iter().collect(),
            cookies: None,
        }
    }

    /// Reads only these cookies from `Cookie` (by name, each with its value), instead of the
    /// whole header. `Cookie` is read even when it is not among the headers.
    #[must_use]
    pub fn with_cookies<I, T>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.cookies = Some(names.into_iter().map(Into::into).collect());
        self
    }
}

impl Scope for ByCredentials {
    fn scope(&self, head: &Parts) -> String {
        let mut h = Sha256::new();
        h.update(b"sturdy-idempotency credentials\0");
        let mut any = false;
        for name in self.headers.iter() {
            if self.cookies.is_some() && name == header::COOKIE {
                continue;
            }
            for v in head.headers.get_all(name) {
                any = true;
                h.update(name.as_str().as_bytes());
                h.update(b":");
                h.update((v.len() as u64).to_be_bytes());
                h.update(v.as_bytes());
            }
        }
        if let Some(names) = &self.cookies {
            for v in head.headers.get_all(header::COOKIE) {
                for pair in v.as_bytes().split(|&b| b == b';') {
                    let pair = pair.trim_ascii();
                    let (name, value) = match pair.iter().position(|&b| b == b'=') {
                        Some(i) => (&pair[..i], &pair[i + 1..]),
                        None => continue,
                    };
                    if names.iter().any(|n| n.as_bytes() == name) {
                        any = true;
                        h.update(b"cookie ");
                        h.update(name);
                        h.update(b"=");
                        h.update((value.len() as u64).to_be_bytes());
                        h.update(value);
                    }
                }
            }
        }
        if !any {
            return "anonymous".to_owned();
        }
        hex(&h.finalize()[..16])
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The scope as it goes into the store: a hash of what the [`Scope`] returned.
pub(crate) fn store_key(scope: &str, key: &str) -> String {
    let h = Sha256::new()
        .chain_update(b"sturdy-idempotency scope\0")
        .chain_update(scope.as_bytes())
        .finalize();
    format!("{}:{key}", hex(&h[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::post("/orders");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn every_common_credential_separates_clients() {
        let s = ByCredentials::default();
        let scope = |h: &[(&str, &str)]| s.scope(&head(h));
        assert_eq!(scope(&[]), "anonymous");
        assert_eq!(scope(&[("content-type", "x")]), "anonymous");
        for name in [
            "authorization",
            "proxy-authorization",
            "x-api-key",
            "api-key",
            "x-auth-token",
            "x-access-token",
            "cookie",
        ] {
            let a = scope(&[(name, "secret-a")]);
            let b = scope(&[(name, "secret-b")]);
            assert_ne!(a, b, "{name}");
            assert_ne!(a, "anonymous", "{name}");
            assert_eq!(a, scope(&[(name, "secret-a")]), "{name}");
            assert!(!a.contains("secret"), "only a hash: {a}");
        }
        // The same value in two different headers is two credentials.
        assert_ne!(scope(&[("x-api-key", "k")]), scope(&[("api-key", "k")]));
    }

    #[test]
    fn named_cookies_ignore_the_others() {
        let s = ByCredentials::default().with_cookies(["sid"]);
        let scope = |c: &str| s.scope(&head(&[("cookie", c)]));
        assert_eq!(scope("sid=1; _ga=a"), scope("_ga=b; sid=1"));
        assert_ne!(scope("sid=1"), scope("sid=2"));
        assert_eq!(scope("_ga=a"), "anonymous");
        // The whole header when no names are given.
        let whole = ByCredentials::default();
        assert_ne!(
            whole.scope(&head(&[("cookie", "sid=1; _ga=a")])),
            whole.scope(&head(&[("cookie", "sid=1; _ga=b")]))
        );
    }

    #[test]
    fn debug_shows_no_credential() {
        let s = format!("{:?}", ByCredentials::default());
        assert!(s.contains("authorization"));
    }

    #[test]
    fn store_keys_are_bounded_and_hide_the_scope() {
        let k = store_key(&"secret".repeat(10_000), "k1");
        assert_eq!(k.len(), 32 + 1 + 2);
        assert!(!k.contains("secret"));
        assert_ne!(store_key("a", "k1"), store_key("b", "k1"));
    }
}
