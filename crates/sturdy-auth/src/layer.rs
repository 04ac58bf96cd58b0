use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use sturdy_core::{Error, ErrorKind};
use tower::Layer;

use crate::{Auth, ClientCredentials, TokenSource};

/// What the layer adds to each request.
pub(crate) enum Credentials {
    /// A fixed header (bearer token, API key, basic), marked sensitive.
    Header(HeaderName, HeaderValue),
    /// An API key in a query parameter.
    Query(String, SecretString),
    /// A bearer token from a source, refreshed on 401.
    Token(Arc<dyn TokenSource>),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(name, _) => write!(f, "Header({name}: [redacted])"),
            Self::Query(param, _) => write!(f, "Query({param}=[redacted])"),
            Self::Token(source) => f.debug_tuple("Token").field(source).finish(),
        }
    }
}

/// Adds credentials to every request; with a [`TokenSource`], a 401 refreshes the token once
/// and replays the request. See the [crate docs](crate).
///
/// `Debug` shows what kind of credentials it holds, never the secret.
#[derive(Debug, Clone)]
#[must_use]
pub struct AuthLayer {
    pub(crate) creds: Arc<Credentials>,
    pub(crate) replay_limit: usize,
}

fn sensitive(value: &str) -> Result<HeaderValue, Error> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        Error::new(
            ErrorKind::Config,
            "the credential has characters that are not allowed in an HTTP header",
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

impl AuthLayer {
    fn with(creds: Credentials) -> Self {
        Self {
            creds: Arc::new(creds),
            replay_limit: 1024 * 1024,
        }
    }

    /// `Authorization: Bearer <token>`.
    ///
    /// # Errors
    /// When the token has characters not allowed in a header.
    pub fn bearer(token: impl Into<SecretString>) -> Result<Self, Error> {
        let token = token.into();
        let v = sensitive(&format!("Bearer {}", token.expose_secret()))?;
        Ok(Self::with(Credentials::Header(
            http::header::AUTHORIZATION,
            v,
        )))
    }

    /// An API key in the header `name` (e.g. `x-api-key`).
    ///
    /// # Errors
    /// When the key has characters not allowed in a header.
    pub fn api_key(name: HeaderName, key: impl Into<SecretString>) -> Result<Self, Error> {
        let key = key.into();
        let v = sensitive(key.expose_secret())?;
        Ok(Self::with(Credentials::Header(name, v)))
    }

    /// An API key in the query parameter `param`. Prefer a header where the API allows one: URLs
    /// end up in logs (sturdy never logs them, but proxies and servers may).
    pub fn api_key_query(param: impl Into<String>, key: impl Into<SecretString>) -> Self {
        Self::with(Credentials::Query(param.into(), key.into()))
    }

    /// `Authorization: Basic` with `user` and `password`.
    ///
    /// # Errors
    /// When `user` contains `:` (Basic cannot carry it).
    pub fn basic(user: &str, password: impl Into<SecretString>) -> Result<Self, Error> {
        if user.contains(':') {
            return Err(Error::new(
                ErrorKind::Config,
                "a Basic user name cannot contain ':'",
            ));
        }
        let password = password.into();
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", password.expose_secret()));
        let v = sensitive(&format!("Basic {encoded}"))?;
        Ok(Self::with(Credentials::Header(
            http::header::AUTHORIZATION,
            v,
        )))
    }

    /// Bearer tokens from `source`; a 401 invalidates the token, fetches a new one and replays
    /// the request once.
    pub fn token_source(source: Arc<dyn TokenSource>) -> Self {
        Self::with(Credentials::Token(source))
    }

    /// Bearer tokens from OAuth2 client credentials.
    pub fn oauth2(source: ClientCredentials) -> Self {
        Self::token_source(Arc::new(source))
    }

    /// The largest body buffered so a request can be replayed after a 401 \[1 MiB\]; a larger or
    /// unbounded body is sent once and a 401 is returned as is.
    pub fn with_replay_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            creds: self.creds.clone(),
            replay_limit: self.replay_limit,
        }
    }
}
