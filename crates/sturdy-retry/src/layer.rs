use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use sturdy_core::classify::DefaultClassify;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::{Error, ErrorKind, SystemClock, WallClock};
use tower::retry::budget::Budget;
use tower::Layer;

use crate::policy::{BudgetMode, Config, MAX_BUDGET_HOSTS};
use crate::{Backoff, Retry};
use sturdy_core::keyed::{KeyedMap, SlotCache};

/// Retries failed HTTP calls; see the [crate docs](crate) for what is retried, when and how.
///
/// Cheap to clone: the configuration and the retry budgets live behind one `Arc`, shared by every
/// service the layer makes.
/// Which outcomes are retried is decided by a [`Classify`](sturdy_core::Classify) \[[`DefaultClassify`]\]; see
/// [`with_classifier`](Self::with_classifier).
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryLayer<C = DefaultClassify> {
    config: Arc<Config>,
    classify: C,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// The defaults: 4 attempts in all, decorrelated jitter \[base 250 ms, cap 20 s\], Retry-After
    /// honoured up to 60 s with up to +20 % jitter, a per-host budget of 20 % of the calls of the
    /// last 10 s plus a reserve of 10 per second over those 10 s (100 retries, which a burst may
    /// spend at once), bodies buffered up to 1 MiB, no overall deadline, no per-attempt timeout.
    pub fn new() -> Self {
        Self {
            classify: DefaultClassify,
            config: Arc::new(Config {
                max_attempts: 4,
                backoff: Backoff::default(),
                max_retry_after: Duration::from_secs(60),
                retry_after_jitter: 0.2,
                deadline: None,
                attempt_timeout: None,
                body_limit: 1024 * 1024,
                idempotency_header: HeaderName::from_static("idempotency-key"),
                hold_marks: None,
                request_timeouts_below: false,
                budget: BudgetMode::PerHost {
                    ttl: Duration::from_secs(10),
                    min_per_sec: 10,
                    percent: 0.2,
                    map: Arc::new(KeyedMap::new(MAX_BUDGET_HOSTS)),
                },
                seed: None,
                sessions: AtomicU64::new(0),
                clock: Arc::new(SystemClock),
                events: EventHook::none(),
            }),
        }
    }
}

impl<C> RetryLayer<C> {
    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        // Layers are configured before they are cloned, so this is normally free; if the layer was
        // already cloned, the configuration is copied.
        match Arc::get_mut(&mut self.config) {
            Some(c) => f(c),
            None => {
                let c = &*self.config;
                let mut copy = Config {
                    max_attempts: c.max_attempts,
                    backoff: c.backoff,
                    max_retry_after: c.max_retry_after,
                    retry_after_jitter: c.retry_after_jitter,
                    deadline: c.deadline,
                    attempt_timeout: c.attempt_timeout,
                    body_limit: c.body_limit,
                    idempotency_header: c.idempotency_header.clone(),
                    hold_marks: c.hold_marks,
                    request_timeouts_below: c.request_timeouts_below,
                    budget: c.budget.clone(),
                    seed: c.seed,
                    sessions: AtomicU64::new(0),
                    clock: c.clock.clone(),
                    events: c.events.clone(),
                };
                f(&mut copy);
                self.config = Arc::new(copy);
            }
        }
        self
    }

    /// Attempts in all, the first included \[4\]. 1 disables retries (0 is taken as 1).
    pub fn with_max_attempts(self, n: u32) -> Self {
        self.edit(|c| c.max_attempts = n.max(1))
    }

    /// Decides which outcomes are retried \[[`DefaultClassify`]\]: any
    /// [`Classify`](sturdy_core::Classify), such as a closure `|result| -> Outcome` that decides a few cases and leaves
    /// the rest to [`classify_result`](sturdy_core::classify::classify_result). What is
    /// [`Outcome::Retryable`](sturdy_core::Outcome::Retryable) is retried, within the same rules
    /// as always (attempts, budget, deadline, and only when the method or an idempotency key
    /// makes a retry safe).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use http_body_util::Full;
    /// use sturdy_core::classify::{classify_result, Outcome};
    /// use sturdy_core::{BoxError, ErrorKind};
    /// use sturdy_retry::RetryLayer;
    /// use tower::{service_fn, Layer, ServiceExt};
    ///
    /// // An API whose 409 means "busy, try again".
    /// let calls = Arc::new(AtomicU32::new(0));
    /// let counter = calls.clone();
    /// let api = service_fn(move |_req: Request<Full<Bytes>>| {
    ///     let n = counter.fetch_add(1, Ordering::SeqCst);
    ///     async move {
    ///         let status = if n == 0 { StatusCode::CONFLICT } else { StatusCode::OK };
    ///         Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
    ///     }
    /// });
    /// let layer = RetryLayer::new().with_classifier(|r: &Result<Response<()>, BoxError>| match r {
    ///     Ok(res) if res.status() == StatusCode::CONFLICT => Outcome::Retryable(ErrorKind::Client(StatusCode::CONFLICT)),
    ///     other => classify_result(other),
    /// });
    /// let res = layer.layer(api).oneshot(Request::get("http://api.example.com/").body(Full::default()).unwrap()).await.unwrap();
    /// assert_eq!(res.status(), StatusCode::OK);
    /// assert_eq!(calls.load(Ordering::SeqCst), 2);
    /// # }
    /// ```
    pub fn with_classifier<C2>(self, classify: C2) -> RetryLayer<C2> {
        RetryLayer {
            config: self.config,
            classify,
        }
    }

    /// The backoff strategy \[decorrelated jitter, base 250 ms, cap 20 s\].
    pub fn with_backoff(self, backoff: Backoff) -> Self {
        self.edit(|c| c.backoff = backoff)
    }

    /// The longest `Retry-After` this client sleeps \[60 s\]; a longer one fails the call at once
    /// with [`RateLimited`](sturdy_core::RateLimited) so the caller decides. The wait that error
    /// reports is the server's, capped at [`MAX_REPORTED_WAIT`](crate::MAX_REPORTED_WAIT)
    /// (5 min) or at this setting when it is longer: a hostile or broken server cannot tell the
    /// caller to stay away for years. It bounds the waits a server asks for (its `Retry-After`,
    /// and the wait a local rate limiter's refusal carries), not an open
    /// circuit breaker's `retry_in`: that is waited out only by a call with a deadline it fits.
    pub fn with_max_retry_after(self, max: Duration) -> Self {
        self.edit(|c| c.max_retry_after = max)
    }

    /// Extra random wait added to a `Retry-After`, as a fraction of it \[0.2\]; clamped to 0..=1.
    /// A wait shorter than the backoff's base counts as the base here, so a `Retry-After: 0` is
    /// still spread (by up to 50 ms with the defaults).
    pub fn with_retry_after_jitter(self, fraction: f64) -> Self {
        let f = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self.edit(|c| c.retry_after_jitter = f)
    }

    /// An overall deadline for the call, attempts and sleeps together \[none\]. No sleep is started
    /// that would end past it, and an attempt still running at the deadline is abandoned. An
    /// attempt ends when the response's head arrives: reading the body, after the call returns, is
    /// not bounded by this deadline nor by the attempt timeout.
    pub fn with_deadline(self, deadline: Duration) -> Self {
        self.edit(|c| c.deadline = Some(deadline))
    }

    /// A timeout for each attempt \[none\]; a timed-out attempt is retryable.
    ///
    /// The timer sits in this layer, above every layer under it: a circuit breaker below sees an
    /// attempt cut this way as dropped, which it does not count as a failure. To have timeouts
    /// counted by a breaker, put [`AttemptTimeoutLayer`](crate::AttemptTimeoutLayer) under the
    /// breaker instead (as `sturdy::ClientBuilder` does). Like that layer's, the timer is made
    /// only for an attempt that waits, and on a multi-thread runtime one small task per thread may
    /// keep attempt timers from waking the runtime's driver (see
    /// [`AttemptTimeoutLayer`](crate::AttemptTimeoutLayer)).
    ///
    /// A body kept for a replay is read before the first attempt is sent, under a timer of the
    /// same length of its own (from its first wait; the first attempt then gets a full one): a
    /// streamed body that stalls past the timeout fails the call with a
    /// [`Timeout`](sturdy_core::ErrorKind::Timeout) error, not sent, and is not retried (what
    /// was read of it cannot be sent again). A request's own attempt timeout (`CallOptions`)
    /// bounds the read in the same way, unless
    /// [`with_request_timeouts_below`](Self::with_request_timeouts_below) leaves it to a layer
    /// below (which cannot bound the read: bound it with a deadline).
    pub fn with_attempt_timeout(self, timeout: Duration) -> Self {
        self.edit(|c| c.attempt_timeout = Some(timeout))
    }

    /// Whether an [`AttemptTimeoutLayer`](crate::AttemptTimeoutLayer) below keeps a request's
    /// own attempt timeout (`CallOptions::with_attempt_timeout`, or `without_attempt_timeout`)
    /// \[off\]. On, this layer's loop keeps no timer for a request that carries one, whether
    /// longer, shorter or none (its own [`with_attempt_timeout`](Self::with_attempt_timeout),
    /// if set, applies to requests without one): the layer below times the attempt from when it
    /// is sent, so a breaker or an
    /// adaptive concurrency limit between the two sees an attempt that hangs as the timeout it
    /// is, and a wait below (a rate limit's turn, a token) is not counted in it.
    /// `sturdy::ClientBuilder`, whose stack ends with that layer, turns it on.
    pub fn with_request_timeouts_below(self, below: bool) -> Self {
        self.edit(|c| c.request_timeouts_below = below)
    }

    /// The largest body buffered for replay \[1 MiB\]. A body whose size hint does not prove it
    /// fits (a larger or unbounded stream) is sent once and never retried.
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.edit(|c| c.body_limit = bytes)
    }

    /// Whether each attempt of a call with a deadline carries a
    /// [`sturdy_core::hold::AttemptHold`], so that the layers below that hold an attempt back
    /// (rate limit, auth, adaptive concurrency) can mark the wait, and a deadline ending during
    /// it says the attempt was never sent and what it waited for \[off\]. The mark carries the
    /// call's deadline too: the rate limit refuses at once, with `RateLimited`, a call whose turn
    /// would come after it. `sturdy::ClientBuilder`
    /// turns it on when nobody said otherwise here and every layer in its stack is its default or
    /// one of sturdy's that sends each request once or says when it does not (also one switched
    /// on or off with tower's `option_layer`); with a layer of your own, or a `RetryLayer`, in
    /// one of its slots, it stays off.
    ///
    /// Sound only when no layer between this one and those below sends a request more than once
    /// or shares it with other calls without calling
    /// [`AttemptHold::fan_out`](sturdy_core::hold::AttemptHold::fan_out) (sturdy's hedge, auth
    /// and coalescing layers call it; tower's `Retry` or a layer of your own that re-sends do
    /// not belong there then). Off, a deadline that ends mid-attempt says the attempt may have
    /// been processed, which is always safe to act on.
    pub fn with_hold_marks(self, on: bool) -> Self {
        self.edit(|c| c.hold_marks = Some(on))
    }

    /// What [`with_hold_marks`](Self::with_hold_marks) said, if it was called.
    pub fn hold_marks(&self) -> Option<bool> {
        self.config.hold_marks
    }

    /// The header whose presence makes POST and PATCH safe to retry \[`Idempotency-Key`\]. A
    /// blank value (empty, or only spaces and tabs) names no operation and counts as no key.
    pub fn with_idempotency_header(self, name: HeaderName) -> Self {
        self.edit(|c| c.idempotency_header = name)
    }

    /// The header whose presence makes POST and PATCH safe to retry (see
    /// [`with_idempotency_header`](Self::with_idempotency_header)).
    pub fn idempotency_header(&self) -> &HeaderName {
        &self.config.idempotency_header
    }

    /// Per-host retry budgets with tower's `TpsBudget` parameters and arithmetic: deposits live
    /// `ttl` (1 s to 60 s, counted in ten windows), at least `min_per_sec` retries per second are
    /// always allowed, plus `percent` (0.0 to 1000.0, as a fraction: 0.2 is 20 %) of calls
    /// \[10 s, 10, 0.2\]. tower's arithmetic rounds: the reserve is `min_per_sec` times `ttl` in
    /// whole seconds (1.9 s counts as 1 s), and up to 1.0 each retry costs `1 / percent` calls
    /// rounded down (0.3 allows a retry per 3 calls, 33 %; anything above 0.5 one per call); a
    /// `percent` under one in a million is taken as 0.0. The budget follows tokio's clock (paused
    /// in tests), and the first call after any idle time costs what any call does. A retry is
    /// counted when it is scheduled, before its backoff: a call dropped during the backoff does
    /// not give it back.
    ///
    /// # Errors
    /// A [`Config`](ErrorKind::Config) error when `ttl` or `percent` is out of range, or
    /// `min_per_sec` is `i32::MAX` or more, so a bad
    /// value is reported here and not on the first request.
    pub fn with_budget(self, ttl: Duration, min_per_sec: u32, percent: f32) -> Result<Self, Error> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("the retry budget's ttl must be between 1s and 60s, not {ttl:?}"),
            ));
        }
        // tower's `TpsBudget::new` asserts this bound: checked here, so a bad value is an error
        // now and not a panic on the first request.
        if min_per_sec >= i32::MAX as u32 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the retry budget's min_per_sec must be below {}, not {min_per_sec}",
                    i32::MAX
                ),
            ));
        }
        if !(0.0..=1000.0).contains(&percent) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("the retry budget's percent must be between 0.0 and 1000.0, not {percent}"),
            ));
        }
        // tower prices a retry at `1 / percent` calls and scales the reserve by that price with
        // saturating arithmetic: a tiny percent (1e-30) would saturate it and leave one retry
        // of the `min_per_sec × ttl` reserve. Below one retry per million calls the share is
        // nothing anyway: taken as 0.0, which keeps the reserve whole.
        let percent = if percent < 1e-6 { 0.0 } else { percent };
        Ok(self.edit(|c| {
            c.budget = BudgetMode::PerHost {
                ttl,
                min_per_sec,
                percent,
                map: Arc::new(KeyedMap::new(MAX_BUDGET_HOSTS)),
            };
        }))
    }

    /// One budget shared by every host (any tower `Budget`).
    pub fn with_shared_budget(self, budget: Arc<dyn Budget + Send + Sync>) -> Self {
        self.edit(|c| c.budget = BudgetMode::Shared(budget))
    }

    /// No retry budget: only the attempt limit and the deadline bound retries. Not recommended.
    pub fn without_budget(self) -> Self {
        self.edit(|c| c.budget = BudgetMode::Unlimited)
    }

    /// Seeds the jitter, for reproducible tests. Call `n` of the layer uses seed `seed + f(n)`.
    pub fn with_seed(self, seed: u64) -> Self {
        self.edit(|c| c.seed = Some(seed))
    }

    /// The wall clock used to read `Retry-After` dates \[the system clock\].
    pub fn with_clock(self, clock: Arc<dyn WallClock>) -> Self {
        self.edit(|c| c.clock = clock)
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every retry scheduled
    /// (`RetryScheduled`) and every retryable failure that is not retried (`RetryStopped`)
    /// \[none\]; replaces an earlier callback. With the `metrics` feature the same events are
    /// counted through the `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        self.edit(|c| c.events = hook)
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_parts(
            inner,
            self.config.clone(),
            self.classify.clone(),
            SlotCache::default(),
        )
    }
}
