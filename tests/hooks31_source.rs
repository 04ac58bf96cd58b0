//! The source allowlist as a dual-stack deployment sees it: "IPv4-mapped IPv6 peers
//! (`::ffff:192.0.2.1`, from dual-stack sockets) match IPv4 networks", for the peer, for a
//! trusted proxy's address, and for the addresses a proxy writes.
#![cfg(feature = "full")]

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use sturdy::webhook::{ForwardedHeader, SourceAllowlist};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn xff(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
    h
}

/// A mapped peer is an IPv4 peer: as the allowed source and as a trusted proxy (a load balancer
/// reaching an app listening on `[::]`); and the sender's mapped address written by the proxy
/// matches its IPv4 network too. A mapped address outside the networks is still refused.
#[test]
fn hooks31_mapped_peers_and_proxies_match_ipv4_networks() {
    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let none = HeaderMap::new();
    assert!(list.allows(ip("::ffff:192.30.252.7"), &none));
    assert!(!list.allows(ip("::ffff:203.0.113.9"), &none));
    // The proxy, seen through a dual-stack socket.
    assert!(list.allows(ip("::ffff:10.1.2.3"), &xff("192.30.252.7")));
    assert!(!list.allows(ip("::ffff:10.1.2.3"), &xff("203.0.113.9")));
    // The sender's address written in its mapped form, and with a port.
    assert!(list.allows(ip("10.1.2.3"), &xff("::ffff:192.30.252.7")));
    assert!(list.allows(ip("10.1.2.3"), &xff("[::ffff:192.30.252.7]:443")));
    assert!(list.allows(ip("10.1.2.3"), &xff("192.30.252.7:443, 10.9.9.9")));
    // A forged entry left of the proxy's own stays ignored.
    assert!(!list.allows(ip("::ffff:10.1.2.3"), &xff("192.30.252.7, 203.0.113.9")));
    let fwd = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap()
        .with_forwarded_header(ForwardedHeader::Forwarded);
    let mut h = HeaderMap::new();
    h.insert(
        "forwarded",
        HeaderValue::from_static("for=\"[::ffff:192.30.252.7]:443\""),
    );
    assert!(fwd.allows(ip("::ffff:10.0.0.1"), &h));
}

/// Networks a user writes: a mapped IPv4 network in IPv6 notation matches the IPv4 peer it
/// names; malformed networks are errors that name the network.
#[test]
fn hooks31_network_spellings() {
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/-1",
        "010.0.0.0/8",
        "10.0.0.0/8/8",
        "",
        "10.0.0.0 /8",
    ] {
        let e = SourceAllowlist::new([bad]).map(|_| ()).unwrap_err();
        assert!(
            e.to_string().contains(bad.trim()) || bad.is_empty(),
            "the error names {bad:?}: {e}"
        );
    }
    let list = SourceAllowlist::new(["2001:db8::/32", "192.0.2.1"]).unwrap();
    assert!(list.allows(ip("2001:db8::1"), &HeaderMap::new()));
    assert!(list.allows(ip("192.0.2.1"), &HeaderMap::new()));
    assert!(list.allows(ip("::ffff:192.0.2.1"), &HeaderMap::new()));
    assert!(!list.allows(ip("192.0.2.2"), &HeaderMap::new()));
}
