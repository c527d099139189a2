//! Who may read: per-bucket IP filters on the client's address (the socket
//! peer, or behind trusted proxies the right-most untrusted
//! `X-Forwarded-For` entry). Real sockets; the test clients come from
//! 127.0.0.1.

mod support;

use support::http;
use support::rogue::{send, Rogue};
use support::*;

fn config(endpoint: &str, filter: &str, trusted: &str) -> String {
    let port = free_port();
    format!(
        "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 2\n{trusted}buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n{filter}    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n  - name: \"open\"\n    path_prefix: \"/open\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n"
    )
}

fn upstream() -> Rogue {
    Rogue::start(|_| vec![send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")])
}

#[test]
fn allowlist_admits_only_its_ranges_and_blocklist_wins() {
    let up = upstream();
    let only_10 = "    ip_filter:\n      allowlist: [\"10.0.0.0/8\", \"2001:db8::/32\"]\n";
    let proxy = Proxy::start(&config(&up.endpoint(), only_10, ""));
    let r = proxy.get("/b/k");
    assert_eq!((r.status, r.text().as_str()), (403, "forbidden\n"));
    assert_eq!(
        proxy.get("/open/k").status,
        200,
        "other buckets are not filtered"
    );
    assert_eq!(
        up.seen().len(),
        1,
        "a refused request never reaches upstream"
    );

    let loopback_but_blocked =
        "    ip_filter:\n      allowlist: [\"127.0.0.0/8\"]\n      blocklist: [\"127.0.0.1/32\"]\n";
    let proxy = Proxy::start(&config(&up.endpoint(), loopback_but_blocked, ""));
    assert_eq!(proxy.get("/b/k").status, 403);
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_ip_filtered_total{bucket=\"b\"} 1"),
        "{m}"
    );
    assert!(proxy.wait_log(
        "Request refused by the bucket's IP filter",
        std::time::Duration::from_secs(2)
    ));

    let loopback = "    ip_filter:\n      allowlist: [\"127.0.0.0/8\"]\n";
    let proxy = Proxy::start(&config(&up.endpoint(), loopback, ""));
    assert_eq!(proxy.get("/b/k").status, 200);
}

#[test]
fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let up = upstream();
    let filter =
        "    ip_filter:\n      allowlist: [\"10.0.0.0/8\"]\n      blocklist: [\"10.1.2.3/32\"]\n";
    // Untrusted peer: a forged header changes nothing.
    let proxy = Proxy::start(&config(&up.endpoint(), filter, ""));
    let forged = http::get(proxy.port, "/b/k", &[("X-Forwarded-For", "10.9.9.9")]);
    assert_eq!(forged.status, 403);
    // Trusted peer (the test client on 127.0.0.1): the right-most untrusted entry.
    let trusted = "  trusted_proxies: [\"127.0.0.1/32\"]\n";
    let proxy = Proxy::start(&config(&up.endpoint(), filter, trusted));
    let via = |xff: &str| http::get(proxy.port, "/b/k", &[("X-Forwarded-For", xff)]).status;
    assert_eq!(via("10.9.9.9"), 200);
    assert_eq!(via("10.1.2.3"), 403);
    assert_eq!(
        via("10.1.2.3, 192.168.7.7"),
        403,
        "the right-most untrusted entry counts"
    );
    assert_eq!(
        via("192.168.7.7, 10.9.9.9"),
        200,
        "entries left of it can be forged"
    );
    assert_eq!(
        http::get(proxy.port, "/b/k", &[]).status,
        403,
        "no header: the peer"
    );
}
