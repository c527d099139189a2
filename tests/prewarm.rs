//! Cache pre-warming through the admin API, against s3s-fs (a few thousand
//! keys under nested prefixes, two listing pages) and moto (failover of the
//! listing past a dead replica): tasks, progress, skips, cancel, the
//! cache's bound, and the guard the fetches pass.

mod support;

use std::time::Duration;
use support::http::{self, Conn};
use support::*;

const TOKEN: &str = "prewarm-admin-token-0123456789";
const JWT_SECRET: &str = "prewarm-jwt-secret-0123456789abcdef";

/// One bucket `/w` on `endpoints` (replica lines), JWT required, cached;
/// `cache_extra` goes into `cache:`.
fn config(replicas: &str, cache_extra: &str) -> String {
    format!(
        "admin:\n  token: \"{TOKEN}\"\njwt:\n  enabled: true\n  secret: \"{JWT_SECRET}\"\ncache:\n  enabled: true\n  cache_layers: [\"memory\"]\n{cache_extra}buckets:\n  - name: \"w\"\n    path_prefix: \"/w\"\n    auth:\n      enabled: true\n    s3:\n      bucket: \"warm\"\n      region: \"us-east-1\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n{replicas}"
    )
}

fn one_replica(endpoint: &str) -> String {
    format!("      endpoint: \"{endpoint}\"\n      health_check:\n        enabled: false\n")
}

/// An admin request on the metrics listener, with a JSON body when given.
fn admin(proxy: &Proxy, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    admin_on(proxy.metrics_port, method, path, body)
}

/// The same on `port` (the main port with `admin.main_port`).
fn admin_on(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n"
    );
    if let Some(b) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        raw.push_str("\r\n");
    }
    let mut c = Conn::open(port).expect("admin connection");
    c.send(raw.as_bytes()).expect("send");
    let r = c.read_response(false).expect("admin answer");
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

fn start_task(proxy: &Proxy, body: &str) -> String {
    let (status, v) = admin(proxy, "POST", "/admin/cache/prewarm", Some(body));
    assert_eq!(status, 200, "{v}");
    v["task_id"].as_str().expect("a task id").to_string()
}

/// Waits for the task to leave `running` (progress is asserted, never a
/// duration: the wait is generous for a busy machine).
fn wait_done(proxy: &Proxy, id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let (status, v) = admin(
            proxy,
            "GET",
            &format!("/admin/cache/prewarm/status/{id}"),
            None,
        );
        assert_eq!(status, 200, "{v}");
        if v["status"] != "running" && v["status"] != "pending" {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task never ended: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `count` objects into s3s-fs's directory for bucket `warm`:
/// `site/a<i>/b<j>/f<k>.txt`, ten per folder, plus one deeper object and
/// one outside `site/`. Returns the keys under `site/` at depth 3.
fn fill_bucket(s3: &S3, count: usize) -> Vec<(String, Vec<u8>)> {
    let root = s3.dir.path().join("warm");
    let mut keys = Vec::new();
    for n in 0..count {
        let key = format!("site/a{}/b{}/f{}.txt", n / 100, (n / 10) % 10, n % 10);
        let body = format!("object {n} {}", "x".repeat(n % 50)).into_bytes();
        let path = root.join(&key);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&path, &body).expect("write object");
        keys.push((key, body));
    }
    for extra in ["site/a0/b0/c/d/deep.txt", "other/outside.txt"] {
        let path = root.join(extra);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&path, b"not in scope").expect("write object");
    }
    keys
}

#[test]
fn prewarm_fetches_thousands_of_nested_keys_once_then_skips_them() {
    let s3 = S3::start();
    let keys = fill_bucket(&s3, 2000);
    let proxy = Proxy::start(&config(
        &one_replica(&s3.endpoint()),
        "  memory:\n    max_cache_size_mb: 64\n  warming:\n    concurrency: 16\n    rate_limit: 5000\n",
    ));
    let id = start_task(
        &proxy,
        r#"{"bucket": "w", "path": "/site/", "recursive": true, "max_depth": 3}"#,
    );
    let done = wait_done(&proxy, &id);
    let total: u64 = keys.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["files_scanned"], 2000,
        "the deeper and outside keys are out of scope: {done}"
    );
    assert_eq!(done["files_cached"], 2000, "{done}");
    assert_eq!(done["files_failed"], 0, "{done}");
    assert_eq!(done["bytes_cached"], total, "{done}");
    // Two listing pages (1000 keys each) were read: every key came.
    let token = hs256_token(
        JWT_SECRET,
        &serde_json::json!({"sub": "u", "exp": unix_now() + 600}),
    );
    let bearer = format!("Bearer {token}");
    for (key, body) in keys.iter().step_by(97) {
        let r = http::get(
            proxy.port,
            &format!("/w/{key}"),
            &[("Authorization", &bearer)],
        );
        assert_eq!(r.status, 200, "{key}");
        assert_eq!(r.header("x-cache"), Some("HIT"), "{key} was pre-warmed");
        assert_eq!(&r.body, body, "{key}");
    }
    // The fetches passed the bucket's JWT; a client without one still
    // does not.
    assert_eq!(proxy.get(&format!("/w/{}", keys[0].0)).status, 401);
    // The same task again: everything is held already.
    let again = wait_done(
        &proxy,
        &start_task(&proxy, r#"{"bucket": "w", "path": "site/"}"#),
    );
    assert_eq!(again["status"], "completed", "{again}");
    // Without max_depth the deeper key is in scope: the one fetch.
    assert_eq!(again["files_scanned"], 2001, "{again}");
    assert_eq!(again["files_skipped"], 2000, "{again}");
    assert_eq!(again["files_cached"], 1, "{again}");
    assert!(proxy.wait_metric(
        "yatagarasu_prewarm_files_total",
        2001.0,
        Duration::from_secs(10)
    ));
    assert_eq!(proxy.metric("yatagarasu_prewarm_tasks_total"), Some(2.0));
    let (status, tasks) = admin(&proxy, "GET", "/admin/cache/prewarm/tasks", None);
    assert_eq!(status, 200);
    assert_eq!(tasks["tasks"].as_array().map(Vec::len), Some(2), "{tasks}");
    // Once no task runs, the secret opens nothing (nobody outside the
    // process knows it; a made-up one is refused too).
    let r = http::get(
        proxy.port,
        &format!("/w/{}", keys[1].0),
        &[("X-Yatagarasu-Prewarm", "00")],
    );
    assert_eq!(r.status, 401);
}

/// Puts `body` at `key` in moto's bucket `warm` (moto checks no signature).
fn moto_put(moto: &Moto, key: &str, body: &[u8]) {
    let r = http::signed(moto.port, "PUT", &format!("/warm/{key}"), body, AK, SK);
    assert_eq!(r.status, 200, "put {key}: {}", r.text());
}

#[test]
fn the_listing_fails_over_past_a_dead_replica_and_a_task_stops_at_the_caches_bound() {
    let moto = Moto::start();
    let r = http::signed(moto.port, "PUT", "/warm", b"", AK, SK);
    assert_eq!(r.status, 200, "create bucket: {}", r.text());
    for i in 0..6 {
        moto_put(&moto, &format!("big/o{i}"), &pattern(200 * 1024, i));
    }
    for i in 0..12 {
        moto_put(
            &moto,
            &format!("dir/k{i:02}"),
            format!("small {i}").as_bytes(),
        );
    }
    moto_put(&moto, "dir/sub/nested", b"below dir/");
    let dead = free_port();
    let replicas = format!(
        "      replicas:\n        - name: \"dead\"\n          endpoint: \"http://127.0.0.1:{dead}\"\n          priority: 1\n        - name: \"moto\"\n          endpoint: \"{}\"\n          priority: 2\n      health_check:\n        enabled: false\n",
        moto.endpoint()
    );
    let proxy = Proxy::start(&config(
        &replicas,
        "  memory:\n    max_cache_size_mb: 1\n    max_item_size_mb: 1\n",
    ));
    // Not recursive: the objects directly in dir/, not dir/sub/.
    let flat = wait_done(
        &proxy,
        &start_task(
            &proxy,
            r#"{"bucket": "w", "path": "dir/", "recursive": false}"#,
        ),
    );
    assert_eq!(flat["status"], "completed", "{flat}");
    assert_eq!(flat["files_scanned"], 12, "{flat}");
    assert_eq!(flat["files_cached"], 12, "{flat}");
    // Six objects of 200 KiB into a 1 MiB cache (the small ones held
    // already take little): five fit, the sixth would pass the bound.
    let big = wait_done(
        &proxy,
        &start_task(&proxy, r#"{"bucket": "w", "path": "big/"}"#),
    );
    assert_eq!(big["status"], "completed", "{big}");
    assert_eq!(big["files_cached"], 5, "{big}");
    assert!(
        big["stopped_reason"]
            .as_str()
            .is_some_and(|s| s.contains("bound")),
        "{big}"
    );
}

#[test]
fn tasks_are_cancelled_and_bad_requests_named() {
    let s3 = S3::start();
    fill_bucket(&s3, 200);
    let proxy = Proxy::start(
        &config(
            &one_replica(&s3.endpoint()),
            "  warming:\n    concurrency: 1\n    rate_limit: 2\n",
        )
        .replace("admin:\n", "admin:\n  main_port: true\n"),
    );
    // Started on the main port (its body read there), watched on both.
    let (status, v) = admin_on(
        proxy.port,
        "POST",
        "/admin/cache/prewarm",
        Some(r#"{"bucket": "w", "path": "site/"}"#),
    );
    assert_eq!(status, 200, "{v}");
    let id = v["task_id"].as_str().expect("a task id").to_string();
    let (status, v) = admin(
        &proxy,
        "DELETE",
        &format!("/admin/cache/prewarm/{id}"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let done = wait_done(&proxy, &id);
    assert_eq!(done["status"], "cancelled", "{done}");
    let cached = done["files_cached"].as_u64().unwrap_or(u64::MAX);
    assert!(cached < 200, "a cancelled task stops fetching: {done}");
    let (status, _) = admin(
        &proxy,
        "DELETE",
        &format!("/admin/cache/prewarm/{id}"),
        None,
    );
    assert_eq!(status, 409, "a finished task cannot be cancelled");
    for (path, method, body, want) in [
        ("/admin/cache/prewarm/prewarm-999", "DELETE", None, 404),
        ("/admin/cache/prewarm/status/prewarm-999", "GET", None, 404),
        ("/admin/cache/prewarm", "POST", Some("{not json"), 400),
        (
            "/admin/cache/prewarm",
            "POST",
            Some(r#"{"bucket": "w", "pth": "x"}"#),
            400,
        ),
        (
            "/admin/cache/prewarm",
            "POST",
            Some(r#"{"bucket": "nope"}"#),
            404,
        ),
    ] {
        let (status, v) = admin(&proxy, method, path, body);
        assert_eq!(status, want, "{method} {path} {body:?}: {v}");
        assert!(v["error"].is_string(), "the answer names the problem: {v}");
    }
    // Without the admin token: refused like every admin endpoint.
    let r = http::with_bearer(
        proxy.metrics_port,
        "GET",
        "/admin/cache/prewarm/tasks",
        Some("wrong"),
    );
    assert_eq!(r.status, 401);
}
