use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sturdy_core::BoxError;
use tokio::time::Instant;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An access token. `Debug` shows neither the token nor any part of it.
#[derive(Clone)]
pub struct Token {
    value: SecretString,
    expires_at: Option<Instant>,
    /// Set once the API answered a request with this token (or a clone of it) with anything but
    /// a 401; shared by the clones.
    accepted: Arc<AtomicBool>,
}

impl Token {
    /// A token that is valid until `expires_at` (`None`: until the server says otherwise).
    pub fn new(value: impl Into<SecretString>, expires_at: Option<Instant>) -> Self {
        Self {
            value: value.into(),
            expires_at,
            accepted: Arc::default(),
        }
    }

    /// Notes that the API answered a request with this token with anything but a 401.
    pub(crate) fn mark_accepted(&self) {
        if !self.accepted.load(Ordering::Relaxed) {
            self.accepted.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the API ever answered a request with this token (or a clone) with anything but
    /// a 401.
    pub(crate) fn was_accepted(&self) -> bool {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The secret value. Keep it out of logs.
    pub fn secret(&self) -> &SecretString {
        &self.value
    }

    /// When the token expires, if known.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// Whether two tokens hold the same value.
    pub fn same_value(&self, other: &Self) -> bool {
        self.value.expose_secret() == other.value.expose_secret()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Where bearer tokens come from: OAuth2 ([`ClientCredentials`](crate::ClientCredentials)) or
/// anything else (a vault, a sidecar, a CLI login).
///
/// [`token`](Self::token) returns a token that is valid now (cached or fresh);
/// [`reject`](Self::reject) is called when the API refused it with 401, and
/// [`invalidate`](Self::invalidate) when it cannot be sent (a control character, which an HTTP
/// header cannot carry), so the next `token` fetches a new one.
pub trait TokenSource: Send + Sync + fmt::Debug + 'static {
    /// A token that is valid now.
    fn token(&self) -> BoxFuture<Result<Token, BoxError>>;

    /// Forgets `token` if it is the one cached (the API refused it, or it cannot be sent).
    fn invalidate(&self, token: &Token);

    /// The API refused `token` with a 401: forget it (or keep it a while), and say whether a
    /// replay of the request is worth it, that is whether the next [`token`](Self::token) may be
    /// another token.
    ///
    /// The default calls [`invalidate`](Self::invalidate) and answers `true`. A source that
    /// keeps handing `token` out for a while (so as not to ask its issuer for a new token on
    /// every call to an API that refuses them all) answers `false`, and the layer returns the
    /// 401 as it is, without a replay.
    fn reject(&self, token: &Token) -> bool {
        self.invalidate(token);
        true
    }

    /// Where the tokens come from, in words for error messages, without any secret: for
    /// [`ClientCredentials`](crate::ClientCredentials), `the token endpoint
    /// https://auth.example.com/oauth/token` (the URL without its query). The default is
    /// `the token source`.
    fn describe(&self) -> String {
        "the token source".to_owned()
    }
}
