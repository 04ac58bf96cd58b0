//! The `sturdy` umbrella `ClientBuilder`'s default stack with coalescing and hedging turned on,
//! as a whole, over the wire against a hyper server on loopback.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::{classify, Delivery};
use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::edge30_util::{client, full, serve, until};

struct Srv {
    count: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<String>>>,
    gate: watch::Sender<bool>,
    base: String,
}

async fn server() -> Srv {
    let (gate, _) = watch::channel(false);
    let count = Arc::new(AtomicUsize::new(0));
    let keys = Arc::new(Mutex::new(Vec::new()));
    let (c, k, g) = (count.clone(), keys.clone(), gate.clone());
    let addr = serve(move |req: Request<Incoming>| {
        let (c, k, mut rx) = (c.clone(), k.clone(), g.subscribe());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            if let Some(v) = req.headers().get("idempotency-key") {
                k.lock().unwrap().push(v.to_str().unwrap().to_owned());
            }
            let _ = rx.wait_for(|o| *o).await;
            Response::new(full(format!("{} {}", req.method(), req.uri().path())))
        }
    })
    .await;
    Srv {
        count,
        keys,
        gate,
        base: format!("http://{addr}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_stack_with_coalesce_and_hedge_shares_one_request() {
    let srv = server().await;
    let (coalesce, ch) = CoalesceLayer::new().pair();
    let (hedge, hh) = HedgeLayer::new().pair();
    let c = ClientBuilder::new()
        .with_coalesce(coalesce)
        .with_hedge(hedge)
        .build(client());
    fn ssc<T: Send + Sync + Clone + 'static>(_: &T) {}
    ssc(&c);
    let url = format!("{}/report", srv.base);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let req = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
            tokio::spawn(c.clone().oneshot(req))
        })
        .collect();
    until("19 joined", || ch.stats().joined() == 19).await;
    srv.gate.send_replace(true);
    for j in calls {
        let res = j.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "GET /report"
        );
    }
    assert_eq!(srv.count.load(Ordering::SeqCst), 1);
    // The hedge layer below saw one call, not twenty.
    let authority = srv.base.trim_start_matches("http://");
    assert_eq!(hh.stats(authority).map(|s| s.calls()), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_through_the_stack_are_neither_coalesced_nor_hedged() {
    let srv = server().await;
    srv.gate.send_replace(true);
    let (coalesce, ch) = CoalesceLayer::new().pair();
    let (hedge, hh) = HedgeLayer::new().pair();
    let mut c = ClientBuilder::new()
        .with_coalesce(coalesce)
        .with_hedge(hedge)
        .build(client());
    let url = format!("{}/orders", srv.base);
    let mut futs = Vec::new();
    for _ in 0..5 {
        let req = Request::post(&url).body(Full::<Bytes>::default()).unwrap();
        futs.push(tokio::spawn(c.ready().await.unwrap().call(req)));
    }
    for f in futs {
        assert_eq!(f.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(srv.count.load(Ordering::SeqCst), 5);
    let mut keys = srv.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 5, "every POST carries a key");
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5, "one key per logical POST");
    assert_eq!(ch.stats().calls(), 0);
    let authority = srv.base.trim_start_matches("http://");
    assert_eq!(hh.stats(authority).map(|s| s.calls()).unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_through_the_stack_names_the_cause_and_not_sent() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = ClientBuilder::new()
        .without_retry()
        .with_coalesce(CoalesceLayer::new())
        .with_hedge(HedgeLayer::new())
        .build(client());
    let url = format!("http://127.0.0.1:{port}/x");
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let req = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
            tokio::spawn(c.clone().oneshot(req))
        })
        .collect();
    for j in calls {
        let err = j.await.unwrap().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("refused"),
            "the message names the cause: {msg}"
        );
        assert_eq!(classify::delivery(&*err), Delivery::NotSent, "{msg}");
    }
}
