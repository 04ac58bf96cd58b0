use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use sturdy_core::events::{Event, EventHook};
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
    pub(crate) token_timeout: Duration,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) events: EventHook,
}

/// How long one call waits for a token by default.
pub(crate) const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The header value for a credential, marked sensitive. `what` names the credential and `skip`
/// is the length of a fixed prefix (`Bearer `) so that the position named counts from the
/// credential's own first byte. The error never shows the character: it is part of a secret.
fn sensitive(value: &str, what: &str, skip: usize) -> Result<HeaderValue, Error> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| Error::new(ErrorKind::Config, not_allowed(what, &value[skip..])))?;
    v.set_sensitive(true);
    Ok(v)
}

/// "the API key has a control character ... at byte 12 of 15": which credential and where, so a
/// caller can find a pasted line break without the secret being printed.
pub(crate) fn not_allowed(what: &str, value: &str) -> String {
    // `HeaderValue::from_str` refuses the control characters but the tab, and DEL.
    match value
        .bytes()
        .position(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        Some(at) => format!(
            "{what} has a control character (such as a line break), which an HTTP header cannot carry, at byte {} of {}",
            at + 1,
            value.len()
        ),
        None => format!("{what} has characters that are not allowed in an HTTP header"),
    }
}

impl AuthLayer {
    fn with(creds: Credentials) -> Self {
        Self {
            creds: Arc::new(creds),
            replay_limit: 1024 * 1024,
            token_timeout: DEFAULT_TOKEN_TIMEOUT,
            attempt_timeout: None,
            events: EventHook::none(),
        }
    }

    /// `Authorization: Bearer <token>`.
    ///
    /// # Errors
    /// When the token is empty (or only spaces and tabs), or has characters not allowed in a
    /// header.
    pub fn bearer(token: impl Into<SecretString>) -> Result<Self, Error> {
        let token = token.into();
        not_blank(&token, "the bearer token")?;
        let v = sensitive(
            &format!("Bearer {}", token.expose_secret()),
            "the bearer token",
            7,
        )?;
        Ok(Self::with(Credentials::Header(
            http::header::AUTHORIZATION,
            v,
        )))
    }

    /// An API key in the header `name` (e.g. `x-api-key`).
    ///
    /// # Errors
    /// When the key is empty (or only spaces and tabs), or has characters not allowed in a
    /// header.
    pub fn api_key(name: HeaderName, key: impl Into<SecretString>) -> Result<Self, Error> {
        let key = key.into();
        not_blank(&key, "the API key")?;
        let v = sensitive(key.expose_secret(), "the API key", 0)?;
        Ok(Self::with(Credentials::Header(name, v)))
    }

    /// An API key in the query parameter `param`, appended to the caller's query. A parameter
    /// of that name already there (`param=...`, in any percent-encoding of the name) is removed,
    /// so a request carries one key, the layer's; every other pair of the query is kept byte for
    /// byte. Prefer a header where the API allows one: URLs end up in logs (sturdy never logs
    /// them, but proxies and servers may). A request whose URI cannot hold the key (its path and
    /// query, with the key, past the 65,534 bytes `http::Uri` allows) is refused, not sent: its
    /// call fails with an error of kind `Config` that names the parameter, not the key.
    ///
    /// # Errors
    /// When `param` is empty, or the key is empty (or only spaces and tabs).
    pub fn api_key_query(
        param: impl Into<String>,
        key: impl Into<SecretString>,
    ) -> Result<Self, Error> {
        let param = param.into();
        if param.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the query parameter name for the API key is empty",
            ));
        }
        let key = key.into();
        not_blank(&key, "the API key")?;
        Ok(Self::with(Credentials::Query(param, key)))
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
        let v = sensitive(&format!("Basic {encoded}"), "the Basic credential", 6)?;
        Ok(Self::with(Credentials::Header(
            http::header::AUTHORIZATION,
            v,
        )))
    }

    /// Bearer tokens from `source`; a 401 invalidates the token, fetches a new one and replays
    /// the request once (unless the source keeps the token for now: see
    /// [`TokenSource::reject`]). A call waits for a token at most
    /// [`token_timeout`](Self::with_token_timeout) \[30 s\].
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

    /// How long one call waits for a token from the [`TokenSource`] \[30 s\]: each wait (before
    /// the first send, and before the replay after a 401) is bounded by it. Past it the call
    /// fails with a [`sturdy_core::Error`] of kind [`ErrorKind::Timeout`] (retryable) that names
    /// the token endpoint; the token request itself goes on, and callers that arrive later
    /// share it. A cached token is used without waiting, so `Duration::ZERO` means "use the
    /// cached token or fail at once".
    ///
    /// Only a token source waits; static credentials ignore this setting. Setting it is cheap
    /// (the layer's shared state is not copied), so a client builder can derive it from its
    /// attempt timeout.
    pub fn with_token_timeout(mut self, timeout: Duration) -> Self {
        self.token_timeout = timeout;
        self
    }

    /// The timeout of each attempt in the stack this layer runs in \[none\]: waiting for a token
    /// is part of an attempt, so a wait ends at the shorter of the
    /// [`token_timeout`](Self::with_token_timeout) and the attempt timeout. A request's own
    /// attempt timeout ([`CallOptions::with_attempt_timeout`](sturdy_core::CallOptions::with_attempt_timeout))
    /// takes the place of this one for that request, and
    /// [`CallOptions::without_attempt_timeout`](sturdy_core::CallOptions::without_attempt_timeout)
    /// leaves the token timeout alone to bound the wait. `sturdy::ClientBuilder` sets it to its
    /// own attempt timeout.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sturdy_auth::AuthLayer;
    /// # let tokens = sturdy_auth::ClientCredentials::new(
    /// #     tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// #     }),
    /// #     "https://auth.example.com/oauth/token", "id", "secret").unwrap();
    ///
    /// let auth = AuthLayer::oauth2(tokens)
    ///     .with_token_timeout(Duration::from_secs(30))
    ///     .with_attempt_timeout(Duration::from_secs(5));
    /// assert_eq!(auth.token_timeout(), Duration::from_secs(30));
    /// ```
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every 401 that makes the
    /// layer drop a token and replay the request with a fresh one (`TokenRejected`) \[none\];
    /// replaces an earlier callback. Token fetches and failures are events of the token source
    /// ([`ClientCredentials::on_event`](crate::ClientCredentials::on_event)). With the `metrics`
    /// feature the same events are counted through the `metrics` facade either way.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.events = EventHook::new(f);
        self
    }

    /// How long one call waits for a token (see [`with_token_timeout`](Self::with_token_timeout)).
    pub fn token_timeout(&self) -> Duration {
        self.token_timeout
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            creds: self.creds.clone(),
            replay_limit: self.replay_limit,
            token_timeout: self.token_timeout,
            attempt_timeout: self.attempt_timeout,
            events: self.events.clone(),
        }
    }
}

/// Refuses an empty credential when the layer is built: it is almost always an unset
/// environment variable, which would otherwise surface only as the API's 401 on every call.
fn not_blank(secret: &SecretString, what: &str) -> Result<(), Error> {
    if secret.expose_secret().trim_matches([' ', '\t']).is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{what} is empty (is the variable or file it comes from set?)"),
        ));
    }
    Ok(())
}
