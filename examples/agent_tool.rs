//! An AI-agent tool that lists orders from a paginated API, one bounded page per call, and
//! answers every call (success or failure) in the shape MCP tools return.
//!
//! ```sh
//! cargo run --example agent_tool --features full
//! ```
//!
//! It starts a faulty orders API (sturdy-chaos) on 127.0.0.1 with 45 orders, lets a pretend agent
//! walk them 20 at a time (the tool hands back `next_cursor`, a signed cursor the agent passes in
//! the next call), then shows what the agent sees when the API says "come back in two minutes".
//!
//! The tool never throws: a result is `{"content": [{"type": "text", "text": ...}], "isError":
//! false, "structuredContent": {"result": {"items": [...], "has_more": ..., "next_cursor": ...}}}`,
//! and a failure is `isError: true` with a text a model can act on ("rate limited by ...; retry
//! after 2m" and a sentence saying whether to try again and whether the request may have been
//! processed) and the same facts as JSON under `structuredContent.error`.

use std::time::Duration;

use hyper::body::Incoming;
use serde_json::{json, Value};
use sturdy::core::summary::tool_result;
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::{Client, ClientBuilder};
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm};

/// The tool: `list_orders(cursor?, limit)`. One instance serves every call of the agent's
/// session (its client and its pager are shared, so breakers, pauses and retry budgets carry
/// over from call to call).
struct ListOrders {
    pages: Paginate<JsonCursor>,
}

impl ListOrders {
    fn new(client: Client<Incoming>, base: &str) -> Result<Self, sturdy::core::Error> {
        let pages = Paginate::new(
            client,
            &format!("{base}/orders"),
            JsonCursor::new("/data", "/next_cursor"),
        )?;
        Ok(Self { pages })
    }

    /// The tool's entry point: the arguments a model sends, the result it reads.
    async fn call(&self, args: &Value) -> Value {
        let cursor = args["cursor"].as_str();
        let limit = args["limit"].as_u64().unwrap_or(20).clamp(1, 100) as usize;
        tool_result(
            self.pages
                .page(cursor, limit)
                .await
                .map_err(sturdy::core::BoxError::from),
        )
    }
}

/// A pretend agent: asks for pages until there are no more; returns every tool result it read.
async fn walk(tool: &ListOrders) -> Vec<Value> {
    let mut results = Vec::new();
    let mut args = json!({ "limit": 20 });
    loop {
        let out = tool.call(&args).await;
        let next = out["structuredContent"]["result"]["next_cursor"].clone();
        let more = out["structuredContent"]["result"]["has_more"] == true;
        results.push(out);
        if !more {
            return results;
        }
        args = json!({ "limit": 20, "cursor": next });
    }
}

async fn chaos() -> std::io::Result<ChaosServer> {
    ChaosServer::start(Knobs {
        orders: 45,
        // A flaky API: the client's retries make it invisible to the agent.
        error_rate: 0.2,
        ..Knobs::default()
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = chaos().await?;
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http_client());
    let tool = ListOrders::new(client, &server.url(""))?;

    for out in walk(&tool).await {
        let r = &out["structuredContent"]["result"];
        println!(
            "isError={} items={} has_more={}",
            out["isError"],
            r["items"].as_array().map_or(0, Vec::len),
            r["has_more"]
        );
    }

    // The API now asks for a two-minute pause (longer than the client sleeps): the agent is told,
    // not kept waiting.
    server.update(|k| {
        k.error_rate = 0.0;
        k.rate_limit_next = 1;
        k.retry_after = RetryAfterForm::Seconds(120);
    });
    let out = tool.call(&json!({ "limit": 20 })).await;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client<Incoming> {
        let backoff = sturdy::retry::Backoff::decorrelated_jitter(
            Duration::from_millis(2),
            Duration::from_millis(20),
        )
        .unwrap();
        ClientBuilder::new()
            .with_retry(
                sturdy::retry::RetryLayer::new()
                    .with_backoff(backoff)
                    .with_max_attempts(6)
                    .with_seed(1),
            )
            .build(http_client())
    }

    #[tokio::test]
    async fn the_agent_reads_every_order_once_through_a_flaky_api() {
        let server = chaos().await.unwrap();
        let tool = ListOrders::new(client(), &server.url("")).unwrap();
        let results = walk(&tool).await;
        assert_eq!(results.len(), 3);
        let mut ids = Vec::new();
        for out in &results {
            assert_eq!(out["isError"], false, "{out}");
            assert_eq!(out["content"][0]["type"], "text");
            for item in out["structuredContent"]["result"]["items"]
                .as_array()
                .unwrap()
            {
                ids.push(item["id"].as_str().unwrap().to_owned());
            }
        }
        let expected: Vec<String> = (1..=45).map(|i| format!("o_{i}")).collect();
        assert_eq!(ids, expected);
        assert!(
            server.stats().server_errors > 0,
            "the API did fail sometimes"
        );
    }

    #[tokio::test]
    async fn a_long_rate_limit_is_a_tool_error_the_model_can_act_on() {
        let server = chaos().await.unwrap();
        server.update(|k| {
            k.error_rate = 0.0;
            k.rate_limit_next = 1;
            k.retry_after = RetryAfterForm::Seconds(120);
        });
        let tool = ListOrders::new(client(), &server.url("")).unwrap();
        let out = tool.call(&json!({ "limit": 5 })).await;
        assert_eq!(out["isError"], true);
        let err = &out["structuredContent"]["error"];
        assert_eq!(err["kind"], "rate_limited");
        assert_eq!(err["retry_after_ms"], 120_000);
        assert_eq!(err["may_have_been_processed"], true);
        let text = out["content"][0]["text"].as_str().unwrap();
        assert!(text.contains("retry after 2m"), "{text}");
        assert!(text.contains("Try again in 2m"), "{text}");
    }

    #[tokio::test]
    async fn a_forged_cursor_is_refused_before_any_request() {
        let server = chaos().await.unwrap();
        let tool = ListOrders::new(client(), &server.url("")).unwrap();
        let before = server.stats().api_requests;
        let out = tool
            .call(&json!({ "limit": 5, "cursor": "eyJjIjoiYzAifQ" }))
            .await;
        assert_eq!(out["isError"], true);
        assert_eq!(out["structuredContent"]["error"]["retryable"], false);
        assert_eq!(server.stats().api_requests, before);
    }
}
