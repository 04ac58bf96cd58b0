//! Runs one in-process case of the `stack` bench a given number of times, for an instruction
//! count that does not depend on the machine's load (criterion's times on a shared virtual
//! machine move by more than the changes being measured):
//!
//! ```sh
//! cargo bench -p sturdy-benches --bench instructions --no-run
//! for n in 1000 2000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/deps/instructions-<hash> "default stack, POST" $n 2>&1 | grep Collected
//! done
//! ```
//!
//! The difference between the two counts divided by 1,000 is the instructions per call, the
//! harness's own work (a current-thread `block_on` per call) included, as in the `stack` bench.
//! Cases: `bare, GET|POST`, `default stack, GET|POST` (the client cloned for each call, as the
//! bare service is), `default stack, kept, GET|POST` (one client driven with `ready().call()`, as
//! the references are), `tower reference, GET|POST`, `tower reference with fresh keys, GET|POST`.

use std::hint::black_box;

use http::Uri;
use sturdy::ClientBuilder;
use tower::{Service, ServiceExt};

#[path = "support/stack_parts.rs"]
mod stack_parts;
use stack_parts::{bare, reference, reference_with_fresh_keys, request};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let case = args
        .next()
        .unwrap_or_else(|| "default stack, GET".to_owned());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let uri = Uri::from_static("http://api.example.com/orders");
    let (what, method) = case
        .rsplit_once(", ")
        .expect("a case reads '<stack>, <method>'");
    let method: http::Method = method.parse().expect("a method");
    match what {
        "bare" => {
            let svc = bare();
            for _ in 0..n {
                rt.block_on(async {
                    black_box(svc.clone().oneshot(request(&uri, &method)).await.unwrap())
                });
            }
        }
        "default stack" => {
            let svc = ClientBuilder::new().build(bare());
            for _ in 0..n {
                rt.block_on(async {
                    black_box(svc.clone().oneshot(request(&uri, &method)).await.unwrap())
                });
            }
        }
        // Kept and driven with `ready().call()`, as the references are (tower's `RateLimit`
        // cannot be cloned): the like-for-like comparison, as in the `stack` bench's
        // "vs tower reference" group. The case above clones the client for each call, as the
        // bare case does.
        "default stack, kept" => {
            let mut svc = ClientBuilder::new().build(bare());
            for _ in 0..n {
                rt.block_on(async {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(request(&uri, &method)).await.unwrap())
                });
            }
        }
        "tower reference" | "tower reference with fresh keys" => {
            let mut svc = {
                let _rt = rt.enter();
                if what == "tower reference" {
                    reference()
                } else {
                    reference_with_fresh_keys()
                }
            };
            for _ in 0..n {
                rt.block_on(async {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(request(&uri, &method)).await.unwrap())
                });
            }
        }
        other => panic!("unknown case {other:?}"),
    }
}
