//! The server layer when the request's future is dropped while the store's `begin` is on its
//! way: the store has locked the key (a Redis `SET NX` runs once its command is written), but the
//! handler never runs. Paused time, an in-process service, a store that answers after 10 ms.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy_core::BoxError;
use sturdy_idempotency::server::{
    Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore, LockToken,
    MemoryStore, StoredResponse,
};
use tower::{service_fn, Layer, ServiceExt};

/// A memory store reached over a 10 ms round trip: the operation takes effect when it is sent
/// (the first poll), its answer arrives 10 ms later.
#[derive(Debug, Clone, Default)]
struct Remote {
    inner: MemoryStore,
}

struct RoundTrip<T> {
    op: Option<BoxFuture<T>>,
    answer: Option<T>,
    wire: Pin<Box<tokio::time::Sleep>>,
}

impl<T: Unpin> Future for RoundTrip<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(mut op) = self.op.take() {
            // The memory store answers at once: the operation is done on the "server".
            let Poll::Ready(v) = op.as_mut().poll(cx) else {
                unreachable!("the memory store answers at once")
            };
            self.answer = Some(v);
        }
        std::task::ready!(self.wire.as_mut().poll(cx));
        Poll::Ready(self.answer.take().expect("polled after completion"))
    }
}

fn trip<T: Send + Unpin + 'static>(op: BoxFuture<T>) -> BoxFuture<T> {
    Box::pin(RoundTrip {
        op: Some(op),
        answer: None,
        wire: Box::pin(tokio::time::sleep(Duration::from_millis(10))),
    })
}

impl IdempotencyStore for Remote {
    fn begin(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        l: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        trip(self.inner.begin(k, fp, t, l))
    }
    fn renew(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        l: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        trip(self.inner.renew(k, fp, t, l))
    }
    fn complete(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        r: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        trip(self.inner.complete(k, fp, t, r, ttl))
    }
    fn release(&self, k: &str, t: LockToken) -> BoxFuture<Result<(), BoxError>> {
        trip(self.inner.release(k, t))
    }
}

fn keyed(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::from("{}"))
        .unwrap()
}

/// The guide: a repeat gets 409 "while the first is in flight" (the problem says "the first
/// request with this key is still running"); "store down when the request arrives ... a later
/// retry with the same key runs normally". A request dropped while `begin` was on its way never
/// ran its handler, yet its lock is left in the store: every retry gets 409 "still running"
/// until the lease (30 s) ends, for a request that is not running and never will.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_the_store_locks_its_key_does_not_leave_the_key_locked() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let handler = service_fn(move |_req: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(201)
                    .body(Full::<Bytes>::from("order 1"))
                    .unwrap(),
            )
        }
    });
    let svc = IdempotencyLayer::new(Remote::default(), ByCredentials::default()).layer(handler);
    let mut first = Box::pin(svc.clone().oneshot(keyed("k-dropped")));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(
        first.as_mut().poll(&mut cx).is_pending(),
        "begin is on its way"
    );
    // The client goes away while the store's answer is on the wire.
    drop(first);
    // Well after the answer, and far within the 30 s lease, the client retries.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retry = svc.clone().oneshot(keyed("k-dropped")).await.unwrap();
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "a retry of a request whose handler never ran was refused as in flight"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
