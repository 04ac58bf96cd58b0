//! Shared by the behaviour tests: a scripted in-process API that logs when each call arrived.

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy_core::BoxError;
use tokio::time::Instant;
use tower::{service_fn, Service};

type Script = Arc<Mutex<Vec<Response<()>>>>;

/// An API that logs when each call arrived (and its URI) and answers from a script, then 200.
#[derive(Clone, Default)]
pub(crate) struct Api {
    log: Arc<Mutex<Vec<(Instant, String)>>>,
    script: Script,
    latency: Duration,
}

impl Api {
    pub(crate) fn with(script: Vec<Response<()>>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into_iter().rev().collect())),
            ..Self::default()
        }
    }

    /// Each answer comes `latency` after the call arrived.
    pub(crate) fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub(crate) fn service(
        &self,
    ) -> impl Service<
        Request<()>,
        Response = Response<()>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
    > + Clone
           + Send
           + 'static {
        let this = self.clone();
        service_fn(move |req: Request<()>| {
            let this = this.clone();
            async move {
                let uri = req.uri().to_string();
                this.log.lock().unwrap().push((Instant::now(), uri));
                let res = this
                    .script
                    .lock()
                    .unwrap()
                    .pop()
                    .unwrap_or_else(|| Response::new(()));
                if !this.latency.is_zero() {
                    tokio::time::sleep(this.latency).await;
                }
                Ok(res)
            }
        })
    }

    /// When each call arrived.
    pub(crate) fn times(&self) -> Vec<Instant> {
        self.log.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }

    /// The URI of each call, in the order they arrived.
    pub(crate) fn uris(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, u)| u.clone())
            .collect()
    }

    /// When each call arrived, as the time since `start`.
    pub(crate) fn since(&self, start: Instant) -> Vec<Duration> {
        self.times().iter().map(|t| *t - start).collect()
    }
}

pub(crate) fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/orders"))
        .body(())
        .unwrap()
}

pub(crate) fn status_with(status: u16, headers: &[(&str, &str)]) -> Response<()> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
