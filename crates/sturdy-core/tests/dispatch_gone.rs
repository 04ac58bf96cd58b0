//! hyper's "dispatch task is gone": the task that ran a client connection was dropped, with the
//! request in its hands, when its runtime shut down. The connection is gone as by a reset, and
//! the request may have been written.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use sturdy_core::classify::{classify_error, delivery, describe};
use sturdy_core::{Delivery, ErrorKind};

/// A peer on 127.0.0.1 that reads what it is sent and never answers; it says on the channel
/// when the first bytes of a request arrived.
fn silent_peer() -> (SocketAddr, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 1024];
            if stream.read(&mut buf).unwrap_or(0) > 0 {
                let _ = tx.send(());
            }
            held.push(stream);
        }
    });
    (addr, rx)
}

#[test]
fn a_connection_dropped_with_its_runtime_is_a_broken_connection() {
    let (addr, arrived) = silent_peer();
    let a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut sender = a.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    });
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let answer = sender.send_request(req);
    // The connection's task on A wrote the request; A goes away with it.
    arrived.recv_timeout(Duration::from_secs(5)).unwrap();
    drop(a);
    let b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = b.block_on(answer).unwrap_err();
    // hyper's words, matched by the classification: this fails if hyper rewords them.
    assert_eq!(err.to_string(), "dispatch task is gone");
    assert_eq!(classify_error(&err), ErrorKind::Transport);
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(
        describe(&err),
        "the connection was dropped with the runtime that ran it, before a response arrived"
    );
}
