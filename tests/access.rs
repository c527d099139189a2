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

fn limited(endpoint: &str, server_extra: &str, bucket_extra: &str, top: &str) -> String {
    let port = free_port();
    format!(
        "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 1\n{server_extra}{top}buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n{bucket_extra}      health_check:\n        enabled: false\n"
    )
}

#[test]
fn per_ip_and_global_limits_answer_429_with_retry_after() {
    let up = upstream();
    // One token per 100 s: no refill between these requests, however
    // slowly a busy machine runs them.
    let per_ip = "  trusted_proxies: [\"127.0.0.1/32\"]\n  rate_limit:\n    enabled: true\n    per_ip:\n      requests_per_second: 0.01\n      burst: 2\n";
    let proxy = Proxy::start(&limited(&up.endpoint(), per_ip, "", ""));
    let from = |ip: &str| http::get(proxy.port, "/b/k", &[("X-Forwarded-For", ip)]);
    assert_eq!(from("10.0.0.1").status, 200);
    assert_eq!(from("10.0.0.1").status, 200);
    let r = from("10.0.0.1");
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&retry), "{retry}");
    assert_eq!(
        from("10.0.0.2").status,
        200,
        "another address has its own bucket"
    );
    assert_eq!(up.seen().len(), 3);
    assert!(proxy
        .metrics()
        .contains("yatagarasu_rate_limited_total{scope=\"per_ip\"} 1"));

    let global = "  rate_limit:\n    enabled: true\n    global:\n      requests_per_second: 0.01\n";
    let proxy = Proxy::start(&limited(&up.endpoint(), global, "", ""));
    let first = http::get(proxy.port, "/b/k", &[]);
    let second = http::get(proxy.port, "/b/k", &[]);
    assert_eq!((first.status, second.status), (200, 429));
    // Disabled limits do nothing.
    let off = "  rate_limit:\n    enabled: false\n    global:\n      requests_per_second: 1\n";
    let proxy = Proxy::start(&limited(&up.endpoint(), off, "", ""));
    for _ in 0..5 {
        assert_eq!(http::get(proxy.port, "/b/k", &[]).status, 200);
    }
}

#[test]
fn the_bucket_upstream_limit_guards_upstream_requests_and_cache_hits_do_not_count() {
    let up = upstream();
    let cache = "cache:\n  enabled: true\n";
    let bucket = "      rate_limit:\n        requests_per_second: 0.01\n";
    let proxy = Proxy::start(&limited(&up.endpoint(), "", bucket, cache));
    assert_eq!(proxy.get("/b/cached").status, 200);
    for _ in 0..10 {
        let r = proxy.get("/b/cached");
        assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    }
    let r = proxy.get("/b/other");
    assert_eq!(r.status, 429, "a second upstream request within 100 s");
    assert_eq!(up.seen().len(), 1);
    assert!(proxy
        .metrics()
        .contains("yatagarasu_rate_limited_total{scope=\"bucket\"} 1"));
}
