//! A reqwest program made sturdy with one `.with(..)`.
//!
//! Orders are created with reqwest's own `RequestBuilder` (`.json()`, `.query()`, `.timeout()`)
//! through a `reqwest_middleware` client whose `SturdyMiddleware` runs sturdy's client stack:
//! one idempotency key per order, retries of 5xx, resets and reqwest timeouts, `Retry-After`
//! honoured, an OAuth2 token fetched (through reqwest too) and replaced when the API refuses it.
//!
//! ```sh
//! cargo run --example reqwest_client --features full
//! ```
//!
//! It starts a faulty orders API (sturdy-chaos) on 127.0.0.1 and prints what the server saw. To
//! use a chaos server that is already running (`cargo run -p sturdy-chaos -- --serve`), set
//! `STURDY_API_URL` to its loopback address, e.g. `STURDY_API_URL=http://127.0.0.1:8080`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::reqwest::{ReqwestService, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs, RetryAfterForm};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Serialize)]
struct NewOrder<'a> {
    item: &'a str,
    quantity: u32,
}

#[derive(Deserialize)]
struct Page {
    data: Vec<serde_json::Value>,
    next_cursor: Option<String>,
}

/// What the program did.
#[derive(Debug)]
struct Summary {
    created: u32,
    failed: u32,
    first_page: usize,
}

/// Creates `orders` orders at `base` and reads the first page of the list back.
async fn run(base: &str, orders: u32) -> Result<Summary, Error> {
    // reqwest as you know it: its timeout bounds each attempt.
    let reqwest = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;

    // Tokens are fetched through reqwest too; the cache refreshes them before they expire.
    let tokens = ClientCredentials::new(
        ReqwestService::new(reqwest.clone()),
        &format!("{base}/oauth/token"),
        "client",
        "secret",
    )?;
    let retry = RetryLayer::new()
        .with_backoff(Backoff::decorrelated_jitter(
            Duration::from_millis(10),
            Duration::from_millis(200),
        )?)
        .with_max_attempts(6)
        .with_deadline(Duration::from_secs(20));
    let auth = AuthLayer::oauth2(tokens);

    // The one line that makes an existing reqwest-middleware client sturdy.
    let client = reqwest_middleware::ClientBuilder::new(reqwest)
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(retry)
                .with_auth(auth)
                .build(next)
        }))
        .build();

    let (mut created, mut failed) = (0, 0);
    for n in 0..orders {
        let res = client
            .post(format!("{base}/orders"))
            .json(&NewOrder {
                item: "book",
                quantity: n + 1,
            })
            .send()
            .await;
        match res {
            Ok(res) if res.status().is_success() => created += 1,
            Ok(res) => {
                failed += 1;
                println!("order {n}: the API answered {}", res.status());
            }
            Err(e) => {
                failed += 1;
                // The message says what happened and what may be done about it.
                println!("order {n}: {e}");
            }
        }
    }

    let page: Page = client
        .get(format!("{base}/orders"))
        .query(&[("limit", "5")])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "first page: {} orders, next cursor {:?}",
        page.data.len(),
        page.next_cursor
    );
    Ok(Summary {
        created,
        failed,
        first_page: page.data.len(),
    })
}

/// A chaos server with every fault this example handles turned on.
async fn faulty_api() -> std::io::Result<ChaosServer> {
    ChaosServer::start(Knobs {
        seed: 11,
        require_auth: true,
        idempotency: true,
        error_rate: 0.2,
        reset_after_commit_rate: 0.1,
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        // Tokens say they last an hour; the server expires them after 300 ms.
        token_lifetime: Duration::from_millis(300),
        token_expires_in: Some(serde_json::json!(3600)),
        ..Knobs::default()
    })
    .await
}

/// Only loopback addresses: this example talks to nothing else.
fn loopback(url: &str) -> Result<&str, Error> {
    let uri: http::Uri = url.parse()?;
    match uri.host() {
        Some("127.0.0.1" | "localhost" | "[::1]") => Ok(url.trim_end_matches('/')),
        _ => Err(format!("STURDY_API_URL must be a loopback URL, not {url}").into()),
    }
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), Error> {
    if let Ok(url) = std::env::var("STURDY_API_URL") {
        let summary = run(loopback(&url)?, 20).await?;
        println!("{summary:?}");
        return Ok(());
    }
    let server = faulty_api().await?;
    let summary = run(&server.url(""), 20).await?;
    let st = server.stats();
    println!(
        "created {} orders ({} failed, {} read back); the server committed {}, answered {} \
         injected 5xx, closed {} connections after committing, sent {} 429s, refused {} \
         expired tokens, issued {} tokens",
        summary.created,
        summary.failed,
        summary.first_page,
        st.orders_committed,
        st.server_errors,
        st.resets,
        st.rate_limited,
        st.unauthorized,
        st.tokens_issued,
    );
    println!(
        "duplicates: {} by idempotency key, {} by payload",
        st.duplicates_by_key, st.duplicates_by_payload
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_order_is_booked_exactly_once() {
        let server = faulty_api().await.unwrap();
        let summary = run(&server.url(""), 20).await.unwrap();
        assert_eq!((summary.created, summary.failed), (20, 0));
        assert_eq!(summary.first_page, 5);
        let st = server.stats();
        assert_eq!(st.orders_committed, 20);
        assert_eq!(st.duplicates_by_payload, 0);
        // The faults really happened: the 429's second-long wait outlived the first token.
        assert!(
            st.server_errors > 0 && st.resets > 0 && st.rate_limited > 0,
            "{st:?}"
        );
        assert!(st.unauthorized >= 1 && st.tokens_issued >= 2, "{st:?}");
    }

    #[test]
    fn only_loopback_urls_are_taken() {
        assert_eq!(
            loopback("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(loopback("http://api.example.com").is_err());
    }
}
