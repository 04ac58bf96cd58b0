use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use sturdy_core::events::Event;
use sturdy_core::headers::{may_pause, pause_hint, PauseSource};
use sturdy_core::hold::{AttemptHold, HeldFor};
use sturdy_core::{BoxError, RateLimited};
use tokio::time::Sleep;
use tower::Service;

use crate::gate::{poll_until, Ticket};
use crate::gcra::nanos;
use crate::remote::{BoxFuture, OnStoreError, Reserve};
use crate::state::{Bound, Release};

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit).
    ///
    /// Dropping it while it waits gives its place back: it leaves the key's line (the calls
    /// behind it move up), and a slot a remote store granted it is released, by a task spawned
    /// on the tokio runtime of the dropping thread (dropped outside a runtime, or while the
    /// runtime shuts down, the slot stays used).
    pub struct ResponseFuture<S, B, Rb>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
    {
        #[pin]
        state: State<S, B, S::Future>,
        limiter: Option<Arc<Bound>>,
        released: Option<Released>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Rejected { error: Option<BoxError> },
        // Waiting is the slow path: boxed, so the common future stays small and cheap to move.
        Waiting { slow: Box<Slow<S, B>> },
        Called { #[pin] fut: F },
    }
}

/// A call that waits for its turn, holding the service `poll_ready` made ready.
struct Slow<S, B> {
    bound: Arc<Bound>,
    svc: S,
    req: Option<Request<B>>,
    /// The latest the call may go (ns since the origin) before failing with `RateLimited`.
    deadline: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    turn: Turn,
    /// Slow start let this call out: its place in the release window, held here from the
    /// moment it is taken, so that a panic in the inner service's `call` gives it back too.
    released: Option<Released>,
}

/// Where a waiting call is.
enum Turn {
    /// In the key's line: for a slot of the local quota, or for the pause to end (then, with a
    /// remote quota, the store is asked).
    Queued(Ticket),
    /// Remote quota: asking the store for a slot no more than `max_wait` ns away.
    Asking {
        fut: BoxFuture<Result<Reserve, BoxError>>,
        max_wait: u64,
    },
    /// Remote quota: the store granted a slot at this time.
    Reserved(u64),
    /// Its turn came; nothing is held.
    Done,
}

impl<S, B> Drop for Slow<S, B> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.turn, Turn::Done) {
            Turn::Queued(ticket) => self.bound.state().gate.leave(ticket),
            Turn::Reserved(_) => release(&self.bound),
            Turn::Asking { fut, .. } => release_if_granted(&self.bound, fut),
            Turn::Done => {}
        }
    }
}

/// A call dropped while the store's answer was on its way: the store may have granted it a slot
/// already (a script runs once its command is sent; a store may even decide when `reserve` is
/// called, before the first poll), so the answer is awaited in the background and a granted slot
/// given back, as a call dropped after its grant gives it back. (A store that decides only when
/// polled is asked then, and the slot given back at once: one round trip, nothing lost.)
fn release_if_granted(bound: &Arc<Bound>, fut: BoxFuture<Result<Reserve, BoxError>>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let bound = bound.clone();
        rt.spawn(async move {
            if let Ok(Reserve::Granted { .. }) = fut.await {
                release(&bound);
            }
        });
    }
}

/// Gives a slot the remote store granted back to it, in the background.
fn release(bound: &Bound) {
    let Some(remote) = &bound.config.remote else {
        return;
    };
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let fut = remote.release(bound.key());
        rt.spawn(async move {
            if let Err(e) = fut.await {
                tracing::debug!(error = %e, "could not give an unused slot back to the rate-limit store");
            }
        });
    }
}

impl<S, B, Rb> std::fmt::Debug for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, Rb> ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    pub(crate) fn rejected(error: BoxError) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
            limiter: None,
            released: None,
        }
    }

    pub(crate) fn called(fut: S::Future, bound: Arc<Bound>) -> Self {
        Self {
            state: State::Called { fut },
            limiter: Some(bound),
            released: None,
        }
    }

    fn waiting(slow: Slow<S, B>) -> Self {
        // Held back until its turn: a deadline ending meanwhile can say it was never sent.
        if let Some(hold) = slow
            .req
            .as_ref()
            .and_then(|r| r.extensions().get::<AttemptHold>())
        {
            hold.hold(HeldFor::RateLimit);
        }
        let limiter = Some(slow.bound.clone());
        Self {
            state: State::Waiting {
                slow: Box::new(slow),
            },
            limiter,
            released: None,
        }
    }

    pub(crate) fn queued(
        svc: S,
        req: Request<B>,
        bound: Arc<Bound>,
        ticket: Ticket,
        deadline: u64,
    ) -> Self {
        Self::waiting(Slow {
            bound,
            svc,
            req: Some(req),
            deadline,
            sleep: None,
            turn: Turn::Queued(ticket),
            released: None,
        })
    }

    pub(crate) fn remote(
        svc: S,
        req: Request<B>,
        bound: Arc<Bound>,
        now: u64,
        deadline: u64,
    ) -> Self {
        let turn = ask(&bound, now, deadline);
        Self::waiting(Slow {
            bound,
            svc,
            req: Some(req),
            deadline,
            sleep: None,
            turn,
            released: None,
        })
    }
}

/// What spaces the calls leaving the key's line: the local quota, else the release pace; with a
/// remote quota, nothing (the store spaces them when they ask it). And whether slow start lets
/// them out (no quota, no pace), spaced by the pace learned from bare 429s when there is one.
pub(crate) fn line_pace(bound: &Bound) -> (Option<crate::Quota>, bool) {
    if bound.config.remote.is_some() {
        return (None, false);
    }
    if let Some(q) = bound.state().quota {
        return (Some(q), false);
    }
    match bound.config.release {
        Release::SlowStart => (bound.state().gate.learned(), true),
        Release::Paced(q) => (Some(q), false),
        Release::AllAtOnce => (None, false),
    }
}

/// A call slow start let out of the line: its place in the release window, given back when it
/// finishes (widening the window if it succeeded) or is dropped.
struct Released {
    bound: Arc<Bound>,
    done: bool,
}

impl Released {
    fn finish(&mut self, success: bool) {
        if !self.done {
            self.done = true;
            self.bound.state().gate.finish_release(success);
        }
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        self.finish(false);
    }
}

fn ask(bound: &Bound, now: u64, deadline: u64) -> Turn {
    let remote = bound
        .config
        .remote
        .as_ref()
        .expect("only a layer with a remote store asks it");
    let max_wait = deadline.saturating_sub(now);
    Turn::Asking {
        fut: remote.reserve(bound.key(), Duration::from_nanos(max_wait)),
        max_wait,
    }
}

/// Put in the extensions of a response that asked for a pause longer than the layer's
/// `max_pause` ([`RateLimitLayer::with_max_pause`](crate::RateLimitLayer::with_max_pause)): the
/// key was paused for the cap instead. The response itself is returned as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseCapped {
    asked: Duration,
    applied: Duration,
    source: PauseSource,
}

impl PauseCapped {
    /// The pause the response asked for (a number too large for a `Duration` saturates).
    pub fn asked(&self) -> Duration {
        self.asked
    }

    /// The pause applied: the cap.
    pub fn applied(&self) -> Duration {
        self.applied
    }

    /// Which header asked for it.
    pub fn source(&self) -> PauseSource {
        self.source
    }
}

/// A 429 or a 503: the server refused the call for now.
fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
}

/// Reads a response for pauses the server asked for, caps them, and applies them to every caller
/// of the key.
fn observe<Rb>(bound: &Bound, res: &mut Response<Rb>) {
    if !may_pause(res.status(), res.headers()) {
        return;
    }
    let config = &bound.config;
    let (asked, source) = match pause_hint(res.status(), res.headers(), config.clock.now()) {
        Some(h) => (h.delay, Some(h.source)),
        // A bare 503 is read as a bare 429 when the layer is told to (nginx's `limit_req`
        // refuses with 503 unless told otherwise); by default it is a failure like a 500.
        None if res.status() == StatusCode::TOO_MANY_REQUESTS
            || (res.status() == StatusCode::SERVICE_UNAVAILABLE && config.bare_503_pauses) =>
        {
            (config.default_pause, None)
        }
        None => return,
    };
    let applied = asked.min(config.max_pause);
    let capped = asked > applied;
    if applied.is_zero() {
        return;
    }
    let from = match source {
        Some(source) => source_name(source),
        None if res.status() == StatusCode::SERVICE_UNAVAILABLE => "a 503 without a wait header",
        None => "a 429 without a wait header",
    };
    if let Some(source) = source.filter(|_| asked > applied) {
        tracing::warn!(
            key = bound.key(),
            asked_s = asked.as_secs(),
            applied_s = applied.as_secs(),
            source = from,
            "the server asked for a pause longer than max_pause: pausing for max_pause instead"
        );
        res.extensions_mut().insert(PauseCapped {
            asked,
            applied,
            source,
        });
    }
    let ks = bound.state();
    let now = ks.origin.elapsed();
    // A bare 429 (or 503, when those pause) says nothing about how long to wait: one that arrives while the key is paused
    // answers a call that was in flight when the pause began, and changes nothing.
    if source.is_none() && ks.gate.paused_until() > now {
        return;
    }
    let mut applied_ns = nanos(applied);
    // A bare 429 (or 503, when those pause) that begins a pause (not one of the answers to calls already in flight when
    // it began) teaches a key without a quota to pace its calls: see the gate's docs. Once a
    // pace is learned, the pace holds the calls back, and the pause is one interval of it.
    if source.is_none()
        && ks.quota.is_none()
        && config.remote.is_none()
        && config.release == Release::SlowStart
    {
        if let Some(interval) = ks.gate.learn_slower(applied_ns / 8, applied_ns) {
            applied_ns = applied_ns.min(interval);
        }
    }
    let applied = Duration::from_nanos(applied_ns);
    let until = now.saturating_add(applied_ns);
    if !ks.gate.pause_until(until) {
        return;
    }
    tracing::warn!(
        key = bound.key(),
        pause_ms = u64::try_from(applied.as_millis()).unwrap_or(u64::MAX),
        source = from,
        "the server asked to slow down: pausing every call to this key"
    );
    config.events.emit(&Event::RateLimitPaused {
        key: bound.key(),
        host: bound.host(),
        status: res.status(),
        source,
        pause: applied,
        capped,
    });
    if let Some(remote) = &config.remote {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let fut = remote.pause(bound.key(), applied);
            rt.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::warn!(error = %e, "could not share the pause with the other processes");
                }
            });
        }
    }
}

fn source_name(s: PauseSource) -> &'static str {
    match s {
        PauseSource::RetryAfter => "Retry-After",
        PauseSource::RateLimit => "RateLimit",
        PauseSource::XRateLimit => "X-RateLimit",
    }
}

impl<S, B, Rb> Future for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
                StateProj::Waiting { slow } => {
                    let fut = ready!(poll_slow(slow, cx))?;
                    *this.released = slow.released.take();
                    this.state.set(State::Called { fut });
                }
                StateProj::Called { fut } => {
                    let mut result = ready!(fut.poll(cx)).map_err(Into::into);
                    if let (Ok(res), Some(bound)) = (&mut result, this.limiter.as_ref()) {
                        observe(bound, res);
                        if !is_refusal(res.status()) {
                            bound.state().gate.learn_faster();
                        }
                    }
                    if let Some(r) = this.released.as_mut() {
                        // Observed first: a 429 has already shrunk the window.
                        let ok = result.as_ref().is_ok_and(|res| !is_refusal(res.status()));
                        r.finish(ok);
                    }
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// Drives the slow path until its turn comes, then calls the service `poll_ready` made ready
/// (without asking it for readiness again).
fn poll_slow<S, B, Rb>(
    slow: &mut Slow<S, B>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Future, BoxError>>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    let bound = slow.bound.clone();
    let ks = bound.state();
    let limited = |wait: u64| -> BoxError {
        bound.config.events.emit(&Event::RateLimitRefused {
            key: bound.key(),
            host: bound.host(),
            wait: Duration::from_nanos(wait),
        });
        Box::new(RateLimited::new(Duration::from_nanos(wait)).with_scope(bound.scope()))
    };
    loop {
        match &mut slow.turn {
            Turn::Queued(ticket) => {
                let ticket = *ticket;
                let (pace, slow_start) = line_pace(&bound);
                let turn = ready!(ks.gate.poll_turn(
                    ticket,
                    pace.as_ref(),
                    slow_start,
                    ks.origin,
                    slow.deadline,
                    &mut slow.sleep,
                    cx
                ));
                slow.turn = Turn::Done;
                match turn {
                    Err(wait) => {
                        ks.gate.leave(ticket);
                        // Unknown (0): slow start's window stayed full, the released calls have
                        // not answered. Suggest the wait of a 429 that does not say how long.
                        let wait = if wait == 0 {
                            nanos(bound.config.default_pause).max(1)
                        } else {
                            wait
                        };
                        return Poll::Ready(Err(limited(wait)));
                    }
                    Ok(true) => {
                        slow.released = Some(Released {
                            bound: bound.clone(),
                            done: false,
                        });
                    }
                    Ok(false) => {}
                }
                if bound.config.remote.is_some() {
                    slow.turn = ask(&bound, ks.origin.elapsed(), slow.deadline);
                }
            }
            Turn::Asking { fut, max_wait } => {
                let max_wait = *max_wait;
                let decided = ready!(fut.as_mut().poll(cx));
                let now = ks.origin.elapsed();
                slow.turn = match decided {
                    Ok(Reserve::Granted { wait }) => {
                        // Counted from the ask, as the store counts it (the round trip since
                        // is not the store's doing).
                        if nanos(wait) > max_wait {
                            // A grant later than the call may wait breaks the store's contract
                            // (clock skew, a bug): the slot goes back and the call is refused,
                            // as a call that would wait past `max_wait` is; the store's figure
                            // is capped before it reaches the caller.
                            release(&bound);
                            slow.turn = Turn::Done;
                            let told = wait.min(bound.config.max_pause);
                            return Poll::Ready(Err(limited(nanos(told))));
                        }
                        Turn::Reserved(now.saturating_add(nanos(wait)))
                    }
                    Ok(Reserve::Denied { retry_after }) => {
                        slow.turn = Turn::Done;
                        let told = retry_after.min(bound.config.max_pause);
                        return Poll::Ready(Err(limited(nanos(told))));
                    }
                    Err(e) => match bound.config.on_store_error {
                        OnStoreError::Allow => {
                            tracing::warn!(key = bound.key(), error = %e, "rate-limit store failed; letting the call through");
                            Turn::Done
                        }
                        OnStoreError::Fail => {
                            slow.turn = Turn::Done;
                            // Refused here, before sending: the request never left, and the
                            // fault is the store's, not the destination's (no breaker counts it).
                            // A store that could not be reached, timed out or is failing over
                            // may answer later: the call could not be made, as with a refused
                            // connection, and a retry layer above tries again after its backoff
                            // (each try asks the store again; no call goes without its answer).
                            let transient =
                                sturdy_core::classify::classify_error(&*e).is_retryable();
                            let kind = if transient {
                                sturdy_core::ErrorKind::Connect
                            } else {
                                sturdy_core::ErrorKind::Other
                            };
                            let err = sturdy_core::Error::new(
                                kind,
                                "the rate-limit store failed, so the call was not sent",
                            )
                            .with_source(e)
                            .with_delivery(sturdy_core::Delivery::NotSent)
                            .with_cause_elsewhere();
                            return Poll::Ready(Err(Box::new(err)));
                        }
                    },
                };
            }
            Turn::Reserved(at) => {
                let at = *at;
                ready!(poll_until(&mut slow.sleep, ks.origin.instant(at), cx));
                // A server may have asked for a pause while we waited: give the slot back, wait
                // in line for the pause to end, and ask again, so the callers leave at the
                // store's pace.
                let now = ks.origin.elapsed();
                if ks.gate.paused_until() > now {
                    release(&bound);
                    slow.turn = match ks.gate.join(None, now, slow.deadline) {
                        Ok((ticket, _)) => Turn::Queued(ticket),
                        Err(wait) => {
                            slow.turn = Turn::Done;
                            return Poll::Ready(Err(limited(wait)));
                        }
                    };
                    continue;
                }
                slow.turn = Turn::Done;
            }
            Turn::Done => break,
        }
    }
    let req = slow.req.take().expect("polled after completion");
    if let Some(hold) = req.extensions().get::<AttemptHold>() {
        hold.release();
    }
    Poll::Ready(Ok(slow.svc.call(req)))
}
