//! Issue #24: configs written in the shapes of the system we follow
//! (julianshen/yatagarasu), run end to end against s3s-fs: per-bucket JWT
//! claims, replicas and breakers, a memory plus disk cache. The configs are
//! our own, in that system's key names (`server.address` + `port`,
//! `threads`, `auth.jwt`, `claims_verification`, `source_type`, `timeout`,
//! `half_open_max_requests`, `cache_layers`, keys with no effect).

mod support;

use serde_json::json;
use std::time::Duration;
use support::http;
use support::*;

fn server() -> String {
    format!(
        "server:\n  address: \"127.0.0.1\"\n  port: {}\n  threads: 2\n  request_timeout: 30\nmetrics:\n  enabled: true\n  port: {}\n",
        free_port(),
        free_port()
    )
}

fn token(secret: &str, claims: serde_json::Value) -> String {
    hs256_token(secret, &claims)
}

fn exp() -> u64 {
    unix_now() + 600
}

#[test]
fn per_bucket_jwt_claims_as_the_other_system_writes_them() {
    let s3 = S3::start();
    s3.create_bucket("assets");
    s3.put("assets", "a.txt", b"public");
    s3.put("assets", "u.txt", b"for users");
    s3.put("assets", "x.txt", b"for admins");
    let bucket = |name: &str, prefix: &str, auth: &str| {
        format!(
            "  - name: \"{name}\"\n    path_prefix: \"{prefix}\"\n    s3:\n      bucket: \"assets\"\n      region: \"us-east-1\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      timeout: 5\n    auth:\n{auth}",
            s3.endpoint()
        )
    };
    let cfg = format!(
        "{}jwt:\n  enabled: false\n  secret: \"\"\nbuckets:\n{}{}{}",
        server(),
        bucket("public", "/public", "      enabled: false\n"),
        bucket(
            "users",
            "/users",
            "      enabled: true\n      jwt:\n        secret: \"users-secret-0123456789\"\n        algorithm: \"HS256\"\n        token_sources:\n          - source_type: \"header\"\n            name: \"Authorization\"\n            prefix: \"Bearer \"\n        claims_verification:\n          - claim: \"role\"\n            operator: \"in\"\n            value: \"user, admin\"\n"
        ),
        bucket(
            "admin",
            "/admin-data",
            "      enabled: true\n      jwt:\n        secret: \"admin-secret-0123456789\"\n        algorithm: \"HS256\"\n        claims_verification:\n          - claim: \"role\"\n            operator: \"equals\"\n            value: \"admin\"\n          - claim: \"level\"\n            operator: \"gte\"\n            value: 3\n"
        ),
    );
    let p = Proxy::start(&cfg);
    assert!(
        p.log().contains("server.request_timeout: has no effect"),
        "{}",
        p.log()
    );
    let get = |path: &str, t: Option<&str>| {
        let auth = t.map(|t| format!("Bearer {t}"));
        let h: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        http::get(p.port, path, &h)
    };
    assert_eq!(get("/public/a.txt", None).text(), "public");
    let user = token(
        "users-secret-0123456789",
        json!({"role": "user", "exp": exp()}),
    );
    assert_eq!(get("/users/u.txt", Some(&user)).text(), "for users");
    assert_eq!(get("/users/u.txt", None).status, 401);
    assert_eq!(
        get("/admin-data/x.txt", Some(&user)).status,
        401,
        "another bucket's key"
    );
    let admin = |level: u64| {
        token(
            "admin-secret-0123456789",
            json!({"role": "admin", "level": level, "exp": exp()}),
        )
    };
    assert_eq!(
        get("/admin-data/x.txt", Some(&admin(3))).text(),
        "for admins"
    );
    assert_eq!(get("/admin-data/x.txt", Some(&admin(2))).status, 403);
}

#[test]
fn replicas_and_breakers_as_the_other_system_writes_them() {
    let mut primary = S3::start();
    let backup = primary.sharing(AK, SK);
    primary.create_bucket("products");
    primary.put("products", "p.txt", b"product");
    let cfg = format!(
        "{}buckets:\n  - name: \"products-ha\"\n    path_prefix: \"/products\"\n    s3:\n      bucket: \"products\"\n      region: \"us-east-1\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      connection_pool_size: 50\n      replicas:\n        - name: \"primary\"\n          endpoint: \"{}\"\n          priority: 1\n          timeout: 2\n        - name: \"backup\"\n          endpoint: \"{}\"\n          priority: 2\n          timeout: 3\n      circuit_breaker:\n        failure_threshold: 2\n        success_threshold: 1\n        timeout_seconds: 60\n        half_open_max_requests: 1\n      health_check:\n        enabled: false\n",
        server(),
        primary.endpoint(),
        backup.endpoint()
    );
    let p = Proxy::start(&cfg);
    assert!(
        p.log()
            .contains("buckets[0].s3.connection_pool_size: has no effect"),
        "{}",
        p.log()
    );
    assert_eq!(p.get("/products/p.txt").text(), "product");
    primary.kill();
    for _ in 0..4 {
        assert_eq!(p.get("/products/p.txt").text(), "product", "{}", p.log());
    }
    assert!(
        p.wait_metric(
            // 1: open (the breaker opened after failure_threshold: 2).
            "yatagarasu_circuit_breaker_state{bucket=\"products-ha\",replica=\"primary\"}",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        p.metrics()
    );
}

#[test]
fn a_memory_and_disk_cache_as_the_other_system_writes_it() {
    let s3 = S3::start();
    s3.create_bucket("media");
    s3.put("media", "m.bin", &pattern(200_000, 3));
    let dir = tempfile::tempdir().expect("dir");
    let cfg = format!(
        "{}cache:\n  enabled: true\n  cache_layers: [\"memory\", \"disk\"]\n  memory:\n    max_item_size_mb: 10\n    max_cache_size_mb: 64\n    default_ttl_seconds: 300\n  disk:\n    enabled: true\n    cache_dir: \"{}\"\n    max_disk_cache_size_mb: 128\nbuckets:\n  - name: \"media\"\n    path_prefix: \"/media\"\n    s3:\n      bucket: \"media\"\n      region: \"us-east-1\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n    cache:\n      enabled: true\n      ttl_seconds: 600\n",
        server(),
        dir.path().display(),
        s3.endpoint()
    );
    let p = Proxy::start(&cfg);
    let r = p.get("/media/m.bin");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert!(r.body == pattern(200_000, 3));
    let r = p.get("/media/m.bin");
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert!(
        p.wait_metric(
            "yatagarasu_cache_items{layer=\"disk\"}",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        p.metrics()
    );
}
