use std::fmt;
use std::future::Future;
use std::pin::Pin;

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
}

impl Token {
    /// A token that is valid until `expires_at` (`None`: until the server says otherwise).
    pub fn new(value: impl Into<SecretString>, expires_at: Option<Instant>) -> Self {
        Self {
            value: value.into(),
            expires_at,
        }
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
/// [`invalidate`](Self::invalidate) is called when the API refused it with 401, or when it
/// cannot be sent (a control character, which an HTTP header cannot carry), so the next `token`
/// fetches a new one.
pub trait TokenSource: Send + Sync + fmt::Debug + 'static {
    /// A token that is valid now.
    fn token(&self) -> BoxFuture<Result<Token, BoxError>>;

    /// Forgets `token` if it is the one cached (the API refused it, or it cannot be sent).
    fn invalidate(&self, token: &Token);

    /// Where the tokens come from, in words for error messages, without any secret: for
    /// [`ClientCredentials`](crate::ClientCredentials), `the token endpoint
    /// https://auth.example.com/oauth/token` (the URL without its query). The default is
    /// `the token source`.
    fn describe(&self) -> String {
        "the token source".to_owned()
    }
}
