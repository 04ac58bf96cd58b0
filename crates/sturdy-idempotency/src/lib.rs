//! Idempotency keys end to end.
//!
//! - [`client::IdempotencyKeyLayer`]: one random `Idempotency-Key` per logical call (POST and
//!   PATCH by default), set once outside the retry layer so every retry carries the same key.
//!   Never derived from the payload.
//! - [`server::IdempotencyLayer`]: for axum apps (or any tower HTTP server): the first request
//!   with a key runs to its end, even if its client goes away, and its response is stored; a
//!   repeat gets the stored response with `Idempotent-Replayed: true`; a concurrent repeat gets
//!   409 (problem type [`server::problem::IN_FLIGHT`], `Retry-After`), another payload or query
//!   422, a missing key 400 on a route that requires one (`with_require_key(true)`; by default a
//!   request without a key goes to the handler as it is). Keys are scoped per client: you pass the scope
//!   ([`server::ByCredentials`], the usual choice, scopes by the request's credentials).
//!   Stores: [`server::MemoryStore`] (bounded in entries and bytes, TTL, O(log n)) here, and a
//!   Redis store in `sturdy-redis` so several instances agree.
//!
//! Together, a POST that loses its response (a connection reset after the server committed)
//! is retried with the same key and answered from the store: one order, not two.
#![forbid(unsafe_code)]

pub mod client;
pub mod server;
