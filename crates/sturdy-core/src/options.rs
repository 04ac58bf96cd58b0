//! Per-request settings: switch retries off, set a deadline or a timeout, or give the idempotency
//! key for one request, without building another stack.
//!
//! Put a [`CallOptions`] in the request's extensions; each layer reads what concerns it and
//! ignores the rest. A value set here wins over the layer's configuration for this request only.
//!
//! | setting | read by |
//! |---|---|
//! | [`without_retries`](CallOptions::without_retries), [`with_max_attempts`](CallOptions::with_max_attempts) | the retry layer |
//! | [`with_deadline`](CallOptions::with_deadline) | the retry layer (the whole call, retries and waits included) |
//! | [`with_attempt_timeout`](CallOptions::with_attempt_timeout), [`without_attempt_timeout`](CallOptions::without_attempt_timeout) | the attempt timeout layer |
//! | [`with_idempotency_key`](CallOptions::with_idempotency_key) | the client idempotency-key layer |
//!
//! ```
//! use std::time::Duration;
//! use sturdy_core::CallOptions;
//!
//! let mut req = http::Request::post("https://api.example.com/payments").body(()).unwrap();
//! req.extensions_mut().insert(
//!     CallOptions::new()
//!         .with_deadline(Duration::from_secs(5))
//!         .with_idempotency_key("order-7421-payment"),
//! );
//! assert_eq!(CallOptions::of(&req).unwrap().deadline(), Some(Duration::from_secs(5)));
//! ```

use std::time::Duration;

/// Settings for one request; see the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct CallOptions {
    max_attempts: Option<u32>,
    deadline: Option<Duration>,
    attempt_timeout: Option<Option<Duration>>,
    idempotency_key: Option<String>,
}

impl CallOptions {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// The options in a request's extensions, if any.
    pub fn of<B>(req: &http::Request<B>) -> Option<&Self> {
        req.extensions().get::<Self>()
    }

    /// One attempt only: the retry layer does not retry this request.
    pub fn without_retries(self) -> Self {
        self.with_max_attempts(1)
    }

    /// At most `n` attempts for this request, the first included (0 is taken as 1).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n.max(1));
        self
    }

    /// An overall deadline for this request: attempts and waits together, until the response head
    /// arrives (the body that follows is read by the caller, under a bound of its own).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The timeout of each attempt of this request.
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(Some(timeout));
        self
    }

    /// No per-attempt timeout for this request (a long download, say); the deadline, if any,
    /// still applies.
    pub fn without_attempt_timeout(mut self) -> Self {
        self.attempt_timeout = Some(None);
        self
    }

    /// The idempotency key of this request (the client idempotency layer sets it instead of a
    /// random one). Setting the `Idempotency-Key` header yourself does the same. A key no header
    /// can carry as it is (it is empty, holds control characters, a tab inside among them, or
    /// begins or ends with a space or a tab, which HTTP strips) is sent as `sturdy-sha256-` and
    /// the hex SHA-256 of the key: the same every time, and not the same as another key unless
    /// that key spells out this digest.
    ///
    /// A key given here is sent whatever the method (a GET or a PUT too), not only with the
    /// methods that get a random key. One with characters beyond ASCII (`café`) is sent as its
    /// UTF-8 bytes, which a header can carry but many servers refuse (sturdy's own server layer
    /// answers 400): keep keys to visible ASCII.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The attempt limit set for this request.
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The deadline set for this request.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The attempt timeout set for this request: `Some(None)` means none at all, `None` means
    /// the layer's own setting.
    pub fn attempt_timeout(&self) -> Option<Option<Duration>> {
        self.attempt_timeout
    }

    /// The idempotency key set for this request.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
}
