//! TCP proxies in front of Redis nodes that count the RESP commands clients send through them,
//! and can be told to stop forwarding them (a hung Redis).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::{ClusterClient, NodeAddress};
use sturdy_redis::RedisConnection;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

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

/// A proxy in front of one Redis node.
pub(crate) struct Proxy {
    /// `host:port` of the proxy.
    pub(crate) addr: String,
    /// The proxy's URL, with the credentials and database of the URL it was made for.
    pub(crate) url: String,
    pub(crate) commands: Arc<AtomicUsize>,
    pub(crate) stalled: Arc<AtomicBool>,
}

impl Proxy {
    pub(crate) fn sent(&self) -> usize {
        self.commands.load(Ordering::SeqCst)
    }
}

/// A proxy in front of the Redis at `url`.
pub(crate) async fn proxy(url: &str) -> Proxy {
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
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
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
        addr: addr.to_string(),
        url: format!("redis://{creds}{addr}/{path}"),
        commands,
        stalled,
    }
}

/// A cluster connection whose every node is reached through a counting proxy: the client asks
/// the proxies, and the addresses the cluster announces are mapped to them.
pub(crate) async fn cluster_through_proxies(urls: &[String]) -> (RedisConnection, Vec<Proxy>) {
    let mut proxies = Vec::new();
    let mut map = HashMap::new();
    for url in urls {
        let p = proxy(url).await;
        let real = url
            .strip_prefix("redis://")
            .unwrap()
            .trim_end_matches('/')
            .rsplit('@')
            .next()
            .unwrap();
        map.insert(
            NodeAddress::try_from(real).unwrap(),
            NodeAddress::try_from(p.addr.as_str()).unwrap(),
        );
        proxies.push(p);
    }
    let client = ClusterClient::builder(urls.to_vec())
        .node_address_map(map)
        .connection_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let conn = client.get_async_connection().await.unwrap();
    (RedisConnection::from(conn), proxies)
}

/// Commands sent through all `proxies`.
pub(crate) fn sent(proxies: &[Proxy]) -> usize {
    proxies.iter().map(Proxy::sent).sum()
}

/// A connection to `b` whose every command is counted by proxies, with the proxies.
pub(crate) async fn counted(b: &super::Backend) -> (RedisConnection, Vec<Proxy>) {
    match b {
        super::Backend::Single(url) => {
            let p = proxy(url).await;
            let conn = RedisConnection::connect(&p.url).await.unwrap();
            (conn, vec![p])
        }
        super::Backend::Cluster(urls) => cluster_through_proxies(urls).await,
    }
}

/// Stops (or resumes) forwarding through every proxy.
pub(crate) fn stall(proxies: &[Proxy], stalled: bool) {
    for p in proxies {
        p.stalled.store(stalled, Ordering::SeqCst);
    }
}
