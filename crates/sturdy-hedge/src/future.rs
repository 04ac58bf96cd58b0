use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use pin_project_lite::pin_project;
use sturdy_core::classify;
use sturdy_core::events::Event;
use sturdy_core::hold::AttemptHold;
use sturdy_core::keyed::Local;
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Service};

use crate::state::HostState;

pin_project! {
    /// The response future of [`Hedge`](crate::Hedge): the first copy, and the second once it
    /// is due. The first answer wins and the other copy is dropped (cancelled).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        primary: Option<S::Future>,
        hedge: Option<Box<Armed<S, B>>>,
        // The host; `None` for a call that is never hedged.
        host: Option<Arc<Local<HostState>>>,
        // When the first copy was first found waiting; `None` while it has not waited.
        start: Option<Instant>,
        // The error of the copy that failed first while the other was still in flight.
        failed: Option<BoxError>,
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("first_in_flight", &self.primary.is_some())
            .field(
                "hedge_sent",
                &self.hedge.as_ref().is_some_and(|h| h.fut.is_some()),
            )
            .finish()
    }
}

/// What a call keeps to send its second copy: a clone of the inner service (not yet ready) and
/// of the request.
pub(crate) struct Armed<S, B>
where
    S: Service<Request<B>>,
{
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    due: bool,
    /// The first copy's mark: whether a layer below holds it back before sending it.
    hold: AttemptHold,
    /// Whether the first copy was found held back by a layer below when the hedge came due, and
    /// the delay after it is let go has not started yet.
    held: bool,
    svc: S,
    req: Option<Request<B>>,
    fut: Option<Pin<Box<S::Future>>>,
    /// The call's own key where it is not the host state's (past the bound on hosts).
    own: Option<Box<str>>,
    /// The host whose token this hedge took while it is not sent yet: the token goes back if
    /// the hedge is never sent (its service failed to become ready, or the call ended first).
    spent: Option<Arc<Local<HostState>>>,
}

impl<S, B> Drop for Armed<S, B>
where
    S: Service<Request<B>>,
{
    fn drop(&mut self) {
        if let Some(local) = self.spent.take() {
            refund(local.value());
        }
    }
}

/// Gives back a token taken for a hedge that was not sent: a hedge spends one only when sent.
fn refund(host: &HostState) {
    host.budget.deposit(crate::budget::TOKEN, host.config.cap);
}

impl<S, B> Armed<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(
        delay: Duration,
        svc: S,
        req: Request<B>,
        own: Option<Box<str>>,
        hold: AttemptHold,
    ) -> Self {
        Self {
            delay,
            sleep: None,
            due: false,
            hold,
            held: false,
            svc,
            req: Some(req),
            fut: None,
            own,
            spent: None,
        }
    }
}

enum Step<T> {
    Pending,
    /// The hedge will not be sent (no budget, no timer, the service failed).
    Dropped,
    Done(T),
}

impl<S, B> Armed<S, B>
where
    S: Service<Request<B>>,
{
    fn poll_hedge(
        &mut self,
        local: &Arc<Local<HostState>>,
        start: Instant,
        cx: &mut Context<'_>,
    ) -> Step<Result<S::Response, S::Error>> {
        let host = local.value();
        loop {
            if let Some(fut) = self.fut.as_mut() {
                return match fut.as_mut().poll(cx) {
                    Poll::Ready(r) => Step::Done(r),
                    Poll::Pending => Step::Pending,
                };
            }
            if !self.due {
                if self.sleep.is_none() {
                    // Without a runtime there is no timer: the call simply runs unhedged.
                    if tokio::runtime::Handle::try_current().is_err() {
                        return Step::Dropped;
                    }
                    // A delay computed two windows ago or more comes from calls the windows
                    // have forgotten (the host was quiet since): no hedge on it. Checked here,
                    // with the clock read the timer needs anyway, not on the call path.
                    if host.current_delay(start).is_none() {
                        return Step::Dropped;
                    }
                    let at = sturdy_core::clock::after(start, self.delay);
                    self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                }
                if let Some(sleep) = self.sleep.as_mut() {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Step::Pending;
                    }
                }
                // Due, but a layer below still holds the first copy back (it has not been
                // sent): a second copy would wait in the same line, spend a token and a slot of
                // the host's quota, and answer no sooner. The hedge waits, with no timer, until
                // that layer lets the copy go (its `release` wakes this task); then one more
                // delay passes, counted from then. (A copy let go before the hedge first came
                // due is not seen here: the delay then counts from the call's start, as
                // hedge.md says.)
                if let Some(what) = self.hold.held_for() {
                    if !self.held {
                        tracing::trace!(waits_for = %what, "hedge due, but the first copy is not sent yet");
                        self.held = true;
                    }
                    if self.hold.poll_released(cx).is_pending() {
                        return Step::Pending;
                    }
                }
                if self.held {
                    self.held = false;
                    let at = sturdy_core::clock::after(Instant::now(), self.delay);
                    if let Some(sleep) = self.sleep.as_mut() {
                        sleep.as_mut().reset(at);
                    }
                    continue;
                }
                self.sleep = None;
                self.due = true;
                if !host.budget.withdraw() {
                    tracing::trace!("hedge due but the budget is spent");
                    return Step::Dropped;
                }
                self.spent = Some(local.clone());
            }
            match self.svc.poll_ready(cx) {
                Poll::Pending => return Step::Pending,
                Poll::Ready(Err(_)) => {
                    tracing::debug!("hedge not sent: the inner service failed to become ready");
                    if self.spent.take().is_some() {
                        refund(host);
                    }
                    return Step::Dropped;
                }
                Poll::Ready(Ok(())) => {}
            }
            let Some(req) = self.req.take() else {
                return Step::Dropped;
            };
            // Sent: the token is spent.
            self.spent = None;
            host.hedges.fetch_add(1, Ordering::Relaxed);
            // The call's host, also past the bound on hosts (where the state's key is `*`).
            let called = self.own.as_deref().unwrap_or(local.key());
            // Two copies now go their own ways: whether one of them was sent can no longer be
            // read from the mark they share.
            self.hold.fan_out();
            // The host and path only: userinfo and the query may hold credentials.
            tracing::debug!(
                host = called,
                path = req.uri().path(),
                "hedging: sending a second copy"
            );
            host.config.events.emit(&Event::HedgeSent {
                key: local.key(),
                host: host.config.keys_are_hosts.then_some(called),
            });
            self.fut = Some(Box::pin(self.svc.call(req)));
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        Self {
            primary: Some(fut),
            hedge: None,
            host: None,
            start: None,
            failed: None,
        }
    }

    pub(crate) fn hedgeable(
        fut: S::Future,
        local: Arc<Local<HostState>>,
        armed: Option<Box<Armed<S, B>>>,
    ) -> Self {
        Self {
            primary: Some(fut),
            hedge: armed,
            host: Some(local),
            start: None,
            failed: None,
        }
    }
}

/// Records the latency of an answered call: the time to the first answer, which for a call
/// whose hedge won is a lower bound of the first copy's latency (it was at least that slow), so
/// the slow tail stays in the histogram and the delay does not drift down as hedging cuts it. A
/// call answered without ever waiting took no time worth a clock read.
fn record(host: Option<&Arc<Local<HostState>>>, start: Option<Instant>) {
    if let Some(local) = host {
        match start {
            Some(s) => {
                let now = Instant::now();
                local.value().record(now.saturating_duration_since(s), now);
            }
            None => local.value().record_instant(),
        }
    }
}

/// The error a call whose two copies both failed returns: the later one, unless it says the
/// request was never sent while the earlier one may have been processed. Each copy is an attempt
/// of the same call, so "not sent" holds only when it holds for both.
fn worse(earlier: Option<BoxError>, later: BoxError) -> BoxError {
    match earlier {
        Some(e)
            if classify::delivery(&*later).proves_not_sent()
                && !classify::delivery(&*e).proves_not_sent() =>
        {
            e
        }
        _ => later,
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(primary) = this.primary.as_mut().as_pin_mut() {
            match primary.poll(cx) {
                Poll::Ready(Ok(res)) => {
                    *this.hedge = None;
                    record(this.host.as_ref(), *this.start);
                    return Poll::Ready(Ok(res));
                }
                Poll::Ready(Err(e)) => {
                    this.primary.set(None);
                    let e = e.into();
                    let hedge_in_flight = this.hedge.as_ref().is_some_and(|h| h.fut.is_some());
                    if !hedge_in_flight {
                        *this.hedge = None;
                        return Poll::Ready(Err(worse(this.failed.take(), e)));
                    }
                    // The second copy may still succeed; if it fails too, this error may be
                    // the one that tells what the call did.
                    *this.failed = Some(e);
                }
                Poll::Pending => {
                    if this.start.is_none() && this.host.is_some() {
                        *this.start = Some(Instant::now());
                    }
                }
            }
        }
        let (Some(hedge), Some(local), Some(start)) =
            (this.hedge.as_mut(), this.host.as_ref(), *this.start)
        else {
            return Poll::Pending;
        };
        let host = local.value();
        match hedge.poll_hedge(local, start, cx) {
            Step::Pending => Poll::Pending,
            Step::Dropped => {
                *this.hedge = None;
                Poll::Pending
            }
            Step::Done(Ok(res)) => {
                // The second copy answered first: cancel the first.
                this.primary.set(None);
                let own = this.hedge.take().and_then(|mut h| h.own.take());
                host.wins.fetch_add(1, Ordering::Relaxed);
                host.config.events.emit(&Event::HedgeWon {
                    key: local.key(),
                    host: host
                        .config
                        .keys_are_hosts
                        .then(|| own.as_deref().unwrap_or(local.key())),
                });
                record(this.host.as_ref(), Some(start));
                Poll::Ready(Ok(res))
            }
            Step::Done(Err(e)) => {
                *this.hedge = None;
                let e = e.into();
                if this.primary.is_none() {
                    return Poll::Ready(Err(worse(this.failed.take(), e)));
                }
                *this.failed = Some(e);
                Poll::Pending
            }
        }
    }
}
