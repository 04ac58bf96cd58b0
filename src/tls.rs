//! HTTPS for the hyper-util client: one line, rustls, no OpenSSL.
//!
//! ```
//! # #[cfg(feature = "full")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let http = sturdy::tls::https_client();
//! let client = sturdy::ClientBuilder::new().build(http.clone());
//! # let _ = client;
//! // The same client fetches OAuth2 tokens over HTTPS:
//! let tokens = sturdy::auth::ClientCredentials::new(http, "https://auth.example.com/oauth/token", "id", "secret");
//! assert!(tokens.is_ok());
//! # }
//! # #[cfg(not(feature = "full"))]
//! # fn main() {}
//! ```
//!
//! [`https_client`] trusts the Mozilla root certificates compiled into the program (the
//! `webpki-roots` crate): the same set on every machine, nothing read from disk, nothing to
//! install in a minimal container image, and no way to fail at start. To trust a private
//! certificate authority as well, give its certificates to [`https_client_with_roots`]; to trust
//! what the operating system trusts (a company's proxy, certificates installed by an
//! administrator), enable the `tls-native-roots` feature and use
//! `https_client_with_native_roots`. For client certificates or any other rustls setting, build
//! a [`rustls::ClientConfig`] and use [`https_client_with_config`].
//!
//! Every constructor returns an [`HttpsClient`]: a hyper-util client over rustls (through
//! hyper-rustls), HTTP/1.1 (ALPN `http/1.1`), with `TCP_NODELAY` on. The constructors that make
//! the rustls configuration themselves use the ring crypto provider and TLS 1.2 and 1.3. The
//! client also sends plain `http://` requests, so one client serves both. It is
//! `Clone + Send + Sync`; clones share one connection pool.
//!
//! A certificate the client does not trust fails the connection before anything is sent: the
//! error reads like `TLS handshake failed (invalid peer certificate: UnknownIssuer)` (see
//! [`sturdy_core::classify::describe`]).
//!
//! PEM files: `CertificateDer::pem_file_iter(path)` (from
//! `rustls::pki_types::pem::PemObject`) reads every certificate in one.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sturdy_core::{Error, ErrorKind};

pub use hyper_rustls::HttpsConnector;
pub use rustls;
pub use rustls::pki_types::CertificateDer;
pub use rustls::{ClientConfig, RootCertStore};

/// A hyper-util client that speaks HTTPS (and plain HTTP), with `Full<Bytes>` request bodies:
/// what `sturdy::ClientBuilder::build` and `ClientCredentials::new` take.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS client that trusts the Mozilla root certificates ([`webpki_roots()`]).
///
/// # Panics
///
/// Never: the ring provider supports the protocol versions asked for.
pub fn https_client() -> HttpsClient {
    https_client_with_config(config(webpki_roots()))
}

/// An HTTPS client that trusts the Mozilla root certificates and `extra` (DER-encoded
/// certificates, for example a private certificate authority or a test server's self-signed
/// certificate).
///
/// # Errors
///
/// A `Config` error naming the certificate that is not a valid X.509 certificate.
pub fn https_client_with_roots<I>(extra: I) -> Result<HttpsClient, Error>
where
    I: IntoIterator<Item = CertificateDer<'static>>,
{
    let mut roots = webpki_roots();
    for (i, cert) in extra.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("extra root certificate #{} cannot be trusted: {e}", i + 1),
            )
            .with_hidden_source(e)
        })?;
    }
    Ok(https_client_with_config(config(roots)))
}

/// An HTTPS client that trusts the certificates of the operating system's store (read once, now),
/// and not the compiled-in Mozilla roots. Feature `tls-native-roots`.
///
/// # Errors
///
/// A `Config` error when the store has no certificate rustls can use, with what went wrong
/// reading it.
#[cfg(feature = "tls-native-roots")]
pub fn https_client_with_native_roots() -> Result<HttpsClient, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(Error::new(
            ErrorKind::Config,
            if why.is_empty() {
                "the operating system's certificate store has no usable root certificate".to_owned()
            } else {
                format!(
                    "the operating system's certificate store has no usable root certificate ({})",
                    why.join("; ")
                )
            },
        ));
    }
    Ok(https_client_with_config(config(roots)))
}

/// An HTTPS client with your own rustls configuration (client certificates, a custom verifier,
/// another crypto provider). Its ALPN protocols are replaced by `http/1.1`.
pub fn https_client_with_config(mut config: ClientConfig) -> HttpsClient {
    // hyper-rustls's builder offers no ALPN at all for an HTTP/1-only connector (and refuses a
    // config that has some), so the connector is made from the parts: the config offering
    // `http/1.1`, `http://` still allowed (as the builder's `https_or_http`), the default
    // server-name resolution.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnector::from((tcp, config));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The Mozilla root certificates (from the `webpki-roots` crate), as a store to add to.
pub fn webpki_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A client configuration that trusts `roots`, with the ring provider and rustls' safe default
/// protocol versions (TLS 1.2 and 1.3).
fn config(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

// The guide's examples are compiled and run as doc tests.
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!("../docs/guides/tls.md")]
struct GuideDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_work() {
        assert!(!webpki_roots().is_empty());
        let _ = https_client();
        let err = https_client_with_roots([CertificateDer::from(vec![1, 2, 3])]).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(
            err.to_string()
                .starts_with("extra root certificate #1 cannot be trusted: "),
            "{err}"
        );
    }
}
