//! OAuth2 client credentials (RFC 6749 §4.4) with a single-flight token cache.

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sturdy_core::clock::after;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::{human_duration, BoxError, Error, ErrorKind};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::token::{BoxFuture, Token, TokenSource};

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// `Authorization: Basic` with the id and secret form-encoded first. The default.
    #[default]
    SecretBasic,
    /// `client_id` and `client_secret` in the request body.
    SecretPost,
}

/// Settings of a [`ClientCredentials`] source.
#[derive(Clone)]
struct Settings {
    token_url: http::Uri,
    /// The token URL without its query (which may carry secrets), for messages and `Debug`.
    shown_url: String,
    client_id: String,
    client_secret: SecretString,
    auth: ClientAuth,
    scopes: Vec<String>,
    params: Vec<(String, String)>,
    skew: Duration,
    default_lifetime: Duration,
    max_lifetime: Duration,
    max_backoff: Duration,
    request_timeout: Duration,
    events: EventHook,
}

impl Settings {
    /// `the token endpoint https://host/path`, for messages.
    fn endpoint(&self) -> String {
        format!("the token endpoint {}", self.shown_url)
    }

    /// The token endpoint's host (and port), for events: in lower case, as every layer's events
    /// name a host.
    fn endpoint_host(&self) -> std::borrow::Cow<'_, str> {
        let a = self.token_url.authority().map_or("", |a| a.as_str());
        sturdy_core::key::host_key(a.rsplit_once('@').map_or(a, |(_, host)| host))
    }
}

/// A token fetched, and when to refresh it.
struct Cached {
    token: Token,
    refresh_at: Instant,
    expires_at: Instant,
    /// When it was stored: how long it is held after a 401 counts from here.
    fetched_at: Instant,
}

/// How long a token is kept after its fetch, even if the API refuses it, once `refusals` tokens
/// in a row were refused before the API accepted any request with them: none after 0 (the
/// first such refusal fetches a new token at once), then 1 s, doubling, at most `max`.
fn refusal_hold(refusals: u32, max: Duration) -> Duration {
    match refusals {
        0 => Duration::ZERO,
        n => Duration::from_secs(1 << (n - 1).min(6)).min(max),
    }
}

/// Why a token request failed, shared by every caller that waited for it. Each caller gets its
/// own [`Error`] built from it ([`Failure::error`]), with the shared cause as its source.
#[derive(Clone)]
struct Failure {
    kind: ErrorKind,
    message: String,
    cause: Option<Arc<dyn StdError + Send + Sync>>,
}

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            cause: None,
        }
    }

    fn with_cause(mut self, cause: BoxError) -> Self {
        self.cause = Some(Arc::from(cause));
        self
    }

    /// A caller's own error: the kind and message, with the shared cause as its source.
    fn error(&self) -> Error {
        self.error_with(self.message.clone())
    }

    fn error_with(&self, message: String) -> Error {
        let e = Error::new(self.kind.clone(), message);
        match &self.cause {
            // The message already names the cause.
            Some(c) => e.with_hidden_source(SharedCause(c.clone())),
            None => e,
        }
    }
}

/// The cause several waiters share, as each one's source. `Arc<dyn Error>` is an error itself,
/// but its `source()` is the inner error's source, which would skip the inner error (an
/// `io::Error`, say) in the chain: this wrapper's `source()` is the inner error.
struct SharedCause(Arc<dyn StdError + Send + Sync>);

impl fmt::Debug for SharedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SharedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for SharedCause {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.error(), f)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error(), f)
    }
}

type Outcome = Result<Token, Failure>;

/// A token request under way.
struct Flight {
    id: u64,
    rx: watch::Receiver<Option<Outcome>>,
    started: Instant,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    inflight: Option<Flight>,
    next_flight: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Failure>,
    /// How many tokens in a row the API refused before it accepted any request with them.
    refusals: u32,
}

/// The token client: any service that sends the token request (usually the same hyper client,
/// possibly with its own retry and timeout layers).
type Fetch = Arc<
    dyn Fn(Request<Full<Bytes>>) -> BoxFuture<Result<(StatusCode, Bytes), BoxError>> + Send + Sync,
>;

struct Inner {
    settings: Settings,
    fetch: Fetch,
    state: Mutex<State>,
}

/// OAuth2 client credentials with a cache: a token is reused until `expiry - skew` (skew 60 s,
/// but at most half the token's lifetime), then refreshed in the background while callers go on
/// with it until it expires; N callers without a valid token cause one token request
/// (single-flight); a refresh that fails while the old token is still valid keeps the old token
/// and backs off before trying again (1 s, doubling, at most 60 s); token-endpoint errors become
/// errors that say what to fix.
///
/// A 401 from the API replaces the token at once, unless the API refuses tokens before it
/// accepts any request with them (any answer but a 401 counts as accepted): a token refused so,
/// right after the one before it was, is kept for 1 s from when it came (doubling with each such
/// token in a row, at most the backoff's 60 s), and the layer returns its 401s as they are,
/// without a replay; the first 401 after that replaces it and replays. So an API that refuses
/// every token (a wrong audience, a misconfigured API) costs a token request per hold, not one
/// per call; a token that worked and is then refused (revoked, expired early) is replaced at
/// once.
///
/// The token request runs as a task of its own on the Tokio runtime of the caller that started
/// it, so a caller that gives up (or times out) does not cancel it for the others. It is bounded
/// by [`with_request_timeout`](Self::with_request_timeout) \[30 s\]. If that task is lost with
/// its runtime (the runtime was shut down mid-request), the next caller starts a new request.
/// A request whose connection broke under it (a [`Transport`](ErrorKind::Transport) error
/// straight from the client, such as a pooled connection the server had closed) is sent once
/// more at once, within the same timeout: the grant is safe to repeat. Other failures (a refused
/// connection, a timeout, any answer, the error a retry layer of the token client gave up with)
/// are not resent.
///
/// Every error is a [`sturdy_core::Error`] (find it with
/// `err.downcast_ref::<sturdy_core::Error>()`): each caller gets its own, with the cause it
/// shares with the other waiters as its `source()`.
///
/// # Clone
/// Clones share one cache. A `with_*` setter returns a source with a cache of its own (a token
/// for other scopes or another audience is another token), so configure first, then clone.
///
/// `Debug` never shows the secret or a token.
#[derive(Clone)]
pub struct ClientCredentials {
    inner: Arc<Inner>,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.settings;
        f.debug_struct("ClientCredentials")
            .field("token_url", &s.shown_url)
            .field("client_id", &s.client_id)
            .field("client_secret", &"[redacted]")
            .field("auth", &s.auth)
            .field("scopes", &s.scopes)
            .field("request_timeout", &s.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Reads the token response at most this large.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// How long a token request may take by default.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A token request still unanswered this long after its timeout is no longer driven (its runtime
/// is idle or gone): the next caller starts another.
const STALE_GRACE: Duration = Duration::from_secs(10);

/// The longest lifetime the clock is asked to represent.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Form parameters the source sets itself.
const RESERVED_PARAMS: [&str; 4] = ["grant_type", "scope", "client_id", "client_secret"];

/// How many times a caller starts over when the request it waited for was abandoned.
const MAX_ABANDONED: usize = 3;

impl ClientCredentials {
    /// Tokens from `token_url` for `client_id`/`client_secret`, requested through `client`.
    ///
    /// `client` is any `Clone + Send` service of `Request<Full<Bytes>>` (`Sync` is not needed):
    /// a hyper-util client, or a whole stack such as a
    /// `tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Incoming>, BoxError>`,
    /// which gives token requests their own retries (a `ClientBuilder` stack: the token request
    /// is a POST, which sturdy's `RetryLayer` alone retries only with an idempotency key, which
    /// `ClientBuilder` adds). Each token request is bounded by
    /// [`with_request_timeout`](Self::with_request_timeout) \[30 s\] whatever the client does.
    ///
    /// # Errors
    /// When `token_url` is not a valid absolute URI.
    pub fn new<S, Rb>(
        client: S,
        token_url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<SecretString>,
    ) -> Result<Self, Error>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Rb: Body + Send + 'static,
        Rb::Data: Send,
        Rb::Error: Into<BoxError>,
    {
        let token_url: http::Uri = token_url.parse().map_err(|e| {
            Error::new(ErrorKind::Config, "the token URL is not a valid URI").with_source(e)
        })?;
        let (Some(scheme), Some(host)) = (token_url.scheme(), token_url.host()) else {
            return Err(Error::new(
                ErrorKind::Config,
                "the token URL must be absolute (scheme and host)",
            ));
        };
        // No user info and no query: either may carry a secret.
        let port = token_url
            .port()
            .map(|p| format!(":{p}"))
            .unwrap_or_default();
        let shown_url = format!("{scheme}://{host}{port}{}", token_url.path());
        // Held in a mutex only to be cloned, so a client that is not `Sync` will do.
        let client = Mutex::new(client);
        let fetch: Fetch = Arc::new(move |req| {
            let client = client
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            Box::pin(async move {
                let res = client.oneshot(req).await.map_err(Into::into)?;
                let status = res.status();
                let body = sturdy_core::body::buffer(res.into_body(), MAX_TOKEN_RESPONSE).await?;
                Ok((status, body))
            })
        });
        Ok(Self {
            inner: Arc::new(Inner {
                settings: Settings {
                    token_url,
                    shown_url,
                    client_id: client_id.into(),
                    client_secret: client_secret.into(),
                    auth: ClientAuth::default(),
                    scopes: Vec::new(),
                    params: Vec::new(),
                    skew: Duration::from_secs(60),
                    default_lifetime: Duration::from_secs(3_600),
                    max_lifetime: Duration::from_secs(86_400),
                    max_backoff: Duration::from_secs(60),
                    request_timeout: DEFAULT_REQUEST_TIMEOUT,
                    events: EventHook::none(),
                },
                fetch,
                state: Mutex::new(State::default()),
            }),
        })
    }

    fn edit(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.inner.settings.clone();
        f(&mut settings);
        self.inner = Arc::new(Inner {
            settings,
            fetch: self.inner.fetch.clone(),
            state: Mutex::new(State::default()),
        });
        self
    }

    /// How the client authenticates [`ClientAuth::SecretBasic`].
    #[must_use]
    pub fn with_client_auth(self, auth: ClientAuth) -> Self {
        self.edit(|s| s.auth = auth)
    }

    /// Requests these scopes (sent space-separated in `scope`); an unknown scope is reported by
    /// the token endpoint as `invalid_scope`, which the error explains.
    #[must_use]
    pub fn with_scopes<I: IntoIterator<Item = T>, T: Into<String>>(self, scopes: I) -> Self {
        let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        self.edit(|s| s.scopes = scopes)
    }

    /// Sends `audience` (used by several providers for client credentials). A setter: called
    /// again, the new audience replaces the earlier one (and an `audience` given to
    /// [`with_param`](Self::with_param) before it), so the request carries one. A
    /// `with_param("audience", ..)` called after it adds a second one, as `with_param` always
    /// adds.
    #[must_use]
    pub fn with_audience(self, audience: impl Into<String>) -> Self {
        let audience = audience.into();
        self.edit(|s| {
            s.params.retain(|(n, _)| n != "audience");
            s.params.push(("audience".to_owned(), audience));
        })
    }

    /// Sends any other form parameter with the token request. Called again with the same name,
    /// it adds the parameter once more (RFC 8707's `resource`, for one, may repeat).
    ///
    /// # Errors
    /// When `name` is empty, or is one the source sets itself (`grant_type`, `scope`,
    /// `client_id`, `client_secret`; use [`with_scopes`](Self::with_scopes) and
    /// [`with_client_auth`](Self::with_client_auth) for those).
    pub fn with_param(
        self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, Error> {
        let (n, v) = (name.into(), value.into());
        if n.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "a token request parameter needs a name",
            ));
        }
        if RESERVED_PARAMS.contains(&n.as_str()) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("the token request parameter {n} is set by ClientCredentials itself; use with_scopes or with_client_auth"),
            ));
        }
        Ok(self.edit(|s| s.params.push((n, v))))
    }

    /// Refresh this long before expiry \[60 s\]; never more than half the token's lifetime, so a
    /// short-lived token is not refreshed on every call.
    #[must_use]
    pub fn with_skew(self, skew: Duration) -> Self {
        self.edit(|s| s.skew = skew)
    }

    /// The lifetime assumed when the server sends no `expires_in` (or `null`) \[1 h\]; at least 1 s.
    #[must_use]
    pub fn with_default_lifetime(self, lifetime: Duration) -> Self {
        self.edit(|s| s.default_lifetime = lifetime.max(Duration::from_secs(1)))
    }

    /// The longest lifetime believed \[24 h\]; a larger `expires_in` is clamped to it. At least
    /// 1 s.
    #[must_use]
    pub fn with_max_lifetime(self, lifetime: Duration) -> Self {
        self.edit(|s| s.max_lifetime = lifetime.max(Duration::from_secs(1)))
    }

    /// How long one token request may take, from sending it to reading the whole response
    /// \[30 s\]. Past it the request fails with [`ErrorKind::Timeout`] (retryable) and the source
    /// backs off as after any failure, so a token endpoint that never answers cannot hold up the
    /// callers waiting for it. `Duration::ZERO` lets only an immediate answer through.
    ///
    /// The timeout is measured on the runtime that runs the request. If that runtime stops
    /// driving it without shutting down (blocked, or no longer polled), callers on other
    /// runtimes wait for it until 10 s past the timeout; then the callers still waiting, and
    /// the next to arrive, start another request (one, shared). (A runtime that shuts down frees them at once.)
    #[must_use]
    pub fn with_request_timeout(self, timeout: Duration) -> Self {
        self.edit(|s| s.request_timeout = timeout)
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every token fetched
    /// (`TokenFetched`) and every token request that failed (`TokenFailed`) \[none\]; replaces
    /// an earlier callback. It runs in the task that requests the token, with no lock held. With
    /// the `metrics` feature the same events are counted through the `metrics` facade either way.
    #[must_use]
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        self.edit(|s| s.events = hook)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A valid token: the cached one, or a fresh one (one request however many callers wait).
    /// A cached token that is due for refresh (within the skew of its expiry) is still returned
    /// while the refresh runs in the background, so no caller waits while a valid token exists.
    ///
    /// Needs a Tokio runtime: the token request runs as a task of its own.
    ///
    /// # Errors
    /// When no valid token can be had: the token endpoint refused or failed (or did not answer
    /// within the request timeout), and the cached token (if any) has expired; or when called
    /// outside a Tokio runtime. The error's kind says whether trying again may help.
    pub async fn get(&self) -> Result<Token, Error> {
        for _ in 0..MAX_ABANDONED {
            let (mut rx, stale_at) = match self.begin()? {
                Begin::Cached(token) => return Ok(token),
                Begin::Wait { rx, stale_at } => (rx, stale_at),
            };
            let outcome =
                match tokio::time::timeout_at(stale_at, rx.wait_for(Option::is_some)).await {
                    Ok(Ok(v)) => v.clone(),
                    // The request was abandoned (its task was dropped with its runtime), or its
                    // runtime stopped driving it (unanswered 10 s past its timeout): start over,
                    // which replaces it.
                    Ok(Err(_)) | Err(_) => continue,
                };
            return match outcome {
                Some(Ok(t)) => Ok(t),
                Some(Err(f)) => {
                    let st = self.lock();
                    match &st.current {
                        Some(c) if Instant::now() < c.expires_at => Ok(c.token.clone()),
                        _ => Err(f.error()),
                    }
                }
                None => continue,
            };
        }
        Err(Error::new(
            ErrorKind::Other,
            format!(
                "the request to {} was abandoned {MAX_ABANDONED} times in a row (the runtimes that ran it shut down or stopped driving it)",
                self.inner.settings.endpoint()
            ),
        ))
    }

    /// The cached token, or the request to wait for (joined, or started here).
    fn begin(&self) -> Result<Begin, Error> {
        let mut st = self.lock();
        let now = Instant::now();
        let backing_off = st.retry_at.filter(|t| now < *t);
        if let Some(c) = &st.current {
            if now < c.refresh_at {
                return Ok(Begin::Cached(c.token.clone()));
            }
            if now < c.expires_at {
                // Due for refresh but still valid: refresh in the background (unless backing
                // off) and keep using this token meanwhile, so no caller waits.
                let token = c.token.clone();
                let start = match backing_off {
                    Some(_) => None,
                    None => self.plan(&mut st, now).ok().and_then(|(_, _, start)| start),
                };
                drop(st);
                if let Some(start) = start {
                    self.start(start);
                }
                return Ok(Begin::Cached(token));
            }
        }
        if let (Some(t), Some(e)) = (backing_off, &st.last_error) {
            // Do not hammer a failing token endpoint: repeat its last answer until then.
            return Err(e
                .error_with(format!(
                    "{}; {} is not asked again for {}",
                    e.message,
                    self.inner.settings.endpoint(),
                    human_duration(t - now)
                ))
                .with_retry_after(t - now));
        }
        let (rx, stale_at, start) = self.plan(&mut st, now)?;
        drop(st);
        if let Some(start) = start {
            self.start(start);
        }
        Ok(Begin::Wait { rx, stale_at })
    }

    /// Joins the token request under way, or registers a new one for [`Self::start`] to run
    /// once the lock is released; with the time past which the request counts as no longer
    /// driven (a caller still waiting then starts over, replacing it).
    fn plan(
        &self,
        st: &mut State,
        now: Instant,
    ) -> Result<(watch::Receiver<Option<Outcome>>, Instant, Option<Start>), Error> {
        let stale_after = self
            .inner
            .settings
            .request_timeout
            .saturating_add(STALE_GRACE);
        if let Some(f) = &st.inflight {
            // A request whose task is gone (closed channel) or no longer driven (older than its
            // timeout allows) is replaced, so the source never stays stuck behind it.
            if f.rx.has_changed().is_ok() && now.saturating_duration_since(f.started) < stale_after
            {
                return Ok((f.rx.clone(), after(f.started, stale_after), None));
            }
            tracing::debug!("a token request was abandoned; starting another");
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::new(
                ErrorKind::Config,
                "ClientCredentials needs a Tokio runtime to request tokens; call it from a task on one",
            )
        })?;
        let id = st.next_flight;
        st.next_flight = st.next_flight.wrapping_add(1);
        let (tx, rx) = watch::channel(None);
        st.inflight = Some(Flight {
            id,
            rx: rx.clone(),
            started: now,
        });
        Ok((rx, after(now, stale_after), Some(Start { runtime, id, tx })))
    }

    /// Runs a registered token request as its own task, so a caller that gives up does not
    /// strand the others. Called without the state lock (the guard takes it if it is dropped).
    fn start(&self, start: Start) {
        let guard = FlightGuard {
            source: self.clone(),
            id: start.id,
            tx: Some(start.tx),
        };
        start.runtime.spawn(self.clone().refresh(guard));
    }

    async fn refresh(self, mut guard: FlightGuard) {
        let started = Instant::now();
        let result = self.request_token().await;
        let note;
        let outcome = {
            let mut st = self.lock();
            if st.inflight.as_ref().is_some_and(|f| f.id == guard.id) {
                st.inflight = None;
            }
            match result {
                Ok((token, lifetime)) => {
                    // Capped by `max_lifetime` already; a cap set beyond a century is taken as
                    // a century, which the clock can represent.
                    let lifetime = lifetime.min(CENTURY);
                    let skew = self.inner.settings.skew.min(lifetime / 2);
                    let expires_at = started + lifetime;
                    let token = Token::new(token, Some(expires_at));
                    st.current = Some(Cached {
                        token: token.clone(),
                        refresh_at: expires_at - skew,
                        expires_at,
                        fetched_at: Instant::now(),
                    });
                    st.failures = 0;
                    st.retry_at = None;
                    st.last_error = None;
                    tracing::debug!(lifetime_s = lifetime.as_secs(), "fetched an access token");
                    note = Some(Ok(lifetime));
                    Ok(token)
                }
                Err(e) => {
                    st.failures = st.failures.saturating_add(1);
                    let backoff = Duration::from_secs(1 << st.failures.saturating_sub(1).min(6))
                        .min(self.inner.settings.max_backoff);
                    st.retry_at = Some(Instant::now() + backoff);
                    st.last_error = Some(e.clone());
                    let keeping = st
                        .current
                        .as_ref()
                        .is_some_and(|c| Instant::now() < c.expires_at);
                    tracing::warn!(error = %e, retry_in = %human_duration(backoff), keeping_current_token = keeping, "token request failed");
                    note = Some(Err((e.kind.clone(), backoff, keeping)));
                    Err(e)
                }
            }
        };
        // Told with the state lock released.
        let settings = &self.inner.settings;
        let endpoint = &*settings.endpoint_host();
        match note {
            Some(Ok(lifetime)) => settings
                .events
                .emit(&Event::TokenFetched { endpoint, lifetime }),
            Some(Err((error, retry_in, keeping_current))) => {
                settings.events.emit(&Event::TokenFailed {
                    endpoint,
                    error: &error,
                    retry_in,
                    keeping_current,
                });
            }
            None => {}
        }
        guard.finish(outcome);
    }

    fn build_request(&self) -> Request<Full<Bytes>> {
        let s = &self.inner.settings;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !s.scopes.is_empty() {
            form.append_pair("scope", &s.scopes.join(" "));
        }
        for (k, v) in &s.params {
            form.append_pair(k, v);
        }
        if s.auth == ClientAuth::SecretPost {
            form.append_pair("client_id", &s.client_id);
            form.append_pair("client_secret", s.client_secret.expose_secret());
        }
        let mut req = Request::new(Full::new(Bytes::from(form.finish())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = s.token_url.clone();
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if s.auth == ClientAuth::SecretBasic {
            let value = format!("Basic {}", basic_credentials(s));
            if let Ok(mut v) = HeaderValue::from_str(&value) {
                v.set_sensitive(true);
                h.insert(header::AUTHORIZATION, v);
            }
        }
        req
    }

    /// One token request: the token and its lifetime, or an error that says what to fix.
    async fn request_token(&self) -> Result<(String, Duration), Failure> {
        let s = &self.inner.settings;
        let fetch = async {
            let first = (self.inner.fetch)(self.build_request()).await;
            match first {
                Err(e) if resend_after(&*e) => {
                    // The connection broke under the request: most often a pooled connection
                    // the server had closed, found out only while the request was written. A
                    // client-credentials grant is safe to repeat (at worst the server issues a
                    // second token), so it is sent once more at once, on a fresh connection,
                    // instead of failing every waiting caller and backing off for a second.
                    tracing::debug!(
                        error = %sturdy_core::classify::describe(&*e),
                        "the token request's connection broke; sending it once more"
                    );
                    (self.inner.fetch)(self.build_request()).await
                }
                other => other,
            }
        };
        let (status, body) = match tokio::time::timeout(s.request_timeout, fetch).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                let kind = sturdy_core::classify::classify_error(&*e);
                // The root cause in plain words ("connection refused", "TLS handshake failed
                // (...)"), not the client's own wrapper text.
                return Err(Failure::new(
                    kind,
                    format!(
                        "the token request to {} failed: {}",
                        s.endpoint(),
                        sturdy_core::classify::describe(&*e)
                    ),
                )
                .with_cause(e));
            }
            Err(_) => {
                return Err(Failure::new(
                    ErrorKind::Timeout,
                    format!(
                        "{} did not answer within {} (the token request timeout); retryable",
                        s.endpoint(),
                        human_duration(s.request_timeout)
                    ),
                ));
            }
        };
        parse_token_response(status, &body, s)
    }
}

/// Whether a failed token request is sent once more at once: its connection broke after it was
/// made (a transport error from the client: hyper-util's, or reqwest's as sturdy-reqwest
/// converts it). An error a retry layer of the token client gave up with (it carries the call's
/// report) is final: that stack has decided, after its own tries.
fn resend_after(e: &(dyn StdError + 'static)) -> bool {
    // An answer whose body broke off is an answer: the server issued a token, and the docs
    // promise no resend after any answer.
    if sturdy_core::classify::classify_error(e) != ErrorKind::Transport
        || sturdy_core::find::<sturdy_core::body::BodyError>(e).is_some()
    {
        return false;
    }
    !sturdy_core::chain(e).any(|link| {
        link.downcast_ref::<Error>()
            .is_some_and(|s| s.report().is_some())
    })
}

/// A token request registered in the state, to be spawned.
struct Start {
    runtime: tokio::runtime::Handle,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

/// What [`ClientCredentials::begin`] found.
enum Begin {
    Cached(Token),
    Wait {
        rx: watch::Receiver<Option<Outcome>>,
        /// When the request counts as no longer driven.
        stale_at: Instant,
    },
}

/// The sending end of one token request. If the request's task is dropped before it finishes
/// (its runtime shut down), the guard forgets the request, so the next caller starts another,
/// and closing the channel wakes the callers waiting for it.
struct FlightGuard {
    source: ClientCredentials,
    id: u64,
    tx: Option<watch::Sender<Option<Outcome>>>,
}

impl FlightGuard {
    fn finish(&mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let mut st = self.source.lock();
            if st.inflight.as_ref().is_some_and(|f| f.id == self.id) {
                st.inflight = None;
            }
            // `tx` drops after this, waking the waiters, who find no request and start one.
        }
    }
}

/// Reads a token response (RFC 6749 §5.1 and §5.2).
fn parse_token_response(
    status: StatusCode,
    body: &[u8],
    s: &Settings,
) -> Result<(String, Duration), Failure> {
    let json: Option<Value> = serde_json::from_slice(body)
        .ok()
        .or_else(|| with_huge_numbers_as_text(body));
    if !status.is_success() {
        if let Some(code) = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(Value::as_str)
        {
            let description = json
                .as_ref()
                .and_then(|j| j.get("error_description"))
                .and_then(Value::as_str);
            return Err(endpoint_error(status, code, description, s));
        }
        return Err(Failure::new(
            endpoint_kind(status),
            format!("{} answered {status} without an OAuth2 error", s.endpoint()),
        ));
    }
    let Some(Value::Object(obj)) = json else {
        return Err(Failure::new(
            ErrorKind::Auth,
            format!(
                "{} answered {status} with a body that is not a JSON object",
                s.endpoint()
            ),
        ));
    };
    let token = match obj.get("access_token") {
        // A token the Authorization header cannot carry (a control character) would fail every
        // call for as long as it was cached: refused here, by the header's own check, not cached.
        Some(Value::String(t)) if HeaderValue::from_str(t).is_err() => {
            return Err(Failure::new(
                ErrorKind::Auth,
                format!(
                    "the token response from {} has an access_token with a control character, which cannot be sent in an HTTP header",
                    s.shown_url
                ),
            ))
        }
        // A token of spaces and tabs only would go out as `Authorization: Bearer ` followed
        // by blanks, which no API takes: as good as empty.
        Some(Value::String(t)) if !t.trim_matches([' ', '\t']).is_empty() => t.clone(),
        Some(_) => {
            return Err(Failure::new(
                ErrorKind::Auth,
                format!(
                    "the token response from {} has an empty, blank or non-string access_token",
                    s.shown_url
                ),
            ))
        }
        None => {
            // Some servers answer a refusal with a 2xx status and RFC 6749's error object: its
            // code and description name the cause better than the missing token does.
            if let Some(code) = obj.get("error").and_then(Value::as_str) {
                let description = obj.get("error_description").and_then(Value::as_str);
                return Err(endpoint_error(status, code, description, s));
            }
            return Err(Failure::new(
                ErrorKind::Auth,
                format!(
                    "the token response from {} has no access_token",
                    s.shown_url
                ),
            ));
        }
    };
    match obj.get("token_type") {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        None => tracing::debug!("token response without token_type; assuming Bearer"),
        Some(other) => {
            return Err(Failure::new(
                ErrorKind::Auth,
                format!(
                    "{} issued a token of type {}, but only Bearer tokens are supported",
                    s.endpoint(),
                    shown_value(other, s)
                ),
            ));
        }
    }
    let lifetime = match obj.get("expires_in") {
        None | Some(Value::Null) => s.default_lifetime,
        Some(v) => {
            let secs = match v {
                Value::Number(n) => n.as_f64(),
                Value::String(t) => t.trim().parse::<f64>().ok(),
                _ => None,
            };
            match secs {
                // An infinite value ("1e400" overflows a double) is huge: clamped below.
                Some(x) if x >= 1.0 => {
                    let d = Duration::try_from_secs_f64(x.floor()).unwrap_or(s.max_lifetime);
                    if d > s.max_lifetime {
                        tracing::warn!(
                            expires_in = x,
                            max_s = s.max_lifetime.as_secs(),
                            "token lifetime clamped"
                        );
                    }
                    d.min(s.max_lifetime)
                }
                Some(x) if !x.is_nan() => {
                    return Err(Failure::new(ErrorKind::Auth, format!("{} issued a token with expires_in {x} s (already expired); check the server's clock and token settings", s.endpoint())));
                }
                _ => {
                    return Err(Failure::new(
                        ErrorKind::Auth,
                        format!(
                            "the token response from {} has an expires_in that is not a number of seconds: {}",
                            s.shown_url,
                            shown_value(v, s)
                        ),
                    ))
                }
            }
        }
    };
    Ok((token, lifetime))
}

/// A JSON object whose `expires_in` is a number no double can hold (`1e400`: valid JSON, which
/// `serde_json` refuses as out of range), read with that number as its text, so that it is
/// judged as a lifetime (huge, so clamped) rather than as a broken body. Any other field that
/// does not parse still fails the whole body.
fn with_huge_numbers_as_text(body: &[u8]) -> Option<Value> {
    use serde_json::value::RawValue;
    let raw: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(body).ok()?;
    let mut obj = serde_json::Map::new();
    for (k, v) in raw {
        let text = v.get();
        let value = match serde_json::from_str::<Value>(text) {
            Ok(value) => value,
            Err(_) if k == "expires_in" => Value::String(text.to_owned()),
            Err(_) => return None,
        };
        obj.insert(k, value);
    }
    Some(Value::Object(obj))
}

/// The kind of a token endpoint's error status: a status worth trying again (500, 502, 503, 504,
/// 429, 425, 408) keeps its own kind, so it stays retryable; any other refusal is about the credentials.
fn endpoint_kind(status: StatusCode) -> ErrorKind {
    match ErrorKind::from_status(status) {
        Some(kind) if kind.is_retryable() => kind,
        _ => ErrorKind::Auth,
    }
}

fn endpoint_error(
    status: StatusCode,
    code: &str,
    description: Option<&str>,
    s: &Settings,
) -> Failure {
    let advice = match code {
        "invalid_client" => "the client id or secret is wrong, or the client may not use this authentication method; check them",
        "invalid_scope" => "a requested scope is unknown or not allowed for this client; check the scopes",
        "invalid_grant" => "the grant was refused; check the client's permissions",
        "unauthorized_client" => "this client may not use the client-credentials grant; enable it for the client",
        "unsupported_grant_type" => "the server does not support the client-credentials grant",
        "invalid_request" => "the token request was malformed (missing or repeated parameter); check the parameters",
        _ => "the token endpoint refused the request",
    };
    let kind = endpoint_kind(status);
    // The code and the description are the server's words, and a server may echo the request:
    // kept short, and without the client secret in any form the request carried it.
    let code = printable(&redact_secret(code, s), 64);
    let mut msg = format!(
        "{} refused the token request with {code} ({status}): {advice}",
        s.endpoint()
    );
    if let Some(d) = description {
        let d = printable(&redact_secret(d, s), 200);
        msg.push_str(&format!(" [server says: {d}]"));
    }
    Failure::new(kind, msg)
}

fn form_encoded(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// The credentials of `Authorization: Basic` (RFC 6749 §2.3.1: id and secret form-encoded
/// first, then base64).
fn basic_credentials(s: &Settings) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        form_encoded(&s.client_id),
        form_encoded(s.client_secret.expose_secret())
    ))
}

/// `text` with the secrets the token request carried replaced by `[redacted]`: the client
/// secret as sent (raw, form-encoded) and as the Basic credentials that carry it (base64 of
/// `id:secret`), and the token URL's user info and query (whole, and the password and each
/// query value of four bytes or more, as written and percent-decoded), which a server echoing
/// the request URL would show.
/// A value of the server's token response, for a message: as JSON, without the client secret or
/// the token URL's secrets, cut to 64 characters (a server decides its size).
/// The first `max` characters of a server's text, with its control characters escaped (`\n`,
/// `\u{1b}`): a line break or a terminal escape sent by the token endpoint must not start a
/// forged line in a log, or reach an agent's tool result as a command to the terminal.
fn printable(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .fold(String::with_capacity(text.len().min(max)), |mut out, c| {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            out
        })
}

fn shown_value(v: &Value, s: &Settings) -> String {
    let text = redact_secret(&v.to_string(), s);
    let mut shown: String = text.chars().take(64).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

fn redact_secret(text: &str, s: &Settings) -> String {
    let mut needles: Vec<String> = Vec::new();
    let secret = s.client_secret.expose_secret();
    if !secret.is_empty() {
        needles.extend([
            basic_credentials(s),
            secret.to_owned(),
            form_encoded(secret),
        ]);
    }
    let authority = s.token_url.authority().map_or("", |a| a.as_str());
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        needles.push(userinfo.to_owned());
        if let Some((_, password)) = userinfo.split_once(':') {
            push_value(&mut needles, password);
        }
    }
    if let Some(query) = s.token_url.query() {
        needles.push(query.to_owned());
        for pair in query.split('&') {
            push_value(&mut needles, pair.split_once('=').map_or("", |(_, v)| v));
        }
    }
    // Longest first, so a whole (the query) goes before its parts (a value).
    needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = text.to_owned();
    for needle in &needles {
        if !needle.is_empty() {
            out = replace_spelled(&out, needle.as_bytes());
        }
    }
    out
}

/// `text` with every spelling of `needle` replaced by `[redacted]`: as it is, and with any of its
/// bytes percent-encoded (either case of hex), a space as `+`, or escaped as JSON escapes it. A
/// server echoing the secret re-encodes it its own way (`%2f`, `%20`, `\"` in a JSON string), so
/// one exact spelling is not enough.
fn replace_spelled(text: &str, needle: &[u8]) -> String {
    let Some(&first) = needle.first() else {
        return text.to_owned();
    };
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut at) = (0, 0);
    while at < bytes.len() {
        // Most positions cannot start any spelling of the needle's first byte: skipped without
        // setting up the walk.
        if spellings_of(bytes, at, first).iter().all(Option::is_none) {
            at += 1;
            continue;
        }
        match spelled_at(bytes, at, needle) {
            Some(end) if text.is_char_boundary(at) && text.is_char_boundary(end) => {
                out.push_str(&text[copied..at]);
                out.push_str("[redacted]");
                (copied, at) = (end, end);
            }
            _ => at += 1,
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a spelling of `needle` starting at `start` ends (the longest one), if any. Every text
/// position a prefix of the needle may have reached is followed at once, so a needle of `%` or
/// `\\` signs costs no more than any other (no backtracking).
fn spelled_at(text: &[u8], start: usize, needle: &[u8]) -> Option<usize> {
    let mut reached = vec![start];
    let mut next = Vec::with_capacity(3);
    for &b in needle {
        next.clear();
        for &j in &reached {
            for end in spellings_of(text, j, b).into_iter().flatten() {
                if !next.contains(&end) {
                    next.push(end);
                }
            }
        }
        if next.is_empty() {
            return None;
        }
        std::mem::swap(&mut reached, &mut next);
    }
    reached.into_iter().max()
}

/// The ends of the ways `text` spells the byte `b` at `j`: itself, `%XX`, `+` for a space, a JSON
/// escape.
fn spellings_of(text: &[u8], j: usize, b: u8) -> [Option<usize>; 3] {
    let hex = |i: usize| text.get(i).and_then(|c| char::from(*c).to_digit(16));
    let at = |i: usize| text.get(i).copied();
    let literal = (at(j) == Some(b) || (b == b' ' && at(j) == Some(b'+'))).then_some(j + 1);
    let percent = (at(j) == Some(b'%')
        && matches!((hex(j + 1), hex(j + 2)), (Some(h), Some(l)) if h * 16 + l == u32::from(b)))
    .then_some(j + 3);
    let json = if at(j) == Some(b'\\') {
        match at(j + 1) {
            Some(b'u') => {
                let code = (2..6).try_fold(0u32, |acc, k| hex(j + k).map(|d| acc * 16 + d));
                (code == Some(u32::from(b)) && b < 0x80).then_some(j + 6)
            }
            Some(e) => {
                let meant = match e {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    other => other,
                };
                (meant == b && matches!(e, b'"' | b'\\' | b'/' | b'n' | b'r' | b't' | b'b' | b'f'))
                    .then_some(j + 2)
            }
            None => None,
        }
    } else {
        None
    };
    [literal, percent, json]
}

/// `value` as written and percent-decoded, when it is long enough to be told from plain words.
fn push_value(needles: &mut Vec<String>, value: &str) {
    if value.len() < 4 {
        return;
    }
    needles.push(value.to_owned());
    // A lone `value` parses as one name without a value: its name is `value` decoded (up to an
    // `=` a password may hold, hence the length checked again).
    if let Some((decoded, _)) = form_urlencoded::parse(value.as_bytes()).next() {
        if decoded != value && decoded.len() >= 4 {
            needles.push(decoded.into_owned());
        }
    }
}

impl TokenSource for ClientCredentials {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let this = self.clone();
        Box::pin(async move { this.get().await.map_err(Into::into) })
    }

    fn describe(&self) -> String {
        self.inner.settings.endpoint()
    }

    fn invalidate(&self, token: &Token) {
        let mut st = self.lock();
        if st
            .current
            .as_ref()
            .is_some_and(|c| c.token.same_value(token))
        {
            tracing::debug!("the API refused the cached token; it will be refreshed");
            st.current = None;
            // A 401 is news: do not keep backing off from an earlier failure.
            st.retry_at = None;
        }
    }

    // An API that refuses every token would otherwise cost a token request per call (the 401,
    // a new token, the replay's 401, and the next call's 401 with that token...): the token
    // endpoint would be hammered exactly as the backoff after its own failures means to avoid.
    fn reject(&self, token: &Token) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let refusals = st.refusals;
        let max = self.inner.settings.max_backoff;
        let Some(c) = st.current.as_ref().filter(|c| c.token.same_value(token)) else {
            // Another token is cached already, or one is being fetched: a replay gets it.
            return true;
        };
        // A token that worked and is now refused was revoked or expired early: replaced at once.
        let accepted = c.token.was_accepted();
        let refusals = if accepted { 0 } else { refusals };
        let until = after(c.fetched_at, refusal_hold(refusals, max));
        if now < until {
            tracing::debug!(
                refused_in_a_row = refusals,
                kept_for = %human_duration(until - now),
                "the API refused a token it never accepted, as it did the one before: kept a while before another is fetched"
            );
            return false;
        }
        tracing::debug!("the API refused the cached token; it will be refreshed");
        st.current = None;
        // A 401 is news: do not keep backing off from an earlier failure.
        st.retry_at = None;
        st.refusals = if accepted {
            0
        } else {
            refusals.saturating_add(1)
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            token_url: "https://auth.example.com/token".parse().unwrap(),
            shown_url: "https://auth.example.com/token".into(),
            client_id: "id".into(),
            client_secret: "s".into(),
            auth: ClientAuth::SecretBasic,
            scopes: vec![],
            params: vec![],
            skew: Duration::from_secs(60),
            default_lifetime: Duration::from_secs(3_600),
            max_lifetime: Duration::from_secs(86_400),
            max_backoff: Duration::from_secs(60),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            events: EventHook::none(),
        }
    }

    #[test]
    fn a_servers_echo_of_the_token_urls_user_info_and_query_is_redacted() {
        let mut s = settings();
        s.token_url = "https://robot:pa55%2Bword@auth.example.com:8443/token?api_key=qs3cret&x=1"
            .parse()
            .unwrap();
        s.client_secret = "the-secret".into();
        let echo = "bad request to https://robot:pa55%2Bword@auth.example.com:8443/token?api_key=qs3cret&x=1 \
                    (password pa55+word, key qs3cret, secret the-secret), page=1";
        let out = redact_secret(echo, &s);
        for leak in ["pa55", "qs3cret", "robot", "the-secret"] {
            assert!(!out.contains(leak), "{leak} in {out}");
        }
        assert!(
            out.contains("auth.example.com:8443/token?[redacted]"),
            "{out}"
        );
        // Short values are left alone: they cannot be told from plain words.
        assert!(out.ends_with("page=1"), "{out}");
        // Nor is the short part before an `=` inside a password.
        s.token_url = "https://u:ab=cdef@auth.example.com/token".parse().unwrap();
        assert_eq!(redact_secret("ab u:ab=cdef", &s), "ab [redacted]");
    }

    #[test]
    fn a_secret_echoed_in_another_spelling_is_redacted() {
        let mut s = settings();
        s.client_secret = "p\"w\\d/ +é%x".into();
        for echo in [
            // As the JSON of an error body writes it.
            r#"{"error":"bad","got":"p\"w\\d\/ +é%x"}"#.to_owned(),
            serde_json::Value::from("p\"w\\d/ +é%x").to_string(),
            // Percent-encoded in lower case, a space as %20, the `+` as %2b.
            "secret=p%22w%5cd%2f%20%2b%c3%a9%25x".to_owned(),
            // Form-encoded as sent, and with only some bytes encoded.
            "secret=p%22w%5Cd%2F+%2B%C3%A9%25x".to_owned(),
            "secret=p\"w%5Cd/ +é%x".to_owned(),
            // A JSON \u escape for an ASCII byte.
            r#""p\u0022w\u005cd/ +é%x""#.to_owned(),
        ] {
            let out = redact_secret(&echo, &s);
            assert!(out.contains("[redacted]"), "{echo} -> {out}");
            assert!(!out.contains('é') && !out.contains("c3"), "{echo} -> {out}");
        }
        // A needle of escape characters against a text of escapes: linear, not exponential.
        s.client_secret = "%".repeat(2_000).into();
        let text = "%25".repeat(20_000);
        let out = redact_secret(&text, &s);
        assert!(out.starts_with("[redacted]"), "{}", &out[..40]);
        // Text around a match is kept as it was, multi-byte characters included.
        s.client_secret = "abcd".into();
        assert_eq!(
            redact_secret("é a%62cd ü abcd.", &s),
            "é [redacted] ü [redacted]."
        );
    }

    fn parse(status: u16, body: &str) -> Result<(String, Duration), Error> {
        parse_token_response(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            &settings(),
        )
        .map_err(|f| f.error())
    }

    #[test]
    fn a_servers_odd_values_are_shown_short_and_without_the_secret() {
        let long = "x".repeat(60_000);
        let body = format!(r#"{{"access_token":"t","token_type":"{long}"}}"#);
        let e = parse(200, &body).unwrap_err().to_string();
        assert!(e.contains("only Bearer tokens are supported"), "{e}");
        assert!(e.len() < 400, "{}", e.len());
        let mut st = settings();
        st.client_secret = "sup3r-s3cret".into();
        let secret = "sup3r-s3cret";
        let body = format!(r#"{{"access_token":"t","expires_in":"{secret} {long}"}}"#);
        let e = parse_token_response(StatusCode::OK, body.as_bytes(), &st)
            .map_err(|f| f.error())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number of seconds"), "{e}");
        assert!(!e.contains(secret), "{e}");
        assert!(e.len() < 400, "{}", e.len());
    }

    #[test]
    fn an_expires_in_beyond_a_double_is_huge() {
        for e in ["1e400", "\"1e400\"", "123456789012345678901234567890"] {
            let body = format!(r#"{{"access_token":"t","expires_in":{e}}}"#);
            assert_eq!(
                parse(200, &body).unwrap(),
                ("t".into(), Duration::from_secs(86_400)),
                "{e}"
            );
        }
        let e = parse(200, r#"{"access_token":"t","expires_in":-1e400}"#).unwrap_err();
        assert!(e.to_string().contains("already expired"), "{e}");
        // Only expires_in is read leniently: a token no double can hold is not a token.
        let e = parse(200, r#"{"access_token":1e400}"#).unwrap_err();
        assert!(e.to_string().contains("not a JSON object"), "{e}");
    }

    #[test]
    fn rfc6749_example_and_lifetimes() {
        let ok = parse(200, r#"{"access_token":"2YotnFZFEjr1zCsicMWpAA","token_type":"Bearer","expires_in":3600,"example_parameter":"example_value"}"#).unwrap();
        assert_eq!(
            ok,
            ("2YotnFZFEjr1zCsicMWpAA".into(), Duration::from_secs(3_600))
        );
        assert_eq!(
            parse(200, r#"{"access_token":"t","token_type":"bearer"}"#)
                .unwrap()
                .1,
            Duration::from_secs(3_600)
        );
        assert_eq!(
            parse(
                200,
                r#"{"access_token":"t","token_type":"BEARER","expires_in":"120"}"#
            )
            .unwrap()
            .1,
            Duration::from_secs(120)
        );
        assert_eq!(
            parse(
                200,
                r#"{"access_token":"t","token_type":"Bearer","expires_in":30.9}"#
            )
            .unwrap()
            .1,
            Duration::from_secs(30)
        );
        assert_eq!(
            parse(
                200,
                r#"{"access_token":"t","token_type":"Bearer","expires_in":1e12}"#
            )
            .unwrap()
            .1,
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn malformed_responses_say_what_is_wrong() {
        let cases = [
            (200, "not json", "not a JSON object"),
            (200, "[1,2]", "not a JSON object"),
            (200, r#"{"token_type":"Bearer"}"#, "no access_token"),
            (
                200,
                r#"{"access_token":"","token_type":"Bearer"}"#,
                "empty, blank or non-string access_token",
            ),
            (
                200,
                r#"{"access_token":" \t  ","token_type":"Bearer"}"#,
                "empty, blank or non-string access_token",
            ),
            (
                200,
                r#"{"access_token":5}"#,
                "empty, blank or non-string access_token",
            ),
            (
                200,
                r#"{"access_token":"a\u0001b"}"#,
                "access_token with a control character",
            ),
            (
                200,
                r#"{"access_token":"a\nb"}"#,
                "access_token with a control character",
            ),
            (
                200,
                r#"{"access_token":"a\u007fb"}"#,
                "access_token with a control character",
            ),
            (
                200,
                r#"{"access_token":"t","token_type":"mac"}"#,
                "only Bearer tokens",
            ),
            (
                200,
                r#"{"access_token":"t","expires_in":0}"#,
                "already expired",
            ),
            (
                200,
                r#"{"access_token":"t","expires_in":-5}"#,
                "already expired",
            ),
            (
                200,
                r#"{"access_token":"t","expires_in":"soon"}"#,
                "not a number of seconds",
            ),
            (
                200,
                r#"{"access_token":"t","expires_in":true}"#,
                "not a number of seconds",
            ),
            (
                401,
                r#"{"error":"invalid_client"}"#,
                "client id or secret is wrong",
            ),
            (
                400,
                r#"{"error":"invalid_scope","error_description":"scope 'admin' is not allowed"}"#,
                "check the scopes",
            ),
            (
                400,
                r#"{"error":"unauthorized_client"}"#,
                "enable it for the client",
            ),
            (
                400,
                r#"{"error":"unsupported_grant_type"}"#,
                "does not support the client-credentials grant",
            ),
            (400, r#"{"error":"invalid_request"}"#, "malformed"),
            (
                200,
                r#"{"error":"invalid_client","error_description":"unknown client"}"#,
                "invalid_client (200 OK): the client id or secret is wrong, or the client may not use this authentication method; check them [server says: unknown client]",
            ),
            (400, r#"{"error":"invalid_grant"}"#, "grant was refused"),
            (
                502,
                "<html>bad gateway</html>",
                "502 Bad Gateway without an OAuth2 error",
            ),
            (404, "", "404 Not Found without an OAuth2 error"),
        ];
        for (status, body, want) in cases {
            let err = parse(status, body).unwrap_err();
            assert!(err.to_string().contains(want), "{status} {body}: {err}");
        }
    }

    #[test]
    fn retryable_or_not() {
        assert!(parse(503, "").unwrap_err().is_retryable());
        assert!(parse(500, r#"{"error":"server_error"}"#)
            .unwrap_err()
            .is_retryable());
        let e = parse(401, r#"{"error":"invalid_client"}"#).unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(e.kind(), &ErrorKind::Auth);
    }
}
