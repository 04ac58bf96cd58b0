//! The Redis Streams webhook queue against the real Redis at STURDY_REDIS_URL.

mod support;
use support::{redis_url, unique};

fn stream(name: &str) -> String {
    unique(&format!("webhooks:{name}"))
}

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sturdy_core::{Error, ErrorKind};
use sturdy_redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::http::HeaderMap;
use sturdy_webhook::{EventQueue, Push, WebhookEvent};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("{{\"id\":\"{id}\"}}")))
}

const TTL: Duration = Duration::from_secs(60);

async fn xlen(url: &str, key: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// A consumer of group `group` with a short wait, so that "nothing yet" answers quickly.
async fn consumer(url: &str, s: &str, group: &str, claim_after: Duration) -> RedisStreamConsumer {
    RedisStreamConsumer::connect(url, s, group, "w", claim_after)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20))
}

#[tokio::test]
async fn two_instances_dedup_and_a_crashed_worker_is_taken_over() {
    let Some(url) = redis_url() else { return };
    let s = stream("crash");
    let q1 = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let q2 = RedisStreamQueue::connect(&url, &s).await.unwrap();
    assert_eq!(q1.push(event("evt_1"), TTL).await.unwrap(), Push::Enqueued);
    // The same event arriving at the other instance is a duplicate.
    assert_eq!(q2.push(event("evt_1"), TTL).await.unwrap(), Push::Duplicate);
    assert_eq!(q2.push(event("evt_2"), TTL).await.unwrap(), Push::Enqueued);

    let mut a = RedisStreamConsumer::connect(&url, &s, "workers", "a", Duration::from_millis(200))
        .await
        .unwrap();
    let mut b = RedisStreamConsumer::connect(&url, &s, "workers", "b", Duration::from_millis(200))
        .await
        .unwrap();
    // Worker a takes evt_1 and dies mid-event: no ack.
    let taken = a.next().await.unwrap().unwrap();
    assert_eq!(taken.event, event("evt_1"));
    assert_eq!(taken.deliveries, 1);
    drop(a);
    // Worker b gets the other event at once, and evt_1 once it has been idle long enough.
    let d2 = b.next().await.unwrap().unwrap();
    assert_eq!(d2.event.id, "evt_2");
    b.ack(&d2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d1 = b.next().await.unwrap().unwrap();
    assert_eq!(d1.event, event("evt_1"));
    assert_eq!(d1.deliveries, 2, "the second delivery is counted");
    b.ack(&d1).await.unwrap();
    // Nothing left, nothing delivered twice after its ack.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.next().await.unwrap().is_none());
    assert_eq!(xlen(&url, &s).await, 0, "acknowledged entries are deleted");
}

#[tokio::test]
async fn a_full_stream_refuses_and_does_not_remember_the_id() {
    let Some(url) = redis_url() else { return };
    let s = stream("full");
    let q = RedisStreamQueue::connect(&url, &s)
        .await
        .unwrap()
        .with_max_backlog(2);
    assert_eq!(q.push(event("a"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("b"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("c"), TTL).await.unwrap(), Push::Full);
    let mut w = consumer(&url, &s, "g", Duration::from_secs(30)).await;
    let d = w.next().await.unwrap().unwrap();
    w.ack(&d).await.unwrap();
    assert_eq!(
        q.push(event("c"), TTL).await.unwrap(),
        Push::Enqueued,
        "the redelivery is accepted"
    );
}

#[tokio::test]
async fn events_keep_route_timestamp_and_headers_and_routes_do_not_share_ids() {
    let Some(url) = redis_url() else { return };
    let s = stream("fields");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-github-event", "issues".parse().unwrap());
    headers.append("x-multi", "one".parse().unwrap());
    headers.append("x-multi", "two".parse().unwrap());
    let a = WebhookEvent::new("github", "sha256:00", Bytes::from_static(b"\x00binary\xff"))
        .with_route("org-a")
        .with_timestamp(Some(1_700_000_000))
        .with_headers(headers);
    let b = a.clone().with_route("org-b");
    assert_eq!(q.push(a.clone(), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(b.clone(), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(a.clone(), TTL).await.unwrap(), Push::Duplicate);
    let mut w = consumer(&url, &s, "g", Duration::from_secs(30)).await;
    for expected in [a, b] {
        let d = w.next().await.unwrap().unwrap();
        assert_eq!(d.event, expected);
        w.ack(&d).await.unwrap();
    }
}

#[tokio::test]
async fn a_poison_event_goes_to_the_dead_letter_stream_and_can_be_replayed() {
    let Some(url) = redis_url() else { return };
    let s = stream("poison");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut w = consumer(&url, &s, "g", Duration::from_millis(30))
        .await
        .with_max_deliveries(3);
    q.push(event("poison"), TTL).await.unwrap();
    q.push(event("fine"), TTL).await.unwrap();
    // The handler fails on "poison" every time: it is delivered 3 times, never a 4th.
    let mut seen = Vec::new();
    for _ in 0..40 {
        match w.next().await.unwrap() {
            Some(d) if d.event.id == "fine" => w.ack(&d).await.unwrap(),
            Some(d) => seen.push(d.deliveries),
            None => {}
        }
        if q.dead_letter_count().await.unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(seen, [1, 2, 3]);
    assert!(w.next().await.unwrap().is_none());
    assert_eq!(xlen(&url, &s).await, 0, "nothing left in the stream");

    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.event, event("poison"));
    assert_eq!((d.group.as_str(), d.deliveries), ("g", 3));
    assert!(d.reason.contains("3 deliveries"), "{}", d.reason);
    assert!(q.dead_letters(Some(&d.entry), 10).await.unwrap().is_empty());

    // Fixed handler: replay it. It comes back with a fresh count, and leaves the dead letters.
    assert!(q.replay_dead_letter(&d.entry).await.unwrap());
    assert!(
        !q.replay_dead_letter(&d.entry).await.unwrap(),
        "replayed once"
    );
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    let again = w.next().await.unwrap().unwrap();
    assert_eq!(
        (again.event.clone(), again.deliveries),
        (event("poison"), 1)
    );
    w.ack(&again).await.unwrap();
    assert_eq!(xlen(&url, &s).await, 0);

    // A handler can give up at once; a dead letter can be discarded.
    q.push(event("bad"), TTL).await.unwrap();
    let bad = w.next().await.unwrap().unwrap();
    w.dead_letter(&bad, "unparseable payload").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].deliveries),
        ("unparseable payload", 1)
    );
    assert!(w.next().await.unwrap().is_none());
    assert!(q.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
}

#[tokio::test]
async fn an_ack_never_deletes_what_another_group_still_needs() {
    let Some(url) = redis_url() else { return };
    let s = stream("groups");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut billing = consumer(&url, &s, "billing", Duration::from_secs(30)).await;
    let mut audit = consumer(&url, &s, "audit", Duration::from_secs(30)).await;
    q.push(event("e1"), TTL).await.unwrap();
    q.push(event("e2"), TTL).await.unwrap();

    let b1 = billing.next().await.unwrap().unwrap();
    billing.ack(&b1).await.unwrap();
    assert_eq!(xlen(&url, &s).await, 2, "audit has not read e1 yet");
    let a1 = audit.next().await.unwrap().unwrap();
    assert_eq!(a1.event.id, "e1");
    // Audit holds e1 unacknowledged while billing finishes e2: e2 stays for audit.
    let b2 = billing.next().await.unwrap().unwrap();
    billing.ack(&b2).await.unwrap();
    audit.ack(&a1).await.unwrap();
    assert_eq!(xlen(&url, &s).await, 1, "only e2, which audit still needs");
    let a2 = audit.next().await.unwrap().unwrap();
    assert_eq!(a2.event.id, "e2");
    audit.ack(&a2).await.unwrap();
    assert_eq!(xlen(&url, &s).await, 0, "deleted once every group is done");

    // A dead letter is replayed for the group that gave up on it only.
    q.push(event("e3"), TTL).await.unwrap();
    let b3 = billing.next().await.unwrap().unwrap();
    billing
        .dead_letter(&b3, "billing rejected it")
        .await
        .unwrap();
    let a3 = audit.next().await.unwrap().unwrap();
    audit.ack(&a3).await.unwrap();
    assert_eq!(xlen(&url, &s).await, 0);
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert!(
        audit.next().await.unwrap().is_none(),
        "audit already handled e3"
    );
    let again = billing.next().await.unwrap().unwrap();
    assert_eq!(again.event, event("e3"));
    billing.ack(&again).await.unwrap();
    assert_eq!(xlen(&url, &s).await, 0);
}

// ===== Round trips and timeouts, seen from the wire =====

/// The end of one RESP command at the start of `b`, if it is complete.
fn command_len(b: &[u8]) -> Option<usize> {
    fn number(b: &[u8], at: usize, prefix: u8) -> Option<(usize, usize)> {
        assert_eq!(
            *b.get(at)?,
            prefix,
            "the client speaks RESP arrays of bulk strings"
        );
        let end = at + b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    let (n, mut at) = number(b, 0, b'*')?;
    for _ in 0..n {
        let (len, start) = number(b, at, b'$')?;
        at = start + len + 2;
        if at > b.len() {
            return None;
        }
    }
    Some(at)
}

async fn read(r: &OwnedReadHalf, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        r.readable().await?;
        match r.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

async fn write_all(w: &OwnedWriteHalf, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        w.writable().await?;
        match w.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies until either side closes.
async fn pipe(r: OwnedReadHalf, w: OwnedWriteHalf) {
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = read(&r, &mut buf).await {
        if write_all(&w, &buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy in front of Redis that counts the commands clients send through it, and can be
/// told to stop forwarding them (a hung Redis).
struct Proxy {
    url: String,
    commands: Arc<AtomicUsize>,
    stalled: Arc<AtomicBool>,
}

async fn proxy(url: &str) -> Proxy {
    let rest = url.strip_prefix("redis://").expect("a redis:// URL");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (creds, upstream) = match authority.rsplit_once('@') {
        Some((c, h)) => (format!("{c}@"), h.to_owned()),
        None => (String::new(), authority.to_owned()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let commands = Arc::new(AtomicUsize::new(0));
    let stalled = Arc::new(AtomicBool::new(false));
    let (count, stall) = (commands.clone(), stalled.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(sr, cw));
            let (count, stall) = (count.clone(), stall.clone());
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = vec![0; 64 * 1024];
                loop {
                    let n = match read(&cr, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if stall.load(Ordering::SeqCst) {
                        continue;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(len) = command_len(&pending) {
                        pending.drain(..len);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    if write_all(&sw, &buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Proxy {
        url: format!("redis://{creds}{addr}/{path}"),
        commands,
        stalled,
    }
}

#[tokio::test]
async fn next_costs_one_round_trip_when_an_event_is_waiting() {
    let Some(url) = redis_url() else { return };
    let s = stream("trips");
    let p = proxy(&url).await;
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut w = RedisStreamConsumer::connect(&p.url, &s, "g", "w", Duration::from_millis(30))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    for id in ["e1", "e2"] {
        q.push(event(id), TTL).await.unwrap();
    }
    let sent = |p: &Proxy| p.commands.load(Ordering::SeqCst);
    // A new event, from the first call on.
    let before = sent(&p);
    let d1 = w.next().await.unwrap().unwrap();
    assert_eq!((d1.event.id.as_str(), sent(&p) - before), ("e1", 1));
    // An event to take over (e1, not acknowledged).
    tokio::time::sleep(Duration::from_millis(60)).await;
    let before = sent(&p);
    let again = w.next().await.unwrap().unwrap();
    assert_eq!((again.event.id.as_str(), sent(&p) - before), ("e1", 1));
    w.ack(&again).await.unwrap();
    let before = sent(&p);
    let d2 = w.next().await.unwrap().unwrap();
    assert_eq!((d2.event.id.as_str(), sent(&p) - before), ("e2", 1));
    w.ack(&d2).await.unwrap();
    // Nothing waiting: one more to wait for a new event.
    let before = sent(&p);
    assert!(w.next().await.unwrap().is_none());
    assert_eq!(sent(&p) - before, 2);
}

#[tokio::test]
async fn the_redis_timeout_is_configurable() {
    let Some(url) = redis_url() else { return };
    let s = stream("timeout");
    let p = proxy(&url).await;
    let q = RedisStreamQueue::connect(&p.url, &s)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(50));
    let mut w = RedisStreamConsumer::connect(&p.url, &s, "g", "w", Duration::from_secs(30))
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(50))
        .with_wait(Duration::from_millis(10));
    p.stalled.store(true, Ordering::SeqCst);
    let e = q.push(event("e"), TTL).await.unwrap_err();
    let e = e.downcast_ref::<Error>().unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e.to_string().contains("50ms"), "{e}");
    let e = w.next().await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<Error>().unwrap().kind(),
        &ErrorKind::Timeout
    );
}

#[tokio::test]
async fn empty_names_are_configuration_errors() {
    let Some(url) = redis_url() else { return };
    let kind = |e: sturdy_core::BoxError| e.downcast_ref::<Error>().unwrap().kind().clone();
    assert_eq!(
        kind(RedisStreamQueue::connect(&url, "").await.unwrap_err()),
        ErrorKind::Config
    );
    let s = stream("names");
    for (stream, group, name) in [("", "g", "w"), (s.as_str(), "", "w"), (s.as_str(), "g", "")] {
        let e = RedisStreamConsumer::connect(&url, stream, group, name, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(kind(e), ErrorKind::Config);
    }
}

#[tokio::test]
async fn debug_output_shows_no_url() {
    let Some(url) = redis_url() else { return };
    let s = stream("debug");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let w = consumer(&url, &s, "g", Duration::from_secs(1)).await;
    let shown = format!("{q:?} {w:?}");
    assert!(!shown.contains("redis://"), "{shown}");
}
