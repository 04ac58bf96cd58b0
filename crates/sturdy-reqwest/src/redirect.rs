//! A redirect policy that keeps the stack's credentials on their origin.

/// A reqwest redirect policy that follows at most `max` redirects, and only while they stay on
/// the origin (scheme, host and port) of the request: a redirect to another origin is not
/// followed, and the caller gets the `3xx` response itself, `Location` included.
///
/// Use it when the stack sends a secret in a header of its own, such as
/// `AuthLayer::api_key(HeaderName::from_static("x-api-key"), key)`. reqwest removes only
/// `Authorization`, `Cookie`, `Cookie2`, `Proxy-Authorization` and `WWW-Authenticate` when a
/// redirect leaves the origin, and every other header the stack set goes along, so with reqwest's default policy a redirect to any host receives the key. (The
/// pagination layer refuses a next link on another origin for the same reason.)
///
/// More than `max` redirects on the origin fail as reqwest's own limit does (`is_redirect()`,
/// "could not follow a redirect: too many redirects (more than 10)" once converted, with this
/// policy's `max`). `max = 10` matches
/// reqwest's default.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use axum::response::Redirect;
/// use axum::routing::get;
///
/// // Two servers: the API, which redirects, and another host.
/// async fn serve(app: axum::Router) -> String {
///     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
///     let base = format!("http://{}", listener.local_addr().unwrap());
///     tokio::spawn(async move { axum::serve(listener, app).await });
///     base
/// }
/// let other = serve(axum::Router::new().route("/steal", get(|| async { "other" }))).await;
/// let to_other = format!("{other}/steal");
/// let api = serve(
///     axum::Router::new()
///         .route("/moved", get(|| async { Redirect::temporary("/orders") }))
///         .route("/orders", get(|| async { "orders" }))
///         .route("/away", get(move || {
///             let to = to_other.clone();
///             async move { Redirect::temporary(&to) }
///         })),
/// )
/// .await;
///
/// let client = reqwest::Client::builder()
///     .redirect(sturdy_reqwest::same_origin_redirects(10))
///     .build()
///     .unwrap();
/// // On the same origin: followed.
/// let res = client.get(format!("{api}/moved")).header("x-api-key", "k").send().await.unwrap();
/// assert_eq!(res.status(), 200);
/// assert_eq!(res.url().path(), "/orders");
/// // To another origin: not followed; the 307 comes back, and the key stayed home.
/// let res = client.get(format!("{api}/away")).header("x-api-key", "k").send().await.unwrap();
/// assert_eq!(res.status(), 307);
/// assert!(res.headers()["location"].to_str().unwrap().ends_with("/steal"));
/// # }
/// ```
pub fn same_origin_redirects(max: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.stop();
        };
        let next = attempt.url();
        let same_origin = next.scheme() == first.scheme()
            && next.host_str() == first.host_str()
            && next.port_or_known_default() == first.port_or_known_default();
        if !same_origin {
            attempt.stop()
        } else if attempt.previous().len() > max {
            attempt.error(TooManyRedirects(max))
        } else {
            attempt.follow()
        }
    })
}

/// More redirects than the policy follows.
#[derive(Debug)]
struct TooManyRedirects(usize);

impl std::fmt::Display for TooManyRedirects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "too many redirects (more than {})", self.0)
    }
}

impl std::error::Error for TooManyRedirects {}
