//! The retry loop.
//!
//! The decisions are `RetryPolicy`'s, shaped like tower's retry `Policy`. The loop is sturdy's, for three reasons tower's cannot serve: it calls the service `poll_ready`
//! made ready for the first attempt and polls the *same* service again for a retry (tower's loop
//! clones the whole inner stack into every call's future, which costs more than the rest of the
//! layer on the happy path); it keeps only reference-counted pieces of the request for the
//! policy, so a request that cannot be replayed is never copied; and it lets the deadline's error
//! speak for every attempt made so far.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use sturdy_core::classify::Classify;
use sturdy_core::{human_duration, BoxError, CallReport, Delivery, ErrorKind};
use tokio::time::Sleep;
use tower::Service;

use crate::head::KeptHead;
use crate::policy::{advise, CallInfo, CallState, Last, RequestView, RetryPolicy, View};

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    pub struct ResponseFuture<S, B, Rb, C = sturdy_core::DefaultClassify>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
        S::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S::Future, B>,
        // Boxed, like the attempt's timer: most calls have neither, and every layer above moves
        // this future at least once.
        deadline: Option<Pin<Box<Sleep>>>,
        // Everything a retry needs, boxed: the future stays small and cheap to move through the
        // layers above.
        run: Box<Run<S, C>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        // Reading a replayable body into memory before the first attempt, and the attempt
        // timeout's timer once the read has waited (a body that stalls must not hold the call
        // where no attempt's timer runs).
        Buffering { #[pin] body: B, timer: Option<Pin<Box<Sleep>>> },
        // An attempt in flight, and its timer once it has waited past its first poll.
        Calling { #[pin] fut: F, timer: Option<Pin<Box<Sleep>>> },
        Sleeping { #[pin] sleep: Sleep },
        // Waiting for the service to be ready for the next attempt.
        Readying,
        Done,
    }
}

/// What the loop keeps between attempts.
struct Run<A, C> {
    svc: A,
    policy: RetryPolicy<C>,
    /// The request's head while a replay may follow (the policy reads it too), then only what
    /// the policy needs of it.
    kept: Kept,
    /// The request's body, for replays (`None`: it cannot be replayed).
    body: Option<Bytes>,
    /// The body read so far while buffering.
    buf: Option<BytesMut>,
    call: Option<Arc<CallState>>,
    deadline_len: Duration,
    /// Each attempt's timeout, and when the attempt in flight was sent if it has one (its
    /// deadline is the timeout after: computed only for an attempt that waits).
    attempt_timeout: Option<Duration>,
    attempt_sent: Option<tokio::time::Instant>,
    /// The last failed try: what a deadline that cuts the call before another attempt answers
    /// names as the cause.
    last: Option<Last>,
}

impl<S, B, Rb, C> ResponseFuture<S, B, Rb, C>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    C: Classify<Rb, BoxError>,
    S: Clone,
{
    /// A call whose request cannot be replayed: the first attempt is sent now, and it is the
    /// only one.
    pub(crate) fn once(
        mut svc: S,
        mut policy: RetryPolicy<C>,
        info: CallInfo,
        req: Request<B>,
        deadline: Option<Duration>,
        call: Option<Arc<CallState>>,
        attempt_timeout: Option<Duration>,
    ) -> Self {
        // Allocated first, like a replayable call's (see there).
        let slot = Box::new_uninit();
        let attempt_sent = policy.starting_attempt(attempt_timeout.is_some());
        let fut = svc.call(req);
        Self {
            state: State::Calling { fut, timer: None },
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
            run: Box::write(
                slot,
                Run {
                    svc,
                    policy,
                    kept: Kept::Info(info),
                    body: None,
                    buf: None,
                    call,
                    deadline_len: deadline.unwrap_or_default(),
                    attempt_timeout,
                    attempt_sent,
                    last: None,
                },
            ),
        }
    }

    /// A call whose body is read first, so every attempt sends the same bytes.
    #[inline]
    pub(crate) fn replayable(
        svc: &mut S,
        policy: impl FnOnce() -> RetryPolicy<C>,
        req: Request<B>,
        deadline: Option<Duration>,
        call: Option<Arc<CallState>>,
        attempt_timeout: Option<Duration>,
    ) -> Self {
        // Allocated before the state is made, so it is written in place, not built on the stack
        // and copied (the state is the largest thing a call moves).
        let slot = Box::new_uninit();
        let (head, body) = req.into_parts();
        Self {
            state: State::Buffering { body, timer: None },
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
            run: Box::write(
                slot,
                Run {
                    // Taken here, so that it moves once: straight into its place.
                    svc: sturdy_core::ready::take_ready(svc),
                    policy: policy(),
                    kept: Kept::Head(KeptHead::new(head)),
                    body: None,
                    buf: None,
                    call,
                    deadline_len: deadline.unwrap_or_default(),
                    attempt_timeout,
                    attempt_sent: None,
                    last: None,
                },
            ),
        }
    }
}

/// What a call keeps of its request: one or the other, never both, so the loop's state (moved
/// into its box on every call) is no larger than it needs to be.
enum Kept {
    Head(KeptHead),
    Info(CallInfo),
}

impl<S, B, Rb, C> std::fmt::Debug for ResponseFuture<S, B, Rb, C>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field(
                "attempts",
                &self
                    .run
                    .call
                    .as_ref()
                    .map(|a| a.attempts.load(Ordering::Relaxed)),
            )
            .finish_non_exhaustive()
    }
}

/// The error of a call cut by its deadline, with what is known about its attempts: how many
/// were made (one in flight counts), what the last failed one said (its error is the source).
fn deadline_passed(len: Duration, call: Option<&CallState>, last: Option<Last>) -> BoxError {
    let (n, in_flight, held) = call.map_or((0, true, None), |c| {
        (
            c.attempts.load(Ordering::Relaxed),
            c.in_flight.load(Ordering::Relaxed),
            c.hold.held_for(),
        )
    });
    let len_s = human_duration(len);
    let (mut message, made) = match (in_flight, n) {
        // A layer below held the attempt back: it was never sent, and is not counted as made.
        (true, _) if let Some(what) = held => (
            format!(
                "the overall deadline of {len_s} passed while attempt {} waited for {what}, before it was sent",
                n + 1,
            ),
            n,
        ),
        (true, _) => (
            format!(
                "the overall deadline of {len_s} passed during attempt {}",
                n + 1
            ),
            n + 1,
        ),
        (false, 0) => (
            format!("the overall deadline of {len_s} passed before the first attempt was sent"),
            0,
        ),
        (false, 1) => (
            format!("the overall deadline of {len_s} passed after 1 attempt"),
            1,
        ),
        (false, _) => (
            format!("the overall deadline of {len_s} passed after {n} attempts"),
            n,
        ),
    };
    let mut source = None;
    if let Some(last) = last {
        message.push_str(match (last.refused(), in_flight) {
            (true, true) => "; the try before it was refused: ",
            (true, false) => "; the last try was refused: ",
            (false, true) => "; the attempt before it: ",
            (false, false) => "; the last attempt: ",
        });
        message.push_str(&last.said());
        source = last.into_error();
    }
    let delivery = call.map_or(Delivery::MaybeProcessed, CallState::delivery);
    let key = call.and_then(|c| c.key.clone());
    if let Some(c) = call {
        advise(
            &mut message,
            delivery,
            (key.as_deref(), c.keyed),
            c.unsafe_method,
        );
    }
    let mut err = sturdy_core::Error::new(ErrorKind::Timeout, message);
    if let Some(source) = source {
        err = err.with_hidden_source(source);
    }
    let keyed = call.is_some_and(|c| c.keyed);
    Box::new(err.with_report(CallReport::new(made, delivery, key).with_key_carried(keyed)))
}

/// Ends the message of a call that failed while its body was read, before anything was sent:
/// for a method a duplicate would hurt, with the advice every not-sent call of the loop gets
/// ([`advise`]), else with `safe` (may be empty).
fn not_sent(message: &mut String, method: &http::Method, safe: &str) {
    if crate::policy::is_idempotent(method) {
        message.push_str(safe);
    } else {
        advise(message, Delivery::NotSent, (None, false), true);
    }
}

impl<S, B, Rb, C> Future for ResponseFuture<S, B, Rb, C>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    C: Classify<Rb, BoxError>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                // Read before the attempt is dropped: what holds it back speaks for it.
                let err = deadline_passed(
                    this.run.deadline_len,
                    this.run.call.as_deref(),
                    this.run.last.take(),
                );
                this.state.set(State::Done);
                return Poll::Ready(Err(err));
            }
        }
        let run = &mut **this.run;
        loop {
            match this.state.as_mut().project() {
                StateProj::Buffering { mut body, timer } => {
                    // Read frame by frame: a body of one frame (a `Full`) is kept as it is,
                    // without a copy.
                    loop {
                        let frame = match body.as_mut().poll_frame(cx) {
                            Poll::Ready(Some(frame)) => frame,
                            Poll::Ready(None) => break,
                            Poll::Pending => {
                                // The read is part of the first attempt: bounded by its timeout,
                                // counted from the first wait (a body in memory makes none).
                                let Some(limit) = run.attempt_timeout else {
                                    return Poll::Pending;
                                };
                                let t = timer.get_or_insert_with(|| {
                                    Box::pin(tokio::time::sleep(limit.min(sturdy_core::clock::FAR)))
                                });
                                if t.as_mut().poll(cx).is_pending() {
                                    return Poll::Pending;
                                }
                                let mut message = format!(
                                    "the request body stalled: it did not finish within the attempt timeout of {}",
                                    human_duration(limit)
                                );
                                not_sent(
                                    &mut message,
                                    view(&run.kept).method(),
                                    ", so the request was not sent",
                                );
                                let e = sturdy_core::Error::new(ErrorKind::Timeout, message)
                                    .with_delivery(Delivery::NotSent);
                                this.state.set(State::Done);
                                return Poll::Ready(Err(Box::new(e)));
                            }
                        };
                        let frame = match frame {
                            Ok(f) => f,
                            Err(e) => {
                                let mut message = "could not read the request body".to_owned();
                                not_sent(&mut message, view(&run.kept).method(), "");
                                let e = sturdy_core::Error::new(ErrorKind::Body, message)
                                    .with_source(e.into())
                                    .with_delivery(Delivery::NotSent);
                                this.state.set(State::Done);
                                return Poll::Ready(Err(Box::new(e)));
                            }
                        };
                        let mut data = match frame.into_data() {
                            Ok(data) => data,
                            Err(other) => {
                                if other.trailers_ref().is_some_and(|t| !t.is_empty()) {
                                    // A replay is rebuilt from the body's bytes (`B: From<Bytes>`),
                                    // which cannot carry trailers: sending it without them would
                                    // lose them unseen (a checksum, say), on the first attempt too.
                                    let mut message = "the request body has trailers, which an attempt rebuilt from the body's bytes cannot carry, so it was not sent; to keep them, send it with retries off (`CallOptions::without_retries()`) or as a body whose size is not known in advance (sent once, as it is)".to_owned();
                                    not_sent(&mut message, view(&run.kept).method(), "");
                                    let e = sturdy_core::Error::new(ErrorKind::Body, message)
                                        .with_delivery(Delivery::NotSent);
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(Box::new(e)));
                                }
                                continue;
                            }
                        };
                        let chunk = data.copy_to_bytes(data.remaining());
                        let kept = run
                            .buf
                            .as_ref()
                            .map_or_else(|| run.body.as_ref().map_or(0, Bytes::len), BytesMut::len);
                        let limit = run.policy.body_limit();
                        if kept.saturating_add(chunk.len()) > limit {
                            // Its size hint said it fits the limit, and it did not: it is not
                            // kept past the limit, and what was read of it cannot be sent.
                            let e = sturdy_core::Error::new(
                                ErrorKind::Body,
                                format!(
                                    "the request body is larger than its size hint said: more than the {limit} bytes kept for a replay arrived, so it was not sent"
                                ),
                            )
                            .with_delivery(Delivery::NotSent);
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Box::new(e)));
                        }
                        match (&mut run.body, &mut run.buf) {
                            (None, _) => run.body = Some(chunk),
                            (Some(first), None) => {
                                let mut buf = BytesMut::from(&first[..]);
                                buf.extend_from_slice(&chunk);
                                run.buf = Some(buf);
                            }
                            (Some(_), Some(buf)) => buf.extend_from_slice(&chunk),
                        }
                    }
                    if let Some(buf) = run.buf.take() {
                        run.body = Some(buf.freeze());
                    }
                    let body = run.body.get_or_insert_with(Bytes::new).clone();
                    run.policy.set_body(body);
                    // The service was made ready by `poll_ready` before the call: the first
                    // attempt goes to it now.
                    let fut = run.attempt();
                    this.state.set(State::Calling { fut, timer: None });
                }
                StateProj::Calling { fut, timer } => {
                    let mut result = match fut.poll(cx) {
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => {
                            // The attempt's timer is made only now that it waits: most
                            // attempts never need one.
                            let Some(sent) = run.attempt_sent else {
                                return Poll::Pending;
                            };
                            let t = timer.get_or_insert_with(|| {
                                crate::timeout::attempt_timer(
                                    sent,
                                    run.attempt_timeout.unwrap_or_default(),
                                )
                            });
                            ready!(t.as_mut().poll(cx));
                            // A layer below that still holds the attempt back (hold marks on)
                            // says it was never sent.
                            let held = run.call.as_ref().and_then(|c| c.hold.held_for());
                            Err(crate::timeout::timed_out_held(
                                run.attempt_timeout.unwrap_or_default(),
                                held,
                            ))
                        }
                    };
                    match run
                        .policy
                        .decide(&view(&run.kept), &mut result, &mut run.last)
                    {
                        None => {
                            this.state.set(State::Done);
                            return Poll::Ready(result);
                        }
                        Some(delay) => {
                            Last::keep(&mut run.last, result, run.policy.last_try_refused());
                            this.state.set(State::Sleeping {
                                sleep: tokio::time::sleep(delay),
                            });
                        }
                    }
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    // The same service again: its earlier permit went with the earlier
                    // response future.
                    if let Err(e) = ready!(run.svc.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(run.policy.not_ready(
                            &view(&run.kept),
                            e.into(),
                            run.last.take(),
                        )));
                    }
                    let fut = run.attempt();
                    this.state.set(State::Calling { fut, timer: None });
                }
                StateProj::Done => panic!("polled after completion"),
            }
        }
    }
}

/// The request as the policy sees it.
fn view(kept: &Kept) -> View<'_> {
    match kept {
        Kept::Head(head) => View::Head(head),
        Kept::Info(info) => View::Info(info),
    }
}

impl<A, C> Run<A, C> {
    /// Sends the next attempt of a replayable request (the service is ready).
    fn attempt<B>(&mut self) -> A::Future
    where
        A: Service<Request<B>>,
        B: From<Bytes>,
    {
        self.attempt_sent = self.policy.starting_attempt(self.attempt_timeout.is_some());
        let body = B::from(self.body.clone().unwrap_or_default());
        let Kept::Head(head) = &mut self.kept else {
            unreachable!("a call keeps its head while another attempt may be sent")
        };
        let req = if self.policy.is_last_attempt() {
            // No replay can follow: the head itself goes, and the policy keeps what it needs.
            let info = CallInfo::of_head(head, self.policy.key_header());
            let req = head.take_request(body);
            self.kept = Kept::Info(info);
            req
        } else {
            head.request(body)
        };
        self.svc.call(req)
    }
}
