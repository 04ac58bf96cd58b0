//! The interop tests in one binary (one link for all of them).

#[macro_use]
mod interop_common;

mod interop24_compose;
mod interop24_extras;
mod interop24_headers;
mod interop24_hostile;
mod interop24_oauth;
mod interop24_peers;
mod interop24_reqwest;
mod interop24_summary;
mod interop32_faults;
mod interop_haproxy;
mod interop_nginx;
mod interop_oauth;
mod interop_paginate;
mod interop_peers14;
mod interop_s68_signers;
mod interop_s77_signers;
mod interop_webhooks;
