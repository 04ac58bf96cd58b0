//! The recommended composition, in the order DESIGN.md gives (outermost first):
//!
//! ```text
//! IdempotencyKey -> Retry -> Hedge -> CircuitBreaker -> RateLimit -> AdaptiveConcurrency -> Auth
//!   -> Version -> AttemptTimeout -> client
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy_core::BoxError;
use tower::layer::util::{Identity, Stack};
use tower::util::{BoxCloneSyncService, Either};
use tower::{Layer, Service, ServiceBuilder};

use crate::auth::AuthLayer;
use crate::circuit::CircuitBreakerLayer;
use crate::coalesce::{CoalesceLayer, ResponseBody};
use crate::concurrency::AdaptiveConcurrencyLayer;
use crate::hedge::HedgeLayer;
use crate::idempotency::client::IdempotencyKeyLayer;
use crate::ratelimit::RateLimitLayer;
use crate::retry::{AttemptTimeoutLayer, RetryLayer};
use crate::version::VersionLayer;

/// A composed client: `Request<Full<Bytes>>` in, `Response<Rb>` or a [`BoxError`] out.
///
/// `Clone + Send + Sync + 'static`: keep one in axum `State`, in an `Arc<App>` shared by tasks,
/// give it to `sturdy::paginate::Paginate::new`, or make it the token client of
/// `sturdy::auth::ClientCredentials::new`. Clones share every layer's state (breakers, limiters,
/// retry budgets, token caches).
pub type Client<Rb> = BoxCloneSyncService<Request<Full<Bytes>>, Response<Rb>, BoxError>;

/// The layers of a [`ClientBuilder`], outermost first, as tower stacks them.
type Layers<R, C, L, H, A> = Stack<
    AttemptTimeoutLayer,
    Stack<
        Either<VersionLayer, Identity>,
        Stack<
            Either<AuthLayer, Identity>,
            Stack<
                Either<A, Identity>,
                Stack<
                    Either<L, Identity>,
                    Stack<
                        Either<C, Identity>,
                        Stack<
                            Either<H, Identity>,
                            Stack<
                                Either<R, Identity>,
                                Stack<Either<IdempotencyKeyLayer, Identity>, Identity>,
                            >,
                        >,
                    >,
                >,
            >,
        >,
    >,
>;

/// Builds the composed client stack. Every layer can be replaced (configured as you like, with
/// your own keys and classifiers) or left out; the order is fixed, because it is what makes them
/// work together (one idempotency key for all retries, one rate permit and one fresh token per
/// attempt, a timeout per attempt).
///
/// Defaults: idempotency keys on POST and PATCH; [`RetryLayer::new`]; a
/// [`CircuitBreakerLayer::new`] per host; adaptive rate limiting
/// ([`RateLimitLayer::adaptive_only`]: pauses on 429 and quota headers, no quota of our own); no
/// auth; no version pin; a 30 s timeout per attempt. Off unless asked for: hedging
/// ([`with_hedge`](Self::with_hedge), inside retry, so each hedged copy is an attempt the breaker
/// and the limiter see) and an adaptive concurrency limit
/// ([`with_adaptive_concurrency`](Self::with_adaptive_concurrency), under the rate limiter, so a
/// permit is held for the attempt only), and coalescing
/// ([`with_coalesce`](Self::with_coalesce), around everything, so identical calls share one
/// whole outcome, retries included).
///
/// Setters: `with_*` puts a layer in (as configured), `without_*` leaves it out. When auth uses a
/// token source, the wait for a token is bounded by the attempt timeout too, so a token endpoint
/// that never answers cannot hold a call past it.
///
/// Where it may sit: the client is a plain tower service whose `poll_ready` is its HTTP client's;
/// put it under `Buffer` or a concurrency limit, drive it with `oneshot` or keep it and call
/// `ready().await?.call(req)`: every layer hands the request to the service `poll_ready` made
/// ready, also after waiting for a token, a rate slot or a retry.
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
pub struct ClientBuilder<
    R = RetryLayer,
    C = CircuitBreakerLayer,
    L = RateLimitLayer,
    H = HedgeLayer,
    A = AdaptiveConcurrencyLayer,
    Co = (),
> {
    coalesce: Co,
    idempotency: Option<IdempotencyKeyLayer>,
    retry: Option<R>,
    hedge: Option<H>,
    circuit: Option<C>,
    ratelimit: Option<L>,
    concurrency: Option<A>,
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
            coalesce: (),
            idempotency: Some(IdempotencyKeyLayer::new()),
            retry: Some(RetryLayer::new()),
            hedge: None,
            circuit: Some(CircuitBreakerLayer::new()),
            ratelimit: Some(RateLimitLayer::adaptive_only()),
            concurrency: None,
            auth: None,
            version: None,
            timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl<R, C, L, H, A, Co> ClientBuilder<R, C, L, H, A, Co> {
    /// Idempotency keys, as configured.
    pub fn with_idempotency(mut self, layer: IdempotencyKeyLayer) -> Self {
        self.idempotency = Some(layer);
        self
    }

    /// No idempotency keys.
    pub fn without_idempotency(mut self) -> Self {
        self.idempotency = None;
        self
    }

    /// Retries, as configured (any classifier).
    pub fn with_retry<R2>(self, layer: R2) -> ClientBuilder<R2, C, L, H, A, Co> {
        ClientBuilder {
            coalesce: self.coalesce,
            idempotency: self.idempotency,
            retry: Some(layer),
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            timeout: self.timeout,
        }
    }

    /// A single attempt per call.
    pub fn without_retry(mut self) -> Self {
        self.retry = None;
        self
    }

    /// Circuit breakers, as configured (any key, any classifier).
    pub fn with_circuit_breaker<C2>(self, layer: C2) -> ClientBuilder<R, C2, L, H, A, Co> {
        ClientBuilder {
            coalesce: self.coalesce,
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: Some(layer),
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            timeout: self.timeout,
        }
    }

    /// No circuit breaker.
    pub fn without_circuit_breaker(mut self) -> Self {
        self.circuit = None;
        self
    }

    /// Rate limiting, as configured (any quota, any key).
    pub fn with_rate_limit<L2>(self, layer: L2) -> ClientBuilder<R, C, L2, H, A, Co> {
        ClientBuilder {
            coalesce: self.coalesce,
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: Some(layer),
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            timeout: self.timeout,
        }
    }

    /// No rate limiting.
    pub fn without_rate_limit(mut self) -> Self {
        self.ratelimit = None;
        self
    }

    /// Hedged requests (off by default): a second copy of a slow safe call after the host's
    /// observed latency percentile, within a budget. Placed inside the retry layer, so each
    /// copy is an attempt the breaker and the limiter count.
    pub fn with_hedge<H2>(self, layer: H2) -> ClientBuilder<R, C, L, H2, A, Co> {
        ClientBuilder {
            coalesce: self.coalesce,
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: Some(layer),
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            timeout: self.timeout,
        }
    }

    /// No hedging.
    pub fn without_hedge(mut self) -> Self {
        self.hedge = None;
        self
    }

    /// An adaptive concurrency limit per host (off by default). Placed under the rate limiter,
    /// so a call holds its permit for the attempt, not while it waits for a rate slot.
    pub fn with_adaptive_concurrency<A2>(self, layer: A2) -> ClientBuilder<R, C, L, H, A2, Co> {
        ClientBuilder {
            coalesce: self.coalesce,
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: Some(layer),
            auth: self.auth,
            version: self.version,
            timeout: self.timeout,
        }
    }

    /// No adaptive concurrency limit.
    pub fn without_adaptive_concurrency(mut self) -> Self {
        self.concurrency = None;
        self
    }

    /// Credentials.
    pub fn with_auth(mut self, layer: AuthLayer) -> Self {
        self.auth = Some(layer);
        self
    }

    /// No credentials.
    pub fn without_auth(mut self) -> Self {
        self.auth = None;
        self
    }

    /// An API version pin.
    pub fn with_version(mut self, layer: VersionLayer) -> Self {
        self.version = Some(layer);
        self
    }

    /// No version pin.
    pub fn without_version(mut self) -> Self {
        self.version = None;
        self
    }

    /// The timeout of each attempt \[30 s\]. A request can set its own with
    /// [`CallOptions`](sturdy_core::CallOptions).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No timeout per attempt (a request can still set one with
    /// [`CallOptions`](sturdy_core::CallOptions)).
    pub fn without_attempt_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Identical safe calls in flight share one whole outcome, retries included (off by
    /// default): the coalescing layer goes around the whole stack. The client's response body
    /// becomes `sturdy::coalesce::ResponseBody<Rb>` (a shared body, or the upstream one for a call
    /// that did not share).
    pub fn with_coalesce<K>(
        self,
        layer: CoalesceLayer<K>,
    ) -> ClientBuilder<R, C, L, H, A, CoalesceLayer<K>> {
        ClientBuilder {
            coalesce: layer,
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            timeout: self.timeout,
        }
    }

    fn layers(self) -> Layers<R, C, L, H, A> {
        // A token wait is part of the attempt: bound it by the attempt timeout too.
        let auth = match (self.auth, self.timeout) {
            (Some(a), Some(t)) => {
                let bound = t.min(a.token_timeout());
                Some(a.with_token_timeout(bound))
            }
            (a, _) => a,
        };
        ServiceBuilder::new()
            .option_layer(self.idempotency)
            .option_layer(self.retry)
            .option_layer(self.hedge)
            .option_layer(self.circuit)
            .option_layer(self.ratelimit)
            .option_layer(self.concurrency)
            .option_layer(auth)
            .option_layer(self.version)
            .layer(AttemptTimeoutLayer::new(self.timeout))
            .into_inner()
    }

    /// The stack around `http`, not yet boxed.
    fn stack<S>(self, http: S) -> <Layers<R, C, L, H, A> as Layer<S>>::Service
    where
        Layers<R, C, L, H, A>: Layer<S>,
    {
        self.layers().layer(http)
    }
}

impl<R, C, L, H, A> ClientBuilder<R, C, L, H, A> {
    /// Wraps `http` (a hyper-util client, or any service) in the stack.
    pub fn build<S, Rb>(self, http: S) -> Client<Rb>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Layers<R, C, L, H, A>: Layer<S>,
        <Layers<R, C, L, H, A> as Layer<S>>::Service:
            Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        <<Layers<R, C, L, H, A> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Error:
            Into<BoxError>,
        <<Layers<R, C, L, H, A> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Future:
            Send + 'static,
        Rb: Send + 'static,
    {
        let svc = self.stack(http);
        BoxCloneSyncService::new(tower::ServiceExt::map_err(svc, Into::<BoxError>::into))
    }
}

impl<R, C, L, H, A, K> ClientBuilder<R, C, L, H, A, CoalesceLayer<K>>
where
    K: Clone,
{
    /// Wraps `http` in the stack, with coalescing around it.
    pub fn build<S, Rb>(self, http: S) -> Client<ResponseBody<Rb>>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Layers<R, C, L, H, A>: Layer<S>,
        <Layers<R, C, L, H, A> as Layer<S>>::Service:
            Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        <<Layers<R, C, L, H, A> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Error:
            Into<BoxError>,
        <<Layers<R, C, L, H, A> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Future:
            Send + 'static,
        Rb: http_body::Body<Data = Bytes> + Send + 'static,
        Rb::Error: Into<BoxError>,
        K: sturdy_core::KeyExtractor<Full<Bytes>> + Send + Sync + 'static,
    {
        let coalesce = self.coalesce.clone();
        let svc = tower::ServiceExt::map_err(self.stack(http), Into::<BoxError>::into);
        BoxCloneSyncService::new(coalesce.layer(svc))
    }
}
