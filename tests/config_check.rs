//! `yatagarasu --check`: every example config is valid; every kind of mistake
//! is reported with its YAML path and exit code 1.

use std::process::Command;

fn check(text: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).unwrap();
    check_path(path.to_str().unwrap(), env)
}

fn check_path(path: &str, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_yatagarasu"));
    cmd.args(["--check", "--config", path]);
    cmd.env_remove("MINIO_ACCESS_KEY")
        .env_remove("MINIO_SECRET_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

const ENV: [(&str, &str); 8] = [
    ("MINIO_ACCESS_KEY", "minioadmin"),
    ("MINIO_SECRET_KEY", "minioadmin"),
    ("S3_ACCESS_KEY", "a"),
    ("S3_SECRET_KEY", "b"),
    ("AWS_ACCESS_KEY", "AKIAEXAMPLE"),
    ("AWS_SECRET_KEY", "secret"),
    ("R2_ACCESS_KEY", "r2key"),
    ("R2_SECRET_KEY", "r2secret"),
];

#[test]
fn every_example_config_is_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, out) = check_path(path.to_str().unwrap(), &ENV);
            assert_eq!(code, 0, "{}: {out}", path.display());
            assert!(out.contains("configuration is valid"));
            seen += 1;
        }
    }
    assert!(seen >= 5);
}

const GOOD: &str = r#"
server:
  address: "127.0.0.1:8080"
buckets:
  - name: "one"
    path_prefix: "/data"
    s3:
      bucket: "b"
      endpoint: "http://127.0.0.1:9000"
      access_key: "${MINIO_ACCESS_KEY}"
      secret_key: "k"
      replicas:
        - name: "primary"
          endpoint: "http://127.0.0.1:9001"
          priority: 1
  - name: "two"
    path_prefix: "/other"
    s3:
      bucket: "c"
      endpoint: "http://127.0.0.1:9000"
      access_key: "a"
      secret_key: "k"
"#;

/// `text` loads (exit 0) and names each of `paths` as having no effect.
fn loads_with_no_effect(text: &str, paths: &[&str]) {
    let (code, out) = check(text, &ENV);
    assert_eq!(code, 0, "{out}");
    for path in paths {
        assert!(
            out.contains(&format!("warning: {path}: has no effect")),
            "{path}: {out}"
        );
    }
}

fn assert_error(text: &str, env: &[(&str, &str)], needles: &[&str]) {
    let (code, out) = check(text, env);
    assert_eq!(code, 1, "expected failure:\n{out}");
    for n in needles {
        assert!(out.contains(n), "missing {n:?} in:\n{out}");
    }
}

#[test]
fn the_base_config_is_valid() {
    let (code, out) = check(GOOD, &ENV);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn missing_environment_variable() {
    assert_error(
        GOOD,
        &[],
        &["buckets[0].s3.access_key", "MINIO_ACCESS_KEY is not set"],
    );
}

#[test]
fn variables_in_comments_are_ignored() {
    let text = format!("# uses ${{NOT_SET_ANYWHERE}}\n{GOOD}");
    assert_eq!(check(&text, &ENV).0, 0);
}

#[test]
fn unknown_key() {
    assert_error(
        &GOOD.replace("priority: 1", "priorty: 1"),
        &ENV,
        &["buckets[0].s3.replicas[0]", "unknown field `priorty`"],
    );
    assert_error(
        &GOOD.replace("server:", "sever:"),
        &ENV,
        &["unknown field `sever`"],
    );
}

#[test]
fn wrong_type() {
    assert_error(
        &GOOD.replace("priority: 1", "priority: first"),
        &ENV,
        &["buckets[0].s3.replicas[0].priority", "non-negative integer"],
    );
    assert_error(
        &GOOD.replace("path_prefix: \"/other\"", "path_prefix: [1]"),
        &ENV,
        &["buckets[1].path_prefix"],
    );
}

#[test]
fn duplicate_and_overlapping_prefixes() {
    assert_error(
        &GOOD.replace("\"/other\"", "\"/data/\""),
        &ENV,
        &["buckets[1].path_prefix", "overlaps buckets[0].path_prefix"],
    );
}

#[test]
fn empty_credentials() {
    assert_error(
        &GOOD.replace("secret_key: \"k\"", "secret_key: \"\""),
        &ENV,
        &[
            "buckets[0].s3.secret_key: must not be empty",
            "buckets[1].s3.secret_key: must not be empty",
        ],
    );
}

#[test]
fn every_problem_is_listed_at_once() {
    let text = GOOD
        .replace("\"127.0.0.1:8080\"", "\"nowhere\"")
        .replace(
            "endpoint: \"http://127.0.0.1:9001\"",
            "endpoint: \"ftp://x\"",
        )
        .replace("path_prefix: \"/other\"", "path_prefix: \"other\"");
    assert_error(
        &text,
        &ENV,
        &[
            "3 problems",
            "server.address",
            "buckets[0].s3.replicas[0].endpoint",
            "buckets[1].path_prefix",
        ],
    );
}

#[test]
fn settings_that_cannot_work_are_rejected() {
    let plain_with_ca = GOOD.replace(
        "          priority: 1\n",
        "          priority: 1\n          ca_file: \"/etc/ssl/certs/ca-certificates.crt\"\n",
    );
    assert_error(
        &plain_with_ca,
        &ENV,
        &["buckets[0].s3.replicas[0]", "https:// endpoints only"],
    );
    let auth = GOOD.replace("      secret_key: \"k\"\n      replicas", "      secret_key: \"k\"\n      circuit_breaker:\n        failure_threshold: 0\n      replicas");
    assert_error(
        &auth,
        &ENV,
        &["circuit_breaker.failure_threshold: must be at least 1"],
    );
    let auth = format!("{GOOD}    auth:\n      enabled: true\n");
    assert_error(&auth, &ENV, &["buckets[1].auth.enabled"]);
    assert_error(
        &format!("{GOOD}logging:\n  level: loud\n"),
        &ENV,
        &["logging.level"],
    );
}

#[test]
fn missing_file_and_bad_yaml() {
    let (code, out) = check_path("/nonexistent/config.yaml", &[]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot read config"));
    assert_error("server: [unclosed", &[], &["invalid YAML"]);
}

/// The origin cache's section in the tutorial system's keys (issue #10),
/// as far as it has landed: the memory tier.
const CACHE: &str = r#"
cache:
  enabled: true
  cache_layers: ["memory"]
  memory:
    max_cache_size_mb: 1024
    max_item_size_mb: 10
    default_ttl_seconds: 3600
"#;

#[test]
fn the_cache_section_is_checked_by_path() {
    let (code, out) = check(&format!("{GOOD}{CACHE}"), &ENV);
    assert_eq!(code, 0, "{out}");
    let later = format!(
        "{CACHE}  disk:\n    enabled: true\n    cache_dir: \"/var/cache/y\"\n  stale_if_error_seconds: 86400\n  slice_size_mb: 8\n"
    )
    .replace("[\"memory\"]", "[\"memory\", \"disk\"]");
    let (code, out) = check(&format!("{GOOD}{later}"), &ENV);
    assert_eq!(code, 0, "the disk tier and slices are accepted: {out}");
    // Pre-warming's pace (the other system's cache.warming).
    let warming = |body: &str| check(&format!("{GOOD}{CACHE}  warming:\n{body}"), &ENV);
    let (code, out) = warming("    concurrency: 4\n    rate_limit: 50\n");
    assert_eq!(code, 0, "{out}");
    let (code, out) = warming("    concurrency: 0\n    rate_limit: 0\n    burst: 3\n");
    assert_eq!(code, 1);
    for needle in [
        "cache.warming.concurrency: must be between 1 and 64",
        "cache.warming.rate_limit: must be at least 1",
        "cache.warming.burst",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    for (mb, needle) in [
        ("0", "cache.slice_size_mb: must be between 1 and 1024"),
        (
            "64",
            "cache.slice_size_mb: must not exceed cache.memory.max_item_size_mb",
        ),
    ] {
        let text = later.replace("slice_size_mb: 8", &format!("slice_size_mb: {mb}"));
        let (code, out) = check(&format!("{GOOD}{text}"), &ENV);
        assert_eq!(code, 1);
        assert!(out.contains(needle), "{needle}: {out}");
    }
    // The disk tier's keys are checked like the rest.
    let disk = |layers: &str, disk: &str| {
        let text = format!("{CACHE}  disk:\n{disk}").replace("[\"memory\"]", layers);
        check(&format!("{GOOD}{text}"), &ENV).1
    };
    let out = disk("[\"memory\", \"disk\"]", "    enabled: false\n");
    assert!(
        out.contains("cache.cache_layers[1]: \"disk\" needs cache.disk.enabled: true"),
        "{out}"
    );
    let out = disk(
        "[\"disk\", \"memory\"]",
        "    enabled: true\n    cache_dir: \"/tmp/y\"\n",
    );
    // Any order is accepted (the other system's configs write either);
    // memory is still asked first, and the warning says so.
    assert!(
        out.contains("warning: cache.cache_layers: the memory tier is always asked first"),
        "{out}"
    );
    let out = disk(
        "[\"memory\"]",
        "    enabled: true\n    cache_dir: \" \"\n    max_disk_cache_size_mb: 0\n",
    );
    for needle in [
        "cache.disk.enabled: the disk tier is enabled but cache.cache_layers does not list \"disk\"",
        "cache.disk.cache_dir: is empty",
        "cache.disk.max_disk_cache_size_mb: must be at least 1",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let bad = CACHE
        .replace("[\"memory\"]", "[\"ram\"]")
        .replace("max_item_size_mb: 10\n", "max_item_size_mb: 2048\n");
    let (code, out) = check(&format!("{GOOD}{bad}"), &ENV);
    assert_eq!(code, 1);
    for needle in [
        "cache.cache_layers[0]: \"ram\" is not one of memory, disk",
        "cache.memory.max_item_size_mb: must not exceed max_cache_size_mb",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let typo = CACHE.replace("default_ttl_seconds", "default_ttl");
    let (code, out) = check(&format!("{GOOD}{typo}"), &ENV);
    assert_eq!(code, 1);
    assert!(out.contains("cache.memory"), "{out}");
    // A bucket cannot turn on a cache that is off: accepted, with a
    // warning that it does nothing.
    let bucket = GOOD.replacen(
        "    s3:",
        "    cache:\n      enabled: true\n      ttl_seconds: 600\n    s3:",
        1,
    );
    let (code, out) = check(&bucket, &ENV);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "warning: buckets[0].cache.enabled: has no effect while cache.enabled is false"
        ),
        "{out}"
    );
}

#[test]
fn ip_filter_ranges_are_checked_by_path() {
    let bad = GOOD
        .replacen(
            "    s3:",
            "    ip_filter:\n      allowlist: [\"10.0.0.0/8\", \"10.0.0.0/40\"]\n      blocklist: [\"nope\"]\n    s3:",
            1,
        )
        .replacen(
            "server:\n  address: \"127.0.0.1:8080\"",
            "server:\n  address: \"127.0.0.1:8080\"\n  trusted_proxies: [\"300.1.1.1\"]",
            1,
        );
    let (code, out) = check(&bad, &ENV);
    assert_eq!(code, 1);
    for needle in [
        "buckets[0].ip_filter.allowlist[1]: \"10.0.0.0/40\" has an invalid prefix length",
        "buckets[0].ip_filter.blocklist[0]: \"nope\" is not an IP address",
        "server.trusted_proxies[0]: \"300.1.1.1\" is not an IP address",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}

#[test]
fn rate_limits_are_checked_by_path() {
    let bad = GOOD.replacen(
        "server:\n  address: \"127.0.0.1:8080\"",
        "server:\n  address: \"127.0.0.1:8080\"\n  rate_limit:\n    enabled: true\n    global:\n      requests_per_second: 0\n    per_ip:\n      requests_per_second: 5\n      burst: 0.5\n    per_host: {}",
        1,
    );
    let (code, out) = check(&bad, &ENV);
    assert_eq!(code, 1);
    assert!(out.contains("server.rate_limit"), "{out}");
    let bad = bad.replace("\n    per_host: {}", "");
    let (code, out) = check(&bad, &ENV);
    assert_eq!(code, 1);
    for needle in [
        "server.rate_limit.global.requests_per_second: must be a positive number",
        "server.rate_limit.per_ip.burst: must be at least 1",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}

#[test]
fn jwt_settings_are_checked_by_path() {
    let jwt = "jwt:\n  enabled: true\n  algorithm: \"HS999\"\n  secret: \"s\"\n  keys:\n    - { id: \"k1\", algorithm: \"RS256\", path: \"/nonexistent.pem\" }\n    - { id: \"k2\", algorithm: \"HS256\" }\n  token_sources:\n    - { type: \"header\" }\n    - { type: \"smoke\" }\n  claims:\n    - { claim: \"role\", operator: \"like\", value: \"x\" }\n    - { claim: \"role\", operator: \"in\", value: 5 }\n  jwks_url: \"ftp://auth.example.com/jwks.json\"\n";
    let (code, out) = check(&format!("{GOOD}{jwt}"), &ENV);
    assert_eq!(code, 1);
    for needle in [
        "jwt.algorithm: \"HS999\" is not one of",
        "jwt.keys[0]: cannot read \"/nonexistent.pem\"",
        "jwt.keys[1]: needs a non-empty secret",
        "jwt.token_sources[0].name: is required for this type",
        "jwt.token_sources[1].type: \"smoke\" is not one of bearer, header, query, cookie",
        "jwt.claims[0].operator: \"like\" is not one of",
        "jwt.claims[1].value: must be a list (or a comma-separated string) for the in operator",
        "jwt.jwks_url: \"ftp://auth.example.com/jwks.json\" must start with http:// or https://",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let stray =
        format!("{GOOD}jwt:\n  enabled: true\n  secret: \"s\"\n  jwks_refresh_interval_secs: 60\n");
    let (code, out) = check(&stray, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("jwt.jwks_refresh_interval_secs: applies only with jwt.jwks_url"),
        "{out}"
    );
    let no_key = format!("{GOOD}jwt:\n  enabled: true\n");
    let (code, out) = check(&no_key, &ENV);
    assert_eq!(code, 1);
    assert!(out.contains("jwt: enabled with no key"), "{out}");
}

/// The other system's names and shapes for the settings both have
/// (issue #24): each accepted, and each doing what ours does.
#[test]
fn the_other_system_s_shapes_load_as_ours() {
    let theirs = r#"
server:
  address: "127.0.0.1"
  port: 8080
  threads: 3
  coalescing:
    enabled: true
    strategy: "streaming"
logging:
  level: "info"
  format: "pretty"
cache:
  enabled: true
  cache_layers: ["disk", "memory"]
  disk:
    enabled: true
    cache_dir: "/tmp/yatagarasu-compat"
jwt:
  enabled: true
  secret: "s"
  token_sources:
    - source_type: "header"
      name: "Authorization"
      prefix: "Bearer "
  claims_verification:
    - claim: "level"
      operator: "gte"
      value: 3
    - claim: "role"
      operator: "in"
      value: "admin, editor"
buckets:
  - name: "one"
    path_prefix: "/one"
    s3:
      bucket: "b"
      endpoint: "http://127.0.0.1:9000"
      access_key: "a"
      secret_key: "s"
      timeout: 7
      replicas:
        - name: "r1"
          endpoint: "http://127.0.0.1:9001"
          timeout: 4
      circuit_breaker:
        half_open_max_requests: 3
"#;
    let (code, out) = check(theirs, &ENV);
    assert_eq!(code, 0, "{out}");
    // And the same settings, as our own shapes, say the same.
    let ours = theirs
        .replace(
            "  address: \"127.0.0.1\"\n  port: 8080\n  threads: 3\n  coalescing: true\n",
            "  address: \"127.0.0.1:8080\"\n  workers: 3\n",
        )
        .replace("format: \"pretty\"", "format: \"text\"")
        .replace("source_type:", "type:")
        .replace("claims_verification:", "claims:")
        .replace("      timeout: 7\n", "      timeout_seconds: 7\n")
        .replace("          timeout: 4\n", "          timeout_seconds: 4\n")
        .replace("half_open_max_requests", "half_open_requests");
    let (code, ours_out) = check(&ours, &ENV);
    assert_eq!(code, 0, "{ours_out}");
    // Collapsing cannot be turned off here: said, not ignored.
    let off = theirs.replace(
        "    enabled: true\n    strategy",
        "    enabled: false\n    strategy",
    );
    let (code, out) = check(&off, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("server.coalescing.enabled: concurrent misses"),
        "{out}"
    );
    let waiting = theirs.replace("\"streaming\"", "\"wait_for_complete\"");
    let (code, out) = check(&waiting, &ENV);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: server.coalescing.strategy: waiters always stream"),
        "{out}"
    );
    // A port with a host:port address is a clear error.
    let both = theirs.replace("address: \"127.0.0.1\"", "address: \"127.0.0.1:81\"");
    let (code, out) = check(&both, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains(
            "server.address: \"127.0.0.1:81\" is not a valid listen host for server.port 8080"
        ),
        "{out}"
    );
}

/// Keys the other system parses and never acts on (or skips): accepted,
/// each named in a warning saying it has no effect; a typo stays an error.
#[test]
fn the_other_system_s_no_effect_keys_warn_and_typos_still_fail() {
    let theirs = format!(
        "{GOOD}compression:\n  enabled: true\n  algorithms: [\"gzip\"]\nobservability:\n  tracing:\n    enabled: false\n  slow_query:\n    enabled: true\ncache:\n  enabled: true\n  layers: [\"memory\"]\n  memory:\n    enabled: true\n    max_memory_cache_mb: 64\n    max_entry_size_mb: 4\n    max_capacity: 10000\n    ttl_seconds: 300\n"
    )
    .replace("  address: \"127.0.0.1:8080\"\n", "  address: \"127.0.0.1:8080\"\n  request_timeout: 30\n");
    loads_with_no_effect(
        &theirs,
        &[
            "server.request_timeout",
            "compression",
            "observability.slow_query",
            "cache.layers",
            "cache.memory.enabled",
            "cache.memory.max_memory_cache_mb",
            "cache.memory.max_entry_size_mb",
            "cache.memory.max_capacity",
            "cache.memory.ttl_seconds",
        ],
    );
    let typo = theirs.replace("request_timeout", "request_timeuot");
    let (code, out) = check(&typo, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("server.request_timeuot: unknown field"),
        "{out}"
    );
    // The keys that have no effect are named beside the errors too.
    assert!(out.contains("warning: compression: has no effect"), "{out}");
}

/// Issue #24: every unknown key and wrongly typed value in one run, each
/// with its path, and the value checks of the rest too.
#[test]
fn every_schema_problem_is_listed_in_one_run() {
    let bad =
        GOOD.replace(
            "  address: \"127.0.0.1:8080\"\n",
            "  address: \"127.0.0.1:8080\"\n  bogus_one: 1\n  workers: \"many\"\n",
        )
        .replace(
            "          priority: 1\n",
            "          priority: 1\n          colour: \"red\"\n",
        ) + "metrics:\n  porrt: 9090\nlogging:\n  level: \"loud\"\n";
    let (code, out) = check(&bad, &ENV);
    assert_eq!(code, 1);
    for needle in [
        "server.bogus_one: unknown field `bogus_one`",
        "server.workers: ",
        "buckets[0].s3.replicas[0].colour: unknown field `colour`",
        "metrics.porrt: unknown field `porrt`",
        "logging.level: \"loud\" is not one of",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    assert!(out.contains("(5 problems)"), "{out}");
}

/// A bucket's `auth.jwt` keys that could not do what they say there are
/// refused, not ignored.
#[test]
fn bucket_jwt_keys_that_apply_elsewhere_are_refused() {
    let bucket = GOOD.replacen(
        "    s3:",
        "    auth:\n      enabled: true\n      jwt:\n        enabled: false\n        secret: \"s\"\n        jwks_url: \"https://idp.example/jwks\"\n        admin_claims:\n          - { claim: \"role\", operator: \"equals\", value: \"admin\" }\n    s3:",
        1,
    );
    let (code, out) = check(&bucket, &ENV);
    assert_eq!(code, 1);
    for needle in [
        "buckets[0].auth.jwt.jwks_url: a JWK set is fetched for the top-level jwt only",
        "buckets[0].auth.jwt.admin_claims: the admin API is guarded by the top-level jwt only",
        "buckets[0].auth.jwt.enabled: is false while the bucket's auth.enabled is true",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}

/// `GOOD` with a top-level `cache:` section.
fn with_cache(cache: &str) -> String {
    format!("{GOOD}cache:\n  enabled: true\n{cache}")
}

#[test]
fn the_redis_tier_in_the_other_systems_shape_loads_and_names_what_has_no_effect() {
    let text = with_cache(
        "  cache_layers: [\"memory\", \"redis\"]\n  redis:\n    enabled: true\n    redis_url: \"redis://:pw@127.0.0.1:6380/3\"\n    redis_key_prefix: \"fleet\"\n    min_pool_size: 5\n    max_pool_size: 50\n",
    );
    let (code, out) = check(&text, &ENV);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cache.redis.min_pool_size"), "{out}");
}

/// The cache example of the other system's documentation loads: the keys
/// its parser skips are each named as having no effect, and the disk tier
/// it enables without a `cache_dir` (spelled `path` there) uses the same
/// default directory as there.
#[test]
fn the_cache_example_of_the_other_systems_documentation_loads() {
    let theirs = include_str!("fixtures/other-system/website-cache.yaml");
    let text = format!("{GOOD}{theirs}");
    loads_with_no_effect(
        &text,
        &[
            "cache.memory.max_capacity",
            "cache.memory.max_file_size",
            "cache.memory.ttl_seconds",
            "cache.redis.max_capacity",
            "cache.redis.max_file_size",
            "cache.redis.ttl_seconds",
            "cache.redis.pool_size",
            "cache.disk.path",
            "cache.disk.max_capacity",
            "cache.disk.max_file_size",
            "cache.disk.ttl_seconds",
        ],
    );
    let text = text.replace(
        "    path: \"/var/cache/yatagarasu\"\n",
        "    cache_dir: \"/tmp/yatagarasu-cache\"\n    sendfile:\n      enabled: true\n      threshold_bytes: 65536\n",
    );
    let (code, out) = check(&text, &ENV);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("sendfile") && !out.contains("cache.disk.path"),
        "{out}"
    );
    // Its other Redis pages: a Sentinel block (read here), retries.
    let text = with_cache(
        "  redis:\n    enabled: true\n    redis_url: \"redis://c:6379\"\n    timeout_ms: 1000\n    retry_attempts: 3\n    retry_delay_ms: 100\n    sentinel:\n      master_name: \"mymaster\"\n      nodes: [\"s1:26379\"]\n",
    );
    loads_with_no_effect(
        &text,
        &[
            "cache.redis.timeout_ms",
            "cache.redis.retry_attempts",
            "cache.redis.retry_delay_ms",
        ],
    );
    // Its other pages: pre-warming, rate limits, a bucket's image keys.
    let text = format!(
        "{}cache:\n  warming:\n    enabled: true\n    paths:\n      - \"/assets/logo.png\"\n    concurrency: 4\n    rate_limit_requests_per_second: 10\nrate_limiting:\n  enabled: true\n  requests_per_second: 10000\n",
        GOOD.replacen(
            "    s3:\n",
            "    image_optimization:\n      enabled: true\n      quality: 85\n      auto_format: true\n      auto_rotate: true\n    s3:\n",
            1
        )
    );
    loads_with_no_effect(
        &text,
        &[
            "cache.warming.enabled",
            "cache.warming.paths",
            "cache.warming.rate_limit_requests_per_second",
            "rate_limiting",
            "buckets[0].image_optimization.quality",
            "buckets[0].image_optimization.auto_format",
            "buckets[0].image_optimization.auto_rotate",
        ],
    );
    let path_style = GOOD.replacen(
        "      bucket: \"c\"\n",
        "      bucket: \"c\"\n      path_style: true\n",
        1,
    );
    loads_with_no_effect(&path_style, &["buckets[1].s3.path_style"]);
    let typo = with_cache(
        "  disk:\n    enabled: true\n    cache_dir: \"/tmp/c\"\n    sendfile:\n      treshold_bytes: 1\n",
    );
    let (code, out) = check(&typo, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("cache.disk.sendfile.treshold_bytes: unknown field"),
        "{out}"
    );
}

/// `cache.redis.sentinel`: the other system's documented shape loads (no
/// `redis_url` needed), and its mistakes are named.
#[test]
fn redis_sentinel_settings_load_and_their_mistakes_are_named() {
    let sentinel = |body: &str| {
        with_cache(&format!(
            "  cache_layers: [\"memory\", \"redis\"]\n  redis:\n    enabled: true\n{body}"
        ))
    };
    let good = sentinel(
        "    sentinel:\n      master_name: \"mymaster\"\n      nodes:\n        - \"sentinel-1:26379\"\n        - \"sentinel-2:26379\"\n",
    );
    let (code, out) = check(&good, &ENV);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("sentinel"), "{out}");
    assert_error(
        &sentinel("    sentinel:\n      nodes: [\"s:26379\"]\n"),
        &ENV,
        &["cache.redis.sentinel.master_name", "is required"],
    );
    assert_error(
        &sentinel("    sentinel:\n      master_name: \"m\"\n      nodes: []\n"),
        &ENV,
        &["cache.redis.sentinel.nodes", "at least one Sentinel"],
    );
    assert_error(
        &sentinel("    sentinel:\n      master_name: \"m\"\n      nodes: [\"s:port\"]\n"),
        &ENV,
        &["cache.redis.sentinel.nodes[0]", "is not a port"],
    );
    assert_error(
        &sentinel("    redis_url: \"rediss://c:6380\"\n    sentinel:\n      master_name: \"m\"\n      nodes: [\"s:26379\"]\n"),
        &ENV,
        &["cache.redis.sentinel", "rediss://"],
    );
    // Its Cluster shape: nodes instead of a redis_url.
    let (code, out) = check(
        &sentinel(
            "    cluster:\n      nodes:\n        - \"redis-1:6379\"\n        - \"redis-2:6379\"\n",
        ),
        &ENV,
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("cluster"), "{out}");
    assert_error(
        &sentinel("    cluster:\n      nodes: []\n"),
        &ENV,
        &["cache.redis.cluster.nodes", "at least one node"],
    );
    assert_error(
        &sentinel("    cluster:\n      nodes: [\"r:1\"]\n    sentinel:\n      master_name: \"m\"\n      nodes: [\"s:26379\"]\n"),
        &ENV,
        &["cache.redis.cluster", "cannot both be set"],
    );
    assert_error(
        &sentinel("    sentinel:\n      master_name: \"m\"\n      nodes: [\"s:26379\"]\n      password: \"x\"\n"),
        &ENV,
        &["cache.redis.sentinel.password: unknown field"],
    );
}

#[test]
fn redis_mistakes_are_named() {
    let redis = |body: &str| {
        with_cache(&format!(
            "  cache_layers: [\"memory\", \"redis\"]\n  redis:\n    enabled: true\n{body}"
        ))
    };
    // TLS: a CA file that is not one is named; a ca_file without TLS too.
    assert_error(
        &redis("    redis_url: \"rediss://cache:6379\"\n    ca_file: \"/nonexistent/ca.pem\"\n"),
        &ENV,
        &["cache.redis.ca_file", "cannot read"],
    );
    assert_error(
        &redis("    redis_url: \"redis://cache:6379\"\n    ca_file: \"/etc/hostname\"\n"),
        &ENV,
        &["cache.redis.ca_file", "needs a rediss:// redis_url"],
    );
    assert_error(
        &redis("    redis_url: \"redis://cache:notaport\"\n"),
        &ENV,
        &["cache.redis.redis_url", "is not a port"],
    );
    assert_error(
        &redis("    redis_key_prefix: \"x\"\n"),
        &ENV,
        &["cache.redis.redis_url", "is required"],
    );
    assert_error(
        &redis("    redis_url: \"redis://c\"\n    redis_key_prefix: \"a{b}\"\n"),
        &ENV,
        &["cache.redis.redis_key_prefix", "braces"],
    );
    assert_error(
        &redis("    redis_url: \"redis://c\"\n    operation_timeout_ms: 0\n"),
        &ENV,
        &["cache.redis.operation_timeout_ms"],
    );
    assert_error(
        &with_cache("  cache_layers: [\"memory\", \"redis\"]\n"),
        &ENV,
        &["cache.cache_layers[1]", "needs cache.redis"],
    );
    assert_error(
        &with_cache("  cache_layers: [\"memory\"]\n  redis:\n    enabled: true\n    redis_url: \"redis://c\"\n"),
        &ENV,
        &["cache.redis.enabled", "does not list \"redis\""],
    );
}

#[test]
fn the_admin_api_on_the_main_port_needs_a_guard() {
    let text = format!("{GOOD}admin:\n  main_port: true\n");
    assert_error(
        &text,
        &ENV,
        &["admin.main_port", "needs admin.token or jwt.admin_claims"],
    );
    let text = format!("{GOOD}admin:\n  token: \"0123456789abcdef-admin\"\n  main_port: true\n");
    let (code, out) = check(&text, &ENV);
    assert_eq!(code, 0, "{out}");
}

/// The other system's older spellings (its Kubernetes example) are read as
/// the current keys, and a Redis block that is not on says it does nothing.
#[test]
fn the_older_spellings_are_read_as_the_current_keys() {
    let legacy = GOOD
        .replace("  address: \"127.0.0.1:8080\"\n", "  addr: \"127.0.0.1:8080\"\n")
        + "metrics:\n  enabled: true\n  addr: \"127.0.0.1:9191\"\ncache:\n  enabled: true\n  memory:\n    max_size: 52428800\n    ttl: 300\n  redis:\n    url: redis://127.0.0.1:6379\n    ttl: 3600\n    key_prefix: \"yatagarasu:\"\n";
    let (code, out) = check(&legacy, &ENV);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: cache.redis: is not enabled"),
        "{out}"
    );
    // Both spellings of one setting: named, not guessed.
    let both = legacy.replace(
        "    ttl: 300\n",
        "    ttl: 300\n    max_cache_size_mb: 64\n",
    );
    let (code, out) = check(&both, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("cache.memory.max_size: is the same bound as max_cache_size_mb"),
        "{out}"
    );
    let ports = legacy.replace(
        "  addr: \"127.0.0.1:9191\"\n",
        "  addr: \"127.0.0.1:9191\"\n  port: 9292\n",
    );
    let (code, out) = check(&ports, &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("metrics.port: differs from the port in metrics.address"),
        "{out}"
    );
}

#[test]
fn tracing_settings_are_checked() {
    let with = |t: &str| format!("{GOOD}observability:\n  tracing:\n    enabled: true\n{t}");
    let (code, out) = check(&with("    otlp_endpoint: \"http://collector:4317\"\n    sampling_ratio: 0.01\n    jaeger_endpoint: \"http://j:14268\"\n  request_logging:\n    log_requests: true\n"), &ENV);
    assert_eq!(code, 0, "{out}");
    for needle in [
        "observability.tracing.otlp_endpoint: 4317 is OTLP/gRPC's port",
        "observability.tracing.jaeger_endpoint: has no effect",
        "observability.request_logging: has no effect",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let (code, out) = check(&with("    exporter: zipkin\n"), &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("observability.tracing.exporter: \"zipkin\" is not supported here"),
        "{out}"
    );
    let (code, out) = check(&with("    sampling_ratio: 2\n"), &ENV);
    assert_eq!(code, 1);
    assert!(
        out.contains("observability.tracing.otlp_endpoint: is required"),
        "{out}"
    );
    assert!(
        out.contains("observability.tracing.sampling_ratio: must be between 0 and 1"),
        "{out}"
    );
}

/// Issue #29: image and watermark settings are checked like the rest: every
/// problem with its YAML path, in one run.
#[test]
fn image_and_watermark_problems_are_listed_with_their_paths() {
    let bad = GOOD.replace(
        "buckets:\n",
        "image_optimization:\n  enabled: true\n  max_width: 0\n  default_quality: 101\n  max_concurrent: 0\n  signing_key: \"short\"\n  sizes: [1]\nbuckets:\n",
    )
    .replacen(
        "    s3:\n",
        "    image_optimization:\n      max_queue: 5\n    watermark:\n      enabled: true\n      rules:\n        - pattern: \"**\"\n          watermarks:\n            - type: text\n              text: \"{{jwt.sub}} {{nope}}\"\n              position: top-left\n            - type: image\n              text: \"x\"\n              position: middle\n            - type: sticker\n              position: center\n              opacity: 2\n    s3:\n",
        1,
    );
    let (code, out) = check(&bad, &ENV);
    assert_eq!(code, 1, "{out}");
    for needle in [
        "image_optimization.sizes: unknown field",
        "image_optimization.max_width: must be from 1 to 16384",
        "image_optimization.default_quality: must be from 1 to 100",
        "image_optimization.max_concurrent: must be from 1 to 256",
        "image_optimization.signing_key: must be at least 16 characters",
        "buckets[0].image_optimization.max_queue: is process-wide",
        "buckets[0].watermark.rules[0].watermarks[0].text: {{nope}} is not a template value",
        "buckets[0].watermark.rules[0].watermarks[1].text: does not apply to type: image",
        "buckets[0].watermark.rules[0].watermarks[1].source: is required",
        "buckets[0].watermark.rules[0].watermarks[1].position: \"middle\" is not a position",
        "buckets[0].watermark.rules[0].watermarks[2].type: \"sticker\" is not a watermark type",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}
