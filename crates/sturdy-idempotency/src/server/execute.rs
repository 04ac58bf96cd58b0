//! One execution of a handler under a locked key, from the call to the settled key.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use sturdy_core::body::BodyError;
use sturdy_core::BoxError;
use tower::Service;

use super::store::{Begin, BoxFuture, Fingerprint, IdempotencyStore, LockToken, StoredResponse};
use super::{problem, Config, ResponseBody};

/// Headers that describe one connection or one transfer, not the response: not stored, and
/// not replayed when a store holds them anyway (written by another writer of the store).
pub(super) const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "date",
];

/// How an execution ended, once its key is settled.
pub(crate) enum Outcome<T, E> {
    Response(T),
    Error(E),
    Panicked(Box<dyn Any + Send>),
}

/// What the handler produced.
enum Handled<Rb, E> {
    Error(E),
    /// A response that is not stored (a 5xx by default, 408, 425, 429).
    Unstored(Response<Rb>),
    Stored(http::response::Parts, Bytes),
    TooLarge,
    BodyFailed(BoxError),
}

/// The key an execution holds, and what it needs to settle it.
pub(crate) struct Execution<St> {
    pub(crate) store: Arc<St>,
    pub(crate) config: Arc<Config>,
    pub(crate) key: String,
    pub(crate) fp: Fingerprint,
    /// This execution's hold on the key.
    pub(crate) token: LockToken,
    /// Counts a release left to the background (`wait_idle`).
    pub(crate) running: Arc<super::Running>,
}

impl<St: IdempotencyStore> Execution<St> {
    /// Runs the handler to its end, renewing the lock meanwhile, then settles the key: stores
    /// the response, or releases the key. The settlement is complete when this returns, so the
    /// outcome goes out only after the store knows it.
    ///
    /// `timers` says whether tokio's timer is available (lease renewal, pauses between
    /// attempts to store).
    pub(crate) async fn run<S, B, Rb>(
        self,
        mut svc: S,
        req: Request<B>,
        timers: bool,
    ) -> Outcome<Response<ResponseBody<Rb>>, S::Error>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
        Rb: Body,
        Rb::Error: Into<BoxError>,
    {
        let config = self.config.clone();
        let handled = AssertUnwindSafe(async move {
            let res = match svc.call(req).await {
                Ok(res) => res,
                Err(e) => return Handled::Error(e),
            };
            if !config.stores(res.status()) {
                return Handled::Unstored(res);
            }
            let (parts, body) = res.into_parts();
            match sturdy_core::body::buffer(body, config.response_limit).await {
                Ok(bytes) => Handled::Stored(parts, bytes),
                Err(BodyError::TooLarge { .. }) => Handled::TooLarge,
                Err(BodyError::Read(e)) => Handled::BodyFailed(e),
            }
        })
        .catch_unwind();
        let handled = if timers {
            tokio::select! {
                biased;
                h = handled => h,
                never = self.renew_while_running() => match never {},
            }
        } else {
            handled.await
        };

        match handled {
            Err(panic) => {
                tracing::warn!("the handler panicked; its idempotency key is released");
                self.release().await;
                Outcome::Panicked(panic)
            }
            Ok(Handled::Error(e)) => {
                self.release().await;
                Outcome::Error(e)
            }
            Ok(Handled::Unstored(res)) => {
                self.release().await;
                Outcome::Response(res.map(Either::Right))
            }
            Ok(Handled::BodyFailed(e)) => {
                tracing::warn!(error = %e, "the handler's response body failed; its idempotency key is released");
                self.release().await;
                Outcome::Response(problem::response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    problem::RESPONSE_FAILED,
                    "Response failed",
                    "the response could not be read; retry with the same key",
                ))
            }
            Ok(Handled::TooLarge) => {
                let limit = self.config.response_limit;
                tracing::error!(
                    limit,
                    "the handler ran, but its response is larger than the idempotency layer's \
                     response limit; a marker is stored instead (raise the limit with \
                     IdempotencyLayer::with_response_limit)"
                );
                let marker = || {
                    problem::stored(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        problem::RESPONSE_TOO_LARGE,
                        "Response too large to keep",
                        &format!(
                            "the request was processed, but its response is larger than the \
                             {limit}-byte limit for stored responses, so it was not kept"
                        ),
                    )
                };
                self.complete(marker, timers).await;
                Outcome::Response(problem::to_response(marker()))
            }
            Ok(Handled::Stored(parts, body)) => {
                let stored = || StoredResponse {
                    status: parts.status.as_u16(),
                    headers: parts
                        .headers
                        .iter()
                        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
                        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect(),
                    body: body.clone(),
                };
                self.complete(stored, timers).await;
                Outcome::Response(Response::from_parts(parts, Either::Left(Full::new(body))))
            }
        }
    }

    /// Extends the lock every third of the lease while the handler runs. Never returns.
    async fn renew_while_running(&self) -> Infallible {
        let every = (self.config.lease / 3).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            match self
                .store
                .renew(&self.key, self.fp, self.token, self.config.lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "an idempotency lock was taken over by another execution while its \
                         handler still ran; this handler's response will not be stored"
                    );
                    return std::future::pending().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew an idempotency lock; trying again");
                }
            }
        }
    }

    /// Releases the key. A release the store fails (a broken connection, say) is tried again
    /// in the background until the lease ends: the key would otherwise answer 409 to every
    /// retry for the whole lease, though the handler's outcome was not stored.
    async fn release(&self) {
        if let Err(e) = self.store.release(&self.key, self.token).await {
            if tokio::runtime::Handle::try_current().is_err() {
                tracing::warn!(error = %e, "could not release an idempotency lock; it expires with its lease (no runtime to try again on)");
                return;
            }
            tracing::warn!(error = %e, "could not release an idempotency lock; trying again in the background");
            release_in_background(
                &self.store,
                &self.key,
                self.token,
                self.config.lease,
                &self.running,
            );
        }
    }

    /// Stores `stored()`, trying a failure that `again` accepts again twice (50 ms, then
    /// 100 ms later) when timers are available; the last error if every try failed.
    async fn store(
        &self,
        stored: impl Fn() -> StoredResponse,
        timers: bool,
        again: fn(&BoxError) -> bool,
    ) -> Result<(), BoxError> {
        let mut pause = Duration::from_millis(50);
        let attempts = if timers { 3 } else { 1 };
        let mut attempt = 1;
        loop {
            match self
                .store
                .complete(&self.key, self.fp, self.token, stored(), self.config.ttl)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if attempt < attempts && again(&e) => {
                    tracing::warn!(error = %e, attempt, "could not store a response; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores the response, tried 3 times. If every try fails, a small marker is stored in its
    /// place, tried once, and again (as the response is) only while the store's connection is
    /// what fails: a store that refused the response may have closed its connection doing so
    /// (Redis does, for a value past its bulk length), and the marker's first try meets that.
    /// Releasing the key would let a retry run the handler again at once; if the marker fails
    /// too, the key stays locked until its lease ends.
    async fn complete(&self, stored: impl Fn() -> StoredResponse, timers: bool) {
        let Err(e) = self.store(stored, timers, |_| true).await else {
            return;
        };
        // The handler ran: a small marker in its place keeps a retry from running it again (a
        // response larger than the store's byte bound lands here).
        let marker = || {
            problem::stored(
                StatusCode::INTERNAL_SERVER_ERROR,
                problem::RESPONSE_TOO_LARGE,
                "Response too large to keep",
                "the request was processed, but the idempotency store could not keep its \
                 response, so it was not kept",
            )
        };
        let connection = |e: &BoxError| {
            matches!(
                sturdy_core::classify::classify_error(&**e),
                sturdy_core::ErrorKind::Connect | sturdy_core::ErrorKind::Transport
            )
        };
        match self.store(marker, timers, connection).await {
            Ok(()) => tracing::error!(
                error = %e,
                "could not store a response; a marker is stored in its place, so a retry with \
                 this key gets a 500 and the handler does not run again"
            ),
            Err(_) => tracing::error!(
                error = %e,
                "could not store a response; its key stays locked until its lease ends, then a \
                 retry runs the handler again"
            ),
        }
    }
}

/// The store's `begin` for a request, given back if the request goes away before the answer:
/// the store may have locked the key already (a script runs once its command is sent), and a
/// lock whose handler never runs would answer every retry with 409 "still running" until its
/// lease ends. So a request dropped while `begin` is on its way leaves the answer to a
/// background task, which releases the key if it was locked (a store may lock when `begin` is
/// called, before the first poll, so an answer never polled is awaited too).
pub(crate) struct Beginning<St: IdempotencyStore> {
    /// `None` once answered.
    fut: Option<BoxFuture<Result<Begin, BoxError>>>,
    store: Arc<St>,
    key: String,
    token: LockToken,
    lease: Duration,
    /// Counts the background release of a `Beginning` dropped unanswered (`wait_idle`).
    running: Arc<super::Running>,
}

impl<St: IdempotencyStore> Beginning<St> {
    pub(crate) fn new(
        store: &Arc<St>,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
        running: &Arc<super::Running>,
    ) -> Self {
        Self {
            fut: Some(store.begin(key, fp, token, lease)),
            store: store.clone(),
            key: key.to_owned(),
            token,
            lease,
            running: running.clone(),
        }
    }
}

impl<St: IdempotencyStore> Future for Beginning<St> {
    type Output = Result<Begin, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(Err(
                "the idempotency store's answer was already taken".into()
            ));
        };
        let answer = std::task::ready!(fut.as_mut().poll(cx));
        this.fut = None;
        Poll::Ready(answer)
    }
}

impl<St: IdempotencyStore> Drop for Beginning<St> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, key, token, lease) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            self.token,
            self.lease,
        );
        let counted = super::RunningGuard::new(&self.running);
        rt.spawn(async move {
            let _counted = counted;
            let locked = match fut.await {
                Ok(b) => b == Begin::Started,
                Err(e) => may_have_locked(&*e),
            };
            if locked {
                release_lost(&*store, &key, token, lease).await;
            }
        });
    }
}

/// Whether a `begin` that answered with this error may have locked the key all the same: only
/// an error that proves the command never reached the store rules it out.
pub(crate) fn may_have_locked(e: &(dyn std::error::Error + 'static)) -> bool {
    !sturdy_core::classify::delivery(e).proves_not_sent()
}

/// Gives back, in the background, a lock `begin` may have taken although its answer was an
/// error (the connection broke after the command was sent, or the answer came too late), or one
/// whose release failed: the token makes the release act only on this request's lock, if there
/// is one.
pub(crate) fn release_in_background<St: IdempotencyStore>(
    store: &Arc<St>,
    key: &str,
    token: LockToken,
    lease: Duration,
    running: &Arc<super::Running>,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (store, key) = (store.clone(), key.to_owned());
    let counted = super::RunningGuard::new(running);
    rt.spawn(async move {
        let _counted = counted;
        release_lost(&*store, &key, token, lease).await;
    });
}

/// Releases the lock of a request whose handler never ran, or whose outcome is not stored,
/// trying again while the store fails (50 ms apart, doubling up to 1 s). The store that timed
/// out on `begin` (or broke a connection) is often still slow or paused when the first release
/// goes out, and a release that fails leaves the key answering
/// 409 to every retry until its lease ends; past the lease the lock is gone by itself, so the
/// tries stop there. The token keeps a late release from touching a later request's lock.
async fn release_lost<St: IdempotencyStore>(
    store: &St,
    key: &str,
    token: LockToken,
    lease: Duration,
) {
    let give_up = sturdy_core::clock::after(tokio::time::Instant::now(), lease);
    let mut pause = Duration::from_millis(50);
    loop {
        match store.release(key, token).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() + pause >= give_up => {
                tracing::warn!(error = %e, "could not release an idempotency lock (its handler did not run, or its outcome is not stored); it expires with its lease");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not release an idempotency lock yet; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}
