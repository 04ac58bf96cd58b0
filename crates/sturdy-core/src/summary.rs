//! Errors an agent can act on: one serialisable summary of any error, and tool results in the
//! shape MCP tools return.
//!
//! A language model that called a tool needs to know three things about a failure: what
//! happened, whether and when trying again can help, and whether the request may already have
//! taken effect. [`ErrorSummary`] answers them for any error (sturdy's own, hyper's, io's, or
//! anything else), and [`tool_result`] turns a call's result into
//! `{"content": [{"type": "text", "text": ...}], "isError": ..., "structuredContent": ...}`.
//!
//! ```
//! use std::time::Duration;
//! use sturdy_core::summary::{tool_result, ErrorSummary};
//! use sturdy_core::{BoxError, RateLimited};
//!
//! let err: BoxError = Box::new(RateLimited::new(Duration::from_secs(30)).with_scope("api.example.com"));
//! let s = ErrorSummary::of(&*err);
//! assert_eq!(s.kind, "rate_limited");
//! assert_eq!(s.retry_after_ms, Some(30_000));
//! assert!(!s.may_have_been_processed);
//!
//! let out = tool_result::<serde_json::Value>(Err(err));
//! assert_eq!(out["isError"], true);
//! assert_eq!(
//!     out["content"][0]["text"],
//!     "rate limited by api.example.com; retry after 30s\nTry again in 30s; the request was not processed."
//! );
//! assert_eq!(out["structuredContent"]["error"]["retry_after_ms"], 30_000);
//! ```

use std::error::Error as StdError;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::classify::{classify_error, delivery};
use crate::error::{CircuitOpen, Delivery, ErrorKind, OpenReason, RateLimited};
use crate::{find, human_duration};

/// What an error means for whoever decides the next step; see the [module docs](self).
///
/// Serialises as a flat JSON object with the field names below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ErrorSummary {
    /// `auth`, `rate_limited`, `circuit_open`, `timeout`, `connect`, `tls`, `transport`,
    /// `server_error`, `client_error`, `body`, `pagination`, `config` or `other`.
    pub kind: &'static str,
    /// The HTTP status, for `server_error` and `client_error`: the destination's, or the token
    /// endpoint's when getting a token failed (the message names it).
    pub status: Option<u16>,
    /// The error's message, for people and models.
    pub message: String,
    /// Whether trying again, unchanged, may succeed.
    pub retryable: bool,
    /// The wait before trying again, when the server, a limiter or a breaker said, or a token
    /// source backing off after its endpoint failed ([`Error::with_retry_after`](crate::Error::with_retry_after)).
    pub retry_after_ms: Option<u64>,
    /// Whether the request may already have taken effect on the server. When true, send it again
    /// only with the same idempotency key.
    pub may_have_been_processed: bool,
    /// The idempotency key the request carried, when known.
    pub idempotency_key: Option<String>,
    /// How many attempts were made, when a retry layer reported it.
    pub attempts: Option<u32>,
    /// The wait itself, for the advice: `retry_after_ms` stops at `u64::MAX` milliseconds, and
    /// the advice must name the wait the message names.
    #[serde(skip)]
    retry_after: Option<Duration>,
    /// The request carried an idempotency key that `idempotency_key` cannot show (not UTF-8).
    #[serde(skip)]
    key_carried: bool,
}

fn kind_name(kind: &ErrorKind) -> (&'static str, Option<u16>) {
    match kind {
        ErrorKind::Auth => ("auth", None),
        ErrorKind::RateLimited { .. } => ("rate_limited", None),
        ErrorKind::CircuitOpen { .. } => ("circuit_open", None),
        ErrorKind::Timeout => ("timeout", None),
        ErrorKind::Connect => ("connect", None),
        ErrorKind::Tls => ("tls", None),
        ErrorKind::Transport => ("transport", None),
        ErrorKind::Server(s) => ("server_error", Some(s.as_u16())),
        ErrorKind::Client(s) => ("client_error", Some(s.as_u16())),
        ErrorKind::Body => ("body", None),
        ErrorKind::Pagination => ("pagination", None),
        ErrorKind::Config => ("config", None),
        _ => ("other", None),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ErrorSummary {
    /// The summary of any error, read through its whole `source()` chain.
    pub fn of(err: &(dyn StdError + 'static)) -> Self {
        let kind = classify_error(err);
        let (name, status) = kind_name(&kind);
        // A breaker waiting for its probe, or forced open, has no time to give: nobody knows when
        // the probe answers or the handle releases it.
        let limited = find::<RateLimited>(err);
        let open = find::<CircuitOpen>(err);
        let no_time = limited.is_none()
            && open.is_some_and(|c| matches!(c.reason(), OpenReason::Probing | OpenReason::Forced));
        let retry_after = limited
            .map(RateLimited::retry_after)
            .or_else(|| open.map(CircuitOpen::retry_in))
            .or(match kind {
                ErrorKind::RateLimited { retry_after } => retry_after,
                ErrorKind::CircuitOpen { retry_in } => Some(retry_in),
                _ => None,
            })
            // A wait this side knows (a token source backing off), stated on an error below.
            .or_else(|| {
                crate::error::chain(err).find_map(|e| {
                    e.downcast_ref::<crate::Error>()
                        .and_then(crate::Error::retry_after)
                })
            })
            .filter(|_| !no_time);
        let report = find::<crate::Error>(err).and_then(crate::Error::report);
        Self {
            kind: name,
            status,
            message: err.to_string(),
            retryable: kind.is_retryable() || matches!(kind, ErrorKind::CircuitOpen { .. }),
            retry_after_ms: retry_after.map(millis),
            retry_after,
            may_have_been_processed: delivery(err) == Delivery::MaybeProcessed,
            idempotency_key: report.and_then(|r| r.idempotency_key().map(str::to_owned)),
            attempts: report.map(crate::CallReport::attempts),
            key_carried: report.is_some_and(crate::CallReport::carried_idempotency_key),
        }
    }

    /// What to do next, in one sentence a model can follow.
    pub fn advice(&self) -> String {
        let mut out = if !self.retryable {
            "Trying again unchanged will not help".to_owned()
        } else if let Some(ms) = self.retry_after_ms {
            // The wait the message names, when `retry_after_ms` is still the one it was made
            // with (it stops at u64::MAX milliseconds).
            let wait = self
                .retry_after
                .filter(|d| millis(*d) == ms)
                .unwrap_or(Duration::from_millis(ms));
            format!("Try again in {}", human_duration(wait))
        } else {
            "Trying again may help".to_owned()
        };
        match (&self.idempotency_key, self.may_have_been_processed) {
            (Some(key), true) => {
                out.push_str("; it may already have been processed, so send it again only with idempotency key ");
                out.push_str(key);
            }
            // A key whose bytes are not UTF-8 cannot be written here; the caller has it, in the
            // request it built.
            (None, true) if self.key_carried => out.push_str(
                "; it may already have been processed, so send it again only with the idempotency key it carried (its bytes are not UTF-8 text, so it is not shown here)",
            ),
            (None, true) => {
                out.push_str(
                    "; it may already have been processed, so check before sending it again",
                );
            }
            (_, false) => out.push_str("; the request was not processed"),
        }
        out.push('.');
        out
    }
}

/// A call's result as a tool result in the shape MCP tools return: `content` (one text item),
/// `isError`, and `structuredContent` (`{"result": ...}` on success, `{"error": ErrorSummary}`
/// on failure). On success the text is the value as JSON, except a string value, whose text is
/// the string itself (no quotes, no escapes). The text of an error is its message, then
/// [`ErrorSummary::advice`] on a second line. A value that cannot be written as JSON (a map whose
/// keys are not strings, say) is a tool error that says so, not a `null` result. A value JSON
/// can write but `serde_json::Value` cannot hold (an integer past 64 bits, such as a `u128`) is
/// a success with its text only, without `structuredContent`. A float that is
/// NaN or infinite is written as `null`, as serde_json writes it (it is not an error there).
pub fn tool_result<T: Serialize>(result: Result<T, crate::BoxError>) -> Value {
    match result {
        Ok(v) => {
            let value = match serde_json::to_value(&v) {
                Ok(value) => value,
                Err(e) => {
                    // JSON text can hold what a `Value` cannot (an integer past 64 bits:
                    // `u128`, `i128`): the text alone, without `structuredContent`.
                    if let Ok(text) = serde_json::to_string(&v) {
                        return json!({
                            "content": [{ "type": "text", "text": text }],
                            "isError": false,
                        });
                    }
                    let text = format!("the tool's result could not be written as JSON: {e}");
                    return json!({
                        "content": [{ "type": "text", "text": text }],
                        "isError": true,
                    });
                }
            };
            let text = match &value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            json!({
                "content": [{ "type": "text", "text": text }],
                "isError": false,
                "structuredContent": { "result": value },
            })
        }
        Err(e) => {
            let summary = ErrorSummary::of(&*e);
            let text = format!("{}\n{}", summary.message, summary.advice());
            json!({
                "content": [{ "type": "text", "text": text }],
                "isError": true,
                "structuredContent": { "error": summary },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CallReport, Error};
    use http::StatusCode;

    #[test]
    fn an_integer_past_64_bits_is_a_success_in_text_only() {
        let out = tool_result::<u128>(Ok(u128::MAX));
        assert_eq!(out["isError"], false);
        assert_eq!(out["content"][0]["text"], u128::MAX.to_string());
        assert!(out.get("structuredContent").is_none());
        let keys: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
        assert_eq!(tool_result(Ok(keys))["isError"], true);
    }

    #[test]
    fn an_error_that_is_its_own_source_is_summarised() {
        #[derive(Debug)]
        struct Loop;
        impl std::fmt::Display for Loop {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("its own cause")
            }
        }
        impl std::error::Error for Loop {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(self)
            }
        }
        let s = ErrorSummary::of(&Loop);
        assert_eq!(s.message, "its own cause");
        assert!(!s.retryable);
    }

    #[test]
    fn the_advice_names_the_wait_the_message_names_past_u64_max_milliseconds() {
        let e = RateLimited::new(Duration::from_secs(u64::MAX));
        let s = ErrorSummary::of(&e);
        assert_eq!(s.retry_after_ms, Some(u64::MAX));
        let wait = crate::human_duration(Duration::from_secs(u64::MAX));
        assert!(s.message.contains(&wait), "{}", s.message);
        assert!(
            s.advice().starts_with(&format!("Try again in {wait}")),
            "{}",
            s.advice()
        );
    }

    #[test]
    fn a_call_that_may_have_been_processed_names_its_key() {
        let err = Error::new(
            ErrorKind::Transport,
            "gave up after 4 attempts: connection reset by peer",
        )
        .with_report(CallReport::new(
            4,
            Delivery::MaybeProcessed,
            Some("k-1".into()),
        ));
        let s = ErrorSummary::of(&err);
        assert_eq!(s.kind, "transport");
        assert!(s.retryable && s.may_have_been_processed);
        assert_eq!(s.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(s.attempts, Some(4));
        assert_eq!(
            s.advice(),
            "Trying again may help; it may already have been processed, so send it again only with idempotency key k-1."
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["kind"], "transport");
        assert_eq!(v["may_have_been_processed"], true);
    }

    #[test]
    fn a_key_that_cannot_be_shown_is_still_the_one_to_retry_with() {
        let report = CallReport::new(4, Delivery::MaybeProcessed, None);
        assert!(!report.carried_idempotency_key());
        let err = Error::new(ErrorKind::Transport, "gave up after 4 attempts")
            .with_report(report.clone().with_key_carried(true));
        let s = ErrorSummary::of(&err);
        assert_eq!(s.idempotency_key, None);
        assert_eq!(
            s.advice(),
            "Trying again may help; it may already have been processed, so send it again only with the idempotency key it carried (its bytes are not UTF-8 text, so it is not shown here)."
        );
        let v = serde_json::to_value(&s).unwrap();
        assert!(v.get("key_carried").is_none(), "{v}");
        // Without a key: check first.
        let err = Error::new(ErrorKind::Transport, "gave up").with_report(report);
        assert!(ErrorSummary::of(&err)
            .advice()
            .ends_with("so check before sending it again."));
        // A shown key stays carried.
        let shown =
            CallReport::new(1, Delivery::MaybeProcessed, Some("k".into())).with_key_carried(false);
        assert!(shown.carried_idempotency_key());
    }

    #[test]
    fn permanent_errors_say_so() {
        let err = Error::new(
            ErrorKind::Client(StatusCode::UNPROCESSABLE_ENTITY),
            "rejected",
        )
        .with_delivery(Delivery::NotSent);
        let s = ErrorSummary::of(&err);
        assert_eq!(
            (s.kind, s.status, s.retryable),
            ("client_error", Some(422), false)
        );
        assert_eq!(
            s.advice(),
            "Trying again unchanged will not help; the request was not processed."
        );
    }

    #[test]
    fn successes_become_text_and_structured_content() {
        let out = tool_result(Ok(json!({"orders": [1, 2]})));
        assert_eq!(out["isError"], false);
        assert_eq!(out["content"][0]["type"], "text");
        assert_eq!(out["content"][0]["text"], r#"{"orders":[1,2]}"#);
        assert_eq!(out["structuredContent"]["result"]["orders"][1], 2);
        let out = tool_result(Ok("hello \"world\""));
        assert_eq!(out["content"][0]["text"], "hello \"world\"");
        assert_eq!(out["structuredContent"]["result"], "hello \"world\"");
    }

    #[test]
    fn a_result_json_cannot_hold_is_a_tool_error_that_says_so() {
        let mut m = std::collections::BTreeMap::new();
        m.insert((1, 2), "a");
        let out = tool_result(Ok(m));
        assert_eq!(out["isError"], true);
        let text = out["content"][0]["text"].as_str().unwrap();
        assert!(
            text.starts_with("the tool's result could not be written as JSON: "),
            "{text}"
        );
        assert!(out.get("structuredContent").is_none());
    }
}
