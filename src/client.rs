//! The recommended composition, in the order docs/ARCHITECTURE.md gives (outermost first):
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
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

use crate::auth::AuthLayer;
use crate::circuit::CircuitBreakerLayer;
use crate::coalesce::{CoalesceLayer, ResponseBody};
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

/// The layers of a [`ClientBuilder`], as tower stacks them (the innermost first here).
type Layers<I, R, H, C, L, A, Au, V> = Stack<
    AttemptTimeoutLayer,
    Stack<V, Stack<Au, Stack<A, Stack<L, Stack<C, Stack<H, Stack<R, Stack<I, Identity>>>>>>>>,
>;

mod sealed {
    use std::time::Duration;

    /// What the builder adjusts in an auth layer when it builds: a token wait is part of the
    /// attempt, so it is bounded by the attempt timeout too.
    pub trait AuthSlot {
        fn bounded_by(self, attempt: Option<Duration>) -> Self;
    }

    /// The header an idempotency layer sets its keys in.
    pub trait IdempotencySlot {
        fn key_header(&self) -> Option<http::HeaderName>;
    }

    impl IdempotencySlot for tower::layer::util::Identity {
        fn key_header(&self) -> Option<http::HeaderName> {
            None
        }
    }

    impl IdempotencySlot for crate::idempotency::client::IdempotencyKeyLayer {
        fn key_header(&self) -> Option<http::HeaderName> {
            Some(self.header().clone())
        }
    }

    /// What the builder adjusts in a retry layer: it looks for keys where the idempotency layer
    /// puts them.
    pub trait RetrySlot {
        fn keys_in(self, header: Option<http::HeaderName>, known_stack: bool) -> Self;
    }

    impl RetrySlot for tower::layer::util::Identity {
        fn keys_in(self, _: Option<http::HeaderName>, _: bool) -> Self {
            self
        }
    }

    impl<K> RetrySlot for crate::retry::RetryLayer<K> {
        fn keys_in(self, header: Option<http::HeaderName>, known_stack: bool) -> Self {
            // sturdy's layers between retry and the waits (hedge, breaker, rate limit,
            // concurrency, auth, version) send no request twice without saying so: marks are
            // sound over them, not over a layer of the user's, and not when the user said no.
            let layer = if known_stack && self.hold_marks().is_none() {
                self.with_hold_marks(true)
            } else {
                self
            };
            // The stack ends with an `AttemptTimeoutLayer`, which keeps a request's own attempt
            // timeout under the breaker and the waits.
            let layer = layer.with_request_timeouts_below(true);
            match header {
                Some(h) if layer.idempotency_header() != h => layer.with_idempotency_header(h),
                _ => layer,
            }
        }
    }

    impl AuthSlot for tower::layer::util::Identity {
        fn bounded_by(self, _: Option<Duration>) -> Self {
            self
        }
    }

    impl AuthSlot for crate::auth::AuthLayer {
        fn bounded_by(self, attempt: Option<Duration>) -> Self {
            match attempt {
                Some(t) => self.with_attempt_timeout(t),
                None => self,
            }
        }
    }
}

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
/// Setters: `with_*` puts a layer in (as configured), `without_*` leaves it out. A layer left out
/// is not there at all (the builder's type says which layers it holds), so it costs nothing. When
/// auth uses a token source, the wait for a token is bounded by the attempt timeout too (the
/// builder's, or the request's own from `CallOptions::with_attempt_timeout`), so a token
/// endpoint that never answers cannot hold a call past it; such a call fails `NotSent` (or
/// "may have been processed" when the token was needed to replay a request after a 401, which
/// the API had already received).
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
    I = IdempotencyKeyLayer,
    R = RetryLayer,
    H = Identity,
    C = CircuitBreakerLayer,
    L = RateLimitLayer,
    A = Identity,
    Au = Identity,
    V = Identity,
    Co = (),
> {
    idempotency: I,
    retry: R,
    hedge: H,
    circuit: C,
    ratelimit: L,
    concurrency: A,
    auth: Au,
    version: V,
    coalesce: Co,
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
            idempotency: IdempotencyKeyLayer::new(),
            retry: RetryLayer::new(),
            hedge: Identity::new(),
            circuit: CircuitBreakerLayer::new(),
            ratelimit: RateLimitLayer::adaptive_only(),
            concurrency: Identity::new(),
            auth: Identity::new(),
            version: Identity::new(),
            coalesce: (),
            timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl<I, R, H, C, L, A, Au, V, Co> ClientBuilder<I, R, H, C, L, A, Au, V, Co> {
    /// Idempotency keys, as configured. The retry layer is told the header the keys go in (see
    /// [`IdempotencyKeyLayer::with_header`]), so a POST or PATCH with a key in a header of your
    /// choosing is retried like one with `Idempotency-Key`.
    pub fn with_idempotency(
        self,
        layer: IdempotencyKeyLayer,
    ) -> ClientBuilder<IdempotencyKeyLayer, R, H, C, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: layer,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No idempotency keys.
    pub fn without_idempotency(self) -> ClientBuilder<Identity, R, H, C, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: Identity::new(),
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// Retries, as configured (any classifier). The retry layer looks for the idempotency key in
    /// the header the [idempotency layer](Self::with_idempotency) sets, whatever header this
    /// layer was configured with.
    pub fn with_retry<K>(
        self,
        layer: RetryLayer<K>,
    ) -> ClientBuilder<I, RetryLayer<K>, H, C, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: layer,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// A single attempt per call.
    pub fn without_retry(self) -> ClientBuilder<I, Identity, H, C, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: Identity::new(),
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// Hedged requests (off by default): a second copy of a slow safe call after the host's
    /// observed latency percentile, within a budget. Placed inside the retry layer, so each
    /// copy is an attempt the breaker and the limiter count.
    pub fn with_hedge<H2>(self, layer: H2) -> ClientBuilder<I, R, H2, C, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: layer,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No hedging.
    pub fn without_hedge(self) -> ClientBuilder<I, R, Identity, C, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: Identity::new(),
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// Circuit breakers, as configured (any key, any classifier).
    pub fn with_circuit_breaker<C2>(
        self,
        layer: C2,
    ) -> ClientBuilder<I, R, H, C2, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: layer,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No circuit breaker.
    pub fn without_circuit_breaker(self) -> ClientBuilder<I, R, H, Identity, L, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: Identity::new(),
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// Rate limiting, as configured (any quota, any key).
    pub fn with_rate_limit<L2>(self, layer: L2) -> ClientBuilder<I, R, H, C, L2, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: layer,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No rate limiting.
    pub fn without_rate_limit(self) -> ClientBuilder<I, R, H, C, Identity, A, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: Identity::new(),
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// An adaptive concurrency limit per host (off by default). Placed under the rate limiter,
    /// so a call holds its permit for the attempt, not while it waits for a rate slot.
    pub fn with_adaptive_concurrency<A2>(
        self,
        layer: A2,
    ) -> ClientBuilder<I, R, H, C, L, A2, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: layer,
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No adaptive concurrency limit.
    pub fn without_adaptive_concurrency(self) -> ClientBuilder<I, R, H, C, L, Identity, Au, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: Identity::new(),
            auth: self.auth,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// Credentials.
    pub fn with_auth(self, layer: AuthLayer) -> ClientBuilder<I, R, H, C, L, A, AuthLayer, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: layer,
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No credentials.
    pub fn without_auth(self) -> ClientBuilder<I, R, H, C, L, A, Identity, V, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: Identity::new(),
            version: self.version,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// An API version pin.
    pub fn with_version(
        self,
        layer: VersionLayer,
    ) -> ClientBuilder<I, R, H, C, L, A, Au, VersionLayer, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: layer,
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// No version pin.
    pub fn without_version(self) -> ClientBuilder<I, R, H, C, L, A, Au, Identity, Co> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: Identity::new(),
            coalesce: self.coalesce,
            timeout: self.timeout,
        }
    }

    /// Identical safe calls in flight share one whole outcome, retries included (off by
    /// default): the coalescing layer goes around the whole stack. The client's response body
    /// becomes `sturdy::coalesce::ResponseBody<Rb>` (a shared body, or the upstream one for a call
    /// that did not share).
    ///
    /// Coalescing sits above every layer of the builder, so none of them makes a caller wait
    /// before it can join. A concurrency limit you put *under* the client (around the HTTP
    /// service you pass to `build`) is another matter: while it is full, the client's
    /// `poll_ready` waits for it, and identical callers wait there instead of joining the call in
    /// flight. Put such limits above the client, or use
    /// [`with_adaptive_concurrency`](Self::with_adaptive_concurrency), whose permits are taken
    /// per attempt inside the stack.
    pub fn with_coalesce<K>(
        self,
        layer: CoalesceLayer<K>,
    ) -> ClientBuilder<I, R, H, C, L, A, Au, V, CoalesceLayer<K>> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: layer,
            timeout: self.timeout,
        }
    }

    /// No coalescing.
    pub fn without_coalesce(self) -> ClientBuilder<I, R, H, C, L, A, Au, V, ()> {
        ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: (),
            timeout: self.timeout,
        }
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

    fn layers(self) -> Layers<I, R, H, C, L, A, Au, V>
    where
        I: sealed::IdempotencySlot,
        R: sealed::RetrySlot,
        Au: sealed::AuthSlot,
    {
        let keys = self.idempotency.key_header();
        // Whether every layer between retry and the client is a default or one of sturdy's:
        // only then may the retry layer mark attempts (`RetryLayer::with_hold_marks`).
        let known_stack = [
            std::any::type_name::<H>(),
            std::any::type_name::<C>(),
            std::any::type_name::<L>(),
            std::any::type_name::<A>(),
            std::any::type_name::<Au>(),
            std::any::type_name::<V>(),
        ]
        .iter()
        .all(|name| known_layer(name));
        ServiceBuilder::new()
            .layer(self.idempotency)
            .layer(self.retry.keys_in(keys, known_stack))
            .layer(self.hedge)
            .layer(self.circuit)
            .layer(self.ratelimit)
            .layer(self.concurrency)
            .layer(self.auth.bounded_by(self.timeout))
            .layer(self.version)
            .layer(AttemptTimeoutLayer::new(self.timeout))
            .into_inner()
    }
}

/// Whether a layer's type name is one of sturdy's, tower's `Identity`, or tower's `Either` of
/// such (what `tower::util::option_layer` makes of a layer that is on or off).
fn known_layer(name: &str) -> bool {
    if let Some(args) = name
        .strip_prefix("tower::util::either::Either<")
        .and_then(|rest| rest.strip_suffix('>'))
    {
        // The two type arguments, split at the comma outside any `<...>` of their own.
        let mut depth = 0usize;
        let mut start = 0;
        let mut parts = Vec::with_capacity(2);
        for (i, c) in args.char_indices() {
            match c {
                '<' => depth += 1,
                '>' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    parts.push(&args[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&args[start..]);
        return parts.len() == 2 && parts.iter().all(|p| known_layer(p.trim()));
    }
    // sturdy's layers that send each request once, or say so when they do not
    // (`AttemptHold::fan_out`); not the retry layer, which re-sends, nor a crate of the
    // application's own that happens to be named `sturdy_...`.
    const ONCE: [&str; 10] = [
        "sturdy_hedge::",
        "sturdy_circuit::",
        "sturdy_ratelimit::",
        "sturdy_concurrency::",
        "sturdy_auth::",
        "sturdy_version::",
        "sturdy_coalesce::",
        "sturdy_idempotency::",
        "sturdy_retry::timeout::",
        "tower_layer::identity::",
    ];
    ONCE.iter().any(|p| name.starts_with(p))
}

impl<I, R, H, C, L, A, Au, V> ClientBuilder<I, R, H, C, L, A, Au, V, ()> {
    /// Wraps `http` (a hyper-util client, or any service) in the stack.
    pub fn build<S, Rb>(self, http: S) -> Client<Rb>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        I: sealed::IdempotencySlot,
        R: sealed::RetrySlot,
        Au: sealed::AuthSlot,
        Layers<I, R, H, C, L, A, Au, V>: Layer<S>,
        <Layers<I, R, H, C, L, A, Au, V> as Layer<S>>::Service:
            Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        <<Layers<I, R, H, C, L, A, Au, V> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Error:
            Into<BoxError>,
        <<Layers<I, R, H, C, L, A, Au, V> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Future:
            Send + 'static,
        Rb: Send + 'static,
    {
        let svc = self.layers().layer(http);
        BoxCloneSyncService::new(tower::ServiceExt::map_err(svc, Into::<BoxError>::into))
    }
}

impl<I, R, H, C, L, A, Au, V, K> ClientBuilder<I, R, H, C, L, A, Au, V, CoalesceLayer<K>>
where
    K: Clone,
{
    /// Wraps `http` in the stack, with coalescing around it.
    pub fn build<S, Rb>(self, http: S) -> Client<ResponseBody<Rb>>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        I: sealed::IdempotencySlot,
        R: sealed::RetrySlot,
        Au: sealed::AuthSlot,
        Layers<I, R, H, C, L, A, Au, V>: Layer<S>,
        <Layers<I, R, H, C, L, A, Au, V> as Layer<S>>::Service:
            Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
        <<Layers<I, R, H, C, L, A, Au, V> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Error:
            Into<BoxError>,
        <<Layers<I, R, H, C, L, A, Au, V> as Layer<S>>::Service as Service<Request<Full<Bytes>>>>::Future:
            Send + 'static,
        Rb: http_body::Body<Data = Bytes> + Send + 'static,
        Rb::Error: Into<BoxError>,
        K: sturdy_core::KeyExtractor<Full<Bytes>> + Send + Sync + 'static,
    {
        let coalesce = self.coalesce.clone();
        let stack = ClientBuilder {
            idempotency: self.idempotency,
            retry: self.retry,
            hedge: self.hedge,
            circuit: self.circuit,
            ratelimit: self.ratelimit,
            concurrency: self.concurrency,
            auth: self.auth,
            version: self.version,
            coalesce: (),
            timeout: self.timeout,
        };
        let svc = tower::ServiceExt::map_err(stack.layers().layer(http), Into::<BoxError>::into);
        BoxCloneSyncService::new(coalesce.layer(svc))
    }
}

#[cfg(test)]
mod tests {
    use super::known_layer;

    fn name_of<T>(_: &T) -> &'static str {
        std::any::type_name::<T>()
    }

    #[test]
    fn sturdy_layers_identity_and_either_of_them_are_known() {
        let hedge = crate::hedge::HedgeLayer::new();
        assert!(known_layer(name_of(&hedge)));
        assert!(known_layer(name_of(&tower::layer::util::Identity::new())));
        let on = tower::util::option_layer(Some(hedge));
        assert!(known_layer(name_of(&on)), "{}", name_of(&on));
        let off = tower::util::option_layer::<crate::hedge::HedgeLayer>(None);
        assert!(known_layer(name_of(&off)));
        // Either of Either, and generic arguments with commas of their own.
        let nested = tower::util::option_layer(Some(on));
        assert!(known_layer(name_of(&nested)), "{}", name_of(&nested));
        // A layer that is not sturdy's: the builder cannot tell what it does with a request,
        // alone or inside an `Either`.
        let limit = tower::limit::ConcurrencyLimitLayer::new(1);
        assert!(!known_layer(name_of(&limit)));
        assert!(!known_layer(name_of(&tower::util::option_layer(Some(
            limit
        )))));
        // The retry layer re-sends; a crate of the application's own is not sturdy's.
        let retry = crate::retry::RetryLayer::new();
        assert!(!known_layer(name_of(&retry)), "{}", name_of(&retry));
        assert!(!known_layer(name_of(&tower::util::option_layer(Some(
            retry
        )))));
        assert!(!known_layer("sturdy_mine::Resend"));
        assert!(!known_layer("tower::util::either::Either<sturdy_x::A>"));
        assert!(!known_layer("tower::util::either::Either<"));
    }
}
