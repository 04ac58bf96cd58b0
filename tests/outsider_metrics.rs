//! Outside tests of the metrics labels (docs/guides/metrics.md): no secret, no path or query.
use crate::outsider_common;
use metrics_util::debugging::DebuggingRecorder;
use outsider_common::*;
use sturdy::ClientBuilder;
use tower::ServiceExt;

#[test]
fn labels_hold_host_and_port_only() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let api = Api::new(
            vec![status(503), status_h(429, &[("retry-after", "1")])],
            ok(),
        );
        let client = ClientBuilder::new().build(api.service());
        for uri in [
            "http://user:hunter2@api.example.com:8443/secret/path?token=abc",
            "http://[2001:db8::1]:8080/x?token=abc",
            "http://user:hunter2@[2001:db8::2]/y",
        ] {
            let _ = client.clone().oneshot(get(uri)).await;
            api.push(status(503));
            api.push(status_h(429, &[("retry-after", "1")]));
        }
    });
    let snap = snapshotter.snapshot().into_vec();
    let mut addresses = std::collections::BTreeSet::new();
    for (key, _, _, _) in &snap {
        let k = key.key();
        for l in k.labels() {
            let v = l.value();
            assert!(
                !v.contains("hunter2") && !v.contains("secret") && !v.contains("token"),
                "{}: {}={v}",
                k.name(),
                l.key()
            );
            if l.key() == "server.address" {
                addresses.insert(v.to_owned());
            }
        }
    }
    eprintln!("server.address values: {addresses:?}");
    for a in &addresses {
        assert!(
            !a.contains('@') && !a.contains(':') || a.starts_with("2001:db8"),
            "{a}"
        );
        assert!(
            !a.starts_with('['),
            "an IPv6 address kept its brackets: {a}"
        );
    }
}
