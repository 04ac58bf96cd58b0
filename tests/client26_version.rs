//! version.md: "`::query(name, version)` ...: both are form-encoded" and "(a version the caller
//! set is kept)": a caller's parameter whose name reads the same once form-decoded is the
//! caller's version, whatever bytes spell it.
#![cfg(feature = "full")]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::version::VersionLayer;
use tower::{Layer, ServiceExt};

async fn query_seen(layer: VersionLayer, uri: &str) -> String {
    let api = tower::service_fn(|r: Request<Full<Bytes>>| async move {
        let q = r.uri().query().unwrap_or("").to_owned();
        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from(q)))
    });
    let res = layer
        .layer(api)
        .oneshot(Request::get(uri).body(Full::default()).unwrap())
        .await
        .unwrap();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(b.to_vec()).unwrap()
}

/// The name as the layer itself would write it (`api+version`), and the other spellings of the
/// same form-decoded name.
#[tokio::test]
async fn client26_a_callers_version_under_an_encoded_name_is_kept() {
    let mut added = Vec::new();
    for (name, uri) in [
        ("api version", "http://api.test/x?api+version=2020"),
        ("api version", "http://api.test/x?api%20version=2020"),
        ("api-version", "http://api.test/x?api%2Dversion=2020"),
        ("api-version", "http://api.test/x?api%2dversion=2020"),
        ("api-version", "http://api.test/x?api-version"),
    ] {
        let q = query_seen(VersionLayer::query(name, "2024"), uri).await;
        if q.contains("2024") {
            added.push(format!("{uri} -> ?{q}"));
        }
    }
    assert!(added.is_empty(), "a second version was added: {added:#?}");
}

/// Sanity: the layer's own spelling of a name with a space.
#[tokio::test]
async fn client26_a_query_name_with_a_space_is_form_encoded() {
    let q = query_seen(
        VersionLayer::query("api version", "2024 06"),
        "http://api.test/x",
    )
    .await;
    assert!(
        q == "api+version=2024+06" || q == "api%20version=2024%2006",
        "{q}"
    );
}
