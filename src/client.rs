//! The recommended composition, in the order DESIGN.md gives (outermost first):
//!
//! ```text
//! Idempotency -> Retry -> CircuitBreaker -> RateLimit -> Auth -> Version -> Timeout -> client
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy_core::BoxError;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::auth::AuthLayer;
use crate::circuit::CircuitBreakerLayer;
use crate::idempotency::client::IdempotencyLayer;
use crate::ratelimit::RateLimitLayer;
use crate::retry::RetryLayer;
use crate::version::VersionLayer;

/// A composed client: `Request<Full<Bytes>>` in, `Response<Rb>` or a [`BoxError`] out.
pub type Client<Rb> = BoxCloneService<Request<Full<Bytes>>, Response<Rb>, BoxError>;

/// Builds the composed client stack. Every layer can be replaced or left out; the order is fixed,
/// because it is what makes them work together (one idempotency key for all retries, one rate
/// permit and one fresh token per attempt, a timeout per attempt).
///
/// Defaults: idempotency keys on POST and PATCH; [`RetryLayer::new`]; a
/// [`CircuitBreakerLayer::new`] per host; adaptive rate limiting (pauses on 429 and quota
/// headers, no quota of our own); no auth; no version pin; a 30 s timeout per attempt.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use sturdy::ClientBuilder;
/// use tower::{service_fn, ServiceExt};
///
/// let http = service_fn(|req: Request<Full<bytes::Bytes>>| async move {
///     // Every POST carries an idempotency key.
///     assert!(req.headers().contains_key("idempotency-key"));
///     Ok::<_, std::convert::Infallible>(Response::new(()))
/// });
/// let client = ClientBuilder::new().build(http);
/// client.oneshot(Request::post("http://api.example.com/orders").body(Full::default()).unwrap()).await.unwrap();
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientBuilder {
    idempotency: Option<IdempotencyLayer>,
    retry: Option<RetryLayer>,
    circuit: Option<CircuitBreakerLayer>,
    ratelimit: Option<RateLimitLayer>,
    auth: Option<AuthLayer>,
    version: Option<VersionLayer>,
    timeout: Option<Duration>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientBuilder {
    /// The defaults above.
    pub fn new() -> Self {
        Self {
            idempotency: Some(IdempotencyLayer::new()),
            retry: Some(RetryLayer::new()),
            circuit: Some(CircuitBreakerLayer::new()),
            ratelimit: Some(RateLimitLayer::adaptive_only()),
            auth: None,
            version: None,
            timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Idempotency keys, or `None` to send none.
    pub fn idempotency(mut self, layer: Option<IdempotencyLayer>) -> Self {
        self.idempotency = layer;
        self
    }

    /// Retries, or `None` for a single attempt.
    pub fn retry(mut self, layer: Option<RetryLayer>) -> Self {
        self.retry = layer;
        self
    }

    /// Circuit breakers, or `None`.
    pub fn circuit_breaker(mut self, layer: Option<CircuitBreakerLayer>) -> Self {
        self.circuit = layer;
        self
    }

    /// Rate limiting, or `None`.
    pub fn rate_limit(mut self, layer: Option<RateLimitLayer>) -> Self {
        self.ratelimit = layer;
        self
    }

    /// Credentials.
    pub fn auth(mut self, layer: AuthLayer) -> Self {
        self.auth = Some(layer);
        self
    }

    /// An API version pin.
    pub fn version(mut self, layer: VersionLayer) -> Self {
        self.version = Some(layer);
        self
    }

    /// The timeout of each attempt, or `None`.
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Wraps `http` (a hyper-util client, or any service) in the stack.
    pub fn build<S, Rb>(self, http: S) -> Client<Rb>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Rb: Send + 'static,
    {
        let svc = ServiceBuilder::new()
            .option_layer(self.idempotency)
            .option_layer(self.retry)
            .option_layer(self.circuit)
            .option_layer(self.ratelimit)
            .option_layer(self.auth)
            .option_layer(self.version)
            .option_layer(self.timeout.map(tower::timeout::TimeoutLayer::new))
            .map_err(Into::<BoxError>::into)
            .service(http);
        BoxCloneService::new(svc.map_err(Into::<BoxError>::into))
    }
}
