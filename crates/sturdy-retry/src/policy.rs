use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Method, Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sturdy_core::classify::{self, Classify, DefaultClassify, Outcome};
use sturdy_core::events::{Event, EventHook, RetryStop};
use sturdy_core::headers::RetryAfter;
use sturdy_core::key::idempotency_key;
use sturdy_core::keyed::{Idle, KeyedMap, Local, SlotCache};
use sturdy_core::trace::{DelaySource, TraceEvent};
use sturdy_core::{
    human_duration, BoxError, CallOptions, CallReport, CircuitOpen, Delivery, ErrorKind,
    OpenReason, RateLimited, Trace, WallClock,
};
use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::budget::WindowBudget;
use crate::head::KeptHead;
use crate::{Backoff, MAX_REPORTED_WAIT};

/// How the retry budget is kept.
#[derive(Clone)]
pub(crate) enum BudgetMode {
    /// One budget per host, made with these parameters (ttl, min per second, percent).
    PerHost {
        ttl: Duration,
        min_per_sec: u32,
        percent: f32,
        map: Arc<KeyedMap<HostBudget>>,
    },
    /// One budget for every host.
    Shared(Arc<dyn Budget + Send + Sync>),
    /// No budget.
    Unlimited,
}

/// Hosts past this many share one budget, so a client that talks to unbounded hosts stays bounded.
pub(crate) const MAX_BUDGET_HOSTS: usize = 1_024;

/// One host's budget.
#[derive(Debug)]
pub(crate) struct HostBudget(WindowBudget);

impl Idle for HostBudget {
    fn is_idle(&self) -> bool {
        // A budget's history is what makes it work: never forget one to make room.
        false
    }
}

/// The budget a call spends from.
#[derive(Clone)]
pub(crate) enum BudgetRef {
    Host(Arc<Local<HostBudget>>),
    Shared(Arc<dyn Budget + Send + Sync>),
}

impl BudgetRef {
    /// One call made, at `now` (a budget of the caller's own reads its own clock).
    fn deposit_at(&self, now: tokio::time::Instant) {
        match self {
            Self::Host(h) => h.value().0.deposit_at(now),
            Self::Shared(b) => b.deposit(),
        }
    }

    fn withdraw(&self) -> bool {
        match self {
            Self::Host(h) => h.value().0.withdraw(),
            Self::Shared(b) => b.withdraw(),
        }
    }
}

impl BudgetMode {
    /// The budget of `host`, through the calling service's cache.
    pub(crate) fn for_host(
        &self,
        host: &str,
        cache: &mut SlotCache<HostBudget>,
    ) -> Option<BudgetRef> {
        match self {
            Self::Unlimited => None,
            Self::Shared(b) => Some(BudgetRef::Shared(b.clone())),
            Self::PerHost {
                ttl,
                min_per_sec,
                percent,
                map,
            } => Some(BudgetRef::Host(cache.get(map, host, || {
                HostBudget(WindowBudget::new(*ttl, *min_per_sec, *percent))
            }))),
        }
    }
}

impl fmt::Debug for BudgetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PerHost {
                ttl,
                min_per_sec,
                percent,
                ..
            } => f
                .debug_struct("PerHost")
                .field("ttl", ttl)
                .field("min_per_sec", min_per_sec)
                .field("percent", percent)
                .finish_non_exhaustive(),
            Self::Shared(_) => f.write_str("Shared"),
            Self::Unlimited => f.write_str("Unlimited"),
        }
    }
}

/// The configuration every clone of a retry layer shares.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_retry_after: Duration,
    pub(crate) retry_after_jitter: f64,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) body_limit: usize,
    pub(crate) idempotency_header: HeaderName,
    /// Whether attempts of calls with a deadline carry a `sturdy_core::hold::AttemptHold`
    /// (`None`: not said, which is off).
    pub(crate) hold_marks: Option<bool>,
    /// Whether a request's own attempt timeout is kept by a layer below (not by the loop).
    pub(crate) request_timeouts_below: bool,
    pub(crate) budget: BudgetMode,
    pub(crate) seed: Option<u64>,
    pub(crate) sessions: AtomicU64,
    pub(crate) clock: Arc<dyn WallClock>,
    pub(crate) events: EventHook,
}

/// What the response future needs to know about the call when the deadline cuts it: shared with
/// the policy, made only when the call has a deadline.
#[derive(Debug, Default)]
pub(crate) struct CallState {
    pub(crate) attempts: AtomicU32,
    pub(crate) maybe_processed: AtomicBool,
    pub(crate) in_flight: AtomicBool,
    /// What the attempt in flight is held back for below, if anything (then it was not sent).
    pub(crate) hold: sturdy_core::hold::AttemptHold,
    /// The idempotency key, whether the request carried one (its bytes may not be text), and
    /// whether the method is one that a duplicate would hurt.
    pub(crate) key: Option<String>,
    pub(crate) keyed: bool,
    pub(crate) unsafe_method: bool,
}

impl CallState {
    /// Whether an attempt is in flight and may have been sent: not while a layer below holds it
    /// back (waiting for its turn, a token, a place).
    pub(crate) fn sent_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) && self.hold.held_for().is_none()
    }

    /// The delivery of the call so far: an attempt in flight may be processed, unless a layer
    /// below still holds it back.
    pub(crate) fn delivery(&self) -> Delivery {
        if self.maybe_processed.load(Ordering::Relaxed) || self.sent_in_flight() {
            Delivery::MaybeProcessed
        } else {
            Delivery::NotSent
        }
    }
}

/// The most attempts a call with `options` may make.
pub(crate) fn max_attempts(config: &Config, options: Option<&CallOptions>) -> u32 {
    options
        .and_then(CallOptions::max_attempts)
        .unwrap_or(config.max_attempts)
}

/// The retry decision for one logical call: [`Retry`](crate::Retry) makes one per call (with the
/// buffered body, the deadline, the host's budget and a random generator). It follows the shape
/// of tower's `Policy` (a decision per outcome that may rewrite the result), but reads what the
/// loop kept of the request, since the request itself went to the service.
pub(crate) struct RetryPolicy<C = DefaultClassify> {
    config: Arc<Config>,
    classify: C,
    body: Option<Bytes>,
    /// Tries made so far (each counts against `max_attempts`), how many of them a layer below
    /// refused before they were sent (the rest are the call's attempts), and the most allowed.
    tries: u32,
    refused: u32,
    max_attempts: u32,
    /// Whether the last try was refused before it was sent (a half-open breaker's look too).
    last_refused: bool,
    /// Shared with the response future for the deadline's error (only when there is a deadline).
    state: Option<Arc<CallState>>,
    prev: Option<Duration>,
    deadline: Option<Instant>,
    budget: Option<BudgetRef>,
    deposited: bool,
    /// Whether an attempt so far may have been processed.
    maybe_processed: bool,
    /// Seeded on the first retry: a call that succeeds at once never pays for it.
    rng: Option<SmallRng>,
}

impl<C> fmt::Debug for RetryPolicy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("tries", &self.tries)
            .field("refused", &self.refused)
            .field("max_attempts", &self.max_attempts)
            .field("replayable", &self.body.is_some())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// What the policy reads of a request: from the request itself (tower's retry loop hands it
/// over), or from what sturdy's own loop kept of it once the request went to the service.
pub(crate) trait RequestView {
    fn method(&self) -> &Method;
    fn host(&self) -> &str;
    fn header(&self, name: &HeaderName) -> Option<&http::HeaderValue>;
    fn trace(&self) -> Option<&Trace>;
}

impl<B> RequestView for Request<B> {
    fn method(&self) -> &Method {
        Self::method(self)
    }
    fn host(&self) -> &str {
        sturdy_core::key::host(self)
    }
    fn header(&self, name: &HeaderName) -> Option<&http::HeaderValue> {
        self.headers().get(name)
    }
    fn trace(&self) -> Option<&Trace> {
        Trace::of(self)
    }
}

/// What sturdy's retry loop keeps of a request for the policy: cheap clones (reference counts),
/// no header map.
#[derive(Debug, Clone)]
pub(crate) struct CallInfo {
    method: Method,
    uri: http::Uri,
    host_header: Option<http::HeaderValue>,
    key: Option<http::HeaderValue>,
    trace: Option<Trace>,
}

impl CallInfo {
    pub(crate) fn of<B>(req: &Request<B>, key_header: &HeaderName) -> Self {
        let uri = req.uri();
        Self {
            method: req.method().clone(),
            uri: uri.clone(),
            host_header: if uri.authority().is_none() {
                req.headers().get(http::header::HOST).cloned()
            } else {
                None
            },
            key: idempotency_key(req.headers().get(key_header)).cloned(),
            trace: Trace::of(req).cloned(),
        }
    }

    /// What the policy needs of a kept head, before the head itself is sent.
    pub(crate) fn of_head(head: &KeptHead, key_header: &HeaderName) -> Self {
        Self {
            method: head.method().clone(),
            uri: head.uri().clone(),
            host_header: if head.uri().authority().is_none() {
                head.header(&http::header::HOST).cloned()
            } else {
                None
            },
            key: idempotency_key(head.header(key_header)).cloned(),
            trace: head.trace().cloned(),
        }
    }
}

impl RequestView for KeptHead {
    fn method(&self) -> &Method {
        Self::method(self)
    }
    fn host(&self) -> &str {
        // The header only matters (and is only looked up) when the URI has no authority.
        let header = self
            .uri()
            .authority()
            .is_none()
            .then(|| Self::header(self, &http::header::HOST))
            .flatten();
        sturdy_core::key::uri_host(self.uri(), header)
    }
    fn header(&self, name: &HeaderName) -> Option<&http::HeaderValue> {
        Self::header(self, name)
    }
    fn trace(&self) -> Option<&Trace> {
        Self::trace(self)
    }
}

/// The request as the policy sees it: its kept head while a replay may follow (no copy made
/// for the policy), else what was taken from it before it was sent.
pub(crate) enum View<'a> {
    Head(&'a KeptHead),
    Info(&'a CallInfo),
}

impl RequestView for View<'_> {
    fn method(&self) -> &Method {
        match self {
            Self::Head(h) => h.method(),
            Self::Info(i) => i.method(),
        }
    }
    fn host(&self) -> &str {
        match self {
            Self::Head(h) => RequestView::host(*h),
            Self::Info(i) => i.host(),
        }
    }
    fn header(&self, name: &HeaderName) -> Option<&http::HeaderValue> {
        match self {
            Self::Head(h) => h.header(name),
            Self::Info(i) => i.header(name),
        }
    }
    fn trace(&self) -> Option<&Trace> {
        match self {
            Self::Head(h) => RequestView::trace(*h),
            Self::Info(i) => i.trace(),
        }
    }
}

impl RequestView for CallInfo {
    fn method(&self) -> &Method {
        &self.method
    }
    fn host(&self) -> &str {
        sturdy_core::key::uri_host(&self.uri, self.host_header.as_ref())
    }
    fn header(&self, _name: &HeaderName) -> Option<&http::HeaderValue> {
        // The only header the policy reads is the idempotency key.
        self.key.as_ref()
    }
    fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }
}

/// Why retrying stopped before the attempts ran out.
enum Stop {
    /// The attempts ran out, or the outcome is not retryable: nothing to add.
    Plain,
    /// A reason worth telling.
    Because(String),
}

impl<C> RetryPolicy<C> {
    /// A policy for one call: `deadline` is the call's overall deadline (if any), `max_attempts`
    /// the most attempts it may make (see [`max_attempts`]).
    pub(crate) fn new(
        config: Arc<Config>,
        classify: C,
        budget: Option<BudgetRef>,
        deadline: Option<Instant>,
        max_attempts: u32,
        state: Option<Arc<CallState>>,
    ) -> Self {
        Self {
            deadline,
            max_attempts,
            budget,
            body: None,
            tries: 0,
            refused: 0,
            last_refused: false,
            state,
            prev: None,
            deposited: false,
            maybe_processed: false,
            rng: None,
            classify,
            config,
        }
    }

    fn rng(&mut self) -> &mut SmallRng {
        let config = &self.config;
        self.rng.get_or_insert_with(|| {
            let seed = match config.seed {
                Some(s) => s.wrapping_add(
                    config
                        .sessions
                        .fetch_add(1, Ordering::Relaxed)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ),
                None => rand::rng().random(),
            };
            SmallRng::seed_from_u64(seed)
        })
    }

    /// An attempt is about to be sent: it is in flight (for the deadline's error), and the first
    /// one deposits in the retry budget (one deposit per logical call: retries may spend a
    /// fraction of what callers make).
    ///
    /// Returns when the attempt is sent if `timed` (it has a timeout, whose deadline counts from
    /// then): the clock is read once for that and for the budget's deposit (each read costs
    /// about 25 ns, and the happy path made three).
    pub(crate) fn starting_attempt(&mut self, timed: bool) -> Option<tokio::time::Instant> {
        if let Some(s) = &self.state {
            s.in_flight.store(true, Ordering::Relaxed);
            // A wait of the attempt before that ended in an error left its mark.
            s.hold.release();
        }
        let deposit = if self.deposited {
            None
        } else {
            self.deposited = true;
            self.budget.as_ref()
        };
        if deposit.is_none() && !timed {
            return None;
        }
        let now = tokio::time::Instant::now();
        if let Some(b) = deposit {
            b.deposit_at(now);
        }
        timed.then_some(now)
    }

    /// Whether the attempt about to be sent is the last one allowed.
    ///
    /// Never with a deadline: a half-open breaker may refuse the attempt (nothing sent, not
    /// counted), and the call then sends one more, so it keeps what it needs to.
    pub(crate) fn is_last_attempt(&self) -> bool {
        self.deadline.is_none() && self.tries + 1 >= self.max_attempts
    }

    /// Whether the last try was refused by a layer below before it was sent.
    pub(crate) fn last_try_refused(&self) -> bool {
        self.last_refused
    }

    /// The attempts made so far: the tries sent on, past every layer that refuses calls.
    fn sent(&self) -> u32 {
        self.tries - self.refused
    }

    /// Marks the call replayable with this body.
    pub(crate) fn set_body(&mut self, body: Bytes) {
        self.body = Some(body);
    }

    /// The largest body kept for replays.
    pub(crate) fn body_limit(&self) -> usize {
        self.config.body_limit
    }

    /// The header that carries the idempotency key.
    pub(crate) fn key_header(&self) -> &HeaderName {
        &self.config.idempotency_header
    }

    fn delivery(&self) -> Delivery {
        if self.maybe_processed {
            Delivery::MaybeProcessed
        } else {
            Delivery::NotSent
        }
    }

    /// Decides whether to retry; may rewrite the result: the error the caller finally gets speaks
    /// for the whole call (attempts, whether it may have been processed, the idempotency key).
    ///
    /// `last` is what the call kept of an earlier failed try (see [`Last`]); a call that ends
    /// here takes it for its error.
    pub(crate) fn decide<Rb>(
        &mut self,
        req: &impl RequestView,
        result: &mut Result<Response<Rb>, BoxError>,
        last: &mut Option<Last>,
    ) -> Option<Duration>
    where
        C: Classify<Rb, BoxError>,
    {
        // A half-open breaker refused the call while its probe runs: there is no time to wait
        // for (`retry_in` is zero), so a call with a deadline looks again after a backoff's base,
        // for as long as its deadline allows. The refusal sent nothing: it is not one of the
        // call's attempts (in its count, messages, report, trace and retry events), and it uses
        // no retry budget. (A call that asked for one attempt gets the refusal back.)
        let probing = self.deadline.is_some()
            && self.max_attempts > 1
            && matches!(&*result, Err(e) if sturdy_core::find::<CircuitOpen>(&**e)
                .is_some_and(|c| c.reason() == OpenReason::Probing));
        // A try a layer below refused before it was sent (an open breaker, the local rate limit,
        // a full concurrency limit, no token) counts against `max_attempts`, so a refusing layer
        // cannot keep the call going, but it is not one of the call's attempts: the report and
        // the messages count only what was sent on.
        let refused = probing || matches!(&*result, Err(e) if refused_before_sent(&**e));
        self.last_refused = refused;
        if !probing {
            self.tries += 1;
            if refused {
                self.refused += 1;
            }
        }
        let n = self.tries;
        let this_attempt = match result {
            // The server answered, so the request reached it. (A 4xx usually means it was not
            // acted on, but "not sent" is only said of requests that never reached the server:
            // a 409 or 422 to a keyed request, say, speaks of an earlier one that was.)
            Ok(_) => Delivery::MaybeProcessed,
            Err(e) => classify::delivery(&**e),
        };
        if this_attempt == Delivery::MaybeProcessed {
            self.maybe_processed = true;
        }
        if let Some(s) = &self.state {
            s.attempts.store(self.sent(), Ordering::Relaxed);
            s.maybe_processed
                .store(self.maybe_processed, Ordering::Relaxed);
            s.in_flight.store(false, Ordering::Relaxed);
        }
        let trace = req.trace();
        if let Some(t) = trace.filter(|_| !probing) {
            t.record(TraceEvent::Attempt {
                number: n,
                outcome: describe_result(result),
            });
        }
        // The key is looked up only when an outcome could be retried: a success never needs it.
        let kind = match self.classify.classify(result) {
            Outcome::Retryable(kind) => kind,
            _ => match retryable_anyway(
                result,
                || idempotency_key(req.header(&self.config.idempotency_header)).is_some(),
                self.deadline.is_some(),
            ) {
                Some(kind) => kind,
                None => {
                    self.finish(req, result, last.take(), Stop::Plain);
                    return None;
                }
            },
        };
        if !(is_idempotent(req.method())
            || idempotency_key(req.header(&self.config.idempotency_header)).is_some()
            || this_attempt.proves_not_sent())
        {
            tracing::debug!(attempt = n, method = %req.method(), "not retried: a non-idempotent request without an idempotency key may already have taken effect");
            self.stopped(req, &kind, RetryStop::NotIdempotent);
            // A wait the server asked for that is not slept ends the call as `RateLimited`, for
            // every reason it is not slept: the caller learns how long.
            self.rate_limited(result, req.host());
            self.finish(
                req,
                result,
                last.take(),
                Stop::Because(format!(
                    "a {} without an idempotency key is not retried once it may have reached the server",
                    req.method()
                )),
            );
            return None;
        }
        let host = req.host().to_owned();
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let (delay, source) = if let Some((wait, source)) =
            server_wait(result, self.config.clock.now())
        {
            let wait = if probing {
                wait.max(self.config.backoff.base())
            } else {
                wait
            };
            // (`max_retry_after` bounds what a server asks for, not the look after a probe nor an
            // open breaker's wait, which only a call with a deadline it fits waits out.)
            let too_long =
                !probing && source != DelaySource::Breaker && wait > self.config.max_retry_after;
            let past_deadline = left.is_some_and(|l| wait >= l);
            if too_long || past_deadline || n >= self.max_attempts {
                let reason = if too_long {
                    format!(
                        "longer than the {} this client waits",
                        human_duration(self.config.max_retry_after)
                    )
                } else if past_deadline {
                    "past the overall deadline".to_owned()
                } else {
                    format!(
                        "and all {n} {} used",
                        if n == 1 { "try is" } else { "tries are" }
                    )
                };
                tracing::info!(attempt = n, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), host = %host, "not waiting {wait:?} as asked: {reason}");
                let stop = if too_long {
                    RetryStop::WaitTooLong
                } else if past_deadline {
                    RetryStop::PastDeadline
                } else {
                    RetryStop::AttemptsExhausted
                };
                self.stopped(req, &kind, stop);
                self.told_to_wait(result, wait, host);
                // A half-open breaker's refusal gives no time to wait for, so the message says
                // what ended the call: its deadline, before the probe answered.
                let stop = if probing {
                    Stop::Because(
                        "its deadline would pass before it could look at the breaker again"
                            .to_owned(),
                    )
                } else {
                    Stop::Plain
                };
                self.finish(req, result, last.take(), stop);
                return None;
            }
            // Never sooner than asked; a little later, so clients do not return in lock-step.
            // (Total for any wait: `with_max_retry_after(Duration::MAX)` lets a peer's value
            // of centuries through to here.)
            let spread = Duration::try_from_secs_f64(
                wait.max(self.config.backoff.base()).as_secs_f64() * self.config.retry_after_jitter,
            )
            .unwrap_or(Duration::MAX);
            let jitter = Duration::from_nanos(self.rng().random_range(0..=nanos(spread)));
            let mut delay = wait.saturating_add(jitter);
            if let Some(l) = left {
                delay = delay
                    .min(l.saturating_sub(Duration::from_millis(1)))
                    .max(wait);
            }
            (delay, source)
        } else {
            if n >= self.max_attempts {
                self.stopped(req, &kind, RetryStop::AttemptsExhausted);
                self.finish(req, result, last.take(), Stop::Plain);
                return None;
            }
            let prev = self.prev;
            let backoff = self.config.backoff;
            let random = self.rng().random();
            let delay = backoff.delay(n, prev, random);
            if left.is_some_and(|l| delay >= l) {
                self.stopped(req, &kind, RetryStop::PastDeadline);
                self.finish(
                    req,
                    result,
                    last.take(),
                    Stop::Because("the next retry would pass the overall deadline".to_owned()),
                );
                return None;
            }
            self.prev = Some(delay);
            (delay, DelaySource::Backoff)
        };
        if self.body.is_none() {
            self.stopped(req, &kind, RetryStop::NotReplayable);
            self.rate_limited(result, &host);
            self.finish(
                req,
                result,
                last.take(),
                Stop::Because(format!(
                    "its body was not kept for a replay (larger than the replay limit of {} bytes, or of unknown size)",
                    self.config.body_limit
                )),
            );
            return None;
        }
        if let Some(b) = self.budget.as_ref().filter(|_| !probing) {
            if !b.withdraw() {
                tracing::info!(attempt = n, host = %host, "not retried: the retry budget is exhausted");
                self.stopped(req, &kind, RetryStop::BudgetExhausted);
                self.rate_limited(result, &host);
                self.finish(
                    req,
                    result,
                    last.take(),
                    Stop::Because(format!("the retry budget for {host} is exhausted")),
                );
                return None;
            }
        }
        if probing {
            // Not a retry of a failed attempt: a look again once the probe may have answered.
            tracing::debug!(delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), host = %host, "the breaker is probing: looking again");
        } else {
            tracing::debug!(attempt = n, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), reason = %kind, source = ?source, "retrying");
            self.config.events.emit(&Event::RetryScheduled {
                // In lower case, as every layer's events name a host.
                host: &sturdy_core::key::host_key(&host),
                method: req.method(),
                attempt: n,
                refused: self.last_refused,
                reason: &kind,
                delay,
                source,
            });
        }
        if let Some(t) = trace {
            t.record(TraceEvent::Delay {
                duration: delay,
                source,
            });
        }
        Some(delay)
    }

    /// Reports a retryable failure that is not retried.
    fn stopped(&self, req: &impl RequestView, reason: &ErrorKind, stop: RetryStop) {
        self.config.events.emit(&Event::RetryStopped {
            host: &sturdy_core::key::host_key(req.host()),
            method: req.method(),
            attempt: self.tries,
            refused: self.last_refused,
            reason,
            stop,
        });
    }

    /// The call ends with `result`. A response is returned as it is (the caller sees the server's
    /// last word), with a [`CallReport`] in its extensions when it is a 4xx, a 5xx or past 599;
    /// an error becomes one [`sturdy_core::Error`] that says what happened in plain words and
    /// what is known about the whole call.
    fn finish<Rb>(
        &self,
        req: &impl RequestView,
        result: &mut Result<Response<Rb>, BoxError>,
        last: Option<Last>,
        stop: Stop,
    ) {
        let n = self.sent();
        let header = req.header(&self.config.idempotency_header);
        let key = || key_text(header);
        // Carried, shown or not (a key that is not UTF-8 text cannot be shown).
        let keyed = || idempotency_key(header).is_some();
        let e = match result {
            Ok(res) => {
                if let Stop::Because(reason) = stop {
                    tracing::info!(status = %res.status(), "not retried: {reason}; returning the last response");
                }
                // 400 and up: a status past 599 reads as a server error too.
                if res.status().as_u16() >= 400 {
                    // A failed call answered by a response: the caller may need to know that an
                    // earlier attempt may have been processed, and under which key.
                    res.extensions_mut().insert(
                        CallReport::new(n, self.delivery(), key()).with_key_carried(keyed()),
                    );
                }
                return;
            }
            Err(e) => e,
        };
        let last_sent = last;
        let last = std::mem::replace(e, Box::new(sturdy_core::Error::new(ErrorKind::Other, "")));
        // The last try was refused before it was sent, after an attempt that was: that
        // attempt's outcome is the call's (it may have been processed), its error (if it ended
        // in one) the source, and the refusal is what came after it, attached as related so
        // that its wait can still be found. (The refusal's own words say "not sent", true of
        // that try only.)
        let (kind, cause, source, related) = match last_sent.filter(|l| !l.refused) {
            Some(sent) if self.last_refused => {
                let cause = format!(
                    "{}; the try after it was refused before it was sent: {}",
                    sent.said(),
                    refusal(&*last)
                );
                let kind = sent.kind();
                // An attempt answered by a status has no error to be the source: the call's
                // error then has none, rather than the refusal, which came after the cause.
                (kind, cause, sent.into_error(), Some(last))
            }
            _ => (
                classify::classify_error(&*last),
                classify::describe(&*last),
                Some(last),
                None,
            ),
        };
        let tries = |k: u32| if k == 1 { "try" } else { "tries" };
        let attempts = |k: u32| if k == 1 { "attempt" } else { "attempts" };
        let so_far = match (n, self.refused) {
            // (One attempt is worth saying when a refusal came after it: a half-open breaker's.)
            (n, 0) if n > 1 || (n == 1 && self.last_refused) => {
                Some(format!("{n} {}", attempts(n)))
            }
            (_, 0) | (0, 1) => None,
            (0, r) => Some(format!("{r} tries, each refused before it was sent")),
            (n, r) => Some(format!("{n} {} and {r} refused {}", attempts(n), tries(r))),
        };
        let mut message = match (so_far, stop) {
            (Some(t), Stop::Because(r)) => format!("gave up after {t} ({r}): {cause}"),
            (Some(t), Stop::Plain) => format!("gave up after {t}: {cause}"),
            (None, Stop::Because(r)) => format!("{cause} (not retried: {r})"),
            (None, Stop::Plain) => cause,
        };
        let delivery = self.delivery();
        let key = key();
        let keyed = keyed();
        advise(
            &mut message,
            delivery,
            (key.as_deref(), keyed),
            !is_idempotent(req.method()),
        );
        let mut err = sturdy_core::Error::new(kind, message)
            .with_report(CallReport::new(n, delivery, key).with_key_carried(keyed));
        if let Some(source) = source {
            err = err.with_hidden_source(source);
        }
        if let Some(related) = related {
            err = err.with_related(related);
        }
        *e = Box::new(err);
    }

    /// A 429 or 503 whose wait is not slept becomes a `RateLimited` error: waiting is the
    /// caller's decision now, so it says how long, and for what host.
    fn told_to_wait<Rb>(
        &self,
        result: &mut Result<Response<Rb>, BoxError>,
        wait: Duration,
        host: String,
    ) {
        if let Ok(res) = result {
            if res.status() == StatusCode::TOO_MANY_REQUESTS
                || res.status() == StatusCode::SERVICE_UNAVAILABLE
            {
                // What the server asked, within reason: a peer's value is capped before it
                // reaches the caller (and, through a tool result, an agent).
                let told = wait.min(MAX_REPORTED_WAIT.max(self.config.max_retry_after));
                *result = Err(Box::new(RateLimited::new(told).with_scope(host)));
            }
        }
    }

    /// `told_to_wait` for a response that is not retried at all, with the wait it asked for.
    fn rate_limited<Rb>(&self, result: &mut Result<Response<Rb>, BoxError>, host: &str) {
        if let Some((wait, DelaySource::RetryAfter)) = server_wait(result, self.config.clock.now())
        {
            self.told_to_wait(result, wait, host.to_owned());
        }
    }

    /// The call ends because the service could not be made ready for the next attempt: the
    /// error speaks for the whole call like any other final error.
    pub(crate) fn not_ready(
        &self,
        req: &impl RequestView,
        err: BoxError,
        last: Option<Last>,
    ) -> BoxError {
        let mut result: Result<Response<()>, BoxError> = Err(err);
        self.finish(
            req,
            &mut result,
            last,
            Stop::Because("the service could not be made ready for the next attempt".to_owned()),
        );
        // `finish` rewrites an error into the call's error; it never turns it into a response.
        result.err().unwrap_or_else(|| {
            Box::new(sturdy_core::Error::new(
                ErrorKind::Other,
                "the service could not be made ready for the next attempt",
            ))
        })
    }
}

/// Appends what the caller may do next, for a request that a duplicate would hurt. `key` is
/// the key as text (`None` for bytes that are not UTF-8), and whether the request carried one.
pub(crate) fn advise(
    message: &mut String,
    delivery: Delivery,
    key: (Option<&str>, bool),
    unsafe_method: bool,
) {
    if !unsafe_method {
        return;
    }
    match (delivery, key) {
        (Delivery::NotSent, _) => {
            message.push_str("; the request was not sent, so it is safe to send again");
        }
        (_, (Some(key), _)) => {
            message.push_str("; it may have been processed: retry with the same idempotency key ");
            message.push_str(key);
        }
        // A key whose bytes are not UTF-8 cannot be written into a message, and a lossy copy
        // would be another key: the caller has it, in the request it built.
        (_, (None, true)) => message.push_str(
            "; it may have been processed: retry with the same idempotency key, the one the request carried (its bytes are not UTF-8 text, so it is not shown here)",
        ),
        (_, (None, false)) => message.push_str(
            "; it may have been processed: check before sending it again, or it may happen twice",
        ),
    }
}

/// What a call keeps of its last failed try while it waits for the next one: the outcome (its
/// status or its error), and whether a layer below refused it before it was sent. A refused
/// try does not replace a sent attempt's outcome: that is what the call's error names, when the
/// deadline cuts it or a later try is refused too.
pub(crate) struct Last {
    outcome: Result<StatusCode, BoxError>,
    refused: bool,
}

impl Last {
    /// Keeps `result` as the call's last failed try, unless it was refused and `kept` was sent.
    pub(crate) fn keep<Rb>(
        kept: &mut Option<Self>,
        result: Result<Response<Rb>, BoxError>,
        refused: bool,
    ) {
        if refused && kept.as_ref().is_some_and(|l| !l.refused) {
            return;
        }
        *kept = Some(Self {
            outcome: result.map(|r| r.status()),
            refused,
        });
    }

    /// Whether a layer below refused this try before it was sent.
    pub(crate) fn refused(&self) -> bool {
        self.refused
    }

    /// The outcome in words (for a refusal, what refused it).
    pub(crate) fn said(&self) -> String {
        match &self.outcome {
            Ok(status) => status.to_string(),
            Err(e) if self.refused => refusal(&**e),
            Err(e) => classify::describe(&**e),
        }
    }

    /// The outcome's kind.
    fn kind(&self) -> ErrorKind {
        match &self.outcome {
            Ok(status) => ErrorKind::from_status(*status).unwrap_or(ErrorKind::Other),
            Err(e) => classify::classify_error(&**e),
        }
    }

    /// The error, to be the source of the call's error.
    pub(crate) fn into_error(self) -> Option<BoxError> {
        self.outcome.err()
    }
}

/// Whether a try was refused by a layer below before it was sent (not the destination's doing:
/// a connect error is an attempt that was sent on, and failed).
fn refused_before_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    classify::delivery(e) == Delivery::NotSent && !classify::concerns_destination(e)
}

/// A refused try in words that speak of that try only: what refused it, without the "not sent"
/// its own message adds (the call's delivery is said once, for the whole call).
fn refusal(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(c) = sturdy_core::find::<CircuitOpen>(e) {
        return match c.reason() {
            OpenReason::Probing => format!(
                "the circuit breaker for {} is half-open while its probe calls are out",
                c.key()
            ),
            OpenReason::Forced => format!("the circuit breaker for {} is forced open", c.key()),
            OpenReason::Overflow => format!(
                "the overflow circuit breaker, which {} shares with the hosts past the most breakers kept, is open for {}",
                c.key(),
                human_duration(c.retry_in())
            ),
            _ => format!(
                "the circuit breaker for {} is open for {}",
                c.key(),
                human_duration(c.retry_in())
            ),
        };
    }
    if let Some(r) = sturdy_core::find::<RateLimited>(e) {
        return r.to_string();
    }
    // A refusal's first clause names what refused it; the rest says what it means for the call.
    let text = classify::describe(e);
    match text.split_once("; ") {
        Some((first, _)) => first.to_owned(),
        None => text,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn describe_result<Rb>(result: &Result<Response<Rb>, BoxError>) -> String {
    match result {
        Ok(r) => r.status().to_string(),
        Err(e) => classify::describe(&**e),
    }
}

/// Outcomes the classifier does not call retryable that a retry can still fix: a 409 that says
/// "the first request with this idempotency key is still in flight" (a `Retry-After` on it, as
/// sturdy's server layer and others send), and an open circuit breaker whose wait fits the
/// deadline.
fn retryable_anyway<Rb>(
    result: &Result<Response<Rb>, BoxError>,
    has_key: impl FnOnce() -> bool,
    has_deadline: bool,
) -> Option<ErrorKind> {
    match result {
        Ok(res)
            if res.status() == StatusCode::CONFLICT
                && res.headers().contains_key(http::header::RETRY_AFTER)
                && has_key() =>
        {
            Some(ErrorKind::Client(StatusCode::CONFLICT))
        }
        Err(e) if has_deadline => {
            sturdy_core::find::<CircuitOpen>(&**e).map(|c| ErrorKind::CircuitOpen {
                retry_in: c.retry_in(),
            })
        }
        _ => None,
    }
}

/// How long the server (or a limiter or breaker below) asked us to wait, if it did.
fn server_wait<Rb>(
    result: &Result<Response<Rb>, BoxError>,
    now: std::time::SystemTime,
) -> Option<(Duration, DelaySource)> {
    match result {
        Ok(res)
            if res.status() == StatusCode::TOO_MANY_REQUESTS
                || res.status() == StatusCode::SERVICE_UNAVAILABLE
                || res.status() == StatusCode::CONFLICT =>
        {
            RetryAfter::from_headers(res.headers())
                .map(|ra| (ra.delay_from(now), DelaySource::RetryAfter))
        }
        Ok(_) => None,
        Err(e) => {
            if let Some(rl) = sturdy_core::find::<RateLimited>(&**e) {
                return Some((rl.retry_after(), DelaySource::RateLimit));
            }
            sturdy_core::find::<CircuitOpen>(&**e).map(|c| (c.retry_in(), DelaySource::Breaker))
        }
    }
}

/// The idempotency key a header value holds, as text an error can name: any UTF-8 a header may
/// hold (`to_str` would drop one with non-ASCII letters, and the call's error would then not
/// name the key to retry with); `None` for no key, a blank one, or bytes that are not UTF-8.
pub(crate) fn key_text(value: Option<&http::HeaderValue>) -> Option<String> {
    idempotency_key(value)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .map(str::to_owned)
}
