//! Idempotency keys end to end.
//!
//! - [`client::IdempotencyKeyLayer`]: one random `Idempotency-Key` per logical call (POST and
//!   PATCH by default), set once outside the retry layer so every retry carries the same key.
//!   Never derived from the payload.
//! - [`server::IdempotencyLayer`]: for axum apps (or any tower HTTP server): the first request
//!   with a key runs and its response is stored; a repeat gets the stored response with
//!   `Idempotent-Replayed: true`; a concurrent repeat gets 409, another payload 422, a missing
//!   key 400. Stores: [`server::MemoryStore`] (bounded, TTL) here, and a Redis store in
//!   `sturdy-redis` so several instances agree.
//!
//! Together, a POST that loses its response (a connection reset after the server committed)
//! is retried with the same key and answered from the store: one order, not two.
#![forbid(unsafe_code)]

pub mod client;
pub mod server;
