//! What an error says about delivery when an established connection breaks with an io error
//! that, alone, would mean "never connected".

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sturdy::core::classify::{classify_error, delivery};
use sturdy::core::{Delivery, ErrorKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection that is made, and then fails every write with "host unreachable": what Linux
/// reports when an established connection's retransmissions meet an ICMP unreachable.
struct Unreachable;

impl AsyncRead for Unreachable {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Unreachable {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::HostUnreachable.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::ErrorKind::HostUnreachable.into()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Connection for Unreachable {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[derive(Clone)]
struct Connector;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Unreachable>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        std::future::ready(Ok(TokioIo::new(Unreachable)))
    }
}

/// The connection was made, so "host unreachable" under hyper's error broke a connection that
/// may have carried the request: a transport error, "may have been processed", never "not
/// sent" (which would let an unkeyed POST be sent again).
#[tokio::test]
async fn host_unreachable_on_an_established_connection_is_not_read_as_never_sent() {
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(Connector);
    let err = client
        .request(
            Request::post("http://api.example.com/orders")
                .body(Full::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(!err.is_connect(), "{err:?}");
    assert_eq!(classify_error(&err), ErrorKind::Transport, "{err:?}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err:?}");

    // The same kind from a connector (no connection made) is still a connect error: not sent.
    let refused: sturdy::core::BoxError =
        Box::new(std::io::Error::from(std::io::ErrorKind::HostUnreachable));
    assert_eq!(classify_error(&*refused), ErrorKind::Connect);
    assert_eq!(delivery(&*refused), Delivery::NotSent);
}
