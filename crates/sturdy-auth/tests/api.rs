//! The public API: what the token client may be, and the third-party types in public signatures
//! are reachable through this crate.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use sturdy_auth::http_body_util::Full;
use sturdy_auth::{AuthLayer, ClientCredentials, ExposeSecret, SecretString, Token};
use sturdy_core::{BoxError, Error};
use tower::util::{BoxCloneService, BoxCloneSyncService};

/// The facade's composed client type (and any `Clone + Send + Sync` stack) is a token client.
type SyncClient =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<hyper::body::Incoming>, BoxError>;

/// A `Clone + Send` stack that is not `Sync` is one too.
type SendClient = BoxCloneService<Request<Full<Bytes>>, Response<hyper::body::Incoming>, BoxError>;

#[allow(dead_code)]
fn a_boxed_clone_sync_service_is_a_token_client(client: SyncClient) -> Result<AuthLayer, Error> {
    let source = ClientCredentials::new(
        client,
        "https://auth.example.com/oauth/token",
        "id",
        "secret",
    )?;
    Ok(AuthLayer::oauth2(source).with_token_timeout(Duration::from_secs(5)))
}

#[allow(dead_code)]
fn a_boxed_clone_service_is_a_token_client(client: SendClient) -> Result<AuthLayer, Error> {
    let source = ClientCredentials::new(
        client,
        "https://auth.example.com/oauth/token",
        "id",
        "secret",
    )?;
    Ok(AuthLayer::oauth2(source))
}

#[test]
fn secrets_are_reached_through_the_reexports() {
    let secret: SecretString = "s3cr3t".into();
    let layer = AuthLayer::bearer(secret).unwrap();
    assert!(!format!("{layer:?}").contains("s3cr3t"));
    let token = Token::new(sturdy_auth::secrecy::SecretString::from("tok"), None);
    assert_eq!(token.secret().expose_secret(), "tok");
    assert!(!format!("{token:?}").contains("tok\""));
}

#[test]
fn traits() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    send_sync_clone::<SyncClient>();
    send_sync_clone::<ClientCredentials>();
    send_sync_clone::<AuthLayer>();
}
