//! Every integration test of this package in one binary: one link instead of one per file,
//! which keeps a clean build's disk use and link time small. A new `tests/*.rs` file is a
//! module here (`mod name;`), or a `[[test]]` of its own in Cargo.toml when it needs its own
//! process (a global allocator); `every_test_file_is_compiled` checks that none is forgotten.

mod cost_common;
mod logs13_common;
mod outsider4_common;
mod outsider_common;
mod retry28_common;
mod server11_common;

mod agents27_compose;
mod agents27_guards;
mod agents27_more;
mod agents27_paginate;
mod agents27_params;
mod agents27_readme;
mod agents27_reqwest;
mod agents27_tls;
mod agents27_version;
mod agents27_wire;
mod auth29_circuit;
mod auth29_compose;
mod auth29_more;
mod auth29_oauth;
mod auth29_static;
mod auth29_util;
mod auth29_version;
mod auth29_wire;
mod client26_callbacks;
mod client26_chaos;
mod client26_circuit;
mod client26_coalesce_keys;
mod client26_events;
mod client26_metrics;
mod client26_more;
mod client26_overflow;
mod client26_panics;
mod client26_races;
mod client26_ratelimit;
mod client26_secrets;
mod client26_version;
mod client31_metrics;
mod client31_reqwest;
mod client31_tls;
mod client31_util;
mod cluster32_faults;
mod cluster32_shared;
mod cluster32_util;
mod compose14_cancel;
mod compose14_ready;
mod compose14_servers;
mod compose14_shared;
mod deadline_holds;
mod durable26_idem;
mod durable26_redis;
mod durable26_webhook;
mod edge30_client;
mod edge30_coalesce;
mod edge30_cost;
mod edge30_hedge;
mod edge30_util;
mod edge30_vectors;
mod exactly_once;
mod faults32_circuit;
mod faults32_coalesce;
mod faults32_compose;
mod faults32_concurrency;
mod faults32_hedge;
mod faults32_util;
mod hooks31_ack;
mod hooks31_dedup;
mod hooks31_example;
mod hooks31_interop;
mod hooks31_redis;
mod hooks31_source;
mod hooks31_util;
mod hooks31_verify;
mod limits29_client;
mod limits29_concurrency;
mod limits29_extremes;
mod limits29_handles;
mod limits29_hedge;
mod limits29_metrics;
mod limits29_nginx;
mod limits29_pace;
mod limits29_ratelimit;
mod logs13_auth;
mod logs13_client;
mod logs13_servers;
mod metrics;
mod mix32_idem;
mod mix32_paginate;
mod mix32_redirect;
mod mix32_util;
mod newfeat15_coalesce;
mod newfeat15_concurrency;
mod newfeat15_delivery;
mod newfeat15_hedge;
mod newfeat15_keys;
mod newfeat15_metrics;

mod newfeat15_ratelimit;
mod newfeat15_redis_cluster;
mod newfeat15_reqwest;
mod newfeat15_tls;
mod outsider2_client;
mod outsider2_compose;
mod outsider2_errors;
mod outsider2_metrics;
mod outsider2_pace;
mod outsider2_redis;
mod outsider3_extras;
mod outsider3_idem;
mod outsider3_paginate_version;
mod outsider3_webhook;
mod outsider4_attempt_timeout;
mod outsider4_circuit;
mod outsider4_hostkey;
mod outsider4_idempotency;
mod outsider4_misc;
mod outsider4_ratelimit;
mod outsider4_shared_clones;
mod outsider5_coalesce;
mod outsider5_idempotency;
mod outsider5_ratelimit;
mod outsider5_retry;
mod outsider6_auth;
mod outsider6_hedge_concurrency;
mod outsider6_paginate;
mod outsider6_reqwest_version;
mod outsider6_tls;
mod outsider6_webhook;
mod outsider_auth;
mod outsider_circuit;
mod outsider_compose;
mod outsider_concurrency_coalesce;
mod outsider_extremes;
mod outsider_hedge;
mod outsider_idempotency_server;
mod outsider_metrics;
mod outsider_paginate;
mod outsider_ratelimit;
mod outsider_redis;
mod outsider_reqwest;
mod outsider_retry;
mod outsider_version_misc;
mod outsider_webhook;
mod pages31_auth;
mod pages31_edges;
mod pages31_paginate;
mod pages31_util;
mod readiness;
mod redis30_idem;
mod redis30_quota;
mod redis30_stream;
mod redis30_util;
mod replay25_head;
mod replay25_keys;
mod replay25_link;
mod replay25_timeout;
mod replay25_wire;
mod retry28_after;
mod retry28_backoff;
mod retry28_body;
mod retry28_compose;
mod retry28_edges;
mod retry28_idem;
mod retry28_idem2;
mod retry28_more;
mod retry28_redis;
mod retry28_replica;
mod retry28_safety;
mod retry28_wire;
mod retry28_words;
mod retry28_words2;
mod review12_sf_users;
mod review12_webhook;
mod review16_bare503;
mod review16_holds;
mod review16_misc;
mod review16_probing;
mod review16_reqwest;
mod review16_token_stale;
mod review17_bare503;
mod review17_coalesce;
mod review17_holds;
mod review17_probing;
mod review17_words;
mod s34_redis;
mod s34_reqwest_scheme;
mod s35_redis;
mod s35_redis_cluster;
mod s35_reqwest;
mod s36_metrics;
mod s36_tls;
mod s37_coalesce;
mod s37_compose;
mod s37_concurrency;
mod s37_hedge;
mod s37_words;
mod s38_hedge;
mod s38_redis;
mod s38_tls;
mod s39_stack;
mod s39_wire;
mod s39_words;
mod s40_client_hold;
mod s40_coalesce_report;
mod s40_hedge_hold;
mod s41_idem_scope;
mod s41_idem_server;
mod s41_retry;
mod scale9_headers;
mod scale9_idempotency;
mod scale9_webhook;
mod server11_idempotency;
mod server11_webhooks;
mod server29_idem;
mod server29_interop;
mod server29_paginate;
mod server29_webhook;
mod sharing;
mod stack;
mod tls;
mod wire28_close;
mod wire28_compose;
mod wire28_drop;
mod wire28_extra;
mod wire28_layers;
mod wire28_malformed;
mod wire28_more;
mod wire28_ratelimit;
mod wire28_reqwest;
mod wire28_secrets;
mod wire28_stall;
mod wire28_tls;
mod wire28_util;
mod words18a_claims;
mod words18a_compose;
mod words18a_limits;
mod words18a_wire;
mod words18b_auth;
mod words18b_chain;
mod words18b_hostile;
mod words18b_idem;
mod words18b_more;
mod words18b_more2;
mod words18b_more3;
mod words18b_paginate_version;
mod words18b_redis;
mod words18b_reqwest_tls;
mod words18b_webhook;
mod words19_breaker_wait;
mod words19_oauth;
mod words19_refused;
mod words19_turn_deadline;
mod words20_cancel;
mod words20_compose;
mod words20_edges;
mod words20_hostile;
mod words21_more;
mod words21_oauth;
mod words21_refused;
mod words21_turn;
mod words21_wire;
mod words22_floor;
mod words22_refused_keys;
mod words23_layers;
mod words23_more;
mod words23_wire;
mod words30_auth;
mod words30_circuit;
mod words30_demo;
mod words30_examples;
mod words30_setters;
mod words30_util;
mod words30_version;
mod words7_agents;
mod words7_architecture;
mod words7_circuit;
mod words7_coalesce;
mod words7_concurrency;
mod words7_metrics;
mod words7_readme;
mod words7_reliability;
mod words7_retry;
mod words8_auth;
mod words8_hedge;
mod words8_idempotency;
mod words8_leaks;
mod words8_paginate;
mod words8_ratelimit;
mod words8_tls_reqwest;
mod words8_version;
mod words8_webhooks;

/// Cargo does not discover test files on its own in this workspace (`autotests = false` here
/// and in each crate with a `tests/suite.rs`): a file that is neither a module of one of the
/// test binaries nor a `[[test]]` target would never compile, and its tests would never run.
#[test]
fn every_test_file_is_compiled() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut packages = vec![root.to_path_buf()];
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        packages.push(entry.unwrap().path());
    }
    let mut forgotten = Vec::new();
    for package in packages {
        let tests = package.join("tests");
        let manifest = std::fs::read_to_string(package.join("Cargo.toml")).unwrap();
        if !manifest.contains("autotests = false") {
            continue;
        }
        let mut declared = String::new();
        for binary in ["suite.rs", "interop.rs"] {
            declared += &std::fs::read_to_string(tests.join(binary)).unwrap_or_default();
        }
        for entry in std::fs::read_dir(&tests).unwrap() {
            let path = entry.unwrap().path();
            let (Some(stem), Some("rs")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let as_module = format!("\nmod {stem};");
            let as_target = format!("path = \"tests/{stem}.rs\"");
            if !declared.contains(&as_module) && !manifest.contains(&as_target) {
                forgotten.push(path.display().to_string());
            }
        }
    }
    assert!(
        forgotten.is_empty(),
        "test files that no binary compiles: {forgotten:?}"
    );
}
