//! Over real sockets, in real time: a client that gives up mid-handler (memory store).

#[path = "support/wire.rs"]
mod shared_wire;

use sturdy_idempotency::server::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_mid_handler_gets_the_stored_response() {
    shared_wire::a_client_that_gives_up_mid_handler_gets_the_stored_response(
        MemoryStore::default(),
        "wire-memory-1",
    )
    .await;
}
