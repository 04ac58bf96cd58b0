//! `ServiceBuilder` methods for sturdy's layers, so they read like tower's own.

#[allow(unused_imports)] // used only by the layers whose features are on
use tower::layer::util::Stack;
use tower::ServiceBuilder;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// Adds sturdy's client layers to a `tower::ServiceBuilder`. Sealed: implemented for
/// `ServiceBuilder` only.
///
/// ```
/// # #[cfg(all(feature = "retry", feature = "circuit"))]
/// # fn main() {
/// use http::{Request, Response};
/// use sturdy::circuit::CircuitBreakerLayer;
/// use sturdy::retry::RetryLayer;
/// use sturdy::ServiceBuilderExt;
/// use tower::{service_fn, ServiceBuilder};
///
/// let client = ServiceBuilder::new()
///     .sturdy_retry(RetryLayer::new())
///     .sturdy_circuit_breaker(CircuitBreakerLayer::new())
///     .service(service_fn(|_req: Request<http_body_util::Full<bytes::Bytes>>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(()))
///     }));
/// # let _ = client;
/// # }
/// # #[cfg(not(all(feature = "retry", feature = "circuit")))]
/// # fn main() {}
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Adds an idempotency-key layer (client side).
    #[cfg(feature = "idempotency")]
    fn sturdy_idempotency(
        self,
        layer: crate::idempotency::client::IdempotencyKeyLayer,
    ) -> ServiceBuilder<Stack<crate::idempotency::client::IdempotencyKeyLayer, L>>;
    /// Adds a retry layer (with any classifier).
    #[cfg(feature = "retry")]
    fn sturdy_retry<C>(
        self,
        layer: crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>>;
    /// Adds a timeout per attempt.
    #[cfg(feature = "retry")]
    fn sturdy_attempt_timeout(
        self,
        layer: crate::retry::AttemptTimeoutLayer,
    ) -> ServiceBuilder<Stack<crate::retry::AttemptTimeoutLayer, L>>;
    /// Adds a circuit-breaker layer (with any key and classifier).
    #[cfg(feature = "circuit")]
    fn sturdy_circuit_breaker<K, C>(
        self,
        layer: crate::circuit::CircuitBreakerLayer<K, C>,
    ) -> ServiceBuilder<Stack<crate::circuit::CircuitBreakerLayer<K, C>, L>>;
    /// Adds a rate-limit layer (with any key).
    #[cfg(feature = "ratelimit")]
    fn sturdy_rate_limit<K>(
        self,
        layer: crate::ratelimit::RateLimitLayer<K>,
    ) -> ServiceBuilder<Stack<crate::ratelimit::RateLimitLayer<K>, L>>;
    /// Adds an auth layer.
    #[cfg(feature = "auth")]
    fn sturdy_auth(
        self,
        layer: crate::auth::AuthLayer,
    ) -> ServiceBuilder<Stack<crate::auth::AuthLayer, L>>;
    /// Adds an API-version layer.
    #[cfg(feature = "version")]
    fn sturdy_version(
        self,
        layer: crate::version::VersionLayer,
    ) -> ServiceBuilder<Stack<crate::version::VersionLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "idempotency")]
    fn sturdy_idempotency(
        self,
        layer: crate::idempotency::client::IdempotencyKeyLayer,
    ) -> ServiceBuilder<Stack<crate::idempotency::client::IdempotencyKeyLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "retry")]
    fn sturdy_retry<C>(
        self,
        layer: crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "retry")]
    fn sturdy_attempt_timeout(
        self,
        layer: crate::retry::AttemptTimeoutLayer,
    ) -> ServiceBuilder<Stack<crate::retry::AttemptTimeoutLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "circuit")]
    fn sturdy_circuit_breaker<K, C>(
        self,
        layer: crate::circuit::CircuitBreakerLayer<K, C>,
    ) -> ServiceBuilder<Stack<crate::circuit::CircuitBreakerLayer<K, C>, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "ratelimit")]
    fn sturdy_rate_limit<K>(
        self,
        layer: crate::ratelimit::RateLimitLayer<K>,
    ) -> ServiceBuilder<Stack<crate::ratelimit::RateLimitLayer<K>, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "auth")]
    fn sturdy_auth(
        self,
        layer: crate::auth::AuthLayer,
    ) -> ServiceBuilder<Stack<crate::auth::AuthLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "version")]
    fn sturdy_version(
        self,
        layer: crate::version::VersionLayer,
    ) -> ServiceBuilder<Stack<crate::version::VersionLayer, L>> {
        self.layer(layer)
    }
}
