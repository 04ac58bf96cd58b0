use std::fmt;
use std::sync::Arc;

use http::HeaderName;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::key::ByHost;
use sturdy_core::keyed::SlotCache;
use tower::Layer;

use crate::flight::edit;

use crate::flight::{Cell, Config, Counters, KeyHeaders, Registry};
use crate::{Coalesce, CoalesceHandle};

/// Lets identical safe calls in flight share one upstream call; see the [crate docs](crate).
///
/// Every service the layer makes shares the tables of calls in flight (one `Arc`), and so do the
/// layer's clones and its [`handle`](Self::handle)s. A setter called after a clone or a handle
/// was taken applies to all of them; services made earlier keep the settings they were made
/// with.
///
/// # Example
///
/// ```
/// use http::header::{ACCEPT, AUTHORIZATION};
/// use sturdy_coalesce::CoalesceLayer;
///
/// // Requests are identical when method, URI, Authorization and Accept match; bodies up to
/// // 4 MiB are shared.
/// let (layer, handle) = CoalesceLayer::new()
///     .with_key_headers([AUTHORIZATION, ACCEPT])
///     .with_max_body(4 << 20)
///     .pair();
/// assert_eq!(handle.stats().calls(), 0);
/// # let _ = layer;
/// ```
#[derive(Clone)]
#[must_use]
pub struct CoalesceLayer<K = ByHost> {
    pub(crate) cell: Arc<Cell>,
    pub(crate) key: K,
}

impl<K: fmt::Debug> fmt::Debug for CoalesceLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("registry", &self.cell.get())
            .field("key", &self.key)
            .finish()
    }
}

impl Default for CoalesceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CoalesceLayer {
    /// Coalescing with the defaults: GET and HEAD requests with an empty body and no
    /// [`CallOptions`](sturdy_core::CallOptions) (a request with settings of its own goes on its
    /// own) are identical when
    /// their method, URI and every header match, except `traceparent`, `tracestate`, `baggage`,
    /// `x-request-id` and `x-correlation-id`; a shared body is buffered up to 1 MiB; at most
    /// 1,024 hosts have a table of calls in flight.
    pub fn new() -> Self {
        Self {
            cell: Arc::new(Cell::new(Registry::new(
                Config::default(),
                Arc::new(Counters::default()),
            ))),
            key: ByHost,
        }
    }
}

impl<K> CoalesceLayer<K> {
    /// A layer and a handle on its counters.
    pub fn pair(self) -> (Self, CoalesceHandle) {
        let h = self.handle();
        (self, h)
    }

    /// A handle on this layer's counters and calls in flight.
    pub fn handle(&self) -> CoalesceHandle {
        CoalesceHandle {
            cell: self.cell.clone(),
        }
    }

    /// Two requests are identical only when these headers (and the method and URI) match; other
    /// headers are ignored. A relative URI's `Host` header is always compared: it is the URI's
    /// host. For example `[AUTHORIZATION, ACCEPT]`: callers with different credentials never
    /// share a response, whatever else they send. Replaces the default (every header but a few
    /// per-request ids).
    ///
    /// Name every header that can change the response: a request whose response depends on a
    /// header left out here gets the response to another caller's request.
    pub fn with_key_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        edit(&self.cell, |c| c.headers = KeyHeaders::Only(names));
        self
    }

    /// Two requests are identical when every header matches except these (and the method and
    /// URI). Replaces the default list (`traceparent`, `tracestate`, `baggage`, `x-request-id`,
    /// `x-correlation-id`); an empty list compares every header.
    pub fn with_ignored_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        edit(&self.cell, |c| c.headers = KeyHeaders::AllExcept(names));
        self
    }

    /// The largest body shared \[1 MiB\]. A response whose body is larger is not shared: the
    /// caller that started the call gets it streamed (what was read, then the rest), and every
    /// other caller sends its own request, not coalesced; if the caller that started it has
    /// gone, the first other caller to look takes the response instead.
    pub fn with_max_body(self, bytes: usize) -> Self {
        edit(&self.cell, |c| c.max_body = bytes);
        self
    }

    /// How long the shared response's body may take to arrive, from its head \[30 s\]. Every
    /// caller waits for the whole body (it is read once, for all of them, before any of them gets
    /// the response), so a server that sends the head and then stalls would otherwise hold them
    /// all: past this, each gets a [`Timeout`](sturdy_core::ErrorKind::Timeout) error ("the shared
    /// response's body did not arrive within 30s of its head"). The timer is made only when a
    /// body read has to wait, and runs from that first wait (right after the head, unless some
    /// of the body came with it); later frames do not restart it.
    pub fn with_body_timeout(self, timeout: std::time::Duration) -> Self {
        edit(&self.cell, |c| c.body_timeout = Some(timeout));
        self
    }

    /// No bound on the time the shared body may take (see
    /// [`with_body_timeout`](Self::with_body_timeout)): bound the whole call yourself.
    pub fn without_body_timeout(self) -> Self {
        edit(&self.cell, |c| c.body_timeout = None);
        self
    }

    /// The most hosts with a table of calls in flight \[1,024\] (at least 1: 0 is taken as 1);
    /// past it, hosts with nothing in flight are forgotten, then new hosts share one table.
    pub fn with_max_hosts(self, n: usize) -> Self {
        edit(&self.cell, |c| c.max_hosts = n.max(1));
        self
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every call that joins an
    /// identical call in flight instead of sending its own (`Coalesced`) \[none\]; replaces an
    /// earlier callback. With the `metrics` feature the same events are counted through the
    /// `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        edit(&self.cell, |c| c.events = hook);
        self
    }

    /// Partitions the tables by `key` instead of by host, e.g. a closure `|req| -> String`
    /// (two requests still share a call only when they are identical and have the same key, also
    /// past [`with_max_hosts`](Self::with_max_hosts), where keys share one table). Events then carry the key
    /// but no host (`host: None`), so a key never becomes a metric label.
    /// A key `*` names the state the keys past the bound share
    /// ([`OVERFLOW_KEY`](sturdy_core::keyed::OVERFLOW_KEY)): its calls share it with theirs.
    /// Its keys are kept as given, case and all (the default keys are host names, in lower
    /// case: [`ByHost`](sturdy_core::key::ByHost)), and the handle looks them up as given.
    pub fn with_key<K2>(self, key: K2) -> CoalesceLayer<K2> {
        edit(&self.cell, |c| c.keys_are_hosts = false);
        CoalesceLayer {
            cell: self.cell,
            key,
        }
    }
}

impl<S, K: Clone> Layer<S> for CoalesceLayer<K> {
    type Service = Coalesce<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce {
            inner,
            registry: self.cell.get(),
            key: self.key.clone(),
            cache: SlotCache::default(),
        }
    }
}
