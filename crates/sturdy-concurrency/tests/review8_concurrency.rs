//! Review of `ConcurrencyHandle::set_limit` reporting its change: the event's numbers, bounds,
//! no-op settings, keys that are not hosts, and a key past the most hosts kept.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy_concurrency::AdaptiveConcurrencyLayer;
use sturdy_core::events::Event;
use sturdy_core::BoxError;
use tower::{Layer, ServiceExt};

type Seen = Arc<Mutex<Vec<(String, Option<String>, usize, usize)>>>;

fn recording(layer: AdaptiveConcurrencyLayer) -> (AdaptiveConcurrencyLayer, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let layer = layer.on_event(move |e| {
        if let Event::ConcurrencyLimitChanged {
            key,
            host,
            from,
            to,
        } = *e
        {
            s.lock()
                .unwrap()
                .push((key.to_owned(), host.map(str::to_owned), from, to));
        }
    });
    (layer, seen)
}

fn ev(
    key: &str,
    host: Option<&str>,
    from: usize,
    to: usize,
) -> (String, Option<String>, usize, usize) {
    (key.to_owned(), host.map(str::to_owned), from, to)
}

#[tokio::test]
async fn set_limit_reports_the_change_it_made() {
    let (layer, seen) = recording(
        AdaptiveConcurrencyLayer::new()
            .with_initial_limit(10)
            .with_limits(2, 50),
    );
    let h = layer.handle();
    h.set_limit("a.example", 30);
    // Unchanged: nothing to report.
    h.set_limit("a.example", 30);
    // Taken into the bounds: the event says the limit in force.
    h.set_limit("a.example", 1_000);
    h.set_limit("a.example", 0);
    // A new key: from the initial limit.
    h.set_limit("b.example", 10);
    h.set_limit("b.example", 11);
    assert_eq!(h.limit("a.example"), Some(2));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ev("a.example", Some("a.example"), 10, 30),
            ev("a.example", Some("a.example"), 30, 50),
            ev("a.example", Some("a.example"), 50, 2),
            ev("b.example", Some("b.example"), 10, 11),
        ]
    );
}

#[tokio::test]
async fn set_limit_with_keys_that_are_not_hosts_reports_no_host() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let layer = AdaptiveConcurrencyLayer::new()
        .on_event(move |e| {
            if let Event::ConcurrencyLimitChanged {
                key,
                host,
                from,
                to,
            } = *e
            {
                s.lock()
                    .unwrap()
                    .push((key.to_owned(), host.map(str::to_owned), from, to));
            }
        })
        .with_key(|_r: &Request<()>| "tenant-7".to_owned());
    let h = layer.handle();
    h.set_limit("tenant-7", 5);
    assert_eq!(*seen.lock().unwrap(), [ev("tenant-7", None, 20, 5)]);
}

/// Past the most hosts kept, with the one kept busy: a new host shares the overflow limit, and
/// setting it by hand sets (and reports) that shared limit, under the key `*`.
#[tokio::test]
async fn set_limit_past_the_bound_reports_the_overflow_key() {
    let (layer, seen) = recording(AdaptiveConcurrencyLayer::new().with_max_hosts(1));
    let h = layer.handle();
    let slow = tower::service_fn(|_r: Request<()>| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, BoxError>(Response::new(()))
    });
    let client = layer.layer(slow);
    let busy = tokio::spawn(
        client
            .clone()
            .oneshot(Request::get("http://a.example/x").body(()).unwrap()),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.set_limit("b.example", 3);
    let got = seen.lock().unwrap().clone();
    eprintln!("{got:?}; b.example's limit: {:?}", h.limit("b.example"));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "*", "{got:?}");
    busy.await.unwrap().unwrap();
}
