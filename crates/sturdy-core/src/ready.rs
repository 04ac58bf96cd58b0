//! The service `poll_ready` made ready, taken or given back.
//!
//! tower's contract: once `poll_ready` returns `Ready(Ok)`, the service may hold something for
//! the next `call` (a `ConcurrencyLimit`'s permit, a `Buffer`'s slot), released when that call is
//! made or the service is dropped. A clone of the service holds nothing. So a layer that calls
//! its inner service later (after a wait) takes the ready one into its response future and keeps
//! a clone, and a layer that answers a call without calling its inner service drops the ready one
//! for a clone, or a kept service (`ready().await?.call(req)`) would hold the reservation until
//! its next call, and every other clone would wait for it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use sturdy_core::ready::release_ready;
//! use tower::{limit::ConcurrencyLimit, service_fn, Service, ServiceExt};
//!
//! let svc = ConcurrencyLimit::new(service_fn(|n: u32| async move { Ok::<_, ()>(n) }), 1);
//! let mut kept = svc.clone();
//! kept.ready().await.unwrap(); // holds the only permit
//! release_ready(&mut kept); // a call answered without the inner service gives it back
//! assert_eq!(svc.clone().oneshot(7).await, Ok(7));
//! # }
//! ```

/// The service `poll_ready` made ready, with a clone (not ready) left in its place: for a call
/// that goes to it later.
#[inline]
pub fn take_ready<S: Clone>(svc: &mut S) -> S {
    let clone = svc.clone();
    std::mem::replace(svc, clone)
}

/// Gives back what `poll_ready` reserved, for a call that is answered without calling `svc`: the
/// ready service is dropped and a clone (not ready) takes its place.
#[inline]
pub fn release_ready<S: Clone>(svc: &mut S) {
    drop(take_ready(svc));
}
