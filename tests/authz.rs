//! Policy authorization through real sockets: OPA's Data API around a real
//! Rego engine, an OpenFGA Check stand-in (tests/support/policy.rs), and
//! the proxy's own Rego engine on the same policy files.

mod support;

use serde_json::json;
use std::time::Duration;
use support::http;
use support::policy::{Fga, Mode, Opa};
use support::rogue::Rogue;
use support::*;

const SECRET: &str = "authz-test-secret-0123456789abcdef";

/// An origin answering each key with a body naming it.
fn origin() -> Rogue {
    Rogue::start(move |req| {
        let body = format!("object {}\n", req.target);
        vec![support::rogue::send(&format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"e\"\r\nCache-Control: max-age=600\r\n\r\n{body}",
            body.len()
        ))]
    })
}

/// One bucket `/<name>` with JWT auth, the memory cache and `authorization`.
fn bucket(name: &str, endpoint: &str, authorization: &str) -> String {
    format!(
        "  - name: \"{name}\"\n    path_prefix: \"/{name}\"\n    auth:\n      enabled: true\n    authorization:\n{authorization}    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n"
    )
}

fn config(buckets: &str) -> String {
    format!(
        "jwt:\n  enabled: true\n  algorithm: \"HS256\"\n  secret: \"{SECRET}\"\ncache:\n  enabled: true\nbuckets:\n{buckets}"
    )
}

fn token(claims: serde_json::Value) -> String {
    let mut c = claims;
    c["exp"] = json!(unix_now() + 3600);
    hs256_token(SECRET, &c)
}

fn get(proxy: &Proxy, path: &str, token: &str) -> http::Resp {
    let auth = format!("Bearer {token}");
    http::get(proxy.port, path, &[("Authorization", &auth)])
}

fn opa_bucket(endpoint: &str, opa: &Opa, extra: &str) -> String {
    bucket(
        "opa",
        endpoint,
        &format!(
            "      type: opa\n      opa_url: \"{}\"\n      opa_policy_path: \"yatagarasu/authz/decision\"\n{extra}",
            opa.url()
        ),
    )
}

#[test]
fn opa_allows_and_denies_by_policy_and_a_cached_object_is_never_served_to_a_denied_request() {
    let up = origin();
    let opa = Opa::start();
    // One worker: decisions are remembered per core.
    let proxy = Proxy::start_with(&config(&opa_bucket(&up.endpoint(), &opa, "")), 1, &[]);
    let admin = token(json!({"sub": "ann", "role": "admin"}));
    let reader = token(json!({"sub": "rob", "role": "reader"}));
    // Admin: anything; the object is now cached.
    let r = get(&proxy, "/opa/secret/plan.txt", &admin);
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "object /bkt/secret/plan.txt\n")
    );
    assert_eq!(
        get(&proxy, "/opa/secret/plan.txt", &admin).header("x-cache"),
        Some("HIT")
    );
    assert_eq!(up.gets(), 1);
    // A reader outside the public folder: denied although the copy is cached.
    let r = get(&proxy, "/opa/secret/plan.txt", &reader);
    assert_eq!(r.status, 403, "{}", r.text());
    // A reader in the public folder: allowed.
    assert_eq!(get(&proxy, "/opa/public/a.txt", &reader).status, 200);
    // No token: the JWT phase refuses before the policy is asked.
    assert_eq!(proxy.get("/opa/public/a.txt").status, 401);
    let m = proxy.metrics();
    for needle in [
        "yatagarasu_authz_decisions_total{bucket=\"opa\",engine=\"opa\",result=\"allow\"} 3",
        "yatagarasu_authz_decisions_total{bucket=\"opa\",engine=\"opa\",result=\"deny\"} 1",
        "yatagarasu_authz_cache_total{bucket=\"opa\",result=\"hit\"} 1",
        "yatagarasu_authz_duration_seconds_count{engine=\"opa\"} 3",
    ] {
        assert!(m.contains(needle), "{needle}\n{m}");
    }
    // Remembered: the same question again is not asked (allow and deny).
    assert_eq!(opa.asked(), 3);
    assert_eq!(get(&proxy, "/opa/secret/plan.txt", &reader).status, 403);
    assert_eq!(opa.asked(), 3);
    // The access line carries the decision and the policy's reason.
    assert!(
        proxy.wait_log("authz=deny", Duration::from_secs(5)),
        "{}",
        proxy.log()
    );
    assert!(proxy
        .log()
        .contains("not an admin, and not a reader of a public folder"));
}

#[test]
fn a_failing_opa_answers_503_when_closed_and_allows_with_a_warning_when_open() {
    let up = origin();
    let opa = Opa::start();
    let open = bucket(
        "open",
        &up.endpoint(),
        &format!(
            "      type: opa\n      opa_url: \"{}\"\n      opa_timeout_ms: 300\n      opa_cache_ttl_seconds: 0\n      opa_fail_mode: open\n",
            opa.url()
        ),
    );
    let closed = opa_bucket(
        &up.endpoint(),
        &opa,
        "      opa_timeout_ms: 300\n      opa_cache_ttl_seconds: 0\n",
    );
    let proxy = Proxy::start(&config(&format!("{closed}{open}")));
    let admin = token(json!({"sub": "ann", "role": "admin"}));
    for mode in [Mode::Garbage, Mode::Fail, Mode::Hang] {
        opa.set_mode(mode);
        let r = get(&proxy, "/opa/k", &admin);
        assert_eq!(r.status, 503, "{mode:?}: {}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        let r = get(&proxy, "/open/k", &admin);
        assert_eq!(r.status, 200, "{mode:?}");
    }
    assert!(proxy
        .log()
        .contains("Authorization failed; allowing (fail_mode: open)"));
    assert!(proxy
        .log()
        .contains("Authorization failed; refusing with 503"));
    let m = proxy.metrics();
    assert!(m.contains("result=\"error_open\"} 3"), "{m}");
    assert!(m.contains("result=\"error_closed\"} 3"), "{m}");
    // Down: the breaker stops asking after three failures in a row per
    // core, so most of these never wait for a timeout.
    let asked = opa.asked();
    for _ in 0..20 {
        assert_eq!(get(&proxy, "/opa/k", &admin).status, 503);
    }
    assert!(
        opa.asked() - asked < 20,
        "every request asked a failing OPA"
    );
}

#[test]
fn rego_in_process_decides_as_opa_does_on_the_same_policy() {
    let up = origin();
    let opa = Opa::start();
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies/authz.rego");
    let rego = bucket(
        "rego",
        &up.endpoint(),
        &format!("      type: rego\n      policy_file: \"{policy}\"\n      policy_path: \"yatagarasu/authz/decision\"\n"),
    );
    let proxy = Proxy::start(&config(&format!(
        "{}{rego}",
        opa_bucket(&up.endpoint(), &opa, "")
    )));
    let cases = [
        (json!({"sub": "a", "role": "admin"}), "/x/secret.txt"),
        (json!({"sub": "b", "role": "reader"}), "/x/public/a.txt"),
        (json!({"sub": "c", "role": "reader"}), "/x/private/a.txt"),
        (json!({"sub": "d", "role": "guest"}), "/x/public/a.txt"),
        (json!({"sub": "e"}), "/x/public/a.txt"),
    ];
    let mut allowed = 0;
    for (claims, path) in cases {
        let t = token(claims.clone());
        let by_opa = get(&proxy, &format!("/opa{path}"), &t).status;
        let by_rego = get(&proxy, &format!("/rego{path}"), &t).status;
        assert_eq!(by_opa, by_rego, "{claims} {path}");
        assert!(by_opa == 200 || by_opa == 403);
        allowed += usize::from(by_opa == 200);
    }
    assert_eq!(allowed, 2);
    let m = proxy.metrics();
    assert!(
        m.contains(
            "yatagarasu_authz_decisions_total{bucket=\"rego\",engine=\"rego\",result=\"deny\"} 3"
        ),
        "{m}"
    );
}

#[test]
fn openfga_checks_viewer_on_files_folders_and_buckets() {
    let up = origin();
    let fga = Fga::start(&[
        ("user:alice", "viewer", "file:fga/docs/a.txt"),
        ("user:bob", "viewer", "folder:fga/reports/2026/"),
        ("user:carol", "viewer", "bucket:fga"),
    ]);
    let b = bucket(
        "fga",
        &up.endpoint(),
        &format!(
            "      type: openfga\n      openfga_endpoint: \"{}\"\n      openfga_store_id: \"{}\"\n      openfga_authorization_model_id: \"01HMODEL\"\n      openfga_api_token: \"tok\"\n",
            fga.url(),
            fga.store
        ),
    );
    let proxy = Proxy::start(&config(&b));
    let as_user = |sub: &str, path: &str| get(&proxy, path, &token(json!({ "sub": sub }))).status;
    assert_eq!(as_user("alice", "/fga/docs/a.txt"), 200);
    assert_eq!(as_user("alice", "/fga/docs/b.txt"), 403);
    assert_eq!(
        as_user("bob", "/fga/reports/2026/q1/sales.csv"),
        200,
        "inherited from the folder"
    );
    assert_eq!(as_user("bob", "/fga/reports/2025/q1.csv"), 403);
    assert_eq!(
        as_user("carol", "/fga/anything/at/all"),
        200,
        "inherited from the bucket"
    );
    assert_eq!(as_user("dave", "/fga/docs/a.txt"), 403);
    // A token without the user claim: nothing to ask, denied.
    let r = get(&proxy, "/fga/docs/a.txt", &token(json!({"role": "x"})));
    assert_eq!(r.status, 403);
    assert_eq!(fga.asked(), 6);
    // The model and the API token go with every question.
    let (authorization, question) = fga.last();
    assert_eq!(authorization.as_deref(), Some("Bearer tok"));
    assert_eq!(question["authorization_model_id"], "01HMODEL");
    assert_eq!(question["tuple_key"]["user"], "user:dave");
    assert_eq!(question["tuple_key"]["object"], "file:fga/docs/a.txt");
    fga.set_mode(Mode::Fail);
    assert_eq!(as_user("erin", "/fga/docs/a.txt"), 503);
}

#[test]
fn the_other_systems_authorization_keys_load() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("c.yaml");
    let text = "server:\n  address: \"127.0.0.1:0\"\n".to_string() + &config(&format!(
        "{}{}",
        bucket(
            "a",
            "http://127.0.0.1:9",
            "      type: opa\n      url: \"http://localhost:8181\"\n      policy_path: \"yatagarasu/authz/allow\"\n      timeout_ms: 100\n      cache_ttl_seconds: 60\n      fail_mode: closed\n",
        ),
        bucket(
            "b",
            "http://127.0.0.1:9",
            "      type: openfga\n      openfga_endpoint: \"http://localhost:8081\"\n      openfga_store_id: \"01ARZ3NDEKTSV4RRFFQ69G5FAV\"\n      openfga_user_claim: \"user.id\"\n      openfga_fail_mode: open\n",
        )
    ));
    let check = |text: &str| {
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
            .args(["--check", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        let said = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), said)
    };
    let (ok, said) = check(&text);
    assert!(ok, "{said}");
    // Mistakes are named.
    let bad = text
        .replace("type: opa", "type: opaa")
        .replace("openfga_fail_mode: open", "openfga_fail_mode: maybe");
    let (ok, said) = check(&bad);
    assert!(!ok);
    assert!(
        said.contains("buckets[0].authorization.type: \"opaa\" is not one of opa, openfga, rego"),
        "{said}"
    );
    assert!(
        said.contains("buckets[1].authorization.fail_mode: \"maybe\""),
        "{said}"
    );
}

#[test]
fn identical_questions_asked_at_once_on_one_core_make_one_call() {
    let up = origin();
    let opa = Opa::start();
    opa.set_mode(Mode::Held);
    let proxy = Proxy::start_with(&config(&opa_bucket(&up.endpoint(), &opa, "")), 1, &[]);
    let admin = token(json!({"sub": "ann", "role": "admin"}));
    let port = proxy.port;
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let auth = format!("Bearer {admin}");
            std::thread::spawn(move || {
                http::get(port, "/opa/same.txt", &[("Authorization", &auth)]).status
            })
        })
        .collect();
    // Every request has looked its question up (and missed) before the one
    // call is answered.
    let misses = "yatagarasu_authz_cache_total{bucket=\"opa\",result=\"miss\"}";
    assert!(
        proxy.wait_metric(misses, 10.0, Duration::from_secs(30)),
        "{}",
        proxy.metrics()
    );
    opa.release();
    for c in clients {
        assert_eq!(c.join().expect("client"), 200);
    }
    assert_eq!(opa.asked(), 1, "identical questions were asked separately");
}

#[test]
fn the_other_systems_load_test_shapes_run_against_the_decision_services() {
    // Its config/loadtest/config.loadtest-opa.yaml and -openfga.yaml shapes:
    // unprefixed url/policy_path/timeout_ms/cache_ttl_seconds/fail_mode,
    // and openfga_endpoint/openfga_store_id with the unprefixed rest.
    let up = origin();
    let opa = Opa::start();
    let fga = Fga::start(&[("user:rob", "viewer", "folder:fga/reports/")]);
    let opa_bucket = bucket(
        "opa",
        &up.endpoint(),
        &format!(
            "      type: opa\n      url: \"{}\"\n      policy_path: \"yatagarasu/authz/allow\"\n      timeout_ms: 100\n      cache_ttl_seconds: 60\n      fail_mode: closed\n",
            opa.url()
        ),
    );
    let fga_bucket = bucket(
        "fga",
        &up.endpoint(),
        &format!(
            "      type: openfga\n      openfga_endpoint: \"{}\"\n      openfga_store_id: \"{}\"\n      timeout_ms: 100\n      cache_ttl_seconds: 60\n      fail_mode: closed\n",
            fga.url(),
            fga.store
        ),
    );
    let proxy = Proxy::start(&config(&format!("{opa_bucket}{fga_bucket}")));
    let reader = token(json!({"sub": "rob", "role": "reader"}));
    assert_eq!(get(&proxy, "/opa/public/a.txt", &reader).status, 200);
    assert_eq!(get(&proxy, "/opa/private/a.txt", &reader).status, 403);
    assert_eq!(get(&proxy, "/fga/reports/q1.csv", &reader).status, 200);
    assert_eq!(get(&proxy, "/fga/other/q1.csv", &reader).status, 403);
    assert!(opa.asked() >= 2 && fga.asked() >= 2);
}

#[test]
fn an_opa_that_is_not_there_follows_the_fail_mode() {
    let up = origin();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let closed = bucket(
        "opa",
        &up.endpoint(),
        &format!("      type: opa\n      opa_url: \"{nowhere}\"\n"),
    );
    let open = bucket(
        "open",
        &up.endpoint(),
        &format!("      type: opa\n      opa_url: \"{nowhere}\"\n      opa_fail_mode: open\n"),
    );
    let proxy = Proxy::start(&config(&format!("{closed}{open}")));
    let admin = token(json!({"sub": "ann", "role": "admin"}));
    let r = get(&proxy, "/opa/k", &admin);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(get(&proxy, "/open/k", &admin).status, 200);
}

#[test]
fn opa_over_https_is_verified_against_the_trusted_roots() {
    use support::tls_front::{TestCa, TlsFront};
    let up = origin();
    let opa = Opa::start();
    let ca = TestCa::new("authz test CA");
    let front = TlsFront::start(&ca, opa.port());
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("ca");
    let b = bucket(
        "opa",
        &up.endpoint(),
        &format!(
            "      type: opa\n      opa_url: \"{}\"\n      opa_timeout_ms: 2000\n",
            front.endpoint()
        ),
    );
    let admin = token(json!({"sub": "ann", "role": "admin"}));
    // Trusted (the test CA is the system's roots here): decided over TLS.
    let ca_path = ca_file.to_str().expect("utf-8");
    let proxy = Proxy::start_with(&config(&b), 1, &[("SSL_CERT_FILE", ca_path)]);
    assert_eq!(get(&proxy, "/opa/k", &admin).status, 200);
    assert_eq!(opa.asked(), 1);
    drop(proxy);
    // Not trusted: the handshake fails, and the fail mode (closed) answers.
    let proxy = Proxy::start_with(&config(&b), 1, &[]);
    assert_eq!(get(&proxy, "/opa/k", &admin).status, 503);
    assert_eq!(opa.asked(), 1, "a question went to an unverified server");
    assert!(proxy.log().contains("tls"), "{}", proxy.log());
}

#[test]
fn a_changed_rego_policy_applies_after_a_reload() {
    let up = origin();
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("p.rego");
    let write = |allow: &str| {
        std::fs::write(
            &policy,
            format!("package yatagarasu.authz\nimport rego.v1\ndefault allow := false\nallow if {allow}\n"),
        )
        .expect("policy")
    };
    write("input.jwt_claims.role == \"admin\"");
    let b = bucket(
        "rego",
        &up.endpoint(),
        &format!(
            "      type: rego\n      policy_file: \"{}\"\n",
            policy.display()
        ),
    );
    let body = config(&b);
    let proxy = Proxy::start(&body);
    let reader = token(json!({"sub": "rob", "role": "reader"}));
    assert_eq!(get(&proxy, "/rego/k", &reader).status, 403);
    write("input.jwt_claims.role in {\"admin\", \"reader\"}");
    proxy.reload(&body);
    assert!(
        proxy.wait_metric(
            "yatagarasu_config_reloads_total{result=\"success\"}",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        proxy.log()
    );
    assert_eq!(get(&proxy, "/rego/k", &reader).status, 200);
    // A policy that no longer compiles is refused; the running one stays.
    std::fs::write(&policy, "package yatagarasu.authz\nallow if {").expect("policy");
    proxy.reload(&body);
    assert!(
        proxy.wait_metric(
            "yatagarasu_config_reloads_total{result=\"failure\"}",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        proxy.log()
    );
    assert_eq!(get(&proxy, "/rego/k", &reader).status, 200);
}

#[test]
fn a_rego_policy_reads_its_data_file() {
    let up = origin();
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("p.rego");
    let data = dir.path().join("d.json");
    std::fs::write(
        &policy,
        "package yatagarasu.authz\nimport rego.v1\ndefault allow := false\nallow if input.jwt_claims.team in data.teams\n",
    )
    .expect("policy");
    std::fs::write(&data, r#"{"teams": ["blue", "green"]}"#).expect("data");
    let b = bucket(
        "rego",
        &up.endpoint(),
        &format!(
            "      type: rego\n      policy_file: \"{}\"\n      data_file: \"{}\"\n",
            policy.display(),
            data.display()
        ),
    );
    let proxy = Proxy::start(&config(&b));
    let as_team =
        |team: &str| get(&proxy, "/rego/k", &token(json!({"sub": "x", "team": team}))).status;
    assert_eq!(as_team("blue"), 200);
    assert_eq!(as_team("green"), 200);
    assert_eq!(as_team("red"), 403);
}

/// The other system's older shape (its Kubernetes example): engines named
/// at the top (`authorization.opa`, `authorization.openfga`), chosen per
/// bucket under `auth.authorization` with OpenFGA's `relation` and
/// `object_prefix`. Read as each bucket's `authorization`, said in a
/// warning, and enforced: the relation and the object names asked are the
/// ones written.
#[test]
fn the_older_shape_with_top_level_engines_is_read_and_enforced() {
    let up = origin();
    let opa = Opa::start();
    let fga = Fga::start(&[("user:rob", "reader", "document:docs/a.txt")]);
    let legacy = |name: &str, block: &str| {
        format!(
            "  - name: \"{name}\"\n    path_prefix: \"/{name}\"\n    auth:\n      enabled: true\n      authorization:\n{block}    s3:\n      bucket: \"bkt\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n",
            up.endpoint()
        )
    };
    let cfg = format!(
        "authorization:\n  opa:\n    enabled: true\n    url: \"{}\"\n    policy_path: /v1/data/yatagarasu/authz/allow\n  openfga:\n    enabled: true\n    url: \"{}\"\n    store_id: \"{}\"\n{}",
        opa.url(),
        fga.url(),
        fga.store,
        config(&format!(
            "{}{}",
            legacy("docs", "        type: openfga\n        relation: reader\n        object_prefix: \"document:\"\n"),
            legacy("opa", "        type: opa\n"),
        ))
    );
    let proxy = Proxy::start(&cfg);
    assert!(
        proxy
            .log()
            .contains("buckets[0].auth.authorization: read as buckets[0].authorization"),
        "{}",
        proxy.log()
    );
    let rob = token(json!({"sub": "rob", "role": "reader"}));
    assert_eq!(
        get(&proxy, "/docs/a.txt", &rob).status,
        200,
        "reader on document:docs/a.txt"
    );
    assert_eq!(get(&proxy, "/docs/b.txt", &rob).status, 403);
    let (_, asked) = fga.last();
    assert_eq!(asked["tuple_key"]["relation"], "reader");
    assert_eq!(asked["tuple_key"]["object"], "document:docs/b.txt");
    // OPA with the Data API's own prefix in policy_path.
    assert_eq!(get(&proxy, "/opa/public/a.txt", &rob).status, 200);
    assert_eq!(get(&proxy, "/opa/private/a.txt", &rob).status, 403);
    assert!(opa.asked() >= 2);

    // A bucket naming an engine the top does not configure is refused at
    // load (its requests would otherwise go unchecked).
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        format!(
            "server:\n  address: \"127.0.0.1:0\"\n{}",
            config(&legacy("x", "        type: openfga\n"))
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
        .args(["--check", "--config"])
        .arg(&file)
        .output()
        .expect("--check");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("buckets[0].auth.authorization: names \"openfga\", which the top-level authorization.openfga does not configure"),
        "{text}"
    );
}
