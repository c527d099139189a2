//! SIGHUP reload: buckets and replicas change for new requests, breaker state
//! of unchanged replicas is kept, in-flight requests finish on the old config,
//! an invalid config is rejected and the old one kept.

mod support;

use std::time::Duration;
use support::fault::{Fault, Mode};
use support::http;
use support::*;

fn bucket(name: &str, prefix: &str, replicas: &[(&str, &str, u32)]) -> String {
    let mut s = format!(
        "  - name: \"{name}\"\n    path_prefix: \"{prefix}\"\n    s3:\n      bucket: \"data-bucket\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n      circuit_breaker:\n        failure_threshold: 1\n        timeout_seconds: 60\n      replicas:\n"
    );
    for (rname, endpoint, priority) in replicas {
        s.push_str(&format!(
            "        - name: \"{rname}\"\n          endpoint: \"{endpoint}\"\n          priority: {priority}\n          timeout_seconds: 2\n"
        ));
    }
    s
}

fn reloads(proxy: &Proxy, result: &str) -> usize {
    let m = proxy.metrics();
    let needle = format!("yatagarasu_config_reloads_total{{result=\"{result}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_reloads(proxy: &Proxy, result: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reloads(proxy, result) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload ({result}):\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ADMIN_TOKEN: &str = "0123456789abcdef-admin";

/// Writes `body` as the config and reloads it: by SIGHUP, or by
/// `POST /admin/reload` (then its answer is checked: 200, or 422 with the
/// problems, as the reload succeeded or not).
fn reload_via(proxy: &Proxy, body: &str, api: bool, ok: bool) {
    let body = format!("admin:\n  token: \"{ADMIN_TOKEN}\"\n{body}");
    if !api {
        proxy.reload(&body);
        return;
    }
    proxy.write_config(&body);
    let mut c = http::Conn::open(proxy.metrics_port).expect("admin");
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = c
        .request("POST", "/admin/reload", &[("Authorization", &auth)])
        .expect("reload answer");
    match ok {
        true => assert_eq!(r.status, 200, "{}", r.text()),
        false => {
            assert_eq!(r.status, 422, "{}", r.text());
            assert!(r.text().contains("missing field `s3`"), "{}", r.text());
        }
    }
}

#[test]
fn buckets_are_added_changed_and_removed_and_bad_configs_rejected() {
    buckets_added_changed_removed(false);
}

/// The admin API's reload does exactly what SIGHUP does (the same test).
#[test]
fn the_admin_reload_adds_changes_removes_and_rejects_alike() {
    buckets_added_changed_removed(true);
}

fn buckets_added_changed_removed(api: bool) {
    let a = S3::start();
    let b = S3::start();
    for (s, text) in [(&a, "from a"), (&b, "from b")] {
        s.create_bucket("data-bucket");
        s.put("data-bucket", "k.txt", text.as_bytes());
    }
    let one = format!(
        "buckets:\n{}",
        bucket("first", "/one", &[("a", &a.endpoint(), 1)])
    );
    let proxy = Proxy::start(&format!("admin:\n  token: \"{ADMIN_TOKEN}\"\n{one}"));
    assert_eq!(proxy.get("/one/k.txt").text(), "from a");
    assert_eq!(proxy.get("/two/k.txt").status, 404);

    // Add a bucket and point the first one at the other replica.
    let two = format!(
        "buckets:\n{}{}",
        bucket("first", "/one", &[("a", &b.endpoint(), 1)]),
        bucket("second", "/two", &[("a", &a.endpoint(), 1)])
    );
    reload_via(&proxy, &two, api, true);
    wait_reloads(&proxy, "success", 1);
    assert_eq!(proxy.get("/one/k.txt").text(), "from b");
    assert_eq!(proxy.get("/two/k.txt").text(), "from a");

    // An invalid config is rejected; the running one keeps serving.
    reload_via(
        &proxy,
        "buckets:\n  - name: broken\n    path_prefix: nope\n",
        api,
        false,
    );
    wait_reloads(&proxy, "failure", 1);
    assert!(proxy.wait_log("Configuration reload rejected", Duration::from_secs(2)));
    assert!(
        proxy
            .log()
            .contains("problems=\"buckets[0]: missing field `s3`"),
        "{}",
        proxy.log()
    );
    assert_eq!(proxy.get("/two/k.txt").text(), "from a");

    // Remove a bucket.
    reload_via(&proxy, &one, api, true);
    wait_reloads(&proxy, "success", 2);
    assert_eq!(proxy.get("/two/k.txt").status, 404);
    assert_eq!(proxy.get("/one/k.txt").text(), "from a");
    // Counters survive reloads.
    assert!(proxy
        .metrics()
        .contains("yatagarasu_replica_requests_total{bucket=\"second\",replica=\"a\"} 2"));
}

#[test]
fn breaker_state_of_unchanged_replicas_survives_a_reload() {
    let p = S3::start();
    let backup = S3::start();
    for s in [&p, &backup] {
        s.create_bucket("data-bucket");
        s.put("data-bucket", "k.txt", b"x");
    }
    let fault = Fault::start(p.port, Mode::Status(503));
    let cfg = format!(
        "buckets:\n{}",
        bucket(
            "ha",
            "/ha",
            &[
                ("primary", &fault.endpoint(), 1),
                ("backup", &backup.endpoint(), 2)
            ]
        )
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(proxy.get("/ha/k.txt").status, 200);
    let primary_hits = || fault.recorded().len();
    assert_eq!(
        primary_hits(),
        1,
        "one failure opened the primary's breaker"
    );
    // Reload with an extra, unrelated bucket: the primary is unchanged and stays open.
    let more = format!(
        "{cfg}{}",
        bucket("other", "/other", &[("x", &backup.endpoint(), 1)])
    );
    proxy.reload(&more);
    wait_reloads(&proxy, "success", 1);
    for _ in 0..5 {
        assert_eq!(proxy.get("/ha/k.txt").status, 200);
    }
    assert_eq!(
        primary_hits(),
        1,
        "the open breaker was kept across the reload"
    );
    // Changing the primary's settings gives it a fresh (closed) breaker.
    let changed = more.replacen("timeout_seconds: 2", "timeout_seconds: 3", 1);
    proxy.reload(&changed);
    wait_reloads(&proxy, "success", 2);
    assert_eq!(proxy.get("/ha/k.txt").status, 200);
    assert_eq!(primary_hits(), 2, "a changed replica starts closed");
}

#[test]
fn in_flight_requests_finish_on_the_old_config() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    let body = pattern(300_000, 77);
    s3.put("data-bucket", "slow.bin", &body);
    let fault = Fault::start(
        s3.port,
        Mode::Drip {
            bytes: 30_000,
            every_ms: 100,
        },
    );
    let old = format!(
        "buckets:\n{}",
        bucket("slow", "/slow", &[("only", &fault.endpoint(), 1)])
    );
    let proxy = Proxy::start(&old);
    let port = proxy.port;
    let client = std::thread::spawn(move || http::get(port, "/slow/slow.bin", &[]));
    std::thread::sleep(Duration::from_millis(300));
    let new = format!(
        "buckets:\n{}",
        bucket("fast", "/fast", &[("only", &s3.endpoint(), 1)])
    );
    proxy.reload(&new);
    wait_reloads(&proxy, "success", 1);
    assert_eq!(
        proxy.get("/slow/slow.bin").status,
        404,
        "new requests see the new config"
    );
    let r = client.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "the in-flight response completed on the old config"
    );
}
